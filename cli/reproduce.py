"""What a ``--json`` result records so that it can be run again and checked.

Every computing command (``distance``, ``match``, ``flow``, ``register``, ``batch``) adds to
its JSON object:

* ``command``: the command's name;
* ``seed``: the ``--seed`` its random generators were seeded with (``batch``: the seed of
  its jobs);
* ``options``: every parameter of the command line, given or defaulted, by its Python name
  (``max_iter``; the batch manifest accepts these names as columns), paths as written;
* ``argv``: the same as a command line, ``geomreg`` + ``argv`` runs it again (``--json``
  included);
* ``inputs``: for each input file (``a``, ``b``, ``weights_a``, ``weights_b``, ``apply``, a
  batch's ``manifest``) its ``path`` and ``sha256``, hashed before the computation;
* ``threads``: torch's intra-op threads (on the CPU the order of sums, so the last bits, can
  depend on it).

Versions, device, dtype and the backend that ran are in the result itself (``versions``,
``device``, ``dtype``, ``backend``, ``backend_reason``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

#: parameters that name files a command reads
INPUTS = ("a", "b", "manifest", "weights_a", "weights_b", "apply")
#: parameters about how the result is shown, not what it is
NOT_RECORDED = ("json_out", "debug")


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def seeded(ctx: Any, seed: int) -> dict[str, Any]:
    """Seed the random generators and return :func:`reproduction`.

    Commands call it once their inputs are read, right before the computation.
    """
    from geomreg.api import seed_everything

    return reproduction(ctx, seed_everything(seed))


def reproduction(ctx: Any, seed: int | None) -> dict[str, Any]:
    """The keys above, for the command running in Click context ``ctx``."""
    options: dict[str, Any] = {}
    argv: list[str] = [ctx.info_name]
    for param in ctx.command.params:
        if param.name in NOT_RECORDED:
            continue
        value = ctx.params.get(param.name)
        options[param.name] = _plain(value)
        argv += _words(param, value)
    argv.append("--json")
    inputs = {}
    for name in INPUTS:
        value = ctx.params.get(name)
        if value is not None and Path(value).is_file():
            inputs[name] = {"path": str(value), "sha256": sha256(value)}
    return {"command": ctx.info_name, "seed": seed, "options": options, "argv": argv,
            "inputs": inputs, "threads": _threads()}


def _plain(value: Any) -> Any:
    """A parameter's value as JSON: paths as text, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _words(param: Any, value: Any) -> list[str]:
    """The command-line words that give ``param`` the value ``value``."""
    if getattr(param, "param_type_name", None) == "argument":
        return [_text(value)]
    if value is None:
        return []
    name = next((o for o in param.opts if o.startswith("--")), param.opts[0])
    if getattr(param, "is_flag", False):
        if value:
            return [name]
        return [param.secondary_opts[0]] if param.secondary_opts else []
    if getattr(param, "multiple", False):
        return [w for v in value for w in (name, _text(v))]
    return [name, _text(value)]


def _text(value: Any) -> str:
    """A value as Click reads it back: floats in full precision (``repr``), paths as written."""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _threads() -> int | None:
    import sys

    torch = sys.modules.get("torch")
    return None if torch is None else int(torch.get_num_threads())

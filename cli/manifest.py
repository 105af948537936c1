"""Batch manifests: one job per row, validated whole before anything runs.

A manifest is a CSV file with a header, or JSON lines (``.jsonl``/``.ndjson``: one object per
line). Columns: ``id`` (optional: by default a stable hash of the row), ``command``
(``distance``, ``match``, ``flow`` or ``register``), ``a``, ``b``, and any long option of that
command, spelled as on the command line without the dashes (``blur``, ``max-iter`` or
``max_iter``, ``out``, ``transform``, ...). An empty cell is an option not given. Flags take
``true``/``false`` (also ``1``/``0``, ``yes``/``no``); ``debias=false`` is ``--no-debias``.
Relative paths, in ``a``, ``b`` and every option that names a file, are relative to the
manifest's folder. ``json`` and ``debug`` are batch's own business and refused.

Every row is checked against the command's own options (names, types, choices) with Click,
so a job is exactly the command line a user would type: ``Job.argv``.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

COMMANDS = ("distance", "match", "flow", "register")
#: columns that batch itself sets or that would break a job's JSON
RESERVED = ("json", "debug", "help")
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


class ManifestError(Exception):
    """Rows that cannot run: one message per bad row, each with its line number."""

    def __init__(self, path: Path, problems: list[str]):
        self.path, self.problems = path, problems
        super().__init__(f"{path}: {len(problems)} bad row(s): " + "; ".join(problems))


@dataclass(frozen=True)
class Job:
    """One row of a manifest, ready to run.

    Attributes:
        id: the row's ``id``, or a stable hash of its command and columns.
        line: where the row is in the manifest (1 is the first line of the file).
        command: ``distance``, ``match``, ``flow`` or ``register``.
        argv: the command line after ``geomreg``, ``--json`` included.
        outputs: the files the job writes (absolute paths).
    """

    id: str
    line: int
    command: str
    argv: tuple[str, ...]
    outputs: tuple[str, ...] = ()


def read_manifest(path: Path) -> list[Job]:
    """Every job of the manifest at ``path``.

    Raises:
        ManifestError: some rows are bad (all of them are listed), two rows share an id, or
            two rows write the same file.
        InputError: the file cannot be read or parsed at all.
    """
    from geomreg.errors import InputError

    folder = path.resolve().parent
    try:
        rows = list(_rows(path))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(str(path), f"cannot read the manifest: {err}") from None
    if not rows:
        raise InputError(str(path), "the manifest has no rows")
    jobs, problems = [], []
    for line, row in rows:
        try:
            jobs.append(_job(line, row, folder))
        except ValueError as err:
            problems.append(f"line {line}: {err}")
    seen: dict[str, int] = {}
    for job in jobs:
        if job.id in seen:
            problems.append(f"line {job.line}: id {job.id!r} is already used on line {seen[job.id]}")
        seen.setdefault(job.id, job.line)
    writers: dict[str, int] = {}
    for job in jobs:
        for out in job.outputs:
            if out in writers:
                problems.append(f"line {job.line}: {out} is also written by line {writers[out]}")
            writers.setdefault(out, job.line)
    if problems:
        raise ManifestError(path, problems)
    return jobs


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` for every non-blank row; CSV unless the suffix says JSON lines."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as fh:
            for k, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as err:
                    raise csv.Error(f"line {k}: not JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise csv.Error(f"line {k}: a JSON object is expected")
                yield k, row
        return
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            return
        for row in reader:
            if None in row:
                raise csv.Error(f"line {reader.line_num}: more cells than the header has columns")
            if any(v not in (None, "") for v in row.values()):
                yield reader.line_num, {k.strip(): v for k, v in row.items()}


def _job(line: int, row: dict[str, Any], folder: Path) -> Job:
    """The job of one row (``ValueError`` says what is wrong with it)."""
    cells = {str(k).strip().replace("_", "-"): _cell(v) for k, v in row.items()}
    cells = {k: v for k, v in cells.items() if v != ""}
    job_id = cells.pop("id", None)
    command = cells.pop("command", None)
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {', '.join(COMMANDS)}, not {command!r}")
    for key in ("a", "b"):
        if key not in cells:
            raise ValueError(f"column {key!r} is empty")
    a, b = (_path(cells.pop(k), folder) for k in ("a", "b"))
    cmd = _command(command)
    options = command_options(command)
    argv, outputs = [command, a, b], []
    for name, value in sorted(cells.items()):
        if name in RESERVED:
            raise ValueError(f"column {name!r} is set by geomreg batch itself")
        param = options.get(name)
        if param is None:
            raise ValueError(f"{command} has no option --{name}")
        if param.is_flag:
            argv += _flag(name, value, param)
            continue
        if name in PATH_OPTIONS:
            value = _path(value, folder)
            if name in OUTPUT_OPTIONS:
                outputs.append(value)
        argv += [f"--{name}", value]
    try:  # Click parses and converts every value (types, choices) without running anything
        cmd.make_context(command, argv[1:])
    except Exception as err:  # a Click usage error (typer vendors its own Click classes)
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        raise ValueError(message) from None
    argv.append("--json")
    if job_id is None:
        digest = hashlib.sha256(json.dumps(argv[:3] + sorted(cells.items())).encode()).hexdigest()
        job_id = digest[:12]
    return Job(job_id, line, command, tuple(argv), tuple(outputs))


#: options that name files a job writes (two jobs must not write the same one)
OUTPUT_OPTIONS = ("out", "field", "transform", "plot", "potentials", "log", "matches", "apply-out")
#: options that name files or folders (relative to the manifest's folder)
PATH_OPTIONS = (*OUTPUT_OPTIONS, "apply", "weights-a", "weights-b", "frames")


def _command(command: str) -> Any:
    """The Click command behind ``geomreg COMMAND``."""
    import typer

    from .main import app

    return typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]


def command_options(command: str) -> dict[str, Any]:
    """The long options of ``command`` (Click options), by name without dashes (``--no-x`` included)."""
    out: dict[str, Any] = {}
    for param in _command(command).params:
        if getattr(param, "param_type_name", None) == "option":
            for opt in (*param.opts, *param.secondary_opts):
                if opt.startswith("--"):
                    out[opt[2:]] = param
    return out


def _flag(name: str, value: str, param: Any) -> list[str]:
    """The command-line words of a flag column: ``--x``, ``--no-x`` or nothing."""
    word = value.lower()
    if word not in TRUE + FALSE:
        raise ValueError(f"--{name} is a flag: true or false, not {value!r}")
    on = (word in TRUE) == (f"--{name}" in param.opts)  # `no-debias=true` means --no-debias
    if on:
        return [param.opts[0]]
    return [param.secondary_opts[0]] if param.secondary_opts else []


def _cell(value: Any) -> str:
    """A cell as text (JSON lines may hold numbers and booleans)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip()


def _path(value: str, folder: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else folder / p)

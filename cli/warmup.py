"""``geomreg warmup``: compile ahead of time what runs would compile on first use.

The online backend's KeOps formulas, and on the CPU the multiscale backend's compiled kernel.
"""

from __future__ import annotations

import time
from typing import Annotated

import typer

from .errors import handle_errors
from .output import dumps, err_console, print_data


def warmup(
    loss: Annotated[
        list[str] | None, typer.Option(help="Loss to prepare (repeatable; default: all five).")
    ] = None,
    p: Annotated[list[int] | None, typer.Option("--p", help="Cost exponent(s) (default: 1 and 2).")] = None,
    dim: Annotated[int, typer.Option(help="Dimension D of the points.")] = 3,
    dtype: Annotated[
        list[str] | None, typer.Option(help="float32 and/or float64 (default: float32).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the list of configurations as JSON.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Compile the online backend's KeOps formulas once (forward and gradients).

    Run it before starting parallel jobs (batch scripts, CI): each new formula takes 5-30 s
    to compile the first time, and afterwards every process loads it from KeOps' cache.
    With --device cpu it also builds the multiscale backend's kernel (about 1 s, once per
    machine; without a C compiler that backend runs its torch blocks, and this says so).
    """
    with handle_errors(debug):
        from geomreg.engine import get_backend
        from geomreg.engine.online import warmup as run_warmup
        from geomreg.errors import ParameterError
        from geomreg.params import LOSSES

        losses = tuple(loss or LOSSES)
        for name in losses:
            if name not in LOSSES:
                raise ParameterError("--loss", f"unknown loss {name!r}; choose among {', '.join(LOSSES)}")
        ps = tuple(p or (1, 2))
        if any(v not in (1, 2) for v in ps):
            raise ParameterError("--p", f"must be 1 or 2, got {list(ps)}")
        dtypes = tuple(dtype or ("float32",))
        if any(d not in ("float32", "float64") for d in dtypes):
            raise ParameterError("--dtype", f"must be float32 or float64, got {list(dtypes)}")
        if dim < 1:
            raise ParameterError("--dim", f"must be >= 1, got {dim}")
        console = err_console()
        if device == "cpu":
            from geomreg.engine import native

            start = time.perf_counter()
            built = native.kernel() is not None
            state = "compiled" if built else "not built: the torch blocks run instead"
            console.print(f"ready: multiscale kernel, {state} ({time.perf_counter() - start:.1f} s)")
        get_backend("online")  # clear error when KeOps cannot run here
        done = run_warmup(losses=losses, ps=ps, dim=dim, dtypes=dtypes, device=device)
        for c in done:
            p_txt = f" p={c['p']}" if c["p"] is not None else ""
            console.print(
                f"ready: {c['loss']}{p_txt} D={c['dim']} {c['dtype']} {c['device']} ({c['seconds']:.1f} s)"
            )
        if json_out:
            print_data(dumps(done))


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("warmup")(warmup)

"""Exit codes and the one mapping from geomreg's errors to them (see cli/main.py)."""

from __future__ import annotations

import contextlib
import sys

import click
import typer

EXIT_OK, EXIT_DATA, EXIT_USAGE, EXIT_NOT_CONVERGED, EXIT_INTERNAL, EXIT_INTERRUPTED = (
    0, 1, 2, 3, 70, 130,
)  # fmt: skip


def one_line(message: str) -> str:
    """Escape control characters (a newline in a file name) so the message stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def fail(message: str, code: int) -> typer.Exit:
    """Print ``Error: message`` on stderr (one line) and return the Exit to raise."""
    sys.stderr.write(f"Error: {one_line(message)}\n")
    sys.stderr.flush()
    return typer.Exit(code)


@contextlib.contextmanager
def handle_errors(debug: bool = False):
    """Map geomreg's errors to one stderr line and an exit code (tracebacks only with --debug)."""
    from geomreg.errors import GeomregError

    try:
        yield
    except GeomregError as err:
        if debug:
            raise
        raise fail(str(err), err.exit_code) from None
    except KeyboardInterrupt:
        raise fail("interrupted", EXIT_INTERRUPTED) from None
    except (typer.Exit, click.exceptions.ClickException):
        raise
    except Exception as err:  # a bug, or memory: say so in one line, keep the traceback for --debug
        if debug:
            raise
        if isinstance(err, MemoryError) or _out_of_memory(err):
            raise fail("out of memory; try fewer points, --dtype float32 or another --backend",
                       EXIT_DATA) from None
        raise fail(
            f"internal error: {type(err).__name__}: {err} (rerun with --debug for details)",
            EXIT_INTERNAL,
        ) from None


def _out_of_memory(err: BaseException) -> bool:
    """Allocation failures of torch: RuntimeError on the CPU, OutOfMemoryError on CUDA."""
    text = str(err)
    return "can't allocate memory" in text or "out of memory" in text.lower()

"""The ``geomreg`` command: one Typer app, one place that maps errors to exit codes.

Exit codes (README.md, "Exit codes"):

====  ==========================================================================
0     success
1     bad data: unreadable, malformed or inconsistent input; an output that
      cannot be written; a backend or device that cannot run here
2     bad usage: unknown option, option value outside its domain
3     computed, but the Sinkhorn loop did not converge within --max-iter (the
      value is still printed; it may be inaccurate)
70    internal error (a bug in geomreg: please report it with --debug output)
130   interrupted (Ctrl-C)
====  ==========================================================================

Heavy packages (torch, open3d) are imported inside commands, so ``geomreg --help`` and
``geomreg --version`` answer at once.
"""

from __future__ import annotations

import contextlib
import sys

import click
import typer

from geomreg._version import __version__

EXIT_OK, EXIT_DATA, EXIT_USAGE, EXIT_NOT_CONVERGED, EXIT_INTERNAL, EXIT_INTERRUPTED = (
    0, 1, 2, 3, 70, 130,
)  # fmt: skip

app = typer.Typer(
    name="geomreg",
    help="Point-cloud and density-image registration with geometric losses.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"geomreg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Point-cloud and density-image registration with geometric losses.

    Exit codes: 0 ok, 1 bad data, 2 bad usage, 3 not converged, 70 internal error,
    130 interrupted.
    """


def fail(message: str, code: int) -> typer.Exit:
    """Print ``Error: message`` on stderr (one line) and return the Exit to raise."""
    sys.stderr.write(f"Error: {message}\n")
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
    except MemoryError:
        if debug:
            raise
        raise fail("out of memory; try fewer points or --dtype float32", EXIT_DATA) from None
    except Exception as err:  # a bug: say so in one line, keep the traceback for --debug
        if debug:
            raise
        raise fail(
            f"internal error: {type(err).__name__}: {err} (rerun with --debug for details)",
            EXIT_INTERNAL,
        ) from None


def _register_commands() -> None:
    from . import distance

    distance.register(app)


_register_commands()


def run() -> None:
    """Console-script entry point: one-line usage errors (exit 2) instead of Click's panel."""
    try:
        code = app(standalone_mode=False)
    except click.exceptions.UsageError as err:
        where = f"{err.ctx.command_path}: " if err.ctx is not None else ""
        sys.stderr.write(f"Error: {where}{err.format_message()}\n")
        sys.exit(EXIT_USAGE)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.stderr.write("Error: interrupted\n")
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    run()

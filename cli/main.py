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
130   interrupted (Ctrl-C, SIGINT)
143   terminated (SIGTERM)
====  ==========================================================================

SIGTERM raises :class:`~cli.errors.Terminated`, a ``KeyboardInterrupt``, in the main thread
(the handler is installed by :func:`run`, the console entry point), so the clean-up paths of
Ctrl-C run for it too: no output file and no temporary file is left, a flow keeps only its
complete frames, a batch shuts its Dask cluster down and RESULTS keeps complete lines.

Heavy packages (torch, open3d) are imported inside commands, so ``geomreg --help`` and
``geomreg --version`` answer at once.
"""

from __future__ import annotations

import functools
import sys

import click
import typer

from geomreg._version import __version__

from .errors import (  # noqa: F401  (re-exported for the commands)
    EXIT_DATA,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_NOT_CONVERGED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    Terminated,
    fail,
    handle_errors,
    signal_handlers,
    terminated,
)

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
    130 interrupted (Ctrl-C), 143 terminated (SIGTERM).
    """


def _register_commands() -> None:
    from . import batch, distance, flow, match, warmup
    from . import register as register_cmd
    from . import warp as warp_cmd

    batch.register(app)
    distance.register(app)
    match.register(app)
    flow.register(app)
    register_cmd.register_command(app)
    warmup.register(app)
    warp_cmd.register(app)


_register_commands()


def _click_classes(name: str) -> tuple[type, ...]:
    """Click's exception class ``name``, from click and from typer's own copy of click."""
    found = [getattr(click.exceptions, name, None)]
    try:  # typer >= 0.26 raises exceptions of the click it vendors
        from typer._click import exceptions as vendored

        found.append(getattr(vendored, name, None))
    except ImportError:
        pass
    return tuple(c for c in found if isinstance(c, type))


@functools.lru_cache(maxsize=1)
def _command() -> click.Command:
    """The Click command behind the app, built once (batch workers run many jobs)."""
    return typer.main.get_command(app)


def dispatch(argv: list[str] | None = None) -> int:
    """Run one command line (``sys.argv`` when None) and return its exit code.

    Usage errors are one line on stderr (exit 2) instead of Click's panel. ``geomreg batch``
    runs its jobs through here, so a job is exactly the command a user would type.
    """
    no_args = _click_classes("NoArgsIsHelpError")
    try:
        code = _command().main(args=argv, standalone_mode=False, prog_name="geomreg")
    except Terminated:
        return _terminated_exit()
    except no_args as err:  # bare `geomreg`: the help text, on stdout
        sys.stdout.write(err.format_message() + "\n")
        return EXIT_OK
    except _click_classes("UsageError") as err:
        ctx = getattr(err, "ctx", None)
        where = f"{ctx.command_path}: " if ctx is not None else ""
        sys.stderr.write(f"Error: {where}{err.format_message()}\n")
        return EXIT_USAGE
    except (typer.Exit, *_click_classes("Exit")) as err:
        return err.exit_code
    except (KeyboardInterrupt, *_click_classes("Abort")):
        if terminated():
            return _terminated_exit()
        sys.stderr.write("Error: interrupted\n")
        return EXIT_INTERRUPTED
    except _click_classes("ClickException") as err:
        sys.stderr.write(f"Error: {err.format_message()}\n")
        return getattr(err, "exit_code", EXIT_USAGE)
    code = code if isinstance(code, int) else EXIT_OK
    if terminated() and code != EXIT_TERMINATED:
        # SIGTERM arrived outside a command's handle_errors (while Click parsed the line):
        # typer turns any KeyboardInterrupt there into a silent exit 130
        return _terminated_exit()
    return code


def _terminated_exit() -> int:
    sys.stderr.write("Error: terminated\n")
    sys.stderr.flush()
    return EXIT_TERMINATED


def run() -> None:
    """Console-script entry point: one command line, SIGTERM handled like Ctrl-C (exit 143)."""
    try:
        with signal_handlers():
            code = dispatch()
    except KeyboardInterrupt:  # a signal after dispatch returned, before the handlers were removed
        if terminated():
            code = _terminated_exit()
        else:
            sys.stderr.write("Error: interrupted\n")
            code = EXIT_INTERRUPTED
    sys.exit(code)


if __name__ == "__main__":
    run()

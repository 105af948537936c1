"""Exit codes and the one mapping from geomreg's errors to them (see cli/main.py).

Signals. The console entry point installs :func:`signal_handlers`: Ctrl-C (SIGINT) raises
``KeyboardInterrupt`` as Python's own handler does, and SIGTERM raises :class:`Terminated`, a
subclass of it. Every clean-up written for Ctrl-C (temporary files removed, progress bars
closed, a batch's Dask cluster shut down) therefore runs for SIGTERM too; only the message
and the exit code differ: ``Error: interrupted`` (130) and ``Error: terminated`` (143 =
128 + 15, what a shell reports for a process that SIGTERM killed). While output files are
being written (:func:`uninterrupted`) both signals are held back and take effect as soon as
the files are complete.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

import click
import typer

EXIT_OK, EXIT_DATA, EXIT_USAGE, EXIT_NOT_CONVERGED, EXIT_INTERNAL, EXIT_INTERRUPTED = (
    0, 1, 2, 3, 70, 130,
)  # fmt: skip
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised in the main thread by the handler of :func:`signal_handlers`.

    A ``KeyboardInterrupt`` (not an ``Exception``), so that no ``except Exception`` swallows
    it and every path that cleans up after Ctrl-C cleans up after SIGTERM as well.
    """


_terminated = False  # SIGTERM was received
_held = 0  # depth of uninterrupted() blocks (main thread only)
_pending: KeyboardInterrupt | None = None  # what a held signal will raise


def terminated() -> bool:
    """Whether this process has received SIGTERM (while :func:`signal_handlers` was active)."""
    return _terminated


def _on_signal(signum, frame) -> None:
    """Raise KeyboardInterrupt (SIGINT) or Terminated (SIGTERM), or keep it for later when held.

    Python runs this in the main thread, between two bytecodes, whichever thread the signal
    reached. After the first SIGTERM the default action is back: a second SIGTERM ends the
    process at once, so a clean-up that hangs never makes it unkillable.
    """
    global _terminated, _pending
    if signum == signal.SIGTERM:
        _terminated = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        exc: KeyboardInterrupt = Terminated()
    else:
        exc = KeyboardInterrupt()
    if _held:
        if _pending is None or isinstance(exc, Terminated):
            _pending = exc
        return
    raise exc


@contextlib.contextmanager
def signal_handlers():
    """Within the block, SIGINT raises KeyboardInterrupt and SIGTERM :class:`Terminated`.

    Only in the main thread; a signal ignored when the process started (``nohup``, ``trap ''
    TERM``, a background job's SIGINT) stays ignored. The previous handlers come back on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is not signal.SIG_IGN:
            previous[sig] = handler
            signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def uninterrupted():
    """Hold SIGINT and SIGTERM back while the block runs: it writes output files.

    A signal that arrives meanwhile raises as the block ends, so it never falls between the
    creation of a temporary file and the point where the writer would remove it again, and
    a batch's RESULTS line is always written whole. Keep the block short. Effective with
    :func:`signal_handlers` installed, in the main thread.
    """
    global _held, _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held += 1
    try:
        yield
    finally:
        _held -= 1
        if not _held and _pending is not None:
            exc, _pending = _pending, None
            raise exc


#: the library's parameter names that an error can blame (their flag is ``--`` + the name
#: with dashes), and the ones whose flag is another
_PARAMETERS = frozenset({
    "apply", "backend", "blur", "classes", "cluster_scale", "controls", "cost", "device", "diameter",
    "dtype", "field", "fits", "init", "lam", "levels", "loss", "lr", "mass", "max_iter", "model",
    "normalize", "p", "plot", "reach", "sample", "scaling", "seed", "sigma", "steps", "tol", "top_k",
    "truncate", "voxel", "weight_property",
})
_OTHER_FLAGS = {"normalize": "--keep-mass", "lam": "--lambda"}


def flag_of(where: str) -> str:
    """The flag of a library parameter named by an error: ``max_iter`` -> ``--max-iter``.

    Anything else (a file name) comes back unchanged.
    """
    if where in _PARAMETERS:
        return _OTHER_FLAGS.get(where, "--" + where.replace("_", "-"))
    return where


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
    except (typer.Exit, click.exceptions.ClickException):
        raise
    except BaseException as err:
        # after SIGTERM, whatever the clean-up raised, the process was terminated
        if isinstance(err, Terminated) or terminated():
            raise fail("terminated", EXIT_TERMINATED) from None
        if isinstance(err, KeyboardInterrupt):
            raise fail("interrupted", EXIT_INTERRUPTED) from None
        if debug or not isinstance(err, Exception):  # --debug: the traceback; SystemExit
            raise
        if isinstance(err, GeomregError):
            where = flag_of(err.where)
            raise fail(f"{where}: {err.problem}" if where else err.problem, err.exit_code) from None
        if isinstance(err, MemoryError) or _out_of_memory(err):  # a bug, or memory: one line
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

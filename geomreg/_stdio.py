"""Keep geomreg's stdout pure data while chatty native libraries run.

open3d's C++ code and pykeops print to the process's stdout (file descriptor 1), which
would corrupt ``$(geomreg distance a b)`` and ``--json``. :func:`stdout_to_stderr` sends
all of it to stderr while they run.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout (Python's and file descriptor 1) to stderr meanwhile.

    Python-level prints go to ``sys.stderr``; C-level writes and child processes find file
    descriptor 1 pointing at descriptor 2. Both are flushed and restored on exit, errors
    included. When descriptor 1 cannot be duplicated (closed), only Python's stream is
    redirected.
    """
    _flush_all()
    try:
        saved = os.dup(1)
    except OSError:
        saved = None
    try:
        if saved is not None:
            os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _flush_all()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _flush_all() -> None:
    """Flush Python's stdout/stderr and the C library's stdio buffers."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).fflush(None)

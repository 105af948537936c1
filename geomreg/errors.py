"""Errors raised by geomreg; the CLI maps each class to an exit code (see cli/main.py).

Every error names *where* the problem is (a file, an option, an argument) and *what* is
wrong, so that ``str(err)`` reads ``"b.ply: 0 points; a point cloud needs at least 1"``.
"""

from __future__ import annotations


class GeomregError(Exception):
    """Base class of every error geomreg raises on purpose.

    Args:
        where: the file or parameter at fault (``"b.ply"``, ``"blur"``); may be
            empty when no single place is to blame.
        problem: what is wrong, in one line.
    """

    exit_code = 1

    def __init__(self, where: str, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}" if self.where else problem)


class InputError(GeomregError):
    """Bad data: unreadable, malformed or inconsistent input files or arrays (exit 1)."""

    exit_code = 1


class ParameterError(GeomregError):
    """A parameter value outside its domain (blur <= 0, p not in {1, 2}, ...) (exit 2)."""

    exit_code = 2


class BackendUnavailable(GeomregError):
    """The requested backend or device cannot run on this machine (exit 1)."""

    exit_code = 1


class OutputError(GeomregError):
    """An output file cannot be written where asked (exit 1)."""

    exit_code = 1

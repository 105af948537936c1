"""Compute time of a call and of its stages, as every command's ``--json`` reports them.

``time_s`` is the wall time of the computation alone (no file reading, no imports before the
call); ``times`` splits it into named stages (``transport``, ``surface``, ...). A stage
entered twice adds up; what no stage covers is the difference between the two.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Stopwatch:
    """Seconds since creation (:attr:`elapsed`) and per named stage (:attr:`times`).

    >>> clock = Stopwatch()
    >>> with clock("fit"):
    ...     pass
    >>> sorted(clock.times)
    ['fit']
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        """Time the ``with`` block as (part of) ``stage``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[stage] = self.times.get(stage, 0.0) + time.perf_counter() - t0

    @property
    def elapsed(self) -> float:
        """Seconds since the stopwatch was created."""
        return time.perf_counter() - self.start

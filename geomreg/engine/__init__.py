"""Backends and the one function that chooses among them.

``get_backend(name)`` returns a registered backend or raises :class:`BackendUnavailable`;
``choose_backend(...)`` is the single place where ``"auto"`` is decided, and the reason is
recorded in every result. A new backend is one new module plus one line in ``_REGISTRY``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..errors import BackendUnavailable, ParameterError
from .base import Backend, Cost, Kernel, dense_bytes, human_bytes

__all__ = [
    "Backend",
    "BackendChoice",
    "Cost",
    "Kernel",
    "available_backends",
    "choose_backend",
    "get_backend",
]


def _tensorized() -> Backend:
    from .tensorized import TensorizedBackend

    return TensorizedBackend()


#: name -> factory; factories import their module lazily (torch only when needed).
_REGISTRY: dict[str, Callable[[], Backend]] = {
    "tensorized": _tensorized,
}

#: Dense matrices the losses hold at once: Sinkhorn keeps C_xy, C_yx, C_xx, C_yy.
_DENSE_MATRICES = 4


def available_backends() -> list[str]:
    """Registered backend names, ``"auto"`` excluded."""
    return sorted(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The backend registered under ``name`` (not ``"auto"``: see :func:`choose_backend`)."""
    if name not in _REGISTRY:
        raise ParameterError(
            "--backend", f"unknown backend {name!r}; choose auto or one of {available_backends()}"
        )
    return _REGISTRY[name]()


@dataclass(frozen=True)
class BackendChoice:
    """Which backend runs a problem, and why (written into results)."""

    name: str
    reason: str


def choose_backend(
    requested: str, *, n: int, m: int, dim: int, itemsize: int, memory_bytes: int | None
) -> BackendChoice:
    """Decide which backend runs a problem of N x M points in dimension D.

    Rules, in order:

    1. an explicit name is honoured (after checking the dense problem fits in memory);
    2. ``auto`` takes ``tensorized`` while its matrices fit in the available memory.

    Args:
        requested: ``"auto"`` or a registered name.
        n, m: numbers of points of the two measures (the largest batch item).
        dim: ambient dimension D.
        itemsize: bytes per float (4 or 8).
        memory_bytes: memory available on the target device, or None if unknown.
    """
    if requested != "auto":
        get_backend(requested)  # validates the name
        if requested == "tensorized":
            _check_dense_fits(n, m, itemsize, memory_bytes)
        return BackendChoice(requested, "requested")
    _check_dense_fits(n, m, itemsize, memory_bytes)
    return BackendChoice("tensorized", f"dense matrices of {n}x{m} fit in memory")


def _check_dense_fits(n: int, m: int, itemsize: int, memory_bytes: int | None) -> None:
    k = max(n, m)
    need = dense_bytes(k, k, itemsize, _DENSE_MATRICES)
    if memory_bytes is not None and need > memory_bytes:
        raise BackendUnavailable(
            "--backend",
            f"the tensorized backend needs about {human_bytes(need)} for {n} x {m} points "
            f"but {human_bytes(memory_bytes)} is available; subsample the clouds or use "
            "--dtype float32",
        )

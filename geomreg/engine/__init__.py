"""Backends and the one function that chooses among them.

``get_backend(name)`` returns a registered backend or raises :class:`BackendUnavailable`;
``choose_backend(...)`` is the single place where ``"auto"`` is decided, and the reason is
recorded in every result. A new backend is one new module plus one line in ``_REGISTRY``.

Backends: ``tensorized`` (dense torch matrices, memory N x M) and ``online`` (KeOps
reductions, memory N + M; needs pykeops and a C++ compiler, compiles each new formula once).
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


def _online() -> Backend:
    from .online import OnlineBackend, keops_available

    ok, reason = keops_available()
    if not ok:
        raise BackendUnavailable("--backend", f"online needs pykeops and a working C++ compiler: {reason}")
    return OnlineBackend()


#: name -> factory; factories import their module lazily (torch, pykeops only when needed).
_REGISTRY: dict[str, Callable[[], Backend]] = {
    "tensorized": _tensorized,
    "online": _online,
}

#: Dense matrices the losses hold at once: Sinkhorn keeps C_xy, C_yx, C_xx, C_yy.
_DENSE_MATRICES = 4

#: On a GPU, ``auto`` prefers the online backend above this many pairs N x M (5000 x 5000,
#: GeomLoss's own rule) even when the dense matrices fit. On the CPU it keeps the dense
#: backend as long as it fits in memory: measured on 2 cores, float32, default tolerance,
#: Sinkhorn took 0.64 s dense vs 1.85 s online at 2000 x 2000 and 4.4 s vs 11.1 s at
#: 5000 x 5000.
_GPU_DENSE_MAX_PAIRS = 5000 * 5000


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
    requested: str,
    *,
    n: int,
    m: int,
    dim: int,
    itemsize: int,
    memory_bytes: int | None,
    device_type: str = "cpu",
) -> BackendChoice:
    """Decide which backend runs a problem of N x M points in dimension D.

    Rules, in order:

    1. an explicit name is honoured (``tensorized`` after checking that its dense matrices
       fit in memory; ``online`` after checking that KeOps works here);
    2. ``auto`` takes ``tensorized`` when its dense matrices fit in the available memory
       (on a GPU, also only while N x M <= 5000 x 5000: ``_GPU_DENSE_MAX_PAIRS``);
    3. otherwise ``online`` if KeOps works here (pykeops and a C++ compiler);
    4. otherwise ``tensorized`` if its matrices fit in memory;
    5. otherwise :class:`BackendUnavailable`, which suggests installing pykeops.

    Args:
        requested: ``"auto"`` or a registered name.
        n, m: numbers of points of the two measures (the largest batch item).
        dim: ambient dimension D.
        itemsize: bytes per float (4 or 8).
        memory_bytes: memory available on the target device, or None if unknown.
        device_type: ``"cpu"`` or ``"cuda"``.
    """
    if requested != "auto":
        get_backend(requested)  # validates the name (and, for online, that KeOps works)
        if requested == "tensorized":
            _check_dense_fits(n, m, itemsize, memory_bytes)
        return BackendChoice(requested, "requested")
    dense_problem = _dense_problem(n, m, itemsize, memory_bytes)
    too_many = device_type != "cpu" and n * m > _GPU_DENSE_MAX_PAIRS
    if dense_problem is None and not too_many:
        return BackendChoice("tensorized", f"dense matrices of {n}x{m} fit in memory")
    why_not_dense = dense_problem or f"{n}x{m} pairs exceed the GPU dense limit of 5000x5000"
    from .online import keops_available

    ok, keops_reason = keops_available()
    if ok:
        return BackendChoice("online", f"{why_not_dense}; KeOps works here ({keops_reason})")
    if dense_problem is None:
        return BackendChoice(
            "tensorized", f"dense matrices of {n}x{m} fit in memory; online unavailable ({keops_reason})"
        )
    raise BackendUnavailable(
        "--backend",
        f"{dense_problem}; the online backend (linear memory) is unavailable: {keops_reason}. "
        "Install pykeops and a C++ compiler (pip install 'pykeops>=2.2'), subsample the clouds "
        "or use --dtype float32",
    )


def _dense_problem(n: int, m: int, itemsize: int, memory_bytes: int | None) -> str | None:
    """Why the tensorized backend cannot hold this problem in memory, or None if it can."""
    k = max(n, m)
    need = dense_bytes(k, k, itemsize, _DENSE_MATRICES)
    if memory_bytes is not None and need > memory_bytes:
        return (
            f"the tensorized backend needs about {human_bytes(need)} for {n} x {m} points "
            f"but {human_bytes(memory_bytes)} is available"
        )
    return None


def _check_dense_fits(n: int, m: int, itemsize: int, memory_bytes: int | None) -> None:
    problem = _dense_problem(n, m, itemsize, memory_bytes)
    if problem is not None:
        raise BackendUnavailable(
            "--backend",
            f"{problem}; use --backend online (linear memory), subsample the clouds or use --dtype float32",
        )

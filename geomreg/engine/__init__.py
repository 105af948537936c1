"""Backends and the one function that chooses among them.

``get_backend(name)`` returns a registered backend or raises :class:`BackendUnavailable`;
``choose_backend(...)`` is the single place where ``"auto"`` is decided, and the reason is
recorded in every result. A new backend is one new module plus one line in ``_REGISTRY``.

Backends: ``tensorized`` (dense torch matrices, memory N x M), ``online`` (KeOps
reductions, memory N + M; needs pykeops and a C++ compiler, compiles each new formula once)
``multiscale`` (grid clusters, coarse-to-fine Sinkhorn and block-sparse torch
reductions, memory N + M; one pair of clouds at a time, D <= 3) and ``grid`` (density
images and volumes: separable log-domain convolutions on image pyramids; chosen in
``api.divergence`` when both inputs are grids, since points alone do not say so).
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
        raise BackendUnavailable("backend", f"online needs pykeops and a working C++ compiler: {reason}")
    return OnlineBackend()


def _multiscale(truncate: float | None = None, cluster_scale: float | None = None) -> Backend:
    from .multiscale import MultiscaleBackend

    return MultiscaleBackend(truncate=truncate, cluster_scale=cluster_scale)


def _grid(layouts=None) -> Backend:
    from .grid import GridBackend

    return GridBackend(layouts or ())


#: name -> factory; factories import their module lazily (torch, pykeops only when needed).
_REGISTRY: dict[str, Callable[..., Backend]] = {
    "tensorized": _tensorized,
    "online": _online,
    "multiscale": _multiscale,
    "grid": _grid,
}

#: backends that take options (``--truncate``, ``--cluster-scale``)
_OPTIONS = {"multiscale": ("truncate", "cluster_scale"), "grid": ("layouts",)}

#: Dense matrices the losses hold at once: Sinkhorn keeps C_xy, C_yx, C_xx, C_yy.
_DENSE_MATRICES = 4

#: On a GPU, ``auto`` prefers the online backend above this many pairs N x M (5000 x 5000,
#: GeomLoss's own rule) even when the dense matrices fit. On the CPU it keeps the dense
#: backend as long as it fits in memory: measured on 2 cores, float32, default tolerance,
#: Sinkhorn took 0.64 s dense vs 1.85 s online at 2000 x 2000 and 4.4 s vs 11.1 s at
#: 5000 x 5000.
_GPU_DENSE_MAX_PAIRS = 5000 * 5000
#: On the CPU, ``auto`` leaves the dense backend above this many pairs for multiscale
#: (without the compiled multiscale kernel). Measured (2 cores, blur 0.05, default tol,
#: uniform 3-D clouds, best of 3), dense vs multiscale: float64 in torch blocks 0.16 s vs
#: 0.30 s at 1000^2, 0.67 s vs 0.58 s at 2000^2, 1.79 s vs 0.83 s at 3000^2; float32 (torch
#: blocks) 0.39 s vs 0.52 s at 2000^2, 0.90 s vs 0.64 s at 3000^2. The same values to 7
#: digits.
_DENSE_MAX_PAIRS = 2000 * 2000
#: ... and above this many in float32 where the compiled kernel runs (:mod:`.native`):
#: dense vs multiscale 0.106 s vs 0.107 s at 1000^2, 0.37 s vs 0.18 s at 2000^2, 0.97 s vs
#: 0.28 s at 3000^2 (3-D; 2-D: 0.084 / 0.083, 0.31 / 0.12, 0.67 / 0.16 s); with a gradient
#: (the loop runs without one) 0.13 / 0.16, 0.53 / 0.28, 1.97 / 0.39 s. In float64 with the
#: kernel's float64 build: 0.20 / 0.20, 0.83 / 0.37, 1.81 / 0.51 s.
_DENSE_MAX_PAIRS_NATIVE = 1000 * 1000


def _cpu_dense_limit(pairs: int, itemsize: int, batch: int, dim: int) -> int:
    """The most pairs ``auto`` runs dense on the CPU: fewer where the compiled multiscale kernel applies.

    The kernel is looked for (and built, once) only when the answer depends on it.
    """
    native_limit = min(_DENSE_MAX_PAIRS, _DENSE_MAX_PAIRS_NATIVE)
    if not (itemsize in (4, 8) and batch == 1 and dim <= 3 and native_limit < pairs <= _DENSE_MAX_PAIRS):
        return _DENSE_MAX_PAIRS
    import torch

    from . import native

    dtype = torch.float32 if itemsize == 4 else torch.float64
    return native_limit if native.kernel(dtype) is not None else _DENSE_MAX_PAIRS


def available_backends() -> list[str]:
    """Registered backend names, ``"auto"`` excluded."""
    return sorted(_REGISTRY)


def get_backend(name: str, **options: float | None) -> Backend:
    """The backend registered under ``name`` (not ``"auto"``: see :func:`choose_backend`).

    ``options`` (``truncate``, ``cluster_scale``) go to the backends that take them; a
    value given to a backend that does not use it is a :class:`ParameterError`.
    """
    if name not in _REGISTRY:
        raise ParameterError(
            "backend", f"unknown backend {name!r}; choose auto or one of {available_backends()}"
        )
    accepted = _OPTIONS.get(name, ())
    for key, value in options.items():
        if value is not None and key not in accepted:
            raise ParameterError(key, f"applies to the multiscale backend only, not {name}")
    return _REGISTRY[name](**{k: v for k, v in options.items() if k in accepted})


@dataclass(frozen=True)
class BackendChoice:
    """Which backend runs a problem, and why (written into results)."""

    name: str
    reason: str
    #: set when ``auto`` wanted a backend that cannot run here and took another: the
    #: command line prints it on stderr
    fallback: str | None = None


def choose_backend(
    requested: str,
    *,
    n: int,
    m: int,
    dim: int,
    itemsize: int,
    memory_bytes: int | None,
    device_type: str = "cpu",
    batch: int = 1,
    formula: bool = False,
    self_pairs: bool = True,
) -> BackendChoice:
    """Decide which backend runs a problem of N x M points in dimension D.

    Rules, in order:

    1. an explicit name is honoured (``tensorized`` after checking that its dense matrices
       fit in memory; ``online`` after checking that KeOps works here);
    2. a cost given as a KeOps formula needs ``online``;
    3. ``auto`` takes ``tensorized`` when its dense matrices fit in the available memory
       and N x M is at most ``_DENSE_MAX_PAIRS`` (CPU; ``_DENSE_MAX_PAIRS_NATIVE`` in
       float32 where the compiled multiscale kernel runs) or ``_GPU_DENSE_MAX_PAIRS`` (GPU);
    4. on the CPU, ``multiscale`` for one pair of clouds in D <= 3 (pure torch: it needs
       no compiler);
    5. ``online`` if KeOps works here (pykeops and a C++ compiler);
    6. otherwise ``multiscale`` if it applies, else ``tensorized`` if its matrices fit;
       the choice then carries a ``fallback`` note, printed on stderr by the CLI;
    7. otherwise :class:`BackendUnavailable`, which suggests installing pykeops.

    Args:
        requested: ``"auto"`` or a registered name.
        n, m: numbers of points of the two measures (the largest batch item).
        dim: ambient dimension D.
        itemsize: bytes per float (4 or 8).
        memory_bytes: memory available on the target device, or None if unknown.
        device_type: ``"cpu"`` or ``"cuda"``.
        batch: number of pairs of clouds (multiscale handles 1).
        formula: the cost is a KeOps formula (online only).
        self_pairs: the loss also needs the N x N and M x M pairs (every loss but the
            Sinkhorn cost without debiasing); sizes the dense backend's matrices.
    """
    if requested != "auto":
        get_backend(requested)  # validates the name (and, for online, that KeOps works)
        if requested == "tensorized":
            _check_dense_fits(n, m, itemsize, memory_bytes, self_pairs)
        return BackendChoice(requested, "requested")
    if formula:
        get_backend("online")
        return BackendChoice("online", "the cost is a KeOps formula")
    dense_problem = _dense_problem(n, m, itemsize, memory_bytes, self_pairs)
    limit = _GPU_DENSE_MAX_PAIRS if device_type != "cpu" else _cpu_dense_limit(n * m, itemsize, batch, dim)
    if dense_problem is None and n * m <= limit:
        return BackendChoice("tensorized", f"dense matrices of {n}x{m} fit in memory")
    why_not_dense = dense_problem or f"{n}x{m} pairs exceed the dense limit of {limit:.3g} pairs"
    multiscale_ok = batch == 1 and dim <= 3
    if multiscale_ok and device_type == "cpu":
        return BackendChoice("multiscale", f"{why_not_dense}; one pair of clouds in {dim}-D")
    from .online import keops_available

    ok, keops_reason = keops_available()
    if ok:
        return BackendChoice("online", f"{why_not_dense}; KeOps works here ({keops_reason})")
    if multiscale_ok:
        note = f"the online backend cannot run here ({keops_reason}); using multiscale instead"
        return BackendChoice("multiscale", f"{why_not_dense}; {note}", fallback=note)
    if dense_problem is None:
        note = f"the online backend cannot run here ({keops_reason}); using tensorized instead"
        return BackendChoice("tensorized", f"dense matrices of {n}x{m} fit in memory; {note}", fallback=note)
    raise BackendUnavailable(
        "backend",
        f"{dense_problem}; the online backend (linear memory) is unavailable: {keops_reason}. "
        "Install pykeops and a C++ compiler (pip install 'pykeops>=2.2'), subsample the clouds "
        "or use --dtype float32",
    )


def _dense_problem(n: int, m: int, itemsize: int, memory_bytes: int | None,
                   self_pairs: bool = True) -> str | None:
    """Why the tensorized backend cannot hold this problem in memory, or None if it can.

    ``_DENSE_MATRICES`` matrices of max(N, M)^2 entries with the self pairs, else of N x M.
    """
    k = max(n, m)
    need = dense_bytes(k, k, itemsize, _DENSE_MATRICES) if self_pairs else \
        dense_bytes(n, m, itemsize, _DENSE_MATRICES)
    if memory_bytes is not None and need > memory_bytes:
        return (
            f"the tensorized backend needs about {human_bytes(need)} for {n} x {m} points "
            f"but {human_bytes(memory_bytes)} is available"
        )
    return None


def _check_dense_fits(n: int, m: int, itemsize: int, memory_bytes: int | None,
                      self_pairs: bool = True) -> None:
    problem = _dense_problem(n, m, itemsize, memory_bytes, self_pairs)
    if problem is not None:
        raise BackendUnavailable(
            "backend",
            f"{problem}; use --backend online (linear memory), subsample the clouds or use --dtype float32",
        )

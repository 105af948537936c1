r"""The engine contract: what a backend must do, and nothing more (ARCHITECTURE.md).

A backend reduces over pairs of points. It never sees schedules, weights logic,
debiasing or files. Three operations:

- ``pair(x, y, fn)``: bind row points ``x (B, N, D)`` and column points ``y (B, M, D)`` to a
  pair function ``fn`` (a ground :class:`Cost` or a :class:`Kernel`);
- ``softmin(eps, pair, h) -> (B, N)``:
  :math:`-\varepsilon \log \sum_j \exp(h_j - C(x_i, y_j)/\varepsilon)`;
- ``kernel_sum(pair, w) -> (B, N)``: :math:`\sum_j k(x_i, y_j)\, w_j`.

Autograd flows through whatever the caller passes: the Sinkhorn loop detaches the column
points itself when it wants row-only (envelope-theorem) gradients.

Coarse-to-fine. The Sinkhorn loop asks every backend for its :class:`Levels` (one small
protocol, :meth:`Backend.levels`): which level each step of the epsilon schedule runs on,
the four problem pairs and the weights of a level, the pairs that carry potentials from one
level to the next, and an optional truncation of the pairs given the current potentials.
The default is one level (the points themselves); the multiscale backend has cluster
centroids then points, the grid backend image pyramids. The loop never asks which backend
it runs on.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch


def safe_norm(d2: torch.Tensor) -> torch.Tensor:
    r"""Euclidean norm from squared distances, exact at 0 with a zero (sub)gradient there.

    ``sqrt`` has an infinite derivative at 0: coincident points would give NaN gradients.
    Here :math:`\sqrt{d^2}` is computed where :math:`d^2 > 0` and 0 elsewhere; no clamp changes
    the value (GeomLoss 0.3.1 clamps at 1e-8, which turns 0 into 1e-4).
    """
    positive = d2 > 0
    return torch.where(positive, d2.clamp_min(torch.finfo(d2.dtype).tiny).sqrt(), 0.0)


@dataclass(frozen=True)
class Cost:
    r"""Ground cost of optimal transport: p = 1: :math:`\|x-y\|`; p = 2: :math:`\tfrac12\|x-y\|^2`.

    ``formula``, when given, replaces it by a KeOps formula in the variables ``X`` (row point)
    and ``Y`` (column point), e.g. ``"SqDist(X,Y)/2"`` or ``"Norm2(X-Y)"``; only the online
    backend can evaluate it. ``p`` then only sets the temperature eps = blur ** p.
    """

    p: int
    formula: str | None = None

    name = "cost"

    def from_sqdist(self, d2: torch.Tensor) -> torch.Tensor:
        """The cost matrix from the matrix of squared distances."""
        if self.formula is not None:
            raise ValueError("a KeOps formula cost is evaluated by the online backend only")
        return d2 / 2 if self.p == 2 else safe_norm(d2)

    def __str__(self) -> str:
        if self.formula is not None:
            return self.formula
        return "|x-y|^2/2" if self.p == 2 else "|x-y|"


@dataclass(frozen=True)
class Kernel:
    r"""Kernel of an MMD (docs/theory.md, "Kernel MMDs"), sigma = blur.

    - gaussian: :math:`\exp(-\|x-y\|^2 / 2\sigma^2)`
    - laplacian: :math:`\exp(-\|x-y\| / \sigma)`
    - energy: :math:`-\|x-y\|` (sigma unused)
    """

    name: str
    sigma: float

    def from_sqdist(self, d2: torch.Tensor) -> torch.Tensor:
        """The kernel matrix from the matrix of squared distances."""
        if self.name == "gaussian":
            return torch.exp(d2 * (-0.5 / self.sigma**2))
        if self.name == "laplacian":
            return torch.exp(safe_norm(d2) * (-1.0 / self.sigma))
        if self.name == "energy":
            return -safe_norm(d2)
        raise ValueError(f"unknown kernel {self.name!r}")


class Pairs(NamedTuple):
    """The pairs of a Sinkhorn problem, named by (rows, columns).

    ``xy`` and ``yx`` carry the transport problem from α to β, ``xx`` and ``yy`` the
    symmetric problems of the debiased divergence (None when not debiased). The same
    names index the dual potentials (:class:`Duals`).
    """

    xy: Any
    yx: Any
    xx: Any = None
    yy: Any = None


class Duals(NamedTuple):
    r"""The four dual potentials, each on the rows of the pair of the same name.

    ``xy`` is :math:`f_{ba}` on x, ``yx`` is :math:`g_{ab}` on y, ``xx`` is :math:`f_{aa}` on x,
    ``yy`` is :math:`g_{bb}` on y; tensors ``(B, N)`` or ``(B, M)``, in input order. The
    symmetric ones are None when the divergence is not debiased.
    """

    xy: torch.Tensor
    yx: torch.Tensor
    xx: torch.Tensor | None = None
    yy: torch.Tensor | None = None


def problem_pairs(backend: Backend, x: torch.Tensor, y: torch.Tensor, fn: Cost, debias: bool,
                  rows: Any = None, cols: Any = None) -> Pairs:
    """The pairs (xy, yx, xx, yy) of a Sinkhorn problem; xx, yy are None when not debiased.

    Rows keep their autograd history and columns are detached, so that autograd yields the
    envelope-theorem gradients from the final step alone. ``rows``/``cols`` are passed to
    :meth:`Backend.pair` as the row and column structures of x and y (clusters) when given.
    """
    def kw(r, c):
        return {} if rows is None else {"rows": r, "cols": c}

    xy = backend.pair(x, y.detach(), fn, **kw(rows, cols))
    yx = backend.pair(y, x.detach(), fn, **kw(cols, rows))
    if not debias:
        return Pairs(xy, yx)
    return Pairs(xy, yx, backend.pair(x, x.detach(), fn, **kw(rows, rows)),
                 backend.pair(y, y.detach(), fn, **kw(cols, cols)))


class Levels:
    r"""Coarse-to-fine protocol of a backend: the levels a Sinkhorn run moves through.

    This default has one level, the points themselves. A subclass (multiscale: cluster
    centroids, then the points; grid: image pyramids) overrides:

    - :meth:`level_at`: the level of schedule step i (the last step is always ``finest``);
    - :meth:`pairs` and :meth:`weights`: the problem's pairs and weights ``(a, b)`` on a level;
    - :meth:`transfer`: pairs whose rows are the nodes of a finer level and whose columns
      are the nodes of the level before, through which the loop carries every potential to
      the finer level by one softmin (a c-transform, exact on any two sets of nodes);
    - :meth:`truncate`: the pairs restricted to what matters at temperature eps given the
      current potentials (the default keeps everything).

    ``jump_is_update``: when the last schedule step moves to a finer level, that transfer
    is the step's update (the grid backend, as GeomLoss's image solver does). ``info``: what
    the backend reports about the run (a dict for the result), or None.
    """

    finest: Hashable = 0
    jump_is_update = False

    def __init__(self, backend: Backend, x: torch.Tensor, a: torch.Tensor, y: torch.Tensor,
                 b: torch.Tensor, cost: Cost, epsilons: list[float], debias: bool):
        self.a, self.b = a, b
        self._pairs = problem_pairs(backend, x, y, cost, debias)
        self.info: dict[str, Any] | None = None

    def level_at(self, step: int) -> Hashable:
        """The level that schedule step ``step`` runs on."""
        return self.finest

    def pairs(self, level: Hashable) -> Pairs:
        """The problem's pairs on ``level``."""
        return self._pairs

    def weights(self, level: Hashable) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights ``(a (B, N'), b (B, M'))`` of both measures on ``level``."""
        return self.a, self.b

    def transfer(self, old: Hashable, new: Hashable) -> Pairs:
        """Pairs from the nodes of level ``new`` (rows) to those of level ``old`` (columns)."""
        raise NotImplementedError("one level: nothing to transfer")

    def truncate(self, level: Hashable, pairs: Pairs, duals: Duals, eps: float) -> Pairs:
        """``pairs`` restricted for temperature ``eps`` and potentials ``duals`` (default: all).

        A symmetric pair whose potential is None in ``duals`` (a potential the loop keeps
        fixed) is returned as it is.
        """
        return pairs


class Backend(ABC):
    """A way to reduce over pairs of points. Subclasses are registered in engine/__init__.py."""

    #: registry name, recorded in every result
    name: str = "abstract"

    @abstractmethod
    def pair(self, x: torch.Tensor, y: torch.Tensor, fn: Cost | Kernel) -> Any:
        """Bind rows ``x (B, N, D)`` and columns ``y (B, M, D)`` to a cost or kernel."""

    @abstractmethod
    def softmin(self, eps: float, pair: Any, h: torch.Tensor) -> torch.Tensor:
        r"""``(B, N)``: :math:`-\varepsilon \log \sum_j \exp(h_j - C(x_i,y_j)/\varepsilon)`, h ``(B, M)``."""

    @abstractmethod
    def kernel_sum(self, pair: Any, w: torch.Tensor) -> torch.Tensor:
        r"""``(B, N)``: :math:`\sum_j k(x_i, y_j) w_j`, w ``(B, M)``."""

    def barycentres(self, eps: float, pair: Any, h: torch.Tensor, y: torch.Tensor,
                    base: torch.Tensor | None = None) -> torch.Tensor:
        r"""``(B, N, D)``: row barycentres :math:`\sum_j \pi_{ij} y_j / \sum_j \pi_{ij}` of a plan.

        Here :math:`\pi_{ij} = e^{h_j - C_{ij}/\varepsilon}` and ``y (B, M, D)`` are the
        pair's column points; ``base`` is ``softmin(eps, pair, h)``, the denominator's
        softmin, when the caller has it already (the loss's final step has).

        The default takes D more softmins: each coordinate is a ratio of two softmins, the
        numerator adding :math:`\log z_j` to h, with z the coordinate shifted into
        [span, 2 span] (positive, so its log exists, and away from 0, so nothing is lost to
        cancellation). Backends that can weigh the columns' points in the softmin's own pass
        override it.
        """
        y = y.detach()
        base = self.softmin(eps, pair, h) if base is None else base
        lo = y.amin(1)
        span = (y.amax(1) - lo).clamp_min(1e-12)  # (B, D)
        out = []
        for d in range(y.shape[-1]):
            z = y[..., d] - lo[:, d : d + 1] + span[:, d : d + 1]
            num = self.softmin(eps, pair, h + z.log())
            out.append(torch.exp((base - num) / eps) + (lo[:, d : d + 1] - span[:, d : d + 1]))
        return torch.stack(out, dim=-1)

    def levels(self, x: torch.Tensor, a: torch.Tensor, y: torch.Tensor, b: torch.Tensor,
               cost: Cost, epsilons: list[float], debias: bool) -> Levels:
        """The coarse-to-fine levels of a Sinkhorn problem on this backend (default: one)."""
        return Levels(self, x, a, y, b, cost, epsilons, debias)


def dense_bytes(n: int, m: int, itemsize: int, matrices: int) -> int:
    """Memory of ``matrices`` dense (n, m) matrices, plus one temporary of the same size."""
    return (matrices + 1) * n * m * itemsize


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    k = min(int(math.log(max(n, 1), 1024)), len(units) - 1)
    return f"{n / 1024**k:.1f} {units[k]}"

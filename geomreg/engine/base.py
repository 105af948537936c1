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
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

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
    r"""Kernel of an MMD (REFERENCE.md, "Kernel MMDs"), sigma = blur.

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


def dense_bytes(n: int, m: int, itemsize: int, matrices: int) -> int:
    """Memory of ``matrices`` dense (n, m) matrices, plus one temporary of the same size."""
    return (matrices + 1) * n * m * itemsize


def human_bytes(n: float) -> str:
    """``1536 -> '1.5 KiB'``."""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    k = min(int(math.log(max(n, 1), 1024)), len(units) - 1)
    return f"{n / 1024**k:.1f} {units[k]}"

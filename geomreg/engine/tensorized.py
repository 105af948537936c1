r"""Dense torch backend: every pair function is an explicit ``(B, N, M)`` matrix.

Fast for up to a few thousand points on CPU (tens of thousands on a GPU); memory grows as
N x M. Squared distances are summed coordinate by coordinate for D <= 8 (exact 0 at
coincident points, which matters under the square root of p = 1 and of the energy
kernel: the expansion below leaves ~1e-8 there in float64, ~1e-4 in float32), and by
:math:`\|x\|^2 + \|y\|^2 - 2\langle x, y\rangle` (one matmul, clamped at 0) in higher dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Backend, Cost, Kernel

#: up to this dimension, squared distances are summed from coordinate differences
_DIRECT_MAX_DIM = 8


@dataclass
class DensePair:
    """A pair of point clouds with its matrix ``(B, N, M)`` already evaluated."""

    matrix: torch.Tensor


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(B, N, M)`` squared Euclidean distances between ``x (B, N, D)`` and ``y (B, M, D)``."""
    if x.shape[-1] <= _DIRECT_MAX_DIM:
        d2 = (x[:, :, None, 0] - y[:, None, :, 0]) ** 2
        for k in range(1, x.shape[-1]):
            d2 = d2 + (x[:, :, None, k] - y[:, None, :, k]) ** 2
        return d2
    xx = (x * x).sum(-1).unsqueeze(2)
    yy = (y * y).sum(-1).unsqueeze(1)
    return torch.baddbmm(xx + yy, x, y.transpose(1, 2), alpha=-2.0).clamp_min(0.0)


class TensorizedBackend(Backend):
    """Dense matrices in torch, on any device and dtype."""

    name = "tensorized"

    def pair(self, x: torch.Tensor, y: torch.Tensor, fn: Cost | Kernel) -> DensePair:
        """Evaluate ``fn`` on every pair (x_i, y_j)."""
        return DensePair(fn.from_sqdist(squared_distances(x, y)))

    def softmin(self, eps: float, pair: DensePair, h: torch.Tensor) -> torch.Tensor:
        """Log-sum-exp over the columns, one fused scale-and-add then torch.logsumexp."""
        z = torch.add(h.unsqueeze(1), pair.matrix, alpha=-1.0 / eps)
        return -eps * torch.logsumexp(z, dim=2)

    def kernel_sum(self, pair: DensePair, w: torch.Tensor) -> torch.Tensor:
        """Matrix-vector product ``K @ w``."""
        return torch.bmm(pair.matrix, w.unsqueeze(2)).squeeze(2)

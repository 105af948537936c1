r"""Dense torch backend: every pair function is an explicit ``(B, N, M)`` matrix.

Fast for up to a few thousand points on CPU (tens of thousands on a GPU); memory grows as
N x M. On the CPU a softmin works by blocks of rows, so that its temporaries stay in cache
instead of streaming N x M floats through memory several times.

Squared distances are summed coordinate by coordinate for D <= 8 (exact 0 at
coincident points, which matters under the square root of p = 1 and of the energy
kernel), and by :math:`\|x\|^2 + \|y\|^2 - 2\langle x, y\rangle` (one matmul, clamped at 0) in
higher dimensions. The expansion alone leaves its rounding error at coincident points
(~1e-16 |x|^2 in float64, ~1e-7 |x|^2 in float32: a distance of ~1e-8 |x| or ~3e-4 |x|
under the square root, GeomLoss's defect), so the entries it cannot tell from 0 are
summed again from coordinate differences: coincident points give exactly 0 in any D.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Backend, Cost, Kernel

#: up to this dimension, squared distances are summed from coordinate differences
_DIRECT_MAX_DIM = 8
#: entries per block of rows in CPU softmins: the temporary stays in cache (~1 MiB)
_CPU_BLOCK = 1 << 18
#: float32 exponents below this are clamped on the CPU (see _logsumexp_last)
_EXP_FLOOR = -80.0


def _logsumexp_last(z: torch.Tensor) -> torch.Tensor:
    """``log(sum(exp(z), -1))``, stable, reusing ``z``'s memory when no gradient is needed.

    On the CPU, float32 ``exp`` of arguments below about -88 (results that underflow) is
    some ten times slower than elsewhere, and in a softmin at small epsilon most shifted
    exponents are that negative. After subtracting the row maximum they are clamped at
    -80: each clamped term is at most e^-80 ~ 1.8e-35 of the largest one, far below
    float32 resolution, so the sum is unchanged while the slow path is avoided.
    """
    if z.requires_grad:
        m = z.amax(dim=-1, keepdim=True)
        e = z - m
        floor = _exp_floor(z)
        if floor is not None:
            e = e.clamp(min=floor)
        return e.exp().sum(-1).log() + m.squeeze(-1)
    e, m = _shifted_exp_(z)
    return e.sum(-1).log_().add_(m.squeeze(-1))


def _exp_floor(z: torch.Tensor) -> float | None:
    return _EXP_FLOOR if (z.dtype == torch.float32 and z.device.type == "cpu") else None


def _shifted_exp_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``exp(z - m)`` in ``z``'s memory and the row maxima m ``(..., 1)``; clamped as in _logsumexp_last."""
    m = z.amax(dim=-1, keepdim=True)
    z.sub_(m)
    floor = _exp_floor(z)
    if floor is not None:
        z.clamp_(min=floor)
    return z.exp_(), m


@dataclass
class DensePair:
    """A pair of point clouds with its matrix ``(B, N, M)`` already evaluated."""

    matrix: torch.Tensor


def squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(B, N, M)`` squared Euclidean distances between ``x (B, N, D)`` and ``y (B, M, D)``."""
    if x.shape[-1] <= _DIRECT_MAX_DIM:
        return _direct_squared_distances(x, y)
    xx = (x * x).sum(-1).unsqueeze(2)
    yy = (y * y).sum(-1).unsqueeze(1)
    d2 = torch.baddbmm(xx + yy, x, y.transpose(1, 2), alpha=-2.0).clamp_min(0.0)
    return _exact_near_zero(x, y, d2, xx, yy)


def _direct_squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(B, N, M)`` squared distances summed from coordinate differences (exact 0 at x = y)."""
    d2 = (x[:, :, None, 0] - y[:, None, :, 0]) ** 2
    for k in range(1, x.shape[-1]):
        d2 = d2 + (x[:, :, None, k] - y[:, None, :, k]) ** 2
    return d2


def _exact_near_zero(x, y, d2, xx, yy) -> torch.Tensor:
    r"""``d2`` with the entries below the expansion's rounding error summed from differences.

    :math:`\mathrm{fl}(\|x\|^2 + \|y\|^2 - 2\langle x, y\rangle)` is off by up to about
    :math:`(2D + 3)\,u\,(\|x\|^2 + \|y\|^2)` (u the unit round-off): an entry below that bound
    may be a pair of coincident points, whose exact value is 0. Those entries (the diagonal of
    a cloud against itself, duplicated points: few) are recomputed one by one; when they are
    more than N x M / D, the whole matrix is (same memory as the gathered differences).
    """
    dim = x.shape[-1]
    with torch.no_grad():
        scale = xx.amax(dim=(1, 2)) + yy.amax(dim=(1, 2))  # (B,)
        bound = (2 * dim + 4) * torch.finfo(d2.dtype).eps * scale
        close = (d2 <= bound[:, None, None]).nonzero(as_tuple=True)
    count = close[0].numel()
    if count == 0:
        return d2
    if count > d2.numel() // dim:
        return _direct_squared_distances(x, y)
    b, i, j = close
    return d2.index_put(close, ((x[b, i] - y[b, j]) ** 2).sum(-1))


class TensorizedBackend(Backend):
    """Dense matrices in torch, on any device and dtype."""

    name = "tensorized"

    def pair(self, x: torch.Tensor, y: torch.Tensor, fn: Cost | Kernel) -> DensePair:
        """Evaluate ``fn`` on every pair (x_i, y_j)."""
        return DensePair(fn.from_sqdist(squared_distances(x, y)))

    def softmin(self, eps: float, pair: DensePair, h: torch.Tensor) -> torch.Tensor:
        """Log-sum-exp over the columns, by blocks of rows on the CPU (see module notes)."""
        c = pair.matrix
        n, m = c.shape[1], c.shape[2]
        rows = n if c.device.type != "cpu" else max(1, _CPU_BLOCK // max(m, 1))
        hh = h.unsqueeze(1)
        blocks = [
            _logsumexp_last(torch.add(hh, c[:, i : i + rows], alpha=-1.0 / eps)) for i in range(0, n, rows)
        ]
        lse = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        return -eps * lse

    def barycentres(self, eps: float, pair: DensePair, h: torch.Tensor, y: torch.Tensor,
                    base: torch.Tensor | None = None) -> torch.Tensor:
        """See :meth:`Backend.barycentres`: each block of rows' weights normalised, times ``y``.

        One pass over the matrix instead of the default's D more softmins (``base`` is not
        needed); blocks of rows on the CPU as in :meth:`softmin`.
        """
        c = pair.matrix
        n, m = c.shape[1], c.shape[2]
        rows = n if c.device.type != "cpu" else max(1, _CPU_BLOCK // max(m, 1))
        hh = h.detach().unsqueeze(1)
        y1 = torch.cat([y.detach().to(c.dtype), c.new_ones(*y.shape[:2], 1)], dim=-1)  # weights' sums too
        with torch.no_grad():
            blocks = (torch.add(hh, c[:, i : i + rows], alpha=-1.0 / eps) for i in range(0, n, rows))
            sums = torch.cat([torch.bmm(_shifted_exp_(z)[0], y1) for z in blocks], dim=1)
        return sums[..., :-1] / sums[..., -1:]

    def kernel_sum(self, pair: DensePair, w: torch.Tensor) -> torch.Tensor:
        """Matrix-vector product ``K @ w``."""
        return torch.bmm(pair.matrix, w.unsqueeze(2)).squeeze(2)

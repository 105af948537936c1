r"""The entropic transport plan of a Sinkhorn run, evaluated where it is asked for.

At convergence the plan between :math:`\alpha = \sum_i a_i \delta_{x_i}` and
:math:`\beta = \sum_j b_j \delta_{y_j}` is
:math:`\pi_{ij} = a_i \exp(h_j - C(x_i, y_j)/\varepsilon) / \sum_k \exp(h_k - C(x_i, y_k)/\varepsilon)`
with :math:`h = \log b + g/\varepsilon` (each row carries the mass of its point). Its row
barycentres :math:`T(x) = \sum_j \pi(y_j | x)\, y_j` extend to *any* point x, since the
softmin is defined everywhere (the potentials' c-transform): that is how a field computed on
a subsample applies to the full-resolution cloud. Nothing N x M is ever stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .engine import Backend, Cost
from .engine.tensorized import squared_distances
from .errors import InputError, ParameterError

#: rows of the plan scored at once by :meth:`TransportPlan.matches` (memory: rows x M)
_MATCH_ROWS = 256


@dataclass(frozen=True)
class TransportPlan:
    r"""What :func:`geomreg.divergence` keeps of a Sinkhorn run to evaluate its plan.

    Attributes:
        backend: the backend that ran (the field is evaluated with it).
        cost: the ground cost.
        eps: the final temperature.
        x, y: ``(1, N, D)``, ``(1, M, D)`` the points as the solver saw them (centred).
        a: ``(1, N)`` source weights.
        h_ab: ``(1, M)`` log-weights of the plan's columns, :math:`\log b + g_{ab}/\varepsilon`.
        h_aa: ``(1, N)`` those of the plan from the source to itself (debiased), else None.
        centre: ``(D,)`` what was subtracted from the inputs.
    """

    backend: Backend
    cost: Cost
    eps: float
    x: torch.Tensor
    y: torch.Tensor
    a: torch.Tensor
    h_ab: torch.Tensor
    h_aa: torch.Tensor | None
    centre: torch.Tensor
    f_ba: torch.Tensor | None = None
    rho: float | None = None

    def row_mass(self) -> torch.Tensor:
        r"""``(N,)``: the mass each source point sends, :math:`\sum_j \pi_{ij}`.

        :math:`a_i` for balanced problems; :math:`a_i e^{-f_i/\rho}` for unbalanced ones
        (points without a counterpart, outliers or the part outside an overlap, send little).
        """
        if self.rho is None or self.f_ba is None:
            return self.a[0]
        return self.a[0] * torch.exp(-self.f_ba[0] / self.rho)

    def field_at(self, points: Any, name: str = "apply") -> torch.Tensor:
        """``(K, D)``: the displacement field at ``points (K, D)`` (input coordinates).

        The barycentre of the plan's row at each point, minus that of the source's plan to
        itself (debiased) or minus the point: the same field as ``result.field`` on the
        source points, extended to any others.
        """
        z = _points(points, self.x, name, self.centre)
        backend = self.backend
        with torch.no_grad():
            v = backend.barycentres(self.eps, backend.pair(z[None], self.y, self.cost), self.h_ab, self.y)
            if self.h_aa is None:
                return (v - z[None])[0]
            pair = backend.pair(z[None], self.x, self.cost)
            return (v - backend.barycentres(self.eps, pair, self.h_aa, self.x))[0]

    def matches(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The ``k`` strongest targets of each source point: indices and plan weights ``(N, k)``.

        Weights are entries of the plan, :math:`\pi_{ij}`; a row of the plan sums to
        :math:`a_i`, so ``weights.sum(1) / a`` is the share of each point's mass that its k
        matches carry. The rows are scored in blocks (memory: a few hundred rows x M).
        """
        m = self.y.shape[1]
        if not 1 <= k <= m:
            raise ParameterError("top_k", f"must be between 1 and the {m} target points, got {k}")
        x, y, h = self.x[0], self.y[0], self.h_ab[0]
        idx, weights = [], []
        with torch.no_grad():
            for r0 in range(0, x.shape[0], _MATCH_ROWS):
                xr = x[r0 : r0 + _MATCH_ROWS]
                d2 = squared_distances(xr[None], y[None])[0]
                logits = h[None] - self.cost.from_sqdist(d2) / self.eps
                top, j = logits.topk(k, dim=1)
                share = torch.exp(top - torch.logsumexp(logits, dim=1, keepdim=True))
                idx.append(j)
                weights.append(share * self.a[0, r0 : r0 + _MATCH_ROWS, None])
        return torch.cat(idx), torch.cat(weights)


def _points(points: Any, like: torch.Tensor, name: str, centre: torch.Tensor) -> torch.Tensor:
    """``points`` minus ``centre``, in ``like``'s dtype (subtracted in the wider precision)."""
    from .measure import Measure

    if isinstance(points, Measure):
        name, points = points.source, points.points
    z = points if isinstance(points, torch.Tensor) else torch.as_tensor(np.asarray(points, dtype=np.float64))
    if z.dim() == 1:
        z = z[:, None]
    if z.dim() != 2 or z.shape[1] != like.shape[-1]:
        raise InputError(name, f"expected points of dimension {like.shape[-1]}, found shape {tuple(z.shape)}")
    wide = torch.promote_types(z.dtype, centre.dtype) if z.is_floating_point() else torch.float64
    z = z.detach().to(device=like.device, dtype=wide)
    if not torch.isfinite(z).all():
        raise InputError(name, "non-finite coordinate (NaN or inf)")
    z = (z - centre).to(like.dtype)
    if not torch.isfinite(z).all():
        raise InputError(name, f"coordinates too large for {str(like.dtype).removeprefix('torch.')}")
    return z

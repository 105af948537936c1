r"""Hausdorff divergence (Feydy & Trouvé 2018), which GeomLoss 0.3.1 cannot compute.

With the soft-min
:math:`\mathrm{Sm}_\varepsilon[\mu](x) = -\varepsilon\log\sum_j \mu_j e^{-C(x, y_j)/\varepsilon}`:

.. math::
    H_\varepsilon(\alpha,\beta) =
    \tfrac12\langle a, \mathrm{Sm}_\varepsilon[\beta](x) - \mathrm{Sm}_\varepsilon[\alpha](x)\rangle
    + \tfrac12\langle b, \mathrm{Sm}_\varepsilon[\alpha](y) - \mathrm{Sm}_\varepsilon[\beta](y)\rangle

As blur -> 0 it tends to the symmetric chamfer (ICP) loss
:math:`\tfrac12\langle a, \min_j C(x_i, y_j)\rangle + \tfrac12\langle b, \min_i C(x_i, y_j)\rangle`.
A closed form: autograd differentiates it directly (no envelope argument needed), except
with respect to a zero weight: a weight enters the soft-min through its log, and the
derivative of :math:`\log a_j` does not exist at 0 although that of
:math:`\mathrm{Sm}_\varepsilon[\alpha]` does; :func:`_zero_weight_slopes` supplies it.
"""

from __future__ import annotations

import torch

from ..engine import Backend, Cost
from ..results import LossOutput
from .sinkhorn import log_weights


def hausdorff_loss(
    backend: Backend,
    x: torch.Tensor,
    a: torch.Tensor,
    y: torch.Tensor,
    b: torch.Tensor,
    *,
    p: int,
    blur: float,
    cost_formula: str | None = None,
) -> LossOutput:
    """Hausdorff divergence; potentials are the half-differences of soft-mins on each side.

    Args:
        backend: engine backend.
        x, a: ``(B, N, D)`` points and ``(B, N)`` weights of the source.
        y, b: ``(B, M, D)`` points and ``(B, M)`` weights of the target.
        p: exponent of the cost (1 or 2).
        blur: sigma; the temperature is ``blur ** p``.
        cost_formula: a KeOps formula in X and Y replacing the cost (online backend only).
    """
    eps = float(blur) ** p
    cost = Cost(p, cost_formula)
    a_log, b_log = log_weights(a), log_weights(b)
    sm = backend.softmin
    xy, xx = backend.pair(x, y, cost), backend.pair(x, x, cost)
    yx, yy = backend.pair(y, x, cost), backend.pair(y, y, cost)
    f_xb = sm(eps, xy, b_log)  # Sm[beta](x)
    f_xa = sm(eps, xx, a_log)  # Sm[alpha](x)
    g_ya = sm(eps, yx, a_log)  # Sm[alpha](y)
    g_yb = sm(eps, yy, b_log)  # Sm[beta](y)
    f, g = 0.5 * (f_xb - f_xa), 0.5 * (g_ya - g_yb)
    values = (a * f).sum(-1) + (b * g).sum(-1)
    if cost_formula is None:  # the slopes below use C(x, y) = C(y, x)
        # each adds 0 to the value and slope_j to the derivative at each zero weight w_j
        if a.requires_grad and bool((a.detach() == 0).any()):
            slope = _zero_weight_slopes(sm, eps, a, xx, a_log, f_xa, xy, b_log, g_ya)
            values = values + ((a - a.detach()) * slope).sum(-1)
        if b.requires_grad and bool((b.detach() == 0).any()):
            slope = _zero_weight_slopes(sm, eps, b, yy, b_log, g_yb, yx, a_log, f_xb)
            values = values + ((b - b.detach()) * slope).sum(-1)
    return LossOutput(values=values, potentials=(f.detach(), g.detach()))


def _zero_weight_slopes(sm, eps, w, self_pair, w_log, sm_self, cross_pair, other_log, sm_other_rows):
    r"""The part of :math:`\partial H / \partial a_j` that autograd misses at zero weights ``(B, N)``.

    With :math:`\partial \mathrm{Sm}_\varepsilon[\alpha](z) / \partial a_j =
    -\varepsilon\, e^{(\mathrm{Sm}_\varepsilon[\alpha](z) - C(z, x_j))/\varepsilon}`, the soft-min
    terms :math:`-\tfrac12\langle a, \mathrm{Sm}[\alpha](x)\rangle + \tfrac12\langle b,
    \mathrm{Sm}[\alpha](y)\rangle` of H contribute

    .. math::
        \tfrac{\varepsilon}{2}\Big(\sum_i a_i e^{(\mathrm{Sm}[\alpha](x_i) - C(x_i, x_j))/\varepsilon}
        - \sum_k b_k e^{(\mathrm{Sm}[\alpha](y_k) - C(y_k, x_j))/\varepsilon}\Big),

    two soft-mins over the rows x_j (the cost being symmetric). Zero where the weight ``w`` is
    positive (autograd has that derivative right); called with the roles of the two measures
    swapped for b. A slope too large for the dtype is clamped to its largest finite value
    (the true derivative, at a zero-weight point far from the rest of its measure, grows
    like :math:`e^{C/\varepsilon}`, C the cost to the nearest point of that measure).
    """
    with torch.no_grad():
        s_self = sm(eps, self_pair, w_log + sm_self.detach() / eps).double()
        s_cross = sm(eps, cross_pair, other_log + sm_other_rows.detach() / eps).double()
        top = torch.maximum(-s_self, -s_cross) / eps
        diff = torch.exp(-s_self / eps - top) - torch.exp(-s_cross / eps - top)
        # (eps/2) (exp(-s_self/eps) - exp(-s_cross/eps)) without overflow; 0 where equal
        slope = (eps / 2) * torch.sign(diff) * torch.exp(top + torch.log(diff.abs()))
        slope = torch.where(diff == 0, 0.0, slope)
        zero = w.detach() == 0
        big = torch.finfo(sm_self.dtype).max
        return torch.where(zero, slope.clamp(-big, big), 0.0).to(sm_self.dtype)

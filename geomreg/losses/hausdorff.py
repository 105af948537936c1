r"""Hausdorff divergence (Feydy & Trouvé 2018), which GeomLoss 0.3.1 cannot compute.

With the soft-min
:math:`\mathrm{Sm}_\varepsilon[\mu](x) = -\varepsilon\log\sum_j \mu_j e^{-C(x, y_j)/\varepsilon}`:

.. math::
    H_\varepsilon(\alpha,\beta) =
    \tfrac12\langle a, \mathrm{Sm}_\varepsilon[\beta](x) - \mathrm{Sm}_\varepsilon[\alpha](x)\rangle
    + \tfrac12\langle b, \mathrm{Sm}_\varepsilon[\alpha](y) - \mathrm{Sm}_\varepsilon[\beta](y)\rangle

As blur -> 0 it tends to the symmetric chamfer (ICP) loss
:math:`\tfrac12\langle a, \min_j C(x_i, y_j)\rangle + \tfrac12\langle b, \min_i C(x_i, y_j)\rangle`.
A closed form: autograd differentiates it directly (no envelope argument needed).
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
    f_xb = sm(eps, backend.pair(x, y, cost), b_log)  # Sm[beta](x)
    f_xa = sm(eps, backend.pair(x, x, cost), a_log)  # Sm[alpha](x)
    g_ya = sm(eps, backend.pair(y, x, cost), a_log)  # Sm[alpha](y)
    g_yb = sm(eps, backend.pair(y, y, cost), b_log)  # Sm[beta](y)
    f, g = 0.5 * (f_xb - f_xa), 0.5 * (g_ya - g_yb)
    values = (a * f).sum(-1) + (b * g).sum(-1)
    return LossOutput(values=values, potentials=(f.detach(), g.detach()))

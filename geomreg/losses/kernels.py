r"""Kernel MMDs: energy, gaussian, laplacian (docs/theory.md, "Kernel MMDs").

.. math::
    L(\alpha,\beta) = \tfrac12\langle a, K_{xx} a\rangle + \tfrac12\langle b, K_{yy} b\rangle
    - \langle a, K_{xy} b\rangle = \tfrac12\|\alpha-\beta\|_k^2

with gaussian :math:`k = e^{-\|x-y\|^2/2\sigma^2}`, laplacian :math:`k = e^{-\|x-y\|/\sigma}`,
energy :math:`k = -\|x-y\|` (half the classical energy distance; blur unused).
Potentials: :math:`(K_{xx}a - K_{xy}b,\; K_{yy}b - K_{yx}a)`, the gradients of L with respect
to the weights. The energy kernel is exact at coincident points (0, not GeomLoss's
-1e-4) with a zero gradient there instead of NaN.
"""

from __future__ import annotations

import torch

from ..engine import Backend, Kernel
from ..results import LossOutput

KERNELS = ("energy", "gaussian", "laplacian")


def kernel_loss(
    backend: Backend,
    x: torch.Tensor,
    a: torch.Tensor,
    y: torch.Tensor,
    b: torch.Tensor,
    *,
    name: str,
    blur: float,
    potentials: bool = False,
) -> LossOutput:
    """Kernel norm of alpha - beta.

    Args:
        backend: engine backend.
        x, a: ``(B, N, D)`` points and ``(B, N)`` weights of the source.
        y, b: ``(B, M, D)`` points and ``(B, M)`` weights of the target.
        name: ``"energy"``, ``"gaussian"`` or ``"laplacian"``.
        blur: sigma of the gaussian and laplacian kernels.
        potentials: also compute ``K_yx a`` for the potentials (one more kernel product).
    """
    kernel = Kernel(name, float(blur))
    ks = backend.kernel_sum
    a_x = ks(backend.pair(x, x, kernel), a)  # K_xx a
    b_x = ks(backend.pair(x, y, kernel), b)  # K_xy b
    b_y = ks(backend.pair(y, y, kernel), b)  # K_yy b
    values = 0.5 * (a * a_x).sum(-1) + 0.5 * (b * b_y).sum(-1) - (a * b_x).sum(-1)
    pots = None
    if potentials:
        with torch.no_grad():
            a_y = ks(backend.pair(y, x, kernel), a)  # K_yx a
            pots = ((a_x - b_x).detach(), (b_y - a_y).detach())
    return LossOutput(values=values, potentials=pots)

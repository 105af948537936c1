"""Validation of the loss parameters, in one place, without importing torch."""

from __future__ import annotations

import math

from .errors import ParameterError

#: every loss name accepted by :func:`geomreg.divergence` and ``--loss``
LOSSES = ("sinkhorn", "hausdorff", "energy", "gaussian", "laplacian")


def check_params(loss, p, blur, reach, scaling, tol, max_iter, diameter):
    """Validate the loss parameters; returns ``(loss, p, blur, reach, tol, max_iter)`` normalised.

    ``reach = inf`` becomes None (balanced). Raises :class:`ParameterError` naming the option.
    """
    if loss not in LOSSES:
        raise ParameterError("loss", f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if p not in (1, 2) or isinstance(p, bool):
        raise ParameterError("p", f"must be 1 or 2, got {p}")
    p = int(p)
    blur = float(blur)
    if not (blur > 0 and math.isfinite(blur)):
        raise ParameterError("blur", f"must be a positive finite number, got {blur:g}")
    if reach is not None:
        reach = float(reach)
        if math.isinf(reach) and reach > 0:
            reach = None
        elif not reach > 0:
            raise ParameterError("reach", f"must be positive, got {reach:g}")
        elif loss != "sinkhorn":
            raise ParameterError("reach", f"applies to the sinkhorn loss only, not {loss}")
    if not (0 < float(scaling) < 1):
        raise ParameterError("scaling", f"must lie in (0, 1), got {scaling:g}")
    if diameter is not None and not (float(diameter) >= 0 and math.isfinite(float(diameter))):
        raise ParameterError("diameter", f"must be finite and >= 0, got {diameter:g}")
    tol = float(tol)
    if not tol >= 0:
        raise ParameterError("tol", f"must be >= 0 (inf: no convergence check), got {tol:g}")
    if int(max_iter) != max_iter or max_iter < 1:
        raise ParameterError("max_iter", f"must be a positive integer, got {max_iter}")
    return loss, p, blur, reach, tol, int(max_iter)

r"""One-shot registration by a transport map: :func:`match`.

The source moves along the displacement field of the Sinkhorn divergence (seed 003, a
blurred Brenier map): :math:`x_i \mapsto x_i + v(x_i)` with :math:`v = -\nabla_{x_i} S / a_i`
for balanced problems, i.e. the barycentre of each point's row of the transport plan
(minus that of the source's plan to itself, when debiased). The same field applies to any
other points through the softmin extension of the dual potentials
(:meth:`~geomreg.transport.TransportPlan.field_at`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .api import divergence
from .errors import ParameterError
from .results import DivergenceResult
from .transport import _points


@dataclass(frozen=True)
class MatchResult:
    """What :func:`match` returns.

    Attributes:
        registered: ``(N, D)`` the source points moved by the field, ``x + field``.
        field: ``(N, D)`` the displacement of each source point.
        divergence: the Sinkhorn run whose plan defines the field (value, convergence, ...).
        applied: ``(K, D)`` the ``apply`` points moved by the same field, or None.
        applied_field: ``(K, D)`` the field at the ``apply`` points, or None.
        matches: ``(indices, weights)``, each ``(N, k)``: the k strongest targets of each
            source point and their transport-plan weights, or None.
        after: the divergence between the registered points and the target (same
            parameters), or None when not asked for.
    """

    registered: torch.Tensor
    field: torch.Tensor
    divergence: DivergenceResult
    applied: torch.Tensor | None = None
    applied_field: torch.Tensor | None = None
    matches: tuple[torch.Tensor, torch.Tensor] | None = None
    after: DivergenceResult | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view: the divergence's record plus the field's size and the result's."""
        norms = self.field.norm(dim=1)
        out = self.divergence.to_dict()
        out.update(
            field_norm_mean=norms.mean().item(),
            field_norm_max=norms.max().item(),
            divergence_after=None if self.after is None else self.after.value.item(),
            n_applied=None if self.applied is None else int(self.applied.shape[0]),
            top_k=None if self.matches is None else int(self.matches[0].shape[1]),
            matched_mass_share=None if self.matches is None else _share(self),
        )
        return out


def _share(r: MatchResult) -> float:
    """Share of the source's mass carried by the top-k matches (1 when k = M)."""
    return float(r.matches[1].sum() / r.divergence.plan.a.sum())


def match(x: Any, y: Any, *, apply: Any = None, top_k: int | None = None,
          evaluate_after: bool = False, **kwargs: Any) -> MatchResult:
    """Move the source onto the target along the Sinkhorn transport field.

    Args:
        x, y: source and target, as for :func:`geomreg.divergence` (one pair, not a batch).
        apply: other points ``(K, D)`` (or a Measure) to move by the same field, e.g. the
            full-resolution scan when ``x`` is a subsample of it.
        top_k: also return the ``top_k`` strongest targets of each source point and their
            plan weights (computed in blocks of rows: no N x M matrix is stored).
        evaluate_after: also compute the divergence between the registered points and ``y``.
        **kwargs: parameters of :func:`geomreg.divergence` (``blur``, ``reach``, ``p``,
            ``backend``, ...); ``loss`` must be ``sinkhorn``.

    Returns:
        A :class:`MatchResult`.
    """
    if kwargs.get("loss", "sinkhorn") != "sinkhorn":
        raise ParameterError("--loss", f"match follows the Sinkhorn transport plan; got {kwargs['loss']}")
    for key in ("field", "potentials"):
        kwargs.pop(key, None)
    result = divergence(x, y, field=True, **kwargs)
    if result.plan is None:
        raise ParameterError("--backend", "match needs one pair of point clouds on a point backend "
                             "(images: use --backend tensorized, online or multiscale)")
    plan = result.plan
    points = plan.x[0] + plan.centre
    registered = points + result.field
    applied = applied_field = None
    if apply is not None:
        applied_field = plan.field_at(apply)
        applied = _points(apply, plan.x, "--apply") + applied_field
    matches = plan.matches(top_k) if top_k is not None else None
    after = None
    if evaluate_after:
        b = y.weights if hasattr(y, "weights") and kwargs.get("b") is None else kwargs.get("b")
        rest = {k: v for k, v in kwargs.items() if k not in ("b", "a")}
        after = divergence(registered, getattr(y, "points", y), a=plan.a[0], b=b, **rest)
    return MatchResult(registered, result.field, result, applied, applied_field, matches, after)

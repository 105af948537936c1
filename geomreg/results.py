"""Result types: frozen dataclasses with ``to_dict()`` for ``--json``, logs and batches.

A result's type never depends on a flag: fields that do not apply hold ``None``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class StepLog:
    """One step of the Sinkhorn loop, as logged (``--verbose``, ``--log FILE.jsonl``).

    Attributes:
        index: 0-based step number over the whole run.
        phase: ``"coarse"`` (descent steps run on a coarser level: cluster centroids for
            the multiscale backend, pooled images for the grid backend), ``"schedule"``
            (epsilon-scaling descent), ``"refine"`` (a last schedule step that only carries
            the potentials to the full images: change and marginal error are NaN),
            ``"converge"`` (extra iterations at the final epsilon until the tolerance is met)
            or ``"final"`` (the last extrapolation step, the one that carries gradients).
        eps: temperature epsilon of the step.
        sigma: the matching length scale eps ** (1/p).
        elapsed_s: seconds since the loop started, at the end of the step.
        change: largest absolute change of any dual potential during the step.
        marginal_error: marginal error of the potentials entering the step (see
            :func:`geomreg.losses.sinkhorn.marginal_error`).
    """

    index: int
    phase: str
    eps: float
    sigma: float
    elapsed_s: float
    change: float
    marginal_error: float

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view."""
        return asdict(self)


@dataclass(frozen=True)
class LossOutput:
    """What a loss function returns to the API layer (tensors stay tensors).

    Attributes:
        values: ``(B,)`` differentiable loss values.
        potentials: ``((B, N), (B, M))`` detached dual potentials / kernel potentials.
        steps: the Sinkhorn log (empty for closed-form losses).
        n_iter: Sinkhorn iterations run (0 for closed-form losses).
        marginal_error: final marginal error, or None for closed-form losses.
        converged: whether the stopping rule was met (always True for closed forms).
        engine_info: what the backend reports about its work (multiscale: clusters, jump,
            blocks kept; grid: pyramid levels), or None.
        field: ``(B, N, D)`` displacement field of the source points, when asked for.
        plan: Sinkhorn: the final temperature and the column log-weights of the plans
            (a, b) and (a, a), ``h = log w + g / eps``, from which
            :class:`~geomreg.transport.TransportPlan` evaluates the plan anywhere.
        duals: Sinkhorn: the raw potentials of the final step
            (:class:`~geomreg.engine.base.Duals`), the warm start of a later run.
        error_bound: Sinkhorn, balanced, converge phase run: a certified bound on the
            value's error (see :func:`geomreg.losses.sinkhorn.error_bound`), else None.
    """

    values: Any
    potentials: tuple[Any, Any] | None
    steps: list[StepLog] = field(default_factory=list)
    n_iter: int = 0
    marginal_error: float | None = None
    converged: bool = True
    engine_info: dict[str, Any] | None = None
    field: Any = None
    plan: dict[str, Any] | None = None
    duals: Any = None
    error_bound: float | None = None


@dataclass(frozen=True)
class DivergenceResult:
    """The answer of :func:`geomreg.divergence`.

    Attributes:
        value: the divergence, a differentiable torch scalar ``()`` (or ``(B,)`` for batches).
        loss: loss name (``sinkhorn``, ``hausdorff``, ``energy``, ``gaussian``, ``laplacian``).
        params: every parameter that defines the value (p, blur, reach, ...), resolved
            (e.g. the diameter actually used).
        n_points: ``(N, M)``.
        dim: ambient dimension D.
        masses: total masses ``(m_a, m_b)`` after normalisation (lists for batches).
        backend: backend that ran; ``backend_reason`` says why it was chosen.
        device, dtype: where and in which precision the computation ran.
        converged, n_iter, marginal_error: the stopping rule's outcome (Sinkhorn).
        schedule: the steps actually run.
        potentials: ``(F, G)`` detached, when asked for, else None.
        time_s: compute time (no file reading, no imports).
        versions: geomreg, torch, python.
        multiscale: the multiscale backend's report (cluster scale, clusters, the step where
            it jumps to the points, fractions of blocks and pairs kept), else None.
        backend_fallback: set when ``auto`` could not use the backend it preferred (KeOps
            cannot compile here) and took another; the command line prints it on stderr.
        grid: the grid backend's report (pyramid levels used, the steps where it moves to a
            finer level), else None.
        field: the displacement field ``(N, D)`` of the source points when asked for
            (``field=True``), else None; not in ``to_dict``.
        plan: Sinkhorn on one pair of clouds: the entropic transport plan, as a
            :class:`~geomreg.transport.TransportPlan` (the field at other points, the
            strongest matches of each source point); not in ``to_dict``.
        error_bound: Sinkhorn, balanced, with the converge phase (``tol`` finite): a
            certified bound on ``|value - exact value|`` (the exact value being the
            divergence at the exact potentials), from the concavity of the dual
            objective; None otherwise (unbalanced, ``tol=inf``, a custom cost formula).
        duals: Sinkhorn: the raw potentials of the final step, batched ``(1, N)`` shapes
            (:class:`~geomreg.engine.base.Duals`): pass the result as ``init`` of a later
            call to warm-start it; not in ``to_dict``.
    """

    value: Any
    loss: str
    params: dict[str, Any]
    n_points: tuple[int, int]
    dim: int
    masses: tuple[Any, Any]
    backend: str
    backend_reason: str
    device: str
    dtype: str
    converged: bool
    n_iter: int
    marginal_error: float | None
    schedule: list[StepLog]
    potentials: tuple[Any, Any] | None
    time_s: float
    versions: dict[str, str]
    multiscale: dict[str, Any] | None = None
    backend_fallback: str | None = None
    grid: dict[str, Any] | None = None
    field: Any = None
    plan: Any = None
    error_bound: float | None = None
    duals: Any = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view: numbers, strings, lists (potentials are left out)."""
        v = self.value.detach().cpu()
        return {
            "value": v.item() if v.dim() == 0 else v.tolist(),
            "loss": self.loss,
            **self.params,
            "n_points": list(self.n_points),
            "dim": self.dim,
            "masses": list(self.masses),
            "backend": self.backend,
            "backend_reason": self.backend_reason,
            "device": self.device,
            "dtype": self.dtype,
            "converged": self.converged,
            "n_iter": self.n_iter,
            "marginal_error": self.marginal_error,
            "error_bound": self.error_bound,
            "schedule": [s.to_dict() for s in self.schedule],
            "time_s": self.time_s,
            "versions": self.versions,
            "multiscale": self.multiscale,
            "grid": self.grid,
            "backend_fallback": self.backend_fallback,
        }

r"""One-shot registration by a transport map: :func:`match`.

The source moves along the displacement field of the Sinkhorn divergence (seed 003, a
blurred Brenier map): :math:`x_i \mapsto x_i + v(x_i)` with :math:`v = -\nabla_{x_i} S / a_i`
for balanced problems, i.e. the barycentre of each point's row of the transport plan
(minus that of the source's plan to itself, when debiased). The same field applies to any
other points through the softmin extension of the dual potentials
(:meth:`~geomreg.transport.TransportPlan.field_at`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import defaults
from .api import divergence
from .engine.base import Duals
from .errors import ParameterError
from .results import DivergenceResult
from .timing import Stopwatch
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
        transported: density images (grid backend): the source's masses moved by the
            field and splatted onto the target's pixels, flat in the target grid's order
            (:meth:`~geomreg.measure.Grid.splat`); else None. ``registered`` and ``field``
            then cover every pixel of the source grid.
        time_s: compute time of the call, seconds (``divergence.time_s`` is the solve's alone).
        times: seconds per stage: ``transport`` (the solve and the field), ``apply``,
            ``matches``, ``after``.
    """

    registered: torch.Tensor
    field: torch.Tensor
    divergence: DivergenceResult
    applied: torch.Tensor | None = None
    applied_field: torch.Tensor | None = None
    matches: tuple[torch.Tensor, torch.Tensor] | None = None
    after: DivergenceResult | None = None
    transported: Any = None
    time_s: float = 0.0
    times: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view: the divergence's record plus the field's size, the result's and the times."""
        norms = self.field.norm(dim=1)
        out = self.divergence.to_dict()
        out.update(
            field_norm_mean=norms.mean().item(),
            field_norm_max=norms.max().item(),
            divergence_after=None if self.after is None else self.after.value.item(),
            n_applied=None if self.applied is None else int(self.applied.shape[0]),
            top_k=None if self.matches is None else int(self.matches[0].shape[1]),
            matched_mass_share=None if self.matches is None else _share(self),
            time_s=self.time_s,
            times=dict(self.times),
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
        raise ParameterError("loss", f"match follows the Sinkhorn transport plan; got {kwargs['loss']}")
    for key in ("field", "potentials"):
        kwargs.pop(key, None)
    clock = Stopwatch()
    with clock("transport"):
        result = divergence(x, y, field=True, **kwargs)
    if result.plan is None and result.grid is not None:
        out = _match_images(x, y, result, apply, top_k, evaluate_after, kwargs, clock)
        return dataclasses.replace(out, time_s=clock.elapsed, times=clock.times)
    if result.plan is None:
        raise ParameterError("backend", "match needs one pair of clouds (not a batch)")
    plan = result.plan
    points = plan.x[0] + plan.centre  # the centre's precision: the input's (float64 for arrays)
    registered = points + result.field
    applied = applied_field = matches = after = None
    if apply is not None:
        with clock("apply"):
            applied_field = plan.field_at(apply)
            applied = _points(apply, plan.x, "apply", plan.centre) + plan.centre + applied_field
    if top_k is not None:
        with clock("matches"):
            matches = plan.matches(top_k)
    if evaluate_after:  # the registered points keep the (normalised) source weights
        rest = {k: v for k, v in kwargs.items() if k != "a"}
        with clock("after"):
            after = divergence(registered, y, a=plan.a[0], **rest)
    return MatchResult(registered, result.field, result, applied, applied_field, matches, after,
                       time_s=clock.elapsed, times=clock.times)


def _match_images(x, y, result, apply, top_k, evaluate_after, kwargs, clock) -> MatchResult:
    """:func:`match` between two density images (or volumes) solved on their grids."""
    if apply is not None or top_k is not None:
        flag = "apply" if apply is not None else "top_k"
        raise ParameterError(flag, "not for density images on the grid backend; "
                             "use --backend tensorized, online or multiscale")
    gx, gy = x.grid, y.grid
    field = result.field
    registered = torch.as_tensor(gx.centres(), dtype=field.dtype) + field.cpu()
    masses = gx.full(x.weights)
    moved = gy.splat(registered.double().numpy(), masses)
    after = None
    if evaluate_after:
        with clock("after"):
            after = divergence(gy.measure(moved, "transported density"), y, **kwargs)
    return MatchResult(registered, field, result, after=after, transported=moved)


@dataclass(frozen=True)
class FlowStep:
    """One step of a gradient flow: the loss at the points entering the step.

    Attributes:
        index: 0-based step number.
        loss: the divergence between the current points and the target.
        rel_decrease: ``(previous loss - loss) / |previous loss|``; None at step 0.
        elapsed_s: seconds since the flow started.
        n_iter: Sinkhorn iterations of this evaluation (0 for closed-form losses).
    """

    index: int
    loss: float
    rel_decrease: float | None
    elapsed_s: float
    n_iter: int

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class FlowResult:
    """What :func:`flow` returns.

    Attributes:
        points: ``(N, D)`` the source points at the end of the flow.
        steps: one :class:`FlowStep` per evaluation; the last one is at ``points``.
        stopped: ``"tol"`` (the relative decrease fell to ``tol``) or ``"steps"``.
        last: the last :class:`~geomreg.results.DivergenceResult` (its value is the final loss).
        applied: ``(K, D)`` the ``apply`` points carried by the same flow, or None.
        time_s: compute time of the flow, seconds.
        times: seconds per stage: ``loss`` (the evaluations), ``gradient`` (autograd, for
            steps that do not use the transport field), ``apply`` (moving ``apply``).
    """

    points: torch.Tensor
    steps: list[FlowStep]
    stopped: str
    last: DivergenceResult
    applied: torch.Tensor | None = None
    time_s: float = 0.0
    times: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view: the last divergence's record plus the trajectory and the times."""
        out = self.last.to_dict()
        out.pop("schedule", None)
        out.update(
            loss_initial=self.steps[0].loss,
            loss_final=self.steps[-1].loss,
            n_steps=len(self.steps) - 1,
            stopped=self.stopped,
            n_applied=None if self.applied is None else int(self.applied.shape[0]),
            time_s=self.time_s,
            times=dict(self.times),
            trajectory=[s.to_dict() for s in self.steps],
        )
        return out


def flow(
    x: Any,
    y: Any,
    *,
    lr: float = 0.2,
    steps: int = 50,
    tol: float = 1e-3,
    on_step: Callable[[FlowStep, torch.Tensor], None] | None = None,
    sinkhorn_tol: float | None = None,
    apply: Any = None,
    warm_start: bool | str = "auto",
    **kwargs: Any,
) -> FlowResult:
    r"""The Euler gradient flow of a divergence (seed 002).

    Each step is :math:`x_i \leftarrow x_i - \text{lr}\, \nabla_{x_i} L / a_i`; with
    uniform weights :math:`1/a_i = N`, the seed's ``lr * len(x) * grad``. For sinkhorn the
    step is ``lr`` times the transport field (``lr = 1`` is one :func:`match`). The defaults
    (lr 0.2, at most 50 steps, stop when the loss decreases by less than 0.1% in a step)
    bring unit-scale shapes close at blur 0.05 in a few tens of steps.

    Sinkhorn steps, unless ``warm_start=False``: balanced problems with p = 2 step along the
    transport field itself, which equals :math:`-\nabla_{x_i} S / a_i` (no backward pass),
    and a step's Sinkhorn loop may start from the previous steps' potentials (``init``: no
    epsilon schedule, iterations at the final temperature only; extrapolated from the last
    three steps, see :func:`_extrapolated`). ``warm_start=True`` always does; ``"auto"`` (the
    default) does while the last warm start took fewer iterations than the last cold solve
    (see :func:`_warm_now`): the 8171-point bunny pair at blur 0.05 took 210 iterations over
    50 steps against 689 cold (float32), but on two 2-D ellipses at blur 0.03, whose steps
    move the points far, warm starts without the extrapolation took 2249 against 997.
    ``warm_start=False`` solves every step from the top of the schedule and differentiates it, as earlier
    versions did.

    Warm-started steps converge to ``WARM_TOL`` (1e-4; cold ones to divergence's default)
    unless ``sinkhorn_tol`` says otherwise: warm values, each within its tolerance of the
    truth but not all on the same side (cold solves, which all follow the same schedule,
    err alike from step to step), zigzag by more than the decrease of a small loss (the
    bunny pair at 1e-3: a rise at step 32, where the loss was 3e-6, stopped the flow). So a
    warm step whose relative decrease is below ``tol`` ends the flow only if cold solves of
    its points and the previous step's agree.

    Args:
        x, y: source and target (points or Measures), one pair.
        lr: step size (time step of the Euler scheme).
        steps: most steps.
        tol: stop when the relative decrease of the loss over a step is below ``tol``.
        on_step: called with each :class:`FlowStep` and the current points ``(N, D)``.
        sinkhorn_tol: the ``tol`` of each Sinkhorn evaluation (default: ``WARM_TOL`` for
            warm-started ones, divergence's for the others).
        apply: other points ``(K, D)`` (or a Measure) carried by the flow: each step moves
            them by ``lr`` times the transport field at their positions
            (:meth:`~geomreg.transport.TransportPlan.field_at`), the field that moves the
            source. Balanced sinkhorn with p = 2 only (where that field is the flow's step).
        warm_start: ``"auto"``, True or False, see above.
        **kwargs: loss parameters of :func:`geomreg.divergence` (``loss``, ``blur``, ...).

    Returns:
        A :class:`FlowResult`; its last step is the loss at the returned points.
    """
    from .api import _resolve_dtype
    from .measure import Measure

    clock = Stopwatch()
    if not (lr > 0 and math.isfinite(lr)):
        raise ParameterError("lr", f"must be a positive number, got {lr}")
    if not (isinstance(steps, int) and steps >= 0):
        raise ParameterError("steps", f"must be an integer >= 0, got {steps}")
    if not tol >= 0:
        raise ParameterError("tol", f"must be >= 0, got {tol}")
    for key in ("field", "potentials", "init"):
        kwargs.pop(key, None)
    a = kwargs.pop("a", None)
    if isinstance(x, Measure):
        a = x.weights if a is None else a
        x = x.points
    dtype = _resolve_dtype(kwargs.get("dtype"), x, y)
    pts = (x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(x)).to(dtype).clone()
    n = pts.shape[0]
    w = torch.full((n,), 1.0 / n, dtype=dtype) if a is None else torch.as_tensor(a, dtype=dtype)
    if kwargs.get("normalize", True):
        w = w / w.sum()
    inv_w = torch.where(w > 0, 1.0 / w.clamp_min(torch.finfo(dtype).tiny), 0.0)[:, None]
    sinkhorn = kwargs.get("loss", "sinkhorn") == "sinkhorn"
    # where the transport field is exactly -grad S / a: balanced, quadratic cost, no formula
    by_field = sinkhorn and kwargs.get("reach") is None and kwargs.get("p", 2) == 2 \
        and kwargs.get("cost") is None
    if apply is not None and not by_field:
        raise ParameterError("apply", "carries points along the transport field: balanced sinkhorn "
                             "with p = 2 only (no reach, no cost formula)")
    others = None
    if apply is not None:  # input coordinates: no centre to remove
        others = _points(apply, pts, "apply", torch.zeros(pts.shape[1], dtype=torch.float64))
    evaluate = dict(kwargs, a=w, **({} if sinkhorn_tol is None else {"tol": sinkhorn_tol}))
    if sinkhorn:
        evaluate["certify"] = False
    # warm-started evaluations: WARM_TOL unless the caller set a tolerance (see above); the
    # target does not move, so its own potential is kept from the previous step (fixed_target)
    evaluate_warm = dict(evaluate, tol=WARM_TOL if sinkhorn_tol is None else sinkhorn_tol,
                         fixed_target=kwargs.get("debias", True))
    log: list[FlowStep] = []
    stopped, result, before = "steps", None, None
    field_steps = by_field and warm_start is not False
    iters = {"cold": None, "warm": None}  # of the last evaluation of each kind
    history: list = []  # the potentials of the last three steps, oldest first (warm-start extrapolation)
    for k in range(steps + 1):
        warm = {}
        if _warm_now(warm_start, sinkhorn, result, iters, k):
            warm = {"init": _extrapolated(history)}
        with clock("loss"):
            if field_steps:
                result = divergence(pts, y, field=True, **warm, **(evaluate_warm if warm else evaluate))
            else:
                p = pts.detach().requires_grad_(True)
                result = divergence(p, y, **warm, **(evaluate_warm if warm else evaluate))
        iters["warm" if warm else "cold"] = result.n_iter
        if sinkhorn:
            history = [*history[-2:], result.duals]
        loss = result.value.item()
        prev = log[-1].loss if log else None
        rel = None if prev is None else (prev - loss) / abs(prev) if prev != 0 else 0.0
        step = FlowStep(k, loss, rel, clock.elapsed, result.n_iter)
        log.append(step)
        if on_step is not None:
            on_step(step, pts)
        if rel is not None and rel < tol and (not warm or _confirmed(before, pts, y, tol, evaluate)):
            stopped = "tol"
            break
        if k == steps:
            break
        before = pts
        if others is not None:
            with clock("apply"):
                others = others + lr * result.plan.field_at(others).to(others)
        if field_steps:
            pts = pts + lr * result.field.to(pts)
        else:
            with clock("gradient"):
                (grad,) = torch.autograd.grad(result.value, p)
            pts = pts - lr * inv_w.to(grad.device) * grad.to(pts)
    return FlowResult(pts, log, stopped, result, others, clock.elapsed, clock.times)


def _extrapolated(history: list) -> Any:
    r"""The warm start of a flow step from the potentials of the last steps (``history``, oldest first).

    Points move smoothly from step to step, and so do the potentials: each potential is
    predicted as its last value plus r times its last change, where r is the ratio of its
    last two changes fitted by least squares, :math:`r = \langle\Delta_k, \Delta_{k-1}\rangle
    / |\Delta_{k-1}|^2`, within [0, 1]: a flow's steps shrink about geometrically, and r is
    their ratio (0.9 to 0.95 late in the bunny pair's flow). With two steps only, r is
    ``WARM_AHEAD``. Measured over 50 steps (float32), iterations in all, fixed share 0.7
    against the fitted ratio: the 8171-point bunny pair at blur 0.05 286 against 210, the
    final points' converged divergences within 0.01 %. (Earlier, fixed shares of 0 / 0.7 / 1
    gave 415 / 286 / 305 on the bunny, 730 / 520 / 604 on two ellipses of 300 and 260
    points at blur 0.03.) With one step, or potentials of other shapes, the last potentials
    alone. The target's own potential (``yy``), whose target does not move, is kept as it is.
    """
    now = history[-1]
    if len(history) < 2 or not all(_same_shapes(now, h) for h in history):
        return now
    ahead = {}
    for key in ("xy", "yx", "xx"):
        h = [getattr(d, key) for d in history]
        if h[-1] is None:
            continue
        last = h[-1] - h[-2]
        share = WARM_AHEAD
        if len(h) == 3:
            d1, d0 = last.double(), (h[-2] - h[-3]).double()
            share = float((d1 * d0).sum() / (d0 * d0).sum().clamp_min(1e-300))
            share = min(max(share, 0.0), 1.0) if math.isfinite(share) else 0.0
        ahead[key] = h[-1] + share * last
    return now._replace(**ahead)


def _same_shapes(a: Any, b: Any) -> bool:
    """Whether two sets of potentials have the same potentials with the same shapes."""
    return all((p is None) == (q is None) and (p is None or p.shape == q.shape)
               for p, q in zip(a, b, strict=True))


#: the share of the potentials' last change that a flow's warm start adds when only two
#: steps are known (see :func:`_extrapolated`)
WARM_AHEAD = 0.7


def _warm_now(mode: bool | str, sinkhorn: bool, last: Any, iters: dict, k: int) -> bool:
    """Whether step ``k`` of a flow starts from the previous step's potentials.

    ``"auto"``: while the last warm start took fewer iterations than the last cold solve (a
    flow step that moves the points far is solved faster by the epsilon schedule), trying
    again every ``WARM_RETRY`` steps, as the steps shorten.
    """
    if not (sinkhorn and mode and last is not None):
        return False
    if mode is True or iters["warm"] is None or iters["cold"] is None:
        return True
    return iters["warm"] < iters["cold"] or k % WARM_RETRY == 0


#: the Sinkhorn tolerance of flow steps that may be warm-started (see :func:`flow`)
WARM_TOL = 1e-4
#: a flow whose warm starts stopped paying tries one again every this many steps
WARM_RETRY = 5


def _confirmed(before: torch.Tensor, now: torch.Tensor, y: Any, tol: float, evaluate: dict) -> bool:
    """Whether cold solves (the whole schedule) of the last two steps' points agree that the loss stalled."""
    with torch.no_grad():
        old, new = (divergence(p, y, **evaluate).value.item() for p in (before, now))
    return old == 0 or (old - new) / abs(old) < tol


MODELS = ("rigid", "similarity", "affine", "rigid+flow")
#: smooth warps (:mod:`geomreg.deform`), each after a global stage: ``spline`` is ``rigid+spline``
WARPS = ("spline", "diffeo")
#: during register's coarse levels the reach is at least this many blurs
REACH_PER_BLUR = 3.0
#: a transport level ends once a fit moves no point by more than this many blurs
FIT_STOP = 0.05
#: the transport stage runs on clouds resampled to about this many points (``voxel`` unset)
COARSE_POINTS = 300
#: the surface stage's Tukey cut-offs go from this many blurs down to ``SURFACE_TO`` blurs
SURFACE_FROM, SURFACE_TO = 4.0, 0.5
#: successive cut-offs of the surface stage are at most this ratio apart (at least 5 of them)
SURFACE_RATIO = 1.7
#: the surface stage's cut-offs stay above this many times B's spacing (its median distance
#: between nearest neighbours); on the bunny bench's 1000-2000-point targets, 1.5 spacings
#: are 0.017-0.024, below the half blur (0.025) that ends the cut-offs there
SURFACE_SPACING = 1.5
#: ... and above this many times the residual scale that the clouds' noise gives (the root
#: sum of squares of :meth:`~geomreg.surface.Target.noise` for A and B): Tukey's constant,
#: the cut-off at which his biweight keeps 95 % of the efficiency of least squares on
#: gaussian residuals; a smaller one discards good pairs of noisy scans
SURFACE_NOISE = 4.685
#: the surface stage screens every start (``SCREEN_ITERATIONS`` per scale, ``SCREEN_POINTS``
#: source points), refines the best ``SURFACE_KEEP`` on ``REFINE_POINTS`` and polishes the
#: winner at the finest scale on ``POLISH_POINTS`` (all of them when the source has fewer)
SCREEN_POINTS, SCREEN_ITERATIONS, SURFACE_KEEP = 500, 3, 2
#: a runner-up is refined too only when its screened overlap is at least this share of the best
SURFACE_CLOSE = 0.75
#: (Stanford pair: polishing on 5000 points instead of 10 000 took 0.38-0.41 s in all instead
#: of 0.40-0.45 s, 0.065-0.066 degrees off instead of 0.069-0.070)
REFINE_POINTS, POLISH_POINTS = 1000, 5000
#: the transport fits' Sinkhorn tolerance when the surface stage follows (see _fit_options);
#: on the Stanford pair the transport stage took 0.16 s instead of 0.20 s at the default 1e-3
#: (0.12 s with the rigid fits' debiasing dropped as well), the end poses unchanged
TRANSPORT_TOL = 1e-2


@dataclass(frozen=True)
class RegisterResult:
    r"""What :func:`register` returns.

    Attributes:
        matrix: ``(D + 1, D + 1)`` float64 homogeneous transform T with ``registered = T . x``
            (a rotation, times a scale for ``similarity``; any linear map for ``affine``; then
            a translation).
        registered: ``(N, D)`` the transformed source points.
        value: the divergence between ``registered`` and the target at the final blur (on the
            clouds the transport stage saw).
        transported: the share of the source's mass that the final plan moves (1 for
            balanced problems; below 1 with ``reach`` when part of the source has no
            counterpart).
        start: which starting orientation won (0 is the identity after centring).
        n_fits: transform fits run, over all starts (transport and surface stages).
        values: the divergence reached from each start by the transport stage, at its finest
            blur (``blur``, or half the side of ``voxel`` when that is larger and the surface
            stage follows).
        overlap: per start, the share of both clouds within ``blur`` of the other after the
            surface stage (:func:`geomreg.surface.overlap`); empty without it.
        model: the model fitted.
        voxel: the side of the cubes the transport stage resampled the clouds to, or None.
        flow: ``rigid+flow``: the gradient flow that moved ``T . x`` on to ``registered``
            (:func:`flow`); else None.
        time_s: compute time of the call, seconds.
        times: seconds per stage: ``voxel`` (resampling), ``transport``, ``surface`` and
            ``final`` (the divergence at the chosen pose); ``flow`` for ``rigid+flow``;
            ``spline`` or ``diffeo`` and ``jacobian`` for smooth warps.
        warp: smooth warps: the :class:`geomreg.deform.Warp` (``matrix`` is its global part);
            else None.
        smoothness: smooth warps: the regularisation :math:`R` of the fitted warp.
        min_jacobian: smooth warps: the smallest :math:`\det D\phi` over the source points
            (> 0: no folding there).
        lam: smooth warps: the smoothness weight lambda used.
    """

    matrix: torch.Tensor
    registered: torch.Tensor
    value: float
    transported: float
    start: int
    n_fits: int
    values: list[float]
    model: str
    overlap: list[float]
    voxel: float | None
    flow: FlowResult | None = None
    time_s: float = 0.0
    times: dict[str, float] = dataclasses.field(default_factory=dict)
    warp: Any = None
    smoothness: float | None = None
    min_jacobian: float | None = None
    lam: float | None = None

    def as_warp(self):
        """The fitted map as a :class:`geomreg.deform.Warp` (the matrix alone for global models)."""
        from .deform import Warp

        if self.flow is not None:
            raise ParameterError("model", "rigid+flow moves the source's own points: it is no warp of space")
        return self.warp if self.warp is not None else Warp("linear", self.matrix)

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON view."""
        out = {"model": self.model, "matrix": self.matrix.tolist(), "value": self.value,
               "transported": self.transported, "start": self.start, "n_fits": self.n_fits,
               "values_per_start": self.values, "overlap_per_start": self.overlap,
               "voxel": self.voxel, "time_s": self.time_s, "times": dict(self.times)}
        if self.warp is not None:
            out.update(sigma=self.warp.sigma, lam=self.lam, controls=len(self.warp.controls),
                       smoothness=self.smoothness, min_jacobian=self.min_jacobian)
        if self.flow is not None:
            f = self.flow.to_dict()
            keep = ("loss_initial", "loss_final", "n_steps", "stopped", "trajectory")
            out["flow"] = {k: f[k] for k in keep}
        return out


def register(
    x: Any,
    y: Any,
    *,
    model: str = "rigid",
    blur: float = 0.05,
    reach: float | None = None,
    levels: int = 4,
    fits: int = 4,
    starts: str = "auto",
    voxel: float | None = None,
    surface: bool = True,
    flow_options: dict[str, Any] | None = None,
    sigma: float | None = None,
    lam: float | None = None,
    controls: Any = None,
    steps: int | None = None,
    **kwargs: Any,
) -> RegisterResult:
    r"""Fit the transform of ``model`` that moves ``x`` onto ``y`` (no initial guess needed).

    Two stages. **Transport** finds the pose: each fit is one Sinkhorn plan and one weighted
    least-squares problem: every source point is paired with the barycentre it is
    transported to (``x + field``), weighted by the mass it sends, and the transform that best
    maps the points onto their barycentres is solved in closed form (Kabsch for ``rigid``,
    Umeyama for ``similarity``, linear least squares for ``affine``). With ``reach``, points
    without a counterpart send little mass and barely count. Blurs go from a quarter of the
    diameter down to ``blur`` over ``levels`` levels, ``fits`` fits each; the whole descent
    starts from several orientations (``starts="auto"``: the identity and the alignments of
    the principal axes, after matching the centroids).

    **Surface** (``surface=True``, the default) makes it precise: a robust point-to-plane
    refinement against the whole target (:mod:`geomreg.surface`), whose distances do not
    depend on how either scan is sampled: every distinct start screened on a subsample of
    the source, the best one or two refined, the pose with the largest overlap within
    ``blur`` polished (:func:`_surface_stage`). Without it, the lowest divergence wins.
    Transport alone is biased by sampling: on the bunny it ended 0.4 to 6 degrees from the
    truth when started *at* the truth (independent subsamples, a cropped target).

    ``voxel``: the transport stage runs on both clouds resampled to one point per cube of this
    side (the mean of its points, weighted by their mass). Unset, clouds of more than
    ``COARSE_POINTS`` points are resampled to about that many when the surface stage follows
    (it restores the precision), and used as they are otherwise. ``registered`` is always the
    full source moved by the fitted transform.

    ``model="rigid+flow"``: the rigid fit, then the gradient flow (:func:`flow`, sinkhorn at
    ``blur``, its defaults or ``flow_options``) from ``T . x`` to ``y`` for what no rigid
    motion explains; ``matrix`` is the rigid part and ``registered`` where the flow ends.

    ``model="spline"`` or ``"diffeo"`` (after ``rigid``; or ``"affine+spline"``,
    ``"similarity+diffeo"``, ...): the global fit, then a smooth warp fitted by transport
    (:mod:`geomreg.deform`): Gaussian kernel of width ``sigma`` (default
    ``deform.SIGMA_PER_SPAN`` of the diagonal) on ``controls`` control points, smoothness
    weight ``lam`` (default ``deform.LAMBDA``), ``steps`` Euler steps for ``diffeo``.
    ``warp`` then moves any points; ``matrix`` is the global part.
    """
    from .measure import Measure

    clock = Stopwatch()
    pre, _, smooth = model.rpartition("+")
    if smooth in WARPS:
        return _register_warp(x, y, pre or "rigid", smooth, clock, blur=blur, reach=reach, levels=levels,
                              fits=fits, starts=starts, voxel=voxel, surface=surface, sigma=sigma, lam=lam,
                              controls=controls, steps=steps, **kwargs)
    if any(v is not None for v in (sigma, lam, controls, steps)):
        raise ParameterError("sigma" if sigma is not None else "lam" if lam is not None else
                             "controls" if controls is not None else "steps",
                             f"sets a smooth warp (model spline or diffeo), not model {model}")
    if model == "rigid+flow":
        rigid = register(x, y, model="rigid", blur=blur, reach=reach, levels=levels, fits=fits,
                         starts=starts, voxel=voxel, surface=surface, **kwargs)
        a = kwargs.pop("a", None)
        if isinstance(x, Measure):
            a = x.weights if a is None else a
        options = {k: v for k, v in kwargs.items() if k != "tol"}
        if "tol" in kwargs:  # the Sinkhorn tolerance (flow's own tol is its stopping rule)
            options["sinkhorn_tol"] = kwargs["tol"]
        with clock("flow"):
            moved = flow(rigid.registered, y, a=a, blur=blur, reach=reach,
                         **{**options, **(flow_options or {})})
        return dataclasses.replace(rigid, registered=moved.points.detach().cpu().double(), model=model,
                                   flow=moved, value=moved.steps[-1].loss, time_s=clock.elapsed,
                                   times={**rigid.times, **clock.times})

    return _register_global(x, y, clock, model=model, blur=blur, reach=reach, levels=levels, fits=fits,
                            starts=starts, voxel=voxel, surface=surface, polish=True, **kwargs)


def _register_global(x, y, clock, *, model, blur, reach, levels, fits, starts, voxel, surface, polish,
                     **kwargs) -> RegisterResult:
    """:func:`register`'s rigid, similarity or affine fit; ``polish``: see :func:`_surface_stage`."""
    if model not in MODELS:
        raise ParameterError("model", f"one of {', '.join(MODELS)}, not {model!r}")
    if kwargs.get("loss", "sinkhorn") != "sinkhorn":
        raise ParameterError("loss", "register fits the Sinkhorn transport plan")
    for key, value in (("levels", levels), ("fits", fits)):
        if not (isinstance(value, int) and value >= 1):
            raise ParameterError(key, f"must be an integer >= 1, got {value}")
    x_full, y_full, a, b = _unpack(x, y, kwargs)
    if x_full.dim() != 2 or y_full.dim() != 2 or x_full.shape[1] != y_full.shape[1]:
        raise ParameterError("model", "register takes two clouds (N, D) and (M, D) of the same D")
    a_full = None if a is None else torch.as_tensor(np.asarray(a, dtype=np.float64))
    xs, ys = x_full, y_full
    if voxel is not None and not (voxel > 0 and math.isfinite(voxel)):
        raise ParameterError("voxel", f"must be a positive length, got {voxel}")
    with clock("voxel"):
        if voxel is None and surface and max(len(x_full), len(y_full)) > COARSE_POINTS:
            voxel = _side_for(torch.cat([x_full, y_full]), COARSE_POINTS)
        if voxel is not None:
            xs, a = _voxel_means(x_full, a, voxel)
            ys, b = _voxel_means(y_full, b, voxel)
    n, d = xs.shape
    wa = torch.full((n,), 1.0 / n, dtype=torch.float64) if a is None else torch.as_tensor(
        np.asarray(a, float))
    wb = None if b is None else torch.as_tensor(np.asarray(b, float))
    wa = wa / wa.sum()
    kw = dict(kwargs, a=wa, b=wb)
    span = float(torch.cat([xs, ys]).amax(0).sub(torch.cat([xs, ys]).amin(0)).norm())
    # resampled for the surface stage: transport stops at half the cubes' side (a blur far
    # below the spacing of its points gives a near-permutation, slow to converge and no more
    # precise than the cubes), and the surface stage starts above that (see _surface_stage)
    coarse = max(blur, voxel / 2) if surface and voxel is not None else blur
    blurs = np.geomspace(max(span / 4, coarse), coarse, levels).tolist()
    scale0 = 1.0
    if model != "rigid":
        scale0 = math.sqrt(_spread(ys, wb) / max(_spread(xs, wa), 1e-300))
    rotations = _starts(xs, wa, ys, wb) if starts == "auto" else [torch.eye(d, dtype=xs.dtype)]
    with clock("transport"):
        poses, values, n_fits = _transport_stage(model, xs, ys, rotations, scale0, blurs, fits, reach,
                                                 dict(kw, dtype="float32") if surface else kw,
                                                 _fit_options(model, surface, kw))
    overlaps: list[float] = []
    if surface:
        with clock("surface"):
            poses, overlaps, k, iters = _surface_stage(x_full, y_full, a_full, poses, model, blur, xs,
                                                       coarse, polish)
        n_fits += iters
    else:
        k = int(np.argmin(values))
    lin, t = poses[k]
    with clock("final"):
        final = divergence(xs @ lin.T + t, ys, blur=blur, reach=reach, field=True, **kw)
    share = float(final.plan.row_mass().sum() / wa.sum())
    matrix = torch.eye(d + 1, dtype=torch.float64)
    matrix[:d, :d], matrix[:d, d] = lin, t
    return RegisterResult(matrix, x_full @ lin.T + t, final.value.item(), share, k, n_fits, values,
                          model, overlaps, voxel, time_s=clock.elapsed, times=clock.times)


def _register_warp(x, y, pre, smooth, clock, *, blur, reach, levels, fits, starts, voxel, surface, sigma, lam,
                   controls, steps, **kwargs) -> RegisterResult:
    """The global fit of model ``pre``, then the smooth warp ``smooth`` (:func:`geomreg.deform.fit_warp`)."""
    from . import deform

    if pre not in ("rigid", "similarity", "affine"):
        raise ParameterError("model", f"a smooth warp follows rigid, similarity or affine, not {pre!r}")
    lam = deform.LAMBDA if lam is None else lam
    steps = deform.DIFFEO_STEPS if steps is None else steps
    deform.check_options(sigma, lam, steps)
    # the warp's own stages refine the global pose: the surface stage's polish is skipped
    glob = _register_global(x, y, clock, model=pre, blur=blur, reach=reach, levels=levels, fits=fits,
                            starts=starts, voxel=voxel, surface=surface, polish=False, **kwargs)
    x_full, y_full, a, b = _unpack(x, y, kwargs)
    with clock(smooth):
        z, wa = _fit_cloud(glob.registered, a)
        ys, wb = _fit_cloud(y_full, b)
        sigma = deform.default_sigma(glob.registered, y_full) if sigma is None else sigma
        fitted = deform.fit_warp(smooth, z, ys, glob.as_warp(), blur=blur, reach=reach,
                                 fits=max(fits, deform.WARP_FITS), sigma=sigma, lam=lam, controls=controls,
                                 steps=steps, kw=dict(kwargs, a=wa, b=wb),
                                 surface=y_full if surface else None)
        registered = fitted.warp(x_full)
    with clock("jacobian"):
        dets = fitted.warp.jacobian_determinants(x_full)
    return dataclasses.replace(glob, registered=registered, model=f"{pre}+{smooth}", value=fitted.value,
                               n_fits=glob.n_fits + fitted.n_fits, warp=fitted.warp, lam=lam,
                               smoothness=fitted.smoothness, min_jacobian=float(dets.min()),
                               time_s=clock.elapsed, times=clock.times)


def _unpack(x: Any, y: Any, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
    """Both clouds as float64 tensors and their weights (kwargs' a and b, popped; else the Measures')."""
    from .measure import Measure

    a, b = kwargs.pop("a", None), kwargs.pop("b", None)
    if isinstance(x, Measure):
        a = x.weights if a is None else a
        x = x.points
    if isinstance(y, Measure):
        b = y.weights if b is None else b
        y = y.points
    x, y = (torch.as_tensor(np.asarray(p, dtype=np.float64)) for p in (x, y))
    return x, y, a, b


def _fit_cloud(p: torch.Tensor, w: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The cloud a warp is fitted on: ``p`` itself, or its cube means when it has over ``FIT_POINTS``."""
    from .deform import FIT_POINTS

    if len(p) > FIT_POINTS:
        return _voxel_means(p, w, _side_for(p, FIT_POINTS))
    weights = torch.full((len(p),), 1.0 / len(p), dtype=torch.float64) if w is None else \
        torch.as_tensor(np.asarray(w, dtype=np.float64))
    return p, weights


def _fit_options(model: str, surface: bool, kw: dict) -> dict:
    """The transport fits' own Sinkhorn options, on top of ``kw`` (a warp's fits too: model spline, diffeo).

    Followed by the surface stage, transport only has to land in its basin, and the surface
    stage and the final divergence keep the caller's options: the fits are solved in float32
    (set by the caller of :func:`_transport_stage`) to ``TRANSPORT_TOL``, or to the caller's
    ``tol`` when that is looser (a value, not whether it was given: ``tol=1e-3`` given or
    left to its default fits the same poses), and rigid fits without the debiasing problems.
    A rigid fit only needs where each point is transported (the (a, b) plan's barycentres);
    the self-transport (a, a) that debiasing subtracts mostly shrinks the barycentres towards
    their neighbourhood's mean, which moves a rotation fit little, while it would bias a
    scale (similarity, affine).
    """
    if not surface:
        return {}
    out = {"tol": max(kw.get("tol", defaults.TOL), TRANSPORT_TOL)}
    return out | ({"debias": False} if model == "rigid" else {})


def _transport_stage(model, xs, ys, rotations, scale0, blurs, fits, reach, kw, fit_kw):
    """From each start, ``fits`` transform fits per blur of ``blurs``: the poses, values, fits run.

    ``fit_kw``: options of the fits' Sinkhorn problems on top of ``kw`` (the values at the
    end use ``kw`` alone). The target does not move: a fit warm-started from the previous
    one keeps its own potential (``fixed_target``).

    Every start runs in one batched Sinkhorn problem per fit (a registration's problems are
    small: the loop's per-call work is shared by the starts). Within a level each fit starts
    from the previous fit's potentials (``init``), and a start's level ends early once a fit
    moves no point by more than ``FIT_STOP`` blurs (it leaves the batch until the next
    level). A start whose pose, at the end of a level, is within ``FIT_STOP`` blurs of an
    earlier start's pose at the same level follows that start's path from there: it gets its
    pose and value without running.
    """
    ca, cb = _centroid(xs, kw["a"]), _centroid(ys, kw["b"])
    poses = [(scale0 * rot, cb - scale0 * rot @ ca) for rot in rotations]
    twin: dict[int, int] = {}  # start -> the earlier start it follows
    active, n_fits = list(range(len(rotations))), 0
    fit = kw | fit_kw
    for sigma in blurs:
        # at a coarse blur a reach below it would drop everything: it grows with the blur
        level_reach = None if reach is None else max(reach, REACH_PER_BLUR * sigma)
        running, r = list(active), None  # within a level each fit starts from the previous potentials
        for _ in range(fits):
            z = torch.stack([xs @ poses[i][0].T + poses[i][1] for i in running])
            r = divergence(z, ys.expand(len(running), *ys.shape), blur=sigma, reach=level_reach, field=True,
                           init=r, certify=False, fixed_target=r is not None and fit.get("debias", True),
                           **_batched(fit, len(running)))
            mass = _row_mass(r, kw["a"])
            still, keep = [], []
            for k, i in enumerate(running):
                lin, t = _fit(model, xs, z[k] + r.field[k].to(z), mass[k].to(z))
                moved = float((xs @ lin.T + t - z[k]).norm(dim=1).max())
                poses[i] = (lin, t)
                if moved >= FIT_STOP * sigma:
                    still.append(i), keep.append(k)
            n_fits += len(running)
            if not still:
                break
            if len(still) < len(running):  # the stopped starts leave; their potentials too
                r = Duals(*(None if d is None else d[keep] for d in r.duals))
            running = still
        for j in list(active):  # an earlier start at the same pose: follow it from here
            i = next((i for i in active if i < j and _apart(xs, poses[i], poses[j]) < FIT_STOP * sigma), None)
            if i is not None:
                twin[j] = i
        active = [i for i in active if i not in twin]
    z = torch.stack([xs @ poses[i][0].T + poses[i][1] for i in active])
    final = divergence(z, ys.expand(len(active), *ys.shape), blur=blurs[-1], reach=reach, certify=False,
                       **_batched(kw, len(active)))
    value = dict(zip(active, final.value.tolist(), strict=True))
    for j in sorted(twin):  # a twin's twin has a smaller index: resolved first
        poses[j], value[j] = poses[twin[j]], value[twin[j]]
    return poses, [value[i] for i in range(len(poses))], n_fits


def _batched(kw: dict, count: int) -> dict:
    """``kw`` with its weights ``a`` and ``b`` (when given) repeated for a batch of ``count`` problems."""
    return {**kw, **{k: kw[k].expand(count, len(kw[k])) for k in ("a", "b") if kw.get(k) is not None}}


def _row_mass(r: Any, a: torch.Tensor) -> torch.Tensor:
    r"""``(B, N)``: the mass each source point sends in batched result ``r`` (see ``TransportPlan.row_mass``).

    :math:`a_i` balanced, :math:`a_i e^{-f_i/\rho}` unbalanced (:math:`f` the potential on x).
    """
    rho = r.params["rho"]
    if rho is None:
        return a.expand(r.duals.xy.shape)
    return a.to(r.duals.xy) * torch.exp(-r.duals.xy / rho)


def _apart(xs, pose, other) -> float:
    """The largest distance between the images of the points ``xs`` by two poses."""
    return float((xs @ (pose[0] - other[0]).T + (pose[1] - other[1])).norm(dim=1).max())


def _surface_stage(x_full, y_full, a_full, poses, model, blur, xs, coarse, polish):
    """Screen every distinct pose, refine the best ``SURFACE_KEEP`` fully, polish the winner (``polish``).

    Screening: a short refinement (``SCREEN_ITERATIONS`` per scale) on ``SCREEN_POINTS`` of
    the source, then the overlap; a start whose transport pose was within half a blur of an
    earlier one shares that one's result. The best ones (at most ``SURFACE_KEEP``, each with
    at least ``SURFACE_CLOSE`` of the best overlap) are then refined to convergence on
    ``REFINE_POINTS`` and the one with the largest overlap wins; it is polished at the finest
    scale on ``POLISH_POINTS``. Returns the poses (one per start), their overlaps, the
    winner's index and the iterations run.
    """
    from . import surface as surf

    target, source = surf.Target(y_full), surf.Target(x_full)
    # cut-offs from SURFACE_FROM transport blurs down to SURFACE_TO blurs, but not below
    # SURFACE_SPACING times B's spacing: a point's nearest point of B is about that far away
    # even at the right pose, and a smaller cut-off leaves too few pairs to fit
    noise = math.hypot(target.noise(), source.noise())
    finest = max(SURFACE_TO * blur, SURFACE_SPACING * target.spacing(), SURFACE_NOISE * noise)
    first = max(SURFACE_FROM * coarse, finest)
    count = max(5, 1 + math.ceil(math.log(first / finest) / math.log(SURFACE_RATIO)))
    scales = np.geomspace(first, finest, count).tolist()

    def part(count):  # a subsample of the source (points, weights, neighbour means in the scan)
        rows = _subset(len(x_full), count)  # and as many target rows, for the backward pairs
        return (x_full[rows], None if a_full is None else a_full[rows], source.planes(rows)[0],
                _subset(len(y_full), count))

    def score(pose):
        return surf.pose_overlap(source, target, *pose, blur, a_full, queries=REFINE_POINTS)

    screen, refine = part(SCREEN_POINTS), part(REFINE_POINTS)
    shares: list[int] = []  # per start: the screened start whose result it shares (itself if screened)
    pose: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    score_of: dict[int, float] = {}
    screened: list[int] = []
    for j in range(len(poses)):  # a start within half a blur of an earlier one: the same basin
        twin = next((i for i in screened if _apart(xs, poses[i], poses[j]) < 0.5 * blur), None)
        shares.append(j if twin is None else twin)
        screened += [] if twin is not None else [j]
    points, weights, centres, _ = screen  # every distinct start at once, one-way pairs
    found, iters = surf.refine_many(points, target, [poses[i] for i in screened], scales, model, weights,
                                    centres, SCREEN_ITERATIONS)
    for i, p in zip(screened, found, strict=True):
        pose[i], score_of[i] = p, score(p)
    top = max(score_of.values())
    best = [i for i in sorted(score_of, key=lambda i: -score_of[i])[:SURFACE_KEEP]
            if score_of[i] >= SURFACE_CLOSE * top]
    x, a, centres, back = refine  # the best ones at once: one search of the target per iteration
    found, n = surf.refine_many(x, target, [pose[i] for i in best], scales, model, a, centres, source=source,
                                back=back)
    iters += n
    for i, p in zip(best, found, strict=True):
        pose[i], score_of[i] = p, score(p)
    k = max(best, key=lambda i: score_of[i])
    if polish and len(x_full) > len(refine[0]):  # the winner, on more of the source at the finest scale
        x, a, centres, back = part(POLISH_POINTS)
        lin, t, n = surf.refine(x, target, *pose[k], scales[-1:], model, a, centres, source=source, back=back)
        iters += n
        pose[k] = (lin, t)
    return [pose[i] for i in shares], [score_of[i] for i in shares], k, iters


def _subset(n: int, k: int) -> torch.Tensor:
    """``min(n, k)`` row indices of ``n``, drawn without replacement by a fixed seed, in order."""
    if n <= k:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:k].sort().values


#: :func:`_side_for` counts the cubes occupied by at most this many points per cube wanted
SIDE_SAMPLE = 20


def _side_for(points: torch.Tensor, count: int) -> float:
    """The side of the cubes that resample ``points`` to about ``count`` occupied cubes (within 10%).

    The cubes are counted on at most ``SIDE_SAMPLE * count`` evenly spread points (on the
    80 000 points of the Stanford pair, the 11 counts of the bisection took 57 ms in all):
    about 20 points to a cube leave few occupied cubes empty.
    """
    lo, hi = 1e-6, float((points.amax(0) - points.amin(0)).max()) + 1e-12
    points = points[:: max(1, len(points) // (SIDE_SAMPLE * count))]
    for _ in range(30):  # bisection on a log scale: the count falls as the side grows
        mid = math.sqrt(lo * hi)
        cells = int(_cells(points, mid).unique().numel())
        if count / 1.1 <= cells <= count:
            return mid
        lo, hi = (mid, hi) if cells > count else (lo, mid)
    return hi


def _cells(p: torch.Tensor, side: float) -> torch.Tensor:
    """One integer per point naming its cube of ``side`` (equal for points in the same cube)."""
    cells = torch.floor(p / side).to(torch.int64)
    cells = cells - cells.amin(0)
    span = cells.amax(0) + 1
    if float(torch.prod(span.double())) >= 2.0**62:  # too many cubes to number: one row per cube
        return torch.unique(cells, dim=0, return_inverse=True)[1]
    key = cells[:, 0]
    for k in range(1, p.shape[1]):
        key = key * span[k] + cells[:, k]
    return key


def _voxel_means(p: torch.Tensor, w: Any, side: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One point per occupied cube of ``side``: the weighted mean of its points, with their mass."""
    weights = torch.full((p.shape[0],), 1.0 / p.shape[0], dtype=p.dtype) if w is None else \
        torch.as_tensor(np.asarray(w, dtype=np.float64))
    _, inverse = torch.unique(_cells(p, side), return_inverse=True)
    k = int(inverse.max()) + 1
    mass = torch.zeros(k, dtype=p.dtype).index_add_(0, inverse, weights)
    sums = torch.zeros(k, p.shape[1], dtype=p.dtype).index_add_(0, inverse, p * weights[:, None])
    keep = mass > 0
    return sums[keep] / mass[keep, None], mass[keep]


def _centroid(p: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return p.mean(0) if w is None else (w[:, None] * p).sum(0) / w.sum()


def _spread(p: torch.Tensor, w: torch.Tensor | None) -> float:
    c = _centroid(p, w)
    d2 = ((p - c) ** 2).sum(1)
    return float(d2.mean() if w is None else (w * d2).sum() / w.sum())


def _axes(p: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """Principal axes (columns, by decreasing variance) of a weighted cloud."""
    c = p - _centroid(p, w)
    ww = torch.full((p.shape[0],), 1.0 / p.shape[0], dtype=p.dtype) if w is None else w / w.sum()
    cov = (c * ww[:, None]).T @ c
    _, vecs = torch.linalg.eigh(cov)
    return vecs.flip(1)


def _starts(xs, wa, ys, wb) -> list[torch.Tensor]:
    """The identity and every proper rotation that maps A's principal axes onto B's (up to signs)."""
    d = xs.shape[1]
    ua, ub = _axes(xs, wa), _axes(ys, wb)
    out = [torch.eye(d, dtype=xs.dtype)]
    for signs in np.ndindex(*(2,) * d):
        s = torch.tensor([1.0 if bit else -1.0 for bit in signs], dtype=xs.dtype)
        rot = ub @ torch.diag(s) @ ua.T
        if torch.linalg.det(rot) > 0:
            out.append(rot)
    return out


def _fit(model: str, src: torch.Tensor, dst: torch.Tensor, w: torch.Tensor):
    """The ``model`` transform minimising sum_i w_i |L src_i + t - dst_i|^2: ``(L, t)``."""
    w = w / w.sum()
    cs, cd = (w[:, None] * src).sum(0), (w[:, None] * dst).sum(0)
    ps, pd = src - cs, dst - cd
    if model == "affine":
        a_mat = (ps * w[:, None]).T @ ps
        b_mat = (ps * w[:, None]).T @ pd
        # gelsd (SVD): the default, gelsy, gave 3 different answers in 200 calls on one 3 x 3 system
        lin = torch.linalg.lstsq(a_mat, b_mat, driver="gelsd").solution.T
    else:
        cov = (pd * w[:, None]).T @ ps  # sum w dst src^T
        u, sv, vt = torch.linalg.svd(cov)
        fix = torch.ones(src.shape[1], dtype=src.dtype)
        fix[-1] = torch.sign(torch.linalg.det(u @ vt))
        lin = u @ torch.diag(fix) @ vt
        if model == "similarity":
            lin = lin * float((sv * fix).sum() / (w * (ps**2).sum(1)).sum())
    return lin, cd - lin @ cs

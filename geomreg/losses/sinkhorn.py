r"""Sinkhorn divergences: the one generic loop, written against the engine contract.

Definitions follow docs/theory.md (Feydy et al. 2019, "Interpolating between optimal
transport and MMD using Sinkhorn divergences"; Séjourné et al. 2019 for the unbalanced
case). Notation: :math:`\varepsilon` temperature, :math:`\rho` = reach^p (None: balanced),
damping :math:`\lambda(\varepsilon) = 1/(1 + \varepsilon/\rho)`.

The loop has three phases, all logged, each a method of one run object that updates the
four potentials through one formula (``_Run.update``); coarse-to-fine levels, when a
backend has them, come through the engine's :class:`~geomreg.engine.base.Levels` protocol:

1. **schedule**: GeomLoss 0.3.1's symmetric, averaged epsilon-scaling descent, step for
   step (``tol=inf`` stops after it and reproduces GeomLoss's values);
2. **converge**: at the final epsilon, alternating Sinkhorn updates for the (a, b) problem
   and averaged updates for the symmetric (a, a), (b, b) problems, until every marginal
   error is below ``tol`` or ``max_iter`` iterations have run;
3. **final**: one parallel extrapolation step with autograd on, whose inputs are detached,
   so that gradients follow from the envelope theorem (no backprop through the loop).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from ..engine import Backend, Cost
from ..engine.base import Duals, Levels, Pairs
from ..errors import ParameterError
from ..results import LossOutput, StepLog
from ..schedule import EpsilonSchedule

#: log of a zero weight (instead of -inf), as in GeomLoss: keeps softmins finite.
LOG_ZERO = -100000.0


def log_weights(w: torch.Tensor) -> torch.Tensor:
    """``log(w)`` with zero weights mapped to ``LOG_ZERO`` (never -inf, never NaN)."""
    return torch.where(w > 0, w.clamp_min(torch.finfo(w.dtype).tiny).log(), LOG_ZERO)


def damping(eps: float, rho: float | None) -> float:
    r""":math:`\lambda(\varepsilon) = 1/(1+\varepsilon/\rho)`, or 1 when balanced."""
    return 1.0 if rho is None else 1.0 / (1.0 + eps / rho)


def marginal_error(
    f: torch.Tensor, f_next: torch.Tensor, w: torch.Tensor, eps: float, rho: float | None
) -> torch.Tensor:
    r"""Relative L1 error of one marginal of the plan defined by the current potentials.

    With :math:`f_{next} = \lambda\, \mathrm{Sm}_\varepsilon(\ldots)` the Sinkhorn update of
    ``f``, the plan's marginal on the rows is :math:`w_i \exp((f_i - f_{next,i}/\lambda)/\varepsilon)`
    and its target is :math:`w_i` (balanced) or :math:`w_i e^{-f_i/\rho}` (unbalanced). Returns
    :math:`\sum_i |\text{marginal}_i - \text{target}_i| / \sum_i w_i`, per batch item ``(B,)``.
    """
    lam = damping(eps, rho)
    f64, fn64, w64 = f.double(), f_next.double(), w.double()
    marginal = w64 * torch.exp((f64 - fn64 / lam) / eps)
    target = w64 if rho is None else w64 * torch.exp(-f64 / rho)
    diff = torch.where(w64 > 0, (marginal - target).abs(), 0.0)
    return diff.sum(-1) / w64.sum(-1)


class Anderson:
    r"""Anderson mixing (type II) of the fixed-point iteration :math:`g \mapsto G(g)`.

    With the last iterates :math:`G(g_k)` and residuals :math:`r_k = G(g_k) - g_k`, the next
    iterate is :math:`G(g_k) - \sum_l \gamma_l \Delta G_l`, where :math:`\gamma` minimises
    :math:`\|r_k - \sum_l \gamma_l \Delta r_l\|` over the differences of successive
    residuals (Anderson 1965; Walker and Ni 2011); one small least-squares problem per
    batch item, in float64, with a relative ridge. When the error grows tenfold over the
    best one seen (or is not finite), the mixed iterates have gone astray: the history is
    dropped and the iteration goes on from the best state seen (plain steps, then mixing
    again); after ``PATIENCE`` such failures it stays plain. Restarting from the failed
    state is not enough: at a blur far below the points' spacing (300 points 11 apart, blur
    0.05) mixing threw the potentials off by 10^6 and plain Sinkhorn steps, which then
    contract at a rate near 1, never came back (5000 iterations, marginal error 1.9, a
    value of -10212).

    Measured in the converge phase (2000 uniform points against 2000 shifted by 0.2, float32,
    tol 1e-3), iterations in all against the adaptive over-relaxation it replaced: 43 -> 28
    at blur 0.05, 116 -> 63 at 0.02, 176 -> 164 at 0.01; reach 0.3: 32 -> 25 and 80 -> 61;
    p = 1, blur 0.05: 21 -> 18. Memories of 5 and 10 did the same. One case is slower: 600
    against 500 points in float64 at blur 0.01, p = 2, no shift (344 against 254).
    """

    MEMORY = 5
    GROWTH = 10.0
    RIDGE = 1e-8
    PATIENCE = 2

    def __init__(self):
        self.best, self.best_state, self.failures = math.inf, None, 0
        self._reset()

    def _reset(self) -> None:
        self.values: list[torch.Tensor] = []
        self.residuals: list[torch.Tensor] = []

    def step(self, g: torch.Tensor, g_next: torch.Tensor, error: float) -> torch.Tensor:
        """The next iterate from ``g (B, M)`` (whose marginal error is ``error``) and ``g_next = G(g)``."""
        if (error > self.GROWTH * self.best or not math.isfinite(error)) and self.best_state is not None:
            self._reset()
            self.failures += 1
            return self.best_state.to(g_next.dtype)  # its error was measured: the best seen
        if error < self.best:
            self.best, self.best_state = error, g.detach().clone()
        if self.failures >= self.PATIENCE:
            return g_next
        self.values.append(g_next.double())
        self.residuals.append((g_next - g).double())
        if len(self.values) > self.MEMORY + 1:
            self.values.pop(0)
            self.residuals.pop(0)
        if len(self.values) < 2:
            return g_next
        res, val = torch.stack(self.residuals, -1), torch.stack(self.values, -1)  # (B, M, m)
        d_res, d_val = res.diff(dim=-1), val.diff(dim=-1)
        gram = d_res.transpose(1, 2) @ d_res
        ridge = self.RIDGE * gram.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(1e-300)
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        gamma = torch.linalg.solve(gram + ridge[:, None, None] * eye, d_res.transpose(1, 2) @ res[..., -1:])
        mixed = val[..., -1] - (d_val @ gamma)[..., 0]
        if not torch.isfinite(mixed).all():
            self._reset()
            return g_next
        return mixed.to(g_next.dtype)


#: the converge phase stops (not converged) once its error has not fallen by ``STALL_GAIN``
#: below its best for ``STALL`` iterations while that best is within ``STALL_FLOOR`` times
#: the dtype's rounding floor (machine epsilon times the largest cost over eps): more
#: iterations cannot help there. In float32, 2000 points at blur 0.005 (floor 1e-2) stalled
#: at a marginal error of about 3e-3 from iteration 1000 on and spent all 3000 allowed
#: iterations there (49 s). Far from the floor a flat error is only slow progress: 300
#: points 11 apart at blur 0.05 in float64 stay near 7e-3 for 200 iterations, then converge
STALL, STALL_GAIN, STALL_FLOOR = 200, 0.01, 10.0

#: the pair on whose rows lives the potential that each update reads: f_ba (rows of xy) is
#: updated from g_ab (rows of yx), and so on; the symmetric problems update from themselves
_SOURCE = {"xy": "yx", "yx": "xy", "xx": "xx", "yy": "yy"}
#: which measure lives on the rows of each pair (0: alpha, 1: beta)
_ROWS = {"xy": 0, "yx": 1, "xx": 0, "yy": 1}


def sinkhorn_loss(
    backend: Backend,
    x: torch.Tensor,
    a: torch.Tensor,
    y: torch.Tensor,
    b: torch.Tensor,
    *,
    p: int,
    schedule: EpsilonSchedule,
    reach: float | None,
    debias: bool,
    tol: float,
    max_iter: int,
    on_step: Callable[[StepLog], None] | None = None,
    cost_formula: str | None = None,
    field: bool = False,
    init: Duals | None = None,
    certify: bool = True,
    fixed_target: bool = False,
) -> LossOutput:
    r"""Sinkhorn divergence :math:`S_\varepsilon(\alpha, \beta)` (or :math:`OT_\varepsilon` if not debiased).

    Args:
        backend: engine backend.
        x: ``(B, N, D)`` source points; a: ``(B, N)`` source weights.
        y: ``(B, M, D)`` target points; b: ``(B, M)`` target weights.
        p: exponent of the cost (1 or 2).
        schedule: epsilon-scaling schedule (its last value is blur ** p).
        reach: unbalanced scale (rho = reach ** p), or None for balanced OT.
        debias: return the debiased divergence S (True) or OT_eps (False).
        tol: stop the converge phase when every marginal error is <= tol (inf: no
            converge phase at all, exactly GeomLoss's schedule).
        max_iter: most iterations in all, schedule steps and the final step included
            (at least ``len(schedule) + 1`` without ``init``).
        on_step: called with each :class:`StepLog` as soon as the step is done.
        cost_formula: a KeOps formula in X and Y replacing the cost (online backend only).
        field: also return the displacement field of the source points (``LossOutput.field``):
            barycentre of the plan (a, b) minus that of the plan (a, a) (debiased), or minus
            the points (not debiased).
        init: a warm start, the raw potentials (``LossOutput.duals``) of an earlier run with
            as many points at the same final temperature (the points may have moved, as in
            a gradient flow). The schedule is skipped: the loop starts at the final
            temperature, on the finest level, from these potentials.
        certify: compute the certified error bound (False: ``error_bound`` is None).
        fixed_target: with ``init`` (debiased): (y, b) is the target ``init`` was solved
            for; its potential g_bb is kept from ``init``, never updated (nor its pair
            truncated), and enters the value as a constant.

    Returns:
        values ``(B,)`` differentiable with respect to x, y, a, b; potentials (F, G); the raw
        potentials of the final step (``duals``, for a later ``init``); a certified bound on
        the value's error (``error_bound``, see :func:`error_bound`).
    """
    cost = Cost(p, cost_formula)
    rho = None if reach is None else float(reach) ** p
    eps_list = schedule.epsilons
    eps = eps_list[-1]
    levels = backend.levels(x, a, y, b, cost, eps_list, debias)
    run = _Run(backend, levels, p, rho, debias, tol, on_step)
    if fixed_target and init is not None and debias:
        run.fixed = ("yy",)
    # alpha and beta are one measure: the (a, b) problem is the (a, a) problem, solved once,
    # so that S(alpha, alpha) = 0 exactly instead of the difference of two solvers' errors
    same = debias and x.shape == y.shape and torch.equal(x, y) and torch.equal(a, b)

    with torch.no_grad():
        if init is None:
            run.set_level(levels.level_at(0))
            duals = run.schedule(eps_list)
        else:
            run.set_level(levels.finest)
            duals = check_init(init, x, y, debias)
        # the marginal error's rounding floor in this dtype, at most: eps_dtype * max C / eps
        floor = torch.finfo(x.dtype).eps * cost_max(x, y, p) / eps
        duals = run.converge(duals, eps, max_iter, same, floor)
        if same:  # the same pairs too: the two problems' final updates are bit for bit equal
            duals = duals._replace(xy=duals.xx, yx=duals.yy)
            run.pairs = run.pairs._replace(xy=run.pairs.xx, yx=run.pairs.yy)
    # without gradients the final step may take the updates converge already has
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, a, y, b))
    final = run.final(duals, eps, reuse=not wants_grad)

    values = _sinkhorn_value(*run.w, *final, eps, rho)
    if debias and rho is None and tol < math.inf and not same:
        values = values - _symmetric_correction(run.w, duals, final)
    bound = None
    if certify and tol < math.inf and rho is None and cost_formula is None:
        bound = error_bound(run, duals, final, values, cost_max(x, y, p))

    disp = None
    if field:
        with torch.no_grad():
            (a_log, b_log), pairs = run.w_log, run.pairs
            lam = damping(eps, rho)  # the final step's updates are lam times the softmins needed here
            disp = backend.barycentres(eps, pairs.xy, b_log + duals.yx / eps, y, final.xy.detach() / lam)
            if debias:
                disp = disp - backend.barycentres(eps, pairs.xx, a_log + duals.xx / eps, x,
                                                  final.xx.detach() / lam)
            else:
                disp = disp - x

    if debias:
        potentials = (final.xy - final.xx, final.yx - final.yy)
    else:
        potentials = (final.xy, final.yx)
    a_log, b_log = run.w_log
    return LossOutput(
        values=values,
        potentials=(potentials[0].detach(), potentials[1].detach()),
        steps=run.steps,
        n_iter=run.n_iter,
        marginal_error=run.final_error,
        converged=run.final_error <= tol,
        engine_info=levels.info,
        field=None if disp is None else disp.detach(),
        plan={"eps": eps, "h_ab": (b_log + duals.yx / eps).detach(),
              "h_aa": (a_log + duals.xx / eps).detach() if debias else None,
              "f_ba": final.xy.detach(), "rho": rho},
        duals=Duals(*(None if t is None else t.detach() for t in final)),
        error_bound=bound,
    )


def check_init(init: Duals, x: torch.Tensor, y: torch.Tensor, debias: bool) -> Duals:
    """The warm-start potentials, checked against the problem (shapes, finiteness)."""
    shapes = {"xy": x.shape[:2], "yx": y.shape[:2], "xx": x.shape[:2], "yy": y.shape[:2]}
    if not isinstance(init, Duals):
        raise ParameterError("init", f"expected the duals of an earlier result, got {type(init).__name__}")
    out = {}
    for key in ("xy", "yx", "xx", "yy") if debias else ("xy", "yx"):
        t = getattr(init, key)
        if t is None:
            raise ParameterError("init", "has no symmetric potentials (it comes from a run without debias)")
        if tuple(t.shape) != tuple(shapes[key]):
            raise ParameterError("init", f"potential {key} has shape {tuple(t.shape)}, the problem "
                                 f"needs {tuple(shapes[key])} (as many points as the earlier run)")
        t = t.detach().to(device=x.device, dtype=x.dtype)
        if not torch.isfinite(t).all():
            raise ParameterError("init", f"potential {key} is not finite")
        out[key] = t
    return Duals(**out)


class _Run:
    """One run of the loop: the backend's levels, the current level, and the step log.

    Every potential is updated by :meth:`update`, the one formula of all four
    (:math:`f_{ba}, g_{ab}, f_{aa}, g_{bb}`): the damped softmin of its pair against the
    potential on that pair's columns. The phases (:meth:`schedule`, :meth:`converge`,
    :meth:`final`) only decide which potentials to update, and how to combine old and new.
    """

    def __init__(self, backend: Backend, levels: Levels, p: int, rho: float | None, debias: bool,
                 tol: float, on_step: Callable[[StepLog], None] | None):
        self.sm, self.levels, self.p, self.rho = backend.softmin, levels, p, rho
        self.tol, self.on_step = tol, on_step
        self.keys = ("xy", "yx", "xx", "yy") if debias else ("xy", "yx")
        self.fixed: tuple[str, ...] = ()  # potentials kept as they are (see fixed_target)
        self.ahead: dict[str, torch.Tensor] = {}  # updates known in advance (see converge)
        self.steps: list[StepLog] = []
        self.start = time.perf_counter()
        self.n_iter = 0
        self.final_error = math.inf

    # -- building blocks -------------------------------------------------------------------

    def set_level(self, level) -> None:
        """Move to ``level``: its pairs and weights."""
        self.level = level
        self.pairs = self.levels.pairs(level)
        self.w = self.levels.weights(level)
        self.w_log = tuple(log_weights(w) for w in self.w)

    def update(self, key: str, duals: Duals | None, eps: float, pairs: Pairs | None = None,
               w_log: tuple | None = None, detach: bool = False) -> torch.Tensor:
        r"""The Sinkhorn update of the potential ``key`` (a pair name: xy, yx, xx or yy).

        :math:`\lambda(\varepsilon)\,\mathrm{Sm}_\varepsilon(C, \log w + h/\varepsilon)` over the
        pair ``key``, with w the weights of its columns and h the potential on its columns
        (``duals`` None: h = 0, the first update). ``pairs``/``w_log`` default to the current
        level's; a transfer to a finer level passes its pairs and the coarser weights.
        """
        pairs = self.pairs if pairs is None else pairs
        w_log = self.w_log if w_log is None else w_log
        source = _SOURCE[key]
        h = w_log[_ROWS[source]]
        if duals is not None:
            h = h + getattr(duals, source) / eps
        if detach:
            h = h.detach()
        return damping(eps, self.rho) * self.sm(eps, getattr(pairs, key), h)

    def error(self, key: str, f: torch.Tensor, f_next: torch.Tensor, eps: float) -> float:
        """Marginal error, on the rows of pair ``key``, of the plan of ``f`` (``f_next`` its update)."""
        return float(marginal_error(f, f_next, self.w[_ROWS[key]], eps, self.rho).max())

    def log(self, phase: str, eps: float, change: float, err: float) -> None:
        step = StepLog(len(self.steps), phase, eps, eps ** (1.0 / self.p),
                       time.perf_counter() - self.start, change, err)
        self.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)

    # -- phases ----------------------------------------------------------------------------

    def schedule(self, eps_list: list[float]) -> Duals:
        """The epsilon-scaling descent: GeomLoss's symmetric, averaged updates, step for step."""
        duals = Duals(**{k: self.update(k, None, eps_list[0]) for k in self.keys})
        for i, eps in enumerate(eps_list):
            self.n_iter += 1
            level = self.levels.level_at(i)
            if level != self.level:  # a finer level: carry the potentials over to it
                last = i == len(eps_list) - 1 and self.levels.jump_is_update
                duals = self.transfer(level, duals, eps if last else eps_list[i - 1])
                if last:
                    self.log("refine", eps, math.nan, math.nan)
                    continue
            # multiscale: keep the blocks that matter at this eps (measured on 100k points,
            # re-truncating pays: 25% of the pairs kept at the jump, 10% one step later)
            self.pairs = self.levels.truncate(self.level, self.pairs, duals, eps)
            new = {k: self.update(k, duals, eps) for k in self.keys}
            errors = [self.error(k, getattr(duals, k), new[k], eps) for k in self.keys]
            averaged = Duals(**{k: 0.5 * (getattr(duals, k) + new[k]) for k in self.keys})
            phase = "schedule" if self.level == self.levels.finest else "coarse"
            self.log(phase, eps, _change(*self.changes(duals, averaged)), max(errors))
            duals = averaged
        return duals

    def transfer(self, level, duals: Duals, eps: float) -> Duals:
        """The potentials on the nodes of ``level`` (finer) from those of the current level."""
        pairs = self.levels.transfer(self.level, level)
        moved = Duals(**{k: self.update(k, duals, eps, pairs=pairs) for k in self.keys})
        self.set_level(level)
        return moved

    def converge(self, duals: Duals, eps: float, max_iter: int, same: bool, floor: float) -> Duals:
        """Iterate at the final eps until every marginal error is <= tol (or ``max_iter``).

        It also stops on a stall within ``STALL_FLOOR`` times the rounding ``floor`` (``STALL``).
        The (a, b) problem: Sinkhorn's map on the column potential, g -> T(f) with f = T(g),
        accelerated by :class:`Anderson` mixing. The state (f, g) has f = T(g): its row
        marginal is exact, and the error measured is that of its columns. The symmetric
        problems: averaged updates (they contract at a rate of 1/2 or better). Each of the
        three problems is frozen once it meets tol: the problems are independent, and a flow
        step's warm start often leaves the (a, b) problem converged after one iteration
        while (a, a) needs a second (the 8171-point bunny pair, 50 steps at blur 0.05:
        614 softmins instead of 658). When ``same`` (alpha is beta), the (a, b) problem is
        the (a, a) one.

        ``self.ahead`` keeps the updates already computed from the returned potentials (f,
        T(f) and the frozen symmetric problems' last updates): :meth:`final` takes them
        instead of computing them again when no gradient is needed.
        """
        self.ahead = {}
        if self.tol == math.inf:
            return duals
        kept = duals._replace(**dict.fromkeys(self.fixed))  # a pair without potentials stays whole
        self.pairs = self.levels.truncate(self.level, self.pairs, kept, eps)  # potentials moved
        err_sym = {k: math.inf for k in self.keys[2:] if k not in self.fixed}
        err_ab = 0.0 if same else math.inf
        mixer, g = Anderson(), duals.yx
        best, best_at = math.inf, self.n_iter  # the stall rule (STALL)
        while self.n_iter + 1 < max_iter:  # the final step counts too
            self.n_iter += 1
            changes = []
            if err_ab > self.tol:  # skipped once it meets tol, as the symmetric problems are
                f = self.update("xy", duals._replace(yx=g), eps)
                gt = self.update("yx", duals._replace(xy=f), eps)
                err_ab = self.error("yx", g, gt, eps)
                changes += [(duals.xy, f), (duals.yx, g)]
                duals = duals._replace(xy=f, yx=g)
                self.ahead.update(xy=f, yx=gt)  # f = T(g) and T(f): the updates of (f, g)
            for k, e in err_sym.items():  # averaged updates, skipped once they meet tol
                if e <= self.tol:
                    continue
                new = self.update(k, duals, eps)
                err_sym[k] = self.error(k, getattr(duals, k), new, eps)
                if err_sym[k] > self.tol:  # else keep the state whose error was measured
                    changes.append((getattr(duals, k), 0.5 * (getattr(duals, k) + new)))
                    duals = duals._replace(**{k: changes[-1][1]})
                else:
                    self.ahead[k] = new
            err = max([err_ab, *err_sym.values()])
            self.log("converge", eps, _change(*changes) if changes else 0.0, err)
            if err <= self.tol:
                break  # (f, g) is the state whose errors were measured
            if err < (1 - STALL_GAIN) * best:
                best, best_at = err, self.n_iter
            elif self.n_iter - best_at >= STALL and best <= STALL_FLOOR * floor:
                break  # the rounding floor: more iterations would not lower the error
            if err_ab > self.tol:
                g = mixer.step(g, gt, err_ab)
        return duals if same or self.rho is not None else self.gauge(duals)

    def gauge(self, duals: Duals) -> Duals:
        r"""The balanced (a, b) potentials, shifted so that :math:`\langle a, f\rangle = \langle b, g\rangle`.

        Balanced potentials are defined up to :math:`(f + c, g - c)`: the plan, the value and
        every marginal error are the same. Which constant an accelerated iteration ends on
        depends on its path (two backends, or two tolerances, would return potentials and
        weight gradients apart by a constant); fixing the gauge makes them comparable.
        :math:`T(g - c) = T(g) + c`, so the state keeps f = T(g).
        """
        a, b = self.w
        c = (_dot(b, duals.yx) - _dot(a, duals.xy)) / (a.sum(-1) + b.sum(-1))
        if "xy" in self.ahead:  # T(g - c) = T(g) + c and T(f + c) = T(f) - c
            self.ahead.update(xy=self.ahead["xy"] + c[:, None], yx=self.ahead["yx"] - c[:, None])
        return duals._replace(xy=duals.xy + c[:, None], yx=duals.yx - c[:, None])

    def final(self, duals: Duals, eps: float, reuse: bool = False) -> Duals:
        """One parallel update with autograd on and detached inputs (envelope-theorem gradients).

        ``reuse`` (no gradient wanted): the updates that :meth:`converge` already computed
        from these potentials (``self.ahead``) are taken as they are, the same values up to
        the rounding of the gauge's shift; a loop ending on the tolerance then recomputes
        only the symmetric problems that were still moving.
        """
        self.n_iter += 1
        moving = [k for k in self.keys if k not in self.fixed]
        ahead = self.ahead if reuse else {}
        new = {k: ahead[k] if k in ahead else self.update(k, duals, eps, detach=True) for k in moving}
        final = Duals(**new, **{k: getattr(duals, k) for k in self.fixed})
        with torch.no_grad():
            errors = [self.error(k, getattr(duals, k), getattr(final, k), eps) for k in moving]
            self.final_error = max(errors)
            self.log("final", eps, _change(*self.changes(duals, final)), self.final_error)
        return final

    def changes(self, old: Duals, new: Duals) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(old, new) for every potential of the run."""
        return [(getattr(old, k), getattr(new, k)) for k in self.keys]


def _change(*pairs) -> float:
    """Largest absolute change between the old and new tensors of each pair."""
    return max(float((new.detach() - old.detach()).abs().max()) for old, new in pairs)


def cost_max(x: torch.Tensor, y: torch.Tensor, p: int) -> float:
    r"""An upper bound of the cost over all pairs: :math:`d^p/p` with d the diameter of x and y.

    d is the diagonal of the bounding box of both clouds (every batch item together), so
    :math:`\tfrac12\|x-y\|^2 \le d^2/2` and :math:`\|x-y\| \le d`.
    """
    with torch.no_grad():
        both = torch.cat([x.detach().reshape(-1, x.shape[-1]), y.detach().reshape(-1, y.shape[-1])])
        d = float((both.max(0).values - both.min(0).values).double().norm())
    return d**p / p


def error_bound(run: _Run, duals: Duals, final: Duals, values: torch.Tensor, c_max: float) -> float:
    r"""A certified bound on :math:`|\text{value} - S^*|`, balanced problems (float64 arithmetic).

    For one problem (rows :math:`\mu`, columns :math:`\nu`, equal masses m), the dual objective
    :math:`J(f, g) = \langle\mu, f\rangle + \langle\nu, g\rangle - \varepsilon\langle\mu\otimes\nu,
    e^{(f\oplus g - C)/\varepsilon}\rangle + \varepsilon m` is concave and its maximum is the
    problem's value :math:`OT^*`. At :math:`\hat f = T(g)` (the final step's update of the row
    potential), :math:`J = \langle\mu, \hat f\rangle + \langle\nu, g\rangle`, its gradient in f
    is 0 and in g it is :math:`\nu - c`, with c the column marginal of the plan of
    :math:`(\hat f, g)`. Weak duality and concavity give

    .. math::
        J \le OT^* \le J + \langle \nu - c, g^* - g\rangle
          \le J + \tfrac12 \|\nu - c\|_1\, (\mathrm{osc}\, g + C_{max}),

    since :math:`\nu - c` sums to 0 and the optimal potential, a c-transform, oscillates by
    at most :math:`C_{max}` (:func:`cost_max`) over the support. The debiased value's
    interval follows from the three problems' intervals, and the bound is the distance
    from the reported value to the interval's far end. It costs one softmin per problem.
    """
    eps = run.steps[-1].eps
    with torch.no_grad():
        lower, upper = {}, {}
        for key in ("xy", "xx", "yy") if len(run.keys) == 4 else ("xy",):
            col = _SOURCE[key]  # the problem's column potential
            f_hat, g = getattr(final, key).detach(), getattr(duals, col)
            g_next = run.update(col, Duals(None, None)._replace(**{key: f_hat}), eps)
            mu, nu = run.w[_ROWS[key]].double(), run.w[_ROWS[col]].double()
            spread = (nu * torch.exp((g.double() - g_next.double()) / eps) - nu).abs().sum(-1)
            support = nu > 0
            osc = torch.where(support, g, -math.inf).amax(-1) - torch.where(support, g, math.inf).amin(-1)
            j = (mu * f_hat.double()).sum(-1) + (nu * g.double()).sum(-1)
            lower[key] = j
            upper[key] = j + 0.5 * spread * (osc.double() + c_max)
        low, high = lower["xy"], upper["xy"]
        if "xx" in lower:
            low = low - 0.5 * (upper["xx"] + upper["yy"])
            high = high - 0.5 * (lower["xx"] + lower["yy"])
        v = values.detach().double()
        return float(torch.maximum(v - low, high - v).max())


def _symmetric_correction(w: tuple, duals: Duals, final: Duals) -> torch.Tensor:
    r"""What the symmetric terms of a balanced debiased value gain from their semi-dual (detached).

    The value takes :math:`\langle a, T(s)\rangle` for :math:`\tfrac12 OT_\varepsilon(\alpha,
    \alpha) = \langle a, f^*\rangle`, with s the (a, a) problem's last state and T its
    Sinkhorn map. With :math:`s = f^* + \delta`, :math:`T(s) \approx f^* - P\delta` (P the
    plan's rows, normalised; :math:`P^\top a = a` at the optimum), so that term errs by
    :math:`-\langle a, \delta\rangle`: first order in the potential's error, where the (a, b)
    term, a value of the concave dual objective, errs at second order. An averaged update
    :math:`s \leftarrow \tfrac12(s + T(s))` leaves :math:`\langle a, \delta\rangle` at
    second order (:math:`\langle a, (I - P)\delta\rangle = 0`), but a warm start within tol
    at once is kept as it is (:meth:`_Run.converge`), and its value then errs at first order.
    The semi-dual :math:`\tfrac12(\langle a, s\rangle + \langle a, T(s)\rangle)` errs at
    second order in both cases. Returns :math:`\tfrac12\sum \langle w, s - T(s)\rangle` over
    (a, a) and (b, b), to subtract: 0 at the fixed point, and detached, so the gradients
    (envelope theorem, through T(s)) are unchanged. In a flow whose warm steps take one or
    two iterations in turn, the values without it zigzag (the bunny pair of
    docs/convergence.md: relative decreases between 0.004 and 0.09 from step to step
    instead of falling steadily from 0.09 to 0.03).
    """
    a, b = w
    with torch.no_grad():
        return 0.5 * (_dot(a, duals.xx - final.xx) + _dot(b, duals.yy - final.yy)).to(final.xx.dtype)


def _dot(w: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (w * f).sum(-1)


def _sinkhorn_value(a, b, f_ba, g_ab, f_aa, g_bb, eps: float, rho: float | None):
    r"""The divergence from the final potentials, with exact envelope gradients.

    Balanced: :math:`\langle a, f_{ba} - f_{aa}\rangle + \langle b, g_{ab} - g_{bb}\rangle`
    (debiased) or :math:`\langle a, f_{ba}\rangle + \langle b, g_{ab}\rangle`.

    Unbalanced (Séjourné, Feydy, Vialard, Trouvé, Peyré 2019, "Sinkhorn divergences for
    unbalanced optimal transport"): with :math:`E_{ab} = \langle a, e^{-f_{ba}/\rho}\rangle`
    (the mass of the plan) and :math:`m_a, m_b` the masses, the dual objective at the optimum is

    .. math::
        OT_\varepsilon(\alpha, \beta) = \rho(m_a + m_b) + \varepsilon m_a m_b
            - (\rho + \varepsilon/2)(E_{ab} + E_{ba}),

    i.e. :math:`(\rho+\varepsilon/2)[\langle a, 1-e^{-f/\rho}\rangle + \langle b, 1-e^{-g/\rho}\rangle]`
    when :math:`m_a = m_b = 1`. The unbalanced Sinkhorn divergence is

    .. math::
        S_\varepsilon = OT_\varepsilon(\alpha,\beta) - \tfrac12 OT_\varepsilon(\alpha,\alpha)
            - \tfrac12 OT_\varepsilon(\beta,\beta) + \tfrac{\varepsilon}{2}(m_a - m_b)^2
          = (\rho+\varepsilon/2)(E_{aa} + E_{bb} - E_{ab} - E_{ba}),

    positive and definite (the mass term makes it so: without it, masses of 2000 and 3.5
    gave -4515). The envelope theorem gives the derivatives
    :math:`\partial OT/\partial a_i = \rho + \varepsilon m_b - (\rho+\varepsilon) e^{-f_i/\rho}` and
    :math:`\partial OT/\partial x_i = (\rho+\varepsilon)\, a_i e^{-f_i/\rho} \nabla f(x_i)/\rho`:
    the exponential terms enter the forward value with weight :math:`\rho+\varepsilon/2` but
    the gradient with :math:`\rho+\varepsilon` (Séjourné et al. 2019, Prop. 12). GeomLoss 0.3.1
    meant to do this but its backward hook is never called, so its gradients are too small.
    """
    if rho is None:
        value = _dot(a, f_ba) + _dot(b, g_ab)
        if f_aa is not None:
            value = value - _dot(a, f_aa) - _dot(b, g_bb)
        return value

    def exp_mass(w, f):  # forward weight rho + eps/2, backward weight rho + eps
        e = _dot(w, torch.exp(-f / rho))
        return (rho + eps) * e - (eps / 2) * e.detach()

    if f_aa is not None:  # the rho and eps mass terms cancel with (eps/2)(m_a - m_b)^2
        return exp_mass(a, f_aa) + exp_mass(b, g_bb) - exp_mass(a, f_ba) - exp_mass(b, g_ab)
    m_a, m_b = a.sum(-1), b.sum(-1)
    return rho * (m_a + m_b) + eps * m_a * m_b - exp_mass(a, f_ba) - exp_mass(b, g_ab)

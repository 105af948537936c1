r"""Sinkhorn divergences: the one generic loop, written against the engine contract.

Definitions follow REFERENCE.md (Feydy et al. 2019, "Interpolating between optimal
transport and MMD using Sinkhorn divergences"; Séjourné et al. 2019 for the unbalanced
case). Notation: :math:`\varepsilon` temperature, :math:`\rho` = reach^p (None: balanced),
damping :math:`\lambda(\varepsilon) = 1/(1 + \varepsilon/\rho)`.

The loop has three phases, all logged:

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


class Overrelaxation:
    r"""Adaptive over-relaxation weight :math:`\omega` of the converge phase.

    Alternating Sinkhorn updates converge linearly; once their rate :math:`r` (ratio of
    successive marginal errors) is steady, the over-relaxed iteration
    :math:`f \leftarrow f + \omega (T(g) - f)` with the SOR weight
    :math:`\omega = 2 / (1 + \sqrt{1 - r})` contracts at about :math:`\omega - 1` per sweep
    instead of :math:`r` (Young's SOR theory; Thibault et al. 2017, "Overrelaxed
    Sinkhorn-Knopp"). The weight is only switched on after ``warmup`` plain sweeps with a
    steady rate, and reset to 1 (with a lower cap) if the error grows tenfold (far from
    the fixed point the linear theory does not hold).
    """

    #: error growth over the best error seen since the weight was set that means divergence;
    #: over-relaxed Sinkhorn has transient growth of a few times at small epsilon, which must
    #: not count (on 600 x 500 points at blur 0.01, a threshold of 2 instead of 10 took 1877
    #: iterations instead of 358)
    GROWTH = 10.0
    # The cap omega_max = 1.95 was chosen on 600 x 500 uniform clouds: iterations to tol 1e-3
    # at blur 0.01 were 358 / 426 / 125 (balanced, balanced shifted, reach 0.3) with a cap of
    # 1.9, 220 / 213 / 153 with 1.95 and 303 / 213 / 223 with 1.98; 44 and 19 at blur
    # 0.05 and 0.1 whatever the cap.

    def __init__(self, warmup: int = 4, omega_max: float = 1.95):
        self.omega = 1.0
        self.warmup, self.omega_max = warmup, omega_max
        self.errors: list[float] = []
        self.best = math.inf

    def observe(self, error: float) -> None:
        """Record the marginal error of the last sweep and adapt the weight."""
        if self.omega > 1.0:
            self.best = min(self.best, error)
            if error > self.GROWTH * self.best or not math.isfinite(error):
                # diverging: back off, and allow only a milder weight from now on
                self.omega_max = 1.0 + 0.5 * (self.omega - 1.0)
                self.omega, self.errors, self.best = 1.0, [], math.inf
                return
        self.errors.append(error)
        if len(self.errors) <= self.warmup:
            return
        e = self.errors[-4:]
        ratios = [e[k + 1] / e[k] for k in range(3) if e[k] > 0]
        if len(ratios) < 3 or not all(0 < q < 1 for q in ratios):
            return
        if max(ratios) - min(ratios) > 0.05:
            return  # not steady yet
        rate, w = sum(ratios) / 3, self.omega
        # Plain-Sinkhorn rate r implied by the observed rate of the w-relaxed iteration:
        # (rate + w - 1)^2 = rate * w^2 * r  (w = 1 gives r = rate).
        r = min((rate + w - 1.0) ** 2 / (rate * w * w), 0.9999)
        better = min(self.omega_max, 2.0 / (1.0 + math.sqrt(1.0 - r)))
        if better > w + 0.01:
            self.omega, self.errors = better, []
            self.best = error


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
            (at least ``len(schedule) + 1``).
        on_step: called with each :class:`StepLog` as soon as the step is done.
        cost_formula: a KeOps formula in X and Y replacing the cost (online backend only).
        field: also return the displacement field of the source points (``LossOutput.field``):
            barycentre of the plan (a, b) minus that of the plan (a, a) (debiased), or minus
            the points (not debiased).

    Returns:
        values ``(B,)`` differentiable with respect to x, y, a, b; potentials (F, G).
    """
    cost = Cost(p, cost_formula)
    rho = None if reach is None else float(reach) ** p
    eps_list = schedule.epsilons
    sm = backend.softmin
    steps: list[StepLog] = []
    start = time.perf_counter()

    def log(phase: str, eps: float, change: float, err: float) -> None:
        step = StepLog(
            len(steps), phase, eps, eps ** (1.0 / p), time.perf_counter() - start, change, err
        )
        steps.append(step)
        if on_step is not None:
            on_step(step)

    def err(f, f_next, w, eps) -> float:
        return float(marginal_error(f, f_next, w, eps, rho).max())

    def delta(*pairs) -> float:
        return max(float((new.detach() - old.detach()).abs().max()) for old, new in pairs)

    # Rows carry gradients, columns are detached: autograd then yields the envelope-theorem
    # gradients a_i * grad F(x_i) from the final step alone.
    levels = _levels_for(backend, x, a, y, b, cost, eps_list, debias, rho)
    if levels is None:
        xy, yx, xx, yy = _pairs(backend, x, y, cost, debias)
        wa, wb, level = a, b, None
    else:  # coarse-to-fine: the first steps may run on a coarser level
        level = levels.level_at(0)
        xy, yx, xx, yy = levels.pairs(level)
        wa, wb = levels.weights(level)

    with torch.no_grad():
        wa_log, wb_log = log_weights(wa), log_weights(wb)
        eps = eps_list[0]
        lam = damping(eps, rho)
        g_ab, f_ba = lam * sm(eps, yx, wa_log), lam * sm(eps, xy, wb_log)
        if debias:
            f_aa, g_bb = lam * sm(eps, xx, wa_log), lam * sm(eps, yy, wb_log)
        else:
            f_aa = g_bb = None

        # 1. The epsilon-scaling descent (symmetric, averaged updates).
        for i, eps in enumerate(eps_list):
            if levels is not None:
                new_level = levels.level_at(i)
                if new_level != level:  # a finer level: extrapolate the potentials to it
                    # Image pyramids: at the last step the extrapolation, made at this step's
                    # eps, is the step's update (as in GeomLoss): at blur 1.5 px that saved a fifth
                    # of the time on 512^2 images and moved the value by 1.3e-5 relative (5e-5 on
                    # 256^2; measured). Not for multiscale: its truncation needs the updated
                    # potentials.
                    last = i == len(eps_list) - 1 and levels.refine_is_update
                    f_ba, g_ab, f_aa, g_bb = levels.refine(level, new_level, f_ba, g_ab, f_aa,
                                                           g_bb, eps if last else eps_list[i - 1])
                    level = new_level
                    xy, yx, xx, yy = levels.pairs(level)
                    wa, wb = levels.weights(level)
                    wa_log, wb_log = log_weights(wa), log_weights(wb)
                    if last:
                        log("refine", eps, math.nan, math.nan)
                        continue
                # multiscale: keep the blocks that matter at this eps (a mask from a larger eps
                # stays valid, only looser; measured on 100k points, re-truncating pays: 25% of
                # the pairs kept at the jump, 10% one step later)
                xy, yx, xx, yy = levels.truncate(level, (xy, yx, xx, yy), f_ba, g_ab, f_aa, g_bb, eps)
            lam = damping(eps, rho)
            ft_ba = lam * sm(eps, xy, wb_log + g_ab / eps)
            gt_ab = lam * sm(eps, yx, wa_log + f_ba / eps)
            errors = [err(f_ba, ft_ba, wa, eps), err(g_ab, gt_ab, wb, eps)]
            new = [(f_ba, 0.5 * (f_ba + ft_ba)), (g_ab, 0.5 * (g_ab + gt_ab))]
            if debias:
                ft_aa = lam * sm(eps, xx, wa_log + f_aa / eps)
                gt_bb = lam * sm(eps, yy, wb_log + g_bb / eps)
                errors += [err(f_aa, ft_aa, wa, eps), err(g_bb, gt_bb, wb, eps)]
                new += [(f_aa, 0.5 * (f_aa + ft_aa)), (g_bb, 0.5 * (g_bb + gt_bb))]
                f_aa, g_bb = new[2][1], new[3][1]
            f_ba, g_ab = new[0][1], new[1][1]
            phase = "coarse" if levels is not None and level != levels.finest else "schedule"
            log(phase, eps, delta(*new), max(errors))
        a_log, b_log = wa_log, wb_log

        # 2. Converge at the final epsilon. Over-relaxed alternating updates for (a, b):
        #    f <- f + w (T(g) - f), then g <- g + w (T(f) - g). Since T(g) is known when T(f)
        #    is computed, both marginal errors of the state (f, g) are measured exactly.
        eps, lam = eps_list[-1], damping(eps_list[-1], rho)
        if levels is not None and tol < math.inf:  # the potentials have moved: truncate again
            xy, yx, xx, yy = levels.truncate(level, (xy, yx, xx, yy), f_ba, g_ab, f_aa, g_bb, eps)

        def symmetric_step(f, f_err, pair, w_log, w, changes):
            """One averaged update of a symmetric problem, skipped once it meets tol."""
            if f_err <= tol:
                return f, f_err
            ft = lam * sm(eps, pair, w_log + f / eps)
            f_err = err(f, ft, w, eps)
            if f_err <= tol:
                return f, f_err  # keep the state whose error was measured
            changes.append((f, 0.5 * (f + ft)))
            return changes[-1][1], f_err

        err_aa = err_bb = math.inf if debias else 0.0
        relax = Overrelaxation()
        n_iter = len(eps_list)
        while tol < math.inf and n_iter + 1 < max_iter:  # the final step counts too
            n_iter += 1
            w = relax.omega
            ft_ba = lam * sm(eps, xy, b_log + g_ab / eps)
            f_new = f_ba + w * (ft_ba - f_ba)
            gt_ab = lam * sm(eps, yx, a_log + f_new / eps)
            err_ab = max(err(f_new, ft_ba, a, eps), err(g_ab, gt_ab, b, eps))
            changes = [(f_ba, f_new)]
            f_ba = f_new
            if debias:  # symmetric problems: averaged updates, frozen once converged
                f_aa, err_aa = symmetric_step(f_aa, err_aa, xx, a_log, a, changes)
                g_bb, err_bb = symmetric_step(g_bb, err_bb, yy, b_log, b, changes)
            log("converge", eps, delta(*changes), max(err_ab, err_aa, err_bb))
            if max(err_ab, err_aa, err_bb) <= tol:
                break  # keep g_ab: (f_ba, g_ab) is the state whose errors were measured
            g_ab = g_ab + w * (gt_ab - g_ab)
            relax.observe(err_ab)

    # 3. Final extrapolation with autograd on (inputs detached): a parallel update.
    eps = eps_list[-1]
    lam = damping(eps, rho)
    f_ba_final = lam * sm(eps, xy, (b_log + g_ab / eps).detach())
    g_ab_final = lam * sm(eps, yx, (a_log + f_ba / eps).detach())
    with torch.no_grad():
        errors = [err(f_ba, f_ba_final, a, eps), err(g_ab, g_ab_final, b, eps)]
        changes = [(f_ba, f_ba_final), (g_ab, g_ab_final)]
    if debias:
        f_aa_final = lam * sm(eps, xx, (a_log + f_aa / eps).detach())
        g_bb_final = lam * sm(eps, yy, (b_log + g_bb / eps).detach())
        with torch.no_grad():
            errors += [err(f_aa, f_aa_final, a, eps), err(g_bb, g_bb_final, b, eps)]
            changes += [(f_aa, f_aa_final), (g_bb, g_bb_final)]
    final_error = max(errors)
    log("final", eps, delta(*changes), final_error)
    n_iter += 1

    disp = None
    if field:
        with torch.no_grad():
            disp = _barycentres(sm, eps, xy, b_log + g_ab / eps, y)
            disp = disp - (_barycentres(sm, eps, xx, a_log + f_aa / eps, x) if debias else x)

    f_aa_final = f_aa_final if debias else None
    g_bb_final = g_bb_final if debias else None
    values = _sinkhorn_value(a, b, f_ba_final, g_ab_final, f_aa_final, g_bb_final, eps, rho)
    if debias:
        potentials = (f_ba_final - f_aa_final, g_ab_final - g_bb_final)
    else:
        potentials = (f_ba_final, g_ab_final)
    return LossOutput(
        values=values,
        potentials=(potentials[0].detach(), potentials[1].detach()),
        steps=steps,
        n_iter=n_iter,
        marginal_error=final_error,
        converged=final_error <= tol,
        engine_info=None if levels is None else levels.info,
        field=None if disp is None else disp.detach(),
        plan={"eps": eps, "h_ab": (b_log + g_ab / eps).detach(),
              "h_aa": (a_log + f_aa / eps).detach() if debias else None,
              "f_ba": f_ba_final.detach(), "rho": rho},
    )


def _barycentres(sm, eps: float, pair, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""``(B, N, D)``: row barycentres :math:`\sum_j \pi_{ij} y_j / \sum_j \pi_{ij}` of the plan.

    Here :math:`\pi_{ij} = e^{h_j - C_{ij}/\varepsilon}`.

    Each coordinate is a ratio of two softmins: the numerator adds :math:`\log z_j` to h,
    with z the coordinate shifted into [span, 2 span] (positive, so its log exists, and
    away from 0, so nothing is lost to cancellation).
    """
    y = y.detach()
    base = sm(eps, pair, h)
    lo = y.amin(1)
    span = (y.amax(1) - lo).clamp_min(1e-12)  # (B, D)
    out = []
    for d in range(y.shape[-1]):
        z = y[..., d] - lo[:, d : d + 1] + span[:, d : d + 1]
        num = sm(eps, pair, h + z.log())
        out.append(torch.exp((base - num) / eps) + (lo[:, d : d + 1] - span[:, d : d + 1]))
    return torch.stack(out, dim=-1)


def _levels_for(backend, x, a, y, b, cost, eps_list, debias, rho):
    """The coarse-to-fine protocol of a backend that has one, else None.

    A protocol object has ``level_at(i)`` (the level of schedule step i; the last step is
    always on ``finest``), ``refine_is_update`` (a jump at the last step replaces its
    update), ``pairs(level)`` and ``weights(level)``, ``refine(old, new, f_ba, g_ab, f_aa,
    g_bb, eps)`` (potentials moved to a finer level), ``truncate(level, pairs, f_ba, g_ab,
    f_aa, g_bb, eps)`` and an ``info`` dict for the result.
    """
    if getattr(backend, "multiscale", False):
        return _Multiscale(backend, x, a, y, b, cost, eps_list, debias, rho)
    if getattr(backend, "pyramid", False):
        return _Pyramid(backend, x, a, y, b, cost, eps_list, debias, rho)
    return None


def _pairs(backend, x, y, cost, debias, levels=None):
    """The four pairs (xy, yx, xx, yy) of a problem; xx, yy are None when not debiased.

    With ``levels`` (multiscale), rows and columns are sorted by their clusters.
    """
    if levels is None:
        kw = [{}, {}, {}, {}]
    else:
        cx, cy = levels.rows, levels.cols
        kw = [dict(rows=cx, cols=cy), dict(rows=cy, cols=cx), dict(rows=cx, cols=cx), dict(rows=cy, cols=cy)]
    xy, yx = backend.pair(x, y.detach(), cost, **kw[0]), backend.pair(y, x.detach(), cost, **kw[1])
    xx = backend.pair(x, x.detach(), cost, **kw[2]) if debias else None
    yy = backend.pair(y, y.detach(), cost, **kw[3]) if debias else None
    return xy, yx, xx, yy


def _extend(backend, rho, eps, pair, w_log, h):
    """Potential on the rows of ``pair`` from ``h`` on its columns: one softmin (c-transform)."""
    return damping(eps, rho) * backend.softmin(eps, pair, w_log + h / eps)


class _Multiscale:
    r"""The coarse-to-fine protocol of the multiscale backend (engine/multiscale.py).

    Two levels: 0, the cluster centroids weighted by the clusters' masses, for the
    schedule's first steps while :math:`\varepsilon \ge \text{cluster\_scale}^p`; 1, the
    points. At the jump, the potentials are extrapolated to the points by one softmin of the
    points against the centroids,
    :math:`f(x_i) = \lambda\,\mathrm{Sm}_\varepsilon(\log B + g^c/\varepsilon)(x_i)` (and likewise
    for g and the symmetric problems). From then on the points are used, and at each new
    epsilon every pair keeps only the blocks that matter given the current potentials
    (kernel truncation, ``MultiscaleBackend.truncated``).
    """

    finest = 1
    refine_is_update = False

    def __init__(self, backend, x, a, y, b, cost, eps_list, debias, rho):
        self.backend, self.x, self.y, self.a, self.b = backend, x, y, a, b
        self.cost, self.debias, self.rho = cost, debias, rho
        self.scale = backend.scale_for(x, y)
        self.rows = backend.cluster(x, a, self.scale)
        self.cols = backend.cluster(y, b, self.scale)
        self.jump = backend.jump_index(eps_list, self.scale, cost.p)
        # sorted copies of the points, made here (outside no_grad) so that the final step's
        # rows carry gradients; truncated views of these pairs are made at each new eps
        self.full = _pairs(backend, x, y, cost, debias, self)
        self.info = {
            "cluster_scale": self.scale,
            "clusters": [self.rows.k, self.cols.k],
            "jump_step": self.jump,
            "jump_blur": eps_list[self.jump] ** (1.0 / cost.p),
            "truncate": backend.sinkhorn_truncate(cost.p),
            "pairs_kept_fraction": None,
        }

    def level_at(self, i: int) -> int:
        return 0 if i < self.jump else 1

    def pairs(self, level):
        if level == 1:  # every block: truncated right away by the loop
            return self.full
        xc, yc = self.rows.centroids[None], self.cols.centroids[None]
        return _pairs(self.backend, xc, yc, self.cost, self.debias)

    def weights(self, level):
        if level == 1:
            return self.a, self.b
        return self.rows.weights[None], self.cols.weights[None]

    def truncate(self, level, pairs, f_ba, g_ab, f_aa, g_bb, eps):
        """The four fine pairs, truncated for temperature ``eps`` and these potentials."""
        if level != 1:
            return pairs
        xy, yx, xx, yy = self.full
        t = self.backend.truncated
        cut = t(xy, f_ba, g_ab, eps)
        out = (cut, self.backend.transposed(cut, yx))  # one kernel for both cross updates
        out += (t(xx, f_aa, f_aa, eps), t(yy, g_bb, g_bb, eps)) if self.debias else (None, None)
        kept = {"xy": out[0].kept_fraction, "yx": out[1].kept_fraction}
        if self.debias:
            kept.update(xx=out[2].kept_fraction, yy=out[3].kept_fraction)
        self.info["pairs_kept_fraction"] = kept
        return out

    def refine(self, old, new, f_ba, g_ab, f_aa, g_bb, eps):
        """Potentials on the points from those on the centroids (computed at temperature ``eps``)."""
        be, cx, cy = self.backend, self.rows, self.cols
        xc, yc = cx.centroids[None], cy.centroids[None]
        ac_log, bc_log = log_weights(cx.weights[None]), log_weights(cy.weights[None])

        def extend(points, centroids, w_log, h):
            return _extend(be, self.rho, eps, be.pair(points, centroids, self.cost), w_log, h)

        f = extend(self.x, yc, bc_log, g_ab)
        g = extend(self.y, xc, ac_log, f_ba)
        if not self.debias:
            return f, g, None, None
        return f, g, extend(self.x, xc, ac_log, f_aa), extend(self.y, yc, bc_log, g_bb)


class _Pyramid:
    r"""The coarse-to-fine protocol of the grid backend (engine/grid.py): image pyramids.

    Each measure has its own pyramid (2 x 2 sum pooling down to one node); schedule step i
    runs on the coarsest level of each pyramid whose cell is at most :math:`\sigma_i =
    \varepsilon_i^{1/p}` (GeomLoss's rule), and always on the finest levels at the last step,
    whatever the blur (GeomLoss's solver accepts only blurs between one and two pixels for
    its levels to line up). A level is a pair (level of A, level of B). When it changes, the
    potentials are carried over by one exact softmin of the new nodes against the old
    potentials (a c-transform, not an interpolation), which works between any two grids.
    """

    finest = (0, 0)
    refine_is_update = True

    def __init__(self, backend, x, a, y, b, cost, eps_list, debias, rho):
        from ..engine.grid import pyramid

        self.backend, self.cost, self.debias, self.rho = backend, cost, debias, rho
        self.lx, self.ly = pyramid(backend.layout_of(x)), pyramid(backend.layout_of(y))
        self.wx, self.wy = [a], [b]
        for lay in self.lx[:-1]:
            self.wx.append(lay.pool(self.wx[-1]))
        for lay in self.ly[:-1]:
            self.wy.append(lay.pool(self.wy[-1]))
        sigmas = [e ** (1.0 / cost.p) for e in eps_list]
        self.keys = [(_level(self.lx, s), _level(self.ly, s)) for s in sigmas[:-1]] + [self.finest]
        jumps = [i for i in range(1, len(self.keys)) if self.keys[i] != self.keys[i - 1]]
        self.info = {
            "levels": [[list(self.lx[i].shape), list(self.ly[j].shape)] for i, j in
                       dict.fromkeys(self.keys)],
            "jump_steps": jumps,
        }

    def level_at(self, i: int):
        return self.keys[i]

    def pairs(self, level):
        i, j = level
        lx, ly, pair, cost = self.lx[i], self.ly[j], self.backend.pair, self.cost
        xy, yx = pair(None, None, cost, rows=lx, cols=ly), pair(None, None, cost, rows=ly, cols=lx)
        if not self.debias:
            return xy, yx, None, None
        return xy, yx, pair(None, None, cost, rows=lx, cols=lx), pair(None, None, cost, rows=ly, cols=ly)

    def weights(self, level):
        return self.wx[level[0]], self.wy[level[1]]

    def truncate(self, level, pairs, *potentials):
        return pairs

    def refine(self, old, new, f_ba, g_ab, f_aa, g_bb, eps):
        """Potentials on the nodes of level ``new`` from those on level ``old``."""
        (i0, j0), (i1, j1) = old, new
        be, cost = self.backend, self.cost
        ax_log, by_log = log_weights(self.wx[i0]), log_weights(self.wy[j0])

        def extend(rows, cols, w_log, h):
            return _extend(be, self.rho, eps, be.pair(None, None, cost, rows=rows, cols=cols), w_log, h)

        f = extend(self.lx[i1], self.ly[j0], by_log, g_ab)
        g = extend(self.ly[j1], self.lx[i0], ax_log, f_ba)
        if not self.debias:
            return f, g, None, None
        return (f, g, extend(self.lx[i1], self.lx[i0], ax_log, f_aa),
                extend(self.ly[j1], self.ly[j0], by_log, g_bb))


def _level(levels, sigma: float) -> int:
    """Index of the coarsest level whose cell is at most ``sigma`` (0 if none is)."""
    best = 0
    for k, lay in enumerate(levels):
        if lay.cell <= sigma:
            best = k
    return best


def _dot(w: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (w * f).sum(-1)


def _sinkhorn_value(a, b, f_ba, g_ab, f_aa, g_bb, eps: float, rho: float | None):
    r"""The divergence from the final potentials, with exact envelope gradients.

    Balanced (REFERENCE.md): :math:`\langle a, f_{ba} - f_{aa}\rangle + \langle b, g_{ab} - g_{bb}\rangle`
    (debiased) or :math:`\langle a, f_{ba}\rangle + \langle b, g_{ab}\rangle`.

    Unbalanced: with :math:`E_{ab} = \langle a, e^{-f_{ba}/\rho}\rangle` (the mass of the plan)
    and :math:`m_a, m_b` the masses, the dual objective at the optimum is

    .. math::
        OT = \rho(m_a + m_b) + \varepsilon m_a m_b - (\rho + \varepsilon/2)(E_{ab} + E_{ba}),

    which is REFERENCE.md's :math:`(\rho+\varepsilon/2)[\langle a, 1-e^{-f/\rho}\rangle + ...]`
    when :math:`m_a = m_b = 1`, and the debiased value is
    :math:`(\rho+\varepsilon/2)(E_{aa} + E_{bb} - E_{ab} - E_{ba}) - \tfrac{\varepsilon}{2}(m_a-m_b)^2`.
    The envelope theorem gives the derivatives
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

    m_a, m_b = a.sum(-1), b.sum(-1)
    value = rho * (m_a + m_b) + eps * m_a * m_b - exp_mass(a, f_ba) - exp_mass(b, g_ab)
    if f_aa is not None:  # minus half of OT(a, a) and of OT(b, b)
        value = value - (rho * m_a + (eps / 2) * m_a * m_a - exp_mass(a, f_aa))
        value = value - (rho * m_b + (eps / 2) * m_b * m_b - exp_mass(b, g_bb))
    return value

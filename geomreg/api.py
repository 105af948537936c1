"""The library's front door: :func:`divergence`.

Inputs are :class:`~geomreg.measure.Measure` objects, numpy arrays or torch tensors
(``(N, D)``, or ``(B, N, D)`` batches); everything is validated here, once, then handed
to one loss on one backend.
"""

from __future__ import annotations

import platform
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import defaults
from ._version import __version__
from .engine import BackendChoice, Cost, choose_backend, get_backend
from .errors import BackendUnavailable, InputError, ParameterError
from .losses import hausdorff_loss, kernel_loss, sinkhorn_loss
from .measure import Measure
from .params import check_params
from .results import DivergenceResult, StepLog
from .schedule import EpsilonSchedule, estimate_steps

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def divergence(
    x: Any,
    y: Any,
    *,
    a: Any = None,
    b: Any = None,
    loss: str = "sinkhorn",
    p: int = defaults.P,
    blur: float = defaults.BLUR,
    reach: float | None = None,
    diameter: float | None = None,
    scaling: float = defaults.SCALING,
    debias: bool = True,
    tol: float = defaults.TOL,
    max_iter: int = defaults.MAX_ITER,
    backend: str = "auto",
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    normalize: bool = True,
    potentials: bool = False,
    on_step: Callable[[StepLog], None] | None = None,
    cost: str | None = None,
    truncate: float | None = None,
    cluster_scale: float | None = None,
    field: bool = False,
    on_result: Callable[[DivergenceResult], None] | None = None,
    init: Any = None,
    certify: bool = True,
    fixed_target: bool = False,
) -> DivergenceResult:
    r"""Divergence between two (weighted) point clouds, as defined in docs/theory.md.

    Args:
        x: source points: a Measure, or an ``(N, D)`` / ``(B, N, D)`` array or tensor.
        y: target points, same kinds; same D (and same B for batches).
        a: source weights ``(N,)`` / ``(B, N)``; default: the Measure's, else uniform 1/N.
        b: target weights, likewise.
        loss: ``sinkhorn``, ``hausdorff``, ``energy``, ``gaussian`` or ``laplacian``.
        p: cost exponent for sinkhorn and hausdorff: 1 (``|x-y|``) or 2 (``|x-y|^2/2``).
        blur: sigma; the temperature is eps = blur ** p; the kernel width for gaussian and
            laplacian; unused by energy.
        reach: unbalanced OT with rho = reach ** p (sinkhorn only); None: balanced.
        diameter: largest distance scale for the schedule; default: the diagonal of the
            bounding box of both clouds.
        scaling: ratio in (0, 1) between successive blur scales of the schedule.
        debias: Sinkhorn divergence S_eps (True) or entropic OT_eps (False).
        tol: stop when every marginal error is <= tol; ``math.inf`` runs GeomLoss's
            schedule exactly and nothing more.
        max_iter: most Sinkhorn iterations, schedule steps included.
        backend: ``"auto"`` or a registered backend name. ``auto`` takes ``grid`` when both
            inputs are density images (or both volumes) read with their grid, for sinkhorn
            with p = 2 and for gaussian; the values and potentials then live on every pixel
            of each grid, zero-mass pixels included.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` (or ``"cuda:1"``); default: the device of
            tensor inputs, else auto (CUDA when torch sees a GPU).
        dtype: ``"float32"`` or ``"float64"``; default: that of float tensor inputs, else
            float32.
        normalize: scale both weight vectors to total mass 1 (the CLI's default; its
            ``--keep-mass`` sets this to False).
        potentials: also return the dual potentials ``(F, G)``.
        on_step: callback receiving each Sinkhorn :class:`StepLog` as it completes.
        cost: a KeOps formula in the variables X and Y replacing the ground cost of sinkhorn
            and hausdorff, e.g. ``"SqDist(X,Y)/2"`` (the default for p = 2) or
            ``"Norm2(X-Y)"``; needs the online backend (``auto`` picks it). ``p`` still sets
            eps = blur ** p.
        truncate: multiscale backend: drop the pairs whose transport weight is below
            ``exp(-truncate)`` of their row's best (Sinkhorn; default 6 for p = 2, 15 for
            p = 1), or whose kernel is below ``exp(-truncate)`` (gaussian, laplacian;
            default 25).
        cluster_scale: multiscale backend: side of the grid cells that form the clusters;
            default diameter / (sqrt(D) * 2000 ** (1/D)).
        field: sinkhorn: also return the displacement field ``(N, D)`` of the source points
            (``result.field``): the barycentre of each point's row of the transport plan
            minus, when debiased, that of the plan from the source to itself (minus the
            point itself otherwise). Balanced, it equals :math:`-\nabla_{x_i} S / a_i`.
        on_result: callback receiving the :class:`DivergenceResult` before it is returned;
            functions that call ``divergence`` many times and pass their extra keyword
            arguments on (:func:`geomreg.register`, :func:`geomreg.flow`) let a caller see
            each evaluation (backend, device, dtype) this way.
        init: sinkhorn: a warm start, an earlier :class:`DivergenceResult` (or its
            ``duals``) of a problem with as many points and the same blur, p, reach and
            debias, e.g. the previous step of a gradient flow. The epsilon schedule is
            skipped: the iterations start at the final temperature from its potentials. The
            same problem again costs a few iterations; points that moved along the field
            by 5% took 29 instead of 44 (blur 0.05), by 20% about as many as a cold start.
        certify: sinkhorn: compute ``result.error_bound`` (three more softmins; None when
            False). A gradient flow, which evaluates the loss at every step, skips it.
        fixed_target: sinkhorn with ``init`` and debias: the target (y, b) is the one
            ``init`` was solved for, so its potential for the target's transport to itself
            is kept as it is instead of being solved again (a gradient flow moves the
            source only). The value then has no gradient with respect to y through that
            term.

    Returns:
        A :class:`DivergenceResult`; ``result.value`` is differentiable with respect to
        tensor inputs that require gradients (points and weights).

    Raises:
        ParameterError: a parameter outside its domain.
        InputError: inconsistent inputs (dimensions, masses, non-finite values).
        BackendUnavailable: the backend cannot run this problem here.
    """
    loss, p, blur, reach, tol, max_iter = check_params(loss, p, blur, reach, scaling, tol,
                                                       max_iter, diameter)
    dev = _resolve_device(device, x, y)
    dt = _resolve_dtype(dtype, x, y)
    if init is not None:
        if loss != "sinkhorn":
            raise ParameterError("init", f"warm starts apply to sinkhorn, not {loss}")
        init = getattr(init, "duals", init)
    if fixed_target and (init is None or not debias):
        raise ParameterError("fixed_target", "keeps the target's own potential of init: it needs init "
                             "and debias")
    if field and loss != "sinkhorn":
        raise ParameterError("field", f"needs loss sinkhorn, not {loss}")
    grid_problem = _grid_problem(x, y, loss, p, cost)
    use_grid = backend == "grid" or (backend == "auto" and grid_problem is None)
    if backend == "grid" and grid_problem is not None:
        raise ParameterError("backend", f"grid: {grid_problem}")
    layouts = None
    if use_grid:  # every pixel of each grid becomes a node (zero-mass pixels included)
        (xs, a_t, x_name, lay_a), (ys, b_t, y_name, lay_b) = (
            _grid_tensors(x, a, dev, dt), _grid_tensors(y, b, dev, dt))
        layouts = (lay_a, lay_b)
        support = [x.points, y.points]  # the pixels with mass, for the default diameter
    else:
        xs, a_t, x_name = _as_tensors(x, a, "x", dev, dt)
        ys, b_t, y_name = _as_tensors(y, b, "y", dev, dt)
    batched = xs.dim() == 3
    if not batched:
        xs, a_t, ys, b_t = xs[None], a_t[None], ys[None], b_t[None]
    _check_pair(xs, ys, x_name, y_name)
    if normalize:
        a_t = a_t / a_t.sum(-1, keepdim=True)
        b_t = b_t / b_t.sum(-1, keepdim=True)
    m_a, m_b = a_t.sum(-1).detach(), b_t.sum(-1).detach()
    # normalised masses are equal by construction: in float32 they are 1 within rounding (20 000
    # weights of 1e-7 summed to 1 + 6e-7 and were refused); given masses are compared in float64
    if loss == "sinkhorn" and reach is None and not normalize:
        gap = (a_t.detach().double().sum(-1) - b_t.detach().double().sum(-1)).abs().max().item()
        if gap > 1e-6 * max(m_a.max().item(), m_b.max().item()):
            raise InputError(
                "normalize",
                f"total masses differ ({m_a.max().item():.6g} vs {m_b.max().item():.6g}); "
                "balanced OT needs equal masses: give --reach for unbalanced OT, or "
                "normalise the weights",
            )

    # Translation-invariant losses: centre once, for float32 accuracy far from the origin.
    if layouts is not None:  # grids stay where they are ([0, 1]^D already)
        pts = np.concatenate(support)
        bbox_diameter = float(np.linalg.norm(pts.max(0) - pts.min(0)))
    else:
        with torch.no_grad():
            lo = torch.minimum(xs.reshape(-1, xs.shape[-1]).min(0).values,
                               ys.reshape(-1, ys.shape[-1]).min(0).values)
            hi = torch.maximum(xs.reshape(-1, xs.shape[-1]).max(0).values,
                               ys.reshape(-1, ys.shape[-1]).max(0).values)
            centre = (lo + hi) / 2
            bbox_diameter = float((hi - lo).norm())
        xs, ys = (xs - centre).to(dt), (ys - centre).to(dt)
        for pts, name in ((xs, x_name), (ys, y_name)):
            if not torch.isfinite(pts.detach()).all():
                raise InputError(name, f"coordinates too large for {str(dt).removeprefix('torch.')}")

    if cost is not None:
        if loss not in ("sinkhorn", "hausdorff"):
            raise ParameterError("cost", f"applies to sinkhorn and hausdorff, not {loss}")
        if not (isinstance(cost, str) and cost.strip()):
            raise ParameterError("cost", "must be a KeOps formula in X and Y, e.g. 'SqDist(X,Y)/2'")
        if backend == "tensorized":
            raise ParameterError("cost", "a KeOps formula needs --backend online (or auto)")
        backend = "online"
    if layouts is not None:
        why = "requested" if backend == "grid" else "both inputs are density grids (images or volumes)"
        choice = BackendChoice("grid", why)
    else:
        choice = choose_backend(
            backend, n=xs.shape[1], m=ys.shape[1], dim=xs.shape[2],
            itemsize=xs.element_size(), memory_bytes=_available_memory(xs.device),
            device_type=xs.device.type, batch=xs.shape[0],
            self_pairs=not (loss == "sinkhorn" and not debias),
        )
    if choice.name != "multiscale" and backend == "auto":
        truncate = cluster_scale = None  # knobs of a backend that auto did not pick
    engine = get_backend(choice.name, truncate=truncate, cluster_scale=cluster_scale,
                         layouts=layouts)

    # Every key is always present (None where it does not apply): one result shape.
    params: dict[str, Any] = dict.fromkeys(
        ("p", "blur", "eps", "reach", "rho", "diameter", "scaling", "debias", "tol", "max_iter")
    )
    params["cost"] = cost
    t0 = _now(xs.device)
    if loss == "sinkhorn":
        d = bbox_diameter if diameter is None else float(diameter)
        n_steps = estimate_steps(p, d, blur, scaling)
        if n_steps + 1 > max_iter and init is None:  # a warm start skips the schedule
            raise ParameterError(
                "max_iter",
                f"the schedule alone needs {n_steps + 1} iterations (diameter {d:.4g}, blur "
                f"{blur:g}, scaling {scaling:g}), more than --max-iter {max_iter}",
            )
        schedule = EpsilonSchedule(p, d, blur, scaling)
        out = sinkhorn_loss(engine, xs, a_t, ys, b_t, p=p, schedule=schedule, reach=reach,
                            debias=debias, tol=tol, max_iter=max_iter, on_step=on_step,
                            cost_formula=cost, field=field, init=init, certify=certify,
                            fixed_target=fixed_target)
        params.update(p=p, blur=blur, eps=schedule.eps, reach=reach,
                      rho=None if reach is None else reach**p, diameter=d, scaling=scaling,
                      debias=debias, tol=tol, max_iter=max_iter)
    elif loss == "hausdorff":
        out = hausdorff_loss(engine, xs, a_t, ys, b_t, p=p, blur=blur, cost_formula=cost)
        params.update(p=p, blur=blur, eps=blur**p)
    else:
        out = kernel_loss(engine, xs, a_t, ys, b_t, name=loss, blur=blur, potentials=potentials)
        params.update(blur=None if loss == "energy" else blur)
    elapsed = _now(xs.device) - t0

    value = out.values if batched else out.values[0]
    plan = None
    if out.plan is not None and not batched and layouts is None:
        from .transport import TransportPlan

        plan = TransportPlan(engine, Cost(p, cost), out.plan["eps"], xs.detach(), ys.detach(),
                             a_t.detach(), out.plan["h_ab"], out.plan["h_aa"], centre,
                             out.plan["f_ba"], out.plan["rho"])
    disp = None
    if out.field is not None:
        disp = out.field if batched else out.field[0]
    pots = None
    if potentials:
        f, g = out.potentials
        pots = (f, g) if batched else (f[0], g[0])
    result = DivergenceResult(
        value=value,
        loss=loss,
        params=params,
        n_points=(xs.shape[1], ys.shape[1]),
        dim=xs.shape[2],
        masses=(m_a.tolist(), m_b.tolist()) if batched else (m_a.item(), m_b.item()),
        backend=choice.name,
        backend_reason=choice.reason,
        device=str(xs.device),
        dtype=str(xs.dtype).replace("torch.", ""),
        converged=out.converged,
        n_iter=out.n_iter,
        marginal_error=out.marginal_error,
        schedule=out.steps,
        potentials=pots,
        time_s=elapsed,
        versions=versions(),
        multiscale=out.engine_info if choice.name == "multiscale" else None,
        grid=out.engine_info if choice.name == "grid" else None,
        backend_fallback=choice.fallback,
        field=disp,
        plan=plan,
        error_bound=out.error_bound,
        duals=out.duals,
    )
    if on_result is not None:
        on_result(result)
    return result


#: the largest seed :func:`seed_everything` takes (numpy's global generator needs 32 bits)
SEED_MAX = 2**32 - 1


def seed_everything(seed: int) -> int:
    """Seed every random generator a computation may draw from: Python's, numpy's, torch's.

    ``random.seed``, ``numpy.random.seed`` and ``torch.manual_seed`` (the CPU and every CUDA
    device). geomreg's own computations draw no random numbers today (the starting rotations
    of :func:`geomreg.register` are the principal-axis alignments, subsampling is by voxels);
    the command line seeds anyway, before any computation, so that whatever does draw (a
    future option, a library it calls) is fixed by ``--seed``. Seeding does not make CUDA's
    non-deterministic kernels deterministic.

    Returns:
        The seed, as an int.

    Raises:
        ParameterError: ``seed`` is not an integer from 0 to :data:`SEED_MAX`.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= SEED_MAX:
        raise ParameterError("seed", f"must be an integer from 0 to {SEED_MAX}, got {seed!r}")
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


def versions() -> dict[str, str]:
    """Versions that a result depends on."""
    return {
        "geomreg": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _resolve_device(device, x, y) -> torch.device:
    if device is None:
        for t in (x, y):
            if isinstance(t, torch.Tensor):
                return t.device
        device = "auto"
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ParameterError("device", f"unknown device {device!r}: auto, cpu or cuda") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("device", "cuda requested but torch sees no CUDA GPU here")
    if dev.type not in ("cpu", "cuda"):
        raise ParameterError("device", f"unsupported device {device!r}: auto, cpu or cuda")
    return dev


def _resolve_dtype(dtype, x, y) -> torch.dtype:
    if dtype is None:
        for t in (x, y):
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float64):
                return t.dtype
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ParameterError("dtype", f"must be float32 or float64, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ParameterError("dtype", f"must be float32 or float64, got {dtype!r}")
    return DTYPES[dtype]


def _as_tensors(x, w, name, dev, dt):
    """Points ``(N, D)``/``(B, N, D)`` and weights ``(N,)``/``(B, N)`` as tensors."""
    if isinstance(x, Measure):
        name = x.source
        if w is None:
            w = x.weights
        x = x.points
    pts = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float64))
    if pts.dim() == 1:
        pts = pts[:, None]
    if pts.dim() not in (2, 3):
        raise InputError(name, f"expected (N, D) or (B, N, D) points, found shape {tuple(pts.shape)}")
    if pts.shape[-2] < 1 or pts.shape[-1] < 1:
        raise InputError(name, f"needs at least 1 point of dimension >= 1, found {tuple(pts.shape)}")
    # in the input's precision (at least dt) until centred: a float32 cast of coordinates
    # of ~4e6 (UTM) would round them to steps of 0.5 before the centre is subtracted
    pts = pts.to(device=dev, dtype=torch.promote_types(pts.dtype, dt) if pts.is_floating_point()
                 else torch.float64)
    if not torch.isfinite(pts.detach()).all():
        raise InputError(name, "non-finite coordinate (NaN or inf)")
    n = pts.shape[-2]
    if w is None:
        wt = torch.full(pts.shape[:-1], 1.0 / n, device=dev, dtype=dt)
    else:
        wt = w if isinstance(w, torch.Tensor) else torch.as_tensor(np.asarray(w, dtype=np.float64))
        wt = wt.to(device=dev, dtype=dt)
        if tuple(wt.shape) != tuple(pts.shape[:-1]):
            raise InputError(name, f"expected weights of shape {tuple(pts.shape[:-1])}, "
                             f"found {tuple(wt.shape)}")
        wd = wt.detach()
        if not torch.isfinite(wd).all():
            raise InputError(name, "non-finite weight")
        if (wd < 0).any():
            raise InputError(name, "negative weight; weights must be >= 0")
        if not (wd.sum(-1) > 0).all():
            raise InputError(name, "all weights are zero; a measure needs positive total mass")
    return pts, wt, name


def _grid_problem(x, y, loss, p, cost) -> str | None:
    """Why the grid backend cannot take this problem, or None when it can."""
    gx = x.grid if isinstance(x, Measure) else None
    gy = y.grid if isinstance(y, Measure) else None
    if gx is None or gy is None:
        return "needs two density images or volumes (.png, rank-3 .npy, or .npy with --as-image)"
    if len(gx.shape) != len(gy.shape):
        return f"a {len(gx.shape)}-D grid and a {len(gy.shape)}-D grid cannot be compared"
    if loss not in ("sinkhorn", "gaussian"):
        return f"computes sinkhorn and gaussian, not {loss}; the point backends compute it"
    if cost is not None:
        return "a KeOps formula cost needs the online backend"
    if loss == "sinkhorn" and p != 2:
        return ("the cost |x-y| (p = 1) does not separate over the axes (its separable form "
                "would be the L1 cost); use p = 2 or a point backend")
    return None


def _grid_tensors(m: Measure, w, dev, dt):
    """Nodes ``(H*W, D)``, weights ``(H*W,)`` (zeros off the support), name and layout."""
    from .engine.grid import image_layout

    g = m.grid
    layout = image_layout(g.shape, g.spacing, g.dims, dtype=dt, device=dev)
    weights = m.weights if w is None else np.asarray(
        w.detach().cpu() if isinstance(w, torch.Tensor) else w, dtype=np.float64).reshape(-1)
    if weights.shape[0] != m.n:
        raise InputError(m.source, f"expected {m.n} weights (one per pixel with mass), "
                         f"found {weights.shape[0]}")
    full = torch.as_tensor(g.full(weights), device=dev, dtype=dt)
    return layout.points(), full, m.source, layout


def _check_pair(xs, ys, x_name, y_name):
    if xs.shape[-1] != ys.shape[-1]:
        raise InputError(y_name, f"points have dimension {ys.shape[-1]} but {x_name} has "
                         f"dimension {xs.shape[-1]}")
    if xs.shape[0] != ys.shape[0]:
        raise InputError(y_name, f"batch of {ys.shape[0]} but {x_name} has a batch of "
                         f"{xs.shape[0]}")


def _available_memory(device: torch.device) -> int | None:
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()

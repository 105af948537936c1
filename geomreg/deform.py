r"""Smooth non-rigid warps fitted by optimal transport: kernel splines and LDDMM diffeomorphisms.

A warp :math:`\phi` moves *any* point, not only the points it was fitted on. It is a global
transform :math:`T` (rigid, similarity or affine: :func:`geomreg.register`) followed by a
smooth deformation carried by ``K`` control points :math:`c_k` and a Gaussian kernel of
width :math:`\sigma`, :math:`K_\sigma(x, c) = \exp(-|x - c|^2 / 2\sigma^2)`:

* ``spline``: :math:`\phi(x) = z + v(z)`, :math:`z = T x`, with the displacement
  :math:`v(z) = \sum_k K_\sigma(z, c_k)\, \alpha_k` (one vector :math:`\alpha_k` per control
  point). Its smoothness is the norm of :math:`v` in the kernel's reproducing-kernel Hilbert
  space, :math:`\|v\|_K^2 = \sum_{k,l} K_\sigma(c_k, c_l)\, \alpha_k \cdot \alpha_l`.
* ``diffeo`` (LDDMM, geodesic shooting): momenta :math:`p_k` on the control points
  :math:`q_k` evolve for unit time by Hamilton's equations of
  :math:`H(q, p) = \tfrac12 \sum_{k,l} K_\sigma(q_k, q_l)\, p_k \cdot p_l`,
  :math:`\dot q_k = \sum_l K_\sigma(q_k, q_l)\, p_l` and
  :math:`\dot p_k = \sum_l (p_k \cdot p_l)\, K_\sigma(q_k, q_l)\, (q_k - q_l) / \sigma^2`,
  and every point moves with the velocity field they carry,
  :math:`\dot z = \sum_k K_\sigma(z, q_k)\, p_k` (``steps`` explicit Euler steps). The flow of
  a smooth velocity field is a diffeomorphism of the whole space: no folding, invertible. The
  smoothness is :math:`H(q_0, p_0)`, the kinetic energy of the geodesic (twice it is its
  squared length).

**Fitting** minimises :math:`E = S_\varepsilon(\phi_\# \alpha, \beta) + \tfrac{\lambda}{2} R / n_\sigma`,
with :math:`S_\varepsilon` the Sinkhorn divergence (``blur``, ``reach`` as everywhere),
:math:`R` the smoothness above (:math:`\|v\|_K^2`, or :math:`2H`) and :math:`n_\sigma` the
number of cubes of side :math:`\sigma` that the source occupies. A displacement of size
:math:`u` over the whole shape has :math:`R \approx n_\sigma u^2` whatever the shape's size or
dimension, so :math:`\lambda` weighs a mean squared displacement against the data term's mean
squared distance: it is dimensionless, and one default fits curves, surfaces and volumes. Each outer iteration
solves one Sinkhorn problem at the current warp (warm-started from the previous one's
potentials, also across levels) and takes the barycentres :math:`y_i` that the plan sends the moved points
:math:`\phi(x_i)` to, with the mass :math:`w_i` each sends (``field``): for ``p = 2`` the
quadratic :math:`\tfrac12 \sum_i w_i |\phi(x_i) - y_i|^2` has the divergence's gradient at
the current warp, so minimising it plus :math:`\tfrac{\lambda}{2} R` is a majorise-minimise
(EM-like) step, as in coherent point drift but with a transport plan in place of CPD's
N x M Gaussian mixture. For the spline that step is one ``K x K`` linear solve,
:math:`(G^\top W G + \lambda K_{CC})\,\alpha = G^\top W (y - z)` with
:math:`G_{ik} = K_\sigma(z_i, c_k)`, and the coefficients go ``OVER_RELAX`` times the way
from their current values to its solution; for the diffeomorphism, a few L-BFGS iterations on the
initial momenta, warm-started. Points that send little mass (with ``reach``: outliers, parts
missing from the other scan) barely count, and the smoothness carries the warp across them.
Blurs go coarse to fine, from ``WARP_FROM`` blurs, each ``WARP_RATIO`` times the next, at
most ``fits`` outer iterations each (a level ends once no point moves by more than
``FIT_STOP`` blurs).

The warp is fitted on both clouds resampled to about ``FIT_POINTS`` points (the mean of each
occupied cube, with its mass): a warp smooth at the scale :math:`\sigma` is fixed by a
sampling much finer than :math:`\sigma`, and it then moves every point of the source (and
any other: :meth:`Warp.__call__`), a hundred thousand points in the time of a few kernel
products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError, ParameterError

#: the clouds the warp is fitted on hold about this many points (resampled when larger)
FIT_POINTS = 2000
#: default kernel width, as a share of the diagonal of the clouds' bounding box
SIGMA_PER_SPAN = 0.15
#: default smoothness weight lambda (dimensionless, see the module's docstring)
LAMBDA = 0.1
#: without ``controls``, control points are the means of cubes of this many sigmas
CONTROL_SPACING = 0.5
#: at most this many control points (the spacing grows when there would be more)
MAX_CONTROLS = 2000
#: a level ends once an outer iteration moves no point by more than this many blurs
FIT_STOP = 0.05
#: the spline's outer iterations go this many times the majorise-minimise step (over-relaxed):
#: bench_warp's cases at 5000 points, seeds 0-2, 1.5 and 4 iterations per level against 1 and 5:
#: landmark errors no higher in 8 of the 9 cases (the fish 1.75, 2.62, 2.94 % against 1.85,
#: 2.84, 3.15 %; one bunny 1.59 against 1.58 %), the fits 0.1-0.3 s shorter
OVER_RELAX = 1.5
#: ``register`` allows a warp's fit at least this many outer iterations per level (``fits`` when
#: larger); a level still ends early once no point moves by more than ``FIT_STOP`` blurs
WARP_FITS = 4
#: L-BFGS iterations per outer iteration of the diffeomorphism
DIFFEO_LBFGS = 8
#: the diffeomorphism's surrogate is fitted on the weighted means of cubes of this many sigmas
#: (see :func:`_cell_means`)
DIFFEO_CELL = 0.25
#: time steps of the geodesic shooting (explicit Euler on unit time)
DIFFEO_STEPS = 10
#: rows of the N x K kernel matrices computed at once when warping many points
CHUNK = 8192
KINDS = ("spline", "diffeo")
#: after the global stage the blurs start at this many times ``blur`` (at most an eighth of the span)
WARP_FROM = 4.0
#: ... and go down to ``blur`` by this ratio at most (3 levels from WARP_FROM = 4): on
#: bench_warp's cases at 5000 points, seeds 0-2, the same errors within 0.05 point as the 4
#: levels of ``register``'s default ``levels`` and 0.2-0.3 s less; 2 levels erred up to 0.2
#: point more and took no less
WARP_RATIO = 2.0
#: the nearest-neighbour stage's Tukey cut-offs go from this many blurs down to ``SURFACE_TO``
SURFACE_FROM, SURFACE_TO = 4.0, 0.5


def gaussian(x: torch.Tensor, c: torch.Tensor, sigma: float) -> torch.Tensor:
    r"""The ``(N, K)`` kernel matrix :math:`\exp(-|x_i - c_k|^2 / 2\sigma^2)`.

    Both sets are centred on the controls' first point first: the expanded squared distance
    would otherwise lose every digit to cancellation far from the origin (a LAS tile's offset).
    """
    if len(c):
        x, c = x - c[:1], c - c[:1]
    d2 = ((x * x).sum(1)[:, None] + (c * c).sum(1)[None, :] - 2 * x @ c.T).clamp_min(0)
    return torch.exp(-d2 / (2 * sigma * sigma))


def _velocity_jacobian(z: torch.Tensor, c: torch.Tensor, coef: torch.Tensor, sigma: float) -> torch.Tensor:
    r"""``(N, D, D)``: the Jacobian of :math:`v(z) = \sum_k K(z, c_k) a_k`.

    It is :math:`-\sum_k K(z, c_k)\, a_k (z - c_k)^\top / \sigma^2`.
    """
    k = gaussian(z, c, sigma)  # (N, K)
    first = torch.einsum("nk,kd,ne->nde", k, coef, z)  # sum_k K a_k z^T
    second = torch.einsum("nk,kd,ke->nde", k, coef, c)  # sum_k K a_k c_k^T
    return -(first - second) / (sigma * sigma)


@dataclass(frozen=True)
class Warp:
    r"""A fitted warp: the global transform ``matrix``, then (unless ``kind`` is ``linear``) a smooth part.

    Attributes:
        kind: ``linear`` (the matrix alone), ``spline`` or ``diffeo``.
        matrix: ``(D + 1, D + 1)`` float64 homogeneous transform applied first.
        controls: ``(K, D)`` control points, in the coordinates after ``matrix``.
        coefficients: ``(K, D)``: the spline's vectors :math:`\\alpha_k`, or the diffeomorphism's
            initial momenta :math:`p_k`.
        sigma: the kernel width.
        steps: the diffeomorphism's Euler steps (0 for the others).
    """

    kind: str
    matrix: torch.Tensor
    controls: torch.Tensor | None = None
    coefficients: torch.Tensor | None = None
    sigma: float = 0.0
    steps: int = 0

    @property
    def dim(self) -> int:
        """The dimension D of the points."""
        return self.matrix.shape[0] - 1

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``T . x``: the global transform alone."""
        d = self.dim
        return x @ self.matrix[:d, :d].T.to(x) + self.matrix[:d, d].to(x)

    def trajectory(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Diffeomorphism: the control points and momenta ``(q_t, p_t)`` at each Euler step."""
        return _shoot(self.controls, self.coefficients, self.sigma, self.steps)

    def __call__(self, x: Any) -> torch.Tensor:
        """The warped points ``phi(x)``, ``(N, D)`` float64 (computed ``CHUNK`` rows at a time)."""
        x = _as_points(x, self.dim)
        z = self.linear(x)
        if self.kind == "linear":
            return z
        path = self.trajectory() if self.kind == "diffeo" else None
        out = [self._smooth(z[i:i + CHUNK], path) for i in range(0, len(z), CHUNK)]
        return torch.cat(out) if out else z

    def _smooth(self, z: torch.Tensor, path) -> torch.Tensor:
        if self.kind == "spline":
            return z + gaussian(z, self.controls, self.sigma) @ self.coefficients
        return _flow_points(z, path, self.sigma)

    def jacobian_determinants(self, x: Any) -> torch.Tensor:
        r"""``(N,)``: :math:`\det D\phi` at each point (negative where the warp folds space)."""
        x = _as_points(x, self.dim)
        d = self.dim
        base = float(torch.linalg.det(self.matrix[:d, :d]))
        if self.kind == "linear":
            return torch.full((len(x),), base, dtype=torch.float64)
        z = self.linear(x)
        eye = torch.eye(d, dtype=z.dtype)
        parts = []
        for i in range(0, len(z), CHUNK):
            zi = z[i:i + CHUNK]
            if self.kind == "spline":
                parts.append(torch.linalg.det(eye + _velocity_jacobian(zi, self.controls, self.coefficients,
                                                                       self.sigma)))
                continue
            det = torch.ones(len(zi), dtype=z.dtype)  # the Euler map's Jacobians multiply up
            path = self.trajectory()
            dt = 1.0 / self.steps
            for q, p in path[:-1]:
                det = det * torch.linalg.det(eye + dt * _velocity_jacobian(zi, q, p, self.sigma))
                zi = zi + dt * gaussian(zi, q, self.sigma) @ p
            parts.append(det)
        return base * torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def shifted(self, offset: Any) -> Warp:
        r"""The same warp in coordinates moved by ``offset``: :math:`x \mapsto \phi(x - o) + o`.

        A warp fitted on points relative to an origin ``o`` (a LAS file's offset) is
        ``warp.shifted(o)`` in the file's own coordinates. The Gaussian kernel depends on
        differences only, so the smooth part just moves its control points by ``o``.
        """
        o = torch.as_tensor(np.asarray(offset, dtype=np.float64).reshape(-1))
        if o.shape != (self.dim,):
            raise ParameterError("offset", f"must be {self.dim} numbers, got shape {tuple(o.shape)}")
        if not bool(o.any()):
            return self
        moved = conjugate(self.matrix, o)
        controls = None if self.controls is None else self.controls + o
        return Warp(self.kind, moved, controls, self.coefficients, self.sigma, self.steps)

    def smoothness(self) -> float:
        r"""The regularisation :math:`R`: :math:`\|v\|_K^2` (spline) or :math:`2H(q_0, p_0)` (diffeo)."""
        if self.kind == "linear":
            return 0.0
        return float(_energy(self.controls, self.coefficients, self.sigma))

    def save(self, path: str | Path) -> None:
        """Write the warp to ``path`` (``.npz``); :meth:`load` reads it back."""
        arrays = {"format": np.array("geomreg-warp-1"), "kind": np.array(self.kind),
                  "matrix": self.matrix.double().numpy(), "sigma": np.array(self.sigma),
                  "steps": np.array(self.steps)}
        if self.kind != "linear":
            arrays.update(controls=self.controls.double().numpy(),
                          coefficients=self.coefficients.double().numpy())
        with open(path, "wb") as fh:  # a handle: np.savez would append .npz to other names
            np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> Warp:
        """Read a warp written by :meth:`save`; a file that is not one raises :class:`InputError`."""
        where = str(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                data = {k: f[k] for k in f.files}
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(where, f"not a geomreg warp (.npz): {exc}") from None
        if str(data.get("format", "")) != "geomreg-warp-1":
            raise InputError(where, "not a geomreg warp (no format entry 'geomreg-warp-1')")
        kind = str(data.get("kind", ""))
        matrix = data.get("matrix")
        if kind not in ("linear", *KINDS) or matrix is None or matrix.ndim != 2 \
                or matrix.shape[0] != matrix.shape[1] or not 2 <= matrix.shape[0] <= 4:
            raise InputError(where, "corrupt warp: bad kind or matrix")
        d = matrix.shape[0] - 1
        kw: dict[str, Any] = {"sigma": float(data.get("sigma", 0.0)), "steps": int(data.get("steps", 0))}
        if kind != "linear":
            c, a = data.get("controls"), data.get("coefficients")
            if c is None or a is None or c.ndim != 2 or c.shape != a.shape or c.shape[1] != d \
                    or not kw["sigma"] > 0 or (kind == "diffeo" and kw["steps"] < 1):
                raise InputError(where, "corrupt warp: controls, coefficients, sigma or steps")
            kw.update(controls=torch.as_tensor(c, dtype=torch.float64),
                      coefficients=torch.as_tensor(a, dtype=torch.float64))
        arrays = [matrix, *(v.numpy() for v in (kw.get("controls"), kw.get("coefficients")) if v is not None)]
        if not all(np.isfinite(v).all() for v in arrays):
            raise InputError(where, "corrupt warp: non-finite numbers")
        return cls(kind, torch.as_tensor(matrix, dtype=torch.float64), **kw)


def conjugate(matrix: Any, offset: Any) -> torch.Tensor:
    """The homogeneous ``matrix`` in coordinates moved by ``offset``: translate(o) . M . translate(-o)."""
    m = torch.as_tensor(np.asarray(matrix, dtype=np.float64)).clone()
    d = m.shape[0] - 1
    o = torch.as_tensor(np.asarray(offset, dtype=np.float64).reshape(-1))
    m[:d, d] = m[:d, d] + o - m[:d, :d] @ o
    return m


def _as_points(x: Any, d: int) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x, dtype=np.float64))
    if x.dim() != 2 or x.shape[1] != d:
        raise ParameterError("points", f"the warp moves (N, {d}) points, got shape {tuple(x.shape)}")
    return x


def _energy(c: torch.Tensor, coef: torch.Tensor, sigma: float) -> torch.Tensor:
    r""":math:`\sum_{k,l} K(c_k, c_l)\, a_k \cdot a_l`."""
    return (coef * (gaussian(c, c, sigma) @ coef)).sum()


def _shoot(q: torch.Tensor, p: torch.Tensor, sigma: float, steps: int):
    """Hamilton's equations of ``H = 1/2 p^T K(q, q) p``, explicit Euler: ``[(q_t, p_t)]``, t = 0..steps."""
    dt = 1.0 / steps
    path = [(q, p)]
    for _ in range(steps):
        k = gaussian(q, q, sigma)
        dots = (p @ p.T) * k  # (p_k . p_l) K_kl
        dp = (dots.sum(1, keepdim=True) * q - dots @ q) / (sigma * sigma)
        q, p = q + dt * (k @ p), p + dt * dp
        path.append((q, p))
    return path


def _flow_points(z: torch.Tensor, path, sigma: float) -> torch.Tensor:
    dt = 1.0 / (len(path) - 1)
    for q, p in path[:-1]:
        z = z + dt * gaussian(z, q, sigma) @ p
    return z


# ----------------------------------------------------------------------------------------------
# fitting


@dataclass(frozen=True)
class Fit:
    """What :func:`fit_warp` returns: the warp, the divergence and regularisation it ended at."""

    warp: Warp
    value: float
    smoothness: float
    n_fits: int
    levels: list[dict]


def control_points(z: torch.Tensor, w: torch.Tensor | None, sigma: float, controls: Any) -> torch.Tensor:
    """The control points: ``"all"``: ``z``; a count: about that many cube means; None: cubes of sigma / 2."""
    from .registration import _side_for, _voxel_means

    if controls == "all":
        return z.clone()
    if controls is None:
        side = CONTROL_SPACING * sigma
        centres, _ = _voxel_means(z, w, side)
        if len(centres) <= MAX_CONTROLS:
            return centres
        controls = MAX_CONTROLS
    if not (isinstance(controls, int) and controls >= 1):
        raise ParameterError("controls", f"must be a count >= 1 or 'all', got {controls!r}")
    if controls >= len(z):
        return z.clone()
    return _voxel_means(z, w, _side_for(z, controls))[0]


def fit_warp(kind: str, z: torch.Tensor, y: torch.Tensor, base: Warp, *, blur: float, reach: float | None,
             fits: int, sigma: float, lam: float, controls: Any, steps: int,
             kw: dict, surface: torch.Tensor | None = None) -> Fit:
    """Fit the smooth part of a warp: ``z`` the source after ``base`` (resampled), ``y`` the target.

    ``kw`` carries the divergence's other arguments (``a``, ``b``: the weights of ``z`` and ``y``).
    """
    from .api import divergence
    from .defaults import TOL
    from .registration import REACH_PER_BLUR, _cells, _fit_options

    if kind not in KINDS:
        raise ParameterError("model", f"the smooth part is one of {', '.join(KINDS)}, not {kind!r}")
    c = control_points(z, kw.get("a"), sigma, controls)
    lam = lam / len(torch.unique(_cells(z, sigma), dim=0))  # per cube of side sigma
    gram = gaussian(c, c, sigma)
    g = gaussian(z, c, sigma) if kind == "spline" else None
    cells = None if kind == "spline" else torch.unique(_cells(z, DIFFEO_CELL * sigma), return_inverse=True)[1]
    span = float(torch.cat([z, y]).amax(0).sub(torch.cat([z, y]).amin(0)).norm())
    start = max(min(span / 8, WARP_FROM * blur), blur)
    count = 1 + math.ceil(math.log(start / blur) / math.log(WARP_RATIO) - 1e-9)  # log 4 / log 2 may round up
    blurs = np.geomspace(start, blur, count).tolist()
    moved, coef, n_fits, trace = z, torch.zeros_like(c), 0, []

    def improve(target: torch.Tensor, w: torch.Tensor) -> float:
        """One majorise-minimise step towards ``target`` (weights ``w``); returns the largest move."""
        nonlocal moved, coef, n_fits
        if kind == "spline":
            coef = coef + OVER_RELAX * (_spline_step(g, gram, z, target, w, lam) - coef)
            now = z + g @ coef
        else:
            coef = _diffeo_step(c, coef, *_cell_means(cells, z, target, w), lam, sigma, steps)
            now = _flow_points(z, _shoot(c, coef, sigma, steps), sigma).detach()
        n_fits += 1
        shift = float((now - moved).norm(dim=1).max())
        moved = now
        return shift

    # followed by the nearest-neighbour stage, transport only has to bring the warp into its
    # basin: float32, where the compiled multiscale kernel runs, with the options of
    # register's transport fits (its tolerance)
    loop_kw = kw if surface is None else dict(kw, dtype="float32") | _fit_options(kind, True, kw)
    r = None  # each fit starts from the last one's potentials, a new level's first as an epsilon-scaling step
    for eps in blurs:
        level_reach = None if reach is None else max(reach, REACH_PER_BLUR * eps)
        for i in range(fits):  # y does not move: a warm start keeps its own potential (fixed_target)
            r = divergence(moved, y, blur=eps, reach=level_reach, field=True, init=r, certify=False,
                           fixed_target=i > 0 and loop_kw.get("debias", True), **loop_kw)
            if improve(moved + r.field.to(moved), r.plan.row_mass().to(moved)) < FIT_STOP * eps:
                break
        trace.append({"blur": eps, "fits": n_fits, "value": float(r.value)})
    if surface is not None:  # each point to the neighbour mean of its nearest target point
        from . import surface as surf

        tgt = surf.Target(surface)
        a = kw["a"].to(z)
        for s in np.geomspace(SURFACE_FROM * blur, SURFACE_TO * blur, 5).tolist():
            for _ in range(fits):
                idx, dist = tgt.index.query(moved)
                if improve(tgt.planes(idx[:, 0])[0].to(z), a * surf.tukey(dist[:, 0] / s)) < FIT_STOP * s:
                    break
        trace.append({"surface": True, "fits": n_fits})
    warp = Warp(kind, base.matrix, c, coef.detach(), sigma, steps if kind == "diffeo" else 0)
    # the value at the fitted warp, from the last solve's potentials (at this blur: the schedule is
    # skipped), to the caller's tolerance, in the fits' dtype (bench_warp's bunny at 5000 points:
    # 0.20 s, against 0.79 s in float64)
    final = divergence(moved, y, blur=blur, reach=reach, certify=False, init=r,
                       **dict(loop_kw, tol=kw.get("tol", TOL)))
    return Fit(warp, float(final.value), warp.smoothness(), n_fits, trace)


def _spline_step(g, gram, z, target, w, lam):
    r"""The coefficients minimising :math:`\sum_i w_i |z_i + (G\alpha)_i - y_i|^2 + \lambda R`."""
    gw = g * w[:, None]
    lhs = g.T @ gw + lam * gram
    lhs = lhs + 1e-10 * float(lhs.diagonal().mean()) * torch.eye(len(gram), dtype=lhs.dtype)
    rhs = gw.T @ (target - z)
    return torch.linalg.solve(lhs, rhs)


def _cell_means(cells: torch.Tensor, z: torch.Tensor, target: torch.Tensor, w: torch.Tensor):
    r"""The surrogate's data on cubes: per cube, the weighted means of ``z`` and ``target`` and their mass.

    Within a cube of mass :math:`W` and weighted means :math:`\bar z, \bar y`,
    :math:`\sum_i w_i |\phi(z_i) - y_i|^2 = W |\phi(\bar z) - \bar y|^2 + \sum_i w_i
    |(\phi(z_i) - \phi(\bar z)) - (y_i - \bar y)|^2`, the cross term vanishing when
    :math:`\phi` is affine on the cube; the last sum, the cube's inner mismatch, is what the
    means leave out. Cubes with no mass are dropped.
    """
    k = int(cells.max()) + 1
    mass = torch.zeros(k, dtype=z.dtype).index_add_(0, cells, w)
    zs = torch.zeros(k, z.shape[1], dtype=z.dtype).index_add_(0, cells, z * w[:, None])
    ts = torch.zeros(k, z.shape[1], dtype=z.dtype).index_add_(0, cells, target * w[:, None])
    keep = mass > 0
    return zs[keep] / mass[keep, None], ts[keep] / mass[keep, None], mass[keep]


def _diffeo_step(c, p0, z, target, w, lam, sigma, steps):
    """A few L-BFGS iterations on the initial momenta for the quadratic surrogate plus ``lam * H``."""
    p = p0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([p], max_iter=DIFFEO_LBFGS, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        end = _flow_points(z, _shoot(c, p, sigma, steps), sigma)
        loss = 0.5 * (w * (end - target).pow(2).sum(1)).sum() + 0.5 * lam * _energy(c, p, sigma)
        loss.backward()
        return loss

    opt.step(closure)
    return p.detach()


def default_sigma(x: torch.Tensor, y: torch.Tensor) -> float:
    """``SIGMA_PER_SPAN`` times the diagonal of both clouds' bounding box."""
    both = torch.cat([x, y])
    return SIGMA_PER_SPAN * float((both.amax(0) - both.amin(0)).norm())


def check_options(sigma: float | None, lam: float, steps: int) -> None:
    """Raise :class:`ParameterError` for a sigma, lambda or steps out of their domain."""
    if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
        raise ParameterError("sigma", f"must be a positive length, got {sigma}")
    if not (lam > 0 and math.isfinite(lam)):
        raise ParameterError("lam", f"must be a positive number, got {lam}")
    if not (isinstance(steps, int) and steps >= 1):
        raise ParameterError("steps", f"must be an integer >= 1, got {steps}")

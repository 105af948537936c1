r"""Surface refinement of a global transform: robust point-to-plane fits on nearest neighbours.

Transport matches *densities*. Two scans of one surface are rarely sampled alike (independent
subsamples, different scanners, a cropped target), and the divergence is then lowest away
from the true pose: on the bunny, the transport fit started *at* the truth ended 0.4 to 6
degrees off (README, "register"). The distance of a point to the other *surface* does not
depend on how either is sampled, so :func:`geomreg.register` ends with this local refinement,
started from the transport fit:

* both clouds are seen at one scale: each point stands for the mean :math:`c` of its ``k``
  nearest neighbours in its own cloud (which averages out a scan's noise; on a curved surface
  the means sit slightly inside it, alike on both sides), and the target's neighbours give
  the unit normal :math:`n_j`, their direction of least spread;
* each source point :math:`z_i` is paired with its nearest target point :math:`y_j`, and the
  distance minimised is that to the target's plane, :math:`n_j \cdot (c_i - c_j)`
  (point-to-plane);
* each pair is weighted by Tukey's biweight of :math:`|z_i - y_j| / s`: pairs further than
  ``s`` apart (the part of a scan outside the overlap, outliers) count for nothing;
* each iteration is one Gauss-Newton step for the model's parameters (the point-to-plane
  distances are linear in them near the identity); the scale ``s`` is lowered from a few
  blurs to half a blur, so that the basin stays wide and the end is precise.

Nearest neighbours come from Open3D's search (a dependency already); nothing N x M is held.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: neighbours whose spread gives a target point's normal
NORMAL_NEIGHBOURS = 12
#: iterations at each scale; an iteration that moves no point by more than
#: ``STOP_SHARE`` of the scale ends the scale early (``PASS_SHARE`` before the last scale,
#: whose pose only has to be inside the next scale's basin)
ITERATIONS, STOP_SHARE, PASS_SHARE = 30, 1e-4, 1e-2
#: the largest rotation of one Gauss-Newton step (radians): a step computed from few pairs
#: can be wild, and a long rotation is better taken in several steps anyway
MAX_TURN = 0.1


class Index:
    """A cloud prepared for repeated nearest-neighbour queries: Open3D's search, built once.

    Open3D's search was the fastest measured here on the Stanford bunny scans (40 097 queries
    against 40 256 points, k = 1, 2 cores): 38 ms, against 45 ms for pykdtree and 343 ms for
    SciPy's cKDTree (unbounded queries); building it takes 8 ms, which a registration that
    queries one target a hundred times pays once.
    """

    def __init__(self, points: torch.Tensor):
        import open3d as o3d

        self.points = points
        self._search = o3d.core.nns.NearestNeighborSearch(o3d.core.Tensor(_pad(points)))
        self._search.knn_index()

    def query(self, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest points of each query: indices and distances, ``(Q, k)`` each."""
        import open3d as o3d

        idx, d2 = self._search.knn_search(o3d.core.Tensor(_pad(queries)), min(k, self.points.shape[0]))
        return (torch.as_tensor(idx.numpy().astype(np.int64)),
                torch.as_tensor(d2.numpy()).clamp_min(0).sqrt())


def _pad(p: torch.Tensor) -> np.ndarray:
    """float64 coordinates in 3-D (Open3D searches in 3-D; lower dimensions get zeros)."""
    a = np.zeros((p.shape[0], max(3, p.shape[1])))
    a[:, : p.shape[1]] = p.detach().cpu().double().numpy()
    return a


def nearest(points: torch.Tensor, queries: torch.Tensor, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest ``points`` of each query: indices and distances, ``(Q, k)`` each."""
    return Index(points).query(queries, k)


def tangent_planes(points: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The plane fitted through each point's ``k`` nearest neighbours: ``(M, D)`` centres, unit normals.

    The centre is the neighbours' mean (which averages out the noise of a scan), the normal
    their direction of least variance.
    """
    idx, _ = nearest(points, points, k or NORMAL_NEIGHBOURS)
    return _plane_fit(points[idx])


def _plane_fit(nb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and the direction of least variance of each group of neighbours ``(M, k, D)``."""
    centres = nb.mean(1)
    c = nb - centres[:, None]
    cov = c.transpose(1, 2) @ c
    if cov.shape[-1] == 3:
        return centres, _least_direction(cov)
    _, vecs = torch.linalg.eigh(cov)
    return centres, vecs[:, :, 0]


def _least_direction(cov: torch.Tensor) -> torch.Tensor:
    r"""``(M, 3)`` unit eigenvectors of the smallest eigenvalues of symmetric PSD matrices ``(M, 3, 3)``.

    In closed form, 3 times faster than a batched ``eigh`` (0.69 against 2.0 ms on 2000
    matrices, 2 threads): the
    smallest eigenvalue from the trigonometric solution of the characteristic cubic (Smith
    1961), :math:`\lambda = q + 2p\cos(\arccos(\det B / 2)/3 + 2\pi/3)` with
    :math:`q = \operatorname{tr} A / 3`, :math:`p^2 = \|A - qI\|_F^2 / 6`,
    :math:`B = (A - qI)/p`; then the largest cross product of two rows of
    :math:`A - \lambda I`, which is orthogonal to both and so spans its kernel. Where the
    matrix is a multiple of the identity (``p = 0``), every direction qualifies.
    """
    m = cov.double()
    q = m.diagonal(dim1=1, dim2=2).sum(-1) / 3
    shifted = m - q[:, None, None] * torch.eye(3, dtype=m.dtype)
    p = (shifted.square().sum((1, 2)) / 6).sqrt()
    safe = p.clamp_min(1e-300)
    r = (torch.linalg.det(shifted / safe[:, None, None]) / 2).clamp(-1, 1)
    lam = q + 2 * p * torch.cos(torch.acos(r) / 3 + 2 * math.pi / 3)
    rows = m - lam[:, None, None] * torch.eye(3, dtype=m.dtype)
    pairs = ((0, 1), (0, 2), (1, 2))
    cands = torch.stack([torch.linalg.cross(rows[:, i], rows[:, j]) for i, j in pairs], 1)  # (M, 3, 3)
    norms = cands.norm(dim=-1)
    best = norms.argmax(1)
    pick = torch.arange(len(m))
    v = cands[pick, best] / norms[pick, best].clamp_min(1e-300)[:, None]
    v = torch.where((norms[pick, best] > 0)[:, None], v, torch.tensor([0.0, 0.0, 1.0], dtype=m.dtype))
    return v.to(cov.dtype)


#: a :class:`Target` of at most this many points computes every tangent plane at its first
#: query instead of those of the queried points only
EAGER_PLANES = 20000


class Target:
    """The cloud that :func:`refine` moves onto: its search index and, in 2-D and 3-D, its tangent planes.

    A point's plane is computed the first time a query lands on it (a registration touches a
    fraction of a large scan's points), then kept; a cloud of at most ``EAGER_PLANES`` points
    gets every plane at the first query, which costs less than the piecemeal fits and their
    bookkeeping (bench_warp's spiral at 5000 points: the refinement of its two best starts
    0.54 s -> 0.33 s; all the planes of 5000 points take 11 ms, of 40 000 75 ms, where a
    registration of the Stanford scans touches a fraction of them).
    """

    def __init__(self, points: torch.Tensor):
        self.points = points
        self.index = Index(points)
        d = points.shape[1]
        self.has_planes = d > 1 and points.shape[0] > d
        self._centres = torch.zeros_like(points)
        self._normals = torch.zeros_like(points)
        self._done = torch.zeros(points.shape[0], dtype=torch.bool)
        self._all = False  # every plane computed

    def spacing(self, sample: int = 500) -> float:
        """The median distance from a point to its nearest neighbour (over ``sample`` spread points)."""
        if self.points.shape[0] < 2:
            return 0.0
        step = max(1, self.points.shape[0] // sample)
        return float(self.index.query(self.points[::step], 2)[1][:, 1].median())

    def noise(self, sample: int = 500) -> float:
        r"""A robust scale of the points' scatter across the surface (0 without planes).

        The median of :math:`|(p - c) \cdot n|` over ``sample`` spread points p, with c and n
        the plane fitted through p's k neighbours, times 1.4826 (which makes the median absolute
        value of a gaussian its standard deviation) and :math:`\sqrt{k / (k - D)}` (the plane's
        D parameters absorb part of the scatter, as in a least-squares fit's residuals): about
        the standard deviation of gaussian noise across the surface (0.0099 for 0.01 across a
        plane); on a clean scan, only the small offsets that the surface's curvature gives.
        """
        if not self.has_planes:
            return 0.0
        rows = torch.arange(0, self.points.shape[0], max(1, self.points.shape[0] // sample))
        centres, normals = self.planes(rows)
        k, d = min(NORMAL_NEIGHBOURS, self.points.shape[0]), self.points.shape[1]
        scale = 1.4826 * math.sqrt(k / max(k - d, 1))
        return scale * float(((self.points[rows] - centres) * normals).sum(1).abs().median())

    def planes(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The tangent planes at the points ``rows``: centres and unit normals, ``(len(rows), D)`` each."""
        if self._all:
            return self._centres[rows], self._normals[rows]
        if self.points.shape[0] <= EAGER_PLANES:
            self._all = True
            todo = torch.arange(self.points.shape[0])
        else:
            todo = rows[~self._done[rows]].unique()
        if len(todo):
            idx, _ = self.index.query(self.points[todo], NORMAL_NEIGHBOURS)
            self._centres[todo], self._normals[todo] = _plane_fit(self.points[idx])
            self._done[todo] = True
        return self._centres[rows], self._normals[rows]


def tukey(r: torch.Tensor) -> torch.Tensor:
    """Tukey's biweight of the scaled residuals ``r``: (1 - r^2)^2 below 1, else 0."""
    return torch.where(r < 1, (1 - r.square()).square(), torch.zeros_like(r))


def overlap(z: torch.Tensor, y: torch.Tensor | Target, scale: float, a: torch.Tensor | None = None,
            queries: int | None = None) -> float:
    """Mass-weighted mean of Tukey's biweight of each point's distance to the other cloud, both ways.

    1 when every point of each cloud lies on the other; the share of the clouds that overlap
    within ``scale``, otherwise. Used to choose between candidate poses. ``y`` may be a
    prepared :class:`Target`. ``queries``: each side's mean runs over at most this many of its
    points, evenly spaced in their order (the distances are still to the whole other cloud).
    """
    target = y if isinstance(y, Target) else None
    yp = y.points if isinstance(y, Target) else y
    step_z, step_y = _stride(len(z), queries), _stride(len(yp), queries)
    zq, aq = z[::step_z], None if a is None else a[::step_z]
    _, d_zy = (target.index if target is not None else Index(yp)).query(zq)
    _, d_yz = Index(z).query(yp[::step_y])
    return _both_ways(d_zy[:, 0], aq, d_yz[:, 0], scale)


def _stride(n: int, queries: int | None) -> int:
    """The step that takes at most ``queries`` of ``n`` rows, evenly spaced (1: all of them)."""
    return 1 if queries is None else max(1, -(-n // queries))


def _both_ways(d_zy: torch.Tensor, a: torch.Tensor | None, d_yz: torch.Tensor, scale: float) -> float:
    """The mean of the biweights of the distances one way (weighted by ``a``) and back, halved."""
    w = tukey(d_zy / scale)
    there = float(w.mean() if a is None else (a * w).sum() / a.sum())
    return 0.5 * (there + float(tukey(d_yz / scale).mean()))


def pose_overlap(source: Target, target: Target, lin: torch.Tensor, t: torch.Tensor, scale: float,
                 a: torch.Tensor | None = None, queries: int | None = None) -> float:
    """:func:`overlap` of the source moved by ``(lin, t)`` and the target, both prepared once.

    When ``lin`` is a rotation times a scale s (rigid, similarity), the moved source's nearest
    point to a target point y is the source's nearest to the inverse image of y, at s times
    that distance: the source's own index serves every pose (no index of the moved cloud is
    built, 8 ms at 40 000 points). Otherwise (affine) the moved cloud is indexed.
    """
    x, yp = source.points, target.points
    d = x.shape[1]
    gram = lin.T @ lin
    s2 = float(torch.trace(gram)) / d
    if not float((gram - s2 * torch.eye(d, dtype=gram.dtype)).abs().max()) <= 1e-9 * s2:
        return overlap(x @ lin.T + t, target, scale, a, queries)
    step_z, step_y = _stride(len(x), queries), _stride(len(yp), queries)
    _, d_zy = target.index.query(x[::step_z] @ lin.T + t)
    _, d_yz = source.index.query((yp[::step_y] - t) @ torch.linalg.inv(lin).T)
    return _both_ways(d_zy[:, 0], None if a is None else a[::step_z], math.sqrt(s2) * d_yz[:, 0], scale)


def refine(
    x: torch.Tensor,
    y: torch.Tensor | Target,
    lin: torch.Tensor,
    t: torch.Tensor,
    scales: list[float],
    model: str = "rigid",
    a: torch.Tensor | None = None,
    centres: torch.Tensor | None = None,
    iterations: int = ITERATIONS,
    source: Target | None = None,
    back: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Refine ``z = x @ lin.T + t`` onto ``y``'s surface, at each of ``scales`` in turn.

    Args:
        x: ``(N, D)`` source points; ``y``: ``(M, D)`` target points (D = 1, 2 or 3), or a
            :class:`Target` prepared once for several refinements.
        lin, t: the starting transform.
        scales: Tukey's cut-off distances, largest first.
        model: ``rigid``, ``similarity`` or ``affine`` (see :func:`geomreg.register`).
        a: ``(N,)`` source weights (uniform when None).
        centres: ``(N, D)`` the mean of each source point's neighbours in its own cloud (when
            ``x`` is a subsample of a larger scan, the means in the scan, e.g. the centres of
            :meth:`Target.planes`); default: in ``x``.
        iterations: most iterations at each scale.
        source, back: the whole source scan prepared as a :class:`Target`, and rows of the
            target: each of those target points is also paired with the nearest moved source
            point and its tangent plane (a symmetric objective). A target point always has a
            counterpart on the source when the *target* is the cropped one, a source point
            when the source is: both directions together keep either crop from biasing the fit.

    Returns:
        The refined ``(lin, t)`` and the number of iterations run.
    """
    poses, iters = refine_many(x, y, [(lin, t)], scales, model, a, centres, iterations, source, back)
    return (*poses[0], iters)


def refine_many(
    x: torch.Tensor,
    y: torch.Tensor | Target,
    poses: list[tuple[torch.Tensor, torch.Tensor]],
    scales: list[float],
    model: str = "rigid",
    a: torch.Tensor | None = None,
    centres: torch.Tensor | None = None,
    iterations: int = ITERATIONS,
    source: Target | None = None,
    back: torch.Tensor | None = None,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """:func:`refine` from each of several ``poses`` at once: the refined poses and the iterations run.

    Each pose's iterations are those :func:`refine` runs from it alone (the same results);
    the poses still running share one search of the target per iteration (and one fit of
    new planes), which is what an iteration on a few hundred points mostly costs.
    """
    from .registration import _fit

    d = x.shape[1]
    target = y if isinstance(y, Target) else Target(y)
    y = target.points
    # the source is seen at the same scale: each point by its neighbours' mean (a curved
    # surface's means sit slightly inside it, the same on both sides; exact when x == y)
    if not target.has_planes or x.shape[0] <= d:
        xc = x
    else:
        xc = centres if centres is not None else tangent_planes(x)[0]
    w0 = torch.ones(x.shape[0], dtype=x.dtype) if a is None else a
    poses, iters = list(poses), 0
    for last, s in enumerate(scales, 1 - len(scales)):
        stop = (STOP_SHARE if last == 0 else PASS_SHARE) * s
        running = list(range(len(poses)))
        for _ in range(iterations):
            if not running:
                break
            z = torch.stack([x @ poses[k][0].T + poses[k][1] for k in running])
            idx, dist = target.index.query(z.reshape(-1, d))
            js = idx[:, 0].reshape(len(running), -1)
            ws = w0 * tukey(dist[:, 0].reshape(len(running), -1) / s)
            if target.has_planes:
                qs, ns = (p.reshape(len(running), -1, d) for p in target.planes(js.reshape(-1)))
            still = []
            for r, k in enumerate(running):
                (lin, t), j, w = poses[k], js[r], ws[r]
                if not float(w.sum()) > 0:
                    continue
                if not target.has_planes:  # points on a line, or too few for planes: point-to-point
                    new_lin, new_t = _fit(model, x, y[j], w)
                else:
                    z_c, q, n = xc @ lin.T + t, qs[r], ns[r]
                    if back is not None:  # and each target point to the moved source's planes
                        more = _backward_pairs(target, back, source, lin, t, s, float(w0.mean()))
                        # each direction weighted by the square of its share of pairs within s: in a
                        # crop, the side whose points all have counterparts leads (bench: 4 crop+noise+
                        # outlier cases of 1.12, 0.68, 1.04, 0.66 deg -> 0.87, 0.60, 1.01, 0.52)
                        w = w * _share(w) ** 2
                        more = (*more[:3], more[3] * _share(more[3]) ** 2)
                        z_c, q, n, w = (torch.cat(pair) for pair in zip((z_c, q, n, w), more, strict=True))
                    step, shift = _plane_step(z_c, q, n, w, model)
                    new_lin, new_t = step @ lin, step @ t + shift
                iters += 1
                moved = float((x @ new_lin.T + new_t - z[r]).norm(dim=1).max())
                poses[k] = (new_lin, new_t)
                if moved >= stop:
                    still.append(k)
            running = still
    return poses, iters


def _share(w: torch.Tensor) -> float:
    """The share of pairs with a positive weight."""
    return float((w > 0).double().mean())


def _backward_pairs(target: Target, rows: torch.Tensor, source: Target, lin: torch.Tensor,
                    t: torch.Tensor, scale: float, weight: float):
    """Target rows paired with the moved source's planes, as :func:`_plane_step`'s arguments.

    Returns the moved source plane points, the target rows' centres, the moved normals and
    the weights. The target points are mapped back into the source's frame (the inverse transform), so that
    the source's index, built once, serves every pose. Normals move by the inverse transpose.
    """
    yq = target.points[rows]
    inv = torch.linalg.inv(lin)
    i = source.index.query((yq - t) @ inv.T)[0][:, 0]
    cx, nx = source.planes(i)
    m = nx @ inv
    m = m / m.norm(dim=1, keepdim=True).clamp_min(1e-300)
    dist = (source.points[i] @ lin.T + t - yq).norm(dim=1)
    return cx @ lin.T + t, target.planes(rows)[0], m, weight * tukey(dist / scale)


def _plane_step(z: torch.Tensor, q: torch.Tensor, n: torch.Tensor, w: torch.Tensor, model: str):
    r"""The small transform ``(M, u)`` minimising :math:`\sum_i w_i (n_i \cdot (M z_i + u - q_i))^2` (linear).

    Near the identity every residual is linear in the step's parameters: with
    :math:`M \approx I + [\omega]_\times` (rigid; in 2-D :math:`\omega` is one angle),
    :math:`(1 + \sigma) (I + [\omega]_\times)` (similarity) or :math:`I + A` (affine), the
    residual is :math:`n_i \cdot (z_i - q_i)` plus :math:`(z_i \times n_i) \cdot \omega`,
    :math:`\sigma\, n_i \cdot z_i`, :math:`n_i^\top A z_i`, and :math:`n_i \cdot u`. The weighted
    normal equations are solved (with a tiny ridge for directions the surface leaves free,
    such as the axis of a cylinder); a step turning (or deforming) by more than ``MAX_TURN``
    is shortened; the rotation is then the exact one of angle :math:`|\omega|`.
    """
    d = z.shape[1]
    if model == "affine":
        cols = [(n[:, :, None] * z[:, None, :]).reshape(len(z), d * d)]
    else:
        cols = [torch.linalg.cross(z, n) if d == 3 else (z[:, 0] * n[:, 1] - z[:, 1] * n[:, 0])[:, None]]
        if model == "similarity":
            cols.append((z * n).sum(1, keepdim=True))
    rows = torch.cat([*cols, n], dim=1)
    res = ((z - q) * n).sum(1)
    h = (rows * w[:, None]).T @ rows
    h = h + 1e-9 * torch.trace(h) * torch.eye(h.shape[0], dtype=h.dtype)
    step = torch.linalg.solve(h, -(rows * (w * res)[:, None]).sum(0))
    k = rows.shape[1] - d  # parameters of the linear part
    turn = float(step[:k].norm())
    if turn > MAX_TURN:
        step = step * (MAX_TURN / turn)
    if model == "affine":
        return torch.eye(d, dtype=z.dtype) + step[:k].reshape(d, d), step[k:]
    omega = step[:3] if d == 3 else step[:1]
    rot = _rodrigues(omega) if d == 3 else _turn(omega[0])
    return (rot * (1 + step[k - 1]) if model == "similarity" else rot), step[k:]


def _turn(angle: torch.Tensor) -> torch.Tensor:
    """The 2-D rotation by ``angle``."""
    c, s = torch.cos(angle), torch.sin(angle)
    return torch.stack([torch.stack([c, -s]), torch.stack([s, c])])


def _rodrigues(omega: torch.Tensor) -> torch.Tensor:
    """The rotation of angle ``|omega|`` about ``omega``."""
    th = omega.norm()
    k = torch.zeros(3, 3, dtype=omega.dtype)
    k[0, 1], k[0, 2], k[1, 2] = -omega[2], omega[1], -omega[0]
    k = k - k.T
    if float(th) < 1e-12:
        return torch.eye(3, dtype=omega.dtype) + k
    return torch.eye(3, dtype=omega.dtype) + torch.sin(th) / th * k + (1 - torch.cos(th)) / th**2 * k @ k

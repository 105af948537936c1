r"""Multiscale backend: clusters, coarse-to-fine Sinkhorn, block-sparse reductions (D <= 3).

Points are grouped in the cells of a regular grid of side ``cluster_scale``; cells are
numbered along a Morton (Z-order) curve, so that clusters with nearby numbers are nearby in
space. Every reduction then runs over *blocks*: a tile of consecutive row clusters
(at least :data:`TILE_ROWS` points) against the union of the column clusters kept for it.
Each block is a dense torch computation of a few MiB, so memory stays linear in N + M.

Which blocks are kept (kernel truncation):

- Sinkhorn (:meth:`MultiscaleBackend.truncated`): the coarse problem between cluster
  centroids is solved first and its potentials extrapolated to the points; then, at each
  new epsilon, a tile of rows keeps the columns j for which an upper bound of the score
  :math:`s_{ij} = f_i + g_j - C(x_i, y_j)` over the tile's rows (:func:`truncate_pair`)
  reaches the tile's floor: :math:`\tau\varepsilon` below the least of its rows' best
  scores (a lower bound of each, from a few columns computed exactly). A dropped pair
  thus carries a transport-plan weight below :math:`e^{-\tau}` of the best pair of its
  row. Bounding over the tile's extent (not using centroid distances, as GeomLoss does)
  never drops a pair whose points are close although their centroids are not. The
  (y, x) pair keeps exactly the transpose of the (x, y) pair's kept set
  (:meth:`MultiscaleBackend.transposed`), so that both cross updates use one kernel.
- gaussian and laplacian kernels (``pair``): a block is dropped when the kernel at the
  clusters' smallest distance is below :math:`e^{-\tau_k}` (default
  :data:`KERNEL_TRUNCATE` = 25, i.e. 1.4e-11: the kernel sums are exact to float32).
- Cost pairs without potentials, the energy kernel and Hausdorff softmins keep every
  block: exact values, linear memory, dense speed.

The p = 2 softmin and the gaussian kernel expand :math:`\|x-y\|^2 = \|x\|^2 + \|y\|^2 -
2\langle x,y\rangle` around the block's rows' centroid (the expansion's rounding error then
scales with the block's extent, not with the cloud's). In float32 on the CPU without
autograd, the p = 2 softmins and the truncation's point screening run in a compiled kernel
(:mod:`.native`, 2.5 to 4 times the speed of the torch blocks); elsewhere each block is one
matrix product and a log-sum-exp in torch. Costs with square roots (p = 1, laplacian,
energy) use coordinate differences: exact at coincident points.

Gradients: when autograd needs a block, it is recomputed in the backward pass
(``torch.utils.checkpoint``), so no N x M intermediate is ever stored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from ..errors import ParameterError
from . import native
from .base import Backend, Cost, Duals, Kernel, Levels, Pairs, problem_pairs, safe_norm
from .tensorized import _logsumexp_last, squared_distances

#: rows per tile: a tile is a run of consecutive points in Morton order
TILE_ROWS = 256
#: columns per row tile whose scores are computed exactly to bound its rows' best scores
ROW_SAMPLE = 16
#: entries of one dense sub-block computed at once (~2 MiB in float32)
SUB_BLOCK = 1 << 19
#: largest memory for the stored kept columns of one truncated pair (runs of consecutive
#: columns, 8 bytes a run); beyond it each reduction screens the columns again
STORED_COLUMNS_BYTES = 1 << 28
#: default truncation of the Sinkhorn blocks, in units of epsilon, by cost exponent p. A
#: pair is dropped when its plan weight is below e^-tau of its row's best; the dropped
#: *mass* is larger, since far pairs are many: in 3-D it is about the tail of a chi-square
#: with 3 degrees of freedom beyond 2 tau for p = 2 (1.9% of a row at tau = 5, 0.74% at
#: tau = 6), and e^-tau (tau^2/2 + tau + 1) for p = 1 (12% at tau = 5, 4e-5 at tau = 15).
#: p = 2 uses 6: at 5, gradients on 500 points were 1.3e-4 off the dense ones (measured)
TRUNCATE = {1: 15.0, 2: 6.0}
#: default truncation of gaussian and laplacian kernel blocks: log-kernel below -25 is dropped
KERNEL_TRUNCATE = 25.0
#: default number of grid cells across the diameter's cube: cluster_scale = diameter /
#: (sqrt(D) * CELLS ** (1/D)), i.e. at most CELLS cells in the bounding cube
CELLS = 2000
#: points are sorted along a Morton curve 2 ** _SUB_BITS times finer than the clusters
_SUB_BITS = 8
#: bits per coordinate of the Morton code (3 x 21 bits fit in an int64)
_MORTON_BITS = 21


def default_cluster_scale(diameter: float, dim: int) -> float:
    """The grid cell size used when none is given: at most :data:`CELLS` cells in all."""
    return diameter / (math.sqrt(dim) * CELLS ** (1.0 / dim)) if diameter > 0 else 1.0


def _morton(q: torch.Tensor) -> torch.Tensor:
    """Z-order codes ``(N,)`` of non-negative integer grid coordinates ``q (N, D)``, D <= 3."""
    code = torch.zeros(q.shape[0], dtype=torch.int64, device=q.device)
    dim = q.shape[1]
    for bit in range(_MORTON_BITS):
        for d in range(dim):
            code |= ((q[:, d] >> bit) & 1) << (bit * dim + d)
    return code


@dataclass
class Clusters:
    """N points sorted along a Morton curve and grouped into K grid clusters.

    Sorting uses a grid 2 ** 8 times finer than the clusters, so that any run of
    consecutive sorted points is spatially compact (a tile), and every cluster (a cell of
    side ``scale``) is a run of consecutive sorted points.

    Attributes:
        perm: ``(N,)`` sorted order: ``points[perm]`` lists cluster 0's points, then 1's, ...
        inverse: ``(N,)`` inverse permutation: ``sorted[inverse] == points``.
        starts: ``(K + 1,)`` cluster k is ``sorted[starts[k]:starts[k + 1]]``.
        centroids: ``(K, D)`` weighted centroids (plain means for clusters of zero weight).
        weights: ``(K,)`` total weight of each cluster.
        radii: ``(K,)`` largest distance of a member to its centroid.
        scale: the grid cell size.
        tiles: ``[(r0, r1), ...]`` runs of sorted points that are octree cells of at most
            :data:`TILE_ROWS` points (consecutive small cells merged): the row tiles.
    """

    perm: torch.Tensor
    inverse: torch.Tensor
    starts: torch.Tensor
    centroids: torch.Tensor
    weights: torch.Tensor
    radii: torch.Tensor
    scale: float
    tiles: list[tuple[int, int]]

    @property
    def k(self) -> int:
        """Number of clusters."""
        return self.centroids.shape[0]


def grid_clusters(points: torch.Tensor, weights: torch.Tensor, scale: float) -> Clusters:
    """Cluster ``points (N, D)`` (D <= 3) in the cells of a grid of side ``scale``."""
    with torch.no_grad():
        pts, w = points.detach(), weights.detach()
        n, dim = pts.shape
        if dim > 3:
            raise ParameterError("backend", f"multiscale handles dimensions up to 3, not {dim}")
        cells = torch.floor((pts - pts.min(0).values) / scale)
        if float(cells.max()) >= 2 ** (_MORTON_BITS - _SUB_BITS):
            raise ParameterError("cluster_scale", f"{scale:g} is too small for the extent of the points")
        fine = torch.floor((pts - pts.min(0).values) * (2**_SUB_BITS / scale)).to(torch.int64)
        base = cells.to(torch.int64) * 2**_SUB_BITS  # the fine cell must lie in its coarse cell
        codes = _morton(torch.clamp(fine, min=base, max=base + 2**_SUB_BITS - 1))
        perm = torch.argsort(codes, stable=True)
        tiles = _octree_tiles(codes[perm], dim)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(n, device=perm.device)
        _, counts = torch.unique_consecutive(codes[perm] >> (dim * _SUB_BITS), return_counts=True)
        k = counts.shape[0]
        starts = _starts(counts)
        labels = torch.repeat_interleave(torch.arange(k, device=pts.device), counts)
        ps, ws = pts[perm], w[perm]
        wsum = torch.zeros(k, dtype=pts.dtype, device=pts.device).index_add_(0, labels, ws)
        wx = torch.zeros(k, dim, dtype=pts.dtype, device=pts.device).index_add_(0, labels, ws[:, None] * ps)
        plain = torch.zeros(k, dim, dtype=pts.dtype, device=pts.device).index_add_(0, labels, ps)
        plain = plain / counts[:, None].to(pts.dtype)
        centroids = torch.where(wsum[:, None] > 0, wx / wsum.clamp_min(1e-300)[:, None], plain)
        dist = (ps - centroids[labels]).norm(dim=1)
        radii = torch.zeros(k, dtype=pts.dtype, device=pts.device)
        radii = radii.scatter_reduce(0, labels, dist, reduce="amax", include_self=True)
    return Clusters(perm, inverse, starts, centroids, wsum, radii, float(scale), tiles)


def _octree_tiles(codes: torch.Tensor, dim: int) -> list[tuple[int, int]]:
    """Runs of sorted Morton ``codes`` that are octree cells of at most TILE_ROWS points.

    Going down the octree (one Morton digit of D bits per level), a run with more than
    TILE_ROWS points is cut where its next digit changes. Leaves are not merged: a plain cut
    every TILE_ROWS points, or merging neighbours on the curve, would sometimes join two
    distant parts of the Morton curve.
    """
    c = codes.cpu().numpy()
    n = c.shape[0]
    cuts = np.array([0, n])
    for level in range(_MORTON_BITS - 1, -1, -1):
        sizes = np.diff(cuts)
        if sizes.max(initial=0) <= TILE_ROWS:
            break
        prefix = c >> (dim * level)
        change = np.flatnonzero(prefix[1:] != prefix[:-1]) + 1
        segment = np.searchsorted(cuts, change, side="right") - 1
        cuts = np.union1d(cuts, change[sizes[segment] > TILE_ROWS])
    # identical codes (duplicate points) can leave a run above TILE_ROWS: cut it plainly
    tiles = []
    for r0, r1 in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
        tiles += [(k, min(k + TILE_ROWS, r1)) for k in range(r0, r1, TILE_ROWS)]
    return tiles


def _segment_max(v: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """Maximum of ``v`` over each run ``starts[k]:starts[k+1]``."""
    counts = starts[1:] - starts[:-1]
    labels = torch.repeat_interleave(torch.arange(counts.shape[0], device=v.device), counts)
    out = torch.full((counts.shape[0],), -math.inf, dtype=v.dtype, device=v.device)
    return out.scatter_reduce(0, labels, v, reduce="amax", include_self=True)


@dataclass
class Tile:
    """The sorted rows ``r0:r1`` (their kept columns: :meth:`BlockPair.columns`)."""

    r0: int
    r1: int


@dataclass
class BlockPair:
    """Rows and columns sorted along a Morton curve, their pair function, the kept blocks.

    ``x``/``y`` are the sorted points (differentiable gathers of the inputs), ``row_inverse``
    maps sorted results back to input order, ``col_perm`` puts column vectors in sorted
    order (None: identity). ``rows``/``cols`` are the clusters (None when not clustered).

    ``transposed``: the kept blocks are those of the transposed pair (tiles over the sorted
    columns, kept entries index the sorted rows), so that this pair keeps exactly the
    pairs (i, j) that the other one keeps as (j, i); see :meth:`MultiscaleBackend.transposed`.
    """

    x: torch.Tensor
    y: torch.Tensor
    fn: Cost | Kernel
    tiles: list[Tile]
    rows: Clusters | None = None
    cols: Clusters | None = None
    kept_pairs: int = 0
    screen: Screen | None = None
    transposed: bool = False
    #: the stored kept columns, as runs of consecutive sorted columns (Morton order makes
    #: them long: 12 columns on average at 20k points): tile t keeps ``lo[k]:hi[k]`` for k in
    #: ``ptr[t]:ptr[t+1]`` (int32 bounds, int64 offsets). None with ``screen`` None: every
    #: column
    runs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def columns(self, t: int) -> torch.Tensor | None:
        """Sorted indices (int32) of tile ``t``'s kept columns; None: every column."""
        if self.screen is not None:
            return self.screen.columns(t)
        if self.runs is not None:
            ptr, lo, hi = self.runs
            return _expand_runs(lo[ptr[t] : ptr[t + 1]], hi[ptr[t] : ptr[t + 1]])
        return None

    @property
    def row_inverse(self) -> torch.Tensor | None:
        """Maps sorted row results back to input order (None: rows not sorted)."""
        return None if self.rows is None else self.rows.inverse

    @property
    def col_perm(self) -> torch.Tensor | None:
        """Puts column vectors in sorted order (None: columns not sorted)."""
        return None if self.cols is None else self.cols.perm

    @property
    def kept_fraction(self) -> float:
        """Fraction of the N x M pairs that the kept blocks cover."""
        return self.kept_pairs / max(1, self.x.shape[0] * self.y.shape[0])


def truncate_pair(
    pair: BlockPair,
    gap_cost,
    f: torch.Tensor | None,
    g: torch.Tensor | None,
    floor: float,
    quadratic: bool = False,
    relative: float | None = None,
) -> BlockPair:
    r"""Keep, for every tile, the columns j whose best possible score can reach ``floor``.

    The score of a pair is :math:`s_{ij} = f_i + g_j - c(|x_i - y_j|)` (Sinkhorn: log-plan
    times epsilon; kernels: f = g = 0 and c = -log k), ``gap_cost(d)`` increasing in d.
    ``f``/``g`` are in sorted order; None means 0. Over a tile of centre :math:`c` and
    radius :math:`R` (:math:`x_i = c + \delta_i`, :math:`|\delta_i| \le R`), with
    :math:`w = y_j - c`, every score of column j is at most

    - generic: :math:`\max_t f + g_j - c((|w| - R)_+)`;
    - ``quadratic`` (cost :math:`|x-y|^2/2`): with the least-squares fit
      :math:`f_i = \alpha + \langle\beta, \delta_i\rangle + r_i` on the tile and
      :math:`r^+ = \max_i r_i`, :math:`s_{ij} = f_i + g_j - |\delta_i|^2/2 + \langle\delta_i, w\rangle
      - |w|^2/2 \le \alpha + r^+ + \psi_R(|\beta + w|) + g_j - |w|^2/2`, where
      :math:`\psi_R(z) = \max_{|\delta| \le R} \langle\delta, z\rangle - |\delta|^2/2` is
      :math:`z^2/2` for :math:`z \le R` and :math:`Rz - R^2/2` beyond. Since the potentials'
      gradient :math:`\beta` points from the transport target back to the tile, the slack
      :math:`\psi_R` is small exactly for the columns that matter: this bound keeps about
      half as many pairs as the generic one on shifted clouds.

    A column is dropped only if no pair of the tile with it reaches ``floor``; with
    ``relative``, the floor of each tile is raised to the least of its rows' best scores
    minus ``relative`` (:meth:`Screen.row_floor`). The columns' own tiles (octree cells)
    are screened first with the same bounds over each cell's ball (:class:`Screen`), then
    the points of the cells that pass, one by one, tile by tile.
    Every tile keeps at least its best column. The kept columns are stored as runs of
    consecutive sorted columns (``BlockPair.runs``) while they take at most
    :data:`STORED_COLUMNS_BYTES`; beyond, each reduction screens each tile's columns again (a
    pass over its candidate columns, cheap beside the block), so memory stays linear in
    N + M at any size. For p = 2 in float32 on the CPU the point screening runs compiled
    (:class:`.native.TileScreen`, the same bound computed without the expansion).
    """
    screen = Screen(pair, gap_cost, f, g, floor, quadratic, relative)
    sizes = torch.tensor([t.r1 - t.r0 for t in pair.tiles], dtype=torch.int64)
    if screen.compiled is not None:  # counts first; the runs if they can be stored
        kept = int((sizes * screen.compiled.counts).sum())
        if int(screen.compiled.runs.sum()) * 8 > STORED_COLUMNS_BYTES:
            return BlockPair(pair.x, pair.y, pair.fn, pair.tiles, pair.rows, pair.cols, kept, screen)
        runs = screen.compiled.fill(0, len(pair.tiles))
    else:
        sels, kept, stored = [], 0, 0
        every = torch.arange(pair.y.shape[0], dtype=torch.int32, device=pair.y.device)
        for t in range(len(pair.tiles)):
            sel = screen.columns(t)
            sel = every if sel is None else sel
            kept += int(sizes[t]) * sel.numel()
            stored += 8 * int((sel[1:] != sel[:-1] + 1).sum() + 1)  # 8 bytes a run
            if stored > STORED_COLUMNS_BYTES:
                sels = None
            elif sels is not None:
                sels.append(sel)
        if sels is None:  # too many to store: screen in every reduction
            return BlockPair(pair.x, pair.y, pair.fn, pair.tiles, pair.rows, pair.cols, kept, screen)
        runs = _runs_of(sels)
    return BlockPair(pair.x, pair.y, pair.fn, pair.tiles, pair.rows, pair.cols, kept, runs=runs)


def _runs_of(sels: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ptr, lo, hi)``: the sorted index lists ``sels`` as runs of consecutive indices."""
    los, his, counts = [], [], []
    for sel in sels:
        sel = sel.long()
        start = torch.ones(sel.shape[0], dtype=torch.bool, device=sel.device)
        start[1:] = sel[1:] != sel[:-1] + 1
        first = start.nonzero()[:, 0]
        last = torch.cat([first[1:], first.new_tensor([sel.shape[0]])])[: first.shape[0]] - 1
        los.append(sel[first].to(torch.int32))
        his.append((sel[last] + 1).to(torch.int32))
        counts.append(first.shape[0])
    ptr = _starts(torch.tensor(counts, dtype=torch.int64))
    empty = torch.zeros(0, dtype=torch.int32)
    return ptr, torch.cat(los) if los else empty, torch.cat(his) if his else empty


def _expand_runs(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The sorted indices (int32) in the runs ``lo[k]:hi[k]``."""
    lengths = (hi - lo).long()
    total = int(lengths.sum())
    offsets = torch.cumsum(lengths, 0) - lengths
    out = torch.repeat_interleave(lo.long() - offsets, lengths, output_size=total)
    return (out + torch.arange(total, device=out.device)).to(torch.int32)


class Screen:
    """The kept columns of each row tile of a truncated pair (see :func:`truncate_pair`).

    Built once per truncation: the bounds' statistics of the row tiles, and for each row
    tile the column tiles (octree cells of the sorted columns) whose ball can reach the
    floor, as a compressed sparse row list. :meth:`columns` then tests the points of those
    cells one by one for one row tile.
    """

    def __init__(self, pair: BlockPair, gap_cost, f, g, floor: float, quadratic: bool,
                 relative: float | None = None):
        x, y, cols = pair.x.detach(), pair.y.detach(), pair.cols
        self.y, self.floor, self.quadratic, self.gap_cost = y, floor, quadratic, gap_cost
        self.x, self.f, self.tiles, self.relative = x, f, pair.tiles, relative
        self.gs = torch.zeros(y.shape[0], dtype=y.dtype, device=y.device) if g is None else g
        self.stats = _tile_stats(x, f, pair.tiles, quadratic)
        self.top, self.radius = self.stats["top"].tolist(), self.stats["radius"].tolist()
        # point_bound's linear part: (y, |y|^2, g) @ weights[t] + bias[t]
        self.packed = torch.cat([y, (y * y).sum(1, keepdim=True), self.gs[:, None]], dim=1)
        c = self.stats["centre"]
        cc = (c * c).sum(1)
        self.weights = torch.zeros(c.shape[0], y.shape[1] + 2, 2, dtype=y.dtype, device=y.device)
        self.bias = torch.zeros(c.shape[0], 2, dtype=y.dtype, device=y.device)
        if quadratic:  # (|w + beta|^2, g - |w|^2 / 2)
            cb = c - self.stats["beta"]
            self.weights[:, :-2, 0], self.weights[:, -2, 0], self.bias[:, 0] = -2 * cb, 1.0, (cb * cb).sum(1)
            self.weights[:, :-2, 1], self.weights[:, -2, 1], self.weights[:, -1, 1] = c, -0.5, 1.0
            self.bias[:, 1] = -cc / 2
        else:  # (|w|^2, g)
            self.weights[:, :-2, 0], self.weights[:, -2, 0], self.bias[:, 0] = -2 * c, 1.0, cc
            self.weights[:, -1, 1] = 1.0
        col_tiles = [Tile(r0, r1) for r0, r1 in cols.tiles]
        col_stats = _tile_stats(y, None, col_tiles, False)
        self.col_starts = _starts(torch.tensor([t.r1 - t.r0 for t in col_tiles], device=y.device))
        g_unit = _segment_max(self.gs, self.col_starts)
        # screen (row tile, column tile) pairs, by chunks of row tiles to bound the memory
        n_tiles, n_cells = len(pair.tiles), len(col_tiles)
        cells, counts = [], []
        chunk = max(1, (1 << 22) // max(1, n_cells))
        for t0 in range(0, n_tiles, chunk):
            t = torch.arange(t0, min(t0 + chunk, n_tiles), device=x.device)
            w = col_stats["centre"][None, :, :] - self.stats["centre"][t][:, None, :]
            score = self.bound(t[:, None], w, col_stats["radius"][None, :], g_unit[None, :])
            keep = score >= floor
            keep[torch.arange(len(t)), score.argmax(1)] = True  # every tile keeps a cell
            cells.append(keep.nonzero(as_tuple=True)[1].to(torch.int32))  # row-major: by tile
            counts.append(keep.sum(1))
        self.cells, self.cell_ptr = torch.cat(cells), _starts(torch.cat(counts))
        self.compiled = None  # the point screening, compiled: p = 2, float32 on the CPU
        if quadratic and f is not None and native.usable(x, y, f, self.gs):
            bounds = [torch.tensor([t.r0 for t in pair.tiles]), torch.tensor([t.r1 for t in pair.tiles])]
            self.compiled = native.TileScreen(
                native.points3(x), f, native.points3(y), self.gs, *bounds, self.stats, self.cells,
                self.cell_ptr, self.col_starts, floor, relative, ROW_SAMPLE)

    def bound(self, t, w, spread, g_top):
        """Upper bound of the scores of row tiles ``t`` with columns at ``w`` (+- ``spread``)."""
        stats = self.stats
        top, radius = stats["top"][t], stats["radius"][t]
        if self.quadratic:
            z = (w + stats["beta"][t]).norm(dim=-1) + spread
            psi = torch.where(z <= radius, z * z / 2, radius * z - radius * radius / 2)
            near = (w.norm(dim=-1) - spread).clamp_min(0)
            return top + psi + g_top - near * near / 2
        return top + g_top - self.gap_cost((w.norm(dim=-1) - radius - spread).clamp_min(0))

    def point_bound(self, t: int, cols: torch.Tensor) -> torch.Tensor:
        r""":meth:`bound` of row tile ``t`` with the sorted columns ``cols``: the hot path.

        One gather and one small matrix product: with :math:`w = y - c`,
        :math:`|w|^2 = |y|^2 - 2\langle y, c\rangle + |c|^2` (likewise :math:`|w + \beta|^2`).
        The expansion's rounding grows with :math:`|y|^2`, which the floor's margin counts
        (the API centres the clouds, so it is about the diameter squared).
        """
        a = torch.addmm(self.bias[t], self.packed.index_select(0, cols), self.weights[t])
        radius = self.radius[t]
        if self.quadratic:  # a = (|w + beta|^2, g - |w|^2 / 2)
            zz = a[:, 0].clamp_min(0)
            psi = torch.where(zz <= radius * radius, zz / 2, radius * zz.sqrt() - radius * radius / 2)
            return psi.add_(a[:, 1]).add_(self.top[t])
        # a = (|w|^2, g)
        return a[:, 1].add(self.top[t]) - self.gap_cost((a[:, 0].clamp_min(0).sqrt() - radius).clamp_min(0))

    def row_floor(self, t: int, col: torch.Tensor, score: torch.Tensor) -> float:
        """Row tile ``t``'s floor for its candidate columns ``col`` (bounds ``score``).

        The absolute floor, raised under the relative rule to the least of the rows' best
        scores minus ``relative``. Each row's best is bounded below by its exact scores
        against the :data:`ROW_SAMPLE` candidates of highest bound. (Sampling the best
        column cell's points instead, before the cell screening, gave looser floors: 26%
        of the pairs kept at the jump on 20k points against 18%, and no fewer candidates.)
        """
        if self.relative is None:
            return self.floor
        tile = self.tiles[t]
        top = col[score.topk(min(ROW_SAMPLE, score.shape[0])).indices]
        d = torch.cdist(self.x[tile.r0 : tile.r1], self.y[top])
        best = (self.f[tile.r0 : tile.r1, None] + self.gs[top][None, :] - self.gap_cost(d)).amax(1)
        return max(self.floor, float(best.min()) - self.relative)

    def columns(self, t: int) -> torch.Tensor | None:
        """Sorted indices (int32) of row tile ``t``'s kept columns; None: every column."""
        if self.compiled is not None:
            _, lo, hi = self.compiled.fill(t, t + 1)
            return _expand_runs(lo, hi)
        cells = self.cells[self.cell_ptr[t] : self.cell_ptr[t + 1]].long()
        lo = self.col_starts[cells]
        counts = self.col_starts[cells + 1] - lo
        total = int(counts.sum())
        offsets = torch.cumsum(counts, 0) - counts
        col = torch.repeat_interleave(lo - offsets, counts, output_size=total)
        col += torch.arange(total, device=col.device)
        score = self.point_bound(t, col)
        ok = score >= self.row_floor(t, col, score)
        ok[score.argmax()] = True  # every tile keeps its best column
        if bool(ok.all()) and total == self.y.shape[0]:
            return None
        return col[ok].to(torch.int32)


def _tile_stats(x: torch.Tensor, f: torch.Tensor | None, tiles: list[Tile], quadratic: bool) -> dict:
    r"""Per tile: centre, radius, and the potential's bound ``top`` (and slope ``beta``).

    ``top`` is :math:`\max_t f` (0 without potentials), or with ``quadratic`` the offset
    :math:`\alpha + \max_i r_i` of the least-squares plane :math:`f \approx \alpha +
    \langle\beta, x - c\rangle` (a pseudo-inverse: flat or tiny tiles are fine).
    """
    sizes = torch.tensor([t.r1 - t.r0 for t in tiles], device=x.device)
    n_tiles, dim = len(tiles), x.shape[1]
    label = torch.repeat_interleave(torch.arange(n_tiles, device=x.device), sizes)
    zeros = torch.zeros(n_tiles, dim, dtype=x.dtype, device=x.device)
    centre = zeros.index_add(0, label, x) / sizes[:, None].to(x.dtype)
    delta = x - centre[label]
    radius = _segment_max(delta.norm(dim=1), _starts(sizes))
    stats = {"centre": centre, "radius": radius}
    if f is None:
        stats["top"] = torch.zeros(n_tiles, dtype=x.dtype, device=x.device)
    elif not quadratic:
        stats["top"] = _segment_max(f, _starts(sizes))
    else:
        design = torch.cat([torch.ones_like(delta[:, :1]), delta], dim=1)  # (N, 1 + D)
        gram = torch.zeros(n_tiles, dim + 1, dim + 1, dtype=x.dtype, device=x.device)
        gram = gram.index_add(0, label, design[:, :, None] * design[:, None, :])
        rhs = torch.zeros(n_tiles, dim + 1, dtype=x.dtype, device=x.device)
        rhs = rhs.index_add(0, label, design * f[:, None])
        coef = (torch.linalg.pinv(gram) @ rhs[:, :, None])[:, :, 0]
        residual = f - (design * coef[label]).sum(1)
        stats["top"] = coef[:, 0] + _segment_max(residual, _starts(sizes))
        stats["beta"] = coef[:, 1:]
    return stats


def _starts(sizes: torch.Tensor) -> torch.Tensor:
    starts = torch.zeros(sizes.shape[0] + 1, dtype=torch.int64, device=sizes.device)
    starts[1:] = torch.cumsum(sizes, 0)
    return starts


def _chunks(n: int) -> list[Tile]:
    return [Tile(r0, min(r0 + TILE_ROWS, n)) for r0 in range(0, n, TILE_ROWS)]


class MultiscaleBackend(Backend):
    """Block-sparse reductions over Morton-sorted points, and their coarse-to-fine levels.

    :meth:`levels` gives the Sinkhorn loop a :class:`MultiscaleLevels` (centroids, then the
    points truncated at each temperature); it uses :meth:`scale_for`, :meth:`cluster`,
    :meth:`jump_index`, ``pair(..., rows=, cols=)``, :meth:`truncated` and :meth:`transposed`.
    """

    name = "multiscale"

    def __init__(self, truncate: float | None = None, cluster_scale: float | None = None):
        if truncate is not None and not (truncate > 0):
            raise ParameterError("truncate", f"must be positive, got {truncate:g}")
        if cluster_scale is not None and not (cluster_scale > 0 and math.isfinite(cluster_scale)):
            raise ParameterError("cluster_scale", f"must be positive and finite, got {cluster_scale:g}")
        self.truncate = truncate
        self.cluster_scale = cluster_scale

    # -- clusters and the coarse-to-fine protocol ------------------------------------------

    def scale_for(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The cluster scale: the one given, else from the diameter of both clouds."""
        if self.cluster_scale is not None:
            return self.cluster_scale
        both = torch.cat([x.detach().reshape(-1, x.shape[-1]), y.detach().reshape(-1, y.shape[-1])])
        diameter = float((both.max(0).values - both.min(0).values).norm())
        return default_cluster_scale(diameter, x.shape[-1])

    def cluster(self, x: torch.Tensor, w: torch.Tensor, scale: float) -> Clusters:
        """Clusters of one measure ``x (1, N, D)``, ``w (1, N)``."""
        _check_single(x)
        return grid_clusters(x[0], w[0], scale)

    @staticmethod
    def jump_index(eps_list: list[float], scale: float, p: int) -> int:
        """First schedule step run on the fine points: the first eps below ``scale ** p``.

        The steps before it run on the cluster centroids. 0 means no coarse phase (the
        clusters are as large as the problem); the last step always runs fine.
        """
        for i, eps in enumerate(eps_list):
            if eps < scale**p:
                return i
        return len(eps_list) - 1

    def sinkhorn_truncate(self, p: int = 2) -> float:
        """The truncation of Sinkhorn blocks, in units of epsilon."""
        return TRUNCATE[p] if self.truncate is None else self.truncate

    def truncated(self, pair: BlockPair, f: torch.Tensor, g: torch.Tensor, eps: float) -> BlockPair:
        r"""``pair`` restricted to the pairs whose plan weight can exceed e^-tau of their row's best.

        ``f (1, N)`` and ``g (1, M)`` are the current potentials, in input order; a pair is
        dropped when :math:`s_{ij} = f_i + g_j - C(x_i, y_j) < \max_k s_{ik} - \tau\varepsilon`
        for sure (bounds of :func:`truncate_pair`), and also when
        :math:`s_{ij} < -\tau\varepsilon`. The plan weight is
        :math:`a_i b_j e^{s_{ij}/\varepsilon}`. The relative rule is the one that matters:
        at optimality a row's best score is about :math:`\tfrac{3}{2}\varepsilon
        \log(1/2\pi\varepsilon)` in 3-D (6.2 ε at blur 0.05, measured 5.8 to 8.0 ε on 20k
        points), so the absolute floor alone keeps some 3 times as many pairs (4.3% against
        1.4% at tau = 5, counted exactly on 20k uniform points).
        """
        p = pair.fn.p
        fs, gs = f[0][pair.rows.perm].detach(), g[0][pair.cols.perm].detach()
        gap_cost = (lambda d: d * d / 2) if p == 2 else (lambda d: d)
        # the bounds are evaluated in the working precision: widen the margin by its rounding
        both = torch.cat([pair.x.detach(), pair.y.detach()])
        diameter = float((both.max(0).values - both.min(0).values).norm())
        extent = diameter**2 + float((both * both).sum(1).max())  # the bounds expand |x - y|^2
        margin = 100 * torch.finfo(fs.dtype).eps * (float(fs.abs().max() + gs.abs().max()) + extent)
        floor = -self.sinkhorn_truncate(p) * eps - margin
        relative = self.sinkhorn_truncate(p) * eps + margin
        return truncate_pair(pair, gap_cost, fs, gs, floor, quadratic=p == 2, relative=relative)

    @staticmethod
    def transposed(cut: BlockPair, other: BlockPair) -> BlockPair:
        r"""``other`` (the pair (y, x) of ``cut``'s (x, y)) keeping the transpose of ``cut``'s pairs.

        Sinkhorn's cross updates must see one kernel: if (x, y) and (y, x) were truncated on
        their own, a pair kept on one side only would make the two updates disagree, and the
        balanced iteration would drift by a constant at every step instead of converging
        (measured: with the relative truncation, potentials 1.7e-3 off the dense ones on
        1500 points where 1e-3 was the tolerance). Its reductions run over ``cut``'s blocks,
        summed down the columns.
        """
        return BlockPair(other.x, other.y, other.fn, cut.tiles, other.rows, other.cols,
                         cut.kept_pairs, cut.screen, transposed=True, runs=cut.runs)

    def levels(self, x, a, y, b, cost, epsilons, debias) -> MultiscaleLevels:
        """Cluster centroids for the first schedule steps, then the (truncated) points."""
        return MultiscaleLevels(self, x, a, y, b, cost, epsilons, debias)

    # -- the engine contract ---------------------------------------------------------------

    def pair(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        fn: Cost | Kernel,
        *,
        rows: Clusters | None = None,
        cols: Clusters | None = None,
    ) -> BlockPair:
        """Bind ``x (1, N, D)`` and ``y (1, M, D)``, sorted by their clusters if given.

        Every block is kept, except for gaussian and laplacian kernels: those are clustered
        here and truncated where the kernel is below ``exp(-KERNEL_TRUNCATE)`` (or
        ``exp(-truncate)``).
        """
        _check_single(x)
        _check_single(y)
        if getattr(fn, "formula", None) is not None:
            raise ParameterError("cost", "a KeOps formula cost needs --backend online")
        xs, ys = x[0], y[0]
        kernel_cut = isinstance(fn, Kernel) and fn.name in ("gaussian", "laplacian")
        if kernel_cut and rows is None:
            scale = self.scale_for(x, y)
            rows = self.cluster(x, torch.ones(x.shape[:2], dtype=x.dtype, device=x.device), scale)
            cols = self.cluster(y, torch.ones(y.shape[:2], dtype=y.dtype, device=y.device), scale)
        tiles = _chunks(xs.shape[0]) if rows is None else [Tile(r0, r1) for r0, r1 in rows.tiles]
        pair = BlockPair(xs, ys, fn, tiles, rows, cols, xs.shape[0] * ys.shape[0])
        if rows is not None:
            pair.x = xs[rows.perm]
        if cols is not None:
            pair.y = ys[cols.perm]
        if kernel_cut:
            tau = KERNEL_TRUNCATE if self.truncate is None else self.truncate
            sigma = fn.sigma
            gap_cost = (lambda d: d * d / (2 * sigma**2)) if fn.name == "gaussian" else (lambda d: d / sigma)
            pair = truncate_pair(pair, gap_cost, None, None, -tau)
        return pair

    def softmin(self, eps: float, pair: BlockPair, h: torch.Tensor) -> torch.Tensor:
        r"""``(1, N)``: :math:`-\varepsilon\log\sum_j \exp(h_j - C(x_i,y_j)/\varepsilon)` over kept blocks."""
        if not isinstance(pair.fn, Cost):
            raise TypeError("softmin needs a cost pair")
        hs = h[0] if pair.col_perm is None else h[0][pair.col_perm]
        if pair.fn.p == 2 and native.usable(pair.x, pair.y, hs, double=True):
            return self._softmin_native(eps, pair, hs)
        if pair.transposed:
            return self._softmin_columns(eps, pair, hs)
        return self._reduce(pair, hs, lambda xi, yj, hj: _softmin_block(xi, yj, hj, eps, pair.fn.p))

    def kernel_sum(self, pair: BlockPair, w: torch.Tensor) -> torch.Tensor:
        r"""``(1, N)``: :math:`\sum_j k(x_i, y_j) w_j` over kept blocks."""
        if not isinstance(pair.fn, Kernel) or pair.transposed:
            raise TypeError("kernel_sum needs a kernel pair, not transposed")
        ws = w[0] if pair.col_perm is None else w[0][pair.col_perm]
        return self._reduce(pair, ws, lambda xi, yj, wj: _kernel_block(xi, yj, wj, pair.fn))

    def _softmin_native(self, eps: float, pair: BlockPair, h: torch.Tensor) -> torch.Tensor:
        """:meth:`softmin` through the compiled kernel (:mod:`.native`): same blocks, same values."""
        if pair.transposed:  # tiles over pair.y (values h), kept entries index pair.x
            p, q = native.points3(pair.x), native.points3(pair.y)
            n, w = pair.x.shape[0], native.n_workers()
            amax = torch.full((w, n), -math.inf, dtype=h.dtype)
            asum = torch.zeros(w, n, dtype=torch.float64)
            first = 0  # the chunk's first tile: the workers' sums do not depend on the chunks
            for r0, r1, ptr, lo, hi in _tile_chunks(pair):
                native.cols_lse(q, p, h, r0, r1, ptr, lo, hi, eps, amax, asum, t_offset=first)
                first += r0.shape[0]
            lse = native.merge_workers(amax, asum)
            missing = ~torch.isfinite(lse)
            out = -eps * lse
            if bool(missing.any()):  # rows kept by no block: every column
                rows = missing.nonzero()[:, 0]
                full = BlockPair(pair.x[rows], pair.y, pair.fn, _chunks(rows.shape[0]))
                out[rows] = self._softmin_native(eps, full, h)[0]
        else:
            out = -eps * self._rows_native(eps, pair, h)
        if pair.row_inverse is not None:
            out = out[pair.row_inverse]
        return out[None]

    @staticmethod
    def _rows_native(eps: float, pair: BlockPair, h: torch.Tensor, mean: torch.Tensor | None = None):
        """The compiled row log-sum-exps of a pair that is not transposed (sorted rows; ``mean`` too)."""
        p, q = native.points3(pair.x), native.points3(pair.y)
        lse = torch.empty(pair.x.shape[0], dtype=pair.x.dtype)
        for r0, r1, ptr, lo, hi in _tile_chunks(pair):
            native.rows_lse(p, q, h, r0, r1, ptr, lo, hi, eps, lse, mean)
        return lse

    def barycentres(self, eps: float, pair: BlockPair, h: torch.Tensor, y: torch.Tensor,
                    base: torch.Tensor | None = None) -> torch.Tensor:
        """See :meth:`Backend.barycentres`: through the compiled kernel, in the softmin's own pass.

        One pass of the kernel weighs the columns' points as it sums (``base`` is not
        needed) instead of the D more softmins of the default, which runs everywhere else
        (p = 1, transposed pairs, no compiler).
        """
        if isinstance(pair.fn, Cost) and pair.fn.p == 2 and not pair.transposed:
            hs = h[0] if pair.col_perm is None else h[0][pair.col_perm]
            if native.usable(pair.x, pair.y, hs, double=True):
                mean = torch.empty(pair.x.shape[0], 3, dtype=pair.x.dtype)
                self._rows_native(eps, pair, hs, mean)
                out = mean[:, : pair.x.shape[1]]
                if pair.row_inverse is not None:
                    out = out[pair.row_inverse]
                return out[None].to(y.dtype)
        return super().barycentres(eps, pair, h, y, base)

    def _reduce(self, pair: BlockPair, col: torch.Tensor, block) -> torch.Tensor:
        """Run ``block(rows, cols, col_vector) -> (rows,)`` over every tile, in sub-blocks."""
        outs = []
        grad = torch.is_grad_enabled() and (pair.x.requires_grad or pair.y.requires_grad or col.requires_grad)
        for t, tile in enumerate(pair.tiles):
            cols = pair.columns(t)
            yj = pair.y if cols is None else pair.y[cols]
            cj = col if cols is None else col[cols]
            step = max(8, SUB_BLOCK // max(1, yj.shape[0]))
            for r0 in range(tile.r0, tile.r1, step):
                xi = pair.x[r0 : min(r0 + step, tile.r1)]
                if grad:
                    outs.append(checkpoint(block, xi, yj, cj, use_reentrant=False))
                else:
                    outs.append(block(xi, yj, cj))
        out = torch.cat(outs)
        if pair.row_inverse is not None:
            out = out[pair.row_inverse]
        return out[None]

    def _softmin_columns(self, eps: float, pair: BlockPair, h: torch.Tensor) -> torch.Tensor:
        r"""Softmin of a transposed pair: each block's log-sum-exp down its columns, merged.

        The blocks' tiles run over ``pair.y`` (values ``h``, sorted) and their kept entries
        index ``pair.x``; for each sorted row :math:`x_j` of the pair the result is
        :math:`-\varepsilon \log \sum_i \exp(h_i - C(y_i, x_j)/\varepsilon)` over the kept
        (i, j). Without a gradient, one pass: the blocks' partial sums are merged, a chunk of
        blocks at a time, into a running maximum and sum per row. With a gradient, that pass
        gives the stabilizer, and a second one (checkpointed blocks) sums with autograd.
        A row that no block keeps (possible with potentials far from converged) gets its
        softmin over every column.
        """
        n = pair.x.shape[0]
        block = partial(_lse_block, eps=eps, p=pair.fn.p)
        grad = torch.is_grad_enabled() and (pair.x.requires_grad or pair.y.requires_grad or h.requires_grad)
        with torch.no_grad():
            top = torch.full((n,), -math.inf, dtype=h.dtype, device=h.device)
            total = torch.zeros(n, dtype=h.dtype, device=h.device)
            parts, size = [], 0
            for part, j in self._column_parts(pair, h.detach(), block, grad=False):
                parts.append((part, j))
                size += part.numel()
                if size >= SUB_BLOCK * 8:
                    top, total = _merge_lse(top, total, parts)
                    parts, size = [], 0
            top, total = _merge_lse(top, total, parts)
            lse = top + total.log()
            missing = ~torch.isfinite(lse)
        if grad:  # sum again with autograd, stabilized by the exact log-sum-exp
            shift = torch.where(missing, 0.0, lse)
            total = torch.zeros(n, dtype=h.dtype, device=h.device)
            for part, j in self._column_parts(pair, h, block, grad=True):
                total.index_add_(0, j, (part - shift[j]).exp())
            lse = shift + torch.where(missing, 1.0, total).log()
        out = -eps * lse
        if bool(missing.any()):  # rows kept by no block: every column
            rows = missing.nonzero()[:, 0]
            full = BlockPair(pair.x[rows], pair.y, pair.fn, _chunks(rows.shape[0]))
            softmin = self._reduce(full, h, lambda xi, yj, hj: _softmin_block(xi, yj, hj, eps, pair.fn.p))
            out = out.index_put((rows,), softmin[0])
        if pair.row_inverse is not None:
            out = out[pair.row_inverse]
        return out[None]

    @staticmethod
    def _column_parts(pair: BlockPair, h: torch.Tensor, block, grad: bool):
        """``(part, j)`` per block of a transposed pair: partial log-sum-exps and their rows."""
        n = pair.x.shape[0]

        def run(fn):
            if grad:
                return checkpoint(fn, pair.y, pair.x, h, use_reentrant=False)
            return fn(pair.y, pair.x, h)

        for t, tile in enumerate(pair.tiles):
            sel = pair.columns(t)
            j = torch.arange(n, device=h.device) if sel is None else sel.long()
            step = max(8, SUB_BLOCK // max(1, j.shape[0]))
            for r0 in range(tile.r0, tile.r1, step):
                rows = slice(r0, min(r0 + step, tile.r1))
                yield run(partial(_column_block, block, rows, j)), j


#: kept columns screened at once for the compiled kernel when their runs are not stored
_CHUNK_COLUMNS = 1 << 24


def _tile_chunks(pair: BlockPair):
    """``(r0, r1, ptr, lo, hi)`` for the compiled kernel: runs of tiles and their kept columns.

    One run of tiles with the stored runs of columns (``pair.runs``), or with ``lo = None``
    (every column) when the pair was not truncated; when the runs are too many to store,
    runs of tiles screened again, each with about :data:`_CHUNK_COLUMNS` kept columns.
    """
    def bounds(tiles):
        return (torch.tensor([t.r0 for t in tiles], dtype=torch.int64),
                torch.tensor([t.r1 for t in tiles], dtype=torch.int64))

    screen = pair.screen
    if screen is None:
        yield (*bounds(pair.tiles), *(pair.runs or (None, None, None)))
        return
    if screen.compiled is not None:  # runs of tiles, the columns filled in one call each
        ends = torch.cumsum(screen.compiled.counts, 0)
        start = 0
        while start < len(pair.tiles):
            base = int(ends[start - 1]) if start else 0
            stop = max(start + 1, int(torch.searchsorted(ends, base + _CHUNK_COLUMNS, right=True)))
            stop = min(stop, len(pair.tiles))
            yield (*bounds(pair.tiles[start:stop]), *screen.compiled.fill(start, stop))
            start = stop
        return
    every = torch.arange(pair.y.shape[0], dtype=torch.int32)
    start, sels, size = 0, [], 0
    for t in range(len(pair.tiles)):
        sel = screen.columns(t)
        sels.append(every if sel is None else sel)
        size += sels[-1].numel()
        if size >= _CHUNK_COLUMNS or t == len(pair.tiles) - 1:
            yield (*bounds(pair.tiles[start : t + 1]), *_runs_of(sels))
            start, sels, size = t + 1, [], 0


def _column_block(block, rows: slice, j: torch.Tensor, y, x, h) -> torch.Tensor:
    """``block`` of the columns ``x[j]`` (as rows) against the tile rows ``rows`` of ``y`` (values ``h``)."""
    return block(x[j], y[rows], h[rows])


def _merge_lse(top: torch.Tensor, total: torch.Tensor, parts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial log-sum-exps ``[(values, index), ...]`` into a running maximum and sum."""
    if not parts:
        return top, total
    values = torch.cat([v for v, _ in parts])
    index = torch.cat([j for _, j in parts])
    new_top = top.scatter_reduce(0, index, values, reduce="amax", include_self=True)
    scale = torch.where(top > -math.inf, (top - new_top).exp(), 0.0)
    safe = torch.where(new_top > -math.inf, new_top, 0.0)
    total = (total * scale).index_add_(0, index, (values - safe[index]).exp())
    return new_top, total


def _check_single(x: torch.Tensor) -> None:
    if x.dim() != 3 or x.shape[0] != 1:
        raise ParameterError("backend", "multiscale handles one pair of clouds at a time, not batches")
    if x.shape[-1] > 3:
        raise ParameterError("backend", f"multiscale handles dimensions up to 3, not {x.shape[-1]}")


def _softmin_block(xi: torch.Tensor, yj: torch.Tensor, hj: torch.Tensor, eps: float, p: int) -> torch.Tensor:
    """Dense softmin of rows ``xi (r, D)`` over columns ``yj (m, D)`` with log-weights ``hj``."""
    return -eps * _lse_block(xi, yj, hj, eps, p)


def _lse_block(xi: torch.Tensor, yj: torch.Tensor, hj: torch.Tensor, eps: float, p: int) -> torch.Tensor:
    r"""``(r,)``: :math:`\log\sum_j \exp(h_j - C(x_i, y_j)/\varepsilon)` for rows ``xi (r, D)``."""
    if p == 2:
        o = xi.detach().mean(0)
        xo, yo = xi - o, yj - o
        hy = hj - (yo * yo).sum(1) / (2 * eps)
        z = torch.addmm(hy[None, :], xo, yo.T, alpha=1.0 / eps)
        return _logsumexp_last(z) - (xo * xo).sum(1) / (2 * eps)
    c = safe_norm(squared_distances(xi[None], yj[None])[0])
    return _logsumexp_last(torch.add(hj[None, :], c, alpha=-1.0 / eps))


def _kernel_block(xi: torch.Tensor, yj: torch.Tensor, wj: torch.Tensor, kernel: Kernel) -> torch.Tensor:
    """Dense kernel product of rows ``xi (r, D)`` with columns ``yj (m, D)`` weighted by ``wj``."""
    if kernel.name == "gaussian":
        o = xi.detach().mean(0)
        xo, yo = xi - o, yj - o
        s2 = kernel.sigma**2
        z = torch.addmm(-(yo * yo).sum(1)[None, :] / (2 * s2), xo, yo.T, alpha=1.0 / s2)
        z = z - (xo * xo).sum(1)[:, None] / (2 * s2)
        return z.clamp_max(0.0).exp() @ wj
    k = kernel.from_sqdist(squared_distances(xi[None], yj[None])[0])
    return k @ wj


class MultiscaleLevels(Levels):
    r"""The coarse-to-fine levels of the multiscale backend.

    Two levels: 0, the cluster centroids weighted by the clusters' masses, for the
    schedule's first steps while :math:`\varepsilon \ge \text{cluster\_scale}^p`; 1, the
    points. At the jump the loop carries the potentials to the points by one softmin of the
    points against the centroids (:meth:`transfer`). From then on, at each temperature,
    every pair keeps only the blocks that matter given the current potentials
    (:meth:`truncate`, :meth:`MultiscaleBackend.truncated`); the (y, x) pair keeps the
    transpose of the (x, y) pair's blocks, so that both cross updates see one kernel.
    """

    finest = 1

    def __init__(self, backend: MultiscaleBackend, x, a, y, b, cost, epsilons, debias):
        self.backend, self.x, self.y, self.a, self.b = backend, x, y, a, b
        self.cost, self.debias = cost, debias
        self.scale = backend.scale_for(x, y)
        self.rows = backend.cluster(x, a, self.scale)
        self.cols = backend.cluster(y, b, self.scale)
        self.jump = backend.jump_index(epsilons, self.scale, cost.p)
        # sorted copies of the points, made here (outside no_grad) so that the final step's
        # rows carry gradients; truncated views of these pairs are made at each new eps
        self.full = problem_pairs(backend, x, y, cost, debias, self.rows, self.cols)
        self.info = {
            "cluster_scale": self.scale,
            "clusters": [self.rows.k, self.cols.k],
            "jump_step": self.jump,
            "jump_blur": epsilons[self.jump] ** (1.0 / cost.p),
            "truncate": backend.sinkhorn_truncate(cost.p),
            "pairs_kept_fraction": None,
        }

    def level_at(self, step: int) -> int:
        """0 (centroids) before the jump, 1 (points) from it on."""
        return 0 if step < self.jump else 1

    def _centroids(self):
        return self.rows.centroids[None], self.cols.centroids[None]

    def pairs(self, level: int) -> Pairs:
        """The sorted point pairs (level 1, untruncated) or the centroid pairs (level 0)."""
        if level == 1:  # every block: the loop truncates them right away
            return self.full
        xc, yc = self._centroids()
        return problem_pairs(self.backend, xc, yc, self.cost, self.debias)

    def weights(self, level: int):
        """The points' weights (level 1) or the clusters' masses (level 0)."""
        if level == 1:
            return self.a, self.b
        return self.rows.weights[None], self.cols.weights[None]

    def transfer(self, old: int, new: int) -> Pairs:
        """Pairs from the points (rows) to the centroids (columns)."""
        xc, yc = self._centroids()
        pair, cost = self.backend.pair, self.cost
        xy, yx = pair(self.x, yc, cost), pair(self.y, xc, cost)
        if not self.debias:
            return Pairs(xy, yx)
        return Pairs(xy, yx, pair(self.x, xc, cost), pair(self.y, yc, cost))

    def truncate(self, level: int, pairs: Pairs, duals: Duals, eps: float) -> Pairs:
        """The four fine pairs, truncated for temperature ``eps`` and these potentials."""
        if level != 1:
            return pairs
        full, cut = self.full, self.backend.truncated
        xy = cut(full.xy, duals.xy, duals.yx, eps)
        out = Pairs(xy, self.backend.transposed(xy, full.yx))
        if self.debias:  # a symmetric pair without potentials (kept fixed by the loop) stays whole
            out = out._replace(**{k: getattr(pairs, k) if getattr(duals, k) is None else
                                  cut(getattr(full, k), getattr(duals, k), getattr(duals, k), eps)
                                  for k in ("xx", "yy")})
        self.info["pairs_kept_fraction"] = {
            name: pair.kept_fraction for name, pair in out._asdict().items() if pair is not None}
        return out

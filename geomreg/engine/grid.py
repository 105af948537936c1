r"""Grid backend: measures on rectilinear grids (density images and volumes), p = 2 only.

On a grid the Gibbs kernel of the cost :math:`\tfrac12\|x-y\|^2` factorises over the axes,

.. math::
    \exp\big(-\|x-y\|^2/2\varepsilon\big) = \prod_{d} \exp\big(-(x_d-y_d)^2/2\varepsilon\big),

so one softmin over an :math:`n_1 \times \dots \times n_D` grid is D one-dimensional
log-domain reductions, one per axis (REFERENCE.md, "Images and volumes"). Rows and columns
may live on *different* grids (another image size, another pyramid level): each axis only
needs the coordinates of its row and column nodes, so no image is ever resampled.

One 1-D reduction, :func:`log_conv_1d`, computes
:math:`\mathrm{out}_{kj} = \log\sum_l \exp(X_{kl} - (u_j - v_l)^2/2\varepsilon)` for every line k
of the grid. A plain matrix product with :math:`e^{-(u-v)^2/2\varepsilon}` is fast but
underflows at small epsilon (GeomLoss's grid solver works in the log domain with a KeOps
reduction instead: exact but O(n) exponentials per output). Here the outputs are cut into
*tiles* of nearby nodes :math:`u_j = U_S + \delta_j`; with :math:`v_l = V_0 + \eta_l`,

.. math::
    X_{kl} - \frac{(u_j-v_l)^2}{2\varepsilon} = Z_{kSl} + \frac{\delta_j \eta_l}{\varepsilon}
    - \frac{\delta_j (U_S - V_0)}{\varepsilon} - \frac{\delta_j^2}{2\varepsilon},
    \qquad Z_{kSl} = X_{kl} - \frac{(U_S - v_l)^2}{2\varepsilon}.

The first term is shifted by its maximum over l, the second is a small matrix
:math:`E_S = e^{\delta_j \eta_l / \varepsilon}`, and the sum over l is one matrix product per
tile. Tiles are as wide as :math:`|\delta_j \eta_l| / \varepsilon \le R` allows (R =
:data:`SAFE_EXPONENT`): each sum is then at least :math:`e^{-R}` (its largest term) and at
most :math:`n e^{R}`, so nothing that matters under- or overflows; the terms lost to
underflow weigh less than :math:`n e^{2R - 80}` of the sum (< 1e-8 in float32). At large
epsilon a whole axis is one tile (one matrix product); as epsilon shrinks the tiles narrow,
down to single nodes, where the method is the plain log-sum-exp.

A coarse-to-fine pyramid (:meth:`GridLayout.coarsen`, 2 x 2 sum pooling of the masses, the
pooled node at the mean of its children) lets the first steps of the epsilon schedule run
on small grids; the Sinkhorn loop moves from level to level by one exact softmin of the
finer nodes against the coarser potentials (``losses/sinkhorn.py``, ``_Pyramid``).

The gaussian kernel factorises the same way (kernel sums are plain matrix products). The
p = 1 cost :math:`\|x-y\|` does not factorise (the separable form would be the L1 cost
:math:`\sum_d |x_d-y_d|`), so the grid backend refuses p = 1; so are laplacian and energy
kernels, which the point backends compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ParameterError
from .base import Backend, Cost, Kernel

#: largest |delta_j * eta_l| / eps inside one tile, by dtype (see the module docstring)
SAFE_EXPONENT = {torch.float32: 25.0, torch.float64: 250.0}
#: exponents below this are clamped before exp: the terms are negligible anyway, and
#: float32 ``exp`` of very negative arguments is about 10x slower on x86 CPUs
_EXP_FLOOR = {torch.float32: -80.0, torch.float64: -600.0}
#: row-tile width x column-tile width at most this: plain log-sum-exp instead of products
_NARROW = 4
#: entries of one (lines, tiles, l) block of the shifted exponents (~16 MiB in float32)
_BLOCK = 1 << 22


@dataclass(frozen=True, eq=False)
class GridLayout:
    """Nodes of a rectilinear grid, in row-major order.

    Attributes:
        axes: the coordinates of the nodes along each array axis, 1-D tensors, increasing.
        dims: for each array axis, the point coordinate it carries (an image's rows carry
            y, i.e. ``dims == (1, 0)``; a volume's axes carry x, y, z: ``(0, 1, 2)``).
        cell: side of one cell (the pixel spacing at the finest level, doubled per level).
    """

    axes: tuple[torch.Tensor, ...]
    dims: tuple[int, ...]
    cell: float

    @property
    def shape(self) -> tuple[int, ...]:
        """Number of nodes along each array axis."""
        return tuple(int(a.shape[0]) for a in self.axes)

    @property
    def size(self) -> int:
        """Number of nodes."""
        return math.prod(self.shape)

    def points(self) -> torch.Tensor:
        """``(size, D)`` node coordinates, row-major, coordinate ``dims[k]`` from axis k."""
        mesh = torch.meshgrid(*self.axes, indexing="ij")
        cols = [None] * len(self.axes)
        for k, d in enumerate(self.dims):
            cols[d] = mesh[k].reshape(-1)
        return torch.stack(cols, dim=1)

    def coarsen(self) -> GridLayout:
        """The next pyramid level: pairs of nodes merged along every axis of length > 1."""
        return GridLayout(tuple(_merge_pairs(a) for a in self.axes), self.dims, 2 * self.cell)

    def pool(self, w: torch.Tensor) -> torch.Tensor:
        """Masses ``(B, size)`` summed onto the nodes of :meth:`coarsen`: ``(B, coarse size)``."""
        t = w.reshape(w.shape[0], *self.shape)
        for k, n in enumerate(self.shape):
            if n == 1:
                continue
            axis = k + 1
            if n % 2:  # an odd axis: its last node stays alone
                pad = torch.zeros_like(t.narrow(axis, 0, 1))
                t = torch.cat([t, pad], dim=axis)
            shape = list(t.shape)
            shape[axis : axis + 1] = [shape[axis] // 2, 2]
            t = t.reshape(shape).sum(axis + 1)
        return t.reshape(w.shape[0], -1)


def _merge_pairs(a: torch.Tensor) -> torch.Tensor:
    if a.shape[0] == 1:
        return a
    n = a.shape[0] // 2
    merged = (a[0 : 2 * n : 2] + a[1 : 2 * n : 2]) / 2
    return torch.cat([merged, a[2 * n :]]) if a.shape[0] % 2 else merged


def image_layout(shape: tuple[int, ...], spacing: float, dims: tuple[int, ...], *,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> GridLayout:
    """Pixel (voxel) centres ``(i + 1/2) * spacing`` along each axis of an array ``shape``."""
    axes = tuple((torch.arange(n, dtype=torch.float64) + 0.5) * spacing for n in shape)
    return GridLayout(tuple(a.to(device=device, dtype=dtype) for a in axes), dims, float(spacing))


def pyramid(layout: GridLayout) -> list[GridLayout]:
    """Levels from ``layout`` (finest) to a single node, halving every axis each time."""
    levels = [layout]
    while levels[-1].size > 1:
        levels.append(levels[-1].coarsen())
    return levels


def log_conv_1d(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    r"""``(K, J)``: :math:`\log \sum_l \exp(x_{kl} - (u_j - v_l)^2 / 2\varepsilon)` for ``x (K, L)``.

    ``u (J,)`` and ``v (L,)`` are increasing node coordinates. Stable for any epsilon (see the
    module docstring); entries of ``x`` may be very negative (log of zero masses) but finite.
    Both sides are cut into tiles: columns into runs of half-span ``a``, rows into runs of
    half-width ``R eps / a``; ``a = sqrt(R eps)`` balances the two costs (the shifted
    exponents, about K L J / (2 rho) entries, and the per-tile sums, about K J L / (2 a)).
    """
    x = x.contiguous()  # a transposed view makes every block below ~10x slower
    dt = x.dtype
    r_safe = SAFE_EXPONENT[dt]
    half = min(math.sqrt(r_safe * eps), float(v[-1] - v[0]) / 2)
    rho = r_safe * eps / half if half > 0 else math.inf
    cols, rows = _tile_index(v, 2 * half), _tile_index(u, 2 * rho)
    if cols.width * rows.width <= _NARROW:  # tiny eps: tiles of a node or two
        return _log_conv_direct(x, u, v, eps)
    eta = (v[cols.idx] - cols.centre[:, None]) * cols.valid  # (T, wT)
    delta = u[rows.idx] - rows.centre[:, None]  # (S, wS)
    # E[S, T, l, j] = exp(delta_j eta_l / eps), zero on padding columns
    e = torch.exp(eta[None, :, :, None] * delta[:, None, None, :] / eps) * cols.valid[None, :, :, None]
    n_s, n_t, w_t, w_s = e.shape
    e = e.reshape(n_s * n_t, w_t, w_s)
    j_shift = delta[:, None, None, :] * (rows.centre[:, None] - cols.centre[None, :])[:, :, None, None] / eps
    quad = (rows.centre[:, None, None] - v[cols.idx][None]) ** 2 / (2 * eps)  # (S, T, wT)
    quad = quad[:, :, None, :]
    xg = x[:, cols.idx].transpose(0, 1).contiguous()  # (T, K, wT); padding repeats a real column
    floor = _EXP_FLOOR[dt]
    out = torch.empty(x.shape[0], n_s, w_s, dtype=dt, device=x.device)
    chunk = max(1, _BLOCK // (n_s * n_t * max(w_t, w_s)))
    # Layout (S, T, lines, w) throughout: the products need no copy and every reduction runs
    # over contiguous memory, in place (3-4x faster than permuted views on the CPU).
    for k0 in range(0, x.shape[0], chunk):
        z = xg[None, :, k0 : k0 + chunk] - quad  # (S, T, c, wT)
        c = z.shape[2]
        m = z.amax(-1, keepdim=True)
        p = z.sub_(m).clamp_min_(floor).exp_()
        sums = torch.bmm(p.reshape(n_s * n_t, c, w_t), e).reshape(n_s, n_t, c, w_s)
        terms = sums.log_().add_(m).sub_(j_shift)  # log of each column tile's share
        top = terms.amax(1, keepdim=True)
        lse = terms.sub_(top).clamp_min_(floor).exp_().sum(1).log_().add_(top[:, 0])  # (S, c, wS)
        out[k0 : k0 + chunk] = lse.transpose(0, 1)
    out = (out - delta * delta / (2 * eps)).reshape(x.shape[0], -1)
    return out if rows.valid.all() else out[:, rows.valid.reshape(-1)]


def _log_conv_direct(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`log_conv_1d` by an explicit log-sum-exp over l, in blocks of lines."""
    c = (u[:, None] - v[None, :]) ** 2 / (2 * eps)  # (J, L)
    out = torch.empty(x.shape[0], u.shape[0], dtype=x.dtype, device=x.device)
    floor = _EXP_FLOOR[x.dtype]
    chunk = max(1, _BLOCK // c.numel())
    for k0 in range(0, x.shape[0], chunk):
        z = x[k0 : k0 + chunk, None, :] - c[None]  # (c, J, L)
        m = z.amax(-1, keepdim=True)
        s = z.sub_(m).clamp_min_(floor).exp_().sum(-1)
        out[k0 : k0 + chunk] = m[..., 0] + s.log_()
    return out


@dataclass(frozen=True)
class _Tiles:
    """Runs of consecutive nodes, padded to a common width by repeating their last node."""

    idx: torch.Tensor  # (n, width) node indices
    valid: torch.Tensor  # (n, width) False on padding
    centre: torch.Tensor  # (n,) middle of each run's span

    @property
    def width(self) -> int:
        return self.idx.shape[1]


def _tile_index(u: torch.Tensor, span: float) -> _Tiles:
    """Runs of consecutive nodes of ``u`` (increasing) spanning at most ``span`` each."""
    n = u.shape[0]
    if not math.isfinite(span) or float(u[-1] - u[0]) <= span:
        starts, stops = [0], [n]
    else:
        ends = torch.searchsorted(u, u + span, right=True).tolist()
        starts, stops, s = [], [], 0
        while s < n:
            e = max(ends[s], s + 1)
            starts.append(s)
            stops.append(e)
            s = e
    width = max(b - a for a, b in zip(starts, stops, strict=True))
    first = torch.tensor(starts, device=u.device)
    last = torch.tensor(stops, device=u.device) - 1
    idx = first[:, None] + torch.arange(width, device=u.device)[None, :]
    valid = idx <= last[:, None]
    return _Tiles(torch.minimum(idx, last[:, None]), valid, (u[first] + u[last]) / 2)


def _along_axes(h: torch.Tensor, rows: GridLayout, cols: GridLayout, reduce_1d) -> torch.Tensor:
    """Apply ``reduce_1d(lines (K, L), u, v) -> (K, J)`` along every axis: ``(B, rows.size)``."""
    b = h.shape[0]
    t = h.reshape(b, *cols.shape)
    for k in range(len(cols.shape)):
        t = t.movedim(k + 1, -1)
        lead = t.shape[:-1]
        r = reduce_1d(t.reshape(-1, t.shape[-1]), rows.axes[k], cols.axes[k])
        t = r.reshape(*lead, r.shape[-1]).movedim(-1, k + 1)
    return t.reshape(b, -1)


@dataclass(frozen=True)
class GridPair:
    """A cost or kernel between the nodes of two grids (rows, columns)."""

    rows: GridLayout
    cols: GridLayout
    fn: Cost | Kernel


class GridBackend(Backend):
    """Separable reductions between measures on grids (images, volumes).

    The backend is built with the layouts of the problem's measures; :meth:`pair` recognises
    which one a tensor of points is (its nodes, exactly), or takes the layouts explicitly.
    """

    name = "grid"
    #: the Sinkhorn loop runs a coarse-to-fine pyramid with this backend
    pyramid = True

    def __init__(self, layouts: tuple[GridLayout, ...] = ()):
        self.layouts = tuple(layouts)

    def layout_of(self, points: torch.Tensor) -> GridLayout:
        """The registered layout whose nodes are exactly ``points (1, N, D)``."""
        pts = points.detach()
        if pts.dim() == 3:
            if pts.shape[0] != 1:
                raise ParameterError("--backend", "the grid backend takes one pair of images, not a batch")
            pts = pts[0]
        for lay in self.layouts:
            if lay.size == pts.shape[0] and len(lay.dims) == pts.shape[1]:
                nodes = lay.points().to(pts)
                if torch.equal(nodes, pts):
                    return lay
        raise ParameterError("--backend", "the grid backend needs measures on pixel or voxel grids "
                             "(density images or volumes)")

    def pair(self, x: torch.Tensor, y: torch.Tensor, fn: Cost | Kernel, *,
             rows: GridLayout | None = None, cols: GridLayout | None = None) -> GridPair:
        """Bind two grids (given, or recognised from their nodes ``x``, ``y``) to a cost or kernel."""
        if isinstance(fn, Cost) and (fn.p != 2 or fn.formula is not None):
            raise ParameterError("--p", "the grid backend computes the cost |x-y|^2/2 only (p = 2); "
                                 "use a point backend for p = 1")
        if isinstance(fn, Kernel) and fn.name != "gaussian":
            raise ParameterError("--loss", f"the grid backend computes gaussian kernels, not {fn.name}; "
                                 "use a point backend")
        return GridPair(rows or self.layout_of(x), cols or self.layout_of(y), fn)

    def softmin(self, eps: float, pair: GridPair, h: torch.Tensor) -> torch.Tensor:
        """Separable softmin: one :func:`log_conv_1d` per axis."""
        def reduce(lines, u, v):
            return log_conv_1d(lines, u, v, eps)

        return -eps * _along_axes(h, pair.rows, pair.cols, reduce)

    def kernel_sum(self, pair: GridPair, w: torch.Tensor) -> torch.Tensor:
        """Separable gaussian kernel sum: one matrix product per axis."""
        s2 = pair.fn.sigma ** 2

        def reduce(lines, u, v):
            return lines @ torch.exp(-((u[:, None] - v[None, :]) ** 2) / (2 * s2)).T

        return _along_axes(w, pair.rows, pair.cols, reduce)

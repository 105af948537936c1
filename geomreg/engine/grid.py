r"""Grid backend: measures on rectilinear grids (density images and volumes), p = 2 only.

On a grid the Gibbs kernel of the cost :math:`\tfrac12\|x-y\|^2` factorises over the axes,

.. math::
    \exp\big(-\|x-y\|^2/2\varepsilon\big) = \prod_{d} \exp\big(-(x_d-y_d)^2/2\varepsilon\big),

so one softmin over an :math:`n_1 \times \dots \times n_D` grid is D one-dimensional
log-domain reductions, one per axis (docs/theory.md, "Images and volumes"). Rows and columns
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
epsilon a whole axis is one tile (one matrix product); as epsilon shrinks the tiles narrow.
Below a blur of a few nodes a *banded* log-sum-exp takes over (:func:`log_conv_1d`): each
output sums only the blocks of columns whose upper bound comes within
:math:`\mathrm{DROP} + \log L` of a lower bound of its largest term, wherever that term
lies (Sinkhorn potentials and zero masses move it far from :math:`u_j`), so the dropped
terms weigh less than :math:`e^{-\mathrm{DROP}}` of the sum (2e-9 in float32).

A coarse-to-fine pyramid (:meth:`GridLayout.coarsen`, 2 x 2 sum pooling of the masses, the
pooled node at the mean of its children) lets the first steps of the epsilon schedule run
on small grids; the Sinkhorn loop moves from level to level by one exact softmin of the
finer nodes against the coarser potentials (:class:`PyramidLevels`).

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
from .base import Backend, Cost, Kernel, Levels, Pairs

#: largest |delta_j * eta_l| / eps inside one tile, by dtype (see the module docstring)
SAFE_EXPONENT = {torch.float32: 25.0, torch.float64: 250.0}
#: exponents below this are clamped before exp: the terms are negligible anyway, and
#: float32 ``exp`` of very negative arguments is about 10x slower on x86 CPUs
_EXP_FLOOR = {torch.float32: -80.0, torch.float64: -600.0}
#: row-tile width x column-tile width at most this: plain log-sum-exp instead of products
_NARROW = 4
#: entries of one (lines, tiles, l) block of the shifted exponents (~16 MiB in float32)
_BLOCK = 1 << 22
#: the banded reduction drops terms weighing less than exp(-_DROP) of each sum, by dtype
_DROP = {torch.float32: 20.0, torch.float64: 40.0}
#: columns per block of the compiled banded reduction
_C_BLOCK = 8
#: the compiled banded reduction replaces the tiles below this blur, in columns (measured)
_BAND_BLUR = 4.0


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

    ``u (J,)`` and ``v (L,)`` are increasing node coordinates (any two grids: image sizes,
    pyramid levels). Stable for any epsilon (see the module docstring); entries of ``x`` may
    be very negative (log of zero masses) but finite. Two methods, the faster one chosen by
    :func:`_banded_is_faster` (same values up to rounding):

    - tiles (blur above a few nodes): both sides are cut into tiles, columns into runs of
      half-span ``a``, rows into runs of half-width ``R eps / a``; ``a = sqrt(R eps)`` balances
      the two costs (the shifted exponents, about K L J / (2 rho) entries, and the per-tile
      sums, about K J L / (2 a)). Every term is summed; the terms lost to underflow weigh
      less than :math:`L e^{2R - 80}` of each sum.
    - banded (:func:`_log_conv_banded`, small blur): each output sums only the blocks of
      columns whose bound can reach its largest term; the dropped terms weigh less than
      :math:`e^{-\mathrm{DROP}}` of each sum (2e-9 in float32, 4e-18 in float64). About
      ``L / B`` bounds and ``2 sqrt(2 (DROP + log L) eps) / spacing + 2 B`` terms per output
      instead of L (blocks of B = 8 compiled in ``lse_kernel.c`` for float32 on the CPU, of
      about ``sqrt(L / 2)`` in the torch blocks otherwise).

    Args:
        x: ``(K, L)`` lines (log-weights plus potentials over epsilon), finite.
        u: ``(J,)`` row nodes, increasing.
        v: ``(L,)`` column nodes, increasing.
        eps: the temperature.

    Returns:
        ``(K, J)`` log-sums.
    """
    x = x.contiguous()  # a transposed view makes every block below ~10x slower
    if _banded_is_faster(x, u, v, eps):
        return _log_conv_banded(x, u, v, eps)
    dt = x.dtype
    r_safe = SAFE_EXPONENT[dt]
    half = min(math.sqrt(r_safe * eps), float(v[-1] - v[0]) / 2)
    rho = r_safe * eps / half if half > 0 else math.inf
    cols, rows = _tile_index(v, 2 * half), _tile_index(u, 2 * rho)
    if cols.width * rows.width <= _NARROW:  # tiny eps: tiles of a node or two
        return _log_conv_banded(x, u, v, eps)
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



def _banded_is_faster(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: float) -> bool:
    """Whether :func:`_log_conv_banded` beats the tiles on ``x (K, L)`` at this epsilon.

    Measured on 128-512 nodes per axis (one CPU thread, 512 lines): the compiled banded loop
    wins below a blur of about 4 columns (at 1.5 columns 59 ms against 203 ms on 512 nodes,
    9 ms against 23 ms on 256; even at 4 on 128). The torch banded blocks make many passes
    over memory and scale worse with threads: they are kept for blurs below about
    0.4 sqrt(L / 256) columns (0.3 column on 512 nodes: 196 ms against 1421 ms), where the
    tiles narrow to a few nodes; the tiles' cost grows with L, the band's does not.
    """
    from . import native

    n_l = v.shape[0]
    if n_l < 8:
        return False
    blur = math.sqrt(eps) * (n_l - 1) / max(float(v[-1] - v[0]), 1e-300)  # in mean spacings
    if native.usable(x, u, v):
        return blur <= _BAND_BLUR
    return blur <= 0.4 * math.sqrt(n_l / 256)


def _log_conv_banded(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    r""":func:`log_conv_1d` over the blocks of columns that can matter to each output.

    The columns are cut into blocks :math:`b` of ``B`` consecutive nodes, each with the largest
    entry :math:`\bar x_{kb}` of every line. Every term of block b is at most
    :math:`U_{kjb} = \bar x_{kb} - d_{\min}(u_j, b)^2 / 2\varepsilon` and the largest term of
    the sum is at least :math:`\Lambda_{kj} = \max_b \bar x_{kb} - d_{\max}(u_j, b)^2/2\varepsilon`
    (:math:`d_{\min}, d_{\max}`: nearest and farthest distance from :math:`u_j` to the block's
    span). Output (k, j) sums exactly the terms of the blocks with
    :math:`U_{kjb} \ge \Lambda_{kj} - \mu`, :math:`\mu = \mathrm{DROP} + \log L`
    (:data:`_DROP`): the dropped terms are fewer than L, each below :math:`e^{-\mu}` times the
    largest term, so they weigh less than :math:`e^{-\mathrm{DROP}}` of the sum (2e-9 in
    float32, 4e-18 in float64), and the largest term is always kept (its block passes), so the
    sum is shifted by its exact maximum. Nothing assumes that the largest term lies near
    :math:`u_j` (Sinkhorn potentials move it by the transport's displacement; zero masses
    move it to the nearest mass): the blocks are screened against every output.

    The compiled loop (``band_lse_1d`` in ``lse_kernel.c``, float32 on the CPU, B = 8) sums
    each output's kept blocks and nothing else. The torch blocks (otherwise, B about
    ``sqrt(L / 2)``) use that the kept blocks of an output usually form one run: each chunk of
    lines sums a window of W blocks (``(c, J, W B)`` gathered entries) from each output's
    first kept block, W chosen to minimise the work; an output whose kept blocks span more (two
    distant peaks, a potential flat over a long stretch) keeps its window's sum when every
    block outside the window is below that sum minus :math:`\mu` (the same guarantee: the
    window's sum is at most the full one), else sums all L columns. Extra terms only add
    accuracy. The bounds are rounded like the terms (float32: about 1e-7 of
    :math:`|x| + d^2/2\varepsilon`), which moves the threshold by far less than :math:`\mu`.

    Args:
        x: ``(K, L)`` lines, finite.
        u: ``(J,)`` row nodes, increasing.
        v: ``(L,)`` column nodes, increasing.
        eps: the temperature.

    Returns:
        ``(K, J)``, as :func:`log_conv_1d`.
    """
    from . import native

    n_k, n_l = x.shape
    n_j = u.shape[0]
    dt, dev = x.dtype, x.device
    margin = _DROP[dt] + math.log(n_l)
    compiled = native.usable(x, u, v)
    # blocks: the screening costs about L / B per output, the kept blocks about 2 B more
    # terms than the band itself; the compiled loop screens more cheaply than torch
    size = _C_BLOCK if compiled else int(min(64, max(4, round(math.sqrt(n_l / 2)))))
    n_b, qmin, qmax = _band_blocks(u, v, eps, size)
    pad = n_b * size - n_l
    xp = torch.cat([x, x[:, -1:].expand(n_k, pad)], 1) if pad else x  # repeats a real column
    xbar = xp.view(n_k, n_b, size).amax(-1)  # (K, nB)
    out = torch.empty(n_k, n_j, dtype=dt, device=dev)
    if compiled:
        native.band_lse_1d(x, u.contiguous(), v.contiguous(), xbar, size, qmin, qmax, eps, margin, out)
        return out
    floor = _EXP_FLOOR[dt]
    chunk = max(1, _BLOCK // (n_j * max(n_b, 2 * size)))
    ar_b = torch.arange(n_b, device=dev, dtype=torch.int16 if n_b < 1 << 15 else torch.int64)
    for k0 in range(0, n_k, chunk):
        xc, xbc = x[k0 : k0 + chunk], xbar[k0 : k0 + chunk]
        c = xc.shape[0]
        upper = xbc[:, None, :] - qmin  # (c, J, nB)
        lam = (xbc[:, None, :] - qmax).amax(-1)  # (c, J)
        keep = upper >= (lam - margin)[..., None]
        first = keep.view(torch.uint8).argmax(-1)  # the first kept block (argmax: the first 1)
        span = keep.mul(ar_b).amax(-1).sub_(first).add_(1)  # (c, J), >= 1
        # a window of w blocks costs c J w B entries, plus L for each output spanning more
        counts = torch.bincount(span.reshape(-1), minlength=n_b + 1).tolist()
        over, best, w = c * n_j, None, 0
        for width in range(1, n_b + 1):
            over -= counts[width]
            cost = c * n_j * width * size + over * n_l
            if best is None or cost < best:
                best, w = cost, width
        res = out[k0 : k0 + chunk]
        if w * size >= n_l:
            res.copy_(_log_conv_direct(xc, u, v, eps))
            continue
        first = first.clamp_(max=n_b - w)
        res.copy_(_window_lse(xc, u, v, eps, first, size, w, floor))
        wide = span > w
        if wide.any():
            # the window's sum is a lower bound too: outside blocks below it need no sum
            kk, jj = wide.nonzero(as_tuple=True)
            b = ar_b - first[kk, jj, None]
            outside = (b < 0) | (b >= w)
            need = (outside & (upper[kk, jj] >= res[kk, jj, None] - margin)).any(-1)
            kk, jj = kk[need], jj[need]
            if kk.numel():
                res[kk, jj] = _pairs_lse(xc, u, v, eps, kk, jj, floor)
    return out


def _band_blocks(u: torch.Tensor, v: torch.Tensor, eps: float, size: int):
    """Blocks of ``size`` consecutive nodes of ``v`` for :func:`_log_conv_banded`.

    Returns:
        ``(nB, qmin (J, nB), qmax (J, nB))``: the number of blocks, and the nearest and
        farthest squared distances from each ``u_j`` to each block's span, over ``2 eps``.
    """
    n_l = v.shape[0]
    n_b = -(-n_l // size)
    first = torch.arange(n_b, device=v.device) * size
    last = (first + size - 1).clamp_(max=n_l - 1)
    lo, hi = v[first], v[last]
    uu = u[:, None]
    near = (lo - uu).clamp_min(0) + (uu - hi).clamp_min(0)
    far = torch.maximum(uu - lo, hi - uu)
    return n_b, (near * near / (2 * eps)).contiguous(), (far * far / (2 * eps)).contiguous()


def _window_lse(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: float, first: torch.Tensor,
                size: int, w: int, floor: float) -> torch.Tensor:
    r"""``(c, J)``: log-sum-exp of line k over blocks ``first[k, j] .. first[k, j] + w - 1``.

    Blocks are ``size`` columns wide; the columns past the last node count as :math:`-\infty`.
    """
    c, n_j = first.shape
    n_l = x.shape[1]
    width = w * size
    n_b = -(-n_l // size)
    pad = (n_b - 1) * size + width - n_l
    vw = torch.cat([v, v[-1:].expand(pad)]).unfold(0, width, size)  # (nB, W)
    inv = 1 / (2 * eps)
    out = torch.empty(c, n_j, dtype=x.dtype, device=x.device)
    step = max(1, _BLOCK // (n_j * width))
    for a in range(0, c, step):
        xa = x[a : a + step]
        s = xa.shape[0]
        xw = torch.cat([xa, xa.new_full((s, pad), -math.inf)], 1).unfold(1, width, size)  # (s, nB, W)
        f = first[a : a + step]
        rows = (f + torch.arange(s, device=x.device)[:, None] * n_b).view(-1)
        z = xw.reshape(s * n_b, width).index_select(0, rows)  # (s J, W)
        d = vw.index_select(0, f.reshape(-1)).sub_(u.repeat(s)[:, None])
        z.sub_(d.mul_(d).mul_(inv))
        m = z.amax(-1, keepdim=True)
        tot = z.sub_(m).clamp_min_(floor).exp_().sum(-1)
        out[a : a + step] = tot.log_().add_(m[:, 0]).view(s, n_j)
    return out

def _pairs_lse(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, eps: float, kk: torch.Tensor,
               jj: torch.Tensor, floor: float) -> torch.Tensor:
    """``(n,)``: the full log-sum-exp over l of outputs ``(kk[i], jj[i])``."""
    out = torch.empty(kk.shape[0], dtype=x.dtype, device=x.device)
    step = max(1, _BLOCK // x.shape[1])
    for a in range(0, kk.shape[0], step):
        k, j = kk[a : a + step], jj[a : a + step]
        d = u[j, None] - v
        z = x[k] - d * d / (2 * eps)
        m = z.amax(-1, keepdim=True)
        out[a : a + step] = z.sub_(m).clamp_min_(floor).exp_().sum(-1).log_().add_(m[:, 0])
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

    def __init__(self, layouts: tuple[GridLayout, ...] = ()):
        self.layouts = tuple(layouts)

    def layout_of(self, points: torch.Tensor) -> GridLayout:
        """The registered layout whose nodes are exactly ``points (1, N, D)``."""
        pts = points.detach()
        if pts.dim() == 3:
            if pts.shape[0] != 1:
                raise ParameterError("backend", "the grid backend takes one pair of images, not a batch")
            pts = pts[0]
        for lay in self.layouts:
            if lay.size == pts.shape[0] and len(lay.dims) == pts.shape[1]:
                nodes = lay.points().to(pts)
                if torch.equal(nodes, pts):
                    return lay
        raise ParameterError("backend", "the grid backend needs measures on pixel or voxel grids "
                             "(density images or volumes)")

    def levels(self, x, a, y, b, cost, epsilons, debias) -> PyramidLevels:
        """Image pyramids: each schedule step on the coarsest level fine enough for its blur."""
        return PyramidLevels(self, x, a, y, b, cost, epsilons, debias)

    def pair(self, x: torch.Tensor, y: torch.Tensor, fn: Cost | Kernel, *,
             rows: GridLayout | None = None, cols: GridLayout | None = None) -> GridPair:
        """Bind two grids (given, or recognised from their nodes ``x``, ``y``) to a cost or kernel."""
        if isinstance(fn, Cost) and (fn.p != 2 or fn.formula is not None):
            raise ParameterError("p", "the grid backend computes the cost |x-y|^2/2 only (p = 2); "
                                 "use a point backend for p = 1")
        if isinstance(fn, Kernel) and fn.name != "gaussian":
            raise ParameterError("loss", f"the grid backend computes gaussian kernels, not {fn.name}; "
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


class PyramidLevels(Levels):
    r"""The coarse-to-fine levels of the grid backend: one image pyramid per measure.

    Each pyramid pools 2 x 2 down to one node. Schedule step i runs on the coarsest level
    of each pyramid whose cell is at most :math:`\sigma_i = \varepsilon_i^{1/p}` (GeomLoss's
    rule), and the last step always on the finest levels, whatever the blur (GeomLoss's
    solver accepts only blurs between one and two pixels for its levels to line up). A
    level is a pair (level of A, level of B). When it changes, the loop carries the
    potentials over by one exact softmin of the new nodes against the old potentials
    (:meth:`transfer`: a c-transform, not an interpolation), which works between any two
    grids; at the last step that transfer is the step's update (``jump_is_update``, as in
    GeomLoss: at blur 1.5 px it saved a fifth of the time on 512^2 images and moved the
    value by 1.3e-5 relative).
    """

    finest = (0, 0)
    jump_is_update = True

    def __init__(self, backend: GridBackend, x, a, y, b, cost, epsilons, debias):
        self.backend, self.cost, self.debias = backend, cost, debias
        self.lx, self.ly = pyramid(backend.layout_of(x)), pyramid(backend.layout_of(y))
        self.wx, self.wy = [a], [b]
        for lay in self.lx[:-1]:
            self.wx.append(lay.pool(self.wx[-1]))
        for lay in self.ly[:-1]:
            self.wy.append(lay.pool(self.wy[-1]))
        sigmas = [e ** (1.0 / cost.p) for e in epsilons]
        self.keys = [(_level(self.lx, s), _level(self.ly, s)) for s in sigmas[:-1]] + [self.finest]
        jumps = [i for i in range(1, len(self.keys)) if self.keys[i] != self.keys[i - 1]]
        self.info = {
            "levels": [[list(self.lx[i].shape), list(self.ly[j].shape)] for i, j in
                       dict.fromkeys(self.keys)],
            "jump_steps": jumps,
        }

    def level_at(self, step: int):
        """(level of A, level of B) of schedule step ``step``."""
        return self.keys[step]

    def _pairs(self, x_rows, y_rows, x_cols, y_cols) -> Pairs:
        def pair(rows, cols):
            return self.backend.pair(None, None, self.cost, rows=rows, cols=cols)

        xy, yx = pair(x_rows, y_cols), pair(y_rows, x_cols)
        if not self.debias:
            return Pairs(xy, yx)
        return Pairs(xy, yx, pair(x_rows, x_cols), pair(y_rows, y_cols))

    def pairs(self, level) -> Pairs:
        """The four pairs between the two pyramids' grids of ``level``."""
        i, j = level
        return self._pairs(self.lx[i], self.ly[j], self.lx[i], self.ly[j])

    def weights(self, level):
        """The pooled masses of both images on ``level``."""
        return self.wx[level[0]], self.wy[level[1]]

    def transfer(self, old, new) -> Pairs:
        """Pairs from the grids of ``new`` (rows) to those of ``old`` (columns)."""
        (i0, j0), (i1, j1) = old, new
        return self._pairs(self.lx[i1], self.ly[j1], self.lx[i0], self.ly[j0])


def _level(levels: list[GridLayout], sigma: float) -> int:
    """Index of the coarsest level whose cell is at most ``sigma`` (0 if none is)."""
    best = 0
    for k, lay in enumerate(levels):
        if lay.cell <= sigma:
            best = k
    return best

"""The grid backend: separable log-domain reductions and the image pyramid (engine/grid.py).

Every check compares with a computation that does not factorise: dense log-sum-exp over
all pairs, the tensorized backend on the pixel centres, or GeomLoss's grid solver.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import geomreg
from geomreg.engine.base import Cost, Kernel
from geomreg.engine.grid import GridBackend, image_layout, log_conv_1d, pyramid
from geomreg.errors import InputError, ParameterError
from geomreg.io import read_measure
from geomreg.losses.sinkhorn import LOG_ZERO
from geomreg.measure import Grid, Measure

IMAGES = Path(__file__).resolve().parents[3] / "shared" / "data" / "images"
F64 = torch.float64


def dense_lse(x, u, v, eps):
    return torch.logsumexp(x[:, None, :] - (u[None, :, None] - v[None, None, :]) ** 2 / (2 * eps), -1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps", [4.0, 1e-2, 1e-4, 1e-7])
def test_log_conv_1d_equals_dense_log_sum_exp(dtype, eps):
    g = torch.Generator().manual_seed(1)
    u = torch.sort(torch.rand(37, generator=g, dtype=F64)).values.to(dtype)
    v = torch.sort(torch.rand(53, generator=g, dtype=F64)).values.to(dtype)
    x = (torch.randn(11, 53, generator=g, dtype=F64) * 30).to(dtype)
    x[:, 5] = LOG_ZERO  # a zero-mass node
    x[3] = LOG_ZERO  # a line without mass
    out = log_conv_1d(x, u, v, eps)
    ref = dense_lse(x.double(), u.double(), v.double(), eps)
    assert torch.isfinite(out).all()
    tol = 1e-11 if dtype == torch.float64 else 2e-6
    assert (out.double() - ref).abs().max() <= tol * ref.abs().max().clamp_min(1)


def test_log_conv_1d_tiles_a_wide_axis_without_underflow():
    # 400 nodes at a small eps: the shifted matrix product cuts the outputs into tiles; the
    # potentials vary by thousands of eps along the line, so a single shift would underflow
    u = (torch.arange(400, dtype=torch.float32) + 0.5) / 400
    x = (-u * 3000 + 200 * torch.sin(9 * u))[None].repeat(3, 1)
    out = log_conv_1d(x, u, u, 0.03**2)
    ref = dense_lse(x.double(), u.double(), u.double(), 0.03**2)
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max() < 1e-3



def _banded_cases():
    """(x, u, v, eps) cases for the banded reduction: non-uniform, different grids, hard lines."""
    g = torch.Generator().manual_seed(7)
    cases = []
    for n_u, n_v, eps in [(300, 211, 2e-6), (97, 400, 3e-5), (256, 256, 1.5**2 / 256**2), (180, 90, 1e-3)]:
        u = torch.sort(torch.rand(n_u, generator=g, dtype=F64)).values
        v = torch.sort(torch.rand(n_v, generator=g, dtype=F64) ** 1.5).values  # denser near 0
        x = torch.randn(9, n_v, generator=g, dtype=F64) * 5
        x[0, v < 0.8] = LOG_ZERO  # mass only on the right: the left outputs reach far for it
        x[1] = LOG_ZERO
        x[1, [3, n_v - 4]] = 0.0  # two distant equal peaks: both halves matter in the middle
        x[2] = (v - 0.3) * 0.4 / eps  # a displaced peak, as Sinkhorn potentials make it
        x[3] = -((v - 0.5) ** 2) * 0.9 / (2 * eps)  # nearly flat against the kernel: wide sums
        x[4, ::2] = LOG_ZERO
        x[5] = LOG_ZERO  # a line without mass
        cases.append((x, u, v, eps))
    return cases


@pytest.mark.parametrize("native", ["1", "0"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", range(4))
def test_banded_log_conv_equals_float64_brute_force(monkeypatch, native, dtype, case):
    from geomreg.engine.grid import _log_conv_banded

    monkeypatch.setenv("GEOMREG_NATIVE", native)  # the compiled loop and the torch blocks
    x, u, v, eps = _banded_cases()[case]
    x, u, v = x.to(dtype), u.to(dtype), v.to(dtype)
    out = _log_conv_banded(x, u, v, eps)
    # the reference: every term, in float64, from the same (rounded) inputs
    z = x.double()[:, None, :] - (u.double()[None, :, None] - v.double()[None, None, :]) ** 2 / (2 * eps)
    ref = torch.logsumexp(z, -1)
    assert torch.isfinite(out).all()
    # rounding: each term that matters is rounded relative to its own size (|x| and the cost)
    big = (z >= ref[..., None] - 40) * (x.double().abs()[:, None, :] + (z - x.double()[:, None, :]).abs())
    scale = big.amax(-1) + 1
    tol = 1e-13 if dtype == F64 else 1e-6
    assert ((out.double() - ref).abs() / scale).max() <= tol
    assert torch.allclose(log_conv_1d(x, u, v, eps).double(), ref, rtol=0, atol=float((tol * scale).max()))


def test_banded_log_conv_reaches_distant_mass():
    # the outputs far from the only mass: a band around u_j alone would miss it entirely
    u = (torch.arange(512, dtype=torch.float32) + 0.5) / 512
    x = torch.full((2, 512), LOG_ZERO)
    x[0, 500:] = 0.0
    x[1, 40] = 3.0
    eps = (1 / 512) ** 2
    out = log_conv_1d(x, u, u, eps)
    ref = dense_lse(x.double(), u.double(), u.double(), eps)
    assert torch.isfinite(out).all()
    assert ((out.double() - ref).abs() / ref.abs().clamp_min(1)).max() < 4e-6  # the tiles: 1.1e-6

def layouts_2d():
    a = image_layout((7, 9), 1 / 9, (1, 0), dtype=F64)
    b = image_layout((12, 5), 1 / 12, (1, 0), dtype=F64)
    return a, b


def test_layout_nodes_match_the_image_reader(tmp_path):
    arr = np.arange(12, dtype=float).reshape(3, 4) + 1
    path = tmp_path / "img.npy"
    np.save(path, arr)
    m = read_measure(path, as_image=True)
    lay = image_layout(m.grid.shape, m.grid.spacing, m.grid.dims, dtype=F64)
    nodes = lay.points().numpy()
    np.testing.assert_allclose(nodes[m.grid.mask], m.points)
    # the file's first row is the top of the image: row-flipped before it becomes +y up
    np.testing.assert_allclose(m.grid.to_array(m.grid.full(m.weights)), arr / 16)


@pytest.mark.parametrize("eps", [0.1, 1e-3, 1e-5])
def test_softmin_between_different_grids_equals_dense(eps):
    la, lb = layouts_2d()
    be = GridBackend((la, lb))
    xa, xb = la.points()[None], lb.points()[None]
    h = torch.randn(1, lb.size, generator=torch.Generator().manual_seed(0), dtype=F64) * 3
    out = be.softmin(eps, be.pair(xa, xb, Cost(2)), h)
    c = ((xa[0][:, None] - xb[0][None]) ** 2).sum(-1) / 2
    ref = -eps * torch.logsumexp(h[0][None] - c / eps, -1)
    assert (out[0] - ref).abs().max() < 1e-12


def test_volume_softmin_and_gaussian_kernel_equal_dense():
    lay = image_layout((4, 5, 6), 1 / 6, (0, 1, 2), dtype=F64)
    be = GridBackend((lay,))
    p = lay.points()[None]
    h = torch.randn(1, lay.size, generator=torch.Generator().manual_seed(2), dtype=F64)
    d2 = ((p[0][:, None] - p[0][None]) ** 2).sum(-1)
    out = be.softmin(0.01, be.pair(p, p, Cost(2)), h)
    assert (out[0] + 0.01 * torch.logsumexp(h[0][None] - d2 / 0.02, -1)).abs().max() < 1e-12
    w = torch.rand(1, lay.size, dtype=F64)
    ks = be.kernel_sum(be.pair(p, p, Kernel("gaussian", 0.2)), w)
    assert (ks[0] - torch.exp(-d2 / 0.08) @ w[0]).abs().max() < 1e-12


def test_pyramid_pools_mass_and_ends_at_one_node():
    _, lb = layouts_2d()
    levels = pyramid(lb)
    assert [lay.shape for lay in levels] == [(12, 5), (6, 3), (3, 2), (2, 1), (1, 1)]
    w = torch.rand(1, lb.size, dtype=F64)
    pooled = lb.pool(w)
    assert pooled.shape == (1, 18) and torch.isclose(pooled.sum(), w.sum())
    # a pooled node sits at the mean of the nodes it merges; an odd axis keeps its last one
    coarse = lb.coarsen()
    assert torch.allclose(coarse.axes[1], torch.tensor([1.0, 3.0, 4.5], dtype=F64) / 12)
    assert coarse.cell == 2 * lb.cell


def test_pair_refusals():
    la, lb = layouts_2d()
    be = GridBackend((la, lb))
    xa = la.points()[None]
    with pytest.raises(ParameterError, match="p = 2"):
        be.pair(xa, xa, Cost(1))
    with pytest.raises(ParameterError, match="gaussian kernels, not laplacian"):
        be.pair(xa, xa, Kernel("laplacian", 0.1))
    with pytest.raises(ParameterError, match="pixel or voxel grids"):
        be.pair(xa + 0.5, xa, Cost(2))


# ----- Sinkhorn on images: the grid equals the point cloud of the pixel centres


def density_image(shape, seed, holes=True):
    g = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = g.uniform(0.3, 0.7, 2) * (h, w)
    img = np.exp(-(((yy - cy) / (0.25 * h)) ** 2 + ((xx - cx) / (0.2 * w)) ** 2))
    img += 0.3 * g.random(shape)
    if holes:
        img[img < 0.4] = 0  # zero-mass pixels, and rows without mass
    return img


def measure_of(arr, tmp_path, name):
    path = tmp_path / f"{name}.npy"
    np.save(path, arr)
    return read_measure(path, as_image=True)


def grid_and_points(mu, nu, **kw):
    kw = dict(dtype="float64", tol=1e-7, max_iter=20000) | kw
    grid = geomreg.divergence(mu, nu, backend="grid", **kw)
    points = geomreg.divergence(Measure(mu.points, mu.weights), Measure(nu.points, nu.weights),
                                backend="tensorized", **kw)
    return grid, points


@pytest.mark.parametrize(
    "kw",
    [
        dict(blur=0.05),
        dict(blur=0.1, debias=False),
        dict(blur=0.05, reach=0.3),
        dict(blur=0.3 / 24),  # a third of a pixel
        dict(blur=1.5),  # wider than the images: every step but the last on coarse levels
    ],
    ids=["balanced", "not-debiased", "unbalanced", "subpixel-blur", "huge-blur"],
)
def test_grid_sinkhorn_equals_point_cloud_of_pixels(tmp_path, kw):
    mu = measure_of(density_image((24, 20), 0), tmp_path, "a")
    nu = measure_of(density_image((24, 20), 1), tmp_path, "b")
    grid, points = grid_and_points(mu, nu, **kw)
    assert grid.backend == "grid" and grid.converged and points.converged
    assert grid.n_points == (480, 480) and points.n_points == (mu.n, nu.n)
    assert abs(grid.value.item() - points.value.item()) <= 1e-6 * abs(points.value.item())


def test_grid_images_of_different_sizes_need_no_resampling(tmp_path):
    mu = measure_of(density_image((16, 16), 3), tmp_path, "a")
    nu = measure_of(density_image((30, 21), 4, holes=False), tmp_path, "b")
    grid, points = grid_and_points(mu, nu, blur=0.05)
    assert grid.n_points == (256, 630)
    assert abs(grid.value.item() - points.value.item()) <= 1e-6 * abs(points.value.item())
    assert len(grid.grid["levels"]) > 2 and grid.grid["levels"][-1] == [[16, 16], [30, 21]]


def test_grid_volumes_equal_point_clouds(tmp_path):
    g = np.random.default_rng(5)
    a, b = g.random((6, 5, 4)), g.random((5, 6, 6))
    a[a < 0.5] = 0
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    mu, nu = read_measure(tmp_path / "a.npy"), read_measure(tmp_path / "b.npy")
    assert mu.grid.dims == (0, 1, 2) and mu.dim == 3
    grid, points = grid_and_points(mu, nu, blur=0.08)
    assert abs(grid.value.item() - points.value.item()) <= 1e-6 * abs(points.value.item())


def test_grid_potentials_cover_every_pixel(tmp_path):
    arr = density_image((24, 20), 0)
    mu = measure_of(arr, tmp_path, "a")
    nu = measure_of(density_image((24, 20), 1), tmp_path, "b")
    r = geomreg.divergence(mu, nu, backend="grid", potentials=True, dtype="float64", tol=1e-7)
    f, g = r.potentials
    assert f.shape == (480,) and torch.isfinite(f).all() and torch.isfinite(g).all()
    p = geomreg.divergence(Measure(mu.points, mu.weights), Measure(nu.points, nu.weights),
                           backend="tensorized", potentials=True, dtype="float64", tol=1e-7)
    # on the pixels with mass, the point cloud's potentials (balanced: up to a constant)
    diff = f[torch.as_tensor(mu.grid.mask)] - p.potentials[0]
    assert (diff - diff.mean()).abs().max() < 1e-6


def test_grid_gaussian_equals_points(tmp_path):
    mu = measure_of(density_image((24, 20), 0), tmp_path, "a")
    nu = measure_of(density_image((18, 26), 1), tmp_path, "b")
    grid = geomreg.divergence(mu, nu, loss="gaussian", blur=0.1, dtype="float64")
    points = geomreg.divergence(Measure(mu.points, mu.weights), Measure(nu.points, nu.weights),
                                loss="gaussian", blur=0.1, dtype="float64", backend="tensorized")
    assert grid.backend == "grid"
    assert abs(grid.value.item() - points.value.item()) < 1e-12


def test_auto_choice_and_refusals(tmp_path):
    mu = measure_of(density_image((12, 10), 0), tmp_path, "a")
    nu = measure_of(density_image((12, 10), 1), tmp_path, "b")
    assert geomreg.divergence(mu, nu).backend == "grid"
    # p = 1 is the Euclidean cost: it does not separate, so auto uses the points
    r = geomreg.divergence(mu, nu, p=1)
    assert r.backend != "grid" and r.n_points == (mu.n, nu.n)
    assert geomreg.divergence(mu, nu, loss="energy").backend != "grid"
    with pytest.raises(ParameterError, match="L1 cost"):
        geomreg.divergence(mu, nu, p=1, backend="grid")
    with pytest.raises(ParameterError, match="needs two density images"):
        geomreg.divergence(mu.points, nu.points, backend="grid")
    vol = Measure(np.ones((8, 3)) * 0.5, None, "v.npy",
                  Grid((2, 2, 2), 0.5, np.arange(8), (0, 1, 2)))
    with pytest.raises(ParameterError, match="2-D grid and a 3-D grid"):
        geomreg.divergence(mu, vol, backend="grid")


def test_one_pixel_images(tmp_path):
    mu = measure_of(np.ones((1, 1)), tmp_path, "a")
    nu = measure_of(density_image((9, 7), 2), tmp_path, "b")
    grid, points = grid_and_points(mu, nu, blur=0.05)
    assert abs(grid.value.item() - points.value.item()) <= 1e-6 * abs(points.value.item())
    same = geomreg.divergence(mu, mu, backend="grid", dtype="float64")
    assert abs(same.value.item()) < 1e-12


def test_zero_mass_image_is_refused(tmp_path):
    np.save(tmp_path / "z.npy", np.zeros((4, 4)))
    with pytest.raises(InputError, match="no mass"):
        read_measure(tmp_path / "z.npy", as_image=True)


def test_sixteen_bit_png_on_the_grid(tmp_path):
    iio = pytest.importorskip("imageio.v3")
    img = (65535 * (1 - density_image((20, 16), 6, holes=False) / 1.4)).astype(np.uint16)
    iio.imwrite(tmp_path / "a16.png", img)
    mu = read_measure(tmp_path / "a16.png")
    nu = measure_of(density_image((20, 16), 7), tmp_path, "b")
    grid, points = grid_and_points(mu, nu, blur=0.05)
    assert abs(grid.value.item() - points.value.item()) <= 1e-6 * abs(points.value.item())


# ----- displacement fields


def test_field_is_minus_the_gradient_over_the_weight():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, 2, generator=g, dtype=F64, requires_grad=True)
    y = torch.rand(50, 2, generator=g, dtype=F64) + 0.2
    for debias in (True, False):
        r = geomreg.divergence(x, y, blur=0.1, field=True, debias=debias, tol=1e-9,
                               backend="tensorized")
        (grad,) = torch.autograd.grad(r.value, x)
        assert torch.allclose(r.field, -grad * 60, atol=1e-9)


def test_grid_field_equals_point_field(tmp_path):
    mu = measure_of(density_image((16, 14), 0), tmp_path, "a")
    nu = measure_of(density_image((16, 14), 1), tmp_path, "b")
    kw = dict(blur=0.08, field=True, dtype="float64", tol=1e-8)
    grid = geomreg.divergence(mu, nu, backend="grid", **kw)
    points = geomreg.divergence(Measure(mu.points, mu.weights), Measure(nu.points, nu.weights),
                                backend="tensorized", **kw)
    assert grid.field.shape == (224, 2)
    assert (grid.field[torch.as_tensor(mu.grid.mask)] - points.field).abs().max() < 1e-6


# ----- real density images (../shared/data, skipped when absent)


def real(name):
    path = IMAGES / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return read_measure(path)


@pytest.mark.parametrize("pair", ["ell", "reach", "density"])
def test_real_geomloss_pairs_grid_equals_points(pair):
    mu, nu = real(f"geomloss/{pair}_a.png"), real(f"geomloss/{pair}_b.png")
    kw = dict(blur=0.05, reach=0.2 if pair == "reach" else None)
    grid, points = grid_and_points(mu, nu, tol=1e-5, **kw)
    assert abs(grid.value.item() - points.value.item()) <= 1e-3 * abs(points.value.item())


def test_real_horse_not_square_grid_equals_points():
    horse = real("skimage/horse.png")
    h, w = horse.grid.shape
    dense = horse.grid.to_array(horse.grid.full(horse.weights))
    pooled = dense[: h // 4 * 4, : w // 4 * 4].reshape(h // 4, 4, w // 4, 4).sum((1, 3))
    a = _image_measure(pooled, "horse/4")
    b = _image_measure(pooled[:, ::-1].copy(), "mirrored horse/4")
    assert pooled.shape == (82, 100)
    grid, points = grid_and_points(a, b, blur=0.05, tol=1e-5)
    assert abs(grid.value.item() - points.value.item()) <= 1e-3 * abs(points.value.item())


def _image_measure(arr, name):
    """The measure of an image array given top row first, as read_measure would make it."""
    flipped = arr[::-1]
    h, w = flipped.shape
    s = 1 / max(h, w)
    mask = np.flatnonzero(flipped.reshape(-1) > 0)
    rows, cols = np.divmod(mask, w)
    pts = np.stack([(cols + 0.5) * s, (rows + 0.5) * s], 1)
    return Measure(pts, flipped.reshape(-1)[mask], name, Grid((h, w), s, mask))


def test_real_pair_agrees_with_geomloss_grid_solver():
    pytest.importorskip("pykeops")
    gl = pytest.importorskip("geomloss")
    mu, nu = real("geomloss/ell_a.png"), real("geomloss/ell_b.png")
    # GeomLoss's solver needs square power-of-two images and 1/N <= blur < 2/N
    n = 64
    a, b = torch.as_tensor(_pool_to(mu, n)), torch.as_tensor(_pool_to(nu, n))
    ma = _image_measure(a.numpy()[::-1].copy(), "a64")
    mb = _image_measure(b.numpy()[::-1].copy(), "b64")
    blur = 1.5 / n

    def geomloss(scaling):
        return gl.sinkhorn_divergence(a[None, None], b[None, None], p=2, blur=blur,
                                      scaling=scaling).item()

    def ours(scaling, tol):
        return geomreg.divergence(ma, mb, blur=blur, scaling=scaling, diameter=1.0, tol=tol,
                                  dtype="float64").value.item()

    # the same schedule (its diameter is 1): close once the schedule has enough steps;
    # at scaling 0.5 GeomLoss is 12% below the converged value (its potentials move between
    # levels by bilinear upsampling), geomreg 0.2% (measured)
    assert abs(ours(0.95, math.inf) - geomloss(0.95)) <= 1e-3 * geomloss(0.95)
    converged = ours(0.5, 1e-7)
    assert abs(ours(0.5, math.inf) - converged) <= 5e-3 * converged
    assert abs(geomloss(0.99) - converged) <= 1e-4 * converged


def _pool_to(m, n):
    """The density of an image measure pooled to n x n, row 0 at the bottom (GeomLoss's layout)."""
    h, w = m.grid.shape
    full = m.grid.full(m.weights).reshape(h, w)
    k = h // n
    out = full[: n * k, : n * k].reshape(n, k, n, k).sum((1, 3))
    return out / out.sum()

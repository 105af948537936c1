"""The multiscale backend: clusters, truncation bounds, and agreement with the dense backend.

Pure torch (no KeOps): these tests run everywhere. Clouds are a few thousand points at
most; the cluster scale is set small so that the coarse phase, the jump and the
truncation all happen on them.
"""

import math

import pytest
import torch

import geomreg
from geomreg.engine import Cost, Kernel, choose_backend, get_backend
from geomreg.engine import multiscale as ms
from geomreg.errors import ParameterError

F64 = torch.float64


def _clouds(n=600, m=500, d=3, seed=0, dtype=F64, shift=0.1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=dtype)
    y = torch.rand(m, d, generator=g, dtype=dtype) + shift
    return x, y


def _weights(n, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=g, dtype=F64) + 0.1
    return w / w.sum()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------- clusters


def test_grid_clusters_partition_the_points_into_grid_cells():
    x, _ = _clouds(n=2000)
    w = _weights(2000, 1)
    c = ms.grid_clusters(x, w, 0.2)
    n = x.shape[0]
    assert sorted(c.perm.tolist()) == list(range(n))
    assert torch.equal(x[c.perm][c.inverse], x)
    assert c.starts[0] == 0 and c.starts[-1] == n and (c.starts[1:] > c.starts[:-1]).all()
    assert torch.allclose(c.weights.sum(), w.sum())
    xs, ws = x[c.perm], w[c.perm]
    cells = torch.floor((x - x.min(0).values) / 0.2)[c.perm]
    for k in range(c.k):
        lo, hi = int(c.starts[k]), int(c.starts[k + 1])
        assert (cells[lo:hi] == cells[lo]).all(), "a cluster is one grid cell"
        centroid = (ws[lo:hi, None] * xs[lo:hi]).sum(0) / ws[lo:hi].sum()
        assert torch.allclose(c.centroids[k], centroid)
        assert torch.isclose(c.radii[k], (xs[lo:hi] - centroid).norm(dim=1).max())
    # distinct clusters are distinct cells
    firsts = cells[c.starts[:-1]]
    assert len({tuple(r.tolist()) for r in firsts}) == c.k


def test_tiles_are_compact_octree_cells():
    """Row tiles cover the sorted points, hold <= TILE_ROWS points and are small in space."""
    x, _ = _clouds(n=8192, seed=3)
    c = ms.grid_clusters(x, torch.ones(8192, dtype=F64), 0.1)
    assert c.tiles[0][0] == 0 and c.tiles[-1][1] == 8192
    assert all(r1 == s0 for (_, r1), (s0, _) in zip(c.tiles, c.tiles[1:], strict=False))
    assert all(0 < r1 - r0 <= ms.TILE_ROWS for r0, r1 in c.tiles)
    xs = x[c.perm]
    radii = [float((xs[r0:r1] - xs[r0:r1].mean(0)).norm(dim=1).max()) for r0, r1 in c.tiles]
    # 256 of 8192 uniform points fill a cube of side ~0.31 (half-diagonal 0.27); the cloud's
    # radius is ~0.87. Cells cut by the edges of the cloud can be elongated.
    assert max(radii) < 0.45 and sorted(radii)[len(radii) // 2] < 0.2, sorted(radii)[-5:]


@pytest.mark.parametrize("stored", [True, False])
def test_truncation_never_drops_a_pair_above_the_floor(stored, monkeypatch):
    """Brute force: every dropped (i, j) of every tile scores below the floor.

    ``stored=False``: the kept columns are too many to store (limit 0 bytes), so every
    reduction screens them again; the same columns must come out.
    """
    if not stored:
        monkeypatch.setattr(ms, "STORED_COLUMNS_BYTES", 0)
    x, y = _clouds(n=700, m=650, seed=4)
    g = torch.Generator().manual_seed(5)
    f, gg = 0.01 * torch.randn(700, generator=g, dtype=F64), 0.01 * torch.randn(650, generator=g, dtype=F64)
    be = get_backend("multiscale", cluster_scale=0.15)
    rows = be.cluster(x[None], torch.ones(1, 700, dtype=F64), 0.15)
    cols = be.cluster(y[None], torch.ones(1, 650, dtype=F64), 0.15)
    full = be.pair(x[None], y[None], Cost(2), rows=rows, cols=cols)
    eps = 0.002
    cut = be.truncated(full, f[None], gg[None], eps)
    assert 0 < cut.kept_fraction < 0.6
    assert (cut.screen is None) == stored
    xs, ys, fs, gs = x[rows.perm], y[cols.perm], f[rows.perm], gg[cols.perm]
    score = fs[:, None] + gs[None, :] - ((xs[:, None] - ys[None]) ** 2).sum(-1) / 2
    n_kept = 0
    for t, tile in enumerate(cut.tiles):
        sel = cut.columns(t)
        n_kept += (tile.r1 - tile.r0) * sel.numel()
        kept = torch.zeros(650, dtype=torch.bool)
        kept[sel.long()] = True
        rows = score[tile.r0 : tile.r1]
        dropped = rows[:, ~kept]
        assert (dropped < -be.sinkhorn_truncate() * eps).all()
        # relative rule: every dropped pair is tau * eps below the best pair of its row
        assert (dropped < rows.amax(1, keepdim=True) - be.sinkhorn_truncate() * eps).all()
    assert n_kept == cut.kept_pairs


def _kept_mask(cut, rows, cols, n, m):
    """``(n, m)`` bool, input order: the pairs that the truncated pair ``cut`` keeps."""
    mask = torch.zeros(n, m, dtype=torch.bool)
    for t, tile in enumerate(cut.tiles):
        sel = cut.columns(t)
        j = torch.arange(m) if sel is None else sel.long()
        mask[rows.perm[tile.r0 : tile.r1][:, None], cols.perm[j][None, :]] = True
    return mask


@pytest.mark.parametrize("stored", [True, False])
def test_transposed_pair_reduces_over_exactly_the_transposed_pairs(stored, monkeypatch):
    """The (y, x) softmin runs over the (x, y) pair's kept set, transposed: values and gradients.

    With stored kept sets, one column (a point of y) is then removed from every tile's: the
    transposed softmin must give that point its softmin over every point of x.
    """
    if not stored:
        monkeypatch.setattr(ms, "STORED_COLUMNS_BYTES", 0)
    x, y = _clouds(n=700, m=650, seed=21)
    gen = torch.Generator().manual_seed(22)
    f = 0.01 * torch.randn(700, generator=gen, dtype=F64)
    g = 0.01 * torch.randn(650, generator=gen, dtype=F64)
    be = get_backend("multiscale", cluster_scale=0.15)
    rows = be.cluster(x[None], torch.ones(1, 700, dtype=F64), 0.15)
    cols = be.cluster(y[None], torch.ones(1, 650, dtype=F64), 0.15)
    eps = 0.002
    cut = be.truncated(be.pair(x[None], y[None], Cost(2), rows=rows, cols=cols), f[None], g[None], eps)
    lonely = 0  # sorted column 0 (y[cols.perm[0]]) is kept by no tile
    if stored:
        assert cut.kept_fraction < 0.6
        sels = [cut.columns(t) for t in range(len(cut.tiles))]
        cut.runs = ms._runs_of([s[s != lonely] if bool((s != lonely).any()) else s for s in sels])
    mask = _kept_mask(cut, rows, cols, 700, 650)
    yy = y.clone().requires_grad_(True)
    yx = be.pair(yy[None], x[None], Cost(2), rows=cols, cols=rows)
    tr = be.transposed(cut, yx)
    assert tr.transposed and tr.kept_pairs == cut.kept_pairs
    assert stored or int(mask.sum()) == cut.kept_pairs
    h = torch.log(torch.full((700,), 1 / 700, dtype=F64)) + f / eps
    got = be.softmin(eps, tr, h[None])[0]
    c = ((x[:, None, :] - yy[None, :, :]) ** 2).sum(-1) / 2  # (700, 650)
    empty = ~mask.any(0)  # points of y that no tile keeps: their softmin is over every x
    assert bool(empty[cols.perm[lonely]]) == stored
    z = torch.where(mask | empty[None, :], h[:, None] - c / eps, -math.inf)
    want = -eps * torch.logsumexp(z, dim=0)
    assert _rel(got, want) < 1e-12
    (g_got,) = torch.autograd.grad(got.sum(), yy, retain_graph=True)
    (g_want,) = torch.autograd.grad(want.sum(), yy)
    assert _rel(g_got, g_want) < 1e-10


def test_screening_in_every_reduction_gives_the_stored_result(monkeypatch):
    """Past the memory limit for stored columns, values and gradients are unchanged."""
    x, y = _clouds(n=900, m=800, seed=19)
    out = {}
    for limit in (ms.STORED_COLUMNS_BYTES, 0):
        monkeypatch.setattr(ms, "STORED_COLUMNS_BYTES", limit)
        xx = x.clone().requires_grad_(True)
        r = geomreg.divergence(xx, y, backend="multiscale", cluster_scale=0.1, blur=0.03, tol=1e-6)
        assert r.multiscale["pairs_kept_fraction"]["xy"] < 0.6
        out[limit] = (r.value.detach(), torch.autograd.grad(r.value, xx)[0])
    (v1, g1), (v0, g0) = out.values()
    assert torch.equal(v1, v0) and torch.equal(g1, g0)


# ---------------------------------------------------------------- engine operations


@pytest.mark.parametrize("p", [1, 2])
def test_softmin_without_truncation_equals_dense(p):
    x, y = _clouds(n=700, m=650, seed=6)
    h = torch.randn(1, 650, generator=torch.Generator().manual_seed(7), dtype=F64)
    be, te = get_backend("multiscale"), get_backend("tensorized")
    rows = be.cluster(x[None], torch.ones(1, 700, dtype=F64), 0.2)
    cols = be.cluster(y[None], torch.ones(1, 650, dtype=F64), 0.2)
    want = te.softmin(0.01, te.pair(x[None], y[None], Cost(p)), h)
    for kw in ({}, dict(rows=rows, cols=cols)):  # input order, and sorted with results put back
        got = be.softmin(0.01, be.pair(x[None], y[None], Cost(p), **kw), h)
        assert _rel(got, want) < 1e-10


@pytest.mark.parametrize(("name", "sigma"), [("gaussian", 0.02), ("laplacian", 0.005), ("energy", 1.0)])
def test_kernel_sums_equal_dense(name, sigma):
    """Gaussian and laplacian blocks are truncated at exp(-25) (a laplacian reaches 25 sigma),
    energy keeps every block."""
    x, y = _clouds(n=3000, m=2500, seed=8)
    w = _weights(2500, 9)[None]
    kernel = Kernel(name, sigma)
    be, te = get_backend("multiscale"), get_backend("tensorized")
    pair = be.pair(x[None], y[None], kernel)
    got, want = be.kernel_sum(pair, w), te.kernel_sum(te.pair(x[None], y[None], kernel), w)
    assert _rel(got, want) < 1e-9
    if name != "energy":
        assert pair.kept_fraction < 0.5  # truncation happened


# ---------------------------------------------------------------- divergences

CASES = {
    "p2-blur0.05": dict(p=2, blur=0.05),
    "p2-blur0.01": dict(p=2, blur=0.01),
    "p1-blur0.05": dict(p=1, blur=0.05),
    "p2-unbalanced": dict(p=2, blur=0.05, reach=0.3),
    "p2-not-debiased": dict(p=2, blur=0.03, debias=False),
}


#: the small blur takes hundreds of float64 iterations on each backend: smaller clouds there
#: (still 400 clusters a side; 1500 + 1200 points took 71 s on one thread)
SIZES = {"p2-blur0.01": (600, 500)}


@pytest.mark.parametrize("case", list(CASES))
def test_sinkhorn_equals_dense(case):
    n, m = SIZES.get(case, (1500, 1200))
    x, y = _clouds(n=n, m=m, seed=10)
    a, b = _weights(n, 11), _weights(m, 12)
    kw = dict(a=a, b=b, tol=1e-6, potentials=True, **CASES[case])
    got = geomreg.divergence(x, y, backend="multiscale", cluster_scale=0.1, **kw)
    want = geomreg.divergence(x, y, backend="tensorized", **kw)
    info = got.multiscale
    assert info["clusters"][0] > 100 and info["jump_step"] > 0, info
    assert any(s.phase == "coarse" for s in got.schedule)
    assert abs(got.value.item() / want.value.item() - 1) < 1e-4, (got.value, want.value)
    # potentials come back in input order
    for f_got, f_want in zip(got.potentials, want.potentials, strict=True):
        assert _rel(f_got, f_want) < 1e-3


def test_unbalanced_with_unequal_masses_equals_dense():
    x, y = _clouds(n=800, m=700, seed=13)
    a, b = _weights(800, 14), 0.6 * _weights(700, 15)
    kw = dict(a=a, b=b, reach=0.5, blur=0.05, tol=1e-6, normalize=False)
    got = geomreg.divergence(x, y, backend="multiscale", cluster_scale=0.1, **kw)
    want = geomreg.divergence(x, y, backend="tensorized", **kw)
    assert abs(got.value.item() / want.value.item() - 1) < 1e-4


@pytest.mark.parametrize("loss", ["sinkhorn", "hausdorff", "gaussian"])
def test_gradients_equal_dense(loss):
    x, y = _clouds(n=500, m=450, seed=16)
    grads = {}
    for backend in ("multiscale", "tensorized"):
        xx, yy = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        a = _weights(500, 17).requires_grad_(True)
        kw = dict(a=a, loss=loss, blur=0.05, backend=backend, normalize=False)
        if loss == "sinkhorn":
            kw.update(tol=1e-8, cluster_scale=0.1) if backend == "multiscale" else kw.update(tol=1e-8)
        value = geomreg.divergence(xx, yy, **kw).value
        grads[backend] = torch.autograd.grad(value, [xx, yy, a])
    for got, want in zip(grads["multiscale"], grads["tensorized"], strict=True):
        assert torch.isfinite(got).all()
        assert _rel(got, want) < 1e-4


def test_float32_large_enough_to_truncate():
    """20k points, float32: truncation keeps a minority of pairs; value within 0.5% of dense."""
    x, y = _clouds(n=6000, m=6000, seed=18, dtype=torch.float32)
    got = geomreg.divergence(x, y, backend="multiscale", blur=0.05)
    want = geomreg.divergence(x, y, backend="tensorized", blur=0.05, tol=1e-5)
    assert got.multiscale["pairs_kept_fraction"]["xy"] < 0.5
    assert abs(got.value.item() / want.value.item() - 1) < 5e-3


# ---------------------------------------------------------------- refusals and auto


def test_refusals_are_parameter_errors():
    x, y = _clouds(n=20, m=20)
    with pytest.raises(ParameterError, match="batches"):
        geomreg.divergence(x.expand(2, -1, -1), y.expand(2, -1, -1), backend="multiscale")
    with pytest.raises(ParameterError, match="dimensions up to 3"):
        geomreg.divergence(torch.rand(20, 4), torch.rand(20, 4), backend="multiscale")
    with pytest.raises(ParameterError, match="truncate"):
        geomreg.divergence(x, y, backend="multiscale", truncate=-1.0)
    with pytest.raises(ParameterError, match="cluster_scale"):
        geomreg.divergence(x, y, backend="multiscale", cluster_scale=0.0)
    with pytest.raises(ParameterError, match="multiscale backend only"):
        geomreg.divergence(x, y, backend="tensorized", truncate=3.0)


def test_auto_takes_multiscale_for_large_3d_problems(monkeypatch):
    from geomreg.engine import native

    small = choose_backend("auto", n=1000, m=1000, dim=3, itemsize=4, memory_bytes=2**50)
    assert small.name == "tensorized"
    # with the compiled kernel (float32 or its float64 build): multiscale from 1000^2 pairs
    mid32 = choose_backend("auto", n=2000, m=1000, dim=2, itemsize=4, memory_bytes=2**50)
    assert mid32.name == ("multiscale" if native.kernel() is not None else "tensorized")
    mid64 = choose_backend("auto", n=2000, m=1000, dim=3, itemsize=8, memory_bytes=2**50)
    assert mid64.name == ("multiscale" if native.kernel(torch.float64) is not None else "tensorized")
    assert choose_backend("auto", n=2000, m=2001, dim=3, itemsize=8, memory_bytes=2**50).name == "multiscale"
    monkeypatch.setattr(native, "kernel", lambda dtype=None: None)  # no compiler: torch blocks, up to 2000^2
    assert choose_backend("auto", n=2000, m=2000, dim=3, itemsize=8, memory_bytes=2**50).name == "tensorized"
    assert choose_backend("auto", n=2000, m=1000, dim=3, itemsize=4, memory_bytes=2**50).name == "tensorized"
    assert choose_backend("auto", n=2000, m=2001, dim=3, itemsize=4, memory_bytes=2**50).name == "multiscale"
    big = choose_backend("auto", n=100_000, m=80_000, dim=3, itemsize=4, memory_bytes=2**50)
    assert big.name == "multiscale" and big.fallback is None
    no_room = choose_backend("auto", n=4000, m=4000, dim=3, itemsize=4, memory_bytes=2**20)
    assert no_room.name == "multiscale" and "needs about" in no_room.reason


def test_auto_result_records_the_choice():
    x, y = _clouds(n=300, m=300, dtype=torch.float32)
    r = geomreg.divergence(x, y, backend="multiscale", truncate=4.0)
    assert r.backend == "multiscale" and r.multiscale["truncate"] == 4.0
    d = r.to_dict()
    assert d["multiscale"]["clusters"] == r.multiscale["clusters"] and d["backend_fallback"] is None
    assert math.isfinite(d["value"])


# ---------------------------------------------------------------- real scans


def _rotated(points: torch.Tensor, angle: float, shift: float) -> torch.Tensor:
    c, s = math.cos(angle), math.sin(angle)
    rot = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]], dtype=points.dtype)
    return points @ rot.T + shift


@pytest.mark.parametrize(
    "pair",
    ["bunny-x/bunny-y (8171 + 8171)", "cloud_0 / cloud_0 moved (6535 + 6535)"],
)
def test_real_scans_within_one_percent_of_dense(pair, shared_data):
    """Multiscale (float32, defaults) vs the converged dense value, blur = 2% of the diameter."""
    from geomreg.io import read_measure

    if pair.startswith("bunny"):
        x = read_measure(shared_data / "clouds" / "probreg" / "bunny-x.txt").points
        y = read_measure(shared_data / "clouds" / "probreg" / "bunny-y.txt").points
    else:
        x = read_measure(shared_data / "clouds" / "probreg" / "cloud_0.pcd").points
        diameter = float((x.max(0) - x.min(0)) @ (x.max(0) - x.min(0))) ** 0.5
        x = torch.as_tensor(x)
        y = _rotated(x, 0.3, 0.1 * diameter).numpy()
        x = x.numpy()
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    both = torch.cat([x, y])
    blur = 0.02 * float((both.max(0).values - both.min(0).values).norm())
    got = geomreg.divergence(x, y, blur=blur, backend="multiscale")
    want = geomreg.divergence(x, y, blur=blur, backend="tensorized", tol=1e-4)  # float32 stalls near 1e-5
    assert got.converged and got.multiscale["jump_step"] > 0
    assert abs(got.value.item() / want.value.item() - 1) < 0.01, (got.value, want.value)

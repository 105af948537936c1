"""The multiscale backend's compiled kernel (geomreg/engine/native.py, lse_kernel.c).

Checked against brute-force float64 reductions, against the torch path it replaces
(``GEOMREG_NATIVE=0``), and for what happens without a compiler or with several processes
compiling into one fresh cache at once.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

import geomreg
from geomreg.engine import get_backend, native
from geomreg.engine import multiscale as ms
from geomreg.engine.base import Cost

pytestmark = pytest.mark.skipif(native.kernel() is None, reason="no C compiler: the torch path runs")


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _tiles(n, sizes):
    cuts = torch.cumsum(torch.tensor([0, *sizes]), 0)
    assert int(cuts[-1]) == n
    return cuts[:-1].clone(), cuts[1:].clone()


def _columns(m, counts, gen):
    """Runs of random sorted column sets, one per tile (a tile may have none)."""
    sels = [torch.randperm(m, generator=gen)[:k].sort().values.to(torch.int32) for k in counts]
    return (*ms._runs_of(sels), sels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("dim", "eps"), [(1, 0.003), (2, 0.003), (3, 0.003), (3, 0.0002)])
def test_row_and_column_reductions_equal_brute_force(dim, eps, dtype):
    """Both reductions against float64 log-sum-exps, with tiles of 1 to 37 rows (so that the
    kernel's 4-row groups have remainders), one tile without columns, and every column.

    At eps = 0.003 the rows' shifts come from the Cauchy-Schwarz bound (one pass); at 0.0002
    that bound is too loose and the kernel takes the maximum first (two passes). The float64
    build (double arithmetic, its own exp) is held to 1e-12 instead of float32's 2e-6."""
    gen = torch.Generator().manual_seed(0)
    n, m = 120, 300
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    # |u| <= 0.09 and |v| <= 0.15 / eps: the one-pass gap 2 |u| |v| is below 9 at eps = 0.003
    # and above 60 (the kernel's MAX_SLACK) at 0.0002
    x = (torch.rand(n, dim, generator=gen) * 0.1).to(dtype)
    y = (torch.rand(m, dim, generator=gen) * 0.1 + 0.02).to(dtype)
    h, hp = torch.randn(m, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
    sizes = [37, 1, 20, 3, 59]
    r0, r1 = _tiles(n, sizes)
    ptr, lo, hi, sels = _columns(m, [150, 7, 0, 120, 41], gen)
    assert lo.numel() < sum(s.numel() for s in sels)  # some runs are longer than one column
    p, q = native.points3(x), native.points3(y)
    c = ((x.double()[:, None] - y.double()[None]) ** 2).sum(-1) / 2  # (n, m)

    # rows: each row against its tile's columns
    out = torch.empty(n, dtype=dtype)
    native.rows_lse(p, q, h, r0, r1, ptr, lo, hi, eps, out)
    want = torch.empty(n, dtype=torch.float64)
    for a, b, sel in zip(r0.tolist(), r1.tolist(), sels, strict=True):
        z = h.double()[sel.long()][None] - c[a:b][:, sel.long()] / eps
        want[a:b] = torch.logsumexp(z, 1) if sel.numel() else -math.inf
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(out), finite)
    assert _rel(out[finite].double(), want[finite]) < tol

    native.rows_lse(p, q, h, r0, r1, None, None, None, eps, out)  # every column
    assert _rel(out.double(), torch.logsumexp(h.double()[None] - c / eps, 1)) < tol

    # the same pass with the rows' barycentres of their columns' points (NaN: no column)
    native.rows_lse(p, q, h, r0, r1, ptr, lo, hi, eps, out)
    mean, again = torch.empty(n, 3, dtype=dtype), torch.empty(n, dtype=dtype)
    native.rows_lse(p, q, h, r0, r1, ptr, lo, hi, eps, again, mean)
    assert torch.equal(torch.isfinite(again), torch.isfinite(out))
    assert _rel(again[torch.isfinite(out)], out[torch.isfinite(out)]) < tol / 2
    for a, b, sel in zip(r0.tolist(), r1.tolist(), sels, strict=True):
        if not sel.numel():
            assert bool(mean[a:b].isnan().all())
            continue
        w = torch.softmax(h.double()[sel.long()][None] - c[a:b][:, sel.long()] / eps, 1)
        want = w @ q.double()[sel.long()]
        assert float((mean[a:b].double() - want).abs().max()) < tol  # coordinates of size 0.1

    # columns: each kept column sums over the rows of the tiles that keep it
    w = torch.get_num_threads()
    amax, asum = torch.full((w, m), -math.inf, dtype=dtype), torch.zeros(w, m, dtype=torch.float64)
    native.cols_lse(p, q, hp, r0, r1, ptr, lo, hi, eps, amax, asum)
    got = native.merge_workers(amax, asum)
    mask = torch.zeros(n, m, dtype=torch.bool)
    for a, b, sel in zip(r0.tolist(), r1.tolist(), sels, strict=True):
        mask[a:b, sel.long()] = True
    z = torch.where(mask, hp.double()[:, None] - c / eps, -math.inf)
    want = torch.logsumexp(z, 0)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite) and not bool(finite.all())
    assert got.dtype == dtype and _rel(got[finite].double(), want[finite]) < tol


def _truncated(n=3000, m=2800, seed=3):
    """A float32 pair truncated with converged-looking potentials, and its sorted data."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=gen)
    y = torch.rand(m, 3, generator=gen) + 0.1
    r = geomreg.divergence(x, y, backend="multiscale", blur=0.05, potentials=True, debias=False)
    f, g = r.potentials
    be = get_backend("multiscale")
    scale = r.multiscale["cluster_scale"]
    rows = be.cluster(x[None], torch.ones(1, n), scale)
    cols = be.cluster(y[None], torch.ones(1, m), scale)
    return be, be.pair(x[None], y[None], Cost(2), rows=rows, cols=cols), f, g, rows, cols


def test_compiled_screening_is_safe_and_agrees_with_torch(monkeypatch):
    """Every dropped pair is tau * eps below its row's best (exact scores, float64); the kept
    sets are those of the torch screening up to rounding at the floor."""
    be, full, f, g, rows, cols = _truncated()
    eps = 0.0025
    cut = be.truncated(full, f[None], g[None], eps)
    assert cut.screen is None and cut.runs is not None
    assert 0.02 < cut.kept_fraction < 0.6
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    ref = be.truncated(full, f[None], g[None], eps)
    assert ref.runs is not None
    assert cut.kept_pairs == sum((t.r1 - t.r0) * cut.columns(k).numel() for k, t in enumerate(cut.tiles))
    xs, ys = full.x.double(), full.y.double()
    fs, gs = f[rows.perm].double(), g[cols.perm].double()
    tau = be.sinkhorn_truncate(2)
    same = total = 0
    for t, tile in enumerate(cut.tiles):
        mine, theirs_cols = cut.columns(t), ref.columns(t)
        rows = slice(tile.r0, tile.r1)
        score = fs[rows, None] + gs[None] - ((xs[rows, None] - ys[None]) ** 2).sum(-1) / 2
        kept = torch.zeros(ys.shape[0], dtype=torch.bool)
        kept[mine.long()] = True
        assert bool(torch.all(mine[1:] > mine[:-1]))  # sorted, no repeats
        margin = 1e-5  # float32 rounding of the scores
        assert bool((score[:, ~kept] < score.amax(1, keepdim=True) - tau * eps + margin).all())
        theirs = torch.zeros_like(kept)
        theirs[theirs_cols.long()] = True
        same += int((kept == theirs).sum())
        total += kept.numel()
    assert same / total > 0.999


def test_field_in_the_softmin_pass_equals_the_torch_path(monkeypatch):
    """The transport field (row barycentres) from the kernel's one pass, through sorted,
    truncated pairs, against the torch path's D extra softmins (the potentials of the two
    runs differ by float32 rounding; the raw pass is checked against float64 above)."""
    gen = torch.Generator().manual_seed(5)
    x, y = torch.rand(2500, 3, generator=gen), torch.rand(2300, 3, generator=gen) + 0.1
    kw = dict(backend="multiscale", blur=0.05, tol=1e-4, field=True)
    fields = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(native.ENV_SWITCH, switch)
        fields[switch] = geomreg.divergence(x, y, **kw).field
    assert float((fields["1"] - fields["0"]).abs().max()) < 1e-4


def test_transposed_and_unstored_pairs_match_the_torch_path(monkeypatch):
    """Sinkhorn values and potentials: compiled against torch, columns stored or screened again."""
    gen = torch.Generator().manual_seed(8)
    x, y = torch.rand(2500, 3, generator=gen), torch.rand(2300, 3, generator=gen) + 0.1
    out = {}
    for switch, limit in (("1", ms.STORED_COLUMNS_BYTES), ("1", 0), ("0", ms.STORED_COLUMNS_BYTES)):
        monkeypatch.setenv(native.ENV_SWITCH, switch)
        monkeypatch.setattr(ms, "STORED_COLUMNS_BYTES", limit)
        monkeypatch.setattr(ms, "_CHUNK_COLUMNS", 1 << 16)  # several runs of tiles
        r = geomreg.divergence(x, y, backend="multiscale", blur=0.05, tol=1e-4, potentials=True)
        assert r.multiscale["pairs_kept_fraction"]["xy"] < 0.6
        out[(switch, limit)] = (r.value, *r.potentials)
    (v1, f1, g1), (v0, f0, g0), (vt, ft, gt) = out.values()
    assert torch.equal(v1, v0) and torch.equal(f1, f0) and torch.equal(g1, g0)
    assert abs(float(v1 - vt)) < 1e-5 * abs(float(vt))
    assert _rel(f1, ft) < 1e-4 and _rel(g1, gt) < 1e-4


def test_float64_solves_equal_the_torch_path(monkeypatch):
    """float64 Sinkhorn through the float64 build of the reductions (the screening stays in
    torch) against the torch blocks: the same value and field to rounding."""
    gen = torch.Generator().manual_seed(10)
    x = torch.rand(2000, 3, generator=gen, dtype=torch.float64)
    y = torch.rand(1800, 3, generator=gen, dtype=torch.float64) + 0.1
    assert native.usable(x, y, double=True) and not native.usable(x, y)
    assert not native.usable(x, y.float(), double=True)  # one type for all
    kw = dict(backend="multiscale", blur=0.05, tol=1e-6, field=True)
    out = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(native.ENV_SWITCH, switch)
        out[switch] = geomreg.divergence(x, y, **kw)
    assert out["1"].n_iter == out["0"].n_iter
    assert abs(float(out["1"].value - out["0"].value)) < 1e-12 * abs(float(out["0"].value))
    assert float((out["1"].field - out["0"].field).abs().max()) < 1e-10


def test_gradients_keep_the_torch_path(monkeypatch):
    """The kernel is used only without autograd: a gradient still comes out."""
    gen = torch.Generator().manual_seed(9)
    x = torch.rand(800, 3, generator=gen).requires_grad_(True)
    y = torch.rand(700, 3, generator=gen) + 0.1
    assert not native.usable(x, y) and native.usable(x.detach(), y)
    assert not native.usable(x.double(), y.double(), double=True)
    r = geomreg.divergence(x, y, backend="multiscale", blur=0.05, tol=1e-4)
    (grad,) = torch.autograd.grad(r.value, x)
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    xt = x.detach().clone().requires_grad_(True)
    rt = geomreg.divergence(xt, y, backend="multiscale", blur=0.05, tol=1e-4)
    (grad_t,) = torch.autograd.grad(rt.value, xt)
    assert _rel(grad, grad_t) < 1e-3


def _child(cache: str, env_extra: dict[str, str], code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "XDG_CACHE_HOME": cache, **env_extra}
    env.pop(native.ENV_SWITCH, None)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


_PROBE = (
    "import torch, geomreg; from geomreg.engine import native\n"
    "x = torch.rand(3000, 3); y = torch.rand(3000, 3) + 0.1\n"
    "r = geomreg.divergence(x, y, backend='multiscale', blur=0.05)\n"
    "print(native.kernel() is not None, float(r.value))\n"
)


def test_without_a_compiler_the_torch_path_runs(tmp_path):
    proc = _child(str(tmp_path), {"CC": str(tmp_path / "no-such-cc")}, _PROBE)
    assert proc.returncode == 0, proc.stderr
    used, value = proc.stdout.split()
    assert used == "False" and 0 < float(value) < 1
    assert "could not be built" in proc.stderr and "no C compiler" in proc.stderr


def test_concurrent_first_runs_share_one_cache(tmp_path):
    """Three processes compile into one empty cache at once; each loads a whole library."""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    env.pop(native.ENV_SWITCH, None)
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    values = {o.split()[1] for o, _ in outs}
    assert all(o.split()[0] == "True" for o, _ in outs)
    assert len(values) == 3  # three random problems, each solved
    built = list((tmp_path / "geomreg" / "native").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temporary file left behind
    assert any("compiling the multiscale kernel once" in e for _, e in outs)

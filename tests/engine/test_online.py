"""The online (KeOps) backend against the dense one, its quiet stdout, and auto's choices.

KeOps compiles every new formula (and every backward formula) on first use, ~7 s each:
the tests share one dimension (D = 3), float64, and as few formulas as possible.
"""

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import geomreg
from geomreg.engine import Cost, Kernel, choose_backend, get_backend
from geomreg.engine import online as online_module
from geomreg.errors import BackendUnavailable

OK, WHY = online_module.keops_available()
if not OK:
    pytest.skip(f"KeOps unavailable: {WHY}", allow_module_level=True)

F64 = torch.float64


def _clouds(b=2, n=30, m=20, d=3, seed=0, dtype=F64, shared=4):
    """Random clouds whose first ``shared`` points coincide (exercises norms at 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, n, d, generator=g, dtype=dtype)
    y = torch.rand(b, m, d, generator=g, dtype=dtype) + 0.2
    y[:, :shared] = x[:, :shared]
    return x, y


def _weights(b, n, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(b, n, generator=g, dtype=F64) + 0.1
    return w / w.sum(-1, keepdim=True)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def engines():
    return get_backend("online"), get_backend("tensorized")


# ---------------------------------------------------------------- engine operations


@pytest.mark.parametrize("p", [1, 2])
def test_softmin_matches_tensorized(engines, p):
    on, te = engines
    x, y = _clouds()
    h = torch.randn(2, y.shape[1], dtype=F64, generator=torch.Generator().manual_seed(1))
    for eps in (0.5, 0.01):  # one compiled formula for every epsilon
        got = on.softmin(eps, on.pair(x, y, Cost(p)), h)
        want = te.softmin(eps, te.pair(x, y, Cost(p)), h)
        assert got.shape == want.shape == (2, x.shape[1])
        assert torch.allclose(got, want, rtol=1e-10, atol=0)


@pytest.mark.parametrize("name", ["gaussian", "laplacian", "energy"])
def test_kernel_sum_matches_tensorized(engines, name):
    on, te = engines
    x, y = _clouds()
    w = _weights(2, y.shape[1], seed=2)
    for sigma in (0.3, 2.0):
        got = on.kernel_sum(on.pair(x, y, Kernel(name, sigma)), w)
        want = te.kernel_sum(te.pair(x, y, Kernel(name, sigma)), w)
        assert got.shape == want.shape == (2, x.shape[1])
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(("n", "m"), [(1, 5), (4, 1), (1, 1)])
def test_single_point_measures(engines, n, m):
    """KeOps reads (B, 1, 1, D) as a parameter: one-point measures are padded, exactly."""
    on, te = engines
    x, y = _clouds(n=n, m=m, shared=0)
    h = torch.randn(2, m, dtype=F64, generator=torch.Generator().manual_seed(3))
    got = on.softmin(0.1, on.pair(x, y, Cost(2)), h)
    assert torch.allclose(got, te.softmin(0.1, te.pair(x, y, Cost(2)), h), rtol=1e-10, atol=0)
    w = h.exp()
    got = on.kernel_sum(on.pair(x, y, Kernel("energy", 1.0)), w)
    assert torch.allclose(got, te.kernel_sum(te.pair(x, y, Kernel("energy", 1.0)), w), rtol=1e-10)


# ---------------------------------------------------------------- divergences

CASES = {
    "sinkhorn-p2": dict(loss="sinkhorn", p=2, blur=0.05),
    "sinkhorn-p2-biased": dict(loss="sinkhorn", p=2, blur=0.05, debias=False),
    "sinkhorn-p1": dict(loss="sinkhorn", p=1, blur=0.05),
    "sinkhorn-p1-biased": dict(loss="sinkhorn", p=1, blur=0.05, debias=False),
    "sinkhorn-p2-unbalanced": dict(loss="sinkhorn", p=2, blur=0.05, reach=0.3),
    "hausdorff-p2": dict(loss="hausdorff", p=2, blur=0.05),
    "energy": dict(loss="energy"),
    "gaussian": dict(loss="gaussian", blur=0.2),
    "laplacian": dict(loss="laplacian", blur=0.2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_divergence_matches_tensorized(case):
    x, y = _clouds(n=40, m=35)
    a, b = _weights(2, 40, seed=4), _weights(2, 35, seed=5)
    kw = dict(a=a, b=b, tol=1e-9, **CASES[case])
    got = geomreg.divergence(x, y, backend="online", **kw)
    want = geomreg.divergence(x, y, backend="tensorized", **kw)
    assert got.backend == "online" and got.backend_reason == "requested"
    assert got.n_iter == want.n_iter
    assert torch.allclose(got.value, want.value, rtol=1e-6, atol=1e-12), (got.value, want.value)


def _grads(backend, x, y, a, b, wrt, **kw):
    x, y, a, b = (t.clone().requires_grad_(name in wrt) for t, name in zip((x, y, a, b), "xyab", strict=True))
    value = geomreg.divergence(x, y, a=a, b=b, backend=backend, normalize=False, **kw).value.sum()
    inputs = [t for t, name in zip((x, y, a, b), "xyab", strict=True) if name in wrt]
    return torch.autograd.grad(value, inputs)


@pytest.mark.parametrize(
    ("case", "wrt"),
    [
        ("sinkhorn-p2", "xyab"),  # point gradients through KeOps; weights by the envelope theorem
        ("hausdorff-p2", "xyab"),  # autograd through rows, columns and log-weights
        ("energy", "xyab"),  # through x_i, y_j and the weights w_j of a kernel sum
    ],
)
def test_gradients_match_tensorized(case, wrt):
    x, y = _clouds(n=40, m=35, seed=6)
    a, b = _weights(2, 40, seed=7), _weights(2, 35, seed=8)
    kw = dict(tol=1e-10, **CASES[case])
    got = _grads("online", x, y, a, b, wrt, **kw)
    want = _grads("tensorized", x, y, a, b, wrt, **kw)
    for name, g_on, g_te in zip(wrt, got, want, strict=True):
        assert torch.isfinite(g_on).all(), name
        assert _rel(g_on, g_te) < 1e-6, (name, _rel(g_on, g_te))


@pytest.mark.parametrize("case", ["sinkhorn-p1", "energy"])
def test_gradients_finite_at_coincident_points(case):
    """|x - y| at x = y: value exactly 0, zero subgradient (KeOps' rsqrt(0) = 0), no NaN."""
    x, _ = _clouds(n=12, m=12, seed=9)
    y = x.clone()
    y[:, 6:] += 0.3  # half the points coincide
    got = _grads("online", x, y, _weights(2, 12, 1), _weights(2, 12, 2), "xy", tol=1e-10, **CASES[case])
    want = _grads("tensorized", x, y, _weights(2, 12, 1), _weights(2, 12, 2), "xy", tol=1e-10, **CASES[case])
    for g_on, g_te in zip(got, want, strict=True):
        assert torch.isfinite(g_on).all()
        assert _rel(g_on, g_te) < 1e-6


def test_float32_agrees_with_float64():
    x, y = _clouds(n=200, m=150, seed=10)
    kw = dict(loss="sinkhorn", p=2, blur=0.05, backend="online")
    v32 = geomreg.divergence(x.float(), y.float(), **kw)
    v64 = geomreg.divergence(x, y, **kw)
    assert v32.dtype == "float32" and v64.dtype == "float64"
    assert _rel(v32.value.double(), v64.value) < 1e-4


# ---------------------------------------------------------------- stdout and choices


def test_stdout_to_stderr_redirects_python_and_fd_writes(capfd):
    with online_module.stdout_to_stderr():
        print("python print")
        os.write(1, b"fd write\n")
    print("after")
    out, err = capfd.readouterr()
    assert out == "after\n"
    assert "python print" in err and "fd write" in err


def test_pykeops_not_imported_with_geomreg():
    code = "import sys, geomreg, geomreg.engine.online; assert 'pykeops' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_stdout_is_one_float(tmp_path):
    script = Path(sys.executable).parent / "geomreg"
    if not script.exists():
        pytest.skip(f"console script {script} not installed")
    g = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", g.random((50, 3)))
    np.save(tmp_path / "b.npy", g.random((40, 3)) + 0.1)
    run = subprocess.run(
        [str(script), "distance", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--backend", "online"],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = run.stdout.splitlines()
    assert len(lines) == 1 and run.stdout == lines[0] + "\n", run.stdout
    assert float(lines[0]) > 0
    assert "[KeOps]" not in run.stdout


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "KeOps crashed (SIGSEGV)"),
        ("import sys; sys.exit('no luck')", "test process failed (exit 1: no luck)"),
        ("print('[true, 1]'); print('[true, \"fine\"]')", "fine"),  # the last line counts
    ],
)
def test_probe_subprocess_outcomes(monkeypatch, code, reason):
    """A crash of KeOps in the test process (seen with CUDA 13 on an H100) is an answer, not a crash."""
    monkeypatch.setattr(online_module, "_PROBE_CODE", code)
    ok, why = online_module._probe_in_subprocess()
    assert ok == (reason == "fine") and reason in why


def test_auto_picks_online_for_large_problems():
    small = choose_backend("auto", n=1000, m=1000, dim=3, itemsize=4, memory_bytes=2**50)
    assert small.name == "tensorized"
    # on the CPU, multiscale takes one pair of 3-D clouds; online the rest (batches, D > 3)
    big_cpu = choose_backend("auto", n=100_000, m=80_000, dim=3, itemsize=4, memory_bytes=2**50)
    assert big_cpu.name == "multiscale"
    for kw in (dict(dim=4), dict(dim=3, batch=2)):
        big = choose_backend("auto", n=100_000, m=80_000, itemsize=4, memory_bytes=2**50, **kw)
        assert big.name == "online" and big.fallback is None
    big = choose_backend(
        "auto", n=100_000, m=80_000, dim=3, itemsize=4, memory_bytes=2**50, device_type="cuda"
    )
    assert big.name == "online" and "dense limit" in big.reason
    no_room = choose_backend("auto", n=4000, m=4000, dim=5, itemsize=4, memory_bytes=2**20)
    assert no_room.name == "online" and "needs about" in no_room.reason
    assert choose_backend("online", n=10, m=10, dim=3, itemsize=4, memory_bytes=None).name == "online"


def test_unavailable_keops(monkeypatch):
    monkeypatch.setattr(online_module, "keops_available", lambda: (False, "no compiler here"))
    with pytest.raises(BackendUnavailable, match="online needs pykeops.*no compiler here"):
        get_backend("online")
    with pytest.raises(BackendUnavailable, match="no compiler here"):
        choose_backend("online", n=10, m=10, dim=3, itemsize=4, memory_bytes=None)
    # auto takes multiscale (3-D, one pair) or dense matrices (when they fit), and says so
    gpu = dict(n=100_000, m=80_000, itemsize=4, memory_bytes=2**50, device_type="cuda")
    fallback = choose_backend("auto", dim=3, **gpu)
    assert fallback.name == "multiscale" and "no compiler here" in fallback.fallback
    fallback = choose_backend("auto", dim=4, **gpu)
    assert fallback.name == "tensorized" and "no compiler here" in fallback.fallback
    with pytest.raises(BackendUnavailable, match="pip install 'pykeops"):
        choose_backend("auto", n=100_000, m=80_000, dim=4, itemsize=4, memory_bytes=2**30)


def test_warmup_command_compiles_forward_and_backward_and_reports(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    res = CliRunner().invoke(
        app, ["warmup", "--loss", "energy", "--dim", "2", "--dtype", "float64", "--json"]
    )
    assert res.exit_code == 0, res.output
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("[")][0]
    done = json.loads(line)
    assert [(c["loss"], c["dim"], c["dtype"]) for c in done] == [("energy", 2, "float64")]
    from geomreg.engine import native

    state = "compiled" if native.kernel() is not None else "not built"
    assert f"ready: multiscale kernel, {state}" in res.stderr
    bad = CliRunner().invoke(app, ["warmup", "--loss", "nope"])
    assert bad.exit_code == 2


def test_parallel_first_compilations_do_not_collide(tmp_path):
    """Three processes compile the same new formulas in a fresh KeOps folder at once.

    The forward formula and the backward one (compiled inside torch's autograd) both: without
    a lock around the backward one, a process imported another's half-written library
    ("ImportError: ... file too short").
    """
    script = tmp_path / "job.py"
    script.write_text(
        "import sys, torch, pykeops\n"
        f"pykeops.set_build_folder({str(tmp_path / 'keops')!r})\n"
        "import geomreg\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.rand(30, 2, generator=g, dtype=torch.float64).requires_grad_(True)\n"
        "y = torch.rand(20, 2, generator=g, dtype=torch.float64)\n"
        "r = geomreg.divergence(x, y, loss='laplacian', blur=0.3, backend='online')\n"
        "(gx,) = torch.autograd.grad(r.value, x)\n"
        "print(repr(r.value.item()), repr(gx.abs().sum().item()))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-500:] for o in outs]
    values = {o[0].strip() for o in outs}
    assert len(values) == 1


def test_each_formula_loads_once_under_the_folder_lock(monkeypatch):
    held = {"now": False}
    events = []

    @contextlib.contextmanager
    def fake_lock(folder):
        held["now"] = True
        yield
        held["now"] = False

    def inner(*args):
        events.append((args, held["now"]))
        return len(events)

    inner.reset = lambda *a, **k: events.append(("reset", held["now"]))
    monkeypatch.setattr(online_module, "_folder_lock", fake_lock)
    binder = online_module._LockedBinder(inner)
    binder("f", 1)
    binder("f", 1)
    binder("g", 1)
    binder.reset()
    binder("f", 1)
    first, again, other, reset, after_reset = events
    assert first == (("f", 1), True) and again == (("f", 1), False) and other == (("g", 1), True)
    assert reset == ("reset", False) and after_reset == (("f", 1), True)


def test_backward_reductions_go_through_the_locked_binders(monkeypatch):
    """autograd's backward formulas load through the same (locked) binders as forward ones."""
    online_module._lazy_tensor()
    from pykeops.common.keops_io import keops_binder

    assert all(isinstance(b, online_module._LockedBinder) for b in keops_binder.values())
    formulas = []
    locked = keops_binder["cpp"]

    def spy(*args):
        formulas.append(" ".join(map(str, args)))
        return locked(*args)

    monkeypatch.setitem(keops_binder, "cpp", spy)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(30, 3, generator=g).requires_grad_(True)
    y = torch.rand(20, 3, generator=g)
    r = geomreg.divergence(x, y, blur=0.3, backend="online")
    torch.autograd.grad(r.value, x)
    assert formulas and any("Grad" in f for f in formulas)


@pytest.mark.parametrize("p,formula", [(2, "SqDist(X,Y)/2"), (1, "Norm2(X-Y)")])
def test_formula_cost_equals_the_builtin_cost(p, formula):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(40, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.rand(30, 3, generator=g, dtype=torch.float64) + 0.1
    custom = geomreg.divergence(x, y, p=p, cost=formula, tol=1e-8)
    builtin = geomreg.divergence(x, y, p=p, backend="tensorized", tol=1e-8)
    assert custom.backend == "online" and custom.params["cost"] == formula
    assert custom.value.item() == pytest.approx(builtin.value.item(), rel=1e-9)
    (g1,) = torch.autograd.grad(custom.value, x)
    (g2,) = torch.autograd.grad(builtin.value, x)
    assert torch.allclose(g1, g2, atol=1e-9)
    hd = geomreg.divergence(x, y, p=p, loss="hausdorff", cost=formula).value.item()
    hd_ref = geomreg.divergence(x, y, p=p, loss="hausdorff", backend="tensorized").value.item()
    assert hd == pytest.approx(hd_ref, rel=1e-9)


def test_formula_cost_changes_the_value_and_is_validated():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(40, 2, generator=g, dtype=torch.float64)
    y = torch.rand(30, 2, generator=g, dtype=torch.float64) + 0.1
    quartic = geomreg.divergence(x, y, cost="Square(SqDist(X,Y))", tol=1e-8).value.item()
    quadratic = geomreg.divergence(x, y, backend="tensorized", tol=1e-8).value.item()
    assert quartic > 0 and abs(quartic / quadratic - 1) > 0.1
    for kwargs, where in [
        (dict(cost="SqDist(X,"), "cost"),
        (dict(cost="SqDist(X,Y)", backend="tensorized"), "cost"),
        (dict(cost="SqDist(X,Y)", loss="energy"), "cost"),
        (dict(cost="  "), "cost"),
    ]:
        with pytest.raises(geomreg.ParameterError) as err:
            geomreg.divergence(x, y, **kwargs)
        assert err.value.where == where

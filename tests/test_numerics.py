"""Numerical edge cases: tiny blurs far apart, far offsets, single and coincident points,
zero weights, very unequal masses, one point against many, and D = 1 and D = 10.

Every expected value is independent of the code under test: a closed form (translates,
a single source point, the 1-D quantile coupling), a formula evaluated here with numpy,
POT's unbalanced solver, finite differences, or an invariance of the definition (a
translation, removing zero-weight points) checked against the same computation done the
plain way.
"""

import functools
import math

import numpy as np
import pytest
import torch

import geomreg
import geomreg.api

LOSSES = ("sinkhorn", "energy", "gaussian", "laplacian", "hausdorff")
#: coordinates of a UTM-like site (easting, northing, height)
UTM = np.array([500_000.0, 4_000_000.0, 100.0])


@functools.cache
def _keops() -> tuple[bool, str]:
    from geomreg.engine.online import keops_available

    return keops_available()


def div(x, y, backend, **kw):
    """``geomreg.divergence`` on one backend; online is skipped where KeOps cannot run."""
    if backend == "online":
        ok, why = _keops()
        if not ok:
            pytest.skip(f"online backend unavailable here: {why}")
    return geomreg.divergence(x, y, backend=backend, **kw)


def rel(got: float, want: float) -> float:
    return abs(got - want) / abs(want)


def cost(x: np.ndarray, y: np.ndarray, p: int) -> np.ndarray:
    """The ground cost matrix, README's convention: |x-y| (p = 1) or |x-y|^2 / 2 (p = 2)."""
    d = np.linalg.norm(x[:, None, :] - y[None, :, :], axis=-1)
    return d if p == 1 else d**2 / 2


# 1. blur 1e-4 with clouds 1e3 apart, float32 -------------------------------------------


@pytest.mark.parametrize("backend", ["tensorized", "online", "multiscale"])
def test_tiny_blur_far_apart_float32_translates(backend):
    """S(alpha, alpha + t) = |t|^2 / 2 at any blur, gradient -a_i t (the plan is a shift)."""
    rng = np.random.default_rng(10)
    x0 = rng.random((40, 3))
    t = np.array([600.0, -800.0, 0.0])  # |t| = 1000: C/eps reaches 5e13
    x = torch.tensor(x0, dtype=torch.float32, requires_grad=True)
    y = torch.tensor(x0 + t, dtype=torch.float32)
    # Multiscale's marginal error stalls above tol at this eps (potentials of ~5e5 resolve
    # to ~1e-10 = eps / 100 in float64, ~0.03 in float32); the value needs no more steps.
    extra = {"max_iter": 30} if backend == "multiscale" else {}  # the schedule takes 27
    r = div(x, y, backend, blur=1e-4, **extra)
    r.value.backward()
    assert math.isfinite(r.value.item())
    assert rel(r.value.item(), t @ t / 2) < 1e-2
    assert torch.isfinite(x.grad).all()
    want = -np.tile(t / 40, (40, 1))  # a_i = 1/40
    err = np.linalg.norm(x.grad.numpy() - want, axis=1).max()
    assert err < 1e-2 * np.linalg.norm(t / 40)


def test_tiny_blur_far_apart_float32_matches_float64():
    """Two different clouds 1e3 apart at blur 1e-4: float32 within 1% of float64."""
    rng = np.random.default_rng(11)
    x0, y0 = rng.random((40, 3)), rng.random((30, 3)) + np.array([1000.0, 0.0, 0.0])
    values, grads = {}, {}
    for dt in (torch.float32, torch.float64):
        x = torch.tensor(x0, dtype=dt, requires_grad=True)
        # float64 does not reach tol here either (C/eps = 5e13 exceeds what it resolves);
        # its value is settled long before 200 iterations
        r = div(x, torch.tensor(y0, dtype=dt), "tensorized", blur=1e-4, max_iter=200)
        r.value.backward()
        values[dt], grads[dt] = r.value.item(), x.grad.double().numpy()
    assert all(math.isfinite(v) for v in values.values())
    assert np.isfinite(grads[torch.float32]).all()
    assert rel(values[torch.float32], values[torch.float64]) < 1e-2
    scale = np.linalg.norm(grads[torch.float64], axis=1).max()
    assert np.linalg.norm(grads[torch.float32] - grads[torch.float64], axis=1).max() < 1e-2 * scale


# 2. UTM-scale offsets --------------------------------------------------------------------


def _utm_clouds():
    rng = np.random.default_rng(12)
    return rng.random((60, 3)), rng.random((50, 3)) * 0.8 + 0.15


@pytest.mark.parametrize(
    "backend,loss",
    [("tensorized", loss) for loss in LOSSES]
    + [("online", "sinkhorn"), ("online", "hausdorff"), ("multiscale", "sinkhorn"), ("multiscale", "energy")],
)
def test_utm_offset_float64(backend, loss):
    """Adding (500000, 4000000, 100) to both clouds changes nothing (float64)."""
    x0, y0 = _utm_clouds()
    kw = dict(loss=loss, blur=0.05, dtype="float64")
    centred = div(x0, y0, backend, **kw).value.item()
    far = div(x0 + UTM, y0 + UTM, backend, **kw).value.item()
    assert math.isfinite(far)
    assert rel(far, centred) < 1e-3


@pytest.mark.parametrize("loss", ["sinkhorn", "energy"])
def test_utm_offset_float32_from_float64_coordinates(loss):
    """float64 coordinates (what every reader returns) computed in float32 far from 0."""
    x0, y0 = _utm_clouds()
    centred = div(x0, y0, "tensorized", loss=loss, blur=0.05, dtype="float64").value.item()
    far = div(x0 + UTM, y0 + UTM, "tensorized", loss=loss, blur=0.05, dtype="float32",
              max_iter=100).value.item()  # the mangled clouds need not converge
    assert rel(far, centred) < 1e-3


@pytest.mark.parametrize(
    "backend,loss",
    [("tensorized", "sinkhorn"), ("tensorized", "energy"), ("tensorized", "hausdorff"),
     ("online", "sinkhorn"), ("multiscale", "sinkhorn")],
)
def test_utm_offset_float32_tensors(backend, loss):
    """float32 tensors far from 0 (exactly representable there) give the centred value."""
    rng = np.random.default_rng(13)
    # multiples of 1/4: exact in float32 at 4e6 (whose spacing is 1/4), extent 10
    x0 = rng.integers(0, 40, (60, 3)) * 0.25
    y0 = rng.integers(4, 44, (50, 3)) * 0.25
    far_x = torch.tensor(x0 + UTM, dtype=torch.float32)
    far_y = torch.tensor(y0 + UTM, dtype=torch.float32)
    assert np.array_equal(far_x.double().numpy(), x0 + UTM)  # the test's own premise
    centred = div(x0, y0, backend, loss=loss, blur=0.5, dtype="float64").value.item()
    far = div(far_x, far_y, backend, loss=loss, blur=0.5).value.item()
    assert rel(far, centred) < 1e-3


# 3. identical single points -----------------------------------------------------------


_SINGLE = [(loss, p, None) for loss in LOSSES for p in (1, 2)] + [("sinkhorn", 1, 0.5), ("sinkhorn", 2, 0.5)]


@pytest.mark.parametrize("backend", ["tensorized", "multiscale", "online"])
@pytest.mark.parametrize("loss,p,reach", _SINGLE)
def test_identical_single_points_give_zero(backend, loss, p, reach):
    """One point against the same point: 0 for every loss, p = 1 and 2, gradient 0."""
    if backend == "online" and (p != 2 or loss not in ("sinkhorn", "hausdorff")):
        pytest.skip("online: the p = 2 softmin formulas cover it (each formula compiles)")
    # tensorized: both dtypes, near and far from 0; the others (slower per call): float64, far
    grid = [(dt, w) for dt in (torch.float64, torch.float32) for w in ([0.3, -1.2, 5.0], list(UTM))]
    for dt, where in grid if backend == "tensorized" else [(torch.float64, list(UTM))]:
        x = torch.tensor([where], dtype=dt, requires_grad=True)
        y = torch.tensor([where], dtype=dt, requires_grad=True)
        r = div(x, y, backend, loss=loss, p=p, reach=reach, blur=0.05)
        r.value.backward()
        assert r.value.item() == 0.0, (dt, where)
        assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(y.grad, torch.zeros_like(y))


# 4. coincident points with the energy loss ----------------------------------------------


def energy_reference(x, a, y, b):
    """Value and point gradient of the energy loss, by numpy, exact at coincident points."""
    def k(u, v):
        return -np.linalg.norm(u[:, None] - v[None], axis=-1)

    def dk(u, v, w):  # sum_j w_j grad_u k(u_i, v_j); the (sub)gradient is 0 at u = v
        d = u[:, None] - v[None]
        n = np.linalg.norm(d, axis=-1)
        unit = np.where(n[..., None] > 0, d / np.where(n > 0, n, 1.0)[..., None], 0.0)
        return -(unit * w[None, :, None]).sum(1)

    value = 0.5 * a @ k(x, x) @ a + 0.5 * b @ k(y, y) @ b - a @ k(x, y) @ b
    return value, a[:, None] * (dk(x, x, a) - dk(x, y, b))


@pytest.mark.parametrize(
    "backend,dim",
    [("tensorized", 3), ("tensorized", 10), ("tensorized", 40), ("online", 3), ("multiscale", 3)],
)
def test_energy_at_coincident_points(backend, dim):
    """x == y exactly, and duplicated points: exact values, gradients without NaN."""
    rng = np.random.default_rng(14)
    base = rng.random((20, dim)) * 4 + 2  # away from the origin: |x|^2 >> rounding
    x_dup = np.concatenate([base, base[:5], base[:5]])  # every one of 5 points three times
    y_other = rng.random((25, dim)) * 4 + 2.5
    a = rng.random(len(x_dup)) + 0.1
    a /= a.sum()
    dtypes = (torch.float64,) if backend == "online" else (torch.float64, torch.float32)
    for dt in dtypes:
        tight = dt == torch.float64
        # (x, a) against: itself; itself with other weights; another cloud
        for y_np, b in ((x_dup, a), (x_dup, np.full(len(x_dup), 1 / len(x_dup))),
                        (y_other, np.full(25, 1 / 25))):
            x = torch.tensor(x_dup, dtype=dt, requires_grad=True)
            y = torch.tensor(y_np, dtype=dt, requires_grad=True)
            r = div(x, y, backend, loss="energy", a=a, b=b)
            r.value.backward()
            assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()
            value, grad = energy_reference(x_dup, a, y_np, b)
            if b is a:  # the same measure: 0, and a gradient that vanishes (up to round-off)
                assert r.value.item() == 0.0
                assert value == 0.0 and not grad.any()
                bound = (1e-12 if tight else 1e-5) * a.max()
                assert x.grad.abs().max() <= bound and y.grad.abs().max() <= bound
                continue
            assert r.value.item() == pytest.approx(value, rel=1e-11 if tight else 1e-3)
            scale = np.abs(grad).max()
            assert np.abs(x.grad.double().numpy() - grad).max() <= (1e-11 if tight else 1e-4) * scale


# 5. zero weights -------------------------------------------------------------------------


def _zero_weight_problem():
    rng = np.random.default_rng(15)
    x, y = rng.random((30, 3)), rng.random((25, 3)) * 0.8 + 0.2
    a, b = rng.random(30) + 0.1, rng.random(25) + 0.1
    a[[0, 7, 8]] = 0.0
    b[[3]] = 0.0
    x[7] = y[4]  # a zero-weight point on a target point
    x[8] = x[9]  # and one on a source point
    return x, a, y, b


_ZERO_CASES = [("sinkhorn", 2, None), ("sinkhorn", 1, None), ("sinkhorn", 2, 0.3), ("energy", 2, None),
               ("gaussian", 2, None), ("laplacian", 2, None), ("hausdorff", 2, None), ("hausdorff", 1, None)]


@pytest.mark.parametrize(
    "backend,loss,p,reach",
    [("tensorized", *c) for c in _ZERO_CASES] + [("multiscale", *c) for c in _ZERO_CASES]
    + [("online", "sinkhorn", 2, None), ("online", "sinkhorn", 2, 0.3), ("online", "hausdorff", 2, None)],
)
def test_zero_weights_contribute_nothing(backend, loss, p, reach):
    """Points of weight 0: same value as without them; their point gradients are 0."""
    x, a, y, b = _zero_weight_problem()
    # same schedule (diameter) for both problems, converged far below the comparison's 1e-6
    kw = dict(loss=loss, p=p, reach=reach, blur=0.1, diameter=2.0, tol=1e-8, dtype="float64")
    ka, kb = a > 0, b > 0
    want = div(x[ka], y[kb], backend, a=a[ka], b=b[kb], **kw).value.item()
    xs, ys = torch.tensor(x, requires_grad=True), torch.tensor(y, requires_grad=True)
    at, bt = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    r = div(xs, ys, backend, a=at, b=bt, **kw)
    r.value.backward()
    assert r.value.item() == pytest.approx(want, rel=1e-6)
    for t in (xs, ys, at, bt):
        assert torch.isfinite(t.grad).all()
    assert not xs.grad[~ka].any() and not ys.grad[~kb].any()  # a_i * grad F(x_i) = 0


@pytest.mark.parametrize("loss,p", [("sinkhorn", 2), ("sinkhorn", 1), ("energy", 2), ("hausdorff", 2),
                                    ("hausdorff", 1)])
def test_zero_weight_gradients_match_finite_differences(loss, p):
    """d value / d a_j at a_j = 0: the one-sided finite difference (weights stay >= 0)."""
    x, a, y, b = _zero_weight_problem()
    # a blur where a weight of h moves nothing but linearly (at small blurs an isolated
    # point's own mass term curves the value until h is far below float64's resolution)
    kw = dict(loss=loss, p=p, blur=0.3, diameter=2.0, tol=1e-12, max_iter=20000, dtype="float64")
    at, bt = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    r = div(x, y, "tensorized", a=at, b=bt, **kw)
    r.value.backward()
    h = 1e-7
    for w, grad, j in ((a, at.grad, 0), (a, at.grad, 7), (a, at.grad, 8), (a, at.grad, 1),
                       (b, bt.grad, 3), (b, bt.grad, 4)):
        bumped = w.copy()
        bumped[j] += h
        args = dict(a=bumped, b=b) if w is a else dict(a=a, b=bumped)
        fd = (div(x, y, "tensorized", **args, **kw).value.item() - r.value.item()) / h
        assert grad[j].item() == pytest.approx(fd, rel=1e-4, abs=1e-7), (j, w is a)


# 6. very unequal masses, unbalanced ------------------------------------------------------


def _generalised_kl(p, q):
    p, q = np.ravel(p), np.ravel(q)
    return np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0) / q), 0.0)) - p.sum() + q.sum()


def _pot_uot(x, a, y, b, eps, rho):
    """POT's entropic unbalanced plan; the primal objective and its gradient in x (p = 2)."""
    ot = pytest.importorskip("ot")
    c = cost(x, y, 2)
    plan = ot.unbalanced.sinkhorn_unbalanced(a, b, c, eps, rho, method="sinkhorn_stabilized",
                                             numItermax=200_000, stopThr=1e-13)
    value = ((plan * c).sum() + eps * _generalised_kl(plan, np.outer(a, b))
             + rho * _generalised_kl(plan.sum(1), a) + rho * _generalised_kl(plan.sum(0), b))
    grad = (plan[:, :, None] * (x[:, None] - y[None])).sum(1)  # envelope theorem, C = |x-y|^2/2
    return value, grad


@functools.cache
def _unbalanced_problem(m_a, m_b):
    """Clouds, weights of total masses m_a and m_b, and POT's S_eps and its x-gradient."""
    rng = np.random.default_rng(16)
    x, y = rng.random((30, 2)), rng.random((25, 2)) * 0.8 + 0.3
    a, b = rng.random(30) + 0.1, rng.random(25) + 0.1
    a, b = a * (m_a / a.sum()), b * (m_b / b.sum())
    eps, rho = 0.1**2, 0.5**2
    v_ab, g_ab = _pot_uot(x, a, y, b, eps, rho)
    v_aa, g_aa = _pot_uot(x, a, x, a, eps, rho)
    v_bb, _ = _pot_uot(y, b, y, b, eps, rho)
    # S = OT(a, b) - OT(a, a)/2 - OT(b, b)/2 + (eps/2)(m_a - m_b)^2, all with the generalised
    # KL (README; Séjourné et al. 2019); OT(a, a) has x on both sides and a symmetric plan,
    # hence the full g_aa; the mass term does not depend on the points
    return x, a, y, b, v_ab - v_aa / 2 - v_bb / 2 + eps / 2 * (m_a - m_b) ** 2, g_ab - g_aa


@pytest.mark.parametrize("masses", [(1.0, 1000.0), (1e-3, 1.0)], ids=["1-vs-1000", "1e-3-vs-1"])
@pytest.mark.parametrize("backend", ["tensorized", "online", "multiscale"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_unbalanced_unequal_masses_match_pot(masses, backend, dtype):
    """reach 0.5, blur 0.1, keep-mass: POT's primal objective and its gradient."""
    if backend == "online" and dtype == "float32":
        pytest.skip("online: the float64 formulas cover it (each formula compiles)")
    x, a, y, b, want, want_grad = _unbalanced_problem(*masses)
    xt = torch.tensor(x, dtype=getattr(torch, dtype), requires_grad=True)
    r = div(xt, y, backend, a=a, b=b, blur=0.1, reach=0.5, normalize=False, tol=1e-6, dtype=dtype)
    r.value.backward()
    assert math.isfinite(r.value.item()) and torch.isfinite(xt.grad).all()
    tight = dtype == "float64"
    assert r.value.item() == pytest.approx(want, rel=1e-6 if tight else 1e-4)
    err = np.abs(xt.grad.double().numpy() - want_grad).max()
    # (GeomLoss 0.3.1's gradients are off by (rho + eps/2)/(rho + eps) - 1 = 2% here)
    assert err <= (1e-4 if tight else 1e-3) * np.abs(want_grad).max()


# 7. one point against 1e5 ----------------------------------------------------------------


@functools.cache
def _many_points():
    rng = np.random.default_rng(17)
    y = rng.random((100_000, 3))
    b = rng.random(100_000) + 0.1
    return np.array([[0.3, 0.6, 0.2]]), y, b / b.sum()


def _one_point_reference(x0, y, b, eps, rho):
    """OT_eps(delta_x0, beta): the plan has one row, so the problem is one-dimensional.

    Balanced, the plan is the product b (its row must be b): OT = <b, C(x0, .)>. Unbalanced,
    the plan's row pi_j = b_j exp(-(C_j + rho log m) / (eps + rho)), m = sum pi, solves the
    first-order conditions, so m^((eps + 2 rho)/(eps + rho)) = sum_j b_j e^(-C_j/(eps + rho)).
    """
    c = cost(x0, y, 2)[0]
    grad_c = x0 - y  # grad_x0 C(x0, y_j)
    if rho is None:
        return b @ c, (b[:, None] * grad_c).sum(0)
    z = b @ np.exp(-c / (eps + rho))
    m = z ** ((eps + rho) / (eps + 2 * rho))
    pi = b * np.exp(-(c + rho * np.log(m)) / (eps + rho))
    # <pi, C> + eps KL(pi | 1 x b) + rho KL(m | 1) + rho KL(pi | b)
    value = pi @ c + (eps + rho) * _generalised_kl(pi, b) + rho * _generalised_kl(m, 1.0)
    return value, (pi[:, None] * grad_c).sum(0)


@pytest.mark.parametrize(
    "backend",
    ["tensorized",
     "online",
     # 4 to 9 s on 2 busy cores (clustering 1e5 points), hence slow
     pytest.param("multiscale", marks=pytest.mark.slow)],
)
@pytest.mark.parametrize("reach", [None, 0.5])
@pytest.mark.parametrize("swap", [False, True], ids=["1-vs-1e5", "1e5-vs-1"])
def test_one_point_against_many(backend, reach, swap, monkeypatch):
    """N = 1 against M = 1e5 (1e5 pairs: OT_eps, not debiased), float64: closed forms."""
    # the same memory on every machine: 16 GiB hold 2e5 floats, not 5e10
    monkeypatch.setattr(geomreg.api, "_available_memory", lambda device: 16 << 30)
    if backend == "multiscale" and (swap or reach is not None):
        pytest.skip("multiscale: one orientation, balanced")
    if backend == "online" and swap and reach is not None:
        pytest.skip("unbalanced: one orientation (33 iterations over 1e5 pairs)")
    x0, y, b = _many_points()
    want, want_grad = _one_point_reference(x0, y, b, 0.1**2, None if reach is None else reach**2)
    x = torch.tensor(x0, requires_grad=True)
    # balanced, the first update is already exact; unbalanced, tol 1e-5 puts the value
    # within ~2e-7 of the closed form (33 iterations; the default 1e-3: 2e-6)
    kw = dict(blur=0.1, reach=reach, debias=False, dtype="float64", tol=1e-5)
    r = div(torch.tensor(y), x, backend, a=b, **kw) if swap else div(x, torch.tensor(y), backend, b=b, **kw)
    r.value.backward()
    assert math.isfinite(r.value.item())
    assert r.value.item() == pytest.approx(want, rel=1e-6)
    np.testing.assert_allclose(x.grad.numpy()[0], want_grad, rtol=1e-5, atol=1e-12)


# 8. D = 1 and D = 10 ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tensorized", "online", "multiscale"])
def test_one_dimension_translates(backend):
    """D = 1: S(alpha, alpha + t) = t^2 / 2 exactly (any blur)."""
    x = np.random.default_rng(18).random((60, 1))
    t = 0.37
    dtypes = ("float64",) if backend == "online" else ("float64", "float32")
    for dt in dtypes:
        r = div(x, x + t, backend, blur=0.05, dtype=dt)
        assert r.value.item() == pytest.approx(t * t / 2, rel=1e-5 if dt == "float64" else 1e-4)


def test_one_dimension_matches_quantile_coupling():
    """D = 1, equal sizes, uniform weights: small blur tends to W2^2 / 2 of the sorted matching."""
    rng = np.random.default_rng(19)
    x, y = np.sort(rng.random(50)), np.sort(rng.random(50) * 0.7 + 0.4)
    r = div(x[:, None], y[:, None], "tensorized", blur=0.01, dtype="float64")
    assert r.value.item() == pytest.approx(((x - y) ** 2).mean() / 2, rel=1e-3)


def test_ten_dimensions_tensorized_equals_online():
    """D = 10, float64: the same value and gradients on both backends."""
    rng = np.random.default_rng(20)
    x0, y0 = rng.random((120, 10)), rng.random((90, 10)) + 0.1
    out = {}
    for backend in ("tensorized", "online"):
        x = torch.tensor(x0, requires_grad=True)
        # converged far below the comparison, whatever the iteration at which each stops
        r = div(x, y0, backend, blur=0.2, dtype="float64", tol=1e-7)
        r.value.backward()
        assert math.isfinite(r.value.item()) and torch.isfinite(x.grad).all()
        out[backend] = r.value.item(), x.grad.numpy()
    assert out["online"][0] == pytest.approx(out["tensorized"][0], rel=1e-6)
    np.testing.assert_allclose(out["online"][1], out["tensorized"][1], rtol=0,
                               atol=1e-6 * np.abs(out["tensorized"][1]).max())

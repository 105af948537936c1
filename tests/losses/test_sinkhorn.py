"""Sinkhorn divergences: GeomLoss parity, exactness, gradients, convergence, edge cases."""

import math

import numpy as np
import pytest
import torch

import geomreg
from geomreg.errors import InputError, ParameterError
from geomreg.schedule import EpsilonSchedule

geomloss = pytest.importorskip("geomloss")


def weighted_clouds(n=60, m=45, d=3, shift=0.15, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=torch.float64)
    y = torch.rand(m, d, generator=g, dtype=torch.float64) * 0.8 + shift
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
    return x, a / a.sum(), y, b / b.sum()


def exact_distance(x, y):  # GeomLoss clamps p = 1 distances at 1e-4; this is the exact cost
    return ((x[:, :, None, :] - y[:, None, :, :]) ** 2).sum(-1).sqrt()


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("debias", [True, False])
@pytest.mark.parametrize("reach", [None, 0.4])
@pytest.mark.parametrize("blur,scaling", [(0.05, 0.5), (0.2, 0.7), (0.01, 0.3)])
def test_tol_inf_equals_geomloss_tensorized(p, debias, reach, blur, scaling):
    x, a, y, b = weighted_clouds()
    ours = geomreg.divergence(x, y, a=a, b=b, p=p, blur=blur, reach=reach, scaling=scaling,
                              debias=debias, tol=math.inf)
    loss = geomloss.SamplesLoss("sinkhorn", p=p, blur=blur, reach=reach, scaling=scaling,
                                debias=debias, backend="tensorized",
                                cost=exact_distance if p == 1 else None)
    ref = loss(a, x, b, y).item()
    assert ours.value.item() == pytest.approx(ref, rel=1e-6, abs=1e-12)
    assert ours.n_iter == len(EpsilonSchedule(p, ours.params["diameter"], blur, scaling)) + 1


def test_potentials_equal_geomloss_potentials():
    x, a, y, b = weighted_clouds()
    ours = geomreg.divergence(x, y, a=a, b=b, tol=math.inf, potentials=True)
    f, g = geomloss.SamplesLoss("sinkhorn", backend="tensorized", potentials=True)(a, x, b, y)
    assert torch.allclose(ours.potentials[0], f, atol=1e-10)
    assert torch.allclose(ours.potentials[1], g, atol=1e-10)


def test_schedule_matches_reference_example_and_geomloss():
    from geomloss._legacy.sinkhorn_divergence import epsilon_schedule

    sched = EpsilonSchedule(2, math.sqrt(3), 0.05, 0.5)
    expected = [3, 3, 0.75, 0.1875, 0.046875, 0.01171875, 0.0029296875, 0.0025]
    np.testing.assert_allclose(sched.epsilons, expected, rtol=1e-12)
    assert sched.epsilons == [float(e) for e in epsilon_schedule(2, math.sqrt(3), 0.05, 0.5)]
    assert EpsilonSchedule(2, 0.0, 0.05, 0.5).epsilons == pytest.approx([0.0025, 0.0025])  # d = 0


def test_default_tolerance_is_within_one_percent_of_converged():
    torch.manual_seed(0)
    for p, reach, blur in [(2, None, 0.05), (1, None, 0.05), (2, 0.3, 0.05), (2, None, 0.02)]:
        x = torch.rand(200, 3, dtype=torch.float64)
        y = torch.rand(150, 3, dtype=torch.float64) + 0.05
        ref = geomreg.divergence(x, y, p=p, reach=reach, blur=blur, tol=1e-10, max_iter=50000)
        dflt = geomreg.divergence(x, y, p=p, reach=reach, blur=blur)
        assert ref.converged and dflt.converged
        assert dflt.marginal_error <= geomreg.api.defaults.TOL
        assert dflt.value.item() == pytest.approx(ref.value.item(), rel=1e-2)


def test_geomloss_schedule_alone_stops_short_and_we_do_not():
    # docs/theory.md: GeomLoss's default stops ~13% short on uniform clouds (N = M = 2000);
    # the same effect at N = M = 500.
    torch.manual_seed(0)
    x, y = torch.rand(500, 3, dtype=torch.float64), torch.rand(500, 3, dtype=torch.float64)
    short = geomreg.divergence(x, y, tol=math.inf).value.item()
    ref = geomreg.divergence(x, y, tol=1e-9, max_iter=50000).value.item()
    ours = geomreg.divergence(x, y).value.item()
    assert short < 0.95 * ref  # the schedule alone is more than 5% short here
    assert ours == pytest.approx(ref, rel=1e-2)


def test_marginals_of_the_plan_match_the_reported_error():
    x, a, y, b = weighted_clouds(n=40, m=30)
    r = geomreg.divergence(x, y, a=a, b=b, debias=False, potentials=True, tol=1e-6, blur=0.1)
    f, g = r.potentials
    eps = r.params["eps"]
    c = torch.cdist(x, y) ** 2 / 2
    plan = a[:, None] * b[None, :] * torch.exp((f[:, None] + g[None, :] - c) / eps)
    err = max((plan.sum(1) - a).abs().sum().item(), (plan.sum(0) - b).abs().sum().item())
    assert err <= 1e-6
    # The value of OT_eps is the primal objective of that plan (strong duality).
    kl = (plan * torch.log(plan / (a[:, None] * b[None, :]))).sum() - plan.sum() + 1
    assert r.value.item() == pytest.approx(((plan * c).sum() + eps * kl).item(), rel=1e-6)


@pytest.mark.parametrize("m_b", [1.0, 0.6])
def test_unbalanced_value_is_the_primal_objective_even_for_unequal_masses(m_b):
    x, a, y, b = weighted_clouds(n=40, m=30)
    b = b * m_b
    rho, blur = 0.3**2, 0.1
    r = geomreg.divergence(x, y, a=a, b=b, reach=0.3, blur=blur, debias=False, normalize=False,
                           potentials=True, tol=1e-12, max_iter=20000)
    f, g = r.potentials
    eps = blur**2
    c = torch.cdist(x, y) ** 2 / 2
    plan = a[:, None] * b[None, :] * torch.exp((f[:, None] + g[None, :] - c) / eps)

    def kl(p, q):
        return (p * torch.log(p / q)).sum() - p.sum() + q.sum()

    primal = (plan * c).sum() + eps * kl(plan, a[:, None] * b[None, :]) \
        + rho * kl(plan.sum(1), a) + rho * kl(plan.sum(0), b)
    assert r.value.item() == pytest.approx(primal.item(), rel=1e-7)


def _fd_check(fn, t, direction, h=1e-5):
    """Central finite difference of fn along direction at t, against autograd."""
    t = t.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(t), t)
    with torch.no_grad():
        fd = (fn(t + h * direction) - fn(t - h * direction)) / (2 * h)
    return (grad * direction).sum().item(), fd.item()


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("reach", [None, 0.5])
@pytest.mark.parametrize("debias", [True, False])
def test_gradients_match_finite_differences(p, reach, debias):
    x, a, y, b = weighted_clouds(n=20, m=15, d=2)
    kw = dict(p=p, blur=0.3, reach=reach, debias=debias, tol=1e-13, max_iter=20000, normalize=False)
    g = torch.Generator().manual_seed(1)
    # points
    dx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    an, fd = _fd_check(lambda t: geomreg.divergence(t, y, a=a, b=b, **kw).value, x, dx)
    assert an == pytest.approx(fd, rel=1e-5, abs=1e-9)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    an, fd = _fd_check(lambda t: geomreg.divergence(x, t, a=a, b=b, **kw).value, y, dy)
    assert an == pytest.approx(fd, rel=1e-5, abs=1e-9)
    # weights: balanced OT needs equal masses, so move mass between two points
    da = torch.zeros_like(a)
    da[3], da[7] = 1.0, (-1.0 if reach is None else 0.5)
    an, fd = _fd_check(lambda t: geomreg.divergence(x, y, a=t, b=b, **kw).value, a, da)
    assert an == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_unbalanced_gradient_is_larger_than_geomloss_by_the_documented_factor():
    x, a, y, b = weighted_clouds(n=30, m=25)
    rho, eps = 0.5**2, 0.1**2
    x1 = x.clone().requires_grad_(True)
    ours = geomreg.divergence(x1, y, a=a, b=b, reach=0.5, blur=0.1, tol=math.inf).value
    (g_ours,) = torch.autograd.grad(ours, x1)
    x2 = x.clone().requires_grad_(True)
    theirs = geomloss.SamplesLoss("sinkhorn", reach=0.5, blur=0.1, backend="tensorized")(a, x2, b, y)
    (g_theirs,) = torch.autograd.grad(theirs, x2)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9)
    ratio = (g_theirs.norm() / g_ours.norm()).item()
    assert ratio == pytest.approx((rho + eps / 2) / (rho + eps), rel=1e-6)


@pytest.mark.parametrize("reach", [None, 0.5])
def test_properties_zero_symmetric_positive(reach):
    for seed in range(3):
        x, a, y, b = weighted_clouds(seed=seed)
        kw = dict(reach=reach, tol=1e-6)
        s_xy = geomreg.divergence(x, y, a=a, b=b, **kw).value.item()
        s_yx = geomreg.divergence(y, x, a=b, b=a, **kw).value.item()
        s_xx = geomreg.divergence(x, x, a=a, b=a, **kw).value.item()
        assert s_xy > 0
        assert s_xy == pytest.approx(s_yx, rel=1e-5)
        assert abs(s_xx) < 1e-8  # S(a, a) = 0 up to the convergence of two different solves
        assert abs(geomreg.divergence(x, x, a=a, b=a, reach=reach, tol=math.inf).value.item()) < 1e-15


def test_ordering_against_exact_ot():
    ot = pytest.importorskip("ot")
    torch.manual_seed(0)
    x = torch.rand(300, 3, dtype=torch.float64)
    y = torch.rand(300, 3, dtype=torch.float64) + 0.2
    c = (torch.cdist(x, y) ** 2 / 2).numpy()
    w2 = ot.emd2(np.full(300, 1 / 300), np.full(300, 1 / 300), c)
    s_eps = geomreg.divergence(x, y, tol=1e-6).value.item()
    ot_eps = geomreg.divergence(x, y, tol=1e-6, debias=False).value.item()
    assert s_eps < w2 < ot_eps


def test_blur_far_below_the_spacing_converges_to_exact_ot():
    """300 points 11 apart, blur 0.05: accelerated iterates went astray (a value of -10212, not
    converged after 5000 iterations) until a failed mixing restarted from the best state."""
    ot = pytest.importorskip("ot")
    torch.manual_seed(0)
    x = torch.rand(300, 3, dtype=torch.float64) * torch.tensor([200.0, 200.0, 10.0], dtype=torch.float64)
    y = x + 2.0 * torch.randn(300, 3, dtype=torch.float64)
    w2 = ot.emd2(np.full(300, 1 / 300), np.full(300, 1 / 300), (torch.cdist(x, y) ** 2 / 2).numpy())
    r = geomreg.divergence(x, y, blur=0.05)
    assert r.converged and r.n_iter < 2000
    assert abs(r.value.item() / w2 - 1) < 1e-3  # eps = 0.0025 against costs of about 6


def test_degenerate_inputs_give_defined_answers():
    one = torch.tensor([[0.3, 0.4, 0.5]], dtype=torch.float64)
    for loss in ["sinkhorn", "hausdorff", "energy", "gaussian", "laplacian"]:
        assert geomreg.divergence(one, one, loss=loss).value.item() == 0.0
    assert geomreg.divergence(one, one + 1, diameter=0.0).value.item() == pytest.approx(1.5, rel=1e-6)
    x, a, y, b = weighted_clouds()
    close_to_one = geomreg.divergence(x, y, a=a, b=b, scaling=0.99, tol=math.inf)
    assert close_to_one.n_iter > 100 and math.isfinite(close_to_one.value.item())
    with pytest.raises(ParameterError, match="max_iter"):
        geomreg.divergence(x, y, scaling=0.9999, max_iter=1000)


def test_zero_weight_points_do_not_count():
    x, a, y, b = weighted_clouds()
    far = torch.cat([x, torch.full((1, 3), 50.0, dtype=torch.float64)])
    a0 = torch.cat([a, torch.zeros(1, dtype=torch.float64)])
    with_zero = geomreg.divergence(far, y, a=a0, b=b, diameter=2.0, tol=1e-8).value.item()
    without = geomreg.divergence(x, y, a=a, b=b, diameter=2.0, tol=1e-8).value.item()
    assert with_zero == pytest.approx(without, rel=1e-8)


def test_balanced_masses_must_agree():
    x, a, y, b = weighted_clouds()
    with pytest.raises(InputError, match="masses differ"):
        geomreg.divergence(x, y, a=a, b=0.5 * b, normalize=False)
    assert geomreg.divergence(x, y, a=a, b=0.5 * b, normalize=False, reach=0.5).value.item() > 0


def test_normalised_float32_masses_are_never_refused():
    """A 20 000-point sample of a 10^7-point tile and one of a 9 10^6-point tile keep their
    weights (1e-7 and 1/9e6): normalised in float32 they summed to 1 + 6e-7 and 1 - 5e-7,
    and the balanced problem was refused for masses that differ."""
    g = np.random.default_rng(0)
    x, y = g.random((20000, 3)), g.random((20000, 3))
    a, b = np.full(20000, 1 / 1e7), np.full(20000, 1 / 9e6)
    r = geomreg.divergence(x, y, a=a, b=b, blur=0.5, dtype="float32", tol=math.inf)
    assert r.value.item() > 0 and abs(r.masses[0] - 1) < 1e-5 and abs(r.masses[1] - 1) < 1e-5


@pytest.mark.parametrize("d", [1, 5])
def test_other_dimensions_and_batches(d):
    g = torch.Generator().manual_seed(0)
    xb = torch.rand(3, 30, d, generator=g, dtype=torch.float64)
    yb = torch.rand(3, 20, d, generator=g, dtype=torch.float64) + 0.1
    batch = geomreg.divergence(xb, yb, tol=1e-8, diameter=2.0).value
    one_by_one = [geomreg.divergence(xb[i], yb[i], tol=1e-8, diameter=2.0).value for i in range(3)]
    assert batch.shape == (3,)
    assert torch.allclose(batch, torch.stack(one_by_one), rtol=1e-6)


def test_float32_agrees_with_float64(device):
    x, a, y, b = weighted_clouds(n=200, m=150)
    v64 = geomreg.divergence(x, y, a=a, b=b, tol=1e-4, device=device).value.item()
    r32 = geomreg.divergence(x.float(), y.float(), a=a.float(), b=b.float(), tol=1e-4, device=device)
    assert r32.dtype == "float32" and r32.device.startswith(device)
    assert r32.value.item() == pytest.approx(v64, rel=1e-3)


def test_far_from_origin_in_float32():
    x, a, y, b = weighted_clouds(n=200, m=150)
    ref = geomreg.divergence(x, y, a=a, b=b, tol=1e-4).value.item()
    off = geomreg.divergence((x + 1e4).float(), (y + 1e4).float(), a=a.float(), b=b.float(), tol=1e-4)
    assert off.value.item() == pytest.approx(ref, rel=1e-2)


def test_step_log_records_the_run():
    x, a, y, b = weighted_clouds()
    seen = []
    r = geomreg.divergence(x, y, a=a, b=b, on_step=seen.append)
    assert seen == r.schedule and r.schedule[-1].phase == "final"
    phases = [s.phase for s in r.schedule]
    assert phases[0] == "schedule" and "converge" in phases
    assert [s.index for s in r.schedule] == list(range(len(r.schedule)))
    assert r.schedule[-1].marginal_error == r.marginal_error
    d = r.to_dict()
    assert d["n_iter"] == r.n_iter and len(d["schedule"]) == len(r.schedule)


def test_real_scans_match_geomloss_and_converge(shared_data):
    from geomreg.io import read_measure

    src = read_measure(shared_data / "clouds" / "pycpd" / "bunny_source.txt")
    tgt = read_measure(shared_data / "clouds" / "pycpd" / "bunny_target.txt")
    x, y = torch.tensor(src.points), torch.tensor(tgt.points)
    same = geomreg.divergence(src, tgt, tol=math.inf, dtype="float64").value.item()
    ref = geomloss.SamplesLoss("sinkhorn", backend="tensorized")(x, y).item()
    assert same == pytest.approx(ref, rel=1e-6)
    converged = geomreg.divergence(src, tgt, tol=1e-9, max_iter=50000, dtype="float64")
    default = geomreg.divergence(src, tgt, dtype="float64")
    assert default.converged and converged.converged
    assert default.value.item() == pytest.approx(converged.value.item(), rel=1e-2)


# -- unbalanced divergence of Séjourné et al. 2019 -------------------------------------------

def _ot(x, a, y, b, **kw):
    return geomreg.divergence(x, y, a=a, b=b, debias=False, normalize=False, **kw).value.item()


@pytest.mark.parametrize("m_a, m_b", [(1.0, 1.5), (2000.0, 3.5), (0.3, 0.3)])
def test_unbalanced_divergence_is_the_sejourne_combination(m_a, m_b):
    # S = OT(a, b) - OT(a, a)/2 - OT(b, b)/2 + (eps/2)(m_a - m_b)^2, each OT_eps checked
    # against its primal objective by test_unbalanced_value_is_the_primal_objective_...
    x, a, y, b = weighted_clouds(n=40, m=30)
    a, b = a * m_a, b * m_b
    kw = dict(reach=0.3, blur=0.1, tol=1e-12, max_iter=20000)
    s = geomreg.divergence(x, y, a=a, b=b, normalize=False, **kw).value.item()
    eps = 0.1**2
    ref = _ot(x, a, y, b, **kw) - 0.5 * _ot(x, a, x, a, **kw) - 0.5 * _ot(y, b, y, b, **kw) \
        + eps / 2 * (m_a - m_b) ** 2
    assert s == pytest.approx(ref, rel=1e-9, abs=1e-12 * max(m_a, m_b) ** 2)
    assert s > 0


def test_unbalanced_unequal_masses_equal_geomloss_formula():
    x, a, y, b = weighted_clouds(n=50, m=40)
    a, b = 2.0 * a, 0.7 * b
    ours = geomreg.divergence(x, y, a=a, b=b, reach=0.4, blur=0.1, normalize=False, tol=math.inf)
    theirs = geomloss.SamplesLoss("sinkhorn", reach=0.4, blur=0.1, backend="tensorized")(a, x, b, y)
    assert ours.value.item() == pytest.approx(theirs.item(), rel=1e-9)


@pytest.mark.parametrize("backend", ["tensorized", "multiscale"])
def test_unbalanced_positive_and_exactly_zero_on_the_diagonal(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.rand(300, 3, generator=g)
    a = torch.rand(300, generator=g) + 0.5
    a = a / a.sum()
    kw = dict(reach=0.3, blur=0.05, normalize=False, backend=backend)
    assert geomreg.divergence(x, x, a=a, b=a, **kw).value.item() == 0.0  # float32, tol 1e-3
    for scale in (1.5, 0.5, 1e-3, 1e3):  # alpha against a multiple of itself
        assert geomreg.divergence(x, x, a=a, b=scale * a, **kw).value.item() > 0
    y = torch.rand(200, 3, generator=g) + 0.1
    b = torch.full((200,), 3.5 / 200)
    assert geomreg.divergence(x, y, a=2000 * a, b=b, **kw).value.item() > 0


def test_balanced_divergence_of_a_measure_to_itself_is_exactly_zero():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(400, 3, generator=g)
    r = geomreg.divergence(x, x, blur=0.02)  # a small blur: the converge phase runs long
    assert r.value.item() == 0.0
    assert r.converged


# -- certified error bound ---------------------------------------------------------------------

@pytest.mark.parametrize("p, debias", [(2, True), (1, True), (2, False)])
def test_error_bound_covers_the_true_error(p, debias):
    x, a, y, b = weighted_clouds(n=200, m=150)
    ref = geomreg.divergence(x, y, a=a, b=b, p=p, blur=0.05, debias=debias, tol=1e-11,
                             max_iter=50000).value.item()
    previous = math.inf
    for tol in (1e-1, 1e-2, 1e-3, 1e-4):
        r = geomreg.divergence(x, y, a=a, b=b, p=p, blur=0.05, debias=debias, tol=tol)
        assert r.error_bound is not None
        assert abs(r.value.item() - ref) <= r.error_bound
        assert r.error_bound < previous  # tighter as the tolerance shrinks
        previous = r.error_bound
    assert previous < 1e-3 * abs(ref) * 50  # not vacuous at tol 1e-4
    assert r.to_dict()["error_bound"] == r.error_bound


def test_error_bound_is_none_where_it_is_not_certified():
    x, a, y, b = weighted_clouds()
    assert geomreg.divergence(x, y, a=a, b=b, tol=math.inf).error_bound is None
    assert geomreg.divergence(x, y, a=a, b=b, reach=0.5).error_bound is None
    assert geomreg.divergence(x, y, a=a, b=b, loss="energy").error_bound is None


# -- warm starts -------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["tensorized", "multiscale"])
def test_warm_start_skips_the_schedule(backend):
    g = torch.Generator().manual_seed(5)
    x = torch.rand(500, 3, generator=g)
    y = torch.rand(400, 3, generator=g) + 0.2
    kw = dict(blur=0.05, backend=backend, tol=1e-4)
    cold = geomreg.divergence(x, y, **kw)
    again = geomreg.divergence(x, y, init=cold, **kw)
    assert again.n_iter <= 3
    assert again.value.item() == pytest.approx(cold.value.item(), rel=1e-3)
    assert all(s.phase in ("converge", "final") for s in again.schedule)
    # points that moved (a step of a gradient flow): the same value, converged
    moved = x + 0.05 * geomreg.divergence(x, y, field=True, **kw).field
    cold_moved = geomreg.divergence(moved, y, **kw)
    warm_moved = geomreg.divergence(moved, y, init=cold, **kw)
    assert warm_moved.converged
    assert abs(warm_moved.value.item() - cold_moved.value.item()) <= cold_moved.error_bound


def test_converged_problems_stop_updating(monkeypatch):
    """The (a, b) problem, once within tol, is not iterated while a symmetric one still is."""
    import geomreg.losses.sinkhorn as sk

    g = torch.Generator().manual_seed(6)
    x, y = torch.rand(300, 3, generator=g), torch.rand(250, 3, generator=g) + 0.2
    kw = dict(blur=0.05, tol=1e-4)
    cold = geomreg.divergence(x, y, **kw)
    start = cold.duals._replace(xx=cold.duals.xx + 0.02 * torch.rand(cold.duals.xx.shape, generator=g))
    counts, update = {}, sk._Run.update
    def counted(self, key, *args, **kwargs):
        counts[key] = counts.get(key, 0) + 1
        return update(self, key, *args, **kwargs)
    monkeypatch.setattr(sk._Run, "update", counted)
    warm = geomreg.divergence(x, y, init=start, **kw)
    assert warm.converged
    assert counts["xx"] >= 3  # the perturbed symmetric problem takes several updates
    assert counts["xy"] == 1  # the (a, b) problem met tol at once: converge's first update only
    assert warm.value.item() == pytest.approx(cold.value.item(), rel=1e-3)


def test_value_is_second_order_in_a_symmetric_potential_kept_as_it_is():
    """A warm start whose (a, a) potential is within tol at once is kept without an update;
    the value (semi-dual of the symmetric terms) still errs at second order in its error."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(200, 3, generator=g, dtype=torch.float64)
    y = torch.rand(150, 3, generator=g, dtype=torch.float64)
    ref = geomreg.divergence(x, y + 0.1, blur=0.1, tol=1e-12, max_iter=20000)
    errors = []
    for size in (2e-6, 1e-6):  # marginal errors 4e-4 and 2e-4: below tol, so no update
        start = ref.duals._replace(xx=ref.duals.xx + size * (1 + torch.sin(7 * x[:, 0]))[None])
        warm = geomreg.divergence(x, y + 0.1, init=start, blur=0.1, tol=1e-3)
        assert warm.n_iter == 2  # one converge iteration (nothing updated) and the final step
        errors.append(abs(warm.value.item() - ref.value.item()))
    # <a, T(s)> alone errs by about <a, delta>, 2e-6 and 1e-6 here (measured: 2.1e-6, 1.0e-6)
    assert errors[0] < 1e-9 and errors[1] < 0.3 * errors[0]
    # a warm start skips the schedule: max_iter needs only cover its own iterations
    assert geomreg.divergence(x, y + 0.1, init=ref, blur=0.1, tol=1e-3, max_iter=2).n_iter <= 2


def test_warm_start_gradients_match_cold():
    x, a, y, b = weighted_clouds(n=30, m=25)
    kw = dict(a=a, b=b, blur=0.2, tol=1e-12, max_iter=20000)
    cold = geomreg.divergence(x, y, **kw)
    x1 = x.clone().requires_grad_(True)
    warm = geomreg.divergence(x1, y, init=cold, **kw)
    (g_warm,) = torch.autograd.grad(warm.value, x1)
    x2 = x.clone().requires_grad_(True)
    (g_cold,) = torch.autograd.grad(geomreg.divergence(x2, y, **kw).value, x2)
    assert torch.allclose(g_warm, g_cold, rtol=1e-8, atol=1e-12)


def test_warm_start_rejects_mismatched_potentials():
    x, a, y, b = weighted_clouds(n=30, m=25)
    r = geomreg.divergence(x, y, a=a, b=b)
    with pytest.raises(ParameterError, match="init"):
        geomreg.divergence(x[:20], y, a=a[:20] / a[:20].sum(), b=b, init=r)
    with pytest.raises(ParameterError, match="init"):
        geomreg.divergence(x, y, a=a, b=b, init=geomreg.divergence(x, y, a=a, b=b, debias=False))
    with pytest.raises(ParameterError, match="init"):
        geomreg.divergence(x, y, a=a, b=b, loss="energy", init=r)
    with pytest.raises(ParameterError, match="init"):
        geomreg.divergence(x, y, a=a, b=b, init=(1, 2))


def test_library_errors_name_parameters_not_flags():
    x, a, y, b = weighted_clouds()
    for kwargs, where in [(dict(blur=-1.0), "blur"), (dict(max_iter=2), "max_iter"),
                          (dict(b=0.5 * b, normalize=False), "normalize"), (dict(scaling=2.0), "scaling")]:
        with pytest.raises(geomreg.GeomregError) as err:
            geomreg.divergence(x, y, **{"a": a, "b": b, **kwargs})
        assert err.value.where == where

"""Smooth warps (geomreg.deform): recovery of a known warp, application, save/load, bad options."""

import numpy as np
import pytest
import torch

from geomreg.deform import Warp, _cell_means, _diffeo_step, _flow_points, _shoot, _spline_step, gaussian
from geomreg.errors import InputError, ParameterError
from geomreg.registration import register


def _case():
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 2 * np.pi, 300)
    x = np.c_[np.cos(t) * (1 + 0.3 * np.cos(3 * t)), 0.6 * np.sin(t)] + 0.01 * rng.standard_normal((300, 2))
    c = torch.tensor([[0.8, 0.0], [-0.8, 0.2], [0.0, 0.5]], dtype=torch.float64)
    alpha = torch.tensor([[0.0, 0.12], [0.1, 0.0], [-0.05, -0.08]], dtype=torch.float64)
    truth = x + (gaussian(torch.as_tensor(x), c, 0.5) @ alpha).numpy()
    return x, truth


def test_cube_means_split_the_surrogate_exactly_for_affine_maps():
    """sum_i w_i |phi(z_i) - t_i|^2 = sum_c W_c |phi(zbar_c) - tbar_c|^2 + the cubes' inner mismatch."""
    g = torch.Generator().manual_seed(0)
    z, t = (torch.rand(500, 3, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.rand(500, generator=g, dtype=torch.float64)
    w[:40] = 0.0  # cubes may hold only massless points: dropped
    cells = torch.unique(torch.floor(z / 0.2).long(), dim=0, return_inverse=True)[1]
    zs, ts, mass = _cell_means(cells, z, t, w)
    assert mass.sum().item() == pytest.approx(w.sum().item()) and bool((mass > 0).all())
    assert torch.allclose((zs * mass[:, None]).sum(0), (z * w[:, None]).sum(0))
    for seed in (1, 2):
        a = torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        full = (w * ((z @ a.T + 0.1) - t).pow(2).sum(1)).sum()
        means = (mass * ((zs @ a.T + 0.1) - ts).pow(2).sum(1)).sum()
        kept = torch.unique(cells[w > 0])  # the cubes kept, in the order of the means
        back = torch.searchsorted(kept, cells).clamp_max(len(kept) - 1)  # massless points: any
        inner = (w * ((z - zs[back]) @ a.T - (t - ts[back])).pow(2).sum(1)).sum()
        assert full.item() == pytest.approx((means + inner).item(), rel=1e-12)


def _known_field():
    """200 points of the unit square, 10 of them control points, and random coefficients."""
    g = torch.Generator().manual_seed(0)
    z = torch.rand(200, 2, generator=g, dtype=torch.float64)
    coefficients = torch.randn(10, 2, generator=g, dtype=torch.float64)
    return z, z[::20].clone(), coefficients, torch.ones(200, dtype=torch.float64)


def test_spline_step_recovers_a_known_rbf_warp_exactly():
    z, c, alpha, w = _known_field()
    alpha = 0.1 * alpha
    g, gram = gaussian(z, c, 0.3), gaussian(c, c, 0.3)
    target = z + g @ alpha
    fitted = _spline_step(g, gram, z, target, w, 1e-12)
    assert torch.allclose(fitted, alpha, atol=1e-5)  # measured: 1.4e-7
    assert float((z + g @ fitted - target).norm(dim=1).max()) < 1e-7  # measured: 1.4e-9
    shrunk = _spline_step(g, gram, z, target, w, 1e-2)  # the smoothness weight pulls towards 0
    assert float((shrunk.T @ gram @ shrunk).trace()) < float((alpha.T @ gram @ alpha).trace())


def test_diffeo_steps_recover_a_known_geodesic_warp():
    z, c, p, w = _known_field()
    p = 0.05 * p
    target = _flow_points(z, _shoot(c, p, 0.3, 5), 0.3)
    moved = float((target - z).norm(dim=1).max())  # 0.12
    fitted = torch.zeros_like(p)
    for _ in range(20):
        fitted = _diffeo_step(c, fitted, z, target, w, 1e-12, 0.3, 5)
    end = _flow_points(z, _shoot(c, fitted, 0.3, 5), 0.3)
    assert float((end - target).norm(dim=1).max()) < 0.01 * moved  # measured: 2.9e-4


@pytest.fixture(scope="module")
def fitted():
    x, y = _case()
    # clean data: a lighter smoothness weight than the default (tuned for noise and outliers)
    return x, y, {m: register(x, y, model=m, blur=0.02, lam=0.03, dtype="float64")
                  for m in ("spline", "diffeo")}


@pytest.mark.parametrize("model", ["spline", "diffeo"])
def test_known_warp_recovered(fitted, model):
    x, y, results = fitted
    r = results[model]
    before = np.linalg.norm(x - y, axis=1).mean()
    after = np.linalg.norm(r.registered.numpy() - y, axis=1).mean()
    assert after < 0.5 * before  # a closed curve leaves some sliding along it free
    assert r.min_jacobian > 0 and r.model == f"rigid+{model}"
    assert set(r.to_dict()) >= {"sigma", "lam", "controls", "smoothness", "min_jacobian", "time_s"}


@pytest.mark.parametrize("model", ["spline", "diffeo"])
def test_warp_applies_to_other_points_and_round_trips(fitted, model, tmp_path):
    x, _, results = fitted
    warp = results[model].warp
    assert torch.allclose(warp(x), results[model].registered, atol=1e-12)
    other = np.random.default_rng(1).uniform(-1, 1, (50, 2))
    path = tmp_path / "m.npz"
    warp.save(path)
    back = Warp.load(path)
    assert torch.equal(back(other), warp(other))
    assert torch.allclose(back.jacobian_determinants(other), warp.jacobian_determinants(other))


def test_spline_jacobian_matches_finite_differences(fitted):
    warp = fitted[2]["spline"].warp
    p = torch.tensor([[0.3, 0.1]], dtype=torch.float64)
    h = 1e-6
    cols = [(warp(p + h * e) - warp(p - h * e))[0] / (2 * h) for e in torch.eye(2, dtype=torch.float64)]
    det = float(torch.linalg.det(torch.stack(cols, 1)))
    assert det == pytest.approx(float(warp.jacobian_determinants(p)[0]), rel=1e-6)


def test_load_refuses_other_files(tmp_path):
    bad = tmp_path / "x.npz"
    np.savez(bad, a=np.zeros(3))
    with pytest.raises(InputError, match="not a geomreg warp"):
        Warp.load(bad)
    (tmp_path / "y.npz").write_bytes(b"garbage")
    with pytest.raises(InputError):
        Warp.load(tmp_path / "y.npz")


@pytest.mark.parametrize("options", [dict(model="spline", lam=0.0), dict(model="spline", sigma=-1.0),
                                     dict(model="foo+spline"), dict(model="rigid", sigma=0.1),
                                     dict(model="diffeo", steps=0)])
def test_bad_options(options):
    x, y = _case()
    with pytest.raises(ParameterError):
        register(x, y, **options)

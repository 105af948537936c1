"""Kernel MMDs against GeomLoss (with its documented clamp accounted for) and gradcheck."""

import numpy as np
import pytest
import torch

import geomreg

geomloss = pytest.importorskip("geomloss")


def clouds(n=40, m=30, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=torch.float64)
    y = torch.rand(m, d, generator=g, dtype=torch.float64) + 0.1
    a = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(m, generator=g, dtype=torch.float64) + 0.1
    return x, a / a.sum(), y, b / b.sum()


@pytest.mark.parametrize("loss", ["energy", "gaussian", "laplacian"])
@pytest.mark.parametrize("blur", [0.1, 0.5])
def test_matches_geomloss(loss, blur):
    x, a, y, b = clouds()
    ours = geomreg.divergence(x, y, a=a, b=b, loss=loss, blur=blur).value.item()
    theirs = geomloss.SamplesLoss(loss, blur=blur, backend="tensorized")(a, x, b, y).item()
    # GeomLoss computes distances as sqrt(max(d^2, 1e-8)): its diagonal distances are 1e-4
    # instead of 0, which shifts the value by 1/2 (k(1e-4) - k(0)) (|a|^2 + |b|^2).
    sq = (a @ a + b @ b).item()
    shift = {"energy": -1e-4, "gaussian": 0.0, "laplacian": np.exp(-1e-4) - 1}[loss]
    assert ours == pytest.approx(theirs - 0.5 * shift * sq, rel=1e-10)


def test_energy_is_half_the_classical_energy_distance():
    x, a, y, b = clouds()
    def dist(u, v):  # from coordinate differences (torch.cdist is not exact at 0)
        return ((u[:, None] - v[None]) ** 2).sum(-1).sqrt()

    dxy, dxx, dyy = dist(x, y), dist(x, x), dist(y, y)
    classical = 2 * a @ dxy @ b - a @ dxx @ a - b @ dyy @ b
    ours = geomreg.divergence(x, y, a=a, b=b, loss="energy").value.item()
    assert ours == pytest.approx(0.5 * classical.item(), rel=1e-12)


@pytest.mark.parametrize("loss", ["energy", "gaussian", "laplacian"])
def test_gradients_by_gradcheck(loss):
    x, a, y, b = clouds(n=6, m=5, d=2)

    def f(pts, w, pts_b):
        return geomreg.divergence(pts, pts_b, a=w, b=b, loss=loss, blur=0.3, normalize=False).value

    inputs = (x.clone().requires_grad_(True), a.clone().requires_grad_(True),
              y.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(f, inputs)


def test_energy_gradient_is_finite_at_coincident_points():
    x, a, y, b = clouds()
    y = torch.cat([y, x[:5]])  # five points of y sit exactly on points of x
    b = torch.full((y.shape[0],), 1.0 / y.shape[0], dtype=torch.float64)
    xs = x.clone().requires_grad_(True)
    v = geomreg.divergence(xs, y, a=a, b=b, loss="energy").value
    (g,) = torch.autograd.grad(v, xs)
    assert torch.isfinite(g).all()


def test_potentials_are_the_weight_gradients():
    x, a, y, b = clouds()
    r = geomreg.divergence(x, y, a=a, b=b, loss="gaussian", blur=0.3, potentials=True)
    aa, bb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    v = geomreg.divergence(x, y, a=aa, b=bb, loss="gaussian", blur=0.3, normalize=False).value
    ga, gb = torch.autograd.grad(v, (aa, bb))
    assert torch.allclose(r.potentials[0], ga, atol=1e-12)
    assert torch.allclose(r.potentials[1], gb, atol=1e-12)

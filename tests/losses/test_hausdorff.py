"""Hausdorff divergence against a brute-force float64 formula, its chamfer limit, gradients."""

import numpy as np
import pytest
import torch

import geomreg


def clouds(n=25, m=18, d=3, seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.random((n, d)), rng.random((m, d)) + 0.2
    a, b = rng.random(n) + 0.1, rng.random(m) + 0.1
    return x, a / a.sum(), y, b / b.sum()


def brute_force(x, a, y, b, p, blur):
    """docs/theory.md's formula, term by term, in numpy float64."""
    eps = blur**p

    def cost(u, v):
        dist = np.sqrt(((u[:, None, :] - v[None, :, :]) ** 2).sum(-1))
        return dist if p == 1 else dist**2 / 2

    def sm(pts, mu, w):  # Sm_eps[mu](pts) = -eps log sum_j w_j exp(-C(pts, mu_j)/eps)
        z = np.log(w)[None, :] - cost(pts, mu) / eps
        zmax = z.max(1, keepdims=True)
        return -eps * (zmax[:, 0] + np.log(np.exp(z - zmax).sum(1)))

    return 0.5 * a @ (sm(x, y, b) - sm(x, x, a)) + 0.5 * b @ (sm(y, x, a) - sm(y, y, b))


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("blur", [0.01, 0.1, 1.0])
def test_matches_brute_force(p, blur):
    x, a, y, b = clouds()
    ours = geomreg.divergence(x, y, a=a, b=b, loss="hausdorff", p=p, blur=blur, dtype="float64")
    assert ours.value.item() == pytest.approx(brute_force(x, a, y, b, p, blur), rel=1e-10)
    assert ours.n_iter == 0 and ours.converged and ours.marginal_error is None


@pytest.mark.parametrize("p", [1, 2])
def test_tends_to_chamfer_as_blur_vanishes(p):
    x, a, y, b = clouds()
    dist = np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1))
    c = dist if p == 1 else dist**2 / 2
    chamfer = 0.5 * a @ c.min(1) + 0.5 * b @ c.min(0)
    errors = []
    for blur in [1e-2, 1e-3, 1e-4]:
        v = geomreg.divergence(x, y, a=a, b=b, loss="hausdorff", p=p, blur=blur, dtype="float64")
        errors.append(abs(v.value.item() - chamfer))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3 * chamfer


def test_gradients_by_gradcheck():
    x, a, y, b = (torch.tensor(t) for t in clouds(n=6, m=5, d=2))
    xs, as_ = x.clone().requires_grad_(True), a.clone().requires_grad_(True)

    def f(pts, w):
        return geomreg.divergence(pts, y, a=w, b=b, loss="hausdorff", blur=0.3, normalize=False).value

    assert torch.autograd.gradcheck(f, (xs, as_))


def test_zero_for_equal_measures_and_positive_otherwise():
    x, a, y, b = clouds()
    assert geomreg.divergence(x, x, a=a, b=a, loss="hausdorff").value.item() == 0.0
    assert geomreg.divergence(x, y, a=a, b=b, loss="hausdorff").value.item() > 0


def test_reach_is_refused():
    x, a, y, b = clouds()
    with pytest.raises(geomreg.ParameterError, match="reach"):
        geomreg.divergence(x, y, loss="hausdorff", reach=0.5)

"""The dense backend against naive formulas, and the registry's choices and refusals."""

import numpy as np
import pytest
import torch

from geomreg.engine import BackendChoice, Cost, Kernel, choose_backend, get_backend
from geomreg.engine.base import safe_norm
from geomreg.engine.tensorized import squared_distances
from geomreg.errors import BackendUnavailable, ParameterError


def _clouds(n=7, m=5, d=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, n, d, generator=g, dtype=dtype), torch.rand(1, m, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("d", [1, 3, 12])  # 12 takes the matmul path
def test_squared_distances_match_naive(d):
    x, y = _clouds(d=d)
    naive = ((x[0, :, None, :] - y[0, None, :, :]) ** 2).sum(-1)
    assert torch.allclose(squared_distances(x, y)[0], naive, rtol=1e-12, atol=1e-12)


def test_squared_distances_exactly_zero_at_coincident_points():
    x, _ = _clouds()
    d2 = squared_distances(x * 1e3 + 5e5, x * 1e3 + 5e5)  # far from the origin
    assert torch.all(torch.diagonal(d2[0]) == 0)


def test_safe_norm_value_and_gradient_at_zero():
    d2 = torch.tensor([0.0, 4.0], dtype=torch.float64, requires_grad=True)
    out = safe_norm(d2)
    assert out.tolist() == [0.0, 2.0]
    (g,) = torch.autograd.grad(out.sum(), d2)
    assert torch.isfinite(g).all() and g[0] == 0 and g[1] == pytest.approx(0.25)


@pytest.mark.parametrize("p", [1, 2])
def test_softmin_matches_naive_logsumexp(p, device):
    x, y = (t.to(device) for t in _clouds())
    h = torch.randn(1, y.shape[1], dtype=torch.float64, device=device)
    eps = 0.07
    be = get_backend("tensorized")
    out = be.softmin(eps, be.pair(x, y, Cost(p)), h)[0].cpu().numpy()
    xn, yn, hn = x[0].cpu().numpy(), y[0].cpu().numpy(), h[0].cpu().numpy()
    dist = np.linalg.norm(xn[:, None] - yn[None], axis=-1)
    c = dist if p == 1 else dist**2 / 2
    z = hn[None, :] - c / eps
    zmax = z.max(1, keepdims=True)
    naive = -eps * (zmax[:, 0] + np.log(np.exp(z - zmax).sum(1)))
    np.testing.assert_allclose(out, naive, rtol=1e-12)


def test_softmin_is_stable_at_tiny_eps():
    x, y = _clouds()
    be = get_backend("tensorized")
    out = be.softmin(1e-12, be.pair(x, y, Cost(2)), torch.zeros(1, 5, dtype=torch.float64))
    c = (squared_distances(x, y) / 2).min(-1).values
    assert torch.isfinite(out).all()
    assert torch.allclose(out, c, atol=1e-9)  # tends to the hard min


@pytest.mark.parametrize("name", ["gaussian", "laplacian", "energy"])
def test_kernel_sum_matches_naive(name):
    x, y = _clouds()
    w = torch.rand(1, 5, dtype=torch.float64)
    be = get_backend("tensorized")
    out = be.kernel_sum(be.pair(x, y, Kernel(name, 0.3)), w)[0]
    dist = torch.cdist(x[0], y[0])
    k = {
        "gaussian": torch.exp(-(dist**2) / (2 * 0.09)),
        "laplacian": torch.exp(-dist / 0.3),
        "energy": -dist,
    }[name]
    assert torch.allclose(out, k @ w[0], rtol=1e-12)


def test_registry_names_and_refusals():
    assert choose_backend("auto", n=10, m=10, dim=3, itemsize=4, memory_bytes=None) == BackendChoice(
        "tensorized", "dense matrices of 10x10 fit in memory"
    )
    with pytest.raises(ParameterError, match="unknown backend"):
        get_backend("nonsense")
    with pytest.raises(BackendUnavailable, match="needs about"):
        choose_backend("tensorized", n=10**6, m=10**6, dim=3, itemsize=4, memory_bytes=2**30)

"""Row barycentres of a plan (``Backend.barycentres``): each backend's own pass against the
default (D more softmins) and against a float64 dense reference."""

from __future__ import annotations

import pytest
import torch

from geomreg.engine import get_backend
from geomreg.engine.base import Backend, Cost


def _reference(x, y, h, eps):
    c = ((x.double()[0, :, None] - y.double()[0, None]) ** 2).sum(-1) / 2
    return torch.softmax(h.double()[0][None] - c / eps, 1) @ y.double()[0]


@pytest.mark.parametrize("name", ["tensorized", "multiscale"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [0.05**2, 0.01**2])
def test_barycentres_equal_the_dense_reference(name, dtype, eps):
    """At blur 0.05 and 0.01 (where the default's ratio of softmins loses digits in float32)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(1, 700, 3, generator=gen, dtype=torch.float64).to(dtype)
    y = (torch.rand(1, 650, 3, generator=gen, dtype=torch.float64) + 0.2).to(dtype)
    h = (0.3 * torch.randn(1, 650, generator=gen, dtype=torch.float64)).to(dtype)
    backend = get_backend(name)
    pair = backend.pair(x, y, Cost(2))
    want = _reference(x, y, h, eps)
    got = backend.barycentres(eps, pair, h, y)
    default = Backend.barycentres(backend, eps, pair, h, y)
    assert got.shape == (1, 700, 3) and got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert float((got[0].double() - want).abs().max()) < tol
    assert float((default[0].double() - want).abs().max()) < (1e-3 if dtype == torch.float32 else 1e-9)

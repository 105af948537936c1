"""``--plot FILE.png`` of ``geomreg match`` and ``geomreg flow``, and :mod:`geomreg.plots`.

The pictures are read back as images and checked for what they must show: the target's
blue and the source's red dots, something drawn (not one flat colour), the expected size.
Clouds are tiny (tens of points) and flows take 3 steps on the tensorized backend.
"""

from __future__ import annotations

import math

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import geomreg
from cli.main import app
from geomreg.errors import ParameterError
from geomreg.plots import plot_flow, plot_images, plot_match, plot_register

runner = CliRunner()
FAST = ["--backend", "tensorized", "--blur", "0.05"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def clouds(dim, n=60, m=50, seed=0):
    """A noisy circle (sphere) and a shifted, stretched one; in 1-D two gaussian samples."""
    g = np.random.default_rng(seed)
    if dim == 1:
        return g.normal(0, 0.1, (n, 1)), g.normal(0.6, 0.15, (m, 1))
    x, y = g.normal(size=(n, dim)), g.normal(size=(m, dim))
    x = 0.3 * x / np.linalg.norm(x, axis=1, keepdims=True) + 0.5
    y = 0.3 * y / np.linalg.norm(y, axis=1, keepdims=True) * np.linspace(1.3, 0.8, dim) + 0.7
    return x, y


def save_pair(tmp_path, dim, **kw):
    x, y = clouds(dim, **kw)
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", y)
    return tmp_path / "a.npy", tmp_path / "b.npy"


def save_images(tmp_path):
    """Two small density images (dark is mass): a disc and a shifted, wider ellipse."""
    rows, cols = np.mgrid[0:18, 0:24]
    disc = (rows - 8) ** 2 + (cols - 7) ** 2 < 16
    ellipse = ((rows - 10) / 4) ** 2 + ((cols - 15) / 6) ** 2 < 1
    for name, mask in (("a.png", disc), ("b.png", ellipse)):
        iio.imwrite(tmp_path / name, np.where(mask, 0, 255).astype(np.uint8))
    return tmp_path / "a.png", tmp_path / "b.png"


def read_picture(path) -> np.ndarray:
    """The PNG as an (H, W, 3 or 4) uint8 array, checked not to be one flat colour."""
    img = iio.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4) and img.dtype == np.uint8
    assert img.shape[0] > 200 and img.shape[1] > 300
    assert img[..., :3].std() > 0
    return img


def red_and_blue(img) -> tuple[int, int]:
    """Pixels that are clearly red (R high, B low) and clearly blue (B high, R low)."""
    r, g, b = (img[..., k].astype(int) for k in range(3))
    return int(((r > 150) & (g < 100) & (b < 100)).sum()), int(((b > 150) & (r < 100)).sum())


def assert_points_drawn(path):
    red, blue = red_and_blue(read_picture(path))
    assert red > 20 and blue > 20, (red, blue)


# --------------------------------------------------------------------------- match


def test_match_plot_2d_shows_both_clouds_and_leaves_stdout_alone(tmp_path):
    a, b = save_pair(tmp_path, 2)
    plain = invoke("match", a, b, "--out", tmp_path / "reg.npy", *FAST)
    assert plain.exit_code == 0, plain.stderr
    result = invoke("match", a, b, "--out", tmp_path / "reg2.npy", "--plot", tmp_path / "m.png", *FAST)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == plain.stdout and float(result.stdout) > 0
    assert_points_drawn(tmp_path / "m.png")
    np.testing.assert_array_equal(np.load(tmp_path / "reg.npy"), np.load(tmp_path / "reg2.npy"))


@pytest.mark.parametrize("dim", [1, 3])
def test_match_plot_1d_and_3d(tmp_path, dim):
    a, b = save_pair(tmp_path, dim)
    result = invoke("match", a, b, "--out", tmp_path / "reg.npy", "--plot", tmp_path / "m.png", *FAST)
    assert result.exit_code == 0, result.stderr
    assert_points_drawn(tmp_path / "m.png")


@pytest.mark.parametrize("debias", [True, False])
def test_match_potential_is_the_field_s_potential(debias):
    """The level lines drawn are those of phi with v = -grad phi (p = 2) at the source points."""
    from cli.match import _potential

    x, y = clouds(2)
    r = geomreg.match(x, y, blur=0.05, backend="tensorized", dtype="float64", tol=1e-9, debias=debias)
    phi, h = _potential(r.divergence.plan), 1e-5
    grad = np.stack([(phi(x + h * e) - phi(x - h * e)) / (2 * h) for e in np.eye(2)], axis=1)
    np.testing.assert_allclose(-grad, r.field.numpy(), atol=1e-5)


def test_match_plot_of_two_images(tmp_path):
    a, b = save_images(tmp_path)
    result = invoke("match", a, b, "--out", tmp_path / "t.png", "--plot", tmp_path / "pic.png",
                    "--blur", "0.05")
    assert result.exit_code == 0, result.stderr
    img = read_picture(tmp_path / "pic.png")
    assert img.shape[1] > 2 * img.shape[0]  # three panels side by side


# --------------------------------------------------------------------------- flow


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_flow_plot_in_1_2_and_3_d(tmp_path, dim):
    a, b = save_pair(tmp_path, dim)
    result = invoke("flow", a, b, "--out", tmp_path / "end.npy", "--plot", tmp_path / "f.png",
                    "--steps", "3", "--tol", "0", *FAST)
    assert result.exit_code == 0, result.stderr
    assert float(result.stdout) >= 0
    assert_points_drawn(tmp_path / "f.png")


def test_flow_plot_of_two_images(tmp_path):
    a, b = save_images(tmp_path)
    result = invoke("flow", a, b, "--out", tmp_path / "end.npy", "--plot", tmp_path / "pic.png",
                    "--steps", "2", "--tol", "0", *FAST)
    assert result.exit_code == 0, result.stderr
    img = read_picture(tmp_path / "pic.png")
    assert img.shape[1] > 2 * img.shape[0]


# --------------------------------------------------------------------------- refusals


def _no_computation(monkeypatch):
    """Make any registration fail the test: refusals must come before the computation."""
    import geomreg.registration as reg

    def forbidden(*args, **kwargs):
        raise AssertionError("the computation started")

    monkeypatch.setattr(reg, "match", forbidden)
    monkeypatch.setattr(reg, "flow", forbidden)


def _refused_cleanly(result, where):
    assert result.exit_code == 2, (result.exit_code, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and where in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize("command", ["match", "flow"])
@pytest.mark.parametrize("name", ["pic.jpg", "pic", "pic.png.npy"])
def test_plot_needs_a_png_suffix_and_nothing_is_written(tmp_path, monkeypatch, command, name):
    a, b = save_pair(tmp_path, 2, n=10, m=10)
    _no_computation(monkeypatch)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = invoke(command, a, b, "--out", tmp_path / "out.npy", "--plot", tmp_path / name)
    _refused_cleanly(result, "--plot")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("command", ["match", "flow"])
def test_plot_refuses_more_than_3_dimensions(tmp_path, monkeypatch, command):
    a, b = save_pair(tmp_path, 5, n=10, m=10)
    _no_computation(monkeypatch)
    result = invoke(command, a, b, "--out", tmp_path / "out.npy", "--plot", tmp_path / "p.png")
    _refused_cleanly(result, "1-, 2- and 3-D")
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "out.npy").exists()


def test_plot_refuses_an_input_and_another_output(tmp_path):
    a, b = save_pair(tmp_path, 2, n=10, m=10)
    result = invoke("flow", a, b, "--out", tmp_path / "out.npy", "--plot", tmp_path / "out.npy")
    assert result.exit_code == 2 and "same file" in result.stderr
    png = tmp_path / "in.png"
    iio.imwrite(png, np.full((8, 8), 255, np.uint8))
    result = invoke("flow", a, b, "--out", tmp_path / "out.npy", "--plot", png, "--weights-a", png)
    assert result.exit_code == 1 and "input" in result.stderr


# --------------------------------------------------------------------------- the library


def test_library_functions_write_pictures(tmp_path):
    x, y = clouds(2)
    plot_register(tmp_path / "r.png", x, y, x + 0.2)
    assert_points_drawn(tmp_path / "r.png")
    plot_match(tmp_path / "m.png", x, y, x + 0.2, potential=lambda p: (p**2).sum(1))
    assert_points_drawn(tmp_path / "m.png")
    # a flow of 30 snapshots is drawn as 5 panels, the first and the last among them
    snaps = [(k, x + k / 30 * (y.mean(0) - x.mean(0))) for k in range(31)]
    plot_flow(tmp_path / "f.png", snaps, y)
    five = read_picture(tmp_path / "f.png")
    plot_flow(tmp_path / "f2.png", snaps[:2], y)
    two = read_picture(tmp_path / "f2.png")
    assert five.shape[1] / two.shape[1] == pytest.approx(5 / 2, rel=0.05)
    img = np.outer(np.hanning(20), np.hanning(30))
    plot_images(tmp_path / "i.png", img, img.T, img.T)
    read_picture(tmp_path / "i.png")


def test_library_refusals_write_nothing(tmp_path):
    x = np.zeros((5, 4))
    with pytest.raises(ParameterError, match="1-, 2- and 3-D"):
        plot_match(tmp_path / "m.png", x, x, x)
    with pytest.raises(ParameterError, match="1-, 2- and 3-D"):
        plot_flow(tmp_path / "f.png", [(0, x)], x)
    with pytest.raises(ParameterError, match="not an image"):
        plot_images(tmp_path / "i.png", np.zeros(4), np.zeros((2, 2)), np.zeros((2, 2)))
    assert list(tmp_path.iterdir()) == []


def test_flow_records_few_snapshots():
    """The CLI keeps the points at steps 0, 1, 2, 4, 8, ... only (and the end)."""
    from cli.flow import _observer

    snaps: dict = {}
    on_step, _ = _observer(40, 1, None, ".npy", None, [], snaps)
    step = type("Step", (), {})
    for k in range(41):
        s = step()
        s.index, s.loss = k, 1.0
        on_step(s, torch.full((3, 2), float(k)))
    assert sorted(snaps) == [0, 1, 2, 4, 8, 16, 32]
    assert all(v[0, 0] == k for k, v in snaps.items())
    assert math.isclose(snaps[32].sum(), 32 * 6)

"""``geomreg register --model spline|diffeo`` and ``geomreg warp``: outputs, frames, bad input.

The clouds are the 300-point curve of tests/test_warp.py and its known smooth warp; the smooth
fits run once per module (a few seconds each).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_warp import _case
from typer.testing import CliRunner

from cli.main import app
from geomreg.deform import Warp, conjugate

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    d = tmp_path_factory.mktemp("warp")
    x, y = _case()
    np.save(d / "a.npy", x)
    np.save(d / "b.npy", y)
    return d, d / "a.npy", d / "b.npy"


@pytest.fixture(scope="module")
def spline_run(pair):
    d, a, b = pair
    out = {k: d / f"{k}.{s}" for k, s in (("reg", "npy"), ("field", "npy"), ("model", "npz"),
                                          ("moved", "npy"), ("plot", "png"))}
    r = invoke("register", a, b, "--model", "spline", "--blur", "0.02", "--out", out["reg"], "--field",
               out["field"], "--save-model", out["model"], "--apply", a, "--apply-out", out["moved"],
               "--plot", out["plot"], "--json")
    assert r.exit_code == 0, r.stderr
    return out, json.loads(r.stdout)


def test_register_spline_writes_every_output_consistently(pair, spline_run):
    _, a, b = pair
    out, record = spline_run
    x, y = np.load(a), np.load(b)
    reg = np.load(out["reg"])
    assert np.linalg.norm(reg - y, axis=1).mean() < 0.7 * np.linalg.norm(x - y, axis=1).mean()
    np.testing.assert_allclose(np.load(out["field"]), reg - x, atol=1e-12)
    np.testing.assert_allclose(np.load(out["moved"]), reg, atol=1e-12)  # the map applied to A itself
    assert record["model"] == "rigid+spline" and record["applied"] == len(x)
    assert record["min_jacobian"] > 0  # no folding at the default lambda
    assert record["lam"] == pytest.approx(0.1) and record["sigma"] > 0 and record["controls"] >= 1
    assert record["time_s"] > 0 and "spline" in record["times"]
    assert out["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_warp_command_applies_the_saved_model(pair, spline_run, tmp_path):
    _, a, _ = pair
    out, record = spline_run
    moved, dets = tmp_path / "w.ply", tmp_path / "j.npy"  # a PLY holds x y z: z = 0 for 2-D
    r = invoke("warp", out["model"], a, "--out", moved, "--jacobian", dets, "--json")
    assert r.exit_code == 0, r.stderr
    got = json.loads(r.stdout)
    from geomreg.io import read_measure

    back = read_measure(moved).points
    np.testing.assert_allclose(back[:, :2], np.load(out["reg"]), atol=1e-6)
    assert not back[:, 2:].any()
    assert got["min_jacobian"] == pytest.approx(record["min_jacobian"], rel=1e-9)
    assert np.load(dets).min() == pytest.approx(got["min_jacobian"])
    plain = invoke("warp", out["model"], a, "--out", tmp_path / "w2.npy")
    assert plain.exit_code == 0 and float(plain.stdout) == pytest.approx(got["min_jacobian"])


def test_global_models_save_their_matrix_as_a_map(pair, tmp_path):
    _, a, b = pair
    m = tmp_path / "rigid.npz"
    r = invoke("register", a, b, "--model", "rigid", "--save-model", m, "--transform", tmp_path / "t.txt",
               "--out", tmp_path / "reg.npy")
    assert r.exit_code == 0, r.stderr
    warp = Warp.load(m)
    assert warp.kind == "linear"
    np.testing.assert_allclose(warp(np.load(a)).numpy(), np.load(tmp_path / "reg.npy"), atol=1e-12)


def test_shifted_warp_is_the_warp_in_moved_coordinates(spline_run):
    out, _ = spline_run
    warp = Warp.load(out["model"])
    o = np.array([5e5, -4e6])
    pts = np.random.default_rng(2).uniform(-1, 1, (20, 2))
    far = warp.shifted(o)
    np.testing.assert_allclose(far(pts + o).numpy() - o, warp(pts).numpy(), atol=1e-8)
    np.testing.assert_allclose(far.jacobian_determinants(pts + o).numpy(),
                               warp.jacobian_determinants(pts).numpy(), rtol=1e-8)
    m = torch.tensor([[0.0, -1.0, 1.0], [1.0, 0.0, 2.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    p = torch.tensor([3.0, 4.0], dtype=torch.float64)
    moved = conjugate(m, o)
    assert torch.allclose(moved[:2, :2] @ (p + torch.as_tensor(o)) + moved[:2, 2] - torch.as_tensor(o),
                          m[:2, :2] @ p + m[:2, 2])


def test_register_a_mesh_keeps_its_faces(tmp_path):
    g = np.linspace(0, 1, 8)
    v = np.array([[x, y, 0.2 * np.sin(3 * x + y)] for x in g for y in g])
    faces = [(i * 8 + j, i * 8 + j + 1, (i + 1) * 8 + j) for i in range(7) for j in range(7)]
    text = "".join(f"v {p[0]} {p[1]} {p[2]}\n" for p in v) + "".join(
        f"f {a + 1} {b + 1} {c + 1}\n" for a, b, c in faces)
    (tmp_path / "a.obj").write_text(text)
    np.save(tmp_path / "b.npy", v + [0.1, 0.0, 0.05])
    r = invoke("register", tmp_path / "a.obj", tmp_path / "b.npy", "--out", tmp_path / "reg.obj")
    assert r.exit_code == 0, r.stderr
    from geomreg.io import read_measure

    reg = read_measure(tmp_path / "reg.obj")
    assert reg.faces is not None and np.array_equal(reg.faces, np.asarray(faces))
    np.testing.assert_allclose(reg.points, v + [0.1, 0.0, 0.05], atol=5e-3)


def test_register_las_writes_records_and_a_file_frame_transform(tmp_path):
    laspy = pytest.importorskip("laspy")
    from test_las import make_las, other_dimensions

    a = make_las(tmp_path / "a.las", 300, seed=3)
    las = laspy.read(a)
    shift = np.array([0.4, -0.2, 0.1])
    b = make_las(tmp_path / "b.las", 300, seed=3, xyz=np.stack([las.x, las.y, las.z], 1) + shift)
    t = tmp_path / "t.txt"
    r = invoke("register", a, b, "--out", tmp_path / "reg.laz", "--transform", t, "--blur", "0.5")
    assert r.exit_code == 0, r.stderr
    moved = laspy.read(tmp_path / "reg.laz")
    for name in other_dimensions(las):
        np.testing.assert_array_equal(np.asarray(moved[name]), np.asarray(las[name]), err_msg=name)
    xyz = np.stack([las.x, las.y, las.z], 1)
    m = np.loadtxt(t)
    # T maps the file's own (absolute) coordinates: applied to A's, it gives the written points
    np.testing.assert_allclose(xyz @ m[:3, :3].T + m[:3, 3], np.stack([moved.x, moved.y, moved.z], 1),
                               atol=2e-3)
    np.testing.assert_allclose(m[:3, 3], shift, atol=0.05)


@pytest.mark.parametrize(("args", "needle"), [
    (["--model", "spline", "--controls", "many", "--json"], "--controls"),
    (["--model", "spline", "--lambda", "0", "--json"], "--lambda"),
    (["--model", "spline", "--sigma", "-1", "--json"], "--sigma"),
    (["--model", "diffeo", "--steps", "0", "--json"], "--steps"),
    (["--model", "rigid", "--lambda", "0.1", "--json"], "--lambda"),
    (["--model", "spline", "--save-model", "m.txt"], "--save-model"),
    (["--model", "spline", "--field", "f.txt", "--json"], "--field"),
    (["--model", "spline", "--apply", "A", "--json"], "--apply-out"),
    (["--model", "rigid+flow", "--save-model", "m.npz"], "rigid+flow"),
    (["--model", "spline", "--out", "reg.obj"], "mesh"),
])
def test_bad_register_options_are_one_line_usage_errors(pair, args, needle):
    d, a, b = pair
    args = [str(a) if s == "A" else str(d / s) if s.endswith((".txt", ".npz", ".obj")) else s for s in args]
    r = invoke("register", a, b, *args)
    assert r.exit_code in (1, 2), r.stdout
    line = r.stderr.strip()
    assert line.startswith("Error:") and "\n" not in line and needle in line, line
    assert not any((d / n).exists() for n in ("m.txt", "m.npz", "f.txt", "reg.obj"))


def test_warp_command_bad_inputs_write_nothing(pair, spline_run, tmp_path):
    d, a, _ = pair
    out, _ = spline_run
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    np.save(tmp_path / "p3.npy", np.zeros((5, 3)))
    cases = [
        ((junk, a), 1, "junk.npz"),
        ((out["model"], tmp_path / "p3.npy"), 1, "p3.npy"),
        ((out["model"], tmp_path / "missing.npy"), 1, "missing.npy"),
        ((out["model"], a, "--jacobian", tmp_path / "j.txt"), 2, "--jacobian"),
    ]
    for args, code, needle in cases:
        target = tmp_path / "o.npy"
        r = invoke("warp", *args, "--out", target)
        assert r.exit_code == code, (args, r.stderr)
        assert r.stderr.startswith("Error:") and needle in r.stderr, r.stderr
        assert not target.exists()

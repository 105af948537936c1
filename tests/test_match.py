"""``geomreg.match`` and ``geomreg match``: registration by the Sinkhorn transport map."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import imageio
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import geomreg
from cli.main import app
from geomreg.errors import ParameterError
from geomreg.io import read_measure

runner = CliRunner()
SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def ellipses(n=300, m=260, seed=0):
    g = np.random.default_rng(seed)
    t, s = np.linspace(0, 2 * math.pi, n, endpoint=False), np.linspace(0, 2 * math.pi, m, endpoint=False)
    x = np.stack([np.cos(t), np.sin(t)], 1) * 0.3 + 0.5 + 0.005 * g.normal(size=(n, 2))
    y = np.stack([1.3 * np.cos(s), 0.8 * np.sin(s)], 1) * 0.3 + 0.6
    return x, y


def test_match_moves_the_source_onto_the_target():
    x, y = ellipses()
    r = geomreg.match(x, y, blur=0.02, evaluate_after=True, backend="tensorized", dtype="float64")
    before, after = r.divergence.value.item(), r.after.value.item()
    assert after < 1e-2 * before
    assert torch.allclose(r.registered, torch.as_tensor(x) + r.field)


def test_field_extends_to_other_points_through_the_potentials():
    x, y = ellipses()
    r = geomreg.match(x, y, blur=0.03, apply=x[::3], backend="tensorized", dtype="float64", tol=1e-9)
    # at the source points themselves, the extension is the field
    assert (r.applied_field - r.field[::3]).abs().max() < 1e-9
    # at nearby points (a denser sampling of the same shape) it is close to the field
    near = geomreg.match(x, y, blur=0.03, apply=x[::3] + 1e-3, backend="tensorized", dtype="float64")
    assert (near.applied_field - r.field[::3]).abs().max() < 0.02
    assert torch.allclose(near.applied, torch.as_tensor(x[::3] + 1e-3) + near.applied_field)


@pytest.mark.parametrize("backend", ["tensorized", "multiscale"])
def test_top_k_matches_are_the_largest_plan_entries(backend):
    x, y = ellipses(80, 70)
    r = geomreg.match(x, y, blur=0.05, top_k=70, backend=backend, dtype="float64", tol=1e-9)
    idx, w = r.matches
    # with k = M every row holds its point's whole mass, in decreasing order
    assert torch.allclose(w.sum(1), torch.full((80,), 1 / 80, dtype=w.dtype), atol=1e-6)
    assert (w[:, :-1] >= w[:, 1:]).all()
    # the plan: pi_ij = a_i b_j exp((f_i + g_j - C_ij) / eps) from a dense computation
    x_t, y_t = torch.as_tensor(x), torch.as_tensor(y)
    c = ((x_t[:, None] - y_t[None]) ** 2).sum(-1) / 2
    plan = r.divergence.plan
    logits = plan.h_ab[0][None] - c / plan.eps
    dense = torch.softmax(logits, dim=1) / 80
    assert torch.allclose(w, dense.gather(1, idx), atol=1e-7)


def test_match_refusals():
    x, y = ellipses(20, 20)
    with pytest.raises(ParameterError, match="Sinkhorn"):
        geomreg.match(x, y, loss="energy")
    with pytest.raises(ParameterError, match="top_k"):
        geomreg.match(x, y, top_k=21)


def test_cli_match_writes_every_output(tmp_path):
    x, y = ellipses(120, 100)
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", y)
    np.save(tmp_path / "full.npy", x + 1e-3)
    out = tmp_path / "out"
    out.mkdir()
    args = ["match", tmp_path / "a.npy", tmp_path / "b.npy", "--out", out / "reg.ply",
            "--field", out / "v.npy", "--apply", tmp_path / "full.npy", "--apply-out",
            out / "full_reg.csv", "--matches", out / "m.csv", "--top-k", "2", "--blur", "0.03",
            "--evaluate", "--json"]
    result = runner.invoke(app, [str(s) for s in args])
    assert result.exit_code == 0, result.stderr
    import json

    data = json.loads(result.stdout)
    assert data["divergence_after"] < 0.05 * data["value"] and data["top_k"] == 2
    reg = read_measure(out / "reg.ply", weight_property="weight")
    v = np.load(out / "v.npy")
    np.testing.assert_allclose(reg.points[:, :2], x + v, atol=1e-12)
    np.testing.assert_allclose(reg.weights, np.full(120, 1 / 120))
    assert read_measure(out / "full_reg.csv").n == 120
    with open(out / "m.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 240 and set(rows[0]) == {"source", "target", "weight"}
    assert all(0 <= int(r["target"]) < 100 and float(r["weight"]) > 0 for r in rows)


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--apply", "a.npy"], 2, "--apply-out"),
        (["--top-k", "3"], 2, "--top-k"),
        (["--field", "reg.npy"], 2, "same file"),
        (["--out", "a.npy"], 1, "a.npy"),
    ],
)
def test_cli_match_usage_errors_write_nothing(tmp_path, extra, code, message):
    x, y = ellipses(20, 20)
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", y)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["match", tmp_path / "a.npy", tmp_path / "b.npy", "--out", tmp_path / "reg.npy"]
    args += [tmp_path / e if e.endswith(".npy") else e for e in extra]
    result = runner.invoke(app, [str(s) for s in args])
    assert result.exit_code == code and message in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), x)


# ----- gradient flows


def test_flow_registers_and_stops_when_the_loss_stalls():
    x, y = ellipses()
    kw = dict(blur=0.03, dtype="float64", backend="tensorized")
    r = geomreg.flow(x, y, **kw)
    losses = [s.loss for s in r.steps]
    assert losses[-1] < 1e-3 * losses[0] and r.stopped == "steps" and len(r.steps) == 51
    # the stopping rule: the first step whose relative decrease is below tol ends the flow
    r = geomreg.flow(x, y, tol=0.3, **kw)
    assert r.stopped == "tol" and len(r.steps) < 51
    assert r.steps[-1].rel_decrease < 0.3 <= min(s.rel_decrease for s in r.steps[1:-1])


def test_flow_step_is_the_seed_euler_step_and_lr_1_is_match():
    x, y = ellipses(60, 50)
    kw = dict(blur=0.05, dtype="float64", backend="tensorized", tol=1e-9)
    flow_kw = {k: v for k, v in kw.items() if k != "tol"}
    one = geomreg.flow(x, y, lr=1.0, steps=1, sinkhorn_tol=1e-9, tol=0, **flow_kw)
    m = geomreg.match(x, y, **kw)
    assert torch.allclose(one.points, m.registered, atol=1e-9)
    # the seed's update x - lr * N * grad, for a kernel loss
    xt = torch.as_tensor(x).requires_grad_(True)
    (g,) = torch.autograd.grad(geomreg.divergence(xt, y, loss="energy").value, xt)
    step = geomreg.flow(x, y, loss="energy", lr=0.1, steps=1, tol=0, dtype="float64")
    assert torch.allclose(step.points, torch.as_tensor(x) - 0.1 * 60 * g, atol=1e-9)


def test_flow_refusals():
    x, y = ellipses(10, 10)
    for kw, flag in ((dict(lr=0), "lr"), (dict(steps=-1), "steps"), (dict(tol=-1), "tol")):
        with pytest.raises(ParameterError, match=flag):
            geomreg.flow(x, y, **kw)


def test_cli_flow_writes_frames_log_and_output(tmp_path):
    x, y = ellipses(80, 70)
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", y)
    (tmp_path / "frames").mkdir()
    args = ["flow", tmp_path / "a.npy", tmp_path / "b.npy", "--out", tmp_path / "end.ply",
            "--steps", "7", "--tol", "0", "--frames", tmp_path / "frames", "--every", "3",
            "--log", tmp_path / "f.jsonl", "--json"]
    result = runner.invoke(app, [str(s) for s in args])
    assert result.exit_code == 0, result.stderr
    import json

    data = json.loads(result.stdout)
    assert data["n_steps"] == 7 and data["stopped"] == "steps" and len(data["trajectory"]) == 8
    assert data["loss_final"] < data["loss_initial"]
    names = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert names == ["step_00000.npy", "step_00003.npy", "step_00006.npy", "step_00007.npy"]
    np.testing.assert_allclose(np.load(tmp_path / "frames" / "step_00007.npy"),
                               read_measure(tmp_path / "end.ply").points[:, :2], atol=1e-6)
    assert len((tmp_path / "f.jsonl").read_text().splitlines()) == 8


def test_cli_flow_interrupted_writes_no_output(tmp_path, monkeypatch):
    import geomreg.registration as reg

    x, y = ellipses(40, 30)
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", y)
    (tmp_path / "frames").mkdir()
    calls = {"n": 0}
    real = reg.divergence

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(reg, "divergence", interrupted)
    args = ["flow", tmp_path / "a.npy", tmp_path / "b.npy", "--out", tmp_path / "end.npy",
            "--frames", tmp_path / "frames", "--log", tmp_path / "f.jsonl", "--plot", tmp_path / "f.png"]
    result = runner.invoke(app, [str(s) for s in args])
    assert result.exit_code == 130 and "interrupted" in result.stderr
    assert not any((tmp_path / f).exists() for f in ("end.npy", "f.jsonl", "f.png"))
    frames = sorted((tmp_path / "frames").iterdir())
    assert [p.name for p in frames] == ["step_00000.npy", "step_00001.npy"]
    assert all(np.load(p).shape == (40, 2) for p in frames)  # complete files only


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [(["--every", "0"], 2, "--every"), (["--frame-format", ".vtk"], 2, "--frame-format"),
     (["--frames", "missing"], 1, "existing folder"), (["--lr", "-1"], 2, "--lr")],
)
def test_cli_flow_usage_errors(tmp_path, extra, code, message):
    x, y = ellipses(10, 10)
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", y)
    args = ["flow", tmp_path / "a.npy", tmp_path / "b.npy", "--out", tmp_path / "end.npy"]
    args += [tmp_path / e if e == "missing" else e for e in extra]
    result = runner.invoke(app, [str(s) for s in args])
    assert result.exit_code == code and message in result.stderr
    assert not (tmp_path / "end.npy").exists()


# ----- density images


def test_grid_splat_keeps_mass_and_barycentre():
    m = read_measure(SAMPLE / "blob_a.png")
    c, s = m.grid.centres(), m.grid.spacing
    np.testing.assert_array_equal(c[m.grid.mask], m.points)
    np.testing.assert_allclose(m.grid.splat(m.points, m.weights)[m.grid.mask], m.weights)
    moved = m.grid.splat(m.points + [0.3 * s, -0.2 * s], m.weights)
    assert moved.sum() == pytest.approx(m.mass)
    shift = (c * moved[:, None]).sum(0) / moved.sum() - (m.points * m.weights[:, None]).sum(0) / m.mass
    np.testing.assert_allclose(shift, [0.3 * s, -0.2 * s], atol=1e-12)


def test_match_images_transports_the_density(tmp_path):
    a, b = read_measure(SAMPLE / "blob_a.png"), read_measure(SAMPLE / "blob_b.png")
    r = geomreg.match(a, b, evaluate_after=True, dtype="float64", blur=0.03)
    assert r.divergence.backend == "grid" and r.field.shape == (a.grid.size, 2)
    assert r.transported.shape == (b.grid.size,) and r.transported.sum() == pytest.approx(a.mass)
    assert r.after.value.item() < 0.05 * r.divergence.value.item()
    with pytest.raises(ParameterError, match="apply"):
        geomreg.match(a, b, apply=a.points)
    out = tmp_path / "moved.png"
    args = ["match", SAMPLE / "blob_a.png", SAMPLE / "blob_b.png", "--out", out, "--field",
            tmp_path / "v.npy", "--blur", "0.03", "--evaluate", "--json"]
    result = runner.invoke(app, [str(s) for s in args])
    assert result.exit_code == 0, result.stderr
    import json

    after = json.loads(result.stdout)["divergence_after"]
    assert np.load(tmp_path / "v.npy").shape == (*a.grid.to_array(a.grid.full(a.weights)).shape, 2)
    # the PNG, read back as an image, is (up to 8-bit rounding) the transported density
    back = geomreg.divergence(read_measure(out), b, blur=0.03).value.item()
    assert back == pytest.approx(after, rel=0.05, abs=1e-6)
    bad = runner.invoke(app, [str(s) for s in ["match", tmp_path / "v.npy", SAMPLE / "blob_b.png",
                                                "--out", tmp_path / "x.png"]])
    assert bad.exit_code in (1, 2) and not (tmp_path / "x.png").exists()


# ----- global transforms (register)


def _rotation(deg, axis):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.deg2rad(deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def _bunny():
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "clouds" / "pycpd" / "bunny_source.txt"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    x = read_measure(path).points
    return (x - x.mean(0)) / np.linalg.norm(x.max(0) - x.min(0))


@pytest.mark.parametrize("deg", [30, 150])
def test_register_rigid_recovers_large_rotations(deg):
    x = _bunny()
    rot, shift = _rotation(deg, [1, 2, 0.5]), np.array([0.1, -0.05, 0.2])
    r = geomreg.register(x, x @ rot.T + shift, dtype="float64")
    lin, t = r.matrix[:3, :3].numpy(), r.matrix[:3, 3].numpy()
    angle = np.rad2deg(np.arccos(np.clip((np.trace(lin.T @ rot) - 1) / 2, -1, 1)))
    assert angle < 0.2 and np.linalg.norm(t - shift) < 1e-3
    np.testing.assert_allclose(lin @ lin.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(r.registered.numpy(), x @ lin.T + t, atol=1e-12)


def test_register_similarity_and_affine_in_2d():
    g = np.random.default_rng(3)  # three blobs of different sizes: no symmetry
    x = np.concatenate([g.normal(c, s, size=(n, 2)) for c, s, n in
                        (([0.3, 0.3], 0.05, 100), ([0.7, 0.4], 0.08, 60), ([0.4, 0.75], 0.03, 40))])
    sim = 1.4 * np.array([[np.cos(0.5), -np.sin(0.5)], [np.sin(0.5), np.cos(0.5)]])
    r = geomreg.register(x, x @ sim.T + [0.2, 0.1], model="similarity", dtype="float64", blur=0.02)
    assert np.abs(r.matrix[:2, :2].numpy() - sim).max() < 0.02
    aff = np.array([[1.2, 0.3], [-0.1, 0.8]])
    r = geomreg.register(x, x @ aff.T + [0.05, -0.1], model="affine", dtype="float64", blur=0.02)
    assert np.abs(r.matrix[:2, :2].numpy() - aff).max() < 0.03


def test_cli_register_writes_the_matrix_that_reproduces_the_output(tmp_path):
    x, _ = ellipses(150, 10)
    x = x + 0.03 * np.random.default_rng(4).normal(size=x.shape) * [1, 0.2]
    rot = np.array([[np.cos(1.0), -np.sin(1.0)], [np.sin(1.0), np.cos(1.0)]])
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", x @ rot.T + [0.3, 0.0])
    args = ["register", tmp_path / "a.npy", tmp_path / "b.npy", "--out", tmp_path / "reg.npy",
            "--transform", tmp_path / "T.txt", "--json", "--plot", tmp_path / "r.png"]
    result = runner.invoke(app, [str(s) for s in args])
    assert result.exit_code == 0, result.stderr
    assert imageio.v3.imread(tmp_path / "r.png").std() > 0
    assert len(json.loads(result.stdout)["overlap_per_start"]) >= 2
    t4 = np.loadtxt(tmp_path / "T.txt")
    assert t4.shape == (4, 4)
    reg = np.load(tmp_path / "reg.npy")
    hom = np.c_[x, np.zeros(len(x)), np.ones(len(x))] @ t4.T
    np.testing.assert_allclose(hom[:, :2], reg, atol=1e-12)  # REG = T . A
    np.testing.assert_allclose(t4[:2, :2], rot, atol=0.02)
    bad = runner.invoke(app, [str(s) for s in ["register", tmp_path / "a.npy", tmp_path / "b.npy"]])
    assert bad.exit_code == 2 and "--out" in bad.stderr
    args = ["register", tmp_path / "a.npy", tmp_path / "b.npy", "--json", "--no-surface"]
    plain = runner.invoke(app, [str(s) for s in args])
    assert plain.exit_code == 0 and json.loads(plain.stdout)["overlap_per_start"] == []


def test_register_voxel_resampling_keeps_mass_and_moves_the_full_cloud():
    from geomreg.registration import _voxel_means

    g = np.random.default_rng(5)
    p = torch.as_tensor(g.random((500, 3)))
    w = torch.as_tensor(g.random(500))
    means, mass = _voxel_means(p, w, 0.25)
    assert len(means) <= 64 and torch.isclose(mass.sum(), w.sum())
    assert torch.allclose((means * mass[:, None]).sum(0), (p * w[:, None]).sum(0))
    x = _bunny()
    rot = _rotation(40, [0.3, 1, 0.2])
    r = geomreg.register(x, x @ rot.T, voxel=0.05, dtype="float64")
    assert r.registered.shape == x.shape
    lin = r.matrix[:3, :3].numpy()
    assert np.rad2deg(np.arccos(np.clip((np.trace(lin.T @ rot) - 1) / 2, -1, 1))) < 2
    with pytest.raises(ParameterError, match="voxel"):
        geomreg.register(x, x, voxel=-1)


def _bumpy(n, seed):
    """n points on a lumpy closed surface with no symmetry (radius 0.3-0.5), sampled at random."""
    g = np.random.default_rng(seed)
    u = g.normal(size=(n, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    r = 0.4 + 0.08 * u[:, 0] * u[:, 1] + 0.06 * np.sin(3 * u[:, 2]) + 0.05 * u[:, 0] ** 3
    return u * r[:, None]


def test_surface_refinement_is_exact_on_one_cloud_and_undoes_a_small_motion():
    from geomreg.surface import overlap, refine

    x = torch.as_tensor(_bumpy(800, 0))
    rot = torch.as_tensor(_rotation(8, [1, 0.3, -0.5]))
    lin, t, iters = refine(x, x, rot, torch.tensor([0.03, 0.0, -0.02], dtype=torch.float64),
                           [0.2, 0.1, 0.05])
    assert iters > 3
    np.testing.assert_allclose(lin.numpy(), np.eye(3), atol=1e-6)
    np.testing.assert_allclose(t.numpy(), 0, atol=1e-6)
    assert overlap(x @ lin.T + t, x, 0.05) > 0.999
    shear = torch.tensor([[1.05, 0.04, 0.0], [0.0, 0.97, 0.03], [0.02, 0.0, 1.0]], dtype=torch.float64)
    for model, start in (("similarity", 1.05 * rot), ("affine", shear @ rot)):
        lin, t, _ = refine(x, x, start, torch.zeros(3, dtype=torch.float64), [0.2, 0.1, 0.05], model)
        np.testing.assert_allclose(lin.numpy(), np.eye(3), atol=1e-6)


def test_least_direction_is_the_smallest_eigenvector():
    from geomreg.surface import _least_direction

    g = torch.Generator().manual_seed(0)
    nb = torch.randn(500, 12, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.4, 0.01])
    nb = nb @ torch.linalg.qr(torch.randn(500, 3, 3, generator=g, dtype=torch.float64))[0]
    c = nb - nb.mean(1, keepdim=True)
    cov = c.transpose(1, 2) @ c
    want = torch.linalg.eigh(cov)[1][:, :, 0]
    got = _least_direction(cov)
    assert torch.allclose((got * want).sum(-1).abs(), torch.ones(500, dtype=torch.float64), atol=1e-12)
    # a multiple of the identity, a line and nothing: any unit vector of the least eigenspace
    flat = torch.stack([torch.eye(3), torch.diag(torch.tensor([1.0, 0, 0])), torch.zeros(3, 3)]).double()
    v = _least_direction(flat)
    assert torch.allclose(v.norm(dim=1), torch.ones(3, dtype=torch.float64)) and abs(float(v[1, 0])) < 1e-12


def test_refine_many_gives_each_pose_what_refine_gives_it_alone():
    from geomreg.surface import Target, refine, refine_many

    x, y = torch.as_tensor(_bumpy(600, 5)), Target(torch.as_tensor(_bumpy(900, 6)))
    zero = torch.zeros(3, dtype=torch.float64)
    poses = [(torch.as_tensor(_rotation(deg, [1, 0.2, 0.3])), zero + 0.01 * deg) for deg in (3, 12, 40)]
    together, iters = refine_many(x, y, poses, [0.2, 0.1, 0.05], iterations=6)
    alone = [refine(x, y, *pose, [0.2, 0.1, 0.05], iterations=6) for pose in poses]
    assert iters == sum(n for *_, n in alone)
    assert len({n for *_, n in alone}) > 1  # the poses stop after different iterations
    for (lin, t), (lin1, t1, _) in zip(together, alone, strict=True):
        assert torch.equal(lin, lin1) and torch.equal(t, t1)


def test_pose_overlap_equals_the_overlap_of_the_moved_cloud():
    """Through the source's own index (rotations and similarities) or a new one (affine): equal."""
    from geomreg.surface import Target, overlap, pose_overlap

    x, y = torch.as_tensor(_bumpy(900, 1)), torch.as_tensor(_bumpy(700, 2))
    rot = torch.as_tensor(_rotation(20, [0.2, 1, 0.4]))
    t = torch.tensor([0.05, -0.02, 0.01], dtype=torch.float64)
    a = torch.linspace(0.5, 1.5, 900, dtype=torch.float64)
    shear = torch.tensor([[1.1, 0.1, 0.0], [0.0, 0.9, 0.05], [0.0, 0.0, 1.0]], dtype=torch.float64)
    source, target = Target(x), Target(y)
    for lin in (rot, 1.2 * rot, shear @ rot):
        for queries in (None, 300):
            want = overlap(x @ lin.T + t, y, 0.05, a, queries)
            assert 0.05 < want < 0.95  # partial: the test can tell distances apart
            assert pose_overlap(source, target, lin, t, 0.05, a, queries) == pytest.approx(want, rel=1e-12)


def test_register_transport_stops_at_half_the_cube_side_when_blur_is_far_below_it():
    """A scene in metres at the default blur (0.05): transport on cube means 0.5 m apart stops
    at half their side instead of solving near-permutations; the value is still at blur 0.05."""
    g = np.random.default_rng(3)
    x = _bumpy(1500, 4) * 5.0  # a closed surface about 4 m across
    y = x[g.permutation(1500)[:1200]] @ _rotation(10, [0.2, 1, 0.1]).T + [0.2, -0.1, 0.05]
    blurs = []
    r = geomreg.register(x, y, on_result=lambda res: blurs.append(res.params["blur"]))
    assert r.voxel > 0.2  # resampled to about COARSE_POINTS cube means
    assert min(blurs[:-1]) == pytest.approx(r.voxel / 2)  # transport's finest blur, values included
    assert blurs[-1] == 0.05  # the final divergence at the blur asked for
    truth = x @ _rotation(10, [0.2, 1, 0.1]).T + [0.2, -0.1, 0.05]
    assert np.abs(r.registered.numpy() - truth).max() < 0.05  # the surface stage still ends precise


def test_register_transport_fits_are_coarse_only_when_the_surface_stage_follows():
    """Before the surface stage, rigid transport fits skip debiasing and stop at TRANSPORT_TOL
    (the caller's tol when looser); similarity fits keep debiasing (their scale would be biased);
    the values and the final divergence keep the caller's options, as does surface=False."""
    from geomreg import registration

    x = _bumpy(300, 4)
    y = x @ _rotation(20, [0.2, 1, 0.1]).T

    def options(**kw):  # every (debias, tol) that a Sinkhorn problem was solved with
        seen = []
        geomreg.register(x, y, on_result=lambda res: seen.append((res.params["debias"], res.params["tol"])),
                         **kw)
        return set(seen)

    tt = registration.TRANSPORT_TOL
    assert options() == {(False, tt), (True, 1e-3)}
    assert options(tol=1e-4) == {(False, tt), (True, 1e-4)}  # the fits: tt or a looser tol
    assert options(tol=0.05) == {(False, 0.05), (True, 0.05)}
    assert options(model="similarity") == {(True, tt), (True, 1e-3)}
    assert options(surface=False) == {(True, 1e-3)}


def test_register_surface_cutoffs_stay_above_the_spacing_of_sparse_scans():
    """Two independent samples of a 40 m surface, about 2 m apart, at blur 0.5: cut-offs down
    to a quarter metre left few pairs (0.12 m off at the worst point); above 1.5 spacings 0.054."""
    x = _bumpy(1500, 4) * 50.0
    rot, shift = _rotation(10, [0.2, 1, 0.1]), np.array([2.0, -1.0, 0.5])
    y = _bumpy(1200, 7) * 50.0 @ rot.T + shift  # the same surface, other points
    r = geomreg.register(x, y, blur=0.5)
    assert np.abs(r.registered.numpy() - (x @ rot.T + shift)).max() < 0.08


@pytest.mark.parametrize("variant", ["subsample", "crop"])
def test_register_independent_samples_and_partial_overlap(variant):
    x = _bumpy(2000, 1)
    y = _bumpy(2000, 2)  # the same surface, sampled independently
    if variant == "crop":  # 40% of the target gone
        y = y[np.argsort(y @ [0.6, -0.8, 0.0])[:1200]]
    rot, shift = _rotation(60, [0.2, 1, -0.4]), np.array([0.1, -0.05, 0.08])
    r = geomreg.register(x, y @ rot.T + shift, dtype="float64")
    lin, t = r.matrix[:3, :3].numpy(), r.matrix[:3, 3].numpy()
    angle = np.rad2deg(np.arccos(np.clip((np.trace(lin.T @ rot) - 1) / 2, -1, 1)))
    assert angle < 1 and np.linalg.norm(t - shift) < 0.01
    assert r.voxel is not None and len(r.overlap) == len(r.values)
    assert max(r.overlap) == r.overlap[r.start]


def test_flow_between_images_writes_the_density_and_the_field(tmp_path):
    a = read_measure(SAMPLE / "blob_a.png")
    b = read_measure(SAMPLE / "blob_b.png")
    args = ["flow", SAMPLE / "blob_a.png", SAMPLE / "blob_b.png", "--out", tmp_path / "end.png",
            "--field", tmp_path / "v.npy", "--blur", "0.03", "--steps", "2", "--lr", "0.8", "--tol", "0",
            "--json"]
    result = runner.invoke(app, [str(s) for s in args])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    end = read_measure(tmp_path / "end.png")  # the density at the end, on B's pixels
    assert end.grid.shape == b.grid.shape
    before = geomreg.divergence(a, b, blur=0.03).value.item()
    after = geomreg.divergence(end, b, blur=0.03).value.item()
    assert after < 0.1 * before and after == pytest.approx(record["loss_final"], rel=0.3, abs=1e-5)
    v = np.load(tmp_path / "v.npy")
    image = a.grid.to_array(a.grid.full(a.weights))
    assert v.shape == (*image.shape, 2)
    assert np.isnan(v[image == 0]).all() and np.isfinite(v[image > 0]).all()
    assert np.nanmax(np.linalg.norm(v, axis=-1)) > 0.01
    bad = runner.invoke(app, [str(s) for s in ["flow", tmp_path / "v.npy", SAMPLE / "blob_b.png",
                                                "--out", tmp_path / "x.png"]])
    assert bad.exit_code in (1, 2) and not (tmp_path / "x.png").exists()


def test_register_rigid_then_flow_explains_what_a_rotation_cannot(tmp_path):
    x = _bumpy(300, 3)
    bent = x.copy()
    bent[:, 2] += 0.15 * bent[:, 0] ** 2  # a bend no rigid motion undoes
    rot = _rotation(40, [1, 0.5, 0.2])
    y = bent @ rot.T + [0.05, 0.0, 0.1]
    rigid = geomreg.register(x, y, dtype="float64")
    both = geomreg.register(x, y, model="rigid+flow", dtype="float64")
    np.testing.assert_allclose(both.matrix.numpy(), rigid.matrix.numpy())
    start = geomreg.divergence(rigid.registered, y, dtype="float64").value.item()  # step 0: cold
    assert both.flow is not None and both.flow.steps[0].loss == pytest.approx(start, rel=1e-6)
    assert both.value == both.flow.steps[-1].loss < 0.3 * start
    assert not torch.allclose(both.registered, rigid.registered)
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", y)
    args = ["register", tmp_path / "a.npy", tmp_path / "b.npy", "--model", "rigid+flow", "--json",
            "--out", tmp_path / "reg.npy"]
    result = runner.invoke(app, [str(s) for s in args])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["model"] == "rigid+flow" and record["flow"]["loss_final"] < record["flow"]["loss_initial"]
    np.testing.assert_allclose(np.load(tmp_path / "reg.npy"), both.registered.numpy(), atol=1e-9)


# ----- warm starts, carried points, compute times (registration speed)


def test_warm_started_flow_follows_the_cold_flow():
    x, y = ellipses(200, 180)
    kw = dict(blur=0.03, dtype="float64", backend="tensorized", steps=20, tol=0)
    cold = geomreg.flow(x, y, warm_start=False, sinkhorn_tol=1e-5, **kw)
    assert set(cold.times) == {"loss", "gradient"}
    for mode in (True, "auto"):
        warm = geomreg.flow(x, y, warm_start=mode, sinkhorn_tol=1e-5, **kw)
        assert torch.allclose(warm.points, cold.points, atol=1e-5)
        assert warm.steps[-1].loss == pytest.approx(cold.steps[-1].loss, rel=1e-3)
        assert set(warm.times) == {"loss"} and 0 < warm.times["loss"] <= warm.time_s
    # here warm starts cost more than the schedule: "auto" falls back to cold solves
    always = geomreg.flow(x, y, warm_start=True, sinkhorn_tol=1e-5, **kw)
    assert sum(s.n_iter for s in warm.steps) < sum(s.n_iter for s in always.steps)
    assert warm.to_dict()["time_s"] == warm.time_s
    # p = 1 and reach: autograd steps, still warm-started, the same points as cold ones
    for extra in (dict(p=1), dict(reach=0.3)):
        w = geomreg.flow(x, y, warm_start=True, sinkhorn_tol=1e-5, **{**kw, "steps": 5}, **extra)
        c = geomreg.flow(x, y, warm_start=False, sinkhorn_tol=1e-5, **{**kw, "steps": 5}, **extra)
        assert "gradient" in w.times and torch.allclose(w.points, c.points, atol=1e-5)


def test_flow_carries_other_points_along_its_field():
    x, y = ellipses(120, 100)
    kw = dict(blur=0.05, dtype="float64", backend="tensorized", steps=8, tol=0)
    r = geomreg.flow(x, y, apply=x[:30], **kw)
    # the source's own points, carried, end where the flow puts them
    np.testing.assert_allclose(r.applied.numpy(), r.points[:30].numpy(), atol=1e-9)
    assert r.to_dict()["n_applied"] == 30 and "apply" in r.times
    other = np.array([[0.5, 0.5], [0.9, 0.2]])
    moved = geomreg.flow(x, y, apply=other, **kw).applied
    assert moved.shape == (2, 2) and not np.allclose(moved.numpy(), other)
    with pytest.raises(ParameterError, match="apply"):
        geomreg.flow(x, y, apply=other, reach=0.2, **kw)
    with pytest.raises(geomreg.errors.InputError, match="apply"):
        geomreg.flow(x, y, apply=np.zeros((3, 3)), **kw)


def test_cli_flow_apply_writes_the_carried_points_and_times(tmp_path):
    x, y = ellipses(80, 70)
    np.save(tmp_path / "a.npy", x)
    np.save(tmp_path / "b.npy", y)
    np.save(tmp_path / "other.npy", x[:10])
    base = ["flow", tmp_path / "a.npy", tmp_path / "b.npy", "--out", tmp_path / "end.npy",
            "--steps", "3", "--tol", "0", "--dtype", "float64", "--backend", "tensorized"]
    ok = runner.invoke(app, [str(s) for s in base + ["--apply", tmp_path / "other.npy", "--apply-out",
                                                     tmp_path / "moved.txt", "--json"]])
    assert ok.exit_code == 0, ok.stderr
    record = json.loads(ok.stdout)
    assert record["n_applied"] == 10 and record["time_s"] > 0 and "loss" in record["times"]
    np.testing.assert_allclose(np.loadtxt(tmp_path / "moved.txt"), np.load(tmp_path / "end.npy")[:10],
                               atol=1e-6)
    alone = runner.invoke(app, [str(s) for s in base + ["--apply", tmp_path / "other.npy"]])
    assert alone.exit_code == 2 and "--apply" in alone.stderr
    (tmp_path / "end.npy").unlink()
    bad = runner.invoke(app, [str(s) for s in base + ["--apply", tmp_path / "other.npy", "--apply-out",
                                                      tmp_path / "m.npy", "--reach", "0.2"]])
    assert bad.exit_code == 2 and "apply" in bad.stderr and not (tmp_path / "end.npy").exists()


def test_match_and_register_report_their_stage_times():
    x, y = ellipses(100, 90)
    m = geomreg.match(x, y, blur=0.05, apply=x[:5], top_k=2, evaluate_after=True, backend="tensorized")
    assert set(m.times) == {"transport", "apply", "matches", "after"}
    assert sum(m.times.values()) <= m.time_s and m.to_dict()["time_s"] == m.time_s
    r = geomreg.register(_bumpy(600, 4), _bumpy(600, 5), dtype="float64")
    assert set(r.times) == {"voxel", "transport", "surface", "final"}
    assert 0 < sum(r.times.values()) <= r.time_s == r.to_dict()["time_s"]


STANFORD = Path(__file__).resolve().parents[2] / "shared" / "data" / "clouds" / "stanford"


@pytest.mark.parametrize("turn", [0.0, 150.0])
def test_register_real_partial_scans_from_any_turn(turn):
    """Two real Stanford range scans (about 70% overlap), the target turned by ``turn`` more."""
    if not (STANFORD / "bun045.xyz").exists():
        pytest.skip(f"no Stanford scans in {STANFORD}")
    x, y = np.loadtxt(STANFORD / "bun045.xyz"), np.loadtxt(STANFORD / "bun000.xyz")
    truth = np.loadtxt(STANFORD / "bun045_to_bun000.txt")
    extra = np.eye(4)
    extra[:3, :3] = _rotation(turn, [0.3, -1.0, 0.5])
    truth = extra @ truth
    y = y @ extra[:3, :3].T
    diag = np.linalg.norm(y.max(0) - y.min(0))
    r = geomreg.register(x, y, blur=0.05 * diag, dtype="float64")
    m = r.matrix.numpy()
    angle = np.rad2deg(np.arccos(np.clip((np.trace(m[:3, :3].T @ truth[:3, :3]) - 1) / 2, -1, 1)))
    shift = np.linalg.norm((x @ m[:3, :3].T + m[:3, 3]) - (x @ truth[:3, :3].T + truth[:3, 3]), axis=1)
    assert angle < 0.2 and shift.mean() < 0.002 * diag


def test_target_planes_at_once_equal_those_computed_piece_by_piece(monkeypatch):
    from geomreg import surface

    g = torch.Generator().manual_seed(1)
    pts = torch.rand(800, 3, generator=g, dtype=torch.float64)
    rows = torch.tensor([5, 17, 5, 640, 3])
    eager = surface.Target(pts)
    first = eager.planes(rows)
    assert bool(eager._done.all())  # a small cloud: every plane at the first query
    monkeypatch.setattr(surface, "EAGER_PLANES", 100)
    lazy = surface.Target(pts)
    again = lazy.planes(rows)
    assert int(lazy._done.sum()) == 4  # a larger one: the queried points' planes only
    for a, b in zip(first, again, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    more = torch.tensor([100, 200])
    for a, b in zip(eager.planes(more), lazy.planes(more), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_noise_scale_of_a_scan_and_the_cutoffs_above_it(monkeypatch):
    """Target.noise: about sigma for gaussian noise across a plane, ~0 on a clean one; register's
    last surface cut-off stays above SURFACE_NOISE times the clouds' residual scale."""
    from geomreg import registration, surface

    g = torch.Generator().manual_seed(0)
    flat = torch.cat([torch.rand(3000, 2, generator=g, dtype=torch.float64),
                      torch.zeros(3000, 1, dtype=torch.float64)], dim=1)
    assert surface.Target(flat).noise() < 1e-12
    noisy = flat.clone()
    noisy[:, 2] = 0.01 * torch.randn(3000, generator=g, dtype=torch.float64)  # across the plane
    assert surface.Target(noisy).noise() == pytest.approx(0.01, rel=0.15)

    seen = []
    real = surface.refine_many

    def spy(points, target, poses, scales, *args, **kwargs):
        seen.append(scales[-1])
        return real(points, target, poses, scales, *args, **kwargs)

    monkeypatch.setattr(surface, "refine_many", spy)
    x = _bumpy(1500, 1)
    y = _bumpy(1200, 2) + np.random.default_rng(0).normal(0, 0.01, (1200, 3))
    geomreg.register(x, y, dtype="float64")
    noise = np.hypot(surface.Target(torch.as_tensor(y)).noise(), surface.Target(torch.as_tensor(x)).noise())
    assert noise > 0.009 and seen[-1] == pytest.approx(registration.SURFACE_NOISE * noise)


def test_flow_warm_starts_extrapolate_the_last_steps_potentials():
    from geomreg.engine.base import Duals
    from geomreg.registration import WARM_AHEAD, _extrapolated

    t = torch.tensor
    now = Duals(t([[1.0, 2.0]]), t([[3.0]]), t([[0.5, 0.5]]), t([[1.0]]))
    before = Duals(t([[0.0, 2.0]]), t([[4.0]]), t([[0.5, 0.0]]), t([[2.0]]))
    out = _extrapolated([before, now])  # two steps: the fixed share of the last change
    assert torch.allclose(out.xy, torch.tensor([[1.0 + WARM_AHEAD, 2.0]]))
    assert torch.allclose(out.yx, torch.tensor([[3.0 - WARM_AHEAD]]))
    assert torch.allclose(out.xx, torch.tensor([[0.5, 0.5 + 0.5 * WARM_AHEAD]]))
    assert out.yy is now.yy  # the target's own potential: the target does not move
    assert _extrapolated([now]) is now
    other = before._replace(xy=torch.zeros(1, 3))  # another cloud: nothing to extrapolate from
    assert _extrapolated([other, now]) is now
    half = Duals(now.xy, now.yx)  # not debiased, unlike the step before: as they are
    assert _extrapolated([before, half]) is half
    # three steps whose changes shrink geometrically (ratio 0.8, 0.5 for yx): the next one exactly
    v, w = t([[1.0, -2.0]]), t([[3.0]])
    steps = [Duals(k * v, (1 - 0.5**k) * w, 0.8**k * v, t([[0.0]])) for k in range(3)]
    steps = [s._replace(xy=sum(0.8**i for i in range(k)) * v) for k, s in enumerate(steps)]
    out = _extrapolated(steps)
    assert torch.allclose(out.xy, sum(0.8**i for i in range(3)) * v)
    assert torch.allclose(out.yx, (1 - 0.5**3) * w)
    assert torch.allclose(out.xx, 0.8**3 * v)  # ratio 0.8 of the changes of 0.8**k v as well
    # a change that reverses direction: no extrapolation past the last value (share 0)
    back = [steps[0], steps[1], steps[0]]
    assert torch.equal(_extrapolated(back).xy, steps[0].xy)


def test_fixed_target_keeps_the_targets_own_potential_and_the_value():
    """A warm start with fixed_target never updates g_bb (nor truncates its pair), and gives
    the value and field of the full warm start within their tolerance; bad uses are refused."""
    gen = torch.Generator().manual_seed(4)
    x, y = torch.rand(1500, 3, generator=gen), torch.rand(1400, 3, generator=gen) + 0.1
    kw = dict(blur=0.05, tol=1e-5, field=True, backend="multiscale")
    first = geomreg.divergence(x, y, **kw)
    moved = x + 0.2 * first.field
    full = geomreg.divergence(moved, y, init=first, **kw)
    fixed = geomreg.divergence(moved, y, init=first, fixed_target=True, **kw)
    assert torch.equal(fixed.duals.yy, first.duals.yy)
    assert not torch.equal(full.duals.yy, first.duals.yy)
    assert fixed.multiscale["pairs_kept_fraction"]["yy"] == 1.0  # left whole: never used
    assert fixed.value.item() == pytest.approx(full.value.item(), rel=1e-3)
    assert float((fixed.field - full.field).abs().max()) < 1e-4
    for bad in (dict(), dict(init=first, debias=False)):
        with pytest.raises(geomreg.ParameterError, match="fixed_target"):
            geomreg.divergence(x, y, blur=0.05, fixed_target=True, **bad)

"""Tests of the ``geomreg`` command line (``geomreg distance A B``), as a shell script sees it.

Two ways in:

* ``typer.testing.CliRunner`` with ``cli.main.app``: cheap, used for the long lists (every
  bad input, every option). Click's own usage errors come from its standalone mode there,
  so for those only the exit code 2 is checked.
* real subprocesses of the installed console script ``geomreg`` (``run()`` entry point):
  exit codes, stdout that ``float()``/``json.loads`` read, files written, one-line stderr.
  These cost a Python start (and a torch import when a divergence is computed), so they are
  kept to a representative few, and most of them fail before torch is imported.

Clouds are small (100 x 80 points subsampled from the sample spirals, about unit scale) and
every bad file is generated in a temporary folder.


"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"

JSON_KEYS = {
    "value", "loss", "p", "blur", "n_points", "backend", "device", "dtype", "converged",
    "n_iter", "marginal_error", "schedule", "time_s", "versions",
}  # fmt: skip
STEP_KEYS = {"index", "phase", "eps", "sigma", "elapsed_s", "change", "marginal_error"}
LOSSES = ["sinkhorn", "hausdorff", "energy", "gaussian", "laplacian"]

runner = CliRunner()


# --------------------------------------------------------------------------- helpers


def invoke(*args):
    """Run ``geomreg ARGS`` in-process (CliRunner); stdout and stderr kept apart."""
    return runner.invoke(app, [str(a) for a in args])


def _script() -> Path | None:
    here = Path(sys.executable).parent / "geomreg"
    if here.is_file():
        return here
    found = shutil.which("geomreg")
    return Path(found) if found else None


GEOMREG = _script()


def run_cli(*args, python_flags: tuple[str, ...] = (), timeout: float = 240) -> subprocess.CompletedProcess:
    """Run the real console script in a subprocess, as a shell script would."""
    if GEOMREG is None:
        pytest.skip("the geomreg console script is not installed")
    cmd = [sys.executable, *python_flags, str(GEOMREG), *(str(a) for a in args)]
    return subprocess.run(
        cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout, cwd=ROOT
    )


def strict_json(text: str):
    """json.loads that refuses the non-standard NaN / Infinity / -Infinity literals."""

    def refuse(name):
        raise ValueError(f"non-standard JSON literal {name}")

    return json.loads(text, parse_constant=refuse)


def one_float(stdout: str) -> float:
    """The single value printed on stdout (exactly one line, nothing else)."""
    lines = stdout.splitlines()
    assert len(lines) == 1, f"stdout should be one line, got {stdout!r}"
    value = float(lines[0])
    assert math.isfinite(value), stdout
    return value


def assert_one_error_line(stderr: str, needle: str) -> None:
    """stderr is exactly one line ``Error: ...`` naming ``needle``, with no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, f"stderr should be one line, got {stderr!r}"
    assert lines[0].startswith("Error: "), stderr
    assert needle.lower() in lines[0].lower(), f"{needle!r} not named in {lines[0]!r}"


def snapshot(folder: Path, skip: Path | None = None) -> dict[str, bytes]:
    """Bytes of every file under ``folder`` (outside ``skip``)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.is_file():
            out[str(path)] = path.read_bytes()
    return out


def write_ascii_ply(path: Path, points, confidence=None) -> Path:
    """An ASCII PLY with float x y z (and optionally a float ``confidence``) per vertex."""
    points = np.asarray(points, dtype=np.float64)
    props = "property float x\nproperty float y\nproperty float z\n"
    rows = points
    if confidence is not None:
        props += "property float confidence\n"
        rows = np.column_stack([points, confidence])
    header = f"ply\nformat ascii 1.0\nelement vertex {len(points)}\n{props}end_header\n"
    body = "".join(" ".join(repr(float(v)) for v in row) + "\n" for row in rows)
    path.write_text(header + body)
    return path


def sample_confidence() -> np.ndarray:
    """The ``confidence`` column of sample_data/spiral_a.ply (binary little-endian floats)."""
    raw = (SAMPLE / "spiral_a.ply").read_bytes()
    start = raw.index(b"end_header\n") + len(b"end_header\n")
    n = int(re.search(rb"element vertex (\d+)", raw[:start]).group(1))
    dtype = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("confidence", "<f4")])
    return np.frombuffer(raw, dtype=dtype, count=n, offset=start)["confidence"].astype(np.float64)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def clouds(tmp_path_factory) -> dict[str, Path]:
    """Small valid inputs shared by the module (never modified by the tests)."""
    d = tmp_path_factory.mktemp("clouds")
    spiral_a = np.load(SAMPLE / "spiral_a.npy")[::15]  # (100, 3), about unit scale
    spiral_b = np.load(SAMPLE / "spiral_b.npy")[::15]  # (80, 3)
    rng = np.random.default_rng(0)
    paths = {
        "a": d / "a.npy",
        "b": d / "b.npy",
        "one": d / "one.npy",
        "line_a": d / "line_a.npy",
        "line_b": d / "line_b.npy",
        "line_b_txt": d / "line_b.txt",
        "plane_a": d / "plane_a.txt",
        "plane_b": d / "plane_b.csv",
        "w3": d / "w3.npy",
    }
    np.save(paths["a"], spiral_a)
    np.save(paths["b"], spiral_b)
    np.save(paths["one"], np.array([[0.1, 0.2, 0.3]]))
    np.save(paths["line_a"], np.linspace(0.0, 1.0, 50))  # shape (N,): 50 points in 1-D
    np.save(paths["line_b"], np.linspace(0.2, 1.3, 40))
    np.savetxt(paths["line_b_txt"], np.linspace(0.2, 1.3, 40))  # one number per line
    np.savetxt(paths["plane_a"], rng.random((60, 2)))
    np.savetxt(paths["plane_b"], rng.random((50, 2)) + 0.1, delimiter=",")
    np.save(paths["w3"], np.full(len(spiral_a), 3.0 / len(spiral_a)))  # total mass 3
    return paths


# --------------------------------------------------------------------------- bad inputs

# Each builder gets (case folder, clouds) and returns (arguments after "distance", needle):
# the needle (file or option) must appear in the one-line error.


def _npy(d: Path, name: str, arr, **kw) -> Path:
    path = d / name
    np.save(path, arr, **kw)
    return path


def _bad_missing_a(d, c):
    return [d / "nope.npy", c["b"]], str(d / "nope.npy")


def _bad_missing_b(d, c):
    return [c["a"], d / "nope.npy"], str(d / "nope.npy")


def _bad_directory(d, c):
    (d / "folder.npy").mkdir()
    return [d / "folder.npy", c["b"]], str(d / "folder.npy")


def _bad_suffix(d, c):
    (d / "cloud.foo").write_text("1 2 3\n4 5 6\n")
    return [c["a"], d / "cloud.foo"], str(d / "cloud.foo")


def _bad_no_suffix(d, c):
    (d / "cloud").write_text("1 2 3\n4 5 6\n")
    return [d / "cloud", c["b"]], str(d / "cloud")


def _bad_empty_file(d, c):
    (d / "empty.npy").write_bytes(b"")
    return [d / "empty.npy", c["b"]], str(d / "empty.npy")


def _bad_empty_cloud(d, c):
    return [_npy(d, "zero.npy", np.zeros((0, 3))), c["b"]], str(d / "zero.npy")


def _bad_empty_txt(d, c):
    (d / "comments.txt").write_text("# only a comment\n\n")
    return [d / "comments.txt", c["b"]], str(d / "comments.txt")


def _bad_nan(d, c):
    return [_npy(d, "nan.npy", np.array([[0.0, 0.0, np.nan], [1.0, 1.0, 1.0]])), c["b"]], str(d / "nan.npy")


def _bad_inf_in_b(d, c):
    return [c["a"], _npy(d, "inf.npy", np.array([[0.0, np.inf, 0.0], [1.0, 1.0, 1.0]]))], str(d / "inf.npy")


def _bad_object_npy(d, c):
    path = _npy(d, "obj.npy", np.array([{"x": 1}, 2], dtype=object), allow_pickle=True)
    return [path, c["b"]], str(path)


def _bad_raw_pickle(d, c):
    (d / "pickle.npy").write_bytes(pickle.dumps([[1.0, 2.0, 3.0]]))
    return [d / "pickle.npy", c["b"]], str(d / "pickle.npy")


def _bad_string_npy(d, c):
    return [_npy(d, "str.npy", np.array([["a", "b", "c"]])), c["b"]], str(d / "str.npy")


def _bad_complex_npy(d, c):
    return [_npy(d, "cplx.npy", np.ones((4, 3), complex)), c["b"]], str(d / "cplx.npy")


def _bad_npz(d, c):
    np.savez(d / "arch.npz", x=np.ones((4, 3)))
    os.replace(d / "arch.npz", d / "arch.npy")
    return [d / "arch.npy", c["b"]], str(d / "arch.npy")


def _bad_truncated_npy(d, c):
    raw = c["a"].read_bytes()
    (d / "cut.npy").write_bytes(raw[: len(raw) // 2])
    return [d / "cut.npy", c["b"]], str(d / "cut.npy")


def _bad_rank4(d, c):
    return [_npy(d, "rank4.npy", np.ones((2, 3, 4, 2))), c["b"]], str(d / "rank4.npy")


def _bad_rank0(d, c):
    return [_npy(d, "rank0.npy", np.float64(1.0)), c["b"]], str(d / "rank0.npy")


def _bad_dims(d, c):
    return [c["a"], _npy(d, "flat.npy", np.random.default_rng(1).random((20, 2)))], str(d / "flat.npy")


def _bad_dims_image(d, c):
    return [SAMPLE / "blob_a.png", c["a"]], str(c["a"])


def _bad_weights_negative(d, c):
    w = np.full(100, 0.01)
    w[3] = -0.01
    return [c["a"], c["b"], "--weights-a", _npy(d, "wneg.npy", w)], str(d / "wneg.npy")


def _bad_weights_zero(d, c):
    return [c["a"], c["b"], "--weights-a", _npy(d, "wzero.npy", np.zeros(100))], str(d / "wzero.npy")


def _bad_weights_short(d, c):
    return [c["a"], c["b"], "--weights-a", _npy(d, "wshort.npy", np.ones(99))], str(d / "wshort.npy")


def _bad_weights_long_b(d, c):
    return [c["a"], c["b"], "--weights-b", _npy(d, "wlong.npy", np.ones(81))], str(d / "wlong.npy")


def _bad_weights_nan(d, c):
    return [c["a"], c["b"], "--weights-a", _npy(d, "wnan.npy", np.full(100, np.nan))], str(d / "wnan.npy")


def _bad_weights_text(d, c):
    (d / "w.txt").write_text("1\n2\nthree\n" + "1\n" * 97)
    return [c["a"], c["b"], "--weights-a", d / "w.txt"], str(d / "w.txt")


def _bad_weights_missing(d, c):
    return [c["a"], c["b"], "--weights-b", d / "nope_w.npy"], str(d / "nope_w.npy")


def _bad_image_no_mass(d, c):
    iio.imwrite(d / "white.png", np.full((12, 10), 255, np.uint8))
    return [d / "white.png", SAMPLE / "blob_b.png"], str(d / "white.png")


def _bad_image_no_mass_bright(d, c):
    iio.imwrite(d / "black.png", np.zeros((12, 10), np.uint8))
    return [SAMPLE / "blob_a.png", d / "black.png", "--mass", "bright"], str(d / "black.png")


def _bad_truncated_png(d, c):
    raw = (SAMPLE / "blob_a.png").read_bytes()
    (d / "cut.png").write_bytes(raw[: len(raw) // 2])
    return [d / "cut.png", SAMPLE / "blob_b.png"], str(d / "cut.png")


def _bad_garbage_png(d, c):
    (d / "junk.png").write_bytes(b"this is not a png image\n" * 8)
    return [SAMPLE / "blob_a.png", d / "junk.png"], str(d / "junk.png")


def _bad_truncated_ply(d, c):
    raw = (SAMPLE / "spiral_a.ply").read_bytes()
    (d / "cut.ply").write_bytes(raw[: len(raw) // 2])
    return [d / "cut.ply", SAMPLE / "spiral_b.ply"], str(d / "cut.ply")


def _bad_ply_no_header_end(d, c):
    raw = (SAMPLE / "spiral_a.ply").read_bytes()
    (d / "head.ply").write_bytes(raw[: raw.index(b"end_header")])
    return [d / "head.ply", SAMPLE / "spiral_b.ply"], str(d / "head.ply")


def _bad_garbage_ply(d, c):
    (d / "junk.ply").write_bytes(b"\x00\x01garbage" * 20)
    return [d / "junk.ply", SAMPLE / "spiral_b.ply"], str(d / "junk.ply")


def _bad_ply_nan(d, c):
    path = write_ascii_ply(d / "nan.ply", [[0.0, 0.0, np.nan], [1.0, 1.0, 1.0]])
    return [path, SAMPLE / "spiral_b.ply"], str(path)


def _bad_ply_zero_vertices(d, c):
    path = write_ascii_ply(d / "none.ply", np.zeros((0, 3)))
    return [SAMPLE / "spiral_b.ply", path], str(path)


def _bad_ragged_txt(d, c):
    (d / "ragged.txt").write_text("1 2 3\n4 5\n")
    return [d / "ragged.txt", c["b"]], str(d / "ragged.txt")


def _bad_words_txt(d, c):
    (d / "words.txt").write_text("1 2 3\n4 x 6\n")
    return [d / "words.txt", c["b"]], str(d / "words.txt")


def _bad_binary_txt(d, c):
    (d / "bin.txt").write_bytes(b"\xff\xfe\x00\x01\x02 binary")
    return [d / "bin.txt", c["b"]], str(d / "bin.txt")


def _bad_keep_mass_unbalanced(d, c):
    return [c["a"], c["b"], "--keep-mass", "--weights-a", c["w3"]], "--keep-mass"


def _bad_log_parent_missing(d, c):
    return [c["a"], c["b"], "--log", d / "nodir" / "log.jsonl"], str(d / "nodir")


def _bad_potentials_parent_missing(d, c):
    return [c["a"], c["b"], "--potentials", d / "nodir" / "pot"], str(d / "nodir")


def _bad_log_is_input(d, c):
    a = shutil.copy(c["a"], d / "a.npy")
    return [a, c["b"], "--log", a], str(a)


def _bad_log_is_input_other_spelling(d, c):
    a = shutil.copy(c["a"], d / "a.npy")
    (d / "sub").mkdir()
    return [a, c["b"], "--log", d / "sub" / ".." / "a.npy"], "refusing to overwrite an input"


def _bad_log_is_weights(d, c):
    w = shutil.copy(c["w3"], d / "w.npy")
    return [c["a"], c["b"], "--weights-a", w, "--log", w], str(w)


def _bad_potentials_is_input(d, c):
    b = shutil.copy(c["b"], d / "pot_b.npy")
    return [c["a"], b, "--potentials", d / "pot"], "pot_b.npy"


def _bad_log_is_directory(d, c):
    (d / "logdir").mkdir()
    return [c["a"], c["b"], "--log", d / "logdir"], str(d / "logdir")


def _bad_weight_property_missing_in_b(d, c):
    return (
        [SAMPLE / "spiral_a.ply", SAMPLE / "spiral_b.ply", "--weight-property", "confidence"],
        str(SAMPLE / "spiral_b.ply"),
    )


def _bad_weight_property_unknown(d, c):
    return (
        [SAMPLE / "spiral_a.ply", SAMPLE / "spiral_a.ply", "--weight-property", "nope"],
        str(SAMPLE / "spiral_a.ply"),
    )


def _bad_weight_property_not_ply(d, c):
    return [c["a"], c["b"], "--weight-property", "confidence"], str(c["a"])


DATA_ERRORS = {name[5:]: fn for name, fn in list(globals().items()) if name.startswith("_bad_")}

# (extra arguments after A B, the option that the error must name)
PARAMETER_ERRORS = {
    "blur_zero": (["--blur", "0"], "--blur"),
    "blur_negative": (["--blur", "-0.1"], "--blur"),
    "blur_nan": (["--blur", "nan"], "--blur"),
    "blur_inf": (["--blur", "inf"], "--blur"),
    "scaling_zero": (["--scaling", "0"], "--scaling"),
    "scaling_one": (["--scaling", "1"], "--scaling"),
    "scaling_above": (["--scaling", "1.5"], "--scaling"),
    "scaling_nan": (["--scaling", "nan"], "--scaling"),
    "loss_unknown": (["--loss", "wasserstein"], "--loss"),
    "p_three": (["--p", "3"], "--p"),
    "p_zero": (["--p", "0"], "--p"),
    "dtype_float16": (["--dtype", "float16"], "--dtype"),
    "dtype_word": (["--dtype", "double"], "--dtype"),
    "device_nonsense": (["--device", "nonsense"], "--device"),
    "device_mps": (["--device", "mps"], "--device"),
    "reach_gaussian": (["--loss", "gaussian", "--reach", "0.5"], "--reach"),
    "reach_energy": (["--loss", "energy", "--reach", "0.5"], "--reach"),
    "reach_laplacian": (["--loss", "laplacian", "--reach", "0.5"], "--reach"),
    "reach_hausdorff": (["--loss", "hausdorff", "--reach", "0.5"], "--reach"),
    "reach_zero": (["--reach", "0"], "--reach"),
    "reach_negative": (["--reach", "-1"], "--reach"),
    "backend_nonsense": (["--backend", "nonsense"], "--backend"),
    "mass_unknown": (["--mass", "grey"], "--mass"),
    "tol_negative": (["--tol", "-1"], "--tol"),
    "tol_nan": (["--tol", "nan"], "--tol"),
    "max_iter_zero": (["--max-iter", "0"], "--max-iter"),
    "max_iter_below_schedule": (["--max-iter", "2"], "--max-iter"),
    "diameter_negative": (["--diameter", "-1"], "--diameter"),
    "diameter_inf": (["--diameter", "inf"], "--diameter"),
}

# Click's own parsing errors (exit 2 through standalone mode under CliRunner)
CLICK_USAGE_ERRORS = {
    "unknown_option": ["--frobnicate"],
    "blur_not_a_number": ["--blur", "abc"],
    "p_not_an_integer": ["--p", "1.5"],
    "max_iter_not_an_integer": ["--max-iter", "many"],
    "option_without_value": ["--loss"],
}


def _with_outputs(args: list, out: Path) -> list:
    """Add --log / --potentials into ``out`` (unless the case sets them) to check cleanup."""
    args = list(args)
    if "--log" not in args:
        args += ["--log", out / "run.jsonl"]
    if "--potentials" not in args:
        args += ["--potentials", out / "pot"]
    return args


def _check_failure(result_code, stdout, stderr, expected_code, needle, out, before, after):
    assert result_code == expected_code, (result_code, stdout, stderr)
    assert stdout == "", stdout
    assert_one_error_line(stderr, needle)
    assert sorted(os.listdir(out)) == [], "output files (or .tmp files) left behind after a failure"
    assert after == before, "an input file was modified"


@pytest.mark.parametrize("case", sorted(DATA_ERRORS))
def test_bad_data_exit_1(case, clouds, tmp_path):
    d, out = tmp_path / "in", tmp_path / "out"
    d.mkdir()
    out.mkdir()
    args, needle = DATA_ERRORS[case](d, clouds)
    args = _with_outputs(args, out)
    watched = [Path(a) for a in args if isinstance(a, Path) and Path(a).is_file()]
    before = {p: p.read_bytes() for p in watched}
    result = invoke("distance", *args)
    after = {p: p.read_bytes() for p in watched}
    _check_failure(result.exit_code, result.stdout, result.stderr, 1, needle, out, before, after)


@pytest.mark.parametrize("case", sorted(PARAMETER_ERRORS))
def test_bad_parameter_exit_2(case, clouds, tmp_path):
    extra, option = PARAMETER_ERRORS[case]
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(clouds["a"].parent)
    result = invoke("distance", *_with_outputs([clouds["a"], clouds["b"], *extra], out))
    after = snapshot(clouds["a"].parent)
    _check_failure(result.exit_code, result.stdout, result.stderr, 2, option, out, before, after)


def test_weights_and_weight_property_together_exit_2(tmp_path):
    result = invoke(
        "distance", SAMPLE / "spiral_a.ply", SAMPLE / "spiral_a.ply", "--weight-property", "confidence",
        "--weights-a", SAMPLE / "spiral_a_weights.npy",
    )  # fmt: skip
    assert result.exit_code == 2
    assert_one_error_line(result.stderr, "--weight")


@pytest.mark.parametrize("case", sorted(CLICK_USAGE_ERRORS))
def test_click_usage_errors_exit_2(case, clouds):
    result = invoke("distance", clouds["a"], clouds["b"], *CLICK_USAGE_ERRORS[case])
    assert result.exit_code == 2
    assert result.stdout == ""


def test_missing_argument_exit_2(clouds):
    assert invoke("distance", clouds["a"]).exit_code == 2
    assert invoke("distance").exit_code == 2


def test_cuda_without_gpu_is_exit_1(clouds):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: --device cuda is valid here")
    result = invoke("distance", clouds["a"], clouds["b"], "--device", "cuda")
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "--device")


def test_error_stays_one_line_for_a_file_name_with_a_newline(clouds, tmp_path):
    odd = tmp_path / "bad\nname.npy"
    result = invoke("distance", odd, clouds["b"])
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "name.npy")


def test_failed_potentials_write_leaves_no_log_behind(clouds, tmp_path):
    unwritable = Path("/proc")  # a folder nobody (not even root) can create files in
    if not unwritable.is_dir():
        pytest.skip("needs Linux /proc as an unwritable folder")
    out = tmp_path / "out"
    out.mkdir()
    result = invoke(
        "distance", clouds["a"], clouds["b"], "--tol", "inf",
        "--log", out / "run.jsonl", "--potentials", unwritable / "geomreg_test_pot",
    )  # fmt: skip
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "geomreg_test_pot")
    assert sorted(os.listdir(out)) == []


# --------------------------------------------------------------------------- valid runs (in-process)


def _json_run(*args):
    result = invoke("distance", *args, "--json")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert len(result.stdout.splitlines()) == 1, result.stdout
    return strict_json(result.stdout)


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_runs(loss, clouds):
    result = invoke("distance", clouds["a"], clouds["b"], "--loss", loss)
    assert result.exit_code == 0, result.stderr
    value = one_float(result.stdout)
    assert value > 0  # the two spirals differ
    assert result.stderr == ""


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_runs_on_the_full_sample_clouds(loss):
    """The 1500 x 1200 sample spirals (--tol inf keeps the Sinkhorn run to its schedule)."""
    args = [SAMPLE / "spiral_a.npy", SAMPLE / "spiral_b.npy", "--loss", loss, "--tol", "inf"]
    data = _json_run(*args, "--weights-a", SAMPLE / "spiral_a_weights.npy")
    assert data["n_points"] == [1500, 1200]
    assert data["value"] > 0 and data["converged"] is True


@pytest.mark.parametrize("loss", LOSSES)
def test_one_point_against_itself_is_zero(loss, clouds):
    result = invoke("distance", clouds["one"], clouds["one"], "--loss", loss)
    assert result.exit_code == 0, result.stderr
    assert abs(one_float(result.stdout)) < 1e-6


@pytest.mark.parametrize("extra", [[], ["--p", "1"], ["--dtype", "float64"]], ids=["p2", "p1", "float64"])
def test_identical_clouds_give_about_zero(extra, clouds):
    result = invoke("distance", clouds["a"], clouds["a"], *extra)
    assert result.exit_code == 0, result.stderr
    assert abs(one_float(result.stdout)) < 1e-5


def test_one_dimensional_clouds(clouds):
    data = _json_run(clouds["line_a"], clouds["line_b"])
    assert data["dim"] == 1
    assert data["n_points"] == [50, 40]
    assert data["value"] > 0
    # an (N,) array and a one-column text file are the same 1-D cloud
    result = invoke("distance", clouds["line_a"], clouds["line_b_txt"])
    assert result.exit_code == 0, result.stderr
    assert one_float(result.stdout) == pytest.approx(data["value"], rel=1e-5)


def test_two_dimensional_text_clouds(clouds):
    data = _json_run(clouds["plane_a"], clouds["plane_b"])
    assert data["dim"] == 2
    assert data["n_points"] == [60, 50]
    assert data["value"] > 0


@pytest.mark.parametrize(("mass", "loss"), [("dark", "sinkhorn"), ("bright", "energy")])
def test_images(mass, loss):
    images = [SAMPLE / "blob_a.png", SAMPLE / "blob_b.png"]
    data = _json_run(*images, "--mass", mass, "--loss", loss, "--tol", "inf")
    assert data["dim"] == 2
    assert data["value"] > 0
    assert data["masses"] == pytest.approx([1.0, 1.0], rel=1e-5)


def test_images_run_on_the_grid_with_pixel_outputs(tmp_path):
    images = [SAMPLE / "blob_a.png", SAMPLE / "blob_b.png"]
    shape = iio.imread(images[0]).shape[:2]
    prefix, field = tmp_path / "pot", tmp_path / "field.npy"
    data = _json_run(*images, "--potentials", prefix, "--field", field)
    assert data["backend"] == "grid" and data["grid"]["levels"][-1] == [list(shape)] * 2
    assert data["n_points"] == [shape[0] * shape[1]] * 2
    for side in "ab":
        pot = np.load(f"{prefix}_{side}.npy")
        assert pot.shape == shape and np.isfinite(pot).all()
        png = iio.imread(f"{prefix}_{side}.png")
        assert png.shape == (*shape, 3) and png.dtype == np.uint8
    disp = np.load(field)
    assert disp.shape == (*shape, 2) and np.isfinite(disp).all() and np.abs(disp).max() > 0
    # a point backend: the same value, potentials only on the pixels with mass (NaN elsewhere)
    points = _json_run(*images, "--backend", "tensorized", "--potentials", tmp_path / "pt")
    assert points["value"] == pytest.approx(data["value"], rel=2e-3)
    pot = np.load(tmp_path / "pt_a.npy")
    assert pot.shape == shape and np.isnan(pot).any() and np.isfinite(pot).any()


def test_npy_density_arrays_and_volumes_on_the_grid(tmp_path):
    g = np.random.default_rng(0)
    for name, shape in (("img", (9, 7)), ("vol", (5, 4, 6))):
        np.save(tmp_path / f"{name}_a.npy", g.random(shape))
        np.save(tmp_path / f"{name}_b.npy", g.random(shape) ** 3)
    as_image = _json_run(tmp_path / "img_a.npy", tmp_path / "img_b.npy", "--as-image")
    assert as_image["backend"] == "grid" and as_image["dim"] == 2
    as_cloud = _json_run(tmp_path / "img_a.npy", tmp_path / "img_b.npy")  # 9 points in 7-D
    assert as_cloud["backend"] != "grid" and as_cloud["dim"] == 7
    volume = _json_run(tmp_path / "vol_a.npy", tmp_path / "vol_b.npy", "--field", tmp_path / "f.npy")
    assert volume["backend"] == "grid" and volume["dim"] == 3
    assert np.load(tmp_path / "f.npy").shape == (5, 4, 6, 3)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "grid", "--p", "1"], "L1 cost"),
        (["--backend", "grid", "--loss", "energy"], "not energy"),
        (["--loss", "energy", "--field", "f.npy"], "--field"),
    ],
)
def test_grid_usage_errors(args, message, tmp_path):
    images = [SAMPLE / "blob_a.png", SAMPLE / "blob_b.png"]
    result = invoke("distance", *images, *[tmp_path / a if a == "f.npy" else a for a in args])
    assert result.exit_code == 2 and message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_grid_backend_refuses_point_clouds(clouds):
    result = invoke("distance", clouds["a"], clouds["b"], "--backend", "grid")
    assert result.exit_code == 2 and "density images" in result.stderr


def test_field_of_point_clouds(clouds, tmp_path):
    data = _json_run(clouds["a"], clouds["b"], "--field", tmp_path / "v.npy")
    v = np.load(tmp_path / "v.npy")
    assert v.shape == (data["n_points"][0], data["dim"]) and np.isfinite(v).all()


def test_weight_property_reads_the_ply_column(tmp_path):
    """--weight-property confidence == the same numbers passed with --weights-a/-b."""
    b_points = np.load(SAMPLE / "spiral_b.npy")[:200]
    b_conf = np.linspace(0.5, 1.5, 200, dtype=np.float32).astype(np.float64)
    b_ply = write_ascii_ply(tmp_path / "b_conf.ply", b_points, b_conf)
    np.save(tmp_path / "wa.npy", sample_confidence())
    np.save(tmp_path / "wb.npy", b_conf)
    a_ply = SAMPLE / "spiral_a.ply"
    common = ["--loss", "energy"]

    by_property = invoke("distance", a_ply, b_ply, *common, "--weight-property", "confidence")
    weights = ["--weights-a", tmp_path / "wa.npy", "--weights-b", tmp_path / "wb.npy"]
    by_files = invoke("distance", a_ply, b_ply, *common, *weights)
    uniform = invoke("distance", a_ply, b_ply, *common)
    for r in (by_property, by_files, uniform):
        assert r.exit_code == 0, r.stderr
    v_prop, v_files, v_unif = (one_float(r.stdout) for r in (by_property, by_files, uniform))
    assert v_prop == pytest.approx(v_files, rel=1e-5)
    assert abs(v_prop - v_unif) > 1e-4 * v_unif  # the weights were really used


def test_weight_property_on_sample_against_itself_is_zero():
    ply = SAMPLE / "spiral_a.ply"
    result = invoke("distance", ply, ply, "--weight-property", "confidence", "--loss", "energy")
    assert result.exit_code == 0, result.stderr
    assert abs(one_float(result.stdout)) < 1e-5


@pytest.mark.parametrize("loss", ["sinkhorn", "hausdorff"])
def test_json_keys(loss, clouds):
    data = _json_run(clouds["a"], clouds["b"], "--loss", loss, "--tol", "inf")
    assert JSON_KEYS <= set(data), JSON_KEYS - set(data)
    assert data["loss"] == loss
    plain = invoke("distance", clouds["a"], clouds["b"], "--loss", loss, "--tol", "inf")
    assert data["value"] == one_float(plain.stdout)
    assert data["n_points"] == [100, 80]
    assert isinstance(data["versions"], dict) and "geomreg" in data["versions"]
    assert isinstance(data["schedule"], list)
    for step in data["schedule"]:
        assert STEP_KEYS <= set(step)


@pytest.mark.parametrize(
    "loss",
    [pytest.param(loss) for loss in ["energy", "gaussian", "laplacian"]],
)
def test_json_keys_kernel_losses(loss, clouds):
    data = _json_run(clouds["a"], clouds["b"], "--loss", loss)
    assert JSON_KEYS <= set(data), JSON_KEYS - set(data)


def test_json_sinkhorn_fields(clouds):
    data = _json_run(clouds["a"], clouds["b"])
    assert data["loss"] == "sinkhorn"
    assert data["p"] == 2 and data["blur"] == 0.05
    assert data["converged"] is True
    assert data["n_iter"] == len(data["schedule"]) > 0
    assert data["marginal_error"] <= data["tol"]
    assert [s["index"] for s in data["schedule"]] == list(range(len(data["schedule"])))
    assert {s["phase"] for s in data["schedule"]} <= {"schedule", "converge", "final"}
    assert data["schedule"][-1]["phase"] == "final"
    assert data["time_s"] >= 0


def test_tol_inf_is_strict_json_with_fewer_iterations(clouds):
    default = _json_run(clouds["a"], clouds["b"])
    result = invoke("distance", clouds["a"], clouds["b"], "--json", "--tol", "inf")
    assert result.exit_code == 0, result.stderr
    assert "Infinity" not in result.stdout and "NaN" not in result.stdout
    data = strict_json(result.stdout)  # no bare Infinity literal anywhere
    assert data["converged"] is True
    assert data["n_iter"] < default["n_iter"]
    assert data["n_iter"] == len(data["schedule"])
    assert data["value"] == pytest.approx(default["value"], rel=0.2)


@pytest.mark.parametrize(
    ("extra", "field", "expected"),
    [
        (["--p", "1"], "p", 1),
        (["--no-debias"], "debias", False),
        (["--dtype", "float64"], "dtype", "float64"),
        (["--device", "cpu"], "device", "cpu"),
        (["--backend", "tensorized"], "backend", "tensorized"),
        (["--blur", "0.1", "--scaling", "0.7"], "blur", 0.1),
        (["--diameter", "3"], "diameter", 3.0),
    ],
    ids=["p1", "no-debias", "float64", "cpu", "tensorized", "blur", "diameter"],
)
def test_options_reach_the_result(extra, field, expected, clouds):
    data = _json_run(clouds["a"], clouds["b"], "--tol", "inf", *extra)
    assert data[field] == expected
    assert data["converged"] is True
    assert math.isfinite(data["value"])


def test_no_debias_differs_from_debiased(clouds):
    debiased = one_float(invoke("distance", clouds["a"], clouds["a"], "--tol", "inf").stdout)
    biased = one_float(invoke("distance", clouds["a"], clouds["a"], "--tol", "inf", "--no-debias").stdout)
    assert abs(debiased) < 1e-5 < biased  # OT_eps(a, a) > 0; S_eps(a, a) = 0


def test_unbalanced_reach_keep_mass(clouds):
    data = _json_run(
        clouds["a"], clouds["b"], "--reach", "0.5", "--keep-mass", "--weights-a", clouds["w3"], "--tol", "inf"
    )
    assert data["reach"] == 0.5
    assert data["masses"] == pytest.approx([3.0, 1.0], rel=1e-5)
    assert data["value"] > 0
    balanced = _json_run(clouds["a"], clouds["b"], "--weights-a", clouds["w3"], "--loss", "energy")
    assert balanced["masses"] == pytest.approx([1.0, 1.0], rel=1e-5)


def test_not_converged_exit_3(clouds):
    result = invoke("distance", clouds["a"], clouds["b"], "--max-iter", "12", "--tol", "1e-12")
    assert result.exit_code == 3
    one_float(result.stdout)  # the value is still printed
    assert "not converged" in result.stderr
    assert "Traceback" not in result.stderr


def test_max_iter_is_respected(clouds):
    result = invoke("distance", clouds["a"], clouds["b"], "--max-iter", "12", "--tol", "1e-12", "--json")
    assert result.exit_code == 3
    data = strict_json(result.stdout)
    assert data["converged"] is False
    assert data["n_iter"] <= 12
    assert len(data["schedule"]) <= 12


def test_log_and_potentials_files(clouds, tmp_path):
    log, prefix = tmp_path / "run.jsonl", tmp_path / "pot"
    data = _json_run(clouds["a"], clouds["b"], "--tol", "inf", "--log", log, "--potentials", prefix)
    lines = log.read_text().splitlines()
    assert len(lines) == len(data["schedule"]) == data["n_iter"]
    steps = [strict_json(line) for line in lines]
    assert steps == data["schedule"]
    f, g = np.load(f"{prefix}_a.npy"), np.load(f"{prefix}_b.npy")
    assert f.shape == (100,) and g.shape == (80,)
    assert np.isfinite(f).all() and np.isfinite(g).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pot_a.npy", "pot_b.npy", "run.jsonl"]


@pytest.mark.parametrize("loss", ["hausdorff", "energy", "gaussian", "laplacian"])
def test_potentials_of_other_losses(loss, clouds, tmp_path):
    result = invoke("distance", clouds["a"], clouds["b"], "--loss", loss, "--potentials", tmp_path / "p")
    assert result.exit_code == 0, result.stderr
    assert np.load(tmp_path / "p_a.npy").shape == (100,)
    assert np.load(tmp_path / "p_b.npy").shape == (80,)


def test_log_is_replaced_atomically(clouds, tmp_path):
    log = tmp_path / "run.jsonl"
    log.write_text("old content\n")
    result = invoke("distance", clouds["a"], clouds["b"], "--tol", "inf", "--log", log)
    assert result.exit_code == 0, result.stderr
    assert "old content" not in log.read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["run.jsonl"]  # no .tmp left


@pytest.mark.parametrize("extra", [[], ["--json"]], ids=["plain", "json"])
def test_verbose_goes_to_stderr_only(extra, clouds):
    quiet = invoke("distance", clouds["a"], clouds["b"], "--tol", "inf", *extra)
    loud = invoke("distance", clouds["a"], clouds["b"], "--tol", "inf", "--verbose", *extra)
    assert quiet.exit_code == loud.exit_code == 0
    assert quiet.stderr == ""
    assert "Sinkhorn loop" in loud.stderr and "marginal err" in loud.stderr
    if extra:
        q, v = strict_json(quiet.stdout), strict_json(loud.stdout)
        assert v["value"] == q["value"] and v["n_iter"] == q["n_iter"]
    else:
        assert loud.stdout == quiet.stdout


def test_multiscale_options_and_verbose_summary(clouds):
    full = invoke("distance", clouds["a"], clouds["b"], "--backend", "multiscale", "--json")
    assert full.exit_code == 0, full.stderr
    assert full.stderr == ""
    record = strict_json(full.stdout)
    assert record["backend"] == "multiscale" and record["multiscale"]["truncate"] == 6.0
    loud = invoke(
        "distance", clouds["a"], clouds["b"], "--backend", "multiscale", "--cluster-scale", "0.2",
        "--truncate", "8", "--verbose",
    )
    assert loud.exit_code == 0, loud.stderr
    assert "multiscale:" in loud.stderr and "clusters of side 0.2" in loud.stderr
    assert "truncation at 8 eps" in loud.stderr
    dense = invoke("distance", clouds["a"], clouds["b"], "--backend", "tensorized")
    assert abs(float(loud.stdout) / float(dense.stdout) - 1) < 1e-3


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--backend", "tensorized", "--truncate", "3"], "--truncate"),
        (["--backend", "multiscale", "--truncate", "-1"], "--truncate"),
        (["--backend", "multiscale", "--cluster-scale", "0"], "--cluster-scale"),
    ],
)
def test_multiscale_option_errors(args, flag, clouds):
    result = invoke("distance", clouds["a"], clouds["b"], *args)
    assert result.exit_code == 2
    assert result.stdout == "" and result.stderr.startswith(f"Error: {flag}")


def test_auto_fallback_is_said_on_stderr(monkeypatch, tmp_path):
    """auto wants online (D = 4, too many pairs for dense) but KeOps cannot run: says so."""
    from geomreg import engine
    from geomreg.engine import online

    monkeypatch.setattr(engine, "_DENSE_MAX_PAIRS", 10)
    monkeypatch.setattr(online, "keops_available", lambda: (False, "no compiler here"))
    rng = np.random.default_rng(1)
    np.save(tmp_path / "a.npy", rng.random((30, 4)))
    np.save(tmp_path / "b.npy", rng.random((20, 4)))
    result = invoke("distance", tmp_path / "a.npy", tmp_path / "b.npy")
    assert result.exit_code == 0, result.stderr
    assert math.isfinite(float(result.stdout))
    assert "no compiler here" in result.stderr and "using tensorized instead" in result.stderr


def test_same_command_twice_same_stdout_in_process(clouds):
    first = invoke("distance", clouds["a"], clouds["b"], "--device", "cpu", "--tol", "inf")
    second = invoke("distance", clouds["a"], clouds["b"], "--device", "cpu", "--tol", "inf")
    assert first.exit_code == second.exit_code == 0
    assert first.stdout == second.stdout


def test_help_and_version_in_process():
    assert invoke("--help").exit_code == 0
    result = invoke("distance", "--help")
    assert result.exit_code == 0
    for option in ("--loss", "--blur", "--reach", "--json", "--log", "--potentials", "--tol"):
        assert option in result.stdout
    version = invoke("--version")
    assert version.exit_code == 0
    assert version.stdout.startswith("geomreg ")


# --------------------------------------------------------------------------- subprocesses


def _imported_modules(importtime_stderr: str) -> set[str]:
    """Top-level package names from ``python -X importtime`` output."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.parametrize("args", [["--help"], ["distance", "--help"], ["--version"]], ids=" ".join)
def test_help_and_version_are_fast_subprocess(args):
    proc = run_cli(*args, python_flags=("-X", "importtime"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
    modules = _imported_modules(proc.stderr)
    assert "typer" in modules  # the import log was read
    assert "torch" not in modules
    assert "open3d" not in modules
    if args == ["--version"]:
        assert re.fullmatch(r"geomreg \S+\n", proc.stdout)


def test_python_dash_m_cli_main_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "--version"], capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("geomreg ")


@pytest.fixture(scope="module")
def plain_run(clouds) -> subprocess.CompletedProcess:
    return run_cli("distance", clouds["a"], clouds["b"], "--device", "cpu")


def test_plain_output_subprocess(plain_run):
    assert plain_run.returncode == 0, plain_run.stderr
    one_float(plain_run.stdout)
    assert plain_run.stderr == ""


def test_shell_command_substitution_and_determinism_subprocess(plain_run, clouds):
    """`v=$(geomreg distance a b)` yields the number; a second run prints the same bytes."""
    if GEOMREG is None or shutil.which("sh") is None:
        pytest.skip("needs sh and the geomreg script")
    script = 'v=$("$0" distance "$1" "$2" --device cpu) || exit 9; printf "%s" "$v"'
    proc = subprocess.run(
        ["sh", "-c", script, str(GEOMREG), str(clouds["a"]), str(clouds["b"])],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) == one_float(plain_run.stdout)
    assert proc.stdout + "\n" == plain_run.stdout  # byte-identical across processes


def test_ply_samples_stdout_is_clean_subprocess():
    """Reading PLY files goes through open3d, whose chatter must stay off stdout."""
    proc = run_cli("distance", SAMPLE / "spiral_a.ply", SAMPLE / "spiral_b.ply", "--loss", "energy")
    assert proc.returncode == 0, proc.stderr
    assert one_float(proc.stdout) > 0
    assert "Traceback" not in proc.stderr


def test_json_log_potentials_verbose_subprocess(plain_run, clouds, tmp_path):
    log, prefix = tmp_path / "steps.jsonl", tmp_path / "pot"
    before = snapshot(clouds["a"].parent)
    proc = run_cli(
        "distance", clouds["a"], clouds["b"], "--device", "cpu", "--json", "--verbose",
        "--log", log, "--potentials", prefix,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1
    data = strict_json(proc.stdout)
    assert JSON_KEYS <= set(data)
    assert data["value"] == one_float(plain_run.stdout)
    assert "Sinkhorn loop" in proc.stderr and "Traceback" not in proc.stderr
    steps = [strict_json(line) for line in log.read_text().splitlines()]
    assert len(steps) == len(data["schedule"]) == data["n_iter"]
    assert all(STEP_KEYS <= set(s) for s in steps)
    assert np.load(f"{prefix}_a.npy").shape == (100,)
    assert np.load(f"{prefix}_b.npy").shape == (80,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pot_a.npy", "pot_b.npy", "steps.jsonl"]
    assert snapshot(clouds["a"].parent) == before


def test_not_converged_exit_3_subprocess(clouds):
    proc = run_cli("distance", clouds["a"], clouds["b"], "--max-iter", "12", "--tol", "1e-12")
    assert proc.returncode == 3, proc.stderr
    one_float(proc.stdout)
    assert "Warning" in proc.stderr and "not converged" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_stalled_float32_run_stops_early_and_says_why(tmp_path):
    """300 points at blur 0.005 in float32: the marginal error stops falling near 1e-2, the
    rounding floor; the loop stops there (about 1500 iterations, not 5000) and says so."""
    g = np.random.default_rng(0)
    np.save(tmp_path / "a.npy", g.random((300, 3), dtype=np.float32))
    np.save(tmp_path / "b.npy", g.random((300, 3), dtype=np.float32) + np.float32(0.2))
    pair = [str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--blur", "0.005"]
    res = runner.invoke(app, ["distance", *pair, "--json"])
    assert res.exit_code == 3, res.output
    record = json.loads(res.stdout)
    assert not record["converged"] and record["n_iter"] < 5000 and record["marginal_error"] > 1e-3
    assert "stopped falling" in res.stderr and "--dtype float64" in res.stderr
    short = runner.invoke(app, ["distance", *pair, "--max-iter", "100"])
    assert short.exit_code == 3 and "raise --max-iter" in short.stderr


SUBPROCESS_FAILURES = [
    ("missing_a", 1),
    ("suffix", 1),
    ("nan", 1),
    ("raw_pickle", 1),
    ("truncated_ply", 1),
    ("image_no_mass", 1),
    ("dims", 1),  # fails after torch is imported, inside the computation
    ("log_is_input", 1),
]


@pytest.mark.parametrize(("case", "code"), SUBPROCESS_FAILURES, ids=[c for c, _ in SUBPROCESS_FAILURES])
def test_bad_data_subprocess(case, code, clouds, tmp_path):
    d, out = tmp_path / "in", tmp_path / "out"
    d.mkdir()
    out.mkdir()
    args, needle = DATA_ERRORS[case](d, clouds)
    args = _with_outputs(args, out)
    before = snapshot(d) | snapshot(clouds["a"].parent)
    proc = run_cli("distance", *args)
    after = snapshot(d) | snapshot(clouds["a"].parent)
    _check_failure(proc.returncode, proc.stdout, proc.stderr, code, needle, out, before, after)


def test_bad_parameter_subprocess(clouds, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_cli("distance", clouds["a"], clouds["b"], "--blur", "0", "--log", out / "x.jsonl")
    _check_failure(proc.returncode, proc.stdout, proc.stderr, 2, "--blur", out, {}, {})


@pytest.mark.parametrize(
    ("extra", "needle"),
    [(["--frobnicate"], "--frobnicate"), (["--blur", "abc"], "--blur"), (["--p", "1.5"], "--p")],
    ids=["unknown-option", "blur-not-a-number", "p-not-an-integer"],
)
def test_click_usage_errors_subprocess(extra, needle, clouds):
    proc = run_cli("distance", clouds["a"], clouds["b"], *extra)
    assert proc.returncode == 2, proc.stderr[-1000:]
    assert proc.stdout == ""
    assert_one_error_line(proc.stderr, needle)


def test_missing_argument_subprocess(clouds):
    proc = run_cli("distance", clouds["a"])
    assert proc.returncode == 2, proc.stderr[-1000:]
    assert_one_error_line(proc.stderr, "b")


@pytest.mark.parametrize(
    ("raised", "code", "words"),
    [(RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                   "you tried to allocate 28331150480 bytes"), 1, "out of memory"),
     (MemoryError(), 1, "out of memory"),
     (RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"), 1, "out of memory"),
     (RuntimeError("shape mismatch"), 70, "internal error: RuntimeError: shape mismatch")],
)
def test_allocation_failures_are_bad_data_not_bugs(tmp_path, monkeypatch, raised, code, words):
    import geomreg.api

    def fails(*args, **kwargs):
        raise raised

    monkeypatch.setattr(geomreg.api, "sinkhorn_loss", fails)
    np.save(tmp_path / "a.npy", np.zeros((3, 2)))
    result = CliRunner().invoke(app, ["distance", str(tmp_path / "a.npy"), str(tmp_path / "a.npy")])
    assert result.exit_code == code
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("Error: ") and words in result.stderr


# --------------------------------------------------------------------------- --seed and what --json records


def test_seed_everything_fixes_python_numpy_and_torch():
    import random

    import torch

    from geomreg.api import seed_everything
    from geomreg.errors import ParameterError

    def draws(seed):
        assert seed_everything(seed) == seed
        return random.random(), float(np.random.random()), float(torch.rand(1))

    assert draws(7) == draws(7)
    assert all(x != y for x, y in zip(draws(7), draws(8), strict=True))
    for bad in (-1, 2**32, True, 1.5, "3"):
        with pytest.raises(ParameterError):
            seed_everything(bad)


@pytest.mark.parametrize("seed", ["-1", "4294967296", "x"])
def test_seed_outside_its_range_is_a_usage_error(seed, clouds):
    assert invoke("distance", clouds["a"], clouds["b"], "--seed", seed).exit_code == 2


def _without_timings(obj):
    """A --json record without what changes from run to run: compute times."""
    if isinstance(obj, dict):
        timings = ("time_s", "elapsed_s", "times", "compute_s")
        return {k: _without_timings(v) for k, v in obj.items() if k not in timings}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _argv_from_options(record) -> list[str]:
    """A command line rebuilt from the recorded ``command`` and ``options`` alone."""
    options = dict(record["options"])
    argv = [record["command"], options.pop("a"), options.pop("b")]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else ([f"--no-{name}"] if name in ("debias", "surface") else [])
        elif value is not None:
            argv += [flag, str(value)]
    return [*argv, "--json"]


REPRODUCE = {  # (inputs, extra arguments): small and quick
    "distance": (("a", "b"), lambda o: ["--blur", "0.1", "--log", o / "log.jsonl"]),
    "match": (("a", "b"), lambda o: ["--blur", "0.2", "--out", o / "reg.npy", "--matches", o / "m.csv",
                                     "--top-k", "2"]),
    "flow": (("a", "b"), lambda o: ["--blur", "0.2", "--out", o / "end.npy", "--steps", "2"]),
    "register": (("plane_a", "plane_b"), lambda o: ["--model", "similarity", "--blur", "0.2",
                                                    "--levels", "1", "--fits", "2"]),
}


@pytest.mark.parametrize("command", sorted(REPRODUCE))
def test_json_records_what_runs_it_again(command, clouds, tmp_path):
    from cli.main import _command
    from geomreg.api import versions

    sides, extra = REPRODUCE[command]
    a, b = (clouds[s] for s in sides)
    args = [command, a, b, *extra(tmp_path), "--seed", "11", "--json"]
    runs = []
    for _ in range(2):
        result = invoke(*args)
        assert result.exit_code == 0, result.stderr
        runs.append(strict_json(result.stdout))
    first = runs[0]
    assert _without_timings(runs[1]) == _without_timings(first)  # same command, same seed

    assert first["command"] == command and first["seed"] == 11 and first["options"]["seed"] == 11
    params = {p.name for p in _command().commands[command].params} - {"json_out", "debug"}
    assert set(first["options"]) == params  # every option, defaults included
    for side, path in (("a", a), ("b", b)):
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        assert first["inputs"][side] == {"path": str(path), "sha256": digest}
    assert first["versions"] == versions() and first["threads"] >= 1
    assert first["device"] == "cpu" and first["dtype"] in ("float32", "float64")
    assert first["backend"] in ("tensorized", "online", "multiscale")

    rebuilt = invoke(*_argv_from_options(first))  # the recorded parameters, fed back as options
    assert rebuilt.exit_code == 0, rebuilt.stderr
    again = strict_json(rebuilt.stdout)
    assert again["value"] == first["value"]
    assert again["options"] == first["options"] and again["argv"] == first["argv"]
    replayed = invoke(*first["argv"])  # the recorded command line itself
    assert replayed.exit_code == 0, replayed.stderr
    assert strict_json(replayed.stdout)["value"] == first["value"]


def test_batch_jobs_take_the_batch_seed_unless_their_row_sets_one(clouds, tmp_path):
    import torch

    from cli.batch import run_job
    from cli.manifest import read_manifest

    manifest = tmp_path / "jobs.csv"
    manifest.write_text(f"id,command,a,b,blur,seed\nx,distance,{clouds['a']},{clouds['b']},0.1,\n"
                        f"y,distance,{clouds['a']},{clouds['b']},0.1,4\n")
    records = [run_job(job, torch.get_num_threads(), 9) for job in read_manifest(manifest)]
    assert [r["status"] for r in records] == ["ok", "ok"]
    assert [(r["seed"], r["result"]["seed"]) for r in records] == [(9, 9), (4, 4)]
    assert records[0]["result"]["value"] == records[1]["result"]["value"]  # nothing random yet


def test_library_parameter_names_become_flags():
    from cli.errors import flag_of

    assert flag_of("max_iter") == "--max-iter"
    assert flag_of("normalize") == "--keep-mass"
    assert flag_of("blur") == "--blur"
    assert flag_of("b.ply") == "b.ply"  # a file name stays as it is
    assert flag_of("x") == "x"

"""LAS/LAZ: xyz relative to the header offset, every other dimension carried to a LAS output.

Tiles are made here with laspy (a few hundred points, UTM-like offsets).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.main import app
from geomreg.errors import InputError, OutputError, ParameterError
from geomreg.io import atomic_write, moved_writer, read_measure

laspy = pytest.importorskip("laspy")

OFFSET = np.array([500000.0, 4000000.0, 100.0])
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def make_las(path: Path, n: int = 300, *, offset=OFFSET, seed: int = 0, point_format: int = 3,
             version: str = "1.2", xyz=None) -> Path:
    """A tile of ``n`` points with intensity, classes 1/2/6, GPS time, RGB (formats 3, 7) and an extra dim."""
    g = np.random.default_rng(seed)
    header = laspy.LasHeader(point_format=point_format, version=version)
    header.add_extra_dim(laspy.ExtraBytesParams(name="height", type=np.float32))
    header.offsets, header.scales = np.asarray(offset, float), np.array([0.001, 0.001, 0.01])
    las = laspy.LasData(header)
    if xyz is None:
        xyz = np.asarray(offset) + g.random((n, 3)) * [40.0, 30.0, 5.0]
    las.x, las.y, las.z = np.asarray(xyz).T
    las.intensity = g.integers(0, 65535, n)
    las.classification = g.choice([1, 2, 6], n)
    las.gps_time = g.random(n) * 1e5
    las.return_number = g.integers(1, 4, n)
    if "red" in header.point_format.dimension_names:
        las.red, las.green, las.blue = (g.integers(0, 65535, n) for _ in range(3))
    las.height = g.random(n).astype(np.float32)
    las.write(path)
    return path


def other_dimensions(las) -> list[str]:
    return [d for d in las.point_format.dimension_names if d not in ("X", "Y", "Z")]


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("suffix", [".las", ".laz"])
def test_points_are_float64_relative_to_the_header_offset(tmp_path, suffix):
    path = make_las(tmp_path / f"t{suffix}")
    m = read_measure(path)
    las = laspy.read(path)
    assert m.points.dtype == np.float64 and m.n == 300
    np.testing.assert_array_equal(m.origin, OFFSET)
    np.testing.assert_array_equal(m.points, np.stack([las.X * 0.001, las.Y * 0.001, las.Z * 0.01], axis=1))
    absolute = np.stack([las.x, las.y, las.z], axis=1)
    np.testing.assert_allclose(m.points + m.origin, absolute, rtol=0, atol=1e-9)
    assert np.abs(m.points).max() < 50  # small numbers, not UTM ones


def test_classes_keep_those_codes_only(tmp_path):
    path = make_las(tmp_path / "t.las")
    las = laspy.read(path)
    m = read_measure(path, classes="2,6")
    keep = np.isin(las.classification, [2, 6])
    assert m.n == keep.sum() < las.header.point_count
    np.testing.assert_array_equal(np.asarray(m.las.record["gps_time"]), las.gps_time[keep])
    assert read_measure(path, classes=[6]).n == (las.classification == 6).sum()


def test_sample_is_a_seeded_subset_with_its_records(tmp_path):
    path = make_las(tmp_path / "t.las", 500)
    las = laspy.read(path)
    m = read_measure(path, sample=100, seed=5)
    assert m.n == 100 == len(m.las)
    rows = np.flatnonzero(np.isin(las.gps_time, np.asarray(m.las.record["gps_time"])))
    np.testing.assert_array_equal(m.points, read_measure(path).points[rows])
    np.testing.assert_array_equal(read_measure(path, sample=100, seed=5).points, m.points)


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize(("point_format", "version", "suffix"), [(3, "1.2", ".las"), (7, "1.4", ".laz")])
def test_round_trip_keeps_every_dimension_but_xyz_and_restores_the_offset(tmp_path, point_format, version,
                                                                            suffix):
    src = make_las(tmp_path / "in.las", point_format=point_format, version=version)
    m = read_measure(src)
    shift = np.array([0.5, -0.25, 1.0])
    out = tmp_path / f"out{suffix}"
    atomic_write(out, moved_writer(out, m, m.points + shift))
    a, b = laspy.read(src), laspy.read(out)
    assert b.header.point_format.id == point_format and str(b.header.version) == version
    np.testing.assert_array_equal(b.header.offsets, a.header.offsets)
    np.testing.assert_array_equal(b.header.scales, a.header.scales)
    assert "height" in b.point_format.dimension_names
    for name in other_dimensions(a):
        np.testing.assert_array_equal(np.asarray(b[name]), np.asarray(a[name]), err_msg=name)
    np.testing.assert_array_equal(b.X, a.X + 500)
    np.testing.assert_array_equal(b.Y, a.Y - 250)
    np.testing.assert_array_equal(b.Z, a.Z + 100)
    np.testing.assert_allclose(b.x, a.x + 0.5, atol=1e-9)  # absolute coordinates: the offset is back


def test_unmoved_points_give_back_the_same_records_bit_for_bit(tmp_path):
    src = make_las(tmp_path / "in.las")
    m = read_measure(src)
    out = tmp_path / "same.las"
    atomic_write(out, moved_writer(out, m, m.points))
    assert laspy.read(out).points.array.tobytes() == laspy.read(src).points.array.tobytes()


def test_a_class_subset_writes_those_records(tmp_path):
    src = make_las(tmp_path / "in.las")
    m = read_measure(src, classes="2")
    out = tmp_path / "ground.las"
    atomic_write(out, moved_writer(out, m, m.points))
    a, b = laspy.read(src), laspy.read(out)
    assert b.points.array.tobytes() == a.points.array[a.classification == 2].tobytes()


def test_las_output_needs_a_las_source_and_points_that_fit(tmp_path):
    cloud = tmp_path / "c.npy"
    np.save(cloud, np.zeros((3, 3)))
    with pytest.raises(OutputError, match="LAS"):
        moved_writer(tmp_path / "x.las", read_measure(cloud), np.zeros((3, 3)))
    m = read_measure(make_las(tmp_path / "in.las", 10))
    with pytest.raises(OutputError, match="32-bit"):
        moved_writer(tmp_path / "far.las", m, m.points + 1e8)
    out = tmp_path / "as.ply"  # any point format: absolute coordinates
    atomic_write(out, moved_writer(out, m, m.points))
    np.testing.assert_allclose(read_measure(out).points, m.points + OFFSET, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- bad files


def test_bad_las_files_raise_input_error_naming_the_file(tmp_path):
    good = make_las(tmp_path / "good.las").read_bytes()
    lying = bytearray(good)
    struct.pack_into("<I", lying, 107, 10**9)  # LAS 1.2: the legacy point count
    laz = make_las(tmp_path / "good.laz").read_bytes()
    cases = {
        "lying.las": (bytes(lying), "declares 1000000000 points"),
        "cut.las": (good[:-500], "declares 300 points"),
        "cut_on_a_record.las": (good[: len(good) - 10 * 38], "declares 300 points"),
        "cut.laz": (laz[:-2000], "LAZ"),
        "header_only.las": (good[:100], "LAS"),
        "garbage.las": (b"not a las file at all" * 20, "LAS"),
        "empty.las": (b"", "empty file"),
    }
    for name, (data, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(InputError) as info:
            read_measure(path)
        assert info.value.where == str(path), name
        assert words in str(info.value), (name, str(info.value))


def test_empty_class_selection_names_the_file_and_the_classes_present(tmp_path):
    path = make_las(tmp_path / "t.las")
    expect = r"no point has classification 9 \(the file's classes: 1, 2, 6\)"
    with pytest.raises(InputError, match=expect) as info:
        read_measure(path, classes="9")
    assert info.value.where == str(path)


@pytest.mark.parametrize("classes", ["", "a,b", "2,300", "-1"])
def test_bad_class_lists_are_parameter_errors(tmp_path, classes):
    with pytest.raises(ParameterError):
        read_measure(make_las(tmp_path / "t.las", 10), classes=classes)


# --------------------------------------------------------------------------- command line


def test_match_a_subsample_and_move_the_full_tile(tmp_path):
    a = make_las(tmp_path / "a.las", 600, seed=1)
    las = laspy.read(a)
    b = make_las(tmp_path / "b.las", 600, seed=1, xyz=np.stack([las.x + 0.3, las.y, las.z], axis=1))
    reg, full = tmp_path / "reg.las", tmp_path / "full.laz"
    r = invoke("match", a, b, "--out", reg, "--sample", "200", "--classes", "1,2,6", "--apply", a,
               "--apply-out", full, "--blur", "0.5")
    assert r.exit_code == 0, r.stderr
    assert laspy.read(reg).header.point_count == 200
    moved = laspy.read(full)
    assert moved.header.point_count == 600
    for name in other_dimensions(las):
        np.testing.assert_array_equal(np.asarray(moved[name]), np.asarray(las[name]), err_msg=name)
    dx = np.asarray(moved.x) - np.asarray(las.x)
    assert 0.1 < np.median(dx) < 0.5  # moved towards B, in absolute coordinates


def test_inputs_with_other_offsets_are_put_in_a_frame(tmp_path):
    a = make_las(tmp_path / "a.las", 200)
    las = laspy.read(a)
    xyz = np.stack([las.x, las.y, las.z], axis=1)
    b = make_las(tmp_path / "b.las", 200, offset=OFFSET + [1234.0, -567.0, 8.0], xyz=xyz)
    ply = tmp_path / "b.npy"
    np.save(ply, xyz)  # the same points in absolute coordinates
    for other in (b, ply):
        r = invoke("distance", a, other, "--loss", "energy", "--dtype", "float64")
        assert r.exit_code == 0, r.stderr
        assert abs(float(r.stdout)) < 1e-9, (other, r.stdout)


@pytest.mark.parametrize(("args", "code", "needle"), [
    (["--classes", "9"], 1, "a.las"),
    (["--classes", "x"], 2, "--classes"),
    (["--classes", "256"], 2, "--classes"),
    (["--sample", "0"], 2, "--sample"),
])
def test_cli_class_and_sample_errors(tmp_path, args, code, needle):
    a = make_las(tmp_path / "a.las", 50)
    out = tmp_path / "out"
    out.mkdir()
    r = invoke("match", a, a, "--out", out / "reg.las", *args)
    assert r.exit_code == code, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert lines[-1].startswith("Error: ") and needle in lines[-1]
    assert list(out.iterdir()) == []


def test_cli_classes_on_files_that_are_not_las_is_exit_2(tmp_path):
    cloud = tmp_path / "c.npy"
    np.save(cloud, np.random.default_rng(0).random((20, 3)))
    r = invoke("distance", cloud, cloud, "--classes", "2")
    assert r.exit_code == 2 and "--classes" in r.stderr and r.stdout == ""


def test_cli_las_output_for_a_cloud_is_exit_1_before_computing(tmp_path):
    cloud = tmp_path / "c.npy"
    np.save(cloud, np.random.default_rng(0).random((20, 3)))
    out = tmp_path / "out"
    out.mkdir()
    r = invoke("flow", cloud, cloud, "--out", out / "end.las")
    assert r.exit_code == 1 and "end.las" in r.stderr and list(out.iterdir()) == []


def test_cli_bad_las_is_one_error_line_exit_1(tmp_path):
    good = make_las(tmp_path / "a.las", 50)
    bad = tmp_path / "cut.las"
    bad.write_bytes(good.read_bytes()[:-100])
    out = tmp_path / "out"
    out.mkdir()
    for command in ("distance", "match", "flow"):
        extra = [] if command == "distance" else ["--out", out / "reg.las"]
        r = invoke(command, good, bad, *extra)
        assert r.exit_code == 1, (command, r.stderr)
        lines = r.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "cut.las" in lines[0]
        assert list(out.iterdir()) == []

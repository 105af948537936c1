"""Meshes: OBJ, OFF, STL and PLY faces read, weighted by area, sampled, written back with their faces.

Every mesh is made here (by hand, or by open3d as an independent writer); the real meshes of
../shared/data are read only when present.
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
from geomreg.measure import Measure

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "clouds"

#: a unit cube: 8 corners, 12 outward triangles, and one vertex on no face
CUBE_V = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1],
                   [5, 5, 5]], dtype=np.float64)
CUBE_F = np.array([[0, 2, 1], [0, 3, 2], [4, 5, 6], [4, 6, 7], [0, 1, 5], [0, 5, 4], [1, 2, 6], [1, 6, 5],
                   [2, 3, 7], [2, 7, 6], [3, 0, 4], [3, 4, 7]])
CUBE_Q = np.array([[0, 3, 2, 1], [4, 5, 6, 7], [0, 1, 5, 4], [1, 2, 6, 5], [2, 3, 7, 6], [3, 0, 4, 7]])

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# --------------------------------------------------------------------------- file makers


def obj_text(v, faces, extra="") -> str:
    return ("".join(f"v {x!r} {y!r} {z!r}\n" for x, y, z in np.asarray(v, float).tolist()) + extra
            + "".join("f " + " ".join(str(i + 1) for i in f) + "\n" for f in faces))


def off_text(v, faces) -> str:
    return (f"OFF\n{len(v)} {len(faces)} 0\n" + "".join(f"{x!r} {y!r} {z!r}\n" for x, y, z in
                                                        np.asarray(v, float).tolist())
            + "".join(f"{len(f)} " + " ".join(map(str, f)) + "\n" for f in faces))


def stl_binary(v, faces) -> bytes:
    rows = np.zeros(len(faces), dtype=[("n", "<f4", 3), ("v", "<f4", (3, 3)), ("a", "<u2")])
    rows["v"] = np.asarray(v)[np.asarray(faces)]
    return b"solid but binary".ljust(80) + struct.pack("<I", len(faces)) + rows.tobytes()


def stl_ascii(v, faces) -> str:
    facets = "".join("facet normal 0 0 0\n outer loop\n" + "".join(f"  vertex {x} {y} {z}\n" for x, y, z in
                                                                     np.asarray(v)[f].tolist())
                     + " endloop\nendfacet\n" for f in faces)
    return "solid cube\n" + facets + "endsolid cube\n"


def ply_mesh(v, faces, fmt="binary_little_endian") -> bytes:
    head = (f"ply\nformat {fmt} 1.0\nelement vertex {len(v)}\nproperty float x\nproperty float y\n"
            f"property float z\nelement face {len(faces)}\nproperty list uchar int vertex_indices\n"
            "end_header\n").encode()
    if fmt == "ascii":
        body = "".join(f"{x} {y} {z}\n" for x, y, z in np.asarray(v).tolist())
        body += "".join(f"{len(f)} " + " ".join(map(str, f)) + "\n" for f in faces)
        return head + body.encode()
    order = "<" if fmt == "binary_little_endian" else ">"
    body = np.asarray(v, dtype=order + "f4").tobytes()
    body += b"".join(struct.pack(order + "B" + "i" * len(f), len(f), *map(int, f)) for f in faces)
    return head + body


def write(path: Path, content) -> Path:
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


@pytest.fixture
def cube_files(tmp_path) -> dict[str, Path]:
    return {
        "obj": write(tmp_path / "cube.obj", obj_text(CUBE_V, CUBE_F)),
        "off": write(tmp_path / "cube.off", off_text(CUBE_V, CUBE_F)),
        "ply_bin": write(tmp_path / "cube_bin.ply", ply_mesh(CUBE_V, CUBE_F)),
        "ply_be": write(tmp_path / "cube_be.ply", ply_mesh(CUBE_V, CUBE_F, "binary_big_endian")),
        "ply_ascii": write(tmp_path / "cube_ascii.ply", ply_mesh(CUBE_V, CUBE_F, "ascii")),
        "stl_bin": write(tmp_path / "cube_bin.stl", stl_binary(CUBE_V, CUBE_F)),
        "stl_ascii": write(tmp_path / "cube_ascii.stl", stl_ascii(CUBE_V, CUBE_F)),
    }


def same_triangles(v1, f1, v2, f2) -> bool:
    """The same triangles (corner positions, in order), whatever the vertex numbering."""
    return np.allclose(np.asarray(v1)[f1], np.asarray(v2)[f2])


# --------------------------------------------------------------------------- reading


@pytest.mark.parametrize("kind", ["obj", "off", "ply_bin", "ply_be", "ply_ascii"])
def test_mesh_formats_keep_vertices_in_file_order_and_faces(cube_files, kind):
    m = read_measure(cube_files[kind])
    np.testing.assert_array_equal(m.points, CUBE_V)  # the unreferenced vertex too
    np.testing.assert_array_equal(m.faces, CUBE_F)
    assert m.faces.dtype == np.int64
    np.testing.assert_allclose(m.weights, 1 / 9)


@pytest.mark.parametrize("kind", ["stl_bin", "stl_ascii"])
def test_stl_merges_identical_corners_in_order_of_appearance(cube_files, kind):
    m = read_measure(cube_files[kind])
    assert m.n == 8 and m.faces.shape == (12, 3)  # 36 corners, 8 positions; no unreferenced vertex
    assert same_triangles(m.points, m.faces, CUBE_V, CUBE_F)
    first = list(dict.fromkeys(map(tuple, CUBE_V[CUBE_F].reshape(-1, 3).tolist())))
    np.testing.assert_array_equal(m.points, first)


def test_obj_corner_syntaxes_negative_indices_and_other_statements(tmp_path):
    text = ("# comment\nmtllib x.mtl\no cube\n"
            + "".join(f"v {x} {y} {z} 0.5 0.5 0.5\n" for x, y, z in CUBE_V[:4])
            + "vt 0 0\nvt 1 0\nvt 1 1\nvn 0 0 1\ng side\nusemtl m\ns off\n"
            "f 1/1 3/3 2/2\nf 1//1 4//1 3//1\nf -4/1/1 -1/2/1 -2/3/1\nl 1 2\n")
    m = read_measure(write(tmp_path / "a.obj", text))
    np.testing.assert_array_equal(m.points, CUBE_V[:4])
    np.testing.assert_array_equal(m.faces, [[0, 2, 1], [0, 3, 2], [0, 3, 2]])


@pytest.mark.parametrize("kind", ["obj", "off", "ply_bin", "ply_ascii"])
def test_polygons_are_split_into_fans(tmp_path, kind):
    maker = {"obj": lambda: obj_text(CUBE_V, CUBE_Q), "off": lambda: off_text(CUBE_V, CUBE_Q),
             "ply_bin": lambda: ply_mesh(CUBE_V, CUBE_Q),
             "ply_ascii": lambda: ply_mesh(CUBE_V, CUBE_Q, "ascii")}
    suffix = ".ply" if kind.startswith("ply") else f".{kind}"
    m = read_measure(write(tmp_path / f"quads{suffix}", maker[kind]()))
    expect = [[q[0], q[k], q[k + 1]] for q in CUBE_Q for k in (1, 2)]
    np.testing.assert_array_equal(m.faces, expect)


def test_ply_without_faces_is_the_point_cloud_it_was(tmp_path):
    head = "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\nproperty float z\n"
    cloud = read_measure(write(tmp_path / "c.ply", head + "end_header\n0 0 0\n1 0 0\n0 1 0\n"))
    assert cloud.faces is None
    empty_faces = (head + "element face 0\nproperty list uchar int vertex_indices\nend_header\n"
                   "0 0 0\n1 0 0\n0 1 0\n")
    assert read_measure(write(tmp_path / "e.ply", empty_faces)).faces is None


def test_files_written_by_open3d_read_with_the_same_triangles(tmp_path):
    o3d = pytest.importorskip("open3d")
    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(CUBE_V[:8]),
                                     o3d.utility.Vector3iVector(CUBE_F))
    for suffix in (".obj", ".off", ".ply", ".stl"):
        path = tmp_path / f"o3d{suffix}"
        if suffix == ".stl":
            mesh.compute_triangle_normals()
        assert o3d.io.write_triangle_mesh(str(path), mesh, write_ascii=suffix == ".ply")
        m = read_measure(path)
        assert same_triangles(m.points, m.faces, CUBE_V, CUBE_F), suffix


def test_real_meshes_when_present():
    paths = [SHARED / "trimesh" / "bunny.ply", *sorted((SHARED / "pyvista").glob("*.ply"))]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        pytest.skip(f"no real meshes under {SHARED}")
    for path in paths:
        m = read_measure(path)
        assert m.faces is not None and m.faces.shape[1] == 3 and m.faces.max() < m.n, path
        w = read_measure(path, weights="area")
        assert abs(w.weights.sum() - 1) < 1e-12


# --------------------------------------------------------------------------- area weights, sampling


#: two triangles of areas 1 and 1.5 sharing the edge 0-2, and a vertex on neither
TWO_V = np.array([[0, 0, 0], [2, 0, 0], [0, 1, 0], [0, 0, 3], [9, 9, 9]], dtype=np.float64)
TWO_F = np.array([[0, 1, 2], [0, 2, 3]])


def test_area_weights_are_a_third_of_the_incident_areas(tmp_path):
    m = read_measure(write(tmp_path / "two.obj", obj_text(TWO_V, TWO_F)), weights="area")
    # by hand: areas 1 and 1.5 (total 2.5); v0 and v2 touch both, v1 the first, v3 the second
    expect = np.array([2.5 / 3, 1 / 3, 2.5 / 3, 1.5 / 3, 0]) / 2.5
    np.testing.assert_allclose(m.weights, expect, rtol=1e-15)
    np.testing.assert_allclose(expect, [1 / 3, 2 / 15, 1 / 3, 1 / 5, 0])


def test_sample_draws_points_on_the_surface_by_area_deterministically(tmp_path):
    path = write(tmp_path / "two.off", off_text(TWO_V, TWO_F))
    m = read_measure(path, sample=20000, seed=3)
    assert m.n == 20000 and m.faces is None
    np.testing.assert_allclose(m.weights, 1 / 20000)
    x, y, z = m.points.T
    on_first = (np.abs(z) < 1e-12) & (x >= 0) & (y >= 0) & (x / 2 + y <= 1 + 1e-12)
    on_second = (np.abs(x) < 1e-12) & (y >= 0) & (z >= 0) & (y + z / 3 <= 1 + 1e-12)
    assert (on_first | on_second).all()
    assert abs(on_second.mean() - 0.6) < 0.015  # area 1.5 of 2.5
    np.testing.assert_array_equal(read_measure(path, sample=20000, seed=3).points, m.points)
    assert not np.array_equal(read_measure(path, sample=20000, seed=4).points, m.points)


def test_sample_of_a_cloud_is_a_seeded_subset_in_file_order(tmp_path):
    pts = np.random.default_rng(0).random((50, 3))
    path = tmp_path / "c.npy"
    np.save(path, pts)
    m = read_measure(path, sample=10, seed=1)
    rows = [int(np.flatnonzero((pts == p).all(axis=1))[0]) for p in m.points]
    assert rows == sorted(rows) and len(set(rows)) == 10
    assert read_measure(path, sample=80).n == 50  # fewer points than asked: all of them


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "5"])
def test_sample_must_be_a_positive_integer(cube_files, bad):
    with pytest.raises(ParameterError):
        read_measure(cube_files["obj"], sample=bad)


def test_reading_option_misuse_is_a_parameter_error(cube_files, tmp_path):
    cloud = tmp_path / "c.npy"
    np.save(cloud, CUBE_V)
    with pytest.raises(ParameterError, match="no faces"):
        read_measure(cloud, weights="area")
    with pytest.raises(ParameterError, match="classes"):
        read_measure(cube_files["obj"], classes="2")
    with pytest.raises(ParameterError, match="--sample"):
        read_measure(cube_files["ply_bin"], sample=5, weight_property="x")


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize("suffix", [".obj", ".off", ".ply", ".stl"])
def test_moved_writer_writes_the_same_faces_on_moved_vertices(cube_files, tmp_path, suffix):
    source = read_measure(cube_files["obj"])
    moved = source.points * 1.5 + [0.25, -0.5, 2.0]
    out = tmp_path / f"moved{suffix}"
    atomic_write(out, moved_writer(out, source, moved, source.weights))
    back = read_measure(out)
    if suffix == ".stl":  # triangles only: the unreferenced vertex is not stored, float32 corners
        assert same_triangles(back.points, back.faces, moved.astype(np.float32), CUBE_F)
        return
    np.testing.assert_array_equal(back.faces, CUBE_F)
    np.testing.assert_array_equal(back.points, moved)  # full precision
    if suffix == ".ply":
        np.testing.assert_array_equal(read_measure(out, weight_property="weight").weights, source.weights)


def test_moved_writer_is_points_writer_for_clouds_and_point_formats(cube_files, tmp_path):
    source = read_measure(cube_files["obj"])
    out = tmp_path / "moved.npy"
    atomic_write(out, moved_writer(out, source, source.points + 1))
    np.testing.assert_array_equal(np.load(out), source.points + 1)
    cloud = Measure(CUBE_V, None, "cloud")
    ply = tmp_path / "cloud.ply"
    atomic_write(ply, moved_writer(ply, cloud, CUBE_V))
    assert read_measure(ply).faces is None
    for suffix in (".obj", ".off", ".stl", ".las", ".vtk"):
        with pytest.raises(OutputError):
            moved_writer(tmp_path / f"x{suffix}", cloud, CUBE_V)


def test_moved_writer_adds_the_origin_back(tmp_path):
    m = Measure(CUBE_V, None, "m", faces=CUBE_F, origin=[1000.0, 2000.0, 3000.0])
    out = tmp_path / "o.obj"
    atomic_write(out, moved_writer(out, m, m.points))
    np.testing.assert_array_equal(read_measure(out).points, CUBE_V + [1000, 2000, 3000])


def test_measure_checks_faces():
    Measure(CUBE_V, None, "ok", faces=CUBE_F)  # positional calls of before still work:
    Measure(CUBE_V, np.ones(9), "ok", None)
    for faces in ([[0, 1, 9]], [[0, 1, -1]], [[0, 1]], np.zeros((0, 3), int), [[0.0, 1.0, 2.0]]):
        with pytest.raises(InputError):
            Measure(CUBE_V, None, "bad", faces=faces)


# --------------------------------------------------------------------------- bad files


def _bad_specs() -> dict[str, tuple[str, object, str]]:
    """name: (file name, content, words the error must contain)."""
    stl = stl_binary(CUBE_V, CUBE_F)
    ply = ply_mesh(CUBE_V, CUBE_F)
    ply_ascii = ply_mesh(CUBE_V, CUBE_F, "ascii").decode()
    ascii_stl = stl_ascii(CUBE_V, CUBE_F)
    return {
        "stl_cut_short": ("cut.stl", stl[:-30], "declares 12 triangles"),
        "stl_lying_count": ("lie.stl", stl[:80] + struct.pack("<I", 10**9) + stl[84:], "declares"),
        "stl_zero_triangles": ("zero.stl", stl[:80] + struct.pack("<I", 0), "0 triangles"),
        "stl_ascii_no_end": ("noend.stl", ascii_stl[: ascii_stl.rindex("facet normal")], "endsolid"),
        "stl_ascii_cut_in_a_line": ("cutline.stl", ascii_stl[:-40], "line 83"),
        "stl_ascii_quad": ("quad.stl", "solid q\nfacet normal 0 0 1\nouter loop\n" + "vertex 0 0 0\n" * 4
                                 + "endloop\nendfacet\nendsolid q\n", "more than 3"),
        "stl_too_short": ("short.stl", b"\x00" * 40, "shorter than"),
        "ply_faces_cut_short": ("cut.ply", ply[:-7], "12 'face' items"),
        "ply_ascii_faces_cut_short": ("cuta.ply", ply_ascii[: ply_ascii.rindex("3 3")], "11 of 12"),
        "ply_face_out_of_range": ("oor.ply", ply_mesh(CUBE_V, [[0, 1, 9]]), "vertex 9"),
        "ply_face_negative": ("neg.ply", ply_mesh(CUBE_V, [[0, -1, 2]]), "vertex -1"),
        "ply_two_corner_face": ("two.ply", ply_mesh(CUBE_V, [[0, 1]]), "2 corners"),
        "obj_missing_vertex": ("miss.obj", obj_text(CUBE_V, [*CUBE_F, [0, 1, 20]]), "vertex 21"),
        "obj_vertex_zero": ("zero.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\nf 0 1 2\n", "vertex 0"),
        "obj_negative_past_start": ("negs.obj", "v 0 0 0\nv 1 0 0\nv 0 1 0\nf -1 -2 -4\n", "-4"),
        "obj_bad_number": ("num.obj", "v 0 zero 0\n", "'zero'"),
        "obj_short_vertex": ("sv.obj", "v 0 0\n", "x y z"),
        "obj_two_corner_face": ("tc.obj", "v 0 0 0\nv 1 0 0\nf 1 2\n", "3 corners"),
        "obj_no_faces": ("nof.obj", "v 0 0 0\nv 1 0 0\n", "no faces"),
        "obj_empty_mesh": ("nov.obj", "# nothing here\ng group\n", "no vertices"),
        "obj_not_utf8": ("bin.obj", b"v 0 0 0\n\xff\xfe\n", "UTF-8"),
        "off_cut_short": ("cut.off", off_text(CUBE_V, CUBE_F)[:-30], "of 12 faces"),
        "off_face_out_of_range": ("oor.off", off_text(CUBE_V, [[0, 1, 9]]), "vertex 9"),
        "off_empty_mesh": ("empty.off", "OFF\n0 0 0\n", "0 vertices"),
        "off_no_faces": ("nof.off", "OFF\n3 0 0\n0 0 0\n1 0 0\n0 1 0\n", "0 faces"),
        "off_no_keyword": ("kw.off", "3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2\n", "'OFF'"),
        "off_bad_counts": ("counts.off", "OFF\nthree 1 0\n", "counts"),
        "off_binary": ("bin.off", "OFF BINARY\n", "binary OFF"),
        "off_short_face": ("sf.off", "OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1\n", "lists 2"),
        "zero_area_for_weights": ("flat.obj", "v 0 0 0\nv 1 0 0\nv 2 0 0\nf 1 2 3\n", "zero area"),
    }


BAD_SPECS = _bad_specs()
BAD = sorted(BAD_SPECS)


def bad_mesh(d: Path, name: str) -> tuple[Path, str]:
    """The bad file ``name`` written in ``d``, and the words its error must contain."""
    filename, content, words = BAD_SPECS[name]
    return write(d / filename, content), words


@pytest.mark.parametrize("name", BAD)
def test_bad_mesh_files_raise_input_error_naming_the_file(tmp_path, name):
    path, words = bad_mesh(tmp_path, name)
    with pytest.raises(InputError) as info:
        read_measure(path, weights="area" if name == "zero_area_for_weights" else None)
    assert info.value.where == str(path)
    assert words.lower() in str(info.value).lower(), str(info.value)


def test_every_truncation_of_a_mesh_file_reads_or_refuses_cleanly(tmp_path):
    small_v, small_f = CUBE_V[:4], CUBE_F[:2]
    files = {".stl": stl_binary(small_v, small_f), ".ply": ply_mesh(small_v, CUBE_Q[:1]),
             ".obj": obj_text(small_v, small_f).encode(), ".off": off_text(small_v, CUBE_Q[:1]).encode()}
    for suffix, data in files.items():
        path = tmp_path / f"t{suffix}"
        for k in range(1, len(data)):
            path.write_bytes(data[:k])
            try:
                m = read_measure(path)
            except InputError as err:
                assert err.where == str(path)
                continue
            if m.faces is not None:  # a prefix that is still a whole mesh (text cut within a number)
                assert m.faces.max() < m.n


# --------------------------------------------------------------------------- command line


def _pair(tmp_path, suffix=".obj"):
    """A mesh and a target mesh moved a little (same faces)."""
    text = obj_text if suffix == ".obj" else off_text
    a = write(tmp_path / f"a{suffix}", text(CUBE_V[:8], CUBE_F))
    b = write(tmp_path / f"b{suffix}", text(CUBE_V[:8] * 1.1 + 0.05, CUBE_F))
    return a, b


def test_match_writes_a_mesh_with_the_same_faces(tmp_path):
    a, b = _pair(tmp_path)
    out = tmp_path / "reg.obj"
    r = invoke("match", a, b, "--out", out, "--blur", "0.1", "--dtype", "float64")
    assert r.exit_code == 0, r.stderr
    reg, src = read_measure(out), read_measure(a)
    np.testing.assert_array_equal(reg.faces, src.faces)
    assert np.abs(reg.points - src.points).max() > 0.01  # moved


def test_flow_writes_meshes_for_out_and_apply(tmp_path):
    a, b = _pair(tmp_path, ".off")
    full = write(tmp_path / "full.stl", stl_binary(CUBE_V[:8], CUBE_F))
    out, moved_full = tmp_path / "end.ply", tmp_path / "full_end.stl"
    r = invoke("flow", a, b, "--out", out, "--steps", "2", "--tol", "0", "--apply", full,
               "--apply-out", moved_full, "--blur", "0.1")
    assert r.exit_code == 0, r.stderr
    end = read_measure(out)
    np.testing.assert_array_equal(end.faces, CUBE_F)
    carried = read_measure(moved_full)
    # A's own points, carried, end where the flow puts them; the STL holds float32 corners
    assert np.abs(carried.points[carried.faces] - end.points[CUBE_F]).max() < 1e-5


def test_cli_weights_area_and_sample(tmp_path):
    a, b = _pair(tmp_path)
    r = invoke("distance", a, b, "--weights", "area", "--loss", "energy", "--json")
    assert r.exit_code == 0, r.stderr
    assert '"n_points": [8, 8]' in r.stdout
    r = invoke("distance", a, b, "--sample", "50", "--loss", "energy", "--json")
    assert r.exit_code == 0, r.stderr
    assert '"n_points": [50, 50]' in r.stdout


def _assert_fails(result, code, needle, out_dir):
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and needle in lines[0], result.stderr
    assert result.stdout == ""
    assert list(out_dir.iterdir()) == [], "something was written"


@pytest.mark.parametrize("command", ["distance", "match", "flow"])
@pytest.mark.parametrize("name", ["stl_cut_short", "ply_faces_cut_short", "obj_missing_vertex",
                                  "off_empty_mesh", "ply_face_out_of_range"])
def test_cli_bad_mesh_is_one_error_line_exit_1(tmp_path, command, name):
    d, out = tmp_path / "in", tmp_path / "out"
    d.mkdir()
    out.mkdir()
    bad, _ = bad_mesh(d, name)
    good, _ = _pair(d)
    extra = [] if command == "distance" else ["--out", out / "reg.ply"]
    _assert_fails(invoke(command, good, bad, *extra), 1, bad.name, out)


@pytest.mark.parametrize(("args", "needle"), [
    (["--sample", "0"], "--sample"), (["--sample", "-2"], "--sample"), (["--sample", "many"], "--sample"),
    (["--weights", "volume"], "--weights"), (["--weights", "area", "--sample", "5"], "--weights"),
    (["--classes", "2"], "--classes"),
])
def test_cli_reading_option_misuse_is_exit_2(tmp_path, args, needle):
    a, b = _pair(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    r = invoke("match", a, b, "--out", out / "reg.obj", *args)
    assert r.exit_code == 2, (r.stdout, r.stderr)
    assert needle in r.stderr
    assert list(out.iterdir()) == []


def test_cli_weights_area_without_a_mesh_and_mesh_output_for_a_cloud(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    cloud = tmp_path / "c.npy"
    np.save(cloud, CUBE_V)
    r = invoke("match", cloud, cloud, "--out", out / "reg.npy", "--weights", "area")
    assert r.exit_code == 2 and "--weights" in r.stderr
    _assert_fails(invoke("match", cloud, cloud, "--out", out / "reg.obj"), 1, "reg.obj", out)

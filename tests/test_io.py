"""Tests of geomreg.io: readers (every format, every bad input) and atomic writers."""

from __future__ import annotations

import importlib.util
import os
import pickle
import struct
import zlib
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest

from geomreg.errors import InputError, OutputError, ParameterError
from geomreg.io import SUFFIXES, atomic_write, read_measure, read_weights, write_npy, write_text

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"shared test data not available: {path}")
    return path


# --------------------------------------------------------------------------- file makers


def write_png(path: Path, arr: np.ndarray, bitdepth: int, color_type: int) -> Path:
    """Encode a PNG by hand (lets us make 16-bit colour images pillow cannot write)."""
    arr = np.asarray(arr)
    h, w = arr.shape[:2]
    dtype = ">u2" if bitdepth == 16 else "u1"
    raw = b"".join(b"\x00" + arr[i].astype(dtype).tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, bitdepth, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
    return path


def write_ply(path: Path, points, *, fmt="binary_little_endian", extra=None, faces=0) -> Path:
    """A PLY cloud with float x y z (+ extra float properties) and optional empty faces."""
    points = np.asarray(points, dtype=np.float32)
    extra = extra or {}
    names = ["x", "y", "z", *extra]
    cols = [points[:, 0], points[:, 1], points[:, 2], *[np.asarray(v) for v in extra.values()]]
    head = ["ply", f"format {fmt} 1.0", f"element vertex {len(points)}"]
    head += [f"property float {n}" for n in names]
    if faces:
        head += [f"element face {faces}", "property list uchar int vertex_indices"]
    head += ["end_header"]
    header = ("\n".join(head) + "\n").encode()
    if fmt == "ascii":
        body = "".join(" ".join(f"{c[i]:.7g}" for c in cols) + "\n" for i in range(len(points)))
        body += "3 0 1 2\n" * faces
        path.write_bytes(header + body.encode())
    else:
        order = "<" if fmt == "binary_little_endian" else ">"
        table = np.empty(len(points), dtype=[(n, order + "f4") for n in names])
        for n, c in zip(names, cols, strict=True):
            table[n] = c
        face = struct.pack(order + "Biii", 3, 0, 1, 2) * faces
        path.write_bytes(header + table.tobytes() + face)
    return path


PTS = np.array([[0.0, 1.0, 2.0], [3.5, -4.0, 5.25], [1e-3, 2e3, -7.0], [0.5, 0.5, 0.5]])


# --------------------------------------------------------------------------- .npy


def test_npy_2d(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, PTS)
    m = read_measure(path)
    np.testing.assert_array_equal(m.points, PTS)
    np.testing.assert_allclose(m.weights, 0.25)
    assert m.source == str(path) and m.grid is None


def test_npy_1d_is_points_on_a_line(tmp_path):
    path = tmp_path / "line.NPY"  # suffix is matched case-insensitively
    with open(path, "wb") as fh:  # np.save would append ".npy" to the name
        np.save(fh, np.array([3, 1, 2], dtype=np.int32))
    m = read_measure(path)
    assert m.points.shape == (3, 1) and m.points.dtype == np.float64
    np.testing.assert_array_equal(m.points[:, 0], [3, 1, 2])


def test_npy_float32(tmp_path):
    path = tmp_path / "f.npy"
    np.save(path, PTS[:, :2].astype(np.float32))
    assert read_measure(path).points.shape == (4, 2)


# --------------------------------------------------------------------------- text


def test_txt_whitespace_comments_blank_lines(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("# a comment\n\n0 1 2\n3.5\t-4 5.25\n  \n# another\n1e-3 2e3 -7\n0.5 0.5 0.5\n")
    np.testing.assert_array_equal(read_measure(path).points, PTS)


def test_csv_with_header_and_crlf(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"x,y,z\r\n0,1,2\r\n3.5, -4, 5.25\r\n1e-3,2e3,-7\r\n0.5,0.5,0.5\r\n")
    np.testing.assert_array_equal(read_measure(path).points, PTS)


def test_txt_utf8_bom_and_one_column(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeff1\n2\n4\n".encode())
    m = read_measure(path)
    assert m.points.shape == (3, 1)


def test_xyz_ignores_extra_columns(tmp_path):
    path = tmp_path / "a.xyz"
    path.write_text("0 1 2 255 0 0\n3.5 -4 5.25 0 255 0\n1e-3 2e3 -7 1 2 3\n0.5 0.5 0.5 9 9 9\n")
    np.testing.assert_array_equal(read_measure(path).points, PTS)


def test_pts_with_count_line(tmp_path):
    path = tmp_path / "a.pts"
    rows = ["0 1 2", "3.5 -4 5.25", "1e-3 2e3 -7", ".5 .5 .5"]
    path.write_text("4\n" + "".join(f"{r} 7 1 2 3\n" for r in rows))
    np.testing.assert_array_equal(read_measure(path).points, PTS)


# --------------------------------------------------------------------------- PLY / PCD


@pytest.mark.parametrize("fmt", ["ascii", "binary_little_endian", "binary_big_endian"])
def test_ply_formats_and_weight_property(tmp_path, fmt):
    conf = np.array([0.5, 1.0, 0.25, 2.0], dtype=np.float32)
    path = write_ply(tmp_path / "a.ply", PTS, fmt=fmt, extra={"confidence": conf}, faces=2)
    m = read_measure(path)
    np.testing.assert_allclose(m.points, PTS.astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(m.weights, 0.25)
    w = read_measure(path, weight_property="confidence")
    np.testing.assert_allclose(w.weights, conf)
    np.testing.assert_array_equal(w.points, m.points)


def test_ply_weight_property_open3d_does_not_expose(tmp_path):
    # open3d's tensor API turns red/green/blue into "colors": the header parser reads it
    head = (
        b"ply\nformat binary_little_endian 1.0\nelement vertex 3\nproperty float x\n"
        b"property float y\nproperty float z\nproperty uchar red\nproperty uchar green\n"
        b"property uchar blue\nend_header\n"
    )
    table = np.zeros(
        3, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("r", "u1"), ("g", "u1"), ("b", "u1")]
    )
    table["x"] = [0, 1, 2]
    table["r"] = [10, 20, 30]
    path = tmp_path / "rgb.ply"
    path.write_bytes(head + table.tobytes())
    m = read_measure(path, weight_property="red")
    np.testing.assert_array_equal(m.weights, [10, 20, 30])
    np.testing.assert_array_equal(m.points[:, 0], [0, 1, 2])


def test_pcd_ascii(tmp_path):
    path = tmp_path / "a.pcd"
    rows = "\n".join(" ".join(f"{v:g}" for v in p) for p in PTS)
    path.write_text(
        "# .PCD v0.7\nVERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\n"
        f"WIDTH 4\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS 4\nDATA ascii\n{rows}\n"
    )
    np.testing.assert_allclose(read_measure(path).points, PTS, rtol=1e-6)


def test_open3d_keeps_stdout_clean(tmp_path, capfd):
    path = write_ply(tmp_path / "a.ply", PTS, extra={"c": np.ones(4)})
    read_measure(path)
    read_measure(path, weight_property="c")
    out, _ = capfd.readouterr()
    assert out == ""


def test_c_level_stdout_goes_to_stderr(capfd):
    import ctypes

    from geomreg._stdio import stdout_to_stderr

    libc = ctypes.CDLL(None)
    with stdout_to_stderr():
        libc.printf(b"from C++ land\n")  # buffered by C stdio, not by Python
    print("data", flush=True)
    out, err = capfd.readouterr()
    assert out == "data\n" and "from C++ land" in err


# --------------------------------------------------------------------------- images


def test_png_tiny_exact_convention(tmp_path):
    # 2 rows x 3 columns; row 0 is the TOP row of the file
    img = np.array([[0, 255, 255], [255, 51, 255]], dtype=np.uint8)
    path = tmp_path / "tiny.png"
    iio.imwrite(path, img)
    m = read_measure(path)
    s = 1 / 3  # the longer side (3 columns) spans [0, 1]
    # the dark top-left pixel is at row 1 from the bottom, column 0
    # the 80 % dark bottom-middle pixel is at row 0, column 1; kept in flat (flipped) order
    np.testing.assert_allclose(m.points, [[1.5 * s, 0.5 * s], [0.5 * s, 1.5 * s]])
    np.testing.assert_allclose(m.weights, [0.8 * s * s, 1.0 * s * s])
    assert m.grid.shape == (2, 3) and m.grid.spacing == pytest.approx(s)
    np.testing.assert_array_equal(m.grid.mask, [1, 3])


def test_png_bright_mode(tmp_path):
    img = np.array([[0, 255, 255], [255, 51, 0]], dtype=np.uint8)
    path = tmp_path / "tiny.png"
    iio.imwrite(path, img)
    m = read_measure(path, mass="bright")
    s = 1 / 3
    # flipped rows: [255, 51, 0] at the bottom, then [0, 255, 255]
    np.testing.assert_array_equal(m.grid.mask, [0, 1, 4, 5])
    np.testing.assert_allclose(m.weights, np.array([1.0, 0.2, 1.0, 1.0]) * s * s)


def test_png_full_dark_unit_mass(tmp_path):
    path = tmp_path / "black.png"
    iio.imwrite(path, np.zeros((4, 4), np.uint8))
    m = read_measure(path)
    assert m.n == 16 and m.mass == pytest.approx(1.0)
    np.testing.assert_allclose(m.points.min(0), [0.125, 0.125])
    np.testing.assert_allclose(m.points.max(0), [0.875, 0.875])


def test_png_16_bit_gray(tmp_path):
    img = np.array([[0, 65535], [65535, 16383]])
    path = write_png(tmp_path / "g16.png", img, 16, 0)
    m = read_measure(path)
    # flipped rows: [65535, 16383] at the bottom, then [0, 65535]
    np.testing.assert_array_equal(m.grid.mask, [1, 2])
    np.testing.assert_allclose(m.weights, [(1 - 16383 / 65535) * 0.25, 0.25])


def test_png_16_bit_rgb(tmp_path):
    img = np.zeros((1, 2, 3), dtype=np.int64)
    img[0, 1] = 65535
    path = write_png(tmp_path / "rgb16.png", img, 16, 2)
    m = read_measure(path)
    np.testing.assert_array_equal(m.grid.mask, [0])
    assert m.mass == pytest.approx(0.25)


def test_png_rgb_mean_of_channels(tmp_path):
    img = np.full((1, 2, 3), 255, dtype=np.uint8)
    img[0, 0] = [255, 0, 0]  # gray = 1/3, density 2/3
    path = tmp_path / "rgb.png"
    iio.imwrite(path, img)
    m = read_measure(path)
    np.testing.assert_allclose(m.weights, [2 / 3 * 0.25])


def test_png_rgba_alpha_is_background(tmp_path):
    # black opaque, black transparent, black half transparent, white opaque
    img = np.array(
        [[[0, 0, 0, 255], [0, 0, 0, 0], [0, 0, 0, 102], [255, 255, 255, 255]]], dtype=np.uint8
    )
    path = tmp_path / "rgba.png"
    iio.imwrite(path, img)
    s2 = (1 / 4) ** 2
    dark = read_measure(path)
    np.testing.assert_array_equal(dark.grid.mask, [0, 2])
    np.testing.assert_allclose(dark.weights, [1.0 * s2, 0.4 * s2])
    bright = read_measure(path, mass="bright")  # over black: only the white pixel
    np.testing.assert_array_equal(bright.grid.mask, [3])


def test_png_gray_alpha_and_palette(tmp_path):
    la = np.array([[[0, 255], [0, 0]]], dtype=np.uint8)
    path = tmp_path / "la.png"
    iio.imwrite(path, la)
    np.testing.assert_array_equal(read_measure(path).grid.mask, [0])
    from PIL import Image

    pal = Image.fromarray(np.array([[0, 1], [1, 2]], dtype=np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 255, 255, 255, 255, 0])
    ppath = tmp_path / "pal.png"
    pal.save(ppath)
    m = read_measure(ppath)
    # flipped: bottom row = white, yellow (gray 2/3); top row = black, white
    np.testing.assert_array_equal(m.grid.mask, [1, 2])
    np.testing.assert_allclose(m.weights, [0.25 / 3, 0.25])


def test_other_image_suffixes(tmp_path):
    for name in ("a.bmp", "a.tif"):
        path = tmp_path / name
        iio.imwrite(path, np.array([[0, 255]], dtype=np.uint8), plugin="pillow")
        assert read_measure(path).n == 1
    assert ".jpg" in SUFFIXES and ".png" in SUFFIXES


# --------------------------------------------------------------------------- weights


def test_external_weights_npy_and_text(tmp_path):
    data = tmp_path / "a.npy"
    np.save(data, PTS)
    wn = tmp_path / "w.npy"
    np.save(wn, np.array([[1.0], [2.0], [3.0], [4.0]]))
    m = read_measure(data, weights=wn)
    np.testing.assert_array_equal(m.weights, [1, 2, 3, 4])
    assert m.source == str(data)
    wt = tmp_path / "w.txt"
    wt.write_text("weight\n# two per line is fine\n1, 2\n3 \n4\n")
    np.testing.assert_array_equal(read_weights(wt, 4), [1, 2, 3, 4])
    np.testing.assert_array_equal(read_measure(data, weights=wt).weights, [1, 2, 3, 4])


# --------------------------------------------------------------------------- bad inputs


def _bad_files(tmp: Path):
    """name -> callable writing a bad file, returning its path."""
    cases = {}

    def case(fn):
        cases[fn.__name__] = fn
        return fn

    @case
    def missing():
        return tmp / "nope.ply"

    @case
    def directory():
        d = tmp / "folder.npy"
        d.mkdir()
        return d

    @case
    def unknown_suffix():
        p = tmp / "a.obj"
        p.write_text("v 0 0 0\n")
        return p

    @case
    def pickled_object_npy():
        p = tmp / "obj.npy"
        np.save(p, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
        return p

    @case
    def pickle_named_npy():
        p = tmp / "pk.npy"
        p.write_bytes(pickle.dumps([[1.0, 2.0]]))
        return p

    @case
    def npz_named_npy():
        p = tmp / "z.npy"
        with open(p, "wb") as fh:
            np.savez(fh, a=PTS)
        return p

    @case
    def string_npy():
        p = tmp / "s.npy"
        np.save(p, np.array([["1", "2"]]))
        return p

    @case
    def bool_npy():
        p = tmp / "b.npy"
        np.save(p, np.ones((2, 2), dtype=bool))
        return p

    @case
    def rank4_npy():
        p = tmp / "r4.npy"
        np.save(p, np.ones((2, 2, 2, 2)))
        return p

    @case
    def empty_volume_npy():
        p = tmp / "v0.npy"
        np.save(p, np.zeros((2, 2, 2)))
        return p

    @case
    def negative_volume_npy():
        p = tmp / "vneg.npy"
        np.save(p, -np.ones((2, 2, 2)))
        return p

    @case
    def rank0_npy():
        p = tmp / "r0.npy"
        np.save(p, np.float64(1.0))
        return p

    @case
    def empty_array_npy():
        p = tmp / "e0.npy"
        np.save(p, np.zeros((0, 3)))
        return p

    @case
    def truncated_npy():
        p = tmp / "t.npy"
        np.save(p, np.zeros((100, 3)))
        p.write_bytes(p.read_bytes()[:500])
        return p

    @case
    def nan_npy():
        p = tmp / "nan.npy"
        np.save(p, np.array([[0.0, np.nan], [1.0, 1.0]]))
        return p

    @case
    def inf_txt():
        p = tmp / "inf.txt"
        p.write_text("0 0\n1 inf\n")
        return p

    @case
    def nan_ply():
        pts = PTS.copy()
        pts[2, 1] = np.nan
        return write_ply(tmp / "nan.ply", pts)

    @case
    def ragged_txt():
        p = tmp / "ragged.txt"
        p.write_text("0 0 0\n1 1 1\n2 2\n")
        return p

    @case
    def ragged_csv():
        p = tmp / "ragged.csv"
        p.write_text("x,y\n0,0\n1,1,1\n")
        return p

    @case
    def header_not_first_txt():
        p = tmp / "h.txt"
        p.write_text("0 0\nx y\n1 1\n")
        return p

    @case
    def empty_field_csv():
        p = tmp / "ef.csv"
        p.write_text("0,,1\n")
        return p

    @case
    def only_comments_txt():
        p = tmp / "c.txt"
        p.write_text("# nothing\n\n")
        return p

    @case
    def non_utf8_txt():
        p = tmp / "latin.txt"
        p.write_bytes(b"0 0\n1 \xe9\xff\n")
        return p

    @case
    def binary_garbage_csv():
        p = tmp / "g.csv"
        p.write_bytes(np.random.default_rng(0).bytes(300))
        return p

    @case
    def xyz_two_columns():
        p = tmp / "two.xyz"
        p.write_text("0 0\n1 1\n")
        return p

    @case
    def xyz_bad_token():
        p = tmp / "bad.xyz"
        p.write_text("0 0 0\nfoo bar baz\n1 1 1\n")
        return p

    @case
    def pts_count_mismatch():
        p = tmp / "short.pts"
        p.write_text("5\n0 0 0\n1 1 1\n")
        return p

    @case
    def truncated_binary_ply():
        p = write_ply(tmp / "half.ply", np.random.default_rng(1).normal(size=(200, 3)))
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return p

    @case
    def truncated_ascii_ply():
        p = write_ply(
            tmp / "halfa.ply", np.random.default_rng(1).normal(size=(200, 3)), fmt="ascii"
        )
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return p

    @case
    def ply_cut_in_header():
        p = write_ply(tmp / "hd.ply", PTS)
        p.write_bytes(p.read_bytes()[:40])
        return p

    @case
    def ply_not_ply():
        p = tmp / "np.ply"
        p.write_text("hello world\n")
        return p

    @case
    def ply_without_z():
        p = tmp / "noz.ply"
        p.write_bytes(
            b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\n"
            b"property float y\nend_header\n0 0\n"
        )
        return p

    @case
    def ply_zero_vertices():
        p = tmp / "zero.ply"
        p.write_bytes(
            b"ply\nformat ascii 1.0\nelement vertex 0\nproperty float x\n"
            b"property float y\nproperty float z\nend_header\n"
        )
        return p

    @case
    def truncated_ascii_pcd():
        p = tmp / "t.pcd"
        rows = "\n".join(f"{i} {i} {i}" for i in range(50))
        p.write_text(
            "VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\n"
            f"WIDTH 100\nHEIGHT 1\nPOINTS 100\nDATA ascii\n{rows}\n"
        )
        return p

    @case
    def truncated_binary_pcd():
        p = tmp / "tb.pcd"
        p.write_bytes(
            b"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\n"
            b"WIDTH 100\nHEIGHT 1\nPOINTS 100\nDATA binary\n" + np.zeros((40, 3), "<f4").tobytes()
        )
        return p

    @case
    def pcd_garbage():
        p = tmp / "g.pcd"
        p.write_bytes(np.random.default_rng(2).bytes(200).replace(b"DATA", b"xxxx"))
        return p

    @case
    def corrupt_png():
        p = tmp / "rand.png"
        p.write_bytes(np.random.default_rng(3).bytes(500))
        return p

    @case
    def truncated_png():
        p = tmp / "trunc.png"
        iio.imwrite(p, np.random.default_rng(4).integers(0, 255, (64, 64), dtype=np.uint8))
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        return p

    @case
    def all_white_png():
        p = tmp / "white.png"
        iio.imwrite(p, np.full((8, 8), 255, np.uint8))
        return p

    @case
    def fully_transparent_png():
        p = tmp / "clear.png"
        iio.imwrite(p, np.zeros((4, 4, 4), np.uint8))
        return p

    @case
    def multi_frame_image():
        p = tmp / "frames.tif"
        from PIL import Image

        pages = [Image.fromarray(np.zeros((5, 6), np.uint8)) for _ in range(3)]
        pages[0].save(p, save_all=True, append_images=pages[1:])
        return p

    for suffix in SUFFIXES:

        def empty(suffix=suffix):
            p = tmp / f"empty{suffix}"
            p.write_bytes(b"")
            return p

        cases[f"empty{suffix}"] = empty
    return cases


BAD = sorted(_bad_files(Path("/nonexistent")))


@pytest.mark.parametrize("name", BAD)
def test_bad_input_raises_input_error(tmp_path, name):
    path = _bad_files(tmp_path)[name]()
    with pytest.raises(InputError) as info:
        read_measure(path)
    assert path.name in str(info.value), str(info.value)
    assert info.value.where == str(path)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("missing", "no such file"),
        ("directory", "is a directory, expected a file"),
        ("unknown_suffix", ".ply"),
        ("empty.ply", "empty file"),
        ("pickled_object_npy", "pickle"),
        ("rank4_npy", "expected an (N, D) array (or a rank-3 density volume), found shape (2, 2, 2, 2)"),
        ("empty_volume_npy", "volume has no mass"),
        ("negative_volume_npy", "negative density -1"),
        ("truncated_binary_ply", "could not parse as PLY (corrupt or truncated?)"),
        ("ragged_txt", "line 3"),
        ("non_utf8_txt", "UTF-8"),
        ("all_white_png", "image has no mass (every pixel is background for --mass dark)"),
        ("nan_npy", "non-finite"),
        ("corrupt_png", "could not read as a PNG image"),
        ("truncated_png", "truncated"),
        ("pts_count_mismatch", "announces 5 points"),
    ],
)
def test_bad_input_messages(tmp_path, name, expected):
    path = _bad_files(tmp_path)[name]()
    with pytest.raises(InputError) as info:
        read_measure(path)
    assert expected in str(info.value), str(info.value)


def test_pickled_npy_is_never_unpickled(tmp_path, monkeypatch):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([object()], dtype=object), allow_pickle=True)

    def boom(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    with pytest.raises(InputError):
        read_measure(path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.npy"
    np.save(path, PTS)
    path.chmod(0)
    with pytest.raises(InputError, match="permission"):
        read_measure(path)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (np.array([1.0, -2.0, 3.0, 4.0]), "negative"),
        (np.zeros(4), "zero"),
        (np.ones(3), "expected 4 weights"),
        (np.array([1.0, np.nan, 1.0, 1.0]), "non-finite"),
        (np.array(["a", "b", "c", "d"]), "real numbers"),
    ],
)
@pytest.mark.parametrize("kind", ["npy", "txt"])
def test_bad_weights(tmp_path, content, expected, kind):
    data = tmp_path / "a.npy"
    np.save(data, PTS)
    wpath = tmp_path / f"w.{kind}"
    if kind == "npy":
        np.save(wpath, content)
    else:
        if content.dtype.kind == "U":
            expected = "not a number"
            content = np.array(["1", "2", "3", "x"])
        wpath.write_text("\n".join(str(v) for v in content) + "\n")
    with pytest.raises(InputError) as info:
        read_measure(data, weights=wpath)
    msg = str(info.value)
    assert wpath.name in msg and expected in msg, msg
    assert info.value.where == str(wpath)


def test_bad_weight_files(tmp_path):
    data = tmp_path / "a.npy"
    np.save(data, PTS)
    for name, content in [("empty.txt", b""), ("latin.txt", b"1\n\xff\n"), ("r.npy", None)]:
        wpath = tmp_path / name
        if content is None:
            np.save(wpath, np.ones((2, 2, 2)))
        else:
            wpath.write_bytes(content)
        with pytest.raises(InputError, match=name.replace(".", r"\.")):
            read_measure(data, weights=wpath)
    with pytest.raises(InputError, match="no such file"):
        read_measure(data, weights=tmp_path / "missing.npy")


def test_unknown_weight_property_lists_available(tmp_path):
    path = write_ply(tmp_path / "a.ply", PTS, extra={"confidence": np.ones(4)})
    with pytest.raises(InputError) as info:
        read_measure(path, weight_property="quality")
    msg = str(info.value)
    assert "a.ply" in msg and "quality" in msg and "x, y, z, confidence" in msg


def test_weight_property_negative_values(tmp_path):
    path = write_ply(tmp_path / "a.ply", PTS, extra={"q": np.array([1, -1, 1, 1])})
    with pytest.raises(InputError, match="negative"):
        read_measure(path, weight_property="q")


def test_weight_property_on_other_format(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, PTS)
    with pytest.raises(InputError, match="a.npy"):
        read_measure(path, weight_property="confidence")


def test_parameter_errors(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, PTS)
    with pytest.raises(ParameterError, match="mass"):
        read_measure(path, mass="grey")
    with pytest.raises(ParameterError):
        read_measure(path, weights=path, weight_property="c")


# --------------------------------------------------------------------------- sample_data


def test_sample_data_files():
    if not (SAMPLE / "spiral_a.ply").exists():
        pytest.skip("sample_data/ not generated (run scripts/make_sample_data.py)")
    a_ply = read_measure(SAMPLE / "spiral_a.ply")
    a_npy = read_measure(SAMPLE / "spiral_a.npy")
    np.testing.assert_array_equal(a_ply.points, a_npy.points)
    assert a_ply.n == 1500 and a_ply.dim == 3
    b = read_measure(SAMPLE / "spiral_b.ply")
    np.testing.assert_array_equal(b.points, read_measure(SAMPLE / "spiral_b.npy").points)
    assert b.n == 1200
    conf = read_measure(SAMPLE / "spiral_a.ply", weight_property="confidence")
    assert (conf.weights > 0).all()
    w = read_measure(SAMPLE / "spiral_a.ply", weights=SAMPLE / "spiral_a_weights.npy")
    assert w.mass == pytest.approx(1.0)
    for name in ("blob_a.png", "blob_b.png"):
        m = read_measure(SAMPLE / name)
        assert m.grid.shape == (48, 64) and 0 < m.mass < 0.75
        assert m.points[:, 0].max() < 1 and m.points[:, 1].max() < 0.75
    assert sum(f.stat().st_size for f in SAMPLE.iterdir()) < 1_000_000


def test_make_sample_data_is_deterministic(tmp_path):
    if not (SAMPLE / "spiral_a.npy").exists():
        pytest.skip("sample_data/ not generated")
    spec = importlib.util.spec_from_file_location("msd", ROOT / "scripts" / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    for name in ("spiral_a.npy", "spiral_b.npy", "spiral_a_weights.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / name), np.load(SAMPLE / name))
    assert (tmp_path / "spiral_a.ply").read_bytes() == (SAMPLE / "spiral_a.ply").read_bytes()
    for name in ("blob_a.png", "blob_b.png"):
        np.testing.assert_array_equal(iio.imread(tmp_path / name), iio.imread(SAMPLE / name))


# --------------------------------------------------------------------------- real data


def test_real_bunny_ply_confidence():
    path = shared("clouds/trimesh/bunny.ply")
    m = read_measure(path)
    assert m.n == 8171 and m.dim == 3
    c = read_measure(path, weight_property="confidence")
    np.testing.assert_allclose(c.weights[:2], [0.850855, 0.900159], rtol=1e-6)
    np.testing.assert_allclose(c.points[0], [-0.036872, 0.127727, 0.00440925], rtol=1e-6)


def test_real_bunny_pcd():
    m = read_measure(shared("clouds/probreg/bunny.pcd"))
    assert m.n == 397 and m.dim == 3
    np.testing.assert_allclose(m.points[0], [0.0054216, 0.11349, 0.040749], rtol=1e-6)


def test_real_points_ascii_and_binary_ply_agree():
    a = read_measure(shared("clouds/trimesh/points_ascii.ply"))
    b = read_measure(shared("clouds/trimesh/points_bin.ply"))
    assert a.n == b.n == 5
    np.testing.assert_allclose(a.points, b.points, rtol=1e-6)


def test_real_xyz_keeps_float64_precision():
    m = read_measure(shared("clouds/trimesh/points_agisoft.xyz"))
    assert m.dim == 3 and m.n == 100
    np.testing.assert_array_equal(m.points[0], [665187.522077, 5648349.895035, 241.767693])


def test_real_fish_2d():
    m = read_measure(shared("clouds/probreg/fish_source.txt"))
    assert m.n == 91 and m.dim == 2


def test_real_ell_png():
    m = read_measure(shared("images/geomloss/ell_a.png"))
    assert m.grid.shape == (200, 200) and m.dim == 2
    assert 0 < m.mass < 1 and m.grid.mask.size == m.n


def test_real_duck_rgba():
    m = read_measure(shared("images/pot/duck.png"))
    assert m.grid.shape == (128, 128) and m.n > 0
    bright = read_measure(shared("images/pot/duck.png"), mass="bright")
    assert m.mass + bright.mass == pytest.approx(1.0)  # opaque image: the two add to 1


def test_real_horse_not_square():
    m = read_measure(shared("images/skimage/horse.png"))
    h, w = m.grid.shape
    assert (h, w) == (328, 400) and m.grid.spacing == pytest.approx(1 / 400)
    assert m.points[:, 0].max() < 1 and m.points[:, 1].max() < 328 / 400


# --------------------------------------------------------------------------- writers


def test_atomic_write_appears_only_complete(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def fill(tmp):
        assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".out.txt")
        assert target.read_text() == "old"  # untouched while writing
        Path(tmp).write_text("new content")

    assert atomic_write(target, fill) == target
    assert target.read_text() == "new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt()])
def test_atomic_write_removes_temp_on_error(tmp_path, exc):
    target = tmp_path / "out.npy"
    target.write_bytes(b"old")

    def fail(tmp):
        Path(tmp).write_bytes(b"partial")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(target, fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npy"]


def test_atomic_write_refuses_inputs(tmp_path):
    src = tmp_path / "in.npy"
    np.save(src, PTS)
    with pytest.raises(OutputError, match="refusing to overwrite an input file"):
        write_npy(src, PTS, protect=[src])
    link = tmp_path / "link.npy"
    link.symlink_to(src)
    with pytest.raises(OutputError, match="refusing"):
        write_npy(link, PTS, protect=[str(src)])
    hard = tmp_path / "hard.npy"
    os.link(src, hard)
    with pytest.raises(OutputError, match="refusing"):
        write_text(hard, "x", protect=[src])
    (tmp_path / "sub").mkdir()
    with pytest.raises(OutputError, match="refusing"):
        write_npy(tmp_path / "sub" / ".." / "in.npy", PTS, protect=[src])
    np.testing.assert_array_equal(np.load(src), PTS)


def test_atomic_write_missing_parent_and_directory(tmp_path):
    with pytest.raises(OutputError, match="parent folder does not exist"):
        write_npy(tmp_path / "no" / "out.npy", PTS)
    with pytest.raises(OutputError, match="directory"):
        write_npy(tmp_path, PTS)


def test_write_npy_exact_name_and_text(tmp_path):
    out = tmp_path / "result.bin"
    write_npy(out, PTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.bin"]
    np.testing.assert_array_equal(np.load(out), PTS)
    txt = tmp_path / "r.json"
    write_text(txt, '{"a": "é"}\n')
    assert txt.read_text(encoding="utf-8") == '{"a": "é"}\n'
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600


# ----- point-cloud outputs (points_writer)


@pytest.mark.parametrize("suffix", [".ply", ".npy", ".txt", ".csv", ".xyz"])
def test_points_writer_round_trips(tmp_path, suffix):
    from geomreg.io import atomic_write, points_writer

    g = np.random.default_rng(0)
    pts, w = g.random((25, 3)) * 100 - 50, g.random(25) + 0.1
    path = tmp_path / f"out{suffix}"
    atomic_write(path, points_writer(path, pts, w))
    m = read_measure(path, weight_property="weight" if suffix == ".ply" else None)
    np.testing.assert_array_equal(m.points, pts)  # float64, full precision, every format
    if suffix == ".ply":
        np.testing.assert_array_equal(m.weights, w)


def test_points_writer_refusals(tmp_path):
    from geomreg.errors import OutputError
    from geomreg.io import atomic_write, points_writer

    flat = tmp_path / "flat.ply"
    atomic_write(flat, points_writer(flat, np.ones((4, 2))))
    np.testing.assert_array_equal(read_measure(flat).points, np.c_[np.ones((4, 2)), np.zeros(4)])
    with pytest.raises(OutputError, match="at most 3 coordinates"):
        points_writer(tmp_path / "x.ply", np.ones((4, 5)))
    with pytest.raises(OutputError, match="unknown point-cloud format"):
        points_writer(tmp_path / "x.vtk", np.ones((4, 3)))

"""Property-based tests (hypothesis) of the writers, the readers and Measure.

* every writer/reader pair round-trips arbitrary finite clouds, bit for bit (PNG: to 8 bits);
* every reader, given arbitrary or mutated bytes under every suffix, returns a valid measure
  or raises InputError naming the file (no other exception, no hang, and no more memory
  than the file justifies: headers that lie about their counts are refused up front);
* Measure accepts exactly the valid arrays and its invariants hold for what it accepts.

Examples are derandomized (the same on every run) and no example database is kept, so a
failure here fails the same way in CI; hypothesis prints the falsifying example.
"""

from __future__ import annotations

import math
import os
import signal
import struct
import tempfile
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from corpus import lzf_literals, make_corpus, npy_with_header, pcd_bytes, png_rows, valid_files
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from geomreg.errors import GeomregError, InputError
from geomreg.io import (
    SUFFIXES,
    atomic_write,
    density_png_writer,
    points_writer,
    read_measure,
    read_weights,
    write_npy,
    write_text,
)
from geomreg.io.plypcd import _lzf_decompress
from geomreg.measure import Measure


def _settings(n: int) -> settings:
    return settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


FINITE = st.floats(allow_nan=False, allow_infinity=False)
MiB = 1 << 20


# --------------------------------------------------------------------------- helpers


def same_bits(got: np.ndarray, want: np.ndarray) -> bool:
    """Equal shapes and bit-identical float64 values (-0.0 differs from 0.0)."""
    got, want = np.ascontiguousarray(got, np.float64), np.ascontiguousarray(want, np.float64)
    return got.shape == want.shape and np.array_equal(got.view(np.uint64), want.view(np.uint64))


def assert_valid_measure(m: Measure) -> None:
    """The invariants every Measure promises."""
    assert isinstance(m.points, np.ndarray) and m.points.dtype == np.float64 and m.points.ndim == 2
    n, d = m.points.shape
    assert n >= 1 and d >= 1
    assert np.isfinite(m.points).all()
    assert isinstance(m.weights, np.ndarray) and m.weights.dtype == np.float64
    assert m.weights.shape == (n,)
    assert np.isfinite(m.weights).all() and (m.weights >= 0).all()
    assert 0 < m.mass < np.inf
    if m.grid is not None:
        assert m.grid.mask.shape == (n,)
        np.testing.assert_array_equal(m.grid.centres(m.grid.mask), m.points)


class Hang(Exception):
    """Raised by the alarm when a reader runs past its time."""


@contextmanager
def time_limit(seconds: float):
    def _alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _rss_peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM, the peak resident size, to the current size
        return True
    except OSError:
        return False


def _vm(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def budget(path: Path) -> int:
    """Bytes a reader may allocate for ``path``: a fixed allowance plus a multiple of its size.

    Images may decode to 1032 pixels per byte (deflate's limit) at ~50 bytes of float64 work
    each; other formats hold at least one byte per value they declare.
    """
    size = path.stat().st_size
    per_byte = 64 * 1032 if path.suffix in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff") else 512
    return 48 * MiB + per_byte * size


def read_or_refuse(path: Path, call=None, **kw) -> Measure | np.ndarray | None:
    """Read ``path``; check the outcome is a valid result or a clean InputError.

    Also checks that the read ends within 20 s and stays within :func:`budget` of memory,
    both as seen by tracemalloc (Python and NumPy) and as peak resident size (native code).
    """
    call = call or (lambda: read_measure(path, **kw))
    rss = _rss_peak_reset()
    rss_before = _vm("VmRSS") if rss else 0
    tracemalloc.start()
    try:
        with time_limit(20):
            result = call()
    except GeomregError as err:
        assert isinstance(err, InputError), f"{type(err).__name__}: {err}"
        assert str(err).startswith(f"{path}: "), str(err)
        cause = err.__cause__
        assert cause is None or isinstance(cause, GeomregError), (
            f"an unforeseen {type(cause).__name__} ({cause}) surfaced as {err}"
        )
        assert not isinstance(err.__context__, MemoryError), f"ran out of memory: {err}"
        result = None
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= budget(path), f"allocated {peak / MiB:.0f} MiB for a {path.stat().st_size}-byte file"
    if rss:
        grew = _vm("VmHWM") - rss_before
        assert grew <= budget(path), f"resident size grew {grew / MiB:.0f} MiB"
    if isinstance(result, Measure):
        assert_valid_measure(result)
        assert result.source == str(path)
    return result


# --------------------------------------------------------------------------- strategies


@st.composite
def clouds(draw, dims=(1, 2, 3), weighted=None):
    """A finite (N, D) float64 cloud and, maybe, non-negative weights with a finite positive sum."""
    d = draw(st.sampled_from(dims))
    n = draw(st.integers(1, 30))
    pts = draw(hnp.arrays(np.float64, (n, d), elements=FINITE))
    if weighted is None:
        weighted = draw(st.booleans())
    w = None
    if weighted:
        w = draw(hnp.arrays(np.float64, n, elements=st.floats(0, 1e300)))
        with np.errstate(over="ignore"):
            total = w.sum()
        assume(0 < total < np.inf)
    return pts, w


VALID = valid_files()
HUGE = st.sampled_from([0, 1, 7, 255, 65536, 10**6, 10**9, 2**31 - 1, 2**31, 2**32 + 3, 10**18, 10**30, -1])


@st.composite
def mutated(draw, seeds: list[bytes]) -> bytes:
    """A valid file after a few edits: byte flips, insertions, deletions, truncation, and
    decimal numbers (counts, sizes) replaced by huge, zero or negative ones."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "number"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
        elif op == "number":
            digits = [i for i in range(len(data)) if 48 <= data[i] <= 57]
            if digits:
                i = draw(st.sampled_from(digits))
                j = i
                while j < len(data) and 48 <= data[j] <= 57:
                    j += 1
                data[i:j] = str(draw(HUGE)).encode()
    return bytes(data)


def file_bytes(suffix: str):
    seeds = VALID[suffix]
    return st.one_of(
        st.binary(max_size=600),
        mutated(seeds),
        st.tuples(st.sampled_from(seeds), st.integers(0, 400)).map(lambda t: t[0][: t[1]]),
    )


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".npy", ".txt", ".csv", ".xyz", ".ply"])
@_settings(30)
@given(data=st.data())
def test_writers_and_readers_round_trip_exactly(suffix, data):
    pts, w = data.draw(clouds(dims=(3,) if suffix == ".xyz" else (1, 2, 3)))
    n, d = pts.shape
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"cloud{suffix}"
        atomic_write(path, points_writer(path, pts, w))
        if w is None:
            m = read_measure(path)
        elif suffix == ".ply":  # weights travel in the PLY file
            m = read_measure(path, weight_property="weight")
        elif data.draw(st.booleans(), label="weights as .npy"):
            write_npy(Path(tmp) / "w.npy", w)
            m = read_measure(path, weights=Path(tmp) / "w.npy")
        else:
            write_text(Path(tmp) / "w.txt", "".join(f"{float(v)!r}\n" for v in w))
            m = read_measure(path, weights=Path(tmp) / "w.txt")
    want = pts
    if suffix == ".ply":  # PLY holds x y z: a 1-D or 2-D cloud comes back with zeros
        want = np.zeros((n, 3))
        want[:, :d] = pts
    assert same_bits(m.points, want)
    assert same_bits(m.weights, np.full(n, 1.0 / n) if w is None else w)
    assert_valid_measure(m)


@_settings(30)
@given(
    data=st.data(),
    encoding=st.sampled_from(["ascii", "binary", "binary_compressed"]),
    size=st.sampled_from([4, 8]),
)
def test_pcd_round_trips_in_every_encoding(data, encoding, size):
    pts, _ = data.draw(clouds(dims=(3,), weighted=False))
    if size == 4:
        with np.errstate(over="ignore"):
            pts = pts.astype(np.float32)
        assume(np.isfinite(pts).all())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.pcd"
        extra = data.draw(st.booleans(), label="extra field")
        path.write_bytes(pcd_bytes(np.asarray(pts, np.float64), encoding, size=size, extra=extra))
        m = read_measure(path)
    assert same_bits(m.points, pts.astype(np.float64))


@_settings(30)
@given(density=hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=12),
                          elements=st.floats(0, 1e6)))
def test_density_png_round_trips_to_8_bits(density):
    assume(density.max() > 0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.png"
        atomic_write(path, density_png_writer(density))
        m = read_measure(path)
    h, w = density.shape
    assert m.grid.shape == (h, w) and m.grid.spacing == 1.0 / max(h, w)
    back = m.grid.to_array(m.grid.full(m.weights)) / m.grid.spacing**2
    assert np.abs(back - density / density.max()).max() <= 0.5 / 255 + 1e-9
    assert_valid_measure(m)


@_settings(30)
@given(density=hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=3, max_side=6),
                          elements=st.floats(0, 1e6)))
def test_density_npy_round_trips_exactly(density):
    assume((density * (1.0 / max(density.shape)) ** density.ndim).max() > 0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "d.npy"
        write_npy(path, density)
        m = read_measure(path, as_image=True)
    s = m.grid.spacing
    assert m.grid.shape == density.shape and s == 1.0 / max(density.shape)
    mass = density * s**density.ndim  # cells whose mass underflows to 0 are no points
    assert same_bits(m.grid.to_array(m.grid.full(m.weights)), np.where(mass > 0, mass, 0.0))
    assert_valid_measure(m)


# --------------------------------------------------------------------------- arbitrary bytes


@pytest.mark.parametrize("suffix", SUFFIXES)
@_settings(40)
@given(data=st.data())
def test_readers_return_a_measure_or_refuse_cleanly(suffix, data):
    body = data.draw(file_bytes(suffix), label="file")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"input{suffix}"
        path.write_bytes(body)
        kw = {}
        if suffix == ".ply" and data.draw(st.booleans(), label="weight property"):
            kw["weight_property"] = data.draw(st.sampled_from(["weight", "w", "x", "idx"]))
        if suffix == ".npy":
            kw["as_image"] = data.draw(st.booleans(), label="as image")
        if suffix in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
            kw["mass"] = data.draw(st.sampled_from(["dark", "bright"]))
        read_or_refuse(path, **kw)


@pytest.mark.parametrize("suffix", [".npy", ".txt", ".csv"])
@_settings(30)
@given(data=st.data())
def test_weight_files_return_weights_or_refuse_cleanly(suffix, data):
    body = data.draw(file_bytes(suffix), label="file")
    n = data.draw(st.integers(1, 20), label="n")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"w{suffix}"
        path.write_bytes(body)
        w = read_or_refuse(path, call=lambda: read_weights(path, n))
    if w is not None:
        assert w.dtype == np.float64 and w.shape == (n,)
        assert np.isfinite(w).all() and (w >= 0).all() and 0 < w.sum() < np.inf


def _lying_files(count: int, body_points: int) -> dict[str, bytes]:
    """Files whose header declares ``count`` points (or pixels) over a body of a few points."""
    pts = np.arange(body_points * 3, dtype=np.float64).reshape(-1, 3)
    f4 = pts.astype("<f4").tobytes()
    xyz = "property float x\nproperty float y\nproperty float z\n"
    ply = "ply\nformat binary_little_endian 1.0\n"
    side = min(max(1, math.isqrt(abs(count))), 2**31 - 1)
    tall = min(max(1, abs(count) // side), 2**31 - 1)
    return {
        "npy": npy_with_header((count, 3), pts.tobytes()),
        "ply": f"{ply}element vertex {count}\n{xyz}end_header\n".encode() + f4,
        "ply_list": (f"ply\nformat binary_little_endian 1.0\nelement vertex {count}\n{xyz}"
                     "property list uchar int idx\nend_header\n").encode()
                    + b"".join(p.astype("<f4").tobytes() + b"\x00" for p in pts),
        "ply_before": (f"ply\nformat binary_little_endian 1.0\nelement camera {count}\nproperty list uchar "
                       f"uchar k\nelement vertex {body_points}\n{xyz}end_header\n").encode()
                      + b"\x00" * body_points + f4,
        "ply_ascii": f"ply\nformat ascii 1.0\nelement vertex {count}\n{xyz}end_header\n".encode()
                     + "".join(f"{a} {b} {c}\n" for a, b, c in pts).encode(),
        "pcd": (f"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH {count}\nHEIGHT 1\n"
                f"POINTS {count}\nDATA binary\n").encode() + f4,
        "pcd_ascii": (f"VERSION 0.7\nFIELDS x y z\nWIDTH {count}\nPOINTS {count}\nDATA ascii\n").encode()
                     + "".join(f"{a} {b} {c}\n" for a, b, c in pts).encode(),
        "pcd_area": (f"VERSION 0.7\nFIELDS x y z\nPOINTS {body_points}\nWIDTH {count}\nHEIGHT 1\n"
                     "DATA binary\n").encode() + f4,
        "pcd_compressed": (f"VERSION 0.7\nFIELDS x y z\nWIDTH {count}\nPOINTS {count}\n"
                           "DATA binary_compressed\n").encode()
                          + struct.pack("<II", len(f4) + 1, (12 * count) % 2**32) + lzf_literals(f4[:32]),
        "pts": f"{count}\n".encode() + "".join(f"{a} {b} {c}\n" for a, b, c in pts).encode(),
        "png": png_rows(side, side, b"\x00" + b"\x00" * min(side, 64)),
        "png_1bit": png_rows(side, tall, b"\x00" + b"\x00" * 8, 1),
    }


@pytest.mark.parametrize("kind", sorted(_lying_files(1, 1)))
@_settings(12)
@given(count=st.one_of(HUGE, st.integers(-5, 10**12)), body=st.integers(0, 5))
def test_lying_headers_are_refused_before_allocating(kind, count, body):
    data = _lying_files(count, body)[kind]
    suffix = "." + kind.split("_")[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"lying{suffix}"
        path.write_bytes(data)
        m = read_or_refuse(path)
    if m is not None:  # accepted: then it cannot hold more points than the file has room for
        assert m.n <= max(body, 1) * (64 if suffix == ".png" else 1)


def test_lying_headers_that_once_got_through_are_refused(tmp_path):
    """Found by fuzzing and these properties; each was read as garbage or allocated gigabytes."""
    cases = {
        # a list property made the vertex count unchecked: 20 M uninitialised points came back
        "list.ply": _lying_files(20_000_000, 3)["ply_list"],
        "npy": _lying_files(10**9, 2)["npy"],
        "pcd_area": _lying_files(100_000_000, 2)["pcd_area"],
        "compressed.pcd": _lying_files(20_000_000, 2)["pcd_compressed"],
        "bomb.png": png_rows(8000, 8000, (b"\x00" + bytes(1000)) * 8000, 1),
    }
    for name, data in cases.items():
        path = tmp_path / (name if "." in name else f"x.{name.split('_')[0]}")
        path.write_bytes(data)
        assert read_or_refuse(path) is None, f"{name} was accepted"  # refused cleanly, within budget


def test_every_corpus_input_is_refused_within_budget(tmp_path):
    for name, path in make_corpus(tmp_path).items():
        if path.is_dir():
            with pytest.raises(InputError):
                read_measure(path)
        else:
            assert read_or_refuse(path) is None, name


# --------------------------------------------------------------------------- regressions


def test_ply_property_order_does_not_matter(tmp_path):
    """z, y, x declared in that order (open3d returned uninitialised memory for it)."""
    path = tmp_path / "zyx.ply"
    path.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 2\nproperty float z\nproperty float y\n"
                     b"property float x\nend_header\n1 2 3\n4 5 6\n")
    np.testing.assert_array_equal(read_measure(path).points, [[3, 2, 1], [6, 5, 4]])


def test_ply_list_lengths_are_followed(tmp_path):
    """A vertex list property of varying length before x y z, big-endian."""
    path = tmp_path / "lists.ply"
    path.write_bytes(VALID[".ply"][2])
    np.testing.assert_array_equal(read_measure(path).points, [[0, 1, 2], [1, 1, 1]])
    bad = tmp_path / "overrun.ply"  # the first list claims more items than the file holds
    bad.write_bytes(VALID[".ply"][2].replace(b"end_header\n\x01", b"end_header\n\x09"))
    with pytest.raises(InputError, match="ends after"):
        read_measure(bad)


def test_pcd_short_row_is_refused(tmp_path):
    """open3d skipped the short row and returned an uninitialised last point."""
    path = tmp_path / "short.pcd"
    path.write_bytes(b"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 3\n"
                     b"HEIGHT 1\nPOINTS 3\nDATA ascii\n1 2 3\n4 5\n6 7 8\n")
    with pytest.raises(InputError, match="point 1 has 2 values"):
        read_measure(path)


def test_pcd_double_fields_are_read(tmp_path):
    """TYPE F SIZE 8: open3d returned zeros for every coordinate."""
    path = tmp_path / "f8.pcd"
    pts = np.array([[0.1, 0.2, 0.3], [1e300, -2.5, 7.0]])
    path.write_bytes(pcd_bytes(pts, "binary", size=8))
    assert same_bits(read_measure(path).points, pts)


@_settings(60)
@given(st.lists(st.one_of(st.binary(min_size=1, max_size=32).map(lambda b: ("lit", b)),
                          st.tuples(st.integers(1, 300), st.integers(3, 264)).map(lambda t: ("ref",) + t)),
                max_size=12))
def test_lzf_decoder_against_a_reference_encoding(tokens):
    """Literal runs and back-references (overlapping ones too) decode to what they encode."""
    packed, want = bytearray(), bytearray()
    for tok in tokens:
        if tok[0] == "lit":
            packed += bytes([len(tok[1]) - 1]) + tok[1]
            want += tok[1]
            continue
        _, dist, length = tok
        if dist > len(want):
            continue
        code = length - 2
        ctrl = (min(code, 7) << 5) | ((dist - 1) >> 8)
        packed += bytes([ctrl]) + (bytes([code - 7]) if code >= 7 else b"") + bytes([(dist - 1) & 0xFF])
        for _ in range(length):
            want.append(want[-dist])
    assert _lzf_decompress(bytes(packed), len(want)) == bytes(want)
    if packed:
        assert _lzf_decompress(bytes(packed), len(want) + 1) is None  # wrong size: refused
        assert _lzf_decompress(bytes(packed[:-1]), len(want)) is None  # truncated: refused


# --------------------------------------------------------------------------- Measure

REAL = [np.float64, np.float32, np.float16, np.int64, np.int8, np.uint8, np.uint64]
OTHER = [np.bool_, np.complex128, np.dtype("U3"), np.dtype("m8[s]"), np.dtype("M8[D]")]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


def any_array(shape=SHAPES):
    return st.sampled_from(REAL + OTHER).flatmap(lambda dt: hnp.arrays(dt, shape))


def _expected_valid(points, weights) -> bool:
    """Whether Measure(points, weights) must be accepted: an oracle written from its contract."""
    pts = np.asarray(points)
    if pts.dtype.kind not in "iuf" or pts.ndim not in (1, 2):
        return False
    if pts.ndim == 1:
        pts = pts[:, None]
    n, d = pts.shape
    with np.errstate(over="ignore", invalid="ignore"):
        if n < 1 or d < 1 or not np.isfinite(pts.astype(np.float64)).all():
            return False
        if weights is None:
            return True
        w = np.asarray(weights)
        if w.dtype.kind not in "iuf" or w.size != n or (w.ndim > 1 and max(w.shape) != w.size):
            return False
        w = w.astype(np.float64).reshape(-1)
        total = w.sum()
    return bool(np.isfinite(w).all() and (w >= 0).all() and 0 < total < np.inf)


@_settings(200)
@given(points=any_array(), weights=st.none() | any_array(hnp.array_shapes(max_dims=2, max_side=5)))
def test_measure_accepts_exactly_the_valid_arrays(points, weights):
    valid = _expected_valid(points, weights)
    try:
        m = Measure(points, weights, "arr")
    except InputError as err:
        assert not valid, f"refused a valid measure: {err}"
        assert str(err).startswith("arr: ")
        return
    assert valid, "accepted an invalid measure"
    assert_valid_measure(m)
    pts = np.asarray(points)
    assert same_bits(m.points, pts.reshape(len(pts), -1).astype(np.float64))
    n = m.n
    want = np.full(n, 1.0 / n) if weights is None else np.asarray(weights).astype(np.float64).reshape(-1)
    assert same_bits(m.weights, want)


@_settings(100)
@given(
    n=st.integers(1, 6),
    special=st.lists(st.sampled_from([np.nan, np.inf, -np.inf, -1.0, -0.0, 0.0, 1e308, 5e-324]),
                     min_size=1, max_size=6),
)
def test_measure_weights_with_special_values(n, special):
    w = np.resize(np.array(special), n)
    valid = _expected_valid(np.zeros((n, 2)), w)
    try:
        m = Measure(np.zeros((n, 2)), w)
    except InputError:
        assert not valid
    else:
        assert valid
        assert_valid_measure(m)


@_settings(50)
@given(rows=st.lists(st.lists(FINITE, min_size=0, max_size=3), min_size=0, max_size=4))
def test_measure_from_nested_lists(rows):
    """Ragged lists, empty lists and plain lists: a Measure or an InputError, nothing else."""
    ragged = len({len(r) for r in rows}) > 1
    try:
        m = Measure(rows, None)
    except InputError:
        assert ragged or not rows or not rows[0]
    else:
        assert not ragged
        assert same_bits(m.points, np.array(rows, dtype=np.float64))


def test_density_underflow_regression(tmp_path):
    """A density whose mass underflows was kept as a point of weight 0 (or all such: 'no mass')."""
    path = tmp_path / "d.npy"
    np.save(path, np.array([[1.0, 5e-324]]))
    m = read_measure(path, as_image=True)
    assert m.n == 1 and m.grid.mask.tolist() == [0]
    np.save(path, np.array([[5e-324, 5e-324]]))
    with pytest.raises(InputError, match="underflows"):
        read_measure(path, as_image=True)


def test_measure_regressions():
    """Accepted before: a NaT coordinate became -9.2e18, and weights whose sum overflows."""
    with pytest.raises(InputError, match="real numbers"):
        Measure(np.array([[1], ["NaT"]], "m8[s]"), None)
    with pytest.raises(InputError, match="overflow"):
        Measure(np.zeros((2, 1)), np.array([1e308, 1e308]))
    with pytest.raises(InputError, match="not an array"):
        Measure([[0.0, 1.0], [2.0]], None)


def test_the_memory_check_can_fail(tmp_path):
    """read_or_refuse's budget is enforced: a reader that allocates too much is caught."""
    path = tmp_path / "a.txt"
    path.write_bytes(b"1 2 3\n")
    with pytest.raises(AssertionError, match="allocated"):
        read_or_refuse(path, call=lambda: np.ones(budget(path) // 8 + MiB))


def test_the_time_limit_can_fail():
    with pytest.raises(Hang), time_limit(0.05):
        while True:
            os.getpid()

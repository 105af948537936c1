"""A corpus of bad inputs, generated (never hand-copied): ``make_corpus(folder)``.

Each entry is a file (or folder) that every command must refuse with exit code 1 and one
line ``Error: <path>: <problem>``, writing nothing. ``run as a script`` it writes the corpus
to a folder for a look: ``python tests/corpus.py DIR``.

:func:`valid_files` makes small valid files of every suffix: the starting points of the
property tests' mutations and the fuzzer's seeds (tests/test_properties.py, tests/fuzz/).
"""

from __future__ import annotations

import io
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np


def _png(pixels: np.ndarray) -> bytes:
    import imageio.v3 as iio

    buf = io.BytesIO()
    iio.imwrite(buf, pixels, extension=".png")
    return buf.getvalue()


def _ply_binary(n_declared: int, points: np.ndarray) -> bytes:
    header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {n_declared}\n"
              "property float x\nproperty float y\nproperty float z\nend_header\n").encode()
    return header + points.astype("<f4").tobytes()


def png_rows(width: int, height: int, rows: bytes, bitdepth: int = 8) -> bytes:
    """A gray PNG declaring ``width x height`` whose one zlib stream holds ``rows`` (raw, filtered)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, bitdepth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows, 9))
            + chunk(b"IEND", b""))


def _patched_idat_length(png: bytes, length: int) -> bytes:
    """``png`` with its first IDAT chunk's length field replaced (the CRC no longer checked)."""
    at = png.index(b"IDAT") - 4
    return png[:at] + struct.pack(">I", length) + png[at + 4 :]


def npy_with_header(shape: tuple, body: bytes) -> bytes:
    """A .npy header declaring a float64 array of ``shape``, followed by ``body``."""
    text = f"{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}, }}"
    text += " " * (63 - (len(text) + 10) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode() + body


def lzf_literals(raw: bytes) -> bytes:
    """Valid LZF data holding ``raw`` as literal runs only (at most 32 bytes each)."""
    out = bytearray()
    for i in range(0, len(raw), 32):
        chunk = raw[i : i + 32]
        out += bytes([len(chunk) - 1]) + chunk
    return bytes(out)


def pcd_bytes(points: np.ndarray, data: str, *, size: int = 4, extra: bool = False) -> bytes:
    """A PCD file of ``points`` (fields x y z, maybe intensity) with DATA ``data``."""
    t = "<f4" if size == 4 else "<f8"
    names = ["x", "y", "z", "intensity"] if extra else ["x", "y", "z"]
    cols = [points[:, 0], points[:, 1], points[:, 2]] + ([np.arange(len(points))] if extra else [])
    k, n = len(names), len(points)
    head = (f"# .PCD v0.7\nVERSION 0.7\nFIELDS {' '.join(names)}\nSIZE {' '.join([str(size)] * k)}\n"
            f"TYPE {' '.join('F' * k)}\nCOUNT {' '.join('1' * k)}\nWIDTH {n}\nHEIGHT 1\n"
            f"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA {data}\n").encode()
    if data == "ascii":
        return head + "".join(" ".join(repr(float(c[i])) for c in cols) + "\n" for i in range(n)).encode()
    if data == "binary":
        table = np.empty(n, dtype=[(f"f{j}", t) for j in range(k)])
        for j, c in enumerate(cols):
            table[f"f{j}"] = c
        return head + table.tobytes()
    raw = b"".join(np.asarray(c, dtype=t).tobytes() for c in cols)  # binary_compressed: field by field
    packed = lzf_literals(raw)
    return head + struct.pack("<II", len(packed), len(raw)) + packed


def _encoded(img: np.ndarray, ext: str) -> bytes:
    import imageio.v3 as iio

    buf = io.BytesIO()
    iio.imwrite(buf, img, extension=ext, plugin="pillow")
    return buf.getvalue()


def valid_files() -> dict[str, list[bytes]]:
    """Small valid files of every suffix geomreg reads, keyed by suffix."""
    from geomreg.io import SUFFIXES, points_writer

    g = np.random.default_rng(1)
    pts = np.round(g.normal(size=(6, 3)), 3)
    out: dict[str, list[bytes]] = {s: [] for s in SUFFIXES}
    for suffix in (".npy", ".ply", ".txt", ".csv", ".xyz"):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"c{suffix}"
            points_writer(path, pts, np.arange(1.0, 7.0))(str(path))
            out[suffix].append(path.read_bytes())
    buf = io.BytesIO()
    np.save(buf, g.random((3, 4, 2)))  # a density volume
    out[".npy"].append(buf.getvalue())
    xyz = b"property float x\nproperty float y\nproperty float z\n"
    out[".ply"].append(
        b"ply\nformat ascii 1.0\nelement vertex 3\n" + xyz + b"property float w\nelement face 1\n"
        b"property list uchar int vertex_indices\nend_header\n0 0 0 1\n1 0 0 2\n0 1 0 3\n3 0 1 2\n"
    )
    out[".ply"].append(  # big-endian, a list of shorts before the coordinates
        b"ply\nformat binary_big_endian 1.0\nelement vertex 2\nproperty list uchar short idx\n"
        b"property double x\nproperty double y\nproperty double z\nend_header\n"
        + b"\x01\x00\x07" + np.arange(3, dtype=">f8").tobytes() + b"\x00" + np.ones(3, ">f8").tobytes()
    )
    out[".pcd"] += [pcd_bytes(pts, "ascii"), pcd_bytes(pts, "binary", extra=True),
                    pcd_bytes(pts, "binary_compressed")]
    out[".pts"] = [b"6\n" + out[".xyz"][0]]
    img = (g.random((5, 7)) * 255).astype(np.uint8)
    rgba = (g.random((4, 3, 4)) * 255).astype(np.uint8)
    out[".png"] += [_encoded(img, ".png"), _encoded(rgba, ".png"), png_rows(9, 2, b"\x00\x12\x34" * 2, 1)]
    out[".bmp"].append(_encoded(img, ".bmp"))
    out[".tif"].append(_encoded(img, ".tif"))
    out[".tiff"].append(_encoded(rgba, ".tiff"))
    out[".jpg"].append(_encoded(np.repeat(img[..., None], 3, axis=2), ".jpg"))
    out[".jpeg"] = list(out[".jpg"])
    return out


_PCD_HEAD = "VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\n"


def make_corpus(folder: Path) -> dict[str, Path]:
    """Write every bad input into ``folder``; returns ``{case name: path}``."""
    g = np.random.default_rng(0)
    good = g.random((20, 3))
    cases: dict[str, bytes | None] = {
        "empty.ply": b"",
        "empty.npy": b"",
        "empty.txt": b"",
        "empty.png": b"",
        "empty.xyz": b"",
        "header_only.ply": _ply_binary(0, np.zeros((0, 3))),
        "truncated.ply": _ply_binary(1000, good),  # says 1000 vertices, holds 20
        "lying.ply": _ply_binary(10**9, good),  # must not allocate a billion vertices
        "ascii_short.ply": b"ply\nformat ascii 1.0\nelement vertex 5\nproperty float x\nproperty float y\n"
                           b"property float z\nend_header\n0 0 0\n1 1 1\n",
        "garbage.ply": b"ply\n\x00\xff\xfe this is not a header",
        "truncated.pcd": b"# .PCD v0.7\nVERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\n"
                         b"WIDTH 100\nHEIGHT 1\nPOINTS 100\nDATA binary\n" + good[:3].astype("<f4").tobytes(),
        "nonutf8.txt": b"\xff\xfe\x00\x01 1.0 2.0\n\x80\x81\x82\n",
        "words.xyz": b"one two three\nfour five six\n",
        "ragged.txt": b"1 2 3\n4 5\n6 7 8\n",
        "nan.txt": b"1 2 3\nnan 1 2\n",
        "truncated.png": _png(np.full((8, 8), 50, np.uint8))[:40],
        "blank.png": _png(np.full((16, 16), 255, np.uint8)),  # no mass: every pixel white
        "one_white_pixel.png": _png(np.full((1, 1), 255, np.uint8)),
        "folder.ply": None,  # a folder where a file is expected
        # found by fuzzing and property tests (tests/test_properties.py, tests/fuzz/):
        # a list property hid the lying count from the size check; 20 M garbage points came back
        "lying_list.ply": b"ply\nformat binary_little_endian 1.0\nelement vertex 20000000\n"
                          b"property float x\nproperty float y\nproperty float z\n"
                          b"property list uchar int idx\nend_header\n"
                          + b"".join(p.astype("<f4").tobytes() + b"\x00" for p in good[:3]),
        # the first vertex's list claims 200 items: the rest of the file is swallowed
        "list_overrun.ply": b"ply\nformat binary_little_endian 1.0\nelement vertex 3\n"
                            b"property list uchar uchar idx\nproperty float x\nproperty float y\n"
                            b"property float z\nend_header\n\xc8"
                            + b"".join(p.astype("<f4").tobytes() + b"\x00" for p in good[:3]),
        "short_row.pcd": f"{_PCD_HEAD}WIDTH 3\nHEIGHT 1\nPOINTS 3\nDATA ascii\n".encode()
                         + b"1 2 3\n4 5\n6 7 8\n",  # read as an uninitialised third point
        "lying_width.pcd": f"{_PCD_HEAD}POINTS 2\nWIDTH 100000000\nHEIGHT 1\nDATA binary\n".encode()
                           + good[:2].astype("<f4").tobytes(),
        "lying_compressed.pcd": f"{_PCD_HEAD}WIDTH 1000000000\nHEIGHT 1\nPOINTS 1000000000\n"
                                "DATA binary_compressed\n".encode() + struct.pack("<II", 16, 3 * 10**9)
                                + bytes(16),
        "lying.npy": npy_with_header((10**9, 3), good[:2].tobytes()),  # np.load would ask for 24 GB
        # format "39.255" and a 4 GB header length: the header was read before being checked
        "bad_version.npy": b"\x93NUMPY\x27\xff\xff\xff\xff\xff" + good.tobytes(),
        "huge_header.npy": b"\x93NUMPY\x02\x00\xf0\xff\xff\xff" + good.tobytes(),
        # 8 kB of 1-bit PNG that decodes to 64 M black pixels (gigabytes of float64 work)
        "bomb.png": png_rows(8000, 8000, (b"\x00" + bytes(1000)) * 8000, 1),
        # a complete zlib stream holding 1 of 9 rows: pillow filled the rest with black (mass)
        "short_stream.png": png_rows(9, 9, b"\x00" + b"\xff" * 9),
        # a 1 x 1 PNG whose IDAT chunk declares 4 GB: pillow asked for all of it at once
        "huge_chunk.png": _patched_idat_length(png_rows(1, 1, b"\x00\x00"), 0xF800000A),
    }
    arrays = {
        "nan.npy": np.array([[0.0, 1.0, 2.0], [np.nan, 0.0, 0.0]]),
        "inf.npy": np.array([[0.0, 1.0, 2.0], [np.inf, 0.0, 0.0]]),
        "rank4.npy": np.zeros((2, 2, 2, 2)),
        "scalar.npy": np.array(3.0),
        "strings.npy": np.array([["a", "b", "c"]]),
        "complex.npy": np.ones((4, 3), dtype=complex),
        "zero_points.npy": np.zeros((0, 3)),
        "subnormal_volume.npy": np.full((2, 2, 2), 5e-324),  # every voxel's mass underflows to 0
    }
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for name, data in cases.items():
        path = folder / name
        if data is None:
            path.mkdir(exist_ok=True)
        else:
            path.write_bytes(data)
        out[name] = path
    for name, arr in arrays.items():
        np.save(folder / name, arr)
        out[name] = folder / name
    obj = folder / "pickled.npy"  # an object array: loading it would run pickle
    np.save(obj, np.array([{"x": 1}, None], dtype=object), allow_pickle=True)
    out["pickled.npy"] = obj
    assert struct.calcsize("<f") == 4
    return out


if __name__ == "__main__":
    for name, path in make_corpus(Path(sys.argv[1])).items():
        print(name, path)

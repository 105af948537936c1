"""A corpus of bad inputs, generated (never hand-copied): ``make_corpus(folder)``.

Each entry is a file (or folder) that every command must refuse with exit code 1 and one
line ``Error: <path>: <problem>``, writing nothing. ``run as a script`` it writes the corpus
to a folder for a look: ``python tests/corpus.py DIR``.
"""

from __future__ import annotations

import io
import struct
import sys
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
    }
    arrays = {
        "nan.npy": np.array([[0.0, 1.0, 2.0], [np.nan, 0.0, 0.0]]),
        "inf.npy": np.array([[0.0, 1.0, 2.0], [np.inf, 0.0, 0.0]]),
        "rank4.npy": np.zeros((2, 2, 2, 2)),
        "scalar.npy": np.array(3.0),
        "strings.npy": np.array([["a", "b", "c"]]),
        "complex.npy": np.ones((4, 3), dtype=complex),
        "zero_points.npy": np.zeros((0, 3)),
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

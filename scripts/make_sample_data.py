"""Generate geomreg's small demo files in ``sample_data/`` (deterministic, < 1 MB).

Run from anywhere: ``python scripts/make_sample_data.py [OUTPUT_FOLDER]``.

Files made:

* ``spiral_a.ply`` / ``spiral_a.npy``: 1500 points on a noisy (2, 3) torus knot, unit
  scale. The PLY is binary little-endian with a per-vertex ``confidence`` property
  (use ``--weight-property confidence``).
* ``spiral_b.ply`` / ``spiral_b.npy``: 1200 points on a rotated, slightly deformed and
  shifted copy of that knot.
* ``spiral_a_weights.npy``: positive weights for spiral_a (sum 1).
* ``blob_a.png`` / ``blob_b.png``: 64x48 (width x height) 8-bit grayscale density images,
  dark shapes on white: an ellipse and a crescent.

The ``.npy`` files hold exactly the coordinates stored in the PLY files (float32 values
as float64), so both formats give the same measure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

SEED = 20240601
WIDTH, HEIGHT = 64, 48


def torus_knot(t: np.ndarray, p: int = 2, q: int = 3, big: float = 0.3, small: float = 0.12):
    """Points of a (p, q) torus knot.

    Args:
        t: parameters ((N,) array) in [0, 2 pi).
        p: turns around the axis of symmetry.
        q: turns around the tube.
        big: radius of the torus' centre circle.
        small: radius of the tube.

    Returns:
        points ((N, 3) array).
    """
    ring = big + small * np.cos(q * t)
    return np.stack([ring * np.cos(p * t), ring * np.sin(p * t), small * np.sin(q * t)], axis=1)


def rotation(angle_z: float, angle_x: float) -> np.ndarray:
    """Rotation by ``angle_x`` about x, then by ``angle_z`` about z (radians), (3, 3)."""
    cz, sz = np.cos(angle_z), np.sin(angle_z)
    cx, sx = np.cos(angle_x), np.sin(angle_x)
    rz = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    return rz @ rx


def make_spirals(rng: np.random.Generator):
    """Two 3-D clouds, their confidence values and weights for the first.

    Returns:
        (a, b, confidence, weights): points_a ((1500, 3) float32), points_b ((1200, 3)
        float32), confidence ((1500,) float32) in (0.2, 1], weights ((1500,) float64).
    """
    t_a = np.sort(rng.uniform(0.0, 2 * np.pi, 1500))
    a = torus_knot(t_a) + rng.normal(scale=0.01, size=(1500, 3))
    t_b = np.sort(rng.uniform(0.0, 2 * np.pi, 1200))
    b = torus_knot(t_b, small=0.12 * 1.1) * (1.0 + 0.08 * np.sin(t_b))[:, None]
    b = b @ rotation(np.deg2rad(30.0), np.deg2rad(15.0)).T + np.array([0.05, -0.03, 0.02])
    b = b + rng.normal(scale=0.01, size=(1200, 3))
    confidence = 0.6 + 0.4 * np.cos(3 * t_a) * rng.uniform(0.5, 1.0, 1500)
    weights = 1.0 + 0.5 * np.sin(2 * t_a)
    weights = weights / weights.sum()
    return a.astype(np.float32), b.astype(np.float32), confidence.astype(np.float32), weights


def write_ply(path: Path, points: np.ndarray, extra: dict[str, np.ndarray] | None = None):
    """Write a binary little-endian PLY point cloud with float32 vertex properties.

    Args:
        path: the file to write.
        points: coordinates ((N, 3) array).
        extra: further per-vertex properties, name -> (N,) array.
    """
    extra = extra or {}
    names = ["x", "y", "z", *extra]
    columns = [points[:, 0], points[:, 1], points[:, 2], *extra.values()]
    header = [
        "ply",
        "format binary_little_endian 1.0",
        "comment made by geomreg's scripts/make_sample_data.py",
        f"element vertex {len(points)}",
    ]
    header += [f"property float {name}" for name in names]
    header += ["end_header"]
    table = np.empty(len(points), dtype=[(name, "<f4") for name in names])
    for name, column in zip(names, columns, strict=True):
        table[name] = column
    path.write_bytes(("\n".join(header) + "\n").encode("ascii") + table.tobytes())


def blob_image(kind: str) -> np.ndarray:
    """Draw a dark shape with soft edges on white, as a (48, 64) uint8 grayscale image.

    Args:
        kind: ``"ellipse"`` or ``"crescent"``.

    Returns:
        image ((HEIGHT, WIDTH) uint8 array), 255 on the background.
    """
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH] + 0.5
    if kind == "ellipse":
        r = np.hypot((xx - 24.0) / 14.0, (yy - 26.0) / 9.0)
        density = np.clip((1.0 - r) / 0.15, 0.0, 1.0)
    else:
        outer = np.hypot(xx - 38.0, yy - 22.0) / 13.0
        inner = np.hypot(xx - 44.0, yy - 19.0) / 10.0
        density = np.clip((1.0 - outer) / 0.1, 0.0, 1.0) * np.clip((inner - 1.0) / 0.1, 0.0, 1.0)
    return np.round(255.0 * (1.0 - 0.9 * density)).astype(np.uint8)


def main(out: Path) -> None:
    """Write every sample file into ``out`` (created if needed)."""
    import imageio.v3 as iio

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    a, b, confidence, weights = make_spirals(rng)
    write_ply(out / "spiral_a.ply", a, {"confidence": confidence})
    write_ply(out / "spiral_b.ply", b)
    np.save(out / "spiral_a.npy", a.astype(np.float64))
    np.save(out / "spiral_b.npy", b.astype(np.float64))
    np.save(out / "spiral_a_weights.npy", weights)
    iio.imwrite(out / "blob_a.png", blob_image("ellipse"))
    iio.imwrite(out / "blob_b.png", blob_image("crescent"))
    total = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote sample data to {out} ({total / 1024:.0f} KiB)", file=sys.stderr)


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[1] / "sample_data"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)

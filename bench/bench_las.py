"""A large LAS lidar tile: ``geomreg register`` on subsamples, the full-resolution tile moved by ``--apply``.

Inputs, made here with laspy in a temporary folder (point format 3, LAS 1.2, scales 0.001):

- tile A: ``--points`` points (default 10,000,000; ``--quick``: 1,000,000) of a synthetic
  200 m x 200 m scene: ground (class 2) on smooth hills (sines and Gaussian bumps), box
  buildings with flat or gabled roofs and walls (class 6), tree crowns (class 5); intensity,
  return numbers, GPS time, scan angle, point source, user data and RGB from a seeded numpy
  generator. Header offset ``A_OFFSET`` (UTM-like); written in chunks of 10^6 points.
- tile B: an independent sample of the same scene (other random points, 0.9 x as many),
  moved by a known rigid motion (``TRUE_ROT`` about z, then small tilts about x and y, all
  about the tile's centre, then ``TRUE_SHIFT``), written with another header offset
  (``B_OFFSET``).

Frames. geomreg computes relative to A's header offset (docs/formats.md, LAS): a point is
``p = absolute - A_OFFSET``, B is rebased to A's offset too, and ``matrix`` in the JSON is T
with ``REG = T . p`` in those coordinates (``matrix_4x4`` is the same map in absolute
coordinates, ``translate(o) . T . translate(-o)``). The truth is built in the same frame:
``B_abs = A_OFFSET + R (p - c) + c + s`` with c the tile's centre, i.e. T_true = [R | c + s - R c].

Measured, one run each, each command as a child of a small wrapper process that reports
the command's own wall time and peak resident memory (``ru_maxrss`` from ``os.wait4``; the
wrapper is small, so the kernel's carry-over of the parent's peak across ``exec`` does not
inflate the figure), in this order:

1. start-up baseline: ``geomreg distance`` on two 100-point .npy clouds (imports, no LAS);
2. ``geomreg distance A.las B.las --sample N --blur BLUR --json`` (read + sample + divergence);
   if it fails, once more with ``--dtype float64``;
3. ``geomreg register A.las B.las --sample N --blur BLUR --apply A.las --apply-out moved.las --json``.

``--blur`` is a length in the files' units (README, ``geomreg register``); the default 10 m is
geomreg's 0.05 scaled to the 200 m tile. At geomreg's own default (0.05 m on this tile) the
Sinkhorn problems on 20 000 points about 1.4 m apart are near-permutations, far slower to solve.

Reported: wall times, geomreg's ``time_s`` and stage ``times``, CPU time, peak RSS; the fitted
matrix's rotation error (degrees), translation error (metres, and % of A's bounding-box
diagonal; both for T's translation column, whose origin is A's offset at the tile's corner,
and for the tile's centre), RMS and max distance of moved.las's points from A's points moved
by the true transform and by the fitted one (the latter checks ``--apply`` itself: at most
the 1 mm quantisation), point counts, every non-xyz dimension of moved.las against A's (raw
record fields, bit for bit), header offsets, scales, point format and version kept; and, as an
independent check, B's ground points taken back by the true T against the scene's ground
function, and the distances from 200,000 ground/building points of A, moved by the truth and
by the fit, to their nearest ground/building points of B (scipy's cKDTree; skipped without
scipy).
Results go to ``<out>/las_<device>[_quick].{json,md}``.

Usage: python bench/bench_las.py [--points 10000000] [--sample 20000] [--blur 10] [--quick] [--seed 0]
[--keep] [--tmp DIR] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import laspy
import numpy as np
import torch
from common import (
    REPO_ROOT,
    bench_main,
    console_script,
    finish_report,
    fmt_s,
    loadavg,
    log,
    machine_info,
    md_table,
)

from geomreg.api import versions

TILE = 200.0  # metres, side of the square tile
A_OFFSET = np.array([500000.0, 4000000.0, 100.0])
B_OFFSET = np.array([499870.0, 4000135.0, 80.0])  # another header offset for B
SCALES = np.array([0.001, 0.001, 0.001])
TRUE_ROT = (3.5, 0.8, -0.6)  # degrees about z, x, y (R = Rz . Rx . Ry)
TRUE_SHIFT = np.array([4.2, -2.7, 0.6])  # metres
CHUNK = 1_000_000
B_SHARE = 0.9

# The wrapper: spawns argv[2:], waits with os.wait4 and writes its child's wall time and
# rusage as JSON to argv[1]; the child inherits stdout and stderr.
WRAPPER = """
import json, os, sys, time
t0 = time.perf_counter()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as fh:
    json.dump({"wall_s": wall, "maxrss_kib": ru.ru_maxrss, "user_s": ru.ru_utime, "sys_s": ru.ru_stime,
               "exit_code": os.waitstatus_to_exitcode(status)}, fh)
sys.exit(0)
"""


# --------------------------------------------------------------------------- the scene


def ground(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Ground height (m, relative to A's offset) at (x, y): sines and Gaussian bumps."""
    z = 20.0 + 6.0 * np.sin(2 * np.pi * x / 260 + 0.4) * np.cos(2 * np.pi * y / 210 - 0.3)
    z += 2.5 * np.sin(2 * np.pi * (0.6 * x + 0.8 * y) / 95)
    for cx, cy, a, s in ((50.0, 140.0, 4.0, 25.0), (150.0, 60.0, -3.0, 30.0), (120.0, 170.0, 5.0, 20.0)):
        z += a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
    return z


def make_scene(seed: int) -> dict[str, np.ndarray]:
    """Buildings (x0, y0, x1, y1, base, height, gabled) that do not overlap, and trees (cx, cy, r, h)."""
    g = np.random.default_rng([seed, 1])
    boxes: list[list[float]] = []
    while len(boxes) < 14:
        w, d = g.uniform(8, 28, 2)
        x0, y0 = g.uniform(5, TILE - 5 - w), g.uniform(5, TILE - 5 - d)
        x1, y1 = x0 + w, y0 + d
        if any(x0 < b[2] + 4 and b[0] < x1 + 4 and y0 < b[3] + 4 and b[1] < y1 + 4 for b in boxes):
            continue
        base = float(ground(np.array((x0 + x1) / 2), np.array((y0 + y1) / 2)))
        boxes.append([x0, y0, x1, y1, base, g.uniform(5, 18), float(g.random() < 0.5)])
    trees: list[list[float]] = []
    while len(trees) < 60:
        cx, cy = g.uniform(0, TILE, 2)
        r = g.uniform(2, 5)
        if any(b[0] - r < cx < b[2] + r and b[1] - r < cy < b[3] + r for b in boxes):
            continue
        trees.append([cx, cy, r, g.uniform(5, 15)])
    return {"buildings": np.array(boxes), "trees": np.array(trees)}


def roof(b: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Roof height of building ``b`` at (x, y): flat, or gabled along x (ridge 0.4 x half-depth up)."""
    z = b[4] + b[5] + 0 * x
    if b[6]:
        half = (b[3] - b[1]) / 2
        z = z + 0.4 * (half - np.abs(y - (b[1] + half)))
    return z


def sample_scene(n: int, scene: dict[str, np.ndarray], g: np.random.Generator) -> dict[str, np.ndarray]:
    """``n`` points of the scene (relative to A's offset) with their classes and records."""
    boxes, trees = scene["buildings"], scene["trees"]
    n_wall = int(0.04 * n)
    n_top = n - n_wall
    x, y = g.uniform(0, TILE, n_top), g.uniform(0, TILE, n_top)
    z = ground(x, y) + g.normal(0, 0.02, n_top)
    cls = np.full(n_top, 2, np.uint8)
    ret = np.ones(n_top, np.uint8)
    nret = np.ones(n_top, np.uint8)
    for b in boxes:
        inside = (x >= b[0]) & (x < b[2]) & (y >= b[1]) & (y < b[3])
        z[inside] = roof(b, x[inside], y[inside]) + g.normal(0, 0.02, inside.sum())
        cls[inside] = 6
    for cx, cy, r, h in trees:
        d2 = ((x - cx) ** 2 + (y - cy) ** 2) / (r * r)
        hit = (d2 < 1) & (cls == 2) & (g.random(n_top) < 0.7)
        k = hit.sum()
        shape = np.sqrt(1 - d2[hit])
        z[hit] = ground(x[hit], y[hit]) + h * (0.35 + 0.65 * shape * g.uniform(0.6, 1.0, k))
        cls[hit] = 5
        nret[hit] = 3
        ret[hit] = g.integers(1, 4, k)
    # walls: a building by perimeter x height, a side by length, a point on it
    w, d = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    which = g.choice(len(boxes), n_wall, p=(w + d) * boxes[:, 5] / ((w + d) * boxes[:, 5]).sum())
    b = boxes[which]
    u = g.random(n_wall)
    along_x = g.random(n_wall) < w[which] / (w[which] + d[which])
    far = g.random(n_wall) < 0.5
    wx = np.where(along_x, b[:, 0] + u * (b[:, 2] - b[:, 0]), np.where(far, b[:, 2], b[:, 0]))
    wy = np.where(along_x, np.where(far, b[:, 3], b[:, 1]), b[:, 1] + u * (b[:, 3] - b[:, 1]))
    low = ground(wx, wy)
    wz = low + g.random(n_wall) * (b[:, 4] + b[:, 5] - low)
    wx, wy = wx + g.normal(0, 0.02, n_wall), wy + g.normal(0, 0.02, n_wall)
    xyz = np.concatenate([np.stack([x, y, z], 1), np.stack([wx, wy, wz], 1)])
    cls = np.concatenate([cls, np.full(n_wall, 6, np.uint8)])
    ret = np.concatenate([ret, np.ones(n_wall, np.uint8)])
    nret = np.concatenate([nret, np.ones(n_wall, np.uint8)])
    order = g.permutation(n)  # interleave classes, as a scan would
    base_intensity = np.select([cls == 2, cls == 5, cls == 6], [900, 400, 1600])
    return {
        "xyz": xyz[order], "classification": cls[order], "return_number": ret[order],
        "number_of_returns": nret[order],
        "intensity": np.clip(base_intensity[order] + g.normal(0, 150, n), 0, 65535).astype(np.uint16),
    }


def rotation(deg: tuple[float, float, float]) -> np.ndarray:
    """R = Rz(a) . Rx(b) . Ry(c), angles in degrees."""
    a, b, c = np.radians(deg)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    ry = np.array([[math.cos(c), 0, math.sin(c)], [0, 1, 0], [-math.sin(c), 0, math.cos(c)]])
    return rz @ rx @ ry


def true_transform() -> np.ndarray:
    """4 x 4 T_true, in A's offset frame: p -> R (p - c) + c + s, c the tile's centre at z = 20."""
    r, c = rotation(TRUE_ROT), np.array([TILE / 2, TILE / 2, 20.0])
    t = np.eye(4)
    t[:3, :3], t[:3, 3] = r, c + TRUE_SHIFT - r @ c
    return t


def write_tile(path: Path, n: int, offset: np.ndarray, scene: dict[str, np.ndarray], seed: int,
               motion: np.ndarray | None) -> None:
    """``n`` points of the scene, moved by ``motion`` (A's offset frame), as a LAS file with header ``offset``."""
    header = laspy.LasHeader(point_format=3, version="1.2")
    header.offsets, header.scales = offset, SCALES
    root = np.random.SeedSequence([seed, 2 if motion is not None else 3])
    with laspy.open(path, mode="w", header=header) as writer:
        for k, child in enumerate(root.spawn(math.ceil(n / CHUNK))):
            g = np.random.default_rng(child)
            m = min(CHUNK, n - k * CHUNK)
            pts = sample_scene(m, scene, g)
            xyz = pts.pop("xyz")
            if motion is not None:
                xyz = xyz @ motion[:3, :3].T + motion[:3, 3]
            xyz = xyz + A_OFFSET  # absolute coordinates; laspy subtracts this file's offset
            rec = laspy.ScaleAwarePointRecord.zeros(m, header=header)
            rec.x, rec.y, rec.z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
            for name, values in pts.items():
                rec[name] = values
            rec.gps_time = 3.0e8 + k * 100.0 + np.sort(g.random(m)) * 100.0
            rec.scan_angle_rank = g.integers(-20, 21, m)
            rec.point_source_id = g.integers(1, 5, m)
            rec.user_data = g.integers(0, 256, m)
            rec.red, rec.green, rec.blue = (g.integers(0, 65536, m) for _ in range(3))
            writer.write_points(rec)


# --------------------------------------------------------------------------- measuring


def run_measured(argv: list[str], folder: Path, tag: str) -> dict[str, Any]:
    """``argv`` under the wrapper: its wall time and rusage, its stdout parsed as JSON if it is."""
    usage = folder / f"rusage_{tag}.json"
    load = loadavg()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(usage), *argv], capture_output=True, text=True)
    outer = time.perf_counter() - t0
    out: dict[str, Any] = {"argv": argv, "outer_wall_s": outer, "load_before": load, "load_after": loadavg()}
    out.update(json.loads(usage.read_text()))
    out["peak_rss_mib"] = out["maxrss_kib"] / 1024
    try:
        out["json"] = json.loads(proc.stdout)
    except json.JSONDecodeError:
        out["stdout_tail"] = proc.stdout[-2000:]
    if out["exit_code"] != 0 or proc.returncode != 0:
        out["stderr_tail"] = proc.stderr[-4000:]
    log(f"{tag}: exit {out['exit_code']}, {out['wall_s']:.1f} s, peak RSS {out['peak_rss_mib']:.0f} MiB"
        + (f"\n{out['stderr_tail']}" if "stderr_tail" in out else ""))
    return out


def rotation_error_deg(r_fit: np.ndarray, r_true: np.ndarray) -> float:
    """Angle of R_fit^T . R_true, in degrees."""
    c = (np.trace(r_fit.T @ r_true) - 1) / 2
    return math.degrees(math.acos(min(1.0, max(-1.0, c))))


def conjugate(m: np.ndarray, o: np.ndarray) -> np.ndarray:
    """translate(o) . m . translate(-o)."""
    out = m.copy()
    out[:3, 3] = m[:3, 3] + o - m[:3, :3] @ o
    return out


def pose_errors(fit: dict[str, Any], truth: np.ndarray, diag: float) -> dict[str, Any]:
    """Rotation and translation errors of the fitted matrix (A's offset frame) against the truth."""
    m = np.asarray(fit["matrix"], dtype=np.float64)
    if m.shape != (4, 4):
        raise ValueError(f"matrix of shape {m.shape}")
    c = np.array([TILE / 2, TILE / 2, 20.0, 1.0])
    t_err = float(np.linalg.norm(m[:3, 3] - truth[:3, 3]))
    centre_err = float(np.linalg.norm((m @ c)[:3] - (truth @ c)[:3]))
    out = {"matrix": m.tolist(), "rotation_error_deg": rotation_error_deg(m[:3, :3], truth[:3, :3]),
           "translation_error_m": t_err, "translation_error_pct_diag": 100 * t_err / diag,
           "centre_error_m": centre_err, "centre_error_pct_diag": 100 * centre_err / diag}
    # the file-frame matrix must be the conjugate of ``matrix`` by A's offset (its translation
    # column is no measure of error: 1e-3 rad of rotation error moves it by km at UTM offsets)
    if "matrix_4x4" in fit:
        m4 = np.asarray(fit["matrix_4x4"], dtype=np.float64)
        out["matrix_4x4_vs_conjugate_max_abs"] = float(np.abs(m4 - conjugate(m, A_OFFSET)).max())
    return out


def relative_xyz(las: laspy.LasData) -> np.ndarray:
    """Absolute coordinates minus A's offset, float64 (N, 3)."""
    return np.stack([np.asarray(las.x) - A_OFFSET[0], np.asarray(las.y) - A_OFFSET[1],
                     np.asarray(las.z) - A_OFFSET[2]], axis=1)


def distances(p: np.ndarray, q: np.ndarray) -> dict[str, float]:
    d = np.sqrt(((p - q) ** 2).sum(1))
    return {"rms_m": float(np.sqrt((d * d).mean())), "max_m": float(d.max()), "median_m": float(np.median(d))}


def check_moved(a_path: Path, moved_path: Path, truth: np.ndarray, fit: np.ndarray | None) -> dict[str, Any]:
    """moved.las against A: geometry (truth and fit) and every other field, bit for bit."""
    a, b = laspy.read(a_path), laspy.read(moved_path)
    out: dict[str, Any] = {
        "points_a": int(a.header.point_count), "points_moved": int(b.header.point_count),
        "offsets_kept": bool(np.array_equal(a.header.offsets, b.header.offsets)),
        "scales_kept": bool(np.array_equal(a.header.scales, b.header.scales)),
        "format_kept": a.header.point_format.id == b.header.point_format.id
        and str(a.header.version) == str(b.header.version),
        "moved_offsets": b.header.offsets.tolist(),
    }
    out["count_equal"] = out["points_a"] == out["points_moved"] == len(b.points)
    if not out["count_equal"]:
        return out
    names = [n for n in a.points.array.dtype.names if n not in ("X", "Y", "Z")]
    differ = [n for n in names if not np.array_equal(a.points.array[n], b.points.array[n])]
    out.update(raw_fields=names, fields_differing=differ, other_dims_identical=not differ)
    pa, pb = relative_xyz(a), relative_xyz(b)
    del a, b
    out["vs_truth"] = distances(pb, pa @ truth[:3, :3].T + truth[:3, 3])
    if fit is not None:
        out["vs_fit"] = distances(pb, pa @ fit[:3, :3].T + fit[:3, 3])
    out["moved_by_median_m"] = float(np.median(np.sqrt(((pb - pa) ** 2).sum(1))))
    return out


def independent_checks(a_path: Path, b_path: Path, truth: np.ndarray, fit: np.ndarray, k: int,
                       seed: int) -> dict[str, Any]:
    """Checks of the truth and the fit that do not go through geomreg.

    - ``ground_truth_check``: B's ground points (class 2) taken back to A's frame by the
      inverse of the true T lie on the scene's ground: RMS and max of ``z - ground(x, y)``
      (the generator's noise is 0.02 m). A wrong truth (frame, offset) would show here.
    - ``nn_residual``: distances from ``k`` ground and building points of A (classes 2, 6),
      moved by the truth and by the fit, to their nearest ground or building point of B
      (scipy's cKDTree; skipped without scipy): the better pose has the smaller distances.
    """
    a, b = laspy.read(a_path), laspy.read(b_path)
    keep_a, keep_b = np.isin(a.classification, [2, 6]), np.isin(b.classification, [2, 6])
    ground_b = np.asarray(b.classification) == 2
    pa, pb = relative_xyz(a)[keep_a], relative_xyz(b)
    del a, b
    back = (pb[ground_b] - truth[:3, 3]) @ truth[:3, :3]  # R^T (p - t), row-wise
    dz = back[:, 2] - ground(back[:, 0], back[:, 1])
    out: dict[str, Any] = {"ground_truth_check": {"points": int(ground_b.sum()), "rms_m": float(np.sqrt((dz * dz).mean())),
                                                  "max_abs_m": float(np.abs(dz).max())}}
    pb = pb[keep_b]
    try:
        from scipy.spatial import cKDTree
    except ImportError:
        return out
    pa = pa[np.sort(np.random.default_rng(seed).choice(len(pa), min(k, len(pa)), replace=False))]
    tree = cKDTree(pb)
    nn: dict[str, Any] = {"points": len(pa), "b_points": len(pb)}
    for name, m in (("truth", truth), ("fit", fit)):
        d, _ = tree.query(pa @ m[:3, :3].T + m[:3, 3], workers=-1)
        nn[name] = {"median_m": float(np.median(d)), "rms_m": float(np.sqrt((d * d).mean())),
                    "mean_m": float(d.mean())}
    out["nn_residual"] = nn
    return out


def run(args: argparse.Namespace, device: torch.device, json_path: Path, md_path: Path) -> dict:
    geomreg = console_script("geomreg")
    start = time.perf_counter()
    n_b = round(B_SHARE * args.points)
    truth = true_transform()
    report: dict[str, Any] = {
        "machine": machine_info(device), "versions": versions(), "laspy": laspy.__version__,
        "points_a": args.points, "points_b": n_b, "sample": args.sample, "blur": args.blur, "seed": args.seed,
        "a_offset": A_OFFSET.tolist(), "b_offset": B_OFFSET.tolist(), "scales": SCALES.tolist(),
        "true_rotation_deg_zxy": list(TRUE_ROT), "true_shift_m": TRUE_SHIFT.tolist(),
        "true_matrix_a_frame": truth.tolist(), "true_matrix_abs_frame": conjugate(truth, A_OFFSET).tolist(),
        "load_start": loadavg(), "runs": {},
    }
    folder = Path(tempfile.mkdtemp(prefix="bench_las_", dir=args.tmp))
    report["folder"] = str(folder)
    try:
        a_path, b_path, moved = folder / "A.las", folder / "B.las", folder / "moved.las"
        scene = make_scene(args.seed)
        report["scene"] = {"buildings": len(scene["buildings"]), "trees": len(scene["trees"])}
        t0 = time.perf_counter()
        write_tile(a_path, args.points, A_OFFSET, scene, args.seed, None)
        write_tile(b_path, n_b, B_OFFSET, scene, args.seed, truth)
        report["generate_s"] = time.perf_counter() - t0
        report["file_mib"] = {p.name: p.stat().st_size / 2**20 for p in (a_path, b_path)}
        with laspy.open(a_path) as fh:
            mins, maxs = fh.header.mins, fh.header.maxs
        report["a_bbox_diag_m"] = diag = float(np.linalg.norm(np.asarray(maxs) - np.asarray(mins)))
        log(f"tiles written in {report['generate_s']:.0f} s: {report['file_mib']} MiB, A's diagonal {diag:.1f} m")

        small = [folder / "s0.npy", folder / "s1.npy"]
        g = np.random.default_rng(args.seed)
        for p in small:
            np.save(p, g.random((100, 3)))
        seed = ["--seed", str(args.seed), "--device", args.device]
        blur = ["--blur", str(args.blur)]
        report["runs"]["startup"] = run_measured([geomreg, "distance", *map(str, small), "--json", *seed],
                                                 folder, "startup")
        report["runs"]["distance"] = run_measured(
            [geomreg, "distance", str(a_path), str(b_path), "--sample", str(args.sample), *blur, "--json",
             *seed],
            folder, "distance")
        if report["runs"]["distance"]["exit_code"] != 0:  # the same in float64: the reading cost still shows
            report["runs"]["distance_f64"] = run_measured(
                [geomreg, "distance", str(a_path), str(b_path), "--sample", str(args.sample), *blur, "--dtype",
                 "float64", "--json", *seed], folder, "distance_f64")
        report["runs"]["register"] = reg = run_measured(
            [geomreg, "register", str(a_path), str(b_path), "--sample", str(args.sample), "--apply", str(a_path),
             "--apply-out", str(moved), *blur, "--json", *seed], folder, "register")
        fit = reg.get("json")
        if reg["exit_code"] == 0 and fit is not None:
            report["pose"] = pose_errors(fit, truth, diag)
            log(f"pose: rotation {report['pose']['rotation_error_deg']:.4f} deg, translation "
                f"{report['pose']['translation_error_m']:.4f} m")
        if moved.exists():
            m = np.asarray(fit["matrix"]) if fit is not None and "matrix" in fit else None
            report["moved"] = check_moved(a_path, moved, truth, m)
            report["file_mib"]["moved.las"] = moved.stat().st_size / 2**20
            log(f"moved.las: {json.dumps({k: v for k, v in report['moved'].items() if k != 'raw_fields'})}")
        if fit is not None and "matrix" in fit:
            report.update(independent_checks(a_path, b_path, truth, np.asarray(fit["matrix"]), 200_000, args.seed))
            log(f"independent checks: {report.get('ground_truth_check')}, {report.get('nn_residual')}")
    finally:
        if args.keep:
            log(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return finish_report(report, start, json_path, md_path, render)


# --------------------------------------------------------------------------- the report


def _stages(js: dict[str, Any] | None) -> str:
    if not js or not isinstance(js.get("times"), dict):
        return ""
    return ", ".join(f"{k} {fmt_s(v)}" for k, v in js["times"].items() if isinstance(v, (int, float)))


def render(report: dict) -> str:
    labels = {"startup": "start-up: `distance` of two 100-point .npy",
              "distance": f"`distance A B --sample {report['sample']} --blur {report['blur']:g}`",
              "distance_f64": f"`distance A B --sample {report['sample']} --blur {report['blur']:g} --dtype float64` "
                              "(run because the float32 one failed)",
              "register": f"`register A B --sample {report['sample']} --blur {report['blur']:g} --apply A "
                          "--apply-out moved.las`"}
    rows = []
    for key, r in report["runs"].items():
        js = r.get("json") or {}
        status = "ok" if r["exit_code"] == 0 else f"exit {r['exit_code']}: " + \
            (r.get("stderr_tail", "").strip().splitlines() or [""])[-1][:160]
        rows.append([labels[key], fmt_s(r["wall_s"]), fmt_s(js.get("time_s")), _stages(js) or "n/a",
                     fmt_s(r["user_s"] + r["sys_s"]), f"{r['peak_rss_mib']:.0f}", status])
    m = report["machine"]
    lines = [
        f"# LAS tile of {report['points_a']:,} points (B: {report['points_b']:,}), "
        f"register on {report['sample']:,}-point samples, full tile moved", "",
        f"- machine: {m.get('cpu_count')} CPUs ({m.get('device_name')}), torch {report['versions'].get('torch')}, "
        f"laspy {report['laspy']}; load average {report['load_start']} at the start, {report['load_end']} at the end",
        f"- tiles: A {report['file_mib'].get('A.las', 0):.0f} MiB, B {report['file_mib'].get('B.las', 0):.0f} MiB "
        f"(written in {report['generate_s']:.0f} s); truth: {report['true_rotation_deg_zxy']} deg about z, x, y "
        f"(about the tile's centre), shift {report['true_shift_m']} m; B's header offset differs from A's",
        "- one run each; wall time and peak RSS of the geomreg process (ru_maxrss from wait4 in a small "
        "wrapper); CPU = user + sys",
        "", md_table(["command", "wall (s)", "geomreg time_s", "stages (s)", "CPU (s)", "peak RSS (MiB)",
                      "result"], rows), ""]
    pose, mv = report.get("pose"), report.get("moved")
    checks = []
    if pose:
        checks += [
            ["rotation error", f"{pose['rotation_error_deg']:.4f} deg"],
            ["translation error (T's column, A's offset frame)",
             f"{pose['translation_error_m']:.4f} m ({pose['translation_error_pct_diag']:.4f} % of the "
             f"{report['a_bbox_diag_m']:.0f} m diagonal)"],
            ["error at the tile's centre", f"{pose['centre_error_m']:.4f} m ({pose['centre_error_pct_diag']:.4f} %)"],
        ]
        if "matrix_4x4_vs_conjugate_max_abs" in pose:
            checks.append(["`matrix_4x4` = conjugate of `matrix` by A's offset",
                           f"max abs difference {pose['matrix_4x4_vs_conjugate_max_abs']:.1e}"])
    if mv:
        checks += [["moved.las point count = A's", f"{mv['count_equal']} ({mv['points_moved']:,} / "
                                                   f"{mv['points_a']:,})"],
                   ["header offsets, scales, format kept",
                    f"{mv['offsets_kept']}, {mv['scales_kept']}, {mv['format_kept']}"]]
        if "other_dims_identical" in mv:
            checks += [
                ["every non-xyz field bit-identical to A's", f"{mv['other_dims_identical']}"
                 + (f" (differ: {', '.join(mv['fields_differing'])})" if mv["fields_differing"] else
                    f" ({len(mv['raw_fields'])} raw fields)")],
                ["moved.las vs A moved by the true T", f"RMS {mv['vs_truth']['rms_m']:.4f} m, max "
                                                        f"{mv['vs_truth']['max_m']:.4f} m"],
            ]
            if "vs_fit" in mv:
                checks.append(["moved.las vs A moved by the fitted T (`--apply` itself)",
                               f"RMS {mv['vs_fit']['rms_m'] * 1000:.3f} mm, max {mv['vs_fit']['max_m'] * 1000:.3f} mm"])
    gt, nn = report.get("ground_truth_check"), report.get("nn_residual")
    if gt:
        checks.append(["truth check: B's ground points taken back by the true T, z - ground(x, y)",
                       f"RMS {gt['rms_m'] * 1000:.1f} mm, max {gt['max_abs_m'] * 1000:.1f} mm "
                       f"({gt['points']:,} points; generator noise 20 mm)"])
    if nn:
        checks.append([f"distance of {nn['points']:,} ground/building points of A, moved, to B's nearest "
                       "ground/building point (median / RMS)",
                       f"true T {nn['truth']['median_m'] * 1000:.1f} / {nn['truth']['rms_m'] * 1000:.1f} mm; fitted T "
                       f"{nn['fit']['median_m'] * 1000:.1f} / {nn['fit']['rms_m'] * 1000:.1f} mm"])
    if not mv and report["runs"].get("register", {}).get("exit_code", 1) != 0:
        checks.append(["moved.las", "not written (register failed)"])
    if checks:
        lines += [md_table(["check", "value"], checks), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--points", type=int, default=10_000_000, help="points of tile A (B: 0.9 x as many)")
    p.add_argument("--sample", type=int, default=20000, help="--sample N of geomreg")
    p.add_argument("--blur", type=float, default=10.0,
                   help="--blur of geomreg, metres (default 10: 0.05 x the 200 m tile, see docs/registration.md)")
    p.add_argument("--quick", action="store_true", help="1,000,000 points")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (tiles, moved.las)")
    p.add_argument("--tmp", type=Path, default=None, help="where the temporary folder goes (default: the system's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.points = 1_000_000
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return bench_main("las", args, run, render)


if __name__ == "__main__":
    sys.exit(main())

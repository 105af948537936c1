"""Rigid registration of the Stanford bunny: geomreg register vs Open3D ICP and FGR.

Cases: the bunny (``--bunny``, default ../shared/data/clouds/trimesh/bunny.ply, 8171
points) centred and scaled to a bounding-box diagonal of 1 (its "size"). Each case draws
two independent subsamples of ``--points`` points (default 2000), the source and the
target, and moves the target by a known rigid motion: a rotation of each of ``--angles``
degrees (default 10 30 60 90) about a random axis, then a translation of random direction
and length uniform in [0, 0.2]. Variants of each motion (``--variants``): ``clean``;
``noise`` (gaussian, sigma 0.01, on the target); ``crop`` (30 to 50% of the target removed
by a random half-space); ``outliers`` (5% more target points, uniform in its bounding box);
``crop+noise+outliers``. Everything comes from ``--seed``: a motion depends only on its
angle, a case only on its angle and variant.

Methods, in turn on every case: ``geomreg.register(x, y, model="rigid", blur=0.05,
dtype="float64")`` (no initial guess); on the variants with a crop or outliers also with
``reach=0.05`` and weights 1/N on both clouds (``normalize=False``); Open3D ICP
point-to-point and point-to-plane from the identity; Open3D FGR on FPFH features of
voxel-downsampled clouds. Open3D's lengths are fractions of the size: ICP's correspondence
distance 0.1; a voxel of 0.02 at 2000 points, times sqrt(2000 / points) otherwise (as the
point spacing), for FGR's downsampling, the normals (2 voxels) and FPFH (5 voxels).

Per method and case: rotation error (the angle of R_est^T R_true, degrees), translation
error (|t_est - t_true|, as a fraction of the size), and the wall time of the whole call
(Open3D's conversions, normals, downsampling and features included). Goal: geomreg under
1 degree and 1% of the size on every case, including those where an ICP ends more than
10 degrees off. Every method runs once untimed on a small clean case before the first.
Results go to ``<out>/register_<device>.json`` (rewritten after every case) and
``<out>/register_<device>.md`` (``register_<device>_quick.*`` with ``--quick``); the
markdown is also printed to stdout, progress (and Open3D's messages) go to stderr. See
bench/README.md.

Usage: python bench/bench_register.py [--points 2000] [--angles 10 30 60 90] [--seed 0]
[--variants ...] [--threads T] [--quick] [--device cpu|cuda] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_scale import BUNNY, one_line
from common import REPO_ROOT, bench_main, fmt_s, loadavg, log, machine_info, md_table, median, timed

import geomreg
from geomreg.api import versions

BLUR, REACH = 0.05, 0.05  # geomreg: its default blur; the reach of the second configuration
MAX_SHIFT = 0.2  # translation length uniform in [0, MAX_SHIFT] (size = 1)
NOISE = 0.01  # gaussian sigma on the target
CROP = (0.3, 0.5)  # share of the target removed by a random half-space, uniform in this range
OUTLIERS = 0.05  # outliers added to the target, as a share of its points
VARIANTS = ("clean", "noise", "crop", "outliers", "crop+noise+outliers")
VOXEL = 0.02  # Open3D at 2000 points (x sqrt(2000 / points) otherwise, as the point spacing):
# FGR's voxel; normals within 2 voxels (point-to-plane ICP too), FPFH within 5, FGR distance 0.5
ICP_DIST, ICP_ITER = 0.1, 100  # Open3D ICP: largest correspondence distance, iterations
GOAL_DEG, GOAL_SHIFT = 1.0, 0.01  # "ok": under 1 degree and 1% of the size
ICP_FAR_DEG = 10.0  # an ICP "ends far off" beyond this rotation error
QUICK_ANGLES, QUICK_VARIANTS, QUICK_POINTS = [30.0, 90.0], ["clean", "crop"], 500
WARMUP_POINTS = 200

METHODS = {  # key: label (the order in which they run on each case)
    "geomreg": f"geomreg rigid, blur={BLUR}",
    "geomreg_reach": f"geomreg rigid, blur={BLUR}, reach={REACH}",
    "icp_p2p": "Open3D ICP point-to-point",
    "icp_p2l": "Open3D ICP point-to-plane",
    "fgr": "Open3D FGR (FPFH)",
}


# -- inputs ------------------------------------------------------------------------------


def load_bunny(path: Path) -> np.ndarray:
    """The bunny's points, centred (bounding-box centre) and scaled to a unit diagonal."""
    from geomreg.io import read_measure

    pts = np.asarray(read_measure(path).points, dtype=np.float64)
    lo, hi = pts.min(0), pts.max(0)
    return (pts - (lo + hi) / 2) / np.linalg.norm(hi - lo)


def rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """The rotation by ``degrees`` about the unit vector ``axis`` (Rodrigues)."""
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    th = math.radians(degrees)
    return np.eye(3) + math.sin(th) * k + (1.0 - math.cos(th)) * k @ k


def unit(rng: np.random.Generator) -> np.ndarray:
    """A direction uniform on the sphere."""
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def motion(angle: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(R, t)`` of one angle: a random axis, a random direction and length for t."""
    rng = np.random.default_rng([seed, round(angle * 1000)])
    rot = rotation(unit(rng), angle)
    return rot, unit(rng) * rng.uniform(0.0, MAX_SHIFT)


def make_case(bunny: np.ndarray, n: int, angle: float, variant: str, seed: int
              ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Source, target and a description of one case (the target as the true motion moves it)."""
    rot, shift = motion(angle, seed)
    rng = np.random.default_rng([seed, round(angle * 1000), VARIANTS.index(variant)])
    x = bunny[rng.choice(len(bunny), n, replace=False)]
    y = bunny[rng.choice(len(bunny), n, replace=False)]
    info: dict[str, Any] = {"angle_deg": angle, "variant": variant, "rotation": rot.tolist(),
                            "translation": shift.tolist(), "shift": float(np.linalg.norm(shift))}
    y = crop(y, variant, rng, info) @ rot.T + shift
    y = noise_and_outliers(y, variant, rng, NOISE, info)
    info["points"] = [len(x), len(y)]
    return x, y, info


def crop(y: np.ndarray, variant: str, rng: np.random.Generator, info: dict[str, Any]) -> np.ndarray:
    """With a crop in ``variant``: the points furthest along a random direction go (a share in CROP)."""
    if "crop" not in variant:
        return y
    share = rng.uniform(*CROP)
    order = np.argsort(y @ unit(rng))
    info["cropped_share"] = share
    return y[order[: len(y) - round(share * len(y))]]


def noise_and_outliers(y: np.ndarray, variant: str, rng: np.random.Generator, sigma: float,
                       info: dict[str, Any]) -> np.ndarray:
    """Gaussian noise of ``sigma`` and OUTLIERS uniform in the bounding box, as ``variant`` says."""
    if "noise" in variant:
        y = y + rng.normal(scale=sigma, size=y.shape)
        info["noise_sigma"] = sigma
    if "outliers" in variant:
        k = round(OUTLIERS * len(y))
        y = np.concatenate([y, rng.uniform(y.min(0), y.max(0), size=(k, 3))])
        info["outliers"] = k
    return y


# -- methods -----------------------------------------------------------------------------


def run_geomreg(x: np.ndarray, y: np.ndarray, device: str, reach: bool) -> tuple[np.ndarray, dict]:
    """geomreg.register, rigid, from the data alone; with ``reach``: weights 1/N on both sides."""
    kw: dict[str, Any] = {}
    if reach:
        n = len(x)
        kw = {"reach": REACH, "a": np.full(n, 1.0 / n), "b": np.full(len(y), 1.0 / n), "normalize": False}
    r = geomreg.register(x, y, model="rigid", blur=BLUR, dtype="float64", device=device, **kw)
    return r.matrix.detach().cpu().numpy(), {"value": float(r.value), "transported": float(r.transported),
                                             "start": r.start, "n_fits": r.n_fits}


def voxel(points: int) -> float:
    """Open3D's length scale for subsamples of ``points`` points (``VOXEL`` at 2000)."""
    return VOXEL * math.sqrt(2000 / points)


def o3d_cloud(p: np.ndarray, normals: float | None = None) -> Any:
    """An Open3D point cloud, with normals estimated within ``normals`` when given."""
    import open3d as o3d

    pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(p))
    if normals:
        pc.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=normals, max_nn=30))
    return pc


def run_icp(x: np.ndarray, y: np.ndarray, plane: bool) -> tuple[np.ndarray, dict]:
    """Open3D ICP from the identity (point-to-plane: the target's normals estimated first)."""
    from open3d.pipelines import registration as reg

    est = reg.TransformationEstimationPointToPlane() if plane else reg.TransformationEstimationPointToPoint()
    target = o3d_cloud(y, 2 * voxel(len(x)) if plane else None)
    r = reg.registration_icp(o3d_cloud(x), target, ICP_DIST, np.eye(4), est,
                             reg.ICPConvergenceCriteria(max_iteration=ICP_ITER))
    return np.asarray(r.transformation), {"fitness": r.fitness, "inlier_rmse": r.inlier_rmse}


def run_fgr(x: np.ndarray, y: np.ndarray, seed: int, vox: float | None = None) -> tuple[np.ndarray, dict]:
    """Open3D FGR on FPFH features of both clouds downsampled to voxels of ``vox`` (``voxel(N)``)."""
    import open3d as o3d
    from open3d.pipelines import registration as reg

    o3d.utility.random.seed(seed)
    vox = voxel(len(x)) if vox is None else vox
    down = [o3d_cloud(p).voxel_down_sample(vox) for p in (x, y)]
    for d in down:
        d.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(radius=2 * vox, max_nn=30))
    feats = [reg.compute_fpfh_feature(d, o3d.geometry.KDTreeSearchParamHybrid(radius=5 * vox, max_nn=100))
             for d in down]
    r = reg.registration_fgr_based_on_feature_matching(
        down[0], down[1], feats[0], feats[1],
        reg.FastGlobalRegistrationOption(maximum_correspondence_distance=0.5 * vox))
    return np.asarray(r.transformation), {"fitness": r.fitness, "inlier_rmse": r.inlier_rmse,
                                          "downsampled": [len(d.points) for d in down]}


def methods_for(variant: str, args: argparse.Namespace) -> dict[str, Callable[[np.ndarray, np.ndarray], Any]]:
    """The methods run on a variant (the reach configuration only with a crop or outliers)."""
    calls = {"geomreg": lambda x, y: run_geomreg(x, y, args.device, False),
             "geomreg_reach": lambda x, y: run_geomreg(x, y, args.device, True),
             "icp_p2p": lambda x, y: run_icp(x, y, False),
             "icp_p2l": lambda x, y: run_icp(x, y, True),
             "fgr": lambda x, y: run_fgr(x, y, args.seed)}
    if "crop" not in variant and "outliers" not in variant:
        del calls["geomreg_reach"]
    return calls


def errors(matrix: np.ndarray, rot: np.ndarray, shift: np.ndarray) -> tuple[float, float]:
    """Rotation error in degrees (angle of R_est^T R, from |R_est - R|) and translation error."""
    # |R_est - R|_F = 2 sqrt(2) sin(theta / 2): accurate for small angles, unlike the trace
    half = np.linalg.norm(matrix[:3, :3] - rot) / (2 * math.sqrt(2))
    return math.degrees(2 * math.asin(min(half, 1.0))), float(np.linalg.norm(matrix[:3, 3] - shift))


def is_ok(row: dict[str, Any]) -> bool:
    """Under both goals (a failed run is not)."""
    return row.get("rot_err_deg") is not None and row["rot_err_deg"] < GOAL_DEG \
        and row["trans_err"] < GOAL_SHIFT


# -- one case ----------------------------------------------------------------------------


def measure_case(bunny: np.ndarray, angle: float, variant: str, args: argparse.Namespace,
                 dev: torch.device) -> dict[str, Any]:
    """Every method once on one case, in turn."""
    load_before = loadavg()
    x, y, info = make_case(bunny, args.points, angle, variant, args.seed)
    rot, shift = np.array(info["rotation"]), np.array(info["translation"])
    log(f"{angle:g} deg, {variant} ({info['points'][0]} / {info['points'][1]} points, "
        f"|t| = {info['shift']:.3f}; load {load_before})")
    rows: dict[str, Any] = {}
    for key, call in methods_for(variant, args).items():
        try:
            t, (matrix, extra) = timed(lambda call=call: call(x, y), dev if key.startswith("geomreg")
                                       else torch.device("cpu"))
        except Exception as exc:  # noqa: BLE001 - recorded, the next method runs
            rows[key] = {"error": one_line(exc)}
            log(f"    {METHODS[key]:36s} failed: {rows[key]['error']}")
            continue
        rot_err, trans_err = errors(matrix, rot, shift)
        rows[key] = {"rot_err_deg": rot_err, "trans_err": trans_err, "time_s": t,
                     "matrix": matrix.tolist(), **extra}
        rows[key]["ok"] = is_ok(rows[key])
        log(f"    {METHODS[key]:36s} {rot_err:8.3f} deg  {100 * trans_err:7.3f} %  {t:8.3f} s"
            + ("" if rows[key]["ok"] else "  (over 1 deg or 1%)"))
    return {**info, "methods": rows, "loadavg_before": load_before, "loadavg_after": loadavg()}


def warm_up(bunny: np.ndarray, args: argparse.Namespace) -> dict[str, float | None]:
    """Every method once, untimed in the results, on a small clean case (imports, first calls)."""
    log(f"warm-up of every method on {WARMUP_POINTS} points ...")
    x, y, _ = make_case(bunny, WARMUP_POINTS, 30.0, "clean", args.seed + 1)
    out: dict[str, float | None] = {}
    for key, call in methods_for("crop", args).items():
        t0 = time.perf_counter()
        try:
            call(x, y)
            out[key] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - the measured run will say it again
            log(f"    {key}: {one_line(exc)}")
            out[key] = None
    return out


# -- real partial scans: the Stanford pair -----------------------------------------------

STANFORD = REPO_ROOT.parent / "shared" / "data" / "clouds" / "stanford"
STANFORD_ANGLES = [0.0, 45.0, 90.0, 150.0]  # extra turns of the target, random axes
STANFORD_GOAL_DEG, STANFORD_GOAL_SHIFT = 0.2, 0.002  # the goal on the real pair
STANFORD_METHODS = {
    "geomreg": f"geomreg rigid, blur={BLUR}",
    "fgr_icp": "Open3D FGR (FPFH) + point-to-plane ICP",
    "icp_p2l": "Open3D ICP point-to-plane",
    "small_gicp": "small_gicp GICP",
}


def run_small_gicp(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, dict]:
    """small_gicp's GICP from the identity (a local method, like ICP), on voxels of 1% of the size."""
    import small_gicp

    r = small_gicp.align(y, x, downsampling_resolution=0.01, max_correspondence_distance=ICP_DIST,
                         num_threads=torch.get_num_threads())
    return np.asarray(r.T_target_source), {"iterations": int(r.iterations)}


def load_stanford(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """bun045, bun000 and T (bun000 = T . bun045), scaled as one: bun000's box centred, diagonal 1."""
    x, y = np.loadtxt(folder / "bun045.xyz"), np.loadtxt(folder / "bun000.xyz")
    t = np.loadtxt(folder / "bun045_to_bun000.txt")
    lo, hi = y.min(0), y.max(0)
    centre, size = (lo + hi) / 2, np.linalg.norm(hi - lo)
    t_unit = np.eye(4)
    t_unit[:3, :3] = t[:3, :3]
    t_unit[:3, 3] = (t[:3, :3] @ centre + t[:3, 3] - centre) / size
    return (x - centre) / size, (y - centre) / size, t_unit


def run_fgr_icp(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, dict]:
    """Open3D FGR on voxels of 2% of the size, then point-to-plane ICP on the full clouds."""
    from open3d.pipelines import registration as reg

    vox = 0.02
    coarse, _ = run_fgr(x, y, seed, vox)
    fine = reg.registration_icp(o3d_cloud(x), o3d_cloud(y, 2 * vox), vox, coarse,
                                reg.TransformationEstimationPointToPlane(),
                                reg.ICPConvergenceCriteria(max_iteration=30))
    return np.asarray(fine.transformation), {"fitness": fine.fitness, "inlier_rmse": fine.inlier_rmse}


def stanford_case(x: np.ndarray, y: np.ndarray, t0: np.ndarray, angle: float, variant: str, seed: int):
    """The target turned by ``angle`` (about a random axis through its centre) and perturbed."""
    rng = np.random.default_rng([seed, 7, round(angle * 1000), VARIANTS.index(variant)])
    extra = rotation(unit(rng), angle)
    truth = np.eye(4)
    truth[:3, :3] = extra @ t0[:3, :3]
    truth[:3, 3] = extra @ t0[:3, 3]
    y = y @ extra.T
    info: dict[str, Any] = {"angle_deg": angle, "variant": variant}
    # a quarter of the bunny cases' noise
    y = noise_and_outliers(crop(y, variant, rng, info), variant, rng, NOISE / 4, info)
    info["points"] = [len(x), len(y)]
    return y, truth, info


def measure_stanford(args: argparse.Namespace, dev: torch.device) -> list[dict[str, Any]]:
    """Every method on the real pair from each extra turn, clean and cropped + noisy + outliers."""
    x, y0, t0 = load_stanford(args.stanford)
    calls = {"geomreg": lambda x, y: run_geomreg(x, y, args.device, False),
             "fgr_icp": lambda x, y: run_fgr_icp(x, y, args.seed),
             "icp_p2l": lambda x, y: run_icp(x, y, True)}
    try:
        import small_gicp  # noqa: F401 - optional: pip install small_gicp
        calls["small_gicp"] = run_small_gicp
    except ImportError:
        log("small_gicp is not installed: its column stays empty (pip install small_gicp)")
    for call in calls.values():  # warm-up: imports, first calls, compiled kernels
        call(x[::20], y0[::20])
    cases = []
    for angle in args.stanford_angles:
        for variant in ("clean", "crop+noise+outliers"):
            y, truth, info = stanford_case(x, y0, t0, angle, variant, args.seed)
            log(f"stanford {angle:g} deg, {variant} ({info['points'][0]} / {info['points'][1]} points)")
            rows: dict[str, Any] = {}
            for key, call in calls.items():
                try:
                    t, (matrix, extra) = timed(lambda call=call, y=y: call(x, y), dev if key == "geomreg"
                                               else torch.device("cpu"))
                except Exception as exc:  # noqa: BLE001 - recorded, the next method runs
                    rows[key] = {"error": one_line(exc)}
                    continue
                rot_err, trans_err = errors(matrix, truth[:3, :3], truth[:3, 3])
                clean = variant == "clean"
                goal = (STANFORD_GOAL_DEG, STANFORD_GOAL_SHIFT) if clean else (GOAL_DEG, GOAL_SHIFT)
                rows[key] = {"rot_err_deg": rot_err, "trans_err": trans_err, "time_s": t,
                             "ok": rot_err < goal[0] and trans_err < goal[1], **extra}
                log(f"    {STANFORD_METHODS[key]:40s} {rot_err:8.3f} deg  {100 * trans_err:7.3f} %  "
                    f"{t:7.3f} s")
            cases.append({**info, "methods": rows})
    return cases


def render_stanford(cases: list[dict[str, Any]]) -> list[str]:
    """The Stanford section of the report."""
    if not cases:
        return []
    out = ["## Real partial scans: Stanford bun045 -> bun000", "",
           f"Both scans whole (40 097 / 40 256 points, about 70% overlap), the target turned by the angle "
           f"about a random axis; ground truth from the Stanford .conf. ok: clean under "
           f"{STANFORD_GOAL_DEG:g} deg and {100 * STANFORD_GOAL_SHIFT:g}% of the size; crop+noise+outliers "
           f"(30-50% of the target removed by a half-space, gaussian noise of {NOISE / 4:g}, "
           f"{100 * OUTLIERS:g}% outliers) under {GOAL_DEG:g} deg and {100 * GOAL_SHIFT:g}%. Cells: rotation "
           "error (deg) / translation error (% of size) / time (s); bold: not ok.", ""]
    rows = [[f"{c['angle_deg']:g}", c["variant"]] + [cell(c["methods"].get(k)) for k in STANFORD_METHODS]
            for c in cases]
    out += [md_table(["turn (deg)", "variant"] + list(STANFORD_METHODS.values()), rows), ""]
    times = {k: [c["methods"][k]["time_s"] for c in cases if "time_s" in c["methods"].get(k, {})]
             for k in STANFORD_METHODS}
    if times["geomreg"] and times["fgr_icp"]:
        ratio = median(times["geomreg"]) / median(times["fgr_icp"])
        out += [f"Median time: geomreg {fmt_s(median(times['geomreg']))}, Open3D FGR + ICP "
                f"{fmt_s(median(times['fgr_icp']))}: ratio {ratio:.2f} (goal: at most 3).", ""]
    return out


# -- report ------------------------------------------------------------------------------


def summary(cases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: cases run, failures, cases under both goals, medians and maxima."""
    out = {}
    for key in METHODS:
        rows = [c["methods"][key] for c in cases if key in c["methods"]]
        done = [r for r in rows if "error" not in r]
        col = {f: [r[f] for r in done] for f in ("rot_err_deg", "trans_err", "time_s")}
        out[key] = {"cases": len(rows), "failed": len(rows) - len(done), "ok": sum(r["ok"] for r in done),
                    **{f"{f}_median": median(v) for f, v in col.items()},
                    **{f"{f}_max": max(v) if v else None for f, v in col.items()}}
    return out


def icp_far(case: dict[str, Any]) -> bool:
    """Whether an ICP ended more than ``ICP_FAR_DEG`` off on this case."""
    return any(case["methods"].get(k, {}).get("rot_err_deg", 0.0) > ICP_FAR_DEG
               for k in ("icp_p2p", "icp_p2l"))


def fmt_deg(v: float | None) -> str:
    """Degrees for a table cell."""
    return "n/a" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}" if v >= 0.1 else f"{v:.3f}")


def fmt_pct(v: float | None) -> str:
    """A fraction of the size, as a percentage for a table cell."""
    return "n/a" if v is None else fmt_deg(100 * v)


def goal_lines(cases: list[dict[str, Any]]) -> list[str]:
    """geomreg's two configurations against the goal, on every case and where ICP fails."""
    far = [c for c in cases if icp_far(c)]
    lines = []
    for key in ("geomreg", "geomreg_reach"):
        runs = [c for c in cases if key in c["methods"]]
        if not runs:
            continue
        ok = [c for c in runs if c["methods"][key].get("ok")]
        far_runs = [c for c in far if key in c["methods"]]
        far_ok = [c for c in far_runs if c["methods"][key].get("ok")]
        met = "met" if len(ok) == len(runs) else "not met"
        lines.append(f"{METHODS[key]}: under {GOAL_DEG:g} deg and {100 * GOAL_SHIFT:g}% on {len(ok)} of "
                     f"{len(runs)} cases ({met}); on the cases where an ICP ends more than "
                     f"{ICP_FAR_DEG:g} deg off: {len(far_ok)} of {len(far_runs)}")
    return lines


def cell(row: dict[str, Any] | None) -> str:
    """One method on one case: rotation error / translation error / time, bold when not ok."""
    if row is None:
        return ""
    if "error" in row:
        return "failed"
    errs = f"{fmt_deg(row['rot_err_deg'])} / {fmt_pct(row['trans_err'])}"
    return f"{errs if row['ok'] else f'**{errs}**'} / {fmt_s(row['time_s'])}"


def render(report: dict[str, Any]) -> str:
    """The markdown report: settings, goal, summary per method, per variant, every case."""
    m, cfg, cases = report["machine"], report["settings"], report["cases"]
    keys = [k for k in METHODS if any(k in c["methods"] for c in cases)]
    vox = voxel(cfg["points"])
    out = [
        f"# Rigid registration of the bunny: geomreg {report['versions']['geomreg']} vs Open3D "
        f"{report['versions'].get('open3d', '?')} ({cfg['device']})",
        "",
        f"- machine: {m['cpu_count']} CPUs, {m['device_name']} ({m['device']}), torch {m['torch']} "
        f"with {m['torch_num_threads']} threads; load average (1/5/15 min) {report['loadavg_before']} "
        f"at the start, {report.get('loadavg_after')} at the end",
        f"- inputs: {os.path.relpath(cfg['bunny'], REPO_ROOT)} ({cfg.get('bunny_points', 'no')} points) "
        "centred, bounding-box diagonal (the size) 1; source and target "
        f"independent subsamples of {cfg['points']} points; target moved by R (angles "
        f"{', '.join(f'{a:g}' for a in cfg['angles'])} deg about random axes) and t (|t| uniform "
        f"in [0, {MAX_SHIFT:g}]), seed {cfg['seed']}",
        f"- variants: noise = gaussian sigma {NOISE:g} on the target; crop = {100 * CROP[0]:g} to "
        f"{100 * CROP[1]:g}% of the target removed by a random half-space; outliers = "
        f"{100 * OUTLIERS:g}% more target points, uniform in its bounding box",
        f"- Open3D: ICP from the identity, correspondences within {ICP_DIST:g}, {ICP_ITER} iterations "
        f"at most, point-to-plane with normals within {2 * vox:.3g}; FGR on clouds downsampled to "
        f"voxels of {vox:.3g}, FPFH within {5 * vox:.3g}, correspondence distance {0.5 * vox:.3g}",
        "- errors: rotation = angle of R_est^T R_true (deg); translation = |t_est - t_true| in % of "
        f"the size; ok = under {GOAL_DEG:g} deg and {100 * GOAL_SHIFT:g}%",
        "- times: one run per method and case, the methods in turn on each case, after one untimed "
        "warm-up each on a small case; the whole call (Open3D's normals, downsampling, features "
        f"included); total benchmark time {report['total_s']:.0f} s",
        "",
    ]
    loads = [lv[0] for c in cases for lv in (c["loadavg_before"], c["loadavg_after"]) if lv]
    if loads and m["cpu_count"] and max(loads) > m["cpu_count"] + 1:
        out += [f"**Load average up to {max(loads):g} on {m['cpu_count']} CPUs: other processes shared "
                "the CPU, the times are not worth comparing (bench/README.md, Noise).**", ""]
    out += [f"- {s}" for s in report["skipped"]] + ([""] if report["skipped"] else [])
    if not cases:
        return "\n".join(out + ["(no case measured)"])

    out += ["## Goal (printed, not asserted)", ""] + [f"- {g}" for g in goal_lines(cases)] + [""]

    out += ["## Summary per method", ""]
    s = report["summary"]
    rows = [[METHODS[k], s[k]["cases"], f"{s[k]['ok']} / {s[k]['cases']}", s[k]["failed"],
             fmt_deg(s[k]["rot_err_deg_median"]), fmt_deg(s[k]["rot_err_deg_max"]),
             fmt_pct(s[k]["trans_err_median"]), fmt_pct(s[k]["trans_err_max"]),
             fmt_s(s[k]["time_s_median"]), fmt_s(s[k]["time_s_max"])] for k in keys]
    out += [md_table(["method", "cases", "ok", "failed", "rot. err median (deg)", "rot. err max (deg)",
                      "transl. err median (%)", "transl. err max (%)", "time median (s)", "time max (s)"],
                     rows), ""]

    out += ["## Cases ok per variant", ""]
    rows = []
    for v in cfg["variants"]:
        group = [c for c in cases if c["variant"] == v]
        rows.append([v] + [f"{sum(c['methods'][k].get('ok', False) for c in group if k in c['methods'])} / "
                           f"{sum(k in c['methods'] for c in group)}"
                           if any(k in c["methods"] for c in group) else "" for k in keys])
    out += [md_table(["variant"] + [METHODS[k] for k in keys], rows), ""]

    out += ["## Every case: rotation error (deg) / translation error (% of size) / time (s); bold: "
            "not ok", ""]
    rows = [[f"{c['angle_deg']:g}", c["variant"], f"{c['points'][0]} / {c['points'][1]}"]
            + [cell(c["methods"].get(k)) for k in keys] for c in cases]
    out += [md_table(["angle (deg)", "variant", "points (source / target)"] + [METHODS[k] for k in keys],
                     rows), ""]
    fails = [f"- {c['angle_deg']:g} deg {c['variant']}, {METHODS[k]}: {r['error']}"
             for c in cases for k, r in c["methods"].items() if "error" in r]
    return "\n".join(out + fails + ([""] if fails else []) + render_stanford(report.get("stanford", [])))


# -- driver ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--points", type=int, default=2000, help="points of each subsample (source, target)")
    ap.add_argument("--angles", type=float, nargs="+", default=[10.0, 30.0, 60.0, 90.0],
                    help="rotation angles in degrees, one random axis each")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                    help="perturbations of each motion")
    ap.add_argument("--seed", type=int, default=0, help="seed of the motions, subsamples and perturbations")
    ap.add_argument("--bunny", type=Path, default=BUNNY, help="the bunny scan (PLY)")
    ap.add_argument("--stanford", type=Path, default=STANFORD,
                    help="folder of the Stanford scans bun045.xyz, bun000.xyz and their ground truth")
    ap.add_argument("--stanford-angles", type=float, nargs="*", default=STANFORD_ANGLES,
                    help="extra turns of the real target (none: skip the real pair)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own choice)")
    ap.add_argument("--device", default="cpu", help="geomreg's device: cpu, cuda or cuda:K (Open3D: CPU)")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results", help="output folder")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke test: angles {QUICK_ANGLES[0]:g} and {QUICK_ANGLES[1]:g}, variants "
                         f"{' and '.join(QUICK_VARIANTS)}, {QUICK_POINTS} points")
    args = ap.parse_args(argv)
    if args.quick:
        args.angles, args.variants, args.points = QUICK_ANGLES, QUICK_VARIANTS, QUICK_POINTS
        args.stanford_angles = args.stanford_angles[:1] if args.stanford_angles else []
    if args.points < 10 or (args.threads is not None and args.threads < 1):
        ap.error("--points must be >= 10, --threads >= 1")
    if not all(0 <= a <= 180 for a in args.angles) or args.seed < 0:
        ap.error("--angles must be in [0, 180] degrees, --seed >= 0")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        ap.error(f"--device must be cpu, cuda or cuda:K, not {args.device!r}")
    return args


def run(args: argparse.Namespace, dev: torch.device, json_path: Path, md_path: Path) -> dict[str, Any]:
    """Every case in turn (angles, then variants); the outputs are rewritten after each."""
    t_start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import open3d as o3d

    o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
    report: dict[str, Any] = {
        "benchmark": "bench/bench_register.py",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "settings": {"points": args.points, "angles": args.angles, "variants": args.variants,
                     "seed": args.seed, "bunny": str(args.bunny), "device": args.device,
                     "threads": args.threads, "quick": args.quick, "blur": BLUR, "reach": REACH,
                     "max_shift": MAX_SHIFT, "noise": NOISE, "crop": CROP, "outliers": OUTLIERS,
                     "voxel": voxel(args.points), "icp_dist": ICP_DIST, "icp_iter": ICP_ITER,
                     "goal_deg": GOAL_DEG, "goal_shift": GOAL_SHIFT, "icp_far_deg": ICP_FAR_DEG},
        "versions": {**versions(), "open3d": o3d.__version__},
        "machine": machine_info(dev),
        "loadavg_before": loadavg(),
        "skipped": [],
        "cases": [],
    }

    def save() -> None:
        report["summary"] = summary(report["cases"])
        report["total_s"] = time.perf_counter() - t_start
        json_path.write_text(json.dumps(report, indent=1, default=str))
        md_path.write_text(render(report) + "\n")

    if not args.bunny.is_file():
        msg = f"every case skipped: no file {args.bunny} (see ../shared/data/README.md)"
        log(msg)
        report["skipped"].append(msg)
    else:
        bunny = load_bunny(args.bunny)
        report["settings"]["bunny_points"] = len(bunny)
        if args.points > len(bunny):
            raise SystemExit(f"--points {args.points}: the bunny has only {len(bunny)} points")
        report["warmup_s"] = warm_up(bunny, args)
        for angle in args.angles:
            for variant in args.variants:
                report["cases"].append(measure_case(bunny, angle, variant, args, dev))
                save()
    if args.stanford_angles and (args.stanford / "bun045.xyz").is_file():
        report["stanford"] = measure_stanford(args, dev)
    elif args.stanford_angles:
        report["skipped"].append(f"the real pair skipped: no {args.stanford / 'bun045.xyz'}")
    report["loadavg_after"] = loadavg()
    save()
    return report


def main(argv: list[str] | None = None) -> int:
    return bench_main("register", parse_args(argv), run, render)


if __name__ == "__main__":
    sys.exit(main())

"""geomreg's grid backend on density images and volumes, against GeomLoss's grid solver.

Cases: image pairs of ``--sizes`` (N x N pixels; default 256, 512, 1024) made by resizing a
real pair (``--pair``, default the crescents of ../shared/data/images/geomloss) with PIL,
density = 1 - gray / 255 (two synthetic sums of gaussian blobs when the files are absent),
and volume pairs of ``--volume-sizes`` (N^3 voxels; default 128), two synthetic sums of
gaussian blobs with different centres. p = 2, float32, scaling = 0.5 throughout. On each:

0. References: geomreg grid with ``tol=--ref-tol`` (1e-6), at blur 0.05 and at blur 1.5/N
   (``--fine-px 1``: 1/N, one pixel; likewise below),
   float64 while the pixels number at most ``--ref-float64-max`` (512^2), float32 above.
1. Same work, blur 1.5/N: geomreg grid ``tol=inf, diameter=1`` (GeomLoss's epsilon
   schedule, nothing more) against GeomLoss 0.3.1 ``sinkhorn_divergence`` (its grid solver):
   times, ratio geomreg / GeomLoss, values and each one's error against the reference.
2. Converged: geomreg grid at its default tol = 1e-3, at blur 0.05 and at blur 1.5/N:
   time, iterations, error.
3. Grid vs points: geomreg's point backends (``auto``) on the same measure given as a
   weighted cloud of its pixels with mass, blur 0.05, while the grid has at most
   ``--points-max`` nodes (256^2): time, value, ratio grid / points.
4. Peak memory (VmHWM) of a fresh child process running one converged grid run (blur 0.05)
   per case, beside a child that only imports, to show memory O(pixels).

Timings: median of ``--repeats`` runs (default 3), the configurations alternated run by run
after one untimed warm-up each (full size while the grid has at most 512^2 nodes; with
``--quick``, and always before the first case, on small grids); a run longer than
``--max-seconds`` is not repeated. The load average is recorded before and after each case.
Results go to ``<out>/grid_<device>.json`` (rewritten after every case) and
``<out>/grid_<device>.md`` (``grid_<device>_quick.*`` with ``--quick``); the markdown is
also printed to stdout, progress goes to stderr. See bench/README.md.

Usage: python bench/bench_grid.py [--sizes 256 512 1024] [--volume-sizes 128] [--repeats 3]
[--fine-px 1.5] [--quick] [--no-geomloss] [--device cpu|cuda] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_scale import Config, fmt_mib, one_line, peak_rss_kib, run_once
from common import (
    REPO_ROOT,
    bench_main,
    fmt_err,
    fmt_ratio,
    fmt_s,
    loadavg,
    log,
    machine_info,
    md_table,
    median,
    rel_err,
    time_command,
    timed,
)

import geomreg
from geomreg._stdio import stdout_to_stderr
from geomreg.api import versions
from geomreg.io import read_measure
from geomreg.measure import Measure

SCALING, BLUR = 0.5, 0.05  # GeomLoss's default scaling; geomreg's default blur
FINE = 1.5  # the "fine" blur is FINE / N (--fine-px): GeomLoss's grid solver wants 1/N <= blur < 2/N
DATA = REPO_ROOT.parent / "shared" / "data"
PAIR = "crescent"
BLOBS = 3  # gaussian blobs per synthetic density
BLOB_SIGMA = 0.08
BLOB_CUT = 0.01  # synthetic densities below this fraction of their maximum are set to 0
QUICK_SIZES, QUICK_VOLUMES = [64, 128], [16]
WARMUP_FULL_MAX = 512 * 512  # full-size warm-up up to this many nodes; above, small grids only
GOAL_SAME_SIZE, GOAL_SAME = 512, 1.0  # same work at 512^2: geomreg / GeomLoss <= 1
GOAL_CONV_SIZE, GOAL_CONV_S = 1024, 10.0  # a converged 1024^2 pair in under 10 s
GOAL_MEM_SPREAD = 2.0  # "O(pixels)": bytes per pixel over baseline within this factor...
GOAL_MEM_MIN = 256 * 256  # ...over the image cases of at least this many pixels (fixed costs below)


# -- inputs ------------------------------------------------------------------------------


def blobs(n: int, dim: int, seed: int) -> np.ndarray:
    """A sum of ``BLOBS`` gaussian blobs on an ``n^dim`` grid of [0, 1]^dim (float64, >= 0).

    Centres uniform in [0.2, 0.8]^dim and weights in [0.5, 1] from ``seed``; values below
    ``BLOB_CUT`` times the maximum are set to 0, so that the density has a support.
    """
    rng = np.random.default_rng(seed)
    axis = (np.arange(n) + 0.5) / n
    mesh = np.meshgrid(*([axis] * dim), indexing="ij")
    out = np.zeros((n,) * dim)
    for _ in range(BLOBS):
        centre, weight = rng.uniform(0.2, 0.8, dim), rng.uniform(0.5, 1.0)
        d2 = sum((m - c) ** 2 for m, c in zip(mesh, centre, strict=True))
        out += weight * np.exp(-d2 / (2 * BLOB_SIGMA**2))
    out[out < BLOB_CUT * out.max()] = 0.0
    return out


def image_density(path: Path, n: int) -> np.ndarray:
    """A PNG resized to n x n (bicubic, in gray), as density 1 - gray / 255, top row first."""
    from PIL import Image

    with Image.open(path) as im:
        gray = im.convert("L").resize((n, n), Image.Resampling.BICUBIC)
    return np.clip(1.0 - np.asarray(gray, dtype=np.float64) / 255.0, 0.0, None)


def case_arrays(kind: str, n: int, data: Path, pair: str, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The two density arrays of a case, and where they come from."""
    if kind == "image":
        files = [data / "images" / "geomloss" / f"{pair}_{s}.png" for s in "ab"]
        if all(f.is_file() for f in files):
            a, b = (image_density(f, n) for f in files)
            shown = [os.path.relpath(f, REPO_ROOT) for f in files]
            return a, b, f"{shown[0]} and {shown[1]}, resized to {n}^2"
        a, b = blobs(n, 2, seed), blobs(n, 2, seed + 1)
        return a, b, f"synthetic blobs (no files {files[0]}, {files[1]})"
    a, b = blobs(n, 3, seed), blobs(n, 3, seed + 1)
    return a, b, f"synthetic blobs, seeds {seed} and {seed + 1}"


def to_measures(a: np.ndarray, b: np.ndarray) -> tuple[Measure, Measure]:
    """Both arrays as geomreg measures with their grid, through ``read_measure`` on .npy files."""
    with tempfile.TemporaryDirectory() as tmp:
        out = []
        for name, arr in (("a", a), ("b", b)):
            path = Path(tmp) / f"{name}.npy"
            np.save(path, arr)
            out.append(read_measure(path, as_image=arr.ndim == 2))
    return out[0], out[1]


# -- configurations ----------------------------------------------------------------------


class GeomregCall:
    """``geomreg.divergence`` on two measures; keeps the grid backend's last report (None elsewhere)."""

    def __init__(self, **kw: Any) -> None:
        self.kw = kw
        self.report: dict[str, Any] | None = None

    def __call__(self, x: Any, y: Any) -> Any:
        r = geomreg.divergence(x, y, **self.kw)
        self.report = r.grid
        return r


def make_configs(n: int, nodes: int, geomloss_inputs: tuple[torch.Tensor, torch.Tensor] | None,
                 args: argparse.Namespace) -> list[Config]:
    """The configurations of one case, in the order they alternate."""
    fine = FINE / n
    base = {"p": 2, "scaling": SCALING, "dtype": "float32", "device": args.device}
    grid = {**base, "backend": "grid"}
    configs = [Config("geomreg_same", "geomreg", f"grid, tol=inf, diameter=1, blur={FINE:g}/N",
                      {"blur": fine, "tol": "inf", "diameter": 1.0}, GeomregCall(
                          blur=fine, tol=math.inf, diameter=1.0, **grid), same_work="grid")]
    if geomloss_inputs is not None:
        from geomloss import sinkhorn_divergence

        ga, gb = geomloss_inputs
        configs.append(Config("geomloss_same", "GeomLoss", f"sinkhorn_divergence, blur={FINE:g}/N",
                              {"blur": fine, "scaling": SCALING},
                              lambda x, y: sinkhorn_divergence(ga, gb, p=2, blur=fine, scaling=SCALING),
                              same_work="grid"))
    configs.append(Config("geomreg_conv_blur", "geomreg", f"grid, tol=1e-3, blur={BLUR}",
                          {"blur": BLUR, "tol": 1e-3}, GeomregCall(blur=BLUR, **grid)))
    if nodes <= args.fine_max:  # converging at a blur of 1.5 pixels takes hundreds of iterations
        configs.append(Config("geomreg_conv_fine", "geomreg", f"grid, tol=1e-3, blur={FINE:g}/N",
                              {"blur": fine, "tol": 1e-3}, GeomregCall(blur=fine, **grid)))
    if nodes <= args.points_max:
        configs.append(Config("geomreg_points", "geomreg", f"points, backend=auto, blur={BLUR}",
                              {"blur": BLUR, "tol": 1e-3, "backend": "auto"},
                              GeomregCall(blur=BLUR, **base)))
    return configs


def ref_key(c: Config) -> str:
    """Which reference a configuration is compared with: ``blur`` (0.05) or ``fine`` (FINE/N)."""
    return "blur" if c.params["blur"] == BLUR else "fine"


# -- one case ----------------------------------------------------------------------------


def reference(mu: Measure, nu: Measure, blur: float, nodes: int, args: argparse.Namespace,
              dev: torch.device) -> dict[str, Any]:
    """geomreg grid at ``tol=--ref-tol``: the "converged" value the errors are measured from."""
    dtype = "float64" if nodes <= args.ref_float64_max else "float32"
    log(f"    reference: blur={blur:.4g}, {dtype}, tol={args.ref_tol:g} ...")
    try:
        t, r = timed(lambda: geomreg.divergence(
            mu, nu, p=2, blur=blur, scaling=SCALING, tol=args.ref_tol, max_iter=args.ref_max_iter,
            backend="grid", dtype=dtype, device=args.device), dev)
    except Exception as exc:  # noqa: BLE001 - the case goes on without errors
        log(f"    reference failed: {one_line(exc)}")
        return {"value": None, "blur": blur, "dtype": dtype, "error": one_line(exc)}
    value = float(r.value.detach().cpu())
    log(f"    S = {value:.8g} ({r.n_iter} iterations, marginal error {fmt_err(r.marginal_error)}, "
        f"{t:.1f} s){'' if r.converged else '  NOT CONVERGED'}")
    return {"value": value, "blur": blur, "dtype": dtype, "tol": args.ref_tol,
            "max_iter": args.ref_max_iter, "time_s": t, "n_iter": r.n_iter,
            "marginal_error": r.marginal_error, "converged": r.converged, "grid": r.grid}


def load_case(kind: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Arrays, measures, pixel clouds and GeomLoss's tensors of one case."""
    a, b, source = case_arrays(kind, n, args.data, args.pair, args.seed)
    mu, nu = to_measures(a, b)
    case: dict[str, Any] = {"source": source, "mu": mu, "nu": nu,
                            "points": (Measure(mu.points, mu.weights), Measure(nu.points, nu.weights)),
                            "geomloss": None, "geomloss_note": None}
    if args.no_geomloss:
        case["geomloss_note"] = "--no-geomloss"
    elif n & (n - 1):
        case["geomloss_note"] = f"N = {n} is not a power of two (GeomLoss's grid solver needs one)"
    else:
        dev = torch.device(args.device)
        case["geomloss"] = tuple(
            torch.tensor(arr / arr.sum(), dtype=torch.float32, device=dev)[None, None] for arr in (a, b))
    return case


def summarise(c: Config, refs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One configuration's runs as a JSON row, with its error against its reference."""
    ref_value = refs[ref_key(c)]["value"]
    value = c.values[-1] if c.values else None
    row = {"tool": c.tool, "label": c.label, "params": c.params, "same_work": c.same_work,
           "reference": ref_key(c), "times_s": c.times, "median_s": median(c.times),
           "runs": len(c.times), "values": c.values, "value": value,
           "rel_err": rel_err(value, ref_value) if ref_value else None, "error": c.error,
           "warmup_s": c.warmup_s, "not_repeated_over_s": args.max_seconds if c.capped else None,
           **c.info}
    if isinstance(c.call, GeomregCall):
        row["grid"] = c.call.report
    return row


def timed_round(c: Config, r: int, measures: tuple[Measure, Measure], clouds: tuple[Measure, Measure],
                refs: dict[str, Any], args: argparse.Namespace, dev: torch.device) -> None:
    """Run ``c`` once in round ``r`` (0: warm-up, forgotten unless over --max-seconds)."""
    t = run_once(c, *(clouds if c.key == "geomreg_points" else measures), dev)
    if t is None:  # failed: run_once logged and recorded it
        return
    c.capped = t > args.max_seconds  # too long to run again: this run is its only one
    ref_value = refs[ref_key(c)]["value"]
    err = fmt_err(rel_err(c.values[-1], ref_value) if ref_value else None)
    what = "warm-up " if r == 0 else f"run {r}/{args.repeats}"
    log(f"    {what}  {c.tool:8s} {c.label:38s} {t:8.3f} s  rel.err {err}"
        + ("  (too long: not run again)" if c.capped else ""))
    if r == 0:
        c.warmup_s = t
        if not c.capped:
            c.times, c.values = [], []


def measure_case(kind: str, n: int, args: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    """References, then the alternated timed runs of every configuration, on one case."""
    t_case = time.perf_counter()
    load_before = loadavg()
    name = f"{kind} {n}^{2 if kind == 'image' else 3}"
    nodes = n ** (2 if kind == "image" else 3)
    log(f"{name} ({nodes} nodes; load {load_before}, {args.repeats} timed run(s) per configuration)")
    case = load_case(kind, n, args)
    mu, nu = case["mu"], case["nu"]
    log(f"    inputs: {case['source']}; {mu.n} and {nu.n} nodes with mass")
    refs = {"blur": reference(mu, nu, BLUR, nodes, args, dev)}
    if nodes <= args.fine_max:
        refs["fine"] = reference(mu, nu, FINE / n, nodes, args, dev)
    else:
        refs["fine"] = {"value": None, "blur": FINE / n,
                        "skipped": f"more than --fine-max {args.fine_max} nodes"}
        log(f"    reference at blur {FINE:g}/N skipped (more than --fine-max {args.fine_max} nodes)")
    configs = make_configs(n, nodes, case["geomloss"], args)
    warm = nodes <= WARMUP_FULL_MAX and not args.quick
    for r in range(0 if warm else 1, args.repeats + 1):  # round 0: the untimed warm-up
        for c in configs:
            if not (c.error or c.capped):
                timed_round(c, r, (mu, nu), case["points"], refs, args, dev)
    rows = {c.key: summarise(c, refs, args) for c in configs}
    return {"case": name, "kind": kind, "n": n, "nodes": nodes, "blur_fine": FINE / n,
            "inputs": case["source"], "nodes_with_mass": [mu.n, nu.n],
            "geomloss_note": case["geomloss_note"], "repeats": args.repeats,
            "loadavg_before": load_before, "loadavg_after": loadavg(), "references": refs,
            "configs": rows, "time_s": time.perf_counter() - t_case}


def warm_up_small(args: argparse.Namespace, dev: torch.device) -> None:
    """Every configuration once on small grids (an 8^2 image, a 4^3 volume): lazy imports, KeOps."""
    log("warm-up of every configuration on small grids ...")
    for kind, n in (("image", 8), ("volume", 4)):
        case = load_case(kind, n, args)
        for c in make_configs(n, 0, case["geomloss"], args):
            run_once(c, *(case["points"] if c.key == "geomreg_points" else (case["mu"], case["nu"])), dev)


# -- peak memory in child processes --------------------------------------------------------


def child_main(spec_text: str) -> int:
    """Run one converged grid run (or nothing: the baseline); write the peak memory as JSON."""
    from PIL import Image  # noqa: F401 - the baseline holds every module the runs import

    spec = json.loads(spec_text)
    out: dict[str, Any] = {}
    try:
        with stdout_to_stderr():
            if spec["what"] == "grid":
                dev = torch.device(spec["device"])
                a, b, _ = case_arrays(spec["kind"], spec["n"], Path(spec["data"]), spec["pair"],
                                      spec["seed"])
                mu, nu = to_measures(a, b)
                del a, b
                t, r = timed(lambda: geomreg.divergence(
                    mu, nu, p=2, blur=BLUR, scaling=SCALING, backend="grid", dtype="float32",
                    device=spec["device"]), dev)
                out.update(time_s=t, value=float(r.value.detach().cpu()), n_iter=r.n_iter,
                           converged=r.converged)
                if dev.type == "cuda":
                    out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out["error"] = one_line(exc)
    out["peak_rss_kib"], out["peak_rss_source"] = peak_rss_kib()
    Path(spec["result"]).write_text(json.dumps(out))
    return 0


def measure_memory(args: argparse.Namespace, cases: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """Peak resident memory of a baseline child, then of one child per case."""
    base = {"device": args.device, "data": str(args.data), "pair": args.pair, "seed": args.seed}
    specs = [{"what": "baseline", **base}] + [{"what": "grid", "kind": k, "n": n, **base} for k, n in cases]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(specs):
            spec["result"] = str(Path(tmp) / f"child{i}.json")
            if spec["what"] == "baseline":
                label, nodes = "baseline (imports torch, numpy, PIL, geomreg)", None
            else:
                nodes = spec["n"] ** (2 if spec["kind"] == "image" else 3)
                label = f"grid {spec['kind']} {spec['n']}^{2 if spec['kind'] == 'image' else 3}, " \
                        f"blur={BLUR}, tol=1e-3"
            log(f"memory: {label} in a child process ...")
            run = time_command([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                               1)
            res: dict[str, Any] = {"label": label, "spec": spec, "nodes": nodes,
                                   "wall_s": run["median_s"], "returncode": run["returncodes"][0]}
            try:
                res.update(json.loads(Path(spec["result"]).read_text()))
            except (OSError, ValueError):
                tail = run.get("error_tail", "").strip().splitlines()
                res["error"] = f"child exited {res['returncode']}: {tail[-1] if tail else 'no output'}"[:300]
            log(f"    peak RSS {fmt_mib(res.get('peak_rss_kib'))} MiB"
                + (f", {res['time_s']:.1f} s" if res.get("time_s") else "")
                + (f"  ({res['error']})" if res.get("error") else ""))
            out.append(res)
    kib0 = out[0].get("peak_rss_kib")
    for res in out[1:]:
        kib = res.get("peak_rss_kib")
        if kib is not None and kib0 is not None:
            res["over_baseline_kib"] = kib - kib0
            res["bytes_per_node_over_baseline"] = (kib - kib0) * 1024 / res["nodes"]
    return out


# -- report ------------------------------------------------------------------------------


def goal_cell(ok: bool | None) -> str:
    """Whether a goal is met, for a table cell."""
    return "" if ok is None else ("met" if ok else "not met")


def goals(report: dict[str, Any]) -> list[str]:
    """Each goal with what this run measured of it (printed, not asserted)."""
    lines = []
    same = [c for c in report["cases"] if c["kind"] == "image" and c["n"] == GOAL_SAME_SIZE]
    ratios = [fmt_ratio(c["configs"]["geomreg_same"]["median_s"],
                        c["configs"].get("geomloss_same", {}).get("median_s")) for c in same]
    lines.append(f"geomreg no slower than GeomLoss's grid solver at {GOAL_SAME_SIZE}^2, blur {FINE:g}/N, "
                 f"scaling 0.5 (ratio <= {GOAL_SAME:g}): "
                 + (f"ratio {', '.join(ratios)}" if same else f"not measured (no {GOAL_SAME_SIZE}^2 case)"))
    conv = [c for c in report["cases"] if c["kind"] == "image" and c["n"] == GOAL_CONV_SIZE]
    cells = [f"{c['configs'][k]['label'].split(', ')[-1]}: {fmt_s(c['configs'][k]['median_s'])} s"
             for c in conv for k in ("geomreg_conv_blur", "geomreg_conv_fine") if k in c["configs"]]
    lines.append(f"a converged {GOAL_CONV_SIZE}^2 pair (tol 1e-3) in under {GOAL_CONV_S:g} s: "
                 + ("; ".join(cells) if conv else f"not measured (no {GOAL_CONV_SIZE}^2 case)"))
    per = {r["spec"]["n"]: r["bytes_per_node_over_baseline"] for r in report["memory"]
           if r.get("bytes_per_node_over_baseline") and r["spec"].get("kind") == "image"}
    shown = ", ".join(f"{v:.0f} at {n}^2" for n, v in sorted(per.items()))
    big = [v for n, v in per.items() if n * n >= GOAL_MEM_MIN]
    if len(big) >= 2:
        spread = max(big) / min(big)
        lines.append(f"memory O(pixels), i.e. about as many bytes per pixel (over the baseline) at every "
                     f"size from {GOAL_MEM_MIN} pixels on: {shown}; largest / smallest = {spread:.2f} "
                     f"(within {GOAL_MEM_SPREAD:g}x: {goal_cell(spread <= GOAL_MEM_SPREAD)})")
    else:
        seen = f"; bytes per pixel over the baseline: {shown}" if shown else ""
        lines.append(f"memory O(pixels): not judged (needs two image sizes of at least {GOAL_MEM_MIN} "
                     f"pixels; below, fixed costs dominate){seen}")
    return lines


def render(report: dict[str, Any]) -> str:
    """The markdown report: machine facts, goals, then one table per measure."""
    m, cfg, cases = report["machine"], report["settings"], report["cases"]
    warm = "on small grids: --quick" if cfg["quick"] else \
        f"full size up to {WARMUP_FULL_MAX} nodes, small grids only above"
    out = [
        f"# Grid backend: geomreg {report['versions']['geomreg']} vs GeomLoss "
        f"{report['versions'].get('geomloss', '(skipped)')} grid solver ({cfg['device']})",
        "",
        f"- machine: {m['cpu_count']} CPUs, {m['device_name']} ({m['device']}), torch {m['torch']} "
        f"with {m['torch_num_threads']} threads; load average (1/5/15 min) "
        f"{report['loadavg_before']} at the start, {report.get('loadavg_after')} at the end",
        f"- images: {cfg['pair']} pair resized with PIL (density = 1 - gray/255; synthetic blobs "
        f"when absent); volumes: two sums of {BLOBS} gaussian blobs; p=2, float32, scaling={SCALING}",
        f"- times: median of {cfg['repeats']} run(s), configurations alternated run by run after one "
        f"untimed warm-up each ({warm}); a run over {cfg['max_seconds']:g} s is not repeated",
        f"- references: geomreg grid, tol={cfg['ref_tol']:g} (float64 up to {cfg['ref_float64_max']} "
        "nodes, float32 above); rel. err = |S / S_ref - 1| against the reference of the same blur; "
        "ratio = geomreg / GeomLoss (< 1: geomreg faster)",
        f"- total benchmark time: {report['total_s']:.0f} s",
        "",
    ]
    loads = [lv[0] for lv in (report["loadavg_before"], report.get("loadavg_after"))
             + tuple(x for c in cases for x in (c["loadavg_before"], c["loadavg_after"])) if lv]
    # the benchmark itself keeps every CPU busy (torch threads): a load above CPUs + 1 means
    # at least one other busy process
    if loads and m["cpu_count"] and max(loads) > m["cpu_count"] + 1:
        out += [f"**The load average reached {max(loads):g} on {m['cpu_count']} CPUs during this run: "
                "other processes competed for the CPU and the timings are not worth reading "
                "(bench/README.md, Noise).**", ""]
    out += [f"- {s}" for s in report["skipped"]] + ([""] if report["skipped"] else [])
    out += ["## Goals (printed, not asserted)", ""]
    out += [f"- {g}" for g in goals(report)] + [""]

    out += [f"## 1. Same work: blur {FINE:g}/N, scaling 0.5, GeomLoss's schedule (geomreg tol=inf, "
            "diameter=1)", ""]
    rows = []
    for c in cases:
        gr, gl = c["configs"]["geomreg_same"], c["configs"].get("geomloss_same")
        goal = c["kind"] == "image" and c["n"] == GOAL_SAME_SIZE
        ratio = gr["median_s"] / gl["median_s"] if gl and gr["median_s"] and gl["median_s"] else None
        rows.append([c["case"], f"{c['blur_fine']:.4g}", gr.get("n_iter", "n/a"),
                     fmt_s(gr["median_s"]) if not gr["error"] else "failed",
                     (fmt_s(gl["median_s"]) if not gl["error"] else "failed") if gl else "not run",
                     fmt_ratio(gr["median_s"], gl["median_s"] if gl else None),
                     f"<= {GOAL_SAME:g} ({goal_cell(ratio <= GOAL_SAME if ratio else None)})" if goal else "",
                     f"{gr['value']:.6g}" if gr["value"] is not None else "n/a",
                     f"{gl['value']:.6g}" if gl and gl["value"] is not None else "n/a",
                     fmt_err(gr["rel_err"]), fmt_err(gl["rel_err"]) if gl else "n/a"])
    out += [md_table(["case", "blur", "geomreg iterations", "geomreg (s)", "GeomLoss (s)", "ratio",
                      "goal", "geomreg S", "GeomLoss S", "geomreg rel. err", "GeomLoss rel. err"], rows), ""]
    out += [f"- {c['case']}: GeomLoss not run: {c['geomloss_note']}" for c in cases if c["geomloss_note"]]
    out += [""] if any(c["geomloss_note"] for c in cases) else []

    out += ["## 2. Converged: geomreg grid at its default tol = 1e-3", ""]
    rows = []
    for c in cases:
        for k in ("geomreg_conv_blur", "geomreg_conv_fine"):
            if k not in c["configs"]:
                continue
            r = c["configs"][k]
            goal = c["kind"] == "image" and c["n"] == GOAL_CONV_SIZE
            t = r["median_s"]
            rows.append([c["case"], f"{r['params']['blur']:.4g}", fmt_s(t) if not r["error"] else "failed",
                         r.get("n_iter", "n/a"), fmt_err(r.get("marginal_error")), fmt_err(r["rel_err"]),
                         f"< {GOAL_CONV_S:g} s ({goal_cell(t < GOAL_CONV_S if t else None)})" if goal else "",
                         r["error"] or ""])
    out += [md_table(["case", "blur", "median (s)", "iterations", "marginal err.", "rel. err", "goal",
                      "note"], rows), ""]

    out += [f"## 3. Grid vs points at blur {BLUR}: the same measure as a cloud of its pixels with mass", ""]
    rows = []
    for c in cases:
        pt, gr = c["configs"].get("geomreg_points"), c["configs"]["geomreg_conv_blur"]
        if pt is None:
            continue
        rows.append([c["case"], " / ".join(str(k) for k in c["nodes_with_mass"]), pt.get("backend", "n/a"),
                     fmt_s(pt["median_s"]) if not pt["error"] else "failed", pt.get("n_iter", "n/a"),
                     fmt_err(pt["rel_err"]), fmt_s(gr["median_s"]), fmt_ratio(gr["median_s"], pt["median_s"]),
                     pt["error"] or ""])
    out += [md_table(["case", "points (a / b)", "point backend", "points (s)", "iterations",
                      "points rel. err", "grid (s)", "ratio grid / points", "note"], rows)
            if rows else f"(no case with at most {cfg['points_max']} nodes)", ""]

    out += ["## 4. References (and the load during each case)", ""]
    rows = []
    for c in cases:
        for r in c["references"].values():
            if r.get("skipped"):
                rows.append([c["case"], f"{r['blur']:.4g}", "", "", "", "", "skipped", "", r["skipped"]])
                continue
            if r["value"] is None:
                rows.append([c["case"], f"{r['blur']:.4g}", r["dtype"], "", "", "", "failed", "",
                             r["error"]])
                continue
            rows.append([c["case"], f"{r['blur']:.4g}", r["dtype"], r["n_iter"], fmt_err(r["marginal_error"]),
                         "yes" if r["converged"] else "no", f"{r['value']:.8g}", fmt_s(r["time_s"]),
                         f"{c['loadavg_before']} -> {c['loadavg_after']}"])
    out += [md_table(["case", "blur", "dtype", "iterations", "marginal err.", "converged", "S_ref",
                      "time (s)", "load before -> after"], rows), ""]
    out += [f"- {c['case']}: {c['inputs']}" for c in cases] + [""]

    out += [f"## 5. Peak memory of a fresh child process (VmHWM): one converged grid run, blur {BLUR}", ""]
    rows = []
    for r in report["memory"]:
        over = r.get("over_baseline_kib")
        per = r.get("bytes_per_node_over_baseline")
        rows.append([r["label"], r["nodes"] or "", fmt_mib(r.get("peak_rss_kib")),
                     "" if over is None else f"{over / 1024:.0f}", "" if per is None else f"{per:.0f}",
                     fmt_s(r.get("time_s")) if r.get("time_s") else "",
                     f"{r['value']:.7g}" if r.get("value") is not None else "", r.get("error", "")])
    out += [md_table(["process", "nodes", "peak RSS (MiB)", "over baseline (MiB)",
                      "over baseline per node (bytes)", "time (s)", "S", "note"], rows)
            if rows else "(skipped)", ""]
    return "\n".join(out)


# -- driver ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[256, 512, 1024],
                    help="image sides N (N x N pixels)")
    ap.add_argument("--volume-sizes", type=int, nargs="*", default=[128],
                    help="volume sides N (N^3 voxels); none: no volume case")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration")
    ap.add_argument("--max-seconds", type=float, default=300.0,
                    help="a configuration whose single run takes longer is not repeated")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results", help="output folder")
    ap.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    ap.add_argument("--pair", default=PAIR, help="image pair <data>/images/geomloss/<pair>_{a,b}.png")
    ap.add_argument("--seed", type=int, default=0, help="seed of the synthetic blobs")
    ap.add_argument("--ref-tol", type=float, default=1e-6, help="tolerance of the references")
    ap.add_argument("--ref-max-iter", type=int, default=2000,
                    help="iteration cap of the references (float32 may stall above --ref-tol)")
    ap.add_argument("--ref-float64-max", type=int, default=512 * 512,
                    help="references run in float64 up to this many grid nodes, float32 above")
    ap.add_argument("--points-max", type=int, default=256 * 256,
                    help="time the point backends on grids of at most this many nodes")
    ap.add_argument("--fine-max", type=int, default=256 * 256,
                    help="converge at the fine blur (and compute its reference) on grids of at most this "
                    "many nodes: at that blur Sinkhorn needs hundreds of iterations")
    ap.add_argument("--fine-px", type=float, default=FINE,
                    help="the fine blur in pixels (blur = FINE_PX / N); 1 is GeomLoss's smallest")
    ap.add_argument("--no-geomloss", action="store_true", help="time geomreg alone")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke test: images {QUICK_SIZES[0]}^2 and {QUICK_SIZES[1]}^2, a "
                         f"{QUICK_VOLUMES[0]}^3 volume, 1 repeat, warm-up on small grids only")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: memory child
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.volume_sizes, args.repeats = QUICK_SIZES, QUICK_VOLUMES, 1
    if any(n < 2 for n in args.sizes + args.volume_sizes) or args.repeats < 1:
        ap.error("sizes must be >= 2, repeats >= 1")
    if not args.sizes and not args.volume_sizes:
        ap.error("nothing to measure: give --sizes or --volume-sizes")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        ap.error(f"--device must be cpu, cuda or cuda:K, not {args.device!r}")
    return args


def run(args: argparse.Namespace, dev: torch.device, json_path: Path, md_path: Path) -> dict[str, Any]:
    """Every case in turn, then the memory children; the outputs are rewritten after each case."""
    t_start = time.perf_counter()
    vers = versions()
    if not args.no_geomloss:
        import geomloss

        vers["geomloss"] = geomloss.__version__
    report: dict[str, Any] = {
        "benchmark": "bench/bench_grid.py",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "settings": {"sizes": args.sizes, "volume_sizes": args.volume_sizes, "repeats": args.repeats,
                     "max_seconds": args.max_seconds, "device": args.device, "dtype": "float32",
                     "p": 2, "scaling": SCALING, "blur": BLUR, "blur_fine": f"{FINE:g}/N",
                     "data": str(args.data), "pair": args.pair, "seed": args.seed,
                     "ref_tol": args.ref_tol, "ref_max_iter": args.ref_max_iter,
                     "ref_float64_max": args.ref_float64_max, "points_max": args.points_max,
                     "fine_max": args.fine_max,
                     "no_geomloss": args.no_geomloss, "quick": args.quick},
        "versions": vers,
        "machine": machine_info(dev),
        "loadavg_before": loadavg(),
        "skipped": [],
        "cases": [],
        "memory": [],
    }
    log(f"{report['machine']['cpu_count']} CPUs ({report['machine']['device_name']}), load average "
        f"{report['loadavg_before']}; torch {report['machine']['torch']}")

    def save() -> None:
        report["total_s"] = time.perf_counter() - t_start
        json_path.write_text(json.dumps(report, indent=1, default=str))
        md_path.write_text(render(report) + "\n")

    warm_up_small(args, dev)
    cases = [("image", n) for n in sorted(set(args.sizes))] + \
        [("volume", n) for n in sorted(set(args.volume_sizes))]
    for kind, n in cases:
        try:
            report["cases"].append(measure_case(kind, n, args, dev))
        except Exception as exc:  # noqa: BLE001 - e.g. unreadable inputs: the next case runs
            msg = f"{kind} {n}: skipped ({one_line(exc)})"
            log(msg)
            report["skipped"].append(msg)
        save()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    report["memory"] = measure_memory(args, cases)
    report["loadavg_after"] = loadavg()
    save()
    return report


def main(argv: list[str] | None = None) -> int:
    global FINE
    args = parse_args(argv)
    FINE = args.fine_px
    if args.child is not None:
        return child_main(args.child)
    return bench_main("grid", args, run, render)


if __name__ == "__main__":
    sys.exit(main())

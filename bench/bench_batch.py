"""200 small distance jobs: ``geomreg batch`` against 200 separate ``geomreg distance`` processes.

Inputs: ``--jobs`` pairs (default 200) of uniform 3-D clouds of ``--points`` points each
(default 1000), written as .npy files in a temporary folder, one manifest row each
(``command=distance``, default options). Measured, one run each, in this order:

- the for-loop a user would write: ``geomreg distance A B --json`` once per pair, one after
  the other (``--separate K`` runs only the first K and says so; the full figure is then
  K's time scaled to all jobs, marked as such);
- ``geomreg batch jobs.csv --out r.jsonl --workers W`` for each W of ``--workers`` (default
  1 and 2), the whole command (the local Dask cluster's start included), each time on a
  fresh RESULTS file.

Reported: wall times, jobs per second, batch's speed-up over the loop (goal: at least 5),
the largest relative difference between the values of the two ways (they run the same
code), and the machine's load. Results go to ``<out>/batch_<device>.{json,md}``.

Usage: python bench/bench_batch.py [--jobs 200] [--points 1000] [--workers 1 2] [--separate K]
[--quick] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def make_jobs(folder: Path, jobs: int, points: int, seed: int) -> Path:
    """The clouds and the manifest; returns the manifest's path."""
    rng = np.random.default_rng(seed)
    rows = ["id,command,a,b"]
    for k in range(jobs):
        np.save(folder / f"a{k}.npy", rng.random((points, 3)))
        np.save(folder / f"b{k}.npy", rng.random((points, 3)) + [0.1, 0.0, 0.0])
        rows.append(f"job{k},distance,a{k}.npy,b{k}.npy")
    manifest = folder / "jobs.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def run(args: argparse.Namespace, device: torch.device, json_path: Path, md_path: Path) -> dict:
    geomreg = console_script("geomreg")
    start = time.perf_counter()
    report: dict[str, Any] = {"machine": machine_info(device), "versions": versions(), "jobs": args.jobs,
                              "points": args.points, "load_start": loadavg(), "batch": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest = make_jobs(folder, args.jobs, args.points, args.seed)
        loop_n = min(args.separate or args.jobs, args.jobs)
        values: dict[str, float] = {}
        t0 = time.perf_counter()
        for k in range(loop_n):
            proc = subprocess.run([geomreg, "distance", str(folder / f"a{k}.npy"), str(folder / f"b{k}.npy"),
                                   "--json"], capture_output=True, text=True, check=True)
            values[f"job{k}"] = json.loads(proc.stdout)["value"]
        loop_s = time.perf_counter() - t0
        report["loop"] = {"ran": loop_n, "wall_s": loop_s, "per_job_s": loop_s / loop_n,
                          "all_jobs_s": loop_s / loop_n * args.jobs, "scaled": loop_n < args.jobs}
        log(f"loop: {loop_n} processes in {loop_s:.1f} s ({loop_s / loop_n:.2f} s each)")
        for w in args.workers:
            out = folder / f"r{w}.jsonl"
            t0 = time.perf_counter()
            proc = subprocess.run([geomreg, "batch", str(manifest), "--out", str(out), "--workers", str(w),
                                   "--json"], capture_output=True, text=True)
            wall = time.perf_counter() - t0
            records = [json.loads(x) for x in out.read_text().splitlines()]
            ok = [r for r in records if r["status"] == "ok"]
            diff = max((abs(r["result"]["value"] - values[r["id"]]) / abs(values[r["id"]])
                        for r in ok if r["id"] in values), default=None)
            row = {"workers": w, "wall_s": wall, "ok": len(ok), "exit_code": proc.returncode,
                   "jobs_per_s": args.jobs / wall, "speedup": report["loop"]["all_jobs_s"] / wall,
                   "max_rel_diff": diff, "job_s_median": float(np.median([r["time_s"] for r in ok]))}
            report["batch"].append(row)
            log(f"batch, {w} workers: {wall:.1f} s, {row['jobs_per_s']:.1f} jobs/s, x{row['speedup']:.1f}")
    return finish_report(report, start, json_path, md_path, render)


def render(report: dict) -> str:
    loop = report["loop"]
    note = f" (measured on {loop['ran']}, scaled)" if loop["scaled"] else ""
    rows = [["for-loop of `geomreg distance`", "1 process at a time", fmt_s(loop["all_jobs_s"]) + note,
             f"{report['jobs'] / loop['all_jobs_s']:.2f}", "1", ""]]
    for r in report["batch"]:
        diff = "n/a" if r["max_rel_diff"] is None else f"{r['max_rel_diff']:.1e}"
        rows.append(["`geomreg batch`", f"{r['workers']} workers", fmt_s(r["wall_s"]),
                     f"{r['jobs_per_s']:.2f}", f"{r['speedup']:.1f}", f"{r['ok']} ok, values {diff}"])
    m = report["machine"]
    return "\n".join([
        f"# {report['jobs']} distance jobs of {report['points']} points: batch vs separate processes", "",
        f"- machine: {m.get('cpu_count')} CPUs, torch {report['versions'].get('torch')}; load average "
        f"{report['load_start']} at the start, {report['load_end']} at the end",
        "- one run each; batch's time includes starting its local Dask cluster; goal: speed-up >= 5",
        "", md_table(["way", "workers", f"wall time for {report['jobs']} jobs (s)", "jobs/s", "speed-up",
                      "check (largest relative difference from the loop's values)"], rows), ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--points", type=int, default=1000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--separate", type=int, default=None, help="run only this many separate processes")
    p.add_argument("--quick", action="store_true", help="40 jobs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.jobs = 40
    return bench_main("batch", args, run, render)


if __name__ == "__main__":
    sys.exit(main())

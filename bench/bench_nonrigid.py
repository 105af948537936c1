"""Non-rigid registration: geomreg match and flow on probreg's fish and bunny pairs.

Pairs (../shared/data/clouds/probreg): ``fish`` (fish_source.txt -> fish_target.txt, 2-D,
91 points each) and ``bunny`` (bunny-x.txt -> bunny-y.txt, 3-D, 8171 points each; ``--quick``
and ``--bunny-points`` subsample both, with ``--seed``). Each pair is moved and scaled as one
(the same shift and factor for both clouds) so that their joint bounding box has a diagonal
of 1; blur 0.05 is then 5% of the size.

Per pair: the Sinkhorn divergence S (blur 0.05, float64) before; after ``geomreg.match``
(one transport map) and after ``geomreg.flow`` (its defaults: lr 0.2, at most 50 steps,
stop below 0.1% decrease) and after the same flow run cold (``warm_start=False``: every
step solved from the top of the epsilon schedule and differentiated by autograd, as earlier
versions did; skipped with ``--no-cold``), one after the other in this process; the
symmetric chamfer distance (mean distance of each point to the other cloud, both ways,
averaged; a number that does not come from the loss); and the wall time of each call, one
run each. ``--dtype`` (default float64) is the precision of match and the flows; every S is
computed in float64. With ``--plots``, the flow of the fish is drawn to
``<out>/nonrigid_fish_flow.png``.

Usage: python bench/bench_nonrigid.py [--quick] [--bunny-points N] [--dtype float32|float64]
[--no-cold] [--plots] [--out bench/results]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import REPO_ROOT, bench_main, finish_report, fmt_s, loadavg, log, machine_info, md_table

import geomreg
from geomreg.api import versions

DATA = REPO_ROOT.parent / "shared" / "data" / "clouds" / "probreg"
BLUR = 0.05
PAIRS = {"fish": ("fish_source.txt", "fish_target.txt"), "bunny": ("bunny-x.txt", "bunny-y.txt")}


def load_pair(name: str, points: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Both clouds of a pair, moved and scaled as one to a joint bounding-box diagonal of 1."""
    from geomreg.io import read_measure

    x, y = (np.asarray(read_measure(DATA / f).points, dtype=np.float64) for f in PAIRS[name])
    if points is not None and points < len(x):
        rng = np.random.default_rng(seed)
        x = x[rng.choice(len(x), points, replace=False)]
        y = y[rng.choice(len(y), points, replace=False)]
    both = np.concatenate([x, y])
    lo, hi = both.min(0), both.max(0)
    centre, size = (lo + hi) / 2, np.linalg.norm(hi - lo)
    return (x - centre) / size, (y - centre) / size


def chamfer(x: np.ndarray, y: np.ndarray) -> float:
    """Mean distance of each point to the other cloud, averaged over both directions."""
    from geomreg.surface import nearest

    tx, ty = torch.as_tensor(x), torch.as_tensor(y)
    return 0.5 * float(nearest(ty, tx)[1].mean() + nearest(tx, ty)[1].mean())


def divergence(x: Any, y: np.ndarray) -> float:
    """The Sinkhorn divergence in float64 (every S of the table, whatever ``--dtype``)."""
    return geomreg.divergence(x, y, blur=BLUR, dtype="float64").value.item()


def run_pair(name: str, x: np.ndarray, y: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"pair": name, "points": [len(x), len(y)], "dim": x.shape[1],
                           "S_before": divergence(x, y), "chamfer_before": chamfer(x, y)}
    t0 = time.perf_counter()
    m = geomreg.match(x, y, blur=BLUR, dtype=args.dtype)
    row["match_s"] = time.perf_counter() - t0
    moved = m.registered.detach().cpu().double().numpy()
    row["S_match"], row["chamfer_match"] = divergence(moved, y), chamfer(moved, y)
    snapshots: list[tuple[int, np.ndarray]] = []

    def keep(step, points):
        snapshots.append((step.index, points.detach().cpu().double().numpy().copy()))

    t0 = time.perf_counter()
    f = geomreg.flow(x, y, blur=BLUR, dtype=args.dtype, on_step=keep)
    row["flow_s"] = time.perf_counter() - t0
    end = f.points.detach().cpu().double().numpy()
    row.update(S_flow=divergence(end, y), chamfer_flow=chamfer(end, y), flow_steps=len(f.steps) - 1,
               flow_stopped=f.stopped, flow_iterations=sum(s.n_iter for s in f.steps),
               flow_warm_steps=None)
    if not args.no_cold:  # the same flow as earlier versions ran it: cold solves, autograd
        t0 = time.perf_counter()
        c = geomreg.flow(x, y, blur=BLUR, dtype=args.dtype, warm_start=False)
        row["cold_s"] = time.perf_counter() - t0
        row.update(S_cold=divergence(c.points.detach().cpu().double().numpy(), y),
                   cold_steps=len(c.steps) - 1, cold_iterations=sum(s.n_iter for s in c.steps))
    if args.plots and x.shape[1] == 2:
        from geomreg.plots import plot_flow

        path = args.out / f"nonrigid_{name}_flow.png"
        plot_flow(path, snapshots, y)
        row["plot"] = str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
    log(f"{name}: S {row['S_before']:.3g} -> match {row['S_match']:.3g} ({fmt_s(row['match_s'])}), "
        f"flow {row['S_flow']:.4g} in {row['flow_steps']} steps ({fmt_s(row['flow_s'])})"
        + ("" if "cold_s" not in row else f"; cold flow {row['S_cold']:.4g} in {row['cold_steps']} steps "
           f"({fmt_s(row['cold_s'])})"))
    return row


def run(args: argparse.Namespace, device: torch.device, json_path: Path, md_path: Path) -> dict:
    start = time.perf_counter()
    report: dict[str, Any] = {"machine": machine_info(device), "versions": versions(), "blur": BLUR,
                              "dtype": args.dtype,
                              "load_start": loadavg(), "rows": []}
    points = {"fish": None, "bunny": 2000 if args.quick else args.bunny_points}
    for name in PAIRS:
        if not all((DATA / f).exists() for f in PAIRS[name]):
            log(f"{name}: {DATA} lacks {PAIRS[name]}; skipped")
            continue
        x, y = load_pair(name, points[name], args.seed)
        report["rows"].append(run_pair(name, x, y, args))
    return finish_report(report, start, json_path, md_path, render)


def render(report: dict) -> str:
    head = ["pair", "points", "S before", "S after match", "S after flow", "chamfer before",
            "after match", "after flow", "match time", "flow time (steps, iterations)",
            "cold flow: S after, time (steps, iterations)", "cold / flow time"]

    def cold(r):
        if "cold_s" not in r:
            return ["", ""]
        return [f"{r['S_cold']:.4g}, {fmt_s(r['cold_s'])} ({r['cold_steps']}, {r['cold_iterations']})",
                f"{r['cold_s'] / r['flow_s']:.1f}"]

    rows = [[r["pair"], f"{r['points'][0]} / {r['points'][1]} ({r['dim']}-D)", f"{r['S_before']:.3g}",
             f"{r['S_match']:.3g}", f"{r['S_flow']:.4g}", f"{r['chamfer_before']:.4f}",
             f"{r['chamfer_match']:.4f}", f"{r['chamfer_flow']:.4f}", fmt_s(r["match_s"]),
             f"{fmt_s(r['flow_s'])} ({r['flow_steps']}, {r['flow_iterations']})"] + cold(r)
            for r in report["rows"]]
    m = report["machine"]
    return "\n".join([
        "# Non-rigid registration: geomreg match and flow on probreg's pairs", "",
        f"- machine: {m.get('cpu_count')} CPUs, torch {report['versions'].get('torch')}; load average "
        f"{report['load_start']} at the start, {report['load_end']} at the end",
        f"- both clouds of a pair scaled as one to a bounding-box diagonal of 1; Sinkhorn blur {BLUR}, "
        f"match and flow in {report['dtype']}, every S in float64; flow with its defaults (transport-"
        "field steps, warm starts while they pay); cold flow = `warm_start=False` (every step solved "
        "from the top of the epsilon schedule and differentiated, as earlier versions did), run "
        "after it in the same process; chamfer = mean distance to the other cloud, both ways",
        "", md_table(head, rows), ""])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the bunny pair subsampled to 2000 points")
    p.add_argument("--bunny-points", type=int, default=None, help="subsample the bunny pair (default: all)")
    p.add_argument("--plots", action="store_true", help="draw the fish's flow")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"],
                   help="precision of match and flow (every S of the table is float64)")
    p.add_argument("--no-cold", action="store_true", help="skip the cold flow (warm_start=False)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return bench_main("nonrigid", args, run, render)


if __name__ == "__main__":
    sys.exit(main())

"""geomreg vs GeomLoss on dense (tensorized) Sinkhorn divergences, in one process.

For each size N (N = M), two input pairs are built from one fixed torch seed: float32
uniform clouds in the unit cube, ``(x, y + 0.1)`` ("shifted") and ``(x, y)``
("unshifted"). On every pair (p = 2, blur = 0.05, scaling = 0.5 unless said otherwise):

1. Same work: geomreg ``tol=math.inf`` (GeomLoss's epsilon-scaling schedule and nothing
   more) against GeomLoss ``backend="tensorized"``.
2. Defaults: geomreg at its defaults (it iterates until the marginal error is <= 1e-3)
   against GeomLoss at its defaults, plus GeomLoss with scaling 0.9 and 0.95; every value
   is compared with a converged reference (geomreg, float64, tol ``--ref-tol``), and for
   each tool the fastest configuration within 1% of the reference is reported.
3. CLI wall times: ``geomreg --help`` and ``geomreg distance`` on the sample spirals.
4. Machine facts: load average before and after, CPU count, torch threads and version,
   device name.

Timings: median of ``--repeats`` runs, the tools alternated run by run after one untimed
warm-up each; CUDA is synchronised before every clock read. Results go to
``<out>/dense_<device>.json`` (raw timings included) and ``<out>/dense_<device>.md``; the
markdown is also printed to stdout, progress goes to stderr. See bench/README.md.

Usage: python bench/bench_dense.py [--sizes 2000 5000] [--repeats 3] [--device cpu|cuda]
[--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import (
    REPO_ROOT,
    console_script,
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
    uniform_pair,
)

import geomreg
from geomreg.api import versions

BLUR, P, SCALING, SHIFT = 0.05, 2, 0.5, 0.1
SWEEP_SCALINGS = (0.9, 0.95)
WITHIN = 0.01  # "within 1% of the converged value"


@dataclass
class Config:
    """One way of computing the divergence, timed as a whole call."""

    key: str
    tool: str  # "geomreg" or "GeomLoss"
    label: str
    params: dict[str, Any]
    make: Callable[[torch.Tensor, torch.Tensor], Callable[[], Any]]
    sweep: bool = False  # timed --sweep-repeats times only (long runs)
    shared_with: str | None = None  # same call as another config: reuse its runs
    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def geomloss_auto_backend(n: int, m: int) -> str:
    """The backend GeomLoss 0.3.1's ``backend="auto"`` picks for 3-D, p = 2 Sinkhorn.

    Mirrors ``SamplesLoss.forward`` (geomloss/_legacy/samples_loss.py): tensorized up to
    N * M = 5000**2, then "online" (KeOps), "multiscale" (KeOps) beyond 10000**2.
    """
    if n * m <= 5000**2:
        return "tensorized"
    return "multiscale" if n * m > 10000**2 else "online"


def make_configs(n: int, m: int) -> list[Config]:
    """Every configuration measured on an N x M pair, in the order they alternate."""
    from geomloss import SamplesLoss

    def geomreg_call(**kw: Any) -> Callable[[torch.Tensor, torch.Tensor], Callable[[], Any]]:
        return lambda x, y: (lambda: geomreg.divergence(x, y, **kw))

    def geomloss_call(**kw: Any) -> Callable[[torch.Tensor, torch.Tensor], Callable[[], Any]]:
        loss = SamplesLoss("sinkhorn", **kw)
        return lambda x, y: (lambda: loss(x, y))

    auto = geomloss_auto_backend(n, m)
    configs = [
        Config("geomreg_inf", "geomreg", "tol=inf (GeomLoss schedule)",
               {"tol": "inf", "p": P, "blur": BLUR, "scaling": SCALING},
               geomreg_call(tol=math.inf, p=P, blur=BLUR, scaling=SCALING)),
        Config("geomloss_tensorized", "GeomLoss", "tensorized, scaling=0.5",
               {"backend": "tensorized", "p": P, "blur": BLUR, "scaling": SCALING},
               geomloss_call(p=P, blur=BLUR, scaling=SCALING, backend="tensorized")),
        Config("geomreg_default", "geomreg", "defaults (tol=1e-3)", {},
               geomreg_call()),
        Config("geomloss_default", "GeomLoss", f"defaults (auto -> {auto}, scaling=0.5)",
               {"backend": "auto", "resolved_backend": auto}, geomloss_call(),
               shared_with="geomloss_tensorized" if auto == "tensorized" else None),
    ]
    for s in SWEEP_SCALINGS:
        configs.append(
            Config(f"geomloss_scaling_{s}", "GeomLoss", f"tensorized, scaling={s}",
                   {"backend": "tensorized", "p": P, "blur": BLUR, "scaling": s},
                   geomloss_call(p=P, blur=BLUR, scaling=s, backend="tensorized"),
                   sweep=True)
        )
    return configs


def scalar(out: Any) -> tuple[float, dict[str, Any]]:
    """The value of a geomreg result or a GeomLoss tensor, plus geomreg's loop facts."""
    if isinstance(out, torch.Tensor):
        return float(out.detach().reshape(-1)[0].cpu()), {}
    info = {"n_iter": out.n_iter, "marginal_error": out.marginal_error,
            "converged": out.converged, "backend": out.backend, "internal_time_s": out.time_s}
    return float(out.value.detach().cpu()), info


def warm_up(configs: list[Config], x: torch.Tensor, y: torch.Tensor, dev: torch.device,
            keys: set[str] | None = None) -> None:
    """One untimed call of each config (or of those in ``keys``); failures are recorded."""
    for c in configs:
        if c.shared_with or c.error or (keys is not None and c.key not in keys):
            continue
        try:
            timed(c.make(x, y), dev)
        except Exception as exc:  # e.g. GeomLoss "online" without pykeops
            c.error = f"{type(exc).__name__}: {exc}"[:500]
            log(f"    {c.tool} {c.label}: cannot run here ({c.error.splitlines()[0]})")


def measure_pair(n: int, pair: str, x: torch.Tensor, y: torch.Tensor, dev: torch.device,
                 args: argparse.Namespace, first_of_size: bool) -> dict[str, Any]:
    """Reference, then the alternated timed runs of every config, on one input pair."""
    log(f"N={n} {pair}: converged float64 reference (tol={args.ref_tol:g}) ...")
    t_ref, ref = timed(lambda: geomreg.divergence(
        x.double(), y.double(), p=P, blur=BLUR, scaling=SCALING, tol=args.ref_tol,
        max_iter=args.ref_max_iter), dev)
    ref_value, ref_info = scalar(ref)
    log(f"    S = {ref_value:.10g} in {ref.n_iter} iterations, {t_ref:.1f} s"
        f"{'' if ref.converged else '  (NOT CONVERGED: errors below are approximate)'}")

    configs = make_configs(n, n)
    if first_of_size:
        # One untimed full-size run per tool (plus any config with its own code path, e.g.
        # GeomLoss's auto backend when it is not tensorized); the second pair has the same
        # shapes, so it needs none.
        log(f"N={n}: warm-up ...")
        warm_up(configs, x, y, dev,
                keys={"geomreg_inf", "geomloss_tensorized", "geomloss_default"})
    else:
        warm_up(configs, x, y, dev, keys={"geomloss_default"})

    sweep_repeats = min(args.sweep_repeats, args.repeats)
    for r in range(args.repeats):
        for c in configs:
            if c.shared_with or c.error or (c.sweep and r >= sweep_repeats):
                continue
            try:
                t, out = timed(c.make(x, y), dev)
            except Exception as exc:
                c.error = f"{type(exc).__name__}: {exc}"[:500]
                log(f"    {c.tool} {c.label}: failed ({c.error.splitlines()[0]})")
                continue
            value, info = scalar(out)
            c.times.append(t)
            c.values.append(value)
            c.info = info
            log(f"    run {r + 1}/{args.repeats}  {c.tool:8s} {c.label:34s} {t:8.3f} s  "
                f"rel.err {rel_err(value, ref_value):.1e}")

    by_key = {c.key: c for c in configs}
    for c in configs:  # shared configs take the runs of the identical call
        if c.shared_with:
            src = by_key[c.shared_with]
            c.times, c.values, c.info, c.error = src.times, src.values, src.info, src.error

    rows: dict[str, Any] = {}
    for c in configs:
        value = c.values[-1] if c.values else None
        rows[c.key] = {
            "tool": c.tool, "label": c.label, "params": c.params,
            "times_s": c.times, "median_s": median(c.times), "runs": len(c.times),
            "values": c.values, "value": value, "rel_err": rel_err(value, ref_value),
            "shared_runs_with": c.shared_with, "error": c.error, **c.info,
        }

    def ratio(a: str, b: str) -> float | None:
        ta, tb = rows[a]["median_s"], rows[b]["median_s"]
        return ta / tb if ta is not None and tb else None

    best: dict[str, Any] = {}
    for tool in ("geomreg", "GeomLoss"):
        ok = [(k, v) for k, v in rows.items()
              if v["tool"] == tool and not v["shared_runs_with"] and v["median_s"] is not None
              and v["rel_err"] is not None and v["rel_err"] < WITHIN]
        k, v = min(ok, key=lambda kv: kv[1]["median_s"]) if ok else (None, None)
        best[tool] = {"config": k, "label": v["label"] if v else None,
                      "median_s": v["median_s"] if v else None,
                      "rel_err": v["rel_err"] if v else None}
    t_gr, t_gl = best["geomreg"]["median_s"], best["GeomLoss"]["median_s"]
    return {
        "n": n, "m": n, "pair": pair, "shift": SHIFT if pair == "shifted" else 0.0,
        "reference": {"value": ref_value, "time_s": t_ref, "tol": args.ref_tol,
                      "max_iter": args.ref_max_iter, "dtype": "float64", **ref_info},
        "configs": rows,
        "ratio_same_work": ratio("geomreg_inf", "geomloss_tensorized"),
        "ratio_defaults": ratio("geomreg_default", "geomloss_default"),
        "within_1pct": {**best, "ratio": t_gr / t_gl if t_gr is not None and t_gl else None},
    }


def render(report: dict[str, Any]) -> str:
    """The markdown report: machine facts, then one table per benchmark."""
    m, cfg = report["machine"], report["settings"]
    res = report["pairs"]
    out = [
        f"# Dense Sinkhorn benchmark: geomreg {report['versions']['geomreg']} vs GeomLoss "
        f"{report['versions']['geomloss']} ({cfg['device']})",
        "",
        f"- device: {m['device_name']} ({m['device']}); torch {m['torch']}, "
        f"{m['torch_num_threads']} torch threads, {m['cpu_count']} CPUs",
        f"- load average (1/5/15 min): before {report['loadavg_before']}, "
        f"after {report['loadavg_after']}",
        f"- float32, p={P}, blur={BLUR}, scaling={SCALING}; uniform clouds in the unit cube, "
        f"seed {cfg['seed']}; pairs: y shifted by +{SHIFT} on every axis, and unshifted",
        f"- times: median of {cfg['repeats']} runs (GeomLoss scaling sweep: "
        f"{min(cfg['sweep_repeats'], cfg['repeats'])}), tools alternated run by run after "
        f"one untimed warm-up each; ratio = geomreg / GeomLoss (< 1: geomreg faster)",
        f"- reference: geomreg float64, tol={cfg['ref_tol']:g}; rel. err = |S / S_ref - 1|",
        f"- total benchmark time: {report['total_s']:.0f} s",
        "",
        "## 1. Same work (GeomLoss's epsilon-scaling schedule, no extra iterations)",
        "",
    ]
    rows = []
    for r in res:
        c = r["configs"]
        rows.append([r["n"], r["pair"], c["geomreg_inf"].get("n_iter", "n/a"),
                     fmt_s(c["geomreg_inf"]["median_s"]),
                     fmt_s(c["geomloss_tensorized"]["median_s"]),
                     fmt_ratio(c["geomreg_inf"]["median_s"],
                               c["geomloss_tensorized"]["median_s"])])
    out += [md_table(["N", "pair", "iterations", "geomreg tol=inf (s)",
                      "GeomLoss tensorized (s)", "ratio"], rows), ""]

    out += ["## 2. Defaults (geomreg: until marginal error <= 1e-3; GeomLoss: its schedule)",
            ""]
    rows = []
    for r in res:
        c = r["configs"]
        gr, gl = c["geomreg_default"], c["geomloss_default"]
        rows.append([r["n"], r["pair"], f"{r['reference']['value']:.6g}",
                     fmt_s(gr["median_s"]), gr.get("n_iter", "n/a"), fmt_err(gr["rel_err"]),
                     fmt_s(gl["median_s"]) if not gl["error"] else "cannot run",
                     fmt_err(gl["rel_err"]), fmt_ratio(gr["median_s"], gl["median_s"])])
    out += [md_table(["N", "pair", "reference S", "geomreg (s)", "geomreg iterations",
                      "geomreg rel. err", "GeomLoss (s)", "GeomLoss rel. err", "ratio"], rows),
            ""]
    if any(r["configs"]["geomloss_default"]["shared_runs_with"] for r in res):
        out += ["GeomLoss's defaults resolve to backend=\"tensorized\", scaling=0.5 while "
                "N * M <= 5000^2: the very call of section 1, so those rows reuse its runs.",
                ""]

    failed = {(r["n"], r["pair"], c["tool"], c["label"]): c["error"]
              for r in res for c in r["configs"].values() if c["error"]}
    for (n, pair, tool, label), err in failed.items():
        out += [f"- N={n} {pair}: {tool} {label} cannot run here: {err.splitlines()[0]}"]
    if failed:
        out += ["  (GeomLoss's KeOps backends need pykeops; see the JSON for details)", ""]

    out += ["## 3. Every configuration: time and error against the converged reference", ""]
    rows = []
    for r in res:
        for c in r["configs"].values():
            if c["shared_runs_with"]:
                continue
            rows.append([r["n"], r["pair"], c["tool"], c["label"],
                         fmt_s(c["median_s"]) if not c["error"] else "cannot run",
                         c["runs"], fmt_err(c["rel_err"]),
                         "yes" if c["rel_err"] is not None and c["rel_err"] < WITHIN else "no"])
    out += [md_table(["N", "pair", "tool", "configuration", "median (s)", "runs",
                      "rel. err", "< 1%"], rows), ""]

    out += ["## 4. Time to a value within 1% of the converged one (fastest such configuration)",
            ""]
    rows = []
    for r in res:
        b = r["within_1pct"]
        cells = [r["n"], r["pair"]]
        for tool in ("geomreg", "GeomLoss"):
            cells += [b[tool]["label"] or "none < 1%", fmt_s(b[tool]["median_s"])]
        cells.append(fmt_ratio(b["geomreg"]["median_s"], b["GeomLoss"]["median_s"]))
        rows.append(cells)
    out += [md_table(["N", "pair", "geomreg config", "geomreg (s)", "GeomLoss config",
                      "GeomLoss (s)", "ratio"], rows), ""]

    out += ["## 5. CLI wall time (subprocess, end to end)", ""]
    rows = []
    for c in report["cli"]:
        ok = all(rc in (0, 3) for rc in c["returncodes"])  # 3: computed, not converged
        rows.append([f"`{c['display']}`", fmt_s(c["median_s"]) if ok else "failed",
                     len(c["times_s"]), ", ".join(str(x) for x in sorted(set(c["returncodes"])))])
    out += [md_table(["command", "median (s)", "runs", "exit codes"], rows)
            if rows else "(skipped)", ""]
    for c in report["cli"]:
        if c.get("error_tail"):
            tail = c["error_tail"].strip().splitlines()[-1]
            out += [f"- `{c['display']}` failed: {tail}", ""]
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000],
                    help="numbers of points N (= M)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration")
    ap.add_argument("--sweep-repeats", type=int, default=1,
                    help="timed runs of the long GeomLoss scaling=0.9/0.95 configurations "
                         "(at most --repeats)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results",
                    help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the input clouds")
    ap.add_argument("--ref-tol", type=float, default=1e-7,
                    help="tolerance of the converged float64 reference")
    ap.add_argument("--ref-max-iter", type=int, default=100_000,
                    help="iteration cap of the reference")
    ap.add_argument("--cli-repeats", type=int, nargs=2, default=[5, 3],
                    metavar=("HELP", "DISTANCE"), help="runs of `--help` and of `distance`")
    ap.add_argument("--skip-cli", action="store_true", help="skip the CLI timings")
    args = ap.parse_args(argv)
    if any(n < 2 for n in args.sizes) or args.repeats < 1 or args.sweep_repeats < 1:
        ap.error("sizes must be >= 2, repeats and sweep-repeats >= 1")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        ap.error(f"--device must be cpu, cuda or cuda:K, not {args.device!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        build = torch.version.cuda or "none: this is a CPU-only build"
        print(f"bench_dense.py: --device {args.device} was asked for, but torch sees no CUDA "
              f"GPU (torch {torch.__version__}, CUDA build: {build}). Run with --device cpu, "
              "or on a machine with a GPU and a CUDA build of torch.", file=sys.stderr)
        return 2
    if args.repeats < 3:
        log(f"note: --repeats {args.repeats} < 3: medians of so few runs are fragile")
    dev = torch.device(args.device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    import geomloss

    tag = args.device.replace(":", "")
    args.out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = args.out / f"dense_{tag}.json", args.out / f"dense_{tag}.md"

    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "bench/bench_dense.py",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "settings": {"sizes": args.sizes, "repeats": args.repeats,
                     "sweep_repeats": args.sweep_repeats, "device": args.device,
                     "seed": args.seed, "ref_tol": args.ref_tol,
                     "ref_max_iter": args.ref_max_iter, "dtype": "float32", "p": P,
                     "blur": BLUR, "scaling": SCALING, "shift": SHIFT,
                     "geomloss_sweep_scalings": list(SWEEP_SCALINGS)},
        "versions": {**versions(), "geomloss": geomloss.__version__},
        "machine": machine_info(dev),
        "loadavg_before": loadavg(),
        "pairs": [],
        "cli": [],
    }
    log(f"machine: {report['machine']['device_name']}, {report['machine']['cpu_count']} CPUs, "
        f"{report['machine']['torch_num_threads']} torch threads, "
        f"load {report['loadavg_before']}")

    # Load every code path once on a tiny problem (CUDA kernels, lazy imports): cheap.
    xs, ys = (t.to(dev) for t in uniform_pair(200, 200, args.seed))
    warm_up(make_configs(200, 200), xs, ys + SHIFT, dev)

    for n in args.sizes:
        x, y = uniform_pair(n, n, args.seed)
        x, y = x.to(dev), y.to(dev)
        for i, (pair, yy) in enumerate((("shifted", y + SHIFT), ("unshifted", y))):
            report["pairs"].append(measure_pair(n, pair, x, yy, dev, args, first_of_size=i == 0))
            report["total_s"] = time.perf_counter() - t_start
            json_path.write_text(json.dumps(report, indent=1))  # partial results, if stopped
        del x, y
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    if not args.skip_cli:
        exe = console_script("geomreg")
        if exe is None:
            log("CLI: no `geomreg` console script found; skipping the CLI timings")
        else:
            for display, extra, reps in (
                ("geomreg --help", ["--help"], args.cli_repeats[0]),
                ("geomreg distance sample_data/spiral_a.ply sample_data/spiral_b.ply",
                 ["distance", "sample_data/spiral_a.ply", "sample_data/spiral_b.ply"],
                 args.cli_repeats[1]),
            ):
                log(f"CLI: {display} x{reps} ...")
                res = time_command([exe, *extra], reps)
                res["display"] = display
                report["cli"].append(res)
                log(f"    median {res['median_s']:.3f} s, exit codes {res['returncodes']}")

    report["loadavg_after"] = loadavg()
    report["total_s"] = time.perf_counter() - t_start
    md = render(report)
    json_path.write_text(json.dumps(report, indent=1))
    md_path.write_text(md + "\n")
    print(md)
    log(f"wrote {json_path} and {md_path} ({report['total_s']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

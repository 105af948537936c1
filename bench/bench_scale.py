"""geomreg vs GeomLoss at scale: 3-D clouds of 2k to 100k points (1M for geomreg alone).

Cases (p = 2, blur = 0.05, float32): uniform clouds in the unit cube, N = M = each of
``--sizes``, as the pair ``(x, y + 0.1)`` from one fixed torch seed; and the Stanford bunny
upsampled to ``--bunny-points`` by jittered resampling (every point repeated with gaussian
noise of 0.2% of the bounding-box diagonal), scaled to a unit diagonal, against a copy
rotated by 30 degrees about its vertical axis and shifted by 0.1. On each case:

1. Reference: geomreg with ``tol=--ref-tol`` (1e-6), float64 below N = 20000, float32
   above, on the best backend available (multiscale if it runs, else auto).
2. Time to a converged value: geomreg at its defaults (backend auto, tensorized while
   N <= 20000, online, multiscale) and GeomLoss 0.3.1 (tensorized while N <= 20000, online,
   multiscale; scaling 0.5, 0.7, 0.9). A configuration counts when its value is within 1%
   of the reference; per tool the fastest such one, and the ratio geomreg / GeomLoss.
3. Same work: geomreg ``tol=math.inf`` (GeomLoss's epsilon-scaling schedule, scaling 0.5)
   against GeomLoss, online vs online and multiscale vs multiscale.

Then, once: 4. peak memory (``ru_maxrss``) of fresh child processes running geomreg
multiscale at the largest N (one online softmin and its gradient at 200k with
``--online-200k``, multiscale at 1M when
``--sizes`` has it), beside a child that only imports torch and geomreg; 5. pair throughput
of one log-sum-exp reduction: plain KeOps against geomreg's backends' ``softmin``.

Timings: median of ``--repeats`` runs (default 3; 1 from N = 100000 on), the
configurations alternated run by run (geomreg, GeomLoss, geomreg, ...) after one untimed
warm-up each (from N = 100000 on, and with ``--quick``, the warm-up runs once on a
200-point problem, before the first case); a run longer than ``--max-seconds`` is not
repeated. A configuration that raises is recorded as a one-line error and the run goes on.
Results go to ``<out>/scale_<device>.json`` (rewritten after every case) and
``<out>/scale_<device>.md`` (``scale_<device>_quick.*`` with ``--quick``); the markdown is
also printed to stdout, progress goes to stderr. See bench/README.md.

Usage: python bench/bench_scale.py [--sizes 2000 20000 100000] [--repeats R] [--quick]
[--device cpu|cuda] [--out bench/results] [--skip-geomloss] [--skip-bunny] [--online-200k]
[--memory-only]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
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
    sync,
    timed,
    uniform_pair,
)

import geomreg
from geomreg._stdio import stdout_to_stderr
from geomreg.api import versions

BLUR, P, SHIFT = 0.05, 2, 0.1
SCALING = 0.5  # geomreg's default, and the "same work" schedule
GEOMLOSS_SCALINGS = (0.5, 0.7, 0.9)
WITHIN = 0.01  # "within 1% of the converged value"
DENSE_MAX = 20_000  # tensorized backends (both tools) only up to this N
LARGE = 100_000  # from here: 1 repeat unless --repeats is given, small-problem warm-up
GEOMREG_ONLY = 1_000_000  # from here: geomreg multiscale alone
REF_FLOAT64_BELOW = 20_000  # the reference runs in float64 below this N, float32 above
GOAL_BEST, GOAL_SAME = 1 / 3, 1.0  # ratio goals: time to within 1% (at 20k, 100k); same work
GOAL_BEST_SIZES = (20_000, 100_000)
THROUGHPUT_RUNS = 3
PAIRS_N, PAIRS_N_DENSE = 20_000, 5_000  # pair throughput: N = M (tensorized: at most 5000)
BUNNY = REPO_ROOT.parent / "shared" / "data" / "clouds" / "trimesh" / "bunny.ply"
BUNNY_JITTER = 0.002  # noise sigma, as a fraction of the bounding-box diagonal
BUNNY_ANGLE = 30.0  # degrees, about the bunny's vertical (y) axis
CHILD_TAG = "BENCH_SCALE_CHILD "


def one_line(exc: BaseException) -> str:
    """An exception as one short line: ``Type: message``."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300]


def multiscale_options(args: argparse.Namespace) -> dict[str, float]:
    """``truncate`` / ``cluster_scale`` for geomreg's multiscale backend, only when given."""
    opts = {"truncate": args.truncate, "cluster_scale": args.cluster_scale}
    return {k: v for k, v in opts.items() if v is not None}


# -- inputs ------------------------------------------------------------------------------


def uniform_case(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y + 0.1)``: float32 clouds uniform in the unit cube (as bench_dense's "shifted")."""
    x, y = uniform_pair(n, n, seed)
    return x, y + SHIFT


def bunny_case(path: Path, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The bunny upsampled to ``n`` points (unit diagonal) and its rotated, shifted copy.

    Every original point is used in turn (a random permutation per pass) with gaussian
    noise of ``BUNNY_JITTER`` times the original bounding-box diagonal, until there are
    ``n`` points; the result is centred and scaled so that its bounding-box diagonal is 1.
    """
    from geomreg.io import read_measure

    with stdout_to_stderr():  # open3d may print
        pts = torch.as_tensor(read_measure(path).points, dtype=torch.float64)
    n0 = pts.shape[0]
    g = torch.Generator().manual_seed(seed)
    diag0 = float((pts.max(0).values - pts.min(0).values).norm())
    idx = torch.cat([torch.randperm(n0, generator=g) for _ in range(-(-n // n0))])[:n]
    up = pts[idx] + BUNNY_JITTER * diag0 * torch.randn(n, 3, generator=g, dtype=torch.float64)
    lo, hi = up.min(0).values, up.max(0).values
    up = (up - (lo + hi) / 2) / (hi - lo).norm()
    c, s = math.cos(math.radians(BUNNY_ANGLE)), math.sin(math.radians(BUNNY_ANGLE))
    rot = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=torch.float64)
    y = up @ rot.T + SHIFT
    info = {"file": str(path), "original_points": n0, "jitter": BUNNY_JITTER,
            "rotation_deg_about_y": BUNNY_ANGLE, "shift": SHIFT}
    return up.float(), y.float(), info


# -- configurations ----------------------------------------------------------------------


@dataclass
class Config:
    """One way of computing the divergence, timed as a whole call."""

    key: str
    tool: str  # "geomreg" or "GeomLoss"
    label: str
    params: dict[str, Any]
    call: Callable[[torch.Tensor, torch.Tensor], Any]
    same_work: str | None = None  # backend of the "same work" comparison it belongs to
    shared_with: str | None = None  # the same call as another config: reuse its runs
    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    capped: bool = False  # one run took longer than --max-seconds: not repeated
    warmup_s: float | None = None  # the untimed full-size warm-up (measured all the same)


def make_configs(n: int, args: argparse.Namespace) -> list[Config]:
    """Every configuration measured at N points, geomreg and GeomLoss alternating."""
    ms_opts = multiscale_options(args)

    def geomreg_call(**kw: Any) -> Callable[[torch.Tensor, torch.Tensor], Any]:
        return lambda x, y: geomreg.divergence(x, y, p=P, blur=BLUR, **kw)

    ours: list[Config] = []
    backends = ["auto"] if n < GEOMREG_ONLY else []
    backends += ["tensorized"] if n <= DENSE_MAX else []
    backends += ["online", "multiscale"] if n < GEOMREG_ONLY else ["multiscale"]
    for b in backends:
        kw = ms_opts if b == "multiscale" else {}
        ours.append(Config(f"geomreg_{b}", "geomreg", f"defaults, backend={b}",
                           {"backend": b, "tol": 1e-3, **kw}, geomreg_call(backend=b, **kw)))
    for b in ("online", "multiscale") if n < GEOMREG_ONLY else ("multiscale",):
        kw = ms_opts if b == "multiscale" else {}
        ours.append(Config(f"geomreg_inf_{b}", "geomreg", f"tol=inf, backend={b}",
                           {"backend": b, "tol": "inf", "scaling": SCALING, **kw},
                           geomreg_call(backend=b, tol=math.inf, scaling=SCALING, **kw),
                           same_work=b))

    theirs: list[Config] = []
    if not args.skip_geomloss and n < GEOMREG_ONLY:
        from geomloss import SamplesLoss

        for b in ("tensorized", "online", "multiscale"):
            if b == "tensorized" and n > DENSE_MAX:
                continue
            for s in GEOMLOSS_SCALINGS:
                loss = SamplesLoss("sinkhorn", p=P, blur=BLUR, scaling=s, backend=b)
                theirs.append(Config(f"geomloss_{b}_{s}", "GeomLoss", f"{b}, scaling={s}",
                                     {"backend": b, "scaling": s},
                                     lambda x, y, loss=loss: loss(x, y),
                                     same_work=b if s == SCALING else None))
    pairs = itertools.zip_longest(ours, theirs)
    return [c for pair in pairs for c in pair if c is not None]


def share_auto(configs: list[Config], n: int, dev: torch.device) -> None:
    """Let geomreg's ``backend=auto`` reuse the runs of the explicit backend it resolves to."""
    by_key = {c.key: c for c in configs}
    auto = by_key.get("geomreg_auto")
    if auto is None:
        return
    try:
        from geomreg.api import _available_memory
        from geomreg.engine import choose_backend

        name = choose_backend("auto", n=n, m=n, dim=3, itemsize=4,
                              memory_bytes=_available_memory(dev), device_type=dev.type).name
    except Exception as exc:  # noqa: BLE001 - then auto simply runs on its own
        log(f"    cannot tell what backend=auto picks ({one_line(exc)}): timed separately")
        return
    auto.label = f"defaults, backend=auto (-> {name})"
    twin = by_key.get(f"geomreg_{name}")
    if twin is not None and twin.params == {"backend": name, "tol": 1e-3}:  # no extra options
        auto.shared_with = twin.key


def scalar(out: Any) -> tuple[float, dict[str, Any]]:
    """The value of a geomreg result or a GeomLoss tensor, plus geomreg's loop facts."""
    if isinstance(out, torch.Tensor):
        return float(out.detach().reshape(-1)[0].cpu()), {}
    info = {"n_iter": out.n_iter, "marginal_error": out.marginal_error, "converged": out.converged,
            "backend": out.backend, "internal_time_s": out.time_s}
    if getattr(out, "multiscale", None):
        info["multiscale"] = out.multiscale
    return float(out.value.detach().cpu()), info


def run_once(c: Config, x: torch.Tensor, y: torch.Tensor, dev: torch.device) -> float | None:
    """One timed call; a failure is recorded in ``c.error`` (the config is not run again)."""
    try:
        t, out = timed(lambda: c.call(x, y), dev)
    except Exception as exc:  # noqa: BLE001 - e.g. a backend that does not exist yet
        c.error = one_line(exc)
        log(f"    {c.tool:8s} {c.label:38s} failed: {c.error}")
        return None
    value, info = scalar(out)
    c.times.append(t)
    c.values.append(value)
    c.info = info
    return t


# -- one case ----------------------------------------------------------------------------


def reference(x: torch.Tensor, y: torch.Tensor, n: int, dev: torch.device,
              args: argparse.Namespace) -> dict[str, Any]:
    """The "fully converged" value: tol ``--ref-tol`` on the first backend that runs."""
    dtype = "float64" if n < REF_FLOAT64_BELOW else "float32"
    order = ["multiscale", "auto"] if args.ref_backend == "best" else [args.ref_backend]
    failed = []
    for b in order:
        kw = multiscale_options(args) if b == "multiscale" else {}
        log(f"    reference: backend={b}, {dtype}, tol={args.ref_tol:g} ...")
        try:
            t, r = timed(lambda b=b, kw=kw: geomreg.divergence(
                x, y, p=P, blur=BLUR, scaling=SCALING, tol=args.ref_tol, max_iter=args.ref_max_iter,
                backend=b, dtype=dtype, **kw), dev)
        except Exception as exc:  # noqa: BLE001 - try the next backend
            failed.append({"backend": b, "error": one_line(exc)})
            log(f"    reference on {b} failed: {one_line(exc)}")
            continue
        value, info = scalar(r)
        log(f"    S = {value:.8g} ({r.backend}, {r.n_iter} iterations, marginal error "
            f"{fmt_err(r.marginal_error)}, {t:.1f} s){'' if r.converged else '  NOT CONVERGED'}")
        return {"value": value, "time_s": t, "backend_requested": b, "dtype": dtype,
                "tol": args.ref_tol, "max_iter": args.ref_max_iter, "failed": failed, **info}
    return {"value": None, "dtype": dtype, "tol": args.ref_tol, "failed": failed,
            "error": "; ".join(f["error"] for f in failed)}


def measure_case(name: str, n: int, x: torch.Tensor, y: torch.Tensor, dev: torch.device,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Reference, then the alternated timed runs of every configuration, on one case."""
    t_case = time.perf_counter()
    load_before = loadavg()
    repeats = args.repeats if args.repeats is not None else (1 if n >= LARGE else 3)
    log(f"{name} N={n} (load {load_before}, {repeats} timed run(s) per configuration)")
    ref = reference(x, y, n, dev, args)
    ref_value = ref["value"]

    configs = make_configs(n, args)
    share_auto(configs, n, dev)
    live = [c for c in configs if not c.shared_with]

    if n < LARGE and not args.quick:  # full-size warm-up; one over --max-seconds is the run
        for c in live:
            t = run_once(c, x, y, dev)
            if t is None:
                continue
            c.warmup_s = t
            c.capped = t > args.max_seconds
            log(f"    warm-up  {c.tool:8s} {c.label:38s} {t:8.3f} s"
                + ("  (kept as its only run: too long)" if c.capped else ""))
            if not c.capped:
                c.times, c.values = [], []

    for r in range(repeats):
        for c in live:
            if c.error or c.capped:
                continue
            t = run_once(c, x, y, dev)
            if t is None:
                continue
            c.capped = t > args.max_seconds
            err = rel_err(c.values[-1], ref_value) if ref_value else None
            log(f"    run {r + 1}/{repeats}  {c.tool:8s} {c.label:38s} {t:8.3f} s  "
                f"rel.err {fmt_err(err)}{'  (not repeated: too long)' if c.capped else ''}")

    by_key = {c.key: c for c in configs}
    rows: dict[str, Any] = {}
    for c in configs:
        src = by_key[c.shared_with] if c.shared_with else c
        value = src.values[-1] if src.values else None
        rows[c.key] = {
            "tool": c.tool, "label": c.label, "params": c.params, "same_work": c.same_work,
            "times_s": src.times, "median_s": median(src.times), "runs": len(src.times),
            "values": src.values, "value": value,
            "rel_err": rel_err(value, ref_value) if ref_value else None,
            "shared_runs_with": c.shared_with, "error": src.error, "warmup_s": src.warmup_s,
            "not_repeated_over_s": args.max_seconds if src.capped else None, **src.info,
        }

    best: dict[str, Any] = {}
    for tool in ("geomreg", "GeomLoss"):
        ok = [(k, v) for k, v in rows.items()
              if v["tool"] == tool and not v["shared_runs_with"] and v["median_s"] is not None
              and v["rel_err"] is not None and v["rel_err"] < WITHIN]
        k, v = min(ok, key=lambda kv: kv[1]["median_s"]) if ok else (None, None)
        best[tool] = {"config": k, "label": v["label"] if v else None,
                      "median_s": v["median_s"] if v else None, "rel_err": v["rel_err"] if v else None}
    t_gr, t_gl = best["geomreg"]["median_s"], best["GeomLoss"]["median_s"]

    same_work = []
    for b in ("online", "multiscale"):
        gr, gl = rows.get(f"geomreg_inf_{b}"), rows.get(f"geomloss_{b}_{SCALING}")
        if gr is None or gl is None:
            continue
        same_work.append({
            "backend": b, "geomreg": f"geomreg_inf_{b}", "GeomLoss": f"geomloss_{b}_{SCALING}",
            "ratio": gr["median_s"] / gl["median_s"] if gr["median_s"] and gl["median_s"] else None,
            "value_rel_diff": rel_err(gr["value"], gl["value"]) if gl["value"] else None,
        })

    return {
        "case": name, "n": n, "m": n, "repeats": repeats,
        "loadavg_before": load_before, "loadavg_after": loadavg(),
        "reference": ref, "configs": rows,
        "within_1pct": {**best, "ratio": t_gr / t_gl if t_gr is not None and t_gl else None},
        "same_work": same_work, "time_s": time.perf_counter() - t_case,
    }


# -- peak memory in child processes --------------------------------------------------------


def peak_rss_kib() -> tuple[int, str]:
    """This process's peak resident memory in KiB, and where the figure comes from.

    On Linux, ``VmHWM`` of /proc/self/status: the high-water mark of this program's own
    memory. ``ru_maxrss`` is no good in a child process there: at ``exec`` the kernel keeps
    the larger of its own and the *parent's* peak (the forked copy), so every child would
    report at least the benchmark's own size. ``ru_maxrss`` is the fallback elsewhere.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]), "VmHWM"
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"  # KiB on Linux


def child_main(spec_text: str) -> int:
    """Run one configuration (or nothing: the baseline) and print its peak memory as JSON."""
    import resource

    spec = json.loads(spec_text)
    out: dict[str, Any] = {}
    try:
        with stdout_to_stderr():
            if spec["what"] == "geomreg":
                dev = torch.device(spec["device"])
                x, y = uniform_case(spec["n"], spec["seed"])
                x, y = x.to(dev), y.to(dev)
                t, r = timed(lambda: geomreg.divergence(
                    x, y, p=P, blur=BLUR, backend=spec["backend"], **spec.get("options", {})), dev)
                value, info = scalar(r)
                out.update(time_s=t, value=value, **info)
            elif spec["what"] == "softmin":  # one reduction and its gradient: the memory peak
                out.update(online_softmin(spec))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        out["error"] = one_line(exc)
    out["peak_rss_kib"], out["peak_rss_source"] = peak_rss_kib()
    out["ru_maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # see peak_rss_kib
    if torch.cuda.is_available() and spec.get("device", "cpu").startswith("cuda"):
        sync(torch.device(spec["device"]))
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    print(CHILD_TAG + json.dumps(out, default=str), flush=True)
    return 0


def online_softmin(spec: dict[str, Any]) -> dict[str, Any]:
    """One online softmin of N x N points at the final epsilon, and its gradient in x.

    A full online solve at N = 200,000 is hours on a 2-core CPU (each softmin is 4e10 pairs);
    its memory is that of one softmin and its backward pass, repeated: this measures that.
    """
    from geomreg.engine import get_backend
    from geomreg.engine.base import Cost

    dev = torch.device(spec["device"])
    x, y = uniform_case(spec["n"], spec["seed"])
    x, y = x.to(dev).requires_grad_(True), y.to(dev)
    be = get_backend("online")
    h = torch.full((1, y.shape[0]), -math.log(y.shape[0]), device=dev)
    t0 = time.perf_counter()
    f = be.softmin(BLUR**P, be.pair(x[None], y[None], Cost(P)), h)
    (grad,) = torch.autograd.grad(f.sum(), x)
    sync(dev)
    return {"time_s": time.perf_counter() - t0, "finite": bool(torch.isfinite(grad).all())}


def run_child(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``spec`` in a fresh Python process: its own peak RSS, time, value or error."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"spec": spec, "error": f"timed out after {timeout:.0f} s"}
    res: dict[str, Any] = {"spec": spec, "wall_s": time.perf_counter() - t0,
                           "returncode": proc.returncode}
    tagged = [ln for ln in proc.stdout.splitlines() if ln.startswith(CHILD_TAG)]
    if tagged:
        res.update(json.loads(tagged[-1][len(CHILD_TAG):]))
    else:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        res["error"] = f"child exited {proc.returncode}: {tail[-1] if tail else 'no output'}"[:300]
    return res


def memory_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The child processes to run: the baseline first, then the measured configurations."""
    base = {"what": "geomreg", "device": args.device, "seed": args.seed}
    ms = {**base, "backend": "multiscale", "options": multiscale_options(args)}
    specs: list[dict[str, Any]] = [{"what": "baseline", "device": args.device}]
    if args.quick:
        return specs + [{**ms, "n": 2000}]
    below = [n for n in args.sizes if n < GEOMREG_ONLY]
    if below:
        specs.append({**ms, "n": max(below)})
    if args.online_200k:
        specs.append({**base, "what": "softmin", "backend": "online", "n": 200_000})
    specs += [{**ms, "n": n} for n in sorted(set(args.sizes)) if n >= GEOMREG_ONLY]
    return specs


def measure_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Peak resident memory of each child of :func:`memory_specs`, in order."""
    out = []
    for spec in memory_specs(args):
        what = "baseline (imports torch, geomreg)" if spec["what"] == "baseline" else \
            f"geomreg online: one softmin + gradient, N={spec['n']}" if spec["what"] == "softmin" else \
            f"geomreg {spec['backend']} N={spec['n']}"
        log(f"memory: {what} in a child process ...")
        res = run_child(spec, timeout=10 * args.max_seconds)
        res["label"] = what
        log(f"    peak RSS {res.get('peak_rss_kib', 0) / 1024:.0f} MiB"
            + (f", {res['time_s']:.1f} s" if res.get("time_s") else "")
            + (f"  ({res['error']})" if res.get("error") else ""))
        out.append(res)
    return out


# -- pair throughput -----------------------------------------------------------------------


def measure_throughput(dev: torch.device, seed: int, n: int = PAIRS_N) -> list[dict[str, Any]]:
    """Pairs per second of one softmin: plain KeOps LogSumExp vs geomreg's backends.

    ``n`` x ``n`` points, except the tensorized backend: at most ``PAIRS_N_DENSE`` (its
    ``pair`` holds the whole matrix).
    """
    from geomreg.engine import get_backend, native
    from geomreg.engine.base import Cost

    eps = BLUR**P
    plain: dict[int, torch.Tensor] = {}

    def measure(label: str, n: int, make: Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                                                   Callable[[], torch.Tensor]]) -> dict[str, Any]:
        x, y = uniform_pair(n, n, seed)
        x, y = x.to(dev), y.to(dev)
        h = torch.full((n,), -math.log(n), device=dev)  # log of uniform weights
        row: dict[str, Any] = {"implementation": label, "n": n, "m": n}
        log(f"throughput: {label}, {n} x {n} ...")
        try:
            fn = make(x, y, h)
            timed(fn, dev)  # warm-up (compiles KeOps formulas)
            times, out = [], None
            for _ in range(THROUGHPUT_RUNS):
                t, out = timed(fn, dev)
                times.append(t)
        except Exception as exc:  # noqa: BLE001 - e.g. a backend that does not exist yet
            row["error"] = one_line(exc)
            log(f"    failed: {row['error']}")
            return row
        t = median(times)
        row.update(times_s=times, median_s=t, pairs_per_s=n * n / t)
        softmin = out.reshape(-1).float().cpu()
        if label.startswith("KeOps"):
            plain[n] = softmin
        elif n in plain:
            row["max_abs_diff_vs_keops"] = float((softmin - plain[n]).abs().max())
        log(f"    {t:.3f} s, {n * n / t:.3g} pairs/s")
        return row

    def keops(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor) -> Callable[[], torch.Tensor]:
        with stdout_to_stderr():
            from pykeops.torch import LazyTensor
        x_i, y_j, h_j = LazyTensor(x[:, None, :]), LazyTensor(y[None, :, :]), LazyTensor(h[None, :, None])
        # The reduction runs when .logsumexp() is called: one formula, rebuilt per call.
        return lambda: -eps * (h_j - x_i.sqdist(y_j) * (0.5 / eps)).logsumexp(dim=1)

    def backend(name: str, compiled: bool = True) -> Callable[..., Callable[[], torch.Tensor]]:
        def make(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor) -> Callable[[], torch.Tensor]:
            be = get_backend(name)
            pair = be.pair(x[None], y[None], Cost(P))
            if compiled:
                return lambda: be.softmin(eps, pair, h[None])

            def torch_blocks() -> torch.Tensor:  # the multiscale blocks without the compiled kernel
                os.environ[native.ENV_SWITCH] = "0"
                try:
                    return be.softmin(eps, pair, h[None])
                finally:
                    os.environ.pop(native.ENV_SWITCH)
            return torch_blocks
        return make

    rows = [
        measure("KeOps LazyTensor logsumexp", n, keops),
        measure("geomreg tensorized softmin", min(n, PAIRS_N_DENSE), backend("tensorized")),
        measure("geomreg online softmin", n, backend("online")),
        measure("geomreg multiscale softmin", n, backend("multiscale")),
    ]
    if dev.type == "cpu" and native.kernel() is not None:
        rows.append(measure("geomreg multiscale softmin, torch blocks", n, backend("multiscale", False)))
    return rows


# -- report ------------------------------------------------------------------------------


def fmt_mib(kib: float | None) -> str:
    """KiB as MiB for a table cell."""
    return "n/a" if kib is None else f"{kib / 1024:.0f}"


def note_of(c: dict[str, Any], max_seconds: float) -> str:
    """The "note" cell of a configuration: its error, or why it has fewer runs."""
    if c["error"]:
        return c["error"]
    if c["shared_runs_with"]:
        return f"same call as {c['shared_runs_with']}: its runs"
    if c["not_repeated_over_s"] is not None:
        return f"a run took > {max_seconds:g} s: not repeated"
    return ""


def render(report: dict[str, Any]) -> str:
    """The markdown report: machine facts, then one table per measure."""
    m, cfg, cases = report["machine"], report["settings"], report["cases"]
    rep = cfg["repeats"] if cfg["repeats"] is not None else f"3 (1 from N = {LARGE})"
    warm = "on 200 points: --quick" if cfg["quick"] else f"full size; on 200 points from N = {LARGE}"
    out = [
        f"# Sinkhorn at scale: geomreg {report['versions']['geomreg']} vs GeomLoss "
        f"{report['versions'].get('geomloss', '(skipped)')} ({cfg['device']})",
        "",
        f"- device: {m['device_name']} ({m['device']}); torch {m['torch']}, "
        f"{m['torch_num_threads']} torch threads, {m['cpu_count']} CPUs",
        f"- load average (1/5/15 min): before {report['loadavg_before']}, "
        f"after {report.get('loadavg_after')}",
        f"- float32, p={P}, blur={BLUR}; uniform clouds in the unit cube (seed {cfg['seed']}), "
        f"pair (x, y + {SHIFT}); bunny upsampled to {cfg['bunny_points']} points, unit diagonal, "
        f"vs a copy rotated {BUNNY_ANGLE:g} deg and shifted by {SHIFT}",
        f"- times: median of {rep} runs, configurations alternated run by run after one "
        f"untimed warm-up each ({warm}); a run over {cfg['max_seconds']:g} s is not repeated",
        f"- reference: geomreg tol={cfg['ref_tol']:g} (float64 below N = {REF_FLOAT64_BELOW}); "
        "rel. err = |S / S_ref - 1|; ratio = geomreg / GeomLoss (< 1: geomreg faster)",
        f"- multiscale options: {cfg['multiscale_options'] or 'defaults'}"
        + (" (--quick)" if cfg["quick"] else ""),
        f"- total benchmark time: {report['total_s']:.0f} s",
        "",
    ]
    out += [f"- {s}" for s in report["skipped"]] + ([""] if report["skipped"] else [])

    out += ["## 1. Converged references", ""]
    rows = []
    for c in cases:
        r = c["reference"]
        if r["value"] is None:
            rows.append([c["case"], c["n"], "failed", r["dtype"], "", "", "", r["error"], "", ""])
            continue
        rows.append([c["case"], c["n"], r["backend"], r["dtype"], r["n_iter"],
                     fmt_err(r["marginal_error"]), "yes" if r["converged"] else "no",
                     f"{r['value']:.7g}", fmt_s(r["time_s"]),
                     f"{c['loadavg_before']} -> {c['loadavg_after']}"])
    out += [md_table(["case", "N", "backend", "dtype", "iterations", "marginal err.", "converged",
                      "S_ref", "time (s)", "load before -> after"], rows), ""]

    out += ["## 2. Time to a value within 1% of the reference (fastest such configuration)", ""]
    rows = []
    for c in cases:
        b = c["within_1pct"]
        cells: list[Any] = [c["case"], c["n"]]
        for tool in ("geomreg", "GeomLoss"):
            cells += [b[tool]["label"] or "none < 1%", fmt_s(b[tool]["median_s"])]
        cells += [fmt_ratio(b["geomreg"]["median_s"], b["GeomLoss"]["median_s"]),
                  f"<= {GOAL_BEST:.2f}" if c["n"] in GOAL_BEST_SIZES else ""]
        rows.append(cells)
    out += [md_table(["case", "N", "geomreg config", "geomreg (s)", "GeomLoss config",
                      "GeomLoss (s)", "ratio", "goal"], rows), ""]

    out += ["## 3. Same work: geomreg tol=inf vs GeomLoss, same schedule (scaling 0.5)", ""]
    rows = []
    for c in cases:
        for s in c["same_work"]:
            gr, gl = c["configs"][s["geomreg"]], c["configs"][s["GeomLoss"]]
            rows.append([c["case"], c["n"], s["backend"], gr.get("n_iter", "n/a"),
                         fmt_s(gr["median_s"]) if not gr["error"] else "failed",
                         fmt_s(gl["median_s"]) if not gl["error"] else "failed",
                         fmt_ratio(gr["median_s"], gl["median_s"]), f"<= {GOAL_SAME:g}",
                         fmt_err(s["value_rel_diff"])])
    out += [md_table(["case", "N", "backend", "iterations", "geomreg (s)", "GeomLoss (s)", "ratio",
                      "goal", "values' rel. diff"], rows) if rows else "(no GeomLoss runs)", ""]

    out += ["## 4. Every configuration: time and error against the reference", ""]
    rows = []
    for c in cases:
        for cf in c["configs"].values():
            ran_on = cf.get("backend") or cf["params"].get("backend", "")
            rows.append([c["case"], c["n"], cf["tool"], cf["label"], ran_on,
                         fmt_s(cf["median_s"]), cf["runs"], cf.get("n_iter", ""),
                         fmt_err(cf["rel_err"]),
                         "yes" if cf["rel_err"] is not None and cf["rel_err"] < WITHIN else "no",
                         note_of(cf, cfg["max_seconds"])])
    out += [md_table(["case", "N", "tool", "configuration", "ran on", "median (s)", "runs",
                      "iterations", "rel. err", "< 1%", "note"], rows), ""]

    out += ["## 5. Peak memory of a fresh child process (VmHWM), uniform pair (x, y + 0.1)", ""]
    mem = report["memory"]
    base = next((r.get("peak_rss_kib") for r in mem if r["spec"]["what"] == "baseline"), None)
    rows = []
    for r in mem:
        kib = r.get("peak_rss_kib")
        is_base = r["spec"]["what"] == "baseline"
        over = "" if is_base or kib is None or base is None else f"{(kib - base) / 1024:.0f}"
        rows.append([r["label"], fmt_mib(kib), over, "" if is_base else fmt_s(r.get("time_s")),
                     f"{r['value']:.7g}" if r.get("value") is not None else "",
                     r.get("error", "")])
    out += [md_table(["process", "peak RSS (MiB)", "over baseline (MiB)", "time (s)", "S", "note"],
                     rows) if rows else "(skipped)", ""]
    if any("cuda_max_allocated_bytes" in r for r in mem):
        out += ["GPU memory (torch.cuda.max_memory_allocated) is in the JSON.", ""]

    out += ["## 6. Pair throughput of one softmin (log-sum-exp over j), float32", ""]
    rows = []
    for r in report["throughput"]:
        diff = r.get("max_abs_diff_vs_keops")
        rows.append([r["implementation"], f"{r['n']} x {r['m']}", fmt_s(r.get("median_s")),
                     f"{r['pairs_per_s']:.3g}" if r.get("pairs_per_s") else "n/a",
                     f"{diff:.1e}" if diff is not None else "", r.get("error", "")])
    out += [md_table(["implementation", "N x M", "median (s)", "pairs / s", "max |diff| vs KeOps",
                      "note"], rows) if rows else "(skipped)", ""]
    return "\n".join(out)


# -- driver ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000],
                    help=f"numbers of points N (= M) of the uniform cases; N >= {GEOMREG_ONLY} "
                         "runs geomreg multiscale alone")
    ap.add_argument("--repeats", type=int, default=None,
                    help=f"timed runs per configuration (when not given: 3, and 1 from N = {LARGE})")
    ap.add_argument("--max-seconds", type=float, default=600.0,
                    help="a configuration whose single run takes longer is not repeated")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K")
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results", help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="torch seed of the inputs")
    ap.add_argument("--ref-tol", type=float, default=1e-6, help="tolerance of the reference")
    ap.add_argument("--ref-max-iter", type=int, default=1000,
                    help="iteration cap of the reference (float32 may stall above --ref-tol)")
    ap.add_argument("--ref-backend", default="best",
                    help="backend of the reference: best (multiscale, else auto) or a name")
    ap.add_argument("--truncate", type=float, default=None,
                    help="geomreg multiscale: truncation (passed only when given)")
    ap.add_argument("--cluster-scale", type=float, default=None,
                    help="geomreg multiscale: grid cell size (passed only when given)")
    ap.add_argument("--bunny", type=Path, default=BUNNY, help="the bunny scan (PLY)")
    ap.add_argument("--bunny-points", type=int, default=100_000, help="points of the upsampled bunny")
    ap.add_argument("--skip-geomloss", action="store_true", help="time geomreg alone")
    ap.add_argument("--skip-bunny", action="store_true", help="skip the bunny case")
    ap.add_argument("--online-200k", action="store_true",
                    help="also measure the peak memory of one geomreg online softmin and its "
                         "gradient at N = 200000 (a few minutes)")
    ap.add_argument("--memory-only", action="store_true",
                    help="run only the peak-memory child processes (section 5)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: N = 2000 only (bunny too), 1 repeat, one tiny memory child, "
                         f"pair throughput at N = {PAIRS_N_DENSE}")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: memory child
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.bunny_points = [2000], 1, 2000
    if any(n < 2 for n in args.sizes) or (args.repeats is not None and args.repeats < 1):
        ap.error("sizes must be >= 2, repeats >= 1")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        ap.error(f"--device must be cpu, cuda or cuda:K, not {args.device!r}")
    return args


def build_cases(args: argparse.Namespace, skipped: list[str]) -> list[tuple[str, int, Any]]:
    """(name, N, loader) in order of N, the bunny after the uniform case of its size."""
    cases: list[tuple[int, int, str, Any]] = [
        (n, 0, "uniform", lambda n=n: (*uniform_case(n, args.seed), {}))
        for n in sorted(set(args.sizes))
    ]
    if args.skip_bunny:
        skipped.append("bunny case: skipped (--skip-bunny)")
    elif not args.bunny.is_file():
        msg = f"bunny case: skipped, no file {args.bunny} (see ../shared/data/README.md)"
        log(msg)
        skipped.append(msg)
    else:
        cases.append((args.bunny_points, 1, "bunny",
                      lambda: bunny_case(args.bunny, args.bunny_points, args.seed)))
    return [(name, n, load) for n, _, name, load in sorted(cases, key=lambda c: c[:2])]


def run(args: argparse.Namespace, dev: torch.device, json_path: Path, md_path: Path) -> dict[str, Any]:
    """Every measure in turn; the JSON and markdown are rewritten after each case."""
    t_start = time.perf_counter()
    vers = versions()
    if not args.skip_geomloss:
        import geomloss

        vers["geomloss"] = geomloss.__version__
    report: dict[str, Any] = {
        "benchmark": "bench/bench_scale.py",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "settings": {"sizes": args.sizes, "repeats": args.repeats, "max_seconds": args.max_seconds,
                     "device": args.device, "seed": args.seed, "dtype": "float32", "p": P,
                     "blur": BLUR, "shift": SHIFT, "geomloss_scalings": list(GEOMLOSS_SCALINGS),
                     "ref_tol": args.ref_tol, "ref_max_iter": args.ref_max_iter,
                     "ref_backend": args.ref_backend, "multiscale_options": multiscale_options(args),
                     "bunny": str(args.bunny), "bunny_points": args.bunny_points,
                     "skip_geomloss": args.skip_geomloss, "online_200k": args.online_200k,
                     "quick": args.quick, "memory_only": args.memory_only},
        "versions": vers,
        "machine": machine_info(dev),
        "loadavg_before": loadavg(),
        "skipped": [],
        "throughput": [],
        "cases": [],
        "memory": [],
    }
    log(f"machine: {report['machine']['device_name']}, {report['machine']['cpu_count']} CPUs, "
        f"{report['machine']['torch_num_threads']} torch threads, load {report['loadavg_before']}")

    def save() -> None:
        report["total_s"] = time.perf_counter() - t_start
        json_path.write_text(json.dumps(report, indent=1, default=str))
        md_path.write_text(render(report) + "\n")

    if args.memory_only:  # the peak-memory children alone (e.g. N = 1M, online at 200k)
        report["memory"] = measure_memory(args)
        report["loadavg_after"] = loadavg()
        save()
        return report
    report["throughput"] = measure_throughput(dev, args.seed, PAIRS_N_DENSE if args.quick else PAIRS_N)
    save()

    cases = build_cases(args, report["skipped"])
    if args.quick or any(n >= LARGE for _, n, _ in cases):
        # Large cases (and --quick) get no full-size warm-up: every code path (and KeOps
        # formula) runs once here, on 200 points.
        log("warm-up of every configuration on 200 points ...")
        x, y = (t.to(dev) for t in uniform_case(200, args.seed))
        for c in make_configs(DENSE_MAX, args):  # every kind of configuration
            run_once(c, x, y, dev)
    for name, n, load in cases:
        try:
            x, y, info = load()
        except Exception as exc:  # noqa: BLE001 - e.g. an unreadable bunny file
            msg = f"{name} N={n}: skipped, inputs not available ({one_line(exc)})"
            log(msg)
            report["skipped"].append(msg)
            continue
        result = measure_case(name, n, x.to(dev), y.to(dev), dev, args)
        result["inputs"] = info
        report["cases"].append(result)
        save()
        del x, y
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    report["memory"] = measure_memory(args)
    report["loadavg_after"] = loadavg()
    save()
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child_main(args.child)
    return bench_main("scale", args, run, render)


if __name__ == "__main__":
    sys.exit(main())

"""A 512^2 image pair at a one-pixel blur: how far the epsilon-schedule alone is from the converged value.

The pair is bench_grid.py's (the GeomLoss crescents resized to ``--size``^2; synthetic blobs
when the files are absent), or any two PNGs (``--files``), p = 2, scaling 0.5, blur = 1 / size. Converging at that blur takes
thousands of iterations (11 233 at 512^2 in float64 to tol 1e-3, about an hour here), so
the reference is computed once, apart:

    python bench/one_pixel.py --reference-tols 1e-3,1e-4      # prints the reference values

and given to the timed runs:

    python bench/one_pixel.py --reference 0.0320097 --repeats 5

Each reference stage starts from the last one's potentials (``init``); the value, the
iterations, the marginal error and the certified bound are printed per stage.

The timed runs, alternated, after one untimed warm-up each: geomreg's grid backend with
``tol=inf`` (the schedule, nothing more) in float32 and float64, and GeomLoss 0.3.1's grid
solver (``sinkhorn_divergence``) with the same blur and scaling. Printed: the median time of
each, its value, its error against the reference, and the load average before and after.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from bench_grid import DATA, PAIR, case_arrays, image_density, to_measures
from common import loadavg, median, timed

import geomreg


def reference(mu, nu, n: int, tols: list[float]) -> None:
    """Converge in float64 to each tolerance in turn, each stage warm-started from the last."""
    init = None
    for tol in tols:
        t0 = time.perf_counter()
        r = geomreg.divergence(mu, nu, blur=1.0 / n, backend="grid", dtype="float64", tol=tol,
                               max_iter=10**6, init=init)
        print(f"tol {tol:g}: value {r.value:.10g}, {r.n_iter} iterations, marginal error "
              f"{r.marginal_error:.3g}, certified bound {r.error_bound:.3g}, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        init = r


def timed_runs(mu, nu, a, b, n: int, ref: float, repeats: int) -> None:
    """geomreg (tol=inf, float32 and float64) against GeomLoss's grid solver, alternated."""
    blur = 1.0 / n
    runs = {f"geomreg grid, tol=inf, {dt}": (lambda dt=dt: float(geomreg.divergence(
        mu, nu, blur=blur, backend="grid", dtype=dt, tol=math.inf, diameter=1.0).value))
        for dt in ("float32", "float64")}
    try:
        from geomloss import sinkhorn_divergence
    except ImportError:
        print("GeomLoss is not installed: geomreg alone", file=sys.stderr)
    else:
        ga, gb = (torch.as_tensor(m / m.sum(), dtype=torch.float32)[None, None] for m in (a, b))
        runs["GeomLoss sinkhorn_divergence"] = lambda: float(
            sinkhorn_divergence(ga, gb, p=2, blur=blur, scaling=0.5).reshape(-1)[0])
    times: dict[str, list[float]] = {k: [] for k in runs}
    values: dict[str, float] = {}
    for k, fn in runs.items():  # untimed warm-up
        values[k] = fn()
    before = loadavg()
    for _ in range(repeats):
        for k, fn in runs.items():
            t, values[k] = timed(fn, torch.device("cpu"))
            times[k].append(t)
    after = loadavg()
    print(f"{n}^2, blur 1/{n}, reference {ref:.8g}; load average {before} -> {after}; "
          f"medians of {repeats}")
    for k in runs:
        print(f"  {k}: {median(times[k]):.3f} s, value {values[k]:.8g}, "
              f"{100 * (values[k] / ref - 1):+.2f} % from the reference")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--reference-tols", default=None,
                    help="compute the reference: comma-separated tolerances, run in turn")
    ap.add_argument("--reference", type=float, default=None, help="the reference value")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--files", type=Path, nargs=2, default=None,
                    help="another pair of PNGs (density 1 - gray / 255, as bench_grid.py's)")
    args = ap.parse_args()
    if args.files:
        a, b = (image_density(f, args.size) for f in args.files)
        src = f"{args.files[0]} and {args.files[1]}, resized to {args.size}^2"
    else:
        a, b, src = case_arrays("image", args.size, DATA, PAIR, 0)
    src += f"; pixels with mass: {100 * (a > 0).mean():.1f} % and {100 * (b > 0).mean():.1f} %"
    print(f"pair: {src}", file=sys.stderr)
    mu, nu = to_measures(a, b)
    if args.reference_tols:
        reference(mu, nu, args.size, [float(t) for t in args.reference_tols.split(",")])
    if args.reference is not None:
        timed_runs(mu, nu, a, b, args.size, args.reference, args.repeats)
    if not args.reference_tols and args.reference is None:
        ap.error("give --reference-tols, --reference or both")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

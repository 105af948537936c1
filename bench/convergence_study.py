"""How close is the default stopping rule to the fully converged divergence?

For uniform 3-D clouds (N = 600, M = 500, float64), several blurs, p = 1 and 2, balanced
and unbalanced, shifted or not: relative error of the value at several tolerances (and
GeomLoss's schedule alone, tol = inf) against a run to tol = 1e-9. Prints a table and the
worst case per tolerance. Usage: python bench/convergence_study.py [cpu|cuda]   (default: cuda when available)
"""

import math
import sys
import time

import torch

import geomreg

TOLS = (math.inf, 1e-2, 3e-3, 1e-3)


def main() -> None:
    device = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {device}")
    torch.manual_seed(0)
    worst = dict.fromkeys(TOLS, 0.0)
    iters = dict.fromkeys(TOLS, 0)
    t0 = time.time()
    for shift in (0.0, 0.2):
        for blur in (0.01, 0.05, 0.1):
            for p in (1, 2):
                for reach in (None, 0.3):
                    x = torch.rand(600, 3, dtype=torch.float64).to(device)
                    y = (torch.rand(500, 3, dtype=torch.float64) + shift).to(device)
                    kw = dict(p=p, blur=blur, reach=reach, max_iter=50000)
                    ref = geomreg.divergence(x, y, tol=1e-9, **kw)
                    row = [f"shift={shift} blur={blur} p={p} reach={reach}: "
                           f"S={ref.value.item():.4e} ({ref.n_iter} it)"]
                    for tol in TOLS:
                        r = geomreg.divergence(x, y, tol=tol, **kw)
                        rel = abs(r.value.item() / ref.value.item() - 1)
                        worst[tol] = max(worst[tol], rel)
                        iters[tol] = max(iters[tol], r.n_iter)
                        row.append(f"tol={tol:g}: {rel:.1e} ({r.n_iter} it)")
                    print(" | ".join(row), flush=True)
    for tol in TOLS:
        print(f"tol={tol:g}: worst relative error {worst[tol]:.2e}, most iterations {iters[tol]}")
    print(f"total {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# `make demo`: geomreg distance on the sample data, every loss, images, match, flow and register
# (outputs and pictures in demo_output/), then the JSON of one run.
set -euo pipefail
cd "$(dirname "$0")/.."
G=.venv/bin/geomreg
A=sample_data/spiral_a.ply
B=sample_data/spiral_b.ply

echo "== geomreg distance $A $B  (one value per loss, blur 0.05)"
for loss in sinkhorn hausdorff energy gaussian laplacian; do
  printf '%-10s %s\n' "$loss" "$($G distance "$A" "$B" --loss "$loss")"
done
printf '%-10s %s\n' "unbalanced" "$($G distance "$A" "$B" --reach 0.3)"
printf '%-10s %s\n' "p=1" "$($G distance "$A" "$B" --p 1)"

echo
echo "== per-point weights: spiral_a weighted by sample_data/spiral_a_weights.npy"
$G distance "$A" "$B" --weights-a sample_data/spiral_a_weights.npy

echo
echo "== density images on their pixel grids: sample_data/blob_a.png vs blob_b.png"
$G distance sample_data/blob_a.png sample_data/blob_b.png --blur 0.02

OUT=demo_output
mkdir -p "$OUT"
echo
echo "== registration: match (one transport map) and flow (50 Euler steps), S before / after"
$G match "$A" "$B" --out "$OUT/matched.ply" --plot "$OUT/match.png" --evaluate --json | .venv/bin/python -c '
import json, sys; r = json.load(sys.stdin); print("match", r["value"], "->", r["divergence_after"])'
$G flow "$A" "$B" --out "$OUT/flowed.ply" --plot "$OUT/flow.png" --json | .venv/bin/python -c '
import json, sys; r = json.load(sys.stdin); print("flow ", r["loss_initial"], "->", r["loss_final"], "in", r["n_steps"], "steps")'
echo
echo "== rigid registration: spiral_a against itself turned by 60 degrees about z and shifted"
.venv/bin/python -c '
import numpy as np, sys
from geomreg.io import read_measure
x = read_measure(sys.argv[1]).points
c, s = np.cos(np.pi / 3), np.sin(np.pi / 3)
np.save(sys.argv[2], x @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).T + [0.2, -0.1, 0.05])' "$A" "$OUT/turned.npy"
$G register "$A" "$OUT/turned.npy" --out "$OUT/registered.ply" --transform "$OUT/T.txt" \
  --plot "$OUT/register.png"
echo "T.txt (the rotation by 60 degrees: cos = 0.5, sin = 0.866; then the shift):"
cat "$OUT/T.txt"
echo "pictures: $OUT/match.png $OUT/flow.png $OUT/register.png"

echo
echo "== the eps-scaling log and the JSON result of one run"
$G distance "$A" "$B" --verbose --json | .venv/bin/python -c '
import json, sys
r = json.load(sys.stdin)
keep = ["value", "loss", "p", "blur", "n_points", "backend", "device", "dtype",
        "converged", "n_iter", "marginal_error", "time_s"]
print(json.dumps({k: r[k] for k in keep}, indent=1))'

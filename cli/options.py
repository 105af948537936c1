"""Command-line options shared by the commands (``distance``, ``match``): one definition each."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

LOSS_HELP = (
    "sinkhorn (debiased entropic OT, S_eps), hausdorff, energy (half the energy distance), "
    "gaussian, laplacian (kernel MMDs: 1/2 |a - b|_k^2)."
)

SourceArg = Annotated[
    Path, typer.Argument(metavar="A", help="Source measure: .ply .pcd .xyz .pts .npy .txt .csv .las .laz, "
                         "a mesh (.obj .off .stl, .ply with faces: its vertices) or an image (.png ...)")
]
TargetArg = Annotated[
    Path, typer.Argument(metavar="B", help="Target measure, same kinds (same dimension as A).")
]
Loss = Annotated[str, typer.Option(help=LOSS_HELP)]
P = Annotated[int, typer.Option("--p", help="Cost exponent: 1 (|x-y|) or 2 (|x-y|^2/2).")]
BLUR_HELP = ("Blur sigma, a length in the inputs' units (the default suits shapes about 1 across): "
             "eps = blur^p; kernel width for gaussian/laplacian.")
Blur = Annotated[float, typer.Option(help=BLUR_HELP)]
Reach = Annotated[
    float | None, typer.Option(help="Unbalanced OT with rho = reach^p (sinkhorn). Default: balanced.")
]
Diameter = Annotated[
    float | None, typer.Option(help="Largest distance of the problem (default: bounding-box diagonal).")
]
Scaling = Annotated[float, typer.Option(help="Ratio of successive blurs in the eps-schedule, in (0, 1).")]
Debias = Annotated[bool, typer.Option("--debias/--no-debias", help="Debiased S_eps, or OT_eps.")]
Tol = Annotated[
    float,
    typer.Option(help="Stop when every marginal error is <= tol; 'inf' runs GeomLoss's schedule only."),
]
MaxIter = Annotated[int, typer.Option(help="Most Sinkhorn iterations, schedule included.")]
Backend = Annotated[
    str,
    typer.Option(
        help="auto, tensorized (dense), online (KeOps, linear memory), multiscale "
        "(clusters + truncation, one pair of clouds in D <= 3, linear memory) or grid "
        "(two density images or volumes: separable convolutions on image pyramids; "
        "auto's choice for them with sinkhorn p=2 and gaussian)."
    ),
]
Truncate = Annotated[
    float | None,
    typer.Option(
        help="multiscale: drop blocks whose plan weight is below exp(-T) of the best "
        "(default 6 for p=2, 15 for p=1; kernels: 25)."
    ),
]
ClusterScale = Annotated[
    float | None,
    typer.Option(help="multiscale: side of the grid cells that form the clusters (default: automatic)."),
]
Device = Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda.")]
Dtype = Annotated[str, typer.Option(help="float32 or float64.")]
WeightsA = Annotated[Path | None, typer.Option(help="Weights of A: .npy or text, one per point.")]
WeightsB = Annotated[Path | None, typer.Option(help="Weights of B: .npy or text, one per point.")]
WeightProperty = Annotated[
    str | None, typer.Option(help="Per-vertex PLY property used as weights of both A and B.")
]
Mass = Annotated[str, typer.Option(help="Images: 'dark' (dark pixels carry mass) or 'bright'.")]
AsImage = Annotated[
    bool,
    typer.Option("--as-image", help="Read 2-D .npy arrays as density images (first row on top), "
                 "not as (N, D) point clouds. Rank-3 .npy arrays are always density volumes."),
]
Sample = Annotated[
    int | None,
    typer.Option(min=1, help="Read N points of each input: on a mesh, N points drawn uniformly on its "
                 "surface; on a cloud (LAS included), N of its points at random (all when it has fewer). "
                 "Seeded by --seed. Not for images."),
]
MeshWeights = Annotated[
    str | None,
    typer.Option("--weights", help="'area': weigh each vertex of a mesh input by a third of the area of "
                 "its triangles (normalised); inputs that are not meshes keep their weights."),
]
Classes = Annotated[
    str | None,
    typer.Option(help="LAS/LAZ inputs: keep only the points of these classification codes, e.g. 2,6 "
                 "(other inputs are read whole)."),
]
KeepMass = Annotated[
    bool, typer.Option("--keep-mass", help="Do not normalise weights to mass 1 (for unbalanced OT).")
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Print the eps-scaling log on stderr.")]
Log = Annotated[Path | None, typer.Option(help="Write the eps-scaling log as JSON lines to this file.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the value.")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
Seed = Annotated[
    int,
    typer.Option(min=0, max=2**32 - 1,
                 help="Seed of Python's, numpy's and torch's random generators, set before the "
                 "computation (recorded in --json with the options, versions and the inputs' sha256)."),
]

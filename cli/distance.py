"""``geomreg distance A B``: one divergence between two files, printed as data."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from geomreg import defaults

from .errors import EXIT_NOT_CONVERGED, handle_errors
from .output import (
    dumps,
    err_console,
    grid_summary,
    multiscale_summary,
    print_data,
    schedule_table,
    warn,
)

LOSS_HELP = (
    "sinkhorn (debiased entropic OT, S_eps), hausdorff, energy (half the energy distance), "
    "gaussian, laplacian (kernel MMDs: 1/2 |a - b|_k^2)."
)


def distance(
    a: Annotated[
        Path, typer.Argument(metavar="A", help="Source measure: .ply .pcd .xyz .pts .npy .txt .csv .png")
    ],
    b: Annotated[Path, typer.Argument(metavar="B", help="Target measure, same kinds (same dimension as A).")],
    loss: Annotated[str, typer.Option(help=LOSS_HELP)] = "sinkhorn",
    p: Annotated[int, typer.Option("--p", help="Cost exponent: 1 (|x-y|) or 2 (|x-y|^2/2).")] = defaults.P,
    blur: Annotated[
        float, typer.Option(help="Blur sigma: eps = blur^p; kernel width for gaussian/laplacian.")
    ] = defaults.BLUR,
    reach: Annotated[
        float | None, typer.Option(help="Unbalanced OT with rho = reach^p (sinkhorn). Default: balanced.")
    ] = None,
    diameter: Annotated[
        float | None, typer.Option(help="Largest distance of the problem (default: bounding-box diagonal).")
    ] = None,
    scaling: Annotated[
        float, typer.Option(help="Ratio of successive blurs in the eps-schedule, in (0, 1).")
    ] = defaults.SCALING,
    debias: Annotated[bool, typer.Option("--debias/--no-debias", help="Debiased S_eps, or OT_eps.")] = True,
    tol: Annotated[
        float,
        typer.Option(help="Stop when every marginal error is <= tol; 'inf' runs GeomLoss's schedule only."),
    ] = defaults.TOL,
    max_iter: Annotated[
        int, typer.Option(help="Most Sinkhorn iterations, schedule included.")
    ] = defaults.MAX_ITER,
    backend: Annotated[
        str,
        typer.Option(
            help="auto, tensorized (dense), online (KeOps, linear memory), multiscale "
            "(clusters + truncation, one pair of clouds in D <= 3, linear memory) or grid "
            "(two density images or volumes: separable convolutions on image pyramids; "
            "auto's choice for them with sinkhorn p=2 and gaussian)."
        ),
    ] = "auto",
    truncate: Annotated[
        float | None,
        typer.Option(
            help="multiscale: drop blocks whose plan weight is below exp(-T) of the best "
            "(default 5 for p=2, 15 for p=1; kernels: 25)."
        ),
    ] = None,
    cluster_scale: Annotated[
        float | None,
        typer.Option(help="multiscale: side of the grid cells that form the clusters (default: automatic)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="float32 or float64.")] = "float32",
    weights_a: Annotated[Path | None, typer.Option(help="Weights of A: .npy or text, one per point.")] = None,
    weights_b: Annotated[Path | None, typer.Option(help="Weights of B: .npy or text, one per point.")] = None,
    weight_property: Annotated[
        str | None, typer.Option(help="Per-vertex PLY property used as weights of both A and B.")
    ] = None,
    mass: Annotated[str, typer.Option(help="Images: 'dark' (dark pixels carry mass) or 'bright'.")] = "dark",
    as_image: Annotated[
        bool,
        typer.Option("--as-image", help="Read 2-D .npy arrays as density images (first row on top), "
                     "not as (N, D) point clouds. Rank-3 .npy arrays are always density volumes."),
    ] = False,
    keep_mass: Annotated[
        bool, typer.Option("--keep-mass", help="Do not normalise weights to mass 1 (for unbalanced OT).")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Print the eps-scaling log on stderr.")
    ] = False,
    log: Annotated[
        Path | None, typer.Option(help="Write the eps-scaling log as JSON lines to this file.")
    ] = None,
    potentials: Annotated[
        str | None,
        typer.Option(
            help="Write the dual potentials to PREFIX_a.npy and PREFIX_b.npy: one value per point, "
            "or per pixel shaped like the image (NaN off the support unless the grid backend "
            "ran), with PREFIX_a.png / PREFIX_b.png heat maps for 2-D images."
        ),
    ] = None,
    field: Annotated[
        Path | None,
        typer.Option(
            help="sinkhorn: write the displacement field of A's points to this .npy: (N, D), or "
            "(H, W, 2) for an image (components x right, y up; rows as in the file)."
        ),
    ] = None,
    cost: Annotated[
        str | None,
        typer.Option(
            help="Ground cost as a KeOps formula in X and Y, e.g. 'SqDist(X,Y)/2' (online backend)."
        ),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of the value.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Compute the divergence between measures A and B and print it on stdout.

    Weights are normalised to total mass 1 unless --keep-mass. Images are density maps
    (dark is mass unless --mass bright) on square pixels, the longer side spanning [0, 1].
    Two images (or two volumes) are solved on their pixel grids by the grid backend.
    """
    with handle_errors(debug):
        from geomreg.io import check_output, read_measure
        from geomreg.params import check_params

        check_params(loss, p, blur, reach, scaling, tol, max_iter, diameter)
        if field is not None and loss != "sinkhorn":
            from geomreg.errors import ParameterError

            raise ParameterError("--field", f"needs --loss sinkhorn, not {loss}")
        inputs = [a, b] + [w for w in (weights_a, weights_b) if w is not None]
        outputs = [log, field]
        if potentials is not None:
            outputs += [Path(f"{potentials}_a.npy"), Path(f"{potentials}_b.npy")]
        for out in outputs:
            if out is not None:
                check_output(out, protect=inputs)

        mu = read_measure(a, weights=weights_a, weight_property=weight_property, mass=mass,
                          as_image=as_image)
        nu = read_measure(b, weights=weights_b, weight_property=weight_property, mass=mass,
                          as_image=as_image)
        if potentials is not None:
            for m, side in ((mu, "a"), (nu, "b")):
                if _is_image(m):
                    check_output(Path(f"{potentials}_{side}.png"), protect=inputs)
        result = _compute(
            mu,
            nu,
            loss=loss,
            p=p,
            blur=blur,
            reach=reach,
            diameter=diameter,
            scaling=scaling,
            debias=debias,
            tol=tol,
            max_iter=max_iter,
            backend=backend,
            device=device,
            dtype=dtype,
            normalize=not keep_mass,
            potentials=potentials is not None,
            cost=cost,
            truncate=truncate,
            cluster_scale=cluster_scale,
            field=field is not None,
        )
        if result.backend_fallback:
            warn(result.backend_fallback)

        _write_outputs(result, (mu, nu), log=log, potentials=potentials, field=field, protect=inputs)
        if verbose and result.schedule:
            err_console().print(schedule_table(result.schedule))
        if verbose and result.multiscale:
            err_console().print(multiscale_summary(result.multiscale))
        if verbose and result.grid:
            err_console().print(grid_summary(result.grid))
        if verbose:
            err_console().print(
                f"{result.loss} = {result.value.item():.6g} | backend {result.backend} "
                f"({result.backend_reason}) | {result.device} {result.dtype} | "
                f"{result.n_iter} iterations | marginal error {result.marginal_error} | "
                f"{result.time_s:.3f} s"
            )
        record = result.to_dict()
        record.update(a=str(a), b=str(b), mass=mass, keep_mass=keep_mass)
        print_data(dumps(record) if json_out else repr(result.value.item()))
        if not result.converged:
            warn(
                f"not converged after {result.n_iter} iterations: marginal error "
                f"{result.marginal_error:.3g} > --tol {tol:g}; raise --max-iter or --blur"
            )
            raise typer.Exit(EXIT_NOT_CONVERGED)


def _compute(mu, nu, **kwargs):
    """Run the divergence with a transient status line on stderr for long runs."""
    from geomreg.api import divergence

    console = err_console()
    if not console.is_terminal:
        return divergence(mu, nu, **kwargs)
    started = time.perf_counter()
    with console.status("computing...", spinner="dots") as status:

        def on_step(step):
            if time.perf_counter() - started > 0.5:
                status.update(
                    f"Sinkhorn step {step.index} ({step.phase}) eps={step.eps:.3g} "
                    f"marginal error={step.marginal_error:.2e}"
                )

        return divergence(mu, nu, on_step=on_step, **kwargs)


def _write_outputs(result, measures, *, log, potentials, field, protect) -> None:
    """Write the requested files together: all of them, or none if one fails."""
    from geomreg.io import atomic_write_many, npy_writer, png_heatmap_writer, text_writer

    jobs = []
    if log is not None:
        jobs.append((log, text_writer("".join(dumps(s.to_dict()) + "\n" for s in result.schedule))))
    if potentials is not None:
        for m, t, side in zip(measures, result.potentials, "ab", strict=True):
            values = _per_pixel(m, t.detach().cpu().double().numpy())
            jobs.append((f"{potentials}_{side}.npy", npy_writer(values)))
            if _is_image(m):
                jobs.append((f"{potentials}_{side}.png", png_heatmap_writer(values)))
    if field is not None:
        jobs.append((field, npy_writer(_per_pixel(measures[0], result.field.cpu().double().numpy()))))
    if jobs:
        atomic_write_many(jobs, protect=protect)


def _is_image(m) -> bool:
    return m.grid is not None and len(m.grid.shape) == 2


def _per_pixel(m, values):
    """Per-point values of a measure, or for images and volumes one per pixel.

    Pixel values are shaped like the input file, NaN on the pixels without mass when only
    those with mass were computed (a point backend).
    """
    import numpy as np

    if m.grid is None:
        return values
    if values.shape[0] != m.grid.size:  # a point backend: the pixels with mass only
        full = np.full((m.grid.size, *values.shape[1:]), np.nan)
        full[m.grid.mask] = values
        values = full
    return m.grid.to_array(values)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("distance")(distance)

"""``geomreg distance A B``: one divergence between two files, printed as data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geomreg import defaults

from . import options as o
from .errors import EXIT_NOT_CONVERGED, handle_errors, uninterrupted
from .output import (
    dumps,
    err_console,
    grid_summary,
    multiscale_summary,
    per_pixel,
    print_data,
    schedule_table,
    status_line,
    warn,
)
from .reproduce import seeded


def distance(
    ctx: typer.Context,
    a: o.SourceArg,
    b: o.TargetArg,
    loss: o.Loss = "sinkhorn",
    p: o.P = defaults.P,
    blur: o.Blur = defaults.BLUR,
    reach: o.Reach = None,
    diameter: o.Diameter = None,
    scaling: o.Scaling = defaults.SCALING,
    debias: o.Debias = True,
    tol: o.Tol = defaults.TOL,
    max_iter: o.MaxIter = defaults.MAX_ITER,
    backend: o.Backend = "auto",
    truncate: o.Truncate = None,
    cluster_scale: o.ClusterScale = None,
    device: o.Device = "auto",
    dtype: o.Dtype = "float32",
    weights_a: o.WeightsA = None,
    weights_b: o.WeightsB = None,
    weight_property: o.WeightProperty = None,
    mass: o.Mass = "dark",
    as_image: o.AsImage = False,
    sample: o.Sample = None,
    weights: o.MeshWeights = None,
    classes: o.Classes = None,
    keep_mass: o.KeepMass = False,
    verbose: o.Verbose = False,
    log: o.Log = None,
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
    seed: o.Seed = 0,
    json_out: o.JsonOut = False,
    debug: o.Debug = False,
) -> None:
    """Compute the divergence between measures A and B and print it on stdout.

    Weights are normalised to total mass 1 unless --keep-mass. Images are density maps
    (dark is mass unless --mass bright) on square pixels, the longer side spanning [0, 1].
    Two images (or two volumes) are solved on their pixel grids by the grid backend.
    """
    with handle_errors(debug):
        from geomreg.io import check_output
        from geomreg.params import check_params

        from .inputs import read_pair

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

        mu, nu = read_pair(a, b, weights_a=weights_a, weights_b=weights_b, weight_property=weight_property,
                           mass=mass, as_image=as_image, sample=sample, weights=weights, classes=classes,
                           seed=seed)
        if potentials is not None:
            for m, side in ((mu, "a"), (nu, "b")):
                if _is_image(m):
                    check_output(Path(f"{potentials}_{side}.png"), protect=inputs)
        rerun = seeded(ctx, seed)
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
                f"error bound {_bound(result)} | {result.time_s:.3f} s"
            )
        record = result.to_dict()
        record.update(a=str(a), b=str(b), mass=mass, keep_mass=keep_mass, **rerun)
        print_data(dumps(record) if json_out else repr(result.value.item()))
        if not result.converged:
            # stopped before --max-iter: the error stopped falling, at the dtype's rounding floor
            advice = ("raise --max-iter or --blur" if result.n_iter >= max_iter else
                      "it stopped falling (rounding at this blur): try --dtype float64, a larger "
                      "--blur or --tol")
            warn(f"not converged after {result.n_iter} iterations: marginal error "
                 f"{result.marginal_error:.3g} > --tol {tol:g}; {advice}")
            raise typer.Exit(EXIT_NOT_CONVERGED)


def _bound(result) -> str:
    """The certified error bound for the summary line, or why there is none."""
    if result.error_bound is not None:
        return f"{result.error_bound:.3g}"
    if result.loss != "sinkhorn":
        return "exact"
    return "n/a (unbalanced, --tol inf or --cost)"


def _compute(mu, nu, **kwargs):
    """Run the divergence with a transient status line on stderr (in a terminal)."""
    from geomreg.api import divergence

    with status_line("distance") as on_step:
        return divergence(mu, nu, on_step=on_step, **kwargs)


def _write_outputs(result, measures, *, log, potentials, field, protect) -> None:
    """Write the requested files together: all of them, or none if one fails."""
    from geomreg.io import atomic_write_many, npy_writer, png_heatmap_writer, text_writer

    jobs = []
    if log is not None:
        jobs.append((log, text_writer("".join(dumps(s.to_dict()) + "\n" for s in result.schedule))))
    if potentials is not None:
        for m, t, side in zip(measures, result.potentials, "ab", strict=True):
            values = per_pixel(m, t.detach().cpu().double().numpy())
            jobs.append((f"{potentials}_{side}.npy", npy_writer(values)))
            if _is_image(m):
                jobs.append((f"{potentials}_{side}.png", png_heatmap_writer(values)))
    if field is not None:
        jobs.append((field, npy_writer(per_pixel(measures[0], result.field.cpu().double().numpy()))))
    if jobs:
        with uninterrupted():
            atomic_write_many(jobs, protect=protect)


def _is_image(m) -> bool:
    return m.grid is not None and len(m.grid.shape) == 2


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("distance")(distance)

"""``geomreg register A B --model rigid --out REG --transform T.txt``: fit a global transform."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geomreg import defaults

from . import options as o
from .errors import handle_errors, uninterrupted
from .output import dumps, print_data, status_line
from .reproduce import seeded


def register(
    ctx: typer.Context,
    a: o.SourceArg,
    b: o.TargetArg,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write T . A here: .ply (with A's weights), .npy, .txt, .xyz or .csv."),
    ] = None,
    transform: Annotated[
        Path | None,
        typer.Option(help="Write the 4 x 4 homogeneous matrix T (four whitespace-separated rows) here; "
                     "REG = T . A in A's and B's own coordinates (2-D clouds: z is left alone)."),
    ] = None,
    model: Annotated[
        str, typer.Option(help="rigid, similarity (rigid + scale), affine, or rigid+flow (rigid, then the "
                          "Sinkhorn gradient flow of `geomreg flow` with its defaults; T is the rigid part).")
    ] = "rigid",
    blur: o.Blur = defaults.BLUR,
    reach: o.Reach = None,
    levels: Annotated[
        int, typer.Option(help="Blur levels, from a quarter of the diameter down to --blur.")
    ] = 4,
    fits: Annotated[int, typer.Option(help="Transform fits per level.")] = 4,
    voxel: Annotated[
        float | None,
        typer.Option(help="Fit on both clouds resampled to one point per cube of this side (evens out "
                     "uneven scan densities, which transport would otherwise match)."),
    ] = None,
    surface: Annotated[
        bool,
        typer.Option("--surface/--no-surface",
                     help="End with a robust point-to-plane refinement on the full clouds (precise "
                     "whatever the sampling; picks the start with the largest overlap; never for density "
                     "images). --no-surface: transport alone, the lowest divergence wins."),
    ] = True,
    plot: Annotated[
        Path | None,
        typer.Option(help="Draw a picture (.png): A, B and T . A (overlays in 2-D, projections in 3-D, "
                     "densities in 1-D)."),
    ] = None,
    p: o.P = defaults.P,
    tol: o.Tol = defaults.TOL,
    backend: o.Backend = "auto",
    device: o.Device = "auto",
    weights_a: o.WeightsA = None,
    weights_b: o.WeightsB = None,
    weight_property: o.WeightProperty = None,
    keep_mass: o.KeepMass = False,
    seed: o.Seed = 0,
    json_out: o.JsonOut = False,
    debug: o.Debug = False,
) -> None:
    """Fit the rigid (similarity, affine) transform that moves A onto B; no initial guess needed.

    Transport finds the pose: each fit pairs every point of A with the barycentre the Sinkhorn
    plan sends it to, weighted by the mass it sends, and solves the transform in closed form;
    blurs go coarse to fine from several starting orientations (the identity and the
    principal-axis alignments), on clouds resampled to about 500 points. A robust
    point-to-plane refinement against the whole of B then makes it precise: every start
    screened, the best refined, the winner polished (--no-surface: skip it).
    stdout: the final divergence (or one JSON object with --json, with the matrix).
    """
    with handle_errors(debug):
        from geomreg.errors import ParameterError
        from geomreg.io import check_output, points_writer, read_measure, text_writer

        if out is None and transform is None and not json_out:
            raise ParameterError("--out", "give --out, --transform or --json (nothing would be written)")
        inputs = [a, b] + [f for f in (weights_a, weights_b) if f is not None]
        outputs = [f for f in (out, transform, plot) if f is not None]
        for f in outputs:
            check_output(f, protect=inputs)
        if len({f.resolve() for f in outputs}) < len(outputs):
            raise ParameterError("--out", "--out, --transform and --plot must name different files")
        if plot is not None:
            from geomreg.plots import check_path

            check_path(plot)
        if out is not None:
            points_writer(out, [[0.0]])  # an unknown --out format fails before the computation
        mu = read_measure(a, weights=weights_a, weight_property=weight_property)
        nu = read_measure(b, weights=weights_b, weight_property=weight_property)
        if mu.dim > 3:
            raise ParameterError("--model", f"register works in 1 to 3 dimensions, not {mu.dim}")
        # density images and volumes fill their space: no surface to refine against
        surface = surface and mu.grid is None and nu.grid is None
        from geomreg.registration import register as run_register

        rerun = seeded(ctx, seed)
        ran: dict = {}  # the last divergence evaluated: which backend, device, dtype ran

        def on_result(r) -> None:
            ran.update(backend=r.backend, backend_reason=r.backend_reason, device=r.device,
                       dtype=r.dtype, versions=r.versions)

        # --tol when given (rigid+flow: the flow's too); else each stage's own default
        default = getattr(ctx.get_parameter_source("tol"), "name", None) == "DEFAULT"
        given_tol = {} if default else {"tol": tol}
        with status_line("register") as on_step:
            result = run_register(mu, nu, model=model, blur=blur, reach=reach, levels=levels, fits=fits,
                                  voxel=voxel, surface=surface,
                                  p=p, backend=backend, device=device, dtype="float64", **given_tol,
                                  normalize=not keep_mass, on_step=on_step, on_result=on_result)
        t4 = _homogeneous_4x4(result.matrix.numpy())
        jobs = []
        if out is not None:
            jobs.append((out, points_writer(out, result.registered.numpy(), mu.weights)))
        if transform is not None:
            jobs.append((transform, text_writer("".join(" ".join(repr(float(v)) for v in row) + "\n"
                                                        for row in t4))))
        if jobs:
            from geomreg.io import atomic_write_many

            with uninterrupted():
                atomic_write_many(jobs, protect=inputs)
        if plot is not None:
            from geomreg.plots import plot_register

            with uninterrupted():
                plot_register(plot, mu.points, nu.points, result.registered.numpy(),
                              source_weights=mu.weights, target_weights=nu.weights, protect=inputs)
        record = result.to_dict()
        record.update(matrix_4x4=t4.tolist(), a=str(a), b=str(b), blur=blur, reach=reach)
        record.update(**ran, **rerun)
        print_data(dumps(record) if json_out else repr(result.value))


def _homogeneous_4x4(m):
    """A (D+1) x (D+1) homogeneous matrix as 4 x 4 (missing axes untouched)."""
    import numpy as np

    d = m.shape[0] - 1
    t4 = np.eye(4)
    t4[:d, :d], t4[:d, 3] = m[:d, :d], m[:d, d]
    return t4


def register_command(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("register")(register)

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
        typer.Option("--out", help="Write A registered here: .ply (with A's weights), .npy, .txt, .xyz or "
                     ".csv; a mesh A also .obj, .off, .stl, and .ply as a mesh, with A's faces; a LAS A "
                     ".las or .laz (A's point records, x y z moved)."),
    ] = None,
    transform: Annotated[
        Path | None,
        typer.Option(help="Write the 4 x 4 homogeneous matrix T (four whitespace-separated rows) here; "
                     "REG = T . A in A's and B's own coordinates (2-D clouds: z is left alone)."),
    ] = None,
    model: Annotated[
        str, typer.Option(help="rigid, similarity (rigid + scale), affine; rigid+flow (rigid, then the "
                          "Sinkhorn gradient flow of `geomreg flow` with its defaults; T is the rigid part); "
                          "spline or diffeo (a smooth warp after rigid; or affine+spline, "
                          "similarity+diffeo, ...; T is the global part).")
    ] = "rigid",
    sigma: Annotated[
        float | None,
        typer.Option("--sigma", "--stiffness", help="spline/diffeo: width of the Gaussian kernel, a length "
                     "(larger: stiffer). Default: 0.15 x the diagonal of both clouds' bounding box."),
    ] = None,
    lam: Annotated[
        float | None,
        typer.Option("--lambda", help="spline/diffeo: weight of the smoothness term (RKHS norm; kinetic "
                     "energy for diffeo), per cube of side sigma. Default 0.1."),
    ] = None,
    controls: Annotated[
        str | None,
        typer.Option(help="spline/diffeo: control points: a count (about that many cube means of A), or "
                     "'all' (every point of the fitted cloud). Default: one per cube of side sigma/2, at "
                     "most 2000."),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="diffeo: Euler steps of the geodesic shooting (default 10).")
    ] = None,
    save_model: Annotated[
        Path | None,
        typer.Option(help="Write the fitted map (.npz) here; `geomreg warp M.npz IN --out OUT` applies it "
                     "to other points later (in A's file coordinates)."),
    ] = None,
    field: Annotated[
        Path | None, typer.Option(help="Write the displacement v = REG - A (N, D) here (.npy).")
    ] = None,
    apply: Annotated[
        Path | None,
        typer.Option(help="Other points (a full-resolution scan, a mesh's vertices) to move by the fitted "
                     "map; needs --apply-out. Not for rigid+flow."),
    ] = None,
    apply_out: Annotated[
        Path | None, typer.Option(help="Where --apply's points, moved, are written (formats as --out, "
                                  "for --apply's file: a mesh keeps its faces, a LAS file its records).")
    ] = None,
    blur: o.Blur = defaults.BLUR,
    reach: o.Reach = None,
    levels: Annotated[
        int, typer.Option(help="Blur levels of the global fit, from a quarter of the diameter down to "
                          "--blur (a warp's own levels halve from 4 blurs).")
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
    sample: o.Sample = None,
    weights: o.MeshWeights = None,
    classes: o.Classes = None,
    keep_mass: o.KeepMass = False,
    seed: o.Seed = 0,
    json_out: o.JsonOut = False,
    debug: o.Debug = False,
) -> None:
    """Fit the transform (rigid, similarity, affine) or smooth warp that moves A onto B; no initial guess.

    Transport finds the pose: each fit pairs every point of A with the barycentre the Sinkhorn
    plan sends it to, weighted by the mass it sends, and solves the transform in closed form;
    blurs go coarse to fine from several starting orientations (the identity and the
    principal-axis alignments), on clouds resampled to about 300 points. A robust
    point-to-plane refinement against the whole of B then makes it precise: every start
    screened, the best refined, the winner polished (--no-surface: skip it).
    spline / diffeo then fit a smooth warp of the whole space by the same transport pairs
    (kernel spline, or LDDMM geodesic shooting), regularised by --lambda.
    stdout: the final divergence (or one JSON object with --json, with the matrix).
    """
    with handle_errors(debug):
        from geomreg.errors import ParameterError
        from geomreg.io import check_moved, check_output

        from .inputs import read_applied, read_pair

        if out is None and transform is None and save_model is None and not json_out:
            raise ParameterError("--out", "give --out, --transform, --save-model or --json (nothing would "
                                 "be written)")
        if (apply is None) != (apply_out is None):
            raise ParameterError("--apply-out" if apply is not None else "--apply",
                                 "--apply and --apply-out go together")
        if model == "rigid+flow" and (apply is not None or save_model is not None):
            raise ParameterError("--apply" if apply is not None else "--save-model",
                                 "rigid+flow moves A's own points, it fits no map of space (use "
                                 "`geomreg flow --apply`, or --model spline)")
        controls_n = _controls(controls)
        inputs = [a, b] + [f for f in (weights_a, weights_b, apply) if f is not None]
        outputs = [f for f in (out, transform, plot, save_model, field, apply_out) if f is not None]
        for f in outputs:
            check_output(f, protect=inputs)
        if len({f.resolve() for f in outputs}) < len(outputs):
            raise ParameterError("--out", "two outputs name the same file")
        for path, suffix in ((save_model, ".npz"), (field, ".npy")):
            if path is not None and path.suffix.lower() != suffix:
                flag = "--save-model" if path is save_model else "--field"
                raise ParameterError(flag, f"{path} must be a {suffix} file")
        if plot is not None:
            from geomreg.plots import check_path

            check_path(plot)
        for path in (out, apply_out):
            if path is not None:
                check_moved(path)  # an unknown output format fails before the computation
        mu, nu = read_pair(a, b, weights_a=weights_a, weights_b=weights_b, weight_property=weight_property,
                           sample=sample, weights=weights, classes=classes, seed=seed)
        if out is not None:
            check_moved(out, mu)  # a mesh or LAS format for a source that is not one
        if mu.dim > 3:
            raise ParameterError("--model", f"register works in 1 to 3 dimensions, not {mu.dim}")
        other = read_applied(apply, mu) if apply is not None else None
        if other is not None:
            check_moved(apply_out, other)
            if other.dim != mu.dim:
                raise ParameterError("--apply", f"{apply} holds {other.dim}-D points, A {mu.dim}-D ones")
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
        smooth = dict(sigma=sigma, lam=lam, controls=controls_n, steps=steps)
        with status_line("register") as on_step:
            result = run_register(mu, nu, model=model, blur=blur, reach=reach, levels=levels, fits=fits,
                                  voxel=voxel, surface=surface,
                                  **{k: v for k, v in smooth.items() if v is not None},
                                  p=p, backend=backend, device=device, dtype="float64", **given_tol,
                                  normalize=not keep_mass, on_step=on_step, on_result=on_result)
        warp = result.as_warp() if result.flow is None else None
        applied = warp(other.points).numpy() if other is not None else None
        _write(result, mu, other, applied, out=out, transform=transform, save_model=save_model, field=field,
               apply_out=apply_out, protect=inputs)
        if plot is not None:
            from geomreg.plots import plot_register

            grid = result.warp if result.warp is not None and mu.dim == 2 else None
            with uninterrupted():
                plot_register(plot, mu.points, nu.points, result.registered.numpy(),
                              source_weights=mu.weights, target_weights=nu.weights, grid=grid, protect=inputs)
        record = result.to_dict()
        record.update(matrix_4x4=_file_matrix(result.matrix, mu).tolist(), a=str(a), b=str(b), blur=blur,
                      reach=reach)
        if other is not None:
            record.update(apply=str(apply), applied=len(applied))
        record.update(**ran, **rerun)
        print_data(dumps(record) if json_out else repr(result.value))


def _controls(text: str | None):
    """--controls as fit_warp takes it: None, 'all' or a count."""
    from geomreg.errors import ParameterError

    if text is None or text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise ParameterError("--controls", f"a count of control points or 'all', not {text!r}") from None


def _file_matrix(matrix, mu):
    """T as a 4 x 4 matrix in A's file coordinates (a LAS offset put back)."""
    if mu.origin is not None:
        from geomreg.deform import conjugate

        matrix = conjugate(matrix, mu.origin)
    return _homogeneous_4x4(matrix.numpy())


def _write(result, mu, other, applied, *, out, transform, save_model, field, apply_out, protect) -> None:
    """All requested files together, atomically (all or none)."""
    from geomreg.io import atomic_write_many, moved_writer, npy_writer, text_writer

    jobs = []
    registered = result.registered.numpy()
    if out is not None:
        jobs.append((out, moved_writer(out, mu, registered, mu.weights)))
    if transform is not None:
        jobs.append((transform, text_writer("".join(" ".join(repr(float(v)) for v in row) + "\n"
                                                    for row in _file_matrix(result.matrix, mu)))))
    if field is not None:
        jobs.append((field, npy_writer(registered - mu.points)))
    if apply_out is not None:
        jobs.append((apply_out, moved_writer(apply_out, other, applied, other.weights)))
    if save_model is not None:
        warp = result.as_warp()
        if mu.origin is not None:
            warp = warp.shifted(mu.origin)
        jobs.append((save_model, warp.save))
    if jobs:
        with uninterrupted():
            atomic_write_many(jobs, protect=protect)


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

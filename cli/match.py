"""``geomreg match A B --out REG``: move A onto B along the Sinkhorn transport map."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geomreg import defaults

from . import options as o
from .errors import EXIT_NOT_CONVERGED, handle_errors, uninterrupted
from .output import dumps, err_console, per_pixel, print_data, schedule_table, status_line, warn
from .reproduce import seeded


def match(
    ctx: typer.Context,
    a: o.SourceArg,
    b: o.TargetArg,
    out: Annotated[
        Path,
        typer.Option("--out", help="Write A moved by the field here: .ply (with A's weights as the "
                     "vertex property 'weight'), .npy, .txt, .xyz or .csv; a mesh A (read with its "
                     "vertices) also .obj, .off, .stl, and .ply as a mesh, with A's faces; a LAS A .las or "
                     ".laz (A's point records, x y z moved). Two images: .png (A's "
                     "density transported onto B's pixels, dark is mass) or .npy (that density)."),
    ],
    field: Annotated[
        Path | None, typer.Option(help="Write the displacement field v (N, D) here (.npy): REG = A + v.")
    ] = None,
    apply: Annotated[
        Path | None,
        typer.Option(help="Other points (e.g. the full-resolution scan A was subsampled from) to move "
                     "by the same field, extended by the dual potentials; needs --apply-out."),
    ] = None,
    apply_out: Annotated[
        Path | None, typer.Option(help="Where --apply's points, moved, are written (formats as --out, "
                                  "for --apply's file: a mesh keeps its faces, a LAS file its records).")
    ] = None,
    matches: Annotated[
        Path | None,
        typer.Option(help="Write each point of A's --top-k strongest targets to this CSV: "
                     "source,target,weight (indices from 0; weights are transport-plan entries)."),
    ] = None,
    top_k: Annotated[int, typer.Option(help="Targets per source point in --matches.")] = 1,
    plot: Annotated[
        Path | None,
        typer.Option(help="Draw a picture (.png): A, B and an arrow from each point of A to where it "
                     "goes, over the level lines of the dual potential (2-D; densities in 1-D, "
                     "projections in 3-D); for two images, A's, B's and the transported density."),
    ] = None,
    evaluate: Annotated[
        bool, typer.Option("--evaluate", help="Also compute the divergence between REG and B "
                           "(divergence_after in --json; one more Sinkhorn run).")
    ] = False,
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
    seed: o.Seed = 0,
    json_out: o.JsonOut = False,
    debug: o.Debug = False,
) -> None:
    """Register A onto B by one transport map and write the moved points.

    The field is the Sinkhorn divergence's displacement (a blurred Brenier map):
    v(x_i) = -(1/a_i) dS/dx_i for balanced problems, i.e. the barycentre of x_i's row of the
    transport plan minus, when debiased, that of A's plan to itself. stdout: the divergence
    S(A, B) whose plan was used (or one JSON object with --json).
    """
    with handle_errors(debug):
        from geomreg.errors import ParameterError
        from geomreg.io import check_moved, check_output
        from geomreg.params import check_params

        from .inputs import read_applied, read_pair

        check_params("sinkhorn", p, blur, reach, scaling, tol, max_iter, diameter)
        if (apply is None) != (apply_out is None):
            raise ParameterError("--apply-out" if apply is not None else "--apply",
                                 "--apply and --apply-out go together")
        if matches is None and top_k != 1:
            raise ParameterError("--top-k", "applies to --matches")
        inputs = [a, b] + [f for f in (weights_a, weights_b, apply) if f is not None]
        outputs = [f for f in (out, field, apply_out, matches, log, plot) if f is not None]
        if len({Path(f).resolve() for f in outputs}) < len(outputs):
            raise ParameterError("--out", "two outputs name the same file")
        for f in outputs:
            check_output(f, protect=inputs)
        if out.suffix.lower() != ".png":
            check_moved(out)  # an unknown --out format fails before the computation
        if apply_out is not None:
            check_moved(apply_out)
        if plot is not None:
            from geomreg.plots import check_path

            check_path(plot)

        mu, nu = read_pair(a, b, weights_a=weights_a, weights_b=weights_b, weight_property=weight_property,
                           mass=mass, as_image=as_image, sample=sample, weights=weights, classes=classes,
                           seed=seed)
        if out.suffix.lower() != ".png":
            check_moved(out, mu)  # a mesh or LAS format for a source that is not one
        if out.suffix.lower() == ".png" and (mu.grid is None or nu.grid is None or len(nu.grid.shape) != 2):
            raise ParameterError("--out", "a .png output is the density transported between two images")
        if plot is not None and not (mu.grid is not None and nu.grid is not None and len(nu.grid.shape) == 2):
            from geomreg.plots import check_dimension

            check_dimension(mu.dim)
        other = read_applied(apply, mu) if apply is not None else None
        if other is not None:
            check_moved(apply_out, other)
        from geomreg.registration import match as run_match

        rerun = seeded(ctx, seed)
        with status_line("match") as on_step:
            result = run_match(
                mu, nu, apply=other, top_k=top_k if matches is not None else None,
                evaluate_after=evaluate, p=p, blur=blur, reach=reach, diameter=diameter,
                scaling=scaling, debias=debias, tol=tol, max_iter=max_iter, backend=backend,
                device=device, dtype=dtype, normalize=not keep_mass, truncate=truncate,
                cluster_scale=cluster_scale, on_step=on_step,
            )
        div = result.divergence
        if div.backend_fallback:
            warn(div.backend_fallback)
        _write(result, mu, nu, other, out=out, field=field, apply_out=apply_out, matches=matches,
               log=log, protect=inputs)
        if plot is not None:
            with uninterrupted():
                _plot(plot, result, mu, nu, normalize=not keep_mass, protect=inputs)
        if verbose and div.schedule:
            err_console().print(schedule_table(div.schedule))
        record = result.to_dict()
        record.update(a=str(a), b=str(b), out=str(out), **rerun)
        print_data(dumps(record) if json_out else repr(div.value.item()))
        if not div.converged:
            warn(f"not converged after {div.n_iter} iterations: marginal error "
                 f"{div.marginal_error:.3g} > --tol {tol:g}; the field may be inaccurate")
            raise typer.Exit(EXIT_NOT_CONVERGED)


def _write(result, mu, nu, other, *, out, field, apply_out, matches, log, protect) -> None:
    """All requested files together, atomically (all or none)."""
    from geomreg.io import atomic_write_many, moved_writer, npy_writer, points_writer, text_writer

    from .output import density_writer

    def arr(t):
        return t.detach().cpu().double().numpy()

    if result.transported is not None and out.suffix.lower() in (".png", ".npy"):
        jobs = [(out, density_writer(out, nu.grid, result.transported))]
    elif result.transported is not None:  # the moved pixels with mass, as a weighted cloud
        jobs = [(out, points_writer(out, arr(result.registered)[mu.grid.mask], mu.weights))]
    else:
        jobs = [(out, moved_writer(out, mu, arr(result.registered), mu.weights))]
    if field is not None:
        jobs.append((field, npy_writer(per_pixel(mu, arr(result.field)))))
    if apply_out is not None:
        jobs.append((apply_out, moved_writer(apply_out, other, arr(result.applied), other.weights)))
    if matches is not None:
        idx, w = (arr(t) for t in result.matches)
        lines = ["source,target,weight\n"]
        for i in range(idx.shape[0]):
            lines += [f"{i},{int(j)},{float(wt)!r}\n" for j, wt in zip(idx[i], w[i], strict=True)]
        jobs.append((matches, text_writer("".join(lines))))
    if log is not None:
        steps = result.divergence.schedule
        jobs.append((log, text_writer("".join(dumps(s.to_dict()) + "\n" for s in steps))))
    with uninterrupted():
        atomic_write_many(jobs, protect=protect)


def _plot(path, result, mu, nu, *, normalize, protect) -> None:
    """The --plot picture: three density images for two images, else the point clouds."""
    from geomreg.plots import plot_match

    from .output import plot_image_triple

    registered = result.registered.detach().cpu().double().numpy()
    if result.transported is not None and len(nu.grid.shape) == 2:
        plot_image_triple(path, mu, nu, result.transported, normalize=normalize, protect=protect)
        return
    if result.transported is not None:  # volumes: every voxel moved; those with mass are drawn
        registered = registered[mu.grid.mask]
    plan = result.divergence.plan
    plot_match(path, mu.points, nu.points, registered,
               potential=_potential(plan) if plan is not None and mu.dim == 2 else None,
               source_weights=mu.weights, target_weights=nu.weights, protect=protect)


def _potential(plan):
    r"""The first variation of the Sinkhorn divergence in the source, as a function of points.

    :math:`\varphi = f_{ab} - f_{aa}` (debiased) or :math:`f_{ab}`, each dual potential
    extended to any point by its softmin (c-transform), as in
    :meth:`~geomreg.transport.TransportPlan.field_at`; for p = 2 the field is
    :math:`v = -\nabla \varphi`. Returns a function from ``(K, D)`` numpy points (input
    coordinates) to ``(K,)`` values, evaluated in blocks of points.
    """
    import numpy as np
    import torch

    def at(points):
        z = torch.as_tensor(np.asarray(points), dtype=plan.x.dtype, device=plan.x.device) - plan.centre
        sm, pair = plan.backend.softmin, plan.backend.pair
        values = []
        with torch.no_grad():
            for block in z.split(1024):
                f = sm(plan.eps, pair(block[None], plan.y, plan.cost), plan.h_ab)
                if plan.h_aa is not None:
                    f = f - sm(plan.eps, pair(block[None], plan.x, plan.cost), plan.h_aa)
                values.append(f[0])
        return torch.cat(values).double().cpu().numpy()

    return at


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("match")(match)

"""``geomreg flow A B --out OUT``: the Euler gradient flow of a divergence (seed 002)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from geomreg import defaults

from . import options as o
from .errors import EXIT_NOT_CONVERGED, handle_errors, uninterrupted
from .output import dumps, err_console, print_data, warn
from .reproduce import seeded


def flow(
    ctx: typer.Context,
    a: o.SourceArg,
    b: o.TargetArg,
    out: Annotated[
        Path,
        typer.Option("--out", help="Write A at the end of the flow here: .ply (with A's weights as "
                     "the vertex property 'weight'), .npy, .txt, .xyz or .csv; a mesh A (read with its "
                     "vertices) also .obj, .off, .stl, and .ply as a mesh, with A's faces; a LAS A .las or "
                     ".laz (A's point records, x y z moved). Two images: .png (A's "
                     "density at the end, splatted onto B's pixels; dark is mass) or .npy (that density)."),
    ],
    field: Annotated[
        Path | None,
        typer.Option(help="Write the displacement of each point of A, end minus start, as .npy: (N, D); "
                     "(H, W, 2) for an image (x right, y up; NaN on pixels without mass)."),
    ] = None,
    apply: Annotated[
        Path | None,
        typer.Option(help="Other points (any point format; e.g. the full-resolution scan when A is a "
                     "subsample of it) carried by the same flow: each step moves them by lr times the "
                     "transport field at their positions. Balanced sinkhorn, --p 2; needs --apply-out."),
    ] = None,
    apply_out: Annotated[
        Path | None, typer.Option(help="Where --apply's points, moved, are written (formats as --out, "
                                  "for --apply's file: a mesh keeps its faces, a LAS file its records).")
    ] = None,
    loss: o.Loss = "sinkhorn",
    lr: Annotated[float, typer.Option(help="Step size: x <- x - lr * grad L / a_i (N * grad for "
                                      "uniform weights).")] = 0.2,
    steps: Annotated[int, typer.Option(help="Most steps.")] = 50,
    tol: Annotated[
        float, typer.Option(help="Stop when the loss decreases by less than this fraction in a step "
                            "(0: run every step).")
    ] = 1e-3,
    frames: Annotated[
        Path | None, typer.Option(help="Existing folder for intermediate clouds step_00000.npy, ...")
    ] = None,
    every: Annotated[int, typer.Option(help="With --frames: write every K-th step (and the last).")] = 1,
    frame_format: Annotated[
        str, typer.Option(help="Suffix of the frames: .npy .ply .txt .csv .xyz")
    ] = ".npy",
    plot: Annotated[
        Path | None,
        typer.Option(help="Draw the flow (.png): A over B at a few steps from the start to the end "
                     "(2-D; densities in 1-D, projections in 3-D); for two images, A's, B's and "
                     "the final density on B's pixels."),
    ] = None,
    p: o.P = defaults.P,
    blur: o.Blur = defaults.BLUR,
    reach: o.Reach = None,
    diameter: o.Diameter = None,
    scaling: o.Scaling = defaults.SCALING,
    debias: o.Debias = True,
    sinkhorn_tol: Annotated[
        float | None,
        typer.Option(help="Marginal-error tolerance of each Sinkhorn evaluation (distance's --tol); "
                     "default 1e-4 (warm-started steps need more than "
                     "distance's 1e-3 for their losses to decrease smoothly).", show_default=False),
    ] = None,
    max_iter: o.MaxIter = defaults.MAX_ITER,
    backend: o.Backend = "auto",
    device: o.Device = "auto",
    dtype: o.Dtype = "float32",
    weights_a: o.WeightsA = None,
    weights_b: o.WeightsB = None,
    weight_property: o.WeightProperty = None,
    sample: o.Sample = None,
    weights: o.MeshWeights = None,
    classes: o.Classes = None,
    keep_mass: o.KeepMass = False,
    log: Annotated[
        Path | None, typer.Option(help="Write the loss trajectory as JSON lines to this file.")
    ] = None,
    seed: o.Seed = 0,
    json_out: o.JsonOut = False,
    debug: o.Debug = False,
) -> None:
    """Move A along the gradient flow of the loss towards B and write where it ends.

    stdout: the final loss (or one JSON object with --json, with the whole trajectory).
    A progress bar on stderr (in a terminal) shows the step, the loss and the time left.
    Ctrl-C (SIGTERM) stops the flow without writing --out (frames already written are complete
    files); exit code 130 (143).
    """
    with handle_errors(debug):
        from geomreg.errors import OutputError, ParameterError
        from geomreg.io import check_moved, check_output
        from geomreg.io.writers import POINT_SUFFIXES
        from geomreg.params import check_params

        from .inputs import read_applied, read_pair

        check_params(loss, p, blur, reach, scaling, defaults.TOL if sinkhorn_tol is None else sinkhorn_tol,
                     max_iter, diameter)
        if every < 1:
            raise ParameterError("--every", f"must be >= 1, got {every}")
        if frame_format not in POINT_SUFFIXES:
            raise ParameterError("--frame-format",
                                 f"one of {', '.join(POINT_SUFFIXES)}, not {frame_format!r}")
        if frames is not None and not frames.is_dir():
            raise OutputError(str(frames), "--frames must be an existing folder")
        if (apply is None) != (apply_out is None):
            raise ParameterError("--apply-out" if apply is not None else "--apply",
                                 "--apply and --apply-out go together")
        inputs = [a, b] + [f for f in (weights_a, weights_b, apply) if f is not None]
        outputs = [f for f in (out, field, log, plot, apply_out) if f is not None]
        if len({Path(f).resolve() for f in outputs}) < len(outputs):
            raise ParameterError("--out", "two outputs name the same file")
        for f in outputs:
            check_output(f, protect=inputs)
        if out.suffix.lower() != ".png":
            check_moved(out)  # an unknown --out format fails before the computation
        if apply_out is not None:
            check_moved(apply_out)
        if field is not None and field.suffix.lower() != ".npy":
            raise ParameterError("--field", f"written as .npy, not {field.suffix or field.name!r}")
        if plot is not None:
            from geomreg.plots import check_path

            check_path(plot)

        mu, nu = read_pair(a, b, weights_a=weights_a, weights_b=weights_b, weight_property=weight_property,
                           sample=sample, weights=weights, classes=classes, seed=seed)
        if out.suffix.lower() != ".png":
            check_moved(out, mu)  # a mesh or LAS format for a source that is not one
        images = mu.grid is not None and nu.grid is not None and len(nu.grid.shape) == 2
        if out.suffix.lower() == ".png" and not images:
            raise ParameterError("--out", "a .png output is the density transported between two images")
        if plot is not None:
            from geomreg.plots import check_dimension

            check_dimension(mu.dim)
        other = read_applied(apply, mu) if apply is not None else None
        if other is not None and other.dim != mu.dim:
            raise ParameterError("--apply", f"{apply}: {other.dim}-D points, A is {mu.dim}-D")
        if other is not None:
            check_moved(apply_out, other)
        from geomreg.registration import flow as run_flow

        rerun = seeded(ctx, seed)
        snapshots = {} if plot is not None else None
        on_step, progress = _observer(steps, every, frames, frame_format, mu, inputs, snapshots)
        with progress:
            result = run_flow(
                mu, nu, lr=lr, steps=steps, tol=tol, on_step=on_step, loss=loss, p=p, blur=blur,
                reach=reach, diameter=diameter, scaling=scaling, debias=debias, sinkhorn_tol=sinkhorn_tol,
                max_iter=max_iter, backend=backend, device=device, dtype=dtype, normalize=not keep_mass,
                apply=other,
            )
        last = result.steps[-1].index
        if frames is not None and last % every and last != steps:  # the final frame, once
            on_step(result.steps[-1], result.points)
        _write(result, mu, nu if images else None, out=out, field=field, log=log, protect=inputs,
               apply_out=apply_out, other=other)
        if plot is not None:
            snapshots[last] = result.points.detach().cpu().double().numpy()
            with uninterrupted():
                _plot(plot, snapshots, mu, nu, normalize=not keep_mass, protect=inputs)
        record = result.to_dict()
        record.update(a=str(a), b=str(b), out=str(out), **rerun)
        print_data(dumps(record) if json_out else repr(result.steps[-1].loss))
        if not result.last.converged:
            warn(f"the last Sinkhorn evaluation did not converge (marginal error "
                 f"{result.last.marginal_error:.3g} > --sinkhorn-tol {result.last.params['tol']:g})")
            raise typer.Exit(EXIT_NOT_CONVERGED)


def _observer(steps, every, frames, suffix, source, inputs, snapshots=None):
    """The per-step callback (frames, progress bar, snapshots) and the progress context.

    Frames are ``source`` (A's measure) moved: in its file's frame, a mesh's ``.ply`` with its faces.

    ``snapshots``, a dict or None: filled with ``{step: points}`` at steps 0, 1, 2, 4, 8, ...
    (a few copies of the cloud, whenever the flow stops), for the --plot picture.
    """
    import contextlib

    from geomreg.io import atomic_write, moved_writer

    console = err_console()
    bar = None
    if console.is_terminal:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("flow step {task.completed}/{task.total}"), BarColumn(),
                       TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=console)
        task = bar.add_task("flow", total=steps, loss="...")

    def on_step(step, points):
        if bar is not None:
            bar.update(task, completed=step.index, loss=f"{step.loss:.4g}")
        if frames is not None and (step.index % every == 0 or step.index == steps):
            path = frames / f"step_{step.index:05d}{suffix}"
            pts = points.detach().cpu().double().numpy()
            with uninterrupted():  # a frame is written whole, or not at all
                atomic_write(path, moved_writer(path, source, pts, source.weights), protect=inputs)
        k = step.index
        if snapshots is not None and (k & (k - 1)) == 0:  # 0 and the powers of two
            snapshots[k] = points.detach().cpu().double().numpy().copy()

    return on_step, (bar if bar is not None else contextlib.nullcontext())


def _write(result, mu, images_of, *, out, field, log, protect, apply_out=None, other=None) -> None:
    """All requested files together, atomically; ``images_of``: B when both inputs are images."""
    from geomreg.io import atomic_write_many, moved_writer, npy_writer, text_writer

    from .output import density_writer, per_pixel

    end = result.points.detach().cpu().double().numpy()
    if images_of is not None and out.suffix.lower() in (".png", ".npy"):
        moved = images_of.grid.splat(end, mu.weights)  # A's masses onto B's pixels
        jobs = [(out, density_writer(out, images_of.grid, moved))]
    else:
        jobs = [(out, moved_writer(out, mu, end, mu.weights))]
    if field is not None:
        jobs.append((field, npy_writer(per_pixel(mu, end - mu.points))))
    if apply_out is not None:
        jobs.append((apply_out, moved_writer(apply_out, other, result.applied.detach().cpu().double().numpy(),
                                             other.weights)))
    if log is not None:
        jobs.append((log, text_writer("".join(dumps(s.to_dict()) + "\n" for s in result.steps))))
    with uninterrupted():
        atomic_write_many(jobs, protect=protect)


def _plot(path, snapshots, mu, nu, *, normalize, protect) -> None:
    """The --plot picture: the recorded steps over B, or for two images the final density."""
    from geomreg.plots import plot_flow

    from .output import plot_image_triple

    last = max(snapshots)
    if mu.grid is not None and nu.grid is not None and len(mu.grid.shape) == len(nu.grid.shape) == 2:
        moved = nu.grid.splat(snapshots[last], mu.weights)  # A's masses onto B's pixels
        plot_image_triple(path, mu, nu, moved, normalize=normalize, protect=protect)
        return
    plot_flow(path, sorted(snapshots.items()), nu.points, source_weights=mu.weights,
              target_weights=nu.weights, protect=protect)


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("flow")(flow)

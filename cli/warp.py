"""``geomreg warp M.npz IN --out OUT``: apply a map saved by ``register --save-model`` to other points."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from . import options as o
from .errors import handle_errors, uninterrupted
from .output import dumps, print_data


def warp(
    model: Annotated[Path, typer.Argument(help="The map (.npz) written by `geomreg register --save-model`.")],
    points: Annotated[Path, typer.Argument(help="The points to move: any point or mesh input (.ply, .npy, "
                                           ".txt, .xyz, .csv, .obj, .off, .stl, .las, .laz).")],
    out: Annotated[
        Path,
        typer.Option("--out", help="Write the moved points here: .ply, .npy, .txt, .xyz or .csv; a mesh "
                     "input also .obj, .off, .stl, and .ply as a mesh, with its faces; a LAS input .las "
                     "or .laz (its point records, x y z moved)."),
    ],
    field: Annotated[
        Path | None, typer.Option(help="Write the displacement (N, D) of each point here (.npy).")
    ] = None,
    jacobian: Annotated[
        Path | None,
        typer.Option(help="Write the Jacobian determinant of the map at each point here (.npy; <= 0 where "
                     "the map folds space)."),
    ] = None,
    json_out: o.JsonOut = False,
    debug: o.Debug = False,
) -> None:
    """Move points by a saved map (global transform, spline or diffeomorphism).

    The map acts in the file coordinates of the source it was fitted on, so IN is moved in
    its own file coordinates (a LAS file's offset is taken into account).
    stdout: the smallest Jacobian determinant of the map over IN's points (> 0: no folding),
    or one JSON object with --json.
    """
    with handle_errors(debug):
        from geomreg.deform import Warp
        from geomreg.errors import InputError, ParameterError
        from geomreg.io import (
            atomic_write_many,
            check_moved,
            check_output,
            moved_writer,
            npy_writer,
            read_measure,
        )
        from geomreg.timing import Stopwatch

        inputs = [model, points]
        outputs = [f for f in (out, field, jacobian) if f is not None]
        for f in outputs:
            check_output(f, protect=inputs)
        if len({f.resolve() for f in outputs}) < len(outputs):
            raise ParameterError("--out", "two outputs name the same file")
        for path, flag in ((field, "--field"), (jacobian, "--jacobian")):
            if path is not None and path.suffix.lower() != ".npy":
                raise ParameterError(flag, f"{path} must be a .npy file")
        check_moved(out)
        fitted = Warp.load(model)
        mu = read_measure(points)
        check_moved(out, mu)
        if mu.dim != fitted.dim:
            raise InputError(str(points), f"holds {mu.dim}-D points; the map in {model} moves "
                             f"{fitted.dim}-D ones")
        if mu.origin is not None:
            fitted = fitted.shifted(-mu.origin)
        clock = Stopwatch()
        with clock("warp"):
            moved = fitted(mu.points).numpy()
        with clock("jacobian"):
            dets = fitted.jacobian_determinants(mu.points).numpy()
        jobs = [(out, moved_writer(out, mu, moved, mu.weights))]
        if field is not None:
            jobs.append((field, npy_writer(moved - mu.points)))
        if jacobian is not None:
            jobs.append((jacobian, npy_writer(dets)))
        with uninterrupted():
            atomic_write_many(jobs, protect=inputs)
        low = float(dets.min()) if len(dets) else float("nan")
        record = {"model": str(model), "kind": fitted.kind, "points": str(points), "n": len(moved),
                  "out": str(out), "min_jacobian": low, "time_s": clock.elapsed, "times": clock.times}
        print_data(dumps(record) if json_out else repr(low))


def register(app: typer.Typer) -> None:
    """Add the command to the app."""
    app.command("warp")(warp)

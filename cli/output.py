"""Where output goes: stdout is data, stderr is people (CONVENTIONS.md, 9)."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=1)
def err_console():
    """The rich console on stderr, for tables, warnings and progress."""
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def jsonable(obj: Any) -> Any:
    """Recursively replace non-finite floats by the strings "inf", "-inf", "nan" (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """Strict JSON (no NaN/Infinity literals)."""
    return json.dumps(jsonable(obj), allow_nan=False, **kwargs)


def print_data(text: str) -> None:
    """Write one line of data to stdout."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    """A one-line warning on stderr."""
    err_console().print(f"[yellow]Warning:[/yellow] {message}", markup=True, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def status_line(title: str, after_s: float = 0.5):
    """A transient status line on stderr while a computation runs (in a terminal only).

    Yields ``on_step``, a callback for :func:`geomreg.divergence`'s ``on_step`` (a Sinkhorn
    :class:`~geomreg.results.StepLog`) that also takes :func:`geomreg.flow`'s
    ``(FlowStep, points)``, or None when stderr is not a terminal. The line shows the latest
    step once the computation has run ``after_s`` seconds.
    """
    console = err_console()
    if not console.is_terminal:
        yield None
        return
    started = time.perf_counter()
    with console.status(f"{title}: computing...", spinner="dots") as status:
        solves = 0

        def on_step(step, *points) -> None:
            nonlocal solves
            if points:  # a gradient-flow step
                text = f"{title}: flow step {step.index} loss={step.loss:.4g}"
            else:
                solves += step.index == 0
                text = (f"{title}: Sinkhorn step {step.index} ({step.phase}) eps={step.eps:.3g} "
                        f"marginal error={step.marginal_error:.2e}")
                if solves > 1:
                    text += f" | solve {solves}"
            if time.perf_counter() - started > after_s:
                status.update(text)

        yield on_step


def schedule_table(steps, title: str = "Sinkhorn loop", max_rows: int = 40):
    """A rich table of the Sinkhorn log; long converge phases are thinned to ``max_rows``."""
    from rich.table import Table

    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    for col in ("step", "phase", "eps", "sigma", "time s", "change", "marginal err"):
        table.add_column(col, justify="right")
    shown = _thin(len(steps), max_rows)
    last = -1
    for i in shown:
        if i > last + 1:
            table.add_row("...", "", "", "", "", "", "")
        s = steps[i]
        table.add_row(
            str(s.index),
            s.phase,
            f"{s.eps:.4g}",
            f"{s.sigma:.4g}",
            f"{s.elapsed_s:.3f}",
            f"{s.change:.3e}",
            f"{s.marginal_error:.3e}",
        )
        last = i
    return table


def _thin(n: int, max_rows: int) -> list[int]:
    """Indices to show: everything when short, else the head and the tail."""
    if n <= max_rows:
        return list(range(n))
    head = max_rows // 2
    return list(range(head)) + list(range(n - (max_rows - head), n))


def multiscale_summary(info: dict) -> str:
    """One paragraph on the multiscale backend's work (``--verbose``)."""
    kept = info.get("pairs_kept_fraction") or {}
    kept_text = ", ".join(f"{k} {v:.1%}" for k, v in kept.items()) or "every pair"
    jump = info["jump_step"]
    phases = (
        f"coarse steps 0-{jump - 1}, then the points from step {jump} (blur {info['jump_blur']:.4g})"
        if jump > 0
        else "no coarse step (the clusters are as large as the problem)"
    )
    return (
        f"multiscale: {info['clusters'][0]} + {info['clusters'][1]} clusters of side "
        f"{info['cluster_scale']:.4g}; {phases}; truncation at {info['truncate']:g} eps keeps "
        f"{kept_text} of the pairs"
    )


def grid_summary(info: dict) -> str:
    """One line on the grid backend's pyramid (``--verbose``)."""
    levels = " -> ".join(
        "x".join(map(str, a)) + ("" if a == b else " / " + "x".join(map(str, b))) for a, b in info["levels"]
    )
    return f"grid: pyramid levels {levels}; moves to a finer level at steps {info['jump_steps']}"


def per_pixel(m, values):
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


def density_writer(path, grid, flat):
    """Writer of masses on an image's (volume's) pixels as a density: ``.png`` or ``.npy``.

    ``flat``: one mass per pixel (:meth:`~geomreg.measure.Grid.splat`'s order); the file holds
    mass per unit area (volume), shaped like the input, dark is mass in the PNG.
    """
    from geomreg.io import density_png_writer, npy_writer

    density = grid.to_array(flat / grid.spacing ** len(grid.shape))
    return (density_png_writer if str(path).lower().endswith(".png") else npy_writer)(density)


def plot_image_triple(path, mu, nu, moved, *, normalize, protect) -> None:
    """The --plot picture of two images: A's, B's and ``moved`` (A's masses on B's pixels).

    Densities per unit area, of a total mass 1 unless --keep-mass (``normalize`` False).
    """
    from geomreg.plots import plot_images

    def density(m, flat, mass):
        return m.grid.to_array(flat / (mass if normalize else 1.0) / m.grid.spacing ** 2)

    plot_images(path, density(mu, mu.grid.full(mu.weights), mu.mass),
                density(nu, nu.grid.full(nu.weights), nu.mass), density(nu, moved, mu.mass),
                protect=protect)

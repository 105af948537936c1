"""Pictures of registrations and gradient flows, written as PNG files.

Every function draws one figure from numpy arrays and writes it atomically (see
:func:`geomreg.io.atomic_write`). Point clouds are drawn by dimension: 1-D measures as
density curves (a gaussian kernel density estimate), 2-D ones as scatter plots, 3-D ones as
scatter projections on the coordinate planes. The colours are the same everywhere:
the target in blue, the source (or the moving points) in red, registered points in green.

matplotlib is imported inside the functions (``import geomreg`` stays fast), and figures
are :class:`matplotlib.figure.Figure` objects drawn by the Agg renderer: no window opens,
no display is needed, and the global pyplot state is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from .errors import ParameterError
from .io import atomic_write

SOURCE = "#d62728"  # red
TARGET = "#1f77b4"  # blue
REGISTERED = "#2ca02c"  # green
DPI = 110
#: most snapshots of a flow in one figure
MAX_PANELS = 5
#: most arrows drawn by :func:`plot_match` (every point keeps its dot)
MAX_ARROWS = 200
#: most points drawn per cloud and panel (larger clouds are thinned evenly)
MAX_DOTS = 20000
#: the coordinate planes of the 3-D projections, as pairs of axes
PLANES = ((0, 1), (0, 2), (1, 2))
AXIS_NAMES = "xyz"

PathLike = str | os.PathLike


def check_path(path: PathLike) -> None:
    """Refuse a picture name that is not a .png (before anything is computed).

    Raises:
        ParameterError: the suffix is not .png (exit code 2 on the command line).
    """
    suffix = Path(path).suffix
    if suffix.lower() != ".png":
        raise ParameterError("plot", f"pictures are written as .png, not {suffix or Path(path).name!r}")


def check_dimension(dim: int) -> None:
    """Refuse what cannot be drawn: pictures are for 1-, 2- and 3-D points.

    Raises:
        ParameterError: ``dim`` is not 1, 2 or 3 (exit code 2 on the command line).
    """
    if dim not in (1, 2, 3):
        raise ParameterError("plot", "pictures are for 1-, 2- and 3-D problems")


def plot_flow(
    path: PathLike,
    snapshots: Sequence[tuple[int, np.ndarray]],
    target: np.ndarray,
    *,
    source_weights: np.ndarray | None = None,
    target_weights: np.ndarray | None = None,
    protect: Iterable[PathLike] = (),
) -> None:
    """Draw a gradient flow: the moving points at a few steps, over the target.

    At most 5 snapshots are shown, evenly chosen among those given, always with the first
    and the last. 2-D: one panel per snapshot (target in blue, points in red), titled
    "step k". 1-D: the density of the target (filled, blue) and of the points at each shown
    step (red curves, lighter for earlier steps) on one axes. 3-D: the first and the last
    snapshots projected on the planes xy, xz and yz (two rows of three panels).

    Args:
        path: the PNG file to write.
        snapshots: ``(step, points (N, D))`` pairs in step order; the first is the start,
            the last the end of the flow.
        target: ``(M, D)`` the target points.
        source_weights: ``(N,)`` weights of the moving points (1-D densities), or None for
            uniform weights.
        target_weights: ``(M,)`` weights of the target points, or None.
        protect: input files that must not be overwritten.

    Raises:
        ParameterError: the points are not 1-, 2- or 3-D.
    """
    target = _as_points(target)
    check_dimension(target.shape[1])
    chosen = _evenly(list(snapshots), MAX_PANELS)
    dim = target.shape[1]
    if dim == 1:
        fig, axes = _figure(1, 1, width=6.4, height=3.6)
        ax = axes[0][0]
        _density(ax, target, target_weights, TARGET, "target", filled=True)
        for k, (step, points) in enumerate(chosen):
            shade = 0.3 + 0.7 * (k + 1) / len(chosen)  # earlier steps are lighter
            _density(ax, _as_points(points), source_weights, SOURCE, f"step {step}", alpha=shade)
        ax.set_title("gradient flow: density of the moving points")
        _density_legend(fig, ax)
    elif dim == 2:
        fig, axes = _figure(1, len(chosen), width=3.0, height=3.2)
        limits = _limits([target] + [p for _, p in chosen])
        for ax, (step, points) in zip(axes[0], chosen, strict=True):
            _scatter(ax, target, TARGET, "target")
            _scatter(ax, _as_points(points), SOURCE, "moving points")
            _frame(ax, limits, f"step {step}")
        _legend(fig)
    else:
        ends = [chosen[0], chosen[-1]] if len(chosen) > 1 else chosen
        fig, axes = _figure(len(ends), 3, width=3.0, height=3.0)
        for row, (step, points) in zip(axes, ends, strict=True):
            _projections(row, [(target, TARGET, "target"), (_as_points(points), SOURCE, "moving points")],
                         f"step {step}")
        _legend(fig)
    _save(fig, path, protect)


def plot_match(
    path: PathLike,
    source: np.ndarray,
    target: np.ndarray,
    registered: np.ndarray,
    *,
    potential: Callable[[np.ndarray], np.ndarray] | None = None,
    source_weights: np.ndarray | None = None,
    target_weights: np.ndarray | None = None,
    protect: Iterable[PathLike] = (),
) -> None:
    """Draw a registration by a transport map: where each source point goes.

    2-D: the source (red) and the target (blue), an arrow from each source point to its
    registered position (at most 200 arrows, evenly chosen) and, when ``potential`` is
    given, its level lines (grey). 1-D: the densities of the source, the target and the
    registered points. 3-D: the three clouds projected on the planes xy, xz and yz.

    Args:
        path: the PNG file to write.
        source: ``(N, D)`` the source points.
        target: ``(M, D)`` the target points.
        registered: ``(N, D)`` the source points moved by the registration.
        potential: 2-D only: a function from points ``(K, 2)`` to values ``(K,)`` (e.g. the
            dual potential whose gradient is the displacement), drawn as level lines.
        source_weights: ``(N,)`` weights of the source (and registered) points for the 1-D
            densities, or None for uniform weights.
        target_weights: ``(M,)`` weights of the target points, or None.
        protect: input files that must not be overwritten.

    Raises:
        ParameterError: the points are not 1-, 2- or 3-D.
    """
    _overlay(path, source, target, registered, arrows=True, potential=potential,
             weights=(source_weights, target_weights), protect=protect)


def plot_register(
    path: PathLike,
    source: np.ndarray,
    target: np.ndarray,
    registered: np.ndarray,
    *,
    source_weights: np.ndarray | None = None,
    target_weights: np.ndarray | None = None,
    grid: Callable | None = None,
    protect: Iterable[PathLike] = (),
) -> None:
    """Draw a registration: source, target and registered points.

    The same figure as :func:`plot_match` without arrows or level lines: 2-D and 3-D
    overlays (source red, target blue, registered green), 1-D densities. In 2-D, ``grid``
    (a map of the plane, e.g. a :class:`geomreg.deform.Warp`) adds the image of a regular
    grid over the source's bounding box: how the warp deforms space.

    Args:
        path: the PNG file to write.
        source: ``(N, D)`` the source points.
        target: ``(M, D)`` the target points.
        registered: ``(N, D)`` the transformed source points.
        source_weights: ``(N,)`` weights of the source points (1-D densities), or None.
        target_weights: ``(M,)`` weights of the target points, or None.
        grid: a function from ``(K, 2)`` points to their ``(K, 2)`` images, or None.
        protect: input files that must not be overwritten.

    Raises:
        ParameterError: the points are not 1-, 2- or 3-D.
    """
    _overlay(path, source, target, registered, arrows=False, potential=None,
             weights=(source_weights, target_weights), grid=grid, protect=protect)


def plot_images(
    path: PathLike,
    source_density: np.ndarray,
    target_density: np.ndarray,
    transported_density: np.ndarray,
    *,
    protect: Iterable[PathLike] = (),
) -> None:
    """Draw three density images side by side: source, target and transported source.

    The three panels share one colour scale (from 0 to the largest density of the three),
    so that the transported density can be compared with the target's pixel by pixel.

    Args:
        path: the PNG file to write.
        source_density: ``(H, W)`` the source image's density, first row on top.
        target_density: ``(H', W')`` the target's.
        transported_density: ``(H', W')`` the source's mass moved onto the target's pixels.
        protect: input files that must not be overwritten.
    """
    images = [np.asarray(d, dtype=np.float64) for d in (source_density, target_density, transported_density)]
    for name, img in zip(("source", "target", "transported"), images, strict=True):
        if img.ndim != 2:
            raise ParameterError("plot", f"the {name} density is not an image (shape {img.shape})")
    top = max(float(np.nanmax(img)) for img in images)
    top = top if top > 0 else 1.0
    fig, axes = _figure(1, 3, width=3.2, height=3.0)
    for ax, img, title in zip(axes[0], images, ("source", "target", "transported"), strict=True):
        shown = ax.imshow(img, cmap="magma_r", vmin=0, vmax=top, interpolation="nearest")  # row 0 on top
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=axes[0].tolist(), shrink=0.8, label="density")
    _save(fig, path, protect)


# --------------------------------------------------------------------------- the pieces


def _overlay(path, source, target, registered, *, arrows, potential, weights, protect, grid=None) -> None:
    """:func:`plot_match` and :func:`plot_register`: the three clouds, by dimension."""
    source, target, registered = (_as_points(p) for p in (source, target, registered))
    check_dimension(target.shape[1])
    dim = target.shape[1]
    title = f"{'match' if arrows else 'registration'}: source, target and registered points"
    if arrows and dim == 2:
        title = "match: each source point to its registered position"
    if dim == 1:
        fig, axes = _figure(1, 1, width=6.4, height=3.6)
        ax = axes[0][0]
        _density(ax, target, weights[1], TARGET, "target", filled=True)
        _density(ax, source, weights[0], SOURCE, "source")
        _density(ax, registered, weights[0], REGISTERED, "registered")
        ax.set_title(title)
        _density_legend(fig, ax)
    elif dim == 2:
        fig, axes = _figure(1, 1, width=5.4, height=6.0)
        ax = axes[0][0]
        limits = _limits([source, target, registered])
        if potential is not None:
            _level_lines(ax, potential, limits)
        if grid is not None:
            _warped_grid(ax, grid, source)
            limits = _limits([source, target, registered, *_line_points(ax)])
        _scatter(ax, target, TARGET, "target")
        _scatter(ax, source, SOURCE, "source")
        if arrows:
            _arrows(ax, source, registered)
        else:
            _scatter(ax, registered, REGISTERED, "registered")
        if potential is not None:  # a legend entry for the level lines
            ax.plot([], [], color="0.65", linewidth=0.7, label="level lines of the potential")
        _frame(ax, limits, title)
        _legend(fig)
    else:
        fig, axes = _figure(1, 3, width=3.2, height=3.2)
        _projections(axes[0], [(target, TARGET, "target"), (source, SOURCE, "source"),
                               (registered, REGISTERED, "registered")], "")
        fig.suptitle(title)
        _legend(fig)
    _save(fig, path, protect)


#: lines of the warped grid in each direction, and points drawn along each
GRID_LINES, GRID_SAMPLES = 16, 120


def _warped_grid(ax, warp: Callable, source: np.ndarray) -> None:
    """The image by ``warp`` of a regular grid over the source's bounding box (grey lines)."""
    lo, hi = source.min(0), source.max(0)
    pad = 0.05 * (hi - lo).max()
    lo, hi = lo - pad, hi + pad
    along = np.linspace(0.0, 1.0, GRID_SAMPLES)
    lines = []
    for t in np.linspace(0.0, 1.0, GRID_LINES):
        for axis in (0, 1):
            pts = np.empty((GRID_SAMPLES, 2))
            pts[:, axis] = lo[axis] + t * (hi[axis] - lo[axis])
            pts[:, 1 - axis] = lo[1 - axis] + along * (hi[1 - axis] - lo[1 - axis])
            lines.append(pts)
    moved = np.asarray(warp(np.concatenate(lines)), dtype=np.float64).reshape(len(lines), GRID_SAMPLES, 2)
    for i, line in enumerate(moved):
        ax.plot(line[:, 0], line[:, 1], color="0.72", linewidth=0.6, zorder=0,
                label="source's grid, warped" if i == 0 else None)


def _line_points(ax) -> list[np.ndarray]:
    """The vertices of the lines drawn on ``ax``, as ``(K, 2)`` arrays."""
    return [np.asarray(line.get_xydata(), dtype=np.float64) for line in ax.get_lines()]


def _figure(rows: int, cols: int, *, width: float, height: float):
    """A figure of ``rows x cols`` panels of ``width x height`` inches; axes as a 2-D array."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _save(fig, path: PathLike, protect: Iterable[PathLike]) -> None:
    """Write the figure as PNG to ``path`` atomically."""

    def write(tmp: str) -> None:  # "tight": titles above equal-aspect panels are never cut off
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white", bbox_inches="tight", pad_inches=0.1)

    atomic_write(path, write, protect=protect)


def _as_points(points) -> np.ndarray:
    """``(N, D)`` float64 (a flat array is N points in 1-D)."""
    p = np.asarray(points, dtype=np.float64)
    return p[:, None] if p.ndim == 1 else p


def _evenly(items: list, k: int) -> list:
    """At most ``k`` items, evenly spread, always with the first and the last."""
    if len(items) <= k:
        return items
    picks = np.unique(np.rint(np.linspace(0, len(items) - 1, k)).astype(int))
    return [items[i] for i in picks]


def _thin(points: np.ndarray, most: int) -> np.ndarray:
    """At most ``most`` of the points, evenly spread through the array."""
    if len(points) <= most:
        return points
    return points[np.unique(np.rint(np.linspace(0, len(points) - 1, most)).astype(int))]


def _limits(clouds: list[np.ndarray], margin: float = 0.05) -> np.ndarray:
    """``(D, 2)`` bounds of a cube around all the clouds, with ``margin`` of their span around.

    A cube, so that every panel drawn with an equal aspect is square.
    """
    pts = np.concatenate([_as_points(c) for c in clouds])
    lo, hi = pts.min(0), pts.max(0)
    half = (0.5 + margin) * max(float((hi - lo).max()), 1e-12)
    centre = (lo + hi) / 2
    return np.stack([centre - half, centre + half], axis=1)


def _dot_size(n: int) -> float:
    """Marker area (points^2) that keeps a cloud of ``n`` points readable."""
    return float(np.clip(3000.0 / max(n, 1), 1.0, 16.0))


def _scatter(ax, points: np.ndarray, color: str, label: str, dims=(0, 1)) -> None:
    """The points (thinned to MAX_DOTS), projected on the coordinates ``dims``."""
    shown = _thin(points, MAX_DOTS)
    ax.scatter(shown[:, dims[0]], shown[:, dims[1]], s=_dot_size(len(points)), c=color,
               linewidths=0, label=label, zorder=3)


def _frame(ax, limits: np.ndarray, title: str, dims=(0, 1)) -> None:
    """Equal aspect, the given limits on the coordinates ``dims``, a title."""
    ax.set_xlim(*limits[dims[0]])
    ax.set_ylim(*limits[dims[1]])
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.tick_params(labelsize="small")


def _legend(fig) -> None:
    """One legend for the whole figure, below the panels, from the first panel's labels."""
    from matplotlib.collections import PathCollection
    from matplotlib.lines import Line2D

    handles, labels = fig.axes[0].get_legend_handles_labels()
    # the dots of a large cloud are too small for a legend: one readable dot per cloud
    handles = [Line2D([], [], marker="o", linestyle="", markersize=6, color=h.get_facecolor()[0])
               if isinstance(h, PathCollection) else h for h in handles]
    columns = len(labels) if len(labels) <= 3 else 2
    fig.legend(handles, labels, loc="outside lower center", ncols=columns, frameon=False)


def _projections(axes, clouds, title: str) -> None:
    """One row of three panels: ``(points, colour, label)`` clouds on the planes xy, xz, yz."""
    limits = _limits([p for p, _, _ in clouds])
    for ax, dims in zip(axes, PLANES, strict=True):
        for points, color, label in clouds:
            _scatter(ax, points, color, label, dims)
        plane = AXIS_NAMES[dims[0]] + AXIS_NAMES[dims[1]]
        _frame(ax, limits, f"{title}, {plane}" if title else plane, dims)
        ax.set_xlabel(AXIS_NAMES[dims[0]], fontsize="small")
        ax.set_ylabel(AXIS_NAMES[dims[1]], fontsize="small")


def _arrows(ax, start: np.ndarray, end: np.ndarray) -> None:
    """Arrows from ``start`` to ``end`` (at most MAX_ARROWS, evenly chosen), in data units."""
    keep = np.unique(np.rint(np.linspace(0, len(start) - 1, min(len(start), MAX_ARROWS))).astype(int))
    p, v = start[keep], end[keep] - start[keep]
    ax.quiver(p[:, 0], p[:, 1], v[:, 0], v[:, 1], angles="xy", scale_units="xy", scale=1,
              color="0.2", alpha=0.5, width=0.002, headwidth=4, headlength=5, zorder=2,
              label="displacement")


def _level_lines(ax, potential: Callable[[np.ndarray], np.ndarray], limits: np.ndarray,
                 size: int = 100, levels: int = 15) -> None:
    """Level lines of ``potential`` on a ``size x size`` grid over ``limits``."""
    gx, gy = np.meshgrid(np.linspace(*limits[0], size), np.linspace(*limits[1], size))
    values = np.asarray(potential(np.stack([gx.ravel(), gy.ravel()], axis=1)), dtype=np.float64)
    ax.contour(gx, gy, values.reshape(gx.shape), levels=levels, colors="0.65", linewidths=0.7,
               linestyles="solid", zorder=1)


def _density(ax, points: np.ndarray, weights, color: str, label: str, *, filled: bool = False,
             alpha: float = 1.0) -> None:
    """A gaussian kernel density estimate of 1-D weighted points, as a curve."""
    x = points[:, 0]
    w = np.full(len(x), 1.0 / len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    width = _bandwidth(x, w)
    # the curve spans its points' range and that of the curves already drawn, 3 widths more
    lo, hi = ax.get_xlim() if ax.has_data() else (x.min(), x.max())
    lo, hi = min(lo, x.min() - 3 * width), max(hi, x.max() + 3 * width)
    grid = np.linspace(lo, hi, 512)
    values = _kde(x, w, grid, width)
    if filled:
        ax.fill_between(grid, values, color=color, alpha=0.3, linewidth=0)
        ax.plot(grid, values, color=color, label=label, linewidth=1)
    else:
        ax.plot(grid, values, color=color, label=label, alpha=alpha, linewidth=1.5)
    ax.set_xlim(lo, hi)
    ax.set_xlabel("x")
    ax.set_ylabel("density")


def _density_legend(fig, ax) -> None:
    """Densities start at 0; the legend goes right of the axes, away from the curves."""
    ax.set_ylim(0, None)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", frameon=False)


def _bandwidth(x: np.ndarray, w: np.ndarray) -> float:
    """Scott's rule for weighted points; 1/20 of their range (or 1) when it gives 0."""
    mean = float((w * x).sum())
    std = float(np.sqrt((w * (x - mean) ** 2).sum()))
    n_eff = 1.0 / float((w**2).sum())
    width = std * n_eff ** (-1 / 5)
    if width > 0:
        return width
    span = float(x.max() - x.min())
    return span / 20 if span > 0 else 1.0


def _kde(x: np.ndarray, w: np.ndarray, grid: np.ndarray, width: float, chunk: int = 4096) -> np.ndarray:
    """``sum_i w_i N(grid; x_i, width^2)``, in chunks of points (memory: chunk x grid)."""
    out = np.zeros_like(grid)
    for i in range(0, len(x), chunk):
        d = (grid[None, :] - x[i : i + chunk, None]) / width
        out += (w[i : i + chunk, None] * np.exp(-0.5 * d**2)).sum(0)
    return out / (width * np.sqrt(2 * np.pi))

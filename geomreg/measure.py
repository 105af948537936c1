"""The one type every reader produces and every loss consumes: a weighted point cloud.

A :class:`Measure` is ``alpha = sum_i a_i delta_{x_i}`` with points ``(N, D)`` and
non-negative weights ``(N,)``. Validation happens here, once, where data enters; the
engine and the losses trust what they receive.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from .errors import InputError


@dataclass(frozen=True)
class Grid:
    """Where an image's pixels sit, for measures read from density images.

    Attributes:
        shape: the image shape ``(H, W)`` (rows, columns) or a volume's ``(H, W, D)``.
        spacing: the side of one (square) pixel; the longer image side spans [0, 1].
        mask: flat indices (row-major, rows flipped so that +y is up) of the pixels kept
            as points, i.e. those with positive mass.
        dims: the point coordinate carried by each array axis: ``(1, 0)`` for images (rows
            carry y, columns x), ``(0, 1, 2)`` for volumes (axis k carries coordinate k).
    """

    shape: tuple[int, ...]
    spacing: float
    mask: np.ndarray = field(repr=False)
    dims: tuple[int, ...] = (1, 0)

    @property
    def size(self) -> int:
        """Number of pixels (voxels), with or without mass."""
        return int(np.prod(self.shape))

    def full(self, values: np.ndarray) -> np.ndarray:
        """Values on the kept pixels, scattered onto the whole grid (zeros elsewhere), flat."""
        out = np.zeros(self.size, dtype=np.asarray(values).dtype)
        out[self.mask] = values
        return out

    def centres(self, indices: np.ndarray | None = None) -> np.ndarray:
        """``(K, D)`` coordinates of the pixel (voxel) centres at flat ``indices`` (default: all)."""
        flat = np.arange(self.size) if indices is None else np.asarray(indices)
        idx = np.stack(np.unravel_index(flat, self.shape), axis=1)
        pts = np.empty((len(flat), len(self.shape)))
        for k, d in enumerate(self.dims):
            pts[:, d] = (idx[:, k] + 0.5) * self.spacing
        return pts

    def splat(self, points: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Masses at arbitrary ``points (N, D)`` spread onto the pixels, flat ``(size,)``.

        Multilinear splatting: each mass goes to the 2^D pixel centres around its point,
        with the interpolation weights, so the total mass and the barycentre are kept
        (points beyond the outer centres are clamped onto them).
        """
        pts, w = np.asarray(points, dtype=np.float64), np.asarray(weights, dtype=np.float64)
        out = np.zeros(self.shape)
        # continuous index along each array axis, clamped to the centres' range
        pos = [np.clip(pts[:, d] / self.spacing - 0.5, 0, n - 1)
               for d, n in zip(self.dims, self.shape, strict=True)]
        lo = [np.minimum(np.floor(q).astype(int), n - 2) if n > 1 else np.zeros(len(q), int)
              for q, n in zip(pos, self.shape, strict=True)]
        frac = [q - f for q, f in zip(pos, lo, strict=True)]
        for corner in np.ndindex(*(2,) * len(self.shape)):
            share = w.copy()
            index = []
            for k, bit in enumerate(corner):
                n = self.shape[k]
                share *= frac[k] if bit else 1 - frac[k]
                index.append(np.minimum(lo[k] + bit, n - 1))
            np.add.at(out, tuple(index), share)
        return out.reshape(-1)

    def measure(self, flat: np.ndarray, source: str) -> Measure:
        """The measure of per-pixel masses ``flat (size,)`` on this grid (pixels with mass kept)."""
        mask = np.flatnonzero(flat > 0)
        if mask.size == 0:
            raise InputError(source, "no pixel has mass")
        grid = Grid(self.shape, self.spacing, mask, self.dims)
        return Measure(self.centres(mask), flat[mask], source, grid)

    def to_array(self, flat: np.ndarray) -> np.ndarray:
        """A flat per-pixel array shaped like the input file.

        Images get their rows back in file order (top row first); volumes are returned as
        they are. Trailing axes (e.g. the 2 components of a field) are kept.
        """
        arr = np.asarray(flat).reshape(*self.shape, *np.asarray(flat).shape[1:])
        return arr[::-1] if len(self.shape) == 2 else arr


@dataclass(frozen=True)
class Measure:
    r"""A weighted point cloud :math:`\alpha = \sum_i a_i \delta_{x_i}`.

    Attributes:
        points: ``(N, D)`` float64 array, finite, N >= 1, D >= 1.
        weights: ``(N,)`` float64 array, finite, >= 0, positive and finite total mass.
        source: where the measure came from (a file name), used in error messages.
        grid: pixel layout when the measure was read from an image, else None.
        faces: ``(F, 3)`` int64 triangles when the points are the vertices of a mesh (read
            from a mesh file with its vertices as the measure), else None.
        origin: ``(D,)`` float64 offset subtracted from the coordinates when they were read
            (a LAS header's offset): the points in the file's own frame are ``points +
            origin``. None: the points are in the file's frame.
        las: the LAS point records of the points (:class:`geomreg.io.las.LasPoints`) when
            read from a LAS/LAZ file, carried to a LAS output; else None.
    """

    points: np.ndarray
    weights: np.ndarray
    source: str = "<array>"
    grid: Grid | None = None
    faces: np.ndarray | None = field(default=None, repr=False, compare=False)
    origin: np.ndarray | None = field(default=None, repr=False, compare=False)
    las: object | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        where = self.source
        pts = _as_array(self.points, where, "points")
        if pts.dtype.kind not in _REAL_KINDS:
            raise InputError(where, f"points must be real numbers, found dtype {pts.dtype}")
        if pts.ndim == 1:
            pts = pts[:, None]
        if pts.ndim != 2:
            raise InputError(
                where, f"points must be an (N, D) array, found {pts.ndim} dimensions {pts.shape}"
            )
        n, d = pts.shape
        if n < 1:
            raise InputError(where, "0 points; a point cloud needs at least 1")
        if d < 1:
            raise InputError(where, "points have 0 coordinates; need at least 1 (N, D >= 1)")
        pts = pts.astype(np.float64, copy=False)
        bad = ~np.isfinite(pts)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise InputError(where, f"non-finite coordinate (NaN or inf) at point {row}")
        w = np.full(n, 1.0 / n) if self.weights is None else _as_array(self.weights, where, "weights")
        w = _check_weights(w, n, where)
        object.__setattr__(self, "points", pts)
        object.__setattr__(self, "weights", w)
        if self.faces is not None:
            object.__setattr__(self, "faces", _check_faces(self.faces, n, where))
        if self.origin is not None:
            origin = np.asarray(self.origin, dtype=np.float64).reshape(-1)
            if origin.shape != (d,) or not np.isfinite(origin).all():
                raise InputError(where, f"origin must be {d} finite numbers, found {self.origin!r}")
            object.__setattr__(self, "origin", origin)
        if self.las is not None and len(self.las) != n:
            raise InputError(where, f"{len(self.las)} LAS records for {n} points")

    def rebased(self, origin: np.ndarray | None) -> Measure:
        """The same measure with its points relative to ``origin`` (None: the file's frame).

        Measures compared or registered together must share one origin; writers add the
        origin back.
        """
        mine = np.zeros(self.dim) if self.origin is None else self.origin
        theirs = np.zeros(self.dim) if origin is None else np.asarray(origin, dtype=np.float64)
        if np.array_equal(mine, theirs):
            return self if (self.origin is None) == (origin is None) else replace(self, origin=origin)
        return replace(self, points=self.points + (mine - theirs), origin=origin)

    @property
    def n(self) -> int:
        """Number of points N."""
        return self.points.shape[0]

    @property
    def dim(self) -> int:
        """Ambient dimension D."""
        return self.points.shape[1]

    @property
    def mass(self) -> float:
        """Total mass sum_i a_i."""
        return float(self.weights.sum())


def _as_array(values, where: str, what: str) -> np.ndarray:
    """``values`` as an array; ragged or otherwise unconvertible input is an InputError."""
    try:
        return np.asarray(values)
    except (ValueError, TypeError) as exc:
        raise InputError(where, f"{what} are not an array of numbers ({exc})") from None


#: dtype kinds accepted as real numbers: signed and unsigned integers, floats (not bool,
#: complex, timedelta (whose NaT would become a finite number), strings or objects)
_REAL_KINDS = "iuf"


def _check_faces(faces, n: int, where: str) -> np.ndarray:
    """Validate triangles of a mesh of ``n`` vertices; returns them as int64 (F, 3)."""
    f = _as_array(faces, where, "faces")
    if f.dtype.kind not in "iu" or f.ndim != 2 or f.shape[1] != 3:
        raise InputError(where, f"faces must be an (F, 3) array of vertex indices, found {f.dtype} {f.shape}")
    if f.shape[0] == 0:
        raise InputError(where, "0 faces; a mesh needs at least 1 triangle")
    f = f.astype(np.int64, copy=False)
    bad = (f < 0) | (f >= n)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise InputError(where, f"face {row} refers to vertex {int(f[bad][0])}; the mesh has {n} vertices "
                         "(numbered from 0)")
    return f


def _check_weights(w: np.ndarray, n: int, where: str) -> np.ndarray:
    """Validate a weight vector for N points; returns it as float64 (N,)."""
    if w.dtype.kind not in _REAL_KINDS:
        raise InputError(where, f"weights must be real numbers, found dtype {w.dtype}")
    w = np.squeeze(w) if w.ndim > 1 and max(w.shape) == w.size else w
    w = np.atleast_1d(w).astype(np.float64, copy=False)
    if w.ndim != 1 or w.shape[0] != n:
        raise InputError(where, f"expected {n} weights (one per point), found shape {w.shape}")
    if not np.isfinite(w).all():
        raise InputError(where, f"non-finite weight at index {int(np.argmin(np.isfinite(w)))}")
    if (w < 0).any():
        i = int(np.argmax(w < 0))
        raise InputError(where, f"negative weight {w[i]:g} at index {i}; weights must be >= 0")
    with np.errstate(over="ignore"):
        total = w.sum()
    if not total > 0:
        raise InputError(where, "all weights are zero; a measure needs positive total mass")
    if not np.isfinite(total):
        raise InputError(where, "the weights add up to more than the largest float (overflow); rescale them")
    return w

"""Writers: output files appear complete or not at all, and never replace an input.

Every writer goes through :func:`atomic_write`: the data is written to a temporary file
in the target's folder, flushed to disk, then renamed onto the target in one step, so a
reader (or a crash, or Ctrl-C) never sees a half-written file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from ..errors import OutputError


def atomic_write(
    path: str | os.PathLike,
    write_fn: Callable[[str], object],
    *,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write a file atomically: ``write_fn`` fills a temporary file renamed onto ``path``.

    Args:
        path: the file to create or replace; its parent folder must exist.
        write_fn: called with the temporary file's path (a str); writes the whole content
            there.
        protect: paths that must not be overwritten (the input files); compared after
            resolving links, and by identity of the file (hard links) when both exist.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: the parent folder does not exist, ``path`` is a folder or one of the
            protected files, or the file system refuses the write (permissions, disk full).
        Exception: whatever ``write_fn`` raises (other than OSError), re-raised after the
            temporary file is removed; so is KeyboardInterrupt.
    """
    return atomic_write_many([(path, write_fn)], protect=protect)[0]


def atomic_write_many(
    jobs: Iterable[tuple[str | os.PathLike, Callable[[str], object]]],
    *,
    protect: Iterable[str | os.PathLike] = (),
) -> list[Path]:
    """Write several files as one unit: all temporary files first, then all the renames.

    If any file cannot be written, none of the targets is touched and every temporary
    file is removed (a command's outputs appear together or not at all).

    Args:
        jobs: ``(path, write_fn)`` pairs, as for :func:`atomic_write`.
        protect: input files that must not be overwritten.

    Returns:
        The target paths, in order.
    """
    protect = list(protect)
    jobs = [(check_output(path, protect=protect), fn) for path, fn in jobs]
    temps: list[str] = []
    try:
        for path, write_fn in jobs:
            # named and registered for removal before it exists: an interrupt between the
            # creation and the registration would otherwise leave it behind
            tmp = str(path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp")
            temps.append(tmp)
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except OSError as exc:
                temps.pop()  # not ours (it may exist already): never removed
                raise OutputError(
                    str(path), f"cannot write in {path.parent}: {exc.strerror or exc}"
                ) from None
            try:
                write_fn(tmp)
                _fsync(tmp)
                os.chmod(tmp, _target_mode(path))
            except OSError as exc:
                raise OutputError(str(path), f"could not write: {exc.strerror or exc}") from exc
        for (path, _), tmp in zip(jobs, temps, strict=True):
            os.replace(tmp, path)
    except BaseException:
        for tmp in temps:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
    for parent in {path.parent for path, _ in jobs}:
        _fsync_dir(parent)
    return [path for path, _ in jobs]


def check_output(path: str | os.PathLike, *, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Check that ``path`` can be written (before any long computation starts).

    Args:
        path: the output file.
        protect: input files that must not be overwritten.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: missing parent folder, parent not a folder, target is a folder or
            one of the protected files.
    """
    path = Path(path)
    where = str(path)
    parent = path.parent
    if not parent.exists():
        raise OutputError(where, f"parent folder does not exist ({parent})")
    if not parent.is_dir():
        raise OutputError(where, f"parent {parent} is not a folder")
    if path.is_dir():
        raise OutputError(where, "is a directory, expected a file name")
    for other in protect:
        if _same_file(path, Path(other)):
            raise OutputError(where, "refusing to overwrite an input file")
    return path


def write_npy(path: str | os.PathLike, array, *, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Save a numeric array as ``.npy`` atomically, to exactly ``path``.

    Args:
        path: the target file (no ``.npy`` is appended to it).
        array: anything :func:`numpy.asarray` turns into an array; object arrays are
            refused (they would need pickling).
        protect: input files that must not be overwritten (see :func:`atomic_write`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return atomic_write(path, npy_writer(array), protect=protect)


def write_text(path: str | os.PathLike, text: str, *, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Write ``text`` (UTF-8) atomically to ``path``.

    Args:
        path: the target file.
        text: the whole content.
        protect: input files that must not be overwritten (see :func:`atomic_write`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return atomic_write(path, text_writer(text), protect=protect)


def npy_writer(array) -> Callable[[str], None]:
    """A ``write_fn`` for :func:`atomic_write`: saves ``array`` as ``.npy`` (no pickling)."""
    arr = np.asarray(array)

    def _save(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)

    return _save


#: colour ramp of heat maps, dark blue (low) to yellow (high): viridis' key colours
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], float)


def heatmap_rgb(values: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 colours of a 2-D array: minimum dark blue, maximum yellow, NaN white."""
    v = np.asarray(values, dtype=np.float64)
    known = np.isfinite(v)
    lo, hi = (float(v[known].min()), float(v[known].max())) if known.any() else (0.0, 0.0)
    t = np.where(known, (v - lo) / (hi - lo) if hi > lo else 0.0, 0.0)
    pos = t * (len(_RAMP) - 1)
    k = np.minimum(pos.astype(int), len(_RAMP) - 2)
    frac = (pos - k)[..., None]
    rgb = np.rint(_RAMP[k] * (1 - frac) + _RAMP[k + 1] * frac)
    rgb[~known] = 255
    return rgb.astype(np.uint8)


def png_heatmap_writer(values: np.ndarray) -> Callable[[str], None]:
    """A ``write_fn`` for :func:`atomic_write`: a 2-D array as a PNG heat map (:func:`heatmap_rgb`)."""
    rgb = heatmap_rgb(values)

    def _save(tmp: str) -> None:
        import imageio.v3 as iio

        iio.imwrite(tmp, rgb, extension=".png")

    return _save


#: point-cloud output formats, by suffix
POINT_SUFFIXES = (".npy", ".ply", ".txt", ".csv", ".xyz")


def points_writer(path: str | os.PathLike, points, weights=None) -> Callable[[str], None]:
    """A ``write_fn`` for :func:`atomic_write` saving a cloud in the format of ``path``'s suffix.

    ``.npy``: the ``(N, D)`` float64 array. ``.ply``: binary little-endian, vertices ``x y z``
    (float64; ``z = 0`` for 2-D clouds) and, when given, a ``weight`` property.
    ``.txt``/``.xyz``: one point per line, space-separated; ``.csv``: comma-separated (the
    coordinates only; weights travel in PLY files).

    Raises:
        OutputError: an unknown suffix, or a cloud a PLY file cannot hold (D > 3).
    """
    pts = np.asarray(points, dtype=np.float64)
    suffix = Path(path).suffix.lower()
    if suffix not in POINT_SUFFIXES:
        raise OutputError(str(path), f"unknown point-cloud format {suffix or '(no suffix)'!r}; "
                          "use " + ", ".join(POINT_SUFFIXES))
    if suffix == ".npy":
        return npy_writer(pts)
    if suffix in (".txt", ".xyz", ".csv"):
        sep = "," if suffix == ".csv" else " "
        return text_writer("".join(sep.join(repr(float(v)) for v in row) + "\n" for row in pts))
    if pts.shape[1] > 3:
        raise OutputError(str(path), f"a PLY file holds points of at most 3 coordinates, not {pts.shape[1]}")
    xyz = np.zeros((pts.shape[0], 3))
    xyz[:, : pts.shape[1]] = pts
    fields = [("x", "<f8"), ("y", "<f8"), ("z", "<f8")]
    if weights is not None:
        fields.append(("weight", "<f8"))
    rows = np.empty(pts.shape[0], dtype=fields)
    rows["x"], rows["y"], rows["z"] = xyz.T
    if weights is not None:
        rows["weight"] = np.asarray(weights, dtype=np.float64)
    header = ["ply", "format binary_little_endian 1.0", "comment written by geomreg",
              f"element vertex {pts.shape[0]}"]
    header += [f"property double {name}" for name, _ in fields] + ["end_header"]

    def _save(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(("\n".join(header) + "\n").encode("ascii"))
            fh.write(rows.tobytes())

    return _save


#: formats :func:`moved_writer` writes: clouds, meshes (for a mesh source) and LAS (for a LAS source)
MESH_OUTPUT_SUFFIXES = (".obj", ".off", ".stl", ".ply")
LAS_OUTPUT_SUFFIXES = (".las", ".laz")
MOVED_SUFFIXES = POINT_SUFFIXES + (".obj", ".off", ".stl") + LAS_OUTPUT_SUFFIXES


def check_moved(path: str | os.PathLike, source=None) -> None:
    """Check, before a computation, that :func:`moved_writer` can write ``source`` moved to ``path``.

    ``source`` None checks the suffix alone (before the inputs are read).

    Raises:
        OutputError: an unknown suffix; a mesh format (``.obj .off .stl``) for a source that
            is not a mesh read with its vertices; ``.las``/``.laz`` for a source not read from
            a LAS/LAZ file.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in MOVED_SUFFIXES:
        raise OutputError(str(path), f"unknown output format {suffix or '(no suffix)'!r}; use "
                          + ", ".join(MOVED_SUFFIXES))
    if source is None:
        return
    if suffix in LAS_OUTPUT_SUFFIXES and getattr(source, "las", None) is None:
        raise OutputError(str(path), f"a {suffix} output carries the point records of a LAS/LAZ input; "
                          f"{source.source} is not one (write .ply, .npy, .txt, .xyz or .csv)")
    if suffix in (".obj", ".off", ".stl") and getattr(source, "faces", None) is None:
        raise OutputError(str(path), f"a {suffix} output is a mesh with the faces of its input; "
                          f"{source.source} is not a mesh read with its vertices (write .ply, .npy, "
                          ".txt, .xyz or .csv)")


def moved_writer(path: str | os.PathLike, source, points, weights=None) -> Callable[[str], None]:
    """A ``write_fn`` for :func:`atomic_write` saving ``source``'s points moved to ``points``.

    ``source`` is the :class:`~geomreg.measure.Measure` that was moved and ``points`` its
    ``(N, D)`` new positions, in the measure's frame (relative to ``source.origin``, which is
    added back). By ``path``'s suffix:

    * a mesh format (``.obj .off .stl .ply``) and a mesh source (read with its vertices as the
      measure): the same faces on the moved vertices (:func:`geomreg.io.meshes.mesh_writer`;
      ``.ply`` also holds ``weights`` as the vertex property ``weight``);
    * ``.las``/``.laz`` and a LAS source: the input's point records with x, y, z replaced
      (same point format, scales, offsets and every other dimension);
    * otherwise exactly :func:`points_writer` (``weights`` in a ``.ply``).

    Raises:
        OutputError: see :func:`check_moved`; or a point count unlike the source's for a mesh
            or LAS output.
    """
    check_moved(path, source)
    pts = np.asarray(points, dtype=np.float64)
    if source.origin is not None:
        pts = pts + source.origin
    suffix = Path(path).suffix.lower()
    if suffix in LAS_OUTPUT_SUFFIXES:
        from .las import las_writer

        return las_writer(path, source.las, pts)
    if source.faces is not None and suffix in MESH_OUTPUT_SUFFIXES:
        if pts.shape[0] != source.n:
            raise OutputError(str(path), f"{pts.shape[0]} points for the {source.n} vertices of a mesh")
        from .meshes import mesh_writer

        return mesh_writer(path, pts, source.faces, weights)
    return points_writer(path, pts, weights)


def density_png_writer(density: np.ndarray) -> Callable[[str], None]:
    """A ``write_fn`` for :func:`atomic_write`: a 2-D density as an 8-bit gray PNG, dark is mass.

    gray = 255 (1 - density / max): the densest pixel is black, pixels without mass white,
    the convention the image reader uses by default (``--mass dark``).
    """
    d = np.clip(np.asarray(density, dtype=np.float64), 0, None)
    top = d.max()
    gray = np.rint(255 * (1 - d / top)) if top > 0 else np.full(d.shape, 255.0)
    img = gray.astype(np.uint8)

    def _save(tmp: str) -> None:
        import imageio.v3 as iio

        iio.imwrite(tmp, img, extension=".png")

    return _save


def text_writer(text: str) -> Callable[[str], None]:
    """A ``write_fn`` for :func:`atomic_write`: writes ``text`` as UTF-8."""

    def _save(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)

    return _save


def _same_file(a: Path, b: Path) -> bool:
    """Tell whether ``a`` and ``b`` name the same file (same real path, or same inode)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _target_mode(path: Path) -> int:
    """Permissions for the new file: the old file's, else the default for new files."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _fsync(name: str) -> None:
    fd = os.open(name, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; not every platform can open a folder, so best effort."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""Readers: turn point-cloud files, arrays and density images into :class:`Measure` objects.

Every reader checks its input and raises :class:`~geomreg.errors.InputError` naming the
file for anything wrong with it (missing, empty, corrupt, truncated, ragged, non-finite);
no other exception escapes :func:`read_measure` or :func:`read_weights`.

Supported suffixes (case-insensitive):

* ``.npy``: a numeric ``(N, D)`` array, or ``(N,)`` for N points in 1-D.
* ``.ply``, ``.pcd``: 3-D points (ASCII, binary, and for PCD binary_compressed); ``.ply``
  vertex properties can serve as weights (``weight_property``). Both are parsed here, not by
  open3d: every declared count is checked against the bytes that must hold it before anything
  is allocated, and a file that ends early or disagrees with its header is refused.
* ``.xyz``, ``.pts``: text clouds, the first three numbers of each row are x y z (extra
  columns such as colours are ignored); a ``.pts`` file may start with a point count.
* ``.txt``, ``.csv``: one point per line, numbers separated by whitespace or commas.
* ``.png``, ``.jpg``, ``.jpeg``, ``.bmp``, ``.tif``, ``.tiff``: density images.
* ``.obj``, ``.off``, ``.stl`` and ``.ply`` files with faces: triangle meshes
  (:mod:`geomreg.io.meshes`); the measure is the vertices, and keeps the faces.
* ``.las``, ``.laz``: lidar point clouds (:mod:`geomreg.io.las`), x y z relative to the header
  offset (the measure's ``origin``), every point record kept for a LAS output.

:data:`SUFFIXES` lists the point-cloud and image suffixes; :data:`ALL_SUFFIXES` adds the mesh
and LAS ones.

Density images follow one convention (see :func:`read_measure`): square pixels, the
longer image side spans [0, 1], rows flipped so that +y is up, and the weight of a pixel
is its density times its area, so a fully dark unit-square image has mass 1.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import tokenize
import warnings
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import GeomregError, InputError, ParameterError
from ..measure import Grid, Measure, _check_weights
from .common import is_number as _is_number
from .common import short as _short
from .las import LAS_SUFFIXES, parse_classes, read_las
from .meshes import area_weights, read_obj, read_off, read_ply_faces, read_stl, sample_surface
from .plypcd import read_pcd, read_ply

ARRAY_SUFFIXES = (".npy",)
POINT_FILE_SUFFIXES = (".ply", ".pcd")
XYZ_SUFFIXES = (".xyz", ".pts")
TEXT_SUFFIXES = (".txt", ".csv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SUFFIXES = ARRAY_SUFFIXES + POINT_FILE_SUFFIXES + XYZ_SUFFIXES + TEXT_SUFFIXES + IMAGE_SUFFIXES
"""The point-cloud and image suffixes :func:`read_measure` accepts (lower case, with the dot)."""
MESH_ONLY_SUFFIXES = (".obj", ".off", ".stl")
ALL_SUFFIXES = SUFFIXES + MESH_ONLY_SUFFIXES + LAS_SUFFIXES
"""Every file suffix :func:`read_measure` accepts: :data:`SUFFIXES`, meshes and LAS/LAZ."""

MASS_MODES = ("dark", "bright")


# --------------------------------------------------------------------------- public API


def read_measure(
    path: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    weight_property: str | None = None,
    mass: str = "dark",
    as_image: bool = False,
    sample: int | None = None,
    classes=None,
    seed: int = 0,
) -> Measure:
    """Read a point cloud, an array or a density image as a weighted point cloud.

    The reader is chosen by the lower-cased file suffix (see :data:`ALL_SUFFIXES`). Point
    clouds get uniform weights 1/N (total mass 1) unless ``weights`` or
    ``weight_property`` says otherwise.

    Meshes (``.obj``, ``.off``, ``.stl``, a ``.ply`` with a ``face`` element): the measure is
    the vertices, with the triangles in ``faces``; ``weights="area"`` weighs each vertex by
    a third of the area of its triangles (normalised), ``sample=N`` replaces the vertices by
    N points drawn uniformly on the surface (no faces then). LAS/LAZ: points relative to the
    header offset (kept as ``origin``), the point records in ``las``; ``classes`` keeps the
    points of those classification codes.

    Density images: gray is the mean of the RGB channels scaled to [0, 1] by the dtype's
    maximum (255 or 65535). Transparent pixels are background: with an alpha channel the
    image is composited over white for ``mass="dark"`` and over black for
    ``mass="bright"``. Density is ``1 - gray`` (dark) or ``gray`` (bright). Rows are
    flipped so that +y is up; with ``spacing = 1 / max(H, W)``, pixel (row i counted from
    the bottom, column j) sits at ``((j + 0.5) * spacing, (i + 0.5) * spacing)`` and weighs
    ``density * spacing**2``. Only pixels with positive density become points; the
    measure's ``grid`` records the image shape, the spacing and their flat indices.

    Args:
        path: the file to read.
        weights: a ``.npy`` or text file holding one weight per point; replaces the default
            weights. Errors in it name this file.
        weight_property: name of a per-vertex PLY property (e.g. ``"confidence"``) to use
            as weights; ``.ply`` files only.
        mass: ``"dark"`` (dark pixels carry mass, the default) or ``"bright"``; used for
            images only.
        as_image: read a rank-2 ``.npy`` array as a density image (rows like an image file's:
            the first row is the top) instead of as an (N, D) point cloud.
        sample: read N points: on a mesh, N points on its surface (triangles drawn by area);
            on any other cloud (LAS included), N of its points drawn without replacement and
            kept in file order (all of them when it has at most N). Not for images.
        classes: LAS/LAZ only: classification codes to keep (``"2,6"`` or ints).
        seed: seed of the random generator ``sample`` draws from (the same seed, the same
            points).

    Arrays of rank 3 in ``.npy`` files are density volumes: voxel ``(i, j, k)`` sits at
    ``((i + 0.5) s, (j + 0.5) s, (k + 0.5) s)`` with ``s = 1 / max(shape)`` and weighs
    ``value * s**3``. Density arrays (volumes, ``as_image``) hold non-negative values, used
    as they are (no scaling, no ``mass`` convention).

    Returns:
        The measure, with ``source`` set to ``str(path)``.

    Raises:
        InputError: the file (or the weights file) is missing, unreadable, empty,
            malformed, or holds no valid measure.
        ParameterError: ``mass`` is not ``"dark"`` or ``"bright"``, both ``weights``
            and ``weight_property`` are given, ``sample`` is not a positive integer or is
            given for an image or with weights on a mesh, ``classes`` is given for a file
            that is not LAS/LAZ or is not a list of codes 0-255, or ``weights="area"`` is
            given for a file without faces.
    """
    path = Path(path)
    where = str(path)
    if mass not in MASS_MODES:
        raise ParameterError("mass", f"must be 'dark' or 'bright', not {mass!r}")
    if weights is not None and weight_property is not None:
        raise ParameterError("weight_property", "give either --weights or --weight-property, not both")
    area = isinstance(weights, str) and weights == "area"
    if sample is not None and (isinstance(sample, bool) or not isinstance(sample, (int, np.integer))
                               or sample < 1):
        raise ParameterError("sample", f"must be a positive integer, not {sample!r}")
    suffix = path.suffix.lower()
    if suffix not in ALL_SUFFIXES:
        _check_file(path)
        raise InputError(
            where,
            f"unsupported file type {suffix or '(no suffix)'!r}; supported: " + ", ".join(ALL_SUFFIXES),
        )
    if weight_property is not None and suffix != ".ply":
        raise InputError(where, f"--weight-property works with .ply files only, not {suffix} files")
    if classes is not None and suffix not in LAS_SUFFIXES:
        raise ParameterError(where, f"--classes works with .las and .laz files only, not {suffix} files")
    classes = parse_classes(classes)
    if sample is not None and suffix in IMAGE_SUFFIXES:
        raise ParameterError(where, "--sample works with point clouds and meshes, not images")
    size = _check_file(path)

    grid = faces = origin = las = None
    prop_weights = None
    try:
        if suffix == ".npy":
            arr = _load_npy(path)
            if arr.ndim == 3 or (as_image and arr.ndim == 2):
                points, prop_weights, grid = _density_grid(arr, where)
            else:
                points = _npy_points(arr, path)
        elif suffix == ".ply":
            points, prop_weights = read_ply(path, size, weight_property)
            faces = read_ply_faces(path, size)
        elif suffix == ".obj":
            points, faces = read_obj(path)
        elif suffix == ".off":
            points, faces = read_off(path)
        elif suffix == ".stl":
            points, faces = read_stl(path, size)
        elif suffix in LAS_SUFFIXES:
            points, origin, las = read_las(path, size, classes)
        elif suffix == ".pcd":
            points = read_pcd(path, size)
        elif suffix in XYZ_SUFFIXES:
            points = _read_xyz(path, suffix)
        elif suffix in TEXT_SUFFIXES:
            points = _read_text_points(path)
        else:
            points, prop_weights, grid = _read_image(path, suffix, mass, size)
    except GeomregError:
        raise
    except MemoryError:
        raise InputError(where, "not enough memory to read this file") from None
    except Exception as exc:  # a reader library failed in a way not foreseen above
        raise InputError(where, f"could not read {suffix} file: {_short(exc)}") from exc

    measure = Measure(points, prop_weights, where, grid, faces=faces, origin=origin, las=las)
    if area:
        measure = with_area_weights(measure)
    elif weights is not None:
        measure = replace(measure, weights=read_weights(weights, measure.n))
    if sample is not None:
        if measure.faces is not None and (weights is not None or weight_property is not None):
            raise ParameterError(where, "--sample on a mesh draws points by area: it takes no vertex "
                                 "weights (--weights, --weight-property)")
        measure = sampled(measure, sample, seed)
    return measure


def with_area_weights(measure: Measure) -> Measure:
    """A mesh's measure with each vertex weighted by a third of its triangles' area (sum 1).

    Raises:
        ParameterError: the measure has no faces (not read from a mesh).
        InputError: the mesh has zero area.
    """
    if measure.faces is None:
        raise ParameterError(measure.source, "area weights (--weights area) need a mesh: this file has "
                             "no faces")
    return replace(measure, weights=area_weights(measure.points, measure.faces, measure.source))


def sampled(measure: Measure, n: int, seed: int = 0) -> Measure:
    """``n`` points of a measure: on a mesh's surface, else a random subset (see :func:`read_measure`).

    Surface samples have uniform weights; a subset keeps its points' weights, LAS records
    and origin, in their original order. Seeded by ``seed``.
    """
    rng = np.random.default_rng(seed)
    where = measure.source
    if measure.grid is not None:
        raise ParameterError(where, "--sample works with point clouds and meshes, not images")
    if measure.faces is not None:
        points = sample_surface(measure.points, measure.faces, n, rng, where)
        return Measure(points, None, where, origin=measure.origin)
    if n >= measure.n:
        return measure
    keep = np.sort(rng.choice(measure.n, size=n, replace=False))
    las = measure.las.take(keep) if measure.las is not None else None
    return replace(measure, points=measure.points[keep], weights=measure.weights[keep], las=las)


def read_weights(path: str | os.PathLike, n: int) -> np.ndarray:
    """Read one weight per point from a ``.npy`` array or a text file.

    Text files hold one or more numbers per line (whitespace or comma separated); ``#``
    comment lines, blank lines and a header as the first line are skipped. Numbers are
    taken in reading order.

    Args:
        path: the weights file (``.npy``, anything else is read as text).
        n: the number of points, i.e. the number of weights expected.

    Returns:
        weights ((n,) float64 array): finite, non-negative, with a positive sum.

    Raises:
        InputError: naming ``path``, when the file is missing, unreadable, malformed, does
            not hold exactly ``n`` values, or holds negative, non-finite or only zero
            weights.
    """
    path = Path(path)
    where = str(path)
    _check_file(path)
    try:
        if path.suffix.lower() == ".npy":
            arr = _load_npy(path)
            if arr.size != n:
                raise InputError(
                    where,
                    f"expected {n} weights (one per point), found {arr.size} values "
                    f"(array of shape {arr.shape})",
                )
            arr = arr.reshape(-1)
        else:
            rows = _text_rows(path)
            rows = _drop_header(rows)
            if not rows:
                raise InputError(where, "no numbers found (only comments or blank lines)")
            tokens = [(k, t) for k, toks in rows for t in toks]
            arr = _to_floats([t for _, t in tokens], [k for k, _ in tokens], where)
            if arr.size != n:
                raise InputError(where, f"expected {n} weights (one per point), found {arr.size} values")
    except GeomregError:
        raise
    except MemoryError:
        raise InputError(where, "not enough memory to read this file") from None
    except Exception as exc:
        raise InputError(where, f"could not read weights: {_short(exc)}") from exc
    return _check_weights(arr, n, where)


# --------------------------------------------------------------------------- helpers


def _check_file(path: Path) -> int:
    """Check that ``path`` is a readable, non-empty regular file; return its size."""
    where = str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(where, "no such file") from None
    except NotADirectoryError:
        raise InputError(where, "no such file (a parent is not a folder)") from None
    except PermissionError:
        raise InputError(where, "permission denied") from None
    except OSError as exc:
        raise InputError(where, f"cannot access file: {exc.strerror or exc}") from None
    if path.is_dir():
        raise InputError(where, "is a directory, expected a file")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except PermissionError:
        raise InputError(where, "permission denied (cannot read the file)") from None
    except OSError as exc:
        raise InputError(where, f"cannot read file: {exc.strerror or exc}") from None
    if st.st_size == 0:
        raise InputError(where, "empty file")
    return st.st_size


# ----- .npy


def _load_npy(path: Path) -> np.ndarray:
    """Load a numeric array from a ``.npy`` file without ever unpickling."""
    where = str(path)
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic.startswith(b"PK"):
        raise InputError(where, "is an .npz archive; expected a single array saved by np.save")
    if magic != b"\x93NUMPY":
        if magic[:1] == b"\x80":
            raise InputError(
                where,
                "holds pickled Python data, which geomreg refuses to load; "
                "save a numeric array with np.save instead",
            )
        raise InputError(where, "not a .npy file (it lacks the NumPy header)")
    _check_npy_size(path)
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode=None)
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise InputError(
                where,
                "holds Python objects (pickled data), which geomreg refuses to load; "
                "save a numeric array instead",
            ) from None
        raise InputError(where, f"could not read as .npy (corrupt or truncated?): {_short(exc)}") from None
    except (EOFError, OSError) as exc:
        raise InputError(where, f"could not read as .npy (corrupt or truncated?): {_short(exc)}") from None
    if not isinstance(arr, np.ndarray):  # cannot happen after the magic check; be safe
        with contextlib.suppress(Exception):
            arr.close()
        raise InputError(where, "is not a single array saved by np.save")
    if arr.dtype.kind not in "iuf":
        raise InputError(where, f"expected real numbers, found dtype {arr.dtype}")
    return arr


#: the largest .npy header numpy reads (``np.load``'s default ``max_header_size``)
_NPY_MAX_HEADER = 10000


def _check_npy_size(path: Path) -> None:
    """Refuse a ``.npy`` file whose header declares more data than the file holds.

    ``np.load`` allocates the declared array before it finds the data missing, so a
    200-byte file declaring a (10^9, 3) array would ask for 24 GB; it also reads a header
    of the declared length (up to 4 GB in format 2.0) before checking that length. Both
    are checked here first.
    """
    where = str(path)
    fmt = np.lib.format
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(12)
        version = tuple(head[6:8])
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise InputError(where, f"unsupported .npy format version {'.'.join(map(str, version))}")
        width = 2 if version == (1, 0) else 4
        if len(head) < 8 + width:
            raise InputError(where, "truncated .npy: the file ends within its header")
        length = int.from_bytes(head[8 : 8 + width], "little")
        if length > _NPY_MAX_HEADER or 8 + width + length > size:
            raise InputError(where, f"corrupt .npy: it declares a {length}-byte header "
                             f"(the file has {size} bytes)")
        fh.seek(8)
        try:
            if version == (1, 0):
                shape, _, dtype = fmt.read_array_header_1_0(fh)
            else:  # 3.0 has 2.0's layout (its header is UTF-8)
                shape, _, dtype = fmt.read_array_header_2_0(fh)
        except (ValueError, EOFError, OSError, SyntaxError, TypeError, tokenize.TokenError,
                RecursionError) as exc:  # numpy parses the header with tokenize and ast
            raise InputError(where, f"could not read as .npy (corrupt?): {_short(exc)}") from None
        start = fh.tell()
    if dtype.hasobject:
        return  # refused by np.load as pickled data
    need = math.prod(shape) * dtype.itemsize
    if need > size - start:
        raise InputError(
            where,
            f"truncated .npy: the header declares shape {_short(str(shape), 60)} of {dtype} "
            f"({need} bytes) but the file holds {size - start} bytes of data",
        )


def _npy_points(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 1:
        return arr[:, None]
    if arr.ndim != 2:
        raise InputError(str(path), f"expected an (N, D) array (or a rank-3 density volume), "
                         f"found shape {arr.shape}")
    return arr


def _density_grid(arr: np.ndarray, where: str):
    """A density array (rank 2 as an image, rank 3 as a volume) as points, weights, grid."""
    density = np.asarray(arr, dtype=np.float64)
    if density.size == 0:
        raise InputError(where, f"empty density array of shape {arr.shape}")
    if not np.isfinite(density).all():
        raise InputError(where, "non-finite density value (NaN or inf)")
    if (density < 0).any():
        raise InputError(where, f"negative density {density.min():g}; densities must be >= 0")
    if density.ndim == 2:
        return _on_grid(density[::-1], where, (1, 0), "density array has no mass (every value is 0)")
    return _on_grid(density, where, (0, 1, 2), "volume has no mass (every voxel is 0)")


def _on_grid(density: np.ndarray, where: str, dims: tuple[int, ...], empty: str):
    """Points, weights and grid of a density array (an image's row 0 is its bottom row).

    The longest side spans [0, 1]; each cell with positive mass (density x cell volume)
    becomes a point at its centre, weighing that mass. A density so small that its mass
    underflows to 0 counts as no mass, so that the grid's mask and the weights agree.
    """
    spacing = 1.0 / max(density.shape)
    flat = density.reshape(-1)
    mass = flat * spacing**density.ndim
    mask = np.flatnonzero(mass > 0)
    if mask.size == 0:
        if (flat > 0).any():
            raise InputError(where, "every density is too small: its mass (density x cell volume) "
                             "underflows to 0")
        raise InputError(where, empty)
    grid = Grid(shape=tuple(density.shape), spacing=spacing, mask=mask, dims=dims)
    return grid.centres(mask), mass[mask], grid


# ----- text


def _text_rows(path: Path) -> list[tuple[int, list[str]]]:
    """Tokenised content lines ``(line number, tokens)`` of a UTF-8 text file.

    Blank lines and ``#`` comment lines are skipped; a line containing a comma is split on
    commas, any other on whitespace.
    """
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise InputError(
            str(path),
            f"not UTF-8 text: byte 0x{raw[exc.start]:02x} on line {line} (offset {exc.start});"
            " expected numbers as text",
        ) from None
    rows = []
    for k, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        toks = [t.strip() for t in s.split(",")] if "," in s else s.split()
        rows.append((k, toks))
    return rows


def _drop_header(rows: list) -> list:
    """Drop the first content line when none of its fields is a number (a header)."""
    if rows and not any(_is_number(t) for t in rows[0][1]):
        return rows[1:]
    return rows


def _to_floats(tokens: list, line_numbers: list, where: str) -> np.ndarray:
    """Convert tokens to float64, naming the line of the first one that is not a number."""
    try:
        return np.array(tokens, dtype=np.float64)
    except ValueError:
        pass
    for k, tok in zip(line_numbers, tokens, strict=True):
        if not _is_number(tok):
            what = "an empty field" if tok == "" else f"{tok!r} is not a number"
            raise InputError(where, f"line {k}: {what}")
    raise InputError(where, "could not convert the values to numbers")


def _read_text_points(path: Path) -> np.ndarray:
    where = str(path)
    rows = _drop_header(_text_rows(path))
    if not rows:
        raise InputError(where, "no data rows (only comments, blank lines or a header)")
    first_line, first = rows[0]
    ncol = len(first)
    for k, toks in rows:
        if len(toks) != ncol:
            raise InputError(
                where,
                f"line {k}: {len(toks)} values, expected {ncol} as on line {first_line} (ragged rows)",
            )
    try:
        return np.array([t for _, t in rows], dtype=np.float64)
    except ValueError:
        pass
    for k, toks in rows:
        _to_floats(toks, [k] * len(toks), where)
    raise InputError(where, "could not convert the values to numbers")


def _read_xyz(path: Path, suffix: str) -> np.ndarray:
    """XYZ/PTS text clouds: x y z first on each row, further columns ignored.

    These are read here rather than by open3d, which silently drops unreadable rows and,
    for ``.pts`` files with extra columns, returns uninitialised coordinates.
    """
    where = str(path)
    rows = _text_rows(path)
    expected = None
    if suffix == ".pts" and rows and len(rows[0][1]) == 1:
        try:
            expected = int(rows[0][1][0])
        except ValueError:
            raise InputError(where, f"line {rows[0][0]}: {rows[0][1][0]!r} is not a point count") from None
        rows = rows[1:]
    if not rows:
        raise InputError(where, "no data rows (only comments or blank lines)")
    for k, toks in rows:
        if len(toks) < 3:
            raise InputError(where, f"line {k}: {len(toks)} values, expected at least 3 (x y z)")
    if expected is not None and expected != len(rows):
        raise InputError(
            where,
            f"the header announces {expected} points but the file holds {len(rows)} rows (truncated?)",
        )
    tokens = [t for _, toks in rows for t in toks[:3]]
    lines = [k for k, _ in rows for _ in range(3)]
    return _to_floats(tokens, lines, where).reshape(-1, 3)


# ----- images


#: an image may hold at most this many pixels per byte of file (what deflate can reach for
#: 8-bit pixels) once it is larger than _IMAGE_FREE_PIXELS; more is a decompression bomb or
#: a header that lies about the size
_IMAGE_PIXELS_PER_BYTE = 1032
_IMAGE_FREE_PIXELS = 1 << 22


def _check_image_size(path: Path, size: int) -> None:
    """Refuse, from the header alone, images too large for their file and multi-frame files.

    Decoding allocates the declared width x height before finding the data short, and the
    density computation needs some 50 bytes per pixel: a few kB of PNG declaring 9000 x 9000
    pixels would take gigabytes.
    """
    from PIL import Image

    where = str(path)
    with Image.open(path) as im:
        width, height = im.size
        frames = getattr(im, "n_frames", 1)
    pixels = width * height
    limit = max(_IMAGE_FREE_PIXELS, _IMAGE_PIXELS_PER_BYTE * size)
    if Image.MAX_IMAGE_PIXELS:
        limit = min(limit, Image.MAX_IMAGE_PIXELS)
    if pixels > limit:
        raise InputError(
            where,
            f"the header declares {width} x {height} pixels, more than a {size}-byte file can hold "
            f"(at most {limit}); corrupt, or a decompression bomb",
        )
    if frames != 1:
        raise InputError(where, f"expected a single image, found {frames} frames (multi-page file)")
    _check_png_rows(path)


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
#: Adam7 passes: (first column, first row, column step, row step)
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _check_png_rows(path: Path) -> None:
    """Refuse a PNG whose chunks run past its end, or whose image data ends before its last row.

    pillow reads a chunk's declared length in one go (up to 2 GB for a 200-byte file), and
    stops quietly when the zlib stream ends early, leaving the missing rows 0, i.e. black: a
    short (but well-formed) stream would read as an image with rows of full mass that are
    not in the file. Files that are not PNG pass through unchecked.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return
    pos, header, stream = 8, None, zlib.decompressobj()
    produced = 0
    while pos + 8 <= len(data):
        length, tag = struct.unpack(">I4s", data[pos : pos + 8])
        if tag == b"IEND":
            break
        if pos + 12 + length > len(data):  # pillow would ask for the whole declared length
            raise InputError(
                str(path),
                f"truncated PNG: chunk {tag!r} at byte {pos} declares {length} bytes; "
                f"{max(0, len(data) - pos - 12)} remain",
            )
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if tag == b"IHDR" and len(body) >= 13:
            header = struct.unpack(">IIBBBBB", body[:13])
        elif tag == b"IDAT" and header is not None:
            try:  # count the bytes; keep none of them beyond a small window
                produced += len(stream.decompress(body, 1 << 16))
                while stream.unconsumed_tail:
                    produced += len(stream.decompress(stream.unconsumed_tail, 1 << 16))
            except zlib.error:
                return  # pillow reports corrupt data itself
    if header is None or header[3] not in _PNG_CHANNELS:
        return  # pillow reports a missing or bad header itself
    width, height, depth, colour, _, _, interlace = header
    bits = _PNG_CHANNELS[colour] * depth
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    need = 0
    for x0, y0, dx, dy in passes:
        w, h = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if w > 0 and h > 0:
            need += h * (1 + -(-w * bits // 8))
    if produced < need:
        raise InputError(
            str(path),
            f"truncated PNG: its image data unpacks to {produced} of the {need} bytes that "
            f"{width} x {height} pixels need (missing rows would read as black)",
        )


def _read_image(path: Path, suffix: str, mass: str, size: int):
    where = str(path)
    try:
        import imageio.v3 as iio
    except Exception as exc:
        raise InputError(
            where,
            f"cannot read images: imageio is not usable ({_short(exc, 80)}); `pip install imageio`",
        ) from None
    kind = suffix.lstrip(".").upper()
    try:
        with warnings.catch_warnings():  # pillow warns about corrupt metadata: refused or not, noise
            warnings.simplefilter("ignore")
            _check_image_size(path, size)
            # index=... stacks every frame on a leading axis: one frame is the only valid case
            frames = np.asarray(iio.imread(path, plugin="pillow", index=...))
    except (MemoryError, GeomregError):
        raise
    except Exception as exc:
        detail = _short(exc)
        if "can not handle" in detail or "cannot identify" in detail:
            detail = "the data is not in any image format pillow knows"
        raise InputError(
            where, f"could not read as a {kind} image (corrupt or truncated?): {detail}"
        ) from None
    if frames.ndim < 3 or frames.shape[0] != 1:
        raise InputError(where, f"expected a single image, found {frames.shape[0]} frames (multi-page file)")
    gray, alpha = _gray_alpha(frames[0], where)
    if mass == "dark":
        density = 1.0 - gray if alpha is None else alpha * (1.0 - gray)
    else:
        density = gray if alpha is None else alpha * gray
    density = np.clip(density, 0.0, 1.0)[::-1]  # row 0 is now the bottom row: +y up
    return _on_grid(density, where, (1, 0),
                    f"image has no mass (every pixel is background for --mass {mass})")


def _scale(values: np.ndarray) -> np.ndarray:
    """Pixel values scaled to [0, 1] by their dtype's maximum."""
    if values.dtype == bool:
        return values.astype(np.float64)
    if values.dtype.kind == "u":
        return values.astype(np.float64) / np.iinfo(values.dtype).max
    if values.dtype.kind == "i":  # 16-bit images may come back as int32
        top = np.iinfo(values.dtype).max
        if values.dtype.itemsize > 2 and values.max(initial=0) <= 65535:
            top = 65535
        return np.clip(values.astype(np.float64) / top, 0.0, 1.0)
    if values.dtype.kind == "f":  # float images are taken to lie in [0, 1]
        return np.clip(values.astype(np.float64), 0.0, 1.0)
    raise TypeError(f"unsupported pixel type {values.dtype}")


def _gray_alpha(img: np.ndarray, where: str):
    """Gray level and alpha (or None), both (H, W) in [0, 1]."""
    if img.ndim == 3 and img.shape[2] in (1, 2, 3, 4):
        channels = img.shape[2]
    elif img.ndim == 2:
        channels = 0
    else:
        raise InputError(where, f"expected a single 2-D image (gray, RGB or RGBA), found shape {img.shape}")
    if img.shape[0] == 0 or img.shape[1] == 0:
        raise InputError(where, f"image has no pixels (shape {img.shape})")
    if not np.isfinite(img).all():
        raise InputError(where, "image holds non-finite pixel values")
    values = _scale(img)
    if channels == 0:
        return values, None
    if channels == 1:
        return values[..., 0], None
    if channels == 2:
        return values[..., 0], values[..., 1]
    gray = values[..., :3].mean(axis=2)
    return gray, (values[..., 3] if channels == 4 else None)

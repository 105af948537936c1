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

Density images follow one convention (see :func:`read_measure`): square pixels, the
longer image side spans [0, 1], rows flipped so that +y is up, and the weight of a pixel
is its density times its area, so a fully dark unit-square image has mass 1.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import struct
import tokenize
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import GeomregError, InputError, ParameterError
from ..measure import Grid, Measure, _check_weights

ARRAY_SUFFIXES = (".npy",)
OPEN3D_SUFFIXES = (".ply", ".pcd")
XYZ_SUFFIXES = (".xyz", ".pts")
TEXT_SUFFIXES = (".txt", ".csv")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SUFFIXES = ARRAY_SUFFIXES + OPEN3D_SUFFIXES + XYZ_SUFFIXES + TEXT_SUFFIXES + IMAGE_SUFFIXES
"""Every file suffix :func:`read_measure` accepts (lower case, with the dot)."""

MASS_MODES = ("dark", "bright")

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip
_PLY_SIZES = {t: np.dtype(t).itemsize for t in set(_PLY_TYPES.values())}
_PLY_STRUCT = {"i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I", "f4": "f", "f8": "d"}
_HEADER_LIMIT = 1 << 20  # bytes searched for the end of a PLY/PCD header


# --------------------------------------------------------------------------- public API


def read_measure(
    path: str | os.PathLike,
    *,
    weights: str | os.PathLike | None = None,
    weight_property: str | None = None,
    mass: str = "dark",
    as_image: bool = False,
) -> Measure:
    """Read a point cloud, an array or a density image as a weighted point cloud.

    The reader is chosen by the lower-cased file suffix (see :data:`SUFFIXES`). Point
    clouds get uniform weights 1/N (total mass 1) unless ``weights`` or
    ``weight_property`` says otherwise.

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

    Arrays of rank 3 in ``.npy`` files are density volumes: voxel ``(i, j, k)`` sits at
    ``((i + 0.5) s, (j + 0.5) s, (k + 0.5) s)`` with ``s = 1 / max(shape)`` and weighs
    ``value * s**3``. Density arrays (volumes, ``as_image``) hold non-negative values, used
    as they are (no scaling, no ``mass`` convention).

    Returns:
        The measure, with ``source`` set to ``str(path)``.

    Raises:
        InputError: the file (or the weights file) is missing, unreadable, empty,
            malformed, or holds no valid measure.
        ParameterError: ``mass`` is not ``"dark"`` or ``"bright"``, or both ``weights``
            and ``weight_property`` are given.
    """
    path = Path(path)
    where = str(path)
    if mass not in MASS_MODES:
        raise ParameterError("--mass", f"must be 'dark' or 'bright', not {mass!r}")
    if weights is not None and weight_property is not None:
        raise ParameterError("--weight-property", "give either --weights or --weight-property, not both")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        _check_file(path)
        raise InputError(
            where,
            f"unsupported file type {suffix or '(no suffix)'!r}; supported: " + ", ".join(SUFFIXES),
        )
    if weight_property is not None and suffix != ".ply":
        raise InputError(where, f"--weight-property works with .ply files only, not {suffix} files")
    size = _check_file(path)

    grid = None
    prop_weights = None
    try:
        if suffix == ".npy":
            arr = _load_npy(path)
            if arr.ndim == 3 or (as_image and arr.ndim == 2):
                points, prop_weights, grid = _density_grid(arr, where)
            else:
                points = _npy_points(arr, path)
        elif suffix == ".ply":
            points, prop_weights = _read_ply(path, size, weight_property)
        elif suffix == ".pcd":
            points = _read_pcd(path, size)
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

    measure = Measure(points, prop_weights, where, grid)
    if weights is not None:
        w = read_weights(weights, measure.n)
        measure = Measure(measure.points, w, where, grid)
    return measure


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


def _short(exc: BaseException, limit: int = 160) -> str:
    """Describe an exception in one line of at most ``limit`` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


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


# ----- PLY, PCD (parsed here: every count is checked against the bytes that hold it)


@dataclass
class _PlyElement:
    name: str
    count: int
    props: list  # (name, numpy type code) or (name, ("list", count type, item type))

    def has_lists(self) -> bool:
        return any(not isinstance(t, str) for _, t in self.props)

    def stride(self) -> int:
        """Bytes per item; for items with lists, the least possible (every list empty)."""
        return sum(np.dtype(t if isinstance(t, str) else t[1]).itemsize for _, t in self.props)


@dataclass
class _PlyHeader:
    fmt: str  # "ascii", "binary_little_endian" or "binary_big_endian"
    length: int  # bytes up to and including the newline after end_header
    elements: list

    def vertex(self) -> _PlyElement | None:
        return next((e for e in self.elements if e.name == "vertex"), None)

    def before_vertex(self) -> list:
        out = []
        for e in self.elements:
            if e.name == "vertex":
                break
            out.append(e)
        return out


def _corrupt(path: Path, kind: str, detail: str = "") -> InputError:
    msg = f"could not parse as {kind} (corrupt or truncated?)"
    return InputError(str(path), f"{msg}: {detail}" if detail else msg)


_PLY_END = re.compile(rb"\nend_header[ \t]*(\r\n|\n|\r|$)")


def _parse_ply_header(path: Path) -> _PlyHeader:
    """Parse a PLY header (format, elements and their properties)."""
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_LIMIT)
    if not head.startswith(b"ply"):
        raise _corrupt(path, "PLY", "the file does not start with 'ply'")
    found = _PLY_END.search(head)
    if found is None:
        raise _corrupt(path, "PLY", "no 'end_header' line")
    end, length = found.start() + 1, found.end()
    fmt = None
    elements: list[_PlyElement] = []
    lines = head[:end].decode("latin-1").splitlines()
    for k, line in enumerate(lines[1:], 2):
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        try:
            if words[0] == "format":
                fmt = words[1]
                if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
                    raise ValueError(f"unknown format {fmt!r}")
            elif words[0] == "element":
                elements.append(_PlyElement(words[1], int(words[2]), []))
                if elements[-1].count < 0:
                    raise ValueError("negative element count")
            elif words[0] == "property":
                if not elements:
                    raise ValueError("property before any element")
                if words[1] == "list":
                    typ = ("list", _PLY_TYPES[words[2]], _PLY_TYPES[words[3]])
                    elements[-1].props.append((words[4], typ))
                else:
                    elements[-1].props.append((words[2], _PLY_TYPES[words[1]]))
            else:
                raise ValueError(f"unknown keyword {words[0]!r}")
        except (IndexError, KeyError, ValueError) as exc:
            raise _corrupt(path, "PLY", f"bad header line {k} {_short(line, 60)!r} ({exc})") from None
    if fmt is None:
        raise _corrupt(path, "PLY", "no 'format' line in the header")
    return _PlyHeader(fmt, length, elements)


def _ascii_rows(path: Path, offset: int) -> list[bytes]:
    """Non-blank lines of a text body starting at byte ``offset``."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        body = fh.read()
    return [ln for ln in body.splitlines() if ln.strip()]


def _read_ply(path: Path, size: int, weight_property: str | None):
    """Points (N, 3) and, when asked, one scalar vertex property of a PLY file."""
    where = str(path)
    header = _parse_ply_header(path)
    vertex = header.vertex()
    if vertex is None:
        raise InputError(where, "the PLY file has no 'vertex' element")
    names = [name for name, _ in vertex.props]
    if not {"x", "y", "z"} <= set(names):
        raise InputError(
            where, f"PLY vertices need x, y and z properties; found {', '.join(names) or 'none'}"
        )
    if weight_property is not None and weight_property not in names:
        raise InputError(
            where,
            f"no vertex property {weight_property!r}; available: {', '.join(names)}",
        )
    wanted = ["x", "y", "z"] + ([weight_property] if weight_property is not None else [])
    columns = [names.index(name) for name in wanted]  # the first property of each name
    for name, col in zip(wanted, columns, strict=True):
        if not isinstance(vertex.props[col][1], str):
            raise InputError(where, f"vertex property {name!r} is a list, not one number")
    if header.fmt == "ascii":
        table = _ply_ascii_vertices(path, header, columns)
    else:
        table = _ply_binary_vertices(path, header, size, columns)
    if vertex.count == 0:
        raise InputError(where, "0 points; a point cloud needs at least 1")
    weights = table[:, 3].copy() if weight_property is not None else None
    return np.ascontiguousarray(table[:, :3]), weights


def _ply_truncated(path: Path, element: _PlyElement, have: int) -> InputError:
    unit = "vertices" if element.name == "vertex" else f"'{element.name}' items"
    return _corrupt(path, "PLY", f"the file ends after {have} of {element.count} {unit}")


def _ply_binary_vertices(path: Path, header: _PlyHeader, size: int, columns: list) -> np.ndarray:
    """The vertex properties at ``columns`` of a binary PLY file, as a float64 (N, K) table."""
    order = "<" if header.fmt == "binary_little_endian" else ">"
    vertex = header.vertex()
    least = header.length  # where the vertices start at the earliest (every list empty)
    for element in [*header.before_vertex(), vertex]:
        # refuse counts the file cannot hold before reading (or allocating) anything
        need = element.count * element.stride()
        if least + need > size:
            raise _ply_truncated(path, element, max(0, size - least) // element.stride())
        least += need
    with open(path, "rb") as fh:
        data = fh.read()
    pos = header.length
    for element in header.before_vertex():
        pos = _ply_walk(path, data, pos, element, order)
    if not vertex.has_lists():
        if pos + vertex.count * vertex.stride() > len(data):
            raise _ply_truncated(path, vertex, max(0, len(data) - pos) // vertex.stride())
        dtype = np.dtype([(f"f{i}", order + t) for i, (_, t) in enumerate(vertex.props)])
        block = np.frombuffer(data, dtype=dtype, count=vertex.count, offset=pos)
        cols = [block[f"f{c}"].astype(np.float64) for c in columns]
        return np.stack(cols, axis=1).reshape(-1, len(columns))
    table = np.empty((vertex.count, len(columns)))
    _ply_walk(path, data, pos, vertex, order, columns, table)
    return table


def _ply_walk(path, data, pos, element, order, columns=(), out=None) -> int:
    """Step over the items of a binary element with lists; returns the position after them.

    The scalar properties at ``columns`` are stored into the rows of ``out``.
    """
    if not element.props:
        return pos
    scalars = {c: k for k, c in enumerate(columns)}
    end = len(data)
    for i in range(element.count):
        for p, (name, typ) in enumerate(element.props):
            if isinstance(typ, str):
                width = _PLY_SIZES[typ]
                if pos + width > end:
                    raise _ply_truncated(path, element, i)
                if p in scalars:
                    out[i, scalars[p]] = struct.unpack_from(order + _PLY_STRUCT[typ], data, pos)[0]
                pos += width
            else:
                _, count_type, item_type = typ
                width = _PLY_SIZES[count_type]
                if pos + width > end:
                    raise _ply_truncated(path, element, i)
                length = struct.unpack_from(order + _PLY_STRUCT[count_type], data, pos)[0]
                if length < 0:
                    raise _corrupt(path, "PLY", f"negative list length {length} in {element.name} {i}, "
                                   f"property {name!r}")
                pos += width + length * _PLY_SIZES[item_type]
                if pos > end:
                    raise _ply_truncated(path, element, i)
    return pos


def _ply_ascii_vertices(path: Path, header: _PlyHeader, columns: list) -> np.ndarray:
    """The vertex properties at ``columns`` of an ASCII PLY file (one item per line)."""
    vertex = header.vertex()
    rows = _ascii_rows(path, header.length)
    skip = sum(e.count for e in header.before_vertex())
    block = rows[skip : skip + vertex.count]
    if len(block) < vertex.count:
        raise _ply_truncated(path, vertex, len(block))
    nprops = len(vertex.props)
    picked = []
    for i, row in enumerate(block):
        toks = row.split()
        if not vertex.has_lists():
            if len(toks) != nprops:
                raise _corrupt(path, "PLY", f"vertex {i} has {len(toks)} values, expected {nprops}")
            picked.append([toks[c] for c in columns])
            continue
        at, starts = 0, []
        for _, typ in vertex.props:
            starts.append(at)
            if isinstance(typ, str):
                at += 1
            else:
                try:
                    length = int(toks[at]) if at < len(toks) else -1
                except ValueError:
                    length = -1
                if length < 0:
                    raise _corrupt(path, "PLY", f"vertex {i}: bad list length")
                at += 1 + length
        if at != len(toks):
            raise _corrupt(path, "PLY", f"vertex {i} has {len(toks)} values, expected {at}")
        picked.append([toks[starts[c]] for c in columns])
    try:
        return np.array(picked, dtype=np.float64).reshape(-1, len(columns))
    except ValueError:
        pass
    for i, toks in enumerate(picked):
        for tok in toks:
            if not _is_number(tok):
                raise _corrupt(path, "PLY", f"vertex {i}: {_short(repr(tok), 40)} is not a number")
    raise _corrupt(path, "PLY", "could not convert the vertex values to numbers")


_PCD_TYPES = {
    ("F", 4): "f4", ("F", 8): "f8",
    ("I", 1): "i1", ("I", 2): "i2", ("I", 4): "i4", ("I", 8): "i8",
    ("U", 1): "u1", ("U", 2): "u2", ("U", 4): "u4", ("U", 8): "u8",
}  # fmt: skip
_LZF_MAX_RATIO = 90  # LZF turns 3 bytes into at most 264


def _read_pcd(path: Path, size: int) -> np.ndarray:
    """The x, y, z fields of a PCD file (ascii, binary or binary_compressed) as (N, 3)."""
    where = str(path)
    info = _parse_pcd_header(path)
    count, names, dtypes, counts = info["points"], info["names"], info["dtypes"], info["counts"]
    axes = [names.index(a) for a in "xyz"]
    if info["data"] == "ascii":
        rows = [r for r in _ascii_rows(path, info["length"]) if not r.lstrip().startswith(b"#")]
        if len(rows) < count:
            raise _corrupt(path, "PCD", f"the file ends after {len(rows)} of {count} points")
        width = sum(counts)
        starts = np.cumsum([0, *counts])
        picked = []
        for i, row in enumerate(rows[:count]):
            toks = row.split()
            if len(toks) != width:
                raise _corrupt(path, "PCD", f"point {i} has {len(toks)} values, expected {width}")
            picked.append([toks[starts[a]] for a in axes])
        try:
            points = np.array(picked, dtype=np.float64).reshape(-1, 3)
        except ValueError:
            bad = next(t for toks in picked for t in toks if not _is_number(t))
            raise _corrupt(path, "PCD", f"{_short(repr(bad), 40)} is not a number") from None
    else:
        record = [(f"f{i}", "<" + t, (c,)) for i, (t, c) in enumerate(zip(dtypes, counts, strict=True))]
        stride = np.dtype(record).itemsize
        start = info["length"]
        if info["data"] == "binary":
            if size < start + count * stride:
                have = max(0, (size - start) // stride)
                raise _corrupt(path, "PCD", f"the file ends after {have} of {count} points")
            with open(path, "rb") as fh:
                fh.seek(start)
                block = np.frombuffer(fh.read(count * stride), dtype=record, count=count)
            cols = [block[f"f{a}"][:, 0] for a in axes]
        else:
            raw = _pcd_decompress(path, start, size, count * stride)
            offsets = np.cumsum([0, *(np.dtype(t).itemsize * c for t, c in zip(dtypes, counts, strict=True))])
            cols = []
            for a in axes:
                arr = np.frombuffer(raw, dtype="<" + dtypes[a], count=count * counts[a],
                                    offset=int(offsets[a]) * count)
                cols.append(arr.reshape(count, counts[a])[:, 0])
        points = np.stack([c.astype(np.float64) for c in cols], axis=1).reshape(-1, 3)
    if count == 0:
        raise InputError(where, "0 points; a point cloud needs at least 1")
    return points


def _pcd_decompress(path: Path, start: int, size: int, expected: int) -> bytes:
    """The LZF-compressed data block of a binary_compressed PCD file, uncompressed."""
    with open(path, "rb") as fh:
        fh.seek(start)
        sizes = fh.read(8)
        if len(sizes) < 8:
            raise _corrupt(path, "PCD", "the file ends before the compressed data sizes")
        packed, unpacked = struct.unpack("<II", sizes)
        if unpacked != expected:
            raise _corrupt(path, "PCD", f"the compressed data unpacks to {unpacked} bytes; "
                           f"the header needs {expected}")
        if packed > size - start - 8:
            raise _corrupt(path, "PCD", f"the file ends within the {packed} bytes of compressed data")
        if unpacked > _LZF_MAX_RATIO * packed:
            raise _corrupt(path, "PCD", f"{packed} compressed bytes cannot unpack to {unpacked}")
        data = fh.read(packed)
    out = _lzf_decompress(data, unpacked)
    if out is None:
        raise _corrupt(path, "PCD", "bad LZF-compressed data")
    return out


def _lzf_decompress(data: bytes, size: int) -> bytes | None:
    """LZF decompression to exactly ``size`` bytes; None for corrupt data."""
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        ctrl = data[i]
        i += 1
        if ctrl < 32:  # a run of ctrl + 1 literal bytes
            run = ctrl + 1
            if i + run > n or len(out) + run > size:
                return None
            out += data[i : i + run]
            i += run
            continue
        length = ctrl >> 5
        if length == 7:
            if i >= n:
                return None
            length += data[i]
            i += 1
        if i >= n:
            return None
        ref = len(out) - ((ctrl & 0x1F) << 8) - data[i] - 1
        i += 1
        length += 2
        if ref < 0 or len(out) + length > size:
            return None
        if ref + length <= len(out):
            out += out[ref : ref + length]
        else:  # the copy overlaps what it writes: byte by byte
            for k in range(length):
                out.append(out[ref + k])
    return bytes(out) if len(out) == size else None


def _parse_pcd_header(path: Path) -> dict:
    """Parse a PCD header: fields, their types and sizes, the point count, the data kind."""
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_LIMIT)
    fields: dict[str, list[str]] = {}
    offset = 0
    length = None
    for raw in head.splitlines(keepends=True):
        offset += len(raw)
        line = raw.decode("latin-1").strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        fields[words[0].upper()] = words[1:]
        if words[0].upper() == "DATA":
            length = offset
            break
    if length is None or not fields.get("DATA"):
        raise _corrupt(path, "PCD", "no 'DATA' line in the header")
    names = fields.get("FIELDS", fields.get("COLUMNS", []))
    if not {"x", "y", "z"} <= set(names):
        found = " ".join(names) or "none"
        raise InputError(str(path), f"PCD fields need x, y and z; found {_short(found, 80)}")
    k = len(names)
    try:
        sizes = [int(s) for s in fields.get("SIZE", ["4"] * k)]
        types = [t.upper() for t in fields.get("TYPE", ["F"] * k)]
        counts = [int(c) for c in fields.get("COUNT", ["1"] * k)]
        for key, values in (("SIZE", sizes), ("TYPE", types), ("COUNT", counts)):
            if len(values) != k:
                raise ValueError(f"{key} has {len(values)} entries for {k} fields")
        dtypes = []
        for name, t, s, c in zip(names, types, sizes, counts, strict=True):
            if (t, s) not in _PCD_TYPES:
                raise ValueError(f"field {_short(name, 20)!r}: TYPE {_short(t, 10)} SIZE {s} unsupported")
            if not 1 <= c <= 1 << 16:
                raise ValueError(f"field {_short(name, 20)!r}: COUNT {c} out of range")
            dtypes.append(_PCD_TYPES[t, s])
        area = None
        if "WIDTH" in fields:
            area = int(fields["WIDTH"][0]) * int(fields.get("HEIGHT", ["1"])[0])
        if "POINTS" in fields:
            points = int(fields["POINTS"][0])
            if area is not None and area != points:
                raise ValueError(f"POINTS {points} but WIDTH x HEIGHT = {area}")
        elif area is not None:
            points = area
        else:
            raise ValueError("neither POINTS nor WIDTH")
        if points < 0:
            raise ValueError(f"negative point count {points}")
        data = fields["DATA"][0].lower()
        if data not in ("ascii", "binary", "binary_compressed"):
            raise ValueError(f"unknown DATA type {_short(data, 20)!r}")
    except (KeyError, IndexError, ValueError) as exc:
        raise _corrupt(path, "PCD", f"bad header ({exc})") from None
    return {"data": data, "length": length, "points": points, "names": names,
            "dtypes": dtypes, "counts": counts}


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


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


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

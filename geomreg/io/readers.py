"""Readers: turn point-cloud files, arrays and density images into :class:`Measure` objects.

Every reader checks its input and raises :class:`~geomreg.errors.InputError` naming the
file for anything wrong with it (missing, empty, corrupt, truncated, ragged, non-finite);
no other exception escapes :func:`read_measure` or :func:`read_weights`.

Supported suffixes (case-insensitive):

* ``.npy``: a numeric ``(N, D)`` array, or ``(N,)`` for N points in 1-D.
* ``.ply``, ``.pcd``: read with open3d (3-D points); ``.ply`` vertex properties can serve
  as weights (``weight_property``).
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
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._stdio import stdout_to_stderr
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
            points, prop_weights, grid = _read_image(path, suffix, mass)
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

    The longest side spans [0, 1]; each cell with positive density becomes a point at its
    centre, weighing density x cell volume.
    """
    spacing = 1.0 / max(density.shape)
    flat = density.reshape(-1)
    mask = np.flatnonzero(flat > 0)
    if mask.size == 0:
        raise InputError(where, empty)
    grid = Grid(shape=tuple(density.shape), spacing=spacing, mask=mask, dims=dims)
    return grid.centres(mask), flat[mask] * spacing**density.ndim, grid


# ----- open3d (PLY, PCD)


def _import_open3d(path: Path):
    """Import open3d, or explain how to make it importable."""
    try:
        with stdout_to_stderr():
            import open3d
    except Exception as exc:  # ImportError, or OSError for a missing libusb
        raise InputError(
            str(path),
            f"cannot read {path.suffix.lower()} files: open3d is not usable ({_short(exc, 80)});"
            " install the system library libusb-1.0-0 (e.g. `sudo apt-get install "
            "libusb-1.0-0`) and `pip install open3d`",
        ) from None
    return open3d


@contextlib.contextmanager
def _quiet_open3d(o3d):
    """Silence open3d below errors and keep its output off stdout."""
    util = o3d.utility
    try:
        old = util.get_verbosity_level()
    except Exception:
        old = None
    util.set_verbosity_level(util.VerbosityLevel.Error)
    try:
        with stdout_to_stderr():
            yield
    finally:
        if old is not None:
            util.set_verbosity_level(old)


@dataclass
class _PlyElement:
    name: str
    count: int
    props: list  # (name, numpy type code) or (name, ("list", count type, item type))

    def has_lists(self) -> bool:
        return any(not isinstance(t, str) for _, t in self.props)

    def stride(self) -> int:
        return sum(np.dtype(t).itemsize for _, t in self.props)


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


def _parse_ply_header(path: Path) -> _PlyHeader:
    """Parse a PLY header (format, elements and their properties)."""
    with open(path, "rb") as fh:
        head = fh.read(_HEADER_LIMIT)
    if not head.startswith(b"ply"):
        raise _corrupt(path, "PLY", "the file does not start with 'ply'")
    end = head.find(b"\nend_header") + 1  # 0 when missing
    if end <= 0:
        raise _corrupt(path, "PLY", "no 'end_header' line")
    length = end + len(b"end_header")
    if head[length : length + 2] == b"\r\n":
        length += 2
    elif head[length : length + 1] in (b"\n", b"\r"):
        length += 1
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
            raise _corrupt(path, "PLY", f"bad header line {k} {line.strip()!r} ({exc})") from None
    if fmt is None:
        raise _corrupt(path, "PLY", "no 'format' line in the header")
    return _PlyHeader(fmt, length, elements)


def _ascii_rows(path: Path, offset: int) -> list[bytes]:
    """Non-blank lines of a text body starting at byte ``offset``."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        body = fh.read()
    return [ln for ln in body.splitlines() if ln.strip()]


def _check_ply_complete(path: Path, header: _PlyHeader, size: int) -> None:
    """Raise if the file ends before the last vertex (open3d would not say so)."""
    vertex = header.vertex()
    before = header.before_vertex()
    if header.fmt == "ascii":
        rows = _ascii_rows(path, header.length)
        skip = sum(e.count for e in before)
        have = max(0, min(len(rows) - skip, vertex.count))
        last_ok = True
        if have == vertex.count and vertex.count and not vertex.has_lists():
            last_ok = len(rows[skip + vertex.count - 1].split()) >= len(vertex.props)
        if have < vertex.count or not last_ok:
            raise _corrupt(path, "PLY", f"the file ends after {have} of {vertex.count} vertices")
        return
    if vertex.has_lists() or any(e.has_lists() for e in before):
        return  # sizes vary; rely on open3d
    start = header.length + sum(e.count * e.stride() for e in before)
    need = start + vertex.count * vertex.stride()
    if size < need:
        have = max(0, (size - start) // max(vertex.stride(), 1))
        raise _corrupt(path, "PLY", f"the file ends after {have} of {vertex.count} vertices")


def _read_ply(path: Path, size: int, weight_property: str | None):
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
    _check_ply_complete(path, header, size)
    o3d = _import_open3d(path)
    with _quiet_open3d(o3d):
        pcd = o3d.io.read_point_cloud(str(path), format="ply")
    points = np.array(pcd.points, dtype=np.float64)
    if points.shape[0] != vertex.count:
        if vertex.count == 0:
            raise InputError(where, "0 points; a point cloud needs at least 1")
        raise _corrupt(path, "PLY", f"open3d read {points.shape[0]} of {vertex.count} vertices")
    weights = None
    if weight_property is not None:
        weights = _ply_property(path, header, weight_property, o3d)
    return points, weights


def _ply_property(path: Path, header: _PlyHeader, name: str, o3d) -> np.ndarray:
    """One per-vertex property as a float64 (N,) array."""
    vertex = header.vertex()
    kind = dict(vertex.props)[name]
    if not isinstance(kind, str):
        raise InputError(str(path), f"vertex property {name!r} is a list, not one number")
    try:
        with _quiet_open3d(o3d):
            tpcd = o3d.t.io.read_point_cloud(str(path))
        if name in tpcd.point:
            values = tpcd.point[name].numpy()
            if values.shape[0] == vertex.count and values.size == vertex.count:
                return values.reshape(-1).astype(np.float64)
    except Exception:  # fall back on our own reading below
        pass
    return _ply_column(path, header, name)


def _ply_column(path: Path, header: _PlyHeader, name: str) -> np.ndarray:
    """Read one scalar vertex property straight from the file."""
    vertex = header.vertex()
    before = header.before_vertex()
    if vertex.has_lists() or any(e.has_lists() for e in before):
        raise InputError(str(path), f"cannot read vertex property {name!r}: the vertex block has lists")
    col = [n for n, _ in vertex.props].index(name)
    if header.fmt == "ascii":
        skip = sum(e.count for e in before)
        rows = _ascii_rows(path, header.length)[skip : skip + vertex.count]
        values = [row.split()[col] for row in rows]
        return np.array([float(v) for v in values], dtype=np.float64)
    order = "<" if header.fmt == "binary_little_endian" else ">"
    dtype = np.dtype([(f"f{i}", order + t) for i, (_, t) in enumerate(vertex.props)])
    start = header.length + sum(e.count * e.stride() for e in before)
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(vertex.count * dtype.itemsize)
    block = np.frombuffer(data, dtype=dtype, count=vertex.count)
    return block[f"f{col}"].astype(np.float64)


def _read_pcd(path: Path, size: int) -> np.ndarray:
    where = str(path)
    info = _parse_pcd_header(path)
    count = info["points"]
    if info["data"] == "binary" and size < info["length"] + count * info["stride"]:
        have = max(0, (size - info["length"]) // max(info["stride"], 1))
        raise _corrupt(path, "PCD", f"the file ends after {have} of {count} points")
    if info["data"] == "ascii":
        rows = [r for r in _ascii_rows(path, info["length"]) if not r.lstrip().startswith(b"#")]
        have = min(len(rows), count)
        if have < count or (count and len(rows[count - 1].split()) < info["columns"]):
            raise _corrupt(path, "PCD", f"the file ends after {have} of {count} points")
    o3d = _import_open3d(path)
    with _quiet_open3d(o3d):
        pcd = o3d.io.read_point_cloud(str(path), format="pcd")
    points = np.array(pcd.points, dtype=np.float64)
    if points.shape[0] == 0 and count > 0:
        raise _corrupt(path, "PCD", "open3d read no points")
    if points.shape[0] != count:
        raise _corrupt(path, "PCD", f"open3d read {points.shape[0]} of {count} points")
    if count == 0:
        raise InputError(where, "0 points; a point cloud needs at least 1")
    return points


def _parse_pcd_header(path: Path) -> dict:
    """Parse the few PCD header fields needed to check that the data is complete."""
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
    try:
        sizes = [int(s) for s in fields.get("SIZE", [])]
        counts = [int(c) for c in fields.get("COUNT", ["1"] * len(sizes))]
        if "POINTS" in fields:
            points = int(fields["POINTS"][0])
        else:
            points = int(fields["WIDTH"][0]) * int(fields.get("HEIGHT", ["1"])[0])
    except (KeyError, IndexError, ValueError) as exc:
        raise _corrupt(path, "PCD", f"bad header ({exc})") from None
    if "x" not in fields.get("FIELDS", []):
        found = " ".join(fields.get("FIELDS", [])) or "none"
        raise InputError(str(path), f"PCD fields need x, y and z; found {found}")
    return {
        "data": fields["DATA"][0].lower(),
        "length": length,
        "points": points,
        "stride": sum(s * c for s, c in zip(sizes, counts, strict=False)),
        "columns": sum(counts),
    }


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


def _read_image(path: Path, suffix: str, mass: str):
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
        # index=... stacks every frame on a leading axis: one frame is the only valid case
        frames = np.asarray(iio.imread(path, plugin="pillow", index=...))
    except MemoryError:
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

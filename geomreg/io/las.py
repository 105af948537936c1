"""LAS and LAZ point clouds (laspy; LAZ through lazrs): xyz in, the other dimensions carried.

Reading gives the scaled coordinates in float64 *minus the header offset*, so the numbers
the computation sees are small (a tile's size, not its UTM position); the offset is the
measure's ``origin`` and is added back on writing. The point records themselves (every
dimension: intensity, classification, GPS time, RGB, extra bytes, ...) travel with the
measure as a :class:`LasPoints`, so that a ``.las``/``.laz`` output is the input's points
with only x, y and z replaced: same point format, same header scales and offsets.

Checks laspy does not make (measured with laspy 2.7): a LAS file cut within its points
raised ``ValueError: buffer size must be a multiple of element size`` (or, cut at a record
boundary, would read fewer points), and a header declaring 10^9 points in a 34 kB file
read as the 1000 points present, silently. Here the declared count must fit in the file
(LAS) and must be what the decompressor delivers (LAZ, read chunk by chunk, so that a
lying count never allocates more than the data holds).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputError, ParameterError
from .common import corrupt as _corrupt
from .common import short as _short

LAS_SUFFIXES = (".las", ".laz")
_CHUNK = 1 << 20  # points decompressed at a time


@dataclass(frozen=True)
class LasPoints:
    """The LAS header and the point records of the points a measure holds (same order)."""

    header: object  # laspy.LasHeader
    record: object  # laspy.PackedPointRecord

    def __len__(self) -> int:
        return len(self.record)

    def take(self, index: np.ndarray) -> LasPoints:
        """The records at ``index``."""
        return LasPoints(self.header, self.record[np.asarray(index)])


def parse_classes(classes) -> tuple[int, ...] | None:
    """Classification codes from ``"2,6"`` or an iterable of ints; None stays None.

    Raises:
        ParameterError: not integers in 0..255, or none at all.
    """
    if classes is None:
        return None
    items = classes.split(",") if isinstance(classes, str) else list(classes)
    try:
        codes = tuple(sorted({int(str(c).strip()) for c in items}))
    except ValueError:
        raise ParameterError("classes", f"expected classification codes like 2,6, not {classes!r}") from None
    if not codes or not all(0 <= c <= 255 for c in codes):
        raise ParameterError("classes", f"classification codes are integers 0 to 255, not {classes!r}")
    return codes


def read_las(path: Path, size: int, classes: tuple[int, ...] | None):
    """Points (N, 3) relative to the header offset, the offset, and their :class:`LasPoints`."""
    import laspy

    where = str(path)
    kind = "LAZ" if path.suffix.lower() == ".laz" else "LAS"
    try:
        with laspy.open(path) as reader:
            header = reader.header
            declared = int(header.point_count)
            if not header.are_points_compressed:
                need = int(header.offset_to_point_data) + declared * int(header.point_format.size)
                if need > size:
                    have = max(0, size - int(header.offset_to_point_data)) // int(header.point_format.size)
                    raise _corrupt(path, kind, f"the header declares {declared} points but the file holds "
                                   f"{have} ({size} bytes, {need} needed)")
            chunks = list(reader.chunk_iterator(_CHUNK))
    except InputError:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # laspy / lazrs: bad signature, bad header, truncated data
        raise _corrupt(path, kind, _short(exc)) from None
    got = sum(len(c) for c in chunks)
    if got != declared:
        raise _corrupt(path, kind, f"the header declares {declared} points, the data holds {got}")
    if declared == 0:
        raise InputError(where, "0 points; a point cloud needs at least 1")
    record = chunks[0] if len(chunks) == 1 else _concatenate(chunks)
    if classes is not None:
        codes = np.asarray(record["classification"])
        keep = np.flatnonzero(np.isin(codes, classes))
        if keep.size == 0:
            present = ", ".join(map(str, np.unique(codes)[:20]))
            raise InputError(where, f"no point has classification {', '.join(map(str, classes))} "
                             f"(the file's classes: {present})")
        record = record[keep]
    scales, offsets = np.asarray(header.scales, np.float64), np.asarray(header.offsets, np.float64)
    points = np.stack([np.asarray(record[axis], np.float64) * s
                       for axis, s in zip("XYZ", scales, strict=True)], axis=1)
    return points, offsets.copy(), LasPoints(header, record)


def _concatenate(chunks: list):
    """One record of several (laspy's records of one point format share a dtype)."""
    import laspy

    array = np.concatenate([c.array for c in chunks])
    return laspy.ScaleAwarePointRecord(array, chunks[0].point_format, chunks[0].scales, chunks[0].offsets)


def las_writer(path: str | Path, source: LasPoints, points) -> Callable[[str], None]:
    """A ``write_fn`` for :func:`~geomreg.io.atomic_write`: ``source``'s records at ``points``.

    ``points`` are absolute coordinates (N, 3), one per record; every other dimension, the
    point format, the header's scales and offsets (and its VLRs) are those of the input.
    ``.laz`` is compressed, ``.las`` not, whatever the input was.
    """
    import laspy

    pts = np.asarray(points, dtype=np.float64)
    if pts.shape != (len(source), 3):
        raise OutputError(str(path), f"{len(source)} LAS records but {pts.shape} points to write")
    header = source.header
    ints = np.rint((pts - np.asarray(header.offsets)) / np.asarray(header.scales))
    if np.abs(ints).max(initial=0) > np.iinfo(np.int32).max:
        raise OutputError(str(path), "moved points fall outside what the input's LAS scales and offsets "
                          "can store (32-bit integers); write .ply or .npy instead")
    compress = Path(path).suffix.lower() == ".laz"

    def _save(tmp: str) -> None:
        las = laspy.LasData(header=_copy_header(header), points=source.record.copy())
        las.X, las.Y, las.Z = (ints[:, k].astype(np.int32) for k in range(3))
        las.write(tmp, do_compress=compress)

    return _save


def _copy_header(header):
    """A copy of a laspy header (the original stays as read: a second write sees the same)."""
    import copy

    return copy.deepcopy(header)

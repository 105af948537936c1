"""PLY and PCD point files, parsed by geomreg (not open3d).

Every count a header declares (elements, points, list lengths, compressed sizes) is checked
against the bytes that must hold it before anything is allocated, so a truncated file or a
header that lies is an :class:`~geomreg.errors.InputError`, never a huge allocation or
uninitialised points. PLY: ascii and binary of either byte order, properties found by name,
list properties skipped. PCD: ascii, binary and binary_compressed (LZF), fields of 1 to 8
bytes. :func:`read_ply` and :func:`read_pcd` are what :mod:`geomreg.io.readers` calls.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from .common import corrupt as _corrupt
from .common import is_number as _is_number
from .common import short as _short

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip
_PLY_SIZES = {t: np.dtype(t).itemsize for t in set(_PLY_TYPES.values())}
_PLY_STRUCT = {"i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I", "f4": "f", "f8": "d"}
_HEADER_LIMIT = 1 << 20  # bytes searched for the end of a PLY/PCD header



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


def read_ply(path: Path, size: int, weight_property: str | None):
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


def read_pcd(path: Path, size: int) -> np.ndarray:
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

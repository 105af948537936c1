"""Triangle meshes: OBJ, OFF, STL and PLY faces, parsed and written by geomreg.

Why not open3d's or trimesh's mesh readers (measured with open3d 0.20 and trimesh 5.2 on a
cube of 8 vertices, 12 triangles and one unreferenced vertex, and on broken copies of it):

* OBJ: both drop the unreferenced vertex and split vertices that carry several texture
  coordinates (19 vertices for the cube with ``f v/vt``), so the vertices are not the file's
  ``v`` lines; open3d also reorders them, and returns an *empty* mesh, without an error, for
  quad faces and for a face that names a missing vertex.
* STL: open3d merges the corner copies (8 vertices), trimesh (``process=False``) keeps all
  36; a binary STL cut short, or whose triangle count lies, reads as an empty mesh in both.
* OFF: a file cut short reads as its first faces (7 of 12) in both; open3d keeps a face
  index past the last vertex.
* PLY: a file cut within its faces reads as 9 of 12 faces in open3d (RPly prints an error,
  the call succeeds); a PLY point cloud reads as a mesh with no faces (open3d) or an empty
  mesh (trimesh).

So the vertices here are exactly the file's vertices, in file order (STL, which stores
corners, gets its identical corners merged, in order of first appearance), every count is
checked against the file before anything is allocated, and anything short, out of range
or malformed is an :class:`~geomreg.errors.InputError` naming the file. Polygons (OBJ, OFF
and PLY faces of more than 3 corners) are split into triangles as fans from their first
corner (exact for convex polygons), so the faces of a mesh are always ``(F, 3)``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputError
from .common import corrupt as _corrupt
from .common import is_number as _is_number
from .common import short as _short
from .plypcd import _PLY_SIZES, _PLY_STRUCT, _ascii_rows, _parse_ply_header, _ply_truncated, _ply_walk

#: mesh formats (``.ply`` is a mesh when it has faces, else a point cloud)
MESH_SUFFIXES = (".obj", ".off", ".stl", ".ply")
#: why a mesh file without faces is refused (rather than read as a point cloud)
_NO_FACES = "an empty mesh; point clouds are read from .ply, .pcd, .xyz, .pts, .txt, .csv or .npy files"
#: PLY face properties holding a face's vertex indices, by preference
_PLY_INDEX_NAMES = ("vertex_indices", "vertex_index")


# --------------------------------------------------------------------------- geometry


def fan(polygons: list, where: str) -> np.ndarray:
    """Polygons (sequences of vertex indices) as ``(F, 3)`` int64 triangles, fans from corner 0."""
    tris = []
    for k, poly in enumerate(polygons):
        if len(poly) < 3:
            raise InputError(where, f"face {k} has {len(poly)} corners; a face needs at least 3")
        first = poly[0]
        tris += [(first, poly[i], poly[i + 1]) for i in range(1, len(poly) - 1)]
    return np.array(tris, dtype=np.int64).reshape(-1, 3)


def triangle_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """``(F,)`` areas of the triangles ``faces`` of ``vertices (V, 3)``."""
    a, b, c = (vertices[faces[:, k]] for k in range(3))
    return 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)


def area_weights(vertices: np.ndarray, faces: np.ndarray, where: str) -> np.ndarray:
    """One weight per vertex: a third of the area of its triangles, normalised to sum 1.

    Vertices on no triangle weigh 0. A mesh of zero area is an InputError.
    """
    areas = triangle_areas(vertices, faces)
    w = np.zeros(len(vertices))
    for k in range(3):
        np.add.at(w, faces[:, k], areas / 3.0)
    total = w.sum()
    if not total > 0:
        raise InputError(where, "the mesh has zero area (every triangle is degenerate): no area weights")
    return w / total


def sample_surface(vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator,
                   where: str) -> np.ndarray:
    """``n`` points uniform on the surface: triangles drawn by area, then uniform inside each."""
    areas = triangle_areas(vertices, faces)
    total = areas.sum()
    if not total > 0:
        raise InputError(where, "the mesh has zero area (every triangle is degenerate): nothing to sample")
    pick = rng.choice(len(faces), size=n, p=areas / total)
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    a, b, c = (vertices[faces[pick, k]] for k in range(3))
    return (1 - s)[:, None] * a + (s * (1 - r2))[:, None] * b + (s * r2)[:, None] * c


# --------------------------------------------------------------------------- text formats


def _lines(path: Path, kind: str) -> list[tuple[int, list[str]]]:
    """``(line number, tokens)`` of the non-blank, non-comment lines of a text mesh."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise _corrupt(path, kind, f"not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line})") from None
    rows = []
    for k, line in enumerate(text.splitlines(), 1):
        toks = line.split("#", 1)[0].split()
        if toks:
            rows.append((k, toks))
    return rows


def _floats(tokens: list[str], path: Path, kind: str, line: int) -> list[float]:
    try:
        return [float(t) for t in tokens]
    except ValueError:
        bad = next(t for t in tokens if not _is_number(t))
        raise _corrupt(path, kind, f"line {line}: {_short(repr(bad), 40)} is not a number") from None


def read_obj(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices ``(V, 3)`` (the ``v`` lines, in order) and triangles of a Wavefront OBJ file.

    Face corners may be ``i``, ``i/t``, ``i//n`` or ``i/t/n``, indices from 1 or negative
    (counted back from the last vertex so far). Other statements (``vt``, ``vn``, groups,
    materials, lines, points) are ignored. A file without ``f`` lines is refused.
    """
    where = str(path)
    vertices: list[list[float]] = []
    polygons: list[list[int]] = []
    lines: list[int] = []
    for k, toks in _lines(path, "OBJ"):
        if toks[0] == "v":
            if len(toks) < 4:
                raise _corrupt(path, "OBJ", f"line {k}: a vertex needs x y z, found {len(toks) - 1} values")
            vertices.append(_floats(toks[1:4], path, "OBJ", k))
        elif toks[0] == "f":
            poly = []
            for corner in toks[1:]:
                head = corner.split("/", 1)[0]
                try:
                    i = int(head)
                except ValueError:
                    raise _corrupt(path, "OBJ", f"line {k}: {_short(repr(corner), 40)} is not a vertex "
                                   "index") from None
                if i < 0:
                    i += len(vertices) + 1
                    if i < 1:
                        raise InputError(where, f"line {k}: face refers to vertex {head}, before the first "
                                         "vertex")
                elif i == 0:
                    raise InputError(where, f"line {k}: face refers to vertex 0 (OBJ counts from 1)")
                poly.append(i - 1)
            if len(poly) < 3:
                raise InputError(where, f"line {k}: a face needs at least 3 corners, found {len(poly)}")
            polygons.append(poly)
            lines.append(k)
    if not vertices:
        raise InputError(where, "no vertices ('v' lines): an empty mesh")
    for k, poly in zip(lines, polygons, strict=True):
        if max(poly) >= len(vertices):
            raise InputError(where, f"line {k}: face refers to vertex {max(poly) + 1}; the file has "
                             f"{len(vertices)} vertices (missing or truncated?)")
    if not polygons:
        raise InputError(where, f"no faces ('f' lines): {_NO_FACES}")
    return np.array(vertices, dtype=np.float64), fan(polygons, where)


def read_off(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and triangles of an OFF file (also COFF, NOFF, ...: x y z first on each line).

    The counts line ``V F E`` may follow the keyword on its line or stand on the next one.
    A face line is ``n i_1 ... i_n`` (indices from 0; further numbers, a colour, ignored).
    """
    where = str(path)
    rows = _lines(path, "OFF")
    if not rows or not rows[0][1][0].upper().endswith("OFF"):
        raise _corrupt(path, "OFF", "the file does not start with 'OFF'")
    head = rows[0][1]
    if "BINARY" in (t.upper() for t in head):
        raise InputError(where, "binary OFF files are not supported; save it as text OFF")
    counts, body = head[1:], rows[1:]
    if not counts:
        if not body:
            raise _corrupt(path, "OFF", "no 'vertices faces edges' counts line")
        counts, body = body[0][1], body[1:]
    try:
        nv, nf = int(counts[0]), int(counts[1])
        if nv < 0 or nf < 0:
            raise ValueError
    except (ValueError, IndexError):
        raise _corrupt(path, "OFF", f"bad counts {_short(' '.join(counts), 40)!r} (expected "
                       "'vertices faces edges')") from None
    if nv == 0:
        raise InputError(where, "0 vertices: an empty mesh")
    if len(body) < nv + nf:
        have = len(body) - nv
        what = f"{len(body)} of {nv} vertices" if have < 0 else f"{have} of {nf} faces"
        raise _corrupt(path, "OFF", f"the file ends after {what}")
    vertices = []
    for k, toks in body[:nv]:
        if len(toks) < 3:
            raise _corrupt(path, "OFF", f"line {k}: a vertex needs x y z, found {len(toks)} values")
        vertices.append(_floats(toks[:3], path, "OFF", k))
    polygons = []
    for k, toks in body[nv : nv + nf]:
        try:
            n = int(toks[0])
            poly = [int(t) for t in toks[1 : 1 + n]]
        except ValueError:
            raise _corrupt(path, "OFF", f"line {k}: a face is 'n' then n vertex indices") from None
        if n < 3 or len(poly) < n:
            raise _corrupt(path, "OFF", f"line {k}: a face of {n} corners lists {len(poly)}")
        if min(poly) < 0 or max(poly) >= nv:
            bad = min(poly) if min(poly) < 0 else max(poly)
            raise InputError(where, f"line {k}: face refers to vertex {bad}; the file has {nv} vertices "
                             "(numbered from 0)")
        polygons.append(poly)
    if not polygons:
        raise InputError(where, f"0 faces: {_NO_FACES}")
    return np.array(vertices, dtype=np.float64), fan(polygons, where)


# --------------------------------------------------------------------------- STL


def read_stl(path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (identical corners merged, in order of first appearance) and triangles of an STL.

    Binary when the size is exactly 84 + 50 x (the count in bytes 80-84), whatever the header
    says (some exporters start binary headers with 'solid'); else ASCII when it starts with
    'solid' and holds no NUL byte (past the 84 bytes of a binary header); anything else is a
    truncated or corrupt binary file.
    """
    where = str(path)
    with open(path, "rb") as fh:
        data = fh.read()
    count = struct.unpack_from("<I", data, 80)[0] if size >= 84 else None
    if count is not None and size == 84 + 50 * count:
        record = np.dtype([("normal", "<f4", 3), ("corners", "<f4", (3, 3)), ("attr", "<u2")])
        corners = np.frombuffer(data, dtype=record, count=count, offset=84)["corners"].reshape(-1, 3)
    elif data.lstrip()[:5].lower() == b"solid" and b"\x00" not in data[84:4096]:
        corners = _ascii_stl(path, data)
    elif count is None:
        raise _corrupt(path, "STL", f"{size} bytes: shorter than a binary STL header (84 bytes)")
    else:
        raise _corrupt(path, "STL", f"the binary header declares {count} triangles "
                       f"({84 + 50 * count} bytes) but the file has {size} bytes")
    if len(corners) == 0:
        raise InputError(where, "0 triangles: an empty mesh")
    if not np.isfinite(corners).all():
        raise InputError(where, "non-finite vertex coordinate (NaN or inf)")
    corners = np.ascontiguousarray(corners)
    _, first, inverse = np.unique(corners.view(np.dtype((np.void, corners.dtype.itemsize * 3))),
                                  return_index=True, return_inverse=True)
    order = np.argsort(first)  # unique positions in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    faces = rank[inverse.reshape(-1)].reshape(-1, 3).astype(np.int64)
    return corners[first[order]].astype(np.float64), faces


def _ascii_stl(path: Path, data: bytes) -> np.ndarray:
    """The corners ``(3F, 3)`` of an ASCII STL: facets of exactly 3 vertices, closed by endsolid."""
    text = data.decode("latin-1")
    corners: list[list[float]] = []
    in_facet, ended = 0, False
    for k, line in enumerate(text.splitlines(), 1):
        toks = line.split()
        if not toks:
            continue
        word = toks[0].lower()
        if word == "facet":
            in_facet = 1
        elif word == "vertex":
            if not in_facet or len(toks) != 4:
                raise _corrupt(path, "STL", f"line {k}: a vertex line outside a facet or without x y z")
            if in_facet > 3:
                raise InputError(str(path), f"line {k}: a facet with more than 3 vertices (STL facets are "
                                 "triangles)")
            corners.append(_floats(toks[1:], path, "STL", k))
            in_facet += 1
        elif word == "endfacet":
            if in_facet != 4:
                raise _corrupt(path, "STL", f"line {k}: a facet with {max(in_facet - 1, 0)} vertices")
            in_facet = 0
        elif word == "endsolid":
            ended = True
            break
    if not ended:
        raise _corrupt(path, "STL", "no 'endsolid' line (truncated?)")
    return np.array(corners, dtype=np.float32).reshape(-1, 3)


# --------------------------------------------------------------------------- PLY faces


def read_ply_faces(path: Path, size: int) -> np.ndarray | None:
    """The triangles of a PLY file's ``face`` element; None when it has none (a point cloud).

    The vertices are read (and checked) by :func:`geomreg.io.plypcd.read_ply`; this steps over
    the elements before the face element and reads each face's index list.
    """
    header = _parse_ply_header(path)
    names = [e.name for e in header.elements]
    if "face" not in names or "vertex" not in names:
        return None
    at = names.index("face")
    face = header.elements[at]
    lists = [i for i, (name, t) in enumerate(face.props)
             if not isinstance(t, str) and name in _PLY_INDEX_NAMES]
    if face.count == 0 or not lists:
        return None
    if at < names.index("vertex"):
        raise _corrupt(path, "PLY", "the 'face' element comes before the 'vertex' element")
    column = min(lists, key=lambda i: _PLY_INDEX_NAMES.index(face.props[i][0]))
    if np.dtype(face.props[column][1][2]).kind not in "iu":
        raise _corrupt(path, "PLY", f"face indices of type {face.props[column][1][2]}, not integers")
    if header.fmt == "ascii":
        polygons = _ply_ascii_faces(path, header, at, column)
    else:
        polygons = _ply_binary_faces(path, header, at, column, size)
    return polygons if isinstance(polygons, np.ndarray) else fan(polygons, str(path))


def _ply_ascii_faces(path: Path, header, at: int, column: int) -> list:
    face = header.elements[at]
    rows = _ascii_rows(path, header.length)
    skip = sum(e.count for e in header.elements[:at])
    block = rows[skip : skip + face.count]
    if len(block) < face.count:
        raise _ply_truncated(path, face, len(block))
    polygons = []
    for i, row in enumerate(block):
        toks, pos = row.split(), 0
        try:
            for p, (_, typ) in enumerate(face.props):
                n = 1 if isinstance(typ, str) else int(toks[pos]) + 1
                if p == column:
                    poly = [int(t) for t in toks[pos + 1 : pos + n]]
                    if len(poly) != n - 1:
                        raise ValueError
                pos += n
        except (ValueError, IndexError):
            raise _corrupt(path, "PLY", f"face {i}: bad vertex index list") from None
        polygons.append(poly)
    return polygons


def _ply_binary_faces(path: Path, header, at: int, column: int, size: int):
    """Faces of a binary PLY: one vectorised read when every face is a triangle, else a walk."""
    order = "<" if header.fmt == "binary_little_endian" else ">"
    face = header.elements[at]
    with open(path, "rb") as fh:
        data = fh.read()
    pos = header.length
    for element in header.elements[:at]:
        if element.has_lists():
            pos = _ply_walk(path, data, pos, element, order)
        else:
            pos += element.count * element.stride()
    if pos + face.count * face.stride() > size:
        raise _ply_truncated(path, face, max(0, size - pos) // max(face.stride(), 1))
    if sum(not isinstance(t, str) for _, t in face.props) == 1:
        # the common layout, scalars and one index list: read it at once if every list has 3 items
        fields = []
        for i, (_, t) in enumerate(face.props):
            fields += [(f"f{i}", order + t)] if isinstance(t, str) else [
                (f"n{i}", order + t[1]), (f"v{i}", order + t[2], (3,))]
        dtype = np.dtype(fields)
        if pos + face.count * dtype.itemsize <= len(data):
            block = np.frombuffer(data, dtype=dtype, count=face.count, offset=pos)
            if (block[f"n{column}"] == 3).all():
                return block[f"v{column}"].astype(np.int64)
    return _ply_walk_faces(path, data, pos, face, column, order)


def _ply_walk_faces(path: Path, data: bytes, pos: int, face, column: int, order: str) -> list:
    """The index lists of a binary face element, item by item (faces of any size)."""
    polygons = []
    end = len(data)
    for i in range(face.count):
        for p, (_, typ) in enumerate(face.props):
            if isinstance(typ, str):
                pos += _PLY_SIZES[typ]
                continue
            _, count_type, item_type = typ
            if pos + _PLY_SIZES[count_type] > end:
                raise _ply_truncated(path, face, i)
            n = struct.unpack_from(order + _PLY_STRUCT[count_type], data, pos)[0]
            pos += _PLY_SIZES[count_type]
            if n < 0 or pos + n * _PLY_SIZES[item_type] > end:
                raise _ply_truncated(path, face, i)
            if p == column:
                polygons.append(list(struct.unpack_from(order + _PLY_STRUCT[item_type] * n, data, pos)))
            pos += n * _PLY_SIZES[item_type]
        if pos > end:
            raise _ply_truncated(path, face, i)
    return polygons


# --------------------------------------------------------------------------- writers


def mesh_writer(path: str | Path, vertices, faces, weights=None) -> Callable[[str], None]:
    """A ``write_fn`` for :func:`~geomreg.io.atomic_write`: a triangle mesh by ``path``'s suffix.

    ``.obj`` and ``.off``: text, coordinates at full precision (``repr``); ``.stl``: binary,
    float32 corners with unit normals; ``.ply``: binary little-endian, float64 ``x y z`` (and
    ``weight`` when given), faces as ``list uchar int vertex_indices``.
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    suffix = Path(path).suffix.lower()
    if suffix not in MESH_SUFFIXES:
        raise OutputError(str(path), f"not a mesh format: {suffix!r}; use " + ", ".join(MESH_SUFFIXES))
    if v.ndim != 2 or v.shape[1] != 3:
        raise OutputError(str(path), f"a mesh has 3-D vertices, not shape {v.shape}")

    def _save(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            if suffix == ".obj":
                fh.write(b"# written by geomreg\n")
                fh.write("".join(f"v {x!r} {y!r} {z!r}\n" for x, y, z in v.tolist()).encode())
                fh.write("".join(f"f {a} {b} {c}\n" for a, b, c in (f + 1).tolist()).encode())
            elif suffix == ".off":
                fh.write(f"OFF\n{len(v)} {len(f)} 0\n".encode())
                fh.write("".join(f"{x!r} {y!r} {z!r}\n" for x, y, z in v.tolist()).encode())
                fh.write("".join(f"3 {a} {b} {c}\n" for a, b, c in f.tolist()).encode())
            elif suffix == ".stl":
                fh.write(_stl_bytes(v, f))
            else:
                fh.write(_ply_mesh_bytes(v, f, weights))

    return _save


def _stl_bytes(v: np.ndarray, f: np.ndarray) -> bytes:
    corners = v[f]
    normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    length = np.linalg.norm(normal, axis=1, keepdims=True)
    normal = np.divide(normal, length, out=np.zeros_like(normal), where=length > 0)
    rows = np.zeros(len(f), dtype=[("normal", "<f4", 3), ("corners", "<f4", (3, 3)), ("attr", "<u2")])
    rows["normal"], rows["corners"] = normal, corners
    head = b"binary STL written by geomreg".ljust(80, b" ")  # never 'solid': that means ASCII
    return head + struct.pack("<I", len(f)) + rows.tobytes()


def _ply_mesh_bytes(v: np.ndarray, f: np.ndarray, weights) -> bytes:
    fields = [("x", "<f8"), ("y", "<f8"), ("z", "<f8")] + ([("weight", "<f8")] if weights is not None else [])
    rows = np.empty(len(v), dtype=fields)
    rows["x"], rows["y"], rows["z"] = v.T
    if weights is not None:
        rows["weight"] = np.asarray(weights, dtype=np.float64)
    tris = np.empty(len(f), dtype=[("n", "u1"), ("v", "<i4", (3,))])
    tris["n"], tris["v"] = 3, f
    header = ["ply", "format binary_little_endian 1.0", "comment written by geomreg",
              f"element vertex {len(v)}", *[f"property double {name}" for name, _ in fields],
              f"element face {len(f)}", "property list uchar int vertex_indices", "end_header"]
    return ("\n".join(header) + "\n").encode("ascii") + rows.tobytes() + tris.tobytes()

"""Stanford PLY: ascii, binary little endian and binary big endian; reader and writer.

The reader walks every element the header declares (so extra elements and extra
properties are tolerated and skipped), takes ``x y z`` (+ ``nx ny nz``, + a UV pair named
``u v`` / ``s t`` / ``texture_u texture_v`` / ``texture_s texture_t``) from ``vertex`` and
the first list property of ``face`` (``vertex_indices`` or ``vertex_index`` preferred),
fan-triangulating polygons. A file without a ``face`` element is a point cloud.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError
from cm3dmm.io.mesh_checks import check_coordinates
from cm3dmm.io.mesh import Mesh

_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}
_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}
_UV_NAMES = (("u", "v"), ("s", "t"), ("texture_u", "texture_v"), ("texture_s", "texture_t"))


class _Element:
    def __init__(self, name: str, count: int):
        self.name = name
        self.count = count
        self.props: list[tuple[str, str, str | None]] = []  # (name, type, list count type)


def _parse_header(raw: bytes, path: Path) -> tuple[str | None, list[_Element], int]:
    if not raw.startswith(b"ply"):
        raise InputError("not a PLY file (does not start with 'ply')", path)
    end = raw.find(b"end_header")
    if end < 0:
        raise InputError("PLY header has no 'end_header' (truncated or not a PLY file)", path)
    nl = raw.find(b"\n", end)
    body_start = len(raw) if nl < 0 else nl + 1
    try:
        lines = raw[:end].decode("ascii").splitlines()
    except UnicodeDecodeError:
        raise InputError("PLY header is not ASCII text", path) from None
    fmt = None
    seen_format = False
    elements: list[_Element] = []
    for lineno, line in enumerate(lines[1:], 2):
        tok = line.split()
        if not tok or tok[0] in ("comment", "obj_info"):
            continue
        try:
            if tok[0] == "format":
                if tok[1] not in _FORMATS:
                    raise InputError(f"PLY header line {lineno}: unknown format {tok[1]!r}", path)
                fmt = _FORMATS[tok[1]]
                seen_format = True
            elif tok[0] == "element":
                count = int(tok[2])
                if count < 0:
                    raise ValueError
                if count > len(raw):  # every row takes at least a byte
                    raise InputError(f"PLY header line {lineno}: element '{tok[1]}' declares {count} rows, "
                                     f"more than the file has bytes ({len(raw)}): truncated or corrupt", path)
                elements.append(_Element(tok[1], count))
            elif tok[0] == "property":
                if not elements:
                    raise InputError(f"PLY header line {lineno}: property before any element", path)
                if tok[-1] in {p[0] for p in elements[-1].props}:
                    raise InputError(f"PLY header line {lineno}: property {tok[-1]!r} of element "
                                     f"'{elements[-1].name}' declared twice", path)
                if tok[1] == "list":
                    if tok[2] not in _TYPES or tok[3] not in _TYPES:
                        raise KeyError
                    if _TYPES[tok[2]][0] == "f":
                        raise InputError(f"PLY header line {lineno}: the length of list {tok[4]!r} has a "
                                         f"non-integer type {tok[2]!r}", path)
                    elements[-1].props.append((tok[4], _TYPES[tok[3]], _TYPES[tok[2]]))
                else:
                    if tok[1] not in _TYPES:
                        raise KeyError
                    elements[-1].props.append((tok[2], _TYPES[tok[1]], None))
            else:
                raise InputError(f"PLY header line {lineno}: unknown keyword {tok[0]!r}", path)
        except (IndexError, ValueError, KeyError):
            raise InputError(f"PLY header line {lineno}: cannot parse {line.strip()!r}", path) from None
    if not seen_format:
        raise InputError("PLY header has no 'format' line", path)
    return fmt, elements, body_start


def parse_ply(raw: bytes, path: str | os.PathLike = "<ply>", vertices_only: bool = False) -> Mesh:
    """Parse PLY bytes ``raw``. ``path`` is only used in error messages."""
    path = Path(path)
    endian, elements, pos = _parse_header(raw, path)
    names = [e.name for e in elements]
    if "vertex" not in names:
        raise InputError("PLY file has no 'vertex' element", path)
    data: dict[str, dict[str, np.ndarray | list]] = {}
    if endian is None:
        tokens = raw[pos:].split()
        tpos = 0
        for el in elements:
            data[el.name], tpos = _read_ascii(el, tokens, tpos, path)
            if vertices_only and el.name == "vertex":
                break
        else:
            if tpos != len(tokens):
                raise InputError(
                    f"PLY body holds {len(tokens) - tpos} values more than the header declares "
                    "(element counts do not match the body)", path)
    else:
        for el in elements:
            data[el.name], pos = _read_binary(el, raw, pos, endian, path)
            if vertices_only and el.name == "vertex":
                break
        else:
            if raw[pos:].strip():
                raise InputError(
                    f"PLY body has {len(raw) - pos} bytes more than the header declares "
                    "(element counts do not match the body)", path)
    vert = data["vertex"]
    for axis in "xyz":
        if axis not in vert:
            raise InputError(f"PLY vertex element has no '{axis}' property", path)
        if isinstance(vert[axis], tuple):
            raise InputError(f"PLY vertex property '{axis}' is a list, expected a number", path)
    v = np.stack([np.asarray(vert[a], dtype=np.float64) for a in "xyz"], axis=1)
    if len(v) == 0:
        raise InputError("PLY file has no vertices", path)
    check_coordinates(v, path, first_index=0, endian=endian)
    if vertices_only:
        return Mesh(vertices=v, faces=np.zeros((0, 3), np.int64))
    normals = uv = None
    if all(a in vert for a in ("nx", "ny", "nz")):
        normals = np.stack([np.asarray(vert[a], np.float64) for a in ("nx", "ny", "nz")], axis=1)
    for a, b in _UV_NAMES:
        if a in vert and b in vert:
            uv = np.stack([np.asarray(vert[a], np.float64), np.asarray(vert[b], np.float64)], axis=1)
            break
    faces = np.zeros((0, 3), np.int64)
    polygon = None
    face_el = next((e for e in elements if e.name == "face"), None)
    if face_el is not None and face_el.count > 0:
        lists = [p[0] for p in face_el.props if p[2] is not None]
        key = next((k for k in ("vertex_indices", "vertex_index") if k in lists), lists[0] if lists else None)
        if key is None:
            raise InputError("PLY face element has no list property of vertex indices", path)
        counts, flat = data["face"][key]
        if (counts < 3).any():
            k = int(np.flatnonzero(counts < 3)[0])
            raise InputError(f"face {k} has {int(counts[k])} corners (needs 3 or more)", path)
        if len(flat) and (flat.min() < 0 or flat.max() >= len(v)):
            bad = (flat < 0) | (flat >= len(v))
            k = int(np.searchsorted(np.cumsum(counts), int(np.flatnonzero(bad)[0]), side="right"))
            raise InputError(f"face {k} references a vertex index out of range (there are {len(v)} "
                             "vertices)", path)
        from cm3dmm.io.obj import fan_triangulate

        faces = flat[fan_triangulate(counts)]
        polygon = np.repeat(np.arange(len(counts)), counts - 2)
    return Mesh(vertices=v, faces=faces, uv=uv, normals=normals, polygon=polygon)


def _read_ascii(el: _Element, tokens: list[bytes], tpos: int, path: Path):
    out: dict = {}
    n = el.count
    if n == 0:
        return {p[0]: np.zeros(0) for p in el.props}, tpos

    def convert(toks, what):
        try:
            arr = np.array(toks, dtype=np.float64) if toks else np.zeros(0)
        except ValueError:
            raise InputError(f"PLY element '{el.name}' has a non-numeric {what}", path) from None
        return arr

    if all(p[2] is None for p in el.props):
        k = len(el.props)
        if tpos + n * k > len(tokens):
            raise InputError(f"PLY body is truncated: element '{el.name}' declares {n} rows of {k} "
                             f"values but only {(len(tokens) - tpos) // max(k, 1)} rows are there", path)
        arr = convert(tokens[tpos:tpos + n * k], "value").reshape(n, k)
        for j, p in enumerate(el.props):
            out[p[0]] = arr[:, j]
        return out, tpos + n * k
    # rows with lists: try "every list has the length of the first row's list"
    layout = _fixed_layout(el, lambda j: tokens[tpos + j] if tpos + j < len(tokens) else None)
    if layout is not None:
        width, list_pos = layout
        if tpos + n * width <= len(tokens):
            arr = convert(tokens[tpos:tpos + n * width], "value").reshape(n, width)
            if all((arr[:, lp] == c).all() for lp, c in list_pos.values()):
                return _split_fixed(el, arr, list_pos), tpos + n * width
    # general case: one row at a time
    cols: dict[str, list] = {p[0]: [] for p in el.props}
    for _ in range(n):
        for name, _t, ltype in el.props:
            if tpos >= len(tokens):
                raise InputError(f"PLY body is truncated inside element '{el.name}'", path)
            if ltype is None:
                cols[name].append(tokens[tpos])
                tpos += 1
            else:
                try:
                    c = int(tokens[tpos])
                except ValueError:
                    raise InputError(f"PLY element '{el.name}' has a bad list length", path) from None
                if c < 0 or tpos + 1 + c > len(tokens):
                    raise InputError(f"PLY body is truncated inside element '{el.name}'", path)
                cols[name].append(tokens[tpos + 1:tpos + 1 + c])
                tpos += 1 + c
    for name, _t, ltype in el.props:
        if ltype is None:
            out[name] = convert(cols[name], name)
        else:
            counts = np.array([len(x) for x in cols[name]], dtype=np.int64)
            flat = convert([t for row in cols[name] for t in row], name)
            out[name] = (counts, _as_int(flat, el, path))
    return out, tpos


def _as_int(flat: np.ndarray, el: _Element, path: Path) -> np.ndarray:
    if len(flat) and not (np.isfinite(flat).all() and (flat == np.round(flat)).all()):
        raise InputError(f"PLY element '{el.name}' has non-integer indices", path)
    return flat.astype(np.int64)


def _fixed_layout(el: _Element, first_value) -> tuple[int, dict[str, tuple[int, int]]] | None:
    """Row width and {list name: (column of its length, length)} assuming every row's lists
    have the lengths of the first row's. ``first_value(j)`` gives the j-th value of row 0."""
    width = 0
    list_pos = {}
    for name, _t, ltype in el.props:
        if ltype is None:
            width += 1
        else:
            v = first_value(width)
            if v is None:
                return None
            try:
                c = int(float(v))
            except ValueError:
                return None
            if c < 0:
                return None
            list_pos[name] = (width, c)
            width += 1 + c
    return width, list_pos


def _split_fixed(el: _Element, arr: np.ndarray, list_pos: dict) -> dict:
    out = {}
    col = 0
    for name, _t, ltype in el.props:
        if ltype is None:
            out[name] = arr[:, col]
            col += 1
        else:
            _, c = list_pos[name]
            counts = np.full(len(arr), c, dtype=np.int64)
            out[name] = (counts, np.asarray(arr[:, col + 1:col + 1 + c]).astype(np.int64).ravel())
            col += 1 + c
    return out


def _read_binary(el: _Element, raw: bytes, pos: int, endian: str, path: Path):
    n = el.count
    if all(p[2] is None for p in el.props):
        dt = np.dtype([(p[0], endian + p[1]) for p in el.props])
        need = n * dt.itemsize
        if pos + need > len(raw):
            raise InputError(f"PLY body is truncated: element '{el.name}' needs {need} bytes, "
                             f"{len(raw) - pos} remain", path)
        arr = np.frombuffer(raw, dtype=dt, count=n, offset=pos)
        return {p[0]: arr[p[0]] for p in el.props}, pos + need
    if n == 0:
        return {p[0]: (np.zeros(0, np.int64), np.zeros(0, np.int64)) if p[2] else np.zeros(0)
                for p in el.props}, pos

    # fast path: every row's lists have the first row's lengths
    def value_at(offset: int, t: str):
        size = np.dtype(t).itemsize
        if offset + size > len(raw):
            return None
        return np.frombuffer(raw, dtype=endian + t, count=1, offset=offset)[0]

    fields, off, ok = [], pos, True
    list_len = {}
    for name, t, ltype in el.props:
        if ltype is None:
            fields.append((name, endian + t))
            off += np.dtype(t).itemsize
        else:
            c = value_at(off, ltype)
            if c is None:
                raise InputError(f"PLY body is truncated inside element '{el.name}'", path)
            c = int(c)
            if c < 0:
                ok = False
                break
            list_len[name] = c
            fields.append((f"{name}__n", endian + ltype))
            if c:
                fields.append((name, endian + t, (c,)))
            off += np.dtype(ltype).itemsize + c * np.dtype(t).itemsize
    if ok:
        dt = np.dtype(fields)
        need = n * dt.itemsize
        if pos + need <= len(raw):
            arr = np.frombuffer(raw, dtype=dt, count=n, offset=pos)
            if all((arr[f"{k}__n"] == c).all() for k, c in list_len.items()):
                out = {}
                for name, _t, ltype in el.props:
                    if ltype is None:
                        out[name] = arr[name]
                    else:
                        c = list_len[name]
                        flat = arr[name].reshape(-1).astype(np.int64) if c else np.zeros(0, np.int64)
                        out[name] = (np.full(n, c, np.int64), flat)
                return out, pos + need
    # general case: one row at a time
    cols: dict[str, list] = {p[0]: [] for p in el.props}
    for _ in range(n):
        for name, t, ltype in el.props:
            if ltype is None:
                size = np.dtype(t).itemsize
                if pos + size > len(raw):
                    raise InputError(f"PLY body is truncated inside element '{el.name}'", path)
                cols[name].append(struct.unpack_from(endian + _STRUCT[t], raw, pos)[0])
                pos += size
            else:
                lsize, size = np.dtype(ltype).itemsize, np.dtype(t).itemsize
                if pos + lsize > len(raw):
                    raise InputError(f"PLY body is truncated inside element '{el.name}'", path)
                c = struct.unpack_from(endian + _STRUCT[ltype], raw, pos)[0]
                pos += lsize
                if c < 0:
                    raise InputError(f"PLY element '{el.name}' has a list of negative length {c}", path)
                if pos + c * size > len(raw):
                    raise InputError(f"PLY body is truncated inside element '{el.name}'", path)
                cols[name].append(struct.unpack_from(f"{endian}{c}{_STRUCT[t]}", raw, pos))
                pos += c * size
    out = {}
    for name, _t, ltype in el.props:
        if ltype is None:
            out[name] = np.array(cols[name])
        else:
            out[name] = (np.array([len(r) for r in cols[name]], np.int64),
                         np.array([x for r in cols[name] for x in r], np.int64))
    return out, pos


_STRUCT = {"i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I", "f4": "f", "f8": "d"}


# --------------------------------------------------------------------------- writer
def format_ply(mesh: Mesh, binary: bool = True, precision: int = 9) -> bytes:
    """PLY bytes of ``mesh``: vertex x y z [nx ny nz] [s t] (double), face list uchar int.

    Binary files are little endian; ascii uses ``precision`` significant digits."""
    cols = [mesh.vertices]
    names = ["x", "y", "z"]
    if mesh.normals is not None:
        cols.append(mesh.normals)
        names += ["nx", "ny", "nz"]
    if mesh.uv is not None:
        cols.append(mesh.uv)
        names += ["s", "t"]
    vert = np.concatenate(cols, axis=1)
    head = ["ply", f"format {'binary_little_endian' if binary else 'ascii'} 1.0", "comment cm3dmm",
            f"element vertex {len(vert)}"]
    head += [f"property double {n}" for n in names]
    head += [f"element face {mesh.n_faces}", "property list uchar int vertex_indices", "end_header"]
    header = ("\n".join(head) + "\n").encode("ascii")
    if binary:
        fdt = np.dtype([("n", "u1"), ("i", "<i4", (3,))])
        frec = np.zeros(mesh.n_faces, dtype=fdt)
        frec["n"] = 3
        frec["i"] = mesh.faces
        return header + np.ascontiguousarray(vert, dtype="<f8").tobytes() + frec.tobytes()
    g = f"%.{precision}g"
    vtext = ((" ".join([g] * vert.shape[1]) + "\n") * len(vert)) % tuple(vert.ravel().tolist())
    ftext = ("3 %d %d %d\n" * mesh.n_faces) % tuple(mesh.faces.ravel().tolist())
    return header + vtext.encode("ascii") + ftext.encode("ascii")


def write_ply(path: str | os.PathLike, mesh: Mesh, binary: bool = True, precision: int = 9) -> None:
    """Write ``mesh`` as PLY, atomically."""
    from cm3dmm.io.atomic import atomic_write_bytes

    atomic_write_bytes(path, format_ply(mesh, binary=binary, precision=precision))

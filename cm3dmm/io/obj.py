"""Wavefront OBJ: a vectorised reader (with a line-by-line fallback) and a writer.

Understood: ``v x y z [w | r g b]``, ``vt u v [w]``, ``vn x y z``, ``f`` with any of the
corner forms ``a``, ``a/b``, ``a/b/c``, ``a//c``, negative (relative) indices, polygons of
any size (fan-triangulated). Everything else (``o``, ``g``, ``s``, ``usemtl``, ``l``, ...)
is ignored. The fast path parses the whole file with numpy; files it cannot verify (mixed
corner forms, inline comments, line continuations, ...) go through :func:`_parse_lines`,
which also produces the error messages with line numbers.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError
from cm3dmm.io.mesh_checks import check_coordinates
from cm3dmm.io.mesh import Mesh, per_vertex_uv

_SP, _NL, _SLASH = 32, 10, ord("/")


class _Irregular(Exception):
    """The fast path cannot handle this file; use the line-by-line parser."""


def parse_obj(raw: bytes, path: str | os.PathLike = "<obj>", vertices_only: bool = False) -> Mesh:
    """Parse OBJ text ``raw`` (bytes). ``path`` is only used in error messages."""
    path = Path(path)
    if b"\x00" in raw:
        raise InputError("binary data, not an OBJ text file", path)
    try:
        parts = _parse_fast(raw, vertices_only)
    except _Irregular:
        parts = _parse_lines(raw, path, vertices_only)
    return _assemble(parts, path)


# --------------------------------------------------------------------------- fast path
def _parse_fast(raw: bytes, vertices_only: bool) -> dict:
    if b"\\\n" in raw or b"\\\r\n" in raw or raw.count(b"\r") != raw.count(b"\r\n"):
        raise _Irregular  # line continuations, or lone \r line ends: the line parser handles them
    buf = np.frombuffer(raw + b"\n   ", dtype=np.uint8).copy()
    buf[(buf == 9) | (buf == 13) | (buf == 11) | (buf == 12)] = _SP
    is_nl = buf == _NL
    nl = np.flatnonzero(is_nl)
    starts = np.r_[0, nl[:-1] + 1]  # the padding after the final newline is not a line
    if ((buf[starts] == _SP) & (nl > starts)).any():
        raise _Irregular  # leading whitespace before a keyword: let the line parser deal with it
    c0, c1, c2 = buf[starts], buf[starts + 1], buf[starts + 2]
    v_, t_, n_, f_ = ord("v"), ord("t"), ord("n"), ord("f")
    if ((((c0 == v_) | (c0 == f_)) & (c1 == _NL)) | ((c0 == v_) & ((c1 == t_) | (c1 == n_)) & (c2 == _NL))).any():
        raise _Irregular  # a keyword without values: the line parser reports it
    kinds = {
        "v": (c0 == v_) & (c1 == _SP),
        "vt": (c0 == v_) & (c1 == t_) & (c2 == _SP),
        "vn": (c0 == v_) & (c1 == n_) & (c2 == _SP),
        "f": (c0 == f_) & (c1 == _SP),
    }
    key_len = {"v": 1, "vt": 2, "vn": 2, "f": 1}
    body = buf
    for k, m in kinds.items():
        for j in range(key_len[k]):
            body[starts[m] + j] = _SP
    line_id = np.cumsum(is_nl) - is_nl  # each char (its newline included) -> its line
    hashes = np.flatnonzero(buf == ord("#"))
    if len(hashes) and (buf[starts[line_id[hashes]]] != ord("#")).any():
        raise _Irregular  # an inline comment after data
    is_ws = (body == _SP) | is_nl
    tok_start = ~is_ws & np.r_[True, is_ws[:-1]]
    ntok = np.bincount(line_id[tok_start], minlength=len(starts) + 1)[: len(starts)]

    def numbers(kind: str, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
        m = kinds[kind]
        chunk = body[np.append(m, False)[line_id]].tobytes()
        try:
            vals = np.fromstring(chunk, dtype=dtype, sep=" ") if chunk.strip() else np.zeros(0, dtype)
        except ValueError:
            raise _Irregular from None
        return vals, ntok[m]

    out: dict = {}
    vals, counts = numbers("v")
    out["v"] = _fixed_width(vals, counts, (3, 4, 6, 7))[:, :3]
    if vertices_only:
        return out
    vals, counts = numbers("vt")
    out["vt"] = _fixed_width(vals, counts, (2, 3))[:, :2] if len(counts) else np.zeros((0, 2))
    vals, counts = numbers("vn")
    out["vn"] = _fixed_width(vals, counts, (3,)) if len(counts) else np.zeros((0, 3))

    fm = kinds["f"]
    corners = ntok[fm]
    if len(corners) == 0:
        out["f"] = None
        return out
    if (corners < 3).any():
        raise _Irregular
    fchunk = body[np.append(fm, False)[line_id]]
    n_corner = int(corners.sum())
    slash = fchunk == _SLASH
    n_slash = int(slash.sum())
    double = slash & np.r_[slash[1:], False]
    n_double = int(double.sum())
    if n_slash == 0:
        width, names = 1, ("v",)
    elif n_slash == n_corner and n_double == 0:
        width, names = 2, ("v", "vt")
    elif n_slash == 2 * n_corner and n_double == 0:
        width, names = 3, ("v", "vt", "vn")
    elif n_slash == 2 * n_corner and n_double == n_corner:
        width, names = 2, ("v", "vn")
    else:
        raise _Irregular
    if n_slash:  # the totals fit one corner form; every corner must have it ("1 1 1/1/1/0" would not)
        fws = (fchunk == _SP) | (fchunk == _NL)
        token = np.cumsum(~fws & np.r_[True, fws[:-1]]) - 1  # token index of each character
        per_token = np.bincount(token[slash], minlength=n_corner)
        if len(per_token) != n_corner or (per_token != n_slash // n_corner).any():
            raise _Irregular
    fchunk = fchunk.copy()
    fchunk[slash] = _SP
    try:
        ints = np.fromstring(fchunk.tobytes(), dtype=np.int64, sep=" ")
    except ValueError:
        raise _Irregular from None
    if len(ints) != n_corner * width:
        raise _Irregular
    ints = ints.reshape(n_corner, width)
    # counts of v / vt / vn defined before each face line, for relative indices
    before = {k: np.cumsum(kinds[k])[fm] for k in ("v", "vt", "vn")}
    cols = {}
    for j, name in enumerate(names):
        cols[name] = _absolute(ints[:, j], np.repeat(before[name], corners))
    out["f"] = (corners, cols)
    return out


def _fixed_width(vals: np.ndarray, counts: np.ndarray, widths: tuple[int, ...]) -> np.ndarray:
    if len(counts) == 0:
        return np.zeros((0, widths[0]))
    w = int(counts[0])
    if w not in widths or (counts != w).any() or len(vals) != w * len(counts):
        raise _Irregular
    return vals.reshape(len(counts), w)


def _absolute(idx: np.ndarray, n_before: np.ndarray) -> np.ndarray:
    """1-based / negative (relative to the ``n_before`` elements defined so far) OBJ indices
    -> 0-based. Index 0 is invalid in OBJ; it becomes a large negative sentinel that the
    range check reports."""
    out = np.where(idx > 0, idx - 1, idx + n_before)
    out[idx == 0] = _ZERO
    return out


_ZERO = -(1 << 40)  #: sentinel for the invalid OBJ index 0
_WS_CHARS = " \t\r\x0b\x0c"  #: whitespace inside a line (not Unicode's: NBSP, \x1c-\x1f, ...)
_WS = re.compile(f"[{_WS_CHARS}]+")
_MAX_INDEX = 1 << 39  #: larger |index| is out of range for any file (and would overflow int64)


# --------------------------------------------------------------------------- line parser
def _parse_lines(raw: bytes, path: Path, vertices_only: bool) -> dict:
    """The reference parser: one line at a time, exact error messages with line numbers."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = text.replace("\\\r\n", " ").replace("\\\n", " ")
    v: list[list[float]] = []
    vt: list[list[float]] = []
    vn: list[list[float]] = []
    corners: list[int] = []
    cv: list[int] = []
    ct: list[int] = []
    cn: list[int] = []
    has_t: list[bool] = []
    has_n: list[bool] = []

    def floats(tokens, lineno, need, kind):
        if len(tokens) < need:
            raise InputError(f"line {lineno}: '{kind}' needs {need} numbers, got {len(tokens)}", path)
        try:
            return [float(x) for x in tokens]
        except ValueError:
            raise InputError(f"line {lineno}: '{kind}' has a non-numeric value", path) from None

    def index(tok, n, lineno):
        try:
            i = int(tok)
        except ValueError:
            raise InputError(f"line {lineno}: bad face index {tok!r}", path) from None
        if i == 0:
            raise InputError(f"line {lineno}: face index 0 (OBJ indices start at 1)", path)
        if abs(i) > _MAX_INDEX:
            raise InputError(f"line {lineno}: face index {tok!r} is out of range", path)
        return i - 1 if i > 0 else n + i

    # OBJ lines end at \n, \r\n or \r only (str.splitlines would also break at \v, \f, \x1c-\x1e,
    # \x85, ..., which the fast path rightly reads as spaces inside a line)
    for lineno, line in enumerate(re.split(r"\r\n|\r|\n", text), 1):
        tokens = _WS.split(line.split("#", 1)[0].strip(_WS_CHARS))  # ASCII whitespace, as the fast path
        if tokens == [""]:
            continue
        key, rest = tokens[0], tokens[1:]
        if key == "v":
            v.append(floats(rest, lineno, 3, "v")[:3])
        elif vertices_only:
            continue
        elif key == "vt":
            vt.append((floats(rest, lineno, 2, "vt") + [0.0])[:2])
        elif key == "vn":
            vn.append(floats(rest, lineno, 3, "vn")[:3])
        elif key == "f":
            if len(rest) < 3:
                raise InputError(f"line {lineno}: face with {len(rest)} corners (needs 3 or more)", path)
            corners.append(len(rest))
            for tok in rest:
                sub = tok.split("/")
                cv.append(index(sub[0], len(v), lineno))
                t_ok = len(sub) > 1 and sub[1] != ""
                n_ok = len(sub) > 2 and sub[2] != ""
                has_t.append(t_ok)
                has_n.append(n_ok)
                ct.append(index(sub[1], len(vt), lineno) if t_ok else 0)
                cn.append(index(sub[2], len(vn), lineno) if n_ok else 0)
    out: dict = {"v": np.array(v, dtype=np.float64).reshape(-1, 3)}
    if vertices_only:
        return out
    out["vt"] = np.array(vt, dtype=np.float64).reshape(-1, 2)
    out["vn"] = np.array(vn, dtype=np.float64).reshape(-1, 3)
    if not corners:
        out["f"] = None
        return out
    cols = {"v": np.array(cv, dtype=np.int64)}
    if all(has_t):
        cols["vt"] = np.array(ct, dtype=np.int64)
    if all(has_n):
        cols["vn"] = np.array(cn, dtype=np.int64)
    out["f"] = (np.array(corners, dtype=np.int64), cols)
    return out


# --------------------------------------------------------------------------- assembly
def _assemble(parts: dict, path: Path) -> Mesh:
    v = parts["v"]
    if len(v) == 0:
        raise InputError("no vertices ('v' lines): not an OBJ mesh", path)
    check_coordinates(v, path, first_index=1)
    if parts.get("f") is None:
        return Mesh(vertices=v, faces=np.zeros((0, 3), np.int64))
    corners, cols = parts["f"]
    tables = {"v": len(v), "vt": len(parts["vt"]), "vn": len(parts["vn"])}
    for name, idx in cols.items():
        bad = (idx < 0) | (idx >= tables[name])
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            face = int(np.searchsorted(np.cumsum(corners), k, side="right"))
            if idx[k] == _ZERO:
                raise InputError(f"face {face} uses index 0 (OBJ indices start at 1)", path)
            what, plural = {"v": ("vertex", "vertices"), "vt": ("texture coordinate", "texture coordinates"),
                            "vn": ("normal", "normals")}[name]
            raise InputError(f"face {face} references {what} index out of range (there are "
                             f"{tables[name]} {plural})", path)
    tri_corners = fan_triangulate(corners)
    faces = cols["v"][tri_corners]
    polygon = np.repeat(np.arange(len(corners)), corners - 2)
    uv = normals = texcoords = face_tc = None
    if "vt" in cols:
        texcoords = parts["vt"]
        if not np.isfinite(texcoords).all():
            raise InputError("texture coordinates contain NaN or infinite values", path)
        face_tc = cols["vt"][tri_corners]
        uvs, valid = per_vertex_uv(len(v), faces, face_tc, texcoords)
        if valid.all():
            uv = uvs
    if "vn" in cols:
        cn = cols["vn"]
        vn = parts["vn"]
        nrm = np.full((len(v), 3), np.nan)
        nrm[cols["v"][::-1]] = vn[cn[::-1]]
        if np.isfinite(nrm).all() and (vn[cn] == nrm[cols["v"]]).all():
            normals = nrm
    return Mesh(vertices=v, faces=faces, uv=uv, normals=normals, texcoords=texcoords,
                face_texcoords=face_tc, polygon=polygon)


def fan_triangulate(corners: np.ndarray) -> np.ndarray:
    """Corner indices (T, 3) of the fan triangulation of polygons with ``corners`` (P,) corners
    each, laid out one after the other: polygon p with corners o..o+n-1 gives (o, o+j+1, o+j+2)."""
    corners = np.asarray(corners, dtype=np.int64)
    offsets = np.r_[0, np.cumsum(corners)[:-1]]
    n_tri = corners - 2
    o = np.repeat(offsets, n_tri)
    j = np.arange(int(n_tri.sum())) - np.repeat(np.r_[0, np.cumsum(n_tri)[:-1]], n_tri)
    return np.stack([o, o + j + 1, o + j + 2], axis=1)


# --------------------------------------------------------------------------- writer
def _rows(fmt_row: str, arr: np.ndarray) -> str:
    if len(arr) == 0:
        return ""
    return (fmt_row * len(arr)) % tuple(arr.ravel().tolist())


def format_obj(mesh: Mesh, precision: int = 9) -> str:
    """The OBJ text of ``mesh``: ``v`` lines, ``vt`` lines (per-vertex ``uv`` if present, else
    the ``texcoords`` table), ``vn`` lines for per-vertex normals, then 1-based ``f`` lines."""
    g = f"%.{precision}g"
    parts = ["# cm3dmm\n", _rows(f"v {g} {g} {g}\n", mesh.vertices)]
    f = mesh.faces + 1
    if mesh.uv is not None:
        parts.append(_rows(f"vt {g} {g}\n", mesh.uv))
        ft = f
    elif mesh.texcoords is not None:
        parts.append(_rows(f"vt {g} {g}\n", mesh.texcoords))
        ft = mesh.face_texcoords + 1
    else:
        ft = None
    if mesh.normals is not None:
        parts.append(_rows(f"vn {g} {g} {g}\n", mesh.normals))
    if ft is None and mesh.normals is None:
        parts.append(_rows("f %d %d %d\n", f))
    elif ft is not None and mesh.normals is None:
        parts.append(_rows("f %d/%d %d/%d %d/%d\n", np.stack([f, ft], axis=2)))
    elif ft is None:
        parts.append(_rows("f %d//%d %d//%d %d//%d\n", np.stack([f, f], axis=2)))
    else:
        parts.append(_rows("f %d/%d/%d %d/%d/%d %d/%d/%d\n", np.stack([f, ft, f], axis=2)))
    return "".join(parts)


def write_obj(path: str | os.PathLike, mesh: Mesh, precision: int = 9) -> None:
    """Write ``mesh`` as OBJ text, atomically (``.obj.gz`` via :func:`cm3dmm.io.write_mesh`)."""
    from cm3dmm.io.atomic import atomic_write_text

    atomic_write_text(path, format_obj(mesh, precision=precision))

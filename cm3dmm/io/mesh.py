"""The :class:`Mesh` container and format-dispatching :func:`read_mesh` / :func:`write_mesh`.

Readers return plain arrays: vertices in file order (never merged or reordered), polygons
fan-triangulated, per-vertex UVs only where each vertex has exactly one UV. Supported:
``.obj``, ``.ply`` (ascii, binary little / big endian), each optionally gzip-compressed
(``.obj.gz``, ``.ply.gz``). Every malformed input is an :class:`~cm3dmm.errors.InputError`
naming the file and the problem.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError

#: Suffixes understood by :func:`read_mesh` / :func:`write_mesh` (``.gz`` may follow).
MESH_FORMATS = (".obj", ".ply")


@dataclass
class Mesh:
    """A triangle mesh (or a point cloud when ``faces`` is empty).

    Shapes: N vertices, F triangles, T texture coordinates.
    """

    vertices: np.ndarray  #: (N, 3) float64
    faces: np.ndarray  #: (F, 3) int64, triangles (polygons fan-triangulated); (0, 3) for points
    uv: np.ndarray | None = None  #: (N, 2) float64 per-vertex UV; None if absent or seamed
    normals: np.ndarray | None = None  #: (N, 3) float64 per-vertex normals; None if absent
    texcoords: np.ndarray | None = None  #: (T, 2) float64 OBJ ``vt`` table (kept across seams)
    face_texcoords: np.ndarray | None = None  #: (F, 3) int64 per-corner index into ``texcoords``
    polygon: np.ndarray | None = None  #: (F,) int64 index of the source polygon of each triangle

    def __post_init__(self) -> None:
        self.vertices = np.asarray(self.vertices, dtype=np.float64)
        self.faces = np.asarray(self.faces, dtype=np.int64).reshape(-1, 3)
        if self.vertices.ndim != 2 or self.vertices.shape[1] != 3:
            raise ValueError(f"vertices must have shape (N, 3), got {self.vertices.shape}")
        n = len(self.vertices)
        if len(self.faces) and (self.faces.min() < 0 or self.faces.max() >= n):
            raise ValueError(f"faces index outside 0..{n - 1}")
        for name, width in (("uv", 2), ("normals", 3)):
            arr = getattr(self, name)
            if arr is not None:
                arr = np.asarray(arr, dtype=np.float64)
                if arr.shape != (n, width):
                    raise ValueError(f"{name} must have shape ({n}, {width}), got {arr.shape}")
                setattr(self, name, arr)
        if (self.texcoords is None) != (self.face_texcoords is None):
            raise ValueError("texcoords and face_texcoords must be given together")
        if self.texcoords is not None:
            self.texcoords = np.asarray(self.texcoords, dtype=np.float64).reshape(-1, 2)
            self.face_texcoords = np.asarray(self.face_texcoords, dtype=np.int64).reshape(-1, 3)
            if len(self.face_texcoords) != len(self.faces):
                raise ValueError("face_texcoords must have one row per face")
            if len(self.face_texcoords) and (
                self.face_texcoords.min() < 0 or self.face_texcoords.max() >= len(self.texcoords)
            ):
                raise ValueError("face_texcoords index outside the texcoords table")

    @property
    def n_vertices(self) -> int:
        return int(len(self.vertices))

    @property
    def n_faces(self) -> int:
        return int(len(self.faces))

    @property
    def is_point_cloud(self) -> bool:
        return len(self.faces) == 0

    def submesh(self, keep: np.ndarray) -> "Mesh":
        """The mesh restricted to vertices ``keep`` (index array or (N,) bool mask), in the
        order given; triangles with any dropped corner are removed, indices remapped."""
        keep = np.asarray(keep)
        idx = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64)
        remap = np.full(self.n_vertices, -1, dtype=np.int64)
        remap[idx] = np.arange(len(idx))
        tri = remap[self.faces]
        ok = (tri >= 0).all(axis=1)
        sub = lambda a: None if a is None else a[idx]  # noqa: E731
        return Mesh(
            vertices=self.vertices[idx], faces=tri[ok], uv=sub(self.uv), normals=sub(self.normals),
            texcoords=self.texcoords,
            face_texcoords=None if self.face_texcoords is None else self.face_texcoords[ok],
            polygon=None if self.polygon is None else self.polygon[ok],
        )


def per_vertex_uv(
    n_vertices: int, faces: np.ndarray, face_texcoords: np.ndarray, texcoords: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Collapse per-corner texture coordinates to per-vertex UVs.

    faces, face_texcoords: (F, 3) int; texcoords: (T, 2). Returns ``uv`` (N, 2) float64 and
    ``valid`` (N,) bool: a vertex is valid when it is used by at least one corner and all its
    corners carry the same UV coordinates (vertices on a seam, or unused, are invalid and
    their uv is NaN).
    """
    cv = np.asarray(faces, dtype=np.int64).ravel()
    ct = np.asarray(face_texcoords, dtype=np.int64).ravel()
    tc = np.asarray(texcoords, dtype=np.float64)
    first = np.full(n_vertices, -1, dtype=np.int64)
    first[cv[::-1]] = ct[::-1]  # the last write wins: each vertex gets its first corner
    used = first >= 0
    uv = np.full((n_vertices, 2), np.nan)
    uv[used] = tc[first[used]]
    differs = (tc[ct] != uv[cv]).any(axis=1)
    valid = used.copy()
    valid[cv[differs]] = False
    uv[~valid] = np.nan
    return uv, valid


def _split_suffix(path: Path) -> tuple[str, bool]:
    suffixes = [s.lower() for s in path.suffixes]
    gz = bool(suffixes) and suffixes[-1] == ".gz"
    if gz:
        suffixes = suffixes[:-1]
    fmt = suffixes[-1] if suffixes else ""
    return fmt, gz


def _format_of(path: Path) -> tuple[str, bool]:
    fmt, gz = _split_suffix(path)
    if fmt not in MESH_FORMATS:
        raise InputError(
            f"unknown mesh format {''.join(path.suffixes) or '(no suffix)'}; expected one of "
            f"{', '.join(MESH_FORMATS)} (optionally .gz)", path)
    return fmt, gz


def read_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes, gunzipped when it ends in ``.gz``; InputError if missing/truncated."""
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    if path.is_dir():
        raise InputError("is a folder, expected a mesh file", path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read ({exc.strerror or exc})", path) from None
    if path.suffix.lower() == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"not a valid gzip file or truncated ({exc})", path) from None
    if not raw.strip():
        raise InputError("empty file", path)
    return raw


def read_mesh(path: str | os.PathLike) -> Mesh:
    """Read an ``.obj`` / ``.ply`` (optionally ``.gz``) mesh or point cloud.

    Vertex order is preserved; polygons are fan-triangulated; ``uv`` is per-vertex when
    every vertex has exactly one UV (OBJ seams: ``uv`` is None but ``texcoords`` /
    ``face_texcoords`` keep the per-corner data). A file without faces gives a point cloud
    (``faces`` of shape (0, 3)).
    """
    path = Path(path)
    fmt, _ = _format_of(path)
    raw = read_bytes(path)
    if fmt == ".obj":
        from cm3dmm.io.obj import parse_obj

        return parse_obj(raw, path)
    from cm3dmm.io.ply import parse_ply

    return parse_ply(raw, path)


def read_vertices(path: str | os.PathLike) -> np.ndarray:
    """Only the vertex positions (N, 3) float64 of a mesh file (faster than :func:`read_mesh`)."""
    path = Path(path)
    fmt, _ = _format_of(path)
    raw = read_bytes(path)
    if fmt == ".obj":
        from cm3dmm.io.obj import parse_obj

        return parse_obj(raw, path, vertices_only=True).vertices
    from cm3dmm.io.ply import parse_ply

    return parse_ply(raw, path, vertices_only=True).vertices


def write_mesh(path: str | os.PathLike, mesh: Mesh, *, binary: bool = True, precision: int = 9) -> None:
    """Write ``mesh`` atomically as ``.obj`` or ``.ply`` (``.gz`` compresses).

    OBJ always writes text with ``vt`` lines when the mesh has UVs; PLY is binary little
    endian (float64 coordinates) unless ``binary=False``. ``precision`` is the number of
    significant digits of text output (9 reproduces float32 exactly; 17 reproduces float64).
    """
    from cm3dmm.io.atomic import atomic_path

    path = Path(path)
    fmt, gz = _format_of(path)
    if fmt == ".obj":
        from cm3dmm.io.obj import format_obj

        data = format_obj(mesh, precision=precision).encode("ascii")
    else:
        from cm3dmm.io.ply import format_ply

        data = format_ply(mesh, binary=binary, precision=precision)
    if gz:
        data = gzip.compress(data, compresslevel=6, mtime=0)
    with atomic_path(path, suffix="".join(path.suffixes[-2:]) if gz else None) as tmp:
        tmp.write_bytes(data)

"""Front-face crops for file-based sources, and unit conversion.

A crop is either a vertex-index file (``.txt``: whitespace/comma separated 0-based indices;
``.npy``: an integer index array or a boolean mask of length V) or a UV-space mask image
(``.png`` and other Pillow formats: a vertex is kept when its UV falls on a white pixel,
i.e. grey value >= 128; image row 0 is v = 1).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError
from cm3dmm.io.mesh import Mesh, per_vertex_uv

#: factor from a source's units to millimetres
UNIT_TO_MM = {"mm": 1.0, "cm": 10.0, "m": 1000.0}

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def unit_scale(units: str, key: str = "units") -> float:
    """Millimetres per unit of ``units`` (mm | cm | m)."""
    if units not in UNIT_TO_MM:
        raise InputError(f"{key}: {units!r} is not one of {sorted(UNIT_TO_MM)}")
    return UNIT_TO_MM[units]


def vertex_uv_any(mesh: Mesh) -> np.ndarray | None:
    """A UV for every vertex for mask look-ups: the per-vertex ``uv``, or on seams the UV of
    each vertex's first corner. (N, 2) float64 (NaN for vertices no face uses) or None."""
    if mesh.uv is not None:
        return mesh.uv
    if mesh.texcoords is None:
        return None
    first = np.full(mesh.n_vertices, -1, dtype=np.int64)
    first[mesh.faces.ravel()[::-1]] = mesh.face_texcoords.ravel()[::-1]
    uv = np.full((mesh.n_vertices, 2), np.nan)
    uv[first >= 0] = mesh.texcoords[first[first >= 0]]
    return uv


def crop_indices(crop: str | os.PathLike, mesh: Mesh) -> np.ndarray:
    """Sorted vertex indices (K,) int64 of ``mesh`` selected by the crop file ``crop``."""
    path = Path(crop)
    n = mesh.n_vertices
    if not path.is_file():
        raise InputError("crop file not found", path)
    suffix = path.suffix.lower()
    if suffix in _IMAGE_SUFFIXES:
        idx = _mask_indices(path, mesh)
    elif suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - any numpy failure is a corrupt file
            raise InputError(f"not a readable .npy file ({exc})", path) from None
        arr = np.asarray(arr).ravel()
        if arr.dtype == bool:
            if len(arr) != n:
                raise InputError(f"boolean crop mask has {len(arr)} entries for {n} vertices", path)
            idx = np.flatnonzero(arr)
        elif np.issubdtype(arr.dtype, np.integer):
            idx = arr.astype(np.int64)
        else:
            raise InputError(f"crop array must hold integer indices or booleans, got {arr.dtype}", path)
    elif suffix == ".txt":
        text = path.read_text(errors="replace").replace(",", " ")
        try:
            idx = np.array([int(t) for t in text.split()], dtype=np.int64)
        except ValueError:
            raise InputError("crop file must hold integer vertex indices", path) from None
    else:
        raise InputError("crop must be a vertex-index file (.txt, .npy) or a UV mask image (.png)", path)
    if len(idx) == 0:
        raise InputError("the crop selects no vertices", path)
    if idx.min() < 0 or idx.max() >= n:
        raise InputError(f"crop index {int(idx.max() if idx.max() >= n else idx.min())} is outside "
                         f"the mesh's 0..{n - 1} vertices", path)
    return np.unique(idx)


def _mask_indices(path: Path, mesh: Mesh) -> np.ndarray:
    from PIL import Image

    uv = vertex_uv_any(mesh)
    if uv is None:
        raise InputError("a UV mask crop needs texture coordinates, but the meshes have none", path)
    try:
        with Image.open(path) as im:
            mask = np.asarray(im.convert("L")) >= 128
    except Exception as exc:  # noqa: BLE001 - Pillow raises many types for bad images
        raise InputError(f"not a readable image ({exc})", path) from None
    h, w = mask.shape
    ok = np.isfinite(uv).all(axis=1)
    col = np.clip(np.floor(uv[ok, 0] * w), 0, w - 1).astype(np.int64)
    row = np.clip(np.floor((1.0 - uv[ok, 1]) * h), 0, h - 1).astype(np.int64)
    keep = np.zeros(mesh.n_vertices, dtype=bool)
    keep[np.flatnonzero(ok)] = mask[row, col]
    return np.flatnonzero(keep)


def apply_crop(mesh: Mesh, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Triangles (F', 3) int32 of ``mesh`` restricted to vertices ``idx`` (renumbered in the
    order of ``idx``) and their per-vertex UV (K, 2) float32 if unique there, else None."""
    sub = mesh.submesh(idx)
    if sub.n_faces == 0:
        raise InputError("the crop keeps no complete triangle")
    uv = None
    if sub.uv is not None:
        uv = sub.uv
    elif sub.texcoords is not None:
        uvs, valid = per_vertex_uv(sub.n_vertices, sub.faces, sub.face_texcoords, sub.texcoords)
        if valid.all():
            uv = uvs
    return sub.faces.astype(np.int32), None if uv is None else uv.astype(np.float32)

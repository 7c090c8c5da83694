"""Meshes people can open: ``trimesh.Trimesh`` with UVs, and atomic OBJ / PLY / GLB writers.

* :func:`face_mesh` — one face as a ``trimesh.Trimesh`` (``process=False``: points and triangles
  exactly as the model made them) with ``TextureVisuals`` holding the per-point UVs of the template
  or level, and ``metadata["landmarks"]`` (name -> xyz) when landmarks are given;
* :func:`obj_text` — the OBJ text (``v`` / ``vt`` / ``f a/a b/b c/c``, one UV per point, no
  material file) that :func:`write_mesh` writes for ``.obj``; ``.ply`` and ``.glb`` go through
  trimesh's exporters (PLY keeps the UVs as ``s`` / ``t`` vertex properties, GLB as TEXCOORD_0);
* :func:`level_uv` — the UVs of an upsampling level's points (or the template's, level 0);
* :func:`write_fit_meshes` — the fit stage's meshes (one per expression) with UVs at any level,
  and a ``.landmarks.json`` beside each with the landmark positions.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError

log = logging.getLogger(__name__)

#: file suffixes :func:`write_mesh` writes
MESH_FORMATS = (".obj", ".ply", ".glb")


def face_mesh(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray | None = None,
              landmarks: dict[str, np.ndarray] | None = None, metadata: dict | None = None):
    """A ``trimesh.Trimesh`` of one face: vertices (P, 3) mm, faces (T, 3), uv (P, 2) or None."""
    import trimesh
    from trimesh.visual import TextureVisuals

    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vertices must have shape (P, 3), got {v.shape}")
    visual = None
    if uv is not None:
        uv = np.asarray(uv, np.float64)
        if uv.shape != (len(v), 2):
            raise ValueError(f"uv must have shape ({len(v)}, 2), got {uv.shape}")
        visual = TextureVisuals(uv=uv)
    mesh = trimesh.Trimesh(v, f, visual=visual, process=False, validate=False)
    mesh.metadata.update(metadata or {})
    if landmarks:
        mesh.metadata["landmarks"] = {k: [float(x) for x in p] for k, p in landmarks.items()}
    return mesh


def mesh_uv(mesh) -> np.ndarray | None:
    """The per-vertex UVs of a trimesh (None when it has none)."""
    uv = getattr(getattr(mesh, "visual", None), "uv", None)
    return None if uv is None else np.asarray(uv, np.float64)


def obj_text(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray | None = None,
             comment: str | None = None) -> str:
    """OBJ text: ``v x y z`` (mm, 6 decimals), ``vt u v`` (8 decimals) per point when ``uv`` is
    given, ``f`` lines 1-based (``f a/a b/b c/c`` with UVs)."""
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64) + 1
    lines = [f"# {comment}"] if comment else []
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in v]
    if uv is not None:
        lines += [f"vt {a:.8f} {b:.8f}" for a, b in np.asarray(uv, np.float64)]
        lines += [f"f {a}/{a} {b}/{b} {c}/{c}" for a, b, c in f]
    else:
        lines += [f"f {a} {b} {c}" for a, b, c in f]
    return "\n".join(lines) + "\n"


def write_mesh(path: str | os.PathLike, mesh) -> Path:
    """Write a trimesh atomically as OBJ (:func:`obj_text`), PLY or GLB (by the suffix)."""
    from cm3dmm.io.atomic import atomic_write_bytes, atomic_write_text

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in MESH_FORMATS:
        raise InputError(f"unknown mesh format {p.suffix!r} (expected one of {list(MESH_FORMATS)})", p)
    if suffix == ".obj":
        atomic_write_text(p, obj_text(mesh.vertices, mesh.faces, mesh_uv(mesh), comment="cm3dmm"))
    else:
        atomic_write_bytes(p, mesh.export(file_type=suffix[1:]))
    return p


def level_uv(template, level: int) -> np.ndarray:
    """UVs (P, 2) of upsampling ``level``'s points (level 0: the template vertices)."""
    if level == 0:
        return np.asarray(template.uv, np.float64)
    levels = getattr(template, "levels", None) or []
    if not 0 <= level < len(levels):
        raise InputError(f"upsampling level {level} does not exist (the template has levels 0..{max(len(levels), 1) - 1})")
    return np.asarray(levels[level].uv, np.float64)


def template_of(fm):
    """The template of a loaded method (``cm3dmm.methods.FaceModel``), or None when unknown:
    the continuous model carries its own; baselines get one from :mod:`cm3dmm.api` / the fit stage."""
    tpl = getattr(fm, "template", None)
    if tpl is None:
        tpl = getattr(getattr(fm, "model", None), "template", None)
    return tpl


def write_fit_meshes(out_npz: Path, result, fm, expressions: list[str], level: int, scans=None) -> list[str]:
    """The fit stage's meshes: ``{stem}.{expression}.obj`` at upsampling ``level`` with UVs (``vt``)
    and ``{stem}.{expression}.landmarks.json`` (landmark name -> xyz). Scans: in the scan's frame
    and units (the transforms of ``result`` inverted)."""
    import torch

    from cm3dmm import landmarks as lmk
    from cm3dmm.fit import UNIT_FACTORS
    from cm3dmm.io.atomic import atomic_write_json

    zi = torch.as_tensor(result.z_id, dtype=fm.dtype)
    ze = torch.as_tensor(result.z_exp, dtype=fm.dtype)
    verts, faces = fm.mesh(zi, ze, level)
    tpl = template_of(fm)
    uv = level_uv(tpl, level) if tpl is not None else None
    if uv is not None and len(uv) != verts.shape[1]:
        log.warning("level %d has %d points but %d UVs: meshes written without UVs", level, verts.shape[1], len(uv))
        uv = None
    if uv is None:
        log.warning("no template for the %s model: fitted meshes are written without UVs", fm.method)
    lset = lmk.from_template(tpl) if tpl is not None else None
    written = []
    for k, e in enumerate(expressions):
        v = np.asarray(verts[k], np.float64)
        if scans is not None:
            v = result.transforms[k].inverse().apply(v) / UNIT_FACTORS[scans[k].units]
        p = out_npz.with_name(f"{out_npz.stem}.{e}.obj")
        write_mesh(p, face_mesh(v, faces, uv))
        written.append(str(p))
        if lset is not None and len(lset) and uv is not None:
            pos = lmk.positions_on(lset, v, faces, uv)
            atomic_write_json(p.with_suffix(".landmarks.json"),
                              {"units": scans[k].units if scans is not None else "mm", "level": int(level),
                               "landmarks": {n: [float(x) for x in q] for n, q in zip(lset.names, pos)}})
    return written

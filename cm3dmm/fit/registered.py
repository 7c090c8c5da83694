"""Fits of registered meshes (template topology: vertex k of the target is template vertex k)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from cm3dmm.errors import InputError
from cm3dmm.fit.objective import Targets
from cm3dmm.fit.result import FitResult, codes_np
from cm3dmm.fit.scan import resolve_units
from cm3dmm.fit.solve import solve_codes
from cm3dmm.methods import FaceModel
from cm3dmm.rigid import Similarity

if TYPE_CHECKING:
    from cm3dmm.config import FitConfig


def fit_registered(model: FaceModel, targets: np.ndarray, cfg: FitConfig, shared: bool | None = None,
                   seed: int = 0) -> FitResult:
    """Fit codes to meshes in template topology. targets: (B, V, 3) mm (model frame)."""
    t = np.asarray(targets, dtype=np.float64)
    if t.ndim != 3 or t.shape[1:] != (model.n_vertices, 3):
        raise InputError(f"registered targets must have shape (B, {model.n_vertices}, 3), got {t.shape}")
    t0 = time.perf_counter()
    codes, info = solve_codes(model, Targets.vertices(t), cfg, shared=shared, seed=seed)
    secs = time.perf_counter() - t0
    zi, ze = codes.per_face()
    verts = model.vertices(zi.to(model.dtype), ze.to(model.dtype))
    ve = np.linalg.norm(verts - t, axis=-1)
    return FitResult(*codes_np(codes), verts, ve.mean(1), ve, [Similarity() for _ in t], codes.shared, info,
                     secs, {"solve_s": secs}, target_vertices=t)


def read_registered_meshes(paths: list[str], model: FaceModel, units: str) -> np.ndarray:
    """(B, V, 3) mm: the user's meshes given as registered (``cm3dmm fit --scan F --registered``),
    checked against the model's template (vertex count, triangles, finite coordinates)."""
    from cm3dmm.io.mesh import read_mesh

    out = []
    for p in paths:
        mesh = read_mesh(p)
        v = np.asarray(mesh.vertices, np.float64)
        if v.shape[0] != model.n_vertices:
            raise InputError(f"passed as registered, but the mesh has {v.shape[0]} vertices and the template "
                             f"{model.n_vertices}; fit it as a scan (without --registered)", p)
        if len(mesh.faces) and (mesh.faces.shape != model.faces.shape or
                                not np.array_equal(np.sort(mesh.faces, 1), np.sort(model.faces, 1))):
            raise InputError("passed as registered, but its triangles differ from the template's", p)
        if not np.isfinite(v).all():
            raise InputError("the mesh has NaN or infinite coordinates", p)
        factor, _ = resolve_units(v, units, p)
        out.append(v * factor)
    return np.stack(out)

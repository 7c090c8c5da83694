"""Geometry metrics for evaluating face models (pure functions on numpy arrays, millimetres).

Definitions (the evaluation protocol refers to these):

* **Vertex error** (meshes in correspondence): per vertex the Euclidean distance
  ``|pred_v - target_v|``; per face its mean ("mean vertex error", the quantity the paper's
  "MSE (mm)" column and the release's fitting loss report) and its root mean square
  ("RMSE"); aggregated over faces as the mean of the per-face means and the RMS over all
  vertices of all faces.
* **Point-to-surface distance**: the exact Euclidean distance from a point to the closest
  point of a triangle mesh (:func:`cm3dmm.geometry.closest_points_on_mesh`).
* **Chamfer distance** (symmetric, point-to-surface, mm): ``n`` points are sampled uniformly
  by area on each mesh with a fixed seed; ``d_pt`` are the distances of the prediction's
  samples to the target surface, ``d_tp`` of the target's samples to the predicted
  surface; ``chamfer = (mean d_pt + mean d_tp) / 2`` (unsquared distances; the mean of
  the two directions, so a perfect reconstruction scores 0 and the unit stays mm).
* **Normal consistency**: for each sample, ``|cos|`` between the face normal of the triangle
  it was sampled on and the face normal of the triangle holding its closest point on the
  other mesh; the mean over both directions' samples (1 = all normals agree; orientation
  independent).
* **F-score at a threshold** ``tau`` (1 mm by default): precision = fraction of prediction
  samples with ``d_pt < tau``, recall = fraction of target samples with ``d_tp < tau``,
  ``F = 2PR / (P + R)`` (0 when both are 0).
* **Per-region variants**: given a per-vertex label array of the *prediction's* (template)
  topology, vertex errors are averaged over each region's vertices; for the surface
  metrics each sample belongs to the region of the nearest corner (largest barycentric
  weight) of its own triangle (prediction samples) or of the predicted triangle holding its
  closest point (target samples), so only the prediction needs labels and the target may be
  any mesh (e.g. a scan).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from cm3dmm.geometry import closest_points_on_mesh, sample_surface
from cm3dmm.geometry import vertex_normals as _geometry_vertex_normals

log = logging.getLogger(__name__)

#: Default F-score threshold in mm.
FSCORE_THRESHOLD = 1.0
#: Default number of surface samples per mesh for the Chamfer-type metrics.
SURFACE_POINTS = 20000

#: threads of the closest-point queries behind the surface metrics (:func:`set_workers`, like
#: ``torch.set_num_threads``: the evaluate stage sets its job's thread count); results do not depend on it
_workers = 1


def set_workers(n: int) -> None:
    """Use ``n`` threads for the surface metrics' closest-point queries (same numbers, faster)."""
    global _workers
    _workers = max(1, int(n))


# --------------------------------------------------------------------------- validation
def _as_batch(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have the same shape, got {p.shape} and {t.shape}")
    if p.ndim not in (2, 3) or p.shape[-1] != 3:
        raise ValueError(f"expected (V, 3) or (B, V, 3) vertices, got {p.shape}")
    if not (np.isfinite(p).all() and np.isfinite(t).all()):
        raise ValueError("vertices contain NaN or infinite values")
    return (p[None], t[None]) if p.ndim == 2 else (p, t)


def _check_labels(labels: np.ndarray, names, n_vertices: int) -> tuple[np.ndarray, list[str]]:
    lab = np.asarray(labels)
    if lab.shape != (n_vertices,) or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be an integer array of shape ({n_vertices},), got {lab.shape} {lab.dtype}")
    names = list(names)
    if lab.max(initial=-1) >= len(names):
        raise ValueError(f"labels reach {int(lab.max())} but only {len(names)} region names are given")
    return lab, names


# --------------------------------------------------------------------------- vertex errors
@dataclass
class VertexError:
    """Vertex errors of B faces in correspondence (mm)."""

    per_vertex: np.ndarray  #: (B, V) Euclidean distance per vertex
    mean: np.ndarray  #: (B,) mean vertex error per face
    rmse: np.ndarray  #: (B,) root-mean-square vertex error per face

    @property
    def mean_all(self) -> float:
        """Mean of the per-face mean errors (= mean over all vertices: equal V per face)."""
        return float(self.mean.mean())

    @property
    def rmse_all(self) -> float:
        """Root mean square over every vertex of every face."""
        return float(np.sqrt(np.mean(self.per_vertex**2)))


def vertex_distances(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Euclidean distance per vertex. pred, target: (..., V, 3) -> (..., V)."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(target, dtype=np.float64)
    if p.shape != t.shape or p.shape[-1:] != (3,):
        raise ValueError(f"pred and target must share a (..., V, 3) shape, got {p.shape} and {t.shape}")
    return np.linalg.norm(p - t, axis=-1)


def vertex_error(pred: np.ndarray, target: np.ndarray) -> VertexError:
    """Mean vertex error and RMSE of faces in correspondence.

    pred, target: (V, 3) or (B, V, 3) mm (a single face is treated as B = 1).
    """
    p, t = _as_batch(pred, target)
    d = np.linalg.norm(p - t, axis=-1)
    return VertexError(per_vertex=d, mean=d.mean(axis=1), rmse=np.sqrt((d**2).mean(axis=1)))


def region_vertex_error(
    pred: np.ndarray, target: np.ndarray, labels: np.ndarray, names
) -> dict[str, VertexError]:
    """:func:`vertex_error` restricted to each region.

    pred, target: (V, 3) or (B, V, 3); labels: (V,) int, ``-1`` = no region; names: region
    names indexed by label. Returns ``{name: VertexError}`` for regions with >= 1 vertex.
    """
    p, t = _as_batch(pred, target)
    lab, names = _check_labels(labels, names, p.shape[1])
    out = {}
    for r, name in enumerate(names):
        sel = lab == r
        if sel.any():
            out[name] = vertex_error(p[:, sel], t[:, sel])
    return out


# --------------------------------------------------------------------------- surfaces
def face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit face normals (right-handed corner order). vertices (V, 3), faces (F, 3) -> (F, 3).

    Degenerate triangles get a zero normal.
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces)
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return n / np.where(norm > 0, norm, 1.0)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted unit vertex normals in float64. vertices (V, 3), faces (F, 3) -> (V, 3)."""
    return _geometry_vertex_normals(np.asarray(vertices, dtype=np.float64), faces)


def point_to_surface(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Exact distance of each point to a triangle mesh. points (M, 3) -> (M,) mm."""
    return np.asarray(closest_points_on_mesh(points, vertices, faces).dist, dtype=np.float64)


def fscore(d_pred_to_target: np.ndarray, d_target_to_pred: np.ndarray,
           threshold: float = FSCORE_THRESHOLD) -> tuple[float, float, float]:
    """F-score from two point-to-surface distance sets. Returns (fscore, precision, recall).

    precision = mean(d_pred_to_target < threshold); recall = mean(d_target_to_pred < threshold);
    an empty set counts as 0.
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be > 0, got {threshold}")
    a = np.asarray(d_pred_to_target)
    b = np.asarray(d_target_to_pred)
    precision = float((a < threshold).mean()) if a.size else 0.0
    recall = float((b < threshold).mean()) if b.size else 0.0
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return f, precision, recall


@dataclass
class SurfaceSamples:
    """Area-weighted samples of both meshes and their projections onto the other mesh."""

    d_pt: np.ndarray  #: (N,) distance of prediction samples to the target surface
    d_tp: np.ndarray  #: (N,) distance of target samples to the predicted surface
    cos_pt: np.ndarray  #: (N,) |cos| of the normals at prediction samples and their projections
    cos_tp: np.ndarray  #: (N,) |cos| of the normals at target samples and their projections
    region_pt: np.ndarray | None = None  #: (N,) region label of each prediction sample
    region_tp: np.ndarray | None = None  #: (N,) region label of each target sample


def sample_and_project(
    pred_vertices: np.ndarray,
    pred_faces: np.ndarray,
    target_vertices: np.ndarray,
    target_faces: np.ndarray | None = None,
    n_points: int = SURFACE_POINTS,
    seed: int = 0,
    labels: np.ndarray | None = None,
) -> SurfaceSamples:
    """Sample ``n_points`` per mesh (area-weighted, ``seed``) and project them onto the other.

    pred_vertices (V, 3), pred_faces (F, 3); target_vertices (W, 3), target_faces (G, 3)
    (default: ``pred_faces``); labels: optional (V,) region labels of the prediction.
    The target's samples use ``seed`` and the prediction's ``seed + 1``, so every method
    evaluated with one seed is compared on the same target samples.
    """
    pv = np.asarray(pred_vertices, dtype=np.float64)
    tv = np.asarray(target_vertices, dtype=np.float64)
    pf = np.asarray(pred_faces)
    tf = pf if target_faces is None else np.asarray(target_faces)
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    for name, v in (("pred_vertices", pv), ("target_vertices", tv)):
        if v.ndim != 2 or v.shape[1] != 3:
            raise ValueError(f"{name} must have shape (V, 3), got {v.shape}")
        if not np.isfinite(v).all():
            raise ValueError(f"{name} contain NaN or infinite values")
    lab = None
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != (len(pv),):
            raise ValueError(f"labels must have shape ({len(pv)},), got {lab.shape}")

    tri_t, bary_t = sample_surface(tv, tf, n_points, np.random.default_rng(seed))
    tri_p, bary_p = sample_surface(pv, pf, n_points, np.random.default_rng(seed + 1))
    pts_t = np.einsum("nk,nki->ni", bary_t.astype(np.float64), tv[tf[tri_t]])
    pts_p = np.einsum("nk,nki->ni", bary_p.astype(np.float64), pv[pf[tri_p]])
    proj_pt = closest_points_on_mesh(pts_p, tv, tf, workers=_workers)  # prediction samples -> target surface
    proj_tp = closest_points_on_mesh(pts_t, pv, pf, workers=_workers)  # target samples -> predicted surface
    n_p, n_t = face_normals(pv, pf), face_normals(tv, tf)
    cos_pt = np.abs(np.einsum("ni,ni->n", n_p[tri_p], n_t[proj_pt.tri]))
    cos_tp = np.abs(np.einsum("ni,ni->n", n_t[tri_t], n_p[proj_tp.tri]))
    region_pt = region_tp = None
    if lab is not None:
        region_pt = lab[pf[tri_p, np.argmax(bary_p, axis=1)]]
        region_tp = lab[pf[proj_tp.tri, np.argmax(proj_tp.bary, axis=1)]]
    return SurfaceSamples(
        d_pt=np.asarray(proj_pt.dist, np.float64), d_tp=np.asarray(proj_tp.dist, np.float64),
        cos_pt=cos_pt, cos_tp=cos_tp, region_pt=region_pt, region_tp=region_tp,
    )


@dataclass
class SurfaceMetrics:
    """Symmetric surface metrics between a prediction and a target (mm)."""

    chamfer: float  #: (pred_to_target + target_to_pred) / 2
    pred_to_target: float  #: mean distance of prediction samples to the target surface
    target_to_pred: float  #: mean distance of target samples to the predicted surface
    normal_consistency: float  #: mean |cos| between corresponding normals, both directions
    fscore: float  #: at ``threshold``
    precision: float
    recall: float
    threshold: float  #: mm
    n_points: int  #: samples per mesh (or per region: prediction + target samples)
    regions: dict[str, "SurfaceMetrics"] = field(default_factory=dict)  #: per-region variants


def metrics_from_samples(
    s: SurfaceSamples, threshold: float = FSCORE_THRESHOLD, names=None
) -> SurfaceMetrics:
    """Aggregate :class:`SurfaceSamples` into :class:`SurfaceMetrics` (and per-region ones)."""

    def summarise(d_pt, d_tp, c_pt, c_tp) -> SurfaceMetrics:
        a = float(d_pt.mean()) if d_pt.size else float("nan")
        b = float(d_tp.mean()) if d_tp.size else float("nan")
        cos = np.concatenate([c_pt, c_tp])
        f, p, r = fscore(d_pt, d_tp, threshold)
        return SurfaceMetrics(
            chamfer=(a + b) / 2, pred_to_target=a, target_to_pred=b,
            normal_consistency=float(cos.mean()) if cos.size else float("nan"),
            fscore=f, precision=p, recall=r, threshold=float(threshold),
            n_points=int(max(d_pt.size, d_tp.size)),
        )

    out = summarise(s.d_pt, s.d_tp, s.cos_pt, s.cos_tp)
    if names is not None and s.region_pt is not None:
        for r, name in enumerate(names):
            a, b = s.region_pt == r, s.region_tp == r
            if a.any() or b.any():
                out.regions[name] = summarise(s.d_pt[a], s.d_tp[b], s.cos_pt[a], s.cos_tp[b])
    return out


def surface_metrics(
    pred_vertices: np.ndarray,
    pred_faces: np.ndarray,
    target_vertices: np.ndarray,
    target_faces: np.ndarray | None = None,
    n_points: int = SURFACE_POINTS,
    seed: int = 0,
    threshold: float = FSCORE_THRESHOLD,
    labels: np.ndarray | None = None,
    names=None,
) -> SurfaceMetrics:
    """Chamfer distance, normal consistency and F-score between two meshes (see module doc).

    pred (V, 3) + (F, 3); target (W, 3) + (G, 3) (default: the prediction's faces);
    labels (V,) + names: adds per-region metrics in ``.regions``.
    """
    if labels is not None:
        if names is None:
            raise ValueError("labels given without region names")
        _check_labels(labels, names, len(np.asarray(pred_vertices)))
    s = sample_and_project(pred_vertices, pred_faces, target_vertices, target_faces, n_points, seed, labels)
    return metrics_from_samples(s, threshold, names if labels is not None else None)


def chamfer_distance(
    pred_vertices: np.ndarray,
    pred_faces: np.ndarray,
    target_vertices: np.ndarray,
    target_faces: np.ndarray | None = None,
    n_points: int = SURFACE_POINTS,
    seed: int = 0,
) -> float:
    """Symmetric point-to-surface Chamfer distance in mm (mean of the two directions)."""
    return surface_metrics(pred_vertices, pred_faces, target_vertices, target_faces, n_points, seed).chamfer

"""Correspondences of a raw scan with the current fit, both ways, and the landmark pose.

scan -> model: each (sampled) scan point's closest point on the fitted surface (a barycentric
target on a model triangle); model -> scan: each model vertex's closest scan point, where the
scan covers the model. Both are point-to-plane residuals (plus :data:`P2P_WEIGHT` x
point-to-point) and weigh the same in total; pairs that cannot be right are dropped (see
:func:`scan_targets`).
"""

from __future__ import annotations

import numpy as np
import torch

from cm3dmm.errors import InputError
from cm3dmm.fit.objective import Targets
from cm3dmm.fit.scan import Scan
from cm3dmm.geometry import boundary_vertices, vertex_normals  # boundary_vertices: also cm3dmm.fit.*
from cm3dmm.methods import FaceModel
from cm3dmm.rigid import Similarity, umeyama

#: weight of the point-to-point residual added to the point-to-plane one
P2P_WEIGHT = 0.1
#: total weight of the landmark pairs (each direction of the closest points weighs 1)
LANDMARK_WEIGHT = 10.0
#: model->scan pairs whose offset is mostly tangential to the scan (the closest scan point lies on
#: the scan's border: the model vertex is where the scan has no data) are dropped when the
#: tangential part exceeds this many times the scan's point spacing (0 = keep them)
BORDER_SPACINGS = 2.0
#: pairs whose model and scan normals disagree by more than this (cosine of the angle,
#: unoriented) are dropped (0 = keep them)
NORMAL_AGREEMENT = 0.5
#: scan->model projections are searched within this factor times the (1 - trim) quantile of the
#: nearest-vertex distances (at least PROJECT_MIN_MM); farther pairs are trimmed anyway
PROJECT_FACTOR = 1.5
PROJECT_MIN_MM = 1.0
#: a model vertex counts as covered by the scan within COVER_MEDIANS x the median scan->model
#: distance + COVER_MARGIN_MM of it
COVER_MEDIANS = 3.0
COVER_MARGIN_MM = 1.0
#: barycentric weights below this count as zero (a projection on an edge or corner)
BARY_EPS = 1e-6
#: a filter (normals, border, trimming) is applied only when it leaves at least this many pairs
MIN_PAIRS = 3


def scan_targets(scan_pts: np.ndarray, full_pts: np.ndarray, scan: Scan, verts: np.ndarray, faces: np.ndarray,
                  on_boundary: np.ndarray, trim: float, scan_tree,
                  landmarks: tuple[np.ndarray, np.ndarray] | None = None, spacing: float = 0.0,
                  scan_normals: np.ndarray | None = None) -> tuple[Targets, dict]:
    """Correspondences of one scan with the current fit ``verts`` (V, 3).

    scan_pts: (P', 3) the scan points used for scan->model pairs; full_pts: (P, 3) all scan
    points (both already in the model frame); scan_tree: nearest neighbours of the full cloud
    (point clouds only); spacing: the scan's typical point spacing (mm; 0 = unknown);
    scan_normals: (P', 3) unit normals at ``scan_pts`` (model frame) or None.

    Pairs are dropped when they cannot be right: scan points projecting onto the model region's
    boundary (the scan extends beyond the model), pairs whose normals disagree by more than
    :data:`NORMAL_AGREEMENT`, model vertices whose closest scan point lies on the scan's border
    (the offset mostly tangential: the scan has no data there, :data:`BORDER_SPACINGS`), and the
    worst ``trim`` fraction of each direction.
    """
    from scipy.spatial import cKDTree

    from cm3dmm.geometry import closest_points_on_mesh

    # nearest-vertex distances bound the surface distances; far pairs are trimmed anyway
    dv = cKDTree(verts).query(scan_pts)[0]
    far = float(np.quantile(dv, 1.0 - trim)) if trim > 0 else float(dv.max())
    bound = max(far, PROJECT_MIN_MM) * PROJECT_FACTOR
    proj = closest_points_on_mesh(scan_pts, verts, faces, max_distance=bound)
    tri_v = faces[proj.tri]  # (P, 3)
    vn = vertex_normals(verts, faces)
    # projections onto the boundary of the model region: the scan extends beyond the model
    nz = proj.bary > BARY_EPS
    edge = (on_boundary[tri_v] | ~nz).all(1)
    keep = ~edge
    d = proj.dist
    if NORMAL_AGREEMENT > 0 and scan_normals is not None:
        nm = np.einsum("pk,pkc->pc", proj.bary, vn[tri_v])
        nm /= np.maximum(np.linalg.norm(nm, axis=1, keepdims=True), 1e-12)
        agree = np.abs((nm * scan_normals).sum(1)) >= NORMAL_AGREEMENT
        if (keep & agree).sum() >= MIN_PAIRS:
            keep &= agree
    if keep.sum() >= MIN_PAIRS:
        thr = np.quantile(d[keep], 1.0 - trim) if trim > 0 else np.inf
        keep &= d <= thr
    s2m_n = int(keep.sum())
    vids_a = tri_v[keep]
    bary_a = proj.bary[keep]
    pts_a = scan_pts[keep]
    na = np.einsum("pk,pkc->pc", bary_a, vn[vids_a])
    na /= np.maximum(np.linalg.norm(na, axis=1, keepdims=True), 1e-12)
    # model -> scan where the scan covers the model
    if scan.faces is not None:
        reach = np.median(d[keep]) * COVER_MEDIANS + COVER_MARGIN_MM if keep.any() else None
        back = closest_points_on_mesh(verts, full_pts, scan.faces, max_distance=reach)
        bd, bq = back.dist, back.closest
        fn = vertex_normals(full_pts, scan.faces)
        nb = np.einsum("pk,pkc->pc", back.bary, fn[scan.faces[back.tri]])
    else:
        bd, j = scan_tree.query(verts)
        bq = full_pts[j]
        nb = scan_tree.normals(j)
    nb /= np.maximum(np.linalg.norm(nb, axis=1, keepdims=True), 1e-12)
    cover = np.median(d[keep]) * COVER_MEDIANS + COVER_MARGIN_MM if keep.any() else np.inf
    mk = (bd <= cover) & ~on_boundary
    off = bq - verts
    along = np.abs((off * nb).sum(1))
    if BORDER_SPACINGS > 0 and spacing > 0:  # closest scan point on the scan's border: no data here
        tang = np.sqrt(np.maximum((off * off).sum(1) - along ** 2, 0.0))
        inside = tang <= BORDER_SPACINGS * spacing
        if (mk & inside).sum() >= MIN_PAIRS:
            mk &= inside
    if NORMAL_AGREEMENT > 0:
        agree = np.abs((vn * nb).sum(1)) >= NORMAL_AGREEMENT
        if (mk & agree).sum() >= MIN_PAIRS:
            mk &= agree
    if mk.sum() >= MIN_PAIRS and trim > 0:
        mk &= bd <= np.quantile(bd[mk], 1.0 - trim)
    vid_b = np.flatnonzero(mk)
    pts = np.concatenate([pts_a, bq[mk]])
    vids = np.concatenate([vids_a, np.repeat(vid_b[:, None], 3, 1)])
    bary = np.concatenate([bary_a, np.tile([1.0, 0.0, 0.0], (len(vid_b), 1))])
    normals = np.concatenate([na, nb[mk]])
    # both directions weigh the same in total
    wa = np.full(len(pts_a), 1.0 / max(len(pts_a), 1))
    wb = np.full(len(vid_b), 1.0 / max(len(vid_b), 1))
    w = np.concatenate([wa, wb])
    if landmarks is not None:  # landmark pairs: point-to-point only (zero normal), anchor sliding
        lv, lp = landmarks
        pts = np.concatenate([pts, lp])
        vids = np.concatenate([vids, np.repeat(lv[:, None], 3, 1)])
        bary = np.concatenate([bary, np.tile([1.0, 0.0, 0.0], (len(lv), 1))])
        normals = np.concatenate([normals, np.zeros((len(lv), 3))])
        w = np.concatenate([w, np.full(len(lv), LANDMARK_WEIGHT / len(lv))])
    t = Targets(torch.as_tensor(pts)[None], torch.as_tensor(vids.astype(np.int64))[None],
                torch.as_tensor(bary)[None], torch.as_tensor(w)[None], torch.as_tensor(normals)[None], p2p=P2P_WEIGHT)
    stats = {"scan_to_model": s2m_n, "model_to_scan": int(len(vid_b)),
             "trimmed_rms_mm": float(np.sqrt(np.mean(d[keep] ** 2))) if keep.any() else float("nan")}
    return t, stats


def landmark_pose(scan: Scan, model: FaceModel, with_scale: bool) -> Similarity | None:
    """The similarity (rotation only unless ``with_scale``) that maps the scan's landmarks onto the
    mean face's (Umeyama), or None without landmarks; at least 3 shared names."""
    if not scan.landmarks:
        return None
    common = [k for k in scan.landmarks if k in model.landmarks]
    if len(common) < 3:
        raise InputError(f"the landmarks share only {len(common)} names with the template's "
                         f"({sorted(model.landmarks)[:8]}...); need at least 3", scan.landmarks_path or scan.path)
    src = np.stack([scan.landmarks[k] for k in common])
    dst = model.mean[[model.landmarks[k] for k in common]]
    return umeyama(src, dst, with_scale=with_scale)

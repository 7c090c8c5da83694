"""Fits of raw scans: any vertex count, no correspondence given.

Units resolved (:func:`cm3dmm.fit.scan.resolve_units`), a rigid (+ optional scale) pose from
landmarks (Umeyama) or a robust initialisation refined by trimmed ICP against the mean face, then
``scan_iters`` alternations of (correspondences -> codes + pose): scan->model closest points on
the current fit (trimmed by ``cfg.trim``, boundary projections dropped) plus model->scan closest
points where the scan covers the model (:func:`cm3dmm.fit.correspond.scan_targets`). The code prior
is annealed from :data:`SCAN_PRIOR_START` to ``max(fit.prior_weight, fit.scan_prior_floor)``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import TYPE_CHECKING, Sequence

import numpy as np

from cm3dmm import scancheck
from cm3dmm.fit.correspond import boundary_vertices, landmark_pose, scan_targets
from cm3dmm.fit.objective import Codes, SolveInfo, Targets, _Problem
from cm3dmm.fit.result import FitResult, codes_np
from cm3dmm.fit.scan import CloudNormals, PosedCloud, Scan, scan_spacing
from cm3dmm.fit.solve import solve_codes
from cm3dmm.methods import FaceModel
from cm3dmm.rigid import Similarity, align_to_reference, trimmed_icp

if TYPE_CHECKING:
    from cm3dmm.config import FitConfig

log = logging.getLogger(__name__)

#: points and exact trimmed-ICP iterations of the rigid initialisation's last refinement
RIGID_POINTS = 2000
RIGID_REFINE_ITERS = 15
#: the rigid initialisation trims at least this fraction of its pairs (whatever fit.trim is)
RIGID_TRIM_MIN = 0.1
#: optimisers without the joint pose (lbfgs, adam): trimmed-ICP iterations after each code fit
RIGID_ALT_ITERS = 10
#: prior weight of the first alternation (annealed geometrically to fit.prior_weight)
SCAN_PRIOR_START = 1e-2
# ``fit.scan_prior_floor`` (cm3dmm.config.FitConfig): the prior weight of the last alternation at least.
# Without it the parts a partial scan misses drift as the prior fades (PCA, 2 faces of a mouth-hole scan,
# aligned error 3.58 mm at 0, 2.75 at 1e-4, 2.55 at 1e-3, registered 0.86; full scans started at the
# truth: 1.42 mm at 1e-6 and at 1e-4, 1.62 at 1e-3; benchmarks/README.md "Scan fits (issue 14)"). 0 by
# default: the weight's meaning depends on the model's code spread, and tests/test_fit.py's model (codes
# 40 prior std out) no longer recovers its codes at 1e-4.
#: Levenberg-Marquardt iterations per alternation at least
SCAN_INNER_MIN = 3
#: a new random subset of fit.scan_points scan points every alternation
SCAN_RESAMPLE = True
#: per-vertex errors (distance to the scan) above UNCOVERED_MEDIANS x their median and above
#: UNCOVERED_MIN_MM are NaN: the scan does not cover that vertex
UNCOVERED_MEDIANS = 3.0
UNCOVERED_MIN_MM = 2.0
#: a fit whose mean trimmed distance to the scan exceeds this (mm) is reported with a warning
WARN_DISTANCE_MM = 5.0


def fit_scans(model: FaceModel, scans: Sequence[Scan], cfg: FitConfig, seed: int = 0) -> FitResult:
    """Fit codes + a rigid (+ scale when ``cfg.scale``) pose per scan (the scans of one subject).

    Returns the fit in the model frame; ``transforms[b]`` maps scan b (mm) into it.
    """
    from scipy.spatial import cKDTree

    from cm3dmm.geometry import closest_points_on_mesh

    t_start = time.perf_counter()
    rng = np.random.default_rng(seed)
    faces = np.asarray(model.faces)
    on_b = boundary_vertices(faces, model.n_vertices)
    with_scale = bool(cfg.scale)
    max_pts = int(cfg.scan_points) or None
    warnings: list[str] = []
    subs, poses, trees, cloud_n, spacing = [], [], [], [], []
    for scan in scans:
        pts = scan.points
        if max_pts and len(pts) > max_pts:
            pts = pts[rng.choice(len(pts), max_pts, replace=False)]
        subs.append(pts)
        trees.append(cKDTree(scan.points) if scan.faces is None else None)
        spacing.append(scan_spacing(scan, trees[-1], rng))
        cloud_n.append(None if scan.faces is not None else CloudNormals(scan.points, trees[-1], scan.normals))
        init = landmark_pose(scan, model, with_scale)
        # a short exact refinement: the pose is solved again jointly with the codes below
        res = align_to_reference(pts, model.mean, faces, trim=max(cfg.trim, RIGID_TRIM_MIN), with_scale=with_scale,
                                 init=init, seed=seed, max_points=RIGID_POINTS, refine_iters=RIGID_REFINE_ITERS)
        log.info("%s: initial pose, trimmed RMS %.2f mm", scan.name, res.rmse)
        scancheck.check_scan(scan, res.transform.apply(pts), model.mean, seed=seed)  # a face? (issue 13)
        poses.append(res.transform)
    t_rigid = time.perf_counter() - t_start
    b = len(scans)
    shared = cfg.mode == "per-subject" and model.shared_identity and b > 1
    zi, ze = model.mean_codes(b)
    codes = Codes(zi[:1].clone() if shared else zi, ze, shared)
    info_total = SolveInfo()
    stats = []
    n_alt = max(cfg.scan_iters, 1)
    inner = max(SCAN_INNER_MIN, int(math.ceil(cfg.max_iter / n_alt)))
    for it in range(n_alt):
        # the code prior is annealed from SCAN_PRIOR_START to fit.prior_weight: the first
        # alternations, whose correspondences are the least reliable, stay close to the prior mean
        lam1 = max(cfg.prior_weight, cfg.scan_prior_floor)
        lam0 = max(SCAN_PRIOR_START, lam1)
        lam = lam0 * (lam1 / lam0) ** (it / max(n_alt - 1, 1)) if lam1 > 0 else 0.0
        # squared loss: the trimming of the correspondences is the robust part
        sub_cfg = dataclasses.replace(cfg, max_iter=inner, points=0, loss="squared", prior_weight=lam)
        if it > 0 and SCAN_RESAMPLE:  # a fresh random subset of the scan points each alternation
            for k, scan in enumerate(scans):
                if max_pts and len(scan.points) > max_pts:
                    subs[k] = scan.points[rng.choice(len(scan.points), max_pts, replace=False)]
        zf, zef = codes.per_face()
        verts = model.vertices(zf.to(model.dtype), zef.to(model.dtype))
        parts, stats = [], []
        for k, scan in enumerate(scans):
            tree = None if trees[k] is None else PosedCloud(trees[k], poses[k], cloud_n[k])
            lm = None
            common = [n for n in scan.landmarks if n in model.landmarks]
            if len(common) >= 3:
                lm = (np.array([model.landmarks[n] for n in common]),
                      poses[k].apply(np.stack([scan.landmarks[n] for n in common])))
            sn = None
            if tree is not None:  # normals at the subset's points (their nearest cloud points)
                sn = poses[k].apply_vectors(cloud_n[k][trees[k].query(subs[k])[1]])
            tg, st = scan_targets(poses[k].apply(subs[k]), poses[k].apply(scan.points), scan, verts[k], faces,
                                  on_b, cfg.trim, tree, lm, spacing=spacing[k], scan_normals=sn)
            parts.append(tg)
            stats.append(st)
        targets = Targets.stack(parts)
        joint = cfg.optimizer == "lm"
        start = codes.with_pose() if joint else codes
        codes, info = solve_codes(model, targets, sub_cfg, codes=start, shared=shared, seed=seed)
        if joint:  # fold the solved rigid motion into the poses
            centre = _Problem.centre_of(targets).numpy()
            for k in range(b):
                r = codes.rot[k].numpy()
                motion = Similarity(r, centre[k] - r @ centre[k] + codes.trans[k].numpy())
                poses[k] = motion.compose(poses[k])
            codes = Codes(codes.z_id, codes.z_exp, codes.shared)
        info_total.iterations += info.iterations
        info_total.jacobians += info.jacobians
        info_total.evaluations += info.evaluations
        info_total.history += info.history
        info_total.objective = info.objective
        info_total.status = info.status
        if joint:
            continue
        # rigid refinement against the new fit (optimisers without the joint pose)
        zf, zef = codes.per_face()
        verts = model.vertices(zf.to(model.dtype), zef.to(model.dtype))
        for k in range(b):
            res = trimmed_icp(subs[k], verts[k], faces, poses[k], trim=cfg.trim, max_iter=RIGID_ALT_ITERS,
                              with_scale=with_scale)
            poses[k] = res.transform
    zf, zef = codes.per_face()
    verts = model.vertices(zf.to(model.dtype), zef.to(model.dtype))
    errors, verr, tverts = [], [], []
    for k, scan in enumerate(scans):
        moved = poses[k].apply(subs[k])
        proj = closest_points_on_mesh(moved, verts[k], faces)
        d = np.sort(proj.dist)[: max(1, int(round(len(moved) * (1 - cfg.trim))))]
        errors.append(float(d.mean()))
        full = poses[k].apply(scan.points)
        if scan.faces is not None:
            back = closest_points_on_mesh(verts[k], full, scan.faces)
            bd, bq = back.dist, back.closest
        else:
            bd, j = PosedCloud(trees[k], poses[k], cloud_n[k]).query(verts[k])
            bq = full[j]
        ve = bd.copy()
        ve[bd > max(UNCOVERED_MEDIANS * np.median(bd), UNCOVERED_MIN_MM)] = np.nan
        verr.append(ve)
        tverts.append(bq)
        if errors[-1] > WARN_DISTANCE_MM:
            warnings.append(f"{scan.name}: the fit leaves a mean trimmed distance of {errors[-1]:.2f} mm to the "
                            "scan (alignment or coverage problem?)")
            log.warning(warnings[-1])
    secs = time.perf_counter() - t_start
    zi_np, ze_np = codes_np(codes)
    res = FitResult(zi_np, ze_np, verts, np.asarray(errors), np.asarray(verr), poses, shared, info_total, secs,
                    {"rigid_init_s": t_rigid, "total_s": secs}, warnings, np.asarray(tverts))
    res.timings["correspondences"] = stats
    return res

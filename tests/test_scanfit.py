"""Scan fits: the sparse normal equations of scan targets against autograd, the synthetic scans
of the scan-fit table (pose, units, coverage), the pose errors, and the table itself."""

import math

import numpy as np
import pytest
import torch

from cm3dmm.config import FitConfig
from cm3dmm.fit import Codes, Targets
from cm3dmm.fit.objective import _Problem
from test_fit import _neural, _subject_codes

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def neural():
    return _neural()


def _scan_targets(fm, rng, k=60, normals=True):
    """Random barycentric targets on random triangles of the template (one face)."""
    faces = np.asarray(fm.faces)
    tri = rng.integers(0, len(faces), k)
    bary = rng.dirichlet([1, 1, 1], k)
    bary[: k // 4] = [1.0, 0.0, 0.0]  # some single-vertex targets (model -> scan pairs)
    pts = rng.normal(0, 20, (k, 3)) + np.asarray(fm.mean)[faces[tri, 0]]
    nrm = rng.normal(size=(k, 3))
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    w = rng.uniform(0.5, 1.5, k)
    return Targets(torch.as_tensor(pts)[None], torch.as_tensor(faces[tri].astype(np.int64))[None],
                   torch.as_tensor(bary)[None], torch.as_tensor(w)[None],
                   torch.as_tensor(nrm)[None] if normals else None, p2p=0.1 if normals else 0.0)


@pytest.mark.parametrize("normals", [True, False])
@pytest.mark.parametrize("delta", [None, 0.05])
def test_scan_normal_equations_match_autograd(neural, normals, delta):
    """A = J^T W J, g = J^T W r of scan targets (sparse rows, pose columns) = autograd's Jacobian
    of the weighted residuals, in float64."""
    rng = np.random.default_rng(1)
    t = _scan_targets(neural, rng, normals=normals)
    prob = _Problem(neural, t, prior_weight=0.0, delta=delta)
    zi, ze = _subject_codes(neural, n_expr=1, seed=2, scale=0.3)
    codes = Codes(zi.double(), ze.double(), shared=False).with_pose()
    codes.rot[0] = torch.as_tensor(_rotation([0.3, -1.0, 0.2], 12.0))
    codes.trans[0] = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    a, g, e = prob.normal_equations(codes)

    di, de = neural.id_dim, neural.exp_dim
    tg = prob.targets_at(codes)
    c = prob.center[0]
    w = (t.weights[0] / prob.wsum[0]).double()

    def residuals(p):  # p: [z_id, z_exp, dw, dt]
        x = neural.decode(prob.ctx, p[None, :di].to(neural.dtype), p[None, di:di + de].to(neural.dtype))[0]
        pred = (x.double()[prob.local[0]] * t.bary[0][..., None]).sum(1)
        th = p[di + de:di + de + 3]
        kx = torch.zeros(3, 3, dtype=torch.float64)
        kx = kx.index_put((torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([1, 2, 0, 2, 0, 1])),
                          torch.stack([-th[2], th[1], th[2], -th[0], -th[1], th[0]]))
        rd = torch.linalg.matrix_exp(kx)
        pts = (tg.points[0] - c) @ rd.T + c + p[di + de + 3:]
        d = pred - pts
        if t.normals is None:
            return d
        n = tg.normals[0] @ rd.T
        return torch.cat([(d * n).sum(-1, keepdim=True), t.p2p * d], -1)

    p0 = torch.cat([zi[0].double(), ze[0].double(), torch.zeros(6, dtype=torch.float64)])
    r0 = residuals(p0)
    j = torch.autograd.functional.jacobian(residuals, p0)  # (K, c, D + 6)
    ww = w.clone()
    if delta is not None:
        ww = ww / (2 * ((r0 * r0).sum(-1) + delta ** 2).sqrt())
    jw = (j * ww.sqrt()[:, None, None]).reshape(-1, j.shape[-1])
    rw = (r0 * ww.sqrt()[:, None]).reshape(-1)
    if normals:  # the normals' rotation is held fixed in Gauss-Newton: compare the code columns only
        jw_ref = torch.autograd.functional.jacobian(lambda q: (residuals(torch.cat([q, p0[di + de:]]))
                                                               * ww.sqrt()[:, None]).reshape(-1), p0[:di + de])
        np.testing.assert_allclose(a[0, :di + de, :di + de].numpy(), (jw_ref.T @ jw_ref).numpy(), rtol=2e-4, atol=1e-8)
    else:
        np.testing.assert_allclose(a[0].numpy(), (jw.T @ jw).numpy(), rtol=2e-4, atol=1e-8)
        np.testing.assert_allclose(g[0].numpy(), (jw.T @ rw).numpy(), rtol=2e-4, atol=1e-8)
    np.testing.assert_allclose(g[0, :di + de].numpy(), (jw.T @ rw)[:di + de].numpy(), rtol=2e-4, atol=1e-8)
    np.testing.assert_allclose(float(e[0]), float((rw * rw).sum()), rtol=1e-9)


def _rotation(axis, degrees):
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = math.radians(degrees)
    return np.eye(3) + math.sin(t) * k + (1 - math.cos(t)) * (k @ k)


# ------------------------------------------------------------------------ synthetic scans + table
def _face(n=14):
    """A face-like grid (mm, z out of the face) with template-style landmarks."""
    from test_fit import _grid_template

    t = _grid_template(n)
    v = np.asarray(t.mean, np.float64)
    lm = {"nose_tip": int(np.argmax(v[:, 2])), "mouth_corner_L": int(np.argmin(np.linalg.norm(v - [25, -45, 0], axis=1)
                                                                            + 0 * v[:, 2])),
          "mouth_corner_R": int(np.argmin(np.linalg.norm(v[:, :2] - [-25, -45], axis=1)))}
    lm["mouth_corner_L"] = int(np.argmin(np.linalg.norm(v[:, :2] - [25, -45], axis=1)))
    return v, np.asarray(t.faces), lm


def test_make_scan_pose_units_and_coverage():
    from cm3dmm.config import ScanFitConfig
    from cm3dmm.scanfit_eval import make_scan, pose_errors, variant_triangles

    v, f, lm = _face()
    sc = ScanFitConfig(points=3000, noise_mm=0.0)
    s = make_scan(v, f, "normals", lm, sc, np.random.default_rng(0))
    assert s.units == "m" and s.points_mm.shape == (3000, 3) and s.normals is not None
    # noise-free points, moved back by the true pose, lie on the face's surface
    from cm3dmm.geometry import closest_points_on_mesh

    back = s.pose.inverse().apply(s.points_mm)
    assert closest_points_on_mesh(back, v, f).dist.max() < 1e-5  # float32 barycentrics
    ang = np.degrees(np.arccos(np.clip((np.trace(s.pose.rotation) - 1) / 2, -1, 1)))
    assert sc.rot_min - 1e-9 <= ang <= sc.rot_max + 1e-9
    # the exact inverse pose has no pose error; a 2-degree / 3 mm error is measured as such
    assert pose_errors(s.pose.inverse(), s.pose, v.mean(0)) == pytest.approx((0.0, 0.0), abs=1e-6)
    from cm3dmm.rigid import Similarity

    off = Similarity(_rotation([0, 0, 1], 2.0), [3.0, 0, 0])
    ang, tr = pose_errors(off.compose(s.pose.inverse()), s.pose, v.mean(0))
    assert ang == pytest.approx(2.0, abs=1e-9)
    c = v.mean(0)
    assert tr == pytest.approx(np.linalg.norm(off.apply(c[None])[0] - c), rel=1e-9)
    # partial variants: the side scan keeps only triangles right of the nose tip, the mouth hole
    # misses the triangles around the mouth corners' midpoint, the frontal view the steep ones
    side = variant_triangles(v, f, "side", lm)
    cen = v[f].mean(1)
    assert side.any() and (~side).any() and (cen[side, 0] >= v[lm["nose_tip"], 0]).all()
    hole = variant_triangles(v, f, "mouth-hole", lm)
    mouth = 0.5 * (v[lm["mouth_corner_L"]] + v[lm["mouth_corner_R"]])
    assert (~hole).any() and np.linalg.norm(cen[~hole] - mouth, axis=1).max() <= 0.6 * np.linalg.norm(
        v[lm["mouth_corner_L"]] - v[lm["mouth_corner_R"]]) + 1e-9
    s2 = make_scan(v, f, "side", lm, sc, np.random.default_rng(0))
    assert 0 < s2.covered.mean() < 1 and s2.normals is None
    # seeded: the same scan twice
    s3 = make_scan(v, f, "side", lm, sc, np.random.default_rng(0))
    np.testing.assert_array_equal(s2.points_mm, s3.points_mm)


def test_aligned_error_ignores_rigid_motion():
    from cm3dmm.scanfit_eval import aligned_error

    v, _, _ = _face()
    r = _rotation([1, 2, 3], 17.0)
    assert aligned_error(v @ r.T + [5, -3, 40], v) < 1e-9
    bumped = v.copy()
    bumped[:, 2] += np.where(np.arange(len(v)) % 2 == 0, 1.0, -1.0)  # +-1 mm, no rigid part to remove
    assert aligned_error(bumped, v) == pytest.approx(1.0, abs=0.02)


def test_summarise_ratios():
    from cm3dmm.scanfit_eval import summarise

    recs = [{"method": "pca", "variant": "full", "subject": "s", "expression": e, "points": 100, "coverage": 1.0,
             "scan_error": se, "registered_error": re, "scan_shape_error": se, "registered_shape_error": re,
             "uncovered_error": float("nan"), "covered_error": se, "rot_deg": 1.0, "trans_mm": 2.0, "scan_to_fit": 0.3, "seconds": 1.0,
             "converged": True} for e, se, re in (("a", 1.0, 0.5), ("b", 3.0, 1.0))]
    t = summarise(recs)
    assert len(t) == 1
    row = t.iloc[0]
    assert row["scan fit (mm)"] == pytest.approx(2.0) and row["registered fit (mm)"] == pytest.approx(0.75)
    assert row["ratio"] == pytest.approx(2.0 / 0.75) and row["worst face ratio"] == pytest.approx(3.0)
    assert np.isnan(row["uncovered, aligned (mm)"]) and row["covered, aligned (mm)"] == pytest.approx(2.0)


def test_run_scan_fits_writes_the_table(tmp_path):
    """The stage end to end on a tiny run: every method, two variants, table + faces + protocol."""
    from conftest import build_tiny_models, make_registered, tiny_config
    from cm3dmm.paths import RunPaths
    from cm3dmm.scanfit_eval import run_scan_fits

    cfg = tiny_config(tmp_path, scan_fits={"subjects": 1, "expressions": 2, "points": 400,
                                           "variants": ["full", "side"]}, fit={"scan_iters": 2, "max_iter": 6})
    build_tiny_models(cfg, make_registered(grid=8))
    table = run_scan_fits(cfg)
    paths = RunPaths.of(cfg.run_dir)
    assert list(table["Method"]) == ["cm3dmm", "cm3dmm", "pca", "pca", "bilinear", "bilinear"]
    assert list(table["Scan"]) == ["full", "side"] * 3
    assert (table["Faces"] == 2).all() and (table["scan fit (mm)"] > 0).all()
    side = table[table["Scan"] == "side"]
    assert (side["Coverage"] < 1).all() and side["uncovered, aligned (mm)"].notna().all()
    for name in ("scan_fits.csv", "scan_fits.md", "scan_fits.tex", "scan_fits.html", "scan_fits_faces.csv",
                 "scan_fits_protocol.md"):
        assert (paths.tables_dir / name).exists(), name
    import pandas as pd

    faces = pd.read_csv(paths.tables_dir / "scan_fits_faces.csv")
    assert len(faces) == 12
    # the table's means are the per-face rows' means
    g = faces[(faces["method"] == "pca") & (faces["variant"] == "full")]
    row = table[(table["Method"] == "pca") & (table["Scan"] == "full")].iloc[0]
    assert row["scan fit (mm)"] == pytest.approx(g["scan_error"].mean())
    # deterministic: the same scans and fits again
    again = run_scan_fits(cfg)
    np.testing.assert_allclose(again["scan fit (mm)"], table["scan fit (mm)"], rtol=1e-6)

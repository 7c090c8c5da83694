"""Metrics against naive loop references and analytic cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cm3dmm.geometry import sample_surface
from cm3dmm.metrics import (
    chamfer_distance,
    face_normals,
    fscore,
    point_to_surface,
    region_vertex_error,
    sample_and_project,
    surface_metrics,
    vertex_error,
    vertex_normals,
)


def _grid(n: int = 6, size: float = 50.0, z=None, seed: int | None = None):
    """A bumpy (n x n)-vertex height field over [0, size]^2: vertices (n*n, 3), faces."""
    xs = np.linspace(0, size, n)
    x, y = np.meshgrid(xs, xs, indexing="xy")
    if z is None:
        rng = np.random.default_rng(seed)
        z = rng.normal(0, 2.0, x.shape) if seed is not None else np.zeros_like(x)
    v = np.stack([x.ravel(), y.ravel(), np.broadcast_to(z, x.shape).ravel()], 1)
    f = []
    for i in range(n - 1):
        for j in range(n - 1):
            a, b, c, d = i * n + j, i * n + j + 1, (i + 1) * n + j, (i + 1) * n + j + 1
            f += [[a, b, d], [a, d, c]]
    return v, np.array(f, np.int64)


# ----------------------------------------------------------------- naive references
def _naive_point_triangle(p, a, b, c) -> float:
    """Ericson, Real-Time Collision Detection 5.1.5: closest point by Voronoi region."""
    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = ab @ ap, ac @ ap
    if d1 <= 0 and d2 <= 0:
        return float(np.linalg.norm(p - a))
    bp = p - b
    d3, d4 = ab @ bp, ac @ bp
    if d3 >= 0 and d4 <= d3:
        return float(np.linalg.norm(p - b))
    vc = d1 * d4 - d3 * d2
    if vc <= 0 and d1 >= 0 and d3 <= 0:
        return float(np.linalg.norm(p - (a + d1 / (d1 - d3) * ab)))
    cp = p - c
    d5, d6 = ab @ cp, ac @ cp
    if d6 >= 0 and d5 <= d6:
        return float(np.linalg.norm(p - c))
    vb = d5 * d2 - d1 * d6
    if vb <= 0 and d2 >= 0 and d6 <= 0:
        return float(np.linalg.norm(p - (a + d2 / (d2 - d6) * ac)))
    va = d3 * d6 - d5 * d4
    if va <= 0 and (d4 - d3) >= 0 and (d5 - d6) >= 0:
        w = (d4 - d3) / ((d4 - d3) + (d5 - d6))
        return float(np.linalg.norm(p - (b + w * (c - b))))
    denom = 1.0 / (va + vb + vc)
    q = a + ab * (vb * denom) + ac * (vc * denom)
    return float(np.linalg.norm(p - q))


def _naive_p2s(points, v, f):
    return np.array([min(_naive_point_triangle(p, *v[t]) for t in f) for p in points])


# ----------------------------------------------------------------- vertex errors
def test_vertex_error_matches_loops():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(3, 7, 3)), rng.normal(size=(3, 7, 3))
    e = vertex_error(pred, target)
    for b in range(3):
        d = [math.dist(pred[b, i], target[b, i]) for i in range(7)]
        assert e.mean[b] == pytest.approx(sum(d) / 7)
        assert e.rmse[b] == pytest.approx(math.sqrt(sum(x * x for x in d) / 7))
    all_d = [math.dist(pred[b, i], target[b, i]) for b in range(3) for i in range(7)]
    assert e.mean_all == pytest.approx(sum(all_d) / 21)
    assert e.rmse_all == pytest.approx(math.sqrt(sum(x * x for x in all_d) / 21))
    single = vertex_error(pred[1], target[1])
    assert single.mean.shape == (1,) and single.mean[0] == pytest.approx(e.mean[1])


def test_region_vertex_error_matches_loops():
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=(2, 10, 3)), rng.normal(size=(2, 10, 3))
    labels = np.array([0, 0, 1, 1, 1, -1, 2, 0, 1, -1])
    names = ["nose", "mouth", "eyes", "cheeks"]
    out = region_vertex_error(pred, target, labels, names)
    assert set(out) == {"nose", "mouth", "eyes"}  # cheeks has no vertex
    for r, name in enumerate(names[:3]):
        idx = [i for i in range(10) if labels[i] == r]
        for b in range(2):
            d = [math.dist(pred[b, i], target[b, i]) for i in idx]
            assert out[name].mean[b] == pytest.approx(sum(d) / len(d))
    with pytest.raises(ValueError, match="region names"):
        region_vertex_error(pred, target, np.full(10, 5), names)


def test_vertex_error_rejects_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        vertex_error(np.zeros((4, 3)), np.zeros((5, 3)))


# ----------------------------------------------------------------- surfaces
def test_point_to_surface_matches_naive():
    v, f = _grid(5, seed=3)
    rng = np.random.default_rng(4)
    pts = rng.uniform([-10, -10, -8], [60, 60, 8], size=(60, 3))
    np.testing.assert_allclose(point_to_surface(pts, v, f), _naive_p2s(pts, v, f), rtol=1e-9, atol=1e-9)


def test_normals():
    v, f = _grid(3)  # flat plane z = 0, counter-clockwise seen from +z
    np.testing.assert_allclose(face_normals(v, f), np.tile([0, 0, 1.0], (len(f), 1)), atol=1e-12)
    np.testing.assert_allclose(vertex_normals(v, f), np.tile([0, 0, 1.0], (len(v), 1)), atol=1e-12)


def test_parallel_planes_analytic():
    v, f = _grid(4)
    shifted = v + [0, 0, 0.5]
    m = surface_metrics(shifted, f, v, n_points=500, threshold=1.0)
    assert m.chamfer == pytest.approx(0.5) and m.pred_to_target == pytest.approx(0.5)
    assert m.normal_consistency == pytest.approx(1.0)
    assert (m.fscore, m.precision, m.recall) == (1.0, 1.0, 1.0)
    assert surface_metrics(shifted, f, v, n_points=500, threshold=0.4).fscore == 0.0
    assert chamfer_distance(v, f, v, n_points=200) == pytest.approx(0.0, abs=1e-9)


def test_tilted_plane_normal_consistency():
    v, f = _grid(4)
    angle = 0.3
    tilted = v.copy()
    tilted[:, 2] = v[:, 0] * math.tan(angle)  # plane rotated about the y axis
    m = surface_metrics(tilted, f, v, n_points=300)
    assert m.normal_consistency == pytest.approx(math.cos(angle), abs=1e-9)


def test_partial_target_precision_recall():
    """Target covers half the prediction: recall 1 (all target points are on pred), precision ~1/2."""
    v, f = _grid(9, size=80.0)
    half = f[(v[f][:, :, 0] <= 40.0 + 1e-9).all(axis=1)]
    m = surface_metrics(v, f, v, half, n_points=4000, threshold=1.0)
    assert m.recall == 1.0
    # prediction points with x > 41 are farther than 1 mm: precision ~ 41/80
    assert m.precision == pytest.approx(41 / 80, abs=0.03)
    assert m.fscore == pytest.approx(2 * m.precision / (1 + m.precision))


def test_chamfer_matches_naive_reference():
    """Recompute with the documented sampling (seed for the target, seed+1 for the prediction)
    and a brute-force Ericson point-triangle distance."""
    vp, f = _grid(5, seed=1)
    vt, _ = _grid(5, seed=2)
    n, seed = 40, 7
    m = surface_metrics(vp, f, vt, n_points=n, seed=seed, threshold=1.5)

    def samples(v, s):
        tri, bary = sample_surface(v, f, n, np.random.default_rng(s))
        return np.array([sum(bary[i, k] * v[f[tri[i], k]] for k in range(3)) for i in range(n)])

    d_pt = _naive_p2s(samples(vp, seed + 1), vt, f)
    d_tp = _naive_p2s(samples(vt, seed), vp, f)
    assert m.pred_to_target == pytest.approx(d_pt.mean(), rel=1e-6)
    assert m.target_to_pred == pytest.approx(d_tp.mean(), rel=1e-6)
    assert m.chamfer == pytest.approx((d_pt.mean() + d_tp.mean()) / 2, rel=1e-6)
    p, r = (d_pt < 1.5).mean(), (d_tp < 1.5).mean()
    assert m.precision == pytest.approx(p) and m.recall == pytest.approx(r)
    assert m.fscore == pytest.approx(2 * p * r / (p + r))
    assert 0 < m.chamfer and 0 < m.normal_consistency < 1


def test_fscore_edge_cases():
    assert fscore(np.array([2.0]), np.array([3.0])) == (0.0, 0.0, 0.0)
    f, p, r = fscore(np.array([0.1, 2.0]), np.array([0.1, 0.2, 0.3, 5.0]), threshold=1.0)
    assert (p, r) == (0.5, 0.75) and f == pytest.approx(2 * 0.5 * 0.75 / 1.25)
    with pytest.raises(ValueError):
        fscore(np.zeros(1), np.zeros(1), threshold=0)


def test_region_surface_metrics_match_grouped_samples():
    vp, f = _grid(6, seed=5)
    vt, _ = _grid(6, seed=6)
    labels = (vp[:, 0] > 25).astype(np.int64)  # two regions: x <= 25, x > 25
    names = ["left", "right"]
    m = surface_metrics(vp, f, vt, n_points=600, seed=3, labels=labels, names=names, threshold=1.0)
    s = sample_and_project(vp, f, vt, None, 600, 3, labels)
    for r, name in enumerate(names):
        d_pt = [d for d, g in zip(s.d_pt, s.region_pt) if g == r]
        d_tp = [d for d, g in zip(s.d_tp, s.region_tp) if g == r]
        cos = [c for c, g in zip(s.cos_pt, s.region_pt) if g == r] + [
            c for c, g in zip(s.cos_tp, s.region_tp) if g == r]
        reg = m.regions[name]
        assert reg.chamfer == pytest.approx((np.mean(d_pt) + np.mean(d_tp)) / 2)
        assert reg.normal_consistency == pytest.approx(np.mean(cos))
        assert reg.precision == pytest.approx(np.mean(np.array(d_pt) < 1.0))
        # the region of each sample is the label of the nearest corner of its own triangle
        assert 150 < len(d_pt) < 450
    assert set(m.regions) == set(names)
    assert (s.region_pt == 0).sum() + (s.region_pt == 1).sum() == 600

"""cm3dmm.geometry: point-triangle / point-mesh projection against naive references,
area-weighted sampling, barycentric interpolation."""

import math

import numpy as np
import pytest

from cm3dmm.geometry import (
    barycentric_interpolate,
    closest_points_on_mesh,
    closest_points_on_triangles,
    sample_surface,
    triangle_areas,
)
from conftest import make_registered


def _ref_point_triangle(p, a, b, c):
    """Naive scalar reference: plane projection if inside, else the nearest of the 3 edges."""
    p, a, b, c = (np.asarray(x, float) for x in (p, a, b, c))
    e0, e1 = b - a, c - a
    n = np.cross(e0, e1)
    nn = n @ n
    if nn > 1e-20:
        q = p - ((p - a) @ n) / nn * n
        # barycentrics by sub-triangle areas (signed along n)
        u = np.cross(b - q, c - q) @ n / nn
        v = np.cross(c - q, a - q) @ n / nn
        w = 1.0 - u - v
        if u >= 0 and v >= 0 and w >= 0:
            return math.dist(p, q), q
    best = (math.inf, None)
    for x, y in ((a, b), (b, c), (c, a)):
        d = y - x
        t = 0.0 if d @ d == 0 else min(1.0, max(0.0, (p - x) @ d / (d @ d)))
        q = x + t * d
        if math.dist(p, q) < best[0]:
            best = (math.dist(p, q), q)
    return best


def test_point_triangle_matches_naive_reference():
    rng = np.random.default_rng(1)
    P = rng.normal(size=(400, 3)) * 2
    A, B, C = rng.normal(size=(3, 400, 3))
    # include degenerate triangles: collinear and a single point
    B[:20] = A[:20] + (C[:20] - A[:20]) * 0.3
    B[20:30] = A[20:30]
    C[20:30] = A[20:30]
    q, bary = closest_points_on_triangles(P, A, B, C)
    np.testing.assert_allclose(bary.sum(1), 1.0, atol=1e-12)
    assert (bary >= -1e-12).all()
    np.testing.assert_allclose(q, bary[:, :1] * A + bary[:, 1:2] * B + bary[:, 2:] * C, atol=1e-12)
    for i in range(len(P)):
        d_ref, q_ref = _ref_point_triangle(P[i], A[i], B[i], C[i])
        assert np.linalg.norm(q[i] - P[i]) == pytest.approx(d_ref, abs=1e-9)
        np.testing.assert_allclose(q[i], q_ref, atol=1e-7)


def _mesh_with_big_triangle():
    d = make_registered(grid=9, n_subjects=1, n_expr=1, test_subjects=0)
    v = d.vertices[0].astype(np.float64)
    f = d.faces.astype(np.int64)
    # a far-reaching flap: one triangle much larger than the others
    v = np.concatenate([v, [[0.0, 0.0, 120.0], [200.0, 0.0, 120.0], [0.0, 250.0, 120.0]]])
    f = np.concatenate([f, [[len(v) - 3, len(v) - 2, len(v) - 1]]])
    return v, f


@pytest.mark.parametrize("big", [False, True])
def test_closest_points_on_mesh_equals_brute_force(big):
    d = make_registered(grid=9, n_subjects=1, n_expr=1, test_subjects=0)
    v, f = (_mesh_with_big_triangle() if big else (d.vertices[0].astype(np.float64), d.faces))
    rng = np.random.default_rng(0)
    lo, hi = v.min(0) - 15, v.max(0) + 15
    near_tri, near_bary = sample_surface(v, f, 300, rng)
    near = barycentric_interpolate(v, f, near_tri, near_bary) + rng.normal(0, 0.5, (300, 3))
    P = np.concatenate([rng.uniform(lo, hi, (300, 3)), near])
    res = closest_points_on_mesh(P, v, f, k=1)
    # brute force: every triangle for every point (naive scalar reference on a subset)
    q, _ = closest_points_on_triangles(P[:, None], v[f[:, 0]][None], v[f[:, 1]][None], v[f[:, 2]][None])
    d_all = np.linalg.norm(q - P[:, None], axis=-1)
    np.testing.assert_allclose(res.dist, d_all.min(1), rtol=0, atol=1e-9)
    for i in range(0, len(P), 37):
        d_ref = min(_ref_point_triangle(P[i], *v[t])[0] for t in f)
        assert res.dist[i] == pytest.approx(d_ref, abs=1e-9)
    # the reported triangle attains the minimum, and bary/closest are consistent with it
    np.testing.assert_allclose(d_all[np.arange(len(P)), res.tri], res.dist, atol=1e-9)
    np.testing.assert_allclose(res.closest, np.einsum("mk,mki->mi", res.bary, v[f[res.tri]]), atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(res.closest - P, axis=1), res.dist, atol=1e-9)
    assert res.dist.dtype == P.dtype and res.tri.shape == (len(P),)


def test_closest_points_on_mesh_small_budgets_and_mixed_sizes_equal_brute_force():
    # triangle sizes spanning several radius classes, points near and far, and budgets so
    # small that every chunk and every ball query is split: still the brute-force answer
    rng = np.random.default_rng(7)
    d = make_registered(grid=12, n_subjects=1, n_expr=1, test_subjects=0)
    v = d.vertices[0].astype(np.float64)
    f = np.asarray(d.faces, np.int64)
    v = v * np.where(v[:, :1] > np.median(v[:, 0]), 1.0, 0.15)  # one half of the face 7x finer
    P = np.concatenate([rng.uniform(v.min(0) - 40, v.max(0) + 40, (150, 3)),
                        barycentric_interpolate(v, f, *sample_surface(v, f, 150, rng))
                        + rng.normal(0, 0.3, (150, 3))])
    res = closest_points_on_mesh(P, v, f, chunk=64, pair_budget=50)
    q, _ = closest_points_on_triangles(P[:, None], v[f[:, 0]][None], v[f[:, 1]][None], v[f[:, 2]][None])
    d_all = np.linalg.norm(q - P[:, None], axis=-1)
    np.testing.assert_allclose(res.dist, d_all.min(1), rtol=0, atol=1e-9)
    np.testing.assert_allclose(d_all[np.arange(len(P)), res.tri], res.dist, atol=1e-9)
    np.testing.assert_array_equal(res.dist, closest_points_on_mesh(P, v, f).dist)


def test_max_distance_keeps_near_points_exact():
    d = make_registered(grid=9, n_subjects=1, n_expr=1, test_subjects=0)
    v, f = d.vertices[0], d.faces
    rng = np.random.default_rng(3)
    tri, bary = sample_surface(v, f, 2000, rng)
    P = barycentric_interpolate(v.astype(np.float64), f, tri, bary) + rng.normal(0, 1.0, (2000, 3))
    exact = closest_points_on_mesh(P, v, f)
    fast = closest_points_on_mesh(P, v, f, max_distance=0.5)
    near = exact.dist <= 0.5
    assert 200 < near.sum() < 1900
    np.testing.assert_allclose(fast.dist[near], exact.dist[near], atol=1e-12)
    assert (fast.dist[~near] > 0.5).all()


def test_closest_points_on_mesh_rejects_bad_shapes():
    with pytest.raises(ValueError, match="points must have shape"):
        closest_points_on_mesh(np.zeros((3, 2)), np.zeros((3, 3)), np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match="faces index vertex"):
        closest_points_on_mesh(np.zeros((3, 3)), np.zeros((3, 3)), np.array([[0, 1, 5]]))


def test_sample_surface_is_area_weighted_and_uniform():
    d = make_registered(grid=5, n_subjects=1, n_expr=1, test_subjects=0)
    v, f = d.vertices[0].astype(np.float64), d.faces
    v[:, 0] = d.uv[:, 0] ** 3 * 150.0  # warp the grid: triangle areas differ by > 10x
    areas = triangle_areas(v, f)
    assert areas.max() / areas.min() > 10
    n = 200_000
    tri, bary = sample_surface(v, f, n, np.random.default_rng(0))
    counts = np.bincount(tri, minlength=len(f))
    expected = n * areas / areas.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    dof = len(f) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof)  # ~p < 1e-6 under the null
    # the same statistic rejects triangle-uniform sampling: the test can fail
    uniform = np.bincount(np.random.default_rng(1).integers(0, len(f), n), minlength=len(f))
    assert ((uniform - expected) ** 2 / expected).sum() > 10 * dof
    # uniform inside each triangle: mean barycentric (1/3, 1/3, 1/3), E[b0^2] = 1/6
    np.testing.assert_allclose(bary.sum(1), 1.0, atol=1e-6)
    assert (bary >= 0).all()
    np.testing.assert_allclose(bary.mean(0), 1 / 3, atol=3e-3)
    np.testing.assert_allclose((bary.astype(np.float64) ** 2).mean(0), 1 / 6, atol=3e-3)


def test_barycentric_interpolate_batched():
    rng = np.random.default_rng(0)
    field = rng.normal(size=(2, 5, 4))
    faces = np.array([[0, 1, 2], [2, 3, 4]])
    tri = np.array([1, 0, 1])
    bary = np.array([[1, 0, 0], [0.2, 0.3, 0.5], [0.25, 0.25, 0.5]])
    out = barycentric_interpolate(field, faces, tri, bary)
    assert out.shape == (2, 3, 4)
    np.testing.assert_allclose(out[:, 0], field[:, 2])
    np.testing.assert_allclose(out[:, 1], 0.2 * field[:, 0] + 0.3 * field[:, 1] + 0.5 * field[:, 2])
    np.testing.assert_allclose(out[:, 2], 0.25 * field[:, 2] + 0.25 * field[:, 3] + 0.5 * field[:, 4])


def test_closest_triangle_whose_centroid_is_far():
    """Long slivers next to a cluster of tiny triangles: the k nearest centroids miss the
    closest triangle, so the certification step must widen the search."""
    verts, faces = [], []
    for i in range(40):  # slivers along +x, 100 mm long, centroids near x = 67
        y = 1.5 * i
        base = len(verts)
        verts += [[0.0, y, 0.0], [100.0, y, 0.0], [100.0, y + 1.0, 0.0]]
        faces.append([base, base + 1, base + 2])
    rng = np.random.default_rng(0)
    for i in range(20):  # tiny triangles ~30 mm above the slivers' tips (most triangles are
        # slivers, so they are not "big" outliers: the KD-tree search must find them)
        c = np.array([0.0, 30.0, 30.0]) + rng.normal(0, 2.0, 3)
        base = len(verts)
        verts += list(c + rng.normal(0, 0.3, (3, 3)))
        faces.append([base, base + 1, base + 2])
    v, f = np.asarray(verts), np.asarray(faces)
    P = np.array([[5.0, 1.5 * i + 0.02, 1.0] for i in range(40)])  # 1 mm above each sliver
    res = closest_points_on_mesh(P, v, f, k=1)
    np.testing.assert_allclose(res.dist, 1.0, atol=1e-9)
    np.testing.assert_array_equal(res.tri, np.arange(40))

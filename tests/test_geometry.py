"""cm3dmm.geometry: edges, boundary vertices / loops and evenly spread indices against naive
references, point-triangle / point-mesh projection against naive references, area-weighted
sampling, barycentric interpolation."""

import math

import numpy as np
import pytest

from cm3dmm.geometry import (
    barycentric_interpolate,
    boundary_loops,
    boundary_vertices,
    closest_points_on_mesh,
    closest_points_on_triangles,
    even_indices,
    sample_surface,
    triangle_areas,
    unique_edges,
)
from conftest import make_registered


# --------------------------------------------------------------------------- topology
def _grid_with_holes(n=7, holes=((2, 2), (4, 3))):
    """An n x n grid of quads (two triangles each, counter-clockwise) without the quads ``holes``:
    a disc with one hole per removed quad (they must not touch each other or the border)."""
    faces = []
    for r in range(n - 1):
        for c in range(n - 1):
            if (r, c) in holes:
                continue
            a = r * n + c
            faces += [[a, a + 1, a + n + 1], [a, a + n + 1, a + n]]
    return np.array(faces, np.int64)


def _naive_edge_counts(faces):
    counts = {}
    for f in faces.tolist():
        for k in range(3):
            a, b = f[(k + 1) % 3], f[(k + 2) % 3]
            key = (min(a, b), max(a, b))
            counts[key] = counts.get(key, 0) + 1
    return counts


def _naive_loops(faces):
    """Boundary loops by walking: the directed sides whose reverse is no side of any triangle."""
    sides = {(f[k], f[(k + 1) % 3]) for f in faces.tolist() for k in range(3)}
    nxt = {a: b for a, b in sides if (b, a) not in sides}
    loops, left = [], set(nxt)
    while left:
        v = start = min(left)
        loop = []
        while True:
            loop.append(v)
            left.discard(v)
            v = nxt[v]
            if v == start:
                break
        loops.append(loop)
    return loops


def _canonical(loop):
    """A loop as a tuple starting at its smallest vertex (same direction)."""
    loop = [int(x) for x in loop]
    k = loop.index(min(loop))
    return tuple(loop[k:] + loop[:k])


@pytest.mark.parametrize("seed", [0, 1])
def test_edges_and_boundary_match_naive_references(seed):
    faces = _grid_with_holes()
    # a shuffled triangle order and rotated corners (same orientation) change nothing but the order
    rng = np.random.default_rng(seed)
    faces = np.roll(faces[rng.permutation(len(faces))], seed, axis=1)
    edges, face_edges, counts = unique_edges(faces)
    ref = _naive_edge_counts(faces)
    assert [tuple(e) for e in edges.tolist()] == sorted(ref)
    assert dict(zip(map(tuple, edges.tolist()), counts.tolist())) == ref
    for f, fe in zip(faces.tolist(), face_edges.tolist()):
        for k in range(3):
            a, b = f[(k + 1) % 3], f[(k + 2) % 3]
            assert tuple(edges[fe[k]]) == (min(a, b), max(a, b))
    on_b = {v for (a, b), c in ref.items() if c == 1 for v in (a, b)}
    n = int(faces.max()) + 1
    np.testing.assert_array_equal(boundary_vertices(faces), [v in on_b for v in range(n)])
    assert boundary_vertices(faces, n + 3).shape == (n + 3,) and not boundary_vertices(faces, n + 3)[n:].any()
    loops = boundary_loops(faces)
    assert sorted(map(_canonical, loops)) == sorted(map(_canonical, _naive_loops(faces)))
    assert sorted(len(lp) for lp in loops) == [4, 4, 24]  # two one-quad holes, the 7 x 7 border
    assert all(lp.dtype == np.int64 for lp in loops)
    # the first loop starts at the first boundary side met triangle by triangle
    first = next((f[k], f[(k + 1) % 3]) for f in faces.tolist() for k in range(3)
                 if ref[(min(f[k], f[(k + 1) % 3]), max(f[k], f[(k + 1) % 3]))] == 1)
    assert tuple(loops[0][:2]) == first


def test_boundary_loops_of_a_closed_surface_and_a_bow_tie():
    tetra = np.array([[0, 2, 1], [0, 1, 3], [1, 2, 3], [2, 0, 3]])
    assert boundary_loops(tetra) == [] and not boundary_vertices(tetra).any()
    bow_tie = np.array([[0, 1, 2], [0, 3, 4]])  # two triangles sharing only vertex 0
    with pytest.raises(ValueError, match="non-manifold vertex"):
        boundary_loops(bow_tie)
    with pytest.raises(ValueError, match="shape"):
        unique_edges(np.zeros((3, 4), np.int64))


def test_even_indices_match_a_naive_reference():
    for n in range(0, 30):
        for k in range(-1, n + 3):
            got = even_indices(n, k)
            # i times the float step, rounded half to even (as linspace computes it; 11 * 25 / 22
            # is 12.500000000000002 that way, so index 13)
            step = (n - 1) / (k - 1) if k > 1 else 0.0
            ref = list(range(n)) if k <= 0 or k >= n else sorted({round(i * step) for i in range(k)})
            assert got.dtype == np.int64 and got.tolist() == ref, (n, k)
    assert even_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert even_indices(5, 2).tolist() == [0, 4]


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


@pytest.mark.parametrize("candidates", [0, 1, 4, 16])
def test_closest_points_on_mesh_small_budgets_and_mixed_sizes_equal_brute_force(candidates):
    # triangle sizes spanning several radius classes, points near and far, and budgets so
    # small that every chunk and every ball query is split; with few nearest-centroid candidates
    # most points also take the ball-list path: still the brute-force answer
    rng = np.random.default_rng(7)
    d = make_registered(grid=12, n_subjects=1, n_expr=1, test_subjects=0)
    v = d.vertices[0].astype(np.float64)
    f = np.asarray(d.faces, np.int64)
    v = v * np.where(v[:, :1] > np.median(v[:, 0]), 1.0, 0.15)  # one half of the face 7x finer
    P = np.concatenate([rng.uniform(v.min(0) - 40, v.max(0) + 40, (150, 3)),
                        barycentric_interpolate(v, f, *sample_surface(v, f, 150, rng))
                        + rng.normal(0, 0.3, (150, 3))])
    res = closest_points_on_mesh(P, v, f, chunk=64, pair_budget=50, candidates=candidates)
    q, _ = closest_points_on_triangles(P[:, None], v[f[:, 0]][None], v[f[:, 1]][None], v[f[:, 2]][None])
    d_all = np.linalg.norm(q - P[:, None], axis=-1)
    np.testing.assert_allclose(res.dist, d_all.min(1), rtol=0, atol=1e-9)
    np.testing.assert_allclose(d_all[np.arange(len(P)), res.tri], res.dist, atol=1e-9)
    np.testing.assert_array_equal(res.dist, closest_points_on_mesh(P, v, f).dist)
    # chunks projected in threads: the same answer, row for row
    par = closest_points_on_mesh(P, v, f, chunk=64, pair_budget=50, candidates=candidates, workers=3)
    np.testing.assert_array_equal(par.dist, res.dist)
    np.testing.assert_array_equal(par.tri, res.tri)


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

"""Upsampling levels (midpoint subdivision in barycentric space) and uniform UV grids."""

import numpy as np
import pytest
from scipy.spatial import cKDTree

from _meshes import holed_disc
from cm3dmm.upsample import expected_counts, subdivide, uv_grid_from
from cm3dmm.geometry import unique_edges
from cm3dmm.uv import UVLocator, check_disc, interpolate, unwrap


@pytest.fixture(scope="module")
def disc():
    v, f = holed_disc(13)
    uv = unwrap(v, f, method="lscm").uv.astype(np.float64)
    return v, f, uv


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_level_counts_points_and_watertightness(disc, level):
    v, f, uv = disc
    V, F = len(v), len(f)
    E = len(unique_edges(f)[0])
    lv = subdivide(f, V, level, uv)
    n = 2 ** level
    assert (lv.n_points, len(lv.faces)) == expected_counts(V, E, F, level)
    assert lv.n_points == V + E * (n - 1) + F * (n - 1) * (n - 2) // 2
    # template vertices first, in order; new points flagged -1
    assert np.array_equal(lv.vertex_index[:V], np.arange(V)) and (lv.vertex_index[V:] == -1).all()
    # barycentrics are exact lattice points (i, j, k) / n
    assert np.array_equal(lv.bary * n, np.round(lv.bary * n)) and np.allclose(lv.bary.sum(1), 1)
    # no duplicate points
    p = interpolate(v, f, lv.tri, lv.bary.astype(np.float64))
    pairs = cKDTree(p).query_pairs(1e-6)
    assert len(pairs) == 0
    # watertight where the template is: same Euler characteristic and hole structure,
    # every template boundary edge split into n level boundary edges
    e, _, counts = unique_edges(lv.faces)
    assert counts.max() == 2
    te, _, tcounts = unique_edges(f)
    assert (counts == 1).sum() == n * (tcounts == 1).sum()
    assert lv.n_points - len(e) + len(lv.faces) == V - len(te) + F
    topo = check_disc(p, lv.faces)
    assert len(topo.holes) == 2 and len(topo.outer) == n * len(check_disc(v, f).outer)
    # level UVs are the template UVs at the points
    assert np.allclose(lv.uv, interpolate(uv, f, lv.tri, lv.bary.astype(np.float64)), atol=1e-6)


def test_level_surface_is_the_template_surface(disc):
    v, f, _ = disc
    lv = subdivide(f, len(v), 3)
    p = interpolate(v, f, lv.tri, lv.bary.astype(np.float64))
    # children are stored in blocks of n^2 per template triangle: each child's centroid
    # must lie on its parent triangle (distance to the parent plane ~ 0, barycentrics >= 0)
    n2 = 4 ** 3
    parent = np.repeat(np.arange(len(f)), n2)
    c = p[lv.faces].mean(1)
    a, b, d = v[f[parent, 0]], v[f[parent, 1]], v[f[parent, 2]]
    nrm = np.cross(b - a, d - a)
    nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
    dist = np.abs(((c - a) * nrm).sum(1))
    assert dist.max() < 1e-5
    # and the subdivided area equals the template area
    def area(x, t):
        return 0.5 * np.linalg.norm(np.cross(x[t[:, 1]] - x[t[:, 0]], x[t[:, 2]] - x[t[:, 0]]), axis=1).sum()
    assert area(p, lv.faces) == pytest.approx(area(v, f), rel=1e-9)
    # the identity field reproduces the points of the level-0 vertices exactly
    assert np.array_equal(p[: len(v)], v)


def test_uv_grid_matches_brute_force_mask(disc):
    v, f, uv = disc
    loc = UVLocator(uv, f)
    n = 40
    g = uv_grid_from(loc, n)
    c = (np.arange(n) + 0.5) / n
    uu, vv = np.meshgrid(c, c, indexing="xy")
    q = np.stack([uu.ravel(), vv.ravel()], 1)
    t = uv[f]
    inside = np.zeros(len(q), bool)
    for k in range(len(f)):  # brute force over triangles
        d1, d2, r = t[k, 1] - t[k, 0], t[k, 2] - t[k, 0], q - t[k, 0]
        det = d1[0] * d2[1] - d1[1] * d2[0]
        l1 = (r[:, 0] * d2[1] - r[:, 1] * d2[0]) / det
        l2 = (d1[0] * r[:, 1] - d1[1] * r[:, 0]) / det
        inside |= (l1 >= -1e-9) & (l2 >= -1e-9) & (l1 + l2 <= 1 + 1e-9)
    assert g.n_points == inside.sum() and np.allclose(g.uv, q[inside])
    assert np.allclose(interpolate(uv, f, g.tri, g.bary.astype(np.float64)), g.uv, atol=1e-6)
    # triangles join grid neighbours only (one cell: legs of 1/n), counter-clockwise in UV
    tu = g.uv[g.faces]
    legs = np.abs(np.diff(np.concatenate([tu, tu[:, :1]], 1), axis=1)).max(axis=(1, 2))
    assert np.allclose(legs, 1 / n, atol=1e-6)
    cross = (tu[:, 1, 0] - tu[:, 0, 0]) * (tu[:, 2, 1] - tu[:, 0, 1]) - \
        (tu[:, 1, 1] - tu[:, 0, 1]) * (tu[:, 2, 0] - tu[:, 0, 0])
    assert (cross > 0).all()
    full = inside.reshape(n, n)
    cells = full[:-1, :-1] & full[:-1, 1:] & full[1:, :-1] & full[1:, 1:]
    assert len(g.faces) == 2 * cells.sum()

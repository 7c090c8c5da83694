"""UV unwrapping, disc checks, point location and interpolation."""

import numpy as np
import pytest

from _meshes import ICT_MESH, grid_mesh, holed_disc, icosphere, read_ict_face, torus_with_hole
from cm3dmm.errors import InputError
from cm3dmm.uv import (UVLocator, check_disc, check_uv, distortion, harmonic_uv, interpolate,
                       lscm_uv, signed_areas, unwrap)


# ---------------------------------------------------------------- topology
def test_check_disc_finds_outer_ring_and_holes():
    v, f = holed_disc(21)
    topo = check_disc(v, f)
    assert len(topo.outer) == 4 * 20  # the grid's border
    assert sorted(len(h) for h in topo.holes) == [14, 14]
    # loops follow the triangles' orientation: each (a, b) is a directed triangle edge
    directed = {(int(a), int(b)) for t in f for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0]))}
    ring = topo.outer
    assert all((int(a), int(b)) in directed for a, b in zip(ring, np.roll(ring, -1)))


@pytest.mark.parametrize("case, words", [
    ("sphere", "closed surface"),
    ("two", "2 connected components"),
    ("nonmanifold", "non-manifold"),
    ("torus", "handle"),
    ("unused", "belong to no triangle"),
])
def test_non_discs_are_refused(case, words):
    if case == "sphere":
        v, f = icosphere(1)
    elif case == "two":
        v, f = grid_mesh(5)
        v = np.concatenate([v, v + [500, 0, 0]])
        f = np.concatenate([f, f + 25])
    elif case == "nonmanifold":
        v, f = grid_mesh(5)
        v = np.concatenate([v, [[0, 0, 90.0]]])
        f = np.concatenate([f, [[f[0, 2], f[0, 0], len(v) - 1]]])  # 3rd triangle on a diagonal
    elif case == "torus":
        v, f = torus_with_hole()
    else:
        v, f = grid_mesh(5)
        v = np.concatenate([v, [[0, 0, 90.0]]])
    with pytest.raises(InputError, match=words):
        check_disc(v, f, path="region.h5")
    with pytest.raises(InputError, match="region.h5"):
        unwrap(v, f, method="lscm", path="region.h5")


# ---------------------------------------------------------------- unwrapping
@pytest.mark.parametrize("method", ["harmonic", "lscm"])
def test_computed_unwrap_has_no_flips_and_fills_the_margin_box(method):
    v, f = holed_disc(21)
    res = unwrap(v, f, method=method, margin=0.05)
    assert res.method == method
    assert res.stats.n_flipped == 0 and res.stats.n_degenerate == 0
    lo, hi = res.uv.min(0), res.uv.max(0)
    assert lo.min() >= 0.05 - 1e-6 and hi.max() <= 0.95 + 1e-6
    assert max(hi - lo) == pytest.approx(0.9, abs=1e-5)
    # aligned with the front view: u grows with x, v with y
    assert np.corrcoef(res.uv[:, 0], v[:, 0])[0, 1] > 0.95
    assert np.corrcoef(res.uv[:, 1], v[:, 1])[0, 1] > 0.95
    areas = signed_areas(res.uv, f)
    assert (areas > 0).all()  # triangles are counter-clockwise from +z, so is the map


def test_lscm_of_a_flat_patch_is_exactly_conformal():
    v, f = grid_mesh(9, bump=0.0)
    rng = np.random.default_rng(0)
    v[:, :2] += rng.normal(0, 2.0, (len(v), 2))  # irregular but flat
    uv = lscm_uv(v, f)
    st = distortion(v, f, uv)
    assert st.angle_max == pytest.approx(1.0, abs=1e-6)
    assert st.area_max == pytest.approx(1.0, abs=1e-6)
    assert st.angle_error_max_deg < 1e-4


def test_harmonic_keeps_outer_ring_on_circle_by_arc_length():
    v, f = holed_disc(21)
    topo = check_disc(v, f)
    uv = harmonic_uv(v, f, topo)
    ring = uv[topo.outer]
    assert np.allclose(np.linalg.norm(ring, axis=1), 1.0, atol=1e-12)
    # consecutive ring vertices are 2 pi (3-D edge length / perimeter) apart on the circle
    step = np.diff(np.unwrap(np.arctan2(ring[:, 1], ring[:, 0])))
    seg = np.linalg.norm(v[np.roll(topo.outer, -1)] - v[topo.outer], axis=1)
    assert np.allclose(step, 2 * np.pi * seg[:-1] / seg.sum(), atol=1e-9)
    assert abs(step.mean() - 2 * np.pi / 80) < 1e-3  # and nearly uniform on the square's border


def test_distortion_of_a_known_stretch():
    v, f = grid_mesh(6, bump=0.0)
    uv = v[:, :2] * [2.0, 1.0]  # anisotropic stretch: sigma ratio exactly 2, uniform area
    st = distortion(v, f, uv)
    assert st.angle_mean == pytest.approx(2.0, rel=1e-9)
    assert st.angle_max == pytest.approx(2.0, rel=1e-9)
    assert st.area_mean == pytest.approx(1.0, rel=1e-9)
    assert st.n_flipped == 0
    uv2 = uv.copy()
    uv2[7] += [90.0, 0.0]  # drag an interior vertex across its neighbour
    assert distortion(v, f, uv2).n_flipped > 0


def test_check_uv_and_auto_choice():
    v, f = holed_disc(21)
    good = (v[:, :2] - v[:, :2].min(0)) / np.ptp(v[:, :2], axis=0).max()
    assert check_uv(good, f) == []
    res = unwrap(v, f, good * 0.5 + 0.1, margin=0.0)  # valid, kept up to scale and shift
    assert res.method == "source" and np.allclose(res.uv, good, atol=1e-6)
    flipped = good.copy()
    flipped[30] = good[31] + (good[31] - good[30]) * 3
    assert any("flipped" in p for p in check_uv(flipped, f))
    assert any("outside [0, 1]" in p for p in check_uv(good * 1.5, f))
    res = unwrap(v, f, good * 1.5, method="auto")
    assert res.method == "lscm" and "outside [0, 1]" in res.notes[0]
    with pytest.raises(InputError, match="outside"):
        unwrap(v, f, good * 1.5, method="source")


@pytest.mark.skipif(not ICT_MESH.exists(), reason="ICT-FaceKit not in ../shared/data")
def test_ict_face_area_unwraps():
    v, f, uv = read_ict_face()
    assert check_uv(uv, f) == []  # its own UVs, seam vertices resolved inside [0, 1]^2
    st = distortion(v, f, uv)
    assert st.n_flipped == 0
    _, _, last = read_ict_face(last_seen_uv=True)
    problems = check_uv(last, f)  # a naive choice at the 3 seam vertices is invalid
    assert problems[0].startswith("3 vertices have UVs outside") and "6 UV triangles are flipped" in problems
    topo = check_disc(v, f)
    assert len(topo.holes) == 3  # eyes and mouth
    for method in ("lscm", "harmonic"):
        res = unwrap(v, f, method=method)
        assert res.method == method
        assert res.stats.n_flipped == 0
        assert res.stats.angle_mean < (1.2 if method == "lscm" else 1.35)


# ---------------------------------------------------------------- point location
def brute_locate(uv, f, q):
    """Reference: every triangle for every point; -1 when in none."""
    t = uv[f]
    out = np.full(len(q), -1)
    bary = np.zeros((len(q), 3))
    for n, p in enumerate(q):
        d1, d2, r = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0], p - t[:, 0]
        det = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
        l1 = (r[:, 0] * d2[:, 1] - r[:, 1] * d2[:, 0]) / det
        l2 = (d1[:, 0] * r[:, 1] - d1[:, 1] * r[:, 0]) / det
        ok = np.flatnonzero((l1 >= -1e-9) & (l2 >= -1e-9) & (l1 + l2 <= 1 + 1e-9))
        if len(ok):
            out[n] = ok[0]
            bary[n] = [1 - l1[ok[0]] - l2[ok[0]], l1[ok[0]], l2[ok[0]]]
    return out, bary


def brute_nearest_distance(uv, f, q):
    t = uv[f]
    a = np.concatenate([t[:, 0], t[:, 1], t[:, 2]])
    b = np.concatenate([t[:, 1], t[:, 2], t[:, 0]])
    d = b - a
    s = np.clip(((q[:, None] - a) * d).sum(-1) / (d * d).sum(-1), 0, 1)
    return np.linalg.norm(a + s[..., None] * d - q[:, None], axis=-1).min(1)


def test_locator_matches_brute_force():
    v, f = holed_disc(21)
    uv = unwrap(v, f, method="lscm").uv.astype(np.float64)
    rng = np.random.default_rng(1)
    q = np.concatenate([rng.random((3000, 2)), rng.uniform(-0.5, 1.5, (300, 2))])
    tri, bary, inside = UVLocator(uv, f).locate(q)
    ref, _ = brute_locate(uv, f, q)
    assert 0.3 < inside.mean() < 0.95  # a real mix of inside and outside points
    assert np.array_equal(inside, ref >= 0)
    # the found triangle contains the point: its barycentrics reproduce the query
    assert np.abs(interpolate(uv, f, tri[inside], bary[inside]) - q[inside]).max() < 1e-12
    assert (bary >= 0).all() and np.allclose(bary.sum(1), 1.0)
    # off the mask: the exact nearest point of the face (clamped barycentrics)
    p_out = interpolate(uv, f, tri[~inside], bary[~inside])
    d_out = np.linalg.norm(p_out - q[~inside], axis=1)
    assert np.allclose(d_out, brute_nearest_distance(uv, f, q[~inside]), atol=1e-12)


def test_locator_vertices_edges_and_bad_input():
    v, f = holed_disc(15)
    uv = unwrap(v, f, method="harmonic").uv.astype(np.float64)  # midpoints exactly on edges
    loc = UVLocator(uv, f)
    mid = (uv[f[:, 0]] + uv[f[:, 1]]) / 2
    tri, bary, inside = loc.locate(np.concatenate([uv, mid]))
    assert inside.all()  # vertices and points on shared edges are found
    tri, bary, inside = loc.locate(np.array([[np.nan, 0.5], [np.inf, 0.2]]))
    assert not inside.any() and (tri >= 0).all()
    with pytest.raises(ValueError):
        loc.locate(np.zeros((3, 3)))


def test_interpolate_numpy_and_torch_agree_and_differentiate():
    torch = pytest.importorskip("torch")
    v, f = holed_disc(11)
    rng = np.random.default_rng(2)
    field = rng.normal(size=(4, len(v), 3))
    tri = rng.integers(0, len(f), 50)
    bary = rng.dirichlet([1, 1, 1], 50)
    ref = np.einsum("nk,bnkc->bnc", bary, field[:, f[tri]])
    assert np.allclose(interpolate(field, f, tri, bary), ref, atol=1e-12)
    ft = torch.tensor(field, requires_grad=True)
    out = interpolate(ft, f, tri, bary)
    assert out.shape == (4, 50, 3) and out.dtype == torch.float64
    assert np.allclose(out.detach().numpy(), ref, atol=1e-12)
    out.sum().backward()
    # each point spreads total weight 1 over its corners: total gradient = 4 * 50 * 3
    assert float(ft.grad.sum()) == pytest.approx(600.0)

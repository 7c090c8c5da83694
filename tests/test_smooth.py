"""The continuous model's linear basis and smooth interpolation: cm3dmm.nn.smooth (exact at vertices,
quadratics reproduced, continuous across edges, blend with barycentric), cm3dmm.pca_init (the blocks
span the PCA subspace, identity-like directions first) and the model with ``basis`` / ``smooth``
(decode = avg + B z + r against a naive reference, Jacobian, meshes, save / load)."""

import numpy as np
import pytest
import torch

from cm3dmm.config import config_from_dict
from cm3dmm.nn.smooth import SmoothInterpolator, smoothstep_blend
from cm3dmm.template import build_template
from conftest import make_registered

torch.set_num_threads(1)


def jittered_grid(n=9, seed=0):
    """An irregular triangulated square in UV (n x n vertices, interior vertices jittered)."""
    rng = np.random.default_rng(seed)
    u, v = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n), indexing="xy")
    uv = np.stack([u.ravel(), v.ravel()], 1)
    inner = (uv > 0).all(1) & (uv < 1).all(1)
    uv[inner] += rng.uniform(-0.3, 0.3, (inner.sum(), 2)) / (n - 1)
    faces = []
    for r in range(n - 1):
        for c in range(n - 1):
            a = r * n + c
            faces += [[a, a + 1, a + n + 1], [a, a + n + 1, a + n]]
    return uv, np.asarray(faces)


def random_points(uv, faces, k=500, seed=1):
    rng = np.random.default_rng(seed)
    tri = rng.integers(0, len(faces), k)
    b = rng.dirichlet(np.ones(3), k)
    return tri, b, np.einsum("pk,pkc->pc", b, uv[faces[tri]])


def test_blend_weights_partition_of_unity():
    b = np.random.default_rng(0).dirichlet(np.ones(3), 100)
    phi = smoothstep_blend(b)
    np.testing.assert_allclose(phi.sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(smoothstep_blend(np.eye(3)), np.eye(3))
    # on an edge the opposite corner has no weight
    assert np.all(smoothstep_blend(np.array([[0.3, 0.7, 0.0]]))[:, 2] == 0)


def test_exact_at_vertices_and_rows_sum_to_one():
    uv, faces = jittered_grid()
    si = SmoothInterpolator(uv, faces, smoothness=1.0)
    vals = np.random.default_rng(2).normal(size=(len(uv), 3))
    # every vertex, as a corner of each triangle that holds it
    for corner in range(3):
        tri = np.arange(len(faces))
        b = np.zeros((len(faces), 3))
        b[:, corner] = 1.0
        got = si.interpolate(vals, tri, b)
        np.testing.assert_allclose(got, vals[faces[:, corner]], atol=1e-10)
    tri, b, q = random_points(uv, faces)
    _, w = si.weights(tri, b, q)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-10)


def test_reproduces_quadratics_exactly_and_beats_linear_on_smooth_functions():
    uv, faces = jittered_grid()
    si = SmoothInterpolator(uv, faces, smoothness=1.0)
    tri, b, q = random_points(uv, faces)

    def quad(p):
        return (1 + 2 * p[:, 0] - p[:, 1] + 3 * p[:, 0] ** 2 - 2 * p[:, 0] * p[:, 1] + 0.5 * p[:, 1] ** 2)[:, None]

    np.testing.assert_allclose(si.interpolate(quad(uv), tri, b, q), quad(q), atol=1e-8)

    def wave(p):
        return np.sin(3 * p[:, :1]) * np.cos(2 * p[:, 1:])

    lin = np.einsum("pk,pkc->pc", b, wave(uv)[faces[tri]])
    err_lin = np.abs(lin - wave(q)).mean()
    err_smooth = np.abs(si.interpolate(wave(uv), tri, b, q) - wave(q)).mean()
    assert err_smooth < 0.25 * err_lin


def test_continuous_across_edges():
    uv, faces = jittered_grid()
    si = SmoothInterpolator(uv, faces, smoothness=1.0)
    vals = np.random.default_rng(3).normal(size=(len(uv), 2))
    # a point on the edge shared by triangles 0 and 1 (corners 0 and 2 of triangle 0 = corners 0 and 1 of 1)
    assert faces[0, 0] == faces[1, 0] and faces[0, 2] == faces[1, 1]
    t = 0.37
    a = si.interpolate(vals, np.array([0]), np.array([[1 - t, 0.0, t]]))
    b = si.interpolate(vals, np.array([1]), np.array([[1 - t, t, 0.0]]))
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_smoothness_blends_with_barycentric_and_matrix_agrees():
    uv, faces = jittered_grid()
    vals = np.random.default_rng(4).normal(size=(len(uv), 3))
    tri, b, q = random_points(uv, faces, k=200)
    full = SmoothInterpolator(uv, faces, smoothness=1.0).interpolate(vals, tri, b, q)
    lin = SmoothInterpolator(uv, faces, smoothness=0.0).interpolate(vals, tri, b, q)
    np.testing.assert_allclose(lin, np.einsum("pk,pkc->pc", b, vals[faces[tri]]), atol=1e-12)
    half = SmoothInterpolator(uv, faces, smoothness=0.5)
    np.testing.assert_allclose(half.interpolate(vals, tri, b, q), 0.5 * full + 0.5 * lin, atol=1e-12)
    m = half.matrix(tri, b, q, dtype=torch.float64)
    np.testing.assert_allclose((m @ torch.as_tensor(vals)).numpy(), half.interpolate(vals, tri, b, q), atol=1e-12)
    with pytest.raises(ValueError):
        SmoothInterpolator(uv, faces, smoothness=1.5)


def test_neighbourhoods_follow_the_mesh_not_uv_distance():
    """Two strips touching in UV along a slit (like the lips) but not connected in the mesh:
    values on one side never reach the other."""
    uv, faces = jittered_grid(n=6)
    n = 6
    top = uv[:, 1] > 0.5
    slit_faces = np.array([f for f in faces if top[f].all() or (~top[f]).all()])
    si = SmoothInterpolator(uv, slit_faces, smoothness=1.0)
    vals = np.where(top, 1.0, 0.0)[:, None]
    lower = np.flatnonzero(~top[slit_faces].any(1))
    b = np.random.default_rng(5).dirichlet(np.ones(3), len(lower))
    np.testing.assert_allclose(si.interpolate(vals, lower, b), 0.0, atol=1e-12)
    assert n == 6


# ------------------------------------------------------------------------------ PCA start
def test_pca_basis_init_spans_pca_and_orders_blocks():
    from cm3dmm.baselines import fit_pca
    from cm3dmm.pca_init import pca_basis_init

    rng = np.random.default_rng(0)
    n_sub, n_exp, v = 12, 6, 30
    ident = rng.normal(0, 5, (n_sub, 1, v, 3))
    expr = rng.normal(0, 1, (1, n_exp, v, 3)) * rng.uniform(0.5, 1.5, (n_sub, 1, 1, 1))
    x = (ident + expr).reshape(-1, v, 3) + rng.normal(0, 0.01, (n_sub * n_exp, v, 3))
    rows = np.repeat(np.arange(n_sub), n_exp)
    faces = np.array([[0, 1, 2]])
    init = pca_basis_init(x, faces, x.mean(0), rows, id_dim=8, exp_dim=6)
    assert init.basis.shape == (v, 3, 14) and init.pca_dim == 14 and init.mean_offset < 1e-9
    # codes are whitened and reproduce the PCA reconstruction of every face
    z = np.concatenate([init.z_id, init.z_exp], 1)
    recon = x.mean(0) + np.einsum("vcd,sd->svc", init.basis, z)
    pca = fit_pca(x, faces, dim=14)
    np.testing.assert_allclose(recon, pca.decode(pca.train_codes), atol=1e-8)
    np.testing.assert_allclose(z.std(0, ddof=1), 1.0, atol=1e-8)
    # identity block: directions that barely vary within a subject; expression block: the opposite
    assert np.nanmax(init.within[:8]) < np.nanmin(init.within[8:])
    assert np.nanmean(init.within[:8]) < 0.2 and np.nanmean(init.within[8:]) > 0.5


# ------------------------------------------------------------------------------ the model
@pytest.fixture(scope="module")
def template():
    d = make_registered(grid=7)
    mean = d.vertices[d.indices("train")].mean(0)
    t, _ = build_template(mean, d.faces, d.uv, levels=2, mask_resolution=32)
    return t


def basis_model(template, smoothness=0.5, seed=0):
    from cm3dmm.model import ContinuousModel

    cfg = config_from_dict({"model": {
        "id_dim": 4, "exp_dim": 3, "basis": True, "interpolation": "smooth", "smoothness": smoothness,
        "encoder": {"n_levels": 3, "n_features": 2, "base_resolution": 2, "finest_resolution": 8},
        "decoder": {"widths": [16, 8]}}}).model
    torch.manual_seed(seed)
    m = ContinuousModel(template, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval().requires_grad_(False)


def naive_decode(m, tri, bary, uv, zi, ze):
    """avg + B z + r from per-vertex values with the interpolator's weights, one point at a time."""
    codes = torch.cat([zi, ze], 1)
    r_v = m.decoder(codes[:, None, :], m.encoder(m.uv))  # (B, V, 3)
    idx, w = m._smooth.weights(tri, bary, uv)
    out = torch.zeros(len(codes), len(tri), 3)
    for p in range(len(tri)):
        for j in range(idx.shape[1]):
            k = int(idx[p, j])
            out[:, p] += float(w[p, j]) * (m.mean[k] + torch.einsum("cd,bd->bc", m.basis[k], codes) + r_v[:, k])
    return out


def test_basis_model_decode_matches_naive_reference(template):
    m = basis_model(template)
    g = torch.Generator().manual_seed(3)
    zi, ze = torch.randn(2, 4, generator=g), torch.randn(2, 3, generator=g)
    faces = np.asarray(template.faces)
    tri, b, q = random_points(np.asarray(template.uv, np.float64), faces, k=40, seed=4)
    pts = m.points_at(tri, b, torch.as_tensor(q, dtype=torch.float32))
    got = m.decode(pts.uv, zi, ze, pts=pts)
    np.testing.assert_allclose(got.numpy(), naive_decode(m, tri, b, q, zi, ze).numpy(), atol=1e-4)
    # located from the UVs alone: the same
    np.testing.assert_allclose(m.decode(pts.uv, zi, ze).numpy(), got.numpy(), atol=1e-4)
    # per-face UVs (training): face b's points decoded with face b's codes
    uvb = torch.stack([pts.uv, pts.uv.flip(0)])
    both = m.decode(uvb, zi, ze)
    np.testing.assert_allclose(both[0].numpy(), got[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(both[1].numpy(), m.decode(pts.uv.flip(0), zi[1:], ze[1:])[0].numpy(), atol=1e-4)


def test_basis_model_at_vertices_and_fitting_context(template):
    from cm3dmm.methods import NeuralFace

    m = basis_model(template)
    g = torch.Generator().manual_seed(5)
    zi, ze = torch.randn(3, 4, generator=g), torch.randn(3, 3, generator=g)
    codes = torch.cat([zi, ze], 1)
    r = m.decoder(codes[:, None, :], m.encoder(m.uv))
    ref = m.mean + torch.einsum("vcd,bd->bvc", m.basis, codes) + r
    fm = NeuralFace(m)
    ctx = fm.context(None)
    np.testing.assert_allclose(fm.decode(ctx, zi, ze).numpy(), ref.numpy(), atol=1e-4)
    np.testing.assert_allclose(m.decode(m.uv, zi, ze).numpy(), ref.numpy(), atol=1e-4)
    # Jacobian = basis + d r / d z, against autograd
    out, jac = fm.jacobian(ctx, zi.double().float(), ze)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-4)
    auto = torch.autograd.functional.jacobian(
        lambda c: m.decode(m.uv, c[None, :4], c[None, 4:])[0], codes[1])  # (V, 3, D)
    np.testing.assert_allclose(jac[1].numpy(), auto.numpy(), atol=1e-4)
    # level 0 mesh = the vertices; a context away from the vertices is refused with a reason
    verts, _ = m.mesh(zi, ze, level=0)
    np.testing.assert_allclose(verts.numpy(), ref.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="template vertices"):
        m.precompute(torch.tensor([[0.31, 0.42]]))


def test_vertex_queries_from_float32_uvs_read_one_vertex(template):
    """Training samples are template vertices whose UVs the cache stores as float32: located, they land a
    few 1e-7 off the corner; they must read that vertex alone (one weight of 1), like the exact UVs, and
    mixed batches (vertices and points between them) agree with the naive reference row by row."""
    from cm3dmm.model import VERTEX_SNAP

    m = basis_model(template)
    uv32 = torch.as_tensor(np.asarray(template.uv, np.float32))
    pts = m.points(uv32)
    assert pts.index.shape[1] == 1
    np.testing.assert_array_equal(pts.index[:, 0].numpy(), np.arange(template.n_vertices))
    np.testing.assert_array_equal(pts.weight.numpy(), 1.0)
    # the float32 UVs do locate off the corners (else this test would not test the snap)
    tri, bary, _ = template.locator.locate(uv32.numpy().astype(np.float64))
    assert (bary.max(1) < 1.0).any() and (bary.max(1) >= 1.0 - VERTEX_SNAP).all()
    g = torch.Generator().manual_seed(7)
    zi, ze = torch.randn(2, 4, generator=g), torch.randn(2, 3, generator=g)
    faces = np.asarray(template.faces)
    tri2, b2, q2 = random_points(np.asarray(template.uv, np.float64), faces, k=15, seed=8)
    uv_mix = torch.cat([uv32[:10], torch.as_tensor(q2, dtype=torch.float32)])
    got = m.decode(uv_mix, zi, ze)
    ref_v = naive_decode(m, *_corner_points(faces, np.arange(10)), zi, ze)
    np.testing.assert_allclose(got[:, :10].numpy(), ref_v.numpy(), atol=1e-4)
    np.testing.assert_allclose(got[:, 10:].numpy(), naive_decode(m, tri2, b2, q2, zi, ze).numpy(), atol=1e-4)
    # a point just beyond the snap tolerance is interpolated, not snapped
    t0 = 0
    b_far = np.array([[1.0 - 10 * VERTEX_SNAP, 10 * VERTEX_SNAP, 0.0]])
    far = m.points_at(np.array([t0]), b_far)
    assert far.index.shape[1] > 1


def _corner_points(faces, vertices):
    """(triangle, barycentrics, uv=None) of template vertices: a triangle holding each, one-hot weights."""
    tri = np.array([int(np.flatnonzero((faces == v).any(1))[0]) for v in vertices])
    bary = (faces[tri] == np.asarray(vertices)[:, None]).astype(np.float64)
    return tri, bary, None


def test_smooth_mesh_levels_between_vertices(template):
    """Level points lie on the smooth surface: the naive reference at their (triangle, barycentrics)."""
    m = basis_model(template, smoothness=1.0)
    zi, ze = torch.zeros(1, 4), torch.zeros(1, 3)
    verts, faces = m.mesh(zi, ze, level=1)
    lvl = template.levels[1]
    ref = naive_decode(m, np.asarray(lvl.tri), np.asarray(lvl.bary), np.asarray(lvl.uv, np.float64), zi, ze)
    np.testing.assert_allclose(verts.numpy(), ref.numpy(), atol=1e-4)
    assert faces.shape == np.asarray(lvl.faces).shape


def test_basis_model_save_load_round_trip(template, tmp_path):
    from cm3dmm.model import load_model, save_model

    m = basis_model(template)
    save_model(tmp_path / "model.pt", m, {"note": "x"})
    m2, extra = load_model(tmp_path / "model.pt")
    assert m2.basis is not None and m2.smooth and m2.cfg.smoothness == 0.5
    zi, ze = torch.ones(1, 4), -torch.ones(1, 3)
    uv = torch.tensor([[0.2, 0.3], [0.55, 0.61]])
    with torch.no_grad():
        np.testing.assert_allclose(m2.decode(uv, zi, ze).numpy(), m.decode(uv, zi, ze).numpy(), atol=1e-6)

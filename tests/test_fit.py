"""Fitting: codes recovered from faces the model made (registered and raw point clouds),
the closed-form / ALS baselines, the normal equations against autograd, bad input."""

import json
import math
import types

import numpy as np
import pytest
import torch

from cm3dmm.config import DecoderConfig, EncoderConfig, FitConfig, ModelConfig
from cm3dmm.errors import InputError
from _meshes import axis_rotation as _rot
from cm3dmm.fit import Codes, Targets, fit_registered, fit_scans, read_scan, resolve_units, run_fit
from cm3dmm.fit.objective import _Problem
from cm3dmm.methods import BilinearFace, CodePrior, NeuralFace, PCAFace

torch.set_num_threads(1)


def _grid_template(n=12):
    """An asymmetric face-like grid (mm): nose bump above centre, sloped chin."""
    u, v = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n), indexing="xy")
    uv = np.stack([u.ravel(), v.ravel()], 1)
    z = 35 * np.exp(-((uv[:, 0] - 0.5) ** 2 / 0.02 + (uv[:, 1] - 0.62) ** 2 / 0.05)) + 15 * uv[:, 1] \
        - 80 * (uv[:, 0] - 0.5) ** 2
    mean = np.stack([(uv[:, 0] - 0.5) * 140, (uv[:, 1] - 0.5) * 180, z], 1)
    faces = []
    for r in range(n - 1):
        for c in range(n - 1):
            a = r * n + c
            faces += [[a, a + 1, a + n + 1], [a, a + n + 1, a + n]]
    return types.SimpleNamespace(mean=mean.astype(np.float32), faces=np.array(faces), uv=uv.astype(np.float32),
                                 levels=[], landmarks={"nose": int(np.argmax(z)), "c0": 0, "c1": n - 1,
                                                       "c2": n * n - 1, "c3": n * (n - 1)}, hash="t")


def _neural(di=4, de=4, seed=0, n=12):
    from cm3dmm.model import ContinuousModel

    torch.manual_seed(seed)
    cfg = ModelConfig(id_dim=di, exp_dim=de, encoder=EncoderConfig(n_levels=2, n_features=2, finest_resolution=8),
                      decoder=DecoderConfig(widths=[32, 16]))
    m = ContinuousModel(_grid_template(n), cfg)
    with torch.no_grad():  # an expressive random field (an untrained decoder's output is ~0)
        m.decoder.out.weight.normal_(0, 1.0 / math.sqrt(16))
        for p in m.encoder.parameters():
            p.normal_(0, 0.5)
    return NeuralFace(m, CodePrior.standard(di, 1.0), CodePrior.standard(de, 1.0))


def _subject_codes(fm, n_expr=3, seed=1, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    zi = (torch.randn(1, fm.id_dim, generator=g) * scale).expand(n_expr, -1).contiguous()
    ze = torch.randn(n_expr, fm.exp_dim, generator=g) * scale
    return zi, ze


@pytest.fixture(scope="module")
def neural():
    return _neural()


# ------------------------------------------------------------------------------------- core math
def test_normal_equations_match_autograd(neural):
    """J^T W r / W and the data energy from the analytic Jacobian = autograd of the energy."""
    zi, ze = _subject_codes(neural)
    x = neural.vertices(zi, ze) + np.random.default_rng(0).normal(0, 0.5, (3, neural.n_vertices, 3))
    t = Targets.vertices(x)
    t.normals = None
    prob = _Problem(neural, t, prior_weight=0.0)
    codes = Codes(torch.zeros(3, 4), torch.zeros(3, 4), shared=False)
    a, g, e = prob.normal_equations(codes)
    zi_ = torch.zeros(3, 4, requires_grad=True)
    ze_ = torch.zeros(3, 4, requires_grad=True)
    ed = prob.data_energy(prob.positions(Codes(zi_, ze_, False)))
    ed.sum().backward()
    np.testing.assert_allclose(e.numpy(), ed.detach().numpy(), rtol=1e-5)
    np.testing.assert_allclose(2 * g[:, :4].numpy(), zi_.grad.numpy(), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(2 * g[:, 4:].numpy(), ze_.grad.numpy(), rtol=1e-3, atol=1e-5)
    assert torch.linalg.eigvalsh(a).min() > 0  # a proper Gauss-Newton matrix


def test_neural_jacobian_matches_forward_mode(neural):
    from cm3dmm.methods import FaceModel

    zi, ze = _subject_codes(neural)
    ctx = neural.context(np.arange(0, neural.n_vertices, 7))
    x1, j1 = neural.jacobian(ctx, zi, ze)
    x2, j2 = FaceModel.jacobian(neural, ctx, zi, ze)
    np.testing.assert_allclose(x1.numpy(), x2.numpy(), atol=1e-4)
    np.testing.assert_allclose(j1.numpy(), j2.numpy(), atol=1e-4)
    assert j1.abs().max() > 0.1


# ------------------------------------------------------------------------------------- registered
@pytest.mark.parametrize("optimizer", ["lm", "lbfgs"])
def test_registered_fit_recovers_known_codes(neural, optimizer):
    zi, ze = _subject_codes(neural)
    x = neural.vertices(zi, ze)
    res = fit_registered(neural, x, FitConfig(optimizer=optimizer, prior_weight=1e-9, points=60, max_iter=60))
    assert res.shared_identity and res.info.converged
    assert res.errors.max() < 1e-3  # mm
    np.testing.assert_allclose(res.z_id, zi.numpy(), atol=2e-3)
    np.testing.assert_allclose(res.z_exp, ze.numpy(), atol=2e-3)
    assert res.vertices.shape == x.shape


def test_per_face_mode_fits_independent_identities(neural):
    zi, ze = _subject_codes(neural)
    zi = zi + torch.tensor([[0.0], [0.3], [-0.3]])  # different identities
    x = neural.vertices(zi, ze)
    res = fit_registered(neural, x, FitConfig(mode="per-face", prior_weight=1e-9, points=0))
    assert not res.shared_identity
    assert res.errors.max() < 1e-3
    np.testing.assert_allclose(res.z_id, zi.numpy(), atol=2e-3)


@pytest.mark.parametrize("shared,pose", [(False, False), (True, False), (True, True)])
def test_structured_lm_follows_the_dense_lm(neural, shared, pose):
    """The block-structured solver (batched per-face solves / Schur complement on the shared
    identity, cached normal equations after rejected steps) takes the same steps as the dense
    reference solver (one system per group, assembled and solved naively)."""
    from cm3dmm.fit import solve_lm, solve_lm_structured

    zi, ze = _subject_codes(neural)
    rng = np.random.default_rng(3)
    x = neural.vertices(zi, ze) + rng.normal(0, 0.3, (3, neural.n_vertices, 3))
    if pose:  # move the targets: the unknowns then include a rigid motion per face
        x = x @ _rot(1, 4).T + [1.0, -0.5, 0.3]
    prob = _Problem(neural, Targets.vertices(x), prior_weight=1e-2, delta=0.05)
    z0i, z0e = neural.mean_codes(3)
    start = Codes(z0i[:1].clone() if shared else z0i, z0e, shared)
    if pose:
        start = start.with_pose()
    ref, ref_info = solve_lm(prob, start, 12, 0.0)
    new, new_info = solve_lm_structured(prob, start, 12, 0.0)
    np.testing.assert_allclose(new_info.history, ref_info.history, rtol=1e-6)
    np.testing.assert_allclose(new.z_id.numpy(), ref.z_id.numpy(), atol=1e-5)
    np.testing.assert_allclose(new.z_exp.numpy(), ref.z_exp.numpy(), atol=1e-5)
    if pose:
        np.testing.assert_allclose(new.trans.numpy(), ref.trans.numpy(), atol=1e-5)
    assert new_info.objective == pytest.approx(prob.energy(new), rel=1e-9)
    assert new_info.history[-1] < 0.8 * prob.energy(start)  # it did descend
    assert new_info.jacobians <= ref_info.jacobians  # rejected steps reuse the normal equations


def test_structured_step_equals_dense_solve():
    """The Schur-complement step on a shared identity = the dense solve of the assembled system."""
    from cm3dmm.fit.solve import _structured_step

    g = torch.Generator().manual_seed(0)
    b, di, de = 4, 5, 3
    jac = torch.randn(b, 40, di + de, generator=g, dtype=torch.float64)
    a = jac.transpose(1, 2) @ jac
    grad = torch.randn(b, di + de, generator=g, dtype=torch.float64)
    hid, pe = torch.rand(di, dtype=torch.float64), torch.rand(de, dtype=torch.float64)
    gid, gpe = torch.randn(1, di, dtype=torch.float64), torch.randn(b, de, dtype=torch.float64)
    mu = torch.tensor([0.1], dtype=torch.float64)
    si, se, pred = _structured_step(a, grad, hid, gid, pe, gpe, mu, True, di)
    n = di + b * de
    h = torch.zeros(n, n, dtype=torch.float64)
    r = torch.zeros(n, dtype=torch.float64)
    h[:di, :di] = torch.diag(hid)
    r[:di] = gid[0]
    for k in range(b):
        ix = torch.as_tensor(list(range(di)) + list(range(di + k * de, di + (k + 1) * de)))
        h[ix[:, None], ix[None, :]] += a[k]
        r[ix] += grad[k]
        h[di + k * de:di + (k + 1) * de, di + k * de:di + (k + 1) * de] += torch.diag(pe)
        r[di + k * de:di + (k + 1) * de] += gpe[k]
    hd = h + 0.1 * torch.diag(torch.diagonal(h))
    step = -torch.linalg.solve(hd, r)
    np.testing.assert_allclose(si[0].numpy(), step[:di].numpy(), atol=1e-10)
    np.testing.assert_allclose(se.reshape(-1).numpy(), step[di:].numpy(), atol=1e-10)
    assert float(pred[0]) == pytest.approx(float(-(r @ step) - 0.5 * step @ h @ step), rel=1e-10)
    # per face: a batch of independent dense solves
    si, se, pred = _structured_step(a, grad, hid, gid.expand(b, -1), pe, gpe, mu.expand(b), False, di)
    for k in range(b):
        hk = a[k].clone()
        hk[:di, :di] += torch.diag(hid)
        hk[di:, di:] += torch.diag(pe)
        rk = torch.cat([grad[k, :di] + gid[0], grad[k, di:] + gpe[k]])
        sk = -torch.linalg.solve(hk + 0.1 * torch.diag(torch.diagonal(hk)), rk)
        np.testing.assert_allclose(torch.cat([si[k], se[k]]).numpy(), sk.numpy(), atol=1e-10)


def test_lm_stages_and_budget(neural):
    """Coarse subset, then the main subset; max_iter bounds them together; a coarse stage only
    when it is smaller than the main one."""
    from cm3dmm.fit import lm_stages

    cfg = FitConfig(max_iter=30, coarse_points=150, coarse_iters=20, points=600)
    assert lm_stages(cfg, 2000) == [(150, 20), (600, 30)]
    assert lm_stages(cfg, 400) == [(150, 20), (0, 30)]  # fewer points than `points`: all of them
    assert lm_stages(FitConfig(max_iter=30, coarse_points=0, points=600), 2000) == [(600, 30)]
    assert lm_stages(FitConfig(max_iter=5, coarse_points=700, points=600), 2000) == [(600, 5)]
    zi, ze = _subject_codes(neural)
    x = neural.vertices(zi, ze)
    res = fit_registered(neural, x, FitConfig(prior_weight=1e-9, coarse_points=40, coarse_iters=10, points=80,
                                              max_iter=80, polish_iters=1))
    assert res.info.iterations <= 81
    assert res.errors.max() < 2e-3


# ------------------------------------------------------------------------------------- scans
def _point_cloud(verts, faces, n, rng):
    from cm3dmm.geometry import sample_surface

    tri, bary = sample_surface(verts, faces, n, rng)
    return np.einsum("pk,pkc->pc", bary, verts[faces[tri]])


def test_point_cloud_in_metres_recovers_code(neural, tmp_path):
    from cm3dmm.io.mesh import Mesh, write_mesh

    rng = np.random.default_rng(5)
    zi, ze = _subject_codes(neural, n_expr=1, seed=3, scale=0.4)
    x = neural.vertices(zi, ze)[0]
    pts = _point_cloud(x, neural.faces, 3000, rng)  # a subsample of the surface, no correspondence
    r = _rot(1, 25) @ _rot(0, -15)
    scan_m = ((pts @ r.T + np.array([30.0, -80.0, 400.0])) + rng.normal(0, 0.1, pts.shape)) / 1000.0
    path = tmp_path / "cloud.ply"
    write_mesh(path, Mesh(scan_m, np.zeros((0, 3))))
    scan = read_scan(path, "auto")
    assert scan.units == "m" and scan.faces is None
    res = fit_scans(neural, [scan], FitConfig(prior_weight=1e-6, trim=0.05, scan_iters=6, max_iter=30))
    err = np.linalg.norm(res.vertices[0] - x, axis=1)
    assert err.mean() < 0.3, err.mean()  # mm, model frame (noise 0.1 mm)
    assert res.errors[0] < 0.3
    np.testing.assert_allclose(res.z_exp, ze.numpy(), atol=0.08)
    np.testing.assert_allclose(res.z_id, zi.numpy(), atol=0.08)
    # the pose maps the scan (mm) onto the model: rotation close to r^T
    rot = res.transforms[0].rotation
    assert np.degrees(np.arccos(np.clip((np.trace(rot @ r) - 1) / 2, -1, 1))) < 1.0


def test_scan_prior_floor_holds_the_codes(neural):
    """fit.scan_prior_floor: the last alternation's prior weight is at least this; a heavy floor keeps
    the codes near the prior mean (the fit is then worse on this face, whose codes are far out)."""
    from cm3dmm.fit import Scan

    rng = np.random.default_rng(8)
    zi, ze = _subject_codes(neural, n_expr=1, seed=3, scale=0.4)
    x = neural.vertices(zi, ze)[0]
    scan = Scan(_point_cloud(x, neural.faces, 2000, rng), name="cloud")
    kw = dict(prior_weight=1e-6, trim=0.05, scan_iters=4, max_iter=20)
    free = fit_scans(neural, [scan], FitConfig(**kw))
    held = fit_scans(neural, [scan], FitConfig(**kw, scan_prior_floor=10.0))
    norm = lambda r: float(np.linalg.norm(np.concatenate([r.z_id.ravel(), r.z_exp.ravel()])))
    truth = float(np.linalg.norm(np.concatenate([zi.numpy().ravel(), ze.numpy().ravel()])))
    assert abs(norm(free) - truth) < 0.2 * truth, (norm(free), truth)
    assert norm(held) < 0.5 * norm(free), (norm(held), norm(free))
    assert np.linalg.norm(held.vertices[0] - x, axis=1).mean() > np.linalg.norm(free.vertices[0] - x, axis=1).mean()


def test_scan_with_landmarks_and_far_pose(neural):
    from cm3dmm.fit import Scan

    rng = np.random.default_rng(6)
    zi, ze = _subject_codes(neural, n_expr=2, seed=4, scale=0.4)
    xs = neural.vertices(zi, ze)
    scans = []
    for k in range(2):
        r = _rot(2, 170) @ _rot(1, 80)
        t = np.array([1000.0, 20.0, -300.0])
        pts = _point_cloud(xs[k], neural.faces, 1500, rng) @ r.T + t
        lms = {name: xs[k][v] @ r.T + t for name, v in neural.landmarks.items()}
        scans.append(Scan(pts, landmarks=lms if k == 0 else {}, name=f"e{k}"))
    res = fit_scans(neural, scans, FitConfig(prior_weight=1e-6, trim=0.05, scan_iters=5, max_iter=50))
    assert res.shared_identity
    for k in range(2):  # scan 0 aligned from landmarks, scan 1 by the robust initialisation
        assert np.linalg.norm(res.vertices[k] - xs[k], axis=1).mean() < 0.3
        rot = res.transforms[k].rotation @ (_rot(2, 170) @ _rot(1, 80))
        assert np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1))) < 0.5


# ------------------------------------------------------------------------------------- baselines
def test_pca_fit_equals_normal_equations():
    rng = np.random.default_rng(7)
    tpl = _grid_template(6)
    v, d = len(tpl.mean), 5
    q, _ = np.linalg.qr(rng.normal(size=(3 * v, d)))
    basis = q.T.reshape(d, v, 3) * 10
    std = np.array([5.0, 3.0, 2.0, 1.0, 0.5])
    fm = PCAFace(tpl.mean, basis, std, tpl.faces)
    targets = tpl.mean + rng.normal(0, 2.0, (2, v, 3))
    lam = 0.05
    res = fit_registered(fm, targets, FitConfig(prior_weight=lam, loss="squared"))
    assert not res.shared_identity and res.z_exp.shape == (2, 0)
    # normal equations of (1/V)|B z - (t - m)|^2 + lam |z / std|^2
    a = basis.reshape(d, -1).T
    for b in range(2):
        rhs = (targets[b] - tpl.mean).reshape(-1)
        z = np.linalg.solve(a.T @ a / v + lam * np.diag(1 / std ** 2), a.T @ rhs / v)
        np.testing.assert_allclose(res.z_id[b], z, rtol=1e-4, atol=1e-5)


def test_bilinear_fit_recovers_its_own_faces():
    rng = np.random.default_rng(8)
    tpl = _grid_template(6)
    v, di, de = len(tpl.mean), 3, 4
    core = rng.normal(0, 3.0, (di + 1, de + 1, v, 3))
    core[0, 0] = tpl.mean
    fm = BilinearFace(core, tpl.faces, CodePrior.standard(di), CodePrior.standard(de))
    wi = np.repeat(rng.normal(size=(1, di)), 3, 0)
    we = rng.normal(size=(3, de))
    x = fm.vertices(torch.tensor(wi, dtype=torch.float32), torch.tensor(we, dtype=torch.float32))
    res = fit_registered(fm, x, FitConfig(prior_weight=1e-10, max_iter=200, tol=1e-12))
    assert res.shared_identity
    assert res.errors.max() < 1e-2, res.errors
    np.testing.assert_allclose(res.z_id, wi, atol=1e-2)


def test_bilinear_decode_and_jacobian_equal_the_naive_contraction():
    """BilinearFace's matrix-product decode / closed-form Jacobian against the plain einsum of
    x = sum_ij a_i b_j core_ij and forward-mode autodiff, on a vertex subset."""
    from cm3dmm.methods import FaceModel

    rng = np.random.default_rng(3)
    tpl = _grid_template(6)
    v, di, de = len(tpl.mean), 3, 5
    core = rng.normal(0, 2.0, (di + 1, de + 1, v, 3))
    fm = BilinearFace(core, tpl.faces, CodePrior.standard(di), CodePrior.standard(de))
    zi = torch.tensor(rng.normal(size=(4, di)), dtype=torch.float32)
    ze = torch.tensor(rng.normal(size=(4, de)), dtype=torch.float32)
    ids = np.arange(1, v, 3)
    ctx = fm.context(ids)
    a = np.concatenate([np.ones((4, 1)), zi.double().numpy()], 1)
    b = np.concatenate([np.ones((4, 1)), ze.double().numpy()], 1)
    naive = np.einsum("bi,bj,ijmc->bmc", a, b, core[:, :, ids])
    np.testing.assert_allclose(fm.decode(ctx, zi, ze).double().numpy(), naive, rtol=1e-5, atol=1e-4)
    x, jac = fm.jacobian(ctx, zi, ze)
    np.testing.assert_allclose(x.double().numpy(), naive, rtol=1e-5, atol=1e-4)
    assert jac.shape == (4, len(ids), 3, di + de)
    x2, j2 = FaceModel.jacobian(fm, ctx, zi, ze)
    np.testing.assert_allclose(jac.numpy(), j2.numpy(), rtol=1e-5, atol=1e-4)
    # d x / d z_exp[j] of face 0 by hand
    j_exp = np.einsum("i,imc->mc", a[0], core[:, 3][:, ids])
    np.testing.assert_allclose(jac[0, :, :, di + 2].double().numpy(), j_exp, rtol=1e-5, atol=1e-4)


def test_baseline_files_load_through_one_interface(tmp_path):
    from cm3dmm.baselines import fit_pca
    from cm3dmm.methods import load_method
    from tests.conftest import make_registered

    data = make_registered()
    tr = data.indices("train")
    pca = fit_pca(data.vertices[tr], data.faces, dim=4)
    pca.save(tmp_path / "pca.pt")
    fm = load_method(tmp_path / "pca.pt")
    assert isinstance(fm, PCAFace) and fm.id_dim == pca.dim and fm.exp_dim == 0
    codes = pca.train_codes[:2]
    np.testing.assert_allclose(fm.vertices(torch.tensor(codes, dtype=torch.float32), torch.zeros(2, 0)),
                               pca.decode(codes), atol=1e-3)


# ------------------------------------------------------------------------------------- bad input
def test_units_detection():
    pts = np.random.default_rng(0).uniform(-75, 75, (100, 3))
    assert resolve_units(pts, "auto")[1] == "mm"
    assert resolve_units(pts / 10, "auto")[1] == "cm"
    assert resolve_units(pts / 1000, "auto") == (1000.0, "m")
    with pytest.raises(InputError, match="looks like m"):
        resolve_units(pts / 1000, "mm", "s.ply")
    with pytest.raises(InputError, match="none of mm, cm, m"):
        resolve_units(pts * 100, "auto", "s.ply")


def _write_points(path, pts):
    lines = ["ply", "format ascii 1.0", f"element vertex {len(pts)}", "property float x", "property float y",
             "property float z", "end_header"] + [" ".join(str(c) for c in p) for p in pts]
    path.write_text("\n".join(lines) + "\n")


def test_bad_scans_raise_input_error_naming_the_file(tmp_path):
    empty = tmp_path / "empty.ply"
    _write_points(empty, np.zeros((0, 3)))
    with pytest.raises(InputError, match="no (points|vertices)") as ei:
        read_scan(empty)
    assert "empty.ply" in str(ei.value)
    nan = tmp_path / "nan.ply"
    pts = np.random.default_rng(0).uniform(-70, 70, (50, 3))
    pts[3, 1] = np.nan
    _write_points(nan, pts)
    with pytest.raises(InputError, match="NaN"):
        read_scan(nan)
    metres = tmp_path / "m.ply"
    _write_points(metres, pts[4:] / 1000)
    with pytest.raises(InputError, match="--units m"):
        read_scan(metres, "mm")
    assert read_scan(metres, "auto").units == "m"


# ------------------------------------------------------------------------------------- the stage
@pytest.fixture
def pca_run(tmp_path):
    from cm3dmm.baselines import fit_pca
    from cm3dmm.config import config_from_dict
    from cm3dmm.paths import RunPaths
    from cm3dmm.registered import write_registered
    from tests.conftest import make_registered

    cfg = config_from_dict({"run": "r", "results": str(tmp_path / "results")})
    paths = RunPaths.of(cfg.run_dir)
    data = make_registered(n_subjects=6, n_expr=3, grid=8, test_subjects=1)
    write_registered(paths.registered, data)
    tr = data.indices("train")
    fit_pca(data.vertices[tr], data.faces, dim=6).save(paths.model("pca"))
    return cfg, paths, data


def test_run_fit_writes_npz_json_png_for_a_test_subject(pca_run):
    cfg, paths, data = pca_run
    subj = data.subjects("test")[0]
    summary = run_fit(cfg, method="pca", subject=subj)
    npz = np.load(paths.fit_npz("pca", subj))
    assert npz["vertices"].shape == (3, data.n_vertices, 3)
    assert list(npz["expressions"]) == [e for s, e in zip(data.subject, data.expression) if s == subj]
    js = json.loads(paths.fit_json("pca", subj).read_text())
    assert js["convergence"]["converged"] and js["mode"] == "per-face"
    assert js["mean_error_mm"] == pytest.approx(float(npz["errors"].mean()), rel=1e-5)
    assert js["mean_error_mm"] == pytest.approx(summary["mean_error_mm"])
    ref = np.linalg.norm(npz["vertices"] - data.vertices[data.indices("test")], axis=-1).mean(1)
    np.testing.assert_allclose(npz["errors"], ref, rtol=1e-4)
    assert paths.fit_png("pca", subj).stat().st_size > 1000


def test_run_fit_wrong_topology_registered_leaves_no_output(pca_run, tmp_path):
    from cm3dmm.io.mesh import Mesh, write_mesh

    cfg, paths, data = pca_run
    bad = tmp_path / "bad.obj"
    write_mesh(bad, Mesh(data.vertices[0][:-3], np.zeros((0, 3))))
    out = tmp_path / "out" / "fit.npz"
    with pytest.raises(InputError, match="vertices") as ei:
        run_fit(cfg, method="pca", scan=[str(bad)], registered=True, out=str(out))
    assert "bad.obj" in str(ei.value)
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_run_fit_registered_mesh_writes_meshes(pca_run, tmp_path):
    from cm3dmm.io.mesh import Mesh, read_mesh, write_mesh

    cfg, paths, data = pca_run
    src = tmp_path / "face.obj"
    write_mesh(src, Mesh(data.vertices[-1], data.faces))
    out = tmp_path / "out" / "mine.npz"
    summary = run_fit(cfg, method="pca", scan=[str(src)], registered=True, out=str(out))
    assert out.exists() and out.with_suffix(".json").exists()
    (mesh_path,) = summary["meshes"]
    assert read_mesh(mesh_path).vertices.shape == (data.n_vertices, 3)


def test_spd_solver_matches_numpy_with_two_threads():
    """_solve_spd on a batch of large damped normal-equation systems with 2 torch threads (batched
    LU hangs or fails there in this torch build) equals numpy's solve; a non-positive-definite
    system in the batch goes through the per-system LU fallback."""
    from cm3dmm.fit.solve import _solve_spd

    rng = np.random.default_rng(0)
    j = rng.normal(size=(6, 300, 260))
    a = np.einsum("bki,bkj->bij", j, j) + 1e-3 * np.eye(260)
    a[2] = np.diag(np.r_[-1.0, np.ones(259)])  # indefinite: Cholesky fails
    b = rng.normal(size=(6, 260, 2))
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, info = _solve_spd(torch.as_tensor(a), torch.as_tensor(b))
    finally:
        torch.set_num_threads(old)
    assert (info == 0).all()
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(a, b), rtol=1e-6, atol=1e-8)


def test_landmark_name_errors_name_the_landmarks_file(tmp_path):
    """Too few landmark names in common with the template: the error names the landmarks file, not the scan."""
    from cm3dmm.errors import InputError
    from cm3dmm.fit import Scan, landmark_pose

    class _Model:
        landmarks = {"nose_tip": 0, "chin": 1, "mouth_left": 2}
        mean = np.zeros((3, 3))

    lm_file = tmp_path / "marks.json"
    scan = Scan(np.zeros((20, 3)), landmarks={"nose_tip": np.zeros(3), "elbow": np.ones(3)},
                path=str(tmp_path / "scan.ply"), landmarks_path=str(lm_file))
    with pytest.raises(InputError) as err:
        landmark_pose(scan, _Model(), with_scale=False)
    assert "marks.json" in str(err.value) and "scan.ply" not in str(err.value)
    assert "share only 1 names" in str(err.value)


def test_run_fit_level_beyond_the_models_levels_fails_before_fitting(pca_run, tmp_path):
    """fit.level above the levels of the model's template (a --model from elsewhere): one line naming
    the model, before any fitting, and nothing written."""
    import dataclasses

    cfg, paths, data = pca_run
    subj = data.subjects("test")[0]
    fm_levels = 1  # a PCA model file carries no upsampling levels: level 0 only
    bad = dataclasses.replace(cfg, fit=dataclasses.replace(cfg.fit, level=fm_levels + 1))
    with pytest.raises(InputError, match="fit.level 2 does not exist") as ei:
        run_fit(bad, method="pca", subject=subj, model=str(paths.model("pca")))
    assert "model.pt" in str(ei.value)
    assert not paths.fit_npz("pca", subj).exists() and not paths.fit_png("pca", subj).exists()


def test_read_fit_is_the_one_reader(tmp_path):
    """cm3dmm.fit.io.read_fit: the arrays of a fit file; missing, truncated and foreign files are one
    InputError naming the file (the messages of docs/bad-input.md rows 62-64)."""
    from cm3dmm.fit import read_fit

    good = tmp_path / "s.npz"
    np.savez(good, expressions=np.array(["a"]), vertices=np.zeros((1, 4, 3)), z_id=np.zeros((1, 2)),
             z_exp=np.zeros((1, 2)), seconds=np.array(1.5))
    z = read_fit(good)
    assert z["vertices"].shape == (1, 4, 3) and float(z["seconds"]) == 1.5
    with pytest.raises(InputError, match="fit file not found") as ei:
        read_fit(tmp_path / "none.npz")
    assert str(ei.value.path).endswith("none.npz")
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="corrupt or truncated"):
        read_fit(cut)
    other = tmp_path / "other.npz"
    np.savez(other, a=np.zeros(3))
    with pytest.raises(InputError, match="lacks expressions, vertices, z_id, z_exp, seconds"):
        read_fit(other)

"""PCA and bilinear baselines: exactness on synthetic low-rank data, fits (through the FaceModel
interface and cm3dmm.fit, as every stage fits them) vs normal equations, Tucker recovery,
level points, persistence and error handling."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from cm3dmm.baselines import (
    BilinearModel,
    PCAModel,
    fit_bilinear,
    fit_pca,
    load_baseline,
    train_baseline,
)
from cm3dmm.config import BaselineConfig, FitConfig
from cm3dmm.errors import InputError
from cm3dmm.fit import fit_registered
from cm3dmm.methods import baseline_face
from cm3dmm.registered import RegisteredData

V = 40
FACES = np.array([[i, i + 1, i + 2] for i in range(V - 2)], np.int32)


def _low_rank(n: int, rank: int, seed: int = 0) -> np.ndarray:
    """n faces (n, V, 3) = mean + rank random directions with random codes (mm scale)."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(0, 50, (V, 3))
    basis = rng.normal(0, 1, (rank, V, 3))
    codes = rng.normal(0, 5, (n, rank))
    return mean + np.einsum("nr,rvc->nvc", codes, basis)


def _tucker_data(n_id=6, n_exp=5, di=3, de=2, seed=1):
    rng = np.random.default_rng(seed)
    mean = rng.normal(0, 50, (V, 3))
    core = rng.normal(0, 10, (di, de, V, 3))
    w_id = rng.normal(0, 1, (n_id, di))
    w_id -= w_id.mean(0)  # zero-mean identity codes: the centred data is exactly rank (di, de)
    w_exp = rng.normal(0, 1, (n_exp, de))
    x = mean + np.einsum("ia,eb,abvc->ievc", w_id, w_exp, core)  # (I, E, V, 3)
    subj = [f"s{i}" for i in range(n_id) for _ in range(n_exp)]
    expr = [f"e{e}" for _ in range(n_id) for e in range(n_exp)]
    return x.reshape(n_id * n_exp, V, 3), subj, expr, (mean, core, w_id, w_exp)


# --------------------------------------------------------------------------- PCA
@pytest.mark.parametrize("solver", ["exact", "randomized"])
def test_pca_exact_at_and_above_rank(solver):
    x = _low_rank(30, rank=4)
    for dim, err_zero in ((2, False), (4, True), (10, True)):
        m = fit_pca(x, FACES, dim, solver=solver)
        assert m.rank == 4
        assert m.dim == min(dim, 4) and m.dim_requested == dim
        recon = m.decode(m.train_codes)
        err = np.abs(recon - x).max()
        assert (err < 1e-8) if err_zero else (err > 1e-2)
        assert m.explained_variance.sum() == pytest.approx(1.0 if err_zero else m.explained_variance.sum())
    m = fit_pca(x, FACES, 10, solver=solver)
    # orthonormal components; training codes have the recorded std and zero mean
    c = m.components.reshape(m.dim, -1)
    np.testing.assert_allclose(c @ c.T, np.eye(m.dim), atol=1e-10)
    np.testing.assert_allclose(m.train_codes.std(0, ddof=1), m.std, rtol=1e-8)
    np.testing.assert_allclose(m.code_mean, 0, atol=1e-8)
    assert np.all(np.diff(m.std) <= 1e-12)  # sorted by variance


def test_pca_explained_variance_matches_svd():
    x = _low_rank(25, rank=6, seed=3) + np.random.default_rng(4).normal(0, 0.1, (25, V, 3))
    m = fit_pca(x, FACES, 3)
    xc = (x - x.mean(0)).reshape(25, -1)
    sv = np.linalg.svd(xc, compute_uv=False)
    np.testing.assert_allclose(m.explained_variance, sv[:3] ** 2 / (sv**2).sum(), rtol=1e-8)
    assert m.rank == 24  # noise makes the centred data full rank (S - 1)
    # covariance route (3V < S) gives the same subspace
    m2 = fit_pca(np.concatenate([x] * 6), FACES, 3)  # 150 faces > 3V = 120
    np.testing.assert_allclose(np.abs(np.einsum("dvc,dvc->d", m.components, m2.components)), 1, atol=1e-8)


def _fit(model, targets, **fit_cfg):
    """Fit through the path every stage uses: the model as a FaceModel, cm3dmm.fit.fit_registered."""
    return fit_registered(baseline_face(model), targets, FitConfig(loss="squared", **fit_cfg))


def test_pca_fit_equals_normal_equations():
    x = _low_rank(30, rank=8, seed=5)
    m = fit_pca(x, FACES, 5)
    targets = _low_rank(3, rank=8, seed=6)
    C = m.components.reshape(m.dim, -1)
    for reg in (0.0, 0.7, 25.0):
        res = _fit(m, targets, prior_weight=reg)
        assert not res.shared_identity and res.z_exp.shape == (3, 0)
        for b in range(3):
            # normal equations of (1/V) |mean + C^T z - t|^2 + reg |z / std|^2 (the prior's mean is
            # the training codes' mean, zero up to round-off)
            lhs = C @ C.T / V + reg * np.diag(1 / m.std**2)
            rhs = C @ (targets[b] - m.mean).reshape(-1) / V
            np.testing.assert_allclose(res.z_id[b], np.linalg.solve(lhs, rhs), rtol=1e-4, atol=1e-4)
    # a face the model generated is recovered (float32 storage of the basis) without regularisation
    z = np.random.default_rng(7).normal(size=(2, m.dim)) * m.std
    res = _fit(m, m.decode(z), prior_weight=0.0)
    np.testing.assert_allclose(res.z_id, z, atol=1e-3 * m.std.max())
    assert res.errors.max() < 1e-3


def test_pca_truncate():
    m = fit_pca(_low_rank(30, rank=5), FACES, 5)
    t = m.truncate(2)
    assert t.dim == 2 and t.dim_requested == 2 and np.array_equal(t.components, m.components[:2])
    np.testing.assert_array_equal(t.train_codes, m.train_codes[:, :2])
    np.testing.assert_array_equal(t.std, m.std[:2])
    with pytest.raises(ValueError):
        m.truncate(0)


# --------------------------------------------------------------------------- bilinear
def test_bilinear_recovers_tucker_data():
    x, subj, expr, _ = _tucker_data()
    m = fit_bilinear(x, subj, expr, FACES, id_dim=50, exp_dim=52)
    assert (m.id_dim, m.exp_dim) == (3, 2) and (m.id_rank, m.exp_rank) == (3, 2)
    assert (m.id_requested, m.exp_requested) == (50, 52)
    assert m.explained_variance == pytest.approx(1.0, abs=1e-10)
    # every training face is its (identity row, expression row) decode
    I, E = len(m.subjects), len(m.expressions)
    recon = m.decode(np.repeat(m.id_weights, E, 0), np.tile(m.exp_weights, (I, 1)))
    np.testing.assert_allclose(recon, x, atol=1e-8)
    aug = m.core_augmented
    assert aug.shape == (4, 3, V, 3) and np.array_equal(aug[0, 0], m.mean) and not aug[1:, 0].any()


def test_bilinear_fit_recovers_generated_subject():
    x, subj, expr, _ = _tucker_data(n_id=8, n_exp=6, di=3, de=3, seed=2)
    m = fit_bilinear(x, subj, expr, FACES, id_dim=3, exp_dim=3)
    rng = np.random.default_rng(9)
    st = m.code_stats
    w_id = st["id_mean"] + rng.normal(size=3) * st["id_std"]
    w_exp = st["exp_mean"] + rng.normal(size=(4, 3)) * st["exp_std"]
    target = m.decode(w_id, w_exp)  # (4, V, 3): one subject, four expressions
    res = _fit(m, target, prior_weight=1e-12, max_iter=500, tol=1e-14)
    assert res.shared_identity
    err = np.abs(res.vertices - target).max()
    assert err < 1e-3, err
    assert res.info.iterations >= 2
    # alternating least squares never increases the objective: more sweeps never hurt
    short = _fit(m, target, prior_weight=1e-9, max_iter=2)
    longer = _fit(m, target, prior_weight=1e-9, max_iter=20)
    assert longer.info.objective <= short.info.objective
    assert longer.info.history == sorted(longer.info.history, reverse=True)


def test_bilinear_fit_objective_and_methods_agree():
    """The reported objective equals the objective computed directly from the decoded faces and
    the training code statistics; alternating least squares (the ``lm`` optimizer of a bilinear
    model with the squared loss) and L-BFGS reach the same minimum on a noisy target (nothing
    generated exactly). ALS stops when a sweep no longer lowers the float32-decoded objective:
    measured 0.019 % above L-BFGS's minimum here, so the bound is 0.05 %."""
    x, subj, expr, _ = _tucker_data(n_id=8, n_exp=6, di=3, de=3, seed=4)
    m = fit_bilinear(x, subj, expr, FACES, id_dim=2, exp_dim=2)  # truncated: residual stays
    target = x[:6] + np.random.default_rng(5).normal(0, 0.5, (6, V, 3))
    reg = 3e-2
    st = m.code_stats
    fits = {}
    for optimizer in ("lm", "lbfgs"):
        r = _fit(m, target, prior_weight=reg, optimizer=optimizer, max_iter=2000, tol=1e-13)
        direct = (((r.vertices - target) ** 2).sum(-1).mean(-1)).sum() + reg * (
            (((r.z_id[0] - st["id_mean"]) / st["id_std"]) ** 2).sum()
            + (((r.z_exp - st["exp_mean"]) / st["exp_std"]) ** 2).sum())
        assert r.info.objective == pytest.approx(direct, rel=1e-5)
        fits[optimizer] = r
    assert fits["lm"].info.converged
    assert fits["lbfgs"].info.objective <= fits["lm"].info.objective <= fits["lbfgs"].info.objective * (1 + 5e-4)
    # ridge pulls towards the training mean code
    strong = _fit(m, target, prior_weight=1e12)
    np.testing.assert_allclose(strong.z_id[0], st["id_mean"], atol=1e-3 * st["id_std"].max() + 1e-3)
    np.testing.assert_allclose(strong.z_exp, np.repeat(st["exp_mean"][None], 6, 0),
                               atol=1e-3 * st["exp_std"].max() + 1e-3)


def test_bilinear_imputes_missing_pairs():
    x, subj, expr, _ = _tucker_data(n_id=10, n_exp=5, di=2, de=2, seed=3)
    keep = np.ones(len(x), bool)
    keep[[3, 17, 26]] = False  # three (subject, expression) pairs missing
    m = fit_bilinear(x[keep], [s for s, k in zip(subj, keep) if k], [e for e, k in zip(expr, keep) if k],
                     FACES, id_dim=2, exp_dim=2, impute_iters=200)
    assert m.n_missing == 3
    assert m.explained_variance > 1 - 1e-6
    # the missing faces are predicted from their subject's identity and expression rows
    for k in np.flatnonzero(~keep):
        i, e = m.subjects.index(subj[k]), m.expressions.index(expr[k])
        pred = m.decode(m.id_weights[i], m.exp_weights[e])[0]
        assert np.abs(pred - x[k]).max() < 1e-2 * np.abs(x[k] - m.mean).max()


def test_level_points_interpolate_the_decoded_vertices():
    """A baseline's upsampling-level points (FaceModel.mesh) are the barycentric mixes of its
    decoded vertices, checked point by point."""
    m = fit_pca(_low_rank(20, rank=3), FACES, 3)
    tri = np.array([0, 5, 5])
    bary = np.array([[1, 0, 0], [0.2, 0.3, 0.5], [1 / 3, 1 / 3, 1 / 3]])
    lv_faces = np.array([[0, 1, 2]])
    level = types.SimpleNamespace(tri=tri, bary=bary, faces=lv_faces)
    fm = baseline_face(m, types.SimpleNamespace(levels=[level, level], landmarks={}))
    z = torch.tensor(m.train_codes[:2], dtype=torch.float32)
    ze = torch.zeros(2, 0)
    out, faces = fm.mesh(z, ze, level=1)
    full = fm.vertices(z, ze)
    np.testing.assert_allclose(full, m.decode(m.train_codes[:2]), atol=1e-3)  # float32 storage
    ref = np.stack([sum(bary[p, k] * full[:, FACES[tri[p], k]] for k in range(3)) for p in range(3)], 1)
    np.testing.assert_allclose(out, ref, atol=1e-10)
    np.testing.assert_allclose(out[:, 0], full[:, 0])
    np.testing.assert_array_equal(faces, lv_faces)
    with pytest.raises(InputError, match="level 2 does not exist"):
        fm.mesh(z, ze, level=2)


# --------------------------------------------------------------------------- files
def test_save_load_round_trip(tmp_path):
    x, subj, expr, _ = _tucker_data()
    pca = fit_pca(x, FACES, 4, train_index=list(zip(subj, expr)), template_hash="abc")
    bil = fit_bilinear(x, subj, expr, FACES, 3, 2, template_hash="abc")
    p1 = pca.save(tmp_path / "pca" / "model.pt", meta={"train_seconds": 1.5})
    p2 = bil.save(tmp_path / "bilinear" / "model.pt")
    payload = torch.load(p1, weights_only=True)
    assert payload["method"] == "pca" and payload["meta"]["train_seconds"] == 1.5
    a = load_baseline(p1, "pca")
    b = load_baseline(p2)
    assert isinstance(a, PCAModel) and isinstance(b, BilinearModel)
    assert a.train_index == pca.train_index and a.template_hash == "abc" and a.rank == pca.rank
    z = pca.train_codes[:3]
    np.testing.assert_allclose(a.decode(z), pca.decode(z), atol=1e-3)  # float32 storage
    assert b.subjects == bil.subjects and b.expressions == bil.expressions
    np.testing.assert_allclose(b.decode(bil.id_weights[:2], bil.exp_weights[:2]),
                               bil.decode(bil.id_weights[:2], bil.exp_weights[:2]), atol=1e-3)


def test_wrong_method_and_truncated_files(tmp_path):
    x, subj, expr, _ = _tucker_data()
    path = fit_pca(x, FACES, 3).save(tmp_path / "model.pt")
    with pytest.raises(InputError, match="'pca' model, expected 'bilinear'") as exc:
        load_baseline(path, "bilinear")
    assert exc.value.path == str(path)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_baseline(cut)
    other = tmp_path / "other.pt"
    torch.save({"method": "cm3dmm"}, other)
    with pytest.raises(InputError, match="not a baseline"):
        load_baseline(other)
    with pytest.raises(InputError, match="not found"):
        load_baseline(tmp_path / "missing.pt")


def test_train_baseline_uses_train_split_only():
    x, subj, expr, _ = _tucker_data(n_id=6, n_exp=4)
    split = ["test" if s in ("s4", "s5") else "train" for s in subj]
    data = RegisteredData(vertices=x.astype(np.float32), faces=FACES, subject=subj, expression=expr, split=split)
    cfg = BaselineConfig(bilinear_id=50, bilinear_exp=52)
    pca = train_baseline("pca", data, cfg, dim=64, template_hash="h")
    assert len(pca.train_index) == 16 and all(s not in ("s4", "s5") for s, _ in pca.train_index)
    assert pca.dim == pca.rank <= 15
    bil = train_baseline("bilinear", data, cfg, dim=64)
    assert bil.subjects == ["s0", "s1", "s2", "s3"] and bil.expressions == ["e0", "e1", "e2", "e3"]
    # the 4 training subjects' codes are not zero-mean: centring adds one rank per mode
    assert (bil.id_dim, bil.exp_dim) == (bil.id_rank, bil.exp_rank) == (4, 3)
    assert bil.explained_variance == pytest.approx(1.0, abs=1e-9)
    with pytest.raises(InputError, match="unknown baseline"):
        train_baseline("bfm", data, cfg, dim=4)

"""The random-faces sampler of cm3dmm.figures: codes drawn from a Gaussian with the full covariance
of the training codes (mean and covariance reproduced; rank-deficient code sets stay on their
subspace, which per-dimension sampling does not), and fig_random on a tiny run built by the real
stages."""

import numpy as np
import pytest
import torch

from cm3dmm.figures import sample_codes
from tests.conftest import build_tiny_models, make_registered, tiny_config

torch.set_num_threads(1)


def _per_dimension(codes, n, rng):
    """The sampler fig_random used before: every dimension independently from N(mean, std)."""
    return codes.mean(0) + rng.standard_normal((n, codes.shape[1])) * codes.std(0, ddof=1)


def _off_plane(x, origin, basis):
    """Distance of the rows of x from the affine plane origin + span(rows of basis)."""
    q, _ = np.linalg.qr(basis.T)  # (D, r) orthonormal
    d = x - origin
    return np.linalg.norm(d - (d @ q) @ q.T, axis=1)


def test_sample_codes_reproduces_mean_and_full_covariance():
    g = np.random.default_rng(0)
    a = g.standard_normal((4, 4))
    cov_true = a @ a.T + 0.1 * np.eye(4)  # strongly correlated
    codes = g.multivariate_normal([3.0, -1.0, 0.5, 10.0], cov_true, size=3000)
    mu, cov = codes.mean(0), np.cov(codes, rowvar=False)
    s = sample_codes(codes, 200_000, np.random.default_rng(1))
    assert s.shape == (200_000, 4)
    scale = np.sqrt(np.diag(cov))
    # sampling error: ~ sd / sqrt(n) for the mean, ~ sqrt(2 / n) * var for the covariance
    np.testing.assert_allclose((s.mean(0) - mu) / scale, 0.0, atol=0.01)
    np.testing.assert_allclose(np.cov(s, rowvar=False) / np.outer(scale, scale),
                               cov / np.outer(scale, scale), atol=0.015)
    # the off-diagonal terms are large, so the test discriminates: per-dimension draws miss them
    corr = cov / np.outer(scale, scale)
    assert np.abs(corr[~np.eye(4, dtype=bool)]).max() > 0.3
    diag = _per_dimension(codes, 200_000, np.random.default_rng(1))
    bad = np.cov(diag, rowvar=False) / np.outer(scale, scale)
    assert np.abs(bad - corr).max() > 0.3


def test_sample_codes_stays_on_the_plane_of_rank_deficient_codes():
    g = np.random.default_rng(2)
    origin = np.array([5.0, -3.0, 2.0, 0.5, 8.0])
    basis = g.standard_normal((2, 5))  # codes on a 2-D plane in 5-D
    codes = origin + (g.standard_normal((400, 2)) * [4.0, 0.7]) @ basis
    assert np.linalg.matrix_rank(codes - codes.mean(0), tol=1e-9) == 2
    s = sample_codes(codes, 20_000, np.random.default_rng(3))
    spread = np.linalg.norm(s - s.mean(0), axis=1).mean()
    assert spread > 1.0  # real samples, not a collapse onto the mean
    assert _off_plane(s, origin, basis).max() < 1e-9 * spread
    # per-dimension sampling leaves the plane: its distance is of the order of the spread
    off = _off_plane(_per_dimension(codes, 20_000, np.random.default_rng(3)), origin, basis)
    assert off.mean() > 0.1 * spread


def test_sample_codes_fewer_codes_than_dimensions():
    """K <= D (e.g. a few training subjects in a large identity space): samples stay on the
    affine span of the K codes, with their covariance."""
    g = np.random.default_rng(4)
    codes = g.standard_normal((4, 12)) * 3.0
    s = sample_codes(codes, 100_000, np.random.default_rng(5))
    assert _off_plane(s, codes[0], codes[1:] - codes[0]).max() < 1e-9 * np.abs(codes).max()
    np.testing.assert_allclose(np.cov(s, rowvar=False), np.cov(codes, rowvar=False), atol=0.15)


def test_sample_codes_edge_cases():
    rng = np.random.default_rng(0)
    assert sample_codes(np.zeros((7, 0)), 5, rng).shape == (5, 0)  # no expression block (pca)
    one = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(sample_codes(one, 4, rng), np.repeat(one, 4, axis=0))
    codes = np.random.default_rng(1).standard_normal((10, 3))
    np.testing.assert_array_equal(sample_codes(codes, 6, np.random.default_rng([0, 1])),
                                  sample_codes(codes, 6, np.random.default_rng([0, 1])))
    with pytest.raises(ValueError):
        sample_codes(np.zeros(3), 2, rng)
    with pytest.raises(ValueError):
        sample_codes(np.zeros((0, 3)), 2, rng)


# ----------------------------------------------------------------------------- on a real run
@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Template, cache, continuous model (code size 16 > the 12 training faces, so its code
    tables are rank-deficient) and the two baselines, by the real stages."""
    root = tmp_path_factory.mktemp("figrun")
    cfg = tiny_config(root, model={"id_dim": 16, "exp_dim": 16}, baselines={"pca_dims": [99]})
    data = make_registered(n_subjects=5, n_expr=3, grid=7, test_subjects=1)
    build_tiny_models(cfg, data)
    return cfg


def test_fig_random_samples_the_training_code_gaussians(tiny_models, tmp_path, monkeypatch):
    from PIL import Image

    from cm3dmm import figures

    run = figures._Run(tiny_models)
    tables = {m: figures._training_codes(run, m) for m in run.methods}
    zi, ze = tables["cm3dmm"]
    assert zi.shape[1] == ze.shape[1] == 16 and len(zi) < 16 and len(ze) < 16
    assert tables["pca"][1].shape[1] == 0 and tables["bilinear"][0].shape[1] == 2
    # record the codes fig_random decodes
    seen = {}
    for m in run.methods:
        fm = run.models[m]

        def spy(z_id, z_exp, level, _orig=fm.mesh, _m=m):
            seen[_m] = (z_id.double().numpy(), z_exp.double().numpy())
            return _orig(z_id, z_exp, level)

        monkeypatch.setattr(fm, "mesh", spy)
    out = figures.fig_random(run, tmp_path / "random_faces.png", seed=0)
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[0] > 3 * figures.CELL and img.shape[1] > figures.N_RANDOM * figures.CELL
    assert img.std() > 5
    for m in run.methods:
        sid, sex = seen[m]
        assert sid.shape == (figures.N_RANDOM, run.models[m].id_dim)
        assert sex.shape == (figures.N_RANDOM, run.models[m].exp_dim)
        assert np.isfinite(sid).all() and np.isfinite(sex).all()
    # the neural model's samples lie on the affine span of its training codes (what per-dimension
    # sampling, used before, violated) and are not all the mean
    for sample, table in zip(seen["cm3dmm"], tables["cm3dmm"]):
        scale = np.abs(table - table.mean(0)).max()
        assert _off_plane(sample, table[0], table[1:] - table[0]).max() < 1e-5 * scale  # float32 decode input
        assert np.abs(sample - table.mean(0)).max() > 1e-3 * scale
        assert _off_plane(_per_dimension(table, figures.N_RANDOM, np.random.default_rng(0)),
                          table[0], table[1:] - table[0]).max() > 0.05 * scale

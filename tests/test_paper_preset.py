"""``train.preset: paper``: the release's objective (fixed code pairs over the whole tables, the
push-apart term that is always 0, priors at 0.03), constant lr and PyTorch's default init."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cm3dmm.config import config_from_dict
from cm3dmm.losses import (code_mean_prior, code_std_prior, pair_pull, paper_loss, point_distance,
                           release_pairs)
from test_train import TINY, _deep, smooth_registered

torch.set_num_threads(1)


def _faces(n_subj=4, n_exp=5, missing=((1, 0), (2, 3))):
    """(subject, expression) labels of a per-face table in the release's order, some faces missing."""
    sl, el = [], []
    for s, e in itertools.product(range(n_subj), range(n_exp)):
        if (s, e) not in missing:
            sl.append(s)
            el.append(e)
    return np.array(sl), np.array(el)


def test_release_pairs_by_hand():
    sl, el = _faces()
    rows = np.arange(len(sl))
    pairs = release_pairs(sl, el, rows, rows)
    row = {(s, e): r for r, (s, e) in enumerate(zip(sl, el))}
    # identity: (subject's first expression, each other face of the subject)
    want_id = set()
    for s in range(4):
        es = sorted(e for (ss, e) in row if ss == s)
        want_id |= {(row[s, es[0]], row[s, e]) for e in es[1:]}
    # expression: (first subject with the expression, each other subject with it)
    want_exp = set()
    for e in range(5):
        ss = sorted(s for (s, ee) in row if ee == e)
        want_exp |= {(row[ss[0], e], row[s, e]) for s in ss[1:]}
    assert set(map(tuple, pairs["id"].T.tolist())) == want_id and pairs["id"].shape[1] == len(want_id)
    assert set(map(tuple, pairs["exp"].T.tolist())) == want_exp and pairs["exp"].shape[1] == len(want_exp)
    assert (row[1, 1], row[1, 2]) in want_id  # subject 1 lacks expression 0: its first face anchors
    # per-subject identity codes: one row per subject, no identity pair left
    per_subject = release_pairs(sl, el, sl, rows)
    assert per_subject["id"].shape == (2, 0)


def test_pull_is_the_release_cosine_embedding_call():
    """The release: F.cosine_embedding_loss over its "same" pairs (target 1) and its "different"
    pairs (target 0, which the loss ignores), averaged."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(20, 6, generator=g, dtype=torch.float64)
    sl, el = _faces(missing=())
    pairs = release_pairs(sl, el, np.arange(20), np.arange(20))
    a, b = pairs["id"]
    same = F.cosine_embedding_loss(table[a], table[b], torch.ones(len(a), dtype=torch.float64))
    subj0 = torch.tensor([s * 5 for s in range(4)])  # all pairs of subjects at expression 0
    da, db = torch.combinations(subj0, 2).T
    diff = F.cosine_embedding_loss(table[da], table[db], torch.zeros(len(da), dtype=torch.float64))
    assert float(diff) == 0.0  # the release's push-apart term
    torch.testing.assert_close(pair_pull(table, pairs["id"]), (same + diff) / 2)
    assert float(pair_pull(table, torch.zeros(2, 0, dtype=torch.long))) == 0.0


def test_paper_loss_weights_and_gradient():
    g = torch.Generator().manual_seed(1)
    sl, el = _faces()
    n = len(sl)
    pairs = release_pairs(sl, el, np.arange(n), np.arange(n))
    pred = torch.randn(3, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 7, 3, generator=g, dtype=torch.float64)
    ids = (torch.randn(n, 4, generator=g, dtype=torch.float64) * 0.05).requires_grad_(True)
    exps = (torch.randn(n, 4, generator=g, dtype=torch.float64) * 0.05).requires_grad_(True)
    t = paper_loss(pred, target, ids, exps, pairs)  # defaults: the release's 0.1, 0.03, 0.01
    want = (point_distance(pred, target)
            + 0.1 * (pair_pull(ids, pairs["id"]) + 0.3 * code_mean_prior(ids) + 0.3 * code_std_prior(ids, 0.01))
            + 0.1 * (pair_pull(exps, pairs["exp"]) + 0.3 * code_mean_prior(exps)
                     + 0.3 * code_std_prior(exps, 0.01)))
    torch.testing.assert_close(t["total"], want)
    assert set(t) == {"total", "distance", "id_cos", "exp_cos", "mean_prior", "std_prior"}

    def f(p, i, e):
        return paper_loss(p, target, i, e, pairs)["total"]

    assert torch.autograd.gradcheck(f, (pred, ids, exps))


def test_paper_preset_values():
    cfg = config_from_dict({"train": {"preset": "paper"}})
    assert cfg.model.encoder.backend == "seed-compatible"
    assert (cfg.model.encoder.n_levels, cfg.model.encoder.n_features, cfg.model.encoder.log2_table_size) == (16, 32, 15)
    assert cfg.model.decoder.widths == [512, 256, 256, 128, 32] and (cfg.model.id_dim, cfg.model.exp_dim) == (128, 128)
    assert cfg.model.basis is False and cfg.model.interpolation == "linear"  # the plain DeepSDF field
    t = cfg.train
    assert (t.lr, t.code_lr, t.lr_milestones) == (1e-3, 1e-3, [])
    assert (t.reg_weight, t.prior_weight, t.code_std, t.code_mode) == (0.1, 0.03, 0.01, "per-face")
    assert (t.batch_faces, t.vertex_points, t.continuous_points, t.continuous) == (20, 10000, 5000, "scan")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """registered.h5 -> template -> cache of test_train's tiny data (built once)."""
    from cm3dmm.cache import run_cache
    from cm3dmm.paths import RunPaths
    from cm3dmm.registered import write_registered
    from cm3dmm.template import run_template

    root = tmp_path_factory.mktemp("prepared")
    values = _deep({**TINY, "run": "base", "results": str(root)}, {"evaluate": {"levels": [0, 1]}})
    cfg = config_from_dict(values)
    write_registered(RunPaths.of(cfg.run_dir).registered, smooth_registered())
    run_template(cfg)
    run_cache(cfg)
    return values


def make_run(prepared, tmp_path, **over):
    import shutil
    from pathlib import Path

    base = Path(prepared["results"]) / prepared["run"]
    for sub in ("data", "template", "cache"):
        shutil.copytree(base / sub, tmp_path / "run" / sub)
    values = _deep({**prepared, "run": "run", "results": str(tmp_path)}, over)
    return config_from_dict(values), values


def test_paper_training_steps(prepared, tmp_path):
    """A few steps under the paper preset (small sizes): constant lr, the release's objective, PyTorch's
    default init of the output layer (not the near-zero start of the other presets)."""
    from cm3dmm.train import run_train

    cfg, _ = make_run(prepared, tmp_path, train={"preset": "paper", "steps": 4, "log_every": 1},
                      model={"encoder": {"backend": "seed-compatible", "n_levels": 3, "n_features": 2,
                                         "base_resolution": 3, "finest_resolution": 30, "log2_table_size": 8}})
    assert cfg.train.prior_weight == 0.03 and cfg.train.lr_milestones == []
    res = run_train(cfg)
    assert [r["lr"] for r in res.log_rows] == [cfg.train.lr] * 4
    assert [r["code_lr"] for r in res.log_rows] == [cfg.train.code_lr] * 4
    state = torch.load(res.model_path, map_location="cpu", weights_only=True)
    w = state["state_dict"]["decoder.out.weight"]
    assert float(w.abs().max()) > 0.05  # U(-1/sqrt(32), 1/sqrt(32)) start, moved by <= 4 lr steps
    codes = state["extra"]["codes"]
    ids, exps = codes["id"].double(), codes["exp"].double()
    ex = state["extra"]["index"]
    subj = np.unique(ex["subject"], return_inverse=True)[1]
    expr = np.unique(ex["expression"], return_inverse=True)[1]
    pairs = release_pairs(subj, expr, ex["id_row"], ex["exp_row"])
    assert pairs["id"].shape[1] > 0 and pairs["exp"].shape[1] > 0
    # the logged cosine terms are the pulls over the whole tables (<= 1 / 2 + small), not batch pairs
    assert all(0 <= r["id_cos"] <= 1.0 for r in res.log_rows)
    assert float(pair_pull(ids, pairs["id"])) <= 1.0

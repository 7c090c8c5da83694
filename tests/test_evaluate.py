"""The evaluate stage on a tiny run built by the real stages: its numbers equal the ones
cm3dmm.metrics gives directly; PCA at the data's rank is exact; the upsampling subsets."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from cm3dmm import metrics
from cm3dmm.config import config_from_dict
from cm3dmm.paths import FIGURES, TABLES, RunPaths
from tests.conftest import make_registered

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from cm3dmm.baselines import run_train_baseline
    from cm3dmm.cache import run_cache
    from cm3dmm.evaluate import run_evaluate
    from cm3dmm.fit import run_fit
    from cm3dmm.registered import write_registered
    from cm3dmm.subset import run_train_upsampling
    from cm3dmm.template import run_template
    from cm3dmm.train import run_train

    root = tmp_path_factory.mktemp("evalrun")
    cfg = config_from_dict({
        "run": "t", "results": str(root),
        "template": {"levels": 1, "mask_resolution": 32},
        "cache": {"n_continuous": 60, "n_heldout": 20},
        "model": {"id_dim": 3, "exp_dim": 3,
                  "encoder": {"n_levels": 2, "n_features": 2, "finest_resolution": 8},
                  "decoder": {"widths": [16]}},
        "train": {"steps": 4, "batch_faces": 2, "vertex_points": 30, "continuous_points": 10,
                  "checkpoint_every": 4, "validate_every": 2, "threads": 1, "log_every": 1},
        "fit": {"max_iter": 3, "points": 0},
        "baselines": {"methods": ["pca", "bilinear"], "pca_dims": [2, 99], "bilinear_id": 2, "bilinear_exp": 2},
        "evaluate": {"levels": [0, 1], "chamfer_points": 150, "train_subjects": 2, "surface_faces": 0,
                     "upsampling_fractions": [0.5, 1.0], "upsampling_steps": 2, "timing_repeats": 1},
    })
    data = make_registered(n_subjects=5, n_expr=3, grid=7, test_subjects=1)
    paths = RunPaths.of(cfg.run_dir)
    write_registered(paths.registered, data)
    run_template(cfg)
    run_cache(cfg)
    run_train(cfg)
    for m in ("pca", "bilinear"):
        run_train_baseline(cfg, m)
    for f in cfg.evaluate.upsampling_fractions:
        run_train_upsampling(cfg, f)
    for m in ("cm3dmm", "pca", "bilinear"):
        for s in data.subjects("test"):
            run_fit(cfg, method=m, subject=s)
    ev = run_evaluate(cfg)
    return cfg, paths, data, ev


def _row(df, **kw):
    sel = np.ones(len(df), bool)
    for k, v in kw.items():
        sel &= (df[k] == v).to_numpy()
    assert sel.sum() == 1, (kw, df)
    return df[sel].iloc[0]


def test_tables_and_protocol_written(tiny_run):
    cfg, paths, data, ev = tiny_run
    for name in TABLES:
        for fmt in ("csv", "md", "tex", "html"):
            assert paths.table(name, fmt).stat().st_size > 0
    text = paths.protocol.read_text()
    assert f"numerical rank **{ev.rank}**" in text
    assert ", ".join(data.subjects("test")) in text
    assert paths.protocol.with_suffix(".html").exists()
    assert set(ev.tables) == set(TABLES)


def test_test_rows_equal_direct_metrics(tiny_run):
    cfg, paths, data, ev = tiny_run
    rec = ev.tables["reconstruction"]
    test_idx = data.indices("test")
    target = data.vertices[test_idx].astype(np.float64)
    faces = data.faces
    for method in ("cm3dmm", "pca", "bilinear"):
        z = np.load(paths.fit_npz(method, data.subjects("test")[0]))
        pred = z["vertices"].astype(np.float64)
        dim = int(z["z_id"].shape[1] + z["z_exp"].shape[1])
        row = _row(rec, Split="test", Method=method, Dim=dim)
        ve = metrics.vertex_error(pred, target)
        assert row["mean vertex error (mm)"] == pytest.approx(ve.mean_all, rel=1e-9)
        assert row["RMSE (mm)"] == pytest.approx(ve.rmse_all, rel=1e-9)
        sm = [metrics.surface_metrics(pred[b], faces, target[b], faces, n_points=150, seed=0, threshold=1.0)
              for b in range(len(pred))]
        assert row["CD (mm)"] == pytest.approx(np.mean([m.chamfer for m in sm]), rel=1e-9)
        assert row["NC"] == pytest.approx(np.mean([m.normal_consistency for m in sm]), rel=1e-9)
        assert row["F@1mm"] == pytest.approx(np.mean([m.fscore for m in sm]), rel=1e-9)
        assert row["Faces"] == len(test_idx)
        # baselines are piecewise linear on the template: the level-1 surface is the level-0 one
        if method != "cm3dmm":
            assert row["CD L1 (mm)"] == row["CD (mm)"]
    cm = _row(rec, Split="test", Method="cm3dmm")
    assert np.isfinite(cm["CD L1 (mm)"]) and cm["CD L1 (mm)"] > 0


def test_level_chamfer_of_the_continuous_model(tiny_run):
    from cm3dmm.methods import load_method
    from cm3dmm.template import load_template

    cfg, paths, data, ev = tiny_run
    t = load_template(paths.template)
    fm = load_method(paths.model("cm3dmm"))
    z = np.load(paths.fit_npz("cm3dmm", data.subjects("test")[0]))
    v, f = fm.mesh(torch.as_tensor(z["z_id"]), torch.as_tensor(z["z_exp"]), 1)
    assert v.shape[1] == t.levels[1].n_points
    target = data.vertices[data.indices("test")].astype(np.float64)
    cd = np.mean([metrics.surface_metrics(v[b], f, target[b], data.faces, n_points=150, seed=0).chamfer
                  for b in range(len(v))])
    assert _row(ev.tables["reconstruction"], Split="test", Method="cm3dmm")["CD L1 (mm)"] == pytest.approx(cd, rel=1e-6)


def test_pca_exact_at_the_rank_on_training_faces(tiny_run):
    cfg, paths, data, ev = tiny_run
    rank = ev.rank
    tr = data.vertices[data.indices("train")].astype(np.float64)
    sv = np.linalg.svd((tr - tr.mean(0)).reshape(len(tr), -1), compute_uv=False)
    assert rank == int((sv > 1e-6 * sv[0]).sum())
    sweep = ev.tables["pca_sweep"]
    assert list(sweep["Dim"]) == list(range(1, rank + 1))
    exact = sweep["train mean vertex error (mm), no prior"].to_numpy()
    assert exact[-1] < 1e-8 and np.all(exact[:-1] > 1e-3)
    assert np.all(np.diff(exact) <= 1e-12)  # more components never fit worse
    assert sweep["explained variance"].iloc[-1] == pytest.approx(1.0)
    rec = ev.tables["reconstruction"]
    at_rank = _row(rec, Split="train", Method="pca", Dim=rank)
    assert "rank" in at_rank["Note"]
    assert at_rank["mean vertex error (mm)"] < 0.02 * _row(rec, Split="train", Method="pca", Dim=2)[
        "mean vertex error (mm)"]
    # pca_dims 99 > rank is reported at the rank (once)
    assert not (rec["Dim"] > rank).any()


def test_closed_form_pca_equals_the_fitter(tiny_run):
    from cm3dmm.baselines import load_baseline
    from cm3dmm.evaluate import fit_pca_closed
    from cm3dmm.fit import fit_registered
    from cm3dmm.methods import load_method

    cfg, paths, data, ev = tiny_run
    tgt = data.vertices[data.indices("test")].astype(np.float64)
    squared = dataclasses.replace(cfg.fit, loss="squared", prior_weight=1e-2)
    closed = fit_pca_closed(load_baseline(paths.model("pca")), tgt, squared.prior_weight)
    fitted = fit_registered(load_method(paths.model("pca")), tgt, squared).vertices
    np.testing.assert_allclose(closed, fitted, atol=1e-3)
    # the prior matters here (tiny data): without it the fit would differ
    assert np.abs(closed - fit_pca_closed(load_baseline(paths.model("pca")), tgt, 0.0)).max() > 1e-3


def test_regions_equal_direct_region_errors(tiny_run):
    from cm3dmm.template import load_template

    cfg, paths, data, ev = tiny_run
    t = load_template(paths.template)
    z = np.load(paths.fit_npz("bilinear", data.subjects("test")[0]))
    target = data.vertices[data.indices("test")].astype(np.float64)
    direct = metrics.region_vertex_error(z["vertices"], target, t.regions.astype(np.int64), t.region_names)
    reg = ev.tables["regions"]
    got = reg[reg["Method"] == "bilinear"]
    assert set(got["Region"]) == set(direct)
    for name, e in direct.items():
        row = _row(got, Region=name)
        assert row["mean vertex error (mm)"] == pytest.approx(e.mean_all, rel=1e-9)
        assert row["Vertices"] == int((t.regions == t.region_names.index(name)).sum())


def test_upsampling_rows(tiny_run):
    from cm3dmm.subset import make_coarse
    from cm3dmm.template import load_template

    cfg, paths, data, ev = tiny_run
    up = ev.tables["upsampling"]
    t = load_template(paths.template)
    target = data.vertices[data.indices("test")].astype(np.float64)
    full = _row(up, Fraction=1.0, Method="coarse target")
    assert full["error, all vertices (mm)"] < 1e-9 and np.isnan(full["error, unseen vertices (mm)"])
    half = make_coarse(t, 0.5)
    assert _row(up, Fraction=0.5, Method="cm3dmm")["Seen vertices"] == half.n_kept == int(np.ceil(0.5 * t.n_vertices))
    oracle = half.interpolate(target[:, half.kept])
    d = np.linalg.norm(oracle - target, axis=-1)
    row = _row(up, Fraction=0.5, Method="coarse target")
    assert row["error, all vertices (mm)"] == pytest.approx(d.mean(), rel=1e-9)
    assert row["error, unseen vertices (mm)"] == pytest.approx(d[:, half.unseen].mean(), rel=1e-9)
    assert np.all(np.isfinite(up["error, all vertices (mm)"]))
    assert set(up["Method"]) == {"cm3dmm", "pca", "bilinear", "coarse target"}


def test_timing_table(tiny_run):
    cfg, paths, data, ev = tiny_run
    tm = ev.tables["timing"]
    fits = tm[tm["Stage"] == "fit per face"].set_index("Method")["Seconds"]
    js = json.loads(paths.fit_json("bilinear", data.subjects("test")[0]).read_text())
    assert fits["bilinear"] == pytest.approx(js["timings_s"]["per_face"])
    train = tm[tm["Stage"] == "training"].set_index("Method")["Seconds"]
    log_s = pd.read_csv(paths.train_log("cm3dmm"))["elapsed_s"].iloc[-1]
    assert train["cm3dmm"] == pytest.approx(log_s)
    assert set(train.index) >= {"cm3dmm_frac0.5", "cm3dmm_frac1"}
    mesh = tm[tm["Stage"] == "mesh generation"]
    assert sorted(mesh["Level"].unique()) == [0, 1] and (mesh["Seconds"] > 0).all()
    assert np.isfinite(tm["Seconds"]).all()


@pytest.mark.slow
def test_figures_are_real_pngs(tiny_run):
    from PIL import Image

    from cm3dmm.figures import run_figures

    cfg, paths, data, ev = tiny_run
    written = run_figures(cfg)
    assert set(written) == set(FIGURES)
    for name, p in written.items():
        img = np.asarray(Image.open(p).convert("RGB"))
        assert img.shape[0] > 100 and img.shape[1] > 200, name
        assert img.std() > 5, name  # not blank

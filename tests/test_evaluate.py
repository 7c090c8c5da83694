"""The evaluate stage on a tiny run built by the real stages (the fits of rules fit, fit_size and
fit_upsampling included): its numbers equal the ones cm3dmm.metrics gives directly for fits made
here; it fits and trains nothing itself; PCA at the data's rank is exact; the upsampling subsets."""

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from cm3dmm import metrics
from cm3dmm.config import config_from_dict
from cm3dmm.paths import FIGURES, TABLES, RunPaths
from tests.conftest import build_tiny_models, make_registered, tiny_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from cm3dmm.evaluate import run_evaluate
    from cm3dmm.fit import run_fit
    from cm3dmm.paths import extra_model_dims, size_variants, upsampling_variants
    from cm3dmm.sizes import run_fit_size, run_train_size, train_subset
    from cm3dmm.upsampling import run_fit_upsampling, run_train_upsampling

    root = tmp_path_factory.mktemp("evalrun")
    cfg = tiny_config(
        root,
        fit={"max_iter": 3, "points": 0},
        baselines={"pca_dims": [2, 99], "bilinear_dims": [1, 2]},
        evaluate={"levels": [0, 1], "chamfer_points": 150, "train_subjects": 2, "surface_faces": 0,
                  "upsampling_fractions": [0.5, 1.0], "upsampling_steps": 2, "timing_repeats": 1,
                  "model_dims": [4, 6], "model_dims_steps": 3},
    )
    data = make_registered(n_subjects=5, n_expr=3, grid=7, test_subjects=1)
    paths = RunPaths.of(cfg.run_dir)
    build_tiny_models(cfg, data)
    for f in cfg.evaluate.upsampling_fractions:
        run_train_upsampling(cfg, f)
    for d in extra_model_dims(cfg):
        run_train_size(cfg, d)
    for m in ("cm3dmm", "pca", "bilinear"):
        for s in data.subjects("test") + train_subset(cfg, data.subjects("train")):
            run_fit(cfg, method=m, subject=s)
    for v in size_variants(cfg):
        run_fit_size(cfg, v)
    for m, f in upsampling_variants(cfg):
        run_fit_upsampling(cfg, m, f)
    ev = run_evaluate(cfg)
    return cfg, paths, data, ev


def _row(df, **kw):
    sel = np.ones(len(df), bool)
    for k, v in kw.items():
        sel &= (df[k] == v).to_numpy()
    assert sel.sum() == 1, (kw, df)
    return df[sel].iloc[0]


def _fit_direct(fm, data, subjects, fc):
    """Fitted vertices of every face of ``subjects`` (file order), fitted here per subject with the
    fit stage's function: what the evaluate stage's rows must score."""
    from cm3dmm.fit import fit_registered

    out = []
    for s in subjects:
        idx = [i for i, x in enumerate(data.subject) if x == s]
        out.append(fit_registered(fm, data.vertices[idx].astype(np.float64), fc).vertices)
    return np.concatenate(out)


def _stage_row(df, **kw):
    """The row of the fit stage's files (the continuous model also has a row of the other code sharing)."""
    return _row(df[df["Note"].str.startswith("fit stage")], **kw)


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
    # protocol.md is cm3dmm/evaluate_protocol.md with every field filled from the run and its facts
    assert "$" not in text and text.endswith("torch threads.\n\n## Coarse meshes\n\n" + "\n".join(
        f"- f = {tag}: {m['kept']} vertices, {m['coarse_triangles']} triangles, {m['outside']} template vertices "
        "outside them (nearest boundary point used)" for tag, m in ev.facts["upsampling"].items()) + "\n")
    # the facts each table function returns, merged: all of them reach facts.json (written with sorted keys)
    facts = json.loads(paths.facts.read_text())
    assert sorted(facts) == sorted(ev.facts) == sorted([
        "surface_faces", "rank", "n_train_faces", "explained_variance_cumulative", "model_dims", "bilinear_dims",
        "fit_seconds_per_face", "upsampling_subjects", "upsampling"])
    assert list(facts["upsampling"]) == ["0.5", "1"] and facts["upsampling"]["1"]["kept"] == data.n_vertices
    assert facts["model_dims"] == sorted({4, 6} - {cfg.model.id_dim + cfg.model.exp_dim})
    assert facts["surface_faces"] == {"test": 3, "train": 2 * 3}  # surface_faces 0: every face


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
        row = _stage_row(rec, Split="test", Method=method, Dim=dim)
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
    cm = _stage_row(rec, Split="test", Method="cm3dmm", Dim=6)
    assert np.isfinite(cm["CD L1 (mm)"]) and cm["CD L1 (mm)"] > 0


def test_continuous_model_rows_per_face_and_per_subject(tiny_run):
    """The continuous model is shown both ways: the fit stage's code sharing and the other one,
    each equal to fitting the test faces directly in that mode, and labelled."""
    import dataclasses

    from cm3dmm.methods import load_method

    cfg, paths, data, ev = tiny_run
    rec = ev.tables["reconstruction"]
    rows = rec[(rec["Split"] == "test") & (rec["Method"] == "cm3dmm") & (rec["Dim"] == 6)]
    assert len(rows) == 2
    other = "per-face" if cfg.fit.mode == "per-subject" else "per-subject"
    label = {"per-face": "per-face codes", "per-subject": "shared identity per subject"}
    assert list(rows["Note"]) == [f"fit stage ({label[cfg.fit.mode]})", f"fit_size ({label[other]})"]
    fm = load_method(paths.model("cm3dmm"))
    pred = _fit_direct(fm, data, data.subjects("test"), dataclasses.replace(cfg.fit, mode=other))
    target = data.vertices[data.indices("test")].astype(np.float64)
    assert rows.iloc[1]["mean vertex error (mm)"] == pytest.approx(metrics.vertex_error(pred, target).mean_all,
                                                                   rel=1e-9)


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
    assert _stage_row(ev.tables["reconstruction"], Split="test", Method="cm3dmm", Dim=6)["CD L1 (mm)"] == pytest.approx(cd, rel=1e-6)


def test_other_code_sizes(tiny_run):
    """evaluate.model_dims: the continuous model of size 4 (its own training, 3 steps) fitted with
    the fit stage's fitter; baselines.bilinear_dims: a 1 x 2 bilinear model built here (size 2 is
    the main bilinear model and not repeated)."""
    from cm3dmm.baselines import fit_bilinear
    from cm3dmm.methods import baseline_face, load_method
    from cm3dmm.paths import extra_model_dims, size_method
    from cm3dmm.sizes import size_config
    from cm3dmm.template import load_template

    cfg, paths, data, ev = tiny_run
    rec = ev.tables["reconstruction"]
    assert extra_model_dims(cfg) == [4]
    sc = size_config(cfg, 4)
    assert (sc.model.id_dim, sc.model.exp_dim, sc.train.steps) == (2, 2, 3)
    fm = load_method(paths.model(size_method(4)))
    assert (fm.id_dim, fm.exp_dim) == (2, 2)
    test_idx = data.indices("test")
    target = data.vertices[test_idx].astype(np.float64)
    pred = _fit_direct(fm, data, data.subjects("test"), cfg.fit)
    for split in ("test", "train"):
        row = _row(rec, Split=split, Method="cm3dmm", Dim=4)
        assert "3 steps" in row["Note"] and np.isfinite(row["CD L1 (mm)"])
    assert _row(rec, Split="test", Method="cm3dmm", Dim=4)["mean vertex error (mm)"] == pytest.approx(
        metrics.vertex_error(pred, target).mean_all, rel=1e-9)
    # bilinear 1 x 2: the same numbers as building and fitting it directly
    tr = data.indices("train")
    base = fit_bilinear(data.vertices[tr].astype(np.float64), [data.subject[i] for i in tr],
                        [data.expression[i] for i in tr], data.faces, 1, 2)
    bfm = baseline_face(base, load_template(paths.template))
    pred_b = _fit_direct(bfm, data, data.subjects("test"), cfg.fit)
    row = _row(rec, Split="test", Method="bilinear", Dim=3)
    assert row["mean vertex error (mm)"] == pytest.approx(metrics.vertex_error(pred_b, target).mean_all, rel=1e-9)
    assert row["CD L1 (mm)"] == row["CD (mm)"]
    assert ((rec["Method"] == "bilinear") & (rec["Dim"] == 4)).sum() == 2  # main model only (test, train)
    text = paths.protocol.read_text()
    assert "4 (2 + 2, 3 steps)" in text and "(1 x 2 identity x expression)" in text


def test_size_options_are_validated():
    from cm3dmm.errors import InputError

    with pytest.raises(InputError, match="evaluate.model_dims: every size must be >= 2"):
        config_from_dict({"evaluate": {"model_dims": [1]}})
    with pytest.raises(InputError, match="baselines.bilinear_dims: every size must be >= 1"):
        config_from_dict({"baselines": {"bilinear_dims": [0]}})


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
    from cm3dmm.sizes import fit_pca_closed
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
    from cm3dmm.upsampling import make_coarse
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



def test_vertex_subset_cache_reads_and_validation_subset(tiny_run):
    """The upsampling models' training data: reads cycle through each face's own permutation of
    the kept vertices; validation uses one fixed evenly spread subset of at most max_heldout."""
    from cm3dmm.upsampling import VertexSubsetCache, make_coarse
    from cm3dmm.template import load_template

    cfg, paths, data, ev = tiny_run
    coarse = make_coarse(load_template(paths.template), 1.0)
    tr = data.indices("train")
    v = data.vertices[tr]
    args = (v, coarse, [data.subject[i] for i in tr], [data.expression[i] for i in tr])
    k = coarse.n_kept
    full = VertexSubsetCache(*args)
    h = full.heldout([0, 2])
    assert h["uv"].shape == (2, k, 2)  # k < 2048: every kept vertex
    np.testing.assert_array_equal(h["target"][1], v[2][coarse.kept])
    few = VertexSubsetCache(*args, max_heldout=5)
    h = few.heldout([1])
    idx = np.linspace(0, k - 1, 5).round().astype(int)
    np.testing.assert_array_equal(h["target"][0], v[1][coarse.kept][idx])
    np.testing.assert_array_equal(h["uv"][0], np.asarray(coarse.template.uv, np.float32)[idx])
    # a full cycle of reads visits every kept vertex of a face exactly once
    seen = np.concatenate([few.read([1], 7, offset=o)["target"][0] for o in range(0, k, 7)])[:k]
    assert len(np.unique(seen.round(5), axis=0)) == len(np.unique(v[1][coarse.kept].round(5), axis=0))


def test_neural_level_meshes_in_chunks_equal_one_call(tiny_run):
    """NeuralFace.mesh decodes level meshes in bounded chunks (faces x points): the same
    vertices as one call of the model, whatever the chunk size."""
    from cm3dmm.methods import load_method

    cfg, paths, data, ev = tiny_run
    fm = load_method(paths.model("cm3dmm"))
    g = torch.Generator().manual_seed(0)
    zi, ze = torch.randn(5, fm.id_dim, generator=g), torch.randn(5, fm.exp_dim, generator=g)
    with torch.no_grad():
        ref, ref_f = fm.model.mesh(zi, ze, level=1)
    for chunk in (1 << 19, 100, 7):
        fm.mesh_chunk_points = chunk
        v, f = fm.mesh(zi, ze, 1)
        np.testing.assert_allclose(v, ref.double().numpy(), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(f, ref_f.numpy())
    assert v.shape[1] > 7 and v.shape[0] == 5


# ----------------------------------------------------------------------------- evaluate only reads
def test_evaluate_fits_and_trains_nothing(tiny_run, monkeypatch):
    """With the fitter, the bilinear builder and training disabled, evaluate writes the same
    tables: every fit comes from the files of rules fit, fit_size and fit_upsampling."""
    import cm3dmm.baselines
    import cm3dmm.fit
    import cm3dmm.train
    from cm3dmm.evaluate import run_evaluate

    def refuse(*a, **k):
        raise AssertionError("evaluate must not fit or train")

    for mod, name in ((cm3dmm.fit, "fit_registered"), (cm3dmm.fit, "solve_codes"),
                      (cm3dmm.baselines, "fit_bilinear"), (cm3dmm.train, "train"), (cm3dmm.train, "run_train")):
        monkeypatch.setattr(mod, name, refuse)
    cfg, paths, data, ev = tiny_run
    again = run_evaluate(cfg)
    for name in ("reconstruction", "regions", "pca_sweep", "upsampling"):
        pd.testing.assert_frame_equal(again.tables[name], ev.tables[name], check_exact=True)


def test_a_missing_variant_fit_is_named(tiny_run):
    from cm3dmm.errors import InputError
    from cm3dmm.evaluate import run_evaluate

    cfg, paths, data, ev = tiny_run
    folder = paths.fit_dir("pca_rank")
    moved = folder.with_name("pca_rank.away")
    folder.rename(moved)
    try:
        with pytest.raises(InputError, match="fit file not found") as exc:
            run_evaluate(cfg)
        assert "pca_rank" in str(exc.value)
    finally:
        moved.rename(folder)


def test_fit_size_variants(tiny_run):
    """The variants of rule fit_size for the tiny config, their subjects and sizes; an unknown one
    is one clear error."""
    from cm3dmm.errors import InputError
    from cm3dmm.paths import size_variants
    from cm3dmm.sizes import run_fit_size, train_subset

    cfg, paths, data, ev = tiny_run
    # main sizes: cm3dmm 6 (fit.mode per-subject), pca 6; bilinear_dims [1, 2] with bilinear_id 2
    assert size_variants(cfg) == ["cm3dmm_per-face", "cm3dmm_dim4", "pca_dim2", "pca_dim99", "pca_rank",
                                  "bilinear_id1"]
    test, train = data.subjects("test"), train_subset(cfg, data.subjects("train"))
    assert len(train) == 2 and set(train) < set(data.subjects("train"))
    assert sorted(p.stem for p in paths.fit_dir("cm3dmm_per-face").glob("*.npz")) == sorted(test)
    for name, dim in (("pca_dim2", 2), ("pca_dim99", ev.rank), ("pca_rank", ev.rank), ("cm3dmm_dim4", 4)):
        got = sorted(p.stem for p in paths.fit_dir(name).glob("*.npz"))
        assert got == sorted(test + train), name
        z = np.load(paths.fit_npz(name, train[0]))
        assert z["z_id"].shape[1] + z["z_exp"].shape[1] == dim, name
        assert str(z["method"]) == name
        # one figure per variant (its first subject), none for the others
        pngs = sorted(p.stem for p in paths.fit_dir(name).glob("*.png"))
        assert pngs == [test[0]], (name, pngs)
    with pytest.raises(InputError, match="unknown fit variant 'pca_dimx'"):
        run_fit_size(cfg, "pca_dimx")


def test_upsampling_fits_are_over_the_kept_vertices(tiny_run):
    """rule fit_upsampling fits the kept vertices only; evaluate interpolates the baselines' fits
    on the coarse mesh and scores them against every vertex."""
    from cm3dmm.template import load_template
    from cm3dmm.upsampling import make_coarse

    cfg, paths, data, ev = tiny_run
    coarse = make_coarse(load_template(paths.template), 0.5)
    subject = data.subjects("test")[0]
    z = np.load(paths.fit_npz("pca_frac0.5", subject))
    assert z["vertices"].shape[1] == coarse.n_kept < data.n_vertices
    target = data.vertices[data.indices("test")].astype(np.float64)
    pred = coarse.interpolate(z["vertices"].astype(np.float64))
    row = _row(ev.tables["upsampling"], Fraction=0.5, Method="pca")
    assert row["error, all vertices (mm)"] == pytest.approx(np.linalg.norm(pred - target, axis=-1).mean(), rel=1e-9)
    assert row["Dim"] == z["z_id"].shape[1]

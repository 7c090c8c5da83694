"""The Python API (cm3dmm.load / sample / mesh / fit / interpolate), exports with UVs, landmarks,
the `sample` / `mesh` commands and the notebook example, on models trained by the real stages."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, build_tiny_models, make_registered, tiny_config

METHODS = ("cm3dmm", "pca", "bilinear")


def _data():
    """Tiny registered data with the template's standard landmark names at fixed vertices."""
    data = make_registered(n_subjects=5, n_expr=3, grid=7, test_subjects=1)
    names = ("nose_tip", "chin", "eye_outer_R", "eye_inner_R", "eye_inner_L", "eye_outer_L",
             "mouth_corner_R", "mouth_corner_L")
    data.landmarks = {n: int(i) for n, i in zip(names, (24, 45, 29, 30, 32, 33, 37, 39))}
    return data


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The test config's network sizes (config/test.yaml: codes 16 + 16, widths [64, 32], 4 encoder
    levels), trained a few steps on tiny data by the real stages, and both baselines."""
    root = tmp_path_factory.mktemp("apirun")
    cfg = tiny_config(root, template={"levels": 2, "mask_resolution": 32},
                      model={"id_dim": 16, "exp_dim": 16, "encoder": {"n_levels": 4}, "decoder": {"widths": [64, 32]}},
                      baselines={"pca_dims": [8]})
    build_tiny_models(cfg, _data())
    return cfg


def _model_path(cfg, method):
    from cm3dmm.paths import RunPaths

    return RunPaths.of(cfg.run_dir).model(method)


@pytest.fixture(scope="module")
def models(run):
    import cm3dmm

    return {m: cm3dmm.load(_model_path(run, m)) for m in METHODS}


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cm3dmm", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=300)


# ------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("method", METHODS)
def test_sample_is_seeded_and_stays_on_the_training_codes_span(models, method):
    m = models[method]
    a, b, c = m.sample(200, seed=0), m.sample(200, seed=0), m.sample(200, seed=1)
    assert a.dims == (m.id_dim, m.exp_dim) and len(a) == 200
    np.testing.assert_array_equal(a.z_id, b.z_id)
    assert not np.allclose(a.z_id, c.z_id)
    for drawn, table in ((a.z_id, m.train_codes[0]), (a.z_exp, m.train_codes[1])):
        if table.shape[1] == 0:
            continue
        mean = table.mean(0)
        # rank-deficient tables: every draw is the mean plus a combination of centred training codes
        basis = np.linalg.svd(table - mean, full_matrices=False)[2]
        resid = (drawn - mean) - (drawn - mean) @ basis.T @ basis
        assert np.abs(resid).max() < 1e-8 * max(1.0, np.abs(table).max())
        # and the sample mean approaches the training mean (200 draws: within 4 standard errors)
        se = table.std(0, ddof=1) / np.sqrt(200)
        assert np.all(np.abs(drawn.mean(0) - mean) <= 4 * se + 1e-12)


def test_sample_codes_covariance_matches_the_table():
    from cm3dmm.api import sample_codes

    rng = np.random.default_rng(0)
    table = rng.normal(size=(30, 4)) @ np.array([[2, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0.5, 0], [0, 0, 0, 0.1]]) + 3
    draws = sample_codes(table, 200_000, np.random.default_rng(1))
    np.testing.assert_allclose(np.cov(draws.T), np.cov(table.T), atol=0.03)
    np.testing.assert_allclose(draws.mean(0), table.mean(0), atol=0.02)


# ------------------------------------------------------------------------------- meshes
@pytest.mark.parametrize("method", METHODS)
def test_mesh_levels_carry_the_template_uvs_and_agree_at_template_vertices(models, method):
    import trimesh

    m = models[method]
    codes = m.sample(2, seed=3)
    base = m.vertices(codes)
    lv0 = m.mesh(codes, level=0)
    assert all(isinstance(x, trimesh.Trimesh) for x in lv0)
    np.testing.assert_allclose(np.asarray(lv0[1].vertices), base[1], atol=1e-9)
    np.testing.assert_allclose(lv0[0].visual.uv, m.template.uv, atol=1e-7)
    tpl_level = m.template.levels[2]
    lv2 = m.mesh(codes, level=2)
    assert len(lv2[0].vertices) == tpl_level.n_points and len(lv2[0].faces) == 16 * len(m.template.faces)
    np.testing.assert_allclose(lv2[0].visual.uv, tpl_level.uv, atol=1e-7)
    # the level keeps the template's vertices first (upsample.subdivide): same positions there
    nv = m.n_vertices
    np.testing.assert_allclose(np.asarray(lv2[0].vertices)[:nv], base[0], atol=1e-4)


def test_grid_meshes_match_naive_references(models):
    from cm3dmm.upsample import uv_grid

    # pca: barycentric interpolation of the template-vertex positions, written out naively
    m = models["pca"]
    codes = m.sample(1, seed=5)
    g = uv_grid(m.template, 24)
    verts = m.vertices(codes)[0]
    faces = np.asarray(m.template.faces)
    ref = np.array([sum(b[k] * verts[faces[t][k]] for k in range(3)) for t, b in zip(g.tri, g.bary)])
    mesh = m.mesh(codes, grid=24)[0]
    np.testing.assert_allclose(np.asarray(mesh.vertices), ref, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(mesh.faces), g.faces)
    # cm3dmm: decoded at the grid's UVs, as the model's own mesh(grid=...)
    import torch

    m = models["cm3dmm"]
    codes = m.sample(2, seed=5)
    got = np.stack([np.asarray(x.vertices) for x in m.mesh(codes, grid=24)])
    with torch.no_grad():
        want, _ = m.fm.model.mesh(torch.as_tensor(codes.z_id, dtype=torch.float32),
                                  torch.as_tensor(codes.z_exp, dtype=torch.float32), grid=24)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


def test_interpolate_ends_and_linearity(models):
    m = models["bilinear"]
    a, b = m.sample(2, seed=7)
    ends = m.interpolate(a, b, [0.0, 1.0])
    np.testing.assert_allclose(ends.array(), np.concatenate([a.array(), b.array()]), atol=1e-12)
    mid = m.interpolate(a, b, 0.25)
    np.testing.assert_allclose(mid.array()[0], 0.75 * a.array()[0] + 0.25 * b.array()[0], atol=1e-12)
    # pca is linear in its code: the midpoint face is the mean of the two faces
    p = models["pca"]
    a, b = p.sample(2, seed=7)
    fa, fb, fm_ = (p.vertices(c)[0] for c in (a, b, p.interpolate(a, b, 0.5)))
    np.testing.assert_allclose(fm_, 0.5 * (fa + fb), atol=1e-3)


def test_directions_are_the_principal_axes_of_the_training_codes(models):
    m = models["cm3dmm"]
    mean, dirs, std = m.directions("identity", 3)
    table = m.train_codes[0]
    cov = np.cov(table.T)
    for d, s in zip(dirs, std):
        np.testing.assert_allclose(cov @ d, s ** 2 * d, atol=1e-6 * max(1.0, s ** 2))
    assert np.all(np.diff(std) <= 1e-12)


# ------------------------------------------------------------------------------- exports
def test_obj_text_is_exact():
    from cm3dmm.export import obj_text

    text = obj_text([[0, 0, 0], [1.5, 0, 0], [0, 2, 0.25]], [[0, 1, 2]], [[0, 0], [1, 0], [0, 0.5]])
    assert text == ("v 0.000000 0.000000 0.000000\nv 1.500000 0.000000 0.000000\nv 0.000000 2.000000 0.250000\n"
                    "vt 0.00000000 0.00000000\nvt 1.00000000 0.00000000\nvt 0.00000000 0.50000000\n"
                    "f 1/1 2/2 3/3\n")


@pytest.mark.parametrize("fmt", ["obj", "ply", "glb"])
def test_exported_meshes_round_trip_with_uvs(models, tmp_path, fmt):
    import trimesh

    m = models["cm3dmm"]
    codes = m.sample(2, seed=1)
    paths = m.export(codes, tmp_path / f"face_{{i}}.{fmt}", level=1)
    ref = m.mesh(codes[1], level=1)[0]
    back = trimesh.load(paths[1], process=False, force="mesh")
    assert len(back.vertices) == len(ref.vertices) and len(back.faces) == len(ref.faces)
    np.testing.assert_allclose(np.asarray(back.vertices), np.asarray(ref.vertices), atol=1e-4)
    np.testing.assert_allclose(np.asarray(back.visual.uv), ref.visual.uv, atol=1e-6)
    assert not list(tmp_path.glob("*.tmp*"))


def test_trimesh_export_of_an_api_mesh_writes_vt(models, tmp_path):
    mesh = models["pca"].mesh(models["pca"].sample(1), level=2)[0]
    mesh.export(tmp_path / "face.obj")
    text = (tmp_path / "face.obj").read_text()
    assert text.count("\nvt ") == len(mesh.vertices)


# ------------------------------------------------------------------------------- landmarks
def test_landmarks_exist_at_every_level_and_grid(models):
    m = models["cm3dmm"]
    codes = m.sample(1, seed=2)
    tpl_lm = m.template.landmarks
    assert set(m.landmarks.names) == set(tpl_lm)
    base = m.vertices(codes)[0]
    for kw in ({"level": 0}, {"level": 1}, {"level": 2}):
        lm = m.mesh(codes, **kw)[0].metadata["landmarks"]
        for name, vid in tpl_lm.items():
            np.testing.assert_allclose(lm[name], base[vid], atol=1e-4)
    grid = m.mesh(codes, grid=64)[0].metadata["landmarks"]
    for name, vid in tpl_lm.items():  # a grid does not hit the vertex exactly: close to it
        assert np.linalg.norm(np.asarray(grid[name]) - base[vid]) < 15.0


def test_landmark_file_round_trip_and_errors(models, tmp_path):
    from cm3dmm import landmarks as lmk
    from cm3dmm.errors import InputError

    tpl = models["pca"].template
    own = lmk.from_template(tpl)
    lmk.write_landmark_file(tmp_path / "lm.json", own)
    back = lmk.read_landmark_file(tmp_path / "lm.json", tpl)
    assert sorted(back.names) == sorted(own.names)
    verts = models["pca"].vertices(models["pca"].sample(1))[0]
    order = [back.index(n) for n in own.names]
    np.testing.assert_allclose(back.on_template(verts, tpl.faces)[order], own.on_template(verts, tpl.faces), atol=1e-6)
    # by vertex, and a UV between vertices interpolates
    (tmp_path / "v.json").write_text(json.dumps({"format": "cm3dmm-landmarks", "version": 1, "landmarks": {
        "a": {"vertex": 10}, "b": {"uv": [float(x) for x in 0.5 * (tpl.uv[10] + tpl.uv[11])]}}}))
    ls = lmk.read_landmark_file(tmp_path / "v.json", tpl)
    pos = ls.on_template(verts, tpl.faces)
    np.testing.assert_allclose(pos[0], verts[10], atol=1e-9)
    np.testing.assert_allclose(pos[1], 0.5 * (verts[10] + verts[11]), atol=1e-4)  # float32 UVs
    for bad, msg in (({"format": "x"}, "not a landmark file"),
                     ({"format": "cm3dmm-landmarks", "version": 1, "landmarks": {"a": {"vertex": 10 ** 6}}},
                      "not a vertex"),
                     ({"format": "cm3dmm-landmarks", "version": 1, "landmarks": {"a": {"uv": [5.0, 5.0]}}},
                      "outside the template's UV chart")):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(InputError, match=msg):
            lmk.read_landmark_file(tmp_path / "bad.json", tpl)


# ------------------------------------------------------------------------------- fitting
@pytest.mark.parametrize("method", ["pca", "bilinear"])
def test_fit_registered_recovers_a_generated_face(models, tmp_path, method):
    from cm3dmm.export import write_mesh

    m = models[method]
    target = m.mesh(m.sample(1, seed=4))[0]
    write_mesh(tmp_path / "t.obj", target)
    fit = m.fit([tmp_path / "t.obj"], units="mm", level=1)
    assert fit.errors[0] < 0.05
    assert len(fit.meshes[0].vertices) == m.template.levels[1].n_points
    np.testing.assert_allclose(np.asarray(fit.meshes[0].vertices)[:m.n_vertices], np.asarray(target.vertices), atol=0.2)


def test_fit_a_scan_in_metres_with_named_landmarks(models, tmp_path):
    """A raw scan (a point cloud, another vertex count, metres, moved): units found, landmark names used."""
    from cm3dmm.io.mesh import Mesh, write_mesh

    m = models["pca"]
    codes = m.sample(1, seed=6)
    dense = m.mesh(codes, level=2)[0]
    pts = np.asarray(dense.vertices) + np.array([5.0, -3.0, 2.0])
    write_mesh(tmp_path / "scan.ply", Mesh(pts / 1000.0, np.asarray(dense.faces)))
    lm = {k: ((np.asarray(v) + np.array([5.0, -3.0, 2.0])) / 1000.0).tolist()
          for k, v in dense.metadata["landmarks"].items()}
    fit = m.fit([tmp_path / "scan.ply"], units="auto", landmarks=[lm])
    assert fit.errors[0] < 1.0
    moved = fit.meshes_in_scan_frame()[0]
    err = np.linalg.norm(np.asarray(moved.vertices) - (m.vertices(codes)[0] + np.array([5.0, -3.0, 2.0])), axis=1)
    assert err.mean() < 2.0


def test_fit_rejects_unknown_landmark_names(models, tmp_path):
    from cm3dmm.errors import InputError

    with pytest.raises(InputError, match="unknown landmark names"):
        models["pca"]._scan_landmarks([{"nose": [0, 0, 0]}], ["a.ply"])


def test_landmark_file_names_reach_meshes_and_the_fitter(run, tmp_path):
    import cm3dmm
    from cm3dmm.errors import InputError

    m = cm3dmm.load(_model_path(run, "pca"))
    tpl = m.template
    uv = 0.75 * tpl.uv[tpl.faces[3][0]] + 0.25 * tpl.uv[tpl.faces[3][1]]
    (tmp_path / "lm.json").write_text(json.dumps({"format": "cm3dmm-landmarks", "version": 1, "landmarks": {
        "pin": {"vertex": 5}, "between": {"uv": [float(x) for x in uv]}}}))
    m.use_landmarks(tmp_path / "lm.json")
    codes = m.sample(1, seed=0)
    verts = m.vertices(codes)[0]
    for level in (0, 2):
        lm = m.mesh(codes, level=level)[0].metadata["landmarks"]
        np.testing.assert_allclose(lm["pin"], verts[5], atol=1e-4)
        want = 0.75 * verts[tpl.faces[3][0]] + 0.25 * verts[tpl.faces[3][1]]
        np.testing.assert_allclose(lm["between"], want, atol=1e-3)
    assert m.fm.landmarks["pin"] == 5 and m.fm.landmarks["between"] == int(tpl.faces[3][0])
    m._scan_landmarks([{"pin": [0, 0, 0], "between": [1, 0, 0]}], ["a.ply"])  # accepted
    with pytest.raises(InputError, match=r"unknown landmark names \['nose'\]"):
        m._scan_landmarks([{"nose": [0, 0, 0]}], ["a.ply"])


def test_fit_stage_writes_meshes_with_uvs_and_landmarks(run, models, tmp_path):
    from cm3dmm.config import config_from_dict, config_to_dict
    from cm3dmm.export import write_mesh
    from cm3dmm.fit import run_fit

    m = models["bilinear"]
    write_mesh(tmp_path / "me.obj", m.mesh(m.sample(1, seed=9))[0])
    values = config_to_dict(run)
    values["fit"]["level"] = 1
    cfg = config_from_dict(values)
    run_fit(cfg, method="bilinear", scan=[str(tmp_path / "me.obj")], registered=True, units="mm",
            out=str(tmp_path / "fit" / "me.npz"))
    obj = (tmp_path / "fit" / "me.me.obj").read_text()
    n_pts = m.template.levels[1].n_points
    assert obj.count("\nvt ") == n_pts and obj.count("\nv ") + obj.startswith("v ") == n_pts
    assert "/" in obj.splitlines()[-1]
    lm = json.loads((tmp_path / "fit" / "me.me.landmarks.json").read_text())
    assert set(lm["landmarks"]) == set(m.template.landmarks)


def test_fit_stage_checks_landmark_names(run, models, tmp_path):
    from cm3dmm.errors import InputError
    from cm3dmm.export import write_mesh
    from cm3dmm.fit import run_fit

    m = models["pca"]
    write_mesh(tmp_path / "scan.obj", m.mesh(m.sample(1, seed=2), level=1)[0])
    (tmp_path / "lm.json").write_text(json.dumps({"nose": [0, 0, 0], "chin": [0, -50, 0], "pin": [1, 1, 1]}))
    with pytest.raises(InputError, match=r"unknown landmark names \['nose', 'pin'\]"):
        run_fit(run, method="pca", scan=[str(tmp_path / "scan.obj")], landmarks=str(tmp_path / "lm.json"),
                out=str(tmp_path / "f.npz"))
    (tmp_path / "set.json").write_text(json.dumps({"format": "cm3dmm-landmarks", "version": 1, "landmarks": {
        "nose": {"vertex": 24}, "pin": {"vertex": 3}}}))
    (tmp_path / "bad.json").write_text(json.dumps({"format": "cm3dmm-landmarks", "version": 2, "landmarks": {}}))
    with pytest.raises(InputError, match="landmark file version 2 is not 1"):
        run_fit(run, method="pca", scan=[str(tmp_path / "scan.obj")], landmarks=str(tmp_path / "lm.json"),
                landmark_set=str(tmp_path / "bad.json"), out=str(tmp_path / "f.npz"))


# ------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_clear_error(models, run, tmp_path):
    import cm3dmm
    from cm3dmm.errors import InputError

    m = models["cm3dmm"]
    with pytest.raises(InputError, match=r"codes have shape \(1, 7\); the cm3dmm model takes \(B, 32\)"):
        m.mesh(np.zeros((1, 7)))
    with pytest.raises(InputError, match="do not fit"):
        m.mesh(models["pca"].sample(1))
    with pytest.raises(InputError, match="level 5 does not exist"):
        m.mesh(m.sample(1), level=5)
    with pytest.raises(InputError, match="grid must be"):
        m.mesh(m.sample(1), grid=1)
    (tmp_path / "x.pt").write_bytes(b"not a model")
    with pytest.raises(InputError, match="corrupt or not a cm3dmm model"):
        cm3dmm.load(tmp_path / "x.pt")
    with pytest.raises(InputError, match="not found"):
        cm3dmm.load(tmp_path / "missing.pt")
    import shutil

    shutil.copy(_model_path(run, "pca"), tmp_path / "pca.pt")  # a baseline away from its run folder
    with pytest.raises(InputError, match="does not carry its template"):
        cm3dmm.load(tmp_path / "pca.pt")


def test_sample_and_mesh_commands(run, tmp_path):
    model = _model_path(run, "bilinear")
    r = _cli("sample", "--model", model, "-n", "3", "--level", "1", "--out", tmp_path / "s", "--format", "ply")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["codes.npz", "sample_0.ply", "sample_1.ply",
                                                                    "sample_2.ply"]
    r = _cli("mesh", "--model", model, "--codes", tmp_path / "s" / "codes.npz", "--index", "2", "--out", tmp_path / "m")
    assert r.returncode == 0, r.stderr
    import trimesh

    a = trimesh.load(tmp_path / "m" / "face_0.obj", process=False, force="mesh")
    b = trimesh.load(tmp_path / "s" / "sample_2.ply", process=False, force="mesh")
    np.testing.assert_allclose(np.asarray(a.vertices), np.asarray(b.vertices)[:len(a.vertices)], atol=1e-4)
    assert a.visual.uv is not None and len(a.visual.uv) == len(a.vertices)
    # bad input: one line, exit 2, no traceback
    for args, msg in ((("mesh", "--model", _model_path(run, "pca"), "--codes", tmp_path / "s" / "codes.npz"),
                       "do not fit the pca model"),
                      (("mesh", "--model", model, "--level", "9"), "level 9 does not exist"),
                      (("sample", "--model", tmp_path / "s" / "codes.npz"), "corrupt or not a cm3dmm model")):
        r = _cli(*args, "--out", tmp_path / "bad")
        assert r.returncode == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_notebook_example_runs(run, tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "examples" / "notebook.py"), str(_model_path(run, "cm3dmm")),
                        str(tmp_path / "ex")], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fit of a generated face" in r.stdout
    assert (tmp_path / "ex" / "sample_3.glb").exists() and (tmp_path / "ex" / "interp_4.obj").exists()
    assert "\nvt " in (tmp_path / "ex" / "target.obj").read_text()

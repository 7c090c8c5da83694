"""``cm3dmm import-release``: a checkpoint and predefined data built here in the release's exact
layout (random weights, a small template) -> a normal model.pt whose decode equals the release's
forward, written out independently below from SEED.md."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from cm3dmm.cli import main
from cm3dmm.config import ReleaseConfig
from cm3dmm.errors import InputError
from cm3dmm.model import load_model
from cm3dmm.release import import_release, read_predefined
from cm3dmm.upsample import subdivide
from conftest import make_registered

torch.set_num_threads(1)

ID_NUM, EXP_NUM, CODE = 280, 20, 128
LEVELS, FEATS, BASE, FINEST, LOG2T = 16, 32, 4, 128, 15
WIDTHS = [512, 256, 256, 128, 32]


class _Level(nn.Module):
    def __init__(self, rows):
        super().__init__()
        self.embedding = nn.Embedding(rows, FEATS)


class _Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        b = math.exp((math.log(FINEST) - math.log(BASE)) / (BASE - 1))
        res = [int(math.floor(BASE * b**l)) for l in range(LEVELS)]
        self.levels = nn.ModuleList(_Level(min(r * r, 2**LOG2T)) for r in res)


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        layers, n_in = [], 2 * CODE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for w in WIDTHS:
                layers += [nn.utils.weight_norm(nn.Linear(n_in + LEVELS * FEATS, w)), nn.Tanh(), nn.Dropout(0.0)]
                n_in = w
        layers.append(nn.Linear(n_in, 3))
        self.layers = nn.Sequential(*layers)


class ReleaseLikeModel(nn.Module):
    """Only the parameter layout of the release's model (its state-dict names and shapes)."""

    def __init__(self):
        super().__init__()
        self.id_embeddings = nn.Embedding(ID_NUM * EXP_NUM, CODE)
        self.exp_embeddings = nn.Embedding(ID_NUM * EXP_NUM, CODE)
        self.uv_hash_enncoder = _Encoder()
        self.surface_processor = _Decoder()


def release_forward(state: dict, uv: torch.Tensor, z_id: torch.Tensor, z_exp: torch.Tensor) -> torch.Tensor:
    """The release's displacement: 3 * MLP([z, enc(uv)]) with tanh(3x), UV features into every layer."""
    b = math.exp((math.log(FINEST) - math.log(BASE)) / (BASE - 1))
    feats = []
    for l in range(LEVELS):
        res = int(math.floor(BASE * b**l))
        table = state[f"uv_hash_enncoder.levels.{l}.embedding.weight"]
        size = table.shape[0]
        pos = uv * float(res)
        c = torch.floor(pos)
        t = pos - c
        c = c.long()

        def row(i, j):
            return ((i & 0xFFFFFFFF) ^ ((j * 2654435761) & 0xFFFFFFFF)) % size

        i, j = c[:, 0], c[:, 1]
        tx, ty = t[:, :1], t[:, 1:]
        feats.append((1 - tx) * (1 - ty) * table[row(i, j)] + tx * (1 - ty) * table[row(i + 1, j)]
                     + (1 - tx) * ty * table[row(i, j + 1)] + tx * ty * table[row(i + 1, j + 1)])
    f = torch.cat(feats, 1)  # (N, 512)
    outs = []
    for zi, ze in zip(z_id, z_exp):
        h = torch.cat([zi.expand(len(uv), -1), ze.expand(len(uv), -1)], 1)
        for k in range(len(WIDTHS)):
            p = f"surface_processor.layers.{3 * k}."
            v, g = state[p + "weight_v"], state[p + "weight_g"]
            w = g * v / v.norm(dim=1, keepdim=True)
            h = torch.tanh(3.0 * (torch.cat([h, f], 1) @ w.T + state[p + "bias"]))
        p = f"surface_processor.layers.{3 * len(WIDTHS)}."
        outs.append(3.0 * (h @ state[p + "weight"].T + state[p + "bias"]))
    return torch.stack(outs)


def build_release_files(root, template=None) -> dict:
    """A checkpoint and predefined_model_data/ in the release's layout under ``root`` (over a small
    grid face, or over ``template``'s mean, triangles and UVs)."""
    torch.manual_seed(0)
    model = ReleaseLikeModel()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger than the default init, so every term matters
        for lvl in model.uv_hash_enncoder.levels:
            lvl.embedding.weight.copy_(torch.randn(lvl.embedding.weight.shape, generator=g) * 0.5)
        for emb in (model.id_embeddings, model.exp_embeddings):
            emb.weight.copy_(torch.randn(emb.weight.shape, generator=g) * 0.3)
    ckpt = root / "release_checkpoint.pth"
    torch.save({"epoch": 8000, "state_dict": model.state_dict()}, ckpt)
    d = make_registered(grid=7)
    mean = d.vertices.mean(0).astype(np.float64)
    if template is not None:
        d.faces, d.uv, mean = np.asarray(template.faces), np.asarray(template.uv), np.asarray(template.mean, np.float64)
    pre = root / "predefined_model_data"
    pre.mkdir()
    np.save(pre / "average_face_vert.npy", mean)
    np.save(pre / "front_faces.npy", d.faces.astype(np.int64) + 1)  # 1-based, as the release allows
    np.save(pre / "vert_texcoords.npy", d.uv.astype(np.float64) * (0.8 if template is None else 1.0)
            + (0.1 if template is None else 0.0))
    uv = np.load(pre / "vert_texcoords.npy").astype(np.float32)
    lv1 = subdivide(d.faces, len(mean), 1, uv)
    sub = pre / "subdivision_template"
    sub.mkdir()
    ids = d.faces[lv1.tri].astype(np.int64)
    perm = np.random.default_rng(0).permuted(np.tile([0, 1, 2], (len(ids), 1)), axis=1)  # any vertex order
    np.save(sub / "sub_division_point_vert_id.npy", np.take_along_axis(ids, perm, 1))
    np.save(sub / "sub_division_point_bc.npy", np.take_along_axis(lv1.bary.astype(np.float64), perm, 1))
    np.save(sub / "sub_division_average_face.npy", np.einsum("pk,pkc->pc", lv1.bary, mean[ids]))
    np.save(sub / "sub_division_tri.npy", lv1.faces)
    lv2 = subdivide(d.faces, len(mean), 2, uv)
    edge = pre / "subdivision_template_edge_2"
    edge.mkdir()
    np.save(edge / "sub_division_point_uv.npy", lv2.uv.astype(np.float64))
    np.save(edge / "sub_division_tri.npy", lv2.faces)
    return {"ckpt": ckpt, "pre": pre, "state": model.state_dict(), "mean": mean, "uv": uv, "lv1": lv1,
            "lv2": lv2, "faces": d.faces, "root": root}


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    return build_release_files(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def imported(release_files):
    out = release_files["root"] / "models" / "release" / "model.pt"
    summary = import_release(release_files["ckpt"], release_files["pre"], out)
    return out, summary


def test_imported_model_decodes_like_the_release(release_files, imported):
    out, summary = imported
    model, extra = load_model(out)
    state = {k: v.float() for k, v in release_files["state"].items()}
    assert model.cfg.encoder.backend == "seed-compatible"
    assert model.encoder.level_resolutions[:4] == [4, 12, 40, 127]
    assert model.cfg.decoder.widths == WIDTHS and (model.id_dim, model.exp_dim) == (CODE, CODE)
    rows = torch.tensor([0, 7 * EXP_NUM + 3, 5599])
    z_id, z_exp = state["id_embeddings.weight"][rows], state["exp_embeddings.weight"][rows]
    g = torch.Generator().manual_seed(5)
    uv = torch.cat([torch.rand(300, 2, generator=g), torch.tensor(release_files["uv"])])
    with torch.no_grad():
        got = model.deformation(uv, z_id, z_exp)
    want = release_forward(state, uv, z_id, z_exp)
    assert float(want.abs().max()) > 0.5  # displacements far from zero
    assert float((got - want).abs().max()) < 1e-5
    # at the template's vertices the position is the release's average face + the displacement
    with torch.no_grad():
        verts, faces = model.mesh(z_id, z_exp, level=0)
    avg = torch.as_tensor(release_files["mean"], dtype=torch.float32)
    assert float((verts - (avg + want[:, 300:])).abs().max()) < 1e-5
    assert torch.equal(faces, torch.as_tensor(release_files["faces"], dtype=torch.int64))
    # codes, index map (face (i, e) = row i * 20 + e; untrained rows left out of the index)
    torch.testing.assert_close(extra["codes"]["id"], state["id_embeddings.weight"])
    torch.testing.assert_close(extra["codes"]["exp"], state["exp_embeddings.weight"])
    idx = extra["index"]
    assert len(idx["subject"]) == 5595 and summary["trained_rows"] == 5595
    k = idx["id_row"].tolist().index(7 * EXP_NUM + 3)
    assert (idx["subject"][k], idx["expression"][k]) == ("8", "anger")
    assert 53 * 20 + 9 not in set(idx["id_row"].tolist())  # 54/10_dimpler is not in the release's list


def test_levels_from_the_subdivision_folders(release_files, imported):
    model, _ = load_model(imported[0])
    t = model.template
    assert [lv.n_points for lv in t.levels] == [49, release_files["lv1"].n_points, release_files["lv2"].n_points]
    np.testing.assert_array_equal(t.uv, release_files["uv"])  # the release's UVs, not renormalised
    for k, ref in ((1, release_files["lv1"]), (2, release_files["lv2"])):
        lv = t.levels[k]
        pos = t.level_points(t.mean, k)
        want = ref.points(release_files["mean"], release_files["faces"])
        np.testing.assert_allclose(pos, want, atol=1e-4)
        np.testing.assert_array_equal(lv.faces, ref.faces)


def test_cli_import_release_and_bad_files(release_files, tmp_path, capsys):
    out = tmp_path / "m.pt"
    assert main(["import-release", "--checkpoint", str(release_files["ckpt"]), "--predefined",
                 str(release_files["pre"]), "--out", str(out)]) == 0
    assert out.is_file()
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main(["import-release", "--checkpoint", str(bad), "--predefined", str(release_files["pre"]),
                 "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.pth" in err[0] and "checkpoint" in err[0]
    # a checkpoint with Python objects besides tensors is not unpickled
    import argparse

    risky = tmp_path / "risky.pth"
    torch.save({"state_dict": release_files["state"], "args": argparse.Namespace(lr=1e-3)}, risky)
    with pytest.raises(InputError, match="Python objects besides tensors"):
        import_release(risky, release_files["pre"], tmp_path / "z.pt")
    # a level table of the wrong size names the level and the settings
    state = dict(release_files["state"])
    state["uv_hash_enncoder.levels.1.embedding.weight"] = torch.zeros(100, FEATS)
    wrong = tmp_path / "wrong.pth"
    torch.save({"state_dict": state}, wrong)
    with pytest.raises(InputError, match="hash-grid level 1 has shape"):
        import_release(wrong, release_files["pre"], tmp_path / "y.pt")
    partial = tmp_path / "predefined"
    partial.mkdir()
    np.save(partial / "average_face_vert.npy", release_files["mean"])
    np.save(partial / "front_faces.npy", release_files["faces"])
    with pytest.raises(InputError, match="predefined.*lacks vert_texcoords.npy"):
        read_predefined(partial)


def test_fit_registered_and_scan_with_the_imported_model(release_files, imported, tmp_path):
    """The paper's own model fits a registered mesh and a raw scan on the CPU (cm3dmm fit --model)."""
    from cm3dmm.config import config_from_dict
    from cm3dmm.fit import run_fit
    from cm3dmm.io.mesh import Mesh, write_mesh

    model, _ = load_model(imported[0])
    state = release_files["state"]
    z_id, z_exp = state["id_embeddings.weight"][[45]], state["exp_embeddings.weight"][[45]]
    with torch.no_grad():
        verts, faces = model.mesh(z_id, z_exp, level=0)
    target = tmp_path / "target.obj"
    write_mesh(target, Mesh(vertices=verts[0].numpy().astype(np.float64), faces=faces.numpy()))
    cfg = config_from_dict({"run": "r", "results": str(tmp_path), "fit": {"max_iter": 30, "units": "mm"}})
    spread = float(torch.linalg.vector_norm(verts[0] - model.mean, dim=-1).mean())  # the face vs the average
    res = run_fit(cfg, model=str(imported[0]), scan=[str(target)], registered=True, out=str(tmp_path / "f.npz"))
    assert res["mean_error_mm"] < 0.05 * spread
    # a raw scan: the dense level-2 surface of the same face, another topology, shifted
    with torch.no_grad():
        dense, dfaces = model.mesh(z_id, z_exp, level=2)
    scan = tmp_path / "scan.ply"
    write_mesh(scan, Mesh(vertices=dense[0].numpy().astype(np.float64) + [2.0, -1.0, 3.0], faces=dfaces.numpy()))
    res = run_fit(cfg, model=str(imported[0]), scan=[str(scan)], out=str(tmp_path / "s.npz"))
    assert res["mean_error_mm"] < 0.5 * spread  # well below the average face's distance to it


def test_evaluation_runs_on_the_imported_model(tmp_path):
    """A run whose template is the release's: the imported model as models/cm3dmm/model.pt, the fit
    stage on the test subject and the evaluate stage (no baselines, extra sizes or upsampling)."""
    from cm3dmm.config import config_from_dict
    from cm3dmm.evaluate import run_evaluate
    from cm3dmm.fit import run_fit
    from cm3dmm.paths import RunPaths
    from cm3dmm.registered import write_registered
    from cm3dmm.template import load_template, run_template

    cfg = config_from_dict({
        "run": "r", "results": str(tmp_path), "template": {"levels": 1, "mask_resolution": 32},
        "baselines": {"methods": []}, "fit": {"max_iter": 5, "points": 0, "coarse_points": 0},
        "evaluate": {"levels": [0, 1], "model_dims": [], "upsampling_fractions": [], "chamfer_points": 200,
                     "surface_faces": 1, "train_subjects": 1, "timing_repeats": 1}})
    paths = RunPaths.of(cfg.run_dir)
    data = make_registered(grid=7)
    write_registered(paths.registered, data)
    run_template(cfg)
    (tmp_path / "release").mkdir()
    files = build_release_files(tmp_path / "release", load_template(paths.template))
    import_release(files["ckpt"], files["pre"], paths.model("cm3dmm"))
    from cm3dmm.paths import size_variants
    from cm3dmm.sizes import run_fit_size, train_subset

    # the workflow's fit jobs: the fit stage on the test subjects and the training subset, rule fit_size
    for s in data.subjects("test") + train_subset(cfg, data.subjects("train")):
        run_fit(cfg, method="cm3dmm", subject=s)
    for v in size_variants(cfg):
        run_fit_size(cfg, v)
    ev = run_evaluate(cfg)
    rec = ev.tables["reconstruction"]
    assert set(rec["Method"]) == {"cm3dmm"} and set(rec["Dim"]) == {2 * CODE}
    assert np.isfinite(rec["mean vertex error (mm)"]).all()

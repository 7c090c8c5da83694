"""FaceScape as the release uses it, on generated fixtures in FaceScape's layout: the TU vertex
count, the front-region crop from front_faces.npy, and detail scans -> the cache's continuous
samples (points within cache.scan_distance of the registered surface, UV of their projection,
target = the scan point) -> what training reads with train.continuous: scan."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cm3dmm.config import FaceScapeSourceConfig, config_from_dict
from cm3dmm.errors import InputError
from cm3dmm.io.mesh import Mesh, write_mesh
from cm3dmm.registered import FACESCAPE_EXPRESSIONS
from cm3dmm.sources import facescape as fs
from test_sources import grid_mesh, make_facescape

EXPRS = ["neutral", "smile", "anger"]


def _cfg(root, **kw):
    return FaceScapeSourceConfig(path=str(root), identities=[1, 2, 3], expressions=EXPRS, **kw)


def test_check_knows_the_tu_vertex_count(tmp_path):
    chk = fs.check_facescape(_cfg(make_facescape(tmp_path / "fs")))
    assert chk.vertex_count == 36 and not chk.fatal
    assert any("FaceScape v1.3's have 26317" in p for p in chk.problems())
    assert "TU models have 26317" in chk.summary() and chk.to_dict()["tu_vertices"] == 26317
    assert fs.TU_VERTICES == 26317 and fs.FRONT_VERTICES == 12483


def _front_files(tmp_path):
    """front_faces.npy variants over the 6 x 6 TU grid: its first 3 rows (18 vertices)."""
    m = grid_mesh(6)
    faces = np.asarray(m.faces, np.int64)
    front = faces[(faces < 18).all(1)]
    out = {}
    for name, arr in (("compact0", front), ("compact1", front + 1)):
        out[name] = tmp_path / f"{name}.npy"
        np.save(out[name], arr)
    mid = faces[((faces >= 6) & (faces < 24)).all(1)]  # rows 1..3 in TU ids
    out["tu"] = tmp_path / "tu.npy"
    np.save(out["tu"], mid)
    out["bad"] = tmp_path / "bad.npy"
    np.save(out["bad"], np.array([[0, 4, 3], [1, 2, 3]]))  # compact ids 0..4, not TU triangles
    return m, out


def test_front_region_from_front_faces(tmp_path):
    m, f = _front_files(tmp_path)
    np.testing.assert_array_equal(fs.front_region_indices(f["compact0"], m), np.arange(18))
    np.testing.assert_array_equal(fs.front_region_indices(f["compact1"], m), np.arange(18))  # 1-based
    np.testing.assert_array_equal(fs.front_region_indices(f["tu"], m), np.arange(6, 24))
    with pytest.raises(InputError, match="not the first 5 TU vertices"):
        fs.front_region_indices(f["bad"], m)
    idx = tmp_path / "idx.npy"
    np.save(idx, np.arange(5))
    assert fs.front_region_indices(idx, m) is None  # a plain index file: an ordinary crop
    # through the source: crop "front" finds front_faces.npy in the TU folder
    root = make_facescape(tmp_path / "fs")
    np.save(root / "front_faces.npy", np.load(f["compact1"]))
    data = fs.load(_cfg(root, crop="front"))
    assert data.vertices.shape == (9, 18, 3) and data.faces.max() == 17
    with pytest.raises(InputError, match="'front' needs the release's front_faces.npy"):
        fs.load(_cfg(make_facescape(tmp_path / "fs2"), crop="front"))


def _scan_of(mesh: Mesh, rng) -> np.ndarray:
    """Dense points on the mesh's triangles (some 0.1 mm off it) and some 5 mm off (dropped)."""
    v, f = np.asarray(mesh.vertices), np.asarray(mesh.faces)
    tri = rng.integers(0, len(f), 600)
    b = rng.dirichlet([1, 1, 1], 600)
    pts = np.einsum("pk,pkc->pc", b, v[f[tri]])
    pts[:200, 2] += 0.1
    pts[500:, 2] += 5.0
    return pts


def test_detail_scans_become_the_continuous_samples(tmp_path):
    from cm3dmm.cache import SampleCache, run_cache
    from cm3dmm.geometry import closest_points_on_mesh
    from cm3dmm.paths import RunPaths
    from cm3dmm.prepare import run_prepare
    from cm3dmm.template import run_template
    from cm3dmm.train import TrainData

    root = make_facescape(tmp_path / "fs")
    scans = tmp_path / "scans"
    rng = np.random.default_rng(0)
    written = {}
    for i in (1, 2):  # identity 3 has no scans
        for e in EXPRS:
            k = FACESCAPE_EXPRESSIONS.index(e) + 1
            from cm3dmm.io.mesh import read_mesh

            tu = read_mesh(root / str(i) / "models_reg" / f"{k}_{e}.obj")
            pts = _scan_of(tu, rng)
            (scans / str(i)).mkdir(parents=True, exist_ok=True)
            write_mesh(scans / str(i) / f"{k}_{e}.ply", Mesh(vertices=pts, faces=np.zeros((0, 3), np.int64)))
            written[(str(i), e)] = pts
    cfg = config_from_dict({
        "run": "fs", "results": str(tmp_path / "results"),
        "data": {"source": "facescape", "preview": False, "split": {"test_subjects": [3]},
                 "facescape": {"path": str(root), "identities": [1, 2, 3], "expressions": EXPRS,
                               "scans": str(scans)}},
        "template": {"levels": 1, "mask_resolution": 32},
        "cache": {"n_continuous": 50, "n_heldout": 10, "scan_distance": 0.3},
        "evaluate": {"levels": [0, 1]},
        "train": {"continuous": "scan"}})
    run_prepare(cfg)
    run_template(cfg)
    run_cache(cfg)
    paths = RunPaths.of(cfg.run_dir)
    with SampleCache(paths.cache("train")) as c:
        assert c.has_scan.shape == (6,) and c.has_scan.all()  # the 6 training faces all have scans
        subj, expr = [str(s) for s in c.subject], [str(e) for e in c.expression]
        data = TrainData.from_cache(c, "per-face")
        data.continuous = cfg.train.continuous
        batch = data.read(np.arange(data.n), np.zeros(data.n, np.int64), 5, 40, torch.device("cpu"))
        from cm3dmm.registered import read_registered

        reg = read_registered(paths.registered, with_scans=False)
        for b in range(data.n):
            s = int(data.faces[b])
            tgt = batch["target"][b, 5:].numpy().astype(np.float64)
            src = written[(subj[s], expr[s])]
            # every target is one of the face's scan points, and one within 0.3 mm of its surface
            d_src = np.linalg.norm(tgt[:, None] - src[None], axis=-1).min(1)
            assert d_src.max() < 1e-4
            ri = int(c.registered_index[s]) if hasattr(c, "registered_index") else s
            verts, faces = reg.vertices[ri].astype(np.float64), reg.faces
            proj = closest_points_on_mesh(tgt, verts, faces)
            assert proj.dist.max() <= 0.3 + 1e-4
            # uv = the UV of the projection onto the registered surface
            from cm3dmm.template import load_template

            t = load_template(paths.template)
            uv_proj = np.einsum("pk,pkc->pc", proj.bary, t.uv.astype(np.float64)[faces[proj.tri]])
            np.testing.assert_allclose(batch["uv"][b, 5:].numpy(), uv_proj, atol=1e-4)
        # the surface mode reads the interpolated points instead
        data.continuous = "surface"
        surf = data.read(np.arange(data.n), np.zeros(data.n, np.int64), 5, 40, torch.device("cpu"))
        assert not np.allclose(surf["target"][:, 5:].numpy(), batch["target"][:, 5:].numpy())


def test_manifest_scan_column(tmp_path):
    from cm3dmm.config import ManifestSourceConfig
    from cm3dmm.sources import manifest

    m = grid_mesh(6)
    for name in ("a", "b"):
        write_mesh(tmp_path / f"{name}.obj", m)
    pts = np.asarray(m.vertices)[:10] + 0.05
    write_mesh(tmp_path / "a_scan.ply", Mesh(vertices=pts, faces=np.zeros((0, 3), np.int64)))
    (tmp_path / "m.csv").write_text("subject,expression,path,scan\ns1,neutral,a.obj,a_scan.ply\n"
                                    "s2,neutral,b.obj,\n")
    data = manifest.load(ManifestSourceConfig(path=str(tmp_path / "m.csv"), units="cm"))
    assert list(data.scans) == [0] and data.scans[0][1] is None
    np.testing.assert_allclose(data.scans[0][0], pts * 10, rtol=1e-6)  # cm -> mm like the meshes

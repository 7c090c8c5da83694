"""Sources ict / facescape / manifest on generated fixtures, and split assignment."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from cm3dmm.config import (FaceScapeSourceConfig, ICTSourceConfig, ManifestSourceConfig, SplitConfig)
from cm3dmm.errors import InputError
from cm3dmm.io import Mesh, read_mesh, write_mesh
from cm3dmm.registered import FACESCAPE_EXPRESSIONS, RegisteredData
from cm3dmm.sources import assign_split, ict
from cm3dmm.sources import facescape as fs
from cm3dmm.sources import manifest
from conftest import SHARED_ICT


def grid_mesh(n=6, width=150.0, seed=0, bump=0.0) -> Mesh:
    """An n x n grid 'face' (quads split in triangles) with per-vertex uv."""
    rng = np.random.default_rng(seed)
    u, v = np.meshgrid(np.linspace(0, 1, n), np.linspace(0, 1, n))
    uv = np.stack([u.ravel(), v.ravel()], 1)
    z = 30 * np.exp(-((uv - 0.5) ** 2).sum(1) * 8) + bump * rng.normal(size=n * n)
    verts = np.stack([(uv[:, 0] - 0.5) * width, (uv[:, 1] - 0.5) * width * 1.2, z], 1)
    faces = []
    for r in range(n - 1):
        for c in range(n - 1):
            a = r * n + c
            faces += [[a, a + 1, a + n + 1], [a, a + n + 1, a + n]]
    return Mesh(vertices=verts, faces=faces, uv=uv)


# --------------------------------------------------------------------------- ICT
N_GRID = 5  # face region: 25 vertices, 16 quads; the "head" adds 5 vertices and 4 polygons


def _ict_obj(verts: np.ndarray, with_topology: bool) -> str:
    lines = ["# ICT-like test mesh", "mtllib ICTFaceModelMaterial.mtl"]
    lines += ["v %.6f %.6f %.6f" % tuple(p) for p in verts]
    if not with_topology:
        return "\n".join(lines) + "\n"
    n = N_GRID
    for r in range(n):
        for c in range(n):
            lines.append("vt %.6f %.6f" % (0.1 + 0.8 * c / (n - 1), 0.1 + 0.8 * r / (n - 1)))
    # the head strip in another UDIM tile: shares the face's top row (a seam at the boundary)
    for c in range(n):
        lines.append("vt %.6f %.6f" % (1.2 + 0.1 * c, 1.5))
    for c in range(n):
        lines.append("vt %.6f %.6f" % (1.2 + 0.1 * c, 1.9))
    lines.append("usemtl face")
    for r in range(n - 1):
        for c in range(n - 1):
            a = r * n + c + 1
            q = [a, a + 1, a + n + 1, a + n]
            lines.append("f " + " ".join(f"{i}/{i}" for i in q))
    lines.append("usemtl head")
    top = n * (n - 1)  # first vertex of the top row (0-based)
    for c in range(n - 1):
        q = [top + c + 1, top + c + 2, n * n + c + 2, n * n + c + 1]
        t = [n * n + c + 1, n * n + c + 2, n * n + n + c + 2, n * n + n + c + 1]
        lines.append("f " + " ".join(f"{a}/{b}" for a, b in zip(q, t)))
    return "\n".join(lines) + "\n"


def make_ict(root: Path, n_ids=4, gz=True, drop=None, bad=None) -> Path:
    """A tiny ICT-FaceKit-like checkout (cm units) at root/FaceXModel."""
    folder = root / "FaceXModel"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    n = N_GRID
    u, v = np.meshgrid(np.linspace(-7, 7, n), np.linspace(-9, 9, n))
    face = np.stack([u.ravel(), v.ravel(), 10 - 0.05 * (u.ravel() ** 2 + v.ravel() ** 2)], 1)
    head = np.stack([np.linspace(-7, 7, n), np.full(n, 12.0), np.full(n, 5.0)], 1)
    neutral = np.concatenate([face, head])
    shapes = sorted({b for r in ict.RECIPES.values() for b in r})
    files = {"generic_neutral_mesh": (neutral, True)}
    for k in range(n_ids):
        files[f"identity{k:03d}"] = (neutral + rng.normal(0, 0.3, neutral.shape), False)
    for s in shapes:
        files[s] = (neutral + rng.normal(0, 0.1, neutral.shape), False)
    for name, (verts, topo) in files.items():
        if name == drop:
            continue
        if name == bad:
            verts = verts[:-1]
        text = _ict_obj(verts, topo or name == "jawOpen").encode()
        if gz:
            (folder / f"{name}.obj.gz").write_bytes(gzip.compress(text))
        else:
            (folder / f"{name}.obj").write_bytes(text)
    return root


@pytest.fixture
def small_regions(monkeypatch):
    monkeypatch.setitem(ict.REGIONS, "face", (N_GRID * N_GRID, (N_GRID - 1) ** 2))
    monkeypatch.setitem(ict.REGIONS, "narrow", (N_GRID * (N_GRID - 1), (N_GRID - 1) * (N_GRID - 2)))
    monkeypatch.setattr(ict, "LANDMARKS", {"nose_tip": 12, "chin": 2, "eye_outer_L": 99})


def _read_deltas(folder, names, n_reg):
    base = read_mesh(folder / "generic_neutral_mesh.obj.gz").vertices[:n_reg]
    return np.stack([(read_mesh(folder / f"{b}.obj.gz").vertices[:n_reg] - base).ravel() for b in names]), base


def test_ict_builds_identities_and_expressions(tmp_path, small_regions):
    root = make_ict(tmp_path / "ict")
    cfg = ICTSourceConfig(path=str(root), n_subjects=3, n_components=4, seed=7)
    d = ict.load(cfg)
    S, E, V = 3, len(FACESCAPE_EXPRESSIONS), N_GRID * N_GRID
    assert d.vertices.shape == (S * E, V, 3) and d.vertices.dtype == np.float32
    assert d.faces.shape == (2 * (N_GRID - 1) ** 2, 3) and d.faces.max() == V - 1
    assert d.subject[:E] == ["ict_000"] * E and d.expression[:E] == list(FACESCAPE_EXPRESSIONS)
    assert set(d.split) == {"train"} and d.source == "ict"
    assert d.landmarks == {"nose_tip": 12, "chin": 2}  # out-of-region landmarks dropped
    # uv: the face region's own UVs (the seam with the head strip does not matter)
    u, v = np.meshgrid(np.linspace(0.1, 0.9, N_GRID), np.linspace(0.1, 0.9, N_GRID))
    np.testing.assert_allclose(d.uv, np.stack([u.ravel(), v.ravel()], 1), atol=1e-6)
    # the exact formula, in mm
    id_w, shapes, exp_w, _ = ict.sample_weights(cfg)
    folder = root / "FaceXModel"
    id_basis, base = _read_deltas(folder, [f"identity{k:03d}" for k in range(4)], V)
    exp_basis, _ = _read_deltas(folder, shapes, V)
    vv = d.vertices.reshape(S, E, V, 3).astype(np.float64)
    for s in range(S):
        ident = base.ravel() + id_w[s] @ id_basis
        np.testing.assert_allclose(vv[s, 0].ravel(), ident * 10, atol=1e-3)
        np.testing.assert_allclose(vv[s].reshape(E, -1), (ident + exp_w[s] @ exp_basis) * 10, atol=1e-3)


def test_ict_expressions_vary_per_subject(tmp_path, small_regions):
    root = make_ict(tmp_path / "ict")
    cfg = ICTSourceConfig(path=str(root / "FaceXModel"), n_subjects=12, n_components=2, seed=0)
    id_w, shapes, exp_w, intensity = ict.sample_weights(cfg)
    smile = FACESCAPE_EXPRESSIONS.index("smile")
    w = exp_w[:, smile]  # (S, B)
    assert np.linalg.matrix_rank(w, tol=1e-6) > 1  # not one fixed offset scaled
    assert (exp_w[:, 0] == 0).all()  # neutral has no expression offset
    lo, hi = cfg.intensity_range
    assert (intensity[:, 1:] >= lo).all() and (intensity[:, 1:] <= hi).all()
    assert exp_w.max() <= ict.MAX_WEIGHT
    # subject i does not depend on n_subjects
    cfg2 = ICTSourceConfig(path=cfg.path, n_subjects=5, n_components=2, seed=0)
    id2, _, exp2, _ = ict.sample_weights(cfg2)
    np.testing.assert_array_equal(id2, id_w[:5])
    np.testing.assert_array_equal(exp2, exp_w[:5])
    # data are deterministic; a different seed changes them
    a = ict.load(cfg2).vertices
    np.testing.assert_array_equal(a, ict.load(cfg2).vertices)
    cfg3 = ICTSourceConfig(path=cfg.path, n_subjects=5, n_components=2, seed=1)
    assert np.abs(ict.load(cfg3).vertices - a).max() > 0.1


def test_ict_plain_obj_and_narrow_region(tmp_path, small_regions):
    root = make_ict(tmp_path / "ict", gz=False)
    d = ict.load(ICTSourceConfig(path=str(root), n_subjects=2, n_components=3, region="narrow"))
    assert d.vertices.shape[1] == N_GRID * (N_GRID - 1)
    assert d.faces.max() < N_GRID * (N_GRID - 1)


def test_ict_errors(tmp_path, small_regions):
    with pytest.raises(InputError, match="not found"):
        ict.load(ICTSourceConfig(path=str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="not an ICT-FaceKit checkout"):
        ict.load(ICTSourceConfig(path=str(tmp_path / "empty")))
    root = make_ict(tmp_path / "a", drop="jawOpen")
    with pytest.raises(InputError, match="missing jawOpen.obj"):
        ict.load(ICTSourceConfig(path=str(root), n_subjects=2, n_components=2))
    root = make_ict(tmp_path / "b", bad="mouthPucker")
    with pytest.raises(InputError) as exc:
        ict.load(ICTSourceConfig(path=str(root), n_subjects=2, n_components=2))
    assert exc.value.path.endswith("mouthPucker.obj.gz") and "vertices" in exc.value.problem
    root = make_ict(tmp_path / "c", n_ids=2)
    with pytest.raises(InputError, match="only 2 identity components"):
        ict.load(ICTSourceConfig(path=str(root), n_subjects=2, n_components=3))


@pytest.mark.skipif(not SHARED_ICT.exists(), reason="shared ICT-FaceKit copy not present")
def test_ict_real_shared_copy():
    d = ict.load(ICTSourceConfig(path=str(SHARED_ICT), n_subjects=2, n_components=4))
    assert d.vertices.shape == (40, 9409, 3)
    assert d.faces.shape == (18460, 3)  # 9,230 polygons of the face area, triangulated
    assert d.uv is not None and d.uv.min() >= 0 and d.uv.max() <= 1
    v = d.vertices[0]
    lm = d.landmarks
    # project axes: x to the subject's left, y up, z toward the viewer
    assert v[lm["eye_outer_L"], 0] > v[lm["eye_inner_L"], 0] > 0 > v[lm["eye_inner_R"], 0] > v[lm["eye_outer_R"], 0]
    assert v[lm["mouth_corner_L"], 0] > 0 > v[lm["mouth_corner_R"], 0]
    assert v[lm["nose_tip"], 1] > v[lm["mouth_corner_L"], 1] > v[lm["chin"], 1]
    assert v[lm["nose_tip"], 2] > v[lm["eye_outer_L"], 2]
    assert 60 < np.ptp(v[:, 0]) < 250  # mm: about 18 cm ear to ear
    # the smile raises the mouth corners; the open mouth lowers the chin
    E = len(FACESCAPE_EXPRESSIONS)
    smile, stretch = FACESCAPE_EXPRESSIONS.index("smile"), FACESCAPE_EXPRESSIONS.index("mouth_stretch")
    assert d.vertices[smile, lm["mouth_corner_L"], 1] > v[lm["mouth_corner_L"], 1] + 2
    assert d.vertices[stretch, lm["chin"], 1] < v[lm["chin"], 1] - 5
    assert d.subject[E] == "ict_001"


# --------------------------------------------------------------------------- FaceScape
def make_facescape(root: Path, ids=(1, 2, 3), exprs=("neutral", "smile", "anger"), missing=(),
                   wrong=(), garbage=(), prefix=(), units_scale=1.0) -> Path:
    for i in ids:
        for e in exprs:
            if (i, e) in missing:
                continue
            k = FACESCAPE_EXPRESSIONS.index(e) + 1
            folder = root / str(i) / "models_reg"
            folder.mkdir(parents=True, exist_ok=True)
            (root / str(i) / "dpmap").mkdir(exist_ok=True)
            name = f"{i}_{k}_{e}.obj" if (i, e) in prefix else f"{k}_{e}.obj"
            if (i, e) in garbage:
                (folder / name).write_bytes(b"\x00\x01garbage")
                continue
            m = grid_mesh(5 if (i, e) in wrong else 6, seed=i * 100 + k, bump=1.0)
            m.vertices = m.vertices * units_scale
            write_mesh(folder / name, m)
    return root


def _fs_cfg(root, **kw):
    return FaceScapeSourceConfig(path=str(root), identities=[1, 2, 3],
                                 expressions=["neutral", "smile", "anger"], **kw)


def test_facescape_check_reports_everything(tmp_path):
    root = make_facescape(tmp_path / "fs", missing=[(2, "smile")], wrong=[(3, "anger")],
                          garbage=[(1, "anger")], prefix=[(2, "anger")])
    chk = fs.check_facescape(_fs_cfg(root))
    assert chk.n_expected == 9 and chk.n_found == 8
    assert chk.missing == [(2, "smile")]
    assert chk.vertex_count == 36
    assert [Path(f).name for f, _ in chk.mismatched] == ["4_anger.obj"] and chk.mismatched[0][1] == 25
    assert [Path(f).parts[-3:] for f, _ in chk.unreadable] == [("1", "models_reg", "4_anger.obj")]
    assert chk.fatal
    msg = chk.message()
    assert "3/models_reg/4_anger.obj (25)" in msg and "licence" in msg and "never downloaded" in msg
    assert any("missing: identity 2 expression smile" == p for p in chk.problems())
    with pytest.raises(InputError, match="wrong vertex count"):
        fs.load(_fs_cfg(root))
    json.dumps(chk.to_dict())


def test_facescape_load_with_missing_pairs_and_prefix(tmp_path):
    root = make_facescape(tmp_path / "fs", missing=[(2, "smile")], prefix=[(3, "neutral")])
    d, chk = fs.load_checked(_fs_cfg(root))
    assert d.vertices.shape == (8, 36, 3) and d.faces.shape == (50, 3)
    assert (d.subject[3], d.expression[3]) == ("2", "neutral")
    assert ("2", "smile") not in set(zip(d.subject, d.expression))
    ref = read_mesh(root / "3" / "models_reg" / "3_1_neutral.obj").vertices
    np.testing.assert_allclose(d.vertices[d.subject.index("3")], ref, atol=1e-4)
    assert d.uv is not None and chk.missing == [(2, "smile")]
    with pytest.raises(InputError, match="allow_missing is false"):
        fs.load(_fs_cfg(root, allow_missing=False))


def test_facescape_crops_and_units(tmp_path):
    root = make_facescape(tmp_path / "fs", units_scale=0.1)  # files in cm
    (tmp_path / "crop.txt").write_text("0, 1, 2\n6 7 8\n")
    d = fs.load(_fs_cfg(root, crop=str(tmp_path / "crop.txt"), units="cm"))
    ref = read_mesh(root / "1" / "models_reg" / "1_neutral.obj").vertices
    np.testing.assert_allclose(d.vertices[0], ref[[0, 1, 2, 6, 7, 8]] * 10, rtol=1e-5)
    np.testing.assert_array_equal(d.faces, [[0, 1, 4], [0, 4, 3], [1, 2, 5], [1, 5, 4]])
    np.save(tmp_path / "crop.npy", np.arange(36) < 12)
    assert fs.load(_fs_cfg(root, crop=str(tmp_path / "crop.npy"), units="cm")).vertices.shape[1] == 12
    from PIL import Image

    img = np.zeros((64, 64), np.uint8)
    img[:, :32] = 255  # white left half: u < 0.5
    Image.fromarray(img).save(tmp_path / "mask.png")
    d = fs.load(_fs_cfg(root, crop=str(tmp_path / "mask.png"), units="cm"))
    assert d.vertices.shape[1] == 18  # 3 of 6 grid columns (u = 0, 0.2, 0.4)
    assert (d.uv[:, 0] < 0.5).all()
    (tmp_path / "crop_bad.txt").write_text("0 1 99\n")
    with pytest.raises(InputError, match="outside"):
        fs.load(_fs_cfg(root, crop=str(tmp_path / "crop_bad.txt")))


def test_facescape_missing_folder_and_empty_tree(tmp_path):
    with pytest.raises(InputError, match="not set"):
        fs.check_facescape(FaceScapeSourceConfig(path=""))
    with pytest.raises(InputError) as exc:
        fs.check_facescape(FaceScapeSourceConfig(path=str(tmp_path / "absent")))
    assert "not found" in str(exc.value) and "licence" in str(exc.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no FaceScape TU model found"):
        fs.check_facescape(FaceScapeSourceConfig(path=str(tmp_path / "empty")))
    with pytest.raises(InputError, match="not a FaceScape expression"):
        fs.check_facescape(FaceScapeSourceConfig(path=str(tmp_path / "empty"), expressions=["yawn"]))


# --------------------------------------------------------------------------- manifest
def make_manifest(root: Path, rows, split=True, fmt="ply") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = ["subject,expression,path" + (",split" if split else "")]
    for j, (s, e, sp) in enumerate(rows):
        rel = f"meshes/{s}_{e}.{fmt}"
        (root / "meshes").mkdir(exist_ok=True)
        write_mesh(root / rel, grid_mesh(6, seed=j, bump=1.0))
        lines.append(f"{s},{e},{rel}" + (f",{sp}" if split else ""))
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    return root / "list.csv"


ROWS = [("a", "neutral", "train"), ("a", "smile", "train"), ("b", "neutral", "train"),
        ("b", "smile", "train"), ("c", "neutral", "test"), ("c", "smile", "test")]


def test_manifest_load_and_split_column(tmp_path):
    csv = make_manifest(tmp_path / "m", ROWS)
    d, files = manifest.load_with_files(ManifestSourceConfig(path=str(csv)))
    assert d.vertices.shape == (6, 36, 3) and d.split == [r[2] for r in ROWS]
    np.testing.assert_allclose(d.vertices[4], read_mesh(files[4]).vertices, atol=1e-4)
    assert files[4].endswith("c_neutral.ply")
    # the manifest's split wins over the configured one
    assign_split(d, SplitConfig(test_subjects=["a"]))
    assert d.split == [r[2] for r in ROWS]
    d2 = manifest.load(ManifestSourceConfig(path=str(csv), units="cm"))
    np.testing.assert_allclose(d2.vertices, d.vertices * 10, rtol=1e-6)


def test_manifest_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        manifest.load(ManifestSourceConfig(path=str(tmp_path / "none.csv")))
    csv = make_manifest(tmp_path / "m", ROWS, split=False, fmt="obj")
    text = csv.read_text()
    csv.write_text(text.replace("subject,", "who,"))
    with pytest.raises(InputError, match="lacks column"):
        manifest.load(ManifestSourceConfig(path=str(csv)))
    csv.write_text(text)
    write_mesh(csv.parent / "meshes" / "b_smile.obj", grid_mesh(5))
    with pytest.raises(InputError) as exc:
        manifest.load(ManifestSourceConfig(path=str(csv)))
    assert exc.value.path.endswith("b_smile.obj") and "36" in exc.value.problem
    m = grid_mesh(6)
    m.faces = m.faces[:, [0, 2, 1]]
    write_mesh(csv.parent / "meshes" / "b_smile.obj", m)
    with pytest.raises(InputError, match="triangles differ"):
        manifest.load(ManifestSourceConfig(path=str(csv)))


# --------------------------------------------------------------------------- splits
def _data(n_subjects):
    subj = [f"s{i}" for i in range(n_subjects) for _ in range(2)]
    return RegisteredData(vertices=np.zeros((len(subj), 3, 3), np.float32), faces=np.array([[0, 1, 2]]),
                          subject=subj, expression=["neutral", "smile"] * n_subjects,
                          split=["train"] * len(subj))


def test_assign_split():
    d = assign_split(_data(5), SplitConfig(test_subjects=["s1", "s3"]))
    assert d.subjects("test") == ["s1", "s3"] and d.split[2:4] == ["test", "test"]
    a = assign_split(_data(20), SplitConfig(test_fraction=0.25, seed=3))
    b = assign_split(_data(20), SplitConfig(test_fraction=0.25, seed=3))
    c = assign_split(_data(20), SplitConfig(test_fraction=0.25, seed=4))
    assert len(a.subjects("test")) == 5 and a.split == b.split and a.split != c.split
    assert len(assign_split(_data(3), SplitConfig(test_fraction=0.01)).subjects("test")) == 1
    assert len(assign_split(_data(2), SplitConfig(test_fraction=0.9)).subjects("train")) == 1
    with pytest.raises(InputError, match="not in the data: zz"):
        assign_split(_data(3), SplitConfig(test_subjects=["s1", "zz"]))
    with pytest.raises(InputError, match="test split is empty"):
        assign_split(_data(3), SplitConfig(test_fraction=0.0))
    with pytest.raises(InputError, match="train split is empty"):
        assign_split(_data(2), SplitConfig(test_subjects=["s0", "s1"]))
    with pytest.raises(InputError, match="at least two subjects"):
        assign_split(_data(1), SplitConfig(test_fraction=0.5))

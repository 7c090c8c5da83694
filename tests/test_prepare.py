"""The data stage: outputs, check.json, and every bad input of issue 2 item 5."""

import json

import numpy as np
import pytest

from cm3dmm.config import config_from_dict
from cm3dmm.errors import InputError
from cm3dmm.io import write_mesh
from cm3dmm.paths import RunPaths
from cm3dmm.prepare import preview_selection, run_check, run_prepare
from cm3dmm.registered import read_registered
from test_sources import ROWS, grid_mesh, make_facescape, make_manifest


def _cfg(tmp_path, source="manifest", **section):
    data = {"source": source, source: section, "preview": False}
    return config_from_dict({"run": "r", "results": str(tmp_path / "results"), "data": data})


def _assert_nothing_written(cfg):
    p = RunPaths(cfg.run_dir)
    assert not p.registered.exists() and not p.check.exists() and not p.preview.exists()
    assert not list(p.data_dir.glob(".tmp-*")) if p.data_dir.exists() else True


def test_prepare_manifest_writes_registered_and_check(tmp_path):
    csv = make_manifest(tmp_path / "m", ROWS)
    cfg = _cfg(tmp_path, path=str(csv))
    report = run_prepare(cfg)
    p = RunPaths(cfg.run_dir)
    d = read_registered(p.registered)
    assert d.vertices.shape == (6, 36, 3) and d.split == [r[2] for r in ROWS]
    check = json.loads(p.check.read_text())
    assert check == json.loads(json.dumps(report))
    assert check["n_samples"] == 6 and check["n_vertices"] == 36 and check["n_faces"] == 50
    assert check["split_sizes"] == {"train": 4, "test": 2}
    assert check["subjects"] == {"train": ["a", "b"], "test": ["c"]}
    assert check["missing_pairs"] == [] and check["problems"] == []
    ext = np.asarray(check["bbox_mm"]["extent"])
    assert 140 < ext[0] < 160 and 170 < ext[1] < 190  # the grid: 150 x 180 mm
    assert check["content_hash"] == d.content_hash()
    assert {"load_s", "validate_s", "write_s", "total_s"} <= set(check["timings"])


def test_prepare_facescape_records_missing_pairs(tmp_path):
    root = make_facescape(tmp_path / "fs", ids=(1, 2, 3, 4), missing=[(4, "smile")])
    cfg = config_from_dict({"results": str(tmp_path / "res"), "data": {
        "source": "facescape", "preview": False, "split": {"test_subjects": [4]},
        "facescape": {"path": str(root), "identities": [1, 2, 3, 4], "expressions": ["neutral", "smile", "anger"]}}})
    report = run_prepare(cfg)
    assert report["n_samples"] == 11 and report["missing_pairs"] == [["4", "smile"]]
    assert report["problems"] == ["missing: identity 4 expression smile"]
    assert report["download_check"]["n_found"] == 11 and report["split_sizes"]["test"] == 2
    assert run_check(cfg)["n_expected"] == 12


def _manifest_case(tmp_path, case):
    """A manifest fixture broken in one way; returns (cfg, the file the error must name)."""
    csv = make_manifest(tmp_path / "m", ROWS, fmt="obj")
    meshes = csv.parent / "meshes"
    target = meshes / "b_smile.obj"
    section = {"path": str(csv)}
    split = None
    if case == "missing folder":
        section["path"] = str(tmp_path / "nowhere" / "list.csv")
        target = tmp_path / "nowhere" / "list.csv"
    elif case == "missing mesh":
        target.unlink()
    elif case == "corrupt mesh":
        target.write_bytes(b"\x89PNG\x00\x00 not a mesh")
    elif case == "truncated mesh":
        target.write_text(target.read_text()[:-15])
    elif case == "vertex-count mismatch":
        write_mesh(target, grid_mesh(5))
    elif case == "nan":
        text = target.read_text().splitlines()
        text[3] = "v nan 0 0"
        target.write_text("\n".join(text) + "\n")
    elif case == "inf":
        text = target.read_text().splitlines()
        text[3] = "v 1 -inf 0"
        target.write_text("\n".join(text) + "\n")
    elif case == "wrong units":
        m = grid_mesh(6)
        m.vertices = m.vertices / 1000.0  # metres in a file the config says is mm
        write_mesh(target, m)
    elif case == "empty split":
        csv.write_text("\n".join(line.rsplit(",", 1)[0] for line in csv.read_text().splitlines()) + "\n")
        split = {"test_fraction": 0.0}
        target = None
    data = {"source": "manifest", "manifest": section, "preview": False}
    if split:
        data["split"] = split
    return config_from_dict({"results": str(tmp_path / "results"), "data": data}), target


CASES = ["missing folder", "missing mesh", "corrupt mesh", "truncated mesh", "vertex-count mismatch",
         "nan", "inf", "wrong units", "empty split"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_input_error_and_no_output(tmp_path, case):
    cfg, target = _manifest_case(tmp_path, case)
    # an earlier (good-looking) output must not survive a failed run
    p = RunPaths(cfg.run_dir)
    p.data_dir.mkdir(parents=True)
    p.registered.write_bytes(b"stale")
    with pytest.raises(InputError) as exc:
        run_prepare(cfg)
    if target is not None:
        assert exc.value.path == str(target), (case, str(exc.value))
    expected = {"missing folder": "not found", "missing mesh": "file not found", "corrupt mesh": "binary data",
                "truncated mesh": "face", "vertex-count mismatch": "vertices", "nan": "NaN",
                "inf": "NaN or infinite", "wrong units": "implausible", "empty split": "test split is empty"}
    assert expected[case] in exc.value.problem, exc.value.problem
    _assert_nothing_written(cfg)


def test_bad_facescape_tree_fails_before_writing(tmp_path):
    root = make_facescape(tmp_path / "fs", wrong=[(2, "smile")], missing=[(1, "anger")])
    cfg = config_from_dict({"results": str(tmp_path / "res"), "data": {
        "source": "facescape", "preview": False,
        "facescape": {"path": str(root), "identities": [1, 2, 3], "expressions": ["neutral", "smile", "anger"]}}})
    with pytest.raises(InputError) as exc:
        run_prepare(cfg)
    assert "2/models_reg/2_smile.obj (25)" in str(exc.value) and "1 missing" in str(exc.value)
    _assert_nothing_written(cfg)
    cfg.data.facescape.path = str(tmp_path / "nope")
    with pytest.raises(InputError, match="never downloaded"):
        run_prepare(cfg)


def test_preview_selection_prefers_complete_subjects(tiny_registered):
    d = tiny_registered
    d.subject, d.expression, d.split = list(d.subject), list(d.expression), list(d.split)
    # drop s000's last expression: s000 becomes incomplete
    keep = [k for k in range(d.n_samples) if not (d.subject[k] == "s000" and d.expression[k] == "mouth_stretch")]
    d.vertices = d.vertices[keep]
    d.subject = [d.subject[k] for k in keep]
    d.expression = [d.expression[k] for k in keep]
    d.split = [d.split[k] for k in keep]
    rows, cols, idx = preview_selection(d, 3)
    assert cols == ["neutral", "smile", "mouth_stretch"]
    assert rows == ["s003", "s001", "s002"]  # the test subject first, complete subjects before s000
    assert [d.subject[k] for k in idx[0]] == ["s003"] * 3
    assert [d.expression[k] for k in idx[1]] == cols


def test_prepare_preview_png(tmp_path):
    pytest.importorskip("vtkmodules")
    csv = make_manifest(tmp_path / "m", ROWS)
    cfg = _cfg(tmp_path, path=str(csv))
    cfg.data.preview = True
    cfg.data.preview_subjects = 2
    try:
        run_prepare(cfg)
    except ImportError as exc:  # pragma: no cover - a machine without an off-screen GL
        pytest.skip(f"no off-screen renderer: {exc}")
    from PIL import Image

    with Image.open(RunPaths(cfg.run_dir).preview) as im:
        w, h = im.size
    assert w >= 2 * 192 and h >= 2 * 192

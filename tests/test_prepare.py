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


# ----------------------------------------------------------------------------- issue 13: one frame
def _rot(axis: int, degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = np.cos(a)
    r[i, j], r[j, i] = -np.sin(a), np.sin(a)
    return r


def _naive_procrustes(x: np.ndarray, ref: np.ndarray, reflection: bool):
    """Similarity alignment of one mesh, written out: centre, SVD, optional det fix, scale."""
    xc = x - x.mean(0)
    u, s, wt = np.linalg.svd(xc.T @ ref)
    d = np.eye(3)
    if not reflection and np.linalg.det(u @ wt) < 0:
        d[2, 2] = -1
    r = u @ d @ wt
    scale = np.trace(np.diag(s) @ d) / (xc ** 2).sum()
    res = np.sqrt(((scale * xc @ r - ref) ** 2).sum(1).mean())
    return r, scale, res


def test_frame_statistics_match_a_naive_procrustes(tiny_registered):
    from cm3dmm.framecheck import frame_statistics

    v = tiny_registered.vertices.astype(np.float64)
    v[5] = (v[5] - v[5].mean(0)) @ _rot(1, 12).T * 1.1 + v[5].mean(0) + [3.0, -2.0, 1.0]
    v[7] = v[7] * [-1, 1, 1]
    st = frame_statistics(v, tiny_registered.subject)
    ref = np.median(v - v.mean(1, keepdims=True), axis=0)
    ref -= ref.mean(0)
    assert float(st["radius"]) == pytest.approx(np.sqrt((ref ** 2).sum(1).mean()), rel=1e-6)
    for k in range(len(v)):
        r, scale, res = _naive_procrustes(v[k], ref, reflection=False)
        _, _, res_any = _naive_procrustes(v[k], ref, reflection=True)
        angle = np.degrees(np.arccos(np.clip((np.trace(r) - 1) / 2, -1, 1)))
        assert st["scale"][k] == pytest.approx(scale, rel=1e-4)
        assert st["residual"][k] == pytest.approx(res, rel=1e-3, abs=1e-3)
        assert st["mirror_residual"][k] == pytest.approx(res_any, rel=1e-3, abs=1e-3)
        assert st["angle_deg"][k] == pytest.approx(angle, abs=0.05)
    assert st["angle_deg"][5] == pytest.approx(12, abs=1.5) and 1 / st["scale"][5] == pytest.approx(1.1, rel=0.02)
    assert bool(st["mirrored"][7]) and not st["mirrored"][np.arange(len(v)) != 7].any()


@pytest.mark.parametrize("kind, fragment, amount", [
    ("shift_1e6", "mm from the other meshes", 1e6 * np.sqrt(3)),
    ("shift_300", "mm from the other meshes", 300.0),
    ("rot_90", "rotated by", 90.0),
    ("mirror", "mirrored", None),
    ("scale_2", "times the size", 2.0),
    ("scramble", "not the same registration", None),
])
def test_frame_check_names_the_misplaced_mesh(tiny_registered, kind, fragment, amount):
    import re

    from cm3dmm.framecheck import check_frames

    d = tiny_registered
    v = d.vertices.astype(np.float64).copy()
    k = 4
    c = v[k].mean(0)
    v[k] = {"shift_1e6": lambda x: x + 1e6, "shift_300": lambda x: x + [300.0, 0, 0],
            "rot_90": lambda x: (x - c) @ _rot(1, 90).T + c, "mirror": lambda x: x * [-1, 1, 1],
            "scale_2": lambda x: (x - c) * 2 + c,
            "scramble": lambda x: x[np.random.default_rng(0).permutation(len(x))]}[kind](v[k])
    files = [f"mesh{i}.obj" for i in range(len(v))]
    with pytest.raises(InputError, match=fragment) as ei:
        check_frames(v, d.subject, d.expression, files, "origin")
    msg = str(ei.value)
    assert ei.value.path == "mesh4.obj" and f"{d.subject[k]}/{d.expression[k]}" in msg
    if amount is not None:
        got = float(re.search(r"(?:lies|by|is) ([0-9.e+]+)", msg).group(1))
        assert got == pytest.approx(amount, rel=0.03), msg
    # the good meshes alone pass
    keep = np.arange(len(v)) != k
    check_frames(v[keep], [s for s, m in zip(d.subject, keep) if m], [e for e, m in zip(d.expression, keep) if m])


def test_frame_check_accepts_the_projects_data(tiny_registered):
    """Synthetic data of every seed, the anny test config's data, and (when present) a prepared run's
    registered.h5 (the default anny run and ICT-FaceKit) pass the frame check with room to spare."""
    from pathlib import Path

    from cm3dmm.framecheck import LIMITS, check_frames, frame_statistics
    from cm3dmm.registered import read_registered
    from conftest import REPO, make_registered

    for seed in range(4):
        d = make_registered(seed=seed, n_subjects=6)
        check_frames(d.vertices, d.subject, d.expression)
    for run in ("default", "ict"):
        p = Path(REPO) / "results" / run / "data" / "registered.h5"
        if not p.exists():
            continue
        d = read_registered(p, with_scans=False)
        info = check_frames(d.vertices, d.subject, d.expression)
        st = frame_statistics(d.vertices, d.subject)
        r = float(st["radius"])
        assert info["max_angle_deg"] < 0.6 * LIMITS.angle_deg
        assert st["residual"].max() < 0.7 * LIMITS.residual * r


def test_prepare_refuses_a_mirrored_manifest_mesh_and_records_the_check(tmp_path):
    csv = make_manifest(tmp_path / "m", ROWS)
    cfg = _cfg(tmp_path, path=str(csv))
    report = run_prepare(cfg)
    assert report["frame_check"]["checked"] and report["frame_check"]["max_angle_deg"] < 5
    lines = csv.read_text().splitlines()
    target = csv.parent / lines[2].split(",")[2]
    from cm3dmm.io import read_mesh

    m = read_mesh(target)
    m.vertices = m.vertices * [-1, 1, 1]
    write_mesh(target, m)
    with pytest.raises(InputError, match="mirrored") as ei:
        run_prepare(cfg)
    assert ei.value.path == str(target)
    _assert_nothing_written(cfg)


@pytest.mark.parametrize("bad", ["../../evil", "s 1", "a/b", ".hidden", "-rf", "", "x" * 101])
def test_manifest_refuses_unsafe_names(tmp_path, bad):
    csv = make_manifest(tmp_path / "m", ROWS)
    lines = csv.read_text().splitlines()
    cells = lines[1].split(",")
    cells[0] = bad
    lines[1] = ",".join(cells)
    csv.write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp_path, path=str(csv))
    with pytest.raises(InputError, match="line 2: (subject .* is not a valid name|empty 'subject')"):
        run_prepare(cfg)
    _assert_nothing_written(cfg)


def test_names_rule():
    from cm3dmm.registered import name_problem

    for ok in ("anny_036", "ict_000", "1", "M-01.a", "x" * 100):
        assert name_problem("subject", ok) is None
    for bad in ("../x", "a b", "a/b", "a\\b", ".", "..", "-x", "", "x" * 101, "é", "a\nb", 3):
        assert name_problem("subject", bad), bad


# ----------------------------------------------------------------------------- issue 13: disk errors
def test_prepare_on_a_full_disk_is_one_clear_error(tmp_path):
    """A file-size limit makes every write past 1 KiB fail (EFBIG, as ENOSPC on a full disk): prepare
    raises WriteError naming registered.h5, leaves no file, and the CLI prints one line."""
    import subprocess
    import sys

    import corpus

    csv = make_manifest(tmp_path / "m", ROWS)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"run: r\nresults: {tmp_path / 'results'}\ndata:\n  source: manifest\n  preview: false\n"
                        f"  manifest:\n    path: {csv}\n")
    proc = subprocess.run([sys.executable, "-m", "cm3dmm", "prepare", "--config", str(cfg_path)],
                          capture_output=True, text=True, preexec_fn=corpus.file_size_limit(1024), timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "registered.h5: cannot write (File too large)" in lines[0]
    data = tmp_path / "results" / "r" / "data"
    assert not [p for p in data.iterdir()] if data.exists() else True


def test_output_folder_is_checked_before_the_work(tmp_path):
    from cm3dmm.errors import WriteError
    from cm3dmm.io.atomic import check_writable

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(WriteError, match="cannot write") as ei:
        check_writable(blocker / "results" / "run")
    assert str(blocker) in str(ei.value)
    with pytest.raises(WriteError, match="No space left on device"):
        check_writable(tmp_path / "ok", need_bytes=1 << 62)
    assert check_writable(tmp_path / "ok").is_dir()
    assert not list((tmp_path / "ok").iterdir())  # the probe file is gone
    import subprocess
    import sys

    from cm3dmm.io.atomic import _HOST

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / "ok" / f".tmp-probe-{_HOST}.{dead.pid}-abc123"  # a check killed mid-probe
    killed.write_text("")
    check_writable(tmp_path / "ok")
    assert not list((tmp_path / "ok").iterdir())

"""Config loading, registered.h5 round trip and corruption, atomic writes, CLI error handling."""

import json

import h5py
import numpy as np
import pytest

from cm3dmm.cli import main
from cm3dmm.config import config_from_dict, load_config
from cm3dmm.errors import InputError
from cm3dmm.io.atomic import atomic_path
from cm3dmm.registered import read_registered, validate, write_registered
from conftest import REPO, make_registered


def test_shipped_configs_load():
    for name in ("config", "test", "ict", "facescape"):
        path = REPO / "config" / f"{name}.yaml"
        if path.exists():
            cfg = load_config(path)
            assert cfg.run


def test_unknown_key_names_the_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  stepz: 3\n")
    with pytest.raises(InputError, match=r"unknown config key 'train.stepz'") as ei:
        load_config(p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("values, pattern", [
    ({"train": {"lr": "fast"}}, r"train.lr: expected a number"),
    ({"train": {"steps": 0}}, r"train.steps: must be > 0"),
    ({"train": {"steps": 2.5}}, r"train.steps: expected an integer"),
    ({"data": {"source": "nope"}}, r"data.source: 'nope' is not one of"),
    ({"data": {"split": {"test_fraction": 1.5}}}, r"must be in \[0, 1\)"),
    ({"data": {"preview": "yes"}}, r"expected true or false"),
    ({"model": "big"}, r"model: expected a mapping"),
])
def test_bad_values(values, pattern):
    with pytest.raises(InputError, match=pattern):
        config_from_dict(values)


def test_preset_fills_and_file_wins():
    cfg = config_from_dict({"train": {"preset": "paper"}, "model": {"id_dim": 7}})
    assert cfg.model.encoder.n_levels == 16 and cfg.model.encoder.n_features == 32
    assert cfg.model.decoder.widths == [512, 256, 256, 128, 32]
    assert cfg.train.batch_faces == 20 and cfg.model.id_dim == 7 and cfg.model.exp_dim == 128


def test_registered_round_trip(tmp_path):
    data = make_registered()
    data.landmarks = {"nose_tip": 14}
    data.scans = {0: (np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32), None)}
    path = tmp_path / "registered.h5"
    h = write_registered(path, data)
    back = read_registered(path)
    assert back.content_hash() == h
    np.testing.assert_array_equal(back.vertices, data.vertices)
    np.testing.assert_array_equal(back.faces, data.faces)
    assert back.subject == data.subject and back.split == data.split
    assert back.landmarks == {"nose_tip": 14}
    np.testing.assert_array_equal(back.scans[0][0], data.scans[0][0])
    assert not list(tmp_path.glob(".tmp-*"))


def test_registered_truncated_and_tampered(tmp_path):
    path = tmp_path / "registered.h5"
    write_registered(path, make_registered())
    raw = path.read_bytes()
    (tmp_path / "trunc.h5").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="corrupt"):
        read_registered(tmp_path / "trunc.h5")
    with h5py.File(path, "r+") as h:
        h["vertices"][0, 0, 0] += 1.0
    with pytest.raises(InputError, match="content hash"):
        read_registered(path)
    with pytest.raises(InputError, match="not found"):
        read_registered(tmp_path / "missing.h5")


def test_registered_subject_read_is_the_same_rows(tmp_path):
    """The fit stage reads one subject's rows only (680 MB on the ICT run): the same meshes and names as
    the whole file's rows of that subject; their numbers are still validated; an unknown subject names
    the test subjects."""
    data = make_registered()
    rng = np.random.default_rng(0)
    data.scans = {i: (rng.normal(size=(20 + i, 3)).astype(np.float32), None) for i in range(len(data.subject))}
    path = tmp_path / "registered.h5"
    write_registered(path, data)
    whole = read_registered(path, with_scans=False)
    test = whole.subjects("test")
    pick = [test[-1], whole.subjects("train")[0]]
    part = read_registered(path, with_scans=False, subjects=pick)
    rows = [i for i, s in enumerate(whole.subject) if s in pick]
    scans = read_registered(path, subjects=pick).scans  # keyed by the rows read
    assert sorted(scans) == list(range(len(rows)))
    for k, r in enumerate(rows):
        np.testing.assert_array_equal(scans[k][0], data.scans[r][0])
    np.testing.assert_array_equal(part.vertices, whole.vertices[rows])
    assert part.subject == [whole.subject[i] for i in rows]
    assert part.expression == [whole.expression[i] for i in rows]
    assert part.split == [whole.split[i] for i in rows]
    one = read_registered(path, with_scans=False, subjects=[test[0]])
    assert one.subjects() == [test[0]] and set(one.split) == {"test"}  # one split only: allowed
    with pytest.raises(InputError, match=r"\['nobody'\] are not in the dataset \(test subjects: \[" + repr(test[0])):
        read_registered(path, subjects=["nobody"])
    with h5py.File(path, "r+") as h:
        h["vertices"][rows[0], 2, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        read_registered(path, subjects=pick)


@pytest.mark.parametrize("mutate, pattern", [
    (lambda d: d.vertices.__setitem__((1, 2, 0), np.nan), "NaN"),
    (lambda d: d.vertices.__imul__(0.001), "implausible.*metres"),
    (lambda d: d.split.__setitem__(slice(None), ["train"] * len(d.split)), "test split is empty"),
    (lambda d: d.subject.__setitem__(1, d.subject[0]) or d.expression.__setitem__(1, d.expression[0]),
     "duplicate mesh"),
])
def test_validate_rejects(mutate, pattern):
    data = make_registered()
    mutate(data)
    with pytest.raises(InputError, match=pattern):
        validate(data)


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_cli_reports_input_error_in_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("bogus: 1\n")
    rc = main(["template", "--config", str(cfg)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.count("\n") == 0 and "unknown config key 'bogus'" in err and str(cfg) in err
    assert "Traceback" not in err


def test_cli_config_json_override(capsys):
    rc = main(["template", "--config-json", json.dumps({"train": {"steps": "x"}})])
    assert rc == 2 and "train.steps: expected an integer" in capsys.readouterr().err

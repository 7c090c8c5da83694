"""The bad-input corpus (tests/corpus.py) through the CLI, as a subprocess: every case exits 2 with
one line on stderr naming the file and the problem, no traceback, and leaves nothing that looks
finished. One case also goes through Snakemake, where the rule must fail with the same line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import corpus

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
       "PYVISTA_OFF_SCREEN": "true"}


#: Cases of the stages after prepare need a trained tiny run and a torch import per subprocess.
CASES = [pytest.param(c, id=c.name, marks=() if c.stage == "prepare" else pytest.mark.slow)
         for c in corpus.CASES]


def _selected(session) -> list[corpus.Case]:
    names = {item.callspec.params["case"].name for item in session.items
             if getattr(item, "originalname", "") == "test_bad_input"
             and "case" in getattr(getattr(item, "callspec", None), "params", {})}
    names.add("garbage_obj")  # the Snakemake test reuses it
    return [c for c in corpus.CASES if c.name in names]


#: tests of this module that need the trained tiny run
NEEDS_RUN = {"test_training_divergence_stops_and_keeps_the_last_checkpoint", "test_fit_reports_non_convergence"}


@pytest.fixture(scope="module")
def base(request, tmp_path_factory):
    full = (any(c.stage != "prepare" for c in _selected(request.session))
            or any(getattr(item, "originalname", "") in NEEDS_RUN for item in request.session.items))
    return corpus.build_base(tmp_path_factory.mktemp("corpus-base"), full=full)


@pytest.fixture(scope="module")
def results(request, base, tmp_path_factory):
    """The selected cases set up and run (the CLI subprocesses run side by side: most of their time
    is importing torch). name -> (Outcome, CompletedProcess) or the exception of its setup."""
    root = tmp_path_factory.mktemp("corpus-cases")
    cases = _selected(request.session)

    def one(case):
        try:
            folder = root / case.name
            oc = case.setup(corpus.CaseDir(base, folder))
            return oc, run_cli(oc.argv, folder, oc.fsize_limit)
        except Exception as exc:  # reported by the case's own test
            return exc

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(zip([c.name for c in cases], pool.map(one, cases)))


def run_cli(argv: list[str], cwd: Path, fsize_limit: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cm3dmm", *argv], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=300, preexec_fn=corpus.file_size_limit(fsize_limit))


def stray_temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).rglob(".tmp-*")) if Path(folder).exists() else []


def check_outcome(case: corpus.Case, oc: corpus.Outcome, proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert line.startswith(f"cm3dmm {case.stage}: error: "), line
    named = str(oc.names)
    assert named in line or os.path.basename(named) in line, f"{line!r} does not name {named}"
    for frag in case.expect:
        assert frag.lower() in line.lower(), f"{line!r} lacks {frag!r}"
    left = [p for p in oc.outputs if p.exists()]
    assert not left, f"outputs left after the failure: {left}"
    assert not stray_temp_files(oc.run_dir), stray_temp_files(oc.run_dir)
    return line


def test_corpus_is_large_and_covers_every_stage():
    names = [c.name for c in corpus.CASES]
    assert len(names) == len(set(names)) and len(names) >= 30
    assert {c.stage for c in corpus.CASES} >= {"prepare", "template", "cache", "train", "fit", "evaluate"}


def test_docs_list_every_case():
    doc = (corpus.REPO / "docs" / "bad-input.md").read_text()
    missing = [c.name for c in corpus.CASES if f"`{c.name}`" not in doc]
    assert not missing, f"docs/bad-input.md lacks {missing} (python tests/corpus.py prints the table)"


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case, results):
    res = results[case.name]
    if isinstance(res, Exception):
        raise res
    check_outcome(case, *res)


@pytest.mark.slow
def test_rule_fails_with_the_same_line(results, tmp_path):
    """``garbage_obj`` through Snakemake: the prepare_data rule fails with the CLI's line."""
    case = corpus.cases_by_name()["garbage_obj"]
    oc, proc = results[case.name]
    line = check_outcome(case, oc, proc)
    for p in oc.run_dir.rglob("*"):  # the CLI run left nothing; start the workflow from scratch anyway
        assert p.is_dir()
    work = tmp_path / "wf"
    (work / "config").mkdir(parents=True)
    shutil.copy(corpus.REPO / "config" / "config.yaml", work / "config" / "config.yaml")
    cfg = Path(oc.argv[oc.argv.index("--config") + 1])
    snake = Path(sys.executable).with_name("snakemake")
    proc = subprocess.run([str(snake), "--snakefile", str(corpus.REPO / "Snakefile"), "--directory", str(work),
                           "--configfile", str(cfg), "--cores", "1", "--nolock", str(oc.outputs[0])],
                          cwd=work, env=ENV, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert line in out.splitlines(), out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert not [p for p in oc.outputs if p.exists()]
    assert not stray_temp_files(oc.run_dir)


QUICK_FUZZ = ["test_obj_reader", "test_obj_fast_path_agrees_with_line_parser", "test_read_mesh_files",
              "test_ply_reader", "test_config_from_values", "test_config_from_text"]


@pytest.mark.parametrize("name", QUICK_FUZZ)
def test_readers_quick_fuzz(name, tmp_path_factory):
    """50 examples of each fuzz test of tests/fuzz (``make fuzz`` runs thousands)."""
    import inspect

    from hypothesis import HealthCheck, settings

    from fuzz import test_fuzz_readers as fz

    test = settings(max_examples=50, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(getattr(fz, name))
    kwargs = {"tmp_path_factory": tmp_path_factory} if "tmp_path_factory" in inspect.signature(test).parameters else {}
    test(**kwargs)


# ----------------------------------------------------------------------------- numerical guards
@pytest.mark.slow
def test_training_divergence_stops_and_keeps_the_last_checkpoint(base, tmp_path):
    """lr = 1e30 blows the loss up at step 2: one line on stderr, the step-1 checkpoint kept
    (finite), no model.pt; a rerun resumes from that checkpoint and stops the same way."""
    import re

    import torch

    c = corpus.CaseDir(base, tmp_path)
    c.copy_run("data/registered.h5", "template/template.npz", "cache")
    oc = c.stage(["train", "--set", "train.lr=1e30", "--set", "train.code_lr=1e30", "--set",
                  "train.checkpoint_every=1"], "", corpus.TRAIN_OUT[:1])
    last = c.run / "models" / "cm3dmm" / "checkpoints" / "last.pt"
    for attempt in range(2):
        proc = run_cli(oc.argv, tmp_path)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        m = re.match(r"cm3dmm train: error: training diverged: the loss is (nan|inf) at step (\d+) .*"
                     r"last good checkpoint is kept \((.*)\)$", lines[0])
        assert m, lines[0]
        assert Path(m.group(3)) == last
        ckpt = torch.load(last, map_location="cpu", weights_only=False)
        assert 1 <= ckpt["step"] < int(m.group(2))
        assert all(bool(torch.isfinite(t).all()) for t in ckpt["net"].values() if t.is_floating_point())
        assert not (c.run / "models" / "cm3dmm" / "model.pt").exists()
        assert not stray_temp_files(c.run)
        if attempt == 0:
            first = lines[0]
    assert lines[0] == first  # resumed from the kept checkpoint: the same divergence


@pytest.mark.slow
def test_fit_reports_non_convergence(base, tmp_path):
    """A fit stopped by its iteration limit says so: a warning line, and ``converged: false`` with
    the status in the .json and the .npz (the fit itself is written: it is a valid, if rough, fit)."""
    c = corpus.CaseDir(base, tmp_path)
    c.copy_run("data/registered.h5", "template/template.npz", "models")
    oc = c.stage(["fit", "--method", "cm3dmm", "--subject", corpus.TEST_SUBJECT, "--set", "fit.max_iter=1",
                  "--set", "fit.polish_iters=0"], "", [])
    proc = run_cli(oc.argv, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    warn = [ln for ln in proc.stderr.splitlines() if "used its whole iteration budget" in ln]
    assert len(warn) == 1 and corpus.TEST_SUBJECT in warn[0], proc.stderr
    fit_json = c.run / "fits" / "cm3dmm" / f"{corpus.TEST_SUBJECT}.json"
    info = json.loads(fit_json.read_text())["convergence"]
    assert info["converged"] is False and info["status"] != "converged", info
    with np.load(fit_json.with_suffix(".npz")) as z:
        assert not bool(z["converged"])


# ----------------------------------------------------------------------------- issue 13: the config as a class
def _numeric_keys(cls=None, prefix=""):
    """Every int / float / list-of-number field of the config, as dotted keys with its default."""
    import dataclasses
    import typing

    from cm3dmm.config import Config

    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            out += _numeric_keys(tp, key + ".")
        elif tp in (int, float) or typing.get_args(tp) in ((int,), (float,)):
            out.append((key, tp))
    return out


def test_every_number_of_the_config_is_checked_when_loaded():
    """No numeric setting takes a negative or non-finite value through to a stage: each is refused
    by config_from_dict with its key named (fields added later are covered without a new rule)."""
    from cm3dmm.config import _SIGNED, config_from_dict
    from cm3dmm.errors import InputError

    keys = _numeric_keys()
    assert len(keys) > 60
    for key, tp in keys:
        if key in _SIGNED:
            continue
        scalar = tp in (int, float)
        for bad in ([-1] if tp is int or tp == list[int] else [-1.0, float("inf"), float("nan")]):
            value = bad if scalar else [bad]
            with pytest.raises(InputError, match=key.replace(".", r"\.")):
                config_from_dict(_nested(key, value))


def _nested(key: str, value) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out

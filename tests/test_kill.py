"""Kill anywhere: every stage is SIGKILLed at several points of its run, rerun, and must end with
the outputs of an uninterrupted run.

For each stage (prepare_data, template, cache_samples, train, fit, evaluate) a run folder gets the
reference run's inputs of that stage; ``python -m cm3dmm STAGE`` is started as a subprocess and
killed (SIGKILL, no chance to clean up) at each kill point: the moment its first temporary file
appears (mid-write), the moment its first final output appears (the others not yet written), or a
random short delay after such a moment. Right after each kill every final output that exists must
already equal the reference (an atomic write never exposes a partial file under its final name);
the stage is then rerun (``cm3dmm.cli.main``, the CLI in this process) and all its outputs must
equal the reference run's: arrays bit for bit (HDF5 datasets and attributes, npz arrays, PNG
pixels, JSON / CSV / Markdown contents except wall-clock timings), and the trained model's
tensors within 1e-6 absolute (fixed seed, one thread; resuming from ``checkpoints/last.pt``).

``test_workflow_rerun_incomplete`` does the same through Snakemake: the workflow is killed while
the template rule writes, and ``snakemake --rerun-incomplete`` finishes it.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import corpus

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
       "PYVISTA_OFF_SCREEN": "true"}
#: tolerance of the resumed model's tensors (fixed seed, one thread)
TRAIN_ATOL = 1e-6
#: keys of JSON / model summaries that hold wall-clock times or the resume point
VOLATILE = ("timings", "seconds", "wall_s", "elapsed", "elapsed_s", "points_per_s", "resumed_from", "time_s",
            "fit_seconds", "train_seconds", "ms")

#: per stage: the CLI arguments, the reference files it needs, its final outputs (run-relative)
STAGES = {
    "prepare": (["prepare"], [], ["data/registered.h5", "data/check.json"]),
    "template": (["template"], ["data/registered.h5"], corpus.TEMPLATE_OUT),
    "cache": (["cache"], ["data/registered.h5", "template/template.npz"], corpus.CACHE_OUT),
    "train": (["train"], ["data/registered.h5", "template/template.npz", "cache"], corpus.TRAIN_OUT),
    "fit": (["fit", "--method", "cm3dmm", "--subject", corpus.TEST_SUBJECT],
            ["data/registered.h5", "template/template.npz", "models/cm3dmm/model.pt"],
            corpus._fit_out("cm3dmm")),
    "evaluate": (["evaluate"], ["data/registered.h5", "template/template.npz", "models", "fits"],
                 ["tables/reconstruction.csv", "tables/reconstruction.md", "tables/regions.csv",
                  "tables/pca_sweep.csv", "tables/protocol.md"]),
}
#: where each stage writes (polled for temporary files)
WATCH = {"prepare": "data", "template": "template", "cache": "cache", "train": "models/cm3dmm",
         "fit": "fits/cm3dmm", "evaluate": "tables"}
#: outputs rewritten while the stage runs (progress reports), complete only when the stage is:
#: none (training reports progress in train_log.partial.csv; train_log.csv comes with model.pt)
PROGRESS: set[str] = set()
#: kill points per stage: (trigger, extra random delay in s); trigger "tmp" = the first .tmp-* file,
#: "out" = the first final output, "file:REL" = that file
KILLS = {
    "prepare": [("tmp", 0.0), ("out", 0.0)],
    "template": [("tmp", 0.0), ("out", 0.0), ("tmp", 0.3)],
    "cache": [("tmp", 0.0), ("out", 0.0)],
    "train": [("file:models/cm3dmm/checkpoints/last.pt", 0.0), ("tmp", 0.5), ("file:models/cm3dmm/model.pt", 0.0)],
    "fit": [("tmp", 0.0), ("out", 0.0)],
    "evaluate": [("tmp", 0.0), ("out", 0.0), ("tmp", 1.0)],
}


def config_values(run_dir: Path, manifest: Path) -> dict:
    v = corpus.base_config(run_dir, manifest)
    v["baselines"]["methods"] = ["pca"]
    v["train"].update({"steps": 12, "checkpoint_every": 2, "validate_every": 4})
    v["data"]["preview"] = False
    return v


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The uninterrupted reference run (every stage through the CLI, in this process)."""
    from cm3dmm.cli import main

    root = tmp_path_factory.mktemp("kill")
    csv = corpus.write_faces(root / "data")
    run = root / "ref" / "run"  # every run is named "run" (the tables name it)
    cfg = corpus.write_config(root / "ref.yaml", config_values(run, csv))
    from cm3dmm.config import load_config
    from cm3dmm.paths import size_variants

    # the fits of rule fit_size (the reconstruction table's other rows) are jobs before evaluate
    sizes = [["fit-size", "--variant", v] for v in size_variants(load_config(cfg, []))]
    for argv in (["prepare"], ["template"], ["cache"], ["train"], ["train-baseline", "pca"],
                 ["fit", "--method", "cm3dmm", "--subject", corpus.TEST_SUBJECT],
                 ["fit", "--method", "pca", "--subject", corpus.TEST_SUBJECT], *sizes, ["evaluate"]):
        assert main([argv[0], "--config", str(cfg), *argv[1:]]) == 0, argv
    return root, run, csv


# ----------------------------------------------------------------------------- comparisons
#: results folders of the runs being compared: paths under them are compared relative to them
ROOTS: list[str] = []


def _volatile(key) -> bool:
    k = str(key)
    return k in VOLATILE or k.startswith("timing") or k.endswith("_s") or k.endswith("seconds")


def _strip(obj):
    """JSON-like ``obj`` without wall-clock entries, with the results folders replaced."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not _volatile(k)}
    if isinstance(obj, (list, tuple)):
        return [_strip(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return "nan"
    if isinstance(obj, str):
        for r in ROOTS:
            obj = obj.replace(r, "<results>")
    return obj


def _h5_items(path: Path) -> dict:
    import h5py

    out = {}
    with h5py.File(path, "r") as h:
        out["/attrs"] = {k: np.asarray(v).tolist() for k, v in h.attrs.items()}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
                out[name + "/attrs"] = {k: np.asarray(v).tolist() for k, v in obj.attrs.items()}
        h.visititems(visit)
    return out


def _equal_arrays(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)
    return a.shape == b.shape and np.array_equal(a, b)


def _tensors_close(a, b, where: str) -> None:
    import torch

    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys() if isinstance(a, dict) else a)
        for k in a:
            if _volatile(k):
                continue
            _tensors_close(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _tensors_close(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(b, a, rtol=0, atol=TRAIN_ATOL, equal_nan=True, msg=where)
    elif isinstance(a, float):
        assert b == pytest.approx(a, abs=TRAIN_ATOL, nan_ok=True), where
    else:
        assert _strip(a) == _strip(b), where


def same_output(ref_run: Path, run: Path, rel: str) -> None:
    """Assert that output ``rel`` of ``run`` has the content of the reference run's (paths inside it
    compared relative to the results folder of each)."""
    ref, got = ref_run / rel, run / rel
    name = ref.name
    ROOTS[:] = sorted({str(ref_run.parent), str(run.parent)}, key=len, reverse=True)
    if name.endswith(".h5"):
        a, b = _h5_items(ref), _h5_items(got)
        assert a.keys() == b.keys(), name
        for k in a:
            if k.endswith("attrs"):
                assert _strip(a[k]) == _strip(b[k]), (name, k)
            else:
                assert _equal_arrays(a[k], b[k]), (name, k)
    elif name.endswith(".npz"):
        with np.load(ref, allow_pickle=False) as za, np.load(got, allow_pickle=False) as zb:
            assert sorted(za.files) == sorted(zb.files), name
            for k in za.files:
                if _volatile(k):
                    continue
                assert _equal_arrays(za[k], zb[k]), (name, k)
    elif name.endswith(".pt"):
        import torch

        _tensors_close(torch.load(ref, map_location="cpu", weights_only=False),
                       torch.load(got, map_location="cpu", weights_only=False), name)
    elif name.endswith(".png"):
        from PIL import Image

        with Image.open(ref) as ia, Image.open(got) as ib:
            assert np.array_equal(np.asarray(ia), np.asarray(ib)), name
    elif name.endswith(".json"):
        assert _strip(json.loads(ref.read_text())) == _strip(json.loads(got.read_text())), name
    elif name == "train_log.csv":
        import pandas as pd

        a, b = pd.read_csv(ref), pd.read_csv(got)
        a, b = a.drop(columns=["elapsed_s"]), b.drop(columns=["elapsed_s"])
        pd.testing.assert_frame_equal(a, b, rtol=0, atol=TRAIN_ATOL)
    else:
        assert ref.read_text() == got.read_text(), name


# ----------------------------------------------------------------------------- killing
def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".tmp-*")] if folder.exists() else []


def _fired(trigger: str, run: Path, stage: str, outputs: list[Path]) -> bool:
    if trigger == "tmp":
        return bool(_temp_files(run / WATCH[stage]))
    if trigger == "out":
        return any(p.exists() for p in outputs)
    rel = trigger.split(":", 1)[1]
    return (run / rel).exists()


@dataclass
class Kill:
    trigger: str
    delay: float
    landed: bool  #: the process was still running when SIGKILL was sent
    partial: list[str]  #: final outputs that existed right after the kill


def kill_during(argv: list[str], run: Path, stage: str, outputs: list[Path], trigger: str, delay: float,
                timeout: float = 300) -> Kill:
    proc = subprocess.Popen([sys.executable, "-m", "cm3dmm", *argv], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and not _fired(trigger, run, stage, outputs):
            if time.monotonic() > deadline:
                raise AssertionError(f"{stage}: trigger {trigger} never fired")
            time.sleep(0.001)
        if delay:
            time.sleep(random.uniform(0, delay))
        landed = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return Kill(trigger, delay, landed, [str(p.relative_to(run)) for p in outputs if p.exists()])


def _copy_inputs(src_run: Path, dst_run: Path, parts: list[str]) -> None:
    for rel in parts:
        s, d = src_run / rel, dst_run / rel
        d.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(s, d) if s.is_dir() else shutil.copy(s, d)


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_and_rerun(stage, ref, tmp_path):
    from cm3dmm.cli import main

    root, ref_run, csv = ref
    cmd, inputs, outs = STAGES[stage]
    run = tmp_path / "results" / "run"
    cfg = corpus.write_config(tmp_path / "run.yaml", config_values(run, csv))
    argv = [cmd[0], "--config", str(cfg), *cmd[1:]]
    outputs = [run / o for o in outs]
    landed = 0
    log: list[str] = []
    for trigger, delay in KILLS[stage]:
        shutil.rmtree(run, ignore_errors=True)
        _copy_inputs(ref_run, run, inputs)
        k = kill_during(argv, run, stage, outputs, trigger, delay)
        landed += k.landed
        log.append(f"{trigger}+{delay}: {'killed mid-run' if k.landed else 'had finished'}, "
                   f"outputs present: {k.partial}")
        # whatever carries a final name is complete: equal to the reference already
        for rel in k.partial:
            if rel not in PROGRESS:
                same_output(ref_run, run, rel)
        assert main(argv) == 0, (stage, trigger)
        for o in outs:
            same_output(ref_run, run, o)
        assert not _temp_files(run), _temp_files(run)
    print("\n".join(f"[kill] {stage}: {line}" for line in log))  # shown with -rP
    assert landed >= len(KILLS[stage]) - 1, log


@pytest.mark.slow
def test_workflow_rerun_incomplete(ref, tmp_path):
    """Snakemake killed (the whole process group) while the template rule writes; rerun with
    --rerun-incomplete: registered.h5, the template and the caches equal the reference."""
    root, ref_run, csv = ref
    work = tmp_path / "wf"
    (work / "config").mkdir(parents=True)
    shutil.copy(corpus.REPO / "config" / "config.yaml", work / "config" / "config.yaml")
    run = work / "results" / "run"
    cfg = corpus.write_config(work / "run.yaml", config_values(run, csv))
    snake = [str(Path(sys.executable).with_name("snakemake")), "--snakefile", str(corpus.REPO / "Snakefile"),
             "--directory", str(work), "--configfile", str(cfg), "--cores", "1", "--nolock",
             *[str(run / o) for o in corpus.CACHE_OUT]]
    proc = subprocess.Popen(snake, cwd=work, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and not _temp_files(run / "template"):
            assert time.monotonic() < deadline, "the template rule never started writing"
            time.sleep(0.001)
        landed = proc.poll() is None
        if landed:
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert landed, f"the workflow ended (status {proc.returncode}) before it could be killed"
    assert (run / "data" / "registered.h5").exists()
    assert not (run / "cache" / "train.h5").exists()
    time.sleep(0.5)  # let the killed group's children go
    done = subprocess.run(snake + ["--rerun-incomplete"], cwd=work, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    for rel in ["data/registered.h5", "data/check.json", *corpus.TEMPLATE_OUT, *corpus.CACHE_OUT]:
        same_output(ref_run, run, rel)
    assert not _temp_files(run)


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    from cm3dmm.io.atomic import _HOST, atomic_write_text, remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "registered.h5"
    stale = tmp_path / f".tmp-registered-{_HOST}.{dead.pid}-abc123.h5"
    live = tmp_path / f".tmp-registered-{_HOST}.{os.getpid()}-def456.h5"
    other_host = tmp_path / f".tmp-registered-elsewhere.{dead.pid}-ghi789.h5"
    other_file = tmp_path / f".tmp-check-{_HOST}.{dead.pid}-jkl012.json"
    for p in (stale, live, other_host, other_file):
        p.write_bytes(b"partial")
    assert remove_stale_temporaries(out) == [stale]
    assert live.exists() and other_host.exists() and other_file.exists()
    atomic_write_text(tmp_path / "check.json", "{}")  # a write of check.json clears its own
    assert not other_file.exists() and (tmp_path / "check.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["check.json", live.name, other_host.name])

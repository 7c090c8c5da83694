"""The whole Snakemake workflow on config/test.yaml in a temporary results folder (the CI run):
every table exists with finite numbers, every figure is a non-empty PNG, the report builds."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cm3dmm.paths import FIGURES, TABLES

REPO = Path(__file__).resolve().parents[1]
#: the CI budget for config/test.yaml on a 2-core machine; enforced when the environment sets
#: CM3DMM_TIME_BUDGET (seconds, e.g. in CI), since a shared machine's wall time is noise
BUDGET_S = float(os.environ.get("CM3DMM_TIME_BUDGET", "0"))


def _snakemake(*args, cwd=REPO, timeout=900):
    exe = shutil.which("snakemake") or str(Path(sys.executable).with_name("snakemake"))
    env = dict(os.environ, PYVISTA_OFF_SCREEN="true", OMP_NUM_THREADS="1")
    return subprocess.run([exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_test_config_end_to_end(tmp_path):
    results = tmp_path / "results"
    t0 = time.perf_counter()
    run = _snakemake("--cores", "2", "--configfile", "config/test.yaml", "--config", f"results={results}",
                     "--quiet", "rules")
    wall = time.perf_counter() - t0
    assert run.returncode == 0, run.stderr[-4000:]
    root = results / "test"
    for name in TABLES:
        for fmt in ("csv", "md", "tex", "html"):
            assert (root / "tables" / f"{name}.{fmt}").stat().st_size > 0, (name, fmt)
    rec = pd.read_csv(root / "tables" / "reconstruction.csv")
    assert set(rec["Method"]) == {"cm3dmm", "pca", "bilinear"}
    assert set(rec["Split"]) == {"test", "train"}
    num = rec.select_dtypes("number")
    assert np.isfinite(num.to_numpy()).all()
    assert (rec["mean vertex error (mm)"] > 0).all()
    from cm3dmm.config import load_config
    from cm3dmm.paths import extra_model_dims

    cfg = load_config(REPO / "config" / "test.yaml")
    main_dim = cfg.model.id_dim + cfg.model.exp_dim
    assert extra_model_dims(cfg)  # the test config exercises rule train_size
    for split in ("test", "train"):
        got = rec[(rec["Method"] == "cm3dmm") & (rec["Split"] == split)]["Dim"]
        # on the test split the main model also has its row of the other code sharing (per face / per subject)
        main_rows = [main_dim, main_dim] if split == "test" else [main_dim]
        assert sorted(got) == sorted(main_rows + extra_model_dims(cfg)), (split, list(got))
    up = pd.read_csv(root / "tables" / "upsampling.csv")
    n_rows = len(cfg.evaluate.upsampling_fractions) * (len(cfg.baselines.methods) + 2)
    assert np.isfinite(up["error, all vertices (mm)"]).all() and len(up) == n_rows
    tm = pd.read_csv(root / "tables" / "timing.csv")
    assert np.isfinite(tm["Seconds"]).all() and (tm["Seconds"] >= 0).all()
    sweep = pd.read_csv(root / "tables" / "pca_sweep.csv")
    assert np.isfinite(sweep.to_numpy()).all()
    assert "numerical rank" in (root / "tables" / "protocol.md").read_text()
    for name in FIGURES:
        png = root / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, name
    # the report: one self-contained HTML file holding every table and figure
    report = tmp_path / "report.html"
    rep = _snakemake("--configfile", "config/test.yaml", "--config", f"results={results}", "--report", str(report))
    assert rep.returncode == 0, rep.stderr[-4000:]
    html = report.read_text(errors="replace")
    for name in FIGURES:
        assert f"{name}.png" in html, name
    for name in TABLES:
        assert f"{name}.html" in html, name
    print(f"config/test.yaml end to end: {wall:.1f} s")
    if BUDGET_S > 0:
        assert wall < BUDGET_S, f"the test config took {wall:.0f} s (budget {BUDGET_S:.0f} s)"

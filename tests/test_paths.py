"""cm3dmm.paths.RunPaths: the one place that names a run's files (checkpoints, tables, summaries)."""

from pathlib import Path

import pandas as pd
import pytest

from cm3dmm.paths import TABLE_FORMATS, RunPaths, table_file


def test_checkpoint_names_and_the_best_files_present(tmp_path):
    p = RunPaths.of(tmp_path)
    assert p.last_checkpoint("cm3dmm") == tmp_path / "models" / "cm3dmm" / "checkpoints" / "last.pt"
    assert p.best_checkpoint("cm3dmm", 500).name == "best-000000500.pt"
    assert p.best_checkpoints("cm3dmm") == {}  # no folder yet
    d = p.checkpoints("cm3dmm")
    d.mkdir(parents=True)
    for step in (1200, 0, 35):
        p.best_checkpoint("cm3dmm", step).write_bytes(b"")
    for other in ("last.pt", "best-x.pt", "best-12.pt.tmp-1", "notes.txt"):
        (d / other).write_bytes(b"")
    assert p.best_checkpoints("cm3dmm") == {0: d / "best-000000000.pt", 35: d / "best-000000035.pt",
                                            1200: d / "best-000001200.pt"}


def test_prune_best_keeps_the_current_and_earlier_files(tmp_path):
    pytest.importorskip("torch")
    from cm3dmm.train import _prune_best

    p = RunPaths.of(tmp_path)
    p.checkpoints("m").mkdir(parents=True)
    for step in (0, 10, 20, 30):
        p.best_checkpoint("m", step).write_bytes(b"")
    _prune_best(p, "m", keep=10, drop_after=20)  # a resumed run at step 20: only later files go
    assert sorted(p.best_checkpoints("m")) == [0, 10, 20]
    _prune_best(p, "m", keep=20)
    assert sorted(p.best_checkpoints("m")) == [20]


def test_table_files_and_baseline_summary(tmp_path):
    p = RunPaths.of(tmp_path)
    assert p.table("timing", "tex") == tmp_path / "tables" / "timing.tex"
    assert p.baseline_summary("pca") == p.model("pca").with_name("summary.json")
    with pytest.raises(ValueError, match="unknown table format 'xls'"):
        table_file(tmp_path, "timing", "xls")
    from cm3dmm.tables import write_table

    out = write_table(pd.DataFrame({"a": [1.5]}), p.tables_dir, "timing")
    assert out == {fmt: p.table("timing", fmt) for fmt in TABLE_FORMATS}
    assert all(Path(f).is_file() for f in out.values())

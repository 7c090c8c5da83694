import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PYVISTA_OFF_SCREEN", "true")

# tests/fuzz (property-based fuzzing of the readers, `make fuzz`) is not part of the default run;
# CM3DMM_FUZZ=1 adds it. (test_corpus.py runs a 50-example version of each reader's fuzz test.)
collect_ignore = [] if os.environ.get("CM3DMM_FUZZ") else ["fuzz"]

REPO = Path(__file__).resolve().parents[1]
SHARED_ICT = REPO.parent / "shared" / "data" / "ICT-FaceKit"


def make_registered(n_subjects=4, n_expr=3, grid=6, seed=0, test_subjects=1):
    """A tiny registered dataset: a bumpy grid 'face' of grid x grid vertices, ~150 mm wide."""
    from cm3dmm.registered import FACESCAPE_EXPRESSIONS, RegisteredData

    rng = np.random.default_rng(seed)
    u, v = np.meshgrid(np.linspace(0, 1, grid), np.linspace(0, 1, grid), indexing="xy")
    uv = np.stack([u.ravel(), v.ravel()], 1).astype(np.float32)
    base = np.stack([(uv[:, 0] - 0.5) * 150, (uv[:, 1] - 0.5) * 180,
                     40 * np.exp(-((uv[:, 0] - 0.5) ** 2 + (uv[:, 1] - 0.5) ** 2) * 8)], 1)
    faces = []
    for r in range(grid - 1):
        for c in range(grid - 1):
            a = r * grid + c
            faces += [[a, a + 1, a + grid + 1], [a, a + grid + 1, a + grid]]
    verts, subj, expr, split = [], [], [], []
    for s in range(n_subjects):
        ident = rng.normal(0, 3, base.shape)
        for e in range(n_expr):
            off = rng.normal(0, 1.5, base.shape) if e else 0.0
            verts.append(base + ident + off)
            subj.append(f"s{s:03d}")
            expr.append(FACESCAPE_EXPRESSIONS[e])
            split.append("test" if s >= n_subjects - test_subjects else "train")
    return RegisteredData(vertices=np.asarray(verts, np.float32), faces=np.asarray(faces, np.int32),
                          subject=subj, expression=expr, split=split, source="synthetic", uv=uv)


@pytest.fixture
def tiny_registered():
    return make_registered()


def tiny_config(root, **sections):
    """The config of a tiny run under ``root`` (runs in seconds on make_registered data); keyword
    arguments replace or extend sections, e.g. ``model={"id_dim": 16}`` merges into ``model``."""
    from cm3dmm.config import config_from_dict

    values = {
        "run": "t", "results": str(root),
        "template": {"levels": 1, "mask_resolution": 32},
        "evaluate": {"levels": [0, 1]},  # within template.levels (config validation)
        "cache": {"n_continuous": 60, "n_heldout": 20},
        "model": {"id_dim": 3, "exp_dim": 3,
                  "encoder": {"n_levels": 2, "n_features": 2, "finest_resolution": 8},
                  "decoder": {"widths": [16]}},
        "train": {"steps": 4, "batch_faces": 2, "vertex_points": 30, "continuous_points": 10,
                  "checkpoint_every": 4, "validate_every": 2, "threads": 1, "log_every": 1},
        "baselines": {"methods": ["pca", "bilinear"], "bilinear_id": 2, "bilinear_exp": 2},
    }
    for key, extra in sections.items():
        values[key] = {**values.get(key, {}), **extra} if isinstance(extra, dict) else extra
    return config_from_dict(values)


def build_tiny_models(cfg, data):
    """Write ``data`` as the run's registered.h5 and run the stages up to the trained models
    (template, cache, the continuous model, the PCA and bilinear baselines)."""
    from cm3dmm.baselines import run_train_baseline
    from cm3dmm.cache import run_cache
    from cm3dmm.paths import RunPaths
    from cm3dmm.registered import write_registered
    from cm3dmm.template import run_template
    from cm3dmm.train import run_train

    write_registered(RunPaths.of(cfg.run_dir).registered, data)
    run_template(cfg)
    run_cache(cfg)
    run_train(cfg)
    for m in ("pca", "bilinear"):
        run_train_baseline(cfg, m)

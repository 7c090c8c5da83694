"""The smooth interpolant's blend with barycentric (``model.smoothness``) on a run's coarse meshes.

    python benchmarks/bench_blend.py --run results/ict --config config/ict.yaml [--split train] [--subjects 6]

For each upsampling fraction of the run (its ``train_upsampling`` models' coarse templates), the *true*
kept vertices of ``--subjects`` evenly spread subjects of ``--split`` are interpolated to the unseen
vertices by barycentric interpolation on the coarse mesh and by the model's smooth interpolant at each
blend ``a``; mean error (mm) at the unseen vertices. No fitting: this isolates the interpolant.
Choose ``a`` on the training split; look at the test split afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cm3dmm.config import load_config  # noqa: E402
from cm3dmm.evaluate import FaceSet  # noqa: E402
from cm3dmm.geometry import even_indices  # noqa: E402
from cm3dmm.methods import load_method  # noqa: E402
from cm3dmm.model import ContinuousModel  # noqa: E402
from cm3dmm.paths import RunPaths  # noqa: E402
from cm3dmm.registered import read_registered  # noqa: E402
from cm3dmm.template import load_template  # noqa: E402
from cm3dmm.upsampling import fraction_method, make_coarse  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="the run folder (results/{run})")
    ap.add_argument("--config", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--subjects", type=int, default=6)
    ap.add_argument("--blends", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    a = ap.parse_args(argv)
    cfg = load_config(a.config)
    paths = RunPaths.of(a.run)
    data = read_registered(paths.registered, with_scans=False)
    tpl = load_template(paths.template)
    subs = data.subjects(a.split)
    subs = [subs[i] for i in even_indices(len(subs), a.subjects)]
    faces = FaceSet.of(data, subs)
    print(f"{a.run}: {len(subs)} {a.split} subjects, {faces.n} faces; error at the unseen vertices (mm)")
    for frac in cfg.evaluate.upsampling_fractions:
        if frac >= 1:
            continue
        coarse = make_coarse(tpl, frac)
        fm = load_method(paths.model(fraction_method(frac)))
        uv = torch.as_tensor(np.asarray(tpl.uv), dtype=fm.dtype)
        kept = torch.as_tensor(faces.vertices[:, coarse.kept], dtype=fm.dtype)
        unseen = coarse.unseen
        bary = coarse.interpolate(faces.vertices[:, coarse.kept])
        row = [f"fraction {frac}: barycentric {np.linalg.norm(bary - faces.vertices, axis=-1)[:, unseen].mean():.3f}"]
        for blend in a.blends:
            model = ContinuousModel(fm.model.template, dataclasses.replace(fm.model.cfg, smoothness=blend))
            pts = model.points(uv)
            smooth = torch.stack([pts.gather(k) for k in kept]).double().numpy()
            row.append(f"a={blend:g}: {np.linalg.norm(smooth - faces.vertices, axis=-1)[:, unseen].mean():.3f}")
        print("  ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

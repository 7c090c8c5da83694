"""The rigid initialisation of scan fits without landmarks: pose found and time (issue 14)

    python benchmarks/bench_rigid.py [--run results/default] [--config config/config.yaml]
                                     [--subjects 4] [--faces 3]

Reads the run's data, template and PCA model (its mean face is what ``fit_scans`` aligns to), turns
test faces into scans of every ``scan_fits`` variant (``cm3dmm.scanfit_eval.make_scan``: 20,000 points,
noise, a random 5-25 degree pose, metres) and aligns each with

* **current**: ``cm3dmm.rigid.align_to_reference`` (whole-face and half-centred candidates, batched
  screen, best 8 refined);
* **reference**: the previous initialisation, measured in the same run: the whole-face-centred
  candidates only, each with its own 15-iteration nearest-vertex ICP on 800 points, then the same
  refinement.

Reports per variant the mean and worst rotation error (degrees) against the true pose and the total
seconds of each, and their ratio. One torch-free process; about a minute per 10 scans.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cm3dmm import rigid  # noqa: E402
from cm3dmm import scanfit_eval as se  # noqa: E402
from cm3dmm.geometry import even_indices  # noqa: E402


def reference_align(pts: np.ndarray, mean: np.ndarray, faces: np.ndarray, trim: float, max_points: int,
                    refine_iters: int, seed: int = 0) -> rigid.ICPResult:
    """The initialisation before the half-centred candidates (commit 431db83), for comparison."""
    rng = np.random.default_rng(seed)
    sub = pts if len(pts) <= max_points else pts[rng.choice(len(pts), max_points, replace=False)]
    coarse = sub if len(sub) <= 800 else sub[rng.choice(len(sub), 800, replace=False)]
    results = [rigid.trimmed_icp(coarse, mean, faces, c, trim=max(trim, 0.2), max_iter=15, exact=False)
               for c in rigid.initial_alignments(sub, mean)]
    low = min(r.rmse for r in results)
    best = min([r for r in results if r.rmse <= low], key=lambda r: rigid.rotation_angle(r.transform.rotation))
    init = rigid.trimmed_icp(sub, mean, faces, best.transform, trim=trim, max_iter=30, exact=False).transform
    return rigid.trimmed_icp(sub, mean, faces, init, trim=trim, max_iter=refine_iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="results/default")
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--faces", type=int, default=3)
    args = ap.parse_args()
    from cm3dmm.config import load_config
    from cm3dmm.fit.scanfit import RIGID_POINTS, RIGID_REFINE_ITERS, RIGID_TRIM_MIN
    from cm3dmm.methods import load_method
    from cm3dmm.paths import RunPaths
    from cm3dmm.registered import read_registered
    from cm3dmm.template import load_template

    cfg = load_config(args.config)
    paths = RunPaths.of(args.run)
    data = read_registered(paths.registered, with_scans=False)
    fm = load_method(paths.model("pca"), template=load_template(paths.template), expect="pca")
    faces, mean = np.asarray(fm.faces), np.asarray(fm.mean, dtype=np.float64)
    trim = max(cfg.fit.trim, RIGID_TRIM_MIN)
    subjects = data.subjects("test")
    subjects = [subjects[i] for i in even_indices(len(subjects), args.subjects)]
    rows: dict[str, dict[str, list]] = {}
    for s in subjects:
        idx = [i for i, x in enumerate(data.subject) if x == s]
        for i in [idx[k] for k in even_indices(len(idx), args.faces)]:
            truth = data.vertices[i].astype(np.float64)
            for variant in se.VARIANTS:
                rng = np.random.default_rng(se._seed(cfg.scan_fits.seed, s, data.expression[i], variant))
                scan = se.make_scan(truth, faces, variant, fm.landmarks, cfg.scan_fits, rng)
                r = rows.setdefault(variant, {"cur": [], "ref": [], "t_cur": [], "t_ref": []})
                for name, fn in (("cur", rigid.align_to_reference), ("ref", reference_align)):
                    t0 = time.perf_counter()
                    res = fn(scan.points_mm, mean, faces, trim=trim, max_points=RIGID_POINTS,
                             refine_iters=RIGID_REFINE_ITERS)
                    r["t_" + name].append(time.perf_counter() - t0)
                    r[name].append(se.pose_errors(res.transform, scan.pose, truth.mean(0))[0])
    print(f"run {args.run}: {len(subjects)} test subjects x {args.faces} faces, {len(mean)} vertices, "
          f"{cfg.scan_fits.points} points per scan, cpu count {os.cpu_count()}")
    print("| scan | scans | rotation error, current: mean / worst (deg) | reference: mean / worst (deg) "
          "| s / scan current | reference | time ratio |")
    print("|:---|---:|---:|---:|---:|---:|---:|")
    for v, r in rows.items():
        tc, tr = np.mean(r["t_cur"]), np.mean(r["t_ref"])
        print(f"| {v} | {len(r['cur'])} | {np.mean(r['cur']):.1f} / {np.max(r['cur']):.1f} | "
              f"{np.mean(r['ref']):.1f} / {np.max(r['ref']):.1f} | {tc:.2f} | {tr:.2f} | {tc / tr:.2f} |")


if __name__ == "__main__":
    main()

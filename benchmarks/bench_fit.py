"""Fitting benchmark (issue 5, item 5): the release protocol against the project's fitter.

The SAME trained model and the SAME targets, in one run:

* ``release``: zero-initialised codes, Adam lr 3e-3, 1,000 iterations, mean vertex distance, a
  full forward pass (UV encoder + decoder) every step, one face at a time;
* ``lm per-face``: the project's fitter (``cfg.fit`` defaults: Levenberg-Marquardt in latent space
  on precomputed UV contexts, subset phase + polish, convergence criterion), one face at a time;
* ``lm per-subject``: the same, all of a subject's expressions at once with one shared identity;
* ``lbfgs per-face``.

Reported: time per face and the final mean vertex error (mm) against the registered targets.
Then the time to fit a 100k-point raw scan (a point cloud sampled from a test face, rotated,
translated, in metres).

The model: ``--model PATH`` (e.g. ``results/default/models/cm3dmm/model.pt``) with its run's
``registered.h5``; otherwise a small one is trained here on the anny source (``--subjects``
identities, ``--steps`` steps of the CPU preset) in a temporary run folder.

    python benchmarks/bench_fit.py                   # ~10 minutes on 2 busy cores
    python benchmarks/bench_fit.py --faces 2 --steps 300

Prints a Markdown table with ratios to the release protocol; paste into benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _train_small(tmp: str, args):
    from cm3dmm.cache import SampleCache, run_cache
    from cm3dmm.config import config_from_dict
    from cm3dmm.paths import RunPaths
    from cm3dmm.prepare import run_prepare
    from cm3dmm.template import load_template, run_template
    from cm3dmm.train import train

    base = {"run": "bench", "results": tmp,
            "data": {"source": "anny", "anny": {"n_subjects": args.subjects, "seed": 0}, "preview": False,
                     "split": {"test_fraction": 0.2, "seed": 0}},
            "template": {"levels": 1}, "cache": {"n_continuous": 2000, "n_heldout": 200}}
    cfg = config_from_dict({**base, "train": {"preset": "cpu", "steps": args.steps, "threads": args.threads,
                                              "validate_every": 10**9, "checkpoint_every": 10**9,
                                              "val_faces": 0}})
    t0 = time.perf_counter()
    run_prepare(cfg)
    run_template(cfg)
    run_cache(cfg)
    paths = RunPaths.of(cfg.run_dir)
    template = load_template(paths.template)
    cache = SampleCache(paths.cache("train"), template_hash=template.hash)
    train(cfg, template, cache, paths, method="cm3dmm")
    print(f"  trained a small model ({args.subjects} anny subjects, {args.steps} steps) in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return paths.model("cm3dmm"), paths.registered


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a trained cm3dmm model.pt (default: train a small one)")
    p.add_argument("--registered", help="registered.h5 of the model's run (default: beside --model's run)")
    p.add_argument("--subjects", type=int, default=10)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--faces", type=int, default=3, help="test faces (one subject's expressions)")
    p.add_argument("--release-iters", type=int, default=1000)
    p.add_argument("--scan-points", type=int, default=100_000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from cm3dmm.config import FitConfig
    from cm3dmm.fit import Scan, fit_registered, fit_scans, resolve_units
    from cm3dmm.methods import load_method
    from cm3dmm.registered import read_registered

    with tempfile.TemporaryDirectory(prefix="bench-fit-") as tmp:
        if args.model:
            model_path = Path(args.model)
            reg_path = Path(args.registered) if args.registered else model_path.parents[2] / "data" / "registered.h5"
        else:
            model_path, reg_path = _train_small(tmp, args)
        fm = load_method(model_path)
        data = read_registered(reg_path, with_scans=False)
        subj = data.subjects("test")[0]
        idx = [i for i, s in enumerate(data.subject) if s == subj][: args.faces]
        targets = data.vertices[idx].astype(np.float64)
        n = len(idx)
        print(f"  model: {fm.method}, codes {fm.id_dim}+{fm.exp_dim}, {fm.n_vertices} vertices; "
              f"{n} faces of test subject {subj}", file=sys.stderr)

        rows = []

        def run(name, cfg, per_face: bool):
            t0 = time.perf_counter()
            errs, iters, conv = [], [], []
            if per_face:
                for k in range(n):
                    r = fit_registered(fm, targets[k:k + 1], cfg, shared=False)
                    errs.append(float(r.errors[0]))
                    iters.append(r.info.iterations)
                    conv.append(r.info.converged)
            else:
                r = fit_registered(fm, targets, cfg, shared=True)
                errs = [float(e) for e in r.errors]
                iters.append(r.info.iterations)
                conv.append(r.info.converged)
            sec = (time.perf_counter() - t0) / n
            rows.append({"name": name, "s_per_face": sec, "err": float(np.mean(errs)),
                         "iters": float(np.mean(iters)), "converged": all(conv)})
            print(f"  {name}: {sec:.3f} s/face, {np.mean(errs):.4f} mm", file=sys.stderr)

        import cm3dmm.fit as fitmod

        fitmod.RELEASE_ITERS = args.release_iters
        run("release (Adam 3e-3, 1000 it, full forward)", FitConfig(optimizer="adam", mode="per-face"), True)
        run("lm per-face (default fit config)", FitConfig(mode="per-face"), True)
        run("lm per-subject (shared identity)", FitConfig(mode="per-subject"), False)
        run("lbfgs per-face", FitConfig(optimizer="lbfgs", mode="per-face"), True)

        # a 100k-point raw scan: a test face sampled densely, rotated, translated, in metres
        from cm3dmm.geometry import sample_surface

        rng = np.random.default_rng(0)
        x = targets[0]
        tri, bary = sample_surface(x, np.asarray(fm.faces), args.scan_points, rng)
        pts = np.einsum("pk,pkc->pc", bary, x[np.asarray(fm.faces)[tri]])
        a = np.radians(20)
        rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
        scan_m = (pts @ rot.T + [40.0, -20.0, 600.0] + rng.normal(0, 0.1, pts.shape)) / 1000.0
        t0 = time.perf_counter()
        factor, unit = resolve_units(scan_m, "auto")
        res = fit_scans(fm, [Scan(scan_m * factor, units=unit, name="scan")], FitConfig())
        scan_s = time.perf_counter() - t0
        scan_err = float(np.linalg.norm(res.vertices[0] - x, axis=1).mean())
        print(f"  100k-point scan: {scan_s:.1f} s, vertex error vs the registered face {scan_err:.3f} mm, "
              f"scan->fit {res.errors[0]:.3f} mm", file=sys.stderr)

    ref = rows[0]
    print(f"\nModel: {fm.method} ({fm.id_dim}+{fm.exp_dim} codes, {fm.n_vertices} vertices), {n} faces of one "
          f"test subject, torch threads {args.threads}.\n")
    print("| fitter | s / face | speed-up | mean vertex error (mm) | iterations | converged |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['name']} | {r['s_per_face']:.3f} | {ref['s_per_face'] / r['s_per_face']:.0f}x | "
              f"{r['err']:.4f} | {r['iters']:.0f} | {r['converged']} |")
    print(f"\n100k-point scan (metres, rotated 20 deg, translated, 0.1 mm noise): {scan_s:.1f} s in total; "
          f"vertex error against the registered face {scan_err:.3f} mm, mean scan->fit distance "
          f"{res.errors[0]:.3f} mm.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

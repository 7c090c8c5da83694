"""Fitting benchmark (issue 5, item 5): the release protocol against the project's fitter.

The SAME trained model and the SAME targets (``--subjects-test`` test subjects x ``--faces``
expressions each, registered meshes), in one run, timed in CPU seconds of this process
(``time.process_time``, ``--threads`` torch threads, 1 by default) so that the ratios survive a
shared machine:

* ``release``: zero-initialised codes, Adam lr 3e-3, 1,000 iterations, mean vertex distance, a
  full forward pass (UV encoder + decoder) every step, one face at a time;
* ``previous lm``: the project's solver and defaults before the speed-up (dense Levenberg-Marquardt
  systems, a new Jacobian after every rejected step, 1,000-point subset, 50 iterations, 2
  polish iterations on all points), one face at a time, on today's decoder kernels;
* ``lm per-face``: ``cfg.fit`` defaults (block-structured LM on a 150-point then a 600-point
  subset, 30 iterations in all), one face at a time; ``lm per-face, batched``: the same, all of a
  subject's faces in one call (independent codes);
* ``lm per-subject``: the defaults in ``per-subject`` mode (one identity shared by the subject's
  expressions, Schur complement), one call per subject;
* ``lbfgs per-face``.

Every fitter minimises the same objective (the fit's "distance" loss; the release its plain mean
distance). Reported: CPU seconds per face, the speed-up over the release, the final mean vertex
error (mm) against the registered targets, on how many faces the error is at most the release's,
and iterations. Then the time to fit a 100k-point raw scan (a point cloud sampled from a test
face, rotated, translated, in metres).

The model: ``--model PATH`` (e.g. ``results/default/models/cm3dmm/model.pt``) with its run's
``registered.h5`` (``--registered``; default: ``data/registered.h5`` of the model's run);
otherwise a small one is trained here on the anny source (``--subjects`` identities,
``--steps`` steps of the CPU preset) in a temporary run folder.

    python benchmarks/bench_fit.py --model results/default/models/cm3dmm/model.pt   # ~5-10 min
    python benchmarks/bench_fit.py --faces 2 --subjects-test 1 --steps 300 --scan-points 0

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


def scan_speed(fm, x: np.ndarray, sizes: list[int], noise: float = 0.3) -> None:
    """Time fit_scans (defaults) on clouds of ``sizes`` points sampled from the face ``x`` (V, 3), in
    metres, rotated 20 degrees, translated, ``noise`` mm Gaussian noise; wall and CPU seconds, the peak resident
    memory of this process, and the vertex error against ``x`` after a rigid alignment."""
    import resource

    from cm3dmm.config import FitConfig
    from cm3dmm.fit import Scan, fit_scans, resolve_units
    from cm3dmm.scanfit_eval import aligned_error

    faces = np.asarray(fm.faces)
    fit_scans(fm, [Scan(_cloud(x, faces, 2000, np.random.default_rng(1)))], FitConfig())  # warm-up
    print("\n| scan points | wall s | CPU s | rigid init s | peak RSS (GB) | vertex error, aligned (mm) | "
          "reference CPU s | fit / reference |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        rng = np.random.default_rng(0)
        a = np.radians(20)
        rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
        scan_m = (_cloud(x, faces, n, rng) @ rot.T + [40.0, -20.0, 600.0] + rng.normal(0, noise, (n, 3))) / 1000.0
        t0, c0 = time.perf_counter(), time.process_time()
        factor, unit = resolve_units(scan_m, "auto")
        res = fit_scans(fm, [Scan(scan_m * factor, units=unit, name="scan")], FitConfig())
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        err = aligned_error(res.vertices[0], x)
        ref = _reference_seconds()
        print(f"| {n:,} | {wall:.1f} | {cpu:.1f} | {res.timings['rigid_init_s']:.1f} | {peak:.2f} | {err:.3f} | "
              f"{ref:.2f} | {cpu / ref:.1f} |")


def _reference_seconds() -> float:
    """CPU seconds of a fixed workload like a scan fit's (KD-tree queries, small dense algebra), timed
    beside each fit: on a loaded machine the ratio fit / reference varies less than the seconds do."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(0)
    c0 = time.process_time()
    pts = rng.normal(size=(200_000, 3))
    tree = cKDTree(pts)
    tree.query(rng.normal(size=(200_000, 3)), k=4)
    a = rng.normal(size=(400, 400))
    for _ in range(20):
        np.linalg.solve(a @ a.T + np.eye(400), a)
    return time.process_time() - c0


def _cloud(x, faces, n, rng):
    from cm3dmm.geometry import sample_surface

    tri, bary = sample_surface(x, faces, n, rng)
    return np.einsum("pk,pkc->pc", bary.astype(np.float64), x[faces[tri]])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a trained cm3dmm model.pt (default: train a small one)")
    p.add_argument("--registered", help="registered.h5 of the model's run (default: beside --model's run)")
    p.add_argument("--subjects", type=int, default=10, help="anny subjects of the small model (no --model)")
    p.add_argument("--steps", type=int, default=600, help="training steps of the small model (no --model)")
    p.add_argument("--subjects-test", type=int, default=2, help="test subjects fitted")
    p.add_argument("--faces", type=int, default=4, help="expressions per test subject")
    p.add_argument("--release-iters", type=int, default=1000)
    p.add_argument("--scan-points", type=int, default=100_000, help="0: no scan fit")
    p.add_argument("--scan-sizes", default="", help="comma-separated scan sizes (points) for the scan-speed "
                   "table alone (e.g. 20000,2000000): skips the registered fitters")
    p.add_argument("--scan-noise", type=float, default=0.3, help="mm, Gaussian, of the --scan-sizes clouds")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    import cm3dmm.fit.solve as fitmod  # RELEASE_ITERS and the solvers are patched here
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
        subjects = data.subjects("test")[: args.subjects_test]
        groups = []
        for subj in subjects:
            idx = [i for i, s in enumerate(data.subject) if s == subj][: args.faces]
            groups.append(data.vertices[idx].astype(np.float64))
        n = sum(len(g) for g in groups)
        print(f"  model: {fm.method}, codes {fm.id_dim}+{fm.exp_dim}, {fm.n_vertices} vertices; "
              f"{n} faces of test subjects {', '.join(subjects)}", file=sys.stderr)

        if args.scan_sizes:
            scan_speed(fm, groups[0][0], [int(s) for s in args.scan_sizes.split(",")], args.scan_noise)
            return 0
        rows = []
        # warm-up (untimed): first calls of the encoder / kernels are slower than the rest
        fitmod.RELEASE_ITERS = 5
        fit_registered(fm, groups[0][:1], FitConfig(optimizer="adam", mode="per-face"))
        fit_registered(fm, groups[0][:1], FitConfig(mode="per-face", max_iter=3))

        def run(name, cfg, per_face: bool, shared: bool = False):
            t0 = time.process_time()
            errs, iters, conv = [], [], []
            for g in groups:
                if per_face:
                    for k in range(len(g)):
                        r = fit_registered(fm, g[k:k + 1], cfg, shared=False)
                        errs.append(float(r.errors[0]))
                        iters.append(r.info.iterations)
                        conv.append(r.info.converged)
                else:
                    r = fit_registered(fm, g, cfg, shared=shared)
                    errs += [float(e) for e in r.errors]
                    iters.append(r.info.iterations)
                    conv.append(r.info.converged)
            sec = (time.process_time() - t0) / n
            rows.append({"name": name, "s_per_face": sec, "errs": np.asarray(errs), "err": float(np.mean(errs)),
                         "iters": float(np.mean(iters)), "converged": float(np.mean(conv))})
            print(f"  {name}: {sec:.3f} s/face, {np.mean(errs):.4f} mm", file=sys.stderr)

        fitmod.RELEASE_ITERS = args.release_iters
        run(f"release (Adam 3e-3, {args.release_iters} it, full forward)", FitConfig(optimizer="adam", mode="per-face"),
            True)

        # the solver and defaults before the speed-up: dense LM systems (solve_lm), a new
        # Jacobian after every rejected step, 1,000 points, 50 iterations + 2 polish at damping 1e-6
        structured = fitmod.solve_lm_structured

        def dense(prob, codes, max_iter, tol, damping=1e-3, info=None):
            d = 1e-6 if damping is None or isinstance(damping, torch.Tensor) else float(damping)  # polish: 1e-6
            return fitmod.solve_lm(prob, codes, max_iter, tol, damping=d)

        fitmod.solve_lm_structured = dense
        try:
            run("previous lm per-face (dense LM, 1000 pts, 50 it + 2 polish)",
                FitConfig(mode="per-face", max_iter=50, points=1000, coarse_points=0, polish_iters=2, damping=1e-3),
                True)
        finally:
            fitmod.solve_lm_structured = structured
        run("lm per-face (defaults), one face per call", FitConfig(mode="per-face"), True)
        run("lm per-face (defaults), one call per subject", FitConfig(mode="per-face"), False, shared=False)
        run("lm per-subject (defaults, shared identity)", FitConfig(mode="per-subject"), False, shared=True)
        run("lbfgs per-face", FitConfig(optimizer="lbfgs", mode="per-face"), True)

        scan_s = scan_err = scan_fit = None
        if args.scan_points > 0:
            # a 100k-point raw scan: a test face sampled densely, rotated, translated, in metres
            from cm3dmm.geometry import sample_surface

            rng = np.random.default_rng(0)
            x = groups[0][0]
            tri, bary = sample_surface(x, np.asarray(fm.faces), args.scan_points, rng)
            pts = np.einsum("pk,pkc->pc", bary, x[np.asarray(fm.faces)[tri]])
            a = np.radians(20)
            rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
            scan_m = (pts @ rot.T + [40.0, -20.0, 600.0] + rng.normal(0, 0.1, pts.shape)) / 1000.0
            t0 = time.process_time()
            factor, unit = resolve_units(scan_m, "auto")
            res = fit_scans(fm, [Scan(scan_m * factor, units=unit, name="scan")], FitConfig())
            scan_s = time.process_time() - t0
            scan_rigid = res.timings.get("rigid_init_s", float("nan"))
            scan_err = float(np.linalg.norm(res.vertices[0] - x, axis=1).mean())
            scan_fit = float(res.errors[0])
            print(f"  {args.scan_points}-point scan: {scan_s:.1f} CPU s, vertex error vs the registered face "
                  f"{scan_err:.3f} mm, scan->fit {scan_fit:.3f} mm", file=sys.stderr)

    ref = rows[0]
    print(f"\nModel: {fm.method} ({fm.id_dim}+{fm.exp_dim} codes, {fm.n_vertices} vertices), {n} faces "
          f"({args.faces} expressions of test subjects {', '.join(subjects)}), torch threads {args.threads}, "
          f"CPU seconds.\n")
    print("| fitter | CPU s / face | speed-up | mean vertex error (mm) | faces <= release error | iterations "
          "| converged |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        le = int((r["errs"] <= ref["errs"] + 1e-9).sum())
        print(f"| {r['name']} | {r['s_per_face']:.3f} | {ref['s_per_face'] / r['s_per_face']:.0f}x | "
              f"{r['err']:.4f} | {le}/{n} | {r['iters']:.0f} | {r['converged']:.0%} |")
    if scan_s is not None:
        print(f"\n{args.scan_points}-point scan (metres, rotated 20 deg, translated, 0.1 mm noise): {scan_s:.1f} "
              f"CPU s in total ({scan_rigid:.1f} s wall of it rigid initialisation); vertex error against the registered "
              f"face {scan_err:.3f} mm, mean scan->fit distance {scan_fit:.3f} mm.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

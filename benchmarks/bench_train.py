"""Training benchmark of the continuous model (issue 4, item 6).

Part 1 — training-step throughput (points per CPU-second, 1 thread by default: robust on a shared
machine; forward + backward + Adam step of network and code tables) and peak memory for each UV encoder (dense, hash, seed-compatible) at the ``paper``
preset and at the CPU default; ``seed-compatible`` at ``paper`` (the release) is the reference,
measured in the same run. Each configuration runs in its own subprocess so that its peak resident
memory (``ru_maxrss`` minus the resident size before the first step) is its own. The paper preset's
batch is 20 faces x 15,000 points; to keep the run short it is measured with ``--paper-faces``
faces x 15,000 points (points/s does not depend on the number of faces at this size).

Part 2 — the issue's goal: the CPU default and seed-compatible@paper train on the SAME small data
(the anny source, ``--subjects`` identities, built with the real prepare / template / cache stages
in a temporary run folder) for the SAME time budget (``--budget`` CPU-seconds each, i.e. the
wall-clock seconds of an otherwise idle machine, through ``cm3dmm.train.train(...,
time_budget_s=..., budget_clock=time.process_time)``); both report the validation error at the
held-out UV points of all training faces (mm).

    python benchmarks/bench_train.py                 # ~5 minutes on 2 cores
    python benchmarks/bench_train.py --quick         # part 1 only, fewer steps

Prints a Markdown table with ratios to the reference; paste into benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- part 1 (child)
def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _one(preset: str, backend: str, faces: int, points: int, steps: int, threads: int) -> dict:
    """Run ``steps`` timed training steps of one configuration (in this process)."""
    import types

    import numpy as np
    import torch

    from cm3dmm.config import config_from_dict
    from cm3dmm.losses import training_loss
    from cm3dmm.model import ContinuousModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = config_from_dict({"train": {"preset": preset}, "model": {"encoder": {"backend": backend}}})
    # the throughput does not depend on the template: a stand-in with the needed arrays
    tpl = types.SimpleNamespace(mean=np.zeros((3, 3), np.float32), faces=np.array([[0, 1, 2]]),
                                uv=np.array([[0, 0], [1, 0], [0, 1]], np.float32), levels=[], hash="bench")
    model = ContinuousModel(tpl, cfg.model)
    n_codes = 720
    z_id = torch.nn.Embedding(n_codes, model.id_dim)
    z_exp = torch.nn.Embedding(n_codes, model.exp_dim)
    opt = torch.optim.Adam([{"params": model.parameters()},
                            {"params": list(z_id.parameters()) + list(z_exp.parameters())}], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    uv = torch.rand(faces, points, 2, generator=g)
    target = torch.randn(faces, points, 3, generator=g)
    avg = torch.zeros(faces, points, 3)
    rows = torch.randint(0, n_codes, (faces,), generator=g)
    labels = torch.arange(faces)
    tc = cfg.train

    def step():
        zi, ze = z_id(rows), z_exp(rows)
        pred = model.decode(uv, zi, ze, avg=avg)
        terms = training_loss(pred, target, zi, ze, labels, labels, z_id.weight, z_exp.weight,
                              tc.reg_weight, tc.prior_weight, tc.code_std)
        opt.zero_grad(set_to_none=True)
        terms["total"].backward()
        opt.step()

    base = _rss_kb()
    step()  # warm-up (allocations, Adam state)
    times = []
    for _ in range(steps):
        t0 = time.process_time()  # CPU seconds: robust on a shared machine
        step()
        times.append(time.process_time() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dt = float(np.median(times))
    n_params = sum(p.numel() for p in model.parameters())
    return {"preset": preset, "backend": backend, "faces": faces, "points": points, "s_per_step": dt,
            "points_per_s": faces * points / dt, "peak_mb": max(peak - base, 0) / 1024,
            "rss_mb": peak / 1024, "params_m": n_params / 1e6,
            "levels": list(model.encoder.level_resolutions)}


def _run_child(preset, backend, faces, points, steps, threads) -> dict:
    cmd = [sys.executable, __file__, "--one", preset, backend, str(faces), str(points), str(steps),
           str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def throughput(args) -> list[dict]:
    paper_pts = 15000
    cpu_pts = None
    from cm3dmm.presets import CPU

    cpu_faces = CPU["train"]["batch_faces"]
    cpu_pts = CPU["train"]["vertex_points"] + CPU["train"]["continuous_points"]
    configs = [("paper", "seed-compatible", args.paper_faces, paper_pts),
               ("paper", "hash", args.paper_faces, paper_pts),
               ("paper", "dense", args.paper_faces, paper_pts),
               ("cpu", "seed-compatible", cpu_faces, cpu_pts),
               ("cpu", "hash", cpu_faces, cpu_pts),
               ("cpu", "dense", cpu_faces, cpu_pts)]
    res = []
    for preset, backend, faces, points in configs:
        steps = args.paper_steps if preset == "paper" else args.cpu_steps
        r = _run_child(preset, backend, faces, points, steps, args.threads)
        print(f"  {preset:5s} {backend:16s} {r['points_per_s']:9.0f} points/s  peak +{r['peak_mb']:.0f} MB",
              file=sys.stderr)
        res.append(r)
    return res


# ----------------------------------------------------------------------------- part 2
def equal_budget(args) -> list[dict]:
    """Train CPU default and seed-compatible@paper for the same wall-clock budget on the same data."""
    import torch

    from cm3dmm.cache import SampleCache, run_cache
    from cm3dmm.config import config_from_dict
    from cm3dmm.paths import RunPaths
    from cm3dmm.prepare import run_prepare
    from cm3dmm.template import load_template, run_template
    from cm3dmm.train import train

    torch.set_num_threads(args.threads)
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        base = {"run": "bench", "results": tmp,
                "data": {"source": "anny", "anny": {"n_subjects": args.subjects, "seed": 0}, "preview": False,
                         "split": {"test_fraction": 0.2, "seed": 0}},
                "template": {"levels": 1}, "cache": {"n_continuous": 4000, "n_heldout": 1000}}
        cfg0 = config_from_dict(base)
        t0 = time.perf_counter()
        run_prepare(cfg0)
        run_template(cfg0)
        run_cache(cfg0)
        print(f"  data: {args.subjects} anny subjects prepared in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        paths = RunPaths.of(cfg0.run_dir)
        template = load_template(paths.template)
        for name, preset, backend in (("seed-compatible@paper", "paper", "seed-compatible"),
                                      ("cpu default", "cpu", "dense")):
            values = {**base, "train": {"preset": preset, "steps": 1_000_000, "threads": args.threads,
                                        "validate_every": 1_000_000, "checkpoint_every": 1_000_000,
                                        "log_every": 10, "val_faces": 0},
                      "model": {"encoder": {"backend": backend}}}
            cfg = config_from_dict(values)
            cache = SampleCache(paths.cache("train"), template_hash=template.hash)
            r = train(cfg, template, cache, paths, method=f"bench-{preset}-{backend}",
                      time_budget_s=args.budget, budget_clock=time.process_time)
            points = (min(cfg.train.vertex_points, cache.n_vertices)
                      + min(cfg.train.continuous_points, cache.n_continuous))  # capped at the cache
            close = getattr(cache, "close", None)
            if close:
                close()
            print(f"  {name}: {r.steps} steps in {r.wall_s:.0f} s, held-out error {r.final_val_mm:.3f} mm",
                  file=sys.stderr)
            out.append({"name": name, "steps": r.steps, "wall_s": r.wall_s, "val_mm": r.final_val_mm,
                        "faces": cfg.train.batch_faces,
                        "points": points})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", nargs=6, metavar=("PRESET", "BACKEND", "FACES", "POINTS", "STEPS", "THREADS"),
                   help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--paper-faces", type=int, default=1)
    p.add_argument("--paper-steps", type=int, default=2)
    p.add_argument("--cpu-steps", type=int, default=8)
    p.add_argument("--subjects", type=int, default=8, help="anny identities for the equal-budget run")
    p.add_argument("--budget", type=float, default=60.0, help="seconds of training per model (part 2)")
    p.add_argument("--quick", action="store_true", help="part 1 only")
    args = p.parse_args(argv)
    if args.one:
        preset, backend, faces, points, steps, threads = args.one
        print(json.dumps(_one(preset, backend, int(faces), int(points), int(steps), int(threads))))
        return 0

    print(f"training-step throughput ({args.threads} threads)", file=sys.stderr)
    res = throughput(args)
    ref = res[0]
    print(f"\n### Training step: points/s and peak memory ({args.threads} threads; reference "
          f"seed-compatible@paper, measured in the same run)\n")
    print("| preset | encoder | batch (faces x points) | points/s | x reference | s/step | peak MB | "
          "params (M) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in res:
        print(f"| {r['preset']} | {r['backend']} | {r['faces']} x {r['points']} | {r['points_per_s']:.0f} | "
              f"{r['points_per_s'] / ref['points_per_s']:.2f} | {r['s_per_step']:.3f} | {r['peak_mb']:.0f} | "
              f"{r['params_m']:.2f} |")
    if args.quick:
        return 0
    print(f"\nequal time budget ({args.budget:.0f} CPU-s each)", file=sys.stderr)
    eq = equal_budget(args)
    print(f"\n### Same data, same time budget ({args.budget:.0f} CPU-s of training each, "
          f"{args.subjects} anny subjects)\n")
    print("| model | batch (faces x points) | steps done | held-out UV error (mm) |")
    print("|---|---|---|---|")
    for r in eq:
        print(f"| {r['name']} | {r['faces']} x {r['points']} | {r['steps']} | {r['val_mm']:.3f} |")
    cpu = next(r for r in res if r["preset"] == "cpu" and r["backend"] == "dense")
    print(f"\nCPU default / seed-compatible@paper: {cpu['points_per_s'] / ref['points_per_s']:.1f}x points/s; "
          f"held-out error {eq[1]['val_mm']:.3f} mm vs {eq[0]['val_mm']:.3f} mm.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

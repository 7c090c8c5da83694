"""UV encoder and training-step throughput on the CPU: dense / hash / seed-compatible.

Measures, in one run, with ``seed-compatible`` at the ``paper`` preset as the reference:

* encoder only: forward + backward (points/s) of each backend at the paper encoder
  (16 levels x 32 features, base 4, finest 128, 2^15) and at the ``cpu`` preset's encoder;
* training step: encoder + decoder + latent code table, forward + backward + Adam step
  (points/s) and the step's peak memory (growth of the resident set, VmHWM after resetting it
  via /proc/self/clear_refs), at the paper preset (codes 128 + 128, widths [512, 256, 256, 128, 32],
  batch 20 faces x ``--fraction`` of 15,000 points, 5,600 codes as 280 x 20 training faces) and at
  the cpu preset (its own batch, codes and decoder).

Throughput is points per second of this process's CPU time (``time.process_time``, all its
threads), so that other processes sharing the machine do not distort it; with ``--threads 1``
that equals wall-clock time on an idle core. Peak memory is measured in a child process started
with ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc then returns freed tensors to the system, so the
resident-set peak of each case is its own); its page faults do not touch the timings.

Every case runs ``--rounds`` times, interleaved with the others so that load from other
processes affects all alike; the best round counts. Ratios are against the reference.

    python benchmarks/bench_encoders.py            # default run (~1-2 min on 1 thread)
    python benchmarks/bench_encoders.py --quick    # smoke run (seconds)
    python benchmarks/bench_encoders.py --sweep    # also candidate CPU defaults (training only)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

from cm3dmm.config import Config, config_from_dict
from cm3dmm.nn import Decoder, make_encoder

PAPER_POINTS = 15000  #: vertex + continuous points per face and step in the release
PAPER_CODES = 280 * 20  #: training faces of the release (one code pair per face)
EXPRESSIONS = 20


def _status(key: str) -> int:
    """A /proc/self/status entry in bytes (0 where unavailable)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> int:
    """Reset VmHWM to the current RSS; returns the RSS (bytes)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    return _status("VmRSS")


@dataclass
class Case:
    name: str
    n_points: int
    step: object = None  #: callable running one measured unit
    times: list[float] = field(default_factory=list)
    peak_mb: float = float("nan")

    @property
    def rate(self) -> float:
        return self.n_points / min(self.times)


def preset(name: str, backend: str | None = None, **model) -> Config:
    cfg = config_from_dict({"train": {"preset": name}})
    if backend:
        cfg.model.encoder.backend = backend
    for k, v in model.items():
        obj, key = (cfg.model.encoder, k[4:]) if k.startswith("enc_") else (
            (cfg.model.decoder, k[4:]) if k.startswith("dec_") else (cfg.model, k))
        setattr(obj, key, v)
    return cfg


def encoder_case(name: str, cfg: Config, n_points: int) -> Case:
    torch.manual_seed(0)
    enc = make_encoder(cfg.model.encoder)
    uv = torch.rand(n_points, 2)

    def step():
        for p in enc.parameters():
            p.grad = None
        enc(uv).square().sum().backward()

    step()
    return Case(name, n_points, step)


def train_case(name: str, cfg: Config, faces: int, points: int, n_codes: int, per_point_codes: bool = False) -> Case:
    """One auto-decoder training step as the trainer does it (codes gathered per face)."""
    rss = _reset_peak()
    torch.manual_seed(0)
    enc = make_encoder(cfg.model.encoder)
    code_dim = cfg.model.id_dim + cfg.model.exp_dim
    dec = Decoder(cfg.model.decoder, code_dim, enc.out_dim)
    codes = torch.nn.Embedding(n_codes, code_dim)
    torch.nn.init.normal_(codes.weight, 0.0, 0.01)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters(), *codes.parameters()], lr=1e-3)
    uv = torch.rand(faces, points, 2)
    target = torch.randn(faces, points, 3)
    index = torch.randperm(n_codes)[:faces]

    def step():
        opt.zero_grad(set_to_none=True)
        z = codes(index)[:, None, :]
        if per_point_codes:  # the release's layout: one code copy per point
            z = z.expand(faces, points, code_dim)
        loss = (dec(z, enc(uv)) - target).norm(dim=-1).mean()
        loss.backward()
        opt.step()

    step()  # warm-up, allocates Adam's state
    case = Case(name, faces * points, step)
    t = time.process_time()
    step()
    case.times.append(time.process_time() - t)
    case.peak_mb = (_status("VmHWM") - rss) / 2**20
    return case


def run_rounds(cases: list[Case], rounds: int, reps: int) -> None:
    for _ in range(rounds):
        for c in cases:
            t = time.process_time()
            for _ in range(reps):
                c.step()
            c.times.append((time.process_time() - t) / reps)


def report(title: str, cases: list[Case], ref: Case, memory: bool) -> list[str]:
    head = f"| case | points/s | x {ref.name} |" + (" peak MiB |" if memory else "")
    lines = [f"### {title}", "", head, "|---|---:|---:|" + ("---:|" if memory else "")]
    for c in cases:
        row = f"| {c.name} | {c.rate:,.0f} | {c.rate / ref.rate:.2f} |"
        if memory:
            row += f" {c.peak_mb:,.0f} |"
        lines.append(row)
    return lines + [""]


def training_specs(args) -> tuple[list[tuple], dict]:
    """(name, cfg, faces, points, n_codes, per_point_codes) of every training case, and a summary."""
    frac = 0.005 if args.quick else args.fraction
    cpu, paper = preset("cpu"), preset("paper")
    p_faces, p_points = paper.train.batch_faces, max(1, round(PAPER_POINTS * frac))
    c_faces = cpu.train.batch_faces
    c_points = cpu.train.vertex_points + cpu.train.continuous_points
    if args.quick:
        c_points = max(1, c_points // 20)
    c_codes = cpu.data.anny.n_subjects * EXPRESSIONS
    specs = [(f"{b}@paper", preset("paper", b), p_faces, p_points, PAPER_CODES, False) for b in BACKENDS]
    specs.append(("seed-compatible@paper, per-point codes", preset("paper", "seed-compatible"),
                  p_faces, p_points, PAPER_CODES, True))
    specs += [(f"{b}@cpu", preset("cpu", b), c_faces, c_points, c_codes, False) for b in BACKENDS]
    if args.sweep:
        specs += [(f"sweep {name}", preset("cpu", "dense", **kw), c_faces, c_points, c_codes, False)
                  for name, kw in SWEEP.items()]
    return specs, dict(paper=paper, cpu=cpu, p=(p_faces, p_points), c=(c_faces, c_points))


def measure_memory(argv: list[str]) -> dict[str, float]:
    """Peak MiB per training case, from a child process with a fixed mmap threshold."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, __file__, *argv, "--memory-child"], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny batches, one round")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: shared machines)")
    ap.add_argument("--fraction", type=float, default=0.05,
                    help="fraction of the release's 15,000 points per face in the paper training step")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sweep", action="store_true", help="also time candidate CPU defaults")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    specs, info = training_specs(args)
    if args.memory_child:
        print(json.dumps({spec[0]: train_case(*spec).peak_mb for spec in specs}))
        return
    rounds = 1 if args.quick else args.rounds
    enc_points = 2000 if args.quick else 20000

    # ---------------------------------------------------------------- encoder only
    enc_cases = [encoder_case(f"{b}@{p}", preset(p, b), enc_points) for p in ("paper", "cpu") for b in BACKENDS]
    run_rounds(enc_cases, rounds, reps=2)

    # ---------------------------------------------------------------- training step
    train_cases = [train_case(*spec) for spec in specs]
    for c in train_cases:
        c.times.clear()  # time the interleaved rounds only
    run_rounds(train_cases, rounds, reps=1)
    memory = measure_memory(argv)
    for c in train_cases:
        c.peak_mb = memory.get(c.name, float("nan"))

    paper, cpu = info["paper"], info["cpu"]
    enc_desc = lambda c: (f"{c.model.encoder.n_levels} levels x {c.model.encoder.n_features} features, "  # noqa: E731
                          f"{c.model.encoder.base_resolution}..{c.model.encoder.finest_resolution}, "
                          f"2^{c.model.encoder.log2_table_size}")
    lines = [
        f"torch {torch.__version__}, {args.threads} thread(s), points per CPU-second, best of {rounds} "
        "interleaved round(s)",
        f"paper: {enc_desc(paper)}, widths {paper.model.decoder.widths}, codes "
        f"{paper.model.id_dim}+{paper.model.exp_dim}, step {info['p'][0]} faces x {info['p'][1]} points",
        f"cpu:   {enc_desc(cpu)}, widths {cpu.model.decoder.widths}, codes "
        f"{cpu.model.id_dim}+{cpu.model.exp_dim}, step {info['c'][0]} faces x {info['c'][1]} points",
        "",
    ]
    lines += report(f"Encoder only, forward + backward, {enc_points} points", enc_cases, enc_cases[0], False)
    lines += report("Training step (encoder + decoder + codes, forward + backward + Adam)", train_cases,
                    train_cases[0], True)
    print("\n".join(lines))


BACKENDS = ("seed-compatible", "hash", "dense")
#: candidate CPU defaults for --sweep (overrides of the cpu preset's model)
SWEEP = {
    "8x4 [128,128,64]": dict(enc_n_levels=8, enc_n_features=4, dec_widths=[128, 128, 64]),
    "8x4 [256,128,64]": dict(enc_n_levels=8, enc_n_features=4, dec_widths=[256, 128, 64]),
    "8x8 [256,128,64]": dict(enc_n_levels=8, enc_n_features=8, dec_widths=[256, 128, 64]),
    "8x4 ..256 [256,128,64]": dict(enc_n_levels=8, enc_n_features=4, enc_finest_resolution=256,
                                   enc_log2_table_size=17, dec_widths=[256, 128, 64]),
    "16x2 [256,128,64]": dict(enc_n_levels=16, enc_n_features=2, dec_widths=[256, 128, 64]),
    "8x4 [256,256,128,64]": dict(enc_n_levels=8, enc_n_features=4, dec_widths=[256, 256, 128, 64]),
}


if __name__ == "__main__":
    main()

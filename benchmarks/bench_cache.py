"""Sample-cache read throughput at the release batch size, and cache build cost.

    python benchmarks/bench_cache.py            # 200 faces x ~10k vertices, 20 x (10,000 + 5,000)
    python benchmarks/bench_cache.py --quick    # smaller, for a smoke run

Builds a cache of synthetic registered faces (a smooth bumpy 100 x 100 grid "face" with
per-sample deformations) with the default CacheConfig, then measures, in one run:

* ``naive``: per face, draw random point indices and read them from the file one face at a
  time with HDF5 point selections (what a loader without stored shuffled orders does);
* ``SampleCache.read``: B faces x (n_vertex + n_continuous) as contiguous slices of the stored
  shuffled orders (what training reads, :meth:`cm3dmm.train.TrainData.read`).

Prints batches per second and the ratio to the naive reference. Reads are from the page
cache (the file was just written); a cold disk read is bounded by the disk instead.
Also reports the build time and file size of a cache of 800 faces x 3k vertices.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from cm3dmm.cache import SampleCache, build_cache
from cm3dmm.config import CacheConfig
from cm3dmm.registered import RegisteredData


def synthetic(n_samples: int, grid: int, seed: int = 0):
    """Registered data of ``n_samples`` smooth faces on a grid x grid mesh, and a template."""
    rng = np.random.default_rng(seed)
    u, v = np.meshgrid(np.linspace(0, 1, grid), np.linspace(0, 1, grid), indexing="xy")
    uv = np.stack([u.ravel(), v.ravel()], 1).astype(np.float32)
    base = np.stack([(uv[:, 0] - 0.5) * 150, (uv[:, 1] - 0.5) * 180,
                     40 * np.exp(-((uv[:, 0] - 0.5) ** 2 + (uv[:, 1] - 0.5) ** 2) * 8)], 1)
    r = np.arange(grid - 1)
    a = (r[:, None] * grid + r[None, :]).ravel()
    faces = np.concatenate([np.stack([a, a + 1, a + grid + 1], 1), np.stack([a, a + grid + 1, a + grid], 1)])
    # smooth per-sample deformations: a few low-frequency modes
    modes = np.stack([np.sin(np.pi * (k + 1) * uv[:, 0]) * np.cos(np.pi * (j + 1) * uv[:, 1])
                      for k in range(3) for j in range(3)], 1)  # (V, 9)
    coef = rng.normal(0, 3, (n_samples, 9, 3))
    verts = (base[None] + np.einsum("vm,smc->svc", modes, coef)).astype(np.float32)
    n_test = max(1, n_samples // 10)
    data = RegisteredData(vertices=verts, faces=faces.astype(np.int32),
                          subject=[f"s{i:04d}" for i in range(n_samples)], expression=["neutral"] * n_samples,
                          split=["train"] * (n_samples - n_test) + ["test"] * n_test, source="bench", uv=uv)
    tr = data.indices("train")
    template = SimpleNamespace(mean=verts[tr].mean(0), faces=data.faces, uv=uv, hash="bench",
                               source_hash=data.content_hash())
    return data, template


def rate(fn, min_time: float = 2.0, min_reps: int = 3) -> float:
    """Calls of ``fn`` per second (each call = one batch)."""
    fn()  # warm up
    n, t0 = 0, time.perf_counter()
    while n < min_reps or time.perf_counter() - t0 < min_time:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def naive_reader(path: Path, n_vertex: int, n_continuous: int, rng: np.random.Generator):
    """Per face, random point indices read with HDF5 point selections (sorted, as h5py needs)."""
    import h5py

    h = h5py.File(path, "r")
    uv_t, avg_t = h["template_uv"][()], h["template_avg"][()]
    vt, cp = h["vertex/target"], h["continuous/points"]
    S, V, N = vt.shape[0], vt.shape[1], cp.shape[1]

    def read(faces):
        uv, tgt, avg = [], [], []
        for s in faces:
            vi = np.sort(rng.choice(V, n_vertex, replace=False))
            ci = np.sort(rng.choice(N, n_continuous, replace=False))
            t_v = vt[s, vi]
            c = cp[s, ci]
            uv.append(np.concatenate([uv_t[vi], c[:, :2]]))
            tgt.append(np.concatenate([t_v, c[:, 2:5]]))
            avg.append(np.concatenate([avg_t[vi], c[:, 5:8]]))
        return np.stack(uv), np.stack(tgt), np.stack(avg)

    return read, S, h


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    S, grid, B, NV, NC = (40, 50, 8, 2000, 1000) if args.quick else (200, 100, 20, 10_000, 5_000)
    cfg = CacheConfig()  # defaults: n_continuous 8000, n_heldout 2000
    with tempfile.TemporaryDirectory() as tmp:
        data, template = synthetic(S, grid)
        path = Path(tmp) / "train.h5"
        t0 = time.perf_counter()
        summary = build_cache(data, template, "train", cfg, path)
        t_build = time.perf_counter() - t0
        size = path.stat().st_size
        print(f"cache: {summary.n_samples} train faces x {summary.n_vertices} vertices, "
              f"n_continuous {cfg.n_continuous}, n_heldout {cfg.n_heldout}: built in {t_build:.1f} s, "
              f"{size / 2**20:.0f} MiB")
        print(f"batch: {B} faces x ({NV} vertex + {NC} continuous) points")

        rng = np.random.default_rng(0)
        naive, n_faces, h = naive_reader(path, NV, NC, rng)
        r_naive = rate(lambda: naive(rng.choice(n_faces, B, replace=False)), min_time=3.0)
        h.close()

        cache = SampleCache(path, template_hash="bench")
        state = {"e": 0}

        def fast_read():
            state["e"] += 1
            cache.read(rng.choice(n_faces, B, replace=False), NV, NC, offset=state["e"])

        r_read = rate(fast_read)
        cache.close()

        pts = B * (NV + NC)
        print(f"{'reader':<36}{'batches/s':>10}{'Mpoints/s':>11}{'vs naive':>10}")
        for name, r in (("naive per-face point selection", r_naive), ("SampleCache.read", r_read)):
            print(f"{name:<36}{r:>10.1f}{r * pts / 1e6:>11.2f}{r / r_naive:>9.1f}x")

    if not args.quick:  # build cost of a mid-size cache
        with tempfile.TemporaryDirectory() as tmp:
            data, template = synthetic(800, 55)  # 3,025 vertices
            path = Path(tmp) / "train.h5"
            t0 = time.perf_counter()
            s = build_cache(data, template, "train", cfg, path)
            dt = time.perf_counter() - t0
            print(f"build: {s.n_samples} faces x {s.n_vertices} vertices, n_continuous {cfg.n_continuous}, "
                  f"n_heldout {cfg.n_heldout}: {dt:.1f} s ({dt / s.n_samples * 1e3:.1f} ms/face), "
                  f"{os.path.getsize(path) / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()

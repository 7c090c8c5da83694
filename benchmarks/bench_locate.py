"""Point-location throughput of cm3dmm.uv.UVLocator against a brute-force reference.

    python benchmarks/bench_locate.py [--queries 1000000] [--brute 2000]

Template: ICT-FaceKit's face area (9,409 vertices, LSCM unwrapping) when
../shared/data/ICT-FaceKit is present, else a generated ~10k-vertex bumpy grid with holes.
Prints queries/s for 1e6 uniform random UVs in [0, 1]^2 (inside and off the face), for
inside-only queries, the build time, and the ratio against the brute-force reference
(every triangle for every point, vectorised over triangles) measured on a subset in the
same run. Single-threaded numpy (set by this script).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cm3dmm.uv import UVLocator, unwrap  # noqa: E402


def template():
    from _meshes import ICT_MESH, grid_mesh, read_ict_face

    if ICT_MESH.exists():
        v, f, _ = read_ict_face()
        name = "ICT face area"
    else:
        v, f = grid_mesh(100)
        name = "bumpy grid"
    uv = unwrap(v, f, method="lscm").uv
    return name, v, f, uv


def brute(uv, f, q):
    t = uv[f].astype(np.float64)
    d1, d2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    det = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    out = np.full(len(q), -1)
    for n, p in enumerate(q):
        r = p - t[:, 0]
        l1 = (r[:, 0] * d2[:, 1] - r[:, 1] * d2[:, 0]) / det
        l2 = (d1[:, 0] * r[:, 1] - d1[:, 1] * r[:, 0]) / det
        ok = np.flatnonzero((l1 >= -1e-9) & (l2 >= -1e-9) & (l1 + l2 <= 1 + 1e-9))
        out[n] = ok[0] if len(ok) else -1
    return out


def best_of(fn, reps=3):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=1_000_000)
    ap.add_argument("--brute", type=int, default=2000)
    args = ap.parse_args(argv)
    name, v, f, uv = template()
    t0 = time.perf_counter()
    loc = UVLocator(uv, f)
    build = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    q = rng.random((args.queries, 2))
    tri, _, inside = loc.locate(q)
    t_all = best_of(lambda: loc.locate(q))
    qi = q[inside]
    t_in = best_of(lambda: loc.locate(qi))
    sub = q[: args.brute]
    t0 = time.perf_counter()
    ref = brute(uv, f, sub)
    t_brute = time.perf_counter() - t0
    agree = np.array_equal(ref >= 0, inside[: args.brute])
    rate_all, rate_in, rate_brute = len(q) / t_all, len(qi) / t_in, len(sub) / t_brute
    print(f"template: {name}, {len(v)} vertices, {len(f)} triangles; build {build:.2f} s")
    print(f"random UVs in [0,1]^2 ({inside.mean():.1%} on the face): {rate_all:,.0f} queries/s")
    print(f"inside-only queries:                       {rate_in:,.0f} queries/s")
    print(f"brute force (all triangles per point):     {rate_brute:,.0f} queries/s  "
          f"(inside flags agree on {len(sub)}: {agree})")
    print(f"ratio locator / brute force: {rate_all / rate_brute:,.0f}x (random), "
          f"{rate_in / rate_brute:,.0f}x (inside)")


if __name__ == "__main__":
    main()

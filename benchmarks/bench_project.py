"""Closest-point projection throughput of cm3dmm.geometry.closest_points_on_mesh.

    python benchmarks/bench_project.py [--points 20000] [--brute 300] [--search]

``--search``: the search variants instead, on the evaluate stage's workload (10,000 points per mesh):
the k-nearest-centroid candidates per radius class (now) against ball lists for every point
(``candidates=0``, before), and chunks in 2 threads (``workers=2``), on the face and on the face
subdivided twice (an upsampling level's mesh, 16x the triangles), same points, same run.

The workload of the Chamfer-type metrics: area-weighted samples of one face projected onto
another face of the same topology. Mesh: ICT-FaceKit's face area (9,409 vertices, 18,460
triangles) when ../shared/data/ICT-FaceKit is present, else a generated 100 x 100 bumpy grid.
The second face is the first with a smooth displacement of a few millimetres (the size of a
fitting error) and, for the "noisy" case, 0.3 mm of per-point noise; the "far" case draws
points uniformly in a box 40 mm around the face.

References measured in the same run on the same points: brute force (every triangle for
every point, vectorised over triangles; on a subset) and VTK's vtkStaticCellLocator
(FindClosestPoint called once per point from Python, as pyvista's find_closest_cell does).
Single-threaded numpy (set by this script).
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

from cm3dmm.geometry import (  # noqa: E402
    barycentric_interpolate,
    closest_points_on_mesh,
    closest_points_on_triangles,
    sample_surface,
)


def face():
    from _meshes import ICT_MESH, grid_mesh, read_ict_face

    if ICT_MESH.exists():
        v, f, _ = read_ict_face()
        return v, np.asarray(f, np.int64), "ICT face area"
    v, f = grid_mesh(100)
    return v, f, "100x100 bumpy grid"


def brute(P, v, f):
    out = np.empty(len(P))
    for i in range(len(P)):
        q, _ = closest_points_on_triangles(P[i], v[f[:, 0]], v[f[:, 1]], v[f[:, 2]])
        out[i] = np.linalg.norm(q - P[i], axis=1).min()
    return out


def vtk_locator(P, v, f):
    import pyvista as pv
    import vtk

    poly = pv.PolyData(np.ascontiguousarray(v), np.hstack([np.full((len(f), 1), 3), f]).astype(np.int64).ravel())
    loc = vtk.vtkStaticCellLocator()
    loc.SetDataSet(poly)
    loc.BuildLocator()
    out = np.empty(len(P))
    closest = [0.0, 0.0, 0.0]
    cid, sub, d2 = vtk.reference(0), vtk.reference(0), vtk.reference(0.0)
    for i, p in enumerate(P):
        loc.FindClosestPoint(p.tolist(), closest, cid, sub, d2)
        out[i] = float(d2) ** 0.5
    return out


def rate(fn, n):
    t = time.perf_counter()
    res = fn()
    return n / (time.perf_counter() - t), res


def search_variants(v, f, name, n_points: int, repeats: int = 3) -> int:
    """Seconds per projection of the variants of the search (median of ``repeats``)."""
    import trimesh

    rng = np.random.default_rng(0)
    meshes = {"face": (v, f)}
    sv, sf = trimesh.remesh.subdivide(*trimesh.remesh.subdivide(v, f))
    meshes["face, subdivided twice"] = (sv, np.asarray(sf, np.int64))
    variants = {"ball lists for every point (before)": dict(candidates=0),
                "k-NN candidates, 1 thread (now)": dict(),
                "k-NN candidates, workers=2": dict(workers=2)}
    print(f"{name}; {n_points} points per projection; median of {repeats}")
    print(f"{'mesh':24s} {'triangles':>9s} " + " ".join(f"{k[:24]:>24s}" for k in variants) + "  speed-up")
    for mname, (mv, mf) in meshes.items():
        P = barycentric_interpolate(mv, mf, *sample_surface(mv, mf, n_points, rng)) + rng.normal(0, 0.5, (n_points, 3))
        secs, ref = [], None
        for kw in variants.values():
            ts = []
            for _ in range(repeats):
                t = time.perf_counter()
                res = closest_points_on_mesh(P, mv, mf, **kw)
                ts.append(time.perf_counter() - t)
            if ref is None:
                ref = res.dist
            assert np.array_equal(res.dist, ref), "a variant changed the answer"
            secs.append(float(np.median(ts)))
        print(f"{mname:24s} {len(mf):9d} " + " ".join(f"{x:23.3f}s" for x in secs)
              + "  " + " / ".join(f"{secs[0] / x:.2f}x" for x in secs[1:]))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--points", type=int, default=20000)
    ap.add_argument("--brute", type=int, default=300, help="points of the brute-force reference")
    ap.add_argument("--search", action="store_true", help="compare the search variants instead")
    a = ap.parse_args(argv)
    v, f, name = face()
    if a.search:
        return search_variants(v, f, name, 10000)
    rng = np.random.default_rng(0)
    ext = v.max(0) - v.min(0)
    bump = 3.0 * np.sin(v[:, :1] / ext[0] * 9.0) * np.cos(v[:, 1:2] / ext[1] * 7.0) * np.array([[0.3, 0.3, 1.0]])
    other = v + bump
    samples = barycentric_interpolate(v, f, *sample_surface(v, f, a.points, rng))
    cases = {
        "surface samples of another face": samples,
        "same, + 0.3 mm noise": samples + rng.normal(0, 0.3, samples.shape),
        "far: uniform in a box 40 mm around": rng.uniform(v.min(0) - 40, v.max(0) + 40, (a.points // 4, 3)),
    }
    print(f"{name}: {len(v)} vertices, {len(f)} triangles; single thread")
    print(f"{'case':36s} {'cm3dmm/s':>10s} {'vtk/s':>9s} {'brute/s':>8s} {'x vtk':>6s} {'x brute':>8s}")
    for case, P in cases.items():
        closest_points_on_mesh(P[:100], other, f)  # warm-up
        r_fast, res = rate(lambda: closest_points_on_mesh(P, other, f), len(P))
        r_vtk, d_vtk = rate(lambda: vtk_locator(P, other, f), len(P))
        sub = P[: a.brute]
        r_brute, d_brute = rate(lambda: brute(sub, other, f), len(sub))
        err = max(np.abs(res.dist[: a.brute] - d_brute).max(), np.abs(res.dist - d_vtk).max())
        assert err < 1e-6, f"{case}: projection differs from the references by {err}"
        print(f"{case:36s} {r_fast:10.0f} {r_vtk:9.0f} {r_brute:8.0f} {r_fast / r_vtk:6.1f} "
              f"{r_fast / r_brute:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

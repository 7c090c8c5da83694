"""Tiny generated meshes for the UV / upsampling / template tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

ICT_MESH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ICT-FaceKit" / \
    "FaceXModel" / "generic_neutral_mesh.obj.gz"
ICT_FACE_VERTICES = 9409


def axis_rotation(axis: int, deg: float) -> np.ndarray:
    """(3, 3) rotation by ``deg`` degrees about coordinate axis ``axis`` (0 = x, 1 = y, 2 = z)."""
    a = np.radians(deg)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i] = r[j, j] = c
    r[i, j], r[j, i] = -s, s
    return r


def grid_mesh(n: int = 21, size: float = 150.0, bump: float = 30.0):
    """A bumpy square 'face' of n x n vertices (mm), triangles counter-clockwise from +z."""
    c = np.linspace(-1, 1, n)
    x, y = np.meshgrid(c, c, indexing="xy")
    z = bump * np.exp(-2 * (x ** 2 + y ** 2))
    v = np.stack([x.ravel() * size / 2, y.ravel() * size / 2, z.ravel()], 1)
    f = []
    for r in range(n - 1):
        for k in range(n - 1):
            a = r * n + k
            f += [[a, a + 1, a + n + 1], [a, a + n + 1, a + n]]
    return v, np.array(f, np.int64)


def compact(v, f):
    used = np.unique(f)
    remap = np.full(len(v), -1)
    remap[used] = np.arange(len(used))
    return v[used], remap[f]


def holed_disc(n: int = 21):
    """The grid with two round holes ('eyes'), as (vertices (V, 3), faces (F, 3))."""
    v, f = grid_mesh(n)
    x, y = v[:, 0] / 75, v[:, 1] / 75
    gone = ((x - 0.45) ** 2 + (y - 0.3) ** 2 < 0.03) | ((x + 0.45) ** 2 + (y - 0.3) ** 2 < 0.03)
    f = f[~gone[f].any(1)]
    return compact(v, f)


def icosphere(subdiv: int = 2):
    import trimesh

    s = trimesh.creation.icosphere(subdivisions=subdiv, radius=80.0)
    return np.asarray(s.vertices), np.asarray(s.faces, np.int64)


def torus_with_hole(n: int = 16, m: int = 8):
    """A torus grid (genus 1) with one quad removed: has a boundary but a handle."""
    R, r = 60.0, 20.0
    i, j = np.meshgrid(np.arange(n), np.arange(m), indexing="ij")
    th, ph = 2 * np.pi * i / n, 2 * np.pi * j / m
    v = np.stack([(R + r * np.cos(ph)) * np.cos(th), (R + r * np.cos(ph)) * np.sin(th), r * np.sin(ph)], -1)
    v = v.reshape(-1, 3)
    f = []
    for a in range(n):
        for b in range(m):
            if a == 0 and b == 0:
                continue
            p, q = a * m + b, ((a + 1) % n) * m + b
            p2, q2 = a * m + (b + 1) % m, ((a + 1) % n) * m + (b + 1) % m
            f += [[p, q, q2], [p, q2, p2]]
    return v, np.array(f, np.int64)


def read_ict_face(last_seen_uv: bool = False):
    """ICT-FaceKit's face area (vertices 0..9408, mm) with per-vertex UVs: for the three seam
    vertices with two UVs, the one inside [0, 1]^2 (or the last one seen, if asked)."""
    v, vt, tris, tuv = [], [], [], []
    with gzip.open(ICT_MESH, "rt") as fh:
        for line in fh:
            if line.startswith("v "):
                v.append(line.split()[1:4])
            elif line.startswith("vt "):
                vt.append(line.split()[1:3])
            elif line.startswith("f "):
                c = [[int(y) for y in x.split("/")[:2]] for x in line.split()[1:]]
                for k in range(1, len(c) - 1):
                    tris.append([c[0][0], c[k][0], c[k + 1][0]])
                    tuv.append([c[0][1], c[k][1], c[k + 1][1]])
    v = np.array(v, np.float64)[:ICT_FACE_VERTICES] * 10.0  # cm -> mm
    vt = np.array(vt, np.float64)
    tris, tuv = np.array(tris) - 1, np.array(tuv) - 1
    keep = (tris < ICT_FACE_VERTICES).all(1)
    tris, tuv = tris[keep], tuv[keep]
    uv = np.full((ICT_FACE_VERTICES, 2), np.nan)
    for vi, ti in zip(tris.ravel(), tuv.ravel()):
        w = vt[ti]
        if last_seen_uv or (np.isnan(uv[vi, 0]) and (w <= 1).all()):
            uv[vi] = w
    return v, tris.astype(np.int64), uv

"""Upsampling levels and uniform UV grids over the template.

A :class:`Level` is a point set on the template surface given *semantically*: each point
is (template triangle id, barycentric coordinates), so it can be evaluated on any face of
the model (``interpolate(field, faces, level.tri, level.bary)``), with its UV and its own
triangles.

* :func:`subdivide` — level ``l`` splits every template triangle into ``4**l`` triangles
  (midpoint subdivision in barycentric space, ``n = 2**l`` segments per edge). Points are
  keyed exactly by integers (template vertex id; template edge id and integer position
  along it; template triangle id and integer lattice position), so a point on a shared
  edge is stored once and the level's triangles are watertight wherever the template is.
  Point order: the ``V`` template vertices first (so ``points[:V]`` are the template's
  vertices), then ``n - 1`` points per template edge, then ``(n-1)(n-2)/2`` interior
  points per template triangle: ``P = V + E (n - 1) + F (n - 1)(n - 2) / 2`` points and
  ``F n^2`` triangles.
* :func:`uv_grid` — a regular ``n x n`` grid of pixel-centre UVs ``((i + 0.5) / n)``
  restricted to the face (points inside a template triangle), triangulated by the grid
  cells whose four corners are all inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cm3dmm.geometry import unique_edges
from cm3dmm.uv import UVLocator, interpolate


@dataclass
class Level:
    """Points on the template given as (triangle, barycentrics), with their triangles."""

    tri: np.ndarray  #: (P,) int32 template triangle of each point
    bary: np.ndarray  #: (P, 3) float32 barycentric coordinates in that triangle
    uv: np.ndarray  #: (P, 2) float32
    faces: np.ndarray  #: (G, 3) int32 triangles over the points
    vertex_index: np.ndarray  #: (P,) int64 template vertex of the point, -1 for new points

    @property
    def n_points(self) -> int:
        return int(len(self.tri))

    def points(self, field, template_faces):
        """Evaluate a per-vertex template field (..., V, C) at the level's points:
        (..., P, C)."""
        return interpolate(field, template_faces, self.tri, self.bary)


def expected_counts(n_vertices: int, n_edges: int, n_faces: int, level: int) -> tuple[int, int]:
    """(points, triangles) of subdivision level ``level`` of a mesh whose triangles use
    ``n_vertices`` vertices and have ``n_edges`` distinct edges."""
    n = 2 ** level
    return (n_vertices + n_edges * (n - 1) + n_faces * (n - 1) * (n - 2) // 2,
            n_faces * n * n)


def _lattice(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Integer barycentric lattice of one triangle split into n^2.

    Returns ``ijk (M, 3)`` (weights of corners 0, 1, 2 summing to n; M = (n+1)(n+2)/2)
    and ``tris (n^2, 3)`` local indices, oriented like the parent triangle.
    """
    index = {}
    ijk = []
    for k in range(n + 1):
        for j in range(n + 1 - k):
            index[(j, k)] = len(ijk)
            ijk.append((n - j - k, j, k))
    tris = []
    for k in range(n):
        for j in range(n - k):
            tris.append((index[(j, k)], index[(j + 1, k)], index[(j, k + 1)]))
            if j + k <= n - 2:
                tris.append((index[(j + 1, k)], index[(j + 1, k + 1)], index[(j, k + 1)]))
    return np.array(ijk, np.int64), np.array(tris, np.int64)


def subdivide(faces: np.ndarray, n_vertices: int, level: int, uv: np.ndarray | None = None) -> Level:
    """Midpoint subdivision level ``level`` of the template ``faces (F, 3)``.

    ``n_vertices`` is the template's vertex count V; ``uv (V, 2)`` (optional) gives the
    level's UVs (zeros otherwise). Returns a :class:`Level` with exact barycentrics
    ``(i, j, k) / 2**level``. Vertices used by no triangle are not points of the level.
    """
    if level < 0:
        raise ValueError(f"level must be >= 0, got {level}")
    f = np.asarray(faces, np.int64)
    if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError(f"faces must have shape (F, 3), got {f.shape}")
    V = int(n_vertices)
    if f.min() < 0 or f.max() >= V:
        raise ValueError(f"faces reference vertex {int(f.max())} of {V}")
    F = len(f)
    n = 2 ** level
    ijk, local_tris = _lattice(n)
    edges, _, _ = unique_edges(f)
    E = len(edges)
    edge_keys = edges[:, 0] * V + edges[:, 1]
    n_int = (n - 1) * (n - 2) // 2
    gid = np.empty((F, len(ijk)), np.int64)
    interior_slot = 0
    for m, (i, j, k) in enumerate(ijk):
        w = (i, j, k)
        nz = [c for c in range(3) if w[c] > 0]
        if len(nz) == 1:  # a template vertex
            gid[:, m] = f[:, nz[0]]
        elif len(nz) == 2:  # on a template edge: key (low vertex, high vertex, weight of high)
            c0, c1 = nz
            a, b = f[:, c0], f[:, c1]
            lo, hi = np.minimum(a, b), np.maximum(a, b)
            w_hi = np.where(b > a, w[c1], w[c0])
            e = np.searchsorted(edge_keys, lo * V + hi)
            gid[:, m] = V + e * (n - 1) + (w_hi - 1)
        else:  # interior of the triangle
            gid[:, m] = V + E * (n - 1) + np.arange(F) * n_int + interior_slot
            interior_slot += 1
    flat = gid.ravel()
    ids, first = np.unique(flat, return_index=True)  # sorted ids; first occurrence
    tri = (first // len(ijk)).astype(np.int32)
    bary = (ijk[first % len(ijk)] / n).astype(np.float32)  # exact: n is a power of two
    vertex_index = np.where(ids < V, ids, -1).astype(np.int64)
    remap = np.searchsorted(ids, gid)  # compact ids (identity when all vertices are used)
    lvl_faces = remap[:, local_tris].reshape(-1, 3).astype(np.int32)
    if uv is not None:
        pts_uv = interpolate(np.asarray(uv, np.float64), f, tri, bary.astype(np.float64)).astype(np.float32)
    else:
        pts_uv = np.zeros((len(ids), 2), np.float32)
    return Level(tri=tri, bary=bary, uv=pts_uv, faces=lvl_faces, vertex_index=vertex_index)


def uv_grid_from(locator: UVLocator, n: int) -> Level:
    """A regular ``n x n`` UV grid (pixel centres ``(i + 0.5) / n``) restricted to the
    triangles of ``locator``; triangles from the cells whose four corners are inside
    (two per cell, counter-clockwise in UV)."""
    if n < 2:
        raise ValueError(f"grid size must be >= 2, got {n}")
    c = (np.arange(n) + 0.5) / n
    uu, vv = np.meshgrid(c, c, indexing="xy")  # row r: v = c[r]; column: u
    q = np.stack([uu.ravel(), vv.ravel()], axis=1)
    tri, bary, inside = locator.locate(q)
    index = np.full(n * n, -1, np.int64)
    index[inside] = np.arange(int(inside.sum()))
    grid = index.reshape(n, n)
    a, b = grid[:-1, :-1], grid[:-1, 1:]  # (v, u), (v, u+1)
    c_, d = grid[1:, :-1], grid[1:, 1:]  # (v+1, u), (v+1, u+1)
    ok = (a >= 0) & (b >= 0) & (c_ >= 0) & (d >= 0)
    t1 = np.stack([a[ok], b[ok], d[ok]], axis=1)
    t2 = np.stack([a[ok], d[ok], c_[ok]], axis=1)
    faces = np.stack([t1, t2], axis=1).reshape(-1, 3).astype(np.int32)
    return Level(tri=tri[inside].astype(np.int32), bary=bary[inside].astype(np.float32),
                 uv=q[inside].astype(np.float32), faces=faces,
                 vertex_index=np.full(int(inside.sum()), -1, np.int64))


def uv_grid(template, n: int) -> Level:
    """A regular ``n x n`` UV grid over ``template`` (anything with a ``locator``, e.g.
    :class:`cm3dmm.template.Template`), restricted to the face; see :func:`uv_grid_from`."""
    return uv_grid_from(template.locator, n)

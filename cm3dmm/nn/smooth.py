"""Smooth interpolation of per-vertex quantities at any UV (the continuous model's basis and avg).

Barycentric interpolation of per-vertex values is piecewise linear: its slope jumps across every
edge, and between coarse vertices it can only draw straight lines. :class:`SmoothInterpolator`
replaces it by a **partition of unity of local quadratic fits** over the template mesh:

* around every vertex ``c`` a quadratic ``g_c(uv) = y_c + m((uv - uv_c) / h_c) . a_c`` is fitted by
  weighted least squares to the values of its mesh neighbours (2-ring, or 3-ring where the 2-ring is
  too small), with ``m(du, dv) = (du, dv, du^2, du dv, dv^2)`` and ``h_c`` its mean UV edge length;
  ``a_c = L_c (y_N(c) - y_c)`` with ``L_c`` (5, K) precomputed once (linear fallback where the
  neighbourhood cannot carry a quadratic);
* a point in triangle ``t`` with barycentrics ``b`` blends the three corners' fits:
  ``f(uv) = sum_c phi_c(b) g_c(uv)``, ``phi_c = s(b_c) / sum_k s(b_k)``, ``s(b) = b^2 (3 - 2 b)``.

``smoothness`` in [0, 1] blends this with barycentric interpolation (``a f + (1 - a) f_linear``):
fitted per-vertex values carry fitting noise, which the quadratic fits amplify between vertices;
on the default run's coarse subsets (held-out training subjects, PCA-fitted values) ``a = 0.5``
beat both ends at 1/4 of the vertices and kept most of the gain at 1/16 (benchmarks/README.md).

The result interpolates every vertex exactly (``phi_c = 1`` and ``g_c(uv_c) = y_c`` there), is
continuous across edges (on an edge the weights depend only on the edge's two corners), exact for
quadratic functions of UV, and — because neighbourhoods follow the mesh's connectivity, not UV
distance — never mixes values across a slit of the UV layout (lips, eyelids). Every evaluation is
a fixed sparse linear map of the per-vertex values: :meth:`weights` gives it as ``(index, weight)``
pairs per query point, :meth:`matrix` as a sparse (P, V) matrix.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["SmoothInterpolator", "smoothstep_blend"]

#: neighbourhoods larger than this keep the nearest vertices (in UV); 12 measured best of 8-40
#: on the default run's coarse subsets (benchmarks/README.md, "Smooth interpolation")
MAX_NEIGHBOURS = 12
#: a quadratic fit needs at least this many neighbours (5 unknowns + slack)
MIN_QUADRATIC = 7
#: ridge on the quadratic coefficients (relative to the normal matrix's mean diagonal): shrinks the
#: fits toward local planes where the neighbourhood is noisy
CURVATURE_RIDGE = 0.0


def smoothstep_blend(bary: np.ndarray) -> np.ndarray:
    """Blending weights of a triangle's corners: (P, 3) barycentrics -> (P, 3), rows sum to 1."""
    b = np.clip(np.asarray(bary, np.float64), 0.0, 1.0)
    s = b * b * (3.0 - 2.0 * b)
    tot = s.sum(1, keepdims=True)
    return np.where(tot > 0, s / np.where(tot > 0, tot, 1.0), 1.0 / 3.0)


def _adjacency(faces: np.ndarray, n: int) -> list[np.ndarray]:
    f = np.asarray(faces, np.int64)
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    e = np.concatenate([e, e[:, ::-1]])
    e = np.unique(e, axis=0)
    starts = np.searchsorted(e[:, 0], np.arange(n + 1))
    return [e[starts[i]:starts[i + 1], 1] for i in range(n)]


def _rings(adj: list[np.ndarray], c: int, depth: int) -> np.ndarray:
    seen = {c}
    frontier = [c]
    for _ in range(depth):
        nxt = []
        for v in frontier:
            for w in adj[v]:
                w = int(w)
                if w not in seen:
                    seen.add(w)
                    nxt.append(w)
        frontier = nxt
    seen.discard(c)
    return np.fromiter(seen, np.int64, len(seen))


def _monomials(d: np.ndarray) -> np.ndarray:
    """(..., 2) scaled offsets -> (..., 5) = du, dv, du^2, du dv, dv^2."""
    du, dv = d[..., 0], d[..., 1]
    return np.stack([du, dv, du * du, du * dv, dv * dv], -1)


class SmoothInterpolator:
    """Per-vertex values -> values at any point of a UV-triangulated template (module docstring).

    uv: (V, 2) vertex UVs; faces: (F, 3) triangles. Built once (numpy, O(V) small solves).
    """

    def __init__(self, uv: np.ndarray, faces: np.ndarray, max_neighbours: int = MAX_NEIGHBOURS,
                 smoothness: float = 1.0):
        uv = np.asarray(uv, np.float64)
        faces = np.asarray(faces, np.int64)
        if uv.ndim != 2 or uv.shape[1] != 2:
            raise ValueError(f"uv must have shape (V, 2), got {uv.shape}")
        if faces.ndim != 2 or faces.shape[1] != 3 or (len(faces) and (faces.min() < 0 or faces.max() >= len(uv))):
            raise ValueError(f"faces must have shape (F, 3) with indices into {len(uv)} vertices")
        if not 0.0 <= float(smoothness) <= 1.0:
            raise ValueError(f"smoothness must be in [0, 1], got {smoothness}")
        n = len(uv)
        self.uv, self.faces, self.n = uv, faces, n
        #: weight of the quadratic partition of unity against barycentric interpolation
        self.smoothness = float(smoothness)
        adj = _adjacency(faces, n)
        k = int(max_neighbours)
        nbr = np.full((n, k), -1, np.int64)
        op = np.zeros((n, 5, k))
        scale = np.ones(n)
        for c in range(n):
            if len(adj[c]) == 0:
                continue
            h = float(np.linalg.norm(uv[adj[c]] - uv[c], axis=1).mean()) or 1.0
            scale[c] = h
            ring = _rings(adj, c, 2)
            if len(ring) < MIN_QUADRATIC:
                ring = _rings(adj, c, 3)
            d = (uv[ring] - uv[c]) / h
            if len(ring) > k:
                keep = np.argsort((d * d).sum(1), kind="stable")[:k]
                ring, d = ring[keep], d[keep]
            m = _monomials(d)  # (K, 5)
            w = 1.0 / (1.0 + (d * d).sum(1))  # nearer neighbours count more
            cols = 5 if len(ring) >= MIN_QUADRATIC else 2
            a = m[:, :cols] * w[:, None]
            gram = m[:, :cols].T @ a
            ridge = np.full(cols, 1e-8)
            ridge[2:] += CURVATURE_RIDGE
            gram += np.trace(gram) / cols * np.diag(ridge)
            try:
                lop = np.linalg.solve(gram, a.T)  # (cols, K)
                if np.linalg.cond(gram) > 1e8:
                    raise np.linalg.LinAlgError
            except np.linalg.LinAlgError:
                cols = 2
                a = m[:, :2] * w[:, None]
                gram = m[:, :2].T @ a + 1e-8 * np.eye(2)
                lop = np.linalg.solve(gram, a.T)
            nbr[c, :len(ring)] = ring
            op[c, :cols, :len(ring)] = lop
        self.neighbours = nbr  #: (V, K) neighbour ids, -1 = padding
        self.operator = op  #: (V, 5, K) values -> quadratic coefficients
        self.scale = scale  #: (V,) UV length unit of each vertex's fit

    @property
    def width(self) -> int:
        """Entries per query point of :meth:`weights`."""
        return 3 * (self.neighbours.shape[1] + 1)

    def weights(self, tri: np.ndarray, bary: np.ndarray, uv: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """The linear map of per-vertex values to points given as (triangle, barycentrics).

        tri: (P,) triangle ids; bary: (P, 3); uv: (P, 2) the points' UVs (computed from the
        barycentrics when None). Returns ``index`` (P, W) int64 vertex ids and ``weight`` (P, W)
        float64 with ``value(p) = sum_j weight[p, j] * y[index[p, j]]`` (padding: index 0,
        weight 0). Rows sum to 1.
        """
        tri = np.asarray(tri, np.int64)
        bary = np.asarray(bary, np.float64)
        corners = self.faces[tri]  # (P, 3)
        if uv is None:
            uv = np.einsum("pk,pkc->pc", bary, self.uv[corners])
        uv = np.asarray(uv, np.float64)
        phi = smoothstep_blend(bary)  # (P, 3)
        d = (uv[:, None, :] - self.uv[corners]) / self.scale[corners][..., None]  # (P, 3, 2)
        coef = np.einsum("pcm,pcmk->pck", _monomials(d), self.operator[corners])  # (P, 3, K)
        nb = self.neighbours[corners]  # (P, 3, K)
        coef = np.where(nb >= 0, coef, 0.0)
        a = self.smoothness
        # blended with barycentric interpolation: (1 - a) on the corners by their barycentrics
        centre = a * phi * (1.0 - coef.sum(-1)) + (1.0 - a) * bary  # (P, 3)
        phi = a * phi
        w = np.concatenate([centre, (phi[..., None] * coef).reshape(len(tri), -1)], 1)
        idx = np.concatenate([corners, np.where(nb >= 0, nb, 0).reshape(len(tri), -1)], 1)
        return idx, w

    def matrix(self, tri: np.ndarray, bary: np.ndarray, uv: np.ndarray | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """:meth:`weights` as a sparse COO tensor (P, V) (duplicate entries summed)."""
        idx, w = self.weights(tri, bary, uv)
        p = len(idx)
        rows = np.repeat(np.arange(p), idx.shape[1])
        coo = torch.sparse_coo_tensor(np.stack([rows, idx.ravel()]), w.ravel(), (p, self.n), dtype=dtype,
                                      check_invariants=True)
        return coo.coalesce()

    def interpolate(self, values: np.ndarray, tri: np.ndarray, bary: np.ndarray,
                    uv: np.ndarray | None = None) -> np.ndarray:
        """Per-vertex values (..., V, C) at the points -> (..., P, C) (numpy reference path)."""
        idx, w = self.weights(tri, bary, uv)
        v = np.asarray(values)
        return np.einsum("...pjc,pj->...pc", v[..., idx, :], w)

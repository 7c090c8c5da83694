"""UV parameterisation of the face region and point location in UV space.

Three parts, all pure functions on numpy arrays (except :class:`UVLocator`, which caches a
spatial index):

* **Topology** — :func:`check_disc` verifies that a triangle mesh is a *disc with holes*
  (one connected component, manifold, consistently oriented, genus 0, at least one
  boundary loop) and returns its boundary loops; anything else is an :class:`InputError`.
* **Unwrapping** — :func:`check_uv` validates a source's per-vertex UVs;
  :func:`harmonic_uv` (cotangent weights clamped positive, outer boundary on a circle by
  arc length, holes filled virtually with a centre-vertex fan while solving) and
  :func:`lscm_uv` (least-squares conformal map, free boundary, two pinned vertices)
  compute one with sparse linear algebra; :func:`unwrap` chooses, aligns the result with
  the frontal (x, y) projection of the face and scales it into ``[margin, 1 - margin]^2``;
  :func:`distortion` measures angle / area distortion and flipped triangles.
* **Point location** — :class:`UVLocator` finds, for query UVs, the containing triangle
  and barycentric coordinates through a uniform grid of triangle buckets;
  :func:`interpolate` evaluates any per-vertex field there (numpy or torch).

UV conventions: ``u`` grows with the subject's left (+x), ``v`` grows upwards (+y) for
computed unwrappings (a front view of the face); source UVs keep their layout and are only
scaled uniformly and centred into ``[margin, 1 - margin]^2``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from cm3dmm.errors import InputError
from cm3dmm.geometry import boundary_loops, unique_edges

log = logging.getLogger(__name__)

#: A UV triangle counts as degenerate below this fraction of the mean UV triangle area.
DEGENERATE_FRACTION = 1e-8
#: Barycentric tolerance of the point-in-triangle test (points on shared edges are found).
BARY_TOL = 1e-9


# =========================================================================== topology
@dataclass
class DiscTopology:
    """Boundary structure of a disc-with-holes mesh.

    ``outer`` and every entry of ``holes`` are vertex loops ordered along the triangles'
    orientation (each consecutive pair ``(a, b)`` is a directed edge of a triangle).
    """

    n_vertices: int
    n_edges: int
    outer: np.ndarray  #: (B,) int64, the outer boundary ring (longest loop in 3-D)
    holes: list[np.ndarray] = field(default_factory=list)  #: inner loops (eyes, mouth, ...)

    @property
    def n_loops(self) -> int:
        return 1 + len(self.holes)


def check_disc(vertices: np.ndarray, faces: np.ndarray, what: str = "face region",
               path=None) -> DiscTopology:
    """Check that ``(vertices (V, 3), faces (F, 3))`` is a disc, holes allowed.

    Raises :class:`InputError` (naming ``path`` if given) for vertices used by no
    triangle, non-manifold edges or vertices, inconsistent orientation, more than one
    connected component, a closed surface, or handles (genus > 0).
    """
    from scipy.sparse.csgraph import connected_components

    v = np.asarray(vertices)
    f = np.asarray(faces, dtype=np.int64)
    V = len(v)
    if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise InputError(f"{what}: faces must have shape (F, 3) with F > 0, got {f.shape}", path)
    if f.min() < 0 or f.max() >= V:
        raise InputError(f"{what}: triangles reference vertex {int(f.max())} of {V}", path)
    used = np.zeros(V, bool)
    used[f.ravel()] = True
    if not used.all():
        first = int(np.flatnonzero(~used)[0])
        raise InputError(f"{what} is not a disc: {int((~used).sum())} vertices belong to no "
                         f"triangle (first: {first}); crop them in the data stage", path)
    if (f[:, 0] == f[:, 1]).any() or (f[:, 1] == f[:, 2]).any() or (f[:, 0] == f[:, 2]).any():
        raise InputError(f"{what}: some triangles repeat a vertex", path)
    edges, _, counts = unique_edges(f)
    if (counts > 2).any():
        e = edges[np.argmax(counts)]
        raise InputError(f"{what} is not a disc: edge ({e[0]}, {e[1]}) is shared by "
                         f"{int(counts.max())} triangles (non-manifold)", path)
    # directed half-edges a -> b
    a = f[:, [0, 1, 2]].ravel()
    b = f[:, [1, 2, 0]].ravel()
    hkey = a * V + b
    order = np.sort(hkey)
    if (np.diff(order) == 0).any():
        dup = order[np.flatnonzero(np.diff(order) == 0)[0]]
        raise InputError(f"{what}: triangles are not consistently oriented (directed edge "
                         f"({dup // V}, {dup % V}) appears twice)", path)
    twin = np.isin(b * V + a, hkey, assume_unique=False)
    ba = a[~twin]  # tails of the boundary half-edges
    n_comp, _ = connected_components(
        sp.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(V, V)),
        directed=False)
    if n_comp != 1:
        raise InputError(f"{what} is not a disc: it has {n_comp} connected components", path)
    if len(ba) == 0:
        raise InputError(f"{what} is not a disc: it is a closed surface (no boundary)", path)
    out_deg = np.bincount(ba, minlength=V)
    if out_deg.max() > 1:
        bad = int(np.argmax(out_deg))
        raise InputError(f"{what} is not a disc: boundary vertex {bad} touches "
                         f"{int(out_deg[bad])} boundary loops (non-manifold vertex)", path)
    loops = boundary_loops(f)
    euler = V - len(edges) + len(f)
    if euler != 2 - len(loops):
        genus = (2 - len(loops) - euler) // 2
        raise InputError(f"{what} is not a disc: it has {genus} handle(s) (Euler characteristic "
                         f"{euler} with {len(loops)} boundary loops)", path)
    lengths = [_loop_length(v, lp) for lp in loops]
    k = int(np.argmax(lengths))
    return DiscTopology(n_vertices=V, n_edges=len(edges), outer=loops[k],
                        holes=[lp for i, lp in enumerate(loops) if i != k])


def _loop_length(v: np.ndarray, loop: np.ndarray) -> float:
    p = np.asarray(v, np.float64)[loop]
    return float(np.linalg.norm(np.roll(p, -1, axis=0) - p, axis=1).sum())


# =========================================================================== unwrapping
def check_uv(uv: np.ndarray | None, faces: np.ndarray) -> list[str]:
    """Problems that make per-vertex ``uv (V, 2)`` unusable as the template's unwrapping.

    Checks: present, finite, inside ``[0, 1]^2``, no degenerate UV triangle, no flipped
    triangle (all signed areas share one sign). Returns an empty list when valid.
    """
    if uv is None:
        return ["the source provides no UVs"]
    uv = np.asarray(uv, np.float64)
    f = np.asarray(faces, np.int64)
    if uv.ndim != 2 or uv.shape[1] != 2 or (len(f) and f.max() >= len(uv)):
        return [f"UVs have shape {uv.shape}, not one (u, v) per vertex"]
    problems = []
    if not np.isfinite(uv).all():
        return ["UVs contain NaN or infinite values"]
    outside = ((uv < 0) | (uv > 1)).any(axis=1)
    if outside.any():
        problems.append(f"{int(outside.sum())} vertices have UVs outside [0, 1]^2 "
                        f"(range u {uv[:, 0].min():.3g}..{uv[:, 0].max():.3g}, "
                        f"v {uv[:, 1].min():.3g}..{uv[:, 1].max():.3g})")
    area = signed_areas(uv, f)
    degenerate = np.abs(area) <= DEGENERATE_FRACTION * np.abs(area).mean()
    if degenerate.any():
        problems.append(f"{int(degenerate.sum())} UV triangles are degenerate")
    n_flip = count_flipped(area)
    if n_flip:
        problems.append(f"{n_flip} UV triangles are flipped")
    return problems


def signed_areas(uv: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Signed areas (F,) of the UV triangles (positive = counter-clockwise)."""
    t = np.asarray(uv, np.float64)[np.asarray(faces, np.int64)]
    d1, d2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    return 0.5 * (d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0])


def count_flipped(area: np.ndarray) -> int:
    """Triangles whose non-zero signed area disagrees with the majority sign."""
    pos, neg = int((area > 0).sum()), int((area < 0).sum())
    return min(pos, neg)


def _cotangents(p: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Cotangent of each corner angle: p (V, 3), f (F, 3) -> (F, 3)."""
    t = p[f]
    cots = np.empty(f.shape, np.float64)
    for k in range(3):
        e1 = t[:, (k + 1) % 3] - t[:, k]
        e2 = t[:, (k + 2) % 3] - t[:, k]
        cross = np.linalg.norm(np.cross(e1, e2), axis=1)
        cots[:, k] = (e1 * e2).sum(1) / np.maximum(cross, 1e-300)
    return cots


def _fill_holes(f: np.ndarray, topo: DiscTopology) -> np.ndarray:
    """Faces plus, for hole ``i``, a fan around an extra vertex ``V + i``: (F + sum|hole|, 3).

    A directed boundary edge (a -> b) of the mesh gets the fan triangle (b, a, centre), so
    the filled mesh is a consistently oriented disc whose only boundary is the outer loop.
    """
    V = topo.n_vertices
    tris = [f]
    for i, hole in enumerate(topo.holes):
        tris.append(np.stack([np.roll(hole, -1), hole, np.full(len(hole), V + i)], axis=1))
    return np.concatenate(tris)


def _clamped_cotan_weights(P: np.ndarray, T: np.ndarray) -> sp.csr_matrix:
    """Symmetric (N, N) cotangent weights ``(cot a + cot b) / 2``, clamped below at 1e-3
    times their median so every edge weight is positive."""
    N = len(P)
    cot = _cotangents(P, T)
    i = T[:, [1, 2, 0]].ravel()
    j = T[:, [2, 0, 1]].ravel()
    w = 0.5 * cot.ravel()
    W = sp.coo_matrix((np.concatenate([w, w]), (np.concatenate([i, j]), np.concatenate([j, i]))),
                      shape=(N, N)).tocsr()
    W.sum_duplicates()
    W.data = np.maximum(W.data, 1e-3 * float(np.median(np.abs(W.data))))
    return W


def harmonic_uv(vertices: np.ndarray, faces: np.ndarray,
                topology: DiscTopology | None = None) -> np.ndarray:
    """Harmonic map of a disc-with-holes onto the unit disc.

    vertices (V, 3), faces (F, 3) -> uv (V, 2) float64 (not normalised).

    Weights are the cotangent weights ``(cot a + cot b) / 2``, clamped below at 1e-3 times
    their median so every weight is positive: each interior vertex is then a strictly
    convex combination of its neighbours and, with the outer boundary on a circle (placed
    by arc length, in the loop's orientation), Tutte/Floater's theorem guarantees an
    embedding without flipped triangles. Holes are handled by filling each one virtually
    with a fan around an extra centre vertex (the loop's centroid) while solving; the
    extra vertices are dropped afterwards, so hole loops map to star-shaped polygons.
    """
    p = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    topo = topology if topology is not None else check_disc(p, f)
    V = len(p)
    P = np.concatenate([p] + [p[h].mean(axis=0, keepdims=True) for h in topo.holes])
    T = _fill_holes(f, topo)
    N = len(P)
    W = _clamped_cotan_weights(P, T)
    L = sp.diags(np.asarray(W.sum(axis=1)).ravel()) - W

    outer = topo.outer
    seg = np.linalg.norm(P[np.roll(outer, -1)] - P[outer], axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)[:-1]]) / seg.sum()
    theta = 2 * np.pi * s
    fixed_uv = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    is_fixed = np.zeros(N, bool)
    is_fixed[outer] = True
    free = np.flatnonzero(~is_fixed)
    L = L.tocsr()
    A = L[free][:, free].tocsc()
    B = L[free][:, outer]
    rhs = -(B @ fixed_uv)
    out = np.empty((N, 2))
    out[outer] = fixed_uv
    out[free] = spla.splu(A).solve(rhs)
    return out[:V]


def _local_frames(p: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each triangle in its own orthonormal 2-D frame: (F, 3, 2) coordinates (counter-
    clockwise about the face normal) and areas (F,)."""
    t = p[f]
    e1 = t[:, 1] - t[:, 0]
    e2 = t[:, 2] - t[:, 0]
    n = np.cross(e1, e2)
    area2 = np.linalg.norm(n, axis=1)
    l1 = np.linalg.norm(e1, axis=1)
    x = e1 / np.maximum(l1, 1e-300)[:, None]
    y = np.cross(n / np.maximum(area2, 1e-300)[:, None], x)
    q = np.zeros((len(f), 3, 2))
    q[:, 1, 0] = l1
    q[:, 2, 0] = (e2 * x).sum(1)
    q[:, 2, 1] = (e2 * y).sum(1)
    return q, 0.5 * area2


def _gradients(q: np.ndarray) -> np.ndarray:
    """Gradients of the three barycentric functions in local coordinates: (F, 3, 2)."""
    d1 = q[:, 1] - q[:, 0]
    d2 = q[:, 2] - q[:, 0]
    det = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
    det = np.where(np.abs(det) > 1e-300, det, 1e-300)
    # inverse of [[d1x, d2x], [d1y, d2y]]: rows are grad(lambda_1), grad(lambda_2)
    g1 = np.stack([d2[:, 1], -d2[:, 0]], 1) / det[:, None]
    g2 = np.stack([-d1[:, 1], d1[:, 0]], 1) / det[:, None]
    return np.stack([-g1 - g2, g1, g2], axis=1)


def lscm_uv(vertices: np.ndarray, faces: np.ndarray,
            topology: DiscTopology | None = None) -> np.ndarray:
    """Least-squares conformal map (Lévy et al. 2002), free boundary.

    vertices (V, 3), faces (F, 3) -> uv (V, 2) float64 (not normalised).

    Minimises the area-weighted Cauchy-Riemann residual ``sum_T A_T |du/dx - dv/dy|^2 +
    |du/dy + dv/dx|^2`` in each triangle's local frame, with the two outer-boundary
    vertices farthest apart (double sweep) pinned to (0, 0) and (1, 0); every other
    vertex, hole loops included, is free. Solved through the sparse normal equations.
    """
    p = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    topo = topology if topology is not None else check_disc(p, f)
    V = len(p)
    q, area = _local_frames(p, f)
    g = _gradients(q) * np.sqrt(np.maximum(area, 0.0))[:, None, None]  # (F, 3, 2)
    F = len(f)
    rows_r = np.repeat(np.arange(F), 3)
    cols = f.ravel()
    gx, gy = g[..., 0].ravel(), g[..., 1].ravel()
    # unknowns: s (0..V-1) then t (V..2V-1); residual rows r1 = s_x - t_y, r2 = s_y + t_x
    rows = np.concatenate([rows_r, rows_r, rows_r + F, rows_r + F])
    cc = np.concatenate([cols, cols + V, cols, cols + V])
    vals = np.concatenate([gx, -gy, gy, gx])
    A = sp.csr_matrix((vals, (rows, cc)), shape=(2 * F, 2 * V))
    outer = topo.outer
    po = p[outer]
    i0 = int(np.argmax(np.linalg.norm(po - po[0], axis=1)))
    i1 = int(np.argmax(np.linalg.norm(po - po[i0], axis=1)))
    pins = np.array([outer[i0], outer[i1]])
    pin_vals = np.array([[0.0, 0.0], [1.0, 0.0]])
    fixed_cols = np.concatenate([pins, pins + V])
    fixed_x = np.concatenate([pin_vals[:, 0], pin_vals[:, 1]])
    free_mask = np.ones(2 * V, bool)
    free_mask[fixed_cols] = False
    free_cols = np.flatnonzero(free_mask)
    A = A.tocsc()
    Af = A[:, free_cols]
    Ap = A[:, fixed_cols]
    M = (Af.T @ Af).tocsc()
    rhs = -(Af.T @ (Ap @ fixed_x))
    x = np.empty(2 * V)
    x[fixed_cols] = fixed_x
    x[free_cols] = spla.splu(M).solve(rhs)
    return np.stack([x[:V], x[V:]], axis=1)


def repair_flips(uv: np.ndarray, vertices: np.ndarray, faces: np.ndarray,
                 topology: DiscTopology, max_rings: int = 64) -> tuple[np.ndarray, int]:
    """Untangle a few flipped triangles of an otherwise valid map by local Tutte solves.

    uv (V, 2), vertices (V, 3), faces (F, 3) -> (repaired uv (V, 2), rings used; -1 if
    still flipped). Around the flipped (or degenerate) triangles, the vertices within ``r``
    rings (r = 1, 2, 4, ... ``max_rings``) that are not on the outer ring are re-placed at the
    weighted average of their neighbours (the clamped-positive cotangent weights of
    :func:`harmonic_uv`), with everything else fixed (holes are filled with a virtual
    centre-vertex fan, as in :func:`harmonic_uv`, so hole loops can move); this is a convex
    combination map on a small patch whose fixed border is, in a map that is valid around
    the patch, close to convex, so the flips disappear while the rest of the map is
    untouched. Used after LSCM, whose area weighting lets tiny triangles fold.
    """
    f = np.asarray(faces, np.int64)
    V0 = len(uv)
    # work on the hole-filled disc: hole loops become interior, only the outer ring is fixed
    uv = np.concatenate([np.asarray(uv, np.float64)]
                        + [np.asarray(uv, np.float64)[h].mean(axis=0, keepdims=True)
                           for h in topology.holes])
    V = len(uv)
    p = np.asarray(vertices, np.float64)
    P = np.concatenate([p] + [p[h].mean(axis=0, keepdims=True) for h in topology.holes])
    adj = _clamped_cotan_weights(P, _fill_holes(f, topology))
    on_border = np.zeros(V, bool)
    on_border[topology.outer] = True

    def bad_triangles(x):
        a = signed_areas(x, f)
        major = 1.0 if (a > 0).sum() >= (a < 0).sum() else -1.0
        return np.flatnonzero((a * major <= DEGENERATE_FRACTION * np.abs(a).mean()))

    bad = bad_triangles(uv)
    if len(bad) == 0:
        return uv[:V0], 0
    rings = 1
    while rings <= max_rings:
        region = np.zeros(V, bool)
        region[f[bad].ravel()] = True
        for _ in range(rings):
            region |= (adj @ region.astype(np.float64)) > 0
        rings *= 2
        free = np.flatnonzero(region & ~on_border)
        if len(free) == 0:
            continue
        trial = uv.copy()
        A = adj[free][:, free]
        deg = np.asarray(adj[free].sum(axis=1)).ravel()
        fixed = np.ones(V, bool)
        fixed[free] = False
        B = adj[free][:, np.flatnonzero(fixed)]
        M = (sp.diags(deg) - A).tocsc()
        trial[free] = spla.splu(M).solve(B @ uv[fixed])
        if len(bad_triangles(trial)) == 0:
            return trial[:V0], rings // 2
    return uv[:V0], -1


def align_to_front(uv: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    """Similarity (rotation, uniform scale, reflection if needed) that best maps ``uv``
    onto the frontal projection ``vertices[:, :2]`` (least squares); returns mapped uv."""
    a = uv - uv.mean(0)
    b = np.asarray(vertices, np.float64)[:, :2]
    b = b - b.mean(0)
    U, S, Vt = np.linalg.svd(a.T @ b)
    R = U @ Vt  # orthogonal 2x2, reflection allowed
    scale = S.sum() / max((a * a).sum(), 1e-300)
    return scale * a @ R


def normalise_uv(uv: np.ndarray, margin: float) -> np.ndarray:
    """Uniformly scale and centre ``uv (V, 2)`` into ``[margin, 1 - margin]^2``."""
    if not 0 <= margin < 0.5:
        raise ValueError(f"margin must be in [0, 0.5), got {margin}")
    lo, hi = uv.min(0), uv.max(0)
    ext = float((hi - lo).max())
    if ext <= 0:
        raise ValueError("UVs have zero extent")
    s = (1 - 2 * margin) / ext
    return (uv - (lo + hi) / 2) * s + 0.5


@dataclass
class UnwrapStats:
    """Distortion of a UV map relative to the 3-D surface (area-weighted over triangles).

    The UVs are first scaled so their total area equals the surface's. ``angle_*`` is the
    conformal distortion ``sigma_max / sigma_min`` of each triangle's Jacobian (1 =
    angle-preserving); ``angle_error_*_deg`` the deviation of the corner angles in degrees;
    ``area_*`` the area ratio as ``max(r, 1/r)`` (1 = area-preserving).
    """

    n_triangles: int
    n_flipped: int
    n_degenerate: int
    angle_mean: float
    angle_max: float
    angle_error_mean_deg: float
    angle_error_max_deg: float
    area_mean: float
    area_max: float

    def as_dict(self) -> dict:
        return asdict(self)


def distortion(vertices: np.ndarray, faces: np.ndarray, uv: np.ndarray) -> UnwrapStats:
    """Angle / area distortion and flipped-triangle count of ``uv (V, 2)`` for the
    surface ``vertices (V, 3), faces (F, 3)``."""
    p = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    u = np.asarray(uv, np.float64)
    q, area3 = _local_frames(p, f)
    ok3 = area3 > 1e-12 * max(area3.max(), 1e-300)
    sa = signed_areas(u, f)
    n_flip = count_flipped(sa)
    n_degen = int((np.abs(sa) <= DEGENERATE_FRACTION * np.abs(sa).mean()).sum())
    u = u * np.sqrt(area3.sum() / max(np.abs(sa).sum(), 1e-300))
    t = u[f]
    # Jacobian J = [uv1 - uv0, uv2 - uv0] @ inv([q1 - q0, q2 - q0])
    D = np.stack([t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]], axis=2)  # (F, 2, 2) columns
    Q = np.stack([q[:, 1] - q[:, 0], q[:, 2] - q[:, 0]], axis=2)
    Q[~ok3] = np.eye(2)
    J = D @ np.linalg.inv(Q)
    sv = np.linalg.svd(J, compute_uv=False)
    smax, smin = sv[:, 0], np.maximum(sv[:, 1], 1e-300)
    conf = smax / smin
    ratio = np.abs(np.linalg.det(J))
    ratio = np.maximum(ratio, 1e-300)
    area_d = np.maximum(ratio, 1 / ratio)

    def angles(x):
        out = np.empty((len(x), 3))
        for k in range(3):
            e1 = x[:, (k + 1) % 3] - x[:, k]
            e2 = x[:, (k + 2) % 3] - x[:, k]
            c = (e1 * e2).sum(1) / np.maximum(np.linalg.norm(e1, axis=1) * np.linalg.norm(e2, axis=1), 1e-300)
            out[:, k] = np.degrees(np.arccos(np.clip(c, -1, 1)))
        return out

    ang_err = np.abs(angles(t) - angles(q)).mean(axis=1)
    w = np.where(ok3, area3, 0.0)
    w = w / max(w.sum(), 1e-300)
    conf_ok = np.where(ok3, conf, 1.0)
    return UnwrapStats(
        n_triangles=len(f), n_flipped=n_flip, n_degenerate=n_degen,
        angle_mean=float((w * conf_ok).sum()), angle_max=float(conf_ok.max()),
        angle_error_mean_deg=float((w * ang_err).sum()),
        angle_error_max_deg=float(np.where(ok3, ang_err, 0).max()),
        area_mean=float((w * np.where(ok3, area_d, 1.0)).sum()),
        area_max=float(np.where(ok3, area_d, 1.0).max()),
    )


@dataclass
class UnwrapResult:
    """A per-vertex UV map in ``[0, 1]^2`` with how it was obtained."""

    uv: np.ndarray  #: (V, 2) float32
    method: str  #: "source" | "harmonic" | "lscm"
    stats: UnwrapStats
    topology: DiscTopology
    notes: list[str] = field(default_factory=list)  #: why a method was rejected, ...


UNWRAP_METHODS = ("auto", "source", "harmonic", "lscm")


def unwrap(vertices: np.ndarray, faces: np.ndarray, source_uv: np.ndarray | None = None,
           method: str = "auto", margin: float = 0.02, path=None) -> UnwrapResult:
    """UV map of a disc-with-holes surface ``vertices (V, 3), faces (F, 3)``.

    ``method``: ``auto`` uses ``source_uv`` when :func:`check_uv` finds no problem (up to a
    uniform scale and translation into the margin box; no rotation), else
    LSCM, else (if LSCM flips a triangle) the harmonic map; ``source`` insists on the
    source UVs (InputError when invalid); ``harmonic`` / ``lscm`` compute that map.
    Computed maps are aligned with the front view (u ~ +x, v ~ +y) and scaled into
    ``[margin, 1 - margin]^2``. Raises InputError for a region that is not a disc, or
    when the result has flipped triangles.
    """
    if method not in UNWRAP_METHODS:
        raise ValueError(f"method must be one of {UNWRAP_METHODS}, got {method!r}")
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    topo = check_disc(v, f, path=path)
    notes: list[str] = []
    if method in ("auto", "source"):
        problems = check_uv(source_uv, f)
        if not problems:
            src = np.asarray(source_uv, np.float64)
            # keep the source's layout (no rotation), only fit it to the margin box: a face
            # in a corner of a whole-body atlas would waste the UV encoder's resolution
            uv = normalise_uv(src, margin).astype(np.float32)
            scale = float(np.ptp(uv, axis=0).max() / max(np.ptp(src, axis=0).max(), 1e-300))
            notes.append(f"source UVs scaled by {scale:.4g} and centred into "
                         f"[{margin:g}, {1 - margin:g}]^2")
            return UnwrapResult(uv, "source", distortion(v, f, uv), topo, notes)
        msg = "source UVs not used: " + "; ".join(problems)
        if method == "source":
            raise InputError(msg, path)
        notes.append(msg)
        log.info(msg)
    candidates = ["lscm", "harmonic"] if method == "auto" else [method]
    for name in candidates:
        raw = lscm_uv(v, f, topo) if name == "lscm" else harmonic_uv(v, f, topo)
        if name == "lscm":
            raw, rings = repair_flips(raw, v, f, topo)
            if rings > 0:
                notes.append(f"lscm: flipped triangles untangled by a local Tutte solve "
                             f"({rings} ring(s))")
        uv = normalise_uv(align_to_front(raw, v), margin).astype(np.float32)
        stats = distortion(v, f, uv)  # measured on the float32 UVs that will be stored
        if stats.n_flipped == 0 and stats.n_degenerate == 0:
            return UnwrapResult(uv.astype(np.float32), name, stats, topo, notes)
        msg = f"{name} unwrapping has {stats.n_flipped} flipped and {stats.n_degenerate} degenerate triangles"
        notes.append(msg)
        log.warning(msg)
    raise InputError("could not unwrap the face region without flipped triangles: " + "; ".join(notes), path)


# =========================================================================== point location
class UVLocator:
    """Point location in a triangulated UV domain.

    uv (V, 2), faces (F, 3). Built once: a uniform grid over the UV bounding box (about
    ``cells_per_triangle`` cells per triangle); each cell lists the triangles that
    overlap it (exact separating-axis test), the one containing the cell centre first.
    :meth:`locate` tests query points against their cell's candidates in a few batched
    passes. Points in no triangle (off the mask, in a hole, outside the grid) get
    ``inside=False`` and the nearest point of the nearest boundary edge (exact), as that
    edge's triangle with clamped barycentrics.
    """

    def __init__(self, uv: np.ndarray, faces: np.ndarray, cells_per_triangle: float = 2.0):
        uvd = np.asarray(uv, np.float64)
        f = np.asarray(faces, np.int64)
        if uvd.ndim != 2 or uvd.shape[1] != 2:
            raise ValueError(f"uv must have shape (V, 2), got {uvd.shape}")
        if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0 or f.min() < 0 or f.max() >= len(uvd):
            raise ValueError(f"faces must be (F, 3) indices into {len(uvd)} UVs")
        self.uv = uvd
        self.faces = f
        F = len(f)
        t = uvd[f]  # (F, 3, 2)
        # barycentric functions lambda_k(u, v) = a_k u + b_k v + c_k
        x0, y0 = t[:, 0, 0], t[:, 0, 1]
        d1, d2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
        det = d1[:, 0] * d2[:, 1] - d1[:, 1] * d2[:, 0]
        good = np.abs(det) > 1e-14 * max(float(np.abs(det).max()), 1e-300)
        inv = np.where(good, 1.0 / np.where(good, det, 1.0), 0.0)
        a1, b1 = d2[:, 1] * inv, -d2[:, 0] * inv
        a2, b2 = -d1[:, 1] * inv, d1[:, 0] * inv
        c1 = -(a1 * x0 + b1 * y0)
        c2 = -(a2 * x0 + b2 * y0)
        coef = np.stack([-a1 - a2, -b1 - b2, 1 - c1 - c2, a1, b1, c1, a2, b2, c2], axis=1)
        coef[~good] = np.array([0, 0, -1, 0, 0, -1, 0, 0, -1])  # never inside
        self._coef = coef  # (F, 9)
        # contiguous coefficient columns of lambda_1, lambda_2 for the query loop
        self._c = [np.ascontiguousarray(coef[:, j]) for j in range(3, 9)]

        # the grid covers the triangles and the unit square (where callers' queries live)
        lo = np.minimum(uvd[f.ravel()].min(0), 0.0)
        hi = np.maximum(uvd[f.ravel()].max(0), 1.0)
        ext = np.maximum(hi - lo, 1e-12)
        h = float(np.sqrt(ext[0] * ext[1] / (cells_per_triangle * F)))
        h = max(h, float(ext.max()) / 4096)
        nx, ny = int(np.ceil(ext[0] / h)) + 1, int(np.ceil(ext[1] / h)) + 1
        self._lo, self._h, self._n = lo, h, (nx, ny)

        tmin, tmax = t.min(axis=1), t.max(axis=1)
        i0 = np.clip(np.floor((tmin - lo) / h).astype(np.int64), 0, [nx - 1, ny - 1])
        i1 = np.clip(np.floor((tmax - lo) / h).astype(np.int64), 0, [nx - 1, ny - 1])
        span = i1 - i0 + 1
        cnt = span[:, 0] * span[:, 1]
        tri = np.repeat(np.arange(F), cnt)
        k = np.arange(len(tri)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
        cx = i0[tri, 0] + k % span[tri, 0]
        cy = i0[tri, 1] + k // span[tri, 0]
        # exact triangle / cell overlap: no barycentric function negative on the whole cell
        centre_u = lo[0] + (cx + 0.5) * h
        centre_v = lo[1] + (cy + 0.5) * h
        cf = coef[tri].reshape(-1, 3, 3)
        lam = cf[:, :, 0] * centre_u[:, None] + cf[:, :, 1] * centre_v[:, None] + cf[:, :, 2]
        reach = (np.abs(cf[:, :, 0]) + np.abs(cf[:, :, 1])) * (0.5 * h)
        keep = ((lam + reach) >= -1e-9).all(axis=1) & good[tri]
        tri, cx, cy, score = tri[keep], cx[keep], cy[keep], lam[keep].min(axis=1)
        cell = cy * nx + cx
        order = np.lexsort((-score, cell))
        self._cell_tri = tri[order]
        self._start = np.searchsorted(cell[order], np.arange(nx * ny + 1)).astype(np.int64)

        # boundary edges (undirected edges used by one triangle) for the off-mask fallback
        edges, face_edges, counts = unique_edges(f)
        fb, kb = np.nonzero(counts[face_edges] == 1)  # triangle, corner opposite the edge
        self._b_tri = fb
        self._b_a = f[fb, (kb + 1) % 3]
        self._b_b = f[fb, (kb + 2) % 3]
        self._b_ka, self._b_kb = (kb + 1) % 3, (kb + 2) % 3
        pa, pb = uvd[self._b_a], uvd[self._b_b]
        self._b_pa, self._b_dir = pa, pb - pa
        self._b_pax, self._b_pay = pa[:, 0].copy(), pa[:, 1].copy()
        self._b_dx, self._b_dy = (pb - pa)[:, 0].copy(), (pb - pa)[:, 1].copy()
        self._b_inv_len2 = 1.0 / np.maximum(((pb - pa) ** 2).sum(1), 1e-300)
        self._b_half = float(np.linalg.norm(pb - pa, axis=1).max()) / 2 if len(fb) else 0.0
        self._tree = None
        if len(fb):
            from scipy.spatial import cKDTree

            self._tree = cKDTree((pa + pb) / 2)
            self._build_boundary_lists()

    def _build_boundary_lists(self) -> None:
        """Per grid cell, every boundary edge that can be nearest to a point of the cell:
        with ``d`` (an upper bound of) the nearest-edge distance of the cell centre and ``r`` its half diagonal,
        a point of the cell has a nearest edge within ``d + r``, so within ``d + 2 r`` of
        the centre."""
        nx, ny = self._n
        h = self._h
        ix, iy = np.meshgrid(np.arange(nx), np.arange(ny), indexing="xy")
        centres = np.stack([self._lo[0] + (ix.ravel() + 0.5) * h,
                            self._lo[1] + (iy.ravel() + 0.5) * h], axis=1)  # cell = iy*nx+ix
        # an upper bound of the centre's nearest-edge distance suffices (any edge's distance)
        _, cand = self._tree.query(centres, k=min(8, len(self._b_tri)))
        cand = cand.reshape(len(centres), -1)
        d = self._segment_distance(centres[:, None, :], cand)[0].min(axis=1)
        reach = d + np.sqrt(2.0) * h * (1 + 1e-9) + 1e-12
        lists = self._tree.query_ball_point(centres, reach + self._b_half, return_sorted=False)
        lens = np.fromiter((len(x) for x in lists), np.int64, len(lists))
        cell = np.repeat(np.arange(len(lists)), lens)
        edge = np.fromiter((i for x in lists for i in x), np.int64, int(lens.sum()))
        de, _ = self._segment_distance(centres[cell], edge)
        keep = de <= reach[cell]
        cell, edge, de = cell[keep], edge[keep], de[keep]
        order = np.lexsort((de, cell))  # per cell, nearest to the centre first
        self._bcell_edge = edge[order]
        # a query of the cell is at least this far from the edge (for early termination)
        self._bcell_lower = de[order] - np.sqrt(0.5) * h * (1 + 1e-9) - 1e-12
        self._bstart = np.searchsorted(cell[order], np.arange(nx * ny + 1)).astype(np.int64)

    @property
    def n_triangles(self) -> int:
        return len(self.faces)

    def locate(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """q (N, 2) -> ``tri (N,) int64``, ``bary (N, 3) float64`` (non-negative, sum 1),
        ``inside (N,) bool``. Accepts numpy arrays or torch tensors (converted to numpy)."""
        if hasattr(q, "detach"):
            q = q.detach().cpu().numpy()
        q = np.asarray(q, np.float64)
        if q.ndim != 2 or q.shape[1] != 2:
            raise ValueError(f"query UVs must have shape (N, 2), got {q.shape}")
        N = len(q)
        qu = np.ascontiguousarray(q[:, 0])
        qv = np.ascontiguousarray(q[:, 1])
        tri = np.full(N, -1, np.int64)
        b1 = np.zeros(N)
        b2 = np.zeros(N)
        nx, ny = self._n
        fx = (qu - self._lo[0]) * (1.0 / self._h)
        fy = (qv - self._lo[1]) * (1.0 / self._h)
        ingrid = (fx >= 0) & (fx < nx) & (fy >= 0) & (fy < ny)  # False for NaN too
        cell = np.where(ingrid, fy, 0).astype(np.int64) * nx + np.where(ingrid, fx, 0).astype(np.int64)
        start = self._start[cell]
        count = self._start[cell + 1] - start
        count[~ingrid] = 0
        active = np.flatnonzero(count > 0)
        a1, bb1, c1, a2, bb2, c2 = self._c
        k = 0
        while len(active):
            t = self._cell_tri[start[active] + k]
            u, v = qu[active], qv[active]
            l1 = a1[t] * u + bb1[t] * v + c1[t]
            l2 = a2[t] * u + bb2[t] * v + c2[t]
            hit = (l1 >= -BARY_TOL) & (l2 >= -BARY_TOL) & (l1 + l2 <= 1 + BARY_TOL)
            idx = active[hit]
            tri[idx] = t[hit]
            b1[idx] = l1[hit]
            b2[idx] = l2[hit]
            k += 1
            miss = active[~hit]
            active = miss[count[miss] > k]
        bary = np.empty((N, 3))
        bary[:, 1] = np.maximum(b1, 0.0)
        bary[:, 2] = np.maximum(b2, 0.0)
        s12 = bary[:, 1] + bary[:, 2]
        over = s12 > 1  # rounding at an edge: renormalise onto it
        bary[over, 1:] /= s12[over, None]
        bary[:, 0] = 1.0 - bary[:, 1] - bary[:, 2]
        np.maximum(bary[:, 0], 0.0, out=bary[:, 0])
        inside = tri >= 0
        out = np.flatnonzero(~inside)
        if len(out):
            tri[out], bary[out] = self._nearest_boundary(q[out])
        return tri, bary, inside

    def _nearest_boundary(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest boundary-edge point for q (M, 2): (tri (M,), bary (M, 3)), exact."""
        M = len(q)
        nb = len(self._b_tri)
        if nb == 0:  # closed mesh: nothing is off it; answer the first triangle's centre
            return np.zeros(M, np.int64), np.full((M, 3), 1.0 / 3.0)
        q = np.where(np.isfinite(q), q, self._lo)  # NaN / inf queries: any answer, no crash
        nx, ny = self._n
        ix = np.floor((q[:, 0] - self._lo[0]) / self._h)
        iy = np.floor((q[:, 1] - self._lo[1]) / self._h)
        ingrid = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
        best_e = np.zeros(M, np.int64)
        best_t = np.zeros(M)
        g = np.flatnonzero(ingrid)
        if len(g):
            cell = (iy[g] * nx + ix[g]).astype(np.int64)
            start = self._bstart[cell]
            count = self._bstart[cell + 1] - start
            best_d = np.full(len(g), np.inf)
            active = np.arange(len(g))
            k = 0
            while len(active):
                e = self._bcell_edge[start[active] + k]
                d, t = self._segment_distance(q[g[active]], e)
                better = d < best_d[active]
                sel = active[better]
                best_d[sel], best_t[g[sel]], best_e[g[sel]] = d[better], t[better], e[better]
                k += 1
                active = active[count[active] > k]
                # later edges of the list are sorted by their lower bound: stop when none can win
                active = active[self._bcell_lower[start[active] + k] < best_d[active]]
        o = np.flatnonzero(~ingrid)
        if len(o):
            best_e[o], best_t[o] = self._nearest_kd(q[o])
        tri = self._b_tri[best_e]
        bary = np.zeros((M, 3))
        r = np.arange(M)
        bary[r, self._b_ka[best_e]] = 1 - best_t
        bary[r, self._b_kb[best_e]] = best_t
        return tri, bary

    def _nearest_kd(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Nearest boundary edge and segment parameter for q (M, 2) through the k-d tree of
        edge midpoints (exact: k grows until no edge beyond the k-th can be closer)."""
        M = len(q)
        nb = len(self._b_tri)
        best_e = np.zeros(M, np.int64)
        best_t = np.zeros(M)
        best_d = np.full(M, np.inf)
        todo = np.arange(M)
        k = min(8, nb)
        while len(todo):
            dist, cand = self._tree.query(q[todo], k=k)
            dist, cand = dist.reshape(len(todo), -1), cand.reshape(len(todo), -1)
            d, tt = self._segment_distance(q[todo][:, None, :], cand)
            j = np.argmin(d, axis=1)
            r = np.arange(len(todo))
            best_d[todo] = d[r, j]
            best_e[todo] = cand[r, j]
            best_t[todo] = tt[r, j]
            if k >= nb:
                break
            unsure = best_d[todo] > dist[:, -1] - self._b_half
            todo = todo[unsure]
            k = min(4 * k, nb)
        return best_e, best_t

    def _segment_distance(self, q: np.ndarray, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance from q (..., 2) to boundary edges e (...) and the closest point's segment
        parameter t in [0, 1]."""
        if e.ndim == 1:  # the hot path: flat arrays, no temporaries of shape (n, 2)
            pax, pay = self._b_pax[e], self._b_pay[e]
            dx, dy = self._b_dx[e], self._b_dy[e]
            rx, ry = q[:, 0] - pax, q[:, 1] - pay
            t = np.clip((rx * dx + ry * dy) * self._b_inv_len2[e], 0.0, 1.0)
            ex, ey = rx - t * dx, ry - t * dy
            return np.sqrt(ex * ex + ey * ey), t
        pa, dv = self._b_pa[e], self._b_dir[e]
        t = ((q - pa) * dv).sum(-1) / np.maximum((dv * dv).sum(-1), 1e-300)
        t = np.clip(t, 0.0, 1.0)
        d = np.linalg.norm(pa + t[..., None] * dv - q, axis=-1)
        return d, t


def interpolate(field, faces, tri, bary):
    """Barycentric interpolation of a per-vertex field.

    field (..., V, C), faces (F, 3), tri (N,), bary (N, 3) -> (..., N, C).
    Works on numpy arrays or torch tensors; with a torch ``field`` the result is a tensor
    on its device and dtype (differentiable in ``field``); ``faces``/``tri``/``bary`` may be
    numpy arrays.
    """
    if hasattr(field, "detach"):  # torch
        import torch

        dev = field.device
        faces_t = torch.as_tensor(np.asarray(faces) if not hasattr(faces, "detach") else faces,
                                  device=dev).long()
        tri_t = torch.as_tensor(np.asarray(tri) if not hasattr(tri, "detach") else tri, device=dev).long()
        bary_t = torch.as_tensor(np.asarray(bary) if not hasattr(bary, "detach") else bary,
                                 device=dev).to(field.dtype)
        if bary_t.shape != (tri_t.shape[0], 3):
            raise ValueError(f"bary must have shape ({tri_t.shape[0]}, 3), got {tuple(bary_t.shape)}")
        idx = faces_t[tri_t]  # (N, 3)
        out = field[..., idx[:, 0], :] * bary_t[:, 0:1]
        out = out + field[..., idx[:, 1], :] * bary_t[:, 1:2]
        out = out + field[..., idx[:, 2], :] * bary_t[:, 2:3]
        return out
    field = np.asarray(field)
    tri = np.asarray(tri, np.int64)
    bary = np.asarray(bary)
    if bary.shape != (len(tri), 3):
        raise ValueError(f"bary must have shape ({len(tri)}, 3), got {bary.shape}")
    idx = np.asarray(faces, np.int64)[tri]
    dt = np.result_type(field.dtype, np.float32) if field.dtype.kind != "f" else field.dtype
    b = bary.astype(dt, copy=False)
    out = field[..., idx[:, 0], :] * b[:, 0:1]
    out += field[..., idx[:, 1], :] * b[:, 1:2]
    out += field[..., idx[:, 2], :] * b[:, 2:3]
    return out

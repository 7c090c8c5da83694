"""Rigid / similarity alignment of scans to a reference face (numpy, pure functions).

* :func:`umeyama` — closed-form least-squares similarity between corresponding point sets
  (Umeyama 1991, "Least-squares estimation of transformation parameters between two point
  patterns"), optionally weighted and with or without scale.
* :func:`trimmed_icp` — iterative closest point against a triangle mesh with trimming
  (Chetverikov et al. 2002, "The trimmed iterative closest point algorithm"): each iteration
  keeps the ``1 - trim`` fraction of closest correspondences, so partial scans and outliers
  do not pull the alignment.
* :func:`initial_alignments` / :func:`align_to_reference` — a robust start without landmarks:
  centroids, principal axes (all proper sign choices) and a few rotations about the
  identity, each also centred on the halves of the reference (a partial scan's centroid is not
  the face's), screened by a very short trimmed ICP; the best few are refined further and the
  best trimmed error wins.

A :class:`Similarity` maps points ``p -> scale * R p + t``. Shapes: ``M`` points.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

#: rigid initialisation: candidates whose trimmed RMSE is within TIE_FACTOR x the best + TIE_MM
#: count as equally good (the least rotated of them is taken). Off (exact ties only): 1.25 x + 0.3 mm
#: put half-face scans upright but turned a correctly found 170-degree pose of a test scan away
#: (tests/test_fit.py::test_scan_with_landmarks_and_far_pose); the coarse candidates' RMSE does
#: not separate them reliably
TIE_FACTOR = 1.0
TIE_MM = 0.0
#: rigid initialisation without landmarks: every candidate gets SCREEN_ITERS nearest-vertex ICP
#: iterations on SCREEN_POINTS scan points; the SCREEN_KEEP best go on to COARSE_ITERS on
#: COARSE_POINTS (a half-face scan: the right pose is found from a half-centred candidate only,
#: benchmarks/README.md "Scan fits (issue 14)")
SCREEN_POINTS = 200
SCREEN_ITERS = 6
SCREEN_KEEP = 8
COARSE_POINTS = 800
COARSE_ITERS = 15


@dataclass
class Similarity:
    """``x -> scale * rotation @ x + translation``."""

    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))  #: (3, 3), det +1
    translation: np.ndarray = field(default_factory=lambda: np.zeros(3))  #: (3,)
    scale: float = 1.0

    def __post_init__(self) -> None:
        self.rotation = np.asarray(self.rotation, dtype=np.float64).reshape(3, 3)
        self.translation = np.asarray(self.translation, dtype=np.float64).reshape(3)
        self.scale = float(self.scale)

    def apply(self, points: np.ndarray) -> np.ndarray:
        """points: (..., 3) -> (..., 3) float64."""
        p = np.asarray(points, dtype=np.float64)
        return self.scale * p @ self.rotation.T + self.translation

    def apply_vectors(self, vectors: np.ndarray) -> np.ndarray:
        """Rotate direction vectors (e.g. normals): (..., 3) -> (..., 3)."""
        return np.asarray(vectors, dtype=np.float64) @ self.rotation.T

    def inverse(self) -> "Similarity":
        rt = self.rotation.T
        return Similarity(rt, -(rt @ self.translation) / self.scale, 1.0 / self.scale)

    def compose(self, first: "Similarity") -> "Similarity":
        """The map ``self(first(x))``."""
        return Similarity(
            self.rotation @ first.rotation,
            self.scale * self.rotation @ first.translation + self.translation,
            self.scale * first.scale,
        )

    def matrix(self) -> np.ndarray:
        """(4, 4) homogeneous matrix."""
        m = np.eye(4)
        m[:3, :3] = self.scale * self.rotation
        m[:3, 3] = self.translation
        return m

    def to_dict(self) -> dict:
        return {"rotation": self.rotation.tolist(), "translation": self.translation.tolist(),
                "scale": self.scale, "matrix": self.matrix().tolist()}


def rotation_angle(a: np.ndarray, b: np.ndarray | None = None) -> float:
    """Angle (degrees) of the rotation ``a @ b.T`` (of ``a`` alone when ``b`` is None)."""
    r = a if b is None else a @ np.asarray(b).T
    c = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(c)))


def umeyama(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None,
            with_scale: bool = True) -> Similarity:
    """Least-squares similarity ``T`` minimising ``sum_i w_i |T(src_i) - dst_i|^2``.

    src, dst: (M, 3) corresponding points (M >= 3, not collinear for a unique rotation);
    weights: (M,) >= 0 or None. Reflections are excluded (det R = +1).
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or src.shape[1] != 3 or src.shape != dst.shape:
        raise ValueError(f"src and dst must both have shape (M, 3), got {src.shape} and {dst.shape}")
    if len(src) < 3:
        raise ValueError(f"need at least 3 correspondences, got {len(src)}")
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != (len(src),) or (w < 0).any() or not w.sum() > 0:
        raise ValueError("weights must be (M,) non-negative with a positive sum")
    rot, trans, scale = _umeyama_batch(src[None], dst[None], with_scale, (w / w.sum())[None])
    return Similarity(rot[0], trans[0], scale[0])


def _umeyama_batch(src: np.ndarray, dst: np.ndarray, with_scale: bool, weights: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`umeyama` of B problems at once (no input checks): src, dst (B, K, 3), weights (B, K)
    summing to 1 per problem (None: equal) -> rotations (B, 3, 3), translations (B, 3), scales (B,)."""
    w = np.full(src.shape[:2], 1.0 / src.shape[1]) if weights is None else weights
    mu_s = (w[:, None] @ src)[:, 0]
    mu_d = (w[:, None] @ dst)[:, 0]
    xs = src - mu_s[:, None]
    xd = dst - mu_d[:, None]
    cov = (xd * w[..., None]).transpose(0, 2, 1) @ xs  # (B, 3, 3) = sum w d s^T
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones((len(src), 3))
    d[np.linalg.det(u) * np.linalg.det(vt) < 0, 2] = -1.0
    rot = (u * d[:, None, :]) @ vt
    if with_scale:
        var_s = np.einsum("bk,bk->b", w, (xs * xs).sum(axis=2))
        scale = np.where(var_s > 0, (sig * d).sum(axis=1) / np.where(var_s > 0, var_s, 1.0), 1.0)
    else:
        scale = np.ones(len(src))
    trans = mu_d - scale[:, None] * np.einsum("bij,bj->bi", rot, mu_s)
    return rot, trans, scale


@dataclass
class ICPResult:
    transform: Similarity  #: maps the moving points onto the reference
    rmse: float  #: RMS distance of the kept (trimmed) correspondences, mm
    iterations: int
    converged: bool
    inlier_fraction: float  #: kept fraction of points at the end


class _Reference:
    """Closest points on a reference: exact surface projection, or nearest vertex (fast, coarse)."""

    def __init__(self, vertices: np.ndarray, faces: np.ndarray | None, exact: bool = True):
        from scipy.spatial import cKDTree

        self.vertices = np.asarray(vertices, dtype=np.float64)
        self.faces = None if faces is None or len(faces) == 0 else np.asarray(faces)
        self.exact = exact and self.faces is not None
        self.tree = cKDTree(self.vertices)

    def closest(self, points: np.ndarray, max_distance: float | None = None):
        d, j = self.tree.query(points)
        if not self.exact:
            return d, self.vertices[j]
        from cm3dmm.geometry import closest_points_on_mesh

        proj = closest_points_on_mesh(points, self.vertices, self.faces, max_distance=max_distance)
        # points beyond max_distance only have an upper bound: keep the nearer nearest-vertex pair
        far = proj.dist > d
        closest = np.where(far[:, None], self.vertices[j], proj.closest)
        return np.minimum(proj.dist, d), closest


def trimmed_icp(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray | None,
                init: Similarity | None = None, trim: float = 0.1, max_iter: int = 40,
                tol: float = 1e-5, with_scale: bool = False,
                max_distance: float | None = None, exact: bool = True,
                reference: "_Reference | None" = None) -> ICPResult:
    """Align ``points`` (M, 3) to the surface (vertices (V, 3), faces (F, 3) or None for a
    point cloud) by trimmed point-to-point ICP, starting from ``init``.

    Each iteration finds closest surface points of the transformed points, drops the
    ``trim`` fraction with the largest distances (and those beyond ``max_distance``), and
    solves :func:`umeyama` on the rest. ``exact=False`` pairs points with the nearest reference
    vertex instead of the nearest surface point (coarse and fast). Stops when the trimmed RMSE changes by less than
    ``tol`` (relative) or after ``max_iter`` iterations. ``reference``: a prebuilt :class:`_Reference`
    of the same surface (many ICPs against one surface build its search tree once).
    """
    pts = np.asarray(points, dtype=np.float64)
    if not 0 <= trim < 1:
        raise ValueError(f"trim must be in [0, 1), got {trim}")
    cur = init if init is not None else Similarity()
    ref = reference if reference is not None else _Reference(vertices, faces, exact)
    keep_n = max(3, int(round(len(pts) * (1.0 - trim))))
    prev = np.inf
    rmse = np.inf
    frac = 1.0
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        moved = cur.apply(pts)
        # beyond a few times the current error a pair is trimmed anyway: bound the exact search
        bound = None if not np.isfinite(prev) else max(4.0 * prev, 2.0)
        dist, closest = ref.closest(moved, bound)
        order = np.argsort(dist)[:keep_n]
        if max_distance is not None:
            order = order[dist[order] <= max_distance]
            if len(order) < 3:
                order = np.argsort(dist)[:3]
        frac = len(order) / len(pts)
        rmse = float(np.sqrt(np.mean(dist[order] ** 2)))
        # incremental update on the kept pairs, composed onto the current transform
        step = umeyama(moved[order], closest[order], with_scale=with_scale)
        cur = step.compose(cur)
        if np.isfinite(prev) and abs(prev - rmse) <= tol * max(prev, 1e-12):
            converged = True
            break
        prev = rmse
    moved = cur.apply(pts)
    dist, _ = ref.closest(moved)
    kept = np.sort(dist)[:keep_n]
    rmse = float(np.sqrt(np.mean(kept ** 2)))
    return ICPResult(cur, rmse, it, converged, frac)


def _icp_batch(points: np.ndarray, inits: list[Similarity], ref: "_Reference", trim: float, iters: int,
               with_scale: bool) -> list[ICPResult]:
    """Nearest-vertex trimmed ICP (:func:`trimmed_icp` with ``exact=False``, no tolerance stop) of
    the same points from many starts at once: one search-tree query per iteration for all of them."""
    pts = np.asarray(points, dtype=np.float64)
    b, m = len(inits), len(pts)
    keep_n = max(3, int(round(m * (1.0 - trim))))
    rot = np.stack([t.rotation for t in inits])
    trans = np.stack([t.translation for t in inits])
    scale = np.array([t.scale for t in inits], dtype=np.float64)

    def moved_and_closest():
        moved = scale[:, None, None] * np.einsum("bij,mj->bmi", rot, pts) + trans[:, None, :]
        dist, j = ref.tree.query(moved.reshape(-1, 3))
        return moved, dist.reshape(b, m), ref.vertices[j].reshape(b, m, 3)

    rows = np.arange(b)[:, None]
    for _ in range(iters):
        moved, dist, closest = moved_and_closest()
        order = np.argpartition(dist, keep_n - 1, axis=1)[:, :keep_n] if keep_n < m else np.tile(np.arange(m), (b, 1))
        r, t, s = _umeyama_batch(moved[rows, order], closest[rows, order], with_scale)
        # compose the step onto the current transform
        trans = s[:, None] * np.einsum("bij,bj->bi", r, trans) + t
        rot = r @ rot
        scale = s * scale
    _, dist, _ = moved_and_closest()
    kept = np.sort(dist, axis=1)[:, :keep_n]
    rmse = np.sqrt((kept ** 2).mean(axis=1))
    return [ICPResult(Similarity(rot[k], trans[k], scale[k]), float(rmse[k]), iters, False, keep_n / m)
            for k in range(b)]


def _axis_rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.radians(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i] = c
    r[j, j] = c
    r[i, j] = -s
    r[j, i] = s
    return r


def principal_axes(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid (3,) and principal axes (3, 3) (columns, decreasing variance, det +1)."""
    p = np.asarray(points, dtype=np.float64)
    c = p.mean(axis=0)
    _, _, vt = np.linalg.svd(p - c, full_matrices=False)
    axes = vt.T
    if np.linalg.det(axes) < 0:
        axes[:, 2] *= -1
    return c, axes


def initial_alignments(points: np.ndarray, reference: np.ndarray, with_scale: bool = False,
                       angles: tuple[float, ...] = (30.0, 60.0), halves: bool = False) -> list[Similarity]:
    """Candidate similarities mapping ``points`` (M, 3) roughly onto ``reference`` (V, 3).

    Centroids are matched; the scale (when ``with_scale``) is the ratio of RMS radii. The
    rotations: the identity, rotations by ``angles`` about each axis (both signs), the four
    proper sign choices of the principal-axes alignment and a half turn about y. With ``halves``
    every rotation is repeated with the points' centroid put on the centroid of each half of the
    reference (split at its centroid along each principal axis; scale from that half's radius):
    a partial scan (one side of the face) covers one half, and ICP from the whole face's centroid
    does not slide it that far. The first candidates are those without ``halves``.
    """
    p = np.asarray(points, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    cp, ap = principal_axes(p)
    cr, ar = principal_axes(ref)
    rp = np.sqrt(((p - cp) ** 2).sum(axis=1).mean())

    def radius(part: np.ndarray, centre: np.ndarray) -> float:
        return float(np.sqrt(((part - centre) ** 2).sum(axis=1).mean()))

    targets = [(cr, radius(ref, cr))]
    if halves:
        for k in range(3):
            side = (ref - cr) @ ar[:, k]
            for part in (ref[side > 0], ref[side < 0]):
                if len(part) >= 3:
                    c = part.mean(axis=0)
                    targets.append((c, radius(part, c)))
    rots = [np.eye(3)]
    for axis in range(3):
        for a in angles:
            rots += [_axis_rotation(axis, a), _axis_rotation(axis, -a)]
    for signs in ((1, 1, 1), (-1, -1, 1), (-1, 1, -1), (1, -1, -1)):
        rots.append(ar @ np.diag(signs) @ ap.T)
    rots.append(_axis_rotation(1, 180.0))
    out = []
    for centre, rr in targets:
        scale = float(rr / rp) if with_scale and rp > 0 else 1.0
        out += [Similarity(r, centre - scale * r @ cp, scale) for r in rots]
    return out


def align_to_reference(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray | None,
                       trim: float = 0.1, with_scale: bool = False, init: Similarity | None = None,
                       max_points: int = 4000, seed: int = 0, refine_iters: int = 25) -> ICPResult:
    """Robust rigid (+ scale) alignment of ``points`` (M, 3) to a reference surface.

    Without ``init``: every :func:`initial_alignments` candidate (``halves`` on) gets a very short
    nearest-vertex trimmed ICP on :data:`SCREEN_POINTS` random points, the :data:`SCREEN_KEEP` best
    a longer one on :data:`COARSE_POINTS`; the lowest trimmed RMSE (least rotated among ties) is
    refined on at most ``max_points`` random points (at most ``refine_iters`` exact iterations).
    With ``init`` (e.g. from landmarks): only the refinement.
    """
    pts = np.asarray(points, dtype=np.float64)
    rng = np.random.default_rng(seed)
    sub = pts if len(pts) <= max_points else pts[rng.choice(len(pts), max_points, replace=False)]
    if init is None:
        coarse = sub if len(sub) <= COARSE_POINTS else sub[rng.choice(len(sub), COARSE_POINTS, replace=False)]
        screen = coarse if len(coarse) <= SCREEN_POINTS else coarse[rng.choice(len(coarse), SCREEN_POINTS,
                                                                                 replace=False)]
        near_ref = _Reference(vertices, None, exact=False)
        t_screen = max(trim, 0.2)
        cands = initial_alignments(sub, vertices, with_scale=with_scale, halves=True)
        screened = _icp_batch(screen, cands, near_ref, t_screen, SCREEN_ITERS, with_scale)
        order = sorted(range(len(cands)), key=lambda i: screened[i].rmse)[:SCREEN_KEEP]
        results = _icp_batch(coarse, [screened[i].transform for i in order], near_ref, t_screen, COARSE_ITERS,
                             with_scale)
        # a partial scan (half a face) fits a mirrored or turned-around placement about as well as
        # the right one; scanners deliver faces roughly upright, so among the candidates that fit
        # about equally well (TIE_FACTOR x the best trimmed RMSE + TIE_MM) the least rotated wins
        low = min(r.rmse for r in results)
        near = [r for r in results if r.rmse <= low * TIE_FACTOR + TIE_MM]
        best = min(near, key=lambda r: rotation_angle(r.transform.rotation))
        init = trimmed_icp(sub, vertices, faces, best.transform, trim=trim, max_iter=30, with_scale=with_scale,
                           exact=False, reference=near_ref).transform
        log.info("rigid init: best of %d candidates, trimmed RMSE %.3f mm", len(cands), best.rmse)
    return trimmed_icp(sub, vertices, faces, init, trim=trim, max_iter=refine_iters, with_scale=with_scale)

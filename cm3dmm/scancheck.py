"""Does a scan look like a face? The plausibility check of ``cm3dmm fit --scan``.

A scan that is not a face (a line of points, a plane, a cloud of noise, a ball) can always be
"fitted": the optimiser returns some face and a distance. :func:`check_scan` refuses such scans
with one line before the fit, from measures that hold for any real face scan, full or partial:

* **shape** (before alignment): the spread of the points along their principal axes. Points
  along a line (second axis < :data:`LINE_RATIO` of the first) or in a plane (third axis <
  :data:`PLANE_RATIO` of the first) are no face;
* **surface**: a scan samples a surface, so the k nearest neighbours of a point lie close to a
  plane; a cloud filling a volume (noise) does not (median of the smallest local covariance
  eigenvalue's share above :data:`VOLUME_SHARE`). Measured on at most :data:`LOCAL_POINTS` random
  points of the cloud, so that the neighbourhoods span a few millimetres whatever the scan's
  density: on all 2 million points of a dense face scan they span a fraction of a millimetre, the
  scanner's noise (0.3 mm) is as large as that and the surface read as a volume;
* **coverage** (after the rigid alignment to the model's mean face): the share of the mean
  face's vertices that have a scan point nearby (within :data:`COVERAGE_DISTANCE` of the mean
  face's RMS radius), and the share of scan points near the mean face. A face scan, even a
  profile or a frontal half, covers a good part of the face and lies on it where it overlaps.

Thresholds were set on the project's scans (the scan-fit table's full, frontal, side and
mouth-hole variants of test faces) and on non-faces (tests/test_prepare.py measures both).
"""

from __future__ import annotations

import numpy as np

from cm3dmm.errors import InputError

LINE_RATIO = 0.05  #: second principal spread / first below this: the points lie along a line
PLANE_RATIO = 0.03  #: third principal spread / first below this: the points lie in a plane
VOLUME_SHARE = 0.12  #: median smallest local eigenvalue / local trace above this: a volume, not a surface
NEIGHBOURS = 16  #: neighbours of the local surface test
SAMPLE = 2000  #: points of the local surface test and of the coverage test (random, seeded)
#: the local surface test's neighbours come from at most this many random points of the cloud.
#: Measured median local thickness (template mean face, noise per coordinate; a surface is < 0.12):
#: 2M points 0.3 / 1.0 mm noise 0.006 / 0.044 here (0.179 / 0.188 on all points); 20k points
#: 0.006 / 0.044 (0.017 / 0.112 on all); uniform noise in a 160 mm box 0.168-0.178 at 2k-2M points
LOCAL_POINTS = 5000
COVERAGE_DISTANCE = 0.1  #: a mean-face vertex is covered by a scan point within this x the face's RMS radius
MIN_COVERAGE = 0.3  #: share of the mean face's vertices that must be covered
MIN_ON_FACE = 0.25  #: share of (sampled) scan points that must lie near the mean face


def shape_problem(points: np.ndarray, seed: int = 0) -> str | None:
    """What makes ``points`` (M, 3) no face surface by shape alone (line, plane, volume), or None."""
    from scipy.spatial import cKDTree

    p = np.asarray(points, np.float64)
    c = p - p.mean(axis=0)
    s = np.linalg.svd(c[:: max(1, len(c) // 50000)], compute_uv=False)  # principal spreads
    s = s / max(s[0], 1e-300)
    if s[1] < LINE_RATIO:
        return (f"the scan's points lie along a line (spread across it {s[1]:.2g} of the spread along it): "
                "not a face surface")
    if s[2] < PLANE_RATIO:
        return (f"the scan's points lie in a plane (depth {s[2]:.2g} of the width, a face has about 0.3): "
                "not a face surface")
    if len(p) > NEIGHBOURS * 2:
        rng = np.random.default_rng(seed)
        loc = p[rng.choice(len(p), LOCAL_POINTS, replace=False)] if len(p) > LOCAL_POINTS else p
        q = loc[rng.choice(len(loc), SAMPLE, replace=False)] if len(loc) > SAMPLE else loc
        _, idx = cKDTree(loc).query(q, k=NEIGHBOURS + 1)
        nb = loc[idx] - loc[idx].mean(axis=1, keepdims=True)
        cov = np.einsum("nki,nkj->nij", nb, nb)
        ev = np.linalg.eigvalsh(cov)  # ascending
        share = float(np.median(ev[:, 0] / np.maximum(ev.sum(axis=1), 1e-300)))
        if share > VOLUME_SHARE:
            return (f"the scan's points fill a volume rather than sample a surface (local thickness "
                    f"{share:.2f}, a surface has under {VOLUME_SHARE}): noise, not a face scan")
    return None


def coverage(aligned: np.ndarray, vertices: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """(share of mean-face vertices with a scan point nearby, share of scan points near the mean face,
    the distance used, mm) for scan points ``aligned`` to the mean face ``vertices``."""
    from scipy.spatial import cKDTree

    v = np.asarray(vertices, np.float64)
    radius = float(np.sqrt(((v - v.mean(axis=0)) ** 2).sum(axis=1).mean()))
    tau = COVERAGE_DISTANCE * radius
    a = np.asarray(aligned, np.float64)
    d_v, _ = cKDTree(a).query(v, k=1)
    rng = np.random.default_rng(seed)
    q = a[rng.choice(len(a), SAMPLE, replace=False)] if len(a) > SAMPLE else a
    d_p, _ = cKDTree(v).query(q, k=1)
    # vertex spacing: a scan point between vertices is on the face when within tau + half an edge
    spacing = float(np.median(cKDTree(v).query(v, k=2)[0][:, 1]))
    return float((d_v <= tau).mean()), float((d_p <= tau + spacing).mean()), tau


def check_scan(scan, aligned: np.ndarray, vertices: np.ndarray, seed: int = 0) -> dict:
    """Refuse a scan that does not look like a face (:class:`InputError` naming its file); return the
    measures otherwise. ``scan``: a :class:`cm3dmm.fit.Scan` (its points, mm, and path);
    ``aligned``: its (sampled) points after the rigid alignment to the mean face ``vertices``."""
    problem = shape_problem(scan.points, seed)
    if problem:
        raise InputError(problem, scan.path)
    cov, on_face, tau = coverage(aligned, vertices, seed)
    if cov < MIN_COVERAGE or on_face < MIN_ON_FACE:
        raise InputError(f"the scan does not look like a face: after the best rigid alignment it covers "
                         f"{cov:.0%} of the mean face (at least {MIN_COVERAGE:.0%} needed) and {on_face:.0%} "
                         f"of its points lie within {tau:.1f} mm of it (at least {MIN_ON_FACE:.0%} needed)",
                         scan.path)
    return {"coverage": cov, "on_face": on_face, "distance_mm": tau}

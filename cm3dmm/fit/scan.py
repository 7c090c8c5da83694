"""Raw scans: reading (OBJ / PLY[.gz] meshes or point clouds), units, landmark files, and the
point-cloud helpers of the scan fit (spacing, normals estimated where queried, a KD-tree that
follows the scan's pose)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError
from cm3dmm.rigid import Similarity

log = logging.getLogger(__name__)

#: unit name -> factor to millimetres
UNIT_FACTORS = {"mm": 1.0, "cm": 10.0, "m": 1000.0}
#: a point cloud's normal at a point: the smallest principal axis of this many nearest neighbours
NORMAL_NEIGHBOURS = 12
#: random points whose nearest-neighbour distances give a point cloud's typical spacing
SPACING_SAMPLES = 500


@dataclass
class Scan:
    """A raw scan or point cloud (mm, its own frame) with optional normals and landmarks."""

    points: np.ndarray  #: (P, 3)
    faces: np.ndarray | None = None  #: (G, 3) or None for a point cloud
    normals: np.ndarray | None = None  #: (P, 3)
    landmarks: dict[str, np.ndarray] = field(default_factory=dict)  #: name -> (3,) mm, scan frame
    name: str = "scan"
    units: str = "mm"  #: the units the file was in
    path: str | None = None
    landmarks_path: str | None = None  #: the file the landmarks came from (named by their errors)


def resolve_units(points: np.ndarray, units: str, path=None) -> tuple[float, str]:
    """The factor to millimetres for a scan and the unit name.

    ``auto``: the unit (mm, cm, m) whose conversion makes the largest extent face-sized
    (:data:`cm3dmm.registered.PLAUSIBLE_EXTENT_MM`). An explicit unit whose result is not
    face-sized, or a scan no unit makes face-sized, is an :class:`InputError`.
    """
    from cm3dmm.registered import PLAUSIBLE_EXTENT_MM

    lo, hi = PLAUSIBLE_EXTENT_MM
    ext = float(np.ptp(points, axis=0).max())
    if units == "auto":
        for name in ("mm", "cm", "m"):
            if lo <= ext * UNIT_FACTORS[name] <= hi:
                if name != "mm":
                    log.info("%s: extent %.4g reads as %s (%.0f mm)", path or "scan", ext, name,
                             ext * UNIT_FACTORS[name])
                return UNIT_FACTORS[name], name
        raise InputError(f"the scan spans {ext:.4g} units, which is face-sized ({lo:.0f}-{hi:.0f} mm) in "
                         "none of mm, cm, m; is it a face scan?", path)
    if units not in UNIT_FACTORS:
        raise InputError(f"unknown units {units!r} (expected mm, cm, m or auto)", path)
    mm = ext * UNIT_FACTORS[units]
    if not lo <= mm <= hi:
        guess = [n for n in ("mm", "cm", "m") if lo <= ext * UNIT_FACTORS[n] <= hi]
        hint = f"; it looks like {guess[0]}: pass --units {guess[0]} (or auto)" if guess else ""
        raise InputError(f"read as {units}, the scan spans {mm:.4g} mm, implausible for a face "
                         f"({lo:.0f}-{hi:.0f} mm){hint}", path)
    return UNIT_FACTORS[units], units


def read_scan(path, units: str = "auto", landmarks: dict | None = None, landmarks_path=None) -> Scan:
    """Read an OBJ/PLY[.gz] scan or point cloud, validate it and convert it to mm."""
    from cm3dmm.io.mesh import read_mesh

    mesh = read_mesh(path)
    pts = np.asarray(mesh.vertices, np.float64)
    if len(pts) == 0:
        raise InputError("the scan contains no points", path)
    if not np.isfinite(pts).all():
        bad = int((~np.isfinite(pts).all(1)).sum())
        raise InputError(f"the scan has {bad} points with NaN or infinite coordinates", path)
    if len(pts) < 10:
        raise InputError(f"the scan has only {len(pts)} points (need at least 10)", path)
    if float(np.ptp(pts, axis=0).max()) == 0.0:
        raise InputError("all points of the scan coincide", path)
    factor, unit = resolve_units(pts, units, path)
    faces = np.asarray(mesh.faces) if len(mesh.faces) else None
    normals = None
    if mesh.normals is not None and np.isfinite(mesh.normals).all():
        nrm = np.linalg.norm(mesh.normals, axis=1, keepdims=True)
        normals = np.where(nrm > 0, mesh.normals / np.where(nrm > 0, nrm, 1), 0.0)
    lms = {k: np.asarray(v, np.float64) * factor for k, v in (landmarks or {}).items()}
    return Scan(pts * factor, faces, normals, lms, Path(path).name.split(".")[0], unit, str(path),
                None if landmarks_path is None else str(landmarks_path))



def read_scan_landmarks(path, n_scans: int, scan_paths: list[str]) -> list[dict]:
    """Landmarks of each scan from the user's JSON file (``--landmarks``): one mapping name ->
    [x, y, z] (one scan), a list of them (one per scan) or a mapping scan file -> mapping.
    Without a file: no landmarks."""
    if path is None:
        return [{} for _ in range(n_scans)]
    from cm3dmm.io.atomic import read_json

    p = Path(path)
    data = read_json(p, "landmarks file")

    def one(d):
        if not isinstance(d, dict):
            raise InputError("landmarks must be a mapping name -> [x, y, z]", p)
        out = {}
        for k, v in d.items():
            a = np.asarray(v, dtype=np.float64) if isinstance(v, (list, tuple)) else None
            if a is None or a.shape != (3,) or not np.isfinite(a).all():
                raise InputError(f"landmark {k!r} is not a finite [x, y, z]", p)
            out[str(k)] = a
        return out

    if isinstance(data, list):
        if len(data) != n_scans:
            raise InputError(f"{len(data)} landmark sets for {n_scans} scans", p)
        return [one(d) for d in data]
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        names = [Path(s).name for s in scan_paths]
        out = []
        for s, n in zip(scan_paths, names):
            key = next((k for k in (s, n, n.split(".")[0]) if k in data), None)
            out.append(one(data[key]) if key is not None else {})
        return out
    if n_scans != 1:
        raise InputError("one landmark set given for several scans; give a list or a mapping per scan file", p)
    return [one(data)]


def scan_spacing(scan: Scan, tree, rng: np.random.Generator, n: int = SPACING_SAMPLES) -> float:
    """Typical point spacing of a scan (mm): the median distance of ``n`` random points to their
    nearest neighbour (point clouds) or the median edge length (meshes)."""
    if scan.faces is not None:
        f = scan.faces
        return float(np.median(np.linalg.norm(scan.points[f[:, 0]] - scan.points[f[:, 1]], axis=1)))
    idx = rng.choice(len(scan.points), min(n, len(scan.points)), replace=False)
    return float(np.median(tree.query(scan.points[idx], k=2)[0][:, 1]))


class PosedCloud:
    """A KD-tree of a point cloud queried in the model frame (the cloud moves with its pose)."""

    def __init__(self, tree, pose: Similarity, normals: np.ndarray):
        self.tree, self.pose, self.inv, self._normals = tree, pose, pose.inverse(), normals

    def query(self, pts):
        d, j = self.tree.query(self.inv.apply(pts))
        return d * self.pose.scale, j

    def normals(self, j):
        return self.pose.apply_vectors(self._normals[j])


class CloudNormals:
    """Normals of a point cloud, given or estimated (:func:`cloud_normals`) only where asked for
    (a 2-million-point scan needs them at a few thousand points), and kept once estimated."""

    def __init__(self, points: np.ndarray, tree, given: np.ndarray | None = None):
        self.points, self.tree, self.given = points, tree, given
        if given is None:
            self.normals = np.zeros((len(points), 3))
            self.done = np.zeros(len(points), bool)

    def __getitem__(self, j: np.ndarray) -> np.ndarray:
        if self.given is not None:
            return self.given[j]
        todo = np.unique(j[~self.done[j]])
        if len(todo):
            self.normals[todo] = cloud_normals(self.points[todo], self.tree, reference=self.points)
            self.done[todo] = True
        return self.normals[j]


def cloud_normals(points: np.ndarray, tree, k: int = NORMAL_NEIGHBOURS,
                  reference: np.ndarray | None = None) -> np.ndarray:
    """Unoriented unit normals (P, 3) at ``points``: the smallest principal axis of their k nearest
    neighbours in ``reference`` (the cloud ``tree`` was built on; default ``points``)."""
    ref = points if reference is None else reference
    _, nb = tree.query(points, k=min(k, len(ref)))
    q = ref[nb] - ref[nb].mean(1, keepdims=True)  # (P, k, 3)
    _, vecs = np.linalg.eigh(np.einsum("pki,pkj->pij", q, q))
    return vecs[:, :, 0]


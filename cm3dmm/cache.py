"""The HDF5 sample cache (``cache/{split}.h5``): building, validating and reading it.

Per sample of one split (registered order) the cache holds the supervision points of the
continuous model (SEED.md, "Data"):

* **vertex samples** — every template vertex: its uv and average-face position are per-vertex
  constants, stored once (``template_uv``, ``template_avg``); per sample only a seeded
  shuffled vertex ``order`` and the target positions *in that order* are stored;
* **continuous samples** — ``n_continuous`` points drawn uniformly by area on the sample's
  surface (triangle id + barycentric), with uv, target xyz and average-face xyz; they are
  i.i.d., so their stored order is already a shuffled order;
* **held-out samples** (train split) — ``n_heldout`` more surface points drawn the same way,
  kept apart for validating continuity between samples; never returned by :meth:`read`;
* **scan samples** — when the sample has a scan, its points within ``scan_distance`` mm of
  the registered surface, each with the uv of its closest-point projection and the
  average-face position there; target = the scan point. Stored shuffled (ragged, one flat
  array with per-sample offsets) with ``point_index`` = the stored order of the scan points.

Layout (S samples, V vertices, N continuous, H held-out, T scan points in total)::

    template_uv (V, 2) f4, template_avg (V, 3) f4          per-vertex constants
    registered_index (S,) i8, subject, expression (S,) str, subject_index, expression_index (S,) i4
    vertex/order (S, V) i4, vertex/target (S, V, 3) f4       chunks (1, V[, 3])
    continuous/points (S, N, 8) f4 = [uv | target | avg], continuous/tri (S, N) i4,
        continuous/bary (S, N, 3) f4                         chunks (1, N, ...)
    heldout/points (S, H, 8), heldout/tri, heldout/bary      (train split, H > 0)
    scan/offset (S + 1,) i8, scan/points (T, 8), scan/dist, scan/tri, scan/bary,
        scan/point_index (T,) i8
    attrs: format_version, split, registered_hash, template_hash, counts, seed,
        scan_distance, content_hash

A batch of B faces x n points is, per face, one contiguous slice of each block (two when the
slice wraps around the end of the stored order), so reading is a few small reads per face.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError
from cm3dmm.geometry import barycentric_interpolate, closest_points_on_mesh, sample_surface
from cm3dmm.io.atomic import atomic_path
from cm3dmm.io.hdf5 import open_h5

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
KIND = "cm3dmm-sample-cache"
_SPLIT_CODE = {"train": 1, "test": 2}
#: channels of a packed point record: uv (2), target xyz (3), average-face xyz (3)
UV, TARGET, AVG = slice(0, 2), slice(2, 5), slice(5, 8)
POINT_CHANNELS = 8


# --------------------------------------------------------------------------- building
@dataclass
class CacheSummary:
    """What :func:`build_cache` wrote."""

    path: Path
    split: str
    n_samples: int
    n_vertices: int
    n_continuous: int
    n_heldout: int
    n_scan_points: int  #: kept scan points over all samples
    n_scans: int  #: samples with a scan
    content_hash: str


class _Hasher:
    """Incremental content hash over arrays (dtype, shape, bytes), like ``hash_arrays``."""

    def __init__(self):
        self._h = hashlib.sha256()

    def update(self, *arrays: np.ndarray) -> None:
        for a in arrays:
            a = np.ascontiguousarray(a)
            self._h.update(str(a.dtype).encode())
            self._h.update(str(a.shape).encode())
            self._h.update(a.tobytes())

    def hexdigest(self, extra: str = "") -> str:
        h = self._h.copy()
        h.update(extra.encode())
        return h.hexdigest()[:16]


def _pack(uv: np.ndarray, target: np.ndarray, avg: np.ndarray) -> np.ndarray:
    out = np.empty((len(uv), POINT_CHANNELS), np.float32)
    out[:, UV], out[:, TARGET], out[:, AVG] = uv, target, avg
    return out


def _surface_points(verts, faces, uv, mean, n, rng):
    """n area-weighted points on ``verts``: (tri, bary, packed (n, 8))."""
    tri, bary = sample_surface(verts, faces, n, rng)
    packed = _pack(
        barycentric_interpolate(uv, faces, tri, bary),
        barycentric_interpolate(verts, faces, tri, bary),
        barycentric_interpolate(mean, faces, tri, bary),
    )
    return tri, bary, packed


def _check_inputs(data, template, split: str, cfg) -> None:
    if split not in _SPLIT_CODE:
        raise InputError(f"unknown split {split!r} (expected one of {sorted(_SPLIT_CODE)})")
    V = data.n_vertices
    mean, faces, uv = (np.asarray(template.mean), np.asarray(template.faces), np.asarray(template.uv))
    if mean.shape != (V, 3) or uv.shape != (V, 2):
        raise InputError(
            f"the template has {len(mean)} vertices but the registered data has {V}: "
            "rerun the template stage")
    if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0 or faces.min() < 0 or faces.max() >= V:
        raise InputError("the template's faces do not index its vertices: rerun the template stage")
    if cfg.n_continuous <= 0 or cfg.n_heldout < 0 or cfg.scan_distance < 0:
        raise InputError(
            f"cache: n_continuous must be > 0, n_heldout and scan_distance >= 0 (got "
            f"{cfg.n_continuous}, {cfg.n_heldout}, {cfg.scan_distance})")
    if not len(data.indices(split)):
        raise InputError(f"the {split} split of the registered data is empty")


def build_cache(data, template, split: str, cfg, path: str | os.PathLike) -> CacheSummary:
    """Write the sample cache of one split to ``path`` (atomically).

    data: :class:`~cm3dmm.registered.RegisteredData`; template: a ``Template`` (uses
    ``mean`` (V, 3), ``faces`` (F, 3), ``uv`` (V, 2), ``hash``); cfg:
    :class:`~cm3dmm.config.CacheConfig`. Each sample's random draws come from its own
    generator seeded by ``(cfg.seed, split, registered index)``, so a sample's points do
    not depend on which other samples are in the split.
    """
    import h5py

    _check_inputs(data, template, split, cfg)
    path = Path(path)
    idx = data.indices(split)
    S, V = len(idx), data.n_vertices
    faces = np.asarray(template.faces, np.int64)
    uv_t = np.asarray(template.uv, np.float32)
    mean = np.asarray(template.mean, np.float32)
    N = int(cfg.n_continuous)
    H = int(cfg.n_heldout) if split == "train" else 0
    subjects = list(dict.fromkeys(data.subject[i] for i in idx))
    expressions = list(dict.fromkeys(data.expression[i] for i in idx))
    registered_hash = data.content_hash()
    template_hash = str(template.hash)
    hasher = _Hasher()
    str_dt = h5py.string_dtype("utf-8")
    n_scan_total = n_scans = 0

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h:
        h.create_dataset("template_uv", data=uv_t)
        h.create_dataset("template_avg", data=mean)
        h.create_dataset("registered_index", data=idx.astype(np.int64))
        h.create_dataset("subject", data=np.array([data.subject[i] for i in idx], dtype=object), dtype=str_dt)
        h.create_dataset("expression", data=np.array([data.expression[i] for i in idx], dtype=object),
                         dtype=str_dt)
        sub_i = np.array([subjects.index(data.subject[i]) for i in idx], np.int32)
        exp_i = np.array([expressions.index(data.expression[i]) for i in idx], np.int32)
        h.create_dataset("subject_index", data=sub_i)
        h.create_dataset("expression_index", data=exp_i)
        h.attrs["subjects"] = np.array(subjects, dtype=object)
        h.attrs["expressions"] = np.array(expressions, dtype=object)
        hasher.update(uv_t, mean, idx.astype(np.int64), sub_i, exp_i)

        v_order = h.create_dataset("vertex/order", (S, V), np.int32, chunks=(1, V))
        v_target = h.create_dataset("vertex/target", (S, V, 3), np.float32, chunks=(1, V, 3))
        blocks = {"continuous": N, "heldout": H}
        ds = {}
        for name, n in blocks.items():
            if n == 0:
                continue
            ds[name] = (
                h.create_dataset(f"{name}/points", (S, n, POINT_CHANNELS), np.float32,
                                 chunks=(1, n, POINT_CHANNELS)),
                h.create_dataset(f"{name}/tri", (S, n), np.int32, chunks=(1, n)),
                h.create_dataset(f"{name}/bary", (S, n, 3), np.float32, chunks=(1, n, 3)),
            )
        scan_parts: list[tuple] = []
        scan_offset = np.zeros(S + 1, np.int64)

        for s, ri in enumerate(idx):
            rng = np.random.default_rng([int(cfg.seed), _SPLIT_CODE[split], int(ri)])
            verts = np.asarray(data.vertices[ri], np.float32)
            order = rng.permutation(V).astype(np.int32)
            target = verts[order]
            v_order[s], v_target[s] = order, target
            hasher.update(order, target)
            for name, n in blocks.items():
                if n == 0:
                    continue
                tri, bary, packed = _surface_points(verts, faces, uv_t, mean, n, rng)
                ds[name][0][s], ds[name][1][s], ds[name][2][s] = packed, tri, bary
                hasher.update(packed, tri, bary)
            part = None
            if int(ri) in data.scans:
                part = _scan_points(data.scans[int(ri)][0], verts, faces, uv_t, mean,
                                    float(cfg.scan_distance), rng)
                n_scans += 1
                log.info("sample %d (%s/%s): kept %d of %d scan points within %.3g mm", int(ri),
                         data.subject[ri], data.expression[ri], len(part[0]),
                         len(data.scans[int(ri)][0]), cfg.scan_distance)
            n_kept = 0 if part is None else len(part[0])
            scan_offset[s + 1] = scan_offset[s] + n_kept
            if n_kept:
                scan_parts.append(part)
                hasher.update(*part)

        T = int(scan_offset[-1])
        n_scan_total = T
        h.create_dataset("scan/offset", data=scan_offset)
        hasher.update(scan_offset)
        names = ("points", "dist", "tri", "bary", "point_index")
        empties = (np.zeros((0, POINT_CHANNELS), np.float32), np.zeros(0, np.float32),
                   np.zeros(0, np.int32), np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
        for j, name in enumerate(names):
            arr = np.concatenate([p[j] for p in scan_parts]) if scan_parts else empties[j]
            h.create_dataset(f"scan/{name}", data=arr, chunks=True if T else None)

        meta = {
            "kind": KIND, "format_version": FORMAT_VERSION, "split": split,
            "registered_hash": registered_hash, "template_hash": template_hash,
            "n_samples": S, "n_vertices": V, "n_continuous": N, "n_heldout": H,
            "n_scan_points": T, "n_scans": n_scans, "seed": int(cfg.seed),
            "scan_distance": float(cfg.scan_distance),
        }
        content = hasher.hexdigest(repr(sorted(meta.items())))
        for key, val in meta.items():
            h.attrs[key] = val
        h.attrs["content_hash"] = content
    log.info("wrote %s: %d samples x (%d vertex + %d continuous + %d held-out points), %d scan points",
             path, S, V, N, H, n_scan_total)
    return CacheSummary(path, split, S, V, N, H, n_scan_total, n_scans, content)


def _scan_points(points, verts, faces, uv_t, mean, max_dist, rng):
    """Scan points within ``max_dist`` of the registered surface, shuffled.

    Returns (packed (P, 8), dist (P,), tri (P,), bary (P, 3), point_index (P,)).
    """
    pts = np.asarray(points, np.float64)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise InputError(f"a scan must be an array of points (P, 3), got shape {pts.shape}")
    if not len(pts):
        keep = np.zeros(0, np.int64)
        proj = None
    else:
        proj = closest_points_on_mesh(pts, verts, faces, max_distance=max_dist)
        keep = np.flatnonzero(proj.dist <= max_dist)
    keep = keep[rng.permutation(len(keep))]
    if proj is None or not len(keep):
        return (np.zeros((0, POINT_CHANNELS), np.float32), np.zeros(0, np.float32),
                np.zeros(0, np.int32), np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
    tri, bary = proj.tri[keep], proj.bary[keep].astype(np.float32)
    packed = _pack(
        barycentric_interpolate(uv_t, faces, tri, bary),
        pts[keep].astype(np.float32),
        barycentric_interpolate(mean, faces, tri, bary),
    )
    return packed, proj.dist[keep].astype(np.float32), tri.astype(np.int32), bary, keep.astype(np.int64)


def run_cache(cfg) -> list[CacheSummary]:
    """The ``cache_samples`` stage: build ``cache/train.h5`` and ``cache/test.h5`` of a run.

    Reads the run's ``registered.h5`` and ``template.npz``; a template built from other
    registered data is an :class:`InputError` (rerun the template stage).
    """
    from cm3dmm.paths import RunPaths
    from cm3dmm.registered import read_registered
    from cm3dmm.template import load_template

    paths = RunPaths.of(cfg.run_dir)
    data = read_registered(paths.registered)
    template = load_template(paths.template)
    if str(template.source_hash) != data.content_hash():
        raise InputError(
            f"the template was built from other registered data (source hash "
            f"{template.source_hash}, registered.h5 has {data.content_hash()}): rerun the template stage",
            paths.template)
    return [build_cache(data, template, split, cfg.cache, paths.cache(split)) for split in ("train", "test")]


# --------------------------------------------------------------------------- reading
_REQUIRED = ("template_uv", "template_avg", "registered_index", "subject", "expression",
             "subject_index", "expression_index", "vertex/order", "vertex/target",
             "continuous/points", "continuous/tri", "continuous/bary", "scan/offset", "scan/points")


def _ring_slices(start: int, n: int, length: int) -> list[tuple[int, int, int]]:
    """Positions ``(start + arange(n)) % length`` as contiguous runs (src_a, src_b, dst_a)."""
    out, done = [], 0
    pos = start % length if length else 0
    while done < n:
        take = min(n - done, length - pos)
        out.append((pos, pos + take, done))
        done += take
        pos = 0
    return out


class SampleCache:
    """Read-only access to a ``cache/{split}.h5``.

    ``template_hash`` / ``registered_hash``: when given, a cache built from anything else is
    an :class:`InputError`. A missing, truncated (HDF5 records its end of file) or corrupt
    file, or one of another format version, is an :class:`InputError` naming the file, at
    open or at the first read that meets the damage. :meth:`verify` re-hashes everything and
    also catches damaged bytes that still parse.
    """

    def __init__(self, path: str | os.PathLike, template_hash: str | None = None,
                 registered_hash: str | None = None):
        self.path = Path(path)
        self._h = open_h5(self.path, "sample cache")
        try:
            self._validate(template_hash, registered_hash)
        except BaseException:
            self._h.close()
            raise

    # ---- integrity
    def _fail(self, problem: str) -> InputError:
        return InputError(problem, self.path)

    def _validate(self, template_hash, registered_hash) -> None:
        h = self._h
        a = h.attrs
        if a.get("kind") != KIND:
            raise self._fail("not a cm3dmm sample cache (rerun cache_samples)")
        if int(a.get("format_version", -1)) != FORMAT_VERSION:
            raise self._fail(f"cache format_version {a.get('format_version')} is not {FORMAT_VERSION}: "
                             "rerun cache_samples")
        if template_hash is not None and str(a["template_hash"]) != str(template_hash):
            raise self._fail(f"built from another template (template hash {a['template_hash']}, "
                             f"expected {template_hash}): rerun cache_samples")
        if registered_hash is not None and str(a["registered_hash"]) != str(registered_hash):
            raise self._fail(f"built from other registered data (hash {a['registered_hash']}, "
                             f"expected {registered_hash}): rerun cache_samples")
        try:
            for name in _REQUIRED:
                if name not in h:
                    raise self._fail(f"missing dataset '{name}': the file is incomplete, rerun cache_samples")
            self.split = str(a["split"])
            self.n_samples = int(a["n_samples"])
            self.n_vertices = int(a["n_vertices"])
            self.n_continuous = int(a["n_continuous"])
            self.n_heldout = int(a["n_heldout"])
            self.registered_hash = str(a["registered_hash"])
            self.template_hash = str(a["template_hash"])
            self.content_hash = str(a["content_hash"])
            S, V, N = self.n_samples, self.n_vertices, self.n_continuous
            expect = {"vertex/order": (S, V), "vertex/target": (S, V, 3),
                      "continuous/points": (S, N, POINT_CHANNELS), "template_uv": (V, 2),
                      "template_avg": (V, 3), "registered_index": (S,), "scan/offset": (S + 1,)}
            for name, shape in expect.items():
                if h[name].shape != shape:
                    raise self._fail(f"dataset '{name}' has shape {h[name].shape}, expected {shape}")
            self.template_uv = h["template_uv"][()]
            self.template_avg = h["template_avg"][()]
            self.registered_index = h["registered_index"][()]
            dec = lambda ds: [x.decode() if isinstance(x, bytes) else str(x) for x in ds[()]]  # noqa: E731
            self.subject = dec(h["subject"])
            self.expression = dec(h["expression"])
            self.subject_index = h["subject_index"][()]
            self.expression_index = h["expression_index"][()]
            self.subjects = [x.decode() if isinstance(x, bytes) else str(x) for x in a["subjects"]]
            self.expressions = [x.decode() if isinstance(x, bytes) else str(x) for x in a["expressions"]]
            self.scan_offset = h["scan/offset"][()]
        except InputError:
            raise
        except Exception as exc:  # truncated data, wrong dtypes, missing attributes
            raise self._fail(f"sample cache is corrupt ({str(exc)[:160]}): rerun cache_samples") from None
        self._vo, self._vt = h["vertex/order"], h["vertex/target"]
        self._cp = h["continuous/points"]
        self._sp = h["scan/points"]

    def verify(self) -> None:
        """Re-hash every stored array and compare with ``content_hash`` (reads the whole file)."""
        h, hasher = self._h, _Hasher()
        try:
            hasher.update(self.template_uv, self.template_avg, self.registered_index,
                          self.subject_index, self.expression_index)
            names = [n for n in ("continuous", "heldout") if n in h]
            for s in range(self.n_samples):
                hasher.update(self._vo[s], self._vt[s])
                for n in names:
                    hasher.update(h[f"{n}/points"][s], h[f"{n}/tri"][s], h[f"{n}/bary"][s])
                a, b = self.scan_offset[s], self.scan_offset[s + 1]
                if b > a:
                    hasher.update(*(h[f"scan/{k}"][a:b] for k in ("points", "dist", "tri", "bary",
                                                                  "point_index")))
            hasher.update(self.scan_offset)
        except Exception as exc:
            raise self._fail(f"sample cache is corrupt ({str(exc)[:160]}): rerun cache_samples") from None
        meta = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self._h.attrs.items()
                if k not in ("content_hash", "subjects", "expressions")}
        if hasher.hexdigest(repr(sorted(meta.items()))) != self.content_hash:
            raise self._fail("content hash does not match the stored hash: the file is corrupt, "
                             "rerun cache_samples")

    # ---- properties
    @property
    def has_scan(self) -> np.ndarray:
        """(S,) bool: samples with at least one kept scan point."""
        return np.diff(self.scan_offset) > 0

    def __len__(self) -> int:
        return self.n_samples

    def close(self) -> None:
        self._h.close()

    def __enter__(self) -> "SampleCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reading
    def _indices(self, indices) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n_samples):
            raise ValueError(f"sample index out of range [0, {self.n_samples})")
        return idx

    def read(self, indices, n_vertex: int, n_continuous: int, offset: int = 0,
             continuous: str = "surface") -> dict[str, np.ndarray]:
        """Points of the samples ``indices``: vertex points first, then continuous points.

        Returns ``uv`` (B, n, 2), ``target`` (B, n, 3), ``avg`` (B, n, 3) float32 with
        ``n = n_vertex + n_continuous``, and ``index`` (B,) int64 (the cache indices).
        Each block is the slice ``[offset * n_block, (offset + 1) * n_block)`` of the sample's
        stored shuffled order, modulo the stored count: offsets 0, 1, 2, ... (e.g. epochs)
        walk through all stored points before any repeats. ``n_vertex`` must be <=
        ``n_vertices`` and ``n_continuous`` <= the stored count.

        ``continuous="scan"`` takes the continuous block from the sample's kept scan points
        (cycling when it has fewer than ``n_continuous``), and from its surface points when
        it has none.
        """
        idx = self._indices(indices)
        if not 0 <= n_vertex <= self.n_vertices:
            raise ValueError(f"n_vertex must be in [0, {self.n_vertices}], got {n_vertex}")
        if not 0 <= n_continuous <= self.n_continuous:
            raise ValueError(f"n_continuous must be in [0, {self.n_continuous}], got {n_continuous}")
        if continuous not in ("surface", "scan"):
            raise ValueError(f"continuous must be 'surface' or 'scan', got {continuous!r}")
        B, n = len(idx), n_vertex + n_continuous
        uv = np.empty((B, n, 2), np.float32)
        target = np.empty((B, n, 3), np.float32)
        avg = np.empty((B, n, 3), np.float32)
        v_runs = _ring_slices(offset * n_vertex, n_vertex, self.n_vertices)
        c_runs = _ring_slices(offset * n_continuous, n_continuous, self.n_continuous)
        V = self.n_vertices
        try:
            for b, s in enumerate(idx):
                for a, e, d in v_runs:
                    order = self._vo[s, a:e]
                    if order.min() < 0 or order.max() >= V:
                        raise self._fail("sample cache is corrupt (vertex order out of range): "
                                         "rerun cache_samples")
                    target[b, d:d + e - a] = self._vt[s, a:e]
                    np.take(self.template_uv, order, axis=0, out=uv[b, d:d + e - a])
                    np.take(self.template_avg, order, axis=0, out=avg[b, d:d + e - a])
                lo, hi = int(self.scan_offset[s]), int(self.scan_offset[s + 1])
                if continuous == "scan" and hi > lo and n_continuous:
                    runs = [(lo + a, lo + e, d) for a, e, d in _ring_slices(offset * n_continuous, n_continuous,
                                                                             hi - lo)]
                    src = self._sp
                    rows = lambda a, e: src[a:e]  # noqa: E731
                else:
                    runs, src = c_runs, self._cp
                    rows = lambda a, e: src[s, a:e]  # noqa: E731
                for a, e, d in runs:
                    p = rows(a, e)
                    dst = slice(n_vertex + d, n_vertex + d + e - a)
                    uv[b, dst], target[b, dst], avg[b, dst] = p[:, UV], p[:, TARGET], p[:, AVG]
        except InputError:
            raise
        except Exception as exc:
            raise self._fail(f"sample cache is corrupt ({str(exc)[:160]}): rerun cache_samples") from None
        return {"uv": uv, "target": target, "avg": avg, "index": idx}

    def vertex_order(self, i: int) -> np.ndarray:
        """(V,) the stored shuffled vertex order of sample ``i``."""
        return self._vo[int(self._indices(i)[0])]

    def _block(self, name: str, indices) -> dict[str, np.ndarray]:
        idx = self._indices(indices)
        h = self._h
        if name not in h:
            raise ValueError(f"{self.path}: the {self.split} cache has no {name} points")
        try:
            pts = np.stack([h[f"{name}/points"][s] for s in idx]) if len(idx) else \
                np.zeros((0,) + h[f"{name}/points"].shape[1:], np.float32)
            tri = np.stack([h[f"{name}/tri"][s] for s in idx]) if len(idx) else np.zeros((0, 0), np.int32)
            bary = np.stack([h[f"{name}/bary"][s] for s in idx]) if len(idx) else np.zeros((0, 0, 3), np.float32)
        except Exception as exc:
            raise self._fail(f"sample cache is corrupt ({str(exc)[:160]}): rerun cache_samples") from None
        return {"uv": pts[..., UV].copy(), "target": pts[..., TARGET].copy(), "avg": pts[..., AVG].copy(),
                "tri": tri, "bary": bary, "index": idx}

    def continuous_points(self, indices) -> dict[str, np.ndarray]:
        """All stored continuous points (stored order): uv, target, avg (B, N, .), tri (B, N),
        bary (B, N, 3), index (B,)."""
        return self._block("continuous", indices)

    def heldout(self, indices) -> dict[str, np.ndarray]:
        """The held-out surface points (train split): uv, target, avg (B, H, .), tri (B, H),
        bary (B, H, 3), index (B,). Never part of :meth:`read`."""
        return self._block("heldout", indices)

    def scan(self, i: int) -> dict[str, np.ndarray]:
        """Sample ``i``'s kept scan points (stored shuffled order): uv (P, 2), target (P, 3),
        avg (P, 3), dist (P,), tri (P,), bary (P, 3), point_index (P,) into the scan's points."""
        s = int(self._indices(i)[0])
        a, b = int(self.scan_offset[s]), int(self.scan_offset[s + 1])
        h = self._h
        try:
            pts = h["scan/points"][a:b]
            out = {k: h[f"scan/{k}"][a:b] for k in ("dist", "tri", "bary", "point_index")}
        except Exception as exc:
            raise self._fail(f"sample cache is corrupt ({str(exc)[:160]}): rerun cache_samples") from None
        out.update(uv=pts[:, UV].copy(), target=pts[:, TARGET].copy(), avg=pts[:, AVG].copy())
        return out

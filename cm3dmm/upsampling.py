"""The semantic-upsampling experiment: coarse vertex subsets of the template, the models trained on
them (rule ``train_upsampling``) and the fits with them (rule ``fit_upsampling``).

    run_train_upsampling(cfg, fraction)       -> models/cm3dmm_frac{f}/model.pt
    run_fit_upsampling(cfg, method, fraction) -> fits/{method}_frac{f}/{subject}.npz|json|png

(Not to be confused with :mod:`cm3dmm.upsample`: the template's subdivision levels.)

The experiment (``tables/upsampling``): every method sees only a fraction ``f`` of the template's
vertices — in training and in fitting — and is evaluated at *every* vertex, so the other
``(1 - f) V`` vertices play the role of the denser points the paper's semantic upsampling
produces (points nobody registered), with ground truth.

The coarse mesh (:func:`make_coarse`):

1. ``K = max(3, ceil(f V))`` vertices chosen by farthest-point sampling on the template's
   mean face (3-D Euclidean distances, deterministic, starting at the vertex nearest the centroid
   of the mean face); ``f = 1`` keeps every vertex and the template's own triangles;
2. triangulated by a Delaunay triangulation of their template UVs, keeping the triangles whose
   UV centroid lies on the template's UV chart (so no triangle spans a concave part of the chart
   or a hole);
3. every template vertex is located on this coarse mesh in UV (triangle + barycentrics; a vertex
   outside the coarse triangles takes the nearest point of its boundary, the template's rule).

The continuous model of fraction ``f`` (:func:`run_train_upsampling`, ``models/cm3dmm_frac{f}/``)
is trained with the coarse mesh as its template — so its average face ``avg(uv)`` is the coarse
mean interpolated in the coarse triangles, exactly what the baselines interpolate — on vertex
samples of the kept vertices only (no continuous surface samples: they would reveal the unseen
geometry). Its validation error is measured at the same kept vertices of the training faces (the
unseen vertices are never looked at before evaluation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError
from cm3dmm.geometry import boundary_vertices, even_indices
from cm3dmm.paths import MAIN, RunPaths, default_pca_dim, fraction_method, fraction_tag

log = logging.getLogger(__name__)

__all__ = ["Coarse", "farthest_point_sample", "make_coarse", "fraction_tag", "fraction_method",
           "VertexSubsetCache", "run_train_upsampling", "run_fit_upsampling"]


def farthest_point_sample(points: np.ndarray, k: int, start: int | None = None) -> np.ndarray:
    """Greedy farthest-point sampling. points (V, D), k <= V -> (k,) int64 indices (first = start).

    ``start`` defaults to the point nearest the centroid. Ties go to the lowest index.
    """
    p = np.asarray(points, np.float64)
    if p.ndim != 2 or len(p) == 0:
        raise ValueError(f"points must have shape (V, D), got {p.shape}")
    n = len(p)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    if start is None:
        start = int(np.argmin(np.linalg.norm(p - p.mean(0), axis=1)))
    out = np.empty(k, np.int64)
    out[0] = start
    d = np.linalg.norm(p - p[start], axis=1)
    for i in range(1, k):
        nxt = int(np.argmax(d))
        out[i] = nxt
        d = np.minimum(d, np.linalg.norm(p - p[nxt], axis=1))
    return out


@dataclass
class Coarse:
    """A coarse vertex subset of a template and where every template vertex lies on it."""

    fraction: float
    kept: np.ndarray  #: (K,) int64 template vertex ids, sorted
    faces: np.ndarray  #: (G, 3) int32 coarse triangles (indices into ``kept``)
    tri: np.ndarray  #: (V,) int64 coarse triangle of each template vertex
    bary: np.ndarray  #: (V, 3) float64 its barycentrics (non-negative, sum 1)
    inside: np.ndarray  #: (V,) bool: inside a coarse triangle (False: nearest boundary point)
    template: object  #: :class:`cm3dmm.template.Template` over the K kept vertices

    @property
    def n_kept(self) -> int:
        return int(len(self.kept))

    @property
    def unseen(self) -> np.ndarray:
        """(V,) bool: template vertices not in the subset."""
        m = np.ones(len(self.tri), bool)
        m[self.kept] = False
        return m

    def interpolate(self, coarse_values: np.ndarray) -> np.ndarray:
        """Values at the kept vertices (..., K, C) -> at every template vertex (..., V, C)."""
        c = np.asarray(coarse_values)
        corners = c[..., self.faces[self.tri], :]  # (..., V, 3, C)
        return np.einsum("...vkc,vk->...vc", corners, self.bary)


def make_coarse(template, fraction: float) -> Coarse:
    """The coarse subset of ``template`` keeping ``fraction`` of its vertices (module docstring)."""
    from scipy.spatial import Delaunay

    from cm3dmm.template import Template
    from cm3dmm.upsample import subdivide
    from cm3dmm.uv import UVLocator

    if not 0 < fraction <= 1:
        raise InputError(f"evaluate.upsampling_fractions: {fraction} is not in (0, 1]")
    mean = np.asarray(template.mean, np.float64)
    uv = np.asarray(template.uv, np.float64)
    V = len(mean)
    k = V if fraction >= 1 else max(3, int(math.ceil(fraction * V)))
    if k >= V:
        kept = np.arange(V, dtype=np.int64)
        faces = np.asarray(template.faces, np.int32)
    else:
        kept = np.sort(farthest_point_sample(mean, k))
        tri = Delaunay(uv[kept]).simplices.astype(np.int64)
        centroid = uv[kept][tri].mean(axis=1)
        _, _, on_chart = template.locator.locate(centroid)
        faces = tri[on_chart]
        # counter-clockwise in UV, like the template's own triangles
        a, b, c = (uv[kept][faces[:, i]] for i in range(3))
        area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
        ref = _orientation(template)
        flip = np.sign(area) != ref
        faces[flip] = faces[flip][:, [0, 2, 1]]
        faces = faces.astype(np.int32)
        if len(faces) == 0:
            raise InputError(f"the vertex fraction {fraction} leaves no coarse triangle on the face")
    loc = UVLocator(uv[kept], faces)
    ctri, cbary, inside = loc.locate(uv)
    cuv = uv[kept].astype(np.float32)
    regions = np.asarray(template.regions)[kept]
    sub = Template(
        mean=mean[kept].astype(np.float32), faces=faces, uv=cuv, boundary=np.flatnonzero(boundary_vertices(faces)),
        mask=np.asarray(template.mask), levels=[subdivide(faces, len(kept), 0, cuv)],
        regions=regions, region_names=list(template.region_names),
        landmarks={},
        source_hash=str(getattr(template, "source_hash", "")),
        unwrap_method=f"subset:{fraction_tag(fraction)}",
    )
    sub.__dict__["locator"] = loc
    sub.hash = sub.compute_hash()
    return Coarse(fraction=float(fraction), kept=kept, faces=faces, tri=ctri, bary=cbary, inside=inside,
                  template=sub)


def _orientation(template) -> float:
    """+1 when the template's triangles are counter-clockwise in UV (the majority), else -1."""
    uv = np.asarray(template.uv, np.float64)
    f = np.asarray(template.faces, np.int64)
    a, b, c = uv[f[:, 0]], uv[f[:, 1]], uv[f[:, 2]]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    return 1.0 if (area > 0).sum() >= (area < 0).sum() else -1.0


# --------------------------------------------------------------------------- training data
class VertexSubsetCache:
    """The training faces' kept vertices, with the interface :func:`cm3dmm.train.train` reads.

    vertices: (S, V, 3) training faces (mm); coarse: the subset; subject / expression: (S,).
    Each face has a fixed permutation of its K kept vertices (``default_rng([seed, face])``);
    ``read(faces, n_vertex, n_continuous, offset)`` returns ``min(n_vertex, K)`` consecutive
    entries of it from ``offset`` (wrapping around) and never a continuous sample;
    ``heldout(faces)`` returns the same ``min(K, max_heldout)`` kept vertices for every face
    (spread evenly over the kept list; validation sees no unseen vertex).
    """

    def __init__(self, vertices: np.ndarray, coarse: Coarse, subject: list[str], expression: list[str],
                 seed: int = 0, path: Path | None = None, max_heldout: int = 2048):
        v = np.asarray(vertices, np.float32)
        if v.ndim != 3 or len(v) != len(subject) or len(subject) != len(expression):
            raise ValueError(f"vertices (S, V, 3) and S subjects / expressions expected, got {v.shape}, "
                             f"{len(subject)}, {len(expression)}")
        self.target = np.ascontiguousarray(v[:, coarse.kept])  # (S, K, 3)
        self.uv = np.asarray(coarse.template.uv, np.float32)  # (K, 2)
        self.avg = np.asarray(coarse.template.mean, np.float32)  # (K, 3)
        self.subject = list(subject)
        self.expression = list(expression)
        self.path = path
        k = len(coarse.kept)
        self.val_idx = even_indices(k, max(1, int(max_heldout)))
        self.order = np.stack([np.random.default_rng([int(seed), i]).permutation(k) for i in range(len(v))])
        h = hashlib.sha256(self.target.tobytes())
        h.update(self.uv.tobytes())
        self.content_hash = h.hexdigest()[:16]

    @property
    def n_kept(self) -> int:
        return int(self.uv.shape[0])

    def read(self, faces, n_vertex: int, n_continuous: int = 0, offset: int = 0) -> dict[str, np.ndarray]:
        faces = np.asarray(faces, np.int64)
        k = self.n_kept
        n = min(int(n_vertex), k)
        pos = (int(offset) + np.arange(n)) % k
        idx = self.order[faces][:, pos]  # (B, n)
        return {"uv": self.uv[idx], "target": self.target[faces[:, None], idx], "avg": self.avg[idx]}

    def heldout(self, faces) -> dict[str, np.ndarray]:
        faces = np.asarray(faces, np.int64)
        b = len(faces)
        uv, avg = self.uv[self.val_idx], self.avg[self.val_idx]
        return {"uv": np.broadcast_to(uv, (b,) + uv.shape).copy(), "target": self.target[faces][:, self.val_idx],
                "avg": np.broadcast_to(avg, (b,) + avg.shape).copy()}


def upsampling_config(cfg):
    """The training configuration of the upsampling models: ``cfg`` with ``train.steps`` =
    ``evaluate.upsampling_steps`` (when > 0) and no continuous samples."""
    from cm3dmm.train import with_steps

    train = with_steps(cfg.train, cfg.evaluate.upsampling_steps or cfg.train.steps, continuous_points=0)
    return dataclasses.replace(cfg, train=train)


def _fraction(fraction) -> float:
    try:
        return float(fraction)
    except (TypeError, ValueError):
        raise InputError(f"--fraction: expected a number in (0, 1], got {fraction!r}") from None


def _inputs(cfg):
    """The run's paths, template and registered data (checked against each other)."""
    from cm3dmm.registered import read_run_inputs

    paths = RunPaths.of(cfg.run_dir)
    template, data = read_run_inputs(paths)
    idx = data.indices("train")
    if len(idx) == 0:
        raise InputError("the train split is empty", paths.registered)
    return paths, template, data, idx


def run_train_upsampling(cfg, fraction: float | str):
    """Stage entry (rule ``train_upsampling``): train the continuous model on ``fraction`` of the
    template's vertices -> ``models/cm3dmm_frac{fraction}/model.pt`` (+ log, loss plot)."""
    from cm3dmm.train import train

    fraction = _fraction(fraction)
    paths, template, data, idx = _inputs(cfg)
    coarse = make_coarse(template, fraction)
    cache = VertexSubsetCache(data.vertices[idx], coarse, [data.subject[i] for i in idx],
                              [data.expression[i] for i in idx], seed=cfg.cache.seed, path=paths.registered)
    ucfg = upsampling_config(cfg)
    method = fraction_method(fraction)
    log.info("upsampling model %s: %d of %d vertices, %d coarse triangles, %d steps", method, coarse.n_kept,
             template.n_vertices, len(coarse.faces), ucfg.train.steps)
    return train(ucfg, coarse.template, cache, paths, method)


def upsampling_subjects(cfg, test_subjects: list[str]) -> list[str]:
    """The test subjects of the upsampling experiment (``evaluate.upsampling_subjects``, spread evenly)."""
    from cm3dmm.sizes import select_subjects

    return select_subjects(test_subjects, cfg.evaluate.upsampling_subjects)


def run_fit_upsampling(cfg, method: str, fraction: float | str) -> list[Path]:
    """Stage entry (rule ``fit_upsampling``): ``method`` on ``fraction`` of the template's vertices,
    fitted to those vertices of every expression of the experiment's test subjects ->
    ``fits/{method}_frac{fraction}/{subject}.npz|json|png`` (fits over the kept vertices only).

    cm3dmm: the model of rule ``train_upsampling``; pca / bilinear: trained here on the kept vertices
    of every training face (the sizes of rule ``train_baseline``). ``cm3dmm evaluate`` predicts every
    template vertex from these fits (the continuous model queried at the template's UVs, the
    baselines interpolated on the coarse mesh) and scores them.
    """
    from cm3dmm.methods import baseline_face, load_method
    from cm3dmm.sizes import write_subject_fits

    fraction = _fraction(fraction)
    if method not in (MAIN, "pca", "bilinear"):
        raise InputError(f"--method: expected {MAIN}, pca or bilinear, got {method!r}")
    paths, template, data, idx = _inputs(cfg)
    coarse = make_coarse(template, fraction)
    kept = coarse.kept
    pca = None
    if method == MAIN:
        path = paths.model(fraction_method(fraction))
        fm = load_method(path)
        if fm.n_vertices != coarse.n_kept:
            raise InputError(f"the upsampling model has {fm.n_vertices} vertices, the subset of fraction "
                             f"{fraction_tag(fraction)} {coarse.n_kept}: retrain it (rule train_upsampling)", path)
    else:
        from cm3dmm.baselines import fit_bilinear, fit_pca

        tv = np.asarray(data.vertices[idx], np.float64)[:, kept]
        if method == "pca":
            pca = base = fit_pca(tv, coarse.faces, dim=default_pca_dim(cfg))
        else:
            base = fit_bilinear(tv, [data.subject[i] for i in idx], [data.expression[i] for i in idx],
                                coarse.faces, cfg.baselines.bilinear_id, cfg.baselines.bilinear_exp)
        fm = baseline_face(base, coarse.template)
    test = data.subjects("test")
    if not test:
        raise InputError("the dataset has no test subjects", paths.registered)
    subjects = upsampling_subjects(cfg, test)
    name = fraction_method(fraction, method)
    log.info("fit_upsampling %s: %d of %d vertices, %d subjects", name, coarse.n_kept, template.n_vertices,
             len(subjects))
    return write_subject_fits(fm, data, subjects, cfg.fit, paths, name, vertex_ids=kept, pca=pca)

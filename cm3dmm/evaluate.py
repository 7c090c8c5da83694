"""The ``evaluate`` stage: metrics of every method -> ``results/{run}/tables/``.

    run_evaluate(cfg) -> Evaluation

Tables (each as ``.csv``, ``.md`` and booktabs ``.tex``; :mod:`cm3dmm.tables`), with
``protocol.md`` beside them saying how every number was computed:

* ``reconstruction`` — the paper's layout (Method | Dim | mean vertex error | RMSE | CD | NC |
  F-score), for the **test** subjects and for a fixed subset of **training** faces
  (representation power), both from the ``fit`` stage's files; the continuous model also with
  the other code sharing, at other code sizes, PCA at several latent sizes including the rank of
  the centred training data (where a PCA represents every training face exactly) and the bilinear
  model at other identity sizes, from the fits of rule ``fit_size`` (:mod:`cm3dmm.sizes`); the
  Chamfer distance also at upsampling levels > 0;
* ``regions`` — the test-subject errors per face region (nose, mouth, eyes, cheeks, forehead,
  other) of the template;
* ``pca_sweep`` — PCA at every latent size up to the data's rank (log-spaced sizes above 128),
  vertex errors only, from one SVD;
* ``upsampling`` — the semantic-upsampling experiment (:mod:`cm3dmm.upsampling`): every method
  sees a fraction of the template's vertices and is evaluated at all of them;
* ``timing`` — training time, fitting time per face, mesh generation time per upsampling level.

This stage trains and fits nothing: it reads the fit files (:func:`read_fits`, one folder
``fits/{name}/`` per method or variant, :func:`cm3dmm.fit.read_fit`) and the models, and scores.
All metrics come from :mod:`cm3dmm.metrics` (millimetres).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cm3dmm import metrics
from cm3dmm.errors import InputError
from cm3dmm.geometry import even_indices
from cm3dmm.io.atomic import atomic_write_json, atomic_write_text
from cm3dmm.paths import TABLES, RunPaths
from cm3dmm.sizes import select_subjects, train_subset
from cm3dmm.tables import markdown_to_html, write_table

log = logging.getLogger(__name__)

#: PCA sweep: every size up to this rank, log-spaced sizes beyond it
SWEEP_ALL_UP_TO = 128
SWEEP_LOG_SIZES = 48

COL_VE = "mean vertex error (mm)"
COL_RMSE = "RMSE (mm)"
COL_CD = "CD (mm)"
COL_NC = "NC"
COL_F = "F@{t:g}mm"

__all__ = ["run_evaluate", "Evaluation", "FaceSet", "Fits", "Scores", "read_fits", "score_faces", "select_subjects",
           "pca_sweep", "TABLES"]


# =========================================================================== data holders
@dataclass
class FaceSet:
    """Registered target faces: B faces of some subjects (every expression of each)."""

    subject: list[str]  #: (B,)
    expression: list[str]  #: (B,)
    vertices: np.ndarray  #: (B, V, 3) mm

    @property
    def n(self) -> int:
        return int(len(self.subject))

    def groups(self) -> dict[str, np.ndarray]:
        """subject -> indices of its faces (first-appearance order)."""
        out: dict[str, list[int]] = {}
        for i, s in enumerate(self.subject):
            out.setdefault(s, []).append(i)
        return {s: np.asarray(ix, np.int64) for s, ix in out.items()}

    @classmethod
    def of(cls, data, subjects: list[str]) -> "FaceSet":
        want = set(subjects)
        idx = [i for i, s in enumerate(data.subject) if s in want]
        order = sorted(idx, key=lambda i: (subjects.index(data.subject[i]), i))
        return cls([data.subject[i] for i in order], [data.expression[i] for i in order],
                   np.asarray(data.vertices[order], np.float64))


@dataclass
class Scores:
    """Metrics of B predicted faces against their targets (means over faces, mm)."""

    n_faces: int
    mean_vertex_error: float  #: mean over faces of the per-face mean vertex distance
    rmse: float  #: root mean square over every vertex of every face
    per_vertex: np.ndarray  #: (B, V) vertex distances
    per_face: np.ndarray  #: (B,) mean vertex distance per face
    chamfer: float = float("nan")  #: mean over the surface-evaluated faces
    normal_consistency: float = float("nan")
    fscore: float = float("nan")
    surface_faces: int = 0  #: faces with surface metrics
    regions: dict[str, dict[str, float]] = field(default_factory=dict)  #: name -> metric -> value


def score_faces(pred: np.ndarray, target: np.ndarray, faces: np.ndarray, *, n_points: int, seed: int,
                threshold: float, surface_idx: np.ndarray | None = None,
                labels: np.ndarray | None = None, names: list[str] | None = None,
                pred_meshes: tuple[np.ndarray, np.ndarray] | None = None) -> Scores:
    """Vertex and surface metrics of predictions in template topology.

    pred, target: (B, V, 3) mm; faces: (F, 3) template triangles (the target surface);
    surface_idx: faces that get Chamfer / NC / F-score (default all); labels (V,) + names: adds
    per-region metrics; pred_meshes: optional (vertices (B, P, 3), triangles (G, 3)) surface of
    the prediction (an upsampling level) used instead of ``pred`` for the surface metrics.
    """
    ve = metrics.vertex_error(pred, target)
    s = Scores(n_faces=len(ve.mean), mean_vertex_error=ve.mean_all, rmse=ve.rmse_all,
               per_vertex=ve.per_vertex, per_face=ve.mean)
    if labels is not None:
        for name, r in metrics.region_vertex_error(pred, target, labels, names).items():
            s.regions[name] = {"ve": r.mean_all, "rmse": r.rmse_all}
    idx = np.arange(len(pred)) if surface_idx is None else np.asarray(surface_idx)
    if len(idx) == 0 or n_points <= 0:
        return s
    pv, pf = (pred, faces) if pred_meshes is None else pred_meshes
    cds, ncs, fs = [], [], []
    reg: dict[str, dict[str, list[float]]] = {}
    use_labels = labels if pred_meshes is None else None
    for b in idx:
        m = metrics.surface_metrics(pv[b], pf, target[b], faces, n_points=n_points, seed=seed,
                                    threshold=threshold, labels=use_labels,
                                    names=names if use_labels is not None else None)
        cds.append(m.chamfer)
        ncs.append(m.normal_consistency)
        fs.append(m.fscore)
        for name, rm in m.regions.items():
            d = reg.setdefault(name, {"cd": [], "f": []})
            d["cd"].append(rm.chamfer)
            d["f"].append(rm.fscore)
    s.chamfer, s.normal_consistency, s.fscore = float(np.mean(cds)), float(np.mean(ncs)), float(np.mean(fs))
    s.surface_faces = int(len(idx))
    for name, d in reg.items():
        s.regions.setdefault(name, {})
        s.regions[name]["cd"] = float(np.nanmean(d["cd"]))
        s.regions[name]["f"] = float(np.nanmean(d["f"]))
    return s


# =========================================================================== fit files
@dataclass
class Fits:
    """The fits of a :class:`FaceSet` read from one fit folder (``fits/{name}/``), in its order."""

    vertices: np.ndarray  #: (B, M, 3) fitted vertices (M: the fitted model's vertices)
    z_id: np.ndarray  #: (B, Di)
    z_exp: np.ndarray  #: (B, De)
    seconds: list[float]  #: per subject: fitting seconds per face

    @property
    def dim(self) -> int:
        return int(self.z_id.shape[1] + self.z_exp.shape[1])


def read_fits(paths: RunPaths, name: str, faces: FaceSet) -> Fits:
    """Every subject of ``faces`` from ``fits/{name}/{subject}.npz`` (:func:`cm3dmm.fit.read_fit`),
    checked to cover the same expressions in the same order."""
    from cm3dmm.fit import read_fit

    preds, codes_i, codes_e, secs = [], [], [], []
    for subj, ix in faces.groups().items():
        path = paths.fit_npz(name, subj)
        z = read_fit(path)
        ex = [str(e) for e in z["expressions"]]
        want = [faces.expression[i] for i in ix]
        if ex != want:
            raise InputError(f"fit of {subj} covers expressions {ex}, the dataset {want}: rerun its fit", path)
        preds.append(z["vertices"].astype(np.float64))
        codes_i.append(z["z_id"].astype(np.float64).reshape(len(ex), -1))
        codes_e.append(z["z_exp"].astype(np.float64).reshape(len(ex), -1))
        secs.append(float(z["seconds"]) / max(len(ex), 1))
    return Fits(np.concatenate(preds), np.concatenate(codes_i), np.concatenate(codes_e), secs)


def _mesh_at(fm, zi: np.ndarray, ze: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Meshes of codes at an upsampling level: (B, P, 3), (G, 3)."""
    v, f = fm.mesh(torch.as_tensor(zi, dtype=fm.dtype), torch.as_tensor(ze, dtype=fm.dtype), level)
    return np.asarray(v, np.float64), np.asarray(f)


# =========================================================================== PCA sweep
def pca_sweep_dims(rank: int, extra: list[int] | None = None) -> list[int]:
    """Every size 1..rank when rank <= SWEEP_ALL_UP_TO, else log-spaced sizes (always rank)."""
    if rank <= SWEEP_ALL_UP_TO:
        dims = set(range(1, rank + 1))
    else:
        dims = set(np.unique(np.geomspace(1, rank, SWEEP_LOG_SIZES).round().astype(int)).tolist())
        dims |= set(range(1, min(rank, 16) + 1))
    dims |= {d for d in (extra or []) if 1 <= d <= rank}
    dims.add(rank)
    return sorted(dims)


def pca_sweep(pca, targets: np.ndarray, dims: list[int], reg: float) -> np.ndarray:
    """Mean vertex error (mm) of regularised PCA fits at each latent size.

    pca: a :class:`cm3dmm.baselines.PCAModel` with at least max(dims) components (orthonormal);
    targets: (B, V, 3); reg: the ridge weight of ``PCAModel.fit`` (``prior_weight * V`` is the
    fit stage's objective). With orthonormal components the regularised codes decouple:
    ``c_k = <x - mean, phi_k> / (1 + reg / std_k^2)``, the same for every truncation, so one
    projection serves all sizes. Returns (len(dims),) errors.
    """
    x = np.asarray(targets, np.float64) - pca.mean
    comps = pca.components.reshape(pca.dim, -1)
    proj = x.reshape(len(x), -1) @ comps.T  # (B, D)
    codes = proj / (1.0 + reg / np.maximum(pca.std, 1e-12) ** 2)
    resid = x.reshape(len(x), -1).copy()
    out = []
    done = 0
    for d in dims:
        if d > pca.dim:
            raise ValueError(f"the PCA has {pca.dim} components, {d} asked")
        resid -= codes[:, done:d] @ comps[done:d]
        done = d
        out.append(float(np.linalg.norm(resid.reshape(len(x), -1, 3), axis=-1).mean()))
    return np.asarray(out)


# =========================================================================== the stage
@dataclass
class Evaluation:
    """What ``run_evaluate`` wrote."""

    tables: dict[str, pd.DataFrame]
    paths: dict[str, dict[str, Path]]
    protocol: Path
    rank: int
    facts: dict = field(default_factory=dict)


class _Ctx:
    """Everything the tables share: config, paths, data, template, models."""

    def __init__(self, cfg):
        from cm3dmm.registered import read_run_inputs

        self.cfg = cfg
        self.ec = cfg.evaluate
        self.paths = RunPaths.of(cfg.run_dir)
        self.template, self.data = read_run_inputs(self.paths)
        self.faces = np.asarray(self.template.faces)
        self.labels = np.asarray(self.template.regions, np.int64)
        self.region_names = list(self.template.region_names)
        self.methods = ["cm3dmm"] + [m for m in cfg.baselines.methods if m != "cm3dmm"]
        self.test_subjects = self.data.subjects("test")
        if not self.test_subjects:
            raise InputError("the dataset has no test subjects", self.paths.registered)
        self.train_subjects_all = self.data.subjects("train")
        self.train_subjects = train_subset(cfg, self.train_subjects_all)
        self.test = FaceSet.of(self.data, self.test_subjects)
        self.train = FaceSet.of(self.data, self.train_subjects) if self.train_subjects else None
        idx = self.data.indices("train")
        self.train_vertices = np.asarray(self.data.vertices[idx], np.float64)
        self.train_subject = [self.data.subject[i] for i in idx]
        self.train_expression = [self.data.expression[i] for i in idx]
        self.levels = [lv for lv in self.ec.levels if 0 <= lv < len(self.template.levels)]
        skipped = sorted(set(self.ec.levels) - set(self.levels))
        if skipped:
            log.warning("evaluate.levels %s do not exist (the template has levels 0..%d); skipped", skipped,
                        len(self.template.levels) - 1)
        self._models: dict[str, object] = {}

    def model(self, method: str):
        from cm3dmm.methods import load_method

        if method not in self._models:
            self._models[method] = load_method(self.paths.model(method), template=self.template, expect=method)
        return self._models[method]

    def kw(self) -> dict:
        return {"n_points": self.ec.chamfer_points, "seed": self.ec.seed, "threshold": self.ec.fscore_threshold}


def _dim(fm) -> int:
    return int(fm.id_dim + fm.exp_dim)


def _mode_text(fm, mode: str) -> str:
    """How a fit shared codes: 'per-face codes' / 'shared identity per subject'."""
    if mode == "per-subject" and fm.shared_identity:
        return "shared identity per subject"
    return "per-face codes"


def _recon_row(split: str, method: str, dim: int, s: Scores, ctx: _Ctx, note: str = "",
               level_cd: dict[int, float] | None = None) -> dict:
    row = {"Split": split, "Method": method, "Dim": int(dim), "Faces": s.n_faces, COL_VE: s.mean_vertex_error,
           COL_RMSE: s.rmse, COL_CD: s.chamfer, COL_NC: s.normal_consistency,
           COL_F.format(t=ctx.ec.fscore_threshold): s.fscore}
    for lv in ctx.levels:
        if lv > 0:
            row[f"CD L{lv} (mm)"] = (level_cd or {}).get(lv, float("nan"))
    row["Note"] = note
    return row


def _reconstruction(ctx: _Ctx) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    """The reconstruction, regions and pca_sweep tables and their facts (surface-metric face counts,
    the rank, the training faces, the explained variance, the other sizes, fit seconds per face)."""
    from cm3dmm.baselines import fit_pca
    from cm3dmm.paths import other_mode

    ec, kw = ctx.ec, ctx.kw()
    rows, region_rows = [], []
    sidx_test = even_indices(ctx.test.n, ec.surface_faces)
    sidx_train = even_indices(ctx.train.n, ec.surface_faces) if ctx.train is not None else None
    facts = {"surface_faces": {"test": int(len(sidx_test)),
                               "train": int(len(sidx_train)) if sidx_train is not None else 0}}
    fit_seconds: dict[str, list[float]] = {}

    # ---- full-rank PCA of the training faces: the rank, the explained variance and the sweep
    full = fit_pca(ctx.train_vertices, ctx.faces, dim=min(len(ctx.train_vertices), 3 * ctx.template.n_vertices))
    rank = int(full.rank)
    facts["rank"] = rank
    facts["n_train_faces"] = int(len(ctx.train_vertices))
    facts["explained_variance_cumulative"] = np.cumsum(full.explained_variance).tolist()
    default_pca = None
    mode = ctx.cfg.fit.mode

    for method in ctx.methods:
        fm = ctx.model(method)
        dim = _dim(fm)
        if method == "pca":
            default_pca = dim
        # ---- test subjects: the fit stage's files
        fits = read_fits(ctx.paths, method, ctx.test)
        fit_seconds[method] = fits.seconds
        s = score_faces(fits.vertices, ctx.test.vertices, ctx.faces, surface_idx=sidx_test, labels=ctx.labels,
                        names=ctx.region_names, **kw)
        level_cd = _level_chamfer(ctx, fm, method, fits.z_id, fits.z_exp, ctx.test, sidx_test, s)
        rows.append(_recon_row("test", method, dim, s, ctx, f"fit stage ({_mode_text(fm, mode)})", level_cd))
        if method == "cm3dmm" and fm.shared_identity:
            # the other code sharing (rule fit_size), so that the continuous model is seen both ways: per
            # face (every face fitted freely, as PCA is) and per subject (one identity code for all its
            # expressions)
            other = other_mode(mode)
            fo = read_fits(ctx.paths, f"cm3dmm_{other}", ctx.test)
            so = score_faces(fo.vertices, ctx.test.vertices, ctx.faces, surface_idx=sidx_test, **kw)
            rows.append(_recon_row("test", method, dim, so, ctx, f"fit_size ({_mode_text(fm, other)})",
                                   _level_chamfer(ctx, fm, method, fo.z_id, fo.z_exp, ctx.test, sidx_test, so)))
        for name in ctx.region_names:
            r = s.regions.get(name)
            if r is None:
                continue
            region_rows.append({"Method": method, "Dim": dim, "Region": name,
                                "Vertices": int((ctx.labels == ctx.region_names.index(name)).sum()),
                                COL_VE: r["ve"], COL_RMSE: r["rmse"], COL_CD: r.get("cd", float("nan")),
                                COL_F.format(t=ec.fscore_threshold): r.get("f", float("nan"))})
        # ---- training subset: representation power (the fit stage's files of the training subjects)
        if ctx.train is not None:
            ft = read_fits(ctx.paths, method, ctx.train)
            st = score_faces(ft.vertices, ctx.train.vertices, ctx.faces, surface_idx=sidx_train, **kw)
            rows.append(_recon_row("train", method, dim, st, ctx, f"fit stage ({_mode_text(fm, mode)})",
                                   _level_chamfer(ctx, fm, method, ft.z_id, ft.z_exp, ctx.train, sidx_train, st)))

    # ---- PCA at the other sizes (rule fit_size): pca_dims and the data's rank
    if "pca" in ctx.methods:
        asked = sorted({d for d in ctx.cfg.baselines.pca_dims if d >= 1})
        extra = sorted({min(d, rank) for d in asked} | {rank})
        extra = [d for d in extra if d != default_pca]
        for d in extra:
            note = "= rank of the training data" if d == rank else "fit_size"
            name = "pca_rank" if d == rank else f"pca_dim{d}"
            for split, fs in (("test", ctx.test), ("train", ctx.train)):
                if fs is None:
                    continue
                sidx = sidx_test if split == "test" else sidx_train
                fd = read_fits(ctx.paths, name, fs)
                if fd.dim != d:
                    raise InputError(f"holds PCA fits of size {fd.dim}, expected {d}: rerun rule fit_size",
                                     ctx.paths.fit_dir(name))
                sc = score_faces(fd.vertices, fs.vertices, ctx.faces, surface_idx=sidx, **kw)
                lc = {lv: sc.chamfer for lv in ctx.levels if lv > 0}
                rows.append(_recon_row(split, "pca", d, sc, ctx, note, lc))
    other_rows, other_facts = _other_sizes(ctx, sidx_test, sidx_train)
    rows += other_rows
    facts.update(other_facts)
    recon = pd.DataFrame(rows)
    order = {"test": 0, "train": 1}
    morder = {m: i for i, m in enumerate(ctx.methods)}
    recon = recon.sort_values(by=["Split", "Method", "Dim"], key=lambda c: c.map(order) if c.name == "Split"
                              else (c.map(morder) if c.name == "Method" else c), kind="stable").reset_index(drop=True)
    facts["fit_seconds_per_face"] = {m: float(np.mean(v)) for m, v in fit_seconds.items()}

    # ---- the sweep (vertex errors, closed form)
    dims = pca_sweep_dims(rank, list(ctx.cfg.baselines.pca_dims))
    reg = ctx.cfg.fit.prior_weight * ctx.template.n_vertices
    sweep = {"Dim": dims, "explained variance": [float(np.cumsum(full.explained_variance)[d - 1]) for d in dims]}
    sweep[f"test {COL_VE}"] = pca_sweep(full, ctx.test.vertices, dims, reg)
    if ctx.train is not None:
        sweep[f"train {COL_VE}"] = pca_sweep(full, ctx.train.vertices, dims, reg)
        sweep[f"train {COL_VE}, no prior"] = pca_sweep(full, ctx.train.vertices, dims, 0.0)
    return recon, pd.DataFrame(region_rows), pd.DataFrame(sweep), facts


def _other_sizes(ctx: _Ctx, sidx_test, sidx_train) -> tuple[list[dict], dict]:
    """Reconstruction rows of the continuous model at ``evaluate.model_dims`` (its own trained
    models) and of the bilinear model at ``baselines.bilinear_dims`` identity sizes, from the fits
    of rule ``fit_size`` (the fit stage's fitter and settings); facts ``model_dims`` and
    ``bilinear_dims`` (identity x expression sizes actually fitted)."""
    from cm3dmm.methods import load_method
    from cm3dmm.paths import extra_model_dims, size_method, size_variants
    from cm3dmm.sizes import size_config, split_variant

    rows = []
    kw = ctx.kw()
    splits = [("test", ctx.test, sidx_test)] + ([("train", ctx.train, sidx_train)] if ctx.train is not None else [])

    def add(method, name, dim, note, level_of):
        for split, fs, sidx in splits:
            fd = read_fits(ctx.paths, name, fs)
            sc = score_faces(fd.vertices, fs.vertices, ctx.faces, surface_idx=sidx, **kw)
            rows.append(_recon_row(split, method, dim, sc, ctx, note, level_of(fd.z_id, fd.z_exp, fs, sidx, sc)))

    for d in extra_model_dims(ctx.cfg):
        path = ctx.paths.model(size_method(d))
        fm = load_method(path, template=ctx.template, expect="cm3dmm")
        if _dim(fm) != d or fm.n_vertices != ctx.template.n_vertices:
            raise InputError(f"holds a model of code size {_dim(fm)} over {fm.n_vertices} vertices, expected "
                             f"{d} over {ctx.template.n_vertices}: retrain it (rule train_size)", path)
        steps = size_config(ctx.cfg, d).train.steps
        add("cm3dmm", size_method(d), d, f"fit_size ({_mode_text(fm, ctx.cfg.fit.mode)}); trained {steps} steps",
            lambda zi, ze, fs, sidx, sc, fm=fm: _level_chamfer(ctx, fm, "cm3dmm", zi, ze, fs, sidx, sc))
    bilinear_dims = []
    if "bilinear" in ctx.methods:
        seen = {_dim(ctx.model("bilinear"))}
        for name in size_variants(ctx.cfg):
            if split_variant(name)[0] != "bilinear":
                continue
            probe = read_fits(ctx.paths, name, ctx.test)  # its sizes (capped at the data's identity rank)
            id_dim, exp_dim = int(probe.z_id.shape[1]), int(probe.z_exp.shape[1])
            if id_dim + exp_dim in seen:  # capped: the same model again
                continue
            seen.add(id_dim + exp_dim)
            bilinear_dims.append([id_dim, exp_dim])
            add("bilinear", name, id_dim + exp_dim, f"fit_size; {id_dim} x {exp_dim}",
                lambda zi, ze, fs, sidx, sc: {lv: sc.chamfer for lv in ctx.levels if lv > 0})
    return rows, {"model_dims": extra_model_dims(ctx.cfg), "bilinear_dims": bilinear_dims}


def _sizes_text(cfg, facts: dict) -> str:
    from cm3dmm.sizes import size_config

    parts = []
    dims = facts.get("model_dims") or []
    if dims:
        parts.append(
            "- The continuous model at other code sizes (`evaluate.model_dims`): one model per size, trained "
            "on the same cache with the main model's settings except its code sizes (identity + expression "
            "split in the main model's proportion) and its steps: "
            + ", ".join(f"{d} ({c.model.id_dim} + {c.model.exp_dim}, {c.train.steps} steps)"
                        for d, c in ((d, size_config(cfg, d)) for d in dims))
            + f" against the main model's {cfg.train.steps} (rule `train_size`); fitted by rule `fit_size` "
            "(`fits/cm3dmm_dim{n}/`).")
    bil = facts.get("bilinear_dims") or []
    if bil:
        parts.append(
            "- The bilinear model at other identity sizes (`baselines.bilinear_dims`): built by rule `fit_size` "
            "from the training faces with the same Tucker fit as rule `train_baseline` ("
            + ", ".join(f"{i} x {e}" for i, e in bil) + " identity x expression) and fitted there "
            "(`fits/bilinear_id{n}/`).")
    return "\n".join(parts)


def _level_chamfer(ctx: _Ctx, fm, method: str, zi, ze, fs: FaceSet, sidx, s0: Scores) -> dict[int, float]:
    """Chamfer distance of the meshes at each evaluated level > 0.

    Baselines are piecewise linear on the template triangles, so their level-l surface *is* their
    level-0 surface: the level-0 value is reported. The continuous model is decoded at the level's
    points and evaluated afresh.
    """
    out = {}
    for lv in ctx.levels:
        if lv == 0:
            continue
        if method != "cm3dmm":
            out[lv] = s0.chamfer
            continue
        # only the faces that get surface metrics are decoded at the level
        idx = np.arange(fs.n) if sidx is None else np.asarray(sidx)
        if len(idx) == 0:
            out[lv] = float("nan")
            continue
        mv, mf = _mesh_at(fm, zi[idx], ze[idx], lv)
        s = score_faces(mv[:, :ctx.template.n_vertices], fs.vertices[idx], ctx.faces, surface_idx=None,
                        pred_meshes=(mv, mf), **ctx.kw())
        out[lv] = s.chamfer
    return out


# --------------------------------------------------------------------------- upsampling
def _upsampling(ctx: _Ctx) -> tuple[pd.DataFrame, dict]:
    """The upsampling table and its facts: the test subjects and per fraction the coarse mesh's
    vertices, triangles and the template vertices outside it."""
    from cm3dmm.methods import load_method
    from cm3dmm.upsampling import fraction_method, fraction_tag, make_coarse, upsampling_subjects

    ec, kw = ctx.ec, ctx.kw()
    subjects = upsampling_subjects(ctx.cfg, ctx.test_subjects)
    test = FaceSet.of(ctx.data, subjects)
    sidx = even_indices(test.n, ec.surface_faces)
    rows = []
    meshes = {}
    for frac in ec.upsampling_fractions:
        coarse = make_coarse(ctx.template, frac)
        kept, unseen = coarse.kept, coarse.unseen
        tag = fraction_tag(frac)
        meshes[tag] = {"kept": coarse.n_kept, "coarse_triangles": int(len(coarse.faces)),
                       "outside": int((~coarse.inside).sum())}

        def add(method: str, dim: int, pred: np.ndarray, note: str = ""):
            s = score_faces(pred, test.vertices, ctx.faces, surface_idx=sidx, **kw)
            un = float(s.per_vertex[:, unseen].mean()) if unseen.any() else float("nan")
            rows.append({"Fraction": float(frac), "Seen vertices": coarse.n_kept, "Method": method, "Dim": int(dim),
                         "error, all vertices (mm)": s.mean_vertex_error, "error, unseen vertices (mm)": un,
                         COL_RMSE: s.rmse, COL_CD: s.chamfer, "Note": note})

        def fits_of(method: str) -> Fits:  # rule fit_upsampling: fits of the kept vertices
            name = fraction_method(frac, method)
            fits = read_fits(ctx.paths, name, test)
            if fits.vertices.shape[1] != coarse.n_kept:
                raise InputError(f"holds fits of {fits.vertices.shape[1]} vertices, the subset of fraction {tag} "
                                 f"{coarse.n_kept}: rerun rule fit_upsampling", ctx.paths.fit_dir(name))
            return fits

        # the continuous model trained on the kept vertices, queried at every vertex's UV
        path = ctx.paths.model(fraction_method(frac))
        fm = load_method(path)
        if fm.n_vertices != coarse.n_kept:
            raise InputError(f"the upsampling model has {fm.n_vertices} vertices, the subset of fraction {tag} "
                             f"{coarse.n_kept}: retrain it", path)
        fits = fits_of("cm3dmm")
        uv = torch.as_tensor(np.asarray(ctx.template.uv), dtype=fm.dtype)
        with torch.no_grad():
            full = fm.model.decode(uv, torch.as_tensor(fits.z_id, dtype=fm.dtype),
                                   torch.as_tensor(fits.z_exp, dtype=fm.dtype))
        add("cm3dmm", _dim(fm), full.double().numpy(), "queried at unseen UVs")
        # baselines trained and fitted on the kept vertices, interpolated on the coarse mesh
        for method in ctx.methods:
            if method == "cm3dmm":
                continue
            fits = fits_of(method)
            add(method, fits.dim, coarse.interpolate(fits.vertices), "barycentric on the coarse mesh")
        # the best any coarse-mesh interpolation can do: the true kept vertices, interpolated
        add("coarse target", 0, coarse.interpolate(test.vertices[:, kept]), "oracle: true seen vertices")
    return pd.DataFrame(rows), {"upsampling_subjects": subjects, "upsampling": meshes}


# --------------------------------------------------------------------------- timing
def _train_seconds(ctx: _Ctx, method: str) -> float:
    """Training wall time: the last ``elapsed_s`` of ``train_log.csv`` (continuous models) or the
    baseline's ``summary.json`` ``train_seconds``."""
    log_path = ctx.paths.train_log(method)
    if log_path.exists():
        df = pd.read_csv(log_path)
        if "elapsed_s" in df and len(df):
            return float(df["elapsed_s"].iloc[-1])
    summ = ctx.paths.baseline_summary(method)
    if summ.exists():
        return float(json.loads(summ.read_text()).get("train_seconds", float("nan")))
    return float("nan")


def _timing(ctx: _Ctx) -> pd.DataFrame:
    from cm3dmm.upsampling import fraction_method

    rows = []
    for method in ctx.methods:
        rows.append({"Method": method, "Stage": "training", "Level": None, "Points": None,
                     "Seconds": _train_seconds(ctx, method)})
    for frac in ctx.ec.upsampling_fractions:
        m = fraction_method(frac)
        rows.append({"Method": m, "Stage": "training", "Level": None, "Points": None,
                     "Seconds": _train_seconds(ctx, m)})
    for method in ctx.methods:
        jsons = [ctx.paths.fit_json(method, s) for s in ctx.test_subjects]
        per_face = []
        for j in jsons:
            if j.exists():
                per_face.append(float(json.loads(j.read_text())["timings_s"]["per_face"]))
        rows.append({"Method": method, "Stage": "fit per face", "Level": None, "Points": None,
                     "Seconds": float(np.mean(per_face)) if per_face else float("nan")})
    reps = max(1, ctx.ec.timing_repeats)
    for method in ctx.methods:
        fm = ctx.model(method)
        zi, ze = fm.mean_codes(1)
        for lv in range(len(ctx.template.levels)):
            ts = []
            for _ in range(reps + 1):  # the first call warms caches up and is not counted
                t0 = time.perf_counter()
                v, _ = fm.mesh(zi, ze, lv)
                ts.append(time.perf_counter() - t0)
            rows.append({"Method": method, "Stage": "mesh generation", "Level": lv, "Points": int(v.shape[1]),
                         "Seconds": float(np.median(ts[1:]))})
    df = pd.DataFrame(rows)
    df["Level"] = df["Level"].astype("Int64")
    df["Points"] = df["Points"].astype("Int64")
    return df


# --------------------------------------------------------------------------- protocol
#: the protocol's text, with ``${name}`` fields filled by :func:`_protocol` (package data)
PROTOCOL_TEMPLATE = "evaluate_protocol.md"


def _protocol(ctx: _Ctx, facts: dict) -> str:
    """``protocol.md``: :data:`PROTOCOL_TEMPLATE` filled with the run's settings and ``facts``."""
    from importlib.resources import files
    from string import Template

    from cm3dmm.baselines import RANK_TOL
    from cm3dmm.paths import other_mode

    ec, fc, mc = ctx.ec, ctx.cfg.fit, ctx.cfg.model
    rank, n_train = facts["rank"], facts["n_train_faces"]
    ev = facts["explained_variance_cumulative"]
    sf = facts.get("surface_faces", {})
    up = facts.get("upsampling", {})
    fields = {
        "run": ctx.cfg.run, "source": ctx.data.source, "n_samples": ctx.data.n_samples,
        "n_vertices": ctx.data.n_vertices, "n_triangles": len(ctx.data.faces),
        "n_test_subjects": len(ctx.test_subjects), "n_test_faces": ctx.test.n,
        "test_subjects": ", ".join(ctx.test_subjects),
        "n_train_subjects_all": len(ctx.train_subjects_all), "n_train": n_train,
        "n_train_subjects": len(ctx.train_subjects), "train_subjects_setting": ec.train_subjects,
        "train_subjects": (", ".join(ctx.train_subjects) if ctx.train_subjects
                           else "(none: evaluate.train_subjects = 0)"),
        "train_faces": f" ({ctx.train.n} faces)." if ctx.train is not None else ".",
        "n_coordinates": 3 * ctx.data.n_vertices, "rank": rank, "rank_tol": f"{RANK_TOL:g}",
        "explained_variance": ", ".join(f"{d} -> {ev[d - 1]:.4f}" for d in sorted({1, 2, 4, 8, 16, 32, 64, rank})
                                        if d <= len(ev)),
        "optimizer": fc.optimizer, "mode": fc.mode, "max_iter": fc.max_iter, "prior_weight": f"{fc.prior_weight:g}",
        "points": fc.points, "polish_iters": fc.polish_iters,
        "loss_note": f", objective `fit.loss = {fc.loss}`)." if fc.loss != "squared" else ").",
        "other_mode": other_mode(fc.mode),
        "closed_form_note": (" PCA fits of rules `fit_size` and `fit_upsampling` use the closed form of the same "
                             "objective (`cm3dmm.sizes.pca_closed_codes`: the regularised normal equations, which "
                             "the fitter solves exactly in one step)." if fc.loss == "squared" else ""),
        "other_sizes": _sizes_text(ctx.cfg, facts),
        "chamfer_points": ec.chamfer_points, "seed": ec.seed, "seed_pred": ec.seed + 1,
        "fscore_threshold": f"{ec.fscore_threshold:g}", "surface_test": sf.get("test", 0),
        "surface_train": sf.get("train", 0), "surface_faces": ec.surface_faces, "sweep_all_up_to": SWEEP_ALL_UP_TO,
        "upsampling_subjects": ", ".join(facts.get("upsampling_subjects", [])),
        "upsampling_subjects_setting": ec.upsampling_subjects,
        "upsampling_steps": ec.upsampling_steps or ctx.cfg.train.steps,
        "interpolation_note": (f" (its field between the kept vertices: `model.interpolation = {mc.interpolation}`, "
                               f"smoothness {mc.smoothness:g}, `cm3dmm.nn.smooth`)." if mc.interpolation == "smooth"
                               else "."),
        "timing_repeats": max(1, ec.timing_repeats), "torch_threads": torch.get_num_threads(),
        "coarse_meshes": ("\n## Coarse meshes\n\n" + "\n".join(
            f"- f = {k}: {v['kept']} vertices, {v['coarse_triangles']} triangles, {v['outside']} template "
            "vertices outside them (nearest boundary point used)" for k, v in up.items()) if up else ""),
    }
    text = Template(files("cm3dmm").joinpath(PROTOCOL_TEMPLATE).read_text(encoding="utf-8")).substitute(fields)
    return text.rstrip("\n") + "\n"


# --------------------------------------------------------------------------- entry point
def run_evaluate(cfg) -> Evaluation:
    """The ``evaluate`` stage: every table of ``results/{run}/tables/`` and ``protocol.md``."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    t0 = time.perf_counter()
    ctx = _Ctx(cfg)
    recon, regions, sweep, facts = _reconstruction(ctx)
    log.info("evaluate: reconstruction done (%.1f s)", time.perf_counter() - t0)
    if ctx.ec.upsampling_fractions:
        upsampling, up_facts = _upsampling(ctx)
        facts = {**facts, **up_facts}
    else:
        upsampling = pd.DataFrame({"Note": ["no upsampling fractions configured (evaluate.upsampling_fractions)"]})
    log.info("evaluate: upsampling done (%.1f s)", time.perf_counter() - t0)
    timing = _timing(ctx)
    rank = facts["rank"]
    out = ctx.paths.tables_dir
    tables = {"reconstruction": recon, "regions": regions, "pca_sweep": sweep, "upsampling": upsampling,
              "timing": timing}
    captions = {
        "reconstruction": (f"Reconstruction errors (mm) on the test subjects (fit stage) and on training faces "
                           f"(representation power). The centred training data have rank {rank}; PCA at Dim "
                           f"{rank} is exact on training faces."),
        "regions": "Test-subject errors (mm) per face region.",
        "pca_sweep": f"PCA mean vertex error (mm) against latent size, up to the training data's rank {rank}.",
        "upsampling": ("Semantic upsampling: methods see a fraction of the template's vertices and are "
                       "evaluated at every vertex (test subjects, mm)."),
        "timing": "Wall-clock seconds: training, fitting per face, mesh generation per upsampling level.",
    }
    digits = {"Fraction": 4, "explained variance": 4, COL_NC: 4, COL_F.format(t=ctx.ec.fscore_threshold): 4,
              "Seconds": 4}
    written = {name: write_table(df, out, name, digits, captions[name]) for name, df in tables.items()}
    protocol = ctx.paths.protocol
    text = _protocol(ctx, facts)
    atomic_write_text(protocol, text)
    atomic_write_text(ctx.paths.protocol_html, markdown_to_html(text, "evaluation protocol"))
    atomic_write_json(ctx.paths.facts, facts)
    log.info("evaluate: %d tables -> %s (%.1f s)", len(written), out, time.perf_counter() - t0)
    return Evaluation(tables=tables, paths=written, protocol=protocol, rank=rank, facts=facts)

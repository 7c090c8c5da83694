"""The ``evaluate`` stage: metrics of every method -> ``results/{run}/tables/``.

    run_evaluate(cfg) -> Evaluation

Tables (each as ``.csv``, ``.md`` and booktabs ``.tex``; :mod:`cm3dmm.tables`), with
``protocol.md`` beside them saying how every number was computed:

* ``reconstruction`` — the paper's layout (Method | Dim | mean vertex error | RMSE | CD | NC |
  F-score), for the **test** subjects (from the ``fit`` stage's files) and for a fixed subset
  of **training** faces (representation power: fitted here with the same fitter and settings),
  PCA at several latent sizes including the rank of the centred training data (where a PCA
  represents every training face exactly), the Chamfer distance also at upsampling levels > 0;
* ``regions`` — the test-subject errors per face region (nose, mouth, eyes, cheeks, forehead,
  other) of the template;
* ``pca_sweep`` — PCA at every latent size up to the data's rank (log-spaced sizes above 128),
  vertex errors only, from one SVD;
* ``upsampling`` — the semantic-upsampling experiment (:mod:`cm3dmm.upsampling`): every method
  sees a fraction of the template's vertices and is evaluated at all of them;
* ``timing`` — training time, fitting time per face, mesh generation time per upsampling level.

All metrics come from :mod:`cm3dmm.metrics` (millimetres).
"""

from __future__ import annotations

import dataclasses
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
from cm3dmm.io.atomic import atomic_write_json, atomic_write_text
from cm3dmm.paths import RunPaths
from cm3dmm.paths import TABLES
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

__all__ = ["run_evaluate", "Evaluation", "FaceSet", "Scores", "score_faces", "select_subjects",
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


def select_subjects(subjects: list[str], n: int) -> list[str]:
    """``n`` subjects spread evenly over ``subjects`` (all when n <= 0 or n >= len)."""
    if n <= 0 or n >= len(subjects):
        return list(subjects)
    pick = np.unique(np.linspace(0, len(subjects) - 1, n).round().astype(int))
    return [subjects[i] for i in pick]


def surface_subset(n: int, k: int) -> np.ndarray:
    """Indices of the faces that get surface metrics: ``k`` spread evenly (all when k <= 0)."""
    if k <= 0 or k >= n:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


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


# =========================================================================== fitting helpers
def _fit_faces(fm, faces: FaceSet, fit_cfg, vertex_ids: np.ndarray | None = None):
    """Fit every subject of ``faces`` (its expressions together, cfg.fit.mode) with the fitter of
    the ``fit`` stage. vertex_ids: fit only these template vertices (the model then has as many
    vertices as ``vertex_ids``).

    Returns (codes z_id (B, Di), z_exp (B, De), vertices (B, M, 3) at the fitted vertices, seconds).
    """
    from cm3dmm.fit import fit_registered

    b = faces.n
    zi = np.zeros((b, fm.id_dim))
    ze = np.zeros((b, fm.exp_dim))
    verts = None
    secs = 0.0
    for _, ix in faces.groups().items():
        tgt = faces.vertices[ix] if vertex_ids is None else faces.vertices[ix][:, vertex_ids]
        res = fit_registered(fm, tgt, fit_cfg)
        if verts is None:
            verts = np.zeros((b,) + res.vertices.shape[1:])
        zi[ix], ze[ix], verts[ix] = res.z_id, res.z_exp, res.vertices
        secs += res.seconds
    return zi, ze, verts, secs


def fit_pca_closed(pca, targets: np.ndarray, prior_weight: float) -> np.ndarray:
    """The fit stage's PCA fit in closed form: fitted vertices (B, V, 3) of targets (B, V, 3).

    The fitter minimises ``mean_v |x_v - t_v|^2 + prior_weight * |c / std|^2`` per face; times V this
    is ``PCAModel.fit``'s ridge objective with ``reg = prior_weight * V``, and with orthonormal
    components its normal equations are diagonal: ``c_k = <t - mean, phi_k> / (1 + reg / std_k^2)``.
    """
    t = np.asarray(targets, np.float64)
    reg = float(prior_weight) * t.shape[1]
    comps = pca.components.reshape(pca.dim, -1)
    proj = (t - pca.mean).reshape(len(t), -1) @ comps.T
    return pca.decode(proj / (1.0 + reg / np.maximum(pca.std, 1e-12) ** 2))


def _fit_pca(pca, faces: FaceSet, fit_cfg, template, vertex_ids: np.ndarray | None = None) -> np.ndarray:
    """Fitted vertices (B, M, 3) of a :class:`~cm3dmm.baselines.PCAModel` over M vertices: the closed
    form when the fit stage's loss is the squared distance, else the fitter itself."""
    t = faces.vertices if vertex_ids is None else faces.vertices[:, vertex_ids]
    if getattr(fit_cfg, "loss", "squared") == "squared":
        return fit_pca_closed(pca, t, fit_cfg.prior_weight)
    from cm3dmm.methods import baseline_face

    sub = FaceSet(faces.subject, faces.expression, t)
    return _fit_faces(baseline_face(pca, template), sub, fit_cfg)[2]


def _mesh_at(fm, zi: np.ndarray, ze: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
    """Meshes of codes at an upsampling level: (B, P, 3), (G, 3)."""
    v, f = fm.mesh(torch.as_tensor(zi, dtype=fm.dtype), torch.as_tensor(ze, dtype=fm.dtype), level)
    return np.asarray(v, np.float64), np.asarray(f)


def _read_fit(path: Path) -> dict:
    if not path.exists():
        raise InputError("fit file not found (run the fit stage for every method and test subject)", path)
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except Exception as exc:  # truncated / not an npz (zipfile, ValueError, OSError, EOFError)
        raise InputError(f"fit file is corrupt or truncated ({type(exc).__name__}): rerun the fit stage",
                         path) from None
    missing = [k for k in ("expressions", "vertices", "z_id", "z_exp", "seconds") if k not in out]
    if missing:
        raise InputError(f"not a fit file of the fit stage (lacks {', '.join(missing)}): rerun the fit stage",
                         path)
    return out


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
        from cm3dmm.registered import read_registered
        from cm3dmm.template import load_template

        self.cfg = cfg
        self.ec = cfg.evaluate
        self.paths = RunPaths.of(cfg.run_dir)
        self.data = read_registered(self.paths.registered, with_scans=False)
        self.template = load_template(self.paths.template)
        if self.data.n_vertices != self.template.n_vertices:
            raise InputError(f"registered.h5 has {self.data.n_vertices} vertices, the template "
                             f"{self.template.n_vertices}: rerun the template stage", self.paths.template)
        self.faces = np.asarray(self.template.faces)
        self.labels = np.asarray(self.template.regions, np.int64)
        self.region_names = list(self.template.region_names)
        self.methods = ["cm3dmm"] + [m for m in cfg.baselines.methods if m != "cm3dmm"]
        self.test_subjects = self.data.subjects("test")
        if not self.test_subjects:
            raise InputError("the dataset has no test subjects", self.paths.registered)
        self.train_subjects_all = self.data.subjects("train")
        self.train_subjects = select_subjects(self.train_subjects_all, self.ec.train_subjects) \
            if self.ec.train_subjects > 0 else []
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


def _reconstruction(ctx: _Ctx, facts: dict) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The reconstruction, regions and pca_sweep tables."""
    from cm3dmm.baselines import fit_pca

    ec, kw = ctx.ec, ctx.kw()
    rows, region_rows = [], []
    sidx_test = surface_subset(ctx.test.n, ec.surface_faces)
    sidx_train = surface_subset(ctx.train.n, ec.surface_faces) if ctx.train is not None else None
    facts["surface_faces"] = {"test": int(len(sidx_test)),
                              "train": int(len(sidx_train)) if sidx_train is not None else 0}
    fit_seconds: dict[str, list[float]] = {}

    # ---- full-rank PCA of the training faces (one SVD serves every size)
    full = fit_pca(ctx.train_vertices, ctx.faces, dim=min(len(ctx.train_vertices), 3 * ctx.template.n_vertices))
    rank = int(full.rank)
    facts["rank"] = rank
    facts["n_train_faces"] = int(len(ctx.train_vertices))
    facts["explained_variance_cumulative"] = np.cumsum(full.explained_variance).tolist()
    default_pca = None

    for method in ctx.methods:
        fm = ctx.model(method)
        dim = _dim(fm)
        if method == "pca":
            default_pca = dim
        # ---- test subjects: the fit stage's files
        preds, codes_i, codes_e, secs = [], [], [], []
        for subj in ctx.test_subjects:
            z = _read_fit(ctx.paths.fit_npz(method, subj))
            ex = [str(e) for e in z["expressions"]]
            want = [e for s, e in zip(ctx.test.subject, ctx.test.expression) if s == subj]
            if ex != want:
                raise InputError(f"fit of {subj} covers expressions {ex}, the dataset {want}: rerun the fit stage",
                                 ctx.paths.fit_npz(method, subj))
            preds.append(z["vertices"].astype(np.float64))
            codes_i.append(z["z_id"].astype(np.float64).reshape(len(ex), -1))
            codes_e.append(z["z_exp"].astype(np.float64).reshape(len(ex), -1))
            secs.append(float(z["seconds"]) / max(len(ex), 1))
        fit_seconds[method] = secs
        pred = np.concatenate(preds)
        zi, ze = np.concatenate(codes_i), np.concatenate(codes_e)
        s = score_faces(pred, ctx.test.vertices, ctx.faces, surface_idx=sidx_test, labels=ctx.labels,
                        names=ctx.region_names, **kw)
        level_cd = _level_chamfer(ctx, fm, method, zi, ze, ctx.test, sidx_test, s)
        mode = ctx.cfg.fit.mode
        rows.append(_recon_row("test", method, dim, s, ctx, f"fit stage ({_mode_text(fm, mode)})", level_cd))
        if method == "cm3dmm" and fm.shared_identity:
            # the other code sharing, so that the continuous model is seen both ways: per face (every
            # face fitted freely, as PCA is) and per subject (one identity code for all its expressions)
            other = "per-subject" if mode == "per-face" else "per-face"
            zi_o, ze_o, pv_o, _ = _fit_faces(fm, ctx.test, dataclasses.replace(ctx.cfg.fit, mode=other))
            so = score_faces(pv_o, ctx.test.vertices, ctx.faces, surface_idx=sidx_test, **kw)
            rows.append(_recon_row("test", method, dim, so, ctx, f"fitted here ({_mode_text(fm, other)})",
                                   _level_chamfer(ctx, fm, method, zi_o, ze_o, ctx.test, sidx_test, so)))
        for name in ctx.region_names:
            r = s.regions.get(name)
            if r is None:
                continue
            region_rows.append({"Method": method, "Dim": dim, "Region": name,
                                "Vertices": int((ctx.labels == ctx.region_names.index(name)).sum()),
                                COL_VE: r["ve"], COL_RMSE: r["rmse"], COL_CD: r.get("cd", float("nan")),
                                COL_F.format(t=ec.fscore_threshold): r.get("f", float("nan"))})
        # ---- training subset: representation power
        if ctx.train is not None:
            if method == "pca":  # (no level meshes needed: piecewise linear)
                from cm3dmm.baselines import load_baseline

                base = load_baseline(ctx.paths.model("pca"))
                zi_t = ze_t = None
                pv = _fit_pca(base, ctx.train, ctx.cfg.fit, ctx.template)
            else:
                zi_t, ze_t, pv, _ = _fit_faces(fm, ctx.train, ctx.cfg.fit)
            st = score_faces(pv, ctx.train.vertices, ctx.faces, surface_idx=sidx_train, **kw)
            rows.append(_recon_row("train", method, dim, st, ctx, f"fitted here ({_mode_text(fm, ctx.cfg.fit.mode)})",
                                   _level_chamfer(ctx, fm, method, zi_t, ze_t, ctx.train, sidx_train, st)))

    # ---- PCA at the other sizes (fitted here, same fitter): pca_dims and the data's rank
    if "pca" in ctx.methods:
        extra = sorted({min(d, rank) for d in ctx.cfg.baselines.pca_dims if d >= 1} | {rank})
        extra = [d for d in extra if d != default_pca]
        for d in extra:
            pca_d = full.truncate(d)
            note = "= rank of the training data" if d == rank else "fitted here"
            for split, fs in (("test", ctx.test), ("train", ctx.train)):
                if fs is None:
                    continue
                sidx = sidx_test if split == "test" else sidx_train
                pv = _fit_pca(pca_d, fs, ctx.cfg.fit, ctx.template)
                sc = score_faces(pv, fs.vertices, ctx.faces, surface_idx=sidx, **kw)
                lc = {lv: sc.chamfer for lv in ctx.levels if lv > 0}
                rows.append(_recon_row(split, "pca", d, sc, ctx, note, lc))
    rows += _other_sizes(ctx, facts, sidx_test, sidx_train)
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
    return recon, pd.DataFrame(region_rows), pd.DataFrame(sweep)


def _other_sizes(ctx: _Ctx, facts: dict, sidx_test, sidx_train) -> list[dict]:
    """Reconstruction rows of the continuous model at ``evaluate.model_dims`` (its own trained
    models) and of the bilinear model at ``baselines.bilinear_dims`` identity sizes (built here
    from the training faces), each fitted here with the fit stage's fitter."""
    from cm3dmm.baselines import fit_bilinear
    from cm3dmm.methods import baseline_face, load_method
    from cm3dmm.train import extra_model_dims, size_config, size_method

    rows = []
    kw = ctx.kw()
    splits = [("test", ctx.test, sidx_test)] + ([("train", ctx.train, sidx_train)] if ctx.train is not None else [])

    def add(method, fm, note, level_of):
        for split, fs, sidx in splits:
            zi, ze, pv, _ = _fit_faces(fm, fs, ctx.cfg.fit)
            sc = score_faces(pv, fs.vertices, ctx.faces, surface_idx=sidx, **kw)
            rows.append(_recon_row(split, method, _dim(fm), sc, ctx, note, level_of(zi, ze, fs, sidx, sc)))

    for d in extra_model_dims(ctx.cfg):
        path = ctx.paths.model(size_method(d))
        fm = load_method(path, template=ctx.template, expect="cm3dmm")
        if _dim(fm) != d or fm.n_vertices != ctx.template.n_vertices:
            raise InputError(f"holds a model of code size {_dim(fm)} over {fm.n_vertices} vertices, expected "
                             f"{d} over {ctx.template.n_vertices}: retrain it (rule train_size)", path)
        steps = size_config(ctx.cfg, d).train.steps
        add("cm3dmm", fm, f"fitted here ({_mode_text(fm, ctx.cfg.fit.mode)}); trained {steps} steps",
            lambda zi, ze, fs, sidx, sc, fm=fm: _level_chamfer(ctx, fm, "cm3dmm", zi, ze, fs, sidx, sc))
    facts["model_dims"] = extra_model_dims(ctx.cfg)

    facts["bilinear_dims"] = []
    if "bilinear" in ctx.methods and ctx.cfg.baselines.bilinear_dims:
        bc = ctx.cfg.baselines
        seen = {_dim(ctx.model("bilinear"))}
        for n_id in sorted(set(bc.bilinear_dims)):
            base = fit_bilinear(ctx.train_vertices, ctx.train_subject, ctx.train_expression, ctx.faces,
                                n_id, bc.bilinear_exp)
            bfm = baseline_face(base, ctx.template)
            if _dim(bfm) in seen:  # capped at the data's identity rank: the same model again
                continue
            seen.add(_dim(bfm))
            facts["bilinear_dims"].append([int(bfm.id_dim), int(bfm.exp_dim)])
            add("bilinear", bfm, f"fitted here; {bfm.id_dim} x {bfm.exp_dim}",
                lambda zi, ze, fs, sidx, sc: {lv: sc.chamfer for lv in ctx.levels if lv > 0})
    return rows


def _sizes_text(cfg, facts: dict) -> str:
    from cm3dmm.train import size_config

    parts = []
    dims = facts.get("model_dims") or []
    if dims:
        parts.append(
            "- The continuous model at other code sizes (`evaluate.model_dims`): one model per size, trained "
            "on the same cache with the main model's settings except its code sizes (identity + expression "
            "split in the main model's proportion) and its steps: "
            + ", ".join(f"{d} ({c.model.id_dim} + {c.model.exp_dim}, {c.train.steps} steps)"
                        for d, c in ((d, size_config(cfg, d)) for d in dims))
            + f" against the main model's {cfg.train.steps}; fitted here like the training subset.")
    bil = facts.get("bilinear_dims") or []
    if bil:
        parts.append(
            "- The bilinear model at other identity sizes (`baselines.bilinear_dims`): built here from the "
            "training faces with the same Tucker fit as rule `train_baseline` ("
            + ", ".join(f"{i} x {e}" for i, e in bil) + " identity x expression) and fitted here.")
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
def _upsampling(ctx: _Ctx, facts: dict) -> pd.DataFrame:
    from cm3dmm.baselines import fit_bilinear, fit_pca
    from cm3dmm.methods import baseline_face, load_method
    from cm3dmm.upsampling import fraction_method, fraction_tag, make_coarse

    ec, kw = ctx.ec, ctx.kw()
    subjects = select_subjects(ctx.test_subjects, ec.upsampling_subjects)
    test = FaceSet.of(ctx.data, subjects)
    facts["upsampling_subjects"] = subjects
    sidx = surface_subset(test.n, ec.surface_faces)
    rows = []
    facts["upsampling"] = {}
    default_pca = ctx.cfg.baselines.pca_dim or (ctx.cfg.model.id_dim + ctx.cfg.model.exp_dim)
    for frac in ec.upsampling_fractions:
        coarse = make_coarse(ctx.template, frac)
        kept, unseen = coarse.kept, coarse.unseen
        tag = fraction_tag(frac)
        facts["upsampling"][tag] = {"kept": coarse.n_kept, "coarse_triangles": int(len(coarse.faces)),
                                    "outside": int((~coarse.inside).sum())}

        def add(method: str, dim: int, pred: np.ndarray, note: str = ""):
            s = score_faces(pred, test.vertices, ctx.faces, surface_idx=sidx, **kw)
            un = float(s.per_vertex[:, unseen].mean()) if unseen.any() else float("nan")
            rows.append({"Fraction": float(frac), "Seen vertices": coarse.n_kept, "Method": method, "Dim": int(dim),
                         "error, all vertices (mm)": s.mean_vertex_error, "error, unseen vertices (mm)": un,
                         COL_RMSE: s.rmse, COL_CD: s.chamfer, "Note": note})

        # the continuous model trained on the kept vertices, queried at every vertex's UV
        path = ctx.paths.model(fraction_method(frac))
        fm = load_method(path)
        if fm.n_vertices != coarse.n_kept:
            raise InputError(f"the upsampling model has {fm.n_vertices} vertices, the subset of fraction {tag} "
                             f"{coarse.n_kept}: retrain it", path)
        zi, ze = _fit_subset(fm, test, kept, ctx.cfg.fit)
        uv = torch.as_tensor(np.asarray(ctx.template.uv), dtype=fm.dtype)
        with torch.no_grad():
            full = fm.model.decode(uv, torch.as_tensor(zi, dtype=fm.dtype), torch.as_tensor(ze, dtype=fm.dtype))
        add("cm3dmm", _dim(fm), full.double().numpy(), "queried at unseen UVs")
        # baselines trained and fitted on the kept vertices, interpolated on the coarse mesh
        tv = ctx.train_vertices[:, kept]
        for method in ctx.methods:
            if method == "cm3dmm":
                continue
            if method == "pca":
                base = fit_pca(tv, coarse.faces, dim=default_pca)
                cv = _fit_pca(base, test, ctx.cfg.fit, coarse.template, vertex_ids=kept)
                dim = base.dim
            else:
                base = fit_bilinear(tv, ctx.train_subject, ctx.train_expression, coarse.faces,
                                    ctx.cfg.baselines.bilinear_id, ctx.cfg.baselines.bilinear_exp)
                bfm = baseline_face(base, coarse.template)
                zi_b, ze_b = _fit_subset(bfm, test, kept, ctx.cfg.fit)
                cv = bfm.vertices(torch.as_tensor(zi_b, dtype=bfm.dtype), torch.as_tensor(ze_b, dtype=bfm.dtype))
                dim = _dim(bfm)
            add(method, dim, coarse.interpolate(cv), "barycentric on the coarse mesh")
        # the best any coarse-mesh interpolation can do: the true kept vertices, interpolated
        add("coarse target", 0, coarse.interpolate(test.vertices[:, kept]), "oracle: true seen vertices")
    return pd.DataFrame(rows)


def _fit_subset(fm, faces: FaceSet, kept: np.ndarray, fit_cfg):
    """Fit on the kept vertices only: targets (B, K, 3) against a model over those K vertices."""
    sub = FaceSet(faces.subject, faces.expression, faces.vertices[:, kept])
    zi, ze, _, _ = _fit_faces(fm, sub, fit_cfg)
    return zi, ze


# --------------------------------------------------------------------------- timing
def _train_seconds(ctx: _Ctx, method: str) -> float:
    """Training wall time: the last ``elapsed_s`` of ``train_log.csv`` (continuous models) or the
    baseline's ``summary.json`` ``train_seconds``."""
    log_path = ctx.paths.train_log(method)
    if log_path.exists():
        df = pd.read_csv(log_path)
        if "elapsed_s" in df and len(df):
            return float(df["elapsed_s"].iloc[-1])
    summ = ctx.paths.model_dir(method) / "summary.json"
    if summ.exists():
        return float(json.loads(summ.read_text()).get("train_seconds", float("nan")))
    return float("nan")


def _timing(ctx: _Ctx, facts: dict) -> pd.DataFrame:
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
def _protocol(ctx: _Ctx, facts: dict) -> str:
    from cm3dmm.baselines import RANK_TOL

    ec, fc = ctx.ec, ctx.cfg.fit
    rank, n_train = facts["rank"], facts["n_train_faces"]
    ev = facts["explained_variance_cumulative"]
    tst = ", ".join(ctx.test_subjects)
    trs = ", ".join(ctx.train_subjects) if ctx.train_subjects else "(none: evaluate.train_subjects = 0)"
    sf = facts.get("surface_faces", {})
    lines = [
        f"# Evaluation protocol: run `{ctx.cfg.run}`",
        "",
        "Every number in the tables beside this file was computed by `cm3dmm evaluate` "
        "(`cm3dmm.evaluate.run_evaluate`) as described here. Units: millimetres.",
        "",
        "## Data",
        f"- Source `{ctx.data.source}`: {ctx.data.n_samples} registered faces, {ctx.data.n_vertices} vertices, "
        f"{len(ctx.data.faces)} triangles each (`data/registered.h5`).",
        f"- Test subjects ({len(ctx.test_subjects)}, {ctx.test.n} faces, every expression each): {tst}.",
        f"- Training split: {len(ctx.train_subjects_all)} subjects, {n_train} faces. Representation power is "
        f"measured on {len(ctx.train_subjects)} of them chosen evenly in file order "
        f"(`evaluate.train_subjects` = {ec.train_subjects}): {trs}"
        + (f" ({ctx.train.n} faces)." if ctx.train is not None else "."),
        f"- **Rank of the training data**: the mean-centred training faces ({n_train} x {3 * ctx.data.n_vertices} "
        f"coordinates) have numerical rank **{rank}** (singular values above {RANK_TOL:g} of the largest). A PCA with "
        f"{rank} components reproduces every training face exactly (up to the fit's prior); its training rows "
        "in `reconstruction` must show (near) zero error. Cumulative explained variance: "
        + ", ".join(f"{d} -> {ev[d - 1]:.4f}" for d in sorted({1, 2, 4, 8, 16, 32, 64, rank}) if d <= len(ev)) + ".",
        "",
        "## Fits",
        f"- Test subjects: the `fit` stage's files `fits/{{method}}/{{subject}}.npz` (optimiser `{fc.optimizer}`, "
        f"mode `{fc.mode}`, max_iter {fc.max_iter}, prior_weight {fc.prior_weight:g}, points {fc.points}, "
        f"polish_iters {fc.polish_iters}), fitted to the registered test meshes (vertex correspondence).",
        "- Training subset: fitted here by the same function (`cm3dmm.fit.fit_registered`) with the same "
        "settings, per subject (all its expressions at once)"
        + (". PCA fits made here (training subset, other sizes, upsampling) use the closed form of the same "
           "objective (`fit_pca_closed`: the regularised normal equations, which the fitter solves exactly in "
           "one step)." if getattr(fc, "loss", "squared") == "squared" else
           f", objective `fit.loss = {getattr(fc, 'loss', '')}`."),
        "- PCA sizes other than the trained one are truncations of one exact PCA of all training faces "
        "(`cm3dmm.baselines.fit_pca`); a requested size above the rank is reported at the rank.",
        _sizes_text(ctx.cfg, facts),
        "",
        "## Metrics (`cm3dmm.metrics`)",
        "- **mean vertex error**: per face the mean Euclidean distance between corresponding vertices of fit "
        "and target; the table gives the mean over faces (the quantity the paper calls \"MSE (mm)\").",
        "- **RMSE**: root mean square of the vertex distances over every vertex of every face.",
        f"- **CD** (Chamfer distance): {ec.chamfer_points} points sampled uniformly by area on each mesh "
        f"(target samples with seed {ec.seed}, prediction samples with seed {ec.seed + 1}, the same for every "
        "method), exact point-to-surface distances to the other mesh, CD = (mean pred->target + mean "
        "target->pred) / 2 (unsquared). Target surface: the registered mesh. Mean over faces.",
        "- **NC**: mean |cos| between the face normal at each sample and at its closest point on the other "
        "mesh, both directions.",
        f"- **F@{ec.fscore_threshold:g}mm**: F-score of the same samples at {ec.fscore_threshold:g} mm "
        "(precision: prediction samples within the threshold of the target; recall: the reverse).",
        f"- Surface metrics (CD, NC, F) are computed on {sf.get('test', 0)} test faces and {sf.get('train', 0)} "
        f"training faces (`evaluate.surface_faces` = {ec.surface_faces}; 0 = every face; faces chosen evenly); "
        "vertex errors always on every face.",
        "- **CD Ll**: the continuous model decoded at the points of upsampling level l (each template "
        "triangle split into 4^l, `template/template.npz`) against the registered target. Baselines are "
        "piecewise linear on the template triangles, so their level-l surface is their level-0 surface and "
        "their level-0 CD is repeated.",
        "- **regions**: vertex errors over the vertices of each template region (`template.regions`); region "
        "CD / F assign each surface sample to the region of its nearest triangle corner on the prediction.",
        "",
        "## PCA sweep (`pca_sweep`)",
        f"- Sizes 1..{rank} (every size up to {SWEEP_ALL_UP_TO}, log-spaced above), mean vertex error of the "
        f"regularised least-squares fit (closed form; squared distances plus prior_weight x V = "
        f"{fc.prior_weight:g} x {ctx.data.n_vertices} times the code prior, i.e. the fit stage's objective "
        "with `fit.loss = squared`), on the test faces and the training subset; the last column "
        "without the prior (plain least squares: exactly 0 at the rank on training faces).",
        "",
        "## Semantic upsampling (`upsampling`)",
        f"- Test subjects: {', '.join(facts.get('upsampling_subjects', []))} (`evaluate.upsampling_subjects` = "
        f"{ec.upsampling_subjects}; spread evenly, 0 = all), every expression.",
        "- For each fraction f in `evaluate.upsampling_fractions`: K = ceil(f V) template vertices chosen by "
        "farthest-point sampling on the mean face (3-D, starting at the vertex nearest its centroid), "
        "triangulated by a Delaunay triangulation of their UVs (triangles whose UV centroid lies off the "
        "template's chart dropped). Every template vertex is located on this coarse mesh in UV.",
        "- cm3dmm: a continuous model trained only on the kept vertices (`models/cm3dmm_frac{f}/`, "
        f"{ec.upsampling_steps or ctx.cfg.train.steps} steps, no continuous surface samples, the coarse mesh as "
        "its template so its average face is the coarse mean), fitted to the kept vertices of each test face, "
        "then queried at the UV of every template vertex"
        + (f" (its field between the kept vertices: `model.interpolation = {ctx.cfg.model.interpolation}`, "
           f"smoothness {ctx.cfg.model.smoothness:g}, `cm3dmm.nn.smooth`)." if ctx.cfg.model.interpolation == "smooth"
           else ".")
        + " Rows `cm3dmm` of the reconstruction table say how its codes were fitted: per face (like PCA) or "
        "with one identity code shared by a subject's expressions.",
        "- pca / bilinear: trained on the kept vertices of all training faces, fitted to the kept vertices "
        "of each test face, then interpolated barycentrically on the coarse mesh to every vertex.",
        "- coarse target: the test face's own kept vertices interpolated the same way (the best any "
        "interpolation of the coarse mesh can do).",
        "- error columns: mean vertex error over all V vertices and over the unseen (V - K) vertices only; "
        "CD as above against the full registered target.",
        "",
        "## Scan fits",
        "- Correspondence-free fits of scans made from the test faces: rule `scan_fits`, its table "
        "`scan_fits.md` and its own protocol `scan_fits_protocol.md` beside this file.",
        "",
        "## Timing (`timing`)",
        "- training: the wall time recorded by training (`train_log.csv` elapsed_s, or the baseline's "
        "`summary.json`), on the machine that trained.",
        "- fit per face: the fit stage's `timings_s.per_face` (`fits/{method}/{subject}.json`), mean over "
        "test subjects.",
        f"- mesh generation: measured here: one face (the prior-mean codes) meshed at each upsampling level, "
        f"median of {max(1, ec.timing_repeats)} runs after one warm-up, single process, "
        f"{torch.get_num_threads()} torch threads.",
        "",
    ]
    up = facts.get("upsampling", {})
    if up:
        lines += ["## Coarse meshes", ""]
        lines += [f"- f = {k}: {v['kept']} vertices, {v['coarse_triangles']} triangles, {v['outside']} "
                  "template vertices outside them (nearest boundary point used)" for k, v in up.items()]
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------- entry point
def run_evaluate(cfg) -> Evaluation:
    """The ``evaluate`` stage: every table of ``results/{run}/tables/`` and ``protocol.md``."""
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    t0 = time.perf_counter()
    ctx = _Ctx(cfg)
    facts: dict = {}
    recon, regions, sweep = _reconstruction(ctx, facts)
    log.info("evaluate: reconstruction done (%.1f s)", time.perf_counter() - t0)
    upsampling = _upsampling(ctx, facts) if ctx.ec.upsampling_fractions else \
        pd.DataFrame({"Note": ["no upsampling fractions configured (evaluate.upsampling_fractions)"]})
    log.info("evaluate: upsampling done (%.1f s)", time.perf_counter() - t0)
    timing = _timing(ctx, facts)
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
    atomic_write_text(protocol.with_suffix(".html"), markdown_to_html(text, "evaluation protocol"))
    atomic_write_json(out / "facts.json", facts)
    log.info("evaluate: %d tables -> %s (%.1f s)", len(written), out, time.perf_counter() - t0)
    return Evaluation(tables=tables, paths=written, protocol=protocol, rank=rank, facts=facts)

"""Models and fits of the reconstruction table beyond the main ones (rules ``train_size`` and
``fit_size``).

    run_train_size(cfg, dim)      rule train_size: the continuous model at another code size
                                  -> models/cm3dmm_dim{dim}/model.pt
    run_fit_size(cfg, variant)    rule fit_size: one variant's fits of the test subjects and of the
                                  training subset -> fits/{variant}/{subject}.npz|json (+ the first
                                  subject's .png)

The variants (:func:`cm3dmm.paths.size_variants`):

* ``cm3dmm_{mode}`` — the main continuous model fitted with the other code sharing than the fit
  stage's ``fit.mode`` (per face, as PCA is, or one identity code per subject), test subjects;
* ``cm3dmm_dim{d}`` — the continuous model of code size ``d`` (``evaluate.model_dims``, trained by
  rule ``train_size``);
* ``pca_dim{d}`` / ``pca_rank`` — one exact PCA of every training face truncated to ``d``
  (``baselines.pca_dims``; at most the data's rank) / to the rank of the training data;
* ``bilinear_id{n}`` — the bilinear model with ``n`` identities (``baselines.bilinear_dims``), built
  here with the same Tucker fit as rule ``train_baseline``.

Every fit is the fit stage's: :func:`cm3dmm.fit.fit_registered` with ``cfg.fit`` per subject (all
its expressions at once), written by :func:`cm3dmm.fit.write_fit`; PCA with ``fit.loss =
squared`` is solved in closed form (:func:`pca_closed_codes`, the regularised normal equations the
fitter solves). ``cm3dmm evaluate`` only reads these files.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError
from cm3dmm.geometry import even_indices
from cm3dmm.paths import FIT_MODES, MAIN, RunPaths, extra_model_dims, size_method, size_variants

log = logging.getLogger(__name__)

__all__ = ["run_train_size", "run_fit_size", "size_config", "size_method", "extra_model_dims", "pca_closed_codes", "fit_faces", "write_subject_fits",
           "select_subjects", "train_subset", "split_variant"]


# --------------------------------------------------------------------------- rule train_size
def size_config(cfg, dim: int):
    """The configuration of the extra-size continuous model ``dim`` (``evaluate.model_dims``).

    ``id_dim + exp_dim = dim``, split in the main model's proportion (each at least 1);
    ``train.steps`` = ``evaluate.model_dims_steps`` when > 0. Everything else is the main model's.
    """
    from cm3dmm.train import with_steps

    dim = int(dim)
    if dim < 2:
        raise InputError(f"evaluate.model_dims: a code size must be >= 2 (identity + expression), got {dim}")
    mc = cfg.model
    id_dim = min(max(1, round(dim * mc.id_dim / (mc.id_dim + mc.exp_dim))), dim - 1)
    model = dataclasses.replace(mc, id_dim=id_dim, exp_dim=dim - id_dim)
    tr = with_steps(cfg.train, cfg.evaluate.model_dims_steps or cfg.train.steps)
    return dataclasses.replace(cfg, model=model, train=tr)


def run_train_size(cfg, dim: int | str):
    """Stage entry (rule ``train_size``): the continuous model at code size ``dim`` ->
    ``models/cm3dmm_dim{dim}/model.pt`` (+ log, loss plot), for the reconstruction table."""
    from cm3dmm.train import run_train

    try:
        dim = int(dim)
    except (TypeError, ValueError):
        raise InputError(f"--dim: expected an integer code size, got {dim!r}") from None
    scfg = size_config(cfg, dim)
    log.info("size model %s: id_dim %d + exp_dim %d, %d steps", size_method(dim), scfg.model.id_dim,
             scfg.model.exp_dim, scfg.train.steps)
    return run_train(scfg, size_method(dim))


# --------------------------------------------------------------------------- subjects
def select_subjects(subjects: list[str], n: int) -> list[str]:
    """``n`` subjects spread evenly over ``subjects`` (all when n <= 0 or n >= len)."""
    return [subjects[i] for i in even_indices(len(subjects), n)]


def train_subset(cfg, train_subjects: list[str]) -> list[str]:
    """The training subjects fitted for representation power (``evaluate.train_subjects``; 0 = none)."""
    n = cfg.evaluate.train_subjects
    return select_subjects(train_subjects, n) if n > 0 else []


# --------------------------------------------------------------------------- fitting and writing
def pca_closed_codes(pca, targets: np.ndarray, prior_weight: float) -> np.ndarray:
    """The fit stage's PCA fit in closed form: codes (B, D) of targets (B, V, 3).

    The fitter minimises ``mean_v |x_v - t_v|^2 + prior_weight * |c / std|^2`` per face; times V this
    is a ridge objective with ``reg = prior_weight * V``, and with orthonormal components its normal
    equations are diagonal: ``c_k = <t - mean, phi_k> / (1 + reg / std_k^2)``.
    """
    t = np.asarray(targets, np.float64)
    reg = float(prior_weight) * t.shape[1]
    comps = pca.components.reshape(pca.dim, -1)
    proj = (t - pca.mean).reshape(len(t), -1) @ comps.T
    return proj / (1.0 + reg / np.maximum(pca.std, 1e-12) ** 2)


def fit_pca_closed(pca, targets: np.ndarray, prior_weight: float) -> np.ndarray:
    """Fitted vertices (B, V, 3) of :func:`pca_closed_codes`."""
    return pca.decode(pca_closed_codes(pca, targets, prior_weight))


def fit_faces(fm, targets: np.ndarray, fc, pca=None):
    """One subject's faces (B, M, 3) fitted by the fit stage -> :class:`cm3dmm.fit.FitResult`.

    ``pca``: the :class:`cm3dmm.baselines.PCAModel` behind ``fm``; with ``fc.loss == "squared"``
    its fit is the closed form (:func:`pca_closed_codes`), otherwise the fitter's.
    """
    from cm3dmm.fit import FitResult, SolveInfo, fit_registered
    from cm3dmm.rigid import Similarity

    if pca is None or fc.loss != "squared":
        return fit_registered(fm, targets, fc)
    t = np.asarray(targets, np.float64)
    t0 = time.perf_counter()
    codes = pca_closed_codes(pca, t, fc.prior_weight)
    verts = pca.decode(codes)
    secs = time.perf_counter() - t0
    ve = np.linalg.norm(verts - t, axis=-1)
    return FitResult(codes, np.zeros((len(t), 0)), verts, ve.mean(1), ve, [Similarity() for _ in t], False,
                     SolveInfo(status="converged", iterations=1), secs, {"solve_s": secs}, target_vertices=t)


def write_subject_fits(fm, data, subjects: list[str], fc, paths: RunPaths, name: str,
                       vertex_ids: np.ndarray | None = None, pca=None) -> list[Path]:
    """Fit each subject's faces (every expression, file order; only ``vertex_ids`` of each when
    given) and write ``fits/{name}/{subject}.npz|json`` (:func:`cm3dmm.fit.write_fit`) plus the
    figure ``.png`` of the first subject (a picture per subject costs ~1.8 s each, a quarter of a
    variant's job; the fit stage draws every subject of the main methods)."""
    from cm3dmm.fit import write_fit

    written = []
    for subject in subjects:
        idx = [i for i, s in enumerate(data.subject) if s == subject]
        if not idx:
            raise InputError(f"subject {subject!r} is not in the dataset")
        targets = np.asarray(data.vertices[idx], np.float64)
        if vertex_ids is not None:
            targets = targets[:, vertex_ids]
        result = fit_faces(fm, targets, fc, pca)
        out = paths.fit_npz(name, subject)
        write_fit(out, result, fm, name, subject, [data.expression[i] for i in idx], "registered", fc,
                  picture=not written)
        written.append(out)
    return written


def split_variant(variant: str) -> tuple[str, str, int | None]:
    """``variant`` -> (method, kind, number): ``cm3dmm_per-face`` -> (cm3dmm, mode, None),
    ``cm3dmm_dim32`` -> (cm3dmm, dim, 32), ``pca_rank`` -> (pca, rank, None), ``pca_dim8`` ->
    (pca, dim, 8), ``bilinear_id10`` -> (bilinear, id, 10)."""
    if variant in (f"{MAIN}_{m}" for m in FIT_MODES):
        return MAIN, "mode", None
    if variant == "pca_rank":
        return "pca", "rank", None
    m = re.fullmatch(r"(cm3dmm|pca)_dim([0-9]+)|(bilinear)_id([0-9]+)", variant)
    if m is None:
        raise InputError(f"--variant: unknown fit variant {variant!r} (expected cm3dmm_per-face, "
                         "cm3dmm_per-subject, cm3dmm_dim{N}, pca_dim{N}, pca_rank or bilinear_id{N})")
    if m.group(1):
        return m.group(1), "dim", int(m.group(2))
    return "bilinear", "id", int(m.group(4))


# --------------------------------------------------------------------------- rule fit_size
def run_fit_size(cfg, variant: str) -> list[Path]:
    """Stage entry (rule ``fit_size``): the fits of one variant (module docstring) ->
    ``fits/{variant}/{subject}.npz|json|png`` for the test subjects and the training subset."""
    from cm3dmm.methods import baseline_face, load_method
    from cm3dmm.registered import read_run_inputs

    method, kind, number = split_variant(variant)
    if variant not in size_variants(cfg):
        log.warning("fit variant %s is not one the configuration asks for (%s)", variant,
                    ", ".join(size_variants(cfg)))
    paths = RunPaths.of(cfg.run_dir)
    template, data = read_run_inputs(paths)
    test = data.subjects("test")
    if not test:
        raise InputError("the dataset has no test subjects", paths.registered)
    subjects = test if kind == "mode" else test + train_subset(cfg, data.subjects("train"))
    fc, pca = cfg.fit, None
    if method == MAIN:
        if kind == "mode":
            path = paths.model(MAIN)
            fm = load_method(path, template=template, expect=MAIN)
            fc = dataclasses.replace(cfg.fit, mode=variant[len(MAIN) + 1:])
        else:
            path = paths.model(size_method(number))
            fm = load_method(path, template=template, expect=MAIN)
            if fm.id_dim + fm.exp_dim != number or fm.n_vertices != template.n_vertices:
                raise InputError(f"holds a model of code size {fm.id_dim + fm.exp_dim} over {fm.n_vertices} "
                                 f"vertices, expected {number} over {template.n_vertices}: retrain it (rule "
                                 "train_size)", path)
    else:
        idx = data.indices("train")
        if len(idx) < 2:
            raise InputError("the train split has fewer than 2 faces", paths.registered)
        tv = np.asarray(data.vertices[idx], np.float64)
        faces = np.asarray(template.faces)
        if method == "pca":
            from cm3dmm.baselines import fit_pca

            full = fit_pca(tv, faces, dim=min(len(tv), 3 * template.n_vertices))
            pca = full.truncate(int(full.rank) if kind == "rank" else min(number, int(full.rank)))
            fm = baseline_face(pca, template)
        else:
            from cm3dmm.baselines import fit_bilinear

            base = fit_bilinear(tv, [data.subject[i] for i in idx], [data.expression[i] for i in idx], faces,
                                number, cfg.baselines.bilinear_exp)
            fm = baseline_face(base, template)
    log.info("fit_size %s: %s model of %d + %d codes, %d subjects", variant, method, fm.id_dim, fm.exp_dim,
             len(subjects))
    return write_subject_fits(fm, data, subjects, fc, paths, variant, pca=pca)

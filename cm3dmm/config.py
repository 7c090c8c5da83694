"""Typed configuration: dataclasses built from YAML at the entry point only.

``load_config(path)`` reads a YAML file (or a dict, as Snakemake hands over) into
:class:`Config`. Unknown keys, wrong types and out-of-range values are :class:`InputError`
naming the key (``train.lr: expected a number, got 'fast'``). Nothing here parses the
command line; nothing parses at import time.

Every field has a docstring-style comment; the YAML files in ``config/`` show the defaults.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cm3dmm.errors import InputError
from cm3dmm.registered import FACESCAPE_EXPRESSIONS


# --------------------------------------------------------------------------- data sources
@dataclass
class AnnySourceConfig:
    n_subjects: int = 40  #: identities sampled from anny's phenotype + face-shape parameters
    seed: int = 0  #: seed of the identity and per-subject expression sampling
    identity_scale: float = 1.0  #: scales the spread of the face-shape parameter distribution
    expression_variation: float = 0.3  #: relative per-subject jitter of each recipe's weights
    intensity_range: list[float] = field(default_factory=lambda: [0.7, 1.15])  #: per-subject intensity


@dataclass
class ICTSourceConfig:
    path: str = "../shared/data/ICT-FaceKit"  #: checkout root or its FaceXModel/ folder
    n_subjects: int = 300  #: identities sampled as neutral + sum w_k (identity_k - neutral)
    n_components: int = 100  #: identity components used (<= 100)
    seed: int = 0
    region: str = "face"  #: "face" (vertices 0-9408) or "narrow" (0-6705)
    expression_variation: float = 0.3
    intensity_range: list[float] = field(default_factory=lambda: [0.7, 1.15])


@dataclass
class FaceScapeSourceConfig:
    path: str = ""  #: folder holding {id}/models_reg/{k}_{name}.obj
    identities: list[int] = field(default_factory=lambda: list(range(1, 301)))
    expressions: list[str] = field(default_factory=lambda: list(FACESCAPE_EXPRESSIONS))
    crop: str = ""  #: vertex-index file (.txt/.npy) or UV-space mask image (.png); "" = whole mesh
    units: str = "mm"  #: units of the OBJ files: mm | cm | m
    allow_missing: bool = True  #: missing (subject, expression) pairs are reported, not fatal
    scans: str = ""  #: optional folder of detail scans {id}/{k}_{name}.ply|obj[.gz] (continuous samples)


@dataclass
class ManifestSourceConfig:
    path: str = ""  #: CSV with columns subject, expression, path[, split]
    units: str = "mm"  #: mm | cm | m
    crop: str = ""  #: optional vertex-index file


@dataclass
class SplitConfig:
    test_subjects: list[str] = field(default_factory=list)  #: explicit test subjects (wins)
    test_fraction: float = 0.1  #: otherwise this fraction of subjects, chosen with ``seed``
    seed: int = 0


@dataclass
class DataConfig:
    source: str = "anny"  #: anny | ict | facescape | manifest
    anny: AnnySourceConfig = field(default_factory=AnnySourceConfig)
    ict: ICTSourceConfig = field(default_factory=ICTSourceConfig)
    facescape: FaceScapeSourceConfig = field(default_factory=FaceScapeSourceConfig)
    manifest: ManifestSourceConfig = field(default_factory=ManifestSourceConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    preview: bool = True  #: render data/preview.png (a few subjects x all expressions)
    preview_subjects: int = 3


# --------------------------------------------------------------------------- template, cache
@dataclass
class TemplateConfig:
    unwrap: str = "auto"  #: auto (source UVs when valid) | source | harmonic | lscm
    levels: int = 3  #: upsampling levels 0..levels
    uv_grids: list[int] = field(default_factory=list)  #: extra uniform UV grid densities
    mask_resolution: int = 256  #: UV mask raster size (pixels per side)
    margin: float = 0.02  #: UV margin inside [0, 1]^2 for computed unwrappings


@dataclass
class CacheConfig:
    n_continuous: int = 8000  #: area-weighted surface points per sample
    n_heldout: int = 2000  #: held-out surface points per training sample (validation only)
    scan_distance: float = 0.3  #: mm; scan points farther from the registered surface are dropped
    seed: int = 0


# --------------------------------------------------------------------------- model
@dataclass
class EncoderConfig:
    backend: str = "dense"  #: dense | hash | seed-compatible | tcnn | auto
    n_levels: int = 8
    n_features: int = 4  #: features per level
    base_resolution: int = 4
    finest_resolution: int = 128
    log2_table_size: int = 15  #: hash table entries per level (2^x)


@dataclass
class DecoderConfig:
    widths: list[int] = field(default_factory=lambda: [256, 128, 64])
    activation_scale: float = 3.0  #: tanh(k x)
    output_scale: float = 3.0  #: output multiplied by this (mm)
    weight_norm: bool = True
    uv_skip: bool = True  #: concatenate UV features to every hidden layer's input


@dataclass
class ModelConfig:
    id_dim: int = 64
    exp_dim: int = 64
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    #: a linear basis field inside the model: f(uv, z) = B(uv) z + r(uv, z), B a per-vertex basis
    #: interpolated at uv and initialised from the PCA of the training faces (False: r only, the release)
    basis: bool = False
    #: how per-vertex quantities (the average face, the basis) are evaluated between vertices:
    #: linear (barycentric) | smooth (partition of unity of local quadratic fits, cm3dmm.nn.smooth)
    interpolation: str = "linear"
    #: smooth interpolation only: weight of the quadratic fits against barycentric (0..1)
    smoothness: float = 0.5


@dataclass
class TrainConfig:
    preset: str = ""  #: "" | paper | cpu — fills model/train defaults before the file's own keys
    code_mode: str = "per-face"  #: per-face (release) | per-subject identity codes
    #: continuous points: surface (interpolated on the registered mesh) | scan (the face's scan points
    #: near it, as the release; faces without a scan use surface points)
    continuous: str = "surface"
    steps: int = 3000  #: optimiser steps
    batch_faces: int = 8
    vertex_points: int = 2000
    continuous_points: int = 1000
    lr: float = 1e-3
    code_lr: float = 1e-3
    lr_milestones: list[float] = field(default_factory=lambda: [0.6, 0.85])  #: fractions of steps
    lr_gamma: float = 0.3
    reg_weight: float = 0.1  #: weight of the cosine embedding losses
    prior_weight: float = 0.3  #: weight of the code mean / std priors
    code_std: float = 0.01
    #: learning rate of the linear basis (model.basis; 0 = frozen at its PCA start)
    basis_lr: float = 1e-4
    checkpoint_every: int = 500
    validate_every: int = 250
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  #: torch threads; 0 = torch's default
    log_every: int = 10  #: a train_log.csv row (mean loss terms since the last row) every N steps
    val_faces: int = 128  #: training faces whose held-out points are validated periodically; 0 = all
    resume: bool = True  #: continue from checkpoints/last.pt of the same configuration (false: start afresh)


@dataclass
class FitConfig:
    mode: str = "per-subject"  #: per-subject (shared identity) | per-face
    optimizer: str = "lm"  #: lm (Levenberg-Marquardt) | lbfgs | adam (release protocol)
    max_iter: int = 30  #: lm: iterations of all subset stages together (the fit's budget)
    tol: float = 1e-6  #: relative decrease of the objective that counts as converged
    prior_weight: float = 1e-6  #: weight of the Gaussian code prior (per standardised code dimension)
    scan_iters: int = 5  #: alternations of rigid refinement and code fitting for raw scans
    #: raw scans: the code prior's weight in the last alternation is at least this (the prior is annealed
    #: from cm3dmm.fit.scanfit.SCAN_PRIOR_START down to max(prior_weight, this)); > 0 keeps the parts a
    #: partial scan misses from drifting (PCA on anny mouth-hole scans: 3.58 mm at 0, 2.75 at 1e-4)
    scan_prior_floor: float = 0.0
    trim: float = 0.1  #: fraction of worst correspondences ignored for partial scans
    level: int = 0  #: upsampling level of the written meshes
    points: int = 600  #: lm: target points per face of the main stage (random subset; 0 = all)
    coarse_points: int = 150  #: lm: points per face of a first, cheaper stage (0 = none)
    coarse_iters: int = 20  #: lm: at most this many of the max_iter iterations on the coarse points
    polish_iters: int = 0  #: lm: iterations on all points after the subset stages
    damping: float = 1e-2  #: lm: initial Marquardt damping (carried over from stage to stage)
    units: str = "auto"  #: units of user scans: mm | cm | m | auto (the unit that makes it face-sized)
    scale: bool = False  #: estimate a scale in the rigid alignment of scans (else rigid only)
    scan_points: int = 5000  #: scan points per alternation for scan->model correspondences (random subset; 0 = all)
    loss: str = "distance"  #: distance (mean point distance, the release's loss and the error metric) | squared


@dataclass
class BaselineConfig:
    methods: list[str] = field(default_factory=lambda: ["pca", "bilinear"])
    pca_dim: int = 0  #: 0 = the continuous model's id_dim + exp_dim
    pca_dims: list[int] = field(default_factory=lambda: [32, 64])  #: extra sizes for the tables
    bilinear_id: int = 50
    bilinear_exp: int = 52
    #: extra identity sizes of the bilinear model for the reconstruction table (expression size
    #: stays bilinear_exp; each is fitted in the evaluate stage)
    bilinear_dims: list[int] = field(default_factory=lambda: [10, 25])


@dataclass
class EvaluateConfig:
    levels: list[int] = field(default_factory=lambda: [0, 1, 2])
    fscore_threshold: float = 1.0  #: mm
    chamfer_points: int = 10000  #: area-weighted surface samples per mesh for CD / NC / F
    upsampling_fractions: list[float] = field(default_factory=lambda: [0.0625, 0.25, 1.0])
    upsampling_steps: int = 1000  #: training steps for the upsampling models (0 = train.steps)
    upsampling_subjects: int = 4  #: test subjects of the upsampling experiment (spread evenly; 0 = all)
    #: extra code sizes (id_dim + exp_dim, split in the main model's proportion) of the continuous
    #: model for the reconstruction table: one model each, trained like the main one
    model_dims: list[int] = field(default_factory=lambda: [32, 64])
    model_dims_steps: int = 0  #: training steps of the model_dims models (0 = train.steps)
    figures: bool = True
    train_subjects: int = 2  #: training subjects fitted for representation power (spread evenly; 0 = none)
    surface_faces: int = 10  #: faces per method and split that get CD / NC / F (spread evenly; 0 = all)
    seed: int = 0  #: seed of the surface samples of the Chamfer-type metrics
    timing_repeats: int = 3  #: runs (after one warm-up) whose median is the mesh-generation time


@dataclass
class ReleaseConfig:
    """The paper release's public artifacts (``cm3dmm import-release``, rule ``import_release``)."""

    checkpoint: str = ""  #: the release's checkpoint (torch.save dict with "state_dict")
    predefined: str = ""  #: the release's predefined_model_data/ folder
    exp_num: int = 20  #: expressions per identity of the code tables (row = identity * exp_num + expression)
    base_resolution: int = 4  #: the release's hash-grid settings (not stored in its checkpoint)
    finest_resolution: int = 128
    log2_table_size: int = 15


@dataclass
class ScanFitConfig:
    """The scan-fit table (cm3dmm.scanfit_eval): test faces turned into raw scans and fitted."""

    subjects: int = 1  #: test subjects (spread evenly; 0 = all); 1 keeps the default run within its 15 min
    expressions: int = 2  #: expressions per subject (spread evenly; 0 = all)
    #: full | normals | frontal | side | mouth-hole
    variants: list[str] = field(default_factory=lambda: ["full", "normals", "frontal", "side", "mouth-hole"])
    methods: list[str] = field(default_factory=list)  #: methods fitted (empty = cm3dmm + baselines.methods)
    points: int = 20000  #: area-weighted surface samples per scan (before the partial variants' cuts)
    noise_mm: float = 0.3  #: Gaussian noise per coordinate
    rot_min: float = 5.0  #: degrees of the random rotation (uniform in [rot_min, rot_max])
    rot_max: float = 25.0
    shift_mm: float = 50.0  #: random translation per axis (uniform in +-shift_mm)
    distance_mm: float = 500.0  #: added distance from the scanner along z
    seed: int = 0


@dataclass
class Config:
    run: str = "default"  #: results/{run}/
    results: str = "results"
    data: DataConfig = field(default_factory=DataConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    fit: FitConfig = field(default_factory=FitConfig)
    baselines: BaselineConfig = field(default_factory=BaselineConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    scan_fits: ScanFitConfig = field(default_factory=ScanFitConfig)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.results) / self.run


# --------------------------------------------------------------------------- validation
_CHOICES = {
    "data.source": ("anny", "ict", "facescape", "manifest"),
    "data.ict.region": ("face", "narrow"),
    "data.facescape.units": ("mm", "cm", "m"),
    "data.manifest.units": ("mm", "cm", "m"),
    "template.unwrap": ("auto", "source", "harmonic", "lscm"),
    "model.encoder.backend": ("dense", "hash", "seed-compatible", "tcnn", "auto"),
    "model.interpolation": ("linear", "smooth"),
    "train.preset": ("", "paper", "cpu"),
    "train.code_mode": ("per-face", "per-subject"),
    "train.continuous": ("surface", "scan"),
    "fit.mode": ("per-subject", "per-face"),
    "fit.optimizer": ("lm", "lbfgs", "adam"),
    "fit.units": ("mm", "cm", "m", "auto"),
    "fit.loss": ("distance", "squared"),
}
_POSITIVE = {
    "data.anny.n_subjects", "data.ict.n_subjects", "data.ict.n_components", "template.mask_resolution",
    "cache.n_continuous", "model.id_dim", "model.exp_dim", "model.encoder.n_levels",
    "model.encoder.n_features", "model.encoder.base_resolution", "model.encoder.finest_resolution",
    "model.encoder.log2_table_size", "train.steps", "train.batch_faces", "train.vertex_points",
    "train.lr", "train.code_lr", "train.checkpoint_every", "train.validate_every", "train.log_every", "fit.max_iter",
    "baselines.bilinear_id", "baselines.bilinear_exp", "evaluate.chamfer_points",
    "scan_fits.points",
}
_NONNEGATIVE = {
    "template.levels", "train.basis_lr", "model.smoothness", "cache.n_heldout", "cache.scan_distance", "train.continuous_points",
    "train.reg_weight", "train.prior_weight", "fit.prior_weight", "fit.tol", "fit.level",
    "fit.points", "fit.polish_iters", "fit.scan_points", "fit.scan_prior_floor", "fit.coarse_points", "fit.coarse_iters", "fit.damping",
    "train.threads", "train.val_faces", "baselines.pca_dim", "evaluate.upsampling_steps", "data.preview_subjects",
    "evaluate.train_subjects", "evaluate.surface_faces", "evaluate.timing_repeats", "evaluate.upsampling_subjects",
    "evaluate.model_dims_steps",
    "scan_fits.subjects", "scan_fits.expressions", "scan_fits.noise_mm", "scan_fits.rot_min", "scan_fits.rot_max",
    "scan_fits.shift_mm", "scan_fits.distance_mm",
}
#: lists whose items must be at least this
_LIST_MIN = {"baselines.pca_dims": 1, "baselines.bilinear_dims": 1, "evaluate.model_dims": 2}
_FRACTIONS = {"data.split.test_fraction", "fit.trim", "data.anny.expression_variation",
              "data.ict.expression_variation"}


#: numeric fields that may be negative (every other number, and every number in a list, must be >= 0:
#: the config's numbers are counts, sizes, weights, rates, distances and seeds)
_SIGNED: set[str] = set()
#: the most upsampling levels: each level has 4 times the points of the one before (level 9 of a
#: 2,000-vertex face needed 7 GB)
MAX_TEMPLATE_LEVELS = 6
MAX_LOG2_TABLE = 24  #: hash tables of 2^24 rows per level are ~1 GB of parameters at 8 levels x 4 features


def _check_value(key: str, value: Any) -> None:
    if key in _CHOICES and value not in _CHOICES[key]:
        raise InputError(f"{key}: {value!r} is not one of {list(_CHOICES[key])}")
    if key in _POSITIVE and not value > 0:
        raise InputError(f"{key}: must be > 0, got {value!r}")
    if key in _NONNEGATIVE and not value >= 0:
        raise InputError(f"{key}: must be >= 0, got {value!r}")
    if key in _FRACTIONS and not 0 <= value < 1:
        raise InputError(f"{key}: must be in [0, 1), got {value!r}")
    if key in _LIST_MIN and any(v < _LIST_MIN[key] for v in value):
        raise InputError(f"{key}: every size must be >= {_LIST_MIN[key]}, got {value!r}")
    numbers = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else (
        [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if isinstance(value, list) else [])
    for x in numbers:
        if isinstance(x, float) and not math.isfinite(x):
            raise InputError(f"{key}: must be a finite number, got {value!r}")
        if key not in _SIGNED and x < 0:
            raise InputError(f"{key}: must be >= 0, got {value!r}")


def _fail(key: str, problem: str) -> None:
    raise InputError(f"{key}: {problem}")


def _check_config(cfg: "Config") -> None:
    """Rules between fields and on list items, checked when the configuration is loaded (before
    any stage runs): everything a later stage would otherwise fail on after hours of work."""
    from cm3dmm.registered import NAME_RULE, name_problem

    if name_problem("run", cfg.run):
        _fail("run", f"{cfg.run!r} is not a valid run name: use {NAME_RULE}")
    if not cfg.results.strip():
        _fail("results", "must name a folder")
    d = cfg.data
    for k, s in enumerate(d.split.test_subjects):
        if name_problem("subject", s):
            _fail(f"data.split.test_subjects[{k}]", f"{s!r} is not a valid subject id: use {NAME_RULE}")
    for sec in ("anny", "ict"):
        lo_hi = getattr(d, sec).intensity_range
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
            _fail(f"data.{sec}.intensity_range", f"expected [low, high] with 0 < low <= high, got {lo_hi!r}")
    if d.ict.n_components > 100:
        _fail("data.ict.n_components", f"ICT-FaceKit has 100 identity components, got {d.ict.n_components}")
    fs = d.facescape
    if any(i < 1 for i in fs.identities) or len(set(fs.identities)) != len(fs.identities):
        _fail("data.facescape.identities", "expected distinct identity numbers >= 1")
    bad = [e for e in fs.expressions if e not in FACESCAPE_EXPRESSIONS]
    if bad or not fs.expressions or len(set(fs.expressions)) != len(fs.expressions):
        _fail("data.facescape.expressions", f"expected distinct names of {list(FACESCAPE_EXPRESSIONS)}"
              + (f"; unknown: {bad}" if bad else ""))
    t = cfg.template
    if t.levels > MAX_TEMPLATE_LEVELS:
        _fail("template.levels", f"{t.levels} is more than {MAX_TEMPLATE_LEVELS} (each level has 4 times the "
              f"points of the one before: level {t.levels} has {4 ** t.levels} times the template's)")
    if any(g < 2 for g in t.uv_grids):
        _fail("template.uv_grids", f"every grid density must be >= 2, got {t.uv_grids!r}")
    if cfg.fit.level > t.levels:
        _fail("fit.level", f"{cfg.fit.level} is above template.levels ({t.levels}): the template has levels "
              f"0..{t.levels}")
    bad = [lv for lv in cfg.evaluate.levels if lv > t.levels]
    if bad:
        _fail("evaluate.levels", f"{bad} above template.levels ({t.levels}): the template has levels 0..{t.levels}")
    if len(set(cfg.evaluate.levels)) != len(cfg.evaluate.levels):
        _fail("evaluate.levels", f"levels listed twice: {cfg.evaluate.levels!r}")
    e = cfg.model.encoder
    if e.base_resolution > e.finest_resolution:
        _fail("model.encoder.base_resolution", f"{e.base_resolution} is above model.encoder.finest_resolution "
              f"({e.finest_resolution})")
    if e.log2_table_size > MAX_LOG2_TABLE:
        _fail("model.encoder.log2_table_size", f"{e.log2_table_size} is above {MAX_LOG2_TABLE}")
    w = cfg.model.decoder.widths
    if not w or any(x < 1 for x in w):
        _fail("model.decoder.widths", f"needs at least one hidden layer, each of width >= 1, got {w!r}")
    for name in ("activation_scale", "output_scale"):
        if not getattr(cfg.model.decoder, name) > 0:
            _fail(f"model.decoder.{name}", f"must be > 0, got {getattr(cfg.model.decoder, name)!r}")
    tr = cfg.train
    ms = tr.lr_milestones
    if any(not 0 < m < 1 for m in ms) or any(b <= a for a, b in zip(ms, ms[1:])):
        _fail("train.lr_milestones", f"expected increasing fractions of train.steps in (0, 1), got {ms!r}")
    if not tr.lr_gamma > 0:
        _fail("train.lr_gamma", f"must be > 0, got {tr.lr_gamma!r}")
    fr = cfg.evaluate.upsampling_fractions
    if any(not 0 < f <= 1 for f in fr) or len(set(fr)) != len(fr):
        _fail("evaluate.upsampling_fractions", f"expected distinct fractions of the vertices in (0, 1], got {fr!r}")
    if not cfg.evaluate.fscore_threshold > 0:
        _fail("evaluate.fscore_threshold", f"must be > 0, got {cfg.evaluate.fscore_threshold!r}")
    bad = [m for m in cfg.baselines.methods if m not in ("pca", "bilinear")]
    if bad or len(set(cfg.baselines.methods)) != len(cfg.baselines.methods):
        _fail("baselines.methods", f"expected distinct names of ['pca', 'bilinear'], got {cfg.baselines.methods!r}")
    sf = cfg.scan_fits
    known = ("full", "normals", "frontal", "side", "mouth-hole")
    bad = [v for v in sf.variants if v not in known]
    if bad:
        _fail("scan_fits.variants", f"{bad} not among {list(known)}")
    bad = [m for m in sf.methods if m not in ("cm3dmm", "pca", "bilinear")]
    if bad:
        _fail("scan_fits.methods", f"{bad} not among ['cm3dmm', 'pca', 'bilinear']")
    if sf.rot_min > sf.rot_max:
        _fail("scan_fits.rot_min", f"{sf.rot_min} is above scan_fits.rot_max ({sf.rot_max})")


def _convert(key: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(key, inner[0], value)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{key}: expected a list, got {value!r}")
        return [_convert(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise InputError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value) if math.isfinite(float(value)) else value
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:
            raise InputError(f"{key}: the number is out of range (about 1e{value.bit_length() * 0.30103:.0f})") from None
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key.endswith("]"):
            return str(value)  # subject ids in lists may be written as numbers
        if not isinstance(value, str):
            raise InputError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _build(cls, values: Any, prefix: str = ""):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise InputError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise InputError(f"unknown config key '{where}' (known here: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            key = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _convert(key, hints[f.name], values[f.name])
            if not dataclasses.is_dataclass(hints[f.name]):
                _check_value(key, kwargs[f.name])
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_preset(values: dict) -> dict:
    """Fill ``model`` / ``train`` defaults from ``train.preset`` (the file's own keys win)."""
    preset = (values.get("train") or {}).get("preset", "") if isinstance(values.get("train"), dict) else ""
    if not preset:
        return values
    from cm3dmm.presets import PRESETS

    if not isinstance(preset, str) or preset not in PRESETS:
        raise InputError(f"train.preset: {preset!r} is not one of {sorted(PRESETS)}")
    return _deep_merge(PRESETS[preset], values)


def config_from_dict(values: dict, origin: str | os.PathLike | None = None) -> Config:
    """Build a :class:`Config` from a plain mapping; errors name ``origin`` and the key."""
    try:
        cfg = _build(Config, apply_preset(dict(values or {})))
        _check_config(cfg)
        return cfg
    except InputError as exc:
        if origin is not None and exc.path is None:
            raise InputError(exc.problem, origin) from None
        raise


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file, apply ``key.sub=value`` overrides, build a :class:`Config`."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise InputError("config file not found", path)
    if path.is_dir():
        raise InputError("is a folder, not a config file", path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError("not a text file (not UTF-8)", path) from None
    except OSError as exc:
        raise InputError(f"cannot read the config ({exc.strerror or exc})", path) from None
    try:
        values = yaml.load(text, Loader=_unique_key_loader())
    except yaml.YAMLError as exc:
        raise InputError(f"not valid YAML ({_yaml_problem(exc, text)})", path) from None
    except ValueError as exc:  # e.g. an integer beyond Python's digit limit
        raise InputError(f"holds a value that cannot be read ({str(exc)[:80]})", path) from None
    except RecursionError:
        raise InputError("not valid YAML (nested too deeply)", path) from None
    if values is None:
        raise InputError("the config file is empty (no settings)", path)
    if not isinstance(values, dict):
        raise InputError("the config must be a mapping of sections", path)
    for item in overrides or []:
        values = _deep_merge(values, parse_override(item))
    return config_from_dict(values, path)


def _yaml_problem(exc, text: str) -> str:
    """``line L, column C: problem`` of a YAML error, naming a tab where one is the cause."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return str(problem)
    lines = text.splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    if "\t" in line[: mark.column + 1] or "'\\t'" in str(problem):
        problem = "a tab character: YAML indents with spaces only"
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


_LOADER: list = []


def _unique_key_loader():
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""
    if _LOADER:
        return _LOADER[0]
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _value in node.value:
                try:
                    key = self.construct_object(key_node, deep=True)
                    hash(key)
                except (TypeError, yaml.YAMLError):
                    continue  # the base class reports unhashable keys
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (first on line {seen[key] + 1})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep)

    _LOADER.append(UniqueKeyLoader)
    return UniqueKeyLoader


def parse_override(item: str) -> dict:
    """``"train.steps=10"`` -> ``{"train": {"steps": 10}}`` (value parsed as YAML)."""
    import yaml

    if "=" not in item:
        raise InputError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: e.g. beyond Python's int digit limit
        raise InputError(f"override {item[:60]!r}: the value is not valid YAML "
                         f"({str(exc).splitlines()[0][:80]})") from None
    out: dict = {}
    cur = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def coerce_text_values(values: dict, cls: type = None, prefix: str = "") -> dict:
    """``values`` with text where the config expects a number, a bool or a list read as YAML.

    Snakemake's ``--config fit='{max_iter: 31}'`` hands nested values over as strings (``'31'``);
    this gives them the type of their :class:`Config` field (``31``), so the command line works
    as a config file does. Text for text fields, unknown keys and unreadable text stay as they
    are (validation then names them).
    """
    import yaml

    cls = cls or Config
    hints = typing.get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        tp = hints.get(key) if isinstance(key, str) else None
        if tp is None:
            continue
        out[key] = _coerce_text(tp, value, yaml)
    return out


def _coerce_text(tp: Any, value: Any, yaml) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if dataclasses.is_dataclass(tp):
        return coerce_text_values(value, tp) if isinstance(value, dict) else value
    if tp is str:
        return value
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except (yaml.YAMLError, ValueError):
            return value
    if typing.get_origin(tp) is list and isinstance(value, list):
        (item,) = typing.get_args(tp)
        return [_coerce_text(item, v, yaml) for v in value]
    return value


def config_subset(values: dict, keys) -> dict:
    """The part of a plain config dict named by ``keys``: sections (``"fit"``) or single keys
    (``"cache.seed"``), nested as in the config. The workflow hands each rule the part it reads."""
    out: dict = {}
    for key in keys:
        parts = key.split(".")
        src, dst = values, out
        for p in parts[:-1]:
            src = src[p]
            dst = dst.setdefault(p, {})
        dst[parts[-1]] = src[parts[-1]]
    return out


def config_to_dict(cfg) -> dict:
    """The plain-dict form of a config (for model files, JSON and YAML dumps)."""
    return dataclasses.asdict(cfg)

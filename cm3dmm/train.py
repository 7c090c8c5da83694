"""Auto-decoder training of the continuous model (``cm3dmm train``, rule ``train``).

    run_train(cfg, method=None) -> TrainResult

reads ``cache/train.h5`` and ``template/template.npz`` of the run and writes
``models/{method}/model.pt`` (the best model by validation error), ``train_log.csv`` (step, loss
terms, lr, elapsed seconds, validation error in mm), ``loss.png`` and ``checkpoints/``.

Training owns the latent code tables (``nn.Embedding``, initialised N(0, code_std)):

* ``code_mode: per-face`` (the release): one identity and one expression code per training face,
  tied together by the cosine-embedding losses (same subject / same expression pulled together);
* ``code_mode: per-subject``: one identity code per subject, one expression code per face.

Objective: :func:`cm3dmm.losses.training_loss` (``train.preset: paper``: the release's
:func:`cm3dmm.losses.paper_loss` over fixed code pairs, PyTorch's default initialisation of the
output layer; docs/paper-preset.md). Optimiser: Adam (network ``lr``, codes
``code_lr``), multi-step decay at ``lr_milestones`` (fractions of ``steps``) by ``lr_gamma``.

**Batches** are a pure function of ``(seed, step)``: the faces of step ``s`` are positions
``s B .. s B + B - 1`` of an endless sequence of per-epoch permutations (epoch ``e`` permuted by a
generator seeded with ``(seed, e)``); in its ``e``-th epoch a face reads the ``e``-th slice of its
stored shuffled point orders (``SampleCache.read(offset=e)``), so epochs walk through all stored
points. Nothing else is random after initialisation. Point counts are capped at what the cache
stores (a warning says so).

**Validation** every ``validate_every`` steps (and at the last step): the mean Euclidean error (mm)
at the held-out UV points of the training faces (``SampleCache.heldout``: points never used for
training), decoded with the learned codes — on up to ``val_faces`` faces chosen once, evenly.
The best model by this error is kept (``checkpoints/best.pt``) and becomes ``model.pt``.

**Resume**: ``checkpoints/last.pt`` (written atomically every ``checkpoint_every`` steps and at the
end) holds the weights, codes, optimiser, scheduler, RNG states, the step, the best-so-far record and
the log rows. A run that is killed at any moment and restarted continues from it and ends with the
same weights as an uninterrupted run (same seed, same thread count). A checkpoint written for another
configuration (model / training settings, template, cache, world size) is not resumed from: training
starts afresh and overwrites it (a warning is logged). ``threads``, ``device``, ``checkpoint_every``,
``validate_every``, ``val_faces`` and ``log_every`` may change between runs. A finished run's final
checkpoint is resumed from too (rerunning gives the same model at once, as training is deterministic);
``train.resume: false`` (or deleting ``checkpoints/``) retrains from scratch, e.g. after changing code.

**DDP**: under ``torchrun`` (``WORLD_SIZE > 1``) the network and the code tables are wrapped in
``DistributedDataParallel`` (gloo on CPU, nccl on CUDA; each rank on ``cuda:LOCAL_RANK``); every
step's B faces are split between the ranks (``faces[rank::world]``), so the averaged gradient is that
of the whole batch; every rank keeps identical weights (checked at the end) and only rank 0 validates
and writes files. Launch:

    torchrun --standalone --nproc_per_node 2 -m cm3dmm train --config config/config.yaml

**Numerical guard**: a NaN / inf loss (or non-finite weights at a checkpoint) stops training with a
:class:`~cm3dmm.errors.StageError`; the last good checkpoint is kept.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cm3dmm.config import Config, config_to_dict
from cm3dmm.errors import InputError, StageError
from cm3dmm.geometry import even_indices
from cm3dmm.io.atomic import atomic_path, atomic_write_text
from cm3dmm.losses import paper_loss, release_pairs, training_loss
from cm3dmm.model import METHOD, ContinuousModel, save_model
from cm3dmm.paths import RunPaths

log = logging.getLogger(__name__)

#: the saved model's final validation covers at most this many training faces (evenly spread): with the
#: smooth model's vertex-anchored residual, held-out points between vertices evaluate the network at every
#: vertex of every face, minutes for all 5,600 ICT training faces; 1,024 faces estimate the same mean to
#: well under 1 %
FINAL_VAL_FACES = 1024

CHECKPOINT_FORMAT = "cm3dmm-checkpoint"
CHECKPOINT_VERSION = 1
LOSS_TERMS = ("total", "distance", "id_cos", "exp_cos", "mean_prior", "std_prior")
LOG_COLUMNS = ("step",) + LOSS_TERMS + ("lr", "code_lr", "elapsed_s", "val_mm")
#: train-config fields that may change between a run and its resumption
_RESUMABLE_CHANGES = ("threads", "device", "checkpoint_every", "validate_every", "val_faces", "log_every",
                      "resume")

__all__ = ["run_train", "train", "TrainResult", "TrainData", "batch_faces", "CodeTables"]


# ---------------------------------------------------------------------------- results
@dataclass
class TrainResult:
    """What a training run produced."""

    model_path: Path
    steps: int  #: optimiser steps done in total
    best_step: int  #: step of the saved (best) model
    best_val_mm: float  #: its validation error on the periodic validation faces
    final_val_mm: float  #: the saved model's error on the held-out points of up to FINAL_VAL_FACES training faces
    wall_s: float  #: training time, summed over resumptions
    resumed_from: int = 0  #: step of the checkpoint this run started from (0 = fresh)
    log_rows: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------- data
@dataclass
class TrainData:
    """The training faces of a cache with their labels and code rows.

    faces: (n,) cache sample indices; subject / expression: (n,) names;
    id_row / exp_row: (n,) rows of the identity / expression code tables; subject_label /
    expression_label: (n,) integer labels for the cosine-embedding losses.
    """

    cache: object  #: a cm3dmm.cache.SampleCache or upsampling.VertexSubsetCache (read, heldout, content_hash)
    faces: np.ndarray
    subject: list[str]
    expression: list[str]
    code_mode: str
    id_row: np.ndarray
    exp_row: np.ndarray
    subject_label: np.ndarray
    expression_label: np.ndarray
    id_names: list[str]  #: what each identity-code row stands for (subject or subject/expression)
    continuous: str = "surface"  #: train.continuous: surface | scan (the cache's scan points, SampleCache.read)

    @property
    def n(self) -> int:
        return int(len(self.faces))

    @property
    def n_id_codes(self) -> int:
        return int(self.id_row.max()) + 1

    @property
    def n_exp_codes(self) -> int:
        return int(self.exp_row.max()) + 1

    @classmethod
    def from_cache(cls, cache, code_mode: str) -> "TrainData":
        subject = [str(s) for s in cache.subject]
        expression = [str(e) for e in cache.expression]
        n = len(subject)
        if n == 0:
            raise InputError("the training cache holds no faces", getattr(cache, "path", None))
        subjects = list(dict.fromkeys(subject))
        expressions = list(dict.fromkeys(expression))
        s_label = np.array([subjects.index(s) for s in subject], np.int64)
        e_label = np.array([expressions.index(e) for e in expression], np.int64)
        faces = np.arange(n, dtype=np.int64)
        if code_mode == "per-face":
            id_row = faces.copy()
            id_names = [f"{s}/{e}" for s, e in zip(subject, expression)]
        elif code_mode == "per-subject":
            id_row = s_label.copy()
            id_names = subjects
        else:
            raise InputError(f"train.code_mode: {code_mode!r} is not one of ['per-face', 'per-subject']")
        return cls(cache=cache, faces=faces, subject=subject, expression=expression, code_mode=code_mode,
                   id_row=id_row, exp_row=faces.copy(), subject_label=s_label, expression_label=e_label,
                   id_names=id_names)

    def point_counts(self, n_vertex: int, n_continuous: int) -> tuple[int, int]:
        """The per-face vertex / continuous point counts, capped at what the cache stores."""
        nv = min(int(n_vertex), int(getattr(self.cache, "n_vertices", n_vertex)))
        nc = min(int(n_continuous), int(getattr(self.cache, "n_continuous", n_continuous)))
        return nv, nc

    def read(self, positions: np.ndarray, epochs: np.ndarray, n_vertex: int, n_continuous: int,
             device: torch.device) -> dict[str, torch.Tensor]:
        """The points of faces ``positions`` (indices into ``faces``): uv, target, avg (B, N, .).

        ``epochs`` (B,): how many times each face was seen before; it selects the slice of the
        face's stored shuffled point order (``SampleCache.read``'s ``offset``), so successive
        epochs walk through all stored points.
        """
        parts: dict[str, list] = {"uv": [], "target": [], "avg": []}
        order = []
        for e in np.unique(epochs):
            sel = np.flatnonzero(epochs == e)
            kw = {} if self.continuous == "surface" else {"continuous": self.continuous}
            batch = self.cache.read(self.faces[positions[sel]], n_vertex, n_continuous, offset=int(e), **kw)
            for k in parts:
                parts[k].append(np.asarray(batch[k], np.float32))
            order.append(sel)
        inv = np.argsort(np.concatenate(order), kind="stable")
        return {k: torch.from_numpy(np.concatenate(v)[inv]).to(device) for k, v in parts.items()}

    def heldout(self, positions: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
        batch = self.cache.heldout(self.faces[positions])
        return {k: torch.as_tensor(np.asarray(batch[k]), dtype=torch.float32).to(device)
                for k in ("uv", "target", "avg")}


@lru_cache(maxsize=8)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def batch_faces(seed: int, step: int, batch: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The faces of optimiser step ``step`` — a pure function of its arguments.

    Positions ``step * batch + k`` (k < batch) of the endless sequence of per-epoch
    permutations of ``range(n)``; epoch ``e`` is permuted by ``default_rng([seed, e])``.
    Returns ``faces`` (batch,) int64 (indices into ``TrainData.faces``) and ``epochs`` (batch,)
    int64 (the epoch each draw belongs to).
    """
    pos = np.arange(step * batch, step * batch + batch, dtype=np.int64)
    epochs = pos // n
    out = np.empty(batch, dtype=np.int64)
    for epoch in np.unique(epochs):
        sel = epochs == epoch
        out[sel] = _epoch_order(seed, int(epoch), n)[pos[sel] % n]
    return out, epochs


# ---------------------------------------------------------------------------- the trained module
class CodeTables(nn.Module):
    """The training-time latent codes plus the model (one module, so DDP syncs both).

    ``forward(uv, avg, id_rows, exp_rows)`` -> (pred (B, N, 3), z_id (B, Di), z_exp (B, De)).
    """

    def __init__(self, model: ContinuousModel, n_id: int, n_exp: int, code_std: float,
                 generator: torch.Generator):
        super().__init__()
        self.model = model
        self.id_codes = nn.Embedding(n_id, model.id_dim)
        self.exp_codes = nn.Embedding(n_exp, model.exp_dim)
        with torch.no_grad():
            self.id_codes.weight.normal_(0.0, code_std, generator=generator)
            self.exp_codes.weight.normal_(0.0, code_std, generator=generator)

    def forward(self, uv, avg, id_rows, exp_rows):
        z_id = self.id_codes(id_rows)
        z_exp = self.exp_codes(exp_rows)
        # a smooth model interpolates its own average face (the cache stores the barycentric one)
        return self.model.decode(uv, z_id, z_exp, avg=None if self.model.smooth else avg), z_id, z_exp


def face_vertices(data: "TrainData") -> np.ndarray:
    """Every training face's vertices in template order, (n, V, 3) float32 (from the cache)."""
    cache = data.cache
    if hasattr(cache, "target"):  # cm3dmm.upsampling.VertexSubsetCache: kept vertices, template order
        return np.asarray(cache.target, np.float32)[data.faces]
    n_v = int(cache.n_vertices)
    out = np.empty((data.n, n_v, 3), np.float32)
    for a in range(0, data.n, 256):
        idx = data.faces[a:a + 256]
        batch = cache.read(idx, n_v, 0, offset=0)
        for k, s in enumerate(idx):
            out[a + k, cache.vertex_order(int(s))] = batch["target"][k]
    return out


def init_linear_basis(net: CodeTables, data: "TrainData", template) -> dict:
    """Start the model's linear basis and the code tables from the PCA of the training faces
    (:func:`cm3dmm.pca_init.pca_basis_init`); returns facts for the log and the model file."""
    from cm3dmm.pca_init import pca_basis_init

    model = net.model
    init = pca_basis_init(face_vertices(data), np.asarray(template.faces), np.asarray(template.mean),
                          data.id_row, model.id_dim, model.exp_dim)
    with torch.no_grad():
        dev = model.basis.device
        model.basis.copy_(torch.as_tensor(init.basis, dtype=model.basis.dtype, device=dev))
        ids = torch.as_tensor(init.z_id, dtype=torch.float64)
        rows = torch.as_tensor(data.id_row)
        sums = torch.zeros(data.n_id_codes, model.id_dim, dtype=torch.float64).index_add_(0, rows, ids)
        counts = torch.bincount(rows, minlength=data.n_id_codes).clamp_min(1).to(torch.float64)
        net.id_codes.weight.copy_((sums / counts[:, None]).to(net.id_codes.weight))
        exp = torch.zeros(data.n_exp_codes, model.exp_dim, dtype=torch.float64)
        exp[torch.as_tensor(data.exp_row)] = torch.as_tensor(init.z_exp)
        net.exp_codes.weight.copy_(exp.to(net.exp_codes.weight))
    used = np.isfinite(init.within)
    facts = {"pca_dim": init.pca_dim, "mean_offset_mm": init.mean_offset,
             "id_within_fraction": float(np.nanmean(init.within[:model.id_dim])) if used[:model.id_dim].any() else None,
             "exp_within_fraction": float(np.nanmean(init.within[model.id_dim:])) if used[model.id_dim:].any() else None}
    log.info("linear basis from the PCA of %d training faces: %d directions (identity block within-subject "
             "variance %s, expression block %s)", data.n, init.pca_dim, facts["id_within_fraction"],
             facts["exp_within_fraction"])
    return facts


# ---------------------------------------------------------------------------- distributed
@dataclass
class _Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "_Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")))


def _device(cfg_device: str, dist: _Dist) -> torch.device:
    dev = torch.device(cfg_device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"train.device: {cfg_device!r} but CUDA is not available")
        if dist.world > 1:
            dev = torch.device("cuda", dist.local_rank)
    return dev


# ---------------------------------------------------------------------------- checkpoints
def _fingerprint(cfg: Config, template_hash: str, cache_id: str, world: int, method: str) -> str:
    t = {k: v for k, v in config_to_dict(cfg.train).items() if k not in _RESUMABLE_CHANGES}
    blob = json.dumps({"model": config_to_dict(cfg.model), "train": t, "template": template_hash,
                       "cache": cache_id, "world": world, "method": method}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _save_torch(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _load_checkpoint(path: Path, fingerprint: str) -> dict | None:
    """The checkpoint at ``path`` if it exists, is readable and belongs to this configuration."""
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # an atomic write never leaves a partial file; be safe anyway
        log.warning("%s: unreadable checkpoint (%s); starting afresh", path, str(exc)[:120])
        return None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT \
            or ckpt.get("version") != CHECKPOINT_VERSION:
        log.warning("%s: not a checkpoint of this cm3dmm version; starting afresh", path)
        return None
    if ckpt.get("fingerprint") != fingerprint:
        log.warning("%s: checkpoint of another configuration, template or cache; starting afresh", path)
        return None
    return ckpt


def _prune_best(paths: RunPaths, method: str, keep: int, drop_after: int | None = None) -> None:
    """Remove best-model files other than step ``keep`` (only those after ``drop_after`` if given).

    ``last.pt`` records which best file is current; files of later steps may exist when a run was
    killed between a new best and the next checkpoint (the resumed run rewrites them).
    """
    for step, p in paths.best_checkpoints(method).items():
        if step != keep and (drop_after is None or step > drop_after):
            p.unlink(missing_ok=True)


def _finite_params(module: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in module.parameters())


# ---------------------------------------------------------------------------- log outputs
def progress_log(path: Path) -> Path:
    """Where a running training writes its log (``train_log.partial.csv``): the final
    ``train_log.csv`` appears only with the model, so a killed run leaves no log that looks finished."""
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def _write_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in LOG_COLUMNS})
    atomic_write_text(path, buf.getvalue())


def _plot_loss(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot(steps, [r["distance"] for r in rows], lw=1.2, label="training distance (mm)")
    ax.plot(steps, [r["total"] for r in rows], lw=0.8, alpha=0.6, label="training loss (total)")
    val = [(r["step"], r["val_mm"]) for r in rows if r.get("val_mm") is not None]
    if val:
        ax.plot(*zip(*val), "o-", ms=3, lw=1.4, label="validation error, held-out UV points (mm)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mm (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


# ---------------------------------------------------------------------------- validation
@torch.no_grad()
def _validate(net: CodeTables, data: TrainData, positions: np.ndarray, device: torch.device,
              chunk: int = 16) -> float:
    """Mean Euclidean error (mm) at the held-out points of the faces ``positions``."""
    was = net.training
    net.eval()
    total, count = 0.0, 0
    for s in range(0, len(positions), chunk):
        pos = positions[s:s + chunk]
        held = data.heldout(pos, device)
        if held["uv"].shape[1] == 0:
            continue
        id_rows = torch.as_tensor(data.id_row[pos], device=device)
        exp_rows = torch.as_tensor(data.exp_row[pos], device=device)
        pred, _, _ = net(held["uv"], held["avg"], id_rows, exp_rows)
        err = torch.linalg.vector_norm(pred - held["target"], dim=-1)
        total += float(err.sum())
        count += err.numel()
    net.train(was)
    if count == 0:
        raise InputError("the training cache holds no held-out points (cache.n_heldout = 0); validation "
                         "needs them", getattr(data.cache, "path", None))
    return total / count


# ---------------------------------------------------------------------------- entry point
def run_train(cfg: Config, method: str | None = None) -> TrainResult:
    """Train the continuous model of run ``cfg.run_dir`` -> ``models/{method}/model.pt``."""
    from cm3dmm.cache import SampleCache
    from cm3dmm.template import load_template

    method = method or METHOD
    paths = RunPaths.of(cfg.run_dir)
    template = load_template(paths.template)
    cache = SampleCache(paths.cache("train"), template_hash=template.hash,
                        registered_hash=template.source_hash or None)
    try:
        if getattr(cache, "split", "train") != "train":
            raise InputError(f"is the cache of the {cache.split} split, not of the train split: rerun "
                             "cache_samples", paths.cache("train"))
        return train(cfg, template, cache, paths, method)
    finally:
        close = getattr(cache, "close", None)
        if close is not None:
            close()


def with_steps(tc, steps: int, **changes):
    """``tc`` (a TrainConfig) trained ``steps`` steps: checkpoint / validation intervals capped at
    ``steps`` so the shorter run still checkpoints and validates; ``changes`` replace other fields."""
    import dataclasses

    steps = int(steps)
    return dataclasses.replace(tc, steps=steps, checkpoint_every=min(tc.checkpoint_every, steps),
                               validate_every=min(tc.validate_every, steps), **changes)


def train(cfg: Config, template, cache, paths: RunPaths, method: str = METHOD,
          time_budget_s: float | None = None, budget_clock=time.perf_counter) -> TrainResult:
    """Train on ``cache`` (a :class:`cm3dmm.cache.SampleCache` of the train split) with ``template``;
    write the model, log, plot and checkpoints under ``paths`` for ``method``.

    ``time_budget_s`` (benchmarks): stop after the first step that ends past this many seconds of
    training, as counted by ``budget_clock`` (wall clock by default; ``time.process_time`` counts
    CPU seconds, fairer on a shared machine), and treat it as the last step (validated,
    checkpointed, saved). Not resumable to the same result: where it stops depends on the machine.
    """
    tc = cfg.train
    dist = _Dist.from_env()
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    device = _device(tc.device, dist)
    data = TrainData.from_cache(cache, tc.code_mode)
    data.continuous = tc.continuous
    if tc.batch_faces < dist.world:
        raise InputError(f"train.batch_faces ({tc.batch_faces}) is smaller than the number of processes "
                         f"({dist.world})")
    owns_group = False
    if dist.world > 1:
        import torch.distributed as tdist

        if not tdist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            tdist.init_process_group(backend=backend)
            owns_group = True
    try:
        return _train(cfg, template, data, paths, method, dist, device, time_budget_s, budget_clock)
    finally:
        if owns_group:
            import torch.distributed as tdist

            tdist.destroy_process_group()


def _train(cfg: Config, template, data: TrainData, paths: RunPaths, method: str, dist: _Dist,
           device: torch.device, time_budget_s: float | None = None,
           budget_clock=time.perf_counter) -> TrainResult:
    tc = cfg.train
    last_path = paths.last_checkpoint(method)
    fingerprint = _fingerprint(cfg, str(template.hash), data.cache.content_hash, dist.world, method)

    # --- the same initial weights on every rank, from the seed
    torch.manual_seed(tc.seed)
    gen = torch.Generator().manual_seed(tc.seed)
    model = ContinuousModel(template, cfg.model, device=device)
    paper_pairs = None
    if tc.preset == "paper":  # the release: PyTorch's default init, fixed code pairs (docs/paper-preset.md)
        model.decoder.out.reset_parameters()
        paper_pairs = release_pairs(data.subject_label, data.expression_label, data.id_row, data.exp_row)
    net = CodeTables(model, data.n_id_codes, data.n_exp_codes, tc.code_std, gen).to(device)
    if model.basis is not None:
        init_linear_basis(net, data, template)  # replaced by the checkpoint's state when resuming
    code_params = list(net.id_codes.parameters()) + list(net.exp_codes.parameters())
    groups = [{"params": [p for n, p in net.model.named_parameters() if n != "basis"], "lr": tc.lr},
              {"params": code_params, "lr": tc.code_lr}]
    if model.basis is not None:
        if tc.basis_lr > 0:
            groups.append({"params": [model.basis], "lr": tc.basis_lr})
        else:
            model.basis.requires_grad_(False)
    opt = torch.optim.Adam(groups)
    milestones = sorted({max(1, int(round(f * tc.steps))) for f in tc.lr_milestones if 0 < f < 1})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=tc.lr_gamma)

    start, best, rows, elapsed0, acc = 0, {"step": -1, "val": math.inf}, [], 0.0, None
    ckpt = _load_checkpoint(last_path, fingerprint) if tc.resume else None
    if ckpt is not None:
        net.load_state_dict(ckpt["net"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        start, best, rows, elapsed0, acc = (ckpt["step"], ckpt["best"], ckpt["rows"], ckpt["elapsed"],
                                            ckpt["acc"])
        log.info("resuming %s from step %d (%s)", method, start, last_path)
    if dist.main:
        # best files newer than the checkpoint are replayed (and rewritten) by this run
        _prune_best(paths, method, keep=best["step"], drop_after=start)
    resumed_from = start

    ddp = net
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    val_pos = even_indices(data.n, tc.val_faces)
    n_vertex, n_continuous = data.point_counts(tc.vertex_points, tc.continuous_points)
    if (n_vertex, n_continuous) != (tc.vertex_points, tc.continuous_points):
        log.warning("the cache stores %d vertices and %d continuous points per face: training on %d + %d "
                    "points per face instead of %d + %d", getattr(data.cache, "n_vertices", -1),
                    getattr(data.cache, "n_continuous", -1), n_vertex, n_continuous, tc.vertex_points,
                    tc.continuous_points)
    n_points = n_vertex + n_continuous
    if acc is None:
        acc = {"n": 0, **{k: 0.0 for k in LOSS_TERMS}}
    t0 = time.perf_counter()
    budget0 = budget_clock()

    def elapsed() -> float:
        return elapsed0 + time.perf_counter() - t0

    def checkpoint(step: int) -> None:
        if not _finite_params(net):
            raise StageError(f"training diverged: non-finite weights at step {step}; the last good "
                             f"checkpoint is kept ({last_path})")
        if dist.main:
            # the progress log first: a checkpoint on disk always has its log beside it
            _write_log(progress_log(paths.train_log(method)), rows)
            _save_torch(last_path, {
                "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "fingerprint": fingerprint,
                "step": step, "net": net.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "rng": _rng_state(), "best": dict(best), "rows": rows,
                "elapsed": elapsed(), "acc": dict(acc)})
            _prune_best(paths, method, keep=best["step"])

    if start == 0 and model.basis is not None and dist.main:
        # the closed-form start is a candidate model: training keeps it unless it validates better
        best = {"step": 0, "val": _validate(net, data, val_pos, device)}
        _save_torch(paths.best_checkpoint(method, 0), {"step": 0, "val": best["val"], "net": net.state_dict()})
        log.info("step 0 (PCA start): validation %.4f mm", best["val"])
    bar = _progress(tc.steps, start, dist)
    done = start
    try:
        for step in range(start, tc.steps):
            positions, epochs = batch_faces(tc.seed, step, tc.batch_faces, data.n)
            positions, epochs = positions[dist.rank::dist.world], epochs[dist.rank::dist.world]
            batch = data.read(positions, epochs, n_vertex, n_continuous, device)
            id_rows = torch.as_tensor(data.id_row[positions], device=device)
            exp_rows = torch.as_tensor(data.exp_row[positions], device=device)
            pred, z_id, z_exp = ddp(batch["uv"], batch["avg"], id_rows, exp_rows)
            if paper_pairs is not None:
                terms = paper_loss(pred, batch["target"], net.id_codes.weight, net.exp_codes.weight, paper_pairs,
                                   tc.reg_weight, tc.prior_weight, tc.code_std)
            else:
                terms = training_loss(
                    pred, batch["target"], z_id, z_exp,
                    torch.as_tensor(data.subject_label[positions], device=device),
                    torch.as_tensor(data.expression_label[positions], device=device),
                    net.id_codes.weight, net.exp_codes.weight,
                    tc.reg_weight, tc.prior_weight, tc.code_std)
            values = torch.stack([terms[k].detach() for k in LOSS_TERMS])
            if dist.world > 1:
                import torch.distributed as tdist

                tdist.all_reduce(values)
                values /= dist.world
            values = values.cpu().tolist()
            if not all(math.isfinite(v) for v in values):
                raise StageError(
                    f"training diverged: the loss is {values[0]} at step {step + 1} (distance "
                    f"{values[1]}); lower train.lr / train.code_lr. The last good checkpoint is kept "
                    f"({last_path if last_path.exists() else 'none written yet'})")
            opt.zero_grad(set_to_none=True)
            terms["total"].backward()
            opt.step()
            sched.step()
            done = step + 1
            acc["n"] += 1
            for k, v in zip(LOSS_TERMS, values):
                acc[k] += v
            is_last = done == tc.steps
            if time_budget_s is not None and not is_last:
                over = torch.tensor(float(budget_clock() - budget0 > time_budget_s))
                if dist.world > 1:
                    import torch.distributed as tdist

                    tdist.all_reduce(over, op=tdist.ReduceOp.MAX)
                is_last = bool(over)
            validate = done % tc.validate_every == 0 or is_last
            if done % tc.log_every == 0 or validate:
                row = {"step": done, **{k: acc[k] / acc["n"] for k in LOSS_TERMS},
                       "lr": opt.param_groups[0]["lr"], "code_lr": opt.param_groups[1]["lr"],
                       "elapsed_s": round(elapsed(), 3), "val_mm": None}
                acc = {"n": 0, **{k: 0.0 for k in LOSS_TERMS}}
                if validate and dist.main:
                    row["val_mm"] = _validate(net, data, val_pos, device)
                    if row["val_mm"] < best["val"]:
                        best = {"step": done, "val": row["val_mm"]}
                        _save_torch(paths.best_checkpoint(method, done),
                                    {"step": done, "val": row["val_mm"], "net": net.state_dict()})
                    log.info("step %d: distance %.4f mm, validation %.4f mm", done, row["distance"],
                             row["val_mm"])
                rows.append(row)
                if validate and dist.main:
                    _write_log(progress_log(paths.train_log(method)), rows)  # at every validation
                if bar is not None:
                    bar.set_postfix(dist=f"{row['distance']:.3f}",
                                    val="" if row["val_mm"] is None else f"{row['val_mm']:.3f}")
            if done % tc.checkpoint_every == 0 or is_last:
                checkpoint(done)
            if bar is not None:
                bar.update(1)
            if is_last:
                break
    finally:
        if bar is not None:
            bar.close()

    wall = elapsed()
    identical = _ranks_identical(net, dist)
    if not dist.main:
        return TrainResult(paths.model(method), done, best["step"], best["val"], math.nan, wall,
                           resumed_from, rows)

    # --- the best model becomes model.pt
    best_ckpt = torch.load(paths.best_checkpoint(method, best["step"]), map_location="cpu", weights_only=False)
    net.load_state_dict(best_ckpt["net"])
    final_pos = even_indices(data.n, min(data.n, FINAL_VAL_FACES))
    final_val = _validate(net, data, final_pos, device)
    summary = {
        "steps": done, "best_step": best["step"], "best_val_mm": best["val"],
        "val_final_mm": final_val, "val_final_faces": int(len(final_pos)), "val_faces": int(len(val_pos)),
        "wall_s": wall,
        "points_per_s": done * tc.batch_faces * n_points / max(wall, 1e-9),
        "world_size": dist.world, "ranks_identical": identical, "device": str(device),
        "n_faces": data.n, "n_subjects": int(data.subject_label.max()) + 1,
        "resumed_from": resumed_from, "final_distance_mm": rows[-1]["distance"] if rows else None,
    }
    extra = _model_extra(cfg, net, data, summary, method)
    save_model(paths.model(method), net.model.cpu(), extra)
    _write_log(paths.train_log(method), rows)
    progress_log(paths.train_log(method)).unlink(missing_ok=True)
    _plot_loss(paths.loss_png(method), rows,
               f"{method}: best {best['val']:.3f} mm at step {best['step']} (held-out UV points)")
    log.info("%s: model %s (best step %d, validation %.4f mm, %d faces %.4f mm, %.1f s)", method,
             paths.model(method), best["step"], best["val"], len(final_pos), final_val, wall)
    return TrainResult(paths.model(method), done, best["step"], best["val"], final_val, wall,
                       resumed_from, rows)


def _ranks_identical(net: nn.Module, dist: _Dist) -> bool:
    """True when every rank holds bitwise the same parameters (always True without DDP)."""
    if dist.world == 1:
        return True
    import torch.distributed as tdist

    flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in net.parameters()])
    digest = hashlib.sha256(flat.numpy().tobytes()).digest()[:8]
    mine = torch.tensor(list(digest), dtype=torch.int64)
    if tdist.get_backend() == "nccl":
        mine = mine.cuda()
    gathered = [torch.zeros_like(mine) for _ in range(dist.world)]
    tdist.all_gather(gathered, mine)
    same = all(bool(torch.equal(g, gathered[0])) for g in gathered)
    if not same:
        log.error("DDP ranks ended with different weights")
    return same


def _model_extra(cfg: Config, net: CodeTables, data: TrainData, summary: dict, method: str) -> dict:
    id_w = net.id_codes.weight.detach().cpu()
    exp_w = net.exp_codes.weight.detach().cpu()
    return {
        "config": config_to_dict(cfg),
        "train_config": config_to_dict(cfg.train),
        "folder": method,
        "code_mode": data.code_mode,
        "codes": {"id": id_w.clone(), "exp": exp_w.clone()},
        "code_stats": {"id_mean": id_w.mean(0), "id_std": id_w.std(0, unbiased=False),
                       "exp_mean": exp_w.mean(0), "exp_std": exp_w.std(0, unbiased=False)},
        "index": {"subject": list(data.subject), "expression": list(data.expression),
                  "cache_sample": torch.as_tensor(data.faces),
                  "registered_index": torch.as_tensor(np.asarray(getattr(data.cache, "registered_index",
                                                                         data.faces), np.int64)[data.faces]),
                  "id_row": torch.as_tensor(data.id_row),
                  "exp_row": torch.as_tensor(data.exp_row), "id_names": list(data.id_names)},
        "summary": summary,
    }


def _progress(total: int, initial: int, dist: _Dist):
    if not dist.main:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    return tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                disable=not sys.stderr.isatty(), dynamic_ncols=True)

"""Discrete-topology baselines: a PCA model (the paper's "BFM" row) and a bilinear / Tucker
model over identity x expression (the paper's "FaceScape" row).

Both are trained on the training split of ``registered.h5`` (every face in correspondence
with the template). This module builds, saves and loads them; they are used through
:class:`cm3dmm.methods.FaceModel` (:func:`cm3dmm.methods.baseline_face`), so they are fitted,
sampled and evaluated at upsampling levels by the same code as the continuous model
(:mod:`cm3dmm.fit`; a discrete model's level points are barycentric interpolations of its
decoded vertices).

One self-describing file per model (``torch.save`` of a dict, loadable with
``weights_only=True``): ``method``, ``format_version``, ``config``, ``arrays`` (tensors),
``info`` (caps, ranks, explained variance, ...), ``train_index`` (training-set index ->
(subject, expression)), ``template_hash`` and free ``meta``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cm3dmm.errors import InputError
from cm3dmm.io.atomic import atomic_path, atomic_write_json

log = logging.getLogger(__name__)

BASELINES = ("pca", "bilinear")
FORMAT_VERSION = 1
#: Singular values below ``RANK_TOL * largest`` count as zero when the data's rank is measured.
RANK_TOL = 1e-6
#: Above this many faces (and coordinates) PCA switches from the exact Gram eigensolver to a
#: randomised SVD of the requested size.
EXACT_PCA_MAX = 6000


# --------------------------------------------------------------------------- helpers
def _leading_eigvecs(gram: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, k) and eigenvectors (n, k) of a symmetric PSD matrix."""
    lam, vec = np.linalg.eigh(gram)
    order = np.argsort(lam)[::-1][:k]
    return np.clip(lam[order], 0.0, None), vec[:, order]


def _rank(values: np.ndarray, tol: float = RANK_TOL) -> int:
    """Numerical rank from singular values (descending)."""
    if len(values) == 0 or values[0] <= 0:
        return 0
    return int((values > tol * values[0]).sum())


def _to_tensors(arrays: dict[str, np.ndarray]) -> dict:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}


def _plain(obj: Any) -> Any:
    """Make ``obj`` loadable with ``torch.load(weights_only=True)`` (plain Python types)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return obj


class _Baseline:
    """Shared persistence for the baselines."""

    method = ""

    def _arrays(self) -> dict[str, np.ndarray]:  # pragma: no cover - overridden
        raise NotImplementedError

    def _info(self) -> dict:  # pragma: no cover - overridden
        raise NotImplementedError

    def save(self, path: str | os.PathLike, meta: dict | None = None) -> Path:
        """Write the model as one self-describing torch file, atomically."""
        import torch

        payload = {
            "method": self.method,
            "format_version": FORMAT_VERSION,
            "config": _plain(self.config),
            "arrays": _to_tensors(self._arrays()),
            "info": _plain(self._info()),
            "train_index": [[s, e] for s, e in self.train_index],
            "template_hash": self.template_hash,
            "meta": _plain(meta or {}),
        }
        with atomic_path(path) as tmp:
            torch.save(payload, tmp)
        return Path(path)


# --------------------------------------------------------------------------- PCA
@dataclass
class PCAModel(_Baseline):
    """Mean face + principal components of the training faces (identities and expressions
    pooled, like the Basel Face Model with expressions).

    ``x = mean + sum_k codes_k components_k`` with orthonormal components (each (V, 3) of
    unit Frobenius norm), so codes are in mm; ``std_k`` = the training codes' standard deviation
    (square root of the k-th covariance eigenvalue).
    """

    mean: np.ndarray  #: (V, 3) mm
    components: np.ndarray  #: (D, V, 3) orthonormal principal directions
    std: np.ndarray  #: (D,) standard deviation of the training codes along each component
    faces: np.ndarray  #: (F, 3) template triangles
    explained_variance: np.ndarray  #: (D,) fraction of the total training variance per component
    rank: int  #: numerical rank of the centred training data
    dim_requested: int  #: the asked-for latent size (``dim`` = min(dim_requested, rank))
    train_codes: np.ndarray  #: (S, D) codes of the training faces
    train_index: list[tuple[str, str]] = field(default_factory=list)  #: index -> (subject, expression)
    template_hash: str = ""
    config: dict = field(default_factory=dict)
    rank_exact: bool = True  #: False when a randomised SVD only bounds the rank from below
    method = "pca"

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    @property
    def n_vertices(self) -> int:
        return int(self.mean.shape[0])

    @property
    def code_mean(self) -> np.ndarray:
        """(D,) mean of the training codes (zero up to round-off: the data are centred)."""
        return self.train_codes.mean(axis=0) if len(self.train_codes) else np.zeros(self.dim)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """codes (B, D) or (D,) -> vertices (B, V, 3) mm."""
        c = np.asarray(codes, dtype=np.float64)
        c = c[None] if c.ndim == 1 else c
        if c.ndim != 2 or c.shape[1] != self.dim:
            raise ValueError(f"codes must have shape (B, {self.dim}), got {c.shape}")
        return self.mean + np.einsum("bd,dvc->bvc", c, self.components)

    def truncate(self, dim: int) -> "PCAModel":
        """The same model with its first ``dim`` components (PCA of a smaller latent size)."""
        if not 1 <= dim:
            raise ValueError(f"dim must be >= 1, got {dim}")
        d = min(dim, self.dim)
        return PCAModel(
            mean=self.mean, components=self.components[:d], std=self.std[:d], faces=self.faces,
            explained_variance=self.explained_variance[:d], rank=self.rank, dim_requested=dim,
            train_codes=self.train_codes[:, :d], train_index=list(self.train_index),
            template_hash=self.template_hash, config={**self.config, "dim": dim}, rank_exact=self.rank_exact,
        )

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean.astype(np.float32), "components": self.components.astype(np.float32),
            "std": self.std.astype(np.float64), "faces": self.faces.astype(np.int64),
            "explained_variance": self.explained_variance.astype(np.float64),
            "train_codes": self.train_codes.astype(np.float32),
        }

    def _info(self) -> dict:
        return {"rank": self.rank, "rank_exact": self.rank_exact, "dim": self.dim,
                "dim_requested": self.dim_requested,
                "explained_variance_total": float(self.explained_variance.sum())}

    @classmethod
    def _from_payload(cls, p: dict) -> "PCAModel":
        a = {k: v.numpy() for k, v in p["arrays"].items()}
        info = p["info"]
        return cls(
            mean=a["mean"].astype(np.float64), components=a["components"].astype(np.float64),
            std=a["std"], faces=a["faces"].astype(np.int32), explained_variance=a["explained_variance"],
            rank=int(info["rank"]), dim_requested=int(info["dim_requested"]),
            train_codes=a["train_codes"].astype(np.float64),
            train_index=[tuple(x) for x in p["train_index"]], template_hash=p["template_hash"],
            config=dict(p["config"]), rank_exact=bool(info["rank_exact"]),
        )


def fit_pca(
    vertices: np.ndarray,
    faces: np.ndarray,
    dim: int,
    train_index: list[tuple[str, str]] | None = None,
    template_hash: str = "",
    config: dict | None = None,
    solver: str = "auto",
    seed: int = 0,
) -> PCAModel:
    """PCA of training faces. vertices (S, V, 3) mm -> :class:`PCAModel` of latent size
    ``min(dim, rank)`` (rank: numerical rank of the centred data, recorded).

    solver: ``exact`` (eigendecomposition of the S x S Gram matrix, or the 3V x 3V covariance,
    whichever is smaller), ``randomized`` (randomised SVD of size dim + 10 with 4 power
    iterations; the rank is then only known up to that size), ``auto`` (exact up to
    ``EXACT_PCA_MAX`` faces or coordinates).
    """
    x = np.asarray(vertices, dtype=np.float64)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"vertices must have shape (S, V, 3), got {x.shape}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    S, V = x.shape[:2]
    if S < 2:
        raise ValueError(f"PCA needs at least 2 training faces, got {S}")
    mean = x.mean(axis=0)
    xc = (x - mean).reshape(S, 3 * V)
    total = float((xc**2).sum())
    small = min(S, 3 * V)
    if solver == "auto":
        solver = "exact" if small <= EXACT_PCA_MAX else "randomized"
    rank_exact = True
    if solver == "exact":
        if S <= 3 * V:
            lam, u = _leading_eigvecs(xc @ xc.T, S)  # (S,), (S, S)
            sv = np.sqrt(lam)
            rank = _rank(sv)
            d = min(dim, rank)
            comps = (u[:, :d].T @ xc) / sv[:d, None]  # (d, 3V)
        else:
            lam, vec = _leading_eigvecs(xc.T @ xc, 3 * V)
            sv = np.sqrt(lam)
            rank = _rank(sv)
            d = min(dim, rank)
            comps = vec[:, :d].T
    elif solver == "randomized":
        k = min(dim + 10, small)
        rng = np.random.default_rng(seed)
        q, _ = np.linalg.qr(xc.T @ rng.standard_normal((S, k)))  # (3V, k)
        for _ in range(4):
            q, _ = np.linalg.qr(xc @ q)  # (S, k)
            q, _ = np.linalg.qr(xc.T @ q)  # (3V, k)
        _, sv, vt = np.linalg.svd(xc @ q, full_matrices=False)  # (S, k) = U S (Q^T-basis)
        comps_all = vt @ q.T  # (k, 3V)
        rank = _rank(sv)
        rank_exact = rank < k
        d = min(dim, rank)
        comps = comps_all[:d]
    else:
        raise ValueError(f"solver must be auto, exact or randomized, got {solver!r}")
    if d == 0:
        raise ValueError("the training faces are all identical: PCA has rank 0")
    # sign convention: the largest-magnitude coordinate of each component is positive
    signs = np.sign(comps[np.arange(d), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    codes = xc @ comps.T  # (S, d)
    std = sv[:d] / np.sqrt(S - 1)
    if d < dim:
        log.info("pca: dim %d capped at the data's rank %d", dim, rank)
    return PCAModel(
        mean=mean, components=comps.reshape(d, V, 3), std=std, faces=np.asarray(faces, np.int32),
        explained_variance=(sv[:d] ** 2) / total if total > 0 else np.zeros(d), rank=rank,
        dim_requested=int(dim), train_codes=codes, train_index=list(train_index or []),
        template_hash=template_hash, config={"dim": int(dim), "solver": solver, **(config or {})},
        rank_exact=rank_exact,
    )


# --------------------------------------------------------------------------- bilinear
@dataclass
class BilinearModel(_Baseline):
    """Tucker / bilinear model over identity x expression (FaceScape's kind):

        x(w_id, w_exp) = mean + sum_ab core[a, b] w_id[a] w_exp[b]

    built by HOSVD + HOOI of the centred data tensor (vertices x identities x expressions;
    the vertex mode is kept full). A training face (subject i, expression e) has codes
    ``(id_weights[i], exp_weights[e])``.
    """

    mean: np.ndarray  #: (V, 3) mm
    core: np.ndarray  #: (Di, De, V, 3)
    id_weights: np.ndarray  #: (I, Di) identity factor (one row per training subject)
    exp_weights: np.ndarray  #: (E, De) expression factor (one row per training expression)
    faces: np.ndarray  #: (F, 3)
    subjects: list[str]  #: (I,) training subjects, rows of ``id_weights``
    expressions: list[str]  #: (E,) training expressions, rows of ``exp_weights``
    id_requested: int = 0
    exp_requested: int = 0
    id_rank: int = 0  #: numerical rank of the identity unfolding (caps id_dim)
    exp_rank: int = 0  #: numerical rank of the expression unfolding (caps exp_dim)
    n_missing: int = 0  #: imputed (subject, expression) pairs
    explained_variance: float = 0.0  #: 1 - residual / total over the observed training faces
    train_index: list[tuple[str, str]] = field(default_factory=list)
    template_hash: str = ""
    config: dict = field(default_factory=dict)
    method = "bilinear"

    @property
    def id_dim(self) -> int:
        return int(self.core.shape[0])

    @property
    def exp_dim(self) -> int:
        return int(self.core.shape[1])

    @property
    def n_vertices(self) -> int:
        return int(self.mean.shape[0])

    @property
    def core_augmented(self) -> np.ndarray:
        """(Di + 1, De + 1, V, 3): index 0 of each code axis is a constant 1 (``[0, 0]`` = the
        mean, no linear-only terms), so ``x = sum_ab aug[a, b] [1, w_id]_a [1, w_exp]_b``."""
        out = np.zeros((self.id_dim + 1, self.exp_dim + 1, self.n_vertices, 3), self.core.dtype)
        out[0, 0] = self.mean
        out[1:, 1:] = self.core
        return out

    @property
    def code_stats(self) -> dict:
        """Per-dimension mean / std of the training identity and expression weights, in the model
        files' layout (``id_mean``, ``id_std``, ``exp_mean``, ``exp_std``)."""

        def sd(w):
            return np.maximum(w.std(axis=0, ddof=1), 1e-8) if len(w) > 1 else np.ones(w.shape[1])

        return {"id_mean": self.id_weights.mean(axis=0), "id_std": sd(self.id_weights),
                "exp_mean": self.exp_weights.mean(axis=0), "exp_std": sd(self.exp_weights)}

    def decode(self, w_id: np.ndarray, w_exp: np.ndarray) -> np.ndarray:
        """w_id (B, Di) or (Di,), w_exp (B, De) or (De,) (broadcast over B) -> (B, V, 3)."""
        a = np.atleast_2d(np.asarray(w_id, dtype=np.float64))
        b = np.atleast_2d(np.asarray(w_exp, dtype=np.float64))
        if a.shape[1] != self.id_dim or b.shape[1] != self.exp_dim:
            raise ValueError(f"w_id must be (B, {self.id_dim}) and w_exp (B, {self.exp_dim}), "
                             f"got {a.shape} and {b.shape}")
        if len(a) != len(b):
            if len(a) == 1:
                a = np.repeat(a, len(b), 0)
            elif len(b) == 1:
                b = np.repeat(b, len(a), 0)
            else:
                raise ValueError(f"w_id has {len(a)} rows and w_exp {len(b)}")
        return self.mean + np.einsum("ba,bc,acvk->bvk", a, b, self.core)

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean.astype(np.float32), "core": self.core.astype(np.float32),
            "id_weights": self.id_weights.astype(np.float64), "exp_weights": self.exp_weights.astype(np.float64),
            "faces": self.faces.astype(np.int64),
        }

    def _info(self) -> dict:
        return {
            "subjects": list(self.subjects), "expressions": list(self.expressions),
            "id_dim": self.id_dim, "exp_dim": self.exp_dim, "id_requested": self.id_requested,
            "exp_requested": self.exp_requested, "id_rank": self.id_rank, "exp_rank": self.exp_rank,
            "n_missing": self.n_missing, "explained_variance": self.explained_variance,
        }

    @classmethod
    def _from_payload(cls, p: dict) -> "BilinearModel":
        a = {k: v.numpy() for k, v in p["arrays"].items()}
        info = p["info"]
        return cls(
            mean=a["mean"].astype(np.float64), core=a["core"].astype(np.float64),
            id_weights=a["id_weights"], exp_weights=a["exp_weights"], faces=a["faces"].astype(np.int32),
            subjects=list(info["subjects"]), expressions=list(info["expressions"]),
            id_requested=int(info["id_requested"]), exp_requested=int(info["exp_requested"]),
            id_rank=int(info["id_rank"]), exp_rank=int(info["exp_rank"]), n_missing=int(info["n_missing"]),
            explained_variance=float(info["explained_variance"]),
            train_index=[tuple(x) for x in p["train_index"]], template_hash=p["template_hash"],
            config=dict(p["config"]),
        )


def _impute_initial(t: np.ndarray, observed: np.ndarray, iters: int = 10) -> np.ndarray:
    """Fill missing cells of t (I, E, N) with an additive subject + expression model
    ``a_i + b_e`` fitted to the observed cells by alternating means (b starts at 0, so a
    subject's fill starts from the mean of its observed faces, then gets each expression's
    mean offset)."""
    obs = observed.astype(np.float64)  # (I, E)
    a = (t * obs[..., None]).sum(1) / obs.sum(1)[:, None]  # (I, N)
    b = np.zeros((t.shape[1], t.shape[2]))
    for _ in range(iters):
        cnt_e = np.maximum(obs.sum(0), 1)[:, None]
        b = ((t - a[:, None]) * obs[..., None]).sum(0) / cnt_e
        a = ((t - b[None]) * obs[..., None]).sum(1) / obs.sum(1)[:, None]
    out = t.copy()
    fill = a[:, None] + b[None]
    out[~observed] = fill[~observed]
    return out


def _tucker(d: np.ndarray, id_dim: int, exp_dim: int, hooi_iters: int):
    """Tucker decomposition of a centred tensor d (I, E, N), the N mode kept full.

    Returns core (Di, De, N), u_id (I, Di), u_exp (E, De) with orthonormal columns and the
    numerical ranks of the identity / expression unfoldings; Di, De are capped by them.
    HOSVD start (leading eigenvectors of each unfolding's Gram matrix), then HOOI sweeps.
    """
    I, E, N = d.shape
    flat = d.reshape(I, E * N)
    lam_i, u_id = _leading_eigvecs(flat @ flat.T, I)
    g_exp = np.zeros((E, E))
    for i in range(I):
        g_exp += d[i] @ d[i].T
    lam_e, u_exp = _leading_eigvecs(g_exp, E)
    ri, re = _rank(np.sqrt(lam_i)), _rank(np.sqrt(lam_e))
    di, de = max(min(id_dim, ri), 1), max(min(exp_dim, re), 1)
    u_id, u_exp = u_id[:, :di], u_exp[:, :de]
    for _ in range(hooi_iters):
        y = np.matmul(u_exp.T[None], d).reshape(I, de * N)  # expression mode projected
        _, u_id = _leading_eigvecs(y @ y.T, di)
        z = (u_id.T @ flat).reshape(di, E, N)  # identity mode projected
        g = np.zeros((E, E))
        for a in range(di):
            g += z[a] @ z[a].T
        _, u_exp = _leading_eigvecs(g, de)
    z = (u_id.T @ flat).reshape(di, E, N)
    core = np.matmul(u_exp.T[None], z)  # (Di, De, N)
    return core, u_id, u_exp, ri, re


def fit_bilinear(
    vertices: np.ndarray,
    subject: list[str],
    expression: list[str],
    faces: np.ndarray,
    id_dim: int = 50,
    exp_dim: int = 52,
    hooi_iters: int = 3,
    impute_iters: int = 10,
    template_hash: str = "",
    config: dict | None = None,
) -> BilinearModel:
    """Build the Tucker model from training faces.

    vertices (S, V, 3) with per-face ``subject`` / ``expression`` names. The data tensor is
    identities x expressions x 3V (mean-centred). Missing (subject, expression) pairs are
    imputed: first by the additive model of :func:`_impute_initial`, then ``impute_iters``
    times by the current Tucker reconstruction (EM-style; observed cells are never changed).
    Sizes are capped at the ranks of the identity / expression unfoldings (recorded).
    Factors: HOSVD (leading eigenvectors of each unfolding's Gram matrix) refined by
    ``hooi_iters`` HOOI sweeps.
    """
    x = np.asarray(vertices, dtype=np.float64)
    if x.ndim != 3 or x.shape[-1] != 3:
        raise ValueError(f"vertices must have shape (S, V, 3), got {x.shape}")
    S, V = x.shape[:2]
    if len(subject) != S or len(expression) != S:
        raise ValueError("subject and expression must have one entry per face")
    subjects = list(dict.fromkeys(subject))
    expressions = list(dict.fromkeys(expression))
    I, E, N = len(subjects), len(expressions), 3 * V
    if I < 2 or E < 1:
        raise ValueError(f"the bilinear model needs >= 2 subjects, got {I}")
    si = {s: k for k, s in enumerate(subjects)}
    ei = {e: k for k, e in enumerate(expressions)}
    t = np.zeros((I, E, N))
    observed = np.zeros((I, E), bool)
    for k in range(S):
        i, e = si[subject[k]], ei[expression[k]]
        if observed[i, e]:
            raise ValueError(f"duplicate face for ({subject[k]}, {expression[k]})")
        t[i, e] = x[k].reshape(-1)
        observed[i, e] = True
    n_missing = int((~observed).sum())
    if n_missing:
        t = _impute_initial(t, observed)
        log.info("bilinear: %d of %d (subject, expression) pairs missing, imputed", n_missing, I * E)

    # t is centred in place; the mean is re-estimated after every imputation pass
    mean = t.mean(axis=(0, 1))
    t -= mean
    di = de = None
    ri = re = 0
    for sweep in range(1 + (impute_iters if n_missing else 0)):
        core, u_id, u_exp, ri_, re_ = _tucker(t, id_dim if di is None else di, exp_dim if de is None else de,
                                              hooi_iters)
        if di is None:  # caps fixed on the first pass
            di, de, ri, re = core.shape[0], core.shape[1], ri_, re_
        if not n_missing or sweep == impute_iters:
            break
        # EM step: missing cells <- current reconstruction; re-centre
        for i in np.flatnonzero((~observed).any(axis=1)):
            rows = np.einsum("abn,a->bn", core, u_id[i])  # (De, N)
            miss = np.flatnonzero(~observed[i])
            t[i, miss] = u_exp[miss] @ rows
        shift = t.mean(axis=(0, 1))
        t -= shift
        mean += shift
    if di < id_dim or de < exp_dim:
        log.info("bilinear: %d x %d capped at %d x %d (unfolding ranks %d, %d)", id_dim, exp_dim, di, de, ri, re)
    # orthogonal projection: |D - recon|^2 = |D|^2 - |core|^2 over all cells; the imputed
    # cells' share is removed to report the residual over the observed faces only
    resid_all = float((t**2).sum() - (core**2).sum())
    resid_missing = 0.0
    for i in np.flatnonzero((~observed).any(axis=1)):
        rows = np.einsum("abn,a->bn", core, u_id[i])
        miss = np.flatnonzero(~observed[i])
        resid_missing += float(((t[i, miss] - u_exp[miss] @ rows) ** 2).sum())
    total = float((t[observed] ** 2).sum())
    resid = max(resid_all - resid_missing, 0.0)
    train_index = [(subject[k], expression[k]) for k in range(S)]
    return BilinearModel(
        mean=mean.reshape(V, 3), core=core.reshape(di, de, V, 3), id_weights=u_id, exp_weights=u_exp,
        faces=np.asarray(faces, np.int32), subjects=subjects, expressions=expressions,
        id_requested=int(id_dim), exp_requested=int(exp_dim), id_rank=ri, exp_rank=re, n_missing=n_missing,
        explained_variance=1.0 - resid / total if total > 0 else 1.0, train_index=train_index,
        template_hash=template_hash,
        config={"id_dim": int(id_dim), "exp_dim": int(exp_dim), "hooi_iters": hooi_iters,
                "impute_iters": impute_iters, **(config or {})},
    )


# --------------------------------------------------------------------------- files
def load_baseline(path: str | os.PathLike, method: str | None = None) -> PCAModel | BilinearModel:
    """Load a baseline ``model.pt``; ``method`` (optional) must match the file's method.

    Missing, truncated or foreign files and files of another method raise :class:`InputError`
    naming the file.
    """
    import torch

    path = Path(path)
    if not path.exists():
        raise InputError("model file not found", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle errors, ...
        raise InputError(f"model file is corrupt or truncated ({type(exc).__name__})", path) from None
    found = payload.get("method") if isinstance(payload, dict) else None
    if found not in BASELINES:
        raise InputError(f"not a baseline model file (method {found!r}, expected one of {list(BASELINES)})", path)
    if method is not None and found != method:
        raise InputError(f"is a {found!r} model, expected {method!r}", path)
    if payload.get("format_version") != FORMAT_VERSION:
        raise InputError(f"format_version {payload.get('format_version')!r} is not {FORMAT_VERSION}; "
                         "retrain the baseline", path)
    try:
        cls = PCAModel if found == "pca" else BilinearModel
        return cls._from_payload(payload)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"{found} model file is incomplete ({type(exc).__name__}: {exc})", path) from None


# --------------------------------------------------------------------------- stage
def train_baseline(method: str, data, cfg, dim: int, template_hash: str = "") -> PCAModel | BilinearModel:
    """Train ``method`` ("pca" | "bilinear") on the *train* split of a :class:`RegisteredData`.

    cfg: :class:`cm3dmm.config.BaselineConfig`; dim: the PCA latent size (the bilinear sizes
    come from ``cfg.bilinear_id`` / ``cfg.bilinear_exp``).
    """
    idx = data.indices("train")
    if len(idx) == 0:
        raise InputError("the registered dataset has no training faces")
    verts = np.asarray(data.vertices)[idx]
    subj = [data.subject[i] for i in idx]
    expr = [data.expression[i] for i in idx]
    cfg_dict = asdict(cfg)
    if method == "pca":
        return fit_pca(verts, data.faces, dim, train_index=list(zip(subj, expr)), template_hash=template_hash,
                       config={"baselines": cfg_dict})
    if method == "bilinear":
        if len(set(subj)) < 2:
            raise InputError("the bilinear baseline needs at least 2 training subjects")
        return fit_bilinear(verts, subj, expr, data.faces, cfg.bilinear_id, cfg.bilinear_exp,
                            template_hash=template_hash, config={"baselines": cfg_dict})
    raise InputError(f"unknown baseline method {method!r} (expected one of {list(BASELINES)})")


def run_train_baseline(cfg, method: str) -> Path:
    """Stage entry: train a baseline on ``registered.h5``'s train split and write
    ``models/{method}/model.pt`` and ``models/{method}/summary.json`` (sizes, caps, ranks,
    explained variance, timing)."""
    from cm3dmm.paths import RunPaths
    from cm3dmm.registered import read_registered
    from cm3dmm.template import load_template

    if method not in BASELINES:
        raise InputError(f"unknown baseline method {method!r} (expected one of {list(BASELINES)})")
    paths = RunPaths(cfg.run_dir)
    data = read_registered(paths.registered, with_scans=False)
    template = load_template(paths.template)
    tpl_faces = np.asarray(template.faces)
    if tpl_faces.shape != np.asarray(data.faces).shape or not np.array_equal(tpl_faces, data.faces):
        raise InputError("the template's triangles differ from registered.h5's: rerun the template stage",
                         paths.template)
    dim = cfg.baselines.pca_dim or (cfg.model.id_dim + cfg.model.exp_dim)
    start = time.perf_counter()
    model = train_baseline(method, data, cfg.baselines, dim, template.hash)
    seconds = time.perf_counter() - start
    meta = {"train_seconds": seconds, "registered_hash": data.content_hash(), "run": cfg.run}
    out = model.save(paths.model(method), meta=meta)
    summary = {"method": method, "train_seconds": seconds, "n_train_faces": len(model.train_index),
               **model._info()}
    if method == "pca":
        summary["explained_variance"] = model.explained_variance.tolist()
        summary["explained_variance_cumulative"] = np.cumsum(model.explained_variance).tolist()
    atomic_write_json(paths.baseline_summary(method), _plain(summary))
    log.info("%s: trained in %.1f s -> %s", method, seconds, out)
    return out


__all__ = [
    "BASELINES", "PCAModel", "BilinearModel", "fit_pca", "fit_bilinear",
    "load_baseline", "train_baseline", "run_train_baseline",
]

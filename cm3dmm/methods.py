"""One fitting interface for every method: :class:`FaceModel` and :func:`load_method`.

The fitter (``cm3dmm.fit``) never looks inside a model; it needs, for any method:

* the latent layout: an identity block (``id_dim``) and an expression block (``exp_dim``; 0 for
  ``pca``, whose single code is then per face: ``shared_identity`` is False);
* ``context(vertex_ids)``: everything about a set of template vertices that does not depend on
  the codes (for ``cm3dmm``: UV encoder features and the UV part of every decoder layer), made
  once per fit;
* ``decode(ctx, z_id, z_exp)`` -> positions (B, M, 3) mm and ``jacobian(ctx, z_id, z_exp)`` ->
  (positions, d positions / d [z_id, z_exp] of shape (B, M, 3, Di + De));
* ``decode_release``: a full forward (encoder included) per call, for the release protocol;
* ``id_prior`` / ``exp_prior``: Gaussian code statistics (mean, std per dimension) from training;
* ``structure``: ``"linear"`` (pca: one exact least-squares step), ``"bilinear"`` (linear in each
  block given the other: alternating least squares) or ``"nonlinear"``;
* ``mesh(z_id, z_exp, level)``: meshes at any upsampling level of the template.

Methods: ``cm3dmm`` (:class:`NeuralFace` over :class:`cm3dmm.model.ContinuousModel`), ``pca``
(:class:`PCAFace`), ``bilinear`` (:class:`BilinearFace`). :func:`load_method` reads the method
name stored in a ``model.pt`` and builds the right one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cm3dmm.errors import InputError, is_unreadable

log = logging.getLogger(__name__)

METHODS = ("cm3dmm", "pca", "bilinear")


@dataclass
class CodePrior:
    """Independent Gaussian per code dimension (from the training codes)."""

    mean: torch.Tensor  #: (D,)
    std: torch.Tensor  #: (D,) > 0

    @classmethod
    def standard(cls, dim: int, std: float = 1.0) -> "CodePrior":
        return cls(torch.zeros(dim), torch.full((dim,), float(std)))

    @classmethod
    def from_codes(cls, codes: torch.Tensor | np.ndarray, floor: float = 1e-6) -> "CodePrior":
        """Per-dimension mean / std of a code table (K, D)."""
        c = torch.as_tensor(np.asarray(codes), dtype=torch.float32)
        if c.ndim != 2 or len(c) < 2:
            raise ValueError(f"codes must have shape (K >= 2, D), got {tuple(c.shape)}")
        return cls(c.mean(0), c.std(0).clamp_min(floor))

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


@dataclass
class Level:
    """An upsampling level: points on the template as (triangle, barycentrics) + triangles."""

    tri: np.ndarray  #: (P,) int template triangle ids
    bary: np.ndarray  #: (P, 3) barycentric coordinates
    faces: np.ndarray  #: (T, 3) triangles over the P points


def _levels_of(template) -> list[Level]:
    levels = getattr(template, "levels", None) or []
    return [Level(np.asarray(lv.tri), np.asarray(lv.bary), np.asarray(lv.faces)) for lv in levels]


class FaceModel:
    """What a fitter sees of a method (see the module docstring). Subclasses fill the fields."""

    method: str = ""
    id_dim: int = 0
    exp_dim: int = 0
    shared_identity: bool = True  #: an identity block that several expressions can share
    structure: str = "nonlinear"  #: linear | bilinear | nonlinear
    mean: np.ndarray  #: (V, 3) average face, mm
    faces: np.ndarray  #: (F, 3) template triangles
    landmarks: dict[str, int]
    levels: list[Level]
    id_prior: CodePrior
    exp_prior: CodePrior
    dtype: torch.dtype = torch.float32

    @property
    def code_dim(self) -> int:
        return self.id_dim + self.exp_dim

    @property
    def n_vertices(self) -> int:
        return int(self.mean.shape[0])

    # -------------------------------------------------------------- to override
    def context(self, vertex_ids: np.ndarray | None = None) -> Any:
        """Code-independent data for template vertices ``vertex_ids`` (M,) (None = all)."""
        raise NotImplementedError

    def decode(self, ctx: Any, z_id: torch.Tensor, z_exp: torch.Tensor) -> torch.Tensor:
        """z_id (B, Di), z_exp (B, De) -> positions (B, M, 3) at the context's vertices."""
        raise NotImplementedError

    def jacobian(self, ctx: Any, z_id: torch.Tensor, z_exp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (B, M, 3) and their Jacobian (B, M, 3, Di + De) w.r.t. ``[z_id, z_exp]``.

        Default: forward-mode autodiff, one tangent per code dimension shared by the batch (each
        face's positions depend on its own codes only). Subclasses override with closed forms.
        """
        from torch.func import jvp, vmap

        di = self.id_dim
        codes = torch.cat([z_id, z_exp], 1).detach()

        def f(c):
            return self.decode(ctx, c[:, :di], c[:, di:])

        eye = torch.eye(self.code_dim, dtype=codes.dtype, device=codes.device)

        def column(e):
            return jvp(f, (codes,), (e.expand_as(codes),))[1]

        with torch.no_grad():
            out = f(codes)
        with torch.no_grad():
            cols = vmap(column, chunk_size=16)(eye)  # (D, B, M, 3)
        return out, cols.permute(1, 2, 3, 0).detach()

    def decode_release(self, ctx: Any, z_id: torch.Tensor, z_exp: torch.Tensor) -> torch.Tensor:
        """A decode that recomputes everything each call (release protocol); default: decode."""
        return self.decode(ctx, z_id, z_exp)

    # -------------------------------------------------------------- shared
    def zero_codes(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(n, self.id_dim, dtype=self.dtype), torch.zeros(n, self.exp_dim, dtype=self.dtype))

    def mean_codes(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prior means, repeated for ``n`` faces."""
        return (self.id_prior.mean.to(self.dtype).expand(n, -1).clone(),
                self.exp_prior.mean.to(self.dtype).expand(n, -1).clone())

    def vertices(self, z_id: torch.Tensor, z_exp: torch.Tensor) -> np.ndarray:
        """Positions at all template vertices, (B, V, 3) float64 numpy."""
        with torch.no_grad():
            return self.decode(self.context(None), z_id, z_exp).double().cpu().numpy()

    def mesh(self, z_id: torch.Tensor, z_exp: torch.Tensor, level: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Meshes at upsampling ``level`` (0 = template vertices): (B, P, 3) and faces (T, 3).

        Default: barycentric interpolation of the template-vertex positions (exact for the
        piecewise-linear baselines).
        """
        verts = self.vertices(z_id, z_exp)
        if level == 0:
            return verts, np.asarray(self.faces)
        lv = self._level(level)
        corners = verts[:, np.asarray(self.faces)[lv.tri]]  # (B, P, 3, 3)
        return np.einsum("bpkc,pk->bpc", corners, lv.bary), lv.faces

    def _level(self, level: int) -> Level:
        if not 0 <= level < max(len(self.levels), 1):
            raise InputError(f"upsampling level {level} does not exist (the template has levels "
                             f"0..{max(len(self.levels), 1) - 1})")
        return self.levels[level]


# ----------------------------------------------------------------------------------- cm3dmm
class NeuralFace(FaceModel):
    """The continuous model: contexts are :class:`cm3dmm.model.UVContext` of template vertices."""

    method = "cm3dmm"
    structure = "nonlinear"
    shared_identity = True

    def __init__(self, model, id_prior: CodePrior | None = None, exp_prior: CodePrior | None = None,
                 jacobian_chunk: int = 4096):
        self.model = model
        tpl = model.template
        self.id_dim, self.exp_dim = int(model.id_dim), int(model.exp_dim)
        self.mean = np.asarray(model.mean.detach().cpu().numpy(), np.float64)
        self.faces = np.asarray(model.faces.detach().cpu().numpy())
        self.landmarks = dict(getattr(tpl, "landmarks", None) or {})
        self.levels = _levels_of(tpl)
        self.id_prior = id_prior or CodePrior.standard(self.id_dim, 0.01)
        self.exp_prior = exp_prior or CodePrior.standard(self.exp_dim, 0.01)
        self.dtype = model.mean.dtype
        self.jacobian_chunk = int(jacobian_chunk)

    def context(self, vertex_ids=None):
        from cm3dmm.model import Points

        m = self.model
        if vertex_ids is None:
            ids = torch.arange(m.n_vertices, device=m.mean.device)
        else:
            ids = torch.as_tensor(np.asarray(vertex_ids, np.int64), device=m.mean.device)
        # template vertices: every interpolation is exact there (weight 1 on the vertex itself)
        pts = Points(m.uv[ids], ids[:, None], torch.ones(len(ids), 1, dtype=m.mean.dtype, device=m.mean.device))
        with torch.no_grad():
            ctx = m.precompute(pts.uv, avg=m.mean[ids], pts=pts)
        # the decoder's effective weights, fixed while fitting (weight normalisation done once)
        ctx.frozen = m.decoder.frozen_weights()
        return ctx

    def decode(self, ctx, z_id, z_exp):
        frozen = getattr(ctx, "frozen", None)
        if frozen is None or torch.is_grad_enabled() and (z_id.requires_grad or z_exp.requires_grad):
            return self.model.decode_context(ctx, z_id, z_exp)
        codes = torch.cat([z_id, z_exp], 1)
        d = self.model.decoder.forward_codes(codes[:, None, :], ctx.pre, weights=frozen)
        if ctx.lin is not None:
            d = d + torch.einsum("ncd,bd->bnc", ctx.lin.to(codes.dtype), codes)
        return d + ctx.avg.to(d.dtype)

    def jacobian(self, ctx, z_id, z_exp):
        codes = torch.cat([z_id, z_exp], 1).detach()
        with torch.no_grad():
            out, jac = self.model.decoder.forward_and_jacobian(codes, ctx.pre, chunk_size=self.jacobian_chunk,
                                                               weights=getattr(ctx, "frozen", None))
            if ctx.lin is not None:  # the linear basis: its Jacobian is the basis itself
                lin = ctx.lin.to(codes.dtype)
                out = out + torch.einsum("ncd,bd->bnc", lin, codes)
                jac = jac + lin
        return out + ctx.avg.to(out.dtype), jac

    def decode_release(self, ctx, z_id, z_exp):
        return self.model.decode(ctx.uv, z_id, z_exp, avg=ctx.avg)

    #: points decoded per call of :meth:`mesh` (faces x level points): bounds the decoder's
    #: activations (an ICT face at level 2 has ~150k points; 400 of them at once needed > 24 GB)
    mesh_chunk_points = 1 << 19

    def mesh(self, z_id, z_exp, level=0):
        if level == 0:
            return super().mesh(z_id, z_exp, 0)
        self._level(level)
        pts, avg, faces = self.model.level_points(level)
        n, p = len(z_id), len(pts)
        out = np.empty((n, p, 3))
        per_call = max(1, int(self.mesh_chunk_points))
        fb = max(1, per_call // p)  # faces per call
        fp = min(p, per_call)  # points per call (when one face's level is larger than a call)
        with torch.no_grad():
            for b0 in range(0, n, fb):
                for p0 in range(0, p, fp):
                    part = pts.slice(p0, p0 + fp)
                    x = self.model.decode(part.uv, z_id[b0:b0 + fb], z_exp[b0:b0 + fb], avg=avg[p0:p0 + fp],
                                          pts=part)
                    out[b0:b0 + fb, p0:p0 + fp] = x.double().cpu().numpy()
        return out, faces.cpu().numpy()


# ----------------------------------------------------------------------------------- pca
class PCAFace(FaceModel):
    """``x = mean + sum_d z_d basis_d`` (one code per face; ``id_dim`` = D, ``exp_dim`` = 0).

    mean: (V, 3); basis: (D, V, 3); std: (D,) the code standard deviations (the prior).
    """

    method = "pca"
    structure = "linear"
    shared_identity = False

    def __init__(self, mean, basis, std, faces, landmarks=None, levels=None, code_mean=None):
        self.mean = np.asarray(mean, np.float64)
        self._mean_t = torch.as_tensor(self.mean, dtype=torch.float32)
        self.basis = torch.as_tensor(np.asarray(basis), dtype=torch.float32)
        if self.basis.ndim != 3 or self.basis.shape[1:] != self._mean_t.shape:
            raise ValueError(f"basis must have shape (D, {self.mean.shape[0]}, 3), got {tuple(self.basis.shape)}")
        self.id_dim, self.exp_dim = int(self.basis.shape[0]), 0
        std = torch.as_tensor(np.asarray(std), dtype=torch.float32).clamp_min(1e-8)
        mu = torch.zeros_like(std) if code_mean is None else torch.as_tensor(np.asarray(code_mean), dtype=torch.float32)
        self.id_prior = CodePrior(mu, std)
        self.exp_prior = CodePrior.standard(0)
        self.faces = np.asarray(faces)
        self.landmarks = dict(landmarks or {})
        self.levels = list(levels or [])

    def context(self, vertex_ids=None):
        if vertex_ids is None:
            return self._mean_t, self.basis
        ids = torch.as_tensor(np.asarray(vertex_ids, np.int64))
        return self._mean_t[ids], self.basis[:, ids]

    def decode(self, ctx, z_id, z_exp):
        mean, basis = ctx
        return mean + torch.einsum("bd,dmc->bmc", z_id.to(basis.dtype), basis)

    def jacobian(self, ctx, z_id, z_exp):
        mean, basis = ctx
        jac = basis.permute(1, 2, 0).unsqueeze(0).expand(z_id.shape[0], -1, -1, -1)
        return self.decode(ctx, z_id, z_exp).detach(), jac


# ----------------------------------------------------------------------------------- bilinear
class BilinearFace(FaceModel):
    """``x = sum_ij a_i b_j core_ij`` with ``a = [1, z_id]``, ``b = [1, z_exp]``.

    core: (Di + 1, De + 1, V, 3) (index 0 of each axis = the constant term, so ``core[0, 0]`` is
    the mean face and ``core[i, 0]`` / ``core[0, j]`` the linear identity / expression terms).
    """

    method = "bilinear"
    structure = "bilinear"
    shared_identity = True

    def __init__(self, core, faces, id_prior: CodePrior, exp_prior: CodePrior, landmarks=None, levels=None):
        self.core = torch.as_tensor(np.asarray(core), dtype=torch.float32)
        if self.core.ndim != 4 or self.core.shape[-1] != 3:
            raise ValueError(f"core must have shape (Di + 1, De + 1, V, 3), got {tuple(self.core.shape)}")
        self.id_dim, self.exp_dim = int(self.core.shape[0] - 1), int(self.core.shape[1] - 1)
        self.mean = self.core[0, 0].double().numpy()
        self.faces = np.asarray(faces)
        self.id_prior, self.exp_prior = id_prior, exp_prior
        self.landmarks = dict(landmarks or {})
        self.levels = list(levels or [])

    def context(self, vertex_ids=None):
        core = self.core if vertex_ids is None else \
            self.core[:, :, torch.as_tensor(np.asarray(vertex_ids, np.int64))]
        return _BilinearContext(core)

    @staticmethod
    def _aug(z):
        return torch.cat([torch.ones_like(z[:, :1]), z], 1)

    def decode(self, ctx, z_id, z_exp):
        a, b = self._aug(z_id.to(ctx.dtype)), self._aug(z_exp.to(ctx.dtype))
        w = ctx.contract_exp(b)  # (B, Di + 1, M * 3)
        return torch.bmm(a[:, None, :], w)[:, 0].view(len(a), -1, 3)

    def jacobian(self, ctx, z_id, z_exp):
        """Closed form: two matrix products with the core (no per-face einsum over both codes).

        ``d x / d z_id[i] = sum_j b_j core[1 + i, j]`` and ``d x / d z_exp[j] = sum_i a_i core[i, 1 + j]``
        with ``a = [1, z_id]``, ``b = [1, z_exp]``; ``x = sum_i a_i (d x / d a_i)``.
        """
        a, b = self._aug(z_id.to(ctx.dtype)), self._aug(z_exp.to(ctx.dtype))
        n, m = len(a), ctx.core.shape[2]
        w = ctx.contract_exp(b)  # (B, Di + 1, M * 3)
        v = (a @ ctx.core.reshape(ctx.core.shape[0], -1)).view(n, ctx.core.shape[1], -1)  # (B, De + 1, M * 3)
        x = torch.bmm(a[:, None, :], w)[:, 0].view(n, m, 3)
        jac = torch.cat([w[:, 1:], v[:, 1:]], 1)  # (B, D, M * 3)
        return x, jac.view(n, -1, m, 3).permute(0, 2, 3, 1)  # (B, M, 3, D) view


class _BilinearContext:
    """The bilinear core at a set of vertices, with the copy laid out for contracting the
    expression axis first (``core`` (Di + 1, De + 1, M, 3); ``by_exp`` (De + 1, (Di + 1) M 3))."""

    def __init__(self, core: torch.Tensor):
        self.core = core.contiguous()
        self.by_exp = core.transpose(0, 1).reshape(core.shape[1], -1).contiguous()
        self.dtype = core.dtype

    def contract_exp(self, b: torch.Tensor) -> torch.Tensor:
        """(B, De + 1) -> (B, Di + 1, M * 3): ``sum_j b_j core[:, j]``."""
        return (b @ self.by_exp).view(len(b), self.core.shape[0], -1)


# ----------------------------------------------------------------------------------- loading
def read_method_name(path: str | os.PathLike) -> str:
    """The ``method`` entry of a model file (InputError when missing / unreadable)."""
    path = Path(path)
    if not path.exists():
        raise InputError("model file not found", path)
    if path.is_dir():
        raise InputError("is a folder, not a model file (give the model.pt inside it)", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input problem
        if is_unreadable(exc):  # permissions, I/O error: not corrupt
            raise InputError(f"cannot read the model file ({exc.strerror})", path) from None
        raise InputError(f"model file is corrupt or not a cm3dmm model ({type(exc).__name__})", path) from None
    method = payload.get("method") if isinstance(payload, dict) else None
    if method not in METHODS:
        raise InputError(f"model file names method {method!r}, expected one of {list(METHODS)}", path)
    bad = _non_finite(payload)
    if bad:
        raise InputError(f"model file holds NaN or infinite values (in {bad}): it is corrupt", path)
    return str(method)


def _non_finite(obj, where: str = "") -> str | None:
    """The key path of the first tensor with a NaN / inf value in a (nested) payload, else None."""
    if isinstance(obj, torch.Tensor):
        return where or "?" if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        bad = _non_finite(v, f"{where}.{k}" if where else str(k))
        if bad:
            return bad
    return None


def _prior_from_extra(extra: dict, name: str, dim: int, fallback_std: float) -> CodePrior:
    """Code statistics of block ``name`` ("id" / "exp") from ``extra["code_stats"]["{name}_mean" /
    "{name}_std"]`` (the layout every model file of the project writes: training, the release import,
    and the bilinear baseline's ``code_stats``), else N(0, fallback_std) with a warning."""
    stats = extra.get("code_stats") or {}
    mean, std = stats.get(f"{name}_mean"), stats.get(f"{name}_std")
    if mean is not None and std is not None:
        mean = torch.as_tensor(np.asarray(mean), dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(np.asarray(std), dtype=torch.float32).reshape(-1)
        if mean.shape == (dim,) and std.shape == (dim,):
            return CodePrior(mean, std.clamp_min(1e-6))
    log.warning("model file has no %s code statistics; using N(0, %g)", name, fallback_std)
    return CodePrior.standard(dim, fallback_std)


def load_method(path: str | os.PathLike, template=None, expect: str | None = None) -> FaceModel:
    """Load any method's ``model.pt`` as a :class:`FaceModel` (dispatch on its method name).

    ``template``: a :class:`cm3dmm.template.Template` for the baselines' upsampling levels and
    landmarks when their file does not carry them. ``expect``: the method the file must hold
    (InputError otherwise, e.g. a PCA model copied into ``models/cm3dmm/``).
    """
    path = Path(path)
    method = read_method_name(path)
    if expect is not None and method != expect:
        raise InputError(f"holds a {method!r} model, expected {expect!r}", path)
    if method == "cm3dmm":
        from cm3dmm.model import load_model

        model, extra = load_model(path)
        from cm3dmm.config import TrainConfig

        code_std = float((extra.get("train_config") or {}).get("code_std", TrainConfig.code_std))
        return NeuralFace(model, _prior_from_extra(extra, "id", model.id_dim, code_std),
                          _prior_from_extra(extra, "exp", model.exp_dim, code_std))
    from cm3dmm import baselines

    base = baselines.load_baseline(path)
    return baseline_face(base, template)


def baseline_face(base, template=None) -> FaceModel:
    """Wrap a loaded baseline (``cm3dmm.baselines``) as a :class:`FaceModel`."""
    tpl = template
    faces = base.faces
    landmarks = dict(getattr(tpl, "landmarks", None) or {})
    levels = _levels_of(tpl) if tpl is not None else []
    if base.method == "pca":
        mean = np.asarray(base.mean, np.float64).reshape(-1, 3)
        basis = np.asarray(base.components, np.float64)
        basis = basis.reshape(basis.shape[0], -1, 3)
        std = np.asarray(base.std, np.float64).reshape(-1)
        return PCAFace(mean, basis, std, faces, landmarks, levels, code_mean=base.code_mean)
    core = np.asarray(base.core_augmented, np.float64)
    id_p = _prior_from_extra({"code_stats": base.code_stats}, "id", core.shape[0] - 1, 1.0)
    ex_p = _prior_from_extra({"code_stats": base.code_stats}, "exp", core.shape[1] - 1, 1.0)
    return BilinearFace(core, faces, id_p, ex_p, landmarks, levels)

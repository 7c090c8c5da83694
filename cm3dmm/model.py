"""The continuous morphable model: ``x(uv) = avg(uv) + f(uv, z_id, z_exp)``.

:class:`ContinuousModel` holds the template's arrays (as buffers), a UV encoder and the
DeepSDF-like decoder (``cm3dmm.nn``). It holds **no latent codes**: training owns its code
tables, fitting owns its fresh codes (STYLE.md); the model maps any batch of codes and any
UVs to positions.

With ``cfg.basis`` the field has a linear part: ``f(uv, z) = B(uv) z + r(uv, z)`` with ``B`` a
per-vertex basis (V, 3, Di + De) evaluated at ``uv`` by the model's interpolation (training
initialises it from the PCA of the training faces, ``cm3dmm.train``) and ``r`` the decoder, a
nonlinear residual. ``cfg.interpolation = "smooth"`` evaluates ``avg`` and ``B`` between vertices
with :class:`cm3dmm.nn.smooth.SmoothInterpolator` (exact at vertices, smooth in between, never
across a slit of the UV layout) instead of barycentric interpolation.

    deformation(uv, z_id, z_exp) -> (B, N, 3)          the field f
    decode(uv, z_id, z_exp, avg=None) -> (B, N, 3)      avg(uv) + f
    precompute(uv) -> UVContext; decode_context(ctx, z_id, z_exp)   fitting: UV part once
    mesh(z_id, z_exp, level=0 | grid=n) -> (vertices (B, P, 3), faces (T, 3))

:func:`save_model` / :func:`load_model` write / read ONE self-describing file (``model.pt``):
method name, format version, the full configuration, the weights, the template it was trained
with (arrays and hash) and whatever training adds (code tables, the training-set index ->
(subject, expression) map, code statistics, a summary). ``load_model`` rebuilds the model from
that file alone.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cm3dmm.config import ModelConfig, config_from_dict, config_to_dict
from cm3dmm.errors import InputError
from cm3dmm.io.atomic import atomic_path

log = logging.getLogger(__name__)

METHOD = "cm3dmm"
FILE_FORMAT = "cm3dmm-model"
FORMAT_VERSION = 1

__all__ = ["ContinuousModel", "UVContext", "save_model", "load_model", "METHOD"]


#: a located point whose largest barycentric coordinate is within this of 1 is the triangle's corner
#: vertex: float32 UVs of a vertex (the sample cache stores them so) locate a few 1e-6 off the corner,
#: which would otherwise make a vertex query read the smooth fit's whole neighbourhood (and the residual
#: evaluate the decoder at all of it). Snapping moves a point by at most this times an edge (~1e-4 mm).
VERTEX_SNAP = 1e-5


def _snap_to_vertices(bary: np.ndarray) -> np.ndarray:
    """Barycentrics (N, 3) with rows within :data:`VERTEX_SNAP` of a corner made that corner exactly."""
    k = np.argmax(bary, axis=1)
    snap = bary[np.arange(len(bary)), k] >= 1.0 - VERTEX_SNAP
    if not snap.any():
        return bary
    out = bary.copy()
    out[snap] = 0.0
    out[np.flatnonzero(snap), k[snap]] = 1.0
    return out


def _prune(idx: np.ndarray, w: np.ndarray, eps: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """Drop the entries of (index, weight) rows that are ~0 in every row (a vertex query keeps one
    entry): rows sorted by |weight|, cut to the widest row's count of non-negligible weights."""
    if idx.size == 0:
        return idx, w
    order = np.argsort(-np.abs(w), axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, 1)
    w = np.take_along_axis(w, order, 1)
    keep = max(1, int((np.abs(w) > eps).sum(1).max()))
    return np.ascontiguousarray(idx[:, :keep]), np.ascontiguousarray(w[:, :keep])


@dataclass
class Points:
    """Query points as a sparse linear map of per-vertex values (the model's interpolation).

    uv: (N, 2); index: (N, W) int64 vertex ids; weight: (N, W) with
    ``value(n) = sum_j weight[n, j] * per_vertex[index[n, j]]``.
    """

    uv: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def slice(self, start: int, stop: int) -> "Points":
        """The points ``start:stop``."""
        return Points(self.uv[start:stop], self.index[start:stop], self.weight[start:stop])

    def gather(self, values: torch.Tensor, per_face: bool = False) -> torch.Tensor:
        """Per-vertex values (V, C) or (B, V, C) -> (N, C) / (B, N, C).

        ``per_face``: the points are B x N points flattened face-major (the points of face b are
        rows ``b * N .. (b + 1) * N - 1``), each read from its own face's values (B, V, C) -> (B, N, C).
        """
        if not per_face:
            picked = values[..., self.index, :]  # (..., N, W, C)
            return (picked * self.weight.to(values.dtype)[..., None]).sum(-2)
        b = values.shape[0]
        idx = self.index.reshape(b, -1, self.index.shape[-1])  # (B, N, W)
        w = self.weight.reshape(b, -1, self.weight.shape[-1]).to(values.dtype)
        rows = torch.arange(b, device=values.device)[:, None, None]
        return (values[rows, idx] * w[..., None]).sum(-2)


@dataclass
class UVContext:
    """The code-independent part of a decode at fixed UVs (reused by a fitter).

    uv: (N, 2); feats: (N, F) encoder features; pre: the decoder's per-layer UV
    contributions (``Decoder.precompute_uv``); avg: (N, 3) average-face positions (mm);
    lin: (N, 3, Di + De) the linear basis at the points (None without ``cfg.basis``).
    """

    uv: torch.Tensor
    feats: torch.Tensor
    pre: Any
    avg: torch.Tensor
    lin: torch.Tensor | None = None

    @property
    def n_points(self) -> int:
        return int(self.uv.shape[0])


class ContinuousModel(nn.Module):
    """Template + UV encoder + decoder. Sizes come from the template and ``cfg``.

    template: a :class:`cm3dmm.template.Template` (mean (V, 3), faces (T, 3), uv (V, 2),
    upsampling levels, ``avg(uv)``, ``hash``); cfg: :class:`~cm3dmm.config.ModelConfig`;
    device: only consulted by the ``tcnn`` / ``auto`` encoder backends (move with ``.to``).
    """

    def __init__(self, template, cfg: ModelConfig, device: str | torch.device | None = None):
        super().__init__()
        from cm3dmm.nn import Decoder, make_encoder

        self.cfg = cfg
        self._template = template
        mean = torch.as_tensor(np.asarray(template.mean), dtype=torch.float32)
        faces = torch.as_tensor(np.asarray(template.faces).astype(np.int64))
        uv = torch.as_tensor(np.asarray(template.uv), dtype=torch.float32)
        if mean.ndim != 2 or mean.shape[1] != 3 or uv.shape != (mean.shape[0], 2):
            raise ValueError(f"template mean (V, 3) and uv (V, 2) disagree: {tuple(mean.shape)}, "
                             f"{tuple(uv.shape)}")
        self.register_buffer("mean", mean)
        self.register_buffer("faces", faces)
        self.register_buffer("uv", uv)
        self.encoder = make_encoder(cfg.encoder, device)
        self.decoder = Decoder(cfg.decoder, code_dim=cfg.id_dim + cfg.exp_dim, uv_dim=self.encoder.out_dim)
        if cfg.interpolation not in ("linear", "smooth"):
            raise ValueError(f"interpolation must be 'linear' or 'smooth', got {cfg.interpolation!r}")
        self._smooth = None
        if cfg.interpolation == "smooth":
            from cm3dmm.nn.smooth import SmoothInterpolator

            self._smooth = SmoothInterpolator(np.asarray(template.uv), np.asarray(template.faces),
                                              smoothness=float(cfg.smoothness))
        #: (V, 3, Di + De) the linear basis (zero until training initialises it), or None
        self.basis = nn.Parameter(torch.zeros(mean.shape[0], 3, cfg.id_dim + cfg.exp_dim)) if cfg.basis else None

    # ------------------------------------------------------------------ sizes
    @property
    def id_dim(self) -> int:
        return int(self.cfg.id_dim)

    @property
    def exp_dim(self) -> int:
        return int(self.cfg.exp_dim)

    @property
    def code_dim(self) -> int:
        return self.id_dim + self.exp_dim

    @property
    def template(self):
        """The template the model was built with (mean, faces, uv, levels, ``avg``, ``hash``)."""
        return self._template

    @property
    def n_vertices(self) -> int:
        return int(self.mean.shape[0])

    # ------------------------------------------------------------------ helpers
    def _codes(self, z_id: torch.Tensor, z_exp: torch.Tensor) -> torch.Tensor:
        """(B, Di), (B, De) -> (B, Di + De), validated."""
        if z_id.ndim != 2 or z_exp.ndim != 2 or z_id.shape[0] != z_exp.shape[0]:
            raise ValueError(f"z_id (B, {self.id_dim}) and z_exp (B, {self.exp_dim}) expected, got "
                             f"{tuple(z_id.shape)} and {tuple(z_exp.shape)}")
        if z_id.shape[1] != self.id_dim or z_exp.shape[1] != self.exp_dim:
            raise ValueError(f"code sizes {z_id.shape[1]} + {z_exp.shape[1]} do not match the model's "
                             f"{self.id_dim} + {self.exp_dim}")
        return torch.cat([z_id, z_exp], dim=1)

    @property
    def smooth(self) -> bool:
        """True when per-vertex quantities are interpolated smoothly (``cfg.interpolation``)."""
        return self._smooth is not None

    def points_at(self, tri, bary, uv: torch.Tensor | None = None) -> Points:
        """:class:`Points` of template points given as triangle ids (N,) + barycentrics (N, 3)."""
        tri = np.asarray(tri.cpu() if hasattr(tri, "cpu") else tri, np.int64)
        bary = _snap_to_vertices(np.asarray(bary.detach().cpu() if hasattr(bary, "detach") else bary, np.float64))
        faces = np.asarray(self._template.faces, np.int64)
        uv_np = None if uv is None else uv.detach().reshape(-1, 2).cpu().numpy().astype(np.float64)
        if self._smooth is not None:
            corner = np.argmax(bary, axis=1)
            at_vertex = bary[np.arange(len(bary)), corner] == 1.0
            if at_vertex.all():  # vertex queries (training samples, fits): the vertex's own value
                idx, w = faces[tri, corner][:, None], np.ones((len(bary), 1))
            else:
                idx, w = self._smooth.weights(tri, bary, uv_np)
                if at_vertex.any():  # the same, exactly, for the rows at vertices
                    idx[at_vertex] = faces[tri, corner][at_vertex, None]
                    w[at_vertex] = 0.0
                    w[at_vertex, 0] = 1.0
        else:
            idx, w = faces[tri], bary
        idx, w = _prune(idx, w)
        if uv is None:
            uv = torch.as_tensor(np.einsum("pk,pkc->pc", bary, np.asarray(self._template.uv, np.float64)[faces[tri]]),
                                 dtype=self.mean.dtype, device=self.mean.device)
        dev = uv.device
        return Points(uv=uv, index=torch.as_tensor(idx, device=dev),
                      weight=torch.as_tensor(w, dtype=self.mean.dtype, device=dev))

    def points(self, uv: torch.Tensor) -> Points:
        """:class:`Points` of arbitrary UVs (N, 2), located on the template's UV chart (points
        outside the chart take the nearest chart position, the template's rule)."""
        if uv.ndim != 2 or uv.shape[1] != 2:
            raise ValueError(f"uv must have shape (N, 2), got {tuple(uv.shape)}")
        tri, bary, _ = self._template.locator.locate(uv.detach().cpu().numpy().astype(np.float64))
        return self.points_at(tri, bary, uv)

    def avg(self, uv: torch.Tensor) -> torch.Tensor:
        """Average-face positions at arbitrary UVs, through the template's point location.

        uv: (..., 2) in [0, 1]. Returns (..., 3) float32 on ``uv``'s device (mm).
        Points outside the UV chart take the nearest chart position (the template's rule).
        """
        if self._smooth is not None:
            pts = self.points(uv.reshape(-1, 2))
            return pts.gather(self.mean).to(uv.dtype).reshape(*uv.shape[:-1], 3)
        flat = uv.detach().reshape(-1, 2).cpu().numpy().astype(np.float64)
        a = np.asarray(self._template.avg(flat), dtype=np.float32)
        return torch.as_tensor(a, device=uv.device).reshape(*uv.shape[:-1], 3)

    def linear_part(self, pts: Points, codes: torch.Tensor, per_face: bool = False) -> torch.Tensor:
        """``B(uv) z`` for codes (B, Di + De) -> (B, N, 3).

        ``pts``: N points shared by all codes, or (``per_face``) B x N points, flattened face-major
        (the points of face b are rows ``b * N .. (b + 1) * N - 1``).
        """
        per_vertex = torch.einsum("vcd,bd->bvc", self.basis, codes)  # (B, V, 3)
        return pts.gather(per_vertex, per_face)

    # ------------------------------------------------------------------ the field
    def _points_for(self, uv: torch.Tensor, pts: Points | None) -> Points:
        return pts if pts is not None else self.points(uv.reshape(-1, 2))

    def deformation(self, uv: torch.Tensor, z_id: torch.Tensor, z_exp: torch.Tensor,
                    pts: Points | None = None) -> torch.Tensor:
        """The field f: displacement from the average face.

        uv: (N, 2) shared by all codes, or (B, N, 2) per code; z_id: (B, Di); z_exp: (B, De);
        pts: the points' :class:`Points` (located from ``uv`` when None; only a model with a
        linear basis needs them; for (B, N, 2) uv, flattened face-major). Returns (B, N, 3) mm.
        """
        codes = self._codes(z_id, z_exp)
        b = codes.shape[0]
        if not (uv.ndim == 2 and uv.shape[1] == 2) and not (uv.ndim == 3 and uv.shape[0] == b
                                                            and uv.shape[2] == 2):
            raise ValueError(f"uv must have shape (N, 2) or ({b}, N, 2), got {tuple(uv.shape)}")
        if self.smooth:  # the residual is anchored on the template's vertices, like avg and B
            pts = self._points_for(uv, pts)
            d = self.residual_part(pts, codes, per_face=uv.ndim == 3)
        else:
            feats = self.encoder(uv)  # (N, F) or (B, N, F)
            # the decoder broadcasts: the code block of each layer is evaluated once per code
            d = self.decoder(codes[:, None, :], feats)  # (B, N, 3)
        if self.basis is not None:
            d = d + self.linear_part(self._points_for(uv, pts), codes, per_face=uv.ndim == 3).to(d.dtype)
        return d

    def residual_part(self, pts: Points, codes: torch.Tensor, per_face: bool = False) -> torch.Tensor:
        """The decoder's output at the template vertices of ``pts``, interpolated with their weights
        (the smooth model's residual ``r``): codes (B, D) -> (B, N, 3). ``pts`` as in
        :meth:`linear_part`. Evaluates the decoder at every template vertex when the points need
        more vertex values than that (meshes), else only at the vertices they name."""
        b = codes.shape[0]
        idx, w = pts.index, pts.weight
        if per_face:
            idx = idx.reshape(b, -1, idx.shape[-1])
            w = w.reshape(b, -1, w.shape[-1])
        w = w.to(codes.dtype)
        per_face_entries = idx.shape[-2] * idx.shape[-1]
        if per_face_entries >= self.n_vertices:
            return pts.gather(self.decoder(codes[:, None, :], self.encoder(self.uv)), per_face)  # r at (B, V, 3)
        feats = self.encoder(self.uv[idx.reshape(-1)]).reshape(*idx.shape, -1)  # (..., N, W, F)
        c = codes[:, None, None, :]  # (B, 1, 1, D) against (N, W, F) or (B, N, W, F)
        r = self.decoder(c, feats)  # (B, N, W, 3)
        return (r * w[..., None]).sum(-2)

    def decode(self, uv: torch.Tensor, z_id: torch.Tensor, z_exp: torch.Tensor,
               avg: torch.Tensor | None = None, pts: Points | None = None) -> torch.Tensor:
        """Positions ``avg(uv) + deformation``.

        uv: (N, 2) or (B, N, 2); avg: matching (N, 3) or (B, N, 3), looked up through the template
        (the model's interpolation) when None; pts: see :meth:`deformation`. Returns (B, N, 3) mm.
        """
        if (self.basis is not None or (avg is None and self.smooth)) and pts is None:
            pts = self.points(uv.reshape(-1, 2))
        d = self.deformation(uv, z_id, z_exp, pts=pts)
        if avg is None:
            avg = pts.gather(self.mean).reshape(*uv.shape[:-1], 3) if self.smooth else self.avg(uv)
        if avg.shape[-2:] != d.shape[-2:]:
            raise ValueError(f"avg must have shape (..., {d.shape[1]}, 3), got {tuple(avg.shape)}")
        return d + avg.to(d.dtype)

    forward = decode

    # ------------------------------------------------------------------ fitting support
    def precompute(self, uv: torch.Tensor, avg: torch.Tensor | None = None, pts: Points | None = None) -> UVContext:
        """Encoder features, the decoder's UV contributions, avg and the linear basis at fixed
        ``uv`` (N, 2)."""
        if uv.ndim != 2 or uv.shape[1] != 2:
            raise ValueError(f"uv must have shape (N, 2), got {tuple(uv.shape)}")
        feats = self.encoder(uv)
        pre = self.decoder.precompute_uv(feats)
        if (self.basis is not None or self.smooth) and pts is None:
            pts = self.points(uv)
        if self.smooth and pts.index.shape[1] > 1:
            raise ValueError("a smooth model's fitting context must be at template vertices (its residual is "
                             "anchored there); fit at vertices and interpolate with mesh()/decode()")
        if avg is None:
            avg = pts.gather(self.mean) if self.smooth else self.avg(uv)
        lin = None
        if self.basis is not None:
            v, _, k = self.basis.shape
            lin = pts.gather(self.basis.reshape(v, 3 * k)).reshape(-1, 3, k)
        return UVContext(uv=uv, feats=feats, pre=pre, avg=avg, lin=lin)

    def decode_context(self, ctx: UVContext, z_id: torch.Tensor, z_exp: torch.Tensor) -> torch.Tensor:
        """Same as ``decode(ctx.uv, z_id, z_exp, ctx.avg)`` with the UV part reused. (B, N, 3)."""
        codes = self._codes(z_id, z_exp)
        d = self.decoder.forward_codes(codes[:, None, :], ctx.pre)
        if ctx.lin is not None:
            d = d + torch.einsum("ncd,bd->bnc", ctx.lin.to(codes.dtype), codes)
        return d + ctx.avg.to(d.dtype)

    # ------------------------------------------------------------------ meshes
    def level_points(self, level: int = 0, grid: int | None = None) -> tuple[Points, torch.Tensor, torch.Tensor]:
        """The :class:`Points` (P), average face (P, 3) and triangles (T, 3) of an upsampling
        level or a uniform UV grid of density ``grid``."""
        if grid is not None:
            from cm3dmm.upsample import uv_grid

            lvl = uv_grid(self._template, int(grid))
        else:
            levels = self._template.levels
            if not 0 <= int(level) < len(levels):
                raise ValueError(f"level must be in 0..{len(levels) - 1}, got {level}")
            lvl = levels[int(level)]
        dev = self.mean.device
        uv = torch.as_tensor(np.asarray(lvl.uv), dtype=torch.float32, device=dev)
        pts = self.points_at(np.asarray(lvl.tri), np.asarray(lvl.bary), uv)
        faces = torch.as_tensor(np.asarray(lvl.faces).astype(np.int64), device=dev)
        return pts, pts.gather(self.mean), faces

    def mesh_points(self, level: int = 0, grid: int | None = None):
        """The (uv (P, 2), avg (P, 3), faces (T, 3)) of an upsampling level or a UV grid."""
        pts, avg, faces = self.level_points(level, grid)
        return pts.uv, avg, faces

    def mesh(self, z_id: torch.Tensor, z_exp: torch.Tensor, level: int = 0,
             grid: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Meshes at upsampling ``level`` (or a uniform UV grid of density ``grid``).

        z_id: (B, Di); z_exp: (B, De). Returns vertices (B, P, 3) mm and faces (T, 3) int64,
        P the level's (grid's) point count.
        """
        pts, avg, faces = self.level_points(level, grid)
        return self.decode(pts.uv, z_id, z_exp, avg=avg, pts=pts), faces


# ---------------------------------------------------------------------------- template <-> file
def _template_state(template) -> torch.Tensor:
    """The template as the bytes of its ``template.npz`` (a uint8 tensor: loads weights-only)."""
    import tempfile

    from cm3dmm.template import save_template

    with tempfile.TemporaryDirectory(prefix="cm3dmm-tpl-") as tmp:
        path = Path(tmp) / "template.npz"
        save_template(path, template)
        data = path.read_bytes()
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _template_from_state(state: torch.Tensor):
    """Inverse of :func:`_template_state` (the template's own loader checks its hash)."""
    import tempfile

    from cm3dmm.template import load_template

    with tempfile.TemporaryDirectory(prefix="cm3dmm-tpl-") as tmp:
        path = Path(tmp) / "template.npz"
        path.write_bytes(state.numpy().tobytes())
        return load_template(path)


# ---------------------------------------------------------------------------- save / load
def _to_tensors(obj):
    """numpy arrays -> tensors (recursively), so the file loads with ``weights_only=True``."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _to_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_tensors(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def save_model(path: str | os.PathLike, model: ContinuousModel, extra: dict | None = None) -> None:
    """Write ``model`` (+ ``extra``: codes, index map, code stats, config, summary) to ONE file.

    Written atomically. Arrays in ``extra`` may be numpy or torch; they are stored as tensors.
    """
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    model_config = config_to_dict(model.cfg)
    # the encoder backend actually used (never "auto"; "tcnn" also for its pure-torch layout)
    model_config["encoder"]["backend"] = getattr(model.encoder, "backend", model_config["encoder"]["backend"])
    payload = {
        "format": FILE_FORMAT,
        "format_version": FORMAT_VERSION,
        "method": METHOD,
        "model_config": model_config,
        "state_dict": state,
        "template": _template_state(model.template),
        "template_hash": str(getattr(model.template, "hash", "")),
        "extra": _to_tensors(dict(extra or {})),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_model_file(path: str | os.PathLike, method: str = METHOD) -> dict:
    """The raw payload of a model file, validated (format, version, method); InputError otherwise."""
    path = Path(path)
    if not path.exists():
        raise InputError("model file not found", path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, io.UnsupportedOperation) as exc:
        raise InputError(f"model file is corrupt or truncated ({str(exc).splitlines()[0][:120]})",
                         path) from None
    except Exception as exc:  # pickle errors of foreign files
        raise InputError(f"not a cm3dmm model file ({type(exc).__name__})", path) from None
    if not isinstance(payload, dict) or payload.get("format") != FILE_FORMAT:
        raise InputError("not a cm3dmm model file (no 'format' entry)", path)
    if payload.get("format_version") != FORMAT_VERSION:
        raise InputError(f"model file format_version {payload.get('format_version')} is not "
                         f"{FORMAT_VERSION}; retrain or use a matching cm3dmm", path)
    if payload.get("method") != method:
        raise InputError(f"model file holds method {payload.get('method')!r}, expected {method!r}", path)
    for key in ("model_config", "state_dict", "template", "extra"):
        if key not in payload:
            raise InputError(f"model file lacks '{key}'", path)
    return payload


def _loadable_encoder(mcfg: ModelConfig, state: dict, device) -> ModelConfig:
    """The model config with an encoder backend that can hold ``state`` on ``device``.

    ``auto`` (files written before the backend was recorded) is decided by the weights: tiny-cuda-nn's
    ``encoder.enc.params`` means ``tcnn``, else ``dense``. A ``tcnn`` model where tiny-cuda-nn cannot
    run is evaluated by the same layout in pure torch (``tcnn-torch``, cm3dmm.nn.TcnnLayoutEncoder).
    """
    from dataclasses import replace

    from cm3dmm.nn.encoders import tcnn_available

    backend = mcfg.encoder.backend
    if backend == "auto":
        backend = "tcnn" if "encoder.enc.params" in state else "dense"
    if backend == "tcnn" and not tcnn_available(device):
        log.info("tcnn model without tiny-cuda-nn / CUDA here: its hash grid is evaluated in pure torch")
        backend = "tcnn-torch"
    return mcfg if backend == mcfg.encoder.backend else replace(mcfg, encoder=replace(mcfg.encoder, backend=backend))


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[ContinuousModel, dict]:
    """Rebuild a :class:`ContinuousModel` from a ``model.pt`` alone.

    Returns ``(model, extra)`` (model in eval mode on ``device``; ``extra`` as saved, arrays as
    tensors). A missing, truncated or foreign file (other method / format) is an
    :class:`~cm3dmm.errors.InputError` naming the file.
    """
    path = Path(path)
    payload = read_model_file(path)
    try:
        template = _template_from_state(payload["template"])
    except InputError as exc:
        raise InputError(f"model file's template is invalid ({exc.problem})", path) from None
    except (TypeError, AttributeError, RuntimeError) as exc:
        raise InputError(f"model file's template is invalid ({type(exc).__name__})", path) from None
    try:
        mcfg = _loadable_encoder(config_from_dict({"model": payload["model_config"]}).model,
                                 payload["state_dict"], device)
        model = ContinuousModel(template, mcfg)
        model.load_state_dict(payload["state_dict"])
    except InputError as exc:
        raise InputError(f"model file has an invalid configuration ({exc.problem})", path) from None
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise InputError(f"model file is inconsistent ({str(exc).splitlines()[0][:160]})", path) from None
    stored = payload.get("template_hash", "")
    if stored and str(getattr(template, "hash", stored)) != stored:
        raise InputError("model file's template arrays do not match its template hash", path)
    model.eval()
    return model.to(device), payload["extra"]

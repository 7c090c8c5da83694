"""Multi-resolution UV encoders: ``uv (..., 2) in [0, 1] -> features (..., out_dim)``.

Every encoder stores ``n_levels`` 2-D grids of ``n_features``-dimensional vectors; level ``l``
has ``res_l`` cells per side, i.e. ``(res_l + 1)^2`` corners, corner ``(i, j)`` sitting at
``uv = (i / res_l, j / res_l)`` (``i`` along u, ``j`` along v). A point's feature at a level is
the bilinear interpolation of its cell's four corners; the levels' features are concatenated
(level 0 first). UVs outside the unit square are clamped onto it.

Backends (``EncoderConfig.backend``, built by :func:`make_encoder`):

``dense``
    One dense grid per level, sampled with :func:`torch.nn.functional.grid_sample`
    (``align_corners=True``: the grid's corner vertices sit on the unit square's corners).
    Level resolutions follow the Instant-NGP scaling (:func:`ngp_resolutions`). Every level is
    collision-free; a level whose ``(res+1)^2`` corners exceed ``2^log2_table_size`` is **capped**
    to the largest resolution that fits (``floor(sqrt(T)) - 1``; a warning is logged), because a
    dense grid cannot hash. Consecutive levels of equal resolution share one ``grid_sample``
    call. The CPU default: measured faster than gather-based bilinear lookups
    (``benchmarks/bench_encoders.py``).
``hash``
    Instant-NGP multi-resolution hash grid in pure torch (Mueller et al. 2022): growth
    ``b = exp((ln N_max - ln N_min) / (L - 1))``, ``res_l = floor(N_min b^l)``; a level whose
    ``(res+1)^2`` corners fit ``T = 2^log2_table_size`` is indexed densely (``i + j (res+1)``,
    table of exactly ``(res+1)^2`` rows), above that by the spatial hash
    ``(i * 1 xor j * 2654435761) mod T``. Tables initialised ``U(-1e-4, 1e-4)``.
``seed-compatible``
    The release's encoder, bit for bit (SEED.md, "Known defects"), to load the release's weights
    (``cm3dmm import-release``) and for side-by-side comparison: the growth factor divides by
    ``base_resolution - 1`` instead of ``n_levels - 1`` (:func:`seed_resolutions`: 4, 12, 40, 127,
    406, ... 134217727 for base 4 / finest 128 / 16 levels), each level's table has
    ``min(res^2, T)`` rows, and **every** level is hashed, the coarse ones too: corner ``(i, j)``
    -> row ``((i * 1) & 0xffffffff  xor  (j * 2654435761) & 0xffffffff) mod min(res^2, T)``
    (tiny-cuda-nn's hash in 32-bit arithmetic). So at resolution 4 only 8 of 16 rows are used and
    every diagonal corner ``(i, i)`` lands on row 0. Grid positions are ``uv * res`` (``i`` along u),
    corners ``floor`` and ``floor + 1``, computed in the input's dtype: in float32 levels above
    ~2^24 cells per side are quantised, as the release computed them; they are hash noise anyway.
``tcnn``
    tiny-cuda-nn's ``HashGrid`` encoding (CUDA only, ``n_features`` in 1, 2, 4, 8), with the
    per-level growth of ``hash`` (tiny-cuda-nn's own grid: ``scale_l = base * b^l - 1``,
    ``ceil(scale_l) + 1`` vertices per side, positions ``scale_l * uv + 0.5``). ``auto`` picks
    ``tcnn`` where it can run, else ``dense``; a model file records the backend actually used.
    Where tiny-cuda-nn cannot run, a ``tcnn`` model's weights load into :class:`TcnnLayoutEncoder`
    (``make_encoder`` backend ``tcnn-torch``, used by ``cm3dmm.model.load_model``): the same
    layout and arithmetic in pure torch.
"""

from __future__ import annotations

import functools
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from cm3dmm.config import EncoderConfig
from cm3dmm.errors import InputError

log = logging.getLogger(__name__)

#: primes of the spatial hash (Teschner et al. 2003, as in Instant-NGP), per dimension
HASH_PRIMES = (1, 2654435761)
#: the hash is computed in 32-bit unsigned arithmetic (tiny-cuda-nn, the release)
HASH_MASK = 0xFFFFFFFF
#: initial table values are drawn from U(-INIT_RANGE, INIT_RANGE)
INIT_RANGE = 1e-4
TCNN_HINT = (
    "install tiny-cuda-nn's torch bindings yourself (on a CUDA machine: pip install "
    "git+https://github.com/NVlabs/tiny-cuda-nn/#subdirectory=bindings/torch), "
    "or use model.encoder.backend: dense (or auto)"
)


# --------------------------------------------------------------------------- level scaling
def _floor_tol(x: float) -> int:
    """``floor(x)``, but values within 1e-9 (relative) below an integer count as that integer."""
    r = round(x)
    return int(r) if abs(x - r) <= 1e-9 * max(1.0, abs(x)) else int(math.floor(x))


def ngp_resolutions(n_levels: int, base_resolution: int, finest_resolution: int) -> list[int]:
    """Instant-NGP level resolutions ``floor(N_min b^l)``, ``b = (N_max / N_min)^(1 / (L - 1))``.

    Runs geometrically from ``base_resolution`` to ``finest_resolution`` (both included);
    e.g. 16 levels from 4 to 128: 4, 5, 6, 8, 10, 12, 16, 20, 25, 32, 40, 50, 64, 80, 101, 128.
    """
    _check_levels(n_levels, base_resolution, finest_resolution)
    if n_levels == 1:
        return [base_resolution]
    ln_b = (math.log(finest_resolution) - math.log(base_resolution)) / (n_levels - 1)
    return [_floor_tol(base_resolution * math.exp(ln_b * l)) for l in range(n_levels)]


def seed_resolutions(n_levels: int, base_resolution: int, finest_resolution: int) -> list[int]:
    """The release's level resolutions (defect reproduced on purpose, see SEED.md).

    ``b = exp((ln N_max - ln N_min) / (N_min - 1))`` and ``res_l = floor(N_min * b**l)``
    evaluated in float64 exactly as written (so 4 * 32 lands on 127): for base 4 / finest 128 /
    16 levels 4, 12, 40, 127, 406, 1290, ..., 134217727.
    """
    _check_levels(n_levels, base_resolution, finest_resolution)
    if base_resolution < 2:
        raise ValueError("seed_resolutions: the release's formula needs base_resolution >= 2")
    b = math.exp((math.log(finest_resolution) - math.log(base_resolution)) / (base_resolution - 1))
    return [int(math.floor(base_resolution * b**l)) for l in range(n_levels)]


def _check_levels(n_levels: int, base: int, finest: int) -> None:
    if n_levels < 1 or base < 1 or finest < base:
        raise ValueError(
            f"need n_levels >= 1 and 1 <= base_resolution <= finest_resolution, got "
            f"{n_levels}, {base}, {finest}"
        )


# --------------------------------------------------------------------------- interface
class UVEncoder(nn.Module):
    """Common interface: ``forward(uv (..., 2) in [0, 1]) -> (..., out_dim)``.

    Attributes: ``n_levels``, ``n_features`` (per level), ``out_dim = n_levels * n_features``,
    ``level_resolutions`` (cells per side, per level) and ``table_sizes`` (stored rows per level).
    """

    n_levels: int
    n_features: int
    out_dim: int
    level_resolutions: list[int]
    table_sizes: list[int]
    #: the backend this encoder implements (what a model file records; never ``auto``)
    backend: str

    def level_table(self, level: int) -> Tensor:
        """The stored vectors of ``level`` as a ``(table_sizes[level], n_features)`` view."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its tables")

    def extra_repr(self) -> str:
        return (f"levels={self.level_resolutions}, features={self.n_features}, "
                f"out_dim={self.out_dim}, params={sum(self.table_sizes) * self.n_features}")


def _check_uv(uv: Tensor) -> None:
    if not isinstance(uv, Tensor) or uv.ndim < 1 or uv.shape[-1] != 2:
        raise ValueError(f"uv must be a tensor of shape (..., 2), got {getattr(uv, 'shape', type(uv))}")
    if not uv.is_floating_point():
        raise ValueError(f"uv must be floating point, got {uv.dtype}")


# --------------------------------------------------------------------------- dense
class DenseGridEncoder(UVEncoder):
    """Dense multi-resolution grids sampled with ``grid_sample`` (bilinear, align_corners)."""

    backend = "dense"

    def __init__(self, n_levels: int, n_features: int, base_resolution: int, finest_resolution: int,
                 log2_table_size: int):
        super().__init__()
        res = ngp_resolutions(n_levels, base_resolution, finest_resolution)
        cap = math.isqrt(2**log2_table_size) - 1
        if cap < 1:
            raise ValueError(f"log2_table_size={log2_table_size} is too small for any grid")
        if max(res) > cap:
            log.warning("dense encoder: levels above %d cells per side do not fit 2^%d entries; "
                        "capped to %d (raise log2_table_size for finer levels)",
                        cap, log2_table_size, cap)
            res = [min(r, cap) for r in res]
        self.n_levels, self.n_features = n_levels, n_features
        self.out_dim = n_levels * n_features
        self.level_resolutions = res
        self.table_sizes = [(r + 1) ** 2 for r in res]
        # consecutive levels of equal resolution share one grid (channels stacked)
        self._groups: list[tuple[int, int]] = []  # (first level, count)
        for l, r in enumerate(res):
            if self._groups and res[self._groups[-1][0]] == r:
                self._groups[-1] = (self._groups[-1][0], self._groups[-1][1] + 1)
            else:
                self._groups.append((l, 1))
        self.grids = nn.ParameterList(
            nn.Parameter(torch.empty(1, k * n_features, res[l] + 1, res[l] + 1).uniform_(-INIT_RANGE, INIT_RANGE))
            for l, k in self._groups
        )

    def level_table(self, level: int) -> Tensor:
        for (first, k), grid in zip(self._groups, self.grids):
            if first <= level < first + k:
                c0 = (level - first) * self.n_features
                g = grid[0, c0:c0 + self.n_features]  # (F, res+1 [v], res+1 [u])
                return g.permute(1, 2, 0).reshape(-1, self.n_features)  # row j (res+1) + i
        raise IndexError(f"level {level} out of range 0..{self.n_levels - 1}")

    def forward(self, uv: Tensor) -> Tensor:
        """uv: (..., 2) in [0, 1] -> (..., n_levels * n_features)."""
        _check_uv(uv)
        lead = uv.shape[:-1]
        g = (uv.reshape(1, 1, -1, 2) * 2 - 1).to(self.grids[0].dtype)
        outs = [F.grid_sample(grid, g, mode="bilinear", padding_mode="border", align_corners=True)[0, :, 0]
                for grid in self.grids]  # each (k F, P)
        out = outs[0] if len(outs) == 1 else torch.cat(outs, 0)
        return out.t().reshape(*lead, self.out_dim)


# --------------------------------------------------------------------------- gather-based grids
class _GatherLerp(torch.autograd.Function):
    """``out[p, l] = sum_k w[p, l, k] table[idx[p, l, k]]`` with an ``index_add_`` backward.

    table: (R, F); idx: (P, L, 4) long; w: (P, L, 4) -> (P, L, F). About 1.4x faster on CPU than
    autograd through advanced indexing (whose backward sorts the indices).
    """

    @staticmethod
    def forward(ctx, table: Tensor, idx: Tensor, w: Tensor) -> Tensor:
        v = table.index_select(0, idx.reshape(-1)).view(*idx.shape, table.shape[1])
        ctx.save_for_backward(table, idx, w)
        return torch.einsum("plkf,plk->plf", v, w)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        table, idx, w = ctx.saved_tensors
        g_table = g_w = None
        if ctx.needs_input_grad[0]:
            gv = (g.unsqueeze(2) * w.unsqueeze(-1)).reshape(-1, g.shape[-1])
            g_table = torch.zeros_like(table).index_add_(0, idx.reshape(-1), gv)
        if ctx.needs_input_grad[2]:
            v = table.index_select(0, idx.reshape(-1)).view(*idx.shape, table.shape[1])
            g_w = torch.einsum("plf,plkf->plk", g, v)
        return g_table, None, g_w


#: corner offsets (di, dj) in the order of the bilinear weights below
_CORNERS = ((0, 0), (1, 0), (0, 1), (1, 1))


def bilinear_cells(uv: Tensor, resolutions: Tensor) -> tuple[Tensor, Tensor]:
    """Cell and bilinear weights of each point at each level.

    uv: (P, 2) (clamped to [0, 1]); resolutions: (L,) cells per side ->
    ``ij`` (P, L, 2) int64 lower-left corner in ``0 .. res - 1`` and ``w`` (P, L, 4) weights of the
    corners ``(i, j), (i+1, j), (i, j+1), (i+1, j+1)`` (differentiable w.r.t. ``uv``).
    """
    res = resolutions.to(uv.dtype)
    pos = uv.clamp(0, 1).unsqueeze(1) * res[None, :, None]  # (P, L, 2)
    cell = torch.minimum(pos.detach().floor(), (res - 1)[None, :, None])
    t = pos - cell
    tx, ty = t[..., 0], t[..., 1]
    sx, sy = 1 - tx, 1 - ty
    w = torch.stack((sx * sy, tx * sy, sx * ty, tx * ty), -1)
    return cell.long(), w


class GridTableEncoder(UVEncoder):
    """Multi-resolution grids stored in one flat table, looked up by gather (``hash``, ``seed-compatible``).

    Each level is indexed in one of two modes: ``dense`` (row ``i + j (res+1)``) or ``hash``
    (row ``((i * 1) & 0xffffffff xor (j * 2654435761) & 0xffffffff) mod size``, the 32-bit
    arithmetic of tiny-cuda-nn; the same as without the masks when ``size`` is a power of two).
    """

    def __init__(self, resolutions: list[int], modes: list[str], sizes: list[int], n_features: int,
                 backend: str = "hash"):
        super().__init__()
        self.backend = backend
        if not (len(resolutions) == len(modes) == len(sizes)) or not resolutions:
            raise ValueError("resolutions, modes and sizes must be non-empty lists of equal length")
        for r, m, s in zip(resolutions, modes, sizes):
            if m not in ("dense", "hash") or r < 1 or s < 1:
                raise ValueError(f"bad level (res={r}, mode={m!r}, size={s})")
            if m == "dense" and s != (r + 1) ** 2:
                raise ValueError(f"level (res={r}, mode='dense') must have {(r + 1) ** 2} rows")
        self.n_levels, self.n_features = len(resolutions), n_features
        self.out_dim = self.n_levels * n_features
        self.level_resolutions = list(resolutions)
        self.table_sizes = list(sizes)
        self.level_modes = list(modes)
        offsets = [0]
        for s in sizes[:-1]:
            offsets.append(offsets[-1] + s)
        self.table = nn.Parameter(torch.empty(sum(sizes), n_features).uniform_(-INIT_RANGE, INIT_RANGE))
        as_long = functools.partial(torch.tensor, dtype=torch.long)
        self.register_buffer("_res", as_long(resolutions), persistent=False)
        self.register_buffer("_offset", as_long(offsets), persistent=False)
        self.register_buffer("_stride", as_long([r + 1 for r in resolutions]), persistent=False)
        self.register_buffer("_size", as_long(sizes), persistent=False)
        self.register_buffer("_hashed", torch.tensor([m == "hash" for m in modes]), persistent=False)
        self._any_hashed = "hash" in modes  # a Python flag: no device sync per forward

    def level_table(self, level: int) -> Tensor:
        o = sum(self.table_sizes[:level])
        return self.table[o:o + self.table_sizes[level]]

    def corner_rows(self, ij: Tensor) -> Tensor:
        """ij: (P, L, 2) int64 corner coordinates -> (P, L) flat table rows."""
        i, j = ij[..., 0], ij[..., 1]
        row = i + j * self._stride
        if self._any_hashed:
            h = torch.remainder(torch.bitwise_xor((i * HASH_PRIMES[0]) & HASH_MASK, (j * HASH_PRIMES[1]) & HASH_MASK),
                                self._size)
            row = torch.where(self._hashed, h, row)
        return row + self._offset

    def forward(self, uv: Tensor) -> Tensor:
        """uv: (..., 2) in [0, 1] -> (..., n_levels * n_features)."""
        _check_uv(uv)
        lead = uv.shape[:-1]
        cell, w = bilinear_cells(uv.reshape(-1, 2).to(self.table.dtype), self._res)
        idx = torch.stack([self.corner_rows(cell + cell.new_tensor(d)) for d in _CORNERS], -1)
        out = _GatherLerp.apply(self.table, idx, w)  # (P, L, F)
        return out.reshape(*lead, self.out_dim)


def hash_grid_encoder(n_levels: int, n_features: int, base_resolution: int, finest_resolution: int,
                      log2_table_size: int) -> GridTableEncoder:
    """The ``hash`` backend: Instant-NGP scaling, dense where ``(res+1)^2 <= 2^log2_table_size``."""
    t = 2**log2_table_size
    res = ngp_resolutions(n_levels, base_resolution, finest_resolution)
    modes = ["dense" if (r + 1) ** 2 <= t else "hash" for r in res]
    sizes = [(r + 1) ** 2 if m == "dense" else t for r, m in zip(res, modes)]
    return GridTableEncoder(res, modes, sizes, n_features)


def seed_compatible_encoder(n_levels: int, n_features: int, base_resolution: int, finest_resolution: int,
                            log2_table_size: int) -> GridTableEncoder:
    """The ``seed-compatible`` backend: the release's encoder (level scaling, ``min(res^2, T)`` tables,
    every level hashed; defects kept, see the module docstring)."""
    t = 2**log2_table_size
    res = seed_resolutions(n_levels, base_resolution, finest_resolution)
    modes = ["hash"] * len(res)
    sizes = [min(r * r, t) for r in res]
    log.info("seed-compatible encoder: the release's level scaling %s, every level hashed (its "
             "defects kept; 'hash' or 'dense' are correct)", res)
    return GridTableEncoder(res, modes, sizes, n_features, backend="seed-compatible")


# --------------------------------------------------------------------------- tiny-cuda-nn
@functools.lru_cache(maxsize=None)
def _import_tcnn():
    """The one import guard for tiny-cuda-nn: the module, or None where it cannot be imported."""
    try:
        import tinycudann  # noqa: PLC0415  (optional CUDA dependency)
    except Exception as exc:  # ImportError, or OSError/RuntimeError from a broken CUDA setup
        log.debug("tinycudann unavailable: %s", exc)
        return None
    return tinycudann


def tcnn_available(device: torch.device | str | None = None) -> bool:
    """True where the ``tcnn`` backend can run: CUDA present (and ``device`` is CUDA) and importable."""
    if device is not None and torch.device(device).type != "cuda":
        return False
    return torch.cuda.is_available() and _import_tcnn() is not None


class TcnnEncoder(UVEncoder):
    """tiny-cuda-nn ``HashGrid`` encoding (CUDA only). Output cast to float32.

    Its weights (``enc.params``) load into :class:`TcnnLayoutEncoder` where CUDA is absent.
    """

    backend = "tcnn"

    def __init__(self, n_levels: int, n_features: int, base_resolution: int, finest_resolution: int,
                 log2_table_size: int, device: torch.device | str = "cuda"):
        super().__init__()
        tcnn = _import_tcnn()
        if tcnn is None or not torch.cuda.is_available() or torch.device(device).type != "cuda":
            why = ("tiny-cuda-nn is not installed" if tcnn is None else
                   "it runs on CUDA only" if not torch.cuda.is_available() or torch.device(device).type != "cuda"
                   else "")
            raise InputError(f"model.encoder.backend: 'tcnn' cannot run here ({why}): {TCNN_HINT}")
        if n_features not in (1, 2, 4, 8):
            raise InputError(f"model.encoder.n_features: tiny-cuda-nn supports 1, 2, 4 or 8 features "
                             f"per level, got {n_features}; use backend 'hash' or 'dense'")
        scale = tcnn_per_level_scale(n_levels, base_resolution, finest_resolution)
        self.n_levels, self.n_features = n_levels, n_features
        self.out_dim = n_levels * n_features
        _, self.level_resolutions, self.table_sizes = tcnn_levels(n_levels, base_resolution, scale,
                                                                  log2_table_size)
        with torch.cuda.device(torch.device(device)):
            self.enc = tcnn.Encoding(2, {
                "otype": "HashGrid", "n_levels": n_levels, "n_features_per_level": n_features,
                "log2_hashmap_size": log2_table_size, "base_resolution": base_resolution,
                "per_level_scale": scale,
            })

    def forward(self, uv: Tensor) -> Tensor:
        _check_uv(uv)
        lead = uv.shape[:-1]
        out = self.enc(uv.reshape(-1, 2).clamp(0, 1))
        return out.float().reshape(*lead, self.out_dim)


# --------------------------------------------------------------------------- tiny-cuda-nn's layout in torch
def tcnn_per_level_scale(n_levels: int, base_resolution: int, finest_resolution: int) -> float:
    """The ``per_level_scale`` :class:`TcnnEncoder` passes to tiny-cuda-nn (growth over L - 1 steps)."""
    if n_levels == 1:
        return 1.0
    return math.exp((math.log(finest_resolution) - math.log(base_resolution)) / (n_levels - 1))


def tcnn_levels(n_levels: int, base_resolution: int, per_level_scale: float,
                log2_table_size: int) -> tuple[list[float], list[int], list[int]]:
    """tiny-cuda-nn's ``HashGrid`` level layout (2-D input), recomputed on the host.

    Per level ``l``: ``scale = exp2f(l * log2f(per_level_scale)) * base - 1`` (float32), the grid has
    ``resolution = ceil(scale) + 1`` vertices per side and ``min(next_multiple(resolution^2, 8), T)``
    table rows (``T = 2^log2_table_size``). Returns ``(scales, resolutions, sizes)``.
    """
    f32 = np.float32
    log2s = f32(np.log2(f32(per_level_scale)))
    t = 2**int(log2_table_size)
    scales, resolutions, sizes = [], [], []
    for level in range(n_levels):
        scale = f32(f32(np.exp2(f32(level) * log2s)) * f32(base_resolution)) - f32(1.0)
        res = int(math.ceil(float(scale))) + 1
        params = min(res * res, 2**31 - 1)
        params = -(-params // 8) * 8
        scales.append(float(scale))
        resolutions.append(res)
        sizes.append(min(params, t))
    return scales, resolutions, sizes


class TcnnLayoutEncoder(UVEncoder):
    """tiny-cuda-nn's ``HashGrid`` (linear interpolation, 2-D) evaluated in pure torch, on any device.

    It reads a ``tcnn`` model's weights where tiny-cuda-nn cannot run (no CUDA, or not installed):
    the parameter is the same flat vector ``enc.params`` (state-dict key ``encoder.enc.params``) of
    ``sum(sizes) * n_features`` values, level ``l`` occupying rows ``offset_l .. offset_l + size_l``
    with a row's ``n_features`` values contiguous (tiny-cuda-nn's layout). Level ``l`` (see
    :func:`tcnn_levels`): position ``p = scale_l * uv + 0.5``, corner ``floor(p)`` and ``+1``, weight
    ``frac(p)``; corner ``(i, j)`` -> row ``i + j * resolution_l`` when ``resolution_l^2 <= size_l``,
    else the 32-bit hash ``(i xor j * 2654435761) mod size_l``. ``level_resolutions`` are the grids'
    vertices per side. A stored vector of another length (another tiny-cuda-nn layout) is refused in
    one line (:class:`InputError`).
    """

    backend = "tcnn"

    def __init__(self, n_levels: int, n_features: int, base_resolution: int, finest_resolution: int,
                 log2_table_size: int):
        super().__init__()
        scales, res, sizes = tcnn_levels(n_levels, base_resolution,
                                         tcnn_per_level_scale(n_levels, base_resolution, finest_resolution),
                                         log2_table_size)
        self.n_levels, self.n_features = n_levels, n_features
        self.out_dim = n_levels * n_features
        self.level_resolutions = res
        self.table_sizes = sizes
        self.enc = nn.Module()
        self.enc.params = nn.Parameter(torch.empty(sum(sizes) * n_features).uniform_(-INIT_RANGE, INIT_RANGE))
        offsets = [0]
        for size in sizes[:-1]:
            offsets.append(offsets[-1] + size)
        as_long = functools.partial(torch.tensor, dtype=torch.long)
        self.register_buffer("_scale", torch.tensor(scales, dtype=torch.float64), persistent=False)
        self.register_buffer("_stride", as_long(res), persistent=False)
        self.register_buffer("_size", as_long(sizes), persistent=False)
        self.register_buffer("_offset", as_long(offsets), persistent=False)
        self.register_buffer("_hashed", torch.tensor([r * r > size for r, size in zip(res, sizes)]),
                             persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "enc.params"
        if key in state_dict:
            got, want = state_dict[key], self.enc.params
            if got.ndim != 1 or got.numel() != want.numel():
                raise InputError(
                    f"the tcnn encoder's weights ({key}) hold {got.numel()} values, but tiny-cuda-nn's "
                    f"HashGrid layout for levels {self.level_resolutions} needs {want.numel()}: this tiny-cuda-nn "
                    f"layout does not map onto the pure-torch one; evaluate the model on a CUDA machine "
                    f"with the tiny-cuda-nn it was trained with")
            state_dict = dict(state_dict)
            state_dict[key] = got.to(want.dtype)  # tiny-cuda-nn may keep half-precision parameters
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def level_table(self, level: int) -> Tensor:
        o = sum(self.table_sizes[:level])
        return self.enc.params.view(-1, self.n_features)[o:o + self.table_sizes[level]]

    def forward(self, uv: Tensor) -> Tensor:
        """uv: (..., 2) in [0, 1] (clamped) -> (..., n_levels * n_features)."""
        _check_uv(uv)
        lead = uv.shape[:-1]
        table = self.enc.params.view(-1, self.n_features)
        x = uv.reshape(-1, 2).clamp(0, 1)
        # fmaf(scale, x, 0.5) in float32: exact product and sum in float64, one rounding
        pos = (x.to(torch.float64).unsqueeze(1) * self._scale[None, :, None] + 0.5).to(table.dtype)
        cell = pos.detach().floor()
        t = pos - cell
        tx, ty = t[..., 0], t[..., 1]
        w = torch.stack(((1 - tx) * (1 - ty), tx * (1 - ty), (1 - tx) * ty, tx * ty), -1)
        cell = cell.long()
        rows = []
        for di, dj in _CORNERS:
            i, j = cell[..., 0] + di, cell[..., 1] + dj
            dense = i + j * self._stride
            h = torch.bitwise_xor(i & HASH_MASK, (j * HASH_PRIMES[1]) & HASH_MASK)
            rows.append(torch.remainder(torch.where(self._hashed, h, dense), self._size) + self._offset)
        out = _GatherLerp.apply(table, torch.stack(rows, -1), w)  # (P, L, F)
        return out.reshape(*lead, self.out_dim)


# --------------------------------------------------------------------------- factory
def make_encoder(cfg: EncoderConfig, device: torch.device | str | None = None) -> UVEncoder:
    """Build the encoder ``cfg.backend`` names (see the module docstring).

    ``device`` matters only for ``tcnn`` / ``auto``: ``auto`` picks ``tcnn`` when tiny-cuda-nn is
    importable and ``device`` is CUDA (or, with ``device=None``, CUDA is available), else
    ``dense``. ``tcnn`` where it cannot run is an :class:`InputError` with an install hint.
    Other encoders are created on the CPU; move them with ``.to(device)``.
    """
    args = (cfg.n_levels, cfg.n_features, cfg.base_resolution, cfg.finest_resolution, cfg.log2_table_size)
    if min(args) < 1:
        raise InputError(f"model.encoder: n_levels, n_features, resolutions and log2_table_size must be "
                         f"positive, got {args}")
    if cfg.finest_resolution < cfg.base_resolution:
        raise InputError(f"model.encoder.finest_resolution ({cfg.finest_resolution}) is below "
                         f"base_resolution ({cfg.base_resolution})")
    backend = cfg.backend
    if backend == "auto":
        backend = "tcnn" if tcnn_available(device) and cfg.n_features in (1, 2, 4, 8) else "dense"
        log.info("encoder backend auto -> %s", backend)
    if backend == "dense":
        return DenseGridEncoder(*args)
    if backend == "hash":
        return hash_grid_encoder(*args)
    if backend == "seed-compatible":
        return seed_compatible_encoder(*args)
    if backend == "tcnn":
        return TcnnEncoder(*args, device="cuda" if device is None else device)
    if backend == "tcnn-torch":  # internal: a tcnn model's weights evaluated without tiny-cuda-nn
        return TcnnLayoutEncoder(*args)
    raise InputError(f"model.encoder.backend: {cfg.backend!r} is not one of "
                     f"['dense', 'hash', 'seed-compatible', 'tcnn', 'auto']")

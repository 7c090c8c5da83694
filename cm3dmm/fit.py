"""Fitting: fresh latent codes (and rigid poses) for registered meshes and raw scans.

The fitter owns its codes; models are used only through :class:`cm3dmm.methods.FaceModel`, so
``cm3dmm``, ``pca`` and ``bilinear`` fit through the same code and the same objective:

    E = sum_b (1 / W_b) sum_k w_bk |r_bk|^2
        + prior_weight * ( sum_id |(z_id - mu_id) / s_id|^2 + sum_b |(z_exp,b - mu_exp) / s_exp|^2 )

with ``r_bk`` the residual of target point ``k`` of face ``b`` (point-to-point, or
point-to-plane when the target has normals) and ``W_b = sum_k w_bk``, i.e. a mean squared
distance (mm^2) per face plus a Gaussian code prior from the training codes' statistics.

Layout: ``per-subject`` — one identity code shared by all of a subject's expressions plus one
expression code per expression; ``per-face`` — independent codes per face (always so for
``pca``, whose single code has no identity block).

Optimisers (``cfg.fit.optimizer``):

* ``lm`` — Levenberg-Marquardt in latent space (Nielsen's adaptive damping, Marquardt scaling),
  with the code-independent part of the model (UV features, the UV part of every decoder layer,
  the decoder's normalised weights) computed once (:meth:`FaceModel.context`); in stages on
  random subsets of the target points (:func:`lm_stages`: ``coarse_points`` for at most
  ``coarse_iters`` iterations, then ``points``; ``max_iter`` iterations in all, the damping
  carried over), then ``polish_iters`` iterations on all of them. The normal equations are
  solved by their block structure (:func:`solve_lm_structured`: batched per-face systems, or a
  Schur complement on the shared identity), and a rejected step costs one forward pass (the
  normal equations are kept). ``pca`` is solved exactly in one step (regularised normal
  equations), ``bilinear`` by alternating least squares (each block is linear given the other).
* ``lbfgs`` — L-BFGS (strong Wolfe line search) on the same objective, same precomputation.
* ``adam`` — the release protocol: zero-initialised codes, Adam lr 3e-3, 1,000 iterations, mean
  vertex distance, a full forward pass (encoder included) every step.

Scans (any vertex count, no correspondence): units resolved (``mm | cm | m | auto``), a rigid
(+ optional scale) pose from landmarks (Umeyama) or a robust initialisation refined by trimmed
ICP against the mean face, then ``scan_iters`` alternations of (correspondences -> codes -> pose):
scan->model closest points on the current fit (trimmed by ``cfg.fit.trim``, boundary
projections dropped) plus model->scan closest points where the scan covers the model.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cm3dmm import scancheck
from cm3dmm.errors import InputError, StageError
from cm3dmm.geometry import vertex_normals
from cm3dmm.methods import FaceModel
from cm3dmm.rigid import Similarity, align_to_reference, trimmed_icp, umeyama

log = logging.getLogger(__name__)

#: the release's fitting protocol (SEED.md "Fitting")
RELEASE_LR = 3e-3
RELEASE_ITERS = 1000
#: unit name -> factor to millimetres
UNIT_FACTORS = {"mm": 1.0, "cm": 10.0, "m": 1000.0}
#: mm: the "distance" loss is sqrt(|r|^2 + ROBUST_DELTA^2) - ROBUST_DELTA per point (smooth |r|)
ROBUST_DELTA = 0.05
#: normal equations of registered targets: J^T W J formed in float64 (else in the Jacobian's float32,
#: converted to float64 for the solve)
NE_DOUBLE = False
#: alternating-least-squares sweeps that start the bilinear fit under the distance loss: the
#: Levenberg-Marquardt that follows converges from there (on an ICT subject, 2 sweeps end at the
#: same error as 30 in a seventh of the time)
ALS_WARM_START = 3
#: values of Jacobian held at once (faces are processed in chunks below this)
JACOBIAN_BUDGET = 30_000_000
#: scans: weight of the point-to-point residual added to the point-to-plane one
P2P_WEIGHT = 0.1
#: scans: total weight of the landmark pairs (each direction of the closest points weighs 1)
LANDMARK_WEIGHT = 10.0
#: scans: points and exact trimmed-ICP iterations of the rigid initialisation's last refinement
RIGID_POINTS = 2000
RIGID_REFINE_ITERS = 15
#: scans: prior weight of the first alternation (annealed geometrically to fit.prior_weight)
SCAN_PRIOR_START = 1e-2
#: scans: Levenberg-Marquardt iterations per alternation at least
SCAN_INNER_MIN = 3
#: scans: a new random subset of fit.scan_points scan points every alternation
SCAN_RESAMPLE = True
#: scans: model->scan pairs whose offset is mostly tangential to the scan (the closest scan point
#: lies on the scan's border: the model vertex is where the scan has no data) are dropped when the
#: tangential part exceeds this many times the scan's point spacing (0 = keep them)
BORDER_SPACINGS = 2.0
#: scans: pairs whose model and scan normals disagree by more than this (cosine of the angle,
#: unoriented) are dropped (0 = keep them)
NORMAL_AGREEMENT = 0.5


# ============================================================================ targets
@dataclass
class Targets:
    """Target points of B faces in the model frame, padded to K points per face.

    Each point k of face b is compared with the model point ``sum_j bary[b,k,j] X[b, vids[b,k,j]]``.
    """

    points: torch.Tensor  #: (B, K, 3) mm
    vids: torch.Tensor  #: (B, K, 3) int64 template vertex ids
    bary: torch.Tensor  #: (B, K, 3) barycentric weights (rows sum to 1)
    weights: torch.Tensor  #: (B, K) >= 0; 0 marks padding
    normals: torch.Tensor | None = None  #: (B, K, 3) unit normals -> point-to-plane residuals
    p2p: float = 0.0  #: with normals: weight of an added point-to-point residual (tangential anchor)

    @property
    def n_faces(self) -> int:
        return int(self.points.shape[0])

    @classmethod
    def vertices(cls, targets: np.ndarray | torch.Tensor, weights=None) -> "Targets":
        """Registered targets: (B, V, 3) positions of the template vertices."""
        t = torch.as_tensor(np.asarray(targets), dtype=torch.float64)
        b, v, _ = t.shape
        vids = torch.arange(v).view(1, v, 1).expand(b, v, 3).clone()
        bary = torch.zeros(b, v, 3, dtype=torch.float64)
        bary[..., 0] = 1.0
        w = torch.ones(b, v, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        return cls(t, vids, bary, w)

    @classmethod
    def stack(cls, parts: Sequence["Targets"]) -> "Targets":
        """Concatenate single-face targets (B_i = 1) along the face axis, padding K."""
        k = max(int(p.points.shape[1]) for p in parts)
        has_n = any(p.normals is not None for p in parts)

        def pad(x, fill=0.0):
            extra = k - x.shape[1]
            if extra == 0:
                return x
            shape = list(x.shape)
            shape[1] = extra
            return torch.cat([x, torch.full(shape, fill, dtype=x.dtype)], 1)

        normals = None
        if has_n:
            normals = torch.cat([pad(p.normals if p.normals is not None else torch.zeros_like(p.points))
                                 for p in parts])
        return cls(torch.cat([pad(p.points) for p in parts]), torch.cat([pad(p.vids, 0) for p in parts]),
                   torch.cat([pad(p.bary) for p in parts]), torch.cat([pad(p.weights) for p in parts]), normals,
                   max(p.p2p for p in parts))

    def subset(self, n: int, rng: np.random.Generator) -> "Targets":
        """At most ``n`` random points per face (the same indices for every face)."""
        k = int(self.points.shape[1])
        if n <= 0 or n >= k:
            return self
        idx = torch.as_tensor(np.sort(rng.choice(k, n, replace=False)))
        return Targets(self.points[:, idx], self.vids[:, idx], self.bary[:, idx], self.weights[:, idx],
                       None if self.normals is None else self.normals[:, idx], self.p2p)


def _predict(x: torch.Tensor, t: Targets, local: torch.Tensor) -> torch.Tensor:
    """x: (B, U, 3) model positions at the context vertices; local: (B, K, 3) indices into U.
    Returns (B, K, 3) predicted target points."""
    b = torch.arange(x.shape[0]).view(-1, 1, 1)
    return (x[b, local] * t.bary.to(x.dtype)[..., None]).sum(2)


def _take(t: Targets, idx: torch.Tensor) -> Targets:
    """The targets of faces ``idx`` only."""
    return Targets(t.points[idx], t.vids[idx], t.bary[idx], t.weights[idx],
                   None if t.normals is None else t.normals[idx], t.p2p)


def _residuals(pred: torch.Tensor, t: Targets) -> torch.Tensor:
    """(B, K, 3) point-to-point, or (B, K, 4) point-to-plane + ``p2p`` x point-to-point residuals."""
    d = pred - t.points.to(pred.dtype)
    if t.normals is None:
        return d
    return torch.cat([(d * t.normals.to(pred.dtype)).sum(-1, keepdim=True), t.p2p * d], -1)


# ============================================================================ code layout
@dataclass
class Codes:
    """Fitted codes: ``z_id`` has one row per identity (1 when shared, else B)."""

    z_id: torch.Tensor  #: (I, Di)
    z_exp: torch.Tensor  #: (B, De)
    shared: bool
    #: optional rigid motion of each face's targets (scans): p -> R (p - c) + c + t
    rot: torch.Tensor | None = None  #: (B, 3, 3)
    trans: torch.Tensor | None = None  #: (B, 3)

    def per_face(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, Di), (B, De)."""
        b = self.z_exp.shape[0]
        zi = self.z_id.expand(b, -1) if self.shared else self.z_id
        return zi, self.z_exp

    def clone(self) -> "Codes":
        return Codes(self.z_id.clone(), self.z_exp.clone(), self.shared,
                     None if self.rot is None else self.rot.clone(),
                     None if self.trans is None else self.trans.clone())

    @property
    def n_pose(self) -> int:
        return 0 if self.rot is None else 6

    def with_pose(self) -> "Codes":
        b = self.z_exp.shape[0]
        return Codes(self.z_id, self.z_exp, self.shared,
                     torch.eye(3, dtype=torch.float64).repeat(b, 1, 1), torch.zeros(b, 3, dtype=torch.float64))


def _rodrigues(w: torch.Tensor) -> torch.Tensor:
    """Rotation matrix of an axis-angle vector w (3,)."""
    th = float(torch.linalg.vector_norm(w))
    k = torch.zeros(3, 3, dtype=w.dtype)
    if th < 1e-12:
        return torch.eye(3, dtype=w.dtype)
    a = w / th
    k[0, 1], k[0, 2], k[1, 2] = -a[2], a[1], -a[0]
    k = k - k.T
    return torch.eye(3, dtype=w.dtype) + math.sin(th) * k + (1 - math.cos(th)) * (k @ k)


def _skew(a: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) with skew(a) @ w = a x w."""
    z = torch.zeros_like(a[..., 0])
    return torch.stack([torch.stack([z, -a[..., 2], a[..., 1]], -1),
                        torch.stack([a[..., 2], z, -a[..., 0]], -1),
                        torch.stack([-a[..., 1], a[..., 0], z], -1)], -2)


@dataclass
class SolveInfo:
    status: str = "converged"  #: converged | max_iter | stalled
    iterations: int = 0
    evaluations: int = 0
    jacobians: int = 0
    objective: float = float("nan")
    history: list[float] = field(default_factory=list)
    #: Levenberg-Marquardt: the final damping per group (a start for the next stage)
    damping: torch.Tensor | None = None

    @property
    def converged(self) -> bool:
        return self.status == "converged"


class _Problem:
    """The objective for fixed targets: contexts made once, energies and normal equations."""

    def __init__(self, model: FaceModel, targets: Targets, prior_weight: float, release: bool = False,
                 delta: float | None = None):
        self.model = model
        self.delta = delta  #: None: squared residuals; else the Charbonnier sqrt(|r|^2 + delta^2) - delta
        self.t = targets
        self.lam = float(prior_weight)
        vids = targets.vids.reshape(-1).numpy()
        uniq, inv = np.unique(vids, return_inverse=True)
        self.local = torch.as_tensor(inv.reshape(targets.vids.shape))
        #: every face's point k is context vertex k (registered targets): no gathers needed
        self.ident = bool(targets.vids.shape[1] == len(uniq) and (targets.bary[..., 1:] == 0).all()
                          and (self.local[..., 0] == torch.arange(len(uniq))).all())
        self.ctx = model.context(uniq)
        self.release = release
        self.wsum = targets.weights.sum(1).clamp_min(1e-12)  # (B,)
        self.center = self.centre_of(targets)  # (B, 3) rotation centre of the poses
        self.single = bool((targets.bary[..., 1:] == 0).all())
        dt = torch.float64
        self.pid = (1.0 / model.id_prior.std.to(dt) ** 2, model.id_prior.mean.to(dt))
        self.pexp = (1.0 / model.exp_prior.std.to(dt) ** 2, model.exp_prior.mean.to(dt))

    def positions(self, codes: Codes, release: bool = False) -> torch.Tensor:
        zi, ze = codes.per_face()
        dt = self.model.dtype
        f = self.model.decode_release if release else self.model.decode
        return f(self.ctx, zi.to(dt), ze.to(dt))

    @staticmethod
    def centre_of(targets: Targets) -> torch.Tensor:
        """(B, 3) weighted centroid of each face's target points."""
        w = targets.weights / targets.weights.sum(1, keepdim=True).clamp_min(1e-12)
        return (targets.points * w[..., None]).sum(1)

    def targets_at(self, codes: Codes) -> Targets:
        """The targets moved by the codes' rigid motion (scans); unchanged without one."""
        if codes.rot is None:
            return self.t
        t = self.t
        c = self.center[:, None, :]
        pts = torch.einsum("bij,bkj->bki", codes.rot, t.points - c) + c + codes.trans[:, None, :]
        nrm = None if t.normals is None else torch.einsum("bij,bkj->bki", codes.rot, t.normals)
        return Targets(pts, t.vids, t.bary, t.weights, nrm, t.p2p)

    def data_energy(self, x: torch.Tensor, codes: Codes | None = None) -> torch.Tensor:
        """(B,) weighted mean squared residual per face."""
        t = self.t if codes is None else self.targets_at(codes)
        r = _residuals(x if self.ident else _predict(x, t, self.local), t).to(torch.float64)
        sq = (r * r).sum(-1)
        if self.delta is not None:
            sq = (sq + self.delta ** 2).sqrt() - self.delta
        return (sq * t.weights).sum(1) / self.wsum

    def prior_energy(self, codes: Codes) -> tuple[torch.Tensor, torch.Tensor]:
        """Per identity row (I,) and per face (B,) prior energies (times prior_weight)."""
        pi, mi = self.pid
        pe, me = self.pexp
        ei = ((codes.z_id.to(torch.float64) - mi) ** 2 * pi).sum(1) * self.lam
        ee = ((codes.z_exp.to(torch.float64) - me) ** 2 * pe).sum(1) * self.lam
        return ei, ee

    def energy(self, codes: Codes) -> float:
        with torch.no_grad():
            ed = self.data_energy(self.positions(codes), codes)
        ei, ee = self.prior_energy(codes)
        return float(ed.sum() + ei.sum() + ee.sum())

    def face_energies(self, codes: Codes, idx: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) data + expression prior (+ identity prior when not shared) per face; with ``idx``
        only those faces (len(idx),), decoding only their codes."""
        if idx is None:
            with torch.no_grad():
                ed = self.data_energy(self.positions(codes), codes)
            ei, ee = self.prior_energy(codes)
            return ed + ee + (0 if codes.shared else ei)
        zi, ze = codes.per_face()
        dt = self.model.dtype
        with torch.no_grad():
            x = self.model.decode(self.ctx, zi[idx].to(dt), ze[idx].to(dt))
        tg = _take(self.targets_at(codes), idx)
        r = _residuals(x if self.ident else _predict(x, tg, self.local[idx]), tg).to(torch.float64)
        sq = (r * r).sum(-1)
        if self.delta is not None:
            sq = (sq + self.delta ** 2).sqrt() - self.delta
        ed = (sq * tg.weights).sum(1) / self.wsum[idx]
        ei, ee = self.prior_energy(codes)
        return ed + ee[idx] + (0 if codes.shared else ei[idx])

    def normal_equations(self, codes: Codes, idx: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per face: A (B, D, D) = J^T W J / W_b, g (B, D) = J^T W r / W_b, data energy (B,).

        With a rigid motion in ``codes`` the unknowns of a face are [z_id, z_exp, dw (3), dt (3)]
        (a left increment of the motion about the targets' centre). Faces are processed in
        chunks that bound the Jacobian's memory (:data:`JACOBIAN_BUDGET` values). ``idx``: only
        these faces (the outputs then have len(idx) rows)."""
        tg = self.targets_at(codes)
        zi, ze = codes.per_face()
        dt = self.model.dtype
        n_b, k = tg.points.shape[:2]
        faces = torch.arange(n_b) if idx is None else torch.as_tensor(idx, dtype=torch.long)
        per_face = max(int(self.local.max()) + 1, 1) * 3 * (self.model.code_dim + 6) * (1 if self.single else 2)
        step = max(1, JACOBIAN_BUDGET // max(per_face, 1))
        outs = []
        for s in range(0, len(faces), step):
            sl = faces[s:s + step]
            if idx is None and len(sl) == n_b:
                sl = slice(None)
            x, jx = self.model.jacobian(self.ctx, zi[sl].to(dt), ze[sl].to(dt))  # (b,U,3), (b,U,3,D)
            b = torch.arange(x.shape[0]).view(-1, 1)
            loc = self.local[sl]
            if self.ident and codes.rot is None and tg.normals is None:
                # registered targets (point k is context vertex k), point-to-point, no gathers:
                # J^T W J from the float32 Jacobian (float64 with NE_DOUBLE), J^T W r in float64
                r = x.to(torch.float64) - tg.points[sl]
                w = tg.weights[sl] / self.wsum[sl, None]
                if self.delta is not None:
                    w = w / (2 * ((r * r).sum(-1) + self.delta ** 2).sqrt())
                sw = w.sqrt()
                jw = (jx * sw.to(jx.dtype)[..., None, None]).flatten(1, 2)  # (b, K*3, D)
                rw = (r * sw[..., None]).flatten(1, 2)
                if NE_DOUBLE:
                    jw = jw.to(torch.float64)
                    jt = jw.transpose(1, 2)
                    outs.append((jt @ jw, (jt @ rw[..., None])[..., 0], (rw * rw).sum(1)))
                else:
                    jt = jw.transpose(1, 2)
                    outs.append(((jt @ jw).to(torch.float64),
                                 (jt.to(torch.float64) @ rw[..., None])[..., 0], (rw * rw).sum(1)))
                continue
            if not self.ident:
                # scan-type targets (points on triangles, normals, a pose): per face, the rows of
                # the Jacobian from the corners' Jacobians in the model's dtype, float64 after the mix
                fids = torch.arange(n_b)[sl] if isinstance(sl, slice) else sl
                for i, f in enumerate(fids.tolist()):
                    outs.append(self._point_rows(x[i], jx[i], f, tg, codes.rot is not None))
                continue
            if self.ident:
                pred, jp = x, jx.to(torch.float64)
            elif self.single:  # each point is one vertex
                pred = x[b, loc[..., 0]]
                jp = jx[b, loc[..., 0]].to(torch.float64)  # (b, K, 3, D)
            else:
                bary = self.t.bary[sl].to(jx.dtype)
                pred = (x[b[..., None], loc] * bary[..., None]).sum(2)
                jp = (jx[b[..., None], loc] * bary[..., None, None]).sum(2).to(torch.float64)
            del jx
            pts = tg.points[sl]
            if codes.rot is not None:
                # r = pred - (R_d (p - c) + c + t_d): d r / d w = skew(p - c), d r / d t = -I
                sk = _skew(pts - self.center[sl, None, :])
                jp = torch.cat([jp, sk, -torch.eye(3, dtype=torch.float64).expand_as(sk)], -1)  # (b, K, 3, D + 6)
            part = Targets(pts, tg.vids[sl], tg.bary[sl], tg.weights[sl],
                           None if tg.normals is None else tg.normals[sl], tg.p2p)
            r = _residuals(pred, part).to(torch.float64)
            if part.normals is not None:
                jn = (jp * part.normals.to(jp.dtype)[..., None]).sum(2, keepdim=True)  # (b, K, 1, D)
                jp = torch.cat([jn, part.p2p * jp], 2)
            w = part.weights / self.wsum[sl, None]
            if self.delta is not None:  # IRLS weights of the Charbonnier (factor 1/2: see data_energy)
                w = w / (2 * ((r * r).sum(-1) + self.delta ** 2).sqrt())
            sw = w.sqrt()  # (b, K)
            jw = (jp * sw[..., None, None]).flatten(1, 2)  # (b, K*c, D)
            rw = (r * sw[..., None]).flatten(1, 2)  # (b, K*c)
            outs.append((jw.transpose(1, 2) @ jw, (jw.transpose(1, 2) @ rw[..., None])[..., 0], (rw * rw).sum(1)))
        return tuple(torch.cat([o[i] for o in outs]) for i in range(3))

    def _point_rows(self, x: torch.Tensor, jx: torch.Tensor, f: int, tg: Targets, pose: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normal equations of face ``f`` for barycentric targets: x (U, 3), jx (U, 3, D) at the
        context vertices. Each target point's code Jacobian is the barycentric mix of its three
        corners' (K, 3, D), projected on the normal for the point-to-plane row; the pose columns
        (``pose``) are appended. Returns A (1, D', D'), g (1, D'), data energy (1,)."""
        f64 = torch.float64
        loc, bary, pts = self.local[f], tg.bary[f].to(f64), tg.points[f]
        k = loc.shape[0]
        u = x.shape[0]
        pred = (x.to(f64)[loc] * bary[..., None]).sum(1)  # (K, 3)
        d = pred - pts
        nrm = None if tg.normals is None else tg.normals[f].to(f64)
        r = d if nrm is None else torch.cat([(d * nrm).sum(-1, keepdim=True), tg.p2p * d], -1)  # (K, c)
        c = r.shape[1]
        w = tg.weights[f] / self.wsum[f]
        if self.delta is not None:
            w = w / (2 * ((r * r).sum(-1) + self.delta ** 2).sqrt())
        sw = w.sqrt()
        # d pred / d code: the barycentric mix of the corners' Jacobians (K, 3, D), in the model's dtype
        jp = torch.einsum("kj,kjdn->kdn", bary.to(jx.dtype), jx[loc])
        if nrm is None:
            jr = jp * sw.to(jp.dtype)[:, None, None]
        else:
            jn = torch.einsum("kd,kdn->kn", nrm.to(jp.dtype), jp)[:, None, :]
            jr = torch.cat([jn, tg.p2p * jp], 1) * sw.to(jp.dtype)[:, None, None]
        jr = jr.reshape(k * c, -1).to(f64)  # (K c, D)
        if pose:
            a = pts - self.center[f]
            eye = torch.eye(3, dtype=f64).expand(k, 3, 3)
            jp = torch.cat([_skew(a), -eye], -1)  # (K, 3, 6): d (point residual) / d (w, t)
            if nrm is not None:
                jp = torch.cat([(jp * nrm[..., None]).sum(1, keepdim=True), tg.p2p * jp], 1)
            jr = torch.cat([jr, (jp * sw[:, None, None]).reshape(k * c, 6)], 1)
        rw = (r * sw[:, None]).reshape(-1)
        jt = jr.T
        return (jt @ jr)[None], (jt @ rw)[None], (rw * rw).sum().reshape(1)


def _groups(codes: Codes) -> list[list[int]]:
    b = codes.z_exp.shape[0]
    return [list(range(b))] if codes.shared else [[i] for i in range(b)]


def _assemble(prob: _Problem, codes: Codes, group: list[int], a, g, free: str):
    """Normal equations of one group: unknowns [z_id row, z_exp of each face] restricted to
    ``free`` (all | id | exp). Returns H (n, n), grad (n,), the index map."""
    di, de = prob.model.id_dim, prob.model.exp_dim + codes.n_pose
    nf = len(group)
    n = di + nf * de
    h = torch.zeros(n, n, dtype=torch.float64)
    grad = torch.zeros(n, dtype=torch.float64)
    for j, bidx in enumerate(group):
        ids = list(range(di)) + list(range(di + j * de, di + (j + 1) * de))
        ix = torch.as_tensor(ids)
        h[ix[:, None], ix[None, :]] += a[bidx]
        grad[ix] += g[bidx]
    pi, mi = prob.pid
    pe, me = prob.pexp
    irow = 0 if codes.shared else group[0]
    h[range(di), range(di)] += prob.lam * pi
    grad[:di] += prob.lam * pi * (codes.z_id[irow].to(torch.float64) - mi)
    dx = prob.model.exp_dim
    for j, bidx in enumerate(group):
        sl = slice(di + j * de, di + j * de + dx)
        h[sl, sl] += torch.diag(prob.lam * pe)
        grad[sl] += prob.lam * pe * (codes.z_exp[bidx].to(torch.float64) - me)
    if free == "id":
        keep = torch.arange(di)
    elif free == "exp":
        keep = torch.arange(di, n)
    else:
        keep = torch.arange(n)
    return h[keep[:, None], keep[None, :]], grad[keep], keep


def _apply_step(codes: Codes, group: list[int], keep: torch.Tensor, step: torch.Tensor, di: int, dx: int) -> None:
    de = dx + codes.n_pose
    full = torch.zeros(di + len(group) * de, dtype=torch.float64)
    full[keep] = step
    irow = 0 if codes.shared else group[0]
    codes.z_id[irow] += full[:di].to(codes.z_id.dtype)
    for j, bidx in enumerate(group):
        o = di + j * de
        codes.z_exp[bidx] += full[o: o + dx].to(codes.z_exp.dtype)
        if codes.rot is not None:
            rd = _rodrigues(full[o + dx: o + dx + 3])
            codes.rot[bidx] = rd @ codes.rot[bidx]
            codes.trans[bidx] = rd @ codes.trans[bidx] + full[o + dx + 3: o + dx + 6]


def _group_energy(fe: torch.Tensor, ei: torch.Tensor, codes: Codes, group: list[int]) -> float:
    e = float(fe[group].sum())
    return e + float(ei[0]) if codes.shared else e


def _damping_update(k: int, accepted: bool, mu, nu, done, info, rho: float = 0.0, rel: float = 0.0,
                    tol: float = 0.0) -> None:
    """Levenberg-Marquardt damping of group ``k`` after a trial step (Nielsen's rule).

    Accepted: shrink ``mu[k]`` by the gain ratio ``rho`` (actual / predicted decrease), reset
    ``nu[k]``, and mark the group done when the relative decrease ``rel`` is below ``tol``.
    Rejected: an undamped (``mu == 0``) step that did not decrease means the minimum up to
    round-off (done); otherwise grow ``mu[k]`` by ``nu[k]`` and give up ("stalled") past 1e12.
    """
    if accepted:
        mu[k] *= max(1 / 3, 1 - (2 * min(rho, 1.0) - 1) ** 3) if mu[k] > 0 else 1.0
        nu[k] = 2.0
        if rel < tol:
            done[k] = True
        return
    if mu[k] == 0:
        done[k] = True
        return
    mu[k] *= nu[k]
    nu[k] *= 2
    if mu[k] > 1e12:
        done[k] = True
        info.status = "stalled"


def solve_lm(prob: _Problem, codes: Codes, max_iter: int, tol: float, free: str = "all",
             damping: float = 1e-3) -> tuple[Codes, SolveInfo]:
    """Levenberg-Marquardt (Nielsen's damping update, Marquardt's diagonal scaling) per group.

    ``damping=0`` gives plain Gauss-Newton (exact for blocks in which the model is linear).
    Stops when every group's accepted step decreases its energy by less than ``tol``
    (relative), or after ``max_iter`` Jacobian evaluations.
    """
    codes = codes.clone()
    groups = _groups(codes)
    di, de = prob.model.id_dim, prob.model.exp_dim
    mu = [damping] * len(groups)
    nu = [2.0] * len(groups)
    done = [False] * len(groups)
    info = SolveInfo(status="max_iter")
    ei, _ = prob.prior_energy(codes)
    fe = prob.face_energies(codes)
    info.evaluations += 1
    for it in range(max_iter):
        a, g, _ = prob.normal_equations(codes)
        info.jacobians += 1
        info.iterations = it + 1
        trial = codes.clone()
        steps = []
        for k, grp in enumerate(groups):
            if done[k]:
                steps.append(None)
                continue
            h, grad, keep = _assemble(prob, codes, grp, a, g, free)
            hd = h + mu[k] * torch.diag(torch.diagonal(h).clamp_min(1e-12)) if mu[k] > 0 else h
            try:
                step = -torch.linalg.solve(hd, grad)
            except RuntimeError:
                step = -torch.linalg.lstsq(hd, grad[:, None]).solution[:, 0]
            pred_dec = float(-(grad @ step) - 0.5 * step @ (h @ step))  # model decrease of E/... (GN)
            steps.append((keep, step, pred_dec))
            _apply_step(trial, grp, keep, step, di, de)
        ei_t, _ = prob.prior_energy(trial)
        fe_t = prob.face_energies(trial)
        info.evaluations += 1
        for k, grp in enumerate(groups):
            if steps[k] is None:
                continue
            keep, step, pred_dec = steps[k]
            e0 = _group_energy(fe, ei, codes, grp)
            e1 = _group_energy(fe_t, ei_t, trial, grp)
            if e1 <= e0:
                rel = (e0 - e1) / max(e0, 1e-300)
                rho = (e0 - e1) / max(pred_dec, 1e-300)
                _copy_group(codes, trial, grp)
                _damping_update(k, True, mu, nu, done, info, rho=rho, rel=rel, tol=tol)
            else:
                _damping_update(k, False, mu, nu, done, info)
        ei, _ = prob.prior_energy(codes)
        fe = prob.face_energies(codes)
        info.history.append(float(fe.sum() + (ei[0] if codes.shared else 0)))
        if all(done):
            if info.status != "stalled":
                info.status = "converged"
            break
    info.objective = prob.energy(codes)
    return codes, info


def _copy_group(dst: Codes, src: Codes, group: list[int]) -> None:
    irow = 0 if dst.shared else group[0]
    dst.z_id[irow] = src.z_id[irow]
    for b in group:
        dst.z_exp[b] = src.z_exp[b]
        if dst.rot is not None:
            dst.rot[b] = src.rot[b]
            dst.trans[b] = src.trans[b]


def _structured_step(a: torch.Tensor, g: torch.Tensor, hid: torch.Tensor, gid: torch.Tensor, pe: torch.Tensor,
                     ge_prior: torch.Tensor, mu: torch.Tensor, shared: bool, di: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Damped Gauss-Newton steps exploiting the block structure of the normal equations.

    a (B, D, D), g (B, D): per-face data blocks over [z_id, z_exp (+ pose)]; hid (Di,) / gid
    (I, Di): identity prior diagonal / gradient (I = 1 when shared, else B); pe (De',) / ge_prior
    (B, De'): expression prior diagonal / gradient (zero on pose columns); mu (G,) Marquardt
    damping per group (G = 1 when shared, else B). Per face: batched dense solves of (D, D).
    Shared identity: the expression blocks are eliminated (Schur complement), leaving one (Di, Di)
    system. Returns the identity steps (I, Di), the per-face steps (B, De') and the predicted
    decrease of the undamped quadratic model per group (G,).
    """
    f64 = torch.float64
    b = a.shape[0]
    hee = a[:, di:, di:] + torch.diag_embed(pe.expand(b, -1))
    gee = g[:, di:] + ge_prior
    hie = a[:, :di, di:]  # (B, Di, De')
    if not shared:
        h = a.clone()
        h[:, :di, :di] += torch.diag(hid)
        h[:, di:, di:] = hee
        grad = torch.cat([g[:, :di] + gid, gee], 1)
        dg = torch.diagonal(h, dim1=1, dim2=2).clamp_min(1e-12)
        hd = h + torch.diag_embed(mu[:, None] * dg)
        step, bad = _solve_spd(hd, -grad[..., None])
        step = step[..., 0]
        if bool((bad != 0).any()) or not torch.isfinite(step).all():
            step = torch.linalg.lstsq(hd, -grad[..., None]).solution[..., 0]
        pred = -(grad * step).sum(1) - 0.5 * (step * (h @ step[..., None])[..., 0]).sum(1)
        return step[:, :di], step[:, di:], pred
    hii = a[:, :di, :di].sum(0) + torch.diag(hid)
    gi = g[:, :di].sum(0) + gid[0]
    m = mu[0]
    hii_d = hii + m * torch.diag(torch.diagonal(hii).clamp_min(1e-12))
    hee_d = hee + m * torch.diag_embed(torch.diagonal(hee, dim1=1, dim2=2).clamp_min(1e-12))
    rhs = torch.cat([hie.transpose(1, 2), gee[..., None]], 2)  # (B, De', Di + 1)
    sol, bad = _solve_spd(hee_d, rhs)
    if bool((bad != 0).any()) or not torch.isfinite(sol).all():
        sol = torch.linalg.lstsq(hee_d, rhs).solution
    x, y = sol[..., :di], sol[..., di]  # Hee^-1 Hei, Hee^-1 ge
    s = hii_d - torch.einsum("bij,bjk->ik", hie, x)
    r = gi - torch.einsum("bij,bj->i", hie, y)
    si, bad = torch.linalg.solve_ex(s, -r[:, None])
    si = si[:, 0]
    if int(bad) != 0 or not torch.isfinite(si).all():
        si = torch.linalg.lstsq(s, -r[:, None]).solution[:, 0]
    se = -(y + torch.einsum("bij,j->bi", x, si))
    quad = (si @ (hii @ si) + 2 * torch.einsum("i,bij,bj->", si, hie, se)
            + torch.einsum("bi,bij,bj->", se, hee, se))
    pred = -(gi @ si) - (gee * se).sum() - 0.5 * quad
    return si[None], se, pred.reshape(1).to(f64)


def solve_lm_structured(prob: _Problem, codes: Codes, max_iter: int, tol: float,
                        damping: float | torch.Tensor = 1e-3, info: SolveInfo | None = None
                        ) -> tuple[Codes, SolveInfo]:
    """Levenberg-Marquardt like :func:`solve_lm` (same objective, damping rule, acceptance and
    convergence test), with the work of an iteration cut down:

    * the normal equations are solved by their block structure (:func:`_structured_step`):
      batched per-face solves, or a Schur complement on the shared identity instead of one
      dense system over all of a subject's expressions;
    * a rejected step costs one forward pass of the faces concerned: their Jacobians and normal
      equations are kept until a step of theirs is accepted;
    * the energy of an accepted trial is kept (no second forward at the same codes);
    * groups that have converged are neither decoded nor differentiated again.

    ``damping``: the initial Marquardt factor, a float or one per group (e.g. ``info.damping``
    of a previous stage: one per face, or one when the identity is shared).
    """
    codes = codes.clone()
    info = info or SolveInfo(status="max_iter")
    info.status = "max_iter"
    f64 = torch.float64
    nb = codes.z_exp.shape[0]
    shared = codes.shared
    di, dx, npose = prob.model.id_dim, prob.model.exp_dim, codes.n_pose
    de = dx + npose
    ngroups = 1 if shared else nb
    face_group = torch.zeros(nb, dtype=torch.long) if shared else torch.arange(nb)
    pi, mi = prob.pid
    pe, me = prob.pexp
    hid = prob.lam * pi
    pe_full = torch.cat([prob.lam * pe, torch.zeros(npose, dtype=f64)])
    if isinstance(damping, torch.Tensor) and damping.numel() == ngroups:
        mu = damping.detach().to(f64).reshape(ngroups).clone()
    else:
        mu = torch.full((ngroups,), float(damping), dtype=f64)
    nu = torch.full((ngroups,), 2.0, dtype=f64)
    done = torch.zeros(ngroups, dtype=torch.bool)
    d = di + de
    a = torch.zeros(nb, d, d, dtype=f64)
    g = torch.zeros(nb, d, dtype=f64)
    stale = torch.ones(nb, dtype=torch.bool)
    fe = prob.face_energies(codes)
    ei = prob.prior_energy(codes)[0]
    info.evaluations += 1

    def group_energy(fe_, ei_):  # (G,)
        return fe_.sum().reshape(1) + ei_[0] if shared else fe_

    for it in range(max_iter):
        if bool(stale.any()):
            idx = torch.nonzero(stale)[:, 0]
            ai, gi_, _ = prob.normal_equations(codes, None if len(idx) == nb else idx)
            a[idx], g[idx] = ai, gi_
            stale[:] = False
            info.jacobians += 1
        info.iterations = it + 1
        act_g = torch.nonzero(~done)[:, 0]
        act_f = torch.nonzero(~done[face_group])[:, 0]
        zi64 = codes.z_id.to(f64)
        gid = hid * (zi64 - mi)
        ge_prior = torch.cat([prob.lam * pe * (codes.z_exp.to(f64) - me), torch.zeros(nb, npose, dtype=f64)], 1)
        if shared:
            si, se, pred = _structured_step(a, g, hid, gid, pe_full, ge_prior, mu, True, di)
        else:
            si, se, pred = _structured_step(a[act_f], g[act_f], hid, gid[act_f], pe_full, ge_prior[act_f],
                                            mu[act_g], False, di)
            si_full = torch.zeros(nb, di, dtype=f64)
            se_full = torch.zeros(nb, de, dtype=f64)
            pred_full = torch.zeros(nb, dtype=f64)
            si_full[act_f], se_full[act_f], pred_full[act_f] = si, se, pred
            si, se, pred = si_full, se_full, pred_full
        trial = codes.clone()
        trial.z_id += si.to(trial.z_id.dtype)
        trial.z_exp += se[:, :dx].to(trial.z_exp.dtype)
        if npose:
            for k in act_f.tolist():
                rd = _rodrigues(se[k, dx:dx + 3])
                trial.rot[k] = rd @ trial.rot[k]
                trial.trans[k] = rd @ trial.trans[k] + se[k, dx + 3:]
        fe_t = fe.clone()
        fe_t[act_f] = prob.face_energies(trial, act_f if len(act_f) < nb else None)
        ei_t = prob.prior_energy(trial)[0]
        info.evaluations += 1
        e0, e1 = group_energy(fe, ei), group_energy(fe_t, ei_t)
        for k in act_g.tolist():
            fk = torch.nonzero(face_group == k)[:, 0]
            if e1[k] <= e0[k]:
                rel = float((e0[k] - e1[k]) / e0[k].clamp_min(1e-300))
                rho = float((e0[k] - e1[k]) / pred[k].clamp_min(1e-300))
                irow = 0 if shared else k
                codes.z_id[irow] = trial.z_id[irow]
                codes.z_exp[fk] = trial.z_exp[fk]
                if npose:
                    codes.rot[fk] = trial.rot[fk]
                    codes.trans[fk] = trial.trans[fk]
                fe[fk] = fe_t[fk]
                ei[irow] = ei_t[irow]
                stale[fk] = True
                _damping_update(k, True, mu, nu, done, info, rho=rho, rel=rel, tol=tol)
            else:
                _damping_update(k, False, mu, nu, done, info)
        info.history.append(float(fe.sum() + (ei[0] if shared else 0)))
        if bool(done.all()):
            if info.status != "stalled":
                info.status = "converged"
            break
    info.objective = float(fe.sum() + (ei[0] if shared else 0.0))  # = prob.energy(codes), no forward
    info.damping = mu
    return codes, info


def _solve_spd(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve batched symmetric positive definite systems ``a x = b`` (a (B, n, n), b (B, n, k)).

    Returns ``(x, info)`` like ``torch.linalg.solve_ex`` (info != 0 where a system failed).
    Cholesky first (the damped normal equations are SPD). Not batched LU: the CPU build of
    torch 2.13 with MKL hangs or fails in batched ``getrf`` for n >~ 200 when more than one
    thread is used ("Parameter 6 was incorrect on entry to DLASWP"; the default run's
    evaluation stalled for 10 min in a (20, 258, 258) solve). Systems that are not positive
    definite are solved one at a time by LU, which is unaffected.
    """
    chol, info = torch.linalg.cholesky_ex(a)
    x = torch.cholesky_solve(b, chol)
    bad = info != 0
    if bool(bad.any()):
        info = info.clone()
        for i in torch.nonzero(bad).flatten().tolist():
            x[i], info[i] = torch.linalg.solve_ex(a[i], b[i])
    return x, info


def solve_als(prob: _Problem, codes: Codes, max_iter: int, tol: float) -> tuple[Codes, SolveInfo]:
    """Alternating least squares for models linear in each block (exact block solves)."""
    info = SolveInfo(status="max_iter")
    prev = prob.energy(codes)
    for it in range(max_iter):
        codes, i1 = solve_lm(prob, codes, 1, 0.0, free="id", damping=0.0)
        codes, i2 = solve_lm(prob, codes, 1, 0.0, free="exp", damping=0.0)
        info.jacobians += i1.jacobians + i2.jacobians
        info.evaluations += i1.evaluations + i2.evaluations
        info.iterations = it + 1
        cur = prob.energy(codes)
        info.history.append(cur)
        if prev - cur <= tol * max(prev, 1e-300):
            info.status = "converged"
            break
        prev = cur
    info.objective = prob.energy(codes)
    return codes, info


def solve_lbfgs(prob: _Problem, codes: Codes, max_iter: int, tol: float) -> tuple[Codes, SolveInfo]:
    """L-BFGS with strong Wolfe line search on the same objective (autograd, precomputed context)."""
    zi = codes.z_id.detach().clone().to(prob.model.dtype).requires_grad_(True)
    ze = codes.z_exp.detach().clone().to(prob.model.dtype).requires_grad_(True)
    opt = torch.optim.LBFGS([zi, ze], lr=1.0, max_iter=max_iter, tolerance_change=tol * 1e-3,
                            tolerance_grad=1e-12, history_size=20, line_search_fn="strong_wolfe")
    info = SolveInfo(status="max_iter")

    def closure():
        opt.zero_grad()
        c = Codes(zi, ze, codes.shared)
        e = prob.data_energy(prob.positions(c)).sum()
        ei, ee = prob.prior_energy(c)
        total = e + ei.sum() + ee.sum()
        total.backward()
        info.evaluations += 1
        info.history.append(float(total.detach()))
        return total

    opt.step(closure)
    state = opt.state[opt._params[0]]
    info.iterations = int(state.get("n_iter", 0))
    if info.iterations < max_iter:
        info.status = "converged"
    out = Codes(zi.detach(), ze.detach(), codes.shared)
    info.objective = prob.energy(out)
    return out, info


def solve_adam(prob: _Problem, codes: Codes, iters: int | None = None, lr: float | None = None
               ) -> tuple[Codes, SolveInfo]:
    """The release protocol: Adam on the mean point distance (not squared), a full forward
    pass (encoder included) every step, a fixed number of iterations, no prior. Defaults:
    :data:`RELEASE_ITERS`, :data:`RELEASE_LR` (read at call time)."""
    iters = RELEASE_ITERS if iters is None else int(iters)
    lr = RELEASE_LR if lr is None else float(lr)
    zi = codes.z_id.detach().clone().to(prob.model.dtype).requires_grad_(True)
    ze = codes.z_exp.detach().clone().to(prob.model.dtype).requires_grad_(True)
    opt = torch.optim.Adam([zi, ze], lr=lr)
    info = SolveInfo(status="max_iter")
    w = prob.t.weights / prob.wsum[:, None]
    for it in range(iters):
        opt.zero_grad()
        x = prob.positions(Codes(zi, ze, codes.shared), release=True)
        d = torch.linalg.vector_norm(_residuals(_predict(x, prob.t, prob.local), prob.t), dim=-1)
        loss = (d * w.to(d.dtype)).sum(1).mean()
        loss.backward()
        opt.step()
        info.evaluations += 1
    info.iterations = iters
    out = Codes(zi.detach(), ze.detach(), codes.shared)
    info.objective = prob.energy(out)
    return out, info


def solve_codes(model: FaceModel, targets: Targets, cfg, codes: Codes | None = None,
                shared: bool | None = None, seed: int = 0) -> tuple[Codes, SolveInfo]:
    """Fit codes to fixed targets with ``cfg.optimizer`` (a :class:`~cm3dmm.config.FitConfig`).

    ``shared``: one identity code for all faces (default: ``cfg.mode == "per-subject"`` and the
    model has an identity block). ``codes``: the start (default: the prior means; zeros for
    ``adam``, as in the release).
    """
    b = targets.n_faces
    if shared is None:
        shared = cfg.mode == "per-subject"
    shared = bool(shared and model.shared_identity and b > 1)
    if codes is None:
        zi, ze = model.zero_codes(b) if cfg.optimizer == "adam" else model.mean_codes(b)
        codes = Codes(zi[:1].clone() if shared else zi, ze, shared)
    rng = np.random.default_rng(seed)
    delta = ROBUST_DELTA if getattr(cfg, "loss", "squared") == "distance" else None

    def _P(t):
        return _Problem(model, t, cfg.prior_weight, delta=delta)

    if codes.rot is not None:  # joint codes + rigid motion (scans): always Levenberg-Marquardt
        return solve_lm_structured(_P(targets), codes, cfg.max_iter, cfg.tol)
    if cfg.optimizer == "adam":
        return solve_adam(_Problem(model, targets, cfg.prior_weight, release=True), codes)
    if model.structure in ("linear", "bilinear") and cfg.optimizer == "lm":
        # least squares exactly (one normal-equation solve / alternating least squares) ...
        sq = _Problem(model, targets, cfg.prior_weight)
        if model.structure == "linear":
            codes, info = solve_lm(sq, codes, 2, tol=max(cfg.tol, 1e-12), damping=0.0)
        else:  # to convergence for the squared loss; a few sweeps as the warm start of the distance loss
            codes, info = solve_als(sq, codes, cfg.max_iter if delta is None else min(cfg.max_iter, ALS_WARM_START),
                                    cfg.tol)
        if delta is None:
            return codes, info
        # ... then the distance objective by IRLS-Levenberg-Marquardt from there
        codes, info2 = solve_lm_structured(_P(targets), codes, cfg.max_iter, cfg.tol)
        info2.iterations += info.iterations
        info2.jacobians += info.jacobians
        info2.history = info.history + info2.history
        return codes, info2
    if cfg.optimizer == "lbfgs":
        return solve_lbfgs(_P(targets), codes, cfg.max_iter, cfg.tol)
    # lm in stages on growing random subsets of the target points: ``coarse_points`` (at most
    # ``coarse_iters`` iterations), then ``points``, then ``polish_iters`` on all of them; the
    # damping carries over from stage to stage and ``max_iter`` bounds the subset stages together
    return solve_lm_staged(model, targets, cfg, codes, rng, delta)


def lm_stages(cfg, n_points: int) -> list[tuple[int, int]]:
    """The (points, max iterations) of the subset stages of ``lm`` (0 points = all of them)."""
    budget = max(int(cfg.max_iter), 1)
    pts = int(getattr(cfg, "points", 0))
    pts = 0 if pts <= 0 or pts >= n_points else pts
    cp = int(getattr(cfg, "coarse_points", 0))
    ci = int(getattr(cfg, "coarse_iters", 0))
    stages = []
    if cp > 0 and ci > 0 and cp < n_points and (pts == 0 or cp < pts) and budget > 1:
        stages.append((cp, min(ci, budget - 1)))
    stages.append((pts, budget))  # the rest of the budget (see solve_lm_staged)
    return stages


def solve_lm_staged(model: FaceModel, targets: Targets, cfg, codes: Codes, rng: np.random.Generator,
                    delta: float | None) -> tuple[Codes, SolveInfo]:
    """Levenberg-Marquardt on the stages of :func:`lm_stages`, then ``polish_iters`` on all points."""
    k = int(targets.points.shape[1])
    damping = float(getattr(cfg, "damping", 1e-3))
    used = 0
    total = SolveInfo()
    info = None
    stages = lm_stages(cfg, k)
    for s, (pts, iters) in enumerate(stages):
        iters = iters if s < len(stages) - 1 else max(int(cfg.max_iter) - used, 1)
        sub = targets.subset(pts, rng) if pts else targets
        codes, info = solve_lm_structured(_Problem(model, sub, cfg.prior_weight, delta=delta), codes, iters,
                                          cfg.tol, damping=damping)
        damping = info.damping
        used += info.iterations
        total.iterations += info.iterations
        total.jacobians += info.jacobians
        total.evaluations += info.evaluations
        total.history += info.history
    total.status = info.status  # the last subset stage decides convergence
    #: the objective on the last stage's points (all of them after polishing)
    total.objective = info.objective
    polish = int(getattr(cfg, "polish_iters", 0))
    if polish > 0 and stages[-1][0] != 0:
        full = _Problem(model, targets, cfg.prior_weight, delta=delta)
        codes, pinfo = solve_lm_structured(full, codes, polish, cfg.tol, damping=damping)
        total.iterations += pinfo.iterations
        total.jacobians += pinfo.jacobians
        total.evaluations += pinfo.evaluations
        total.history += pinfo.history
        total.objective = pinfo.objective
        damping = pinfo.damping
    total.damping = damping
    return codes, total


# ============================================================================ results
@dataclass
class FitResult:
    """Codes, meshes and errors of B fitted faces (model frame, mm)."""

    z_id: np.ndarray  #: (B, Di) per face (rows equal when the identity is shared)
    z_exp: np.ndarray  #: (B, De)
    vertices: np.ndarray  #: (B, V, 3) fitted template vertices
    errors: np.ndarray  #: (B,) mean vertex error (registered) / mean scan->fit distance (scans), mm
    vertex_errors: np.ndarray  #: (B, V) per-vertex error, mm (scans: distance to the scan, NaN uncovered)
    transforms: list[Similarity]  #: per face: scan frame (mm) -> model frame (identity for registered)
    shared_identity: bool
    info: SolveInfo
    seconds: float
    timings: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    target_vertices: np.ndarray | None = None  #: (B, V, 3) targets in template topology (for figures)


def _codes_np(codes: Codes) -> tuple[np.ndarray, np.ndarray]:
    zi, ze = codes.per_face()
    return zi.detach().double().numpy(), ze.detach().double().numpy()


def fit_registered(model: FaceModel, targets: np.ndarray, cfg, shared: bool | None = None,
                   seed: int = 0) -> FitResult:
    """Fit codes to meshes in template topology. targets: (B, V, 3) mm (model frame)."""
    t = np.asarray(targets, dtype=np.float64)
    if t.ndim != 3 or t.shape[1:] != (model.n_vertices, 3):
        raise InputError(f"registered targets must have shape (B, {model.n_vertices}, 3), got {t.shape}")
    t0 = time.perf_counter()
    codes, info = solve_codes(model, Targets.vertices(t), cfg, shared=shared, seed=seed)
    secs = time.perf_counter() - t0
    zi, ze = codes.per_face()
    verts = model.vertices(zi.to(model.dtype), ze.to(model.dtype))
    ve = np.linalg.norm(verts - t, axis=-1)
    return FitResult(*_codes_np(codes), verts, ve.mean(1), ve, [Similarity() for _ in t], codes.shared, info,
                     secs, {"solve_s": secs}, target_vertices=t)


# ============================================================================ scans
@dataclass
class Scan:
    """A raw scan or point cloud (mm, its own frame) with optional normals and landmarks."""

    points: np.ndarray  #: (P, 3)
    faces: np.ndarray | None = None  #: (G, 3) or None for a point cloud
    normals: np.ndarray | None = None  #: (P, 3)
    landmarks: dict[str, np.ndarray] = field(default_factory=dict)  #: name -> (3,) mm, scan frame
    name: str = "scan"
    units: str = "mm"  #: the units the file was in
    path: str | None = None
    landmarks_path: str | None = None  #: the file the landmarks came from (named by their errors)


def resolve_units(points: np.ndarray, units: str, path=None) -> tuple[float, str]:
    """The factor to millimetres for a scan and the unit name.

    ``auto``: the unit (mm, cm, m) whose conversion makes the largest extent face-sized
    (:data:`cm3dmm.registered.PLAUSIBLE_EXTENT_MM`). An explicit unit whose result is not
    face-sized, or a scan no unit makes face-sized, is an :class:`InputError`.
    """
    from cm3dmm.registered import PLAUSIBLE_EXTENT_MM

    lo, hi = PLAUSIBLE_EXTENT_MM
    ext = float(np.ptp(points, axis=0).max())
    if units == "auto":
        for name in ("mm", "cm", "m"):
            if lo <= ext * UNIT_FACTORS[name] <= hi:
                if name != "mm":
                    log.info("%s: extent %.4g reads as %s (%.0f mm)", path or "scan", ext, name,
                             ext * UNIT_FACTORS[name])
                return UNIT_FACTORS[name], name
        raise InputError(f"the scan spans {ext:.4g} units, which is face-sized ({lo:.0f}-{hi:.0f} mm) in "
                         "none of mm, cm, m; is it a face scan?", path)
    if units not in UNIT_FACTORS:
        raise InputError(f"unknown units {units!r} (expected mm, cm, m or auto)", path)
    mm = ext * UNIT_FACTORS[units]
    if not lo <= mm <= hi:
        guess = [n for n in ("mm", "cm", "m") if lo <= ext * UNIT_FACTORS[n] <= hi]
        hint = f"; it looks like {guess[0]}: pass --units {guess[0]} (or auto)" if guess else ""
        raise InputError(f"read as {units}, the scan spans {mm:.4g} mm, implausible for a face "
                         f"({lo:.0f}-{hi:.0f} mm){hint}", path)
    return UNIT_FACTORS[units], units


def read_scan(path, units: str = "auto", landmarks: dict | None = None, landmarks_path=None) -> Scan:
    """Read an OBJ/PLY[.gz] scan or point cloud, validate it and convert it to mm."""
    from cm3dmm.io.mesh import read_mesh

    mesh = read_mesh(path)
    pts = np.asarray(mesh.vertices, np.float64)
    if len(pts) == 0:
        raise InputError("the scan contains no points", path)
    if not np.isfinite(pts).all():
        bad = int((~np.isfinite(pts).all(1)).sum())
        raise InputError(f"the scan has {bad} points with NaN or infinite coordinates", path)
    if len(pts) < 10:
        raise InputError(f"the scan has only {len(pts)} points (need at least 10)", path)
    if float(np.ptp(pts, axis=0).max()) == 0.0:
        raise InputError("all points of the scan coincide", path)
    factor, unit = resolve_units(pts, units, path)
    faces = np.asarray(mesh.faces) if len(mesh.faces) else None
    normals = None
    if mesh.normals is not None and np.isfinite(mesh.normals).all():
        nrm = np.linalg.norm(mesh.normals, axis=1, keepdims=True)
        normals = np.where(nrm > 0, mesh.normals / np.where(nrm > 0, nrm, 1), 0.0)
    lms = {k: np.asarray(v, np.float64) * factor for k, v in (landmarks or {}).items()}
    return Scan(pts * factor, faces, normals, lms, Path(path).name.split(".")[0], unit, str(path),
                None if landmarks_path is None else str(landmarks_path))


def boundary_vertices(faces: np.ndarray, n: int) -> np.ndarray:
    """(n,) bool: vertices on an edge used by exactly one triangle."""
    e = np.sort(np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]]), axis=1)
    uniq, count = np.unique(e, axis=0, return_counts=True)
    out = np.zeros(n, bool)
    out[uniq[count == 1].ravel()] = True
    return out


def _scan_targets(scan_pts: np.ndarray, full_pts: np.ndarray, scan: Scan, verts: np.ndarray, faces: np.ndarray,
                  on_boundary: np.ndarray, trim: float, scan_tree,
                  landmarks: tuple[np.ndarray, np.ndarray] | None = None, spacing: float = 0.0,
                  scan_normals: np.ndarray | None = None) -> tuple[Targets, dict]:
    """Correspondences of one scan with the current fit ``verts`` (V, 3).

    scan_pts: (P', 3) the scan points used for scan->model pairs; full_pts: (P, 3) all scan
    points (both already in the model frame); scan_tree: nearest neighbours of the full cloud
    (point clouds only); spacing: the scan's typical point spacing (mm; 0 = unknown);
    scan_normals: (P', 3) unit normals at ``scan_pts`` (model frame) or None.

    Pairs are dropped when they cannot be right: scan points projecting onto the model region's
    boundary (the scan extends beyond the model), pairs whose normals disagree by more than
    :data:`NORMAL_AGREEMENT`, model vertices whose closest scan point lies on the scan's border
    (the offset mostly tangential: the scan has no data there, :data:`BORDER_SPACINGS`), and the
    worst ``trim`` fraction of each direction.
    """
    from cm3dmm.geometry import closest_points_on_mesh

    from scipy.spatial import cKDTree

    # nearest-vertex distances bound the surface distances; far pairs are trimmed anyway
    dv = cKDTree(verts).query(scan_pts)[0]
    bound = max(float(np.quantile(dv, 1.0 - trim)) if trim > 0 else float(dv.max()), 1.0) * 1.5
    proj = closest_points_on_mesh(scan_pts, verts, faces, max_distance=bound)
    tri_v = faces[proj.tri]  # (P, 3)
    vn = vertex_normals(verts, faces)
    # projections onto the boundary of the model region: the scan extends beyond the model
    nz = proj.bary > 1e-6
    edge = (on_boundary[tri_v] | ~nz).all(1)
    keep = ~edge
    d = proj.dist
    if NORMAL_AGREEMENT > 0 and scan_normals is not None:
        nm = np.einsum("pk,pkc->pc", proj.bary, vn[tri_v])
        nm /= np.maximum(np.linalg.norm(nm, axis=1, keepdims=True), 1e-12)
        agree = np.abs((nm * scan_normals).sum(1)) >= NORMAL_AGREEMENT
        if (keep & agree).sum() >= 3:
            keep &= agree
    if keep.sum() >= 3:
        thr = np.quantile(d[keep], 1.0 - trim) if trim > 0 else np.inf
        keep &= d <= thr
    s2m_n = int(keep.sum())
    vids_a = tri_v[keep]
    bary_a = proj.bary[keep]
    pts_a = scan_pts[keep]
    na = np.einsum("pk,pkc->pc", bary_a, vn[vids_a])
    na /= np.maximum(np.linalg.norm(na, axis=1, keepdims=True), 1e-12)
    # model -> scan where the scan covers the model
    if scan.faces is not None:
        back = closest_points_on_mesh(verts, full_pts, scan.faces,
                                      max_distance=np.median(d[keep]) * 3.0 + 1.0 if keep.any() else None)
        bd, bq = back.dist, back.closest
        fn = vertex_normals(full_pts, scan.faces)
        nb = np.einsum("pk,pkc->pc", back.bary, fn[scan.faces[back.tri]])
    else:
        bd, j = scan_tree.query(verts)
        bq = full_pts[j]
        nb = scan_tree.normals(j)
    nb /= np.maximum(np.linalg.norm(nb, axis=1, keepdims=True), 1e-12)
    cover = np.median(d[keep]) * 3.0 + 1.0 if keep.any() else np.inf
    mk = (bd <= cover) & ~on_boundary
    off = bq - verts
    along = np.abs((off * nb).sum(1))
    if BORDER_SPACINGS > 0 and spacing > 0:  # closest scan point on the scan's border: no data here
        tang = np.sqrt(np.maximum((off * off).sum(1) - along ** 2, 0.0))
        inside = tang <= BORDER_SPACINGS * spacing
        if (mk & inside).sum() >= 3:
            mk &= inside
    if NORMAL_AGREEMENT > 0:
        agree = np.abs((vn * nb).sum(1)) >= NORMAL_AGREEMENT
        if (mk & agree).sum() >= 3:
            mk &= agree
    if mk.sum() >= 3 and trim > 0:
        mk &= bd <= np.quantile(bd[mk], 1.0 - trim)
    vid_b = np.flatnonzero(mk)
    pts = np.concatenate([pts_a, bq[mk]])
    vids = np.concatenate([vids_a, np.repeat(vid_b[:, None], 3, 1)])
    bary = np.concatenate([bary_a, np.tile([1.0, 0.0, 0.0], (len(vid_b), 1))])
    normals = np.concatenate([na, nb[mk]])
    # both directions weigh the same in total
    wa = np.full(len(pts_a), 1.0 / max(len(pts_a), 1))
    wb = np.full(len(vid_b), 1.0 / max(len(vid_b), 1))
    w = np.concatenate([wa, wb])
    if landmarks is not None:  # landmark pairs: point-to-point only (zero normal), anchor sliding
        lv, lp = landmarks
        pts = np.concatenate([pts, lp])
        vids = np.concatenate([vids, np.repeat(lv[:, None], 3, 1)])
        bary = np.concatenate([bary, np.tile([1.0, 0.0, 0.0], (len(lv), 1))])
        normals = np.concatenate([normals, np.zeros((len(lv), 3))])
        w = np.concatenate([w, np.full(len(lv), LANDMARK_WEIGHT / len(lv))])
    t = Targets(torch.as_tensor(pts)[None], torch.as_tensor(vids.astype(np.int64))[None],
                torch.as_tensor(bary)[None], torch.as_tensor(w)[None], torch.as_tensor(normals)[None], p2p=P2P_WEIGHT)
    stats = {"scan_to_model": s2m_n, "model_to_scan": int(len(vid_b)),
             "trimmed_rms_mm": float(np.sqrt(np.mean(d[keep] ** 2))) if keep.any() else float("nan")}
    return t, stats


def _landmark_pose(scan: Scan, model: FaceModel, with_scale: bool) -> Similarity | None:
    if not scan.landmarks:
        return None
    common = [k for k in scan.landmarks if k in model.landmarks]
    if len(common) < 3:
        raise InputError(f"the landmarks share only {len(common)} names with the template's "
                         f"({sorted(model.landmarks)[:8]}...); need at least 3", scan.landmarks_path or scan.path)
    src = np.stack([scan.landmarks[k] for k in common])
    dst = model.mean[[model.landmarks[k] for k in common]]
    return umeyama(src, dst, with_scale=with_scale)


def fit_scans(model: FaceModel, scans: Sequence[Scan], cfg, seed: int = 0) -> FitResult:
    """Fit codes + a rigid (+ scale when ``cfg.scale``) pose per scan (the scans of one subject).

    Returns the fit in the model frame; ``transforms[b]`` maps scan b (mm) into it.
    """
    from scipy.spatial import cKDTree

    t_start = time.perf_counter()
    rng = np.random.default_rng(seed)
    faces = np.asarray(model.faces)
    on_b = boundary_vertices(faces, model.n_vertices)
    with_scale = bool(getattr(cfg, "scale", False))
    max_pts = int(getattr(cfg, "scan_points", 0)) or None
    warnings: list[str] = []
    subs, poses, trees, cloud_n, spacing = [], [], [], [], []
    for scan in scans:
        pts = scan.points
        if max_pts and len(pts) > max_pts:
            pts = pts[rng.choice(len(pts), max_pts, replace=False)]
        subs.append(pts)
        trees.append(cKDTree(scan.points) if scan.faces is None else None)
        spacing.append(_spacing(scan, trees[-1], rng))
        cloud_n.append(None if scan.faces is not None else _CloudNormals(scan.points, trees[-1], scan.normals))
        init = _landmark_pose(scan, model, with_scale)
        # a short exact refinement: the pose is solved again jointly with the codes below
        res = align_to_reference(pts, model.mean, faces, trim=max(cfg.trim, 0.1), with_scale=with_scale, init=init,
                                 seed=seed, max_points=RIGID_POINTS, refine_iters=RIGID_REFINE_ITERS)
        log.info("%s: initial pose, trimmed RMS %.2f mm", scan.name, res.rmse)
        scancheck.check_scan(scan, res.transform.apply(pts), model.mean, seed=seed)  # a face? (issue 13)
        poses.append(res.transform)
    t_rigid = time.perf_counter() - t_start
    b = len(scans)
    shared = cfg.mode == "per-subject" and model.shared_identity and b > 1
    zi, ze = model.mean_codes(b)
    codes = Codes(zi[:1].clone() if shared else zi, ze, shared)
    info_total = SolveInfo()
    stats = []
    n_alt = max(cfg.scan_iters, 1)
    inner = max(SCAN_INNER_MIN, int(math.ceil(cfg.max_iter / n_alt)))
    for it in range(n_alt):
        # the code prior is annealed from SCAN_PRIOR_START to fit.prior_weight: the first
        # alternations, whose correspondences are the least reliable, stay close to the prior mean
        lam0 = max(SCAN_PRIOR_START, cfg.prior_weight)
        lam = lam0 * (cfg.prior_weight / lam0) ** (it / max(n_alt - 1, 1)) if cfg.prior_weight > 0 else 0.0
        sub_cfg = _replace(cfg, max_iter=inner, points=0, loss="squared", prior_weight=lam)  # trimming: robust
        if it > 0 and SCAN_RESAMPLE:  # a fresh random subset of the scan points each alternation
            for k, scan in enumerate(scans):
                if max_pts and len(scan.points) > max_pts:
                    subs[k] = scan.points[rng.choice(len(scan.points), max_pts, replace=False)]
        zf, zef = codes.per_face()
        verts = model.vertices(zf.to(model.dtype), zef.to(model.dtype))
        parts, stats = [], []
        for k, scan in enumerate(scans):
            tree = None if trees[k] is None else _Tree(trees[k], poses[k], cloud_n[k])
            lm = None
            common = [n for n in scan.landmarks if n in model.landmarks]
            if len(common) >= 3:
                lm = (np.array([model.landmarks[n] for n in common]),
                      poses[k].apply(np.stack([scan.landmarks[n] for n in common])))
            sn = None
            if tree is not None:  # normals at the subset's points (their nearest cloud points)
                sn = poses[k].apply_vectors(cloud_n[k][trees[k].query(subs[k])[1]])
            tg, st = _scan_targets(poses[k].apply(subs[k]), poses[k].apply(scan.points), scan, verts[k], faces,
                                   on_b, cfg.trim, tree, lm, spacing=spacing[k], scan_normals=sn)
            parts.append(tg)
            stats.append(st)
        targets = Targets.stack(parts)
        joint = cfg.optimizer == "lm"
        start = codes.with_pose() if joint else codes
        codes, info = solve_codes(model, targets, sub_cfg, codes=start, shared=shared, seed=seed)
        if joint:  # fold the solved rigid motion into the poses
            centre = _Problem.centre_of(targets).numpy()
            for k in range(b):
                r = codes.rot[k].numpy()
                motion = Similarity(r, centre[k] - r @ centre[k] + codes.trans[k].numpy())
                poses[k] = motion.compose(poses[k])
            codes = Codes(codes.z_id, codes.z_exp, codes.shared)
        info_total.iterations += info.iterations
        info_total.jacobians += info.jacobians
        info_total.evaluations += info.evaluations
        info_total.history += info.history
        info_total.objective = info.objective
        info_total.status = info.status
        if joint:
            continue
        # rigid refinement against the new fit (optimisers without the joint pose)
        zf, zef = codes.per_face()
        verts = model.vertices(zf.to(model.dtype), zef.to(model.dtype))
        for k in range(b):
            res = trimmed_icp(subs[k], verts[k], faces, poses[k], trim=cfg.trim, max_iter=10,
                              with_scale=with_scale)
            poses[k] = res.transform
    zf, zef = codes.per_face()
    verts = model.vertices(zf.to(model.dtype), zef.to(model.dtype))
    errors, verr, tverts = [], [], []
    from cm3dmm.geometry import closest_points_on_mesh

    for k, scan in enumerate(scans):
        moved = poses[k].apply(subs[k])
        proj = closest_points_on_mesh(moved, verts[k], faces)
        d = np.sort(proj.dist)[: max(1, int(round(len(moved) * (1 - cfg.trim))))]
        errors.append(float(d.mean()))
        full = poses[k].apply(scan.points)
        if scan.faces is not None:
            back = closest_points_on_mesh(verts[k], full, scan.faces)
            bd, bq = back.dist, back.closest
        else:
            bd, j = _Tree(trees[k], poses[k], cloud_n[k]).query(verts[k])
            bq = full[j]
        ve = bd.copy()
        ve[bd > max(3 * np.median(bd), 2.0)] = np.nan
        verr.append(ve)
        tverts.append(bq)
        if errors[-1] > 5.0:
            warnings.append(f"{scan.name}: the fit leaves a mean trimmed distance of {errors[-1]:.2f} mm to the "
                            "scan (alignment or coverage problem?)")
            log.warning(warnings[-1])
    secs = time.perf_counter() - t_start
    zi_np, ze_np = _codes_np(codes)
    res = FitResult(zi_np, ze_np, verts, np.asarray(errors), np.asarray(verr), poses, shared, info_total, secs,
                    {"rigid_init_s": t_rigid, "total_s": secs}, warnings, np.asarray(tverts))
    res.timings["correspondences"] = stats
    return res


def _spacing(scan: Scan, tree, rng: np.random.Generator, n: int = 500) -> float:
    """Typical point spacing of a scan (mm): the median distance of ``n`` random points to their
    nearest neighbour (point clouds) or the median edge length (meshes)."""
    if scan.faces is not None:
        f = scan.faces
        return float(np.median(np.linalg.norm(scan.points[f[:, 0]] - scan.points[f[:, 1]], axis=1)))
    idx = rng.choice(len(scan.points), min(n, len(scan.points)), replace=False)
    return float(np.median(tree.query(scan.points[idx], k=2)[0][:, 1]))


class _Tree:
    """A KD-tree of a point cloud queried in the model frame (the cloud moves with its pose)."""

    def __init__(self, tree, pose: Similarity, normals: np.ndarray):
        self.tree, self.pose, self.inv, self._normals = tree, pose, pose.inverse(), normals

    def query(self, pts):
        d, j = self.tree.query(self.inv.apply(pts))
        return d * self.pose.scale, j

    def normals(self, j):
        return self.pose.apply_vectors(self._normals[j])


class _CloudNormals:
    """Normals of a point cloud, given or estimated (:func:`cloud_normals`) only where asked for
    (a 2-million-point scan needs them at a few thousand points), and kept once estimated."""

    def __init__(self, points: np.ndarray, tree, given: np.ndarray | None = None):
        self.points, self.tree, self.given = points, tree, given
        if given is None:
            self.normals = np.zeros((len(points), 3))
            self.done = np.zeros(len(points), bool)

    def __getitem__(self, j: np.ndarray) -> np.ndarray:
        if self.given is not None:
            return self.given[j]
        todo = np.unique(j[~self.done[j]])
        if len(todo):
            self.normals[todo] = cloud_normals(self.points[todo], self.tree, reference=self.points)
            self.done[todo] = True
        return self.normals[j]


def cloud_normals(points: np.ndarray, tree, k: int = 12, reference: np.ndarray | None = None) -> np.ndarray:
    """Unoriented unit normals (P, 3) at ``points``: the smallest principal axis of their k nearest
    neighbours in ``reference`` (the cloud ``tree`` was built on; default ``points``)."""
    ref = points if reference is None else reference
    _, nb = tree.query(points, k=min(k, len(ref)))
    q = ref[nb] - ref[nb].mean(1, keepdims=True)  # (P, k, 3)
    _, vecs = np.linalg.eigh(np.einsum("pki,pkj->pij", q, q))
    return vecs[:, :, 0]


def _replace(cfg, **kw):
    import dataclasses

    names = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in kw.items() if k in names})


# ============================================================================ stage entry
def _read_landmarks(path, n_scans: int, scan_paths: list[str]) -> list[dict]:
    if path is None:
        return [{} for _ in range(n_scans)]
    from cm3dmm.io.atomic import read_json

    p = Path(path)
    data = read_json(p, "landmarks file")

    def one(d):
        if not isinstance(d, dict):
            raise InputError("landmarks must be a mapping name -> [x, y, z]", p)
        out = {}
        for k, v in d.items():
            a = np.asarray(v, dtype=np.float64) if isinstance(v, (list, tuple)) else None
            if a is None or a.shape != (3,) or not np.isfinite(a).all():
                raise InputError(f"landmark {k!r} is not a finite [x, y, z]", p)
            out[str(k)] = a
        return out

    if isinstance(data, list):
        if len(data) != n_scans:
            raise InputError(f"{len(data)} landmark sets for {n_scans} scans", p)
        return [one(d) for d in data]
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        names = [Path(s).name for s in scan_paths]
        out = []
        for s, n in zip(scan_paths, names):
            key = next((k for k in (s, n, n.split(".")[0]) if k in data), None)
            out.append(one(data[key]) if key is not None else {})
        return out
    if n_scans != 1:
        raise InputError("one landmark set given for several scans; give a list or a mapping per scan file", p)
    return [one(data)]


def _load_registered_scans(paths: list[str], model: FaceModel, units: str) -> np.ndarray:
    from cm3dmm.io.mesh import read_mesh

    out = []
    for p in paths:
        mesh = read_mesh(p)
        v = np.asarray(mesh.vertices, np.float64)
        if v.shape[0] != model.n_vertices:
            raise InputError(f"passed as registered, but the mesh has {v.shape[0]} vertices and the template "
                             f"{model.n_vertices}; fit it as a scan (without --registered)", p)
        if len(mesh.faces) and (mesh.faces.shape != model.faces.shape or
                                not np.array_equal(np.sort(mesh.faces, 1), np.sort(model.faces, 1))):
            raise InputError("passed as registered, but its triangles differ from the template's", p)
        if not np.isfinite(v).all():
            raise InputError("the mesh has NaN or infinite coordinates", p)
        factor, _ = resolve_units(v, units, p)
        out.append(v * factor)
    return np.stack(out)


def run_fit(cfg, method: str | None = None, subject: str | None = None, model: str | None = None,
            scan: list[str] | None = None, registered: bool | None = None, landmarks: str | None = None,
            units: str | None = None, out: str | None = None, landmark_set: str | None = None) -> dict:
    """The ``fit`` stage: fit one subject of the run's test split, or the user's own meshes.

    Writes ``out`` (default ``fits/{method}/{subject}.npz``) with ``.json`` and ``.png`` beside it,
    and, when ``out`` is given, one mesh per expression at ``cfg.fit.level``
    (``{out stem}.{expression}.obj``; scans: in the scan's frame and units). Returns the summary.
    """
    from cm3dmm.methods import load_method
    from cm3dmm.paths import RunPaths

    fc = cfg.fit
    expect = method or (None if model else "cm3dmm")  # --model alone: whatever method it holds
    method = method or "cm3dmm"
    paths = RunPaths.of(cfg.run_dir)
    torch.set_num_threads(max(1, int(getattr(cfg.train, "threads", 0) or torch.get_num_threads())))
    model_path = Path(model) if model else paths.model(method)
    template = None
    if method != "cm3dmm" and paths.template.exists():
        try:
            from cm3dmm.template import load_template

            template = load_template(paths.template)
        except ImportError:  # pragma: no cover - template module always present in releases
            template = None
    fm = load_method(model_path, template=template, expect=expect)
    if template is not None:  # the baselines' UVs for the written meshes (cm3dmm.export.template_of)
        fm.template = template
    n_levels = max(len(fm.levels), 1)
    if not 0 <= int(fc.level) < n_levels:  # checked before the fit, not when its meshes are written
        raise InputError(f"fit.level {fc.level} does not exist: the model's template has levels 0..{n_levels - 1}",
                         model_path)
    if landmark_set:  # landmark names on any template (cm3dmm.landmarks file format)
        from cm3dmm.landmarks import use_landmark_file

        use_landmark_file(fm, landmark_set)
    units = units or getattr(fc, "units", "auto")
    scan_list = list(scan or [])
    if scan_list:
        names = [Path(s).name.split(".")[0] for s in scan_list]
        subj = subject or names[0]
        if registered:
            targets = _load_registered_scans(scan_list, fm, units)
            result = fit_registered(fm, targets, fc)
            kind = "registered"
        else:
            lms = _read_landmarks(landmarks, len(scan_list), scan_list)
            from cm3dmm.landmarks import check_names

            check_names(lms, fm.landmarks, landmarks)
            scans = [read_scan(p, units, lm, landmarks) for p, lm in zip(scan_list, lms)]
            result = fit_scans(fm, scans, fc)
            kind = "scan"
        expressions = names
    else:
        if subject is None:
            raise InputError("give --subject (a test subject of the run) or --scan FILE")
        from cm3dmm.registered import read_registered

        data = read_registered(paths.registered, with_scans=False)
        idx = [i for i, s in enumerate(data.subject) if s == subject]
        if not idx:
            raise InputError(f"subject {subject!r} is not in the dataset (test subjects: "
                             f"{data.subjects('test')[:10]})", paths.registered)
        if data.n_vertices != fm.n_vertices:
            raise InputError(f"the dataset has {data.n_vertices} vertices per mesh, the {method} model "
                             f"{fm.n_vertices}: retrain the model for this dataset", model_path)
        targets = data.vertices[idx].astype(np.float64)
        expressions = [data.expression[i] for i in idx]
        subj = subject
        result = fit_registered(fm, targets, fc)
        kind = "registered"
    out_npz = Path(out) if out else paths.fit_npz(method, subj)
    if out_npz.suffix != ".npz":
        out_npz = out_npz.with_suffix(".npz")
    summary = write_fit(out_npz, result, fm, method, subj, expressions, kind, fc,
                        scans=None if kind != "scan" else scans, meshes=out is not None)
    return summary


def write_fit(out_npz: Path, result: FitResult, fm: FaceModel, method: str, subject: str,
              expressions: list[str], kind: str, fc, scans=None, meshes: bool = False) -> dict:
    """Write the ``.npz``, ``.json``, ``.png`` (and meshes) of a fit; everything atomically."""
    from cm3dmm.config import config_to_dict
    from cm3dmm.io.atomic import atomic_save_npz, atomic_write_json

    info = result.info
    b = len(expressions)
    if not np.isfinite(result.vertices).all():
        raise StageError(f"fit of {subject} produced non-finite vertices (objective {info.objective})")
    mats = np.stack([t.matrix() for t in result.transforms])
    summary = {
        "method": method, "subject": subject, "target": kind, "expressions": expressions,
        "mode": "per-subject" if result.shared_identity else "per-face",
        "optimizer": fc.optimizer,
        "errors_mm": {e: float(x) for e, x in zip(expressions, result.errors)},
        "mean_error_mm": float(np.mean(result.errors)),
        "error_definition": ("mean vertex distance to the registered target" if kind == "registered"
                             else f"mean distance of the scan points to the fit (worst {fc.trim:.0%} trimmed)"),
        "convergence": {"status": info.status, "converged": info.converged, "iterations": info.iterations,
                        "jacobians": info.jacobians, "evaluations": info.evaluations,
                        "objective": info.objective},
        "timings_s": {"total": result.seconds, "per_face": result.seconds / max(b, 1),
                      **{k: v for k, v in result.timings.items() if isinstance(v, float)}},
        "transforms": [t.to_dict() for t in result.transforms],
        "warnings": list(result.warnings),
        "fit_config": config_to_dict(fc),
    }
    if scans is not None:
        summary["scans"] = [{"path": s.path, "units": s.units, "points": int(len(s.points))} for s in scans]
    if not info.converged:
        if info.status == "max_iter":
            msg = (f"{subject}: the fit used its whole iteration budget ({info.iterations} iterations, "
                   f"fit.max_iter = {fc.max_iter}) before the relative change fell below fit.tol = {fc.tol:g}; "
                   "a larger fit.max_iter fits more tightly")
        else:
            msg = f"{subject}: the optimiser stopped with status {info.status!r} after {info.iterations} iterations"
        summary["warnings"].append(msg)
        log.warning(msg)
    atomic_save_npz(
        out_npz, z_id=result.z_id.astype(np.float32), z_exp=result.z_exp.astype(np.float32),
        vertices=result.vertices.astype(np.float32), errors=result.errors.astype(np.float32),
        vertex_errors=result.vertex_errors.astype(np.float32), transforms=mats,
        expressions=np.array(expressions), shared_identity=np.array(result.shared_identity),
        faces=np.asarray(fm.faces, np.int32), method=np.array(method), subject=np.array(subject),
        converged=np.array(info.converged), seconds=np.array(result.seconds))
    try:
        render_fit_png(out_npz.with_suffix(".png"), result, fm, expressions)
        summary["png"] = str(out_npz.with_suffix(".png"))
    except Exception as exc:  # noqa: BLE001 - a missing OpenGL must not lose the fit
        log.warning("could not render %s (%s)", out_npz.with_suffix(".png"), exc)
        summary["warnings"].append(f"no figure: {exc}")
    if meshes:
        from cm3dmm.export import write_fit_meshes  # with UVs (vt) and landmark positions

        summary["meshes"] = write_fit_meshes(out_npz, result, fm, expressions, fc.level, scans)
    atomic_write_json(out_npz.with_suffix(".json"), summary)
    return summary


def write_meshes(out_npz: Path, result: FitResult, fm: FaceModel, expressions: list[str], level: int,
                 scans=None) -> list[str]:
    """One OBJ per expression at upsampling ``level``; scans: in the scan's frame and units."""
    from cm3dmm.io.mesh import Mesh, write_mesh

    zi = torch.as_tensor(result.z_id, dtype=fm.dtype)
    ze = torch.as_tensor(result.z_exp, dtype=fm.dtype)
    verts, faces = fm.mesh(zi, ze, level)
    written = []
    for k, e in enumerate(expressions):
        v = verts[k]
        if scans is not None:
            v = result.transforms[k].inverse().apply(v) / UNIT_FACTORS[scans[k].units]
        p = out_npz.with_name(f"{out_npz.stem}.{e}.obj")
        write_mesh(p, Mesh(v, faces))
        written.append(str(p))
    return written


def render_fit_png(path: Path, result: FitResult, fm: FaceModel, expressions: list[str], max_rows: int = 4):
    """Rows: up to ``max_rows`` expressions; columns: target, fit, error heat map (mm)."""
    from cm3dmm.render import render_grid

    rows = list(range(min(len(expressions), max_rows)))
    tv = result.target_vertices
    fit = result.vertices[rows]
    tgt = tv[rows] if tv is not None else fit
    err = np.nan_to_num(result.vertex_errors[rows], nan=0.0)
    grid = np.stack([tgt, fit, fit], 1)
    sc = np.stack([np.full_like(err, np.nan), np.full_like(err, np.nan), err], 1)
    hi = float(np.quantile(err, 0.98)) if err.size else 1.0
    # the target/fit columns take the colour map's low end when scalars are NaN; draw them grey
    # by giving them a constant below the range
    sc = np.where(np.isnan(sc), -1.0, sc)
    render_grid(grid, fm.faces, path, row_labels=[expressions[r] for r in rows],
                col_labels=["target", "fit", "error (mm)"], scalars=sc, clim=(0.0, max(hi, 1e-3)),
                cmap="magma_r", scalar_label="vertex error (mm)")

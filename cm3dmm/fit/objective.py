"""The fitting objective: target points, the code layout and the energy with its normal equations.

    E = sum_b (1 / W_b) sum_k w_bk |r_bk|^2
        + prior_weight * ( sum_id |(z_id - mu_id) / s_id|^2 + sum_b |(z_exp,b - mu_exp) / s_exp|^2 )

with ``r_bk`` the residual of target point ``k`` of face ``b`` (point-to-point, or
point-to-plane when the target has normals) and ``W_b = sum_k w_bk``, i.e. a mean squared
distance (mm^2) per face plus a Gaussian code prior from the training codes' statistics.
Optional per-face rigid motions of the targets (scans) are unknowns beside the codes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from cm3dmm.methods import FaceModel

#: normal equations of registered targets: J^T W J formed in float64 (else in the Jacobian's float32,
#: converted to float64 for the solve)
NE_DOUBLE = False
#: values of Jacobian held at once (faces are processed in chunks below this)
JACOBIAN_BUDGET = 30_000_000


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


"""Solvers of the fitting objective (:mod:`cm3dmm.fit.objective`) for fixed targets.

Optimisers (``cfg.optimizer`` of a :class:`~cm3dmm.config.FitConfig`):

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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from cm3dmm.fit.objective import Codes, SolveInfo, Targets, _Problem, _predict, _residuals, _rodrigues
from cm3dmm.methods import FaceModel

if TYPE_CHECKING:
    from cm3dmm.config import FitConfig

#: the release's fitting protocol (SEED.md "Fitting")
RELEASE_LR = 3e-3
RELEASE_ITERS = 1000
#: mm: the "distance" loss is sqrt(|r|^2 + ROBUST_DELTA^2) - ROBUST_DELTA per point (smooth |r|)
ROBUST_DELTA = 0.05
#: alternating-least-squares sweeps that start the bilinear fit under the distance loss: the
#: Levenberg-Marquardt that follows converges from there (on an ICT subject, 2 sweeps end at the
#: same error as 30 in a seventh of the time)
ALS_WARM_START = 3


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


def solve_codes(model: FaceModel, targets: Targets, cfg: FitConfig, codes: Codes | None = None,
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
    delta = ROBUST_DELTA if cfg.loss == "distance" else None

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


def lm_stages(cfg: FitConfig, n_points: int) -> list[tuple[int, int]]:
    """The (points, max iterations) of the subset stages of ``lm`` (0 points = all of them)."""
    budget = max(int(cfg.max_iter), 1)
    pts = int(cfg.points)
    pts = 0 if pts <= 0 or pts >= n_points else pts
    cp = int(cfg.coarse_points)
    ci = int(cfg.coarse_iters)
    stages = []
    if cp > 0 and ci > 0 and cp < n_points and (pts == 0 or cp < pts) and budget > 1:
        stages.append((cp, min(ci, budget - 1)))
    stages.append((pts, budget))  # the rest of the budget (see solve_lm_staged)
    return stages


def solve_lm_staged(model: FaceModel, targets: Targets, cfg: FitConfig, codes: Codes, rng: np.random.Generator,
                    delta: float | None) -> tuple[Codes, SolveInfo]:
    """Levenberg-Marquardt on the stages of :func:`lm_stages`, then ``polish_iters`` on all points."""
    k = int(targets.points.shape[1])
    damping = float(cfg.damping)
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
    polish = int(cfg.polish_iters)
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


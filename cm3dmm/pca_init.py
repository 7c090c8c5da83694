"""Closed-form start of the continuous model's linear basis: the PCA of the training faces,
split into an identity block and an expression block (pure numpy).

The model's linear part ``B(uv) [z_id, z_exp]`` (``cm3dmm.model``, ``cfg.basis``) starts where PCA
ends instead of from noise:

1. PCA of the training faces (``cm3dmm.baselines.fit_pca``, the same PCA as the ``pca`` baseline):
   components ``P`` (d, V, 3), per-component std ``s`` and the faces' coefficients ``c`` (S, d),
   ``d = min(Di + De, rank)``.
2. Whitened coefficients ``w = c / s`` (unit variance per direction). In that space the
   within-subject covariance ``Sw`` (each face minus its subject's mean) has eigenvalues
   ``lambda`` in [0, 1]: the fraction of a direction's variance that is *within* a subject.
   Directions with small ``lambda`` are identity-like (they barely change with expression),
   large ``lambda`` expression-like.
3. The identity block gets up to ``Di`` directions of smallest ``lambda``, the expression block up
   to ``De`` of largest; directions left over fill the free slots of either block. Every one of the
   ``d`` directions is used once, so the two blocks together span exactly the PCA subspace: a fit
   with free codes per face reproduces the PCA fit at the template's vertices.
4. ``B = P^T diag(s) U`` (U the chosen eigenvectors), so codes are whitened: z_face = U^T w,
   unit variance per dimension. Identity codes of a subject = the mean of its faces' identity
   blocks; expression codes = each face's expression block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["BasisInit", "pca_basis_init"]


@dataclass
class BasisInit:
    """The closed-form start: basis (V, 3, Di + De), per-face codes, and what was chosen."""

    basis: np.ndarray  #: (V, 3, Di + De) mm per unit code; unused columns are zero
    z_id: np.ndarray  #: (S, Di) the identity block of every face's whitened PCA coefficients
    z_exp: np.ndarray  #: (S, De) the expression block
    within: np.ndarray  #: (Di + De,) within-subject variance fraction of each column (nan: unused)
    pca_dim: int  #: d, the PCA directions used (min(Di + De, rank))
    mean_offset: float  #: max |PCA mean - model mean| (mm): 0 when the template is the training mean


def _assign(lam: np.ndarray, di: int, de: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-directions sorted by ``lam`` ascending -> (id columns, exp columns) as direction ids."""
    order = np.argsort(lam, kind="stable")
    id_like = [int(i) for i in order if lam[i] < 0.5]
    exp_like = [int(i) for i in order[::-1] if lam[i] >= 0.5]
    ids, exps = id_like[:di], exp_like[:de]
    rest = sorted(set(range(len(lam))) - set(ids) - set(exps), key=lambda i: lam[i])
    while rest and len(ids) < di:
        ids.append(rest.pop(0))
    while rest and len(exps) < de:
        exps.append(rest.pop())
    return np.array(ids, np.int64), np.array(exps, np.int64)


def pca_basis_init(vertices: np.ndarray, faces: np.ndarray, mean: np.ndarray, subject_row: np.ndarray,
                   id_dim: int, exp_dim: int) -> BasisInit:
    """The closed-form start (module docstring).

    vertices: (S, V, 3) training faces (mm); mean: (V, 3) the model's average face; subject_row:
    (S,) int, which faces share an identity (the training code table's identity rows; all distinct
    for per-face identity codes).
    """
    from cm3dmm.baselines import fit_pca

    x = np.asarray(vertices, np.float64)
    s_rows = np.asarray(subject_row, np.int64)
    if x.ndim != 3 or x.shape[2] != 3 or len(s_rows) != len(x):
        raise ValueError(f"vertices (S, V, 3) and subject_row (S,) expected, got {x.shape}, {s_rows.shape}")
    di, de = int(id_dim), int(exp_dim)
    pca = fit_pca(x, faces, dim=di + de)
    d = pca.dim
    std = np.maximum(pca.std, 1e-12)
    w = pca.train_codes / std  # (S, d) whitened
    # within-subject covariance of the whitened coefficients, relative to the total (unit) variance
    n_rows = int(s_rows.max()) + 1
    sums = np.zeros((n_rows, d))
    np.add.at(sums, s_rows, w)
    counts = np.bincount(s_rows, minlength=n_rows).astype(np.float64)
    centred = w - (sums / np.maximum(counts, 1)[:, None])[s_rows]
    total = np.cov(w, rowvar=False).reshape(d, d) * (len(w) - 1)
    # generalised problem Sw u = lam St u; St is diagonal ~ (S - 1) I after whitening
    st = np.sqrt(np.maximum(np.diag(total), 1e-12))
    sw = (centred.T @ centred) / st[:, None] / st[None, :]
    lam, u = np.linalg.eigh(sw)
    lam = np.clip(lam, 0.0, 1.0)
    ids, exps = _assign(lam, di, de)
    z = w @ u  # (S, d) rotated whitened codes: unit variance per column
    basis = np.zeros((x.shape[1], 3, di + de))
    comps = np.einsum("kvc,k,kj->vcj", pca.components, std, u)  # (V, 3, d)
    basis[:, :, :len(ids)] = comps[:, :, ids]
    basis[:, :, di:di + len(exps)] = comps[:, :, exps]
    z_id = np.zeros((len(x), di))
    z_exp = np.zeros((len(x), de))
    z_id[:, :len(ids)] = z[:, ids]
    z_exp[:, :len(exps)] = z[:, exps]
    within = np.full(di + de, np.nan)
    within[:len(ids)] = lam[ids]
    within[di:di + len(exps)] = lam[exps]
    offset = float(np.abs(pca.mean - np.asarray(mean, np.float64)).max())
    return BasisInit(basis=basis, z_id=z_id, z_exp=z_exp, within=within, pca_dim=int(d), mean_offset=offset)

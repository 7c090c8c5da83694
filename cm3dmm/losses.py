"""Training losses of the continuous model (pure functions on tensors).

The release's objective (SEED.md, "Model"): the mean Euclidean distance between predicted and
target positions (mm) plus embedding regularisers on the auto-decoder's latent codes:

    total = distance
          + reg_weight   * (cos(id codes, identity labels) + cos(exp codes, expression labels))
          + prior_weight * (|mean of codes| + |std of codes - code_std|)

for the identity and the expression table alike. ``cos`` is a cosine-embedding loss over all
pairs of a batch: ``1 - cos(a, b)`` for pairs with the same label (pulled together),
``max(0, cos(a, b) - margin)`` for pairs with different labels (pushed apart).
Device and dtype follow the inputs.

:func:`paper_loss` is the release's objective exactly as its code computes it (SEED.md, "Model";
``train.preset: paper``): the cosine terms use **fixed pairs over the whole code tables**
(:func:`release_pairs`), evaluated every step, never pairs inside the batch; only the "same"
pairs count (the release gives its "different" pairs target 0, which ``F.cosine_embedding_loss``
ignores), so each cosine term is ``(mean over same pairs of (1 - cos) + 0) / 2``; the priors weigh
``reg_weight * 0.3`` (0.03).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "point_distance",
    "cosine_embedding_pairs",
    "code_mean_prior",
    "code_std_prior",
    "training_loss",
    "release_pairs",
    "pair_pull",
    "paper_loss",
]


def point_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean Euclidean distance between corresponding points.

    pred, target: (..., 3) in mm, same shape. Returns a scalar (mm).
    """
    if pred.shape != target.shape or pred.shape[-1] != 3:
        raise ValueError(f"pred and target must have the same shape (..., 3), got {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    return torch.linalg.vector_norm(pred - target, dim=-1).mean()


def cosine_embedding_pairs(codes: torch.Tensor, labels: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Cosine-embedding loss over all unordered pairs of a batch of codes.

    codes: (B, D); labels: (B,) integer (same label = same identity / expression).
    For each pair i < j: ``1 - cos`` when ``labels[i] == labels[j]``, else
    ``max(0, cos - margin)``; returns the mean over the B (B - 1) / 2 pairs (0 when B < 2).
    """
    if codes.ndim != 2:
        raise ValueError(f"codes must have shape (B, D), got {tuple(codes.shape)}")
    if labels.shape != codes.shape[:1]:
        raise ValueError(f"labels must have shape ({codes.shape[0]},), got {tuple(labels.shape)}")
    b = codes.shape[0]
    if b < 2:
        return codes.sum() * 0.0
    unit = F.normalize(codes, dim=1, eps=1e-12)
    cos = unit @ unit.T  # (B, B)
    i, j = torch.triu_indices(b, b, offset=1, device=codes.device)
    c = cos[i, j]
    same = labels[i] == labels[j]
    per_pair = torch.where(same, 1.0 - c, torch.clamp(c - margin, min=0.0))
    return per_pair.mean()


def code_mean_prior(codes: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of the mean code. codes: (N, D). Returns a scalar."""
    if codes.ndim != 2:
        raise ValueError(f"codes must have shape (N, D), got {tuple(codes.shape)}")
    return torch.linalg.vector_norm(codes.mean(dim=0))


def code_std_prior(codes: torch.Tensor, code_std: float) -> torch.Tensor:
    """Euclidean norm of (per-dimension population std of the codes - ``code_std``).

    codes: (N, D). Returns a scalar.
    """
    if codes.ndim != 2:
        raise ValueError(f"codes must have shape (N, D), got {tuple(codes.shape)}")
    std = codes.std(dim=0, unbiased=False) if codes.shape[0] > 1 else torch.zeros_like(codes[0])
    return torch.linalg.vector_norm(std - code_std)


def training_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    id_codes: torch.Tensor,
    exp_codes: torch.Tensor,
    id_labels: torch.Tensor,
    exp_labels: torch.Tensor,
    id_table: torch.Tensor,
    exp_table: torch.Tensor,
    reg_weight: float,
    prior_weight: float,
    code_std: float,
) -> dict[str, torch.Tensor]:
    """The release's objective, term by term.

    pred, target: (B, N, 3) mm; id_codes (B, Di), exp_codes (B, De): the batch's codes;
    id_labels, exp_labels: (B,) integer identity / expression labels of the batch's faces;
    id_table (Ti, Di), exp_table (Te, De): the whole code tables (for the mean / std priors).
    Returns a dict of scalars: ``distance`` (mm), ``id_cos``, ``exp_cos``, ``mean_prior``,
    ``std_prior`` and ``total`` (the weighted sum that is optimised).
    """
    distance = point_distance(pred, target)
    id_cos = cosine_embedding_pairs(id_codes, id_labels)
    exp_cos = cosine_embedding_pairs(exp_codes, exp_labels)
    mean_prior = code_mean_prior(id_table) + code_mean_prior(exp_table)
    std_prior = code_std_prior(id_table, code_std) + code_std_prior(exp_table, code_std)
    total = distance + reg_weight * (id_cos + exp_cos) + prior_weight * (mean_prior + std_prior)
    return {"total": total, "distance": distance, "id_cos": id_cos, "exp_cos": exp_cos,
            "mean_prior": mean_prior, "std_prior": std_prior}


# --------------------------------------------------------------------------- the release's objective
def _anchor_pairs(group: torch.Tensor, order: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(2, K) row pairs (anchor, member): within each ``group``, the member with the smallest
    ``order`` is the anchor, paired with every other member (pairs of a row with itself dropped)."""
    pairs = []
    for g in torch.unique(group):
        sel = torch.nonzero(group == g).flatten()
        anchor = rows[sel[torch.argmin(order[sel])]]
        members = torch.unique(rows[sel])
        members = members[members != anchor]
        pairs.append(torch.stack([anchor.expand(len(members)), members]))
    if not pairs:
        return torch.zeros(2, 0, dtype=torch.long)
    return torch.cat(pairs, 1)


def release_pairs(subject_label, expression_label, id_row, exp_row) -> dict[str, torch.Tensor]:
    """The release's fixed "same" pairs over the whole code tables, for :func:`paper_loss`.

    Inputs: (n,) integer arrays / tensors over the training faces: subject and expression labels and
    the faces' rows in the identity and expression tables. Returns ``{"id": (2, Ki), "exp": (2, Ke)}``
    long tensors of table rows:

    * identity: each subject's face of its first expression (label order; expression 0 in the
      release) paired with each of the subject's other faces;
    * expression: each expression's face of the first subject that has it (subject 0 in the
      release) paired with each other subject's face of that expression.

    Pairs of a row with itself (e.g. one identity row per subject) are dropped. The release's
    "different" pairs (all subjects at expression 0 / all expressions at subject 0) are not
    built: they are given target 0, which contributes nothing (see :func:`paper_loss`).
    """
    s, e, ir, er = (torch.as_tensor(x, dtype=torch.long) for x in (subject_label, expression_label, id_row, exp_row))
    if not (s.shape == e.shape == ir.shape == er.shape) or s.ndim != 1:
        raise ValueError("subject_label, expression_label, id_row and exp_row must be (n,) of one length")
    return {"id": _anchor_pairs(s, e, ir), "exp": _anchor_pairs(e, s, er)}


def pair_pull(table: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """The release's cosine term over fixed pairs: ``(mean_k (1 - cos(table[a_k], table[b_k])) + 0) / 2``.

    ``F.cosine_embedding_loss`` of the "same" pairs (target 1) and of the "different" pairs (target 0,
    counted by neither branch, so 0), averaged. table: (R, D); pairs: (2, K). 0 when K = 0.
    """
    if table.ndim != 2 or pairs.ndim != 2 or pairs.shape[0] != 2:
        raise ValueError(f"table (R, D) and pairs (2, K) expected, got {tuple(table.shape)}, {tuple(pairs.shape)}")
    if pairs.shape[1] == 0:
        return table.sum() * 0.0
    pairs = pairs.to(table.device)
    cos = F.cosine_similarity(table[pairs[0]], table[pairs[1]], dim=1, eps=1e-8)
    return ((1.0 - cos).mean() + 0.0) / 2.0


#: the release's prior factor inside its regulariser: reg_weight * (cos + 0.3 * priors)
RELEASE_PRIOR_FACTOR = 0.3


def paper_loss(pred: torch.Tensor, target: torch.Tensor, id_table: torch.Tensor, exp_table: torch.Tensor,
               pairs: dict[str, torch.Tensor], reg_weight: float = 0.1, prior_weight: float = 0.03,
               code_std: float = 0.01) -> dict[str, torch.Tensor]:
    """The release's objective (``train.preset: paper``), term by term.

    ``distance + reg_weight * (pull_id + pull_exp) + prior_weight * (mean priors + std priors)``
    with the pulls of :func:`pair_pull` over ``pairs`` (:func:`release_pairs`) on the whole tables
    and the priors of :func:`code_mean_prior` / :func:`code_std_prior` on the whole tables; the
    release's ``0.1 * (cos + 0.3 * prior)`` is ``reg_weight = 0.1``, ``prior_weight = 0.03``.
    Returns the same keys as :func:`training_loss`.
    """
    distance = point_distance(pred, target)
    id_cos = pair_pull(id_table, pairs["id"])
    exp_cos = pair_pull(exp_table, pairs["exp"])
    mean_prior = code_mean_prior(id_table) + code_mean_prior(exp_table)
    std_prior = code_std_prior(id_table, code_std) + code_std_prior(exp_table, code_std)
    total = distance + reg_weight * (id_cos + exp_cos) + prior_weight * (mean_prior + std_prior)
    return {"total": total, "distance": distance, "id_cos": id_cos, "exp_cos": exp_cos,
            "mean_prior": mean_prior, "std_prior": std_prior}

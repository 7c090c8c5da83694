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

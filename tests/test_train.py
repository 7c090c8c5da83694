"""Losses (numbers by hand), batch order, training smoke / convergence, NaN guard, resume after
SIGKILL, DDP with 2 processes."""

import math

import numpy as np
import pytest
import torch

from cm3dmm.losses import (code_mean_prior, code_std_prior, cosine_embedding_pairs, point_distance,
                           training_loss)


# ------------------------------------------------------------------------------------ losses
def test_point_distance_by_hand():
    pred = torch.tensor([[[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]]])
    assert float(point_distance(pred, torch.zeros_like(pred))) == pytest.approx(2.5)
    with pytest.raises(ValueError):
        point_distance(pred, torch.zeros(1, 3, 3))


def test_cosine_embedding_pairs_by_hand():
    codes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    # pairs: (0,1) same, cos 0 -> 1; (0,2), (1,2) different, cos 1/sqrt2 -> 0.7071 each
    assert float(cosine_embedding_pairs(codes, labels)) == pytest.approx((1 + 2 / math.sqrt(2)) / 3, abs=1e-6)
    # margin 0.5: different pairs give cos - 0.5
    assert float(cosine_embedding_pairs(codes, labels, margin=0.5)) == pytest.approx(
        (1 + 2 * (1 / math.sqrt(2) - 0.5)) / 3, abs=1e-6)
    # identical codes of one label and orthogonal codes of different labels cost nothing
    codes2 = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    assert float(cosine_embedding_pairs(codes2, labels)) == pytest.approx(0.0, abs=1e-7)
    # a single code has no pairs
    assert float(cosine_embedding_pairs(codes[:1], labels[:1])) == 0.0


def test_code_priors_by_hand():
    codes = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert float(code_mean_prior(codes)) == pytest.approx(math.sqrt(13), abs=1e-6)  # |(2, 3)|
    # population std (1, 1): |(1 - 0.01, 1 - 0.01)| = 0.99 sqrt 2
    assert float(code_std_prior(codes, 0.01)) == pytest.approx(0.99 * math.sqrt(2), abs=1e-6)


def test_training_loss_weights_terms():
    pred = torch.tensor([[[0.0, 0.0, 2.0]]])
    target = torch.zeros_like(pred)
    ids = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    exps = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    t = training_loss(pred, target, ids, exps, torch.tensor([0, 0]), torch.tensor([0, 1]),
                      id_table=ids, exp_table=exps, reg_weight=0.1, prior_weight=0.3, code_std=0.0)
    assert float(t["distance"]) == pytest.approx(2.0)
    assert float(t["id_cos"]) == pytest.approx(1.0)  # same subject, orthogonal codes
    assert float(t["exp_cos"]) == pytest.approx(1.0)  # different expressions, identical codes
    mean = math.sqrt(0.5) + 1.0  # |(0.5, 0.5)| + |(1, 0)|
    std = math.sqrt(0.5) + 0.0  # |(0.5, 0.5)| + |(0, 0)|
    assert float(t["mean_prior"]) == pytest.approx(mean, abs=1e-6)
    assert float(t["std_prior"]) == pytest.approx(std, abs=1e-6)
    assert float(t["total"]) == pytest.approx(2.0 + 0.1 * 2.0 + 0.3 * (mean + std), abs=1e-6)

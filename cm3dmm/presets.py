"""Named presets for ``train.preset``: partial configs merged under a file's own keys."""

from __future__ import annotations

#: The release configuration (SEED.md, "Model" and "Training"), exactly as its code trains it: the
#: release's hash grid (seed-compatible, defects included), its objective (cm3dmm.losses.paper_loss:
#: fixed code pairs, priors weighing 0.1 * 0.3 = 0.03), one constant lr 1e-3 for every parameter
#: (its milestones are never reached) and PyTorch's default initialisation. The differences kept on
#: purpose are listed in docs/paper-preset.md.
PAPER = {
    "model": {
        "id_dim": 128,
        "exp_dim": 128,
        "basis": False,  # the release's plain DeepSDF field: no linear basis inside it
        "interpolation": "linear",  # avg(uv) by barycentric interpolation, as the release
        "encoder": {"backend": "seed-compatible", "n_levels": 16, "n_features": 32, "base_resolution": 4,
                    "finest_resolution": 128, "log2_table_size": 15},
        "decoder": {"widths": [512, 256, 256, 128, 32], "activation_scale": 3.0, "output_scale": 3.0,
                    "weight_norm": True, "uv_skip": True},
    },
    "train": {"batch_faces": 20, "vertex_points": 10000, "continuous_points": 5000, "lr": 1e-3,
              "code_lr": 1e-3, "lr_milestones": [], "reg_weight": 0.1, "prior_weight": 0.03, "code_std": 0.01,
              "code_mode": "per-face", "continuous": "scan"},
}

#: The CPU default (chosen by measurement, see benchmarks/README.md, "The continuous model").
CPU = {
    "model": {
        "id_dim": 64,
        "exp_dim": 64,
        # f(uv, z) = B(uv) z + r(uv, z): a linear basis started from the PCA of the training faces,
        # interpolated smoothly between vertices, plus a small nonlinear residual network
        "basis": True,
        "interpolation": "smooth",
        "smoothness": 0.5,
        "encoder": {"backend": "dense", "n_levels": 8, "n_features": 4, "base_resolution": 4,
                    "finest_resolution": 128},
        "decoder": {"widths": [256, 128, 64]},
    },
    # The basis stays at its PCA start (basis_lr 0: moving it fits the training faces more closely and
    # generalises no better); the residual learns what PCA at this size misses. Many faces with few
    # points per step; per-face codes (the training objective is the per-face fit's); whitened codes
    # (unit variance, from the PCA start), so no code priors or embedding losses; vertex samples only
    # (registered meshes carry no information between their vertices, and barycentric targets there
    # would teach piecewise-linear faces).
    "train": {"batch_faces": 64, "vertex_points": 300, "continuous_points": 0, "lr": 1e-3,
              "code_lr": 1e-3, "basis_lr": 0.0, "code_std": 1.0, "reg_weight": 0.0, "prior_weight": 0.0,
              "code_mode": "per-face"},
}

PRESETS = {"paper": PAPER, "cpu": CPU}

"""Networks of the continuous model: UV encoders and the DeepSDF-like decoder.

``make_encoder(cfg.model.encoder)`` builds a :class:`UVEncoder` (``uv (..., 2) -> (..., out_dim)``;
``encoder.backend`` names the backend it implements, what a model file records);
:class:`TcnnLayoutEncoder` evaluates a ``tcnn`` model's weights without tiny-cuda-nn;
``Decoder(cfg.model.decoder, code_dim, encoder.out_dim)`` maps ``(codes, uv features)`` to a 3-D
displacement. The decoder holds no latent codes (training and fitting own them).
"""

from cm3dmm.nn.decoder import Decoder
from cm3dmm.nn.encoders import (
    DenseGridEncoder,
    GridTableEncoder,
    TcnnEncoder,
    TcnnLayoutEncoder,
    UVEncoder,
    hash_grid_encoder,
    make_encoder,
    ngp_resolutions,
    seed_compatible_encoder,
    seed_resolutions,
    tcnn_available,
    tcnn_levels,
)

__all__ = [
    "Decoder",
    "DenseGridEncoder",
    "GridTableEncoder",
    "TcnnEncoder",
    "TcnnLayoutEncoder",
    "UVEncoder",
    "hash_grid_encoder",
    "make_encoder",
    "ngp_resolutions",
    "seed_compatible_encoder",
    "seed_resolutions",
    "tcnn_available",
    "tcnn_levels",
]

"""The ``seed-compatible`` encoder against the release's formula, and tiny-cuda-nn's layout in torch.

The references below are written out independently, per point and per level, from SEED.md
("Known defects": level resolutions, table sizes, the hash of every level, corner positions) and
from tiny-cuda-nn's grid encoding (grid_scale / grid_resolution / grid_index, linear interpolation).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cm3dmm.config import EncoderConfig
from cm3dmm.errors import InputError
from cm3dmm.nn import make_encoder
from cm3dmm.nn.encoders import TcnnLayoutEncoder

torch.set_num_threads(1)
U32 = 0xFFFFFFFF
PRIME = 2654435761


def release_resolutions(levels: int, base: int, finest: int) -> list[int]:
    # the release: b = exp((log N_max - log N_min) / (N_min - 1)), res_l = floor(N_min * b ** l)
    b = math.exp((math.log(finest) - math.log(base)) / (base - 1))
    return [int(math.floor(base * b**l)) for l in range(levels)]


def release_row(i: int, j: int, res: int, log2_t: int) -> int:
    return (((i * 1) & U32) ^ ((j * PRIME) & U32)) % min(res * res, 2**log2_t)


def release_encode(tables: list[np.ndarray], res: list[int], log2_t: int, uv: np.ndarray) -> np.ndarray:
    """Per point, per level: x * res in float32, corner floor and +1, bilinear, hashed rows."""
    out = []
    for p in range(len(uv)):
        feats = []
        for lvl, r in enumerate(res):
            x = np.float32(uv[p, 0]) * np.float32(r)
            y = np.float32(uv[p, 1]) * np.float32(r)
            i, j = int(np.floor(x)), int(np.floor(y))
            tx, ty = np.float64(x - np.float32(i)), np.float64(y - np.float32(j))
            t = tables[lvl].astype(np.float64)
            f = ((1 - tx) * (1 - ty) * t[release_row(i, j, r, log2_t)]
                 + tx * (1 - ty) * t[release_row(i + 1, j, r, log2_t)]
                 + (1 - tx) * ty * t[release_row(i, j + 1, r, log2_t)]
                 + tx * ty * t[release_row(i + 1, j + 1, r, log2_t)])
            feats.append(f)
        out.append(np.concatenate(feats))
    return np.array(out)


def test_seed_compatible_is_the_release_encoder():
    cfg = EncoderConfig(backend="seed-compatible", n_levels=16, n_features=4, base_resolution=4,
                        finest_resolution=128, log2_table_size=15)
    enc = make_encoder(cfg)
    res = release_resolutions(16, 4, 128)
    assert enc.level_resolutions == res
    assert res[:5] == [4, 12, 40, 127, 406] and res[-1] == 134217727
    assert enc.table_sizes == [min(r * r, 2**15) for r in res]
    assert enc.table_sizes[:5] == [16, 144, 1600, 16129, 32768]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        enc.table.copy_(torch.randn(enc.table.shape, generator=g))
    uv = torch.rand(64, 2, generator=g)  # float32, as the release feeds it
    uv = torch.cat([uv, torch.tensor([[0.0, 0.0], [0.25, 0.25], [0.999, 0.5]])])
    tables = [enc.level_table(lvl).detach().numpy() for lvl in range(16)]
    want = release_encode(tables, res, 15, uv.numpy())
    got = enc(uv).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)


def test_release_corner_placement_counts():
    """Where the release puts the corners of its four informative levels: only 5/25, 13/169,
    41/1681, 128/16384 land on the rows a dense res^2 table (wrap-around) would use, and at
    resolution 4 only 8 of 16 rows are used, every diagonal corner on row 0."""
    res = release_resolutions(16, 4, 128)[:4]
    same = []
    for r in res:
        n = 0
        for i in range(r + 1):
            for j in range(r + 1):
                n += release_row(i, j, r, 15) == (i + j * r) % (r * r)
        same.append((n, (r + 1) ** 2))
    assert same == [(5, 25), (13, 169), (41, 1681), (128, 16384)]
    rows4 = {release_row(i, j, 4, 15) for i in range(5) for j in range(5)}
    assert len(rows4) == 8
    assert all(release_row(i, i, 4, 15) == 0 for i in range(5))
    # and the encoder reads exactly those rows: a table that is 1 on row 0 only
    enc = make_encoder(EncoderConfig(backend="seed-compatible", n_levels=1, n_features=1, base_resolution=4,
                                     finest_resolution=128, log2_table_size=15))
    with torch.no_grad():
        enc.table.zero_()
        enc.table[0] = 1.0
    diag = torch.tensor([[k / 4, k / 4] for k in range(5)], dtype=torch.float32)
    assert torch.equal(enc(diag)[:, 0], torch.ones(5))
    off = torch.tensor([[0.25, 0.0]])  # corner (1, 0) -> row 1
    assert float(enc(off).detach()[0, 0]) == 0.0


# --------------------------------------------------------------------------- tiny-cuda-nn layout
def tcnn_reference(params: np.ndarray, n_levels: int, n_features: int, base: int, finest: int,
                   log2_t: int, uv: np.ndarray) -> np.ndarray:
    """tiny-cuda-nn's HashGrid forward (2-D, linear), written out from its source."""
    per_level_scale = math.exp((math.log(finest) - math.log(base)) / (n_levels - 1))
    log2_pls = np.float32(np.log2(np.float32(per_level_scale)))
    t = 2**log2_t
    offset, levels = 0, []
    for lvl in range(n_levels):
        scale = np.float32(np.exp2(np.float32(lvl) * log2_pls)) * np.float32(base) - np.float32(1)
        resolution = int(np.ceil(scale)) + 1
        n_params = ((resolution * resolution + 7) // 8) * 8
        size = min(n_params, t)
        levels.append((scale, resolution, size, offset))
        offset += size
    assert offset * n_features == params.size
    grid = params.reshape(-1, n_features).astype(np.float64)
    out = np.zeros((len(uv), n_levels * n_features))
    for p in range(len(uv)):
        for lvl, (scale, resolution, size, off) in enumerate(levels):
            pos = [np.float32(np.float64(scale) * np.float64(np.float32(uv[p, d])) + 0.5) for d in range(2)]
            cell = [int(np.floor(x)) for x in pos]
            frac = [np.float64(pos[d]) - cell[d] for d in range(2)]
            acc = np.zeros(n_features)
            for idx in range(4):
                ci, cj, w = cell[0], cell[1], 1.0
                for d in range(2):
                    if idx & (1 << d):
                        w *= frac[d]
                        if d == 0:
                            ci += 1
                        else:
                            cj += 1
                    else:
                        w *= 1 - frac[d]
                # grid_index: dense while the stride fits the level's table, else hashed
                stride, index = 1, 0
                for d, c in enumerate((ci, cj)):
                    if stride > size:
                        break
                    index += c * stride
                    stride *= resolution
                if size < stride:
                    index = ((ci * 1) & U32) ^ ((cj * PRIME) & U32)
                acc += w * grid[off + index % size]
            out[p, lvl * n_features:(lvl + 1) * n_features] = acc
    return out


def test_tcnn_layout_matches_tiny_cuda_nn_formula():
    # levels 2 .. 24 over 5 levels, table 2^7: the coarse levels dense, the fine ones hashed
    args = dict(n_levels=5, n_features=2, base_resolution=2, finest_resolution=24, log2_table_size=7)
    enc = TcnnLayoutEncoder(**args)
    assert enc.backend == "tcnn"
    g = torch.Generator().manual_seed(1)
    params = torch.randn(enc.enc.params.numel(), generator=g).half()  # tiny-cuda-nn may store fp16
    enc.load_state_dict({"enc.params": params})
    uv = torch.rand(50, 2, generator=g)
    want = tcnn_reference(params.float().numpy(), args["n_levels"], args["n_features"], args["base_resolution"],
                          args["finest_resolution"], args["log2_table_size"], uv.numpy())
    got = enc(uv).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert any(r * r > s for r, s in zip(enc.level_resolutions, enc.table_sizes))  # some hashed
    assert any(r * r <= s for r, s in zip(enc.level_resolutions, enc.table_sizes))  # some dense


def test_tcnn_layout_refuses_another_layout_in_one_line():
    enc = TcnnLayoutEncoder(3, 2, 2, 12, 6)
    with pytest.raises(InputError, match="does not map onto the pure-torch one"):
        enc.load_state_dict({"enc.params": torch.zeros(enc.enc.params.numel() + 8)})


def test_tcnn_backend_on_cpu_is_refused_but_loads_as_tcnn_torch():
    cfg = EncoderConfig(backend="tcnn", n_levels=3, n_features=2, base_resolution=2, finest_resolution=12,
                        log2_table_size=6)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="cannot run here"):
            make_encoder(cfg, "cpu")
    from dataclasses import replace

    enc = make_encoder(replace(cfg, backend="tcnn-torch"))
    assert isinstance(enc, TcnnLayoutEncoder) and enc.backend == "tcnn"


# --------------------------------------------------------------------------- model files
def _tiny_template():
    from cm3dmm.template import build_template
    from conftest import make_registered

    d = make_registered(grid=5)
    t, _ = build_template(d.vertices.mean(0), d.faces, d.uv, levels=1, mask_resolution=16)
    return t


def _model(template, backend):
    from cm3dmm.config import DecoderConfig, ModelConfig
    from cm3dmm.model import ContinuousModel

    cfg = ModelConfig(id_dim=3, exp_dim=2, decoder=DecoderConfig(widths=[8]),
                      encoder=EncoderConfig(backend=backend, n_levels=3, n_features=2, base_resolution=2,
                                            finest_resolution=12, log2_table_size=6))
    m = ContinuousModel(template, cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m.eval()


def test_model_file_records_the_backend_used_and_tcnn_loads_on_cpu(tmp_path):
    from cm3dmm.model import load_model, read_model_file, save_model

    t = _tiny_template()
    auto = _model(t, "auto")  # no tiny-cuda-nn here: auto -> dense, and the file says dense
    save_model(tmp_path / "auto.pt", auto)
    assert read_model_file(tmp_path / "auto.pt")["model_config"]["encoder"]["backend"] == "dense"
    # a tcnn model: its weights are tiny-cuda-nn's flat encoder.enc.params (built here in that layout)
    tc = _model(t, "tcnn-torch")
    save_model(tmp_path / "tcnn.pt", tc)
    payload = read_model_file(tmp_path / "tcnn.pt")
    assert payload["model_config"]["encoder"]["backend"] == "tcnn"
    assert payload["state_dict"]["encoder.enc.params"].ndim == 1
    loaded, _ = load_model(tmp_path / "tcnn.pt")
    assert isinstance(loaded.encoder, TcnnLayoutEncoder)
    uv = torch.rand(20, 2, generator=torch.Generator().manual_seed(2))
    z = torch.randn(2, 3), torch.randn(2, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.deformation(uv, *z), tc.deformation(uv, *z))
    # an old file that says "auto" but holds tiny-cuda-nn's weights loads as tcnn too
    payload["model_config"]["encoder"]["backend"] = "auto"
    torch.save(payload, tmp_path / "old.pt")
    assert isinstance(load_model(tmp_path / "old.pt")[0].encoder, TcnnLayoutEncoder)
    # a tiny-cuda-nn layout that does not map: one line naming the file
    payload["model_config"]["encoder"]["backend"] = "tcnn"
    payload["state_dict"]["encoder.enc.params"] = torch.zeros(7)
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(InputError, match="other.pt.*does not map onto the pure-torch one"):
        load_model(tmp_path / "other.pt")

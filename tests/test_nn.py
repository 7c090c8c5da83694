"""UV encoders and decoder against naive references (cm3dmm.nn)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jacrev, vmap

from cm3dmm.config import DecoderConfig, EncoderConfig
from cm3dmm.errors import InputError
from cm3dmm.nn import Decoder, make_encoder, ngp_resolutions, seed_resolutions
from cm3dmm.nn import encoders as enc_mod

torch.set_num_threads(1)

# small configurations mixing every indexing mode:
#   hash: 2 .. 40 over 6 levels, table 2^8 -> levels with (res+1)^2 <= 256 dense, the rest hashed
#   seed-compatible: base 3 / finest 30 -> 3, 9, 30, 94, 300: every level hashed into min(res^2, 2^8) rows
#   dense: 2 .. 20 with table 2^6 -> capped at 7 cells per side (equal levels grouped)
SMALL = {
    "hash": EncoderConfig(backend="hash", n_levels=6, n_features=3, base_resolution=2, finest_resolution=40,
                          log2_table_size=8),
    "seed-compatible": EncoderConfig(backend="seed-compatible", n_levels=5, n_features=3, base_resolution=3,
                                     finest_resolution=30, log2_table_size=8),
    "dense": EncoderConfig(backend="dense", n_levels=6, n_features=3, base_resolution=2, finest_resolution=20,
                           log2_table_size=6),
}


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def _uv(n: int, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    uv = torch.rand(n, 2, generator=g, dtype=dtype)
    extra = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.5, 1.0], [-0.2, 0.3], [1.3, 0.7]],
                         dtype=dtype)
    return torch.cat([uv, extra])


def _row(backend: str, enc, level: int, i: int, j: int) -> int:
    """Table row of corner (i, j), written out by hand per backend."""
    res, size = enc.level_resolutions[level], enc.table_sizes[level]
    if backend == "dense" or (backend == "hash" and (res + 1) ** 2 <= size):
        assert size == (res + 1) ** 2
        return i + j * (res + 1)
    if backend == "seed-compatible":
        assert size == min(res * res, 2**SMALL[backend].log2_table_size)
    return (((i * 1) & 0xFFFFFFFF) ^ ((j * 2654435761) & 0xFFFFFFFF)) % size


def naive_encode(backend: str, enc, uv: torch.Tensor) -> torch.Tensor:
    """Per point, per level: clamp, find the cell, bilinear weights, four table rows."""
    out = torch.zeros(uv.shape[0], enc.out_dim, dtype=uv.dtype)
    for p in range(uv.shape[0]):
        u = min(max(float(uv[p, 0]), 0.0), 1.0)
        v = min(max(float(uv[p, 1]), 0.0), 1.0)
        for lvl, res in enumerate(enc.level_resolutions):
            table = enc.level_table(lvl).detach()
            x, y = u * res, v * res
            i, j = min(math.floor(x), res - 1), min(math.floor(y), res - 1)
            tx, ty = x - i, y - j
            f = ((1 - tx) * (1 - ty) * table[_row(backend, enc, lvl, i, j)]
                 + tx * (1 - ty) * table[_row(backend, enc, lvl, i + 1, j)]
                 + (1 - tx) * ty * table[_row(backend, enc, lvl, i, j + 1)]
                 + tx * ty * table[_row(backend, enc, lvl, i + 1, j + 1)])
            out[p, lvl * enc.n_features:(lvl + 1) * enc.n_features] = f
    return out


# --------------------------------------------------------------------------- encoders
@pytest.mark.parametrize("backend", list(SMALL))
def test_encoder_matches_naive_reference(backend):
    enc = make_encoder(SMALL[backend]).double()
    _randomise(enc)
    uv = _uv(40)
    got = enc(uv)
    assert got.shape == (uv.shape[0], SMALL[backend].n_levels * SMALL[backend].n_features)
    torch.testing.assert_close(got, naive_encode(backend, enc, uv), rtol=0, atol=1e-12)
    # leading dimensions pass through
    torch.testing.assert_close(enc(uv[:40].reshape(4, 10, 2)), got[:40].reshape(4, 10, -1))


def test_small_configs_cover_every_mode():
    h = make_encoder(SMALL["hash"])
    assert h.level_modes == ["dense", "dense", "dense", "dense", "hash", "hash"]
    assert h.level_resolutions == [2, 3, 6, 12, 21, 40]
    s = make_encoder(SMALL["seed-compatible"])
    assert s.level_resolutions == [3, 9, 30, 94, 300]  # b = 10^(1/2): growth over base - 1 = 2 steps
    assert s.level_modes == ["hash"] * 5  # the release hashes every level, the coarse ones too
    assert s.table_sizes == [9, 81, 256, 256, 256]
    d = make_encoder(SMALL["dense"])
    assert d.level_resolutions == [2, 3, 5, 7, 7, 7]  # 8, 12, 20 capped at sqrt(64) - 1
    assert len(d.grids) == 4  # the three capped levels share one grid_sample call


#: fewer table rows than SMALL (gradcheck perturbs each one), still every indexing mode
TINY = {
    "hash": EncoderConfig(backend="hash", n_levels=3, n_features=2, base_resolution=2, finest_resolution=12,
                          log2_table_size=5),  # 2, 4 dense; 12 hashed into 32 rows
    "seed-compatible": EncoderConfig(backend="seed-compatible", n_levels=3, n_features=2, base_resolution=3,
                                     finest_resolution=30, log2_table_size=6),  # 3, 9, 30 hashed
    "dense": SMALL["dense"],
}


@pytest.mark.parametrize("backend", list(TINY))
def test_encoder_gradcheck(backend):
    enc = make_encoder(TINY[backend]).double()
    assert len(set(getattr(enc, "level_modes", ["dense"]))) == (2 if backend == "hash" else 1)
    _randomise(enc)
    names = [n for n, _ in enc.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in enc.parameters())
    uv = (torch.rand(6, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 0.9 + 0.05)
    uv.requires_grad_(True)

    def f(uv, *ps):
        return functional_call(enc, dict(zip(names, ps)), (uv,))

    assert torch.autograd.gradcheck(f, (uv, *params), eps=1e-6, atol=1e-7)


def test_release_level_resolutions():
    hash_ = make_encoder(EncoderConfig(backend="hash", n_levels=16, n_features=2, base_resolution=4,
                                       finest_resolution=128, log2_table_size=15))
    assert hash_.level_resolutions == [4, 5, 6, 8, 10, 12, 16, 20, 25, 32, 40, 50, 64, 80, 101, 128]
    assert hash_.level_modes == ["dense"] * 16  # (128 + 1)^2 = 16641 <= 2^15: collision-free
    assert hash_.table_sizes[-1] == 129**2
    seed = make_encoder(EncoderConfig(backend="seed-compatible", n_levels=16, n_features=2, base_resolution=4,
                                      finest_resolution=128, log2_table_size=15))
    assert seed.level_resolutions[:6] == [4, 12, 40, 127, 406, 1290]
    assert seed.level_resolutions[-1] == 134217727  # ~1.3e8
    assert seed.table_sizes[:5] == [16, 144, 1600, 16129, 2**15]
    assert seed.level_modes == ["hash"] * 16
    assert seed_resolutions(16, 4, 128) == seed.level_resolutions
    assert ngp_resolutions(1, 7, 9) == [7]
    assert ngp_resolutions(3, 16, 256) == [16, 64, 256]


def test_seed_hash_aliases_diagonal_corners():
    enc = make_encoder(SMALL["seed-compatible"]).double()
    _randomise(enc)
    r = enc.level_resolutions[0]  # 3: 9 rows, 2654435761 = 2 (mod 9)
    # the release hashes even the coarsest level: every diagonal corner (i, i) of a power-of-two
    # table lands on row 0; here (i, j) -> (i xor 2654435761 j) mod 9, so (1, 0) and (0, 0) differ
    at = lambda u, v: enc(torch.tensor([[u, v]], dtype=torch.float64))[0, :enc.n_features]  # noqa: E731
    row = lambda i, j: ((i & 0xFFFFFFFF) ^ ((j * 2654435761) & 0xFFFFFFFF)) % (r * r)  # noqa: E731
    for i in range(r + 1):
        for j in range(r + 1):
            torch.testing.assert_close(at(i / r, j / r), enc.level_table(0)[row(i, j)])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_dense_hits_corners_exactly(dtype, tol):
    enc = make_encoder(SMALL["dense"]).to(dtype)
    _randomise(enc)
    for lvl, res in enumerate(enc.level_resolutions):
        ii, jj = torch.meshgrid(torch.arange(res + 1), torch.arange(res + 1), indexing="xy")
        uv = torch.stack([ii.reshape(-1).to(dtype) / res, jj.reshape(-1).to(dtype) / res], -1)
        feats = enc(uv)[:, lvl * enc.n_features:(lvl + 1) * enc.n_features]
        expect = enc.level_table(lvl).detach()[ii.reshape(-1) + jj.reshape(-1) * (res + 1)]
        torch.testing.assert_close(feats, expect, rtol=0, atol=tol)


def test_dense_and_hash_agree_when_collision_free():
    cfg = dict(n_levels=4, n_features=2, base_resolution=3, finest_resolution=24, log2_table_size=10)
    dense = make_encoder(EncoderConfig(backend="dense", **cfg)).double()
    hashg = make_encoder(EncoderConfig(backend="hash", **cfg)).double()
    assert dense.level_resolutions == hashg.level_resolutions and hashg.level_modes == ["dense"] * 4
    _randomise(hashg)
    with torch.no_grad():
        for lvl in range(4):
            dense.level_table(lvl)  # view check below
            r = dense.level_resolutions[lvl]
            dense.grids[lvl][0].copy_(hashg.level_table(lvl).reshape(r + 1, r + 1, 2).permute(2, 0, 1))
    uv = _uv(50)
    torch.testing.assert_close(dense(uv), hashg(uv), rtol=0, atol=1e-12)


def test_hash_init_range_and_validation():
    enc = make_encoder(EncoderConfig(backend="hash", n_levels=3, n_features=2, base_resolution=4,
                                     finest_resolution=64, log2_table_size=10))
    t = enc.table.detach()
    assert t.abs().max() <= 1e-4 and t.std() > 3e-5
    with pytest.raises(ValueError):
        enc(torch.rand(5, 3))
    with pytest.raises(InputError):
        make_encoder(EncoderConfig(backend="hash", base_resolution=64, finest_resolution=4))


def test_tcnn_unavailable_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(enc_mod, "_import_tcnn", lambda: None)
    with pytest.raises(InputError, match="install tiny-cuda-nn's torch bindings yourself"):
        make_encoder(EncoderConfig(backend="tcnn"))
    assert isinstance(make_encoder(EncoderConfig(backend="auto")), enc_mod.DenseGridEncoder)
    # importable but asked for on the CPU: CUDA only
    monkeypatch.setattr(enc_mod, "_import_tcnn", lambda: object())
    with pytest.raises(InputError, match="CUDA only"):
        make_encoder(EncoderConfig(backend="tcnn"), device="cpu")
    assert isinstance(make_encoder(EncoderConfig(backend="auto"), device="cpu"), enc_mod.DenseGridEncoder)


# --------------------------------------------------------------------------- decoder
def _decoder(seed=0, **kw) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(**{"widths": [16, 12, 8], "activation_scale": 3.0, "output_scale": 3.0, **kw})
    dec = Decoder(cfg, code_dim=5, uv_dim=4).double()
    _randomise(dec, seed)  # large random weights: every term matters
    return dec


def naive_decode(dec: Decoder, codes, feats, k, scale, uv_skip):
    """Concatenate inputs, layer by layer, with the effective (weight-normed) weights."""
    h = torch.cat([codes, feats], -1)
    for i, layer in enumerate(dec.hidden):
        if i > 0 and uv_skip:
            h = torch.cat([h, feats], -1)
        h = torch.tanh(k * (h @ layer.weight.T + layer.bias))
    return (h @ dec.out.weight.T + dec.out.bias) * scale


@pytest.mark.parametrize("uv_skip,wn", [(True, True), (False, True), (True, False)])
def test_decoder_matches_naive(uv_skip, wn):
    dec = _decoder(uv_skip=uv_skip, weight_norm=wn, activation_scale=2.0, output_scale=1.5)
    g = torch.Generator().manual_seed(5)
    codes, feats = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g,
                                                                                       dtype=torch.float64)
    torch.testing.assert_close(dec(codes, feats), naive_decode(dec, codes, feats, 2.0, 1.5, uv_skip),
                               rtol=0, atol=1e-12)
    # broadcasting: B codes against P points
    cb = codes[:3, None, :]
    expect = naive_decode(dec, cb.expand(3, 9, 5), feats.expand(3, 9, 4), 2.0, 1.5, uv_skip)
    torch.testing.assert_close(dec(cb, feats), expect, rtol=0, atol=1e-12)
    expected_in = [9, 16 + 4 * uv_skip, 12 + 4 * uv_skip]
    assert [layer.in_features for layer in dec.hidden] == expected_in


def test_weight_norm_uses_parametrizations():
    dec = _decoder()
    layer = dec.hidden[0]
    assert torch.nn.utils.parametrize.is_parametrized(layer, "weight")
    g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
    torch.testing.assert_close(layer.weight, g * v / v.norm(dim=1, keepdim=True))
    assert not torch.nn.utils.parametrize.is_parametrized(dec.out, "weight")
    assert not torch.nn.utils.parametrize.is_parametrized(_decoder(weight_norm=False).hidden[0], "weight")


def test_initial_output_small():
    torch.manual_seed(0)
    enc = make_encoder(EncoderConfig(backend="dense", n_levels=4, n_features=4, base_resolution=4,
                                     finest_resolution=32))
    dec = Decoder(DecoderConfig(widths=[64, 32]), code_dim=16, uv_dim=enc.out_dim)
    out = dec(torch.randn(100, 16) * 0.01, enc(torch.rand(100, 2)))
    assert out.abs().max() < 1e-2
    assert out.abs().max() > 1e-6  # not identically zero: gradients reach every layer
    loss = out.square().sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.parameters())


def test_forward_codes_equals_forward():
    dec = _decoder()
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(11, 4, generator=g, dtype=torch.float64)
    pre = dec.precompute_uv(feats)
    codes = torch.randn(11, 5, generator=g, dtype=torch.float64)
    torch.testing.assert_close(dec.forward_codes(codes, pre), dec(codes, feats), rtol=0, atol=1e-10)
    cb = torch.randn(3, 1, 5, generator=g, dtype=torch.float64)
    got = dec.forward_codes(cb, pre)
    assert got.shape == (3, 11, 3)
    torch.testing.assert_close(got, naive_decode(dec, cb.expand(3, 11, 5), feats.expand(3, 11, 4), 3.0, 3.0,
                                                 True), rtol=0, atol=1e-10)
    # without uv_skip the later layers' "pre" is the bias alone
    dec2 = _decoder(uv_skip=False)
    pre2 = dec2.precompute_uv(feats)
    assert pre2[1].shape == (12,)
    torch.testing.assert_close(dec2.forward_codes(cb, pre2), dec2(cb, feats), rtol=0, atol=1e-10)
    with pytest.raises(ValueError):
        dec.forward_codes(codes, pre[:2])
    with pytest.raises(ValueError):
        dec(codes[:, :4], feats)


def test_forward_codes_gradcheck():
    dec = _decoder()
    feats = torch.randn(6, 4, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    pre = [p.detach() for p in dec.precompute_uv(feats)]
    codes = torch.randn(2, 1, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: dec.forward_codes(c, pre), (codes,))


@pytest.mark.parametrize("uv_skip", [True, False])
def test_jacobian_matches_autograd(uv_skip):
    dec = _decoder(uv_skip=uv_skip)
    for p in dec.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(9)
    feats = torch.randn(7, 4, generator=g, dtype=torch.float64) * 0.5
    codes = torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.3
    pre = dec.precompute_uv(feats)
    out, jac = dec.forward_and_jacobian(codes, pre)
    assert jac.shape == (3, 7, 3, 5)
    torch.testing.assert_close(out, dec.forward_codes(codes[:, None], pre), rtol=0, atol=1e-12)
    # torch.func: per-face jacobian of forward_codes (N, 3) w.r.t. its code (5,)
    ref = vmap(jacrev(lambda c: dec.forward_codes(c[None, None], pre)[0]))(codes)
    torch.testing.assert_close(jac, ref, rtol=1e-10, atol=1e-12)
    ref2 = torch.autograd.functional.jacobian(lambda c: dec.forward_codes(c[None, None], pre)[0], codes[1])
    torch.testing.assert_close(jac[1], ref2, rtol=1e-10, atol=1e-12)
    out_c, jac_c = dec.forward_and_jacobian(codes, pre, chunk_size=3)
    torch.testing.assert_close(jac_c, jac, rtol=0, atol=1e-12)
    torch.testing.assert_close(out_c, out, rtol=0, atol=1e-12)
    torch.testing.assert_close(dec.jacobian_codes(codes, pre), jac)


def test_encoder_decoder_fit_a_field():
    """A dense encoder + decoder learns a smooth displacement field in a few hundred Adam steps."""
    torch.manual_seed(0)
    enc = make_encoder(EncoderConfig(backend="dense", n_levels=4, n_features=2, base_resolution=4,
                                     finest_resolution=32))
    dec = Decoder(DecoderConfig(widths=[32, 32]), code_dim=2, uv_dim=enc.out_dim)
    uv = torch.rand(512, 2)
    target = torch.stack([torch.sin(3 * uv[:, 0]), uv[:, 0] * uv[:, 1], torch.cos(2 * uv[:, 1])], -1)
    codes = torch.zeros(1, 1, 2)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-2)
    losses = []
    for _ in range(200):
        opt.zero_grad()
        loss = (dec(codes, enc(uv))[0] - target).norm(dim=-1).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]

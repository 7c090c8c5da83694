"""The continuous model: decode = avg + deformation, batched UVs, the fitting context, meshes at
upsampling levels and UV grids, save/load round trip and bad model files."""

import numpy as np
import pytest
import torch

from cm3dmm.config import config_from_dict
from cm3dmm.errors import InputError
from cm3dmm.model import ContinuousModel, UVContext, load_model, save_model
from cm3dmm.template import build_template
from conftest import make_registered

torch.set_num_threads(1)


def small_cfg(backend="dense"):
    return config_from_dict({"model": {
        "id_dim": 5, "exp_dim": 3,
        "encoder": {"backend": backend, "n_levels": 3, "n_features": 2, "base_resolution": 2,
                    "finest_resolution": 8, "log2_table_size": 8},
        "decoder": {"widths": [16, 8]}}}).model


@pytest.fixture(scope="module")
def template():
    d = make_registered(grid=6)
    mean = d.vertices[d.indices("train")].mean(0)
    t, _ = build_template(mean, d.faces, d.uv, levels=2, mask_resolution=32)
    return t


def make_model(template, backend="dense", seed=0):
    torch.manual_seed(seed)
    m = ContinuousModel(template, small_cfg(backend))
    # random weights everywhere, so that outputs are far from zero and differ per code
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m.eval().requires_grad_(False)


def codes(m, b, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, m.id_dim, generator=g), torch.randn(b, m.exp_dim, generator=g)


def test_sizes_from_template_and_config(template):
    m = make_model(template)
    assert (m.id_dim, m.exp_dim, m.code_dim) == (5, 3, 8)
    assert m.n_vertices == len(template.mean) == 36
    assert m.mean.shape == (36, 3) and m.uv.shape == (36, 2) and m.faces.shape == (50, 3)
    assert m.template is template
    # the model holds no latent codes: its parameters are the encoder's and the decoder's
    n = sum(p.numel() for p in m.parameters())
    assert n == sum(p.numel() for p in m.encoder.parameters()) + sum(p.numel() for p in m.decoder.parameters())
    assert {name.split(".")[0] for name, _ in m.named_parameters()} == {"encoder", "decoder"}


def test_decode_is_avg_plus_deformation(template):
    m = make_model(template)
    zi, ze = codes(m, 3)
    uv = torch.rand(40, 2, generator=torch.Generator().manual_seed(3)) * 0.9 + 0.05
    d = m.deformation(uv, zi, ze).detach()
    assert d.shape == (3, 40, 3) and float(d.abs().mean()) > 0.1
    x = m.decode(uv, zi, ze)
    avg = torch.as_tensor(template.avg(uv.numpy().astype(np.float64)), dtype=torch.float32)
    torch.testing.assert_close(x, d + avg, rtol=0, atol=1e-5)
    # at the template vertices the looked-up average face is the template mean itself
    x_v = m.decode(m.uv, zi, ze)
    torch.testing.assert_close(x_v - m.deformation(m.uv, zi, ze), m.mean.expand(3, -1, -1), rtol=0, atol=1e-4)
    # codes differ -> shapes differ
    assert float((x[0] - x[1]).abs().max()) > 1e-3


def test_per_code_uvs_equal_one_by_one(template):
    m = make_model(template)
    zi, ze = codes(m, 3)
    uv = torch.rand(3, 17, 2, generator=torch.Generator().manual_seed(4))
    avg = torch.randn(3, 17, 3)
    x = m.decode(uv, zi, ze, avg=avg)
    for b in range(3):
        ref = m.decode(uv[b], zi[b:b + 1], ze[b:b + 1], avg=avg[b])[0]
        torch.testing.assert_close(x[b], ref, rtol=0, atol=1e-5)


def test_context_matches_decode(template):
    m = make_model(template)
    zi, ze = codes(m, 2)
    uv = torch.rand(25, 2, generator=torch.Generator().manual_seed(5))
    ctx = m.precompute(uv)
    assert isinstance(ctx, UVContext) and ctx.n_points == 25
    torch.testing.assert_close(m.decode_context(ctx, zi, ze), m.decode(uv, zi, ze), rtol=0, atol=1e-5)


def test_bad_code_shapes(template):
    m = make_model(template)
    with pytest.raises(ValueError, match="code sizes"):
        m.decode(m.uv, torch.zeros(1, 4), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="uv must have shape"):
        m.decode(torch.zeros(2, 4, 3), torch.zeros(2, 5), torch.zeros(2, 3))


@pytest.mark.parametrize("level", [0, 1, 2])
def test_mesh_at_levels(template, level):
    m = make_model(template)
    zi, ze = codes(m, 2)
    v, f = m.mesh(zi, ze, level=level)
    lv = template.levels[level]
    # point counts: 36 vertices, 85 edges, 50 triangles -> 36, 36 + 85, 36 + 3 * 85 + 3 * 50
    assert v.shape == (2, {0: 36, 1: 121, 2: 441}[level], 3) == (2, lv.n_points, 3)
    assert f.shape == (50 * 4 ** level, 3) and int(f.max()) == lv.n_points - 1
    # level points = avg at their (triangle, barycentrics) + the field at their uv
    avg = torch.as_tensor(template.level_points(template.mean, level), dtype=torch.float32)
    uv = torch.as_tensor(lv.uv)
    torch.testing.assert_close(v, m.decode(uv, zi, ze, avg=avg), rtol=0, atol=1e-5)
    if level == 0:
        torch.testing.assert_close(v, m.decode(m.uv, zi, ze, avg=m.mean), rtol=0, atol=1e-5)


def test_mesh_on_uv_grid(template):
    from cm3dmm.upsample import uv_grid

    m = make_model(template)
    zi, ze = codes(m, 1)
    v, f = m.mesh(zi, ze, grid=12)
    g = uv_grid(template, 12)
    assert v.shape == (1, g.n_points, 3) and g.n_points > 36 and f.shape == (len(g.faces), 3)


@pytest.mark.parametrize("backend", ["dense", "hash", "seed-compatible"])
def test_save_load_round_trip(template, tmp_path, backend):
    m = make_model(template, backend)
    extra = {"codes": {"id": np.arange(10, dtype=np.float32).reshape(2, 5)}, "subject": ["a", "b"],
             "summary": {"best_val_mm": 0.5}}
    path = tmp_path / "model.pt"
    save_model(path, m, extra)
    m2, extra2 = load_model(path)
    assert m2.template.hash == template.hash and m2.cfg == m.cfg
    np.testing.assert_array_equal(m2.template.levels[2].bary, template.levels[2].bary)
    zi, ze = codes(m, 2)
    with torch.no_grad():
        torch.testing.assert_close(m2.decode(m.uv, zi, ze), m.decode(m.uv, zi, ze), rtol=0, atol=0)
        v1, _ = m.mesh(zi, ze, level=1)
        v2, _ = m2.mesh(zi, ze, level=1)
    torch.testing.assert_close(v1, v2, rtol=0, atol=0)
    assert extra2["subject"] == ["a", "b"] and extra2["summary"]["best_val_mm"] == 0.5
    torch.testing.assert_close(extra2["codes"]["id"], torch.arange(10.0).reshape(2, 5))


def test_bad_model_files(template, tmp_path):
    m = make_model(template)
    good = tmp_path / "model.pt"
    save_model(good, m, {})
    data = good.read_bytes()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="corrupt or truncated") as ei:
        load_model(trunc)
    assert str(trunc) in str(ei.value)
    other = tmp_path / "pca.pt"
    torch.save({"format": "cm3dmm-model", "format_version": 1, "method": "pca"}, other)
    with pytest.raises(InputError, match="method 'pca'"):
        load_model(other)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(InputError, match="not a cm3dmm model file"):
        load_model(foreign)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "cm3dmm-model", "format_version": 99, "method": "cm3dmm"}, newer)
    with pytest.raises(InputError, match="format_version 99"):
        load_model(newer)
    with pytest.raises(InputError, match="not found"):
        load_model(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a zip file at all" * 10)
    with pytest.raises(InputError, match=str(garbage).replace(".", r"\.")):
        load_model(garbage)

"""The template: building, regions, persistence with integrity checks, the template stage."""

import json

import numpy as np
import pytest

from _meshes import holed_disc
from cm3dmm.errors import InputError
from cm3dmm.template import REGION_NAMES, build_template, face_regions, load_template, save_template


@pytest.fixture(scope="module")
def built():
    v, f = holed_disc(13)
    t, report = build_template(v, f, None, {}, source_hash="abc", levels=2, uv_grids=[32],
                               mask_resolution=48)
    return v, f, t, report


def test_build_template_fields_and_evaluation(built):
    v, f, t, report = built
    V = len(v)
    assert t.mean.shape == (V, 3) and t.mean.dtype == np.float32
    assert t.faces.dtype == np.int32 and t.uv.dtype == np.float32
    assert t.uv.min() >= 0 and t.uv.max() <= 1
    assert len(t.levels) == 3 and [lv.n_points for lv in t.levels][0] == V
    assert t.regions.shape == (V,) and t.region_names == REGION_NAMES
    assert report["stats"]["n_flipped"] == 0 and report["method"] == "lscm"
    assert report["n_holes"] == 2 and t.source_hash == "abc" and len(t.hash) == 16
    # avg() at the vertices' own UVs returns the mean face; level 0 points are the vertices
    assert np.abs(t.avg(t.uv) - t.mean).max() < 1e-4
    assert np.array_equal(t.level_points(t.mean, 0), t.mean)
    # the mask raster is the locator's answer at pixel centres, row 0 at v = 1
    H = t.mask.shape[0]
    r, c = 5, 30
    _, _, inside = t.locator.locate(np.array([[(c + 0.5) / H, 1 - (r + 0.5) / H]]))
    assert t.mask[r, c] == inside[0]
    assert 0.3 < t.mask.mean() < 0.95
    assert 32 in t.grids and t.grids[32].n_points > 0
    torch = pytest.importorskip("torch")
    out = t.avg(torch.tensor(t.uv[:5], dtype=torch.float64))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    assert np.allclose(out.numpy(), t.mean[:5], atol=1e-4)


def test_save_load_roundtrip_and_integrity(built, tmp_path):
    *_, t, _ = built
    path = tmp_path / "template.npz"
    h = save_template(path, t)
    u = load_template(path)
    assert u.hash == h == t.hash
    for name in ("mean", "faces", "uv", "boundary", "mask", "regions"):
        assert np.array_equal(getattr(u, name), getattr(t, name))
    for a, b in zip(u.levels, t.levels):
        assert np.array_equal(a.faces, b.faces) and np.array_equal(a.bary, b.bary)
    assert u.grids[32].n_points == t.grids[32].n_points
    with pytest.raises(InputError, match="not found"):
        load_template(tmp_path / "nope.npz")
    raw = path.read_bytes()
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_template(tmp_path / "trunc.npz")
    arrays = dict(np.load(path))
    arrays["mean"] = arrays["mean"] + 1.0  # tampered content, stale hash
    np.savez(tmp_path / "tampered.npz", **arrays)
    with pytest.raises(InputError, match="does not match its stored hash"):
        load_template(tmp_path / "tampered.npz")
    arrays = dict(np.load(path))
    arrays["format_version"] = np.array(99)
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(InputError, match="format_version 99"):
        load_template(tmp_path / "future.npz")


def test_regions_follow_landmarks():
    # a flat 200 x 240 mm sheet with landmark vertices placed where a face has them
    c = np.linspace(-100, 100, 41)
    x, y = np.meshgrid(c, np.linspace(-120, 120, 49))
    v = np.stack([x.ravel(), y.ravel(), np.zeros(x.size)], 1)

    def at(px, py):
        return int(np.argmin(np.hypot(v[:, 0] - px, v[:, 1] - py)))

    lm = {"nose_tip": at(0, 0), "eye_outer_L": at(45, 35), "eye_inner_L": at(15, 35),
          "eye_outer_R": at(-45, 35), "eye_inner_R": at(-15, 35),
          "mouth_corner_L": at(25, -35), "mouth_corner_R": at(-25, -35)}
    reg = face_regions(v, lm)
    name = {k: REGION_NAMES[reg[i]] for k, i in lm.items()}
    assert name["nose_tip"] == "nose"
    assert name["mouth_corner_L"] == name["mouth_corner_R"] == "mouth"
    assert REGION_NAMES[reg[at(30, 35)]] == "eyes" and REGION_NAMES[reg[at(-30, 35)]] == "eyes"
    assert REGION_NAMES[reg[at(0, 100)]] == "forehead"
    assert REGION_NAMES[reg[at(55, -5)]] == "cheeks"
    assert REGION_NAMES[reg[at(95, -115)]] == "other"
    counts = np.bincount(reg, minlength=len(REGION_NAMES))
    assert (counts > 0).all()


def test_run_template_stage(tmp_path):
    from conftest import make_registered

    from cm3dmm.config import config_from_dict
    from cm3dmm.paths import RunPaths
    from cm3dmm.registered import write_registered
    from cm3dmm.template import run_template

    cfg = config_from_dict({"run": "t", "results": str(tmp_path),
                            "template": {"levels": 3, "mask_resolution": 64}})
    paths = RunPaths(cfg.run_dir)
    data = make_registered(grid=9)
    content = write_registered(paths.registered, data)
    run_template(cfg)
    t = load_template(paths.template)
    assert t.source_hash == content
    train = data.indices("train")
    assert np.allclose(t.mean, data.vertices[train].mean(0), atol=1e-4)
    assert t.unwrap_method == "source"  # the grid's UVs are valid: kept up to scale + shift
    s = np.ptp(t.uv, axis=0).max() / np.ptp(data.uv, axis=0).max()
    assert s == pytest.approx(0.96, abs=1e-6)  # default margin 0.02
    assert np.allclose(t.uv, (data.uv - 0.5) * s + 0.5, atol=1e-6)
    rep = json.loads(paths.unwrap.read_text())
    assert rep["stats"]["n_flipped"] == 0 and rep["levels"][3]["triangles"] == 128 * 64
    for p in (paths.uv_layout, paths.levels_png):
        assert p.stat().st_size > 10_000
    from PIL import Image

    png = np.asarray(Image.open(paths.uv_mask))
    assert png.shape == (64, 64) and np.array_equal(png > 127, t.mask)

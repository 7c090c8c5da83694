"""Headless VTK rendering: PNG written, sizes, camera, scalars change the picture."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cm3dmm.render import render_grid, render_images, render_mesh


def _sphere(n_theta: int = 24, n_phi: int = 16, radius: float = 50.0):
    """A UV sphere of `radius` mm: vertices (V, 3), faces (F, 3) outward-facing."""
    th = np.linspace(0, 2 * np.pi, n_theta, endpoint=False)
    ph = np.linspace(0, np.pi, n_phi + 1)[1:-1]
    ring = np.stack([np.outer(np.sin(ph), np.cos(th)), np.outer(np.cos(ph), np.ones_like(th)),
                     np.outer(np.sin(ph), np.sin(th))], -1).reshape(-1, 3)
    v = np.concatenate([[[0, 1, 0]], ring, [[0, -1, 0]]]) * radius
    faces = []
    idx = lambda i, j: 1 + i * n_theta + (j % n_theta)  # noqa: E731
    for j in range(n_theta):
        faces.append([0, idx(0, j + 1), idx(0, j)])
        faces.append([len(v) - 1, idx(n_phi - 2, j), idx(n_phi - 2, j + 1)])
    for i in range(n_phi - 2):
        for j in range(n_theta):
            a, b, c, d = idx(i, j), idx(i, j + 1), idx(i + 1, j), idx(i + 1, j + 1)
            faces += [[a, b, d], [a, d, c]]
    return v.astype(np.float32), np.array(faces, np.int32)


def test_render_mesh_size_and_content(tmp_path):
    v, f = _sphere()
    path = render_mesh(v, f, tmp_path / "sphere.png", size=64)
    img = np.asarray(Image.open(path))
    assert img.shape[:2] == (64, 64)
    rgb = img[..., :3].astype(int)
    background = (rgb == 255).all(-1)
    # a sphere filling ~88% of the frame's width covers pi/4 * 0.88^2 ~ 60% of the pixels
    assert 0.45 < 1 - background.mean() < 0.75
    assert background[0, 0] and background[-1, -1] and not background[32, 32]
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_front_camera_orientation():
    """+x appears on the image's right, +y at the top (a front view looking down -z)."""
    v, f = _sphere()
    sc = np.stack([v[:, 0], v[:, 1], v[:, 2]])  # viridis: high values are bright yellow
    imgs = render_images(np.stack([v, v, v]), f, scalars=sc, clim=(-50, 50), size=64, supersample=1)
    # viridis: low values are blue-purple (B > G), high values green-yellow (G > B); shading
    # scales both channels, so the sign of G - B survives it
    hue = imgs[..., 1].astype(int) - imgs[..., 2].astype(int)
    fg = (imgs < 250).any(-1)
    region = lambda k, rows, cols: hue[k][rows, cols][fg[k][rows, cols]].mean()  # noqa: E731
    assert region(0, slice(None), slice(40, None)) > 20 > -20 > region(0, slice(None), slice(None, 24))
    assert region(1, slice(None, 24), slice(None)) > 20 > -20 > region(1, slice(40, None), slice(None))
    # the visible hemisphere is +z (towards the viewer): its centre shows the highest z values
    assert region(2, slice(24, 40), slice(24, 40)) > 40


def test_scalars_change_the_image_and_grid_layout(tmp_path):
    v, f = _sphere()
    V = np.stack([v, v])[None]  # (1, 2, V, 3)
    sc = np.stack([v[:, 0], -v[:, 0]])[None]
    imgs = render_images(V[0], f, scalars=sc[0], clim=(-50, 50), size=48, supersample=1)
    assert np.abs(imgs[0].astype(int) - imgs[1].astype(int)).sum() > 1000
    # mirrored scalars on a mirror-symmetric sphere: left half of one ~ right half of the other
    path = render_grid(V, f, tmp_path / "grid.png", row_labels=["r"], col_labels=["a", "b"],
                       scalars=sc, scalar_label="mm", size=48, title="t")
    img = np.asarray(Image.open(path))
    assert img.shape[1] > 2 * 48 and img.shape[0] > 48
    same = render_images(V[0], f, size=48, supersample=1)
    assert np.array_equal(same[0], same[1])  # no scalars: identical meshes -> identical cells


def test_shared_camera_scales_consistently():
    v, f = _sphere()
    imgs = render_images(np.stack([v, 0.5 * v]), f, size=64, supersample=1)
    area = (imgs < 250).any(-1).mean(axis=(1, 2))
    assert area[1] == pytest.approx(area[0] / 4, rel=0.25)


def test_bad_input():
    v, f = _sphere()
    with pytest.raises(ValueError, match="faces index"):
        render_images(v[None], f + len(v), size=32)
    bad = v.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        render_images(bad[None], f, size=32)
    with pytest.raises(ValueError, match="scalars"):
        render_images(v[None], f, scalars=np.zeros((1, 3)), size=32)

"""The browser viewer (cm3dmm view): served by viser, checked in a real headless Chromium driven by
Playwright (the page loads, the face renders, a slider changes the geometry, a fit's heat map
shows), plus its bad input (a port in use, fits of another model)."""

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, build_tiny_models, make_registered, tiny_config

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from cm3dmm.fit import run_fit

    root = tmp_path_factory.mktemp("viewrun")
    cfg = tiny_config(root, template={"levels": 2, "mask_resolution": 32})
    data = make_registered(n_subjects=5, n_expr=3, grid=9, test_subjects=1)
    build_tiny_models(cfg, data)
    run_fit(cfg, method="bilinear", subject="s004")
    return cfg


@pytest.fixture(scope="module")
def model(run):
    import cm3dmm
    from cm3dmm.paths import RunPaths

    # the bilinear model: identity and expression sliders with a visible effect after a tiny training
    return cm3dmm.load(RunPaths.of(run.run_dir).model("bilinear"))


def test_port_in_use_is_one_clear_error(model):
    from cm3dmm.errors import InputError
    from cm3dmm.viewer import Viewer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(InputError, match=f"cannot serve on 127.0.0.1:{port}"):
            Viewer(model, port=port)
        r = subprocess.run([sys.executable, "-m", "cm3dmm", "view", "--model", str(model.path), "--port", str(port)],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"cannot serve on 127.0.0.1:{port}" in r.stderr


def test_fits_of_another_model_are_skipped_with_a_reason(run, model, tmp_path):
    from cm3dmm.paths import RunPaths
    from cm3dmm.viewer import read_fits

    fits = RunPaths.of(run.run_dir).fit_dir("bilinear")
    entries, skipped = read_fits(fits, model)
    assert [e.label for e in entries] == ["s004 / neutral", "s004 / smile", "s004 / mouth_stretch"]
    one = {"expressions": np.array(["neutral"]), "vertices": np.zeros((1, 81, 3)), "seconds": np.array(1.0),
           "vertex_errors": np.zeros((1, 81)), "errors": np.zeros(1)}
    np.savez(tmp_path / "other.npz", z_id=np.zeros((1, 3)), z_exp=np.zeros((1, 3)), **one)
    np.savez(tmp_path / "bare.npz", z_id=np.zeros((1, 3)), z_exp=np.zeros((1, 3)), vertex_errors=np.zeros((1, 81)))
    (tmp_path / "junk.npz").write_bytes(b"nope")
    entries, skipped = read_fits(tmp_path, model)
    assert entries == [] and len(skipped) == 3, skipped
    # the reasons of cm3dmm.fit.io.read_fit, the one reader of fit files
    assert skipped[0] == "bare.npz: fit file lacks expressions, vertices, seconds, errors (it has vertex_errors, " \
                         "z_exp, z_id): rerun the fit stage"
    assert skipped[1].startswith("junk.npz: fit file is corrupt or truncated")
    assert skipped[2].startswith("other.npz: codes of size (3, 3) do not fit the model "
                                 f"({model.id_dim}, {model.exp_dim})")


def test_error_colors():
    from cm3dmm.viewer import error_colors

    c = error_colors(np.array([0.0, 1.0, 2.0, np.nan]), hi=2.0)
    assert c.shape == (4, 4) and c.dtype == np.uint8
    assert tuple(c[3, :3]) == (153, 153, 153)  # no data: grey
    assert c[0, :3].sum() > c[2, :3].sum()  # magma_r: light at 0, dark at the top of the range


def _face_pixels(png: bytes) -> np.ndarray:
    """The scene's part of a screenshot (left of the control panel) as an RGB array."""
    import io

    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int32)
    return img[:, : int(img.shape[1] * 0.62)]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it: apt-get install chromium)")
def test_viewer_in_a_headless_browser(run, model, tmp_path):
    pw = pytest.importorskip("playwright.sync_api")
    from cm3dmm.paths import RunPaths
    from cm3dmm.viewer import Viewer

    viewer = Viewer(model, fits=RunPaths.of(run.run_dir).fit_dir("bilinear"), port=_free_port())
    try:
        with pw.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.goto(viewer.url, timeout=120_000)
            page.wait_for_selector("canvas", timeout=120_000)

            def settle_shot(prev=None, tries=40):
                """A screenshot once the scene shows a face (and differs from ``prev`` when given)."""
                for _ in range(tries):
                    time.sleep(0.5)
                    shot = _face_pixels(page.screenshot())
                    lit = (np.abs(shot - 255).sum(-1) > 60).mean()
                    if lit > 0.01 and (prev is None or np.abs(shot - prev).sum(-1).astype(bool).mean() > 0.002):
                        return shot, lit
                return shot, lit

            first, lit = settle_shot()
            # the face renders: a real share of the scene is not background, with shading (many tones)
            assert lit > 0.01, f"blank scene: {lit:.4f} of the pixels differ from the background"
            tones = len(np.unique(first[np.abs(first - 255).sum(-1) > 60] // 8, axis=0))
            assert tones > 20, f"only {tones} colour tones: the face is not lit/shaded"
            # moving a slider (keyboard on the first identity slider) changes the geometry
            before = viewer.vertices.copy()
            updates = viewer.updates
            slider = page.get_by_role("slider").first
            slider.focus()
            for _ in range(30):
                page.keyboard.press("ArrowRight")
            for _ in range(60):
                if viewer.updates > updates and not np.allclose(viewer.vertices, before):
                    break
                time.sleep(0.25)
            moved = np.linalg.norm(viewer.vertices - before, axis=1)
            assert moved.max() > 0.1, "the slider did not change the face"
            second, _ = settle_shot(first)
            assert np.abs(second - first).sum(-1).astype(bool).mean() > 0.002, "the picture did not change"
            # a fit's error heat map: colours of the magma map appear (dark purples, not skin or grey)
            viewer.show_fit("s004 / smile")
            third, _ = settle_shot(second)
            r, g, b = third[..., 0], third[..., 1], third[..., 2]
            assert ((b > g + 30) & (r < 200)).mean() > 0.001 or ((r > 200) & (b < 150) & (g < 150)).mean() > 0.001
            Path(tmp_path / "viewer.png").write_bytes(page.screenshot())
            browser.close()
    finally:
        viewer.close()

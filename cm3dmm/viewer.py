"""``cm3dmm view``: an interactive page in the browser for a model and its fits (viser).

    cm3dmm view --model results/test/models/cm3dmm/model.pt --fits results/test/fits/cm3dmm

The page (served by `viser <https://viser.studio>`_, a maintained three.js viewer with a Python
API) shows the face lit and rotatable (drag to turn, scroll to zoom) and, in its side panel:

* sliders along the main directions of the identity and expression codes (the principal axes of
  the model's training codes, in standard deviations: :meth:`cm3dmm.api.Model.directions`);
* "random face" (codes drawn as :meth:`cm3dmm.api.Model.sample`) and "mean face" buttons;
* the upsampling level of the shown mesh;
* the fits of a run (``--fits DIR``: every ``*.npz`` of the fit stage; one entry per fitted face)
  with a heat map of the fit's per-vertex error (mm) on the face.

:class:`Viewer` is the same page from Python (a notebook: ``Viewer(cm3dmm.load(...)).url``).
A port already in use is an :class:`~cm3dmm.errors.InputError` (viser itself would silently move
to the next free port).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError

log = logging.getLogger(__name__)

#: sliders per code block (fewer when the training codes span fewer directions)
N_SLIDERS = 6
#: slider range, in standard deviations of the training codes along the direction
SLIDER_STD = 3.0
#: colour of the face (RGB)
SKIN = (214, 178, 156)


def check_port(host: str, port: int) -> None:
    """InputError when ``port`` cannot be bound on ``host`` (in use, or not a valid port)."""
    if not 0 < int(port) < 65536:
        raise InputError(f"port {port} is not a valid TCP port (1..65535)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, int(port)))
        except OSError as exc:
            raise InputError(f"cannot serve on {host}:{port}: {exc.strerror or exc} (is another viewer running? "
                             "choose another --port)") from None


@dataclass
class FitEntry:
    """One fitted face of a fit file: its codes and per-template-vertex errors (mm, NaN = no data)."""

    label: str
    z_id: np.ndarray
    z_exp: np.ndarray
    vertex_errors: np.ndarray
    error: float


def read_fits(folder: str | os.PathLike, model) -> tuple[list[FitEntry], list[str]]:
    """The fitted faces of every ``*.npz`` under ``folder`` that fit ``model`` (codes of its sizes,
    its vertex count); returns (entries, one line per skipped file)."""
    from cm3dmm.fit.io import read_fit

    d = Path(folder)
    if not d.is_dir():
        raise InputError("fits folder not found", d)
    entries, skipped = [], []
    for p in sorted(d.glob("*.npz")):
        try:
            z = read_fit(p, also=("vertex_errors", "errors"))
        except InputError as exc:  # a bad file is skipped with its reason
            skipped.append(f"{p.name}: {exc.problem}")
            continue
        zi, ze, ve, errs = z["z_id"], z["z_exp"], z["vertex_errors"], z["errors"]
        exprs = [str(e) for e in z["expressions"]]
        if zi.ndim != 2 or zi.shape[1] != model.id_dim or ze.shape[1] != model.exp_dim:
            skipped.append(f"{p.name}: codes of size ({zi.shape[-1]}, {ze.shape[-1]}) do not fit the model "
                           f"({model.id_dim}, {model.exp_dim})")
            continue
        if ve.shape[-1] != model.n_vertices:
            skipped.append(f"{p.name}: {ve.shape[-1]} vertices, the model {model.n_vertices}")
            continue
        for k, e in enumerate(exprs):
            entries.append(FitEntry(f"{p.stem} / {e}", zi[k], ze[k], ve[k], float(errs[k])))
    if not entries and not skipped:
        skipped.append(f"{d}: no fit files (*.npz)")
    return entries, skipped


def error_colors(errors: np.ndarray, hi: float | None = None) -> np.ndarray:
    """Per-point RGBA (P, 4) uint8 of errors (mm) on the ``magma_r`` colour map over [0, hi]
    (``hi``: the 98th percentile by default); NaN (no data) is grey."""
    from matplotlib import colormaps

    e = np.asarray(errors, np.float64)
    ok = np.isfinite(e)
    if hi is None:
        hi = float(np.quantile(e[ok], 0.98)) if ok.any() else 1.0
    rgba = colormaps["magma_r"](np.clip(np.where(ok, e, 0.0) / max(hi, 1e-9), 0, 1))
    rgba[~ok] = (0.6, 0.6, 0.6, 1.0)
    return (rgba * 255).round().astype(np.uint8)


class Viewer:
    """The viewer's server: ``Viewer(model, fits=..., host=..., port=...)``, then open :attr:`url`.

    ``model``: a :class:`cm3dmm.api.Model`. The server runs in background threads; :meth:`close`
    stops it. The state is readable for tests: :attr:`codes` (the shown face's codes) and
    :attr:`vertices` (its mesh).
    """

    def __init__(self, model, fits: str | os.PathLike | None = None, host: str = "127.0.0.1", port: int = 8080,
                 n_sliders: int = N_SLIDERS):
        import viser

        self.model = model
        self.fits, self.skipped = read_fits(fits, model) if fits is not None else ([], [])
        check_port(host, port)
        self.server = viser.ViserServer(host=host, port=int(port), label="cm3dmm", verbose=False)
        if self.server.get_port() != int(port):  # taken between our check and viser's bind
            self.server.stop()
            raise InputError(f"cannot serve on {host}:{port}: the port is in use (choose another --port)")
        self.host, self.port = host, int(port)
        self._lock = threading.Lock()
        self.level = 0
        self.heat: np.ndarray | None = None  # per template vertex errors of the shown fit
        self.base = model.mean_codes(1)
        self.codes = self.base
        self.vertices = np.zeros((0, 3))
        self.updates = 0
        self._dirs = {k: model.directions(k, n_sliders) for k in ("identity", "expression")}
        self._build_gui()
        self._set_camera()
        self._redraw()

    @property
    def url(self) -> str:
        host = "localhost" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    # ------------------------------------------------------------------ gui
    def _build_gui(self) -> None:
        s, gui = self.server, self.server.gui
        s.scene.set_up_direction("+y")
        s.scene.configure_default_lights()
        m = self.model
        gui.add_markdown(f"**cm3dmm** · `{m.method}` model · identity {m.id_dim} + expression {m.exp_dim} · "
                         f"{m.n_vertices} vertices")
        self.sliders: dict[str, list] = {}
        for kind in ("identity", "expression"):
            _, dirs, _ = self._dirs[kind]
            self.sliders[kind] = []
            if len(dirs) == 0:
                continue
            with gui.add_folder(f"{kind} (std. dev.)"):
                for k in range(len(dirs)):
                    h = gui.add_slider(f"{kind[:3]} {k + 1}", min=-SLIDER_STD, max=SLIDER_STD, step=0.05,
                                       initial_value=0.0)
                    h.on_update(lambda _e: self._from_sliders())
                    self.sliders[kind].append(h)
        self.random_button = gui.add_button("random face")
        self.random_button.on_click(lambda _e: self.random_face())
        self.mean_button = gui.add_button("mean face")
        self.mean_button.on_click(lambda _e: self.set_base(self.model.mean_codes(1)))
        self.level_select = gui.add_dropdown("level", [str(i) for i in range(m.n_levels)], initial_value="0")
        self.level_select.on_update(lambda _e: self.set_level(int(self.level_select.value)))
        self.info = gui.add_markdown("")
        if self.fits or self.skipped:
            with gui.add_folder("fits"):
                names = ["(none)"] + [f.label for f in self.fits]
                self.fit_select = gui.add_dropdown("fit", names, initial_value="(none)")
                self.fit_select.on_update(lambda _e: self.show_fit(self.fit_select.value))
                self.heat_box = gui.add_checkbox("error heat map", initial_value=True)
                self.heat_box.on_update(lambda _e: self._redraw())
                if self.skipped:
                    gui.add_markdown("skipped: " + "; ".join(self.skipped[:5]))
        else:
            self.fit_select = self.heat_box = None

    def _set_camera(self) -> None:
        v = np.asarray(self.model.template.mean, np.float64)
        centre = 0.5 * (v.min(0) + v.max(0))
        ext = float(np.ptp(v, axis=0).max())
        cam = self.server.initial_camera
        cam.look_at = tuple(centre)
        cam.position = tuple(centre + np.array([0.35, 0.1, 1.0]) * 1.25 * ext)
        cam.up = (0.0, 1.0, 0.0)
        cam.near = 0.01 * ext
        cam.far = 100.0 * ext

    # ------------------------------------------------------------------ state
    def _slider_codes(self):
        from cm3dmm.api import Codes

        blocks = []
        for kind, base in (("identity", self.base.z_id[0]), ("expression", self.base.z_exp[0])):
            _, dirs, std = self._dirs[kind]
            vals = np.array([h.value for h in self.sliders[kind]], np.float64)
            blocks.append(base + (vals * std) @ dirs if len(dirs) else base)
        return Codes(blocks[0][None], blocks[1][None])

    def _from_sliders(self) -> None:
        self.codes = self._slider_codes()
        self._redraw()

    def set_base(self, codes, keep_heat: bool = False) -> None:
        """Show ``codes`` (one face) with every slider at 0."""
        self.base = self.model.codes(codes)
        if not keep_heat:
            self.heat = None
            if self.fit_select is not None and self.fit_select.value != "(none)":
                self.fit_select.value = "(none)"
        with self.server.atomic():
            for hs in self.sliders.values():
                for h in hs:
                    h.value = 0.0
        self.codes = self.base
        self._redraw()

    def random_face(self, seed: int | None = None) -> None:
        self.set_base(self.model.sample(1, seed=seed))

    def set_level(self, level: int) -> None:
        self.level = self.model._check_level(level)
        if self.level_select.value != str(self.level):
            self.level_select.value = str(self.level)  # keeps the page in step when called from Python
        self._redraw()

    def show_fit(self, label: str) -> None:
        if label == "(none)":
            self.heat = None
            self._redraw()
            return
        f = next((f for f in self.fits if f.label == label), None)
        if f is None:
            raise InputError(f"no fit {label!r}")
        self.heat = f.vertex_errors
        if self.fit_select.value != label:
            self.fit_select.value = label  # keeps the page in step when called from Python
        self.set_base((f.z_id[None], f.z_exp[None]), keep_heat=True)
        ok = np.isfinite(f.vertex_errors)
        hi = float(np.quantile(f.vertex_errors[ok], 0.98)) if ok.any() else 0.0
        self.info.content = (f"fit **{label}**: mean error {f.error:.3f} mm; heat map (magma) from 0 mm (light) "
                             f"to {hi:.2f} mm (dark), grey: no data")

    # ------------------------------------------------------------------ drawing
    def _redraw(self) -> None:
        import trimesh

        with self._lock:
            verts, faces, _ = self.model.points(self.codes, self.level)
            v, f = verts[0].astype(np.float32), faces.astype(np.uint32)
            self.vertices = v
            show_heat = self.heat is not None and (self.heat_box is None or self.heat_box.value)
            if show_heat:
                err = self.heat
                if self.level > 0:  # per level point: interpolated from the template vertices
                    from cm3dmm.uv import interpolate

                    lv = self.model.template.levels[self.level]
                    err = interpolate(np.asarray(err, np.float64)[:, None], self.model.template.faces, lv.tri,
                                      lv.bary)[:, 0]
                mesh = trimesh.Trimesh(v, f, process=False)
                mesh.visual.vertex_colors = error_colors(err)
                self.server.scene.add_mesh_trimesh("/face", mesh)
            else:
                self.server.scene.add_mesh_simple("/face", v, f, color=SKIN, flat_shading=False, side="double")
            self.updates += 1
            if self.heat is None:
                self.info.content = (f"level {self.level}: {len(v)} points, {len(f)} triangles")

    def close(self) -> None:
        self.server.stop()


def run_view(model: str, fits: str | None = None, host: str = "127.0.0.1", port: int = 8080,
             template: str | None = None) -> None:
    """``cm3dmm view``: serve the viewer until interrupted (Ctrl-C)."""
    from cm3dmm.api import load

    m = load(model, template)
    viewer = Viewer(m, fits, host=host, port=port)
    print(f"cm3dmm view: {viewer.url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(1.0)
    finally:
        viewer.close()

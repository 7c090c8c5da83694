"""The template: mean face of the training split, its UV unwrapping, mask, upsampling
levels and face regions — and the ``template`` stage that builds it.

``template.npz`` (format version :data:`FORMAT_VERSION`, no pickled objects) holds every
field of :class:`Template`; levels as ``level{l}_{tri,bary,uv,faces,vertex_index}`` and
uniform UV grids as ``grid{n}_...``. ``hash`` is a content hash of all stored arrays,
checked on load; ``source_hash`` is the content hash of the ``registered.h5`` it was built
from, so later stages can detect a stale template.

Mask raster convention: ``mask[row, col]`` is True when the UV point
``(u, v) = ((col + 0.5) / W, 1 - (row + 0.5) / H)`` lies on the face (row 0 is the top,
``v = 1``), i.e. the array is the upright image ``uv_mask.png``.

Face regions (``regions (V,)`` int8 indexing ``region_names``) follow
:func:`face_regions`: anchors (nose tip, eye centres, mouth centre, eye and mouth
half-widths) come from the dataset's landmarks when it has them and from anthropometric
averages around the most protruding central vertex otherwise; each vertex is labelled by
the first of eyes > nose > mouth > forehead > cheeks whose shape (ellipses and a
trapezoid, in units of the inter-ocular distance, in the frontal x-y projection) contains
it, else ``other``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError
from cm3dmm.io.atomic import atomic_path, atomic_save_npz, atomic_write_json
from cm3dmm.io.hdf5 import hash_arrays
from cm3dmm.io.npz import read_npz
from cm3dmm.upsample import Level, subdivide, uv_grid_from
from cm3dmm.uv import UVLocator, interpolate, unwrap

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
REGION_NAMES = ["nose", "mouth", "eyes", "cheeks", "forehead", "other"]
_LEVEL_KEYS = ("tri", "bary", "uv", "faces", "vertex_index")


@dataclass
class Template:
    """The mean face with its UV parameterisation and semantic point sets (V vertices)."""

    mean: np.ndarray  #: (V, 3) float32 mm, mean of the training split
    faces: np.ndarray  #: (F, 3) int32
    uv: np.ndarray  #: (V, 2) float32 in [0, 1]
    boundary: np.ndarray  #: (B,) int64 outer boundary ring, ordered along the triangles
    mask: np.ndarray  #: (H, W) bool, row 0 at v = 1 (see module docstring)
    levels: list[Level]  #: upsampling levels 0..L (level 0 = the template vertices)
    regions: np.ndarray  #: (V,) int8 index into region_names
    region_names: list[str] = field(default_factory=lambda: list(REGION_NAMES))
    landmarks: dict[str, int] = field(default_factory=dict)  #: copied from the data
    source_hash: str = ""  #: content hash of the registered.h5 it was built from
    hash: str = ""  #: content hash of this template (set by build / load)
    unwrap_method: str = ""  #: source | harmonic | lscm
    grids: dict[int, Level] = field(default_factory=dict)  #: uniform UV grids by size n

    @property
    def n_vertices(self) -> int:
        return int(len(self.mean))

    @cached_property
    def locator(self) -> UVLocator:
        """Point location over the template's UV triangles (built once, cached)."""
        return UVLocator(self.uv, self.faces)

    def field_at(self, field, uv):
        """Per-vertex field (..., V, C) evaluated at query UVs (N, 2) -> (..., N, C)
        (off-mask points take the nearest point of the face)."""
        tri, bary, _ = self.locator.locate(uv)
        return interpolate(field, self.faces, tri, bary)

    def avg(self, uv):
        """The mean face at query UVs: uv (N, 2) -> (N, 3) mm. A torch ``uv`` gives a tensor
        on its device and dtype."""
        if hasattr(uv, "detach"):
            import torch

            mean = torch.as_tensor(self.mean, device=uv.device, dtype=uv.dtype)
            return self.field_at(mean, uv)
        return self.field_at(self.mean, uv)

    def level_points(self, field, level: int):
        """Per-vertex field (..., V, C) at the points of upsampling level ``level``:
        (..., P, C)."""
        if not 0 <= level < len(self.levels):
            raise ValueError(f"level {level} not in 0..{len(self.levels) - 1}")
        lv = self.levels[level]
        return interpolate(field, self.faces, lv.tri, lv.bary)

    def compute_hash(self) -> str:
        return hash_arrays(*(a for _, a in sorted(_arrays(self, with_hash=False).items())))


# --------------------------------------------------------------------------- persistence
def _arrays(t: Template, with_hash: bool = True) -> dict[str, np.ndarray]:
    out = {
        "format_version": np.array(FORMAT_VERSION, np.int64),
        "mean": np.asarray(t.mean, np.float32),
        "faces": np.asarray(t.faces, np.int32),
        "uv": np.asarray(t.uv, np.float32),
        "boundary": np.asarray(t.boundary, np.int64),
        "mask": np.asarray(t.mask, bool),
        "regions": np.asarray(t.regions, np.int8),
        "region_names": np.array(list(t.region_names), dtype=str),
        "landmark_names": np.array(list(t.landmarks), dtype=str).reshape(-1),
        "landmark_index": np.array(list(t.landmarks.values()), np.int64).reshape(-1),
        "source_hash": np.array(t.source_hash, dtype=str),
        "unwrap_method": np.array(t.unwrap_method, dtype=str),
        "n_levels": np.array(len(t.levels), np.int64),
        "grid_sizes": np.array(sorted(t.grids), np.int64).reshape(-1),
    }
    for name, lv in [(f"level{i}", lv) for i, lv in enumerate(t.levels)] + \
                    [(f"grid{n}", t.grids[n]) for n in sorted(t.grids)]:
        for key in _LEVEL_KEYS:
            out[f"{name}_{key}"] = getattr(lv, key)
    if with_hash:
        out["hash"] = np.array(t.hash, dtype=str)
    return out


def save_template(path: str | os.PathLike, t: Template) -> str:
    """Write ``t`` to ``path`` (npz, atomically); sets and returns ``t.hash``."""
    t.hash = t.compute_hash()
    atomic_save_npz(path, **_arrays(t))
    return t.hash


def load_template(path: str | os.PathLike) -> Template:
    """Read a template.npz; InputError when missing, truncated, corrupt, of another
    format version, or when its content does not match its stored hash."""
    path = Path(path)
    data = read_npz(path, "template", absent_hint="run the template stage", bad_hint="rerun the template stage")
    version = int(data["format_version"]) if "format_version" in data else -1
    if version != FORMAT_VERSION:
        raise InputError(f"template format_version {version} is not {FORMAT_VERSION}; "
                         "rerun the template stage", path)
    try:
        n_levels = int(data["n_levels"])

        def level(name):
            return Level(**{k: data[f"{name}_{k}"] for k in _LEVEL_KEYS})

        t = Template(
            mean=data["mean"], faces=data["faces"], uv=data["uv"], boundary=data["boundary"],
            mask=data["mask"], levels=[level(f"level{i}") for i in range(n_levels)],
            regions=data["regions"], region_names=[str(x) for x in data["region_names"]],
            landmarks={str(k): int(v) for k, v in zip(data["landmark_names"], data["landmark_index"])},
            source_hash=str(data["source_hash"]), hash=str(data["hash"]),
            unwrap_method=str(data["unwrap_method"]),
            grids={int(n): level(f"grid{int(n)}") for n in data["grid_sizes"]},
        )
    except KeyError as exc:
        raise InputError(f"template is missing array {exc}", path) from None
    if t.compute_hash() != t.hash:
        raise InputError("template content does not match its stored hash: the file is corrupt", path)
    return t


# --------------------------------------------------------------------------- regions
#: Anthropometric fallbacks (mm) relative to the nose tip when landmarks are missing.
_FALLBACK = {"eye_dx": 31.0, "eye_dy": 35.0, "mouth_dy": -33.0, "eye_half": 14.0, "mouth_half": 25.0}


def face_anchors(vertices: np.ndarray, landmarks: dict[str, int]) -> dict[str, np.ndarray | float]:
    """Nose tip, eye centres, mouth centre (3-D, mm) and eye / mouth half-widths (mm) of a
    face ``vertices (V, 3)``, from ``landmarks`` where present, else from the most
    protruding (max z) vertex near the vertical midline plus anthropometric offsets."""
    v = np.asarray(vertices, np.float64)
    lm = {k: v[i] for k, i in landmarks.items() if 0 <= i < len(v)}
    if "nose_tip" in lm:
        nose = lm["nose_tip"]
    else:
        cx = 0.5 * (v[:, 0].min() + v[:, 0].max())
        ext = v[:, 0].max() - v[:, 0].min()
        central = np.flatnonzero(np.abs(v[:, 0] - cx) <= 0.1 * ext)
        nose = v[central[np.argmax(v[central, 2])]]
    fb = _FALLBACK
    eyes = {}
    half = []
    for side, sx in (("L", 1.0), ("R", -1.0)):
        o, i = lm.get(f"eye_outer_{side}"), lm.get(f"eye_inner_{side}")
        if o is not None and i is not None:
            eyes[side] = 0.5 * (o + i)
            half.append(0.5 * np.linalg.norm((o - i)[:2]))
        else:
            eyes[side] = nose + np.array([sx * fb["eye_dx"], fb["eye_dy"], 0.0])
    mL, mR = lm.get("mouth_corner_L"), lm.get("mouth_corner_R")
    if mL is not None and mR is not None:
        mouth, mouth_half = 0.5 * (mL + mR), 0.5 * float(np.linalg.norm((mL - mR)[:2]))
    else:
        mouth, mouth_half = nose + np.array([0.0, fb["mouth_dy"], 0.0]), fb["mouth_half"]
    return {"nose_tip": nose, "eye_L": eyes["L"], "eye_R": eyes["R"], "mouth": mouth,
            "eye_half": float(np.mean(half)) if half else fb["eye_half"], "mouth_half": mouth_half}


def face_regions(vertices: np.ndarray, landmarks: dict[str, int]) -> np.ndarray:
    """Region label (V,) int8 into :data:`REGION_NAMES` for a face ``vertices (V, 3)``.

    With ``d`` the inter-ocular distance (between eye centres), eye half-width ``ew``,
    mouth half-width ``mw``, eye line ``ey`` and face centre ``cx`` (midpoint of the eyes),
    in the frontal projection:
    eyes: inside an ellipse of semi-axes (1.5 ew, 1.0 ew) around an eye centre;
    nose: ``nose_y - 0.25 d <= y <= ey - 0.1 d`` and ``|x - nose_x|`` below a half-width
    going linearly from 0.4 d (bottom) to 0.12 d (top);
    mouth: ellipse of semi-axes (1.35 mw, 0.7 mw) around the mouth centre;
    forehead: ``y >= ey + 0.4 d`` and ``|x - cx| <= 1.1 d``;
    cheeks: ``mouth_y - 0.2 d <= y < ey + 0.4 d`` and ``|x - cx| <= 1.25 d``;
    other: everything else (chin, jaw, sides, ears, neck).
    """
    v = np.asarray(vertices, np.float64)
    a = face_anchors(v, landmarks)
    eL, eR, nose, mouth = a["eye_L"], a["eye_R"], a["nose_tip"], a["mouth"]
    d = float(np.linalg.norm((eL - eR)[:2]))
    ew, mw = a["eye_half"], a["mouth_half"]
    ey = 0.5 * (eL[1] + eR[1])
    cx = 0.5 * (eL[0] + eR[0])
    x, y = v[:, 0], v[:, 1]
    label = np.full(len(v), REGION_NAMES.index("other"), np.int8)
    assigned = np.zeros(len(v), bool)

    def put(name, sel):
        nonlocal assigned
        sel = sel & ~assigned
        label[sel] = REGION_NAMES.index(name)
        assigned |= sel

    eyes = np.zeros(len(v), bool)
    for e in (eL, eR):
        eyes |= ((x - e[0]) / (1.5 * ew)) ** 2 + ((y - e[1]) / (1.0 * ew)) ** 2 <= 1
    put("eyes", eyes)
    y0, y1 = nose[1] - 0.25 * d, ey - 0.1 * d
    frac = np.clip((y - y0) / max(y1 - y0, 1e-9), 0, 1)
    put("nose", (y >= y0) & (y <= y1) & (np.abs(x - nose[0]) <= (0.4 - 0.28 * frac) * d))
    put("mouth", ((x - mouth[0]) / (1.35 * mw)) ** 2 + ((y - mouth[1]) / (0.7 * mw)) ** 2 <= 1)
    put("forehead", (y >= ey + 0.4 * d) & (np.abs(x - cx) <= 1.1 * d))
    put("cheeks", (y >= mouth[1] - 0.2 * d) & (y < ey + 0.4 * d) & (np.abs(x - cx) <= 1.25 * d))
    return label


# --------------------------------------------------------------------------- building
def mask_raster(locator: UVLocator, resolution: int) -> np.ndarray:
    """(H, W) = (resolution, resolution) bool mask, row 0 at v = 1 (pixel centres)."""
    c = (np.arange(resolution) + 0.5) / resolution
    uu, vv = np.meshgrid(c, 1.0 - c, indexing="xy")
    _, _, inside = locator.locate(np.stack([uu.ravel(), vv.ravel()], axis=1))
    return inside.reshape(resolution, resolution)


def build_template(vertices: np.ndarray, faces: np.ndarray, source_uv: np.ndarray | None = None,
                   landmarks: dict[str, int] | None = None, source_hash: str = "",
                   unwrap_method: str = "auto", levels: int = 3, uv_grids: list[int] | None = None,
                   mask_resolution: int = 256, margin: float = 0.02,
                   path=None) -> tuple[Template, dict]:
    """Build a :class:`Template` from a mean face ``vertices (V, 3)`` and ``faces (F, 3)``.

    Returns the template (hash set) and a report dict (unwrap method, notes, distortion
    statistics, counts, timings) for ``unwrap.json``. InputError (naming ``path``) when the
    region is not a disc or cannot be unwrapped without flips.
    """
    t0 = time.perf_counter()
    v = np.asarray(vertices, np.float32)
    f = np.asarray(faces, np.int32)
    res = unwrap(v, f, source_uv, unwrap_method, margin, path=path)
    t_unwrap = time.perf_counter() - t0
    locator = UVLocator(res.uv, f)
    mask = mask_raster(locator, mask_resolution)
    t1 = time.perf_counter()
    lvls = [subdivide(f, len(v), lv, res.uv) for lv in range(levels + 1)]
    grids = {int(n): uv_grid_from(locator, int(n)) for n in (uv_grids or [])}
    t_levels = time.perf_counter() - t1
    lm = dict(landmarks or {})
    regions = face_regions(v, lm)
    t = Template(mean=v, faces=f, uv=res.uv, boundary=res.topology.outer, mask=mask,
                 levels=lvls, regions=regions, region_names=list(REGION_NAMES), landmarks=lm,
                 source_hash=source_hash, unwrap_method=res.method, grids=grids)
    t.__dict__["locator"] = locator  # prime the cache
    t.hash = t.compute_hash()
    report = {
        "method": res.method,
        "requested": unwrap_method,
        "notes": res.notes,
        "stats": res.stats.as_dict(),
        "n_vertices": int(len(v)),
        "n_faces": int(len(f)),
        "n_holes": len(res.topology.holes),
        "hole_sizes": [int(len(h)) for h in res.topology.holes],
        "boundary_vertices": int(len(res.topology.outer)),
        "uv_range": [[float(x) for x in res.uv.min(0)], [float(x) for x in res.uv.max(0)]],
        "mask_fraction": float(mask.mean()),
        "levels": [{"level": i, "points": lv.n_points, "triangles": int(len(lv.faces))}
                   for i, lv in enumerate(lvls)],
        "grids": [{"n": n, "points": g.n_points, "triangles": int(len(g.faces))} for n, g in grids.items()],
        "region_counts": {name: int((regions == i).sum()) for i, name in enumerate(REGION_NAMES)},
        "landmarks_used": sorted(lm),
        "seconds": {"unwrap": round(t_unwrap, 3), "levels": round(t_levels, 3),
                    "total": round(time.perf_counter() - t0, 3)},
        "source_hash": source_hash,
        "template_hash": t.hash,
    }
    return t, report


def run_template(cfg) -> None:
    """The ``template`` stage: registered.h5 (train split) -> template/{template.npz,
    uv_mask.png, unwrap.json, uv_layout.png, levels.png}."""
    from cm3dmm.paths import RunPaths
    from cm3dmm.registered import read_registered

    paths = RunPaths(Path(cfg.run_dir))
    tc = cfg.template
    data = read_registered(paths.registered, with_scans=False)
    train = data.indices("train")
    if len(train) == 0:
        raise InputError("the train split is empty", paths.registered)
    mean = data.vertices[train].astype(np.float64).mean(axis=0).astype(np.float32)
    t, report = build_template(
        mean, data.faces, data.uv, data.landmarks, source_hash=data.content_hash(),
        unwrap_method=tc.unwrap, levels=tc.levels, uv_grids=tc.uv_grids,
        mask_resolution=tc.mask_resolution, margin=tc.margin, path=paths.registered)
    report["train_samples"] = int(len(train))
    save_template(paths.template, t)
    save_mask_png(paths.uv_mask, t.mask)
    atomic_write_json(paths.unwrap, report)
    plot_uv_layout(paths.uv_layout, t)
    render_levels(paths.levels_png, t, levels=range(min(4, len(t.levels))))
    s = report["stats"]
    log.info("template: %d vertices, unwrap %s (angle %.3f mean / %.3f worst, area %.3f / %.3f, "
             "%d flipped), %d levels, %.1f s", t.n_vertices, t.unwrap_method, s["angle_mean"],
             s["angle_max"], s["area_mean"], s["area_max"], s["n_flipped"], len(t.levels),
             report["seconds"]["total"])


# --------------------------------------------------------------------------- pictures
def save_mask_png(path, mask: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(mask, np.uint8) * 255).save(tmp)


def plot_uv_layout(path, t: Template, dpi: int = 150) -> None:
    """The UV triangles over the mask, outer ring in red (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection

    fig, ax = plt.subplots(figsize=(8, 8))
    ax.imshow(t.mask, extent=(0, 1, 0, 1), origin="upper", cmap="Greys", vmin=0, vmax=4,
              interpolation="nearest")
    lw = float(np.clip(40.0 / np.sqrt(len(t.faces)), 0.05, 0.8))
    ax.triplot(t.uv[:, 0], t.uv[:, 1], t.faces, color="#1f4e9c", lw=lw)
    ring = t.uv[np.concatenate([t.boundary, t.boundary[:1]])]
    ax.add_collection(LineCollection([ring], colors="red", linewidths=1.2))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("u")
    ax.set_ylabel("v")
    ax.set_title(f"UV layout ({t.unwrap_method}): {t.n_vertices} vertices, {len(t.faces)} triangles")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)


def render_levels(path, t: Template, levels=range(4), size: int = 420) -> None:
    """Upsampling levels of the mean face with their wireframe (PyVista off-screen): top
    row the whole face (wireframe drawn while it stays legible), bottom row one fixed
    close-up window between the nose tip and the left eye, where every level's triangles
    are visible."""
    import ctypes.util

    if not os.environ.get("DISPLAY") and ctypes.util.find_library("EGL"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    import pyvista as pv

    levels = list(levels)
    anchors = face_anchors(t.mean, t.landmarks)
    focus = 0.5 * (anchors["nose_tip"] + anchors["eye_L"])
    ext = float((t.mean.max(0) - t.mean.min(0))[:2].max())
    pl = pv.Plotter(off_screen=True, shape=(2, len(levels)), window_size=(size * len(levels), 2 * size),
                    border=False)
    pl.set_background("white")
    for col, lv in enumerate(levels):
        L = t.levels[lv]
        pts = t.level_points(t.mean.astype(np.float64), lv)
        mesh = pv.PolyData(pts, np.hstack([np.full((len(L.faces), 1), 3), L.faces]).astype(np.int64))
        for row in range(2):
            pl.subplot(row, col)
            edges = row == 1 or len(L.faces) <= 40_000
            pl.add_mesh(mesh, color=(0.87, 0.74, 0.66), show_edges=edges, edge_color=(0.15, 0.15, 0.3),
                        line_width=0.4 if row == 0 else 1.0, smooth_shading=False)
            label = (f"level {lv}: {L.n_points} points, {len(L.faces)} triangles" if row == 0
                     else "close-up (same window in every column)")
            pl.add_text(label, font_size=8, color="black")
            centre = t.mean.mean(0) if row == 0 else focus
            pl.camera.focal_point = tuple(centre)
            pl.camera.position = tuple(centre + np.array([0.0, 0.0, 4 * ext]))
            pl.camera.up = (0.0, 1.0, 0.0)
            pl.camera.parallel_projection = True
            pl.camera.parallel_scale = 0.6 * ext if row == 0 else 0.035 * ext
    with atomic_path(path) as tmp:
        pl.screenshot(str(tmp))
    pl.close()

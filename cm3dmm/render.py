"""Headless rendering of face meshes with VTK, composed into labelled PNG grids.

The renderer is VTK (the library under PyVista, used directly so that one window and one
polydata are reused for every cell) in an off-screen window; no display is needed.
Without ``$DISPLAY`` VTK (>= 9.4 wheels) falls back to EGL (Mesa's ``libEGL``; on
Debian/Ubuntu: ``apt-get install -y libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri``) or to
OSMesa. When ``$DISPLAY`` is unset and ``libEGL`` is present, EGL is selected directly,
which skips VTK's warning about a missing X server.

Camera: a front view looking down ``-z`` (the viewer faces the subject; the subject's left,
``+x``, is on the right of the image; ``+y`` is up), orthographic, fitted to the bounding
box of *all* meshes of a call so every cell of a grid shares one camera and scale.

Public API:
    render_images(vertices (N, V, 3), faces (F, 3), ...) -> (N, size, size, 3) uint8
    render_grid(vertices (R, C, V, 3), faces, path, ...)   one labelled PNG
    render_mesh(vertices (V, 3), faces, path, ...)        one PNG

Per-vertex scalars are mapped through a matplotlib colour map with one shared ``clim`` and
one colour bar (e.g. error heat maps in mm).
"""

from __future__ import annotations

import ctypes.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cm3dmm.geometry import vertex_normals
from cm3dmm.io.atomic import atomic_path

log = logging.getLogger(__name__)

#: Base colour of meshes without scalars: a light, slightly warm skin tone (RGB in [0, 1]).
SKIN = (0.87, 0.74, 0.66)
#: Background of rendered cells.
BACKGROUND = (1.0, 1.0, 1.0)
#: Default supersampling: cells are rendered at this multiple of ``size`` and box-filtered down.
SUPERSAMPLE = 2


def _select_backend() -> None:
    """Pick EGL explicitly on display-less machines (VTK would otherwise try X first)."""
    if os.environ.get("DISPLAY") or os.environ.get("VTK_DEFAULT_OPENGL_WINDOW"):
        return
    if ctypes.util.find_library("EGL"):
        os.environ["VTK_DEFAULT_OPENGL_WINDOW"] = "vtkEGLRenderWindow"


def _import_vtk():
    _select_backend()
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (registers the OpenGL render window)
    from vtkmodules import vtkCommonCore, vtkCommonDataModel, vtkRenderingCore
    from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy

    class _VTK:  # the few classes used here, from the light-weight vtkmodules packages
        vtkPoints = vtkCommonCore.vtkPoints
        vtkUnsignedCharArray = vtkCommonCore.vtkUnsignedCharArray
        vtkPolyData = vtkCommonDataModel.vtkPolyData
        vtkCellArray = vtkCommonDataModel.vtkCellArray
        vtkPolyDataMapper = vtkRenderingCore.vtkPolyDataMapper
        vtkActor = vtkRenderingCore.vtkActor
        vtkRenderer = vtkRenderingCore.vtkRenderer
        vtkLight = vtkRenderingCore.vtkLight
        vtkRenderWindow = vtkRenderingCore.vtkRenderWindow

    return _VTK, vtk_to_numpy, numpy_to_vtk


# --------------------------------------------------------------------------- validation
def _check_mesh_arrays(vertices: np.ndarray, faces: np.ndarray, lead: int) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces)
    if v.ndim != lead + 2 or v.shape[-1] != 3:
        raise ValueError(f"vertices must have {lead} leading axes then (V, 3), got shape {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError(f"faces must have shape (F, 3) with F > 0, got {f.shape}")
    if not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"faces must be integers, got {f.dtype}")
    if f.min() < 0 or f.max() >= v.shape[-2]:
        raise ValueError(f"faces index vertex {int(f.max())} of {v.shape[-2]} vertices")
    if not np.isfinite(v).all():
        raise ValueError("vertices contain NaN or infinite values")
    return v, f.astype(np.int64)


@dataclass
class _Camera:
    center: np.ndarray  # (3,)
    half_height: float  # orthographic half extent (mm), square cells
    depth: float  # extent along z


def _fit_camera(v: np.ndarray, margin: float = 0.06) -> _Camera:
    """Orthographic front camera that fits the union bounding box of v (..., V, 3)."""
    pts = v.reshape(-1, 3)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    center = (lo + hi) / 2
    ext = hi - lo
    half = max(ext[0], ext[1]) / 2 * (1 + margin)
    return _Camera(center=center, half_height=float(max(half, 1e-6)), depth=float(max(ext[2], 1e-6)))


def _colours(scalars: np.ndarray, clim: tuple[float, float], cmap: str) -> np.ndarray:
    """Map scalars (...,) to uint8 RGB (..., 3) through a matplotlib colour map."""
    import matplotlib

    lo, hi = clim
    t = (np.asarray(scalars, np.float64) - lo) / (hi - lo if hi > lo else 1.0)
    rgba = matplotlib.colormaps[cmap](np.clip(np.nan_to_num(t, nan=0.0), 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def _resolve_clim(scalars: np.ndarray | None, clim) -> tuple[float, float] | None:
    if scalars is None:
        return None
    if clim is not None:
        lo, hi = float(clim[0]), float(clim[1])
        if not hi > lo:
            raise ValueError(f"clim must be (low, high) with high > low, got {clim}")
        return lo, hi
    finite = scalars[np.isfinite(scalars)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


# --------------------------------------------------------------------------- rendering
def render_images(
    vertices: np.ndarray,
    faces: np.ndarray,
    scalars: np.ndarray | None = None,
    clim: tuple[float, float] | None = None,
    cmap: str = "viridis",
    size: int = 256,
    wireframe: bool = False,
    color: tuple[float, float, float] = SKIN,
    supersample: int = SUPERSAMPLE,
) -> np.ndarray:
    """Render N meshes of one topology with one shared front camera.

    vertices: (N, V, 3) mm; faces: (F, 3) int; scalars: (N, V) or None (per-vertex values
    mapped through ``cmap`` over ``clim``; default clim = finite min/max over all N).
    Returns (N, size, size, 3) uint8 RGB images. One off-screen window is reused for all N.
    Anti-aliasing: rendered at ``supersample`` x the size and box-filtered down
    (``supersample=1``: no anti-aliasing, about 3x faster on a software renderer).
    """
    v, f = _check_mesh_arrays(vertices, faces, lead=1)
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels, got {size}")
    N, V = v.shape[:2]
    sc = None
    if scalars is not None:
        sc = np.asarray(scalars, np.float64)
        if sc.shape != (N, V):
            raise ValueError(f"scalars must have shape {(N, V)}, got {sc.shape}")
    lim = _resolve_clim(sc, clim)
    vtk, vtk_to_numpy, numpy_to_vtk = _import_vtk()
    cam = _fit_camera(v)
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    px = size * supersample

    # One polydata whose point, normal and colour arrays are numpy views updated in place.
    poly = vtk.vtkPolyData()
    points = vtk.vtkPoints()
    points.SetData(numpy_to_vtk(v[0].astype(np.float32), deep=1))
    poly.SetPoints(points)
    cells = vtk.vtkCellArray()
    cells.SetData(numpy_to_vtk(np.arange(0, 3 * len(f) + 1, 3, dtype=np.int64), deep=1),
                  numpy_to_vtk(f.ravel().astype(np.int64), deep=1))
    poly.SetPolys(cells)
    normals = numpy_to_vtk(np.zeros((V, 3), np.float32), deep=1)
    normals.SetName("Normals")
    poly.GetPointData().SetNormals(normals)
    pts_view = vtk_to_numpy(points.GetData())
    nrm_view = vtk_to_numpy(normals)
    rgb_view = None
    if sc is not None:
        rgb = numpy_to_vtk(np.zeros((V, 3), np.uint8), deep=1)
        rgb.SetName("rgb")
        poly.GetPointData().SetScalars(rgb)
        rgb_view = vtk_to_numpy(rgb)

    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputData(poly)
    if sc is not None:
        mapper.SetScalarModeToUsePointData()
        mapper.SetColorModeToDirectScalars()
        mapper.ScalarVisibilityOn()
    else:
        mapper.ScalarVisibilityOff()
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    prop = actor.GetProperty()
    prop.SetInterpolationToPhong()
    prop.SetColor(*color)
    prop.SetAmbient(0.22)
    prop.SetDiffuse(0.78)
    prop.SetSpecular(0.12)
    prop.SetSpecularPower(20.0)
    if wireframe:
        prop.EdgeVisibilityOn()
        prop.SetEdgeColor(0.2, 0.2, 0.2)
        prop.SetLineWidth(1.0)

    renderer = vtk.vtkRenderer()
    renderer.SetBackground(*BACKGROUND)
    renderer.AddActor(actor)
    renderer.AutomaticLightCreationOff()
    # Three lights fixed to the camera: key (upper left), fill (right), rim (top, behind).
    for pos, intensity in (((-0.6, 0.7, 1.0), 0.75), ((0.8, 0.1, 0.8), 0.35), ((0.0, 1.0, -0.3), 0.2)):
        light = vtk.vtkLight()
        light.SetLightTypeToCameraLight()
        light.SetPosition(*pos)
        light.SetFocalPoint(0.0, 0.0, 0.0)
        light.SetIntensity(intensity)
        renderer.AddLight(light)
    camera = renderer.GetActiveCamera()
    camera.ParallelProjectionOn()
    camera.SetFocalPoint(*cam.center)
    camera.SetPosition(*(cam.center + np.array([0.0, 0.0, 4.0 * cam.depth + 10.0 * cam.half_height])))
    camera.SetViewUp(0.0, 1.0, 0.0)
    camera.SetParallelScale(cam.half_height)

    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(px, px)
    window.AddRenderer(renderer)
    pixels = vtk.vtkUnsignedCharArray()
    out = np.empty((N, size, size, 3), np.uint8)
    try:
        for i in range(N):
            pts_view[:] = v[i]
            nrm_view[:] = vertex_normals(v[i], f)
            points.Modified()
            normals.Modified()
            if rgb_view is not None:
                rgb_view[:] = _colours(sc[i], lim, cmap)
                poly.GetPointData().GetScalars().Modified()
            poly.Modified()
            renderer.ResetCameraClippingRange()
            window.Render()
            window.GetPixelData(0, 0, px - 1, px - 1, 1, pixels, 0)
            img = vtk_to_numpy(pixels).reshape(px, px, -1)[::-1, :, :3]
            out[i] = _downsample(img, supersample)
    finally:
        window.Finalize()
    return out


def _downsample(img: np.ndarray, k: int) -> np.ndarray:
    """Box-filter an (H*k, W*k, 3) uint8 image to (H, W, 3)."""
    if k == 1:
        return img
    acc = np.zeros((img.shape[0] // k, img.shape[1] // k, 3), np.uint16)
    for dy in range(k):
        for dx in range(k):
            acc += img[dy::k, dx::k]
    return ((acc + (k * k) // 2) // (k * k)).astype(np.uint8)


# --------------------------------------------------------------------------- composition
def _compose(
    images: np.ndarray,
    path: str | os.PathLike,
    row_labels=None,
    col_labels=None,
    clim=None,
    cmap: str = "viridis",
    scalar_label: str = "",
    title: str | None = None,
) -> None:
    """Lay out (R, C, H, W, 3) images 1:1 in pixels with labels and an optional colour bar."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    R, C, H, W = images.shape[:4]
    dpi = 100.0
    font = float(np.clip(H / 18.0, 7.0, 14.0))
    pad = int(round(font * 0.6))
    left = int(round(font * 1.9)) if row_labels is not None else pad
    top = (int(round(font * 2.0)) if col_labels is not None else pad) + (int(round(font * 2.4)) if title else 0)
    right = int(round(font * 5.5 + 12)) if clim is not None else pad
    bottom = pad
    fw, fh = left + C * W + right, top + R * H + bottom
    fig = plt.figure(figsize=(fw / dpi, fh / dpi), dpi=dpi)
    try:
        for r in range(R):
            for c in range(C):
                x0 = left + c * W
                y0 = fh - top - (r + 1) * H
                ax = fig.add_axes([x0 / fw, y0 / fh, W / fw, H / fh])
                ax.imshow(images[r, c], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                for s in ax.spines.values():
                    s.set_visible(False)
                if col_labels is not None and r == 0:
                    ax.set_title(str(col_labels[c]), fontsize=font, pad=font * 0.3)
                if row_labels is not None and c == 0:
                    ax.set_ylabel(str(row_labels[r]), fontsize=font)
        if clim is not None:
            cax = fig.add_axes([(left + C * W + font * 0.8) / fw, (bottom + R * H * 0.1) / fh,
                                font * 1.0 / fw, R * H * 0.8 / fh])
            sm = ScalarMappable(norm=Normalize(vmin=clim[0], vmax=clim[1]), cmap=cmap)
            cb = fig.colorbar(sm, cax=cax)
            cb.ax.tick_params(labelsize=font * 0.85)
            if scalar_label:
                cb.set_label(scalar_label, fontsize=font * 0.9)
        if title:
            fig.text(0.5, 1 - (font * 1.1) / fh, title, ha="center", va="center", fontsize=font * 1.15)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png", facecolor="white")
    finally:
        plt.close(fig)


def render_grid(
    vertices: np.ndarray,
    faces: np.ndarray,
    path: str | os.PathLike,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    scalars: np.ndarray | None = None,
    clim: tuple[float, float] | None = None,
    cmap: str = "viridis",
    scalar_label: str = "",
    size: int = 256,
    title: str | None = None,
    wireframe: bool = False,
) -> Path:
    """Render an R x C grid of faces (one shared front camera) into one PNG, atomically.

    vertices: (R, C, V, 3) mm; faces: (F, 3); scalars: (R, C, V) or None (one colour bar,
    labelled ``scalar_label``, over ``clim`` — default the finite min/max of all scalars).
    Each cell is ``size`` x ``size`` pixels, placed 1:1; labels, title and colour bar add
    margins. Returns ``path``.
    """
    v = np.asarray(vertices)
    if v.ndim != 4:
        raise ValueError(f"vertices must have shape (R, C, V, 3), got {v.shape}")
    R, C, V = v.shape[:3]
    if row_labels is not None and len(row_labels) != R:
        raise ValueError(f"{len(row_labels)} row labels for {R} rows")
    if col_labels is not None and len(col_labels) != C:
        raise ValueError(f"{len(col_labels)} column labels for {C} columns")
    sc = None
    if scalars is not None:
        sc = np.asarray(scalars, np.float64)
        if sc.shape != (R, C, V):
            raise ValueError(f"scalars must have shape {(R, C, V)}, got {sc.shape}")
        sc = sc.reshape(R * C, V)
    lim = _resolve_clim(sc, clim)
    imgs = render_images(v.reshape(R * C, V, 3), faces, scalars=sc, clim=lim, cmap=cmap, size=size,
                         wireframe=wireframe)
    _compose(imgs.reshape(R, C, size, size, 3), path, row_labels, col_labels, lim, cmap, scalar_label, title)
    return Path(path)


def render_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    path: str | os.PathLike,
    scalars: np.ndarray | None = None,
    clim: tuple[float, float] | None = None,
    cmap: str = "viridis",
    scalar_label: str = "",
    size: int = 512,
    title: str | None = None,
    wireframe: bool = False,
) -> Path:
    """Render one mesh (V, 3) to a PNG, atomically.

    Without scalars and title the PNG is exactly ``size`` x ``size`` pixels; with scalars a
    colour bar is added on the right. scalars: (V,) or None. Returns ``path``.
    """
    v = np.asarray(vertices)
    if v.ndim != 2:
        raise ValueError(f"vertices must have shape (V, 3), got {v.shape}")
    sc = None if scalars is None else np.asarray(scalars, np.float64)[None]
    lim = _resolve_clim(sc, clim)
    img = render_images(v[None], faces, scalars=sc, clim=lim, cmap=cmap, size=size, wireframe=wireframe)
    if sc is None and not title:
        from PIL import Image

        with atomic_path(path) as tmp:
            Image.fromarray(img[0]).save(tmp, format="PNG")
    else:
        _compose(img[None], path, None, None, lim, cmap, scalar_label, title)
    return Path(path)

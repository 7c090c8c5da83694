"""The ``facescape`` source: FaceScape v1.3 registered "TU" models, plus the download check.

FaceScape is licence-gated: it is obtained from its owners (https://facescape.nju.edu.cn/)
under their licence and is never downloaded by this tool. The user points
``data.facescape.path`` at the folder holding ``{id}/models_reg/{k}_{name}.obj`` (``k`` is
the expression's 1-based position in FaceScape's list, e.g. ``1/models_reg/2_smile.obj``);
an ``{id}_`` prefix on the file names and ``.obj.gz`` are tolerated, ``dpmap/`` is ignored.

The **download check** (:func:`check_facescape`) runs before anything else: it lists every
missing (identity, expression) pair and then reads every present file, reporting every
unreadable one and every mesh whose vertex count differs from the majority; TU models of
FaceScape v1.3 have 26,317 vertices (:data:`TU_VERTICES`), and a majority count other than that
is reported too. Missing pairs are allowed when ``allow_missing`` (the release's list holds
5,996 of the 6,000 pairs, missing 54/10, 66/15, 73/20 and 215/9; 5,596 of them in identities
1-280, of which the release trains 5,595) but reported; unreadable or mismatched files are fatal.
:func:`load` performs the same check in the same single pass over the files and keeps the
(cropped) vertices.

The TU models are assumed to be in the project's axes (x to the subject's left, y up, z out
of the face); ``units`` converts them to mm. ``crop`` selects the front face region the paper
models (12,483 vertices, :data:`FRONT_VERTICES`): ``front`` (the release's ``front_faces.npy``
found beside the TU-model folder, :func:`front_faces_file`), the path of a ``front_faces.npy`` (its
triangles, in TU vertex ids or in the region's own compact ids, 0- or 1-based; see
:func:`front_region_indices`), a vertex-index file or a UV mask image (:mod:`cm3dmm.sources.crop`).

**Detail scans** (``scans``, optional): a folder holding ``{id}/{k}_{name}.ply`` (or ``.obj``,
``[.gz]``, an ``{id}_`` prefix tolerated, also under ``{id}/models_scan/``), in the TU models'
frame and units. Each found scan becomes the face's scan in the registered data; the cache keeps
its points within ``cache.scan_distance`` of the registered surface with the UV of their
projection (the release's continuous samples) and training reads them with
``train.continuous: scan``. Faces without a scan train on points of their registered surface.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError
from cm3dmm.io.mesh import read_mesh, read_vertices
from cm3dmm.registered import FACESCAPE_EXPRESSIONS, RegisteredData
from cm3dmm.sources.crop import apply_crop, crop_indices, unit_scale

log = logging.getLogger(__name__)

LICENCE_HINT = ("FaceScape is obtained from its owners under licence (https://facescape.nju.edu.cn/) "
                "and is never downloaded by cm3dmm; point data.facescape.path at your copy of the "
                "TU models ({id}/models_reg/{k}_{name}.obj)")

#: How many entries of each list an error message shows.
SHOW = 20
#: vertices of a FaceScape v1.3 TU model
TU_VERTICES = 26317
#: vertices of the front face region the paper models (the release's front_faces.npy)
FRONT_VERTICES = 12483
#: (identity, expression number) pairs missing from the release's list of 5,996 faces
RELEASE_MISSING = ((54, 10), (66, 15), (73, 20), (215, 9))


@dataclass
class FaceScapeCheck:
    """Result of the download check. Paths are strings; pairs are (identity, expression)."""

    root: str
    n_expected: int = 0
    found: list[tuple[int, str, str]] = field(default_factory=list)  #: (id, expression, file)
    missing: list[tuple[int, str]] = field(default_factory=list)
    missing_identities: list[int] = field(default_factory=list)  #: no file of any expression
    unreadable: list[tuple[str, str]] = field(default_factory=list)  #: (file, reason)
    mismatched: list[tuple[str, int]] = field(default_factory=list)  #: (file, vertex count)
    vertex_count: int = 0  #: the majority vertex count
    allow_missing: bool = True
    seconds: float = 0.0

    @property
    def n_found(self) -> int:
        return len(self.found)

    @property
    def fatal(self) -> bool:
        return bool(self.unreadable or self.mismatched or not self.found
                    or (self.missing and not self.allow_missing))

    def problems(self) -> list[str]:
        """One line per problem found (missing pairs, unreadable and mismatched files)."""
        out = [f"missing: identity {i} expression {e}" for i, e in self.missing]
        out += [f"unreadable: {f}: {why}" for f, why in self.unreadable]
        out += [f"vertex count {n} differs from the majority {self.vertex_count}: {f}"
                for f, n in self.mismatched]
        if self.vertex_count and self.vertex_count != TU_VERTICES:
            out.append(f"the TU models have {self.vertex_count} vertices, FaceScape v1.3's have {TU_VERTICES}")
        return out

    def summary(self) -> str:
        tu = "" if not self.vertex_count or self.vertex_count == TU_VERTICES else \
            f" (FaceScape v1.3 TU models have {TU_VERTICES})"
        return (f"FaceScape check of {self.root}: {self.n_found} of {self.n_expected} meshes found, "
                f"{len(self.missing)} missing, {len(self.unreadable)} unreadable, "
                f"{len(self.mismatched)} with a vertex count other than {self.vertex_count}{tu}")

    def message(self) -> str:
        """A one-line, user-facing description of the fatal problems."""
        parts = [self.summary()]
        if not self.found:
            parts.append("no TU model was found")
        if self.missing and not self.allow_missing:
            parts.append("missing (allow_missing is false): " + _show(
                [f"{i}/{e}" for i, e in self.missing]))
        if self.unreadable:
            parts.append("unreadable: " + _show([f"{f} ({why})" for f, why in self.unreadable]))
        if self.mismatched:
            parts.append("wrong vertex count: " + _show([f"{f} ({n})" for f, n in self.mismatched]))
        return "; ".join(parts) + ". " + LICENCE_HINT

    def to_dict(self) -> dict:
        return {
            "root": self.root, "n_expected": self.n_expected, "n_found": self.n_found,
            "missing": [[i, e] for i, e in self.missing],
            "missing_identities": self.missing_identities,
            "unreadable": [[f, w] for f, w in self.unreadable],
            "mismatched": [[f, n] for f, n in self.mismatched],
            "vertex_count": self.vertex_count, "tu_vertices": TU_VERTICES,
            "seconds": round(self.seconds, 3),
        }

    def raise_if_fatal(self) -> None:
        if self.fatal:
            raise InputError(self.message())


def _show(items: list[str]) -> str:
    return ", ".join(items[:SHOW]) + (f" ... ({len(items) - SHOW} more)" if len(items) > SHOW else "")


def _expression_number(name: str) -> int:
    if name not in FACESCAPE_EXPRESSIONS:
        raise InputError(f"data.facescape.expressions: {name!r} is not a FaceScape expression "
                         f"({', '.join(FACESCAPE_EXPRESSIONS)})")
    return FACESCAPE_EXPRESSIONS.index(name) + 1


def find_model(root: Path, identity: int, expression: str) -> Path | None:
    """The TU model file of one (identity, expression), or None."""
    k = _expression_number(expression)
    folder = root / str(identity) / "models_reg"
    for stem in (f"{k}_{expression}", f"{identity}_{k}_{expression}"):
        for suffix in (".obj", ".obj.gz"):
            f = folder / f"{stem}{suffix}"
            if f.is_file():
                return f
    return None


def find_scan(root: Path, identity: int, expression: str) -> Path | None:
    """The detail scan of one (identity, expression) under the scans folder ``root``, or None."""
    k = _expression_number(expression)
    for folder in (root / str(identity), root / str(identity) / "models_scan"):
        for stem in (f"{k}_{expression}", f"{identity}_{k}_{expression}"):
            for suffix in (".ply", ".obj", ".ply.gz", ".obj.gz"):
                f = folder / f"{stem}{suffix}"
                if f.is_file():
                    return f
    return None


def front_region_indices(path: str | Path, mesh) -> np.ndarray | None:
    """TU vertex ids (K,) of the front region given by the release's ``front_faces.npy``, or None
    when ``path`` does not hold triangles (then it is an ordinary crop file).

    The triangles may use TU vertex ids (the region's vertices are the ones they use) or the
    region's own compact ids ``0 .. K-1``; 1-based files are shifted (the release subtracts 1 when
    the minimum is 1). Compact ids name the first K TU vertices when every triangle is then a TU
    triangle; otherwise the map to the TU mesh cannot be derived from the file (InputError: give a
    vertex-index file instead).
    """
    path = Path(path)
    if path.suffix.lower() != ".npy" or not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception:  # noqa: BLE001 - crop_indices reports unreadable files
        return None
    if arr.ndim != 2 or arr.shape[1] != 3 or not np.issubdtype(arr.dtype, np.integer) or not len(arr):
        return None
    tri = arr.astype(np.int64)
    if tri.min() == 1:
        tri = tri - 1
    n = mesh.n_vertices
    if tri.min() < 0 or tri.max() >= n:
        raise InputError(f"front-region triangles use vertex ids {int(tri.min())}..{int(tri.max())}, outside "
                         f"the TU model's 0..{n - 1}", path)
    used = np.unique(tri)
    tu = {tuple(sorted(t)) for t in np.asarray(mesh.faces, np.int64).tolist()}
    as_tu = all(tuple(sorted(t)) in tu for t in tri.tolist())
    if len(used) == int(tri.max()) + 1 and len(used) < n:
        # compact ids: the first K TU vertices when that makes every triangle a TU triangle
        if as_tu:
            return used
        raise InputError(f"front-region triangles use compact ids 0..{len(used) - 1} that are not the first "
                         f"{len(used)} TU vertices; give the region's TU vertex ids (.npy / .txt) as "
                         f"data.facescape.crop", path)
    if not as_tu:
        raise InputError("front-region triangles are not triangles of the TU model", path)
    return used


def front_faces_file(root: Path) -> Path:
    """``crop: front``: the release's ``front_faces.npy`` beside or above the TU-model folder."""
    places = [root / "front_faces.npy", root / "predefined_model_data" / "front_faces.npy",
              root.parent / "predefined_model_data" / "front_faces.npy"]
    for f in places:
        if f.is_file():
            return f
    raise InputError("data.facescape.crop: 'front' needs the release's front_faces.npy (looked in "
                     + ", ".join(str(f) for f in places) + "); give its path (or a vertex-index file) as "
                     "data.facescape.crop, or \"\" for the whole TU model")


def _crop_indices(crop: str, mesh) -> np.ndarray:
    idx = front_region_indices(crop, mesh)
    if idx is None:
        return crop_indices(crop, mesh)
    if len(idx) != FRONT_VERTICES and mesh.n_vertices == TU_VERTICES:
        log.warning("the front region of %s has %d vertices; the paper's has %d", crop, len(idx), FRONT_VERTICES)
    return idx


def _root(cfg) -> Path:
    if not cfg.path:
        raise InputError("data.facescape.path is not set. " + LICENCE_HINT)
    root = Path(cfg.path)
    if not root.is_dir():
        raise InputError("FaceScape folder not found. " + LICENCE_HINT, root)
    return root


def _list(cfg) -> FaceScapeCheck:
    """Locate every configured file (no reading): found and missing pairs."""
    root = _root(cfg)
    for e in cfg.expressions:
        _expression_number(e)
    chk = FaceScapeCheck(root=str(root), n_expected=len(cfg.identities) * len(cfg.expressions),
                         allow_missing=cfg.allow_missing)
    for i in cfg.identities:
        hits = 0
        for e in cfg.expressions:
            f = find_model(root, i, e)
            if f is None:
                chk.missing.append((i, e))
            else:
                chk.found.append((i, e, str(f)))
                hits += 1
        if hits == 0:
            chk.missing_identities.append(i)
    if not chk.found:
        raise InputError(f"no FaceScape TU model found for the {len(cfg.identities)} configured "
                         f"identities (expected e.g. {root / '1' / 'models_reg' / '1_neutral.obj'}). "
                         + LICENCE_HINT, root)
    return chk


def _scan(cfg, keep=None) -> tuple[FaceScapeCheck, dict[int, np.ndarray]]:
    """The check: list, then read every found file once. ``keep(vertices) -> array`` (if given)
    is applied to every mesh with the first readable file's vertex count and kept."""
    t0 = time.perf_counter()
    chk = _list(cfg)
    counts: list[int] = []
    kept: dict[int, np.ndarray] = {}
    first_n = None
    for j, (_i, _e, f) in enumerate(chk.found):
        try:
            v = read_vertices(f)
        except InputError as exc:
            chk.unreadable.append((f, exc.problem))
            counts.append(-1)
            continue
        counts.append(len(v))
        if first_n is None:
            first_n = len(v)
        if keep is not None and len(v) == first_n:
            kept_v = keep(v)
            if kept_v is not None:
                kept[j] = kept_v
    good = [n for n in counts if n >= 0]
    if good:
        values, freq = np.unique(good, return_counts=True)
        chk.vertex_count = int(values[np.argmax(freq)])
        chk.mismatched = [(chk.found[j][2], n) for j, n in enumerate(counts)
                          if n >= 0 and n != chk.vertex_count]
    chk.seconds = time.perf_counter() - t0
    log.info("%s", chk.summary())
    return chk, kept


def check_facescape(cfg) -> FaceScapeCheck:
    """The download check for ``cfg`` (FaceScapeSourceConfig); see the module docstring.

    Raises :class:`InputError` only when the folder is absent or holds no TU model at all;
    otherwise the returned check lists every problem (``fatal`` says whether loading fails).
    """
    return _scan(cfg)[0]


def load_checked(cfg) -> tuple[RegisteredData, FaceScapeCheck]:
    """Check and load in one pass over the files; InputError (listing every problem) if fatal."""
    chk = _list(cfg)
    # the template: the first file that reads as a mesh
    template = None
    for _i, _e, f in chk.found:
        try:
            template = read_mesh(f)
            break
        except InputError:
            continue
    if template is None:
        chk, _ = _scan(cfg)
        raise InputError(chk.message())
    crop = str(front_faces_file(_root(cfg))) if cfg.crop == "front" else cfg.crop
    idx = _crop_indices(crop, template) if crop else np.arange(template.n_vertices)
    faces, uv = apply_crop(template, idx)
    scale = unit_scale(cfg.units, "data.facescape.units")
    n_template = template.n_vertices

    def keep(v: np.ndarray) -> np.ndarray | None:
        return (v[idx] * scale).astype(np.float32) if len(v) == n_template else None

    chk, kept = _scan(cfg, keep)
    chk.raise_if_fatal()
    if chk.vertex_count != n_template or len(kept) != chk.n_found:
        raise InputError(chk.message())
    if chk.missing:
        log.warning("FaceScape: %d of %d (identity, expression) pairs are missing: %s",
                    len(chk.missing), chk.n_expected, _show([f"{i}/{e}" for i, e in chk.missing]))
    scans = _read_scans(cfg, chk, scale)
    data = RegisteredData(
        scans=scans,
        vertices=np.stack([kept[j] for j in range(chk.n_found)]),
        faces=faces,
        subject=[str(i) for i, _e, _f in chk.found],
        expression=[e for _i, e, _f in chk.found],
        split=["train"] * chk.n_found,
        source="facescape",
        uv=uv,
        attrs={"source_path": str(Path(cfg.path).resolve()), "units_in": cfg.units,
               "crop": cfg.crop, "n_missing": len(chk.missing), "n_expected": chk.n_expected},
    )
    return data, chk


def _read_scans(cfg, chk: FaceScapeCheck, scale: float) -> dict[int, tuple[np.ndarray, np.ndarray | None]]:
    """The detail scans of the found faces (``cfg.scans``), keyed by the face's position, in mm."""
    folder = cfg.scans
    if not folder:
        return {}
    root = Path(folder)
    if not root.is_dir():
        raise InputError("data.facescape.scans: the detail-scan folder does not exist", root)
    scans = {}
    for j, (i, e, _f) in enumerate(chk.found):
        f = find_scan(root, i, e)
        if f is None:
            continue
        m = read_mesh(f)
        scans[j] = ((m.vertices * scale).astype(np.float32),
                    m.faces.astype(np.int32) if len(m.faces) else None)
    log.info("FaceScape: %d of %d faces have a detail scan in %s", len(scans), chk.n_found, root)
    if not scans:
        log.warning("data.facescape.scans: no detail scan found under %s (expected e.g. %s)", root,
                    root / "1" / "1_neutral.ply")
    return scans


def load(cfg) -> RegisteredData:
    """FaceScape TU models as registered data (the download check runs first; see module)."""
    return load_checked(cfg)[0]

"""The one normalised dataset format: ``registered.h5``.

Every source (anny, ict, facescape, manifest) produces a :class:`RegisteredData`; the data
stage validates it (:func:`validate`) and writes it atomically (:func:`write_registered`).
Every later stage reads it with :func:`read_registered`.

Layout (ARCHITECTURE.md):
    vertices   float32 (S, V, 3)   millimetres, x to the subject's left, y up, z out of the face
    faces      int32   (F, 3)      triangles of the modelled region
    uv         float32 (V, 2)      optional per-vertex UV from the source
    subject, expression, split     UTF-8 string arrays of length S (split in {train, test})
    landmarks  int32 (L,) + attribute ``landmark_names``   optional template landmark vertices
    scans/{k}  float32 (P, 3) [+ scans/{k}_faces int32 (G, 3)]  optional high-detail surfaces
    attributes: source, units="mm", format_version, content_hash
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError
from cm3dmm.io.atomic import atomic_path
from cm3dmm.io.hdf5 import hash_arrays, open_h5

FORMAT_VERSION = 1
SPLITS = ("train", "test")

#: The 20 FaceScape expressions, in FaceScape's order (index k -> file ``{k+1}_{name}``).
FACESCAPE_EXPRESSIONS = (
    "neutral", "smile", "mouth_stretch", "anger", "jaw_left", "jaw_right", "jaw_forward",
    "mouth_left", "mouth_right", "dimpler", "chin_raiser", "lip_puckerer", "lip_funneler",
    "sadness", "lip_roll", "grin", "cheek_blowing", "eye_closed", "brow_raiser", "brow_lower",
)

#: Subject ids and expression names become file names (``fits/{method}/{subject}.npz``) and
#: command-line arguments of the workflow's rules: a letter or digit, then letters, digits, ``.``,
#: ``_`` or ``-``; at most 100 characters (no spaces, no path separators, no ``..`` at the start).
NAME_RULE = "a letter or digit followed by letters, digits, '.', '_' or '-' (at most 100 characters)"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def name_problem(kind: str, value) -> str | None:
    """Why ``value`` is not a valid subject id / expression name (``kind``), or None if it is."""
    if isinstance(value, str) and _NAME_RE.fullmatch(value):
        return None
    return f"{kind} {value!r} is not a valid name: use {NAME_RULE}"


#: A plausible human face region spans roughly 60-400 mm along its largest axis.
PLAUSIBLE_EXTENT_MM = (60.0, 400.0)


@dataclass
class RegisteredData:
    """Registered meshes sharing one topology. Shapes: S samples, V vertices, F triangles."""

    vertices: np.ndarray  #: (S, V, 3) float32, mm
    faces: np.ndarray  #: (F, 3) int32
    subject: list[str]  #: (S,)
    expression: list[str]  #: (S,)
    split: list[str]  #: (S,) each "train" or "test"
    source: str = "unknown"
    uv: np.ndarray | None = None  #: (V, 2) float32 or None
    landmarks: dict[str, int] = field(default_factory=dict)  #: name -> vertex index
    scans: dict[int, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)
    #: sample index -> (points (P, 3) mm, triangles (G, 3) or None)
    attrs: dict = field(default_factory=dict)  #: extra provenance (seed, recipe, ...)

    @property
    def n_samples(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def n_vertices(self) -> int:
        return int(self.vertices.shape[1])

    def indices(self, split: str) -> np.ndarray:
        """Sample indices of one split, in file order."""
        return np.array([i for i, s in enumerate(self.split) if s == split], dtype=np.int64)

    def subjects(self, split: str | None = None) -> list[str]:
        """Distinct subjects (in first-appearance order), optionally of one split."""
        seen: dict[str, None] = {}
        for s, sp in zip(self.subject, self.split):
            if split is None or sp == split:
                seen.setdefault(s, None)
        return list(seen)

    def content_hash(self) -> str:
        meta = "|".join(self.subject) + "#" + "|".join(self.expression) + "#" + "|".join(self.split)
        arrays = [self.vertices, self.faces] + ([self.uv] if self.uv is not None else [])
        return hash_arrays(*arrays, extra=meta)


def validate(data: RegisteredData, origin: str | os.PathLike | None = None, whole: bool = True) -> dict:
    """Check a dataset for everything later stages rely on; raise :class:`InputError` on the
    first fatal problem. Returns a summary dict (counts, extent, per-split sizes). ``whole=False``:
    some subjects of a dataset (:func:`read_registered` with ``subjects``), whose splits may be empty.
    """
    v = np.asarray(data.vertices)
    where = origin
    if v.ndim != 3 or v.shape[-1] != 3:
        raise InputError(f"vertices must have shape (S, V, 3), got {v.shape}", where)
    S, V, _ = v.shape
    if S == 0:
        raise InputError("the dataset contains no meshes", where)
    for name, arr in (("subject", data.subject), ("expression", data.expression), ("split", data.split)):
        if len(arr) != S:
            raise InputError(f"{name} has {len(arr)} entries for {S} meshes", where)
    for kind, names in (("subject", data.subject), ("expression", data.expression)):
        for name in dict.fromkeys(names):
            problem = name_problem(kind, name)
            if problem:
                raise InputError(problem, where)
    f = np.asarray(data.faces)
    if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise InputError(f"faces must have shape (F, 3) with F > 0, got {f.shape}", where)
    if f.min() < 0 or f.max() >= V:
        raise InputError(f"faces index vertex {int(f.max())} but there are {V} vertices", where)
    bad = ~np.isfinite(v).all(axis=(1, 2))
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"mesh {data.subject[k]}/{data.expression[k]} has NaN or infinite coordinates", where
        )
    extents = v.max(axis=1) - v.min(axis=1)  # (S, 3)
    largest = extents.max(axis=1)
    lo, hi = PLAUSIBLE_EXTENT_MM
    out = np.flatnonzero((largest < lo) | (largest > hi))
    if len(out):
        k = int(out[0])
        ext = float(largest[k])
        hint = ""
        if ext < lo:
            hint = " (looks like metres or centimetres: set the source's units)"
        elif ext > hi:
            hint = " (looks like micrometres or a whole body: check units and the crop)"
        raise InputError(
            f"mesh {data.subject[k]}/{data.expression[k]} spans {ext:.3g} mm, implausible for a "
            f"human face ({lo:.0f}-{hi:.0f} mm){hint}",
            where,
        )
    for sp in set(data.split):
        if sp not in SPLITS:
            raise InputError(f"unknown split {sp!r} (expected one of {SPLITS})", where)
    for sp in SPLITS if whole else ():
        if not any(s == sp for s in data.split):
            raise InputError(f"the {sp} split is empty", where)
    if data.uv is not None:
        uv = np.asarray(data.uv)
        if uv.shape != (V, 2) or not np.isfinite(uv).all():
            raise InputError(f"uv must be finite with shape ({V}, 2), got {uv.shape}", where)
    pairs = list(zip(data.subject, data.expression))
    if len(set(pairs)) != len(pairs):
        dup = next(p for p in pairs if pairs.count(p) > 1)
        raise InputError(f"duplicate mesh for subject {dup[0]!r}, expression {dup[1]!r}", where)
    subj_split: dict[str, str] = {}
    for s, sp in zip(data.subject, data.split):
        if subj_split.setdefault(s, sp) != sp:
            raise InputError(f"subject {s!r} appears in both splits", where)
    return {
        "n_samples": S,
        "n_vertices": V,
        "n_faces": int(len(f)),
        "n_subjects": len(subj_split),
        "split_sizes": {sp: int(sum(1 for x in data.split if x == sp)) for sp in SPLITS},
        "split_subjects": {sp: sum(1 for x in subj_split.values() if x == sp) for sp in SPLITS},
        "extent_mm": {
            "min": float(largest.min()),
            "median": float(np.median(largest)),
            "max": float(largest.max()),
            "mean_xyz": [float(x) for x in extents.mean(axis=0)],
        },
    }


def write_registered(path: str | os.PathLike, data: RegisteredData) -> str:
    """Validate and write ``data`` to ``path`` atomically. Returns the content hash."""
    import h5py

    validate(data)
    content = data.content_hash()
    str_dt = h5py.string_dtype("utf-8")
    # Built in memory and written with one plain write: a full disk or a read-only folder is then an
    # ordinary OSError (one line, via atomic_path), never HDF5's failed flush (a wall of errors and,
    # at times, a segfault when the library closes a file it could not write).
    buf = io.BytesIO()
    with atomic_path(path) as tmp:
        with h5py.File(buf, "w") as h:
            # Uncompressed: float noise hardly compresses (gzip saved 8% at several times the write
            # time on ICT's 6000 x 9409 vertices); one chunk per mesh keeps single-mesh reads cheap.
            h.create_dataset("vertices", data=np.asarray(data.vertices, np.float32),
                             chunks=(1, data.n_vertices, 3))
            h.create_dataset("faces", data=np.asarray(data.faces, np.int32))
            if data.uv is not None:
                h.create_dataset("uv", data=np.asarray(data.uv, np.float32))
            for name in ("subject", "expression", "split"):
                h.create_dataset(name, data=np.array(getattr(data, name), dtype=object), dtype=str_dt)
            if data.landmarks:
                names = list(data.landmarks)
                h.create_dataset("landmarks", data=np.array([data.landmarks[n] for n in names], np.int32))
                h["landmarks"].attrs["names"] = np.array(names, dtype=object)
            if data.scans:
                g = h.create_group("scans")
                for k, (pts, tris) in data.scans.items():
                    g.create_dataset(str(k), data=np.asarray(pts, np.float32), compression="gzip")
                    if tris is not None:
                        g.create_dataset(f"{k}_faces", data=np.asarray(tris, np.int32), compression="gzip")
            h.attrs["source"] = data.source
            h.attrs["units"] = "mm"
            h.attrs["format_version"] = FORMAT_VERSION
            h.attrs["content_hash"] = content
            for key, val in data.attrs.items():
                h.attrs[f"meta_{key}"] = val if not isinstance(val, (dict, list)) else repr(val)
        with open(tmp, "wb") as fh:
            fh.write(buf.getbuffer())
    return content


def read_registered(path: str | os.PathLike, with_scans: bool = True,
                    subjects: Sequence[str] | None = None) -> RegisteredData:
    """Read and validate a ``registered.h5``; any problem is an :class:`InputError` naming it.

    ``subjects``: read only these subjects' meshes (a stage that fits one subject: the whole file is
    680 MB on the ICT run, and reading, validating and hashing it took 13 CPU seconds per job). The
    rows read are validated as a whole file's are (shapes, finite, plausible extent, names); the
    file's content hash covers every row, so it is checked only by whole-file reads (the stages
    that train and evaluate). A subject the file lacks is an :class:`InputError` listing the test
    subjects.
    """
    path = Path(path)
    with open_h5(path, "registered dataset") as h:
        try:
            if int(h.attrs.get("format_version", -1)) != FORMAT_VERSION:
                raise InputError(
                    f"format_version {h.attrs.get('format_version')} is not {FORMAT_VERSION}; "
                    "rerun the prepare_data stage", path)
            if h.attrs.get("units") != "mm":
                raise InputError(f"units are {h.attrs.get('units')!r}, expected 'mm'", path)
            for key in ("vertices", "faces", "subject", "expression", "split"):
                if key not in h:
                    raise InputError(f"missing dataset '{key}'", path)
            dec = lambda ds: [x.decode() if isinstance(x, bytes) else str(x) for x in ds[()]]  # noqa: E731
            subject, expression, split = dec(h["subject"]), dec(h["expression"]), dec(h["split"])
            rows = None
            if subjects is not None:
                wanted = list(dict.fromkeys(subjects))
                missing = sorted(set(wanted) - set(subject))
                if missing:
                    test = list(dict.fromkeys(s for s, sp in zip(subject, split) if sp == "test"))
                    raise InputError(f"subject(s) {missing} are not in the dataset (test subjects: {test[:10]}"
                                     f"{' ...' if len(test) > 10 else ''})", path)
                keep = set(wanted)
                rows = np.array([i for i, s in enumerate(subject) if s in keep], dtype=np.int64)
                subject, expression, split = ([x[i] for i in rows] for x in (subject, expression, split))
                new_row = {int(r): k for k, r in enumerate(rows)}  # scans are keyed by row
            landmarks = {}
            if "landmarks" in h:
                names = [n.decode() if isinstance(n, bytes) else str(n) for n in h["landmarks"].attrs["names"]]
                landmarks = dict(zip(names, (int(i) for i in h["landmarks"][()])))
            scans = {}
            if with_scans and "scans" in h:
                g = h["scans"]
                for key in g:
                    if key.endswith("_faces"):
                        continue
                    row = int(key) if rows is None else new_row.get(int(key))
                    if row is None:  # another subject's scan
                        continue
                    tris = g[f"{key}_faces"][()] if f"{key}_faces" in g else None
                    scans[row] = (g[key][()], tris)
            data = RegisteredData(
                vertices=(h["vertices"][()] if rows is None else h["vertices"][rows] if len(rows)
                          else np.zeros((0,) + h["vertices"].shape[1:], h["vertices"].dtype)),
                faces=h["faces"][()],
                uv=h["uv"][()] if "uv" in h else None,
                subject=subject,
                expression=expression,
                split=split,
                source=str(h.attrs.get("source", "unknown")),
                landmarks=landmarks,
                scans=scans,
                attrs={k[5:]: h.attrs[k] for k in h.attrs if k.startswith("meta_")},
            )
            stored = str(h.attrs.get("content_hash", ""))
        except InputError:
            raise
        except Exception as exc:  # truncated chunks, wrong dtypes, ...
            raise InputError(f"registered dataset is corrupt ({str(exc)[:160]})", path) from None
    validate(data, path, whole=subjects is None)
    if subjects is None and stored != data.content_hash():
        raise InputError("content hash does not match the stored hash: the file is corrupt", path)
    return data


def read_run_inputs(paths):
    """A run's template and registered data (without scans), checked against each other: the
    inputs of every stage after the template's (``paths``: a :class:`cm3dmm.paths.RunPaths`)."""
    from cm3dmm.template import load_template

    template = load_template(paths.template)
    data = read_registered(paths.registered, with_scans=False)
    if data.n_vertices != template.n_vertices:
        raise InputError(f"registered.h5 has {data.n_vertices} vertices, the template {template.n_vertices}: "
                         "rerun the template stage", paths.template)
    return template, data


def stored_hash(path: str | os.PathLike) -> str:
    """The content hash stored in a registered.h5 / template / cache file's attributes."""
    with open_h5(path) as h:
        return str(h.attrs.get("content_hash", ""))

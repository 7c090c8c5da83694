"""The data stage: the configured source -> ``data/registered.h5``, ``check.json``, ``preview.png``.

:func:`run_prepare` loads the source (for ``facescape`` the download check comes first and
happens in the same pass over the files), assigns splits by subject, validates everything
later stages rely on, and writes the outputs atomically. Outputs left from an earlier run
are removed first, and everything this run wrote is removed again when any step fails, so
an error never leaves a file that looks finished. :func:`run_check` runs only the checks.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError
from cm3dmm.framecheck import check_frames
from cm3dmm.io.atomic import atomic_write_json, check_writable
from cm3dmm.paths import RunPaths
from cm3dmm.registered import (FACESCAPE_EXPRESSIONS, PLAUSIBLE_EXTENT_MM, RegisteredData, validate,
                               write_registered)
from cm3dmm.sources import SOURCES, assign_split

log = logging.getLogger(__name__)

#: Cell size (pixels) of the preview grid.
PREVIEW_CELL = 192


def _source_origin(cfg) -> str:
    section = getattr(cfg.data, cfg.data.source, None)
    path = getattr(section, "path", "")
    return f"{cfg.data.source} source" + (f" ({path})" if path else "")


def load_data(cfg) -> tuple[RegisteredData, list[str] | None, dict | None]:
    """Load the configured source. Returns the data, the file of each sample (file-based
    sources, else None) and the FaceScape download check as a dict (else None)."""
    name = cfg.data.source
    if name not in SOURCES:
        raise InputError(f"data.source: {name!r} is not one of {list(SOURCES)}")
    if name == "facescape":
        from cm3dmm.sources import facescape

        data, chk = facescape.load_checked(cfg.data.facescape)
        return data, [f for _i, _e, f in chk.found], chk.to_dict()
    if name == "manifest":
        from cm3dmm.sources import manifest

        data, files = manifest.load_with_files(cfg.data.manifest)
        return data, files, None
    module = importlib.import_module(f"cm3dmm.sources.{name}")
    return module.load(getattr(cfg.data, name)), None, None


def check_samples(data: RegisteredData, files: list[str] | None, origin: str) -> None:
    """Per-mesh NaN/inf and extent checks whose errors name the mesh's file (when known)."""
    v = np.asarray(data.vertices)
    if v.ndim != 3 or v.shape[0] == 0:
        return  # validate() reports it
    finite = np.isfinite(v).all(axis=(1, 2))
    if not finite.all():
        k = int(np.flatnonzero(~finite)[0])
        raise InputError(f"mesh {data.subject[k]}/{data.expression[k]} has NaN or infinite "
                         "coordinates", files[k] if files else origin)
    extent = (v.max(axis=1) - v.min(axis=1)).max(axis=1)
    lo, hi = PLAUSIBLE_EXTENT_MM
    bad = np.flatnonzero((extent < lo) | (extent > hi))
    if len(bad):
        k = int(bad[0])
        ext = float(extent[k])
        hint = (" (looks like metres or centimetres: set the source's units)" if ext < lo
                else " (looks like micrometres or a whole body: check units and the crop)")
        raise InputError(f"mesh {data.subject[k]}/{data.expression[k]} spans {ext:.3g} mm, implausible "
                         f"for a human face ({lo:.0f}-{hi:.0f} mm){hint}", files[k] if files else origin)


def _load_checked(cfg) -> tuple[RegisteredData, dict]:
    times: dict[str, float] = {}
    t = time.perf_counter()
    data, files, fs_check = load_data(cfg)
    times["load_s"] = time.perf_counter() - t
    origin = _source_origin(cfg)
    t = time.perf_counter()
    if files is not None:  # validate() below gives the same checks without file names
        check_samples(data, files, origin)
    try:
        assign_split(data, cfg.data.split)
    except InputError as exc:  # name the source (e.g. the manifest whose split column is one-sided)
        if exc.path is None:
            raise InputError(exc.problem, origin) from None
        raise
    summary = validate(data, origin)
    times["validate_s"] = time.perf_counter() - t
    t = time.perf_counter()  # every mesh in one frame (not shifted, rotated, mirrored, rescaled)
    frames = check_frames(data.vertices, data.subject, data.expression, files, origin)
    times["frames_s"] = time.perf_counter() - t
    v = data.vertices
    report = {
        "source": data.source,
        "origin": origin,
        **summary,
        "n_expressions": len(set(data.expression)),
        "subjects": {sp: data.subjects(sp) for sp in ("train", "test")},
        "bbox_mm": {"min": v.min(axis=(0, 1)).tolist(), "max": v.max(axis=(0, 1)).tolist(),
                    "extent": (v.max(axis=(0, 1)) - v.min(axis=(0, 1))).tolist()},
        "has_uv": data.uv is not None,
        "landmarks": dict(data.landmarks),
        "missing_pairs": _missing_pairs(data),
        "frame_check": frames,
        "problems": [],
        "split_rule": str(data.attrs.get("split_rule", "")),
        "timings": times,
    }
    if fs_check is not None:
        report["download_check"] = fs_check
        report["missing_pairs"] = [[str(i), e] for i, e in fs_check["missing"]]
        report["problems"] = [f"missing: identity {i} expression {e}" for i, e in fs_check["missing"]]
    return data, report


def _bytes_needed(data: RegisteredData) -> int:
    """About what registered.h5 (+ check.json, preview.png) will take on disk, with a margin."""
    n = np.asarray(data.vertices).nbytes + np.asarray(data.faces).nbytes + (0 if data.uv is None else data.uv.nbytes)
    n += sum(np.asarray(p).nbytes + (0 if f is None else np.asarray(f).nbytes) for p, f in data.scans.values())
    return int(n * 1.1) + (4 << 20)


def _missing_pairs(data: RegisteredData) -> list[list[str]]:
    """(subject, expression) pairs absent from the data, over its subjects x expressions."""
    have = set(zip(data.subject, data.expression))
    exprs = sorted(set(data.expression), key=lambda e: (FACESCAPE_EXPRESSIONS.index(e)
                                                        if e in FACESCAPE_EXPRESSIONS else 99, e))
    return [[s, e] for s in data.subjects() for e in exprs if (s, e) not in have]


def run_check(cfg) -> dict:
    """Run the source's checks (for FaceScape the download check) without writing anything."""
    if cfg.data.source == "facescape":
        from cm3dmm.sources.facescape import check_facescape

        chk = check_facescape(cfg.data.facescape)
        log.info("%s", chk.summary())
        chk.raise_if_fatal()
        return chk.to_dict()
    _data, report = _load_checked(cfg)
    return report


def run_prepare(cfg) -> dict:
    """The ``prepare_data`` stage; returns the ``check.json`` content."""
    paths = RunPaths(cfg.run_dir)
    outputs = [paths.registered, paths.check, paths.preview]
    for p in outputs:
        if p.exists():
            log.info("removing the earlier output %s", p)
            p.unlink()
    t0 = time.perf_counter()
    try:
        data, report = _load_checked(cfg)
        check_writable(paths.registered.parent, _bytes_needed(data))  # before writing anything
        t = time.perf_counter()
        report["content_hash"] = write_registered(paths.registered, data)
        report["timings"]["write_s"] = time.perf_counter() - t
        if cfg.data.preview and cfg.data.preview_subjects > 0:
            t = time.perf_counter()
            write_preview(data, paths.preview, cfg.data.preview_subjects)
            report["timings"]["preview_s"] = time.perf_counter() - t
        report["timings"]["total_s"] = time.perf_counter() - t0
        report["timings"] = {k: round(v, 3) for k, v in report["timings"].items()}
        atomic_write_json(paths.check, report)
    except BaseException:
        for p in outputs:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise
    log.info("prepare: %d meshes (%d subjects, %d vertices) -> %s in %.1fs", report["n_samples"],
             report["n_subjects"], report["n_vertices"], paths.registered, report["timings"]["total_s"])
    return report


def preview_selection(data: RegisteredData, n_subjects: int) -> tuple[list[str], list[str], np.ndarray]:
    """Rows (subjects), columns (expressions in FaceScape order) and sample indices (R, C).

    Test subjects come first, then train subjects; subjects with every expression are
    preferred. A missing (subject, expression) cell shows the subject's first mesh."""
    exprs = [e for e in FACESCAPE_EXPRESSIONS if e in set(data.expression)]
    exprs += sorted(set(data.expression) - set(exprs))
    index = {(s, e): k for k, (s, e) in enumerate(zip(data.subject, data.expression))}
    subjects = data.subjects("test") + data.subjects("train")
    subjects.sort(key=lambda s: -sum((s, e) in index for e in exprs))  # stable: complete first
    rows = subjects[:n_subjects]
    first = {}
    for k, s in enumerate(data.subject):
        first.setdefault(s, k)
    idx = np.array([[index.get((s, e), first[s]) for e in exprs] for s in rows], dtype=np.int64)
    return rows, exprs, idx


def write_preview(data: RegisteredData, path: str | Path, n_subjects: int) -> Path:
    """``n_subjects`` subjects x all expressions rendered into one PNG (cm3dmm.render)."""
    from cm3dmm.render import render_grid

    rows, cols, idx = preview_selection(data, n_subjects)
    splits = {s: sp for s, sp in zip(data.subject, data.split)}
    return render_grid(np.asarray(data.vertices)[idx], data.faces, path,
                       row_labels=[f"{s} ({splits[s]})" for s in rows], col_labels=cols,
                       size=PREVIEW_CELL)

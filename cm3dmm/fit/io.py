"""The fit files: one writer (the fit stage, the API) and one reader (evaluation, figures).

A fit ``{name}.npz`` holds, per fitted face b of one subject: ``z_id`` (B, Di), ``z_exp`` (B, De)
float32 codes, ``vertices`` (B, V, 3) and ``vertex_errors`` (B, V) float32 (mm, model frame; NaN
where a scan does not cover the vertex), ``errors`` (B,), ``transforms`` (B, 4, 4) scan frame (mm)
-> model frame, ``expressions`` (B,) str, ``faces`` (G, 3) int32, ``shared_identity``, ``method``,
``subject``, ``converged`` and ``seconds``. ``{name}.json`` beside it is the human-readable
summary (errors, convergence, timings, warnings, the fit settings), ``{name}.png`` the figure.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cm3dmm.errors import StageError
from cm3dmm.fit.figure import render_fit_png
from cm3dmm.fit.result import FitResult
from cm3dmm.io.npz import read_npz
from cm3dmm.methods import FaceModel

if TYPE_CHECKING:
    from cm3dmm.config import FitConfig

log = logging.getLogger(__name__)

#: arrays every fit file has (a file without them was not written by :func:`write_fit`)
REQUIRED_KEYS = ("expressions", "vertices", "z_id", "z_exp", "seconds")


def read_fit(path: str | Path, also: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The arrays of a fit file (name -> array), checked: not found, corrupt / truncated and
    foreign files (without :data:`REQUIRED_KEYS` and the arrays ``also``) are :class:`InputError`
    naming the file."""
    return read_npz(path, "fit file", REQUIRED_KEYS + tuple(also),
                    absent_hint="run the fit stage for every method and test subject", bad_hint="rerun the fit stage")


def write_fit(out_npz: Path, result: FitResult, fm: FaceModel, method: str, subject: str,
              expressions: list[str], kind: str, fc: FitConfig, scans=None, meshes: bool = False,
              picture: bool = True) -> dict:
    """Write the ``.npz``, ``.json``, ``.png`` (and meshes) of a fit; everything atomically.

    ``picture=False`` skips the ``.png`` (the summary then names no figure); the fit stage always
    draws it, the table variants of ``fit_size`` / ``fit_upsampling`` only for their first subject."""
    from cm3dmm.config import config_to_dict
    from cm3dmm.io.atomic import atomic_save_npz, atomic_write_json

    info = result.info
    b = len(expressions)
    if not np.isfinite(result.vertices).all():
        raise StageError(f"fit of {subject} produced non-finite vertices (objective {info.objective})")
    mats = np.stack([t.matrix() for t in result.transforms])
    summary = {
        "method": method, "subject": subject, "target": kind, "expressions": expressions,
        "mode": "per-subject" if result.shared_identity else "per-face",
        "optimizer": fc.optimizer,
        "errors_mm": {e: float(x) for e, x in zip(expressions, result.errors)},
        "mean_error_mm": float(np.mean(result.errors)),
        "error_definition": ("mean vertex distance to the registered target" if kind == "registered"
                             else f"mean distance of the scan points to the fit (worst {fc.trim:.0%} trimmed)"),
        "convergence": {"status": info.status, "converged": info.converged, "iterations": info.iterations,
                        "jacobians": info.jacobians, "evaluations": info.evaluations,
                        "objective": info.objective},
        "timings_s": {"total": result.seconds, "per_face": result.seconds / max(b, 1),
                      **{k: v for k, v in result.timings.items() if isinstance(v, float)}},
        "transforms": [t.to_dict() for t in result.transforms],
        "warnings": list(result.warnings),
        "fit_config": config_to_dict(fc),
    }
    if scans is not None:
        summary["scans"] = [{"path": s.path, "units": s.units, "points": int(len(s.points))} for s in scans]
    if not info.converged:
        if info.status == "max_iter":
            msg = (f"{subject}: the fit used its whole iteration budget ({info.iterations} iterations, "
                   f"fit.max_iter = {fc.max_iter}) before the relative change fell below fit.tol = {fc.tol:g}; "
                   "a larger fit.max_iter fits more tightly")
        else:
            msg = f"{subject}: the optimiser stopped with status {info.status!r} after {info.iterations} iterations"
        summary["warnings"].append(msg)
        log.warning(msg)
    atomic_save_npz(
        out_npz, z_id=result.z_id.astype(np.float32), z_exp=result.z_exp.astype(np.float32),
        vertices=result.vertices.astype(np.float32), errors=result.errors.astype(np.float32),
        vertex_errors=result.vertex_errors.astype(np.float32), transforms=mats,
        expressions=np.array(expressions), shared_identity=np.array(result.shared_identity),
        faces=np.asarray(fm.faces, np.int32), method=np.array(method), subject=np.array(subject),
        converged=np.array(info.converged), seconds=np.array(result.seconds))
    try:
        if picture:
            render_fit_png(out_npz.with_suffix(".png"), result, fm, expressions)
            summary["png"] = str(out_npz.with_suffix(".png"))
    except Exception as exc:  # noqa: BLE001 - a missing OpenGL must not lose the fit
        log.warning("could not render %s (%s)", out_npz.with_suffix(".png"), exc)
        summary["warnings"].append(f"no figure: {exc}")
    if meshes:
        from cm3dmm.export import write_fit_meshes  # with UVs (vt) and landmark positions

        summary["meshes"] = write_fit_meshes(out_npz, result, fm, expressions, fc.level, scans)
    atomic_write_json(out_npz.with_suffix(".json"), summary)
    return summary

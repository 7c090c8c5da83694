"""The ``fit`` stage (``cm3dmm fit``, rule ``fit``): fit one test subject of the run, or the user's
own registered meshes / raw scans, and write the fit file (:mod:`cm3dmm.fit.io`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cm3dmm.errors import InputError
from cm3dmm.fit.io import write_fit
from cm3dmm.fit.registered import fit_registered, read_registered_meshes
from cm3dmm.fit.scan import read_scan, read_scan_landmarks
from cm3dmm.fit.scanfit import fit_scans


def run_fit(cfg, method: str | None = None, subject: str | None = None, model: str | None = None,
            scan: list[str] | None = None, registered: bool | None = None, landmarks: str | None = None,
            units: str | None = None, out: str | None = None, landmark_set: str | None = None) -> dict:
    """The ``fit`` stage: fit one subject of the run's test split, or the user's own meshes.

    Writes ``out`` (default ``fits/{method}/{subject}.npz``) with ``.json`` and ``.png`` beside it,
    and, when ``out`` is given, one mesh per expression at ``cfg.fit.level``
    (``{out stem}.{expression}.obj``; scans: in the scan's frame and units). Returns the summary.
    """
    from cm3dmm.methods import load_method
    from cm3dmm.paths import RunPaths

    fc = cfg.fit
    expect = method or (None if model else "cm3dmm")  # --model alone: whatever method it holds
    method = method or "cm3dmm"
    paths = RunPaths.of(cfg.run_dir)
    torch.set_num_threads(max(1, int(cfg.train.threads or torch.get_num_threads())))
    model_path = Path(model) if model else paths.model(method)
    template = None
    if method != "cm3dmm" and paths.template.exists():
        try:
            from cm3dmm.template import load_template

            template = load_template(paths.template)
        except ImportError:  # pragma: no cover - template module always present in releases
            template = None
    fm = load_method(model_path, template=template, expect=expect)
    if template is not None:  # the baselines' UVs for the written meshes (cm3dmm.export.template_of)
        fm.template = template
    n_levels = max(len(fm.levels), 1)
    if not 0 <= int(fc.level) < n_levels:  # checked before the fit, not when its meshes are written
        raise InputError(f"fit.level {fc.level} does not exist: the model's template has levels 0..{n_levels - 1}",
                         model_path)
    if landmark_set:  # landmark names on any template (cm3dmm.landmarks file format)
        from cm3dmm.landmarks import use_landmark_file

        use_landmark_file(fm, landmark_set)
    units = units or fc.units
    scan_list = list(scan or [])
    if scan_list:
        names = [Path(s).name.split(".")[0] for s in scan_list]
        subj = subject or names[0]
        if registered:
            targets = read_registered_meshes(scan_list, fm, units)
            result = fit_registered(fm, targets, fc)
            kind = "registered"
        else:
            lms = read_scan_landmarks(landmarks, len(scan_list), scan_list)
            from cm3dmm.landmarks import check_names

            check_names(lms, fm.landmarks, landmarks)
            scans = [read_scan(p, units, lm, landmarks) for p, lm in zip(scan_list, lms)]
            result = fit_scans(fm, scans, fc)
            kind = "scan"
        expressions = names
    else:
        if subject is None:
            raise InputError("give --subject (a test subject of the run) or --scan FILE")
        from cm3dmm.registered import read_registered

        # the subject's meshes only (one it lacks: InputError)
        data = read_registered(paths.registered, with_scans=False, subjects=[subject])
        if data.n_vertices != fm.n_vertices:
            raise InputError(f"the dataset has {data.n_vertices} vertices per mesh, the {method} model "
                             f"{fm.n_vertices}: retrain the model for this dataset", model_path)
        targets = data.vertices.astype(np.float64)
        expressions = list(data.expression)
        subj = subject
        result = fit_registered(fm, targets, fc)
        kind = "registered"
    out_npz = Path(out) if out else paths.fit_npz(method, subj)
    if out_npz.suffix != ".npz":
        out_npz = out_npz.with_suffix(".npz")
    summary = write_fit(out_npz, result, fm, method, subj, expressions, kind, fc,
                        scans=None if kind != "scan" else scans, meshes=out is not None)
    return summary

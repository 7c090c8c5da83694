"""Fitting: fresh latent codes (and rigid poses) for registered meshes and raw scans.

The fitter owns its codes; models are used only through :class:`cm3dmm.methods.FaceModel`, so
``cm3dmm``, ``pca`` and ``bilinear`` fit through the same code and the same objective (a mean
squared point distance per face plus a Gaussian code prior, :mod:`cm3dmm.fit.objective`).

Layout: ``per-subject`` — one identity code shared by all of a subject's expressions plus one
expression code per expression; ``per-face`` — independent codes per face (always so for
``pca``, whose single code has no identity block).

Modules, one job each:

* :mod:`~cm3dmm.fit.objective` — targets, the code layout, the energy and its normal equations;
* :mod:`~cm3dmm.fit.solve` — the solvers (Levenberg-Marquardt in stages, exact least squares for
  the linear / bilinear baselines, L-BFGS, the release's Adam);
* :mod:`~cm3dmm.fit.registered` — fits of meshes in template topology;
* :mod:`~cm3dmm.fit.scan` — raw scans: reading, units, landmark files, point-cloud helpers;
* :mod:`~cm3dmm.fit.correspond` — scan/model correspondences, the landmark pose;
* :mod:`~cm3dmm.fit.scanfit` — fits of raw scans (rigid start, correspondence/code/pose alternations);
* :mod:`~cm3dmm.fit.result` — :class:`FitResult`;
* :mod:`~cm3dmm.fit.io` — the one writer and reader of fit files;
* :mod:`~cm3dmm.fit.figure` — the fit's figure;
* :mod:`~cm3dmm.fit.stage` — the ``fit`` stage (``cm3dmm fit``, rule ``fit``).
"""

from cm3dmm.fit.correspond import boundary_vertices, landmark_pose, scan_targets
from cm3dmm.fit.figure import render_fit_png
from cm3dmm.fit.io import read_fit, write_fit
from cm3dmm.fit.objective import Codes, SolveInfo, Targets
from cm3dmm.fit.registered import fit_registered, read_registered_meshes
from cm3dmm.fit.result import FitResult
from cm3dmm.fit.scan import UNIT_FACTORS, Scan, cloud_normals, read_scan, read_scan_landmarks, resolve_units
from cm3dmm.fit.scanfit import fit_scans
from cm3dmm.fit.solve import (lm_stages, solve_adam, solve_als, solve_codes, solve_lbfgs, solve_lm,
                              solve_lm_staged, solve_lm_structured)
from cm3dmm.fit.stage import run_fit

#: the name :mod:`cm3dmm.api` calls (before the package split)
_load_registered_scans = read_registered_meshes

__all__ = [
    "Codes", "FitResult", "Scan", "SolveInfo", "Targets", "UNIT_FACTORS", "boundary_vertices", "cloud_normals",
    "fit_registered", "fit_scans", "landmark_pose", "lm_stages", "read_fit", "read_registered_meshes",
    "read_scan", "read_scan_landmarks", "render_fit_png", "resolve_units", "run_fit", "scan_targets",
    "solve_adam", "solve_als", "solve_codes", "solve_lbfgs", "solve_lm", "solve_lm_staged",
    "solve_lm_structured", "write_fit",
]

"""The figure of a fit (``{name}.png`` beside the fit file): target, fit and error heat map."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cm3dmm.fit.result import FitResult
from cm3dmm.methods import FaceModel


def render_fit_png(path: Path, result: FitResult, fm: FaceModel, expressions: list[str], max_rows: int = 4):
    """Rows: up to ``max_rows`` expressions; columns: target, fit, error heat map (mm)."""
    from cm3dmm.render import render_grid

    rows = list(range(min(len(expressions), max_rows)))
    tv = result.target_vertices
    fit = result.vertices[rows]
    tgt = tv[rows] if tv is not None else fit
    err = np.nan_to_num(result.vertex_errors[rows], nan=0.0)
    grid = np.stack([tgt, fit, fit], 1)
    sc = np.stack([np.full_like(err, np.nan), np.full_like(err, np.nan), err], 1)
    hi = float(np.quantile(err, 0.98)) if err.size else 1.0
    # the target/fit columns take the colour map's low end when scalars are NaN; draw them grey
    # by giving them a constant below the range
    sc = np.where(np.isnan(sc), -1.0, sc)
    render_grid(grid, fm.faces, path, row_labels=[expressions[r] for r in rows],
                col_labels=["target", "fit", "error (mm)"], scalars=sc, clim=(0.0, max(hi, 1e-3)),
                cmap="magma_r", scalar_label="vertex error (mm)")

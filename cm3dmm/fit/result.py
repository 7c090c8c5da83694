"""What a fit returns: :class:`FitResult` (codes, meshes, errors, poses, convergence, timings)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cm3dmm.fit.objective import Codes, SolveInfo
from cm3dmm.rigid import Similarity


@dataclass
class FitResult:
    """Codes, meshes and errors of B fitted faces (model frame, mm)."""

    z_id: np.ndarray  #: (B, Di) per face (rows equal when the identity is shared)
    z_exp: np.ndarray  #: (B, De)
    vertices: np.ndarray  #: (B, V, 3) fitted template vertices
    errors: np.ndarray  #: (B,) mean vertex error (registered) / mean scan->fit distance (scans), mm
    vertex_errors: np.ndarray  #: (B, V) per-vertex error, mm (scans: distance to the scan, NaN uncovered)
    transforms: list[Similarity]  #: per face: scan frame (mm) -> model frame (identity for registered)
    shared_identity: bool
    info: SolveInfo
    seconds: float
    timings: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    target_vertices: np.ndarray | None = None  #: (B, V, 3) targets in template topology (for figures)


def codes_np(codes: Codes) -> tuple[np.ndarray, np.ndarray]:
    """Per-face (B, Di), (B, De) float64 arrays of fitted codes."""
    zi, ze = codes.per_face()
    return zi.detach().double().numpy(), ze.detach().double().numpy()

"""The ``manifest`` source: registered meshes (one topology) listed in a CSV.

Columns ``subject, expression, path`` and optionally ``split`` (train | test; when present
for every row it is kept and wins over ``data.split``). Relative paths are resolved against
the CSV's folder. Meshes are any :func:`cm3dmm.io.read_mesh` format; all must share the first
mesh's vertex count and triangles. ``units`` converts to mm; ``crop`` is an optional
vertex-index file (.txt / .npy) or UV mask image applied to every mesh. An optional ``scan``
column names a high-detail scan (mesh or point cloud, same frame and units) of the row's face:
the cache keeps its points near the registered surface as continuous samples
(``cache.scan_distance``, ``train.continuous: scan``); empty cells mean no scan.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError
from cm3dmm.io.mesh import read_mesh
from cm3dmm.registered import SPLITS, RegisteredData, name_problem
from cm3dmm.sources.crop import apply_crop, crop_indices, unit_scale

log = logging.getLogger(__name__)

REQUIRED = ("subject", "expression", "path")


def read_manifest(path: str | Path) -> list[dict[str, str]]:
    """Rows of the CSV as dicts with stripped values; InputError on a bad file."""
    path = Path(path)
    if not str(path) or not path.is_file():
        raise InputError("manifest CSV not found (set data.manifest.path)", path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in REQUIRED if c not in cols]
        if missing:
            raise InputError(f"manifest lacks column(s) {', '.join(missing)} (has: {', '.join(cols)})", path)
        rows = []
        for lineno, row in enumerate(reader, 2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not any(row.values()):
                continue
            for c in REQUIRED:
                if not row.get(c):
                    raise InputError(f"line {lineno}: empty '{c}'", path)
            for c in ("subject", "expression"):
                problem = name_problem(c, row[c])
                if problem:
                    raise InputError(f"line {lineno}: {problem}", path)
            sp = row.get("split", "")
            if sp and sp not in SPLITS:
                raise InputError(f"line {lineno}: split {sp!r} is not one of {list(SPLITS)}", path)
            row["_line"] = str(lineno)
            rows.append(row)
    if not rows:
        raise InputError("manifest lists no meshes", path)
    return rows


def load(cfg) -> RegisteredData:
    """Load the meshes listed in ``cfg.path`` (ManifestSourceConfig)."""
    return load_with_files(cfg)[0]


def load_with_files(cfg) -> tuple[RegisteredData, list[str]]:
    """:func:`load`, plus the mesh file of each sample (for error messages)."""
    csv_path = Path(cfg.path)
    rows = read_manifest(csv_path)
    scale = unit_scale(cfg.units, "data.manifest.units")
    mesh_paths = [(csv_path.parent / r["path"]) if not Path(r["path"]).is_absolute() else Path(r["path"])
                  for r in rows]
    first = read_mesh(mesh_paths[0])
    if first.is_point_cloud:
        raise InputError("has no faces: the manifest lists registered meshes, not point clouds",
                         mesh_paths[0])
    idx = crop_indices(cfg.crop, first) if cfg.crop else np.arange(first.n_vertices)
    faces, uv = apply_crop(first, idx)
    verts = np.empty((len(rows), len(idx), 3), dtype=np.float32)
    verts[0] = first.vertices[idx] * scale
    for k in range(1, len(rows)):
        mesh = read_mesh(mesh_paths[k])
        if mesh.n_vertices != first.n_vertices:
            raise InputError(f"has {mesh.n_vertices} vertices but {mesh_paths[0]} has "
                             f"{first.n_vertices}: manifest meshes must share one topology", mesh_paths[k])
        if not np.array_equal(mesh.faces, first.faces):
            raise InputError(f"its triangles differ from those of {mesh_paths[0]}: manifest meshes "
                             "must share one topology", mesh_paths[k])
        verts[k] = mesh.vertices[idx] * scale
    splits = [r.get("split", "") for r in rows]
    has_split = all(splits)
    if any(splits) and not has_split:
        raise InputError("the split column is filled for some rows only: fill it for every row "
                         "or leave it empty", csv_path)
    attrs = {"source_path": str(csv_path.resolve()), "units_in": cfg.units, "crop": cfg.crop}
    scans = {}
    for k, r in enumerate(rows):  # the optional scan column: high-detail surfaces of the faces
        if r.get("scan"):
            f = Path(r["scan"]) if Path(r["scan"]).is_absolute() else csv_path.parent / r["scan"]
            scan = read_mesh(f)
            scans[k] = ((scan.vertices * scale).astype(np.float32),
                        None if scan.is_point_cloud else scan.faces.astype(np.int32))
    if has_split:
        attrs["split_source"] = "manifest"
    data = RegisteredData(
        vertices=verts,
        faces=faces,
        subject=[r["subject"] for r in rows],
        expression=[r["expression"] for r in rows],
        split=splits if has_split else ["train"] * len(rows),
        source="manifest",
        uv=uv,
        attrs=attrs,
        scans=scans,
    )
    return data, [str(p) for p in mesh_paths]

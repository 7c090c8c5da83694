"""Checks on a mesh file's vertex coordinates shared by the OBJ and PLY readers."""

from __future__ import annotations

import os

import numpy as np

from cm3dmm.errors import InputError

#: no face is this far from its origin in any unit; float32 (the registered format) ends at 3.4e38
MAX_COORDINATE = 1e30


def check_coordinates(v: np.ndarray, path: str | os.PathLike, first_index: int = 0,
                      endian: str | None = None) -> None:
    """InputError for NaN / infinite / absurdly large coordinates, naming the first such vertex in the
    file's own numbering (OBJ counts vertices from 1, PLY from 0). ``endian`` ('<', '>' or None for
    text): a binary file's absurd values usually mean the header's byte order is wrong."""
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(v).all(axis=1)
        huge = finite & (np.abs(v) > MAX_COORDINATE).any(axis=1)
    if finite.all() and not huge.any():
        return
    k = int(np.flatnonzero(~finite | huge)[0])
    which = f"vertex {k + first_index}" + (" (OBJ counts from 1)" if first_index == 1 else " (counting from 0)")
    what = "NaN or infinite coordinates" if not finite[k] else f"a coordinate of {np.abs(v[k]).max():.3g}"
    hint = ""
    if endian is not None:
        order = {"<": "binary_little_endian", ">": "binary_big_endian"}[endian]
        hint = f" (is the header's byte order, {order}, right?)"
    raise InputError(f"{which} has {what}{hint}", path)

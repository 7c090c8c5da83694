"""The one checked reader of the project's ``.npz`` files (template, fits, codes).

Every failure is an :class:`~cm3dmm.errors.InputError` naming the file, in one of three forms::

    <what> not found[ (<absent_hint>)]
    <what> is corrupt or truncated (<reason>)[: <bad_hint>]
    <what> lacks <key>, <key> (it has <key>, ...)[: <bad_hint>]
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError

#: the first bytes of every zip archive (an ``.npz`` is one; a truncated one still starts with them)
_ZIP_MAGIC = b"PK"


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:120]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_npz(path: str | os.PathLike, what: str, required: Iterable[str] = (), *,
             absent_hint: str = "", bad_hint: str = "") -> dict[str, np.ndarray]:
    """All arrays of the ``.npz`` at ``path`` (name -> array, read eagerly, no pickles).

    ``what`` names the file in messages ("fit file", "template"); ``required``: the arrays it must
    hold; ``absent_hint``: what to do when the file does not exist ("run the template stage");
    ``bad_hint``: what to do when it is corrupt or lacks arrays ("rerun the template stage")."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} not found" + (f" ({absent_hint})" if absent_hint else ""), path)
    tail = f": {bad_hint}" if bad_hint else ""
    try:
        with path.open("rb") as f:
            head = f.read(len(_ZIP_MAGIC))
    except OSError as exc:
        raise InputError(f"{what} cannot be read ({_reason(exc)})", path) from None
    if head != _ZIP_MAGIC:
        # np.load would try other formats (.npy, pickles) and report something misleading
        raise InputError(f"{what} is corrupt or truncated (not an .npz archive: no zip signature){tail}", path)
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
    except Exception as exc:  # noqa: BLE001 - zipfile, zlib, ValueError, OSError, EOFError: all a bad file
        raise InputError(f"{what} is corrupt or truncated ({_reason(exc)}){tail}", path) from None
    missing = [k for k in required if k not in out]
    if missing:
        have = ", ".join(sorted(out)) or "no arrays"
        raise InputError(f"{what} lacks {', '.join(missing)} (it has {have}){tail}", path)
    return out

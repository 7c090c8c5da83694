"""HDF5 helpers: open with a clear error, content hashes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from cm3dmm.errors import InputError, is_unreadable, os_error_cause


def open_h5(path: str | os.PathLike, what: str = "HDF5 file"):
    """Open an HDF5 file read-only, turning every failure into :class:`InputError`."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found", path)
    if path.is_dir():
        raise InputError(f"is a folder, not the {what} file", path)
    try:
        return h5py.File(path, "r")
    except Exception as exc:  # h5py raises OSError with cryptic text for truncation
        cause = os_error_cause(exc)
        if cause is not None and (is_unreadable(exc) or "errno = 13," in str(exc) or "errno = 5," in str(exc)):
            raise InputError(f"cannot read the {what} ({cause})", path) from None  # not corrupt
        raise InputError(f"{what} is corrupt or truncated ({_short(exc)})", path) from None


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]


def hash_arrays(*arrays: np.ndarray, extra: str = "") -> str:
    """A short, stable content hash of numpy arrays (dtype, shape and bytes) and a string."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def file_hash(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (first 16 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()[:16]

"""Atomic output: write to a temporary sibling, then rename.

An interrupted stage (exception, SIGKILL, power loss) never leaves a file at the final path
that looks finished: the final name only appears, via :func:`os.replace`, once the whole
file has been written and flushed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path
from typing import Iterator


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
#: temporary names carry the writer: ``.tmp-{stem}-{host}.{pid}-{random}{suffix}``
_HOST = socket.gethostname().replace("/", "_") or "host"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike, suffix: str | None = None) -> list[Path]:
    """Remove the temporary files of ``path`` left by writers that were killed (SIGKILL, power
    loss: no chance to clean up). Only files of processes of this host that no longer exist are
    removed; a temporary of a live writer, or of another host, is left alone. Returns the removed."""
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    prefix = f".tmp-{path.stem}-"
    removed = []
    if not path.parent.is_dir():
        return removed
    for p in path.parent.iterdir():
        name = p.name
        if not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        writer = name[len(prefix):len(name) - len(suffix)].rsplit("-", 1)[0]  # host.pid
        host, _, pid = writer.rpartition(".")
        if host != _HOST or not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``.

    The temporary file keeps the final suffix (so libraries that dispatch on the extension,
    e.g. matplotlib or h5py, behave) and starts with ``.tmp-`` so it is never mistaken for
    an output. On any exception the temporary file is removed and the exception re-raised.
    Temporaries of ``path`` left by killed writers are removed first
    (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    remove_stale_temporaries(path, suffix)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.stem}-{_HOST}.{os.getpid()}-", suffix=suffix,
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if not tmp_path.exists():
            raise RuntimeError(f"atomic write of {path} produced no file")
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs get normal permissions
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_save_npz(path: str | os.PathLike, **arrays) -> None:
    """``np.savez_compressed`` to ``path`` atomically."""
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """JSON-dump ``obj`` (indented, sorted keys) to ``path`` atomically."""
    import json

    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

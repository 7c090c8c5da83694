"""Atomic output: write to a temporary sibling, then rename.

An interrupted stage (exception, SIGKILL, power loss) never leaves a file at the final path
that looks finished: the final name only appears, via :func:`os.replace`, once the whole
file has been written and flushed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from cm3dmm.errors import InputError, WriteError, os_error_cause

#: a folder with less free space than this cannot take any output: refused before the work starts
MIN_FREE_BYTES = 1 << 20


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
    make_folder(path.parent)
    suffix = path.suffix if suffix is None else suffix
    remove_stale_temporaries(path, suffix)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.stem}-{_HOST}.{os.getpid()}-", suffix=suffix,
                                   dir=path.parent)
    except OSError as exc:
        raise WriteError(path, os_error_cause(exc) or str(exc)) from exc
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
    except BaseException as exc:
        cause = None if isinstance(exc, (InputError, WriteError, KeyboardInterrupt)) else _write_cause(exc, path)
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        if cause is not None:  # disk full, permission denied, ...: one line naming the output
            raise WriteError(path, cause) from exc
        raise


def _write_cause(exc: BaseException, path: Path) -> str | None:
    """The operating system's reason a write of ``path`` failed (while its temporary still fills the
    disk), or None when ``exc`` is not about the file system."""
    cause = os_error_cause(exc)
    if cause is None and isinstance(exc, (OSError, RuntimeError, ValueError)):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(path.parent).free < MIN_FREE_BYTES:
                cause = "No space left on device"
    return cause


def make_folder(folder: str | os.PathLike) -> Path:
    """``mkdir -p folder``; failure is a :class:`WriteError` naming the folder and the cause."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise WriteError(folder, "a file of that name is in the way, not a folder") from None
    except OSError as exc:
        raise WriteError(folder, os_error_cause(exc) or str(exc)) from None
    if not folder.is_dir():
        raise WriteError(folder, "not a folder")
    return folder


def check_writable(folder: str | os.PathLike, need_bytes: int = 0) -> Path:
    """Before a stage's work starts: ``folder`` exists or can be created, a file can be created in it,
    and it has at least ``max(need_bytes, MIN_FREE_BYTES)`` free. :class:`WriteError` otherwise."""
    folder = make_folder(folder)
    remove_stale_temporaries(folder / "probe", suffix="")  # probes of killed checks
    try:
        fd, probe = tempfile.mkstemp(prefix=f".tmp-probe-{_HOST}.{os.getpid()}-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise WriteError(folder, os_error_cause(exc) or str(exc)) from None
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return folder
    need = max(int(need_bytes), MIN_FREE_BYTES)
    if free < need:
        raise WriteError(folder, f"No space left on device: {_size(free)} free, the stage needs about {_size(need)}")
    return folder


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


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


def read_json(path: str | os.PathLike, what: str):
    """The parsed JSON of a user file; a missing or unparsable file is an InputError naming
    ``path`` and calling it ``what`` (e.g. "landmarks file")."""
    import json

    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found", p)
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{what} is not valid JSON ({exc})", p) from None


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

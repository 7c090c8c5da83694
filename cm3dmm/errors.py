"""The one exception type for problems with a user's input.

Every reader, source and stage raises :class:`InputError` for anything the user can fix
(missing file, corrupt mesh, wrong units, unknown config key, ...). The CLI turns it into a
single line on stderr and a non-zero exit, without a traceback.
"""

from __future__ import annotations

import os
import re


class InputError(Exception):
    """A problem with user input: names the file (if any) and what is wrong with it."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class StageError(Exception):
    """A stage could not complete for a reason that is not the input's fault
    (e.g. training diverged to NaN). Reported like :class:`InputError`."""


class WriteError(StageError):
    """An output could not be written or its folder created (no space left, permission denied, a
    read-only file system, a path through a file): names the path and the operating system's cause."""

    def __init__(self, path: str | os.PathLike, cause: str):
        self.path = os.fspath(path)
        self.cause = cause
        super().__init__(f"{self.path}: cannot write ({cause})")


_ERRNO = re.compile(r"errno = (\d+)")


def os_error_cause(exc: BaseException) -> str | None:
    """The operating system's reason behind ``exc`` ("No space left on device", ...), or None when
    ``exc`` is not an operating-system error. Understands OSError and the RuntimeError / OSError
    texts of HDF5 ("... errno = 28, error message = ...") and torch ("file write failed")."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.strerror or os.strerror(exc.errno)
    text = str(exc)
    m = _ERRNO.search(text)
    if m and int(m.group(1)):
        return os.strerror(int(m.group(1)))
    if isinstance(exc, (OSError, RuntimeError)) and ("write failed" in text or "unexpected pos" in text):
        return "the write failed"
    return None


def is_unreadable(exc: BaseException) -> bool:
    """True when ``exc`` says a file cannot be read at all (permissions, I/O error, a folder), as
    opposed to a file that was read and is corrupt (libraries raise OSError(EINVAL) for those too)."""
    import errno

    return isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EIO, errno.EISDIR,
                                                      errno.ENXIO, errno.ENODEV, errno.ELOOP)

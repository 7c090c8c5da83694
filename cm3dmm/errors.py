"""The one exception type for problems with a user's input.

Every reader, source and stage raises :class:`InputError` for anything the user can fix
(missing file, corrupt mesh, wrong units, unknown config key, ...). The CLI turns it into a
single line on stderr and a non-zero exit, without a traceback.
"""

from __future__ import annotations

import os


class InputError(Exception):
    """A problem with user input: names the file (if any) and what is wrong with it."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class StageError(Exception):
    """A stage could not complete for a reason that is not the input's fault
    (e.g. training diverged to NaN). Reported like :class:`InputError`."""

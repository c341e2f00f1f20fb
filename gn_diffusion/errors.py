"""Errors that are the user's to fix: the command line prints their one sentence and exits 2."""

from __future__ import annotations

import errno
from pathlib import Path


class UserError(Exception):
    """Bad input (a config, a path, a checkpoint): the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A config value that is unknown, of the wrong type, or out of range."""


# File-system failures that say something about the user's disk, not about this code: each is
# one sentence naming the path and the fix. Any other OSError stays a bug with its traceback.
_READ_ONLY = {errno.EROFS}
_DENIED = {errno.EACCES, errno.EPERM}
_FULL = {errno.ENOSPC, errno.EDQUOT}
_NOT_A_FOLDER = {errno.ENOTDIR, errno.EEXIST}
_NOT_A_FILE = {errno.EISDIR}


def file_system_sentence(exc: BaseException) -> str | None:
    """The user's sentence for the first disk-side OSError in `exc`'s chain (exc, then what it was
    raised from), or None when there is none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            sentence = _sentence(exc)
            if sentence is not None:
                return sentence
        exc = exc.__cause__ or exc.__context__
    return None


def _sentence(exc: OSError) -> str | None:
    path = exc.filename if exc.filename is not None else "the output folder"
    if exc.errno in _READ_ONLY:
        return f"cannot write to {path}: its file system is read-only; choose a folder on a writable disk."
    if exc.errno in _DENIED:
        return f"permission denied for {path}; give your user access to it or choose another folder."
    if exc.errno in _FULL:
        return (f"the disk holding {path} is full; free some space there (or choose a folder on another disk) "
                "and run the command again.")
    if exc.errno in _NOT_A_FOLDER:
        return _not_a_folder(exc, path)
    if exc.errno in _NOT_A_FILE:
        return f"{path} is a folder where a file is expected; move the folder away or choose another path."
    return None


def _not_a_folder(exc: OSError, path) -> str:
    if exc.errno == errno.EEXIST and exc.filename is not None and Path(exc.filename).is_dir():
        return f"{path} already exists; remove it or choose another path."
    return f"{_blocking_file(path)} is a file where a folder is expected; move the file away or choose another path."


def _blocking_file(path) -> Path:
    """The first part of `path` that exists and is not a folder: the one to move (ENOTDIR names
    the whole path, e.g. out/grid.png/x when out/grid.png is the file in the way)."""
    path = Path(path)
    for part in [*reversed(path.parents), path]:
        if part.exists() and not part.is_dir():
            return part
    return path

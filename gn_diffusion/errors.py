"""Errors that are the user's to fix: the command line prints their one sentence and exits 2."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path


class UserError(Exception):
    """Bad input (a config, a path, a checkpoint): the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """A config value that is unknown, of the wrong type, or out of range."""


# File-system failures that say something about the user's disk, not about this code: each is
# one sentence naming the path and the fix. Any other OSError stays a bug with its traceback.
_READ_ONLY = {errno.EROFS}
_DENIED = {errno.EACCES, errno.EPERM}
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_A_FOLDER = {errno.ENOTDIR, errno.EEXIST}
_NOT_A_FILE = {errno.EISDIR}
_TOO_LONG = {errno.ENAMETOOLONG}
_DISK_SIDE = _READ_ONLY | _DENIED | _FULL | _NOT_A_FOLDER | _NOT_A_FILE | _TOO_LONG
# Writers that report a refused write without an OSError: safetensors puts the OS's error in its
# text; torch's zip writer (torch.save, accelerate's save_state) says only that a write came up short.
_OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")
_TORCH_SHORT_WRITE = ("unexpected pos", "failed writing", "file write failed")


def file_system_sentence(exc: BaseException) -> str | None:
    """The user's sentence for the first disk-side failure in `exc`'s chain (exc, then what it was
    raised from): an OSError, or a library's report of one (library_write_errno); None when there
    is none."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = exc.errno if isinstance(exc, OSError) else library_write_errno(exc)
        if code is not None:
            sentence = _sentence(exc if isinstance(exc, OSError) else OSError(code, os.strerror(code)))
            if sentence is not None:
                return sentence
        exc = exc.__cause__ or exc.__context__
    return None


def library_write_errno(exc: BaseException) -> int | None:
    """The errno of a disk-side failure that a library reported without an OSError, or None when
    `exc` is not one (a bug keeps its traceback). torch names no cause: a short write under a
    finite file-size limit (ulimit -f) is taken as that limit, any other as a full disk."""
    text = str(exc)
    if type(exc).__name__ == "SafetensorError":
        found = _OS_ERROR_TEXT.search(text)
        code = int(found.group(1)) if found else None
        return code if code in _DISK_SIDE else None
    if isinstance(exc, RuntimeError) and any(phrase in text for phrase in _TORCH_SHORT_WRITE):
        return errno.EFBIG if _file_size_limited() else errno.ENOSPC
    return None


def _file_size_limited() -> bool:
    import resource

    return resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY


def _sentence(exc: OSError) -> str | None:
    path = exc.filename if exc.filename is not None else "the output folder"
    if exc.errno in _READ_ONLY:
        return f"cannot write to {path}: its file system is read-only; choose a folder on a writable disk."
    if exc.errno in _DENIED:
        return f"permission denied for {path}; give your user access to it or choose another folder."
    if exc.errno in _FULL:
        return _full(exc.errno, path)
    if exc.errno in _NOT_A_FOLDER:
        return _not_a_folder(exc, path)
    if exc.errno in _NOT_A_FILE:
        return f"{path} is a folder where a file is expected; move the folder away or choose another path."
    if exc.errno in _TOO_LONG:
        return _too_long(path)
    return None


def _full(code: int, path) -> str:
    if code == errno.EFBIG:
        return (f"writing {path} went over the file-size limit (ulimit -f) or the largest file its file system "
                "takes; raise the limit (ulimit -f unlimited) or choose a folder on another disk, and run the "
                "command again.")
    full = f"your disk quota for {path} is used up" if code == errno.EDQUOT else f"the disk holding {path} is full"
    return f"{full}; free some space there (or choose a folder on another disk) and run the command again."


def _too_long(path) -> str:
    """Name the part over the limit most file systems have for one name, when there is one."""
    longest = max((len(os.fsencode(part)) for part in Path(path).parts), default=0)
    if longest > 255:
        return (f"the path {path} holds a name of {longest} bytes, over the 255 most file systems allow; "
                "choose a shorter name.")
    return (f"the path {path} is too long for its file system (with the few characters a temporary copy adds); "
            "choose a shorter name.")


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

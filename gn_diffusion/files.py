"""Writing files and folders whole or not at all, and finding out first whether we can."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from .errors import library_write_errno


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed into place when the block succeeds
    (removed when it fails), so a killed process never leaves half a file and a reader sees the
    old file or the whole new one. The temporary name keeps `path`'s suffix, for writers that
    choose a format by it."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    with new_folders_removed_on_failure(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with writing(tmp, path):
                yield tmp
                follow_umask(tmp)
                os.replace(tmp, path)
        finally:
            _remove_quietly(tmp)  # after an interrupt too: a file of this pid's that nothing else removes


@contextlib.contextmanager
def atomic_folder(folder: str | Path) -> Iterator[Path]:
    """A new empty folder beside `folder` to write a whole set of files into; swapped in for
    `folder` when the block succeeds (swap_folder), removed when it fails."""
    folder = Path(folder)
    tmp = temporary_folder(folder)
    with new_folders_removed_on_failure(folder):
        try:
            with writing(tmp, folder):
                _remove_quietly(tmp)  # a killed earlier run of this pid's
                _remove_dead_writers_folders(folder)
                tmp.mkdir(parents=True)
                yield tmp
                swap_folder(tmp, folder)
        finally:
            _remove_quietly(tmp)


def temporary_folder(folder: Path) -> Path:
    """Where atomic_folder writes `folder` before swapping it in."""
    return folder.with_name(f".tmp-{folder.name}-{os.getpid()}")


def check_name_fits(path: str | Path) -> None:
    """Raise ENAMETOOLONG naming `path` when a part of it, or the temporary name beside it that a
    whole-or-nothing write uses, is longer than its file system takes: before the work, not after."""
    path = Path(path).absolute()
    limit = os.pathconf(nearest_existing(path), "PC_NAME_MAX")
    if any(len(os.fsencode(part)) > limit for part in (*path.parts, temporary_folder(path).name)):
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path))


def _remove_dead_writers_folders(folder: Path) -> None:
    """Remove the temporary folders of earlier writes of `folder` whose process is gone (killed
    while writing): nothing else would, and each can be a whole model's size."""
    import glob

    for leftover in folder.parent.glob(f".tmp-{glob.escape(folder.name)}-*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            _remove_quietly(leftover)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def new_folders_removed_on_failure(path: Path) -> Iterator[None]:
    """A block that may make the missing folders above `path`: if it fails, those it made are
    removed again (when still empty), so a refused write leaves no trace."""
    made = [p for p in path.absolute().parents if not os.path.lexists(p)]  # deepest first
    try:
        yield
    except BaseException:
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


@contextlib.contextmanager
def writing(tmp: Path, path: Path, *, remove: bool = True) -> Iterator[None]:
    """A block that writes the temporary file or folder `tmp` on its way to `path`: when it fails,
    `tmp` is removed (unless `remove` is false: another process is writing there too) and a refusal of the disk (an OSError naming `tmp`, anything in it or no file
    at all, or a library's report of one) is raised as an OSError naming `path`, the path the
    user asked for; run_cli turns that into its sentence. Any other failure is raised as it is.
    An interrupt leaves `tmp` as a kill would (the next write of the same name removes it)."""
    try:
        yield
    except Exception as exc:
        if remove:
            _remove_quietly(tmp)
        refused = _refusal_naming(exc, path, tmp)
        if refused is None:
            raise
        raise refused from exc


def _refusal_naming(exc: BaseException, path: Path, tmp: Path) -> OSError | None:
    if isinstance(exc, OSError):
        named = Path(exc.filename) if exc.filename is not None else None
        if exc.errno is None or (named is not None and named != tmp and tmp not in named.parents):
            return None  # a failure about another file names that file itself
        code = exc.errno
    else:
        code = library_write_errno(exc)
        if code is None:
            return None
    return OSError(code, os.strerror(code), str(path))  # OSError picks the subclass for the errno


def follow_umask(path: Path) -> None:
    """Give the file `path`, or every file in the folder `path`, the mode a plain open() would:
    0666 less the umask. Some writers make their files through a private temporary file
    (safetensors' 0600), which would make a model's weights unreadable to the group that reads
    the rest of its folder."""
    mode = 0o666 & ~_umask()
    found = [path] if not path.is_dir() else [Path(root) / name for root, _, names in os.walk(path) for name in names]
    for file in found:
        if not file.is_symlink() and file.stat().st_mode & 0o777 != mode:
            file.chmod(mode)


def _umask() -> int:
    """The process's umask, read without setting it (os.umask sets it, briefly, for every thread)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _remove_quietly(path: Path) -> None:
    """Remove a leftover temporary file or folder. Only when it exists: on a read-only disk even
    unlinking a missing file fails with EROFS, which would hide the error that got us here."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(OSError):
            path.unlink()


def nearest_existing(path: str | Path) -> Path:
    """`path`, or its closest ancestor that exists: where a new file or folder would be made."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: str | Path) -> None:
    """Raise the OSError that writing into `folder` (or the closest existing folder above it, so
    nothing is created) would raise: a probe file is written through atomic_path, synced (a full
    disk shows on the sync) and removed. Commands call this before their long work."""
    where = nearest_existing(folder)
    probe = where / f".write-probe-{os.getpid()}"
    try:
        with atomic_path(probe) as tmp, open(tmp, "wb") as handle:
            handle.write(b"probe")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as exc:
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(where)) from exc  # the folder, not the probe's name
    finally:
        _remove_quietly(probe)


def swap_folder(new: Path, final: Path) -> None:
    """Put the fully written folder `new` at `final`. The old `final` is moved aside to .old-<name>
    first and removed only once the new one is in place, so a crash leaves the old set (put back
    by restore_swapped) or the new one, never a mix."""
    follow_umask(new)
    old = _aside(final)
    moved = final.exists()
    if moved:
        _remove_quietly(old)  # stale: a swap whose clean-up was interrupted
        os.replace(final, old)
    try:
        os.replace(new, final)
    except OSError:
        if moved:
            os.replace(old, final)  # the old set goes back where it was
        raise
    _remove_quietly(old)


def restore_swapped(final: Path) -> None:
    """After a crash between swap_folder's two renames, `final` is missing and the old set waits
    at .old-<name>: put it back. A leftover beside a complete `final` is stale: remove it."""
    old = _aside(final)
    if not old.exists():
        return
    if final.exists():
        _remove_quietly(old)
    else:
        with contextlib.suppress(FileNotFoundError):  # another process of the same command did it
            os.replace(old, final)


def _aside(final: Path) -> Path:
    return final.with_name(f".old-{final.name}")


@contextlib.contextmanager
def file_lock(path: str | Path, *, wait: bool = True) -> Iterator[bool]:
    """An exclusive OS lock on `path` (created, with its folder, if need be) for the block;
    whether it is held (without `wait`, False if another process holds it). The lock goes with
    the process that holds it, so a killed process leaves none behind."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = True
        except BlockingIOError:
            held = False
        try:
            yield held
        finally:
            if held:
                fcntl.flock(handle, fcntl.LOCK_UN)


class LockTaken(Exception):
    """Another process holds the lock; `holder` is the pid it recorded ('' when none yet)."""

    def __init__(self, holder: str):
        super().__init__(holder)
        self.holder = holder


class HeldLock:
    """An exclusive OS lock (flock) on a file that records the holder's pid, taken without waiting
    by take_lock; the lock goes with the process, so a killed holder leaves none behind."""

    def __init__(self, path: Path, handle, made: list[Path], before: bytes):
        self.path, self._handle, self._made, self._before = path, handle, made, before

    def release(self, *, undo: bool = False) -> None:
        """Let go. With `undo` (a refused run) leave everything as found: the lock file back as
        it was (or removed, with the folders taking it made), so the refusal changes no byte."""
        if self._handle.closed:
            return
        with contextlib.suppress(OSError):
            if undo and self.path not in self._made:
                self._handle.seek(0)
                self._handle.truncate()
                self._handle.write(self._before)
                self._handle.flush()
            else:  # removed while held: whoever opened it meanwhile finds it replaced and retries
                self.path.unlink()
        self._handle.close()
        for folder in [p for p in self._made if p != self.path] if undo else ():
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty


def take_lock(path: str | Path) -> HeldLock:
    """The exclusive lock on `path` (created, with its folders, if need be), holding this
    process's pid; LockTaken naming the holder when another process has it."""
    import fcntl

    path = Path(path)
    made = [p for p in (path, *path.parents) if not os.path.lexists(p)]  # deepest first
    with new_folders_removed_on_failure(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a+b")  # bytes: whatever a stray file there holds, reading it cannot fail
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _recorded_pid(handle)
            handle.close()
            raise LockTaken(holder) from None
        if _same_file(handle, path):
            break
        handle.close()  # the holder removed it as we opened it: lock the file now there
    handle.seek(0)
    before = handle.read()
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n".encode())
    handle.flush()
    return HeldLock(path, handle, made, before)


def lock_holder(path: str | Path) -> str | None:
    """The pid recorded by the process holding the lock on `path` ('' when none yet), or None
    when no process holds it. Creates and changes nothing."""
    import fcntl

    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _recorded_pid(handle)
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


def _recorded_pid(handle) -> str:
    """The pid a lock file records ('' unless it holds one: the file may be anything a user put there)."""
    text = handle.read(64).decode("utf-8", errors="replace").strip()
    return text if text.isdigit() else ""


def _same_file(handle, path: Path) -> bool:
    try:
        here, there = os.fstat(handle.fileno()), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)

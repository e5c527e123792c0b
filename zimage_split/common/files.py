"""Writing files so that a crash or a kill leaves the old file or the new one, never half of one; and what
a failed write means, as a typed error that names the path."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from zimage_split.common.errors import (
    FailedPrecondition,
    PermissionDenied,
    ResourceExhausted,
    ZSplitError,
)

# A failed write by its errno: the words that follow the path, and the error it becomes. A full disk is
# RESOURCE_EXHAUSTED (gRPC's own example of it), a forbidden path PERMISSION_DENIED, and a path that cannot
# be written as it is (read-only, missing, a file where a folder should be, a failing disk)
# FAILED_PRECONDITION: only someone fixing the path or the disk can help, so a retry as it is fails again.
_FULL = ("is on a full disk", ResourceExhausted)
_NOT_A_FOLDER = ("is not a folder, or a part of its path is a file", FailedPrecondition)
WRITE_PROBLEMS: dict[int, tuple[str, type[ZSplitError]]] = {
    errno.ENOSPC: _FULL,
    errno.EDQUOT: ("is over its disk quota", ResourceExhausted),
    errno.EFBIG: ("is on a disk that refuses a file this large", ResourceExhausted),
    errno.EROFS: ("is on a read-only file system", FailedPrecondition),
    errno.EACCES: ("is not writable by this user", PermissionDenied),
    errno.EPERM: ("is not writable by this user", PermissionDenied),
    errno.ENOTDIR: _NOT_A_FOLDER,
    errno.EEXIST: _NOT_A_FOLDER,  # mkdir(exist_ok=True) on a file
    errno.EISDIR: ("is a folder, not a file", FailedPrecondition),
    errno.ENOENT: ("cannot be created: its folder is gone, or takes no new files", FailedPrecondition),
    errno.EIO: (
        "is on a disk that reported an I/O error: a failing disk, or a lost network mount",
        FailedPrecondition,
    ),
}


def write_error(error: OSError, path: str | os.PathLike[str], doing: str, fix: str) -> ZSplitError:
    """The typed error for an OSError from writing `path`: `{path} {problem} ({strerror} while {doing}). {fix}`.

    `path` may carry the flag that named it ("--out-dir /data/out"); every errno becomes a typed error, an
    unlisted one FAILED_PRECONDITION with its own strerror.
    """
    problem, kind = WRITE_PROBLEMS.get(error.errno or 0, ("cannot be written", FailedPrecondition))
    return kind(f"{os.fspath(path)} {problem} ({error.strerror or error} while {doing}). {fix}")


def write_atomically(path: Path, data: bytes) -> None:
    """Writes beside the target (a hidden `.NAME.*.tmp`), syncs, and renames over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(temporary, path)
    except BaseException:
        # Quietly: on a file system that just turned read-only the unlink fails too, and the caller
        # needs the first error (whoever writes here next sweeps `.*.tmp` files up).
        with contextlib.suppress(OSError):
            Path(temporary).unlink(missing_ok=True)
        raise


def append_synced(path: Path, data: bytes) -> None:
    """Appends data and syncs; if that fails, cuts the file back, so no partial record stays behind."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.lseek(descriptor, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:  # unbuffered: a short write on a filling disk must not be retried later
                view = view[os.write(descriptor, view) :]
            os.fsync(descriptor)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(descriptor, start)
            raise
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def locked_folder(folder: Path, *, busy: Callable[[], Exception] | None = None) -> Iterator[None]:
    """Holds an exclusive lock on `folder` (flock on the folder itself, so no lock file is left in it) for
    the block, waiting for it if another process (or another `locked_folder` here) holds it; the kernel
    releases it when the process dies. With `busy`, does not wait: raises `busy()` when the lock is held."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if busy is None else fcntl.LOCK_NB))
        except BlockingIOError:
            if busy is None:
                raise
            raise busy() from None
        yield
    finally:
        os.close(descriptor)  # closing the last descriptor of the open file releases the lock

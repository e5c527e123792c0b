"""Writing files so that a crash or a kill leaves the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


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

"""Crash-safe file writes.

A write that matters goes to a temporary file in the same directory, is
fsynced, renamed over the target, and the directory is fsynced, so that after a
crash the target holds either the old or the new content, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(target: str | os.PathLike[str], mode: int = 0o644, binary: bool = True) -> Iterator[IO]:
    """Yield a file object; on clean exit its content atomically replaces ``target``.

    On an exception the temporary file is removed and ``target`` is untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb" if binary else "w") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    with atomic_writer(target, mode=mode) as handle:
        handle.write(data)


def atomic_write_text(target: str | os.PathLike[str], text: str, mode: int = 0o644) -> None:
    atomic_write_bytes(target, text.encode("utf-8"), mode=mode)


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and make it 0700; parents it has to create are 0700 too.

    Private data (keys, KV states holding tenants' context) must never sit in a
    directory that was created world-readable on the way.
    """
    path = Path(path)
    missing = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            pass
    os.chmod(path, 0o700)
    return path

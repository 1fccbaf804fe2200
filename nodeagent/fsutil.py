"""Crash-safe file writes, and private files and directories.

A write that matters goes to a temporary file in the same directory, is
fsynced, renamed over the target, and the directory is fsynced, so that after a
crash the target holds either the old or the new content, never a mix.

Private state (the state database with pods' private-scope text, KV states,
keys, receipts) is 0600 in 0700 directories whatever the umask: every mode is
set explicitly, never left to the umask, and `restrict_umask` makes whatever
else a process creates (SQLite's -wal/-shm, a child's files) private too. A
wider mode found on an existing file or directory of ours is tightened and
logged (`ensure_private_dir`, `ensure_private_file`); one we cannot change
(owned by someone else) is logged and left, and `agent-machine doctor` reports it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import IO, Iterator

log = logging.getLogger("agent_machine.fsutil")

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
PUBLIC_FILE_MODE = 0o644  # for what is written to be handed on: units, exports, proofs
PRIVATE_UMASK = 0o077


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(target: str | os.PathLike[str], mode: int = PRIVATE_FILE_MODE,
                  binary: bool = True) -> Iterator[IO]:
    """Yield a file object; on clean exit its content atomically replaces ``target``.

    ``target`` gets exactly ``mode`` (private unless the caller says otherwise).
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


def atomic_write_bytes(target: str | os.PathLike[str], data: bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    with atomic_writer(target, mode=mode) as handle:
        handle.write(data)


def atomic_write_text(target: str | os.PathLike[str], text: str, mode: int = PRIVATE_FILE_MODE) -> None:
    atomic_write_bytes(target, text.encode("utf-8"), mode=mode)


def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and make it 0700; parents it has to create are 0700 too.

    Private data (keys, KV states holding tenants' context) must never sit in a
    directory that was created world-readable on the way. An existing ``path``
    open to group or others is tightened (and logged); existing parents are
    left as they are.
    """
    path = Path(path)
    missing = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            pass
        else:
            os.chmod(directory, PRIVATE_DIR_MODE)  # a umask such as 0277 narrows mkdir's mode
    _tighten(path, PRIVATE_DIR_MODE)
    return path


def ensure_private_file(path: str | os.PathLike[str]) -> bool:
    """Make an existing file 0600 if group or others have any access (logged). False if absent."""
    path = Path(path)
    try:
        _tighten(path, PRIVATE_FILE_MODE)
    except FileNotFoundError:
        return False
    return True


def create_private_file(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` empty with mode 0600 unless it exists; an existing one is made private."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    except FileExistsError:
        ensure_private_file(path)
        return path
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # exactly 0600, whatever the umask took away
    finally:
        os.close(fd)
    return path


def open_to_others(path: str | os.PathLike[str]) -> int | None:
    """The mode of ``path`` if group or others have any access to it, else None (also when it
    does not exist or cannot be looked at)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    return mode if mode & 0o077 else None


def restrict_umask() -> int:
    """Add 077 to the process umask (as ``UMask=0077`` does in the agent's units); returns the old one.

    Whatever the process and its children create afterwards without an
    explicit mode is private. The umask is never loosened, not even briefly.
    """
    old = os.umask(PRIVATE_UMASK)
    os.umask(old | PRIVATE_UMASK)
    return old


def _tighten(path: Path, private_mode: int) -> None:
    """Give ``path`` ``private_mode`` if others can reach it (directories: whenever it differs)."""
    info = os.stat(path)
    mode, is_dir = stat.S_IMODE(info.st_mode), stat.S_ISDIR(info.st_mode)
    if mode == private_mode or not (mode & 0o077 or is_dir):
        return
    try:
        os.chmod(path, private_mode)
    except PermissionError:
        if mode & 0o077:
            log.warning("%s has mode %o: others can reach private state there, and this user may not change "
                        "it (run: chmod %o %s as its owner)", path, mode, private_mode, path)
            return
        raise
    if mode & 0o077:
        log.warning("%s had mode %o, open to others: tightened to %o", path, mode, private_mode)

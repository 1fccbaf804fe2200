"""Tier stores: directories of saved-state files with a byte budget.

T1 lives in RAM (a tmpfs directory: /dev/shm, else $XDG_RUNTIME_DIR), T2 on
disk under the state directory. A store only moves bytes and checks digests;
*which* entry lives where, and the budgets, are the CacheManager's business
(the index is the truth about bytes in use).

Files are named ``<entry id>.kv``. Every write is crash-safe (temp file,
fsync, rename, directory fsync); a file whose sha256 is not the digest the
index recorded is never handed out (`CorruptEntry`). A state holds a tenant's
context: tier directories are 0700 and every file in them 0600, including one
a provider wrote with its own umask and we adopt by renaming.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nodeagent.fsutil import PRIVATE_FILE_MODE, atomic_writer, ensure_private_dir, fsync_dir

TierName = Literal["T1", "T2"]
SUFFIX = ".kv"
STAGING_PREFIX = ".staging-"
_CHUNK = 1 << 20


class CorruptEntry(Exception):
    """A tier file is missing, unreadable, or does not match its recorded digest."""


def sha256_file(path: Path) -> tuple[int, str]:
    """(size, "sha256:<hex>") of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, "sha256:" + digest.hexdigest()


def default_t1_dir(env: dict[str, str] | None = None) -> Path:
    """A per-user directory on tmpfs: /dev/shm when usable, else $XDG_RUNTIME_DIR."""
    env = dict(os.environ) if env is None else env
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm / f"agent-machine-{os.getuid()}" / "kv"
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "agent-machine" / "kv"
    raise RuntimeError("no RAM directory for the T1 cache tier: /dev/shm is not writable and "
                       "XDG_RUNTIME_DIR is not set; pass an explicit T1 directory")


@dataclass
class TierStore:
    name: TierName
    directory: Path
    budget_bytes: int

    def __post_init__(self) -> None:
        if self.budget_bytes < 0:
            raise ValueError(f"{self.name} budget must be >= 0 bytes, got {self.budget_bytes}")
        self.directory = Path(self.directory)
        ensure_private_dir(self.directory)

    def path(self, entry_id: str) -> Path:
        return self.directory / f"{entry_id}{SUFFIX}"

    def staging_path(self) -> Path:
        """A fresh path in this directory for a provider to save a state into."""
        fd, name = tempfile.mkstemp(prefix=STAGING_PREFIX, suffix=SUFFIX, dir=self.directory)
        os.close(fd)
        return Path(name)

    def holds(self, path: Path) -> bool:
        """Whether ``path`` is in this tier's directory (a rename, not a copy, adopts it)."""
        return Path(path).parent.resolve() == self.directory.resolve()

    def adopt(self, source: Path, entry_id: str, prepared: tuple[int, str] | None = None) -> tuple[int, str]:
        """Make ``source`` this tier's file for ``entry_id``; returns (bytes, digest).

        A file already in this directory is fsynced and renamed (no copy); any
        other is copied crash-safely and the source left alone. ``prepared`` is
        `prepare`'s result for a file in this directory: it is then not read again.
        """
        source = Path(source)
        target = self.path(entry_id)
        if self.holds(source):
            size, digest = prepared if prepared is not None else self.prepare(source)
            os.chmod(source, PRIVATE_FILE_MODE)  # a provider (llama-server) wrote it with its own umask
            os.replace(source, target)
            fsync_dir(self.directory)
            return size, digest
        return self.copy_in(source, entry_id)

    @staticmethod
    def prepare(source: Path) -> tuple[int, str]:
        """(bytes, digest) of a staged file, flushed to its device: the slow part of
        adopting it, which needs no lock (nothing else touches a staged file)."""
        size, digest = sha256_file(source)
        with open(source, "rb") as handle:
            os.fsync(handle.fileno())
        return size, digest

    def copy_in(self, source: Path, entry_id: str) -> tuple[int, str]:
        digest = hashlib.sha256()
        size = 0
        with open(source, "rb") as src, atomic_writer(self.path(entry_id), mode=PRIVATE_FILE_MODE) as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
                size += len(chunk)
        return size, "sha256:" + digest.hexdigest()

    def verify(self, entry_id: str, expected_digest: str) -> Path:
        """The entry's path if its content matches ``expected_digest``; else CorruptEntry."""
        path = self.path(entry_id)
        try:
            _, digest = sha256_file(path)
        except OSError as exc:
            raise CorruptEntry(f"{self.name} file {path} unreadable: {exc.strerror or exc}") from exc
        if digest != expected_digest:
            raise CorruptEntry(f"{self.name} file {path} has digest {digest}, index recorded {expected_digest}")
        return path

    def remove(self, entry_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(entry_id))

    def entry_ids_on_disk(self) -> set[str]:
        return {p.name[: -len(SUFFIX)] for p in self.directory.glob(f"*{SUFFIX}")
                if not p.name.startswith(".")}

    def remove_stale_staging(self) -> int:
        removed = 0
        for path in self.directory.glob(f"{STAGING_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        for path in self.directory.glob(".*.tmp"):  # atomic_writer leftovers after a crash
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        return removed

    def free_bytes_on_device(self) -> int:
        return shutil.disk_usage(self.directory).free

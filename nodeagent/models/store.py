"""The content-addressed model store.

Layout under the state directory::

    models/blobs/sha256-<hex>      one file per distinct model (by content)
    models/blobs/.import-<pid>-*   an import in progress (never a blob name)
    state.db: models, model_tags   metadata and NAME:TAG -> digest

Invariants:
* A file named ``sha256-<hex>`` always holds exactly the bytes whose sha256 is
  ``<hex>``: it is placed under a temporary name, hashed (or hashed while
  copied), fsynced and only then renamed; the directory is fsynced after.
* Nothing is written before the source is checked to be a usable GGUF.
* The database row is committed after the blob exists; a crash in between
  leaves at most a complete, correctly named blob that the next import of the
  same content reuses.
* Placement prefers a reflink (copy-on-write clone), then a hardlink (same
  filesystem; the blob then shares the source's inode, so editing the source in
  place would change the blob — use ``mode="copy"`` when that can happen), and
  falls back to a copy.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Literal

from nodeagent.contracts.model import GGUFInfo, ModelRecord
from nodeagent.contracts.names import MAX_MODEL_REFERENCE, MODEL_NAME, MODEL_TAG
from nodeagent.fsutil import fsync_dir
from nodeagent.models.gguf_meta import GGUFMeta, read_gguf

DEFAULT_TAG = "latest"
CHUNK = 4 << 20
FICLONE = 0x40049409  # linux/fs.h _IOW(0x94, 9, int)

Progress = Callable[[int, int], None]  # (bytes done, bytes total)
PlaceMode = Literal["auto", "copy"]

_NAME_RE = re.compile(f"^{MODEL_NAME}$")
_TAG_RE = re.compile(f"^{MODEL_TAG}$")
_HEX_RE = re.compile(r"^[0-9a-f]{6,64}$")

MIGRATIONS = [
    """
    CREATE TABLE models (
        digest TEXT PRIMARY KEY,
        size_bytes INTEGER NOT NULL,
        format TEXT NOT NULL,
        metadata TEXT NOT NULL,
        source_path TEXT,
        imported_at TEXT NOT NULL
    );
    CREATE TABLE model_tags (
        name TEXT NOT NULL,
        tag TEXT NOT NULL,
        digest TEXT NOT NULL REFERENCES models(digest) ON DELETE CASCADE,
        created_at TEXT NOT NULL,
        PRIMARY KEY (name, tag)
    );
    CREATE INDEX model_tags_digest ON model_tags(digest)
    """,
    # A chat template set by the operator, served instead of the GGUF's own.
    """
    CREATE TABLE model_templates (
        digest TEXT PRIMARY KEY REFERENCES models(digest) ON DELETE CASCADE,
        template TEXT NOT NULL,
        set_at TEXT NOT NULL
    )
    """,
]


class ModelStoreError(ValueError):
    """A store operation was refused; the message says why and what to do."""


class ModelNotFound(ModelStoreError):
    pass


class ModelInUse(ModelStoreError):
    pass


@dataclass(frozen=True)
class Reference:
    name: str
    tag: str

    def __str__(self) -> str:
        return f"{self.name}:{self.tag}"


def parse_reference(text: str) -> Reference:
    """``NAME[:TAG]`` with the default tag ``latest``. Names are lowercase."""
    if len(text) > MAX_MODEL_REFERENCE:
        raise ModelStoreError(f"model reference is {len(text)} characters long; at most {MAX_MODEL_REFERENCE}")
    name, sep, tag = text.rpartition(":") if ":" in text.split("/")[-1] else (text, "", "")
    if not sep:
        name, tag = text, DEFAULT_TAG
    name = name.lower()
    if not _NAME_RE.match(name):
        raise ModelStoreError(
            f"invalid model name {name!r}: use lowercase letters, digits, '.', '_', '-' and '/' between parts"
        )
    if not _TAG_RE.match(tag):
        raise ModelStoreError(f"invalid tag {tag!r}: use letters, digits, '.', '_', '-' (at most 128)")
    return Reference(name, tag)


def default_name(path: Path) -> str:
    stem = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-._") or "model"
    return stem


def gguf_info(meta: GGUFMeta) -> GGUFInfo:
    data = meta.to_dict()
    data.pop("file_size")
    data["has_chat_template"] = data.pop("chat_template") is not None
    return GGUFInfo.model_validate(data)


def meta_from_info(info: GGUFInfo, file_size: int) -> GGUFMeta:
    data = info.model_dump(by_alias=False)
    data.pop("has_chat_template")
    return GGUFMeta(**data, file_size=file_size)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ModelStore:
    def __init__(self, state_dir: str | os.PathLike[str], conn: sqlite3.Connection | None = None) -> None:
        from nodeagent import store

        self.state_dir = Path(state_dir)
        self.blobs_dir = self.state_dir / "models" / "blobs"
        self.conn = conn if conn is not None else store.connect(self.state_dir / "state.db")
        store.migrate(self.conn, "models", MIGRATIONS)

    @classmethod
    def open(cls) -> "ModelStore":
        from nodeagent.paths import resolve_paths

        return cls(resolve_paths().state_dir)

    def close(self) -> None:
        self.conn.close()

    # ------------------------------------------------------------ import
    def import_model(
        self,
        source: str | os.PathLike[str],
        name: str | None = None,
        *,
        progress: Progress | None = None,
        mode: PlaceMode = "auto",
    ) -> ModelRecord:
        """Check, hash and place ``source``; tag it ``name`` (default: the file stem, tag latest)."""
        source = Path(source)
        ref = parse_reference(name) if name else parse_reference(default_name(source))
        read_gguf(source)  # refuse bad input before writing anything
        self.blobs_dir.mkdir(parents=True, exist_ok=True)
        self._clean_stale_imports()
        hexdigest, blob = self._place(source, progress or (lambda done, total: None), mode)
        meta = read_gguf(blob)  # what is stored is what is described
        digest = f"sha256:{hexdigest}"
        now = _now()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            self.conn.execute(
                "INSERT OR IGNORE INTO models (digest, size_bytes, format, metadata, source_path, imported_at)"
                " VALUES (?, ?, 'gguf', ?, ?, ?)",
                (digest, blob.stat().st_size, gguf_info(meta).model_dump_json(), str(source.resolve()), now),
            )
            self.conn.execute(
                "INSERT INTO model_tags (name, tag, digest, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name, tag) DO UPDATE SET digest = excluded.digest, created_at = excluded.created_at",
                (ref.name, ref.tag, digest, now),
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        return self.get(digest)

    def _clean_stale_imports(self) -> None:
        for partial in self.blobs_dir.glob(".import-*"):
            try:
                pid = int(partial.name.split("-")[1])
            except (IndexError, ValueError):
                pid = -1
            if pid != os.getpid() and (pid < 0 or not pid_alive(pid)):
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()

    def _place(self, source: Path, progress: Progress, mode: PlaceMode) -> tuple[str, Path]:
        total = source.stat().st_size
        tmp = self.blobs_dir / f".import-{os.getpid()}-{os.urandom(6).hex()}.partial"
        try:
            hexdigest = None
            if mode == "auto" and (self._reflink(source, tmp) or self._hardlink(source, tmp)):
                hexdigest = _hash_file(tmp, total, progress)
            else:
                hexdigest = _copy_and_hash(source, tmp, total, progress)
            final = self.blobs_dir / f"sha256-{hexdigest}"
            if final.exists() and final.stat().st_size == total:
                tmp.unlink()  # same content already stored
            else:
                os.replace(tmp, final)
            fsync_dir(self.blobs_dir)
            return hexdigest, final
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise

    @staticmethod
    def _reflink(source: Path, target: Path) -> bool:
        try:
            with open(source, "rb") as src, open(target, "xb") as dst:
                fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
                os.fsync(dst.fileno())
            return True
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
            return False

    @staticmethod
    def _hardlink(source: Path, target: Path) -> bool:
        try:
            os.link(source, target)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
                raise
            return False

    # ------------------------------------------------------------ read
    def _record(self, row: sqlite3.Row) -> ModelRecord:
        names = [
            f"{r['name']}:{r['tag']}"
            for r in self.conn.execute("SELECT name, tag FROM model_tags WHERE digest = ? ORDER BY name, tag", (row["digest"],))
        ]
        return ModelRecord(
            digest=row["digest"], names=names, size_bytes=row["size_bytes"],
            path=str(self.blob_path(row["digest"])), source_path=row["source_path"],
            imported_at=datetime.fromisoformat(row["imported_at"]),
            gguf=GGUFInfo.model_validate_json(row["metadata"]),
        )

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / digest.replace(":", "-")

    def get(self, digest: str) -> ModelRecord:
        row = self.conn.execute("SELECT * FROM models WHERE digest = ?", (digest,)).fetchone()
        if row is None:
            raise ModelNotFound(f"no model with digest {digest}")
        return self._record(row)

    def list(self) -> list[ModelRecord]:
        rows = self.conn.execute("SELECT * FROM models ORDER BY imported_at DESC, digest").fetchall()
        return [self._record(row) for row in rows]

    def meta(self, record: ModelRecord) -> GGUFMeta:
        return meta_from_info(record.gguf, record.size_bytes)

    def resolve(self, text: str) -> ModelRecord:
        """``NAME[:TAG]``, ``sha256:<hex prefix>`` or a bare hex prefix (>= 6 characters)."""
        return self._resolve(text)[0]

    def _resolve(self, text: str) -> tuple[ModelRecord, Reference | None]:
        """The record and, when ``text`` named a tag (not a digest), that reference."""
        text = text.strip()
        if not text.startswith("sha256:"):
            try:
                ref = parse_reference(text)
            except ModelStoreError:
                ref = None
            if ref is not None:
                row = self.conn.execute(
                    "SELECT digest FROM model_tags WHERE name = ? AND tag = ?", (ref.name, ref.tag)
                ).fetchone()
                if row is not None:
                    return self.get(row["digest"]), ref
        prefix = text.removeprefix("sha256:").lower()
        if _HEX_RE.match(prefix):
            rows = self.conn.execute(
                "SELECT digest FROM models WHERE digest LIKE ? ORDER BY digest", (f"sha256:{prefix}%",)
            ).fetchall()
            if len(rows) == 1:
                return self.get(rows[0]["digest"]), None
            if len(rows) > 1:
                raise ModelStoreError(
                    f"digest prefix {prefix!r} matches {len(rows)} models: "
                    + ", ".join(r["digest"][7:19] for r in rows) + "; give more characters"
                )
        raise ModelNotFound(f"no model named {text!r} (see `agent-machine models ls`)")

    # ------------------------------------------------------------ remove
    def template_override(self, digest: str) -> str | None:
        """The operator's chat template for this model, or None (its GGUF's own is served)."""
        row = self.conn.execute("SELECT template FROM model_templates WHERE digest = ?", (digest,)).fetchone()
        return row[0] if row is not None else None

    def set_template(self, text: str, template: str | None) -> ModelRecord:
        """Serve ``template`` (Jinja) for the model named ``text``; None goes back to the GGUF's."""
        record = self.resolve(text)
        if template is None:
            self.conn.execute("DELETE FROM model_templates WHERE digest = ?", (record.digest,))
        else:
            from nodeagent.templates import check_template

            check_template(template)  # raises TemplateError naming the Jinja error
            self.conn.execute("INSERT OR REPLACE INTO model_templates (digest, template, set_at) VALUES (?, ?, ?)",
                              (record.digest, template, _now()))
        return record

    def remove(self, text: str, *, loaded: set[str] | frozenset[str] = frozenset()) -> tuple[ModelRecord, bool]:
        """Remove a name, or given a digest every name; drop the blob when no name is left.

        ``loaded`` holds the digests a provider has loaded now: dropping one of
        those blobs is refused (removing one of several names is allowed).
        Returns (the record before removal, whether the blob was deleted).
        """
        record, ref = self._resolve(text)
        remaining = [n for n in record.names if n != str(ref)] if ref is not None else []
        drop_blob = not remaining
        if drop_blob and record.digest in loaded:
            raise ModelInUse(
                f"{text} ({record.digest[:19]}) is loaded; unload it first (`agent-machine models unload {text}`)"
            )
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            if drop_blob:
                self.conn.execute("DELETE FROM model_tags WHERE digest = ?", (record.digest,))
                self.conn.execute("DELETE FROM models WHERE digest = ?", (record.digest,))
            else:
                assert ref is not None
                self.conn.execute("DELETE FROM model_tags WHERE name = ? AND tag = ?", (ref.name, ref.tag))
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        if drop_blob:
            # The row is gone first: a crash here leaves an unreferenced blob, never a dangling row.
            with contextlib.suppress(FileNotFoundError):
                self.blob_path(record.digest).unlink()
            fsync_dir(self.blobs_dir)
        return record, drop_blob


def _hash_file(path: Path, total: int, progress: Progress) -> str:
    digest = hashlib.sha256()
    done = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            done += len(chunk)
            progress(done, total)
    return digest.hexdigest()


def _copy_and_hash(source: Path, target: Path, total: int, progress: Progress) -> str:
    digest = hashlib.sha256()
    done = 0
    with open(source, "rb") as src, open(target, "xb") as dst:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            dst.write(chunk)
            done += len(chunk)
            progress(done, total)
        dst.flush()
        os.fsync(dst.fileno())
    os.chmod(target, 0o444)
    return digest.hexdigest()

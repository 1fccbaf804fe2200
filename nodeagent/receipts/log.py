"""The append-only receipt log of one machine.

Layout of the log directory (``<state>/receipts/`` by default; an export has
the same files minus the index and lock, so one verifier reads both)::

    receipts.jsonl       one DSSE envelope per line; the source of truth
    checkpoints/<size>.note   signed checkpoints (C2SP signed notes)
    keys/<keyid>.pem     every public key that ever signed here
    log.json             the log's origin (the name checkpoints are signed for)
    index.db             SQLite index: seq -> offset, leaf hash, summary columns
    quarantine/          torn tails cut off during recovery, kept for inspection
    lock                 flock held by the one writer

Invariants:

* line ``i`` of receipts.jsonl is entry ``seq = i``; its predicate names
  ``seq`` and the RFC 6962 leaf hash of line ``i-1``; the Merkle tree's leaf
  ``i`` is that line's leaf hash.
* `append` returns only after the line is on stable storage (fdatasync).
  Concurrent appenders share one fdatasync (group commit): the first waiter
  syncs everything written so far, the others wait for it.
* the index is derived data, updated after the fsync. A crash between the two
  leaves lines the index lacks; opening the log re-verifies and indexes them
  and says so in `recovery`. A torn last line (a write cut short; never
  acknowledged) is moved to quarantine/ and reported. A log shorter than its
  index or than its latest checkpoint, or whose entries do not hash to the
  checkpoint's root, refuses to open (`LogCorrupt`): nothing is silently
  accepted.
* one process writes (``lock``); readers (`LogReader`) need no lock.

Test hook: ``AGENT_MACHINE_RECEIPTS_TEST_PAUSE=<point>`` (``mid-write``,
``after-write``, ``after-fsync``) makes an append print ``paused <point>
<seq>`` to stderr and sleep at that point, so a test can kill -9 the process
exactly there. It is read once when the log opens.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

from nodeagent.contracts.receipt import ProofEntry, PublicKeyRef, ReceiptInput, ReceiptProof, rfc3339_utc
from nodeagent.fsutil import atomic_write_bytes, atomic_write_text, ensure_private_dir
from nodeagent.receipts.checkpoint import Checkpoint, CheckpointError, check_origin, open_checkpoint, sign_checkpoint
from nodeagent.receipts.entry import (
    KIND_EVENT,
    KIND_EXECUTION,
    KIND_ROTATION,
    build_event_line,
    build_execution_line,
    build_rotation_line,
    inspect_line,
)
from nodeagent.receipts.errors import KeyMismatch, LogBusy, LogClosed, LogCorrupt, ReceiptError
from nodeagent.receipts.keys import PublicKey, Signer
from nodeagent.receipts.merkle import MerkleTree, leaf_hash
from nodeagent.receipts.verify import (
    CHECKPOINT_DIR,
    CHECKPOINT_SUFFIX,
    KEYS_DIR,
    LOCK_FILE,
    LOG_FILE,
    SELECTOR_HELP,
    ChainChecker,
    extend_trust,
    load_public_keys,
    selector_candidates,
    split_lines,
)
from nodeagent.store import connect, migrate

META_FILE = "log.json"
INDEX_FILE = "index.db"
QUARANTINE_DIR = "quarantine"
TEST_PAUSE_ENV = "AGENT_MACHINE_RECEIPTS_TEST_PAUSE"

INDEX_MIGRATIONS = [
    """
    CREATE TABLE receipt_entries (
        seq INTEGER PRIMARY KEY,
        offset INTEGER NOT NULL,
        length INTEGER NOT NULL,          -- bytes of the line, without its newline
        leaf_hash BLOB NOT NULL,
        kind TEXT NOT NULL,               -- execution | key-rotation
        signer TEXT NOT NULL,             -- key id that signed (for rotations: the previous key)
        active_key TEXT NOT NULL,         -- key id due to sign the next entry
        run_id TEXT, pod TEXT, tenant TEXT, model TEXT, status TEXT, finished_at TEXT
    );
    CREATE INDEX receipt_entries_run ON receipt_entries (run_id);
    CREATE INDEX receipt_entries_tenant ON receipt_entries (tenant, seq)
    """,
]


@dataclass(frozen=True)
class AppendedReceipt:
    """A durable log entry: its position, id (leaf hash) and the exact line logged."""

    seq: int
    leaf_hash: bytes
    line: bytes  # the DSSE envelope, canonical JSON, without the newline

    @property
    def receipt_id(self) -> str:
        return self.leaf_hash.hex()

    def envelope(self) -> dict[str, Any]:
        return json.loads(self.line)


@dataclass
class RecoveryReport:
    """What opening the log had to repair. Empty when it was closed cleanly."""

    indexed_from_log: int = 0  # complete lines the index lacked, verified and indexed
    torn_bytes: int = 0  # bytes of an incomplete last line, moved to quarantine
    quarantined: Path | None = None
    index_rebuilt: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def repaired(self) -> bool:
        return bool(self.indexed_from_log or self.torn_bytes or self.index_rebuilt or self.notes)

    def messages(self) -> list[str]:
        out = list(self.notes)
        if self.index_rebuilt:
            out.append("the index was missing or unreadable and was rebuilt from receipts.jsonl")
        if self.indexed_from_log:
            out.append(f"{self.indexed_from_log} entr{'y' if self.indexed_from_log == 1 else 'ies'} written before a "
                       "crash were verified and added to the index")
        if self.torn_bytes:
            out.append(f"an incomplete last line ({self.torn_bytes} bytes, never acknowledged) was moved to {self.quarantined}")
        return out


@dataclass(frozen=True)
class _Pending:
    seq: int
    offset: int
    line: bytes
    leaf: bytes
    summary: dict[str, Any]
    active_key: str


def _row(pending: _Pending) -> tuple:
    s = pending.summary
    return (pending.seq, pending.offset, len(pending.line), pending.leaf, s["kind"], s["key_id"], pending.active_key,
            s.get("run_id"), s.get("pod"), s.get("tenant"), s.get("model"), s.get("status"), s.get("finished_at"))


_INSERT = ("INSERT OR REPLACE INTO receipt_entries (seq, offset, length, leaf_hash, kind, signer, active_key, "
           "run_id, pod, tenant, model, status, finished_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)")


def _open_index(path: Path):
    conn = connect(path)
    # The index is derived from receipts.jsonl and repaired from it on open, so
    # it does not need its own fsync per commit; the JSONL carries durability.
    conn.execute("PRAGMA synchronous=NORMAL")
    migrate(conn, "receipts-index", INDEX_MIGRATIONS)
    return conn


def default_origin(signer: Signer) -> str:
    return f"agent-machine/receipts/{signer.key_id[:16]}"


class ReceiptLog:
    """The writer. Thread-safe; one per log directory per machine (``lock``).

    Opening verifies the tail and the latest checkpoint and repairs what a
    crash left (see `recovery`); it raises `LogCorrupt` for anything it must
    not paper over, `LogBusy` if another process writes, `KeyMismatch` if
    ``signer`` is not the key the log expects next.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        signer: Signer,
        *,
        origin: str | None = None,
        checkpoint_every: int = 128,
        checkpoint_seconds: float = 60.0,
        group_commit: bool = True,
    ) -> None:
        if checkpoint_every < 1 or checkpoint_seconds <= 0:
            raise ValueError("checkpoint_every must be >= 1 and checkpoint_seconds > 0")
        self.directory = Path(directory)
        self._signer = signer
        self._checkpoint_every = checkpoint_every
        self._checkpoint_seconds = checkpoint_seconds
        self._group_commit = group_commit
        self._pause = os.environ.get(TEST_PAUSE_ENV) or None
        self.recovery = RecoveryReport()

        # Lock order: _seq_lock, then _checkpoint_lock; _sync_cond is never held
        # while taking either. Re-entrant: without group commit, syncing (and
        # checkpointing) happens inside the append's critical section.
        self._seq_lock = threading.RLock()
        self._sync_cond = threading.Condition(threading.Lock())
        self._checkpoint_lock = threading.Lock()
        self._syncing = False
        self._written = 0  # entries written to the file (size of the tree)
        self._durable = 0  # entries known to be on stable storage
        self._pending: list[_Pending] = []  # written, not yet indexed
        self._failed: BaseException | None = None
        self._closed = False
        self._epochs: list[tuple[int, Signer]] = []  # (first size, signer) while this process runs
        self._last_checkpoint_size = 0
        self._last_checkpoint_time = time.monotonic()

        self._lock_fd = -1
        self._fd = -1
        self._db = None
        try:
            self._open(origin)
        except BaseException:
            self._release()
            raise
        # Time-based checkpoints happen even when no append comes along to trigger them.
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="receipts-checkpoints", daemon=True)
        self._ticker.start()

    # ------------------------------------------------------------ opening
    def _open(self, origin: str | None) -> None:
        ensure_private_dir(self.directory)
        for sub in (CHECKPOINT_DIR, KEYS_DIR):
            ensure_private_dir(self.directory / sub)
        self._lock_fd = os.open(self.directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LogBusy(f"another process is writing the receipt log in {self.directory}") from None
        # Private like the rest of the state (it names tenants and runs); an export is what is handed on.
        self._fd = os.open(self.directory / LOG_FILE, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        self.origin = self._load_origin(origin)
        self._keys = load_public_keys(self.directory / KEYS_DIR)
        try:
            self._db = _open_index(self.directory / INDEX_FILE)
            rows = self._db.execute("SELECT seq, offset, length, leaf_hash, active_key FROM receipt_entries ORDER BY seq").fetchall()
            if any(row[0] != i for i, row in enumerate(rows)):
                raise ValueError("index rows are not contiguous")
        except Exception as exc:  # an unreadable index is rebuilt from the log: it holds nothing else
            self.recovery.notes.append(f"index unusable ({exc})")
            rows = self._rebuild_index()
        self._recover(rows)

    def _load_origin(self, requested: str | None) -> str:
        meta_path = self.directory / META_FILE
        if meta_path.exists():
            stored = json.loads(meta_path.read_text())["origin"]
            if requested is not None and requested != stored:
                raise ReceiptError(f"this log's origin is {stored!r}; it cannot be reopened as {requested!r}")
            return stored
        if os.fstat(self._fd).st_size > 0:
            raise LogCorrupt("meta", f"{META_FILE} is missing but {LOG_FILE} has entries; restore {META_FILE} "
                                     "(its origin appears on every checkpoint)")
        origin = check_origin(requested or default_origin(self._signer))
        atomic_write_text(meta_path, json.dumps({"origin": origin, "format": 1}) + "\n")
        return origin

    def _store_public_key(self, key: PublicKey) -> None:
        path = self.directory / KEYS_DIR / f"{key.key_id}.pem"
        if not path.exists():
            atomic_write_text(path, key.pem())
        self._keys[key.key_id] = key

    def _rebuild_index(self) -> list[tuple]:
        if self._db is not None:
            self._db.close()
            self._db = None
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.directory / (INDEX_FILE + suffix))
        self._db = _open_index(self.directory / INDEX_FILE)
        self.recovery.index_rebuilt = True
        return []

    def _recover(self, rows: list[tuple]) -> None:
        size = os.fstat(self._fd).st_size
        tree = MerkleTree(row[3] for row in rows)
        indexed_end = 0
        active = None
        if rows:
            last = rows[-1]
            indexed_end = last[1] + last[2] + 1
            active = last[4]
            if indexed_end > size:
                raise LogCorrupt("truncation", f"{LOG_FILE} is {size} bytes but the index records entries up to byte "
                                               f"{indexed_end}: the log was truncated", seq=len(rows) - 1)
            on_disk = os.pread(self._fd, last[2] + 1, last[1])
            if not on_disk.endswith(b"\n") or leaf_hash(on_disk[:-1]) != last[3]:
                raise LogCorrupt("index", "the line on disk differs from the one indexed (the log was altered)",
                                 seq=len(rows) - 1)

        tail = os.pread(self._fd, size - indexed_end, indexed_end) if size > indexed_end else b""
        lines, torn = split_lines(tail)
        if torn:
            self._quarantine(size - len(torn), torn)
        if lines:
            trusted = extend_trust(lines, self._keys)
            chain = ChainChecker(tree=tree, active=active)
            offset = indexed_end
            batch = []
            for line in lines:
                facts = inspect_line(line, trusted)
                failures = chain.feed(facts)
                if failures:
                    first = failures[0]
                    raise LogCorrupt(first.check, f"{first.detail} (found while recovering the unindexed tail of {LOG_FILE})",
                                     seq=first.seq)
                batch.append(_Pending(chain.count - 1, offset, line, facts.leaf_hash, facts.summary(), chain.active))
                offset += len(line) + 1
                if facts.rotation is not None:
                    self._store_public_key(facts.rotation[1])
            self._index(batch)
            self.recovery.indexed_from_log = len(batch)
            active = chain.active
        self._tree = tree
        self._written = self._durable = tree.size
        self._offset = os.fstat(self._fd).st_size
        self._check_latest_checkpoint()

        if active is not None and active != self._signer.key_id:
            raise KeyMismatch(
                f"the receipt log expects entries signed by key {active[:16]}…, but the signer is "
                f"{self._signer.key_id[:16]}… (a replaced key file? use `agent-machine key rotate` to change keys)",
                expected=active, given=self._signer.key_id)
        self._store_public_key(self._signer.public)
        self._epochs = [(self._written, self._signer)]

    def _quarantine(self, offset: int, torn: bytes) -> None:
        target = self.directory / QUARANTINE_DIR / f"torn-at-{offset}-{int(time.time())}.bin"
        ensure_private_dir(target.parent)
        atomic_write_bytes(target, torn)
        os.ftruncate(self._fd, offset)
        os.fsync(self._fd)
        self.recovery.torn_bytes = len(torn)
        self.recovery.quarantined = target

    def _check_latest_checkpoint(self) -> None:
        latest = latest_checkpoint_file(self.directory)
        if latest is None:
            return
        text = latest.read_text(encoding="utf-8")
        try:
            signed = open_checkpoint(text, self._keys.values(), self.origin)
        except CheckpointError as exc:
            raise LogCorrupt(exc.check, f"{latest.name}: {exc.detail}") from None
        cp = signed.checkpoint
        if cp.size > self._tree.size:
            raise LogCorrupt("truncation", f"checkpoint {latest.name} signs {cp.size} entries but {LOG_FILE} holds "
                                           f"{self._tree.size}: entries {self._tree.size}..{cp.size - 1} are missing",
                             seq=self._tree.size)
        if self._tree.root(cp.size) != cp.root:
            raise LogCorrupt("merkle-root", f"entries 0..{cp.size - 1} do not hash to the root signed in {latest.name}")
        self._last_checkpoint_size = cp.size

    # ------------------------------------------------------------ state
    @property
    def size(self) -> int:
        """Durable entries."""
        return self._durable

    @property
    def signer(self) -> Signer:
        return self._signer

    @property
    def key_id(self) -> str:
        return self._signer.key_id

    def public_keys(self) -> dict[str, PublicKey]:
        return dict(self._keys)

    # ------------------------------------------------------------ appending
    def append(self, receipt: ReceiptInput) -> AppendedReceipt:
        """Sign ``receipt`` at the next position and return once it is durable."""
        if not isinstance(receipt, ReceiptInput):
            receipt = ReceiptInput.model_validate(receipt)
        summary = {"kind": KIND_EXECUTION, "run_id": receipt.pod.run_id, "pod": receipt.pod.name,
                   "tenant": receipt.pod.tenant, "model": receipt.model.name, "status": receipt.outcome.status,
                   "finished_at": receipt.timing.finished_at}
        return self._append(lambda seq, previous, signer: build_execution_line(
            receipt, seq=seq, previous=previous, signer=signer), summary)

    def append_event(self, event: str, name: str, body: dict[str, Any], *, tenant: str | None = None,
                     at: datetime | None = None) -> AppendedReceipt:
        """Sign a node event (`nodeagent.receipts.events`: activation, storage, wipe…) and return once durable."""
        moment = at or datetime.now(timezone.utc)
        summary = {"kind": KIND_EVENT, "pod": name, "tenant": tenant, "status": event,
                   "finished_at": rfc3339_utc(moment)}
        return self._append(lambda seq, previous, signer: build_event_line(
            event, name, body, seq=seq, previous=previous, signer=signer, recorded_at=moment, tenant=tenant), summary)

    def rotate(self, new_signer: Signer, *, reason: str | None = None) -> AppendedReceipt:
        """Hand signing over to ``new_signer``; durable, and checkpointed under the new key."""
        if new_signer.key_id == self._signer.key_id:
            raise ValueError("the new key is the current key")
        self._store_public_key(new_signer.public)  # before the entry naming it is durable
        now = datetime.now(timezone.utc)
        summary = {"kind": KIND_ROTATION, "status": "rotated", "finished_at": rfc3339_utc(now)}
        appended = self._append(lambda seq, previous, signer: build_rotation_line(
            signer, new_signer, seq=seq, previous=previous, rotated_at=now, reason=reason), summary, rotate_to=new_signer)
        self.checkpoint()
        return appended

    def _append(self, build: Callable[[int, bytes | None, Signer], bytes], summary: dict[str, Any],
                rotate_to: Signer | None = None) -> AppendedReceipt:
        with self._seq_lock:
            self._check_writable()
            seq = self._written
            previous = self._tree.leaf(seq - 1) if seq else None
            line = build(seq, previous, self._signer)
            offset = self._offset
            self._write(line + b"\n", offset, seq)
            leaf = leaf_hash(line)
            self._tree.append(leaf)
            self._written = seq + 1
            self._offset = offset + len(line) + 1
            summary = {**summary, "key_id": self._signer.key_id}
            if rotate_to is not None:
                self._signer = rotate_to
                self._epochs.append((seq + 1, rotate_to))
            self._pending.append(_Pending(seq, offset, line, leaf, summary, self._signer.key_id))
            if not self._group_commit:
                # Under the lock: one fdatasync per receipt, strictly serial.
                if self._sync_and_index():
                    self._checkpoint_quietly()
        if self._group_commit:
            self._wait_durable(seq + 1)
        elif self._failed is not None:
            raise LogClosed(f"receipt log failed: {self._failed}") from self._failed
        return AppendedReceipt(seq, leaf, line)

    def _write(self, data: bytes, offset: int, seq: int) -> None:
        try:
            if self._pause == "mid-write":
                os.write(self._fd, data[: len(data) // 2])
                self._paused("mid-write", seq)
                os.write(self._fd, data[len(data) // 2:])
            else:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
        except BaseException as exc:
            # Cut the partial line off so the file stays a sequence of whole lines.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, offset)
            self._failed = exc
            raise
        if self._pause == "after-write":
            self._paused("after-write", seq)

    def _paused(self, point: str, seq: int) -> None:
        sys.stderr.write(f"paused {point} {seq}\n")
        sys.stderr.flush()
        time.sleep(3600)

    def _check_writable(self) -> None:
        if self._closed:
            raise LogClosed("the receipt log is closed")
        if self._failed is not None:
            raise LogClosed(f"the receipt log stopped accepting entries after an I/O error: {self._failed}")

    def _wait_durable(self, size: int) -> None:
        """Return once entries < ``size`` are durable; the first waiter syncs for everyone (group commit)."""
        checkpoint_due = False
        with self._sync_cond:
            while self._durable < size:
                if self._failed is not None:
                    raise LogClosed(f"receipt log failed before the entry was durable: {self._failed}") from self._failed
                if self._syncing:
                    self._sync_cond.wait()
                    continue
                self._syncing = True
                self._sync_cond.release()
                try:
                    checkpoint_due = self._sync_and_index()
                finally:
                    self._sync_cond.acquire()
                    self._syncing = False
                    self._sync_cond.notify_all()
        if checkpoint_due:  # after handing leadership back, so waiters are not held up by it
            self._checkpoint_quietly()

    def _sync_and_index(self) -> bool:
        """fdatasync everything written so far, then index it. True when a checkpoint is due."""
        if self._group_commit:
            with self._seq_lock:
                batch, self._pending = self._pending, []
        else:
            batch, self._pending = self._pending, []
        if not batch:
            return False
        try:
            os.fdatasync(self._fd)
        except BaseException as exc:
            self._failed = exc
            raise
        if self._pause == "after-fsync":
            self._paused("after-fsync", batch[-1].seq)
        self._durable = batch[-1].seq + 1
        # The entries are durable: what follows must not make their append fail.
        try:
            self._index(batch)
        except Exception as exc:
            self.recovery.notes.append(f"index update failed ({exc}); it is repaired from {LOG_FILE} on the next open")
        return (self._durable - self._last_checkpoint_size >= self._checkpoint_every
                or time.monotonic() - self._last_checkpoint_time >= self._checkpoint_seconds)

    def _checkpoint_quietly(self) -> None:
        """A periodic checkpoint: its failure must not fail the appends that triggered it."""
        try:
            self._write_checkpoint(self._durable)
        except Exception as exc:
            self.recovery.notes.append(f"writing a checkpoint failed ({exc}); retried after the next append")

    def _index(self, batch: list[_Pending]) -> None:
        assert self._db is not None
        self._db.execute("BEGIN")
        try:
            self._db.executemany(_INSERT, [_row(p) for p in batch])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    # ------------------------------------------------------------ checkpoints
    def _signer_for_size(self, size: int) -> Signer:
        chosen = self._epochs[0][1]
        for start, signer in self._epochs:
            if start <= size:
                chosen = signer
        return chosen

    def _write_checkpoint(self, size: int) -> str | None:
        if size <= self._last_checkpoint_size:
            return None
        with self._seq_lock:
            root = self._tree.root(size)
            signer = self._signer_for_size(size)
        text = sign_checkpoint(Checkpoint(self.origin, size, root), signer)
        with self._checkpoint_lock:
            if size <= self._last_checkpoint_size:  # a concurrent call got there first
                return None
            atomic_write_text(self.directory / CHECKPOINT_DIR / checkpoint_file_name(size), text)
            self._last_checkpoint_size = size
            self._last_checkpoint_time = time.monotonic()
            return text

    def checkpoint(self) -> tuple[int, str]:
        """On demand: make everything written durable, sign a checkpoint of it, return (size, note)."""
        self.sync()
        self._write_checkpoint(self._durable)
        latest = latest_checkpoint_file(self.directory)
        if latest is None:
            raise ReceiptError("the log is empty: there is nothing to checkpoint")
        return int(latest.stem), latest.read_text(encoding="utf-8")

    def maybe_checkpoint(self) -> bool:
        """Sign a checkpoint if entries arrived and the interval has passed (the writer's ticker calls it)."""
        if self._durable > self._last_checkpoint_size and \
                time.monotonic() - self._last_checkpoint_time >= self._checkpoint_seconds:
            return self._write_checkpoint(self._durable) is not None
        return False

    def _tick(self) -> None:
        while not self._stop.wait(max(0.05, self._checkpoint_seconds / 4)):
            if self._failed is not None:
                return
            try:
                self.maybe_checkpoint()
            except Exception as exc:
                self.recovery.notes.append(f"a timed checkpoint failed ({exc}); retried at the next tick")

    def sync(self) -> None:
        with self._seq_lock:
            written = self._written
        if self._group_commit:
            self._wait_durable(written)

    # ------------------------------------------------------------ reading and proofs
    def read_line(self, seq: int) -> bytes:
        if not 0 <= seq < self._durable:
            raise ReceiptError(f"no entry {seq}: the log has {self._durable}")
        assert self._db is not None
        row = self._db.execute("SELECT offset, length FROM receipt_entries WHERE seq = ?", (seq,)).fetchone()
        if row is None:  # written by this process but its index update failed
            with open(self.directory / LOG_FILE, "rb") as handle:
                return split_lines(handle.read())[0][seq]
        return os.pread(self._fd, row[1], row[0])

    def inclusion_proof(self, seq: int, tree_size: int) -> list[bytes]:
        with self._seq_lock:
            return self._tree.inclusion_proof(seq, tree_size)

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        with self._seq_lock:
            return self._tree.consistency_proof(old_size, new_size)

    def proof(self, seq: int) -> ReceiptProof:
        """A self-contained `ReceiptProof` for entry ``seq`` (checkpointing on demand if needed)."""
        size, note = self.checkpoint()
        if not 0 <= seq < size:
            raise ReceiptError(f"no entry {seq}: the log has {size}")
        assert self._db is not None
        rotations = [row[0] for row in self._db.execute(
            "SELECT seq FROM receipt_entries WHERE kind = ? AND seq < ? ORDER BY seq", (KIND_ROTATION, size))]
        return assemble_proof(self.origin, size, note, seq, rotations, self.read_line,
                              lambda i: self.inclusion_proof(i, size), self._keys.values())

    # ------------------------------------------------------------ closing
    def close(self) -> None:
        """Make everything durable, checkpoint new entries, release the lock. Idempotent."""
        if self._closed:
            return
        self._stop.set()
        if self._ticker is not threading.current_thread():
            self._ticker.join()
        try:
            if self._failed is None and self._fd >= 0:
                self.sync()
                if self._durable > self._last_checkpoint_size:
                    self._write_checkpoint(self._durable)
        finally:
            self._closed = True
            self._release()

    def _release(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        for attr in ("_fd", "_lock_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def __enter__(self) -> "ReceiptLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def assemble_proof(origin: str, size: int, note: str, seq: int, rotations: list[int],
                   read_line: Callable[[int], bytes], inclusion: Callable[[int], list[bytes]],
                   keys: Iterable[PublicKey]) -> ReceiptProof:
    """A `ReceiptProof` of entry ``seq`` in the tree of ``size`` signed by ``note``, with every
    key-rotation entry below ``size`` (so the key chain from the receipt's key to the checkpoint's is complete)."""

    def entry(position: int) -> ProofEntry:
        return ProofEntry(seq=position, line=read_line(position).decode(),
                          inclusion_proof=[p.hex() for p in inclusion(position)])

    return ReceiptProof(origin=origin, tree_size=size, entry=entry(seq), checkpoint=note,
                        key_chain=[entry(r) for r in rotations],
                        public_keys=[PublicKeyRef(key_id=k.key_id, public_key=k.b64_der) for k in keys])


def checkpoint_file_name(size: int) -> str:
    return f"{size:016d}{CHECKPOINT_SUFFIX}"


def latest_checkpoint_file(directory: Path) -> Path | None:
    files = sorted((directory / CHECKPOINT_DIR).glob(f"*{CHECKPOINT_SUFFIX}"))
    return files[-1] if files else None


# ------------------------------------------------------------------ reading without the lock
@dataclass(frozen=True)
class LogRow:
    seq: int
    receipt_id: str
    kind: str
    signer: str
    run_id: str | None
    pod: str | None
    tenant: str | None
    model: str | None
    status: str | None
    finished_at: str | None
    offset: int
    length: int


class LogReader:
    """Read-only view for `receipts ls/show/export`; takes no lock, writes nothing.

    Lists what the index holds. ``unindexed_bytes`` > 0 means a writer crashed
    (or is mid-append): those entries appear once the log is next opened for
    writing, which verifies and indexes them.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        if not (self.directory / LOG_FILE).exists():
            raise ReceiptError(f"no receipt log in {self.directory} yet (it is created by the first receipt)")
        meta = self.directory / META_FILE
        self.origin = json.loads(meta.read_text())["origin"] if meta.exists() else None
        self._conn = connect(self.directory / INDEX_FILE, readonly=True) if (self.directory / INDEX_FILE).exists() else None

    def rows(self, *, tenant: str | None = None, status: str | None = None, limit: int | None = None,
             newest_first: bool = True) -> list[LogRow]:
        if self._conn is None:
            return []
        where, params = [], []
        if tenant:
            where.append("tenant = ?")
            params.append(tenant)
        if status:
            where.append("status = ?")
            params.append(status)
        sql = ("SELECT seq, leaf_hash, kind, signer, run_id, pod, tenant, model, status, finished_at, offset, length "
               "FROM receipt_entries")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq " + ("DESC" if newest_first else "ASC")
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [LogRow(r[0], r[1].hex(), *r[2:]) for r in self._conn.execute(sql, params)]

    def count(self) -> int:
        if self._conn is None:
            return 0
        return self._conn.execute("SELECT COUNT(*) FROM receipt_entries").fetchone()[0]

    @property
    def unindexed_bytes(self) -> int:
        size = (self.directory / LOG_FILE).stat().st_size
        rows = self.rows(limit=1)
        end = rows[0].offset + rows[0].length + 1 if rows else 0
        return max(0, size - end)

    def find(self, selector: str | int) -> LogRow:
        """The entry ``selector`` names: a seq, a receipt id (prefix) or a run id (its latest receipt)."""
        if self._conn is None:
            raise ReceiptError("the log has no index yet")
        sql = ("SELECT seq, leaf_hash, kind, signer, run_id, pod, tenant, model, status, finished_at, offset, length "
               "FROM receipt_entries WHERE ")
        for kind, value in selector_candidates(selector):
            if kind == "seq":
                rows = self._conn.execute(sql + "seq = ?", (value,)).fetchall()
            elif kind == "id":
                rows = self._conn.execute(sql + "hex(leaf_hash) LIKE ? LIMIT 2", (value.upper() + "%",)).fetchall()
                if len(rows) > 1:
                    raise ReceiptError(f"receipt id prefix {value!r} is ambiguous")
            else:
                rows = self._conn.execute(sql + "run_id = ? ORDER BY seq DESC LIMIT 1", (value,)).fetchall()
            if rows:
                r = rows[0]
                return LogRow(r[0], r[1].hex(), *r[2:])
        raise ReceiptError(f"no entry matches {str(selector)!r} ({SELECTOR_HELP})")

    def line(self, row: LogRow) -> bytes:
        with open(self.directory / LOG_FILE, "rb") as handle:
            handle.seek(row.offset)
            data = handle.read(row.length)
        if leaf_hash(data) != bytes.fromhex(row.receipt_id):
            raise LogCorrupt("index", "the line on disk differs from the one indexed", seq=row.seq)
        return data

    def view(self, row: LogRow) -> tuple[Any, dict[str, Any]]:
        """The entry at ``row`` as ``(entry, statement)``: an `ExecutionReceipt` for an
        execution entry, else a `LogEntry` of the same parts; and the decoded statement."""
        from nodeagent.contracts.receipt import DsseEnvelope, ExecutionReceipt, LogEntry
        from nodeagent.receipts.dsse import parse_envelope

        line = self.line(row)
        envelope = DsseEnvelope.model_validate_json(line)
        statement = json.loads(parse_envelope(line).payload)
        if row.kind == "execution":
            return ExecutionReceipt(seq=row.seq, receipt_id=row.receipt_id, envelope=envelope,
                                    statement=statement), statement
        return LogEntry(seq=row.seq, receipt_id=row.receipt_id, entry=row.kind, envelope=envelope,
                        statement=statement), statement

    def latest_checkpoint(self) -> tuple[int, str] | None:
        latest = latest_checkpoint_file(self.directory)
        return (int(latest.stem), latest.read_text(encoding="utf-8")) if latest else None

    def proof(self, selector: str | int) -> ReceiptProof:
        """A `ReceiptProof` against the latest checkpoint; `ReceiptError` if none covers the entry yet."""
        row = self.find(selector)
        latest = self.latest_checkpoint()
        if latest is None or latest[0] <= row.seq:
            raise ReceiptError(f"entry {row.seq} is not covered by a checkpoint yet "
                               "(run `agent-machine receipts checkpoint`)")
        size, note = latest
        assert self._conn is not None
        leaves = [r[0] for r in self._conn.execute("SELECT leaf_hash FROM receipt_entries WHERE seq < ? ORDER BY seq", (size,))]
        if len(leaves) < size:
            raise ReceiptError(f"the index holds {len(leaves)} entries, fewer than the checkpoint's {size}; "
                               "open the log for writing to repair it")
        tree = MerkleTree(leaves)
        rotations = [r[0] for r in self._conn.execute(
            "SELECT seq FROM receipt_entries WHERE kind = ? AND seq < ? ORDER BY seq", (KIND_ROTATION, size))]
        return assemble_proof(self.origin or "", size, note, row.seq, rotations, lambda i: self.line(self.find(i)),
                              lambda i: tree.inclusion_proof(i, size),
                              load_public_keys(self.directory / KEYS_DIR).values())

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def __enter__(self) -> "LogReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


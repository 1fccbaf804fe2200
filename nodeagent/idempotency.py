"""Idempotency keys: a client that lost the answer to a submit and retries gets the pod it already made.

A client sends ``Idempotency-Key: <1-255 printable ASCII>`` with ``POST /v1/pods``
or an OpenAI chat request. The node remembers, per key scope (the credential's
tenant; one shared scope for admin credentials), the sha256 of the canonical
request and the pod it made:

* the same key with the same request -> that pod again, nothing new is stored;
* the same key with another request -> `IdempotencyConflict` (the API answers 409);
* a key older than `KEY_TTL_S` is forgotten: it may be used afresh.

Invariant: the key row is inserted in the SAME SQLite transaction as the pod row
(`PodStore.create(..., idempotency=key)` calls `record`), so a crash can never
leave a pod without its key (a retry would then make a duplicate) nor a key
without its pod. Two concurrent requests with one key cannot both insert: the
(scope, key) primary key refuses the second, whose transaction (pod row
included) rolls back.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nodeagent.store import migrate, transaction

if TYPE_CHECKING:
    from nodeagent.contracts.pod import AgentPod

HEADER = "Idempotency-Key"
# Printable ASCII; no space at either end, which HTTP would strip on the way.
KEY_PATTERN = r"^[\x21-\x7e]([\x20-\x7e]{0,253}[\x21-\x7e])?$"
KEY_TTL_S = 24 * 3600.0
ADMIN_SCOPE = "*"  # tenant names never contain '*'
_KEY_RE = re.compile(KEY_PATTERN)

_SCHEMA = [
    """
    CREATE TABLE idempotency_keys (
        scope TEXT NOT NULL,
        key TEXT NOT NULL,
        request_sha256 TEXT NOT NULL,
        pod_id TEXT NOT NULL REFERENCES pods (id) ON DELETE CASCADE,
        created_at REAL NOT NULL,
        PRIMARY KEY (scope, key)
    );
    CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at)
    """,
]


class IdempotencyConflict(RuntimeError):
    """The key was already used with a different request."""

    def __init__(self, key: str, pod_id: str) -> None:
        super().__init__(f"{HEADER} {key!r} was already used with a different request (it made pod {pod_id}); "
                         "send a new key for a new request")
        self.key = key
        self.pod_id = pod_id


class IdempotentReplay(Exception):
    """Raised by `Node.submit_pod` instead of making a second pod: ``pod`` is the one this key made."""

    def __init__(self, pod: "AgentPod") -> None:
        super().__init__(f"replayed: pod {pod.id}")
        self.pod = pod


def check_key(value: str) -> str:
    """``value`` if it is a valid key, else ValueError naming the header."""
    if not _KEY_RE.match(value):
        raise ValueError(f"{HEADER}: must be 1 to 255 printable ASCII characters, not starting or ending "
                         "with a space")
    return value


def request_sha256(kind: str, request: Any) -> str:
    """sha256 of the canonical JSON of ``request`` (sorted keys, no spaces), tagged with ``kind``.

    Callers pass the *validated* request, so the same request spelled with other
    whitespace, key order or explicit defaults hashes the same.
    """
    canonical = json.dumps({"kind": kind, "request": request}, sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """One request's key, in its scope, with the digest of the request it came with."""

    scope: str
    key: str
    request_sha256: str

    @classmethod
    def for_pod(cls, scope: str, key: str, pod: "AgentPod") -> "IdempotencyKey":
        return cls(scope, check_key(key), request_sha256("pod", pod.to_wire()))

    @classmethod
    def for_chat(cls, scope: str, key: str, body: dict[str, Any]) -> "IdempotencyKey":
        return cls(scope, check_key(key), request_sha256("chat", body))


class IdempotencyStore:
    """Reads of the key table; the write is `record`, inside the pod's own transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        migrate(conn, "idempotency", _SCHEMA)

    def find(self, key: IdempotencyKey, now: float | None = None) -> str | None:
        """The pod ``key`` made, if it is live; `IdempotencyConflict` if it came with another request."""
        cutoff = (time.time() if now is None else now) - KEY_TTL_S
        row = self._conn.execute(
            "SELECT request_sha256, pod_id FROM idempotency_keys WHERE scope = ? AND key = ? AND created_at >= ?",
            (key.scope, key.key, cutoff)).fetchone()
        if row is None:
            return None
        if row[0] != key.request_sha256:
            raise IdempotencyConflict(key.key, row[1])
        return str(row[1])

    def release(self, pod_id: str) -> None:
        """Forget the key that made ``pod_id``: its client went away and cancelled it, so
        the retry the key exists for must run the request again, not replay a cancellation."""
        with transaction(self._conn):
            self._conn.execute("DELETE FROM idempotency_keys WHERE pod_id = ?", (pod_id,))


def record(conn: sqlite3.Connection, key: IdempotencyKey, pod_id: str, at: float) -> None:
    """Store ``key`` -> ``pod_id``; call inside the transaction that inserts the pod.

    Expired keys are dropped first (all of them: the table stays a day's worth).
    A live row for the same key raises sqlite3.IntegrityError, rolling the pod back.
    """
    conn.execute("DELETE FROM idempotency_keys WHERE created_at < ?", (at - KEY_TTL_S,))
    conn.execute("INSERT INTO idempotency_keys (scope, key, request_sha256, pod_id, created_at) "
                 "VALUES (?, ?, ?, ?, ?)", (key.scope, key.key, key.request_sha256, pod_id, at))


__all__ = ["ADMIN_SCOPE", "HEADER", "IdempotencyConflict", "IdempotencyKey", "IdempotencyStore", "IdempotentReplay",
           "KEY_TTL_S", "check_key", "record", "request_sha256"]

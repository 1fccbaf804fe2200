"""Context segments this node has seen, by digest, so planners may send a digest alone.

A segment's text can be private (a tenant's system prompt, its memory), so a
digest resolves only for a tenant that sent that text itself, or for anyone
when it was sent as a ``public`` segment. Otherwise tenant B could confirm a
guessed private prompt of tenant A's by its digest, then run with it.
The text is stored once per digest; who may name it is kept beside it.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime, timezone
from typing import Iterable, Sequence

from nodeagent.contracts.pod import CacheScope, ContextSegment, text_digest
from nodeagent.pods import PodReferenceUnknown
from nodeagent.store import migrate, transaction

PUBLIC = "*"  # the owner row of a segment sent with scope public: any tenant may name it

_SCHEMA = [
    "CREATE TABLE segments (digest TEXT PRIMARY KEY, text TEXT NOT NULL, first_seen TEXT NOT NULL)",
    # Who may refer to a segment by digest alone (a tenant, or PUBLIC).
    "CREATE TABLE segment_owners (digest TEXT NOT NULL, tenant TEXT NOT NULL, PRIMARY KEY (digest, tenant))",
]


class SegmentStore:
    def __init__(self, conn: sqlite3.Connection, lock: threading.RLock) -> None:
        self._conn, self._lock = conn, lock
        with lock:
            migrate(conn, "segments", _SCHEMA)

    def remember(self, segments: Iterable[ContextSegment], tenant: str) -> None:
        now = datetime.now(timezone.utc).isoformat()
        texts, owners = [], []
        for segment in segments:
            if segment.text is None:
                continue
            digest = text_digest(segment.text)
            texts.append((digest, segment.text, now))
            owners.append((digest, PUBLIC if segment.scope is CacheScope.public else tenant))
        if texts:
            with self._lock, transaction(self._conn):
                self._conn.executemany("INSERT OR IGNORE INTO segments (digest, text, first_seen) VALUES (?, ?, ?)",
                                       texts)
                self._conn.executemany("INSERT OR IGNORE INTO segment_owners (digest, tenant) VALUES (?, ?)", owners)

    def texts(self, segments: Sequence[ContextSegment], tenant: str) -> list[str]:
        """Each segment's text; a digest-only one must be one ``tenant`` may name (else
        `PodReferenceUnknown`, the same answer as for a digest nobody sent)."""
        out = []
        for index, segment in enumerate(segments):
            if segment.text is not None:
                out.append(segment.text)
                continue
            with self._lock:
                row = self._conn.execute(
                    "SELECT s.text FROM segments s JOIN segment_owners o ON o.digest = s.digest"
                    " WHERE s.digest = ? AND o.tenant IN (?, ?) LIMIT 1", (segment.digest, tenant, PUBLIC)).fetchone()
            if row is None:
                raise PodReferenceUnknown(f"spec.context[{index}].digest: {segment.digest} is unknown to this "
                                          f"node; send the segment's text once")
            out.append(row[0])
        return out

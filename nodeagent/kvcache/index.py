"""The SQLite index of saved KV states (tables ``kv_*`` in the node's state.db).

Tables:
* ``kv_entries``: one row per saved state (`CacheEntry` metadata): tier, file,
  bytes, content digest, hits, last use, pin, GDSF priority.
* ``kv_blocks``: ``(block_key, depth, entry_id)`` for *every* full block an
  entry covers, not only its deepest one.
* ``kv_counters``: hit/miss/eviction counters; ``kv_clock``: the GDSF
  inflation value L of each tier.

Invariant (the one the lookup relies on): an entry with ``n`` full blocks has
exactly the rows ``depth = 0..n-1`` in ``kv_blocks``, inserted in the same
transaction as the entry and deleted with it (ON DELETE CASCADE). Because
block keys are chained, "some visible entry covers key(d)" is then monotone in
``d``: if it holds at depth d it holds at every shallower depth. So the deepest
cached prefix of a sequence is found by binary search over the sequence's
block keys: O(log n) indexed point queries for n blocks (within the
O(n) bound), whatever the number of entries.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from nodeagent.store import migrate

COMPONENT = "kvcache"

MIGRATIONS = [
    """
    CREATE TABLE kv_entries (
        id TEXT PRIMARY KEY,
        deepest_key BLOB NOT NULL,
        model_digest TEXT NOT NULL,
        scope TEXT NOT NULL CHECK (scope IN ('private', 'tenant', 'public')),
        owner TEXT NOT NULL,
        tenant TEXT,
        state_format TEXT NOT NULL,
        n_tokens INTEGER NOT NULL CHECK (n_tokens >= 0),
        n_blocks INTEGER NOT NULL CHECK (n_blocks >= 0),
        block_tokens INTEGER NOT NULL,
        tier TEXT NOT NULL CHECK (tier IN ('T1', 'T2')),
        file TEXT NOT NULL,
        bytes INTEGER NOT NULL CHECK (bytes >= 0),
        content_digest TEXT NOT NULL,
        hits INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        last_used_at REAL NOT NULL,
        pinned INTEGER NOT NULL DEFAULT 0,
        priority REAL NOT NULL DEFAULT 0
    );
    CREATE INDEX kv_entries_eviction ON kv_entries (tier, pinned, priority);
    CREATE INDEX kv_entries_deepest ON kv_entries (deepest_key);
    CREATE TABLE kv_blocks (
        block_key BLOB NOT NULL,
        depth INTEGER NOT NULL,
        entry_id TEXT NOT NULL REFERENCES kv_entries (id) ON DELETE CASCADE,
        PRIMARY KEY (block_key, entry_id)
    ) WITHOUT ROWID;
    CREATE INDEX kv_blocks_entry ON kv_blocks (entry_id);
    CREATE TABLE kv_counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    CREATE TABLE kv_clock (tier TEXT PRIMARY KEY, value REAL NOT NULL)
    """,
]

ENTRY_COLUMNS = (
    "id, deepest_key, model_digest, scope, owner, tenant, state_format, n_tokens, n_blocks, block_tokens,"
    " tier, file, bytes, content_digest, hits, created_at, last_used_at, pinned, priority"
)


@dataclass
class EntryRow:
    id: str
    deepest_key: bytes
    model_digest: str
    scope: str
    owner: str
    tenant: str | None
    state_format: str
    n_tokens: int
    n_blocks: int
    block_tokens: int
    tier: str
    file: str
    bytes: int
    content_digest: str
    hits: int
    created_at: float
    last_used_at: float
    pinned: bool
    priority: float

    @classmethod
    def from_row(cls, row: sqlite3.Row | Sequence) -> "EntryRow":
        values = list(row)
        values[17] = bool(values[17])
        return cls(*values)


class CacheIndex:
    """Queries and updates over the ``kv_*`` tables. Not thread-safe by itself:
    the CacheManager serialises access."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        migrate(conn, COMPONENT, MIGRATIONS)

    # ------------------------------------------------------------ writes
    def insert(self, entry: EntryRow, keys: Sequence[bytes]) -> None:
        """Caller holds a transaction. ``keys`` are the entry's block keys, shallowest first."""
        if len(keys) != entry.n_blocks or (keys and keys[-1] != entry.deepest_key):
            raise ValueError("an entry must be indexed under every one of its block keys")
        self.conn.execute(
            f"INSERT INTO kv_entries ({ENTRY_COLUMNS}) VALUES ({', '.join('?' * 19)})",
            (entry.id, entry.deepest_key, entry.model_digest, entry.scope, entry.owner, entry.tenant,
             entry.state_format, entry.n_tokens, entry.n_blocks, entry.block_tokens, entry.tier, entry.file,
             entry.bytes, entry.content_digest, entry.hits, entry.created_at, entry.last_used_at,
             int(entry.pinned), entry.priority),
        )
        self.conn.executemany(
            "INSERT OR IGNORE INTO kv_blocks (block_key, depth, entry_id) VALUES (?, ?, ?)",
            ((key, depth, entry.id) for depth, key in enumerate(keys)),
        )

    def delete(self, entry_id: str) -> None:
        self.conn.execute("DELETE FROM kv_entries WHERE id = ?", (entry_id,))

    def move(self, entry_id: str, tier: str, file: str, priority: float) -> None:
        self.conn.execute("UPDATE kv_entries SET tier = ?, file = ?, priority = ? WHERE id = ?",
                          (tier, file, priority, entry_id))

    def touch(self, entry_id: str, now: float, priority: float) -> None:
        self.conn.execute("UPDATE kv_entries SET hits = hits + 1, last_used_at = ?, priority = ? WHERE id = ?",
                          (now, priority, entry_id))

    def set_pinned(self, entry_id: str, pinned: bool) -> bool:
        return self.conn.execute("UPDATE kv_entries SET pinned = ? WHERE id = ?",
                                 (int(pinned), entry_id)).rowcount > 0

    def add_counters(self, deltas: dict[str, int]) -> None:
        self.conn.executemany(
            "INSERT INTO kv_counters (name, value) VALUES (?, ?)"
            " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            [(name, value) for name, value in deltas.items() if value],
        )

    def set_clock(self, tier: str, value: float) -> None:
        self.conn.execute("INSERT INTO kv_clock (tier, value) VALUES (?, ?)"
                          " ON CONFLICT (tier) DO UPDATE SET value = excluded.value", (tier, value))

    # ------------------------------------------------------------ reads
    def get(self, entry_id: str) -> EntryRow | None:
        row = self.conn.execute(f"SELECT {ENTRY_COLUMNS} FROM kv_entries WHERE id = ?", (entry_id,)).fetchone()
        return EntryRow.from_row(row) if row else None

    def find_same(self, deepest_key: bytes, state_format: str, owner: str) -> list[EntryRow]:
        rows = self.conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM kv_entries WHERE deepest_key = ? AND state_format = ? AND owner = ?",
            (deepest_key, state_format, owner),
        ).fetchall()
        return [EntryRow.from_row(r) for r in rows]

    def entries(self, *, tier: str | None = None, tenant: str | None = None,
                model_digest: str | None = None) -> list[EntryRow]:
        clauses, params = [], []
        for column, value in (("tier", tier), ("tenant", tenant), ("model_digest", model_digest)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self.conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM kv_entries{where} ORDER BY tier, priority DESC, id", params
        ).fetchall()
        return [EntryRow.from_row(r) for r in rows]

    def eviction_candidates(self, tier: str) -> Iterator[EntryRow]:
        """Unpinned entries of ``tier``, lowest GDSF priority first."""
        cursor = self.conn.execute(
            f"SELECT {ENTRY_COLUMNS} FROM kv_entries WHERE tier = ? AND pinned = 0 ORDER BY priority, last_used_at",
            (tier,),
        )
        for row in cursor:
            yield EntryRow.from_row(row)

    def used_bytes(self, tier: str) -> int:
        return int(self.conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM kv_entries WHERE tier = ?",
                                     (tier,)).fetchone()[0])

    def count(self, tier: str) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM kv_entries WHERE tier = ?", (tier,)).fetchone()[0])

    def counters(self) -> dict[str, int]:
        return {row[0]: int(row[1]) for row in self.conn.execute("SELECT name, value FROM kv_counters")}

    def clock(self, tier: str) -> float:
        row = self.conn.execute("SELECT value FROM kv_clock WHERE tier = ?", (tier,)).fetchone()
        return float(row[0]) if row else 0.0

    def block_rows(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM kv_blocks").fetchone()[0])

    def _visible_at(self, key: bytes, owners: Sequence[str], state_format: str, tier: str | None) -> str | None:
        """The id of some visible entry covering ``key``, or None."""
        where, params = self._visible_clause(key, owners, state_format, tier)
        row = self.conn.execute(
            # CROSS JOIN pins the join order (SQLite's rule): walk the few rows of
            # this block key first, never the entries of a whole tier.
            f"SELECT e.id FROM kv_blocks b CROSS JOIN kv_entries e ON e.id = b.entry_id WHERE {where} LIMIT 1",
            params,
        ).fetchone()
        return row[0] if row else None

    @staticmethod
    def _visible_clause(key: bytes, owners: Sequence[str], state_format: str,
                        tier: str | None) -> tuple[str, list]:
        where = f"b.block_key = ? AND e.owner IN ({', '.join('?' * len(owners))}) AND e.state_format = ?"
        params: list = [key, *owners, state_format]
        if tier:
            where += " AND e.tier = ?"
            params.append(tier)
        return where, params

    def deepest(self, keys: Sequence[bytes], owners: Iterable[str], state_format: str,
                tier: str | None = None) -> tuple[int, EntryRow] | None:
        """(blocks matched, an entry covering them) for the deepest visible cached prefix.

        Binary search relying on the module invariant: O(log n) point queries,
        each answered from the block-key index.
        """
        owners = sorted(set(owners))
        lo, hi = 0, len(keys)  # answer (blocks matched) lies in [lo, hi]
        found: str | None = None
        while lo < hi:
            mid = (lo + hi + 1) // 2  # test "matched >= mid" via key index mid-1
            entry_id = self._visible_at(keys[mid - 1], owners, state_format, tier)
            if entry_id is not None:
                lo, found = mid, entry_id
            else:
                hi = mid - 1
        # `found` came from the probe that raised `lo` last, i.e. covers depth lo.
        row = self.get(found) if found is not None else None
        return (lo, row) if row is not None else None

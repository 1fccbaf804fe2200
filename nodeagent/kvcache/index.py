"""The SQLite index of saved KV states (tables ``kv_*`` in the node's state.db).

Tables:
* ``kv_entries``: one row per saved state (`CacheEntry` metadata): tier, file,
  bytes, content digest, hits, last use, pin, GDSF priority.
* ``kv_blocks``: ``(block_key, state_format, tier, owner, entry_id, depth)``
  for *every* full block an entry covers, not only its deepest one. The
  entry's state format, tier and owner are copied into each of its block rows
  (denormalised, migration step 1) so that "is key k covered by an entry of
  this format, in this tier, that these owners may see?" is one seek in the
  primary key, with no join and no row of another format, tier or owner read.
* ``kv_counters``: hit/miss/eviction counters; ``kv_clock``: the GDSF
  inflation value L of each tier.

Invariants (the lookup relies on both):
1. An entry with ``n`` full blocks has exactly the rows ``depth = 0..n-1`` in
   ``kv_blocks``, inserted in the same transaction as the entry and deleted
   with it (ON DELETE CASCADE). Because block keys are chained, "some visible
   entry covers key(d)" is then monotone in ``d``: if it holds at depth d it
   holds at every shallower depth. So the deepest cached prefix of a sequence
   is found by binary search over the sequence's block keys: O(log n) indexed
   point queries for n blocks (within the O(n) bound), whatever the number of
   entries.
2. A block row's ``state_format``, ``tier`` and ``owner`` equal its entry's.
   Format and owner never change; a tier move updates the entry and its block
   rows in one transaction (`move`). `check_consistency` verifies it.

Probes in memory. A placement decision probes ~2 log2(n) block keys; through
SQLite each probe costs 5-10 us (statement, locks, b-tree), in a dict well
under one. So lookups read `ProbeMap`, an in-memory copy of ``kv_blocks``
(block key -> the entries covering it, with their format, tier and owner),
while SQLite stays the durable truth:

* it is built from ``kv_blocks`` on the first lookup (not on open: CLI
  commands that never look up never pay for it), ~1-2 s per million rows;
* every write goes through `CacheIndex.transaction`, which applies the same
  change to the map; a rollback discards the map (rebuilt on next use), so
  the map never holds an uncommitted change after the transaction ends;
* ``kv_meta.generation`` is bumped by every transaction that changes block
  rows. Before a lookup, ``PRAGMA data_version`` (a counter of commits by
  *other* connections, e.g. ``agent-machine cache evict`` while the daemon
  runs) is compared with the last one seen; if it moved and the generation is
  not the map's, the map is rebuilt. A crash loses only the map.

``deepest(..., source="sqlite")`` answers the same question from the tables
(one primary-key seek per probe); the property tests check both agree.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, NamedTuple, Sequence

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
    # Step 1: denormalise format, tier and owner into the block rows (invariant 2):
    # a probe was a join that read every entry row sharing the block key (all pods
    # of one agent share its context blocks); now it is one primary-key seek.
    """
    CREATE TABLE kv_blocks_v2 (
        block_key BLOB NOT NULL,
        state_format TEXT NOT NULL,
        tier TEXT NOT NULL CHECK (tier IN ('T1', 'T2')),
        owner TEXT NOT NULL,
        entry_id TEXT NOT NULL REFERENCES kv_entries (id) ON DELETE CASCADE,
        depth INTEGER NOT NULL,
        PRIMARY KEY (block_key, state_format, tier, owner, entry_id)
    ) WITHOUT ROWID;
    INSERT INTO kv_blocks_v2 (block_key, state_format, tier, owner, entry_id, depth)
        SELECT b.block_key, e.state_format, e.tier, e.owner, b.entry_id, b.depth
        FROM kv_blocks b JOIN kv_entries e ON e.id = b.entry_id;
    DROP TABLE kv_blocks;
    ALTER TABLE kv_blocks_v2 RENAME TO kv_blocks;
    CREATE INDEX kv_blocks_entry ON kv_blocks (entry_id);
    CREATE TABLE kv_meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO kv_meta (name, value) VALUES ('generation', 0)
    """,
]

# Page cache for the index (KiB when negative): a probe touches a few pages of
# the block b-tree's upper levels, which must stay in memory.
CACHE_KIB = 64 << 10

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


Group = tuple[str, str, str]  # (state_format, tier, owner)


class MapEntry(NamedTuple):
    """What a lookup needs of an entry, held in memory (none of it changes but the tier).
    The map stores these fields as plain tuples (which the garbage collector can
    untrack, unlike tuple subclasses) and hands out MapEntry views."""

    id: str
    state_format: str
    tier: str
    owner: str
    n_tokens: int
    bytes: int
    block_tokens: int


class ProbeMap:
    """block key -> the entries covering it: the in-memory probe side of the index.

    A key covered by one entry (most keys) maps to that entry's integer handle;
    a key several entries share (an agent's context under all its pods' states)
    maps to a tuple of ``((format, tier, owner), (handles, ...))`` pairs, one
    per group, so a probe scans the few groups, not the sharers. ``meta[handle]``
    holds the entry's `MapEntry` fields as a plain tuple. All handles of one
    entry are one int object, so a single-entry key costs its bytes key and a
    dict slot (~65 MiB per million rows, measured by
    bench/placement_latency.py). Only ints, strings, bytes and exact tuples are
    stored, so the garbage collector untracks every container of the map and a
    full collection does not walk a million entries.
    """

    __slots__ = ("blocks", "meta", "handles", "_groups", "_next")

    def __init__(self) -> None:
        self.blocks: dict[bytes, int | tuple[tuple[Group, tuple[int, ...]], ...]] = {}
        self.meta: dict[int, tuple] = {}  # MapEntry fields
        self.handles: dict[str, int] = {}
        self._groups: dict[Group, Group] = {}  # interned: one tuple per group, shared by every key
        self._next = 0

    def _group(self, state_format: str, tier: str, owner: str) -> Group:
        key = (state_format, tier, owner)
        return self._groups.setdefault(key, key)

    def add(self, entry: MapEntry, keys: Iterable[bytes]) -> None:
        handle = self.handles.get(entry.id)
        if handle is None:
            handle = self.handles[entry.id] = self._next
            self._next += 1
        self.meta[handle] = tuple(entry)
        group = self._group(entry.state_format, entry.tier, entry.owner)
        blocks = self.blocks
        for key in keys:
            held = blocks.get(key)
            if held is None:
                blocks[key] = handle
            elif held.__class__ is int:
                if held != handle:
                    other = self.meta[held]
                    blocks[key] = _with(((self._group(other[1], other[2], other[3]), (held,)),), group, handle)
            else:
                blocks[key] = _with(held, group, handle)

    def remove(self, entry_id: str, keys: Iterable[bytes]) -> None:
        handle = self.handles.pop(entry_id, None)
        if handle is None:
            return
        entry = self.meta.pop(handle)
        group = self._group(entry[1], entry[2], entry[3])
        blocks = self.blocks
        for key in keys:
            held = blocks.get(key)
            if held is None:
                continue
            if held.__class__ is int:
                if held == handle:
                    del blocks[key]
                continue
            rest = _without(held, group, handle)
            if not rest:
                del blocks[key]
            elif len(rest) == 1 and len(rest[0][1]) == 1:
                blocks[key] = rest[0][1][0]  # one sharer left: back to the compact form
            else:
                blocks[key] = rest

    def move(self, entry_id: str, tier: str, keys: Iterable[bytes]) -> None:
        handle = self.handles.get(entry_id)
        if handle is None:
            return
        entry = self.meta[handle]
        if entry[2] == tier:
            return
        self.meta[handle] = (*entry[:2], tier, *entry[3:])
        old, new = self._group(entry[1], entry[2], entry[3]), self._group(entry[1], tier, entry[3])
        blocks = self.blocks
        for key in keys:
            held = blocks.get(key)
            if held is not None and held.__class__ is not int:
                blocks[key] = _with(_without(held, old, handle), new, handle)

    def probe(self, key: bytes, state_format: str, tier: str | None, owners: Sequence[str]) -> tuple | None:
        """Some entry covering ``key`` in ``tier`` (None: either) that ``owners`` may see,
        as its `MapEntry` fields (a plain tuple; ``MapEntry(*fields)`` names them)."""
        held = self.blocks.get(key)
        if held is None:
            return None
        if held.__class__ is int:
            entry = self.meta[held]
            if entry[1] == state_format and (tier is None or entry[2] == tier) and entry[3] in owners:
                return entry
            return None
        for group, handles in held:
            if group[0] == state_format and (tier is None or group[1] == tier) and group[2] in owners:
                return self.meta[handles[0]]
        return None


def _with(held: tuple, group: Group, handle: int) -> tuple:
    """``held`` (group, handles) pairs with ``handle`` added to ``group``."""
    for i, (g, handles) in enumerate(held):
        if g == group:
            if handle in handles:
                return held
            return held[:i] + ((g, handles + (handle,)),) + held[i + 1:]
    return held + ((group, (handle,)),)


def _without(held: tuple, group: Group, handle: int) -> tuple:
    """``held`` with ``handle`` taken out of ``group`` (and the group gone if emptied)."""
    out = []
    for g, handles in held:
        if g == group:
            handles = tuple(h for h in handles if h != handle)
            if not handles:
                continue
        out.append((g, handles))
    return tuple(out)


class CacheIndex:
    """Queries and updates over the ``kv_*`` tables. Not thread-safe by itself:
    the CacheManager serialises access. Writes happen inside `transaction`."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        migrate(conn, COMPONENT, MIGRATIONS)
        conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
        # Probes and map upkeep run on their own cursor returning plain tuples (no Row objects).
        self._cursor = conn.cursor()
        self._cursor.row_factory = None
        self._probe_sql: dict[tuple[int, bool], str] = {}
        self._map: ProbeMap | None = None
        self._map_generation = -1  # kv_meta.generation the map reflects
        self._data_version = -1  # PRAGMA data_version when the map was last known current
        self._in_tx = False
        self._tx_changes_blocks = False
        self.map_builds = 0  # how many times the map was (re)built, for tests and the benchmark
        self.last_build_s = 0.0

    # ------------------------------------------------------------ transactions
    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error) that keeps the probe map in step.

        The write lock is taken first, so no other connection commits in
        between: if the generation is not the map's at BEGIN, someone else
        changed the blocks since the map was built and the map is dropped.
        """
        if self._in_tx:
            raise RuntimeError("CacheIndex transactions do not nest")
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        self._in_tx, self._tx_changes_blocks = True, False
        try:
            generation = self._generation()
            if self._map is not None and generation != self._map_generation:
                self._map = None
            yield
            if self._tx_changes_blocks:
                conn.execute("UPDATE kv_meta SET value = ? WHERE name = 'generation'", (generation + 1,))
                generation += 1
        except BaseException:
            self._in_tx = False
            self._map = None  # it may hold changes that are being rolled back
            conn.execute("ROLLBACK")
            raise
        self._in_tx = False
        conn.execute("COMMIT")
        if self._map is not None:
            self._map_generation = generation

    def _generation(self) -> int:
        return int(self._cursor.execute("SELECT value FROM kv_meta WHERE name = 'generation'").fetchall()[0][0])

    def _require_tx(self) -> None:
        if not self._in_tx:
            raise RuntimeError("CacheIndex writes must run inside CacheIndex.transaction()")

    def _keys_of(self, entry_id: str) -> list[bytes]:
        return [r[0] for r in self._cursor.execute("SELECT block_key FROM kv_blocks WHERE entry_id = ?",
                                                   (entry_id,)).fetchall()]

    # ------------------------------------------------------------ writes
    def insert(self, entry: EntryRow, keys: Sequence[bytes]) -> None:
        """Inside `transaction`. ``keys`` are the entry's block keys, shallowest first."""
        self._require_tx()
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
            "INSERT OR IGNORE INTO kv_blocks (block_key, state_format, tier, owner, entry_id, depth)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            ((key, entry.state_format, entry.tier, entry.owner, entry.id, depth) for depth, key in enumerate(keys)),
        )
        self._tx_changes_blocks = True
        if self._map is not None:
            self._map.add(MapEntry(entry.id, entry.state_format, entry.tier, entry.owner, entry.n_tokens,
                                   entry.bytes, entry.block_tokens), keys)

    def delete(self, entry_id: str) -> None:
        """Inside `transaction`; the block rows go with the entry (ON DELETE CASCADE)."""
        self._require_tx()
        if self._map is not None and entry_id in self._map.handles:
            self._map.remove(entry_id, self._keys_of(entry_id))
        if self.conn.execute("DELETE FROM kv_entries WHERE id = ?", (entry_id,)).rowcount:
            self._tx_changes_blocks = True

    def move(self, entry_id: str, tier: str, file: str, priority: float) -> None:
        """Inside `transaction`: the entry and its block rows change tier together."""
        self._require_tx()
        self.conn.execute("UPDATE kv_entries SET tier = ?, file = ?, priority = ? WHERE id = ?",
                          (tier, file, priority, entry_id))
        self.conn.execute("UPDATE kv_blocks SET tier = ? WHERE entry_id = ?", (tier, entry_id))
        self._tx_changes_blocks = True
        if self._map is not None:
            self._map.move(entry_id, tier, self._keys_of(entry_id))

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

    def check_consistency(self) -> list[str]:
        """Violations of the module invariants (empty when the index is sound)."""
        problems = [
            f"block rows of entry {row[0]} disagree with it on format, tier or owner"
            for row in self.conn.execute(
                "SELECT DISTINCT b.entry_id FROM kv_blocks b JOIN kv_entries e ON e.id = b.entry_id"
                " WHERE b.state_format != e.state_format OR b.tier != e.tier OR b.owner != e.owner")
        ]
        problems += [
            f"entry {row[0]} has {row[2]} block rows at depths {row[3]}..{row[4]}, expected {row[1]} at 0..{row[1] - 1}"
            for row in self.conn.execute(
                "SELECT e.id, e.n_blocks, COUNT(b.entry_id), MIN(b.depth), MAX(b.depth) FROM kv_entries e"
                " LEFT JOIN kv_blocks b ON b.entry_id = e.id GROUP BY e.id"
                " HAVING COUNT(b.entry_id) != e.n_blocks OR (e.n_blocks > 0 AND"
                " (MIN(b.depth) != 0 OR MAX(b.depth) != e.n_blocks - 1))")
        ]
        problems += [f"block rows of a missing entry {row[0]}" for row in self.conn.execute(
            "SELECT DISTINCT entry_id FROM kv_blocks WHERE entry_id NOT IN (SELECT id FROM kv_entries)")]
        return problems

    # ------------------------------------------------------------ probes
    def probe_map(self) -> ProbeMap:
        """The in-memory probe map, current with every committed change (built or rebuilt here)."""
        version = self._cursor.execute("PRAGMA data_version").fetchall()[0][0]
        if self._map is not None and version != self._data_version:
            # Another connection committed something (to any table of the file):
            # only a change of the kv generation makes the map stale.
            if self._generation() != self._map_generation:
                self._map = None
        if self._map is None:
            self._build_map()
        self._data_version = version
        return self._map  # type: ignore[return-value]

    def _build_map(self) -> None:
        started = time.perf_counter()
        probe_map = ProbeMap()
        # Read generation and rows in one snapshot, so the map is exactly that generation.
        own_tx = not self.conn.in_transaction
        if own_tx:
            self.conn.execute("BEGIN")
        try:
            generation = self._generation()
            sizes = {row[0]: row[1:] for row in self._cursor.execute(
                "SELECT id, n_tokens, bytes, block_tokens FROM kv_entries").fetchall()}
            rows = self._cursor.execute(
                # The (entry_id) index covers these columns (it carries the primary key):
                # rows arrive grouped by entry without a sort.
                "SELECT entry_id, state_format, tier, owner, block_key FROM kv_blocks INDEXED BY kv_blocks_entry"
                " ORDER BY entry_id")
            for (entry_id, state_format, tier, owner), group in itertools.groupby(rows, key=lambda r: r[:4]):
                probe_map.add(MapEntry(entry_id, state_format, tier, owner, *sizes[entry_id]),
                              [r[4] for r in group])
        finally:
            if own_tx:
                self.conn.execute("COMMIT")
        self._map, self._map_generation = probe_map, generation
        self.map_builds += 1
        self.last_build_s = time.perf_counter() - started

    def _visible_at(self, key: bytes, owners: Sequence[str], state_format: str, tier: str | None) -> str | None:
        """The id of some visible entry covering ``key``, or None: one primary-key seek per owner."""
        sql = self._probe_sql.get((len(owners), tier is None))
        if sql is None:
            sql = ("SELECT entry_id FROM kv_blocks WHERE block_key = ? AND state_format = ?"
                   + (" AND tier IN ('T1', 'T2')" if tier is None else " AND tier = ?")
                   + f" AND owner IN ({', '.join('?' * len(owners))}) LIMIT 1")
            self._probe_sql[(len(owners), tier is None)] = sql
        params = (key, state_format, *owners) if tier is None else (key, state_format, tier, *owners)
        # fetchall (of at most one row) runs the statement to its end, so it holds no
        # read snapshot open between lookups (which would keep the WAL from resetting).
        rows = self._cursor.execute(sql, params).fetchall()
        return rows[0][0] if rows else None

    def deepest(self, keys: Sequence[bytes], owners: Iterable[str], state_format: str,
                tier: str | None = None, *, source: str = "memory") -> tuple[int, EntryRow] | None:
        """(blocks matched, an entry covering them) for the deepest visible cached prefix.

        Binary search relying on invariant 1: O(log n) probes, each a dict
        lookup in the probe map (``source="memory"``) or a primary-key seek
        (``source="sqlite"``). Both give the same answer.
        """
        owners = tuple(sorted(set(owners)))
        if source == "memory":
            probe_map = self.probe_map()

            def visible(key: bytes) -> str | None:
                entry = probe_map.probe(key, state_format, tier, owners)
                return None if entry is None else entry[0]
        elif source == "sqlite":
            def visible(key: bytes) -> str | None:
                return self._visible_at(key, owners, state_format, tier)
        else:
            raise ValueError(f"index source must be memory or sqlite, got {source!r}")
        lo, hi = 0, len(keys)  # answer (blocks matched) lies in [lo, hi]
        found: str | None = None
        while lo < hi:
            mid = (lo + hi + 1) // 2  # test "matched >= mid" via key index mid-1
            entry_id = visible(keys[mid - 1])
            if entry_id is not None:
                lo, found = mid, entry_id
            else:
                hi = mid - 1
        # `found` came from the probe that raised `lo` last, i.e. covers depth lo.
        row = self.get(found) if found is not None else None
        return (lo, row) if row is not None else None

    def deepest_per_tier(self, keys: Sequence[bytes], owners: Iterable[str], state_format: str,
                         tiers: Sequence[str] = ("T1", "T2")) -> dict[str, tuple[int, MapEntry]]:
        """The decision-path lookup: for each tier, (blocks matched, an entry covering them)
        of the deepest visible prefix, from the probe map alone (no SQL beyond the
        staleness check). Same answer as `deepest` per tier."""
        owners = tuple(sorted(set(owners)))
        probe = self.probe_map().probe
        found_by_tier: dict[str, tuple[int, MapEntry]] = {}
        for tier in tiers:
            lo, hi = 0, len(keys)
            found: tuple | None = None
            while lo < hi:
                mid = (lo + hi + 1) // 2
                entry = probe(keys[mid - 1], state_format, tier, owners)
                if entry is not None:
                    lo, found = mid, entry
                else:
                    hi = mid - 1
            if found is not None:
                found_by_tier[tier] = (lo, MapEntry(*found))
        return found_by_tier

"""The SQLite index of saved KV states (tables ``kv_*`` in the node's state.db).

Tables:
* ``kv_entries``: one row per saved state (`CacheEntry` metadata): tier, file,
  bytes, content digest, hits, last use, pin, GDSF priority, and
  ``block_keys``: the keys of *every* full block the state covers, shallowest
  first, concatenated (32 bytes each).
* ``kv_counters``: hit/miss/eviction counters; ``kv_clock``: the GDSF
  inflation value L of each tier; ``kv_meta``: the generation (below).

Invariant (the lookup relies on it): an entry with ``n`` full blocks carries
exactly their ``n`` keys, the last being ``deepest_key``. Because block keys
are chained, "some visible entry covers key(d)" is then monotone in ``d``: if
it holds at depth d it holds at every shallower depth. So the deepest cached
prefix of a sequence is found by binary search over the sequence's block
keys: O(log n) probes for n blocks (within the O(n) bound), whatever the
number of entries. `check_consistency` verifies the invariant.

Probes run in memory. A placement decision probes ~2 log2(n) block keys, a
node saves a state after every turn. Through SQLite a probe cost 5-10 us and
indexing every block of a state as its own row made a save write ~150
scattered b-tree pages (3-8 ms, most of it the block rows). So SQLite keeps
each entry's keys as one value (a save writes one row) and lookups read
`ProbeMap`, a hash map from block key to the entries covering it, with their
format, tier and owner, derived from the table. SQLite stays the durable
truth:

* the map is built from ``kv_entries`` on the first lookup (not on open: CLI
  commands that never look up never pay for it), ~0.5 s per million blocks;
* every write goes through `CacheIndex.transaction`, which applies the same
  change to the map; a rollback discards the map (rebuilt on next use), so
  the map never holds an uncommitted change after the transaction ends;
* ``kv_meta.generation`` is bumped by every transaction that adds, drops or
  moves an entry. Before a lookup, ``PRAGMA data_version`` (a counter of
  commits by *other* connections, e.g. ``agent-machine cache evict`` while
  the daemon runs) is compared with the last one seen; if it moved and the
  generation is not the map's, the map is rebuilt. A crash loses only the map.
"""

from __future__ import annotations

import contextlib
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
    # Step 2: an entry's block keys become one column of its row (see the module
    # docstring: probes moved to memory, and per-block rows made every save slow).
    # Keys are concatenated in depth order; an entry whose rows were incomplete
    # is dropped (its file is then an orphan, removed by CacheManager.recover).
    """
    ALTER TABLE kv_entries ADD COLUMN block_keys BLOB NOT NULL DEFAULT x'';
    CREATE INDEX kv_blocks_chain ON kv_blocks (entry_id, depth);
    WITH RECURSIVE chain (entry_id, depth, acc) AS (
        SELECT entry_id, 0, block_key FROM kv_blocks WHERE depth = 0
        UNION ALL
        SELECT c.entry_id, c.depth + 1, CAST(c.acc || b.block_key AS BLOB)
        FROM chain c JOIN kv_blocks b ON b.entry_id = c.entry_id AND b.depth = c.depth + 1
    )
    UPDATE kv_entries SET block_keys = COALESCE(
        (SELECT acc FROM chain WHERE chain.entry_id = kv_entries.id AND chain.depth = kv_entries.n_blocks - 1), x'');
    DELETE FROM kv_entries WHERE length(block_keys) != 32 * n_blocks
        OR (n_blocks > 0 AND substr(block_keys, -32) != deepest_key);
    DROP TABLE kv_blocks
    """,
]

KEY_BYTES = 32

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
                    blocks[key] = _with(((self._group(other[1], other[2], other[3]), (held,)),), group, handle,
                                        self.meta)
            else:
                blocks[key] = _with(held, group, handle, self.meta)

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
                blocks[key] = _with(_without(held, old, handle), new, handle, self.meta)

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

    def smallest(self, key: bytes, state_format: str, tier: str | None, owners: Sequence[str]) -> tuple | None:
        """Like `probe`, but of all the entries that qualify, the one with the fewest bytes
        (the cheapest to restore): the first of each qualifying group, whose handles are
        kept in size order."""
        held = self.blocks.get(key)
        if held is None or held.__class__ is int:
            return self.probe(key, state_format, tier, owners)
        best = None
        for group, handles in held:
            if group[0] == state_format and (tier is None or group[1] == tier) and group[2] in owners:
                entry = self.meta[handles[0]]
                if best is None or entry[5] < best[5]:
                    best = entry
        return best


def _split_keys(blob: bytes) -> list[bytes]:
    return [blob[i:i + KEY_BYTES] for i in range(0, len(blob), KEY_BYTES)]


def _with(held: tuple, group: Group, handle: int, meta: dict[int, tuple]) -> tuple:
    """``held`` (group, handles) pairs with ``handle`` added to ``group``; each group's
    handles stay ordered by their entry's bytes, so the first is the cheapest to restore."""
    size = meta[handle][5]
    for i, (g, handles) in enumerate(held):
        if g == group:
            if handle in handles:
                return held
            at = 0
            while at < len(handles) and meta[handles[at]][5] <= size:
                at += 1
            return held[:i] + ((g, handles[:at] + (handle,) + handles[at:]),) + held[i + 1:]
    return held + ((group, (handle,)),)


def _without(held: tuple, group: Group, handle: int) -> tuple:
    """``held`` with ``handle`` taken out of ``group`` (and the group gone if emptied)."""
    for i, (g, handles) in enumerate(held):
        if g == group:
            if handle not in handles:
                return held
            if len(handles) == 1:
                return held[:i] + held[i + 1:]
            at = handles.index(handle)
            return held[:i] + ((g, handles[:at] + handles[at + 1:]),) + held[i + 1:]
    return held


class CacheIndex:
    """Queries and updates over the ``kv_*`` tables. Not thread-safe by itself:
    the CacheManager serialises access. Writes happen inside `transaction`."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        migrate(conn, COMPONENT, MIGRATIONS)
        # Map upkeep runs on its own cursor returning plain tuples (no Row objects).
        self._cursor = conn.cursor()
        self._cursor.row_factory = None
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

    def entry_keys(self, entry_id: str) -> list[bytes]:
        """The block keys an entry covers, shallowest first (empty if no such entry)."""
        rows = self._cursor.execute("SELECT block_keys FROM kv_entries WHERE id = ?", (entry_id,)).fetchall()
        return _split_keys(rows[0][0]) if rows else []

    # ------------------------------------------------------------ writes
    def insert(self, entry: EntryRow, keys: Sequence[bytes]) -> None:
        """Inside `transaction`. ``keys`` are the entry's block keys, shallowest first."""
        self._require_tx()
        if len(keys) != entry.n_blocks or (keys and keys[-1] != entry.deepest_key):
            raise ValueError("an entry must be indexed under every one of its block keys")
        joined = b"".join(keys)
        if len(joined) != KEY_BYTES * len(keys):
            raise ValueError(f"block keys are {KEY_BYTES} bytes each")
        self.conn.execute(
            f"INSERT INTO kv_entries ({ENTRY_COLUMNS}, block_keys) VALUES ({', '.join('?' * 20)})",
            (entry.id, entry.deepest_key, entry.model_digest, entry.scope, entry.owner, entry.tenant,
             entry.state_format, entry.n_tokens, entry.n_blocks, entry.block_tokens, entry.tier, entry.file,
             entry.bytes, entry.content_digest, entry.hits, entry.created_at, entry.last_used_at,
             int(entry.pinned), entry.priority, joined),
        )
        self._tx_changes_blocks = True
        if self._map is not None:
            self._map.add(MapEntry(entry.id, entry.state_format, entry.tier, entry.owner, entry.n_tokens,
                                   entry.bytes, entry.block_tokens), keys)

    def delete(self, entry_id: str) -> None:
        """Inside `transaction`."""
        self._require_tx()
        if self._map is not None and entry_id in self._map.handles:
            self._map.remove(entry_id, self.entry_keys(entry_id))
        if self.conn.execute("DELETE FROM kv_entries WHERE id = ?", (entry_id,)).rowcount:
            self._tx_changes_blocks = True

    def move(self, entry_id: str, tier: str, file: str, priority: float) -> None:
        """Inside `transaction`."""
        self._require_tx()
        self.conn.execute("UPDATE kv_entries SET tier = ?, file = ?, priority = ? WHERE id = ?",
                          (tier, file, priority, entry_id))
        self._tx_changes_blocks = True
        if self._map is not None:
            self._map.move(entry_id, tier, self.entry_keys(entry_id))

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
        """Blocks indexed, over all entries (a prefix shared by k entries counts k times)."""
        return int(self.conn.execute("SELECT COALESCE(SUM(n_blocks), 0) FROM kv_entries").fetchone()[0])

    def check_consistency(self) -> list[str]:
        """Violations of the module invariant (empty when the index is sound)."""
        return [
            f"entry {row[0]} has {row[1]} bytes of block keys for {row[2]} blocks, or a last key that is not its"
            " deepest key"
            for row in self.conn.execute(
                "SELECT id, length(block_keys), n_blocks FROM kv_entries WHERE length(block_keys) != ? * n_blocks"
                " OR (n_blocks > 0 AND substr(block_keys, ?) != deepest_key)", (KEY_BYTES, -KEY_BYTES))
        ]

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
            for row in self._cursor.execute(
                    "SELECT id, state_format, tier, owner, n_tokens, bytes, block_tokens, block_keys FROM kv_entries"):
                probe_map.add(MapEntry(*row[:7]), _split_keys(row[7]))
        finally:
            if own_tx:
                self.conn.execute("COMMIT")
        self._map, self._map_generation = probe_map, generation
        self.map_builds += 1
        self.last_build_s = time.perf_counter() - started

    def deepest(self, keys: Sequence[bytes], owners: Iterable[str], state_format: str,
                tier: str | None = None) -> tuple[int, EntryRow] | None:
        """(blocks matched, an entry covering them) for the deepest visible cached prefix
        in ``tier`` (None: either), with the entry's full row; see `deepest_per_tier`."""
        found = self.deepest_per_tier(keys, owners, state_format, (tier,) if tier else (None,))
        if not found:
            return None
        blocks, entry = next(iter(found.values()))
        row = self.get(entry.id)
        return (blocks, row) if row is not None else None

    def deepest_per_tier(self, keys: Sequence[bytes], owners: Iterable[str], state_format: str,
                         tiers: Sequence[str | None] = ("T1", "T2")) -> dict[str | None, tuple[int, MapEntry]]:
        """The decision-path lookup: for each tier (None: any), (blocks matched, the smallest
        entry covering them) of the deepest prefix visible to ``owners`` in ``state_format``.

        Binary search relying on the module invariant: O(log n) probes of the
        probe map, no SQL beyond the staleness check."""
        owners = tuple(sorted(set(owners)))
        probe_map = self.probe_map()
        probe = probe_map.probe
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
                # Every entry covering key(lo) holds the same prefix: restore the smallest.
                found = probe_map.smallest(keys[lo - 1], state_format, tier, owners) or found
                found_by_tier[tier] = (lo, MapEntry(*found))
        return found_by_tier

"""CacheManager: the facade over block keys, tier stores, the index and GDSF.

Typical use by the node (one turn of a pod)::

    cache = CacheManager.open(paths, t1_budget=..., t2_budget=...)
    found = cache.lookup(tokens, namespace, state_format=provider.kind)
    if found.best is not None:
        with cache.restoring(found.best) as restore:   # None: corrupt, dropped, counted
            if restore is not None:
                provider.restore_state(slot, restore.path)  # -> RestoredState
    ... generate ...
    staging = cache.staging_path()
    provider.save_state(slot, staging)
    cache.put(staging, all_tokens, namespace, state_format=provider.kind)

Invariants:
* An entry lives in exactly one tier; its file is that tier's ``<id>.kv``.
* After every public call returns, each tier's indexed bytes are within its
  budget (a staged file not yet `put` is not counted: it is transient).
* Pinned entries and entries being restored (in use) are never demoted,
  dropped or promoted away; if room cannot be made without them, the new
  state goes to T2 or is not stored (counted as ``rejected``).
* A state is served only after its sha256 matched the recorded digest; a
  mismatch or unreadable file drops the entry (``corrupt``) and is a miss.
* Crash safety: a file is durably in place before its index row commits; on
  open, files without rows and rows without files are removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

from nodeagent.contracts.cache import CacheEntry, CacheStats, TierUsage
from nodeagent.kvcache.blocks import BLOCK_TOKENS, Namespace, block_keys
from nodeagent.kvcache.index import CacheIndex, EntryRow
from nodeagent.kvcache.policy import gdsf_priority
from nodeagent.kvcache.tiers import CorruptEntry, TierStore, default_t1_dir
from nodeagent.store import connect

log = logging.getLogger("agent_machine.kvcache")

DEFAULT_T1_BUDGET = 2 << 30
DEFAULT_T2_BUDGET = 20 << 30
TIERS = ("T1", "T2")

NamespaceSpec = Namespace | Sequence[tuple[int, Namespace]]


@dataclass(frozen=True)
class PrefixMatch:
    """The deepest visible cached prefix in one tier."""

    entry_id: str
    tier: str
    blocks: int
    cached_tokens: int  # blocks * block_tokens: what the restored state is known to share
    state_tokens: int  # tokens the saved state covers (may extend past the match)
    bytes: int  # what a restore reads


@dataclass(frozen=True)
class Lookup:
    keys: tuple[bytes, ...]
    prompt_tokens: int
    by_tier: dict[str, PrefixMatch]  # deepest match per tier, absent when none

    @property
    def best(self) -> PrefixMatch | None:
        """Deepest match; between equally deep ones, the faster tier (T1)."""
        found = sorted(self.by_tier.values(), key=lambda m: (-m.blocks, m.tier))
        return found[0] if found else None


@dataclass
class Restore:
    path: Path
    entry: CacheEntry
    served_from: str  # tier the bytes came from (before any promotion)


@dataclass(frozen=True)
class TierChange:
    """A saved state entered a tier, left the cache, or moved between T1 and T2.

    Observers (`CacheManager.add_observer`) see one after the index committed it;
    KV events publish T1/T2 block changes from these (`nodeagent.kvevents`).
    ``tokens`` are known only when the state is stored (the index keeps keys,
    not tokens).
    """

    action: Literal["stored", "removed", "moved"]
    entry_id: str
    model_digest: str
    tier: str  # where it is now (stored, moved) or was (removed)
    keys: tuple[bytes, ...]  # every full block's key, shallowest first
    block_tokens: int
    tokens: tuple[int, ...] | None = None  # stored: the tokens the state covers
    from_tier: str | None = None  # moved: the tier it left


@dataclass
class _Counters:
    pending: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, value: int = 1) -> None:
        self.pending[name] = self.pending.get(name, 0) + value


def visible_owners(namespace: NamespaceSpec) -> list[str]:
    """Owners whose entries a lookup in ``namespace`` may be served: public, its tenant, its tenant/agent."""
    spans = [(0, namespace)] if isinstance(namespace, Namespace) else list(namespace)
    owners = {"public"}
    for _, ns in spans:
        if ns.tenant:
            owners.add(ns.tenant)
            if ns.agent:
                owners.add(f"{ns.tenant}/{ns.agent}")
    return sorted(owners)


def _last_namespace(namespace: NamespaceSpec) -> Namespace:
    return namespace if isinstance(namespace, Namespace) else list(namespace)[-1][1]


def _iso(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


class CacheManager:
    def __init__(
        self,
        conn: sqlite3.Connection,
        t1: TierStore,
        t2: TierStore,
        *,
        block_tokens: int = BLOCK_TOKENS,
        clock: Callable[[], float] = time.time,
        cost: Callable[[EntryRow], float] | None = None,
    ) -> None:
        if t1.name != "T1" or t2.name != "T2":
            raise ValueError("CacheManager needs a T1 and a T2 store")
        self.index = CacheIndex(conn)
        self.stores = {"T1": t1, "T2": t2}
        self.block_tokens = block_tokens
        self._clock = clock
        # GDSF cost: tokens saved from recomputation by default; the node may
        # pass recompute seconds (tokens / measured prefill rate of the model).
        self._cost = cost or (lambda row: float(row.n_tokens))
        self._lock = threading.RLock()
        self._in_use: dict[str, int] = {}
        self._after_commit: list[Callable[[], None]] = []
        self._observers: list[Callable[[TierChange], None]] = []
        self.recovered = self.recover()

    def add_observer(self, observer: Callable[[TierChange], None]) -> None:
        """``observer(change)`` after every committed store, drop, demotion or promotion.

        Called with the manager's lock held, so observers must only record the
        change (the KV event publisher queues it); one that raises is logged and
        never fails the cache operation.
        """
        with self._lock:
            self._observers.append(observer)

    def _notify(self, change: TierChange) -> None:
        for observer in list(self._observers):
            try:
                observer(change)
            except Exception:  # an observer never breaks a save or an eviction
                log.exception("KV cache observer failed on %s of %s", change.action, change.entry_id)

    @classmethod
    def open(
        cls,
        db_path: str | Path,
        *,
        t1_dir: str | Path | None = None,
        t2_dir: str | Path,
        t1_budget: int = DEFAULT_T1_BUDGET,
        t2_budget: int = DEFAULT_T2_BUDGET,
        **kwargs,
    ) -> "CacheManager":
        t1 = TierStore("T1", Path(t1_dir) if t1_dir else default_t1_dir(), t1_budget)
        t2 = TierStore("T2", Path(t2_dir), t2_budget)
        return cls(connect(db_path), t1, t2, **kwargs)

    # ------------------------------------------------------------------ keys
    def keys(self, tokens: Sequence[int], namespace: NamespaceSpec) -> list[bytes]:
        return block_keys(tokens, namespace, block_tokens=self.block_tokens)

    # ------------------------------------------------------------------ lookup
    def lookup(self, tokens: Sequence[int], namespace: NamespaceSpec, *, state_format: str) -> Lookup:
        """Deepest cached prefix of ``tokens`` visible to ``namespace``, per tier. Counts nothing."""
        return self.lookup_keys(self.keys(tokens, namespace), visible_owners(namespace),
                                state_format=state_format, prompt_tokens=len(tokens))

    def lookup_keys(self, keys: Sequence[bytes], owners: Sequence[str], *, state_format: str,
                    prompt_tokens: int | None = None) -> Lookup:
        with self._lock:
            found = self.index.deepest_per_tier(keys, owners, state_format, TIERS)
        by_tier = {tier: PrefixMatch(entry.id, tier, blocks, blocks * entry.block_tokens, entry.n_tokens, entry.bytes)
                   for tier, (blocks, entry) in found.items()}
        return Lookup(tuple(keys), prompt_tokens if prompt_tokens is not None else
                      len(keys) * self.block_tokens, by_tier)

    # ------------------------------------------------------------------ restore
    @contextlib.contextmanager
    def restoring(self, match: PrefixMatch, *, promote: bool = True) -> Iterator[Restore | None]:
        """Verify and hand out a saved state for the duration of the block.

        Yields None (after dropping and counting the entry) when the file is
        missing or its digest does not match: the caller recomputes the prefix.
        While the block runs the entry is in use and cannot be evicted.
        """
        restore = self.begin_restore(match, promote=promote)
        try:
            yield restore
        finally:
            if restore is not None:
                self.end_restore(restore.entry.id)

    def begin_restore(self, match: PrefixMatch, *, promote: bool = True) -> Restore | None:
        counters = _Counters()
        with self._lock:
            row = self.index.get(match.entry_id)
            if row is None:  # evicted since the lookup
                counters.add("misses")
                self._flush(counters)
                return None
            self._in_use[row.id] = self._in_use.get(row.id, 0) + 1
            served_from = row.tier
        # Hash the file outside the lock (tens of ms for a large state): lookups and
        # saves of other pods go on meanwhile, and an entry in use is never evicted,
        # demoted or rewritten, so its tier and file stay put.
        try:
            path = self.stores[served_from].verify(row.id, row.content_digest)
        except CorruptEntry as exc:
            # Counted below; logged too, because a corrupt state means a disk, RAM or
            # tmpfs problem an operator must hear about, not only a miss in the stats.
            log.warning("KV cache: dropped corrupt state %s (%s, %d tokens): %s; the prefix is recomputed",
                        row.id, served_from, row.n_tokens, exc)
            with self._lock:
                self._in_use_release(row.id)
                current = self.index.get(row.id)
                if current is not None:
                    self._drop(current, counters, reason="corrupt")
                counters.add("misses")
                self._flush(counters)
            return None
        with self._lock:
            current = self.index.get(row.id)
            if current is None:  # dropped meanwhile (another restore of it found it corrupt)
                self._in_use_release(row.id)
                counters.add("misses")
                self._flush(counters)
                return None
            row = current
            if promote and row.tier == "T2":
                row = self._promote(row, counters)
                path = self.stores[row.tier].path(row.id)
            now = self._clock()
            priority = gdsf_priority(self.index.clock(row.tier), row.hits + 1, self._cost(row), row.bytes)
            with self._tx():
                self.index.touch(row.id, now, priority)
                self.index.add_counters({f"hits_{served_from}": 1,
                                         f"hit_tokens_{served_from}": match.cached_tokens,
                                         **counters.pending})
            counters.pending.clear()
            return Restore(path, self._entry(self.index.get(row.id)), served_from)

    def end_restore(self, entry_id: str) -> None:
        with self._lock:
            self._in_use_release(entry_id)

    def report_corrupt(self, entry_id: str, reason: str = "") -> None:
        """The provider rejected a state this manager handed out: drop it, count it, log it."""
        counters = _Counters()
        with self._lock:
            row = self.index.get(entry_id)
            if row is not None:
                log.warning("KV cache: dropped state %s (%s, %d tokens) that the provider rejected%s; "
                            "the prefix is recomputed", row.id, row.tier, row.n_tokens,
                            f": {reason}" if reason else "")
                self._in_use.pop(entry_id, None)
                self._drop(row, counters, reason="corrupt")
            self._flush(counters)

    def record_lookup(self, prompt_tokens: int, *, t0_tokens: int = 0, miss: bool = False) -> None:
        """Count what tiers cannot see: a T0 (in-provider) hit, a full miss, tokens looked up."""
        deltas = {"lookup_tokens": prompt_tokens}
        if t0_tokens:
            deltas.update(hits_T0=1, hit_tokens_T0=t0_tokens)
        if miss:
            deltas["misses"] = 1
        with self._lock, self._tx():
            self.index.add_counters(deltas)

    # ------------------------------------------------------------------ store
    def staging_path(self) -> Path:
        """Where a provider should write a state to be `put` (in the T1 directory)."""
        return self.stores["T1"].staging_path()

    def put(
        self,
        state_file: str | Path,
        tokens: Sequence[int],
        namespace: NamespaceSpec,
        *,
        state_format: str,
        pinned: bool = False,
        tier: str = "T1",
    ) -> CacheEntry | None:
        """Index ``state_file`` (the provider's saved state of exactly ``tokens``).

        The file is moved into the tier (or copied if it lives elsewhere; the
        original is then left alone). Returns None when the state covers no
        full block or cannot be stored within the budgets (counted).
        """
        state_file = Path(state_file)
        if tier not in TIERS:
            raise ValueError(f"tier must be T1 or T2, got {tier!r}")
        keys = self.keys(tokens, namespace)
        counters = _Counters()
        last = _last_namespace(namespace)
        if not keys:
            self._discard_staged(state_file)
            return None
        # Hash and flush a staged state before taking the lock: a multi-GB state takes
        # seconds to hash, and lookups (every placement decision) wait for this lock.
        staged = {name for name, store in self.stores.items() if store.holds(state_file)}
        prepared = TierStore.prepare(state_file) if staged else None
        with self._lock:
            for existing in self.index.find_same(keys[-1], state_format, last.owner):
                if existing.n_tokens >= len(tokens):  # same prefix already held, as long or longer
                    self._discard_staged(state_file)
                    return self._entry(existing)
            entry_id = uuid.uuid4().hex
            size = prepared[0] if prepared is not None else state_file.stat().st_size
            target = self._choose_tier(tier, size, counters)
            if target is None:
                counters.add("rejected")
                self._flush(counters)
                self._discard_staged(state_file)
                return None
            size, digest = self.stores[target].adopt(state_file, entry_id,
                                                     prepared if target in staged else None)
            if staged and target not in staged:
                self._discard_staged(state_file)  # copied into another tier: the staged file is spent
            now = self._clock()
            row = EntryRow(
                id=entry_id, deepest_key=keys[-1], model_digest=last.model_digest, scope=last.scope,
                owner=last.owner, tenant=last.tenant, state_format=state_format, n_tokens=len(tokens),
                n_blocks=len(keys), block_tokens=self.block_tokens, tier=target,
                file=str(self.stores[target].path(entry_id)), bytes=size, content_digest=digest, hits=0,
                created_at=now, last_used_at=now, pinned=pinned, priority=0.0,
            )
            row.priority = gdsf_priority(self.index.clock(target), 0, self._cost(row), size)
            try:
                with self._tx():
                    self.index.insert(row, keys)
                    # Shorter states of the same deepest block are now redundant.
                    for older in self.index.find_same(keys[-1], state_format, last.owner):
                        if older.id != entry_id and older.n_tokens < len(tokens) and not self._busy(older):
                            older_keys = self._keys_if_observed(older.id)
                            self.index.delete(older.id)
                            counters.add("superseded")
                            self._after_commit.append(lambda o=older: self.stores[o.tier].remove(o.id))
                            if older_keys is not None:
                                self._after_commit.append(lambda o=older, k=older_keys: self._notify(
                                    TierChange("removed", o.id, o.model_digest, o.tier, k, o.block_tokens)))
                    counters.add("stored")
                    counters.add("stored_bytes", size)
                    self.index.add_counters(counters.pending)
            except BaseException:
                self.stores[target].remove(entry_id)
                raise
            counters.pending.clear()
            if self._observers:
                self._notify(TierChange("stored", entry_id, row.model_digest, target, tuple(keys), self.block_tokens,
                                        tokens=tuple(tokens[:len(keys) * self.block_tokens])))
            self._run_after_commit()
            return self._entry(self.index.get(entry_id))

    # ------------------------------------------------------------------ admin
    def entries(self, *, tier: str | None = None, tenant: str | None = None,
                model_digest: str | None = None) -> list[CacheEntry]:
        with self._lock:
            return [self._entry(r) for r in self.index.entries(tier=tier, tenant=tenant, model_digest=model_digest)]

    def get(self, entry_id: str) -> CacheEntry | None:
        with self._lock:
            row = self.index.get(entry_id)
            return self._entry(row) if row else None

    def pin(self, entry_id: str, pinned: bool = True) -> bool:
        with self._lock, self._tx():
            return self.index.set_pinned(entry_id, pinned)

    def evict(self, entry_id: str, *, force: bool = False) -> bool:
        """Drop one entry (pinned ones only with ``force``; never one in use)."""
        counters = _Counters()
        with self._lock:
            row = self.index.get(entry_id)
            if row is None:
                return False
            if self._in_use.get(entry_id):
                raise ValueError(f"cache entry {entry_id} is being restored; try again")
            if row.pinned and not force:
                raise ValueError(f"cache entry {entry_id} is pinned; unpin it or use force")
            self._drop(row, counters, reason="evicted")
            self._flush(counters)
            return True

    def delete_owned(self, tenant: str, agent: str | None = None) -> list[CacheEntry]:
        """Drop every entry of ``tenant`` (its tenant-scoped and all its agents' private
        entries), or with ``agent`` only that agent's private ones, in every tier, pinned
        ones included (a wipe; `nodeagent.governance.wipe`). Public entries stay. Raises
        ValueError, dropping nothing, while one of them is being restored."""
        counters = _Counters()
        with self._lock:
            rows = [r for r in self.index.entries(tenant=tenant)
                    if (r.owner == f"{tenant}/{agent}" if agent is not None
                        else r.owner == tenant or r.owner.startswith(f"{tenant}/"))]
            busy = [r.id for r in rows if self._in_use.get(r.id)]
            if busy:
                raise ValueError(f"cache entries {', '.join(busy)} are being restored; try again")
            dropped = [self._entry(r) for r in rows]
            for row in rows:
                self._drop(row, counters, reason="wiped")
            self._flush(counters)
            return dropped

    def shrink(self, tier: str, target_bytes: int) -> int:
        """Evict (T1: demote) lowest-priority entries until ``tier`` holds <= ``target_bytes``
        (pinned and in-use entries stay). Returns how many entries left the tier."""
        counters = _Counters()
        with self._lock:
            before = self.index.count(tier)
            # "room for 0 more bytes within a budget of target_bytes"
            self._make_room(tier, 0, counters, protect=set(), budget=max(0, target_bytes))
            self._flush(counters)
            return max(0, before - self.index.count(tier))

    def stats(self) -> CacheStats:
        with self._lock:
            counters = self.index.counters()
            tiers = [TierUsage(tier=name, directory=str(store.directory), budget_bytes=store.budget_bytes,
                               used_bytes=self.index.used_bytes(name), entries=self.index.count(name))
                     for name, store in self.stores.items()]
        return CacheStats(
            tiers=tiers,
            hits={t: counters.get(f"hits_{t}", 0) for t in ("T0", "T1", "T2")},
            misses=counters.get("misses", 0),
            hit_tokens={t: counters.get(f"hit_tokens_{t}", 0) for t in ("T0", "T1", "T2")},
            lookup_tokens=counters.get("lookup_tokens", 0),
            stored=counters.get("stored", 0),
            stored_bytes=counters.get("stored_bytes", 0),
            demotions=counters.get("demotions", 0),
            promotions=counters.get("promotions", 0),
            evictions=counters.get("evictions", 0),
            corrupt=counters.get("corrupt", 0),
            rejected=counters.get("rejected", 0),
        )

    def recover(self) -> dict[str, int]:
        """Reconcile files and index after a crash or a reboot (T1 is lost on reboot)."""
        report = {"orphan_files": 0, "missing_files": 0, "staging_files": 0}
        with self._lock:
            indexed: dict[str, set[str]] = {t: set() for t in TIERS}
            for row in self.index.entries():
                indexed[row.tier].add(row.id)
            with self._tx():
                for tier, store in self.stores.items():
                    report["staging_files"] += store.remove_stale_staging()
                    on_disk = store.entry_ids_on_disk()
                    for orphan in on_disk - indexed[tier]:
                        store.remove(orphan)
                        report["orphan_files"] += 1
                    for missing in indexed[tier] - on_disk:
                        self.index.delete(missing)
                        report["missing_files"] += 1
                if report["missing_files"]:
                    self.index.add_counters({"lost": report["missing_files"]})
        return report

    # ------------------------------------------------------------------ internals
    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        try:
            with self.index.transaction():
                yield
        except BaseException:
            self._after_commit.clear()
            raise

    def _run_after_commit(self) -> None:
        actions, self._after_commit = self._after_commit, []
        for action in actions:
            action()

    def _flush(self, counters: _Counters) -> None:
        if counters.pending:
            with self._tx():
                self.index.add_counters(counters.pending)
            counters.pending.clear()
        self._run_after_commit()

    def _busy(self, row: EntryRow) -> bool:
        return row.pinned or bool(self._in_use.get(row.id))

    def _in_use_release(self, entry_id: str) -> None:
        left = self._in_use.get(entry_id, 0) - 1
        if left > 0:
            self._in_use[entry_id] = left
        else:
            self._in_use.pop(entry_id, None)

    def _choose_tier(self, wanted: str, size: int, counters: _Counters) -> str | None:
        order = ("T1", "T2") if wanted == "T1" else ("T2",)
        for tier in order:
            if size <= self.stores[tier].budget_bytes and self._make_room(tier, size, counters, protect=set()):
                return tier
        return None

    def _make_room(self, tier: str, need: int, counters: _Counters, *, protect: set[str],
                   budget: int | None = None) -> bool:
        """Free space in ``tier`` until ``need`` more bytes fit its budget. T1 victims are
        demoted to T2 (dropped only if T2 cannot take them); T2 victims are dropped."""
        budget = self.stores[tier].budget_bytes if budget is None else budget
        used = self.index.used_bytes(tier)
        if used + need <= budget:
            return True
        if need > budget:
            return False
        victims = []
        freed = 0
        candidates = self.index.eviction_candidates(tier)
        for row in candidates:
            if row.id in protect or self._busy(row):
                continue
            victims.append(row)
            freed += row.bytes
            if used - freed + need <= budget:
                break
        candidates.close()
        if used - freed + need > budget:
            return False  # everything left is pinned or in use: change nothing
        for row in victims:
            self.index.set_clock(tier, max(self.index.clock(tier), row.priority))
            if tier == "T1" and self._demote(row, counters, protect | {v.id for v in victims}):
                continue
            self._drop(row, counters, reason="evicted")
        return True

    def _demote(self, row: EntryRow, counters: _Counters, protect: set[str]) -> bool:
        t2 = self.stores["T2"]
        if row.bytes > t2.budget_bytes or not self._make_room("T2", row.bytes, counters, protect=protect):
            return False
        t2.copy_in(self.stores["T1"].path(row.id), row.id)
        priority = gdsf_priority(self.index.clock("T2"), row.hits, self._cost(row), row.bytes)
        with self._tx():
            self.index.move(row.id, "T2", str(t2.path(row.id)), priority)
        self.stores["T1"].remove(row.id)
        counters.add("demotions")
        self._notify_moved(row, "T1", "T2")
        return True

    def _promote(self, row: EntryRow, counters: _Counters) -> EntryRow:
        t1 = self.stores["T1"]
        if row.bytes > t1.budget_bytes or not self._make_room("T1", row.bytes, counters, protect={row.id}):
            return row  # serve it from T2
        t1.copy_in(self.stores["T2"].path(row.id), row.id)
        priority = gdsf_priority(self.index.clock("T1"), row.hits, self._cost(row), row.bytes)
        with self._tx():
            self.index.move(row.id, "T1", str(t1.path(row.id)), priority)
        self.stores["T2"].remove(row.id)
        counters.add("promotions")
        self._notify_moved(row, "T2", "T1")
        return self.index.get(row.id) or row

    def _drop(self, row: EntryRow, counters: _Counters, *, reason: str) -> None:
        keys = self._keys_if_observed(row.id)
        with self._tx():
            self.index.delete(row.id)
        self.stores[row.tier].remove(row.id)
        counters.add("corrupt" if reason == "corrupt" else "evictions")
        if keys is not None:
            self._notify(TierChange("removed", row.id, row.model_digest, row.tier, keys, row.block_tokens))

    def _keys_if_observed(self, entry_id: str) -> tuple[bytes, ...] | None:
        """An entry's block keys, read only when someone observes changes (one index read)."""
        return tuple(self.index.entry_keys(entry_id)) if self._observers else None

    def _notify_moved(self, row: EntryRow, from_tier: str, to_tier: str) -> None:
        keys = self._keys_if_observed(row.id)
        if keys is not None:
            self._notify(TierChange("moved", row.id, row.model_digest, to_tier, keys, row.block_tokens,
                                    from_tier=from_tier))

    def _discard_staged(self, path: Path) -> None:
        # Only files we handed out (in a tier directory) are ours to delete.
        if any(store.holds(path) for store in self.stores.values()):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _entry(self, row: EntryRow) -> CacheEntry:
        return CacheEntry(
            id=row.id, model_digest=row.model_digest, scope=row.scope, owner=row.owner, tenant=row.tenant,
            state_format=row.state_format, tokens=row.n_tokens, blocks=row.n_blocks,
            block_tokens=row.block_tokens, deepest_block_key=row.deepest_key.hex(), tier=row.tier,
            bytes=row.bytes, content_digest=row.content_digest, hits=row.hits,
            created_at=_iso(row.created_at), last_used_at=_iso(row.last_used_at), pinned=row.pinned,
            in_use=bool(self._in_use.get(row.id)), priority=row.priority,
        )


def open_from_config(loaded) -> CacheManager:
    """The node's CacheManager from a `nodeagent.config.LoadedConfig`: T1 in ``cache.ram_dir``
    (default a tmpfs directory), T2 in ``<state>/kvcache``, index in ``<state>/state.db``."""
    cache = loaded.config.cache
    return CacheManager.open(
        loaded.paths.db_file,
        t1_dir=cache.ram_dir or None,
        t2_dir=loaded.paths.state_dir / "kvcache",
        t1_budget=cache.ram_budget_bytes,
        t2_budget=cache.disk_budget_bytes,
        block_tokens=cache.block_tokens,
    )

"""Wipe: remove a tenant's (or one agent's) states and texts from this node, with a receipt.

`wipe_tenant` removes, for tenant T (and agent A when given):

* KV states in every tier: T1 and T2 entries owned by T (tenant scope) or by
  T/<agent> (private scope) — with an agent, only T/A's private ones. Public
  entries stay (they are nobody's private text). `CacheManager.delete_owned`.
* T0: every provider context holding a span owned by T (T/A) is erased — a
  llama-server slot by its ``erase`` action; any other engine (the embedded
  worker) has no protocol method to empty its context, so it is restarted
  (stop + start empties the KV cache), unless a turn is running on it, which is
  then reported as ``busy`` (its context is forgotten by the pool, so nothing
  is reused from it, and it is overwritten by the next request).
  The Provider protocol lacks ``reset_context()``; with it no restart is needed.
  A slot's erase leaves llama-server's host-RAM prompt cache (``--cache-ram``,
  on by default) as it is: process memory, not a file, until evicted or the
  replica restarts (docs/governance.md, Limits).
* stored segment texts only T could name (not public, not also another
  tenant's), and in T's pods (A's) the texts of segments, messages, prompts,
  tool-call arguments and turn outputs: replaced by their sha256 (the pod still
  loads; digests and receipts are kept).
* then the state database is scrubbed: the deletions run with ``PRAGMA
  secure_delete=ON`` (freed cells and pages are zeroed), the WAL is
  checkpointed and truncated, and ``VACUUM`` rewrites the file, so no page of
  state.db, state.db-wal or -shm still holds the removed text (the test scans
  the files for planted strings).

The wipe receipt (node event ``wipe``) lists what was removed by digest: KV
entry ids with their content digests, segment digests, pod ids with the
digests of every text replaced.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass, field
from typing import Any

from nodeagent.contracts.pod import text_digest
from nodeagent.segments import PUBLIC

WIPED_PREFIX = "wiped:"  # a text replaced by its digest reads "wiped:sha256:<hex>"


@dataclass
class WipeReport:
    tenant: str
    agent: str | None
    kv_entries: list[dict[str, Any]] = field(default_factory=list)
    t0: list[dict[str, Any]] = field(default_factory=list)
    segments: list[str] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)
    turn_outputs: int = 0
    scrub: dict[str, Any] = field(default_factory=dict)
    receipt_id: str | None = None

    def body(self) -> dict[str, Any]:
        return {"apiVersion": "agent-machine/v1", "kind": "WipeReceipt", "tenant": self.tenant, "agent": self.agent,
                "kvEntries": self.kv_entries, "t0": self.t0, "segments": self.segments, "pods": self.pods,
                "turnOutputs": self.turn_outputs, "scrub": self.scrub}

    def to_wire(self) -> dict[str, Any]:
        return {**self.body(), "receiptId": self.receipt_id}


def _owned(owner: str, tenant: str, agent: str | None) -> bool:
    if agent is not None:
        return owner == f"{tenant}/{agent}"
    return owner == tenant or owner.startswith(f"{tenant}/")


def _wiped(text: str, removed: list[str]) -> str:
    if text.startswith(WIPED_PREFIX):
        return text
    digest = text_digest(text)
    removed.append(digest)
    return WIPED_PREFIX + digest


def redact_pod_document(document: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The pod with every private text replaced by its digest; and those digests."""
    removed: list[str] = []
    spec = document.get("spec", {})
    for segment in spec.get("context", []):
        if segment.get("text") is not None:
            segment["digest"] = text_digest(segment["text"])
            removed.append(segment["digest"])
            segment["text"] = None
    for turn in spec.get("turns", []):
        for message in turn.get("messages") or []:
            if message.get("content"):
                message["content"] = _wiped(message["content"], removed)
            for call in message.get("toolCalls") or message.get("tool_calls") or []:
                function = call.get("function", {})
                if function.get("arguments") not in (None, "{}"):
                    function["arguments"] = json.dumps({"wiped": text_digest(function["arguments"])})
                    removed.append(text_digest(function["arguments"]))
        if turn.get("prompt"):
            turn["prompt"] = _wiped(turn["prompt"], removed)
    status = document.get("status") or {}
    for result in status.get("turns") or []:
        if result.get("output"):
            result["output"] = _wiped(result["output"], removed)
    return document, removed


def _erase_t0(pool: Any, tenant: str, agent: str | None) -> list[dict[str, Any]]:
    out = []
    for managed in pool.all():
        held = managed.held
        if not any(_owned(getattr(ns, "owner", ""), tenant, agent) for _, ns in held.spans):
            continue
        provider = managed.provider
        entry = {"provider": managed.name, "tokens": len(held.tokens)}
        if managed.running is not None:
            entry["action"] = "busy"  # a turn is on it: forgotten now, overwritten by the next request
        elif callable(getattr(provider, "erase", None)):  # a llama-server slot (no Provider method: see above)
            import inspect
            takes_slot = bool(inspect.signature(provider.erase).parameters)
            provider.erase(0) if takes_slot else provider.erase()
            entry["action"] = "slot-erased"
        else:
            # No Provider method empties a context: a restart does (the engine's KV goes with its process).
            # Through the pool's revive: serialised with loads, the context (and its group's) forgotten.
            provider.stop()
            pool.revive(managed)
            entry["action"] = "restarted"
        managed.forget_context()
        out.append(entry)
    return out


def _scrub(conn: sqlite3.Connection) -> dict[str, Any]:
    """Make freed pages unreadable in state.db and its WAL: checkpoint, truncate, VACUUM, truncate."""
    busy, log_frames, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    conn.execute("VACUUM")
    busy2, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return {"secureDelete": True, "vacuumed": True, "walTruncated": not (busy or busy2)}


def wipe_tenant(*, conn: sqlite3.Connection, lock: threading.RLock, cache: Any | None, receipts: Any | None,
                pool: Any | None = None, tenant: str, agent: str | None = None) -> WipeReport:
    """Remove ``tenant``'s (``agent``'s) states and texts; sign the wipe receipt into ``receipts``."""
    report = WipeReport(tenant, agent)
    if cache is not None:
        for entry in cache.delete_owned(tenant, agent):
            report.kv_entries.append({"id": entry.id, "tier": entry.tier, "owner": entry.owner,
                                      "scope": str(getattr(entry.scope, "value", entry.scope)),
                                      "bytes": entry.bytes, "contentDigest": entry.content_digest,
                                      "modelDigest": entry.model_digest})
    if pool is not None:
        report.t0 = _erase_t0(pool, tenant, agent)
    with lock:
        conn.execute("PRAGMA secure_delete=ON")
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                _wipe_rows(conn, report, tenant, agent)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            report.scrub = _scrub(conn)
        finally:
            conn.execute("PRAGMA secure_delete=OFF")
    if receipts is not None:
        name = f"tenant:{tenant}" + (f"/agent:{agent}" if agent else "")
        report.receipt_id = receipts.append_event("wipe", name, report.body(), tenant=tenant).receipt_id
    return report


def _wipe_rows(conn: sqlite3.Connection, report: WipeReport, tenant: str, agent: str | None) -> None:
    sql = "SELECT id, name, document FROM pods WHERE tenant = ?" + (" AND agent = ?" if agent else "")
    pods = conn.execute(sql, (tenant, agent) if agent else (tenant,)).fetchall()
    pod_segments: set[str] = set()
    for pod_id, name, document in pods:
        redacted, removed = redact_pod_document(json.loads(document))
        pod_segments.update(s["digest"] for s in redacted.get("spec", {}).get("context", []) if s.get("digest"))
        outputs = []
        for idx, result in conn.execute("SELECT idx, result FROM pod_turns WHERE pod_id = ?", (pod_id,)).fetchall():
            data = json.loads(result)
            if data.get("output"):
                data["output"] = _wiped(data["output"], outputs)
                conn.execute("UPDATE pod_turns SET result = ? WHERE pod_id = ? AND idx = ?",
                             (json.dumps(data, separators=(",", ":")), pod_id, idx))
        report.turn_outputs += len(outputs)
        conn.execute("UPDATE pods SET document = ? WHERE id = ?", (json.dumps(redacted, separators=(",", ":")), pod_id))
        report.pods.append({"id": pod_id, "name": name, "texts": sorted(set(removed + outputs))})

    # Segment texts: only those no one else may name (public, another tenant) and, for an
    # agent's wipe, that no other agent's pod of the tenant uses.
    owned = {row[0] for row in conn.execute("SELECT digest FROM segment_owners WHERE tenant = ?", (tenant,))}
    shared = {row[0] for row in conn.execute("SELECT digest FROM segment_owners WHERE tenant != ?", (tenant,))}
    candidates = owned - shared
    if agent is not None:
        candidates &= pod_segments
        others = conn.execute("SELECT document FROM pods WHERE tenant = ? AND agent != ?", (tenant, agent)).fetchall()
        for (document,) in others:
            for segment in json.loads(document).get("spec", {}).get("context", []):
                digest = segment.get("digest") or (text_digest(segment["text"]) if segment.get("text") else None)
                candidates.discard(digest)
    for digest in sorted(candidates):
        conn.execute("DELETE FROM segment_owners WHERE digest = ? AND tenant = ?", (digest, tenant))
        conn.execute("DELETE FROM segments WHERE digest = ? AND NOT EXISTS "
                     "(SELECT 1 FROM segment_owners WHERE digest = ?)", (digest, digest))
        report.segments.append(digest)
    assert PUBLIC not in (tenant,)  # "*" is never a tenant name (NAME_RE); a wipe can't touch public rows


__all__ = ["WIPED_PREFIX", "WipeReport", "redact_pod_document", "wipe_tenant"]

"""The AgentPod lifecycle, persisted in SQLite.

Phases (ARCHITECTURE.md)::

    Pending ─► Admitted ─► Placed ─► Running ─► Succeeded
       │           │          │         ├─────► Failed
       │           │          │         └─────► Cancelled
       └─► Refused └─► Refused, Cancelled, Failed (from any non-terminal phase)

Invariants:
* every phase change is one SQLite transaction that checks the current phase,
  so two writers can never both move a pod out of the same phase;
* a pod in a terminal phase never changes again;
* each transition is kept with its timestamp and reason, in order;
* after a crash, `recover` ends every non-terminal pod as Failed with reason
  ``agent-restart`` (its in-flight work is gone), so no pod is lost or stuck.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from datetime import datetime, timezone
from typing import Iterable

from nodeagent.contracts.pod import (
    STORED,
    TERMINAL_PHASES,
    AgentPod,
    PodPhase,
    PodStatus,
    Transition,
    TurnResult,
)
from nodeagent.contracts.policy import PolicyDecision
from nodeagent.idempotency import IdempotencyKey, record as record_idempotency_key
from nodeagent.store import migrate, transaction

P = PodPhase
ALLOWED: dict[PodPhase, frozenset[PodPhase]] = {
    P.pending: frozenset({P.admitted, P.refused, P.cancelled, P.failed}),
    P.admitted: frozenset({P.placed, P.refused, P.cancelled, P.failed}),
    P.placed: frozenset({P.running, P.cancelled, P.failed}),
    P.running: frozenset({P.succeeded, P.failed, P.cancelled}),
    **{phase: frozenset() for phase in TERMINAL_PHASES},
}
RESTART_REASON = "agent-restart"

_SCHEMA = [
    """
    CREATE TABLE pods (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        tenant TEXT NOT NULL,
        agent TEXT NOT NULL,
        session TEXT NOT NULL,
        phase TEXT NOT NULL,
        document TEXT NOT NULL,
        reasons TEXT NOT NULL DEFAULT '[]',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );
    CREATE INDEX pods_phase ON pods (phase);
    CREATE INDEX pods_tenant ON pods (tenant, created_at);
    CREATE TABLE pod_transitions (
        pod_id TEXT NOT NULL REFERENCES pods (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        phase TEXT NOT NULL,
        at TEXT NOT NULL,
        reason TEXT,
        PRIMARY KEY (pod_id, seq)
    );
    CREATE TABLE pod_turns (
        pod_id TEXT NOT NULL REFERENCES pods (id) ON DELETE CASCADE,
        idx INTEGER NOT NULL,
        result TEXT NOT NULL,
        PRIMARY KEY (pod_id, idx)
    );
    CREATE TABLE pod_receipts (
        pod_id TEXT NOT NULL REFERENCES pods (id) ON DELETE CASCADE,
        receipt_id TEXT NOT NULL,
        PRIMARY KEY (pod_id, receipt_id)
    )
    """,
    # The admission verdict in force for the pod (PolicyDecision JSON), kept with it.
    "ALTER TABLE pods ADD COLUMN policy TEXT",
]


class PodNotFound(KeyError):
    def __str__(self) -> str:
        return f"no pod with id {self.args[0]!r}"


class InvalidTransition(ValueError):
    pass


class PodInvalid(ValueError):
    """The pod cannot run here as written (unknown segment digest or provider, bad
    OpenAI request); the message names the field. The API answers 422."""


class PodReferenceUnknown(PodInvalid):
    """The pod names something this node does not have: a provider, a context
    segment by digest. A well-formed request about a missing thing: the API answers 404."""


class PodNotPlaceable(PodInvalid):
    """The node's state does not allow this now (a dry run of a model no provider
    holds yet); it may later. The API answers 409."""


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(timezone.utc)


class PodStore:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        migrate(conn, "pods", _SCHEMA)

    # ------------------------------------------------------------ writes
    def create(self, pod: AgentPod, now: datetime | None = None, *,
               idempotency: IdempotencyKey | None = None, policy: PolicyDecision | None = None) -> AgentPod:
        """Persist a new pod in phase Pending and return it with its id.

        ``idempotency``: the request's key, stored in this same transaction, so
        no crash can leave the pod without it (nodeagent.idempotency).
        ``policy``: its admission verdict, kept with it; an allowed pod is
        Admitted in the same transaction (one commit, not three, before it queues)."""
        at = _now(now)
        pod_id = secrets.token_hex(8)
        stored = pod.model_copy(update={"id": pod_id, "status": None})
        document = json.dumps(stored.to_wire(), separators=(",", ":"))
        m = pod.metadata
        with self._tx():
            self._conn.execute(
                "INSERT INTO pods (id, name, tenant, agent, session, phase, document, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (pod_id, m.name, m.tenant, m.agent, m.session, P.pending.value, document, at.isoformat(), at.isoformat()),
            )
            self._conn.execute(
                "INSERT INTO pod_transitions (pod_id, seq, phase, at, reason) VALUES (?, 0, ?, ?, NULL)",
                (pod_id, P.pending.value, at.isoformat()),
            )
            if idempotency is not None:
                record_idempotency_key(self._conn, idempotency, pod_id, at.timestamp())
            if policy is not None:
                self._conn.execute("UPDATE pods SET policy = ? WHERE id = ?",
                                   (json.dumps(policy.to_wire(), separators=(",", ":")), pod_id))
                if policy.allowed:
                    self._append_transition(pod_id, P.admitted, at, None, [])
        return self.get(pod_id)

    def transition(self, pod_id: str, phase: PodPhase, reason: str | None = None,
                   now: datetime | None = None, reasons: Iterable[str] = ()) -> PodPhase:
        """Move ``pod_id`` to ``phase``; raises InvalidTransition if not allowed from its current phase."""
        at = _now(now)
        with self._tx():
            current = self._phase(pod_id)
            if phase not in ALLOWED[current]:
                raise InvalidTransition(f"pod {pod_id}: {current.value} -> {phase.value} is not allowed")
            self._append_transition(pod_id, phase, at, reason, list(reasons))
        return phase

    def record_turn(self, pod_id: str, result: TurnResult, receipt_id: str | None = None) -> None:
        """Record a finished turn and, in the same transaction, the receipt that
        describes it (the caller appended that receipt first: receipt before report)."""
        with self._tx():
            self._phase(pod_id)
            self._conn.execute(
                "INSERT OR REPLACE INTO pod_turns (pod_id, idx, result) VALUES (?, ?, ?)",
                (pod_id, result.index, json.dumps(result.to_wire(), separators=(",", ":"))),
            )
            if receipt_id is not None:
                self._conn.execute("INSERT OR IGNORE INTO pod_receipts (pod_id, receipt_id) VALUES (?, ?)",
                                   (pod_id, receipt_id))

    def start(self, pod_id: str, reason: str | None, policy: PolicyDecision | None = None,
              now: datetime | None = None) -> None:
        """Placed, then Running, and the admission verdict decided with the prompt's tokens,
        in one transaction: each commit here is on the way to the first token."""
        at = _now(now)
        with self._tx():
            current = self._phase(pod_id)
            if P.placed not in ALLOWED[current]:
                raise InvalidTransition(f"pod {pod_id}: {current.value} -> {P.placed.value} is not allowed")
            self._append_transition(pod_id, P.placed, at, reason, [])
            self._append_transition(pod_id, P.running, at, None, [])
            if policy is not None:
                self._conn.execute("UPDATE pods SET policy = ? WHERE id = ?",
                                   (json.dumps(policy.to_wire(), separators=(",", ":")), pod_id))

    def set_policy(self, pod_id: str, decision: PolicyDecision) -> None:
        """Keep the admission verdict with the pod (the latest replaces the earlier:
        admission is decided again once the prompt's tokens are known)."""
        with self._tx():
            self._phase(pod_id)
            self._conn.execute("UPDATE pods SET policy = ? WHERE id = ?",
                               (json.dumps(decision.to_wire(), separators=(",", ":")), pod_id))

    def add_receipt(self, pod_id: str, receipt_id: str) -> None:
        with self._tx():
            self._phase(pod_id)
            self._conn.execute("INSERT OR IGNORE INTO pod_receipts (pod_id, receipt_id) VALUES (?, ?)", (pod_id, receipt_id))

    def recover(self, now: datetime | None = None) -> list[str]:
        """End every non-terminal pod as Failed (``agent-restart``); returns their ids."""
        at = _now(now)
        terminal = tuple(p.value for p in TERMINAL_PHASES)
        with self._tx():
            rows = self._conn.execute(
                f"SELECT id FROM pods WHERE phase NOT IN ({','.join('?' * len(terminal))}) ORDER BY created_at",
                terminal,
            ).fetchall()
            for row in rows:
                self._append_transition(row["id"], P.failed, at, RESTART_REASON,
                                        ["the agent restarted while this pod was in flight"])
        return [row["id"] for row in rows]

    # ------------------------------------------------------------ reads
    def get(self, pod_id: str) -> AgentPod:
        row = self._conn.execute("SELECT * FROM pods WHERE id = ?", (pod_id,)).fetchone()
        if row is None:
            raise PodNotFound(pod_id)
        return self._hydrate(row)

    def list(self, *, phase: PodPhase | None = None, tenant: str | None = None, limit: int = 100) -> list[AgentPod]:
        clauses, params = [], []
        if phase is not None:
            clauses.append("phase = ?")
            params.append(phase.value)
        if tenant is not None:
            clauses.append("tenant = ?")
            params.append(tenant)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self._conn.execute(
            f"SELECT * FROM pods {where} ORDER BY created_at DESC, id LIMIT ?", (*params, limit)
        ).fetchall()
        return [self._hydrate(row) for row in rows]

    def in_flight_ids(self) -> list[str]:
        """Ids of the pods not yet ended, oldest first, without reading their documents."""
        terminal = tuple(p.value for p in TERMINAL_PHASES)
        return [row[0] for row in self._conn.execute(
            f"SELECT id FROM pods WHERE phase NOT IN ({','.join('?' * len(terminal))}) ORDER BY created_at",
            terminal)]

    def in_flight(self) -> list[AgentPod]:
        terminal = tuple(p.value for p in TERMINAL_PHASES)
        rows = self._conn.execute(
            f"SELECT * FROM pods WHERE phase NOT IN ({','.join('?' * len(terminal))}) ORDER BY created_at",
            terminal,
        ).fetchall()
        return [self._hydrate(row) for row in rows]

    def created_at(self, pod_id: str) -> float:
        row = self._conn.execute("SELECT created_at FROM pods WHERE id = ?", (pod_id,)).fetchone()
        if row is None:
            raise PodNotFound(pod_id)
        return datetime.fromisoformat(row[0]).timestamp()

    def phase_counts(self) -> dict[str, int]:
        return {row[0]: row[1] for row in self._conn.execute("SELECT phase, COUNT(*) FROM pods GROUP BY phase")}

    # ------------------------------------------------------------ internals
    def _tx(self) -> transaction:
        return transaction(self._conn)

    def _phase(self, pod_id: str) -> PodPhase:
        row = self._conn.execute("SELECT phase FROM pods WHERE id = ?", (pod_id,)).fetchone()
        if row is None:
            raise PodNotFound(pod_id)
        return PodPhase(row[0])

    def _append_transition(self, pod_id: str, phase: PodPhase, at: datetime, reason: str | None,
                           reasons: list[str]) -> None:
        seq = self._conn.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM pod_transitions WHERE pod_id = ?",
                                 (pod_id,)).fetchone()[0]
        self._conn.execute("INSERT INTO pod_transitions (pod_id, seq, phase, at, reason) VALUES (?, ?, ?, ?, ?)",
                           (pod_id, seq, phase.value, at.isoformat(), reason))
        if reasons:
            old = json.loads(self._conn.execute("SELECT reasons FROM pods WHERE id = ?", (pod_id,)).fetchone()[0])
            self._conn.execute("UPDATE pods SET reasons = ? WHERE id = ?", (json.dumps(old + reasons), pod_id))
        self._conn.execute("UPDATE pods SET phase = ?, updated_at = ? WHERE id = ?", (phase.value, at.isoformat(), pod_id))

    def _hydrate(self, row: sqlite3.Row) -> AgentPod:
        # STORED: a pod admitted under older name rules still loads (and can end with a receipt)
        pod = AgentPod.model_validate(json.loads(row["document"]), context=STORED)
        transitions = [
            Transition(phase=PodPhase(t["phase"]), at=datetime.fromisoformat(t["at"]), reason=t["reason"])
            for t in self._conn.execute(
                "SELECT phase, at, reason FROM pod_transitions WHERE pod_id = ? ORDER BY seq", (row["id"],))
        ]
        turns = [TurnResult.model_validate(json.loads(r[0])) for r in self._conn.execute(
            "SELECT result FROM pod_turns WHERE pod_id = ? ORDER BY idx", (row["id"],))]
        receipts = [r[0] for r in self._conn.execute(
            "SELECT receipt_id FROM pod_receipts WHERE pod_id = ? ORDER BY rowid", (row["id"],))]
        policy = PolicyDecision.model_validate_json(row["policy"]) if row["policy"] else None
        status = PodStatus(phase=PodPhase(row["phase"]), transitions=transitions,
                           reasons=json.loads(row["reasons"]), turns=turns, receipt_ids=receipts, policy=policy)
        return pod.model_copy(update={"status": status})


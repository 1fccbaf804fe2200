"""What a receipt records of a turn: the machine, the pod, the request's digest, timings."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import rfc8785

from nodeagent.contracts.names import as_label
from nodeagent.contracts.pod import AgentPod, text_digest
from nodeagent.execution.pool import model_name

@dataclass(frozen=True)
class MachineFacts:
    identity_hash: str
    host: str
    agent_version: str
    profile_digest: str


def machine_facts(profile: Any) -> MachineFacts:
    from nodeagent import __version__
    from nodeagent.probe import profile_digest

    host = profile.host.hostname or "unknown-host"
    identity = profile.host.machine_id_hash or hashlib.sha256(f"agent-machine/no-machine-id/{host}".encode()).hexdigest()
    return MachineFacts(identity, host, __version__, profile_digest(profile))


def request_digest(pod: AgentPod, turn: int | None) -> str:
    body = {"metadata": pod.metadata.to_wire(), "spec": pod.spec.to_wire(), "turn": turn}
    return "sha256:" + hashlib.sha256(rfc8785.dumps(body)).hexdigest()


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def _us(seconds: float | None) -> int:
    return 0 if seconds is None else max(0, int(round(seconds * 1e6)))


def receipt_data(facts: MachineFacts, pod: AgentPod, turn: int | None, status: str, error_class: str | None, *,
                 queued: float, record: Any = None, outcome: Any = None, policy: Any = None) -> dict[str, Any]:
    """The receipt body of one turn (``turn`` None: the pod ran none), as `ReceiptInput` reads it.

    ``outcome`` is the executor's `TurnOutcome` when the turn ran; ``policy`` the
    pod's `PolicyDecision`."""
    now = time.time()
    data: dict[str, Any] = {
        "machine": {"identityHash": facts.identity_hash, "host": facts.host,
                    "agentVersion": facts.agent_version, "profileDigest": facts.profile_digest},
        # Names go through as_label: a receipt records what ran, whatever a
        # name holds (an older agent stored names the pod contract now refuses).
        "pod": {"name": as_label(pod.metadata.name),
                "runId": as_label(f"{pod.id}-t{turn}" if turn is not None else pod.id),
                "tenant": as_label(pod.metadata.tenant), "agent": as_label(pod.metadata.agent),
                "session": as_label(pod.metadata.session), "requestDigest": request_digest(pod, turn)},
        "model": {"name": as_label(model_name(record) if record is not None
                                   else (pod.spec.model.name or pod.spec.model.digest)),
                  "digest": record.digest if record is not None else None},
        "timing": {"queuedAt": _utc(min(queued, now)), "finishedAt": _utc(now)},
        "outcome": {"status": status, "errorClass": as_label(error_class) if error_class else None},
    }
    if policy is not None:
        data["policy"] = {"source": as_label(policy.policy_source), "digest": policy.policy_digest,
                          "verdict": "allowed" if policy.allowed else "refused",
                          "reasons": [as_label(r) for r in policy.reasons[:16]]}
    if outcome is not None:
        chosen = outcome.decision.chosen
        terms = chosen.terms
        data["provider"] = {"kind": as_label(outcome.managed.kind), "version": as_label(outcome.managed.version),
                            "launchMode": outcome.managed.launch_mode}
        data["placement"] = {
            "decisionId": outcome.decision.id,
            "chosen": {"candidateId": as_label(chosen.state.provider), "provider": as_label(chosen.state.provider),
                       "terms": {"queueWaitUs": _us(terms.queue_wait_s), "loadUs": _us(terms.load_s),
                                 "restoreUs": _us(terms.restore_s), "prefillUs": _us(terms.prefill_s),
                                 "ttftUs": _us(terms.total)}},
            "alternatives": len(outcome.decision.assessments) - 1,
        }
        result = outcome.result
        data["cache"] = {"tierHit": result.cache_tier, "cachedTokens": result.cached_tokens,
                         "evaluatedTokens": result.evaluated_tokens}
        data["timing"].update(startedAt=_utc(outcome.started), firstTokenAt=_utc(outcome.first_token),
                              finishedAt=_utc(outcome.finished), queuedAt=_utc(min(queued, outcome.started)))
        data["usage"] = {"promptTokens": result.prompt_tokens, "completionTokens": result.completion_tokens}
        data["outputDigest"] = text_digest(result.output)
    return data

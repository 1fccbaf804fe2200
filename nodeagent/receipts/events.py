"""Node events: the governance entries of the receipt log.

Besides execution receipts and key rotations the log holds *node events*:
activation decisions, storage receipts, provider starts and stops, wipes and
teardowns. They are signed by the machine key like every other entry and sit
in the same hash chain and Merkle tree, so `receipts verify` with the machine
key alone verifies them offline.

Statement (in-toto v1, RFC 8785)::

    _type          https://in-toto.io/Statement/v1
    subject        [{"name": "<event>:<name>", "digest": {"sha256": sha256(JCS(body))}}]
    predicateType  EVENT_PREDICATE_TYPE
    predicate      {"log": {seq, previousLeafHash}, "machine": {"keyId"}, "event": <type>,
                    "name": <what it is about>, "tenant": <tenant or null>,
                    "recordedAt": <RFC 3339 UTC>, "body": {...}}

The subject's digest binds the body: a verifier recomputes it from the body,
so the body can be cited (e.g. a storage receipt named by an activation
decision) by that digest. Like every predicate here, bodies hold integers
only, never floats (RFC 8785 would encode them, but not every verifier agrees
on their text).
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from nodeagent.receipts.canonical import canonical_json

EVENT_PREDICATE_TYPE = "https://agent-machine.dev/attestations/node-event/v1"

# One home for the event types a log may hold.
EVENT_TYPES = frozenset({
    "activation",       # an ActivationDecision (allowed or denied) for a pod or a provider start
    "storage",          # a StorageReceipt: where models, KV tiers, scratch and receipts live
    "provider-start",   # a provider the node started (after an allowed activation)
    "provider-stop",    # a provider the node stopped
    "wipe",             # a tenant's states and texts removed, listed by digest
    "teardown",         # every provider the node started stopped, units and containers removed
})

_MAX_SAFE = 2**53 - 1
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


def body_digest(body: dict[str, Any]) -> str:
    """Hex sha256 of the body's RFC 8785 bytes (the event's subject digest)."""
    return hashlib.sha256(canonical_json(body)).hexdigest()


def _integers_only(value: Any, where: str) -> str | None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return None
    if isinstance(value, int):
        return None if -_MAX_SAFE <= value <= _MAX_SAFE else f"{where}: integer out of range ±(2^53-1)"
    if isinstance(value, float):
        return f"{where}: floats are not allowed (use integers)"
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{where}: keys must be strings"
            found = _integers_only(item, f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _integers_only(item, f"{where}[{index}]")
            if found:
                return found
        return None
    return f"{where}: {type(value).__name__} is not a JSON value"


def build_event_statement(event: str, name: str, body: dict[str, Any], *, seq: int, previous: bytes | None,
                          key_id: str, recorded_at: str, tenant: str | None) -> dict[str, Any]:
    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": f"{event}:{name}", "digest": {"sha256": body_digest(body)}}],
        "predicateType": EVENT_PREDICATE_TYPE,
        "predicate": {
            "log": {"seq": seq, "previousLeafHash": previous.hex() if previous is not None else None},
            "machine": {"keyId": key_id},
            "event": event, "name": name, "tenant": tenant, "recordedAt": recorded_at, "body": body,
        },
    }
    problem = check_event_statement(statement)
    if problem:  # never sign a malformed entry
        raise ValueError(f"node event: {problem}")
    return statement


def check_event_statement(statement: dict[str, Any]) -> str | None:
    """None if ``statement`` is a well-formed node event, else what is wrong (naming the field)."""
    predicate = statement.get("predicate")
    if not isinstance(predicate, dict):
        return "predicate: missing or not an object"
    expected = {"log", "machine", "event", "name", "tenant", "recordedAt", "body"}
    if set(predicate) != expected:
        return f"predicate: fields must be {sorted(expected)}, got {sorted(predicate)}"
    log = predicate["log"]
    if not isinstance(log, dict) or set(log) != {"seq", "previousLeafHash"}:
        return "predicate.log: must hold seq and previousLeafHash"
    if not isinstance(log["seq"], int) or isinstance(log["seq"], bool) or not 0 <= log["seq"] <= _MAX_SAFE:
        return "predicate.log.seq: must be an integer >= 0"
    previous = log["previousLeafHash"]
    if (previous is None) != (log["seq"] == 0) or (previous is not None and not re.fullmatch(r"[0-9a-f]{64}", str(previous))):
        return "predicate.log.previousLeafHash: 64 lowercase hex digits (null only at seq 0)"
    machine = predicate["machine"]
    if not isinstance(machine, dict) or set(machine) != {"keyId"} or not re.fullmatch(r"[0-9a-f]{64}", str(machine["keyId"])):
        return "predicate.machine.keyId: must be 64 lowercase hex digits"
    if predicate["event"] not in EVENT_TYPES:
        return f"predicate.event: {predicate['event']!r} is not one of {sorted(EVENT_TYPES)}"
    if not isinstance(predicate["name"], str) or not 0 < len(predicate["name"]) <= 253:
        return "predicate.name: a string of 1..253 characters"
    if predicate["tenant"] is not None and not isinstance(predicate["tenant"], str):
        return "predicate.tenant: a string or null"
    if not isinstance(predicate["recordedAt"], str) or not _TIME.fullmatch(predicate["recordedAt"]):
        return "predicate.recordedAt: RFC 3339 UTC with six fractional digits"
    body = predicate["body"]
    if not isinstance(body, dict):
        return "predicate.body: must be an object"
    found = _integers_only(body, "predicate.body")
    if found:
        return found
    subject = statement.get("subject")
    if (not isinstance(subject, list) or len(subject) != 1 or not isinstance(subject[0], dict)
            or subject[0].get("name") != f"{predicate['event']}:{predicate['name']}"
            or subject[0].get("digest") != {"sha256": body_digest(body)}):
        return "subject: must be one subject <event>:<name> whose sha256 is the digest of predicate.body"
    return None


__all__ = ["EVENT_PREDICATE_TYPE", "EVENT_TYPES", "body_digest", "build_event_statement", "check_event_statement"]

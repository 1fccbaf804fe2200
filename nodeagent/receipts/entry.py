"""One log entry: building its line, and checking a line on its own.

A log line is a DSSE envelope (canonical JSON, one line) whose payload is an
in-toto Statement v1 in RFC 8785 canonical JSON. Two statement kinds exist:

* execution receipts (`EXECUTION_PREDICATE_TYPE`), signed by the active key;
* key rotations (`KEY_ROTATION_PREDICATE_TYPE`), signed by the outgoing and
  the incoming key.

`inspect_line` runs every check that needs nothing but the line and a set of
trusted keys, in an order that never interprets unauthenticated bytes:
envelope shape → payload type → signature over the exact payload bytes →
statement and predicate schema → subjects → key ids. Checks that need the
neighbours (sequence, previous hash, which key is active) live in
`nodeagent.receipts.verify.ChainChecker`.

Payloads are decoded with `load_json`: pydantic-core's JSON parser, about
twice as fast as ``json`` on a receipt, with ``json.loads`` deciding whenever
it refuses (the two agree on every document the first accepts: a property
test). Statements are then validated from the decoded dict — not with
pydantic's JSON mode, which quietly ignores a key given both by wire name and
by Python name where the dict path refuses it — first by
`nodeagent.receipts.fastcheck` (a conservative check that only ever says
"certainly valid"), and by the contract's pydantic model whenever it does not.
"""

from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from pydantic import ValidationError
from pydantic_core import from_json

from nodeagent.contracts.receipt import (
    EXECUTION_PREDICATE_TYPE,
    INTOTO_PAYLOAD_TYPE,
    KEY_ROTATION_PREDICATE_TYPE,
    STATEMENT_TYPE,
    ExecutionStatement,
    KeyRotationStatement,
    ReceiptInput,
    rfc3339_utc,
)
from nodeagent.receipts import fastcheck
from nodeagent.receipts.canonical import canonical_json
from nodeagent.receipts.dsse import Envelope, EnvelopeError, parse_envelope, sign_envelope
from nodeagent.receipts.errors import ReceiptError
from nodeagent.receipts.events import EVENT_PREDICATE_TYPE, build_event_statement, check_event_statement
from nodeagent.receipts.keys import PublicKey, Signer
from nodeagent.receipts.merkle import leaf_hash

KIND_EXECUTION = "execution"
KIND_ROTATION = "key-rotation"
KIND_EVENT = "event"  # node events: activation, storage, provider start/stop, wipe, teardown (receipts.events)


# ------------------------------------------------------------------ building
def _subject(name: str, digest: str) -> dict[str, Any]:
    return {"name": name, "digest": {"sha256": digest.removeprefix("sha256:")}}


def build_execution_line(receipt: ReceiptInput, *, seq: int, previous: bytes | None, signer: Signer) -> bytes:
    """The signed line for ``receipt`` at position ``seq`` after the leaf ``previous``."""
    predicate = receipt.to_wire()
    output_digest = predicate.pop("outputDigest")
    predicate["machine"]["keyId"] = signer.key_id
    predicate["log"] = {"seq": seq, "previousLeafHash": previous.hex() if previous is not None else None}
    subjects = [_subject("request", receipt.pod.request_digest)]
    if output_digest is not None:
        subjects.append(_subject("output", output_digest))
    statement = {"_type": STATEMENT_TYPE, "subject": subjects,
                 "predicateType": EXECUTION_PREDICATE_TYPE, "predicate": predicate}
    return sign_envelope(canonical_json(statement), INTOTO_PAYLOAD_TYPE, [signer])


def build_rotation_line(old: Signer, new: Signer, *, seq: int, previous: bytes | None,
                        rotated_at: Any, reason: str | None = None) -> bytes:
    """A key-rotation entry handing signing from ``old`` to ``new``, signed by both."""
    predicate = {
        "log": {"seq": seq, "previousLeafHash": previous.hex() if previous is not None else None},
        "previousKey": {"keyId": old.key_id, "publicKey": old.public.b64_der},
        "newKey": {"keyId": new.key_id, "publicKey": new.public.b64_der},
        "rotatedAt": rfc3339_utc(rotated_at),
        "reason": reason,
    }
    statement = {"_type": STATEMENT_TYPE, "subject": [{"name": f"key:{new.key_id}", "digest": {"sha256": new.key_id}}],
                 "predicateType": KEY_ROTATION_PREDICATE_TYPE, "predicate": predicate}
    # Validate what we are about to sign, so a bug here can never log a malformed entry.
    KeyRotationStatement.model_validate(statement)
    return sign_envelope(canonical_json(statement), INTOTO_PAYLOAD_TYPE, [old, new])


def build_event_line(event: str, name: str, body: dict[str, Any], *, seq: int, previous: bytes | None,
                     signer: Signer, recorded_at: Any, tenant: str | None = None) -> bytes:
    """A node event (`nodeagent.receipts.events`) at ``seq``, signed by the active key."""
    statement = build_event_statement(event, name, body, seq=seq, previous=previous, key_id=signer.key_id,
                                      recorded_at=rfc3339_utc(recorded_at), tenant=tenant)
    return sign_envelope(canonical_json(statement), INTOTO_PAYLOAD_TYPE, [signer])


# ------------------------------------------------------------------ checking
@dataclass
class EntryFacts:
    """What one line says, and which of its own checks failed.

    ``signers`` holds the trusted key ids whose signature verified. Claimed
    values (``seq``, ``previous``…) are only set once the signature verified.
    """

    leaf_hash: bytes
    claimed_keyids: tuple[str, ...] = ()
    signers: tuple[str, ...] = ()
    kind: str | None = None
    seq: int | None = None
    previous: str | None = None
    key_id: str | None = None  # machine.keyId of an execution receipt
    run_id: str | None = None  # predicate.pod.runId of an execution receipt
    rotation: tuple[PublicKey, PublicKey] | None = None  # (previous key, new key)
    payload: bytes | None = None  # the signed statement bytes, once known to be an in-toto Statement
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def __reduce__(self) -> tuple:
        # Parallel verification sends one per entry between processes: a plain tuple
        # of the fields pickles about three times faster than the default reduction.
        return (EntryFacts, _fact_values(self))

    @property
    def statement(self) -> dict[str, Any] | None:
        """The decoded statement (decoded again on demand: kept as bytes, it is cheap to send between processes)."""
        return load_json(self.payload) if self.payload is not None else None

    def summary(self) -> dict[str, Any]:
        """Columns for the index and for `receipts ls`."""
        out: dict[str, Any] = {"kind": self.kind, "key_id": (self.signers or self.claimed_keyids or ("",))[0]}
        predicate = (self.statement or {}).get("predicate") or {}
        if self.kind == KIND_EXECUTION:
            pod = predicate.get("pod", {})
            out.update(run_id=pod.get("runId"), pod=pod.get("name"), tenant=pod.get("tenant"),
                       model=predicate.get("model", {}).get("name"),
                       status=predicate.get("outcome", {}).get("status"),
                       finished_at=predicate.get("timing", {}).get("finishedAt"))
        elif self.kind == KIND_ROTATION:
            out.update(run_id=None, pod=None, tenant=None, model=None, status="rotated",
                       finished_at=predicate.get("rotatedAt"))
        elif self.kind == KIND_EVENT:
            out.update(run_id=None, pod=predicate.get("name"), tenant=predicate.get("tenant"), model=None,
                       status=predicate.get("event"), finished_at=predicate.get("recordedAt"))
        return out


_fact_values = operator.attrgetter(*(f.name for f in fields(EntryFacts)))


def _field_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(root)"
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


def inspect_line(line: bytes, keys: Mapping[str, PublicKey]) -> EntryFacts:
    """Every check on ``line`` that needs no other entry. Never raises on bad input."""
    facts = EntryFacts(leaf_hash=leaf_hash(line))
    try:
        envelope = parse_envelope(line)
    except EnvelopeError as exc:
        facts.failures.append((exc.check, exc.detail))
        return facts
    facts.claimed_keyids = envelope.keyids
    if envelope.payload_type != INTOTO_PAYLOAD_TYPE:
        facts.failures.append(("payload-type", f"payloadType is {envelope.payload_type!r}, expected {INTOTO_PAYLOAD_TYPE!r}"))
        return facts
    signers = envelope.verified_keyids(keys)
    if not signers:
        known = [k for k in envelope.keyids if k in keys]
        if known:
            detail = f"signature by key {known[0][:16]}… does not verify over the payload"
        else:
            detail = f"signed by key(s) {', '.join(k[:16] + '…' for k in envelope.keyids)}, none of them trusted"
        facts.failures.append(("signature", detail))
        return facts
    facts.signers = tuple(signers)

    # Authenticated from here on: the payload may be parsed.
    check_statement(facts, envelope)
    return facts


def load_json(data: bytes) -> Any:
    """``json.loads(data)``, faster: pydantic-core's parser first, ``json`` for what it refuses.

    On every input the first accepts, both give the same value (pydantic-core
    refuses some inputs ``json`` takes: a UTF-8 BOM, lone surrogate escapes).
    """
    try:
        return from_json(data)
    except ValueError:
        return json.loads(data)


def check_statement(facts: EntryFacts, envelope: Envelope) -> None:
    """The statement checks on an authenticated ``envelope``: names what is wrong."""
    try:
        statement = load_json(envelope.payload)
    except (ValueError, UnicodeDecodeError) as exc:
        facts.failures.append(("statement", f"payload is not JSON: {exc}"))
        return
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        facts.failures.append(("statement", f"payload is not an in-toto Statement v1 (_type {STATEMENT_TYPE})"))
        return
    facts.payload = envelope.payload
    predicate_type = statement.get("predicateType")
    if predicate_type == EXECUTION_PREDICATE_TYPE:
        _check_execution(facts, statement)
    elif predicate_type == KEY_ROTATION_PREDICATE_TYPE:
        _check_rotation(facts, statement, envelope)
    elif predicate_type == EVENT_PREDICATE_TYPE:
        _check_event(facts, statement)
    else:
        facts.failures.append(("statement", f"unknown predicateType {predicate_type!r}"))


def _check_execution(facts: EntryFacts, statement: dict[str, Any]) -> None:
    facts.kind = KIND_EXECUTION
    if fastcheck.accepts(statement):  # valid for sure: read the claims straight from the dict
        predicate = statement["predicate"]
        log, pod = predicate["log"], predicate["pod"]
        facts.seq, facts.previous = log["seq"], log["previousLeafHash"]
        facts.key_id, facts.run_id = predicate["machine"]["keyId"], pod["runId"]
        subjects = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
        request_digest = pod["requestDigest"]
    else:  # pydantic decides, and names what is wrong
        try:
            parsed = ExecutionStatement.model_validate(statement)
        except ValidationError as exc:
            facts.failures.append(("statement", _field_error(exc)))
            return
        facts.seq, facts.previous = parsed.predicate.log.seq, parsed.predicate.log.previous_leaf_hash
        facts.key_id, facts.run_id = parsed.predicate.machine.key_id, parsed.predicate.pod.run_id
        subjects = {s.name: s.digest.sha256 for s in parsed.subject}
        request_digest = parsed.predicate.pod.request_digest
    if subjects.get("request") != request_digest.removeprefix("sha256:") or set(subjects) - {"request", "output"}:
        facts.failures.append(("subject", "subjects must be `request` (= predicate.pod.requestDigest) and optionally `output`"))
    if facts.key_id not in facts.signers:
        facts.failures.append(("key-id", f"predicate.machine.keyId {facts.key_id[:16]}… is not the key that signed"))


def _check_event(facts: EntryFacts, statement: dict[str, Any]) -> None:
    facts.kind = KIND_EVENT
    problem = check_event_statement(statement)
    if problem:
        facts.failures.append(("subject" if problem.startswith("subject") else "statement", problem))
        return
    predicate = statement["predicate"]
    facts.seq, facts.previous = predicate["log"]["seq"], predicate["log"]["previousLeafHash"]
    facts.key_id = predicate["machine"]["keyId"]
    if facts.key_id not in facts.signers:
        facts.failures.append(("key-id", f"predicate.machine.keyId {facts.key_id[:16]}… is not the key that signed"))


def _check_rotation(facts: EntryFacts, statement: dict[str, Any], envelope: Envelope) -> None:
    facts.kind = KIND_ROTATION
    try:
        parsed = KeyRotationStatement.model_validate(statement)
    except ValidationError as exc:
        facts.failures.append(("statement", _field_error(exc)))
        return
    predicate = parsed.predicate
    facts.seq = predicate.log.seq
    facts.previous = predicate.log.previous_leaf_hash
    try:
        old = PublicKey.from_b64_der(predicate.previous_key.public_key)
        new = PublicKey.from_b64_der(predicate.new_key.public_key)
    except ReceiptError as exc:
        facts.failures.append(("rotation", str(exc)))
        return
    if old.key_id != predicate.previous_key.key_id or new.key_id != predicate.new_key.key_id:
        facts.failures.append(("rotation", "a key id does not match sha256 of its public key"))
        return
    if parsed.subject[0].digest.sha256 != new.key_id:
        facts.failures.append(("subject", "rotation subject must be the new key id"))
    both = envelope.verified_keyids({old.key_id: old, new.key_id: new})
    if set(both) != {old.key_id, new.key_id}:
        facts.failures.append(("rotation", "a rotation must carry valid signatures by both the previous and the new key"))
        return
    facts.rotation = (old, new)

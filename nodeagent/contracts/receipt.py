"""`ExecutionReceipt`: the signed record of one pod run, and its parts.

A receipt is an in-toto Statement v1 whose predicate is `ExecutionPredicate`,
serialized as RFC 8785 canonical JSON and wrapped in a DSSE envelope signed
with the machine's Ed25519 key (see docs/receipts.md and
`nodeagent.receipts`). This module holds only the wire shapes.

Wire rules (checked here, so a receipt that breaks them cannot be built):

* integers only, ``0 <= n <= 2**53 - 1`` (exact in every JSON parser), never
  floats or booleans; durations are integer microseconds (``...Us``);
* times are RFC 3339 UTC strings with microseconds, ``2025-01-02T03:04:05.000006Z``
  (aware ``datetime`` values are accepted and normalized; naive ones are an error);
* digests are ``sha256:<64 lowercase hex>``; key ids are 64 lowercase hex
  (sha256 of the DER SubjectPublicKeyInfo).

`ReceiptInput` is what the pod executor supplies. The log adds what only it
knows — the log position (seq, previous leaf hash) and the signing key id —
and turns it into an `ExecutionPredicate`, so a caller cannot get those wrong.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from nodeagent.contracts.base import Contract, Resource
from nodeagent.contracts.names import LABEL_PATTERN

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
EXECUTION_PREDICATE_TYPE = "https://agent-machine.dev/attestations/execution-receipt/v1"
KEY_ROTATION_PREDICATE_TYPE = "https://agent-machine.dev/attestations/key-rotation/v1"

MAX_SAFE_INTEGER = 2**53 - 1
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"
HEX64_PATTERN = r"^[0-9a-f]{64}$"

Count = Annotated[int, Field(strict=True, ge=0, le=MAX_SAFE_INTEGER)]
Digest = Annotated[str, Field(pattern=DIGEST_PATTERN)]
Hex64 = Annotated[str, Field(pattern=HEX64_PATTERN)]
# Names are recorded, not policed: printable and bounded; writers pass names
# through `contracts.names.as_label`, so a pod that ran never loses its receipt.
Label = Annotated[str, Field(pattern=LABEL_PATTERN)]


def rfc3339_utc(moment: datetime) -> str:
    """``2025-01-02T03:04:05.000006Z``: UTC, always six fractional digits."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("time must be timezone-aware (UTC); got a naive datetime")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_CANONICAL_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


def _normalize_time(value: Any) -> Any:
    if isinstance(value, datetime):
        return rfc3339_utc(value)
    if isinstance(value, str) and _CANONICAL_TIME.fullmatch(value):
        datetime.fromisoformat(value[:-1])  # already canonical; only check it names a real instant
        return value
    if isinstance(value, str):
        if not value.endswith(("Z", "z", "+00:00")):
            raise ValueError(f"time must be RFC 3339 in UTC ending in 'Z', got {value!r}")
        try:
            parsed = datetime.fromisoformat(value[:-1] + "+00:00" if value[-1] in "Zz" else value)
        except ValueError:
            raise ValueError(f"not an RFC 3339 time: {value!r}") from None
        return rfc3339_utc(parsed)
    raise ValueError(f"time must be an RFC 3339 UTC string or an aware datetime, got {type(value).__name__}")


UtcTime = Annotated[
    str,
    BeforeValidator(_normalize_time),
    Field(pattern=r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$", examples=["2025-01-02T03:04:05.000006Z"]),
]


# ------------------------------------------------------------------ parts
class LogPosition(Contract):
    """Where the entry sits in this machine's log; filled by the log, never by callers."""

    seq: Count
    previous_leaf_hash: Hex64 | None = Field(
        description="RFC 6962 leaf hash (hex) of entry seq-1; null only for seq 0"
    )

    @model_validator(mode="after")
    def _genesis(self) -> "LogPosition":
        if (self.seq == 0) != (self.previous_leaf_hash is None):
            raise ValueError("previousLeafHash must be null for seq 0 and set for every later entry")
        return self


def _agent_version() -> str:
    from nodeagent import __version__

    return __version__


class MachineInput(Contract):
    identity_hash: str = Field(pattern=r"^(sha256:)?[0-9a-f]{64}$", description="hash of the machine identity")
    host: Label
    agent_version: Label = Field(default_factory=_agent_version, description="defaults to this agent's version")
    profile_digest: str = Field(pattern=r"^(sha256:)?[0-9a-f]{64}$", description="digest of the MachineProfile in force")


class MachineRef(MachineInput):
    key_id: Hex64 = Field(description="id of the key that signed this receipt (filled by the log)")


class PodRef(Contract):
    name: Label
    run_id: Label
    tenant: Label
    agent: Label
    session: Label | None = None
    request_digest: Digest = Field(description="sha256 of the canonical request; also a statement subject")


class ModelInfo(Contract):
    name: Label
    digest: Digest | None = Field(default=None, description="sha256 of the model file; null if never resolved")


LaunchMode = Literal["embedded", "subprocess", "podman", "quadlet", "kube", "attach"]
CONTAINER_LAUNCH_MODES = frozenset({"podman", "quadlet", "kube"})


class ProviderInfo(Contract):
    kind: Label = Field(description="adapter kind, e.g. llama_cpp_python, llama_server, vllm")
    version: Label
    launch_mode: LaunchMode
    image_digest: Digest | None = Field(default=None, description="container image digest (container launch modes only)")

    @model_validator(mode="after")
    def _image_only_in_containers(self) -> "ProviderInfo":
        if self.image_digest is not None and self.launch_mode not in CONTAINER_LAUNCH_MODES:
            raise ValueError(f"imageDigest is only meaningful for container launch modes, not {self.launch_mode!r}")
        return self


class CostTerms(Contract):
    """The placement cost model's terms for one candidate, integer microseconds."""

    queue_wait_us: Count
    load_us: Count
    restore_us: Count
    prefill_us: Count
    ttft_us: Count = Field(description="the estimate the candidate was ranked by")


class PlacementCandidate(Contract):
    candidate_id: Label
    provider: Label
    device: Label | None = None
    terms: CostTerms


class PlacementInfo(Contract):
    decision_id: Label
    chosen: PlacementCandidate
    alternatives: Count = Field(description="number of other candidates considered")


class CacheUse(Contract):
    tier_hit: Literal["T0", "T1", "T2", "none"] = "none"
    cached_tokens: Count = 0
    evaluated_tokens: Count = 0


class Timing(Contract):
    """When the pod was queued, started, produced its first token, finished."""

    queued_at: UtcTime
    started_at: UtcTime | None = None  # null: never started (refused, cancelled while queued)
    first_token_at: UtcTime | None = None
    finished_at: UtcTime

    @model_validator(mode="after")
    def _ordered(self) -> "Timing":
        # Fixed-width UTC strings compare like the instants they name.
        steps = [("queuedAt", self.queued_at), ("startedAt", self.started_at),
                 ("firstTokenAt", self.first_token_at), ("finishedAt", self.finished_at)]
        present = [(name, value) for name, value in steps if value is not None]
        for (a, va), (b, vb) in zip(present, present[1:]):
            if vb < va:
                raise ValueError(f"{b} ({vb}) is before {a} ({va})")
        if self.first_token_at is not None and self.started_at is None:
            raise ValueError("firstTokenAt set without startedAt")
        return self


class Usage(Contract):
    prompt_tokens: Count = 0
    completion_tokens: Count = 0


class Outcome(Contract):
    status: Literal["succeeded", "failed", "cancelled", "refused"]
    error_class: Label | None = Field(default=None, description="e.g. ProviderCrashed, PolicyRefused; null on success")

    @model_validator(mode="after")
    def _error_class(self) -> "Outcome":
        if self.status == "succeeded" and self.error_class is not None:
            raise ValueError("errorClass must be null when status is succeeded")
        if self.status in ("failed", "refused") and self.error_class is None:
            raise ValueError(f"errorClass is required when status is {self.status}")
        return self


class PolicyInfo(Contract):
    """The admission verdict the run was decided under (see `PolicyDecision`)."""

    source: Label = Field(description="the policy file, or the built-in allow-all when none is configured")
    digest: Digest | None = Field(default=None, description="sha256 of the policy file's bytes")
    verdict: Literal["allowed", "refused"]
    reasons: list[Label] = Field(default_factory=list, max_length=16)


def _check_run_consistency(outcome: Outcome, provider: ProviderInfo | None, timing: Timing) -> None:
    if outcome.status == "succeeded":
        if provider is None:
            raise ValueError("a succeeded run needs `provider`")
        if timing.started_at is None:
            raise ValueError("a succeeded run needs timing.startedAt")


class _RunRecord(Contract):
    pod: PodRef
    model: ModelInfo
    provider: ProviderInfo | None = None  # null: no provider was involved (refused before placement)
    placement: PlacementInfo | None = None
    cache: CacheUse = Field(default_factory=CacheUse)
    timing: Timing
    usage: Usage = Field(default_factory=Usage)
    outcome: Outcome
    policy: PolicyInfo | None = None  # absent in receipts written before policies were recorded


# ------------------------------------------------------------------ caller input
class ReceiptInput(_RunRecord):
    """What the pod executor hands to `ReceiptLog.append`.

    ``output_digest`` (sha256 of the produced output) becomes the second
    statement subject; it is required for a succeeded run.
    """

    machine: MachineInput
    output_digest: Digest | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "ReceiptInput":
        _check_run_consistency(self.outcome, self.provider, self.timing)
        if self.outcome.status == "succeeded" and self.output_digest is None:
            raise ValueError("a succeeded run needs `outputDigest`")
        return self


# ------------------------------------------------------------------ predicates
class ExecutionPredicate(_RunRecord):
    """The predicate of an execution receipt (predicateType `EXECUTION_PREDICATE_TYPE`)."""

    log: LogPosition
    machine: MachineRef

    @model_validator(mode="after")
    def _consistent(self) -> "ExecutionPredicate":
        _check_run_consistency(self.outcome, self.provider, self.timing)
        return self


class PublicKeyRef(Contract):
    key_id: Hex64
    public_key: str = Field(description="standard base64 of the DER SubjectPublicKeyInfo (Ed25519)")


class KeyRotationPredicate(Contract):
    """A log entry that hands signing over from one key to the next.

    Signed by both keys (proof of possession of the new one, authority of the
    old one). Entries after it must be signed by ``newKey``; entries before it
    stay verifiable with ``previousKey``.
    """

    log: LogPosition
    previous_key: PublicKeyRef
    new_key: PublicKeyRef
    rotated_at: UtcTime
    reason: Label | None = None

    @model_validator(mode="after")
    def _distinct(self) -> "KeyRotationPredicate":
        if self.previous_key.key_id == self.new_key.key_id:
            raise ValueError("newKey must differ from previousKey")
        return self


# ------------------------------------------------------------------ statement, envelope
class SubjectDigest(Contract):
    sha256: Hex64


class Subject(Contract):
    name: Label
    digest: SubjectDigest


class ExecutionStatement(Contract):
    type_: Literal["https://in-toto.io/Statement/v1"] = Field(default=STATEMENT_TYPE, alias="_type")
    subject: list[Subject] = Field(min_length=1, max_length=2)
    predicate_type: Literal["https://agent-machine.dev/attestations/execution-receipt/v1"] = EXECUTION_PREDICATE_TYPE
    predicate: ExecutionPredicate


class KeyRotationStatement(Contract):
    type_: Literal["https://in-toto.io/Statement/v1"] = Field(default=STATEMENT_TYPE, alias="_type")
    subject: list[Subject] = Field(min_length=1, max_length=1)
    predicate_type: Literal["https://agent-machine.dev/attestations/key-rotation/v1"] = KEY_ROTATION_PREDICATE_TYPE
    predicate: KeyRotationPredicate


class DsseSignature(Contract):
    keyid: str
    sig: str


class DsseEnvelope(Contract):
    payload: str = Field(description="base64 of the exact signed bytes (the canonical statement)")
    payload_type: str
    signatures: list[DsseSignature] = Field(min_length=1)


# ------------------------------------------------------------------ resources
class ExecutionReceipt(Resource):
    """One receipt as served by `receipts show` and the API: the envelope as
    logged plus its decoded statement, for reading. Verify the envelope, not
    the decoded copy."""

    kind: Literal["ExecutionReceipt"] = "ExecutionReceipt"
    seq: Count
    receipt_id: Hex64 = Field(description="RFC 6962 leaf hash of the log line (hex): the receipt's id")
    envelope: DsseEnvelope
    statement: ExecutionStatement


class LogEntry(Resource):
    """Any other entry of the receipt log as served by `receipts show` and the API:
    a key rotation, or a node event (activation, storage, provider start or stop,
    wipe, teardown; `nodeagent.receipts.events`). The statement is decoded for
    reading; its predicate type names which. Verify the envelope, not the copy."""

    kind: Literal["LogEntry"] = "LogEntry"
    seq: Count
    receipt_id: Hex64 = Field(description="RFC 6962 leaf hash of the log line (hex)")
    entry: Literal["key-rotation", "event"] = Field(description="what the entry records")
    envelope: DsseEnvelope
    statement: dict[str, Any] = Field(description="the decoded in-toto statement")


class ProofEntry(Contract):
    seq: Count
    line: str = Field(description="the exact log line (a DSSE envelope in canonical JSON)")
    inclusion_proof: list[Hex64]


class ReceiptProof(Resource):
    """A self-contained, offline-verifiable proof that one receipt is in the log.

    ``entry`` is included in the tree of ``checkpoint`` (a signed note, see
    docs/receipts.md); ``keyChain`` holds the key-rotation entries (with their
    own inclusion proofs) linking the receipt's signing key to the
    checkpoint's, so one trusted key of the chain is enough.
    """

    kind: Literal["ReceiptProof"] = "ReceiptProof"
    origin: Label
    tree_size: Count
    entry: ProofEntry
    checkpoint: str
    key_chain: list[ProofEntry] = Field(default_factory=list)
    public_keys: list[PublicKeyRef] = Field(default_factory=list)

"""`AgentPod`: the schedulable envelope of an agent session.

A pod names the model it wants, the context segments that form its prompt
prefix *in order* (system, tools, memory, retrieval, history), and the turns to
run. Each turn appends its messages and the model's reply to the context, so
turn k+1's prompt extends turn k's: the cache saved after turn k serves turn
k+1, and a later pod of the same agent with the same segments starts warm.

Validation is strict: unknown fields, empty pods, a segment with neither text
nor digest, or a digest that does not match its text are errors that name the
field.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from nodeagent.contracts.base import MAX_SAFE_INTEGER, Contract, Input, Resource, any_of_present, one_of_present
from nodeagent.contracts.policy import PolicyDecision
from nodeagent.contracts.names import DIGEST as DIGEST_RE
from nodeagent.contracts.names import MAX_MODEL_REFERENCE, MODEL_REFERENCE, PROVIDER_NAME
from nodeagent.contracts.names import RESOURCE_NAME as NAME_RE


def text_digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


class CacheScope(str, Enum):
    """Who may reuse the KV cache built from a segment.

    private: this tenant's same agent only; tenant: any agent of the tenant;
    public: anyone (e.g. a shared tool catalogue). A prefix is only as shared
    as its most private segment so far.
    """

    private = "private"
    tenant = "tenant"
    public = "public"


SCOPE_ORDER = {CacheScope.public: 0, CacheScope.tenant: 1, CacheScope.private: 2}


class ContextSegment(Input):
    # Exactly one of text and digest, and the schema says so: a digest beside its
    # text said nothing the node does not compute, and the schema cannot state
    # that the two must agree.
    model_config = ConfigDict(json_schema_extra=one_of_present("text", "digest"))

    role: Literal["system", "tools", "memory", "retrieval", "history"]
    text: str | None = None
    # sha256 of the UTF-8 text. Alone, it refers to a segment this node has
    # seen before (planners need not resend large tool schemas).
    digest: str | None = Field(default=None, pattern=DIGEST_RE)
    scope: CacheScope = CacheScope.private

    @model_validator(mode="after")
    def _text_or_digest(self, info: ValidationInfo) -> "ContextSegment":
        if self.text is None and self.digest is None:
            raise ValueError("a context segment needs `text` or `digest`")
        if self.text is not None and self.digest is not None:
            # Older agents took both when they agreed; such a stored pod still loads.
            if info.context != STORED:
                raise ValueError("a context segment has `text` or `digest`, not both (the node computes the "
                                 "digest of a text; send the digest alone to reuse a segment it has)")
            if text_digest(self.text) != self.digest:
                raise ValueError("`digest` does not match sha256 of `text`")
        return self


class FunctionCall(Input):
    name: str = Field(min_length=1, max_length=128)
    arguments: str = Field(default="{}", max_length=65536, description="JSON text, as OpenAI sends it")


class ToolCall(Input):
    id: str = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(Input):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = Field(default=None, max_length=8192)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolDefinition(Input):
    """A tool the model may call (OpenAI's shape); the chat template renders the list."""

    type: Literal["function"] = "function"
    function: FunctionDefinition


class Message(Input):
    role: Literal["user", "assistant", "tool"]
    content: str = ""
    tool_calls: list[ToolCall] | None = None  # an assistant message that called tools
    tool_call_id: str | None = Field(default=None, max_length=128)  # the call a tool message answers
    name: str | None = Field(default=None, max_length=128)

    def template_dict(self) -> dict[str, Any]:
        """As chat templates expect it: tool-call arguments as objects (transformers' convention)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            out["name"] = self.name
        return out


def _json_or_text(text: str) -> Any:
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


class Sampling(Input):
    """How the answer is drawn (llama.cpp's sampler chain; OpenAI's names where it has them).

    A pod without sampling is greedy (temperature 0): reproducible, and the same
    prompt gives the same answer on every provider.
    """

    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, le=1000, description="0: off")
    min_p: float = Field(default=0.0, ge=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(default_factory=list, max_length=4)
    repeat_penalty: float = Field(default=1.0, gt=0, le=2)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]] = \
        Field(default_factory=dict, max_length=1024, description="token id -> bias added to its logit",
              json_schema_extra={"propertyNames": {"pattern": r"^[0-9]{1,9}$"}})  # patternProperties allows any key
    grammar: str | None = Field(default=None, max_length=65536,
                                description="GBNF the answer must match (llama.cpp providers)")


class Turn(Input):
    """Messages appended before the model answers; the answer is appended after.

    ``prompt`` instead of messages is a plain text completion (OpenAI's
    ``/v1/completions``): the text is the whole prompt, no chat template; such
    a pod has that one turn and no context segments.
    """

    # Exactly one of them, and the schema says so (a schema-valid turn with both, or neither, was a 422).
    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["messages"], "properties": {"messages": {"minItems": 1}}},
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}}]})

    messages: list[Message] = Field(default_factory=list, max_length=1024)
    prompt: str | None = Field(default=None, min_length=1, max_length=1 << 20)
    max_tokens: int = Field(default=128, ge=1, le=32768)
    sampling: Sampling | None = None  # None: greedy

    @model_validator(mode="after")
    def _messages_or_prompt(self) -> "Turn":
        if (self.prompt is None) == (not self.messages):
            raise ValueError("a turn needs `messages` (a chat turn) or `prompt` (a text completion), not both")
        return self


STORED = "stored"  # validation context of documents the node itself stored
POD_ID = r"^[0-9a-f]{8,64}$"


def checked_name(value: str | None, pattern: str, what: str, info: ValidationInfo,
                 max_length: int = 253) -> str | None:
    """Check a name rule that older agents did not enforce.

    New pods must match (the error names the rule); a pod this node stored
    before the rule existed still loads (``context=STORED``), so a restart
    can end it with a receipt instead of failing to start.
    """
    if value is None or (info.context == STORED):
        return value
    if len(value) > max_length:
        raise ValueError(f"a {what} has at most {max_length} characters; this one has {len(value)}")
    if not re.fullmatch(pattern, value):
        raise ValueError(f"{value[:80]!r} is not a valid {what} (pattern {pattern})")
    return value


class ModelRef(Input):
    model_config = ConfigDict(json_schema_extra=any_of_present("name", "digest"))

    # NAME[:TAG], sha256:<hex prefix> or a hex prefix (see contracts.names)
    name: str | None = Field(default=None, json_schema_extra={"pattern": MODEL_REFERENCE,
                                                              "maxLength": MAX_MODEL_REFERENCE})
    digest: str | None = Field(default=None, pattern=DIGEST_RE)
    min_context: int = Field(default=0, ge=0, le=MAX_SAFE_INTEGER)

    @field_validator("name")
    @classmethod
    def _name_rule(cls, value: str | None, info: ValidationInfo) -> str | None:
        return checked_name(value, MODEL_REFERENCE, "model reference (NAME[:TAG] or sha256:<hex>)", info,
                            MAX_MODEL_REFERENCE)

    @model_validator(mode="after")
    def _name_or_digest(self) -> "ModelRef":
        if not self.name and not self.digest:
            raise ValueError("model needs `name` or `digest`")
        return self


class Resources(Input):
    accelerator: Literal["any", "cpu", "gpu"] = "any"
    memory_bytes: int | None = Field(default=None, ge=0, le=MAX_SAFE_INTEGER)


# An instant as RFC 3339 writes it (the schema's `format: date-time`): seconds and a UTC offset required.
DATE_TIME = r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$"
# At most six digits: 999999h (114 years) still fits the residency's clocks; an
# unbounded number overflowed them and broke every later model listing.
KEEP_ALIVE = r"^(-1|0|\d{1,6}(\.\d+)?(ms|s|m|h)?)$"


class PodPolicy(Input):
    cache_reuse: bool = True  # false: never restore or save cache for this pod
    deadline: datetime | None = None  # refuse to start after this instant
    # How long the model stays loaded once this pod's turn ends, as Ollama's
    # keep_alive: "5m", "90s", "1h", "0" (unload when idle), "-1" (forever).
    # None: the model's own (or the node's default) keep-alive.
    keep_alive: str | None = Field(default=None, json_schema_extra={"pattern": KEEP_ALIVE})

    @field_validator("deadline", mode="before")
    @classmethod
    def _deadline_is_a_date_time(cls, value: object, info: ValidationInfo) -> object:
        # Left to itself pydantic also reads 12345, "12345" or "2030-01-01" as an instant.
        if value is None or isinstance(value, datetime) or info.context == STORED:
            return value
        if isinstance(value, str) and re.fullmatch(DATE_TIME, value):
            return value
        raise ValueError("must be an RFC 3339 date-time with its UTC offset, such as 2030-01-01T12:00:00Z")

    @field_validator("keep_alive")
    @classmethod
    def _keep_alive_rule(cls, value: str | None, info: ValidationInfo) -> str | None:
        return checked_name(value, KEEP_ALIVE, "keep-alive (-1, 0, or up to six digits with ms, s, m or h)",
                            info, 16)


class PodMetadata(Input):
    name: str = Field(pattern=NAME_RE)
    tenant: str = Field(pattern=NAME_RE)
    agent: str = Field(pattern=NAME_RE)
    session: str = Field(default="default", pattern=NAME_RE)
    labels: dict[str, str] = Field(default_factory=dict)


class AgentPodSpec(Input):
    # A text-completion turn stands alone (the validator below), and the schema says so.
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["turns"], "properties": {"turns": {"contains": {
            "required": ["prompt"], "properties": {"prompt": {"type": "string"}}}}}},
        "then": {"properties": {"turns": {"maxItems": 1}, "context": {"maxItems": 0},
                                "tools": {"anyOf": [{"type": "null"}, {"maxItems": 0}]}}}})

    model: ModelRef
    context: list[ContextSegment] = Field(default_factory=list)
    turns: list[Turn] = Field(min_length=1, max_length=256)
    # Tools the model may call, rendered by its chat template (OpenAI's function shape).
    tools: list[ToolDefinition] | None = Field(default=None, max_length=128)
    resources: Resources = Field(default_factory=Resources)
    policy: PodPolicy = Field(default_factory=PodPolicy)
    # pin to one provider by name (optional)
    provider: str | None = Field(default=None, json_schema_extra={"pattern": PROVIDER_NAME, "maxLength": 128})

    @model_validator(mode="after")
    def _text_completion_alone(self) -> "AgentPodSpec":
        if any(t.prompt is not None for t in self.turns) and (len(self.turns) > 1 or self.context or self.tools):
            raise ValueError("a text-completion turn (`prompt`) is a pod's only turn, without context or tools")
        return self

    @field_validator("provider")
    @classmethod
    def _provider_rule(cls, value: str | None, info: ValidationInfo) -> str | None:
        return checked_name(value, PROVIDER_NAME, "provider name", info)


class PodPhase(str, Enum):
    pending = "Pending"
    admitted = "Admitted"
    placed = "Placed"
    running = "Running"
    succeeded = "Succeeded"
    failed = "Failed"
    cancelled = "Cancelled"
    refused = "Refused"


TERMINAL_PHASES = frozenset({PodPhase.succeeded, PodPhase.failed, PodPhase.cancelled, PodPhase.refused})


class Transition(Contract):
    phase: PodPhase
    at: datetime
    reason: str | None = None


class TurnResult(Contract):
    index: int
    provider: str
    prompt_tokens: int
    cached_tokens: int
    evaluated_tokens: int
    completion_tokens: int
    cache_tier: Literal["T0", "T1", "T2", "none"]
    ttft_ms: int
    total_ms: int
    output: str
    decision_id: str | None = None
    # stop: end of turn, EOS or a stop string; length: max tokens; cancelled: its client went away
    finish_reason: Literal["stop", "length", "cancelled"] | None = None


class PodStatus(Contract):
    phase: PodPhase
    transitions: list[Transition] = Field(default_factory=list)
    reasons: list[str] = Field(default_factory=list)  # refusal or failure reasons
    turns: list[TurnResult] = Field(default_factory=list)
    receipt_ids: list[str] = Field(default_factory=list)
    policy: PolicyDecision | None = None  # the admission verdict in force (source, digest, reasons)


class AgentPod(Resource):
    kind: Literal["AgentPod"] = "AgentPod"
    metadata: PodMetadata
    spec: AgentPodSpec
    id: str | None = Field(default=None, json_schema_extra={"pattern": POD_ID})  # assigned by the node on submit
    status: PodStatus | None = None

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(POD_ID, value):
            raise ValueError("pod id must be lowercase hex")
        return value

    @model_validator(mode="after")
    def _encodable(self, info: ValidationInfo) -> "AgentPod":
        """Everything a pod carries must go into its receipt's canonical JSON (RFC 8785:
        integers within +-(2^53 - 1), finite numbers, valid Unicode); refused here, naming
        the field, instead of a pod that runs and then cannot be receipted."""
        if info.context == STORED:
            return self
        problem = unencodable({"metadata": self.metadata.to_wire(), "spec": self.spec.to_wire()})
        if problem is not None:
            raise ValueError(problem)
        return self


MAX_SAFE_INTEGER = 2**53 - 1


def unencodable(value: Any, path: str = "") -> str | None:
    """Where ``value`` holds something canonical JSON cannot carry, said for a person; else None."""
    import math

    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return None if abs(value) <= MAX_SAFE_INTEGER else f"{path}: integer {value} is outside +-(2^53 - 1)"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path}: {value} is not a finite number"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{path}: text holds a lone surrogate (not valid Unicode)"
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = unencodable(key, path) or unencodable(item, f"{path}.{key}" if path else str(key))
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            found = unencodable(item, f"{path}[{index}]")
            if found:
                return found
    return None

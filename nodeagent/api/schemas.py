"""Request and response bodies that belong to the API itself (not contract kinds).

Contract kinds (AgentPod, MachineProfile, ...) are used as they are; these
models cover the envelopes around them so /openapi.json documents every route.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field, field_validator

from nodeagent.contracts.base import Contract, Resource
from nodeagent.contracts.pod import AgentPod, AgentPodSpec, PodMetadata, PodPhase, TurnResult


class PodSubmission(Resource):
    """The body of `POST /v1/pods`: an AgentPod without ``id`` and ``status``, which the node sets.

    Its own schema, so the document refuses what the server refuses: a pod
    fetched from the node and sent back as it is (``id``, ``status`` set) is a
    422 naming the field.
    """

    kind: Literal["AgentPod"] = "AgentPod"
    metadata: PodMetadata
    spec: AgentPodSpec
    id: None = Field(default=None, description="set by the node: leave it out (or null)")
    status: None = Field(default=None, description="set by the node: leave it out (or null)")

    @field_validator("id", "status", mode="before")
    @classmethod
    def _set_by_the_node(cls, value: object) -> None:
        if value is not None:
            raise ValueError("set by the node; leave it out of a new pod")
        return None

    def to_pod(self) -> AgentPod:
        return AgentPod(api_version=self.api_version, metadata=self.metadata, spec=self.spec)


class ErrorDetail(Contract):
    field: str | None = Field(description="the offending field, as a dotted path (spec.turns[0].messages)")
    message: str
    type: str


class ErrorInfo(Contract):
    type: str = Field(description="invalid_request, not_found, queue_full, unauthorized, ...")
    message: str
    field: str | None = Field(default=None, description="the offending field, when there is one")
    param: str | None = Field(default=None, description="same as field (OpenAI clients read this name)")
    details: list[ErrorDetail] = Field(default_factory=list)
    code: str | None = Field(default=None, description="OpenAI routes: the agent's own type (``type`` is then "
                                                       "OpenAI's class of error, such as invalid_request_error)")


class ErrorBody(Contract):
    error: ErrorInfo


class Health(Contract):
    status: Literal["ok"] = "ok"


class Readiness(Contract):
    ready: bool
    accepting: bool
    reasons: list[str] = Field(default_factory=list, description="why the node is not ready")


class DispatchState(Contract):
    dispatching: bool = Field(description="false: pods are accepted and queued but none starts")


class AgentStatus(Contract):
    """What `agent-machine status` prints."""

    version: str
    pid: int
    started_at: datetime
    uptime_s: float
    ready: bool
    accepting: bool
    pods: dict[str, int] = Field(description="pods stored on this node, by phase")
    in_flight: int
    queue_limit: int
    providers: int | None = Field(default=None, description="null until the node manages providers")
    listeners: list[str] = Field(default_factory=list)
    config_file: str
    state_dir: str


class PodList(Contract):
    items: list[AgentPod]


class PodEvent(Contract):
    """One line of `GET /v1/pods/{id}/events` (NDJSON) or one SSE `data:` payload.

    ``type`` is ``transition`` (with phase, at, reason), ``turn`` (with the
    turn's result), ``end`` (the pod is terminal or the stream's time ran out;
    ``phase`` is the phase at the end) or ``heartbeat`` (SSE keeps idle
    connections open).
    """

    type: Literal["transition", "turn", "end", "heartbeat"]
    pod_id: str
    seq: int = Field(description="position of this event in the pod's event stream, from 0")
    phase: PodPhase | None = None
    at: datetime | None = None
    reason: str | None = None
    turn: TurnResult | None = None
    reasons: list[str] = Field(default_factory=list)
    receipt_ids: list[str] = Field(default_factory=list)


class ObjectList(Contract):
    """A list of records whose kind is documented on the route."""

    items: list[dict[str, Any]]

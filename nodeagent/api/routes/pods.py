"""Pods: submit, list, get, cancel, and stream a pod's events."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator, Literal

import anyio
from fastapi import APIRouter, Body, Depends, Path, Query, Request
from starlette.responses import Response, StreamingResponse

from nodeagent.api import idempotency
from nodeagent.api.errors import ApiError, json_bytes
from nodeagent.api.principal import Principal, get_principal
from nodeagent.api.routes.common import error_responses, get_node, not_found, wire_response
from nodeagent.api.schemas import DispatchState, ObjectList, PodEvent, PodList, PodSubmission
from nodeagent.contracts.pod import TERMINAL_PHASES, AgentPod, PodPhase
from nodeagent.idempotency import IdempotencyConflict, IdempotentReplay
from nodeagent.node import NodeClosed, QueueFull
from nodeagent.pods import PodNotFound

router = APIRouter(tags=["pods"])

POD_ID = Path(pattern=r"^[0-9a-f]{8,64}$", description="the id the node assigned on submit (lowercase hex)")
POLL_S = 0.1  # how often a stream looks for new events
SSE_HEARTBEAT_S = 15.0


def visible_pod(node: Any, principal: Principal, pod_id: str) -> AgentPod:
    """The pod, if this principal may see it; another tenant's is 404 exactly like a missing one."""
    try:
        pod = node.get_pod(pod_id)
    except PodNotFound:
        pod = None
    if pod is None or not principal.sees_pod(pod):
        raise not_found("pod", "pod_id", pod_id)
    return pod


@router.post("/v1/pods", response_model=AgentPod, status_code=201,
             responses={**error_responses(403, 404, 409, 429, 503),
                        200: {"model": AgentPod, "description": "a replay: the pod this Idempotency-Key already made"}},
             summary="submit an AgentPod: admitted and queued, or refused at once (phase Refused with reasons)")
def submit_pod(submission: PodSubmission = Body(...), key: str | None = idempotency.IDEMPOTENCY_KEY,
               node: Any = Depends(get_node), principal: Principal = Depends(get_principal)) -> Response:
    pod = submission.to_pod()
    principal.authorize_pod(pod)
    try:
        stored = node.submit_pod(pod, idempotency=idempotency.pod_key(principal, key, pod))
    except IdempotentReplay as replay:
        return wire_response(replay.pod, status=200, headers={"Location": f"/v1/pods/{replay.pod.id}",
                                                               idempotency.REPLAYED_HEADER: "true"})
    except IdempotencyConflict as exc:
        raise idempotency.conflict(exc) from exc
    except QueueFull as exc:
        raise ApiError(429, "queue_full", str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from exc
    except NodeClosed as exc:
        raise ApiError(503, "draining", str(exc), headers={"Retry-After": "30"}) from exc
    return wire_response(stored, status=201, headers={"Location": f"/v1/pods/{stored.id}"})


@router.get("/v1/pods", response_model=PodList, responses=error_responses(403, 422),
            summary="pods on this node, newest first")
def list_pods(phase: PodPhase | None = Query(None, description="only pods in this phase"),
              tenant: str | None = Query(None, pattern=r"^[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?$"),
              limit: int = Query(100, ge=1, le=1000),
              node: Any = Depends(get_node), principal: Principal = Depends(get_principal)) -> Response:
    pods = node.list_pods(phase=phase, tenant=principal.tenant_filter(tenant), limit=limit)
    # A credential bound to some agents sees theirs only (its page may hold fewer than limit).
    return wire_response({"items": [pod for pod in pods if principal.sees_pod(pod)]})


# A custom method on the collection (AIP-136), like /v1/dispatch:pause. Starlette
# matches it as its own literal path: "/v1/pods/{pod_id}" needs a "/" after "pods".
@router.get("/v1/pods:conflicts", response_model=ObjectList, responses=error_responses(403),
            summary="in-flight pods that contend for a provider or would evict each other's cache",
            description="Each item: ``kind`` (``provider``: pods placed on one provider take turns on its "
                        "context, displacing each other's live prefix; ``cache``: the states the pods need "
                        "together exceed the RAM tier), ``provider`` or ``tier``, ``pods`` (their ids), "
                        "``detail`` (a sentence), and for ``cache`` ``needBytes`` and ``budgetBytes``. "
                        "An empty list: no conflicts.")
def pod_conflicts(node: Any = Depends(get_node), principal: Principal = Depends(get_principal)) -> Response:
    principal.require_admin("the node-wide conflicts view (it names every tenant's pods)")
    return wire_response({"items": node.pod_conflicts()})


@router.get("/v1/pods/{pod_id}", response_model=AgentPod, responses=error_responses(404, 422),
            summary="one pod with its status: phase, transitions, turn results, receipt ids")
def get_pod(pod_id: str = POD_ID, node: Any = Depends(get_node),
            principal: Principal = Depends(get_principal)) -> Response:
    return wire_response(visible_pod(node, principal, pod_id))


@router.delete("/v1/pods/{pod_id}", response_model=AgentPod, responses=error_responses(404, 422),
               summary="cancel a pod (a finished pod is returned unchanged)")
def cancel_pod(pod_id: str = POD_ID, node: Any = Depends(get_node),
               principal: Principal = Depends(get_principal)) -> Response:
    visible_pod(node, principal, pod_id)
    try:
        return wire_response(node.cancel_pod(pod_id))
    except PodNotFound:
        raise not_found("pod", "pod_id", pod_id) from None


class _EventCursor:
    """Turns successive snapshots of a pod into the events not yet sent, in order."""

    def __init__(self, pod_id: str) -> None:
        self.pod_id = pod_id
        self.sent_transitions = 0
        self.sent_turns = 0
        self.seq = 0

    def _event(self, **fields: Any) -> PodEvent:
        event = PodEvent(pod_id=self.pod_id, seq=self.seq, **fields)
        self.seq += 1
        return event

    def advance(self, pod: AgentPod) -> list[PodEvent]:
        status = pod.status
        assert status is not None
        new_transitions = status.transitions[self.sent_transitions:]
        # Turns come after the transitions that led to them and before a terminal one.
        leading = [t for t in new_transitions if t.phase not in TERMINAL_PHASES]
        trailing = [t for t in new_transitions if t.phase in TERMINAL_PHASES]
        events = [self._event(type="transition", phase=t.phase, at=t.at, reason=t.reason) for t in leading]
        events += [self._event(type="turn", turn=turn) for turn in status.turns[self.sent_turns:]]
        events += [self._event(type="transition", phase=t.phase, at=t.at, reason=t.reason,
                               reasons=status.reasons) for t in trailing]
        self.sent_transitions = len(status.transitions)
        self.sent_turns = len(status.turns)
        return events

    def end(self, pod: AgentPod, reason: str | None = None) -> PodEvent:
        status = pod.status
        assert status is not None
        return self._event(type="end", phase=status.phase, reason=reason, reasons=status.reasons,
                           receipt_ids=status.receipt_ids)


def _encode(event: PodEvent, fmt: str) -> bytes:
    data = json_bytes(event.to_wire())
    if fmt == "sse":
        return b"event: " + event.type.encode() + b"\nid: " + str(event.seq).encode() + b"\ndata: " + data + b"\n\n"
    return data + b"\n"


@router.get("/v1/pods/{pod_id}/events", response_model=PodEvent, responses={
    **error_responses(404, 422),
    200: {"description": "one PodEvent per line (NDJSON) or per SSE message, ending with type=end",
          "content": {"application/x-ndjson": {}, "text/event-stream": {}}}},
    summary="stream the pod's transitions and turn results as they happen; ends when the pod is terminal")
async def pod_events(request: Request, pod_id: str = POD_ID,
                     format: Literal["ndjson", "sse"] | None = Query(
                         None, description="ndjson (default) or sse; without it, Accept: text/event-stream picks sse"),
                     node: Any = Depends(get_node), principal: Principal = Depends(get_principal)) -> Response:
    fmt = format or ("sse" if "text/event-stream" in request.headers.get("accept", "") else "ndjson")
    first = await anyio.to_thread.run_sync(visible_pod, node, principal, pod_id)
    limit_s = float(node.config.api.request_timeout_s)

    async def stream() -> AsyncIterator[bytes]:
        cursor = _EventCursor(pod_id)
        pod = first
        began = last_sent = time.monotonic()
        while True:
            for event in cursor.advance(pod):
                yield _encode(event, fmt)
                last_sent = time.monotonic()
            if pod.status is not None and pod.status.phase in TERMINAL_PHASES:
                yield _encode(cursor.end(pod), fmt)
                return
            now = time.monotonic()
            if now - began >= limit_s:
                yield _encode(cursor.end(pod, reason=f"stream time limit of {limit_s:g}s reached "
                                                     "(api.request_timeout_s); the pod goes on: reconnect"), fmt)
                return
            if fmt == "sse" and now - last_sent >= SSE_HEARTBEAT_S:
                yield b": heartbeat\n\n"
                last_sent = now
            await anyio.sleep(POLL_S)
            pod = await anyio.to_thread.run_sync(node.get_pod, pod_id)

    media = "text/event-stream" if fmt == "sse" else "application/x-ndjson"
    return StreamingResponse(stream(), media_type=media, headers={"Cache-Control": "no-cache",
                                                                   "X-Accel-Buffering": "no"})


@router.post("/v1/dispatch:pause", response_model=DispatchState, responses=error_responses(403),
             summary="maintenance: keep accepting pods but start none until :resume")
def pause_dispatch(node: Any = Depends(get_node), principal: Principal = Depends(get_principal)) -> Response:
    principal.require_admin("pausing dispatch")
    node.pause_dispatch()
    return wire_response({"dispatching": False})


@router.post("/v1/dispatch:resume", response_model=DispatchState, responses=error_responses(403),
             summary="start dispatching queued pods again")
def resume_dispatch(node: Any = Depends(get_node), principal: Principal = Depends(get_principal)) -> Response:
    principal.require_admin("resuming dispatch")
    node.resume_dispatch()
    return wire_response({"dispatching": True})

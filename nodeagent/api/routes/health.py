"""`/healthz`, `/readyz`, `/metrics`, `GET /v1/status`."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from nodeagent import metrics
from nodeagent.api.errors import error_response
from nodeagent.api.routes.common import error_responses, get_node, wire_response
from nodeagent.api.schemas import AgentStatus, Health, Readiness
from nodeagent.contracts.pod import TERMINAL_PHASES, PodPhase

router = APIRouter()
log = logging.getLogger("agent_machine.api")


# `security: []`: probes may call it without credentials (nodeagent.api.auth.UNAUTHENTICATED_PATHS).
@router.get("/healthz", response_model=Health, tags=["health"], openapi_extra={"security": []},
            summary="the agent process is alive (answers without touching the node)")
async def healthz() -> Response:
    return wire_response(Health())


@router.get("/readyz", response_model=Readiness, tags=["health"], responses=error_responses(503),
            summary="the node accepts and dispatches pods (503 while draining or if a dispatcher died)")
def readyz(node: Any = Depends(get_node)) -> Response:
    ready = bool(node.ready())
    if ready:
        return wire_response(Readiness(ready=True, accepting=bool(node.accepting)))
    # Not ready is an error like any other: the standard body, one detail per reason.
    if not node.accepting:
        type_, reason = "draining", "draining: not accepting new pods"
    else:
        type_, reason = "not_ready", "pod dispatchers are not running"
    return error_response(503, type_, f"not ready: {reason}",
                          details=[{"field": None, "message": reason, "type": type_}])


def pod_phase_counts(node: Any) -> dict[str, int]:
    counts = getattr(node, "pod_phase_counts", None)
    if counts is not None:
        return dict(counts())
    return node.pod_phase_counts()


@router.get("/metrics", tags=["health"], response_class=Response,
            summary="Prometheus metrics (text exposition format)",
            responses={200: {"content": {"text/plain": {}}}})
def metrics_route(node: Any = Depends(get_node)) -> Response:
    body, content_type = metrics.render(lambda: node_snapshot(node))
    return Response(body, media_type=content_type)


def node_snapshot(node: Any) -> metrics.NodeSnapshot:
    """The node's state for a scrape. Each part is optional: what the node cannot tell stays empty."""
    snap = metrics.NodeSnapshot(pods_by_phase=pod_phase_counts(node), phases=tuple(p.value for p in PodPhase))
    for part in (_providers, _residency, _cache):
        try:
            part(node, snap)
        except Exception as exc:  # noqa: BLE001 - a scrape reports what it can
            log.warning("metrics: %s unavailable: %s: %s", part.__name__.strip("_"), type(exc).__name__, exc)
    return snap


def _field(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, dict) else getattr(record, name, None)


def _providers(node: Any, snap: metrics.NodeSnapshot) -> None:
    for status in getattr(node, "list_providers", lambda: [])():
        checked = _field(status, "checked_at")
        snap.providers.append(metrics.ProviderSample(
            name=str(_field(status, "name")), up=_field(status, "state") == "running",
            checked_at=checked.timestamp() if isinstance(checked, datetime) else None))


def _residency(node: Any, snap: metrics.NodeSnapshot) -> None:
    for row in getattr(node, "list_residency", lambda: [])():
        state = _field(row, "state")
        state = getattr(state, "value", state)
        if state in metrics.RESIDENCY_STATES:
            snap.residency[str(_field(row, "name") or _field(row, "digest"))] = state


def _cache(node: Any, snap: metrics.NodeSnapshot) -> None:
    if getattr(getattr(node, "executor", None), "cache", "absent") is None:
        return  # the node runs without a KV cache
    summary = getattr(node, "cache_summary", None)
    if summary is None:
        return
    stats = summary()
    for tier in _field(stats, "tiers") or []:
        snap.cache_tiers.append(metrics.TierSample(tier=str(_field(tier, "tier")), used_bytes=_field(tier, "used_bytes"),
                                                   entries=_field(tier, "entries"),
                                                   budget_bytes=_field(tier, "budget_bytes")))
    snap.cache_hits = dict(_field(stats, "hits") or {})
    snap.cache_hit_tokens = dict(_field(stats, "hit_tokens") or {})
    snap.cache_misses = _field(stats, "misses")


@router.get("/v1/status", response_model=AgentStatus, tags=["health"],
            summary="one-screen summary of the running agent (what `agent-machine status` prints)")
def status(request: Request, node: Any = Depends(get_node)) -> Response:
    return wire_response(build_status(node, request.app.state.listeners))


def build_status(node: Any, listeners: list[str]) -> AgentStatus:
    from nodeagent import __version__

    counts = pod_phase_counts(node)
    in_flight = sum(n for phase, n in counts.items() if PodPhase(phase) not in TERMINAL_PHASES)
    providers = None
    if hasattr(node, "list_providers"):
        try:
            providers = len(list(node.list_providers()))
        except Exception as exc:  # noqa: BLE001 - status must answer even when a provider check fails
            log.warning("status: list_providers failed: %s", exc)
    return AgentStatus(
        version=__version__, pid=os.getpid(),
        started_at=datetime.fromtimestamp(node.started_at, timezone.utc),
        uptime_s=round(time.time() - node.started_at, 3),
        ready=bool(node.ready()), accepting=bool(node.accepting), pods=counts, in_flight=in_flight,
        queue_limit=node.config.queue.max_pods, providers=providers, listeners=list(listeners),
        config_file=str(node.loaded.file), state_dir=str(node.paths.state_dir),
    )

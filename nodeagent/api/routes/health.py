"""`/healthz`, `/readyz`, `/metrics`, `GET /v1/status`."""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from nodeagent import metrics
from nodeagent.api.routes.common import error_responses, get_node, wire_response
from nodeagent.api.schemas import AgentStatus, Health, Readiness
from nodeagent.contracts.pod import TERMINAL_PHASES, PodPhase

router = APIRouter()


@router.get("/healthz", response_model=Health, tags=["health"],
            summary="the agent process is alive (answers without touching the node)")
async def healthz() -> Response:
    return wire_response(Health())


@router.get("/readyz", response_model=Readiness, tags=["health"], responses=error_responses(503),
            summary="the node accepts and dispatches pods (503 while draining or if a dispatcher died)")
def readyz(node: Any = Depends(get_node)) -> Response:
    ready = bool(node.ready())
    reasons = []
    if not node.accepting:
        reasons.append("draining: not accepting new pods")
    elif not ready:
        reasons.append("pod dispatchers are not running")
    return wire_response(Readiness(ready=ready, accepting=node.accepting, reasons=reasons),
                         status=200 if ready else 503)


def pod_phase_counts(node: Any) -> dict[str, int]:
    counts = getattr(node, "pod_phase_counts", None)
    if counts is not None:
        return dict(counts())
    with node._db_lock:  # Node has no public accessor yet; same lock its own methods take
        return dict(node.pods.phase_counts())


@router.get("/metrics", tags=["health"], response_class=Response,
            summary="Prometheus metrics (text exposition format)",
            responses={200: {"content": {"text/plain": {}}}})
def metrics_route(node: Any = Depends(get_node)) -> Response:
    metrics.set_pod_phase_counts(pod_phase_counts(node), [p.value for p in PodPhase])
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


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
        providers = len(list(node.list_providers()))
    return AgentStatus(
        version=__version__, pid=os.getpid(),
        started_at=datetime.fromtimestamp(node.started_at, timezone.utc),
        uptime_s=round(time.time() - node.started_at, 3),
        ready=bool(node.ready()), accepting=bool(node.accepting), pods=counts, in_flight=in_flight,
        queue_limit=node.config.queue.max_pods, providers=providers, listeners=list(listeners),
        config_file=str(node.loaded.file), state_dir=str(node.paths.state_dir),
    )

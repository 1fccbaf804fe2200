"""`POST /v1/placements:score`: a dry-run PlacementDecision for an AgentPod."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends
from starlette.responses import Response

from nodeagent.api.principal import Principal, get_principal
from nodeagent.api.routes.common import error_responses, get_node, node_method, optional_model, wire_response
from nodeagent.contracts.pod import AgentPod

router = APIRouter(tags=["placements"])

_PlacementDecision = optional_model("nodeagent.contracts.placement", "PlacementDecision")


@router.post("/v1/placements:score", response_model=_PlacementDecision,
             responses=error_responses(403, 404, 409, 422, 501),
             summary="score a pod on this machine without running it: every candidate with its TTFT terms")
def score_placement(pod: AgentPod = Body(...), node: Any = Depends(get_node),
                    principal: Principal = Depends(get_principal)) -> Response:
    principal.authorize_pod(pod)  # the same rule as submitting it: a score reveals cache hits
    return wire_response(node_method(node, "score_pod")(pod))

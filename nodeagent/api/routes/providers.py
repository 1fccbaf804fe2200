"""`GET /v1/providers`: the node's providers and their health."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from starlette.responses import Response

from nodeagent.api.routes.common import error_responses, get_node, items_response, node_method, optional_model
from nodeagent.contracts.base import Contract

router = APIRouter(tags=["providers"])

_ProviderStatus = optional_model("nodeagent.contracts.provider", "ProviderStatus")


class ProviderList(Contract):
    items: list[_ProviderStatus or dict[str, Any]]  # type: ignore[valid-type]


class FleetView(Contract):
    rule: str  # which rule made the fleet: declared in <file>, and the default for undeclared models
    declared: list[dict[str, Any]]  # per model: name, kind, mode, replicas, slots, ctxPerSlot, load, running
    adopted: list[str]  # llama-servers started with `providers up` that the node places on


@router.get("/v1/providers", response_model=ProviderList, responses=error_responses(501),
            summary="providers: kind, launch mode, unit/container/pid, model, health, drift (node.list_providers())")
def list_providers(node: Any = Depends(get_node)) -> Response:
    return items_response(node_method(node, "list_providers")())


@router.get("/v1/fleet", response_model=FleetView, responses=error_responses(501),
            summary="the provider fleet: the rule that applied, each declared model's replicas (node.fleet_view())")
def fleet_view(node: Any = Depends(get_node)) -> dict[str, Any]:
    return node_method(node, "fleet_view")()

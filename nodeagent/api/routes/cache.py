"""`GET /v1/cache`: KV-cache tiers, usage and hit counters."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from starlette.responses import Response

from nodeagent.api.routes.common import error_responses, get_node, node_method, optional_model, wire_response

router = APIRouter(tags=["cache"])

_CacheStats = optional_model("nodeagent.contracts.cache", "CacheStats")


@router.get("/v1/cache", response_model=_CacheStats, responses=error_responses(501),
            summary="cache tiers (T1 RAM, T2 disk): budgets, usage, entries, hits by tier (node.cache_summary())")
def cache_summary(node: Any = Depends(get_node)) -> Response:
    return wire_response(node_method(node, "cache_summary")())

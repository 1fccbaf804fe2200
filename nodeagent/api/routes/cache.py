"""`GET /v1/cache`: KV-cache tiers, usage and hit counters; `GET /v1/cache/entries`: saved states.

Entries belong to tenants (a private entry to one agent of one); a tenant's
credential lists and reads its own only, and another tenant's entry answers
404 like a missing one. The counters are node-wide and name no tenant.
"""

from __future__ import annotations

from typing import Any

from typing import Literal

from fastapi import APIRouter, Depends, Path, Query
from starlette.responses import Response

from nodeagent.api.principal import Principal, get_principal
from nodeagent.api.routes.common import (
    error_responses,
    get_node,
    node_method,
    not_found,
    optional_model,
    wire_response,
)
from nodeagent.contracts.base import Contract
from nodeagent.contracts.cache import CacheEntry
from nodeagent.contracts.pod import NAME_RE

router = APIRouter(tags=["cache"])

_CacheStats = optional_model("nodeagent.contracts.cache", "CacheStats")


@router.get("/v1/cache", response_model=_CacheStats, responses=error_responses(501),
            summary="cache tiers (T1 RAM, T2 disk): budgets, usage, entries, hits by tier (node.cache_summary())")
def cache_summary(node: Any = Depends(get_node)) -> Response:
    return wire_response(node_method(node, "cache_summary")())


class CacheEntryList(Contract):
    items: list[CacheEntry]


def _sees(principal: Principal, entry: CacheEntry) -> bool:
    # A private entry's owner is "tenant/agent"; tenant-scope and public entries have no agent.
    agent = entry.owner.split("/", 1)[1] if entry.scope == "private" and "/" in entry.owner else None
    return principal.sees(entry.tenant, agent)


@router.get("/v1/cache/entries", response_model=CacheEntryList, responses=error_responses(403, 422, 503),
            summary="saved KV states, hottest first per tier: all for admin, the credential's tenant's otherwise")
def cache_entries(tenant: str | None = Query(None, pattern=NAME_RE, description="only this tenant's entries"),
                  tier: Literal["T1", "T2"] | None = Query(None, description="only entries in this tier"),
                  node: Any = Depends(get_node), principal: Principal = Depends(get_principal)) -> Response:
    entries = node.cache_entries(tenant=principal.tenant_filter(tenant))
    return wire_response({"items": [e for e in entries if _sees(principal, e) and tier in (None, e.tier)]})


@router.get("/v1/cache/entries/{entry_id}", response_model=CacheEntry, responses=error_responses(404, 422, 503),
            summary="one saved KV state; another tenant's is 404, like a missing one")
def cache_entry(entry_id: str = Path(pattern=r"^[0-9a-f]{32}$", description="the entry id (32 lowercase hex)"),
                node: Any = Depends(get_node), principal: Principal = Depends(get_principal)) -> Response:
    entry = node.cache_entry(entry_id)
    if entry is None or not _sees(principal, entry):
        raise not_found("cache entry", "entry_id", entry_id)
    return wire_response(entry)

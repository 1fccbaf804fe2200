"""`CacheEntry`: one saved KV state held in a tier, as the index knows it.

The state file itself is opaque (whatever the provider's ``save_state`` wrote);
the entry is its metadata. ``deepestBlockKey`` is the chained key of the last
full block the state covers (nodeagent.kvcache.blocks); every shallower block
key of the same prefix is indexed too, so a lookup can match any prefix of it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from nodeagent.contracts.base import Contract, Resource

TierName = Literal["T1", "T2"]
ScopeName = Literal["private", "tenant", "public"]


class CacheEntry(Resource):
    kind: Literal["CacheEntry"] = "CacheEntry"
    id: str = Field(pattern=r"^[0-9a-f]{32}$")
    model_digest: str
    scope: ScopeName  # the most private scope of the prefix (its deepest block's)
    owner: str  # "public", the tenant id, or "tenant/agent" for private entries
    tenant: str | None = None
    state_format: str  # the provider kind that wrote the state, e.g. llama_cpp_python
    tokens: int = Field(ge=0)  # tokens the saved state covers
    blocks: int = Field(ge=0)  # full blocks indexed (tokens // block size)
    block_tokens: int = Field(ge=1)
    deepest_block_key: str = Field(pattern=r"^[0-9a-f]{64}$")
    tier: TierName
    bytes: int = Field(ge=0)
    content_digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    hits: int = Field(default=0, ge=0)
    created_at: datetime
    last_used_at: datetime
    pinned: bool = False
    in_use: bool = False  # being restored by this process right now
    priority: float = 0.0  # GreedyDual-Size-Frequency value; lowest goes first


class TierUsage(Contract):
    tier: TierName
    directory: str
    budget_bytes: int
    used_bytes: int
    entries: int


class CacheStats(Contract):
    """Counters since the index was created (persisted with it)."""

    tiers: list[TierUsage]
    hits: dict[str, int]  # per tier: T0 (reported by callers), T1, T2
    misses: int
    hit_tokens: dict[str, int]
    lookup_tokens: int
    stored: int
    stored_bytes: int
    demotions: int
    promotions: int
    evictions: int  # entries dropped for space (from T2, or too large for any tier)
    corrupt: int  # entries dropped because their content digest did not match
    rejected: int  # states not stored (larger than every budget, or no room)

"""Upper bounds on the prefix-cache token hit rate of a request sequence.

O1 (infinite cache): each request hits its longest block-aligned common prefix
with any earlier request, capped at len-1 (one token is always evaluated).

O2 (capacity-aware): one pooled cache of ``capacity_blocks`` blocks (the
workers' total), managed by Belady's MIN: on a miss that needs room, evict the
block whose next use is furthest in the future (never-used-again first; ties:
the deeper block, so a prefix is never broken before its extensions), and do
not insert a block used later than everything cached (bypass). A request hits
the leading blocks present, capped at len-1, exactly as for O1 and the
workers. Blocks are the chained keys of nodeagent.kvcache.blocks.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Sequence

from nodeagent.kvcache.blocks import BLOCK_TOKENS, Namespace, block_keys

BENCH_NAMESPACE = Namespace(model_digest="sha256:" + "0" * 64, scope="public")


def keys_of(tokens: Sequence[int], block_tokens: int = BLOCK_TOKENS) -> list[bytes]:
    return block_keys(tokens, BENCH_NAMESPACE, block_tokens=block_tokens)


def capped_hit(matched_blocks: int, n_tokens: int, block_tokens: int = BLOCK_TOKENS) -> int:
    return min(matched_blocks * block_tokens, max(0, n_tokens - 1))


@dataclass(frozen=True)
class Bound:
    name: str
    hit_tokens: int
    prompt_tokens: int

    @property
    def rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def o1(sequences: Sequence[Sequence[int]], block_tokens: int = BLOCK_TOKENS,
       keys: Sequence[Sequence[bytes]] | None = None) -> Bound:
    keys = keys or [keys_of(s, block_tokens) for s in sequences]
    seen: set[bytes] = set()
    hits = total = 0
    for tokens, ks in zip(sequences, keys):
        matched = 0
        while matched < len(ks) and ks[matched] in seen:
            matched += 1
        hits += capped_hit(matched, len(tokens), block_tokens)
        total += len(tokens)
        seen.update(ks)
    return Bound("O1", hits, total)


def o2(sequences: Sequence[Sequence[int]], capacity_blocks: int, block_tokens: int = BLOCK_TOKENS,
       keys: Sequence[Sequence[bytes]] | None = None) -> Bound:
    if capacity_blocks < 0:
        raise ValueError("capacity must be >= 0 blocks")
    keys = keys or [keys_of(s, block_tokens) for s in sequences]
    uses: dict[bytes, list[int]] = {}
    depth_of: dict[bytes, int] = {}
    for i, ks in enumerate(keys):
        for d, k in enumerate(ks):
            uses.setdefault(k, []).append(i)
            depth_of[k] = d
    cursor = {k: 0 for k in uses}  # index into uses[k] of the current use
    cached: dict[bytes, float] = {}  # key -> its next use
    heap: list[tuple[float, int, bytes]] = []  # (-next use, -depth, key), lazily invalidated
    hits = total = 0

    def furthest() -> tuple[float, bytes] | None:
        while heap:
            neg_next, _, k = heap[0]
            if k in cached and cached[k] == -neg_next:
                return -neg_next, k
            heapq.heappop(heap)
        return None

    for i, (tokens, ks) in enumerate(zip(sequences, keys)):
        matched = 0
        while matched < len(ks) and ks[matched] in cached:
            matched += 1
        hits += capped_hit(matched, len(tokens), block_tokens)
        total += len(tokens)
        for k in ks:
            c = cursor[k] + 1
            cursor[k] = c
            nxt = uses[k][c] if c < len(uses[k]) else math.inf
            if k in cached:
                cached[k] = nxt
                heapq.heappush(heap, (-nxt, -depth_of[k], k))
                continue
            if capacity_blocks == 0:
                continue
            if len(cached) >= capacity_blocks:
                top = furthest()
                if top is None or top[0] <= nxt:
                    continue  # bypass: everything cached is needed sooner
                del cached[top[1]]
            cached[k] = nxt
            heapq.heappush(heap, (-nxt, -depth_of[k], k))
    return Bound("O2", hits, total)

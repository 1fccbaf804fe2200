"""An llm-d-style precise prefix-cache scorer, reimplemented for the routing benchmarks.

Decision rule (llm-d inference scheduler, "precise prefix-cache aware" well-lit path):
every endpoint gets three scores in [0, 1], higher is better, and the endpoint
with the largest weighted sum wins (``max-score-picker``; ties broken at random):

    total = 2.0 * prefix + 1.0 * kv_utilization + 1.0 * queue

* ``precise-prefix-cache-scorer`` (weight 2.0). The KV-block index (fed by the
  engines' KV events, so it is exact) gives each endpoint holding the prompt's
  first block the number of consecutive leading prompt blocks it holds;
  endpoints holding none are absent from that map. The map is min-max
  normalised over the endpoints *in it*: ``(s - min) / (max - min)``, 1.0 for
  all of them when min == max, and 0.0 for every endpoint not in the map
  (llm-d-inference-scheduler ``pkg/plugins/scorer/utils.go``,
  ``indexedScoresToNormalizedScoredPods``).
* ``kv-cache-utilization-scorer`` (weight 1.0): ``1 - KVCacheUsagePercent``
  (gateway-api-inference-extension ``scorer/kvcache_utilization.go``). vLLM's
  usage counts the blocks held by running and waiting requests, not reusable
  cached blocks; here: the prompt blocks of the endpoint's in-flight requests
  over its capacity, capped at 1.
* ``queue-scorer`` (weight 1.0): ``(max_q - q) / (max_q - min_q)`` over the
  endpoints' waiting-queue sizes, 1.0 for all when they are equal
  (gateway-api-inference-extension ``scorer/queue.go``). Here the waiting
  queue is the endpoint's requests whose prefill has not started.

Weights: llm-d ``guides/precise-prefix-cache-aware/scheduler/
precise-prefix-cache-aware.values.yaml`` (schedulingProfiles.default:
precise-prefix-cache-scorer 2.0, kv-cache-utilization-scorer 1.0,
queue-scorer 1.0), https://github.com/llm-d/llm-d/tree/main/guides/precise-prefix-cache-aware.
(The approximate-prefix guides use prefix 3, queue 2, kv-utilisation 2; the
ratio prefix : load is the same 1 : 1.)

The benchmark gives this scorer exact state (its block index mirrors the
simulated engines exactly; queue and usage are current, not scraped every
50 ms as in a cluster), so it is, if anything, favoured.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

__all__ = ["WEIGHTS", "EndpointState", "kv_utilization_scores", "pick", "prefix_scores", "queue_scores", "totals"]

WEIGHTS = {"prefix": 2.0, "kv_utilization": 1.0, "queue": 1.0}
SOURCE = ("https://github.com/llm-d/llm-d/blob/main/guides/precise-prefix-cache-aware/scheduler/"
          "precise-prefix-cache-aware.values.yaml")


@dataclass(frozen=True, slots=True)
class EndpointState:
    matched_blocks: int  # consecutive leading prompt blocks the endpoint holds (KV-block index)
    waiting: int  # requests queued, prefill not started
    kv_usage: float  # fraction of KV blocks held by in-flight requests, 0..1


def prefix_scores(matched: Sequence[int]) -> list[float]:
    """Min-max over the endpoints that hold at least the first block; 0 for the rest."""
    present = [m for m in matched if m > 0]
    if not present:
        return [0.0] * len(matched)
    lo, hi = min(present), max(present)
    return [0.0 if m <= 0 else (1.0 if hi == lo else (m - lo) / (hi - lo)) for m in matched]


def queue_scores(waiting: Sequence[int]) -> list[float]:
    lo, hi = min(waiting), max(waiting)
    return [1.0 if hi == lo else (hi - q) / (hi - lo) for q in waiting]


def kv_utilization_scores(usage: Sequence[float]) -> list[float]:
    return [1.0 - min(1.0, max(0.0, u)) for u in usage]


def totals(states: Sequence[EndpointState], weights: dict[str, float] = WEIGHTS) -> list[float]:
    """Weighted sum per endpoint; each score clamped to [0, 1] as the scheduler does."""
    parts = (("prefix", prefix_scores([s.matched_blocks for s in states])),
             ("kv_utilization", kv_utilization_scores([s.kv_usage for s in states])),
             ("queue", queue_scores([s.waiting for s in states])))
    out = [0.0] * len(states)
    for name, scores in parts:
        w = weights[name]
        for i, v in enumerate(scores):
            out[i] += w * min(1.0, max(0.0, v))
    return out


def pick(states: Sequence[EndpointState], rng: random.Random, weights: dict[str, float] = WEIGHTS) -> int:
    """Index of the endpoint with the highest total (max-score-picker: random among equals)."""
    scores = totals(states, weights)
    best = max(scores)
    tied = [i for i, s in enumerate(scores) if s >= best - 1e-12]
    return tied[0] if len(tied) == 1 else rng.choice(tied)

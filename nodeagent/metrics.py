"""The agent's Prometheus metrics: one registry, the families, a small API.

Components update metrics through the functions below (never by creating
their own collectors), so every family has one home and one name:

=================================================  =========  =========================================
family                                             type       updated by
=================================================  =========  =========================================
agent_machine_placements_total{provider,outcome}   counter    scheduler: `record_placement`
agent_machine_placement_seconds                    histogram  scheduler: `record_placement`
agent_machine_cache_lookups_total{tier}            counter    kvcache: `record_cache_lookup` (tier none = miss)
agent_machine_cache_hit_tokens_total{tier}         counter    kvcache: `record_cache_lookup`
agent_machine_cache_bytes{tier}                    gauge      kvcache: `set_cache_usage`
agent_machine_cache_entries{tier}                  gauge      kvcache: `set_cache_usage`
agent_machine_model_residency{model,state}         stateset   models: `set_model_residency`
agent_machine_models_loaded                        gauge      models: `set_model_residency`
agent_machine_provider_up{provider}                gauge      reconcile: `record_provider_health`
agent_machine_provider_health_checks_total{..}     counter    reconcile: `record_provider_health`
agent_machine_provider_last_healthy_timestamp_s..  gauge      reconcile: `record_provider_health`
agent_machine_provider_restarts_total{provider}    counter    reconcile: `record_provider_restart`
agent_machine_pod_ttft_seconds{provider,tier}      histogram  executor: `observe_turn`
agent_machine_pod_turn_seconds{provider}           histogram  executor: `observe_turn`
agent_machine_pod_tokens_total{provider,kind}      counter    executor: `observe_turn`
agent_machine_pods_finished_total{phase}           counter    node: `record_pod_finished`
agent_machine_pod_duration_seconds{phase}          histogram  node: `record_pod_finished`
agent_machine_pods{phase}                          gauge      api `/metrics`: `set_pod_phase_counts`
agent_machine_receipts_total{outcome}              counter    receipts: `record_receipt`
agent_machine_receipt_append_seconds               histogram  receipts: `record_receipt`
agent_machine_receipt_log_size                     gauge      receipts: `record_receipt`
agent_machine_api_requests_total{route,method,co.  counter    api middleware
agent_machine_api_request_seconds{route}           histogram  api middleware
=================================================  =========  =========================================

plus ``agent_machine_build_info`` and the standard ``process_*`` families.
Label values are bounded sets (provider and model names come from the node's
own configuration, never from request text), so cardinality stays small.
"""

from __future__ import annotations

import time
from typing import Iterable, Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

PREFIX = "agent_machine"
Tier = Literal["T0", "T1", "T2", "none"]
TIERS: tuple[str, ...] = ("T0", "T1", "T2", "none")
RESIDENCY_STATES = ["cold", "warm", "hot"]

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)

# Latency buckets: from sub-millisecond (API, cache restore) to minutes (model load + long turns).
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_SLOW = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

BUILD_INFO = Info(f"{PREFIX}_build", "agent-machine version", registry=REGISTRY)

PLACEMENTS = Counter(f"{PREFIX}_placements", "Placement decisions by chosen provider and outcome "
                     "(placed, refused, no_candidate, dry_run)", ["provider", "outcome"], registry=REGISTRY)
PLACEMENT_SECONDS = Histogram(f"{PREFIX}_placement_seconds", "Time to compute one placement decision",
                              buckets=_FAST, registry=REGISTRY)

CACHE_LOOKUPS = Counter(f"{PREFIX}_cache_lookups", "KV-cache prefix lookups by the tier that served "
                        "them (none = miss)", ["tier"], registry=REGISTRY)
CACHE_HIT_TOKENS = Counter(f"{PREFIX}_cache_hit_tokens", "Prompt tokens served from cache, by tier",
                           ["tier"], registry=REGISTRY)
CACHE_BYTES = Gauge(f"{PREFIX}_cache_bytes", "Bytes held in each cache tier", ["tier"], registry=REGISTRY)
CACHE_BUDGET_BYTES = Gauge(f"{PREFIX}_cache_budget_bytes", "Byte budget of each cache tier", ["tier"],
                           registry=REGISTRY)
CACHE_ENTRIES = Gauge(f"{PREFIX}_cache_entries", "Saved states in each cache tier", ["tier"], registry=REGISTRY)

MODEL_RESIDENCY = Enum(f"{PREFIX}_model_residency", "Residency of each known model (cold: on disk, "
                       "warm: page cache / RAM, hot: loaded in a provider)", ["model"],
                       states=RESIDENCY_STATES, registry=REGISTRY)
MODELS_LOADED = Gauge(f"{PREFIX}_models_loaded", "Models loaded in a provider (hot)", registry=REGISTRY)

PROVIDER_UP = Gauge(f"{PREFIX}_provider_up", "1 if the provider's last health check passed within "
                    "3 reconcile intervals", ["provider"], registry=REGISTRY)
PROVIDER_CHECKS = Counter(f"{PREFIX}_provider_health_checks", "Provider health checks by result",
                          ["provider", "result"], registry=REGISTRY)
PROVIDER_LAST_HEALTHY = Gauge(f"{PREFIX}_provider_last_healthy_timestamp_seconds",
                              "Unix time of the provider's last passing health check", ["provider"],
                              registry=REGISTRY)
PROVIDER_RESTARTS = Counter(f"{PREFIX}_provider_restarts", "Provider restarts by the reconcile loop",
                            ["provider"], registry=REGISTRY)

POD_TTFT = Histogram(f"{PREFIX}_pod_ttft_seconds", "Time to first token of each pod turn",
                     ["provider", "tier"], buckets=_SLOW, registry=REGISTRY)
POD_TURN_SECONDS = Histogram(f"{PREFIX}_pod_turn_seconds", "Wall time of each pod turn", ["provider"],
                             buckets=_SLOW, registry=REGISTRY)
POD_TOKENS = Counter(f"{PREFIX}_pod_tokens", "Tokens by kind (prompt, cached, evaluated, completion)",
                     ["provider", "kind"], registry=REGISTRY)
PODS_FINISHED = Counter(f"{PREFIX}_pods_finished", "Pods that reached a terminal phase", ["phase"],
                        registry=REGISTRY)
POD_DURATION = Histogram(f"{PREFIX}_pod_duration_seconds", "Submit-to-terminal time of each pod", ["phase"],
                         buckets=_SLOW, registry=REGISTRY)
PODS = Gauge(f"{PREFIX}_pods", "Pods stored on this node by phase", ["phase"], registry=REGISTRY)

RECEIPTS = Counter(f"{PREFIX}_receipts", "Execution receipts appended to the log, by pod outcome",
                   ["outcome"], registry=REGISTRY)
RECEIPT_APPEND_SECONDS = Histogram(f"{PREFIX}_receipt_append_seconds", "Time to sign, append and fsync one receipt",
                                   buckets=_FAST, registry=REGISTRY)
RECEIPT_LOG_SIZE = Gauge(f"{PREFIX}_receipt_log_size", "Receipts in the log (Merkle tree size)", registry=REGISTRY)

API_REQUESTS = Counter(f"{PREFIX}_api_requests", "API requests by route template, method and status code",
                       ["route", "method", "code"], registry=REGISTRY)
API_SECONDS = Histogram(f"{PREFIX}_api_request_seconds", "API request latency by route template", ["route"],
                        buckets=_FAST, registry=REGISTRY)


def _init_build_info() -> None:
    from nodeagent import __version__

    BUILD_INFO.info({"version": __version__})


_init_build_info()


# ---------------------------------------------------------------- the API others call
def record_placement(provider: str, outcome: str, seconds: float | None = None) -> None:
    PLACEMENTS.labels(provider=provider, outcome=outcome).inc()
    if seconds is not None:
        PLACEMENT_SECONDS.observe(seconds)


def record_cache_lookup(tier: Tier, hit_tokens: int = 0) -> None:
    """One prefix lookup, served by ``tier`` (``none`` for a miss) with ``hit_tokens`` reused."""
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
    CACHE_LOOKUPS.labels(tier=tier).inc()
    if hit_tokens:
        CACHE_HIT_TOKENS.labels(tier=tier).inc(hit_tokens)


def set_cache_usage(tier: Tier, used_bytes: int, entries: int, budget_bytes: int | None = None) -> None:
    CACHE_BYTES.labels(tier=tier).set(used_bytes)
    CACHE_ENTRIES.labels(tier=tier).set(entries)
    if budget_bytes is not None:
        CACHE_BUDGET_BYTES.labels(tier=tier).set(budget_bytes)


def set_model_residency(residency: dict[str, str]) -> None:
    """Replace the residency of every known model: ``{model name: cold|warm|hot}``."""
    for model, state in residency.items():
        if state not in RESIDENCY_STATES:
            raise ValueError(f"residency of {model!r} must be one of {RESIDENCY_STATES}, got {state!r}")
    MODEL_RESIDENCY.clear()
    for model, state in residency.items():
        MODEL_RESIDENCY.labels(model=model).state(state)
    MODELS_LOADED.set(sum(1 for state in residency.values() if state == "hot"))


def record_provider_health(provider: str, healthy: bool, at: float | None = None) -> None:
    PROVIDER_CHECKS.labels(provider=provider, result="ok" if healthy else "fail").inc()
    PROVIDER_UP.labels(provider=provider).set(1 if healthy else 0)
    if healthy:
        PROVIDER_LAST_HEALTHY.labels(provider=provider).set(at if at is not None else time.time())


def record_provider_restart(provider: str) -> None:
    PROVIDER_RESTARTS.labels(provider=provider).inc()


def observe_turn(provider: str, tier: Tier, ttft_s: float, total_s: float, *, prompt_tokens: int = 0,
                 cached_tokens: int = 0, evaluated_tokens: int = 0, completion_tokens: int = 0) -> None:
    POD_TTFT.labels(provider=provider, tier=tier).observe(ttft_s)
    POD_TURN_SECONDS.labels(provider=provider).observe(total_s)
    for kind, count in (("prompt", prompt_tokens), ("cached", cached_tokens),
                        ("evaluated", evaluated_tokens), ("completion", completion_tokens)):
        if count:
            POD_TOKENS.labels(provider=provider, kind=kind).inc(count)


def record_pod_finished(phase: str, duration_s: float | None = None) -> None:
    PODS_FINISHED.labels(phase=phase).inc()
    if duration_s is not None:
        POD_DURATION.labels(phase=phase).observe(duration_s)


def set_pod_phase_counts(counts: dict[str, int], phases: Iterable[str] = ()) -> None:
    """Set the per-phase pod gauge; phases in ``phases`` but not in ``counts`` read 0."""
    for phase in set(phases) | set(counts):
        PODS.labels(phase=phase).set(counts.get(phase, 0))


def record_receipt(outcome: str, append_s: float | None = None, log_size: int | None = None) -> None:
    RECEIPTS.labels(outcome=outcome).inc()
    if append_s is not None:
        RECEIPT_APPEND_SECONDS.observe(append_s)
    if log_size is not None:
        RECEIPT_LOG_SIZE.set(log_size)


def record_api_request(route: str, method: str, code: int, seconds: float) -> None:
    API_REQUESTS.labels(route=route, method=method, code=str(code)).inc()
    API_SECONDS.labels(route=route).observe(seconds)


def render() -> tuple[bytes, str]:
    """The exposition text of the registry and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

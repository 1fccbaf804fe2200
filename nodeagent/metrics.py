"""The agent's Prometheus metrics: one registry, the families, a small API.

Two kinds of families:

* events, counted where they happen through the functions below (never by
  creating collectors elsewhere), so every family has one home and one name;
* state (pods by phase, provider up, residency, cache tiers), read from the
  node when Prometheus scrapes, by `NodeStateCollector` over a `NodeSnapshot`:
  nothing has to remember to update it, and it can never go stale.

=================================================  =========  =========================================
family                                             type       source
=================================================  =========  =========================================
agent_machine_placements_total{provider,outcome}   counter    scheduler/executor: `record_placement`
agent_machine_placement_seconds                    histogram  scheduler/executor: `record_placement`
agent_machine_pod_ttft_seconds{provider,tier}      histogram  executor: `observe_turn`
agent_machine_pod_turn_seconds{provider}           histogram  executor: `observe_turn`
agent_machine_pod_tokens_total{provider,kind}      counter    executor: `observe_turn`
agent_machine_pods_finished_total{phase}           counter    node: `record_pod_finished`
agent_machine_pod_duration_seconds{phase}          histogram  node: `record_pod_finished`
agent_machine_provider_health_checks_total{..}     counter    reconcile: `record_provider_health`
agent_machine_provider_restarts_total{provider}    counter    reconcile: `record_provider_restart`
agent_machine_receipts_total{outcome}              counter    receipts: `record_receipt`
agent_machine_receipt_append_seconds               histogram  receipts: `record_receipt`
agent_machine_api_requests_total{route,method,co.  counter    api middleware
agent_machine_api_request_seconds{route}           histogram  api middleware
agent_machine_pods{phase}                          gauge      scrape: NodeSnapshot.pods_by_phase
agent_machine_provider_up{provider}                gauge      scrape: NodeSnapshot.providers
agent_machine_provider_checked_timestamp_seconds   gauge      scrape: NodeSnapshot.providers
agent_machine_model_residency{model,state}         gauge      scrape: NodeSnapshot.residency (1 = current)
agent_machine_models_loaded                        gauge      scrape: NodeSnapshot.residency
agent_machine_cache_bytes{tier}                    gauge      scrape: NodeSnapshot.cache_tiers
agent_machine_cache_budget_bytes{tier}             gauge      scrape: NodeSnapshot.cache_tiers
agent_machine_cache_entries{tier}                  gauge      scrape: NodeSnapshot.cache_tiers
agent_machine_cache_hits_total{tier}               counter    scrape: NodeSnapshot.cache_hits (persisted)
agent_machine_cache_misses_total                   counter    scrape: NodeSnapshot.cache_misses
agent_machine_cache_hit_tokens_total{tier}         counter    scrape: NodeSnapshot.cache_hit_tokens
=================================================  =========  =========================================

plus ``agent_machine_build_info`` and the standard ``process_*`` families.
Label values are bounded sets (provider and model names come from the node's
own configuration, never from request text), so cardinality stays small.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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



PROVIDER_CHECKS = Counter(f"{PREFIX}_provider_health_checks", "Provider health checks by result",
                          ["provider", "result"], registry=REGISTRY)
PROVIDER_RESTARTS = Counter(f"{PREFIX}_provider_restarts", "Provider restarts by the reconcile loop",
                            ["provider"], registry=REGISTRY)

POD_TTFT = Histogram(f"{PREFIX}_pod_ttft_seconds", "Time to first token of each pod turn",
                     ["provider", "tier"], buckets=_SLOW, registry=REGISTRY)
POD_TURN_SECONDS = Histogram(f"{PREFIX}_pod_turn_seconds", "Wall time of each pod turn", ["provider"],
                             buckets=_SLOW, registry=REGISTRY)
POD_TOKENS = Counter(f"{PREFIX}_pod_tokens", "Tokens by kind (prompt, cached, evaluated, completion)",
                     ["provider", "kind"], registry=REGISTRY)
TEMPLATE_DIVERGENCE = Counter(f"{PREFIX}_template_divergent_tokens",
                              "Tokens a provider held after a reply that the next turn's prompt did not extend "
                              "(the chat template re-rendered earlier turns or the reply re-tokenized differently); "
                              "recomputed, not reused", ["model"], registry=REGISTRY)
PODS_FINISHED = Counter(f"{PREFIX}_pods_finished", "Pods that reached a terminal phase", ["phase"],
                        registry=REGISTRY)
POD_DURATION = Histogram(f"{PREFIX}_pod_duration_seconds", "Submit-to-terminal time of each pod", ["phase"],
                         buckets=_SLOW, registry=REGISTRY)

RECEIPTS = Counter(f"{PREFIX}_receipts", "Execution receipts appended to the log, by pod outcome",
                   ["outcome"], registry=REGISTRY)
RECEIPT_APPEND_SECONDS = Histogram(f"{PREFIX}_receipt_append_seconds", "Time to sign, append and fsync one receipt",
                                   buckets=_FAST, registry=REGISTRY)

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





def record_provider_health(provider: str, healthy: bool) -> None:
    PROVIDER_CHECKS.labels(provider=provider, result="ok" if healthy else "fail").inc()


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


def record_template_divergence(model: str, tokens: int) -> None:
    TEMPLATE_DIVERGENCE.labels(model=model).inc(tokens)


def record_pod_finished(phase: str, duration_s: float | None = None) -> None:
    PODS_FINISHED.labels(phase=phase).inc()
    if duration_s is not None:
        POD_DURATION.labels(phase=phase).observe(duration_s)



def record_receipt(outcome: str, append_s: float | None = None) -> None:
    RECEIPTS.labels(outcome=outcome).inc()
    if append_s is not None:
        RECEIPT_APPEND_SECONDS.observe(append_s)


def record_api_request(route: str, method: str, code: int, seconds: float) -> None:
    API_REQUESTS.labels(route=route, method=method, code=str(code)).inc()
    API_SECONDS.labels(route=route).observe(seconds)


# ---------------------------------------------------------------- state read at scrape time
@dataclass
class ProviderSample:
    name: str
    up: bool
    checked_at: float | None = None  # unix time of the health check the state comes from


@dataclass
class TierSample:
    tier: str
    used_bytes: int
    entries: int
    budget_bytes: int | None = None


@dataclass
class NodeSnapshot:
    """What the node looks like now; any part it cannot tell stays empty/None."""

    pods_by_phase: dict[str, int] = field(default_factory=dict)
    phases: tuple[str, ...] = ()  # every phase, so absent ones read 0
    providers: list[ProviderSample] = field(default_factory=list)
    residency: dict[str, str] = field(default_factory=dict)  # model -> cold|warm|hot
    cache_tiers: list[TierSample] = field(default_factory=list)
    cache_hits: dict[str, int] = field(default_factory=dict)
    cache_misses: int | None = None
    cache_hit_tokens: dict[str, int] = field(default_factory=dict)


class NodeStateCollector:
    """Yields the state families from ``snapshot()`` on every scrape."""

    def __init__(self, snapshot: Callable[[], NodeSnapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list[Any]:
        return []  # do not take a snapshot at registration

    def collect(self) -> Iterator[Any]:
        snap = self._snapshot()
        pods = GaugeMetricFamily(f"{PREFIX}_pods", "Pods stored on this node by phase", labels=["phase"])
        for phase in sorted(set(snap.phases) | set(snap.pods_by_phase)):
            pods.add_metric([phase], snap.pods_by_phase.get(phase, 0))
        yield pods
        up = GaugeMetricFamily(f"{PREFIX}_provider_up", "1 if the provider's last health check passed",
                               labels=["provider"])
        checked = GaugeMetricFamily(f"{PREFIX}_provider_checked_timestamp_seconds",
                                    "Unix time of the provider health check behind provider_up", labels=["provider"])
        for provider in snap.providers:
            up.add_metric([provider.name], 1 if provider.up else 0)
            if provider.checked_at is not None:
                checked.add_metric([provider.name], provider.checked_at)
        yield up
        yield checked
        residency = GaugeMetricFamily(f"{PREFIX}_model_residency", "Residency of each known model: 1 for its "
                                      "current state (cold: on disk, warm: RAM, hot: loaded)", labels=["model", "state"])
        for model, state in sorted(snap.residency.items()):
            for candidate in RESIDENCY_STATES:
                residency.add_metric([model, candidate], 1 if candidate == state else 0)
        yield residency
        yield GaugeMetricFamily(f"{PREFIX}_models_loaded", "Models loaded in a provider (hot)",
                                value=sum(1 for state in snap.residency.values() if state == "hot"))
        used = GaugeMetricFamily(f"{PREFIX}_cache_bytes", "Bytes held in each cache tier", labels=["tier"])
        budget = GaugeMetricFamily(f"{PREFIX}_cache_budget_bytes", "Byte budget of each cache tier", labels=["tier"])
        entries = GaugeMetricFamily(f"{PREFIX}_cache_entries", "Saved states in each cache tier", labels=["tier"])
        for tier in snap.cache_tiers:
            used.add_metric([tier.tier], tier.used_bytes)
            entries.add_metric([tier.tier], tier.entries)
            if tier.budget_bytes is not None:
                budget.add_metric([tier.tier], tier.budget_bytes)
        yield used
        yield budget
        yield entries
        hits = CounterMetricFamily(f"{PREFIX}_cache_hits", "Prefix lookups served from each cache tier",
                                   labels=["tier"])
        for tier, count in sorted(snap.cache_hits.items()):
            hits.add_metric([tier], count)
        yield hits
        hit_tokens = CounterMetricFamily(f"{PREFIX}_cache_hit_tokens", "Prompt tokens served from each cache tier",
                                         labels=["tier"])
        for tier, count in sorted(snap.cache_hit_tokens.items()):
            hit_tokens.add_metric([tier], count)
        yield hit_tokens
        if snap.cache_misses is not None:
            yield CounterMetricFamily(f"{PREFIX}_cache_misses", "Prefix lookups no tier could serve",
                                      value=snap.cache_misses)


def render(snapshot: Callable[[], NodeSnapshot] | None = None) -> tuple[bytes, str]:
    """The exposition text (event families, then the node's state when given) and its content type."""
    body = generate_latest(REGISTRY)
    if snapshot is not None:
        state = CollectorRegistry(auto_describe=False)
        state.register(NodeStateCollector(snapshot))  # type: ignore[arg-type]
        body += generate_latest(state)
    return body, CONTENT_TYPE_LATEST

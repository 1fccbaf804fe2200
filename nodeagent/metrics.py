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

plus ``agent_machine_build_info`` and the standard ``process_*`` families, and
the families the Gateway API Inference Extension's model-server protocol asks
of a backend, per model, under vLLM's names (a stock Endpoint Picker reads
them by default; `ModelServerCollector`, read at scrape time from the executor):

=================================================  =========  =========================================
vllm:num_requests_waiting{model_name}              gauge      pods of the model admitted, not on an engine
vllm:num_requests_running{model_name}              gauge      the model's contexts running a turn now
vllm:kv_cache_usage_perc{model_name}               gauge      held tokens / context tokens of its contexts, 0..1
vllm:gpu_cache_usage_perc{model_name}              gauge      the same, under the name vLLM used before v0.10
vllm:lora_requests_info{running_lora_adapters,..}  gauge      no adapters (the EPP's LoRA affinity sees none)
vllm:cache_config_info{block_size,num_gpu_blocks}  gauge      the KV block size and blocks the contexts hold
=================================================  =========  =========================================
Label values are bounded sets (provider and model names come from the node's
own configuration, never from request text), so cardinality stays small.
"""

from __future__ import annotations

import time
import weakref
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


# ---------------------------------------------------------------- GAIE's model-server protocol
@dataclass
class ModelServerSample:
    """One model's load as an inference gateway's endpoint picker reads it."""

    model: str
    waiting: int = 0
    running: int = 0
    held_tokens: int = 0
    capacity_tokens: int = 0
    contexts: int = 0

    @property
    def kv_usage(self) -> float:
        return min(1.0, self.held_tokens / self.capacity_tokens) if self.capacity_tokens else 0.0


class ModelServerCollector:
    """The GAIE model-server protocol's families (proposal 003-model-server-protocol), named as
    vLLM names them because the Endpoint Picker's defaults are vLLM's
    (``--total-queued-requests-metric vllm:num_requests_waiting``,
    ``--total-running-requests-metric vllm:num_requests_running``, ``--kv-cache-usage-percentage-metric
    vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc`` before), ``--lora-info-metric
    vllm:lora_requests_info``). One series per model (label ``model_name``, as vLLM's): a node
    serving several models is read per model by a selector in the flag, e.g.
    ``vllm:num_requests_waiting{model_name="smollm2"}``.
    """

    def __init__(self, samples: Callable[[], tuple[list[ModelServerSample], int]]) -> None:
        self._samples = samples

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        samples, block_size = self._samples()
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests of the model waiting for an engine "
                                    "(GAIE model-server protocol: queued requests)", labels=["model_name"])
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests of the model running on an engine now",
                                    labels=["model_name"])
        usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "Fraction of the model's KV context tokens in use "
                                  "(0..1: held tokens over the context of its slots)", labels=["model_name"])
        usage_old = GaugeMetricFamily("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc under vLLM's name "
                                      "before v0.10", labels=["model_name"])
        blocks = GaugeMetricFamily("vllm:cache_config_info", "KV cache configuration (value 1)",
                                   labels=["model_name", "block_size", "num_gpu_blocks"])
        for sample in samples:
            waiting.add_metric([sample.model], sample.waiting)
            running.add_metric([sample.model], sample.running)
            usage.add_metric([sample.model], sample.kv_usage)
            usage_old.add_metric([sample.model], sample.kv_usage)
            blocks.add_metric([sample.model, str(block_size), str(sample.capacity_tokens // max(1, block_size))], 1)
        yield from (waiting, running, usage, usage_old, blocks)
        lora = GaugeMetricFamily("vllm:lora_requests_info", "LoRA adapters running and waiting (none: this node "
                                 "serves base models); value: unix time", labels=["running_lora_adapters",
                                                                                  "waiting_lora_adapters", "max_lora"])
        lora.add_metric(["", "", "0"], time.time())
        yield lora


_MODEL_SERVERS: "tuple[weakref.ref[Any], int] | None" = None  # (the executor, [models] context)


def watch_model_servers(executor: Any, config: Any) -> None:
    """Serve the GAIE families for ``executor`` from the event registry (the newest node of the
    process wins: a daemon has one; tests make many)."""
    global _MODEL_SERVERS
    first = _MODEL_SERVERS is None
    _MODEL_SERVERS = (weakref.ref(executor), config.models.context)
    if first:
        REGISTRY.register(ModelServerCollector(_current_samples))  # type: ignore[arg-type]


def _current_samples() -> tuple[list[ModelServerSample], int]:
    executor, default_context = (_MODEL_SERVERS[0](), _MODEL_SERVERS[1]) if _MODEL_SERVERS else (None, 0)
    if executor is None:
        return [], 0
    try:
        return model_server_samples(executor, default_context), executor.block_tokens
    except Exception as exc:  # noqa: BLE001 - a scrape reports what it can
        import logging

        logging.getLogger("agent_machine.metrics").warning("metrics: model servers unavailable: %s: %s",
                                                           type(exc).__name__, exc)
        return [], 0


def model_server_samples(executor: Any, default_context: int) -> list[ModelServerSample]:
    """Per model: requests waiting (admitted pods of the model not on an engine now), running
    (contexts running a turn), and held / capacity tokens of its contexts (a context's
    capacity: the declared ``ctx_per_slot``, else ``[models] context``)."""
    from nodeagent.contracts.pod import PodPhase
    from nodeagent.execution import model_name

    names: dict[str, str] = {}  # digest -> name
    resolved: dict[str, str | None] = {}  # a pod's model text -> digest

    def name_of(digest: str) -> str:
        if digest not in names:
            try:
                names[digest] = model_name(executor.models.get(digest))
            except Exception:
                names[digest] = digest[:19]
        return names[digest]

    samples: dict[str, ModelServerSample] = {}
    for record in executor.models.list():  # a cold model is served too (it loads): zeros, not absent
        names.setdefault(record.digest, model_name(record))
        samples[record.digest] = ModelServerSample(names[record.digest])
    for managed in executor.pool.all():
        sample = samples.setdefault(managed.model_digest, ModelServerSample(name_of(managed.model_digest)))
        sample.contexts += 1
        sample.running += 1 if managed.running is not None else 0
        sample.held_tokens += len(managed.held.tokens)
        sample.capacity_tokens += _context_tokens(executor, managed.model_digest, default_context)
    in_flight: dict[str, int] = {}
    for phase in (PodPhase.pending, PodPhase.admitted, PodPhase.placed, PodPhase.running):
        for pod in executor.node.list_pods(phase=phase, limit=100_000):
            text = pod.spec.model.digest or pod.spec.model.name
            if text not in resolved:
                try:
                    resolved[text] = executor.models.resolve(text).digest
                except Exception:
                    resolved[text] = None  # a model this node does not have: its pod fails, never queues
            digest = resolved[text]
            if digest is not None:
                in_flight[digest] = in_flight.get(digest, 0) + 1
    for digest, count in in_flight.items():
        sample = samples.setdefault(digest, ModelServerSample(name_of(digest)))
        sample.waiting = max(0, count - sample.running)
    return sorted(samples.values(), key=lambda s: s.model)


def _context_tokens(executor: Any, digest: str, default_context: int) -> int:
    fleet = getattr(executor, "fleet", None)  # the declared fleet: absent on a bare executor
    if fleet is not None:
        try:
            options = fleet.load_request_options(executor.models.get(digest))
        except Exception:
            options = {}
        if options.get("n_ctx"):
            return int(options["n_ctx"]) // max(1, int(options.get("n_parallel") or 1))
    return default_context


def render(snapshot: Callable[[], NodeSnapshot] | None = None) -> tuple[bytes, str]:
    """The exposition text (event families, then the node's state when given) and its content type."""
    body = generate_latest(REGISTRY)
    if snapshot is not None:
        state = CollectorRegistry(auto_describe=False)
        state.register(NodeStateCollector(snapshot))  # type: ignore[arg-type]
        body += generate_latest(state)
    return body, CONTENT_TYPE_LATEST

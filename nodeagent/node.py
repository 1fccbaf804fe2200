"""`Node`: wires probe, models, cache, scheduler, pods and receipts together.

The API, the daemon and the CLI are thin shells over one `Node`. It owns:

* the SQLite connection (one per node; components share it),
* the cached `MachineProfile`,
* the pod queue: `submit_pod` admits and enqueues, dispatcher threads run pods
  one turn at a time through `PodExecutor`, and every pod ends in a terminal
  phase with a receipt,
* the reconcile step the daemon calls periodically.

Thread model: the API calls into the node from its threads; pod execution runs
on the node's dispatcher threads; SQLite access is serialized by ``_db_lock``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator

from nodeagent.admission import AdmissionRequest, Policy
from nodeagent.config import LoadedConfig, load_config
from nodeagent.contracts.machine import MachineProfile
from nodeagent.contracts.pod import TERMINAL_PHASES, AgentPod, PodPhase
from nodeagent.idempotency import IdempotencyKey, IdempotencyStore, IdempotentReplay
from nodeagent.pods import PodNotFound, PodStore
from nodeagent.textstream import TextStream
from nodeagent.toolcalls import ToolCallFormat, detect_format
from nodeagent.store import connect

log = logging.getLogger("agent_machine.node")


class QueueFull(RuntimeError):
    """The pod queue is at `queue.max_pods`; retry after ``retry_after_s``."""

    def __init__(self, limit: int, retry_after_s: int) -> None:
        super().__init__(f"pod queue is full ({limit} pods in flight); retry in {retry_after_s}s")
        self.limit = limit
        self.retry_after_s = retry_after_s


class NodeClosed(RuntimeError):
    """The node is draining or stopped and accepts no new pods."""


@dataclass
class _Cancel:
    event: threading.Event = field(default_factory=threading.Event)


class Node:
    def __init__(self, loaded: LoadedConfig | None = None, *,
                 probe_fn: Callable[..., MachineProfile] | None = None,
                 executor_factory: Callable[["Node"], "object"] | None = None,
                 dispatchers: int = 1) -> None:
        self.loaded = loaded or load_config()
        self.config = self.loaded.config
        self.paths = self.loaded.paths
        self.paths.state_dir.mkdir(parents=True, exist_ok=True)
        self.db = connect(self.paths.db_file)
        self._db_lock = threading.RLock()
        self.pods = PodStore(self.db)
        self.idempotency = IdempotencyStore(self.db)
        self.policy = Policy.load(self.config.policy.path)
        self._probe_fn = probe_fn
        self._profile: MachineProfile | None = None
        self._profile_lock = threading.Lock()
        self._queue: "queue.Queue[str | None]" = queue.Queue()
        self._cancels: dict[str, _Cancel] = {}
        self._accepting = True
        self._dispatch_paused = threading.Event()
        self._dispatchers: list[threading.Thread] = []
        self._dispatching: dict[str, str] = {}  # dispatcher thread name -> the pod it runs
        # Pods a dispatcher has taken: only their executor ends them (see cancel_pod).
        self._claimed: set[str] = set()
        self._claim_lock = threading.Lock()
        self._supervise_lock = threading.Lock()  # the watchdog runs from the event loop and the reconcile thread
        self._streams: dict[str, TextStream] = {}  # pod id -> the client reading its answer as it comes
        self._n_dispatchers = dispatchers
        self._executor_factory = executor_factory
        self.executor = None
        self.started_at = time.time()

    # ------------------------------------------------------------ lifecycle
    def start(self) -> list[str]:
        """Recover from a previous crash, then start dispatching. Returns recovered pod ids.

        A pod that was in flight when the agent died ends Failed with reason
        ``agent-restart``, and (with an executor) a receipt saying so.
        """
        from nodeagent.pods import RESTART_REASON

        if self._executor_factory is not None:
            self.executor = self._executor_factory(self)
        with self._db_lock:
            in_flight = self.pods.in_flight_ids()
        for pod_id in in_flight:  # no stored pod stops the start
            try:
                self._finish(pod_id, PodPhase.failed, RESTART_REASON,
                             reasons=["the agent restarted while this pod was in flight"], error_class="AgentRestart")
            except Exception as exc:  # a document this agent cannot read (stored under older rules)
                log.error("pod %s: its stored document is unreadable (%s: %s); it ends Failed without a receipt",
                          pod_id, type(exc).__name__, exc)
                with self._db_lock:
                    self.pods.transition(pod_id, PodPhase.failed, reason=RESTART_REASON,
                                         reasons=[f"the agent restarted; the stored pod is unreadable: "
                                                  f"{type(exc).__name__}"])
        recovered = in_flight
        if self.executor is not None:
            threading.Thread(target=self._load_recorded_intents, name="load-intents", daemon=True).start()
        for index in range(self._n_dispatchers):
            self._dispatchers.append(self._start_dispatcher(index))
        return recovered

    def _load_recorded_intents(self) -> None:
        """Start the declared eager providers, then load the models `agent-machine models load`
        recorded while no agent ran."""
        from nodeagent.models.residency import intents

        self.start_eager_providers()
        with self._db_lock:
            wanted = intents(self.db)
        for intent in wanted:
            try:
                keep = intent.get("keep_alive_s")
                self.load_model(intent["digest"], keep_alive_s=keep, pin=bool(intent.get("pinned")) or None)
            except Exception as exc:  # one bad intent must not stop the others or the agent
                log.warning("recorded load of %s failed: %s", intent.get("digest"), exc)

    def start_eager_providers(self) -> list[str]:
        """Load every declared ``load = "eager"`` model that is not loaded (pinned: a declared
        always-on fleet is not evicted); a failed start backs off. Returns those started."""
        fleet = getattr(self.executor, "fleet", None)
        residency = getattr(getattr(self.executor, "pool", None), "residency", None)
        if fleet is None or residency is None:
            return []
        started = []
        now = time.time()
        for model in fleet.eager_due(set(residency.loaded_digests()), now):
            try:
                self.executor.pool.load(model.record, pin=True)
            except Exception as exc:  # one bad provider must not stop the others or the agent
                delay = fleet.start_failed(model, now, self.config.reconcile.interval_s)
                log.error("declared provider %s did not start: %s: %s (next try in %.0fs)", model.name,
                          type(exc).__name__, exc, delay)
                continue
            fleet.started(model)
            started.append(model.name)
        return started

    def drain(self, timeout_s: float = 30.0) -> None:
        """Stop accepting pods, let in-flight pods finish within ``timeout_s``, cancel the rest."""
        self._accepting = False
        self._dispatch_paused.clear()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._in_flight_count() > 0:
            time.sleep(0.05)
        with self._db_lock:
            leftovers = [p.id for p in self.pods.in_flight()]
        for pod_id in leftovers:
            self.cancel_pod(pod_id, reason="agent draining (SIGTERM)")
        for _ in self._dispatchers:
            self._queue.put(None)
        for thread in self._dispatchers:
            thread.join(timeout=max(0.1, deadline - time.monotonic()) + 5)
        self._dispatchers.clear()

    def close(self) -> None:
        if self._dispatchers:
            self.drain(timeout_s=0)
        if self.executor is not None and hasattr(self.executor, "close"):
            self.executor.close()
        self.db.close()

    def pause_dispatch(self) -> None:
        """Keep accepting pods but start none (maintenance); `resume_dispatch` undoes it."""
        self._dispatch_paused.set()

    def resume_dispatch(self) -> None:
        self._dispatch_paused.clear()

    @property
    def accepting(self) -> bool:
        return self._accepting

    def ready(self) -> bool:
        return self._accepting and bool(self._dispatchers) and all(t.is_alive() for t in self._dispatchers)

    # ------------------------------------------------------------ machine
    def cached_machine(self) -> MachineProfile | None:
        """The profile if one was probed already; never blocks on a probe."""
        return self._profile

    def machine(self, refresh: bool = False) -> MachineProfile:
        with self._profile_lock:
            if self._profile is None or refresh:
                probe_fn = self._probe_fn
                if probe_fn is None:
                    from nodeagent.probe import probe as probe_fn
                self._profile = probe_fn(state_dir=self.paths.state_dir, cache_dir=self.paths.cache_dir)
            return self._profile

    # ------------------------------------------------------------ pods
    def submit_pod(self, pod: AgentPod, *, idempotency: IdempotencyKey | None = None,
                   stream: "TextStream | None" = None) -> AgentPod:
        """Persist, admit and enqueue ``pod``. Refused pods end at once (with reasons).

        Raises QueueFull before persisting anything when the queue is at capacity.
        With ``idempotency``: a key this node already stored with the same request
        raises `IdempotentReplay` carrying the pod it made (nothing new is stored),
        with another request `IdempotencyConflict`; a new key is stored in the
        pod's own transaction (nodeagent.idempotency). With ``stream``, the pod's
        answer is passed to it piece by piece as the provider generates it.
        """
        if idempotency is not None:
            self._replay(idempotency)
        if not self._accepting:
            raise NodeClosed("the agent is draining and accepts no new pods")
        if self.executor is not None and hasattr(self.executor, "validate"):
            self.executor.validate(pod)  # raises PodInvalid naming the field
        limit = self.config.queue.max_pods
        with self._db_lock:
            if idempotency is not None:
                self._replay(idempotency)  # one with the same key may have been stored meanwhile
            if self._in_flight_count() >= limit:
                raise QueueFull(limit, retry_after_s=self._retry_after())
            decision = self.policy.decide(AdmissionRequest(pod=pod))
            stored = self.pods.create(pod, idempotency=idempotency, policy=decision)  # Admitted if allowed
        if decision.allowed:
            self._cancels[stored.id] = _Cancel()
            if stream is not None:
                self._streams[stored.id] = stream  # before it is queued: no piece is missed
            self._queue.put(stored.id)
            return stored  # as admitted: a dispatcher may already be moving it on
        self._finish(stored.id, PodPhase.refused, "admission", reasons=decision.reasons)
        return self.get_pod(stored.id)

    def _replay(self, key: IdempotencyKey) -> None:
        with self._db_lock:
            pod_id = self.idempotency.find(key)
            if pod_id is not None:
                raise IdempotentReplay(self.pods.get(pod_id))

    def get_pod(self, pod_id: str) -> AgentPod:
        with self._db_lock:
            return self.pods.get(pod_id)

    def list_pods(self, *, phase: PodPhase | None = None, tenant: str | None = None, limit: int = 100) -> list[AgentPod]:
        with self._db_lock:
            return self.pods.list(phase=phase, tenant=tenant, limit=limit)

    def cancel_pod(self, pod_id: str, reason: str = "cancelled by request") -> AgentPod:
        """Cancel a pod that has not finished; a finished pod is returned unchanged."""
        pod = self.get_pod(pod_id)  # raises PodNotFound
        if pod.status.phase in TERMINAL_PHASES:
            return pod
        cancel = self._cancels.get(pod_id)
        if cancel is not None:
            cancel.event.set()
        with self._claim_lock:
            # A pod a dispatcher has claimed is ended by its executor (it checks the flag
            # before each turn and stops a generation in progress), so one pod never gets
            # two endings; one not yet claimed is ended here, before any dispatcher can.
            if pod_id not in self._claimed:
                self._finish(pod_id, PodPhase.cancelled, reason)
        return self.get_pod(pod_id)

    def text_sink(self, pod_id: str) -> "TextStream | None":
        """Where the pod's answer streams to, if a client is reading it as it comes."""
        return self._streams.get(pod_id)

    def _end_stream(self, pod_id: str) -> None:
        stream = self._streams.pop(pod_id, None)
        if stream is not None:
            stream.close()

    def is_cancelled(self, pod_id: str) -> bool:
        cancel = self._cancels.get(pod_id)
        return cancel is not None and cancel.event.is_set()

    def pod_transition(self, pod_id: str, phase: PodPhase, reason: str | None = None,
                       reasons: list[str] | None = None) -> None:
        with self._db_lock:
            self.pods.transition(pod_id, phase, reason=reason, reasons=reasons or [])
            created = self.pods.created_at(pod_id) if phase in TERMINAL_PHASES else None
        if created is not None:
            from nodeagent import metrics

            metrics.record_pod_finished(phase.value, max(0.0, time.time() - created))

    def pod_started(self, pod_id: str, reason: str | None, policy=None) -> None:
        """Placed and Running (with the verdict admission reached on the prompt's tokens) at once."""
        with self._db_lock:
            self.pods.start(pod_id, reason, policy)

    def pod_phase_counts(self) -> dict[str, int]:
        with self._db_lock:
            return dict(self.pods.phase_counts())

    def record_turn(self, pod_id: str, result, receipt_id: str | None = None) -> None:
        """A finished turn and its (already durable) receipt, in one transaction."""
        with self._db_lock:
            self.pods.record_turn(pod_id, result, receipt_id)

    def record_policy(self, pod_id: str, decision) -> None:
        """Keep the latest admission verdict (a `PolicyDecision`) with the pod."""
        with self._db_lock:
            self.pods.set_policy(pod_id, decision)

    def add_receipt(self, pod_id: str, receipt_id: str) -> None:
        with self._db_lock:
            self.pods.add_receipt(pod_id, receipt_id)

    # ------------------------------------------------------------ models
    def _need_executor(self):
        if self.executor is None:
            raise NodeClosed("this node runs without providers (started without an executor)")
        return self.executor

    def list_models(self) -> list:
        models = getattr(self.executor, "models", None)
        if models is not None:
            return models.list()
        from nodeagent.models.store import ModelStore

        store = ModelStore(self.paths.state_dir)
        try:
            return store.list()
        finally:
            store.close()

    def list_residency(self) -> list:
        executor = self.executor
        residency = getattr(getattr(executor, "pool", None), "residency", None)
        return residency.snapshot() if residency is not None else []

    def load_model(self, name: str, *, keep_alive_s: float | None = None, pin: bool | None = None):
        """Load ``name`` into a provider (evicting by expected cost); returns its residency row."""
        executor = self._need_executor()
        record = executor.models.resolve(name)
        options = {k: v for k, v in (("keep_alive_s", keep_alive_s), ("pin", pin)) if v is not None}
        residency = executor.pool.residency
        if not executor.pool.for_model(record.digest):
            executor.pool.load(record, **options)
        elif residency is not None and options:
            held = residency.resident.get(record.digest)
            if held is not None:
                residency.load(held.request, **options)  # already loaded: only its keep-alive / pin change
        return next((r for r in self.list_residency() if r.digest == record.digest), None)

    def unload_model(self, name: str, *, force: bool = False) -> bool:
        executor = self._need_executor()
        record = executor.models.resolve(name)
        residency = executor.pool.residency
        unloaded = residency.unload(record.digest, force=force) if residency is not None else False
        for managed in executor.pool.all():
            if managed.model_digest == record.digest and not getattr(managed.provider, "running", True):
                executor.pool.remove(managed.name)
        return unloaded

    # ------------------------------------------------------------ providers, cache, placement
    def list_providers(self) -> list:
        """Every context the node places turns on, one row each (a llama-server slot is one)."""
        from nodeagent.contracts.provider import ProviderStatus

        pool = getattr(self.executor, "pool", None)
        if pool is None:
            return []
        rows = []
        for managed in pool.all():
            health = managed.check_health()
            running = getattr(managed.provider, "running", health.ok)
            held = managed.held
            replica = getattr(managed.provider, "replica", None)
            rows.append(ProviderStatus(
                name=managed.name, provider=managed.kind, mode=managed.launch_mode,
                state="running" if running and health.ok else ("unhealthy" if running else "stopped"),
                pid=getattr(managed.provider, "pid", None), health=health.detail,
                model_digest=managed.model_digest, checked_at=utcnow(),
                last_healthy_at=_utc_or_none(managed.last_healthy_at),
                reason=None if health.ok else health.detail,
                endpoint=getattr(getattr(replica, "server", None), "base_url", None),
                replica=managed.group or managed.name, slot=getattr(managed.provider, "slot", 0),
                held_tokens=len(held.tokens), owner=held.spans[-1][1].owner if held.spans else None,
                busy=managed.turns.busy(), queued=managed.queued_requests))
        return rows

    def fleet_view(self) -> dict:
        """Which rule made the fleet, and each declared (or defaulted) model's replicas."""
        fleet = getattr(self.executor, "fleet", None)
        return fleet.describe() if fleet is not None else {"rule": "no executor", "declared": [], "adopted": []}

    def cache_summary(self):
        executor = self._need_executor()
        if executor.cache is None:
            raise NodeClosed("this node runs without a KV cache")
        return executor.cache.stats()

    def cache_entries(self, *, tenant: str | None = None) -> list:
        """Saved KV states (CacheEntry), of one tenant when ``tenant`` is given."""
        return self._need_cache().entries(tenant=tenant)

    def cache_entry(self, entry_id: str):
        """One CacheEntry by id, or None."""
        return self._need_cache().get(entry_id)

    def _need_cache(self):
        executor = self._need_executor()
        if executor.cache is None:
            raise NodeClosed("this node runs without a KV cache")
        return executor.cache

    def score_pod(self, pod: AgentPod):
        """A dry-run PlacementDecision for the pod's first turn: nothing runs, nothing is reserved."""
        executor = self._need_executor()
        executor.validate(pod)
        return executor.score(pod).to_contract()

    def pod_decisions(self, pod_id: str) -> list:
        executor = self.executor
        return [d.to_contract() for d in getattr(executor, "decisions", {}).get(pod_id, [])]

    def pod_conflicts(self) -> list[dict]:
        """In-flight pods that contend for one provider or would evict each other's cache.

        * provider: pods placed on the same provider take turns on its one
          context, so each turn displaces the other's live prefix (T0) and must
          restore or recompute it;
        * cache: the saved states the in-flight pods need together exceed the
          RAM tier (T1), so keeping one warm demotes another's to disk (T2).
        """
        from nodeagent.models.fit import kv_bytes_per_layer

        executor = self.executor
        with self._db_lock:
            in_flight = self.pods.in_flight()
        decisions = getattr(executor, "decisions", {})
        conflicts: list[dict] = []
        by_provider: dict[str, list[str]] = {}
        for pod in in_flight:
            placed = decisions.get(pod.id)
            provider = placed[-1].provider if placed else pod.spec.provider
            if provider:
                by_provider.setdefault(provider, []).append(pod.id)
        for provider, ids in sorted(by_provider.items()):
            if len(ids) > 1:
                conflicts.append({"kind": "provider", "provider": provider, "pods": ids,
                                  "detail": f"{len(ids)} pods share {provider}'s context: each turn displaces "
                                            f"the others' live prefix (T0), which must be restored or recomputed"})
        cache = getattr(executor, "cache", None)
        if cache is None or not in_flight:
            return conflicts
        needs: dict[str, int] = {}
        for pod in in_flight:
            placed = decisions.get(pod.id)
            if not placed:
                continue
            try:
                record = executor.models.resolve(pod.spec.model.digest or pod.spec.model.name)
                meta = executor.models.meta(record)
            except Exception:
                continue
            tokens = placed[-1].request.prompt_tokens + sum(t.max_tokens for t in pod.spec.turns)
            needs[pod.id] = kv_bytes_per_layer(meta, tokens, "f16") * meta.n_layer
        budget = cache.stores["T1"].budget_bytes
        if len(needs) > 1 and sum(needs.values()) > budget:
            conflicts.append({"kind": "cache", "tier": "T1", "pods": sorted(needs),
                              "needBytes": sum(needs.values()), "budgetBytes": budget,
                              "detail": f"their saved states need {sum(needs.values())} bytes together; the RAM "
                                        f"tier holds {budget}: keeping one warm demotes another's to disk"})
        return conflicts

    # ------------------------------------------------------------ receipts
    def _receipt_reader(self):
        from nodeagent.receipts import LogReader, receipts_dir

        return LogReader(receipts_dir(self.paths.state_dir))

    def get_receipt(self, selector: str):
        """The receipt by id (leaf hash), seq, or run id, as an ExecutionReceipt."""
        with self._receipt_reader() as reader:
            return reader.view(reader.find(int(selector) if selector.isdigit() else selector))[0]

    def list_receipts(self, since: int = 0, limit: int = 100, *, tenant: str | None = None) -> list:
        """Receipts with seq >= ``since``, oldest first (a planner polls with the last seq + 1);
        only those of ``tenant``'s pods when it is given."""
        with self._receipt_reader() as reader:
            rows = [r for r in reader.rows(tenant=tenant, newest_first=False)
                    if r.seq >= since and r.kind == "execution"]
            return [reader.view(row)[0] for row in rows[:limit]]

    def latest_checkpoint(self) -> dict | None:
        executor = self.executor
        receipts_log = getattr(executor, "receipts", None)
        if receipts_log is not None and receipts_log.size:
            # On demand: a planner asking wants the current size signed (an empty log has nothing to sign).
            receipts_log.checkpoint()
        from nodeagent.receipts import receipts_dir
        from nodeagent.receipts.log import LOG_FILE

        if not (receipts_dir(self.paths.state_dir) / LOG_FILE).exists():
            return None  # no entry yet, so nothing signed
        with self._receipt_reader() as reader:
            found = reader.latest_checkpoint()
        return None if found is None else {"size": found[0], "checkpoint": found[1]}

    # ------------------------------------------------------------ OpenAI
    def chat_completion(self, body: dict, *, tenant: str = "default", agent: str = "openai",
                        idempotency: IdempotencyKey | None = None, timeout_s: float = 600.0):
        """Run an OpenAI chat request as a one-turn pod of ``tenant``/``agent`` and answer in
        OpenAI's shape: a ``chat.completion`` dict, or with ``stream: true`` an iterator of
        ``chat.completion.chunk`` dicts that yields text as the provider generates it
        (closing it early cancels the generation). A replayed ``idempotency`` key answers
        from the pod it made instead."""
        from nodeagent.openai_compat import chat_request_to_pod, pod_to_chat_response

        pod = chat_request_to_pod(body, tenant=tenant, agent=agent, default_model=self.config.models.default)
        stream = TextStream() if body.get("stream") else None
        try:
            submitted = self.submit_pod(pod, idempotency=idempotency, stream=stream)
        except IdempotentReplay as replay:
            submitted, stream = replay.pod, None
        try:
            tool_format = self._tool_format(submitted)
        except Exception:
            with contextlib.suppress(PodNotFound):  # nobody will read its answer
                self.cancel_pod(submitted.id, reason="its model's chat template could not be read")
            raise
        if body.get("stream"):
            if submitted.status.phase is PodPhase.refused:  # before any chunk: the client gets a plain error
                from nodeagent.openai_compat import ChatCompletionFailed

                raise ChatCompletionFailed(submitted)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return self._chat_stream(submitted, stream, include_usage, timeout_s, tool_format)
        return pod_to_chat_response(self._wait_terminal(submitted.id, timeout_s), tool_format)

    def _tool_format(self, pod: AgentPod) -> ToolCallFormat | None:
        """The tool-call format of the pod's model (its chat template's), when the pod gave
        the model tools; without tools a reply is content, whatever it looks like."""
        if not pod.spec.tools:
            return None
        executor = self._need_executor()
        record = executor.models.resolve(pod.spec.model.digest or pod.spec.model.name)
        return detect_format(executor.template(record).source)

    def _wait_terminal(self, pod_id: str, timeout_s: float) -> AgentPod:
        deadline = time.monotonic() + timeout_s
        while True:
            current = self.get_pod(pod_id)
            if current.status.phase in TERMINAL_PHASES:
                return current
            if time.monotonic() > deadline:
                self.cancel_pod(pod_id, reason="request timed out")
                raise TimeoutError(f"pod {pod_id} did not finish within {timeout_s:g}s")
            time.sleep(0.01)

    def _chat_stream(self, pod: AgentPod, stream: "TextStream | None", include_usage: bool, timeout_s: float,
                     tool_format: ToolCallFormat | None = None) -> Iterator[dict]:
        from nodeagent.openai_compat import chat_chunks

        model, created = pod.spec.model.name or pod.spec.model.digest or "unknown", int(time.time())
        return self._streamed(pod, stream, timeout_s, lambda pieces, finished: chat_chunks(
            pod.id, model, created, pieces, finished, include_usage=include_usage, tool_format=tool_format))

    def completion(self, body: dict, *, tenant: str = "default", agent: str = "openai",
                   idempotency: IdempotencyKey | None = None, timeout_s: float = 600.0):
        """Run an OpenAI text completion (``prompt``: the model's whole input, no chat template)
        as a one-turn pod of ``tenant``/``agent``: a ``text_completion`` dict, or with
        ``stream: true`` an iterator of ``text_completion`` chunks yielded as the provider
        generates the text (closing it early cancels the generation). A replayed
        ``idempotency`` key answers from the pod it made instead."""
        from nodeagent.openai_compat import (ChatCompletionFailed, completion_chunks, completion_request_to_pod,
                                             pod_to_completion_response)

        pod = completion_request_to_pod(body, tenant=tenant, agent=agent)
        stream = TextStream() if body.get("stream") else None
        try:
            submitted = self.submit_pod(pod, idempotency=idempotency, stream=stream)
        except IdempotentReplay as replay:
            submitted, stream = replay.pod, None
        if not body.get("stream"):
            return pod_to_completion_response(self._wait_terminal(submitted.id, timeout_s))
        if submitted.status.phase is PodPhase.refused:  # before any chunk: the client gets a plain error
            raise ChatCompletionFailed(submitted)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        model, created = submitted.spec.model.name or submitted.spec.model.digest, int(time.time())
        return self._streamed(submitted, stream, timeout_s, lambda pieces, finished: completion_chunks(
            submitted.id, model, created, pieces, finished, include_usage=include_usage))

    def _streamed(self, pod: AgentPod, stream: TextStream | None, timeout_s: float,
                  chunks: Callable[[Iterator[str], Callable[[], AgentPod]], Iterator[dict]]) -> Iterator[dict]:
        """``chunks(pieces, finished)`` over the pod's answer as the provider generates it (a
        replay, ``stream`` None: the answer whole, once the pod ended); closing the iterator
        early (the client went away) cancels the generation."""
        def ended() -> bool:
            return self.get_pod(pod.id).status.phase in TERMINAL_PHASES

        def finished() -> AgentPod:
            return self._wait_terminal(pod.id, timeout_s)

        if stream is None:
            done = finished()
            pieces = iter([done.status.turns[-1].output] if done.status.turns else [])
        else:
            pieces = stream.pieces(ended=ended, timeout_s=timeout_s)
        try:
            yield from chunks(pieces, finished)
        except GeneratorExit:
            if stream is not None:
                stream.cancel()
            with contextlib.suppress(PodNotFound):
                self.cancel_pod(pod.id, reason="client disconnected")
            with self._db_lock:
                self.idempotency.release(pod.id)  # a retry with its key runs again
            raise

    # ------------------------------------------------------------ daemon hooks
    def reconcile_once(self) -> dict:
        """One pass of the daemon's loop: keep-alive unloads, provider health, checkpoints.

        A provider is healthy while its health check answered within 3 x the
        reconcile interval; past that it is restarted, with exponential backoff
        (interval x 2^failures, at most 5 minutes) between attempts.
        """
        from nodeagent import metrics
        from nodeagent.providers.base import ProviderError

        report: dict = {"unloaded": [], "restarted": [], "unhealthy": [], "checkpoint": False,
                        "dispatchers_restarted": self.supervise_dispatchers()}
        executor = self.executor
        pool = getattr(executor, "pool", None)
        if pool is None:
            return report
        interval = self.config.reconcile.interval_s
        residency = pool.residency
        if residency is not None:
            report["unloaded"] = residency.tick()
        loaded = residency.loaded_digests() if residency is not None else None
        now = time.time()
        for managed in pool.all():
            if loaded is not None and managed.model_digest not in loaded:
                pool.remove(managed.name)  # evicted or expired: the worker is gone
                continue
            if managed.turns.busy():
                continue  # busy serving: its last answer is recent enough
            health = managed.check_health()
            metrics.record_provider_health(managed.name, health.ok)
            if health.ok:
                continue
            report["unhealthy"].append(managed.name)
            # A dead engine is restarted now (turns that found it dead already asked for
            # that); a live one that stopped answering gets 3 intervals first.
            dead = not getattr(managed.provider, "running", True)
            stale = now - (managed.last_healthy_at or 0.0) > 3 * interval
            if not (dead or stale) or now < managed.next_restart_at:
                continue
            if not dead:
                with contextlib.suppress(Exception):
                    managed.provider.stop()  # hung: end it, so that revive starts it again
            try:
                if pool.revive(managed, interval_s=interval):
                    report["restarted"].append(managed.name)
            except ProviderError:
                report["restarted"].append(managed.name)  # attempted; backed off, logged
        report["started"] = self.start_eager_providers()
        receipts = getattr(executor, "receipts", None)
        if receipts is not None:
            report["checkpoint"] = receipts.maybe_checkpoint()
        return report

    def reload(self) -> None:
        """SIGHUP: re-read the config file, the admission policy and the fleet's declarations.

        Everything is checked before anything changes: a bad config (or a declaration
        the fleet refuses) raises, and the running configuration and fleet stay as they are."""
        loaded = load_config()
        policy = Policy.load(loaded.config.policy.path)
        fleet = getattr(self.executor, "fleet", None)
        plan = None
        if fleet is not None:
            from nodeagent.fleet import FleetPlan, plan_fleet

            pool = self.executor.pool
            budgets = pool.residency.budgets.values() if pool.residency is not None else ()
            checked = plan_fleet(loaded.config.providers, self.executor.models,
                                 budget_bytes=sum(b.budget_bytes for b in budgets) or None,
                                 llama_server=fleet.llama_server, source=str(loaded.file))
            rule = checked.rule + fleet.plan.rule[fleet.plan.rule.find(";"):] if ";" in fleet.plan.rule else checked.rule
            plan = FleetPlan(rule=rule, models=checked.models, default=fleet.plan.default)
        self.loaded, self.config, self.policy = loaded, loaded.config, policy
        if plan is not None:
            changed = fleet.replan(plan)
            if changed:
                log.warning("declarations changed for running provider(s) %s: they keep running as declared "
                            "before until unloaded (`agent-machine models unload`)", ", ".join(changed))

    def status_line(self) -> str:
        with self._db_lock:
            counts = self.pods.phase_counts()
        running = counts.get(PodPhase.running.value, 0)
        queued = sum(counts.get(p.value, 0) for p in (PodPhase.pending, PodPhase.admitted, PodPhase.placed))
        providers = len(self.executor.pool.all()) if self.executor is not None else 0
        return f"{providers} provider(s), {running} pod(s) running, {queued} queued"

    # ------------------------------------------------------------ internals
    def _finish(self, pod_id: str, phase: PodPhase, reason: str, reasons: list[str] | None = None,
                error_class: str | None = None) -> None:
        """End a pod outside a turn: its receipt is made durable first, then the phase changes.

        Never raises for anything about the pod itself: it is called from the
        dispatcher, crash recovery, cancel and drain, and one pod must stop none
        of them. If its receipt cannot be written (say the disk is full), the pod
        still ends, with a reason saying it has no receipt, and the error is
        logged: a pod stuck in flight forever would be worse.
        """
        from nodeagent.pods import InvalidTransition

        pod = self.get_pod(pod_id)
        if pod.status.phase in TERMINAL_PHASES:
            return
        reasons = list(reasons or [reason])
        if self.executor is not None and hasattr(self.executor, "before_end"):
            try:
                self.executor.before_end(pod, phase, reason, error_class)
            except Exception as exc:
                log.error("pod %s ends %s without a receipt: %s: %s", pod_id, phase.value, type(exc).__name__, exc)
                reasons.append(f"no receipt could be written: {type(exc).__name__}: {exc}")
        try:
            self.pod_transition(pod_id, phase, reason=reason, reasons=reasons)
        except InvalidTransition:
            return  # it ended in the meantime

    def _in_flight_count(self) -> int:
        counts = self.pods.phase_counts()
        return sum(n for phase, n in counts.items() if PodPhase(phase) not in TERMINAL_PHASES)

    def _retry_after(self) -> int:
        return max(1, int(self.config.reconcile.interval_s))

    def _dispatch_loop(self) -> None:
        """Run queued pods one after another. Nothing a pod does ends this loop:
        a pod whose handling raises ends Failed (with a receipt when one can be
        written) and the loop takes the next; `reconcile_once` restarts a
        dispatcher that died anyway and ends the pod it held."""
        me = threading.current_thread().name
        while True:
            pod_id = self._queue.get()
            if pod_id is None:
                return
            while self._dispatch_paused.is_set() and self._accepting:
                time.sleep(0.05)
            self._dispatching[me] = pod_id  # left set if this thread dies: the watchdog ends that pod
            try:
                self._dispatch(pod_id)
            except Exception:  # a broken store or log: keep serving the others
                log.exception("dispatcher %s: handling pod %s failed", me, pod_id)
            self._dispatching.pop(me, None)
            self._cancels.pop(pod_id, None)
            self._end_stream(pod_id)

    def _dispatch(self, pod_id: str) -> None:
        with self._claim_lock:
            try:
                pod = self.get_pod(pod_id)
            except PodNotFound:
                return
            if pod.status.phase in TERMINAL_PHASES:
                return
            self._claimed.add(pod_id)
        try:
            self._run_claimed(pod_id, pod)
        finally:
            with self._claim_lock:
                self._claimed.discard(pod_id)

    def _run_claimed(self, pod_id: str, pod: AgentPod) -> None:
        try:
            if self.executor is None:
                self._finish(pod_id, PodPhase.failed, "no executor configured (node started without providers)")
            else:
                self.executor.run(pod)
        except Exception as exc:  # the dispatcher must survive any pod
            log.warning("pod %s failed outside a turn: %s: %s", pod_id, type(exc).__name__, exc)
            self._finish(pod_id, PodPhase.failed, f"{type(exc).__name__}: {exc}", error_class=type(exc).__name__)

    def _start_dispatcher(self, index: int) -> threading.Thread:
        thread = threading.Thread(target=self._dispatch_loop, name=f"pod-dispatch-{index}", daemon=True)
        thread.start()
        return thread

    def supervise_dispatchers(self) -> list[str]:
        """The watchdog: restart every dispatcher thread that died (whatever killed
        it), end the pod it held as Failed with a receipt, and say so in the log.
        Returns the names of the restarted dispatchers."""
        restarted: list[str] = []
        if not self._accepting:
            return restarted  # draining: dispatchers end on purpose
        with self._supervise_lock:
            self._replace_dead_dispatchers(restarted)
        return restarted

    def _replace_dead_dispatchers(self, restarted: list[str]) -> None:
        for index, thread in enumerate(list(self._dispatchers)):
            if thread.is_alive():
                continue
            held = self._dispatching.pop(thread.name, None)
            log.error("dispatcher %s died%s; restarting it", thread.name,
                      f" while running pod {held}" if held else "")
            if held is not None:
                try:
                    self._finish(held, PodPhase.failed, "dispatcher-died",
                                 reasons=["the dispatcher running this pod died; the agent restarted it"],
                                 error_class="DispatcherDied")
                except PodNotFound:
                    pass
                self._cancels.pop(held, None)
            self._dispatchers[index] = self._start_dispatcher(index)
            restarted.append(thread.name)

    # ------------------------------------------------------------ governance (nodeagent/governance)
    def wipe_tenant(self, tenant: str, agent: str | None = None):
        """Remove ``tenant``'s (``agent``'s) KV states in every tier and T0, its segment texts
        and pod texts (digests and receipts kept); returns the signed `WipeReport`."""
        from nodeagent.governance.wipe import wipe_tenant
        executor = self._need_executor()
        # Pods of the tenant still in flight would save new states after the wipe: cancel them first.
        live = [p for p in self.list_pods(tenant=tenant, limit=100000)
                if p.status.phase not in TERMINAL_PHASES and (agent is None or p.metadata.agent == agent)]
        for pod in live:
            with contextlib.suppress(Exception):
                self.cancel_pod(pod.id, reason=f"wipe of tenant {tenant}")
        for pod in live:
            with contextlib.suppress(Exception):
                self._wait_terminal(pod.id, 60.0)
        return wipe_tenant(conn=self.db, lock=self._db_lock, cache=executor.cache, receipts=executor.receipts,
                           pool=executor.pool, tenant=tenant, agent=agent)

    def teardown(self):
        """Stop every provider the node started (pool and `providers up`), with a receipt."""
        from nodeagent.governance.teardown import teardown
        from nodeagent.launch.registry import Registry
        executor = self._need_executor()
        return teardown(pool=executor.pool, registry=Registry(self.paths.state_dir / "providers"),
                        receipts=executor.receipts)

    def plan(self, pod: AgentPod, *, grant_line: bytes | None = None) -> dict:
        """What the node would do for ``pod``, without doing it (`agent-machine render plan`)."""
        from nodeagent.governance.plan import plan_pod
        return plan_pod(self, pod, grant_line=grant_line)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _utc_or_none(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


def default_executor(node: Node):
    """The node's executor: models from the store, served by the declared fleet (or the
    default rule: the embedded llama-cpp-python worker, or llama-server slots), loaded
    through the residency manager, KV states in the T1/T2 tiers, receipts signed with
    the machine key."""
    from nodeagent.config import parse_duration
    from nodeagent.execution import PodExecutor, ProviderPool
    from nodeagent.kvcache.manager import CacheManager
    from nodeagent.models.residency import LoadRequest, ResidencyManager, budgets_from_devices
    from nodeagent.models.store import ModelStore
    from nodeagent.providers.llama_cpp_python import LLAMA_CPP_TOKENIZER_KINDS, residency_loader, start_tokenizer
    from nodeagent.receipts import open_machine_log

    cfg = node.config
    state = node.paths.state_dir
    models = ModelStore(state)
    profile = node.machine()
    budgets = budgets_from_devices(profile.devices)
    if cfg.models.reserve_bytes is not None:
        budgets = budgets_from_devices(profile.devices,
                                       reserve_bytes={b.pool: cfg.models.reserve_bytes for b in budgets})
    pool = ProviderPool(residency=None, tokenizer=start_tokenizer, tokenizer_kinds=LLAMA_CPP_TOKENIZER_KINDS)
    fleet = build_fleet(node, models, pool, profile, budgets)
    residency = ResidencyManager(
        budgets,
        fleet.loader(residency_loader(n_threads=cfg.models.threads)),
        max_loaded=cfg.models.max_loaded,
        default_keep_alive_s=_keep_alive(parse_duration(cfg.models.keep_alive)),
        conn=connect(node.paths.db_file),
    )

    def load(record, keep_alive_s=None, pin=None):
        options = {"n_ctx": cfg.models.context, **fleet.load_request_options(record)}
        request = LoadRequest(digest=record.digest, name=record.names[0] if record.names else None,
                              path=record.path, meta=models.meta(record), **options)
        return residency.load(request, keep_alive_s=keep_alive_s, pin=pin).handle

    pool.attach_loader(load, residency, kind_of=fleet.kind_of)
    cache = CacheManager.open(
        node.paths.db_file, t1_dir=cfg.cache.ram_dir, t2_dir=state / "kvcache",
        t1_budget=cfg.cache.ram_budget_bytes, t2_budget=cfg.cache.disk_budget_bytes,
        block_tokens=cfg.cache.block_tokens,
    )
    receipts = open_machine_log(state, key_file=cfg.receipts.key_file,
                                checkpoint_every=cfg.receipts.checkpoint_every,
                                checkpoint_seconds=cfg.receipts.checkpoint_seconds)
    executor = PodExecutor(node, pool=pool, models=models,
                           cache=cache, receipts=receipts, block_tokens=cfg.cache.block_tokens)
    executor.fleet = fleet
    calibrate_restore_rates(executor)
    from nodeagent import kvevents, metrics  # [cluster] kv_events (None when off); GAIE's /metrics families
    executor.kv_events = kvevents.install_from_config(executor, cfg)
    metrics.watch_model_servers(executor, cfg)
    # Governance: no pod runs and no engine starts without an allowed activation decision,
    # signed into the receipt log with the storage receipt it cites (docs/governance.md).
    from nodeagent.governance import activation_for, install_gates
    install_gates(executor, activation_for(node, executor))
    return executor


def build_fleet(node: Node, models, pool, profile, budgets):
    """The fleet the config declares (checked: a bad declaration raises `FleetError`
    naming its field), or the default rule; providers `providers up` started for a
    model of the store are adopted."""
    from nodeagent.fleet import Fleet, FleetPlan, cpu_count, default_rule, plan_fleet
    from nodeagent.launch.manage import LaunchContext, launched_providers
    from nodeagent.launch.registry import Registry

    cfg = node.config
    has_gpu = any(d.kind == "gpu" for d in profile.devices)
    cpus = cpu_count()
    needs_server = any(d.kind == "llama_server" and d.mode == "subprocess" for d in cfg.providers)
    llama_server = _llama_server_binary() if (needs_server or has_gpu or cpus >= 4) else None
    budget = sum(b.budget_bytes for b in budgets) or None
    source = str(node.loaded.file)
    plan = plan_fleet(cfg.providers, models, budget_bytes=budget, llama_server=llama_server, source=source)
    default, default_text = default_rule(cpus=cpus, has_gpu=has_gpu, llama_server=llama_server,
                                         context=cfg.models.context, threads=cfg.models.threads)
    plan = FleetPlan(rule=f"{plan.rule}; {default_text}", models=plan.models, default=default)
    launch = LaunchContext(Registry(node.paths.state_dir / "fleet"))
    fleet = Fleet(plan, pool, state_dir=node.paths.state_dir, launch=launch, threads=cfg.models.threads,
                  llama_server=llama_server)
    try:
        adopted = fleet.adopt(launched_providers(Registry.default()), models)
        if adopted:
            log.info("adopted providers started with `providers up`: %s", ", ".join(adopted))
    except Exception as exc:  # the operator's providers are a bonus; never a reason not to start
        log.warning("could not look for providers started with `providers up`: %s", exc)
    return fleet


def _llama_server_binary():
    from nodeagent.providers.llama_server import locate_llama_server

    path, why = locate_llama_server(build=False, timeout_s=30)
    if path is None:
        log.info("no llama-server binary: %s", why)
    return path


def calibrate_restore_rates(executor) -> None:
    """Seed T1/T2 restore rates from a read of each tier's directory, so the first
    placement can weigh a restore at all; observed restores then refine them."""
    from nodeagent.scheduler.rates import calibrate_read_throughput, restore_quantity

    for tier, store in executor.cache.stores.items():
        executor.rates.set(None, restore_quantity(tier), calibrate_read_throughput(store.directory, 8 << 20),
                           "calibrated")


def _keep_alive(seconds: float | None) -> float:
    return -1.0 if seconds is None else seconds

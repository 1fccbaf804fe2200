"""The providers that serve pods, as the executor sees them: their queues, their live context, their restarts.

`ManagedProvider` is one sequence context the node places turns on (the
embedded worker, or one slot of a llama-server replica), with its FIFO
`TurnQueue`, what it holds (`HeldContext`) and what it will hold once its queue
drains. `ProviderPool` holds them by name, loads a model through the residency
manager when none serves it, starts a dead one again (`revive`), keeps the
tokenize-only workers, and asks the start gate before any engine starts.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterable, Protocol, Sequence

from nodeagent.providers.base import Provider, ProviderError, ProviderUnavailable
from nodeagent.scheduler.placement import PackedPrompt, common_prefix_packed, common_prefix_tokens, packed_tokens

log = logging.getLogger("agent_machine.execution")

@dataclass(frozen=True)
class HeldContext:
    """Tokens a provider's context holds, and whose they are: ``(first token, Namespace)`` spans."""

    tokens: tuple[int, ...] = ()
    spans: tuple[tuple[int, Any], ...] = ()

    def visible_prefix(self, owners: Sequence[str]) -> int:
        """How many leading tokens a pod seeing ``owners`` may reuse.

        Scopes only narrow along a context, so the visible part is a prefix: it
        ends where the first span owned by someone else begins.
        """
        for start, namespace in self.spans:
            if namespace.owner not in owners:
                return start
        return len(self.tokens)

    def reusable(self, prompt: Sequence[int], owners: Sequence[str], packed: PackedPrompt | None = None) -> int:
        """Leading tokens of ``prompt`` this context holds and a pod seeing ``owners`` may
        reuse. ``packed``: the same prompt, when it is matched against many contexts."""
        tokens = self.tokens
        if not tokens or not prompt or tokens[0] != prompt[0]:
            return 0  # the common case with many slots: nothing shared
        if packed is not None:
            shared = common_prefix_packed(self.packed, packed.packed)
        else:
            shared = common_prefix_tokens(tokens, prompt)
        return min(shared, self.visible_prefix(owners)) if shared else 0

    @cached_property
    def packed(self) -> bytes:
        """``tokens`` packed (`packed_tokens`), once per context."""
        return packed_tokens(self.tokens)


class TurnQueue:
    """A provider's turns, one at a time, in the order they were placed.

    Placement prices a candidate's queue as FIFO (the work placed before a turn
    runs before it) and reasons about ``expected``, the context of the last
    turn placed; both hold only if turns run in placement order, which a plain
    lock does not promise (measured: a pod placed behind another's prefill, to
    reuse it, ran first and recomputed it). Tickets are taken under the
    executor's placement lock; every ticket is released, run or not (releasing
    twice is harmless), so an abandoned one (a failed load, an error before
    the turn) never stalls the turns behind it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._issued = 0  # tickets handed out
        self._next = 0  # the ticket whose turn it is
        self._released: set[int] = set()  # released before their turn came

    def ticket(self) -> int:
        with self._cond:
            self._issued += 1
            return self._issued - 1

    def busy(self) -> bool:
        """A turn is running or waiting for its turn."""
        with self._cond:
            return self._next < self._issued

    def wait(self, ticket: int) -> None:
        """Block until it is ``ticket``'s turn; the caller releases it when done."""
        with self._cond:
            while self._next != ticket:
                self._cond.wait()

    def release(self, ticket: int) -> None:
        with self._cond:
            if ticket < self._next or ticket in self._released:
                return  # already released
            self._released.add(ticket)
            while self._next in self._released:
                self._released.remove(self._next)
                self._next += 1
            self._cond.notify_all()


@dataclass(frozen=True)
class RunningTurn:
    """The turn a provider is running: what it was estimated to take, and since when."""

    ticket: int
    since: float  # time.monotonic()
    estimate_s: float | None  # restore + prefill + decode of max tokens; None: a rate was unknown
    prefill_tokens: int
    decode_tokens: int

    def remaining_s(self, now: float) -> float | None:
        return None if self.estimate_s is None else max(0.0, self.estimate_s - (now - self.since))

    def work_done(self, now: float, prefill_rate: float | None, decode_rate: float | None) -> tuple[int, int]:
        """(prefill, decode) tokens it has done by ``now`` at these rates: the prompt
        first, then the answer. (0, 0) when a rate is unknown: all of it counts as ahead."""
        if not prefill_rate or not decode_rate:
            return 0, 0
        elapsed = max(0.0, now - self.since)
        prefill = min(self.prefill_tokens, int(elapsed * prefill_rate))
        decoding = max(0.0, elapsed - self.prefill_tokens / prefill_rate)
        return prefill, min(self.decode_tokens, int(decoding * decode_rate))


class PrefixObserver(Protocol):
    """What an engine's own cache reports it holds (vLLM's KV events: `providers.vllm_events`)."""

    def cached_tokens(self, prompt: Sequence[int], owners: Sequence[str]) -> int:
        """Leading tokens of ``prompt`` it holds that a pod seeing ``owners`` may count."""

    def sent(self, tokens: Sequence[int], spans: Sequence[tuple[int, Any]]) -> None:
        """The node gave the engine these tokens, owned as ``spans`` say."""

    def clear(self) -> None:
        """What the engine holds is unknown (it restarted, or a request failed)."""

    def close(self) -> None: ...


class SelfAddingHandle:
    """What a loader returns when the engines it started put their own slots in the pool
    (a declared fleet) instead of being one provider: a handle to unload, not a provider."""


@dataclass
class ManagedProvider:
    """A provider as the executor sees it: one request at a time, with its queue and live context."""

    provider: Provider
    model_digest: str
    launch_mode: str = "subprocess"  # the embedded worker is our own subprocess
    version: str = "unknown"
    # The engine it is a sequence context of (a llama-server replica's slots share one);
    # None: an engine of its own. One restart empties every context of its group.
    group: str | None = None
    turns: TurnQueue = field(default_factory=TurnQueue)
    # ``held``: what the engine's context holds now (after its last request);
    # the isolation bound of every generation is computed from it.
    # ``expected``: what it will hold once its queue drains (the prompt of the
    # last request placed on it); placement reasons about that, so a prefix
    # still being computed counts as a hit for whoever queues behind it.
    held: HeldContext = field(default_factory=HeldContext)
    expected: HeldContext = field(default_factory=HeldContext)
    queued_requests: int = 0
    queued_prefill_tokens: int = 0
    queued_decode_tokens: int = 0  # the queue counts include the running turn's
    running: RunningTurn | None = None
    # Live sessions it holds: pod id -> context tokens (the load guard's measure).
    sessions: dict[str, int] = field(default_factory=dict)
    last_healthy_at: float | None = None  # time.time() of the last passing health check
    # Restarts (`ProviderPool.revive`): failures in a row, when the next try is due, why the last failed.
    restart_failures: int = 0
    next_restart_at: float = 0.0
    last_restart_error: str | None = None
    restarts: int = 0
    # False once the provider said it cannot save its context (a vLLM engine, a llama-server
    # without a slot-save directory): its turns stop trying, and say so once.
    saves_state: bool = True
    # Called with (self, new held context) whenever what the engine holds changes
    # (KV events publish T0 from here); set by the pool when it is added.
    context_listeners: list[Callable[["ManagedProvider", HeldContext], None]] = field(default_factory=list)
    # The engine's own report of the prefixes it holds, when it publishes one; placement
    # takes the longer of it and ``expected`` (the last prompt placed).
    observed: PrefixObserver | None = None

    def hold(self, context: HeldContext) -> None:
        """Record what the engine's context holds now, and tell the listeners."""
        self.held = context
        if self.observed is not None and context.tokens:
            self.observed.sent(context.tokens, context.spans)
        for listener in list(self.context_listeners):
            try:
                listener(self, context)
            except Exception:  # an observer never breaks a turn
                log.exception("context listener failed for provider %s", self.name)

    def check_health(self):
        health = self.provider.health()
        if health.ok:
            self.last_healthy_at = time.time()
        return health

    @property
    def name(self) -> str:
        return self.provider.name

    @property
    def kind(self) -> str:
        return self.provider.kind

    def forget_context(self) -> None:
        """The engine's context is unknown (crash, failed request, restore): reuse nothing of it."""
        self.hold(HeldContext())
        if self.observed is not None:  # its own report too, until it speaks again
            self.observed.clear()
        if self.queued_requests <= 1:
            self.expected = HeldContext()


@dataclass(frozen=True)
class ProviderStart:
    """An engine the pool is about to start, as the start gate sees it."""

    model_digest: str
    model: str  # the model's name (or digest prefix)
    kind: str  # llama_cpp_python | llama_server | vllm
    mode: str  # subprocess | podman | quadlet | attach
    provider: str | None = None  # the declared provider's name, when there is one
    image: str | None = None  # the container image (podman, quadlet)


MAX_TOKENIZERS = 4  # vocab-only tokenizer workers kept running (least recently used go first)
RESTART_BACKOFF_S = 1.0  # first wait after a failed restart of a dead provider; doubles per failure


class ProviderPool:
    """The providers that can serve pods, by name.

    Static providers are added explicitly (benchmarks, configured replicas);
    with a `loader` the pool asks it for one when a model has no provider (the
    node's loader goes through the residency manager, which evicts by expected
    cost and refuses over-commit with a clear error).
    """

    def __init__(self, loader: Callable[[Any], Provider] | None = None, residency: Any | None = None,
                 loader_kind: str | None = "llama_cpp_python", *,
                 tokenizer: Callable[[Any], Provider] | None = None,
                 tokenizer_kinds: Iterable[str] = ()) -> None:
        self._providers: dict[str, ManagedProvider] = {}
        self._lock = threading.Lock()
        self._loader = loader
        self.residency = residency
        # The provider kind the loader makes: a cold start may restore saved states of it.
        self.loader_kind = loader_kind if loader is not None else None
        self._kind_of: Callable[[str], str | None] | None = None
        # Optional: starts a tokenize-only provider for a model, whose ids equal
        # those of every provider kind in `tokenizer_kinds` (see `tokenizer`).
        self._start_tokenizer = tokenizer
        self._tokenizer_kinds = frozenset(tokenizer_kinds)
        # digest -> its tokenizer (None: failed to start), least recently used first
        self._tokenizers: "OrderedDict[str, Provider | None]" = OrderedDict()
        self._tokenizer_lock = threading.Lock()  # guards `_tokenizers`
        # Starts are rare (~0.2 s each); a pod whose tokenizer runs never waits on this.
        self._tokenizer_start_lock = threading.Lock()
        self._load_lock = threading.Lock()  # one model load at a time (see `load`)
        self._context_listeners: list[Callable[[ManagedProvider, HeldContext], None]] = []
        self._added_listeners: list[Callable[[ManagedProvider], None]] = []
        # Asked before the pool starts an engine (a load, a declared provider): raises
        # `StartRefused` to keep it from starting (governance's activation decision).
        self.start_gate: Callable[[ProviderStart], None] | None = None

    def attach_loader(self, loader: Callable[..., Any], residency: Any, *,
                      kind_of: Callable[[str], str | None]) -> None:
        """Set the loader after construction (the node's loader needs the pool it loads into);
        ``kind_of(digest)`` is the provider kind a load of that model starts."""
        self._loader, self.residency, self._kind_of = loader, residency, kind_of

    def load_kind(self, digest: str) -> str | None:
        """The provider kind loading ``digest`` would start (None: this pool cannot load)."""
        if self._loader is None:
            return None
        return self._kind_of(digest) if self._kind_of is not None else self.loader_kind

    def add_added_listener(self, listener: Callable[[ManagedProvider], None]) -> None:
        """``listener(managed)`` for every provider added to the pool from now on (and those in it)."""
        with self._lock:
            self._added_listeners.append(listener)
            present = list(self._providers.values())
        for managed in present:
            listener(managed)

    def add_context_listener(self, listener: Callable[[ManagedProvider, HeldContext], None]) -> None:
        """``listener(managed, held)`` on every change of what a provider's context holds (T0)."""
        with self._lock:
            self._context_listeners.append(listener)
            for managed in self._providers.values():
                managed.context_listeners.append(listener)

    def check_start(self, start: "ProviderStart") -> None:
        """Ask the start gate (if any) whether ``start`` may happen; raises `StartRefused`."""
        if self.start_gate is not None:
            self.start_gate(start)

    def tokenizer(self, record: Any) -> Provider | None:
        """A tokenize-only provider for ``record``'s model, or None when the pool has
        none or the model's providers (or, with none loaded, the loader's kind)
        tokenize differently. Started on first use; one that died is started
        again; one that fails to start is not retried (the providers tokenize)."""
        if self._start_tokenizer is None:
            return None
        kinds = {m.kind for m in self.for_model(record.digest)} or {self.load_kind(record.digest)}
        if not kinds <= self._tokenizer_kinds:
            return None
        known, tokenizer = self._known_tokenizer(record.digest)
        if known:
            return tokenizer
        with self._tokenizer_start_lock:
            known, tokenizer = self._known_tokenizer(record.digest)  # started while we waited?
            if known:
                return tokenizer
            with self._tokenizer_lock:
                dead = self._tokenizers.pop(record.digest, None)
            retired = [dead] if dead is not None else []  # reap it before starting another
            try:
                tokenizer = self._start_tokenizer(record)
            except Exception as exc:
                log.warning("no tokenizer for %s (%s: %s); tokenizing with its providers",
                            model_name(record), type(exc).__name__, exc)
                tokenizer = None
            with self._tokenizer_lock:
                self._tokenizers[record.digest] = tokenizer
                running = [d for d, t in self._tokenizers.items() if t is not None]
                retired += [self._tokenizers.pop(d) for d in running[:max(0, len(running) - MAX_TOKENIZERS)]]
        for old in retired:  # each costs ~40 MB: keep the recently used models' only
            with contextlib.suppress(Exception):
                old.stop()
        return tokenizer

    def _known_tokenizer(self, digest: str) -> tuple[bool, Provider | None]:
        """(True, tokenizer) when ``digest``'s is running, (True, None) when it failed
        to start; (False, None) when it must be started (never was, or died)."""
        with self._tokenizer_lock:
            tokenizer = self._tokenizers.get(digest)
            if tokenizer is None:
                return digest in self._tokenizers, None
            if not is_running(tokenizer):
                return False, None
            self._tokenizers.move_to_end(digest)
            return True, tokenizer

    def close_tokenizers(self) -> None:
        with self._tokenizer_lock:
            started, self._tokenizers = list(self._tokenizers.values()), {}
        for tokenizer in started:
            if tokenizer is not None:
                with contextlib.suppress(Exception):
                    tokenizer.stop()

    def using(self, digest: str, keep_alive: str | None = None):
        """While a request runs, the residency manager must not evict its model; a
        request's keep-alive (Ollama's semantics) applies from when it ends."""
        if self.residency is None or digest not in self.residency.loaded_digests():
            return contextlib.nullcontext()
        if keep_alive is None:
            return self.residency.use(digest)
        from nodeagent.config import parse_duration

        seconds = parse_duration(keep_alive)
        return self.residency.use(digest, keep_alive_s=-1.0 if seconds is None else seconds)

    def add(self, managed: ManagedProvider) -> ManagedProvider:
        with self._lock:
            for listener in self._context_listeners:
                if listener not in managed.context_listeners:
                    managed.context_listeners.append(listener)
            self._providers[managed.name] = managed
            added = list(self._added_listeners)
        for listener in added:
            try:
                listener(managed)
            except Exception:
                log.exception("pool listener failed for provider %s", managed.name)
        return managed

    def remove(self, name: str) -> None:
        with self._lock:
            managed = self._providers.pop(name, None)
        if managed is not None:
            managed.forget_context()  # listeners (KV events) learn that what it held is gone
            if managed.observed is not None:
                managed.observed.close()

    def all(self) -> list[ManagedProvider]:
        with self._lock:
            return list(self._providers.values())

    def peers(self, managed: ManagedProvider) -> list[ManagedProvider]:
        """``managed`` and the contexts that run alike: same model, kind and version (the
        slots of its engine, and its twin replicas); itself only when it has none."""
        if managed.group is None:
            return [managed]
        twins = [m for m in self.all() if m.group is not None and m.model_digest == managed.model_digest
                 and m.kind == managed.kind and m.version == managed.version]
        return twins if managed in twins else [managed, *twins]

    def for_model(self, digest: str) -> list[ManagedProvider]:
        """The running providers of a model: a provider that died leaves placement at once."""
        return [m for m in self.all() if m.model_digest == digest and is_running(m.provider)]

    def revive(self, managed: ManagedProvider, *, interval_s: float = RESTART_BACKOFF_S) -> bool:
        """Start a provider that died again, now; True if this call restarted it.

        A dead provider is out of placement (`for_model`) the moment its death
        is seen; this brings it back without waiting for a health interval.
        Serialised with loads (one engine start at a time), so concurrent callers
        restart it once. After a failed start, later calls back off
        (``interval_s`` x 2^failures, at most 5 minutes) and raise
        `ProviderUnavailable` naming the last error and when the next try is due.
        """
        with self._load_lock:
            return self._revive_locked(managed, interval_s)

    def _revive_locked(self, managed: ManagedProvider, interval_s: float) -> bool:
        if is_running(managed.provider):
            return False
        now = time.time()
        if now < managed.next_restart_at:
            raise ProviderUnavailable(
                f"provider {managed.name} is down: {managed.restart_failures} restart(s) failed, the last with "
                f"{managed.last_restart_error}; next attempt in {managed.next_restart_at - now:.0f}s")
        managed.forget_context()
        from nodeagent import metrics

        metrics.record_provider_restart(managed.name)
        try:
            with contextlib.suppress(Exception):
                managed.provider.stop()  # reap what is left of the dead engine
            managed.provider.start()
        except Exception as exc:
            managed.restart_failures += 1
            managed.next_restart_at = now + min(300.0, interval_s * 2 ** managed.restart_failures)
            managed.last_restart_error = f"{type(exc).__name__}: {exc}"
            log.error("provider %s died and could not be restarted (%s)", managed.name, managed.last_restart_error)
            raise ProviderUnavailable(f"provider {managed.name} died and could not be restarted: "
                                      f"{managed.last_restart_error}") from exc
        managed.restart_failures, managed.next_restart_at, managed.last_restart_error = 0, 0.0, None
        managed.restarts += 1
        if managed.group is not None:
            for sibling in self.all():
                if sibling.group == managed.group and sibling is not managed:
                    sibling.forget_context()
        managed.check_health()
        log.warning("provider %s had died; restarted it", managed.name)
        return True

    def revive_soon(self, managed: ManagedProvider) -> None:
        """`revive` on a thread of its own: the turn that found the provider dead
        reports its failure without waiting for the restart."""
        def run() -> None:
            try:
                self.revive(managed)
            except ProviderError:
                pass  # logged, and backed off: the next turn or the reconcile loop tries again

        threading.Thread(target=run, name=f"revive-{managed.name}", daemon=True).start()

    def load(self, record: Any, **options: Any) -> ManagedProvider:
        """Load ``record`` through the loader (``options``: keep_alive_s, pin for the residency manager)."""
        if self._loader is None:
            raise ProviderError(f"no provider holds model {model_name(record)} and this node cannot load models")
        # Pods are placed before their model loads, so several may choose to load the
        # same cold model at once: the first loads it, the others get its provider
        # (one ManagedProvider per engine, or queues and contexts would split).
        with self._load_lock:
            existing = self.for_model(record.digest)
            if existing:
                return existing[0]
            # Its provider died: start that one again (the residency manager still
            # holds it as loaded, and would hand the dead engine back).
            # One the residency manager unloaded on purpose is dropped instead.
            dead = [m for m in self.all() if m.model_digest == record.digest]
            if dead and (self.residency is None or record.digest in self.residency.loaded_digests()):
                self._revive_locked(dead[0], RESTART_BACKOFF_S)
                return dead[0]
            for stale in dead:
                self.remove(stale.name)
            provider = self._loader(record, **options)
            for managed in self.all():
                if managed.provider is provider:
                    return managed
            started = self.for_model(record.digest)  # a declared fleet adds its own (one per slot)
            if started:
                return started[0]
            if isinstance(provider, SelfAddingHandle):
                raise ProviderUnavailable(f"loading {model_name(record)} left no running provider in the pool")
            return self.add(ManagedProvider(provider, record.digest, version=_version_of(provider)))


def is_running(provider: Provider) -> bool:
    running = getattr(provider, "running", None)
    return True if running is None else bool(running)


def _version_of(provider: Provider) -> str:
    if provider.kind == "llama_cpp_python":
        try:
            from importlib.metadata import version

            return f"llama-cpp-python {version('llama-cpp-python')}"
        except Exception:
            return "llama-cpp-python"
    return getattr(provider, "version", None) or provider.kind



def model_name(record: Any) -> str:
    """How a stored model is named to people: its first NAME:TAG, else its short digest."""
    names = getattr(record, "names", None) or []
    return names[0] if names else record.digest[:19]


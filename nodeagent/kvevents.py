"""KV events in vLLM's format, so llm-d (and Dynamo, Ray) can route a cluster of llama.cpp hosts by cache locality.

What is published, and when:

* **T0** (medium ``GPU``: the engine's own live KV, whatever the device): every
  change of what a provider context holds (`ProviderPool.add_context_listener`;
  a llama-server slot is its own context). The new context's blocks that no
  other context of the node held yet are ``BlockStored``; the old context's
  blocks that no context holds any more are ``BlockRemoved``.
* **T1** (medium ``CPU``: saved states in RAM) and **T2** (medium ``STORAGE``:
  on disk): every store, drop, demotion and promotion of a saved state
  (`CacheManager.add_observer`).

The node is one endpoint to a router, so a block is counted per (model,
medium) across every context or entry that holds it (`BlockLedger`): two slots
holding one system prompt publish it once, and it is removed when the last
holder lets it go. Block hashes are the node's own chained keys
(`nodeagent.kvcache.blocks.block_keys`: 32-byte SHA-256, parent-chained, salted
by model and cache scope), ``block_size`` the cache's block (64 tokens by
default), ``parent_block_hash`` the key of the block before the first one in
the event (None at the start of a sequence), ``token_ids`` the tokens of exactly
the blocks in the event. A consumer that hashes tokens itself (llm-d's indexer
recomputes its request keys from ``token_ids``) can re-chunk them to its own
block size.

Wire format (vLLM ``vllm/distributed/kv_events.py``, msgspec structs with
``array_like=True`` and ``tag=True``; the layout vLLM's
``examples/online_serving/kv_events_subscriber.py`` and llm-d's kv-cache
manager decode)::

    EventBatch   = [ts: float, events: [event, ...]]
    BlockStored  = ["BlockStored", block_hashes: [bytes], parent_block_hash: bytes | nil,
                    token_ids: [int], block_size: int, lora_id: nil, medium: str, lora_name: nil]
    BlockRemoved = ["BlockRemoved", block_hashes: [bytes], medium: str]
    AllBlocksCleared = ["AllBlocksCleared"]

Transport (vLLM's ``ZmqEventPublisher``): a ZMQ PUB socket sends multipart
``[topic, seq (8-byte big-endian), msgpack(EventBatch)]``; ``seq`` counts every
batch this publisher sent, across topics. The topic is llm-d's
``kv@<pod-ip>:<port>@<model>``. A ROUTER socket (the replay endpoint) answers a
DEALER's ``[b"", start seq (8-byte big-endian)]`` with ``[b"", seq, payload]``
for each buffered batch from ``start`` on, then ``[b"", -1 (8 bytes, signed), b""]``.

On start the publisher sends ``AllBlocksCleared`` for every model it knows, so
a subscriber drops what an earlier run of the agent had announced. Saved states
from before the start are not announced (their tokens are not kept); they are
once stored again. Token ids of every cache scope travel on the socket (a
router needs them to match prompts): bind it to loopback or the cluster's
private network, as vLLM's.

Optional dependencies (extra ``kv-events``): ``pyzmq`` and ``msgpack``. Without
them `install_from_config` raises `KVEventsUnavailable` saying what to install.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import weakref
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from nodeagent.kvcache.blocks import block_keys

log = logging.getLogger("agent_machine.kvevents")

__all__ = [
    "MEDIUM", "AllBlocksCleared", "BlockLedger", "BlockRemoved", "BlockStored", "EventBatch", "KVEventSource",
    "KVEventsUnavailable", "Subscriber", "require_zmq", "ZmqPublisher", "decode_batch", "encode_batch", "install_from_config",
    "topic_for",
]

# The tiers as vLLM names its media (vllm/distributed/kv_events.py: MEDIUM_GPU/CPU/STORAGE).
# T0 is the engine's own KV: "GPU" in vLLM's vocabulary, which routers weight highest.
MEDIUM = {"T0": "GPU", "T1": "CPU", "T2": "STORAGE"}
END_SEQ = (-1).to_bytes(8, "big", signed=True)
INSTALL_HINT = "pip install 'agent-machine[kv-events]' (pyzmq and msgpack)"


class KVEventsUnavailable(RuntimeError):
    """KV events were asked for but cannot run (a missing optional dependency, a bad endpoint)."""


def _msgpack() -> Any:
    try:
        import msgpack
    except ImportError:
        raise KVEventsUnavailable(f"KV events need msgpack: {INSTALL_HINT}") from None
    return msgpack


def require_zmq() -> Any:
    """The pyzmq module, or `KVEventsUnavailable` saying what to install."""
    try:
        import zmq
    except ImportError:
        raise KVEventsUnavailable(f"KV events need pyzmq: {INSTALL_HINT}") from None
    return zmq


# ---------------------------------------------------------------- the events
@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[bytes, ...]
    parent_block_hash: bytes | None
    token_ids: tuple[int, ...]
    block_size: int
    medium: str | None
    lora_id: int | None = None
    lora_name: str | None = None

    def to_wire(self) -> list[Any]:
        return ["BlockStored", list(self.block_hashes), self.parent_block_hash, list(self.token_ids),
                self.block_size, self.lora_id, self.medium, self.lora_name]


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[bytes, ...]
    medium: str | None

    def to_wire(self) -> list[Any]:
        return ["BlockRemoved", list(self.block_hashes), self.medium]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    def to_wire(self) -> list[Any]:
        return ["AllBlocksCleared"]


Event = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float
    events: tuple[Event, ...]

    def to_wire(self) -> list[Any]:
        return [self.ts, [event.to_wire() for event in self.events]]


def encode_batch(batch: EventBatch) -> bytes:
    return _msgpack().packb(batch.to_wire(), use_bin_type=True)


class DecodeError(ValueError):
    """A payload that is not a vLLM KV event batch; the message names what is wrong."""


def decode_batch(payload: bytes) -> EventBatch:
    """The batch in ``payload``, checked field by field against the schema above."""
    try:
        raw = _msgpack().unpackb(payload, raw=False)
    except Exception as exc:
        raise DecodeError(f"not msgpack: {exc}") from None
    if not isinstance(raw, list) or len(raw) < 2:
        raise DecodeError("an EventBatch is an array [ts, events, ...]")
    ts, events = raw[0], raw[1]
    if not isinstance(ts, (int, float)) or not isinstance(events, list):
        raise DecodeError("EventBatch: ts must be a number and events an array")
    return EventBatch(float(ts), tuple(_decode_event(i, e) for i, e in enumerate(events)))


def _decode_event(index: int, raw: Any) -> Event:
    where = f"events[{index}]"
    if not isinstance(raw, list) or not raw or not isinstance(raw[0], str):
        raise DecodeError(f"{where}: an event is a tagged array [type, fields...]")
    tag, fields = raw[0], raw[1:]
    if tag == "AllBlocksCleared":
        return AllBlocksCleared()
    if tag == "BlockRemoved":
        if len(fields) < 1:
            raise DecodeError(f"{where}: BlockRemoved needs block_hashes")
        return BlockRemoved(_hashes(where, fields[0]), fields[1] if len(fields) > 1 else None)
    if tag == "BlockStored":
        if len(fields) < 4:
            raise DecodeError(f"{where}: BlockStored needs block_hashes, parent_block_hash, token_ids, block_size")
        hashes, parent, tokens, size = fields[:4]
        if parent is not None and not isinstance(parent, (bytes, int)):
            raise DecodeError(f"{where}.parent_block_hash: bytes, int or nil, got {type(parent).__name__}")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise DecodeError(f"{where}.token_ids: an array of integers")
        if not isinstance(size, int) or size <= 0:
            raise DecodeError(f"{where}.block_size: a positive integer, got {size!r}")
        extra = list(fields[4:7]) + [None] * (3 - len(fields[4:7]))
        return BlockStored(_hashes(where, hashes), parent, tuple(tokens), size, medium=extra[1],
                           lora_id=extra[0], lora_name=extra[2])
    raise DecodeError(f"{where}: unknown event type {tag!r}")


def _hashes(where: str, raw: Any) -> tuple[bytes, ...]:
    if not isinstance(raw, list) or not all(isinstance(h, (bytes, int)) for h in raw):
        raise DecodeError(f"{where}.block_hashes: an array of bytes or integers")
    return tuple(raw)


def topic_for(pod: str, model: str) -> str:
    """llm-d's topic: ``kv@<pod-ip>:<port>@<model>`` (its indexer takes the pod and model from it)."""
    return f"kv@{pod}@{model}"


# ---------------------------------------------------------------- what the node holds
@dataclass
class _Holding:
    keys: tuple[bytes, ...]
    tokens: tuple[int, ...] | None  # the tokens of those blocks, when known


class BlockLedger:
    """Which blocks the node holds, per (model, medium), and by how many holders.

    A holder is a provider context (T0) or a saved state (T1/T2). `hold`
    replaces what one holder holds and returns the events that change caused
    to the node as a whole: only a block's first holder stores it, only its
    last one removes it. Not thread-safe: the publisher's worker owns it.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._holdings: dict[tuple[str, str], dict[str, _Holding]] = {}
        self._counts: dict[tuple[str, str], Counter[bytes]] = {}

    def hold(self, model: str, medium: str, holder: str, keys: Sequence[bytes],
             tokens: Sequence[int] | None) -> list[Event]:
        where = (model, medium)
        holdings = self._holdings.setdefault(where, {})
        counts = self._counts.setdefault(where, Counter())
        old = holdings.pop(holder, None)
        new = _Holding(tuple(keys), None if tokens is None else tuple(tokens))
        if new.keys:
            holdings[holder] = new
        for key in new.keys:
            counts[key] += 1
        events: list[Event] = []
        if old is not None:
            gone = []
            for key in old.keys:
                counts[key] -= 1
                if counts[key] <= 0:
                    del counts[key]
                    gone.append(key)
            if gone:
                events.append(BlockRemoved(tuple(gone), medium))
        events.extend(self._stored(medium, new, counts, old))
        return events

    def release(self, model: str, medium: str, holder: str) -> list[Event]:
        return self.hold(model, medium, holder, (), None)

    def holding(self, model: str, medium: str, holder: str) -> tuple[tuple[bytes, ...], tuple[int, ...] | None]:
        found = self._holdings.get((model, medium), {}).get(holder)
        return (found.keys, found.tokens) if found else ((), None)

    def held(self, model: str, medium: str) -> set[bytes]:
        return set(self._counts.get((model, medium), ()))

    def holders(self, medium: str) -> list[tuple[str, str]]:
        """(model, holder) of everyone holding blocks in ``medium``."""
        return [(model, holder) for (model, where), holdings in self._holdings.items() if where == medium
                for holder in holdings]

    def _stored(self, medium: str, new: _Holding, counts: Counter[bytes], old: _Holding | None) -> list[Event]:
        """BlockStored for each run of the new holding's blocks that just got their first holder."""
        previously = set(old.keys) if old is not None else set()
        fresh = [i for i, key in enumerate(new.keys) if counts[key] == 1 and key not in previously]
        events: list[Event] = []
        run: list[int] = []
        for i in fresh + [-1]:
            if run and (i != run[-1] + 1):
                first, last = run[0], run[-1]
                tokens = () if new.tokens is None else new.tokens[first * self.block_size:(last + 1) * self.block_size]
                events.append(BlockStored(new.keys[first:last + 1], new.keys[first - 1] if first else None,
                                          tuple(tokens), self.block_size, medium))
                run = []
            if i >= 0:
                run.append(i)
        return events


# ---------------------------------------------------------------- the socket
class ZmqPublisher:
    """vLLM's publisher protocol: PUB ``[topic, seq, payload]`` plus a ROUTER replay of the last batches.

    One worker thread owns both sockets (ZMQ sockets are not thread-safe);
    `publish` only queues. ``connect``: connect the PUB socket to a central
    subscriber (llm-d's indexer binds) instead of binding it.
    """

    def __init__(self, endpoint: str, replay_endpoint: str | None = None, *, connect: bool = False,
                 buffer_steps: int = 10_000, hwm: int = 100_000) -> None:
        zmq = require_zmq()
        _msgpack()
        self.endpoint, self.replay_endpoint = endpoint, replay_endpoint
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)
        self._pub.setsockopt(zmq.LINGER, 500)
        self._replay = None
        try:
            if connect:
                self._pub.connect(endpoint)
            else:
                self._pub.bind(endpoint)
            if replay_endpoint:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.bind(replay_endpoint)
        except zmq.ZMQError as exc:
            self._close_sockets()
            which = replay_endpoint if self._replay is not None else endpoint
            raise KVEventsUnavailable(f"KV events: cannot {'connect' if connect else 'bind'} {which}: {exc}") from None
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._queue: "queue.Queue[tuple[str, bytes] | None]" = queue.Queue()
        self._seq = 0
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="kv-events-zmq", daemon=True)
        self._thread.start()

    def publish(self, topic: str, batch: EventBatch) -> None:
        self._queue.put((topic, encode_batch(batch)))

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until everything queued so far has been sent."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close()
        self._ctx.term()

    def _run(self) -> None:
        zmq = require_zmq()
        while True:
            try:
                item = self._queue.get(timeout=0.02)
            except queue.Empty:
                item = ()
            try:
                if item is None:
                    return
                if item:
                    topic, payload = item
                    seq = self._seq
                    self._seq += 1
                    self._pub.send_multipart([topic.encode(), seq.to_bytes(8, "big"), payload])
                    self._buffer.append((seq, payload))
                    self.sent += 1
                self._serve_replay(zmq)
            except Exception:  # a send failure loses a batch (replay covers it), never the thread
                log.exception("KV events: publishing failed")
            finally:
                if item != ():
                    self._queue.task_done()

    def _serve_replay(self, zmq: Any) -> None:
        if self._replay is None:
            return
        while True:
            try:
                frames = self._replay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("KV events: a replay request must be [identity, b'', 8-byte start seq]; ignored")
                continue
            client, start = frames[0], int.from_bytes(frames[2], "big")
            for seq, payload in list(self._buffer):
                if seq >= start:
                    self._replay.send_multipart([client, b"", seq.to_bytes(8, "big"), payload])
            self._replay.send_multipart([client, b"", END_SEQ, b""])


# ---------------------------------------------------------------- the node's side
@dataclass
class _Update:
    kind: str  # "t0" | "tier"
    holder: str
    payload: Any


class KVEventSource:
    """Turns T0 context changes and T1/T2 cache changes into event batches on a publisher.

    Listeners only queue (they run on the turn's path and under the cache's
    lock); one worker hashes blocks, keeps the `BlockLedger` and publishes, so
    the first token never waits for ZMQ. Consecutive changes of one context
    still queued are coalesced: only what it holds last is published.
    """

    SWEEP_S = 1.0  # how often contexts that left the pool are looked for

    def __init__(self, publisher: Any, *, pod: str, block_size: int,
                 model_name: Callable[[str], str], models: Iterable[str] = (),
                 live_contexts: Callable[[], Iterable[str]] | None = None) -> None:
        self.publisher, self.pod, self.block_size = publisher, pod, block_size
        self._model_name = model_name
        # A provider taken out of the pool (its model unloaded) says nothing on the way out:
        # a sweep releases the T0 blocks of contexts no longer in ``live_contexts()``.
        self._live_contexts = live_contexts
        self.ledger = BlockLedger(block_size)
        self._queue: "queue.Queue[_Update | None]" = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kv-events", daemon=True)
        self._thread.start()
        for digest in models:  # an earlier run's announcements are void
            self._publish(digest, [AllBlocksCleared()])

    # Listeners: `ProviderPool.add_context_listener` and `CacheManager.add_observer`.
    def on_context(self, managed: Any, held: Any) -> None:
        if not self._closed:
            self._queue.put(_Update("t0", managed.name, (managed.model_digest, held)))

    def on_tier_change(self, change: Any) -> None:
        if not self._closed:
            self._queue.put(_Update("tier", change.entry_id, change))

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until every change seen so far is published (tests; a clean stop)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        flush = getattr(self.publisher, "flush", None)
        if flush is not None:
            flush(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=5)
        self.publisher.close()

    def _run(self) -> None:
        while True:
            try:
                update = self._queue.get(timeout=self.SWEEP_S)
            except queue.Empty:
                self._sweep()
                continue
            pending = [update]
            while update is not None:  # take what else is waiting, to coalesce a context's changes
                try:
                    update = self._queue.get_nowait()
                except queue.Empty:
                    break
                pending.append(update)
            try:
                self._handle([u for u in pending if u is not None])
            except Exception:
                log.exception("KV events: a change could not be published")
            finally:
                for _ in pending:
                    self._queue.task_done()
            if pending[-1] is None or None in pending:
                return

    def _handle(self, updates: list[_Update]) -> None:
        last_t0 = {u.holder: i for i, u in enumerate(updates) if u.kind == "t0"}
        by_model: dict[str, list[Event]] = {}
        for i, update in enumerate(updates):
            if update.kind == "t0":
                if last_t0[update.holder] != i:
                    continue  # a later change of the same context is queued: publish that one
                digest, held = update.payload
                keys, tokens = self._t0_blocks(held)
                events = self.ledger.hold(digest, MEDIUM["T0"], update.holder, keys, tokens)
            else:
                digest, events = update.payload.model_digest, self._tier_events(update.payload)
            if events:
                by_model.setdefault(digest, []).extend(events)
        for digest, events in by_model.items():
            self._publish(digest, events)

    def _sweep(self) -> None:
        if self._live_contexts is None:
            return
        try:
            live = set(self._live_contexts())
            by_model: dict[str, list[Event]] = {}
            for model, holder in self.ledger.holders(MEDIUM["T0"]):
                if holder not in live:
                    by_model.setdefault(model, []).extend(self.ledger.release(model, MEDIUM["T0"], holder))
            for digest, events in by_model.items():
                if events:
                    self._publish(digest, events)
        except Exception:
            log.exception("KV events: the sweep of departed contexts failed")

    def _t0_blocks(self, held: Any) -> tuple[list[bytes], tuple[int, ...]]:
        if not held.tokens or not held.spans:
            return [], ()
        keys = block_keys(held.tokens, list(held.spans), block_tokens=self.block_size)
        return keys, tuple(held.tokens[:len(keys) * self.block_size])

    def _tier_events(self, change: Any) -> list[Event]:
        digest = change.model_digest
        if change.block_tokens != self.block_size:
            return []  # saved under another block size: its keys would not chain with T0's
        if change.action == "stored":
            return self.ledger.hold(digest, MEDIUM[change.tier], change.entry_id, change.keys, change.tokens)
        if change.action == "removed":
            return self.ledger.release(digest, MEDIUM[change.tier], change.entry_id)
        # moved: what it held in one medium, it now holds in the other (tokens known if we saw it stored)
        keys, tokens = self.ledger.holding(digest, MEDIUM[change.from_tier], change.entry_id)
        if not keys:
            return []  # saved before this run: never announced, so nothing to move
        return (self.ledger.release(digest, MEDIUM[change.from_tier], change.entry_id)
                + self.ledger.hold(digest, MEDIUM[change.tier], change.entry_id, keys, tokens))

    def _publish(self, digest: str, events: list[Event]) -> None:
        self.publisher.publish(topic_for(self.pod, self._model_name(digest)), EventBatch(time.time(), tuple(events)))


def default_pod(api_tcp: str | None, env: dict[str, str] | None = None) -> str:
    """``<pod-ip>:<port>`` for the topic: $POD_IP (the DaemonSet sets it from the downward API)
    or this host's name, and the API's TCP port (8377 when the API is on the socket only)."""
    env = dict(os.environ) if env is None else env
    host = env.get("POD_IP") or socket.gethostname()
    port = api_tcp.rsplit(":", 1)[1] if api_tcp and ":" in api_tcp else "8377"
    return f"{host}:{port}"


def default_replay(endpoint: str) -> str | None:
    """The PUB endpoint's port + 1 for tcp endpoints (vLLM's examples use 5557 and 5558)."""
    if not endpoint.startswith("tcp://") or ":" not in endpoint[6:]:
        return None
    base, port = endpoint.rsplit(":", 1)
    try:
        return f"{base}:{int(port) + 1}"
    except ValueError:
        raise KVEventsUnavailable(f"cluster.kv_events: {endpoint!r} has no numeric port") from None


def install_from_config(executor: Any, config: Any) -> KVEventSource | None:
    """Publish the executor's T0 and T1/T2 changes as configured in ``[cluster]`` (None when off).

    ``config`` is the node's `Config`. Raises `KVEventsUnavailable` naming the
    missing package or the endpoint that could not be bound: KV events asked
    for and silently absent would leave a router routing blind.
    """
    cluster = config.cluster
    if not cluster.kv_events:
        return None
    replay = cluster.kv_events_replay or default_replay(cluster.kv_events)
    publisher = ZmqPublisher(cluster.kv_events, replay, connect=cluster.kv_events_connect)
    names: dict[str, str] = {}

    def model_name(digest: str) -> str:
        if digest not in names:
            from nodeagent.execution import model_name as name_of

            try:
                names[digest] = name_of(executor.models.get(digest))
            except Exception:
                names[digest] = digest[:19]
        return names[digest]

    try:
        known = [record.digest for record in executor.models.list()]
    except Exception:
        known = []
    pool = executor.pool
    source = KVEventSource(publisher, pod=cluster.kv_events_pod or default_pod(config.api.tcp),
                           block_size=executor.block_tokens, model_name=model_name, models=known,
                           live_contexts=lambda: [managed.name for managed in pool.all()])
    executor.pool.add_context_listener(source.on_context)
    if executor.cache is not None:
        executor.cache.add_observer(source.on_tier_change)
    weakref.finalize(executor, source.close)
    log.info("KV events: publishing on %s (replay %s) as %s", cluster.kv_events, replay or "off", source.pod)
    return source


# ---------------------------------------------------------------- a subscriber (tests, `cache events`)
@dataclass
class Received:
    topic: str
    seq: int
    batch: EventBatch


@dataclass
class Subscriber:
    """A SUB socket decoding with the documented schema; `replay` asks the ROUTER for missed batches."""

    endpoint: str
    replay_endpoint: str | None = None
    topic: str = "kv@"
    bind: bool = False
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        zmq = require_zmq()
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt_string(zmq.SUBSCRIBE, self.topic)
        (self._sub.bind if self.bind else self._sub.connect)(self.endpoint)

    def poll(self, timeout_s: float = 1.0, *, until: Callable[[list[Received]], bool] | None = None) -> list[Received]:
        """Receive until ``until(received)`` holds or ``timeout_s`` passes; returns everything received."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not (until is not None and until(self.received)):
            if self._sub.poll(timeout=20):
                topic, seq, payload = self._sub.recv_multipart()
                self.received.append(Received(topic.decode(), int.from_bytes(seq, "big"), decode_batch(payload)))
        return self.received

    def replay(self, start: int, timeout_s: float = 2.0) -> list[tuple[int, EventBatch]]:
        zmq = require_zmq()
        if self.replay_endpoint is None:
            raise KVEventsUnavailable("this subscriber has no replay endpoint")
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(self.replay_endpoint)
        try:
            dealer.send_multipart([b"", start.to_bytes(8, "big")])
            out: list[tuple[int, EventBatch]] = []
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if not dealer.poll(timeout=50):
                    continue
                _, seq, payload = dealer.recv_multipart()
                if seq == END_SEQ:
                    return out
                out.append((int.from_bytes(seq, "big"), decode_batch(payload)))
            raise TimeoutError(f"no end of replay from {self.replay_endpoint} within {timeout_s}s")
        finally:
            dealer.close()

    def close(self) -> None:
        self._sub.close()
        self._ctx.term()

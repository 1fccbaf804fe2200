"""What a vLLM engine's prefix cache holds, learned from the KV events it publishes.

vLLM keeps its automatic prefix cache to itself: the node cannot read or save
it, only guess it from what it sent the engine (the last prompt placed on it).
With ``--kv-events-config`` vLLM publishes every block it stores or evicts on
a ZMQ PUB socket (wire format: `nodeagent.kvevents`); a provider declaration's
``kv_events`` makes the node subscribe, and placement then sees every prefix
the engine still holds, not only the last one.

vLLM's block hashes are its own (salted by its build and options), so the node
does not compare them with the prompt. It keys each block by the chain of
token ids that leads to it instead: a ``BlockStored`` carries its blocks'
token ids and its parent's hash, so the key of a block is
``hash((key of its parent, its tokens))`` and a prompt is matched by walking
its tokens in the engine's block size. A stored block whose parent the node
never saw (stored before it subscribed, or in a batch it missed) is skipped:
its prefix is unknown, so it is never counted as a hit.

Only blocks on the device (medium ``GPU``, or no medium: vLLM before the
medium field) count; vLLM's CPU offload tier is a restore, not T0. Batches are
numbered; on a gap (a missed batch may have removed blocks) everything known
is dropped, since a false hit costs a placement more than a missed one.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Sequence

from nodeagent.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, DecodeError, EventBatch, decode_batch

log = logging.getLogger("agent_machine.providers.vllm_events")

_ROOT = 0  # the key a sequence's first block chains from
DEVICE_MEDIA = ("GPU", None)


class CachedPrefixes:
    """The token-block chains an engine holds, as its events announced them; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key_of: dict[Any, int] = {}  # the engine's block hash -> the node's chain key
        self._held: Counter[int] = Counter()  # chain key -> engine blocks holding it
        self.block_size: int | None = None
        self.unchained = 0  # stored blocks skipped: their parent was never announced
        self.batches = 0

    def apply(self, batch: EventBatch) -> None:
        with self._lock:
            self.batches += 1
            for event in batch.events:
                if isinstance(event, BlockStored):
                    self._stored(event)
                elif isinstance(event, BlockRemoved):
                    for block in event.block_hashes:
                        key = self._key_of.pop(block, None)
                        if key is not None:
                            self._release(key)
                elif isinstance(event, AllBlocksCleared):
                    self._key_of.clear()
                    self._held.clear()

    def clear(self) -> None:
        with self._lock:
            self._key_of.clear()
            self._held.clear()

    def _stored(self, event: BlockStored) -> None:
        if event.medium not in DEVICE_MEDIA:
            return
        size = event.block_size
        if self.block_size is None:
            self.block_size = size
        elif size != self.block_size:
            log.warning("vLLM KV events: block size %d after %d; keeping %d", size, self.block_size, self.block_size)
            return
        parent = _ROOT if event.parent_block_hash is None else self._key_of.get(event.parent_block_hash)
        if parent is None:
            self.unchained += len(event.block_hashes)
            return
        tokens = event.token_ids
        for i, block in enumerate(event.block_hashes):
            chunk = tuple(tokens[i * size:(i + 1) * size])
            if len(chunk) < size:
                break  # a partial block is not reusable by a prefix cache
            parent = hash((parent, chunk))
            old = self._key_of.get(block)
            if old is not None:
                self._release(old)
            self._key_of[block] = parent
            self._held[parent] += 1

    def _release(self, key: int) -> None:
        left = self._held[key] - 1
        if left > 0:
            self._held[key] = left
        else:
            del self._held[key]

    def cached_tokens(self, prompt: Sequence[int]) -> int:
        """Leading tokens of ``prompt`` the engine holds (whole blocks; never the whole
        prompt: at least one token is always evaluated)."""
        size = self.block_size
        if not size or not self._held:
            return 0
        key, matched = _ROOT, 0
        held = self._held
        for start in range(0, len(prompt) - size + 1, size):
            key = hash((key, tuple(prompt[start:start + size])))
            if key not in held:
                break
            matched += size
        return min(matched, max(0, len(prompt) - 1))


class KVEventSubscription:
    """Reads one vLLM engine's KV event socket into a `CachedPrefixes`, on a thread of its own.

    ``endpoint`` is where the engine publishes (``tcp://host:port``). Frames are
    vLLM's ``[topic, seq (8 bytes, big-endian), payload]``; a payload that does
    not decode is counted in ``errors`` and skipped (the engine is not trusted
    to be well-formed, and a bad batch never stops the node).
    """

    def __init__(self, endpoint: str, prefixes: CachedPrefixes | None = None, *, name: str = "") -> None:
        from nodeagent.kvevents import _zmq

        zmq = _zmq()
        self.endpoint = endpoint
        self.prefixes = prefixes or CachedPrefixes()
        self.errors = 0
        self.gaps = 0
        self._last_seq: int | None = None
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"vllm-kv-events-{name or endpoint}", daemon=True)
        self._thread.start()

    def cached_tokens(self, prompt: Sequence[int]) -> int:
        return self.prefixes.cached_tokens(prompt)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sub.close(linger=0)
        self._ctx.term()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._sub.poll(timeout=100):
                    continue
                frames = self._sub.recv_multipart()
            except Exception:  # the socket closed under us: stop quietly
                if not self._stop.is_set():
                    log.exception("vLLM KV events from %s: receive failed", self.endpoint)
                return
            self.handle(frames)

    def handle(self, frames: list[bytes]) -> None:
        """One multipart message: check its sequence number, decode, apply."""
        if len(frames) != 3 or len(frames[1]) != 8:
            self.errors += 1
            log.warning("vLLM KV events from %s: a message of %d frames, not [topic, seq, payload]; skipped",
                        self.endpoint, len(frames))
            return
        seq = int.from_bytes(frames[1], "big")
        if self._last_seq is not None and seq != self._last_seq + 1:
            self.gaps += 1
            log.warning("vLLM KV events from %s: batch %d after %d; what it holds is unknown until it says again",
                        self.endpoint, seq, self._last_seq)
            self.prefixes.clear()
        self._last_seq = seq
        try:
            batch = decode_batch(frames[2])
        except DecodeError as exc:
            self.errors += 1
            log.warning("vLLM KV events from %s: batch %d skipped: %s", self.endpoint, seq, exc)
            return
        self.prefixes.apply(batch)

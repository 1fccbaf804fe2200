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

Isolation: vLLM shares its cache across every request, so a block it holds
says nothing of whose it is. The node counts a held block for a pod only if
the node itself sent that block's tokens to the engine under an owner the pod
may see (`sent`, from what the engine was given; the owner of a block is that
of the span its last token is in, scopes only narrowing along a context).
Otherwise a pod could learn from placement, or from ``cached_tokens`` in a
decision, that another tenant's prompt is cached.

Only blocks on the device (medium ``GPU``, or no medium: vLLM before the
medium field) count (stored and removed alike), and blocks of a LoRA adapter
are skipped (the base model's prompt does not reuse them); vLLM's CPU offload tier is a restore, not T0. Batches are
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
        self._sent: dict[int, set[str]] = {}  # chain key -> owners the node sent it under
        self._pending: list[tuple[Sequence[int], Sequence[tuple[int, Any]]]] = []  # sent before the block size was known
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
                    if event.medium not in DEVICE_MEDIA:
                        continue
                    for block in event.block_hashes:
                        key = self._key_of.pop(block, None)
                        if key is not None:
                            self._release(key)
                elif isinstance(event, AllBlocksCleared):
                    self._forget()

    def clear(self) -> None:
        """What the engine holds is unknown (a restart, a missed batch): count nothing
        until it says again. What the node sent it stays known."""
        with self._lock:
            self._forget()

    def _forget(self) -> None:
        self._key_of.clear()
        self._held.clear()
        self.block_size = None  # a restarted engine may use another block size

    def sent(self, tokens: Sequence[int], spans: Sequence[tuple[int, Any]]) -> None:
        """The node gave the engine ``tokens`` (spans: ``(first token, Namespace)``): note
        under which owner each of its whole blocks was sent."""
        if not spans:
            return
        with self._lock:
            if not self.block_size:
                self._pending = [*self._pending[-63:], (tuple(tokens), tuple(spans))]
                return
            self._note(tokens, spans)

    def _note(self, tokens: Sequence[int], spans: Sequence[tuple[int, Any]]) -> None:
        """Under the lock, with the block size known."""
        size = self.block_size or 0
        key, span = _ROOT, 0
        for start in range(0, len(tokens) - size + 1, size):
            last = start + size - 1
            while span + 1 < len(spans) and spans[span + 1][0] <= last:
                span += 1
            key = hash((key, tuple(tokens[start:start + size])))
            self._sent.setdefault(key, set()).add(spans[span][1].owner)
        if len(self._sent) > 4 * max(1, len(self._held)) + 100_000:  # keep it bounded by what is held
            self._sent = {k: v for k, v in self._sent.items() if k in self._held}

    def _stored(self, event: BlockStored) -> None:
        if event.medium not in DEVICE_MEDIA or event.lora_id is not None or event.lora_name is not None:
            return
        size = event.block_size
        if self.block_size is None:
            self.block_size = size
            pending, self._pending = self._pending, []
            for tokens, spans in pending:
                self._note(tokens, spans)
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

    def cached_tokens(self, prompt: Sequence[int], owners: Sequence[str]) -> int:
        """Leading tokens of ``prompt`` the engine holds and that a pod seeing ``owners``
        may count (whole blocks; never the whole prompt: one token is always evaluated)."""
        # Under the lock: the reader thread and `sent` change these sets while placement reads.
        with self._lock:
            size = self.block_size
            if not size or not self._held:
                return 0
            key, matched = _ROOT, 0
            held, sent, visible = self._held, self._sent, set(owners)
            for start in range(0, len(prompt) - size + 1, size):
                key = hash((key, tuple(prompt[start:start + size])))
                if key not in held or visible.isdisjoint(sent.get(key, ())):
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
        from nodeagent.kvevents import require_zmq

        zmq = require_zmq()
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

    def cached_tokens(self, prompt: Sequence[int], owners: Sequence[str]) -> int:
        return self.prefixes.cached_tokens(prompt, owners)

    def sent(self, tokens: Sequence[int], spans: Sequence[tuple[int, Any]]) -> None:
        self.prefixes.sent(tokens, spans)

    def clear(self) -> None:
        self.prefixes.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._thread.is_alive():  # a ZMQ socket is not to be closed under its reader
            log.warning("vLLM KV events from %s: the reader did not stop; its socket is left open", self.endpoint)
            return
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
            log.warning("vLLM KV events from %s: batch %d after %d; what it holds is unknown until it says again",
                        self.endpoint, seq, self._last_seq)
            self.prefixes.clear()
            self.gaps += 1
        self._last_seq = seq
        try:
            batch = decode_batch(frames[2])
        except DecodeError as exc:
            self.errors += 1
            log.warning("vLLM KV events from %s: batch %d skipped: %s", self.endpoint, seq, exc)
            return
        self.prefixes.apply(batch)

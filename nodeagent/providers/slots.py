"""A llama-server replica and its parallel slots, each slot a `Provider` of its own.

llama-server runs ``--parallel N`` sequences in one process, batched together
(continuous batching); each slot keeps its own KV context and the server
reuses a slot's common prefix (``cache_prompt``) when a request pins it with
``id_slot``. For the node a slot is therefore a T0 context exactly like the
embedded worker's single one: placement sees one candidate per slot, and the
executor's queue, held context, save and restore apply per slot.

`LlamaServerReplica` is the shared part: the server (launched by a launcher, or
attached to one already running), its liveness, and a short-lived health
answer so that N slots asking cost one HTTP call. `SlotProvider` maps the
Provider protocol's slot 0 onto its own slot of the replica.

Isolation: the server reuses whatever common prefix the slot holds; when the
node allows reusing fewer tokens than the slot and the prompt share (another
tenant's private context), `LlamaServerProvider` sends the request with
``cache_prompt`` off, so the prompt is evaluated whole.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Iterator

from nodeagent.providers.base import (
    GenerationRequest,
    GenerationResult,
    Health,
    ProviderCrashed,
    ProviderUnavailable,
    Rates,
    RestoredState,
    SavedState,
    TextSink,
)
from nodeagent.providers.llama_server import LlamaServerProvider

HEALTH_TTL_S = 0.5  # slots of one replica share a health answer this long
DOWN_DETAILS = ("connection refused",)  # a health answer that means the process is gone


class LlamaServerReplica:
    """One llama-server whose ``slots`` the node places turns on."""

    def __init__(self, server: LlamaServerProvider, *, slots: int, mode: str, version: str = "llama-server") -> None:
        self.server = server
        self.slots = slots
        self.mode = mode  # subprocess | podman | quadlet | attach
        self.version = version
        self._lock = threading.Lock()
        self._alive = False
        self._health: Health | None = None
        self.starts = 0

    @property
    def name(self) -> str:
        return self.server.name

    @property
    def attached(self) -> bool:
        return self.mode == "attach"

    @property
    def running(self) -> bool:
        """False once the server was seen gone (a refused connection, a crash mid-answer)."""
        return self._alive

    def mark_dead(self) -> None:
        self._alive = False
        self._health = None

    def start(self) -> None:
        """Start the server (a no-op when it answers already); an attached one is only checked."""
        with self._lock:
            if self._alive and self.server.health().ok:
                return
            if self.attached:
                health = self.server.health()
                if not health.ok:
                    raise ProviderUnavailable(f"{self.name}: the attached server at {self.server.base_url} "
                                              f"does not answer ({health.detail})")
            else:
                self.server.start()
            self.server.forget_contexts()
            self._alive, self._health = True, None
            self.starts += 1

    def stop(self) -> None:
        with self._lock:
            self._alive, self._health = False, None
            if not self.attached:
                self.server.stop()

    def health(self) -> Health:
        health = self._health
        if health is not None and time.time() - health.checked_at < HEALTH_TTL_S:
            return health
        health = self.server.health()
        if not health.ok and health.detail in DOWN_DETAILS:
            self._alive = False
        self._health = health
        return health


class SlotProvider:
    """The Provider protocol over one slot of a `LlamaServerReplica` (its slot 0 is ``slot``)."""

    kind = "llama_server"

    def __init__(self, replica: LlamaServerReplica, slot: int) -> None:
        if not 0 <= slot < replica.slots:
            raise ValueError(f"{replica.name} has slots 0..{replica.slots - 1}, not {slot}")
        self.replica = replica
        self.slot = slot
        self.name = f"{replica.name}/slot-{slot}"

    @property
    def version(self) -> str:
        return self.replica.version

    @property
    def running(self) -> bool:
        return self.replica.running

    @property
    def pid(self) -> int | None:
        """The engine process this slot lives in (None: attached, or in a container)."""
        return self.replica.server.pid

    def start(self) -> None:
        self.replica.start()

    def stop(self) -> None:
        self.replica.stop()

    def health(self) -> Health:
        return self.replica.health()

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        return self._alive_call(lambda: self.replica.server.tokenize(text, add_bos=add_bos, special=special))

    def generate(self, request: GenerationRequest, *, on_text: TextSink | None = None) -> GenerationResult:
        request = dataclasses.replace(request, slot=self.slot)
        server = self.replica.server  # it honours reuse_limit (cache_prompt off when the slot holds more)
        return self._alive_call(lambda: server.generate(request, on_text=on_text))

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        return self.replica.server.stream(dataclasses.replace(request, slot=self.slot))

    def context_tokens(self, slot: int = 0) -> list[int]:
        return self.replica.server.context_tokens(self.slot)

    def save_state(self, slot: int, path: Path) -> SavedState:
        return self._alive_call(lambda: self.replica.server.save_state(self.slot, path))

    def restore_state(self, slot: int, path: Path, *, verify: bool = True) -> RestoredState:
        return self._alive_call(lambda: self.replica.server.restore_state(self.slot, path, verify=verify))

    def erase(self) -> int:
        return self._alive_call(lambda: self.replica.server.erase(self.slot))

    def rates(self) -> Rates:
        return self.replica.server.rates()

    def _alive_call(self, call):
        """Run ``call``; a refused connection or a crash marks the replica dead (out of placement at once)."""
        try:
            return call()
        except (ProviderCrashed, ProviderUnavailable) as exc:
            if isinstance(exc, ProviderCrashed) or "refused the connection" in str(exc):
                self.replica.mark_dead()
            raise

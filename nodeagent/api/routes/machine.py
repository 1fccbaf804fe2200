"""`GET /v1/machine`: the cached MachineProfile (`?refresh=1` probes again)."""

from __future__ import annotations

import threading

import anyio
from typing import Any

from fastapi import APIRouter, Depends, Query
from starlette.responses import Response

from nodeagent.api.errors import json_bytes
from nodeagent.api.routes.common import JSON, error_responses, get_node
from nodeagent.contracts.machine import MachineProfile

router = APIRouter(tags=["machine"])


class _EncodedProfile:
    """The last profile's JSON bytes; re-encoded only when the node's profile object changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._profile: MachineProfile | None = None
        self._bytes = b""

    def encode(self, profile: MachineProfile) -> bytes:
        with self._lock:
            if profile is not self._profile:
                self._bytes = json_bytes(profile.to_wire())
                self._profile = profile
            return self._bytes


_encoded = _EncodedProfile()


def cached_profile(node: Any) -> MachineProfile | None:
    """The node's cached profile without blocking (None when a probe is needed).

    Prefers ``node.cached_machine()``; until the node has it, reads the cached
    reference directly (a single attribute read, atomic in CPython, never waits
    on the probe lock).
    """
    accessor = getattr(node, "cached_machine", None)
    if accessor is not None:
        return accessor()
    return getattr(node, "_profile", None)


@router.get("/v1/machine", response_model=MachineProfile, responses=error_responses(422),
            summary="what this machine has: CPU, memory, GPUs, Vulkan, Asahi, runtime, devices, backends")
async def get_machine(refresh: bool = Query(False, description="probe again instead of the cached profile (1/true)"),
                      node: Any = Depends(get_node)) -> Response:
    # The hot path (a cached profile) is answered on the event loop: no thread hop,
    # which is most of this route's latency tail on a busy host. Probing runs in a thread.
    profile = None if refresh else cached_profile(node)
    if profile is None:
        profile = await anyio.to_thread.run_sync(lambda: node.machine(refresh=refresh))
    return Response(_encoded.encode(profile), media_type=JSON)

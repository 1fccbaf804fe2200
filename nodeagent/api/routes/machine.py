"""`GET /v1/machine`: the cached MachineProfile (`?refresh=1` probes again)."""

from __future__ import annotations

import threading
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


@router.get("/v1/machine", response_model=MachineProfile, responses=error_responses(422),
            summary="what this machine has: CPU, memory, GPUs, Vulkan, Asahi, runtime, devices, backends")
def get_machine(refresh: bool = Query(False, description="probe again instead of the cached profile (1/true)"),
                node: Any = Depends(get_node)) -> Response:
    profile = node.machine(refresh=refresh)
    return Response(_encoded.encode(profile), media_type=JSON)

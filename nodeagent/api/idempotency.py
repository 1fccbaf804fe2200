"""The ``Idempotency-Key`` header of the routes that make pods (POST /v1/pods, chat completions).

The key lives in the credential's tenant scope (nodeagent.idempotency): two
tenants may use the same key without meeting. What the node stores and how a
replay is detected is nodeagent.idempotency's; this module only reads the
header and maps a conflict to 409 naming it.
"""

from __future__ import annotations

from typing import Any

from fastapi import Header

from nodeagent.api.errors import ApiError
from nodeagent.api.principal import Principal
from nodeagent.contracts.pod import AgentPod
from nodeagent.idempotency import HEADER, KEY_PATTERN, IdempotencyConflict, IdempotencyKey

REPLAYED_HEADER = "Idempotent-Replayed"

IDEMPOTENCY_KEY: Any = Header(
    None, alias=HEADER, min_length=1, max_length=255, pattern=KEY_PATTERN,
    description="1-255 printable ASCII characters, scoped to the credential's tenant and kept 24 h: a retry with "
                "the same key and the same request answers what the first one made; with another request, 409")


def pod_key(principal: Principal, header: str | None, pod: AgentPod) -> IdempotencyKey | None:
    return None if header is None else IdempotencyKey.for_pod(principal.key_scope, header, pod)


def chat_key(principal: Principal, header: str | None, body: dict[str, Any]) -> IdempotencyKey | None:
    return None if header is None else IdempotencyKey.for_chat(principal.key_scope, header, body)


def conflict(exc: IdempotencyConflict) -> ApiError:
    return ApiError(409, "idempotency_conflict", str(exc), field=HEADER)


__all__ = ["IDEMPOTENCY_KEY", "REPLAYED_HEADER", "chat_key", "conflict", "pod_key"]

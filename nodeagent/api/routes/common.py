"""Helpers shared by route modules: the node dependency and response encoding."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from fastapi import Request
from starlette.responses import Response

from nodeagent.api.errors import ApiError, error_body, json_bytes

JSON = "application/json"

# What routes promise about a missing Node method: the route exists and is
# documented, and answers 501 naming the method until the node implements it.
NOT_WIRED_STATUS = 501


async def get_node(request: Request) -> Any:
    return request.app.state.node


def node_method(node: Any, name: str) -> Callable[..., Any]:
    method = getattr(node, name, None)
    if method is None:
        raise ApiError(NOT_WIRED_STATUS, "not_implemented",
                       f"this agent's node does not provide {name}() yet; the route is reserved")
    return method


def to_wire(value: Any) -> Any:
    if hasattr(value, "to_wire"):
        return value.to_wire()
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", by_alias=True)
    if isinstance(value, (list, tuple)):
        return [to_wire(item) for item in value]
    if isinstance(value, dict):
        return {key: to_wire(item) for key, item in value.items()}
    return value


def wire_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Encode ``value`` (a contract, list, dict) without re-validating it.

    Routes declare ``response_model`` for the OpenAPI document; returning a
    Response skips FastAPI's second validation pass (the node already built
    validated contracts), which keeps hot routes fast.
    """
    return Response(json_bytes(to_wire(value)), status_code=status, media_type=JSON, headers=headers)


def items_response(values: Any) -> Response:
    return wire_response({"items": list(values)})


def optional_model(module: str, name: str) -> Any:
    """A contract class if its module exists (components land at different times), else None."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    from nodeagent.api.schemas import ErrorBody

    return {code: {"model": ErrorBody} for code in codes}


def not_found(kind: str, field: str, value: str) -> ApiError:
    return ApiError(404, "not_found", f"no {kind} with {field} {value!r}", field=field)


__all__ = ["error_body", "ApiError"]

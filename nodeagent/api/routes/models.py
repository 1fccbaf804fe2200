"""Models: list (with residency), load, unload.

``POST /v1/models/{name}:load`` uses a colon suffix (Google AIP-136 custom
methods). Starlette matches ``{name}`` as ``[^/]+`` and backtracks, so a model
reference that itself contains a colon (``qwen2:0.5b``) still parses:
``/v1/models/qwen2:0.5b:load`` -> name ``qwen2:0.5b``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path
from starlette.responses import Response

from nodeagent.api.routes.common import error_responses, get_node, items_response, node_method, wire_response

router = APIRouter(tags=["models"])

MODEL_NAME = Path(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]*$",
                  description="a model reference: NAME[:TAG] or sha256:<digest>")


def _not_found_to_404(exc: Exception, name: str) -> None:
    from nodeagent.api.routes.common import not_found

    if isinstance(exc, (KeyError, LookupError)) or type(exc).__name__ in ("ModelNotFound", "NotFound"):
        raise not_found("model", "name", name) from exc


@router.get("/v1/models", responses=error_responses(501),
            summary="models in the store with their residency (cold/warm/hot), from node.list_models()")
def list_models(node: Any = Depends(get_node)) -> Response:
    return items_response(node_method(node, "list_models")())


@router.post("/v1/models/{name}:load", responses=error_responses(404, 409, 422, 501, 507),
             summary="load a model into a provider (keeps it hot for its keep-alive)")
def load_model(name: str = MODEL_NAME, node: Any = Depends(get_node)) -> Response:
    method = node_method(node, "load_model")
    try:
        return wire_response(method(name))
    except Exception as exc:
        _not_found_to_404(exc, name)
        raise


@router.post("/v1/models/{name}:unload", responses=error_responses(404, 422, 501),
             summary="unload a model from its provider (it stays in the store)")
def unload_model(name: str = MODEL_NAME, node: Any = Depends(get_node)) -> Response:
    method = node_method(node, "unload_model")
    try:
        return wire_response(method(name))
    except Exception as exc:
        _not_found_to_404(exc, name)
        raise

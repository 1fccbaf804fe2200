"""The agent's own model routes: the store's listing (with residency), load, unload.

``GET /v1/store/models`` lists the store's ModelRecords and the residency of
those loaded; ``GET /v1/models`` is OpenAI's listing (nodeagent.api.routes.openai),
which OpenAI clients call by that path.

``POST /v1/models/{name}:load`` uses a colon suffix (Google AIP-136 custom
methods). Starlette matches ``{name}`` as ``[^/]+`` and backtracks, so a model
reference that itself contains a colon (``qwen2:0.5b``) still parses:
``/v1/models/qwen2:0.5b:load`` -> name ``qwen2:0.5b``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Path
from pydantic import Field
from starlette.responses import Response

from nodeagent.api.errors import ApiError
from nodeagent.api.principal import Principal, get_principal
from nodeagent.api.routes.common import error_responses, get_node, node_method, optional_model, to_wire, wire_response
from nodeagent.contracts.base import Contract, Input

router = APIRouter(tags=["models"])

MODEL_NAME = Path(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@/+-]*$",
                  description="a model reference: NAME[:TAG] or sha256:<digest>")
_ModelRecord = optional_model("nodeagent.contracts.model", "ModelRecord")
_ModelResidency = optional_model("nodeagent.contracts.model", "ModelResidency")


class ModelList(Contract):
    items: list[_ModelRecord or dict[str, Any]]  # type: ignore[valid-type]
    residency: list[_ModelResidency or dict[str, Any]] = Field(  # type: ignore[valid-type]
        default_factory=list, description="models loaded now (hot) or recorded as wanted, with keep-alive")


# Longer than a year is forever (-1); an unbounded number overflowed the residency's clock arithmetic.
MAX_KEEP_ALIVE_S = 366 * 24 * 3600


class LoadOptions(Input):
    keep_alive_s: float | None = Field(default=None, ge=-1, le=MAX_KEEP_ALIVE_S,
                                       description="seconds to stay loaded when idle (at most a year); -1 forever")
    pin: bool | None = Field(default=None, description="never evict it to make room")


class UnloadResult(Contract):
    model: str
    unloaded: bool = Field(description="false when it was not loaded (or in use and not forced)")


@router.get("/v1/store/models", response_model=ModelList, responses=error_responses(501),
            summary="models in the store, and the residency of those loaded (cold/warm/hot, keep-alive)")
def list_models(node: Any = Depends(get_node)) -> Response:
    records = node_method(node, "list_models")()
    residency = getattr(node, "list_residency", lambda: [])()
    return wire_response({"items": to_wire(records), "residency": to_wire(residency)})


@router.post("/v1/models/{name}:load", response_model=_ModelResidency,
             responses=error_responses(403, 404, 409, 422, 501, 503),
             summary="load a model into a provider (evicting by expected cost); its residency row")
def load_model(name: str = MODEL_NAME, options: LoadOptions | None = Body(None),
               node: Any = Depends(get_node), principal: Principal = Depends(get_principal)) -> Response:
    principal.require_admin("loading a model")
    method = node_method(node, "load_model")
    kwargs = {}
    if options is not None:
        kwargs = {k: v for k, v in (("keep_alive_s", options.keep_alive_s), ("pin", options.pin)) if v is not None}
    residency = method(name, **kwargs)
    if residency is None:  # a concurrent unload took it before its row could be read
        raise ApiError(409, "conflict", f"{name} was unloaded while it loaded; load it again", field="model")
    return wire_response(residency)


@router.post("/v1/models/{name}:unload", response_model=UnloadResult,
             responses=error_responses(403, 404, 409, 422, 501, 503),
             summary="unload a model from its provider (it stays in the store)")
def unload_model(name: str = MODEL_NAME, node: Any = Depends(get_node),
                 principal: Principal = Depends(get_principal)) -> Response:
    principal.require_admin("unloading a model")
    result = node_method(node, "unload_model")(name)
    if isinstance(result, bool):
        return wire_response(UnloadResult(model=name, unloaded=result))
    return wire_response(result)

"""Receipts and checkpoints: `GET /v1/receipts/{id}`, `GET /v1/receipts?since=`, `GET /v1/checkpoints/latest`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Query
from starlette.responses import Response

from nodeagent.api.errors import ApiError
from nodeagent.api.routes.common import (
    error_responses,
    get_node,
    items_response,
    node_method,
    not_found,
    optional_model,
    wire_response,
)

router = APIRouter(tags=["receipts"])

_ExecutionReceipt = optional_model("nodeagent.contracts.receipt", "ExecutionReceipt")


@router.get("/v1/receipts", responses=error_responses(422, 501),
            summary="receipts with sequence number >= since, oldest first (node.list_receipts(since))")
def list_receipts(since: int = Query(0, ge=0, description="first sequence number to return"),
                  limit: int = Query(100, ge=1, le=1000, description="at most this many"),
                  node: Any = Depends(get_node)) -> Response:
    method = node_method(node, "list_receipts")
    try:
        return items_response(method(since, limit=limit))
    except TypeError:
        return items_response(method(since)[:limit])


@router.get("/v1/receipts/{receipt_id}", response_model=_ExecutionReceipt, responses=error_responses(404, 422, 501),
            summary="one signed receipt (DSSE envelope and its log position)")
def get_receipt(receipt_id: str = Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9:._-]+$"),
                node: Any = Depends(get_node)) -> Response:
    method = node_method(node, "get_receipt")
    try:
        receipt = method(receipt_id)
    except Exception as exc:
        # The receipt log says "no entry matches ..." for an unknown id (and the log
        # has no index before the first receipt); an ambiguous prefix is the caller's to fix.
        message = str(exc)
        if type(exc).__name__ == "ReceiptError" or isinstance(exc, LookupError):
            if "ambiguous" in message:
                raise ApiError(422, "invalid_request", message, field="receipt_id") from exc
            raise ApiError(404, "not_found", message or f"no receipt {receipt_id!r}", field="receipt_id") from exc
        raise
    if receipt is None:
        raise not_found("receipt", "receipt_id", receipt_id)
    return wire_response(receipt)


@router.get("/v1/checkpoints/latest", responses=error_responses(404, 501),
            summary="the latest signed checkpoint of the receipt log (size, root hash, signature)")
def latest_checkpoint(node: Any = Depends(get_node)) -> Response:
    checkpoint = node_method(node, "latest_checkpoint")()
    if checkpoint is None:
        raise not_found("checkpoint", "checkpoint", "latest")
    return wire_response(checkpoint)

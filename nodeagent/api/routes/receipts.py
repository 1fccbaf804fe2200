"""Receipts and checkpoints: `GET /v1/receipts/{id}`, `GET /v1/receipts?since=`, `GET /v1/checkpoints/latest`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Query
from starlette.responses import Response

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
                  node: Any = Depends(get_node)) -> Response:
    return items_response(node_method(node, "list_receipts")(since))


@router.get("/v1/receipts/{receipt_id}", response_model=_ExecutionReceipt, responses=error_responses(404, 422, 501),
            summary="one signed receipt (DSSE envelope and its log position)")
def get_receipt(receipt_id: str = Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9:._-]+$"),
                node: Any = Depends(get_node)) -> Response:
    receipt = node_method(node, "get_receipt")(receipt_id)
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

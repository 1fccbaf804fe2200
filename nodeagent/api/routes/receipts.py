"""Receipts and checkpoints: `GET /v1/receipts/{id}`, `GET /v1/receipts?since=`, `GET /v1/checkpoints/latest`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Path, Query
from starlette.responses import Response

from nodeagent.api.errors import ApiError
from nodeagent.api.principal import Principal, get_principal
from nodeagent.contracts.receipt import ExecutionReceipt
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
_LogEntry = optional_model("nodeagent.contracts.receipt", "LogEntry")
# Execution receipts are every caller's; key rotations and node events (LogEntry) only admin's.
_AnyEntry = _ExecutionReceipt if _LogEntry is None else _ExecutionReceipt | _LogEntry


def _sees(principal: Principal, receipt: Any) -> bool:
    """A receipt belongs to its pod's tenant and agent; other log entries (key rotations) to admin."""
    if principal.is_admin:
        return True
    if not isinstance(receipt, ExecutionReceipt):
        return False
    pod = receipt.statement.predicate.pod
    return principal.sees(pod.tenant, pod.agent)


@router.get("/v1/receipts", responses=error_responses(422, 501),
            summary="receipts with sequence number >= since, oldest first (node.list_receipts(since))")
def list_receipts(since: int = Query(0, ge=0, description="first sequence number to return"),
                  limit: int = Query(100, ge=1, le=1000, description="at most this many"),
                  node: Any = Depends(get_node), principal: Principal = Depends(get_principal)) -> Response:
    receipts = node_method(node, "list_receipts")(since, limit=limit, tenant=principal.tenant)
    return items_response([receipt for receipt in receipts if _sees(principal, receipt)])


@router.get("/v1/receipts/{receipt_id}", response_model=_AnyEntry, responses=error_responses(404, 422, 501),
            summary="one signed log entry: an execution receipt, or (admin) a key rotation or node event")
def get_receipt(receipt_id: str = Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9:._-]+$"),
                node: Any = Depends(get_node), principal: Principal = Depends(get_principal)) -> Response:
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
            raise not_found("receipt", "receipt_id", receipt_id) from exc
        raise
    if receipt is None or not _sees(principal, receipt):
        # Another tenant's receipt is answered exactly like a missing one.
        raise not_found("receipt", "receipt_id", receipt_id)
    return wire_response(receipt)


@router.get("/v1/checkpoints/latest", responses=error_responses(404, 501),
            summary="the latest signed checkpoint of the receipt log (size, root hash, signature)")
def latest_checkpoint(node: Any = Depends(get_node)) -> Response:
    checkpoint = node_method(node, "latest_checkpoint")()
    if checkpoint is None:
        raise not_found("checkpoint", "checkpoint", "latest")
    return wire_response(checkpoint)

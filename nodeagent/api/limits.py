"""Request limits as pure ASGI middleware: body size cap, time to response, metrics.

Both limits read the node's *current* configuration on every request, so a
SIGHUP reload changes them without a restart.

* Body cap (``api.max_body_bytes``): a declared ``Content-Length`` above the
  cap is answered 413 before the body is read; a chunked body is counted as it
  streams and the request fails with 413 as soon as it crosses the cap.
* Timeout (``api.request_timeout_s``): a request that has not *started* its
  response by then gets 504. A streamed response (pod events) is not cut once
  it has started; the stream bounds itself.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from nodeagent import metrics
from nodeagent.api.errors import error_body, json_bytes


class BodyTooLarge(HTTPException):
    """Raised while reading the body; FastAPI re-raises HTTPExceptions unchanged."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes (config api.max_body_bytes)")


async def _send_json(send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] = ()) -> None:
    payload = json_bytes(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode()), *headers]})
    await send({"type": "http.response.body", "body": payload})


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _send_json(send, 400, error_body("bad_request", "Content-Length is not a number",
                                                           "Content-Length"))
                    return
                if declared > limit:
                    await _send_json(send, 413, error_body(
                        "body_too_large", f"request body of {declared} bytes exceeds {limit} bytes "
                        "(config api.max_body_bytes)", "body"), [(b"connection", b"close")])
                    return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counting_receive, send)


class Deadline:
    def __init__(self, app: ASGIApp, timeout: Callable[[], float]) -> None:
        self.app = app
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = asyncio.Event()

        async def marking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.set()
            await send(message)

        task = asyncio.ensure_future(self.app(scope, receive, marking_send))
        waiter = asyncio.ensure_future(started.wait())
        try:
            done, _ = await asyncio.wait({task, waiter}, timeout=self.timeout(), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not done:
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001 - the cancelled request's outcome no longer matters
                pass
            if not started.is_set():
                await _send_json(send, 504, error_body(
                    "timeout", f"the request took longer than {self.timeout():g}s (config api.request_timeout_s)"))
            return
        await task


class RequestMetrics:
    """Counts requests by route *template* (bounded label values), method and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500

        async def status_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, status_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            metrics.record_api_request(template, scope.get("method", "?"), status, time.perf_counter() - began)


Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

"""`create_app(node)`: the FastAPI application over one `Node`.

The app itself does no authentication: the daemon serves it on each listener
wrapped in `nodeagent.api.auth.Authenticate`, which leaves the request's
`Principal` for the routes to authorise against (nodeagent.api.principal).
Served bare, it answers as to the Unix socket's owner (admin).
Limits (body size, time to respond) read the node's current config on every
request, so a config reload applies to the next request.
"""

from __future__ import annotations

import importlib
from typing import Any

from fastapi import FastAPI

from nodeagent.api.errors import install_error_handlers
from nodeagent.api.limits import BodyLimit, Deadline, RequestMetrics
from nodeagent.api.routes import ROUTE_MODULES

DESCRIPTION = """\
The local API of agent-machine, a node agent for LLM inference hosts.

Served on a Unix socket (`$XDG_RUNTIME_DIR/agent-machine/api.sock`, or
`/run/agent-machine/api.sock` for the system service; mode 0600) and, when
configured, on TCP with `Authorization: Bearer <token>`. A token issued with
`agent-machine tokens issue --tenant T` sees and acts on tenant T's pods,
receipts and cache entries only (another tenant's are 404, as missing ones);
the admin token and the socket's owner see everything.

`POST /v1/pods` and the chat completion routes take an `Idempotency-Key`
header: the same key with the same request answers the pod it already made
(`Idempotent-Replayed: true`); with another request, 409.

Every error has the body `{"error": {"type", "message", "field", "param", "details"}}`;
4xx answers name the offending field. Routes whose node capability is not
installed answer 501 naming the missing capability.
"""


def create_app(node: Any, *, listeners: list[str] | None = None) -> FastAPI:
    """Build the app. ``listeners`` (e.g. ``["unix:/run/.../api.sock"]``) shows in `/v1/status`."""
    from nodeagent import __version__

    app = FastAPI(title="agent-machine", version=__version__, description=DESCRIPTION,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.node = node
    app.state.listeners = list(listeners or [])
    install_error_handlers(app)
    for name in ROUTE_MODULES:
        module = importlib.import_module(f"nodeagent.api.routes.{name}")
        app.include_router(module.router)
    # Added last = outermost: metrics see every answer, including limit refusals.
    app.add_middleware(Deadline, timeout=lambda: float(node.config.api.request_timeout_s))
    app.add_middleware(BodyLimit, limit=lambda: int(node.config.api.max_body_bytes))
    app.add_middleware(RequestMetrics)
    return app

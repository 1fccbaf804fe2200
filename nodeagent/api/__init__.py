"""The local HTTP API: a thin shell over `nodeagent.node.Node`.

Public entry points: `create_app(node) -> FastAPI` and, for the TCP listener,
`nodeagent.api.auth.BearerTokenGuard(app, token)`.
"""

from nodeagent.api.app import create_app

__all__ = ["create_app"]

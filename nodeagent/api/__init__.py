"""The local HTTP API: a thin shell over `nodeagent.node.Node`.

Public entry points: `create_app(node) -> FastAPI` and, for each listener,
`nodeagent.api.auth.Authenticate(app, credentials, token_required=...)`.
"""

from nodeagent.api.app import create_app

__all__ = ["create_app"]

"""Route modules; each exposes ``router`` (an APIRouter)."""

ROUTE_MODULES = (
    "health",
    "machine",
    "pods",
    "models",
    "providers",
    "cache",
    "placements",
    "receipts",
    "openai",
)

"""Versioned wire formats (pydantic v2). See `nodeagent.contracts.base`."""

from nodeagent.contracts.base import API_VERSION, Contract, Resource

__all__ = ["API_VERSION", "Contract", "Resource"]

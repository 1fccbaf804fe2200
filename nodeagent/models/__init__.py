"""Models: content-addressed store, GGUF metadata, memory fit, residency.

Knows nothing of the API, CLI or daemon (ARCHITECTURE.md, "Imports").
"""

"""agent-machine: a per-machine node agent for local LLM inference hosts."""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("agent-machine")
except _metadata.PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+source"

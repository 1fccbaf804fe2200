"""agent-machine: a per-machine node agent for local LLM inference hosts."""

# The one place the version is written (pyproject.toml reads it from here):
# importlib.metadata would cost ~20 ms on every command.
__version__ = "0.1.0"

"""Where agent-machine keeps its files.

Two scopes:

* ``user`` (default): XDG base directories of the invoking user.
* ``system``: /etc, /var/lib, /var/cache and /run, as used by the system
  service. Chosen with ``AGENT_MACHINE_SCOPE=system`` or when systemd hands us
  ``STATE_DIRECTORY`` (``StateDirectory=`` in the unit).

Every directory can be overridden on its own by ``AGENT_MACHINE_<NAME>_DIR``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

APP = "agent-machine"
Scope = Literal["user", "system"]

# systemd's directory variables may hold several ':'-separated paths; the first is ours.
_SYSTEMD_VARS = {
    "config": "CONFIGURATION_DIRECTORY",
    "state": "STATE_DIRECTORY",
    "cache": "CACHE_DIRECTORY",
    "runtime": "RUNTIME_DIRECTORY",
}


@dataclass(frozen=True)
class Paths:
    scope: Scope
    config_dir: Path
    state_dir: Path
    cache_dir: Path
    runtime_dir: Path
    sources: Mapping[str, str]  # name -> where the value came from

    @property
    def config_file(self) -> Path:
        return self.config_dir / "config.toml"

    @property
    def db_file(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def api_socket(self) -> Path:
        return self.runtime_dir / "api.sock"

    def as_dict(self) -> dict[str, str]:
        return {
            "scope": self.scope,
            "config": str(self.config_dir),
            "state": str(self.state_dir),
            "cache": str(self.cache_dir),
            "runtime": str(self.runtime_dir),
        }


def _scope(env: Mapping[str, str]) -> Scope:
    value = env.get("AGENT_MACHINE_SCOPE", "").strip().lower()
    if value in ("user", "system"):
        return value  # type: ignore[return-value]
    if value:
        raise ValueError(f"AGENT_MACHINE_SCOPE must be 'user' or 'system', got {value!r}")
    return "system" if env.get("STATE_DIRECTORY") else "user"


def _defaults(scope: Scope, env: Mapping[str, str]) -> dict[str, Path]:
    if scope == "system":
        return {
            "config": Path("/etc") / APP,
            "state": Path("/var/lib") / APP,
            "cache": Path("/var/cache") / APP,
            "runtime": Path("/run") / APP,
        }
    home = Path(env.get("HOME") or Path.home())
    runtime_base = env.get("XDG_RUNTIME_DIR")
    return {
        "config": Path(env.get("XDG_CONFIG_HOME") or home / ".config") / APP,
        "state": Path(env.get("XDG_STATE_HOME") or home / ".local/state") / APP,
        "cache": Path(env.get("XDG_CACHE_HOME") or home / ".cache") / APP,
        # Without a user runtime dir (no login session, e.g. root in CI), fall
        # back to a private directory under the state dir rather than /tmp.
        "runtime": Path(runtime_base) / APP if runtime_base else Path(env.get("XDG_STATE_HOME") or home / ".local/state") / APP / "run",
    }


def resolve_paths(env: Mapping[str, str] | None = None) -> Paths:
    """Resolve the four directories. Pure: reads only ``env``; creates nothing."""
    env = os.environ if env is None else env
    scope = _scope(env)
    defaults = _defaults(scope, env)
    chosen: dict[str, Path] = {}
    sources: dict[str, str] = {}
    for name, default in defaults.items():
        override = env.get(f"AGENT_MACHINE_{name.upper()}_DIR")
        systemd_value = env.get(_SYSTEMD_VARS[name])
        if override:
            chosen[name], sources[name] = Path(override), f"env AGENT_MACHINE_{name.upper()}_DIR"
        elif systemd_value:
            chosen[name], sources[name] = Path(systemd_value.split(":")[0]), f"env {_SYSTEMD_VARS[name]}"
        else:
            chosen[name], sources[name] = default, f"default ({scope})"
    return Paths(
        scope=scope,
        config_dir=chosen["config"],
        state_dir=chosen["state"],
        cache_dir=chosen["cache"],
        runtime_dir=chosen["runtime"],
        sources=sources,
    )

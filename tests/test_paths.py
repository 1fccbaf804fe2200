from pathlib import Path

import pytest

from nodeagent.paths import resolve_paths


def test_user_scope_follows_xdg():
    p = resolve_paths({"HOME": "/home/a", "XDG_RUNTIME_DIR": "/run/user/1000"})
    assert p.scope == "user"
    assert p.config_dir == Path("/home/a/.config/agent-machine")
    assert p.state_dir == Path("/home/a/.local/state/agent-machine")
    assert p.cache_dir == Path("/home/a/.cache/agent-machine")
    assert p.api_socket == Path("/run/user/1000/agent-machine/api.sock")


def test_user_scope_without_runtime_dir_stays_private():
    p = resolve_paths({"HOME": "/root"})
    assert p.runtime_dir == Path("/root/.local/state/agent-machine/run")


def test_system_scope_and_systemd_directories():
    p = resolve_paths({"AGENT_MACHINE_SCOPE": "system"})
    assert (p.config_dir, p.state_dir, p.cache_dir, p.runtime_dir) == (
        Path("/etc/agent-machine"), Path("/var/lib/agent-machine"),
        Path("/var/cache/agent-machine"), Path("/run/agent-machine"))
    p = resolve_paths({"STATE_DIRECTORY": "/var/lib/agent-machine:/other", "RUNTIME_DIRECTORY": "/run/x"})
    assert p.scope == "system"
    assert p.state_dir == Path("/var/lib/agent-machine")
    assert p.runtime_dir == Path("/run/x")
    assert p.sources["state"] == "env STATE_DIRECTORY"


def test_each_directory_overridable():
    p = resolve_paths({"HOME": "/h", "AGENT_MACHINE_STATE_DIR": "/data/am"})
    assert p.state_dir == Path("/data/am")
    assert p.sources["state"] == "env AGENT_MACHINE_STATE_DIR"
    assert p.sources["config"] == "default (user)"


def test_bad_scope_names_the_variable():
    with pytest.raises(ValueError, match="AGENT_MACHINE_SCOPE"):
        resolve_paths({"AGENT_MACHINE_SCOPE": "global"})

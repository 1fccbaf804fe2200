"""The subprocess launcher and the launch registry, with a real llama-server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import psutil
import pytest

from nodeagent.launch.health import StartFailed
from nodeagent.launch.manage import LaunchContext, status_of
from nodeagent.launch.registry import LaunchRecord, Registry
from nodeagent.launch.subprocess import LaunchError, SubprocessLauncher, free_port, port_in_use, subprocess_argv
from nodeagent.providers.catalog import load_catalog, resolve_spec
from nodeagent.providers.llama_server import locate_llama_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def binary():
    path, how = locate_llama_server(build=True)
    if path is None:
        print(f"\nllama-server unavailable: {how}")
        pytest.skip(f"llama-server cannot be built here: {how}")
    return path


def spec(binary, model, name="sp", port=None, **kwargs):
    return resolve_spec(load_catalog().get("llama-server"), name=name, mode="subprocess", model_path=model,
                        port=port or free_port(), executable=str(binary), params={"ctx_size": 512},
                        extra_args=["--threads", "1"], start_timeout_s=60, **kwargs)


def test_up_ls_down(binary, tiny_model_path, tmp_path):
    registry = Registry(tmp_path)
    launcher = SubprocessLauncher(registry)
    s = spec(binary, tiny_model_path)
    assert subprocess_argv(s)[0] == str(binary)
    record = launcher.up(s)
    try:
        assert record.pid and psutil.pid_exists(record.pid)
        assert registry.load("sp").pid == record.pid
        status = status_of(registry.load("sp"), launcher)
        assert (status.state, status.health, status.endpoint) == ("running", "ok", s.base_url)
        assert "llama" in launcher.logs("sp").lower()
        with pytest.raises(LaunchError, match="already running"):
            launcher.up(s)
    finally:
        assert launcher.down("sp") is True
    assert not psutil.pid_exists(record.pid) or psutil.Process(record.pid).status() == psutil.STATUS_ZOMBIE
    assert registry.load("sp") is None and launcher.state("sp") == "absent"
    assert not port_in_use("127.0.0.1", s.port)
    with pytest.raises(LaunchError, match="no provider named sp"):
        launcher.down("sp")


def test_a_used_port_is_refused(binary, tiny_model_path, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(LaunchError, match=f"port 127.0.0.1:{port} is already in use"):
            SubprocessLauncher(Registry(tmp_path)).up(spec(binary, tiny_model_path, port=port))


def test_a_process_that_dies_while_starting_fails_fast_with_its_log(binary, tmp_path):
    bad_model = tmp_path / "not-a-model.gguf"
    bad_model.write_bytes(b"GGUF but not really")
    launcher = SubprocessLauncher(Registry(tmp_path / "reg"))
    started = time.monotonic()
    with pytest.raises(StartFailed) as caught:
        launcher.up(spec(binary, bad_model, name="bad"))
    assert time.monotonic() - started < 30  # not the 60 s start timeout
    message = str(caught.value)
    assert "bad exited with code" in message and "last log lines" in message
    assert Registry(tmp_path / "reg").load("bad") is None  # nothing left behind


def test_missing_executable_is_a_clear_error(tiny_model_path, tmp_path):
    s = resolve_spec(load_catalog().get("llama-server"), name="x", mode="subprocess", model_path=tiny_model_path,
                     port=free_port(), executable="definitely-not-installed-llama-server")
    with pytest.raises(LaunchError, match="is not on PATH"):
        SubprocessLauncher(Registry(tmp_path)).up(s)


def test_a_recycled_pid_is_never_signalled(binary, tiny_model_path, tmp_path):
    """A record whose pid now belongs to another process (different start
    time) must not lead to killing that process."""
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        registry = Registry(tmp_path)
        registry.save(LaunchRecord(spec=spec(binary, tiny_model_path, name="stale"), started_at=time.time(),
                                   pid=bystander.pid, pid_create_time=psutil.Process(bystander.pid).create_time() - 100))
        launcher = SubprocessLauncher(registry)
        assert launcher.state("stale") == "exited"
        assert launcher.down("stale") is False
        assert bystander.poll() is None  # still alive
        assert registry.load("stale") is None
    finally:
        bystander.kill()
        bystander.wait()


def test_registry_records_round_trip_and_bad_ones_are_named(binary, tiny_model_path, tmp_path):
    registry = Registry(tmp_path)
    record = LaunchRecord(spec=spec(binary, tiny_model_path, name="r1"), started_at=1.5, pid=42, pid_create_time=2.5,
                          log_path="/x/r1.log")
    registry.save(record)
    assert registry.load("r1") == record
    assert json.loads(registry.path("r1").read_text())["spec"]["kind"] == "ProviderSpec"
    assert registry.path("r1").stat().st_mode & 0o777 == 0o600
    registry.path("r2").write_text("{not json")
    with pytest.raises(ValueError, match=r"r2.json: unreadable launch record"):
        registry.load("r2")
    assert [r.spec.name for r in Registry(tmp_path / "none").all()] == []


def test_launch_context_picks_launchers(tmp_path):
    context = LaunchContext(Registry(tmp_path))
    assert isinstance(context.launcher("subprocess"), SubprocessLauncher)
    with pytest.raises(ValueError, match="quadlet mode needs the Podman version"):
        context.launcher("quadlet")
    with pytest.raises(ValueError, match="unknown launch mode 'kube'"):
        context.launcher("kube")


def test_free_port_is_free():
    port = free_port()
    assert not port_in_use("127.0.0.1", port)

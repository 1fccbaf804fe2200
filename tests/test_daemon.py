"""A real `agent-machine serve` subprocess: notify protocol, signals, crash recovery, listeners."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from nodeagent.config import load_config
from nodeagent.contracts.pod import PodPhase
from nodeagent.daemon import ServeError, _configure_logging, bind_unix, open_listeners, parse_tcp
from nodeagent.pods import RESTART_REASON

from pod_factory import make_pod
from test_api_harness import env_for

pytestmark = pytest.mark.slow

AGENT = shutil.which("agent-machine")
SERVE = [AGENT, "serve"] if AGENT else [sys.executable, "-m", "nodeagent.cli", "serve"]
TOKEN = "daemon-test-token-0123456789abcdef"


class Serve:
    """One `agent-machine serve` process with its own dirs and a notify socket to listen on."""

    def __init__(self, tmp_path: Path, *args: str, watchdog_usec: int | None = 400_000,
                 wrapper: list[str] | None = None, **env: str) -> None:
        self.tmp_path = tmp_path
        self.socket_path = tmp_path / "run" / "agent-machine" / "api.sock"
        self.notify_path = tmp_path / f"notify-{time.monotonic_ns()}"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.messages: list[dict[str, str]] = []
        full_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_", "AGENT_MACHINE_"))}
        full_env.update(env_for(tmp_path), NOTIFY_SOCKET=str(self.notify_path), **env)
        if watchdog_usec:
            full_env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.log = open(tmp_path / "serve.log", "ab")
        self.proc = subprocess.Popen([*(wrapper or []), *SERVE, *args], env=full_env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def next_message(self, timeout: float = 20.0) -> dict[str, str]:
        self.notify.settimeout(timeout)
        try:
            data = self.notify.recv(65536).decode()
        except socket.timeout:
            raise AssertionError(f"no notify message within {timeout}s; log:\n{self.read_log()}") from None
        message = dict(line.split("=", 1) for line in data.splitlines())
        self.messages.append(message)
        return message

    def wait_for_message(self, key: str, timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.next_message(timeout=max(0.1, deadline - time.monotonic()))
            if key in message:
                return message
        raise AssertionError(f"no {key} message; got {self.messages}")

    def client(self, **kwargs) -> httpx.Client:
        kwargs.setdefault("timeout", 10)
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket_path)), base_url="http://agent",
                            **kwargs)

    def read_log(self) -> str:
        self.log.flush()
        return (self.tmp_path / "serve.log").read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.notify.close()
            self.log.close()


@pytest.fixture()
def running(tmp_path):
    servers: list[Serve] = []

    def start(*args: str, **kwargs) -> Serve:
        server = Serve(tmp_path, *args, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=10)


def stored_pod(tmp_path: Path, pod_id: str):
    from nodeagent.node import Node

    node = Node(load_config(env_for(tmp_path)))
    try:
        return node.get_pod(pod_id)
    finally:
        node.close()


def test_notify_protocol_from_a_real_serve(running):
    server = running()
    ready = server.wait_for_message("READY")
    assert ready["READY"] == "1"
    assert ready["MAINPID"] == str(server.proc.pid)
    assert ready["STATUS"].startswith("ready; ") and f"listening on unix:{server.socket_path}" in ready["STATUS"]
    # The API answers once READY was sent.
    with server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
    # WATCHDOG_USEC=0.4 s -> a ping every 0.2 s.
    began = time.monotonic()
    pings = [server.wait_for_message("WATCHDOG", timeout=2) for _ in range(3)]
    assert all(p == {"WATCHDOG": "1"} for p in pings)
    assert time.monotonic() - began < 2.0
    server.proc.send_signal(signal.SIGTERM)
    stopping = server.wait_for_message("STOPPING", timeout=10)
    assert stopping["STOPPING"] == "1" and "draining (SIGTERM)" in stopping["STATUS"]
    assert server.stop() == 0
    assert not server.socket_path.exists(), "the socket file is removed on a clean stop"


def test_sigterm_drains_queued_pods(running, tmp_path):
    server = running("--paused", "--drain-timeout", "0.5")
    server.wait_for_message("READY")
    with server.client() as client:
        pod = client.post("/v1/pods", json=make_pod().to_wire()).json()
        assert pod["status"]["phase"] == "Admitted"
    assert server.stop() == 0
    # Drain resumes dispatch so queued pods may finish; this pod names a model the
    # store does not have, so it ends at once (Failed, saying why) or is cancelled by
    # the drain - either way it ended before exit, not left in flight for the next
    # start to fail as agent-restart.
    stored = stored_pod(tmp_path, pod["id"])
    assert stored.status.phase in (PodPhase.failed, PodPhase.cancelled)
    assert stored.status.transitions[-1].reason != RESTART_REASON
    assert stored.status.reasons


def test_kill_9_during_a_pod_then_restart_is_consistent(running, tmp_path):
    first = running("--paused")
    first.wait_for_message("READY")
    with first.client() as client:
        pods = [client.post("/v1/pods", json=make_pod(name=f"p{i}").to_wire()).json() for i in range(3)]
    assert {p["status"]["phase"] for p in pods} == {"Admitted"}
    first.stop(signal.SIGKILL)
    assert first.socket_path.exists(), "kill -9 leaves the socket file behind"

    second = running()
    ready = second.wait_for_message("READY")
    assert "listening" in ready["STATUS"]
    with second.client() as client:
        for pod in pods:
            after = client.get(f"/v1/pods/{pod['id']}").json()
            assert after["status"]["phase"] == "Failed"
            assert after["status"]["transitions"][-1]["reason"] == RESTART_REASON
            phases = [t["phase"] for t in after["status"]["transitions"]]
            assert phases == ["Pending", "Admitted", "Failed"]
        status = client.get("/v1/status").json()
        assert status["inFlight"] == 0 and status["pods"] == {"Failed": 3}
        # The restarted agent takes new pods.
        assert client.post("/v1/pods", json=make_pod(name="after").to_wire()).status_code == 201
    assert second.stop() == 0


def test_sighup_reloads_the_config(running, tmp_path):
    config_dir = tmp_path / "cfg"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "config.toml").write_text("[queue]\nmax_pods = 1\n")
    server = running("--paused")
    server.wait_for_message("READY")
    with server.client() as client:
        assert client.post("/v1/pods", json=make_pod(name="a").to_wire()).status_code == 201
        assert client.post("/v1/pods", json=make_pod(name="b").to_wire()).status_code == 429
        (config_dir / "config.toml").write_text("[queue]\nmax_pods = 5\n")
        server.proc.send_signal(signal.SIGHUP)
        assert server.wait_for_message("RELOADING")["RELOADING"] == "1"
        assert server.wait_for_message("READY")["READY"] == "1"
        assert client.post("/v1/pods", json=make_pod(name="b").to_wire()).status_code == 201
        # A broken config is refused and the running one kept.
        (config_dir / "config.toml").write_text("[queue]\nmax_pods = 'many'\n")
        server.proc.send_signal(signal.SIGHUP)
        ready = server.wait_for_message("READY")
        assert "last reload failed" in ready["STATUS"] and "queue.max_pods" in ready["STATUS"]
        assert client.post("/v1/pods", json=make_pod(name="c").to_wire()).status_code == 201
    assert server.stop() == 0


def test_socket_activation_serves_the_passed_socket(running, tmp_path):
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate is not installed (Debian package systemd)")
    path = tmp_path / "activated" / "agent-machine" / "api.sock"
    path.parent.mkdir(parents=True, mode=0o700)
    server = running(wrapper=[activate, "--listen", str(path)])
    deadline = time.monotonic() + 5
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    # systemd-socket-activate accepts nothing itself: the agent starts and takes fd 3.
    server.socket_path = path
    with server.client(timeout=30) as client:
        status = client.get("/v1/status").json()
    assert status["listeners"] == [f"unix:{path}"]
    assert not (tmp_path / "run" / "agent-machine" / "api.sock").exists(), "no socket of its own when activated"
    assert server.stop() == 0
    assert path.exists(), "a socket systemd owns is not removed by the agent"


def test_tcp_needs_a_token(running, tmp_path):
    server = running(AGENT_MACHINE_API_TCP="127.0.0.1:0")
    assert server.proc.wait(timeout=30) == 1
    log = server.read_log()
    assert "api.tcp is set" in log and "token" in log
    assert not server.socket_path.exists()


def test_a_declared_provider_for_a_missing_model_is_a_named_error_not_a_traceback(running, tmp_path):
    config = tmp_path / "fleet.toml"
    config.write_text('[[providers]]\nmodel = "smollm2"\n')
    server = running(AGENT_MACHINE_CONFIG=str(config))
    assert server.proc.wait(timeout=60) == 1
    log = server.read_log()
    assert "agent-machine: error: providers[0].model: 'smollm2' is not in the model store" in log
    assert "agent-machine models import" in log and "Traceback" not in log
    assert not server.socket_path.exists()


@pytest.mark.parametrize("level, httpx_level", [("info", logging.WARNING), ("warning", logging.WARNING),
                                                ("error", logging.ERROR), ("debug", logging.DEBUG)])
def test_the_http_clients_request_lines_show_only_at_debug(level, httpx_level):
    before = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    try:
        _configure_logging(level)
        assert logging.getLogger("httpx").getEffectiveLevel() == httpx_level
        assert logging.getLogger("httpcore").getEffectiveLevel() == httpx_level
    finally:
        for name, value in before.items():
            logging.getLogger(name).setLevel(value)


def test_tcp_with_a_token(running, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    server = running(AGENT_MACHINE_API_TCP="127.0.0.1:0", AGENT_MACHINE_API_TOKEN_FILE=str(token_file))
    server.wait_for_message("READY")
    with server.client() as client:  # the Unix socket needs no token
        listeners = client.get("/v1/status").json()["listeners"]
    tcp = [item for item in listeners if item.startswith("tcp:")]
    assert len(tcp) == 1
    base = "http://" + tcp[0].removeprefix("tcp:")
    assert httpx.get(base + "/v1/status").status_code == 401
    assert httpx.get(base + "/v1/status", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert httpx.get(base + "/v1/status", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert server.stop() == 0


def test_metrics_open_without_a_token_when_configured_and_on_reload(running, tmp_path):
    """A gateway's endpoint picker scrapes /metrics without a token: `api.metrics_without_token`
    opens that path on TCP (at once on SIGHUP) and nothing else."""
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    config_dir = tmp_path / "cfg"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "config.toml").write_text("[api]\nmetrics_without_token = false\n")
    server = running(AGENT_MACHINE_API_TCP="127.0.0.1:0", AGENT_MACHINE_API_TOKEN_FILE=str(token_file))
    server.wait_for_message("READY")
    with server.client() as client:
        base = "http://" + next(item for item in client.get("/v1/status").json()["listeners"]
                                if item.startswith("tcp:")).removeprefix("tcp:")
    assert httpx.get(base + "/metrics").status_code == 401
    (config_dir / "config.toml").write_text("[api]\nmetrics_without_token = true\n")
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for_message("RELOADING")
    server.wait_for_message("READY")
    scraped = httpx.get(base + "/metrics")
    assert scraped.status_code == 200 and "vllm:num_requests_waiting" in scraped.text
    assert httpx.get(base + "/v1/status").status_code == 401
    assert httpx.get(base + "/v1/pods").status_code == 401
    assert server.stop() == 0


def test_status_command_against_the_daemon(running, tmp_path):
    server = running()
    server.wait_for_message("READY")
    env = {**os.environ, **env_for(tmp_path)}
    env.pop("AGENT_MACHINE_URL", None)
    cli = [AGENT] if AGENT else [sys.executable, "-m", "nodeagent.cli"]
    out = subprocess.run([*cli, "status", "--format", "json"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"ready": true' in out.stdout
    assert server.stop() == 0
    gone = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert gone.returncode == 1
    assert "not running" in gone.stderr and "agent-machine serve" in gone.stderr


# ------------------------------------------------------------------ in-process pieces
def test_a_second_agent_on_the_same_socket_is_refused(tmp_path):
    path = tmp_path / "agent-machine" / "api.sock"
    first = bind_unix(path)
    try:
        with pytest.raises(ServeError, match="already listening"):
            bind_unix(path)
    finally:
        first.close()
    # Closed but not removed (as after kill -9): the stale file is replaced.
    second = bind_unix(path)
    second.close()


def test_socket_dir_open_to_others_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(ServeError, match="mode 755"):
        bind_unix(shared / "api.sock")
    ours = tmp_path / "agent-machine"
    ours.mkdir(mode=0o755)
    ours.chmod(0o755)
    bind_unix(ours / "api.sock").close()
    assert ours.stat().st_mode & 0o777 == 0o700


def test_a_non_socket_at_the_path_is_refused(tmp_path):
    path = tmp_path / "agent-machine" / "api.sock"
    path.parent.mkdir(mode=0o700)
    path.write_text("not a socket")
    with pytest.raises(ServeError, match="not a socket"):
        bind_unix(path)


@pytest.mark.parametrize("value, expected", [("127.0.0.1:8377", ("127.0.0.1", 8377)),
                                             ("[::1]:9000", ("::1", 9000)), ("localhost:1", ("localhost", 1))])
def test_parse_tcp(value, expected):
    assert parse_tcp(value) == expected


@pytest.mark.parametrize("value", ["8377", "host:", ":80", "h:70000", "h:x"])
def test_parse_tcp_rejects(value):
    with pytest.raises(ServeError, match="HOST:PORT"):
        parse_tcp(value)


def test_open_listeners_refuses_tcp_without_token(tmp_path):
    loaded = load_config(env_for(tmp_path, AGENT_MACHINE_API_TCP="127.0.0.1:0"))
    with pytest.raises(ServeError, match="no token"):
        open_listeners(loaded, token=None, env={})
    assert not loaded.paths.api_socket.exists()


@pytest.mark.llama
def test_kill_9_while_a_pod_runs_on_a_real_provider(running, tmp_path, tiny_model_path):
    """The production executor (tiny GGUF in a llama-cpp-python worker); kill -9 mid-pod, restart."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AGENT_MACHINE_")}, **env_for(tmp_path)}
    cli = [AGENT] if AGENT else [sys.executable, "-m", "nodeagent.cli"]
    imported = subprocess.run([*cli, "models", "import", str(tiny_model_path), "--name", "tiny"], env=env,
                              capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr
    first = running()
    first.wait_for_message("READY", timeout=60)
    long_pod = make_pod(name="long", turns=[f"turn {i}: tell me more" for i in range(40)], max_tokens=64)
    with first.client(timeout=30) as client:
        pod = client.post("/v1/pods", json=long_pod.to_wire()).json()
        deadline = time.monotonic() + 60
        phase = pod["status"]["phase"]
        while phase != "Running" and time.monotonic() < deadline:
            time.sleep(0.02)
            phase = client.get(f"/v1/pods/{pod['id']}").json()["status"]["phase"]
    assert phase == "Running", first.read_log()[-3000:]
    first.stop(signal.SIGKILL)

    second = running()
    second.wait_for_message("READY", timeout=60)
    with second.client(timeout=30) as client:
        after = client.get(f"/v1/pods/{pod['id']}").json()
        assert after["status"]["phase"] == "Failed"
        assert after["status"]["transitions"][-1]["reason"] == RESTART_REASON
        assert [t["phase"] for t in after["status"]["transitions"]][-2:] == ["Running", "Failed"]
        # Turns that finished before the kill were recorded and stay; none is half-written.
        turns = after["status"]["turns"]
        assert [t["index"] for t in turns] == list(range(len(turns)))
        assert len(turns) < 40
        # The restarted agent runs new pods to completion.
        fresh = client.post("/v1/pods", json=make_pod(name="fresh", model="tiny").to_wire()).json()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = client.get(f"/v1/pods/{fresh['id']}").json()["status"]
            if state["phase"] in ("Succeeded", "Failed", "Cancelled", "Refused"):
                break
            time.sleep(0.1)
        assert state["phase"] == "Succeeded", state
    assert second.stop() == 0

"""`fleet ps|score|conflicts` against three real agents on this machine (separate state dirs, loopback
TCP with tokens): all three shown, one stopped and flagged; the node holding the pod's prefix ranked first."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from nodeagent.fleetview import FleetFileError, load_nodes
from nodeagent.models.store import ModelStore

from pod_factory import make_pod
from test_api_harness import env_for

AGENT = shutil.which("agent-machine")
CLI = [AGENT] if AGENT else [sys.executable, "-m", "nodeagent.cli"]
PREFIX = " ".join(f"Policy {i}: answer in one sentence, cite the ticket, escalate outages." for i in range(14))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Agent:
    def __init__(self, root: Path, name: str, model: Path, **extra: str) -> None:
        self.name, self.dir = name, root / name
        self.port = free_port()
        self.token = f"{name}-token-0123456789abcdef0123"
        self.token_file = self.dir / "token"
        self.dir.mkdir(parents=True)
        self.token_file.write_text(self.token)
        self.token_file.chmod(0o600)
        ModelStore(self.dir / "state").import_model(model, "tiny")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_MACHINE_", "NOTIFY_", "LISTEN_"))}
        env.update(env_for(self.dir), AGENT_MACHINE_API_TCP=f"127.0.0.1:{self.port}",
                   AGENT_MACHINE_API_TOKEN_FILE=str(self.token_file), AGENT_MACHINE_MODELS_THREADS="1",
                   AGENT_MACHINE_CACHE_RAM_DIR=str(self.dir / "t1"), AGENT_MACHINE_RECONCILE_INTERVAL_S="1",
                   **extra)
        self.log = open(self.dir / "serve.log", "ab")
        self.proc = subprocess.Popen([*CLI, "serve"], env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}",
                                 headers={"Authorization": f"Bearer {self.token}"}, timeout=60)

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.dir / "serve.log").read_text()[-3000:]
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"{self.name} not ready: {(self.dir / 'serve.log').read_text()[-3000:]}")

    def run(self, pod) -> dict:
        pod_id = self.http.post("/v1/pods", json=pod.to_wire()).json()["id"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            got = self.http.get(f"/v1/pods/{pod_id}").json()
            if got["status"]["phase"] in ("Succeeded", "Failed", "Refused", "Cancelled"):
                assert got["status"]["phase"] == "Succeeded", got["status"]
                return got
            time.sleep(0.1)
        raise AssertionError("pod did not finish")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.http.close()
        self.log.close()


def fleet(*args: str, seen: Path) -> subprocess.CompletedProcess:
    command = [*CLI, "fleet", *args]
    if args[0] == "ps":
        command += ["--seen-file", str(seen)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def three(tmp_path_factory, tiny_model_path):
    root = tmp_path_factory.mktemp("fleet")
    agents = [Agent(root, "alpha", tiny_model_path),
              Agent(root, "bravo", tiny_model_path, AGENT_MACHINE_CLUSTER_NFD_DIR=str(root / "features.d")),
              Agent(root, "charlie", tiny_model_path)]
    nodes = root / "nodes.toml"
    nodes.write_text("".join(f'[[nodes]]\nname = "{a.name}"\nurl = "http://127.0.0.1:{a.port}"\n'
                             f'token_file = "{a.name}/token"\ninterval_s = 1\n\n' for a in agents))
    try:
        for agent in agents:
            agent.wait_ready()
        yield agents, nodes, root
    finally:
        for agent in agents:
            agent.stop()


@pytest.mark.slow
@pytest.mark.llama
def test_three_agents_ps_score_conflicts_and_one_stopped(three):
    agents, nodes, root = three
    alpha, bravo, charlie = agents
    seen = root / "seen.json"

    shown = fleet("ps", "--nodes", str(nodes), "--format", "json", seen=seen)
    assert shown.returncode == 0, shown.stderr
    rows = {r["name"]: r for r in json.loads(shown.stdout)}
    assert set(rows) == {"alpha", "bravo", "charlie"}
    assert all(r["state"] == "ready" and r["healthy"] and r["heartbeatAgeS"] == 0.0 for r in rows.values())
    assert {r["host"] for r in rows.values()} == {socket.gethostname()}
    assert all(r["drift"] == [] and abs(r["clockSkewS"]) < 2 for r in rows.values())  # one machine, one clock

    # The daemon keeps an NFD feature file current where [cluster] nfd_dir says.
    features = root / "features.d" / "agent-machine"
    deadline = time.monotonic() + 20
    while not features.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    from nodeagent.probe import nfd

    assert nfd.check(features.read_text()) == [] and "agent-machine.io/platform=" in features.read_text()

    # Every node warm (the model loaded, its rates measured); only bravo has seen this agent's prefix.
    for agent in agents:
        agent.run(make_pod(name=f"warm-{agent.name}", agent="other", system="Unrelated warm-up text.", max_tokens=4))
    bravo.run(make_pod(name="first", agent="support", system=PREFIX, turns=["ticket 1"], max_tokens=4))
    hot = fleet("ps", "--nodes", str(nodes), "--format", "json", seen=seen)
    hot = {r["name"]: r for r in json.loads(hot.stdout)}
    assert all(r["hotModels"] == ["tiny:latest"] for r in hot.values())
    assert hot["bravo"]["cache"]["T1"]["usedBytes"] > 0  # the saved state of its session
    assert hot["alpha"]["cache"]["T1"]["usedBytes"] == 0  # the warm-up was shorter than one block

    pod_file = root / "next.json"
    pod_file.write_text(json.dumps(make_pod(name="next", agent="support", system=PREFIX, turns=["ticket 2"],
                                            max_tokens=4).to_wire()))
    ranked = fleet("score", str(pod_file), "--nodes", str(nodes), "--format", "json", seen=seen)
    assert ranked.returncode == 0, ranked.stderr
    order = json.loads(ranked.stdout)
    assert order[0]["node"] == "bravo" and order[0]["rank"] == 1 and order[0]["cachedTokens"] > 0
    assert all(row["cachedTokens"] < order[0]["cachedTokens"] for row in order[1:])
    table = fleet("score", str(pod_file), "--nodes", str(nodes), seen=seen)
    assert table.stdout.splitlines()[1].split()[:2] == ["1", "bravo"]

    # One session in flight on two nodes at once is a fleet-level conflict.
    for agent in (alpha, bravo):
        assert agent.http.post("/v1/dispatch:pause").status_code in (200, 204)
    try:
        split = make_pod(name="split", agent="support", system=PREFIX, turns=["ticket 3"], max_tokens=2)
        for agent in (alpha, bravo):
            agent.http.post("/v1/pods", json=split.to_wire()).raise_for_status()
        found = fleet("conflicts", "--nodes", str(nodes), "--format", "json", seen=seen)
        kinds = [c for c in json.loads(found.stdout) if c["kind"] == "session"]
        assert len(kinds) == 1 and kinds[0]["node"] == "alpha,bravo" and "acme/support/default" in kinds[0]["detail"]
        busy = {r["name"]: r for r in json.loads(fleet("ps", "--nodes", str(nodes), "--format", "json",
                                                        seen=seen).stdout)}
        assert busy["alpha"]["tenants"] == ["acme"] and busy["alpha"]["inFlight"] == 1
        assert busy["charlie"]["tenants"] == [] and busy["charlie"]["inFlight"] == 0
    finally:
        for agent in (alpha, bravo):
            agent.http.post("/v1/dispatch:resume")

    # charlie stops: still listed, flagged stopped and unhealthy, with the age of its last answer; exit 1.
    charlie.stop()
    time.sleep(1.2)
    after = fleet("ps", "--nodes", str(nodes), "--format", "json", seen=seen)
    assert after.returncode == 1, after.stderr
    rows = {r["name"]: r for r in json.loads(after.stdout)}
    assert rows["charlie"]["state"] == "stopped" and not rows["charlie"]["healthy"]
    assert rows["charlie"]["heartbeatAgeS"] >= 1.0 and rows["charlie"]["error"]
    assert rows["alpha"]["healthy"] and rows["bravo"]["healthy"]
    text = fleet("ps", "--nodes", str(nodes), seen=seen).stdout
    line = next(l for l in text.splitlines() if l.startswith("charlie"))
    assert "stopped" in line and "NO" in line


def test_a_nodes_file_error_names_the_node_and_field(tmp_path):
    bad = tmp_path / "nodes.toml"
    bad.write_text('[[nodes]]\nname = "a"\nurl = "http://127.0.0.1:1"\n')
    with pytest.raises(FleetFileError, match=r"nodes\[0\]\.token_file: required"):
        load_nodes(bad)
    bad.write_text('[[nodes]]\nname = "a"\nurl = "ftp://x"\n')
    with pytest.raises(FleetFileError, match=r"nodes\[0\]\.url"):
        load_nodes(bad)
    bad.write_text('[[nodes]]\nname = "a"\nurl = "unix:///x"\n[[nodes]]\nname = "a"\nurl = "unix:///y"\n')
    with pytest.raises(FleetFileError, match=r"nodes\[1\]\.name: 'a' is listed twice"):
        load_nodes(bad)
    shown = subprocess.run([*CLI, "fleet", "ps", "--nodes", str(bad)], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 2 and "listed twice" in shown.stderr


def test_a_node_that_never_answered_is_stopped_with_no_heartbeat(tmp_path):
    nodes = tmp_path / "nodes.toml"
    nodes.write_text(f'[[nodes]]\nname = "ghost"\nurl = "unix://{tmp_path}/nothing.sock"\n')
    shown = fleet("ps", "--nodes", str(nodes), "--format", "json", seen=tmp_path / "seen.json")
    assert shown.returncode == 1
    row = json.loads(shown.stdout)[0]
    assert row["state"] == "stopped" and row["heartbeatAgeS"] is None and "no agent answering" in row["error"]


def test_drift_names_what_sets_a_node_apart_from_most():
    from nodeagent.fleetview import NodeView, _mark_drift

    def view(name, version="0.1.0", declared=(), skew=0.0, state="ready"):
        return NodeView(name, f"unix:///{name}", state, healthy=True, heartbeat_age_s=0.0, version=version,
                        declared=list(declared), clock_skew_s=skew)

    views = [view("a", declared=["tiny llama_server 1x4"]), view("b", declared=["tiny llama_server 1x4"]),
             view("c", version="0.0.9"), view("d", declared=["tiny llama_server 1x4"], skew=7.4),
             view("e", state="stopped", version=None)]
    _mark_drift(views)
    drift = {v.name: v.drift for v in views}
    assert drift["a"] == drift["b"] == [] and drift["e"] == []
    assert drift["c"] == ["version 0.0.9 (most: 0.1.0)",
                          "providers [default rule] (most: [tiny llama_server 1x4])"]
    assert drift["d"] == ["clock +7s"]

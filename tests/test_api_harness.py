"""Shared pieces for the API tests (no tests here).

`ServedApi` runs the real app under real uvicorn on a real Unix socket (bound
by the daemon's own `bind_unix`) in a background thread, and hands out httpx
clients over that socket. `StepExecutor` is a real executor minus the model: it
walks a pod through Placed -> Running -> (one TurnResult per turn) ->
Succeeded, and can hold pods in Running until released.
"""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx

from nodeagent.api import create_app
from nodeagent.config import load_config
from nodeagent.contracts.machine import (
    AmdInfo,
    AsahiInfo,
    ComputeDevice,
    CpuInfo,
    HostInfo,
    MachineProfile,
    MemoryInfo,
    NvidiaInfo,
    ProbeStatus,
    RuntimeInfo,
    StorageInfo,
    VulkanInfo,
)
from nodeagent.contracts.pod import PodPhase, TurnResult
from nodeagent.daemon import _uvicorn_server, bind_tcp, bind_unix
from nodeagent.node import Node


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(tmp_path), "AGENT_MACHINE_STATE_DIR": str(tmp_path / "state"),
            "AGENT_MACHINE_CONFIG_DIR": str(tmp_path / "cfg"), "AGENT_MACHINE_CACHE_DIR": str(tmp_path / "cache"),
            "AGENT_MACHINE_RUNTIME_DIR": str(tmp_path / "run" / "agent-machine"), **extra}


def fixture_profile(hostname: str = "fixture-host") -> MachineProfile:
    """A CPU-only MachineProfile built from the contract (what a plain VM reports)."""
    absent = ProbeStatus.absent
    return MachineProfile(
        probed_at=datetime.now(timezone.utc), agent_version="test", platform="cpu",
        host=HostInfo(hostname=hostname, os_id="debian", architecture="x86_64", page_size=4096),
        cpu=CpuInfo(vendor="GenuineIntel", model_name="Fixture CPU", cores=2, threads=2, features=["avx2"]),
        memory=MemoryInfo(total_bytes=8 << 30, available_bytes=6 << 30, effective_limit_bytes=8 << 30),
        nvidia=NvidiaInfo(status=absent, reason="no NVIDIA driver"), amd=AmdInfo(status=absent, reason="no AMD GPU"),
        vulkan=VulkanInfo(status=absent, reason="no vulkaninfo"), asahi=AsahiInfo(status=absent, reason="not Apple"),
        runtime=RuntimeInfo(), storage=StorageInfo(),
        devices=[ComputeDevice(id="cpu", kind="cpu", name="Fixture CPU", memory_kind="dedicated",
                               memory_total_bytes=8 << 30, memory_free_bytes=6 << 30)],
        recommended_backends=[],
    )


class CountingProbe:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, **kwargs: object) -> MachineProfile:
        self.calls += 1
        return fixture_profile(hostname=f"fixture-host-{self.calls}")


class NoProviders:
    """The executor's provider pool when it has none (what `Node.list_providers` reads)."""

    residency = None

    def all(self) -> list:
        return []


class StepExecutor:
    """Moves pods through their lifecycle honestly; ``hold`` keeps them Running."""

    cache = None
    receipts = None

    def __init__(self, node: Node) -> None:
        self.node = node
        self.hold = threading.Event()
        self.pool = NoProviders()

    def run(self, pod) -> None:
        self.node.pod_transition(pod.id, PodPhase.placed, reason="test placement")
        self.node.pod_transition(pod.id, PodPhase.running)
        for index, turn in enumerate(pod.spec.turns):
            while self.hold.is_set() and not self.node.is_cancelled(pod.id):
                time.sleep(0.01)
            if self.node.is_cancelled(pod.id):
                self.node.pod_transition(pod.id, PodPhase.cancelled, reason="cancelled by request")
                return
            text = turn.prompt if turn.prompt is not None else turn.messages[-1].content  # a text completion's prompt
            result = TurnResult(index=index, provider="step", prompt_tokens=len(text), cached_tokens=0,
                                evaluated_tokens=len(text), completion_tokens=1, cache_tier="none",
                                ttft_ms=1, total_ms=2, output=text[::-1])
            with self.node._db_lock:
                self.node.pods.record_turn(pod.id, result)
        self.node.pod_transition(pod.id, PodPhase.succeeded)


class WithoutMethod:
    """The node minus one capability (as a node built without that component would be)."""

    def __init__(self, node, missing: str) -> None:
        self._node, self._missing = node, missing

    def __getattr__(self, name):
        if name == self._missing:
            raise AttributeError(name)
        return getattr(self._node, name)


class ServedApi:
    """The app under real uvicorn on a Unix socket, in a thread of this process."""

    def __init__(self, node: Node, socket_path: Path | None = None, *, tcp: bool = False, guard=None) -> None:
        """Unix socket at ``socket_path``, or TCP on 127.0.0.1 (ephemeral port) with ``tcp``.

        ``guard`` wraps the app (the daemon wraps TCP in BearerTokenGuard).
        """
        self.node = node
        self.socket_path = socket_path
        if tcp:
            self.sock = bind_tcp("127.0.0.1", 0)
            self.port = self.sock.getsockname()[1]
        else:
            assert socket_path is not None
            self.sock = bind_unix(socket_path)
        self.sock.setblocking(False)
        self.app = create_app(node, listeners=[f"unix:{socket_path}"] if not tcp else [f"tcp:127.0.0.1:{self.port}"])
        if guard is not None:
            self.app = guard(self.app)
        self.server = _uvicorn_server(self.app, access_log=False, graceful_s=1)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    def _run(self) -> None:
        asyncio.run(self.server.serve(sockets=[self.sock]))

    def client(self, **kwargs) -> httpx.Client:
        timeout = kwargs.pop("timeout", 10)
        if self.socket_path is None:
            return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=timeout, **kwargs)
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket_path)),
                            base_url="http://agent", timeout=timeout, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)


def make_node(tmp_path: Path, *, executor=StepExecutor, probe_fn=None, **env: str) -> Node:
    node = Node(load_config(env_for(tmp_path, **env)), probe_fn=probe_fn or CountingProbe(),
                executor_factory=executor)
    node.start()
    return node


from pod_factory import wait_for  # noqa: E402,F401  (re-exported for the API tests)

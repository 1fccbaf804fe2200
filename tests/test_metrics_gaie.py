"""/metrics carries what the Gateway API Inference Extension's model-server protocol asks of a
backend, under the names a stock Endpoint Picker reads by default, per model, and they move under load."""

from __future__ import annotations

import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pod_factory import make_pod
from test_api_harness import ServedApi

pytestmark = pytest.mark.llama

# The Endpoint Picker's default flags (GAIE pkg/epp: --total-queued-requests-metric,
# --total-running-requests-metric, --kv-cache-usage-percentage-metric, --lora-info-metric).
EPP_DEFAULTS = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                "vllm:lora_requests_info")


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(text: str, name: str, model: str = "tiny:latest") -> float:
    return samples(text)[(name, (("model_name", model),))]


@pytest.fixture()
def served(tmp_path, tiny_model_path):
    from nodeagent.config import load_config
    from nodeagent.models.store import ModelStore
    from nodeagent.node import Node, default_executor

    env = {"HOME": str(tmp_path), "AGENT_MACHINE_STATE_DIR": str(tmp_path / "state"),
           "AGENT_MACHINE_CONFIG_DIR": str(tmp_path / "cfg"), "AGENT_MACHINE_CACHE_DIR": str(tmp_path / "cache"),
           "AGENT_MACHINE_RUNTIME_DIR": str(tmp_path / "run"), "AGENT_MACHINE_CACHE_RAM_DIR": str(tmp_path / "t1"),
           "AGENT_MACHINE_MODELS_THREADS": "1", "AGENT_MACHINE_MODELS_CONTEXT": "1024"}
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    node = Node(load_config(env), executor_factory=default_executor)
    node.start()
    api = ServedApi(node, tmp_path / "run" / "api.sock")
    try:
        yield api
    finally:
        api.stop()
        node.close()


def test_the_protocol_metrics_move_under_load_and_settle(served):
    with served.client() as client:
        idle = client.get("/metrics").text
        for name in EPP_DEFAULTS[:3]:
            assert any(key[0] == name for key in samples(idle)), f"{name} missing"
        assert any(key[0] == "vllm:lora_requests_info" for key in samples(idle))

        pods = [make_pod(name=f"load{i}", agent=f"a{i}", system=f"Agent {i}: " + "be brief. " * 30,
                         max_tokens=160) for i in range(4)]  # long enough to be seen running
        ids = [client.post("/v1/pods", json=p.to_wire()).json()["id"] for p in pods]
        seen_waiting, seen_running = 0.0, 0.0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = client.get("/metrics").text
            try:
                seen_waiting = max(seen_waiting, value(text, "vllm:num_requests_waiting"))
                seen_running = max(seen_running, value(text, "vllm:num_requests_running"))
            except KeyError:
                pass  # the model is still loading: no context yet
            phases = [client.get(f"/v1/pods/{i}").json()["status"]["phase"] for i in ids]
            if all(p == "Succeeded" for p in phases):
                break
            time.sleep(0.02)
        assert seen_waiting >= 1 and seen_running == 1  # one context: one runs, the others queue

        settled = client.get("/metrics").text
        assert value(settled, "vllm:num_requests_waiting") == 0
        assert value(settled, "vllm:num_requests_running") == 0
        usage = value(settled, "vllm:kv_cache_usage_perc")
        assert 0 < usage <= 1 and value(settled, "vllm:gpu_cache_usage_perc") == usage
        held = sum(len(m.held.tokens) for m in served.node.executor.pool.all())
        assert usage == pytest.approx(held / 1024)

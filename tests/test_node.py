"""Node pod pipeline without providers: admission, queue limits, cancel, drain, recovery."""

import time
from datetime import datetime, timezone

import pytest

from nodeagent.config import load_config
from nodeagent.contracts.pod import PodPhase
from nodeagent.node import Node, NodeClosed, QueueFull

from pod_factory import make_pod, wait_for


def env_for(tmp_path, **extra):
    return {"HOME": str(tmp_path), "AGENT_MACHINE_STATE_DIR": str(tmp_path / "state"),
            "AGENT_MACHINE_CONFIG_DIR": str(tmp_path / "cfg"), "AGENT_MACHINE_CACHE_DIR": str(tmp_path / "cache"),
            "AGENT_MACHINE_RUNTIME_DIR": str(tmp_path / "run"), **extra}


class RecordingExecutor:
    """A real executor minus the model: walks the lifecycle and blocks until released."""

    def __init__(self, node):
        self.node = node
        self.ran = []
        self.release = False

    def run(self, pod):
        self.node.pod_transition(pod.id, PodPhase.placed)
        self.node.pod_transition(pod.id, PodPhase.running)
        while not self.release and not self.node.is_cancelled(pod.id):
            time.sleep(0.01)
        if self.node.is_cancelled(pod.id):
            self.node.pod_transition(pod.id, PodPhase.cancelled, reason="cancelled by request")
        else:
            self.ran.append(pod.id)
            self.node.pod_transition(pod.id, PodPhase.succeeded)


@pytest.fixture()
def node(tmp_path):
    n = Node(load_config(env_for(tmp_path)), executor_factory=RecordingExecutor)
    n.start()
    yield n
    n.executor.release = True
    n.close()


def test_pod_runs_to_success(node):
    pod = node.submit_pod(make_pod())
    assert pod.status.phase is PodPhase.admitted
    node.executor.release = True
    assert wait_for(lambda: node.get_pod(pod.id).status.phase is PodPhase.succeeded)
    phases = [t.phase for t in node.get_pod(pod.id).status.transitions]
    assert phases == [PodPhase.pending, PodPhase.admitted, PodPhase.placed, PodPhase.running, PodPhase.succeeded]


def test_queue_full_raises_before_persisting(tmp_path):
    node = Node(load_config(env_for(tmp_path, AGENT_MACHINE_QUEUE_MAX_PODS="2")), executor_factory=RecordingExecutor)
    node.start()
    node.pause_dispatch()
    node.submit_pod(make_pod(name="a"))
    node.submit_pod(make_pod(name="b"))
    with pytest.raises(QueueFull) as err:
        node.submit_pod(make_pod(name="c"))
    assert err.value.retry_after_s >= 1
    assert {p.metadata.name for p in node.list_pods()} == {"a", "b"}
    node.resume_dispatch()
    node.executor.release = True
    assert wait_for(lambda: all(p.status.phase is PodPhase.succeeded for p in node.list_pods()))
    node.close()


def test_refused_by_policy_ends_at_once_with_reasons(tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('version = 1\ndefault = "deny"\n')
    node = Node(load_config(env_for(tmp_path, AGENT_MACHINE_POLICY_PATH=str(policy))))
    node.start()
    pod = node.submit_pod(make_pod(tenant="ghost"))
    assert pod.status.phase is PodPhase.refused
    assert "tenant 'ghost' is not in the policy" in pod.status.reasons[0]
    node.close()


def test_cancel_queued_and_running(node):
    node.pause_dispatch()
    queued = node.submit_pod(make_pod(name="queued"))
    assert node.cancel_pod(queued.id).status.phase is PodPhase.cancelled
    node.resume_dispatch()
    running = node.submit_pod(make_pod(name="running"))
    assert wait_for(lambda: node.get_pod(running.id).status.phase is PodPhase.running)
    node.cancel_pod(running.id)
    assert wait_for(lambda: node.get_pod(running.id).status.phase is PodPhase.cancelled)
    # cancelling a finished pod changes nothing
    assert node.cancel_pod(queued.id).status.phase is PodPhase.cancelled


def test_without_executor_pods_fail_with_a_clear_reason(tmp_path):
    node = Node(load_config(env_for(tmp_path)))
    node.start()
    pod = node.submit_pod(make_pod())
    assert wait_for(lambda: node.get_pod(pod.id).status.phase is PodPhase.failed)
    assert "no executor" in node.get_pod(pod.id).status.reasons[0]
    node.close()


def test_drain_refuses_new_pods_and_cancels_stragglers(node):
    pod = node.submit_pod(make_pod())
    assert wait_for(lambda: node.get_pod(pod.id).status.phase is PodPhase.running)
    node.drain(timeout_s=0.2)
    assert node.get_pod(pod.id).status.phase is PodPhase.cancelled
    with pytest.raises(NodeClosed):
        node.submit_pod(make_pod(name="late"))


def test_restart_recovers_in_flight_pods(tmp_path):
    first = Node(load_config(env_for(tmp_path)), executor_factory=RecordingExecutor)
    first.start()
    pod = first.submit_pod(make_pod())
    assert wait_for(lambda: first.get_pod(pod.id).status.phase is PodPhase.running)
    # simulate a crash: abandon `first` without draining, start a second node on the same state
    second = Node(load_config(env_for(tmp_path)))
    assert second.start() == [pod.id]
    got = second.get_pod(pod.id)
    assert got.status.phase is PodPhase.failed and got.status.transitions[-1].reason == "agent-restart"
    first.executor.release = True
    second.close()

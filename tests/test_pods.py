import threading
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, precondition

from nodeagent.contracts.pod import TERMINAL_PHASES, AgentPod, PodPhase, TurnResult
from nodeagent.pods import ALLOWED, InvalidTransition, PodNotFound, PodStore
from nodeagent.store import connect
from pydantic import ValidationError

from pod_factory import make_pod

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc)


@pytest.fixture()
def store(tmp_path):
    return PodStore(connect(tmp_path / "state.db"))


def test_happy_path_keeps_every_transition_in_order(store):
    pod = store.create(make_pod(), now=T0)
    assert pod.id and pod.status.phase is PodPhase.pending
    for i, phase in enumerate([PodPhase.admitted, PodPhase.placed, PodPhase.running, PodPhase.succeeded], 1):
        store.transition(pod.id, phase, now=T0 + timedelta(seconds=i))
    store.record_turn(pod.id, TurnResult(index=0, provider="embedded", prompt_tokens=10, cached_tokens=4,
                                         evaluated_tokens=6, completion_tokens=3, cache_tier="T1",
                                         ttft_ms=5, total_ms=9, output="abc"))
    store.add_receipt(pod.id, "r-1")
    got = store.get(pod.id)
    assert [t.phase for t in got.status.transitions] == [
        PodPhase.pending, PodPhase.admitted, PodPhase.placed, PodPhase.running, PodPhase.succeeded]
    assert [t.at for t in got.status.transitions] == [T0 + timedelta(seconds=i) for i in range(5)]
    assert got.status.turns[0].cached_tokens == 4
    assert got.status.receipt_ids == ["r-1"]
    assert got.spec == make_pod().spec


def test_terminal_phase_is_final_and_bad_edges_are_named(store):
    pod = store.create(make_pod())
    store.transition(pod.id, PodPhase.refused, reasons=["tenant not allowed"])
    with pytest.raises(InvalidTransition, match="Refused -> Admitted"):
        store.transition(pod.id, PodPhase.admitted)
    assert store.get(pod.id).status.reasons == ["tenant not allowed"]
    other = store.create(make_pod(name="p2"))
    with pytest.raises(InvalidTransition, match="Pending -> Running"):
        store.transition(other.id, PodPhase.running)


def test_unknown_pod(store):
    with pytest.raises(PodNotFound, match="nope"):
        store.get("nope")


def test_recover_fails_in_flight_pods_and_leaves_finished_ones(tmp_path):
    db = tmp_path / "state.db"
    first = PodStore(connect(db))
    done = first.create(make_pod(name="done"))
    for phase in (PodPhase.admitted, PodPhase.placed, PodPhase.running, PodPhase.succeeded):
        first.transition(done.id, phase)
    running = first.create(make_pod(name="running"))
    for phase in (PodPhase.admitted, PodPhase.placed, PodPhase.running):
        first.transition(running.id, phase)
    pending = first.create(make_pod(name="pending"))
    # a "restart": a fresh connection on the same file
    second = PodStore(connect(db))
    assert sorted(second.recover()) == sorted([running.id, pending.id])
    assert second.get(running.id).status.phase is PodPhase.failed
    assert second.get(running.id).status.transitions[-1].reason == "agent-restart"
    assert second.get(done.id).status.phase is PodPhase.succeeded
    assert second.recover() == []


def test_concurrent_writers_cannot_both_leave_a_phase(tmp_path):
    db = tmp_path / "state.db"
    pod = PodStore(connect(db)).create(make_pod())
    PodStore(connect(db)).transition(pod.id, PodPhase.admitted)
    outcomes = []

    def worker(target):
        try:
            PodStore(connect(db)).transition(pod.id, target)
            outcomes.append(target)
        except InvalidTransition:
            outcomes.append(None)

    threads = [threading.Thread(target=worker, args=(t,)) for t in (PodPhase.placed, PodPhase.cancelled) * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = PodStore(connect(db)).get(pod.id).status
    # Placed may be followed by Cancelled (allowed), but never two Placed and never two terminals.
    phases = [t.phase for t in final.transitions]
    assert phases.count(PodPhase.placed) <= 1
    assert sum(p in TERMINAL_PHASES for p in phases) <= 1


def test_contract_rejects_bad_pods_naming_the_field():
    with pytest.raises(ValidationError, match="turns"):
        AgentPod.model_validate({"kind": "AgentPod", "metadata": {"name": "p", "tenant": "t", "agent": "a"},
                                 "spec": {"model": {"name": "m"}, "turns": []}})
    with pytest.raises(ValidationError, match="digest"):
        make_pod().model_validate({**make_pod().to_wire(), "spec": {**make_pod().to_wire()["spec"], "context": [
            {"role": "system", "text": "x", "digest": "sha256:" + "0" * 64}]}})
    with pytest.raises(ValidationError, match="extraField"):
        AgentPod.model_validate({**make_pod().to_wire(), "extraField": 1})
    with pytest.raises(ValidationError, match="name"):
        make_pod(name="Bad Name")


class Lifecycle(RuleBasedStateMachine):
    """Random interleavings of transitions, restarts and recoveries: no pod is lost,
    only allowed edges are taken, and after recovery every pod is terminal."""

    def __init__(self):
        super().__init__()
        import tempfile
        self.dir = tempfile.mkdtemp()
        self.store = PodStore(connect(f"{self.dir}/state.db"))
        self.model: dict[str, PodPhase] = {}

    @rule()
    def submit(self):
        pod = self.store.create(make_pod(name=f"p{len(self.model)}"))
        self.model[pod.id] = PodPhase.pending

    @precondition(lambda self: self.model)
    @rule(data=st.data(), phase=st.sampled_from(list(PodPhase)))
    def move(self, data, phase):
        target = phase
        pod_id = data.draw(st.sampled_from(sorted(self.model)))
        try:
            self.store.transition(pod_id, target)
        except InvalidTransition:
            assert target not in ALLOWED[self.model[pod_id]]
        else:
            assert target in ALLOWED[self.model[pod_id]]
            self.model[pod_id] = target

    @rule()
    def restart_and_recover(self):
        self.store = PodStore(connect(f"{self.dir}/state.db"))
        self.store.recover()
        for pod_id, phase in self.model.items():
            if phase not in TERMINAL_PHASES:
                self.model[pod_id] = PodPhase.failed
        assert all(p.status.phase in TERMINAL_PHASES for p in self.store.list(limit=10_000))

    @invariant()
    def store_matches_model(self):
        stored = {p.id: p.status.phase for p in self.store.list(limit=10_000)}
        assert stored == self.model


TestLifecycle = Lifecycle.TestCase
TestLifecycle.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)

"""The node schedules across a declared provider fleet (`nodeagent.fleet`).

A declaration is checked before anything starts, and refused with its field
named; a declared llama-server fleet serves pods slot by slot, each slot a
placement candidate whose context the node tracks; a replica killed mid-run is
found, restarted, and every turn still ends with a receipt.
"""

from __future__ import annotations

import logging
import os
import random
import sqlite3
import subprocess
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from nodeagent.config import ConfigError, ProviderDeclaration, load_config
from nodeagent.contracts.pod import PodPhase
from nodeagent.execution import executor as executor_module
from nodeagent.execution.executor import PodExecutor
from nodeagent.execution.pool import HeldContext, ManagedProvider, ProviderPool, RunningTurn
from nodeagent.fleet import FleetError, FleetHandle, default_rule, plan_fleet
from nodeagent.kvcache.blocks import Namespace
from nodeagent.models.store import ModelStore
from nodeagent.node import Node, default_executor
from nodeagent.providers.base import ProviderUnavailable, Rates
from nodeagent.providers.llama_server import locate_llama_server
from nodeagent.scheduler import placement
from nodeagent.scheduler.placement import LoadGuard, busy_fraction, explain
from nodeagent.scheduler.rates import DECODE, PREFILL

from pod_factory import make_pod, wait_for

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fleet.toml"
TERMINAL = {PodPhase.succeeded, PodPhase.failed, PodPhase.cancelled, PodPhase.refused}


def env_for(tmp_path: Path, config: Path | None = None, **extra: str) -> dict[str, str]:
    env = {"HOME": str(tmp_path), "AGENT_MACHINE_STATE_DIR": str(tmp_path / "state"),
           "AGENT_MACHINE_CONFIG_DIR": str(tmp_path / "cfg"), "AGENT_MACHINE_CACHE_DIR": str(tmp_path / "cache"),
           "AGENT_MACHINE_RUNTIME_DIR": str(tmp_path / "run"), "AGENT_MACHINE_CACHE_RAM_DIR": str(tmp_path / "t1"),
           **extra}
    if config is not None:
        env["AGENT_MACHINE_CONFIG"] = str(config)
    return env


@pytest.fixture(scope="module")
def llama_server() -> Path:
    path, how = locate_llama_server(build=True)
    assert path is not None, how
    return path


@pytest.fixture()
def store(tmp_path, tiny_model_path) -> ModelStore:
    models = ModelStore(tmp_path / "state")
    models.import_model(tiny_model_path, "tiny")
    return models


# ------------------------------------------------------------------ declarations
@pytest.mark.parametrize("fields, message", [
    ({"kind": "ollama"}, "providers[0].kind: 'ollama' is not a provider kind"),
    ({"mode": "docker"}, "providers[0].mode: 'docker' is not a launch mode"),
    ({"model": "nope"}, "providers[0].model: 'nope' is not in the model store"),
    ({"load": "lazy"}, "providers[0].load: 'lazy'"),
    ({"mode": "attach"}, "providers[0].urls: mode attach needs one URL per replica"),
    ({"urls": ["http://127.0.0.1:1"]}, "providers[0].urls: only mode attach takes URLs"),
    ({"kind": "llama_cpp_python", "slots": 4}, "providers[0].slots: the embedded worker has one context"),
    ({"kind": "llama_cpp_python", "mode": "podman"}, "providers[0].mode: the embedded llama_cpp_python worker"),
    ({"ctx_per_slot": 1 << 20}, "providers[0].ctx_per_slot"),
    ({"kv_events": "tcp://127.0.0.1:5557"}, "providers[0].kv_events: only vLLM publishes KV events"),
    ({"kind": "vllm", "mode": "podman", "kv_events": "tcp://127.0.0.1:5557"},
     "providers[0].kv_events: subscribing is for mode subprocess or attach"),
    ({"kind": "vllm", "kv_events": "127.0.0.1:5557"}, "providers[0].kv_events: '127.0.0.1:5557' is not tcp://HOST:PORT"),
    ({"kind": "vllm", "replicas": 2, "kv_events": "tcp://127.0.0.1:65535"},
     "providers[0].kv_events: 'tcp://127.0.0.1:65535' is not tcp://HOST:PORT with a port for each of 2"),
])
def test_a_bad_declaration_is_refused_with_its_field_named(store, llama_server, fields, message):
    declaration = ProviderDeclaration(**{"model": "tiny", **fields})
    with pytest.raises(FleetError, match=message.replace("[", r"\[").replace("]", r"\]")):
        plan_fleet([declaration], store, budget_bytes=None, llama_server=llama_server)


def test_slots_times_context_over_the_memory_budget_is_refused_naming_slots(store, llama_server):
    declaration = ProviderDeclaration(model="tiny", replicas=4, slots=64, ctx_per_slot=2048)
    with pytest.raises(FleetError, match=r"providers\[0\]\.slots: 4 replica\(s\) x 64 slot\(s\) x 2048 tokens .* "
                                         r"over the memory budget"):
        plan_fleet([declaration], store, budget_bytes=64 << 20, llama_server=llama_server)


def test_one_model_may_have_several_declarations_of_one_kind(store):
    plan = plan_fleet([ProviderDeclaration(model="tiny"), ProviderDeclaration(model="tiny", mode="podman")],
                      store, budget_bytes=None, llama_server=Path("/bin/true"))
    assert [m.name for m in plan.for_digest(plan.models[0].record.digest)] == ["tiny-ls", "tiny-ls-podman"]
    mixed = [ProviderDeclaration(model="tiny"), ProviderDeclaration(model="tiny", kind="llama_cpp_python")]
    with pytest.raises(FleetError, match=r"providers\[1\]\.kind: 'tiny' is served by llama_server already"):
        plan_fleet(mixed, store, budget_bytes=None, llama_server=Path("/bin/true"))


def test_a_missing_binary_is_refused(store):
    with pytest.raises(FleetError, match=r"providers\[0\]\.mode: no llama-server binary"):
        plan_fleet([ProviderDeclaration(model="tiny")], store, budget_bytes=None, llama_server=None)


def test_the_config_file_reads_providers_as_an_array_of_tables(tmp_path):
    config = tmp_path / "fleet.toml"
    config.write_text('[[providers]]\nmodel = "m"\nreplicas = 2\nslots = 4\n\n[[providers]]\nmodel = "n"\n'
                      'kind = "llama_cpp_python"\n')
    loaded = load_config(env_for(tmp_path, config))
    assert [(p.model, p.kind, p.replicas, p.slots) for p in loaded.config.providers] == [
        ("m", "llama_server", 2, 4), ("n", "llama_cpp_python", 1, 1)]
    config.write_text('providers = "llama-server"\n')
    with pytest.raises(ConfigError, match=r"providers must be an array of tables \(\[\[providers\]\]\)"):
        load_config(env_for(tmp_path, config))
    config.write_text('[[providers]]\nmodel = "m"\nslots = 0\n')
    with pytest.raises(ConfigError, match="providers.0.slots"):
        load_config(env_for(tmp_path, config))


def test_the_default_rule_is_stated_and_follows_the_host():
    small, why = default_rule(cpus=2, has_gpu=False, llama_server=Path("/x/llama-server"), context=4096, threads=None)
    assert small is None and "embedded llama-cpp-python worker" in why and "2 CPUs" in why
    big, why = default_rule(cpus=16, has_gpu=False, llama_server=Path("/x/llama-server"), context=4096, threads=2)
    assert (big.kind, big.slots, big.ctx_per_slot, big.load) == ("llama_server", 4, 4096, "on-demand")
    assert "4 slots" in why and "16 CPUs" in why
    gpu, why = default_rule(cpus=2, has_gpu=True, llama_server=Path("/x/llama-server"), context=4096, threads=None)
    assert gpu.kind == "llama_server" and gpu.gpu_layers == -1 and "a GPU" in why
    none, why = default_rule(cpus=64, has_gpu=True, llama_server=None, context=4096, threads=None)
    assert none is None and "no llama-server binary" in why


# ------------------------------------------------------------------ placement over many slots
class Slot:
    """Stands in for one slot of a replica: only what the pool and the executor's placement read."""

    def __init__(self, name: str, rates: Rates) -> None:
        self.name, self.kind, self.running, self._rates = name, "llama_server", True, rates

    def rates(self) -> Rates:
        return self._rates

    def stop(self) -> None:
        self.running = False


class FrozenClock:
    """The executor's `time` with a fixed `monotonic`, so that both placements see one instant."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def monotonic() -> float:
        return 1000.0


def random_fleet(rng: random.Random, prompt: list[int]) -> tuple[PodExecutor, str | None]:
    """4-8 replicas x 8 slots of a model: slots holding nothing, the prompt's first 300
    tokens (a shared system prompt) or more of it, some running or queued (their siblings
    carry their work), some holding sessions (load), replicas of different speeds."""
    refused = {f"r{rng.randrange(8)}/s{rng.randrange(8)}" for _ in range(rng.randrange(3))}
    policy = SimpleNamespace(provider_refusal=lambda tenant, provider, kind: "not allowed" if provider in refused
                             else None)
    node = SimpleNamespace(db=sqlite3.connect(":memory:", check_same_thread=False), _db_lock=threading.RLock(),
                           policy=policy)
    pool = ProviderPool(loader=lambda record: None)
    executor = PodExecutor(node, pool=pool, models=None, cache=None, receipts=None,
                           guard=rng.choice([LoadGuard(enabled=False), LoadGuard()]))
    names = []
    for r in range(rng.randint(4, 8)):
        rates = Rates(prefill_tokens_per_s=rng.choice([300.0, 600.0]), decode_tokens_per_s=rng.choice([20.0, 40.0]))
        for s in range(8):
            managed = pool.add(ManagedProvider(Slot(f"r{r}/s{s}", rates), RECORD.digest, launch_mode="attach",
                                               group=f"r{r}"))
            names.append(managed.name)
            held = rng.choice([0, 0, 0, 300, 300, 301, 2000])
            other = [rng.randrange(1000, 2000) for _ in range(rng.randrange(1, 500))]
            managed.expected = HeldContext(tuple(prompt[:held] + other) if held else tuple(other))
            if rng.random() < 0.3:
                prefill, decode = rng.choice([0, 800, 4000]), rng.choice([0, 16, 64])
                managed.queued_requests, managed.queued_prefill_tokens = 1, prefill
                managed.queued_decode_tokens = decode
                if rng.random() < 0.5:
                    managed.running = RunningTurn(0, 1000.0 - rng.choice([0.0, 0.5, 3.0]),
                                                  rng.choice([None, 2.0, 6.0]), prefill, decode)
            if rng.random() < 0.3:
                managed.sessions = {f"pod-{s}": rng.choice([500, 2000, 6000])}
    if rng.random() < 0.5:
        return executor, None
    # A later turn: its provider holds the session (and, at times, so does a sibling: the
    # sibling beats it on the tie-break, yet the guard may move only the sibling away).
    slots = {m.name: m for m in pool.all()}
    home = slots[rng.choice(names)]
    home.expected, home.sessions = HeldContext(tuple(prompt[:-20])), {"pod-home": 2000}
    if rng.random() < 0.5:
        twin = slots[f"{home.group}/s{rng.randrange(8)}"]
        twin.expected, twin.sessions = home.expected, dict(home.sessions)
        twin.queued_requests, twin.queued_prefill_tokens, twin.queued_decode_tokens = (
            home.queued_requests, home.queued_prefill_tokens, home.queued_decode_tokens)
        twin.running = home.running
    return executor, home.name


RECORD = SimpleNamespace(digest="sha256:" + "cd" * 32, names=["tiny"], size_bytes=10**9)


def test_placement_over_many_slots_chooses_what_scoring_every_slot_chooses(monkeypatch):
    """The executor's own candidates (queue terms with sibling contention, refused slots,
    a pinned pod, a later turn's provider, T0 prefixes of several lengths): leaving out
    the slots a sibling beats changes neither the choice, nor its estimate, nor the
    guard's part, and the decision says how many slots it did not score."""
    monkeypatch.setattr(executor_module, "time", FrozenClock())
    weights = []  # the busy fraction each placement weighs work by

    def place(request, states, registry, guard, folded=None):
        weights.append(busy_fraction(states, folded))
        return placement.place(request, states, registry, guard, folded=folded)

    monkeypatch.setattr(executor_module, "place", place)
    rng = random.Random(13)
    folded_any = 0
    for trial in range(300):
        prompt = [rng.randrange(1, 900) for _ in range(rng.choice([400, 3000]))]
        executor, session_provider = random_fleet(rng, prompt)
        session = SimpleNamespace(tokens=prompt, spans=[(0, Namespace("m", "public"))], tenant="acme", agent="a")
        pinned = rng.choice([None] * 8 + ["r0/s3"])
        pod = make_pod(**({"provider": pinned} if pinned else {}))
        decisions = []
        for fold in (True, False):
            executor.fold_slots = fold
            decision, _ = executor._place(pod, RECORD, session, dry_run=True, session_provider=session_provider)
            decisions.append(decision)
        part, full = decisions
        assert part.provider == full.provider, (trial, part.reason, full.reason)
        assert weights[-2] == pytest.approx(weights[-1])
        assert part.guard_applied == full.guard_applied
        assert (part.chosen.ttft_s if part.chosen else None) == (full.chosen.ttft_s if full.chosen else None)
        left_out = len(full.to_contract().candidates) - len(part.to_contract().candidates)
        assert (f"; {left_out} slots not scored" in part.reason) if left_out else ("not scored" not in part.reason)
        folded_any += left_out
    assert folded_any > 300 * 4 * 8 // 2  # most slots were left out


# ------------------------------------------------------------------ a running fleet
def fleet_config(tmp_path: Path, model: str, *, replicas: int, slots: int, extra: str = "") -> Path:
    config = tmp_path / "fleet.toml"
    config.write_text(f'[reconcile]\ninterval_s = 0.5\n\n[[providers]]\nmodel = "{model}"\nreplicas = {replicas}\n'
                      f'slots = {slots}\nctx_per_slot = 1024\nthreads = 1\nload = "eager"\n{extra}')
    return config


def session_pods(count: int, model: str, turns: int = 3):
    return [make_pod(name=f"s{i}", tenant=f"t{i % 4}", agent=f"a{i}", model=model,
                     system=f"You are assistant number {i}. " + "Answer briefly and precisely. " * 12,
                     turns=["Name a color.", "Name a fruit.", "Name an animal."][:turns], max_tokens=8)
            for i in range(count)]


@pytest.mark.llama
@pytest.mark.slow
def test_the_example_fleet_places_sixteen_sessions_where_their_prefix_is(tmp_path, smollm2_path, llama_server):
    ModelStore(tmp_path / "state").import_model(smollm2_path, "smollm2")
    node = Node(load_config(env_for(tmp_path, EXAMPLE)), executor_factory=default_executor, dispatchers=16)
    node.start()
    try:
        assert wait_for(lambda: len(node.executor.pool.all()) == 8, timeout=120), node.fleet_view()
        view = node.fleet_view()
        assert view["rule"].startswith(f"declared in {EXAMPLE}")
        assert view["declared"][0]["running"] == ["smollm2-ls-0", "smollm2-ls-1"]
        # Each replica measured itself as it started: every slot is priced before its first turn.
        for managed in node.executor.pool.all():
            for quantity in (PREFILL, DECODE):
                estimate = node.executor.rates.estimate(managed.name, quantity)
                assert estimate.source == "provider" and estimate.value > 0, (managed.name, estimate)
        pods = [node.submit_pod(p) for p in session_pods(16, "smollm2")]
        assert wait_for(lambda: all(node.get_pod(p.id).status.phase in TERMINAL for p in pods), timeout=600)
        replicas_used = set()
        for pod in pods:
            got = node.get_pod(pod.id)
            assert got.status.phase is PodPhase.succeeded, got.status.reasons
            decisions = node.pod_decisions(pod.id)
            assert len(got.status.turns) == 3 and len(decisions) == 3
            for turn, decision in zip(got.status.turns[1:], decisions[1:]):
                # After the first turn every turn lands where its prefix is: its slot (T0)
                # or a restore of its saved state into a free slot (T1/T2).
                chosen = next(c for c in decision.candidates if c.provider == decision.chosen)
                assert chosen.cache_source in ("T0", "T1", "T2"), explain(decision)
                # (llama-server may evaluate the last shared token again to get its logits)
                assert turn.cache_tier == chosen.cache_source and turn.cached_tokens >= chosen.cached_tokens - 1 > 0
                assert turn.provider == decision.chosen
            replicas_used |= {t.provider.split("/")[0] for t in got.status.turns}
        assert replicas_used == {"smollm2-ls-0", "smollm2-ls-1"}
        rows = {row.name: row for row in node.list_providers()}
        assert set(rows) == {f"smollm2-ls-{r}/slot-{s}" for r in range(2) for s in range(4)}
        held = [row for row in rows.values() if row.held_tokens]
        assert held and all(row.owner and row.owner.startswith("t") and row.busy is False for row in held)
        assert {row.replica for row in rows.values()} == {"smollm2-ls-0", "smollm2-ls-1"}
        # Each slot names its engine's process: one per replica, alive.
        pids = {row.replica: {r.pid for r in rows.values() if r.replica == row.replica} for row in rows.values()}
        assert all(len(p) == 1 and os.path.exists(f"/proc/{next(iter(p))}") for p in pids.values()), pids
        assert len({next(iter(p)) for p in pids.values()}) == 2
    finally:
        node.close()
    assert not (tmp_path / "state" / "fleet").exists() or not list((tmp_path / "state" / "fleet").glob("*.json"))


@pytest.mark.llama
@pytest.mark.slow
def test_a_replica_killed_mid_run_is_restarted_and_every_turn_ends_with_a_receipt(tmp_path, tiny_model_path,
                                                                                   llama_server):
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    config = fleet_config(tmp_path, "tiny", replicas=2, slots=2)
    node = Node(load_config(env_for(tmp_path, config)), executor_factory=default_executor, dispatchers=8)
    node.start()
    stop = threading.Event()

    def reconcile() -> None:  # what the daemon's loop does every interval
        while not stop.is_set():
            node.reconcile_once()
            time.sleep(0.5)

    loop = threading.Thread(target=reconcile, daemon=True)
    try:
        assert wait_for(lambda: len(node.executor.pool.all()) == 4, timeout=120)
        loop.start()
        pods = [node.submit_pod(p) for p in session_pods(8, "tiny", turns=3)]
        assert wait_for(lambda: any(node.get_pod(p.id).status.turns for p in pods), timeout=60)
        victim = node.executor.fleet.replicas(node.executor.pool.all()[0].model_digest)[0]
        record = node.executor.fleet.launch.registry.load(victim.name)
        os.kill(record.pid, signal.SIGKILL)
        killed = time.monotonic()
        # Found dead within 2 health intervals (1 s), then restarted.
        assert wait_for(lambda: not victim.running or victim.starts > 1, timeout=1.0 + 0.5)
        assert wait_for(lambda: victim.starts > 1 and victim.running, timeout=60), "not restarted"
        assert time.monotonic() - killed < 60
        assert wait_for(lambda: all(node.get_pod(p.id).status.phase in TERMINAL for p in pods), timeout=300), \
            "a pod hung after the kill"
        for pod in pods:
            got = node.get_pod(pod.id)
            receipts = node.list_receipts(limit=1000)
            mine = [r for r in receipts if r.statement.predicate.pod.run_id.startswith(pod.id)]
            # Every turn that ran has its receipt, and a failed pod has one for its failure.
            assert len(mine) >= max(1, len(got.status.turns)), (got.status.phase, got.status.reasons)
        # After the restart the replica serves again.
        again = node.submit_pod(make_pod(name="after", model="tiny", turns=["hello again"]))
        assert wait_for(lambda: node.get_pod(again.id).status.phase in TERMINAL, timeout=120)
        assert node.get_pod(again.id).status.phase is PodPhase.succeeded
    finally:
        stop.set()
        node.close()


@pytest.mark.llama
@pytest.mark.slow
def test_an_attached_server_is_placed_on_and_left_running(tmp_path, tiny_model_path, llama_server, caplog):
    from nodeagent.launch.registry import Registry
    from nodeagent.launch.subprocess import SubprocessLauncher, free_port
    from nodeagent.providers.catalog import load_catalog, resolve_spec

    caplog.set_level(logging.INFO, logger="agent_machine.execution")
    store = ModelStore(tmp_path / "state")
    record = store.import_model(tiny_model_path, "tiny")
    launcher = SubprocessLauncher(Registry(tmp_path / "mine"))
    spec = resolve_spec(load_catalog().get("llama-server"), name="mine", mode="subprocess",
                        model_path=record.path, port=free_port(), params={"parallel": 2, "ctx_size": 2048},
                        executable=str(llama_server))
    launcher.up(spec)
    try:
        config = tmp_path / "attach.toml"
        config.write_text(f'[[providers]]\nmodel = "tiny"\nmode = "attach"\nslots = 2\nurls = ["{spec.base_url}"]\n')
        node = Node(load_config(env_for(tmp_path, config)), executor_factory=default_executor, dispatchers=2)
        node.start()
        try:
            pods = [node.submit_pod(p) for p in session_pods(2, "tiny", turns=2)]
            assert wait_for(lambda: all(node.get_pod(p.id).status.phase in TERMINAL for p in pods), timeout=120)
            for pod in pods:
                got = node.get_pod(pod.id)
                assert got.status.phase is PodPhase.succeeded, got.status.reasons
                assert all(t.provider.startswith("tiny-ls-0/slot-") for t in got.status.turns)
            assert {r.mode for r in node.list_providers()} == {"attach"}
            assert {r.pid for r in node.list_providers()} == {None}  # not the node's process
            # Attached without a slot-save directory: its slots cannot save, say so once each and
            # are not asked again (a vLLM engine alike).
            ran = {t.provider for pod in pods for t in node.get_pod(pod.id).status.turns}
            said = [r.getMessage().split()[1] for r in caplog.records if "keeps no saved contexts" in r.getMessage()]
            assert {m.name for m in node.executor.pool.all() if not m.saves_state} == ran
            assert sorted(said) == sorted(ran)
        finally:
            node.close()
        assert launcher.state("mine") == "running"  # attached: not the node's to stop
    finally:
        launcher.down("mine", missing_ok=True)


@pytest.mark.llama
def test_a_bad_config_on_sighup_leaves_the_running_fleet_untouched(tmp_path, tiny_model_path, llama_server):
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    config = fleet_config(tmp_path, "tiny", replicas=1, slots=2)
    node = Node(load_config(env_for(tmp_path, config)), executor_factory=default_executor)
    node.start()
    try:
        assert wait_for(lambda: len(node.executor.pool.all()) == 2, timeout=120)
        before = node.fleet_view()
        config.write_text('[[providers]]\nmodel = "tiny"\nkind = "ollama"\n')
        os.environ["AGENT_MACHINE_CONFIG"] = str(config)
        try:
            with pytest.raises(FleetError, match=r"providers\[0\]\.kind: 'ollama'"):
                node.reload()
        finally:
            del os.environ["AGENT_MACHINE_CONFIG"]
        assert node.fleet_view() == before
        assert len(node.executor.pool.all()) == 2 and node.config.providers[0].kind == "llama_server"
    finally:
        node.close()


def test_a_load_that_leaves_no_running_provider_is_a_clear_error():
    """A declared fleet's loader hands the residency manager a handle and adds its slots to
    the pool itself; when none is running after it returns, the load says so (the handle
    is not a provider to place turns on)."""
    handle = FleetHandle("tiny-ls", fleet=None, digest=RECORD.digest)
    pool = ProviderPool(loader=lambda record, **options: handle)
    with pytest.raises(ProviderUnavailable, match="loading tiny left no running provider"):
        pool.load(RECORD)
    assert pool.all() == []


def test_serve_refuses_a_bad_declaration_at_start_naming_the_field(tmp_path, tiny_model_path):
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    config = tmp_path / "bad.toml"
    config.write_text('[[providers]]\nmodel = "tiny"\nkind = "llama_cpp_python"\nslots = 3\n')
    node = Node(load_config(env_for(tmp_path, config)), executor_factory=default_executor)
    with pytest.raises(FleetError, match=r"providers\[0\]\.slots: the embedded worker has one context"):
        node.start()
    node.close()


@pytest.mark.llama
@pytest.mark.podman
@pytest.mark.slow
def test_one_model_over_a_subprocess_a_podman_container_and_an_attached_server(tmp_path, smollm2_path,
                                                                              llama_server):
    """examples/fleet.toml's sessions over three replicas in three modes: the project's
    FROM-scratch llama-server image in Podman, a subprocess, and a server the node attaches to."""
    from nodeagent.launch.podman import PodmanError, PodmanHostConfig, build_local_image, podman_version
    from nodeagent.launch.registry import Registry
    from nodeagent.launch.subprocess import SubprocessLauncher, free_port
    from nodeagent.providers.catalog import load_catalog, resolve_spec

    host = PodmanHostConfig.detect()
    try:
        podman_version(host)
    except PodmanError as exc:
        pytest.skip(f"podman: {exc}")
    image = "localhost/agent-machine-test/llama-server:fleet"
    build_local_image(llama_server, image, host)
    store = ModelStore(tmp_path / "state")
    record = store.import_model(smollm2_path, "smollm2")
    outside = SubprocessLauncher(Registry(tmp_path / "outside"))
    spec = resolve_spec(load_catalog().get("llama-server"), name="outside", mode="subprocess",
                        model_path=record.path, port=free_port(), params={"parallel": 2, "ctx_size": 2048},
                        executable=str(llama_server), extra_args=["--threads", "1"],
                        slot_save_dir=tmp_path / "outside-slots")
    outside.up(spec)
    config = tmp_path / "mixed.toml"
    config.write_text(
        '[reconcile]\ninterval_s = 0.5\n\n'
        '[[providers]]\nmodel = "smollm2"\nslots = 2\nctx_per_slot = 1024\nthreads = 1\n\n'
        f'[[providers]]\nmodel = "smollm2"\nmode = "podman"\nimage = "{image}"\nslots = 2\nctx_per_slot = 1024\n'
        'threads = 1\n\n'
        f'[[providers]]\nmodel = "smollm2"\nmode = "attach"\nslots = 2\nurls = ["{spec.base_url}"]\n'
        f'slot_save_dir = "{tmp_path / "outside-slots"}"\n')
    node = Node(load_config(env_for(tmp_path, config)), executor_factory=default_executor, dispatchers=8)
    node.start()
    try:
        pods = [node.submit_pod(p) for p in session_pods(8, "smollm2")]
        assert wait_for(lambda: all(node.get_pod(p.id).status.phase in TERMINAL for p in pods), timeout=600)
        modes = {row.name: row.mode for row in node.list_providers()}
        assert set(modes.values()) == {"subprocess", "podman", "attach"}, modes
        used = set()
        for pod in pods:
            got = node.get_pod(pod.id)
            assert got.status.phase is PodPhase.succeeded, got.status.reasons
            for turn, decision in zip(got.status.turns[1:], node.pod_decisions(pod.id)[1:]):
                chosen = next(c for c in decision.candidates if c.provider == decision.chosen)
                assert chosen.cache_source in ("T0", "T1", "T2") and turn.cached_tokens > 0, explain(decision)
            used |= {modes[t.provider] for t in got.status.turns}
        assert used == {"subprocess", "podman", "attach"}
    finally:
        node.close()
        outside.down("outside", missing_ok=True)
        subprocess.run([host.podman, "rmi", "-f", image], capture_output=True, timeout=120)
    leftover = subprocess.run([host.podman, "ps", "-a", "--filter", "name=smollm2-ls-podman", "--format",
                               "{{.Names}}"], capture_output=True, text=True, timeout=60)
    assert leftover.stdout.strip() == ""  # the node's container is gone with the node

"""Residency with real llama.cpp workers: keep-alive, eviction by expected cost, pinning, caps, refusals."""

from __future__ import annotations

import threading

import psutil
import pytest

from nodeagent.contracts.machine import ComputeDevice
from nodeagent.models.gguf_meta import read_gguf
from nodeagent.models.residency import (
    OverCommit, PoolBudget, ResidencyError, ResidencyManager, LoadRequest, budgets_from_devices,
    page_cache_fraction, parse_keep_alive, recorded_residency,
)
from nodeagent.models.testmodel import create_test_model
from nodeagent.providers.llama_cpp_python import residency_loader

pytestmark = pytest.mark.llama
MiB = 1 << 20
N_CTX = 256


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three distinct small models (different seeds, so different digests)."""
    import hashlib

    out = []
    directory = tmp_path_factory.mktemp("residency-models")
    for seed, name in ((1, "a"), (2, "b"), (3, "c")):
        path = create_test_model(directory / f"{name}.gguf", "tiny", seed=seed, n_layer=2, n_vocab=2048)
        digest = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
        out.append(LoadRequest(digest=digest, name=name, path=str(path), meta=read_gguf(path), n_ctx=N_CTX))
    return out


def _manager(models, clock, *, room_for: float, max_loaded: int = 3, conn=None) -> ResidencyManager:
    probe = ResidencyManager([PoolBudget("system", ("cpu",), 1 << 40, 0)], residency_loader(n_threads=1))
    one = probe.fit_for(models[0]).total_bytes
    budget = PoolBudget("system", ("cpu",), int(one * room_for), 0)
    return ResidencyManager([budget], residency_loader(n_threads=1), clock=clock, max_loaded=max_loaded,
                            default_keep_alive_s=300, conn=conn)


@pytest.fixture
def clock():
    return Clock()


def _alive(resident) -> bool:
    return psutil.pid_exists(resident.handle.pid) if resident.handle.pid else False


def test_load_then_unload_frees_the_worker_memory(models, clock):
    manager = _manager(models, clock, room_for=2.5)
    try:
        resident = manager.load(models[0])
        pid = resident.handle.pid
        rss = psutil.Process(pid).memory_info().rss
        assert rss > models[0].meta.weights_bytes  # the model really is in that process
        assert manager.unload(models[0].digest)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert manager.snapshot() == []
    finally:
        for digest in list(manager.resident):
            manager.unload(digest, force=True)


def test_a_model_being_loaded_counts_as_loaded_so_its_providers_are_kept(models, clock):
    """A declared fleet puts its slots in the provider pool while its loader runs; the
    reconcile pass drops providers of models not loaded, so a load in progress is listed."""
    entered, release = threading.Event(), threading.Event()
    real = residency_loader(n_threads=1)

    def slow_loader(request):
        entered.set()
        assert release.wait(30)
        return real(request)

    manager = ResidencyManager([PoolBudget("system", ("cpu",), 1 << 40, 0)], slow_loader, clock=clock)
    loading = threading.Thread(target=lambda: manager.load(models[0]))
    loading.start()
    try:
        assert entered.wait(30)
        assert manager.loaded_digests() == {models[0].digest}  # without waiting for the load's lock
    finally:
        release.set()
        loading.join(60)
    assert manager.loaded_digests() == {models[0].digest} and len(manager.snapshot()) == 1
    manager.unload(models[0].digest)

    def failing_loader(request):
        raise RuntimeError("no such engine")

    manager.loader = failing_loader
    with pytest.raises(RuntimeError):
        manager.load(models[1])
    assert manager.loaded_digests() == set()


def test_keep_alive_timer_starts_when_the_last_request_ends(models, clock):
    manager = _manager(models, clock, room_for=2.5)
    try:
        resident = manager.load(models[0], keep_alive_s=60)
        manager.begin(models[0].digest)
        manager.begin(models[0].digest)
        clock.advance(1000)
        assert manager.tick() == []  # in use: never expires
        manager.end(models[0].digest)
        clock.advance(1000)
        assert manager.tick() == []  # still one request running
        manager.end(models[0].digest)
        clock.advance(59)
        assert manager.tick() == []
        view = manager.snapshot()[0]
        assert view.state == "hot" and view.until is not None and view.keep_alive_s == 60
        clock.advance(2)
        assert manager.tick() == [models[0].digest]
        assert not _alive(resident)
    finally:
        for digest in list(manager.resident):
            manager.unload(digest, force=True)


def test_keep_alive_zero_unloads_when_idle_and_minus_one_never(models, clock):
    manager = _manager(models, clock, room_for=2.5)
    try:
        manager.load(models[0], keep_alive_s=-1)
        manager.load(models[1])
        with manager.use(models[1].digest, keep_alive_s=0):
            assert models[1].digest in manager.resident
        assert models[1].digest not in manager.resident  # 0: gone as soon as idle
        clock.advance(10 ** 7)
        assert manager.tick() == []
        assert manager.snapshot()[0].keep_alive_s == -1 and manager.snapshot()[0].until is None
    finally:
        for digest in list(manager.resident):
            manager.unload(digest, force=True)


def test_eviction_picks_the_lowest_expected_cost_never_pinned_or_busy(models, clock):
    a, b, c = models
    manager = _manager(models, clock, room_for=2.5)  # room for two
    try:
        manager.load(a)
        manager.load(b)
        for _ in range(5):  # a is used often, b once
            with manager.use(a.digest):
                clock.advance(1)
        with manager.use(b.digest):
            clock.advance(1)
        assert manager.expected_cost(manager.resident[b.digest]) < manager.expected_cost(manager.resident[a.digest])
        plan = manager.plan(c)
        assert plan.evict == [b.digest]
        manager.load(c)
        assert set(manager.resident) == {a.digest, c.digest}

        # Pin a, keep c busy: nothing may go, so b is refused with the numbers.
        manager.pin(a.digest)
        manager.begin(c.digest)
        with pytest.raises(OverCommit) as refused:
            manager.load(b)
        message = str(refused.value)
        assert "bytes missing" in message and "a (pinned)" in message and "c (1 request(s) running)" in message
        assert refused.value.missing["system"] > 0 and refused.value.evictable == []
        assert set(manager.resident) == {a.digest, c.digest}  # the refusal changed nothing
        manager.end(c.digest)
        manager.load(b)  # c is idle now and unpinned: it makes room
        assert set(manager.resident) == {a.digest, b.digest}
    finally:
        for digest in list(manager.resident):
            manager.unload(digest, force=True)


def test_a_model_larger_than_the_budget_is_refused_with_missing_bytes(models, clock):
    manager = _manager(models, clock, room_for=0.5)
    with pytest.raises(OverCommit, match=r"bytes missing.*Could evict: nothing"):
        manager.load(models[0])
    assert manager.resident == {}


def test_cap_on_loaded_models_evicts_even_with_room(models, clock):
    manager = _manager(models, clock, room_for=10, max_loaded=2)
    try:
        manager.load(models[0])
        clock.advance(5)
        manager.load(models[1])
        with manager.use(models[1].digest):
            pass
        manager.load(models[2])
        assert set(manager.resident) == {models[1].digest, models[2].digest}
    finally:
        for digest in list(manager.resident):
            manager.unload(digest, force=True)


def test_unload_refused_while_in_use(models, clock):
    manager = _manager(models, clock, room_for=2.5)
    try:
        manager.load(models[0])
        manager.begin(models[0].digest)
        with pytest.raises(ResidencyError, match="request"):
            manager.unload(models[0].digest)
        manager.end(models[0].digest)
        assert manager.unload(models[0].digest)
    finally:
        for digest in list(manager.resident):
            manager.unload(digest, force=True)


def test_recorded_state_is_readable_by_another_connection(models, clock, tmp_path):
    from nodeagent import store

    conn = store.connect(tmp_path / "state.db")
    manager = _manager(models, clock, room_for=2.5, conn=conn)
    try:
        manager.load(models[0], pin=True)
        rows = recorded_residency(store.connect(tmp_path / "state.db"))
        assert [(r.digest, r.state, r.pinned, r.processor) for r in rows] == [
            (models[0].digest, "hot", True, "100% CPU")]
        manager.unload(models[0].digest)
        assert recorded_residency(store.connect(tmp_path / "state.db")) == []
    finally:
        for digest in list(manager.resident):
            manager.unload(digest, force=True)


def test_unified_memory_devices_share_one_pool():
    devices = [
        ComputeDevice(id="cpu", kind="cpu", memory_kind="unified", memory_total_bytes=16 << 30),
        ComputeDevice(id="apple:gpu", kind="apple", memory_kind="unified", memory_total_bytes=16 << 30),
        ComputeDevice(id="nvidia:GPU-1", kind="nvidia", memory_kind="dedicated", memory_total_bytes=24 << 30),
    ]
    pools = {p.pool: p for p in budgets_from_devices(devices, reserve_fraction=0.25)}
    assert set(pools) == {"system", "nvidia:GPU-1"}
    assert pools["system"].devices == ("cpu", "apple:gpu") and pools["system"].total_bytes == 16 << 30
    assert pools["system"].budget_bytes == 12 << 30


def test_unified_gpu_layers_are_charged_to_the_system_pool(models):
    budgets = budgets_from_devices([
        ComputeDevice(id="cpu", kind="cpu", memory_kind="unified", memory_total_bytes=1 << 30),
        ComputeDevice(id="apple:gpu", kind="apple", memory_kind="unified", memory_total_bytes=1 << 30),
    ], reserve_fraction=0)
    manager = ResidencyManager(budgets, residency_loader())
    from dataclasses import replace

    plan = manager.plan(replace(models[0], n_gpu_layers=99, gpu_device="apple:gpu"))
    assert set(plan.pool_bytes) == {"system"} and plan.pool_bytes["system"] == plan.fit.total_bytes


def test_page_cache_fraction_sees_a_read_file(models):
    with open(models[0].path, "rb") as handle:
        handle.read()
    fraction = page_cache_fraction(models[0].path)
    assert fraction is not None and fraction > 0.9


def test_parse_keep_alive():
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("-1") == -1 and parse_keep_alive("0") == 0
    with pytest.raises(ValueError, match="not a duration"):
        parse_keep_alive("soon")

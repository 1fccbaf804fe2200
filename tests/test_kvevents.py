"""KV events in vLLM's format: the ledger, the wire, the ZMQ protocol, and a real two-turn session."""

from __future__ import annotations

import socket
import time

import msgpack
import pytest

from nodeagent.kvcache.blocks import Namespace, block_keys
from nodeagent.kvevents import (
    AllBlocksCleared,
    BlockLedger,
    BlockRemoved,
    BlockStored,
    DecodeError,
    EventBatch,
    Subscriber,
    ZmqPublisher,
    decode_batch,
    encode_batch,
    topic_for,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


K = [bytes([i]) * 32 for i in range(8)]


def test_two_holders_of_one_prefix_store_it_once_and_remove_it_with_the_last():
    ledger = BlockLedger(block_size=2)
    first = ledger.hold("m", "GPU", "slot-0", K[:3], list(range(6)))
    assert first == [BlockStored(tuple(K[:3]), None, (0, 1, 2, 3, 4, 5), 2, "GPU")]
    # Another slot takes the same two first blocks and one of its own: only its own is new.
    second = ledger.hold("m", "GPU", "slot-1", [K[0], K[1], K[5]], [0, 1, 2, 3, 9, 9])
    assert second == [BlockStored((K[5],), K[1], (9, 9), 2, "GPU")]
    assert ledger.release("m", "GPU", "slot-0") == [BlockRemoved((K[2],), "GPU")]
    assert ledger.release("m", "GPU", "slot-1") == [BlockRemoved((K[0], K[1], K[5]), "GPU")]


def test_a_context_that_grows_stores_only_its_new_tail_chained_to_its_last_block():
    ledger = BlockLedger(block_size=2)
    ledger.hold("m", "GPU", "p", K[:2], [1, 2, 3, 4])
    grown = ledger.hold("m", "GPU", "p", K[:4], [1, 2, 3, 4, 5, 6, 7, 8])
    assert grown == [BlockStored((K[2], K[3]), K[1], (5, 6, 7, 8), 2, "GPU")]


def test_media_are_counted_apart():
    ledger = BlockLedger(block_size=2)
    ledger.hold("m", "GPU", "p", K[:1], [1, 2])
    assert ledger.hold("m", "CPU", "entry", K[:1], [1, 2]) == [BlockStored((K[0],), None, (1, 2), 2, "CPU")]


def test_batches_encode_as_vllm_tagged_arrays_and_decode_back():
    batch = EventBatch(12.5, (BlockStored((K[0], K[1]), None, (1, 2, 3, 4), 2, "GPU"),
                              BlockRemoved((K[0],), "CPU"), AllBlocksCleared()))
    raw = msgpack.unpackb(encode_batch(batch), raw=False)
    assert raw == [12.5, [["BlockStored", [K[0], K[1]], None, [1, 2, 3, 4], 2, None, "GPU", None],
                          ["BlockRemoved", [K[0]], "CPU"], ["AllBlocksCleared"]]]
    assert decode_batch(encode_batch(batch)) == batch


@pytest.mark.parametrize("payload,named", [
    (msgpack.packb([1.0, [["BlockStored", [b"x"], None, ["a"], 16]]]), "events[0].token_ids"),
    (msgpack.packb([1.0, [["BlockStored", [b"x"], None, [1], 0]]]), "events[0].block_size"),
    (msgpack.packb([1.0, [["Mystery"]]]), "unknown event type"),
    (msgpack.packb({"ts": 1}), "EventBatch"),
])
def test_a_malformed_batch_is_refused_naming_what_is_wrong(payload, named):
    with pytest.raises(DecodeError, match=named.replace("[", r"\[").replace("]", r"\]")):
        decode_batch(payload)


def test_publisher_sends_topic_seq_payload_and_replays_from_a_sequence_number():
    port, replay = free_port(), free_port()
    publisher = ZmqPublisher(f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay}")
    sub = Subscriber(f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay}", topic="kv@")
    try:
        time.sleep(0.3)  # PUB/SUB: a subscription takes a moment to reach the publisher
        topic = topic_for("10.0.0.7:8377", "smollm2")
        assert topic == "kv@10.0.0.7:8377@smollm2"
        for i in range(3):
            publisher.publish(topic, EventBatch(float(i), (AllBlocksCleared(),)))
        got = sub.poll(3.0, until=lambda r: len(r) == 3)
        assert [(r.topic, r.seq) for r in got] == [(topic, 0), (topic, 1), (topic, 2)]
        replayed = sub.replay(1)
        assert [seq for seq, _ in replayed] == [1, 2] and replayed[0][1].ts == 1.0
    finally:
        sub.close()
        publisher.close()


def test_a_taken_endpoint_is_refused_naming_it():
    from nodeagent.kvevents import KVEventsUnavailable

    port = free_port()
    first = ZmqPublisher(f"tcp://127.0.0.1:{port}")
    try:
        with pytest.raises(KVEventsUnavailable, match=f"tcp://127.0.0.1:{port}"):
            ZmqPublisher(f"tcp://127.0.0.1:{port}")
    finally:
        first.close()


# ---------------------------------------------------------------- a real node
SYSTEM = " ".join(f"Rule {i}: answer tersely and cite the source of every claim." for i in range(10))


@pytest.fixture()
def node_with_events(tmp_path, tiny_model_path):
    from nodeagent.config import load_config
    from nodeagent.models.store import ModelStore
    from nodeagent.node import Node, default_executor

    port, replay = free_port(), free_port()
    env = {"HOME": str(tmp_path), "AGENT_MACHINE_STATE_DIR": str(tmp_path / "state"),
           "AGENT_MACHINE_CONFIG_DIR": str(tmp_path / "cfg"), "AGENT_MACHINE_CACHE_DIR": str(tmp_path / "cache"),
           "AGENT_MACHINE_RUNTIME_DIR": str(tmp_path / "run"), "AGENT_MACHINE_CACHE_RAM_DIR": str(tmp_path / "t1"),
           "AGENT_MACHINE_MODELS_THREADS": "2", "AGENT_MACHINE_CACHE_BLOCK_TOKENS": "16",
           "AGENT_MACHINE_CLUSTER_KV_EVENTS": f"tcp://127.0.0.1:{port}",
           "AGENT_MACHINE_CLUSTER_KV_EVENTS_REPLAY": f"tcp://127.0.0.1:{replay}",
           "AGENT_MACHINE_CLUSTER_KV_EVENTS_POD": "10.1.2.3:8377"}
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    sub = Subscriber(f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay}")
    node = Node(load_config(env), executor_factory=default_executor)
    node.start()
    time.sleep(0.3)
    try:
        yield node, sub
    finally:
        node.close()
        node.executor.kv_events.close()
        sub.close()


def run(node, pod):
    from nodeagent.contracts.pod import TERMINAL_PHASES

    pod_id = node.submit_pod(pod).id
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        got = node.get_pod(pod_id)
        if got.status.phase in TERMINAL_PHASES:
            return got
        time.sleep(0.05)
    raise AssertionError(f"pod {pod_id} did not finish")


def stored(received, medium):
    return [e for r in received for e in r.batch.events if isinstance(e, BlockStored) and e.medium == medium]


def removed(received, medium):
    return [h for r in received for e in r.batch.events if isinstance(e, BlockRemoved) and e.medium == medium
            for h in e.block_hashes]


@pytest.mark.llama
def test_a_two_turn_session_publishes_chained_blocks_then_tier_moves_and_evictions(node_with_events):
    from pod_factory import make_pod

    node, sub = node_with_events
    executor = node.executor
    digest = executor.models.resolve("tiny").digest
    pod = run(node, make_pod(name="s1", system=SYSTEM, turns=["first question", "and a second one"], max_tokens=6))
    assert pod.status.phase.value == "Succeeded"
    executor.kv_events.flush()
    got = sub.poll(3.0, until=lambda r: len(stored(r, "CPU")) >= 2)
    assert {r.topic for r in got} == {"kv@10.1.2.3:8377@tiny:latest"}  # the id /v1/models lists
    assert [r.seq for r in got] == list(range(got[0].seq, got[0].seq + len(got)))  # no batch lost

    # T0: every BlockStored chains to a block announced before it, and its tokens rebuild
    # exactly what the provider holds; the second turn extends the first turn's chain.
    t0 = stored(got, "GPU")
    assert len(t0) >= 2 and t0[0].parent_block_hash is None
    chain: dict[bytes, tuple[int, ...]] = {}  # block hash -> all tokens up to and including it
    for event in t0:
        assert len(event.token_ids) == 16 * len(event.block_hashes) and event.block_size == 16
        prefix = () if event.parent_block_hash is None else chain[event.parent_block_hash]
        for i, block_hash in enumerate(event.block_hashes):
            prefix = prefix + event.token_ids[16 * i:16 * (i + 1)]
            chain[block_hash] = prefix
    managed = executor.pool.all()[0]
    held = managed.held
    last = block_keys(held.tokens, list(held.spans), block_tokens=16)
    assert chain[last[-1]] == tuple(held.tokens[:16 * len(last)])
    assert t0[-1].parent_block_hash in chain  # turn 2's tail hangs off turn 1's blocks
    # The hashes are the node's own keys: a consumer can recompute them from the tokens.
    namespace = Namespace(digest, "private", "acme", "coder")
    assert block_keys(chain[last[-1]], namespace, block_tokens=16) == last

    # T1: the saved states, as medium CPU, chained the same way.
    t1 = stored(got, "CPU")
    assert all(e.parent_block_hash is None or e.parent_block_hash in chain for e in t1)

    # Demoting every saved state to disk: CPU blocks removed, the same blocks stored as STORAGE.
    before = len(got)
    executor.cache.shrink("T1", 0)
    executor.kv_events.flush()
    got = sub.poll(3.0, until=lambda r: len(r) > before and removed(r[before:], "CPU"))
    moved_out = set(removed(got[before:], "CPU"))
    moved_in = {h for e in stored(got[before:], "STORAGE") for h in e.block_hashes}
    assert moved_out and moved_out == moved_in
    # Evicting them from disk: BlockRemoved with medium STORAGE.
    before = len(got)
    for entry in executor.cache.entries():
        executor.cache.evict(entry.id, force=True)
    executor.kv_events.flush()
    got = sub.poll(3.0, until=lambda r: set(removed(r[before:], "STORAGE")) >= moved_in)
    assert set(removed(got[before:], "STORAGE")) == moved_in

    # Another tenant's pod takes the one context: the first session's private T0 blocks are removed.
    before = len(got)
    run(node, make_pod(name="other", tenant="globex", system="Something else entirely.", max_tokens=2))
    executor.kv_events.flush()
    got = sub.poll(3.0, until=lambda r: len(r) > before and removed(r[before:], "GPU"))
    assert set(last) <= set(removed(got[before:], "GPU"))

    # Unloading the model takes its provider out of the pool without a word: the sweep removes its T0 blocks.
    managed = executor.pool.all()[0]
    still = set(block_keys(managed.held.tokens, list(managed.held.spans), block_tokens=16))
    assert still
    before = len(got)
    assert node.unload_model("tiny", force=True)
    got = sub.poll(5.0, until=lambda r: set(removed(r[before:], "GPU")) >= still)
    assert set(removed(got[before:], "GPU")) >= still and executor.pool.all() == []

    # A subscriber that missed everything asks the replay endpoint from sequence 0: it gets the
    # start's AllBlocksCleared (sent before this subscription had reached the publisher) and the rest.
    replayed = dict(sub.replay(0))
    assert replayed[0].events == (AllBlocksCleared(),)
    assert all(replayed[r.seq] == r.batch for r in got)


@pytest.mark.llama
@pytest.mark.slow
def test_llama_server_slots_are_contexts_of_their_own_and_a_shared_prefix_is_announced_once(tmp_path,
                                                                                         tiny_model_path):
    """Two sessions with one public system prompt on two slots of one llama-server replica: each slot's
    T0 changes are its own, the shared public blocks are stored once and stay while either slot holds them."""
    from nodeagent.config import load_config
    from nodeagent.models.store import ModelStore
    from nodeagent.node import Node, default_executor
    from nodeagent.providers.llama_server import locate_llama_server
    from pod_factory import make_pod, wait_for

    binary, how = locate_llama_server(build=True)
    assert binary is not None, how
    port, replay = free_port(), free_port()
    config = tmp_path / "fleet.toml"
    config.write_text('[[providers]]\nmodel = "tiny"\nslots = 2\nctx_per_slot = 1024\nthreads = 1\nload = "eager"\n')
    env = {"HOME": str(tmp_path), "AGENT_MACHINE_STATE_DIR": str(tmp_path / "state"),
           "AGENT_MACHINE_CONFIG_DIR": str(tmp_path / "cfg"), "AGENT_MACHINE_CACHE_DIR": str(tmp_path / "cache"),
           "AGENT_MACHINE_RUNTIME_DIR": str(tmp_path / "run"), "AGENT_MACHINE_CACHE_RAM_DIR": str(tmp_path / "t1"),
           "AGENT_MACHINE_CONFIG": str(config), "AGENT_MACHINE_CACHE_BLOCK_TOKENS": "16",
           "AGENT_MACHINE_CLUSTER_KV_EVENTS": f"tcp://127.0.0.1:{port}",
           "AGENT_MACHINE_CLUSTER_KV_EVENTS_REPLAY": f"tcp://127.0.0.1:{replay}",
           "AGENT_MACHINE_CLUSTER_KV_EVENTS_POD": "10.1.2.4:8377"}
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    sub = Subscriber(f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.1:{replay}")
    node = Node(load_config(env), executor_factory=default_executor, dispatchers=2)
    node.start()
    try:
        assert wait_for(lambda: len(node.executor.pool.all()) == 2, timeout=120)
        assert sorted(m.name for m in node.executor.pool.all()) == ["tiny-ls-0/slot-0", "tiny-ls-0/slot-1"]
        shared = "Public rules for every tenant: " + "cite sources, answer briefly, never guess. " * 6
        pods = [node.submit_pod(make_pod(name=f"p{i}", tenant=f"t{i}", agent="a", system=shared, scope="public",
                                         turns=[f"question number {i}"], max_tokens=4,
                                         provider=f"tiny-ls-0/slot-{i}"))  # one session per slot
                for i in range(2)]
        assert wait_for(lambda: all(node.get_pod(p.id).status.phase.value == "Succeeded" for p in pods), timeout=120)
        slots = {m.name: m for m in node.executor.pool.all()}
        held = {name: block_keys(m.held.tokens, list(m.held.spans), block_tokens=16) for name, m in slots.items()}
        assert all(held.values()), "both slots hold a context"
        node.executor.kv_events.flush()
        got = sub.poll(5.0, until=lambda r: {h for e in stored(r, "GPU") for h in e.block_hashes}
                       >= set(held["tiny-ls-0/slot-0"]) | set(held["tiny-ls-0/slot-1"]))
        announced = [h for e in stored(got, "GPU") for h in e.block_hashes]
        common = set(held["tiny-ls-0/slot-0"]) & set(held["tiny-ls-0/slot-1"])
        assert common, "the public system prompt gives both slots the same first blocks"
        assert all(announced.count(h) == 1 for h in common)  # stored once for the node, not once per slot
        # One slot forgets its context (as after a crash): its own blocks go, the shared ones stay.
        before = len(got)
        slots["tiny-ls-0/slot-0"].forget_context()
        node.executor.kv_events.flush()
        own = set(held["tiny-ls-0/slot-0"]) - common
        got = sub.poll(5.0, until=lambda r: set(removed(r[before:], "GPU")) >= own)
        gone = set(removed(got[before:], "GPU"))
        assert gone == own and not (gone & common)
    finally:
        node.close()
        node.executor.kv_events.close()
        sub.close()


def test_replaying_the_ledgers_events_gives_exactly_what_its_holders_hold():
    """Against a brute-force reference: whatever holders hold, in any order, a subscriber that applies
    the events (stored adds, removed drops) ends with the union of what they hold, and every stored run
    chains to a block it already has."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    chain = [bytes([i]) * 32 for i in range(12)]
    other = [bytes([100 + i]) * 32 for i in range(12)]
    prefixes = st.tuples(st.sampled_from([chain, other]), st.integers(0, 12)).map(lambda t: t[0][:t[1]])
    steps = st.lists(st.tuples(st.sampled_from(["s0", "s1", "e0"]), prefixes), max_size=25)

    @settings(max_examples=200, deadline=None)
    @given(steps)
    def check(script):
        ledger = BlockLedger(block_size=1)
        seen: set[bytes] = set()
        holding: dict[str, list[bytes]] = {}
        for holder, keys in script:
            for event in ledger.hold("m", "GPU", holder, keys, [0] * len(keys)):
                if isinstance(event, BlockStored):
                    assert event.parent_block_hash is None or event.parent_block_hash in seen
                    assert not (set(event.block_hashes) & seen), "stored twice"
                    seen |= set(event.block_hashes)
                else:
                    assert set(event.block_hashes) <= seen, "removed what was never stored"
                    seen -= set(event.block_hashes)
            holding[holder] = keys
            assert seen == {k for keys in holding.values() for k in keys}

    check()

"""vLLM's KV events as the node consumes them: the prefixes an engine holds, for placement.

vLLM publishes ``BlockStored``/``BlockRemoved``/``AllBlocksCleared`` on a ZMQ PUB
socket (wire format in nodeagent/kvevents.py); there is no vLLM here (no GPU), so
the publisher below sends exactly those frames from the documented schema, with
vLLM-style integer block hashes the node never interprets."""

from __future__ import annotations

import json
import time

import pytest
import zmq  # a dev dependency (extra kv-events): missing, these tests fail rather than skip

from nodeagent.config import ProviderDeclaration, load_config
from nodeagent.execution.pool import HeldContext
from nodeagent.fleet import kv_events_endpoint, vllm_kv_events_args
from nodeagent.kvcache.blocks import Namespace
from nodeagent.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, EventBatch, encode_batch
from nodeagent.launch.subprocess import free_port
from nodeagent.models.store import ModelStore
from nodeagent.node import Node, default_executor
from nodeagent.providers.vllm_events import CachedPrefixes, KVEventSubscription

from pod_factory import make_pod, wait_for
from test_execution import env_for, wait_terminal


BS = 4  # vLLM's block size in these tests
PUBLIC = [(0, Namespace("sha256:m", "public"))]
ACME = ["acme", "acme/coder", "public"]


def sent_and_stored(held, hashes, parent, tokens, sent_tokens=None, spans=PUBLIC):
    """The node sent ``sent_tokens`` (default: the stored ones) and the engine stored these blocks."""
    held.apply(batch(stored(hashes, parent, tokens)))
    held.sent(list(sent_tokens if sent_tokens is not None else tokens), spans)


def stored(hashes, parent, tokens, medium="GPU"):
    return BlockStored(tuple(hashes), parent, tuple(tokens), BS, medium)


def batch(*events):
    return EventBatch(time.time(), tuple(events))


# ------------------------------------------------------------------ what the events say the engine holds
def test_a_prompt_matches_the_blocks_stored_along_its_chain_and_never_all_of_it():
    held = CachedPrefixes()
    held.apply(batch(stored([101, 102], None, range(8))))  # tokens 0-7 in two blocks
    held.apply(batch(stored([103], 102, range(8, 12))))  # chained to 102: tokens 8-11
    held.sent(list(range(12)), PUBLIC)
    assert held.cached_tokens(list(range(20)), ACME) == 12
    assert held.cached_tokens(list(range(12)), ACME) == 11  # one token is always evaluated
    assert held.cached_tokens([0, 1, 2, 3, 9, 9, 9, 9], ACME) == 4  # diverges in the second block
    assert held.cached_tokens([5, 1, 2, 3], ACME) == 0
    assert held.cached_tokens(list(range(3)), ACME) == 0  # shorter than a block


def test_a_held_block_counts_only_for_pods_that_may_see_whoever_the_node_sent_it_for():
    """vLLM shares its cache across requests; the node counts a block for a pod only if it
    sent that block under an owner the pod sees, so placement never tells one tenant that
    another's prompt is cached."""
    held = CachedPrefixes()
    acme_private = [(0, Namespace("sha256:m", "public")), (4, Namespace("sha256:m", "tenant", "acme"))]
    sent_and_stored(held, [1, 2, 3], None, range(12), spans=acme_private)
    assert held.cached_tokens(list(range(16)), ACME) == 12
    assert held.cached_tokens(list(range(16)), ["globex", "public"]) == 4  # the public block only
    fresh = CachedPrefixes()
    fresh.apply(batch(stored([1], None, range(4))))  # held, but the node never sent it
    assert fresh.cached_tokens(list(range(8)), ACME) == 0


def test_what_the_node_sent_before_the_first_event_counts_once_the_block_size_is_known():
    held = CachedPrefixes()
    held.sent(list(range(8)), PUBLIC)  # no event yet: the block size is unknown
    held.apply(batch(stored([1, 2], None, range(8))))
    assert held.cached_tokens(list(range(12)), ACME) == 8


def test_removed_blocks_end_the_match_and_all_cleared_forgets_everything():
    held = CachedPrefixes()
    sent_and_stored(held, [1, 2, 3], None, range(12))
    held.apply(batch(BlockRemoved((2,), "CPU")))  # the offloaded copy: the device's stays
    assert held.cached_tokens(list(range(16)), ACME) == 12
    held.apply(batch(BlockRemoved((2,), "GPU")))
    assert held.cached_tokens(list(range(16)), ACME) == 4  # block 3 is still there, but its prefix is not
    held.apply(batch(AllBlocksCleared()))
    assert held.cached_tokens(list(range(16)), ACME) == 0 and held.block_size is None


def test_unchained_offloaded_and_lora_blocks_do_not_count():
    held = CachedPrefixes()
    held.sent(list(range(8)), PUBLIC)
    held.apply(batch(stored([7], 999, range(4, 8))))  # stored before the node subscribed
    held.apply(batch(stored([1], None, range(4), medium="CPU")))  # vLLM's CPU offload: a restore, not T0
    held.apply(batch(BlockStored((5,), None, tuple(range(4)), BS, "GPU", lora_id=3, lora_name="sql")))
    assert held.cached_tokens(list(range(8)), ACME) == 0 and held.unchained == 1
    held.apply(batch(stored([1], None, range(4), medium=None)))  # vLLM before the medium field: the device
    assert held.cached_tokens(list(range(8)), ACME) == 4


def test_two_engine_blocks_with_one_chain_are_held_until_both_go():
    held = CachedPrefixes()
    held.apply(batch(stored([1], None, range(4)), stored([2], None, range(4))))
    held.sent(list(range(4)), PUBLIC)
    held.apply(batch(BlockRemoved((1,), "GPU")))
    assert held.cached_tokens(list(range(8)), ACME) == 4
    held.apply(batch(BlockRemoved((2,), "GPU")))
    assert held.cached_tokens(list(range(8)), ACME) == 0


# ------------------------------------------------------------------ over the socket
@pytest.fixture()
def publisher():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    port = free_port()
    sock.bind(f"tcp://127.0.0.1:{port}")
    state = {"seq": 0}

    def send(*events, skip=0, payload=None):
        state["seq"] += skip
        sock.send_multipart([b"kv@vllm@m", state["seq"].to_bytes(8, "big"), payload or encode_batch(batch(*events))])
        state["seq"] += 1

    send.endpoint = f"tcp://127.0.0.1:{port}"
    yield send
    sock.close(linger=0)
    ctx.term()


def test_the_subscription_follows_the_engine_and_survives_bad_batches_and_gaps(publisher):
    sub = KVEventSubscription(publisher.endpoint, name="vllm-0")
    try:
        # A SUB socket misses what was sent before it joined: publish until it hears.
        sub.sent(list(range(12)), PUBLIC)
        assert wait_for(lambda: publisher(stored([1], None, range(4))) or sub.cached_tokens(list(range(8)), ACME) == 4,
                        timeout=10.0)
        publisher(payload=b"\x93not an event batch")
        publisher(stored([2], 1, range(4, 8)))
        assert wait_for(lambda: sub.cached_tokens(list(range(12)), ACME) == 8, timeout=10.0)
        assert sub.errors == 1
        publisher(stored([3], 2, range(8, 12)), skip=1)  # the batch before it went missing
        assert wait_for(lambda: sub.gaps == 1, timeout=10.0)
        assert sub.cached_tokens(list(range(16)), ACME) == 0, "after a gap nothing is trusted, even the new batch's chain"
    finally:
        sub.close()


# ------------------------------------------------------------------ declarations
def test_replica_i_publishes_on_the_declared_port_plus_i_and_a_launched_vllm_is_told_so():
    assert kv_events_endpoint("tcp://127.0.0.1:5557", 2) == ("127.0.0.1", 5559)
    assert kv_events_endpoint("127.0.0.1:5557", 0) == ("", 0)
    flag, config = vllm_kv_events_args("tcp://0.0.0.0:6000", 1)
    assert flag == "--kv-events-config"
    assert json.loads(config) == {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:6001"}
    # Prompts' tokens travel on it: a loopback declaration binds loopback only.
    assert json.loads(vllm_kv_events_args("tcp://127.0.0.1:6000", 0)[1])["endpoint"] == "tcp://127.0.0.1:6000"
    assert ProviderDeclaration(model="m", kind="vllm", kv_events="tcp://127.0.0.1:5557").kv_events


# ------------------------------------------------------------------ placement sees every prefix the engine holds
class Observed:
    """A `PrefixObserver` over a `CachedPrefixes` the test feeds directly (the whole Protocol)."""

    def __init__(self, prefixes: CachedPrefixes) -> None:
        self.prefixes = prefixes
        self.closed = False

    def cached_tokens(self, prompt, owners):
        return self.prefixes.cached_tokens(prompt, owners)

    def sent(self, tokens, spans):
        self.prefixes.sent(tokens, spans)

    def clear(self):
        self.prefixes.clear()

    def close(self):
        self.closed = True


def test_placement_counts_a_prefix_the_engine_reports_after_the_node_lost_track_of_it(tmp_path, tiny_model_path):
    ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    node = Node(load_config(env_for(tmp_path)), executor_factory=default_executor)
    node.start()
    try:
        pod = make_pod(name="first", turns=["tell me about caches"])
        assert wait_terminal(node, node.submit_pod(pod).id).status.phase.value == "Succeeded"
        [managed] = node.executor.pool.all()
        prompt, spans = managed.expected.tokens, managed.expected.spans
        managed.expected = HeldContext()  # the node's own guess is gone (another prompt was placed since)
        again = make_pod(name="again", turns=["tell me about caches"])
        assert node.executor.score(again).chosen.cached_tokens == 0

        prefixes = CachedPrefixes()
        n = len(prompt) // BS
        prefixes.apply(batch(stored(range(1, n + 1), None, prompt[:n * BS])))
        managed.observed = Observed(prefixes)
        assert node.executor.score(again).chosen.cached_tokens == 0, "held, but never sent by the node"
        managed.observed.sent(prompt, spans)
        decision = node.executor.score(again)
        assert decision.chosen.cache_source == "T0"
        # Its prompt is the first pod's (the first turn's prompt and answer went to the engine):
        # every whole block of it is held, and one token is left to evaluate.
        prompt_tokens = decision.request.prompt_tokens
        assert prompt_tokens - BS < decision.chosen.cached_tokens < prompt_tokens
        node.executor.pool.remove(managed.name)  # a provider leaving the pool stops listening to its engine
        assert managed.observed.closed
    finally:
        node.close()


# ------------------------------------------------------------------ two attached vLLM servers that publish
def test_two_attached_vllm_servers_with_kv_events_a_session_returns_to_the_one_that_still_holds_it(
        tmp_path, tiny_model_path):
    """Session A runs on replica X, then B is pinned to X (the node's own guess about X is
    now B's prompt): A's next pod still goes to X as a T0 hit, because X's KV events say
    it holds A's prefix, and the server really serves it from its cache."""
    from nodeagent.execution.pool import model_name
    from nodeagent.scheduler.placement import common_prefix_tokens

    from fake_vllm import FakeVllm, serve
    from test_fleet import env_for as fleet_env

    record = ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny")
    ctx = zmq.Context()
    base = free_port()
    sockets, states, servers = [], [], []
    try:
        for i in range(2):
            sock = ctx.socket(zmq.PUB)
            sock.bind(f"tcp://127.0.0.1:{base + i}")
            sockets.append(sock)
            states.append(FakeVllm(model=model_name(record), events=sock))
            servers.append(serve(states[-1]))
        urls = ", ".join(f'"http://127.0.0.1:{s.server_address[1]}"' for s in servers)
        config = tmp_path / "vllm.toml"
        config.write_text(f'[[providers]]\nmodel = "tiny"\nkind = "vllm"\nmode = "attach"\nreplicas = 2\n'
                          f'urls = [{urls}]\nkv_events = "tcp://127.0.0.1:{base}"\n')
        node = Node(load_config(fleet_env(tmp_path, config)), executor_factory=default_executor)
        node.start()
        try:
            first = wait_terminal(node, node.submit_pod(make_pod(name="a", turns=["tell me about caches"])).id)
            assert first.status.phase.value == "Succeeded", first.status.reasons
            x = first.status.turns[0].provider
            [held_a] = [m for m in node.executor.pool.all() if m.name == x]
            assert held_a.observed is not None
            prompt_a = held_a.expected.tokens
            owners_a = ["acme", "acme/coder", "public"]
            assert wait_for(lambda: held_a.observed.cached_tokens(prompt_a, owners_a) > 0, timeout=10.0), \
                "X's events never arrived"
            other = wait_terminal(node, node.submit_pod(make_pod(
                name="b", system="You answer in French.", turns=["bonjour"], provider=x)).id)
            assert other.status.phase.value == "Succeeded" and other.status.turns[0].provider == x
            guess = common_prefix_tokens(held_a.expected.tokens, prompt_a)  # the node's own guess: B's prompt
            assert guess < held_a.observed.cached_tokens(prompt_a, owners_a)

            # Another tenant with the very same text learns nothing: acme's blocks are acme's.
            stranger = node.executor.score(make_pod(name="g", tenant="globex", turns=["tell me about caches"]))
            assert all(a.cached_tokens == 0 for a in stranger.assessments)

            again = make_pod(name="a-again", turns=["tell me about caches"])
            decision = node.executor.score(again)
            assert decision.provider == x and decision.chosen.cache_source == "T0"
            assert decision.chosen.cached_tokens > guess
            done = wait_terminal(node, node.submit_pod(again).id)
            assert done.status.phase.value == "Succeeded" and done.status.turns[0].provider == x
            assert done.status.turns[0].cached_tokens > guess  # the server served it from its prefix cache
        finally:
            node.close()
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        for sock in sockets:
            sock.close(linger=0)
        ctx.term()

"""The llama-server provider against a real llama-server (built from the
llama.cpp tree vendored in the llama-cpp-python sdist) on a generated model:
health, tokenize, generation, streaming, OpenAI endpoints, metrics, and slot
tiering (save/restore round trip, restore into another slot, tier moves,
corrupt files → clear error and recompute)."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from nodeagent.launch.registry import Registry
from nodeagent.launch.subprocess import SubprocessLauncher, free_port
from nodeagent.providers.base import GenerationRequest, Provider, StateCorrupt, StateUnsupported
from nodeagent.providers.catalog import load_catalog, resolve_spec
from nodeagent.providers.llama_server import (
    LlamaServerProvider,
    locate_llama_server,
    meta_path,
    move_state,
    read_slot_file_tokens,
    verify_state_file,
)

pytestmark = pytest.mark.slow

PROMPT = "The agent reads the tool schema, calls the search tool, and summarizes what it found for the user."


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    binary, how = locate_llama_server(build=True)
    if binary is None:
        print(f"\nllama-server unavailable: {how}")
        pytest.skip(f"llama-server cannot be built here: {how}")
    return binary


def make_spec(binary: Path, model: Path, tmp: Path, name: str, slot_dir: Path | None = None, **kwargs):
    return resolve_spec(
        load_catalog().get("llama-server"), name=name, mode="subprocess", model_path=model, port=free_port(),
        executable=str(binary), slot_save_dir=slot_dir, params={"ctx_size": 1024, "parallel": 2},
        extra_args=["--threads", "1", "--cache-ram", "0"], start_timeout_s=60, **kwargs,
    )


@pytest.fixture(scope="module")
def server(llama_server_binary, tiny_model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llama-server")
    spec = make_spec(llama_server_binary, tiny_model_path, tmp, "ls-test", slot_dir=tmp / "slots")
    provider = LlamaServerProvider.from_spec(spec, SubprocessLauncher(Registry(tmp / "registry")))
    provider.start()
    yield provider
    provider.stop()
    provider.close()


@pytest.fixture
def tiers(tmp_path):
    t1, t2 = tmp_path / "t1", tmp_path / "t2"
    t1.mkdir()
    t2.mkdir()
    return t1, t2


def greedy(provider, tokens, slot, n=8):
    return provider.generate(GenerationRequest(prompt_tokens=tokens, max_tokens=n, slot=slot))


def prime(provider, tokens, slot):
    """Evaluate the prompt into the slot without generating (the state a saved turn has)."""
    result = provider.generate(GenerationRequest(prompt_tokens=tokens, max_tokens=0, slot=slot))
    assert provider.context_tokens(slot) == tokens
    return result


@pytest.fixture(scope="module")
def control(server):
    """The continuation after a primed prompt, computed without any save/restore."""
    tokens = server.tokenize(PROMPT)
    prime(server, tokens, 0)
    result = greedy(server, tokens, 0)
    assert result.cached_tokens == len(tokens) - 1 and result.evaluated_tokens == 1
    return tokens, result.completion_tokens


def test_is_a_provider(server):
    assert isinstance(server, Provider)
    assert server.health().ok and server.health().detail == "ok"


def test_tokenize_and_detokenize(server):
    with_bos = server.tokenize("hello world")
    without = server.tokenize("hello world", add_bos=False)
    assert with_bos[1:] == without and len(with_bos) == len(without) + 1
    assert server.detokenize(without).strip() == "hello world"


def test_generate_is_greedy_and_reuses_the_prefix(server):
    tokens = server.tokenize("a first prompt about caching")
    first = greedy(server, tokens, 1)
    assert len(first.completion_tokens) == 8 and first.finish_reason == "length"
    assert first.prompt_tokens == len(tokens) and first.ttft_s <= first.total_s
    assert server.context_tokens(1) == tokens + first.completion_tokens[:-1]
    prime(server, tokens, 1)
    again = greedy(server, tokens, 1)
    assert again.cached_tokens == len(tokens) - 1 and again.evaluated_tokens == 1
    text_request = server.generate(GenerationRequest(prompt_text="a first prompt about caching", max_tokens=8, slot=1))
    assert text_request.prompt_tokens == len(tokens)


def test_stream_yields_the_same_text(server, control):
    tokens, expected = control
    prime(server, tokens, 1)
    pieces = list(server.stream(GenerationRequest(prompt_tokens=tokens, max_tokens=8, slot=1)))
    assert server.last_stream.completion_tokens == expected
    assert "".join(pieces) == server.last_stream.text == server.detokenize(expected)


def test_openai_endpoints(server):
    from openai import OpenAI

    chat = server.chat_completions({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                                    "temperature": 0})
    assert chat["object"] == "chat.completion" and chat["usage"]["completion_tokens"] == 4
    chunks = list(server.completions({"prompt": "hi", "max_tokens": 3, "temperature": 0, "stream": True}))
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    plain = server.completions({"prompt": "hi", "max_tokens": 3, "temperature": 0})
    assert plain["choices"][0]["text"] == "".join(c["choices"][0]["text"] for c in chunks)
    # an independent client speaks to the same endpoints
    client = OpenAI(base_url=server.base_url + "/v1", api_key="unused")
    answer = client.chat.completions.create(model="tiny.gguf", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=4, temperature=0)
    assert answer.choices[0].message.content == chat["choices"][0]["message"]["content"]
    assert server.models()["data"][0]["id"]


def test_save_restore_round_trip_continues_identically(server, control, tiers):
    tokens, expected = control
    t1, _ = tiers
    prime(server, tokens, 1)
    saved = server.save_state(1, t1 / "pod-a.bin")
    assert saved.n_tokens == len(tokens) and saved.size_bytes == (t1 / "pod-a.bin").stat().st_size
    assert read_slot_file_tokens(t1 / "pod-a.bin") == tokens
    assert verify_state_file(t1 / "pod-a.bin")["n_tokens"] == len(tokens)
    assert not [p for p in server.slot_dir.iterdir()], "staging files must not be left in the slot dir"

    server.erase(1)
    assert server.context_tokens(1) == []
    cold = greedy(server, tokens, 1)
    assert cold.cached_tokens == 0  # after an erase nothing is reused...

    server.erase(1)
    assert server.restore_state(1, t1 / "pod-a.bin").n_tokens == len(tokens)
    assert server.context_tokens(1) == tokens
    warm = greedy(server, tokens, 1)
    assert warm.cached_tokens == len(tokens) - 1  # ...after a restore the whole prefix is
    assert warm.completion_tokens == expected  # and the continuation is the no-round-trip one


def test_restore_into_another_slot(server, control, tiers):
    tokens, expected = control
    t1, _ = tiers
    prime(server, tokens, 0)
    server.save_state(0, t1 / "from-slot-0.bin")
    server.erase(1)
    assert server.restore_state(1, t1 / "from-slot-0.bin").n_tokens == len(tokens)
    assert greedy(server, tokens, 1).completion_tokens == expected


def test_a_restore_behind_a_sibling_slots_prefill_reports_the_servers_own_time(
        llama_server_binary, smollm2_path, tmp_path):
    """llama-server runs a slot restore between batches: behind another slot's prefill the
    request waits seconds for a ~1 ms restore. The wait is queue; the rate placement
    prices restores with is the server's own time (a wall-clock rate made restores look
    slower than recomputing the prompt, and placement recomputed prompts it held)."""
    spec = resolve_spec(
        load_catalog().get("llama-server"), name="ls-busy", mode="subprocess", model_path=smollm2_path,
        port=free_port(), executable=str(llama_server_binary), slot_save_dir=tmp_path / "slots",
        params={"ctx_size": 4096, "parallel": 2}, extra_args=["--threads", "1"], start_timeout_s=60)
    server = LlamaServerProvider.from_spec(spec, SubprocessLauncher(Registry(tmp_path / "registry")))
    server.start()
    try:
        tokens = server.tokenize("You are a helpful assistant. " * 20)
        greedy(server, tokens, 1)
        saved = server.save_state(1, tmp_path / "saved.bin")
        # ~700 tokens: over a second of prefill on one thread (GET /slots would itself wait
        # for the batch, so the sibling is given time to start instead of being polled).
        long_prompt = server.tokenize("The quick brown fox jumps over the lazy dog. " * 70)
        sibling = threading.Thread(target=lambda: greedy(server, long_prompt, 0))
        sibling.start()
        time.sleep(0.3)
        began = time.perf_counter()
        restored = server.restore_state(1, tmp_path / "saved.bin")
        waited = time.perf_counter() - began
        sibling.join()
        assert (restored.n_tokens, restored.size_bytes) == (saved.n_tokens, saved.size_bytes)
        assert waited > 0.1 and restored.restore_s < waited / 10, (restored, waited)
        assert server.rates().restore_bytes_per_s == pytest.approx(restored.size_bytes / restored.restore_s)
    finally:
        server.stop()
        server.close()


def test_tier_move_keeps_state_and_digest(server, control, tiers):
    tokens, expected = control
    t1, t2 = tiers
    prime(server, tokens, 1)
    server.save_state(1, t1 / "s.bin")
    moved = move_state(t1 / "s.bin", t2 / "s.bin")
    assert not (t1 / "s.bin").exists() and not meta_path(t1 / "s.bin").exists()
    assert verify_state_file(moved) is not None
    server.erase(1)
    preparation = server.prepare_slot(1, tokens, moved)
    assert (preparation.source, preparation.restored_tokens, preparation.recomputed_tokens) == ("restored", len(tokens), 0)
    assert greedy(server, tokens, 1).completion_tokens == expected


def test_corrupt_state_is_a_clear_error_then_recomputed(server, control, tiers):
    tokens, expected = control
    t1, _ = tiers
    prime(server, tokens, 1)
    path = t1 / "flipped.bin"
    server.save_state(1, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the KV data: llama.cpp itself would not notice
    path.write_bytes(bytes(data))
    with pytest.raises(StateCorrupt, match="sha256 .* does not match"):
        server.restore_state(1, path)
    assert server.context_tokens(1) == []

    preparation = server.prepare_slot(1, tokens, path)
    assert preparation.source == "recomputed" and "sha256" in preparation.reason
    assert preparation.recomputed_tokens == len(tokens)
    assert greedy(server, tokens, 1).completion_tokens == expected


def test_truncated_state_is_caught_before_the_server_sees_it(server, control, tiers):
    """llama-server aborts on some truncated files (GGML_ASSERT in
    state_seq_load_file, observed with this build), so the size recorded at
    save time is checked first and the server stays up."""
    tokens, expected = control
    t1, _ = tiers
    prime(server, tokens, 1)
    path = t1 / "short.bin"
    server.save_state(1, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(StateCorrupt, match="truncated or replaced"):
        server.restore_state(1, path)
    preparation = server.prepare_slot(1, tokens, path)
    assert preparation.source == "recomputed" and "truncated" in preparation.reason
    assert server.health().ok
    assert greedy(server, tokens, 1).completion_tokens == expected


def test_unverified_states_are_refused_unless_asked(server, control, tiers):
    tokens, _ = control
    t1, _ = tiers
    prime(server, tokens, 1)
    path = t1 / "nometa.bin"
    server.save_state(1, path)
    meta_path(path).unlink()
    with pytest.raises(StateCorrupt, match="no .meta.json sidecar"):
        server.restore_state(1, path)
    assert server.restore_state(1, path, verify=False).n_tokens == len(tokens)


def test_the_servers_own_refusal_is_state_corrupt(server, control, tiers):
    tokens, _ = control
    t1, _ = tiers
    prime(server, tokens, 1)
    path = t1 / "lying-header.bin"
    server.save_state(1, path)
    data = bytearray(path.read_bytes())
    data[8:12] = (10**6).to_bytes(4, "little")  # header claims a million tokens
    path.write_bytes(bytes(data))
    meta_path(path).unlink()
    with pytest.raises(StateCorrupt):  # our header read already refuses it...
        read_slot_file_tokens(path)
    staged = server.slot_dir / "lying.bin"  # ...so hand it to llama-server directly
    shutil.copyfile(path, staged)
    try:
        with pytest.raises(StateCorrupt, match="refused: Unable to restore slot"):
            server._slot_action(1, "restore", "lying.bin")
    finally:
        staged.unlink()
    assert server.health().ok


def test_a_state_that_is_not_a_prefix_is_not_restored(server, control, tiers):
    tokens, _ = control
    t1, _ = tiers
    other = server.tokenize("a completely different conversation")
    prime(server, other, 1)
    server.save_state(1, t1 / "other.bin")
    preparation = server.prepare_slot(1, tokens, t1 / "other.bin")
    assert preparation.source == "recomputed" and "not a prefix" in preparation.reason
    assert server.context_tokens(1) == tokens


def test_garbage_is_not_a_state_file(tmp_path):
    path = tmp_path / "junk.bin"
    path.write_bytes(b"definitely not a llama.cpp state file")
    with pytest.raises(StateCorrupt, match="not a llama.cpp slot state"):
        read_slot_file_tokens(path)
    with pytest.raises(StateCorrupt, match="no such state file"):
        read_slot_file_tokens(tmp_path / "missing.bin")


def test_metrics_and_rates(server, control):
    tokens, _ = control
    before = server.metrics()
    prime(server, tokens, 0)
    greedy(server, tokens, 0)
    after = server.metrics()
    assert after["llamacpp:prompt_tokens_cached_total"] - before["llamacpp:prompt_tokens_cached_total"] >= len(tokens) - 1
    assert "llamacpp:requests_processing" in after
    rates = server.rates()
    assert rates.prefill_tokens_per_s and rates.decode_tokens_per_s
    assert rates.save_bytes_per_s and rates.restore_bytes_per_s


def test_slot_actions_need_slot_save_path(llama_server_binary, tiny_model_path, tmp_path):
    spec = make_spec(llama_server_binary, tiny_model_path, tmp_path, "ls-noslots")
    launcher = SubprocessLauncher(Registry(tmp_path / "registry"))
    launcher.up(spec)
    try:
        detached = LlamaServerProvider(spec.name, spec.base_url)
        with pytest.raises(StateUnsupported, match="no slot-save directory"):
            detached.save_state(0, tmp_path / "x.bin")
        wrong = LlamaServerProvider(spec.name, spec.base_url, slot_save_dir=tmp_path)
        with pytest.raises(StateUnsupported, match="--slot-save-path"):
            wrong.save_state(0, tmp_path / "x.bin")
    finally:
        launcher.down(spec.name)


def test_health_reports_loading_while_the_model_is_read(llama_server_binary, tmp_path):
    """llama-server answers 503 until its model is loaded. A FIFO as the model
    file holds it in that state for as long as the test needs."""
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    port = free_port()
    log = open(tmp_path / "log", "wb")
    process = subprocess.Popen([str(llama_server_binary), "-m", str(fifo), "--port", str(port),
                                "--threads", "1"], stdout=log, stderr=subprocess.STDOUT)
    try:
        provider = LlamaServerProvider("loading", f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 30
        health = provider.health()
        while health.detail != "loading model" and time.monotonic() < deadline:
            time.sleep(0.05)
            health = provider.health()
        assert not health.ok and health.detail == "loading model"
    finally:
        # let the blocked open() return (EOF), then stop the server
        unblock = threading.Thread(target=lambda: open(fifo, "wb").close(), daemon=True)
        unblock.start()
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        log.close()
    gone = LlamaServerProvider("gone", f"http://127.0.0.1:{port}").health()
    assert not gone.ok and gone.detail == "connection refused"

"""The embedded llama-cpp-python provider against real llama.cpp and the tiny model."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from nodeagent.providers.base import GenerationRequest, Provider, ProviderCrashed, ProviderError, StateCorrupt
from nodeagent.providers.llama_cpp_python import LlamaCppPythonProvider, LlamaOptions

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def provider(tiny_model_path):
    p = LlamaCppPythonProvider("test", tiny_model_path, model_digest="sha256:" + "ab" * 32,
                               options=LlamaOptions(n_ctx=1024, n_threads=1))
    p.start()
    yield p
    p.stop()


def _prompt(n: int, start: int = 300) -> list[int]:
    return [1] + [start + (i * 7) % 5000 for i in range(n - 1)]


def test_it_is_a_provider_and_healthy(provider):
    assert isinstance(provider, Provider)
    health = provider.health()
    assert health.ok and health.detail == "ok"
    assert provider.load_info["n_ctx"] == 1024


def test_tokenize_round_trip(provider):
    tokens = provider.tokenize("Hello, world")
    assert tokens[0] == 1 and len(tokens) > 3
    assert provider.detokenize(tokens) == "Hello, world"  # SPM: the space after BOS is dropped


def test_prefix_reuse_is_counted_from_what_was_decoded(provider):
    prompt = _prompt(100)
    # llama.cpp reports max(1, n) for its counters: warm them past 1 before taking differences.
    provider.generate(GenerationRequest(prompt_tokens=_prompt(10, 3000), max_tokens=3))
    before = provider.stats()["perf"]
    first = provider.generate(GenerationRequest(prompt_tokens=prompt, max_tokens=4))
    second = provider.generate(GenerationRequest(prompt_tokens=prompt + [777, 778, 779], max_tokens=4))
    after = provider.stats()["perf"]
    assert first.prompt_tokens == 100
    # The context held prompt + 3 of the 4 generated tokens; only the common prefix is reused.
    assert second.cached_tokens == 100 and second.evaluated_tokens == 3
    # llama.cpp's own counters agree: every token we claim was evaluated, was, and no more.
    # (Each generated token is decoded too, so the reply is in the context for the next turn.)
    decoded = (after["n_p_eval"] + after["n_eval"]) - (before["n_p_eval"] + before["n_eval"])
    generated_evals = len(first.completion_tokens) + len(second.completion_tokens)
    assert decoded == first.evaluated_tokens + second.evaluated_tokens + generated_evals
    # The same prompt again: all but the last token are reused (it is re-run for fresh logits).
    third = provider.generate(GenerationRequest(prompt_tokens=prompt, max_tokens=2))
    assert (third.cached_tokens, third.evaluated_tokens) == (99, 1)
    assert third.completion_tokens == first.completion_tokens[:2]
    assert provider.context_tokens()[:100] == prompt


def test_greedy_is_deterministic_and_max_tokens_is_honoured(provider):
    request = GenerationRequest(prompt_text="the quick brown fox", max_tokens=12)
    a = provider.generate(request)
    provider.generate(GenerationRequest(prompt_tokens=_prompt(20, 900), max_tokens=1))  # disturb the context
    b = provider.generate(request)
    assert a.completion_tokens == b.completion_tokens and len(a.completion_tokens) == 12
    assert a.finish_reason == "length" and a.ttft_s <= a.total_s


def test_stop_string_cuts_the_text(provider):
    full = provider.generate(GenerationRequest(prompt_text="abc", max_tokens=16))
    stop = full.text[5:8]
    cut = provider.generate(GenerationRequest(prompt_text="abc", max_tokens=16, stop=[stop]))
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.find(stop)]


def test_save_restore_continues_exactly_as_without_the_round_trip(provider, tiny_model_path, tmp_path):
    prefix, suffix = _prompt(300), [400, 401, 402, 403]
    provider.generate(GenerationRequest(prompt_tokens=prefix, max_tokens=0))  # prefill only
    saved = provider.save_state(0, tmp_path / "s.state")
    assert saved.n_tokens == 300 and saved.size_bytes > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # written atomically
    direct = provider.generate(GenerationRequest(prompt_tokens=prefix + suffix, max_tokens=16))
    assert direct.cached_tokens == 300

    provider.generate(GenerationRequest(prompt_tokens=_prompt(200, 2000), max_tokens=1))  # overwrite the context
    assert provider.restore_state(0, tmp_path / "s.state").n_tokens == 300
    assert provider.context_tokens() == prefix
    resumed = provider.generate(GenerationRequest(prompt_tokens=prefix + suffix, max_tokens=16))
    assert (resumed.cached_tokens, resumed.evaluated_tokens) == (300, 4)
    assert resumed.completion_tokens == direct.completion_tokens

    # And in a brand-new worker process.
    other = LlamaCppPythonProvider("other", tiny_model_path, model_digest=provider.model_digest,
                                   options=LlamaOptions(n_ctx=1024, n_threads=1))
    other.start()
    try:
        assert other.restore_state(0, tmp_path / "s.state").n_tokens == 300
        again = other.generate(GenerationRequest(prompt_tokens=prefix + suffix, max_tokens=16))
        assert again.completion_tokens == direct.completion_tokens and again.evaluated_tokens == 4
    finally:
        other.stop()
    rates = provider.rates()
    assert rates.save_bytes_per_s and rates.restore_bytes_per_s and rates.prefill_tokens_per_s


def test_corrupt_or_foreign_state_is_refused(provider, tiny_model_path, tmp_path):
    provider.generate(GenerationRequest(prompt_tokens=_prompt(50), max_tokens=0))
    path = tmp_path / "s.state"
    provider.save_state(0, path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "flipped.state").write_bytes(bytes(data))
    with pytest.raises(StateCorrupt, match="digest mismatch"):
        provider.restore_state(0, tmp_path / "flipped.state")
    (tmp_path / "short.state").write_bytes(bytes(data[:-100]))
    with pytest.raises(StateCorrupt, match="truncated"):
        provider.restore_state(0, tmp_path / "short.state")
    with pytest.raises(StateCorrupt, match="does not exist"):
        provider.restore_state(0, tmp_path / "missing.state")
    # verify=False (the cache hashed the file itself) skips only the content hash:
    # structure is still checked, and an intact file restores.
    with pytest.raises(StateCorrupt, match="truncated"):
        provider.restore_state(0, tmp_path / "short.state", verify=False)
    assert provider.restore_state(0, path, verify=False).n_tokens == 50

    stranger = LlamaCppPythonProvider("stranger", tiny_model_path, model_digest="sha256:" + "cd" * 32,
                                      options=LlamaOptions(n_ctx=1024, n_threads=1))
    stranger.start()
    try:
        with pytest.raises(StateCorrupt, match="saved from model sha256:abab"):
            stranger.restore_state(0, path)
    finally:
        stranger.stop()
    assert provider.health().ok  # refusals never hurt the worker


def test_bad_requests_get_clear_errors(provider):
    with pytest.raises(ProviderError, match="outside the vocabulary"):
        provider.generate(GenerationRequest(prompt_tokens=[1, 10 ** 6], max_tokens=1))
    with pytest.raises(ProviderError, match="context holds 1024"):
        provider.generate(GenerationRequest(prompt_tokens=_prompt(1100), max_tokens=1))
    with pytest.raises(ProviderError, match="one slot"):
        provider.context_tokens(slot=3)
    assert provider.health().ok


def test_stream_yields_the_same_text_and_can_be_abandoned(provider):
    request = GenerationRequest(prompt_text="stream me", max_tokens=10)
    pieces = list(provider.stream(request))
    assert "".join(pieces) == provider.generate(request).text and len(pieces) > 1
    iterator = provider.stream(GenerationRequest(prompt_text="stream me", max_tokens=500))
    next(iterator)
    iterator.close()  # cancels in the worker
    assert provider.generate(request).text == "".join(pieces)  # next request is clean


def test_openai_shapes(provider):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    completion = provider.completions({"model": "tiny", "prompt": "hello", "max_tokens": 5, "temperature": 0})
    parsed = Completion.model_validate(completion)
    assert parsed.usage.completion_tokens == 5 and parsed.choices[0].finish_reason == "length"

    body = {"model": "tiny", "messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    chat = ChatCompletion.model_validate(provider.chat_completions(body))
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 6
    chunks = [ChatCompletionChunk.model_validate(c) for c in
              provider.chat_completions({**body, "stream": True, "stream_options": {"include_usage": True}})]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens
    # The chat prefix is reused on the next turn.
    again = provider.chat_completions(body)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == chat.usage.prompt_tokens - 1

    stream = list(provider.completions({"prompt": "hello", "max_tokens": 5, "temperature": 0, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in stream) == completion["choices"][0]["text"]
    with pytest.raises(ProviderError, match="messages"):
        provider.chat_completions({"messages": []})


def test_killed_worker_raises_provider_crashed_and_restarts(tiny_model_path):
    p = LlamaCppPythonProvider("victim", tiny_model_path, options=LlamaOptions(n_ctx=1024, n_threads=1))
    p.start()
    try:
        pid = p.pid
        outcome: dict = {}

        def long_request() -> None:
            try:
                p.generate(GenerationRequest(prompt_tokens=_prompt(10), max_tokens=1000))
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                outcome["error"] = exc

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(0.3)  # mid-request
        os.kill(pid, signal.SIGKILL)
        thread.join(30)
        error = outcome.get("error")
        assert isinstance(error, ProviderCrashed), error
        assert f"pid {pid}" in str(error) and "SIGKILL" in str(error) and "during generate" in str(error)
        assert not p.health().ok and "crashed" in p.health().detail
        with pytest.raises(ProviderCrashed, match="restart"):
            p.tokenize("x")
        p.restart()
        assert p.pid != pid and p.health().ok
        assert len(p.generate(GenerationRequest(prompt_text="alive again", max_tokens=3)).completion_tokens) == 3
    finally:
        p.stop()


def test_unload_ends_the_worker_and_a_missing_model_is_a_clear_error(tiny_model_path, tmp_path):
    import psutil

    p = LlamaCppPythonProvider("gone", tiny_model_path, options=LlamaOptions(n_ctx=256, n_threads=1))
    p.start()
    pid = p.pid
    assert psutil.Process(pid).memory_info().rss > tiny_model_path.stat().st_size
    p.unload()
    assert not psutil.pid_exists(pid) and not p.health().ok
    missing = LlamaCppPythonProvider("missing", tmp_path / "nope.gguf", model_digest="sha256:" + "0" * 64)
    with pytest.raises(ProviderError, match="does not exist"):
        missing.start()
    assert missing.pid is None

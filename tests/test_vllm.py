"""The vLLM adapter against a local HTTP server that answers in vLLM's
documented shapes (tests/fake_vllm.py: OpenAI server, /tokenize, /health,
Prometheus /metrics with V1 metric names and engine/model_name labels, block-level
prefix caching), plus vLLM's rendering. No GPU here, so no real vLLM."""

from __future__ import annotations

import pytest

from nodeagent.launch.podman import PodmanHostConfig, podman_run_argv
from nodeagent.launch.quadlet import parse_quadlet, render_quadlet_text
from nodeagent.launch.subprocess import free_port
from nodeagent.launch.units import parse_unit
from nodeagent.providers.base import GenerationRequest, Provider, ProviderError, StateUnsupported
from nodeagent.providers.catalog import load_catalog, resolve_spec
from nodeagent.providers.vllm import VllmProvider, parse_vllm_metrics

from fake_vllm import BLOCK, MODEL, FakeVllm, serve


@pytest.fixture
def fake_vllm():
    state = FakeVllm()
    server = serve(state)
    provider = VllmProvider("vllm-test", f"http://127.0.0.1:{server.server_address[1]}", served_model=MODEL)
    yield provider, state, server
    provider.close()
    server.shutdown()
    server.server_close()


def test_is_a_provider_and_healthy(fake_vllm):
    provider, _, _ = fake_vllm
    assert isinstance(provider, Provider)
    assert provider.health().ok
    assert provider.models()["data"][0]["id"] == MODEL
    nobody = VllmProvider("gone", f"http://127.0.0.1:{free_port()}", served_model=MODEL)
    gone = nobody.health()
    assert not gone.ok and gone.detail == "connection refused"
    nobody.close()


def test_tokenize(fake_vllm):
    provider, state, _ = fake_vllm
    assert provider.tokenize("hi") == state.tokenize("hi", True)
    assert provider.tokenize("hi", add_bos=False) == state.tokenize("hi", False)


def test_generate_reports_cached_tokens_and_metrics_follow(fake_vllm):
    provider, state, _ = fake_vllm
    prompt = state.tokenize("system prompt and tool schemas, " * 3, True)  # 97 tokens
    before = provider.metrics()
    first = provider.generate(GenerationRequest(prompt_tokens=prompt, max_tokens=5))
    assert first.prompt_tokens == len(prompt) and first.cached_tokens == 0 and first.evaluated_tokens == len(prompt)
    assert len(first.completion_tokens) == 5 and first.finish_reason == "length"
    second = provider.generate(GenerationRequest(prompt_tokens=prompt + [9, 9, 9], max_tokens=5))
    assert second.cached_tokens == (len(prompt) // BLOCK) * BLOCK
    assert second.evaluated_tokens == len(prompt) + 3 - second.cached_tokens
    after = provider.metrics()
    assert after.prefix_cache_queries - (before.prefix_cache_queries or 0) == 2 * len(prompt) + 3
    assert after.prefix_cache_hits - (before.prefix_cache_hits or 0) == second.cached_tokens
    assert 0 < after.prefix_cache_hit_rate < 1
    assert 0 < after.kv_cache_usage <= 1 and after.requests_running == 0 and after.requests_waiting == 0
    assert after.generation_tokens == 10


def test_stream_matches_generate(fake_vllm):
    provider, state, _ = fake_vllm
    prompt = state.tokenize("stream me", True)
    plain = provider.generate(GenerationRequest(prompt_tokens=prompt, max_tokens=6))
    pieces = list(provider.stream(GenerationRequest(prompt_tokens=prompt, max_tokens=6)))
    assert "".join(pieces) == plain.text == provider.last_stream.text
    assert provider.last_stream.completion_tokens == plain.completion_tokens
    assert provider.last_stream.prompt_tokens == len(prompt) and provider.last_stream.ttft_s <= provider.last_stream.total_s


def test_openai_passthrough_fills_in_the_model(fake_vllm):
    provider, _, _ = fake_vllm
    chat = provider.chat_completions({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert chat["object"] == "chat.completion" and chat["model"] == MODEL
    chunks = list(provider.completions({"prompt": "hi", "max_tokens": 2, "stream": True}))
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "length"]


def test_errors_carry_vllms_message(fake_vllm):
    provider, _, _ = fake_vllm
    with pytest.raises(ProviderError, match="HTTP 400: This model's maximum context length is 4096"):
        provider.generate(GenerationRequest(prompt_tokens=[1, 2, 3], max_tokens=5000))


def test_state_is_left_to_vllm(fake_vllm, tmp_path):
    provider, _, _ = fake_vllm
    for call in (lambda: provider.save_state(0, tmp_path / "x"), lambda: provider.restore_state(0, tmp_path / "x"),
                 lambda: provider.context_tokens(0)):
        with pytest.raises(StateUnsupported, match="vLLM"):
            call()
    rates = provider.rates()
    assert rates.restore_bytes_per_s is None and rates.save_bytes_per_s is None


def test_metric_names_old_and_new_and_several_engines():
    legacy = parse_vllm_metrics(
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.5\n'
        'vllm:gpu_prefix_cache_queries_total{model_name="m"} 100\n'
        'vllm:gpu_prefix_cache_hits_total{model_name="m"} 25\n')
    assert (legacy.kv_cache_usage, legacy.prefix_cache_queries, legacy.prefix_cache_hits) == (0.5, 100, 25)
    assert legacy.prefix_cache_hit_rate == 0.25 and legacy.requests_running is None
    two = parse_vllm_metrics(
        '# TYPE vllm:kv_cache_usage_perc gauge\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2\n'
        'vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.6\n'
        '# TYPE vllm:prefix_cache_hits counter\n'
        'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 10\n'
        'vllm:prefix_cache_hits_total{engine="1",model_name="m"} 5\n'
        'vllm:num_requests_waiting{engine="0",model_name="m"} 2\n'
        'vllm:num_requests_waiting{engine="1",model_name="m"} 3\n')
    assert two.kv_cache_usage == pytest.approx(0.4)  # averaged over engines
    assert two.prefix_cache_hits == 15 and two.requests_waiting == 5  # summed
    assert two.prefix_cache_hit_rate is None  # no queries reported


# ------------------------------------------------------------------ rendering
def vllm_spec(mode: str, accelerator: str = "nvidia"):
    return resolve_spec(load_catalog().get("vllm"), name="vllm-qwen", mode=mode, model_path=f"/srv/models/{MODEL}",
                        port=18000, accelerator=accelerator, params={"gpu_memory_utilization": 0.85})


@pytest.mark.parametrize("version", ["4.4", "5.0"])
def test_quadlet_rendering(version):
    spec = vllm_spec("quadlet")
    text = render_quadlet_text(spec, version)
    unit = parse_unit(text)
    shape = parse_quadlet(text).shape
    assert "--ipc=host" in unit.get("Container", "PodmanArgs")
    assert shape.ipc_host and "--enable-prefix-caching" in shape.args
    assert shape.args[shape.args.index("--gpu-memory-utilization") + 1] == "0.85"
    assert shape.args[shape.args.index("--model") + 1] == f"/models/{MODEL}"
    assert (f"/srv/models/{MODEL}:/models/{MODEL}:ro") in shape.volumes
    assert shape.devices == (("nvidia.com/gpu=all", False),)


def test_podman_rendering_and_adapter_from_spec():
    spec = vllm_spec("podman")
    argv = podman_run_argv(spec, "5.0", PodmanHostConfig())
    assert argv[argv.index("--ipc") + 1] == "host" and "--enable-prefix-caching" in argv
    assert argv[argv.index("--device") + 1] == "nvidia.com/gpu=all"
    provider = VllmProvider.from_spec(spec)
    assert provider.served_model == MODEL and provider.base_url == "http://127.0.0.1:18000"
    provider.close()

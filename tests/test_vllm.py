"""The vLLM adapter against a local HTTP server that answers in vLLM's
documented shapes (OpenAI server, /tokenize, /health, Prometheus /metrics
with V1 metric names and engine/model_name labels), plus vLLM's rendering.
No GPU here, so no real vLLM: the server below is the stand-in, and it does
block-level prefix caching (16-token blocks) so hit counters move for real."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from nodeagent.launch.podman import PodmanHostConfig, podman_run_argv
from nodeagent.launch.quadlet import parse_quadlet, render_quadlet_text
from nodeagent.launch.subprocess import free_port
from nodeagent.launch.units import parse_unit
from nodeagent.providers.base import GenerationRequest, Provider, ProviderError, StateUnsupported
from nodeagent.providers.catalog import load_catalog, resolve_spec
from nodeagent.providers.vllm import VllmProvider, parse_vllm_metrics

MODEL = "Qwen2.5-0.5B-Instruct"
BLOCK = 16
MAX_MODEL_LEN = 4096


class FakeVllm:
    """State of the stand-in server: cached blocks and metric counters."""

    def __init__(self) -> None:
        self.blocks: set[tuple[int, ...]] = set()
        self.queries = 0
        self.hits = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.lock = threading.Lock()

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return ([1] if add_special else []) + [ord(c) % 500 + 2 for c in text]

    def cache(self, tokens: list[int]) -> int:
        """vLLM-style: full blocks only, and never the whole prompt."""
        with self.lock:
            cached = 0
            usable = (len(tokens) - 1) // BLOCK
            for i in range(usable):
                key = tuple(tokens[: (i + 1) * BLOCK])
                if key not in self.blocks:
                    break
                cached = (i + 1) * BLOCK
            for i in range(len(tokens) // BLOCK):
                self.blocks.add(tuple(tokens[: (i + 1) * BLOCK]))
            self.queries += len(tokens)
            self.hits += cached
            self.prompt_tokens += len(tokens)
            return cached

    def metrics(self) -> str:
        labels = f'engine="0",model_name="{MODEL}"'
        return "\n".join([
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{{{labels}}} 0.0",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{{{labels}}} 0.0",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{{{labels}}} {min(1.0, len(self.blocks) / 1000):.4f}",
            "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.",
            "# TYPE vllm:prefix_cache_queries_total counter",
            f"vllm:prefix_cache_queries_total{{{labels}}} {float(self.queries)}",
            "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.",
            "# TYPE vllm:prefix_cache_hits_total counter",
            f"vllm:prefix_cache_hits_total{{{labels}}} {float(self.hits)}",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
            "# TYPE vllm:prompt_tokens_total counter",
            f"vllm:prompt_tokens_total{{{labels}}} {float(self.prompt_tokens)}",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
            "# TYPE vllm:generation_tokens_total counter",
            f"vllm:generation_tokens_total{{{labels}}} {float(self.generation_tokens)}",
            "# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.",
            "# TYPE vllm:time_to_first_token_seconds histogram",
            f'vllm:time_to_first_token_seconds_bucket{{{labels},le="0.1"}} 1.0',
            f'vllm:time_to_first_token_seconds_bucket{{{labels},le="+Inf"}} 1.0',
            f"vllm:time_to_first_token_seconds_count{{{labels}}} 1.0",
            f"vllm:time_to_first_token_seconds_sum{{{labels}}} 0.01",
        ]) + "\n"


def make_handler(state: FakeVllm):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output clean
            pass

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, obj) -> None:
            self._send(status, json.dumps(obj).encode())

        def _error(self, message: str) -> None:
            self._json(400, {"object": "error", "message": message, "type": "BadRequestError", "param": None,
                             "code": 400})

        def do_GET(self):  # noqa: N802
            if self.path == "/health":
                self._send(200, b"", "text/plain")
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 1,
                                                             "owned_by": "vllm", "root": f"/models/{MODEL}",
                                                             "parent": None, "max_model_len": MAX_MODEL_LEN}]})
            elif self.path == "/metrics":
                self._send(200, state.metrics().encode(), "text/plain; version=0.0.4")
            else:
                self._json(404, {"detail": "Not Found"})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body.get("model") != MODEL:
                return self._error(f"The model `{body.get('model')}` does not exist.")
            if self.path == "/tokenize":
                tokens = state.tokenize(body["prompt"], body.get("add_special_tokens", True))
                return self._json(200, {"count": len(tokens), "max_model_len": MAX_MODEL_LEN, "tokens": tokens,
                                        "token_strs": None})
            if self.path == "/detokenize":
                return self._json(200, {"prompt": "".join(chr(t + 95) for t in body["tokens"])})
            if self.path == "/v1/chat/completions":
                text = " ".join(m["content"] for m in body["messages"])
                prompt = state.tokenize(text, True)
            elif self.path == "/v1/completions":
                prompt = body["prompt"] if isinstance(body["prompt"], list) else state.tokenize(body["prompt"], True)
            else:
                return self._json(404, {"detail": "Not Found"})
            n = int(body.get("max_tokens") or 16)
            if len(prompt) + n > MAX_MODEL_LEN:
                return self._error(f"This model's maximum context length is {MAX_MODEL_LEN} tokens.")
            cached = state.cache(prompt)
            out = [(sum(prompt) + 7 * i) % 400 + 2 for i in range(n)]
            state.generation_tokens += n
            usage = {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n,
                     "prompt_tokens_details": {"cached_tokens": cached}}
            created = int(time.time())
            if self.path == "/v1/chat/completions":
                return self._json(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": created,
                                        "model": MODEL, "choices": [{"index": 0, "message": {
                                            "role": "assistant", "content": "".join(chr(t + 95) for t in out)},
                                            "finish_reason": "length"}], "usage": usage})
            if not body.get("stream"):
                return self._json(200, {"id": "cmpl-1", "object": "text_completion", "created": created,
                                        "model": MODEL, "choices": [{
                                            "index": 0, "text": "".join(chr(t + 95) for t in out), "logprobs": None,
                                            "finish_reason": "length", "stop_reason": None,
                                            "prompt_token_ids": prompt, "token_ids": out}], "usage": usage})
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def event(obj) -> None:
                data = f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

            base = {"id": "cmpl-1", "object": "text_completion", "created": created, "model": MODEL}
            for i, token in enumerate(out):
                event({**base, "choices": [{"index": 0, "text": chr(token + 95), "logprobs": None,
                                            "finish_reason": "length" if i == n - 1 else None,
                                            "stop_reason": None, "token_ids": [token]}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                event({**base, "choices": [], "usage": usage})
            event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")

    return Handler


@pytest.fixture
def fake_vllm():
    state = FakeVllm()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
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

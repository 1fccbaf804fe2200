"""A stand-in vLLM server for tests: vLLM's documented HTTP shapes (OpenAI server,
/tokenize, /health, Prometheus /metrics with V1 names), block-level prefix caching
(16-token blocks) so hit counters move for real, and optionally vLLM's KV events.
No GPU here, so no real vLLM."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from nodeagent.kvevents import BlockStored, EventBatch, encode_batch

MODEL = "Qwen2.5-0.5B-Instruct"
BLOCK = 16
MAX_MODEL_LEN = 4096


class FakeVllm:
    """State of the stand-in server: cached blocks and metric counters; with
    ``events`` (a bound ZMQ PUB socket) it publishes the blocks it stores as vLLM
    does with --kv-events-config (its own integer block hashes, parent-chained)."""

    def __init__(self, model: str = MODEL, events=None) -> None:
        self.model = model
        self.events = events
        self.seq = 0
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
            new = []
            for i in range(len(tokens) // BLOCK):
                key = tuple(tokens[: (i + 1) * BLOCK])
                if key not in self.blocks:
                    self.blocks.add(key)
                    new.append(i)
            if self.events is not None and new:
                self._publish(tokens, new)
            self.queries += len(tokens)
            self.hits += cached
            self.prompt_tokens += len(tokens)
            return cached

    def _publish(self, tokens: list[int], new: list[int]) -> None:
        """One BlockStored per run of new blocks, as vLLM's scheduler reports them."""
        first = new[0]
        parent = None if first == 0 else _block_hash(tokens, first - 1)
        event = BlockStored(tuple(_block_hash(tokens, i) for i in new), parent,
                            tuple(tokens[first * BLOCK:(new[-1] + 1) * BLOCK]), BLOCK, "GPU")
        payload = encode_batch(EventBatch(time.time(), (event,)))
        self.events.send_multipart([f"kv@fake@{self.model}".encode(), self.seq.to_bytes(8, "big"), payload])
        self.seq += 1

    def metrics(self) -> str:
        labels = f'engine="0",model_name="{self.model}"'
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


def _block_hash(tokens: list[int], i: int) -> int:
    """vLLM-style: an integer of its own, not the node's key."""
    return hash(("fake-vllm", tuple(tokens[: (i + 1) * BLOCK]))) & ((1 << 63) - 1)


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
                self._json(200, {"object": "list", "data": [{"id": state.model, "object": "model", "created": 1,
                                                             "owned_by": "vllm", "root": f"/models/{state.model}",
                                                             "parent": None, "max_model_len": MAX_MODEL_LEN}]})
            elif self.path == "/metrics":
                self._send(200, state.metrics().encode(), "text/plain; version=0.0.4")
            else:
                self._json(404, {"detail": "Not Found"})

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body.get("model") != state.model:
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
                                        "model": state.model, "choices": [{"index": 0, "message": {
                                            "role": "assistant", "content": "".join(chr(t + 95) for t in out)},
                                            "finish_reason": "length"}], "usage": usage})
            if not body.get("stream"):
                return self._json(200, {"id": "cmpl-1", "object": "text_completion", "created": created,
                                        "model": state.model, "choices": [{
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

            base = {"id": "cmpl-1", "object": "text_completion", "created": created, "model": state.model}
            for i, token in enumerate(out):
                event({**base, "choices": [{"index": 0, "text": chr(token + 95), "logprobs": None,
                                            "finish_reason": "length" if i == n - 1 else None,
                                            "stop_reason": None, "token_ids": [token]}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                event({**base, "choices": [], "usage": usage})
            event("[DONE]")
            self.wfile.write(b"0\r\n\r\n")

    return Handler


def serve(state: FakeVllm) -> ThreadingHTTPServer:
    """The stand-in, listening on a free loopback port (its thread stops with ``shutdown``)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server

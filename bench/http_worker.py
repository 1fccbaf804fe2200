"""One real llama.cpp provider behind an OpenAI-compatible HTTP server: the baseline worker.

    python -m bench.http_worker --model bench/out/small.gguf --port 18200 --name w0

The baseline arms of the end-to-end benchmark (bench/e2e.py) run two of these,
each wrapping ONE `LlamaCppPythonProvider` (one llama.cpp context, one slot):
what a plain llama.cpp server gives. Its only cache is the provider's own
longest-common-prefix reuse of that single context (T0); nothing is saved,
restored or tiered.

Requests are served one at a time in arrival order (a single-slot server
queues the rest). Chat requests are rendered through the model's chat template
and tokenized exactly as the node renders pods (`nodeagent.session`), so the
two arms evaluate token-identical prompts:

* each leading ``system`` message is a context segment (its ``name`` may be one
  of the segment roles: system, tools, memory, retrieval, history);
* the remaining messages (user, assistant, tool) are one turn.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (prompt: text or token ids), ``GET /bench/log`` (every
request served). The sglang-router discovery probes (``/get_server_info``,
``/get_model_info`` and their older names) answer 404, so the router never
looks for a tokenizer on a model hub. Listens on 127.0.0.1 only. Answers carry
``usage.prompt_tokens_details.cached_tokens``, the serving ``worker`` and
``timings`` with wall-clock instants (``time.time()``, comparable across
processes of this machine): ``arrival_at`` (request read), ``start_at`` (its
turn on the provider began), ``first_token_at``.

On SIGTERM/SIGINT it stops the provider (its worker subprocess) and exits.
"""

from __future__ import annotations

import argparse
import functools
import json
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence

from nodeagent.contracts.pod import ContextSegment, Message
from nodeagent.providers.base import GenerationRequest, ProviderError
from nodeagent.providers.llama_cpp_python import LlamaCppPythonProvider, LlamaOptions
from nodeagent.models.gguf_meta import read_chat_facts
from nodeagent.session import SessionContext
from nodeagent.templates import ChatTemplate, template_for

HOST = "127.0.0.1"
SEGMENT_ROLES = ("system", "tools", "memory", "retrieval", "history")
TURN_ROLES = ("user", "assistant", "tool")


class BadRequest(ValueError):
    """The request body is not something this worker serves (answered 400, field named)."""


@dataclass(frozen=True)
class Conversation:
    """A prompt as the node sees it: context segments, then one turn's messages."""

    segments: tuple[ContextSegment, ...]
    messages: tuple[Message, ...]


def split_messages(messages: Any) -> Conversation:
    """OpenAI chat messages -> leading system messages as segments, the rest as one turn."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: a non-empty list is required")
    segments: list[ContextSegment] = []
    turn: list[Message] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{i}]: an object is required")
        role, content = message.get("role"), message.get("content")
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content: a string is required")
        if role == "system" and not turn:
            name = message.get("name") or "system"
            if name not in SEGMENT_ROLES:
                raise BadRequest(f"messages[{i}].name: a system message's name must be one of "
                                 f"{', '.join(SEGMENT_ROLES)}, got {name!r}")
            segments.append(ContextSegment(role=name, text=content))
        elif role in TURN_ROLES:
            turn.append(Message(role=role, content=content))
        else:
            raise BadRequest(f"messages[{i}].role: {role!r} is not served here (system messages come first; "
                             f"then {', '.join(TURN_ROLES)})")
    if not turn:
        raise BadRequest("messages: at least one user, assistant or tool message is required after the system ones")
    return Conversation(tuple(segments), tuple(turn))


def chat_messages(conversation: Conversation) -> list[dict[str, Any]]:
    """The inverse of `split_messages`: what a client sends for ``conversation``."""
    out: list[dict[str, Any]] = [{"role": "system", "name": s.role, "content": s.text} for s in conversation.segments]
    for index, m in enumerate(conversation.messages):
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.role == "tool":  # OpenAI requires the id of the call a tool message answers
            message["tool_call_id"] = f"call_{index}"
        out.append(message)
    return out


def conversation_tokens(conversation: Conversation, tokenize, template: ChatTemplate) -> list[int]:
    """The prompt tokens exactly as `nodeagent.session.SessionContext` builds a pod's first turn."""
    session = SessionContext("sha256:" + "0" * 64, "bench", "bench", tokenize, template)
    session.add_segments(conversation.segments, [s.text for s in conversation.segments])
    session.add_turn(conversation.messages)
    return session.tokens


class HttpWorker:
    """One provider, its request log, and the HTTP handling (transport-free, for tests)."""

    def __init__(self, name: str, provider: LlamaCppPythonProvider) -> None:
        self.name = name
        self.provider = provider
        self.turn = threading.Lock()  # one request on the provider at a time, FIFO enough for a bench
        self.log: list[dict[str, Any]] = []

    def _tokenize(self, text: str) -> list[int]:
        return self.provider.tokenize(text, add_bos=False, special=True)

    @functools.cached_property
    def template(self) -> ChatTemplate:
        facts = read_chat_facts(self.provider.model_path)
        return template_for(facts.chat_template, bos_token=facts.bos_token, eos_token=facts.eos_token)

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if method == "GET" and path in ("/health", "/health_generate"):
            health = self.provider.health()
            return (200 if health.ok else 503), {"status": "ok" if health.ok else health.detail, "worker": self.name}
        if method == "GET" and path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": self.provider.model_name, "object": "model",
                                                     "owned_by": "agent-machine-bench"}]}
        if method == "GET" and path == "/bench/log":
            return 200, {"worker": self.name, "log": list(self.log)}
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            return 404, {"error": {"message": f"no route {method} {path}"}}
        arrival = time.time()
        try:
            payload = json.loads(body or b"{}")
            if not isinstance(payload, dict):
                raise BadRequest("the body must be a JSON object")
            chat = path == "/v1/chat/completions"
            tokens = self._prompt_tokens(payload, chat)
            max_tokens = payload.get("max_completion_tokens") or payload.get("max_tokens") or 16
            if not isinstance(max_tokens, int) or max_tokens < 1:
                raise BadRequest("max_tokens: a positive integer is required")
            temperature = float(payload.get("temperature") if payload.get("temperature") is not None else 0.0)
        except (BadRequest, ValueError) as exc:
            return 400, {"error": {"message": str(exc), "type": "invalid_request_error"}}
        try:
            record = self._generate(tokens, max_tokens, temperature, payload.get("user"), arrival)
        except ProviderError as exc:
            return 500, {"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error"}}
        return 200, self._body(record, chat, payload.get("model") or self.provider.model_name)

    def _prompt_tokens(self, payload: dict[str, Any], chat: bool) -> list[int]:
        if chat:
            return conversation_tokens(split_messages(payload.get("messages")), self._tokenize, self.template)
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str) and prompt:
            return self.provider.tokenize(prompt, add_bos=True)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)
        raise BadRequest("prompt: a non-empty string or list of token ids is required")

    def _generate(self, tokens: list[int], max_tokens: int, temperature: float, request_id: Any,
                  arrival: float) -> dict[str, Any]:
        with self.turn:
            start = time.time()
            result = self.provider.generate(GenerationRequest(prompt_tokens=tokens, max_tokens=max_tokens,
                                                              temperature=temperature))
            done = time.time()
        # The provider measures from the start of its own work; place that on our clock
        # from the end backwards (the pipe's few microseconds fall before the start).
        first_token = done - (result.total_s - result.ttft_s)
        record = {
            "request_id": request_id if isinstance(request_id, str) else None, "worker": self.name,
            "prompt_tokens": result.prompt_tokens, "cached_tokens": result.cached_tokens,
            "evaluated_tokens": result.evaluated_tokens, "completion_tokens": len(result.completion_tokens),
            "arrival_at": arrival, "start_at": start, "first_token_at": first_token, "done_at": done,
            "queue_s": start - arrival, "ttft_s": result.ttft_s, "total_s": result.total_s,
            "text": result.text, "finish_reason": result.finish_reason,
        }
        self.log.append(record)
        return record

    def _body(self, record: dict[str, Any], chat: bool, model: str) -> dict[str, Any]:
        usage = {"prompt_tokens": record["prompt_tokens"], "completion_tokens": record["completion_tokens"],
                 "total_tokens": record["prompt_tokens"] + record["completion_tokens"],
                 "prompt_tokens_details": {"cached_tokens": record["cached_tokens"]}}
        timings = {"cache_n": record["cached_tokens"], "prompt_n": record["evaluated_tokens"],
                   "ttft_ms": record["ttft_s"] * 1000, "queue_ms": record["queue_s"] * 1000,
                   "arrival_at": record["arrival_at"], "start_at": record["start_at"],
                   "first_token_at": record["first_token_at"], "done_at": record["done_at"]}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": record["text"]},
                      "finish_reason": record["finish_reason"]}
        else:
            choice = {"index": 0, "text": record["text"], "logprobs": None, "finish_reason": record["finish_reason"]}
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}",
                "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model, "choices": [choice], "usage": usage, "worker": self.name, "timings": timings}


def make_server(worker: HttpWorker, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: routers reuse their connections

        def _serve(self, method: str) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            try:
                status, payload = worker.handle(method, self.path.split("?", 1)[0], body)
            except Exception as exc:  # a bug answers 500 rather than hanging the client
                status, payload = 500, {"error": {"message": f"{type(exc).__name__}: {exc}"}}
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.send_header("x-worker", worker.name)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def log_message(self, format: str, *args: Any) -> None:  # quiet: the bench keeps its own log
            pass

    server = ThreadingHTTPServer((HOST, port), Handler)
    server.daemon_threads = True
    return server


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_worker", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="GGUF file to load")
    parser.add_argument("--port", type=int, required=True, help="port on 127.0.0.1")
    parser.add_argument("--name", default="w0", help="worker name reported in answers")
    parser.add_argument("--n-ctx", type=int, default=2304)
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads (default 1)")
    args = parser.parse_args(argv)
    model = Path(args.model)
    if not model.is_file():
        parser.error(f"--model {model} is not a file")
    provider = LlamaCppPythonProvider(args.name, model, model_name=model.stem,
                                      options=LlamaOptions(n_ctx=args.n_ctx, n_threads=args.threads))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = None
    try:
        provider.start()
        server = make_server(HttpWorker(args.name, provider), args.port)
        threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
        print(json.dumps({"ready": f"http://{HOST}:{args.port}", "worker": args.name, "provider_pid": provider.pid}),
              flush=True)
        while not stop.wait(0.5):
            if not provider.running:
                print(f"provider {args.name} died: {provider.health().detail}", file=sys.stderr)
                return 1
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        provider.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

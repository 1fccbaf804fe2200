"""Simulated inference workers: OpenAI-compatible HTTP servers on 127.0.0.1.

Each worker simulates its own KV cache and service time, in *simulated
seconds* that run ``speedup`` times faster than the wall clock:

* KV cache: an LRU of ``capacity_blocks`` prompt blocks (chained keys of
  nodeagent.kvcache.blocks, 64 tokens). A request hits the leading blocks it
  finds (capped at len-1 tokens), then all its blocks are touched, deepest
  first, so a prefix's root is the most recently used and leaves are evicted
  before their ancestors (as a radix cache does).
* Service: prefill is serialised (one FIFO prefill engine per worker) at
  ``prefill_tps`` uncached tokens per simulated second; decode runs batched,
  each request taking ``output_tokens / decode_tps`` after its prefill.
* Tier restore (only when ``restore_bytes_per_s`` > 0, i.e. for a node that
  keeps saved KV states in host RAM): a request may carry
  ``"kv_restore": {"blocks": b, "state_tokens": n}``: before its prefill, the
  engine loads a saved state of ``n`` tokens (``n * kv_bytes_per_token`` bytes
  at ``restore_bytes_per_s``; the whole state, as llama.cpp's load_state
  does), after which the prompt's first ``b`` blocks are in its cache. The
  load occupies the prefill engine, so it shows in this request's TTFT and
  in the queue of the ones behind it. Saving states is the node's business
  and is not charged here (it overlaps compute, as KV offloading does).
  Queue and TTFT are computed on the simulated timeline from the arrival
  times, so CPU noise of the host only shifts arrivals; the HTTP response is
  held until the simulated finish (scaled to real time) so that routers see
  real in-flight load.

Endpoints: ``GET /health``, ``GET /v1/models``, ``POST /v1/completions``,
``POST /v1/chat/completions`` (prompt = message contents joined by spaces),
bench control: ``POST /bench/reset`` (clear cache, log and clock; set
parameters), ``GET /bench/log`` (every request served since reset).
Responses carry ``usage.prompt_tokens_details.cached_tokens``, the serving
worker (``worker``) and llama-server-style ``timings``.

Run: ``python -m bench.simworker --workers 4 --port 18100`` (ports 18100..18103).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

from bench.oracle import capped_hit, keys_of
from bench.traces import decode

HOST = "127.0.0.1"  # loopback only, always


@dataclass
class WorkerConfig:
    capacity_blocks: int = 1024
    prefill_tps: float = 8000.0  # uncached prompt tokens per simulated second
    decode_tps: float = 40.0  # generated tokens per simulated second, per request (batched)
    speedup: float = 20.0  # simulated seconds per real second
    kv_bytes_per_token: int = 131_072  # Llama-3-8B, fp16 KV: 2 x 32 layers x 8 KV heads x 128 dims x 2 bytes
    restore_bytes_per_s: float = 0.0  # host RAM -> engine; 0: this worker cannot restore saved states


class BlockLRU:
    """Prefix blocks in LRU order; the same structure our router mirrors."""

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self.blocks: OrderedDict[bytes, None] = OrderedDict()

    def matched_blocks(self, keys: list[bytes]) -> int:
        n = 0
        while n < len(keys) and keys[n] in self.blocks:
            n += 1
        return n

    def touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # deepest first: ancestors end up most recent
            if key in self.blocks:
                self.blocks.move_to_end(key)
            else:
                self.blocks[key] = None
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)

    def __contains__(self, key: bytes) -> bool:
        return key in self.blocks


@dataclass(frozen=True)
class Restore:
    """A saved state the node restores into the worker before the prompt (see module doc)."""

    blocks: int  # leading prompt blocks the state holds
    state_tokens: int  # tokens the state covers: what the load reads

    @classmethod
    def from_payload(cls, value: object) -> "Restore":
        if not isinstance(value, dict) or set(value) != {"blocks", "state_tokens"}:
            raise ValueError('`kv_restore` must be {"blocks": int, "state_tokens": int}')
        blocks, tokens = value["blocks"], value["state_tokens"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (blocks, tokens)):
            raise ValueError("`kv_restore` blocks and state_tokens must be integers >= 0")
        return cls(blocks, tokens)


@dataclass
class SimWorker:
    name: str
    config: WorkerConfig = field(default_factory=WorkerConfig)

    def __post_init__(self) -> None:
        self.reset(self.config)

    def reset(self, config: WorkerConfig) -> None:
        self.config = config
        self.cache = BlockLRU(config.capacity_blocks)
        self.t0 = time.monotonic()
        self.prefill_free_at = 0.0
        self.in_flight = 0
        self.log: list[dict] = []

    def now_sim(self) -> float:
        return (time.monotonic() - self.t0) * self.config.speedup

    async def serve(self, prompt_tokens: list[int], max_tokens: int, request_id: str | None,
                    restore: "Restore | None" = None) -> dict:
        cfg = self.config
        arrival = self.now_sim()
        keys = keys_of(prompt_tokens)
        device = capped_hit(self.cache.matched_blocks(keys), len(prompt_tokens))
        cached, restore_s = device, 0.0
        if restore is not None:
            restore_s = restore.state_tokens * cfg.kv_bytes_per_token / cfg.restore_bytes_per_s
            cached = max(device, capped_hit(min(restore.blocks, len(keys)), len(prompt_tokens)))
        self.cache.touch(keys)
        uncached = len(prompt_tokens) - cached
        start = max(arrival, self.prefill_free_at)
        prefill_s = uncached / cfg.prefill_tps
        self.prefill_free_at = start + restore_s + prefill_s
        decode_s = max_tokens / cfg.decode_tps
        finish = self.prefill_free_at + decode_s
        record = {
            "request_id": request_id, "worker": self.name, "arrival_s": round(arrival, 6),
            "arrival_mono": time.monotonic(),  # CLOCK_MONOTONIC is system-wide: comparable with the client's
            "prompt_tokens": len(prompt_tokens), "cached_tokens": cached, "uncached_tokens": uncached,
            "device_cached_tokens": device, "restored_tokens": cached - device,
            "restore_state_tokens": restore.state_tokens if restore else 0, "restore_s": round(restore_s, 6),
            "output_tokens": max_tokens, "queue_s": round(start - arrival, 6), "prefill_s": round(prefill_s, 6),
            "ttft_s": round(self.prefill_free_at - arrival, 6), "finish_s": round(finish, 6),
            "in_flight_at_arrival": self.in_flight,
        }
        self.log.append(record)
        self.in_flight += 1
        received = time.monotonic()
        try:
            await asyncio.sleep(max(0.0, (finish - self.now_sim()) / cfg.speedup))
        finally:
            self.in_flight -= 1
        record["server_wall_s"] = round(time.monotonic() - received, 6)
        return record


def _completion_body(worker: SimWorker, record: dict, chat: bool, model: str) -> dict:
    text = " ".join("00000" for _ in range(min(record["output_tokens"], 16)))  # content is not the point
    usage = {"prompt_tokens": record["prompt_tokens"], "completion_tokens": record["output_tokens"],
             "total_tokens": record["prompt_tokens"] + record["output_tokens"],
             "prompt_tokens_details": {"cached_tokens": record["cached_tokens"]}}
    timings = {"cache_n": record["cached_tokens"], "prompt_n": record["uncached_tokens"],
               "prompt_ms": record["prefill_s"] * 1000, "queue_ms": record["queue_s"] * 1000,
               "restored_n": record["restored_tokens"], "restore_state_n": record["restore_state_tokens"],
               "restore_ms": record["restore_s"] * 1000,
               "ttft_ms": record["ttft_s"] * 1000, "predicted_n": record["output_tokens"],
               "predicted_ms": record["output_tokens"] / worker.config.decode_tps * 1000,
               "server_wall_ms": record["server_wall_s"] * 1000, "simulated": True}
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
              if chat else {"index": 0, "text": text, "finish_reason": "length"})
    return {"id": f"sim-{uuid.uuid4().hex[:12]}", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": [choice], "usage": usage,
            "worker": worker.name, "timings": timings}


async def route(worker: SimWorker, method: str, path: str, body: bytes, model: str = "sim-model") -> tuple[int, dict]:
    """One request -> (status, JSON payload)."""
    if method == "GET" and path in ("/health", "/health_generate"):
        return 200, {"status": "ok", "worker": worker.name}
    if method == "GET" and path == "/v1/models":
        return 200, {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "bench"}]}
    if method == "GET" and path == "/bench/log":
        return 200, {"worker": worker.name, "log": worker.log}
    if method != "POST":
        return 404, {"error": {"message": f"no route {method} {path}"}}
    try:
        payload = json.loads(body or b"{}")
    except json.JSONDecodeError as exc:
        return 400, {"error": {"message": f"body is not JSON: {exc}"}}
    if path == "/bench/reset":
        try:
            worker.reset(WorkerConfig(**{**asdict(worker.config), **payload}))
        except TypeError as exc:
            return 400, {"error": {"message": f"bad worker config: {exc}"}}
        return 200, {"worker": worker.name, "config": asdict(worker.config)}
    if path not in ("/v1/completions", "/v1/chat/completions", "/generate"):
        return 404, {"error": {"message": f"no route {method} {path}"}}
    chat = path.endswith("chat/completions")
    try:
        if chat:
            text = " ".join(m.get("content", "") for m in payload.get("messages", []))
        else:
            text = payload.get("prompt") if path != "/generate" else payload.get("text")
            if not isinstance(text, str):
                raise ValueError("`prompt` must be a string of hex tokens")
        tokens = decode(text)
        if not tokens:
            raise ValueError("empty prompt")
        max_tokens = int(payload.get("max_tokens") or payload.get("max_completion_tokens") or 16)
        restore = None
        if payload.get("kv_restore") is not None:
            if worker.config.restore_bytes_per_s <= 0:
                raise ValueError("`kv_restore` sent to a worker without a tier to restore from "
                                 "(restore_bytes_per_s is 0)")
            restore = Restore.from_payload(payload["kv_restore"])
    except (ValueError, TypeError, AttributeError) as exc:
        return 400, {"error": {"message": str(exc)}}
    record = await worker.serve(tokens, max_tokens, payload.get("user"), restore)
    return 200, _completion_body(worker, record, chat, payload.get("model", model))


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}


async def read_message_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readline()
    length = int(headers.get("content-length", "0"))
    return await reader.readexactly(length) if length else b""


async def read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()


def serve_connection(worker: SimWorker):
    """HTTP/1.1 with keep-alive over asyncio streams: small and fast enough that the
    workers never become the bottleneck of the routers they are measured behind."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                try:
                    method, target, _ = line.decode("latin-1").split(" ", 2)
                except ValueError:
                    break
                headers = await read_headers(reader)
                body = await read_message_body(reader, headers)
                try:
                    status, payload = await route(worker, method, target.split("?", 1)[0], body)
                except Exception as exc:  # a bug must answer 500, not hang the client
                    status, payload = 500, {"error": {"message": f"{type(exc).__name__}: {exc}"}}
                data = json.dumps(payload).encode()
                writer.write(f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                             f"content-type: application/json\r\ncontent-length: {len(data)}\r\n"
                             f"x-worker: {worker.name}\r\n\r\n".encode("latin-1") + data)
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return handle


async def serve_workers(count: int, port: int, config: WorkerConfig) -> None:
    servers = []
    for i in range(count):
        worker = SimWorker(f"w{i}", WorkerConfig(**asdict(config)))
        servers.append(await asyncio.start_server(serve_connection(worker), HOST, port + i, backlog=4096,
                                                  limit=1 << 22))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"ready": [f"http://{HOST}:{port + i}" for i in range(count)]}), flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run N simulated OpenAI-compatible workers on 127.0.0.1.")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--port", type=int, default=18100, help="first port; worker i listens on port+i")
    parser.add_argument("--capacity-blocks", type=int, default=WorkerConfig.capacity_blocks)
    parser.add_argument("--prefill-tps", type=float, default=WorkerConfig.prefill_tps)
    parser.add_argument("--decode-tps", type=float, default=WorkerConfig.decode_tps)
    parser.add_argument("--speedup", type=float, default=WorkerConfig.speedup)
    args = parser.parse_args(argv)
    config = WorkerConfig(args.capacity_blocks, args.prefill_tps, args.decode_tps, args.speedup)
    try:
        asyncio.run(serve_workers(args.workers, args.port, config))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

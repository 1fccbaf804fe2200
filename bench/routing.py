"""Benchmarks 2 and 3: routing arms over simulated workers, side by side, one run.

    python -m bench.routing                       # both traces, every arm, sglang-router if installed
    python -m bench.routing --trace gsp --arms ours,round_robin
    python -m bench.routing --trace agent --capacity-blocks 256     # smaller device KV caches
    python -m bench.routing --trace-file held_out.json              # any saved trace (Trace.save format)
    python -m bench.routing --router mine=http://127.0.0.1:9000   # any external router in front
                                                                  # of the same workers (URLs printed)

For each trace, every arm runs the same requests against the same N simulated
workers (bench.simworker; reset between arms, loopback only). A trace saved with
``Trace.save`` runs with ``--trace-file`` (repeatable); when its params carry a
``fleet`` (bench.traces.workload_trace writes one: workers, capacity, rates,
speedup) the run uses it unless the command line says otherwise. Arms:

* ``ours``           the scheduler core (nodeagent.scheduler.placement.place) as the node runs it:
  minimum estimated TTFT, load guard off (the executor's default, see execution/executor.py)
* ``ours-guard``     the same with the token load guard on (``--guard-rel``/``--guard-abs``, LoadGuard's
  defaults), for comparison; ``ours-guard@R``: with rel R
* ``ours+T1``        the system: ``ours`` plus the node's T1 tier in host RAM (the product's
  kvcache.CacheManager, T1 = 4x the workers' total device KV by default): the node saves each
  request's state, looks up saved prefixes before placing, and `place` weighs restoring one
  (charged on the worker's engine at a measured RAM-copy rate) against the device cache and
  recomputing (see `OursTiered`)
* ``ours+T1-5GB``    the same with T1 sized as LMCache's default local CPU tier (5 GB)
* ``llm-d``          llm-d's precise prefix-cache scorer with its queue and KV-utilisation scorers
  and the weights of llm-d's precise-prefix-cache-aware guide (bench.llmd_scorer), given exact state
* ``round_robin``, ``least_loaded`` (fewest in-flight requests), ``consistent_hash``
  (hash ring over the session id), ``random`` (seeded)
* ``sglang-cache_aware``, ``sglang-round_robin``: the real sglang-router from
  PyPI, launched per run with its defaults apart from host/ports (loopback)
* ``--router NAME=URL``: any external OpenAI-compatible router

Only the node arms' workers can restore (``restore_bytes_per_s`` > 0); for every
other arm the workers are plain engines with a device cache, as behind any router.

Metrics: token hit rate (sum cached / sum prompt tokens, from the workers'
logs; for the node arms "cached" includes tokens restored from T1, reported
apart as "from T1") absolute and as a fraction of O1 and O2 computed on the
order in which the workers saw the requests (O2 on the device capacity, and
for the node arms also on device + T1 capacity); max/mean prompt-token load
over workers and Jain's index; TTFT p50/p90/p99 in simulated seconds, end to
end (from the client's send, so routing, the node's lookups and router
queueing count, scaled by the speedup) and at the worker (queue + restore +
prefill); goodput: the share of requests with end-to-end TTFT <= ``--slo-s``;
router cost: time in `choose` for in-process arms, and the extra
wall time an external router adds over the median direct hop.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import httpx

from bench import llmd_scorer
from bench.oracle import BENCH_NAMESPACE, capped_hit, keys_of, o1, o2
from bench.simworker import HOST, BlockLRU, WorkerConfig, read_headers, read_message_body
from bench.traces import TRACES, Trace, TraceRequest, encode
from nodeagent.kvcache.manager import CacheManager, PrefixMatch, visible_owners
from nodeagent.kvcache.tiers import TierStore, default_t1_dir
from nodeagent.scheduler.placement import CandidateState, LoadGuard, PlacementRequest, TierMatch, place
from nodeagent.scheduler.rates import DECODE, PREFILL, RateRegistry, calibrate_read_throughput, restore_quantity
from nodeagent.store import connect

# The system arms: our scheduler with the node's T1 tier, sized as 4x the workers'
# total device KV capacity, and as LMCache's default local CPU tier (5 GB).
TIERED = ("ours+T1", "ours+T1-5GB")
LMCACHE_DEFAULT_CPU_BYTES = 5 * 10**9
IN_PROCESS = ("ours", "ours-guard", *TIERED, "llm-d", "round_robin", "least_loaded", "consistent_hash", "random")
# What the node runs (execution/executor.py): the token load guard off. "ours" and the
# system arms mean the product; "ours-guard" is the guarded variant, for comparison.
PRODUCT_GUARD = LoadGuard(enabled=False)
DEFAULT_SLO_S = 1.0  # goodput: share of requests with TTFT <= this (simulated seconds)
SGLANG = ("sglang-cache_aware", "sglang-round_robin")
# Simulated seconds per wall second. GSP sends everything at once: the ~1 s of
# wall time the client needs to push 1024 requests must stay small against the
# simulated work, so it runs slowly; the agent trace's arrivals are spread by
# design and can run fast.
SPEEDUP = {"gsp": 2.0, "agent": 20.0}
MODEL = "sim-model"
BENCH_OWNERS = visible_owners(BENCH_NAMESPACE)


def free_port_block(count: int) -> int:
    """A base port with ``count`` consecutive free loopback ports."""
    for _ in range(200):
        base = random.randint(20000, 60000 - count)
        ok = True
        for port in range(base, base + count):
            with socket.socket() as s:
                try:
                    s.bind((HOST, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free loopback port range")


# ------------------------------------------------------------------ processes
class Process:
    """A child process we started; stopped by its own pid only."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def start_workers(count: int, config: WorkerConfig, log_dir: Path) -> tuple[Process, list[str]]:
    port = free_port_block(count)
    proc = Process([sys.executable, "-m", "bench.simworker", "--workers", str(count), "--port", str(port),
                    "--capacity-blocks", str(config.capacity_blocks), "--prefill-tps", str(config.prefill_tps),
                    "--decode-tps", str(config.decode_tps), "--speedup", str(config.speedup)],
                   log_dir / "simworkers.log")
    line = proc.proc.stdout.readline()  # type: ignore[union-attr]
    if not line:
        proc.stop()
        raise RuntimeError(f"simulated workers did not start; see {log_dir / 'simworkers.log'}")
    return proc, json.loads(line)["ready"]


def sglang_available() -> str | None:
    """None if sglang-router can be launched, else why not."""
    try:
        import sglang_router  # noqa: F401  (present or not is the question)
    except ImportError as exc:
        return f"sglang-router is not installed ({exc}); pip install 'agent-machine[bench]'"
    return None


def start_sglang(policy: str, workers: list[str], log_dir: Path, attempts: int = 3) -> tuple[Process, str]:
    """Launch sglang-router on fresh loopback ports; a port taken between our probe and its
    bind (the client's ephemeral ports race for the same range) is retried on new ports."""
    for attempt in range(attempts):
        try:
            return _start_sglang_once(policy, workers, log_dir)
        except RuntimeError as exc:
            if attempt == attempts - 1 or "exited" not in str(exc):
                raise
            print(f"sglang-router did not start ({exc}); retrying on other ports", file=sys.stderr)
    raise AssertionError("unreachable")


def _start_sglang_once(policy: str, workers: list[str], log_dir: Path) -> tuple[Process, str]:
    port = free_port_block(2)
    argv = [sys.executable, "-m", "sglang_router.launch_router", "--host", HOST, "--port", str(port),
            "--prometheus-host", HOST, "--prometheus-port", str(port + 1), "--policy", policy,
            "--log-level", "warn", "--worker-urls", *workers]
    proc = Process(argv, log_dir / f"sglang-{policy}.log")
    url = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise RuntimeError(f"sglang-router exited with {proc.proc.returncode}; see {proc.log.name}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                # Registration is asynchronous: wait until a request really goes through.
                r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": encode([1, 2, 3]),
                                                              "max_tokens": 1, "user": "warmup"}, timeout=5)
                if r.status_code == 200:
                    return proc, url
        time.sleep(0.3)
    proc.stop()
    raise RuntimeError(f"sglang-router did not become ready in 60 s; see {proc.log.name}")


# ------------------------------------------------------------------ a lean HTTP client
class HttpClient:
    """HTTP/1.1 keep-alive client over asyncio streams, one connection per in-flight
    request (no pool limit). httpx spends milliseconds per request at 1000-way
    concurrency, which would spread an all-at-once trace over many simulated seconds."""

    def __init__(self) -> None:
        self.idle: dict[tuple[str, int], list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}

    async def request(self, method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        address = (parts.hostname or HOST, parts.port or 80)
        path = parts.path or "/"
        for attempt in range(2):
            pool = self.idle.setdefault(address, [])
            reused = bool(pool)
            reader, writer = pool.pop() if pool else await asyncio.open_connection(*address, limit=1 << 22)
            try:
                head = (f"{method} {path} HTTP/1.1\r\nhost: {address[0]}:{address[1]}\r\n"
                        f"content-type: application/json\r\ncontent-length: {len(body or b'')}\r\n\r\n")
                writer.write(head.encode("latin-1") + (body or b""))
                await writer.drain()
                status_line = await reader.readline()
                if not status_line:
                    raise ConnectionResetError("connection closed before the response")
                status = int(status_line.split(b" ", 2)[1])
                headers = await read_headers(reader)
                data = await read_message_body(reader, headers)
            except (ConnectionError, asyncio.IncompleteReadError):
                writer.close()
                if reused and attempt == 0:
                    continue  # a kept-alive connection the server had closed: retry once on a new one
                raise
            if headers.get("connection", "").lower() == "close":
                writer.close()
            else:
                pool.append((reader, writer))
            return status, data
        raise ConnectionError("unreachable")  # pragma: no cover

    async def post_json(self, url: str, payload: dict | bytes) -> tuple[int, dict]:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        status, data = await self.request("POST", url, body)
        return status, _json_or_error(data)

    async def get_json(self, url: str) -> tuple[int, dict]:
        status, data = await self.request("GET", url)
        return status, _json_or_error(data)

    def close(self) -> None:
        for pool in self.idle.values():
            for _, writer in pool:
                writer.close()
        self.idle.clear()


def _json_or_error(data: bytes) -> dict:
    try:
        value = json.loads(data or b"{}")
    except json.JSONDecodeError:
        return {"error": {"message": data[:200].decode("utf-8", "replace")}}
    return value if isinstance(value, dict) else {"value": value}


# ------------------------------------------------------------------ in-process routers
class Router:
    name = "base"

    def __init__(self, n: int, seed: int) -> None:
        self.n = n
        self.in_flight = [0] * n

    def choose(self, req: TraceRequest, keys: list[bytes], now_sim: float) -> int:
        raise NotImplementedError

    def done(self, worker: int, req: TraceRequest, body: dict) -> None:
        pass

    def body_for(self, req: TraceRequest, body: bytes) -> bytes:
        """The request body to send (a node may add instructions for the worker)."""
        return body

    def close(self) -> None:
        pass


class RoundRobin(Router):
    name = "round_robin"

    def __init__(self, n: int, seed: int) -> None:
        super().__init__(n, seed)
        self.next = 0

    def choose(self, req, keys, now_sim):
        self.next = (self.next + 1) % self.n
        return self.next


class LeastLoaded(Router):
    name = "least_loaded"

    def choose(self, req, keys, now_sim):
        return min(range(self.n), key=lambda i: (self.in_flight[i], i))


class RandomRouter(Router):
    name = "random"

    def __init__(self, n: int, seed: int) -> None:
        super().__init__(n, seed)
        self.rng = random.Random(seed)

    def choose(self, req, keys, now_sim):
        return self.rng.randrange(self.n)


class ConsistentHash(Router):
    name = "consistent_hash"
    VNODES = 64

    def __init__(self, n: int, seed: int) -> None:
        super().__init__(n, seed)
        ring = sorted((int.from_bytes(hashlib.sha256(f"w{i}#{v}".encode()).digest()[:8], "big"), i)
                      for i in range(n) for v in range(self.VNODES))
        self.points = [p for p, _ in ring]
        self.owners = [w for _, w in ring]

    def choose(self, req, keys, now_sim):
        h = int.from_bytes(hashlib.sha256(req.session.encode()).digest()[:8], "big")
        return self.owners[bisect.bisect(self.points, h) % len(self.points)]


class LlmD(Router):
    """llm-d's precise prefix-cache scoring (bench.llmd_scorer) over exact worker state.

    Block index: a mirror of each worker's block LRU (what KV events give llm-d,
    without their delay). Waiting queue: the requests it sent to a worker whose
    prefill has not started, on a virtual FIFO prefill clock at the calibrated
    prefill rate (what vLLM reports as num_requests_waiting). KV usage: prompt
    blocks of the worker's in-flight requests over its capacity.
    """

    name = "llm-d"

    def __init__(self, n: int, seed: int, capacity_blocks: int, prefill_tps: float) -> None:
        super().__init__(n, seed)
        self.rng = random.Random(seed)
        self.capacity = capacity_blocks
        self.prefill_tps = prefill_tps
        self.mirror = [BlockLRU(capacity_blocks) for _ in range(n)]
        self.free_at = [0.0] * n
        self.started: list[dict[str, tuple[float, int]]] = [{} for _ in range(n)]  # rid -> (prefill start, blocks)

    def choose(self, req, keys, now_sim):
        states = []
        for i in range(self.n):
            flying = self.started[i].values()
            states.append(llmd_scorer.EndpointState(
                matched_blocks=self.mirror[i].matched_blocks(keys),
                waiting=sum(1 for start, _ in flying if start > now_sim),
                kv_usage=sum(b for _, b in flying) / self.capacity if self.capacity else 1.0))
        i = llmd_scorer.pick(states, self.rng)
        cached = capped_hit(states[i].matched_blocks, len(req.tokens))
        self.mirror[i].touch(keys)
        start = max(now_sim, self.free_at[i])
        self.free_at[i] = start + (len(req.tokens) - cached) / self.prefill_tps
        self.started[i][req.rid] = (start, len(keys))
        return i

    def done(self, worker, req, body):
        self.started[worker].pop(req.rid, None)


class Ours(Router):
    """The scheduler core over snapshots the router keeps of each worker.

    T0: a mirror of each worker's block LRU (same capacity: a node knows its
    providers' KV size), updated with what we route. Queue: a virtual FIFO
    prefill clock per worker advanced by our own estimate of each request's
    restore + prefill time. Load: context tokens of the live sessions on each
    worker (a node knows which pods run where and when a pod's last turn is
    done; here, from the trace's turn structure). Rates: calibrated by one
    request per worker before the run, then refined from each response's
    timings (EWMA). ``decide_us`` times all of `choose` (tier lookup, T0
    matching, snapshots, `place`).
    """

    name = "ours"
    state_format: str | None = None  # saved-state format the workers restore; None: no tiers

    def __init__(self, n: int, seed: int, capacity_blocks: int, guard: LoadGuard,
                 registry: RateRegistry, final_requests: set[str]) -> None:
        super().__init__(n, seed)
        self.mirror = [BlockLRU(capacity_blocks) for _ in range(n)]
        self.free_at = [0.0] * n
        self.load = [0.0] * n
        self.sessions: dict[str, tuple[int, int]] = {}  # live session -> (worker, context tokens)
        self.final_requests = final_requests
        self.guard = guard
        self.registry = registry
        self.decide_us: list[int] = []

    def tier_matches(self, req: TraceRequest, keys: list[bytes]) -> tuple[TierMatch, ...]:
        return ()

    def placed(self, req: TraceRequest, decision) -> None:
        """Hook: the decision is made (the tiered node starts a restore here)."""

    def choose(self, req, keys, now_sim):
        started = time.perf_counter_ns()
        n_tokens = len(req.tokens)
        matches = self.tier_matches(req, keys)
        candidates = []
        for i in range(self.n):
            candidates.append(CandidateState(
                provider=f"w{i}", model_hot=True,
                t0_cached_tokens=capped_hit(self.mirror[i].matched_blocks(keys), n_tokens),
                state_format=self.state_format,
                queued_requests=self.in_flight[i], running_remaining_s=max(0.0, self.free_at[i] - now_sim),
                load=self.load[i]))
        previous = self.sessions.get(req.session)
        request = PlacementRequest(MODEL, n_tokens, matches,
                                   session_provider=f"w{previous[0]}" if previous else None)
        decision = place(request, candidates, self.registry, self.guard)
        i = int(decision.provider[1:])  # type: ignore[index]
        chosen = decision.chosen
        self.placed(req, decision)
        self.mirror[i].touch(keys)
        service_s = (chosen.terms.restore_s or 0.0) + (chosen.terms.prefill_s or 0.0)  # type: ignore[union-attr]
        self.free_at[i] = max(now_sim, self.free_at[i]) + service_s
        if previous:
            self.load[previous[0]] -= previous[1]
        self.sessions[req.session] = (i, n_tokens)
        self.load[i] += n_tokens
        self.decide_us.append((time.perf_counter_ns() - started) // 1000)
        return i

    def done(self, worker, req, body):
        if req.rid in self.final_requests and req.session in self.sessions:
            w, tokens = self.sessions.pop(req.session)
            self.load[w] -= tokens
        timings = body.get("timings") or {}
        if timings.get("prompt_n") and timings.get("prompt_ms"):
            self.registry.observe(f"w{worker}", PREFILL, timings["prompt_n"], timings["prompt_ms"] / 1000)
        if timings.get("predicted_n") and timings.get("predicted_ms"):
            self.registry.observe(f"w{worker}", DECODE, timings["predicted_n"], timings["predicted_ms"] / 1000)


# Saved-state files of the simulated node hold FILE_BYTES_PER_TOKEN bytes per token, not the
# modelled KV bytes (which would be ~128 KiB per token): budgets, entry sizes and the restore
# rate the scheduler uses are all scaled by the same FILE_BYTES_PER_TOKEN / kv_bytes_per_token.
FILE_BYTES_PER_TOKEN = 4
SIM_STATE_FORMAT = "sim-kv"


def tmpfs_dir() -> Path:
    """Where the simulated node keeps T1 (and its index): RAM, as the product's T1."""
    return default_t1_dir().parent


class OursTiered(Ours):
    """`Ours` plus the node's T1 tier, run by the product's own kvcache code.

    The node keeps a `CacheManager` (real SQLite index, real files in tmpfs,
    GDSF eviction, digest checked on every restore) with a T1 budget of
    ``t1_tokens`` and no T2. After each request the node saves the state of
    its prompt (as the node saves a pod's state after each turn); before
    placing one it looks up the longest saved prefix, and `place` weighs,
    per worker, its device cache (T0) against restoring that state (the
    whole state's bytes at the calibrated T1 restore rate) and recomputing.
    When T1 wins, the request carries ``kv_restore`` and the worker charges
    the load on its engine (bench.simworker). The T1 restore rate is
    calibrated the way node.py does it (reading a file in the T1 directory)
    and refined from the workers' reported restore timings.

    Saves run on a thread of their own, as a node saves after a turn while
    deciding the next ones (they share the CacheManager's lock, as in the
    node); lookups and restores run in the routing loop and are timed in
    ``decide_us``.
    """

    name = "ours+T1"
    state_format = SIM_STATE_FORMAT

    def __init__(self, n: int, seed: int, capacity_blocks: int, guard: LoadGuard, registry: RateRegistry,
                 final_requests: set[str], *, t1_tokens: int, kv_bytes_per_token: int) -> None:
        super().__init__(n, seed, capacity_blocks, guard, registry, final_requests)
        self._dir = tempfile.TemporaryDirectory(prefix="bench-node-t1-", dir=tmpfs_dir())
        base = Path(self._dir.name)
        self.cache = CacheManager(connect(base / "state.db"),
                                  TierStore("T1", base / "t1", t1_tokens * FILE_BYTES_PER_TOKEN),
                                  TierStore("T2", base / "t2", 0))
        self.kv_bytes_per_token = kv_bytes_per_token
        self._looked_up: dict[str, PrefixMatch] = {}
        self._restoring: dict[str, tuple[str, int, int]] = {}  # rid -> (entry id, blocks, state tokens)
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="node-save")
        self._saves: list[Future] = []
        self.save_errors: list[str] = []

    def close(self) -> None:
        self._saver.shutdown(wait=True)
        self.save_errors += [repr(f.exception()) for f in self._saves if f.exception() is not None]
        self.cache.index.conn.close()
        self._dir.cleanup()

    def _save(self, tokens: tuple[int, ...]) -> None:
        staging = self.cache.staging_path()
        staging.write_bytes(bytes(len(tokens) * FILE_BYTES_PER_TOKEN))  # the content is not the point
        self.cache.put(staging, tokens, BENCH_NAMESPACE, state_format=SIM_STATE_FORMAT)

    def tier_matches(self, req, keys):
        found = self.cache.lookup_keys(keys, BENCH_OWNERS, state_format=SIM_STATE_FORMAT,
                                       prompt_tokens=len(req.tokens)).by_tier.get("T1")
        if found is None:
            return ()
        self._looked_up[req.rid] = found
        return (TierMatch("T1", capped_hit(found.blocks, len(req.tokens)), found.bytes, SIM_STATE_FORMAT,
                          found.entry_id),)

    def placed(self, req, decision):
        found = self._looked_up.pop(req.rid, None)
        if found is None or decision.chosen.cache_source != "T1":
            return
        restore = self.cache.begin_restore(found, promote=False)  # digest checked; None: dropped, recompute
        if restore is not None:
            self._restoring[req.rid] = (restore.entry.id, found.blocks, restore.entry.tokens)

    def body_for(self, req, body):
        restoring = self._restoring.get(req.rid)
        if restoring is None:
            return body
        return b'{"kv_restore": {"blocks": %d, "state_tokens": %d}, ' % restoring[1:] + body[1:]

    def done(self, worker, req, body):
        super().done(worker, req, body)
        restoring = self._restoring.pop(req.rid, None)
        if restoring is not None:
            self.cache.end_restore(restoring[0])
        timings = body.get("timings") or {}
        if timings.get("restore_ms") and timings.get("restore_state_n"):
            self.registry.observe(f"w{worker}", restore_quantity("T1"),
                                  timings["restore_state_n"] * FILE_BYTES_PER_TOKEN, timings["restore_ms"] / 1000)
        if body:  # served: the node saves the state of this prompt for the next turn
            self._saves.append(self._saver.submit(self._save, req.tokens))


# ------------------------------------------------------------------ one run
@dataclass
class Sent:
    rid: str
    worker: str | None
    client_wall_s: float
    server_wall_s: float | None
    status: int
    error: str | None = None
    send_mono: float = 0.0


async def calibrate(client: HttpClient, workers: list[str], registry: RateRegistry, seed: int) -> None:
    """One unique 512-token prompt per worker: measured prefill and decode rates."""
    rng = random.Random(seed ^ 0x5EED)
    for i, url in enumerate(workers):
        tokens = [rng.randrange(1 << 20) for _ in range(512)]
        status, payload = await client.post_json(f"{url}/v1/completions", {
            "model": MODEL, "prompt": encode(tokens), "max_tokens": 32, "user": "calibration"})
        if status != 200:
            raise RuntimeError(f"calibration request to {url} failed: {status} {payload}")
        t = payload["timings"]
        registry.set(f"w{i}", PREFILL, t["prompt_n"] / (t["prompt_ms"] / 1000), "calibrated")
        registry.set(f"w{i}", DECODE, t["predicted_n"] / (t["predicted_ms"] / 1000), "calibrated")


async def run_arm(trace: Trace, arm: str, workers: list[str], config: WorkerConfig, *,
                  router_url: str | None, seed: int, guard: LoadGuard, timeout_s: float,
                  bodies: dict[str, bytes], keys: dict[str, list[bytes]], t1_tokens: int = 0) -> dict:
    client = HttpClient()
    router: Router | None = None

    async def reset() -> None:
        for url in workers:
            status, payload = await client.post_json(f"{url}/bench/reset", asdict(config))
            if status != 200:
                raise RuntimeError(f"reset of {url} failed: {payload}")

    try:
        await reset()  # calibration must see this run's worker configuration
        if router_url is None:
            n = len(workers)
            if arm == "llm-d":
                registry = RateRegistry()
                await calibrate(client, workers, registry, seed)
                router = LlmD(n, seed, config.capacity_blocks, registry.resolved("w0").prefill_value
                              or config.prefill_tps)
            elif arm in ("ours", *TIERED) or arm.startswith("ours-guard"):
                registry = RateRegistry()
                await calibrate(client, workers, registry, seed)
                afters = {r.after for r in trace.requests if r.after}
                finals = {r.rid for r in trace.requests if r.rid not in afters}
                if arm in TIERED:
                    # Machine-wide T1 restore rate, in the scaled bytes of the node's state files.
                    registry.set(None, restore_quantity("T1"), config.restore_bytes_per_s * FILE_BYTES_PER_TOKEN
                                 / config.kv_bytes_per_token, "calibrated")
                    router = OursTiered(n, seed, config.capacity_blocks, PRODUCT_GUARD, registry, finals,
                                        t1_tokens=t1_tokens, kv_bytes_per_token=config.kv_bytes_per_token)
                else:
                    router = Ours(n, seed, config.capacity_blocks, arm_guard(arm, guard), registry, finals)
            else:
                router = {"round_robin": RoundRobin, "least_loaded": LeastLoaded, "random": RandomRouter,
                          "consistent_hash": ConsistentHash}[arm](n, seed)
        await reset()  # and the run starts from empty caches
        sent: list[Sent] = []
        t0 = time.monotonic()
        deadline = t0 + timeout_s

        def now_sim() -> float:
            return (time.monotonic() - t0) * config.speedup

        async def send(req: TraceRequest) -> None:
            send_mono = time.monotonic()  # before the routing decision: it is part of the TTFT
            worker_index = None
            if router is not None:
                worker_index = router.choose(req, keys[req.rid], now_sim())
                router.in_flight[worker_index] += 1
                url = workers[worker_index]
            else:
                url = router_url
            start = time.monotonic()
            payload: dict = {}
            try:
                status, payload = await asyncio.wait_for(
                    client.post_json(f"{url}/v1/completions",
                                     router.body_for(req, bodies[req.rid]) if router else bodies[req.rid]),
                    timeout=max(1.0, deadline - time.monotonic()))
                ok = status == 200
                sent.append(Sent(req.rid, payload.get("worker"), time.monotonic() - start,
                                 (payload.get("timings") or {}).get("server_wall_ms", 0) / 1000 or None,
                                 status, None if ok else json.dumps(payload)[:200], send_mono))
                if not ok:
                    payload = {}
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as exc:
                sent.append(Sent(req.rid, None, time.monotonic() - start, None, 0, f"{type(exc).__name__}: {exc}",
                                 send_mono))
            finally:
                if router is not None and worker_index is not None:
                    router.in_flight[worker_index] -= 1
                    router.done(worker_index, req, payload)

        async def session(chain: list[TraceRequest]) -> None:
            for req in chain:
                if req.after is None:
                    await asyncio.sleep(max(0.0, t0 + req.arrival_s / config.speedup - time.monotonic()))
                else:
                    await asyncio.sleep(req.think_s / config.speedup)
                if time.monotonic() > deadline:
                    return
                await send(req)

        chains: dict[str, list[TraceRequest]] = {}
        for req in trace.requests:
            chains.setdefault(req.session, []).append(req)
        await asyncio.gather(*(session(c) for c in chains.values()))
        wall = time.monotonic() - t0
        logs = []
        for url in workers:
            _, payload = await client.get_json(f"{url}/bench/log")
            logs.extend(payload["log"])
    finally:
        client.close()
        if router is not None:
            router.close()
    decide = getattr(router, "decide_us", None)
    return {"arm": arm, "wall_s": wall, "sent": [asdict(s) for s in sent], "logs": logs, "decide_us": decide,
            "save_errors": getattr(router, "save_errors", [])}


# ------------------------------------------------------------------ metrics
def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summarize(trace: Trace, run: dict, n_workers: int, capacity_blocks: int, speedup: float,
              t1_tokens: int = 0, slo_s: float = DEFAULT_SLO_S) -> dict:
    by_id = trace.by_id()
    logs = [rec for rec in run["logs"] if rec.get("request_id") in by_id]
    logs.sort(key=lambda rec: rec["arrival_s"])
    served = {rec["request_id"] for rec in logs}
    prompt = sum(rec["prompt_tokens"] for rec in logs)
    cached = sum(rec["cached_tokens"] for rec in logs)
    seqs = [by_id[rec["request_id"]].tokens for rec in logs]
    seen_keys = [keys_of(s) for s in seqs]
    b1 = o1(seqs, keys=seen_keys)
    b2 = o2(seqs, capacity_blocks * n_workers, keys=seen_keys)
    # For an arm with the node's T1: the same bound on device + T1 capacity (T1 counted as
    # distinct blocks; the node stores whole states, so this bound is generous to it).
    b2_t1 = o2(seqs, capacity_blocks * n_workers + t1_tokens // 64, keys=seen_keys) if t1_tokens else None
    restored = sum(rec.get("restored_tokens", 0) for rec in logs)
    per_worker = {f"w{i}": 0 for i in range(n_workers)}
    for rec in logs:
        per_worker[rec["worker"]] = per_worker.get(rec["worker"], 0) + rec["prompt_tokens"]
    loads = list(per_worker.values())
    mean = sum(loads) / len(loads) if loads else 0
    jain = (sum(loads) ** 2) / (len(loads) * sum(x * x for x in loads)) if any(loads) else 0
    at_worker = [rec["ttft_s"] for rec in logs]
    # End to end, as the client sees it: the time between sending and reaching the
    # worker (routing decision, router queueing, hops) counts, scaled to simulated
    # seconds like everything else.
    sent_at = {s["rid"]: s["send_mono"] for s in run["sent"]}
    ttft = [rec["ttft_s"] + max(0.0, rec["arrival_mono"] - sent_at[rec["request_id"]]) * speedup
            for rec in logs if rec["request_id"] in sent_at]
    hop = [s["client_wall_s"] - s["server_wall_s"] for s in run["sent"] if s["server_wall_s"]]
    errors = [s for s in run["sent"] if s["status"] != 200]
    hit = cached / prompt if prompt else 0.0
    return {
        "arm": run["arm"], "requests": len(trace.requests), "served": len(served), "errors": len(errors),
        "error_sample": errors[0]["error"] if errors else None,
        "hit_rate": hit, "o1": b1.rate, "o2": b2.rate,
        "frac_o1": hit / b1.rate if b1.rate else None, "frac_o2": hit / b2.rate if b2.rate else None,
        "device_hit_rate": (cached - restored) / prompt if prompt else 0.0,
        "restored_rate": restored / prompt if prompt else 0.0,
        "restores": sum(1 for rec in logs if rec.get("restore_state_tokens")),
        "restore_s_total": sum(rec.get("restore_s", 0.0) for rec in logs),
        "t1_tokens": t1_tokens, "o2_with_t1": b2_t1.rate if b2_t1 else None,
        "frac_o2_with_t1": hit / b2_t1.rate if b2_t1 and b2_t1.rate else None,
        "load_max_over_mean": max(loads) / mean if mean else None, "jain": jain, "load_tokens": per_worker,
        "ttft_p50_s": pct(ttft, 50), "ttft_p90_s": pct(ttft, 90), "ttft_p99_s": pct(ttft, 99),
        # Goodput: served within the SLO, over every request of the trace (errors and
        # requests never served count as misses).
        "slo_s": slo_s, "goodput": sum(1 for t in ttft if t <= slo_s) / len(trace.requests) if trace.requests else None,
        "ttfts": [round(t, 6) for t in ttft],  # for pooling percentiles over seeds (bench.sweep)
        "prompt_tokens": prompt, "cached_tokens": cached, "o1_tokens": b1.hit_tokens, "o2_tokens": b2.hit_tokens,
        "ttft_mean_s": statistics.fmean(ttft) if ttft else None,
        "at_worker_ttft_p50_s": pct(at_worker, 50), "at_worker_ttft_p90_s": pct(at_worker, 90),
        "hop_p50_ms": (pct(hop, 50) or 0) * 1000, "hop_p99_ms": (pct(hop, 99) or 0) * 1000,
        "decide_p50_us": pct(run["decide_us"], 50) if run["decide_us"] else None,
        "decide_p99_us": pct(run["decide_us"], 99) if run["decide_us"] else None,
        "wall_s": run["wall_s"], "save_errors": run.get("save_errors", []),
    }


def nominal_bounds(trace: Trace, n_workers: int, capacity_blocks: int) -> dict:
    seqs = [r.tokens for r in trace.nominal_order()]
    keys = [keys_of(s) for s in seqs]
    return {"o1": o1(seqs, keys=keys).rate, "o2": o2(seqs, capacity_blocks * n_workers, keys=keys).rate}


def table(summaries: list[dict]) -> str:
    direct_hops = [s["hop_p50_ms"] for s in summaries if s["arm"] in IN_PROCESS and s["hop_p50_ms"]]
    baseline = statistics.median(direct_hops) if direct_hops else 0.0
    head = ("arm", "hit", "from T1", "xO1", "xO2", "xO2 dev+T1", "max/mean", "jain", "ttft p50", "p90", "p99",
            "goodput", "at worker p50/p90", "router", "errors")
    rows = []
    for s in summaries:
        if s["decide_p50_us"] is not None:
            router = f"{s['decide_p50_us'] / 1000:.2f}/{s['decide_p99_us'] / 1000:.2f} ms decide"
        elif s["arm"] in IN_PROCESS:
            router = "~0 (in-process)"
        else:
            router = f"+{s['hop_p50_ms'] - baseline:.1f} ms hop p50"
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        rows.append((s["arm"], fmt(s["hit_rate"], ".3f"), fmt(s.get("restored_rate") or None, ".3f"),
                     fmt(s["frac_o1"], ".3f"), fmt(s["frac_o2"], ".3f"), fmt(s.get("frac_o2_with_t1"), ".3f"),
                     fmt(s["load_max_over_mean"], ".3f"), fmt(s["jain"], ".3f"), fmt(s["ttft_p50_s"], ".2f"),
                     fmt(s["ttft_p90_s"], ".2f"), fmt(s["ttft_p99_s"], ".2f"), fmt(s.get("goodput"), ".3f"),
                     f"{fmt(s['at_worker_ttft_p50_s'], '.2f')}/{fmt(s['at_worker_ttft_p90_s'], '.2f')}", router,
                     str(s["errors"])))
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    lines = ["| " + " | ".join(str(c).ljust(widths[i]) for i, c in enumerate(head)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(widths[i]) for i, c in enumerate(r)) + " |" for r in rows]
    return "\n".join(lines)


def target_lines(arms: list[dict], peer: str = "sglang-cache_aware") -> list[str]:
    """The issue's routing targets, checked from the summaries of one trace's run.

    Target 2: hit >= 0.95 x O2 at max/mean load <= 1.15 (a node arm with T1 is held to
    O2 on device + T1). Target 3: hit >= the peer's + 10 points at equal or better
    balance; the line also gives the most any router could gain over the peer here
    (O1, the infinite-cache bound, minus the peer's hit rate), since +10 is out of
    reach for every router once the peer is within 10 points of O1.
    """
    by_arm = {s["arm"]: s for s in arms}
    lines = []
    for s in arms:
        if not s["arm"].startswith("ours"):
            continue
        frac = s.get("frac_o2_with_t1") or s["frac_o2"]
        balance = s["load_max_over_mean"]
        if frac is None or balance is None:
            continue
        ok = frac >= 0.95 and balance <= 1.15
        bound = "O2 on device + T1" if s.get("frac_o2_with_t1") else "O2"
        lines.append(f"target 2, {s['arm']}: {frac:.3f} of {bound} at max/mean {balance:.3f} -> "
                     f"{'holds' if ok else 'misses'}")
    other = by_arm.get(peer)
    if other is not None and other["load_max_over_mean"] is not None:
        headroom = (other["o1"] - other["hit_rate"]) * 100
        lines.append(f"target 3 headroom: O1 {other['o1']:.3f} - {peer} {other['hit_rate']:.3f} = "
                     f"{headroom:.1f} points{'' if headroom >= 10 else ' (< 10: no router can gain +10 here)'}")
        for s in arms:
            if not s["arm"].startswith("ours") or s["load_max_over_mean"] is None:
                continue
            gain = (s["hit_rate"] - other["hit_rate"]) * 100
            balanced = s["load_max_over_mean"] <= other["load_max_over_mean"]
            lines.append(f"target 3, {s['arm']}: {gain:+.1f} points over {peer} at max/mean "
                         f"{s['load_max_over_mean']:.3f} vs {other['load_max_over_mean']:.3f} -> "
                         f"{'holds' if gain >= 10 and balanced else 'misses'}")
    return lines


def build_trace(name: str, seed: int, scale: float) -> Trace:
    if name == "gsp":
        if scale == 1.0:
            return TRACES["gsp"](seed=seed)
        return TRACES["gsp"](seed=seed, groups=max(2, int(64 * scale)))
    if scale == 1.0:
        return TRACES["agent"](seed=seed)
    return TRACES["agent"](seed=seed, pods=max(2, int(96 * scale)), agents=max(2, int(16 * scale)))


def arm_guard(arm: str, guard: LoadGuard) -> LoadGuard:
    """``ours``: the product's (off); ``ours-guard``: ``guard``; ``ours-guard@R``: rel R, abs 0."""
    if arm == "ours-guard":
        return guard
    if arm.startswith("ours-guard@"):
        return LoadGuard(rel=float(arm.split("@", 1)[1]))
    return PRODUCT_GUARD


def run_trace(trace: Trace, arms: Sequence[str], workers: list[str], config: WorkerConfig, *, seed: int,
              guard: LoadGuard, timeout_s: float, log_dir: Path, restore_bps: float = 0.0,
              t1_tokens: dict[str, int] | None = None, slo_s: float = DEFAULT_SLO_S,
              external: dict[str, str] | None = None, label: str | None = None) -> list[dict]:
    """Every arm over one trace in front of the same ``workers``: one summary per arm."""
    label = label or trace.name
    t1_tokens = t1_tokens or {}
    external = external or {}
    # Encoded once, outside the timed runs: every arm sends the same bytes.
    bodies = {r.rid: json.dumps({"model": MODEL, "prompt": encode(r.tokens), "max_tokens": r.output_tokens,
                                 "user": r.rid}).encode() for r in trace.requests}
    keys = {r.rid: keys_of(r.tokens) for r in trace.requests}
    summaries = []
    for arm in list(arms) + list(external):
        router_proc = None
        url = external.get(arm)
        if arm in SGLANG:
            router_proc, url = start_sglang(arm.split("-", 1)[1], workers, log_dir)
        # Only the node arms' workers can restore: the others are plain engines.
        arm_config = WorkerConfig(**{**asdict(config), "restore_bytes_per_s": restore_bps if arm in TIERED else 0.0})
        try:
            started = time.monotonic()
            out = asyncio.run(run_arm(trace, arm, workers, arm_config, router_url=url, seed=seed, guard=guard,
                                      timeout_s=timeout_s, bodies=bodies, keys=keys,
                                      t1_tokens=t1_tokens.get(arm, 0)))
        finally:
            if router_proc:
                router_proc.stop()
        summary = summarize(trace, out, len(workers), config.capacity_blocks, config.speedup,
                            t1_tokens.get(arm, 0), slo_s)
        with open(log_dir / f"{label}-{arm}.requests.jsonl", "w") as handle:  # every request, as served
            handle.writelines(json.dumps(rec) + "\n" for rec in out["logs"])
        summaries.append(summary)
        print(f"[{label}] {arm}: hit {summary['hit_rate']:.3f} (x{summary['frac_o2'] or 0:.3f} of O2), "
              f"max/mean {summary['load_max_over_mean'] or 0:.3f}, ttft p50 {summary['ttft_p50_s'] or 0:.2f} "
              f"p90 {summary['ttft_p90_s'] or 0:.2f} s, {summary['errors']} errors, "
              f"{time.monotonic() - started:.1f} s", file=sys.stderr)
    return summaries


def trace_fleet(trace: Trace) -> dict:
    """The fleet a trace was made for (bench.traces.workload_trace records it), or {}."""
    return dict(trace.params.get("fleet") or {})


def run(args: argparse.Namespace) -> dict:
    # The node arms save states on a thread; a finer GIL hand-over keeps that thread's
    # Python work from holding up the routing loop for the default 5 ms at a time.
    sys.setswitchinterval(0.0005)
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    arms = [a for a in args.arms.split(",") if a]
    external = dict(item.split("=", 1) for item in args.router)
    sglang_note = None
    if any(a in SGLANG for a in arms):
        sglang_note = sglang_available()
        if sglang_note:
            print(f"skipping sglang-router arms: {sglang_note}", file=sys.stderr)
            arms = [a for a in arms if a not in SGLANG]
    guard = LoadGuard(rel=args.guard_rel, abs_tokens=args.guard_abs)
    # Named traces are built here; saved ones (--trace-file) run as they are, on the
    # fleet they record unless the command line overrides it.
    traces: list[tuple[str, Trace]] = []
    for path in args.trace_file:
        trace = Trace.load(path)
        traces.append((f"{trace.name}:{Path(path).stem}", trace))
    if not args.trace_file or args.trace != parser_default("trace"):
        traces += [(name, build_trace(name, args.seed, args.scale)) for name in args.trace.split(",") if name]
    n_workers = args.workers or next((trace_fleet(t).get("workers") for _, t in traces if trace_fleet(t)), None) or 4
    restore_bps = 0.0
    if any(a in TIERED for a in arms):
        # A RAM copy on this machine, measured as the node calibrates its T1 (node.py).
        restore_bps = args.restore_bps or calibrate_read_throughput(tmpfs_dir(), 64 << 20)
        print(f"T1 restore rate {restore_bps / 1e9:.2f} GB/s", file=sys.stderr)
    workers_proc, workers = start_workers(n_workers, WorkerConfig(), log_dir)
    print(f"simulated workers: {' '.join(workers)}", file=sys.stderr)
    results: dict = {"workers": n_workers, "seed": args.seed, "guard_of_ours_guard": guard.rule(),
                     "guard_of_ours": PRODUCT_GUARD.rule(), "sglang": sglang_note or "ran",
                     "restore_bytes_per_s": restore_bps, "kv_bytes_per_token": args.kv_bytes_per_token,
                     "slo_s": args.slo_s, "traces": {}}
    try:
        for label, trace in traces:
            fleet = trace_fleet(trace)
            capacity = args.capacity_blocks or fleet.get("capacity_blocks") or WorkerConfig.capacity_blocks
            config = WorkerConfig(capacity, args.prefill_tps or fleet.get("prefill_tps") or WorkerConfig.prefill_tps,
                                  args.decode_tps or fleet.get("decode_tps") or WorkerConfig.decode_tps,
                                  args.speedup or fleet.get("speedup") or SPEEDUP.get(trace.name, WorkerConfig.speedup),
                                  args.kv_bytes_per_token)
            t1_tokens = {"ours+T1": args.t1_tokens or 4 * n_workers * capacity * 64,
                         "ours+T1-5GB": LMCACHE_DEFAULT_CPU_BYTES // args.kv_bytes_per_token}
            summaries = run_trace(trace, arms, workers, config, seed=args.seed, guard=guard, timeout_s=args.timeout,
                                  log_dir=log_dir, restore_bps=restore_bps, t1_tokens=t1_tokens, slo_s=args.slo_s,
                                  external=external, label=label.replace(":", "-"))
            results["traces"][label] = {"summary": trace.summary(), "config": asdict(config),
                                        "speedup": config.speedup,
                                        "t1_tokens": {a: t for a, t in t1_tokens.items() if a in arms},
                                        "nominal": nominal_bounds(trace, n_workers, config.capacity_blocks),
                                        "arms": summaries}
    finally:
        workers_proc.stop()
    return results


def parser_default(dest: str):
    return build_parser().get_default(dest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", default="gsp,agent", help="comma list of: gsp, agent")
    parser.add_argument("--trace-file", action="append", default=[], metavar="FILE",
                        help="a saved trace (Trace.save format) to run instead of --trace (repeatable)")
    parser.add_argument("--arms", default=",".join(IN_PROCESS + SGLANG))
    parser.add_argument("--router", action="append", default=[], metavar="NAME=URL",
                        help="an external router in front of the workers (repeatable)")
    parser.add_argument("--workers", type=int, default=None, help="default: the trace's fleet, else 4")
    parser.add_argument("--capacity-blocks", type=int, default=None,
                        help="KV capacity of each worker in 64-token blocks (default: the trace's fleet, "
                        f"else {WorkerConfig.capacity_blocks})")
    parser.add_argument("--prefill-tps", type=float, default=None,
                        help=f"default: the trace's fleet, else {WorkerConfig.prefill_tps:g}")
    parser.add_argument("--decode-tps", type=float, default=None,
                        help=f"default: the trace's fleet, else {WorkerConfig.decode_tps:g}")
    parser.add_argument("--speedup", type=float, default=None,
                        help="simulated seconds per wall second (default: the trace's fleet, else per trace, "
                        + ", ".join(f"{k} {v:g}" for k, v in SPEEDUP.items()) + ")")
    parser.add_argument("--kv-bytes-per-token", type=int, default=WorkerConfig.kv_bytes_per_token,
                        help="modelled KV size of one token (default: Llama-3-8B, fp16)")
    parser.add_argument("--t1-tokens", type=int, default=0,
                        help="T1 capacity of the ours+T1 arm in tokens (default: 4x the workers' total)")
    parser.add_argument("--restore-bps", type=float, default=0.0,
                        help="T1 restore rate in bytes/s (default: measured RAM copy on this machine)")
    parser.add_argument("--guard-rel", type=float, default=LoadGuard.rel, help="the ours-guard arm's guard")
    parser.add_argument("--guard-abs", type=float, default=LoadGuard.abs_tokens)
    parser.add_argument("--slo-s", type=float, default=DEFAULT_SLO_S,
                        help="TTFT objective for goodput, simulated seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="shrink traces (tests use 0.1)")
    parser.add_argument("--timeout", type=float, default=300.0, help="wall-clock bound per arm")
    parser.add_argument("--log-dir", default=os.environ.get("TMPDIR", "/tmp") + "/agent-machine-bench")
    parser.add_argument("--out", help="write the full results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    results = run(args)
    for name, data in results["traces"].items():
        s = data["summary"]
        print(f"\n### {name}: {s['requests']} requests, {s['prompt_tokens']} prompt tokens; "
              f"O1 {data['nominal']['o1']:.3f}, O2 {data['nominal']['o2']:.3f} (nominal order); "
              f"goodput at TTFT <= {results['slo_s']:g} s\n")
        print(table(data["arms"]))
        print("\n" + "\n".join(target_lines(data["arms"])))
    if args.out:
        from nodeagent.fsutil import atomic_write_text

        atomic_write_text(args.out, json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

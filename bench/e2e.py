"""Benchmark 4: real end to end. Our node vs round-robin vs sglang-router, same trace, same hardware.

    python -m bench.e2e --rounds 2               # the run recorded in bench/README.md (~10 min)
    python -m bench.e2e --engine llama-server --rounds 3   # over real llama-server fleets (bench/e2e_fleet.py)
    python -m bench.e2e                          # one round of the three arms (~5 min)
    python -m bench.e2e --pods 8 --arms ours,round_robin   # quicker look
    python -m bench.e2e --model bench/out/tiny.gguf --pods 2 --turns 2,2   # smoke (seconds)

One command, one run, three arms on the same scaled agent trace, each arm
starting fresh (new processes, empty caches), each with the same hardware
budget: TWO `LlamaCppPythonProvider` workers (llama.cpp, one context each,
``--threads`` threads each) for the same GGUF model.

* ``ours``: a real `nodeagent.node.Node` whose `PodExecutor` holds both
  providers in its `ProviderPool`, with the KV tiers (T1 in a tmpfs directory,
  T2 on disk under bench/out), restore rates calibrated at start
  (`calibrate_restore_rates`) and prefill/decode rates seeded from each
  provider's warm-up, and real signed receipts. Each trace request is ONE
  one-turn `AgentPod` carrying the conversation so far (system + tools as
  context segments, then the task, earlier replies and tool results as the
  turn's messages), submitted when the agent's previous answer came back:
  that is how an agent loop calls us (its next message depends on the reply,
  so it cannot declare all turns up front).
* ``round_robin``: the same two providers' worth of hardware as two
  bench/http_worker.py servers (llama-cpp-python's own longest-common-prefix
  reuse of its single context, nothing else: a plain llama.cpp server); the
  client sends the OpenAI chat request round-robin.
* ``sglang-cache_aware``: the real sglang-router (PyPI) with its cache_aware
  policy at its defaults in front of two fresh http_worker servers (launched
  by `bench.routing.start_sglang`).

Every request is rendered with the node's text layout and piece-wise
tokenization (`nodeagent.session`), so every arm evaluates token-identical
prompts (checked: ``prompt tokens identical across arms``).

TTFT is reported two ways, both from the same kind of clock reading:
``e2e`` = from the client's send (before `Node.submit_pod`, or before the HTTP
POST) to the first generated token (wall clock, `time.time()`, comparable across
the processes of this machine): placement, admission, waiting for a busy
provider, restore and prefill all count. ``at provider`` = from the moment the
request got its provider until its first token (ours: restore + prefill, the
`TurnResult.ttft_ms`; baselines: prefill with the worker's LCP reuse).

Trace (`bench.traces.agent_trace`, seeded, scaled for 2 shared cores): each
pod runs one agent (Zipf popularity), whose system + tool context it shares
with the agent's other pods; then its task; then turns that each append the
model's previous reply (as scripted by the trace, so that every arm sends the
same bytes) and a tool result. Token ids become words (one word = one token
of the generated test vocabularies). Two clients (``--clients``) run the pods
closed-loop in trace order, sleeping each turn's think time between turns.
The JSON (``--out``) keeps every record and, for ours, every placement
decision with each candidate's terms (``info.ours.decisions``). ``--rounds N``
repeats the arms in alternating order (A B C, C B A, ...) and pools the records,
so that a drift in the shared machine's load falls on every arm alike.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import httpx

from bench.http_worker import Conversation, chat_messages
from bench.routing import Process, free_port_block, pct, sglang_available, start_sglang
from bench.traces import _tokens, agent_trace
from nodeagent.contracts.pod import ContextSegment, Message

ARMS = ("ours", "round_robin", "sglang-cache_aware")
REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"
TENANT = "bench"


# ------------------------------------------------------------------ the trace
@dataclass(frozen=True)
class TraceParams:
    seed: int = 0
    agents: int = 4
    pods: int = 24  # 1/4 of the 96 pods over 16 agents, as agents are 4
    zipf_s: float = 1.1
    context_len: tuple[int, int] = (600, 1200)  # system + tools, shared by an agent's pods
    task_len: tuple[int, int] = (30, 80)
    turns: tuple[int, int] = (2, 3)
    tool_result_len: tuple[int, int] = (50, 150)
    reply_len: tuple[int, int] = (8, 16)  # also each turn's max_tokens
    think_mean_s: float = 0.5
    system_share: float = 0.3  # the first 30% of an agent's context is its system prompt, the rest tools


@dataclass(frozen=True)
class Request:
    rid: str
    session: str  # the trace's pod
    agent: str
    turn: int
    conversation: Conversation
    max_tokens: int
    think_s: float  # slept before sending (0 for a pod's first turn)


# One word per trace token. Lowercase 3-letter words starting a-d are single pieces
# ("\u2581abc") in the generated vocabularies of both the tiny (8192) and small
# (32000) presets (nodeagent.models.testmodel.build_vocab), so a trace's token
# counts carry over to the model's tokens (plus the role headers).
WORDS = [a + b + c for a in "abcd" for b in "abcdefghijklmnopqrstuvwxyz" for c in "abcdefghijklmnopqrstuvwxyz"]


def words(tokens: Sequence[int]) -> str:
    return " ".join(WORDS[t % len(WORDS)] for t in tokens)


def agent_contexts(seed: int, agents: int, context_len: tuple[int, int]) -> list[list[int]]:
    """The agents' shared contexts, as `agent_trace` draws them first from its seeded RNG.

    The trace itself does not mark where a pod's context ends; `build_requests`
    checks that every pod's first prompt starts with its agent's context, so a
    change to the generator fails loudly here instead of silently mis-splitting.
    """
    rng = random.Random(seed)
    return [_tokens(rng, rng.randint(*context_len)) for _ in range(agents)]


def build_requests(params: TraceParams) -> list[Request]:
    trace = agent_trace(seed=params.seed, agents=params.agents, pods=params.pods, zipf_s=params.zipf_s,
                        context_len=params.context_len, task_len=params.task_len, turns=params.turns,
                        tool_result_len=params.tool_result_len, reply_len=params.reply_len,
                        think_mean_s=params.think_mean_s)
    contexts = agent_contexts(params.seed, params.agents, params.context_len)
    by_session: dict[str, list] = {}
    for r in trace.requests:
        by_session.setdefault(r.session, []).append(r)
    out: list[Request] = []
    for session, chain in by_session.items():
        agent = int(chain[0].group[1:])
        context = contexts[agent]
        first = list(chain[0].tokens)
        if first[:len(context)] != context:
            raise RuntimeError(f"trace pod {session}: its first prompt does not start with agent a{agent}'s "
                               f"context; bench.traces.agent_trace changed, update agent_contexts")
        cut = max(1, int(len(context) * params.system_share))
        segments = (ContextSegment(role="system", text=words(context[:cut]), scope="tenant"),
                    ContextSegment(role="tools", text=words(context[cut:]), scope="tenant"))
        messages = [Message(role="user", content=words(first[len(context):]))]
        previous = chain[0]
        for index, r in enumerate(chain):
            if index:
                grown = list(r.tokens)[len(previous.tokens):]
                reply, tool = grown[:previous.output_tokens], grown[previous.output_tokens:]
                messages = messages + [Message(role="assistant", content=words(reply)),
                                       Message(role="tool", content=words(tool))]
            out.append(Request(rid=r.rid, session=session, agent=f"a{agent}", turn=index,
                               conversation=Conversation(segments, tuple(messages)),
                               max_tokens=r.output_tokens, think_s=r.think_s if index else 0.0))
            previous = r
    return out


def sessions_in_order(requests: Sequence[Request]) -> list[list[Request]]:
    chains: dict[str, list[Request]] = {}
    for r in requests:
        chains.setdefault(r.session, []).append(r)
    return list(chains.values())


# ------------------------------------------------------------------ measurement
@dataclass
class Record:
    rid: str
    session: str
    agent: str
    turn: int
    arm: str
    ok: bool
    worker: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    evaluated_tokens: int = 0
    completion_tokens: int = 0
    tier: str | None = None  # ours: T0 | T1 | T2 | none
    sent_at: float = 0.0
    first_token_at: float | None = None
    ttft_e2e_s: float | None = None
    ttft_provider_s: float | None = None
    done_s: float | None = None  # send -> answer back at the client
    error: str | None = None
    round: int = 0
    predicted: dict | None = None  # ours: the chosen candidate's TTFT terms (s), as placement estimated them


def drive(chains: list[list[Request]], send: Callable[[Request], Record], *, clients: int,
          deadline: float) -> list[Record]:
    """``clients`` closed-loop clients take pods in trace order and run each pod's turns in order."""
    queue = list(chains)
    lock = threading.Lock()
    records: list[Record] = []

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                chain = queue.pop(0)
            for req in chain:
                if req.think_s:
                    time.sleep(req.think_s)
                if time.time() > deadline:
                    with lock:
                        records.append(Record(req.rid, req.session, req.agent, req.turn, "", False,
                                              error="arm deadline passed before sending"))
                    continue
                try:
                    record = send(req)
                except Exception as exc:  # one failed request must not stop the arm
                    record = Record(req.rid, req.session, req.agent, req.turn, "", False,
                                    error=f"{type(exc).__name__}: {exc}")
                with lock:
                    records.append(record)

    threads = [threading.Thread(target=client, name=f"client-{i}", daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.time() + 30))
    return records


def warmup_tokens(seed: int, n: int = 256) -> str:
    """A prompt unrelated to the trace (same for every provider of every arm)."""
    rng = random.Random(seed ^ 0x3A3A)
    return "warm up " + words([rng.randrange(len(WORDS)) for _ in range(n)])


# ------------------------------------------------------------------ arm: ours
def run_ours(chains, *, model: Path, params: "RunParams", work: Path) -> tuple[list[Record], dict]:
    from nodeagent.config import load_config
    from nodeagent.contracts.pod import TERMINAL_PHASES, AgentPod, PodPhase
    from nodeagent.execution import ManagedProvider, PodExecutor, ProviderPool, machine_facts
    from nodeagent.kvcache.manager import CacheManager
    from nodeagent.models.store import ModelStore
    from nodeagent.node import Node, calibrate_restore_rates
    from nodeagent.providers.base import GenerationRequest
    from nodeagent.providers.llama_cpp_python import (
        LLAMA_CPP_TOKENIZER_KINDS,
        LlamaCppPythonProvider,
        LlamaOptions,
        start_tokenizer,
    )

    class TimedExecutor(PodExecutor):
        """The production executor; records each turn's exact instants and wakes the waiting client."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.instants: dict[str, tuple[float, float, float]] = {}
            self._events: dict[str, threading.Event] = {}
            self._events_lock = threading.Lock()

        def event(self, pod_id: str) -> threading.Event:
            with self._events_lock:
                return self._events.setdefault(pod_id, threading.Event())

        def _execute(self, *args, **kwargs):
            outcome = super()._execute(*args, **kwargs)
            pod = args[0]
            self.instants[pod.id] = (outcome.started, outcome.first_token, outcome.finished)
            return outcome

        def run(self, pod) -> None:
            try:
                super().run(pod)
            finally:
                self.event(pod.id).set()

    state = work / "state"
    t1 = Path(params.t1_root) / f"agent-machine-e2e-{os.getpid()}-{int(time.time())}"
    env = {"HOME": str(work), "AGENT_MACHINE_STATE_DIR": str(state), "AGENT_MACHINE_CONFIG_DIR": str(work / "cfg"),
           "AGENT_MACHINE_CACHE_DIR": str(work / "cache"), "AGENT_MACHINE_RUNTIME_DIR": str(work / "run"),
           "AGENT_MACHINE_CACHE_RAM_DIR": str(t1)}
    store = ModelStore(state)
    store.import_model(model, "bench-model")
    store.close()
    version = "llama-cpp-python"
    try:
        import llama_cpp

        version = f"llama-cpp-python {llama_cpp.__version__}"
    except ImportError:
        pass
    warm = warmup_tokens(params.seed)

    def factory(node):
        models = ModelStore(node.paths.state_dir)
        record = models.resolve("bench-model")
        # As the node's default executor: a vocab-only worker tokenizes, never busy.
        pool = ProviderPool(tokenizer=start_tokenizer, tokenizer_kinds=LLAMA_CPP_TOKENIZER_KINDS)
        cache = CacheManager.open(node.paths.db_file, t1_dir=t1, t2_dir=node.paths.state_dir / "kvcache",
                                  t1_budget=params.t1_budget, t2_budget=params.t2_budget)
        receipts = None
        if params.receipts:
            from nodeagent.receipts import open_machine_log

            receipts = open_machine_log(node.paths.state_dir)
        executor = TimedExecutor(node, pool=pool, models=models, cache=cache, receipts=receipts,
                                 machine=machine_facts(node.machine()) if params.receipts else None)
        calibrate_restore_rates(executor)
        for i in range(params.providers):
            provider = LlamaCppPythonProvider(f"llama-{i}", record.path, model_digest=record.digest,
                                              model_name="bench-model",
                                              options=LlamaOptions(n_ctx=params.n_ctx, n_threads=params.threads))
            provider.start()
            pool.add(ManagedProvider(provider, record.digest, version=version))
            # Warm-up off the books (the node does not know this context): the same
            # unrelated prompt every arm's providers see; it also measures the rates
            # a provider reports at start, which seed the cost model.
            provider.generate(GenerationRequest(prompt_text=warm, max_tokens=8, temperature=0.0))
            executor.rates.seed_from_provider(provider.name, provider.rates())
        pool.tokenizer(record)  # started with the providers, before the clock
        return executor

    node = Node(load_config(env), executor_factory=factory, dispatchers=params.clients)
    info: dict = {"t1_dir": str(t1), "t2_dir": str(state / "kvcache"), "receipts": params.receipts}
    try:
        node.start()
        executor = node.executor
        info["providers"] = {m.name: m.provider.pid for m in executor.pool.all()}
        info["seeded_rates"] = {p: {q: round(r.value, 1) for q, r in rates.items() if r.value}
                                for p, rates in executor.rates.snapshot().items()}

        def send(req: Request) -> Record:
            pod = AgentPod.model_validate({
                "kind": "AgentPod",
                "metadata": {"name": req.rid, "tenant": TENANT, "agent": req.agent, "session": req.session},
                "spec": {"model": {"name": "bench-model"},
                         "context": [s.to_wire() for s in req.conversation.segments],
                         "turns": [{"messages": [m.to_wire() for m in req.conversation.messages],
                                    "maxTokens": req.max_tokens}]},
            })
            sent = time.time()
            submitted = node.submit_pod(pod)
            if not executor.event(submitted.id).wait(params.request_timeout):
                node.cancel_pod(submitted.id, reason="benchmark request timeout")
                raise TimeoutError(f"pod {req.rid} did not finish in {params.request_timeout:g} s")
            back = time.time()
            done = node.get_pod(submitted.id)
            if done.status.phase is not PodPhase.succeeded or not done.status.turns:
                assert done.status.phase in TERMINAL_PHASES
                return Record(req.rid, req.session, req.agent, req.turn, "ours", False,
                              error=f"{done.status.phase.value}: {'; '.join(done.status.reasons)}")
            turn = done.status.turns[0]
            started, first_token, _ = executor.instants[submitted.id]
            return Record(req.rid, req.session, req.agent, req.turn, "ours", True, worker=turn.provider,
                          prompt_tokens=turn.prompt_tokens, cached_tokens=turn.cached_tokens,
                          evaluated_tokens=turn.evaluated_tokens, completion_tokens=turn.completion_tokens,
                          tier=turn.cache_tier, sent_at=sent, first_token_at=first_token,
                          ttft_e2e_s=first_token - sent, ttft_provider_s=first_token - started, done_s=back - sent)

        records = drive(chains, send, clients=params.clients, deadline=time.time() + params.arm_timeout)
        stats = executor.cache.stats()
        info["cache"] = {"hits": stats.hits, "hit_tokens": stats.hit_tokens, "misses": stats.misses,
                         "stored": stats.stored, "stored_bytes": stats.stored_bytes, "demotions": stats.demotions,
                         "promotions": stats.promotions, "evictions": stats.evictions, "corrupt": stats.corrupt,
                         "tiers": {t.tier: {"entries": t.entries, "used_bytes": t.used_bytes} for t in stats.tiers}}
        info["rates_after"] = {p: {q: round(r.value, 1) for q, r in rates.items() if r.value}
                               for p, rates in executor.rates.snapshot().items()}
        info["guard_applied"] = sum(1 for ds in executor.decisions.values() for d in ds if d.guard_applied)
        names = {pod.id: pod.metadata.name for pod in node.list_pods(limit=100_000)}
        info["decisions"] = {names.get(pod_id, pod_id): [d.to_contract().to_wire() for d in ds]
                             for pod_id, ds in executor.decisions.items()}
    finally:
        node.close()
        shutil.rmtree(t1, ignore_errors=True)
    return records, info


# ------------------------------------------------------------------ baseline arms
def start_http_workers(model: Path, params: "RunParams", log_dir: Path) -> tuple[list[Process], list[str], list[int]]:
    """Fresh bench/http_worker.py servers on 127.0.0.1, one provider each; stopped by the caller."""
    port = free_port_block(params.providers)
    procs: list[Process] = []
    urls: list[str] = []
    provider_pids: list[int] = []
    try:
        for i in range(params.providers):
            procs.append(Process([sys.executable, "-m", "bench.http_worker", "--model", str(model),
                                  "--port", str(port + i), "--name", f"w{i}", "--n-ctx", str(params.n_ctx),
                                  "--threads", str(params.threads)], log_dir / f"http_worker-w{i}.log"))
        for i, proc in enumerate(procs):
            line = proc.proc.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise RuntimeError(f"http worker w{i} did not start; see {log_dir / f'http_worker-w{i}.log'}")
            ready = json.loads(line)
            urls.append(ready["ready"])
            provider_pids.append(ready["provider_pid"])
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return procs, urls, provider_pids


def run_http_arm(arm: str, chains, *, model: Path, params: "RunParams", log_dir: Path) -> tuple[list[Record], dict]:
    procs, urls, provider_pids = start_http_workers(model, params, log_dir)
    router = None
    info: dict = {"workers": urls, "processes": [p.proc.pid for p in procs], "provider_pids": provider_pids}
    try:
        warm = warmup_tokens(params.seed)
        for url in urls:  # the same off-the-books warm-up as ours, directly to each worker
            r = httpx.post(f"{url}/v1/completions", json={"prompt": warm, "max_tokens": 8, "temperature": 0},
                           timeout=120)
            r.raise_for_status()
        if arm.startswith("sglang-"):
            router, target = start_sglang(arm.split("-", 1)[1], urls, log_dir)
            info["router"] = target
            info["processes"].append(router.proc.pid)
        counter = iter(range(1 << 30))
        counter_lock = threading.Lock()
        local = threading.local()

        def send(req: Request) -> Record:
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=params.request_timeout)
            if router is None:  # round-robin by the client: request k goes to worker k mod N
                with counter_lock:
                    url = urls[next(counter) % len(urls)]
            else:
                url = target
            body = {"model": "bench-model", "messages": chat_messages(req.conversation),
                    "max_tokens": req.max_tokens, "temperature": 0.0, "user": req.rid}
            sent = time.time()
            response = local.client.post(f"{url}/v1/chat/completions", json=body)
            back = time.time()
            payload = response.json()
            if response.status_code != 200:
                return Record(req.rid, req.session, req.agent, req.turn, arm, False,
                              error=f"HTTP {response.status_code}: {json.dumps(payload)[:300]}")
            usage, timings = payload["usage"], payload["timings"]
            first_token = timings["first_token_at"]
            return Record(req.rid, req.session, req.agent, req.turn, arm, True, worker=payload.get("worker"),
                          prompt_tokens=usage["prompt_tokens"],
                          cached_tokens=usage["prompt_tokens_details"]["cached_tokens"],
                          evaluated_tokens=timings["prompt_n"], completion_tokens=usage["completion_tokens"],
                          sent_at=sent, first_token_at=first_token, ttft_e2e_s=first_token - sent,
                          ttft_provider_s=timings["ttft_ms"] / 1000, done_s=back - sent)

        records = drive(chains, send, clients=params.clients, deadline=time.time() + params.arm_timeout)
    finally:
        if router is not None:
            router.stop()
        for proc in procs:
            proc.stop()
    return records, info


# ------------------------------------------------------------------ summary
@dataclass
class RunParams:
    seed: int = 0
    providers: int = 2
    clients: int = 2
    threads: int = 1
    n_ctx: int = 2304
    t1_root: str = "/dev/shm"
    t1_budget: int = 1 << 30
    t2_budget: int = 4 << 30
    receipts: bool = True
    request_timeout: float = 180.0
    arm_timeout: float = 420.0


def summarize(arm: str, records: list[Record], wall_s: float, loads: list[tuple[float, float]]) -> dict:
    """``loads``: the 1-minute load average before and after each run of the arm."""
    ok = [r for r in records if r.ok]
    e2e = [r.ttft_e2e_s for r in ok if r.ttft_e2e_s is not None]
    at = [r.ttft_provider_s for r in ok if r.ttft_provider_s is not None]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    per_worker: dict[str, int] = {}
    tiers: dict[str, int] = {}
    for r in ok:
        per_worker[r.worker or "?"] = per_worker.get(r.worker or "?", 0) + 1
        if r.tier is not None:
            tiers[r.tier] = tiers.get(r.tier, 0) + 1
    # Before the provider: submit, admission, tokenization, placement, waiting for a busy provider, HTTP hops.
    waits = [r.ttft_e2e_s - r.ttft_provider_s for r in ok if r.ttft_e2e_s is not None and r.ttft_provider_s is not None]
    first_turns = [r.ttft_e2e_s for r in ok if r.turn == 0]
    later_turns = [r.ttft_e2e_s for r in ok if r.turn > 0]
    return {
        "arm": arm, "requests": len(records), "ok": len(ok), "errors": len(records) - len(ok),
        "error_sample": next((r.error for r in records if not r.ok), None),
        "ttft_p50_s": pct(e2e, 50), "ttft_p90_s": pct(e2e, 90), "ttft_mean_s": statistics.fmean(e2e) if e2e else None,
        "at_provider_p50_s": pct(at, 50), "at_provider_p90_s": pct(at, 90),
        "wait_p50_s": pct(waits, 50), "wait_max_s": max(waits) if waits else None,
        "first_turn_p50_s": pct(first_turns, 50), "later_turn_p50_s": pct(later_turns, 50),
        "hit_rate": cached / prompt if prompt else 0.0, "prompt_tokens": prompt, "cached_tokens": cached,
        "evaluated_tokens": sum(r.evaluated_tokens for r in ok), "per_worker": per_worker, "tiers": tiers,
        "wall_s": wall_s, "loads": [[round(a, 2), round(b, 2)] for a, b in loads],
    }


def ratios(summaries: dict[str, dict]) -> dict:
    """Each of our arms against each baseline: TTFT p50 and p90 ratios, and the issue's p50 targets."""
    out: dict[str, dict] = {}
    for mine in (a for a in summaries if a.startswith("ours")):
        ours = summaries[mine]
        for other, target in (("round_robin", 0.2), ("sglang-cache_aware", 0.5)):
            base = summaries.get(other)
            if base is None or not base["ttft_p50_s"] or ours["ttft_p50_s"] is None:
                continue
            p50 = ours["ttft_p50_s"] / base["ttft_p50_s"]
            out[f"{mine} / {other}"] = {
                "p50": p50, "p90": ours["ttft_p90_s"] / base["ttft_p90_s"] if base["ttft_p90_s"] else None,
                "mean": ours["ttft_mean_s"] / base["ttft_mean_s"] if base["ttft_mean_s"] else None,
                "target_p50": target, "holds": p50 <= target}
    return out


def token_check(by_arm: dict[str, list[Record]]) -> dict:
    """Did every arm evaluate the same prompt (token count) for each request?"""
    counts: dict[str, set[int]] = {}
    for records in by_arm.values():
        for r in records:
            if r.ok:
                counts.setdefault(r.rid, set()).add(r.prompt_tokens)
    mismatched = sorted(rid for rid, seen in counts.items() if len(seen) > 1)
    return {"identical": not mismatched, "mismatched": mismatched[:10]}


def table(summaries: dict[str, dict]) -> str:
    head = ("arm", "ok", "ttft p50 s", "p90 s", "mean s", "first-turn p50", "later p50", "at provider p50/p90",
            "wait p50/max", "hit rate", "evaluated", "per worker", "tiers", "wall s", "load")
    rows = []
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    for s in summaries.values():
        rows.append((s["arm"], f"{s['ok']}/{s['requests']}", fmt(s["ttft_p50_s"]), fmt(s["ttft_p90_s"]),
                     fmt(s["ttft_mean_s"]), fmt(s["first_turn_p50_s"]), fmt(s["later_turn_p50_s"]),
                     f"{fmt(s['at_provider_p50_s'])}/{fmt(s['at_provider_p90_s'])}",
                     f"{fmt(s['wait_p50_s'])}/{fmt(s['wait_max_s'])}", fmt(s["hit_rate"]),
                     str(s["evaluated_tokens"]), " ".join(f"{k}:{v}" for k, v in sorted(s["per_worker"].items())),
                     " ".join(f"{k}:{v}" for k, v in sorted(s["tiers"].items())) or "-", fmt(s["wall_s"], ".0f"),
                     " ".join(f"{a:.1f}-{b:.1f}" for a, b in s["loads"])))
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    lines = ["| " + " | ".join(str(c).ljust(widths[i]) for i, c in enumerate(head)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(str(c).ljust(widths[i]) for i, c in enumerate(r)) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ one run
def ensure_model(path: Path | None, preset: str) -> Path:
    """``path``, or by default the real SmolLM2-135M-Instruct (scripts/fetch-smollm2.sh); with
    ``--preset`` and a missing ``path``, a generated test model written there once."""
    if path is None:
        script = Path(__file__).resolve().parents[1] / "scripts" / "fetch-smollm2.sh"
        found = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True)
        return Path(found.stdout.strip().splitlines()[-1])
    if not path.is_file():
        from nodeagent.models.testmodel import create_test_model

        print(f"writing the {preset} test model to {path} (once) ...", file=sys.stderr)
        create_test_model(path, preset=preset)
    return path


def run(trace: TraceParams, params: RunParams, arms: Sequence[str], model: Path, log_dir: Path,
        work_root: Path, rounds: int = 1) -> dict:
    """Every arm on the same trace; with ``rounds`` > 1 the arm order alternates (A B C, C B A, ...)
    so that a drift in the shared machine's load falls on all arms alike; records are pooled."""
    requests = build_requests(trace)
    chains = sessions_in_order(requests)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise ValueError(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    longest = max(len(r.conversation.segments[0].text.split()) + sum(len(s.text.split()) for s in
                  r.conversation.segments[1:]) + sum(len(m.content.split()) for m in r.conversation.messages)
                  + r.max_tokens for r in requests)
    if longest * 1.1 + 64 > params.n_ctx:  # role headers add a few tokens per piece
        raise ValueError(f"the longest request needs about {longest} tokens; raise --n-ctx above {params.n_ctx}")
    if any(a.startswith("sglang-") for a in arms):
        missing = sglang_available()
        if missing:
            raise RuntimeError(missing)
    log_dir.mkdir(parents=True, exist_ok=True)
    work_root.mkdir(parents=True, exist_ok=True)
    by_arm: dict[str, list[Record]] = {arm: [] for arm in arms}
    walls = {arm: 0.0 for arm in arms}
    loads: dict[str, list[tuple[float, float]]] = {arm: [] for arm in arms}
    infos: dict[str, list[dict]] = {arm: [] for arm in arms}
    for round_index in range(rounds):
        for arm in (arms if round_index % 2 == 0 else list(reversed(arms))):
            load_before = os.getloadavg()[0]
            started = time.monotonic()
            print(f"[e2e] round {round_index + 1}/{rounds} {arm}: {len(requests)} requests over {len(chains)} pods ...",
                  file=sys.stderr)
            if arm.startswith("ours"):
                work = Path(tempfile.mkdtemp(prefix="ours-", dir=work_root))
                try:
                    records, info = run_ours(chains, model=model, params=params, work=work)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
            else:
                records, info = run_http_arm(arm, chains, model=model, params=params, log_dir=log_dir)
            wall = time.monotonic() - started
            for r in records:
                r.arm, r.round = arm, round_index
            by_arm[arm].extend(sorted(records, key=lambda r: r.sent_at or 0.0))
            walls[arm] += wall
            loads[arm].append((load_before, os.getloadavg()[0]))
            infos[arm].append(info)
            s = summarize(arm, records, wall, loads[arm][-1:])
            print(f"[e2e] round {round_index + 1}/{rounds} {arm}: ttft p50 {s['ttft_p50_s'] or 0:.3f} s, "
                  f"p90 {s['ttft_p90_s'] or 0:.3f} s, hit {s['hit_rate']:.3f}, {s['errors']} errors, {wall:.0f} s",
                  file=sys.stderr)
    summaries = {arm: summarize(arm, by_arm[arm], walls[arm], loads[arm]) for arm in arms}
    for arm in arms:
        with open(log_dir / f"e2e-{arm}.requests.jsonl", "w") as handle:
            handle.writelines(json.dumps(asdict(r)) + "\n" for r in by_arm[arm])
    return {
        "trace": {**asdict(trace), "requests": len(requests), "pods": len(chains),
                  "agents_used": sorted({r.agent for r in requests}),
                  "max_tokens": sum(r.max_tokens for r in requests)},
        "params": asdict(params), "model": str(model), "arms": list(arms), "rounds": rounds,
        "summaries": summaries, "ratios": ratios(summaries), "prompt_tokens": token_check(by_arm),
        "info": infos, "records": {arm: [asdict(r) for r in recs] for arm, recs in by_arm.items()},
        "cpus": os.cpu_count(),
    }


def report(result: dict) -> str:
    lines = [table(result["summaries"]), ""]
    for pair, r in result["ratios"].items():
        lines.append(f"{pair}: TTFT p50 x{r['p50']:.3f}, p90 x{r['p90']:.3f}, mean x{r['mean']:.3f} "
                     f"(target p50 <= {r['target_p50']:g}: {'holds' if r['holds'] else 'does not hold'})")
    check = result["prompt_tokens"]
    lines.append("prompt tokens identical across arms: " + ("yes" if check["identical"]
                                                            else f"NO ({', '.join(check['mismatched'])})"))
    for arm, rounds in result["info"].items():
        for ours in rounds:
            if not arm.startswith("ours") or "cache" not in ours:
                continue
            c = ours["cache"]
            lines.append(f"{arm} cache: hits {c['hits']}, misses {c['misses']}, stored {c['stored']} "
                         f"({c['stored_bytes'] / 2**20:.0f} MiB), demotions {c['demotions']}, "
                         f"promotions {c['promotions']}, evictions {c['evictions']}, corrupt {c['corrupt']}; "
                         f"load guard applied {ours['guard_applied']}x")
    return "\n".join(lines)


def _pair(text: str) -> tuple[int, int]:
    a, _, b = text.partition(",")
    return int(a), int(b or a)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--engine" in argv:  # the fleet form: real llama-server processes in every arm (bench/e2e_fleet.py)
        at = argv.index("--engine")
        engine = argv[at + 1] if at + 1 < len(argv) else ""
        if engine != "llama-server":
            raise SystemExit(f"--engine: {engine!r}; the one other engine is llama-server "
                             f"(the default runs embedded llama-cpp-python workers)")
        from bench.e2e_fleet import main as fleet_main

        return fleet_main(argv[:at] + argv[at + 2:])
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TraceParams()
    r = RunParams()
    parser.add_argument("--arms", default=",".join(ARMS),
                        help=f"comma list of: {', '.join(ARMS)} (default: all)")
    parser.add_argument("--model", default=None,
                        help="GGUF model (default: SmolLM2-135M-Instruct, fetched and verified once by "
                             "scripts/fetch-smollm2.sh); a missing path is generated with --preset")
    parser.add_argument("--preset", default="small", help="test-model preset used when --model names a missing file")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--agents", type=int, default=d.agents)
    parser.add_argument("--pods", type=int, default=d.pods)
    parser.add_argument("--zipf", type=float, default=d.zipf_s)
    parser.add_argument("--context", type=_pair, default=d.context_len, metavar="MIN,MAX",
                        help="system + tools tokens per agent")
    parser.add_argument("--task", type=_pair, default=d.task_len, metavar="MIN,MAX")
    parser.add_argument("--turns", type=_pair, default=d.turns, metavar="MIN,MAX")
    parser.add_argument("--tool", type=_pair, default=d.tool_result_len, metavar="MIN,MAX")
    parser.add_argument("--reply", type=_pair, default=d.reply_len, metavar="MIN,MAX")
    parser.add_argument("--think", type=float, default=d.think_mean_s, help="mean think time between turns, s")
    parser.add_argument("--clients", type=int, default=r.clients)
    parser.add_argument("--threads", type=int, default=r.threads, help="llama.cpp threads per provider")
    parser.add_argument("--n-ctx", type=int, default=r.n_ctx)
    parser.add_argument("--t1-root", default=r.t1_root, help="tmpfs directory for ours' T1 tier")
    parser.add_argument("--no-receipts", action="store_true", help="run ours without signed receipts")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the arms this many times, alternating their order; records are pooled")
    parser.add_argument("--arm-timeout", type=float, default=r.arm_timeout, help="wall-clock bound per arm, s")
    parser.add_argument("--log-dir", default=os.environ.get("TMPDIR", "/tmp") + "/agent-machine-e2e")
    parser.add_argument("--out", default=str(OUT / "e2e.json"), help="full results (JSON)")
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every process this run started is stopped by its pid.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    trace = TraceParams(seed=args.seed, agents=args.agents, pods=args.pods, zipf_s=args.zipf,
                        context_len=args.context, task_len=args.task, turns=args.turns,
                        tool_result_len=args.tool, reply_len=args.reply, think_mean_s=args.think)
    params = RunParams(seed=args.seed, clients=args.clients, threads=args.threads, n_ctx=args.n_ctx,
                       t1_root=args.t1_root, receipts=not args.no_receipts, arm_timeout=args.arm_timeout)
    model = ensure_model(Path(args.model) if args.model else None, args.preset)
    result = run(trace, params, [a for a in args.arms.split(",") if a], model, Path(args.log_dir),
                 OUT / "e2e-work", rounds=args.rounds)
    print(report(result))
    if args.out:
        from nodeagent.fsutil import atomic_write_text

        atomic_write_text(args.out, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark 4b: the node over a real llama-server fleet vs what a user would run instead.

    python -m bench.e2e --engine llama-server --rounds 3       # the run recorded in bench/README.md
    python -m bench.e2e_fleet --rounds 1 --pods 8               # a quicker look
    python -m bench.e2e_fleet --arms ours,single --rounds 1     # two arms only

Same real model (SmolLM2-135M-Instruct, scripts/fetch-smollm2.sh), same
llama-server binary (built from the vendored llama.cpp), same agent trace
(`bench.e2e.build_requests`, scaled by the flags), and in every arm the same
total slots (2S) and threads (2T):

* ``ours``: a real `Node` with the declared fleet ``[[providers]]`` 2 replicas x
  S slots x T threads (the product path: `default_executor`, `Fleet`, slot
  placement, T1 in tmpfs, T2 on disk, signed receipts); each request is an
  OpenAI chat request through `Node.chat_completion` with ``stream``, TTFT at
  the first content chunk;
* ``single``: ONE llama-server with 2S slots and 2T threads, its own slot
  selection (prompt similarity) and its host-RAM prompt cache (``--cache-ram``,
  8 GiB by default in this build): what a user would run instead;
* ``sglang``: sglang-router (PyPI) with its cache_aware policy at its defaults in
  front of two llama-servers of S slots and T threads each;
* ``round_robin``: the client alternates over the same two servers;
* ``ours-1x2S`` (not in the default arms): the node over ONE replica of 2S slots
  and 2T threads, the engine of ``single``: what the node's placement and tiers
  add on the very engine a user would run, apart from the fleet's shape.

The baselines get the conversation rendered with the model's own chat template
(the same renderer the node uses, `nodeagent.templates`), sent as
``/v1/completions`` text with ``stream``; TTFT is the client's send to the first
streamed text. Every server of every arm is started fresh and warmed with the
same unrelated prompt. Arms run in alternating order per round (A B C D,
D C B A, ...) and the records are pooled and reported per round.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import httpx

from bench.e2e import Record, Request, TraceParams, build_requests, drive, sessions_in_order, warmup_tokens
from bench.http_worker import chat_messages
from bench.routing import pct, sglang_available, start_sglang

ARMS = ("ours", "single", "sglang", "round_robin", "ours-1x2S")
OURS = ("ours", "ours-1x2S")  # the node's arms; the verdict compares "ours" with the others
MODEL_NAME = "smollm2"


@dataclass(frozen=True)
class FleetParams:
    slots: int = 2  # S: per replica (single: 2S)
    threads: int = 1  # T: per replica (single: 2T)
    ctx_per_slot: int = 2048
    clients: int = 4
    deadline_s: float = 900.0


def smollm2() -> Path:
    import subprocess

    script = Path(__file__).resolve().parents[1] / "scripts" / "fetch-smollm2.sh"
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ servers for the baselines
class Servers:
    """llama-servers started with the launch layer (subprocesses), stopped on close."""

    def __init__(self, work: Path, model: Path) -> None:
        from nodeagent.launch.registry import Registry
        from nodeagent.launch.subprocess import SubprocessLauncher
        from nodeagent.providers.llama_server import locate_llama_server

        self.binary, how = locate_llama_server(build=True)
        if self.binary is None:
            raise SystemExit(f"e2e_fleet: no llama-server binary: {how}")
        self.launcher = SubprocessLauncher(Registry(work / "servers"))
        self.model = model
        self.names: list[str] = []

    def start(self, name: str, slots: int, threads: int, ctx_per_slot: int) -> str:
        from nodeagent.launch.subprocess import free_port
        from nodeagent.providers.catalog import load_catalog, resolve_spec

        spec = resolve_spec(load_catalog().get("llama-server"), name=name, mode="subprocess",
                            model_path=self.model, port=free_port(), model_name=MODEL_NAME,
                            params={"parallel": slots, "ctx_size": slots * ctx_per_slot},
                            executable=str(self.binary),
                            extra_args=["--threads", str(threads), "--threads-batch", str(threads)])
        self.launcher.up(spec)
        self.names.append(name)
        return spec.base_url

    def close(self) -> None:
        for name in self.names:
            self.launcher.down(name, missing_ok=True)
        self.names.clear()


def render(conversation, template) -> str:
    """The prompt text the node renders for ``conversation`` (its segments, then its messages)."""
    from nodeagent.session import SessionContext

    session = SessionContext("sha256:" + "0" * 64, "bench", "bench", lambda text: [], template)
    session.add_segments(conversation.segments, [s.text for s in conversation.segments])
    session.add_turn(conversation.messages)
    return session.render(add_generation_prompt=True)


def completion_send(arm: str, pick: Callable[[Request], str], template,
                    client: httpx.Client) -> Callable[[Request], Record]:
    def send(req: Request) -> Record:
        url = pick(req)
        body = {"model": MODEL_NAME, "prompt": render(req.conversation, template), "max_tokens": req.max_tokens,
                "temperature": 0, "stream": True, "user": req.session,
                "stream_options": {"include_usage": True}}
        sent = time.time()
        first = None
        usage: dict = {}
        timings: dict = {}
        with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code >= 400:
                response.read()
                return Record(req.rid, req.session, req.agent, req.turn, arm, False, worker=url, sent_at=sent,
                              error=f"HTTP {response.status_code}: {response.text[:200]}")
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if first is None and any(c.get("text") for c in event.get("choices") or []):
                    first = time.time()
                usage = event.get("usage") or usage
                timings = event.get("timings") or timings
        done = time.time()
        prompt = int(usage.get("prompt_tokens") or timings.get("prompt_n", 0) + timings.get("cache_n", 0))
        cached = int(timings.get("cache_n") or (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        return Record(req.rid, req.session, req.agent, req.turn, arm, True, worker=url, prompt_tokens=prompt,
                      cached_tokens=cached, evaluated_tokens=prompt - cached,
                      completion_tokens=int(usage.get("completion_tokens") or 0), sent_at=sent, first_token_at=first,
                      ttft_e2e_s=None if first is None else first - sent, done_s=done - sent)

    return send


def warm(urls: Sequence[str], client: httpx.Client) -> None:
    for url in urls:
        client.post(f"{url}/v1/completions", json={"model": MODEL_NAME, "prompt": warmup_tokens(7),
                                                   "max_tokens": 2, "temperature": 0})


def run_baseline(arm: str, chains, *, params: FleetParams, model: Path, work: Path, template
                 ) -> tuple[list[Record], dict]:
    servers = Servers(work, model)
    router = None
    # No keep-alive, as the node's adapter: a request racing cpp-httplib's idle close fails.
    client = httpx.Client(timeout=params.deadline_s, limits=httpx.Limits(max_keepalive_connections=0))
    try:
        if arm == "single":
            urls = [servers.start("single", 2 * params.slots, 2 * params.threads, params.ctx_per_slot)]
        else:
            urls = [servers.start(f"{arm}-{i}", params.slots, params.threads, params.ctx_per_slot) for i in range(2)]
        warm(urls, client)
        if arm == "sglang":
            router, url = start_sglang("cache_aware", urls, work)
            targets = [url]
        else:
            targets = urls
        counter = iter(range(1 << 30))
        pick = (lambda req: targets[0]) if len(targets) == 1 else (lambda req: targets[next(counter) % 2])
        started = time.time()
        records = drive(chains, completion_send(arm, pick, template, client), clients=params.clients,
                        deadline=started + params.deadline_s)
        return records, {"wall_s": time.time() - started, "servers": urls}
    finally:
        client.close()
        if router is not None:
            router.stop()
        servers.close()


def run_ours(chains, *, params: FleetParams, model: Path, work: Path, replicas: int = 2,
             arm: str = "ours") -> tuple[list[Record], dict]:
    from nodeagent.config import load_config
    from nodeagent.models.store import ModelStore
    from nodeagent.node import Node, default_executor

    state = work / "ours"
    shutil.rmtree(state, ignore_errors=True)
    ModelStore(state / "state").import_model(model, MODEL_NAME)
    config = state / "fleet.toml"
    # One replica gets the two replicas' slots and threads: the same total, in one engine.
    slots, threads = params.slots * 2 // replicas, params.threads * 2 // replicas
    config.write_text(f'[models]\ndefault = "{MODEL_NAME}"\n\n[[providers]]\nmodel = "{MODEL_NAME}"\n'
                      f'replicas = {replicas}\nslots = {slots}\nctx_per_slot = {params.ctx_per_slot}\n'
                      f'threads = {threads}\nload = "eager"\n')
    t1 = Path(tempfile.mkdtemp(prefix="am-e2e-t1-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    env = {"HOME": str(state), "AGENT_MACHINE_STATE_DIR": str(state / "state"),
           "AGENT_MACHINE_CONFIG_DIR": str(state / "cfg"), "AGENT_MACHINE_CACHE_DIR": str(state / "cache"),
           "AGENT_MACHINE_RUNTIME_DIR": str(state / "run"), "AGENT_MACHINE_CACHE_RAM_DIR": str(t1),
           "AGENT_MACHINE_CONFIG": str(config)}
    node = Node(load_config(env), executor_factory=default_executor, dispatchers=max(8, params.clients * 2))
    node.start()
    try:
        deadline = time.monotonic() + 300
        while len(node.executor.pool.all()) < replicas * slots and time.monotonic() < deadline:
            time.sleep(0.1)
        client = httpx.Client(timeout=60)
        try:
            warm([m.provider.replica.server.base_url for m in node.executor.pool.all()
                  if m.provider.slot == 0], client)
        finally:
            client.close()

        def send(req: Request) -> Record:
            body = {"model": MODEL_NAME, "messages": chat_messages(req.conversation), "max_tokens": req.max_tokens,
                    "temperature": 0, "stream": True, "user": req.session}
            sent = time.time()
            first = None
            chunks = node.chat_completion(body, tenant="bench", agent=req.agent)
            pod_id = None
            for chunk in chunks:
                pod_id = pod_id or chunk["id"].removeprefix("chatcmpl-")
                if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                    first = time.time()
            done = time.time()
            pod = node.get_pod(pod_id)
            turn = pod.status.turns[-1] if pod.status.turns else None
            if turn is None:
                return Record(req.rid, req.session, req.agent, req.turn, arm, False, sent_at=sent,
                              error="; ".join(pod.status.reasons or ["no turn"]))
            chosen = next((d.chosen for d in node.executor.decisions.get(pod_id, [])[-1:]), None)
            predicted = None if chosen is None else {
                "queue_wait_s": chosen.terms.queue_wait_s, "restore_s": chosen.terms.restore_s,
                "prefill_s": chosen.terms.prefill_s, "ttft_s": chosen.ttft_s, "source": chosen.cache_source}
            return Record(req.rid, req.session, req.agent, req.turn, arm, True, worker=turn.provider,
                          predicted=predicted,
                          prompt_tokens=turn.prompt_tokens, cached_tokens=turn.cached_tokens,
                          evaluated_tokens=turn.evaluated_tokens, completion_tokens=turn.completion_tokens,
                          tier=turn.cache_tier, sent_at=sent, first_token_at=first,
                          ttft_e2e_s=None if first is None else first - sent,
                          ttft_provider_s=turn.ttft_ms / 1000, done_s=done - sent)

        started = time.time()
        records = drive(chains, send, clients=params.clients, deadline=started + params.deadline_s)
        return records, {"wall_s": time.time() - started, "fleet": node.fleet_view()["declared"]}
    finally:
        node.close()
        shutil.rmtree(t1, ignore_errors=True)


def summarize(arm: str, records: list[Record]) -> dict:
    ok = [r for r in records if r.ok and r.ttft_e2e_s is not None]
    ttfts = [r.ttft_e2e_s for r in ok]
    prompt = sum(r.prompt_tokens for r in ok)
    out_tokens = sum(r.completion_tokens for r in ok)
    busy = sum(r.done_s or 0 for r in ok)
    return {"arm": arm, "requests": len(records), "ok": len(ok),
            "ttft_p50": pct(ttfts, 50), "ttft_p90": pct(ttfts, 90), "ttft_p99": pct(ttfts, 99),
            "hit_rate": (sum(r.cached_tokens for r in ok) / prompt) if prompt else None,
            "out_tok_per_s": out_tokens / busy if busy else None,
            "tiers": {t: sum(1 for r in ok if r.tier == t) for t in ("T0", "T1", "T2", "none")} if arm in OURS
            else None,
            "errors": sorted({r.error for r in records if not r.ok})[:3]}


def table(rows: list[dict]) -> str:
    head = f"{'arm':<12} {'ok':>7} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} {'hit':>6} {'out tok/s':>9}  tiers"
    lines = [head]
    for s in rows:
        def f(v, fmt="{:.3f}"):
            return "-" if v is None else fmt.format(v)
        lines.append(f"{s['arm']:<12} {s['ok']:>3}/{s['requests']:<3} {f(s['ttft_p50']):>7} {f(s['ttft_p90']):>7} "
                     f"{f(s['ttft_p99']):>7} {f(s['hit_rate'], '{:.2f}'):>6} {f(s['out_tok_per_s'], '{:.1f}'):>9}  "
                     f"{s['tiers'] or ''}")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    ours = next((r for r in rows if r["arm"] == "ours"), None)
    others = [r for r in rows if r["arm"] not in OURS and r["ttft_p50"] is not None]
    if ours is None or not others or ours["ttft_p50"] is None:
        return []
    lines = []
    for q in ("ttft_p50", "ttft_p90"):
        best = min(others, key=lambda r: r[q])
        ratio = ours[q] / best[q] if best[q] else float("inf")
        lines.append(f"ours / best other ({best['arm']}) {q[5:]}: x{ratio:.2f} "
                     f"(target <= 0.5: {'holds' if ratio <= 0.5 else 'does not hold'})")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(a for a in ARMS if a != "ours-1x2S"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--pods", type=int, default=12)
    parser.add_argument("--agents", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slots", type=int, default=FleetParams.slots, help="S: slots per replica")
    parser.add_argument("--threads", type=int, default=FleetParams.threads, help="T: threads per replica")
    parser.add_argument("--clients", type=int, default=FleetParams.clients)
    parser.add_argument("--context", default="300,600", help="agent context tokens (min,max)")
    parser.add_argument("--out", help="write every record and summary here (JSON)")
    args = parser.parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    why = sglang_available()
    if "sglang" in arms and why is not None:
        print(f"e2e_fleet: skipping the sglang arm: {why}")
        arms.remove("sglang")
    lo, hi = (int(x) for x in args.context.split(","))
    trace = TraceParams(seed=args.seed, agents=args.agents, pods=args.pods, context_len=(lo, hi))
    chains = sessions_in_order(build_requests(trace))
    params = FleetParams(slots=args.slots, threads=args.threads, clients=args.clients)
    model = smollm2()
    from nodeagent.templates import model_template

    template = model_template(model, None)
    work = Path(tempfile.mkdtemp(prefix="am-e2e-fleet-"))
    pooled: dict[str, list[Record]] = {a: [] for a in arms}
    per_round = []
    try:
        for rnd in range(args.rounds):
            order = arms if rnd % 2 == 0 else list(reversed(arms))
            rows = []
            for arm in order:
                print(f"round {rnd + 1}: {arm} ...", flush=True)
                if arm in OURS:
                    records, info = run_ours(chains, params=params, model=model, work=work,
                                             replicas=2 if arm == "ours" else 1, arm=arm)
                else:
                    records, info = run_baseline(arm, chains, params=params, model=model, work=work,
                                                 template=template)
                for r in records:
                    r.round, r.arm = rnd, arm
                pooled[arm] += records
                rows.append({**summarize(arm, records), "wall_s": info["wall_s"]})
            rows.sort(key=lambda r: arms.index(r["arm"]))
            per_round.append(rows)
            print(f"\nround {rnd + 1} (order {' '.join(order)})\n{table(rows)}\n" + "\n".join(verdict(rows)), flush=True)
        total = [summarize(a, pooled[a]) for a in arms]
        print(f"\npooled over {args.rounds} round(s)\n{table(total)}\n" + "\n".join(verdict(total)))
        if args.out:
            Path(args.out).write_text(json.dumps({"params": asdict(params), "trace": asdict(trace),
                                                  "rounds": per_round, "pooled": total,
                                                  "records": {a: [asdict(r) for r in pooled[a]] for a in arms}},
                                                 indent=1, default=str))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

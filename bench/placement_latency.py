"""Benchmark 5 (placement half): decision latency with 64 providers and 1M indexed blocks.

    python -m bench.placement_latency                   # 64 providers, ~1M indexed blocks, 2000 prompts
    python -m bench.placement_latency --burn 0,2        # and again with 2 CPU-burning processes
    python -m bench.placement_latency --providers 8 --blocks 100000
    python -m bench.placement_latency --slots 8         # 64 llama-servers x 8 slots: 512 candidates

With ``--slots S`` each provider is a llama-server replica with S parallel
slots and every slot is a candidate, as the node places them: the slots of a
replica share its measured rates, each holds its own T0 context (one pod's
blocks where a provider without slots holds four), and in the ``queued``
scenario a random number of a replica's slots have work of their own (the
replica's queued tokens split among them); every slot's queue term carries its
siblings' work at the executor's contention weights. There ``before`` is the
current lookup and `place` scoring every slot (what this benchmark measured of
the node before), and ``after`` is the node's path now: `SlotFolder` leaves
out each slot that a sibling holding as much of the prompt in T0 (most often
nothing) beats on every queue term and on the tie-break (all but one of a
replica's idle slots, and the busy ones behind them), and `place` scores the
rest. Both must choose the same slot (``choice_mismatches``).

The index is a real SQLite CacheIndex (WAL, in a temporary state dir) filled
with ~1M indexed blocks: pods of agents whose 2-8K-token contexts are shared,
each entry indexed under every block it covers. Entries are inserted through
CacheIndex.insert in bulk (one transaction) without writing state files: a
placement only reads the index, and state files are touched by a restore, not
by a decision. The first lookup builds the in-memory probe map (its time and
memory are reported). Each provider holds a few pods' contexts in T0
(ContextBlocks).

One decision = what a node does per request before running it, from the
prompt's block keys: the T1/T2 index lookup, T0 matching on every provider,
building the candidate snapshots, and `place`. Hashing the prompt into block
keys is reported beside it (and in the "with hashing" total): a node computes
the keys once per turn and needs them again to save the state afterwards.
Rendering the PlacementDecision contract (pydantic, for the API and receipts)
is timed apart: it is presentation, done once for the chosen run.

Before and after, side by side in one run: ``before`` is the code this
benchmark measured first, kept here as `_legacy_lookup` and `_legacy_place`
(a SQL join per index probe; an assessment object per candidate, its
per-candidate work verbatim, its reason text abbreviated); ``after`` is the
current code path (CacheManager.lookup_keys on the in-memory probe map,
`place`). Both run on the same index and prompts, interleaved prompt by
prompt so that background noise hits both alike. Both must find the same
prefix depth per tier (``lookup_depth_mismatches``); where they name the same
entries they must choose the same provider (``choice_mismatches`` of
``choices_compared``): the current lookup names the smallest entry covering
the prefix (the cheapest restore), the first named any.

Two queue scenarios: ``queued`` (each provider has 0-20K tokens of prefill
queued, as in the first measurement) and ``idle`` (every queue empty: no
candidate can be ruled out early, the worst case for `place`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from nodeagent.kvcache.blocks import Namespace, block_keys
from nodeagent.kvcache.index import ENTRY_COLUMNS, MIGRATIONS, EntryRow
from nodeagent.kvcache.manager import TIERS, CacheManager, visible_owners
from nodeagent.kvcache.tiers import TierStore
from nodeagent.scheduler.cost import Terms, load_s, prefill_s, queue_wait_s, restore_s
from nodeagent.execution.executor import SLOT_DECODE_CONTENTION, SLOT_PREFILL_CONTENTION
from nodeagent.scheduler.placement import (CandidateState, ContextBlocks, PlacementRequest, SlotFolder, TierMatch,
                                           place)
from nodeagent.scheduler.rates import DECODE, LOAD, PREFILL, RateRegistry, restore_quantity
from nodeagent.store import connect, migrate

MODEL = "sha256:" + "1" * 64
FORMAT = "llama_cpp_python"
BLOCK = 64


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build(state_dir: Path, target_blocks: int, agents: int, seed: int):
    """The current index (a CacheManager's) and, beside it, the same entries in the first
    schema (one row per block, migration step 0) for the "before" lookups."""
    rng = random.Random(seed)
    cm = CacheManager(connect(state_dir / "state.db"), TierStore("T1", state_dir / "t1", 1 << 40),
                      TierStore("T2", state_dir / "t2", 1 << 40))
    legacy = connect(state_dir / "legacy.db")
    migrate(legacy, "kvcache", MIGRATIONS[:1])
    legacy.execute("BEGIN")
    namespace = Namespace(MODEL, "tenant", "acme")
    # Tuples, not lists: the collector untracks tuples of ints, so ~60M benchmark tokens
    # do not turn every full collection into a quarter-second pause inside the timings.
    contexts = [tuple(rng.randrange(1 << 17) for _ in range(rng.randint(2048, 8192))) for _ in range(agents)]
    pods: list[tuple[int, ...]] = []
    rows = 0
    now = time.time()
    with cm.index.transaction():
        while rows < target_blocks:
            tokens = contexts[rng.randrange(agents)] + tuple(rng.randrange(1 << 17)
                                                             for _ in range(rng.randint(256, 8192)))
            keys = block_keys(tokens, namespace)
            tier = "T1" if rng.random() < 0.3 else "T2"
            entry_id = uuid.uuid4().hex
            row = EntryRow(
                id=entry_id, deepest_key=keys[-1], model_digest=MODEL, scope="tenant", owner="acme", tenant="acme",
                state_format=FORMAT, n_tokens=len(tokens), n_blocks=len(keys), block_tokens=BLOCK, tier=tier,
                file=str(cm.stores[tier].path(entry_id)), bytes=len(tokens) * 36_864,
                content_digest="sha256:" + "0" * 64, hits=0, created_at=now, last_used_at=now, pinned=False,
                priority=rng.random())
            cm.index.insert(row, keys)
            legacy.execute(f"INSERT INTO kv_entries ({ENTRY_COLUMNS}) VALUES ({', '.join('?' * 19)})",
                           [getattr(row, name.strip()) for name in ENTRY_COLUMNS.split(",")])
            legacy.executemany("INSERT OR IGNORE INTO kv_blocks (block_key, depth, entry_id) VALUES (?, ?, ?)",
                               [(key, depth, entry_id) for depth, key in enumerate(keys)])
            pods.append(tokens)
            rows += len(keys)
    legacy.execute("COMMIT")
    return cm, legacy, namespace, contexts, pods


# ------------------------------------------------------------------ the code path measured first ("before")
def _legacy_visible_at(conn, key: bytes, owners: list[str], state_format: str, tier: str) -> str | None:
    row = conn.execute(
        "SELECT e.id FROM kv_blocks b CROSS JOIN kv_entries e ON e.id = b.entry_id WHERE b.block_key = ?"
        f" AND e.owner IN ({', '.join('?' * len(owners))}) AND e.state_format = ? AND e.tier = ? LIMIT 1",
        [key, *owners, state_format, tier]).fetchone()
    return row[0] if row else None


def _legacy_lookup(legacy, keys: list[bytes], owners: list[str], state_format: str) -> list[TierMatch]:
    """Binary search per tier, each probe a join of kv_blocks and kv_entries, then the entry row."""
    owners = sorted(set(owners))
    matches = []
    for tier in TIERS:
        lo, hi, found = 0, len(keys), None
        while lo < hi:
            mid = (lo + hi + 1) // 2
            entry_id = _legacy_visible_at(legacy, keys[mid - 1], owners, state_format, tier)
            if entry_id is not None:
                lo, found = mid, entry_id
            else:
                hi = mid - 1
        row = legacy.execute(f"SELECT {ENTRY_COLUMNS} FROM kv_entries WHERE id = ?", (found,)).fetchone()
        if row is not None:
            row = EntryRow.from_row(row)
            matches.append(TierMatch(tier, lo * row.block_tokens, row.bytes, state_format, row.id))
    return matches


def _legacy_matched_blocks(held: ContextBlocks, prompt_keys: list[bytes]) -> int:
    lo, hi = 0, len(prompt_keys)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if prompt_keys[mid - 1] in held.keys:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _legacy_assess(request: PlacementRequest, state: CandidateState, registry: RateRegistry) -> dict:
    provider = state.provider
    prefill = registry.estimate(provider, PREFILL)
    decode = registry.estimate(provider, DECODE)
    rates = [prefill, decode]
    queue = queue_wait_s(state.queued_prefill_tokens, state.queued_decode_tokens, state.running_remaining_s,
                         prefill.value, decode.value)
    if state.model_hot:
        load = 0.0
    else:
        load_rate = registry.estimate(provider, LOAD)
        rates.append(load_rate)
        load = load_s(False, state.model_bytes, load_rate.value)
    fixed = None if queue is None or load is None else queue + load
    prompt = request.prompt_tokens
    t0 = min(state.t0_cached_tokens, prompt) if state.model_hot else 0
    best_source, best_cached, best_bytes = ("T0" if t0 else "none"), t0, 0
    best_restore: float | None = 0.0
    best_prefill = prefill_s(prompt - t0, prefill.value)
    best_rank = (0, fixed + best_prefill, -t0) if fixed is not None and best_prefill is not None else (1, 0.0, -t0)
    restore_rate = None
    for match in request.tier_matches:
        if state.state_format is None or match.state_format != state.state_format or match.cached_tokens <= 0:
            continue
        estimate = registry.estimate(provider, restore_quantity(match.tier))
        cached = min(match.cached_tokens, prompt)
        restore = restore_s(match.tier, match.bytes, estimate.value)
        pre = prefill_s(prompt - cached, prefill.value)
        if fixed is not None and restore is not None and pre is not None:
            rank = (0, fixed + restore + pre, -cached)
        else:
            rank = (1, 0.0, -cached)
        if rank < best_rank:
            best_rank, best_source, best_cached, best_bytes = rank, match.tier, cached, match.bytes
            best_restore, best_prefill, restore_rate = restore, pre, estimate
    if restore_rate is not None:
        rates.append(restore_rate)
    return {"state": state, "eligible": not state.rejected, "rejected": list(state.rejected),
            "source": best_source, "cached": best_cached, "bytes": best_bytes,
            "terms": Terms(queue, load, best_restore, best_prefill), "rates": rates,
            "ttft": best_rank[1] if best_rank[0] == 0 else None, "guarded": False}


def _legacy_place(request: PlacementRequest, candidates: list[CandidateState], registry: RateRegistry) -> str:
    """The first `place`: an assessment object per candidate, sorted keys, a sorted runner-up."""
    rel = 1.5
    assessments = [_legacy_assess(request, state, registry) for state in candidates]
    eligible = [a for a in assessments if a["eligible"]]

    def key(a):
        s = a["state"]
        if a["ttft"] is not None:
            return (0, a["ttft"], s.load, s.queued_prefill_tokens + s.queued_decode_tokens, s.provider)
        return (1, not s.model_hot, request.prompt_tokens - a["cached"], s.load,
                s.queued_prefill_tokens + s.queued_decode_tokens, s.provider)

    pool = eligible
    if request.session_provider is None and len(eligible) > 1:
        limit = min(a["state"].load for a in eligible) * rel
        kept = [a for a in eligible if a["state"].load <= limit]
        if kept and len(kept) < len(eligible):
            min(eligible, key=key)
            for a in eligible:
                a["guarded"] = a["state"].load > limit
            pool = kept
    chosen = min(pool, key=key)
    others = sorted((a for a in pool if a is not chosen and a["ttft"] is not None), key=lambda a: a["ttft"])
    _ = (f"{chosen['state'].provider}: lowest estimated TTFT {chosen['ttft']:.3f} s"
         + (f"; next {others[0]['state'].provider} at {others[0]['ttft']:.3f} s" if others else ""))
    uuid.uuid4()
    return chosen["state"].provider


# ------------------------------------------------------------------ measurement
class Burners:
    """N busy-looping child processes (background CPU load), stopped by their own pids."""

    def __init__(self, count: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
                      for _ in range(count)]

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


@dataclass(frozen=True)
class SlotQueue:
    """One slot's queue as the executor prices it: its own work plus its siblings' at the
    contention weights; ``idle``: nothing of its own running or queued."""

    prefill: int
    decode: int
    idle: bool


def slot_queues(slots: dict[str, list[str]], queued: dict[str, int], rng: random.Random) -> dict[str, SlotQueue]:
    """A replica's queued tokens (``queued[replica]``) split among a random number of its
    slots, half of it prompt and a tenth of it answer; every slot then carries its
    siblings' work at the contention weights."""
    out = {}
    for replica, names in slots.items():
        busy = rng.sample(names, rng.randint(0, len(names))) if queued[replica] else []
        own = {name: (queued[replica] // len(busy), queued[replica] // (10 * len(busy))) if name in busy else (0, 0)
               for name in names}
        engine_prefill, engine_decode = sum(p for p, _ in own.values()), sum(d for _, d in own.values())
        for name, (prefill, decode) in own.items():
            out[name] = SlotQueue(prefill + int(SLOT_PREFILL_CONTENTION * (engine_prefill - prefill)),
                                  decode + int(SLOT_DECODE_CONTENTION * (engine_decode - decode)),
                                  idle=not prefill and not decode)
    return out


def measure(cm, legacy, namespace, prompts, providers, registry, t0_held, hot, queued, *, render_every: int,
            engine_of: dict[str, str] | None = None) -> dict:
    owners = visible_owners(namespace)
    parts = ("hash", "lookup", "t0", "candidates", "place", "decision", "with_hashing")
    times = {path: {part: [] for part in parts} for path in ("before", "after")}
    render_us: list[float] = []
    folded: list[int] = []
    mismatches = depth_mismatches = compared = 0
    slotted = engine_of is not None

    def one(path: str, prompt: tuple[int, ...]) -> tuple[str, tuple]:
        t = times[path]
        start = time.perf_counter_ns()
        keys = block_keys(prompt, namespace)
        hashed = time.perf_counter_ns()
        current = path == "after" or slotted
        if current:
            lookup = cm.lookup_keys(keys, owners, state_format=FORMAT, prompt_tokens=len(prompt))
            matches = tuple(TierMatch(m.tier, m.cached_tokens, m.bytes, FORMAT, m.entry_id)
                            for m in lookup.by_tier.values())
        else:
            matches = tuple(_legacy_lookup(legacy, keys, owners, FORMAT))
        looked = time.perf_counter_ns()
        if current:
            t0 = [t0_held[name].matched_blocks(keys) * BLOCK if hot[name] else 0 for name in providers]
        else:
            t0 = [_legacy_matched_blocks(t0_held[name], keys) * BLOCK if hot[name] else 0 for name in providers]
        matched = time.perf_counter_ns()
        folder, folded_now = SlotFolder(), None
        if slotted:
            def slot_state(name: str, held: int) -> CandidateState:
                q = queued[name]
                return CandidateState(name, hot[name], model_bytes=2 << 30, t0_cached_tokens=held,
                                      state_format=FORMAT, queued_requests=0 if q.idle else 1,
                                      queued_prefill_tokens=q.prefill, queued_decode_tokens=q.decode)

            candidates = []
            for i, name in enumerate(providers):
                q = queued[name]
                if path == "after":  # the slots of a replica share its rates here
                    folder.offer(engine_of[name], t0[i], 0.0, q.prefill, q.decode, 0.0, name,  # type: ignore[index]
                                 (name, t0[i]))
                else:
                    candidates.append(slot_state(name, t0[i]))
            if path == "after":
                kept, folded_now = folder.fold()
                candidates += [slot_state(name, held) for name, held in kept]
        else:
            candidates = [CandidateState(name, hot[name], model_bytes=2 << 30, t0_cached_tokens=t0[i],
                                         state_format=FORMAT, queued_prefill_tokens=queued[name], load=queued[name])
                          for i, name in enumerate(providers)]
        built = time.perf_counter_ns()
        request = PlacementRequest(MODEL, len(prompt), matches, tenant="acme", dry_run=True)
        if current:
            decision = place(request, candidates, registry, folded=folded_now)
            chosen = decision.provider
        else:
            chosen = _legacy_place(request, candidates, registry)
        done = time.perf_counter_ns()
        for part, value in (("hash", hashed - start), ("lookup", looked - hashed), ("t0", matched - looked),
                            ("candidates", built - matched), ("place", done - built), ("decision", done - hashed),
                            ("with_hashing", done - start)):
            t[part].append(value / 1000)
        if path == "after" and folded_now is not None:
            folded.append(folded_now.total)
        if path == "after" and len(t["place"]) % render_every == 0:
            rendered = time.perf_counter_ns()
            decision.to_contract()
            render_us.append((time.perf_counter_ns() - rendered) / 1000)
        return chosen, matches  # type: ignore[return-value]

    load_before = os.getloadavg()
    gc_before = sum(s["collections"] for s in gc.get_stats())
    for i, prompt in enumerate(prompts):
        order = ("before", "after") if i % 2 == 0 else ("after", "before")
        out = {path: one(path, prompt) for path in order}
        (before, before_matches), (after, after_matches) = out["before"], out["after"]
        # Both lookups must find the same depth per tier. They may name different entries
        # covering it (the current one restores the smallest); with the same entries, the
        # choice must be the same.
        depth_mismatches += ([(m.tier, m.cached_tokens) for m in before_matches]
                             != [(m.tier, m.cached_tokens) for m in after_matches])
        if before_matches == after_matches:
            compared += 1
            mismatches += before != after
    load_after = os.getloadavg()
    summary: dict = {
        path: {part: {"p50": round(pct(v, 50), 1), "p99": round(pct(v, 99), 1),
                      "mean": round(statistics.fmean(v), 1)} for part, v in by_part.items()}
        for path, by_part in times.items()
    }
    summary["contract_render_us"] = {"p50": round(pct(render_us, 50), 1), "p99": round(pct(render_us, 99), 1)}
    summary["lookup_depth_mismatches"] = depth_mismatches
    summary["choice_mismatches"] = mismatches
    summary["choices_compared"] = compared
    if slotted:
        scored = [len(providers) - f for f in folded]
        summary["candidates_scored_after"] = {"p50": pct(scored, 50), "max": max(scored)}
    summary["loadavg_1m_before_after"] = [round(load_before[0], 2), round(load_after[0], 2)]
    summary["gc_collections"] = sum(s["collections"] for s in gc.get_stats()) - gc_before
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.placement_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", type=int, default=64)
    parser.add_argument("--slots", type=int, default=1, help="parallel slots per provider, each a candidate")
    parser.add_argument("--blocks", type=int, default=1_000_000, help="block rows in the index")
    parser.add_argument("--agents", type=int, default=64)
    parser.add_argument("--decisions", type=int, default=2000, help="prompts; each is decided before and after")
    parser.add_argument("--burn", default="0", help="comma list: measure with this many CPU-burning "
                        "processes in the background (e.g. 0,2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write results as JSON here")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed + 1)

    with tempfile.TemporaryDirectory(prefix="placement-bench-") as tmp:
        started = time.perf_counter()
        cm, legacy, namespace, contexts, pods = build(Path(tmp), args.blocks, args.agents, args.seed)
        print(f"index: {cm.index.block_rows()} block rows, {len(pods)} entries, built in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
        rss = rss_bytes()
        cm.index.probe_map()  # what the first lookup after opening the index pays
        map_build_s, map_rss = cm.index.last_build_s, rss_bytes() - rss
        print(f"probe map: built in {map_build_s:.2f} s, +{map_rss / 2**20:.0f} MiB RSS", file=sys.stderr)
        registry = RateRegistry()
        replicas = [f"p{i}" for i in range(args.providers)]
        slots = {replica: [replica] if args.slots == 1 else [f"{replica}/slot-{j}" for j in range(args.slots)]
                 for replica in replicas}
        providers = [name for replica in replicas for name in slots[replica]]
        hot, queued = {}, {}
        for replica in replicas:  # as a node seeds them from Provider.rates() and calibration
            rates = (rng.uniform(2000, 9000), rng.uniform(20, 60), rng.uniform(1e9, 4e9), rng.uniform(2e8, 1e9),
                     rng.uniform(5e8, 2e9))
            replica_hot, replica_queued = rng.random() < 0.8, rng.randrange(0, 20000)
            for name in slots[replica]:  # a replica's slots share its rates, residency and queue
                registry.set(name, PREFILL, rates[0], "provider")
                registry.set(name, DECODE, rates[1], "provider")
                registry.set(name, restore_quantity("T1"), rates[2], "calibrated")
                registry.set(name, restore_quantity("T2"), rates[3], "calibrated")
                registry.set(name, LOAD, rates[4], "calibrated")
                hot[name], queued[name] = replica_hot, replica_queued
        per_context = 4 if args.slots == 1 else 1
        t0_held = {name: ContextBlocks([k for pod in rng.sample(pods, per_context) for k in block_keys(pod, namespace)])
                   for name in providers}
        if args.slots == 1:
            scenarios = {"queued": queued, "idle": {name: 0 for name in providers}}
            engine_of = None
        else:
            by_replica = {replica: queued[slots[replica][0]] for replica in replicas}
            scenarios = {"queued": slot_queues(slots, by_replica, rng),
                         "idle": slot_queues(slots, {replica: 0 for replica in replicas}, rng)}
            engine_of = {name: replica for replica in replicas for name in slots[replica]}

        # Prompts: half continue a stored pod (a new turn), half start a new pod of a known agent.
        prompts = []
        for _ in range(args.decisions):
            base = rng.choice(pods) if rng.random() < 0.5 else rng.choice(contexts)
            prompts.append(base + tuple(rng.randrange(1 << 17) for _ in range(rng.randint(200, 2000))))
        found = sum(bool(cm.lookup_keys(block_keys(p, namespace), visible_owners(namespace),
                                        state_format=FORMAT).by_tier) for p in prompts)
        result = {
            "providers": args.providers, "slots": args.slots, "candidates": len(providers), "block_rows": cm.index.block_rows(), "entries": len(pods),
            "decisions": len(prompts), "prompts_with_tier_match": found,
            "prompt_tokens_mean": round(statistics.fmean(len(p) for p in prompts), 1),
            "probe_map_build_s": round(map_build_s, 3), "probe_map_rss_mib": round(map_rss / 2**20, 1),
            "cpu": os.cpu_count(), "target_p99_us": 1000, "runs": [],
        }
        for burn in [int(b) for b in args.burn.split(",") if b != ""]:
            burners = Burners(burn)
            try:
                time.sleep(1.0 if burn else 0.0)
                for scenario, queues in scenarios.items():
                    run = measure(cm, legacy, namespace, prompts, providers, registry, t0_held, hot, queues,
                                  render_every=10, engine_of=engine_of)
                    run.update(scenario=scenario, background_burners=burn)
                    result["runs"].append(run)
                    print(f"burn {burn} {scenario}: decision p50/p99 before "
                          f"{run['before']['decision']['p50']:.0f}/{run['before']['decision']['p99']:.0f} us, after "
                          f"{run['after']['decision']['p50']:.0f}/{run['after']['decision']['p99']:.0f} us; "
                          f"load {run['loadavg_1m_before_after']}", file=sys.stderr)
            finally:
                burners.stop()
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

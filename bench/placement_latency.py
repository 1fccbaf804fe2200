"""Benchmark 5 (placement half): decision latency with 64 providers and 1M indexed blocks.

    python -m bench.placement_latency                 # 64 providers, ~1M block rows, 2000 decisions
    python -m bench.placement_latency --providers 8 --blocks 100000

The index is a real SQLite CacheIndex (WAL, in a temporary state dir) filled
with ~1M block rows: pods of agents whose 2-8K-token contexts are shared,
each entry indexed under every block it covers. Entries are inserted through
CacheIndex.insert in bulk (one transaction) without writing state files: a
placement only reads the index, and state files are touched by a restore, not
by a decision. Each provider holds a few pods' contexts in T0 (ContextBlocks).

One timed decision = what a node does per request before running it:
block keys of the prompt (2-16K tokens), the T1/T2 index lookup, T0 matching
on every provider, building 64 candidate snapshots, and `place`. The prompt's
block keys are reported apart too: a node computes them once per turn and
needs them again to save the state afterwards. Rendering the
PlacementDecision contract (pydantic, for the API and receipts) is timed
separately: it is presentation, done once for the chosen run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from nodeagent.kvcache.blocks import Namespace, block_keys
from nodeagent.kvcache.index import EntryRow
from nodeagent.kvcache.manager import CacheManager, PrefixMatch, visible_owners
from nodeagent.kvcache.tiers import TierStore
from nodeagent.scheduler.placement import CandidateState, ContextBlocks, PlacementRequest, TierMatch, place
from nodeagent.scheduler.rates import DECODE, LOAD, PREFILL, RateRegistry, restore_quantity
from nodeagent.store import connect

MODEL = "sha256:" + "1" * 64
FORMAT = "llama_cpp_python"
BLOCK = 64


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def build(state_dir: Path, target_blocks: int, agents: int, seed: int):
    rng = random.Random(seed)
    cm = CacheManager(connect(state_dir / "state.db"), TierStore("T1", state_dir / "t1", 1 << 40),
                      TierStore("T2", state_dir / "t2", 1 << 40))
    namespace = Namespace(MODEL, "tenant", "acme")
    contexts = [[rng.randrange(1 << 17) for _ in range(rng.randint(2048, 8192))] for _ in range(agents)]
    pods: list[list[int]] = []
    rows = 0
    now = time.time()
    conn = cm.index.conn
    conn.execute("BEGIN IMMEDIATE")
    while rows < target_blocks:
        tokens = contexts[rng.randrange(agents)] + [rng.randrange(1 << 17) for _ in range(rng.randint(256, 8192))]
        keys = block_keys(tokens, namespace)
        tier = "T1" if rng.random() < 0.3 else "T2"
        entry_id = uuid.uuid4().hex
        cm.index.insert(EntryRow(
            id=entry_id, deepest_key=keys[-1], model_digest=MODEL, scope="tenant", owner="acme", tenant="acme",
            state_format=FORMAT, n_tokens=len(tokens), n_blocks=len(keys), block_tokens=BLOCK, tier=tier,
            file=str(cm.stores[tier].path(entry_id)), bytes=len(tokens) * 36_864, content_digest="sha256:" + "0" * 64,
            hits=0, created_at=now, last_used_at=now, pinned=False, priority=rng.random()), keys)
        pods.append(tokens)
        rows += len(keys)
    conn.execute("COMMIT")
    return cm, namespace, contexts, pods


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.placement_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--providers", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=1_000_000, help="block rows in the index")
    parser.add_argument("--agents", type=int, default=64)
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write results as JSON here")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed + 1)

    with tempfile.TemporaryDirectory(prefix="placement-bench-") as tmp:
        started = time.perf_counter()
        cm, namespace, contexts, pods = build(Path(tmp), args.blocks, args.agents, args.seed)
        print(f"index: {cm.index.block_rows()} block rows, {len(pods)} entries, built in "
              f"{time.perf_counter() - started:.1f} s", file=sys.stderr)
        owners = visible_owners(namespace)
        registry = RateRegistry()
        providers = [f"p{i}" for i in range(args.providers)]
        for name in providers:  # as a node seeds them from Provider.rates() and calibration
            registry.set(name, PREFILL, rng.uniform(2000, 9000), "provider")
            registry.set(name, DECODE, rng.uniform(20, 60), "provider")
            registry.set(name, restore_quantity("T1"), rng.uniform(1e9, 4e9), "calibrated")
            registry.set(name, restore_quantity("T2"), rng.uniform(2e8, 1e9), "calibrated")
            registry.set(name, LOAD, rng.uniform(5e8, 2e9), "calibrated")
        t0 = {name: ContextBlocks([k for pod in rng.sample(pods, 4) for k in block_keys(pod, namespace)])
              for name in providers}
        hot = {name: rng.random() < 0.8 for name in providers}
        queued = {name: rng.randrange(0, 20000) for name in providers}

        # Prompts: half continue a stored pod (a new turn), half start a new pod of a known agent.
        prompts = []
        for _ in range(args.decisions):
            base = rng.choice(pods) if rng.random() < 0.5 else rng.choice(contexts)
            prompts.append(base + [rng.randrange(1 << 17) for _ in range(rng.randint(200, 2000))])

        timings, contract_us, lookup_us, hashing_us, found = [], [], [], [], 0
        for i, prompt in enumerate(prompts):
            start = time.perf_counter_ns()
            keys = block_keys(prompt, namespace)
            looked = time.perf_counter_ns()
            hashing_us.append((looked - start) / 1000)
            lookup = cm.lookup_keys(keys, owners, state_format=FORMAT, prompt_tokens=len(prompt))
            lookup_us.append((time.perf_counter_ns() - looked) / 1000)
            matches = tuple(TierMatch(m.tier, m.cached_tokens, m.bytes, FORMAT, m.entry_id)
                            for m in lookup.by_tier.values())
            candidates = [CandidateState(name, hot[name], model_bytes=2 << 30,
                                         t0_cached_tokens=t0[name].matched_blocks(keys) * BLOCK if hot[name] else 0,
                                         state_format=FORMAT, queued_prefill_tokens=queued[name], load=queued[name])
                          for name in providers]
            decision = place(PlacementRequest(MODEL, len(prompt), matches, tenant="acme", dry_run=True),
                             candidates, registry)
            timings.append((time.perf_counter_ns() - start) / 1000)
            found += bool(matches)
            if i % 10 == 0:
                rendered = time.perf_counter_ns()
                decision.to_contract()
                contract_us.append((time.perf_counter_ns() - rendered) / 1000)
        result = {
            "providers": args.providers, "block_rows": cm.index.block_rows(), "entries": len(pods),
            "decisions": len(timings), "prompts_with_tier_match": found,
            "decision_us": {"p50": pct(timings, 50), "p99": pct(timings, 99), "mean": statistics.fmean(timings)},
            "decision_after_hashing_us": {"p50": pct([t - h for t, h in zip(timings, hashing_us)], 50),
                                          "p99": pct([t - h for t, h in zip(timings, hashing_us)], 99)},
            "prompt_hashing_us": {"p50": pct(hashing_us, 50), "p99": pct(hashing_us, 99)},
            "prompt_tokens_mean": statistics.fmean(len(p) for p in prompts),
            "index_lookup_us": {"p50": pct(lookup_us, 50), "p99": pct(lookup_us, 99)},
            "contract_render_us": {"p50": pct(contract_us, 50), "p99": pct(contract_us, 99)},
            "target_p99_us": 1000, "cpu": os.cpu_count(),
        }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""An offline replica of the sweep's simulated fleet, for fast what-ifs on placement rules.

    python -m bench.sweep_offline                              # ours, ours-guard, llm-d on 9 cells x 3 seeds
    python -m bench.sweep_offline --arms ours --work-weight 0  # the placement without the work term

The same in-process routers as bench.routing (`Ours`, `LlmD`, ...) choose over the
same worker model as bench.simworker (block LRU per worker, one FIFO prefill engine,
batched decode), but on an event clock instead of HTTP in scaled real time: a session's
turn is sent at its arrival time or when its previous turn completes, whichever is
later (as bench.routing's client sends a session's requests), and a closed-loop turn
a think time after that. Rates are exact (no calibration), no wall-clock noise, a
cell-seed in about a second. It is a replica, not the measurement: numbers differ
from the live sweep (bench.sweep), which is what the README reports as results; it
served to compare placement rules before running them live.
"""

from __future__ import annotations

import argparse
import heapq
import sys

from bench import routing
from bench.oracle import capped_hit, keys_of
from bench.simworker import BlockLRU
from bench.traces import Cell, Trace, workload_trace
from nodeagent.scheduler import placement
from nodeagent.scheduler.rates import DECODE, PREFILL, RateRegistry

CELLS = (Cell(0.3, 1, "public", "poisson"), Cell(0.6, 2, "session", "poisson"), Cell(0.9, 2, "public", "bursts"),
         Cell(0.6, 4, "private", "closed"), Cell(0.9, 4, "compaction", "poisson"), Cell(0.9, 0.5, "session", "bursts"),
         Cell(0.9, 2, "private", "poisson"), Cell(0.6, 4, "public", "poisson"), Cell(0.9, 2, "public", "poisson"))


def router_for(arm: str, trace: Trace) -> routing.Router:
    f = trace.params["fleet"]
    n, cap = f["workers"], f["capacity_blocks"]
    if arm == "ours" or arm.startswith("ours-guard"):
        registry = RateRegistry()
        for i in range(n):
            registry.set(f"w{i}", PREFILL, f["prefill_tps"], "calibrated")
            registry.set(f"w{i}", DECODE, f["decode_tps"], "calibrated")
        return routing.Ours(n, 0, cap, routing.arm_guard(arm, placement.LoadGuard()), registry, set())
    if arm == "llm-d":
        return routing.LlmD(n, 0, cap, f["prefill_tps"])
    return {"round_robin": routing.RoundRobin, "least_loaded": routing.LeastLoaded,
            "consistent_hash": routing.ConsistentHash}[arm](n, 0)


def simulate(trace: Trace, arm: str) -> dict:
    """TTFT of every request and the token hit rate for one arm (event-driven)."""
    f = trace.params["fleet"]
    router = router_for(arm, trace)
    lru = [BlockLRU(f["capacity_blocks"]) for _ in range(f["workers"])]
    free = [0.0] * f["workers"]
    ttft: list[float] = []
    hit = total = 0
    chains: dict[str, list] = {}
    for r in trace.requests:
        chains.setdefault(r.session, []).append(r)
    events: list[tuple] = []  # (time, kind 0 = done / 1 = send, seq, payload)
    seq = 0
    for chain in chains.values():
        heapq.heappush(events, (chain[0].arrival_s, 1, seq, (chain, 0)))
        seq += 1
    while events:
        now, kind, _, payload = heapq.heappop(events)
        if kind == 0:
            worker, chain, j = payload
            router.in_flight[worker] -= 1
            router.done(worker, chain[j], {})
            if j + 1 < len(chain):
                nxt = chain[j + 1]
                at = max(nxt.arrival_s, now) if nxt.after is None else now + nxt.think_s
                heapq.heappush(events, (at, 1, seq, (chain, j + 1)))
                seq += 1
            continue
        chain, j = payload
        req = chain[j]
        keys = keys_of(req.tokens)
        worker = router.choose(req, keys, now)
        router.in_flight[worker] += 1
        cached = capped_hit(lru[worker].matched_blocks(keys), len(req.tokens))
        lru[worker].touch(keys)
        free[worker] = max(now, free[worker]) + (len(req.tokens) - cached) / f["prefill_tps"]
        ttft.append(free[worker] - now)
        hit += cached
        total += len(req.tokens)
        heapq.heappush(events, (free[worker] + req.output_tokens / f["decode_tps"], 0, seq, (worker, chain, j)))
        seq += 1
    return {"ttft": ttft, "hit_rate": hit / total if total else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep_offline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="ours,ours-guard,llm-d")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--work-weight", type=float, default=None,
                        help="fix place()'s work weight (default: its own, the busy fraction)")
    args = parser.parse_args(argv)
    if args.work_weight is not None:
        weight = args.work_weight
        original = placement.place

        def place_fixed(request, candidates, registry, guard=None, work_weight=None):
            return original(request, candidates, registry, guard, weight)

        routing.place = place_fixed  # the routers call place through bench.routing's import
    arms = args.arms.split(",")
    print("| cell | " + " | ".join(f"{a} p50 / p90" for a in arms) + " |")
    print("|" + "---|" * (len(arms) + 1))
    for cell in CELLS:
        row = {a: [] for a in arms}
        for seed in range(args.seeds):
            trace = workload_trace(cell, seed=seed, scale=args.scale)
            for arm in arms:
                out = simulate(trace, arm)
                row[arm].append((routing.pct(out["ttft"], 50), routing.pct(out["ttft"], 90)))
        print(f"| {cell.name} | " + " | ".join(
            f"{sum(p for p, _ in v) / len(v):.2f} / {sum(q for _, q in v) / len(v):.2f}" for v in row.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

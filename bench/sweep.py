"""Workload sweep: every routing arm over a grid of trace-family cells, a table per cell.

    python -m bench.sweep                          # the quick grid (QUICK), 3 seeds, scale 0.2
    python -m bench.sweep --full                   # the whole grid: 3 loads x 4 pressures x 4 sharing
                                                   # x 3 arrivals = 144 cells (hours on a small box)
    python -m bench.sweep --cells load0.9-ws2x-private-poisson --seeds 5
    python -m bench.sweep --save-traces DIR        # also save each trace; replay one with
                                                   # python -m bench.routing --trace-file DIR/<cell>-s<seed>.json

Cells come from bench.traces.workload_trace (offered load over the fleet's prefill
capacity, working set over the fleet's device KV, sharing structure, arrivals).
Per cell and seed, every arm runs the same trace in front of the same simulated
workers (bench.routing.run_trace); then, per cell, percentiles are pooled over the
seeds (all requests of all seeds together), goodput is the share of all requests
with TTFT <= the SLO, and hit rates are token-weighted (sum cached / sum of the
bound's hit tokens for xO1, xO2).

Checks printed per cell, against the best peer per metric (peers: every arm that
is not ours: sglang-cache_aware, llm-d, consistent_hash, least_loaded, round_robin):
``ours`` p50 and p90 <= 1.0x the best peer's; in loaded cache-bound cells (load >=
0.6, pressure >= 2) ``ours`` p90 <= 0.7x and ``ours+T1`` p90 <= 0.5x.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench import routing
from bench.simworker import WorkerConfig
from bench.traces import Cell, Fleet, grid, workload_trace
from nodeagent.scheduler.placement import LoadGuard

# Loaded cache-bound cells are the hard targets; the quick grid holds four of
# them and one of each other regime, and every sharing structure and arrival process.
QUICK = (
    Cell(0.3, 1.0, "public", "poisson"),
    Cell(0.9, 0.5, "session", "bursts"),
    Cell(0.6, 2.0, "session", "poisson"),
    Cell(0.9, 2.0, "public", "bursts"),
    Cell(0.6, 4.0, "private", "closed"),
    Cell(0.9, 4.0, "compaction", "poisson"),
)
ARMS = ("ours", "ours-guard", "ours+T1", "llm-d", "sglang-cache_aware", "consistent_hash", "least_loaded",
        "round_robin")


def is_ours(arm: str) -> bool:
    """Our arms (the product and its variants); every other arm is a peer."""
    return arm == "ours" or arm.startswith(("ours-", "ours+"))


def parse_cell(name: str) -> Cell:
    """Inverse of `Cell.name` (load0.9-ws2x-private-poisson)."""
    load, ws, sharing, arrivals = name.split("-")
    return Cell(float(load.removeprefix("load")), float(ws.removeprefix("ws").removesuffix("x")), sharing, arrivals)


def pct(values: list[float], q: float) -> float | None:
    return routing.pct(values, q)


def pool(runs: list[dict]) -> dict:
    """One arm's per-seed summaries -> the cell's pooled numbers."""
    ttfts = [t for r in runs for t in r["ttfts"]]
    requests = sum(r["requests"] for r in runs)
    slo = runs[0]["slo_s"]
    cached = sum(r["cached_tokens"] for r in runs)
    return {
        "arm": runs[0]["arm"], "seeds": len(runs), "requests": requests,
        "errors": sum(r["errors"] for r in runs),
        "ttft_p50_s": pct(ttfts, 50), "ttft_p90_s": pct(ttfts, 90), "ttft_p99_s": pct(ttfts, 99),
        "goodput": sum(1 for t in ttfts if t <= slo) / requests if requests else None, "slo_s": slo,
        "hit_rate": cached / max(1, sum(r["prompt_tokens"] for r in runs)),
        "frac_o1": cached / max(1, sum(r["o1_tokens"] for r in runs)),
        "frac_o2": cached / max(1, sum(r["o2_tokens"] for r in runs)),
        "restored_rate": sum(r["restored_rate"] * r["prompt_tokens"] for r in runs)
        / max(1, sum(r["prompt_tokens"] for r in runs)),
        "load_max_over_mean": max((r["load_max_over_mean"] or 0) for r in runs),
    }


def loaded_cache_bound(cell: Cell) -> bool:
    return cell.load >= 0.6 and cell.pressure >= 2


def checks(cell: Cell, pooled: dict[str, dict]) -> dict:
    """Ratios to the best peer per metric and whether each acceptance point holds."""
    peers = {a: s for a, s in pooled.items() if not is_ours(a)}
    out: dict = {"cell": cell.name, "loaded_cache_bound": loaded_cache_bound(cell)}
    if not peers:
        return out
    for q in ("p50", "p90"):
        key = f"ttft_{q}_s"
        best = min(peers.values(), key=lambda s: s[key])
        out[f"best_peer_{q}"] = (best["arm"], best[key])
        for arm in [a for a in pooled if is_ours(a)]:
            if best[key]:
                out[f"{arm}/{q}"] = pooled[arm][key] / best[key]
    ours = "ours"
    if f"{ours}/p50" in out:
        out["ours_le_1x"] = out[f"{ours}/p50"] <= 1.0 and out[f"{ours}/p90"] <= 1.0
    if loaded_cache_bound(cell):
        if f"{ours}/p90" in out:
            out["ours_p90_le_0.7x"] = out[f"{ours}/p90"] <= 0.7
        if "ours+T1/p90" in out:
            out["system_p90_le_0.5x"] = out["ours+T1/p90"] <= 0.5
    return out


def cell_table(pooled: dict[str, dict]) -> str:
    head = ("arm", "ttft p50", "p90", "p99", "goodput", "hit", "from T1", "xO1", "xO2", "max/mean", "errors")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    rows = [(s["arm"], fmt(s["ttft_p50_s"], ".2f"), fmt(s["ttft_p90_s"], ".2f"), fmt(s["ttft_p99_s"], ".2f"),
             fmt(s["goodput"], ".3f"), fmt(s["hit_rate"], ".3f"), fmt(s["restored_rate"] or None, ".3f"),
             fmt(s["frac_o1"], ".3f"), fmt(s["frac_o2"], ".3f"), fmt(s["load_max_over_mean"], ".2f"),
             str(s["errors"])) for s in pooled.values()]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(head)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(widths[i]) for i, c in enumerate(r)) + " |" for r in rows]
    return "\n".join(lines)


def check_lines(c: dict) -> list[str]:
    lines = []
    for q in ("p50", "p90"):
        if f"best_peer_{q}" in c:
            arm, value = c[f"best_peer_{q}"]
            ratios = ", ".join(f"{k.rsplit('/', 1)[0]} {v:.2f}x" for k, v in c.items() if k.endswith(f"/{q}"))
            lines.append(f"best peer {q}: {arm} {value:.2f} s; {ratios}")
    verdict = lambda v: "holds" if v else "misses"  # noqa: E731
    if "ours_le_1x" in c:
        lines.append(f"ours p50 and p90 <= 1.0x best peer -> {verdict(c['ours_le_1x'])}")
    if "ours_p90_le_0.7x" in c:
        lines.append(f"loaded cache-bound: ours p90 <= 0.7x best peer -> {verdict(c['ours_p90_le_0.7x'])}")
    if "system_p90_le_0.5x" in c:
        lines.append(f"loaded cache-bound: ours+T1 p90 <= 0.5x best peer -> {verdict(c['system_p90_le_0.5x'])}")
    return lines


def summary_table(all_checks: list[dict]) -> str:
    ours = [k.rsplit("/", 1)[0] for k in (all_checks[0] if all_checks else {}) if k.endswith("/p90")]
    head = ["cell", "best peer p50", "ours/best p50", "best peer p90"] + [f"{a}/best p90" for a in ours]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in all_checks:
        p50 = c.get("best_peer_p50", ("-", 0.0))
        p90 = c.get("best_peer_p90", ("-", 0.0))
        cells = [c["cell"] + (" *" if c["loaded_cache_bound"] else ""), f"{p50[0]} {p50[1]:.2f}",
                 f"{c['ours/p50']:.2f}" if "ours/p50" in c else "-", f"{p90[0]} {p90[1]:.2f}"]
        cells += [f"{c[a + '/p90']:.2f}" if a + "/p90" in c else "-" for a in ours]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict:
    sys.setswitchinterval(0.0005)  # as bench.routing: the T1 saver thread must not hold up routing
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    if args.cells:
        cells = [parse_cell(n) for n in args.cells.split(",")]
    else:
        cells = grid() if args.full else list(QUICK)
    arms = [a for a in args.arms.split(",") if a]
    note = routing.sglang_available() if any(a in routing.SGLANG for a in arms) else None
    if note:
        print(f"skipping sglang-router arms: {note}", file=sys.stderr)
        arms = [a for a in arms if a not in routing.SGLANG]
    fleet = Fleet(workers=args.workers, speedup=args.speedup)
    restore_bps = 0.0
    if any(a in routing.TIERED for a in arms):
        restore_bps = args.restore_bps or routing.calibrate_read_throughput(routing.tmpfs_dir(), 64 << 20)
    if args.save_traces:
        Path(args.save_traces).mkdir(parents=True, exist_ok=True)
    workers_proc, workers = routing.start_workers(fleet.workers, WorkerConfig(), log_dir)
    results: dict = {"fleet": asdict(fleet), "seeds": args.seeds, "scale": args.scale, "slo_s": args.slo_s,
                     "arms": arms, "sglang": note or "ran", "restore_bytes_per_s": restore_bps, "cells": {}}
    merged: dict[str, dict] = {}
    for path in args.merge:
        earlier = json.loads(Path(path).read_text())
        if (earlier["seeds"], earlier["scale"], earlier["fleet"]) != (args.seeds, args.scale, asdict(fleet)):
            raise SystemExit(f"--merge {path}: other seeds, scale or fleet; its cells are not these traces")
        for name, data in earlier["cells"].items():
            merged.setdefault(name, {}).update(data["pooled"])
    started = time.monotonic()
    try:
        for cell in cells:
            per_arm: dict[str, list[dict]] = {}
            for seed in range(args.seed0, args.seed0 + args.seeds):
                trace = workload_trace(cell, seed=seed, scale=args.scale, fleet=fleet)
                if args.save_traces:
                    trace.save(Path(args.save_traces) / f"{cell.name}-s{seed}.json")
                f = trace.params["fleet"]
                config = WorkerConfig(f["capacity_blocks"], f["prefill_tps"], f["decode_tps"], f["speedup"])
                t1 = {"ours+T1": 4 * fleet.workers * f["capacity_blocks"] * 64,
                      "ours+T1-5GB": routing.LMCACHE_DEFAULT_CPU_BYTES // config.kv_bytes_per_token}
                print(f"== {cell.name} seed {seed}: {len(trace.requests)} requests, span {trace.params['span_s']} s, "
                      f"capacity {f['capacity_blocks']} blocks/worker ({time.monotonic() - started:.0f} s)",
                      file=sys.stderr)
                for summary in routing.run_trace(trace, arms, workers, config, seed=seed, guard=LoadGuard(rel=args.guard_rel),
                                                 timeout_s=args.timeout, log_dir=log_dir, restore_bps=restore_bps,
                                                 t1_tokens=t1, slo_s=args.slo_s, label=f"{cell.name}-s{seed}"):
                    per_arm.setdefault(summary["arm"], []).append(summary)
            pooled = {arm: pool(runs) for arm, runs in per_arm.items()}
            for arm, data in merged.get(cell.name, {}).items():
                pooled.setdefault(arm, data)  # arms of an earlier run of the same cells (--merge)
            c = checks(cell, pooled)
            results["cells"][cell.name] = {
                "cell": asdict(cell), "pooled": pooled, "checks": c,
                "per_seed": {arm: [{k: v for k, v in r.items() if k != "ttfts"} for r in runs]
                             for arm, runs in per_arm.items()}}
            print(f"\n### {cell.name}{' (loaded, cache-bound)' if loaded_cache_bound(cell) else ''}: "
                  f"{args.seeds} seeds pooled, goodput at TTFT <= {args.slo_s:g} s\n")
            print(cell_table(pooled))
            print("\n" + "\n".join(check_lines(c)), flush=True)
            if args.out:  # after every cell: a crash later keeps what was measured
                from nodeagent.fsutil import atomic_write_text

                atomic_write_text(args.out, json.dumps(results, indent=1))
    finally:
        workers_proc.stop()
    results["wall_s"] = time.monotonic() - started
    print("\n### summary (ratios to the best peer per metric; * = loaded cache-bound)\n")
    print(summary_table([d["checks"] for d in results["cells"].values()]))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the whole grid instead of the quick one")
    parser.add_argument("--cells", default="", help="comma list of cell names (Cell.name), instead of a grid")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed0", type=int, default=0, help="first seed (held-out runs use others)")
    parser.add_argument("--scale", type=float, default=0.2, help="trace size (1.0: ~160 s of offered work)")
    parser.add_argument("--workers", type=int, default=Fleet.workers)
    parser.add_argument("--speedup", type=float, default=Fleet.speedup)
    parser.add_argument("--slo-s", type=float, default=routing.DEFAULT_SLO_S, help="TTFT SLO for goodput")
    parser.add_argument("--guard-rel", type=float, default=LoadGuard.rel, help="the ours-guard arm's guard")
    parser.add_argument("--restore-bps", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=120.0, help="wall-clock bound per arm run")
    parser.add_argument("--save-traces", default="", metavar="DIR")
    parser.add_argument("--merge", action="append", default=[], metavar="RESULTS",
                        help="add the pooled arms of an earlier --out of the same cells, seeds and scale "
                        "(e.g. run one new variant against the peers already measured)")
    parser.add_argument("--log-dir", default=os.environ.get("TMPDIR", "/tmp") + "/agent-machine-sweep")
    parser.add_argument("--out", help="write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    results = run(args)
    if args.out:
        from nodeagent.fsutil import atomic_write_text

        atomic_write_text(args.out, json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

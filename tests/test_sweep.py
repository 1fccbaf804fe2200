"""The workload sweep: trace family, llm-d scorer, --trace-file replay, per-cell tables."""

import json
import random

import pytest

from bench import llmd_scorer, routing, sweep
from bench.llmd_scorer import EndpointState
from bench.oracle import keys_of, o2
from bench.traces import Cell, Fleet, Trace, distinct_blocks, workload_trace


# ------------------------------------------------------------------ llm-d scorer
def test_prefix_score_is_min_max_over_endpoints_holding_the_first_block_and_zero_elsewhere():
    assert llmd_scorer.prefix_scores([0, 4, 8, 6]) == [0.0, 0.0, 1.0, 0.5]
    assert llmd_scorer.prefix_scores([0, 3, 0]) == [0.0, 1.0, 0.0]  # one holder: min == max -> 1
    assert llmd_scorer.prefix_scores([5, 5]) == [1.0, 1.0]
    assert llmd_scorer.prefix_scores([0, 0]) == [0.0, 0.0]


def test_queue_and_kv_utilisation_scores_follow_the_gateway_formulas():
    assert llmd_scorer.queue_scores([2, 0, 4]) == [0.5, 1.0, 0.0]
    assert llmd_scorer.queue_scores([3, 3]) == [1.0, 1.0]
    assert llmd_scorer.kv_utilization_scores([0.25, 1.5, -1.0]) == [0.75, 0.0, 1.0]


def test_pick_takes_the_highest_weighted_sum_with_weights_two_one_one():
    assert llmd_scorer.WEIGHTS == {"prefix": 2.0, "kv_utilization": 1.0, "queue": 1.0}
    rng = random.Random(0)
    # A: full prefix, longest queue, 90% KV: 2*1 + 0.1 + 0 = 2.1; B: nothing cached, idle: 0 + 1 + 1 = 2.0.
    assert llmd_scorer.pick([EndpointState(10, 3, 0.9), EndpointState(0, 0, 0.0)], rng) == 0
    # A shorter match scores 0 (min-max): B wins on prefix despite its queue, 2 + 0.4 + 0 = 2.4 vs 0 + 1 + 1.
    assert llmd_scorer.pick([EndpointState(5, 0, 0.0), EndpointState(10, 2, 0.6)], rng) == 1
    # Cache-less and equal: a random tie-break over all of them.
    states = [EndpointState(0, 0, 0.0)] * 3
    assert {llmd_scorer.pick(states, rng) for _ in range(60)} == {0, 1, 2}
    assert llmd_scorer.totals([EndpointState(10, 3, 0.9), EndpointState(0, 0, 0.0)]) == pytest.approx([2.1, 2.0])


# ------------------------------------------------------------------ trace family
def test_a_family_trace_is_sized_to_its_cell_and_records_its_fleet():
    cell = Cell(0.6, 2.0, "private", "poisson")
    fleet = Fleet()
    trace = workload_trace(cell, seed=3, scale=0.03, fleet=fleet)
    f = trace.params["fleet"]
    assert trace.params["cell"]["pressure"] == 2.0 and f["workers"] == fleet.workers
    # Working set = pressure x the fleet's device KV.
    assert distinct_blocks(trace) / (f["capacity_blocks"] * f["workers"]) == pytest.approx(2.0, rel=0.05)
    # O2 misses arrive at `load` x the fleet's prefill capacity over the span.
    seqs = [r.tokens for r in trace.nominal_order()]
    misses = trace.prompt_tokens() - o2(seqs, f["capacity_blocks"] * f["workers"],
                                        keys=[keys_of(s) for s in seqs]).hit_tokens
    assert misses / (trace.params["span_s"] * f["workers"] * f["prefill_tps"]) == pytest.approx(0.6, rel=0.01)
    assert trace.requests == workload_trace(cell, seed=3, scale=0.03, fleet=fleet).requests  # seeded


def test_closed_loop_turns_follow_their_predecessor_and_compaction_resets_history():
    closed = workload_trace(Cell(0.3, 1.0, "session", "closed"), seed=0, scale=0.02)
    later = [r for r in closed.requests if not r.rid.endswith("-t0")]
    assert later and all(r.after is not None and r.think_s >= 0 for r in later)
    compacted = workload_trace(Cell(0.3, 1.0, "compaction", "poisson"), seed=0, scale=0.02)
    by_session: dict[str, list] = {}
    for r in compacted.requests:
        by_session.setdefault(r.session, []).append(r)
    turns = max(by_session.values(), key=len)
    turns.sort(key=lambda r: int(r.rid.split("-t")[1]))
    assert len(turns) > 4
    # Turn 4 follows a compaction: it does not extend turn 3's prompt; turn 3 extends turn 2's.
    assert turns[3].tokens[:len(turns[2].tokens)] == turns[2].tokens
    assert turns[4].tokens[:len(turns[3].tokens)] != turns[3].tokens


# ------------------------------------------------------------------ replay and sweep
def test_trace_file_round_trips_and_runs_on_the_fleet_it_records(tmp_path):
    trace = workload_trace(Cell(0.3, 1.0, "public", "poisson"), seed=1, scale=0.02, fleet=Fleet(workers=2))
    path = tmp_path / "held-out.json"
    trace.save(path)
    loaded = Trace.load(path)
    assert loaded.requests == trace.requests and loaded.params == trace.params and loaded.name == trace.name
    out = tmp_path / "results.json"
    assert routing.main(["--trace-file", str(path), "--arms", "ours,llm-d,round_robin", "--speedup", "20",
                         "--timeout", "60", "--log-dir", str(tmp_path / "logs"), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["workers"] == 2
    (data,) = results["traces"].values()
    assert data["config"]["capacity_blocks"] == trace.params["fleet"]["capacity_blocks"]
    assert data["summary"]["requests"] == len(trace.requests)
    for arm in data["arms"]:
        assert arm["errors"] == 0 and arm["served"] == len(trace.requests)
        assert 0.0 <= arm["goodput"] <= 1.0 and arm["ttft_p99_s"] >= arm["ttft_p50_s"]


def test_sweep_prints_a_table_per_cell_with_the_required_columns(tmp_path, capsys):
    cells = ["load0.3-ws1x-public-poisson", "load0.6-ws2x-session-closed"]
    out = tmp_path / "sweep.json"
    assert sweep.main(["--cells", ",".join(cells), "--seeds", "1", "--scale", "0.02", "--workers", "2",
                       "--arms", "ours,llm-d,round_robin", "--speedup", "20", "--log-dir", str(tmp_path / "logs"),
                       "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in cells:
        assert f"### {name}" in text
    header = next(line for line in text.splitlines() if line.startswith("| arm"))
    for column in ("ttft p50", "p90", "p99", "goodput", "xO1", "xO2"):
        assert column in header
    results = json.loads(out.read_text())
    assert list(results["cells"]) == cells
    second = results["cells"][cells[1]]
    assert second["checks"]["loaded_cache_bound"] is True
    assert set(second["pooled"]) == {"ours", "llm-d", "round_robin"}
    assert second["checks"]["ours/p90"] == pytest.approx(
        second["pooled"]["ours"]["ttft_p90_s"] / min(second["pooled"][a]["ttft_p90_s"] for a in ("llm-d", "round_robin")))
    assert "ours p50 and p90 <= 1.0x best peer" in text and "### summary" in text


def test_parse_cell_inverts_cell_name():
    cell = Cell(0.9, 0.5, "compaction", "bursts")
    assert sweep.parse_cell(cell.name) == cell

"""Benchmarks 4 and 5 (tiers) on the tiny model: every arm runs on real llama.cpp, real numbers out,
nothing left behind."""

import os
import time
from pathlib import Path

import pytest

from bench import e2e, tiers
from bench.http_worker import BadRequest, Conversation, chat_messages, split_messages
from nodeagent.contracts.pod import ContextSegment, Message

pytestmark = pytest.mark.llama


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_chat_messages_round_trip_through_the_workers_split():
    conversation = Conversation(
        (ContextSegment(role="system", text="be brief"), ContextSegment(role="tools", text="tool list")),
        (Message(role="user", content="task"), Message(role="assistant", content="call"),
         Message(role="tool", content="result")))
    sent = chat_messages(conversation)
    assert sent[3]["role"] == "assistant" and sent[4]["tool_call_id"]
    back = split_messages(sent)
    assert [(s.role, s.text) for s in back.segments] == [("system", "be brief"), ("tools", "tool list")]
    assert back.messages == conversation.messages
    with pytest.raises(BadRequest, match=r"messages\[0\]\.name"):
        split_messages([{"role": "system", "name": "secrets", "content": "x"}, {"role": "user", "content": "y"}])
    with pytest.raises(BadRequest, match="at least one"):
        split_messages([{"role": "system", "content": "x"}])


@pytest.mark.slow
def test_every_arm_serves_the_same_trace_and_reports_real_numbers(tiny_model_path, tmp_path):
    from bench.routing import sglang_available

    if sglang_available():
        pytest.skip(sglang_available())
    trace = e2e.TraceParams(seed=0, agents=1, pods=2, turns=(2, 2), context_len=(200, 300), task_len=(10, 20),
                            tool_result_len=(20, 40), reply_len=(4, 8), think_mean_s=0.02)
    params = e2e.RunParams(n_ctx=1024, t1_root=str(tmp_path), arm_timeout=120, request_timeout=60)
    result = e2e.run(trace, params, e2e.ARMS, Path(tiny_model_path), tmp_path / "logs", tmp_path / "work")

    summaries = result["summaries"]
    assert set(summaries) == set(e2e.ARMS)
    for arm, s in summaries.items():
        assert (s["ok"], s["errors"]) == (4, 0), (arm, s["error_sample"])
        assert s["prompt_tokens"] > 4 * 200
        assert 0 < s["ttft_p50_s"] <= s["ttft_p90_s"] < 60
    assert result["prompt_tokens"]["identical"], result["prompt_tokens"]
    for arm, records in result["records"].items():
        for r in records:
            assert 0 < r["ttft_provider_s"] <= r["ttft_e2e_s"] + 1e-3, (arm, r)
            assert r["prompt_tokens"] == r["cached_tokens"] + r["evaluated_tokens"], (arm, r)

    # Ours: each pod's second turn reuses its own first turn (live context or a
    # restored state), so it evaluates only what is new beyond the cached blocks.
    ours = {r["rid"]: r for r in result["records"]["ours"]}
    for pod in ("p0", "p1"):
        first, second = ours[f"{pod}-t0"], ours[f"{pod}-t1"]
        assert second["tier"] in ("T0", "T1"), second
        assert second["cached_tokens"] >= first["prompt_tokens"] // 64 * 64, (first, second)
    assert summaries["ours"]["hit_rate"] > 0.3
    info = result["info"]["ours"][0]  # one entry per round
    # Four turns save four states, except that p0 and p1 open with the same prompt: when
    # their first turns run at once on the two providers, both save the same state and
    # the cache keeps one (a duplicate prefix is not stored twice).
    assert info["cache"]["stored"] in (3, 4) and info["cache"]["corrupt"] == 0
    assert {q for rates in info["seeded_rates"].values() for q in rates} >= {"prefill_tokens_per_s"}

    # Round-robin alternates; sglang-router sat in front of the same kind of workers.
    assert summaries["round_robin"]["per_worker"] == {"w0": 2, "w1": 2}
    assert result["info"]["sglang-cache_aware"][0]["router"].startswith("http://127.0.0.1:")
    assert set(result["ratios"]) == {"ours / round_robin", "ours / sglang-cache_aware"}
    assert all(r["p50"] > 0 for r in result["ratios"].values())

    # Everything this run started has stopped, and the RAM tier is gone.
    pids = list(info["providers"].values())
    for arm in ("round_robin", "sglang-cache_aware"):
        pids += result["info"][arm][0]["processes"] + result["info"][arm][0]["provider_pids"]
    assert pids and all(_gone(pid) for pid in pids), pids
    assert not Path(info["t1_dir"]).exists()
    assert (tmp_path / "logs" / "e2e-ours.requests.jsonl").is_file()


def test_tiers_restore_serves_the_prefix_from_t1_and_from_a_dropped_t2(tiny_model_path, tmp_path):
    result = tiers.run(Path(tiny_model_path), prefix=512, repeat=2, threads=1, seed=0, t1_root=tmp_path,
                       work_root=tmp_path / "work")
    assert result["state_bytes"] > 0
    for rep in result["reps"]:
        # Recompute evaluates the whole prefix; after a restore, one token (checked in run, again here).
        assert (rep["recompute_evaluated"], rep["t1_evaluated"], rep["t2_evaluated"]) == (512, 1, 1)
        assert tuple(rep["served"]) == ("T1", "T2")
        if rep["t2_resident_before_drop"] is not None:
            assert rep["t2_resident_after_drop"] < rep["t2_resident_before_drop"]
    median = result["median"]
    assert 0 < median["t1_s"] and 0 < median["t2_s"] and 0 < median["recompute_s"]
    assert result["ratio"]["t1"] == pytest.approx(median["t1_s"] / median["recompute_s"])
    assert result["cache"]["demotions"] == 2 and result["cache"]["promotions"] == 2
    assert not list((tmp_path / "work").iterdir())  # its work directory is removed
    assert "T1 restore" in tiers.report(result)

"""The simulated-worker benchmark end to end on a tiny trace: real loopback HTTP
workers, our scheduler against round-robin, real numbers out."""

import json

import pytest

from bench import routing


@pytest.mark.slow
def test_sim_pipeline_runs_and_our_arm_beats_round_robin(tmp_path):
    out = tmp_path / "results.json"
    code = routing.main(["--trace", "gsp", "--arms", "ours,round_robin", "--scale", "0.1", "--workers", "2",
                         "--capacity-blocks", "160", "--speedup", "10", "--timeout", "60",
                         "--log-dir", str(tmp_path / "logs"), "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())["traces"]["gsp"]
    arms = {a["arm"]: a for a in data["arms"]}
    assert data["summary"]["requests"] == 6 * 16
    for arm in arms.values():
        assert arm["errors"] == 0 and arm["served"] == 96
        assert 0 < arm["o2"] <= arm["o1"] == pytest.approx(15 / 16 * 2048 / 2176)
        assert arm["hit_rate"] <= arm["o1"] + 1e-9
        assert sum(arm["load_tokens"].values()) == 96 * 2176
        assert arm["ttft_p50_s"] is not None and arm["ttft_p99_s"] >= arm["ttft_p50_s"]
    ours, rr = arms["ours"], arms["round_robin"]
    assert ours["hit_rate"] > rr["hit_rate"] + 0.1
    assert ours["frac_o2"] > 0.9
    assert ours["decide_p50_us"] > 0
    assert ours["ttft_p50_s"] < rr["ttft_p50_s"]


def test_worker_answers_openai_shapes_and_rejects_bad_prompts():
    import asyncio

    from bench.simworker import SimWorker, WorkerConfig, route
    from bench.traces import encode

    worker = SimWorker("w0", WorkerConfig(capacity_blocks=8, speedup=1e6))

    async def go():
        body = json.dumps({"prompt": encode(list(range(200))), "max_tokens": 3, "user": "r1"}).encode()
        first = await route(worker, "POST", "/v1/completions", body)
        second = await route(worker, "POST", "/v1/completions", body)
        chat = await route(worker, "POST", "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "user", "content": encode(list(range(130)))}], "max_tokens": 2}).encode())
        bad = await route(worker, "POST", "/v1/completions", b'{"prompt": "not tokens"}')
        health = await route(worker, "GET", "/health", b"")
        return first, second, chat, bad, health

    first, second, chat, bad, health = asyncio.run(go())
    assert first[0] == 200 and first[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert second[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 192  # 3 full blocks of 200 tokens
    assert second[1]["worker"] == "w0" and second[1]["timings"]["prompt_n"] == 8
    assert chat[1]["choices"][0]["message"]["role"] == "assistant"
    assert chat[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 128
    assert bad[0] == 400 and "hex tokens" in bad[1]["error"]["message"]
    assert health == (200, {"status": "ok", "worker": "w0"})
    assert [r["request_id"] for r in worker.log][:2] == ["r1", "r1"]

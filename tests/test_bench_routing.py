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


def test_a_restore_from_the_node_tier_is_charged_on_the_engine_and_counted_apart():
    import asyncio

    from bench.simworker import SimWorker, WorkerConfig, route
    from bench.traces import encode

    config = WorkerConfig(capacity_blocks=64, prefill_tps=1000.0, decode_tps=1e9, speedup=1e6,
                          kv_bytes_per_token=1000, restore_bytes_per_s=1e6)
    worker = SimWorker("w0", config)
    plain = SimWorker("w1", WorkerConfig(capacity_blocks=64, speedup=1e6))
    prompt = encode(list(range(300)))

    async def go():
        restored = await route(worker, "POST", "/v1/completions", json.dumps(
            {"prompt": prompt, "max_tokens": 1, "user": "r", "kv_restore": {"blocks": 4, "state_tokens": 500}}).encode())
        refused = await route(plain, "POST", "/v1/completions", json.dumps(
            {"prompt": prompt, "max_tokens": 1, "kv_restore": {"blocks": 4, "state_tokens": 500}}).encode())
        malformed = await route(worker, "POST", "/v1/completions", json.dumps(
            {"prompt": prompt, "max_tokens": 1, "kv_restore": {"blocks": -1, "state_tokens": 5}}).encode())
        return restored, refused, malformed

    restored, refused, malformed = asyncio.run(go())
    assert restored[0] == 200
    usage, timings = restored[1]["usage"], restored[1]["timings"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 256  # 4 blocks restored into an empty cache
    assert timings["restored_n"] == 256 and timings["prompt_n"] == 300 - 256
    assert timings["restore_ms"] == pytest.approx(500 * 1000 / 1e6 * 1000)  # the whole state is read
    # The load sits on the prefill engine before the prefill: both are in the TTFT.
    assert timings["ttft_ms"] == pytest.approx(500.0 + 44.0)
    assert worker.log[0]["device_cached_tokens"] == 0 and worker.log[0]["restored_tokens"] == 256
    assert refused[0] == 400 and "without a tier" in refused[1]["error"]["message"]
    assert malformed[0] == 400 and "kv_restore" in malformed[1]["error"]["message"]


@pytest.mark.slow
def test_the_node_arm_restores_evicted_prefixes_from_its_t1_and_beats_the_device_only_arm(tmp_path):
    """Small worker caches, a multi-turn trace: the node's T1 (real CacheManager in tmpfs)
    serves prefixes the workers evicted, the restores show up in the workers' logs, and
    nothing about the other arms changes (their workers cannot restore)."""
    out = tmp_path / "results.json"
    code = routing.main(["--trace", "agent", "--arms", "ours,ours+T1", "--scale", "0.2", "--workers", "2",
                         "--capacity-blocks", "96", "--speedup", "20", "--timeout", "90",
                         "--log-dir", str(tmp_path / "logs"), "--out", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    arms = {a["arm"]: a for a in data["traces"]["agent"]["arms"]}
    ours, tiered = arms["ours"], arms["ours+T1"]
    assert ours["errors"] == tiered["errors"] == 0 and not tiered["save_errors"]
    assert ours["restored_rate"] == 0 and ours["restores"] == 0
    assert tiered["restores"] > 0 and tiered["restored_rate"] > 0 and tiered["restore_s_total"] > 0
    assert tiered["hit_rate"] > ours["hit_rate"] + 0.05
    assert tiered["hit_rate"] <= tiered["o1"] + 1e-9
    assert tiered["o2_with_t1"] >= tiered["o2"] and tiered["t1_tokens"] == 4 * 2 * 96 * 64
    assert data["restore_bytes_per_s"] > 0


def test_target_lines_check_both_routing_targets_and_the_headroom_over_the_peer():
    def arm(name, hit, balance, frac_o2, t1=None):
        return {"arm": name, "hit_rate": hit, "o1": 0.852, "load_max_over_mean": balance, "frac_o2": frac_o2,
                "frac_o2_with_t1": t1}

    lines = routing.target_lines([arm("ours", 0.80, 1.05, 0.94), arm("ours+T1", 0.84, 1.04, 0.99, t1=0.99),
                                  arm("sglang-cache_aware", 0.81, 1.40, 0.95), arm("round_robin", 0.48, 1.0, 0.56)])
    assert lines[0] == "target 2, ours: 0.940 of O2 at max/mean 1.050 -> misses"
    assert lines[1] == "target 2, ours+T1: 0.990 of O2 on device + T1 at max/mean 1.040 -> holds"
    assert lines[2].startswith("target 3 headroom: O1 0.852 - sglang-cache_aware 0.810 = 4.2 points (< 10")
    assert lines[3] == "target 3, ours: -1.0 points over sglang-cache_aware at max/mean 1.050 vs 1.400 -> misses"
    assert lines[4].endswith("+3.0 points over sglang-cache_aware at max/mean 1.040 vs 1.400 -> misses")
    small = routing.target_lines([arm("ours+T1", 0.76, 1.06, 0.89, t1=0.89), arm("sglang-cache_aware", 0.46, 1.40, 0.57)])
    assert small[-1].endswith("+30.0 points over sglang-cache_aware at max/mean 1.060 vs 1.400 -> holds")
    assert "no router" not in small[1]

"""How a llama-server slot slows down as its siblings get busy: the batching curve.

    python -m bench.batching                      # SmolLM2, one server, 4 slots, 1 thread
    python -m bench.batching --slots 4 --threads 2 --prompt 512 --decode 32

For k = 1..slots concurrent requests (distinct prompts of ``--prompt`` tokens,
``--decode`` tokens each) on one server, the per-sequence prefill and decode
times the server reports (``timings.prompt_ms``, ``timings.predicted_ms``),
as a multiple of k = 1. The node's cost model prices a slot's busy siblings
with weights (`nodeagent.execution.executor.SLOT_PREFILL_CONTENTION`,
`SLOT_DECODE_CONTENTION`): time(k) = time(1) x (1 + weight x (k - 1)); the
weights this run implies are printed beside the ones the code uses.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
from pathlib import Path
from typing import Sequence

import httpx

from bench.e2e_fleet import Servers, smollm2


def run_k(url: str, k: int, prompt_tokens: int, decode: int, round_: int) -> list[dict]:
    results: list[dict] = [{}] * k
    client = httpx.Client(timeout=600)

    def one(i: int) -> None:
        words = " ".join(f"w{round_}x{i}y{j}" for j in range(prompt_tokens // 4))
        body = {"prompt": words, "n_predict": decode, "temperature": 0, "id_slot": i, "cache_prompt": False,
                "ignore_eos": True}
        results[i] = client.post(f"{url}/completion", json=body).json().get("timings", {})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=384, help="prompt tokens per request (about)")
    parser.add_argument("--decode", type=int, default=24)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    from nodeagent.execution.executor import SLOT_DECODE_CONTENTION, SLOT_PREFILL_CONTENTION

    work = Path(tempfile.mkdtemp(prefix="am-batching-"))
    servers = Servers(work, smollm2())
    try:
        url = servers.start("batching", args.slots, args.threads, 2 * args.prompt + args.decode + 64)
        run_k(url, 1, 64, 2, -1)  # warm up
        base: dict[str, float] = {}
        print(f"{'k':>2} {'prefill ms/seq':>15} {'x k=1':>6} {'decode ms/seq':>14} {'x k=1':>6}")
        implied = {"prefill": [], "decode": []}
        for k in range(1, args.slots + 1):
            prefill, decode = [], []
            for r in range(args.repeat):
                for t in run_k(url, k, args.prompt, args.decode, r + 10 * k):
                    prefill.append(t.get("prompt_ms", 0.0))
                    decode.append(t.get("predicted_ms", 0.0))
            p, d = statistics.median(prefill), statistics.median(decode)
            base.setdefault("p", p)
            base.setdefault("d", d)
            if k > 1:
                implied["prefill"].append((p / base["p"] - 1) / (k - 1))
                implied["decode"].append((d / base["d"] - 1) / (k - 1))
            print(f"{k:>2} {p:>15.1f} {p / base['p']:>6.2f} {d:>14.1f} {d / base['d']:>6.2f}")
        if implied["prefill"]:
            print(f"implied weights: prefill {statistics.median(implied['prefill']):.2f} "
                  f"(code: {SLOT_PREFILL_CONTENTION}), decode {statistics.median(implied['decode']):.2f} "
                  f"(code: {SLOT_DECODE_CONTENTION})")
    finally:
        servers.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

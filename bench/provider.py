"""Embedded provider: prefill/decode rates and state restore vs recompute.

For each test model preset, one worker (n_threads=1 by default: on a shared 2-core machine two spinning threads contend and run ~8x slower) measures, in the same run:
* prefill tokens/s (a fresh 512-token prompt) and decode tokens/s (64 greedy tokens);
* for prefixes of 512, 1024 and 2048 tokens: the time to recompute the prefix
  (prefill from an empty context), to save its state to a file, and to restore
  it into a context that held something else; the restored context is then
  checked (the next request reuses the whole prefix and evaluates 1 token).

    python bench/provider.py [--models tiny,small] [--prefixes 512,1024,2048] [--out DIR]

Restore time is what the caller waits for (the provider round trip, reading
the file, checking its sha256 and handing it to llama.cpp), not only llama.cpp.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodeagent.models.testmodel import create_test_model  # noqa: E402
from nodeagent.providers.base import GenerationRequest  # noqa: E402
from nodeagent.providers.llama_cpp_python import LlamaCppPythonProvider, LlamaOptions  # noqa: E402


def prompt(n: int, salt: int) -> list[int]:
    """n tokens; the first depends on ``salt`` so prompts share no prefix (no BOS, on purpose)."""
    return [300 + salt] + [(259 + salt * 977 + i * 7919) % 7000 + 300 for i in range(n - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,small")
    parser.add_argument("--prefixes", default="512,1024,2048")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    prefixes = [int(p) for p in args.prefixes.split(",")]
    n_ctx = max(prefixes) + 256
    rate_rows, state_rows = [], []
    for preset in args.models.split(","):
        path = args.out / f"{preset}.gguf"
        if not path.exists():
            create_test_model(path, preset)
        provider = LlamaCppPythonProvider(preset, path, options=LlamaOptions(n_ctx=n_ctx, n_threads=args.threads))
        start = time.perf_counter()
        provider.start()
        load_s = time.perf_counter() - start
        try:
            pre = provider.generate(GenerationRequest(prompt_tokens=prompt(512, 1), max_tokens=0))
            dec = provider.generate(GenerationRequest(prompt_tokens=prompt(16, 2), max_tokens=64))
            decode_tps = (len(dec.completion_tokens) - 1) / (dec.total_s - dec.ttft_s)
            rate_rows.append((preset, load_s, pre.evaluated_tokens / pre.total_s, decode_tps))
            with tempfile.TemporaryDirectory() as tmp:
                for salt, n in enumerate(prefixes, start=10):
                    tokens = prompt(n, salt)
                    recompute = provider.generate(GenerationRequest(prompt_tokens=tokens, max_tokens=0))
                    assert recompute.evaluated_tokens == n, recompute
                    state = Path(tmp) / f"{n}.state"
                    saved = provider.save_state(0, state)
                    restores = []
                    for rep in range(3):
                        provider.generate(GenerationRequest(prompt_tokens=prompt(8, 100 + rep), max_tokens=0))
                        t0 = time.perf_counter()
                        assert provider.restore_state(0, state).n_tokens == n
                        restores.append(time.perf_counter() - t0)
                    check = provider.generate(GenerationRequest(prompt_tokens=tokens + [400], max_tokens=1))
                    assert (check.cached_tokens, check.evaluated_tokens) == (n, 1), check
                    restore_s = statistics.median(restores)
                    state_rows.append((preset, n, recompute.total_s, saved.save_s, restore_s, saved.size_bytes))
                    print(f"  {preset} {n}: recompute {recompute.total_s:.3f}s save {saved.save_s:.3f}s "
                          f"restore {restore_s:.3f}s", flush=True)
        finally:
            provider.stop()

    print("\nrates (n_threads=%d, n_ctx=%d)" % (args.threads, n_ctx))
    print(f"{'model':6} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for preset, load_s, prefill, decode in rate_rows:
        print(f"{preset:6} {load_s:7.2f} {prefill:14.1f} {decode:13.1f}")
    print("\nstate restore vs recompute (same worker, same run; restore = median of 3)")
    print(f"{'model':6} {'prefix':>6} {'recompute s':>12} {'save s':>8} {'restore s':>10} {'state MiB':>10} "
          f"{'recompute/restore':>18}")
    for preset, n, recompute_s, save_s, restore_s, size in state_rows:
        print(f"{preset:6} {n:6} {recompute_s:12.3f} {save_s:8.3f} {restore_s:10.4f} {size / 2**20:10.1f} "
              f"{recompute_s / restore_s:17.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

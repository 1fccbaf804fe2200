"""llama-server slot tiering vs recompute, side by side in one run.

For each model preset and prefix length: the time to get a slot holding the
prefix and produce the first token, three ways, on one server:
  recompute  erase the slot, send the prompt (prefill) and take one token;
  T1         restore the saved state from a RAM directory (/dev/shm), then one token;
  T2         restore it from the state directory on disk, then one token.
A restore is the adapter's full path: digest check, stage into the server's
--slot-save-path (hard link, or copy across filesystems), POST restore.
T2 files are in the page cache (just written); a cold disk adds its read time.

    python bench/llama_server_slots.py [--presets tiny,small] [--prefixes 512,1024,2048] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodeagent.launch.registry import Registry  # noqa: E402
from nodeagent.launch.subprocess import SubprocessLauncher, free_port  # noqa: E402
from nodeagent.models.testmodel import create_test_model  # noqa: E402
from nodeagent.providers.base import GenerationRequest  # noqa: E402
from nodeagent.providers.catalog import load_catalog, resolve_spec  # noqa: E402
from nodeagent.providers.llama_server import LlamaServerProvider, locate_llama_server  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--prefixes", default="512,1024,2048")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    binary, how = locate_llama_server(build=True)
    if binary is None:
        print(f"no llama-server: {how}")
        return 1
    prefixes = [int(p) for p in args.prefixes.split(",")]
    ctx = max(prefixes) + 256
    work = Path(tempfile.mkdtemp(prefix="bench-slots-"))
    t1 = Path(tempfile.mkdtemp(prefix="bench-t1-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    t2 = work / "t2"
    t2.mkdir()
    print(f"llama-server {binary} ({how}); threads={args.threads}, ctx={ctx}, median of {args.reps}")
    print(f"{'model':6} {'prefix':>6} {'recompute s':>12} {'T1 s':>8} {'T2 s':>8} {'state MiB':>10} "
          f"{'recompute/T1':>13} {'recompute/T2':>13}")
    for preset in args.presets.split(","):
        model = create_test_model(work / f"{preset}.gguf", preset=preset)
        spec = resolve_spec(load_catalog().get("llama-server"), name=f"bench-{preset}", mode="subprocess",
                            model_path=model, port=free_port(), executable=str(binary), slot_save_dir=work / "slots",
                            params={"ctx_size": ctx, "parallel": 1},
                            extra_args=["--threads", str(args.threads), "--cache-ram", "0"], start_timeout_s=300)
        provider = LlamaServerProvider.from_spec(spec, SubprocessLauncher(Registry(work / "registry")))
        provider.start()
        try:
            vocab_text = " ".join(f"w{i}" for i in range(4000))
            base = provider.tokenize(vocab_text)
            for n in prefixes:
                tokens = base[:n]
                one = GenerationRequest(prompt_tokens=tokens, max_tokens=1, slot=0)
                provider.generate(GenerationRequest(prompt_tokens=tokens, max_tokens=0, slot=0))
                saved = provider.save_state(0, t1 / f"{preset}-{n}.bin")
                provider.save_state(0, t2 / f"{preset}-{n}.bin")
                rows: dict[str, list[float]] = {"recompute": [], "t1": [], "t2": []}
                for _ in range(args.reps):
                    provider.erase(0)
                    rows["recompute"].append(timed(lambda: provider.generate(one)))
                    for tier, directory in (("t1", t1), ("t2", t2)):
                        provider.erase(0)

                        def restore_then_token() -> None:
                            provider.restore_state(0, directory / f"{preset}-{n}.bin")
                            result = provider.generate(one)
                            assert result.evaluated_tokens == 1, result  # the whole prefix was reused

                        rows[tier].append(timed(restore_then_token))
                med = {k: statistics.median(v) for k, v in rows.items()}
                print(f"{preset:6} {n:6d} {med['recompute']:12.3f} {med['t1']:8.4f} {med['t2']:8.4f} "
                      f"{saved.size_bytes / 2**20:10.1f} {med['recompute'] / med['t1']:12.1f}x "
                      f"{med['recompute'] / med['t2']:12.1f}x")
        finally:
            provider.stop()
            provider.close()
    for directory in (t1, work):
        import shutil

        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

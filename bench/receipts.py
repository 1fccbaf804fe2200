"""Receipt log throughput: durable appends per second and verifications per second.

Side by side, in one run, on the same disk:

* ``group``   — T threads append; concurrent appenders share one fdatasync
                (the production setting);
* ``each``    — same threads, ``group_commit=False``: one fdatasync per receipt
                (the baseline group commit is measured against);
* ``serial``  — one thread with group commit (nothing to share: latency-bound);
* ``verify``  — `verify_bundle` over the log written by ``group`` (every
                signature, schema, chain link and checkpoint), 1 process and
                ``--jobs`` processes;
* ``ed25519`` — bare sign/verify calls on one core: the ceiling the two
                above are bounded by (each verified receipt is one Ed25519
                verify; each appended one is one sign).

An append counts once `ReceiptLog.append` returned, i.e. the line is on
stable storage. Inputs are built before the clock starts (the pod executor
builds them anyway); signing, canonical JSON, the write, the fdatasync, the
index update and periodic checkpoints are all inside the measurement.

    python bench/receipts.py [--receipts 6000] [--threads 32] [--jobs 2] [--dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodeagent.receipts import ReceiptLog, Signer  # noqa: E402
from nodeagent.receipts.samples import STATUSES, sample_input  # noqa: E402
from nodeagent.receipts.verify import verify_bundle  # noqa: E402


def filesystem_of(path: Path) -> str:
    best = ("?", "?")
    path_text = str(path.resolve())
    with open("/proc/mounts") as mounts:
        for line in mounts:
            device, mount_point, fstype = line.split()[:3]
            if path_text.startswith(mount_point) and len(mount_point) >= len(best[0]):
                best = (mount_point, f"{fstype} on {device}")
    return best[1]


def run_appends(directory: Path, inputs: list, threads: int, group_commit: bool) -> dict:
    syncs = 0
    real_fdatasync = os.fdatasync

    def counting_fdatasync(fd: int) -> None:
        nonlocal syncs
        syncs += 1
        real_fdatasync(fd)

    os.fdatasync = counting_fdatasync  # counts, then does the real fdatasync
    try:
        log = ReceiptLog(directory, Signer.generate(), checkpoint_every=1000, group_commit=group_commit)
        per_thread = [inputs[k::threads] for k in range(threads)]
        latencies: list[float] = []
        lock = threading.Lock()

        def work(items: list) -> None:
            mine = []
            for item in items:
                started = time.perf_counter()
                log.append(item)
                mine.append(time.perf_counter() - started)
            with lock:
                latencies.extend(mine)

        workers = [threading.Thread(target=work, args=(items,)) for items in per_thread]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        elapsed = time.perf_counter() - started
        log.close()
    finally:
        os.fdatasync = real_fdatasync
    latencies.sort()
    return {
        "receipts": len(inputs), "threads": threads, "seconds": round(elapsed, 3),
        "perSecond": round(len(inputs) / elapsed), "fdatasyncs": syncs,
        "receiptsPerFsync": round(len(inputs) / max(1, syncs), 1),
        "p50ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "p99ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
    }


def raw_ed25519(seconds: float = 1.0) -> dict:
    """The ceiling: bare Ed25519 sign and verify calls on a receipt-sized message, one core."""
    signer = Signer.generate()
    message = b"x" * 1700
    signature = signer.sign(message)
    out = {}
    for name, call in (("signPerSecond", lambda: signer.sign(message)),
                       ("verifyPerSecond", lambda: signer.public.verify(signature, message))):
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(100):
                call()
            count += 100
        out[name] = round(count / (time.perf_counter() - started))
    return out


def run_verify(directory: Path, jobs: int) -> dict:
    started = time.perf_counter()
    report = verify_bundle(directory, jobs=jobs)
    elapsed = time.perf_counter() - started
    if not report.ok:
        raise SystemExit(f"verification failed: {report.failures[:3]}")
    return {"entries": report.entries, "jobs": jobs, "seconds": round(elapsed, 3),
            "perSecond": round(report.entries / elapsed), "checkpoints": len(report.checkpoints)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receipts", type=int, default=6000, help="appends in the group-commit run")
    parser.add_argument("--each-receipts", type=int, default=1500, help="appends in the one-fsync-each run")
    parser.add_argument("--threads", type=int, default=32, help="concurrent appenders (pods finishing at once)")
    parser.add_argument("--jobs", type=int, default=2, help="processes for the parallel verification")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir in the cwd)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="receipts-bench-", dir=args.dir or Path.cwd()))
    try:
        inputs = [sample_input(i, STATUSES[i % 4]) for i in range(args.receipts)]
        results = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "filesystem": filesystem_of(base),
                        "loadavg": os.getloadavg()},
            "group": run_appends(base / "group", inputs, args.threads, True),
            "each": run_appends(base / "each", inputs[: args.each_receipts], args.threads, False),
            "serial": run_appends(base / "serial", inputs[: args.each_receipts], 1, True),
            "verify1": run_verify(base / "group", 1),
            "verifyN": run_verify(base / "group", args.jobs),
            "ed25519": raw_ed25519(),
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)

    g, e, s = results["group"], results["each"], results["serial"]
    print(f"filesystem: {results['machine']['filesystem']}, {results['machine']['cpus']} CPUs, "
          f"load {results['machine']['loadavg'][0]:.2f}")
    print(f"{'run':<26}{'receipts':>9}{'threads':>8}{'per s':>8}{'fsyncs':>8}{'per fsync':>10}{'p50 ms':>8}{'p99 ms':>8}")
    for name, r in (("group commit", g), ("one fsync per receipt", e), ("serial (1 thread)", s)):
        print(f"{name:<26}{r['receipts']:>9}{r['threads']:>8}{r['perSecond']:>8}{r['fdatasyncs']:>8}"
              f"{r['receiptsPerFsync']:>10}{r['p50ms']:>8}{r['p99ms']:>8}")
    print(f"group commit / one fsync per receipt: {g['perSecond'] / e['perSecond']:.2f}x")
    raw = results["ed25519"]
    for r in (results["verify1"], results["verifyN"]):
        print(f"verify {r['entries']} entries, {r['jobs']} process(es): {r['perSecond']}/s ({r['seconds']} s) = "
              f"{r['perSecond'] / raw['verifyPerSecond']:.2f}x one core's bare Ed25519 verify rate")
    print(f"bare Ed25519 on one core (the ceiling): sign {raw['signPerSecond']}/s, verify {raw['verifyPerSecond']}/s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

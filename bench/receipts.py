"""Receipt log throughput: durable appends per second and verifications per second.

Side by side, in one run, on the same disk:

* ``group``   — T threads append; concurrent appenders share one fdatasync
                (the production setting);
* ``each``    — same threads, ``group_commit=False``: one fdatasync per receipt
                (the baseline group commit is measured against);
* ``serial``  — one thread with group commit (nothing to share: latency-bound);
* ``verify``  — `verify_bundle` over the log written by ``group`` (every
                signature, schema, chain link and checkpoint), in 1 process
                and in ``--jobs`` processes, each with the libsodium verify
                backend (the default) and with the OpenSSL one (`cryptography`,
                the previous default), interleaved over ``--rounds`` rounds so
                the four share the same background load; reported: the median
                and best rate, and CPU time per entry (all processes: the cost,
                which other jobs on the machine do not change);
* ``ed25519`` — bare sign/verify calls on one core: the ceiling the two
                above are bounded by (each verified receipt is one Ed25519
                verify; each appended one is one sign).

An append counts once `ReceiptLog.append` returned, i.e. the line is on
stable storage. Inputs are built before the clock starts (the pod executor
builds them anyway); signing, canonical JSON, the write, the fdatasync, the
index update and periodic checkpoints are all inside the measurement.

    python bench/receipts.py [--receipts 6000] [--threads 32] [--jobs 2] [--rounds 3] [--verify-only]
                             [--dir DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nodeagent.receipts import ReceiptLog, Signer  # noqa: E402
from nodeagent.receipts.samples import STATUSES, sample_input  # noqa: E402
from nodeagent.receipts.keys import PublicKey, set_verify_backend  # noqa: E402
from nodeagent.receipts.verify import verify_bundle  # noqa: E402

BACKENDS = ("sodium", "openssl")


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
    public: PublicKey = signer.public
    message = b"x" * 1700
    signature = signer.sign(message)
    out = {}

    def rate(call) -> int:
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(100):
                call()
            count += 100
        return round(count / (time.perf_counter() - started))

    out["signPerSecond"] = rate(lambda: signer.sign(message))
    for backend in BACKENDS:
        previous = set_verify_backend(backend)
        try:
            assert public.verify(signature, message)
            out[f"verifyPerSecond_{backend}"] = rate(lambda: public.verify(signature, message))
        finally:
            set_verify_backend(previous)
    return out


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (the verification workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def verify_once(directory: Path, jobs: int, backend: str) -> tuple[int, float, float]:
    """(entries, wall seconds, CPU seconds) of one `verify_bundle` run."""
    previous = set_verify_backend(backend)
    try:
        cpu, started = cpu_seconds(), time.perf_counter()
        report = verify_bundle(directory, jobs=jobs)
        elapsed, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    finally:
        set_verify_backend(previous)
    if not report.ok:
        raise SystemExit(f"verification failed ({backend}, {jobs} jobs): {report.failures[:3]}")
    return report.entries, elapsed, cpu


def run_verify(directory: Path, jobs: int, rounds: int) -> list[dict]:
    configs = [(backend, n) for backend in BACKENDS for n in sorted({1, jobs})]
    samples: dict[tuple[str, int], list[tuple[float, float]]] = {c: [] for c in configs}
    entries = 0
    verify_once(directory, 1, "sodium")  # warm-up: imports, pydantic schema, page cache
    for _ in range(rounds):
        for backend, n in configs:
            entries, elapsed, cpu = verify_once(directory, n, backend)
            samples[(backend, n)].append((entries / elapsed, cpu / entries))
    out = []
    for (backend, n), runs in samples.items():
        rates = [r for r, _ in runs]
        out.append({"backend": backend, "jobs": n, "entries": entries, "rounds": rounds,
                    "medianPerSecond": round(statistics.median(rates)), "bestPerSecond": round(max(rates)),
                    "rates": [round(r) for r in rates],
                    "cpuUsPerEntry": round(statistics.median(c for _, c in runs) * 1e6, 1)})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--receipts", type=int, default=6000, help="appends in the group-commit run")
    parser.add_argument("--each-receipts", type=int, default=1500, help="appends in the one-fsync-each run")
    parser.add_argument("--threads", type=int, default=32, help="concurrent appenders (pods finishing at once)")
    parser.add_argument("--jobs", type=int, default=2, help="processes for the parallel verification")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the four verification runs")
    parser.add_argument("--verify-only", action="store_true",
                        help="write the log (the group-commit run) and measure verification only")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir in the cwd)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="receipts-bench-", dir=args.dir or Path.cwd()))
    try:
        inputs = [sample_input(i, STATUSES[i % 4]) for i in range(args.receipts)]
        results: dict = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "filesystem": filesystem_of(base),
                        "loadavg": os.getloadavg()},
            "group": run_appends(base / "group", inputs, args.threads, True),
        }
        if not args.verify_only:
            results["each"] = run_appends(base / "each", inputs[: args.each_receipts], args.threads, False)
            results["serial"] = run_appends(base / "serial", inputs[: args.each_receipts], 1, True)
        results["machine"]["loadavgBeforeVerify"] = os.getloadavg()
        results["verify"] = run_verify(base / "group", args.jobs, args.rounds)
        results["machine"]["loadavgAfterVerify"] = os.getloadavg()
        results["ed25519"] = raw_ed25519()
    finally:
        shutil.rmtree(base, ignore_errors=True)

    machine = results["machine"]
    print(f"filesystem: {machine['filesystem']}, {machine['cpus']} CPUs, load {machine['loadavg'][0]:.2f} at start, "
          f"{machine['loadavgBeforeVerify'][0]:.2f} before / {machine['loadavgAfterVerify'][0]:.2f} after verification")
    print(f"{'run':<26}{'receipts':>9}{'threads':>8}{'per s':>8}{'fsyncs':>8}{'per fsync':>10}{'p50 ms':>8}{'p99 ms':>8}")
    runs = [("group commit", results["group"])]
    if not args.verify_only:
        runs += [("one fsync per receipt", results["each"]), ("serial (1 thread)", results["serial"])]
    for name, r in runs:
        print(f"{name:<26}{r['receipts']:>9}{r['threads']:>8}{r['perSecond']:>8}{r['fdatasyncs']:>8}"
              f"{r['receiptsPerFsync']:>10}{r['p50ms']:>8}{r['p99ms']:>8}")
    if not args.verify_only:
        print(f"group commit / one fsync per receipt: {results['group']['perSecond'] / results['each']['perSecond']:.2f}x")
    raw = results["ed25519"]
    entries = results["verify"][0]["entries"]
    print(f"verify {entries} entries, {args.rounds} interleaved rounds:")
    print(f"{'backend':<9}{'processes':>10}{'median/s':>10}{'best/s':>8}{'CPU us/entry':>14}   rates")
    for r in results["verify"]:
        print(f"{r['backend']:<9}{r['jobs']:>10}{r['medianPerSecond']:>10}{r['bestPerSecond']:>8}{r['cpuUsPerEntry']:>14}"
              f"   {', '.join(map(str, r['rates']))}")
    by = {(r["backend"], r["jobs"]): r for r in results["verify"]}
    for n in sorted({1, args.jobs}):
        print(f"sodium / openssl, {n} process(es): {by[('sodium', n)]['medianPerSecond'] / by[('openssl', n)]['medianPerSecond']:.2f}x")
    print(f"bare Ed25519 on one core: sign {raw['signPerSecond']}/s, verify {raw['verifyPerSecond_sodium']}/s (libsodium), "
          f"{raw['verifyPerSecond_openssl']}/s (OpenSSL)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

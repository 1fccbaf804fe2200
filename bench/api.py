"""API benchmark: idle RSS of `agent-machine serve` and GET /v1/machine latency over the Unix socket.

    python bench/api.py [--rate 200] [--seconds 10] [--json bench/out/api.json]

Starts a real daemon (own temporary state/config/runtime dirs, real probe),
waits for READY on a notify socket and for the profile to be cached, then:

* idle RSS: the daemon's resident set after it has served one request and sat
  idle for 3 s, beside a bare Python interpreter's RSS (the floor any Python
  daemon pays) measured in the same run;
* latency: an open-loop client sends GET /v1/machine at ``--rate`` requests/s
  for ``--seconds`` over one keep-alive connection on the Unix socket. Latency
  is measured from each request's *scheduled* send time, so a slow response
  delays (and is charged to) the requests behind it (no coordinated omission).
  GET /healthz (an async route that never touches the node) runs the same way
  side by side as the transport floor.

Targets (issue 6): idle RSS <= 120 MB, GET /v1/machine p50/p99 <= 5 ms at 200/s.
Both a minimal raw HTTP/1.1 client (the server's latency) and httpx (what a
Python caller sees) run. The target is judged on the raw client.
Bounded: about 4 x seconds + 15 s in total.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

TARGET_RSS_MB = 120.0
TARGET_MS = 5.0


def start_daemon(tmp: Path) -> tuple[subprocess.Popen, Path]:
    notify_path = tmp / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(60)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_MACHINE_", "NOTIFY_", "LISTEN_"))}
    env.update(HOME=str(tmp), AGENT_MACHINE_STATE_DIR=str(tmp / "state"), AGENT_MACHINE_CONFIG_DIR=str(tmp / "cfg"),
               AGENT_MACHINE_CACHE_DIR=str(tmp / "cache"), AGENT_MACHINE_RUNTIME_DIR=str(tmp / "run" / "agent-machine"),
               NOTIFY_SOCKET=str(notify_path))
    agent = shutil.which("agent-machine")
    cmd = [agent, "serve"] if agent else [sys.executable, "-m", "nodeagent.cli", "serve"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.log", "wb"))
    try:
        while b"READY=1" not in notify.recv(65536):
            pass
    finally:
        notify.close()
    return proc, tmp / "run" / "agent-machine" / "api.sock"


def bare_python_rss_mb() -> float:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(1.0)
        return psutil.Process(proc.pid).memory_info().rss / 2**20
    finally:
        proc.kill()
        proc.wait()


class RawClient:
    """A minimal keep-alive HTTP/1.1 GET over the Unix socket: the server's latency without httpx's own cost."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))

    def get(self, target: str) -> "RawResponse":
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: agent\r\n\r\n".encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            buf += chunk
        head, _, body = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next(int(line.split(b":", 1)[1]) for line in lines if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            body += self.sock.recv(65536)
        return RawResponse(int(lines[0].split()[1]))

    def close(self) -> None:
        self.sock.close()


class RawResponse:
    def __init__(self, status_code: int) -> None:
        self.status_code = status_code


def open_loop(client, path: str, rate: float, seconds: float) -> dict[str, float]:
    interval = 1.0 / rate
    count = int(rate * seconds)
    latencies, service, errors = [], [], 0
    start = time.perf_counter() + 0.05
    for i in range(count):
        scheduled = start + i * interval
        now = time.perf_counter()
        if now < scheduled:
            time.sleep(scheduled - now)
        sent = time.perf_counter()
        response = client.get(path)
        done = time.perf_counter()
        if response.status_code != 200:
            errors += 1
        latencies.append((done - scheduled) * 1000)
        service.append((done - sent) * 1000)
    elapsed = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    s = statistics.quantiles(service, n=100, method="inclusive")
    return {"requests": count, "errors": errors, "achieved_rps": count / elapsed,
            "p50_ms": q[49], "p99_ms": q[98], "max_ms": max(latencies),
            "service_p50_ms": s[49], "service_p99_ms": s[98]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second (default 200)")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration per route and client (default 8)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmpdir:
        tmp = Path(tmpdir)
        began = time.monotonic()
        proc, sock = start_daemon(tmp)
        ready_s = time.monotonic() - began
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://agent",
                              timeout=60) as client:
                first = client.get("/v1/machine")  # waits for the background probe if it is still running
                first.raise_for_status()
                profile_bytes = len(first.content)
                time.sleep(3.0)
                daemon = psutil.Process(proc.pid)
                idle_rss = daemon.memory_info().rss / 2**20
                idle_uss = daemon.memory_full_info().uss / 2**20
                floor_rss = bare_python_rss_mb()
                for path in ("/healthz", "/v1/machine"):  # warm both paths
                    for _ in range(50):
                        client.get(path)
                runs = {}
                raw = RawClient(sock)
                try:
                    for label, c in (("raw", raw), ("httpx", client)):
                        for path in ("/healthz", "/v1/machine"):
                            runs[(label, path)] = open_loop(c, path, args.rate, args.seconds)
                finally:
                    raw.close()
                busy_rss = daemon.memory_info().rss / 2**20
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    result = {
        "rate": args.rate, "seconds": args.seconds, "ready_s": ready_s, "profile_bytes": profile_bytes,
        "idle_rss_mb": idle_rss, "idle_uss_mb": idle_uss, "bare_python_rss_mb": floor_rss,
        "rss_after_load_mb": busy_rss, "load_average": os.getloadavg(),
        "runs": {f"{label} {path}": r for (label, path), r in runs.items()},
    }
    print(f"daemon ready in {ready_s:.2f}s; /v1/machine body {profile_bytes} bytes")
    print(f"idle RSS {idle_rss:.1f} MB (USS {idle_uss:.1f} MB); bare python {floor_rss:.1f} MB "
          f"(x{idle_rss / floor_rss:.1f}); after load {busy_rss:.1f} MB; target <= {TARGET_RSS_MB:.0f} MB "
          f"-> {idle_rss / TARGET_RSS_MB:.2f} of target")
    print(f"load average during the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"({os.cpu_count()} CPUs)")
    print(f"{'client':<6} {'route':<12} {'req':>5} {'rps':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'svc p50':>8} {'svc p99':>8} {'err':>4}")
    for (label, name), r in runs.items():
        print(f"{label:<6} {name:<12} {r['requests']:>5} {r['achieved_rps']:>6.1f} {r['p50_ms']:>7.2f} "
              f"{r['p99_ms']:>7.2f} {r['max_ms']:>7.2f} {r['service_p50_ms']:>8.2f} {r['service_p99_ms']:>8.2f} "
              f"{r['errors']:>4}")
    for label in ("raw", "httpx"):
        machine, healthz = runs[(label, "/v1/machine")], runs[(label, "/healthz")]
        print(f"{label}: /v1/machine vs /healthz p50 x{machine['p50_ms'] / healthz['p50_ms']:.2f}, "
              f"p99 x{machine['p99_ms'] / healthz['p99_ms']:.2f}; vs the {TARGET_MS:.0f} ms target: "
              f"p50 {machine['p50_ms'] / TARGET_MS:.2f}, p99 {machine['p99_ms'] / TARGET_MS:.2f}")
    machine = runs[("raw", "/v1/machine")]
    ok = idle_rss <= TARGET_RSS_MB and machine["p50_ms"] <= TARGET_MS and machine["p99_ms"] <= TARGET_MS
    print("targets met" if ok else "targets NOT met")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

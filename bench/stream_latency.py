"""The node's added latency to the first streamed token, over calling the provider directly.

    python bench/stream_latency.py [--rounds 200] [--max-tokens 4] [--json bench/out/stream_latency.json]

Side by side in one run, interleaved (the order alternates every round), the
same prompt tokens to the same model with the same options:

* direct: an embedded provider (`LlamaCppPythonProvider`, built by the same
  loader the node uses) called as the node calls it,
  ``generate(request, on_text=sink)``; time from the call to the first piece
  of text at the sink;
* node: ``POST /v1/completions`` with ``stream: true`` to a real
  ``agent-machine serve`` over its Unix socket (a minimal HTTP/1.1 client, so
  the figure is the server's, not a client library's); time from sending the
  request to the first SSE chunk with text.

Cache state is held constant: every request repeats one prompt, so each
provider holds it from the round before and evaluates only its last token
(the figures print the evaluated tokens of both, which must agree). The
difference of each round (node minus direct) is the node's added latency; its
p50 is judged against the target (issue #12: <= 5 ms).

After each node request the bench reads the pod back (outside the timing) to
split the node's time into stages from its transitions and the provider's own
ttft: HTTP and admission, queued, placement, start of generation.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nodeagent.models.residency import LoadRequest  # noqa: E402
from nodeagent.models.store import ModelStore  # noqa: E402
from nodeagent.providers.base import GenerationRequest  # noqa: E402
from nodeagent.providers.llama_cpp_python import residency_loader  # noqa: E402

TARGET_MS = 5.0
MODEL = "smollm2"
PROMPT = ("The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as his "
          "father had taught him. At the top he trimmed the wick, polished the great lens and watched the ships "
          "pass far out on the grey water. One night in late autumn, a small boat appeared")
# What a completion request leaves to llama.cpp's defaults (nodeagent.openai_compat.DEFAULT_SAMPLING),
# at temperature 0: the direct call samples with the same chain.
SAMPLING = {"temperature": 0.0, "top_k": 40, "top_p": 0.95, "min_p": 0.05}


# ------------------------------------------------------------------ the agent
def agent_env(tmp: Path, threads: int, context: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_MACHINE_", "NOTIFY_", "LISTEN_"))}
    env.update(HOME=str(tmp), AGENT_MACHINE_STATE_DIR=str(tmp / "state"), AGENT_MACHINE_CONFIG_DIR=str(tmp / "cfg"),
               AGENT_MACHINE_CACHE_DIR=str(tmp / "cache"), AGENT_MACHINE_RUNTIME_DIR=str(tmp / "run" / "agent-machine"),
               AGENT_MACHINE_CACHE_RAM_DIR=str(tmp / "t1"), AGENT_MACHINE_MODELS_THREADS=str(threads),
               AGENT_MACHINE_MODELS_CONTEXT=str(context))
    return env


def start_agent(tmp: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    """``agent-machine serve``, READY on its notify socket."""
    notify_path = tmp / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(120)
    cmd = [sys.executable, "-m", "nodeagent.cli", "serve"]
    proc = subprocess.Popen(cmd, env={**env, "NOTIFY_SOCKET": str(notify_path)}, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.log", "wb"))
    try:
        while b"READY=1" not in notify.recv(65536):
            pass
    finally:
        notify.close()
    return proc, tmp / "run" / "agent-machine" / "api.sock"


class Reconnected(Exception):
    """The request went out on a new connection: its timing includes the reconnect."""


class SseClient:
    """A keep-alive HTTP/1.1 POST over the Unix socket reading a chunked SSE answer as it comes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reconnects = 0
        self._connect()

    def _connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(self.path))
        self.buf = b""

    def _more(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the agent closed the connection")
        self.buf += data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._more()
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._more()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def stream(self, target: str, body: dict[str, Any], on_event: Callable[[dict[str, Any]], None]) -> int:
        """Send; call ``on_event`` with each SSE ``data`` object as its chunk arrives; the status."""
        payload = json.dumps(body).encode()
        request = (f"POST {target} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        try:
            self.sock.sendall(request)
            status = int(self._line().split()[1])
        except (BrokenPipeError, ConnectionError):
            # The server closed the idle keep-alive connection (uvicorn: after 5 s): open another,
            # as HTTP clients do. The caller's clock has run meanwhile, so it discards this round.
            self.sock.close()
            self._connect()
            self.reconnects += 1
            raise Reconnected() from None
        headers = {}
        while line := self._line():
            name, _, value = line.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") != "chunked":
            body_bytes = self._exactly(int(headers.get("content-length", "0")))
            raise RuntimeError(f"HTTP {status}: {body_bytes.decode(errors='replace')}")
        pending = b""
        while True:
            size = int(self._line().split(b";")[0], 16)
            if size == 0:
                self._line()  # the empty trailer line
                return status
            pending += self._exactly(size)
            self._line()
            while b"\n\n" in pending:
                event, _, pending = pending.partition(b"\n\n")
                data = event.removeprefix(b"data: ")
                if data != b"[DONE]":
                    on_event(json.loads(data))

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------ one round each
def direct_once(provider: Any, tokens: list[int], max_tokens: int) -> dict[str, float]:
    pieces: list[float] = []

    def sink(piece: str) -> bool:
        if piece:
            pieces.append(time.perf_counter())
        return True

    began = time.perf_counter()
    result = provider.generate(GenerationRequest(prompt_tokens=tokens, max_tokens=max_tokens, **SAMPLING),
                               on_text=sink)
    ended = time.perf_counter()
    return {"ttft_ms": (pieces[0] - began) * 1000, "tail_ms": (ended - pieces[-1]) * 1000,
            "evaluated": result.evaluated_tokens,
            "prompt": result.prompt_tokens, "provider_ttft_ms": result.ttft_s * 1000}


def node_once(client: SseClient, max_tokens: int) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def on_event(event: dict[str, Any]) -> None:
        if "error" in event:
            raise RuntimeError(f"the agent failed mid-stream: {event['error']}")
        if event.get("choices") and event["choices"][0].get("text"):
            seen.setdefault("first", time.perf_counter())
            seen["last"] = time.perf_counter()
        seen.setdefault("id", event.get("id"))
        if event.get("usage"):
            seen["usage"] = event["usage"]

    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent_wall = time.time()
    began = time.perf_counter()
    client.stream("/v1/completions", body, on_event)
    ended = time.perf_counter()
    usage = seen["usage"]
    return {"ttft_ms": (seen["first"] - began) * 1000, "sent_wall": sent_wall, "pod": seen["id"].removeprefix("cmpl-"),
            "tail_ms": (ended - seen["last"]) * 1000,
            "prompt": usage["prompt_tokens"],
            "evaluated": usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]}


def stages(pod: dict[str, Any], sent_wall: float, ttft_ms: float) -> dict[str, float]:
    """The node's time by stage (ms), from the pod's transitions and the turn's provider ttft."""
    at = {t["phase"]: datetime.fromisoformat(t["at"].replace("Z", "+00:00")).timestamp()
          for t in pod["status"]["transitions"]}
    turn = pod["status"]["turns"][0]
    running = at["Running"]
    return {
        "http_to_stored_ms": (at["Pending"] - sent_wall) * 1000,
        "admitted_ms": (at["Admitted"] - at["Pending"]) * 1000,
        "queued_and_placed_ms": (at["Placed"] - at["Admitted"]) * 1000,
        "placed_to_running_ms": (running - at["Placed"]) * 1000,
        # what is left of the client's ttft after Running: the turn's preparation, the
        # provider's own ttft and the way back (TextStream, SSE, socket)
        "running_to_client_ms": ttft_ms - (running - sent_wall) * 1000,
        "turn_ttft_ms": float(turn.get("ttftMs", 0.0)),
    }


def quantiles(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98], "mean": statistics.fmean(values)}


# ------------------------------------------------------------------ the run
def fetch_smollm2() -> Path:
    found = subprocess.run(["bash", str(ROOT / "scripts" / "fetch-smollm2.sh")], capture_output=True, text=True,
                           check=True)
    return Path(found.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200, help="measured rounds, one request each way (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="rounds run first and not counted (default 10)")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens generated per request (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads, both sides (default 2)")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--gap-ms", type=float, default=20.0, help="pause between requests (default 20)")
    parser.add_argument("--model", type=Path, default=None, help="a GGUF (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()
    model_path = args.model or fetch_smollm2()

    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmpdir:
        tmp = Path(tmpdir)
        store = ModelStore(tmp / "state")
        record = store.import_model(model_path, MODEL)
        meta = store.meta(record)
        store.close()
        proc, sock = start_agent(tmp, agent_env(tmp, args.threads, args.context))
        # The provider the node's loader would start for this model, in this process.
        direct = residency_loader(n_threads=args.threads)(LoadRequest(
            digest=record.digest, name=MODEL, path=record.path, meta=meta, n_ctx=args.context))
        client = SseClient(sock)
        pods = httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://agent", timeout=60)
        try:
            tokens = direct.tokenize(PROMPT, add_bos=True, special=True)  # as the executor tokenizes a prompt
            rows: list[dict[str, Any]] = []
            index = 0
            while len(rows) < args.rounds:
                order = ("direct", "node") if index % 2 == 0 else ("node", "direct")
                row: dict[str, Any] = {}
                try:
                    for side in order:
                        time.sleep(args.gap_ms / 1000)
                        row[side] = (direct_once(direct, tokens, args.max_tokens) if side == "direct"
                                     else node_once(client, args.max_tokens))
                except Reconnected:
                    continue  # this round's node figure would include a new connection: run it again
                index += 1
                node = row["node"]
                pod = pods.get(f"/v1/pods/{node['pod']}").json()
                node["stages"] = stages(pod, node["sent_wall"], node["ttft_ms"])
                if index > args.warmup:
                    rows.append(row)
                if len(rows) and len(rows) % 50 == 0 and index > args.warmup:
                    print(f"... {len(rows)} rounds", file=sys.stderr, flush=True)
        finally:
            client.close()
            pods.close()
            direct.stop()
            proc.terminate()
            proc.wait(timeout=60)

    return report(rows, args, len(tokens), client.reconnects)


def report(rows: list[dict[str, Any]], args: argparse.Namespace, prompt_tokens: int, reconnects: int) -> int:
    direct = [r["direct"]["ttft_ms"] for r in rows]
    node = [r["node"]["ttft_ms"] for r in rows]
    added = [n - d for n, d in zip(node, direct)]
    evaluated = {side: sorted({r[side]["evaluated"] for r in rows}) for side in ("direct", "node")}
    prompts = {side: sorted({r[side]["prompt"] for r in rows}) for side in ("direct", "node")}
    figures = {"direct_ttft_ms": quantiles(direct), "node_ttft_ms": quantiles(node), "added_ms": quantiles(added),
               # from the last piece of text to the end of the answer (the call returns / [DONE])
               "direct_tail_ms": quantiles([r["direct"]["tail_ms"] for r in rows]),
               "node_tail_ms": quantiles([r["node"]["tail_ms"] for r in rows])}
    stage_names = list(rows[0]["node"]["stages"])
    stage_figures = {name: quantiles([r["node"]["stages"][name] for r in rows]) for name in stage_names}
    result = {"rounds": len(rows), "max_tokens": args.max_tokens, "threads": args.threads,
              "prompt_tokens": prompt_tokens, "prompt_tokens_seen": prompts, "evaluated_tokens": evaluated,
              "rounds_rerun_after_a_reconnect": reconnects,
              "load_average": os.getloadavg(), "cpus": os.cpu_count(), **figures, "node_stages_ms": stage_figures}
    print(f"{len(rows)} rounds, interleaved; prompt {prompts['direct']} tokens direct, {prompts['node']} via the "
          f"node; evaluated per request: direct {evaluated['direct']}, node {evaluated['node']}; "
          f"{args.max_tokens} tokens generated each")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs); "
          f"{reconnects} rounds run again after the agent closed an idle connection")
    print(f"{'time to first token':<28} {'p50':>8} {'p90':>8} {'p99':>8} {'mean':>8}")
    for name, q in (("direct (provider.generate)", figures["direct_ttft_ms"]),
                    ("node (POST /v1/completions)", figures["node_ttft_ms"]),
                    ("added by the node", figures["added_ms"])):
        print(f"{name:<28} {q['p50']:>8.2f} {q['p90']:>8.2f} {q['p99']:>8.2f} {q['mean']:>8.2f}")
    print("last piece of text to the end of the answer (the call returns; data: [DONE]):")
    for name, q in (("direct", figures["direct_tail_ms"]), ("node", figures["node_tail_ms"])):
        print(f"  {name:<26} {q['p50']:>8.2f} {q['p90']:>8.2f} {q['p99']:>8.2f} {q['mean']:>8.2f}")
    print("the node's time by stage (ms):")
    for name, q in stage_figures.items():
        print(f"  {name:<26} {q['p50']:>8.2f} {q['p90']:>8.2f} {q['p99']:>8.2f} {q['mean']:>8.2f}")
    ok = figures["added_ms"]["p50"] <= TARGET_MS
    same = prompts["direct"] == prompts["node"] and evaluated["direct"] == evaluated["node"]
    if not same:
        print("WARNING: the two sides did not evaluate the same prompt tokens; the comparison is not like for like")
    print(f"target: added p50 <= {TARGET_MS:.0f} ms -> {'met' if ok else 'NOT met'}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok and same else 1


if __name__ == "__main__":
    sys.exit(main())

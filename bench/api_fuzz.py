"""Schemathesis against a live `agent-machine serve` while pods execute (issue #11 D10).

    python -m bench.api_fuzz --cases 5000

Everything stays on this machine: the agent's Unix socket and TCP on 127.0.0.1.

1. A temporary state directory; a random-weight tiny GGUF is generated and
   imported with `agent-machine models import` (as scripts/demo.sh does).
2. `agent-machine serve` on its Unix socket and on TCP 127.0.0.1 (a port the
   kernel picks), with a fresh admin token.
3. `PodTraffic`, a background thread, keeps pods executing on the socket: it
   submits a two-turn pod of the tiny model, waits for it to end, and again,
   for the whole run. If its pod waits queued (the fuzzer may pause dispatch),
   it resumes dispatch, as an operator would, and counts that.
4. `schemathesis run` on the live ``/openapi.json`` with every check, in
   rounds of ``--max-examples`` per operation (seed, seed+1, ...) until the
   rounds have generated at least ``--cases`` test cases (with the hooks of
   `bench.api_fuzz_hooks`, for a reference JSON Schema cannot state).
5. It prints the counts: cases, 5xx (as schemathesis saw them, and as the
   server counted them: ``agent_machine_api_requests_total`` with a 5xx code),
   schema mismatches by check, other failures by check, errors, and the pods
   that ran meanwhile.

Exit status 1 on any 5xx, schema mismatch or schemathesis error (a server
that stops answering is one), else 0. Every step is bounded in time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# What each schemathesis failure type says about the document and the server.
SERVER_ERRORS = frozenset({"ServerError"})
SCHEMA_MISMATCHES = {  # failure type -> the check that found it
    "UndefinedStatusCode": "status_code_conformance",
    "UndefinedContentType": "content_type_conformance",
    "MissingContentType": "content_type_conformance",
    "MalformedMediaType": "content_type_conformance",
    "MissingHeaders": "response_headers_conformance",
    "JsonSchemaError": "response_schema_conformance",
    "DiscriminatorMismatch": "response_schema_conformance",
    "ContentDeserializationError": "response_schema_conformance",
    "MalformedJson": "response_schema_conformance",
    "RejectedPositiveData": "positive_data_acceptance",
    "AcceptedNegativeData": "negative_data_rejection",
    "MissingHeaderNotRejected": "missing_required_header",
    "UnsupportedMethodResponse": "unsupported_method",
    "AllowHeaderMismatch": "allow_header_conformance",
}
OTHER_CHECKS = {
    "UseAfterFree": "use_after_free",
    "EnsureResourceAvailability": "ensure_resource_availability",
    "IgnoredAuth": "ignored_auth",
    "ObjectLevelAuthorizationViolation": "object_level_authorization",
    "ResponseTimeExceeded": "max_response_time",
    "CustomFailure": "custom",
}
TERMINAL = frozenset({"Succeeded", "Failed", "Cancelled", "Refused"})
REPO = Path(__file__).resolve().parent.parent
MODEL = "tiny"


@dataclass
class Agent:
    """A served agent in its own state directory."""

    root: Path
    env: dict[str, str]
    socket: Path
    token: str
    process: subprocess.Popen[bytes] | None = None
    url: str = ""

    def client(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://agent",
                            timeout=timeout)


def prepare(root: Path) -> Agent:
    """State dirs, a token, the tiny model generated and imported."""
    dirs = {name: root / name for name in ("state", "config", "cache", "run", "t1")}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AGENT_MACHINE_")},
           "AGENT_MACHINE_STATE_DIR": str(dirs["state"]), "AGENT_MACHINE_CONFIG_DIR": str(dirs["config"]),
           "AGENT_MACHINE_CACHE_DIR": str(dirs["cache"]), "AGENT_MACHINE_RUNTIME_DIR": str(dirs["run"]),
           "AGENT_MACHINE_CACHE_RAM_DIR": str(dirs["t1"]), "AGENT_MACHINE_MODELS_DEFAULT": MODEL,
           "AGENT_MACHINE_API_TCP": "127.0.0.1:0", "AGENT_MACHINE_API_TOKEN_FILE": str(root / "token")}
    token = secrets.token_urlsafe(32)
    fd = os.open(root / "token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    cli = [sys.executable, "-m", "nodeagent.cli"]
    model = root / "tiny.gguf"
    for step in (["models", "create-test-model", "--preset", "tiny", str(model)],
                 ["models", "import", str(model), "--name", MODEL]):
        done = subprocess.run([*cli, *step], env=env, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise SystemExit(f"api_fuzz: agent-machine {' '.join(step)} failed:\n{done.stderr}")
    return Agent(root=root, env=env, socket=dirs["run"] / "api.sock", token=token)


def serve(agent: Agent, timeout_s: float = 60.0) -> None:
    """Start `agent-machine serve`; wait until it is ready and learn its TCP address."""
    log = open(agent.root / "serve.log", "wb")  # noqa: SIM115 - closed with the process
    agent.process = subprocess.Popen([sys.executable, "-m", "nodeagent.cli", "serve", "--access-log"], env=agent.env,
                                     stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if agent.process.poll() is not None:
            raise SystemExit(f"api_fuzz: serve exited with {agent.process.returncode}; see {agent.root}/serve.log")
        try:
            with agent.client(timeout=2) as client:
                if client.get("/readyz").status_code == 200:
                    listeners = client.get("/v1/status").json()["listeners"]
                    tcp = next(label for label in listeners if label.startswith("tcp:"))
                    agent.url = "http://" + tcp.removeprefix("tcp:")
                    return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.2)
    raise SystemExit(f"api_fuzz: serve was not ready within {timeout_s:g}s; see {agent.root}/serve.log")


def stop(agent: Agent, timeout_s: float = 45.0) -> int | None:
    """SIGTERM (the agent drains), then SIGKILL if it does not exit in time."""
    if agent.process is None or agent.process.poll() is not None:
        return None if agent.process is None else agent.process.returncode
    agent.process.send_signal(signal.SIGTERM)
    try:
        return agent.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        agent.process.kill()
        return agent.process.wait(timeout=10)


def server_5xx(agent: Agent) -> int:
    """5xx answers the server itself counted (every request, whoever sent it)."""
    with agent.client() as client:
        text = client.get("/metrics").text
    total = 0
    for line in text.splitlines():
        if line.startswith("agent_machine_api_requests_total{") and re.search(r'code="5\d\d"', line):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


# ---------------------------------------------------------------- pods executing throughout
def pod_body(index: int) -> dict[str, Any]:
    return {"kind": "AgentPod",
            "metadata": {"name": f"traffic-{index}", "tenant": "bench", "agent": "traffic"},
            "spec": {"model": {"name": MODEL},
                     "context": [{"role": "system", "text": "You answer briefly.", "scope": "private"}],
                     "turns": [{"messages": [{"role": "user", "content": f"question {index}"}], "maxTokens": 8},
                               {"messages": [{"role": "user", "content": "and then?"}], "maxTokens": 8}]}}


class PodTraffic(threading.Thread):
    """Pods of the tiny model, one after another, on the socket, until `finish`."""

    def __init__(self, agent: Agent, pod_timeout_s: float = 120.0) -> None:
        super().__init__(name="pod-traffic", daemon=True)
        self.agent = agent
        self.pod_timeout_s = pod_timeout_s
        self.phases: Counter[str] = Counter()  # terminal phase (or what went wrong) -> pods
        self.refusals: Counter[int] = Counter()  # submit answers other than 201
        self.resumed = 0
        self.turns = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        index = 0
        with self.agent.client() as client:
            while not self.stop_event.is_set():
                index += 1
                try:
                    self._one(client, index)
                except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
                    self.phases[f"client error: {type(exc).__name__}"] += 1
                    self.stop_event.wait(1.0)

    def _one(self, client: httpx.Client, index: int) -> None:
        answer = client.post("/v1/pods", json=pod_body(index))
        if answer.status_code != 201:
            self.refusals[answer.status_code] += 1
            self.stop_event.wait(float(answer.headers.get("retry-after", "1")))
            return
        pod_id = answer.json()["id"]
        deadline = time.monotonic() + self.pod_timeout_s
        queued_since = time.monotonic()
        while time.monotonic() < deadline:
            pod = client.get(f"/v1/pods/{pod_id}").json()
            phase = pod["status"]["phase"]
            if phase in TERMINAL:
                self.phases[phase] += 1
                self.turns += len(pod["status"]["turns"])
                return
            if phase in ("Pending", "Admitted") and time.monotonic() - queued_since > 5:
                client.post("/v1/dispatch:resume")  # the fuzzer may have paused dispatch
                self.resumed += 1
                queued_since = time.monotonic()
            time.sleep(0.05)
        self.phases["timed out"] += 1

    def finish(self, timeout_s: float) -> None:
        self.stop_event.set()
        self.join(timeout_s)


# ---------------------------------------------------------------- schemathesis
@dataclass
class Round:
    seed: int
    cases: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # failure type -> unique failures
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    exit_code: int | None = None


def run_round(agent: Agent, *, seed: int, examples: int, workers: int, time_limit_s: float, out: Path) -> Round:
    report = out / f"schemathesis-{seed}.json"
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{agent.url}/openapi.json",
               "--checks", "all", "-H", f"Authorization: Bearer {agent.token}",
               "--max-examples", str(examples), "--seed", str(seed), "--workers", str(workers),
               "--max-redirects", "0", "--request-timeout", "60", "--generation-database", "none",
               "--no-shrink", "--no-color", "--report", "json", "--report-json-path", str(report)]
    # (Not schemathesis' --max-time: with it, fuzzing repeats until the time is spent.)
    began = time.monotonic()
    with open(out / f"schemathesis-{seed}.log", "wb") as log:
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "bench.api_fuzz_hooks",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=out, env=env)
        try:
            code: int | None = process.wait(timeout=time_limit_s)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGINT)  # it stops and still writes its report
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            code = None
    result = Round(seed=seed, seconds=time.monotonic() - began, exit_code=code)
    if code is None:
        result.errors.append(f"the round ran past its {time_limit_s:.0f} s and was interrupted")
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        result.errors.append(f"no report (exit {code}); see {out}/schemathesis-{seed}.log")
        return result
    result.cases = int(data["test_cases"]["generated"])
    for failure in data.get("failures", []):
        result.failures[failure["type"]] += int(failure.get("count", 1))
    result.errors = [json.dumps(error)[:300] for error in data.get("errors", [])]
    return result


def logged_errors(agent: Agent) -> Counter[str]:
    """ERROR lines of the agent's log by logger and first words (not counted as failures:
    a pod that could not be receipted, say, is worth reading, whatever it answered)."""
    found: Counter[str] = Counter()
    for line in (agent.root / "serve.log").read_text(errors="replace").splitlines():
        match = re.match(r"^\S+ \S+ ERROR (\S+) (.{0,60})", line)
        if match:
            found[f"{match.group(1)} {re.sub(r'[0-9a-f]{16}', '<id>', match.group(2))}"] += 1
    return found


def summarise(rounds: list[Round], traffic: PodTraffic, server_errors: int, elapsed_s: float) -> tuple[str, bool]:
    cases = sum(r.cases for r in rounds)
    failures: Counter[str] = Counter()
    for r in rounds:
        failures.update(r.failures)
    errors = [e for r in rounds for e in r.errors]
    five_xx = sum(n for kind, n in failures.items() if kind in SERVER_ERRORS)
    mismatches: Counter[str] = Counter()
    other: Counter[str] = Counter()
    for kind, n in failures.items():
        if kind in SCHEMA_MISMATCHES:
            mismatches[f"{SCHEMA_MISMATCHES[kind]} ({kind})"] += n
        elif kind not in SERVER_ERRORS:
            other[f"{OTHER_CHECKS.get(kind, 'unknown')} ({kind})"] += n
    lines = [
        f"cases: {cases} in {len(rounds)} round(s), seeds {', '.join(str(r.seed) for r in rounds)}, "
        f"{elapsed_s:.0f} s",
        f"5xx: {five_xx} seen by schemathesis (unique failures), {server_errors} counted by the server",
        f"schema mismatches: {sum(mismatches.values())}"
        + "".join(f"\n  {name}: {n}" for name, n in sorted(mismatches.items())),
        f"other failures: {sum(other.values())}" + "".join(f"\n  {name}: {n}" for name, n in sorted(other.items())),
        f"schemathesis errors: {len(errors)}" + "".join(f"\n  {e}" for e in errors[:10]),
        f"pods meanwhile: {sum(n for p, n in traffic.phases.items() if p in TERMINAL)} ended "
        f"({', '.join(f'{p} {n}' for p, n in sorted(traffic.phases.items()))}), {traffic.turns} turns; "
        f"submits refused: {dict(traffic.refusals) or 'none'}; dispatch resumed {traffic.resumed}x",
    ]
    ok = five_xx == 0 and server_errors == 0 and not mismatches and not errors
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.api_fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=5000, help="test cases to generate in all (default 5000)")
    parser.add_argument("--examples", type=int, default=0,
                        help="--max-examples per operation and round (default: cases / operations)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-time", type=float, default=3000, help="time budget for all rounds, seconds")
    parser.add_argument("--keep", type=Path, default=None, help="keep the state dir, logs and reports here")
    args = parser.parse_args(argv)

    root = args.keep or Path(tempfile.mkdtemp(prefix="api-fuzz-"))
    root.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    agent = prepare(root)
    serve(agent)
    traffic = PodTraffic(agent)
    rounds: list[Round] = []
    try:
        with agent.client() as client:
            operations = sum(len(ops) for ops in client.get("/openapi.json").json()["paths"].values())
        examples = args.examples or max(10, math.ceil(args.cases / operations))
        print(f"api_fuzz: {agent.url} ({operations} operations), {examples} examples per operation and round; "
              f"state in {root}", flush=True)
        traffic.start()
        seed = args.seed
        while sum(r.cases for r in rounds) < args.cases:
            left = args.max_time - (time.monotonic() - began)
            if left < 30:
                print("api_fuzz: time budget spent before the case target", flush=True)
                break
            result = run_round(agent, seed=seed, examples=examples, workers=args.workers, time_limit_s=left,
                               out=root)
            rounds.append(result)
            print(f"api_fuzz: round seed={seed}: {result.cases} cases, {sum(result.failures.values())} "
                  f"unique failures, {len(result.errors)} errors, {result.seconds:.0f} s", flush=True)
            if agent.process is not None and agent.process.poll() is not None:
                rounds[-1].errors.append(f"the agent exited with {agent.process.returncode} during the run")
                break
            seed += 1
        traffic.finish(timeout_s=150)
        alive = agent.process is not None and agent.process.poll() is None
        server_errors = server_5xx(agent) if alive else -1
    finally:
        traffic.stop_event.set()
        code = stop(agent)
    summary, ok = summarise(rounds, traffic, server_errors, time.monotonic() - began)
    enough = sum(r.cases for r in rounds) >= args.cases
    print(summary)
    errors_logged = logged_errors(agent)
    print(f"agent log ERROR lines: {sum(errors_logged.values())}"
          + "".join(f"\n  {n} x {what}" for what, n in errors_logged.most_common(10)))
    print(f"agent exit: {code}; state, logs and reports: {root}")
    if not enough:
        print(f"api_fuzz: FAILED: fewer than {args.cases} cases")
    print("api_fuzz: " + ("OK" if ok and enough else "FAILED"))
    return 0 if ok and enough else 1


if __name__ == "__main__":
    sys.exit(main())

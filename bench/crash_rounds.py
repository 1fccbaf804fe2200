"""Kill -9 the node at random moments; no turn may be left without its receipt.

Each round starts a fresh agent process on one state directory (the real
`Node` with the embedded default executor and the tiny test model), which
first recovers whatever the previous round left in flight, then keeps
submitting multi-turn pods. The parent kills it with SIGKILL:

* at a random moment (uniform over the round), or
* exactly after a turn's generation and before its receipt is appended, or
  exactly after the receipt is durable and before the turn is recorded — the
  child arms a one-shot SIGKILL at that point (fault injection, one round in
  three each), since a random moment rarely lands in a few-millisecond window.

After each kill the parent reads the state database and the receipt log and
checks the invariant of docs/receipts.md, "receipt before report":

* every recorded turn (pod_turns) has a succeeded receipt with its run id;
* every pod in a terminal phase has at least one receipt.

At the end one more clean start recovers the last round, stops, and the whole
log is verified offline (`verify_bundle`: signatures, chain, checkpoints).

    python -m bench.crash_rounds --rounds 200          # issue #11's D3 acceptance
    python -m bench.crash_rounds --rounds 10 --format json

Exit status 1 when any round breaks the invariant or the log does not verify.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

KILL_POINTS = ("random", "before-receipt", "after-receipt")


def env_for(root: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_MACHINE_")}
    return {**base, "HOME": str(root), "AGENT_MACHINE_STATE_DIR": str(root / "state"),
            "AGENT_MACHINE_CONFIG_DIR": str(root / "cfg"), "AGENT_MACHINE_CACHE_DIR": str(root / "cache"),
            "AGENT_MACHINE_RUNTIME_DIR": str(root / "run"), "AGENT_MACHINE_CACHE_RAM_DIR": str(root / "t1"),
            "AGENT_MACHINE_MODELS_THREADS": "1"}


# ------------------------------------------------------------------ the child: one agent life
def child(root: Path, kill_point: str, seed: int) -> None:
    """Run an agent on ``root`` until killed; print READY once pods flow."""
    from nodeagent.config import load_config
    from nodeagent.contracts.pod import TERMINAL_PHASES, AgentPod
    from nodeagent.node import Node, default_executor

    node = Node(load_config(env_for(root)), executor_factory=default_executor)
    node.start()  # recovers the pods the previous life left in flight
    rng = random.Random(seed)
    if kill_point != "random":
        arm_kill(node, kill_point, after_turns=rng.randint(0, 3))
    print("READY", flush=True)
    n = 0
    while True:
        turns = rng.randint(1, 3)
        pod = AgentPod.model_validate({
            "metadata": {"name": f"crash-{seed}-{n}", "tenant": "acme", "agent": f"a{n % 3}"},
            "spec": {"model": {"name": "tiny"},
                     "context": [{"role": "system", "text": "You answer briefly. " * rng.randint(2, 20)}],
                     "turns": [{"messages": [{"role": "user", "content": f"question {i} of pod {n}"}],
                                "maxTokens": rng.randint(2, 12)} for i in range(turns)]}})
        submitted = node.submit_pod(pod)
        while node.get_pod(submitted.id).status.phase not in TERMINAL_PHASES:
            time.sleep(0.005)
        n += 1


def arm_kill(node, point: str, after_turns: int) -> None:
    """SIGKILL this process at ``point`` of the turn after ``after_turns`` more turns."""
    log = node.executor.receipts
    append = log.append
    remaining = [after_turns]

    def append_then_maybe_die(data):
        is_turn = data.outcome.status == "succeeded"
        if is_turn and remaining[0] == 0 and point == "before-receipt":
            os.kill(os.getpid(), signal.SIGKILL)  # generated, not yet signed
        appended = append(data)
        if is_turn and remaining[0] == 0 and point == "after-receipt":
            os.kill(os.getpid(), signal.SIGKILL)  # signed and durable, not yet recorded
        if is_turn:
            remaining[0] -= 1
        return appended

    log.append = append_then_maybe_die


# ------------------------------------------------------------------ the parent
@dataclass
class RoundResult:
    round: int
    kill_point: str
    killed_after_s: float
    turns: int  # turns recorded in the state database so far
    receipts: int  # execution receipts in the log so far
    missing: list[str] = field(default_factory=list)  # run ids of turns without a receipt
    unreceipted_pods: list[str] = field(default_factory=list)  # terminal pods without any receipt


def check_invariant(root: Path) -> tuple[int, int, list[str], list[str]]:
    from nodeagent.receipts import LogReader, receipts_dir

    state = root / "state"
    runs: dict[str, str] = {}
    with LogReader(receipts_dir(state)) as reader:
        for row in reader.rows(newest_first=False):
            if row.kind == "execution":
                predicate = reader.view(row)[0].statement.predicate
                runs[predicate.pod.run_id] = predicate.outcome.status
    conn = sqlite3.connect(f"file:{state / 'state.db'}?mode=ro", uri=True)
    try:
        turns = conn.execute("SELECT pod_id, idx FROM pod_turns").fetchall()
        terminal = [r[0] for r in conn.execute(
            "SELECT id FROM pods WHERE phase IN ('Succeeded', 'Failed', 'Cancelled', 'Refused')")]
    finally:
        conn.close()
    missing = [f"{pod}-t{idx}" for pod, idx in turns if runs.get(f"{pod}-t{idx}") != "succeeded"]
    pods_with_receipts = {run.split("-t")[0] for run in runs}
    unreceipted = [pod for pod in terminal if pod not in pods_with_receipts]
    return len(turns), len(runs), missing, unreceipted


def prepare(root: Path) -> None:
    from nodeagent.models.store import ModelStore
    from nodeagent.models.testmodel import create_test_model

    model = create_test_model(root / "tiny.gguf", preset="tiny")
    store = ModelStore(root / "state")
    store.import_model(model, "tiny")
    store.close()


def start_child(root: Path, point: str, seed: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "bench.crash_rounds", "--child", str(root),
                             "--kill-point", point, "--seed", str(seed)],
                            env=env_for(root), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=Path(__file__).resolve().parents[1])


def run_rounds(rounds: int, seed: int = 0, root: Path | None = None,
               progress=lambda r: None) -> dict:
    rng = random.Random(seed)
    root = root or Path(tempfile.mkdtemp(prefix="crash-rounds-"))
    prepare(root)
    results: list[RoundResult] = []
    began = time.monotonic()
    for index in range(rounds):
        point = KILL_POINTS[index % 3]
        proc = start_child(root, point, seed * 100_000 + index)
        ready = proc.stdout.readline().strip() == "READY" if proc.stdout else False
        if not ready:
            proc.kill()
            raise RuntimeError(f"round {index}: the agent did not start (exit {proc.wait()})")
        started = time.monotonic()
        if point == "random":
            time.sleep(rng.uniform(0.0, 1.5))
            proc.send_signal(signal.SIGKILL)
        try:
            proc.wait(timeout=60)  # armed rounds kill themselves at their point
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        turns, receipts, missing, unreceipted = check_invariant(root)
        result = RoundResult(index, point, round(time.monotonic() - started, 3), turns, receipts,
                             missing, unreceipted)
        results.append(result)
        progress(result)
    # One clean life recovers the last round's pods and signs a checkpoint.
    final = start_child(root, "random", -1)
    if final.stdout:
        final.stdout.readline()
    final.send_signal(signal.SIGTERM)
    final.wait(timeout=60)
    turns, receipts, missing, unreceipted = check_invariant(root)
    from nodeagent.receipts import verify_bundle
    from nodeagent.receipts.machine import receipts_dir

    report = verify_bundle(receipts_dir(root / "state"))
    return {
        "rounds": rounds, "seed": seed, "seconds": round(time.monotonic() - began, 1),
        "by_kill_point": {p: sum(1 for r in results if r.kill_point == p) for p in KILL_POINTS},
        "turns": turns, "receipts": receipts,
        "turns_without_receipt": sorted({m for r in results for m in r.missing} | set(missing)),
        "terminal_pods_without_receipt": sorted({p for r in results for p in r.unreceipted_pods} | set(unreceipted)),
        "log_verifies": report.ok, "log_failures": [str(f) for f in report.failures][:10],
        "state_dir": str(root / "state"),
        "rounds_detail": [asdict(r) for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.crash_rounds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--kill-point", choices=KILL_POINTS, default="random", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child, args.kill_point, args.seed)
        return 0

    def progress(r: RoundResult) -> None:
        if args.format == "table":
            flag = "" if not (r.missing or r.unreceipted_pods) else f"  BROKEN {r.missing + r.unreceipted_pods}"
            print(f"round {r.round:3d} {r.kill_point:14s} killed after {r.killed_after_s:6.2f}s  "
                  f"turns {r.turns:5d}  receipts {r.receipts:5d}{flag}", file=sys.stderr, flush=True)

    summary = run_rounds(args.rounds, args.seed, progress=progress)
    ok = not summary["turns_without_receipt"] and not summary["terminal_pods_without_receipt"] \
        and summary["log_verifies"]
    if args.format == "json":
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['rounds']} rounds of kill -9 ({summary['by_kill_point']}) in {summary['seconds']} s: "
              f"{summary['turns']} turns, {summary['receipts']} receipts; "
              f"turns without a receipt: {len(summary['turns_without_receipt'])}; "
              f"ended pods without a receipt: {len(summary['terminal_pods_without_receipt'])}; "
              f"log verifies: {'yes' if summary['log_verifies'] else 'NO ' + '; '.join(summary['log_failures'])}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

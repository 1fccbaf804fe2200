"""`pods submit|ls|get|cancel|score|conflicts`: agent pods through the running agent."""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from nodeagent.cli.output import CliError, add_format_option, add_group, emit, print_json, render_table

EXAMPLE = """\
example pod (pod.json):
  {"kind": "AgentPod",
   "metadata": {"name": "triage-1", "tenant": "acme", "agent": "triage"},
   "spec": {"model": {"name": "tiny"},
            "context": [{"role": "system", "text": "You triage bug reports.", "scope": "tenant"}],
            "turns": [{"messages": [{"role": "user", "content": "Crash on start"}], "maxTokens": 64}]}}

  agent-machine pods submit pod.json --wait
  agent-machine pods score pod.json          # where would it run, and why (dry run)
"""


def register(subparsers: Any) -> None:
    group = add_group(subparsers, "pods", "agent pods: submit, inspect, cancel, score, conflicts")

    submit = group.add_parser(
        "submit", help="submit an AgentPod (JSON or TOML file, or - for stdin)",
        description="Validate an AgentPod locally, then submit it to the running agent. "
        "With --wait, follow it to the end and print each turn.",
        epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    submit.add_argument("file", metavar="FILE")
    submit.add_argument("--wait", action="store_true", help="follow the pod until it ends")
    add_format_option(submit)
    submit.set_defaults(func=_submit)

    ls = group.add_parser("ls", help="list pods (newest first)")
    ls.add_argument("--phase", help="only pods in this phase (Pending, Running, Succeeded, ...)")
    ls.add_argument("--tenant", help="only this tenant's pods")
    ls.add_argument("--limit", type=int, default=50)
    add_format_option(ls)
    ls.set_defaults(func=_ls)

    get = group.add_parser("get", help="one pod with its transitions and turns")
    get.add_argument("pod_id", metavar="ID")
    add_format_option(get)
    get.set_defaults(func=_get)

    cancel = group.add_parser("cancel", help="cancel a pod (a running one stops at its next turn)")
    cancel.add_argument("pod_id", metavar="ID")
    add_format_option(cancel)
    cancel.set_defaults(func=_cancel)

    score = group.add_parser("score", help="dry-run placement: every candidate with its TTFT terms",
                             description="Ask the agent where this pod's first turn would run and why. "
                             "Nothing runs and nothing is reserved.")
    score.add_argument("file", metavar="FILE")
    add_format_option(score)
    score.set_defaults(func=_score)

    conflicts = group.add_parser(
        "conflicts", help="in-flight pods that contend for a provider or would evict each other's cache")
    add_format_option(conflicts)
    conflicts.set_defaults(func=_conflicts)


# ------------------------------------------------------------------ helpers
def _read_pod(path: str):
    from pydantic import ValidationError

    from nodeagent.contracts.pod import AgentPod

    try:
        raw = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(raw) if path.endswith(".toml") else json.loads(raw)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"{path} is not valid {'TOML' if path.endswith('.toml') else 'JSON'}: {exc}") from exc
    try:
        return AgentPod.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise CliError(f"{path}: {problems}", exit_code=2) from exc


def _client():
    from nodeagent.client import AgentClient

    return AgentClient.from_env()


def _call(method: str, *args: Any, **kwargs: Any) -> Any:
    from nodeagent.client import AgentNotRunning, ApiError

    with _client() as client:
        try:
            return getattr(client, method)(*args, **kwargs)
        except AgentNotRunning as exc:
            raise CliError(str(exc)) from exc
        except ApiError as exc:
            raise CliError(str(exc), exit_code=2 if 400 <= exc.status < 500 else 1) from exc


def _pod_table(pod: dict[str, Any]) -> str:
    status = pod.get("status") or {}
    meta = pod["metadata"]
    lines = [f"pod:     {pod.get('id')}  {meta['name']} (tenant {meta['tenant']}, agent {meta['agent']}, "
             f"session {meta.get('session', 'default')})",
             f"model:   {pod['spec']['model'].get('name') or pod['spec']['model'].get('digest')}",
             f"phase:   {status.get('phase')}"]
    for reason in status.get("reasons", []):
        lines.append(f"reason:  {reason}")
    if status.get("transitions"):
        lines.append("history: " + " -> ".join(f"{t['phase']}" for t in status["transitions"]))
    turns = status.get("turns", [])
    if turns:
        lines.append("")
        lines.append(render_table(
            ("turn", "provider", "cache", "cached", "evaluated", "prompt", "completion", "ttft_ms", "output"),
            [(t["index"], t["provider"], t["cacheTier"], t["cachedTokens"], t["evaluatedTokens"],
              t["promptTokens"], t["completionTokens"], t["ttftMs"], _clip(t["output"])) for t in turns]))
    if status.get("receiptIds"):
        lines.append("")
        lines.append("receipts: " + ", ".join(r[:16] for r in status["receiptIds"]))
    return "\n".join(lines)


def _clip(text: str, width: int = 40) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


# ------------------------------------------------------------------ commands
def _submit(args: argparse.Namespace) -> int:
    pod = _read_pod(args.file)
    created = _call("post", "/v1/pods", json=pod.to_wire())
    if args.wait and (created.get("status") or {}).get("phase") not in ("Succeeded", "Failed", "Cancelled", "Refused"):
        from nodeagent.client import AgentNotRunning

        with _client() as client:
            try:
                for line in client.stream_lines(f"/v1/pods/{created['id']}/events"):
                    if args.format == "table":
                        event = json.loads(line.removeprefix("data:").strip() or "{}")
                        if event.get("phase") and event.get("at"):
                            print(f"{event['at']}  {event['phase']}", file=sys.stderr)
            except AgentNotRunning as exc:
                raise CliError(str(exc)) from exc
        created = _call("get", f"/v1/pods/{created['id']}")
    emit(created, args.format, _pod_table)
    phase = (created.get("status") or {}).get("phase")
    return 0 if phase in (None, "Admitted", "Pending", "Placed", "Running", "Succeeded") else 1


def _ls(args: argparse.Namespace) -> int:
    from nodeagent.client import AgentNotRunning

    params = {k: v for k, v in (("phase", args.phase), ("tenant", args.tenant), ("limit", args.limit)) if v}
    try:
        with _client() as client:
            data = client.get("/v1/pods", params=params)
        pods = data["items"] if isinstance(data, dict) else data
    except AgentNotRunning:
        pods = _local_pods(args)  # the history is in SQLite even when the agent is down
    rows = [(p["id"], p["metadata"]["name"], p["metadata"]["tenant"], p["metadata"]["agent"],
             (p.get("status") or {}).get("phase"), len((p.get("status") or {}).get("turns", [])),
             ((p.get("status") or {}).get("transitions") or [{}])[0].get("at", "")[:19]) for p in pods]
    emit(pods, args.format, lambda _: render_table(("id", "name", "tenant", "agent", "phase", "turns", "created"), rows))
    return 0


def _local_pods(args: argparse.Namespace) -> list[dict[str, Any]]:
    from nodeagent.contracts.pod import PodPhase
    from nodeagent.paths import resolve_paths
    from nodeagent.pods import PodStore
    from nodeagent.store import connect

    db = resolve_paths().db_file
    if not db.exists():
        return []
    try:
        phase = PodPhase(args.phase) if args.phase else None
    except ValueError as exc:
        raise CliError(f"--phase must be one of {', '.join(p.value for p in PodPhase)}", exit_code=2) from exc
    store = PodStore(connect(db))
    return [p.to_wire() for p in store.list(phase=phase, tenant=args.tenant, limit=args.limit)]


def _get(args: argparse.Namespace) -> int:
    from nodeagent.client import AgentNotRunning, ApiError

    try:
        with _client() as client:
            pod = client.get(f"/v1/pods/{args.pod_id}")
    except ApiError as exc:
        raise CliError(str(exc)) from exc
    except AgentNotRunning:
        from nodeagent.paths import resolve_paths
        from nodeagent.pods import PodNotFound, PodStore
        from nodeagent.store import connect

        try:
            pod = PodStore(connect(resolve_paths().db_file)).get(args.pod_id).to_wire()
        except PodNotFound as exc:
            raise CliError(str(exc)) from exc
    emit(pod, args.format, _pod_table)
    return 0


def _cancel(args: argparse.Namespace) -> int:
    pod = _call("delete", f"/v1/pods/{args.pod_id}")
    emit(pod, args.format, _pod_table)
    return 0


def _score(args: argparse.Namespace) -> int:
    from nodeagent.contracts.placement import PlacementDecision
    from nodeagent.scheduler.placement import explain

    pod = _read_pod(args.file)
    decision = _call("post", "/v1/placements:score", json=pod.to_wire())
    if args.format == "json":
        print_json(decision)
    else:
        print(explain(PlacementDecision.model_validate(decision)))
    return 0


def _conflicts(args: argparse.Namespace) -> int:
    data = _call("get", "/v1/pods:conflicts")
    items = data["items"] if isinstance(data, dict) else data
    rows = [(c["kind"], c.get("provider") or c.get("tier"), ", ".join(p[:8] for p in c["pods"]), c["detail"])
            for c in items]
    emit(items, args.format,
         lambda _: render_table(("kind", "where", "pods", "detail"), rows) if rows else "no conflicts")
    return 0

"""`agent-machine render plan POD`: everything the node would do for a pod, without doing it.

Admission, the grant check, the activation preconditions, the placement
decision with its terms (from the running daemon: ``POST /v1/placements:score``),
which state it would restore from which tier, which model it would load and
which provider it would start. Nothing runs, nothing is logged
(`nodeagent.governance.plan`).
"""

from __future__ import annotations

import argparse
from typing import Any

from nodeagent.cli.output import CliError, add_format_option, emit, render_table

EPILOG = """\
examples:
  agent-machine render plan pod.json                    the plan, for people
  agent-machine render plan pod.json --format json      the PodPlan document
  agent-machine render plan pod.toml --grant acme.grant with the grant the pod would carry
Exit status 1 when the node would not run the pod.
"""


def register(group: Any) -> None:
    plan = group.add_parser("plan", help="what the node would do for a pod, without doing it", epilog=EPILOG,
                            description=__doc__.split("\n\n")[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_format_option(plan)
    plan.add_argument("pod", help="the pod (JSON or TOML), '-' for stdin")
    plan.add_argument("--grant", metavar="FILE", help="the grant the pod's request would carry")
    plan.set_defaults(func=_plan)


def _placement(pod) -> tuple[dict | None, str | None]:
    from nodeagent.client import AgentClient, AgentNotRunning, ApiError

    try:
        with AgentClient.from_env() as client:
            return client.post("/v1/placements:score", json=pod.to_wire()), None
    except AgentNotRunning:
        return None, "no placement: the daemon is not running (agent-machine serve); a cold start would load the model"
    except ApiError as exc:
        return None, f"no placement: the daemon answered {exc}"


def _table(plan: dict) -> str:
    lines = [f"pod {plan['pod']['tenant']}/{plan['pod']['agent']}/{plan['pod']['name']}: "
             f"{'WOULD RUN' if plan['wouldRun'] else 'WOULD NOT RUN'}", ""]
    lines += [f"  {i + 1}. {step}" for i, step in enumerate(plan["steps"])]
    lines += ["", render_table(("precondition", "state", "detail"),
                               [(p["name"], "ok" if p["ok"] else "LACKING", p["detail"])
                                for p in plan["activation"]["preconditions"]])]
    placement = plan.get("placement")
    if placement:
        lines += ["", f"placement: {placement.get('chosen')} ({placement.get('reason')})",
                  render_table(("candidate", "eligible", "cache", "cached", "ttft_s"),
                               [(c["provider"], c["eligible"], c["cacheSource"], c["cachedTokens"], c["ttftS"])
                                for c in placement.get("candidates", [])])]
    elif plan.get("placementNote"):
        lines += ["", plan["placementNote"]]
    for provider in plan.get("providers") or []:
        verdict = (provider["activation"] or {}).get("verdict", "n/a")
        lines.append(f"would start: {provider['provider']} ({provider['kind']}, {provider['mode']}) — activation "
                     f"{verdict}")
    return "\n".join(lines)


def _plan(args: argparse.Namespace) -> int:
    from nodeagent.cli.governance import _loaded, _read
    from nodeagent.cli.pods import _read_pod
    from nodeagent.governance.grants import GrantError, read_grant_text
    from nodeagent.governance.plan import plan_pod
    from nodeagent.node import Node

    pod = _read_pod(args.pod)
    try:
        grant_line = read_grant_text(_read(args.grant)) if args.grant else None
    except GrantError as exc:
        raise CliError(f"--grant {args.grant}: {exc}", exit_code=2) from exc
    placement, note = _placement(pod)
    plan = plan_pod(Node(_loaded()), pod, grant_line=grant_line, placement=placement, placement_note=note)
    emit(plan, args.format, _table)
    return 0 if plan["wouldRun"] else 1

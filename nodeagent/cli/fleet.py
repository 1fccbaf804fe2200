"""`fleet ps|score|conflicts`: several agents seen together (nodeagent.fleetview)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nodeagent.cli.output import CliError, add_format_option, add_group, emit, human_bytes, render_table

NODES_HELP = "a TOML file of [[nodes]] tables: name, url (http://host:port or unix:///path), token_file"

EPILOG = """\
nodes file (nodes.toml):
  [[nodes]]
  name = "gpu-1"
  url = "http://10.0.0.5:8377"
  token_file = "gpu-1.token"        # relative to the nodes file; required for http(s)

  [[nodes]]
  name = "laptop"
  url = "unix:///run/user/1000/agent-machine/api.sock"

examples:
  agent-machine fleet ps --nodes nodes.toml                  every node: state, heartbeat, hot models, cache
  agent-machine fleet ps --nodes nodes.toml --format json    the same for scripts
  agent-machine fleet score pod.json --nodes nodes.toml      nodes ranked by where the pod would start fastest
  agent-machine fleet conflicts --nodes nodes.toml           in-flight pods that contend, on a node or across nodes

A node is healthy when it answered within 3x its interval (interval_s, default 5 s);
one that does not answer is shown stopped, with how long ago it last did.
`fleet ps` exits 1 when a node is not healthy.
"""


def register(subparsers: Any) -> None:
    group = add_group(subparsers, "fleet", "several agents at once: ps, score a pod across them, conflicts")

    def command(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        parser = group.add_parser(name, help=help_text, description=description, epilog=EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--nodes", required=True, type=Path, metavar="FILE", help=NODES_HELP)
        add_format_option(parser)
        return parser

    ps = command("ps", "every node: host, tenants, state, heartbeat age, drift, hot models, cache use",
                 "Ask every node of FILE for its status and join the answers, one row per node.")
    ps.add_argument("--seen-file", type=Path, default=None, metavar="FILE",
                    help="where the last answer of each node is remembered (default: <cache dir>/fleet-seen.json)")
    ps.set_defaults(func=_ps)

    score = command("score", "rank the nodes for a pod by their dry-run placements",
                    "Ask every node's placements:score for POD (an AgentPod, JSON or TOML) and rank them: "
                    "lowest estimated time to first token first. Nothing runs.")
    score.add_argument("pod", metavar="POD", help="AgentPod file (JSON, or TOML by its .toml suffix; - for stdin)")
    score.set_defaults(func=_score)

    conflicts = command("conflicts", "in-flight pods that contend for a provider or a cache, across nodes",
                        "Each node's own conflicts (pods sharing a provider's context, saved states past the "
                        "RAM tier) and sessions running on two nodes at once.")
    conflicts.set_defaults(func=_conflicts)


def _nodes(args: argparse.Namespace) -> list:
    from nodeagent.fleetview import FleetFileError, load_nodes

    try:
        return load_nodes(args.nodes)
    except FleetFileError as exc:
        raise CliError(str(exc), exit_code=2) from exc


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    return f"{seconds:.0f}s" if seconds >= 1 or seconds == 0 else f"{seconds:.1f}s"


def _cache(view: Any) -> str:
    return ", ".join(f"{tier} {human_bytes(c['usedBytes'])}/{human_bytes(c['budgetBytes'])}"
                     for tier, c in sorted(view.cache.items())) or "-"


def _ps(args: argparse.Namespace) -> int:
    from nodeagent.fleetview import SeenStore, default_seen_path, health_of, ps

    nodes = _nodes(args)
    views = ps(nodes, seen=SeenStore(args.seen_file or default_seen_path()))
    for view, node in zip(views, nodes):
        view.healthy = view.state == "ready" and health_of(view, node.interval_s)

    def table(rows: list) -> str:
        return render_table(
            ["node", "host", "state", "healthy", "heartbeat", "tenants", "in-flight", "hot models", "cache", "drift"],
            [(v.name, v.host or "-", v.state, "yes" if v.healthy else "NO", _age(v.heartbeat_age_s),
              ",".join(v.tenants) or "-", v.in_flight, ",".join(v.hot_models) or "-", _cache(v),
              "; ".join(v.drift) or (v.error or "-")) for v in rows])

    emit([v.to_wire() for v in views] if args.format == "json" else views, args.format, table)
    return 0 if all(v.healthy for v in views) else 1


def _score(args: argparse.Namespace) -> int:
    from nodeagent.cli.pods import _read_pod
    from nodeagent.fleetview import score

    pod = _read_pod(args.pod)
    nodes = _nodes(args)
    rows = score(nodes, pod.to_wire())

    def table(found: list) -> str:
        return render_table(["rank", "node", "provider", "ttft", "cached", "source", "why"],
                            [(r.rank or "-", r.node, r.provider or "-",
                              f"{r.ttft_s * 1000:.0f} ms" if r.ttft_s is not None else "?",
                              f"{r.cached_tokens}/{r.prompt_tokens}", r.cache_source or "-",
                              r.error or r.reason) for r in found])

    emit([r.to_wire() for r in rows] if args.format == "json" else rows, args.format, table)
    if not any(r.rank for r in rows):
        raise CliError("no node could score the pod (see the table)")
    return 0


def _conflicts(args: argparse.Namespace) -> int:
    from nodeagent.fleetview import conflicts

    found = conflicts(_nodes(args))

    def table(items: list) -> str:
        if not items:
            return "no conflicts"
        return render_table(["node", "kind", "pods", "detail"],
                            [(c["node"], c["kind"], ",".join(c.get("pods", [])) or "-", c.get("detail", ""))
                             for c in items])

    emit(found, args.format, table)
    return 0

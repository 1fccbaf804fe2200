"""The `agent-machine` command line.

Each command group lives in its own module under ``nodeagent.cli`` and exposes
``register(subparsers)``. Modules must keep heavy imports inside their handlers
so that `agent-machine probe` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from nodeagent.cli.output import CliError

# Order here is the order in `--help`.
COMMAND_MODULES = (
    "nodeagent.cli.core",      # version, paths, contracts
    "nodeagent.cli.probe",     # probe, doctor
    "nodeagent.cli.config",    # config show
    "nodeagent.cli.service",   # serve, status, ps, install-service
    "nodeagent.cli.models",    # models import/ls/inspect/rm/fit/load/unload/ps
    "nodeagent.cli.cache",     # cache ls/stats/evict/pin/unpin
    "nodeagent.cli.pods",      # pods submit/ls/get/cancel/score/conflicts
    "nodeagent.cli.providers", # providers catalog/render/up/down/ls/logs
    "nodeagent.cli.receipts",  # key show/rotate; receipts ls/show/export/verify/checkpoint
)

EPILOG = """\
examples:
  agent-machine probe                 what this machine has, at a glance
  agent-machine probe --format json   the MachineProfile for planners
  agent-machine doctor                checks with fix hints (exit 1 on failure)
  agent-machine paths                 where config, state, cache and sockets live
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agent-machine",
        description="Node agent for local LLM inference hosts: probes hardware, keeps models "
        "resident, keeps KV caches warm, places agent pods where their context is cached, "
        "and signs a receipt of what ran.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "func", None)
    if handler is None:
        # A group given without its sub-command prints that group's help.
        (getattr(args, "group_parser", None) or parser).print_help()
        return 2
    try:
        return int(handler(args) or 0)
    except CliError as exc:
        print(f"agent-machine: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("agent-machine: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

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

# Each module and the top-level commands it registers; order here is the order
# in `--help`. tests/test_cli_core.py checks the names against what each registers.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "nodeagent.cli.core": ("version", "paths", "contracts"),
    "nodeagent.cli.probe": ("probe", "doctor"),
    "nodeagent.cli.config": ("config",),
    "nodeagent.cli.service": ("serve", "status", "ps", "install-service"),
    "nodeagent.cli.models": ("models",),
    "nodeagent.cli.cache": ("cache",),
    "nodeagent.cli.pods": ("pods",),
    "nodeagent.cli.providers": ("providers",),
    "nodeagent.cli.receipts": ("key", "receipts"),
    "nodeagent.cli.tokens": ("tokens",),
    "nodeagent.cli.render": ("render",),
    "nodeagent.cli.fleet": ("fleet",),
    "nodeagent.cli.governance": ("grants", "activate", "wipe", "teardown", "evidence"),
}

EPILOG = """\
examples:
  agent-machine probe                 what this machine has, at a glance
  agent-machine probe --format json   the MachineProfile for planners
  agent-machine doctor                checks with fix hints (exit 1 on failure)
  agent-machine paths                 where config, state, cache and sockets live
"""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for every command, or only for ``command``'s module when it names one.

    Registering all nine modules costs ~30 ms of imports and argparse work, a
    tenth of `agent-machine probe`'s budget; a known command pays for its own
    module only. Anything else (no command, `--help`, a typo) gets the full
    parser, so help and "invalid choice" errors list every command.
    """
    modules = [name for name, commands in COMMAND_MODULES.items() if command in commands] or COMMAND_MODULES
    parser = argparse.ArgumentParser(
        prog="agent-machine",
        description="Node agent for local LLM inference hosts: probes hardware, keeps models "
        "resident, keeps KV caches warm, places agent pods where their context is cached, "
        "and signs a receipt of what ran.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in modules:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
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
    except BrokenPipeError:  # `agent-machine ... | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

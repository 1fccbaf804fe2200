"""`version`, `paths`, `contracts export`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nodeagent.cli.output import CliError, add_format_option, add_group, emit, render_table


def register(subparsers: Any) -> None:
    version = subparsers.add_parser("version", help="print the agent version")
    add_format_option(version)
    version.set_defaults(func=_version)

    paths = subparsers.add_parser(
        "paths",
        help="show config, state, cache and runtime directories",
        description="Show where agent-machine keeps its files. User scope follows XDG; "
        "AGENT_MACHINE_SCOPE=system (or systemd's STATE_DIRECTORY) selects /etc, /var/lib, "
        "/var/cache and /run. Each directory can be overridden with "
        "AGENT_MACHINE_{CONFIG,STATE,CACHE,RUNTIME}_DIR.",
    )
    add_format_option(paths)
    paths.set_defaults(func=_paths)

    contracts = add_group(subparsers, "contracts", "wire formats (JSON Schemas)")
    export = contracts.add_parser(
        "export",
        help="write the JSON Schema of every contract kind into DIR",
        description="Write one <Kind>.schema.json per contract kind into DIR "
        "(the committed copies live in docs/contracts/).",
    )
    export.add_argument("dir", type=Path, metavar="DIR")
    export.set_defaults(func=_contracts_export)


def _version(args: argparse.Namespace) -> int:
    from nodeagent import __version__
    from nodeagent.contracts.base import API_VERSION

    emit({"version": __version__, "apiVersion": API_VERSION}, args.format,
         lambda v: f"agent-machine {v['version']} ({v['apiVersion']})")
    return 0


def _paths(args: argparse.Namespace) -> int:
    from nodeagent.paths import resolve_paths

    try:
        paths = resolve_paths()
    except ValueError as exc:
        raise CliError(str(exc), exit_code=2) from exc
    data = paths.as_dict()
    rows = [(name, data[name], paths.sources[name]) for name in ("config", "state", "cache", "runtime")]
    emit(data, args.format, lambda _: f"scope: {paths.scope}\n" + render_table(("dir", "path", "from"), rows))
    return 0


def _contracts_export(args: argparse.Namespace) -> int:
    from nodeagent.contracts.schema import export_schemas

    written = export_schemas(args.dir)
    for path in written:
        print(path)
    return 0

"""`config show`."""

from __future__ import annotations

import argparse
from typing import Any

from nodeagent.cli.output import CliError, add_format_option, add_group, emit, render_table


def register(subparsers: Any) -> None:
    group = add_group(subparsers, "config", "the node's configuration")
    show = group.add_parser(
        "show",
        help="print the effective configuration and where each value came from",
        description="Print every setting with its effective value and its source: the built-in "
        "default, the config file (<config dir>/config.toml or $AGENT_MACHINE_CONFIG), or an "
        "environment variable AGENT_MACHINE_<SECTION>_<KEY>.",
    )
    add_format_option(show)
    show.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    from nodeagent.config import ConfigError, load_config

    try:
        loaded = load_config()
    except (ConfigError, ValueError) as exc:
        raise CliError(str(exc), exit_code=2) from exc
    values = loaded.config.model_dump(mode="json")
    rows = [
        (f"{section}.{key}", "-" if value is None else value, loaded.sources[f"{section}.{key}"])
        for section, keys in values.items() if isinstance(keys, dict) for key, value in keys.items()
    ]
    data = {
        "file": str(loaded.file), "fileExists": loaded.file_exists, "paths": loaded.paths.as_dict(),
        "values": values, "sources": dict(loaded.sources),
    }
    from nodeagent.fleet import DEFAULT_RULE

    data["fleetRule"] = DEFAULT_RULE
    header = f"config file: {loaded.file}{'' if loaded.file_exists else ' (absent: defaults apply)'}\n"
    providers = [(i, p.model, p.kind, p.mode, p.replicas, p.slots, p.ctx_per_slot, p.load, p.name or "-")
                 for i, p in enumerate(loaded.config.providers)]
    fleet = ("\n[[providers]] (" + loaded.sources["providers"] + ")\n" + render_table(
        ("#", "model", "kind", "mode", "replicas", "slots", "ctx/slot", "load", "name"), providers)
        if providers else "\n[[providers]]: none declared")
    fleet += f"\nfleet rule: {DEFAULT_RULE}"
    emit(data, args.format, lambda _: header + render_table(("setting", "value", "from"), rows) + fleet)
    return 0

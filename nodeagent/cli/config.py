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
    header = f"config file: {loaded.file}{'' if loaded.file_exists else ' (absent: defaults apply)'}\n"
    emit(data, args.format, lambda _: header + render_table(("setting", "value", "from"), rows))
    return 0

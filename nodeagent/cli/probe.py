"""`probe` and `doctor`. (Owned by the probe work; handlers filled in there.)"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from nodeagent.cli.output import CliError, add_format_option


def register(subparsers: Any) -> None:
    probe = subparsers.add_parser(
        "probe",
        help="probe CPU, memory, GPUs, Vulkan, Asahi, runtime and storage",
        description="Probe this machine and print its MachineProfile.",
    )
    add_format_option(probe)
    probe.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                       help="read /proc, /sys, /etc below DIR instead of / (for captured trees)")
    probe.set_defaults(func=_probe)

    doctor = subparsers.add_parser("doctor", help="check this machine and print fix hints (exit 1 on failure)")
    add_format_option(doctor)
    doctor.set_defaults(func=_doctor)


def _probe(args: argparse.Namespace) -> int:
    raise CliError("probe is not implemented yet")


def _doctor(args: argparse.Namespace) -> int:
    raise CliError("doctor is not implemented yet")

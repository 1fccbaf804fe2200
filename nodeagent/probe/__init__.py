"""Probe this machine (or a captured tree) into a `MachineProfile`.

    probe(root="/", system=None, *, state_dir=None, cache_dir=None, now=None) -> MachineProfile
    profile_digest(profile) -> str

Sub-probes (one module each: host, cpu, memory, nvidia, amd, vulkan, asahi,
runtime, storage; recommend derives devices and backends) are pure functions of
a `System`. They run concurrently; one that raises yields its section with
``status: error`` and the exception as the reason, never an exception here.

Start-up cost matters (`agent-machine probe` is meant to be instant), so this
module imports nothing heavy at import time, and `probe()` starts the external
commands before it imports pydantic and the sub-probes: the tools run on
another core while the interpreter loads the models.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from nodeagent.probe.system import Background, System

if TYPE_CHECKING:
    from nodeagent.contracts.machine import MachineProfile

__all__ = ["System", "probe", "profile_digest"]

def _guard(name: str, section_type: type, fn: Callable[[], Any], timings: dict[str, float] | None) -> Any:
    from nodeagent.contracts.machine import ProbeStatus

    started = time.perf_counter()
    try:
        return fn()
    except Exception as exc:  # a bug or an unexpected machine must not take other sections down
        return section_type(status=ProbeStatus.error, reason=f"{name} probe failed: {type(exc).__name__}: {exc}")
    finally:
        if timings is not None:
            timings[name] = time.perf_counter() - started


def probe(root: str | Path = "/", system: System | None = None, *, state_dir: str | Path | None = None,
          cache_dir: str | Path | None = None, now: datetime | None = None,
          timings: dict[str, float] | None = None) -> "MachineProfile":
    """Probe the machine below ``root`` (or the given ``system``) into a MachineProfile.

    ``root`` other than ``/`` is a captured machine (a directory with
    ``capture.json``, replayed) or a plain tree (files only, no commands); see
    `nodeagent.probe.replay.system_for_root`, which raises `CaptureError` for
    a root it cannot read.
    ``state_dir``/``cache_dir`` default to `resolve_paths` over the system's
    environment. ``now`` fixes ``probedAt`` (tests); ``timings``, when given,
    receives seconds per sub-probe (bench).
    """
    from nodeagent.probe import commands

    own_system = system is None
    if system is None:
        from nodeagent.probe.replay import system_for_root

        system = system_for_root(root)
    system.prefetch(commands.PREFETCH)
    try:
        return _probe(system, state_dir, cache_dir, now, timings)
    finally:
        if own_system:
            system.close()


def _probe(system: System, state_dir: str | Path | None, cache_dir: str | Path | None,
           now: datetime | None, timings: dict[str, float] | None) -> "MachineProfile":
    started = time.perf_counter()
    from nodeagent import __version__
    from nodeagent.contracts import machine as m
    from nodeagent.paths import resolve_paths
    from nodeagent.probe import amd, asahi, cpu, host, memory, nvidia, recommend, runtime, storage, vulkan
    if timings is not None:
        timings["imports"] = time.perf_counter() - started

    if state_dir is None or cache_dir is None:
        paths = resolve_paths(system.env)
        state_dir = state_dir if state_dir is not None else paths.state_dir
        cache_dir = cache_dir if cache_dir is not None else paths.cache_dir

    jobs: dict[str, tuple[type, Callable[[], Any]]] = {
        "host": (m.HostInfo, lambda: host.probe_host(system)),
        "cpu": (m.CpuInfo, lambda: cpu.probe_cpu(system)),
        "memory": (m.MemoryInfo, lambda: memory.probe_memory(system)),
        "nvidia": (m.NvidiaInfo, lambda: nvidia.probe_nvidia(system)),
        "amd": (m.AmdInfo, lambda: amd.probe_amd(system)),
        "vulkan": (m.VulkanInfo, lambda: vulkan.probe_vulkan(system)),
        "runtime": (m.RuntimeInfo, lambda: runtime.probe_runtime(system)),
        "storage": (m.StorageInfo, lambda: storage.probe_storage(system, str(state_dir), str(cache_dir))),
    }
    running = {name: Background(_guard, name, kind, fn, timings, name=f"probe-{name}")
               for name, (kind, fn) in jobs.items()}
    sections = {name: job.result() for name, job in running.items()}

    apple = _guard("asahi", m.AsahiInfo, lambda: asahi.probe_asahi(
        system, sections["host"], sections["cpu"], sections["memory"], sections["vulkan"]), timings)
    started = time.perf_counter()
    derived = recommend.derive(sections["cpu"], sections["memory"], sections["nvidia"], sections["amd"],
                               sections["vulkan"], apple, sections["runtime"])
    if timings is not None:
        timings["recommend"] = time.perf_counter() - started
    return m.MachineProfile(
        probed_at=now or datetime.now(timezone.utc),
        agent_version=__version__,
        root=system.label or str(system.root),
        platform=derived.platform,
        asahi=apple,
        devices=derived.devices,
        recommended_backends=derived.recommended_backends,
        **sections,
    )


def profile_digest(profile: "MachineProfile") -> str:
    """sha256 (hex) of the RFC 8785 canonical JSON of the profile's wire form."""
    import hashlib

    import rfc8785

    return hashlib.sha256(rfc8785.dumps(profile.to_wire())).hexdigest()

"""Memory: /proc/meminfo, hugepages, and the cgroup (v1 or v2) limits we run under.

The cgroup limit that binds is the smallest along the path from our cgroup to
the root, so every ancestor is read. A container usually sees only its own
subtree mounted at /sys/fs/cgroup, with /proc/self/cgroup naming a path that
does not exist there; then the mount root itself is our cgroup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nodeagent.contracts.machine import CgroupLimits, MemoryInfo, ProbeStatus
from nodeagent.probe.system import System

# v1 writes "unlimited" as PAGE_COUNTER_MAX pages; anything this large means no limit.
_V1_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class CgroupLayout:
    version: int | None  # 2: unified only; 1: legacy or hybrid (controllers on v1)
    memory_path: str | None  # our cgroup for the memory controller, as /proc/self/cgroup says
    cpu_path: str | None


def cgroup_layout(system: System) -> CgroupLayout:
    """Which cgroup version governs memory and cpu, and our path in it."""
    text = system.read_text("/proc/self/cgroup") or ""
    v1: dict[str, str] = {}
    unified: str | None = None
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, path = parts
        if hier == "0" and controllers == "":
            unified = path
        else:
            for name in controllers.split(","):
                v1[name] = path
    pure_v2 = system.exists("/sys/fs/cgroup/cgroup.controllers")
    if "memory" in v1 or "cpu" in v1:
        return CgroupLayout(1, v1.get("memory"), v1.get("cpu"))
    if unified is not None or pure_v2:
        path = unified or "/"
        return CgroupLayout(2, path, path)
    return CgroupLayout(None, None, None)


def _ancestors(path: str) -> list[str]:
    """``/a/b`` -> [``/a/b``, ``/a``, ``/``]."""
    parts = [p for p in path.split("/") if p]
    return ["/" + "/".join(parts[:i]) if i else "/" for i in range(len(parts), -1, -1)]


def _candidate_dirs(system: System, mount: str, path: str) -> list[str]:
    """The directories to read for ``path`` under ``mount``, innermost first.

    When ``path`` is not visible below the mount (cgroup namespace, container),
    the mount root is the innermost directory we can see.
    """
    dirs = []
    for ancestor in _ancestors(path):
        directory = mount.rstrip("/") + (ancestor if ancestor != "/" else "")
        if system.is_dir(directory):
            dirs.append(directory)
    return dirs or ([mount] if system.is_dir(mount) else [])


def _min_limit(values: list[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _v2_limits(system: System, path: str) -> tuple[int | None, float | None]:
    memory: list[int | None] = []
    cpu: list[float | None] = []
    for directory in _candidate_dirs(system, "/sys/fs/cgroup", path):
        raw = (system.read_text(f"{directory}/memory.max") or "").strip()
        memory.append(int(raw) if raw.isdigit() else None)
        quota = (system.read_text(f"{directory}/cpu.max") or "").split()
        if len(quota) == 2 and quota[0].isdigit() and quota[1].isdigit() and int(quota[1]) > 0:
            cpu.append(int(quota[0]) / int(quota[1]))
        else:
            cpu.append(None)
    cores = _min_limit(cpu)  # type: ignore[arg-type]
    return _min_limit(memory), (round(float(cores), 3) if cores is not None else None)


def _v1_mount(system: System, controller: str) -> str | None:
    for name in (controller, "cpu,cpuacct", "cpuacct,cpu") if controller == "cpu" else (controller,):
        if system.is_dir(f"/sys/fs/cgroup/{name}"):
            return f"/sys/fs/cgroup/{name}"
    return None


def _v1_limits(system: System, layout: CgroupLayout) -> tuple[int | None, float | None]:
    memory: list[int | None] = []
    mount = _v1_mount(system, "memory")
    if mount and layout.memory_path is not None:
        for directory in _candidate_dirs(system, mount, layout.memory_path):
            value = system.read_int(f"{directory}/memory.limit_in_bytes")
            memory.append(value if value is not None and value < _V1_UNLIMITED else None)
    cpu: list[float | None] = []
    mount = _v1_mount(system, "cpu")
    if mount and layout.cpu_path is not None:
        for directory in _candidate_dirs(system, mount, layout.cpu_path):
            quota = system.read_int(f"{directory}/cpu.cfs_quota_us")
            period = system.read_int(f"{directory}/cpu.cfs_period_us")
            cpu.append(quota / period if quota is not None and quota > 0 and period else None)
    cores = _min_limit(cpu)  # type: ignore[arg-type]
    return _min_limit(memory), (round(float(cores), 3) if cores is not None else None)


def parse_meminfo(text: str) -> dict[str, int]:
    """Values in bytes for ``kB`` fields, plain counts otherwise (HugePages_*)."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        match = re.match(r"^([\w()]+):\s+(\d+)(\s+kB)?", line)
        if match:
            values[match.group(1)] = int(match.group(2)) * (1024 if match.group(3) else 1)
    return values


def probe_memory(system: System) -> MemoryInfo:
    text = system.read_text("/proc/meminfo")
    layout = cgroup_layout(system)
    if layout.version == 2:
        limit, cores = _v2_limits(system, layout.memory_path or "/")
        path = layout.memory_path
    elif layout.version == 1:
        limit, cores = _v1_limits(system, layout)
        path = layout.memory_path
    else:
        limit, cores, path = None, None, None
    cgroup = CgroupLimits(version=layout.version, path=path, memory_limit_bytes=limit, cpu_quota_cores=cores)
    if text is None:
        return MemoryInfo(status=ProbeStatus.error, reason="/proc/meminfo is missing or unreadable",
                          cgroup=cgroup, effective_limit_bytes=limit)
    info = parse_meminfo(text)
    total = info.get("MemTotal")
    effective = _min_limit([total, limit])
    available = info.get("MemAvailable")
    return MemoryInfo(
        total_bytes=total,
        available_bytes=available,
        swap_total_bytes=info.get("SwapTotal"),
        swap_free_bytes=info.get("SwapFree"),
        hugepages_total=info.get("HugePages_Total"),
        hugepages_free=info.get("HugePages_Free"),
        hugepage_size_bytes=info.get("Hugepagesize"),
        cgroup=cgroup,
        effective_limit_bytes=effective,
    )

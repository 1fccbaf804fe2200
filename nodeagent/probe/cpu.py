"""CPU: vendor, model, topology, NUMA, the ISA features inference kernels use, caches.

Read from /proc/cpuinfo and /sys/devices/system/{cpu,node}. py-cpuinfo is not
used: importing it already forks ``file -b`` (its ``DataSource`` class body
calls ``platform.architecture()``), and ``get_cpu_info()`` forks again and takes
about a second; everything it would tell us on Linux is in the files below.
"""

from __future__ import annotations

import re

from nodeagent.contracts.machine import CpuCaches, CpuInfo, ProbeStatus
from nodeagent.probe.host import architecture
from nodeagent.probe.system import System

# x86 flags that llama.cpp / ggml and other kernels dispatch on, as /proc/cpuinfo names them.
X86_FEATURES = frozenset({
    "sse3", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni",
    "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "avx512vbmi", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16",
})
# arm64 hwcaps (cpuinfo "Features") -> the names ggml uses for them.
ARM_FEATURES = {
    "asimd": "neon",
    "asimdhp": "fp16",
    "asimddp": "dotprod",
    "i8mm": "i8mm",
    "bf16": "bf16",
    "sve": "sve",
    "sve2": "sve2",
    "svei8mm": "sve_i8mm",
    "svebf16": "sve_bf16",
    "sme": "sme",
}

ARM_IMPLEMENTERS = {
    "0x41": "ARM", "0x42": "Broadcom", "0x43": "Cavium", "0x48": "HiSilicon", "0x4e": "NVIDIA",
    "0x50": "APM", "0x51": "Qualcomm", "0x61": "Apple", "0x6d": "Microsoft", "0xc0": "Ampere",
}
# (implementer, part) -> core name, as lscpu prints it.
ARM_PARTS = {
    ("0x41", "0xd0c"): "Neoverse-N1", ("0x41", "0xd40"): "Neoverse-V1",
    ("0x41", "0xd49"): "Neoverse-N2", ("0x41", "0xd4f"): "Neoverse-V2",
    ("0x41", "0xd8e"): "Neoverse-N3", ("0x41", "0xd84"): "Neoverse-V3",
    ("0x41", "0xd08"): "Cortex-A72", ("0x41", "0xd0b"): "Cortex-A76",
    ("0xc0", "0xac3"): "Ampere-1", ("0xc0", "0xac4"): "Ampere-1a",
    ("0x61", "0x022"): "Icestorm-M1", ("0x61", "0x023"): "Firestorm-M1",
    ("0x61", "0x024"): "Icestorm-M1-Pro", ("0x61", "0x025"): "Firestorm-M1-Pro",
    ("0x61", "0x028"): "Icestorm-M1-Max", ("0x61", "0x029"): "Firestorm-M1-Max",
    ("0x61", "0x032"): "Blizzard-M2", ("0x61", "0x033"): "Avalanche-M2",
    ("0x61", "0x034"): "Blizzard-M2-Pro", ("0x61", "0x035"): "Avalanche-M2-Pro",
    ("0x61", "0x038"): "Blizzard-M2-Max", ("0x61", "0x039"): "Avalanche-M2-Max",
}


def parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """One dict per processor stanza (blank-line separated), keys as written."""
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                stanzas.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current.setdefault(key.strip(), value.strip())
    if current:
        stanzas.append(current)
    # Some architectures end with a machine-wide stanza without "processor".
    return [s for s in stanzas if "processor" in s] or stanzas


def parse_cpu_list(text: str) -> list[int]:
    """Expand a kernel cpu list such as ``0-3,8,10-11``."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        if high:
            cpus.extend(range(int(low), int(high) + 1))
        else:
            cpus.append(int(low))
    return cpus


def parse_size(text: str) -> int | None:
    """Sizes as sysfs writes them: 32K, 1024K, 32M, or plain bytes."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text or "")
    if not match:
        return None
    return int(match.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[match.group(2)]


def _caches(system: System) -> CpuCaches:
    base = "/sys/devices/system/cpu/cpu0/cache"
    sizes: dict[str, int] = {}
    for index in system.listdir(base):
        if not index.startswith("index"):
            continue
        level = (system.read_text(f"{base}/{index}/level") or "").strip()
        kind = (system.read_text(f"{base}/{index}/type") or "").strip()
        size = parse_size(system.read_text(f"{base}/{index}/size") or "")
        if size is None:
            continue
        name = {("1", "Data"): "l1d", ("1", "Instruction"): "l1i"}.get((level, kind), f"l{level}")
        if name in ("l1d", "l1i", "l2", "l3"):
            sizes[name] = size
    return CpuCaches(
        l1d_bytes=sizes.get("l1d"), l1i_bytes=sizes.get("l1i"),
        l2_bytes=sizes.get("l2"), l3_bytes=sizes.get("l3"),
    )


def _topology(system: System, stanzas: list[dict[str, str]]) -> tuple[int | None, int | None, int | None]:
    """(sockets, physical cores, logical CPUs online)."""
    online_text = system.read_text("/sys/devices/system/cpu/online")
    online = parse_cpu_list(online_text) if online_text else [int(s["processor"]) for s in stanzas
                                                                 if s.get("processor", "").isdigit()]
    threads = len(online) or None
    # x86 cpuinfo carries the topology; arm64 cpuinfo does not, sysfs does.
    if stanzas and all("physical id" in s and "core id" in s for s in stanzas):
        packages = {s["physical id"] for s in stanzas}
        cores = {(s["physical id"], s["core id"]) for s in stanzas}
        return len(packages), len(cores), threads
    pairs = set()
    for cpu in online:
        topo = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        package = system.read_text(f"{topo}/physical_package_id")
        core = system.read_text(f"{topo}/core_id")
        if package is None or core is None:
            return None, None, threads
        pairs.add((package.strip(), core.strip()))
    if not pairs:
        return None, None, threads
    return len({p for p, _ in pairs}), len(pairs), threads


def _numa_nodes(system: System) -> int | None:
    nodes = [n for n in system.listdir("/sys/devices/system/node") if re.fullmatch(r"node\d+", n)]
    return len(nodes) or None


def probe_cpu(system: System) -> CpuInfo:
    text = system.read_text("/proc/cpuinfo")
    if text is None:
        return CpuInfo(status=ProbeStatus.error, reason="/proc/cpuinfo is missing or unreadable")
    stanzas = parse_cpuinfo(text)
    if not stanzas:
        return CpuInfo(status=ProbeStatus.error, reason="/proc/cpuinfo has no processor entries")
    first = stanzas[0]
    arch_text = architecture(system)
    implementer = first.get("CPU implementer")
    sockets, cores, threads = _topology(system, stanzas)

    if implementer is not None:
        implementer = implementer.lower()
        parts = sorted({s["CPU part"].lower() for s in stanzas if "CPU part" in s})
        names: list[str] = []
        for stanza in stanzas:
            name = ARM_PARTS.get((implementer, stanza.get("CPU part", "").lower()))
            if name and name not in names:
                names.append(name)
        raw = set(first.get("Features", "").split())
        features = sorted(ARM_FEATURES[f] for f in raw if f in ARM_FEATURES)
        return CpuInfo(
            vendor=ARM_IMPLEMENTERS.get(implementer, implementer),
            model_name=first.get("model name") or (" + ".join(names) if names else None),
            architecture=arch_text or "aarch64",
            sockets=sockets, cores=cores, threads=threads,
            numa_nodes=_numa_nodes(system), features=features, caches=_caches(system),
            implementer=implementer, parts=parts,
        )

    flags = set(first.get("flags", "").split())
    return CpuInfo(
        vendor=first.get("vendor_id"),
        model_name=first.get("model name"),
        architecture=arch_text,
        sockets=sockets, cores=cores, threads=threads,
        numa_nodes=_numa_nodes(system),
        features=sorted(flags & X86_FEATURES),
        caches=_caches(system),
    )

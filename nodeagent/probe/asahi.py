"""Apple Silicon under Linux (Asahi).

Signals, strongest first (any one on an aarch64 host is enough; all found are
listed in ``evidence``):

* device tree ``compatible`` holding ``apple,arm-platform`` (NUL-separated:
  ``apple,<board>``, ``apple,<soc>``, ``apple,arm-platform``), which also names
  the SoC -> chip;
* ``/proc/cpuinfo`` ``CPU implementer : 0x61`` (Apple), whose part numbers name
  the chip when the device tree is masked (containers);
* a Vulkan device driven by Mesa's Honeykrisp (``DRIVER_ID_MESA_HONEYKRISP``).

Weaker hints that are reported but never decide on their own: the DRM driver
``asahi`` (``virtio_gpu`` inside muvm/krun guests), a ``+16k`` kernel, the
``fedora-asahi-remix`` OS. An arm64 server (Graviton, Ampere, Grace) has none
of the deciding signals and is reported absent.

The GPU has no VRAM: its budget is system RAM (``unified_memory_bytes``).
"""

from __future__ import annotations

import re

from nodeagent.contracts.machine import AsahiInfo, CpuInfo, HostInfo, MemoryInfo, ProbeStatus, VulkanInfo
from nodeagent.probe.system import System

SOCS = {
    "t8103": "M1", "t6000": "M1 Pro", "t6001": "M1 Max", "t6002": "M1 Ultra",
    "t8112": "M2", "t6020": "M2 Pro", "t6021": "M2 Max", "t6022": "M2 Ultra",
}
# Apple CPU part numbers (efficiency/performance cores) -> chip. M1 Ultra is two
# M1 Max dies with the same parts, so only the device tree tells it apart.
PARTS = {
    "0x022": "M1", "0x023": "M1", "0x024": "M1 Pro", "0x025": "M1 Pro", "0x028": "M1 Max", "0x029": "M1 Max",
    "0x032": "M2", "0x033": "M2", "0x034": "M2 Pro", "0x035": "M2 Pro", "0x038": "M2 Max", "0x039": "M2 Max",
}
APPLE_IMPLEMENTER = "0x61"
HONEYKRISP = "DRIVER_ID_MESA_HONEYKRISP"


def _compatible(system: System) -> list[str]:
    for path in ("/proc/device-tree/compatible", "/sys/firmware/devicetree/base/compatible"):
        raw = system.read_bytes(path)
        if raw:
            return [item.decode(errors="replace") for item in raw.split(b"\0") if item]
    return []


def _model(system: System) -> str | None:
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        raw = system.read_bytes(path)
        if raw:
            return raw.split(b"\0")[0].decode(errors="replace").strip() or None
    return None


def drm_drivers(system: System) -> list[str]:
    """Kernel drivers of the DRM cards, in card order (amdgpu, asahi, virtio_gpu, nvidia...)."""
    drivers = []
    cards = [c for c in system.listdir("/sys/class/drm") if re.fullmatch(r"card\d+", c)]
    for card in sorted(cards, key=lambda c: int(c[4:])):
        uevent = system.read_text(f"/sys/class/drm/{card}/device/uevent") or ""
        match = re.search(r"^DRIVER=(\S+)", uevent, re.M)
        if match:
            drivers.append(match.group(1))
    return drivers


def _split_chip(chip: str) -> tuple[str, str]:
    family, _, tier = chip.partition(" ")
    return family, tier or "base"


def probe_asahi(system: System, host: HostInfo, cpu: CpuInfo, memory: MemoryInfo,
                vulkan: VulkanInfo) -> AsahiInfo:
    compatible = _compatible(system)
    evidence: list[str] = []
    soc = board = chip = None
    if "apple,arm-platform" in compatible:
        evidence.append("devicetree: apple,arm-platform")
        for item in compatible:
            name = item.removeprefix("apple,")
            if name in SOCS:
                soc = name
            elif re.fullmatch(r"j\d+\w*", name) and board is None:
                board = name
        chip = SOCS.get(soc or "")
    apple_cpu = cpu.implementer == APPLE_IMPLEMENTER
    if apple_cpu:
        evidence.append(f"cpuinfo: CPU implementer 0x61 (Apple), parts {' '.join(cpu.parts)}")
        if chip is None:
            chips = {PARTS[p] for p in cpu.parts if p in PARTS}
            chip = chips.pop() if len(chips) == 1 else None
    honeykrisp = next((d for d in vulkan.devices if d.driver_id == HONEYKRISP), None)
    if honeykrisp is not None:
        evidence.append(f"vulkan: Honeykrisp driver ({honeykrisp.name})")
    deciding = bool(evidence)

    drivers = drm_drivers(system)
    gpu_driver = next((d for d in drivers if d in ("asahi", "virtio_gpu")), None)
    if "asahi" in drivers:
        evidence.append("drm: asahi driver")
    kernel = host.kernel_release or ""
    page_16k = kernel.endswith("+16k") or host.page_size == 16384
    if kernel.endswith("+16k"):
        evidence.append(f"kernel: {kernel}")
    if (host.os_id or "").endswith("asahi-remix"):
        evidence.append(f"os-release: ID={host.os_id}")

    if not deciding or host.architecture not in (None, "aarch64", "arm64"):
        why = []
        if compatible:
            why.append(f"device tree is {compatible[0]!r}, not apple,arm-platform")
        if cpu.implementer:
            why.append(f"CPU implementer is {cpu.implementer} ({cpu.vendor}), not 0x61 (Apple)")
        elif cpu.vendor:
            why.append(f"CPU is {cpu.vendor}")
        return AsahiInfo(status=ProbeStatus.absent,
                         reason="not Apple Silicon" + (": " + "; ".join(why) if why else ""),
                         evidence=evidence)

    family, tier = _split_chip(chip) if chip else (None, None)
    notes = []
    if honeykrisp is None:
        notes.append("no Honeykrisp Vulkan device: the GPU is unused by llama.cpp until Mesa's Honeykrisp "
                     "driver is installed (mesa-vulkan-drivers)")
    return AsahiInfo(
        status=ProbeStatus.ok,
        reason="; ".join(notes) or None,
        soc=soc,
        chip=chip,
        family=family,
        tier=tier,
        board=board,
        model=_model(system),
        evidence=evidence,
        gpu_driver=gpu_driver,
        vulkan_driver="honeykrisp" if honeykrisp is not None else None,
        page_size_16k=page_16k,
        unified_memory_bytes=memory.total_bytes,
    )

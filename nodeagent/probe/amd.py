"""AMD GPUs from sysfs and the KFD topology, without rocm-smi.

* ``/sys/class/drm/card<N>/device``: ``vendor`` 0x1002, ``device``,
  ``mem_info_vram_total`` / ``_used``, and ``uevent`` (PCI_SLOT_NAME, DRIVER).
* ``/sys/class/kfd/kfd/topology/nodes/<N>/properties``: ``gfx_target_version``
  (0 on CPU nodes), ``location_id`` (PCI bus<<8 | devfn) and ``domain``, which
  tie a KFD node to its DRM card. A KFD node is what ROCm can use.
"""

from __future__ import annotations

import re

from nodeagent.contracts.machine import AmdGpu, AmdInfo, ProbeStatus
from nodeagent.probe.system import System

AMD_VENDOR = "0x1002"
# PCI device id -> marketing name, for the parts in our captures (sysfs has no name).
DEVICE_NAMES = {
    "0x740f": "AMD Instinct MI210",
    "0x740c": "AMD Instinct MI250X/MI250",
    "0x74a1": "AMD Instinct MI300X",
    "0x74a2": "AMD Instinct MI308X",
    "0x744c": "AMD Radeon RX 7900 XTX",
    "0x6860": "AMD Radeon Instinct MI25 (Vega 10)",
}


def gfx_target_name(version: int) -> str | None:
    """KFD's gfx_target_version -> LLVM target: 90010 -> gfx90a, 110000 -> gfx1100, 90402 -> gfx942."""
    if version <= 0:
        return None
    major, minor, step = version // 10000, (version // 100) % 100, version % 100
    return f"gfx{major}{minor:x}{step:x}"


def parse_properties(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if key:
            values[key] = value.strip()
    return values


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None  # e.g. an unfilled template value in a capture


def _uevent(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _kfd_nodes(system: System) -> dict[str, tuple[int, dict[str, str]]]:
    """PCI slot name -> (KFD node id, its properties), for GPU nodes only."""
    base = "/sys/class/kfd/kfd/topology/nodes"
    nodes: dict[str, tuple[int, dict[str, str]]] = {}
    for name in system.listdir(base):
        if not name.isdigit():
            continue
        text = system.read_text(f"{base}/{name}/properties")
        if text is None:
            continue
        props = parse_properties(text)
        if _int(props.get("simd_count")) in (None, 0):
            continue  # a CPU node
        location = _int(props.get("location_id"))
        if location is None:
            continue
        domain = _int(props.get("domain")) or 0
        bus, devfn = location >> 8, location & 0xFF
        slot = f"{domain:04x}:{bus:02x}:{devfn >> 3:02x}.{devfn & 7:x}"
        nodes[slot] = (int(name), props)
    return nodes


def probe_amd(system: System) -> AmdInfo:
    cards = [c for c in system.listdir("/sys/class/drm") if re.fullmatch(r"card\d+", c)]
    kfd = _kfd_nodes(system)
    gpus: list[AmdGpu] = []
    for card in sorted(cards, key=lambda c: int(c[4:])):
        device = f"/sys/class/drm/{card}/device"
        vendor = (system.read_text(f"{device}/vendor") or "").strip().lower()
        if vendor != AMD_VENDOR:
            continue
        device_id = (system.read_text(f"{device}/device") or "").strip().lower() or None
        uevent = _uevent(system.read_text(f"{device}/uevent") or "")
        slot = uevent.get("PCI_SLOT_NAME")
        node = kfd.get(slot.lower()) if slot else None
        props = node[1] if node else {}
        version = _int(props.get("gfx_target_version"))
        name = (system.read_text(f"{device}/product_name") or "").strip() or DEVICE_NAMES.get(device_id or "")
        gpus.append(AmdGpu(
            card=card,
            pci_id=f"1002:{device_id[2:]}" if device_id else None,
            pci_bus_id=slot,
            name=name,
            vram_total_bytes=system.read_int(f"{device}/mem_info_vram_total"),
            vram_used_bytes=system.read_int(f"{device}/mem_info_vram_used"),
            gfx_target=gfx_target_name(version) if version else None,
            gfx_target_version=version,
            kfd_node=node[0] if node else None,
        ))
    if not gpus:
        if kfd:
            return AmdInfo(status=ProbeStatus.error,
                           reason="KFD lists GPU nodes but no AMD DRM card is visible under /sys/class/drm")
        return AmdInfo(status=ProbeStatus.absent, reason="no AMD GPU (vendor 0x1002) under /sys/class/drm")
    unmatched = [g.card for g in gpus if g.kfd_node is None]
    reason = None
    if unmatched:
        reason = (f"{', '.join(unmatched)}: no KFD node (amdgpu without KFD/ROCm support, or /dev/kfd "
                  "not exposed): ROCm cannot use it")
    return AmdInfo(status=ProbeStatus.ok, reason=reason, gpus=gpus)

"""Vulkan devices through ``vulkaninfo``, and what llama.cpp's Vulkan backend makes of them.

``vulkaninfo`` (text) is the primary source: identity, driver properties, device
extensions, memory heaps and feature structs, one ``GPU<n>:`` block per device.
``vulkaninfo --summary`` (identity only) is the fallback when the full output
fails. The same parser reads both: it looks at ``key = value`` lines inside each
``GPU<n>:`` block, so a summary simply leaves the feature fields unknown (null).

ggml-vulkan's choices (vendored llama.cpp, ``ggml_vk_instance_init`` and
``ggml_vk_get_device``) are reproduced so that the profile says which devices
llama.cpp would use and with which fast paths:

* the instance must be Vulkan >= 1.2;
* ``GGML_VK_VISIBLE_DEVICES`` set: exactly those indices, CPU devices included;
* otherwise: discrete and integrated GPUs with ``storageBuffer16BitAccess``,
  one per physical GPU (same deviceUUID through two drivers: keep the
  preferred driver); when none qualifies, the first non-CPU device; CPU
  devices (llvmpipe) never by default;
* fp16 = VK_KHR_16bit_storage + VK_KHR_shader_float16_int8 + shaderFloat16;
  integer dot = VK_KHR_shader_integer_dot_product + shaderIntegerDotProduct +
  integerDotProduct4x8BitPackedSignedAccelerated; coopmat =
  VK_KHR_cooperative_matrix + cooperativeMatrix (ggml further restricts it per
  vendor/architecture on Intel and AMD proprietary drivers, which we do not model).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from nodeagent.contracts.machine import ProbeStatus, VulkanDevice, VulkanHeap, VulkanInfo
from nodeagent.probe import commands
from nodeagent.probe.system import System

DEVICE_TYPES = {
    "PHYSICAL_DEVICE_TYPE_DISCRETE_GPU": "discrete",
    "PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU": "integrated",
    "PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU": "virtual",
    "PHYSICAL_DEVICE_TYPE_CPU": "cpu",
    "PHYSICAL_DEVICE_TYPE_OTHER": "other",
}
VENDORS = {
    "0x10de": "NVIDIA", "0x1002": "AMD", "0x8086": "Intel", "0x10005": "Mesa", "0x106b": "Apple",
    "0x13b5": "ARM", "0x5143": "Qualcomm", "0x1010": "Imagination", "0x14e4": "Broadcom",
}
ICD_DIRS = ("/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d", "/usr/share/vulkan/icd.d")

# ggml-vulkan's driver preference when one GPU shows up through two drivers (lower wins).
_DRIVER_PRIORITY = {
    "0x1002": {"DRIVER_ID_MESA_RADV": 1, "DRIVER_ID_AMD_OPEN_SOURCE": 2, "DRIVER_ID_AMD_PROPRIETARY": 3},
    "0x8086": {"DRIVER_ID_INTEL_OPEN_SOURCE_MESA": 1, "DRIVER_ID_INTEL_PROPRIETARY_WINDOWS": 2},
    "0x10de": {"DRIVER_ID_NVIDIA_PROPRIETARY": 1, "DRIVER_ID_MESA_NVK": 2},
    "0x5143": {"DRIVER_ID_QUALCOMM_PROPRIETARY": 1, "DRIVER_ID_MESA_TURNIP": 2},
}

_GPU_HEADER = re.compile(r"^GPU(\d+):\s*$")
_KEY_VALUE = re.compile(r"^\s*(\w+)\s*=\s*(.*?)\s*$")
_EXTENSION = re.compile(r"^\s*(VK_\w+)\s*:\s*extension revision")
_HEAP = re.compile(r"^\s*memoryHeaps\[(\d+)\]:\s*$")


@dataclass
class ParsedDevice:
    index: int
    values: dict[str, str] = field(default_factory=dict)  # first value seen per key
    extensions: set[str] = field(default_factory=set)
    heaps: list[VulkanHeap] = field(default_factory=list)


@dataclass
class ParsedOutput:
    instance_version: str | None
    devices: list[ParsedDevice]


def _strip_paren(value: str) -> str:
    return re.sub(r"\s*\(\d+\)$", "", value).strip()


def parse_vulkaninfo(text: str) -> ParsedOutput:
    """Parse ``vulkaninfo`` text or ``--summary`` output."""
    instance = re.search(r"^Vulkan Instance Version:\s*(\S+)", text, re.M)
    devices: list[ParsedDevice] = []
    current: ParsedDevice | None = None
    heap_size: int | None = None
    heap_local = False
    in_heap = False

    def close_heap() -> None:
        nonlocal in_heap, heap_size, heap_local
        if current is not None and in_heap and heap_size is not None:
            current.heaps.append(VulkanHeap(size_bytes=heap_size, device_local=heap_local))
        in_heap, heap_size, heap_local = False, None, False

    for line in text.splitlines():
        header = _GPU_HEADER.match(line)
        if header:
            close_heap()
            current = ParsedDevice(index=int(header.group(1)))
            devices.append(current)
            continue
        if current is None:
            continue
        if _HEAP.match(line):
            close_heap()
            in_heap = True
            continue
        if in_heap:
            stripped = line.strip()
            if stripped.startswith("size") and "=" in stripped:
                number = stripped.split("=", 1)[1].split()[0]
                heap_size = int(number) if number.isdigit() else None
                continue
            if stripped == "MEMORY_HEAP_DEVICE_LOCAL_BIT":
                heap_local = True
                continue
            if stripped.startswith("memoryTypes") or (line and not line[0].isspace()):
                close_heap()
        ext = _EXTENSION.match(line)
        if ext:
            current.extensions.add(ext.group(1))
            continue
        kv = _KEY_VALUE.match(line)
        if kv:
            current.values.setdefault(kv.group(1), kv.group(2))
    close_heap()
    return ParsedOutput(instance.group(1) if instance else None, devices)


def _bool(values: dict[str, str], key: str) -> bool | None:
    value = values.get(key)
    return None if value is None else value.strip().lower() == "true"


def _version_tuple(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    numbers = re.findall(r"\d+", text)
    return tuple(int(n) for n in numbers[:3]) if numbers else None


def _features(parsed: ParsedDevice, detailed: bool) -> dict[str, bool | None]:
    """ggml's fast-path flags; all None when only the summary was available."""
    if not detailed:
        return {"fp16": None, "int_dot": None, "coopmat": None, "storage16bit": None}
    v, ext = parsed.values, parsed.extensions
    storage16 = _bool(v, "storageBuffer16BitAccess")
    fp16 = ("VK_KHR_16bit_storage" in ext and "VK_KHR_shader_float16_int8" in ext
            and _bool(v, "shaderFloat16") is True)
    int_dot = ("VK_KHR_shader_integer_dot_product" in ext and _bool(v, "shaderIntegerDotProduct") is True
               and _bool(v, "integerDotProduct4x8BitPackedSignedAccelerated") is True)
    coopmat = "VK_KHR_cooperative_matrix" in ext and _bool(v, "cooperativeMatrix") is True
    return {"fp16": fp16, "int_dot": int_dot, "coopmat": coopmat,
            "storage16bit": storage16 if storage16 is not None else False}


def to_devices(parsed: ParsedOutput, detailed: bool) -> list[VulkanDevice]:
    devices = []
    for p in parsed.devices:
        v = p.values
        vendor_id = v.get("vendorID", "").lower() or None
        devices.append(VulkanDevice(
            index=p.index,
            name=v.get("deviceName"),
            device_type=DEVICE_TYPES.get(v.get("deviceType", ""), "other" if v.get("deviceType") else None),
            vendor_id=vendor_id,
            vendor=VENDORS.get(vendor_id or ""),
            device_id=v.get("deviceID"),
            driver_id=v.get("driverID"),
            driver_name=v.get("driverName"),
            driver_info=v.get("driverInfo"),
            api_version=_strip_paren(v["apiVersion"]) if "apiVersion" in v else None,
            device_uuid=v.get("deviceUUID"),
            memory_heaps=p.heaps,
            **_features(p, detailed),
        ))
    return devices


def apply_ggml_selection(devices: list[VulkanDevice], instance_version: str | None,
                         visible: str | None) -> list[VulkanDevice]:
    """Return copies of ``devices`` with ``ggml_usable``/``ggml_reason`` as ggml-vulkan decides."""
    def decide(device: VulkanDevice, usable: bool | None, reason: str | None) -> VulkanDevice:
        return device.model_copy(update={"ggml_usable": usable, "ggml_reason": reason})

    instance = _version_tuple(instance_version)
    if instance is not None and instance < (1, 2):
        return [decide(d, False, f"the Vulkan loader is {instance_version}; ggml-vulkan needs 1.2 or newer")
                for d in devices]

    if visible is not None:
        chosen = {int(t) for t in re.split(r"[,\s]+", visible.strip()) if t.isdigit()}
        return [decide(d, True, None) if d.index in chosen
                else decide(d, False, f"GGML_VK_VISIBLE_DEVICES={visible} does not name it")
                for d in devices]

    decisions: dict[int, tuple[bool | None, str | None]] = {}
    selected: list[VulkanDevice] = []
    for d in devices:
        if d.device_type not in ("discrete", "integrated"):
            continue
        if d.storage16bit is False:
            decisions[d.index] = (False, "no storageBuffer16BitAccess (16-bit storage), which ggml-vulkan requires")
            continue
        twin = next((s for s in selected if d.device_uuid and s.device_uuid == d.device_uuid), None)
        if twin is None:
            selected.append(d)
            continue
        priorities = _DRIVER_PRIORITY.get(d.vendor_id or "", {})
        big = 1 << 30
        if priorities.get(d.driver_id or "", big) < priorities.get(twin.driver_id or "", big):
            selected.remove(twin)
            selected.append(d)
            decisions[twin.index] = (False, f"same GPU as device {d.index}, whose driver ggml-vulkan prefers")
        else:
            decisions[d.index] = (False, f"same GPU as device {twin.index}, whose driver ggml-vulkan prefers")
    if not selected:
        fallback = next((d for d in devices if d.device_type not in ("cpu", None)
                         and d.index not in decisions), None)
        if fallback is not None:
            selected.append(fallback)
    for d in selected:
        # Unknown 16-bit storage (summary only) keeps the verdict open.
        decisions[d.index] = (None, "16-bit storage support unknown (vulkaninfo details unavailable)") \
            if d.storage16bit is None and d.device_type in ("discrete", "integrated") else (True, None)
    result = []
    for d in devices:
        if d.index in decisions:
            result.append(decide(d, *decisions[d.index]))
        elif d.device_type == "cpu":
            result.append(decide(d, False, "CPU device: ggml-vulkan skips CPU devices unless "
                                           "GGML_VK_VISIBLE_DEVICES names one"))
        else:
            result.append(decide(d, False, "not a discrete or integrated GPU, and another device was chosen"))
    return result


def icd_files(system: System) -> list[str]:
    found = []
    for directory in ICD_DIRS:
        for name in system.listdir(directory):
            if name.endswith(".json"):
                found.append(f"{directory}/{name}")
    return found


def probe_vulkan(system: System) -> VulkanInfo:
    icds = icd_files(system)
    argv, timeout = commands.VULKANINFO_TEXT
    full = system.run(argv, timeout)
    detailed = full.ok and "GPU0:" in full.stdout
    result = full
    notes: list[str] = []
    if full.error and full.error.endswith("command not found"):
        return VulkanInfo(status=ProbeStatus.absent, icd_files=icds,
                          reason="vulkaninfo is not installed (package vulkan-tools); Vulkan devices not probed")
    if not detailed:
        argv, timeout = commands.VULKANINFO_SUMMARY
        summary = system.run(argv, timeout)
        if not (summary.ok and "GPU0:" in summary.stdout):
            if not icds:
                return VulkanInfo(status=ProbeStatus.absent, icd_files=icds,
                                  reason=f"no Vulkan driver (ICD) installed ({full.describe_failure()})")
            return VulkanInfo(status=ProbeStatus.error, icd_files=icds,
                              reason=f"vulkaninfo found no usable device: {full.describe_failure()}")
        notes.append(f"features unknown: full vulkaninfo failed ({full.describe_failure()})")
        result = summary
    parsed = parse_vulkaninfo(result.stdout)
    devices = to_devices(parsed, detailed)
    devices = apply_ggml_selection(devices, parsed.instance_version, system.env.get("GGML_VK_VISIBLE_DEVICES"))
    return VulkanInfo(
        status=ProbeStatus.ok,
        reason="; ".join(notes) or None,
        instance_version=parsed.instance_version,
        icd_files=icds,
        devices=devices,
    )

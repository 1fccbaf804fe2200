"""Derive the platform, the compute devices (memory budgets) and the recommended
backends, in order, from the probed sections (ARCHITECTURE.md platform profiles).

* asahi: llama.cpp CPU, then llama.cpp Vulkan (Honeykrisp). Never Metal/MLX:
  they do not exist on Linux.
* nvidia: vLLM, then llama.cpp CUDA, then llama.cpp CPU as the fallback.
* amd: llama.cpp Vulkan (RADV), llama.cpp ROCm, vLLM ROCm, then llama.cpp CPU.
* cpu: llama.cpp CPU (plus llama.cpp Vulkan when a GPU that ggml-vulkan would
  use is present, e.g. an Intel iGPU).

``ready`` means usable now without installing anything; otherwise ``missing``
says what to install or enable. Devices: one ``cpu`` (system RAM, cgroup-aware),
one per NVIDIA GPU (or per MIG instance when MIG is on: only the instances run
CUDA work), one per AMD card, ``apple:gpu`` (unified: the same RAM as the CPU),
and ``vulkan:<n>`` for a Vulkan GPU no other section already covers.
"""

from __future__ import annotations

from dataclasses import dataclass

from nodeagent.contracts.machine import (
    AmdInfo, AsahiInfo, BackendRecommendation, ComputeDevice, CpuInfo, MemoryInfo, NvidiaInfo, Platform,
    ProbeStatus, RuntimeInfo, VulkanDevice, VulkanInfo,
)

# gfx targets with official ROCm support in llama.cpp's HIP build and in vLLM's ROCm build.
ROCM_LLAMA_TARGETS = frozenset({"gfx900", "gfx906", "gfx908", "gfx90a", "gfx942", "gfx950", "gfx1030",
                                "gfx1100", "gfx1101", "gfx1102", "gfx1151", "gfx1200", "gfx1201"})
VLLM_ROCM_TARGETS = frozenset({"gfx90a", "gfx942", "gfx950", "gfx1100", "gfx1101", "gfx1200", "gfx1201"})
VENDOR_NVIDIA, VENDOR_AMD = "0x10de", "0x1002"

LLAMA_CPP_CUDA = "llama-cpp-python built with CUDA: CMAKE_ARGS='-DGGML_CUDA=on' pip install llama-cpp-python"
LLAMA_CPP_VULKAN = "llama-cpp-python built with Vulkan: CMAKE_ARGS='-DGGML_VULKAN=on' pip install llama-cpp-python"
LLAMA_CPP_HIP = "llama-cpp-python built with ROCm/HIP: CMAKE_ARGS='-DGGML_HIP=on' pip install llama-cpp-python"
LLAMA_CPP = "llama-cpp-python: pip install llama-cpp-python"
VLLM = "vLLM: pip install 'agent-machine[vllm]' (or its container image)"
VLLM_ROCM = "vLLM for ROCm: the rocm/vllm container image or a ROCm build of vllm"


@dataclass(frozen=True)
class Derived:
    platform: Platform
    devices: list[ComputeDevice]
    recommended_backends: list[BackendRecommendation]


def compute_devices(cpu: CpuInfo, memory: MemoryInfo, nvidia: NvidiaInfo, amd: AmdInfo,
                    vulkan: VulkanInfo, asahi: AsahiInfo) -> list[ComputeDevice]:
    available = memory.available_bytes
    if memory.effective_limit_bytes is not None and available is not None:
        available = min(available, memory.effective_limit_bytes)
    devices = [ComputeDevice(id="cpu", kind="cpu", name=cpu.model_name, memory_kind="shared_system",
                             memory_total_bytes=memory.effective_limit_bytes, memory_free_bytes=available)]
    for gpu in nvidia.gpus:
        if gpu.mig_mode == "enabled":
            for mig in gpu.mig_devices:
                devices.append(ComputeDevice(id=f"nvidia:{mig.uuid or f'{gpu.index}/{mig.index}'}", kind="nvidia",
                                             name=mig.name, memory_kind="dedicated",
                                             memory_total_bytes=mig.memory_total_bytes,
                                             memory_free_bytes=mig.memory_free_bytes))
            continue
        devices.append(ComputeDevice(id=f"nvidia:{gpu.uuid or gpu.index}", kind="nvidia", name=gpu.name,
                                     memory_kind="dedicated", memory_total_bytes=gpu.memory_total_bytes,
                                     memory_free_bytes=gpu.memory_free_bytes))
    for card in amd.gpus:
        free = None
        if card.vram_total_bytes is not None and card.vram_used_bytes is not None:
            free = card.vram_total_bytes - card.vram_used_bytes
        devices.append(ComputeDevice(id=f"amd:{card.card}", kind="amd", name=card.name, memory_kind="dedicated",
                                     memory_total_bytes=card.vram_total_bytes, memory_free_bytes=free))
    if asahi.status == ProbeStatus.ok:
        name = f"Apple {asahi.chip} GPU" if asahi.chip else "Apple GPU"
        devices.append(ComputeDevice(id="apple:gpu", kind="apple", name=name, memory_kind="unified",
                                     memory_total_bytes=asahi.unified_memory_bytes, memory_free_bytes=available))
    for device in _uncovered_vulkan(vulkan, nvidia, amd, asahi):
        local = [h.size_bytes for h in device.memory_heaps if h.device_local]
        devices.append(ComputeDevice(
            id=f"vulkan:{device.index}", kind="vulkan", name=device.name,
            memory_kind="dedicated" if device.device_type == "discrete" else "shared_system",
            memory_total_bytes=max(local) if local else None,
        ))
    return devices


def _uncovered_vulkan(vulkan: VulkanInfo, nvidia: NvidiaInfo, amd: AmdInfo, asahi: AsahiInfo) -> list[VulkanDevice]:
    """ggml-usable Vulkan GPUs that no NVIDIA/AMD/Apple device entry already stands for."""
    out = []
    for device in vulkan.devices:
        if device.ggml_usable is False or device.device_type == "cpu":
            continue
        if device.vendor_id == VENDOR_NVIDIA and nvidia.gpus:
            continue
        if device.vendor_id == VENDOR_AMD and amd.gpus:
            continue
        if device.driver_id == "DRIVER_ID_MESA_HONEYKRISP" and asahi.status == ProbeStatus.ok:
            continue
        out.append(device)
    return out


def _vulkan_for(vulkan: VulkanInfo, predicate) -> list[VulkanDevice]:
    return [d for d in vulkan.devices if d.ggml_usable is not False and d.device_type != "cpu" and predicate(d)]


def _rec(backend: str, provider: str, devices: list[str], reason: str, missing: list[str]) -> BackendRecommendation:
    return BackendRecommendation(backend=backend, provider=provider, device=devices[0], devices=devices,  # type: ignore[arg-type]
                                 reason=reason, ready=not missing, missing="; ".join(missing) or None)


def _llama_missing(runtime: RuntimeInfo, backend: str | None, build_hint: str) -> list[str]:
    llama = runtime.llama_cpp_python
    if llama.status != ProbeStatus.ok:
        return [LLAMA_CPP if backend in (None, "cpu") else build_hint]
    if backend is not None and backend not in llama.backends:
        return [build_hint]
    return []


def _cpu_rec(cpu: CpuInfo, runtime: RuntimeInfo, reason: str) -> BackendRecommendation:
    isa = ", ".join(f for f in cpu.features if f in ("avx2", "avx512f", "amx_int8", "neon", "dotprod", "i8mm", "sve"))
    detail = f" ({isa})" if isa else ""
    return _rec("llama.cpp-cpu", "llama_cpp_python", ["cpu"], reason + detail, _llama_missing(runtime, "cpu", LLAMA_CPP))


def recommend(platform: Platform, cpu: CpuInfo, nvidia: NvidiaInfo, amd: AmdInfo, vulkan: VulkanInfo,
              asahi: AsahiInfo, runtime: RuntimeInfo, devices: list[ComputeDevice]) -> list[BackendRecommendation]:
    recs: list[BackendRecommendation] = []
    ids = {d.id for d in devices}
    if platform == "asahi":
        recs.append(_cpu_rec(cpu, runtime, f"Apple {asahi.chip or 'Silicon'} under Asahi: llama.cpp's CPU backend "
                                           "is the dependable default on the performance cores; there is no "
                                           "Metal or MLX on Linux"))
        honeykrisp = _vulkan_for(vulkan, lambda d: d.driver_id == "DRIVER_ID_MESA_HONEYKRISP")
        missing = _llama_missing(runtime, "vulkan", LLAMA_CPP_VULKAN)
        if not honeykrisp:
            missing.insert(0, "Mesa's Honeykrisp Vulkan driver (mesa-vulkan-drivers) and vulkan-tools")
        flags = ""
        if honeykrisp:
            d = honeykrisp[0]
            flags = f" (fp16 {_yn(d.fp16)}, int dot {_yn(d.int_dot)}, coopmat {_yn(d.coopmat)})"
        recs.append(_rec("llama.cpp-vulkan", "llama_cpp_python", ["apple:gpu"],
                         "the Apple GPU through Honeykrisp Vulkan; shares unified memory with the CPU" + flags,
                         missing))
        return recs

    if platform == "nvidia":
        gpu_ids = [d.id for d in devices if d.kind == "nvidia"]
        count = len(gpu_ids)
        mig = sum(1 for g in nvidia.gpus if g.mig_mode == "enabled")
        where = f"{count} CUDA device{'s' if count != 1 else ''}" + (f" ({mig} GPU with MIG instances)" if mig else "")
        vllm_missing = [] if runtime.vllm.status == ProbeStatus.ok else [VLLM]
        recs.append(_rec("vllm", "vllm", gpu_ids,
                         f"NVIDIA: vLLM gives the highest throughput with prefix caching across {where}",
                         vllm_missing))
        recs.append(_rec("llama.cpp-cuda", "llama_cpp_python", gpu_ids,
                         "NVIDIA: llama.cpp CUDA for GGUF models and KV state save/restore",
                         _llama_missing(runtime, "cuda", LLAMA_CPP_CUDA)))
        recs.append(_cpu_rec(cpu, runtime, "fallback when no GPU has room"))
        return recs

    if platform == "amd":
        vulkan_ids = _amd_vulkan_cards(amd, vulkan)
        rocm_ids = [f"amd:{g.card}" for g in amd.gpus if g.kfd_node is not None
                    and (g.gfx_target in ROCM_LLAMA_TARGETS)]
        vllm_ids = [f"amd:{g.card}" for g in amd.gpus if g.kfd_node is not None and g.gfx_target in VLLM_ROCM_TARGETS]
        if vulkan_ids:
            recs.append(_rec("llama.cpp-vulkan", "llama_cpp_python", vulkan_ids,
                             "AMD: llama.cpp Vulkan (RADV) needs no ROCm install and is competitive on RDNA",
                             _llama_missing(runtime, "vulkan", LLAMA_CPP_VULKAN)))
        else:
            recs.append(_rec("llama.cpp-vulkan", "llama_cpp_python", [f"amd:{g.card}" for g in amd.gpus],
                             "AMD: llama.cpp Vulkan (RADV) needs no ROCm install",
                             ["a Vulkan driver for these GPUs (Mesa RADV: mesa-vulkan-drivers; RADV does not "
                              "drive compute-only Instinct parts) and vulkan-tools"]
                             + _llama_missing(runtime, "vulkan", LLAMA_CPP_VULKAN)))
        targets = ", ".join(sorted({g.gfx_target for g in amd.gpus if g.gfx_target}))
        if rocm_ids:
            recs.append(_rec("llama.cpp-rocm", "llama_cpp_python", rocm_ids,
                             f"AMD: llama.cpp HIP/ROCm on {targets}",
                             _llama_missing(runtime, "rocm", LLAMA_CPP_HIP)))
        if vllm_ids:
            recs.append(_rec("vllm-rocm", "vllm", vllm_ids,
                             "AMD: vLLM's ROCm build for throughput on "
                             + ", ".join(sorted({g.gfx_target for g in amd.gpus if f'amd:{g.card}' in vllm_ids})),
                             [] if runtime.vllm.status == ProbeStatus.ok else [VLLM_ROCM]))
        recs.append(_cpu_rec(cpu, runtime, "fallback when no GPU has room"))
        return recs

    recs.append(_cpu_rec(cpu, runtime, "no supported GPU found: llama.cpp's CPU backend"))
    vulkan_ids = [d.id for d in devices if d.kind == "vulkan" and d.id in ids]
    if vulkan_ids:
        recs.append(_rec("llama.cpp-vulkan", "llama_cpp_python", vulkan_ids,
                         "a GPU that llama.cpp's Vulkan backend would use",
                         _llama_missing(runtime, "vulkan", LLAMA_CPP_VULKAN)))
    return recs


def _amd_vulkan_cards(amd: AmdInfo, vulkan: VulkanInfo) -> list[str]:
    """AMD cards with a ggml-usable Vulkan device (matched on the PCI device id)."""
    usable_ids = {(d.device_id or "").lower() for d in _vulkan_for(vulkan, lambda d: d.vendor_id == VENDOR_AMD)}
    return [f"amd:{g.card}" for g in amd.gpus if g.pci_id and "0x" + g.pci_id.split(":")[1] in usable_ids]


def _yn(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "unknown"}[value]


def derive(cpu: CpuInfo, memory: MemoryInfo, nvidia: NvidiaInfo, amd: AmdInfo, vulkan: VulkanInfo,
           asahi: AsahiInfo, runtime: RuntimeInfo) -> Derived:
    if asahi.status == ProbeStatus.ok:
        platform: Platform = "asahi"
    elif nvidia.gpus:
        platform = "nvidia"
    elif amd.gpus:
        platform = "amd"
    else:
        platform = "cpu"
    devices = compute_devices(cpu, memory, nvidia, amd, vulkan, asahi)
    return Derived(platform, devices, recommend(platform, cpu, nvidia, amd, vulkan, asahi, runtime, devices))

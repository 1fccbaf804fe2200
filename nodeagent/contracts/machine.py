"""`MachineProfile`: what `probe` found on this machine.

Every section carries ``status`` (ok | absent | error) and, unless ok, a
``reason`` a person can act on. Unknown values are ``null``, never guessed.
Sizes are bytes; GPU memory is tagged by kind so that a unified-memory GPU
(Apple Silicon, integrated parts) is never mistaken for one with VRAM.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Literal

from pydantic import Field

from nodeagent.contracts.base import Contract, Resource


class ProbeStatus(str, Enum):
    ok = "ok"
    absent = "absent"  # the thing is not on this machine (no NVIDIA GPU, no podman)
    error = "error"  # it may be there, but probing it failed


class Section(Contract):
    status: ProbeStatus = ProbeStatus.ok
    reason: str | None = None


MemoryKind = Literal["dedicated", "unified", "shared_system", "unknown"]


# ----------------------------------------------------------------- host
class HostInfo(Section):
    hostname: str | None = None
    os_id: str | None = None
    os_version: str | None = None
    os_pretty_name: str | None = None
    kernel_release: str | None = None
    architecture: str | None = None  # uname machine: x86_64, aarch64
    page_size: int | None = None
    # sha256 over an app-specific key and /etc/machine-id; never the raw id.
    machine_id_hash: str | None = None
    container: str | None = None  # docker, podman, kubernetes, lxc, systemd-nspawn, ...
    virtualization: str | None = None  # kvm, vmware, microsoft, xen, ...


# ----------------------------------------------------------------- cpu
class CpuCaches(Contract):
    """Sizes as cpu0 sees them (one instance: per core for L1/L2, per cluster/socket for L3)."""

    # Explicit aliases: the generated camelCase of "l1d_bytes" would be "l1DBytes".
    l1d_bytes: int | None = Field(default=None, alias="l1dBytes")
    l1i_bytes: int | None = Field(default=None, alias="l1iBytes")
    l2_bytes: int | None = None
    l3_bytes: int | None = None


class CpuInfo(Section):
    vendor: str | None = None
    model_name: str | None = None
    architecture: str | None = None
    sockets: int | None = None
    cores: int | None = None  # physical cores, all sockets
    threads: int | None = None  # logical CPUs online
    numa_nodes: int | None = None
    # Only the ISA features inference kernels dispatch on, sorted.
    features: list[str] = Field(default_factory=list)
    caches: CpuCaches = Field(default_factory=CpuCaches)
    implementer: str | None = None  # ARM "CPU implementer", e.g. 0x61 (Apple), 0x41 (Arm)
    parts: list[str] = Field(default_factory=list)  # ARM "CPU part" values seen, e.g. 0x034


# ----------------------------------------------------------------- memory
class CgroupLimits(Contract):
    version: Literal[1, 2] | None = None
    path: str | None = None
    memory_limit_bytes: int | None = None  # null: unlimited
    cpu_quota_cores: float | None = None  # null: unlimited


class MemoryInfo(Section):
    total_bytes: int | None = None
    available_bytes: int | None = None
    swap_total_bytes: int | None = None
    swap_free_bytes: int | None = None
    hugepages_total: int | None = None
    hugepages_free: int | None = None
    hugepage_size_bytes: int | None = None
    cgroup: CgroupLimits = Field(default_factory=CgroupLimits)
    # min(total, cgroup limit): what this agent may actually use.
    effective_limit_bytes: int | None = None


# ----------------------------------------------------------------- nvidia
class MigDevice(Contract):
    index: int
    uuid: str | None = None
    name: str | None = None
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None


class NvidiaGpu(Contract):
    index: int
    name: str | None = None
    uuid: str | None = None
    pci_bus_id: str | None = None
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None
    compute_capability: str | None = None  # "9.0"
    mig_mode: Literal["enabled", "disabled", "unsupported"] | None = None
    mig_devices: list[MigDevice] = Field(default_factory=list)
    power_limit_watts: float | None = None
    ecc_enabled: bool | None = None
    errors: list[str] = Field(default_factory=list)  # per-field NVML failures, "field: reason"


class NvidiaInfo(Section):
    driver_version: str | None = None
    cuda_driver_version: str | None = None  # "12.4"
    gpus: list[NvidiaGpu] = Field(default_factory=list)


# ----------------------------------------------------------------- amd
class AmdGpu(Contract):
    card: str  # card0
    pci_id: str | None = None  # vendor:device, "1002:740f"
    pci_bus_id: str | None = None
    name: str | None = None
    vram_total_bytes: int | None = None
    vram_used_bytes: int | None = None
    gfx_target: str | None = None  # gfx90a, gfx1100
    gfx_target_version: int | None = None
    kfd_node: int | None = None


class AmdInfo(Section):
    gpus: list[AmdGpu] = Field(default_factory=list)


# ----------------------------------------------------------------- vulkan
class VulkanHeap(Contract):
    size_bytes: int
    device_local: bool


class VulkanDevice(Contract):
    index: int  # vulkaninfo's GPU<n>, the index GGML_VK_VISIBLE_DEVICES uses
    name: str | None = None
    device_type: Literal["discrete", "integrated", "virtual", "cpu", "other"] | None = None
    vendor_id: str | None = None  # "0x10de"
    vendor: str | None = None
    device_id: str | None = None
    driver_id: str | None = None  # DRIVER_ID_MESA_LLVMPIPE
    driver_name: str | None = None
    driver_info: str | None = None
    api_version: str | None = None
    device_uuid: str | None = None
    memory_heaps: list[VulkanHeap] = Field(default_factory=list)
    # What ggml's Vulkan backend decides its fast paths on; null when unknown.
    fp16: bool | None = None
    int_dot: bool | None = None
    coopmat: bool | None = None
    storage16bit: bool | None = Field(default=None, alias="storage16bit")
    # Whether llama.cpp's Vulkan backend would use it by default, and why not.
    ggml_usable: bool | None = None
    ggml_reason: str | None = None


class VulkanInfo(Section):
    instance_version: str | None = None  # the loader's; ggml-vulkan needs >= 1.2
    icd_files: list[str] = Field(default_factory=list)  # installed driver manifests (icd.d/*.json)
    devices: list[VulkanDevice] = Field(default_factory=list)


# ----------------------------------------------------------------- asahi
class AsahiInfo(Section):
    """Apple Silicon running Linux (Asahi). ``status: absent`` elsewhere."""

    soc: str | None = None  # t6020
    chip: str | None = None  # "M2 Pro"
    family: str | None = None  # M1, M2
    tier: str | None = None  # base, Pro, Max, Ultra
    board: str | None = None  # j414s
    model: str | None = None
    evidence: list[str] = Field(default_factory=list)  # which signals matched
    gpu_driver: str | None = None  # asahi, virtio_gpu
    vulkan_driver: str | None = None  # honeykrisp
    page_size_16k: bool | None = Field(default=None, alias="pageSize16k")
    unified_memory_bytes: int | None = None


# ----------------------------------------------------------------- runtime
class PodmanInfo(Section):
    version: str | None = None
    quadlet: bool | None = None  # >= 4.4
    rootless: bool | None = None


class CdiInfo(Section):
    spec_files: list[str] = Field(default_factory=list)
    devices: list[str] = Field(default_factory=list)  # fully qualified: nvidia.com/gpu=0


class PythonBackendInfo(Section):
    version: str | None = None
    path: str | None = None  # package directory found (not imported)
    backends: list[str] = Field(default_factory=list)  # cpu, cuda, vulkan, metal, rocm


class RuntimeInfo(Section):
    podman: PodmanInfo = Field(default_factory=PodmanInfo)
    cdi: CdiInfo = Field(default_factory=CdiInfo)
    cgroup_version: Literal[1, 2] | None = None
    user: str | None = None  # the effective user's name (from /etc/passwd)
    systemd_user: bool | None = None  # a reachable systemd user manager
    systemd_user_state: str | None = None  # `systemctl --user is-system-running`: running, degraded, offline...
    lingering: bool | None = None  # loginctl enable-linger for this user
    llama_cpp_python: PythonBackendInfo = Field(default_factory=PythonBackendInfo)
    vllm: PythonBackendInfo = Field(default_factory=PythonBackendInfo)


# ----------------------------------------------------------------- storage
class StorageLocation(Contract):
    role: Literal["state", "cache", "ram_tier"]
    path: str
    exists: bool
    # Where the figures come from: the path itself or, when it does not exist
    # yet, its nearest existing parent (where it will be created).
    measured_path: str | None = None
    mount_point: str | None = None
    fs_type: str | None = None
    device: str | None = None
    total_bytes: int | None = None
    free_bytes: int | None = None
    rotational: bool | None = None


class StorageInfo(Section):
    locations: list[StorageLocation] = Field(default_factory=list)
    ram_tier_path: str | None = None  # a tmpfs directory usable for the T1 tier


# ----------------------------------------------------------------- summary
class ComputeDevice(Contract):
    """One place a model can live, with its memory budget. Derived from the sections."""

    id: str  # cpu, nvidia:GPU-uuid, amd:card0, apple:gpu, vulkan:0
    kind: Literal["cpu", "nvidia", "amd", "apple", "vulkan"]
    name: str | None = None
    memory_kind: MemoryKind
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None


Platform = Literal["asahi", "nvidia", "amd", "cpu"]


class BackendRecommendation(Contract):
    backend: str  # llama.cpp-cpu, llama.cpp-vulkan, llama.cpp-cuda, llama.cpp-rocm, vllm, vllm-rocm
    provider: Literal["llama_cpp_python", "llama_server", "vllm"]
    device: str  # the primary ComputeDevice id
    devices: list[str] = Field(default_factory=list)  # every ComputeDevice id it can use
    reason: str
    ready: bool  # usable now without installing anything
    missing: str | None = None  # what to install or enable when not ready


class MachineProfile(Resource):
    kind: Literal["MachineProfile"] = "MachineProfile"
    probed_at: datetime
    agent_version: str
    root: str = "/"  # filesystem root the probe read (fixtures use another)
    platform: Platform
    host: HostInfo
    cpu: CpuInfo
    memory: MemoryInfo
    nvidia: NvidiaInfo
    amd: AmdInfo
    vulkan: VulkanInfo
    asahi: AsahiInfo
    runtime: RuntimeInfo
    storage: StorageInfo
    devices: list[ComputeDevice]
    recommended_backends: list[BackendRecommendation]

"""NVIDIA GPUs through NVML (``pynvml`` from the optional ``nvidia-ml-py``).

The module is taken from ``System.modules`` when given (captured machines hand
in `nodeagent.probe.replay.ReplayNvml`), else imported lazily. Errors are
mapped to what an admin can act on:

* no NVIDIA display/3D controller on the PCI bus -> absent, NVML not loaded;
* no pynvml -> absent, naming the ``nvidia`` extra;
* NVMLError_LibraryNotFound at init -> absent (no NVIDIA driver installed);
* NVMLError_DriverNotLoaded, NoPermission, LibRmVersionMismatch... -> error;
* per-GPU: NotSupported leaves the field null (the GPU lacks it: e.g. ECC or
  MIG on consumer parts); any other per-field error is listed in the GPU's
  ``errors`` as ``"field: reason"`` and the rest of the GPU is still reported.

``nvmlShutdown`` is always called after a successful ``nvmlInit``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from nodeagent.contracts.machine import MigDevice, NvidiaGpu, NvidiaInfo, ProbeStatus
from nodeagent.probe.system import System

INSTALL_HINT = "install the nvidia extra: pip install 'agent-machine[nvidia]' (nvidia-ml-py)"

_INIT_REASONS = {
    "NVMLError_LibraryNotFound": (ProbeStatus.absent,
                                  "NVML library (libnvidia-ml.so.1) not found: no NVIDIA driver is installed"),
    "NVMLError_DriverNotLoaded": (ProbeStatus.error,
                                  "NVIDIA driver is installed but not loaded: load the nvidia kernel module "
                                  "(modprobe nvidia) or check dmesg"),
    "NVMLError_NoPermission": (ProbeStatus.error,
                               "no permission to open the NVIDIA device nodes (/dev/nvidia*): check their mode/groups"),
    "NVMLError_LibRmVersionMismatch": (ProbeStatus.error,
                                       "NVML library and kernel driver versions differ (driver upgraded "
                                       "without reboot): reboot or reload the nvidia module"),
    "NVMLError_FunctionNotFound": (ProbeStatus.error,
                                   "the NVIDIA driver's NVML lacks a function nvidia-ml-py needs: driver too old"),
    "NVMLError_NotSupported": (ProbeStatus.error, "NVML is not supported by this driver/GPU"),
    "NVMLError_GpuIsLost": (ProbeStatus.error, "a GPU fell off the bus (GPU is lost): check dmesg, reset or reboot"),
    "NVMLError_InsufficientPower": (ProbeStatus.error, "a GPU lacks external power: check its power cables"),
    "NVMLError_IrqIssue": (ProbeStatus.error, "the NVIDIA driver reports an interrupt problem: check dmesg"),
    "NVMLError_Uninitialized": (ProbeStatus.error, "NVML was not initialized"),
}


def _load_pynvml(system: System) -> Any | None:
    if system.modules is not None:
        return system.modules.get("pynvml")
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


def _error_name(exc: BaseException) -> str:
    return type(exc).__name__


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def describe_nvml_error(exc: BaseException) -> str:
    name = _error_name(exc)
    try:
        message = str(exc)
    except Exception:  # pynvml's __str__ may call into a missing library
        message = ""
    return f"{name}: {message}" if message and message != name else name


def _cuda_version(value: int) -> str:
    """12040 -> "12.4" (NVML encodes major*1000 + minor*10)."""
    return f"{value // 1000}.{(value % 1000) // 10}"


class _Fields:
    """Calls NVML getters for one GPU, keeping per-field failures instead of raising."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.errors: list[str] = []

    def get(self, field: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except self.nvml.NVMLError as exc:
            if not isinstance(exc, self.nvml.NVMLError_NotSupported):
                self.errors.append(f"{field}: {describe_nvml_error(exc)}")
            return None


def _memory(nvml: Any, handle: Any) -> Any:
    """Memory info, v2 (which excludes driver-reserved memory) when the driver has it."""
    try:
        return nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
    except (nvml.NVMLError_FunctionNotFound, nvml.NVMLError_ArgumentVersionMismatch):
        return nvml.nvmlDeviceGetMemoryInfo(handle)


def _mig_devices(nvml: Any, handle: Any, fields: _Fields) -> list[MigDevice]:
    count = fields.get("mig_device_count", lambda: nvml.nvmlDeviceGetMaxMigDeviceCount(handle)) or 0
    devices: list[MigDevice] = []
    for index in range(count):
        try:
            mig = nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, index)
        except nvml.NVMLError_NotFound:
            continue  # sparse: slot not populated
        except nvml.NVMLError as exc:
            fields.errors.append(f"mig_device[{index}]: {describe_nvml_error(exc)}")
            continue
        memory = fields.get(f"mig_device[{index}].memory", lambda: _memory(nvml, mig))
        devices.append(MigDevice(
            index=index,
            uuid=_maybe_text(fields.get(f"mig_device[{index}].uuid", lambda: nvml.nvmlDeviceGetUUID(mig))),
            name=_maybe_text(fields.get(f"mig_device[{index}].name", lambda: nvml.nvmlDeviceGetName(mig))),
            memory_total_bytes=int(memory.total) if memory is not None else None,
            memory_free_bytes=int(memory.free) if memory is not None else None,
        ))
    return devices


def _maybe_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _gpu(nvml: Any, index: int) -> NvidiaGpu:
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
    except nvml.NVMLError as exc:
        return NvidiaGpu(index=index, errors=[f"handle: {describe_nvml_error(exc)}"])
    f = _Fields(nvml)
    name = _maybe_text(f.get("name", lambda: nvml.nvmlDeviceGetName(handle)))
    uuid = _maybe_text(f.get("uuid", lambda: nvml.nvmlDeviceGetUUID(handle)))
    pci = f.get("pci_bus_id", lambda: nvml.nvmlDeviceGetPciInfo(handle))
    memory = f.get("memory", lambda: _memory(nvml, handle))
    cc = f.get("compute_capability", lambda: nvml.nvmlDeviceGetCudaComputeCapability(handle))
    mig_mode = None
    mig_devices: list[MigDevice] = []
    try:
        current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        mig_mode = "enabled" if current == nvml.NVML_DEVICE_MIG_ENABLE else "disabled"
    except nvml.NVMLError_NotSupported:
        mig_mode = "unsupported"
    except nvml.NVMLError as exc:
        f.errors.append(f"mig_mode: {describe_nvml_error(exc)}")
    if mig_mode == "enabled":
        mig_devices = _mig_devices(nvml, handle, f)
    power_mw = f.get("power_limit", lambda: nvml.nvmlDeviceGetPowerManagementLimit(handle))
    ecc = f.get("ecc", lambda: nvml.nvmlDeviceGetEccMode(handle))
    return NvidiaGpu(
        index=index,
        name=name,
        uuid=uuid,
        pci_bus_id=_text(pci.busId) if pci is not None else None,
        memory_total_bytes=int(memory.total) if memory is not None else None,
        memory_free_bytes=int(memory.free) if memory is not None else None,
        compute_capability=f"{cc[0]}.{cc[1]}" if cc is not None else None,
        mig_mode=mig_mode,
        mig_devices=mig_devices,
        power_limit_watts=round(power_mw / 1000.0, 3) if power_mw is not None else None,
        ecc_enabled=(ecc[0] == nvml.NVML_FEATURE_ENABLED) if ecc is not None else None,
        errors=f.errors,
    )


def nvidia_pci_gpus(system: System) -> list[str]:
    """PCI slots of NVIDIA display/3D controllers (vendor 0x10de, class 0x03xxxx)."""
    slots = []
    for slot in system.listdir("/sys/bus/pci/devices"):
        base = f"/sys/bus/pci/devices/{slot}"
        if (system.read_text(f"{base}/vendor") or "").strip().lower() != "0x10de":
            continue
        if (system.read_text(f"{base}/class") or "").strip().lower().startswith("0x03"):
            slots.append(slot)
    return slots


def probe_nvidia(system: System) -> NvidiaInfo:
    # Without NVIDIA hardware there is nothing for NVML to say; skipping it saves
    # importing pynvml/ctypes and a dlopen attempt on every probe.
    if not nvidia_pci_gpus(system) and not system.listdir("/proc/driver/nvidia/gpus"):
        return NvidiaInfo(status=ProbeStatus.absent, reason="no NVIDIA GPU on the PCI bus")
    nvml = _load_pynvml(system)
    if nvml is None:
        return NvidiaInfo(status=ProbeStatus.absent, reason=f"pynvml is not installed; {INSTALL_HINT}")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        status, reason = _INIT_REASONS.get(_error_name(exc), (ProbeStatus.error, "NVML failed to initialize"))
        return NvidiaInfo(status=status, reason=f"{reason} ({describe_nvml_error(exc)})")
    system_fields = _Fields(nvml)
    try:
        driver = _maybe_text(system_fields.get("driver_version", nvml.nvmlSystemGetDriverVersion))
        cuda = system_fields.get("cuda_driver_version", nvml.nvmlSystemGetCudaDriverVersion)
        cuda_text = _cuda_version(cuda) if cuda else None
        try:
            count = nvml.nvmlDeviceGetCount()
        except nvml.NVMLError as exc:
            return NvidiaInfo(status=ProbeStatus.error, driver_version=driver, cuda_driver_version=cuda_text,
                              reason=f"could not count GPUs ({describe_nvml_error(exc)})")
        gpus = [_gpu(nvml, index) for index in range(count)]
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass
    if not gpus:
        return NvidiaInfo(status=ProbeStatus.absent, reason="the NVIDIA driver reports no GPUs",
                          driver_version=driver, cuda_driver_version=cuda_text)
    problems = list(system_fields.errors)
    broken = [str(g.index) for g in gpus if g.errors]
    if broken:
        problems.append(f"some NVML queries failed on GPU {', '.join(broken)} (see each GPU's errors)")
    return NvidiaInfo(
        status=ProbeStatus.ok,
        reason="; ".join(problems) or None,
        driver_version=driver,
        cuda_driver_version=cuda_text,
        gpus=gpus,
    )

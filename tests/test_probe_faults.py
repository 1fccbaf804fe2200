"""Fault injection: whatever breaks, `probe()` returns a whole, valid MachineProfile.

Missing commands, commands that hang (real processes killed by the real
timeout), unreadable files (directories where files belong: chmod cannot stop
root), a sub-probe that raises, and NVML raising every pynvml error class at
init and from every function the probe calls.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from pathlib import Path

import jsonschema
import psutil
import pynvml
import pytest

import nodeagent.probe.cpu
from nodeagent.contracts.machine import ProbeStatus
from nodeagent.probe import commands, nvidia, probe
from nodeagent.probe.replay import ReplayNvml, load_capture
from nodeagent.probe.system import CommandResult, System

MACHINES = Path(__file__).parent / "fixtures" / "machines"
SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "contracts" / "MachineProfile.schema.json").read_text())
H100 = MACHINES / "h100x8"
NVML_ERRORS = sorted(name.removeprefix("NVMLError_") for name in dir(pynvml) if name.startswith("NVMLError_"))


def valid(profile) -> None:
    jsonschema.validate(profile.to_wire(), SCHEMA)


def test_every_command_missing():
    def missing(argv, timeout, env=None):
        return CommandResult(tuple(argv), None, error=f"{argv[0]}: command not found")

    profile = probe(system=System(runner=missing))
    valid(profile)
    assert profile.vulkan.status == ProbeStatus.absent and "vulkaninfo is not installed" in profile.vulkan.reason
    assert profile.runtime.podman.status == ProbeStatus.absent
    assert profile.recommended_backends[0].backend == "llama.cpp-cpu"


def test_command_failing_with_status_is_an_error_with_its_message():
    def broken(argv, timeout, env=None):
        return CommandResult(tuple(argv), 125, "", "Error: cannot re-exec process")

    profile = probe(system=System(runner=broken))
    assert profile.runtime.podman.status == ProbeStatus.error
    assert profile.runtime.podman.reason == "podman exited with status 125: Error: cannot re-exec process"


MARKER = "31.4159"


def _hanging_tool(bin_dir: Path, name: str) -> None:
    script = bin_dir / name
    # A wrapper whose child hangs: killing only the shell would leave `sleep` holding our pipe.
    script.write_text(f"#!/bin/sh\nsleep {MARKER}\necho never\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_hanging_commands_are_killed_at_their_timeout(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("vulkaninfo", "podman", "systemctl"):
        _hanging_tool(bin_dir, name)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(commands, "VULKANINFO_TEXT", (("vulkaninfo",), 0.5))
    monkeypatch.setattr(commands, "VULKANINFO_SUMMARY", (("vulkaninfo", "--summary"), 0.5))
    monkeypatch.setattr(commands, "PODMAN_VERSION", (("podman", "--version"), 0.5))
    monkeypatch.setattr(commands, "SYSTEMD_USER_STATE", (("systemctl", "--user", "is-system-running"), 0.5))
    monkeypatch.setattr(commands, "PREFETCH", (commands.VULKANINFO_TEXT, commands.PODMAN_VERSION,
                                               commands.SYSTEMD_USER_STATE))
    started = time.monotonic()
    profile = probe()
    elapsed = time.monotonic() - started
    valid(profile)
    # Prefetched in parallel; the summary fallback adds one more timeout.
    assert elapsed < 3.0, elapsed
    assert profile.vulkan.status == ProbeStatus.error
    assert "timed out after 0.5s" in profile.vulkan.reason
    assert profile.runtime.podman.status == ProbeStatus.error and "timed out" in profile.runtime.podman.reason
    assert profile.runtime.systemd_user is False and profile.runtime.systemd_user_state == "unresponsive"
    time.sleep(0.2)
    leftovers = [p.pid for p in psutil.process_iter(["cmdline"]) if MARKER in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []


def test_unreadable_files_leave_sections_in_error(tmp_path):
    capture = tmp_path / "vm"
    shutil.copytree(MACHINES / "debian-vm", capture, symlinks=True)
    root = capture / "root"
    for path in ("proc/meminfo", "proc/cpuinfo", "etc/os-release", "proc/self/mountinfo", "proc/self/cgroup"):
        (root / path).unlink()
        (root / path).mkdir()  # a directory where a file is expected: unreadable even for root
    profile = probe(system=load_capture(capture))
    valid(profile)
    assert profile.memory.status == ProbeStatus.error and "/proc/meminfo" in profile.memory.reason
    assert profile.cpu.status == ProbeStatus.error and "/proc/cpuinfo" in profile.cpu.reason
    assert "/etc/os-release" in profile.host.reason and profile.host.os_id is None
    assert "mountinfo unreadable" in profile.storage.reason
    assert profile.vulkan.status == ProbeStatus.ok  # untouched sections still report
    assert [r.backend for r in profile.recommended_backends] == ["llama.cpp-cpu"]


def test_a_sub_probe_that_raises_becomes_an_error_section(monkeypatch):
    def boom(system):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(nodeagent.probe.cpu, "probe_cpu", boom)
    profile = probe(system=load_capture(MACHINES / "asahi-m2pro"))
    valid(profile)
    assert profile.cpu.status == ProbeStatus.error
    assert profile.cpu.reason == "cpu probe failed: RuntimeError: simulated bug"
    # Asahi still decides from the device tree and Honeykrisp.
    assert profile.asahi.status == ProbeStatus.ok and profile.platform == "asahi"


def test_missing_pynvml_names_the_extra():
    system = load_capture(H100)
    system.modules = {}
    info = nvidia.probe_nvidia(system)
    assert info.status == ProbeStatus.absent and "agent-machine[nvidia]" in info.reason


@pytest.mark.parametrize("error", NVML_ERRORS)
def test_nvml_init_raising_each_error_class(error):
    profile = probe(system=load_capture(H100, nvml_faults={"nvmlInit": error}))
    valid(profile)
    nv = profile.nvidia
    assert nv.gpus == [] and f"NVMLError_{error}" in nv.reason
    assert nv.status == (ProbeStatus.absent if error == "LibraryNotFound" else ProbeStatus.error)
    assert profile.platform == "cpu"  # no usable GPU, so no GPU backend is recommended
    if error == "DriverNotLoaded":
        assert "not loaded" in nv.reason


# function -> (the NvidiaGpu attribute it fills, the label of its entry in the GPU's errors)
PER_GPU = {
    "nvmlDeviceGetName": ("name", "name"),
    "nvmlDeviceGetUUID": ("uuid", "uuid"),
    "nvmlDeviceGetPciInfo": ("pci_bus_id", "pci_bus_id"),
    "nvmlDeviceGetMemoryInfo": ("memory_total_bytes", "memory"),
    "nvmlDeviceGetCudaComputeCapability": ("compute_capability", "compute_capability"),
    "nvmlDeviceGetPowerManagementLimit": ("power_limit_watts", "power_limit"),
    "nvmlDeviceGetEccMode": ("ecc_enabled", "ecc"),
    "nvmlDeviceGetMigMode": ("mig_mode", "mig_mode"),
}
MIG_ONLY = ("nvmlDeviceGetMaxMigDeviceCount", "nvmlDeviceGetMigDeviceHandleByIndex")
SYSTEM_CALLS = ("nvmlSystemGetDriverVersion", "nvmlSystemGetCudaDriverVersion", "nvmlDeviceGetCount",
                "nvmlDeviceGetHandleByIndex", "nvmlShutdown")


@pytest.fixture(scope="module")
def nvml_data():
    return json.loads((H100 / "capture.json").read_text())["nvml"]


@pytest.mark.parametrize("error", NVML_ERRORS)
@pytest.mark.parametrize("function", list(PER_GPU) + list(MIG_ONLY) + list(SYSTEM_CALLS))
def test_nvml_function_raising_each_error_class(function, error, nvml_data):
    fake = ReplayNvml(nvml_data, faults={function: error})
    system = System(root=(H100 / "root").resolve(), modules={"pynvml": fake})
    info = nvidia.probe_nvidia(system)  # must not raise
    name = f"NVMLError_{error}"
    assert fake.calls[-1] == "nvmlShutdown"  # always shut down after a successful init
    if function in PER_GPU:
        attr, label = PER_GPU[function]
        assert info.status == ProbeStatus.ok and len(info.gpus) == 8
        for gpu in info.gpus:
            if function == "nvmlDeviceGetMigMode" and error == "NotSupported":
                assert gpu.mig_mode == "unsupported" and gpu.errors == []
                continue
            assert getattr(gpu, attr) is None
            if error == "NotSupported":
                assert gpu.errors == []  # the GPU lacks it: not an error
            else:
                assert any(e.startswith(f"{label}: {name}") for e in gpu.errors), gpu.errors
            if function != "nvmlDeviceGetUUID":
                assert gpu.uuid is not None  # the rest of the GPU is still reported
        assert (info.reason is None) == (error == "NotSupported")
    elif function in MIG_ONLY:
        assert info.status == ProbeStatus.ok
        assert info.gpus[7].mig_mode == "enabled" and info.gpus[7].mig_devices == []
        silent = "NotSupported" if function == "nvmlDeviceGetMaxMigDeviceCount" else "NotFound"
        assert any(name in e for e in info.gpus[7].errors) == (error != silent)
        assert all(g.errors == [] for g in info.gpus[:7])
    elif function == "nvmlDeviceGetCount":
        assert info.status == ProbeStatus.error and name in info.reason and info.driver_version == "545.23.08"
    elif function == "nvmlDeviceGetHandleByIndex":
        assert info.status == ProbeStatus.ok and len(info.gpus) == 8
        assert all(len(g.errors) == 1 and g.errors[0].startswith(f"handle: {name}") for g in info.gpus)
        assert all(g.uuid is None for g in info.gpus)
    elif function == "nvmlShutdown":
        assert info.status == ProbeStatus.ok and len(info.gpus) == 8 and info.reason is None
    else:
        attr = "driver_version" if function == "nvmlSystemGetDriverVersion" else "cuda_driver_version"
        assert info.status == ProbeStatus.ok and getattr(info, attr) is None and len(info.gpus) == 8
        assert (info.reason is None) == (error == "NotSupported")


def test_nvml_memory_falls_back_to_v1_when_v2_is_missing(nvml_data):
    class OldDriver(ReplayNvml):
        def nvmlDeviceGetMemoryInfo(self, handle, version=None):
            if version is not None:
                self.calls.append("nvmlDeviceGetMemoryInfo_v2")
                raise self._error("FunctionNotFound")
            return super().nvmlDeviceGetMemoryInfo(handle)

    fake = OldDriver(nvml_data)
    info = nvidia.probe_nvidia(System(root=(H100 / "root").resolve(), modules={"pynvml": fake}))
    assert info.gpus[0].memory_total_bytes == 81559 * 2**20 and info.gpus[0].errors == []
    assert "nvmlDeviceGetMemoryInfo_v2" in fake.calls

"""Sub-probe parsers and decisions, mostly on real captured text (tests/fixtures/captured/)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from nodeagent.contracts.machine import (
    AmdInfo, AsahiInfo, CpuInfo, MemoryInfo, NvidiaInfo, ProbeStatus, PythonBackendInfo, RuntimeInfo, VulkanDevice,
    VulkanInfo,
)
from nodeagent.probe import amd, asahi, cpu, host, memory, recommend, runtime, storage, vulkan
from nodeagent.probe.system import CommandResult, System

CAPTURED = Path(__file__).parent / "fixtures" / "captured"


def captured(name: str) -> str:
    lines = (CAPTURED / name).read_text().splitlines(keepends=True)
    return "".join(line for line in lines if not line.startswith(("# source:", "# note:")))


def no_commands(argv, timeout, env=None):
    return CommandResult(tuple(argv), None, error=f"{argv[0]}: command not found")


def tree(tmp_path: Path, files: dict[str, str | bytes], **kwargs) -> System:
    for path, content in files.items():
        target = tmp_path / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
    kwargs.setdefault("runner", no_commands)
    kwargs.setdefault("env", {})
    kwargs.setdefault("modules", {})
    kwargs.setdefault("python_path", [])
    return System(root=tmp_path, **kwargs)


# ------------------------------------------------------------------ vulkan
def test_summary_of_a_laptop_with_three_drivers():
    parsed = vulkan.parse_vulkaninfo(captured("nvidia-rtx4070laptop-intel-vulkaninfo-summary.txt"))
    assert parsed.instance_version == "1.3.275"
    devices = vulkan.to_devices(parsed, detailed=False)
    assert [(d.device_type, d.vendor, d.driver_id) for d in devices] == [
        ("integrated", "Intel", "DRIVER_ID_INTEL_OPEN_SOURCE_MESA"),
        ("discrete", "NVIDIA", "DRIVER_ID_NVIDIA_PROPRIETARY"),
        ("cpu", "Mesa", "DRIVER_ID_MESA_LLVMPIPE"),
    ]
    assert devices[1].name == "NVIDIA GeForce RTX 4070 Laptop GPU" and devices[1].api_version == "1.4.329"
    # A summary carries no feature structs: unknown, not false.
    assert {d.fp16 for d in devices} == {None}
    chosen = vulkan.apply_ggml_selection(devices, parsed.instance_version, None)
    assert [d.ggml_usable for d in chosen] == [None, None, False]
    assert "unknown" in chosen[0].ggml_reason and "CPU device" in chosen[2].ggml_reason


@pytest.mark.parametrize("name, kind, driver", [
    ("nvidia-jetson-orin-vulkaninfo-summary.txt", "integrated", "DRIVER_ID_NVIDIA_PROPRIETARY"),
    ("nvidia-rtx3090-vulkaninfo-summary-devices.txt", "discrete", "DRIVER_ID_NVIDIA_PROPRIETARY"),
    ("radv-strix-halo-8060s-vulkaninfo-summary-devices.txt", "integrated", "DRIVER_ID_MESA_RADV"),
])
def test_single_device_summaries(name, kind, driver):
    devices = vulkan.to_devices(vulkan.parse_vulkaninfo(captured(name)), detailed=False)
    assert len(devices) == 1 and devices[0].device_type == kind and devices[0].driver_id == driver
    assert devices[0].device_uuid


def test_full_text_of_this_build_machine_gives_features_and_heaps():
    text = (CAPTURED / "this-vm" / "vulkaninfo.txt").read_text()
    parsed = vulkan.parse_vulkaninfo(text)
    (device,) = vulkan.to_devices(parsed, detailed=True)
    assert device.name.startswith("llvmpipe") and device.api_version == "1.3.230"
    assert device.driver_info == "Mesa 22.3.6 (LLVM 15.0.6)"
    assert [(h.size_bytes, h.device_local) for h in device.memory_heaps] == [(2147483648, True)]
    # llvmpipe exposes the extension and feature, but does not accelerate 4x8-bit dot products.
    assert (device.fp16, device.int_dot, device.coopmat, device.storage16bit) == (True, False, False, True)


def _dev(index, kind, **kw) -> VulkanDevice:
    defaults = dict(name=f"dev{index}", vendor_id="0x1002", storage16bit=True, device_uuid=f"uuid-{index}")
    defaults.update(kw)
    return VulkanDevice(index=index, device_type=kind, **defaults)


def test_ggml_visible_devices_can_name_the_cpu_device():
    devices = [_dev(0, "cpu"), _dev(1, "discrete")]
    chosen = vulkan.apply_ggml_selection(devices, "1.3.0", "0")
    assert [d.ggml_usable for d in chosen] == [True, False]
    assert "GGML_VK_VISIBLE_DEVICES=0" in chosen[1].ggml_reason


def test_ggml_needs_vulkan_1_2_and_16bit_storage():
    assert {d.ggml_usable for d in vulkan.apply_ggml_selection([_dev(0, "discrete")], "1.1.130", None)} == {False}
    chosen = vulkan.apply_ggml_selection([_dev(0, "discrete", storage16bit=False), _dev(1, "virtual")], "1.3.0", None)
    assert chosen[0].ggml_usable is False and "16-bit storage" in chosen[0].ggml_reason
    # No qualifying GPU: ggml falls back to the first non-CPU device.
    assert chosen[1].ggml_usable is True


def test_ggml_keeps_one_driver_per_gpu_preferring_radv():
    amdvlk = _dev(0, "discrete", driver_id="DRIVER_ID_AMD_OPEN_SOURCE", device_uuid="same")
    radv = _dev(1, "discrete", driver_id="DRIVER_ID_MESA_RADV", device_uuid="same")
    chosen = vulkan.apply_ggml_selection([amdvlk, radv], "1.3.0", None)
    assert [d.ggml_usable for d in chosen] == [False, True]
    assert "same GPU as device 1" in chosen[0].ggml_reason


def test_vulkan_probe_falls_back_to_summary(tmp_path):
    summary = captured("nvidia-rtx4070laptop-intel-vulkaninfo-summary.txt")

    def runner(argv, timeout, env=None):
        if tuple(argv) == ("vulkaninfo", "--summary"):
            return CommandResult(tuple(argv), 0, summary)
        return CommandResult(tuple(argv), 1, "", "vulkaninfo: surface query failed")

    info = vulkan.probe_vulkan(tree(tmp_path, {}, runner=runner))
    assert info.status == ProbeStatus.ok and len(info.devices) == 3
    assert "features unknown" in info.reason and "surface query failed" in info.reason


def test_vulkan_without_any_driver(tmp_path):
    def runner(argv, timeout, env=None):
        return CommandResult(tuple(argv), 1, "", "ERROR_INCOMPATIBLE_DRIVER")

    info = vulkan.probe_vulkan(tree(tmp_path, {}, runner=runner))
    assert info.status == ProbeStatus.absent and "no Vulkan driver (ICD)" in info.reason
    info = vulkan.probe_vulkan(tree(tmp_path, {"/usr/share/vulkan/icd.d/radeon_icd.x86_64.json": "{}"}, runner=runner))
    assert info.status == ProbeStatus.error and info.icd_files == ["/usr/share/vulkan/icd.d/radeon_icd.x86_64.json"]


# ------------------------------------------------------------------ cpu
@pytest.mark.parametrize("name, vendor, model, must, must_not", [
    ("grace-neoverse-v2-proc-cpuinfo-first-cpu.txt", "ARM", "Neoverse-V2", {"sve", "sve2", "i8mm", "bf16"}, set()),
    ("graviton2-neoverse-n1-proc-cpuinfo-first-cpu.txt", "ARM", "Neoverse-N1", {"neon", "dotprod"},
     {"i8mm", "sve", "bf16"}),
    ("ampereone-a-proc-cpuinfo-first-cpu.txt", "Ampere", "Ampere-1a", {"i8mm", "bf16", "dotprod"}, {"sve"}),
    ("asahi-m1-proc-cpuinfo-first-cpu.txt", "Apple", "Icestorm-M1", {"neon", "dotprod", "fp16"}, {"i8mm", "sve"}),
])
def test_arm_cpuinfo_captures(tmp_path, name, vendor, model, must, must_not):
    info = cpu.probe_cpu(tree(tmp_path, {"/proc/cpuinfo": captured(name), "/proc/sys/kernel/arch": "aarch64\n"}))
    assert (info.vendor, info.model_name, info.architecture) == (vendor, model, "aarch64")
    assert must <= set(info.features) and not (must_not & set(info.features))
    assert info.threads == 1 and info.sockets is None  # no sysfs topology: unknown, not guessed


def test_cpu_topology_and_caches_from_sysfs(tmp_path):
    files = {"/proc/cpuinfo": captured("asahi-m2-proc-cpuinfo-first-cpu.txt"),
             "/sys/devices/system/cpu/online": "0-1\n",
             "/sys/devices/system/cpu/cpu0/cache/index0/level": "1", "/sys/devices/system/cpu/cpu0/cache/index0/type": "Data",
             "/sys/devices/system/cpu/cpu0/cache/index0/size": "64K",
             "/sys/devices/system/cpu/cpu0/cache/index2/level": "2", "/sys/devices/system/cpu/cpu0/cache/index2/type": "Unified",
             "/sys/devices/system/cpu/cpu0/cache/index2/size": "4096K",
             "/sys/devices/system/node/node0/cpulist": "0-1", "/sys/devices/system/node/possible": "0"}
    for n in (0, 1):
        files[f"/sys/devices/system/cpu/cpu{n}/topology/physical_package_id"] = "0"
        files[f"/sys/devices/system/cpu/cpu{n}/topology/core_id"] = str(n)
    info = cpu.probe_cpu(tree(tmp_path, files))
    assert (info.sockets, info.cores, info.threads, info.numa_nodes) == (1, 2, 2, 1)
    assert (info.caches.l1d_bytes, info.caches.l2_bytes, info.caches.l3_bytes) == (65536, 4 * 2**20, None)


def test_unreadable_cpuinfo_is_an_error_section(tmp_path):
    (tmp_path / "proc" / "cpuinfo").mkdir(parents=True)  # a directory where the file should be
    info = cpu.probe_cpu(tree(tmp_path, {}))
    assert info.status == ProbeStatus.error and "/proc/cpuinfo" in info.reason


# ------------------------------------------------------------------ asahi
def _asahi(system: System, vk: VulkanInfo | None = None):
    return asahi.probe_asahi(system, host.probe_host(system), cpu.probe_cpu(system), memory.probe_memory(system),
                             vk or VulkanInfo(status=ProbeStatus.absent))


def test_asahi_from_cpuinfo_alone_when_the_device_tree_is_masked(tmp_path):
    # Inside a container: no /proc/device-tree, but the Apple implementer remains.
    system = tree(tmp_path, {"/proc/cpuinfo": captured("asahi-m1-proc-cpuinfo-first-cpu.txt"),
                             "/proc/sys/kernel/arch": "aarch64\n", "/proc/meminfo": "MemTotal: 8000000 kB\n"})
    info = _asahi(system)
    assert info.status == ProbeStatus.ok and info.chip == "M1" and info.soc is None
    assert info.evidence == ["cpuinfo: CPU implementer 0x61 (Apple), parts 0x022"]
    assert "no Honeykrisp" in info.reason and info.unified_memory_bytes == 8000000 * 1024


def test_asahi_device_tree_names_the_soc(tmp_path):
    # The capture is terminal output, NULs invisible: "apple,j293apple,t8103apple,arm-platform".
    compatible = captured("asahi-m1-mbp13-devicetree-compatible-model.txt").splitlines()[3]
    raw = "apple,j293\0apple,t8103\0apple,arm-platform\0"
    assert compatible.strip() == raw.replace("\0", "")
    system = tree(tmp_path, {"/proc/device-tree/compatible": raw, "/proc/device-tree/model":
                             "Apple MacBook Pro (13-inch, M1, 2020)\0", "/proc/sys/kernel/arch": "aarch64\n"})
    info = _asahi(system)
    assert (info.soc, info.chip, info.board, info.model) == ("t8103", "M1", "j293", "Apple MacBook Pro (13-inch, M1, 2020)")


@pytest.mark.parametrize("name", ["graviton2-neoverse-n1-proc-cpuinfo-first-cpu.txt",
                                  "graviton3-neoverse-v1-proc-cpuinfo-first-cpu.txt",
                                  "grace-neoverse-v2-proc-cpuinfo-first-cpu.txt",
                                  "ampereone-a-proc-cpuinfo-first-cpu.txt"])
def test_arm_servers_are_not_asahi(tmp_path, name):
    system = tree(tmp_path, {"/proc/cpuinfo": captured(name), "/proc/sys/kernel/arch": "aarch64\n",
                             "/proc/sys/kernel/osrelease": "6.1.0-arm64+16k\n"})  # even with a 16k kernel
    info = _asahi(system)
    assert info.status == ProbeStatus.absent and "not 0x61 (Apple)" in info.reason


def test_honeykrisp_alone_is_enough(tmp_path):
    vk = VulkanInfo(devices=[VulkanDevice(index=0, name="Apple M2 (G14G B0)", device_type="integrated",
                                          driver_id="DRIVER_ID_MESA_HONEYKRISP")])
    system = tree(tmp_path, {"/proc/sys/kernel/arch": "aarch64\n"})
    info = _asahi(system, vk)
    assert info.status == ProbeStatus.ok and info.vulkan_driver == "honeykrisp"


# ------------------------------------------------------------------ amd
@pytest.mark.parametrize("version, name", [(90010, "gfx90a"), (110000, "gfx1100"), (90402, "gfx942"),
                                           (110501, "gfx1151"), (90008, "gfx908"), (100300, "gfx1030"), (0, None)])
def test_gfx_target_names(version, name):
    assert amd.gfx_target_name(version) == name


def test_kfd_node_without_gfx_target_version(tmp_path):
    # A 2018-era KFD: no gfx_target_version line; the GPU is still listed, its target unknown.
    files = {"/sys/class/kfd/kfd/topology/nodes/1/properties": captured("amd-vega10-legacy-kfd-node-properties.txt"),
             "/sys/class/drm/card0/device/vendor": "0x1002\n", "/sys/class/drm/card0/device/device": "0x6860\n",
             "/sys/class/drm/card0/device/uevent": "DRIVER=amdgpu\nPCI_SLOT_NAME=0000:19:00.0\n"}
    info = amd.probe_amd(tree(tmp_path, files))
    (gpu,) = info.gpus
    assert gpu.kfd_node == 1 and gpu.gfx_target is None and gpu.name == "AMD Radeon Instinct MI25 (Vega 10)"


def test_amd_card_without_kfd_says_rocm_cannot_use_it(tmp_path):
    files = {"/sys/class/drm/card0/device/vendor": "0x1002\n", "/sys/class/drm/card0/device/device": "0x744c\n",
             "/sys/class/drm/card0/device/uevent": "DRIVER=amdgpu\nPCI_SLOT_NAME=0000:03:00.0\n"}
    info = amd.probe_amd(tree(tmp_path, files))
    assert info.status == ProbeStatus.ok and "ROCm cannot use it" in info.reason


# ------------------------------------------------------------------ memory / cgroups
def test_cgroup_v1_limits_take_the_smallest_ancestor(tmp_path):
    files = {
        "/proc/self/cgroup": "4:memory:/kubepods/pod1/ctr\n2:cpu,cpuacct:/kubepods/pod1/ctr\n0::/\n",
        "/proc/meminfo": "MemTotal: 16777216 kB\nMemAvailable: 8388608 kB\n",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",
        "/sys/fs/cgroup/memory/kubepods/pod1/memory.limit_in_bytes": f"{2 * 2**30}\n",
        "/sys/fs/cgroup/memory/kubepods/pod1/ctr/memory.limit_in_bytes": f"{3 * 2**30}\n",
        "/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/ctr/cpu.cfs_quota_us": "50000\n",
        "/sys/fs/cgroup/cpu,cpuacct/kubepods/pod1/ctr/cpu.cfs_period_us": "100000\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    }
    info = memory.probe_memory(tree(tmp_path, files))
    assert (info.cgroup.version, info.cgroup.memory_limit_bytes, info.cgroup.cpu_quota_cores) == (1, 2 * 2**30, 0.5)
    assert info.effective_limit_bytes == 2 * 2**30 and info.total_bytes == 16 * 2**30


def test_cgroup_v2_path_invisible_in_a_namespace_reads_the_mount_root(tmp_path):
    files = {"/proc/self/cgroup": "0::/system.slice/docker-abc.scope\n",
             "/proc/meminfo": "MemTotal: 16777216 kB\n",
             "/sys/fs/cgroup/cgroup.controllers": "cpu memory\n",
             "/sys/fs/cgroup/memory.max": "1073741824\n", "/sys/fs/cgroup/cpu.max": "max 100000\n"}
    info = memory.probe_memory(tree(tmp_path, files))
    assert (info.cgroup.version, info.cgroup.memory_limit_bytes, info.cgroup.cpu_quota_cores) == (2, 2**30, None)


# ------------------------------------------------------------------ host
def test_machine_id_is_hashed_with_our_key_never_raw(tmp_path):
    raw = "3d1219c7c4c5404aaa1f6d2a48adfda4"
    info = host.probe_host(tree(tmp_path, {"/etc/machine-id": raw + "\n"}))
    assert info.machine_id_hash == hashlib.sha256(host.MACHINE_ID_KEY + raw.encode()).hexdigest()
    assert info.machine_id_hash != hashlib.sha256(raw.encode()).hexdigest() and raw not in info.model_dump_json()
    assert host.machine_id_hash("uninitialized") is None


@pytest.mark.parametrize("files, env, expected", [
    ({}, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, "kubernetes"),
    ({"/proc/1/cgroup": "0::/kubepods/besteffort/pod1\n"}, {}, "kubernetes"),
    ({"/run/.containerenv": ""}, {}, "podman"),
    ({"/.dockerenv": ""}, {}, "docker"),
    ({"/proc/1/environ": b"PATH=/bin\0container=lxc\0"}, {}, "lxc"),
    ({}, {}, None),
])
def test_container_detection(tmp_path, files, env, expected):
    assert host.detect_container(tree(tmp_path, files, env=env)) == expected


def test_virtualization_from_dmi_then_flag(tmp_path):
    assert host.detect_virtualization(tree(tmp_path, {"/sys/class/dmi/id/sys_vendor": "QEMU\n"})) == "qemu"
    assert host.detect_virtualization(tree(tmp_path / "b", {"/proc/cpuinfo": "flags\t\t: fpu hypervisor\n"})) == "vm"
    assert host.detect_virtualization(tree(tmp_path / "c", {})) is None


# ------------------------------------------------------------------ runtime
def test_cdi_yaml_name_before_or_after_other_keys_and_json(tmp_path):
    yaml_a = ("cdiVersion: 0.5.0\nkind: nvidia.com/gpu\ndevices:\n- name: '0'\n  containerEdits:\n    deviceNodes:\n"
              "    - path: /dev/nvidia0\n- containerEdits:\n    env:\n    - name: NOT_A_DEVICE\n  name: all\n"
              "containerEdits:\n  env:\n  - name: ALSO_NOT\n")
    json_b = '{"cdiVersion": "0.6.0", "kind": "vendor.com/device", "devices": [{"name": "x", "containerEdits": {}}]}'
    system = tree(tmp_path, {"/etc/cdi/nvidia.yaml": yaml_a, "/var/run/cdi/other.json": json_b,
                             "/etc/cdi/README": "ignored"})
    info = runtime.probe_cdi(system)
    assert info.devices == ["nvidia.com/gpu=0", "nvidia.com/gpu=all", "vendor.com/device=x"]
    assert info.spec_files == ["/etc/cdi/nvidia.yaml", "/var/run/cdi/other.json"]


def test_cdi_broken_spec_is_reported(tmp_path):
    info = runtime.probe_cdi(tree(tmp_path, {"/etc/cdi/broken.json": "{"}))
    assert info.status == ProbeStatus.error and "broken.json: not a CDI spec" in info.reason


@pytest.mark.parametrize("text, version, quadlet", [("podman version 4.3.1\n", "4.3.1", False),
                                                    ("podman version 4.4.0\n", "4.4.0", True),
                                                    ("podman version 5.2.2\n", "5.2.2", True)])
def test_podman_quadlet_gate(tmp_path, text, version, quadlet):
    system = tree(tmp_path, {}, runner=lambda argv, t, env=None: CommandResult(tuple(argv), 0, text), euid=1000)
    info = runtime.probe_podman(system)
    assert (info.version, info.quadlet, info.rootless) == (version, quadlet, True)


def test_llama_cpp_backends_from_library_names_without_import(tmp_path):
    site = "/opt/py/site-packages"
    files = {f"{site}/llama_cpp/__init__.py": "raise RuntimeError('must not be imported')\n",
             f"{site}/llama_cpp_python-0.3.36.dist-info/METADATA": "Name: llama_cpp_python\n"}
    for lib in ("libggml-base.so", "libggml-cpu-alderlake.so", "libggml-cpu-haswell.so", "libggml-hip.so",
                "libggml-vulkan.so", "libllama.so"):
        files[f"{site}/llama_cpp/lib/{lib}"] = b""
    info = runtime.probe_llama_cpp(tree(tmp_path, files, python_path=[site]))
    assert (info.version, info.backends, info.path) == ("0.3.36", ["cpu", "rocm", "vulkan"], f"{site}/llama_cpp")


# ------------------------------------------------------------------ storage
def test_mount_lookup_longest_prefix_and_later_mount_wins():
    mounts = storage.parse_mountinfo(
        "27 1 254:0 / / rw - ext4 /dev/vda rw\n25 24 0:23 / /dev/shm rw - tmpfs tmpfs rw\n"
        "30 25 0:27 / /dev/shm rw - tmpfs shm2 rw\n40 27 0:50 / /srv/my\\040data rw - xfs /dev/sdb1 rw\n")
    assert storage.mount_for(mounts, "/dev/shm/x").source == "shm2"
    assert storage.mount_for(mounts, "/srv/my data/models").fs_type == "xfs"
    assert storage.mount_for(mounts, "/srv/my").mount_point == "/"


# ------------------------------------------------------------------ recommend
def test_cpu_platform_adds_vulkan_for_an_intel_igpu():
    igpu = VulkanDevice(index=0, name="Intel(R) Graphics (RPL-S)", device_type="integrated", vendor_id="0x8086",
                        ggml_usable=True, memory_heaps=[])
    llama = PythonBackendInfo(status=ProbeStatus.ok, backends=["cpu"])
    derived = recommend.derive(CpuInfo(features=["avx2"]), MemoryInfo(total_bytes=2**34, effective_limit_bytes=2**34),
                               NvidiaInfo(status=ProbeStatus.absent), AmdInfo(status=ProbeStatus.absent),
                               VulkanInfo(devices=[igpu]), AsahiInfo(status=ProbeStatus.absent),
                               RuntimeInfo(llama_cpp_python=llama))
    assert derived.platform == "cpu"
    assert [r.backend for r in derived.recommended_backends] == ["llama.cpp-cpu", "llama.cpp-vulkan"]
    vk = derived.recommended_backends[1]
    assert vk.device == "vulkan:0" and not vk.ready and "GGML_VULKAN" in vk.missing
    assert {d.id: d.memory_kind for d in derived.devices} == {"cpu": "shared_system", "vulkan:0": "shared_system"}

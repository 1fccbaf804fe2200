"""The probe on captured machines (tests/fixtures/machines/*): the whole profile, and what it must mean.

Each machine is replayed through the production code path (`load_capture` gives
a `System` whose files, commands and pynvml are the captured machine's). The
whole wire profile is compared with the reviewed ``expected.json`` (only
``probedAt`` is injected); the per-machine tests then assert the facts that
make each profile right, so a regenerated expected file cannot hide a wrong one.

Regenerate after an intended change (and review the diff):
    UPDATE_EXPECTED=1 python -m pytest -q tests/test_probe_fixtures.py
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import jsonschema
import pytest

from nodeagent.cli import main
from nodeagent.probe import probe, profile_digest
from nodeagent.probe.replay import load_capture

from expected_files import updating

MACHINES = Path(__file__).parent / "fixtures" / "machines"
SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "contracts" / "MachineProfile.schema.json").read_text())
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
NAMES = sorted(p.name for p in MACHINES.iterdir() if (p / "capture.json").exists())


def profile_of(name: str):
    return probe(system=load_capture(MACHINES / name), now=NOW)


@pytest.fixture(scope="module")
def profiles():
    return {name: profile_of(name) for name in NAMES}


def test_every_required_machine_is_captured():
    assert set(NAMES) >= {"h100x8", "amd-mi210-rx7900xtx", "asahi-m2pro", "graviton3-c7g",
                          "podman-container-cgroup", "debian-vm"}


@pytest.mark.parametrize("name", NAMES)
def test_whole_profile_matches_expected(name, profiles):
    wire = profiles[name].to_wire()
    expected_file = MACHINES / name / "expected.json"
    if updating("UPDATE_EXPECTED"):
        expected_file.write_text(json.dumps(wire, indent=2, sort_keys=True) + "\n")
    expected = json.loads(expected_file.read_text())
    assert wire == expected


@pytest.mark.parametrize("name", NAMES)
def test_profile_validates_against_committed_schema(name, profiles):
    jsonschema.validate(profiles[name].to_wire(), SCHEMA)


@pytest.mark.parametrize("name", NAMES)
def test_probe_is_deterministic_and_digest_is_stable(name, profiles):
    again = profile_of(name)
    assert profile_digest(again) == profile_digest(profiles[name])
    assert len(profile_digest(again)) == 64


def _by_id(profile):
    return {d.id: d for d in profile.devices}


def _backends(profile):
    return [r.backend for r in profile.recommended_backends]


def test_h100_host(profiles):
    p = profiles["h100x8"]
    assert p.platform == "nvidia"
    nv = p.nvidia
    assert nv.status.value == "ok" and nv.driver_version == "545.23.08" and nv.cuda_driver_version == "12.3"
    assert len(nv.gpus) == 8
    gpu0 = nv.gpus[0]
    assert gpu0.uuid == "GPU-10f35015-e921-bfab-2eb8-4e9b6664d5f1"
    assert gpu0.pci_bus_id == "00000000:19:00.0"
    assert gpu0.memory_total_bytes == 81559 * 2**20 and gpu0.memory_free_bytes == 81227 * 2**20
    assert (gpu0.compute_capability, gpu0.power_limit_watts, gpu0.ecc_enabled) == ("9.0", 700.0, True)
    assert [g.mig_mode for g in nv.gpus] == ["disabled"] * 7 + ["enabled"]
    assert [m.name for m in nv.gpus[7].mig_devices] == ["NVIDIA H100 80GB HBM3 MIG 3g.40gb"] * 2
    # A MIG GPU is budgeted as its instances, never as the whole card.
    ids = _by_id(p)
    assert f"nvidia:{nv.gpus[7].uuid}" not in ids
    assert all(f"nvidia:{m.uuid}" in ids for m in nv.gpus[7].mig_devices)
    assert sum(d.kind == "nvidia" for d in p.devices) == 9
    assert all(d.memory_kind == "dedicated" for d in p.devices if d.kind == "nvidia")
    assert _backends(p) == ["vllm", "llama.cpp-cuda", "llama.cpp-cpu"]
    assert all(r.ready for r in p.recommended_backends)
    assert "nvidia.com/gpu=all" in p.runtime.cdi.devices and "nvidia.com/gpu=7:1" in p.runtime.cdi.devices
    assert p.runtime.podman.quadlet is True and p.runtime.podman.rootless is False
    assert {"avx512f", "avx512_bf16", "avx512_fp16", "amx_int8", "amx_bf16", "amx_tile", "avx_vnni"} <= set(p.cpu.features)
    assert (p.cpu.sockets, p.cpu.cores, p.cpu.threads, p.cpu.numa_nodes) == (2, 64, 128, 2)
    assert p.vulkan.status.value == "absent" and "vulkan-tools" in p.vulkan.reason
    assert p.asahi.status.value == "absent"


def test_amd_host(profiles):
    p = profiles["amd-mi210-rx7900xtx"]
    assert p.platform == "amd"
    cards = {g.card: g for g in p.amd.gpus}
    assert (cards["card0"].gfx_target, cards["card0"].pci_bus_id, cards["card0"].kfd_node) == ("gfx90a", "0000:63:00.0", 1)
    assert (cards["card1"].gfx_target, cards["card1"].pci_bus_id, cards["card1"].kfd_node) == ("gfx1100", "0000:86:00.0", 2)
    assert cards["card0"].vram_total_bytes == 65520 * 2**20 and cards["card1"].vram_total_bytes == 25753026560
    vk = {d.index: d for d in p.vulkan.devices}
    assert vk[0].driver_id == "DRIVER_ID_MESA_RADV" and vk[0].ggml_usable is True
    assert (vk[0].fp16, vk[0].int_dot, vk[0].coopmat, vk[0].storage16bit) == (True, True, True, True)
    assert vk[1].device_type == "cpu" and vk[1].ggml_usable is False
    assert _backends(p) == ["llama.cpp-vulkan", "llama.cpp-rocm", "vllm-rocm", "llama.cpp-cpu"]
    recs = {r.backend: r for r in p.recommended_backends}
    # Only the RDNA card has a Vulkan driver; the compute-only MI210 is reached through ROCm.
    assert recs["llama.cpp-vulkan"].devices == ["amd:card1"] and recs["llama.cpp-vulkan"].ready
    assert recs["llama.cpp-rocm"].devices == ["amd:card0", "amd:card1"] and not recs["llama.cpp-rocm"].ready
    assert "GGML_HIP" in recs["llama.cpp-rocm"].missing
    assert not recs["vllm-rocm"].ready
    assert p.nvidia.status.value == "absent" and p.nvidia.reason == "no NVIDIA GPU on the PCI bus"
    assert p.runtime.podman.rootless is True and p.runtime.lingering is True and p.runtime.user == "alice"


def test_asahi_m2_pro(profiles):
    p = profiles["asahi-m2pro"]
    a = p.asahi
    assert p.platform == "asahi" and a.status.value == "ok"
    assert (a.soc, a.chip, a.family, a.tier, a.board) == ("t6020", "M2 Pro", "M2", "Pro", "j414s")
    assert a.vulkan_driver == "honeykrisp" and a.gpu_driver == "asahi" and a.page_size_16k is True
    assert p.host.page_size == 16384
    assert a.unified_memory_bytes == p.memory.total_bytes
    gpu = _by_id(p)["apple:gpu"]
    # Unified memory: the GPU's budget is system RAM, never VRAM.
    assert gpu.memory_kind == "unified" and gpu.memory_total_bytes == p.memory.total_bytes
    assert not any(d.memory_kind == "dedicated" for d in p.devices)
    assert p.cpu.implementer == "0x61" and p.cpu.parts == ["0x034", "0x035"]
    assert {"neon", "dotprod", "i8mm", "bf16", "fp16"} <= set(p.cpu.features)
    hk = next(d for d in p.vulkan.devices if d.driver_id == "DRIVER_ID_MESA_HONEYKRISP")
    assert (hk.device_type, hk.vendor_id, hk.fp16, hk.int_dot, hk.coopmat, hk.ggml_usable) == \
        ("integrated", "0x10005", True, False, False, True)
    assert _backends(p) == ["llama.cpp-cpu", "llama.cpp-vulkan"]
    assert not any("metal" in b or "mlx" in b for b in _backends(p))
    assert p.runtime.lingering is False


def test_arm64_server_is_not_asahi(profiles):
    p = profiles["graviton3-c7g"]
    assert p.platform == "cpu"
    assert p.asahi.status.value == "absent" and "0x41" in p.asahi.reason and p.asahi.evidence == []
    assert p.cpu.vendor == "ARM" and p.cpu.model_name == "Neoverse-V1"
    assert {"neon", "sve", "i8mm", "bf16", "dotprod"} <= set(p.cpu.features)
    assert (p.cpu.sockets, p.cpu.cores, p.cpu.threads) == (1, 64, 64)
    assert p.host.virtualization == "amazon"
    assert _backends(p) == ["llama.cpp-cpu"]
    assert p.runtime.podman.status.value == "absent"


def test_cgroup_limited_container(profiles):
    p = profiles["podman-container-cgroup"]
    assert p.host.container == "podman"
    cg = p.memory.cgroup
    assert (cg.version, cg.memory_limit_bytes, cg.cpu_quota_cores) == (2, 4 * 2**30, 1.5)
    assert p.memory.total_bytes > 4 * 2**30 and p.memory.effective_limit_bytes == 4 * 2**30
    cpu = _by_id(p)["cpu"]
    assert cpu.memory_total_bytes == 4 * 2**30 and cpu.memory_free_bytes <= 4 * 2**30
    assert p.storage.ram_tier_path == "/dev/shm"
    ram = next(loc for loc in p.storage.locations if loc.role == "ram_tier")
    assert ram.total_bytes == 64 * 2**20 and ram.fs_type == "tmpfs"
    assert {loc.fs_type for loc in p.storage.locations if loc.role != "ram_tier"} == {"overlay"}


def test_bare_vm(profiles):
    p = profiles["debian-vm"]
    assert p.platform == "cpu" and p.host.container is None and p.host.virtualization == "vm"
    assert p.memory.cgroup.version == 1 and p.memory.cgroup.memory_limit_bytes is None
    llvmpipe = p.vulkan.devices[0]
    assert (llvmpipe.device_type, llvmpipe.driver_id, llvmpipe.ggml_usable) == ("cpu", "DRIVER_ID_MESA_LLVMPIPE", False)
    assert p.runtime.podman.version == "4.3.1" and p.runtime.podman.quadlet is False
    assert p.runtime.systemd_user is False and p.runtime.systemd_user_state == "offline"
    state = next(loc for loc in p.storage.locations if loc.role == "state")
    assert (state.fs_type, state.device, state.rotational) == ("ext4", "/dev/vda", True)
    assert _backends(p) == ["llama.cpp-cpu"]


@pytest.mark.parametrize("name", NAMES)
def test_cli_json_for_a_capture_is_the_same_profile(name, capsys):
    assert main(["probe", "--root", str(MACHINES / name), "--format", "json"]) == 0
    wire = json.loads(capsys.readouterr().out)
    expected = json.loads((MACHINES / name / "expected.json").read_text())
    wire.pop("probedAt"), expected.pop("probedAt")
    assert wire == expected


def test_cli_table_reads_at_a_glance(capsys):
    assert main(["probe", "--root", str(MACHINES / "asahi-m2pro")]) == 0
    out = capsys.readouterr().out
    for needle in ("platform: asahi", "Apple M2 Pro (t6020)", "Vulkan devices", "Honeykrisp",
                   "Recommended backends", "llama.cpp-cpu", "llama.cpp-vulkan", "unified", "evidence:"):
        assert needle in out, needle
    assert main(["probe", "--root", str(MACHINES / "h100x8")]) == 0
    out = capsys.readouterr().out
    assert "MIG enabled (2 instances)" in out and "00000000:19:00.0" in out and "vllm" in out


def test_cli_root_without_capture_reads_files_and_runs_nothing(tmp_path, capsys):
    tree = tmp_path / "tree"
    (tree / "proc").mkdir(parents=True)
    src = MACHINES / "graviton3-c7g" / "root"
    (tree / "proc" / "cpuinfo").write_text((src / "proc" / "cpuinfo").read_text())
    assert main(["probe", "--root", str(tree), "--format", "json"]) == 0
    wire = json.loads(capsys.readouterr().out)
    assert wire["cpu"]["vendor"] == "ARM" and wire["cpu"]["threads"] == 64
    assert "not run" in wire["runtime"]["podman"]["reason"]
    assert wire["nvidia"]["status"] == "absent"


def test_cli_root_errors_are_clear(tmp_path, capsys):
    assert main(["probe", "--root", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    bad = tmp_path / "bad"
    (bad / "root").mkdir(parents=True)
    (bad / "capture.json").write_text("{not json")
    assert main(["probe", "--root", str(bad)]) == 2
    assert "invalid JSON" in capsys.readouterr().err

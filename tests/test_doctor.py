"""`doctor`: each check on captured machines' profiles, and the command on this machine."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from nodeagent.cli import main
from nodeagent.doctor import Check, check_state_dir, run_checks
from nodeagent.paths import resolve_paths
from nodeagent.probe import probe
from nodeagent.probe.replay import load_capture

MACHINES = Path(__file__).parent / "fixtures" / "machines"
NOW = datetime(2026, 1, 2, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def profiles():
    return {p.name: probe(system=load_capture(p), now=NOW) for p in MACHINES.iterdir() if (p / "capture.json").exists()}


@pytest.fixture
def paths(tmp_path):
    return resolve_paths({"AGENT_MACHINE_STATE_DIR": str(tmp_path / "state"), "HOME": str(tmp_path)})


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_every_check_has_a_status_and_failures_carry_a_fix(profiles, paths):
    for name, profile in profiles.items():
        checks = run_checks(profile, paths)
        assert len(checks) == 11
        for check in checks:
            assert check.status in ("pass", "warn", "fail") and check.message
            if check.status != "pass":
                assert check.fix, (name, check)


def test_h100_host(profiles, paths):
    checks = by_name(run_checks(profiles["h100x8"], paths))
    assert checks["nvidia CDI spec"].status == "pass" and "21 nvidia.com/gpu devices" in checks["nvidia CDI spec"].message
    assert checks["quadlet"].status == "pass"
    # NVIDIA without a Vulkan ICD is only a warning: CUDA backends do not need it.
    assert checks["vulkan ICD for the GPU"].status == "warn"
    assert checks["recommended backend"].status == "pass"


def test_nvidia_without_cdi_spec_fails(profiles, paths):
    profile = profiles["h100x8"]
    runtime = profile.runtime.model_copy(update={"cdi": profile.runtime.cdi.model_copy(
        update={"devices": [], "spec_files": []})})
    check = by_name(run_checks(profile.model_copy(update={"runtime": runtime}), paths))["nvidia CDI spec"]
    assert check.status == "fail" and "nvidia-ctk cdi generate" in check.fix


def test_amd_without_vulkan_gpu_fails_and_with_radv_passes(profiles, paths):
    profile = profiles["amd-mi210-rx7900xtx"]
    assert by_name(run_checks(profile, paths))["vulkan ICD for the GPU"].status == "pass"
    only_cpu = profile.vulkan.model_copy(update={"devices": [d for d in profile.vulkan.devices
                                                             if d.device_type == "cpu"]})
    check = by_name(run_checks(profile.model_copy(update={"vulkan": only_cpu}), paths))["vulkan ICD for the GPU"]
    assert check.status == "fail" and "mesa-vulkan-drivers" in check.fix and "radeon_icd" in check.message


def test_asahi_rootless_without_linger_warns(profiles, paths):
    checks = by_name(run_checks(profiles["asahi-m2pro"], paths))
    assert checks["lingering"].status == "warn" and checks["lingering"].fix == "loginctl enable-linger alice"
    assert checks["vulkan ICD for the GPU"].status == "pass"
    assert checks["systemd user manager"].status == "pass"


def test_amd_rootless_with_linger_passes(profiles, paths):
    assert by_name(run_checks(profiles["amd-mi210-rx7900xtx"], paths))["lingering"].status == "pass"


def test_vm_without_quadlet_and_container_without_podman_warn(profiles, paths):
    vm = by_name(run_checks(profiles["debian-vm"], paths))
    assert vm["quadlet"].status == "warn" and "4.3.1" in vm["quadlet"].message and "4.4" in vm["quadlet"].fix
    container = by_name(run_checks(profiles["podman-container-cgroup"], paths))
    assert container["podman"].status == "warn"


def test_missing_llama_cpp_python_fails(profiles, paths):
    profile = profiles["graviton3-c7g"]
    llama = profile.runtime.llama_cpp_python.model_copy(update={"status": "absent", "reason": "not installed"})
    runtime = profile.runtime.model_copy(update={"llama_cpp_python": llama})
    checks = by_name(run_checks(profile.model_copy(update={"runtime": runtime}), paths))
    assert checks["llama-cpp-python"].status == "fail" and "pip install llama-cpp-python" in checks["llama-cpp-python"].fix


@pytest.mark.parametrize("free_gib, status", [(2, "fail"), (10, "warn"), (200, "pass")])
def test_free_disk_thresholds(profiles, paths, free_gib, status):
    profile = profiles["debian-vm"]
    locations = [loc.model_copy(update={"free_bytes": free_gib * 2**30}) for loc in profile.storage.locations]
    storage = profile.storage.model_copy(update={"locations": locations})
    check = by_name(run_checks(profile.model_copy(update={"storage": storage}), paths))["free disk for models"]
    assert check.status == status


def test_state_dir_checks(tmp_path):
    assert check_state_dir(tmp_path / "new" / "state").status == "pass"
    existing = tmp_path / "existing"
    existing.mkdir()
    assert check_state_dir(existing).status == "pass"
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert check_state_dir(afile).status == "fail"
    under_file = check_state_dir(afile / "state")
    assert under_file.status == "fail" and "AGENT_MACHINE_STATE_DIR" in under_file.fix


def test_doctor_command_on_this_machine(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AGENT_MACHINE_STATE_DIR", str(tmp_path / "state"))
    code = main(["doctor", "--format", "json"])
    checks = json.loads(capsys.readouterr().out)
    assert code == (1 if any(c["status"] == "fail" for c in checks) else 0)
    assert by_name([Check(**c) for c in checks])["state directory writable"].status == "pass"
    assert main(["doctor"]) == code
    out = capsys.readouterr().out
    assert "checks:" in out and "state directory writable" in out


def test_doctor_exits_1_on_a_failing_check(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("AGENT_MACHINE_STATE_DIR", str(blocker / "state"))
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  state directory writable" in out and "fix:" in out


def test_vulkan_icd_without_vulkaninfo_is_a_warning(profiles, paths):
    profile = profiles["amd-mi210-rx7900xtx"]
    unverified = profile.vulkan.model_copy(update={"status": "absent", "devices": [],
                                                   "reason": "vulkaninfo is not installed (package vulkan-tools)"})
    check = by_name(run_checks(profile.model_copy(update={"vulkan": unverified}), paths))["vulkan ICD for the GPU"]
    assert check.status == "warn" and "radeon_icd.x86_64.json" in check.message and "vulkan-tools" in check.fix

"""The probe on the machine running the tests: real files, real vulkaninfo, real console script."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import rfc8785

from nodeagent.contracts.machine import MachineProfile, ProbeStatus
from nodeagent.probe import probe, profile_digest

SCHEMA = json.loads((Path(__file__).parent.parent / "docs" / "contracts" / "MachineProfile.schema.json").read_text())


@pytest.fixture(scope="module")
def profile():
    return probe()


def test_real_profile_validates_and_every_section_reports(profile):
    jsonschema.validate(profile.to_wire(), SCHEMA)
    for name in ("host", "cpu", "memory", "nvidia", "amd", "vulkan", "asahi", "runtime", "storage"):
        section = getattr(profile, name)
        assert section.status in (ProbeStatus.ok, ProbeStatus.absent), (name, section.reason)
        assert section.status == ProbeStatus.ok or section.reason, name
    assert profile.cpu.threads == os.cpu_count()
    assert profile.devices[0].id == "cpu" and profile.recommended_backends


def test_llvmpipe_is_found_as_a_cpu_vulkan_device(profile):
    if shutil.which("vulkaninfo") is None:
        pytest.skip("vulkaninfo is not installed here (Debian: vulkan-tools + mesa-vulkan-drivers; CI installs them)")
    llvmpipe = [d for d in profile.vulkan.devices if d.driver_id == "DRIVER_ID_MESA_LLVMPIPE"]
    assert llvmpipe, profile.vulkan.model_dump()
    device = llvmpipe[0]
    assert device.device_type == "cpu" and device.name.startswith("llvmpipe")
    assert device.ggml_usable is False and "GGML_VK_VISIBLE_DEVICES" in device.ggml_reason
    assert device.storage16bit is True and device.memory_heaps  # the full text output was parsed


def test_ggml_visible_devices_env_is_honoured_on_the_real_device(monkeypatch):
    if shutil.which("vulkaninfo") is None:
        pytest.skip("vulkaninfo is not installed here")
    monkeypatch.setenv("GGML_VK_VISIBLE_DEVICES", "0")
    device = probe().vulkan.devices[0]
    assert device.ggml_usable is True


def test_profile_digest_is_sha256_of_rfc8785_wire(profile):
    digest = profile_digest(profile)
    assert digest == hashlib.sha256(rfc8785.dumps(profile.to_wire())).hexdigest()
    changed = profile.model_copy(update={"agent_version": profile.agent_version + "+x"})
    assert profile_digest(changed) != digest
    # The digest survives a JSON round trip (what a receipt verifier will do).
    again = MachineProfile.model_validate(json.loads(json.dumps(profile.to_wire())))
    assert profile_digest(again) == digest


def test_console_script_json_and_table():
    done = subprocess.run([sys.executable, "-m", "nodeagent.cli", "probe", "--format", "json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    wire = json.loads(done.stdout)
    jsonschema.validate(wire, SCHEMA)
    assert wire["kind"] == "MachineProfile" and wire["root"] == "/"
    table = subprocess.run([sys.executable, "-m", "nodeagent.cli", "probe"], capture_output=True, text=True,
                           timeout=60)
    assert table.returncode == 0
    for heading in ("SECTION", "Compute devices", "Recommended backends"):
        assert heading in table.stdout


def test_probe_help_teaches():
    out = subprocess.run([sys.executable, "-m", "nodeagent.cli", "probe", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--root DIR" in out and "examples:" in out and "capture.json" in out

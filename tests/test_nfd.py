"""`probe --nfd`: a Node Feature Discovery feature file that follows NFD's rules, on every captured machine."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from nodeagent.probe import probe
from nodeagent.probe import nfd

MACHINES = Path(__file__).parent / "fixtures" / "machines"
FIXTURES = sorted(p.name for p in MACHINES.iterdir() if p.is_dir())


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nodeagent.cli", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("machine", FIXTURES)
def test_every_captured_machine_gives_a_file_nfd_accepts(machine):
    text = nfd.feature_file(probe(MACHINES / machine), hot_models=["smollm2:latest"])
    assert nfd.check(text) == []
    lines = text.splitlines()
    assert lines[1].startswith("# +expiry-time=")  # before every label it applies to
    assert all(line.startswith("agent-machine.io/") for line in lines[2:])
    assert "agent-machine.io/model.smollm2-latest=hot" in lines


@pytest.mark.parametrize("machine,expected", [
    ("h100x8", ["platform=nvidia", "nvidia.count=8", "nvidia.product=NVIDIA-H100-80GB-HBM3", "nvidia.compute=9.0",
                "nvidia.mig-devices=2", "backend.vllm=true"]),
    ("asahi-m2pro", ["platform=asahi", "asahi=true", "asahi.soc=t6020", "asahi.chip=M2-Pro", "asahi.page-16k=true",
                     "vulkan.driver.honeykrisp=true", "backend.llama.cpp-vulkan=true"]),
    ("amd-mi210-rx7900xtx", ["platform=amd", "amd.count=2", "amd.gfx90a=true", "amd.gfx1100=true",
                             "vulkan.driver.radv=true", "vulkan.coopmat=true"]),
])
def test_the_file_names_accelerators_memory_asahi_and_ready_backends(machine, expected):
    lines = set(nfd.feature_file(probe(MACHINES / machine)).splitlines())
    for label in expected:
        assert f"agent-machine.io/{label}" in lines


def test_the_expiry_is_rfc3339_utc_the_given_seconds_ahead():
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    text = nfd.feature_file(probe(MACHINES / "debian-vm"), expiry_s=90, now=now)
    assert "# +expiry-time=2026-01-02T03:05:35Z" in text.splitlines()


@pytest.mark.parametrize("text,named", [
    ("agent-machine.io/x=" + "a" * 64 + "\n", "label value"),
    ("agent-machine.io/x=has space\n", "label value"),
    ("agent-machine.io/-x=1\n", "label name"),
    ("Agent_Machine.io/x=1\n", "label prefix"),
    ("# +expiry-time=tomorrow\nagent-machine.io/x=1\n", "expiry-time"),
    ("# +expiry-time=2026-01-02T03:04:05\nagent-machine.io/x=1\n", "zone"),
    ("# +expires=2026-01-02T03:04:05Z\n", "unknown directive"),
    ("a/x=1\na/x=2\n", "given twice"),
    ("a/x=1\n" * 1 + "".join(f"a/y{i}=1\n" for i in range(12000)), "at most 65536"),
])
def test_the_checker_names_each_rule_broken(text, named):
    assert any(named in problem for problem in nfd.check(text)), nfd.check(text)[:3]


def test_label_values_are_made_legal():
    assert nfd.label_value("NVIDIA H100 80GB HBM3") == "NVIDIA-H100-80GB-HBM3"
    assert nfd.label_value("  (weird) ") == "weird"
    assert len(nfd.label_value("x" * 200)) == 63


def test_cli_prints_the_file_and_writes_it_atomically(tmp_path):
    shown = cli("probe", "--nfd", "--root", str(MACHINES / "asahi-m2pro"))
    assert shown.returncode == 0 and nfd.check(shown.stdout) == []
    assert "agent-machine.io/asahi.soc=t6020" in shown.stdout
    out = tmp_path / "features.d"
    written = cli("probe", "--nfd", "--root", str(MACHINES / "h100x8"), "--out", str(out), "--expiry", "120")
    assert written.returncode == 0, written.stderr
    target = out / "agent-machine"
    assert written.stdout.strip() == str(target)
    assert sorted(os.listdir(out)) == ["agent-machine"]  # the dot-file was renamed, nothing left over
    assert stat.S_IMODE(target.stat().st_mode) & 0o044 == 0o044  # the NFD worker may read it
    assert "agent-machine.io/nvidia.count=8" in target.read_text()


def test_cli_refuses_out_without_nfd_and_a_bad_expiry(tmp_path):
    bad = cli("probe", "--out", str(tmp_path))
    assert bad.returncode == 2 and "--out needs --nfd" in bad.stderr
    bad = cli("probe", "--nfd", "--expiry", "0", "--root", str(MACHINES / "debian-vm"))
    assert bad.returncode == 2 and "--expiry must be positive" in bad.stderr


def test_the_keeper_rewrites_on_change_and_before_half_the_expiry(tmp_path):
    from nodeagent.config import load_config
    from nodeagent.node import Node

    env = {"HOME": str(tmp_path), "AGENT_MACHINE_STATE_DIR": str(tmp_path / "state"),
           "AGENT_MACHINE_CONFIG_DIR": str(tmp_path / "cfg"), "AGENT_MACHINE_RUNTIME_DIR": str(tmp_path / "run")}
    node = Node(load_config(env), probe_fn=lambda *a, **k: probe(MACHINES / "asahi-m2pro"))
    try:
        keeper = nfd.FeatureFileKeeper(tmp_path / "features.d", expiry_s=100)
        assert keeper.update(node, now=1000.0)
        text = (tmp_path / "features.d" / "agent-machine").read_text()
        assert "# +expiry-time=1970-01-01T00:18:20Z" in text and "asahi.soc=t6020" in text
        assert not keeper.update(node, now=1049.0)  # nothing changed, the file is fresh
        assert keeper.update(node, now=1051.0)  # half its life gone: renewed
    finally:
        node.close()

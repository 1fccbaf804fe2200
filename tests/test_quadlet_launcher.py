"""The quadlet launcher: what it writes and which systemctl/loginctl calls it
makes, in order. This host has no systemd, so the systemd boundary is a
recorder; the refusal where systemd is missing is tested for real in
test_launch_cli.py."""

from __future__ import annotations

import subprocess

import pytest

from nodeagent.launch.podman_versions import PodmanVersion
from nodeagent.launch.quadlet import (
    QuadletLauncher,
    QuadletOptions,
    QuadletUnavailable,
    compare_unit_with_spec,
    quadlet_dir,
)
from nodeagent.launch.registry import Registry
from nodeagent.providers.catalog import load_catalog, resolve_spec


class Systemd:
    """Records commands; answers like a user manager with lingering ``linger``."""

    def __init__(self, manager: bool = True, linger: bool = True, fail: str | None = None) -> None:
        self.manager, self.linger, self.fail = manager, linger, fail
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(argv)
        joined = " ".join(argv)
        if self.fail and self.fail in joined:
            return subprocess.CompletedProcess(argv, 1, "", f"Job for {self.fail} failed.")
        if "show-environment" in argv:
            if not self.manager:
                return subprocess.CompletedProcess(argv, 1, "", "Failed to connect to bus: No medium found")
            return subprocess.CompletedProcess(argv, 0, "HOME=/root\n", "")
        if argv[0] == "loginctl":
            return subprocess.CompletedProcess(argv, 0, f"Linger={'yes' if self.linger else 'no'}\n", "")
        if "is-active" in argv:
            return subprocess.CompletedProcess(argv, 0, "active\n", "")
        return subprocess.CompletedProcess(argv, 0, "", "")


def spec():
    return resolve_spec(load_catalog().get("llama-server"), name="qwen", mode="quadlet", model_path="/srv/q.gguf",
                        port=18080, accelerator="vulkan")


def launcher(tmp_path, systemd, version="5.0", scope="user"):
    return QuadletLauncher(Registry(tmp_path / "reg"), PodmanVersion.parse(version), QuadletOptions(scope=scope),
                           unit_dir=tmp_path / "units", run=systemd)


def test_up_writes_the_unit_reloads_and_starts(tmp_path):
    systemd = Systemd()
    quadlet = launcher(tmp_path, systemd)
    record = quadlet.up(spec(), wait=False)
    unit = tmp_path / "units" / "qwen.container"
    assert record.unit_path == str(unit)
    assert compare_unit_with_spec(unit.read_text(), spec(), "5.0") == []
    assert [c for c in systemd.calls if c[0] == "systemctl"] == [
        ["systemctl", "--user", "show-environment"],
        ["systemctl", "--user", "daemon-reload"],
        ["systemctl", "--user", "start", "qwen.service"],
    ]
    assert quadlet.warnings == []
    assert quadlet.state("qwen") == "active"


def test_down_stops_removes_and_reloads(tmp_path):
    systemd = Systemd()
    quadlet = launcher(tmp_path, systemd)
    quadlet.up(spec(), wait=False)
    systemd.calls.clear()
    assert quadlet.down("qwen") is True
    assert systemd.calls == [["systemctl", "--user", "stop", "qwen.service"], ["systemctl", "--user", "daemon-reload"]]
    assert not (tmp_path / "units" / "qwen.container").exists()
    assert Registry(tmp_path / "reg").load("qwen") is None
    assert quadlet.down("qwen", missing_ok=True) is False


def test_lingering_off_is_a_warning(tmp_path):
    quadlet = launcher(tmp_path, Systemd(linger=False))
    quadlet.up(spec(), wait=False)
    assert any("loginctl enable-linger" in w for w in quadlet.warnings)


def test_system_scope_uses_the_system_manager(tmp_path):
    systemd = Systemd()
    launcher(tmp_path, systemd, scope="system").up(spec(), wait=False)
    assert ["systemctl", "start", "qwen.service"] in systemd.calls
    assert not any(c[0] == "loginctl" for c in systemd.calls)
    assert str(quadlet_dir("system")) == "/etc/containers/systemd"
    assert quadlet_dir("user", {"HOME": "/home/a"}) == quadlet_dir("user", {"HOME": "/home/a", "XDG_CONFIG_HOME": ""})
    assert str(quadlet_dir("user", {"HOME": "/home/a"})) == "/home/a/.config/containers/systemd"


@pytest.mark.parametrize("systemd, version, words", [
    (Systemd(manager=False), "5.0", "no systemd user manager is reachable"),
    (Systemd(), "4.3.1", "Podman 4.3.1 has no Quadlet"),
])
def test_refusals_write_nothing(tmp_path, systemd, version, words):
    with pytest.raises(QuadletUnavailable, match=words):
        launcher(tmp_path, systemd, version=version).up(spec(), wait=False)
    assert not (tmp_path / "units").exists()


def test_a_failing_start_is_reported_with_systemds_words(tmp_path):
    quadlet = launcher(tmp_path, Systemd(fail="qwen.service"))
    with pytest.raises(QuadletUnavailable, match="start qwen.service` failed: Job for qwen.service failed"):
        quadlet.up(spec(), wait=False)

"""`agent-machine providers ...` end to end (subprocess mode with a real
llama-server; quadlet refusal where systemd or Quadlet is missing)."""

from __future__ import annotations

import json
import subprocess

import pytest

from nodeagent.cli import main
from nodeagent.launch.quadlet import parse_quadlet
from nodeagent.providers.llama_server import locate_llama_server


@pytest.fixture(autouse=True)
def private_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENT_MACHINE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("AGENT_MACHINE_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_catalog_json(capsys):
    code, out, _ = run(capsys, "providers", "catalog", "--format", "json")
    assert code == 0
    entries = {e["name"]: e for e in json.loads(out)}
    assert entries["llama-server"]["images"]["nvidia"].startswith("ghcr.io/ggml-org/llama.cpp:server-cuda-")
    assert entries["vllm"]["capabilities"]["prefixCaching"] is True


def test_render_quadlet_for_a_given_podman(capsys, tmp_path):
    code, out, _ = run(capsys, "providers", "render", "llama-server", "--mode", "quadlet", "--model",
                       "/srv/m/q.gguf", "--accelerator", "nvidia", "--podman-version", "5.0", "--format", "json",
                       "--param", "ctx_size=8192", "--name", "qwen")
    assert code == 0
    data = json.loads(out)
    assert data["path"] == str(tmp_path / "xdg" / "containers/systemd/qwen.container")
    parsed = parse_quadlet(data["unit"])
    assert parsed.notify_healthy and ("nvidia.com/gpu=all", False) in parsed.shape.devices
    assert "8192" in parsed.shape.args and data["spec"]["kind"] == "ProviderSpec"
    code, out, _ = run(capsys, "providers", "render", "llama-server", "--mode", "quadlet", "--model",
                       "/srv/m/q.gguf", "--podman-version", "4.4")
    assert code == 0 and "Notify=healthy" not in out and "--health-cmd=" in out


def test_render_errors_are_clear(capsys):
    code, _, err = run(capsys, "providers", "render", "llama-server", "--mode", "quadlet", "--model", "/m.gguf",
                       "--podman-version", "4.3.1")
    assert code == 1 and "Podman 4.3.1 has no Quadlet" in err and "--mode podman" in err
    code, _, err = run(capsys, "providers", "render", "sglang", "--mode", "podman", "--model", "/m.gguf")
    assert code == 2 and "no provider 'sglang' in the catalog" in err
    code, _, err = run(capsys, "providers", "render", "llama-server", "--mode", "podman", "--model", "/m.gguf",
                       "--param", "ctx")
    assert code == 2 and "expected KEY=VALUE" in err


def test_render_podman_and_subprocess(capsys):
    code, out, _ = run(capsys, "providers", "render", "vllm", "--mode", "podman", "--model", "/srv/Qwen",
                       "--accelerator", "nvidia", "--podman-version", "5.0", "--format", "json")
    argv = json.loads(out)["argv"]
    assert code == 0 and "--ipc" in argv and "--enable-prefix-caching" in argv
    code, out, _ = run(capsys, "providers", "render", "llama-server", "--mode", "subprocess", "--model", "/m.gguf",
                       "--executable", "/opt/llama-server", "--port", "9000", "--engine-args", "--threads 2")
    assert code == 0 and out.startswith("/opt/llama-server --host 127.0.0.1 --port 9000") and "--threads 2" in out


@pytest.mark.slow
def test_up_ls_logs_down_subprocess(capsys, tiny_model_path, tmp_path):
    binary, how = locate_llama_server(build=True)
    if binary is None:
        print(f"llama-server unavailable: {how}")
        pytest.skip(how)
    code, out, err = run(capsys, "providers", "up", "llama-server", "--mode", "subprocess", "--model",
                         str(tiny_model_path), "--executable", str(binary), "--slot-save-dir", str(tmp_path / "slots"),
                         "--param", "ctx_size=512", "--format", "json", "--engine-args=--threads 1")
    assert code == 0, err
    status = json.loads(out)
    assert status["state"] == "running" and status["name"] == "llama-server-tiny"
    try:
        code, out, _ = run(capsys, "providers", "ls", "--format", "json")
        listed = json.loads(out)
        assert [(s["name"], s["state"], s["health"]) for s in listed] == [("llama-server-tiny", "running", "ok")]
        code, out, _ = run(capsys, "providers", "ls")
        assert "llama-server-tiny" in out and "running" in out
        code, out, _ = run(capsys, "providers", "logs", "llama-server-tiny", "-n", "200")
        assert code == 0 and "--slot-save-path" in out
    finally:
        code, out, _ = run(capsys, "providers", "down", "llama-server-tiny")
    assert code == 0 and "stopped" in out
    code, out, _ = run(capsys, "providers", "ls")
    assert "no providers started here" in out
    code, _, err = run(capsys, "providers", "down", "llama-server-tiny")
    assert code == 1 and "no provider named 'llama-server-tiny'" in err


def _systemd_user_manager() -> bool:
    try:
        return subprocess.run(["systemctl", "--user", "show-environment"], capture_output=True,
                              timeout=10).returncode == 0
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(_systemd_user_manager(), reason="a systemd user manager is running here; "
                    "this test checks the refusal where there is none")
def test_quadlet_up_says_why_it_cannot_run_here(capsys, tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    code, _, err = run(capsys, "providers", "up", "llama-server", "--mode", "quadlet", "--model", str(model),
                       "--podman-version", "5.0")
    assert code == 1 and "no systemd user manager is reachable" in err and "--mode podman" in err
    assert not (tmp_path / "xdg" / "containers/systemd").exists()  # nothing half-installed
    code, _, err = run(capsys, "providers", "up", "llama-server", "--mode", "quadlet", "--model", str(model),
                       "--podman-version", "4.3.1")
    assert code == 1 and "Podman 4.3.1 has no Quadlet" in err


def test_ps_joins_launched_providers_and_reports_drift(capsys, tiny_model_path, tmp_path, monkeypatch):
    import os
    import signal
    import time

    monkeypatch.setenv("AGENT_MACHINE_RUNTIME_DIR", str(tmp_path / "run"))  # no agent answers there
    binary, how = locate_llama_server(build=True)
    if binary is None:
        pytest.skip(how)
    code, out, err = run(capsys, "providers", "up", "llama-server", "--mode", "subprocess", "--model",
                         str(tiny_model_path), "--executable", str(binary), "--param", "ctx_size=256",
                         "--format", "json", "--engine-args=--threads 1")
    assert code == 0, err
    pid = json.loads(out)["pid"]
    try:
        code, out, err = run(capsys, "ps", "--format", "json")
        assert code == 0, err
        (row,) = json.loads(out)
        assert row["provider"] == "llama-server-tiny" and row["mode"] == "subprocess"
        assert row["pid"] == pid and row["state"] == "running" and row["healthyAgo"].endswith("ago")
        assert row["drift"] == [] and row["host"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            code, out, _ = run(capsys, "ps", "--format", "json")
            (row,) = json.loads(out)
            if row["drift"]:
                break
            time.sleep(0.1)
        assert any(f"process {pid}" in d and "should run" in d for d in row["drift"]), row
        code, out, _ = run(capsys, "ps")
        assert "llama-server-tiny" in out and "should run" in out
    finally:
        run(capsys, "providers", "down", "llama-server-tiny")

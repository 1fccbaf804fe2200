"""`doctor`: each check on captured machines' profiles, and the command on this machine.

The serve start-up checks are specified against serve itself: for each
configuration, doctor fails exactly when `serve`'s own start-up steps refuse it.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import pytest

from nodeagent.cli import main
from nodeagent.doctor import Check, check_private_state, check_serve_start, check_state_dir, run_checks
from nodeagent.paths import resolve_paths
from nodeagent.probe import probe
from nodeagent.probe.replay import load_capture

MACHINES = Path(__file__).parent / "fixtures" / "machines"
NOW = datetime(2026, 1, 2, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def profiles():
    return {p.name: probe(system=load_capture(p), now=NOW) for p in MACHINES.iterdir() if (p / "capture.json").exists()}


def doctor_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A hermetic environment: the config, state and runtime directories under ``tmp_path``."""
    return {"HOME": str(tmp_path), "AGENT_MACHINE_STATE_DIR": str(tmp_path / "state"),
            "AGENT_MACHINE_CONFIG_DIR": str(tmp_path / "cfg"), "AGENT_MACHINE_CACHE_DIR": str(tmp_path / "cache"),
            "AGENT_MACHINE_RUNTIME_DIR": str(tmp_path / "run" / "agent-machine"), **extra}


@pytest.fixture
def hermetic(tmp_path, monkeypatch):
    """This process's environment is `doctor_env` (doctor and serve read os.environ)."""
    for name in list(os.environ):
        if name.startswith("AGENT_MACHINE_") or name in ("CREDENTIALS_DIRECTORY", "XDG_RUNTIME_DIR"):
            monkeypatch.delenv(name)
    for name, value in doctor_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    return tmp_path


@pytest.fixture
def paths(hermetic):
    return resolve_paths()


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_every_check_has_a_status_and_failures_carry_a_fix(profiles, paths):
    for name, profile in profiles.items():
        checks = run_checks(profile, paths)
        assert len(checks) == 16
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


def test_doctor_command_on_this_machine(hermetic, capsys):
    code = main(["doctor", "--format", "json"])
    checks = json.loads(capsys.readouterr().out)
    assert code == (1 if any(c["status"] == "fail" for c in checks) else 0)
    assert by_name([Check(**c) for c in checks])["state directory writable"].status == "pass"
    assert main(["doctor"]) == code
    out = capsys.readouterr().out
    assert "checks:" in out and "state directory writable" in out


def test_doctor_exits_1_on_a_failing_check(hermetic, tmp_path, monkeypatch, capsys):
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


# ------------------------------------------------------------------ what stops serve fails doctor
def serve_refuses(env: dict[str, str]) -> str | None:
    """Run serve's own start-up steps up to binding (config, token, credentials, listeners); the error, or None."""
    from nodeagent.daemon import ServeError, close_listeners, load_start, open_listeners

    try:
        loaded, token, _ = load_start(env=env)
        listeners = open_listeners(loaded, token, env={})
    except (ValueError, ServeError) as exc:  # ConfigError, TokenError and CredentialsError are ValueErrors
        return str(exc)
    close_listeners(listeners)
    return None


def fails(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks if c.status == "fail"}


def write_config(tmp_path: Path, text: str) -> Path:
    (tmp_path / "cfg").mkdir(exist_ok=True)
    path = tmp_path / "cfg" / "config.toml"
    path.write_text(text)
    return path


def open_dir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    return path


SCENARIOS = {
    "defaults": lambda tmp: {},
    "invalid value": lambda tmp: write_config(tmp, "[queue]\nmax_pods = 0\n") and {},
    "not TOML": lambda tmp: write_config(tmp, "[queue\nmax_pods = 3\n") and {},
    "unknown section type": lambda tmp: write_config(tmp, "queue = 3\n") and {},
    "bad value from the environment": lambda tmp: {"AGENT_MACHINE_QUEUE_MAX_PODS": "lots"},
    "socket dir open to others": lambda tmp: {"AGENT_MACHINE_RUNTIME_DIR": str(open_dir(tmp / "shared"))},
    "own socket dir open to others": lambda tmp: {
        "AGENT_MACHINE_RUNTIME_DIR": str(open_dir(tmp / "run" / "agent-machine"))},
    "tcp without a token": lambda tmp: {"AGENT_MACHINE_API_TCP": "127.0.0.1:0"},
    "malformed tcp": lambda tmp: write_token(tmp) | {"AGENT_MACHINE_API_TCP": "localhost"},
    "token file readable by others": lambda tmp: write_token(tmp, 0o644),
    "a file at the socket path": lambda tmp: {"AGENT_MACHINE_API_SOCKET": str(a_file(open_dir(tmp / "s", 0o700)))},
    "credentials file readable by others": lambda tmp: write_credentials(tmp, "", 0o644),
    "credentials file not TOML": lambda tmp: write_credentials(tmp, "[[credential]\n"),
    "empty private credentials file": lambda tmp: write_credentials(tmp, ""),
}


def write_credentials(tmp_path: Path, text: str, mode: int = 0o600) -> dict[str, str]:
    path = tmp_path / "credentials.toml"
    path.write_text(text)
    path.chmod(mode)
    return {"AGENT_MACHINE_API_CREDENTIALS_FILE": str(path)}


def write_token(tmp_path: Path, mode: int = 0o600) -> dict[str, str]:
    path = tmp_path / "token"
    path.write_text("doctor-test-token-0123456789")
    path.chmod(mode)
    return {"AGENT_MACHINE_API_TOKEN_FILE": str(path)}


def a_file(directory: Path) -> Path:
    (directory / "api.sock").write_text("not a socket")
    return directory / "api.sock"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_doctor_fails_exactly_when_serve_refuses_to_start(tmp_path, scenario):
    env = doctor_env(tmp_path, **SCENARIOS[scenario](tmp_path))
    refusal = serve_refuses(env)
    failed = fails(check_serve_start(env))
    assert bool(failed) == (refusal is not None), (refusal, failed)
    for check in failed.values():
        assert refusal in check.message and check.fix, check


def test_invalid_config_fails_doctor_naming_the_field_and_the_file(tmp_path):
    config = write_config(tmp_path, "[queue]\nmax_pods = 0\n")
    (check,) = fails(check_serve_start(doctor_env(tmp_path))).values()
    assert check.name == "config" and "queue.max_pods" in check.message and f"file {config}" in check.message
    assert str(config) in check.fix and "config show" in check.fix
    write_config(tmp_path, "[queue\n")
    (check,) = fails(check_serve_start(doctor_env(tmp_path))).values()
    assert str(config) in check.message and "line 1" in check.message


def test_doctor_command_exits_1_on_an_invalid_config(hermetic, capsys):
    write_config(hermetic, "[api]\nrequest_timeout_s = -1\n")
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  config" in out and "api.request_timeout_s" in out and "fix: edit" in out


def test_doctor_command_exits_1_on_a_socket_directory_others_can_enter(hermetic, monkeypatch, capsys):
    shared = open_dir(hermetic / "shared")
    monkeypatch.setenv("AGENT_MACHINE_RUNTIME_DIR", str(shared))
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  api socket directory" in out and "mode 755" in out and f"chmod 700 {shared}" in out


def test_own_socket_directory_open_to_others_is_a_warning_because_serve_tightens_it(tmp_path):
    own = open_dir(tmp_path / "run" / "agent-machine")
    checks = {c.name: c for c in check_serve_start(doctor_env(tmp_path))}
    assert checks["api socket directory"].status == "warn" and "755" in checks["api socket directory"].message
    assert serve_refuses(doctor_env(tmp_path)) is None
    assert own.stat().st_mode & 0o777 == 0o700  # serve's start-up tightened it


def test_state_open_to_others_is_reported(tmp_path):
    env = doctor_env(tmp_path)
    paths = resolve_paths(env)
    assert check_private_state(paths).status == "pass"
    open_dir(paths.state_dir)
    paths.db_file.write_text("")
    paths.db_file.chmod(0o644)
    check = check_private_state(paths)
    assert check.status == "warn" and f"{paths.state_dir} (755)" in check.message and f"{paths.db_file} (644)" in check.message
    assert check.fix == f"chmod 700 {paths.state_dir} && chmod 600 {paths.db_file}*"

"""`podman run` rendering and parsing, and the host configuration (runtime,
ulimits) detected from a filesystem tree and rlimits."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import pytest

from nodeagent.launch.container import ContainerShape, RenderError
from nodeagent.launch.podman import PodmanHostConfig, cgroup_layout, parse_podman_run_argv, podman_run_argv
from nodeagent.providers.catalog import load_catalog, resolve_spec

from expected_files import updating

GOLDEN = Path(__file__).resolve().parent / "golden" / "podman"
HOST = PodmanHostConfig(runtime="runc", ulimits=("nofile=1024:1024", "nproc=1024:1024"))
CASES = [("llama-server", a) for a in ("cpu", "nvidia", "amd", "vulkan", "asahi")] + [("vllm", "nvidia"), ("vllm", "amd")]


def spec_for(provider: str, accelerator: str, mode: str = "podman"):
    return resolve_spec(
        load_catalog().get(provider), name=f"{provider}-{accelerator}", mode=mode,
        model_path="/srv/models/Qwen2.5-0.5B" if provider == "vllm" else "/srv/models/q.gguf",
        port=18080, accelerator=accelerator, model_digest="sha256:" + "ab" * 32,
        slot_save_dir="/srv/slots" if provider == "llama-server" else None,
    )


def everything_exists(_path: str) -> bool:
    return True


@pytest.mark.parametrize("provider, accelerator", CASES)
def test_golden_argv(provider, accelerator):
    argv = podman_run_argv(spec_for(provider, accelerator), "5.0", HOST, device_exists=everything_exists)
    text = " \\\n  ".join(shlex.quote(word) for word in argv) + "\n"
    golden = GOLDEN / f"{provider}-{accelerator}.sh"
    if updating("UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"{golden} missing: run with UPDATE_GOLDEN=1 and review it"
    assert text == golden.read_text()


@pytest.mark.parametrize("provider, accelerator", CASES)
def test_argv_round_trip(provider, accelerator):
    spec = spec_for(provider, accelerator)
    argv = podman_run_argv(spec, "5.0", HOST, device_exists=everything_exists)
    assert argv[:4] == ["podman", "--runtime", "runc", "run"]
    shape, _ = parse_podman_run_argv(argv)
    expected = ContainerShape.from_spec(spec, ulimits=HOST.ulimits)
    # podman run cannot say a device was optional (absent ones are already left out)
    expected = dataclasses.replace(expected, devices=tuple((source, False) for source, _ in expected.devices))
    assert shape.differences(expected) == []


def test_optional_devices_absent_here_are_left_out():
    spec = spec_for("llama-server", "vulkan")
    assert "--device" not in podman_run_argv(spec, "5.0", HOST, device_exists=lambda p: False)
    argv = podman_run_argv(spec, "5.0", HOST, device_exists=lambda p: p == "/dev/dri")
    assert argv[argv.index("--device") + 1] == "/dev/dri"
    # a required device stays even if absent: `up` refuses it with a clear error instead
    amd = podman_run_argv(spec_for("llama-server", "amd"), "5.0", HOST, device_exists=lambda p: False)
    assert amd.count("--device") == 2


def test_health_on_failure_needs_podman_4_3():
    spec = spec_for("llama-server", "cpu")
    assert "--health-on-failure" in podman_run_argv(spec, "4.3.1", HOST)
    assert "--health-on-failure" not in podman_run_argv(spec, "4.2.0", HOST)


def test_wrong_mode_and_bad_paths_are_refused():
    with pytest.raises(RenderError, match="not podman"):
        podman_run_argv(spec_for("llama-server", "cpu", mode="quadlet"), "5.0", HOST)
    spec = spec_for("llama-server", "cpu").model_copy(update={
        "mounts": [m.model_copy(update={"source": "/srv/a:b"}) for m in spec_for("llama-server", "cpu").mounts]})
    with pytest.raises(RenderError, match="may not contain ':'"):
        podman_run_argv(spec, "5.0", HOST)


def test_parser_refuses_flags_we_never_write():
    with pytest.raises(ValueError, match=r"unexpected podman run flag\(s\) \['--privileged'\]"):
        parse_podman_run_argv(["podman", "run", "--privileged", "true", "img"])
    with pytest.raises(ValueError, match="no image"):
        parse_podman_run_argv(["podman", "run", "--name", "x"])


# ------------------------------------------------------------------ host detection
def make_cgroup_tree(root: Path, layout: str) -> Path:
    base = root / "sys/fs/cgroup"
    if layout == "v2":
        base.mkdir(parents=True)
        (base / "cgroup.controllers").write_text("cpu memory pids\n")
    else:
        for controller in ("cpu", "memory", "pids"):
            (base / controller).mkdir(parents=True)
        if layout == "hybrid":
            (base / "unified").mkdir()
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/sys/kernel/pid_max").write_text("32768\n")
    return root


@pytest.mark.parametrize("layout", ["v2", "hybrid", "v1"])
def test_cgroup_layout(tmp_path, layout):
    assert cgroup_layout(make_cgroup_tree(tmp_path, layout)) == layout
    assert cgroup_layout(tmp_path / "empty") == "unknown"


def test_detect_on_a_constrained_hybrid_host(tmp_path):
    root = make_cgroup_tree(tmp_path, "hybrid")
    limits = {"nofile": (20000, 20000), "nproc": (96365, 96365)}
    config = PodmanHostConfig.detect(env={}, root=root, which=lambda name: f"/usr/sbin/{name}",
                                     rlimits=limits.__getitem__)
    assert config.runtime == "runc"
    # nproc is capped at pid_max: Podman caps conmon there, so more is refused (measured on such a host)
    assert config.ulimits == ("nofile=20000:20000", "nproc=32768:32768")
    assert config.global_args() == ["--runtime", "runc"]
    assert any("pid_max 32768" in reason for reason in config.reasons)


def test_detect_on_an_ordinary_host(tmp_path):
    root = make_cgroup_tree(tmp_path, "v2")
    (root / "proc/sys/kernel/pid_max").write_text("4194304\n")
    unlimited = {"nofile": (1024, 1048576 * 2), "nproc": (10**7, 10**7)}
    config = PodmanHostConfig.detect(env={}, root=root, which=lambda name: None, rlimits=unlimited.__getitem__)
    assert config.runtime is None and config.ulimits == () and config.global_args() == []


def test_hybrid_without_runc_says_so(tmp_path):
    root = make_cgroup_tree(tmp_path, "hybrid")
    config = PodmanHostConfig.detect(env={}, root=root, which=lambda name: None,
                                     rlimits=lambda name: (10**8, 10**8))
    assert config.runtime is None
    assert any("no runc installed" in reason for reason in config.reasons)


def test_environment_overrides_detection(tmp_path):
    root = make_cgroup_tree(tmp_path, "hybrid")
    env = {"AGENT_MACHINE_PODMAN_RUNTIME": "crun", "AGENT_MACHINE_PODMAN_ULIMITS": "nofile=1024:1024, nproc=1024:1024"}
    config = PodmanHostConfig.detect(env=env, root=root, which=lambda name: "/x", rlimits=lambda n: (1, 1))
    assert config.runtime == "crun" and config.ulimits == ("nofile=1024:1024", "nproc=1024:1024")
    assert PodmanHostConfig.detect(env={"AGENT_MACHINE_PODMAN_ULIMITS": ""}, root=root, which=lambda n: None,
                                   rlimits=lambda n: (1, 1)).ulimits == ()

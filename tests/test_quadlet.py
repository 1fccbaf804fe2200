"""Quadlet rendering: golden units across Podman 4.4/4.6/5.0/5.5 and every
accelerator, the per-version key gate, round trips (unit -> parsed shape ->
spec), and, where a Quadlet generator binary is available, Quadlet's own
dry run as an independent check.

Golden files live in tests/golden/quadlet/; regenerate with
``UPDATE_GOLDEN=1 python -m pytest tests/test_quadlet.py`` and read the diff.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
from pathlib import Path

import pytest

from nodeagent.launch.container import ContainerShape, RenderError
from nodeagent.launch.podman import parse_podman_run_argv
from nodeagent.launch.podman_versions import PodmanVersion, unsupported_keys
from nodeagent.launch.quadlet import (
    QuadletOptions,
    compare_unit_with_spec,
    parse_quadlet,
    render_quadlet,
    render_quadlet_text,
)
from nodeagent.launch.units import parse_unit, split_words
from nodeagent.providers.catalog import load_catalog, resolve_spec

from expected_files import updating

GOLDEN = Path(__file__).resolve().parent / "golden" / "quadlet"
VERSIONS = ("4.4", "4.6", "5.0", "5.5")
CASES = [("llama-server", acc) for acc in ("cpu", "nvidia", "amd", "vulkan", "asahi")] + [
    ("vllm", "nvidia"), ("vllm", "amd")]
MODEL = "/var/lib/agent-machine/models/sha256-1f2e/qwen2.5-0.5b-instruct-q4_k_m.gguf"
VLLM_MODEL = "/var/lib/agent-machine/models/Qwen2.5-0.5B-Instruct"
DIGEST = "sha256:1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c5b6a7988"

# REFERENCE.md section 5, copied here as the test's own oracle: the first
# Podman release whose Quadlet accepts each [Container] key.
REFERENCE_KEYS = {
    "4.4": "AddCapability AddDevice Annotation ContainerName DropCapability Environment EnvironmentFile Exec "
           "Group Image Label Network NoNewPrivileges Notify PodmanArgs PublishPort ReadOnly RunInit "
           "SeccompProfile Timezone User Volume",
    "4.5": "HealthCmd HealthInterval HealthOnFailure HealthRetries HealthStartPeriod HealthTimeout Mount "
           "SecurityLabelDisable Tmpfs UserNS",
    "4.6": "AutoUpdate HostName Pull Sysctl WorkingDir",
    "4.7": "PidsLimit ShmSize Ulimit",
    "5.0": "Entrypoint Pod StopTimeout",
    "5.1": "GroupAdd",
    "5.3": "ServiceName",
    "5.5": "Memory Retry RetryDelay",
}
FIRST_VERSION = {key: PodmanVersion.parse(v) for v, keys in REFERENCE_KEYS.items() for key in keys.split()}


def spec_for(provider: str, accelerator: str):
    entry = load_catalog().get(provider)
    return resolve_spec(
        entry, name=f"{provider}-{accelerator}", mode="quadlet",
        model_path=VLLM_MODEL if provider == "vllm" else MODEL, port=18080, accelerator=accelerator,
        model_digest=DIGEST, slot_save_dir="/var/lib/agent-machine/slots" if provider == "llama-server" else None,
    )


def all_cases():
    return [(p, a, v) for v in VERSIONS for p, a in CASES]


@pytest.mark.parametrize("provider, accelerator, version", all_cases())
def test_golden_unit(provider, accelerator, version):
    text = render_quadlet_text(spec_for(provider, accelerator), version)
    golden = GOLDEN / f"podman-{version}" / f"{provider}-{accelerator}.container"
    if updating("UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"{golden} missing: run with UPDATE_GOLDEN=1 and review it"
    assert text == golden.read_text()


@pytest.mark.parametrize("provider, accelerator, version", all_cases())
def test_every_emitted_key_is_known_to_that_podman(provider, accelerator, version):
    target = PodmanVersion.parse(version)
    unit = render_quadlet(spec_for(provider, accelerator), version)
    for key, value in unit.section("Container").entries:
        assert key in FIRST_VERSION, f"{key} is not in REFERENCE.md's table"
        assert FIRST_VERSION[key] <= target, f"{key}= needs {FIRST_VERSION[key]}, unit is for {version}"
        if (key, value) == ("Notify", "healthy"):
            assert target >= PodmanVersion(5, 0)
    assert unsupported_keys(unit.as_pairs(), target) == []


@pytest.mark.parametrize("provider, accelerator, version", all_cases())
def test_round_trip_unit_matches_spec(provider, accelerator, version):
    spec = spec_for(provider, accelerator)
    text = render_quadlet_text(spec, version)
    assert compare_unit_with_spec(text, spec, version) == []
    parsed = parse_quadlet(text)
    assert parsed.shape == ContainerShape.from_spec(spec)
    assert parsed.timeout_start_s == spec.start_timeout_s >= spec.health.start_period_s


@pytest.mark.parametrize("provider, accelerator, version", all_cases())
def test_unit_invariants(provider, accelerator, version):
    spec = spec_for(provider, accelerator)
    unit = parse_unit(render_quadlet_text(spec, version))
    get = lambda key: unit.get_all("Container", key)  # noqa: E731
    assert get("PublishPort") == [f"127.0.0.1:18080:{spec.container_port}"]
    model_volume = [v for v in get("Volume") if v.startswith(spec.model.path + ":")]
    assert len(model_volume) == 1 and model_volume[0].endswith(":ro")
    assert get("DropCapability") == ["all"] and get("NoNewPrivileges") == ["true"]
    labels = dict(v.split("=", 1) for v in get("Label"))
    assert labels["io.agent-machine.managed"] == "true"
    assert labels["io.agent-machine.provider"] == provider
    assert labels["io.agent-machine.model-digest"] == DIGEST
    podman_args = " ".join(get("PodmanArgs"))
    health_native = bool(get("HealthCmd"))
    assert health_native == (version != "4.4")
    assert health_native or "--health-cmd=" in podman_args  # a health check either way
    assert (get("HealthOnFailure") == ["kill"]) or "--health-on-failure=kill" in podman_args
    assert (get("Notify") == ["healthy"]) == (version in ("5.0", "5.5"))
    assert int(unit.get("Service", "TimeoutStartSec")) >= spec.health.start_period_s
    assert unit.get("Service", "Restart") == "on-failure"
    devices = get("AddDevice")
    if accelerator == "nvidia":
        assert devices == ["nvidia.com/gpu=all"]  # CDI, never with the "-" prefix
    elif accelerator == "amd":
        assert devices == ["/dev/kfd", "/dev/dri"]
        assert get("GroupAdd") == ["keep-groups"] if version == "5.5" else "--group-add=keep-groups" in podman_args
    elif accelerator in ("vulkan", "asahi"):
        assert devices == ["-/dev/dri"]
    else:
        assert devices == []
    if provider == "vllm":
        assert "--ipc=host" in podman_args
        exec_words = split_words(unit.get("Container", "Exec"))
        assert "--enable-prefix-caching" in exec_words
        assert exec_words[exec_words.index("--gpu-memory-utilization") + 1] == "0.9"
    else:
        assert "/var/lib/agent-machine/slots:/slots" in get("Volume")


def test_no_quadlet_before_4_4():
    with pytest.raises(RenderError, match="Podman 4.3.1 has no Quadlet"):
        render_quadlet(spec_for("llama-server", "cpu"), "4.3.1")


@pytest.mark.parametrize("edit, field", [
    (("PublishPort=127.0.0.1:18080:8080", "PublishPort=0.0.0.0:18080:8080"), "publish"),
    ((".gguf:ro\n", ".gguf\n"), "volumes"),
    (("Label=io.agent-machine.provider=llama-server\n", ""), "labels"),
    (("DropCapability=all\n", ""), "drop_all_capabilities"),
    (("--n-gpu-layers 999", "--n-gpu-layers 0"), "args"),
    (("TimeoutStartSec=900", "TimeoutStartSec=30"), "timeout_start_s"),
    (("HealthOnFailure=kill", "HealthOnFailure=none"), "health_on_failure"),
])
def test_round_trip_catches_edits(edit, field):
    spec = spec_for("llama-server", "nvidia")
    text = render_quadlet_text(spec, "5.0")
    assert edit[0] in text
    problems = compare_unit_with_spec(text.replace(*edit), spec, "5.0")
    assert any(p.startswith(f"{field}:") for p in problems), problems


def test_round_trip_catches_a_key_too_new_for_the_target():
    spec = spec_for("llama-server", "amd")
    text = render_quadlet_text(spec, "5.5")  # carries GroupAdd= (5.1+)
    problems = compare_unit_with_spec(text, spec, "5.0")
    assert any("GroupAdd= needs Podman >= 5.1" in p for p in problems), problems


def test_ulimits_follow_the_version():
    spec = spec_for("llama-server", "cpu")
    options = QuadletOptions(ulimits=("nofile=1024:1024",))
    old = parse_unit(render_quadlet_text(spec, "4.6", options))
    new = parse_unit(render_quadlet_text(spec, "5.0", options))
    assert old.get_all("Container", "Ulimit") == [] and "--ulimit=nofile=1024:1024" in old.get("Container", "PodmanArgs")
    assert new.get_all("Container", "Ulimit") == ["nofile=1024:1024"]
    for version in ("4.6", "5.0"):
        assert compare_unit_with_spec(render_quadlet_text(spec, version, options), spec, version, options) == []


def test_system_scope_installs_into_multi_user():
    unit = parse_unit(render_quadlet_text(spec_for("vllm", "nvidia"), "5.0", QuadletOptions(scope="system")))
    assert unit.get("Install", "WantedBy") == "multi-user.target"


def test_specials_survive_the_round_trip():
    spec = spec_for("llama-server", "cpu").model_copy(update={
        "args": ["--alias", "50% off $HOME \"quoted\" a b", "--x", ""],
        "env": {"GREETING": "hello world", "PCT": "100%"},
    })
    text = render_quadlet_text(spec, "5.0")
    assert "50%% off $$HOME" in text
    assert compare_unit_with_spec(text, spec, "5.0") == []


# ------------------------------------------------------------------ Quadlet itself
def _quadlet_binary() -> tuple[str | None, str]:
    from nodeagent.launch.quadlet import find_quadlet_generator

    path = find_quadlet_generator()
    if path is not None:
        done = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=30)
        return path, done.stdout.strip()
    return None, ("no Quadlet generator: Debian 12's podman 4.3.1 has none and bookworm-backports has no "
                  "podman; set AGENT_MACHINE_QUADLET to a quadlet binary (e.g. from Debian trixie's podman .deb)")


QUADLET, QUADLET_VERSION = _quadlet_binary()
needs_quadlet = pytest.mark.skipif(QUADLET is None, reason=QUADLET_VERSION)


def _dryrun(directory: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QUADLET_UNIT_DIRS": str(directory)}
    return subprocess.run([QUADLET, "-dryrun", "-user"], capture_output=True, text=True, env=env, timeout=60)


@needs_quadlet
def test_quadlet_generator_accepts_our_units_and_runs_what_the_spec_says(tmp_path):
    binary_version = PodmanVersion.parse(QUADLET_VERSION)
    checked = 0
    for provider, accelerator, version in all_cases():
        if PodmanVersion.parse(version) > binary_version:
            continue  # a newer target may carry keys this generator does not know yet
        spec = spec_for(provider, accelerator)
        directory = tmp_path / f"{provider}-{accelerator}-{version}"
        directory.mkdir()
        (directory / f"{spec.name}.container").write_text(render_quadlet_text(spec, version))
        done = _dryrun(directory)
        assert done.returncode == 0, done.stderr
        exec_start = re.search(r"^ExecStart=(.*)$", done.stdout, re.M)
        assert exec_start, done.stdout
        shape, bookkeeping = parse_podman_run_argv(split_words(exec_start.group(1).replace("%%", "%")))
        # Quadlet drops an optional device ("-/dev/dri") that does not exist here.
        assert shape == ContainerShape.from_spec(spec, device_exists=os.path.exists), (provider, accelerator, version)
        want_notify = "healthy" if PodmanVersion.parse(version) >= PodmanVersion(5, 0) else "conmon"
        assert bookkeeping["--sdnotify"] == want_notify
        checked += 1
    assert checked >= 21  # 4.4, 4.6 and 5.0 for all seven cases at least


@needs_quadlet
def test_quadlet_generator_rejects_an_unknown_key(tmp_path):
    spec = spec_for("llama-server", "cpu")
    text = render_quadlet_text(spec, "5.0").replace("[Container]\n", "[Container]\nFrobnicate=1\n")
    (tmp_path / "bad.container").write_text(text)
    done = _dryrun(tmp_path)
    assert done.returncode != 0 and "Frobnicate" in done.stderr
    assert any("not a Quadlet key" in p for p in compare_unit_with_spec(text, spec, "5.0"))

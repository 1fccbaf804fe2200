"""Real Podman: build a FROM-scratch llama-server image offline, launch it in
`podman` mode through the production launcher (runtime and ulimits detected
from this host), wait for health, complete a request, save and restore a slot
through the mounted slot directory, stop it, and leave no container behind.

Skipped, with the reason printed, where Podman cannot run containers.
"""

from __future__ import annotations

import subprocess
import uuid

import pytest

from nodeagent.launch.podman import PodmanError, PodmanHostConfig, PodmanLauncher, build_local_image, podman_version
from nodeagent.launch.registry import Registry
from nodeagent.launch.subprocess import free_port
from nodeagent.providers.base import GenerationRequest
from nodeagent.providers.catalog import load_catalog, resolve_spec
from nodeagent.providers.llama_server import LlamaServerProvider, locate_llama_server, read_slot_file_tokens

pytestmark = [pytest.mark.podman, pytest.mark.slow]

IMAGE = "localhost/agent-machine-test/llama-server:tests"


def _skip(reason: str):
    print(f"\npodman test skipped: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def podman_image():
    """The image, built once per module, removed afterwards; skips with the
    reason when podman is missing or cannot run a container here."""
    host = PodmanHostConfig.detect()
    try:
        version = podman_version(host)
    except PodmanError as exc:
        _skip(str(exc))
    binary, how = locate_llama_server(build=True)
    if binary is None:
        _skip(f"no llama-server binary to put in the image: {how}")
    try:
        build_local_image(binary, IMAGE, host)
    except (PodmanError, subprocess.TimeoutExpired) as exc:
        _skip(f"podman cannot build an image here: {exc}")
    smoke = subprocess.run([*host.base(), "run", "--rm", *sum((["--ulimit", u] for u in host.ulimits), []),
                            IMAGE, "--version"], capture_output=True, text=True, timeout=120)
    if smoke.returncode != 0:
        subprocess.run([host.podman, "rmi", "-f", IMAGE], capture_output=True, timeout=60)
        _skip(f"podman cannot run containers here ({'; '.join(host.reasons)}): {smoke.stderr.strip()[-500:]}")
    yield host, version
    subprocess.run([host.podman, "rmi", "-f", IMAGE], capture_output=True, timeout=120)


def test_llama_server_in_podman_mode(podman_image, tiny_model_path, tmp_path):
    host, version = podman_image
    name = f"am-test-{uuid.uuid4().hex[:8]}"
    slot_dir = tmp_path / "slots"
    slot_dir.mkdir()
    spec = resolve_spec(
        load_catalog().get("llama-server"), name=name, mode="podman", model_path=tiny_model_path,
        port=free_port(), slot_save_dir=slot_dir, image=IMAGE, pull="never",
        health_command=None,  # a FROM-scratch image has no curl; the agent polls /health itself
        params={"ctx_size": 1024, "parallel": 2}, extra_args=["--threads", "1", "--cache-ram", "0"],
        start_timeout_s=120,
    )
    launcher = PodmanLauncher(Registry(tmp_path / "registry"), host=host, version=version)
    provider = LlamaServerProvider.from_spec(spec, launcher)
    try:
        provider.start()
        inspected = launcher.inspect(name)
        assert inspected["State"]["Status"] == "running"
        assert inspected["Config"]["Labels"]["io.agent-machine.provider"] == "llama-server"
        assert provider.health().ok

        tokens = provider.tokenize("a pod's system prompt, tools and first turn")
        provider.generate(GenerationRequest(prompt_tokens=tokens, max_tokens=0, slot=0))
        control = provider.generate(GenerationRequest(prompt_tokens=tokens, max_tokens=6, slot=0))
        assert len(control.completion_tokens) == 6

        provider.generate(GenerationRequest(prompt_tokens=tokens, max_tokens=0, slot=0))
        saved = provider.save_state(0, tmp_path / "t2" / "pod.bin")  # written in the container, moved to T2
        assert saved.n_tokens == len(tokens) and read_slot_file_tokens(saved.path) == tokens
        assert provider.restore_state(1, saved.path).n_tokens == len(tokens)  # staged back through the mount
        resumed = provider.generate(GenerationRequest(prompt_tokens=tokens, max_tokens=6, slot=1))
        assert resumed.cached_tokens == len(tokens) - 1
        assert resumed.completion_tokens == control.completion_tokens
    finally:
        provider.stop()
        provider.close()
    assert launcher.state(name) == "absent"
    leftover = subprocess.run([host.podman, "ps", "-a", "--filter", f"name={name}", "--format", "{{.Names}}"],
                              capture_output=True, text=True, timeout=60)
    assert leftover.stdout.strip() == ""
    assert list(slot_dir.iterdir()) == []  # staging names cleaned up


def test_a_missing_image_with_pull_never_is_refused(podman_image, tiny_model_path, tmp_path):
    host, version = podman_image
    spec = resolve_spec(load_catalog().get("llama-server"), name="am-test-noimage", mode="podman",
                        model_path=tiny_model_path, port=free_port(), image="localhost/agent-machine-test/absent:0",
                        pull="never")
    with pytest.raises(PodmanError, match="is not present and pull=never"):
        PodmanLauncher(Registry(tmp_path), host=host, version=version).up(spec)


def test_a_container_that_exits_fails_fast_and_is_removed(podman_image, tmp_path):
    host, version = podman_image
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    name = f"am-test-bad-{uuid.uuid4().hex[:6]}"
    spec = resolve_spec(load_catalog().get("llama-server"), name=name, mode="podman", model_path=bad,
                        port=free_port(), image=IMAGE, pull="never", health_command=None, start_timeout_s=90)
    launcher = PodmanLauncher(Registry(tmp_path / "reg"), host=host, version=version)
    from nodeagent.launch.health import StartFailed

    with pytest.raises(StartFailed, match=f"container {name} is exited"):
        launcher.up(spec)
    assert launcher.state(name) == "absent"


def test_cli_up_ls_down_in_podman_mode(podman_image, tiny_model_path, tmp_path, monkeypatch, capsys):
    import json

    from nodeagent.cli import main

    monkeypatch.setenv("AGENT_MACHINE_STATE_DIR", str(tmp_path / "state"))
    name = f"am-test-cli-{uuid.uuid4().hex[:6]}"
    code = main(["providers", "up", "llama-server", "--mode", "podman", "--model", str(tiny_model_path),
                 "--image", IMAGE, "--pull", "never", "--no-container-health", "--name", name,
                 "--engine-args", "--threads 1", "--format", "json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    try:
        assert json.loads(out)["state"] == "running"
        assert main(["providers", "ls", "--format", "json"]) == 0
        listed = json.loads(capsys.readouterr()[0])
        assert [(s["name"], s["mode"], s["state"]) for s in listed] == [(name, "podman", "running")]
        assert listed[0]["containerId"]
    finally:
        assert main(["providers", "down", name]) == 0
    host, _ = podman_image
    leftover = subprocess.run([host.podman, "ps", "-a", "--filter", f"name={name}", "--format", "{{.Names}}"],
                              capture_output=True, text=True, timeout=60)
    assert leftover.stdout.strip() == ""

"""`render kube`: manifests that Kubernetes' own OpenAPI schemas accept (two pinned versions, strict),
an InferencePool that GAIE's v1 schema accepts, and a rendered config the agent itself loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from nodeagent.config import load_config
from nodeagent.launch.kube import KubeOptions, KubeRenderError, render
from nodeagent.models.store import ModelStore

KUBERNETES_VERSIONS = ("1.30.0", "1.34.0")  # pinned: an older supported release and a recent one
POOL_SCHEMA = json.loads((Path(__file__).parent / "fixtures" / "gaie" / "inferencepool-v1.schema.json").read_text())

FLEET = """
[[providers]]
model = "tiny"
kind = "llama_server"
replicas = 2
slots = 4
ctx_per_slot = 2048
threads = 4

[[providers]]
model = "tiny"
kind = "vllm"
name = "tiny-vllm"
image = "docker.io/vllm/vllm-openai:v0.11.0"

[[providers]]
model = "tiny"
kind = "llama_cpp_python"
"""


@pytest.fixture()
def node_env(tmp_path, tiny_model_path):
    env = {"HOME": str(tmp_path), "AGENT_MACHINE_STATE_DIR": str(tmp_path / "state"),
           "AGENT_MACHINE_CONFIG_DIR": str(tmp_path / "cfg"), "AGENT_MACHINE_CACHE_DIR": str(tmp_path / "cache"),
           "AGENT_MACHINE_RUNTIME_DIR": str(tmp_path / "run")}
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.toml").write_text(FLEET)
    digest = ModelStore(tmp_path / "state").import_model(tiny_model_path, "tiny").digest
    return env, digest


def rendered(env, **options):
    loaded = load_config(env)
    store = ModelStore(loaded.paths.state_dir)
    return render(loaded.config, KubeOptions(**options), digest_of=lambda i, m: store.resolve(m).digest)


def validate(manifest, version):
    """Kubernetes' schema for built-in kinds; GAIE's for the InferencePool (kubernetes-validate knows no CRDs)."""
    if manifest["kind"] == "InferencePool":
        jsonschema.validate(manifest, POOL_SCHEMA)
    else:
        kubernetes_validate.validate(manifest, version, strict=True)


CASES = [
    {"accelerator": "cpu"},
    {"accelerator": "nvidia", "gpus": 2},
    {"accelerator": "nvidia", "device_mode": "cdi"},
    {"accelerator": "amd"},
    {"accelerator": "vulkan"},
    {"accelerator": "asahi", "kv_events": False},
    {"accelerator": "cpu", "target": "podman", "token_path": "/srv/agent-machine/token"},
    {"accelerator": "cpu", "model_files": {"tiny": "/srv/models/tiny.gguf"}},
]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_every_manifest_validates_against_the_pinned_kubernetes_versions(node_env, case, version):
    env, _ = node_env
    manifests = rendered(env, **case)
    kinds = [m["kind"] for m in manifests]
    if case.get("target") == "podman":
        assert kinds == ["ConfigMap", "PersistentVolumeClaim", "PersistentVolumeClaim", "PersistentVolumeClaim",
                         "PersistentVolumeClaim", "Pod"]
    else:
        assert kinds == ["Namespace", "Secret", "ConfigMap", "DaemonSet", "Service", "InferencePool"]
    for manifest in manifests:
        validate(manifest, version)


def test_the_validators_do_refuse_a_broken_manifest(node_env):
    env, _ = node_env
    manifests = {m["kind"]: m for m in rendered(env)}
    daemonset = json.loads(json.dumps(manifests["DaemonSet"]))
    daemonset["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "api"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSIONS[0], strict=True)
    daemonset = json.loads(json.dumps(manifests["DaemonSet"]))
    daemonset["spec"]["template"]["spec"]["containers"][0]["gpu"] = 1  # strict: no unknown fields
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSIONS[1], strict=True)
    pool = json.loads(json.dumps(manifests["InferencePool"]))
    pool["spec"]["targetPorts"].append({"number": 9000})  # v1 allows exactly one
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, POOL_SCHEMA)


def test_the_daemonset_has_host_paths_topolvm_volumes_devices_and_a_minimal_security_context(node_env):
    env, digest = node_env
    manifests = {m["kind"]: m for m in rendered(env, accelerator="nvidia", gpus=2)}
    pod = manifests["DaemonSet"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert {volumes[n]["hostPath"]["path"] for n in ("state", "kv-ram", "run", "features")} == {
        "/var/lib/agent-machine", "/dev/shm/agent-machine", "/run/agent-machine",
        "/etc/kubernetes/node-feature-discovery/features.d"}
    for name in ("models", "cache", "scratch"):
        claim = volumes[name]["ephemeral"]["volumeClaimTemplate"]["spec"]
        assert claim["storageClassName"] == "topolvm-provisioner" and claim["accessModes"] == ["ReadWriteOnce"]
    containers = {c["name"]: c for c in pod["containers"]}
    # Two llama-server replicas and one vLLM as containers; the llama-cpp-python one runs inside the agent.
    assert set(containers) == {"agent", "tiny-ls-0", "tiny-ls-1", "tiny-vllm-0"}
    for name, container in containers.items():
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False and security["capabilities"] == {"drop": ["ALL"]}
        assert security["readOnlyRootFilesystem"] is True
    for name in ("tiny-ls-0", "tiny-ls-1", "tiny-vllm-0"):
        assert containers[name]["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert "limits" not in containers["agent"]["resources"]  # its engines are the provider containers
    ls0 = containers["tiny-ls-0"]["args"]
    assert ls0[ls0.index("--model") + 1] == f"/var/lib/agent-machine/models/blobs/{digest.replace(':', '-')}"
    assert ls0[ls0.index("--parallel") + 1] == "4" and ls0[ls0.index("--ctx-size") + 1] == "8192"
    env_names = {e["name"] for e in containers["agent"]["env"]}
    assert "POD_IP" in env_names  # the KV events' topic names the pod
    service = manifests["Service"]["spec"]
    assert {p["name"]: p["port"] for p in service["ports"]} == {"api": 8377, "kv-events": 5557, "kv-replay": 5558}
    pool = manifests["InferencePool"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"]["matchLabels"] == manifests["DaemonSet"]["spec"]["selector"]["matchLabels"]
    cdi = {m["kind"]: m for m in rendered(env, accelerator="nvidia", device_mode="cdi")}
    template = cdi["DaemonSet"]["spec"]["template"]
    assert template["metadata"]["annotations"]["cdi.k8s.io/agent-machine"] == "nvidia.com/gpu=all"
    assert all("limits" not in c["resources"] for c in template["spec"]["containers"])


def test_the_rendered_config_loads_and_attaches_each_provider_to_its_container(node_env, tmp_path):
    env, _ = node_env
    manifests = {m["kind"]: m for m in rendered(env)}
    text = manifests["ConfigMap"]["data"]["config.toml"]
    path = tmp_path / "rendered.toml"
    path.write_text(text)
    config = load_config({"HOME": str(tmp_path)}, path=path).config
    assert config.api.tcp == "0.0.0.0:8377" and config.cluster.kv_events == "tcp://*:5557"
    assert config.cluster.nfd_dir == "/etc/kubernetes/node-feature-discovery/features.d"
    declared = {(p.kind, p.mode): p for p in config.providers}
    containers = {c["name"]: c for c in manifests["DaemonSet"]["spec"]["template"]["spec"]["containers"]}
    ports = {c["name"]: c["ports"][0]["containerPort"] for n, c in containers.items() if n != "agent"}
    assert declared[("llama_server", "attach")].urls == [f"http://127.0.0.1:{ports['tiny-ls-0']}",
                                                         f"http://127.0.0.1:{ports['tiny-ls-1']}"]
    assert declared[("vllm", "attach")].urls == [f"http://127.0.0.1:{ports['tiny-vllm-0']}"]
    assert ("llama_cpp_python", "subprocess") in declared
    secret = manifests["Secret"]["stringData"]["token"]
    assert len(secret) >= 32 and rendered(env)[1]["stringData"]["token"] != secret  # fresh per rendering


def test_unknown_models_and_bad_choices_are_refused_naming_them(node_env, tmp_path):
    env, _ = node_env
    loaded = load_config(env)
    with pytest.raises(KubeRenderError, match=r"providers\[0\]\.model"):
        render(loaded.config, KubeOptions())
    with pytest.raises(KubeRenderError, match="CDI specs are rendered for nvidia only"):
        rendered(env, accelerator="amd", device_mode="cdi")


def cli(env, *args):
    full = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_MACHINE_")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "nodeagent.cli", "render", "kube", *args], capture_output=True,
                          text=True, timeout=120, env=full)


def test_cli_writes_one_file_per_manifest_and_a_table(node_env, tmp_path):
    env, _ = node_env
    out = tmp_path / "deploy"
    done = cli(env, "--accelerator", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00-namespace-agent-machine.yaml", "01-secret-agent-machine-token.yaml",
                     "02-configmap-agent-machine-config.yaml", "03-daemonset-agent-machine.yaml",
                     "04-service-agent-machine.yaml", "05-inferencepool-agent-machine.yaml", "all.yaml"]
    assert (out / "01-secret-agent-machine-token.yaml").stat().st_mode & 0o077 == 0  # the token stays private
    docs = list(yaml.safe_load_all((out / "all.yaml").read_text()))
    assert [d["kind"] for d in docs][-1] == "InferencePool"
    table = cli(env, "--accelerator", "cpu", "--format", "table")
    assert "DaemonSet" in table.stdout and "tiny-ls-0" in table.stdout
    token = tmp_path / "token"
    token.write_text("0123456789abcdef-token")
    given = json.loads(cli(env, "--accelerator", "cpu", "--format", "json", "--token-file", str(token)).stdout)
    assert given[1]["stringData"]["token"] == "0123456789abcdef-token"


def test_cli_refusals_name_the_option(node_env, tmp_path):
    env, _ = node_env
    bad = cli(env, "--accelerator", "cpu", "--model", "tiny=/no/such.gguf", "--target", "podman")
    assert bad.returncode == 2 and "--model 'tiny=/no/such.gguf'" in bad.stderr
    bad = cli(env, "--accelerator", "cpu", "--model", "tiny")
    assert bad.returncode == 2 and "NAME=PATH" in bad.stderr
    (tmp_path / "cfg" / "config.toml").write_text('[[providers]]\nmodel = "missing"\nkind = "llama_server"\n')
    bad = cli(env, "--accelerator", "cpu")
    assert bad.returncode == 2 and "providers[0].model: 'missing' is not in this node's store" in bad.stderr
    help_text = cli(env, "--help").stdout
    assert "examples:" in help_text and "podman kube play" in help_text

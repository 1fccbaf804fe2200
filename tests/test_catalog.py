"""The provider catalog (providers/*.toml): shipped entries, validation errors
that name file and field, and resolution into a ProviderSpec."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from nodeagent.contracts.provider import DeviceSpec, ProviderSpec
from nodeagent.providers.catalog import CatalogError, load_catalog, load_entry, resolve_spec

REPO_CATALOG = Path(__file__).resolve().parent.parent / "providers"

GOOD = textwrap.dedent("""\
    name = "demo"
    kind = "llama_server"
    description = "a demo"
    modes = ["subprocess", "podman"]
    executable = "llama-server"
    container_port = 8080

    [params]
    ctx_size = 4096

    [command]
    args = ["--port", "{listen_port}", "-m", "{model}", "-c", "{ctx_size}"]

    [command.when]
    slot_save_dir = ["--slot-save-path", "{slot_save_dir}"]

    [accelerators.cpu]
    image = "example.org/demo:1.2.3"
""")


def write(tmp_path: Path, text: str, name: str = "demo") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def catalog():
    return load_catalog([REPO_CATALOG])


def test_shipped_catalog_loads_with_every_backend(catalog):
    assert catalog.names() == ["llama-cpp-python", "llama-server", "vllm"]
    server = catalog.get("llama-server")
    assert set(server.accelerators) == {"cpu", "nvidia", "amd", "vulkan", "asahi"}
    images = {acc: server.image_for(acc) for acc in server.accelerators}
    assert images["cpu"].startswith("ghcr.io/ggml-org/llama.cpp:server-b")
    assert ":server-cuda-" in images["nvidia"] and ":server-rocm-" in images["amd"]
    assert ":server-vulkan-" in images["vulkan"] and "asahi" in images["asahi"]
    assert server.capabilities.slot_save_restore and server.metrics_path == "/metrics"
    vllm = catalog.get("vllm")
    assert "vllm-openai" in vllm.image_for("nvidia") and vllm.ipc_host
    assert not vllm.capabilities.slot_save_restore and vllm.capabilities.prefix_caching
    assert catalog.get("llama-cpp-python").modes == ["subprocess"]


def test_every_shipped_image_is_pinned(catalog):
    for name in catalog.names():
        for acc, entry in catalog.get(name).accelerators.items():
            if entry.image:
                tag = entry.image.rsplit("/", 1)[-1]
                assert ":" in tag and not tag.endswith(":latest"), (name, acc, entry.image)


def test_a_good_file_loads(tmp_path):
    entry = load_entry(write(tmp_path, GOOD))
    assert entry.name == "demo" and entry.source.endswith("demo.toml")


@pytest.mark.parametrize("change, field, words", [
    (('image = "example.org/demo:1.2.3"', 'image = "example.org/demo:latest"'), "accelerators.cpu.image", "not pinned"),
    (('image = "example.org/demo:1.2.3"', 'image = "example.org/demo"'), "accelerators.cpu.image", "no tag"),
    (('"{ctx_size}"]', '"{ctx_sise}"]'), "command.args", "unknown placeholder {ctx_sise}"),
    (("container_port = 8080\n", ""), "container_port", "needed for podman"),
    (("[accelerators.cpu]", "[accelerators.tpu]"), "accelerators", "unknown accelerator"),
    (('description = "a demo"', 'descripton = "a demo"'), "descripton", "Extra inputs"),
    (('kind = "llama_server"', 'kind = "llama-server"'), "kind", "llama_server"),
    (('modes = ["subprocess", "podman"]', 'modes = ["docker"]'), "modes.0", "subprocess"),
    (('executable = "llama-server"\n', ""), "executable", "needed for subprocess"),
])
def test_bad_entries_name_file_and_field(tmp_path, change, field, words):
    path = write(tmp_path, GOOD.replace(*change))
    with pytest.raises(CatalogError) as caught:
        load_entry(path)
    lines = str(caught.value).splitlines()
    matching = [line for line in lines if line.startswith(f"{path}: {field}")]
    assert matching, lines
    assert any(words in line for line in matching), lines


def test_accelerator_params_must_be_declared(tmp_path):
    path = write(tmp_path, GOOD + "params = { gpu_layerz = 9 }\n")
    with pytest.raises(CatalogError, match=r"accelerators.cpu.params: unknown parameter\(s\) \['gpu_layerz'\]"):
        load_entry(path)


def test_invalid_toml_and_name_mismatch(tmp_path):
    with pytest.raises(CatalogError, match=r"demo.toml: not valid TOML"):
        load_entry(write(tmp_path, GOOD + "[[oops"))
    with pytest.raises(CatalogError, match=r"other.toml: name: 'demo' must match the file name 'other'"):
        load_entry(write(tmp_path, GOOD, name="other"))


def test_one_bad_file_fails_the_whole_catalog(tmp_path):
    write(tmp_path, GOOD)
    write(tmp_path, GOOD.replace('name = "demo"', 'name = "bad"').replace("{ctx_size}", "{nope}"), name="bad")
    with pytest.raises(CatalogError, match=r"bad.toml: command.args: unknown placeholder"):
        load_catalog([tmp_path])


def test_earlier_directories_override_later_ones(tmp_path):
    override = tmp_path / "override"
    override.mkdir()
    text = (REPO_CATALOG / "vllm.toml").read_text().replace("v0.11.0", "v0.11.1")
    (override / "vllm.toml").write_text(text)
    catalog = load_catalog([override, REPO_CATALOG])
    assert catalog.get("vllm").image_for("nvidia").endswith(":v0.11.1")
    assert catalog.get("llama-server").source == str(REPO_CATALOG / "llama-server.toml")
    with pytest.raises(CatalogError, match="no provider 'sglang' in the catalog; known: llama-cpp-python"):
        catalog.get("sglang")


# ------------------------------------------------------------------ resolution
def test_subprocess_spec_uses_host_paths_and_loopback(catalog, tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"x")
    spec = resolve_spec(catalog.get("llama-server"), name="ls", mode="subprocess", model_path=model, port=9001,
                        slot_save_dir=tmp_path / "slots", executable="/opt/llama-server", params={"ctx_size": 2048})
    assert spec.executable == "/opt/llama-server" and spec.image is None and spec.mounts == []
    args = spec.args
    assert args[args.index("--host") + 1] == "127.0.0.1" and args[args.index("--port") + 1] == "9001"
    assert args[args.index("--model") + 1] == str(model.resolve())
    assert args[args.index("--ctx-size") + 1] == "2048"
    assert args[args.index("--slot-save-path") + 1] == str((tmp_path / "slots").resolve())
    assert spec.base_url == "http://127.0.0.1:9001"
    assert spec.devices == [] and spec.health.command is None


def test_container_spec_mounts_model_read_only_and_listens_inside(catalog, tmp_path):
    spec = resolve_spec(catalog.get("llama-server"), name="ls", mode="quadlet", model_path="/srv/m/q.gguf",
                        port=9001, accelerator="nvidia", gpus="0,GPU-1234abcd", slot_save_dir="/srv/slots")
    args = spec.args
    assert args[args.index("--host") + 1] == "0.0.0.0" and args[args.index("--port") + 1] == "8080"
    assert args[args.index("--model") + 1] == "/models/q.gguf"
    assert args[args.index("--n-gpu-layers") + 1] == "999"  # the accelerator's parameter default
    assert args[args.index("--slot-save-path") + 1] == "/slots"
    assert [(m.source, m.target, m.read_only) for m in spec.mounts] == [
        ("/srv/m/q.gguf", "/models/q.gguf", True), ("/srv/slots", "/slots", False)]
    assert [d.source for d in spec.devices] == ["nvidia.com/gpu=0", "nvidia.com/gpu=GPU-1234abcd"]
    assert not any(d.optional for d in spec.devices)
    assert spec.health.command == ["curl", "-fsS", "http://127.0.0.1:8080/health"]
    assert spec.labels["io.agent-machine.provider"] == "llama-server"


def test_when_groups_only_with_a_value(catalog):
    spec = resolve_spec(catalog.get("llama-server"), name="ls", mode="podman", model_path="/m.gguf", port=1)
    assert "--slot-save-path" not in spec.args and len(spec.mounts) == 1
    vllm = resolve_spec(catalog.get("vllm"), name="v", mode="podman", model_path="/m/Qwen", port=1,
                        accelerator="nvidia")
    assert "--max-model-len" not in vllm.args
    vllm = resolve_spec(catalog.get("vllm"), name="v", mode="podman", model_path="/m/Qwen", port=1,
                        accelerator="nvidia", params={"max_model_len": 8192, "gpu_memory_utilization": 0.8})
    assert vllm.args[vllm.args.index("--max-model-len") + 1] == "8192"
    assert vllm.args[vllm.args.index("--gpu-memory-utilization") + 1] == "0.8"
    assert "--enable-prefix-caching" in vllm.args and vllm.ipc_host


def test_accelerator_devices(catalog):
    entry = catalog.get("llama-server")

    def devices(acc):
        spec = resolve_spec(entry, name="x", mode="podman", model_path="/m.gguf", port=1, accelerator=acc)
        return [(d.source, d.optional) for d in spec.devices], spec.group_add

    assert devices("cpu") == ([], [])
    assert devices("nvidia") == ([("nvidia.com/gpu=all", False)], [])
    assert devices("amd") == ([("/dev/kfd", False), ("/dev/dri", False)], ["keep-groups"])
    assert devices("vulkan") == ([("/dev/dri", True)], [])
    assert devices("asahi") == ([("/dev/dri", True)], [])
    asahi = resolve_spec(entry, name="x", mode="podman", model_path="/m.gguf", port=1, accelerator="asahi")
    assert asahi.args[0] == "llama-server"  # RamaLama's image has no entrypoint


@pytest.mark.parametrize("kwargs, words", [
    ({"mode": "quadlet", "provider": "llama-cpp-python"}, "does not run in mode 'quadlet'"),
    ({"accelerator": "vulkan", "provider": "vllm"}, "has no accelerator 'vulkan' (has: nvidia, amd)"),
    ({"params": {"ctx": 1}}, "unknown parameter(s) ['ctx']"),
    ({"gpus": "first", "accelerator": "nvidia"}, "gpu selector 'first'"),
])
def test_resolution_errors(catalog, kwargs, words):
    kwargs = dict(kwargs)
    provider = kwargs.pop("provider", "llama-server")
    base = {"name": "x", "mode": "podman", "model_path": "/m.gguf", "port": 1}
    with pytest.raises((CatalogError, ValueError)) as caught:
        resolve_spec(catalog.get(provider), **{**base, **kwargs})
    assert words in str(caught.value)


def test_start_timeout_grows_with_model_size(catalog, tmp_path):
    model = tmp_path / "big.gguf"
    with open(model, "wb") as handle:
        handle.truncate(3 * 100 * 1024 * 1024)  # sparse: 300 MiB
    spec = resolve_spec(catalog.get("llama-server"), name="x", mode="quadlet", model_path=model, port=1)
    assert spec.start_timeout_s == catalog.get("llama-server").start_timeout_s + 3


# ------------------------------------------------------------------ the contract
def test_spec_refuses_non_loopback_and_missing_image(catalog):
    spec = resolve_spec(catalog.get("llama-server"), name="x", mode="podman", model_path="/m.gguf", port=1)
    data = spec.to_wire()
    with pytest.raises(ValidationError, match="loopback only"):
        ProviderSpec.model_validate({**data, "host": "0.0.0.0"})
    with pytest.raises(ValidationError, match="mode podman needs an image"):
        ProviderSpec.model_validate({**data, "image": None})
    with pytest.raises(ValidationError, match="must be 1-63 characters"):
        ProviderSpec.model_validate({**data, "name": "Bad Name"})
    rw_model = dict(data, mounts=[{**data["mounts"][0], "readOnly": False}])
    with pytest.raises(ValidationError, match="model must be mounted read-only"):
        ProviderSpec.model_validate(rw_model)
    assert ProviderSpec.model_validate(data) == spec  # the wire form round-trips


def test_cdi_devices_are_never_optional():
    with pytest.raises(ValidationError, match="cannot be optional"):
        DeviceSpec(source="nvidia.com/gpu=all", optional=True)
    assert DeviceSpec(source="/dev/dri", optional=True).optional

"""Content-addressed store, GGUF metadata, memory fit, and the models CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from nodeagent.models.fit import estimate, kv_cells
from nodeagent.models.gguf_meta import GGUFError, read_gguf
from nodeagent.models.store import ModelInUse, ModelNotFound, ModelStore, ModelStoreError, parse_reference
from nodeagent.models.testmodel import PRESETS


@pytest.fixture
def store(tmp_path):
    s = ModelStore(tmp_path / "state")
    yield s
    s.close()


def _visible(store: ModelStore) -> list[str]:
    return sorted(p.name for p in store.blobs_dir.iterdir()) if store.blobs_dir.exists() else []


def test_metadata_of_the_tiny_model(tiny_model_path):
    meta = read_gguf(tiny_model_path)
    spec = PRESETS["tiny"]
    assert (meta.architecture, meta.n_layer, meta.n_embd, meta.n_head, meta.n_head_kv) == (
        "llama", spec.n_layer, spec.n_embd, spec.n_head, spec.n_head_kv)
    assert meta.head_dim_k == meta.head_dim_v == spec.n_embd // spec.n_head
    assert meta.context_length == spec.n_ctx_train and meta.vocab_size == spec.n_vocab
    assert meta.file_type == "F32"
    assert meta.weights_bytes == sum(meta.layer_bytes) + meta.non_layer_bytes
    assert meta.weights_bytes < meta.file_size < meta.weights_bytes + (1 << 20)


def test_import_hashes_places_and_names(store, tiny_model_path):
    record = store.import_model(tiny_model_path, "tiny:v1")
    expected = hashlib.sha256(tiny_model_path.read_bytes()).hexdigest()
    assert record.digest == f"sha256:{expected}"
    assert record.names == ["tiny:v1"]
    blob = Path(record.path)
    assert blob.name == f"sha256-{expected}" and blob.stat().st_size == tiny_model_path.stat().st_size
    assert record.gguf.n_layer == PRESETS["tiny"].n_layer
    assert store.resolve("tiny:v1").digest == record.digest
    assert store.resolve(expected[:8]).digest == record.digest
    assert store.resolve(f"sha256:{expected[:10]}").digest == record.digest
    with pytest.raises(ModelNotFound, match="no model named 'tiny'"):
        store.resolve("tiny")  # tag latest was never given


def test_same_content_twice_is_one_blob_with_two_names(store, tiny_model_path, tmp_path):
    copy = tmp_path / "elsewhere.gguf"
    shutil.copyfile(tiny_model_path, copy)
    a = store.import_model(tiny_model_path, "a")
    b = store.import_model(copy, "b", mode="copy")
    assert a.digest == b.digest
    assert store.get(a.digest).names == ["a:latest", "b:latest"]
    assert len(_visible(store)) == 1


def test_default_name_is_the_file_stem(store, tiny_model_path):
    assert store.import_model(tiny_model_path).names == ["tiny:latest"]


def test_progress_reaches_the_total(store, tiny_model_path):
    seen = []
    store.import_model(tiny_model_path, "p", progress=lambda done, total: seen.append((done, total)), mode="copy")
    assert seen and seen[-1][0] == seen[-1][1] == tiny_model_path.stat().st_size


@pytest.mark.parametrize("make, message", [
    (lambda p, src: p.write_bytes(b"PK\x03\x04 not a model"), "not a GGUF file"),
    (lambda p, src: p.write_bytes(src.read_bytes()[: 6_000_000]), "truncated"),
    (lambda p, src: p.write_bytes(b""), "not a GGUF file"),
])
def test_bad_input_is_refused_and_nothing_is_left(store, tiny_model_path, tmp_path, make, message):
    bad = tmp_path / "bad.gguf"
    make(bad, tiny_model_path)
    with pytest.raises(GGUFError, match=message):
        store.import_model(bad, "bad")
    assert _visible(store) == []
    assert store.list() == []


def test_unknown_architecture_is_refused(store, tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(path, "not-a-real-arch")
    writer.add_tensor("w", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFError, match="unknown architecture 'not-a-real-arch'"):
        store.import_model(path, "odd")
    assert _visible(store) == []


def test_a_failed_copy_leaves_no_partial_blob(store, tiny_model_path, monkeypatch):
    import nodeagent.models.store as module

    def boom(source, target, total, progress):
        target.write_bytes(b"half")  # what a crash mid-copy leaves
        raise OSError("disk full")

    monkeypatch.setattr(module, "_copy_and_hash", boom)
    with pytest.raises(OSError, match="disk full"):
        store.import_model(tiny_model_path, "x", mode="copy")
    assert _visible(store) == []


def test_stale_partial_of_a_dead_import_is_cleaned(store, tiny_model_path):
    store.blobs_dir.mkdir(parents=True)
    stale = store.blobs_dir / ".import-999999999-abc.partial"  # a pid that cannot exist
    stale.write_bytes(b"junk")
    store.import_model(tiny_model_path, "t")
    assert not stale.exists()


def test_rm_name_then_digest_and_refusal_while_loaded(store, tiny_model_path):
    record = store.import_model(tiny_model_path, "one")
    store.import_model(tiny_model_path, "two")
    _, dropped = store.remove("one")
    assert not dropped and Path(record.path).exists()
    with pytest.raises(ModelInUse, match="is loaded; unload it first"):
        store.remove("two", loaded={record.digest})
    _, dropped = store.remove(record.digest, loaded=set())
    assert dropped and not Path(record.path).exists() and store.list() == []


def test_reference_parsing():
    assert str(parse_reference("Qwen2.5")) == "qwen2.5:latest"
    assert str(parse_reference("hf.co/org/model:Q4_K_M")) == "hf.co/org/model:Q4_K_M"
    with pytest.raises(ModelStoreError, match="invalid model name"):
        parse_reference("bad name")
    with pytest.raises(ModelStoreError, match="invalid tag"):
        parse_reference("x:bad tag")


# ------------------------------------------------------------------ fit
def test_fit_matches_llama_cpp_arithmetic(tiny_model_path):
    meta = read_gguf(tiny_model_path)
    fit = estimate(meta, 1000)
    cpu = fit.devices[0]
    assert fit.kv_cells == kv_cells(1000) == 1024
    # KV: cells x layers x (k + v widths) x 2 bytes (f16)
    assert cpu.kv_bytes == 1024 * meta.n_layer * 2 * meta.n_head_kv * meta.head_dim_k * 2
    assert cpu.weights_bytes == meta.weights_bytes
    assert estimate(meta, 1000, kv_type="q8_0").devices[0].kv_bytes < cpu.kv_bytes
    assert fit.processor == "100% CPU"


def test_fit_splits_layers_between_cpu_and_gpu(tiny_model_path):
    meta = read_gguf(tiny_model_path)
    half = estimate(meta, 2048, n_gpu_layers=2, gpu_device_id="nvidia:0")
    cpu, gpu = half.devices
    assert (cpu.layers, gpu.layers) == (2, 2)
    assert gpu.weights_bytes == sum(meta.layer_bytes[2:])
    assert cpu.kv_bytes == gpu.kv_bytes
    full = estimate(meta, 2048, n_gpu_layers=meta.n_layer + 1)
    assert full.devices[1].weights_bytes == sum(meta.layer_bytes) + meta.output_bytes
    assert full.devices[0].weights_bytes == meta.token_embd_bytes
    assert "CPU/GPU" in half.processor


def test_fit_rejects_bad_parameters(tiny_model_path):
    meta = read_gguf(tiny_model_path)
    with pytest.raises(ValueError, match="unknown KV cache type"):
        estimate(meta, 512, kv_type="q3")
    with pytest.raises(ValueError, match="context length"):
        estimate(meta, 0)


@pytest.mark.llama
def test_fit_is_within_5_percent_of_what_llama_cpp_allocates(tiny_model_path):
    from nodeagent.providers.llama_cpp_python import LlamaCppPythonProvider, LlamaOptions

    meta = read_gguf(tiny_model_path)
    for n_ctx in (512, 2048):
        provider = LlamaCppPythonProvider("fit", tiny_model_path, options=LlamaOptions(n_ctx=n_ctx, n_threads=1))
        provider.start()
        try:
            reported = provider.load_info["buffers_mib"]
        finally:
            provider.stop()
        fit = estimate(meta, n_ctx).devices[0]
        mib = 1 << 20
        assert abs(fit.kv_bytes / mib - reported["CPU KV"]) <= 0.05 * reported["CPU KV"]
        assert abs(fit.compute_bytes / mib - reported["CPU compute"]) <= 0.05 * reported["CPU compute"]
        model = sum(v for k, v in reported.items() if k.endswith("model"))
        assert abs(fit.weights_bytes / mib - model) <= 0.05 * model


# ------------------------------------------------------------------ CLI
def _cli(capsys, *argv):
    from nodeagent.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_import_ls_inspect_rm(tmp_path, monkeypatch, capsys, tiny_model_path):
    monkeypatch.setenv("AGENT_MACHINE_STATE_DIR", str(tmp_path / "state"))
    code, out, _ = _cli(capsys, "models", "import", str(tiny_model_path), "--name", "tiny:t1", "--format", "json")
    assert code == 0
    record = json.loads(out)
    assert record["kind"] == "ModelRecord" and record["names"] == ["tiny:t1"]
    code, out, _ = _cli(capsys, "models", "ls")
    assert code == 0 and "tiny:t1" in out and record["digest"][7:19] in out
    code, out, _ = _cli(capsys, "models", "inspect", record["digest"][7:15], "--format", "json")
    assert json.loads(out)["gguf"]["nHeadKv"] == PRESETS["tiny"].n_head_kv
    code, out, _ = _cli(capsys, "models", "fit", "tiny:t1", "--ctx", "4096", "--format", "json")
    assert code == 0 and json.loads(out)["verdict"] == "fits"
    code, out, err = _cli(capsys, "models", "fit", "tiny:t1", "--ctx", "100000000")
    assert code == 1 and "bytes missing" in out
    code, out, _ = _cli(capsys, "models", "load", "tiny:t1", "--keep-alive", "-1", "--pin", "--format", "json")
    assert code == 0 and json.loads(out)["loaded"] is False  # no daemon: recorded, not loaded
    code, out, _ = _cli(capsys, "models", "ps", "--all", "--format", "json")
    assert code == 0 and json.loads(out)[0]["state"] in ("cold", "warm")
    code, out, _ = _cli(capsys, "models", "rm", "tiny:t1")
    assert code == 0 and "removed" in out
    code, _, err = _cli(capsys, "models", "inspect", "tiny:t1")
    assert code == 1 and "no model named" in err


def test_cli_import_refuses_bad_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AGENT_MACHINE_STATE_DIR", str(tmp_path / "state"))
    bad = tmp_path / "x.gguf"
    bad.write_text("hello")
    code, _, err = _cli(capsys, "models", "import", str(bad))
    assert code == 1 and "not a GGUF file" in err
    assert not any(p for p in (tmp_path / "state" / "models" / "blobs").glob("*"))


def test_cli_create_test_model(tmp_path, capsys):
    code, out, _ = _cli(capsys, "models", "create-test-model", str(tmp_path / "m.gguf"), "--layers", "1",
                        "--width", "64", "--ffn", "128", "--vocab", "512")
    assert code == 0
    assert read_gguf(tmp_path / "m.gguf").n_layer == 1

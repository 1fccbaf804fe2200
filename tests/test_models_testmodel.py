"""The test-model generator writes GGUFs that llama.cpp really loads and runs."""

from __future__ import annotations

import hashlib

import pytest

from nodeagent.models.testmodel import PRESETS, build_vocab, create_test_model, estimated_size, spec_for


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_generation_is_deterministic_and_seeded(tmp_path):
    a = create_test_model(tmp_path / "a.gguf", n_layer=1, n_embd=64, n_ff=128, n_vocab=512)
    b = create_test_model(tmp_path / "b.gguf", n_layer=1, n_embd=64, n_ff=128, n_vocab=512)
    c = create_test_model(tmp_path / "c.gguf", n_layer=1, n_embd=64, n_ff=128, n_vocab=512, seed=7)
    assert _sha(a) == _sha(b)
    assert _sha(a) != _sha(c)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp file left behind"


def test_metadata_and_size_match_the_spec(tiny_model_path):
    import gguf

    spec = PRESETS["tiny"]
    reader = gguf.GGUFReader(tiny_model_path)
    fields = {name: reader.fields[name] for name in reader.fields}
    arch = fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    assert int(fields["llama.block_count"].parts[-1][0]) == spec.n_layer
    assert int(fields["llama.attention.head_count_kv"].parts[-1][0]) == spec.n_head_kv
    size = tiny_model_path.stat().st_size
    assert 0 < size - estimated_size(spec) < 1 << 20  # header + vocabulary under 1 MiB
    assert 8 << 20 < size < 16 << 20  # "about 10 MB"


def test_vocabulary_has_byte_fallback_and_exact_size():
    tokens, scores, types = build_vocab(1000)
    assert len(tokens) == len(scores) == len(types) == 1000
    assert len(set(tokens)) == 1000
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[3 + 0x0A] == "<0x0A>" and types[3 + 0x0A] == 6


@pytest.mark.parametrize("bad, message", [
    ({"n_embd": 100, "n_head": 3}, "multiple of the head count"),
    ({"n_head": 4, "n_head_kv": 3}, "multiple of the KV head count"),
    ({"n_vocab": 10}, "vocabulary"),
    ({"dtype": "q4"}, "dtype"),
    ({"layers": 3}, "unknown model parameter"),
])
def test_bad_parameters_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        spec_for("tiny", **bad)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        spec_for("huge")


def test_small_preset_is_about_300_mb():
    spec = PRESETS["small"]
    assert (spec.n_layer, spec.n_embd) == (12, 768)
    assert 250e6 < estimated_size(spec) < 350e6


@pytest.mark.llama
def test_llama_cpp_loads_tokenizes_and_generates(tiny_model_path):
    from llama_cpp import Llama

    llm = Llama(model_path=str(tiny_model_path), n_ctx=256, n_threads=2, verbose=False, seed=0)
    text = "Hello world, caf\u00e9 \u20ac 42!\n"
    tokens = llm.tokenize(text.encode())
    assert tokens[0] == 1  # BOS
    assert llm.detokenize(tokens).decode() == text  # byte fallback round-trips any UTF-8
    first = llm(text, max_tokens=8, temperature=0.0)
    second = llm(text, max_tokens=8, temperature=0.0)
    assert first["usage"]["completion_tokens"] == 8
    assert first["choices"][0]["text"] == second["choices"][0]["text"]

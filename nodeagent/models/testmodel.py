"""Random-weight llama-architecture GGUF models for tests and benchmarks.

The project never downloads weights: tests and benchmarks run real llama.cpp on
models this module writes. The tensors are random (so the text is gibberish)
but the file is a well-formed GGUF that llama.cpp loads exactly like a real
llama model: the same tensor names and shapes, the same metadata keys, and a
SentencePiece-style vocabulary with byte fallback (``<0x00>`` .. ``<0xFF>``),
so any UTF-8 text tokenizes.

Invariants:
* Deterministic: the same parameters (including ``seed``) give byte-identical
  files, so a test model's sha256 is stable across runs and machines.
* Atomic: the file appears under ``out`` only once fully written and fsynced.
* Memory is bounded by the largest tensor (tensors are generated and streamed
  one at a time), so the ~300 MB ``small`` preset needs no 300 MB buffer.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import string
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np

from nodeagent.fsutil import fsync_dir

DType = Literal["f32", "f16"]

# SentencePiece's word-boundary marker (U+2581), as in every llama vocabulary.
WORD_MARK = "\u2581"


@dataclass(frozen=True)
class TestModelSpec:
    """The shape of a generated model. Field names follow GGUF ``llama.*`` keys."""

    name: str = "agent-machine-test"
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 384
    n_ctx_train: int = 4096
    n_vocab: int = 8192
    dtype: DType = "f32"
    seed: int = 0
    rope_freq_base: float = 10000.0
    rms_eps: float = 1e-5

    def validate(self) -> None:
        if min(self.n_layer, self.n_embd, self.n_head, self.n_head_kv, self.n_ff, self.n_ctx_train) < 1:
            raise ValueError("layers, width, heads, KV heads, FFN size and context length must all be >= 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"width {self.n_embd} is not a multiple of the head count {self.n_head}")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"head count {self.n_head} is not a multiple of the KV head count {self.n_head_kv}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head size {self.n_embd // self.n_head} must be even (RoPE rotates pairs)")
        if self.n_vocab < MIN_VOCAB:
            raise ValueError(f"vocabulary must hold at least {MIN_VOCAB} tokens (3 special + 256 bytes + ASCII)")
        if self.dtype not in ("f32", "f16"):
            raise ValueError(f"dtype must be 'f32' or 'f16', got {self.dtype!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


PRESETS: dict[str, TestModelSpec] = {
    # ~10 MB: unit tests. GQA (4 heads share 2 KV heads) so the fit code sees it.
    "tiny": TestModelSpec(name="agent-machine-tiny"),
    # ~300 MB: benchmarks. GPT-2-small width and depth, f16 like a real release.
    "small": TestModelSpec(
        name="agent-machine-small", n_layer=12, n_embd=768, n_head=12, n_head_kv=4,
        n_ff=3072, n_ctx_train=4096, n_vocab=32000, dtype="f16",
    ),
}

# A ChatML-style template so chat requests go through the model's own template,
# as with a real release (llama-cpp-python renders it with Jinja2).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_SPECIAL = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2 as in llama's vocabulary
_PRINTABLE = [c for c in string.printable if c not in string.whitespace] + [" "]
MIN_VOCAB = len(_SPECIAL) + 256 + 100


def spec_for(preset: str = "tiny", **overrides: Any) -> TestModelSpec:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    unknown = set(overrides) - set(asdict(PRESETS[preset]))
    if unknown:
        raise ValueError(f"unknown model parameter(s): {', '.join(sorted(unknown))}")
    spec = replace(PRESETS[preset], **overrides)
    spec.validate()
    return spec


def build_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    """A byte-fallback SentencePiece vocabulary of exactly ``n_vocab`` pieces.

    Layout: ``<unk> <s> </s>``, the 256 byte pieces, single printable characters
    (with and without the word mark), then lowercase letter n-grams with and
    without the word mark until the size is reached. Scores decrease with the
    id so that llama.cpp's SPM merge prefers longer, earlier pieces; every
    multi-character piece is reachable by merging two shorter ones.
    """
    tokens: list[str] = list(_SPECIAL)
    types: list[int] = [2, 3, 3]  # UNKNOWN, CONTROL, CONTROL (gguf.TokenType)
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256  # BYTE
    seen = set(tokens)

    def pieces() -> Iterator[str]:
        yield WORD_MARK
        for ch in _PRINTABLE:
            yield ch.replace(" ", WORD_MARK)
        for ch in _PRINTABLE:
            yield WORD_MARK + ch
        letters = string.ascii_lowercase
        for length in itertools.count(2):
            for combo in itertools.product(letters, repeat=length):
                word = "".join(combo)
                yield word
                yield WORD_MARK + word

    for piece in pieces():
        if len(tokens) >= n_vocab:
            break
        if piece in seen:
            continue
        seen.add(piece)
        tokens.append(piece)
        types.append(1)  # NORMAL
    # Longer pieces first in merge priority, within a length the earlier id wins.
    scores = [0.0] * len(_SPECIAL) + [0.0] * 256
    scores += [float(len(t)) * 1000.0 - i * 1e-3 for i, t in enumerate(tokens[len(scores):])]
    return tokens, scores, types


def _tensor_plan(spec: TestModelSpec) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, numpy shape, kind) in file order. numpy shapes are GGUF's reversed."""
    e, f, v, hd = spec.n_embd, spec.n_ff, spec.n_vocab, spec.head_dim
    plan: list[tuple[str, tuple[int, ...], str]] = [("token_embd.weight", (v, e), "matrix")]
    for i in range(spec.n_layer):
        p = f"blk.{i}"
        plan += [
            (f"{p}.attn_norm.weight", (e,), "norm"),
            (f"{p}.attn_q.weight", (spec.n_head * hd, e), "matrix"),
            (f"{p}.attn_k.weight", (spec.n_head_kv * hd, e), "matrix"),
            (f"{p}.attn_v.weight", (spec.n_head_kv * hd, e), "matrix"),
            (f"{p}.attn_output.weight", (e, spec.n_head * hd), "matrix"),
            (f"{p}.ffn_norm.weight", (e,), "norm"),
            (f"{p}.ffn_gate.weight", (f, e), "matrix"),
            (f"{p}.ffn_up.weight", (f, e), "matrix"),
            (f"{p}.ffn_down.weight", (e, f), "matrix"),
        ]
    plan += [("output_norm.weight", (e,), "norm"), ("output.weight", (v, e), "matrix")]
    return plan


def _tensor(spec: TestModelSpec, name: str, shape: tuple[int, ...], kind: str) -> np.ndarray:
    if kind == "norm":
        return np.ones(shape, dtype=np.float32)  # 1-D tensors stay f32, as llama.cpp expects
    # A per-tensor seed keeps every tensor independent of generation order.
    digest = hashlib.sha256(f"{spec.seed}:{name}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    std = 1.0 / np.sqrt(shape[-1])  # keeps activations O(1) through the stack
    data = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    return data.astype(np.float16) if spec.dtype == "f16" else data


def estimated_size(spec: TestModelSpec) -> int:
    """File size in bytes, within the header's few KiB."""
    width = 2 if spec.dtype == "f16" else 4
    total = 0
    for _, shape, kind in _tensor_plan(spec):
        total += int(np.prod(shape)) * (4 if kind == "norm" else width)
    return total


def create_test_model(out: str | os.PathLike[str], preset: str = "tiny", *, chat_template: str | None = None,
                      **overrides: Any) -> Path:
    """Write a random-weight llama GGUF to ``out`` and return its path.

    ``overrides`` are `TestModelSpec` fields (``n_layer``, ``n_embd``, ``n_head``,
    ``n_head_kv``, ``n_ff``, ``n_ctx_train``, ``n_vocab``, ``dtype``, ``seed``,
    ``name``...). If ``out`` is a directory the file is ``<dir>/<name>.gguf``.
    ``chat_template`` replaces the default `CHAT_TEMPLATE` (e.g. a real model's,
    to test its tool-call format on a model that loads in milliseconds).
    """
    import gguf

    spec = spec_for(preset, **overrides)
    out = Path(out)
    if out.is_dir():
        out = out / f"{spec.name}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    tokens, scores, types = build_vocab(spec.n_vocab)
    plan = _tensor_plan(spec)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_name(spec.name)
        writer.add_description("random weights generated by agent-machine for tests; not a language model")
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if spec.dtype == "f16" else gguf.LlamaFileType.ALL_F32)
        writer.add_context_length(spec.n_ctx_train)
        writer.add_embedding_length(spec.n_embd)
        writer.add_block_count(spec.n_layer)
        writer.add_feed_forward_length(spec.n_ff)
        writer.add_head_count(spec.n_head)
        writer.add_head_count_kv(spec.n_head_kv)
        writer.add_rope_dimension_count(spec.head_dim)
        writer.add_rope_freq_base(spec.rope_freq_base)
        writer.add_layer_norm_rms_eps(spec.rms_eps)
        writer.add_vocab_size(spec.n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_unk_token_id(0)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_chat_template(CHAT_TEMPLATE if chat_template is None else chat_template)
        width = np.float16 if spec.dtype == "f16" else np.float32
        for name, shape, kind in plan:
            dtype = np.dtype(np.float32 if kind == "norm" else width)
            writer.add_tensor_info(name, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, shape, kind in plan:
            writer.write_tensor_data(_tensor(spec, name, shape, kind))
        assert writer.fout is not None
        for handle in writer.fout:
            handle.flush()
            os.fsync(handle.fileno())
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return out

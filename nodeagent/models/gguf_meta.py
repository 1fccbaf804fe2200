"""Read the facts the node needs from a GGUF file's header.

Only the header and tensor index are read (the reader memory-maps the file),
so this is cheap even for a large model. Everything the memory fit needs is
here: layer count, heads, KV heads, head sizes, widths, vocabulary, context
length, and the byte size of every tensor grouped per repeating layer (for a
split between CPU and GPU).

Bad input raises `GGUFError` whose message names the file and what is wrong:
not a GGUF file, truncated (a tensor's data runs past the end of the file),
an architecture llama.cpp does not know, or a missing required key.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


class GGUFError(ValueError):
    """The file is not a usable GGUF model; the message says why."""


@dataclass(frozen=True)
class GGUFMeta:
    """What the node knows about a model without loading it.

    Invariant: ``weights_bytes == sum(layer_bytes) + non_layer_bytes`` and
    ``len(layer_bytes) == n_layer``.
    """

    architecture: str
    name: str | None
    file_type: str  # F32, F16, Q4_K_M... (from general.file_type, else the dominant tensor type)
    parameters: int  # number of weights (elements of every tensor)
    n_layer: int
    n_embd: int
    n_ff: int | None
    n_head: int
    n_head_kv: int
    head_dim_k: int  # key size per head
    head_dim_v: int  # value size per head
    context_length: int  # n_ctx_train
    vocab_size: int
    weights_bytes: int
    layer_bytes: list[int] = field(default_factory=list)  # per repeating layer blk.N
    non_layer_bytes: int = 0
    output_bytes: int = 0  # output.weight + output_norm (go to the GPU with the last layer)
    token_embd_bytes: int = 0  # stays on the CPU in llama.cpp
    file_size: int = 0
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> tensor count
    chat_template: str | None = None

    @property
    def n_embd_k_gqa(self) -> int:
        return self.head_dim_k * self.n_head_kv

    @property
    def n_embd_v_gqa(self) -> int:
        return self.head_dim_v * self.n_head_kv

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def _scalar(reader: Any, key: str) -> Any:
    fld = reader.fields.get(key)
    if fld is None:
        return None
    value = fld.contents()
    if isinstance(value, list):  # an array value: first element is not what we want
        return value
    return value


def _int(reader: Any, key: str) -> int | None:
    value = _scalar(reader, key)
    if value is None:
        return None
    if isinstance(value, list):  # per-layer arrays (some archs): take the maximum
        return int(max(value)) if value else None
    return int(value)


def _check_magic(path: Path) -> int:
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(4)
    except FileNotFoundError:
        raise GGUFError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GGUFError(f"{path}: is a directory, not a GGUF file") from None
    except PermissionError:
        raise GGUFError(f"{path}: permission denied") from None
    if head != GGUF_MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (starts with {head!r}, expected b'GGUF')")
    return size


def read_gguf(path: str | os.PathLike[str]) -> GGUFMeta:
    """Parse ``path``'s header and tensor index. Raises `GGUFError` on bad input."""
    import gguf

    path = Path(path)
    size = _check_magic(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors...
        raise GGUFError(f"{path}: truncated or corrupt GGUF header ({type(exc).__name__}: {exc})") from None

    arch = _scalar(reader, "general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{path}: GGUF has no general.architecture key")
    known = set(gguf.MODEL_ARCH_NAMES.values())
    if arch not in known:
        raise GGUFError(f"{path}: unknown architecture {arch!r} (llama.cpp knows {len(known)}, e.g. llama, qwen2, gemma3)")

    def need(key: str) -> int:
        value = _int(reader, f"{arch}.{key}")
        if value is None:
            raise GGUFError(f"{path}: required key {arch}.{key} is missing")
        return value

    n_layer = need("block_count")
    n_embd = need("embedding_length")
    n_head = need("attention.head_count")
    n_head_kv = _int(reader, f"{arch}.attention.head_count_kv") or n_head
    head_dim_k = _int(reader, f"{arch}.attention.key_length") or (n_embd // n_head if n_head else 0)
    head_dim_v = _int(reader, f"{arch}.attention.value_length") or head_dim_k
    context_length = need("context_length")
    n_ff = _int(reader, f"{arch}.feed_forward_length")

    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab_size = _int(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens is not None else 0)

    layer_bytes = [0] * n_layer
    non_layer = output_bytes = embd_bytes = parameters = 0
    tensor_types: dict[str, int] = {}
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise GGUFError(f"{path}: truncated: tensor {tensor.name} needs bytes up to {end}, file has {size}")
        nbytes = int(tensor.n_bytes)
        parameters += int(tensor.n_elements)
        tensor_types[tensor.tensor_type.name] = tensor_types.get(tensor.tensor_type.name, 0) + 1
        match = _BLOCK_RE.match(tensor.name)
        if match and int(match.group(1)) < n_layer:
            layer_bytes[int(match.group(1))] += nbytes
        else:
            non_layer += nbytes
            if tensor.name.startswith("output"):
                output_bytes += nbytes
            elif tensor.name.startswith("token_embd"):
                embd_bytes += nbytes
    if not reader.tensors:
        raise GGUFError(f"{path}: GGUF has no tensors (a vocabulary-only file is not a model)")

    file_type_id = _int(reader, "general.file_type")
    try:
        file_type = gguf.LlamaFileType(file_type_id).name.removeprefix("MOSTLY_").removeprefix("ALL_") if file_type_id is not None else None
    except ValueError:
        file_type = None
    if file_type is None:
        file_type = max(tensor_types, key=tensor_types.__getitem__)

    name = _scalar(reader, "general.name")
    template = _scalar(reader, "tokenizer.chat_template")
    return GGUFMeta(
        architecture=arch,
        name=name if isinstance(name, str) else None,
        file_type=file_type,
        parameters=parameters,
        n_layer=n_layer,
        n_embd=n_embd,
        n_ff=n_ff,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        context_length=context_length,
        vocab_size=vocab_size,
        weights_bytes=sum(layer_bytes) + non_layer,
        layer_bytes=layer_bytes,
        non_layer_bytes=non_layer,
        output_bytes=output_bytes,
        token_embd_bytes=embd_bytes,
        file_size=size,
        tensor_types=dict(sorted(tensor_types.items())),
        chat_template=template if isinstance(template, str) else None,
    )


@dataclass(frozen=True)
class ChatFacts:
    """What rendering a model's chat template needs from its GGUF."""

    chat_template: str | None
    bos_token: str
    eos_token: str


def read_chat_facts(path: str | os.PathLike[str]) -> ChatFacts:
    """The chat template and the BOS/EOS token texts (templates write them themselves).

    Walks the header's key/value section only, skipping arrays by their
    lengths: gguf's reader materialises the whole vocabulary and merges
    (~100k strings), seconds for a 49k-token model; this takes milliseconds.
    """
    path = Path(path)
    _check_magic(path)
    wanted = {"tokenizer.chat_template", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"}
    values: dict[str, Any] = {}
    token_texts: dict[int, str] = {}
    try:
        with open(path, "rb") as handle:
            reader = _KVReader(handle)
            reader.skip(8)  # magic, version
            reader.u64()  # tensor count
            for _ in range(reader.u64()):
                key = reader.string()
                kind = reader.u32()
                if key == "tokenizer.ggml.tokens" and kind == _ARRAY:
                    token_texts = reader.string_array_prefix(64)  # BOS/EOS ids are small
                elif key in wanted:
                    values[key] = reader.value(kind)
                else:
                    reader.skip_value(kind)
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise GGUFError(f"{path}: truncated or corrupt GGUF header ({type(exc).__name__}: {exc})") from None
    template = values.get("tokenizer.chat_template")

    def text(key: str) -> str:
        index = values.get(key)
        return token_texts.get(index, "") if isinstance(index, int) else ""

    return ChatFacts(template if isinstance(template, str) else None,
                     text("tokenizer.ggml.bos_token_id"), text("tokenizer.ggml.eos_token_id"))


_ARRAY, _STRING = 9, 8
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}


class _KVReader:
    """Sequential reads of GGUF key/value data (little-endian, v2/v3 layout)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def skip(self, n: int) -> None:
        self._handle.seek(n, os.SEEK_CUR)

    def _unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        data = self._handle.read(size)
        if len(data) != size:
            raise ValueError("unexpected end of file")
        return struct.unpack(fmt, data)[0]

    def u32(self) -> int:
        return self._unpack("<I")

    def u64(self) -> int:
        return self._unpack("<Q")

    def string(self) -> str:
        n = self.u64()
        if n > 1 << 26:
            raise ValueError(f"a {n}-byte string in the header")
        data = self._handle.read(n)
        if len(data) != n:
            raise ValueError("unexpected end of file")
        return data.decode("utf-8", "replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind in _SCALAR_FORMATS:
            return self._unpack(_SCALAR_FORMATS[kind])
        self.skip_value(kind)
        return None

    def skip_value(self, kind: int) -> None:
        if kind == _STRING:
            self.skip(self.u64())
        elif kind in _SCALAR_FORMATS:
            self.skip(struct.calcsize(_SCALAR_FORMATS[kind]))
        elif kind == _ARRAY:
            item, count = self.u32(), self.u64()
            if item == _STRING:
                for _ in range(count):
                    self.skip(self.u64())
            elif item in _SCALAR_FORMATS:
                self.skip(struct.calcsize(_SCALAR_FORMATS[item]) * count)
            else:
                for _ in range(count):
                    self.skip_value(item)
        else:
            raise ValueError(f"unknown GGUF value type {kind}")

    def string_array_prefix(self, keep: int) -> dict[int, str]:
        """Read a string array, keeping the first ``keep`` items."""
        item, count = self.u32(), self.u64()
        if item != _STRING:
            for _ in range(count):
                self.skip_value(item)
            return {}
        kept: dict[int, str] = {}
        for index in range(count):
            if index < keep:
                kept[index] = self.string()
            else:
                self.skip(self.u64())
        return kept

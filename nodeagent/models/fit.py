"""Memory fit: the bytes a model needs on each device before it is loaded.

``estimate`` mirrors what llama.cpp allocates for a model with a context:

* **weights** — the tensor bytes of the GGUF. With ``n_gpu_layers`` the last
  repeating layers live on the GPU (llama.cpp offloads from the top); when
  ``n_gpu_layers > n_layer`` the output layer follows them. The token
  embedding always stays on the CPU.
* **KV cache** — ``cells x layers x (n_embd_k_gqa + n_embd_v_gqa) x bytes per
  element``; llama.cpp pads the cell count to a multiple of 256.
* **compute buffer** — the peak of the worst-case graph llama.cpp reserves
  for one micro-batch of ``u = min(n_ctx, n_batch, n_ubatch)`` tokens. Without
  flash attention that is the larger of the attention stage (the
  ``n_kv x u x n_head`` f32 score matrix plus its mask, plus the per-token
  activations ``5 n_embd + 2 n_embd_kv``) and the output stage (the
  ``u x n_vocab`` f32 logits plus ``3 n_embd`` activations per token).
  These coefficients were fitted to llama.cpp's own ``compute buffer size``
  log lines (llama-cpp-python 0.3.36) and checked by ``bench/fit.py``.
* **overhead** — the logits output buffer (``n_vocab x 4`` per sequence) plus
  what a loaded model costs beyond its buffers (graph metadata, vocabulary
  tables, allocator slack): a fixed part and a part per vocabulary entry,
  both measured as worker RSS growth at load on llama-cpp-python 0.3.36, CPU
  (``bench/fit.py``: RSS at load vs weights + KV + overhead, within 1%).

Unified memory (Apple Silicon under Asahi, integrated GPUs) is one pool: the
caller charges every device's bytes to the same budget (see residency).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

from nodeagent.models.gguf_meta import GGUFMeta

MiB = 1 << 20
KV_PAD = 256  # llama.cpp pads the KV cell count to this multiple

# Bytes per element of the KV cache types llama.cpp accepts for -ctk/-ctv.
KV_TYPE_BYTES: dict[str, float] = {
    "f32": 4.0, "f16": 2.0, "bf16": 2.0,
    "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32, "iq4_nl": 18 / 32,
}

# Measured RSS beyond the reported buffers at load (see the module docstring).
FIXED_OVERHEAD_BYTES = 5 * MiB
OVERHEAD_PER_VOCAB_ENTRY = 160

DeviceRole = Literal["cpu", "gpu"]


@dataclass(frozen=True)
class DeviceFit:
    """Bytes one device must hold. ``total_bytes`` is what the budget is charged."""

    device_id: str
    role: DeviceRole
    memory_kind: str  # dedicated | unified | shared_system | unknown (system RAM: "system")
    weights_bytes: int
    kv_bytes: int
    compute_bytes: int
    overhead_bytes: int
    layers: int  # repeating layers placed here

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.compute_bytes + self.overhead_bytes


@dataclass(frozen=True)
class FitEstimate:
    n_ctx: int
    kv_cells: int
    n_parallel: int
    kv_type: str
    n_gpu_layers: int
    n_ubatch: int
    flash_attn: bool
    devices: list[DeviceFit] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(d.total_bytes for d in self.devices)

    def bytes_on(self, role: DeviceRole) -> int:
        return sum(d.total_bytes for d in self.devices if d.role == role)

    @property
    def processor(self) -> str:
        """As ``ollama ps``: ``100% CPU``, ``100% GPU`` or ``41%/59% CPU/GPU``."""
        total = self.total_bytes or 1
        cpu = round(100 * self.bytes_on("cpu") / total)
        if cpu >= 100:
            return "100% CPU"
        if cpu <= 0:
            return "100% GPU"
        return f"{cpu}%/{100 - cpu}% CPU/GPU"

    def to_dict(self) -> dict:
        return {
            "nCtx": self.n_ctx, "kvCells": self.kv_cells, "nParallel": self.n_parallel,
            "kvType": self.kv_type, "nGpuLayers": self.n_gpu_layers, "nUbatch": self.n_ubatch,
            "flashAttn": self.flash_attn, "totalBytes": self.total_bytes, "processor": self.processor,
            "devices": [
                {"deviceId": d.device_id, "role": d.role, "memoryKind": d.memory_kind, "layers": d.layers,
                 "weightsBytes": d.weights_bytes, "kvBytes": d.kv_bytes, "computeBytes": d.compute_bytes,
                 "overheadBytes": d.overhead_bytes, "totalBytes": d.total_bytes}
                for d in self.devices
            ],
        }


def kv_cells(n_ctx: int) -> int:
    return -(-max(n_ctx, 1) // KV_PAD) * KV_PAD


def kv_bytes_per_layer(meta: GGUFMeta, cells: int, kv_type: str) -> int:
    per_elem = KV_TYPE_BYTES[kv_type]
    return int(cells * (meta.n_embd_k_gqa + meta.n_embd_v_gqa) * per_elem)


def compute_bytes(meta: GGUFMeta, cells: int, ubatch: int, *, with_output: bool = True,
                  flash_attn: bool = False) -> int:
    """Peak of the worst-case graph for one micro-batch (see module docstring)."""
    per_token_act = 5 * meta.n_embd + 2 * meta.n_embd_k_gqa
    if flash_attn:
        # Flash attention never materialises the score matrix; only the mask (f16) stays.
        attention = ubatch * (cells * 2 + per_token_act * 4)
    else:
        attention = ubatch * (cells * 4 * (meta.n_head + 1) + per_token_act * 4)
    output = ubatch * (meta.vocab_size + 3 * meta.n_embd) * 4 if with_output else ubatch * meta.n_embd * 4 * 2
    return max(attention, output)


def process_overhead_bytes(meta: GGUFMeta) -> int:
    return FIXED_OVERHEAD_BYTES + OVERHEAD_PER_VOCAB_ENTRY * meta.vocab_size


def estimate(
    meta: GGUFMeta,
    n_ctx: int,
    n_parallel: int = 1,
    kv_type: str = "f16",
    *,
    n_gpu_layers: int = 0,
    gpu_device_id: str = "gpu",
    gpu_memory_kind: str = "dedicated",
    cpu_device_id: str = "cpu",
    n_batch: int = 512,
    n_ubatch: int = 512,
    flash_attn: bool = False,
) -> FitEstimate:
    """Bytes per device for ``meta`` with an ``n_ctx``-token context.

    ``n_gpu_layers`` 0 is CPU only; ``n_layer + 1`` or more offloads everything
    llama.cpp offloads (all layers and the output layer). The CPU/GPU split of
    the compute buffer is a model, not yet checked on a GPU (none on the
    machines this was built on).
    """
    if n_ctx < 1:
        raise ValueError(f"context length must be >= 1, got {n_ctx}")
    if n_parallel < 1:
        raise ValueError(f"parallel sequences must be >= 1, got {n_parallel}")
    if kv_type not in KV_TYPE_BYTES:
        raise ValueError(f"unknown KV cache type {kv_type!r}; choose one of {', '.join(KV_TYPE_BYTES)}")
    if n_gpu_layers < 0:
        raise ValueError("n_gpu_layers must be >= 0")

    cells = kv_cells(n_ctx)
    ubatch = min(n_ctx, n_batch, n_ubatch)
    gpu_layers = min(n_gpu_layers, meta.n_layer)
    output_on_gpu = n_gpu_layers > meta.n_layer
    first_gpu_layer = meta.n_layer - gpu_layers

    kv_layer = kv_bytes_per_layer(meta, cells, kv_type)
    cpu_weights = sum(meta.layer_bytes[:first_gpu_layer]) + meta.non_layer_bytes
    gpu_weights = sum(meta.layer_bytes[first_gpu_layer:])
    if output_on_gpu:
        cpu_weights -= meta.output_bytes
        gpu_weights += meta.output_bytes

    output_buffer = meta.vocab_size * 4 * n_parallel
    devices = []
    cpu_compute = compute_bytes(meta, cells, ubatch, with_output=not output_on_gpu, flash_attn=flash_attn)
    if gpu_layers == meta.n_layer and output_on_gpu:
        cpu_compute = ubatch * meta.n_embd * 4 * 2  # only the input embeddings stay on the CPU
    devices.append(DeviceFit(
        device_id=cpu_device_id, role="cpu", memory_kind="system",
        weights_bytes=cpu_weights, kv_bytes=kv_layer * first_gpu_layer,
        compute_bytes=cpu_compute, overhead_bytes=output_buffer + process_overhead_bytes(meta),
        layers=first_gpu_layer,
    ))
    if gpu_layers > 0:
        devices.append(DeviceFit(
            device_id=gpu_device_id, role="gpu", memory_kind=gpu_memory_kind,
            weights_bytes=gpu_weights, kv_bytes=kv_layer * gpu_layers,
            compute_bytes=compute_bytes(meta, cells, ubatch, with_output=output_on_gpu, flash_attn=flash_attn),
            overhead_bytes=0, layers=gpu_layers,
        ))
    return FitEstimate(
        n_ctx=n_ctx, kv_cells=cells, n_parallel=n_parallel, kv_type=kv_type, n_gpu_layers=n_gpu_layers,
        n_ubatch=ubatch, flash_attn=flash_attn, devices=devices,
    )


def sum_by_pool(fits: Sequence[DeviceFit], pool_of: dict[str, str]) -> dict[str, int]:
    """Total bytes per memory pool; devices sharing a pool (unified memory) add up."""
    pools: dict[str, int] = {}
    for fit in fits:
        pool = pool_of.get(fit.device_id, fit.device_id)
        pools[pool] = pools.get(pool, 0) + fit.total_bytes
    return pools

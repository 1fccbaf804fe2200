"""`ModelRecord` (a model in the content-addressed store) and `ModelResidency`
(where a model is right now: cold on disk, warm in page cache / RAM tier, hot
in a provider). Sizes are bytes; digests are ``sha256:<64 hex>``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from nodeagent.contracts.base import Contract, Resource

ResidencyState = Literal["cold", "warm", "hot"]


class GGUFInfo(Contract):
    """Facts read from the GGUF header (see nodeagent.models.gguf_meta)."""

    architecture: str
    name: str | None = None
    file_type: str  # F32, F16, Q4_K_M...
    parameters: int
    n_layer: int
    n_embd: int
    n_ff: int | None = None
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    context_length: int  # the context the model was trained for
    vocab_size: int
    weights_bytes: int
    layer_bytes: list[int] = Field(default_factory=list)
    non_layer_bytes: int = 0
    output_bytes: int = 0
    token_embd_bytes: int = 0
    tensor_types: dict[str, int] = Field(default_factory=dict)
    has_chat_template: bool = False


class ModelRecord(Resource):
    kind: Literal["ModelRecord"] = "ModelRecord"
    digest: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    names: list[str] = Field(default_factory=list)  # "name:tag" references to this digest
    format: Literal["gguf"] = "gguf"
    size_bytes: int
    path: str  # the blob in the store
    source_path: str | None = None  # where it was imported from
    imported_at: datetime
    gguf: GGUFInfo


class DeviceShare(Contract):
    device_id: str
    bytes: int


class ModelResidency(Resource):
    """One row of `agent-machine models ps` (and of the API's residency view)."""

    kind: Literal["ModelResidency"] = "ModelResidency"
    name: str | None = None
    digest: str
    state: ResidencyState
    provider: str | None = None  # provider instance holding it when hot
    size_bytes: int  # estimated resident bytes (weights + KV + compute)
    processor: str | None = None  # "100% CPU", "41%/59% CPU/GPU"
    context_length: int | None = None
    devices: list[DeviceShare] = Field(default_factory=list)
    pinned: bool = False
    in_use: int = 0  # requests running now
    keep_alive_s: float | None = None  # null: forever (-1); 0: unload when idle
    until: datetime | None = None  # when it unloads if still idle; null: never or in use
    loaded_at: datetime | None = None
    last_used_at: datetime | None = None
    load_seconds: float | None = None  # measured time of the last load

"""`ProviderSpec` and `ProviderStatus`: one inference engine instance, how it is
launched, and what state it is in.

A `ProviderSpec` is *resolved*: the catalog (``providers/*.toml``) and the
operator's choices have already been turned into an image or executable, the
engine's argv, mounts, devices and labels, for one launch mode. The launchers
(`nodeagent.launch`) render it mechanically, so the same spec gives the same
unit or command line every time, and a written unit can be parsed and compared
with the spec it came from.

Invariants (checked on validation):
* container modes (``podman``, ``quadlet``) carry ``image`` and ``container_port``;
  ``subprocess`` carries ``executable``;
* the API is bound to loopback only (``host`` is 127.0.0.1 or ::1): providers
  are reached through the agent, never directly from the network;
* every mount of the model is read-only.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal

from pydantic import Field, field_validator, model_validator

from nodeagent.contracts.base import Contract, Resource

Accelerator = Literal["cpu", "nvidia", "amd", "vulkan", "asahi"]
ACCELERATORS: tuple[str, ...] = ("cpu", "nvidia", "amd", "vulkan", "asahi")
LaunchMode = Literal["subprocess", "podman", "quadlet"]
LAUNCH_MODES: tuple[str, ...] = ("subprocess", "podman", "quadlet")
ProviderKind = Literal["llama_cpp_python", "llama_server", "vllm"]
PullPolicy = Literal["missing", "never", "always", "newer"]

NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
LOOPBACK_HOSTS = ("127.0.0.1", "::1")


class CacheCapabilities(Contract):
    """What the engine can do with KV state, as the scheduler needs to know it."""

    slot_save_restore: bool = False  # state to a file and back (llama-server slots, llama-cpp-python)
    prefix_caching: bool = False  # reuses a cached prompt prefix inside the engine (T0)
    kv_offload: bool = False  # engine-managed KV offload to host RAM/disk


class ModelRef(Contract):
    path: str  # on the host: a GGUF file (llama.cpp) or a model directory (vLLM)
    digest: str | None = None  # sha256:<hex> of the model, when known
    name: str | None = None  # a readable name; defaults to the file name


class MountSpec(Contract):
    source: str  # host path
    target: str  # path inside the container
    read_only: bool = True


class DeviceSpec(Contract):
    """A device handed to the container: a host path or a CDI name."""

    source: str  # /dev/dri, /dev/kfd, nvidia.com/gpu=all
    # Optional devices are skipped when absent (Quadlet's "-" prefix). A CDI
    # device is never optional: "-nvidia.com/gpu=all" silently drops the GPU.
    optional: bool = False

    @model_validator(mode="after")
    def _cdi_not_optional(self) -> "DeviceSpec":
        if self.optional and not self.source.startswith("/"):
            raise ValueError(f"CDI device {self.source!r} cannot be optional (it would be dropped silently)")
        return self


class HealthSpec(Contract):
    path: str = "/health"  # HTTP path the agent polls
    # Run inside the container by Podman (exec form, no shell). None: the image
    # has no tool to run one; the agent's own HTTP polling still applies.
    command: list[str] | None = None
    interval_s: int = Field(default=30, ge=1)
    timeout_s: int = Field(default=5, ge=1)
    start_period_s: int = Field(default=600, ge=0)  # model load time allowed before failures count
    retries: int = Field(default=3, ge=1)
    on_failure: Literal["none", "kill", "restart", "stop"] = "kill"


class ProviderSpec(Resource):
    kind: Literal["ProviderSpec"] = "ProviderSpec"
    name: str  # unique on the node; the container / unit / process name
    provider: str  # catalog entry: llama-server, vllm, llama-cpp-python
    provider_kind: ProviderKind
    mode: LaunchMode
    accelerator: Accelerator = "cpu"
    model: ModelRef
    image: str | None = None
    pull: PullPolicy = "missing"
    executable: str | None = None
    args: list[str] = Field(default_factory=list)  # engine argv after the executable / image entrypoint
    env: dict[str, str] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)  # on the host
    container_port: int | None = Field(default=None, ge=1, le=65535)
    mounts: list[MountSpec] = Field(default_factory=list)
    devices: list[DeviceSpec] = Field(default_factory=list)
    group_add: list[str] = Field(default_factory=list)
    ipc_host: bool = False
    shm_size: str | None = None
    security_label_disable: bool = True
    drop_all_capabilities: bool = True
    no_new_privileges: bool = True
    health: HealthSpec = Field(default_factory=HealthSpec)
    metrics_path: str | None = None
    slot_save_dir: str | None = None  # on the host; mounted into containers
    start_timeout_s: int = Field(default=900, ge=1)  # covers image pull + model load
    stop_timeout_s: int = Field(default=30, ge=1)
    labels: dict[str, str] = Field(default_factory=dict)
    capabilities: CacheCapabilities = Field(default_factory=CacheCapabilities)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(
                f"name {value!r} must be 1-63 characters of a-z 0-9 _ . - starting with a letter or digit"
            )
        return value

    @field_validator("host")
    @classmethod
    def _loopback(cls, value: str) -> str:
        if value not in LOOPBACK_HOSTS:
            raise ValueError(f"host {value!r}: providers listen on loopback only ({', '.join(LOOPBACK_HOSTS)})")
        return value

    @model_validator(mode="after")
    def _mode_fields(self) -> "ProviderSpec":
        if self.mode in ("podman", "quadlet"):
            if not self.image:
                raise ValueError(f"mode {self.mode} needs an image")
            if self.container_port is None:
                raise ValueError(f"mode {self.mode} needs container_port")
            model_mounts = [m for m in self.mounts if m.source == self.model.path]
            if any(not m.read_only for m in model_mounts):
                raise ValueError("the model must be mounted read-only")
        elif not self.executable:
            raise ValueError("mode subprocess needs an executable")
        return self

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


ProviderState = Literal["running", "starting", "unhealthy", "stopped", "failed", "unknown"]


class ProviderStatus(Resource):
    kind: Literal["ProviderStatus"] = "ProviderStatus"
    name: str
    provider: str
    mode: LaunchMode | Literal["attach"]  # attach: a server the node did not start (declared or adopted)
    state: ProviderState
    endpoint: str | None = None  # base URL on loopback
    pid: int | None = None  # subprocess mode
    container_id: str | None = None  # podman mode
    unit: str | None = None  # quadlet mode: the generated service name
    unit_path: str | None = None  # quadlet mode: the .container file written
    health: str | None = None  # last health detail: ok, loading, connection refused, ...
    image: str | None = None
    model_digest: str | None = None
    started_at: datetime | None = None
    checked_at: datetime
    last_healthy_at: datetime | None = None  # the last health check that passed
    reason: str | None = None  # why not running, in words a person can act on
    # A sequence context the node places turns on (the embedded worker, or one slot
    # of a llama-server replica): which, what it holds, and whether it is busy.
    replica: str | None = None  # the engine it is a slot of (llama-server), else itself
    slot: int | None = None
    held_tokens: int | None = None  # tokens of KV its context holds (T0)
    owner: str | None = None  # the narrowest cache scope in that context: public, <tenant>, <tenant>/<agent>
    busy: bool | None = None  # a turn runs or waits on it
    queued: int | None = None  # turns placed on it, the running one included

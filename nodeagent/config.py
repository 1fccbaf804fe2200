"""The node's configuration: one TOML file plus environment overrides.

Precedence, highest first: ``AGENT_MACHINE_<SECTION>_<KEY>`` environment
variables, the TOML file (``<config dir>/config.toml`` or ``AGENT_MACHINE_CONFIG``),
built-in defaults. `load_config` records where each value came from, so
`agent-machine config show` can say it. Unknown sections or keys are errors
that name them: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nodeagent.paths import Paths, resolve_paths


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ApiConfig(_Section):
    socket: str | None = None  # default: <runtime dir>/api.sock
    tcp: str | None = None  # "127.0.0.1:8377" enables TCP (requires a token)
    token_file: str | None = None  # file holding the admin bearer token (required for TCP)
    credentials_file: str | None = None  # tenant-bound tokens (`agent-machine tokens`); default <config>/credentials.toml
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    request_timeout_s: float = Field(default=600.0, gt=0)
    # GET /metrics without a token on TCP: a stock Prometheus or GAIE endpoint picker sends none.
    # It shows model and provider names and counts (docs/api.md "Metrics"); applies on reload.
    metrics_without_token: bool = False


class QueueConfig(_Section):
    max_pods: int = Field(default=64, ge=1)  # beyond this: 429 with Retry-After


class ModelsConfig(_Section):
    keep_alive: str = "5m"  # "-1" forever, "0" unload when idle
    max_loaded: int = Field(default=3, ge=1)
    reserve_bytes: int | None = Field(default=None, ge=0)  # kept free per memory pool (None: 10%)
    default: str | None = None  # model used by OpenAI requests that name none
    context: int = Field(default=4096, ge=64)  # context length providers load models with
    threads: int | None = Field(default=None, ge=1)  # llama.cpp threads per provider (None: its default)


class CacheConfig(_Section):
    block_tokens: int = Field(default=64, ge=1)
    ram_dir: str | None = None  # default: a tmpfs (/dev/shm or $XDG_RUNTIME_DIR)
    ram_budget_bytes: int = Field(default=2 << 30, ge=0)
    disk_budget_bytes: int = Field(default=20 << 30, ge=0)


class PolicyConfig(_Section):
    path: str | None = None  # admission policy TOML; configured-but-broken fails closed


class ReceiptsConfig(_Section):
    checkpoint_every: int = Field(default=128, ge=1)
    checkpoint_seconds: float = Field(default=60.0, gt=0)
    key_file: str | None = None  # default: <state>/keys/machine.key (or a systemd credential)


class ReconcileConfig(_Section):
    interval_s: float = Field(default=5.0, gt=0)


class ClusterConfig(_Section):
    """``[cluster]``: how the node shows itself to a Kubernetes fleet (docs/api.md, "Cluster").

    ``kv_events`` is the one line that turns on vLLM-format KV events: the ZMQ PUB
    endpoint ("" = off). Bound, unless ``kv_events_connect`` (then it connects, as
    a vLLM pod does to llm-d's central indexer). ``nfd_dir``: a features.d
    directory the daemon keeps the node's feature file current in ("" = off).
    """

    kv_events: str = ""  # e.g. "tcp://127.0.0.1:5557"; "" = no KV events
    kv_events_replay: str = ""  # ROUTER for missed batches; "" = the PUB port + 1 (tcp), none otherwise
    kv_events_connect: bool = False  # connect the PUB socket instead of binding it
    kv_events_pod: str = ""  # "<pod-ip>:<port>" in the topic kv@<pod>@<model>; "" = $POD_IP (or host):API port
    nfd_dir: str = ""  # e.g. "/etc/kubernetes/node-feature-discovery/features.d"; "" = off
    nfd_expiry_s: float = Field(default=3600.0, gt=0)  # the file's # +expiry-time, from each write


PROVIDER_KINDS = ("llama_cpp_python", "llama_server", "vllm")
LAUNCH_MODES = ("subprocess", "podman", "quadlet", "attach")


class GovernanceConfig(_Section):
    """[governance]: grants, activation decisions and storage evidence (docs/governance.md)."""

    issuer_keys: list[str] = Field(default_factory=list)  # PEM public keys of registries trusted to issue grants
    admin_key_file: str | None = None  # the node admin's grant key; default <state>/governance/admin-grant.key
    revocation_file: str | None = None  # revoked grant ids / sha256:<envelope digest>, one a line; unreadable: refuse all
    require_grants: bool = False  # true: a pod runs only under a valid grant for its tenant and agent
    require_pinned_images: bool = True  # a container provider starts only from an image pinned by digest


class ProviderDeclaration(_Section):
    """One ``[[providers]]`` table: the engines that serve one model (llama-swap's spirit).

    ``replicas`` engines of ``kind``, each with ``slots`` parallel sequence contexts
    of ``ctx_per_slot`` tokens; started by ``mode`` (``attach``: already running at
    ``urls``, one per replica). Checked against the model store and the memory fit
    when the node starts (`nodeagent.fleet`), with the field named on refusal.
    """

    model: str  # a model of the store (name[:tag] or digest prefix)
    kind: str = "llama_server"
    mode: str = "subprocess"
    name: str | None = None  # replicas are <name>-<i>; default: <model name>-<kind short>
    replicas: int = Field(default=1, ge=1, le=64)
    slots: int = Field(default=1, ge=1, le=256)  # parallel slots per replica (llama-server -np)
    ctx_per_slot: int = Field(default=4096, ge=64)  # context tokens of each slot
    threads: int | None = Field(default=None, ge=1)  # per replica
    gpu_layers: int | None = Field(default=None, ge=-1)  # -1: all
    device: str | None = None  # llama.cpp --device, e.g. "CUDA0"; vLLM: CUDA_VISIBLE_DEVICES
    args: list[str] = Field(default_factory=list)  # extra engine arguments
    load: str = "eager"  # eager: started with the node; on-demand: at the first pod for the model
    urls: list[str] = Field(default_factory=list)  # attach: one base URL per replica
    # attach: the directory the attached server's --slot-save-path names, on this host
    # (lets the node save and restore its slots; without it they are T0 only)
    slot_save_dir: str | None = None
    image: str | None = None  # podman / quadlet: the image (default: the catalog's)
    port: int | None = Field(default=None, ge=1024, le=65535)  # first port; replicas use consecutive ones
    # vllm: where its KV events are published, tcp://HOST:PORT (replica i: PORT + i). The node
    # subscribes and places by every prefix the engine holds; a launched vLLM is told to publish there.
    kv_events: str | None = None


class Config(_Section):
    api: ApiConfig = Field(default_factory=ApiConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    receipts: ReceiptsConfig = Field(default_factory=ReceiptsConfig)
    reconcile: ReconcileConfig = Field(default_factory=ReconcileConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    governance: GovernanceConfig = Field(default_factory=GovernanceConfig)
    # [[providers]]: declared engines per model; none declared: the default rule (`nodeagent.fleet`).
    providers: list[ProviderDeclaration] = Field(default_factory=list)


LIST_SECTIONS = ("providers",)  # arrays of tables, validated whole (no per-key environment overrides)


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    paths: Paths
    file: Path
    file_exists: bool
    sources: Mapping[str, str]  # "section.key" -> "default" | "file <path>" | "env NAME"


def _env_name(section: str, key: str) -> str:
    return f"AGENT_MACHINE_{section.upper()}_{key.upper()}"


def load_config(env: Mapping[str, str] | None = None, path: str | Path | None = None) -> LoadedConfig:
    env = os.environ if env is None else env
    paths = resolve_paths(env)
    file = Path(path or env.get("AGENT_MACHINE_CONFIG") or paths.config_file)
    data: dict[str, Any] = {}
    exists = file.is_file()
    if exists:
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {file}: {exc}") from exc
    elif path is not None or env.get("AGENT_MACHINE_CONFIG"):
        raise ConfigError(f"config file {file} does not exist")

    sources: dict[str, str] = {}
    for section_name in LIST_SECTIONS:
        given = data.get(section_name, [])
        if not isinstance(given, list) or not all(isinstance(item, dict) for item in given):
            raise ConfigError(f"config file {file}: {section_name} must be an array of tables ([[{section_name}]])")
        sources[section_name] = f"file {file}" if section_name in data else "default"
    for section_name, field in Config.model_fields.items():
        if section_name in LIST_SECTIONS:
            continue
        section_type = field.annotation
        given = data.get(section_name, {})
        if not isinstance(given, dict):
            raise ConfigError(f"config file {file}: [{section_name}] must be a table")
        for key in section_type.model_fields:  # type: ignore[union-attr]
            dotted = f"{section_name}.{key}"
            env_value = env.get(_env_name(section_name, key))
            if env_value is not None:
                given = {**given, key: env_value}
                sources[dotted] = f"env {_env_name(section_name, key)}"
            elif key in given:
                sources[dotted] = f"file {file}"
            else:
                sources[dotted] = "default"
        data[section_name] = given
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        origin = sources.get(where, f"file {file}")
        raise ConfigError(f"{where}: {first['msg']} (from {origin})") from exc
    return LoadedConfig(config=config, paths=paths, file=file, file_exists=exists, sources=sources)


def parse_duration(text: str) -> float | None:
    """'5m' -> 300.0, '90s', '2h', '0' -> 0.0, '-1' -> None (forever)."""
    text = text.strip()
    if text in ("-1", "-1s", "forever"):
        return None
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for suffix in ("ms", "s", "m", "h"):
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            break
    else:
        suffix, number = "s", text
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30s, 5m, 1h, 0, -1)") from None
    if value < 0:
        return None
    return value * units[suffix]

"""The provider catalog: one TOML file per backend in the top-level ``providers/``
folder, validated on load, and the resolution of an entry into a `ProviderSpec`.

An entry says how to run an engine: images per accelerator (pinned), the
executable for native runs, the command template, the container port, health
and metrics paths, and its cache capabilities. `resolve_spec` combines an entry
with the operator's choices (mode, accelerator, model, port, parameters) into
the resolved spec the launchers render.

Command templates use ``{placeholders}``: the entry's ``[params]`` plus the
built-ins `BUILTIN_PLACEHOLDERS`. ``[command.when]`` groups are emitted only
when their parameter has a non-empty value. Anything a template names that is
neither a parameter nor a built-in is a load error naming file and field.

Where the catalog is read from, first hit wins: ``$AGENT_MACHINE_PROVIDERS_DIR``,
``<config dir>/providers`` (operator overrides, whole files), the ``providers/``
folder next to the package (source checkout), ``/usr/share/agent-machine/providers``.
"""

from __future__ import annotations

import os
import re
import string
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from nodeagent.contracts.provider import (
    ACCELERATORS,
    CacheCapabilities,
    DeviceSpec,
    HealthSpec,
    ModelRef,
    MountSpec,
    ProviderSpec,
    PullPolicy,
)

ParamValue = str | int | float | bool

BUILTIN_PLACEHOLDERS = frozenset(
    {"model", "model_name", "listen_host", "listen_port", "slot_save_dir", "container_port", "health_path", "name"}
)

# Where files live inside a container (fixed so units stay readable).
CONTAINER_MODEL_DIR = "/models"
CONTAINER_SLOT_DIR = "/slots"

LABEL_PREFIX = "io.agent-machine."


class CatalogError(ValueError):
    """A catalog file is missing, unreadable or invalid; the message names file and field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AcceleratorEntry(_Strict):
    image: str | None = None
    command_prefix: list[str] = Field(default_factory=list)  # argv before the template (images without entrypoint)
    params: dict[str, ParamValue] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("image")
    @classmethod
    def _pinned(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if "@sha256:" in value:
            return value
        last = value.rsplit("/", 1)[-1]
        if ":" not in last:
            raise ValueError(f"image {value!r} has no tag; pin a version tag or an @sha256 digest")
        if last.rsplit(":", 1)[1] in ("latest", "main", "master", "nightly"):
            raise ValueError(f"image {value!r} is not pinned; use a version tag or an @sha256 digest")
        return value


class CommandTemplate(_Strict):
    args: list[str]
    when: dict[str, list[str]] = Field(default_factory=dict)


class HealthTemplate(_Strict):
    command: list[str] | None = None
    interval_s: int = Field(default=30, ge=1)
    timeout_s: int = Field(default=5, ge=1)
    start_period_s: int = Field(default=600, ge=0)
    retries: int = Field(default=3, ge=1)
    on_failure: Literal["none", "kill", "restart", "stop"] = "kill"


class CatalogEntry(_Strict):
    name: str
    kind: Literal["llama_cpp_python", "llama_server", "vllm"]
    description: str
    modes: list[Literal["subprocess", "podman", "quadlet"]]
    executable: str | None = None
    container_port: int | None = Field(default=None, ge=1, le=65535)
    health_path: str = "/health"
    metrics_path: str | None = None
    start_timeout_s: int = Field(default=900, ge=1)
    stop_timeout_s: int = Field(default=30, ge=1)
    ipc_host: bool = False
    shm_size: str | None = None
    capabilities: CacheCapabilities = Field(default_factory=CacheCapabilities)
    health: HealthTemplate = Field(default_factory=HealthTemplate)
    params: dict[str, ParamValue] = Field(default_factory=dict)
    command: CommandTemplate
    accelerators: dict[str, AcceleratorEntry]
    source: str = ""  # the file it came from (set by the loader)

    @field_validator("accelerators")
    @classmethod
    def _known_accelerators(cls, value: dict[str, AcceleratorEntry]) -> dict[str, AcceleratorEntry]:
        unknown = sorted(set(value) - set(ACCELERATORS))
        if unknown:
            raise ValueError(f"unknown accelerator(s) {unknown}; known: {list(ACCELERATORS)}")
        if not value:
            raise ValueError("at least one accelerator is needed")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "CatalogEntry":
        if not self.modes:
            raise ValueError("modes: at least one launch mode is needed")
        container = any(m in ("podman", "quadlet") for m in self.modes)
        if container:
            if self.container_port is None:
                raise ValueError("container_port: needed for podman/quadlet modes")
            missing = [a for a, e in self.accelerators.items() if not e.image]
            if missing:
                raise ValueError(f"accelerators.{missing[0]}.image: needed for podman/quadlet modes")
        if "subprocess" in self.modes and not self.executable:
            raise ValueError("executable: needed for subprocess mode")
        known = BUILTIN_PLACEHOLDERS | set(self.params)
        places: list[tuple[str, Sequence[str]]] = [("command.args", self.command.args)]
        places += [(f"command.when.{k}", v) for k, v in self.command.when.items()]
        if self.health.command:
            places.append(("health.command", self.health.command))
        for where, words in places:
            for word in words:
                for name in _placeholders(word):
                    if name not in known:
                        raise ValueError(f"{where}: unknown placeholder {{{name}}} in {word!r}; "
                                         f"known: {sorted(known)}")
        for key in self.command.when:
            if key not in known:
                raise ValueError(f"command.when.{key}: not a parameter or built-in")
        for acc, entry in self.accelerators.items():
            unknown = sorted(set(entry.params) - set(self.params))
            if unknown:
                raise ValueError(f"accelerators.{acc}.params: unknown parameter(s) {unknown}; "
                                 f"declare them in [params]")
        return self

    def image_for(self, accelerator: str) -> str | None:
        entry = self.accelerators.get(accelerator)
        return entry.image if entry else None


def _placeholders(word: str) -> list[str]:
    try:
        return [field for _, field, _, _ in string.Formatter().parse(word) if field is not None]
    except ValueError as exc:
        raise ValueError(f"bad template {word!r}: {exc}") from None


def _format_error(path: Path, exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, "):]
        # Whole-entry checks already start their message with the field they concern.
        lines.append(f"{path}: {where}: {message}" if where else f"{path}: {message}")
    return "\n".join(lines)


def load_entry(path: str | os.PathLike[str]) -> CatalogEntry:
    """Load and validate one catalog file. Raises `CatalogError` naming file and field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogError(f"{path}: no such catalog file") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{path}: not valid TOML: {exc}") from None
    try:
        entry = CatalogEntry.model_validate({**data, "source": str(path)})
    except ValidationError as exc:
        raise CatalogError(_format_error(path, exc)) from None
    if entry.name != path.stem:
        raise CatalogError(f"{path}: name: {entry.name!r} must match the file name {path.stem!r}")
    return entry


def default_catalog_dirs(env: Mapping[str, str] | None = None) -> list[Path]:
    env = os.environ if env is None else env
    dirs: list[Path] = []
    if env.get("AGENT_MACHINE_PROVIDERS_DIR"):
        return [Path(env["AGENT_MACHINE_PROVIDERS_DIR"])]
    from nodeagent.paths import resolve_paths

    try:
        dirs.append(resolve_paths(env).config_dir / "providers")
    except ValueError:
        pass
    dirs.append(Path(__file__).resolve().parents[2] / "providers")
    dirs.append(Path("/usr/share/agent-machine/providers"))
    return dirs


@dataclass(frozen=True)
class Catalog:
    entries: Mapping[str, CatalogEntry]

    def get(self, name: str) -> CatalogEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise CatalogError(f"no provider {name!r} in the catalog; known: {', '.join(sorted(self.entries))}") from None

    def names(self) -> list[str]:
        return sorted(self.entries)


def load_catalog(dirs: Sequence[str | os.PathLike[str]] | None = None) -> Catalog:
    """Load every ``*.toml`` in the given directories (earlier ones win per name).

    Any invalid file is an error (never skipped silently): a catalog that loads
    is a catalog whose every entry can be rendered.
    """
    search = [Path(d) for d in dirs] if dirs is not None else default_catalog_dirs()
    entries: dict[str, CatalogEntry] = {}
    problems: list[str] = []
    for directory in search:
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.toml")):
            if path.stem in entries:
                continue
            try:
                entries[path.stem] = load_entry(path)
            except CatalogError as exc:
                problems.append(str(exc))
    if problems:
        raise CatalogError("\n".join(problems))
    if not entries:
        raise CatalogError(f"no provider catalog found in {', '.join(str(d) for d in search)}")
    return Catalog(entries)


# ------------------------------------------------------------------ resolution
def _render_words(words: Sequence[str], values: Mapping[str, ParamValue]) -> list[str]:
    out = []
    for word in words:
        out.append(word.format_map({k: _param_text(v) for k, v in values.items()}))
    return out


def _param_text(value: ParamValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


LOAD_BYTES_PER_S = 100 * 1024 * 1024  # a slow disk; TimeoutStartSec must cover the model load


def _load_allowance_s(model: Path) -> int:
    """Extra start time for a large model: its size at a slow disk's speed."""
    try:
        size = model.stat().st_size if model.is_file() else sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    except OSError:
        return 0
    return int(size // LOAD_BYTES_PER_S)


def device_passthrough(accelerator: str, gpus: str = "all") -> tuple[list[DeviceSpec], list[str]]:
    """Devices and extra groups a container needs for ``accelerator``.

    NVIDIA goes through CDI (``nvidia.com/gpu=<uuid|index|all>``, never optional);
    Vulkan and Asahi need the DRM render nodes; ROCm needs ``/dev/kfd`` plus
    ``/dev/dri`` and the caller's supplementary groups (video, render) kept.
    """
    if accelerator == "nvidia":
        selectors = [s.strip() for s in gpus.split(",") if s.strip()] or ["all"]
        for selector in selectors:
            if not re.fullmatch(r"all|\d+|(GPU|MIG)-[0-9A-Za-z-]+", selector):
                raise ValueError(f"gpu selector {selector!r}: use all, an index, or a GPU-/MIG- UUID")
        return [DeviceSpec(source=f"nvidia.com/gpu={s}") for s in selectors], []
    if accelerator == "amd":
        return [DeviceSpec(source="/dev/kfd"), DeviceSpec(source="/dev/dri")], ["keep-groups"]
    if accelerator in ("vulkan", "asahi"):
        return [DeviceSpec(source="/dev/dri", optional=True)], []
    return [], []


def resolve_spec(
    entry: CatalogEntry,
    *,
    name: str,
    mode: str,
    model_path: str | os.PathLike[str],
    port: int,
    accelerator: str = "cpu",
    model_digest: str | None = None,
    model_name: str | None = None,
    params: Mapping[str, ParamValue] | None = None,
    slot_save_dir: str | os.PathLike[str] | None = None,
    gpus: str = "all",
    executable: str | None = None,
    image: str | None = None,
    pull: PullPolicy = "missing",
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    health_command: list[str] | None | Literal["catalog"] = "catalog",
    start_timeout_s: int | None = None,
) -> ProviderSpec:
    """Turn a catalog entry plus choices into a `ProviderSpec` for ``mode``.

    Raises `CatalogError` for a mode or accelerator the entry does not offer or
    a parameter it does not declare. ``image`` / ``executable`` override the
    catalog's (a locally built image, a binary outside PATH).
    """
    where = entry.source or entry.name
    if mode not in entry.modes:
        raise CatalogError(f"{where}: provider {entry.name} does not run in mode {mode!r} (modes: {entry.modes})")
    if accelerator not in entry.accelerators:
        raise CatalogError(f"{where}: provider {entry.name} has no accelerator {accelerator!r} "
                           f"(has: {', '.join(entry.accelerators)})")
    acc = entry.accelerators[accelerator]
    unknown = sorted(set(params or {}) - set(entry.params))
    if unknown:
        raise CatalogError(f"{where}: unknown parameter(s) {unknown} for {entry.name}; known: {sorted(entry.params)}")
    values: dict[str, ParamValue] = {**entry.params, **acc.params, **(params or {})}

    model = Path(model_path).expanduser().resolve()
    shown_name = model_name or model.name
    container = mode in ("podman", "quadlet")
    mounts: list[MountSpec] = []
    slot_dir_host = str(Path(slot_save_dir).expanduser().resolve()) if slot_save_dir else None
    if container:
        model_in = f"{CONTAINER_MODEL_DIR}/{model.name}"
        mounts.append(MountSpec(source=str(model), target=model_in, read_only=True))
        slot_in = CONTAINER_SLOT_DIR if slot_dir_host else ""
        if slot_dir_host:
            mounts.append(MountSpec(source=slot_dir_host, target=CONTAINER_SLOT_DIR, read_only=False))
        assert entry.container_port is not None  # guaranteed by CatalogEntry validation
        listen_host, listen_port = "0.0.0.0", entry.container_port
    else:
        model_in = str(model)
        slot_in = slot_dir_host or ""
        listen_host, listen_port = "127.0.0.1", port
    builtins: dict[str, ParamValue] = {
        "model": model_in,
        "model_name": shown_name,
        "listen_host": listen_host,
        "listen_port": listen_port,
        "slot_save_dir": slot_in,
        "container_port": entry.container_port or listen_port,
        "health_path": entry.health_path,
        "name": name,
    }
    values = {**values, **builtins}

    args = list(acc.command_prefix) if container else []
    args += _render_words(entry.command.args, values)
    for key, group in entry.command.when.items():
        if _param_text(values.get(key, "")) != "":
            args += _render_words(group, values)
    args += list(extra_args)

    devices, groups = device_passthrough(accelerator, gpus) if container else ([], [])
    if health_command == "catalog":
        health_cmd = _render_words(entry.health.command, values) if entry.health.command else None
    else:
        health_cmd = health_command
    health = HealthSpec(
        path=entry.health_path,
        command=health_cmd if container else None,
        interval_s=entry.health.interval_s,
        timeout_s=entry.health.timeout_s,
        start_period_s=entry.health.start_period_s,
        retries=entry.health.retries,
        on_failure=entry.health.on_failure,
    )
    labels = {
        f"{LABEL_PREFIX}managed": "true",
        f"{LABEL_PREFIX}name": name,
        f"{LABEL_PREFIX}provider": entry.name,
        f"{LABEL_PREFIX}accelerator": accelerator,
        f"{LABEL_PREFIX}model": shown_name,
        f"{LABEL_PREFIX}model-digest": model_digest or "unknown",
    }
    try:
        return ProviderSpec(
            name=name,
            provider=entry.name,
            provider_kind=entry.kind,
            mode=mode,  # type: ignore[arg-type]
            accelerator=accelerator,  # type: ignore[arg-type]
            model=ModelRef(path=str(model), digest=model_digest, name=shown_name),
            image=(image or acc.image) if container else None,
            pull=pull,
            executable=None if container else (executable or entry.executable),
            args=args,
            env={**acc.env, **(env or {})},
            port=port,
            container_port=entry.container_port if container else None,
            mounts=mounts,
            devices=devices,
            group_add=groups,
            ipc_host=entry.ipc_host and container,
            shm_size=entry.shm_size if container else None,
            health=health,
            metrics_path=entry.metrics_path,
            slot_save_dir=slot_dir_host,
            start_timeout_s=start_timeout_s or entry.start_timeout_s + _load_allowance_s(model),
            stop_timeout_s=entry.stop_timeout_s,
            labels=labels,
            capabilities=entry.capabilities,
        )
    except ValidationError as exc:
        raise CatalogError(_format_error(Path(where), exc)) from None

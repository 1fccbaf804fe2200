"""The providers the node runs for each model: declared in the config, or the default rule.

A ``[[providers]]`` table (`nodeagent.config.ProviderDeclaration`) says, for one
model, which engine serves it (``kind``), how it is started (``mode``), how many
replicas, how many parallel slots each, the context per slot, and whether it
starts with the node (``load = "eager"``) or at the first pod for the model.

`plan_fleet` checks the declarations against the model store, the launch
modes, the llama-server binary and the memory fit (replicas x slots x context)
before anything starts, and refuses a bad one with the field named
(``providers[1].slots: ...``). With nothing declared, `DEFAULT_RULE` applies.

`Fleet` runs the plan. A declared model is loaded through the residency
manager like any other (keep-alive, pinning, eviction by expected cost, the
memory fit of all its replicas); its loader starts the replicas (after the
pool's start gate) and adds one `ManagedProvider` per slot to the pool, so
placement chooses among slots; the handle it returns stops them on unload.
llama-server replicas launched outside the node (`agent-machine providers up`)
for a model of the store are adopted: attached, placed on, never stopped.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from nodeagent.config import LAUNCH_MODES, PROVIDER_KINDS, ProviderDeclaration
from nodeagent.execution.pool import ManagedProvider, ProviderPool, ProviderStart, SelfAddingHandle, model_name
from nodeagent.providers.base import ProviderError

log = logging.getLogger("agent_machine.fleet")

LOAD_WHEN = ("eager", "on-demand")
DEFAULT_SLOTS_MAX = 4
DEFAULT_RULE = (
    "none declared: a host with a GPU, or with >= 4 logical CPUs, that has a llama-server binary serves each "
    "model with one llama-server subprocess of min(4, CPUs / 2) slots (a GPU host: 4), each slot the node's "
    "context length, started at the first pod; any other host (fewer cores: batching buys little over one "
    "context, and a process and an HTTP hop cost) runs the embedded llama-cpp-python worker, one context per model"
)


class FleetError(ValueError):
    """A declaration the node refuses to start with; the message names the field."""


@dataclass(frozen=True)
class ModelFleet:
    """One declaration, checked: what the node starts for one model."""

    index: int  # position in [[providers]] (-1: the default rule)
    declaration: ProviderDeclaration
    record: Any  # the store's ModelRecord
    name: str  # replicas are <name>-<i>
    fit_bytes: int  # the memory fit of all replicas (system + devices)

    @property
    def replica_names(self) -> list[str]:
        return [f"{self.name}-{i}" for i in range(self.declaration.replicas)]


@dataclass(frozen=True)
class FleetPlan:
    rule: str  # which rule made the plan: "declared in <file>", and the default's outcome on this host
    models: tuple[ModelFleet, ...] = ()
    # Undeclared models: None runs the embedded worker (the residency loader's own);
    # else this declaration (its ``model`` is filled in per model).
    default: ProviderDeclaration | None = None

    def for_digest(self, digest: str) -> list[ModelFleet]:
        """The declarations of a model (several may serve one: e.g. replicas in different modes)."""
        return [m for m in self.models if m.record.digest == digest]


def _short(kind: str) -> str:
    return {"llama_server": "ls", "llama_cpp_python": "lcp", "vllm": "vllm"}[kind]


def _field(index: int, name: str) -> str:
    return f"providers[{index}].{name}"


def plan_fleet(declarations: Sequence[ProviderDeclaration], store: Any, *, budget_bytes: int | None,
               llama_server: Path | None, source: str = "the config") -> FleetPlan:
    """Check every declaration; raise `FleetError` naming the first bad field."""
    from nodeagent.models.fit import estimate

    models: list[ModelFleet] = []
    names: set[str] = set()
    digests: dict[str, int] = {}
    total = 0
    for index, decl in enumerate(declarations):
        if decl.kind not in PROVIDER_KINDS:
            raise FleetError(f"{_field(index, 'kind')}: {decl.kind!r} is not a provider kind "
                             f"({', '.join(PROVIDER_KINDS)})")
        if decl.mode not in LAUNCH_MODES:
            raise FleetError(f"{_field(index, 'mode')}: {decl.mode!r} is not a launch mode ({', '.join(LAUNCH_MODES)})")
        if decl.load not in LOAD_WHEN:
            raise FleetError(f"{_field(index, 'load')}: {decl.load!r}; use one of {', '.join(LOAD_WHEN)}")
        try:
            record = store.resolve(decl.model)
        except Exception as exc:
            raise FleetError(f"{_field(index, 'model')}: {decl.model!r} is not in the model store ({exc}); "
                             f"import it with `agent-machine models import`") from None
        earlier = digests.setdefault(record.digest, index)
        if earlier != index and declarations[earlier].kind != decl.kind:
            raise FleetError(f"{_field(index, 'kind')}: {decl.model!r} is served by {declarations[earlier].kind} "
                             f"already (providers[{earlier}]); one model's providers share one kind, so their "
                             f"saved states and tokenization agree")
        if decl.kind == "llama_cpp_python":
            if decl.mode != "subprocess":
                raise FleetError(f"{_field(index, 'mode')}: the embedded llama_cpp_python worker runs as a subprocess "
                                 f"of the node, not {decl.mode!r}")
            if decl.slots != 1:
                raise FleetError(f"{_field(index, 'slots')}: the embedded worker has one context; "
                                 f"use kind = \"llama_server\" for parallel slots")
        if decl.mode == "attach" and len(decl.urls) != decl.replicas:
            raise FleetError(f"{_field(index, 'urls')}: mode attach needs one URL per replica "
                             f"({decl.replicas} replica(s), {len(decl.urls)} URL(s))")
        if decl.mode != "attach" and decl.slot_save_dir:
            raise FleetError(f"{_field(index, 'slot_save_dir')}: only mode attach takes it (the node chooses "
                             f"the slot directory of the servers it starts)")
        if decl.mode != "attach" and decl.urls:
            raise FleetError(f"{_field(index, 'urls')}: only mode attach takes URLs (mode is {decl.mode!r})")
        if decl.kv_events is not None:
            _check_kv_events(index, decl)
        if decl.kind == "llama_server" and decl.mode == "subprocess" and llama_server is None:
            raise FleetError(f"{_field(index, 'mode')}: no llama-server binary found for a subprocess "
                             f"(set AGENT_MACHINE_LLAMA_SERVER, or run scripts/build-llama-server.sh)")
        name = decl.name or f"{model_name(record).split(':')[0]}-{_short(decl.kind)}"
        if decl.name is None and earlier != index:  # a second declaration of the model: told apart by its mode
            name = f"{name}-{decl.mode}"
        name = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.lower()).strip("-.") or "provider"
        if name in names:
            raise FleetError(f"{_field(index, 'name')}: {name!r} is used by another declaration")
        names.add(name)
        fit_bytes = 0
        if decl.mode != "attach":
            try:
                fit = estimate(store.meta(record), decl.slots * decl.ctx_per_slot, decl.slots)
            except ValueError as exc:
                raise FleetError(f"{_field(index, 'ctx_per_slot')}: {exc}") from None
            fit_bytes = fit.total_bytes * decl.replicas
            if record.gguf.context_length and decl.ctx_per_slot > record.gguf.context_length:
                raise FleetError(f"{_field(index, 'ctx_per_slot')}: {decl.ctx_per_slot} tokens is more than "
                                 f"{model_name(record)} was trained for ({record.gguf.context_length})")
        total += fit_bytes
        if budget_bytes is not None and total > budget_bytes:
            raise FleetError(
                f"{_field(index, 'slots')}: {decl.replicas} replica(s) x {decl.slots} slot(s) x "
                f"{decl.ctx_per_slot} tokens of {model_name(record)} need {_gib(fit_bytes)} "
                f"({_gib(total)} with the declarations before it), over the memory budget of {_gib(budget_bytes)}")
        models.append(ModelFleet(index, decl, record, name, fit_bytes))
    return FleetPlan(rule=f"declared in {source}" if models else "none declared", models=tuple(models))


def _check_kv_events(index: int, decl: ProviderDeclaration) -> None:
    where = _field(index, "kv_events")
    if decl.kind != "vllm":
        raise FleetError(f"{where}: only vLLM publishes KV events (kind is {decl.kind!r}); the node knows what "
                         f"its own llama.cpp contexts hold")
    if decl.mode not in ("subprocess", "attach"):
        raise FleetError(f"{where}: subscribing is for mode subprocess or attach (a {decl.mode} container would "
                         f"need the port published too)")
    host, port = kv_events_endpoint(decl.kv_events or "", 0)
    if not host or port + decl.replicas - 1 > 65535:
        raise FleetError(f"{where}: {decl.kv_events!r} is not tcp://HOST:PORT with a port for each of "
                         f"{decl.replicas} replica(s)")
    from nodeagent.kvevents import KVEventsUnavailable, require_zmq

    try:
        require_zmq()
    except KVEventsUnavailable as exc:
        raise FleetError(f"{where}: {exc}") from None


def kv_events_endpoint(declared: str, index: int) -> tuple[str, int]:
    """(host, port) of replica ``index``'s KV events under ``kv_events = "tcp://HOST:PORT"``:
    replica i publishes on PORT + i. ("", 0) when the value is not of that form."""
    rest = declared.removeprefix("tcp://")
    host, _, port = rest.rpartition(":")
    if declared == rest or not host or not port.isdigit() or not 0 < int(port) <= 65535:
        return "", 0
    return host, int(port) + index


_ANY_HOST = ("*", "0.0.0.0")  # kv_events on every interface: the engine binds "*", the node connects locally


def kv_events_subscribe_url(declared: str, index: int) -> str:
    """Where the node connects to read replica ``index``'s KV events."""
    host, port = kv_events_endpoint(declared, index)
    return f"tcp://{'127.0.0.1' if host in _ANY_HOST else host}:{port}"


def vllm_kv_events_args(declared: str, index: int) -> list[str]:
    """What tells replica ``index`` of a launched vLLM to publish its KV events where the
    node subscribes (vLLM's ``KVEventsConfig``, as ``vllm serve --kv-events-config`` takes it)."""
    host, port = kv_events_endpoint(declared, index)
    # Its events carry every prompt's tokens on an unauthenticated socket: bind where declared.
    bind = "*" if host in _ANY_HOST else host
    return ["--kv-events-config", json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                                              "endpoint": f"tcp://{bind}:{port}"})]


def default_rule(*, cpus: int, has_gpu: bool, llama_server: Path | None, context: int,
                 threads: int | None) -> tuple[ProviderDeclaration | None, str]:
    """`DEFAULT_RULE` on this host: the declaration undeclared models get (None: the
    embedded worker), and the rule as it applied, in words."""
    if llama_server is not None and (has_gpu or cpus >= 4):
        slots = DEFAULT_SLOTS_MAX if has_gpu else max(2, min(DEFAULT_SLOTS_MAX, cpus // 2))
        why = "a GPU" if has_gpu else f"{cpus} CPUs"
        decl = ProviderDeclaration(model="*", kind="llama_server", mode="subprocess", slots=slots,
                                   ctx_per_slot=context, threads=threads, load="on-demand",
                                   gpu_layers=-1 if has_gpu else 0)
        return decl, f"default for undeclared models: one llama-server of {slots} slots each ({why}, {llama_server})"
    why = "no llama-server binary" if llama_server is None else f"{cpus} CPUs, no GPU"
    return None, f"default for undeclared models: the embedded llama-cpp-python worker, one context ({why})"


def _gib(size: int) -> str:
    return f"{size / (1 << 30):.2f} GiB"


# ------------------------------------------------------------------ running
@dataclass
class FleetHandle(SelfAddingHandle):
    """What the residency manager holds for a loaded declared model: unloading stops its replicas."""

    name: str
    fleet: "Fleet"
    digest: str

    def unload(self) -> None:
        self.fleet.stop_model(self.digest)


@dataclass
class _Running:
    model: ModelFleet
    replicas: list[Any] = field(default_factory=list)  # LlamaServerReplica | provider


class Fleet:
    """Starts, adopts and stops the declared engines, and keeps their slots in the pool."""

    def __init__(self, plan: FleetPlan, pool: ProviderPool, *, state_dir: Path, launch: Any,
                 threads: int | None = None, catalog: Any = None, llama_server: Path | None = None) -> None:
        self.plan = plan
        self._defaults: dict[str, ModelFleet] = {}  # undeclared models under the default rule
        self._failures: dict[str, int] = {}  # digest -> eager starts failed in a row
        self._retry_at: dict[str, float] = {}  # digest -> time.time() of the next eager start
        self.pool = pool
        self.state_dir = Path(state_dir)
        self.launch = launch  # nodeagent.launch.manage.LaunchContext (registry under the state dir)
        self.threads = threads
        self.catalog = catalog
        self.llama_server = llama_server
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self.adopted: list[str] = []

    # ---------------------------------------------------------------- residency's loader
    def loader(self, fallback: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """A residency `Loader`: a declared model starts its fleet, any other ``fallback``."""
        def load(request: Any) -> Any:
            models = self.models_for(request.digest)
            if not models:
                self.pool.check_start(ProviderStart(model_digest=request.digest, model=request.name or request.digest,
                                                    kind="llama_cpp_python", mode="subprocess"))
                return fallback(request)
            self.start_models(models)
            return FleetHandle(models[0].name, self, request.digest)

        return load

    def models_for(self, digest: str, record: Any = None) -> list[ModelFleet]:
        """The declared fleet of a model, else the default rule's ([]: the embedded worker)."""
        models = self.plan.for_digest(digest)
        if models or self.plan.default is None:
            return models
        model = self._defaults.get(digest)
        if model is None and record is not None:
            name = "".join(c if c.isalnum() or c in "-_." else "-" for c in model_name(record).split(":")[0].lower())
            decl = self.plan.default.model_copy(update={"model": record.digest})
            model = ModelFleet(-1, decl, record, f"{name.strip('-.') or 'model'}-ls", 0)
            self._defaults[digest] = model
        return [model] if model is not None else []

    def kind_of(self, digest: str) -> str:
        """The provider kind a load of ``digest`` starts."""
        models = self.models_for(digest)
        if models:
            return models[0].declaration.kind
        return "llama_server" if self.plan.default is not None else "llama_cpp_python"

    def load_request_options(self, record: Any) -> dict[str, Any]:
        """LoadRequest fields for ``record`` when declared: slots, context, replicas, GPU layers."""
        models = [m for m in self.models_for(record.digest, record) if m.declaration.mode != "attach"]
        if not models:  # attached servers hold their memory outside this node's budget
            return {"replicas": 0} if self.models_for(record.digest, record) else {}
        # One LoadRequest stands for every replica: the largest one's fit, times all of them.
        decl = max((m.declaration for m in models), key=lambda d: d.slots * d.ctx_per_slot)
        return {"n_ctx": decl.slots * decl.ctx_per_slot, "n_parallel": decl.slots,
                "replicas": sum(m.declaration.replicas for m in models),
                "n_gpu_layers": max(0, decl.gpu_layers or 0)}

    # ---------------------------------------------------------------- start / stop
    def start_models(self, models: Sequence[ModelFleet]) -> None:
        """Start every replica of one model's declarations; on a failure, stop what started."""
        with self._lock:
            started: list[_Running] = []
            try:
                for model in models:
                    if model.name in self._running:
                        continue
                    running = _Running(model)
                    started.append(running)
                    for index, name in enumerate(model.replica_names):
                        running.replicas.append(self._start_replica(model, index, name))
            except Exception:
                for running in started:
                    for replica in running.replicas:
                        self._stop_replica(replica)
                    self._remove_slots(running)
                raise
            for running in started:
                self._running[running.model.name] = running

    def replicas(self, digest: str) -> list[Any]:
        """The running replicas of a model, every declaration's."""
        return [r for running in self._running.values() if running.model.record.digest == digest
                for r in running.replicas]

    def _start_replica(self, model: ModelFleet, index: int, name: str) -> Any:
        decl = model.declaration
        image = decl.image
        self.pool.check_start(ProviderStart(model_digest=model.record.digest, model=model_name(model.record),
                                            kind=decl.kind, mode=decl.mode, provider=name, image=image))
        if decl.kind == "llama_server":
            return self._start_llama_server(model, index, name)
        if decl.kind == "llama_cpp_python":
            return self._start_embedded(model, name)
        return self._start_vllm(model, index, name)

    def _start_llama_server(self, model: ModelFleet, index: int, name: str) -> Any:
        from nodeagent.providers.llama_server import LlamaServerProvider
        from nodeagent.providers.slots import LlamaServerReplica

        decl = model.declaration
        if decl.mode == "attach":
            server = LlamaServerProvider(name, decl.urls[index], slot_save_dir=decl.slot_save_dir)
        else:
            spec = self._spec(model, index, name)
            server = LlamaServerProvider.from_spec(spec, launcher=self.launch.launcher(decl.mode))
        replica = LlamaServerReplica(server, slots=decl.slots, mode=decl.mode,
                                     version=self._llama_server_version(decl))
        try:
            replica.start()
        except Exception as exc:
            server.close()
            raise ProviderError(f"{name}: could not start ({type(exc).__name__}: {exc})") from exc
        self._add_slots(replica, model.record.digest, decl.mode)
        log.info("fleet: %s (%s, %d slots) serves %s", name, decl.mode, decl.slots, model_name(model.record))
        return replica

    def _add_slots(self, replica: Any, digest: str, mode: str) -> None:
        """Each slot of a started replica as a candidate, once its rates are measured."""
        from nodeagent.providers.slots import SlotProvider

        try:  # its rates before its first turn: placement compares replicas from the start
            rates = replica.server.calibrate()
            log.info("fleet: %s prefill %.0f tok/s, decode %.1f tok/s (calibration)", replica.name,
                     rates.prefill_tokens_per_s or 0, rates.decode_tokens_per_s or 0)
        except ProviderError as exc:
            log.warning("fleet: %s: calibration failed (%s); rates come from its first turns", replica.name, exc)
        for slot in range(replica.slots):
            self.pool.add(ManagedProvider(SlotProvider(replica, slot), digest, launch_mode=mode,
                                          version=replica.version, group=replica.name))

    def _start_embedded(self, model: ModelFleet, name: str) -> Any:
        from nodeagent.providers.llama_cpp_python import LlamaCppPythonProvider, LlamaOptions

        decl = model.declaration
        provider = LlamaCppPythonProvider(
            name, model.record.path, model_digest=model.record.digest, model_name=model_name(model.record),
            options=LlamaOptions(n_ctx=decl.ctx_per_slot, n_threads=decl.threads or self.threads,
                                 n_gpu_layers=max(0, decl.gpu_layers or 0)))
        provider.start()
        self.pool.add(ManagedProvider(provider, model.record.digest, launch_mode="subprocess",
                                      version=_embedded_version(), group=name))
        return provider

    def _start_vllm(self, model: ModelFleet, index: int, name: str) -> Any:
        from nodeagent.providers.vllm import VllmProvider

        decl = model.declaration
        if decl.mode == "attach":  # running already: the node only checks that it answers
            provider = VllmProvider(name, decl.urls[index], served_model=model_name(model.record))
            health = provider.health()
            if not health.ok:
                provider.close()
                raise ProviderError(f"{name}: the vLLM server at {decl.urls[index]} is not healthy: {health.detail}")
        else:
            spec = self._spec(model, index, name)
            provider = VllmProvider.from_spec(spec, launcher=self.launch.launcher(decl.mode))
            provider.start()
        observed = None
        if decl.kv_events:
            from nodeagent.providers.vllm_events import KVEventSubscription

            try:
                observed = KVEventSubscription(kv_events_subscribe_url(decl.kv_events, index), name=name)
            except Exception:
                provider.stop()  # stops only what the node launched
                provider.close()
                raise
        self.pool.add(ManagedProvider(provider, model.record.digest, launch_mode=decl.mode,
                                      version=getattr(provider, "version", "vllm"), group=name, observed=observed))
        return provider

    def _spec(self, model: ModelFleet, index: int, name: str) -> Any:
        """A `ProviderSpec` for one replica, from the catalog entry of its kind."""
        from nodeagent.launch.subprocess import free_port
        from nodeagent.providers.catalog import load_catalog, resolve_spec

        decl = model.declaration
        catalog = self.catalog or load_catalog()
        entry = catalog.get({"llama_server": "llama-server", "vllm": "vllm"}[decl.kind])
        params: dict[str, Any] = {}
        extra = list(decl.args)
        if decl.kind == "llama_server":
            params = {"ctx_size": decl.slots * decl.ctx_per_slot, "parallel": decl.slots,
                      "gpu_layers": decl.gpu_layers if decl.gpu_layers is not None else 0}
            threads = decl.threads or self.threads
            if threads:
                extra += ["--threads", str(threads), "--threads-batch", str(threads)]
            if decl.device:
                extra += ["--device", decl.device]
        if decl.kind == "vllm" and decl.kv_events:
            extra += vllm_kv_events_args(decl.kv_events, index)
        port = decl.port + index if decl.port else free_port()
        slot_dir = self.state_dir / "slots" / name
        return resolve_spec(
            entry, name=name, mode=decl.mode, model_path=model.record.path, port=port,
            accelerator="nvidia" if decl.device and decl.device.lower().startswith("cuda") else "cpu",
            model_digest=model.record.digest, model_name=model_name(model.record),
            params=params, slot_save_dir=slot_dir if decl.kind == "llama_server" else None,
            executable=str(self.llama_server) if decl.mode == "subprocess" and self.llama_server else None,
            image=decl.image, extra_args=extra,
            # A declared image may be FROM scratch (no curl): the node polls /health itself.
            **({"health_command": None} if decl.image else {}),
        )

    def _llama_server_version(self, decl: ProviderDeclaration) -> str:
        if decl.mode == "attach":
            return "llama-server (attached)"
        if decl.mode in ("podman", "quadlet"):
            return f"llama-server image {decl.image or 'from the catalog'}"
        return f"llama-server {self.llama_server}" if self.llama_server else "llama-server"

    def stop_model(self, digest: str) -> None:
        with self._lock:
            stopping = [self._running.pop(name) for name, running in list(self._running.items())
                        if running.model.record.digest == digest]
        for running in stopping:
            for replica in running.replicas:
                self._stop_replica(replica)
            self._remove_slots(running)

    def _remove_slots(self, running: _Running) -> None:
        names = {r.name for r in running.replicas}
        for managed in self.pool.all():
            if managed.group in names:
                self.pool.remove(managed.name)

    @staticmethod
    def _stop_replica(replica: Any) -> None:
        try:
            replica.stop()
        except Exception as exc:  # stopping is best effort; the next start checks the port
            log.warning("fleet: stopping %s failed: %s", replica.name, exc)
        server = getattr(replica, "server", None)
        if server is not None:
            server.close()

    def close(self) -> None:
        for digest in {running.model.record.digest for running in list(self._running.values())}:
            self.stop_model(digest)

    # ---------------------------------------------------------------- adoption
    def adopt(self, launched: Sequence[tuple[Any, Any]], store: Any) -> list[str]:
        """Attach llama-server replicas `providers up` started for a model of the store.

        ``launched``: (LaunchRecord, ProviderStatus) pairs. The node places on
        their slots but never stops them (they are the operator's)."""
        from nodeagent.providers.llama_server import LlamaServerProvider
        from nodeagent.providers.slots import LlamaServerReplica

        adopted = []
        declared = {m.name for m in self.plan.models}
        for record, status in launched:
            spec = record.spec
            if spec.provider_kind != "llama_server" or status.state != "running" or spec.name in declared:
                continue
            digest = spec.model.digest
            try:
                model = store.resolve(digest) if digest else None
            except Exception:
                model = None
            if model is None or any(m.name.startswith(f"{spec.name}/") for m in self.pool.all()):
                continue
            slots = _flag_value(spec.args, "--parallel", "-np") or 1
            server = LlamaServerProvider(spec.name, spec.base_url, slot_save_dir=spec.slot_save_dir)
            replica = LlamaServerReplica(server, slots=slots, mode="attach",
                                         version=f"llama-server (adopted, {spec.mode})")
            try:
                replica.start()
            except ProviderError as exc:
                log.warning("fleet: not adopting %s: %s", spec.name, exc)
                server.close()
                continue
            self._add_slots(replica, model.digest, spec.mode)
            adopted.append(spec.name)
        self.adopted += adopted
        return adopted

    # ---------------------------------------------------------------- eager models
    def eager_due(self, loaded: set[str], now: float) -> list[ModelFleet]:
        """Declared ``load = "eager"`` models that are not loaded and whose retry is due."""
        due: dict[str, ModelFleet] = {}
        for m in self.plan.models:
            if m.declaration.load == "eager" and m.record.digest not in loaded \
                    and now >= self._retry_at.get(m.record.digest, 0.0):
                due.setdefault(m.record.digest, m)
        return list(due.values())

    def start_failed(self, model: ModelFleet, now: float, interval_s: float) -> float:
        """Back off after a failed eager start (interval x 2^failures, at most 5 minutes); the delay."""
        failures = self._failures.get(model.record.digest, 0) + 1
        self._failures[model.record.digest] = failures
        delay = min(300.0, interval_s * 2 ** failures)
        self._retry_at[model.record.digest] = now + delay
        return delay

    def started(self, model: ModelFleet) -> None:
        self._failures.pop(model.record.digest, None)
        self._retry_at.pop(model.record.digest, None)

    def replan(self, plan: FleetPlan) -> list[str]:
        """A reloaded config's plan (already checked): it applies to models loaded from now
        on; returns the running models whose declaration changed (they keep running as
        they are until unloaded)."""
        changed = [m.name for m in plan.models if m.name in self._running
                   and self._running[m.name].model.declaration != m.declaration]
        self.plan = plan
        self._defaults.clear()
        return changed

    # ---------------------------------------------------------------- view
    def describe(self) -> dict[str, Any]:
        """The rule and, per declared model, its replicas and whether they run (for `config show`, `models ps`)."""
        rows = []
        for model in list(self.plan.models) + list(self._defaults.values()):
            decl = model.declaration
            running = self._running.get(model.name)
            rows.append({
                "name": model.name, "model": model_name(model.record), "digest": model.record.digest,
                "kind": decl.kind, "mode": decl.mode, "replicas": decl.replicas, "slots": decl.slots,
                "ctxPerSlot": decl.ctx_per_slot, "load": decl.load, "declared": model.index >= 0,
                "running": [r.name for r in running.replicas] if running else [],
            })
        return {"rule": self.plan.rule, "declared": rows, "adopted": list(self.adopted)}


def _flag_value(args: Sequence[str], *flags: str) -> int | None:
    for i, arg in enumerate(args):
        if arg in flags and i + 1 < len(args):
            try:
                return int(args[i + 1])
            except ValueError:
                return None
    return None


def _embedded_version() -> str:
    try:
        from importlib.metadata import version

        return f"llama-cpp-python {version('llama-cpp-python')}"
    except Exception:
        return "llama-cpp-python"


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

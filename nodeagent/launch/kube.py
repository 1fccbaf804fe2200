"""Kubernetes manifests for the node agent: a DaemonSet per node, its declared providers, its storage,
and an `InferencePool` for the Gateway API Inference Extension. Rendering only: nothing is applied.

What `render` produces (target ``kubernetes``), in apply order:

* ``Namespace``;
* ``Secret`` ``<name>-token``: the admin bearer token of the TCP API (generated, or read from a file);
* ``ConfigMap`` ``<name>-config``: the agent's ``config.toml`` (TCP on 0.0.0.0 with the token, the
  declared providers in ``attach`` mode on their containers' loopback ports, KV events on, the NFD
  directory);
* ``DaemonSet`` ``<name>``: one agent per node, with
    - host paths for its state (``/var/lib/agent-machine``: SQLite, receipts, keys, the T2 tier), the
      T1 tier (``/dev/shm/agent-machine``, a tmpfs on the host, kept across agent restarts), the
      Unix socket (``/run/agent-machine``) and NFD's ``features.d`` (the agent keeps its feature file
      there, `nodeagent.probe.nfd`);
    - TopoLVM-backed volumes for models, the download cache and scratch: generic ephemeral volumes
      (``ephemeral.volumeClaimTemplate``, storage class ``topolvm-provisioner``), the way a DaemonSet
      gets a PVC of its node's local LVM per pod (a StatefulSet's claim templates cannot be pinned one
      per node); a claim lives as long as its pod;
    - each declared provider replica as a container of the same pod: the agent reaches it on
      loopback, saves and restores its slots through the slot directory they share, and both go
      when the node goes (a llama-server replica is one container, on its own port);
    - devices through device-plugin resources (``nvidia.com/gpu``, ``amd.com/gpu``; Vulkan and
      Asahi through a DRI resource named by ``dri_resource``, default the generic device plugin's
      ``squat.ai/dri``), or through CDI annotations (``cdi.k8s.io/<name>: nvidia.com/gpu=all``)
      with ``device_mode="cdi"``;
    - a minimal securityContext: no privilege escalation, every capability dropped, a read-only root
      filesystem, the runtime's default seccomp profile;
    - ``POD_IP`` from the downward API (the KV events' topic ``kv@<pod-ip>:<port>@<model>``);
* ``Service`` ``<name>``: the TCP API (bearer token) and the KV event ports;
* ``InferencePool`` (``inference.networking.k8s.io/v1``, GAIE's GA API): the agents' pods as one pool
  of model-server endpoints on the API port, picked by an Endpoint Picker named ``epp_name``
  (deployed from GAIE's chart, not here).

Target ``podman``: what ``podman kube play`` runs (Podman has no DaemonSet before 4.x releases and
never a Service or InferencePool): the ConfigMap, named-volume PVCs, and one ``Pod`` with the agent
and its providers. Images are pinned by digest where the catalog (or the local image store) knows one.

Sources: Kubernetes API reference (DaemonSet, generic ephemeral volumes, downward API); TopoLVM's
storage class ``topolvm-provisioner``; GAIE ``site-src/reference/spec.md`` (InferencePool v1:
``selector.matchLabels``, ``targetPorts`` (one), ``endpointPickerRef`` with ``port.number``).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

API_PORT = 8377
KV_EVENTS_PORT = 5557
KV_REPLAY_PORT = 5558
PROVIDER_BASE_PORT = 8080
STATE_DIR = "/var/lib/agent-machine"
CONFIG_DIR = "/etc/agent-machine"
TOKEN_DIR = "/etc/agent-machine-token"
RUNTIME_DIR = "/run/agent-machine"
CACHE_DIR = "/var/cache/agent-machine"
T1_HOST_DIR = "/dev/shm/agent-machine"
T1_DIR = "/var/lib/agent-machine-t1"
SCRATCH_DIR = "/var/tmp/agent-machine"
SLOT_DIR = "/var/lib/agent-machine/slots"
FEATURES_DIR = "/etc/kubernetes/node-feature-discovery/features.d"
INFERENCE_POOL_API = "inference.networking.k8s.io/v1"
DEVICE_RESOURCES = {"nvidia": "nvidia.com/gpu", "amd": "amd.com/gpu"}


class KubeRenderError(ValueError):
    """A choice the manifests cannot express; the message names the option."""


@dataclass(frozen=True)
class ProviderWorkload:
    """One declared provider replica as a container: what the agent attaches to."""

    name: str  # the replica's name (<declared name>-<i>)
    model: str
    kind: str
    image: str
    args: list[str]
    port: int
    slots: int


@dataclass(frozen=True)
class KubeOptions:
    name: str = "agent-machine"
    namespace: str = "agent-machine"
    image: str = "localhost/agent-machine:latest"
    target: Literal["kubernetes", "podman"] = "kubernetes"
    accelerator: str = "cpu"  # cpu | nvidia | amd | vulkan | asahi
    gpus: int = 1
    device_mode: Literal["resources", "cdi"] = "resources"
    dri_resource: str = "squat.ai/dri"
    storage_class: str = "topolvm-provisioner"
    models_size: str = "100Gi"
    cache_size: str = "20Gi"
    scratch_size: str = "20Gi"
    epp_name: str = "agent-machine-epp"
    epp_port: int = 9002
    token: str | None = None  # None: a fresh one
    token_path: str | None = None  # podman: the host file holding the token (bind-mounted; it keeps its 0600)
    kv_events: bool = True
    model_files: dict[str, str] = field(default_factory=dict)  # podman: model name -> host GGUF to import


def _labels(options: KubeOptions, component: str = "agent") -> dict[str, str]:
    return {"app.kubernetes.io/name": options.name, "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": "agent-machine"}


def _meta(options: KubeOptions, name: str, component: str = "agent", namespaced: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": _labels(options, component)}
    if namespaced and options.target == "kubernetes":
        meta["namespace"] = options.namespace
    return meta


# ---------------------------------------------------------------- providers
def provider_workloads(declarations: Sequence[Any], *, accelerator: str, digest_of: Any,
                       pin: Any = None) -> list[ProviderWorkload]:
    """Each declared llama-server or vLLM replica as a container; llama-cpp-python runs inside the
    agent (its worker is the agent's own subprocess) and becomes none. ``digest_of(model)`` is the
    model's store digest: a provider reads the blob by it (``models/blobs/sha256-<hex>``, the same
    in every store that imported the same file). ``pin(image) -> image`` pins a tag by digest when
    the local image store knows it."""
    from nodeagent.providers.catalog import load_catalog

    workloads: list[ProviderWorkload] = []
    port = PROVIDER_BASE_PORT
    catalog = None
    for index, decl in enumerate(declarations):
        if decl.kind == "llama_cpp_python":
            continue
        if decl.mode == "attach":
            continue  # already running elsewhere: the agent attaches to its URLs as declared
        catalog = catalog or load_catalog()
        entry = catalog.get("llama-server" if decl.kind == "llama_server" else "vllm")
        acc = entry.accelerators.get(accelerator) or entry.accelerators.get("cpu")
        image = decl.image or (acc.image if acc else None)
        if not image:
            raise KubeRenderError(f"providers[{index}].image: the catalog has no {entry.name} image for "
                                  f"{accelerator}; declare one")
        image = pin(image) if pin is not None else image
        base = decl.name or f"{decl.model.split(':')[0]}-{'ls' if decl.kind == 'llama_server' else 'vllm'}"
        for replica in range(decl.replicas):
            name = _dns_label(f"{base}-{replica}")
            model_file = f"{STATE_DIR}/models/blobs/{digest_of(index, decl.model).replace(':', '-')}"
            if decl.kind == "llama_server":
                args = [*(acc.command_prefix if acc else []), "--host", "127.0.0.1", "--port", str(port),
                        "--model", model_file, "--alias", decl.model, "--ctx-size", str(decl.slots * decl.ctx_per_slot),
                        "--parallel", str(decl.slots), "--metrics", "--slots", "--slot-save-path", SLOT_DIR]
                if decl.gpu_layers is not None:
                    args += ["--n-gpu-layers", str(decl.gpu_layers if decl.gpu_layers >= 0 else 999)]
                if decl.threads:
                    args += ["--threads", str(decl.threads)]
            else:
                args = ["--host", "127.0.0.1", "--port", str(port), "--model", model_file,
                        "--served-model-name", decl.model, "--max-model-len", str(decl.ctx_per_slot)]
            workloads.append(ProviderWorkload(name, decl.model, decl.kind, image, args + list(decl.args), port,
                                              decl.slots))
            port += 1
    return workloads


def _dns_label(text: str) -> str:
    import re

    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63].strip("-")
    if not label:
        raise KubeRenderError(f"{text!r} leaves no DNS label (a-z, 0-9, -)")
    return label


# ---------------------------------------------------------------- config
def agent_config(options: KubeOptions, declarations: Sequence[Any], workloads: Sequence[ProviderWorkload]) -> str:
    """The agent's config.toml inside the pod: its declared providers become ``attach`` to their containers."""
    lines = ["# agent-machine config rendered by `agent-machine render kube`; the pod mounts it read-only.",
             "[api]", f'tcp = "0.0.0.0:{API_PORT}"', f'token_file = "{_token_file(options)}"',
             "metrics_without_token = true  # the InferencePool's endpoint picker scrapes /metrics without one", "",
             "[cache]", f'ram_dir = "{T1_DIR}"', "",
             "[cluster]"]
    if options.kv_events:
        lines += [f'kv_events = "tcp://*:{KV_EVENTS_PORT}"', f'kv_events_replay = "tcp://*:{KV_REPLAY_PORT}"']
    if options.target == "kubernetes":
        lines.append(f'nfd_dir = "{FEATURES_DIR}"')
    by_model: dict[str, list[ProviderWorkload]] = {}
    for workload in workloads:
        by_model.setdefault(workload.model, []).append(workload)
    for decl in declarations:
        lines += ["", "[[providers]]", f"model = {json.dumps(decl.model)}", f"kind = {json.dumps(decl.kind)}"]
        if decl.kind == "llama_cpp_python":
            lines.append('mode = "subprocess"')
            lines += [f"slots = {decl.slots}", f"ctx_per_slot = {decl.ctx_per_slot}"]
            continue
        mine = by_model.get(decl.model, [])[:decl.replicas] if decl.mode != "attach" else []
        if decl.mode != "attach":
            by_model[decl.model] = by_model.get(decl.model, [])[decl.replicas:]
        urls = [f"http://127.0.0.1:{w.port}" for w in mine] if mine else list(decl.urls)
        lines += ['mode = "attach"', f"replicas = {decl.replicas}", f"slots = {decl.slots}",
                  f"ctx_per_slot = {decl.ctx_per_slot}", f"urls = {json.dumps(urls)}"]
        if mine and decl.kind == "llama_server":  # the directory the agent and its containers share
            lines.append(f'slot_save_dir = "{SLOT_DIR}"')
        if decl.name:
            lines.append(f"name = {json.dumps(decl.name)}")
    return "\n".join(lines) + "\n"


def _token_file(options: KubeOptions) -> str:
    return f"{TOKEN_DIR}/token"


# ---------------------------------------------------------------- the pod
def _security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}


def _device_limits(options: KubeOptions) -> dict[str, str]:
    if options.device_mode != "resources" or options.accelerator == "cpu":
        return {}
    if options.accelerator in DEVICE_RESOURCES:
        return {DEVICE_RESOURCES[options.accelerator]: str(options.gpus)}
    if options.accelerator in ("vulkan", "asahi"):
        return {options.dri_resource: "1"}
    raise KubeRenderError(f"--accelerator {options.accelerator!r}: one of cpu, nvidia, amd, vulkan, asahi")


def _cdi_annotations(options: KubeOptions) -> dict[str, str]:
    if options.device_mode != "cdi" or options.accelerator == "cpu":
        return {}
    if options.accelerator != "nvidia":
        raise KubeRenderError(f"--device-mode cdi: CDI specs are rendered for nvidia only, not {options.accelerator}")
    return {f"cdi.k8s.io/{options.name}": "nvidia.com/gpu=all"}


def _volumes(options: KubeOptions) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, agent mounts)."""
    def host(name: str, path: str, kind: str = "DirectoryOrCreate") -> dict[str, Any]:
        return {"name": name, "hostPath": {"path": path, "type": kind}}

    def claim(name: str, size: str) -> dict[str, Any]:
        if options.target == "podman":  # named volumes from the PVCs rendered beside the pod
            return {"name": name, "persistentVolumeClaim": {"claimName": f"{options.name}-{name}"}}
        return {"name": name, "ephemeral": {"volumeClaimTemplate": {
            "metadata": {"labels": _labels(options, name)},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": options.storage_class,
                     "resources": {"requests": {"storage": size}}}}}}

    # The config directory is mounted whole (Podman 4.3 ignores subPath on ConfigMap volumes).
    volumes = [
        {"name": "config", "configMap": {"name": f"{options.name}-config"}},
        claim("models", options.models_size), claim("cache", options.cache_size),
        claim("scratch", options.scratch_size),
        # llama-server writes and reads slot states here; the agent moves them to and from its tiers
        host("slots", f"{STATE_DIR}/slots") if options.target == "kubernetes"
        else {"name": f"{options.name}-slots", "emptyDir": {}},
    ]
    mounts = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": _slots_volume(options), "mountPath": SLOT_DIR},
        {"name": "models", "mountPath": f"{STATE_DIR}/models"},
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
    ]
    if options.target == "kubernetes":
        volumes += [{"name": "token", "secret": {"secretName": f"{options.name}-token", "defaultMode": 0o400}},
                    host("state", STATE_DIR), host("kv-ram", T1_HOST_DIR), host("run", RUNTIME_DIR),
                    host("features", FEATURES_DIR)]
        mounts += [{"name": "token", "mountPath": TOKEN_DIR, "readOnly": True},
                   {"name": "state", "mountPath": STATE_DIR}, {"name": "kv-ram", "mountPath": T1_DIR},
                   {"name": "run", "mountPath": RUNTIME_DIR}, {"name": "features", "mountPath": FEATURES_DIR}]
    else:
        # The token must not be readable by others (the agent refuses it). Podman 4.3 crashes on Secret
        # volumes and ignores a ConfigMap's defaultMode, so it is the host's own 0600 file, bind-mounted.
        # Podman names an emptyDir's volume after it: prefixed, so two pods never share one.
        if not options.token_path:
            raise KubeRenderError("--target podman needs the token in a file: --token-file FILE (or --out DIR, "
                                  "where a new one is written)")
        volumes += [host("token", options.token_path, "File"),{"name": "state", "persistentVolumeClaim": {"claimName": f"{options.name}-state"}},
                    {"name": f"{options.name}-kv-ram", "emptyDir": {}}, {"name": f"{options.name}-run", "emptyDir": {}}]
        mounts += [{"name": "token", "mountPath": f"{TOKEN_DIR}/token", "readOnly": True},
                   {"name": "state", "mountPath": STATE_DIR}, {"name": f"{options.name}-kv-ram", "mountPath": T1_DIR},
                   {"name": f"{options.name}-run", "mountPath": RUNTIME_DIR}]
    for index, (model, path) in enumerate(sorted(options.model_files.items())):
        volumes.append(host(f"gguf-{index}", path, "File"))
        mounts.append({"name": f"gguf-{index}", "mountPath": f"/import/{_dns_label(model)}.gguf", "readOnly": True})
    return volumes, mounts


def _slots_volume(options: KubeOptions) -> str:
    return "slots" if options.target == "kubernetes" else f"{options.name}-slots"


def _agent_container(options: KubeOptions, mounts: list[dict[str, Any]], own_devices: bool) -> dict[str, Any]:
    ports = [{"name": "api", "containerPort": API_PORT, "protocol": "TCP"}]
    if options.kv_events:
        ports += [{"name": "kv-events", "containerPort": KV_EVENTS_PORT, "protocol": "TCP"},
                  {"name": "kv-replay", "containerPort": KV_REPLAY_PORT, "protocol": "TCP"}]
    env = [{"name": "AGENT_MACHINE_SCOPE", "value": "system"},
           {"name": "AGENT_MACHINE_CONFIG", "value": f"{CONFIG_DIR}/config.toml"},
           {"name": "AGENT_MACHINE_CACHE_DIR", "value": CACHE_DIR},
           {"name": "TMPDIR", "value": SCRATCH_DIR}]
    if options.target == "kubernetes":
        env.append({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
        env.append({"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}})
    container: dict[str, Any] = {
        "name": "agent", "image": options.image, "args": ["serve"], "ports": ports, "env": env,
        "volumeMounts": mounts, "securityContext": _security(),
        "readinessProbe": {"httpGet": {"path": "/healthz", "port": API_PORT}, "periodSeconds": 10},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": API_PORT}, "periodSeconds": 30,
                          "failureThreshold": 3},
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}},
    }
    limits = _device_limits(options) if own_devices else {}
    if limits:
        container["resources"]["limits"] = limits
    return container


def _provider_container(options: KubeOptions, workload: ProviderWorkload) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": workload.name, "image": workload.image, "args": workload.args,
        "ports": [{"name": f"p{workload.port}", "containerPort": workload.port, "protocol": "TCP"}],
        "volumeMounts": [{"name": "models", "mountPath": f"{STATE_DIR}/models", "readOnly": True},
                         {"name": _slots_volume(options), "mountPath": SLOT_DIR}],
        "securityContext": _security(),
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
    }
    if options.target == "kubernetes":
        container["readinessProbe"] = {"httpGet": {"path": "/health", "port": workload.port}, "periodSeconds": 10}
    limits = _device_limits(options)
    if limits:
        container["resources"]["limits"] = limits
    return container


def _import_container(options: KubeOptions, mounts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An init container per ``--model``: imports the host GGUF into the pod's store (idempotent: same
    digest), so the provider containers find it by its digest."""
    out = []
    for index, model in enumerate(sorted(options.model_files)):
        out.append({"name": f"import-{index}", "image": options.image,
                    "args": ["models", "import", f"/import/{_dns_label(model)}.gguf", "--name", model, "--copy"],
                    "env": [{"name": "AGENT_MACHINE_SCOPE", "value": "system"},
                            {"name": "AGENT_MACHINE_CONFIG", "value": f"{CONFIG_DIR}/config.toml"}],
                    "volumeMounts": mounts, "securityContext": _security()})
    return out


def _pod_spec(options: KubeOptions, workloads: Sequence[ProviderWorkload]) -> dict[str, Any]:
    volumes, mounts = _volumes(options)
    containers = [_agent_container(options, mounts, own_devices=not workloads)]
    containers += [_provider_container(options, w) for w in workloads]
    spec: dict[str, Any] = {"containers": containers, "volumes": volumes,
                            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
                            "terminationGracePeriodSeconds": 60}
    if options.target == "kubernetes":
        spec["automountServiceAccountToken"] = False
        spec["priorityClassName"] = "system-node-critical"
        spec["tolerations"] = [{"operator": "Exists", "effect": "NoSchedule"}]
    else:
        spec["restartPolicy"] = "Never"
    init = _import_container(options, mounts)
    if init:
        spec["initContainers"] = init
    return spec


# ---------------------------------------------------------------- the manifests
def render(config: Any, options: KubeOptions, *, pin: Any = None, digest_of: Any = None) -> list[dict[str, Any]]:
    """Every manifest, in apply order, for ``config`` (a `nodeagent.config.Config`).

    ``digest_of(index, model) -> "sha256:<hex>"`` resolves a declared model (the CLI asks the
    model store, raising `KubeRenderError` naming ``providers[index].model`` for one it lacks)."""
    if options.target not in ("kubernetes", "podman"):
        raise KubeRenderError(f"--target {options.target!r}: kubernetes or podman")
    _device_limits(options)  # an unknown accelerator is refused before anything else
    _cdi_annotations(options)
    workloads = provider_workloads(config.providers, accelerator=options.accelerator, pin=pin,
                                   digest_of=digest_of or _no_store)
    image = pin(options.image) if pin is not None else options.image
    options = KubeOptions(**{**options.__dict__, "image": image})
    data = {"config.toml": agent_config(options, config.providers, workloads)}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(options, f"{options.name}-config"),
                  "data": data}
    pod_template = {"metadata": {"labels": _labels(options), "annotations": {
        "agent-machine.io/providers": ",".join(w.name for w in workloads) or "embedded", **_cdi_annotations(options)}},
        "spec": _pod_spec(options, workloads)}
    if options.target == "podman":
        claims = [{"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                   "metadata": _meta(options, f"{options.name}-{volume}", volume),
                   "spec": {"accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": size}}}}
                  for volume, size in (("state", "10Gi"), ("models", options.models_size),
                                       ("cache", options.cache_size), ("scratch", options.scratch_size))]
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {**_meta(options, options.name),
                                                               "annotations": pod_template["metadata"]["annotations"]},
               "spec": pod_template["spec"]}
        return [config_map, *claims, pod]
    token = options.token or secrets.token_urlsafe(32)
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(options, options.namespace,
                                                                             namespaced=False)}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": _meta(options, f"{options.name}-token"),
              "type": "Opaque", "stringData": {"token": token}}
    daemonset = {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": _meta(options, options.name),
                 "spec": {"selector": {"matchLabels": _labels(options)},
                          "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
                          "template": pod_template}}
    ports = [{"name": "api", "port": API_PORT, "targetPort": "api", "protocol": "TCP"}]
    if options.kv_events:
        ports += [{"name": "kv-events", "port": KV_EVENTS_PORT, "targetPort": "kv-events", "protocol": "TCP"},
                  {"name": "kv-replay", "port": KV_REPLAY_PORT, "targetPort": "kv-replay", "protocol": "TCP"}]
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(options, options.name),
               "spec": {"selector": _labels(options), "ports": ports, "type": "ClusterIP"}}
    pool = {"apiVersion": INFERENCE_POOL_API, "kind": "InferencePool", "metadata": _meta(options, options.name),
            "spec": {"selector": {"matchLabels": _labels(options)}, "targetPorts": [{"number": API_PORT}],
                     "endpointPickerRef": {"name": options.epp_name, "kind": "Service",
                                           "port": {"number": options.epp_port}, "failureMode": "FailOpen"}}}
    return [namespace, secret, config_map, daemonset, service, pool]


def _no_store(index: int, model: str) -> str:
    raise KubeRenderError(f"providers[{index}].model: {model!r} cannot be resolved to a digest here")


def to_yaml(manifests: Sequence[dict[str, Any]]) -> str:
    """The manifests as one multi-document YAML stream (PyYAML, which gguf already needs; JSON, which
    is YAML too, if it is missing)."""
    try:
        import yaml
    except ImportError:
        return "".join(f"---\n{json.dumps(m, indent=2)}\n" for m in manifests)

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: Any, value: str) -> Any:  # config.toml stays readable: a literal block
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return "".join("---\n" + yaml.dump(m, Dumper=Dumper, sort_keys=False, default_flow_style=False)
                   for m in manifests)


def write(manifests: Sequence[dict[str, Any]], directory: str | Path) -> list[Path]:
    """One file per manifest, numbered in apply order (``00-namespace-agent-machine.yaml`` ...)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, manifest in enumerate(manifests):
        path = directory / f"{index:02d}-{manifest['kind'].lower()}-{manifest['metadata']['name']}.yaml"
        mode = 0o600 if manifest["kind"] == "Secret" else 0o644
        from nodeagent.fsutil import atomic_write_text

        atomic_write_text(path, to_yaml([manifest]), mode=mode)
        paths.append(path)
    return paths

"""`agent-machine render kube`: the node agent as Kubernetes manifests (or a Pod for `podman kube play`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nodeagent.cli.output import CliError, print_json, render_table

EPILOG = """\
examples:
  agent-machine render kube                          every manifest on stdout (YAML)
  agent-machine render kube --out deploy/            one file per manifest, numbered in apply order
  agent-machine render kube --accelerator nvidia --gpus 2 --out deploy/
  agent-machine render kube --accelerator nvidia --device-mode cdi
  agent-machine render kube --token-file token --epp-name my-epp
  agent-machine render kube --model smollm2=/srv/models/SmolLM2.gguf --out deploy/
                                                     nodes import the GGUF at that path before the agent starts
  agent-machine render kube --target podman --model smollm2=/srv/models/SmolLM2.gguf --out pod/
      then: podman kube play pod/all.yaml ... podman kube down pod/all.yaml
      (Podman keeps the named volumes: podman volume rm agent-machine-state agent-machine-models ...)
  agent-machine render kube --format json            the manifests as a JSON list

kubernetes: Namespace, Secret (the API token), ConfigMap (config.toml), DaemonSet (the agent and
its declared providers per node; host paths for state, the KV tiers, the socket and NFD's
features.d; TopoLVM volumes for models, cache and scratch; devices by plugin resource or CDI),
Service (API + KV events) and an InferencePool (GAIE) of the agents' endpoints.
podman: the ConfigMap, PVCs (named volumes) and one Pod with the agent and its providers.
The declared providers ([[providers]] in the config) become containers the agent attaches to.
"""


def register(group: Any) -> None:
    kube = group.add_parser(
        "kube", help="Kubernetes manifests: DaemonSet, providers, TopoLVM volumes, Service, InferencePool",
        description="Render the node agent for Kubernetes (or for `podman kube play`). Nothing is applied.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    kube.add_argument("--out", type=Path, metavar="DIR", help="write one file per manifest (and all.yaml) into DIR")
    kube.add_argument("--format", choices=("yaml", "json", "table"), default="yaml",
                      help="yaml (default: kubectl apply -f -), json, or table (a summary)")
    kube.add_argument("--target", choices=("kubernetes", "podman"), default="kubernetes")
    kube.add_argument("--name", default="agent-machine", help="name of the workloads (default agent-machine)")
    kube.add_argument("--namespace", default="agent-machine")
    kube.add_argument("--image", default=None,
                      help="the agent's image (default localhost/agent-machine:latest, pinned by digest when "
                      "the local image store has it)")
    kube.add_argument("--accelerator", choices=("cpu", "nvidia", "amd", "vulkan", "asahi"), default=None,
                      help="devices to give the pod (default: from this machine's probe)")
    kube.add_argument("--gpus", type=int, default=1, help="GPUs per node (device-plugin resource count)")
    kube.add_argument("--device-mode", choices=("resources", "cdi"), default="resources",
                      help="device-plugin resources (default) or CDI annotations (nvidia)")
    kube.add_argument("--dri-resource", default="squat.ai/dri",
                      help="the resource a DRI device plugin offers for Vulkan/Asahi (default squat.ai/dri)")
    kube.add_argument("--storage-class", default="topolvm-provisioner")
    kube.add_argument("--models-size", default="100Gi")
    kube.add_argument("--cache-size", default="20Gi")
    kube.add_argument("--scratch-size", default="20Gi")
    kube.add_argument("--epp-name", default="agent-machine-epp", help="the Endpoint Picker's Service")
    kube.add_argument("--epp-port", type=int, default=9002)
    kube.add_argument("--token-file", type=Path, default=None,
                      help="the API token to put in the Secret (default: a new random one)")
    kube.add_argument("--no-kv-events", action="store_true", help="leave KV events off in the rendered config")
    kube.add_argument("--model", action="append", default=[], metavar="NAME=GGUF",
                      help="import this file (a path on every node) into the pod's store as NAME before the "
                      "agent starts, so its providers find it (repeatable)")
    kube.set_defaults(func=_kube)


def _options(args: argparse.Namespace) -> Any:
    from nodeagent.launch.kube import KubeOptions

    if args.gpus < 1:
        raise CliError(f"--gpus must be at least 1, got {args.gpus}", exit_code=2)
    if not 1 <= args.epp_port <= 65535:
        raise CliError(f"--epp-port must be 1-65535, got {args.epp_port}", exit_code=2)
    token = None
    if args.token_file is not None:
        try:
            token = args.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise CliError(f"--token-file {args.token_file}: {exc.strerror or exc}", exit_code=2) from exc
        if len(token) < 16:
            raise CliError(f"--token-file {args.token_file}: a token needs at least 16 characters", exit_code=2)
        if args.target == "podman" and args.token_file.stat().st_mode & 0o077:
            raise CliError(f"--token-file {args.token_file}: readable by group or others; the pod mounts it as "
                           f"it is and the agent refuses it: chmod 600 {args.token_file}", exit_code=2)
    models: dict[str, str] = {}
    for item in args.model:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CliError(f"--model {item!r}: use NAME=PATH (e.g. smollm2=/models/smollm2.gguf)", exit_code=2)
        if not Path(path).is_file():
            raise CliError(f"--model {item!r}: {path} is not a file", exit_code=2)
        models[name] = str(Path(path).resolve())
    token_path = str(args.token_file.resolve()) if args.token_file is not None else None
    if args.target == "podman" and token_path is None and args.out is not None:
        import secrets

        from nodeagent.fsutil import atomic_write_text

        token_path = str((args.out / "token").resolve())  # a new one, 0600, bind-mounted into the pod
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(token_path, secrets.token_urlsafe(32) + "\n")
    return KubeOptions(
        name=args.name, namespace=args.namespace, image=args.image or "localhost/agent-machine:latest",
        target=args.target, accelerator=args.accelerator or _probed_accelerator(), gpus=args.gpus,
        device_mode=args.device_mode, dri_resource=args.dri_resource, storage_class=args.storage_class,
        models_size=args.models_size, cache_size=args.cache_size, scratch_size=args.scratch_size,
        epp_name=args.epp_name, epp_port=args.epp_port, token=token, token_path=token_path,
        kv_events=not args.no_kv_events,
        model_files=models)


def _probed_accelerator() -> str:
    from nodeagent.probe import probe

    platform = str(probe().platform)
    return platform if platform in ("nvidia", "amd", "vulkan", "asahi") else "cpu"


def _kube(args: argparse.Namespace) -> int:
    from nodeagent.config import ConfigError, load_config
    from nodeagent.launch.kube import KubeRenderError, render, to_yaml, write
    from nodeagent.models.store import ModelStore
    from nodeagent.providers.catalog import CatalogError
    from nodeagent.service import local_image_digest, pinned_image

    try:
        loaded = load_config()
    except ConfigError as exc:
        raise CliError(str(exc), exit_code=2) from exc
    options = _options(args)
    store: list[Any] = []

    def digest_of(index: int, model: str) -> str:
        from nodeagent.launch.kube import KubeRenderError as Refused

        if not store:
            store.append(ModelStore(loaded.paths.state_dir))
        try:
            return store[0].resolve(model).digest
        except Exception as exc:
            raise Refused(f"providers[{index}].model: {model!r} is not in this node's store ({exc}); import it "
                          f"first: the rendered provider reads the model by its digest") from None

    try:
        manifests = render(loaded.config, options, digest_of=digest_of,
                           pin=lambda image: pinned_image(image, local_image_digest(image)))
    except (KubeRenderError, CatalogError) as exc:
        raise CliError(str(exc), exit_code=2) from exc
    if args.out is not None:
        try:
            paths = write(manifests, args.out)
            all_in_one = args.out / "all.yaml"
            from nodeagent.fsutil import atomic_write_text

            secret = any(m["kind"] == "Secret" for m in manifests)
            atomic_write_text(all_in_one, to_yaml(manifests), mode=0o600 if secret else 0o644)
        except OSError as exc:
            raise CliError(f"--out {args.out}: {exc.strerror or exc}") from exc
        for path in [*paths, all_in_one]:
            print(path)
        return 0
    if args.format == "json":
        print_json(manifests)
    elif args.format == "table":
        print(render_table(["kind", "name", "detail"], [(m["kind"], m["metadata"]["name"], _detail(m))
                                                         for m in manifests]))
    else:
        sys.stdout.write(to_yaml(manifests))
    return 0


def _detail(manifest: dict[str, Any]) -> str:
    spec = manifest.get("spec", {})
    pod = spec.get("template", {}).get("spec") or (spec if manifest["kind"] == "Pod" else None)
    if pod is not None:
        return ", ".join(f"{c['name']} ({c['image']})" for c in pod["containers"])
    if manifest["kind"] == "InferencePool":
        return f"port {spec['targetPorts'][0]['number']}, picker {spec['endpointPickerRef']['name']}"
    if manifest["kind"] == "Service":
        return ", ".join(f"{p['name']} {p['port']}" for p in spec["ports"])
    return ""

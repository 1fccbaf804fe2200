"""`providers catalog|render|up|down|ls|logs`."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from nodeagent.cli.output import CliError, add_format_option, add_group, emit, print_json, render_table

EPILOG = """\
examples:
  agent-machine providers catalog
      the engines agent-machine can run, their images and cache capabilities
  agent-machine providers render llama-server --mode quadlet --model ~/models/qwen.gguf \\
        --accelerator nvidia --podman-version 5.0
      print the .container unit that `up` would write for Podman 5.0
  agent-machine providers render vllm --mode podman --model /srv/models/Qwen2.5-7B --accelerator nvidia
      print the podman run command line
  agent-machine providers up llama-server --mode subprocess --model tiny.gguf \\
        --executable "$(scripts/build-llama-server.sh)" --slot-save-dir /var/tmp/slots --engine-args '--threads 4'
      start a native llama-server and wait until /health answers
  agent-machine providers ls --format json
  agent-machine providers logs llama-server-tiny -n 50
  agent-machine providers down llama-server-tiny

Modes: subprocess (a native binary), podman (podman run, no systemd), quadlet
(a .container unit in ~/.config/containers/systemd/, started with systemctl
--user; needs Podman >= 4.4 and a systemd user manager). Units are rendered
for the probed Podman version: no key newer than it is ever written.
"""


def register(subparsers: Any) -> None:
    group = add_group(subparsers, "providers", "inference engines: catalog, render, up, down, ls, logs")
    group_parser = subparsers.choices["providers"]
    group_parser.epilog = EPILOG
    group_parser.formatter_class = argparse.RawDescriptionHelpFormatter

    catalog = group.add_parser("catalog", help="list the provider catalog (providers/*.toml)",
                               description="List every catalog entry with its launch modes, images per "
                               "accelerator and cache capabilities. The catalog is validated on load.")
    add_format_option(catalog)
    catalog.set_defaults(func=_catalog)

    for name, help_text in (("render", "print the unit or command line a provider would get, without running it"),
                            ("up", "start a provider and wait until it is healthy")):
        sub = group.add_parser(name, help=help_text, description=help_text + ".", epilog=EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        _spec_options(sub, for_up=name == "up")
        add_format_option(sub)
        sub.set_defaults(func=_render if name == "render" else _up)

    down = group.add_parser("down", help="stop a provider and remove its container or unit",
                            description="Stop a provider started with `up` (SIGTERM then SIGKILL for a process, "
                            "podman stop + rm for a container, systemctl stop + unit removal for quadlet).")
    down.add_argument("instance", metavar="INSTANCE")
    add_format_option(down)
    down.set_defaults(func=_down)

    ls = group.add_parser("ls", help="list providers started here, with state and health",
                          description="List the providers this agent started, checking each one's process, "
                          "container or unit and its HTTP health.")
    add_format_option(ls)
    ls.set_defaults(func=_ls)

    logs = group.add_parser("logs", help="print a provider's recent log lines",
                            description="Print the last lines a provider wrote (process log file, podman logs, "
                            "or the unit's journal).")
    logs.add_argument("instance", metavar="INSTANCE")
    logs.add_argument("-n", "--lines", type=int, default=100, help="how many lines (default 100)")
    logs.set_defaults(func=_logs)


def _spec_options(parser: argparse.ArgumentParser, for_up: bool) -> None:
    parser.add_argument("provider", metavar="NAME", help="catalog entry: llama-server, vllm, llama-cpp-python")
    parser.add_argument("--mode", required=True, choices=("subprocess", "podman", "quadlet"), help="launch mode")
    parser.add_argument("--model", required=True, type=Path, metavar="PATH",
                        help="GGUF file (llama.cpp) or model directory (vLLM) on this host")
    parser.add_argument("--accelerator", default="cpu", choices=("cpu", "nvidia", "amd", "vulkan", "asahi"),
                        help="selects the image and device passthrough (default cpu)")
    parser.add_argument("--podman-version", metavar="X.Y",
                        help="render for this Podman (default: the installed one)")
    parser.add_argument("--name", dest="instance", metavar="INSTANCE",
                        help="instance name (default: <provider>-<model file stem>)")
    parser.add_argument("--port", type=int, help="host port on 127.0.0.1 (default: free port for up, "
                        "the container port for render)")
    parser.add_argument("--model-digest", metavar="sha256:HEX", help="recorded in labels and receipts")
    parser.add_argument("--slot-save-dir", type=Path, metavar="DIR",
                        help="llama-server --slot-save-path (mounted read-write into containers)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="a catalog parameter, e.g. ctx_size=8192 (repeatable)")
    parser.add_argument("--gpus", default="all", help="NVIDIA CDI selector: all, an index or a UUID (default all)")
    parser.add_argument("--image", help="use this image instead of the catalog's (e.g. a local build)")
    parser.add_argument("--pull", default="missing", choices=("missing", "never", "always", "newer"),
                        help="image pull policy (default missing)")
    parser.add_argument("--executable", help="subprocess mode: the engine binary (default: from PATH)")
    parser.add_argument("--no-container-health", action="store_true",
                        help="no health command inside the container (images without curl, e.g. FROM scratch); "
                        "the agent still polls the health path over HTTP")
    parser.add_argument("--scope", default="user", choices=("user", "system"),
                        help="quadlet mode: rootless user units or system units (default user)")
    parser.add_argument("--engine-args", default="", metavar="'ARGS'",
                        help="extra engine arguments, one shell-quoted string, e.g. --engine-args '--threads 4'")
    if for_up:
        parser.add_argument("--no-wait", action="store_true", help="return once started, without waiting for health")


def _param_value(text: str) -> str | int | float | bool:
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def _default_instance(provider: str, model: Path) -> str:
    import re

    stem = re.sub(r"[^a-z0-9_.-]+", "-", model.stem.lower()).strip("-.") or "model"
    return f"{provider}-{stem}"[:63].rstrip("-.")


def _catalog_or_die() -> Any:
    from nodeagent.providers.catalog import CatalogError, load_catalog

    try:
        return load_catalog()
    except CatalogError as exc:
        raise CliError(f"provider catalog: {exc}") from exc


def _podman_version(args: argparse.Namespace, required: bool) -> Any:
    from nodeagent.launch.podman import PodmanError, podman_version
    from nodeagent.launch.podman_versions import PodmanVersion

    if args.podman_version:
        try:
            return PodmanVersion.parse(args.podman_version)
        except ValueError as exc:
            raise CliError(str(exc), exit_code=2) from exc
    try:
        return podman_version()
    except PodmanError as exc:
        if required:
            raise CliError(f"cannot tell the Podman version ({exc}); pass --podman-version X.Y") from exc
        return None


def _build_spec(args: argparse.Namespace, for_up: bool) -> Any:
    from nodeagent.launch.subprocess import free_port
    from nodeagent.providers.catalog import CatalogError, resolve_spec

    catalog = _catalog_or_die()
    try:
        entry = catalog.get(args.provider)
    except CatalogError as exc:
        raise CliError(str(exc), exit_code=2) from exc
    if for_up and not args.model.exists():
        raise CliError(f"--model {args.model}: no such file or directory", exit_code=2)
    params = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"--param {item!r}: expected KEY=VALUE", exit_code=2)
        params[key] = _param_value(value)
    if args.port is not None:
        port = args.port
    elif for_up:
        port = free_port()
    else:
        port = entry.container_port or 8080
    try:
        return resolve_spec(
            entry,
            name=args.instance or _default_instance(entry.name, args.model),
            mode=args.mode,
            model_path=args.model,
            port=port,
            accelerator=args.accelerator,
            model_digest=args.model_digest,
            params=params,
            slot_save_dir=args.slot_save_dir,
            gpus=args.gpus,
            executable=args.executable,
            image=args.image,
            pull=args.pull,
            extra_args=shlex.split(args.engine_args),
            **({"health_command": None} if args.no_container_health else {}),
        )
    except (CatalogError, ValueError) as exc:
        raise CliError(str(exc), exit_code=2) from exc


def _context(args: argparse.Namespace | None, version: Any = None) -> Any:
    from nodeagent.launch.manage import LaunchContext
    from nodeagent.launch.quadlet import QuadletOptions
    from nodeagent.launch.registry import Registry

    scope = getattr(args, "scope", "user") if args is not None else "user"
    return LaunchContext(Registry.default(), podman_version=version, quadlet=QuadletOptions(scope=scope))


# ------------------------------------------------------------------ handlers
def _catalog(args: argparse.Namespace) -> int:
    catalog = _catalog_or_die()
    entries = [catalog.get(name) for name in catalog.names()]
    data = [
        {
            "name": e.name, "kind": e.kind, "description": e.description, "modes": e.modes,
            "images": {acc: a.image for acc, a in e.accelerators.items()},
            "containerPort": e.container_port, "healthPath": e.health_path, "metricsPath": e.metrics_path,
            "capabilities": e.capabilities.to_wire(), "source": e.source,
        }
        for e in entries
    ]

    def table(_: Any) -> str:
        rows = []
        for e in entries:
            caps = [k for k, v in e.capabilities.model_dump().items() if v]
            rows.append((e.name, ",".join(e.modes), ",".join(e.accelerators), ",".join(caps) or "-"))
        return render_table(("name", "modes", "accelerators", "cache"), rows)

    emit(data, args.format, table)
    return 0


def _render(args: argparse.Namespace) -> int:
    spec = _build_spec(args, for_up=False)
    result: dict[str, Any] = {"spec": spec.to_wire(), "mode": spec.mode}
    if spec.mode == "quadlet":
        from nodeagent.launch.container import RenderError
        from nodeagent.launch.quadlet import QuadletOptions, quadlet_dir, render_quadlet_text, unit_file_name

        version = _podman_version(args, required=True)
        try:
            text = render_quadlet_text(spec, version, QuadletOptions(scope=args.scope))
        except RenderError as exc:
            raise CliError(str(exc)) from exc
        result.update(podmanVersion=str(version), path=str(quadlet_dir(args.scope) / unit_file_name(spec)), unit=text)
        shown = f"# would be written to {result['path']}\n{text}"
    elif spec.mode == "podman":
        from nodeagent.launch.podman import PodmanHostConfig, podman_run_argv

        version = _podman_version(args, required=False)
        from nodeagent.launch.podman_versions import PodmanVersion

        host = PodmanHostConfig.detect()
        argv = podman_run_argv(spec, version or PodmanVersion(5, 0, 0), host)
        result.update(podmanVersion=str(version) if version else None, argv=argv, hostConfig=list(host.reasons))
        shown = "".join(f"# {reason}\n" for reason in host.reasons) + shlex.join(argv)
    else:
        from nodeagent.launch.subprocess import subprocess_argv

        argv = subprocess_argv(spec)
        result.update(argv=argv, env=spec.env)
        shown = shlex.join(argv)
    emit(result, args.format, lambda _: shown)
    return 0


def _up(args: argparse.Namespace) -> int:
    from nodeagent.launch.health import StartFailed
    from nodeagent.launch.manage import status_of
    from nodeagent.launch.podman import PodmanError
    from nodeagent.launch.quadlet import QuadletUnavailable
    from nodeagent.launch.subprocess import LaunchError

    spec = _build_spec(args, for_up=True)
    version = _podman_version(args, required=spec.mode == "quadlet") if spec.mode != "subprocess" else None
    context = _context(args, version)
    launcher = context.launcher(spec.mode)
    if not args.no_wait and args.format == "table":
        print(f"starting {spec.name} ({spec.provider}, {spec.mode}) on {spec.base_url}; "
              f"waiting up to {spec.start_timeout_s}s for {spec.health.path} ...", flush=True)
    try:
        record = launcher.up(spec, wait=not args.no_wait)
    except (StartFailed, PodmanError, QuadletUnavailable, LaunchError) as exc:
        raise CliError(str(exc)) from exc
    for warning in getattr(launcher, "warnings", []):
        print(f"warning: {warning}")
    status = status_of(record, launcher)
    emit(status, args.format, lambda s: f"{s.name}: {s.state} at {s.endpoint}" + (f" ({s.reason})" if s.reason else ""))
    return 0


def _record_and_launcher(instance: str, args: argparse.Namespace) -> tuple[Any, Any]:
    from nodeagent.launch.registry import Registry

    registry = Registry.default()
    try:
        record = registry.load(instance)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    if record is None:
        known = ", ".join(r.spec.name for r in registry.all()) or "none"
        raise CliError(f"no provider named {instance!r} was started here (known: {known})")
    version = None
    if record.spec.mode == "quadlet":
        version = _podman_version(argparse.Namespace(podman_version=None), required=True)
    context = _context(None, version)
    return record, context.launcher(record.spec.mode)


def _down(args: argparse.Namespace) -> int:
    record, launcher = _record_and_launcher(args.instance, args)
    try:
        stopped = launcher.down(args.instance, missing_ok=True)
    except Exception as exc:  # podman/systemctl failures, with their stderr
        raise CliError(f"{args.instance}: {exc}") from exc
    result = {"name": args.instance, "mode": record.spec.mode, "stopped": stopped}
    emit(result, args.format,
         lambda r: f"{r['name']}: {'stopped' if r['stopped'] else 'was not running; record removed'}")
    return 0


def _ls(args: argparse.Namespace) -> int:
    from nodeagent.launch.manage import launched_providers

    statuses = [status for _, status in launched_providers()]
    if args.format == "json":
        print_json(statuses)
        return 0
    rows = [(s.name, s.provider, s.mode, s.state, s.health or "-", s.endpoint or "-",
             s.pid or (s.container_id or "")[:12] or s.unit or "-") for s in statuses]
    print(render_table(("name", "provider", "mode", "state", "health", "endpoint", "pid/id"), rows)
          if rows else "no providers started here (agent-machine providers up ...)")
    return 0


def _logs(args: argparse.Namespace) -> int:
    _record, launcher = _record_and_launcher(args.instance, args)
    print(launcher.logs(args.instance, lines=args.lines))
    return 0

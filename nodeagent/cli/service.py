"""`serve`, `status`, `ps`, `install-service`: the agent as a service."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nodeagent.cli.output import CliError, add_format_option, emit, render_table

SERVE_EPILOG = """\
examples:
  agent-machine serve                       API on $XDG_RUNTIME_DIR/agent-machine/api.sock
  AGENT_MACHINE_API_TCP=127.0.0.1:8377 AGENT_MACHINE_API_TOKEN_FILE=~/.config/agent-machine/token \\
      agent-machine serve                   also TCP, bearer token required
  curl --unix-socket $XDG_RUNTIME_DIR/agent-machine/api.sock http://agent/v1/machine

Under systemd (see `agent-machine install-service`) it speaks the notify protocol
(READY, STATUS, WATCHDOG, STOPPING), accepts a socket from socket activation,
drains on SIGTERM and reloads its config on SIGHUP.
"""

INSTALL_EPILOG = """\
examples:
  agent-machine install-service --dry-run           print the user unit, write nothing
  agent-machine install-service                     ~/.config/systemd/user/agent-machine.service
  agent-machine install-service --socket            plus agent-machine.socket (socket activation)
  sudo agent-machine install-service --system       /etc/systemd/system/agent-machine.service (hardened)
  agent-machine install-service --quadlet           the agent itself in a container (Podman >= 4.4)
then: systemctl --user daemon-reload && systemctl --user enable --now agent-machine
"""

PS_EPILOG = """\
columns:
  PROVIDER  the provider's name          KIND/MODE  engine and launch mode
  UNIT      systemd unit and its live state (quadlet providers)
  STATE     container or process state   PID      main process id
  HEALTHY   age of the last good health check     MODEL    the model it serves
  DRIFT     where configured differs from actual (empty: none)
"""


def register(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve", help="run the agent: local API, pod dispatch, reconcile loop (systemd-friendly)",
        description="Run the node agent in the foreground: the HTTP API on a Unix socket (and TCP "
        "with a bearer token when api.tcp is set), pod dispatch, provider reconciliation. "
        "Pods that were in flight when a previous agent died are marked Failed (agent-restart).",
        epilog=SERVE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--paused", action="store_true",
                       help="accept and queue pods but start none until POST /v1/dispatch:resume (maintenance)")
    serve.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="on SIGTERM, how long in-flight pods may finish before they are cancelled (default 30)")
    serve.add_argument("--access-log", action="store_true", help="log every HTTP request")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    serve.set_defaults(func=_serve)

    status = subparsers.add_parser(
        "status", help="ask the running agent how it is (over its socket)",
        description="Ask the running agent (GET /v1/status over its Unix socket, or AGENT_MACHINE_URL "
        "with AGENT_MACHINE_TOKEN for TCP). Exit 1 with a hint when no agent answers.")
    add_format_option(status)
    status.set_defaults(func=_status)

    ps = subparsers.add_parser(
        "ps", help="providers: unit, container/process state, pid, last good health check, model, drift",
        description="One row per provider the node manages, joining its systemd unit state, its "
        "container or process state, pid, the age of its last good health check, its model and any "
        "drift between configured and actual. Asks the running agent; without one, reads the "
        "node's state directly.", epilog=PS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_format_option(ps)
    ps.set_defaults(func=_ps)

    install = subparsers.add_parser(
        "install-service", help="write a systemd unit (or a Quadlet .container) that runs the agent",
        description="Write a systemd unit for `agent-machine serve` (Type=notify, watchdog, "
        "Restart=on-failure, hardening suited to user or system units), optionally a .socket unit "
        "for socket activation, or a Quadlet .container running the agent in a container.",
        epilog=INSTALL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    scope = install.add_mutually_exclusive_group()
    scope.add_argument("--user", dest="scope", action="store_const", const="user",
                       help="a user unit in ~/.config/systemd/user (default)")
    scope.add_argument("--system", dest="scope", action="store_const", const="system",
                       help="a system unit in /etc/systemd/system, running as its own user")
    install.set_defaults(scope="user")
    install.add_argument("--socket", action="store_true", help="also write agent-machine.socket (socket activation)")
    install.add_argument("--quadlet", action="store_true",
                         help="write a Quadlet agent-machine.container instead of a plain service unit")
    install.add_argument("--rootless-podman", action="store_true",
                         help="the agent will launch providers with rootless podman: leave out NoNewPrivileges "
                              "and the sandboxing newuidmap cannot live with (system units)")
    install.add_argument("--image", default=None, help="container image for --quadlet "
                         "(default localhost/agent-machine:latest)")
    install.add_argument("--no-pin-image", dest="pin_image", action="store_false",
                         help="for --quadlet: name the image, not its local digest (units to copy to other hosts)")
    install.add_argument("--podman-version", default=None, metavar="X.Y",
                         help="for --quadlet: the Podman the unit targets (default: `podman --version`)")
    install.add_argument("--exec", dest="exec_path", default=None, metavar="PATH",
                         help="the agent-machine executable for ExecStart (default: the one running now)")
    install.add_argument("--dir", dest="target_dir", default=None, metavar="DIR",
                         help="write the units here instead of the systemd (or Quadlet) directory")
    install.add_argument("--dry-run", action="store_true", help="print the units, write nothing")
    install.set_defaults(func=_install)


# ---------------------------------------------------------------- serve
def _serve(args: argparse.Namespace) -> int:
    from nodeagent.daemon import ServeError, serve

    try:
        return serve(paused=args.paused, drain_timeout_s=args.drain_timeout, access_log=args.access_log,
                     log_level=args.log_level)
    except ServeError as exc:
        raise CliError(str(exc)) from exc


# ---------------------------------------------------------------- status
def _client() -> Any:
    from nodeagent.client import AgentClient

    return AgentClient.from_env()


def _ask(path: str) -> Any:
    from nodeagent.client import AgentNotRunning, ApiError

    try:
        with _client() as client:
            return client.get(path)
    except AgentNotRunning as exc:
        raise CliError(f"agent-machine is not running: {exc}") from exc
    except ApiError as exc:
        raise CliError(f"the agent answered {exc}") from exc


def _status(args: argparse.Namespace) -> int:
    data = _ask("/v1/status")

    def table(d: dict[str, Any]) -> str:
        pods = ", ".join(f"{phase} {n}" for phase, n in sorted(d["pods"].items())) or "none"
        rows = [
            ("state", "ready" if d["ready"] else ("draining" if not d["accepting"] else "not ready")),
            ("version", d["version"]), ("pid", d["pid"]), ("uptime", _age(d["uptimeS"])),
            ("pods in flight", f"{d['inFlight']} of {d['queueLimit']}"), ("pods stored", pods),
            ("providers", "-" if d.get("providers") is None else d["providers"]),
            ("listening", ", ".join(d["listeners"]) or "-"),
            ("config", d["configFile"]), ("state dir", d["stateDir"]),
        ]
        return render_table(("field", "value"), rows)

    emit(data, args.format, table)
    return 0


# ---------------------------------------------------------------- ps
def _ps(args: argparse.Namespace) -> int:
    from nodeagent.service import provider_rows

    records, source, names = _provider_records()
    rows = provider_rows(records, model_names=names)
    if args.format == "json":
        emit(rows, "json", str)
        return 0
    if not rows:
        print(f"no providers ({source})")
        return 0
    headers = ("provider", "kind", "mode", "unit", "state", "pid", "healthy", "model", "held", "owner", "busy",
               "drift")

    def busy(r: dict[str, Any]) -> str:
        return "-" if r.get("busy") is None else ("busy" if r["busy"] else "idle")

    print(render_table(headers, [(r["provider"], r["kind"] or "-", r["mode"] or "-",
                                  f"{r['unit']} ({r['unitState'] or 'unknown'})" if r["unit"] else "-",
                                  r["state"] or "-",
                                  r["pid"] or "-", r["healthyAgo"] or "never", r["model"] or "-",
                                  "-" if r.get("heldTokens") is None else r["heldTokens"], r.get("owner") or "-",
                                  busy(r), "; ".join(r["drift"]) or "") for r in rows]))
    return 0


def _model_names(models: list[dict[str, Any]]) -> dict[str, str]:
    return {m["digest"]: m["names"][0] for m in models if m.get("digest") and m.get("names")}


def _provider_records() -> tuple[list[dict[str, Any]], str, dict[str, str]]:
    """Providers (and digest -> model name): the running agent's own, plus those
    `providers up` started (podman, quadlet, subprocess), which outlive the agent.

    A launched provider is configured to run; any live unit, container or process
    state that says otherwise shows as drift.
    """
    from nodeagent.client import AgentNotRunning, ApiError
    from nodeagent.launch.manage import launched_providers

    launched = [{**status.to_wire(), "configured": {"running": True, "model": record.spec.model.digest}}
                for record, status in launched_providers()]
    try:
        with _client() as client:
            providers = list(client.get("/v1/providers")["items"])
            try:
                names = _model_names(client.get("/v1/store/models")["items"])
            except ApiError:
                names = {}
            return providers + launched, "from the running agent and `providers up`", names
    except AgentNotRunning:
        where = "the agent is not running" if not launched else "launched providers; the agent is not running"
        return launched, where + (": start it with `agent-machine serve`" if not launched else ""), {}
    except ApiError as exc:
        if exc.status == 501:
            return launched, "the node manages no providers yet", {}
        raise CliError(f"the agent answered {exc}") from exc


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = float(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


# ---------------------------------------------------------------- install-service
def _install(args: argparse.Namespace) -> int:
    from nodeagent.service import ServiceOptions, install_units, render_units

    options = ServiceOptions(scope=args.scope, socket=args.socket, quadlet=args.quadlet,
                             rootless_podman=args.rootless_podman, exec_path=args.exec_path,
                             image=args.image, podman_version=args.podman_version, pin_image=args.pin_image)
    try:
        units = render_units(options)
    except ValueError as exc:
        raise CliError(str(exc), exit_code=2) from exc
    if args.dry_run:
        for unit in units:
            print(f"# {unit.target(args.target_dir)}")
            sys.stdout.write(unit.text)
            print()
        return 0
    try:
        written = install_units(units, args.target_dir)
    except OSError as exc:
        raise CliError(f"cannot write the units: {exc}"
                       + ("; --system needs root" if args.scope == "system" else "")) from exc
    for path in written:
        print(f"wrote {path}")
    for step in units[0].next_steps:
        print(f"next: {step}")
    return 0

"""Units that run the agent itself, and the joined provider view of `ps`.

`render_units(options)` returns the systemd units for `agent-machine serve`:

* user scope (default): ``~/.config/systemd/user/agent-machine.service``.
  User managers cannot apply most sandboxing (REFERENCE.md §6), so the user
  unit keeps to what works unprivileged (UMask, restart policy, watchdog).
* system scope: ``/etc/systemd/system/agent-machine.service`` with
  StateDirectory/CacheDirectory/RuntimeDirectory/ConfigurationDirectory and
  hardening. It runs as a dynamic user with the full sandbox; with
  ``rootless_podman`` it runs as the ``agent-machine`` user and leaves out
  NoNewPrivileges and whatever blocks newuidmap (setuid, user namespaces,
  capability bounding, the syscall filter).
* ``socket``: an ``agent-machine.socket`` unit (0600 socket, 0700 directory)
  so systemd owns the listening socket (socket activation, fd 3).
* ``quadlet``: instead of a service, a Quadlet ``agent-machine.container``
  running the agent in a container, with keys gated on the Podman version.
  The image is the one the repository's ``Containerfile`` builds
  (``DEFAULT_IMAGE``); when Podman has it locally, ``Image=`` names it by
  digest, so the unit runs exactly what was built and reviewed.

Every unit is ``Type=notify`` with ``WatchdogSec=`` and ``Restart=on-failure``;
`nodeagent.daemon` speaks the protocol.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from nodeagent.fsutil import atomic_write_text

UNIT = "agent-machine"
# What `podman build -t localhost/agent-machine:latest -f Containerfile .` builds (see Containerfile).
DEFAULT_IMAGE = "localhost/agent-machine:latest"
WATCHDOG_SEC = 30
# The quadlet/ copy in the repository is rendered for this Podman (health checks need 4.5).
REFERENCE_PODMAN = "4.5"

# Device groups a GPU-using system service needs (cgroup device allow-list).
_DEVICE_ALLOW = ("char-drm rw", "char-nvidia-frontend rw", "char-nvidia-uvm rw", "char-kfd rw")


@dataclass(frozen=True)
class ServiceOptions:
    scope: Literal["user", "system"] = "user"
    socket: bool = False
    quadlet: bool = False
    rootless_podman: bool = False
    exec_path: str | None = None  # absolute path of agent-machine; default: the one running now
    image: str | None = None
    podman_version: str | None = None  # for quadlet; default: `podman --version`
    pin_image: bool = True  # for quadlet: Image=name@digest when Podman has the image locally
    watchdog_sec: int = WATCHDOG_SEC


@dataclass(frozen=True)
class Unit:
    name: str  # agent-machine.service
    text: str
    directory: Path  # where systemd (or Quadlet) looks for it
    next_steps: tuple[str, ...] = ()

    def target(self, override: str | Path | None = None) -> Path:
        return Path(override or self.directory) / self.name


def agent_executable(explicit: str | None = None) -> str:
    """The absolute path ExecStart must name (systemd wants absolute paths)."""
    if explicit:
        path = Path(explicit)
        if not path.is_absolute():
            raise ValueError(f"--exec must be an absolute path, got {explicit!r}")
        return str(path)
    found = shutil.which("agent-machine")
    if found:
        return str(Path(found).resolve())
    candidate = Path(sys.executable).with_name("agent-machine")
    if candidate.exists():
        return str(candidate)
    raise ValueError("cannot find the agent-machine executable on PATH; pass --exec /path/to/agent-machine")


def _user_dirs() -> tuple[Path, Path]:
    home = Path(os.environ.get("HOME") or Path.home())
    config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    return config / "systemd" / "user", config / "containers" / "systemd"


def _lines(*sections: tuple[str, Iterable[str]], header: str) -> str:
    out = [f"# {line}" if line else "#" for line in header.splitlines()]
    for name, entries in sections:
        out += ["", f"[{name}]", *entries]
    return "\n".join(out) + "\n"


HEADER = """\
Written by `agent-machine install-service`; re-run it rather than editing,
or put overrides in a drop-in (systemctl {flag}edit {unit})."""


def _service_common(options: ServiceOptions, exec_path: str) -> list[str]:
    return [
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={exec_path} serve",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "RestartSec=2s",
        f"WatchdogSec={options.watchdog_sec}s",
        "TimeoutStartSec=90s",
        # The agent drains for up to 30 s on SIGTERM and stops its providers itself;
        # KillMode=mixed lets it, then cleans up whatever is left.
        "TimeoutStopSec=60s",
        "KillMode=mixed",
        "Environment=PYTHONUNBUFFERED=1",
        "UMask=0077",
    ]


def _system_hardening(options: ServiceOptions) -> list[str]:
    lines = [
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
        "RestrictRealtime=yes",
        "LockPersonality=yes",
        "RemoveIPC=yes",
        "SystemCallArchitectures=native",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        # GPUs: no PrivateDevices; instead only the device classes inference uses.
        "DevicePolicy=closed",
        *(f"DeviceAllow={entry}" for entry in _DEVICE_ALLOW),
        "SupplementaryGroups=video render",
        # Not MemoryDenyWriteExecute: llama.cpp and ctypes callbacks need W+X pages.
    ]
    if not options.rootless_podman:
        lines += [
            "NoNewPrivileges=yes",
            "RestrictSUIDSGID=yes",
            "RestrictNamespaces=yes",
            "CapabilityBoundingSet=",
            "AmbientCapabilities=",
            "SystemCallFilter=@system-service",
            "SystemCallFilter=~@privileged",
            "SystemCallErrorNumber=EPERM",
        ]
    return lines


def render_service(options: ServiceOptions) -> Unit:
    exec_path = agent_executable(options.exec_path)
    # The same service works with or without agent-machine.socket: activated, it
    # serves the socket systemd passes (a socket unit orders itself before its
    # service); started alone, it binds its own.
    unit_section = [
        "Description=agent-machine node agent for local LLM inference",
        "StartLimitIntervalSec=300",
        "StartLimitBurst=5",
    ]
    service = _service_common(options, exec_path)
    if options.scope == "user":
        user_unit_dir, _ = _user_dirs()
        text = _lines(("Unit", unit_section), ("Service", service), ("Install", ["WantedBy=default.target"]),
                      header=HEADER.format(flag="--user ", unit=f"{UNIT}.service"))
        steps = ("systemctl --user daemon-reload",
                 f"systemctl --user enable --now {UNIT}.{'socket' if options.socket else 'service'}",
                 "loginctl enable-linger $USER   # start at boot without a login")
        return Unit(f"{UNIT}.service", text, user_unit_dir, steps)

    unit_section[1:1] = ["Wants=network-online.target", "After=network-online.target"]
    identity = (["User=agent-machine", "Group=agent-machine"] if options.rootless_podman
                else ["DynamicUser=yes"])
    directories = [
        "Environment=AGENT_MACHINE_SCOPE=system",
        *identity,
        f"StateDirectory={UNIT}",
        "StateDirectoryMode=0700",
        f"CacheDirectory={UNIT}",
        "CacheDirectoryMode=0700",
        f"RuntimeDirectory={UNIT}",
        "RuntimeDirectoryMode=0700",
        # A socket unit's socket lives in the runtime directory: keep it across restarts.
        "RuntimeDirectoryPreserve=yes",
        f"ConfigurationDirectory={UNIT}",
    ]
    text = _lines(("Unit", unit_section), ("Service", service + directories + _system_hardening(options)),
                  ("Install", ["WantedBy=multi-user.target"]),
                  header=HEADER.format(flag="", unit=f"{UNIT}.service"))
    steps: tuple[str, ...] = ("systemctl daemon-reload",
                              f"systemctl enable --now {UNIT}.{'socket' if options.socket else 'service'}")
    if options.rootless_podman:
        steps = ("useradd --system --create-home --home-dir /var/lib/agent-machine-home agent-machine",
                 "usermod --add-subuids 100000-165535 --add-subgids 100000-165535 agent-machine",
                 *steps)
    return Unit(f"{UNIT}.service", text, Path("/etc/systemd/system"), steps)


def render_socket(options: ServiceOptions) -> Unit:
    path = "%t/agent-machine/api.sock" if options.scope == "user" else "/run/agent-machine/api.sock"
    socket_section = [f"ListenStream={path}", "SocketMode=0600", "DirectoryMode=0700", "Accept=no",
                      "RemoveOnStop=yes"]
    if options.scope == "system" and options.rootless_podman:
        socket_section += ["SocketUser=agent-machine", "SocketGroup=agent-machine"]
    text = _lines(("Unit", ["Description=agent-machine API socket"]), ("Socket", socket_section),
                  ("Install", ["WantedBy=sockets.target"]),
                  header=HEADER.format(flag="--user " if options.scope == "user" else "", unit=f"{UNIT}.socket"))
    directory = _user_dirs()[0] if options.scope == "user" else Path("/etc/systemd/system")
    return Unit(f"{UNIT}.socket", text, directory)


def detect_podman_version() -> str | None:
    try:
        out = subprocess.run(["podman", "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().split()[-1] if out.returncode == 0 and out.stdout.strip() else None


def local_image_digest(image: str) -> str | None:
    """The digest of ``image`` if Podman has it locally (`podman image inspect`), else None."""
    try:
        out = subprocess.run(["podman", "image", "inspect", "--format", "{{.Digest}}", image],
                             capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    digest = out.stdout.strip()
    return digest if out.returncode == 0 and digest.startswith("sha256:") else None


def pinned_image(image: str, digest: str | None) -> str:
    """``image`` by ``digest`` (``localhost/agent-machine@sha256:…``): a later build or pull of the
    same tag does not change what the unit runs. Unchanged without a digest or when already pinned."""
    if digest is None or "@" in image:
        return image
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:  # no tag (a ':' before the last '/' is a registry port)
        name = image
    return f"{name}@{digest}"


def render_container(options: ServiceOptions) -> Unit:
    """A Quadlet ``.container`` that runs `agent-machine serve` in a container.

    The host sees the API socket at the usual place because the runtime
    directory is bind-mounted; the agent inside runs with system paths.
    """
    from nodeagent.launch.podman_versions import PodmanVersion, container_key_supported, unsupported_keys

    found = options.podman_version or detect_podman_version()
    if found is None:
        raise ValueError("cannot tell the Podman version (is podman installed?); pass --podman-version")
    version = PodmanVersion.parse(found)
    requested = options.image or DEFAULT_IMAGE
    image = pinned_image(requested, local_image_digest(requested) if options.pin_image else None)
    user = options.scope == "user"
    state = "%h/.local/state/agent-machine" if user else "/var/lib/agent-machine"
    config = "%h/.config/agent-machine" if user else "/etc/agent-machine"
    runtime = "%t/agent-machine" if user else "/run/agent-machine"
    container: list[tuple[str, str]] = [
        ("Image", image),
        ("ContainerName", UNIT),
        ("Exec", "serve"),
        ("Notify", "true"),  # conmon passes our READY/STATUS to systemd
        ("Environment", "AGENT_MACHINE_SCOPE=system"),
        ("Volume", f"{state}:/var/lib/agent-machine:Z"),
        ("Volume", f"{config}:/etc/agent-machine:ro,Z"),
        ("Volume", f"{runtime}:/run/agent-machine:z"),
        ("AddDevice", "-/dev/dri"),
        ("NoNewPrivileges", "true"),
        ("DropCapability", "all"),
        ("ReadOnly", "true"),
        ("Tmpfs", "/tmp"),
        ("HealthCmd", "agent-machine status --format json"),
        ("HealthInterval", "30s"),
        ("HealthTimeout", "10s"),
        ("HealthRetries", "3"),
        ("HealthOnFailure", "kill"),
    ]
    kept = [(key, value) for key, value in container if container_key_supported(key, version, value)]
    service = ["Restart=on-failure", "RestartSec=5s", "TimeoutStartSec=300s", "TimeoutStopSec=60s",
               f"ExecStartPre=/usr/bin/mkdir -p {state} {config} {runtime}"]
    sections = [("Unit", [("Description", "agent-machine node agent (container)")]),
                ("Container", kept),
                ("Service", [tuple(line.split("=", 1)) for line in service]),
                ("Install", [("WantedBy", "default.target" if user else "multi-user.target")])]
    problems = unsupported_keys(sections, version)  # type: ignore[arg-type]
    if problems:
        raise ValueError("the Quadlet unit would be refused: " + "; ".join(problems))
    text = _lines(*((name, [f"{k}={v}" for k, v in entries]) for name, entries in sections),
                  header=f"Quadlet unit for Podman >= {version.short}; written by `agent-machine install-service "
                         f"--quadlet`.\n" + (
                             f"Runs {requested} as built on this machine, by digest; after a rebuild, "
                             "re-run install-service." if image != requested else
                             f"Build {requested} first, in the repository:\n"
                             f"  podman build -t {requested} -f Containerfile .\n"
                             "then re-run install-service to pin its digest."))
    directory = _user_dirs()[1] if user else Path("/etc/containers/systemd")
    flag = "--user " if user else ""
    steps = (f"systemctl {flag}daemon-reload", f"systemctl {flag}start {UNIT}.service")
    return Unit(f"{UNIT}.container", text, directory, steps)


def render_units(options: ServiceOptions) -> list[Unit]:
    """The units to install, the main one first."""
    if options.quadlet:
        if options.socket:
            raise ValueError("--socket cannot be combined with --quadlet (the container binds its own socket)")
        return [render_container(options)]
    units = [render_service(options)]
    if options.socket:
        units.append(render_socket(options))
    return units


def install_units(units: list[Unit], target_dir: str | Path | None = None) -> list[Path]:
    written = []
    for unit in units:
        path = unit.target(target_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, unit.text)
        os.chmod(path, 0o644)
        written.append(path)
    return written


# ---------------------------------------------------------------- ps
def _first(record: dict[str, Any], *names: str) -> Any:
    for name in names:
        value = record
        for part in name.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value not in (None, ""):
            return value
    return None


def _parse_time(value: Any) -> float | None:
    from datetime import datetime

    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def systemd_unit_state(unit: str, user: bool) -> str | None:
    cmd = ["systemctl", *(["--user"] if user else []), "show", "--property=ActiveState,SubState", unit]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    props = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    if not props.get("ActiveState"):
        return None
    return f"{props['ActiveState']}/{props.get('SubState', '?')}"


def process_state(pid: int | None) -> str | None:
    if not pid:
        return None
    import psutil

    try:
        return psutil.Process(int(pid)).status()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return "gone"


def container_state(container_id: str | None) -> str | None:
    if not container_id:
        return None
    try:
        out = subprocess.run(["podman", "inspect", "--format", "{{.State.Status}}", container_id],
                             capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or "gone" if out.returncode == 0 else "gone"


def provider_rows(records: Iterable[dict[str, Any]], *, now: float | None = None, host: str | None = None,
                  model_names: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Join each provider record (the wire form of ``ProviderStatus``) with live system state.

    Reads ``name``, ``provider`` (kind), ``mode``, ``state``, ``pid``,
    ``containerId``, ``unit``, ``health``, ``modelDigest`` (shown by name via
    ``model_names``), ``checkedAt`` and ``reason``; also ``lastHealthyAt`` and
    ``configured.model`` when a node records them. Live values come from
    systemd (``systemctl show``), podman (``podman inspect``) and /proc; every
    difference between what the node believes and what is found goes into
    ``drift``. Every row carries ``host``.
    """
    import socket as _socket

    now = time.time() if now is None else now
    host = host or _socket.gethostname()
    model_names = model_names or {}
    rows = []
    for record in records:
        name = _first(record, "name", "metadata.name") or "?"
        state = _first(record, "state", "status.state")
        unit = _first(record, "unit", "status.unit")
        pid = _first(record, "pid", "status.pid")
        container = _first(record, "containerId", "status.containerId")
        live_unit = systemd_unit_state(unit, user=os.getuid() != 0) if unit else None
        live_proc = process_state(pid)
        live_container = container_state(container)
        healthy_at = _parse_time(_first(record, "lastHealthyAt", "status.lastHealthyAt"))
        if healthy_at is None and (_first(record, "health") == "ok" or state == "running"):
            healthy_at = _parse_time(_first(record, "checkedAt", "status.checkedAt"))
        digest = _first(record, "modelDigest", "model.digest", "status.modelDigest")
        actual_model = _first(record, "model") if isinstance(_first(record, "model"), str) else None
        actual_model = actual_model or (model_names.get(digest, digest[:19] if digest else None))
        configured_model = _first(record, "configured.model", "desired.model")
        drift = list(_first(record, "drift", "status.drift") or [])
        should_run = state == "running" or _first(record, "configured.running") is True
        if configured_model and actual_model and configured_model != actual_model:
            drift.append(f"model: configured {configured_model}, serving {actual_model}")
        if should_run and pid and live_proc in (None, "gone", "zombie", "dead"):
            drift.append(f"process {pid} is {live_proc or 'unknown'} but the provider should run")
        if should_run and live_unit and not live_unit.startswith("active"):
            drift.append(f"unit {unit} is {live_unit} but the provider should run")
        if should_run and live_container and live_container != "running":
            drift.append(f"container is {live_container} but the provider should run")
        if state and state != "running" and _first(record, "reason"):
            drift.append(f"{state}: {_first(record, 'reason')}")
        rows.append({
            "host": host,
            "provider": name,
            "kind": _first(record, "provider", "providerKind", "kind"),
            "mode": _first(record, "mode"),
            "unit": unit,
            "unitState": live_unit,
            "state": state or live_container or live_proc,
            "containerState": live_container,
            "processState": live_proc,
            "pid": pid,
            "lastHealthyAt": healthy_at,
            "healthyAgo": None if healthy_at is None else _ago(now - healthy_at),
            "health": _first(record, "health"),
            "model": actual_model,
            "modelDigest": digest,
            "configuredModel": configured_model,
            "drift": drift,
            # A context the node places on (a slot of a replica): what it holds, whose, busy or idle.
            "replica": _first(record, "replica"),
            "slot": _first(record, "slot"),
            "heldTokens": _first(record, "heldTokens"),
            "owner": _first(record, "owner"),
            "busy": _first(record, "busy"),
        })
    return rows


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s ago"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"

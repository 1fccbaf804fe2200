"""Quadlet ``.container`` units for provider specs: render, parse back, install.

Rendering is gated on the target Podman version (`podman_versions`): a key
the target's Quadlet does not know is never written. Where a setting has a
``podman run`` flag, an older target gets it through ``PodmanArgs=`` instead
(health check on 4.4, ``--pull`` before 4.6, ``--group-add`` before 5.1,
``--stop-timeout`` before 5.0), so the container is the same on every version;
only ``Notify=healthy`` (5.0+) has no older equivalent: before 5.0 systemd
reports the unit started once the container runs, not once it is healthy.

What every unit carries: the port published on loopback only, the model
mounted read-only, the slot-save directory mounted read-write when tiering is
on, device passthrough per accelerator (NVIDIA through CDI, never with the
``-`` prefix that would drop it silently), a health check with
``HealthOnFailure=kill`` so systemd's ``Restart=`` acts, ``TimeoutStartSec``
covering image pull and model load, ``DropCapability=all``,
``NoNewPrivileges=true``, and labels naming the agent, provider and model digest.

The container runtime (e.g. runc instead of crun) is not a unit setting: set
``runtime`` in containers.conf on hosts that need it.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Mapping

from nodeagent.contracts.provider import ProviderSpec
from nodeagent.fsutil import atomic_write_text
from nodeagent.launch.container import ContainerShape, RenderError, parse_duration_s
from nodeagent.launch.health import wait_healthy
from nodeagent.launch.podman_versions import (
    NOTIFY_HEALTHY_MIN,
    QUADLET_MIN,
    PodmanVersion,
    container_key_supported,
    unsupported_keys,
)
from nodeagent.launch.registry import LaunchRecord, Registry
from nodeagent.launch.units import (
    UnitFile,
    UnitParseError,
    escape_value,
    parse_unit,
    quote_word,
    quote_words,
    split_words,
    unescape_value,
)

Scope = Literal["user", "system"]


@dataclass(frozen=True)
class QuadletOptions:
    scope: Scope = "user"
    restart: str = "on-failure"
    ulimits: tuple[str, ...] = ()  # host quirks, e.g. ("nofile=1024:1024",)


def unit_file_name(spec_or_name: ProviderSpec | str) -> str:
    name = spec_or_name if isinstance(spec_or_name, str) else spec_or_name.name
    return f"{name}.container"


def service_name(spec_or_name: ProviderSpec | str) -> str:
    name = spec_or_name if isinstance(spec_or_name, str) else spec_or_name.name
    return f"{name}.service"


def quadlet_dir(scope: Scope = "user", env: Mapping[str, str] | None = None) -> Path:
    """Where Quadlet looks for units: ``~/.config/containers/systemd`` (rootless)
    or ``/etc/containers/systemd`` (rootful)."""
    env = os.environ if env is None else env
    if scope == "system":
        return Path("/etc/containers/systemd")
    home = Path(env.get("HOME") or Path.home())
    return Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "containers" / "systemd"


def _seconds(value: int) -> str:
    return f"{value}s"


def health_cmd_value(command: list[str] | tuple[str, ...]) -> str:
    """Podman's exec form: a JSON array runs without a shell inside the image."""
    return json.dumps(list(command), separators=(",", ":"))


def render_quadlet(spec: ProviderSpec, version: PodmanVersion | str, options: QuadletOptions = QuadletOptions()) -> UnitFile:
    """The unit for ``spec`` as Quadlet of Podman ``version`` accepts it.

    Raises `RenderError` when ``version`` has no Quadlet at all (< 4.4).
    """
    version = PodmanVersion.parse(version)
    if version < QUADLET_MIN:
        raise RenderError(
            f"Podman {version} has no Quadlet (needs >= {QUADLET_MIN.short}); use --mode podman on this host"
        )
    if spec.mode != "quadlet":
        raise RenderError(f"{spec.name}: spec is for mode {spec.mode}, not quadlet")
    shape = ContainerShape.from_spec(spec, ulimits=options.ulimits)

    unit = UnitFile(header=[
        f"agent-machine provider {spec.name}: {spec.provider} on {spec.accelerator}, model {spec.model.name}",
        f"Rendered for Podman {version.short}; agent-machine rewrites this file, do not edit.",
    ])
    u = unit.section("Unit")
    u.add("Description", f"agent-machine provider {spec.name} ({spec.provider}, {spec.model.name})")

    c = unit.section("Container")
    podman_args: list[str] = []

    def put(key: str, value: str, flag: str | None = None, flag_value: str | None = None) -> None:
        """Write ``key`` if the target knows it, else the equivalent podman flag."""
        if container_key_supported(key, version, value):
            c.add(key, escape_value(value))
        elif flag is not None:
            podman_args.append(f"{flag}={value if flag_value is None else flag_value}")
        else:
            raise RenderError(f"{key}={value} is not expressible for Podman {version.short}")

    put("ContainerName", shape.name)
    put("Image", shape.image)
    if shape.pull != "missing":
        put("Pull", shape.pull, "--pull")
    if shape.args:
        c.add("Exec", escape_value(quote_words(shape.args)))
    for key, value in shape.env:
        c.add("Environment", escape_value(quote_word(f"{key}={value}")))
    for publish in shape.publish:
        put("PublishPort", publish)
    for volume in shape.volumes:
        put("Volume", volume)
    for source, optional in shape.devices:
        put("AddDevice", f"-{source}" if optional else source)
    for group in shape.group_add:
        put("GroupAdd", group, "--group-add")
    if shape.security_label_disable:
        put("SecurityLabelDisable", "true", "--security-opt", "label=disable")
    if shape.drop_all_capabilities:
        put("DropCapability", "all")
    if shape.no_new_privileges:
        put("NoNewPrivileges", "true")
    for key, value in shape.labels:
        c.add("Label", escape_value(quote_word(f"{key}={value}")))
    if shape.health_cmd:
        put("HealthCmd", health_cmd_value(shape.health_cmd), "--health-cmd")
        put("HealthInterval", _seconds(shape.health_interval_s or 30), "--health-interval")
        put("HealthTimeout", _seconds(shape.health_timeout_s or 5), "--health-timeout")
        put("HealthStartPeriod", _seconds(shape.health_start_period_s or 0), "--health-start-period")
        put("HealthRetries", str(shape.health_retries or 3), "--health-retries")
        if shape.health_on_failure:
            put("HealthOnFailure", shape.health_on_failure, "--health-on-failure")
        if version >= NOTIFY_HEALTHY_MIN:
            c.add("Notify", "healthy")
    if shape.stop_timeout_s is not None:
        put("StopTimeout", str(shape.stop_timeout_s), "--stop-timeout")
    if shape.shm_size:
        put("ShmSize", shape.shm_size, "--shm-size")
    for ulimit in shape.ulimits:
        put("Ulimit", ulimit, "--ulimit")
    if shape.ipc_host:
        podman_args.append("--ipc=host")  # Quadlet has no Ipc= key
    if podman_args:
        c.add("PodmanArgs", escape_value(quote_words(podman_args)))

    s = unit.section("Service")
    s.add("Restart", options.restart)
    s.add("TimeoutStartSec", str(spec.start_timeout_s))
    s.add("TimeoutStopSec", str(spec.stop_timeout_s + 30))

    i = unit.section("Install")
    i.add("WantedBy", "default.target" if options.scope == "user" else "multi-user.target")

    problems = unsupported_keys(unit.as_pairs(), version)
    if problems:  # the renderer's own gate failed: a bug, never ship the unit
        raise RenderError("rendered unit would be refused: " + "; ".join(problems))
    return unit


def render_quadlet_text(spec: ProviderSpec, version: PodmanVersion | str, options: QuadletOptions = QuadletOptions()) -> str:
    return render_quadlet(spec, version, options).render()


# ------------------------------------------------------------------ parse back
@dataclass(frozen=True)
class ParsedQuadlet:
    shape: ContainerShape
    notify_healthy: bool
    timeout_start_s: int | None
    restart: str | None
    wanted_by: tuple[str, ...]


_FLAG_FIELDS = {
    "--health-cmd", "--health-interval", "--health-timeout", "--health-start-period", "--health-retries",
    "--health-on-failure", "--security-opt", "--group-add", "--ipc", "--shm-size", "--stop-timeout",
    "--ulimit", "--pull",
}


def _podman_args_pairs(values: list[str]) -> list[tuple[str, str]]:
    words: list[str] = []
    for value in values:
        words += split_words(unescape_value(value))
    pairs = []
    i = 0
    while i < len(words):
        word = words[i]
        if "=" in word and word.startswith("--"):
            flag, value = word.split("=", 1)
        elif word.startswith("--") and i + 1 < len(words):
            flag, value = word, words[i + 1]
            i += 1
        else:
            raise UnitParseError(f"PodmanArgs: cannot read {word!r}")
        if flag not in _FLAG_FIELDS:
            raise UnitParseError(f"PodmanArgs: {flag} is not a flag agent-machine writes")
        pairs.append((flag, value))
        i += 1
    return pairs


def _single_word(value: str, key: str) -> str:
    words = split_words(unescape_value(value))
    if len(words) != 1:
        raise UnitParseError(f"{key}={value}: expected one KEY=VALUE word")
    return words[0]


def parse_quadlet(text: str, source: str = "<unit>") -> ParsedQuadlet:
    """Read a `.container` unit back into a `ContainerShape` (native keys and
    their ``PodmanArgs=`` fallbacks both count)."""
    unit = parse_unit(text, source)
    c = unit.section("Container", create=False) if unit.has_section("Container") else None
    if c is None:
        raise UnitParseError(f"{source}: no [Container] section")

    def last(key: str) -> str | None:
        value = c.get(key)
        return unescape_value(value) if value is not None else None

    flags = _podman_args_pairs(c.get_all("PodmanArgs"))
    flag_map: dict[str, list[str]] = {}
    for flag, value in flags:
        flag_map.setdefault(flag, []).append(value)

    def native_or_flag(key: str, flag: str) -> str | None:
        value = last(key)
        if value is not None:
            return value
        values = flag_map.get(flag)
        return values[-1] if values else None

    health_cmd_text = native_or_flag("HealthCmd", "--health-cmd")
    health_cmd = tuple(json.loads(health_cmd_text)) if health_cmd_text else None

    def seconds(key: str, flag: str) -> int | None:
        value = native_or_flag(key, flag)
        return parse_duration_s(value) if value is not None else None

    devices = []
    for value in c.get_all("AddDevice"):
        value = unescape_value(value)
        devices.append((value[1:], True) if value.startswith("-") else (value, False))
    env = []
    for value in c.get_all("Environment"):
        for word in split_words(unescape_value(value)):
            key, _, val = word.partition("=")
            env.append((key, val))
    labels = []
    for value in c.get_all("Label"):
        key, _, val = _single_word(value, "Label").partition("=")
        labels.append((key, val))
    security_opts = flag_map.get("--security-opt", [])
    stop_timeout = native_or_flag("StopTimeout", "--stop-timeout")
    retries = native_or_flag("HealthRetries", "--health-retries")
    shape = ContainerShape(
        name=last("ContainerName") or "",
        image=last("Image") or "",
        args=tuple(split_words(unescape_value(c.get("Exec") or ""))),
        pull=native_or_flag("Pull", "--pull") or "missing",
        env=tuple(sorted(env)),
        publish=tuple(unescape_value(v) for v in c.get_all("PublishPort")),
        volumes=tuple(unescape_value(v) for v in c.get_all("Volume")),
        devices=tuple(devices),
        group_add=tuple([unescape_value(v) for v in c.get_all("GroupAdd")] + flag_map.get("--group-add", [])),
        labels=tuple(sorted(labels)),
        health_cmd=health_cmd,
        health_interval_s=seconds("HealthInterval", "--health-interval"),
        health_timeout_s=seconds("HealthTimeout", "--health-timeout"),
        health_start_period_s=seconds("HealthStartPeriod", "--health-start-period"),
        health_retries=int(retries) if retries is not None else None,
        health_on_failure=native_or_flag("HealthOnFailure", "--health-on-failure"),
        drop_all_capabilities="all" in [unescape_value(v) for v in c.get_all("DropCapability")],
        no_new_privileges=(last("NoNewPrivileges") or "").lower() in ("true", "yes", "1"),
        security_label_disable=(last("SecurityLabelDisable") or "").lower() in ("true", "yes", "1")
        or "label=disable" in security_opts,
        ipc_host="host" in flag_map.get("--ipc", []),
        shm_size=native_or_flag("ShmSize", "--shm-size"),
        stop_timeout_s=int(stop_timeout) if stop_timeout is not None else None,
        ulimits=tuple([unescape_value(v) for v in c.get_all("Ulimit")] + flag_map.get("--ulimit", [])),
    )
    timeout = unit.get("Service", "TimeoutStartSec")
    return ParsedQuadlet(
        shape=shape,
        notify_healthy=(last("Notify") or "") == "healthy",
        timeout_start_s=parse_duration_s(timeout) if timeout else None,
        restart=unit.get("Service", "Restart"),
        wanted_by=tuple(unit.get_all("Install", "WantedBy")),
    )


def compare_unit_with_spec(
    text: str, spec: ProviderSpec, version: PodmanVersion | str, options: QuadletOptions = QuadletOptions()
) -> list[str]:
    """Parse a written unit and list every way it differs from what ``spec``
    asks for on Podman ``version``. Empty means the unit realizes the spec."""
    version = PodmanVersion.parse(version)
    parsed = parse_quadlet(text)
    problems = ContainerShape.from_spec(spec, ulimits=options.ulimits).differences(parsed.shape)
    want_notify = bool(spec.health.command) and version >= NOTIFY_HEALTHY_MIN
    if parsed.notify_healthy != want_notify:
        problems.append(f"notify_healthy: expected {want_notify}, found {parsed.notify_healthy}")
    if parsed.timeout_start_s != spec.start_timeout_s:
        problems.append(f"timeout_start_s: expected {spec.start_timeout_s}, found {parsed.timeout_start_s}")
    problems += [f"key gate: {p}" for p in unsupported_keys(parse_unit(text).as_pairs(), version)]
    return problems


# ------------------------------------------------------------------ install and run
QUADLET_GENERATORS = ("/usr/libexec/podman/quadlet", "/usr/lib/podman/quadlet")


class QuadletUnavailable(RuntimeError):
    """Quadlet mode cannot work on this host; the message says why and what to use instead."""


def find_quadlet_generator(candidates: tuple[str, ...] | None = None) -> str | None:
    """The Quadlet generator: $AGENT_MACHINE_QUADLET, Podman's own, then one that
    scripts/fetch-quadlet.sh placed in the per-machine cache (newest version first)."""
    if candidates is None:
        import glob

        cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        fetched = sorted(glob.glob(os.path.join(cache, "agent-machine", "quadlet", "*", "quadlet")), reverse=True)
        candidates = (os.environ.get("AGENT_MACHINE_QUADLET", ""), *QUADLET_GENERATORS, *fetched)
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    return None


@dataclass
class QuadletLauncher:
    """Write a unit, ``systemctl [--user] daemon-reload``, start it, wait for health.

    ``version`` is the probed Podman version (`MachineProfile.runtime.podman.version`);
    units are rendered for it. Rootless (``scope="user"``) units need a
    reachable systemd user manager, and lingering (``loginctl enable-linger``)
    to start at boot without a login; `warnings` says when lingering is off.
    """

    registry: Registry
    version: PodmanVersion
    options: QuadletOptions = QuadletOptions()
    unit_dir: Path | None = None
    run: Callable[[list[str]], subprocess.CompletedProcess[str]] | None = None
    warnings: list[str] = field(default_factory=list)

    def _run(self, argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
        if self.run is not None:
            return self.run(argv)
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: not installed")
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(argv, 124, "", f"{' '.join(argv)}: timed out after {timeout:g}s")

    def _systemctl(self, *args: str) -> list[str]:
        return ["systemctl", *(["--user"] if self.options.scope == "user" else []), *args]

    def directory(self) -> Path:
        return self.unit_dir or quadlet_dir(self.options.scope)

    def check_available(self) -> None:
        """Raise `QuadletUnavailable` unless units written now would run."""
        version = PodmanVersion.parse(self.version)
        if version < QUADLET_MIN:
            raise QuadletUnavailable(
                f"Podman {version} has no Quadlet (it starts at {QUADLET_MIN.short}); "
                "use --mode podman, or install Podman >= 4.4")
        probe = self._run(self._systemctl("show-environment"))
        if probe.returncode != 0:
            who = "user manager" if self.options.scope == "user" else "system manager"
            raise QuadletUnavailable(
                f"no systemd {who} is reachable ({(probe.stderr or probe.stdout).strip().splitlines()[-1:] or ['?']}); "
                "quadlet mode needs systemd: use --mode podman here, or log in / `loginctl enable-linger` first")
        if self.options.scope == "user":
            user = os.environ.get("USER") or str(os.getuid())
            linger = self._run(["loginctl", "show-user", user, "--property=Linger"])
            if linger.returncode != 0 or "Linger=yes" not in linger.stdout:
                self.warnings.append(f"lingering is off for {user}: the provider stops at logout and does not "
                                     f"start at boot (`loginctl enable-linger {user}`)")

    def write_unit(self, spec: ProviderSpec) -> Path:
        text = render_quadlet_text(spec, self.version, self.options)
        path = self.directory() / unit_file_name(spec)
        atomic_write_text(path, text)
        return path

    def up(self, spec: ProviderSpec, wait: bool = True) -> LaunchRecord:
        self.check_available()
        path = self.write_unit(spec)
        for argv in (self._systemctl("daemon-reload"), self._systemctl("start", service_name(spec))):
            done = self._run(argv, timeout=spec.start_timeout_s + 30)
            if done.returncode != 0:
                raise QuadletUnavailable(f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()[-1500:]}")
        record = LaunchRecord(spec=spec, started_at=time.time(), unit_path=str(path))
        self.registry.save(record)
        if wait:
            wait_healthy(spec.base_url, spec.health.path, spec.start_timeout_s,
                         still_running=lambda: None if self.state(spec.name) in ("active", "activating")
                         else f"{service_name(spec)} is {self.state(spec.name)}:\n{self.logs(spec.name, 30)}")
        return record

    def state(self, name: str) -> str:
        done = self._run(self._systemctl("is-active", service_name(name)))
        return done.stdout.strip() or "unknown"

    def logs(self, name: str, lines: int = 100) -> str:
        argv = ["journalctl", *(["--user"] if self.options.scope == "user" else []),
                "-u", service_name(name), "-n", str(lines), "--no-pager"]
        done = self._run(argv)
        return (done.stdout + done.stderr).strip()

    def down(self, name: str, missing_ok: bool = False) -> bool:
        """Stop the service and remove its unit (so it does not come back at boot)."""
        record = self.registry.load(name)
        path = Path(record.unit_path) if record and record.unit_path else self.directory() / unit_file_name(name)
        if not path.exists() and record is None:
            if missing_ok:
                return False
            raise QuadletUnavailable(f"no quadlet unit for {name} in {self.directory()}")
        self._run(self._systemctl("stop", service_name(name)))
        path.unlink(missing_ok=True)
        self._run(self._systemctl("daemon-reload"))
        self.registry.remove(name)
        return True

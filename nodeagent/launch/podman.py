"""Direct ``podman run`` of a provider spec, without systemd.

`podman_run_argv` renders the command line (flags gated on the Podman
version, as the Quadlet renderer gates keys); `parse_podman_run_argv` reads a
``podman run`` command line back into a `ContainerShape` — the same parser
reads the ``ExecStart=`` that Quadlet generates, so a unit can be checked
against its spec through Quadlet's own output.

`PodmanHostConfig` carries what a host needs on every podman call and is not
part of a spec: the OCI runtime (crun cannot create containers under a hybrid
cgroup v1 hierarchy here; runc can) and ulimits (Podman raises a rootful
container's nofile/nproc limits to values above what a constrained host, e.g.
a container itself, allows). It is detected from the host, or configured with
``AGENT_MACHINE_PODMAN_RUNTIME`` and ``AGENT_MACHINE_PODMAN_ULIMITS``
(comma-separated ``name=soft:hard``).

`PodmanLauncher` runs, stops, inspects and reads logs of provider containers
and records them in the launch `Registry`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

from nodeagent.contracts.provider import ProviderSpec
from nodeagent.launch.container import ContainerShape, RenderError, parse_duration_s
from nodeagent.launch.health import StartFailed, wait_healthy
from nodeagent.launch.podman_versions import PodmanVersion
from nodeagent.launch.quadlet import health_cmd_value
from nodeagent.launch.registry import LaunchRecord, Registry

HEALTH_ON_FAILURE_MIN = PodmanVersion(4, 3, 0)  # podman run --health-on-failure

# What rootful Podman sets a container's limits to when not told otherwise.
# If the host's hard limit is lower, the OCI runtime fails with EPERM.
PODMAN_DEFAULT_RLIMITS = {"nofile": 1048576, "nproc": 4194304}
_RLIMIT_IDS = {"nofile": resource.RLIMIT_NOFILE, "nproc": resource.RLIMIT_NPROC}


class PodmanError(RuntimeError):
    """A podman command failed; the message carries its stderr."""


@dataclass(frozen=True)
class PodmanHostConfig:
    podman: str = "podman"
    runtime: str | None = None  # global --runtime
    ulimits: tuple[str, ...] = ()  # name=soft:hard, passed to every run
    reasons: tuple[str, ...] = ()  # how each setting was chosen, for `doctor`/logs

    def global_args(self) -> list[str]:
        return ["--runtime", self.runtime] if self.runtime else []

    def base(self) -> list[str]:
        return [self.podman, *self.global_args()]

    @classmethod
    def detect(cls, env: Mapping[str, str] | None = None, root: str | os.PathLike[str] = "/",
               which: Callable[[str], str | None] = shutil.which,
               rlimits: Callable[[str], tuple[int, int]] | None = None) -> "PodmanHostConfig":
        """Choose runtime and ulimits for this host; environment settings win."""
        env = os.environ if env is None else env
        reasons: list[str] = []
        podman = env.get("AGENT_MACHINE_PODMAN", "podman")

        runtime: str | None = env.get("AGENT_MACHINE_PODMAN_RUNTIME") or None
        if runtime:
            reasons.append(f"runtime {runtime}: from AGENT_MACHINE_PODMAN_RUNTIME")
        else:
            layout = cgroup_layout(root)
            if layout in ("v1", "hybrid") and which("runc"):
                runtime = "runc"
                reasons.append(f"runtime runc: cgroup {layout} hierarchy (crun fails to create containers there)")
            elif layout in ("v1", "hybrid"):
                reasons.append(f"cgroup {layout} hierarchy but no runc installed: podman's default runtime may fail")

        ulimits: list[str] = []
        configured = env.get("AGENT_MACHINE_PODMAN_ULIMITS")
        if configured is not None:
            ulimits = [u.strip() for u in configured.split(",") if u.strip()]
            reasons.append(f"ulimits {ulimits}: from AGENT_MACHINE_PODMAN_ULIMITS")
        else:
            read = rlimits or (lambda name: resource.getrlimit(_RLIMIT_IDS[name]))
            pid_max = _read_int(Path(root) / "proc/sys/kernel/pid_max")
            for name, podman_default in PODMAN_DEFAULT_RLIMITS.items():
                _soft, hard = read(name)
                ceiling = podman_default if hard == resource.RLIM_INFINITY else hard
                why = f"host hard limit {hard}"
                if name == "nproc" and pid_max is not None and pid_max < ceiling:
                    # Podman caps its own (and so conmon's) nproc at pid_max; the
                    # runtime cannot raise the container above that.
                    ceiling, why = pid_max, f"kernel pid_max {pid_max}"
                if ceiling < podman_default:
                    ulimits.append(f"{name}={ceiling}:{ceiling}")
                    reasons.append(f"ulimit {name}={ceiling}:{ceiling}: {why} < podman default {podman_default}")
        return cls(podman=podman, runtime=runtime, ulimits=tuple(ulimits), reasons=tuple(reasons))


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def cgroup_layout(root: str | os.PathLike[str] = "/") -> str:
    """'v2' (unified), 'hybrid' (v1 controllers + unified mount), 'v1', or 'unknown'."""
    base = Path(root) / "sys/fs/cgroup"
    if (base / "cgroup.controllers").exists():
        return "v2"
    if (base / "unified").is_dir() and any((base / c).is_dir() for c in ("memory", "cpu", "pids")):
        return "hybrid"
    if any((base / c).is_dir() for c in ("memory", "cpu", "pids")):
        return "v1"
    return "unknown"


def podman_version(config: PodmanHostConfig | None = None, timeout_s: float = 10) -> PodmanVersion:
    config = config or PodmanHostConfig()
    try:
        done = subprocess.run([config.podman, "version", "--format", "{{.Client.Version}}"],
                              capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError:
        raise PodmanError(f"{config.podman}: not installed") from None
    if done.returncode != 0:
        raise PodmanError(f"podman version failed: {done.stderr.strip()}")
    return PodmanVersion.parse(done.stdout.strip())


# ------------------------------------------------------------------ render
def podman_run_argv(
    spec: ProviderSpec,
    version: PodmanVersion | str,
    host: PodmanHostConfig = PodmanHostConfig(),
    device_exists: Callable[[str], bool] = os.path.exists,
    detach: bool = True,
) -> list[str]:
    """``podman run`` for ``spec``. Optional devices absent on this host are left out."""
    version = PodmanVersion.parse(version)
    if spec.mode != "podman":
        raise RenderError(f"{spec.name}: spec is for mode {spec.mode}, not podman")
    shape = ContainerShape.from_spec(spec, ulimits=host.ulimits, device_exists=device_exists)
    argv = [*host.base(), "run"]
    if detach:
        argv.append("-d")
    argv += ["--name", shape.name, "--replace"]
    if shape.pull != "missing":
        argv.append(f"--pull={shape.pull}")
    for key, value in shape.env:
        argv += ["--env", f"{key}={value}"]
    for publish in shape.publish:
        argv += ["--publish", publish]
    for volume in shape.volumes:
        argv += ["--volume", volume]
    for source, _optional in shape.devices:
        argv += ["--device", source]
    for group in shape.group_add:
        argv += ["--group-add", group]
    if shape.security_label_disable:
        argv += ["--security-opt", "label=disable"]
    if shape.drop_all_capabilities:
        argv += ["--cap-drop", "all"]
    if shape.no_new_privileges:
        argv += ["--security-opt", "no-new-privileges"]
    for key, value in shape.labels:
        argv += ["--label", f"{key}={value}"]
    if shape.health_cmd:
        argv += ["--health-cmd", health_cmd_value(shape.health_cmd),
                 "--health-interval", f"{shape.health_interval_s}s",
                 "--health-timeout", f"{shape.health_timeout_s}s",
                 "--health-start-period", f"{shape.health_start_period_s}s",
                 "--health-retries", str(shape.health_retries)]
        if shape.health_on_failure and version >= HEALTH_ON_FAILURE_MIN:
            argv += ["--health-on-failure", shape.health_on_failure]
    if shape.stop_timeout_s is not None:
        argv += ["--stop-timeout", str(shape.stop_timeout_s)]
    if shape.shm_size:
        argv += ["--shm-size", shape.shm_size]
    for ulimit in shape.ulimits:
        argv += ["--ulimit", ulimit]
    if shape.ipc_host:
        argv += ["--ipc", "host"]
    argv.append(shape.image)
    argv += list(shape.args)
    return argv


# Flags Quadlet adds for its own bookkeeping; they do not change the container.
_QUADLET_BOOKKEEPING = {"--cidfile", "--cgroups", "--sdnotify"}
_BOOLEAN_FLAGS = {"-d", "--detach", "--replace", "--rm"}


def parse_podman_run_argv(argv: Sequence[str]) -> tuple[ContainerShape, dict[str, str]]:
    """Read a ``podman [global] run ... IMAGE ARGS`` command line back.

    Returns the shape and the bookkeeping flags seen (``--sdnotify`` etc.).
    Raises ValueError on a flag agent-machine never writes.
    """
    words = list(argv)
    try:
        start = words.index("run") + 1
    except ValueError:
        raise ValueError("not a podman run command line") from None
    values: dict[str, list[str]] = {}
    bookkeeping: dict[str, str] = {}
    i = start
    while i < len(words):
        word = words[i]
        if not word.startswith("-"):
            break
        if word in _BOOLEAN_FLAGS:
            i += 1
            continue
        if "=" in word and word.startswith("--"):
            flag, value = word.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(words):
                raise ValueError(f"flag {word} has no value")
            flag, value = word, words[i + 1]
            i += 2
        flag = {"-v": "--volume", "-p": "--publish", "-e": "--env", "-l": "--label"}.get(flag, flag)
        if flag in _QUADLET_BOOKKEEPING:
            bookkeeping[flag] = value
            continue
        values.setdefault(flag, []).append(value)
    if i >= len(words):
        raise ValueError("podman run command line has no image")
    image, args = words[i], tuple(words[i + 1:])
    known = {"--name", "--pull", "--env", "--publish", "--volume", "--device", "--group-add", "--security-opt",
             "--cap-drop", "--label", "--health-cmd", "--health-interval", "--health-timeout",
             "--health-start-period", "--health-retries", "--health-on-failure", "--stop-timeout",
             "--shm-size", "--ulimit", "--ipc"}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unexpected podman run flag(s) {unknown}")

    def last(flag: str) -> str | None:
        return values[flag][-1] if flag in values else None

    def secs(flag: str) -> int | None:
        value = last(flag)
        return parse_duration_s(value) if value is not None else None

    health = last("--health-cmd")
    security = values.get("--security-opt", [])
    retries, stop = last("--health-retries"), last("--stop-timeout")
    shape = ContainerShape(
        name=last("--name") or "",
        image=image,
        args=args,
        pull=last("--pull") or "missing",
        env=tuple(sorted(tuple(e.split("=", 1)) for e in values.get("--env", []))),  # type: ignore[misc]
        publish=tuple(values.get("--publish", [])),
        volumes=tuple(values.get("--volume", [])),
        # a device passed to podman run is present; whether it was optional is not visible here
        devices=tuple((d, False) for d in values.get("--device", [])),
        group_add=tuple(values.get("--group-add", [])),
        labels=tuple(sorted(tuple(label.split("=", 1)) for label in values.get("--label", []))),  # type: ignore[misc]
        health_cmd=tuple(json.loads(health)) if health else None,
        health_interval_s=secs("--health-interval"),
        health_timeout_s=secs("--health-timeout"),
        health_start_period_s=secs("--health-start-period"),
        health_retries=int(retries) if retries is not None else None,
        health_on_failure=last("--health-on-failure"),
        drop_all_capabilities="all" in values.get("--cap-drop", []),
        no_new_privileges="no-new-privileges" in security,
        security_label_disable="label=disable" in security,
        ipc_host="host" in values.get("--ipc", []),
        shm_size=last("--shm-size"),
        stop_timeout_s=int(stop) if stop is not None else None,
        ulimits=tuple(values.get("--ulimit", [])),
    )
    return shape, bookkeeping


# ------------------------------------------------------------------ launcher
@dataclass
class PodmanLauncher:
    """Run provider containers with ``podman run -d`` and keep a record of them."""

    registry: Registry
    host: PodmanHostConfig = field(default_factory=PodmanHostConfig.detect)
    version: PodmanVersion | None = None  # probed when None
    timeout_s: float = 120  # for podman commands other than waiting for health

    def _version(self) -> PodmanVersion:
        if self.version is None:
            self.version = podman_version(self.host)
        return self.version

    def _podman(self, *args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [*self.host.base(), *args]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout or self.timeout_s)
        except FileNotFoundError:
            raise PodmanError(f"{self.host.podman}: not installed") from None
        except subprocess.TimeoutExpired:
            raise PodmanError(f"`{' '.join(cmd)}` did not finish within {timeout or self.timeout_s:g}s") from None
        if check and done.returncode != 0:
            raise PodmanError(f"`{' '.join(cmd[:4])} ...` failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return done

    def render(self, spec: ProviderSpec) -> list[str]:
        return podman_run_argv(spec, self._version(), self.host)

    def up(self, spec: ProviderSpec, wait: bool = True) -> LaunchRecord:
        """Start the container (replacing one of the same name) and, with
        ``wait``, block until its health path answers 200."""
        for device in spec.devices:
            if not device.optional and device.source.startswith("/") and not os.path.exists(device.source):
                raise PodmanError(f"{spec.name}: device {device.source} does not exist on this host "
                                  f"(accelerator {spec.accelerator})")
        for mount in spec.mounts:
            if not os.path.exists(mount.source):
                raise PodmanError(f"{spec.name}: mount source {mount.source} does not exist")
        if spec.pull == "never" and spec.image:
            if self._podman("image", "exists", spec.image, check=False).returncode != 0:
                raise PodmanError(f"{spec.name}: image {spec.image} is not present and pull=never")
        argv = self.render(spec)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=max(self.timeout_s, spec.start_timeout_s))
        if done.returncode != 0:
            raise PodmanError(f"{spec.name}: podman run failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        container_id = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else None
        record = LaunchRecord(spec=spec, started_at=time.time(), container_id=container_id)
        self.registry.save(record)
        if wait:
            try:
                wait_healthy(spec.base_url, spec.health.path, spec.start_timeout_s,
                             still_running=lambda: self._dead_reason(spec.name))
            except StartFailed:
                self.down(spec.name, missing_ok=True)
                raise
        return record

    def _dead_reason(self, name: str) -> str | None:
        state = self.state(name)
        if state in ("running", "starting", "created", "configured"):
            return None
        logs = self.logs(name, lines=30)
        return f"container {name} is {state}; last log lines:\n{logs}"

    def state(self, name: str) -> str:
        """Podman's state of the container: running, exited, ... or 'absent'."""
        done = self._podman("inspect", "--type", "container", "--format", "{{.State.Status}}", name, check=False)
        if done.returncode != 0:
            return "absent"
        return done.stdout.strip() or "unknown"

    def inspect(self, name: str) -> dict | None:
        done = self._podman("inspect", "--type", "container", name, check=False)
        if done.returncode != 0:
            return None
        data = json.loads(done.stdout or "[]")
        return data[0] if data else None

    def logs(self, name: str, lines: int = 100) -> str:
        done = self._podman("logs", "--tail", str(lines), name, check=False)
        return (done.stdout + done.stderr).strip()

    def down(self, name: str, missing_ok: bool = False) -> bool:
        """Stop and remove the container; True if there was one."""
        record = self.registry.load(name)
        stop_timeout = record.spec.stop_timeout_s if record else 10
        if self.state(name) == "absent":
            self.registry.remove(name)
            if missing_ok:
                return False
            raise PodmanError(f"no container named {name}")
        self._podman("stop", "--time", str(stop_timeout), name, check=False, timeout=stop_timeout + 60)
        self._podman("rm", "--force", name, timeout=60)
        self.registry.remove(name)
        return True


# ------------------------------------------------------------------ local images
def shared_libraries(binary: str | os.PathLike[str]) -> list[Path]:
    """The shared objects ``binary`` loads (``ldd``), including the dynamic loader."""
    done = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise PodmanError(f"ldd {binary}: {done.stderr.strip() or done.stdout.strip()}")
    libraries = []
    for line in done.stdout.splitlines():
        for word in line.split():
            if word.startswith("/") and os.path.exists(word):
                libraries.append(Path(word))
    return libraries


def build_local_image(binary: str | os.PathLike[str], tag: str, host: PodmanHostConfig | None = None,
                      entrypoint: str = "/app/llama-server", timeout_s: float = 600) -> str:
    """Build ``tag`` offline: FROM scratch with ``binary`` at ``entrypoint`` and
    the libraries it links. No network, no base image. Returns the image id."""
    import tempfile

    host = host or PodmanHostConfig()
    binary = Path(binary)
    with tempfile.TemporaryDirectory(prefix="agent-machine-image-") as tmp:
        context = Path(tmp) / "root"
        target = context / entrypoint.lstrip("/")
        target.parent.mkdir(parents=True)
        shutil.copy2(binary, target)
        for library in shared_libraries(binary):
            dest = context / str(library).lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(library.resolve(), dest)
            os.chmod(dest, 0o755)
        containerfile = Path(tmp) / "Containerfile"
        containerfile.write_text(f'FROM scratch\nCOPY . /\nENTRYPOINT ["{entrypoint}"]\n')
        done = subprocess.run([host.podman, "build", "--quiet", "--pull=never", "-t", tag, "-f", str(containerfile),
                               str(context)], capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise PodmanError(f"podman build {tag}: {done.stderr.strip()[-1500:]}")
    return done.stdout.strip().splitlines()[-1]

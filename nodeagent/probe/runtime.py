"""Runtime: Podman (and Quadlet), CDI specs, cgroup version, systemd user manager,
lingering, and the Python inference engines (found, never imported).

llama-cpp-python is not imported here: importing it loads libllama and every
ggml backend library (hundreds of milliseconds, and a crash risk on a broken
GPU stack). Its package directory is located with the import machinery's path
finder over ``System.python_path`` and the backends are read from the names of
the ggml libraries it ships (``lib/libggml-<backend>.so``).
"""

from __future__ import annotations

import json
import re
from importlib.machinery import PathFinder
from pathlib import Path

from nodeagent.contracts.machine import CdiInfo, PodmanInfo, ProbeStatus, PythonBackendInfo, RuntimeInfo
from nodeagent.probe import commands
from nodeagent.probe.memory import cgroup_layout
from nodeagent.probe.system import System

QUADLET_MIN = (4, 4)
CDI_DIRS = ("/etc/cdi", "/var/run/cdi")
# `systemctl --user is-system-running` states in which the manager answers.
REACHABLE_STATES = {"initializing", "starting", "running", "degraded", "maintenance", "stopping"}
# ggml library suffix -> backend name used across agent-machine.
GGML_BACKENDS = {"cpu": "cpu", "cuda": "cuda", "vulkan": "vulkan", "hip": "rocm", "metal": "metal",
                 "sycl": "sycl", "opencl": "opencl", "blas": "blas", "musa": "musa", "cann": "cann",
                 "rpc": "rpc"}


def parse_version(text: str) -> tuple[int, ...] | None:
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        return None
    return tuple(int(g) for g in match.groups() if g is not None)


def probe_podman(system: System) -> PodmanInfo:
    argv, timeout = commands.PODMAN_VERSION
    result = system.run(argv, timeout)
    rootless = system.euid != 0
    if not result.ok:
        if result.error and result.error.endswith("command not found"):
            return PodmanInfo(status=ProbeStatus.absent, reason="podman is not installed", rootless=rootless)
        return PodmanInfo(status=ProbeStatus.error, reason=result.describe_failure(), rootless=rootless)
    version = parse_version(result.stdout)
    if version is None:
        return PodmanInfo(status=ProbeStatus.error, rootless=rootless,
                          reason=f"could not read a version from {result.stdout.strip()[:80]!r}")
    text = ".".join(map(str, version))
    quadlet = version[:2] >= QUADLET_MIN
    return PodmanInfo(
        status=ProbeStatus.ok,
        reason=None if quadlet else f"Podman {text} predates Quadlet (4.4): the quadlet launch mode is unavailable",
        version=text,
        quadlet=quadlet,
        rootless=rootless,
    )


def _cdi_devices_yaml(text: str) -> tuple[str | None, list[str]]:
    """``kind`` and device names from a block-style CDI YAML spec.

    Enough YAML for what nvidia-ctk and other generators write: a top-level
    ``kind:``, a top-level ``devices:`` list whose items carry ``name:`` at the
    item's own indentation (before or after other keys).
    """
    kind = None
    names: list[str] = []
    in_devices = False
    item_indent: int | None = None
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].rstrip()
        if not line.strip() or line.strip() in ("---", "..."):
            continue
        indent = len(line) - len(line.lstrip())
        stripped = line.strip()
        if indent == 0 and not stripped.startswith("-"):
            key, _, value = stripped.partition(":")
            in_devices = key == "devices"
            item_indent = None
            if key == "kind":
                kind = value.strip().strip("'\"")
            continue
        if not in_devices:
            continue
        if stripped.startswith("- "):
            if item_indent is None:
                item_indent = indent
            if indent == item_indent:
                stripped = stripped[2:].strip()
                indent = indent + 2
        if item_indent is not None and indent == item_indent + 2:
            match = re.match(r"name:\s*(.+)$", stripped)
            if match:
                names.append(match.group(1).strip().strip("'\""))
    return kind, names


def _cdi_devices_json(text: str) -> tuple[str | None, list[str]]:
    spec = json.loads(text)
    return spec.get("kind"), [str(d["name"]) for d in spec.get("devices", []) if "name" in d]


def probe_cdi(system: System) -> CdiInfo:
    files: list[str] = []
    devices: list[str] = []
    problems: list[str] = []
    parsed = 0
    for directory in CDI_DIRS:
        for name in system.listdir(directory):
            if not name.endswith((".yaml", ".yml", ".json")):
                continue
            path = f"{directory}/{name}"
            text = system.read_text(path)
            if text is None:
                problems.append(f"{path}: unreadable")
                continue
            files.append(path)
            try:
                kind, names = (_cdi_devices_json if name.endswith(".json") else _cdi_devices_yaml)(text)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                problems.append(f"{path}: not a CDI spec ({exc})")
                continue
            if not kind:
                problems.append(f"{path}: no kind")
                continue
            parsed += 1
            devices.extend(f"{kind}={n}" for n in names)
    if not files and not problems:
        return CdiInfo(status=ProbeStatus.absent, reason=f"no CDI spec files in {' or '.join(CDI_DIRS)}")
    return CdiInfo(status=ProbeStatus.ok if parsed else ProbeStatus.error, reason="; ".join(problems) or None,
                   spec_files=files, devices=devices)


def user_name(system: System) -> str | None:
    """The effective user's name from /etc/passwd below the root (never the host's NSS)."""
    for line in (system.read_text("/etc/passwd") or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[2] == str(system.euid):
            return fields[0]
    return None


def _systemd_user(system: System) -> tuple[bool | None, str | None]:
    argv, timeout = commands.SYSTEMD_USER_STATE
    result = system.run(argv, timeout)
    state = result.stdout.strip().splitlines()[-1].strip() if result.stdout.strip() else None
    if result.error and result.error.endswith("command not found"):
        # No systemctl: the manager's private socket is the remaining sign of life.
        runtime_dir = system.env.get("XDG_RUNTIME_DIR")
        if runtime_dir and system.exists(f"{runtime_dir}/systemd/private"):
            return True, None
        return False, None
    if result.error:  # timed out: something is there but does not answer
        return False, "unresponsive"
    return state in REACHABLE_STATES, state


def _site_dirs(system: System) -> list[str]:
    return [p for p in system.python_path if p.endswith(("site-packages", "dist-packages"))]


def _dist_version(system: System, dist_names: tuple[str, ...]) -> str | None:
    """Version from ``<name>-<version>.dist-info`` (or .egg-info) in a site directory."""
    wanted = {n.lower().replace("-", "_") for n in dist_names}
    for site in _site_dirs(system):
        for entry in system.listdir(site):
            match = re.fullmatch(r"(.+?)-([^-]+)\.(dist-info|egg-info)", entry)
            if match and match.group(1).lower().replace("-", "_").replace(".", "_") in wanted:
                return match.group(2)
    return None


def find_package(system: System, name: str) -> Path | None:
    """The package directory of ``name`` below the root, found without importing it."""
    search = [str(system.path(p)) for p in system.python_path]
    spec = PathFinder.find_spec(name, search)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _inside_root(system: System, path: Path) -> str:
    try:
        return "/" + str(path.relative_to(system.root)).lstrip("/") if not system.is_real_root else str(path)
    except ValueError:
        return str(path)


def probe_llama_cpp(system: System) -> PythonBackendInfo:
    package = find_package(system, "llama_cpp")
    if package is None:
        return PythonBackendInfo(status=ProbeStatus.absent,
                                 reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    backends: set[str] = set()
    lib_dir = package / "lib"
    try:
        names = [p.name for p in lib_dir.iterdir()]
    except OSError:
        names = []
    for name in names:
        match = re.fullmatch(r"libggml-([a-z]+)[\w-]*\.(so|dylib|dll)", name)
        if match and match.group(1) in GGML_BACKENDS:
            backends.add(GGML_BACKENDS[match.group(1)])
    version = _dist_version(system, ("llama_cpp_python",))
    reason = None
    if not backends:
        reason = f"no libggml-<backend> libraries in {_inside_root(system, lib_dir)}: cannot tell its backends"
    return PythonBackendInfo(status=ProbeStatus.ok, reason=reason, version=version,
                             path=_inside_root(system, package), backends=sorted(backends))


def probe_vllm(system: System) -> PythonBackendInfo:
    package = find_package(system, "vllm")
    if package is None:
        return PythonBackendInfo(status=ProbeStatus.absent,
                                 reason="vLLM is not installed (pip install 'agent-machine[vllm]')")
    return PythonBackendInfo(status=ProbeStatus.ok, version=_dist_version(system, ("vllm",)),
                             path=_inside_root(system, package))


def probe_runtime(system: System) -> RuntimeInfo:
    user = user_name(system)
    reachable, state = _systemd_user(system)
    lingering = None
    if user is not None:
        lingering = system.exists(f"/var/lib/systemd/linger/{user}")
    return RuntimeInfo(
        podman=probe_podman(system),
        cdi=probe_cdi(system),
        cgroup_version=cgroup_layout(system).version,  # type: ignore[arg-type]
        user=user,
        systemd_user=reachable,
        systemd_user_state=state,
        lingering=lingering,
        llama_cpp_python=probe_llama_cpp(system),
        vllm=probe_vllm(system),
    )

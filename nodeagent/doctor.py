"""`agent-machine doctor`: checks over a MachineProfile, each pass / warn / fail with a fix.

    run_checks(profile, paths, env) -> list[Check]

A check fails when agent-machine cannot do its job as configured (no writable
state directory, no llama-cpp-python, no room for a model, a GPU that the
platform's primary backend cannot reach); it warns when a capability is
missing that some launch modes need (Podman, Quadlet, lingering).

Whatever stops `agent-machine serve` at start fails here too, through the
same code serve runs (`check_serve_start`): the configuration (`load_config`),
the API token (`load_token`) and the listeners (`nodeagent.daemon`'s
`socket_dir_state` and `check_listen_config`). What serve repairs by itself
(its own directory or state file open to others, which it tightens) is a
warning. These and the state directory check read the filesystem (the latter
creates and removes a file); every other check reads the profile, so fixture
profiles test them.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Mapping

from nodeagent.contracts.machine import MachineProfile, ProbeStatus
from nodeagent.fsutil import open_to_others
from nodeagent.paths import Paths

CheckStatus = Literal["pass", "warn", "fail"]

GIB = 1024**3
# A 7-8B model at Q4 is ~4.5 GiB; below this nothing useful fits.
DISK_FAIL_BYTES = 5 * GIB
# Room for a few models and the disk KV tier.
DISK_WARN_BYTES = 20 * GIB
QUADLET_MIN = "4.4"


@dataclass(frozen=True)
class Check:
    name: str
    status: CheckStatus
    message: str
    fix: str | None = None

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_state_dir(state_dir: Path) -> Check:
    name = "state directory writable"
    fix = (f"mkdir -p {state_dir} && chown $(id -un) {state_dir}, or point AGENT_MACHINE_STATE_DIR "
           "at a writable directory")
    if state_dir.exists():
        if not state_dir.is_dir():
            return Check(name, "fail", f"{state_dir} exists but is not a directory", fix)
        try:
            with tempfile.NamedTemporaryFile(dir=state_dir, prefix=".doctor-", delete=True):
                pass
        except OSError as exc:
            return Check(name, "fail", f"cannot create files in {state_dir}: {exc.strerror or exc}", fix)
        return Check(name, "pass", f"{state_dir} is writable")
    parent = _nearest_existing(state_dir)
    if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
        return Check(name, "pass", f"{state_dir} does not exist yet; it will be created under {parent}")
    return Check(name, "fail", f"{state_dir} does not exist and {parent} is not writable", fix)


def _config_file(env: Mapping[str, str]) -> str:
    """Where the configuration is read from (as `load_config` decides), for fix hints."""
    from nodeagent.paths import resolve_paths

    try:
        return env.get("AGENT_MACHINE_CONFIG") or str(resolve_paths(env).config_file)
    except ValueError:
        return "config.toml"


def check_serve_start(env: Mapping[str, str]) -> list[Check]:
    """What `agent-machine serve` refuses at start, checked through the code serve runs.

    Stops at the first failure, as serve does: later checks need what it failed to load.
    """
    from nodeagent.api.auth import TokenError
    from nodeagent.config import ConfigError
    from nodeagent.credentials import CredentialsError
    from nodeagent.daemon import ServeError, check_listen_config, load_start, socket_dir_state, socket_path

    edit = f"edit {_config_file(env)} (or the AGENT_MACHINE_* variable named); `agent-machine config show` " \
           "prints every effective value and where it came from"
    refused = "serve would refuse to start: "
    config_ok = Check("config", "pass", f"the configuration ({_config_file(env)} and AGENT_MACHINE_*) is valid")
    try:
        loaded, token, _ = load_start(env=dict(env))
    except TokenError as exc:
        return [config_ok, Check("api token", "fail", f"{refused}{exc}",
                                 "make api.token_file a file only you can read (chmod 600) holding a token of "
                                 "16+ characters, or unset api.token_file")]
    except CredentialsError as exc:
        return [config_ok, Check("api credentials", "fail", f"{refused}{exc}",
                                 "fix the file named (chmod 600, the field named), or manage it with "
                                 "`agent-machine tokens`")]
    except (ConfigError, ValueError) as exc:
        return [Check("config", "fail", f"{refused}{exc}", edit)]
    checks = [Check("config", "pass", f"{loaded.file} is valid" if loaded.file_exists
                    else f"no {loaded.file}: the defaults apply"),
              Check("api token", "pass", "a token is configured (TCP may be served)" if token
                    else "no token configured: the API is served on the Unix socket only")]

    directory = socket_path(loaded).parent
    try:
        state = socket_dir_state(directory)
    except ServeError as exc:
        return checks + [Check("api socket directory", "fail", f"{refused}{exc}",
                               f"chmod 700 {directory}, or set api.socket to a path in a directory only you "
                               "can enter")]
    mode = open_to_others(directory)
    checks.append({
        "missing": Check("api socket directory", "pass", f"{directory} does not exist yet; serve creates it 0700"),
        "private": Check("api socket directory", "pass", f"{directory} is private"),
        "ours-open": Check("api socket directory", "warn",
                           f"{directory} has mode {mode or 0:o}: open to others until serve tightens it to 700 "
                           "at start", f"chmod 700 {directory}"),
    }[state])

    try:
        path = check_listen_config(loaded, token)
    except ServeError as exc:
        return checks + [Check("api listeners", "fail", f"{refused}{exc}",
                               "api.tcp needs HOST:PORT and api.token_file; nothing but the agent's socket may "
                               f"sit at the socket's path; {edit}")]
    tcp = f" and TCP {loaded.config.api.tcp} (bearer token)" if loaded.config.api.tcp else ""
    checks.append(Check("api listeners", "pass", f"Unix socket {path}{tcp}"))
    return checks


def check_private_state(paths: Paths) -> Check:
    """The state directory and state.db (every pod's private-scope text) open to others."""
    from nodeagent.store import SIDECARS

    name = "private state"
    db = paths.db_file
    candidates = [paths.state_dir, db, *(db.with_name(db.name + suffix) for suffix in SIDECARS)]
    wide = [(path, mode) for path in candidates if (mode := open_to_others(path)) is not None]
    if not wide:
        return Check(name, "pass", f"{paths.state_dir} and its database are private (or not created yet)")
    listed = ", ".join(f"{path} ({mode:o})" for path, mode in wide)
    return Check(name, "warn", f"open to others: {listed}; serve tightens them at start (one owned by another "
                 "user it cannot change, and logs)", f"chmod 700 {paths.state_dir} && chmod 600 {db}*")


def check_podman(profile: MachineProfile) -> Check:
    podman = profile.runtime.podman
    why = "Podman runs providers in containers (provider images, device passthrough, isolation)"
    if podman.status == ProbeStatus.ok:
        mode = "rootless" if podman.rootless else "rootful"
        return Check("podman", "pass", f"Podman {podman.version} ({mode}); {why}")
    return Check("podman", "warn", f"Podman unavailable ({podman.reason}); {why}; without it providers run only "
                 "as local subprocesses", "install podman (apt/dnf install podman)")


def check_quadlet(profile: MachineProfile) -> Check:
    podman = profile.runtime.podman
    why = ("Quadlet turns providers into systemd units that restart on failure and start at boot "
           f"(needs Podman >= {QUADLET_MIN})")
    if podman.quadlet:
        return Check("quadlet", "pass", f"available with Podman {podman.version}; {why}")
    have = f"Podman {podman.version}" if podman.version else "no Podman"
    return Check("quadlet", "warn", f"{have}: the quadlet launch mode is unavailable; {why}",
                 f"install Podman >= {QUADLET_MIN} (Debian 13, Ubuntu 24.04, Fedora and RHEL 9.3+ have it); "
                 "meanwhile use the podman or subprocess launch mode")


def check_cdi(profile: MachineProfile) -> Check:
    gpus = profile.nvidia.gpus
    if not gpus:
        return Check("nvidia CDI spec", "pass", "no NVIDIA GPU: no CDI spec needed")
    declared = [d for d in profile.runtime.cdi.devices if d.startswith("nvidia.com/gpu=")]
    if declared:
        return Check("nvidia CDI spec", "pass",
                     f"{len(declared)} nvidia.com/gpu devices declared ({', '.join(profile.runtime.cdi.spec_files)})")
    return Check("nvidia CDI spec", "fail",
                 f"{len(gpus)} NVIDIA GPU(s) but no CDI spec declares nvidia.com/gpu: containers cannot be given "
                 "the GPUs (AddDevice=nvidia.com/gpu=all fails)",
                 "install the NVIDIA Container Toolkit and run: sudo nvidia-ctk cdi generate "
                 "--output=/etc/cdi/nvidia.yaml")


def check_vulkan(profile: MachineProfile) -> Check:
    name = "vulkan ICD for the GPU"
    vk = profile.vulkan
    gpu_vulkan = [d for d in vk.devices if d.device_type not in ("cpu", None)]
    kinds = []
    if profile.asahi.status == ProbeStatus.ok:
        kinds.append("asahi")
    if profile.amd.gpus:
        kinds.append("amd")
    if profile.nvidia.gpus:
        kinds.append("nvidia")
    if not kinds:
        return Check(name, "pass", "no GPU: Vulkan is not needed (llama.cpp runs on the CPU)")
    if gpu_vulkan:
        names = ", ".join(f"{d.name} ({d.driver_name})" for d in gpu_vulkan)
        return Check(name, "pass", f"Vulkan GPU device(s): {names}")
    icds = ", ".join(Path(f).name for f in vk.icd_files) or "none"
    if vk.icd_files and vk.reason and "vulkaninfo is not installed" in vk.reason:
        return Check(name, "warn", f"cannot list Vulkan devices without vulkaninfo; ICD files: {icds}",
                     "install vulkan-tools so the probe can see which GPU the Vulkan driver exposes")
    seen = f"no Vulkan GPU device ({vk.reason or 'vulkaninfo lists only CPU devices'}); ICD files: {icds}"
    if "asahi" in kinds:
        return Check(name, "fail", f"Apple GPU present but {seen}; llama.cpp's Vulkan backend cannot use it",
                     "install Mesa with Honeykrisp and vulkan-tools: dnf install mesa-vulkan-drivers vulkan-tools")
    if "amd" in kinds:
        return Check(name, "fail", f"AMD GPU present but {seen}; llama.cpp's Vulkan backend cannot use it",
                     "install Mesa RADV and vulkan-tools: apt install mesa-vulkan-drivers vulkan-tools "
                     "(dnf on Fedora); compute-only Instinct parts have no Vulkan: use ROCm there")
    return Check(name, "warn", f"NVIDIA GPU present but {seen}; only CUDA backends can use it",
                 "install the NVIDIA driver's Vulkan ICD (nvidia_icd.json, part of the full driver) and vulkan-tools")


def check_lingering(profile: MachineProfile) -> Check:
    rt = profile.runtime
    if not rt.podman.rootless:
        return Check("lingering", "pass", "rootful: system services need no lingering")
    if rt.lingering:
        return Check("lingering", "pass", f"enabled for {rt.user}: rootless services start at boot")
    return Check("lingering", "warn", f"not enabled for {rt.user or 'this user'}: rootless services stop at logout "
                 "and do not start at boot", f"loginctl enable-linger {rt.user or '$USER'}")


def check_systemd_user(profile: MachineProfile) -> Check:
    rt = profile.runtime
    if not rt.podman.rootless:
        return Check("systemd user manager", "pass", "rootful: units go to the system manager")
    if rt.systemd_user:
        return Check("systemd user manager", "pass", f"reachable ({rt.systemd_user_state})")
    return Check("systemd user manager", "warn",
                 f"not reachable ({rt.systemd_user_state or 'no answer'}): `systemctl --user` cannot start "
                 "rootless units", "log in through a session that starts systemd --user (or enable lingering), "
                 "and make sure XDG_RUNTIME_DIR is set")


def check_llama_cpp(profile: MachineProfile) -> Check:
    llama = profile.runtime.llama_cpp_python
    if llama.status == ProbeStatus.ok:
        return Check("llama-cpp-python", "pass",
                     f"{llama.version or 'installed'} with backends: {', '.join(llama.backends) or 'unknown'}")
    return Check("llama-cpp-python", "fail", f"not importable ({llama.reason}); it is the embedded default engine",
                 "pip install llama-cpp-python (CMAKE_ARGS selects GPU backends, e.g. -DGGML_VULKAN=on)")


def check_backend_ready(profile: MachineProfile) -> Check:
    recs = profile.recommended_backends
    if not recs:
        return Check("recommended backend", "fail", "no backend recommended for this machine",
                     "run agent-machine probe and look at the sections in error")
    first = recs[0]
    if first.ready:
        return Check("recommended backend", "pass", f"{first.backend} on {first.device} is ready")
    fallback = next((r for r in recs if r.ready), None)
    tail = f"; {fallback.backend} works meanwhile" if fallback else "; no recommended backend is ready"
    return Check("recommended backend", "warn" if fallback else "fail",
                 f"{first.backend} is not ready{tail}", first.missing)


def check_disk(profile: MachineProfile) -> Check:
    places = [loc for loc in profile.storage.locations if loc.role in ("state", "cache")]
    known = [loc for loc in places if loc.free_bytes is not None]
    if not known:
        return Check("free disk for models", "warn", "free space of the state/cache directories is unknown",
                     "check that the state directory's filesystem is mounted and readable")
    worst = min(known, key=lambda loc: loc.free_bytes or 0)
    free = worst.free_bytes or 0
    gib = free / GIB
    slow = " (rotational disk: model loads will be slow)" if worst.rotational else ""
    where = f"{worst.role} directory {worst.path} ({worst.fs_type})"
    fix = "free space or point AGENT_MACHINE_STATE_DIR/AGENT_MACHINE_CACHE_DIR at a larger filesystem"
    if free < DISK_FAIL_BYTES:
        return Check("free disk for models", "fail",
                     f"{gib:.1f} GiB free for the {where}: not enough for one 7B model", fix)
    if free < DISK_WARN_BYTES:
        return Check("free disk for models", "warn", f"{gib:.1f} GiB free for the {where}: room for few models{slow}",
                     fix)
    return Check("free disk for models", "pass", f"{gib:.1f} GiB free for the {where}{slow}")


def check_probe(profile: MachineProfile) -> Check:
    sections = {"host": profile.host, "cpu": profile.cpu, "memory": profile.memory, "nvidia": profile.nvidia,
                "amd": profile.amd, "vulkan": profile.vulkan, "asahi": profile.asahi, "runtime": profile.runtime,
                "storage": profile.storage}
    errors = [f"{name}: {s.reason}" for name, s in sections.items() if s.status == ProbeStatus.error]
    if not errors:
        return Check("probe", "pass", "every section probed (ok or absent)")
    return Check("probe", "warn", "; ".join(errors), "see `agent-machine probe` for details")


def run_checks(profile: MachineProfile, paths: Paths, env: Mapping[str, str] | None = None) -> list[Check]:
    """Every check. ``env`` (default: this process's) is what `serve` reads its configuration from."""
    return [
        *check_serve_start(os.environ if env is None else env),
        check_state_dir(paths.state_dir),
        check_private_state(paths),
        check_podman(profile),
        check_quadlet(profile),
        check_cdi(profile),
        check_vulkan(profile),
        check_lingering(profile),
        check_systemd_user(profile),
        check_llama_cpp(profile),
        check_backend_ready(profile),
        check_disk(profile),
        check_probe(profile),
    ]

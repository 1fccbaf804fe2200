"""Probe a captured machine: a directory holding ``root/`` (its files) and
``capture.json`` (everything that is not a file).

``capture.json``::

    {
      "description": "what machine this is and where its data came from",
      "env": {"HOME": "/root", ...},          # the probe's environment on that machine
      "euid": 0,
      "python_path": ["/usr/lib/python3/dist-packages"],   # below root/
      "commands": [                           # every command that exists there
        {"argv": ["vulkaninfo"], "stdout": "commands/vulkaninfo.txt", "returncode": 0},
        {"argv": ["systemctl", "--user", "is-system-running"], "stdout_text": "offline\\n", "returncode": 1}
      ],
      "statfs": {"/": [total_bytes, free_bytes], "/dev/shm": [...]},   # by mount point
      "nvml": null | {... see ReplayNvml ...}
    }

A command that is not listed is "not found" on the captured machine. NVML is
replayed at the ``pynvml`` boundary by `ReplayNvml`, a module-like object with
the same function names that raises the real ``pynvml.NVMLError_*`` classes;
without nvidia-ml-py installed the capture behaves like a host without it.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

from nodeagent.probe.system import CommandResult, FsUsage, System

CAPTURE_FILE = "capture.json"


class CaptureError(ValueError):
    """A capture directory that cannot be replayed; the message names the problem."""


@dataclass(frozen=True)
class ReplayedCommand:
    argv: tuple[str, ...]
    stdout: str
    stderr: str
    returncode: int


class ReplayRunner:
    """Answers commands from a capture: same argv, same output, nothing else runs."""

    def __init__(self, commands: Sequence[ReplayedCommand]) -> None:
        self._by_argv = {c.argv: c for c in commands}
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None) -> CommandResult:
        argv = tuple(argv)
        self.calls.append(argv)
        found = self._by_argv.get(argv)
        if found is None:
            return CommandResult(argv, None, error=f"{argv[0]}: command not found")
        return CommandResult(argv, found.returncode, found.stdout, found.stderr)


class ReplayStatfs:
    """statvfs answers per mount point of the captured machine."""

    def __init__(self, root: Path, by_mount: Mapping[str, Sequence[int]]) -> None:
        self.root = root
        self.by_mount = {k: FsUsage(int(v[0]), int(v[1])) for k, v in by_mount.items()}

    def __call__(self, path: Path) -> FsUsage | None:
        try:
            relative = str(Path(path).relative_to(self.root))
        except ValueError:
            return None
        inside = posixpath.normpath("/" + ("" if relative == "." else relative))
        best = None
        for point in self.by_mount:
            if inside == point or point == "/" or inside.startswith(point.rstrip("/") + "/"):
                if best is None or len(point) > len(best):
                    best = point
        return self.by_mount.get(best) if best is not None else None


# ---------------------------------------------------------------- NVML
class _Handle:
    def __init__(self, gpu: int, mig: int | None = None) -> None:
        self.gpu, self.mig = gpu, mig

    def __repr__(self) -> str:
        return f"<replay nvml handle gpu={self.gpu} mig={self.mig}>"


class ReplayNvml:
    """A stand-in for the ``pynvml`` module, answering from captured data.

    ``data``::

        {"driver_version": "545.23.08", "cuda_driver_version": 12030,
         "init_error": "DriverNotLoaded",          # optional: nvmlInit raises it
         "gpus": [{"name": ..., "uuid": ..., "pci_bus_id": ..., "memory": {"total", "free", "used", "reserved"},
                   "compute_capability": [9, 0], "mig_mode": [1, 1], "power_limit_mw": 700000,
                   "ecc_mode": [1, 1], "mig_devices": [{"uuid", "name", "memory": {...}}]}]}

    Any value may instead be an error name (``"NotSupported"``): the getter then
    raises ``pynvml.NVMLError_NotSupported``. ``faults`` maps a function name to
    an error name raised on every call (fault injection).
    """

    def __init__(self, data: Mapping[str, Any], faults: Mapping[str, str] | None = None) -> None:
        import pynvml  # the real error classes and constants

        self._pynvml = pynvml
        self._data = data
        self._faults = dict(faults or {})
        self._initialized = 0
        self.NVMLError = pynvml.NVMLError
        for name in dir(pynvml):
            if name.startswith("NVMLError_"):
                setattr(self, name, getattr(pynvml, name))
        self.NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE
        self.NVML_FEATURE_ENABLED = pynvml.NVML_FEATURE_ENABLED
        self.nvmlMemory_v2 = pynvml.nvmlMemory_v2
        self.calls: list[str] = []

    # -- helpers
    def _error(self, name: str) -> Exception:
        cls = getattr(self._pynvml, f"NVMLError_{name}", None)
        if cls is None:
            raise CaptureError(f"unknown NVML error name {name!r} (expected e.g. NotSupported, DriverNotLoaded)")
        return cls()

    def _enter(self, function: str, needs_init: bool = True) -> None:
        self.calls.append(function)
        if function in self._faults:
            raise self._error(self._faults[function])
        if needs_init and not self._initialized:
            raise self._error("Uninitialized")

    def _value(self, value: Any) -> Any:
        if isinstance(value, str) and hasattr(self._pynvml, f"NVMLError_{value}"):
            raise self._error(value)
        return value

    def _gpu(self, handle: _Handle) -> Mapping[str, Any]:
        if not isinstance(handle, _Handle):
            raise self._error("InvalidArgument")
        gpu = self._data["gpus"][handle.gpu]
        if handle.mig is not None:
            return gpu["mig_devices"][handle.mig]
        return gpu

    def _field(self, handle: _Handle, key: str) -> Any:
        record = self._gpu(handle)
        if key not in record:
            raise self._error("NotSupported")
        return self._value(record[key])

    # -- the pynvml surface the probe uses
    def nvmlInit(self) -> None:
        self._enter("nvmlInit", needs_init=False)
        if self._data.get("init_error"):
            raise self._error(self._data["init_error"])
        self._initialized += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self._initialized -= 1

    def nvmlSystemGetDriverVersion(self) -> str:
        self._enter("nvmlSystemGetDriverVersion")
        return self._value(self._data["driver_version"])

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        self._enter("nvmlSystemGetCudaDriverVersion")
        return self._value(self._data["cuda_driver_version"])

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self._data.get("gpus", []))

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._enter("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self._data.get("gpus", [])):
            raise self._error("InvalidArgument")
        self._value(self._data["gpus"][index].get("handle", None))
        return _Handle(index)

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        self._enter("nvmlDeviceGetName")
        return self._field(handle, "name")

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        self._enter("nvmlDeviceGetUUID")
        return self._field(handle, "uuid")

    def nvmlDeviceGetPciInfo(self, handle: _Handle) -> SimpleNamespace:
        self._enter("nvmlDeviceGetPciInfo")
        return SimpleNamespace(busId=self._field(handle, "pci_bus_id"))

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle, version: int | None = None) -> SimpleNamespace:
        self._enter("nvmlDeviceGetMemoryInfo")
        memory = self._field(handle, "memory")
        return SimpleNamespace(version=version, **memory)

    def nvmlDeviceGetCudaComputeCapability(self, handle: _Handle) -> tuple[int, int]:
        self._enter("nvmlDeviceGetCudaComputeCapability")
        major, minor = self._field(handle, "compute_capability")
        return major, minor

    def nvmlDeviceGetMigMode(self, handle: _Handle) -> list[int]:
        self._enter("nvmlDeviceGetMigMode")
        return list(self._field(handle, "mig_mode"))

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: _Handle) -> int:
        self._enter("nvmlDeviceGetMaxMigDeviceCount")
        record = self._gpu(handle)
        return int(self._value(record.get("max_mig_devices", 7)))

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: _Handle, index: int) -> _Handle:
        self._enter("nvmlDeviceGetMigDeviceHandleByIndex")
        migs = self._gpu(handle).get("mig_devices", [])
        if index >= len(migs):
            raise self._error("NotFound")
        return _Handle(handle.gpu, index)

    def nvmlDeviceGetPowerManagementLimit(self, handle: _Handle) -> int:
        self._enter("nvmlDeviceGetPowerManagementLimit")
        return self._field(handle, "power_limit_mw")

    def nvmlDeviceGetEccMode(self, handle: _Handle) -> list[int]:
        self._enter("nvmlDeviceGetEccMode")
        return list(self._field(handle, "ecc_mode"))


# ---------------------------------------------------------------- loading
def is_capture(directory: str | Path) -> bool:
    return (Path(directory) / CAPTURE_FILE).is_file()


def load_capture(directory: str | Path, *, nvml_faults: Mapping[str, str] | None = None) -> System:
    """A `System` that reads ``directory/root`` and replays ``directory/capture.json``."""
    directory = Path(directory)
    try:
        spec = json.loads((directory / CAPTURE_FILE).read_text())
    except FileNotFoundError as exc:
        raise CaptureError(f"{directory}: no {CAPTURE_FILE}") from exc
    except json.JSONDecodeError as exc:
        raise CaptureError(f"{directory / CAPTURE_FILE}: invalid JSON: {exc}") from exc
    root = (directory / "root").resolve()
    if not root.is_dir():
        raise CaptureError(f"{directory}: no root/ directory")
    replayed = []
    for index, entry in enumerate(spec.get("commands", [])):
        try:
            argv = tuple(entry["argv"])
            if "stdout" in entry:
                stdout = (directory / entry["stdout"]).read_text()
            else:
                stdout = entry.get("stdout_text", "")
        except (KeyError, TypeError, OSError) as exc:
            raise CaptureError(f"{directory / CAPTURE_FILE}: commands[{index}]: {exc}") from exc
        replayed.append(ReplayedCommand(argv, stdout, entry.get("stderr_text", ""), int(entry.get("returncode", 0))))
    modules: dict[str, object] = {}
    nvml_data = spec.get("nvml")
    if nvml_data is not None:
        try:
            modules["pynvml"] = ReplayNvml(nvml_data, faults=nvml_faults)
        except ImportError:
            pass  # no nvidia-ml-py here: the capture reads as a host without it
    return System(
        root=root,
        runner=ReplayRunner(replayed),
        env=dict(spec.get("env", {})),
        modules=modules,
        euid=int(spec.get("euid", 0)),
        python_path=list(spec.get("python_path", [])),
        statfs=ReplayStatfs(root, spec.get("statfs", {})),
        label=f"capture:{directory.resolve().name}",
    )


def _files_only_runner(argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None) -> CommandResult:
    return CommandResult(tuple(argv), None,
                         error=f"{argv[0]}: not run (--root reads files only; a capture.json replays commands)")


def system_for_root(root: str | Path) -> System:
    """The `System` for probing ``root``.

    ``/``: this machine. A directory with ``capture.json``: that captured
    machine, replayed. Any other directory: its files only, with no commands
    run and no Python modules loaded, since the host's tools and NVML would
    describe the host rather than the tree. Raises `CaptureError` for a root
    that is not a directory or a capture that cannot be read.
    """
    root = Path(root)
    if root.resolve() == Path("/"):
        return System()
    if not root.is_dir():
        raise CaptureError(f"{root}: not a directory")
    if is_capture(root):
        return load_capture(root)
    return System(root=root.resolve(), runner=_files_only_runner, modules={})

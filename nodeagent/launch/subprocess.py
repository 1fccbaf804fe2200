"""Native provider processes: ``<executable> <args>`` started in their own
session, output appended to a log file, recorded in the launch `Registry`.

Invariants:
* a process is only ever signalled after checking that the recorded pid still
  belongs to the process we started (its start time matches), so a recycled
  pid is never killed;
* ``down`` sends SIGTERM to the process group, waits ``stop_timeout_s``, then
  SIGKILL; the record is removed once the process is gone;
* ``up`` refuses a port already in use, and fails fast (with the log tail) if
  the process exits before it is healthy.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from nodeagent.contracts.provider import ProviderSpec
from nodeagent.launch.container import RenderError
from nodeagent.launch.health import StartFailed, wait_healthy
from nodeagent.launch.registry import LaunchRecord, Registry


class LaunchError(RuntimeError):
    """The process could not be started or stopped; the message says why."""


def subprocess_argv(spec: ProviderSpec) -> list[str]:
    if spec.mode != "subprocess" or not spec.executable:
        raise RenderError(f"{spec.name}: spec is for mode {spec.mode}, not subprocess")
    return [spec.executable, *spec.args]


def port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tail(path: str | os.PathLike[str] | None, lines: int = 30) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            data = handle.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


@dataclass
class SubprocessLauncher:
    registry: Registry
    # Popen objects of processes this launcher started, so it can reap them.
    _children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, init=False, repr=False)

    def render(self, spec: ProviderSpec) -> list[str]:
        return subprocess_argv(spec)

    def _resolve_executable(self, spec: ProviderSpec) -> str:
        assert spec.executable
        if os.sep in spec.executable:
            if not os.access(spec.executable, os.X_OK):
                raise LaunchError(f"{spec.name}: {spec.executable} is not an executable file")
            return spec.executable
        found = shutil.which(spec.executable)
        if not found:
            raise LaunchError(f"{spec.name}: {spec.executable!r} is not on PATH; give its full path")
        return found

    def up(self, spec: ProviderSpec, wait: bool = True) -> LaunchRecord:
        existing = self.registry.load(spec.name)
        if existing is not None and self._alive(existing):
            raise LaunchError(f"{spec.name} is already running (pid {existing.pid}); run `down` first")
        if port_in_use(spec.host, spec.port):
            raise LaunchError(f"{spec.name}: port {spec.host}:{spec.port} is already in use")
        if spec.slot_save_dir:
            Path(spec.slot_save_dir).mkdir(parents=True, exist_ok=True)
        argv = [self._resolve_executable(spec), *spec.args]
        self.registry.directory.mkdir(parents=True, exist_ok=True)
        log_path = self.registry.log_path(spec.name)
        env = {**os.environ, **spec.env}
        with open(log_path, "ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%dT%H:%M:%S')} start: {' '.join(argv)}\n".encode())
            log.flush()
            try:
                process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           env=env, start_new_session=True, close_fds=True)
            except OSError as exc:
                raise LaunchError(f"{spec.name}: cannot start {argv[0]}: {exc}") from None
        try:
            create_time = psutil.Process(process.pid).create_time()
        except psutil.NoSuchProcess:
            create_time = None
        record = LaunchRecord(spec=spec, started_at=time.time(), pid=process.pid,
                              pid_create_time=create_time, log_path=str(log_path))
        self.registry.save(record)
        self._children[spec.name] = process
        if wait:
            def dead() -> str | None:
                if process.poll() is None:
                    return None
                return f"{spec.name} exited with code {process.returncode}; last log lines:\n{tail(log_path)}"

            try:
                wait_healthy(spec.base_url, spec.health.path, spec.start_timeout_s, still_running=dead)
            except StartFailed:
                self.down(spec.name, missing_ok=True)
                raise
        return record

    def _process(self, record: LaunchRecord) -> psutil.Process | None:
        if record.pid is None:
            return None
        try:
            process = psutil.Process(record.pid)
            if record.pid_create_time is not None and abs(process.create_time() - record.pid_create_time) > 0.01:
                return None  # the pid now belongs to someone else
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            return process
        except psutil.NoSuchProcess:
            return None

    def _alive(self, record: LaunchRecord) -> bool:
        return self._process(record) is not None

    def state(self, name: str) -> str:
        record = self.registry.load(name)
        if record is None:
            return "absent"
        return "running" if self._alive(record) else "exited"

    def logs(self, name: str, lines: int = 100) -> str:
        record = self.registry.load(name)
        return tail(record.log_path if record else self.registry.log_path(name), lines)

    def down(self, name: str, missing_ok: bool = False) -> bool:
        record = self.registry.load(name)
        if record is None:
            if missing_ok:
                return False
            raise LaunchError(f"no provider named {name} was started here")
        process = self._process(record)
        stopped = False
        if process is not None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                process.terminate()
            try:
                process.wait(record.spec.stop_timeout_s)
            except psutil.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(10)
            stopped = True
        child = self._children.pop(name, None)
        if child is not None:
            child.wait(timeout=10)
        self.registry.remove(name)
        return stopped

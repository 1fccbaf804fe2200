"""The probe's only window on the machine: files below a root, and commands.

Sub-probes are pure functions of a `System`. Production uses the real root and
`run_command`; tests (and `agent-machine probe --root`) hand in a captured
tree and a runner that replays captured command output (`nodeagent.probe.replay`).
Nothing here raises for a missing file or command: readers return ``None`` and
the runner returns a `CommandResult` whose ``error`` says what went wrong, so
one failure never takes other probes down.

Everything a sub-probe learns about the machine goes through this object:
files (below ``root``), commands (``runner``), the environment (``env``), the
effective uid (``euid``), where Python packages live (``python_path``, below
``root``), filesystem usage (``statfs``) and Python modules that talk to
drivers (``modules``, e.g. ``pynvml``). That is what makes a fixture tree
exercise the same code as a real machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

DEFAULT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int | None  # None: did not run to completion
    stdout: str = ""
    stderr: str = ""
    error: str | None = None  # "not found", "timed out after 5.0s", ...

    @property
    def ok(self) -> bool:
        return self.error is None and self.returncode == 0

    def describe_failure(self) -> str:
        """One line saying why this command did not succeed."""
        if self.error:
            return self.error
        first = (self.stderr.strip() or self.stdout.strip()).splitlines()
        detail = f": {first[-1][:200]}" if first else ""
        return f"{self.argv[0]} exited with status {self.returncode}{detail}"


Runner = Callable[[Sequence[str], float, Mapping[str, str] | None], CommandResult]


class Background:
    """Run a function in a thread now; `result()` waits for it and returns (or raises) its outcome.

    Plain threads rather than concurrent.futures: that package (and the logging
    it pulls in) is a measurable part of `agent-machine probe`'s start-up.
    """

    def __init__(self, fn: Callable[..., object], *args: object, name: str = "probe") -> None:
        self._fn, self._args = fn, args
        self._value: object = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except BaseException as exc:  # handed to whoever collects the result
            self._error = exc

    def result(self) -> object:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def run_command(argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S,
                env: Mapping[str, str] | None = None) -> CommandResult:
    """Run ``argv`` with a hard timeout; never raises.

    The command runs in its own session; on timeout the whole process group is
    killed, so a hanging tool (or a wrapper script whose child hangs and keeps
    our pipes open) costs at most ``timeout`` seconds and leaves nothing behind.
    """
    argv = tuple(argv)
    if shutil.which(argv[0]) is None:
        return CommandResult(argv, None, error=f"{argv[0]}: command not found")
    merged = None if env is None else {**os.environ, **env}
    try:
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=merged,
            text=True, errors="replace", start_new_session=True,
        )
    except OSError as exc:
        return CommandResult(argv, None, error=f"{argv[0]}: {exc.strerror or exc}")
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except OSError:
            process.kill()
        process.communicate()
        return CommandResult(argv, None, error=f"{argv[0]}: timed out after {timeout:g}s")
    return CommandResult(argv, process.returncode, stdout, stderr)


@dataclass(frozen=True)
class FsUsage:
    """What statvfs says about the filesystem holding a path."""

    total_bytes: int
    free_bytes: int  # available to unprivileged users (f_bavail)


def real_statfs(path: Path) -> FsUsage | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return FsUsage(total_bytes=st.f_blocks * st.f_frsize, free_bytes=st.f_bavail * st.f_frsize)


def _default_python_path() -> list[str]:
    return [p for p in sys.path if p and os.path.isabs(p)]


_CommandKey = tuple[tuple[str, ...], tuple[tuple[str, str], ...] | None]


@dataclass
class System:
    """A filesystem root plus a command runner plus the environment."""

    root: Path = Path("/")
    runner: Runner = run_command
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    # Python modules: None means import for real. When a mapping is given, it is
    # the whole truth: a name missing from it (or mapped to None) is "not installed".
    modules: Mapping[str, object] | None = None
    euid: int = field(default_factory=os.geteuid)
    # Absolute directories (read below ``root``) searched for Python packages.
    python_path: Sequence[str] = field(default_factory=_default_python_path)
    # statvfs of a path already joined to ``root``; replaced for captured trees.
    statfs: Callable[[Path], FsUsage | None] = real_statfs
    # What the profile's ``root`` says; defaults to the root path (captures name themselves).
    label: str | None = None
    _prefetched: dict[_CommandKey, Background] = field(default_factory=dict, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def read_text(self, absolute: str, limit: int | None = None) -> str | None:
        """The file's text, or None when it is missing or unreadable (a directory, EACCES...)."""
        try:
            with open(self.path(absolute), "rb") as handle:
                data = handle.read() if limit is None else handle.read(limit)
        except (OSError, ValueError):
            return None
        return data.decode("utf-8", errors="replace")

    def read_bytes(self, absolute: str) -> bytes | None:
        try:
            return self.path(absolute).read_bytes()
        except (OSError, ValueError):
            return None

    def read_int(self, absolute: str, base: int = 10) -> int | None:
        text = self.read_text(absolute)
        if text is None:
            return None
        try:
            return int(text.strip(), base)
        except ValueError:
            return None

    def listdir(self, absolute: str) -> list[str]:
        try:
            return sorted(os.listdir(self.path(absolute)))
        except OSError:
            return []

    def exists(self, absolute: str) -> bool:
        try:
            return self.path(absolute).exists()
        except OSError:
            return False

    def is_dir(self, absolute: str) -> bool:
        try:
            return self.path(absolute).is_dir()
        except OSError:
            return False

    # ------------------------------------------------------------ commands
    def run(self, argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S,
            env: Mapping[str, str] | None = None) -> CommandResult:
        """Run a command, or collect the result of an earlier `prefetch` of it."""
        key = _key(argv, env)
        with self._lock:
            pending = self._prefetched.pop(key, None)
        if pending is not None:
            return pending.result()  # type: ignore[return-value]
        return self.runner(argv, timeout, env)

    def prefetch(self, commands: Iterable[tuple[Sequence[str], float]]) -> None:
        """Start ``(argv, timeout)`` commands in the background now.

        The probe calls this before importing its (slow to import) models so that
        external tools run on another core meanwhile; a later `run` of the same
        argv picks up the result. Each prefetched result is used once.
        """
        with self._lock:
            for argv, timeout in commands:
                key = _key(argv, None)
                if key not in self._prefetched:
                    self._prefetched[key] = Background(self.runner, tuple(argv), timeout, None,
                                                       name=f"probe-{argv[0]}")

    def close(self) -> None:
        """Wait for any prefetched command that nobody collected (each is bounded by its timeout)."""
        with self._lock:
            pending, self._prefetched = list(self._prefetched.values()), {}
        for item in pending:
            try:
                item.result()
            except Exception:  # a runner that raised: nobody wanted the result
                pass

    @property
    def is_real_root(self) -> bool:
        return self.root.resolve() == Path("/")


def _key(argv: Sequence[str], env: Mapping[str, str] | None) -> _CommandKey:
    return tuple(argv), None if env is None else tuple(sorted(env.items()))

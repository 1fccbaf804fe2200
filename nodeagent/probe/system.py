"""The probe's only window on the machine: files below a root, and commands.

Sub-probes are pure functions of a `System`. Production uses the real root and
`run_command`; tests hand in a captured fixture tree and a runner that replays
captured command output. Nothing here raises for a missing file or command:
readers return ``None`` and the runner returns a `CommandResult` whose
``error`` says what went wrong, so one failure never takes other probes down.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

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


Runner = Callable[[Sequence[str], float, Mapping[str, str] | None], CommandResult]


def run_command(argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S,
                env: Mapping[str, str] | None = None) -> CommandResult:
    """Run ``argv`` with a hard timeout; never raises."""
    argv = tuple(argv)
    if shutil.which(argv[0]) is None:
        return CommandResult(argv, None, error=f"{argv[0]}: command not found")
    merged = None if env is None else {**os.environ, **env}
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=merged,
            stdin=subprocess.DEVNULL, errors="replace",
        )
    except subprocess.TimeoutExpired:
        return CommandResult(argv, None, error=f"{argv[0]}: timed out after {timeout:g}s")
    except OSError as exc:
        return CommandResult(argv, None, error=f"{argv[0]}: {exc.strerror or exc}")
    return CommandResult(argv, done.returncode, done.stdout, done.stderr)


@dataclass
class System:
    """A filesystem root plus a command runner plus the environment."""

    root: Path = Path("/")
    runner: Runner = run_command
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    # Python modules: None means import for real; tests may substitute.
    modules: Mapping[str, object] | None = None

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    def read_text(self, absolute: str) -> str | None:
        try:
            return self.path(absolute).read_text(errors="replace")
        except (OSError, ValueError):
            return None

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
        return self.path(absolute).exists()

    def run(self, argv: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S,
            env: Mapping[str, str] | None = None) -> CommandResult:
        return self.runner(argv, timeout, env)

    @property
    def is_real_root(self) -> bool:
        return self.root.resolve() == Path("/")

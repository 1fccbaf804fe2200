"""What the agent launched: one JSON record per provider instance.

Records live in ``<state dir>/providers/<name>.json`` and are written
atomically (temp, fsync, rename), so after a crash a record is either the old
or the new one. A record says how to find the running thing again (pid and its
start time, container id, unit path) so `down`, `ls` and `logs` work from a
fresh process, e.g. the CLI after the daemon restarted.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nodeagent.contracts.provider import ProviderSpec
from nodeagent.fsutil import atomic_write_text


@dataclass
class LaunchRecord:
    spec: ProviderSpec
    started_at: float
    pid: int | None = None
    pid_create_time: float | None = None  # guards against pid reuse
    container_id: str | None = None
    unit_path: str | None = None
    log_path: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["spec"] = self.spec.to_wire()
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "LaunchRecord":
        data = json.loads(text)
        data["spec"] = ProviderSpec.model_validate(data["spec"])
        return cls(**data)


class Registry:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @classmethod
    def default(cls) -> "Registry":
        from nodeagent.paths import resolve_paths

        return cls(resolve_paths().state_dir / "providers")

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def log_path(self, name: str) -> Path:
        return self.directory / f"{name}.log"

    def save(self, record: LaunchRecord) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path(record.spec.name), record.to_json(), mode=0o600)

    def load(self, name: str) -> LaunchRecord | None:
        try:
            return LaunchRecord.from_json(self.path(name).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.path(name)}: unreadable launch record: {exc}") from None

    def remove(self, name: str) -> None:
        try:
            self.path(name).unlink()
        except FileNotFoundError:
            pass

    def all(self) -> list[LaunchRecord]:
        if not self.directory.is_dir():
            return []
        records = []
        for path in sorted(self.directory.glob("*.json")):
            record = self.load(path.stem)
            if record is not None:
                records.append(record)
        return records

"""One entry point over the three launch modes: pick a launcher for a mode,
and report a launched provider as a `ProviderStatus`.

The CLI and the daemon both go through here, so `providers ls` from a shell
and the API's provider list agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

from nodeagent.contracts.provider import ProviderSpec, ProviderStatus
from nodeagent.launch.health import check_health
from nodeagent.launch.podman import PodmanHostConfig, PodmanLauncher
from nodeagent.launch.podman_versions import PodmanVersion
from nodeagent.launch.quadlet import QuadletLauncher, QuadletOptions, service_name
from nodeagent.launch.registry import LaunchRecord, Registry
from nodeagent.launch.subprocess import SubprocessLauncher


class Launcher(Protocol):
    def up(self, spec: ProviderSpec, wait: bool = True) -> LaunchRecord: ...
    def down(self, name: str, missing_ok: bool = False) -> bool: ...
    def state(self, name: str) -> str: ...
    def logs(self, name: str, lines: int = 100) -> str: ...


@dataclass
class LaunchContext:
    """What launchers need from the host; built once per command or daemon."""

    registry: Registry
    podman_version: PodmanVersion | None = None  # from the probe; probed lazily for podman mode
    podman_host: PodmanHostConfig | None = None
    quadlet: QuadletOptions = QuadletOptions()

    def launcher(self, mode: str) -> Launcher:
        if mode == "subprocess":
            return SubprocessLauncher(self.registry)
        if mode == "podman":
            return PodmanLauncher(self.registry, host=self.podman_host or PodmanHostConfig.detect(),
                                  version=self.podman_version)
        if mode == "quadlet":
            if self.podman_version is None:
                raise ValueError("quadlet mode needs the Podman version (from the probe or --podman-version)")
            return QuadletLauncher(self.registry, self.podman_version, self.quadlet)
        raise ValueError(f"unknown launch mode {mode!r} (subprocess, podman, quadlet)")


_RUNNING = {"running", "active"}
_STARTING = {"created", "configured", "activating", "initialized"}


def status_of(record: LaunchRecord, launcher: Launcher) -> ProviderStatus:
    """The current state of a launched provider: the launcher's view of the
    process/container/unit combined with an HTTP health check."""
    spec = record.spec
    now = datetime.now(timezone.utc)
    try:
        raw = launcher.state(spec.name)
    except Exception as exc:  # a broken podman/systemctl must not break `ls`
        raw, reason = "unknown", f"cannot query {spec.mode}: {exc}"
    else:
        reason = None
    health = check_health(spec.base_url, spec.health.path, timeout_s=1.0) if raw in _RUNNING | _STARTING else None
    if raw in _RUNNING and health is not None and health.ok:
        state = "running"
    elif raw in _RUNNING and health is not None and health.state in ("loading", "down"):
        state = "starting"
    elif raw in _RUNNING:
        state = "unhealthy"
        reason = reason or (health.detail if health else None)
    elif raw in _STARTING:
        state = "starting"
    elif raw in ("absent", "exited", "inactive", "stopped"):
        state = "stopped"
        reason = reason or f"{spec.mode}: {raw}"
    elif raw in ("failed",):
        state = "failed"
        reason = reason or f"{service_name(spec)} failed; see `agent-machine providers logs {spec.name}`"
    else:
        state = "unknown"
    return ProviderStatus(
        name=spec.name,
        provider=spec.provider,
        mode=spec.mode,
        state=state,
        endpoint=spec.base_url,
        pid=record.pid,
        container_id=record.container_id,
        unit=service_name(spec) if spec.mode == "quadlet" else None,
        unit_path=record.unit_path,
        health=health.detail if health else None,
        image=spec.image,
        model_digest=spec.model.digest,
        started_at=datetime.fromtimestamp(record.started_at, timezone.utc),
        checked_at=now,
        reason=reason,
    )


def launched_providers(registry: Registry | None = None, *, quadlet_scope: str = "user"
                       ) -> list[tuple[LaunchRecord, ProviderStatus]]:
    """Every provider `providers up` started on this machine, with its live status.

    Quadlet units are checked against the probed Podman version (the oldest
    Quadlet version when Podman cannot tell).
    """
    from nodeagent.launch.podman import PodmanError, podman_version
    from nodeagent.launch.podman_versions import QUADLET_MIN

    registry = registry or Registry.default()
    records = registry.all()
    version = None
    if any(r.spec.mode == "quadlet" for r in records):
        try:
            version = podman_version()
        except PodmanError:
            version = QUADLET_MIN
    context = LaunchContext(registry, podman_version=version, quadlet=QuadletOptions(scope=quadlet_scope))
    return [(record, status_of(record, context.launcher(record.spec.mode))) for record in records]

"""The mode-neutral shape of a provider container.

`ContainerShape` is what a container *is* once Podman has been told how to run
it, independent of whether that telling was a ``podman run`` argv or a Quadlet
unit: image, argv, ports, mounts, devices, labels, health check, security
settings. Both renderers produce it from a `ProviderSpec` and both parsers read
it back, so a round trip (spec → unit text → parsed shape) is compared field by
field with `ContainerShape.from_spec`, and a difference names the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from nodeagent.contracts.provider import ProviderSpec


class RenderError(ValueError):
    """A spec cannot be rendered for the target (bad path, unsupported Podman)."""


@dataclass(frozen=True)
class ContainerShape:
    name: str
    image: str
    args: tuple[str, ...]
    pull: str = "missing"
    env: tuple[tuple[str, str], ...] = ()
    publish: tuple[str, ...] = ()  # "127.0.0.1:8081:8080"
    volumes: tuple[str, ...] = ()  # "/host:/ctr:ro"
    devices: tuple[tuple[str, bool], ...] = ()  # (source, optional)
    group_add: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    health_cmd: tuple[str, ...] | None = None
    health_interval_s: int | None = None
    health_timeout_s: int | None = None
    health_start_period_s: int | None = None
    health_retries: int | None = None
    health_on_failure: str | None = None
    drop_all_capabilities: bool = False
    no_new_privileges: bool = False
    security_label_disable: bool = False
    ipc_host: bool = False
    shm_size: str | None = None
    stop_timeout_s: int | None = None
    ulimits: tuple[str, ...] = ()

    @classmethod
    def from_spec(
        cls,
        spec: ProviderSpec,
        ulimits: tuple[str, ...] = (),
        device_exists: Callable[[str], bool] | None = None,
    ) -> "ContainerShape":
        """The shape ``spec`` asks for. With ``device_exists``, optional devices
        that are absent are left out (what ``AddDevice=-/dev/dri`` does)."""
        if spec.mode not in ("podman", "quadlet") or not spec.image or spec.container_port is None:
            raise RenderError(f"{spec.name}: mode {spec.mode} is not a container mode")
        for mount in spec.mounts:
            for path in (mount.source, mount.target):
                if ":" in path or "\n" in path or "," in path:
                    raise RenderError(f"{spec.name}: mount path {path!r} may not contain ':', ',' or a newline")
        devices = tuple(
            (d.source, d.optional)
            for d in spec.devices
            if not (d.optional and device_exists is not None and not device_exists(d.source))
        )
        health = spec.health
        has_health = bool(health.command)
        host = f"[{spec.host}]" if ":" in spec.host else spec.host
        return cls(
            name=spec.name,
            image=spec.image,
            args=tuple(spec.args),
            pull=spec.pull,
            env=tuple(sorted(spec.env.items())),
            publish=(f"{host}:{spec.port}:{spec.container_port}",),
            volumes=tuple(f"{m.source}:{m.target}{':ro' if m.read_only else ''}" for m in spec.mounts),
            devices=devices,
            group_add=tuple(spec.group_add),
            labels=tuple(sorted(spec.labels.items())),
            health_cmd=tuple(health.command) if has_health and health.command else None,
            health_interval_s=health.interval_s if has_health else None,
            health_timeout_s=health.timeout_s if has_health else None,
            health_start_period_s=health.start_period_s if has_health else None,
            health_retries=health.retries if has_health else None,
            health_on_failure=health.on_failure if has_health and health.on_failure != "none" else None,
            drop_all_capabilities=spec.drop_all_capabilities,
            no_new_privileges=spec.no_new_privileges,
            security_label_disable=spec.security_label_disable,
            ipc_host=spec.ipc_host,
            shm_size=spec.shm_size,
            stop_timeout_s=spec.stop_timeout_s,
            ulimits=tuple(ulimits),
        )

    def differences(self, other: "ContainerShape") -> list[str]:
        """Fields where ``other`` differs from ``self``: 'field: expected X, found Y'."""
        out = []
        for field in dataclasses.fields(self):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if mine != theirs:
                out.append(f"{field.name}: expected {mine!r}, found {theirs!r}")
        return out


def parse_duration_s(text: str) -> int:
    """Seconds from a Go/systemd-style duration as we write them ('30s', '2m', '1h', '45')."""
    text = text.strip()
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise ValueError(f"not a duration: {text!r}") from None

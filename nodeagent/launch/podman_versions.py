"""Podman versions and the Quadlet keys each one understands.

Quadlet refuses a whole unit when it meets a ``[Container]`` key it does not
know (4.6+ exits 1), and ``systemd-analyze verify`` does not catch that. So a
unit rendered for a probed Podman must never carry a newer key: every key the
renderer emits is looked up here, and `unsupported_keys` is the check a test
runs over every rendered unit.

The table holds the first Podman release that accepts each key (REFERENCE.md
section 5, from the Podman release notes). Keys of ``[Unit]``, ``[Service]``
and ``[Install]`` are passed through to systemd unchanged, except the few
Quadlet rejects in ``[Service]`` (`SERVICE_KEYS_REFUSED`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering


@total_ordering
@dataclass(frozen=True)
class PodmanVersion:
    """A Podman release as (major, minor, patch); pre-release suffixes are ignored."""

    major: int
    minor: int
    patch: int = 0

    _PATTERN = re.compile(r"^\s*(?:podman\s+version\s+)?v?(\d+)\.(\d+)(?:\.(\d+))?(?:[-+~][\w.+~-]*)?\s*$", re.I)

    @classmethod
    def parse(cls, text: "str | PodmanVersion") -> "PodmanVersion":
        """Parse ``4.3.1``, ``v5.0``, ``5.0.0-rc2``, ``podman version 4.9.3``.

        Raises ValueError naming the text when it is not a version.
        """
        if isinstance(text, PodmanVersion):
            return text
        match = cls._PATTERN.match(str(text))
        if not match:
            raise ValueError(f"not a Podman version: {text!r} (expected MAJOR.MINOR[.PATCH], e.g. 4.9.3)")
        return cls(int(match.group(1)), int(match.group(2)), int(match.group(3) or 0))

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, PodmanVersion):
            return NotImplemented
        return self.as_tuple() < other.as_tuple()

    def at_least(self, major: int, minor: int = 0, patch: int = 0) -> bool:
        return self.as_tuple() >= (major, minor, patch)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @property
    def short(self) -> str:
        return f"{self.major}.{self.minor}"


def _v(text: str) -> PodmanVersion:
    return PodmanVersion.parse(text)


QUADLET_MIN = _v("4.4")  # no Quadlet generator before this (Debian 12 ships 4.3.1)
NOTIFY_HEALTHY_MIN = _v("5.0")  # Notify=healthy: READY only once the health check passes

# [Container] key -> first Podman version whose Quadlet accepts it.
CONTAINER_KEYS: dict[str, PodmanVersion] = {
    **{key: _v("4.4") for key in (
        "AddCapability", "AddDevice", "Annotation", "ContainerName", "DropCapability",
        "Environment", "EnvironmentFile", "Exec", "Group", "Image", "Label", "Network",
        "NoNewPrivileges", "Notify", "PodmanArgs", "PublishPort", "ReadOnly", "RunInit",
        "SeccompProfile", "Timezone", "User", "Volume",
    )},
    **{key: _v("4.5") for key in (
        "HealthCmd", "HealthInterval", "HealthOnFailure", "HealthRetries", "HealthStartPeriod",
        "HealthTimeout", "Mount", "SecurityLabelDisable", "Tmpfs", "UserNS",
    )},
    **{key: _v("4.6") for key in ("AutoUpdate", "HostName", "Pull", "Sysctl", "WorkingDir")},
    **{key: _v("4.7") for key in ("PidsLimit", "ShmSize", "Ulimit")},
    **{key: _v("5.0") for key in ("Entrypoint", "Pod", "StopTimeout")},
    "GroupAdd": _v("5.1"),
    "ServiceName": _v("5.3"),
    **{key: _v("5.5") for key in ("Memory", "Retry", "RetryDelay")},
}

# Values of a key that arrived later than the key itself.
VALUE_GATES: dict[tuple[str, str], PodmanVersion] = {
    ("Notify", "healthy"): NOTIFY_HEALTHY_MIN,
}

# Quadlet refuses these in [Service] (the container runs as the unit's user).
SERVICE_KEYS_REFUSED = frozenset({"User", "Group", "DynamicUser"})
# Quadlet's generated service is Type=notify unless told oneshot.
SERVICE_TYPES_ALLOWED = frozenset({"notify", "oneshot"})
# [Install] keys Quadlet honours when it writes the generated unit's symlinks.
INSTALL_KEYS = frozenset({"WantedBy", "RequiredBy", "Alias"})


def container_key_supported(key: str, version: PodmanVersion, value: str | None = None) -> bool:
    first = CONTAINER_KEYS.get(key)
    if first is None or version < first:
        return False
    if value is not None:
        gate = VALUE_GATES.get((key, value.strip()))
        if gate is not None and version < gate:
            return False
    return True


def unsupported_keys(sections: "list[tuple[str, list[tuple[str, str]]]]", version: PodmanVersion) -> list[str]:
    """Every reason ``sections`` would be refused by Quadlet of ``version``.

    ``sections`` is [(section name, [(key, value), ...]), ...] as `units.UnitFile`
    holds it. Returns human-readable problems; empty means the unit is safe.
    """
    problems: list[str] = []
    if version < QUADLET_MIN:
        problems.append(f"Podman {version} has no Quadlet (it starts at {QUADLET_MIN.short})")
    for section, entries in sections:
        for key, value in entries:
            if section == "Container":
                first = CONTAINER_KEYS.get(key)
                if first is None:
                    problems.append(f"[Container] {key}= is not a Quadlet key known to this table")
                elif version < first:
                    problems.append(f"[Container] {key}= needs Podman >= {first.short}, target is {version.short}")
                else:
                    gate = VALUE_GATES.get((key, value.strip()))
                    if gate is not None and version < gate:
                        problems.append(
                            f"[Container] {key}={value} needs Podman >= {gate.short}, target is {version.short}"
                        )
            elif section == "Service":
                if key in SERVICE_KEYS_REFUSED:
                    problems.append(f"[Service] {key}= is refused by Quadlet")
                if key == "Type" and value not in SERVICE_TYPES_ALLOWED:
                    problems.append(f"[Service] Type={value}: Quadlet allows only notify or oneshot")
            elif section == "Install":
                if key not in INSTALL_KEYS:
                    problems.append(f"[Install] {key}= is ignored by Quadlet")
            elif section != "Unit":
                problems.append(f"[{section}] is not a section of a .container unit")
    return problems


def version_from_profile(profile: object) -> PodmanVersion | None:
    """The Podman version a `MachineProfile` probed (``runtime.podman.version``),
    or None when Podman is absent or its version unreadable."""
    podman = getattr(getattr(profile, "runtime", None), "podman", None)
    text = getattr(podman, "version", None)
    if not text:
        return None
    try:
        return PodmanVersion.parse(text)
    except ValueError:
        return None

"""Storage for the state and cache directories, and a tmpfs for the RAM tier.

For each directory: the filesystem holding it (the longest mount point prefix
in /proc/self/mountinfo; a later mount on the same point hides an earlier
one), its type and device, free/total bytes (statvfs), and whether the block
device is rotational (``/sys/dev/block/<maj:min>/queue/rotational``, or its
parent's for a partition). A directory that does not exist yet is measured at
its nearest existing parent: that is where it will be created.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from nodeagent.contracts.machine import ProbeStatus, StorageInfo, StorageLocation
from nodeagent.probe.system import System

RAM_TIER_FS = ("tmpfs", "ramfs")


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fs_type: str
    major_minor: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 2:
            continue
        mounts.append(Mount(mount_point=_unescape(fields[4]), fs_type=tail[0], major_minor=fields[2],
                            source=_unescape(tail[1])))
    return mounts


def mount_for(mounts: list[Mount], path: str) -> Mount | None:
    best: Mount | None = None
    for mount in mounts:  # in mount order: a later mount on the same point wins
        point = mount.mount_point
        inside = path == point or point == "/" or path.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= len(best.mount_point)):
            best = mount
    return best


def _rotational(system: System, mount: Mount) -> bool | None:
    """From the block device's queue/rotational; a partition asks its disk.

    Filesystems such as btrfs report an anonymous device number (0:N); their
    source (/dev/nvme0n1p6) still names the block device.
    """
    if not mount.major_minor.startswith("0:"):
        base = f"/sys/dev/block/{mount.major_minor}"
    elif mount.source.startswith("/dev/"):
        base = f"/sys/class/block/{posixpath.basename(mount.source)}"
    else:
        return None  # no block device: tmpfs, overlay, nfs...
    value = system.read_text(f"{base}/queue/rotational")
    if value is None and system.exists(f"{base}/partition"):
        value = system.read_text(f"{base}/../queue/rotational")
    if value is None or value.strip() not in ("0", "1"):
        return None
    return value.strip() == "1"


def _existing(system: System, path: str) -> str:
    current = posixpath.normpath(path)
    while current != "/" and not system.exists(current):
        current = posixpath.dirname(current)
    return current


def _location(system: System, role: str, path: str, mounts: list[Mount]) -> StorageLocation:
    measured = _existing(system, path)
    mount = mount_for(mounts, measured)
    usage = system.statfs(system.path(measured))
    return StorageLocation(
        role=role,  # type: ignore[arg-type]
        path=path,
        exists=measured == posixpath.normpath(path),
        measured_path=measured,
        mount_point=mount.mount_point if mount else None,
        fs_type=mount.fs_type if mount else None,
        device=mount.source if mount else None,
        total_bytes=usage.total_bytes if usage else None,
        free_bytes=usage.free_bytes if usage else None,
        rotational=_rotational(system, mount) if mount else None,
    )


def ram_tier_candidates(system: System) -> list[str]:
    candidates = []
    runtime_dir = system.env.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        candidates.append(runtime_dir)
    candidates.append("/dev/shm")
    return candidates


def probe_storage(system: System, state_dir: str, cache_dir: str) -> StorageInfo:
    text = system.read_text("/proc/self/mountinfo")
    mounts = parse_mountinfo(text) if text else []
    locations = [_location(system, "state", state_dir, mounts), _location(system, "cache", cache_dir, mounts)]
    ram_tier = None
    for candidate in ram_tier_candidates(system):
        mount = mount_for(mounts, candidate)
        if mount and mount.fs_type in RAM_TIER_FS and system.is_dir(candidate):
            ram_tier = candidate
            locations.append(_location(system, "ram_tier", candidate, mounts))
            break
    problems = []
    if text is None:
        problems.append("/proc/self/mountinfo unreadable: filesystem types unknown")
    if ram_tier is None:
        problems.append("no tmpfs for the RAM tier (neither $XDG_RUNTIME_DIR nor /dev/shm is a tmpfs)")
    return StorageInfo(
        status=ProbeStatus.ok,
        reason="; ".join(problems) or None,
        locations=locations,
        ram_tier_path=ram_tier,
    )

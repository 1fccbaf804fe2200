"""StorageReceipt: secret-free evidence of where this node keeps what.

For each role — models, the KV tiers T1 and T2, scratch, receipts, the state
database — the filesystem that holds it (longest mount prefix in
/proc/self/mountinfo, the probe's own parser), its type and source device,
whether it is memory (tmpfs/ramfs: gone at power-off) or disk, encryption when
it can be seen from here, free and total bytes, and the byte budget the node
keeps there. Nothing secret is recorded: no key material, no file names of
entries, no tenant data.

Encryption is detected, not assumed: a device-mapper device whose
``/sys/dev/block/<maj:min>/dm/uuid`` starts ``CRYPT-`` (dm-crypt/LUKS), or one
whose slaves are; a stacked encrypting filesystem (ecryptfs, gocryptfs); a
tmpfs is ``memory``. Anything else is ``none-detected`` — fscrypt directory
policies and self-encrypting drives are invisible at this level, and the
receipt says so rather than claiming "none".

TopoLVM: when the node runs as the DaemonSet ``render kube`` writes, model,
cache and scratch volumes are TopoLVM logical volumes; their source device
names ``topolvm`` and the volume is recorded.

The receipt's digest (sha256 of its RFC 8785 form without the time it was
taken) changes exactly when the layout changes, so the node signs a new one
into the log at start and whenever it differs from the last one logged;
activation decisions cite it by that digest.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nodeagent.probe.storage import RAM_TIER_FS, Mount, mount_for, parse_mountinfo
from nodeagent.receipts.canonical import canonical_json

CRYPTO_FS = ("ecryptfs", "fuse.gocryptfs", "fuse.encfs", "fuse.cryfs")


@dataclass(frozen=True, slots=True)
class StorageRole:
    role: str  # models | kv-t1 | kv-t2 | scratch | receipts | state-db
    path: Path
    budget_bytes: int | None = None  # what the node keeps there at most (None: no budget of its own)


@dataclass(frozen=True, slots=True)
class StorageReceipt:
    locations: tuple[dict[str, Any], ...]

    def body(self) -> dict[str, Any]:
        return {"apiVersion": "agent-machine/v1", "kind": "StorageReceipt", "locations": list(self.locations)}

    @property
    def digest(self) -> str:
        """sha256:<hex> of the layout (free bytes excluded: they change every write, the layout does not)."""
        stable = [{k: v for k, v in loc.items() if k != "freeBytes"} for loc in self.locations]
        return "sha256:" + hashlib.sha256(canonical_json(stable)).hexdigest()

    def location(self, role: str) -> dict[str, Any] | None:
        return next((loc for loc in self.locations if loc["role"] == role), None)


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _encryption(mount: Mount | None, sys_root: Path) -> str:
    if mount is None:
        return "unknown"
    if mount.fs_type in RAM_TIER_FS:
        return "memory"
    if mount.fs_type in CRYPTO_FS:
        return mount.fs_type
    device = sys_root / "dev" / "block" / mount.major_minor
    seen: set[Path] = set()
    queue = [device]
    while queue:  # the device, and the devices it is built on (LVM on LUKS, …)
        current = queue.pop()
        try:
            current = current.resolve()
        except OSError:
            continue
        if current in seen:
            continue
        seen.add(current)
        try:
            uuid = (current / "dm" / "uuid").read_text().strip()
        except OSError:
            uuid = ""
        if uuid.startswith("CRYPT-"):
            return "dm-crypt"
        slaves = current / "slaves"
        if slaves.is_dir():
            queue.extend(slaves.iterdir())
    return "none-detected"


def describe(role: StorageRole, mounts: list[Mount], sys_root: Path = Path("/sys")) -> dict[str, Any]:
    measured = _existing(role.path)
    mount = mount_for(mounts, str(measured.resolve()))
    try:
        stats = os.statvfs(measured)
        total, free = stats.f_blocks * stats.f_frsize, stats.f_bavail * stats.f_frsize
    except OSError:
        total = free = None
    fs_type = mount.fs_type if mount else None
    source = mount.source if mount else None
    return {
        "role": role.role,
        "path": str(role.path),
        "exists": role.path.exists(),
        "mountPoint": mount.mount_point if mount else None,
        "fsType": fs_type,
        "device": source,
        "medium": "memory" if fs_type in RAM_TIER_FS else ("disk" if mount else "unknown"),
        "encryption": _encryption(mount, sys_root),
        "topolvmVolume": source if source and "topolvm" in source else None,
        "totalBytes": total,
        "freeBytes": free,
        "budgetBytes": role.budget_bytes,
    }


def roles_for(state_dir: Path, t1_dir: Path | None, *, t1_budget: int | None, t2_budget: int | None,
              t2_dir: Path | None = None) -> list[StorageRole]:
    """Where this node keeps each kind of data (the same places `default_executor` opens)."""
    roles = [StorageRole("models", state_dir / "models")]
    if t1_dir is not None:
        roles.append(StorageRole("kv-t1", t1_dir, t1_budget))
    roles.append(StorageRole("kv-t2", t2_dir or state_dir / "kvcache", t2_budget))
    roles.append(StorageRole("scratch", Path(tempfile.gettempdir())))
    roles.append(StorageRole("receipts", state_dir / "receipts"))
    roles.append(StorageRole("state-db", state_dir / "state.db"))
    return roles


def take_storage_receipt(roles: list[StorageRole], *, mountinfo: Path = Path("/proc/self/mountinfo"),
                         sys_root: Path = Path("/sys")) -> StorageReceipt:
    try:
        mounts = parse_mountinfo(mountinfo.read_text())
    except OSError:
        mounts = []
    return StorageReceipt(tuple(describe(role, mounts, sys_root) for role in roles))


__all__ = ["StorageReceipt", "StorageRole", "describe", "roles_for", "take_storage_receipt"]

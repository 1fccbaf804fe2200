"""Host identity: OS, kernel, architecture, page size, machine identity, container/VM.

Everything is read from files below the system root (never ``os.uname()``), so a
captured tree reports the captured machine, not the one running the tests.
"""

from __future__ import annotations

import hashlib
import re

from nodeagent.contracts.machine import HostInfo, ProbeStatus
from nodeagent.probe.system import System

# The machine-id is a secret-ish stable identifier (machine-id(5) asks apps to
# hash it with an app-specific key before use); ours never leaves unhashed.
MACHINE_ID_KEY = b"agent-machine/v1 machine-id\x00"

# DMI sys_vendor / product_name substrings -> virtualization, as systemd-detect-virt names them.
_DMI_VENDORS = (
    ("QEMU", "qemu"),
    ("KVM", "kvm"),
    ("Amazon EC2", "amazon"),
    ("Google", "google"),
    ("Microsoft Corporation", "microsoft"),
    ("VMware", "vmware"),
    ("innotek GmbH", "oracle"),
    ("VirtualBox", "oracle"),
    ("Xen", "xen"),
    ("Parallels", "parallels"),
    ("OpenStack", "openstack"),
    ("Bochs", "bochs"),
    ("Apple Virtualization", "apple"),
)


def parse_os_release(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def machine_id_hash(raw: str) -> str | None:
    """sha256 over our key and the machine-id; None for an empty/uninitialized id."""
    value = raw.strip()
    if not re.fullmatch(r"[0-9a-fA-F]{32}", value):
        return None
    return hashlib.sha256(MACHINE_ID_KEY + value.lower().encode()).hexdigest()


def page_size(system: System) -> int | None:
    """The kernel page size, from the first mapping of /proc/self/smaps."""
    text = system.read_text("/proc/self/smaps", limit=4096)
    if text:
        match = re.search(r"^KernelPageSize:\s+(\d+)\s+kB", text, re.M)
        if match:
            return int(match.group(1)) * 1024
    return None


def architecture(system: System) -> str | None:
    """uname machine (x86_64, aarch64), from /proc, without calling uname."""
    arch = system.read_text("/proc/sys/kernel/arch")
    if arch and arch.strip():
        return arch.strip()
    # Older kernels lack /proc/sys/kernel/arch: tell from the shape of cpuinfo.
    cpuinfo = system.read_text("/proc/cpuinfo", limit=8192) or ""
    if re.search(r"^CPU implementer\s*:", cpuinfo, re.M):
        return "aarch64"
    if re.search(r"^vendor_id\s*:\s*(GenuineIntel|AuthenticAMD|HygonGenuine)", cpuinfo, re.M):
        return "x86_64" if re.search(r"^flags\s*:.*\blm\b", cpuinfo, re.M) else "i686"
    return None


def detect_container(system: System) -> str | None:
    env = system.env
    cgroup1 = system.read_text("/proc/1/cgroup") or ""
    if env.get("KUBERNETES_SERVICE_HOST") or "kubepods" in cgroup1:
        return "kubernetes"
    if system.exists("/run/.containerenv"):
        return "podman"
    if system.exists("/.dockerenv"):
        return "docker"
    # systemd-nspawn, lxc and others set container= in pid 1's environment
    # (often unreadable even to root, hence the fallbacks below and above).
    environ = system.read_bytes("/proc/1/environ")
    if environ:
        for item in environ.split(b"\0"):
            if item.startswith(b"container="):
                return item.split(b"=", 1)[1].decode(errors="replace") or "container"
    if env.get("container"):
        return env["container"]
    for marker, name in (("/docker/", "docker"), ("/lxc/", "lxc"), ("/libpod-", "podman"),
                         ("/machine.slice/", "systemd-nspawn")):
        if marker in cgroup1:
            return name
    return None


def detect_virtualization(system: System) -> str | None:
    hypervisor_type = (system.read_text("/sys/hypervisor/type") or "").strip()
    if hypervisor_type == "xen":
        return "xen"
    dmi = " ".join(
        (system.read_text(f"/sys/class/dmi/id/{name}") or "").strip()
        for name in ("sys_vendor", "product_name", "bios_vendor")
    )
    for needle, name in _DMI_VENDORS:
        if needle in dmi:
            return name
    cpuinfo = system.read_text("/proc/cpuinfo", limit=8192) or ""
    if re.search(r"^flags\s*:.*\bhypervisor\b", cpuinfo, re.M):
        return "vm"  # a hypervisor is there, but it did not say which
    # arm64 guests have no hypervisor flag; their device tree often names the VMM.
    compatible = system.read_bytes("/proc/device-tree/compatible") or b""
    if b"linux,dummy-virt" in compatible:
        return "qemu"
    return None


def probe_host(system: System) -> HostInfo:
    hostname = (system.read_text("/proc/sys/kernel/hostname") or system.read_text("/etc/hostname") or "").strip()
    os_release_text = system.read_text("/etc/os-release") or system.read_text("/usr/lib/os-release")
    os_release = parse_os_release(os_release_text) if os_release_text else {}
    kernel = (system.read_text("/proc/sys/kernel/osrelease") or "").strip() or None
    machine_id = system.read_text("/etc/machine-id")
    missing = []
    if os_release_text is None:
        missing.append("/etc/os-release")
    if kernel is None:
        missing.append("/proc/sys/kernel/osrelease")
    if machine_id is None:
        missing.append("/etc/machine-id")
    return HostInfo(
        status=ProbeStatus.ok,
        reason=f"unreadable: {', '.join(missing)}" if missing else None,
        hostname=hostname or None,
        os_id=os_release.get("ID"),
        os_version=os_release.get("VERSION_ID"),
        os_pretty_name=os_release.get("PRETTY_NAME"),
        kernel_release=kernel,
        architecture=architecture(system),
        page_size=page_size(system),
        machine_id_hash=machine_id_hash(machine_id) if machine_id else None,
        container=detect_container(system),
        virtualization=detect_virtualization(system),
    )

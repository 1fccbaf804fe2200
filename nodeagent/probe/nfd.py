"""Node Feature Discovery: the probe as a features.d file, so Kubernetes labels the node with it.

NFD's *local* feature source reads every file in
``/etc/kubernetes/node-feature-discovery/features.d/`` (NFD docs, "Local
feature source", "Feature files"): one ``<name>[=<value>]`` per line, where a
name with a ``<namespace>/`` prefix becomes the label name as is (without one,
``feature.node.kubernetes.io/`` is prepended); ``#`` starts a comment; a comment
``# +expiry-time=<RFC 3339>`` makes the lines after it expire then (the worker
drops them at the next pass after that time), ``# +no-label`` and
``# +no-feature`` keep them from labels or from features; a file is read only
up to 64 kB. Label names and values follow Kubernetes' rules: a name (after the
prefix) and a value of at most 63 characters, ``[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?``
(a value may be empty), the prefix a DNS subdomain. Files are written as a
dot-file (which the worker skips) and renamed into place, so it never reads half
of one.

The labels, all under ``agent-machine.io/`` (NFD v0.14+ accepts any namespace
outside ``kubernetes.io``; older workers need ``-extra-label-ns=agent-machine.io``):

==================================================  ==============================================
``platform``                                        nvidia | amd | asahi | vulkan | cpu
``cpu.arch``, ``cpu.cores``, ``memory.gib``          the host
``nvidia.count``, ``nvidia.product``,               GPUs (names as GPU feature discovery writes them:
``nvidia.memory-mib``, ``nvidia.compute``,          spaces to dashes), CUDA driver, MIG instances
``nvidia.cuda``, ``nvidia.mig-devices``
``amd.count``, ``amd.<gfx target>=true``            AMD GPUs by gfx target
``vulkan.devices``, ``vulkan.driver.<name>=true``,   devices llama.cpp's Vulkan backend would use, and
``vulkan.fp16|intdot|coopmat=true``                 what the best of them has
``asahi=true``, ``asahi.soc``, ``asahi.chip``,      Apple Silicon under Asahi Linux
``asahi.page-16k``, ``asahi.unified-memory-gib``
``backend.<name>=true``                             recommended backends that are ready
``model.<name>=hot``, ``models.hot``                models loaded in a provider (daemon only)
==================================================  ==============================================
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable

NAMESPACE = "agent-machine.io"
FEATURES_DIR = Path("/etc/kubernetes/node-feature-discovery/features.d")
FILE_NAME = "agent-machine"
MAX_FILE_BYTES = 64 * 1024
_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DIRECTIVES = ("expiry-time", "no-label", "no-feature")


def label_value(text: str) -> str:
    """``text`` as a label value: runs of other characters become one dash, the ends trimmed to
    alphanumerics, at most 63 characters (``NVIDIA H100 80GB HBM3`` -> ``NVIDIA-H100-80GB-HBM3``)."""
    value = re.sub(r"[^-A-Za-z0-9_.]+", "-", text.strip())[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value)


@dataclass(frozen=True)
class Feature:
    name: str  # without the namespace
    value: str = "true"

    def line(self) -> str:
        return f"{NAMESPACE}/{self.name}={self.value}"


def features(profile: Any, *, hot_models: Iterable[str] = ()) -> list[Feature]:
    """The node's features from a `MachineProfile` (and, from a running node, its hot models)."""
    out: list[Feature] = [Feature("platform", label_value(str(profile.platform)))]
    cpu, memory = profile.cpu, profile.memory
    if cpu.architecture:
        out.append(Feature("cpu.arch", label_value(cpu.architecture)))
    if cpu.cores:
        out.append(Feature("cpu.cores", str(cpu.cores)))
    if memory.total_bytes:
        out.append(Feature("memory.gib", str(memory.total_bytes >> 30)))
    out += _nvidia(profile.nvidia) + _amd(profile.amd) + _vulkan(profile.vulkan) + _asahi(profile.asahi)
    for backend in profile.recommended_backends:
        if backend.ready:
            out.append(Feature(f"backend.{label_value(backend.backend)}"))
    hot = sorted({label_value(name) for name in hot_models} - {""})
    for name in hot:
        if _NAME.match(f"model.{name}") and len(f"model.{name}") <= 63:
            out.append(Feature(f"model.{name}", "hot"))
    out.append(Feature("models.hot", str(len(hot))))
    seen: dict[str, Feature] = {}
    for feature in out:  # one line per name: the first (e.g. one backend listed twice)
        seen.setdefault(feature.name, feature)
    return list(seen.values())


def _nvidia(nv: Any) -> list[Feature]:
    if not nv.gpus:
        return []
    first = nv.gpus[0]
    out = [Feature("nvidia.count", str(len(nv.gpus)))]
    if first.name:
        out.append(Feature("nvidia.product", label_value(first.name)))
    if first.memory_total_bytes:
        out.append(Feature("nvidia.memory-mib", str(first.memory_total_bytes >> 20)))
    if first.compute_capability:
        out.append(Feature("nvidia.compute", label_value(first.compute_capability)))
    if nv.cuda_driver_version:
        out.append(Feature("nvidia.cuda", label_value(nv.cuda_driver_version)))
    mig = sum(len(gpu.mig_devices) for gpu in nv.gpus)
    if mig:
        out.append(Feature("nvidia.mig-devices", str(mig)))
    return out


def _amd(amd: Any) -> list[Feature]:
    if not amd.gpus:
        return []
    out = [Feature("amd.count", str(len(amd.gpus)))]
    out += [Feature(f"amd.{label_value(gpu.gfx_target)}") for gpu in amd.gpus if gpu.gfx_target]
    return out


def _vulkan(vk: Any) -> list[Feature]:
    usable = [d for d in vk.devices if d.ggml_usable]
    if not usable:
        return []
    out = [Feature("vulkan.devices", str(len(usable)))]
    if vk.instance_version:
        out.append(Feature("vulkan.api", label_value(".".join(vk.instance_version.split(".")[:2]))))
    out += [Feature(f"vulkan.driver.{label_value(d.driver_name).lower()}") for d in usable if d.driver_name]
    best = usable[0]
    out += [Feature(f"vulkan.{name}") for name, has in (("fp16", best.fp16), ("intdot", best.int_dot),
                                                        ("coopmat", best.coopmat)) if has]
    return out


def _asahi(asahi: Any) -> list[Feature]:
    if str(getattr(asahi.status, "value", asahi.status)) != "ok":
        return []
    out = [Feature("asahi")]
    if asahi.soc:
        out.append(Feature("asahi.soc", label_value(asahi.soc)))
    if asahi.chip:
        out.append(Feature("asahi.chip", label_value(asahi.chip)))
    if asahi.page_size_16k:
        out.append(Feature("asahi.page-16k"))
    if asahi.unified_memory_bytes:
        out.append(Feature("asahi.unified-memory-gib", str(asahi.unified_memory_bytes >> 30)))
    return out


def render(found: Iterable[Feature], *, expires: datetime, source: str = "agent-machine probe --nfd") -> str:
    """The feature file: a comment naming its writer, the expiry directive, one line per feature."""
    stamp = expires.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    lines = [f"# written by {source}; rewritten before it expires", f"# +expiry-time={stamp}"]
    lines += [feature.line() for feature in found]
    text = "\n".join(lines) + "\n"
    problems = check(text)
    if problems:  # a bug here, never the operator's: say which line
        raise ValueError("feature file breaks NFD's rules: " + "; ".join(problems))
    return text


def feature_file(profile: Any, *, hot_models: Iterable[str] = (), expiry_s: float = 3600.0,
                 now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    return render(features(profile, hot_models=hot_models), expires=now + timedelta(seconds=expiry_s))


def check(text: str) -> list[str]:
    """Every way ``text`` breaks NFD's feature-file rules (empty when it follows them)."""
    problems = []
    if len(text.encode()) > MAX_FILE_BYTES:
        problems.append(f"{len(text.encode())} bytes: NFD reads at most {MAX_FILE_BYTES}")
    names: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        where = f"line {number}"
        if not line.strip():
            continue
        if line.startswith("#"):
            if line.startswith("# +"):
                problems += _check_directive(where, line[3:])
            continue
        name, _, value = line.partition("=")
        if "/" in name:
            prefix, _, short = name.rpartition("/")
            if len(prefix) > 253 or not _SUBDOMAIN.match(prefix):
                problems.append(f"{where}: label prefix {prefix!r} is not a DNS subdomain")
        else:
            short = name
        if len(short) > 63 or not _NAME.match(short):
            problems.append(f"{where}: label name {short!r} must be 1-63 of [-A-Za-z0-9_.], alphanumeric at both ends")
        if len(value) > 63 or not _VALUE.match(value):
            problems.append(f"{where}: label value {value!r} must be 0-63 of [-A-Za-z0-9_.], alphanumeric at both ends")
        if name in names:
            problems.append(f"{where}: {name} is given twice")
        names.add(name)
    return problems


def _check_directive(where: str, body: str) -> list[str]:
    key, _, value = body.partition("=")
    if key not in DIRECTIVES:
        return [f"{where}: unknown directive {key!r} (NFD knows {', '.join(DIRECTIVES)})"]
    if key == "expiry-time":
        try:
            datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return [f"{where}: expiry-time {value!r} is not an RFC 3339 time"]
        if "T" not in value or not (value.endswith("Z") or re.search(r"[+-]\d\d:\d\d$", value)):
            return [f"{where}: expiry-time {value!r} needs a date, a time and a zone (RFC 3339)"]
    return []


def write(directory: str | os.PathLike[str], text: str, name: str = FILE_NAME) -> Path:
    """Put ``text`` at ``directory/name`` the way NFD wants: a dot-file (skipped by the worker),
    fsynced, renamed into place. World-readable: the NFD worker reads it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target, staging = directory / name, directory / f".{name}.tmp"
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(staging, target)
    return target


class FeatureFileKeeper:
    """Keeps a node's feature file current: rewritten when a feature changes, and before half
    of its expiry has passed (so a live daemon's labels never expire, a dead one's do)."""

    def __init__(self, directory: str | os.PathLike[str], expiry_s: float) -> None:
        self.directory, self.expiry_s = Path(directory), expiry_s
        self._last: tuple[list[Feature], float] | None = None

    def update(self, node: Any, *, now: float | None = None) -> bool:
        """Write the file if it is due; True when written."""
        import time

        now = time.time() if now is None else now
        profile = node.cached_machine() or node.machine()
        hot = [row.name or row.digest[:19] for row in node.list_residency()
               if str(getattr(row.state, "value", row.state)) == "hot"]
        found = features(profile, hot_models=hot)
        if self._last is not None and self._last[0] == found and now - self._last[1] < self.expiry_s / 2:
            return False
        expires = datetime.fromtimestamp(now + self.expiry_s, timezone.utc)
        write(self.directory, render(found, expires=expires, source="agent-machine serve"))
        self._last = (found, now)
        return True

"""`probe` and `doctor`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from nodeagent.cli.output import CliError, add_format_option, human_bytes, render_table

if TYPE_CHECKING:
    from nodeagent.contracts.machine import MachineProfile

PROBE_EPILOG = """\
examples:
  agent-machine probe                          this machine, at a glance
  agent-machine probe --format json            the MachineProfile (JSON Schema: docs/contracts/)
  agent-machine probe --root tests/fixtures/machines/h100x8
                                               a captured machine (root/ + capture.json replay)
  agent-machine probe --root /mnt/other        files below /mnt/other; no commands are run
  agent-machine probe --nfd                    a Node Feature Discovery feature file (features.d)
  agent-machine probe --nfd --out /etc/kubernetes/node-feature-discovery/features.d
                                               written there (dot-file, then renamed)

Sections report status ok, absent (not on this machine) or error (there, but
probing failed), each with a reason. Recommended backends come in order, with
what is missing for those that are not ready.
"""

DOCTOR_EPILOG = """\
examples:
  agent-machine doctor                 one line per check, with a fix hint
  agent-machine doctor --format json   the checks for scripts

Exit status: 0 when nothing fails (warnings allowed), 1 when any check fails.
"""


def register(subparsers: Any) -> None:
    probe = subparsers.add_parser(
        "probe",
        help="probe CPU, memory, GPUs, Vulkan, Asahi, runtime and storage",
        description="Probe this machine and print its MachineProfile: host, CPU, memory and cgroup "
        "limits, NVIDIA (NVML), AMD (sysfs/KFD), Vulkan (vulkaninfo, with what llama.cpp's Vulkan "
        "backend would use), Apple Silicon under Asahi, Podman/Quadlet/CDI/systemd, storage for the "
        "state/cache directories, the compute devices with their memory budgets, and the "
        "recommended backends in order.",
        epilog=PROBE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_format_option(probe)
    probe.add_argument("--root", type=Path, default=Path("/"), metavar="DIR",
                       help="read /proc, /sys, /etc below DIR instead of /; a directory with capture.json "
                       "and root/ is replayed as a captured machine")
    probe.add_argument("--nfd", action="store_true",
                       help="print a Node Feature Discovery feature file (agent-machine.io/ labels, with "
                       "an expiry; hot models when an agent answers) instead of the profile")
    probe.add_argument("--expiry", type=float, default=3600.0, metavar="SECONDS",
                       help="with --nfd: the file's # +expiry-time, this many seconds from now (default 3600)")
    probe.add_argument("--out", type=Path, default=None, metavar="DIR",
                       help="with --nfd: write the file into DIR (a features.d directory) instead of printing it")
    probe.set_defaults(func=_probe)

    doctor = subparsers.add_parser(
        "doctor",
        help="check this machine and print fix hints (exit 1 on failure)",
        description="Probe this machine and check what agent-machine needs: a writable state "
        "directory, Podman and Quadlet, a CDI spec for NVIDIA GPUs, a Vulkan driver for GPUs, "
        "lingering for rootless services, llama-cpp-python, free disk for models.",
        epilog=DOCTOR_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_format_option(doctor)
    doctor.set_defaults(func=_doctor)


# ------------------------------------------------------------------ probe
def _probe(args: argparse.Namespace) -> int:
    from nodeagent.probe import probe
    from nodeagent.probe.replay import CaptureError

    if (args.out is not None) and not args.nfd:
        raise CliError("--out needs --nfd (it is where the feature file goes)", exit_code=2)
    if args.expiry <= 0:
        raise CliError(f"--expiry must be positive seconds, got {args.expiry:g}", exit_code=2)
    try:
        profile = probe(args.root)
    except CaptureError as exc:
        raise CliError(f"--root {exc}", exit_code=2) from exc
    if args.nfd:
        return _nfd(args, profile)
    if args.format == "json":
        sys.stdout.write(json.dumps(profile.to_wire(), indent=2))
        sys.stdout.write("\n")
    else:
        print(render_profile(profile))
    return 0


def _nfd(args: argparse.Namespace, profile: "MachineProfile") -> int:
    from nodeagent.probe import nfd

    hot: list[str] = []
    if args.root == Path("/"):  # this machine: a running agent tells which models are hot
        from nodeagent.client import AgentClient, AgentNotRunning, ApiError

        try:
            with AgentClient.from_env() as client:
                rows = client.get("/v1/store/models").get("residency") or []
            hot = [r.get("name") or r.get("digest", "")[:19] for r in rows if r.get("state") == "hot"]
        except (AgentNotRunning, ApiError, OSError, ValueError, AttributeError):
            hot = []  # no agent (or an old one): the file says nothing of hot models
    text = nfd.feature_file(profile, hot_models=hot, expiry_s=args.expiry)
    if args.out is not None:
        try:
            print(nfd.write(args.out, text))
        except OSError as exc:
            raise CliError(f"--out {args.out}: {exc.strerror or exc}") from exc
        return 0
    if args.format == "json":
        sys.stdout.write(json.dumps({"file": text, "lines": text.splitlines()}, indent=2) + "\n")
    else:
        sys.stdout.write(text)
    return 0


def _yn(value: bool | None) -> str:
    return {True: "yes", False: "no", None: "?"}[value]


def _section_rows(p: "MachineProfile") -> list[tuple[str, str, str]]:
    h, c, mem, rt = p.host, p.cpu, p.memory, p.runtime
    rows = []
    host_bits = [h.hostname or "?", h.os_pretty_name or h.os_id or "?", h.kernel_release or "?",
                 h.architecture or "?", f"page {human_bytes(h.page_size)}" if h.page_size else ""]
    where = ", ".join(x for x in (f"container {h.container}" if h.container else "",
                                  ("VM" if h.virtualization == "vm" else f"VM {h.virtualization}")
                                  if h.virtualization else "") if x)
    rows.append(("host", h.status.value, " · ".join(b for b in host_bits if b) + (f" ({where})" if where else "")))
    topo = f"{c.sockets or '?'} socket(s), {c.cores or '?'} cores, {c.threads or '?'} threads, " \
           f"{c.numa_nodes or '?'} NUMA node(s)"
    rows.append(("cpu", c.status.value, c.reason or f"{c.vendor or '?'} {c.model_name or ''}: {topo}; "
                                                    f"{' '.join(c.features) or 'no SIMD features listed'}"))
    cg = mem.cgroup
    limit = f"cgroup v{cg.version}: " + ", ".join([
        f"memory {human_bytes(cg.memory_limit_bytes)}" if cg.memory_limit_bytes else "no memory limit",
        f"cpu {cg.cpu_quota_cores:g} cores" if cg.cpu_quota_cores else "no cpu quota"]) if cg.version else "no cgroup"
    rows.append(("memory", mem.status.value, mem.reason or f"{human_bytes(mem.total_bytes)} total, "
                 f"{human_bytes(mem.available_bytes)} available, swap {human_bytes(mem.swap_total_bytes)}; {limit}"))
    nv = p.nvidia
    rows.append(("nvidia", nv.status.value, f"driver {nv.driver_version}, CUDA {nv.cuda_driver_version}, "
                 f"{len(nv.gpus)} GPU(s)" + (f"; {nv.reason}" if nv.reason else "") if nv.gpus else nv.reason or ""))
    rows.append(("amd", p.amd.status.value, f"{len(p.amd.gpus)} GPU(s)" + (f"; {p.amd.reason}" if p.amd.reason else "")
                 if p.amd.gpus else p.amd.reason or ""))
    vk = p.vulkan
    rows.append(("vulkan", vk.status.value, f"{len(vk.devices)} device(s), loader {vk.instance_version or '?'}"
                 + (f"; {vk.reason}" if vk.reason else "") if vk.devices else vk.reason or ""))
    a = p.asahi
    rows.append(("asahi", a.status.value, f"Apple {a.chip or '?'} ({a.soc or 'soc ?'}), {a.model or ''}, unified "
                 f"memory {human_bytes(a.unified_memory_bytes)}" if a.status.value == "ok" else a.reason or ""))
    pod = rt.podman
    podman = (f"podman {pod.version} ({'quadlet' if pod.quadlet else 'no quadlet'}, "
              f"{'rootless' if pod.rootless else 'rootful'})" if pod.version else f"podman: {pod.reason}")
    llama = rt.llama_cpp_python
    engines = [f"llama-cpp-python {llama.version or ''} [{', '.join(llama.backends)}]"
               if llama.status.value == "ok" else "no llama-cpp-python",
               f"vllm {rt.vllm.version or ''}".strip() if rt.vllm.status.value == "ok" else "no vllm"]
    rows.append(("runtime", rt.status.value, f"{podman}; cgroup v{rt.cgroup_version}; systemd --user "
                 f"{rt.systemd_user_state or ('reachable' if rt.systemd_user else 'unreachable')}; linger "
                 f"{_yn(rt.lingering)}; CDI {len(rt.cdi.devices)} device(s); " + ", ".join(engines)))
    st = p.storage
    places = [f"{loc.role} {loc.fs_type or '?'} {human_bytes(loc.free_bytes)} free"
              + (" (rotational)" if loc.rotational else "") for loc in st.locations]
    rows.append(("storage", st.status.value, "; ".join(places) + (f"; {st.reason}" if st.reason else "")))
    return rows


def render_profile(p: "MachineProfile") -> str:
    out = [f"agent-machine probe: {p.host.hostname or '?'}   platform: {p.platform}   root: {p.root}", ""]
    out.append(render_table(("section", "status", "summary"), _section_rows(p)))

    gpu_rows = []
    for g in p.nvidia.gpus:
        mig = f"MIG {g.mig_mode}" + (f" ({len(g.mig_devices)} instances)" if g.mig_devices else "") \
            if g.mig_mode else "MIG ?"
        gpu_rows.append((f"nvidia {g.index}", g.name, g.pci_bus_id, human_bytes(g.memory_total_bytes),
                         human_bytes(g.memory_free_bytes), f"cc {g.compute_capability}", mig,
                         "; ".join(g.errors)))
    for card in p.amd.gpus:
        used = human_bytes(card.vram_total_bytes - card.vram_used_bytes) \
            if card.vram_total_bytes is not None and card.vram_used_bytes is not None else "-"
        gpu_rows.append((f"amd {card.card}", card.name, card.pci_bus_id, human_bytes(card.vram_total_bytes), used,
                         card.gfx_target or "gfx ?", f"kfd node {card.kfd_node}" if card.kfd_node is not None
                         else "no KFD", ""))
    if gpu_rows:
        out += ["", "GPUs", render_table(("gpu", "name", "pci", "memory", "free", "target", "mode", "errors"),
                                         gpu_rows)]
    if p.vulkan.devices:
        rows = [(d.index, d.name, d.device_type, d.driver_name, d.api_version, _yn(d.fp16), _yn(d.int_dot),
                 _yn(d.coopmat), "yes" if d.ggml_usable else f"no: {d.ggml_reason}" if d.ggml_usable is False
                 else f"?: {d.ggml_reason}") for d in p.vulkan.devices]
        out += ["", "Vulkan devices", render_table(("#", "name", "type", "driver", "api", "fp16", "int dot",
                                                    "coopmat", "llama.cpp uses it"), rows)]
    if p.asahi.status.value == "ok":
        out += ["", "Asahi", f"  evidence: {'; '.join(p.asahi.evidence)}",
                f"  gpu driver: {p.asahi.gpu_driver or '?'}   vulkan: {p.asahi.vulkan_driver or 'none'}   "
                f"16k pages: {_yn(p.asahi.page_size_16k)}"]
    rows = [(d.id, d.kind, d.name, d.memory_kind, human_bytes(d.memory_total_bytes), human_bytes(d.memory_free_bytes))
            for d in p.devices]
    out += ["", "Compute devices (memory budgets)", render_table(("id", "kind", "name", "memory", "total", "free"),
                                                                rows)]
    rows = []
    for i, r in enumerate(p.recommended_backends, 1):
        devices = r.device if len(r.devices) <= 1 else f"{r.device} (+{len(r.devices) - 1})"
        rows.append((i, r.backend, devices, "yes" if r.ready else "no", r.reason
                     + ("" if r.ready else f" | missing: {r.missing}")))
    out += ["", "Recommended backends", render_table(("#", "backend", "device", "ready", "why"), rows)]
    return "\n".join(out)


# ------------------------------------------------------------------ doctor
def _doctor(args: argparse.Namespace) -> int:
    from nodeagent.doctor import run_checks
    from nodeagent.paths import resolve_paths
    from nodeagent.probe import probe

    try:
        paths = resolve_paths()
    except ValueError as exc:
        raise CliError(str(exc), exit_code=2) from exc
    profile = probe(state_dir=paths.state_dir, cache_dir=paths.cache_dir)
    checks = run_checks(profile, paths)
    if args.format == "json":
        sys.stdout.write(json.dumps([c.as_dict() for c in checks], indent=2) + "\n")
    else:
        print(render_checks(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


def render_checks(checks: Sequence[Any]) -> str:
    lines = []
    width = max(len(c.name) for c in checks) if checks else 0
    for c in checks:
        lines.append(f"{c.status.upper():4}  {c.name.ljust(width)}  {c.message}")
        if c.fix and c.status != "pass":
            lines.append(f"{'':4}  {'':{width}}  fix: {c.fix}")
    fails = sum(c.status == "fail" for c in checks)
    warns = sum(c.status == "warn" for c in checks)
    lines.append("")
    lines.append(f"{len(checks)} checks: {len(checks) - fails - warns} pass, {warns} warn, {fails} fail")
    return "\n".join(lines)

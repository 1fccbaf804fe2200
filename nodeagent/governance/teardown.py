"""Teardown: stop every provider this node started and remove its units and containers, with a receipt.

Two kinds of providers are the node's own:

* what its executor's pool runs (`ProviderPool.all()`: embedded workers,
  llama-server replicas and their slots) — each engine is stopped once (slots
  of one replica share it);
* what `agent-machine providers up` launched (`nodeagent.launch.registry`):
  subprocesses, Podman containers, Quadlet units — `Launcher.down` stops each
  and removes its container or unit file, then its record.

Attached servers (mode ``attach``) are not the node's: they are left running
and listed as such. The teardown receipt (node event ``teardown``) lists every
provider with what was done and any error; one failure does not stop the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TeardownReport:
    stopped: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    left: list[dict[str, Any]] = field(default_factory=list)  # not ours (attached)
    receipt_id: str | None = None

    def body(self) -> dict[str, Any]:
        return {"apiVersion": "agent-machine/v1", "kind": "TeardownReceipt", "stopped": self.stopped,
                "failed": self.failed, "left": self.left}

    def to_wire(self) -> dict[str, Any]:
        return {**self.body(), "receiptId": self.receipt_id}


def _stop_pool(pool: Any, report: TeardownReport) -> None:
    seen: set[int] = set()
    for managed in pool.all():
        provider = managed.provider
        engine = getattr(getattr(provider, "replica", None), "server", provider)  # slots share their replica's engine
        entry = {"provider": managed.name, "kind": managed.kind, "mode": managed.launch_mode, "source": "pool"}
        if managed.launch_mode == "attach":
            report.left.append({**entry, "why": "attached: the server is not the node's to stop"})
            continue
        if id(engine) in seen:
            continue
        seen.add(id(engine))
        try:
            provider.stop()
            managed.forget_context()
            report.stopped.append({**entry, "action": "stopped"})
        except Exception as exc:
            report.failed.append({**entry, "error": f"{type(exc).__name__}: {exc}"})


def _down_launched(registry: Any, report: TeardownReport) -> None:
    from nodeagent.launch.manage import LaunchContext
    from nodeagent.launch.quadlet import QuadletOptions

    records = registry.all()
    version = None
    if any(r.spec.mode == "quadlet" for r in records):
        from nodeagent.launch.podman import PodmanError, podman_version
        from nodeagent.launch.podman_versions import QUADLET_MIN
        try:
            version = podman_version()
        except PodmanError:
            version = QUADLET_MIN
    context = LaunchContext(registry, podman_version=version, quadlet=QuadletOptions(scope="user"))
    for record in records:
        spec = record.spec
        entry = {"provider": spec.name, "kind": getattr(spec, "kind", None), "mode": spec.mode, "source": "launched",
                 "container": record.container_id, "unit": record.unit_path, "pid": record.pid}
        try:
            stopped = context.launcher(spec.mode).down(spec.name, missing_ok=True)
            report.stopped.append({**entry, "action": "stopped and removed" if stopped else "record removed"})
        except Exception as exc:
            report.failed.append({**entry, "error": f"{type(exc).__name__}: {exc}"})


def teardown(*, pool: Any | None, registry: Any | None, receipts: Any | None) -> TeardownReport:
    report = TeardownReport()
    if pool is not None:
        _stop_pool(pool, report)
    if registry is not None:
        _down_launched(registry, report)
    if receipts is not None:
        for stopped in report.stopped:
            receipts.append_event("provider-stop", str(stopped["provider"]), stopped)
        report.receipt_id = receipts.append_event("teardown", "node", report.body()).receipt_id
    return report


__all__ = ["TeardownReport", "teardown"]

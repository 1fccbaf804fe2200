"""ActivationDecision: may this pod run, may this provider start — decided, signed, logged.

Before the node runs a pod (`PodExecutor.pod_gate`) and before it starts an
engine (`ProviderPool.start_gate` / `check_start`), `Activation` evaluates the
preconditions below and appends the decision to the receipt log as a node
event (``activation``). Any precondition not met denies, and so does an error
while evaluating one: fail closed. A denied pod ends Refused
(``ActivationDenied``) with its receipt; a denied start raises `StartRefused`
carrying the decision's reasons, so the engine never starts.

Preconditions (each named in the decision, with what it found):

  policy        the admission policy's verdict for the pod (pods only)
  grant         a valid grant covers the pod — required when ``[governance]
                require_grants``, and checked whenever the pod names one
                (label `GRANT_LABEL`) or one is installed for its tenant/agent
  storage       the storage receipt in force (cited by digest); the receipts
                and state database locations exist and have free space
  model-present the model's blob is in the store
  model-digest  the blob's sha256 still equals the digest it was stored under
                (hashed again whenever its size, mtime or inode changed)
  memory-fit    weights + KV + compute buffers fit the largest memory budget
  image-pinned  a container provider's image is pinned by digest (``@sha256:``)
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

from nodeagent.contracts.receipt import rfc3339_utc
from nodeagent.governance.grants import (
    GRANT_LABEL,
    Grant,
    GrantError,
    GrantStore,
    RevocationList,
    trusted_issuers,
    verify_grant,
)
from nodeagent.governance.storage import StorageReceipt

PINNED_IMAGE = re.compile(r"@sha256:[0-9a-f]{64}$")
CONTAINER_MODES = ("podman", "quadlet", "kube")
MIN_FREE_BYTES = 1 << 20  # below this the log and the database cannot take another write safely


@dataclass(frozen=True, slots=True)
class Precondition:
    name: str
    ok: bool
    detail: str

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class ActivationDecision:
    subject_kind: str  # pod | provider
    subject: str  # the pod's id (or name for a dry run), or the provider's name
    allowed: bool
    preconditions: tuple[Precondition, ...]
    decided_at: datetime
    tenant: str | None = None
    agent: str | None = None
    model: str | None = None
    model_digest: str | None = None
    grant: dict[str, Any] | None = None  # the grant's summary, when one was used
    storage_receipt: str | None = None  # digest of the StorageReceipt in force
    receipt_id: str | None = None  # the log entry, once recorded

    @property
    def reasons(self) -> list[str]:
        return [p.detail for p in self.preconditions if not p.ok]

    @property
    def lacking(self) -> list[str]:
        return [p.name for p in self.preconditions if not p.ok]

    def body(self) -> dict[str, Any]:
        return {
            "apiVersion": "agent-machine/v1", "kind": "ActivationDecision",
            "subject": {"kind": self.subject_kind, "name": self.subject},
            "verdict": "allowed" if self.allowed else "denied",
            "tenant": self.tenant, "agent": self.agent, "model": self.model, "modelDigest": self.model_digest,
            "preconditions": [p.to_wire() for p in self.preconditions],
            "lacking": self.lacking, "reasons": self.reasons[:16],
            "grant": self.grant, "storageReceipt": self.storage_receipt,
            "decidedAt": rfc3339_utc(self.decided_at),
        }

    def to_wire(self) -> dict[str, Any]:
        return {**self.body(), "receiptId": self.receipt_id}


@dataclass
class DigestCache:
    """Model blobs whose sha256 was checked, keyed by (path, size, mtime, inode): a changed file is hashed again."""

    _seen: dict[tuple[str, int, int, int], str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def digest(self, path: Path) -> str:
        info = path.stat()
        key = (str(path), info.st_size, info.st_mtime_ns, info.st_ino)
        with self._lock:
            found = self._seen.get(key)
        if found is not None:
            return found
        h = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                h.update(chunk)
        value = "sha256:" + h.hexdigest()
        with self._lock:
            self._seen[key] = value
        return value


class Activation:
    """The node's activation gate. ``receipts`` (a `ReceiptLog`, or None for dry runs) records decisions."""

    def __init__(self, *, state_dir: Path, governance: Any, policy: Any, models: Any, receipts: Any | None,
                 storage: Callable[[], StorageReceipt], budget_bytes: Callable[[], int | None] | None = None,
                 context: int = 4096, declared: Sequence[Any] = ()) -> None:
        self.state_dir = Path(state_dir)
        self.governance = governance  # config.GovernanceConfig
        self.policy = policy  # admission.Policy
        self.models = models  # models.store.ModelStore
        self.receipts = receipts
        self._storage = storage
        self._budget_bytes = budget_bytes
        self.context = context
        self.declared = list(declared)  # config.ProviderDeclaration
        self.grants = GrantStore(self.state_dir)
        self.revocations = RevocationList(governance.revocation_file)
        self.digests = DigestCache()
        self._storage_logged: str | None = None
        self._storage_lock = threading.Lock()
        self._node: Any = None  # set by `activation_for`: config and policy follow the node's reloads

    def follow(self, node: Any) -> None:
        """Take config, policy and declarations from ``node`` now (after a SIGHUP reload they change)."""
        cfg = node.config
        if cfg.governance.revocation_file != self.governance.revocation_file:
            self.revocations = RevocationList(cfg.governance.revocation_file)
        self.governance, self.policy = cfg.governance, node.policy
        self.context, self.declared = cfg.models.context, list(cfg.providers)

    # ------------------------------------------------------------ evidence
    def storage_receipt(self, *, record: bool = True) -> tuple[StorageReceipt, str | None]:
        """The storage receipt in force; signed into the log when it differs from the last one logged here."""
        receipt = self._storage()
        if not record or self.receipts is None:
            return receipt, None
        with self._storage_lock:
            if receipt.digest != self._storage_logged:
                self.receipts.append_event("storage", receipt.digest, {**receipt.body(), "digest": receipt.digest})
                self._storage_logged = receipt.digest
        return receipt, receipt.digest

    def issuer_keys(self) -> dict:
        return trusted_issuers(self.state_dir, self.governance.issuer_keys, self.governance.admin_key_file)

    def verify(self, line: bytes, now: datetime | None = None) -> Grant:
        return verify_grant(line, self.issuer_keys(), revocations=self.revocations, now=now)

    # ------------------------------------------------------------ preconditions
    def _model_preconditions(self, record: Any, n_ctx: int) -> list[Precondition]:
        out = []
        path = Path(record.path)
        if not path.is_file():
            return [Precondition("model-present", False, f"model blob {path} is missing from the store")]
        out.append(Precondition("model-present", True, f"{path} ({record.size_bytes} bytes)"))
        try:
            actual = self.digests.digest(path)
        except OSError as exc:
            actual = f"unreadable ({exc})"
        out.append(Precondition("model-digest", actual == record.digest,
                                f"sha256 of the blob is {record.digest}" if actual == record.digest else
                                f"the blob's sha256 is {actual}, not {record.digest}: the model changed on disk"))
        out.append(self._memory_fit(record, n_ctx))
        return out

    def _memory_fit(self, record: Any, n_ctx: int) -> Precondition:
        budget = self._budget_bytes() if self._budget_bytes is not None else None
        try:
            from nodeagent.models.fit import estimate
            need = estimate(self.models.meta(record), n_ctx).total_bytes
        except Exception as exc:  # an unreadable GGUF cannot be shown to fit
            return Precondition("memory-fit", False, f"memory fit could not be estimated: {exc}")
        if budget is None:
            return Precondition("memory-fit", True, f"needs {need} bytes at {n_ctx} tokens; no budget known")
        return Precondition("memory-fit", need <= budget,
                            f"needs {need} bytes at {n_ctx} tokens, budget {budget} bytes")

    def _image_precondition(self, mode: str, image: str | None, name: str) -> Precondition | None:
        if mode not in CONTAINER_MODES:
            return None
        if not self.governance.require_pinned_images:
            return Precondition("image-pinned", True, f"{name}: image pinning not required ([governance])")
        if image and PINNED_IMAGE.search(image):
            return Precondition("image-pinned", True, f"{name}: {image}")
        if image and image.startswith("localhost/"):
            # Built on this host, never pulled: no registry can move the tag under the node. It counts
            # as pinned once it resolves to an image id, which the decision records.
            image_id = _local_image_id(image)
            if image_id:
                return Precondition("image-pinned", True, f"{name}: {image} is a local image, id sha256:{image_id}")
        return Precondition("image-pinned", False, f"{name}: image {image or '(catalog default)'} is not pinned "
                                                   "by digest (@sha256:…); a tag can change under the node")

    def _storage_precondition(self, receipt: StorageReceipt, digest: str | None) -> Precondition:
        for role in ("receipts", "state-db"):
            loc = receipt.location(role)
            if loc is None:
                continue
            free = loc.get("freeBytes")
            if free is not None and free < MIN_FREE_BYTES:
                return Precondition("storage", False, f"{role} at {loc['path']}: only {free} bytes free")
        return Precondition("storage", True, f"storage receipt {digest or receipt.digest}")

    def _grant_for(self, pod: Any, record: Any | None) -> tuple[Precondition | None, dict | None]:
        meta = pod.metadata
        named = meta.labels.get(GRANT_LABEL)
        candidates: list[tuple[str, bytes]] = []
        if named:
            line = self.grants.line(named)
            if line is None:
                return Precondition("grant", False, f"metadata.labels[{GRANT_LABEL}]: grant {named} is not "
                                                    "installed on this node"), None
            candidates = [(named, line)]
        else:
            candidates = self.grants.lines()
        refusals: list[str] = []
        names = list(record.names) if record is not None else []
        digest = record.digest if record is not None else None
        for grant_id, line in candidates:
            try:
                grant = self.verify(line)
            except GrantError as exc:
                if named:
                    return Precondition("grant", False, f"grant {grant_id}: {exc}"), None
                # an installed grant for someone else that is broken does not concern this pod,
                # but one for this identity does: peek at its subject without trusting it
                if _subject_of(line) == (meta.tenant, meta.agent):
                    refusals.append(f"grant {grant_id}: {exc}")
                continue
            if grant.identity_refusals(meta.tenant, meta.agent, meta.session):
                if named:
                    return Precondition("grant", False, "; ".join(grant.identity_refusals(
                        meta.tenant, meta.agent, meta.session))), grant.summary()
                continue
            reasons = grant.refusals(pod, model_names=names, model_digest=digest)
            if not reasons:
                return Precondition("grant", True, f"grant {grant.id} from {grant.issuer} (key "
                                                   f"{grant.key_id[:16]}…) covers the pod"), grant.summary()
            refusals.extend(reasons)
        if refusals:  # grants for this agent exist, and none covers the pod (or each is refused)
            return Precondition("grant", False, "; ".join(refusals)), None
        if self.governance.require_grants:
            return Precondition("grant", False, f"no grant for tenant {meta.tenant!r} agent {meta.agent!r} is "
                                                "installed and [governance] require_grants is on"), None
        return None, None  # grants not required and none concerns this pod: no grant precondition

    # ------------------------------------------------------------ decisions
    def evaluate_pod(self, pod: Any, record: Any | None, *, grant_line: bytes | None = None,
                     record_storage: bool = True) -> ActivationDecision:
        now = datetime.now(timezone.utc)
        pre: list[Precondition] = []
        try:
            from nodeagent.admission import AdmissionRequest
            verdict = self.policy.decide(AdmissionRequest(pod=pod, model_name=(record.names[0] if record and record.names else None),
                                                          model_digest=record.digest if record else None))
            pre.append(Precondition("policy", verdict.allowed, "; ".join(verdict.reasons) or
                                    f"allowed by {verdict.policy_source}"))
        except Exception as exc:
            pre.append(Precondition("policy", False, f"admission could not be evaluated: {exc}"))
        grant_summary = None
        if grant_line is not None:
            try:
                grant = self.verify(grant_line)
                reasons = grant.refusals(pod, model_names=list(record.names) if record else [],
                                         model_digest=record.digest if record else None)
                pre.append(Precondition("grant", not reasons, "; ".join(reasons) or f"grant {grant.id} covers the pod"))
                grant_summary = grant.summary()
            except GrantError as exc:
                pre.append(Precondition("grant", False, str(exc)))
        else:
            try:
                found, grant_summary = self._grant_for(pod, record)
            except Exception as exc:
                found = Precondition("grant", False, f"grants could not be evaluated: {exc}")
            if found is not None:
                pre.append(found)
        storage, digest = self._checked_storage(pre, record_storage)
        if record is None:
            pre.append(Precondition("model-present", False,
                                    f"model {pod.spec.model.name or pod.spec.model.digest} is not in the store"))
        else:
            pre.extend(self._model_preconditions(record, max(self.context, pod.spec.model.min_context)))
            for declaration in self.declared_for(record):
                found = self._image_precondition(declaration.mode, declaration.image,
                                                 declaration.name or declaration.model)
                if found is not None:
                    pre.append(found)
        return ActivationDecision(
            subject_kind="pod", subject=getattr(pod, "id", None) or pod.metadata.name,
            allowed=all(p.ok for p in pre), preconditions=tuple(pre), decided_at=now,
            tenant=pod.metadata.tenant, agent=pod.metadata.agent,
            model=pod.spec.model.name or pod.spec.model.digest, model_digest=record.digest if record else None,
            grant=grant_summary, storage_receipt=digest or (storage.digest if storage else None))

    def evaluate_start(self, start: Any, *, record_storage: bool = True) -> ActivationDecision:
        """For a `ProviderStart` (model_digest, model, kind, mode, provider, image)."""
        now = datetime.now(timezone.utc)
        pre: list[Precondition] = []
        storage, digest = self._checked_storage(pre, record_storage)
        try:
            record = self.models.get(start.model_digest)
        except Exception as exc:
            record = None
            pre.append(Precondition("model-present", False, f"model {start.model} ({start.model_digest}): {exc}"))
        if record is not None:
            pre.extend(self._model_preconditions(record, self.context))
        name = start.provider or f"{start.model}-{start.kind}"
        image = self._image_precondition(start.mode, start.image, name)
        if image is not None:
            pre.append(image)
        return ActivationDecision(
            subject_kind="provider", subject=name, allowed=all(p.ok for p in pre), preconditions=tuple(pre),
            decided_at=now, model=start.model, model_digest=start.model_digest,
            storage_receipt=digest or (storage.digest if storage else None))

    def _checked_storage(self, pre: list[Precondition], record: bool) -> tuple[StorageReceipt | None, str | None]:
        try:
            storage, digest = self.storage_receipt(record=record)
        except Exception as exc:
            pre.append(Precondition("storage", False, f"storage evidence could not be taken: {exc}"))
            return None, None
        pre.append(self._storage_precondition(storage, digest))
        return storage, digest

    def declared_for(self, record: Any) -> list[Any]:
        names = set(record.names) | {n.split(":")[0] for n in record.names} | {record.digest}
        return [d for d in self.declared
                if d.model in names or (d.model.startswith("sha256:") and record.digest.startswith(d.model))]

    def _refresh(self) -> None:
        if self._node is not None and (self._node.config.governance is not self.governance
                                       or self._node.policy is not self.policy):
            self.follow(self._node)

    def record(self, decision: ActivationDecision) -> ActivationDecision:
        if self.receipts is None:
            return decision
        appended = self.receipts.append_event("activation", f"{decision.subject_kind}:{decision.subject}",
                                              decision.body(), tenant=decision.tenant)
        from dataclasses import replace
        return replace(decision, receipt_id=appended.receipt_id)

    # ------------------------------------------------------------ the executor's seams
    def pod_gate(self, pod: Any, record: Any) -> list[str]:
        """`PodExecutor.pod_gate`: the reasons a pod may not run ([] = allowed); the decision is logged first."""
        self._refresh()
        decision = self.record(self.evaluate_pod(pod, record))
        return [] if decision.allowed else [f"activation denied ({', '.join(decision.lacking)}): {r}"
                                            for r in decision.reasons]

    def start_gate(self, start: Any) -> None:
        """`ProviderPool.start_gate`: raises `StartRefused` with the decision's reasons when denied."""
        from nodeagent.providers.base import StartRefused
        self._refresh()
        decision = self.record(self.evaluate_start(start))
        if not decision.allowed:
            raise StartRefused(f"activation denied for provider {decision.subject} "
                               f"({', '.join(decision.lacking)}): {'; '.join(decision.reasons)}", decision.reasons)
        if self.receipts is not None:
            self.receipts.append_event("provider-start", decision.subject, {
                "provider": decision.subject, "kind": start.kind, "mode": start.mode, "image": start.image,
                "model": start.model, "modelDigest": start.model_digest, "activation": decision.receipt_id})


def _local_image_id(image: str) -> str | None:
    """The id of a local Podman image (64 hex), or None when Podman cannot tell."""
    import shutil
    import subprocess
    podman = shutil.which("podman")
    if podman is None:
        return None
    try:
        done = subprocess.run([podman, "image", "inspect", "--format", "{{.Id}}", image],
                              capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = done.stdout.strip().removeprefix("sha256:")
    return found if done.returncode == 0 and re.fullmatch(r"[0-9a-f]{64}", found) else None


def _subject_of(line: bytes) -> tuple[str, str] | None:
    """(tenant, agent) an unverified grant claims — used only to decide whether its failure concerns a pod."""
    import json
    from nodeagent.receipts.dsse import EnvelopeError, parse_json_envelope
    try:
        subject = json.loads(parse_json_envelope(line).payload)["subject"]
        return subject["tenant"], subject["agent"]
    except (EnvelopeError, ValueError, KeyError, TypeError):
        return None


def install_gates(executor: Any, activation: Activation) -> None:
    """Wire ``activation`` into the executor's seams (called at the end of `default_executor`)."""
    executor.pod_gate = activation.pod_gate
    executor.pool.start_gate = activation.start_gate
    executor.activation = activation
    try:  # the storage receipt at start (then on change, at each decision)
        activation.storage_receipt()
    except Exception:  # evidence that cannot be taken now is retried, and denies, at the first decision
        import logging
        logging.getLogger(__name__).exception("storage receipt at start failed")


__all__ = ["Activation", "ActivationDecision", "Precondition", "install_gates"]


def activation_for(node: Any, executor: Any | None = None, *, receipts: Any | None = None,
                   models: Any | None = None) -> Activation:
    """An `Activation` for ``node``: its config, policy, model store, storage roles and memory budget.

    With an ``executor`` the decisions go to its receipt log and its tiers are the
    storage roles; without one (CLI dry runs) nothing is logged unless ``receipts``.
    """
    from nodeagent.governance.storage import roles_for, take_storage_receipt
    from nodeagent.kvcache.tiers import default_t1_dir

    cfg = node.config
    state = Path(node.paths.state_dir)
    if executor is not None:
        stores = executor.cache.stores
        t1_dir, t2_dir = stores["T1"].directory, stores["T2"].directory
        receipts = executor.receipts if receipts is None else receipts
        models = executor.models
    else:
        t1_dir = Path(cfg.cache.ram_dir) if cfg.cache.ram_dir else default_t1_dir()
        t2_dir = state / "kvcache"
        if models is None:
            from nodeagent.models.store import ModelStore
            models = ModelStore(state)
    roles = roles_for(state, t1_dir, t1_budget=cfg.cache.ram_budget_bytes, t2_budget=cfg.cache.disk_budget_bytes,
                      t2_dir=t2_dir)

    def budget() -> int | None:
        from nodeagent.models.residency import budgets_from_devices
        pools = budgets_from_devices(node.machine().devices)
        return max((p.budget_bytes for p in pools), default=None)

    activation = Activation(state_dir=state, governance=cfg.governance, policy=node.policy, models=models,
                            receipts=receipts, storage=lambda: take_storage_receipt(roles), budget_bytes=budget,
                            context=cfg.models.context, declared=cfg.providers)
    activation._node = node  # a SIGHUP reload's config and policy apply to the next decision
    return activation

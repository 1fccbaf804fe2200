"""The evidence bundle: what an offline verifier needs, signed by the machine key.

Layout of ``agent-machine evidence bundle DIR``::

    machine-profile.json     the MachineProfile (probe) this node runs on
    config.json              the config file's sha256 (and the effective config's), never its secrets
    providers.json           versions of every provider binary and image (declared, running, found)
    receipts/                the receipt log export: receipts.jsonl, checkpoints/, keys/, manifest.json
    storage-receipts.jsonl   the log's storage receipts, the exact envelope lines
    activation-decisions.jsonl   the log's activation decisions, the exact envelope lines
    bundle.dsse              DSSE envelope (in-toto Statement, predicateType `BUNDLE_PREDICATE_TYPE`)
                             whose subjects are every other file with its sha256, signed by the machine key

`verify_evidence(DIR, keys)` checks, with the machine's public key only:
the bundle envelope's signature; that the files present are exactly its
subjects and each hashes to its digest (so any byte changed, added or removed
fails); the receipt log (every entry's signature, the hash chain, the signed
checkpoints: `verify_bundle`); and that every extracted storage receipt and
activation decision is a line of that log. The DSSE parts (bundle.dsse and
each line of the .jsonl files) verify with securesystemslib as well.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from nodeagent.contracts.receipt import INTOTO_PAYLOAD_TYPE, STATEMENT_TYPE, rfc3339_utc
from nodeagent.fsutil import PUBLIC_FILE_MODE, atomic_write_bytes
from nodeagent.receipts.canonical import canonical_json
from nodeagent.receipts.dsse import EnvelopeError, parse_json_envelope, sign_envelope
from nodeagent.receipts.events import EVENT_PREDICATE_TYPE
from nodeagent.receipts.keys import PublicKey, Signer

BUNDLE_PREDICATE_TYPE = "https://agent-machine.dev/attestations/evidence-bundle/v1"
BUNDLE_FILE = "bundle.dsse"
RECEIPTS = "receipts"


class EvidenceError(ValueError):
    pass


@dataclass
class EvidenceReport:
    ok: bool = True
    files: int = 0
    entries: int = 0
    storage_receipts: int = 0
    activation_decisions: int = 0
    key_id: str | None = None
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.ok = False
        self.failures.append(message)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "files": self.files, "entries": self.entries, "storageReceipts": self.storage_receipts,
                "activationDecisions": self.activation_decisions, "keyId": self.key_id,
                "failures": self.failures, "warnings": self.warnings}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _event_lines(log_file: Path, event: str) -> list[bytes]:
    out = []
    for line in log_file.read_bytes().splitlines():
        try:
            statement = json.loads(parse_json_envelope(line).payload)
        except (EnvelopeError, ValueError):
            continue
        if statement.get("predicateType") == EVENT_PREDICATE_TYPE and statement["predicate"].get("event") == event:
            out.append(line)
    return out


def _run_version(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (done.stdout + done.stderr).strip().splitlines()
    return " ".join(text[-2:])[:500] if text else None


def provider_versions(config: Any, pool: Any | None = None) -> dict[str, Any]:
    """Every provider binary and image this node runs or would run, with its version."""
    from importlib import metadata

    engines: dict[str, Any] = {}
    try:
        engines["llama-cpp-python"] = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        engines["llama-cpp-python"] = None
    try:
        from nodeagent.providers.llama_server import locate_llama_server
        path, why = locate_llama_server(build=False, timeout_s=30)
    except Exception as exc:  # the catalog or build helper missing: say so
        path, why = None, str(exc)
    engines["llama-server"] = ({"path": str(path), "sha256": _sha256(Path(path).read_bytes()),
                                "version": _run_version([str(path), "--version"])} if path else {"absent": str(why)})
    declared = [{"name": d.name, "model": d.model, "kind": d.kind, "mode": d.mode, "image": d.image,
                 "pinned": bool(d.image and "@sha256:" in d.image)} for d in config.providers]
    running = []
    if pool is not None:
        for managed in pool.all():
            running.append({"provider": managed.name, "kind": managed.kind, "version": managed.version,
                            "launchMode": managed.launch_mode, "modelDigest": managed.model_digest})
    return {"engines": engines, "declared": declared, "running": running}


def build_bundle(dest: Path, *, signer: Signer, receipts_dir: Path, profile: dict[str, Any],
                 config_file: Path | None, config: Any, pool: Any | None = None) -> dict[str, Any]:
    """Write the bundle to the empty or new directory ``dest``; returns its summary."""
    from nodeagent.receipts.export import export_log

    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise EvidenceError(f"bundle destination {dest} exists and is not an empty directory")
    dest.mkdir(parents=True, exist_ok=True)
    export_log(receipts_dir, dest / RECEIPTS)
    log_file = dest / RECEIPTS / "receipts.jsonl"

    def put(name: str, data: bytes) -> None:
        atomic_write_bytes(dest / name, data, mode=PUBLIC_FILE_MODE)

    put("machine-profile.json", json.dumps(profile, indent=2, sort_keys=True).encode() + b"\n")
    config_bytes = config_file.read_bytes() if config_file is not None and config_file.is_file() else None
    put("config.json", json.dumps({
        "file": str(config_file) if config_file else None,
        "sha256": _sha256(config_bytes) if config_bytes is not None else None,
        "effectiveSha256": _sha256(canonical_json(json.loads(config.model_dump_json()))),
    }, indent=2, sort_keys=True).encode() + b"\n")
    put("providers.json", json.dumps(provider_versions(config, pool), indent=2, sort_keys=True).encode() + b"\n")
    storage = _event_lines(log_file, "storage")
    decisions = _event_lines(log_file, "activation")
    put("storage-receipts.jsonl", b"".join(line + b"\n" for line in storage))
    put("activation-decisions.jsonl", b"".join(line + b"\n" for line in decisions))

    subjects = []
    for path in sorted(p for p in dest.rglob("*") if p.is_file() and p.name != BUNDLE_FILE):
        subjects.append({"name": path.relative_to(dest).as_posix(), "digest": {"sha256": _sha256(path.read_bytes())}})
    statement = {"_type": STATEMENT_TYPE, "subject": subjects, "predicateType": BUNDLE_PREDICATE_TYPE,
                 "predicate": {"createdAt": rfc3339_utc(datetime.now(timezone.utc)), "keyId": signer.key_id,
                               "entries": log_file.read_bytes().count(b"\n"),
                               "storageReceipts": len(storage), "activationDecisions": len(decisions)}}
    put(BUNDLE_FILE, sign_envelope(canonical_json(statement), INTOTO_PAYLOAD_TYPE, [signer]) + b"\n")
    return {"path": str(dest), "files": len(subjects) + 1, "entries": statement["predicate"]["entries"],
            "storageReceipts": len(storage), "activationDecisions": len(decisions), "keyId": signer.key_id}


def verify_evidence(directory: Path, keys: Mapping[str, PublicKey]) -> EvidenceReport:
    """Check a bundle with trusted ``keys`` (the machine key); never raises on bad input."""
    from nodeagent.receipts.verify import verify_bundle

    report = EvidenceReport()
    directory = Path(directory)
    try:
        envelope = parse_json_envelope((directory / BUNDLE_FILE).read_bytes().strip())
    except (OSError, EnvelopeError) as exc:
        report.fail(f"{BUNDLE_FILE}: {exc}")
        return report
    signers = envelope.verified_keyids(keys) if envelope.payload_type == INTOTO_PAYLOAD_TYPE else []
    if not signers:
        report.fail(f"{BUNDLE_FILE}: no trusted key's signature verifies (signed by "
                    f"{', '.join(k[:16] + '…' for k in envelope.keyids)})")
        return report
    report.key_id = signers[0]
    statement = json.loads(envelope.payload)
    if statement.get("predicateType") != BUNDLE_PREDICATE_TYPE:
        report.fail(f"{BUNDLE_FILE}: predicateType is not {BUNDLE_PREDICATE_TYPE}")
        return report
    expected = {s["name"]: s["digest"]["sha256"] for s in statement["subject"]}
    present = {p.relative_to(directory).as_posix(): p for p in directory.rglob("*")
               if p.is_file() and p.name != BUNDLE_FILE}
    for name in sorted(set(present) - set(expected)):
        report.fail(f"{name}: not part of the signed bundle (added)")
    for name in sorted(set(expected) - set(present)):
        report.fail(f"{name}: listed in the signed bundle but missing")
    for name in sorted(set(expected) & set(present)):
        if _sha256(present[name].read_bytes()) != expected[name]:
            report.fail(f"{name}: sha256 differs from the signed bundle (altered)")
    report.files = len(expected) + 1

    log = verify_bundle(directory / RECEIPTS, dict(keys))
    report.entries = log.entries
    for failure in log.failures:
        report.fail(f"receipts: entry {failure.seq}: {failure.check}: {failure.detail}")
    report.warnings.extend(f"receipts: {w}" for w in log.warnings)
    try:
        lines = set((directory / RECEIPTS / "receipts.jsonl").read_bytes().splitlines())
    except OSError as exc:
        report.fail(f"receipts/receipts.jsonl: {exc}")
        return report
    for name, attr in (("storage-receipts.jsonl", "storage_receipts"),
                       ("activation-decisions.jsonl", "activation_decisions")):
        try:
            extracted = (directory / name).read_bytes().splitlines()
        except OSError:
            continue  # reported above as missing
        setattr(report, attr, len(extracted))
        for index, line in enumerate(extracted):
            if line not in lines:
                report.fail(f"{name}: line {index + 1} is not an entry of the receipt log")
    return report


__all__ = ["BUNDLE_PREDICATE_TYPE", "EvidenceError", "EvidenceReport", "build_bundle", "provider_versions",
           "verify_evidence"]

"""Offline verification of a receipt log, an export, or a single-receipt proof.

Needs only files and public keys. Checks, each reported with the entry it
concerns and the check's name (`Failure`):

per entry (`inspect_line`): ``envelope``, ``base64``, ``payload-type``,
``signature`` (over the exact received payload bytes, before parsing),
``statement`` (schema; names the field), ``subject``, ``key-id``, ``rotation``;

across entries (`ChainChecker`): ``chain-seq`` (no gap, no duplicate),
``chain-prev`` (each entry names its predecessor's leaf hash: no fork, no
altered entry), ``key`` (each entry is signed by the key active at its
position: a retired key cannot sign later entries), ``torn-line``;

against checkpoints: ``checkpoint-format``, ``checkpoint-signature``,
``checkpoint-origin``, ``truncation`` (a checkpoint covers more entries than
the log holds), ``merkle-root`` (the entries do not hash to the signed root),
``inclusion`` (the selected receipt is not provably in a signed tree).

`verify_checkpoint_consistency` serves a holder of an old checkpoint without
the log: given a newer checkpoint and an RFC 6962 consistency proof it
decides whether the newer tree extends the older one (``consistency``).

Trust: the caller's anchor keys, extended along key-rotation entries in both
directions — a rotation signed by a trusted key and by the key it names makes
that key trusted too — so one key of the chain verifies the whole log.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from nodeagent.receipts.checkpoint import CheckpointError, SignedCheckpoint, open_checkpoint
from nodeagent.receipts.dsse import EnvelopeError, parse_envelope
from nodeagent.receipts.entry import KIND_EXECUTION, KIND_ROTATION, EntryFacts, inspect_line
from nodeagent.receipts.errors import ReceiptError
from nodeagent.receipts.keys import PublicKey
from nodeagent.receipts.merkle import MerkleTree, leaf_hash, root_from_inclusion, verify_consistency, verify_inclusion

LOG_FILE = "receipts.jsonl"
CHECKPOINT_DIR = "checkpoints"
KEYS_DIR = "keys"
CHECKPOINT_SUFFIX = ".note"
LOCK_FILE = "lock"


@dataclass(frozen=True)
class Failure:
    seq: int | None  # the entry concerned; None: the log as a whole or a checkpoint
    check: str
    detail: str

    def __str__(self) -> str:
        where = f"entry {self.seq}" if self.seq is not None else "log"
        return f"{where}: {self.check}: {self.detail}"

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "check": self.check, "detail": self.detail}


@dataclass
class VerifyReport:
    entries: int = 0
    receipts: int = 0
    rotations: int = 0
    origin: str | None = None
    trusted_keys: list[str] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    covered: int = 0  # entries covered by the largest verified checkpoint
    failures: list[Failure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    inclusion: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "entries": self.entries, "receipts": self.receipts, "rotations": self.rotations,
            "origin": self.origin, "trustedKeys": self.trusted_keys, "checkpoints": self.checkpoints,
            "covered": self.covered, "failures": [f.to_dict() for f in self.failures],
            "warnings": self.warnings, "inclusion": self.inclusion,
        }


# ------------------------------------------------------------------ trust
def extend_trust(lines: Iterable[bytes], anchors: Mapping[str, PublicKey]) -> dict[str, PublicKey]:
    """``anchors`` plus every key linked to one of them by a valid rotation entry.

    A rotation is only read after a trusted key's signature on it verified,
    and `inspect_line` then requires both of its keys' signatures.
    """
    trusted = dict(anchors)
    candidates = []
    for line in lines:
        if line.count(b'"keyid"') < 2:  # rotations carry two signatures; skip the rest cheaply
            continue
        try:
            envelope = parse_envelope(line)
        except EnvelopeError:
            continue
        if len(envelope.signatures) >= 2:
            candidates.append(line)
    changed = True
    while changed and candidates:
        changed = False
        for line in list(candidates):
            facts = inspect_line(line, trusted)
            if facts.rotation is None:
                continue
            candidates.remove(line)
            for key in facts.rotation:
                if key.key_id not in trusted:
                    trusted[key.key_id] = key
                    changed = True
    return trusted


# ------------------------------------------------------------------ the chain
class ChainChecker:
    """Feeds entries in log order and checks what links them.

    Also records the key schedule: ``epochs`` lists (first tree size, key id)
    so `key_for_size` says which key must sign a checkpoint of a given size.
    """

    def __init__(self, *, tree: MerkleTree | None = None, active: str | None = None) -> None:
        """Start empty, or continue after the entries already in ``tree`` (``active``: the key due next)."""
        self.tree = tree if tree is not None else MerkleTree()
        self.count = self.tree.size
        self.previous: bytes | None = self.tree.leaf(self.count - 1) if self.count else None
        self.active: str | None = None
        self.epochs: list[tuple[int, str]] = []
        if active is not None:
            self._activate(self.count, active)

    def feed(self, facts: EntryFacts) -> list[Failure]:
        index = self.count
        failures = [Failure(index, check, detail) for check, detail in facts.failures]
        if facts.seq is not None:
            if facts.seq != index:
                if facts.seq > index:
                    hint = f"a gap: entries {index}..{facts.seq - 1} are missing"
                else:
                    hint = "a duplicate or reordered entry"
                failures.append(Failure(index, "chain-seq", f"entry at position {index} says seq {facts.seq} ({hint})"))
            expected = self.previous.hex() if self.previous is not None else None
            if facts.previous != expected:
                failures.append(Failure(index, "chain-prev",
                                        f"previousLeafHash {str(facts.previous)[:16]}… is not the leaf hash "
                                        f"{str(expected)[:16]}… of entry {index - 1} (a fork or an altered entry)"))
        if facts.signers:
            if facts.rotation is not None:
                old, new = facts.rotation
                if self.active is None:
                    self._activate(index, old.key_id)
                if old.key_id != self.active:
                    failures.append(Failure(index, "rotation", f"rotates away from key {old.key_id[:16]}… "
                                                                f"but the active key is {self.active[:16]}…"))
                self._activate(index + 1, new.key_id)
            else:
                if self.active is None:
                    self._activate(index, facts.signers[0])
                if self.active not in facts.signers:
                    failures.append(Failure(index, "key", f"signed by {facts.signers[0][:16]}… but the active key "
                                                           f"at this position is {self.active[:16]}… (retired or foreign key)"))
        self.previous = facts.leaf_hash
        self.tree.append(facts.leaf_hash)
        self.count += 1
        return failures

    def _activate(self, size: int, key_id: str) -> None:
        self.active = key_id
        self.epochs.append((size, key_id))

    def key_for_size(self, size: int) -> str | None:
        """The key that was active once ``size`` entries existed (signs that checkpoint)."""
        chosen = None
        for start, key_id in self.epochs:
            if start <= size:
                chosen = key_id
        return chosen


# ------------------------------------------------------------------ whole logs
def split_lines(data: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines, and the torn tail (bytes after the last newline)."""
    if not data:
        return [], b""
    *lines, tail = data.split(b"\n")
    return lines, tail


PARALLEL_MIN_ENTRIES = 1000  # below this, forking workers costs more than it saves


def inspect_entries(lines: Sequence[bytes], trusted: Mapping[str, PublicKey], jobs: int = 1, *,
                    joined: bytes | None = None) -> Iterator[EntryFacts]:
    """`inspect_line` over every line, in order; with ``jobs`` > 1 in forked worker processes.

    Signature verification and schema validation hold the GIL, so only
    processes use more cores. The lines are laid end to end in one buffer
    before the fork; a worker is sent a range of line numbers and cuts its
    lines out of that buffer by offset, so it touches no object of the
    parent's line list (whose pages would otherwise be copied into every
    worker) and nothing but the range and the facts (without the payload)
    crosses a pipe. Chunks come back in order as they finish, so the caller
    checks the chain while the workers go on.

    ``joined``, if given, must start with ``b"\\n".join(lines)`` (e.g. the file the
    lines were split from): it saves building that buffer. The workers' input
    is a module global (fork hands it over), so one parallel run at a time per
    process; the CLI is the only caller that asks for several jobs.
    """
    if jobs <= 1 or len(lines) < PARALLEL_MIN_ENTRIES:
        for line in lines:
            yield inspect_line(line, trusted)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    global _SHARED
    offsets = array("Q", accumulate(map(len, lines), lambda end, size: end + size + 1, initial=0))
    # Small enough chunks that a worker slowed by another job on its core does not hold
    # the rest back; large enough that the per-chunk round trip is noise.
    chunk = min(2000, max(200, len(lines) // (jobs * 8)))
    ranges = [(start, min(start + chunk, len(lines))) for start in range(0, len(lines), chunk)]
    _SHARED = _SharedLines(joined if joined is not None else b"\n".join(lines), offsets, trusted)
    try:
        # Not multiprocessing.Pool: its worker-handler thread spins while results sit in the
        # pipe (~5 us of the parent's CPU per entry here); the executor's one thread does not.
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            for part in pool.map(_inspect_range, ranges):
                yield from part
    finally:
        _SHARED = None


@dataclass(frozen=True)
class _SharedLines:
    """What forked workers inherit: line ``i`` is ``buffer[offsets[i]:offsets[i + 1] - 1]``."""

    buffer: bytes
    offsets: array
    trusted: Mapping[str, PublicKey]


_SHARED: _SharedLines | None = None


def _inspect_range(bounds: tuple[int, int]) -> list[EntryFacts]:
    shared = _SHARED
    assert shared is not None, "a verification worker runs only in a process forked by inspect_entries"
    buffer, offsets, trusted = shared.buffer, shared.offsets, shared.trusted
    # One string object per key id, so the chunk's pickle holds each id once, not once per entry.
    same: dict[str, str] = {key_id: key_id for key_id in trusted}
    out = []
    for index in range(*bounds):
        facts = inspect_line(buffer[offsets[index]:offsets[index + 1] - 1], trusted)
        facts.payload = None  # the parent needs the run id, which it has, not the statement
        facts.claimed_keyids = tuple(same.setdefault(k, k) for k in facts.claimed_keyids)
        facts.signers = tuple(same.setdefault(k, k) for k in facts.signers)
        if facts.key_id is not None:
            facts.key_id = same.setdefault(facts.key_id, facts.key_id)
        out.append(facts)
    return out


SELECTOR_HELP = "a seq number, a receipt id (its leaf hash, or a prefix of >= 8 hex digits), or a pod run id"
_HEX = frozenset("0123456789abcdef")


def selector_candidates(selector: str | int) -> list[tuple[str, Any]]:
    """How to read a receipt selector, most likely first: ("seq", int), ("id", hex prefix), ("run", text).

    ``seq:N``, ``id:HEX`` and ``run:ID`` say it explicitly. Otherwise digits shorter than
    8 are a seq, 8+ hex digits an id prefix (then a seq if all digits), and anything
    may be a run id.
    """
    if isinstance(selector, int):
        return [("seq", selector)]
    text = selector.strip()
    kind, _, value = text.partition(":")
    if kind in ("seq", "id", "run") and value:
        if kind == "seq" and not value.isdigit():
            raise ReceiptError(f"seq must be a number, got {value!r}")
        return [(kind, int(value) if kind == "seq" else value.lower() if kind == "id" else value)]
    lowered = text.lower()
    out: list[tuple[str, Any]] = []
    if text.isdigit() and len(text) < 8:
        out.append(("seq", int(text)))
    if len(lowered) >= 8 and set(lowered) <= _HEX:
        out.append(("id", lowered))
        if text.isdigit():
            out.append(("seq", int(text)))
    out.append(("run", text))
    return out


def select_entry(facts: Sequence[EntryFacts], selector: str | int) -> int:
    """The position of the entry ``selector`` names (see `selector_candidates`)."""
    for kind, value in selector_candidates(selector):
        if kind == "seq" and 0 <= value < len(facts):
            return value
        if kind == "id":
            hits = [i for i, f in enumerate(facts) if f.leaf_hash.hex().startswith(value)]
            if len(hits) > 1:
                raise ReceiptError(f"receipt id prefix {value!r} is ambiguous ({len(hits)} matches)")
            if hits:
                return hits[0]
        if kind == "run":
            hits = [i for i, f in enumerate(facts) if f.run_id == value]
            if hits:
                return hits[-1]
    raise ReceiptError(f"no entry matches {str(selector)!r} in {len(facts)} entries ({SELECTOR_HELP})")


def verify_log(
    lines: Sequence[bytes],
    checkpoint_texts: Sequence[tuple[str, str]],
    anchors: Mapping[str, PublicKey],
    *,
    torn_tail: bytes = b"",
    origin: str | None = None,
    receipt: str | int | None = None,
    jobs: int = 1,
    joined: bytes | None = None,
) -> VerifyReport:
    """Verify every entry, the chain, every checkpoint, and optionally one receipt's inclusion.

    ``checkpoint_texts`` are (name, signed note) pairs; the name only labels messages.
    ``joined``: see `inspect_entries`.
    """
    report = VerifyReport(entries=len(lines), origin=origin)
    if not anchors:
        report.failures.append(Failure(None, "signature", "no trusted public key given"))
        return report
    trusted = extend_trust(lines, anchors)
    report.trusted_keys = sorted(trusted)
    facts = []
    chain = ChainChecker()
    for entry in inspect_entries(lines, trusted, jobs, joined=joined):
        facts.append(entry)
        report.failures.extend(chain.feed(entry))
        report.receipts += entry.kind == KIND_EXECUTION
        report.rotations += entry.kind == KIND_ROTATION
    if torn_tail:
        report.failures.append(Failure(len(lines), "torn-line",
                                       f"{len(torn_tail)} bytes after the last complete line (an interrupted write)"))

    verified = _check_checkpoints(report, chain, checkpoint_texts, trusted)
    if not checkpoint_texts:
        report.warnings.append("no checkpoint: truncation of the log cannot be detected")
    elif verified and report.covered < len(lines):
        report.warnings.append(
            f"entries {report.covered}..{len(lines) - 1} are not yet covered by a signed checkpoint "
            "(their signatures and chain were checked)")

    if receipt is not None:
        try:
            index = select_entry(facts, receipt)
        except ReceiptError as exc:
            report.failures.append(Failure(None, "inclusion", str(exc)))
            return report
        covering = [cp for cp in verified if cp.checkpoint.size > index]
        if not covering:
            report.failures.append(Failure(index, "inclusion", "no verified checkpoint covers this entry yet"))
        else:
            cp = max(covering, key=lambda c: c.checkpoint.size)  # the newest signed tree
            proof = chain.tree.inclusion_proof(index, cp.checkpoint.size)
            good = verify_inclusion(facts[index].leaf_hash, index, cp.checkpoint.size, proof, cp.checkpoint.root)
            if not good:
                report.failures.append(Failure(index, "inclusion", f"inclusion proof against the checkpoint of size "
                                                                    f"{cp.checkpoint.size} does not verify"))
            report.inclusion = {"seq": index, "receiptId": facts[index].leaf_hash.hex(), "treeSize": cp.checkpoint.size,
                                "proof": [p.hex() for p in proof], "verified": good,
                                "entryOk": not any(f.seq == index for f in report.failures)}
    return report


def _check_checkpoints(report: VerifyReport, chain: ChainChecker, texts: Sequence[tuple[str, str]],
                       trusted: Mapping[str, PublicKey]) -> list[SignedCheckpoint]:
    verified: list[SignedCheckpoint] = []
    mismatched: list[tuple[str, int]] = []
    for name, text in texts:
        try:
            signed = open_checkpoint(text, trusted.values(), report.origin)
        except CheckpointError as exc:
            report.failures.append(Failure(None, exc.check, f"{name}: {exc.detail}"))
            continue
        cp = signed.checkpoint
        if report.origin is None:
            report.origin = cp.origin
        if cp.size > chain.count:
            report.failures.append(Failure(chain.count, "truncation",
                                           f"{name} signs {cp.size} entries but only {chain.count} are present: "
                                           f"entries {chain.count}..{cp.size - 1} are missing"))
            continue
        expected_key = chain.key_for_size(cp.size)
        if expected_key is not None and signed.key_id != expected_key:
            report.failures.append(Failure(None, "checkpoint-signature",
                                           f"{name} (size {cp.size}) is signed by {signed.key_id[:16]}…, not by "
                                           f"{expected_key[:16]}…, the key active at that size"))
            continue
        if chain.tree.root(cp.size) != cp.root:
            mismatched.append((name, cp.size))
            continue
        verified.append(signed)
        report.checkpoints.append({"name": name, "size": cp.size, "keyId": signed.key_id, "root": cp.root.hex()})
    verified.sort(key=lambda c: c.checkpoint.size)
    good_sizes = [c.checkpoint.size for c in verified]
    for name, size in mismatched:
        # The change lies after the largest checkpoint below it that still agrees.
        start = max((s for s in good_sizes if s < size), default=0)
        report.failures.append(Failure(start, "merkle-root", f"{name}: entries 0..{size - 1} do not hash to the signed "
                                                             f"root; entries {start}..{size - 1} differ from what was signed"))
    # Every verified root was recomputed from the same entries, so the newest
    # checkpoint extends all the others; no separate consistency proof needed here.
    if verified:
        report.covered = verified[-1].checkpoint.size
    return verified


# ------------------------------------------------------------------ bundles on disk
@dataclass
class Bundle:
    """A log directory or an export: the JSONL, checkpoints and public keys."""

    path: Path
    lines: list[bytes]
    data: bytes  # the log file as read: `lines` joined by newlines, then the torn tail
    torn_tail: bytes
    checkpoints: list[tuple[str, str]]
    keys: dict[str, PublicKey]
    origin: str | None
    live: bool  # a writer holds the log: its last line may be an append in progress


def writer_active(directory: Path) -> bool:
    """Whether a process holds the log's writer lock, read from /proc/locks (never takes the lock,
    which could make a starting writer fail with LogBusy)."""
    try:
        inode = (directory / LOCK_FILE).stat().st_ino
        table = Path("/proc/locks").read_text()
    except OSError:
        return False
    return any("FLOCK" in line and line.split()[5].endswith(f":{inode}") for line in table.splitlines()
               if len(line.split()) > 5)


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    path = Path(path)
    log_file = path / LOG_FILE
    if not log_file.is_file():
        raise ReceiptError(f"{path} has no {LOG_FILE}: not a receipt log or export directory")
    # Checkpoints before the log: a live writer only checkpoints entries already in the
    # file, so everything the checkpoints read here sign is in the bytes read next.
    checkpoints = []
    cp_dir = path / CHECKPOINT_DIR
    if cp_dir.is_dir():
        for cp_file in sorted(cp_dir.glob(f"*{CHECKPOINT_SUFFIX}")):
            checkpoints.append((f"{CHECKPOINT_DIR}/{cp_file.name}", cp_file.read_text(encoding="utf-8")))
    live = writer_active(path)
    data = log_file.read_bytes()
    lines, tail = split_lines(data)
    keys = load_public_keys(path / KEYS_DIR) if (path / KEYS_DIR).is_dir() else {}
    origin = None
    manifest = path / "manifest.json"
    if manifest.is_file():
        origin = json.loads(manifest.read_text()).get("origin")
    return Bundle(path, lines, data, tail, checkpoints, keys, origin, live)


def load_public_keys(directory: Path) -> dict[str, PublicKey]:
    keys = {}
    for pem in sorted(directory.glob("*.pem")):
        key = PublicKey.load(pem)
        keys[key.key_id] = key
    return keys


def verify_bundle(path: str | os.PathLike[str], anchors: Mapping[str, PublicKey] | None = None, *,
                  extra_checkpoints: Sequence[tuple[str, str]] = (), receipt: str | int | None = None,
                  jobs: int = 1) -> VerifyReport:
    """Verify a log directory or export. Without ``anchors``, the bundle's own keys are trusted (with a warning)."""
    bundle = load_bundle(path)
    warnings = []
    if not anchors:
        anchors = bundle.keys
        warnings.append("trusting the public keys shipped in the bundle; pass --key to pin the machine's key")
    torn = bundle.torn_tail
    if torn and bundle.live:
        warnings.append(f"a writer holds the log: {len(torn)} bytes after the last complete line are an append "
                        "in progress and were not verified")
        torn = b""
    report = verify_log(bundle.lines, [*bundle.checkpoints, *extra_checkpoints], anchors,
                        torn_tail=torn, origin=bundle.origin, receipt=receipt, jobs=jobs, joined=bundle.data)
    report.warnings[:0] = warnings
    report.failures[:0] = _check_manifest(bundle.path)
    return report


def _check_manifest(path: Path) -> list[Failure]:
    """An export's manifest lists each file's sha256 (unsigned: it catches damage, not forgery)."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        return []
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return [Failure(None, "manifest", f"manifest.json is unreadable: {exc}")]
    failures = []
    for relative, digest in sorted(files.items()):
        target = path / relative
        if not target.is_file():
            failures.append(Failure(None, "manifest", f"{relative} is listed in manifest.json but missing"))
        elif hashlib.sha256(target.read_bytes()).hexdigest() != digest:
            failures.append(Failure(None, "manifest", f"{relative} differs from its sha256 in manifest.json"))
    return failures


# ------------------------------------------------------------------ single-receipt proofs
def verify_proof(proof: Any, anchors: Mapping[str, PublicKey] | None = None) -> VerifyReport:
    """Verify a `ReceiptProof` (model or its wire dict) with nothing else but keys.

    Without ``anchors`` the keys shipped in the proof are trusted (with a warning).
    """
    from nodeagent.contracts.receipt import ReceiptProof

    proof = proof if isinstance(proof, ReceiptProof) else ReceiptProof.model_validate(proof)
    report = VerifyReport(entries=1, origin=proof.origin)
    shipped = {}
    for ref in proof.public_keys:
        key = PublicKey.from_b64_der(ref.public_key)
        shipped[key.key_id] = key
    if not anchors:
        anchors = shipped
        report.warnings.append("trusting the public keys shipped in the proof; pass --key to pin the machine's key")
    chain_lines = [e.line.encode() for e in proof.key_chain]
    trusted = extend_trust(chain_lines, anchors)
    report.trusted_keys = sorted(trusted)
    signed: SignedCheckpoint | None = None
    try:
        signed = open_checkpoint(proof.checkpoint, trusted.values(), proof.origin)
    except CheckpointError as exc:
        report.failures.append(Failure(None, exc.check, exc.detail))
    if signed is not None:
        cp = signed.checkpoint
        report.checkpoints.append({"name": "checkpoint", "size": cp.size, "keyId": signed.key_id, "root": cp.root.hex()})
        report.covered = cp.size
        if cp.size != proof.tree_size:
            report.failures.append(Failure(None, "inclusion", f"proof is for tree size {proof.tree_size}, "
                                                              f"the checkpoint signs {cp.size}"))
            signed = None

    def included(entry: Any) -> EntryFacts:
        """The entry's own checks, and its inclusion when there is a checkpoint to prove it against."""
        line = entry.line.encode()
        facts = inspect_line(line, trusted)
        for check, detail in facts.failures:
            report.failures.append(Failure(entry.seq, check, detail))
        if facts.seq is not None and facts.seq != entry.seq:
            report.failures.append(Failure(entry.seq, "chain-seq", f"entry says seq {facts.seq}, proof says {entry.seq}"))
        if signed is not None:
            size, root = signed.checkpoint.size, signed.checkpoint.root
            path = [bytes.fromhex(h) for h in entry.inclusion_proof]
            if root_from_inclusion(leaf_hash(line), entry.seq, size, path) != root:
                report.failures.append(Failure(entry.seq, "inclusion", f"not included in the checkpoint's tree of size {size}"))
        return facts

    rotations = sorted(((e.seq, included(e)) for e in proof.key_chain), key=lambda pair: pair[0])
    facts = included(proof.entry)
    report.receipts = int(facts.kind == KIND_EXECUTION)
    report.rotations = len(rotations)
    if signed is None:
        return report
    # The key schedule from the rotations: the receipt must be signed by the key
    # active at its seq, and the checkpoint by the key active at its size.
    schedule: list[tuple[int, str]] = []
    for seq, rotation in rotations:
        if rotation.rotation is None:
            report.failures.append(Failure(seq, "rotation", "key-chain entry is not a valid key rotation"))
            continue
        old, new = rotation.rotation
        if schedule and schedule[-1][1] != old.key_id:
            report.failures.append(Failure(seq, "rotation", "key chain is broken: rotates away from a key that is not active"))
        if not schedule:
            schedule.append((0, old.key_id))
        schedule.append((seq + 1, new.key_id))

    def active(position: int) -> str | None:
        chosen = None
        for start, key_id in schedule:
            if start <= position:
                chosen = key_id
        return chosen

    if schedule:
        if facts.signers and facts.rotation is None and active(proof.entry.seq) not in facts.signers:
            report.failures.append(Failure(proof.entry.seq, "key", "not signed by the key active at its position"))
        if active(signed.checkpoint.size) != signed.key_id:
            report.failures.append(Failure(None, "checkpoint-signature", "checkpoint not signed by the key active at its size"))
    elif facts.signers and signed.key_id not in facts.signers:
        report.failures.append(Failure(proof.entry.seq, "key", "receipt and checkpoint are signed by different keys "
                                                               "and the proof carries no key rotation linking them"))
    report.inclusion = {"seq": proof.entry.seq, "receiptId": leaf_hash(proof.entry.line.encode()).hex(),
                        "treeSize": signed.checkpoint.size, "proof": proof.entry.inclusion_proof,
                        "verified": not any(f.check == "inclusion" for f in report.failures)}
    return report


# ------------------------------------------------------------------ checkpoint consistency
def verify_checkpoint_consistency(old_text: str, new_text: str, proof_hex: Sequence[str],
                                  keys: Mapping[str, PublicKey]) -> VerifyReport:
    """Does the log of ``new_text`` extend the one of ``old_text``? Needs no entries."""
    report = VerifyReport()
    signed = []
    for label, text in (("old checkpoint", old_text), ("new checkpoint", new_text)):
        try:
            signed.append(open_checkpoint(text, keys.values()))
        except CheckpointError as exc:
            report.failures.append(Failure(None, exc.check, f"{label}: {exc.detail}"))
    if report.failures:
        return report
    old, new = signed[0].checkpoint, signed[1].checkpoint
    report.origin, report.covered = new.origin, new.size
    report.checkpoints = [{"name": n, "size": c.size, "keyId": s.key_id, "root": c.root.hex()}
                          for n, c, s in (("old", old, signed[0]), ("new", new, signed[1]))]
    if old.origin != new.origin:
        report.failures.append(Failure(None, "checkpoint-origin", f"origins differ: {old.origin!r} vs {new.origin!r}"))
    elif old.size > new.size:
        report.failures.append(Failure(old.size, "truncation", f"new checkpoint has {new.size} entries, "
                                                               f"fewer than the {old.size} signed before"))
    elif not verify_consistency(old.size, new.size, old.root, new.root, [bytes.fromhex(p) for p in proof_hex]):
        report.failures.append(Failure(None, "consistency", f"the tree of size {new.size} does not extend the "
                                                            f"signed tree of size {old.size} (history was rewritten)"))
    return report

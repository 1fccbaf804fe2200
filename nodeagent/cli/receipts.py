"""`key show|rotate` and `receipts ls|show|export|verify|checkpoint`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from nodeagent.cli.output import CliError, add_format_option, add_group, emit, print_json, render_table

KEY_FILE_HELP = ("private key file (PKCS#8 PEM, mode 0600); default: config receipts.key_file, then the systemd "
                 "credential receipt-signing-key, then <state>/keys/machine.key (created on first use)")

RECEIPTS_EPILOG = """\
examples:
  agent-machine receipts ls                          the newest receipts
  agent-machine receipts show 42                     one receipt (seq, receipt id, or run id)
  agent-machine receipts show 42 --proof --format json > r42.json
                                                     a self-contained proof for one receipt
  agent-machine receipts export /tmp/node-a          the whole log, for offline verification
  agent-machine receipts verify /tmp/node-a --key node-a.pub.pem
  agent-machine receipts verify r42.json --key node-a.pub.pem
  agent-machine receipts verify                      this machine's own log
"""

KEY_EPILOG = """\
examples:
  agent-machine key show                      key id and public key (give it to verifiers)
  agent-machine key show --format json        also the checkpoint (signed-note) verifier key
  agent-machine key rotate --reason yearly    new key; the log records the hand-over
"""


def register(subparsers: Any) -> None:
    key = add_group(subparsers, "key", "the machine's receipt-signing key (Ed25519)")
    show = key.add_parser(
        "show", help="print the key id and public key",
        description="Print the signing key's id (hex sha256 of the DER public key), its public key in PEM, "
        "where it comes from, and keys retired by rotation. The key is created on first use.",
        epilog=KEY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    show.add_argument("--key-file", type=Path, metavar="FILE", help=KEY_FILE_HELP)
    add_format_option(show)
    show.set_defaults(func=_key_show)

    rotate = key.add_parser(
        "rotate", help="switch to a new key; the log records the hand-over",
        description="Append a key-rotation entry signed by the current and the new key, then sign "
        "everything after it with the new key. Receipts signed before stay verifiable: the rotation "
        "entry links the keys, and exports carry every public key. A managed key "
        "(<state>/keys/machine.key) is replaced; a key from --key-file or a systemd credential is not "
        "touched: pass the new one with --new-key and update the configuration afterwards.",
        epilog=KEY_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    rotate.add_argument("--key-file", type=Path, metavar="FILE", help=KEY_FILE_HELP)
    rotate.add_argument("--new-key", type=Path, metavar="FILE", help="use this private key instead of generating one")
    rotate.add_argument("--reason", help="recorded in the rotation entry (e.g. 'scheduled', 'compromise')")
    add_format_option(rotate)
    rotate.set_defaults(func=_key_rotate)

    receipts = add_group(subparsers, "receipts", "signed execution receipts: list, show, export, verify")

    ls = receipts.add_parser(
        "ls", help="list receipts, newest first",
        description="List the entries of this machine's receipt log (execution receipts and key rotations), "
        "newest first. Reads the index; takes no lock.",
        epilog=RECEIPTS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ls.add_argument("--tenant", help="only this tenant's receipts")
    ls.add_argument("--status", choices=("succeeded", "failed", "cancelled", "refused", "rotated"),
                    help="only entries with this outcome")
    ls.add_argument("--limit", type=int, default=20, help="at most N entries (default 20; 0 = all)")
    add_format_option(ls)
    ls.set_defaults(func=_ls)

    show_r = receipts.add_parser(
        "show", help="show one receipt",
        description="Show one entry: by seq number, receipt id (its leaf hash, or a prefix of at least 8 "
        "hex digits) or pod run id. --format json prints the ExecutionReceipt (envelope as logged plus the "
        "decoded statement). --proof prints a ReceiptProof instead: the envelope, its inclusion proof, a "
        "signed checkpoint and the key chain, verifiable offline with `receipts verify FILE`.",
        epilog=RECEIPTS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    show_r.add_argument("receipt", metavar="ID", help="seq, receipt id (prefix) or run id")
    show_r.add_argument("--proof", action="store_true", help="print a self-contained inclusion proof")
    show_r.add_argument("--key-file", type=Path, metavar="FILE", help=KEY_FILE_HELP)
    add_format_option(show_r)
    show_r.set_defaults(func=_show)

    export = receipts.add_parser(
        "export", help="write the log (or one receipt's proof) for offline verification",
        description="Write DEST, a directory with receipts.jsonl, checkpoints/, keys/ and manifest.json that "
        "`receipts verify DEST` checks with nothing else. A checkpoint covering every entry is signed first "
        "(unless a running agent holds the log). With --receipt, DEST is a JSON file holding that receipt's "
        "ReceiptProof.",
        epilog=RECEIPTS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("dest", type=Path, metavar="DEST")
    export.add_argument("--receipt", metavar="ID", help="export only this receipt, as a proof file")
    export.add_argument("--key-file", type=Path, metavar="FILE", help=KEY_FILE_HELP)
    add_format_option(export)
    export.set_defaults(func=_export)

    verify = receipts.add_parser(
        "verify", help="verify a log, an export or a proof offline (exit 1 on failure)",
        description="Verify offline, with only public keys: every envelope's signature over the exact "
        "payload bytes (before parsing), payload type, statement schema, chain continuity (no gap, no "
        "fork), the key in force at each position, every checkpoint's signature and Merkle root, and "
        "truncation against checkpoints. PATH is an export directory, a log directory, or a proof file "
        "(default: this machine's log). Every failure names the entry and the check.",
        epilog=RECEIPTS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("path", nargs="?", type=Path, metavar="PATH")
    verify.add_argument("--key", action="append", type=Path, default=[], metavar="PEM",
                        help="trusted public key (repeatable); default: the keys shipped in PATH, with a warning")
    verify.add_argument("--checkpoint", action="append", type=Path, default=[], metavar="NOTE",
                        help="a checkpoint kept elsewhere (repeatable): detects truncation and rewrites")
    verify.add_argument("--receipt", metavar="ID", help="also prove this receipt's inclusion (seq, id or run id)")
    verify.add_argument("--jobs", type=int, default=0, metavar="N",
                        help="verify entries in N processes (default: one per CPU, for logs of 1000+ entries)")
    add_format_option(verify)
    verify.set_defaults(func=_verify)

    checkpoint = receipts.add_parser(
        "checkpoint", help="sign a checkpoint of the log now",
        description="Make every entry durable and sign a checkpoint (origin, size, Merkle root) as a "
        "C2SP signed note. With --from-size N, also print the RFC 6962 consistency proof from the tree "
        "of N entries, so a holder of an older checkpoint can check the log only grew.",
        epilog=RECEIPTS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    checkpoint.add_argument("--from-size", type=int, metavar="N", help="include a consistency proof from size N")
    checkpoint.add_argument("--key-file", type=Path, metavar="FILE", help=KEY_FILE_HELP)
    add_format_option(checkpoint)
    checkpoint.set_defaults(func=_checkpoint)


# ------------------------------------------------------------------ shared
class _Context:
    def __init__(self, args: argparse.Namespace) -> None:
        from nodeagent.config import ConfigError, load_config

        try:
            loaded = load_config()
        except (ConfigError, ValueError) as exc:
            raise CliError(str(exc), exit_code=2) from exc
        self.state_dir = loaded.paths.state_dir
        self.settings = loaded.config.receipts
        self.key_file = getattr(args, "key_file", None) or self.settings.key_file

    @property
    def log_dir(self) -> Path:
        from nodeagent.receipts.machine import receipts_dir

        return receipts_dir(self.state_dir)

    def source(self):
        from nodeagent.receipts.keys import resolve_key_source

        return resolve_key_source(self.state_dir, self.key_file)

    def open_log(self):
        from nodeagent.receipts import ReceiptError, open_machine_log

        try:
            log = open_machine_log(self.state_dir, key_file=self.key_file,
                                   checkpoint_every=self.settings.checkpoint_every,
                                   checkpoint_seconds=self.settings.checkpoint_seconds)
        except ReceiptError as exc:
            raise CliError(str(exc)) from exc
        for message in log.recovery.messages():
            print(f"agent-machine: receipts: {message}", file=sys.stderr)
        return log

    def reader(self):
        from nodeagent.receipts import LogReader, ReceiptError

        try:
            return LogReader(self.log_dir)
        except ReceiptError as exc:
            raise CliError(str(exc)) from exc


def _receipt_errors():
    from nodeagent.receipts import ReceiptError

    return ReceiptError


# ------------------------------------------------------------------ key
def _key_show(args: argparse.Namespace) -> int:
    from nodeagent.receipts.checkpoint import note_verifier_key
    from nodeagent.receipts.keys import load_signer
    from nodeagent.receipts.log import META_FILE, default_origin
    from nodeagent.receipts.verify import KEYS_DIR, load_public_keys

    ctx = _Context(args)
    source = ctx.source()
    try:
        signer = load_signer(source)
        meta = ctx.log_dir / META_FILE
        origin = json.loads(meta.read_text())["origin"] if meta.exists() else default_origin(signer)
        known = load_public_keys(ctx.log_dir / KEYS_DIR) if (ctx.log_dir / KEYS_DIR).is_dir() else {}
    except _receipt_errors() as exc:
        raise CliError(str(exc)) from exc
    data = {
        "keyId": signer.key_id,
        "algorithm": "ed25519",
        "source": {"kind": source.kind, "path": str(source.path)},
        "publicKeyPem": signer.public.pem(),
        "origin": origin,
        "noteVerifierKey": note_verifier_key(origin, signer.public),
        "retiredKeys": [{"keyId": k.key_id, "publicKeyPem": k.pem()} for k in known.values() if k.key_id != signer.key_id],
    }

    def table(d: dict) -> str:
        lines = [f"key id:    {d['keyId']}", "algorithm: ed25519", f"source:    {source.describe()}",
                 f"origin:    {d['origin']}", f"note key:  {d['noteVerifierKey']}", "", d["publicKeyPem"].rstrip()]
        for retired in d["retiredKeys"]:
            lines.append(f"retired:   {retired['keyId']}")
        return "\n".join(lines)

    emit(data, args.format, table)
    return 0


def _key_rotate(args: argparse.Namespace) -> int:
    from nodeagent.receipts.machine import rotate_machine_key

    ctx = _Context(args)
    log = ctx.open_log()
    try:
        result = rotate_machine_key(log, ctx.source(), new_key_file=args.new_key, reason=args.reason)
    except _receipt_errors() as exc:
        raise CliError(str(exc)) from exc
    finally:
        log.close()
    data = {"previousKeyId": result.previous_key_id, "newKeyId": result.new_key_id, "rotationSeq": result.entry.seq,
            "receiptId": result.entry.receipt_id, "keyPath": str(result.key_path) if result.key_path else None,
            "hint": result.hint}
    emit(data, args.format, lambda d: "\n".join(
        [f"rotated: {d['previousKeyId'][:16]}… -> {d['newKeyId']}", f"logged as entry {d['rotationSeq']}"]
        + ([f"next: {d['hint']}"] if d["hint"] else [])))
    return 0


# ------------------------------------------------------------------ receipts
def _row_dict(row: Any) -> dict[str, Any]:
    return {"seq": row.seq, "receiptId": row.receipt_id, "kind": row.kind, "keyId": row.signer, "runId": row.run_id,
            "pod": row.pod, "tenant": row.tenant, "model": row.model, "status": row.status, "finishedAt": row.finished_at}


def _ls(args: argparse.Namespace) -> int:
    ctx = _Context(args)
    if not (ctx.log_dir / "receipts.jsonl").exists():
        emit([], args.format, lambda _: f"no receipts yet ({ctx.log_dir})")
        return 0
    with ctx.reader() as reader:
        rows = reader.rows(tenant=args.tenant, status=args.status, limit=args.limit or None)
        pending = reader.unindexed_bytes
    if pending:
        print(f"agent-machine: receipts: {pending} bytes at the end of the log are not indexed yet (a crash or an "
              "append in progress); they are verified and listed once the log is next opened for writing",
              file=sys.stderr)
    data = [_row_dict(r) for r in rows]
    emit(data, args.format, lambda d: render_table(
        ("seq", "kind", "status", "tenant", "pod", "run", "model", "finished", "id"),
        [(r["seq"], r["kind"], r["status"], r["tenant"], r["pod"], r["runId"], r["model"], r["finishedAt"],
          r["receiptId"][:12]) for r in d]) if d else "no receipts match")
    return 0


def _show(args: argparse.Namespace) -> int:
    ctx = _Context(args)
    if args.proof:
        proof = _proof(ctx, args.receipt)
        emit(proof, args.format, lambda p: "\n".join([
            f"receipt {p.entry.seq} of {p.origin}", f"tree size: {p.tree_size}",
            f"inclusion proof: {len(p.entry.inclusion_proof)} hashes", f"key rotations: {len(p.key_chain)}",
            "", p.checkpoint.rstrip(), "", "(use --format json to save it for `receipts verify`)"]))
        return 0
    with ctx.reader() as reader:
        try:
            row = reader.find(args.receipt)
            value, statement = reader.view(row)
        except _receipt_errors() as exc:
            raise CliError(str(exc)) from exc
    emit(value, args.format, lambda _: _show_table(row, statement))
    return 0


def _show_table(row: Any, statement: dict[str, Any]) -> str:
    p = statement["predicate"]
    lines = [f"seq:        {row.seq}", f"receipt id: {row.receipt_id}", f"kind:       {row.kind}",
             f"signed by:  {row.signer}"]
    if row.kind == "execution":
        timing, usage, cache = p["timing"], p["usage"], p["cache"]
        provider = p.get("provider") or {}
        lines += [
            f"pod:        {p['pod']['name']} (run {p['pod']['runId']}, tenant {p['pod']['tenant']}, agent {p['pod']['agent']})",
            f"outcome:    {p['outcome']['status']}" + (f" ({p['outcome']['errorClass']})" if p["outcome"]["errorClass"] else ""),
            f"model:      {p['model']['name']} {p['model'].get('digest') or ''}".rstrip(),
            f"provider:   {provider.get('kind', '-')} {provider.get('version', '')} {provider.get('launchMode', '')}".rstrip(),
            f"cache:      {cache['tierHit']} cached {cache['cachedTokens']} evaluated {cache['evaluatedTokens']}",
            f"tokens:     prompt {usage['promptTokens']} completion {usage['completionTokens']}",
            f"queued:     {timing['queuedAt']}", f"finished:   {timing['finishedAt']}",
            f"request:    {p['pod']['requestDigest']}",
        ]
    elif row.kind == "event":  # governance node events (docs/governance.md)
        import json
        lines += [f"event:      {p['event']} {p['name']}", f"tenant:     {p['tenant'] or '-'}",
                  f"at:         {p['recordedAt']}", "body:       " + json.dumps(p["body"], sort_keys=True)[:2000]]
    else:
        lines += [f"from key:   {p['previousKey']['keyId']}", f"to key:     {p['newKey']['keyId']}",
                  f"at:         {p['rotatedAt']}", f"reason:     {p.get('reason') or '-'}"]
    return "\n".join(lines)


def _proof(ctx: _Context, selector: str):
    from nodeagent.receipts import LogBusy

    with ctx.reader() as reader:
        try:
            return reader.proof(selector)
        except _receipt_errors() as first:
            try:
                row = reader.find(selector)
            except _receipt_errors() as exc:
                raise CliError(str(exc)) from exc
            latest = reader.latest_checkpoint()
            if latest is not None and latest[0] > row.seq:
                raise CliError(str(first)) from first
    # Not covered by a checkpoint yet: sign one, if no running agent holds the log.
    try:
        log = ctx.open_log()
    except CliError as exc:
        if isinstance(exc.__cause__, LogBusy):
            raise CliError(f"entry {selector} is not covered by a checkpoint yet and a running agent holds the "
                           "log; retry after its next checkpoint") from exc
        raise
    try:
        return log.proof(row.seq)
    finally:
        log.close()


def _export(args: argparse.Namespace) -> int:
    from nodeagent.fsutil import atomic_write_text
    from nodeagent.receipts import LogBusy
    from nodeagent.receipts.export import export_log

    ctx = _Context(args)
    if args.receipt is not None:
        if args.dest.exists():
            raise CliError(f"{args.dest} exists; choose a new file name for the proof")
        proof = _proof(ctx, args.receipt)
        try:
            atomic_write_text(args.dest, json.dumps(proof.to_wire(), indent=2) + "\n")
        except OSError as exc:
            raise _cannot_write(args.dest, exc) from exc
        emit({"path": str(args.dest), "seq": proof.entry.seq, "treeSize": proof.tree_size}, args.format,
             lambda d: f"wrote the proof of receipt {d['seq']} (tree size {d['treeSize']}) to {d['path']}")
        return 0
    try:
        log = ctx.open_log()
    except CliError as exc:
        if not isinstance(exc.__cause__, LogBusy):
            raise
        print("agent-machine: receipts: a running agent holds the log; exporting up to its latest checkpoint",
              file=sys.stderr)
    else:
        try:
            if log.size:
                log.checkpoint()
        finally:
            log.close()
    try:
        summary = export_log(ctx.log_dir, args.dest)
    except _receipt_errors() as exc:
        raise CliError(str(exc)) from exc
    except OSError as exc:
        raise _cannot_write(args.dest, exc) from exc
    emit(summary.to_dict(), args.format, lambda d: (
        f"exported {d['entries']} entries, {d['checkpoints']} checkpoints (latest covers {d['latestCheckpoint']}), "
        f"{d['keys']} public keys to {d['path']}\nverify with: agent-machine receipts verify {d['path']} --key KEY.pem"))
    return 0


def _cannot_write(dest: Path, exc: OSError) -> CliError:
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(dest) else ""
    return CliError(f"cannot write the export to {dest}{where}: {exc.strerror or exc}; "
                    "choose a writable place for DEST")


def _verify(args: argparse.Namespace) -> int:
    from nodeagent.receipts.keys import PublicKey
    from nodeagent.receipts.verify import verify_bundle, verify_proof

    path = args.path
    if path is None:
        path = _Context(args).log_dir
    try:
        anchors = {key.key_id: key for key in (PublicKey.load(p) for p in args.key)}
        extra = [(str(p), p.read_text(encoding="utf-8")) for p in args.checkpoint]
        if path.is_file():
            if args.receipt is not None:
                raise CliError("--receipt applies to a log or export directory; a proof file holds one receipt")
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise CliError(f"{path} is not a ReceiptProof JSON file: {exc}") from exc
            report = verify_proof(document, anchors or None)
        elif path.is_dir():
            if args.format == "table" and sys.stderr.isatty():
                print(f"verifying {path} …", file=sys.stderr)
            jobs = args.jobs if args.jobs > 0 else (os.cpu_count() or 1)
            report = verify_bundle(path, anchors or None, extra_checkpoints=extra, receipt=args.receipt, jobs=jobs)
        else:
            raise CliError(f"{path} does not exist")
    except OSError as exc:
        raise CliError(f"{exc.filename}: {exc.strerror}") from exc
    except ValueError as exc:  # a malformed proof document (pydantic names the field)
        raise CliError(f"{path}: {exc}") from exc
    except _receipt_errors() as exc:
        raise CliError(str(exc)) from exc
    if args.format == "json":
        print_json(report.to_dict())
    else:
        print(_verify_table(path, report))
    return 0 if report.ok else 1


def _verify_table(path: Path, report: Any) -> str:
    lines = [f"{'OK' if report.ok else 'FAILED'}: {path}",
             f"  entries {report.entries} (receipts {report.receipts}, key rotations {report.rotations}), "
             f"covered by checkpoints: {report.covered}",
             f"  origin {report.origin}; trusted keys: {', '.join(k[:16] + '…' for k in report.trusted_keys) or '-'}"]
    if report.inclusion:
        inc = report.inclusion
        lines.append(f"  receipt {inc['seq']} ({inc['receiptId'][:16]}…): inclusion in tree of {inc['treeSize']} "
                     f"{'verified' if inc['verified'] else 'NOT verified'}")
    for warning in report.warnings:
        lines.append(f"  warning: {warning}")
    for failure in report.failures[:50]:
        lines.append(f"  FAIL {failure}")
    if len(report.failures) > 50:
        lines.append(f"  … and {len(report.failures) - 50} more failures (use --format json for all)")
    return "\n".join(lines)


def _checkpoint(args: argparse.Namespace) -> int:
    ctx = _Context(args)
    log = ctx.open_log()
    try:
        if log.size == 0:
            raise CliError("the receipt log is empty: nothing to checkpoint")
        size, note = log.checkpoint()
        proof = None
        if args.from_size is not None:
            if not 0 <= args.from_size <= size:
                raise CliError(f"--from-size must be between 0 and {size}")
            proof = [p.hex() for p in log.consistency_proof(args.from_size, size)]
    finally:
        log.close()
    data = {"size": size, "checkpoint": note, "fromSize": args.from_size, "consistencyProof": proof}
    emit(data, args.format, lambda d: d["checkpoint"].rstrip() + (
        f"\n\nconsistency proof from size {d['fromSize']}:\n" + "\n".join(d["consistencyProof"])
        if d["consistencyProof"] is not None else ""))
    return 0

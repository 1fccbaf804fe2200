"""`agent-machine grants|activate|wipe|teardown|evidence`: the node's governance surface (docs/governance.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from nodeagent.cli.output import CliError, add_format_option, add_group, emit, print_json, render_table

GRANTS_EPILOG = """\
examples:
  agent-machine grants issue --tenant acme --agent coder --model smollm2 --ttl 7d --out acme-coder.grant
  agent-machine grants issue --tenant acme --agent coder --model '*' --cache-write private --install
  agent-machine grants verify acme-coder.grant                 signature, expiry, revocation
  agent-machine grants verify acme-coder.grant --pod pod.json  and whether it covers the pod
  agent-machine grants ls --format json                        installed grants and their state
  agent-machine grants revoke grant-5f1c0a9d2b7e4c11 --reason "agent retired"
  agent-machine grants rm grant-5f1c0a9d2b7e4c11              uninstall it from this node
"""

ACTIVATE_EPILOG = """\
examples:
  agent-machine activate evaluate pod.json                  the decision the node would make (exit 1: denied)
  agent-machine activate evaluate pod.json --grant acme.grant --format json
"""

WIPE_EPILOG = """\
examples:
  agent-machine wipe --tenant acme --yes                    every state and text of tenant acme
  agent-machine wipe --tenant acme --agent coder --yes      only agent coder's private states and its pods' texts
Run it with the daemon stopped (it holds the receipt log); the daemon's own Node.wipe_tenant
also erases live provider contexts (T0).
"""

TEARDOWN_EPILOG = """\
examples:
  agent-machine teardown --yes             stop and remove every provider `providers up` started, with a receipt
"""

EVIDENCE_EPILOG = """\
examples:
  agent-machine evidence bundle /tmp/evidence            profile, storage receipts, decisions, the log, versions
  agent-machine key show > node.pub.txt                  the machine key (PEM) for the verifier
  agent-machine evidence verify /tmp/evidence --key node.pub.pem
  python -c 'import securesystemslib'                    bundle.dsse and each .jsonl line are DSSE envelopes too
"""


def _fmt(parser: argparse.ArgumentParser, epilog: str | None = None) -> None:
    add_format_option(parser)
    if epilog:
        parser.epilog = epilog
        parser.formatter_class = argparse.RawDescriptionHelpFormatter


def register(subparsers: Any) -> None:
    grants = add_group(subparsers, "grants", "signed grants: what an agent may do on this node")
    issue = grants.add_parser("issue", help="issue a grant (signed by the node's admin key or --key)",
                              description="Issue an AgentRegistryGrant: a DSSE envelope signed with Ed25519.")
    _fmt(issue, GRANTS_EPILOG)
    issue.add_argument("--tenant", required=True)
    issue.add_argument("--agent", required=True)
    issue.add_argument("--session", help="only this session (default: any)")
    issue.add_argument("--model", action="append", required=True, metavar="REF",
                       help="a model name, name:tag, sha256:digest or '*' (repeat)")
    issue.add_argument("--provider", action="append", metavar="NAME", help="provider names or kinds (default: any)")
    issue.add_argument("--cache-read", action="append", choices=("private", "tenant", "public"))
    issue.add_argument("--cache-write", action="append", choices=("private", "tenant", "public"))
    issue.add_argument("--max-context", type=int, metavar="TOKENS")
    issue.add_argument("--share-public-cache", action="store_true")
    issue.add_argument("--ttl", default="1d", help="validity: 30m, 12h, 7d (default 1d)")
    issue.add_argument("--issuer", default="node-admin")
    issue.add_argument("--key", metavar="FILE", help="issuer private key (default: the node's admin grant key)")
    issue.add_argument("--out", metavar="FILE", help="write the envelope here (default: stdout)")
    issue.add_argument("--install", action="store_true", help="also install it on this node")
    issue.set_defaults(func=_issue)

    verify = grants.add_parser("verify", help="verify a grant: signature, expiry, revocation, and a pod")
    _fmt(verify, GRANTS_EPILOG)
    verify.add_argument("file", help="the grant (envelope JSON or its base64), '-' for stdin")
    verify.add_argument("--pod", metavar="FILE", help="also check that it covers this pod (JSON or TOML)")
    verify.add_argument("--key", action="append", metavar="PEM", help="trust this issuer key (default: the node's)")
    verify.set_defaults(func=_verify)

    ls = grants.add_parser("ls", help="installed grants and whether each still verifies")
    _fmt(ls, GRANTS_EPILOG)
    ls.set_defaults(func=_ls)

    install = grants.add_parser("install", help="verify a grant and install it on this node")
    _fmt(install)
    install.add_argument("file")
    install.set_defaults(func=_install)

    rm = grants.add_parser("rm", help="uninstall a grant from this node (revoke it to refuse it everywhere)")
    _fmt(rm, GRANTS_EPILOG)
    rm.add_argument("grant_id")
    rm.set_defaults(func=_rm)

    revoke = grants.add_parser("revoke", help="add a grant id to the configured revocation file")
    _fmt(revoke, GRANTS_EPILOG)
    revoke.add_argument("grant_id")
    revoke.add_argument("--reason", default="")
    revoke.set_defaults(func=_revoke)

    activate = add_group(subparsers, "activate", "activation decisions: may this pod run here")
    evaluate = activate.add_parser("evaluate", help="the activation decision for a pod (dry run)",
                                   description="Evaluate policy, grant, storage evidence and the plan's "
                                   "preconditions for POD and print the decision; nothing runs, nothing is "
                                   "logged. Exit 1 when denied.")
    _fmt(evaluate, ACTIVATE_EPILOG)
    evaluate.add_argument("pod", help="the pod (JSON or TOML), '-' for stdin")
    evaluate.add_argument("--grant", metavar="FILE")
    evaluate.set_defaults(func=_evaluate)

    wipe = subparsers.add_parser("wipe", help="remove a tenant's KV states and texts, with a signed receipt",
                                 description="Delete a tenant's (or agent's) private and tenant-scoped KV "
                                 "states in T1 and T2, its segment texts and its pods' texts (digests and "
                                 "receipts kept), scrub the state database, and sign a wipe receipt.")
    _fmt(wipe, WIPE_EPILOG)
    wipe.add_argument("--tenant", required=True)
    wipe.add_argument("--agent")
    wipe.add_argument("--yes", action="store_true", help="do it (without: say what would be wiped)")
    wipe.set_defaults(func=_wipe)

    teardown = subparsers.add_parser("teardown", help="stop and remove every provider the node started")
    _fmt(teardown, TEARDOWN_EPILOG)
    teardown.add_argument("--yes", action="store_true", help="do it (without: list what would stop)")
    teardown.set_defaults(func=_teardown)

    evidence = add_group(subparsers, "evidence", "evidence bundles a verifier can check offline")
    bundle = evidence.add_parser("bundle", help="write an evidence bundle to DIR")
    _fmt(bundle, EVIDENCE_EPILOG)
    bundle.add_argument("dir")
    bundle.set_defaults(func=_bundle)
    check = evidence.add_parser("verify", help="verify an evidence bundle with the machine key (exit 1 on failure)")
    _fmt(check, EVIDENCE_EPILOG)
    check.add_argument("dir")
    check.add_argument("--key", action="append", required=True, metavar="PEM", help="the machine's public key")
    check.set_defaults(func=_verify_bundle)


# ------------------------------------------------------------------ helpers
def _loaded():
    from nodeagent.config import ConfigError, load_config
    try:
        return load_config()
    except ConfigError as exc:
        raise CliError(str(exc), exit_code=2) from exc


def _ttl(text: str):
    from datetime import timedelta
    units = {"m": 60, "h": 3600, "d": 86400}
    try:
        value, unit = int(text[:-1]), text[-1]
        if unit not in units or value <= 0:
            raise ValueError
    except (ValueError, IndexError):
        raise CliError(f"--ttl {text!r}: use a positive number with m, h or d (e.g. 12h, 7d)", exit_code=2) from None
    return timedelta(seconds=value * units[unit])


def _read(path: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _activation(loaded):
    from nodeagent.governance.activation import activation_for
    from nodeagent.node import Node
    node = Node(loaded)
    return node, activation_for(node)


def _grant_row(grant: dict) -> str:
    return render_table(("field", "value"), [
        ("id", grant["id"]), ("issuer", grant["issuer"]), ("subject", f"{grant['subject']['tenant']}/"
                                                                     f"{grant['subject']['agent']}"),
        ("session", grant["subject"]["session"] or "any"), ("expires", grant["expiresAt"]),
        ("models", ", ".join(grant["scopes"]["models"])), ("providers", ", ".join(grant["scopes"]["providers"])),
        ("cache read", ", ".join(grant["scopes"]["cacheRead"])), ("cache write", ", ".join(grant["scopes"]["cacheWrite"])),
        ("max context", grant["scopes"]["maxContext"] or "-"), ("share public", grant["scopes"]["sharePublicCache"]),
    ])


# ------------------------------------------------------------------ grants
def _issue(args: argparse.Namespace) -> int:
    from nodeagent.fsutil import atomic_write_bytes
    from nodeagent.governance.grants import CACHE_SCOPES, GrantError, GrantStore, admin_signer, issue_grant
    from nodeagent.receipts.errors import KeyFileError
    from nodeagent.receipts.keys import read_private_key

    loaded = _loaded()
    try:
        signer = read_private_key(args.key) if args.key else admin_signer(
            loaded.paths.state_dir, loaded.config.governance.admin_key_file)
        grant, line = issue_grant(
            signer, issuer=args.issuer, tenant=args.tenant, agent=args.agent, session=args.session,
            models=args.model, providers=args.provider or ["*"], cache_read=args.cache_read or list(CACHE_SCOPES),
            cache_write=args.cache_write or ["private", "tenant"], max_context=args.max_context,
            share_public_cache=args.share_public_cache, ttl=_ttl(args.ttl))
    except (GrantError, KeyFileError) as exc:
        raise CliError(str(exc), exit_code=2) from exc
    if args.out:
        atomic_write_bytes(Path(args.out), line + b"\n", mode=0o600)
    if args.install:
        GrantStore(loaded.paths.state_dir).install(grant)
    if not args.out:
        print(line.decode())
    elif args.format == "json":
        print_json(grant.summary())
    else:
        print(f"issued {grant.id} for {grant.tenant}/{grant.agent}, expires {grant.summary()['expiresAt']}"
              f" -> {args.out}{' (installed)' if args.install else ''}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from nodeagent.governance.grants import GrantError, RevocationList, read_grant_text, verify_grant
    from nodeagent.receipts.keys import PublicKey

    loaded = _loaded()
    node, activation = _activation(loaded)
    try:
        line = read_grant_text(_read(args.file))
        keys = ({k.key_id: k for k in (PublicKey.load(p) for p in args.key)} if args.key
                else activation.issuer_keys())
        grant = verify_grant(line, keys, revocations=RevocationList(loaded.config.governance.revocation_file))
    except GrantError as exc:
        emit({"valid": False, "check": exc.check, "reason": exc.detail}, args.format,
             lambda r: f"refused: {r['check']}: {r['reason']}")
        return 1
    refusals: list[str] = []
    if args.pod:
        from nodeagent.cli.pods import _read_pod
        pod = _read_pod(args.pod)
        record = None
        try:
            record = activation.models.resolve(pod.spec.model.digest or pod.spec.model.name)
        except Exception:
            pass
        refusals = grant.refusals(pod, model_names=record.names if record else [],
                                  model_digest=record.digest if record else None)
    result = {"valid": not refusals, "grant": grant.summary(), "refusals": refusals}
    emit(result, args.format, lambda r: _grant_row(r["grant"]) + "\n" + (
        "covers the pod" if args.pod and not refusals else "\n".join(f"refused: {x}" for x in refusals)
        if refusals else "valid"))
    return 0 if not refusals else 1


def _ls(args: argparse.Namespace) -> int:
    from nodeagent.governance.grants import GrantError

    loaded = _loaded()
    _node, activation = _activation(loaded)
    rows = []
    for grant_id, line in activation.grants.lines():
        try:
            grant = activation.verify(line)
            rows.append({"id": grant_id, "state": "valid", "tenant": grant.tenant, "agent": grant.agent,
                         "expiresAt": grant.summary()["expiresAt"], "models": list(grant.scopes.models),
                         "reason": None})
        except GrantError as exc:
            rows.append({"id": grant_id, "state": exc.check, "tenant": None, "agent": None, "expiresAt": None,
                         "models": [], "reason": exc.detail})
    if args.format == "json":
        print_json(rows)
    elif not rows:
        print("no grants installed (agent-machine grants issue --install, or grants install FILE)")
    else:
        print(render_table(("id", "state", "tenant", "agent", "expires", "models", "reason"),
                           [(r["id"], r["state"], r["tenant"] or "-", r["agent"] or "-", r["expiresAt"] or "-",
                             ",".join(r["models"]) or "-", r["reason"] or "") for r in rows]))
    return 0


def _install(args: argparse.Namespace) -> int:
    from nodeagent.governance.grants import GrantError, read_grant_text

    loaded = _loaded()
    _node, activation = _activation(loaded)
    try:
        grant = activation.verify(read_grant_text(_read(args.file)))
    except GrantError as exc:
        raise CliError(f"{args.file}: refused: {exc}") from exc
    path = activation.grants.install(grant)
    emit({"installed": grant.id, "path": str(path)}, args.format, lambda r: f"installed {r['installed']} ({r['path']})")
    return 0


def _rm(args: argparse.Namespace) -> int:
    from nodeagent.governance.grants import GrantStore

    loaded = _loaded()
    if not GrantStore(loaded.paths.state_dir).remove(args.grant_id):
        raise CliError(f"no installed grant {args.grant_id!r} (agent-machine grants ls)")
    emit({"removed": args.grant_id}, args.format, lambda r: f"uninstalled {r['removed']}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from nodeagent.governance.grants import RevocationList

    loaded = _loaded()
    path = loaded.config.governance.revocation_file
    if not path:
        raise CliError("no revocation file: set [governance] revocation_file in the config first", exit_code=2)
    RevocationList.add(path, args.grant_id, args.reason)
    emit({"revoked": args.grant_id, "file": path}, args.format, lambda r: f"revoked {r['revoked']} (in {r['file']})")
    return 0


# ------------------------------------------------------------------ activation
def _decision_table(body: dict) -> str:
    head = f"{body['subject']['kind']} {body['subject']['name']}: {body['verdict'].upper()}"
    rows = [(p["name"], "ok" if p["ok"] else "LACKING", p["detail"]) for p in body["preconditions"]]
    return head + "\n" + render_table(("precondition", "state", "detail"), rows)


def _evaluate(args: argparse.Namespace) -> int:
    from nodeagent.cli.pods import _read_pod
    from nodeagent.governance.grants import read_grant_text

    loaded = _loaded()
    _node, activation = _activation(loaded)
    pod = _read_pod(args.pod)
    grant_line = read_grant_text(_read(args.grant)) if args.grant else None
    try:
        record = activation.models.resolve(pod.spec.model.digest or pod.spec.model.name)
    except Exception:
        record = None
    decision = activation.evaluate_pod(pod, record, grant_line=grant_line, record_storage=False)
    emit(decision.body(), args.format, _decision_table)
    return 0 if decision.allowed else 1


# ------------------------------------------------------------------ wipe and teardown
def _open_log(loaded):
    from nodeagent.receipts import LogBusy, open_machine_log
    cfg = loaded.config.receipts
    try:
        return open_machine_log(loaded.paths.state_dir, key_file=cfg.key_file, checkpoint_every=cfg.checkpoint_every,
                                checkpoint_seconds=cfg.checkpoint_seconds)
    except LogBusy as exc:
        raise CliError(f"{exc}: the daemon is running; stop it first (systemctl --user stop agent-machine) — "
                       "its providers and their contexts stop with it") from exc


def _wipe(args: argparse.Namespace) -> int:
    from nodeagent.governance.wipe import wipe_tenant
    from nodeagent.kvcache.manager import open_from_config
    from nodeagent.node import Node

    import re

    from nodeagent.contracts.names import RESOURCE_NAME
    for flag, value in (("--tenant", args.tenant), ("--agent", args.agent)):
        if value is not None and not re.match(RESOURCE_NAME, value):
            raise CliError(f"{flag} {value!r}: not a tenant/agent name (lowercase letters, digits, '-', '_', '.')",
                           exit_code=2)
    loaded = _loaded()
    cache = open_from_config(loaded)
    if not args.yes:
        entries = [e for e in cache.entries(tenant=args.tenant)
                   if args.agent is None or e.owner == f"{args.tenant}/{args.agent}"]
        emit({"tenant": args.tenant, "agent": args.agent, "kvEntries": len(entries), "dryRun": True}, args.format,
             lambda r: f"would wipe {r['kvEntries']} KV entries of {r['tenant']}"
                       f"{'/' + r['agent'] if r['agent'] else ''}, its segment and pod texts; add --yes to do it")
        return 0
    log = _open_log(loaded)
    node = Node(loaded)
    try:
        report = wipe_tenant(conn=node.db, lock=node._db_lock, cache=cache, receipts=log, pool=None,
                             tenant=args.tenant, agent=args.agent)
    finally:
        log.close()
    emit(report.to_wire(), args.format, lambda r: (
        f"wiped {r['tenant']}{'/' + r['agent'] if r['agent'] else ''}: {len(r['kvEntries'])} KV entries, "
        f"{len(r['segments'])} segment texts, {len(r['pods'])} pods' texts, {r['turnOutputs']} turn outputs; "
        f"database scrubbed ({'WAL truncated' if r['scrub'].get('walTruncated') else 'WAL busy: run again'}); "
        f"receipt {r['receiptId']}"))
    return 0


def _teardown(args: argparse.Namespace) -> int:
    from nodeagent.governance.teardown import teardown
    from nodeagent.launch.registry import Registry

    loaded = _loaded()
    registry = Registry(loaded.paths.state_dir / "providers")
    if not args.yes:
        names = [r.spec.name for r in registry.all()]
        emit({"wouldStop": names, "dryRun": True}, args.format,
             lambda r: ("would stop and remove: " + ", ".join(r["wouldStop"]) if r["wouldStop"]
                        else "no providers started here") + "; add --yes to do it")
        return 0
    log = _open_log(loaded)
    try:
        report = teardown(pool=None, registry=registry, receipts=log)
    finally:
        log.close()
    emit(report.to_wire(), args.format, lambda r: (
        render_table(("provider", "mode", "result"),
                     [(s["provider"], s["mode"], s["action"]) for s in r["stopped"]]
                     + [(f["provider"], f["mode"], "FAILED: " + f["error"]) for f in r["failed"]])
        if r["stopped"] or r["failed"] else "no providers to stop") + f"\nreceipt {r['receiptId']}")
    return 1 if report.failed else 0


# ------------------------------------------------------------------ evidence
def _bundle(args: argparse.Namespace) -> int:
    from nodeagent.governance.bundle import EvidenceError, build_bundle
    from nodeagent.node import Node
    from nodeagent.receipts import LogBusy, load_signer, open_machine_log, receipts_dir, resolve_key_source
    from nodeagent.receipts.errors import ReceiptError

    loaded = _loaded()
    state = loaded.paths.state_dir
    try:  # checkpoint first, so the export is covered; a running daemon checkpoints on its own
        log = open_machine_log(state, key_file=loaded.config.receipts.key_file)
        log.checkpoint()
        log.close()
    except LogBusy:
        pass
    node = Node(loaded)
    try:
        signer = load_signer(resolve_key_source(state, loaded.config.receipts.key_file), create=False)
        summary = build_bundle(Path(args.dir), signer=signer, receipts_dir=receipts_dir(state),
                               profile=node.machine().to_wire(), config_file=loaded.file, config=loaded.config)
    except (EvidenceError, ReceiptError) as exc:
        raise CliError(str(exc)) from exc
    emit(summary, args.format, lambda s: f"evidence bundle {s['path']}: {s['files']} files, {s['entries']} log "
                                         f"entries, {s['storageReceipts']} storage receipts, "
                                         f"{s['activationDecisions']} activation decisions, signed by "
                                         f"{s['keyId'][:16]}…")
    return 0


def _verify_bundle(args: argparse.Namespace) -> int:
    from nodeagent.governance.bundle import verify_evidence
    from nodeagent.receipts.errors import KeyFileError
    from nodeagent.receipts.keys import PublicKey

    try:
        keys = {k.key_id: k for k in (PublicKey.load(p) for p in args.key)}
    except KeyFileError as exc:
        raise CliError(str(exc), exit_code=2) from exc
    report = verify_evidence(Path(args.dir), keys)
    emit(report.to_dict(), args.format, lambda r: ("OK" if r["ok"] else "FAILED") +
         f": {r['files']} files, {r['entries']} log entries, {r['storageReceipts']} storage receipts, "
         f"{r['activationDecisions']} activation decisions" +
         "".join(f"\n  {f}" for f in r["failures"]) + "".join(f"\n  warning: {w}" for w in r["warnings"]))
    return 0 if report.ok else 1

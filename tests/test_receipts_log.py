"""The receipt log: durability, group commit, tamper evidence, truncation, crash repair, key rotation."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timezone

import pytest

from nodeagent.receipts import (
    KeyMismatch,
    LogBusy,
    LogClosed,
    LogCorrupt,
    LogReader,
    ReceiptLog,
    Signer,
    open_machine_log,
    verify_bundle,
    verify_proof,
)
from nodeagent.receipts.canonical import canonical_json
from nodeagent.receipts.dsse import parse_envelope, sign_envelope
from nodeagent.receipts.entry import build_execution_line
from nodeagent.receipts.errors import KeyFileError
from nodeagent.receipts.export import export_log
from nodeagent.receipts.keys import CREDENTIAL_NAME, load_signer, resolve_key_source
from nodeagent.receipts.log import TEST_PAUSE_ENV
from nodeagent.receipts.machine import receipts_dir, rotate_machine_key
from nodeagent.receipts.samples import STATUSES, sample_input


def keys_of(*signers):
    return {s.key_id: s.public for s in signers}


def fill(log, start, count):
    return [log.append(sample_input(i, STATUSES[i % 4])) for i in range(start, start + count)]


def checks(report, seq=None):
    return {f.check for f in report.failures if seq is None or f.seq == seq}


@pytest.fixture
def signer():
    return Signer.generate()


@pytest.fixture
def logdir(tmp_path):
    return tmp_path / "receipts"


# ------------------------------------------------------------------ basics
def test_append_is_sequential_chained_and_verifies(logdir, signer):
    with ReceiptLog(logdir, signer, checkpoint_every=4) as log:
        appended = fill(log, 0, 10)
        assert [a.seq for a in appended] == list(range(10))
        assert log.size == 10
        first = json.loads(parse_envelope(appended[1].line).payload)["predicate"]["log"]
        assert first == {"seq": 1, "previousLeafHash": appended[0].receipt_id}
    lines = (logdir / "receipts.jsonl").read_bytes().split(b"\n")
    assert lines[:10] == [a.line for a in appended] and lines[10] == b""
    # every 4 entries, and on close
    assert sorted(p.name for p in (logdir / "checkpoints").iterdir()) == [
        "0000000000000004.note", "0000000000000008.note", "0000000000000010.note"]
    report = verify_bundle(logdir, keys_of(signer))
    assert report.ok, report.failures
    assert (report.entries, report.receipts, report.covered, report.warnings) == (10, 10, 10, [])

    with ReceiptLog(logdir, signer) as log:  # reopening continues the chain
        assert not log.recovery.repaired
        more = fill(log, 10, 3)
        assert more[0].seq == 10
    assert verify_bundle(logdir, keys_of(signer)).ok


def test_concurrent_appenders_share_fsyncs(logdir, signer, monkeypatch):
    syncs = []
    real = os.fdatasync

    def slow_fdatasync(fd):  # a disk as slow as a busy one makes the batching deterministic
        syncs.append(fd)
        time.sleep(0.003)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow_fdatasync)
    results, threads = [], []
    with ReceiptLog(logdir, signer, checkpoint_every=1000) as log:
        def worker(k):
            for i in range(25):
                results.append(log.append(sample_input(k * 100 + i)))
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert log.size == 200
    assert sorted(r.seq for r in results) == list(range(200))
    assert len(syncs) < 100, f"{len(syncs)} fsyncs for 200 appends: no group commit"
    assert verify_bundle(logdir, keys_of(signer)).ok


def test_one_fsync_per_receipt_without_group_commit(logdir, signer, monkeypatch):
    syncs = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))
    with ReceiptLog(logdir, signer, group_commit=False, checkpoint_every=1000) as log:
        fill(log, 0, 20)
    assert len(syncs) == 20
    assert verify_bundle(logdir, keys_of(signer)).ok


def test_second_writer_is_refused(logdir, signer):
    with ReceiptLog(logdir, signer):
        with pytest.raises(LogBusy):
            ReceiptLog(logdir, signer)


def test_closed_log_refuses_appends(logdir, signer):
    log = ReceiptLog(logdir, signer)
    log.close()
    with pytest.raises(LogClosed):
        log.append(sample_input(0))


def _wait_for(path, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return path.exists()


def test_time_based_checkpoints_come_without_further_appends(logdir, signer):
    with ReceiptLog(logdir, signer, checkpoint_every=1000, checkpoint_seconds=0.2) as log:
        fill(log, 0, 2)
        assert _wait_for(logdir / "checkpoints" / "0000000000000002.note")
        log.append(sample_input(2))
        assert _wait_for(logdir / "checkpoints" / "0000000000000003.note")


def test_on_demand_checkpoint(logdir, signer):
    with ReceiptLog(logdir, signer, checkpoint_every=1000, checkpoint_seconds=3600) as log:
        fill(log, 0, 4)
        assert not list((logdir / "checkpoints").iterdir())
        size, note = log.checkpoint()
        assert size == 4 and note.split("\n")[1] == "4"
        assert not log.maybe_checkpoint()  # nothing new, interval not reached
        assert log.checkpoint() == (size, note)  # nothing new: the same checkpoint


# ------------------------------------------------------------------ tampering
def _export(tmp_path, signer, count=6):
    source = tmp_path / "source"
    with ReceiptLog(source, signer, checkpoint_every=3) as log:
        for i in range(count):  # all succeeded: every section of the predicate is filled
            log.append(sample_input(i))
    out = tmp_path / "export"
    export_log(source, out)
    return out


def _leaf_paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaf_paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _leaf_paths(value, prefix + (index,))
    else:
        yield prefix


def _statement_of(line):
    return json.loads(parse_envelope(line).payload)


STATEMENT_FIELDS = sorted(_leaf_paths(_statement_of(
    build_execution_line(sample_input(3), seq=3, previous=b"\x00" * 32, signer=Signer.generate()))), key=str)


def _changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if value is None:
        return "x"
    return value[:-1] + ("0" if value[-1] != "0" else "1")


def _set(node, path, value):
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value


def _rewrite(path, seq, mutate):
    lines = path.read_bytes().split(b"\n")
    lines[seq] = mutate(lines[seq])
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize("field", STATEMENT_FIELDS, ids=lambda p: ".".join(map(str, p)))
def test_tampering_any_statement_field_fails_signature_at_that_receipt(tmp_path, signer, field):
    export = _export(tmp_path, signer)

    def mutate(line):
        envelope = json.loads(line)
        statement = json.loads(base64.b64decode(envelope["payload"]))
        node = statement
        for part in field:
            node = node[part]
        _set(statement, field, _changed(node))
        envelope["payload"] = base64.b64encode(canonical_json(statement)).decode()
        return canonical_json(envelope)

    _rewrite(export / "receipts.jsonl", 3, mutate)
    report = verify_bundle(export, keys_of(signer))
    assert not report.ok
    # The signature fails at the altered receipt; the checkpoint over it no longer matches, and
    # the mismatch is narrowed to the entries after the last checkpoint that agrees (3..5).
    assert checks(report, 3) == {"signature", "merkle-root"}, report.failures
    assert "chain-prev" in checks(report, 4)  # the next entry still names the original
    assert report.inclusion is None


@pytest.mark.parametrize("mutate,expected", [
    (lambda e: e.update(payloadType="application/json"), "payload-type"),
    (lambda e: e["signatures"][0].update(keyid="0" * 64), "signature"),
    (lambda e: e["signatures"][0].update(sig=base64.b64encode(bytes(64)).decode()), "signature"),
    (lambda e: e["signatures"].clear(), "envelope"),
    (lambda e: e.update(extra=1), "envelope"),
    (lambda e: e.update(payload="%%%"), "base64"),
])
def test_tampering_envelope_fields_is_named(tmp_path, signer, mutate, expected):
    export = _export(tmp_path, signer)

    def change(line):
        envelope = json.loads(line)
        mutate(envelope)
        return json.dumps(envelope).encode()

    _rewrite(export / "receipts.jsonl", 2, change)
    report = verify_bundle(export, keys_of(signer))
    assert checks(report, 2) == {expected}, report.failures


def _resign(line, signer, change):
    statement = _statement_of(line)
    change(statement)
    return sign_envelope(canonical_json(statement), "application/vnd.in-toto+json", [signer])


@pytest.mark.parametrize("change,expected", [
    (lambda s: s["predicate"]["log"].update(seq=7), "chain-seq"),
    (lambda s: s["predicate"]["log"].update(previousLeafHash="ab" * 32), "chain-prev"),
    (lambda s: s["predicate"]["machine"].update(keyId="cd" * 32), "key-id"),
    (lambda s: s["subject"][0]["digest"].update(sha256="ef" * 32), "subject"),
    (lambda s: s["predicate"]["usage"].update(promptTokens=1.5), "statement"),
    (lambda s: s["predicate"]["outcome"].update(status="exploded"), "statement"),
    (lambda s: s.update(predicateType="https://example.com/other/v1"), "statement"),
])
def test_entries_re_signed_by_the_machine_key_still_fail_their_check(tmp_path, signer, change, expected):
    """An insider holding the key can sign anything; the chain and schema checks still catch it."""
    export = _export(tmp_path, signer)
    _rewrite(export / "receipts.jsonl", 4, lambda line: _resign(line, signer, change))
    report = verify_bundle(export, keys_of(signer))
    assert expected in checks(report, 4), report.failures
    if expected == "statement":
        assert any("predicate" in f.detail or "predicateType" in f.detail for f in report.failures if f.seq == 4)


def test_statement_failure_names_the_field(tmp_path, signer):
    export = _export(tmp_path, signer)
    _rewrite(export / "receipts.jsonl", 1,
             lambda line: _resign(line, signer, lambda s: s["predicate"]["usage"].update(promptTokens=1.5)))
    report = verify_bundle(export, keys_of(signer))
    detail = [f.detail for f in report.failures if f.seq == 1 and f.check == "statement"][0]
    assert detail.startswith("predicate.usage.promptTokens:")


def test_gap_duplicate_and_reorder_are_detected(tmp_path, signer):
    export = _export(tmp_path, signer, count=6)
    original = (export / "receipts.jsonl").read_bytes()
    lines = original.split(b"\n")[:-1]

    def verify(new_lines):
        (export / "receipts.jsonl").write_bytes(b"\n".join(new_lines) + b"\n")
        (export / "manifest.json").unlink(missing_ok=True)
        return verify_bundle(export, keys_of(signer))

    gap = verify(lines[:2] + lines[3:])
    assert any(f.check == "chain-seq" and f.seq == 2 and "missing" in f.detail for f in gap.failures)
    duplicate = verify(lines[:3] + lines[2:])
    assert "chain-seq" in checks(duplicate, 3)
    swapped = verify(lines[:1] + [lines[2], lines[1]] + lines[3:])
    assert {"chain-seq", "chain-prev"} <= checks(swapped, 1)


def test_whitespace_change_keeps_signature_but_breaks_chain_and_root(tmp_path, signer):
    export = _export(tmp_path, signer)
    _rewrite(export / "receipts.jsonl", 2, lambda line: json.dumps(json.loads(line), indent=None).encode())
    report = verify_bundle(export, keys_of(signer))
    assert checks(report, 2) == set()
    assert "chain-prev" in checks(report, 3) and "merkle-root" in checks(report)
    assert "manifest" in checks(report)


def test_untrusted_key_fails_every_entry(tmp_path, signer):
    export = _export(tmp_path, signer)
    report = verify_bundle(export, keys_of(Signer.generate()))
    assert all("signature" in checks(report, seq) for seq in range(6))
    assert "checkpoint-signature" in checks(report)


# ------------------------------------------------------------------ truncation
def test_truncation_is_detected_against_a_checkpoint(tmp_path, signer):
    export = _export(tmp_path, signer, count=9)
    lines = (export / "receipts.jsonl").read_bytes().split(b"\n")[:-1]
    (export / "receipts.jsonl").write_bytes(b"\n".join(lines[:7]) + b"\n")
    report = verify_bundle(export, keys_of(signer))
    truncation = [f for f in report.failures if f.check == "truncation"]
    assert truncation and truncation[0].seq == 7 and "entries 7..8 are missing" in truncation[0].detail
    # Without the checkpoints the same file verifies: a local chain alone cannot see truncation.
    shutil.rmtree(export / "checkpoints")
    (export / "manifest.json").unlink()
    report = verify_bundle(export, keys_of(signer))
    assert report.ok and "truncation of the log cannot be detected" in report.warnings[0]
    # ...but a checkpoint the planner kept elsewhere does.
    kept = sign_note_from(tmp_path / "source")
    report = verify_bundle(export, keys_of(signer), extra_checkpoints=[("planner", kept)])
    assert "truncation" in checks(report)


def sign_note_from(source):
    return sorted((source / "checkpoints").glob("*.note"))[-1].read_text()


def test_a_truncated_log_refuses_to_open(logdir, signer):
    with ReceiptLog(logdir, signer, checkpoint_every=5) as log:
        fill(log, 0, 10)
    data = (logdir / "receipts.jsonl").read_bytes()
    cut = data[: data.index(b"\n", len(data) // 2) + 1]
    (logdir / "receipts.jsonl").write_bytes(cut)
    with pytest.raises(LogCorrupt) as err:
        ReceiptLog(logdir, signer)
    assert err.value.check == "truncation"
    # Even when the index is lost too, the checkpoint catches it.
    for name in ("index.db", "index.db-wal", "index.db-shm"):
        (logdir / name).unlink(missing_ok=True)
    with pytest.raises(LogCorrupt) as err:
        ReceiptLog(logdir, signer)
    assert err.value.check == "truncation" and "missing" in err.value.detail


def test_a_rewritten_line_refuses_to_open(logdir, signer):
    with ReceiptLog(logdir, signer) as log:
        fill(log, 0, 3)
    data = bytearray((logdir / "receipts.jsonl").read_bytes())
    data[-20] ^= 1
    (logdir / "receipts.jsonl").write_bytes(bytes(data))
    with pytest.raises(LogCorrupt) as err:
        ReceiptLog(logdir, signer)
    assert err.value.check == "index" and err.value.seq == 2


# ------------------------------------------------------------------ crash repair (kill -9)
APPENDER = textwrap.dedent("""
    import sys, threading
    from nodeagent.receipts import ReceiptLog
    from nodeagent.receipts.keys import read_private_key
    from nodeagent.receipts.samples import sample_input

    log = ReceiptLog(sys.argv[1], read_private_key(sys.argv[2]), checkpoint_every=int(sys.argv[4]))
    start, threads = log.size, int(sys.argv[3])
    lock = threading.Lock()
    def work(k):
        i = k
        while True:
            a = log.append(sample_input(start + i))
            with lock:
                print(a.seq, a.receipt_id, flush=True)  # acknowledged: durable
            i += threads
    workers = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(threads)]
    [w.start() for w in workers]
    [w.join() for w in workers]
""")


def _spawn(tmp_path, logdir, signer, *, pause=None, threads=1, checkpoint_every=1000):
    key = tmp_path / "key.pem"
    if not key.exists():
        key.write_bytes(signer.private_pem())
        key.chmod(0o600)
    script = tmp_path / "appender.py"
    script.write_text(APPENDER)
    env = dict(os.environ)
    env.pop(TEST_PAUSE_ENV, None)
    if pause:
        env[TEST_PAUSE_ENV] = pause
    return subprocess.Popen([sys.executable, str(script), str(logdir), str(key), str(threads), str(checkpoint_every)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def _wait_paused(proc):
    line = proc.stderr.readline()
    assert line.startswith("paused "), line + proc.stderr.read()
    return int(line.split()[2])


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the appender exited on its own ({proc.returncode}): {err}"
    complete = out.split("\n")[:-1]  # a line cut short by the kill was not acknowledged
    return {int(line.split()[0]): line.split()[1] for line in complete}


def _seed(logdir, signer, count=5):
    with ReceiptLog(logdir, signer) as log:
        fill(log, 0, count)


def test_kill_between_fsync_and_index_is_repaired_on_open(tmp_path, logdir, signer):
    _seed(logdir, signer)
    proc = _spawn(tmp_path, logdir, signer, pause="after-fsync")
    paused_seq = _wait_paused(proc)
    _kill(proc)
    assert paused_seq == 5
    with LogReader(logdir) as reader:
        assert reader.count() == 5 and reader.unindexed_bytes > 0  # the crash left the index behind
    with ReceiptLog(logdir, signer) as log:
        assert log.recovery.indexed_from_log == 1 and log.size == 6
        assert "verified and added to the index" in log.recovery.messages()[0]
    with LogReader(logdir) as reader:
        assert reader.count() == 6 and reader.unindexed_bytes == 0
    assert verify_bundle(logdir, keys_of(signer)).ok


def test_kill_mid_write_quarantines_the_torn_line(tmp_path, logdir, signer):
    _seed(logdir, signer)
    before = (logdir / "receipts.jsonl").read_bytes()
    proc = _spawn(tmp_path, logdir, signer, pause="mid-write")
    _wait_paused(proc)
    live = verify_bundle(logdir, keys_of(signer))  # the writer is alive: an append in progress, not damage
    assert live.ok and "append in progress" in live.warnings[-1], (live.failures, live.warnings)
    acknowledged = _kill(proc)
    assert acknowledged == {}  # the torn receipt was never reported durable
    torn = (logdir / "receipts.jsonl").read_bytes()[len(before):]
    assert torn and not torn.endswith(b"\n")
    report = verify_bundle(logdir, keys_of(signer))
    assert checks(report) == {"torn-line"} and report.failures[0].seq == 5
    with ReceiptLog(logdir, signer) as log:
        assert log.recovery.torn_bytes == len(torn)
        assert log.recovery.quarantined.read_bytes() == torn
        assert log.size == 5
        assert log.append(sample_input(99)).seq == 5
    assert verify_bundle(logdir, keys_of(signer)).ok


def test_kill_after_write_before_fsync_keeps_a_valid_line_and_reports_it(tmp_path, logdir, signer):
    _seed(logdir, signer)
    proc = _spawn(tmp_path, logdir, signer, pause="after-write")
    _wait_paused(proc)
    assert _kill(proc) == {}
    with ReceiptLog(logdir, signer) as log:
        # A process crash keeps the page cache: the complete line survives, is verified and indexed.
        assert log.recovery.indexed_from_log == 1 and log.recovery.repaired
    assert verify_bundle(logdir, keys_of(signer)).ok


def test_a_bad_line_left_by_a_crash_is_reported_not_accepted(tmp_path, logdir, signer):
    _seed(logdir, signer)
    proc = _spawn(tmp_path, logdir, signer, pause="after-fsync")
    _wait_paused(proc)
    _kill(proc)
    # Someone edits the unindexed line before the log is reopened.
    _rewrite(logdir / "receipts.jsonl", 5, lambda line: _resign(
        line, Signer.generate(), lambda s: s["predicate"]["usage"].update(promptTokens=0)))
    with pytest.raises(LogCorrupt) as err:
        ReceiptLog(logdir, signer)
    assert err.value.seq == 5 and err.value.check == "signature"


@pytest.mark.slow
def test_random_kill_under_load_loses_no_acknowledged_receipt(tmp_path, logdir, signer):
    _seed(logdir, signer)
    for round_ in range(3):
        proc = _spawn(tmp_path, logdir, signer, threads=4, checkpoint_every=7)
        first = proc.stdout.readline()  # appending has started
        assert first.endswith("\n"), proc.stderr.read()
        time.sleep(0.1 + 0.2 * round_)
        acknowledged = _kill(proc)
        acknowledged[int(first.split()[0])] = first.split()[1]
        with ReceiptLog(logdir, signer) as log:
            assert max(acknowledged) < log.size, (sorted(acknowledged)[-5:], log.size, log.recovery.messages())
            with LogReader(logdir) as reader:
                for seq, receipt_id in acknowledged.items():
                    assert reader.find(seq).receipt_id == receipt_id, seq
        report = verify_bundle(logdir, keys_of(signer))
        assert report.ok, report.failures[:3]


def test_write_error_cuts_the_partial_line_and_stops_the_log(tmp_path, logdir, signer):
    """A real EFBIG (RLIMIT_FSIZE) in a subprocess: no torn line is left, later appends are refused."""
    _seed(logdir, signer, count=20)
    script = tmp_path / "efbig.py"
    script.write_text(textwrap.dedent("""
        import os, resource, signal, sys
        from nodeagent.receipts import ReceiptLog, LogClosed
        from nodeagent.receipts.keys import read_private_key
        from nodeagent.receipts.samples import sample_input
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        log = ReceiptLog(sys.argv[1], read_private_key(sys.argv[2]), checkpoint_every=10**6)
        data = open(os.path.join(sys.argv[1], "receipts.jsonl"), "rb").read()
        limit = len(data) + len(data.split(b"\\n")[-2]) * 3 // 2  # room for one more line and a half
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        ok = 0
        try:
            for i in range(100):
                log.append(sample_input(100 + i)); ok += 1
        except OSError as exc:
            print("failed", ok, type(exc).__name__)
        try:
            log.append(sample_input(500))
        except LogClosed:
            print("closed")
    """))
    key = tmp_path / "key.pem"
    key.write_bytes(signer.private_pem())
    key.chmod(0o600)
    out = subprocess.run([sys.executable, str(script), str(logdir), str(key)], capture_output=True, text=True,
                         timeout=120)
    assert "failed 1 OSError" in out.stdout and "closed" in out.stdout, out.stdout + out.stderr
    assert (logdir / "receipts.jsonl").read_bytes().endswith(b"\n")
    with ReceiptLog(logdir, signer) as log:
        assert log.recovery.torn_bytes == 0 and log.size == 21
    assert verify_bundle(logdir, keys_of(signer)).ok


def test_lost_or_damaged_index_is_rebuilt(logdir, signer):
    with ReceiptLog(logdir, signer) as log:
        fill(log, 0, 7)
    (logdir / "index.db").write_bytes(b"this is not sqlite" * 100)
    for name in ("index.db-wal", "index.db-shm"):
        (logdir / name).unlink(missing_ok=True)
    with ReceiptLog(logdir, signer) as log:
        assert log.recovery.index_rebuilt and log.recovery.indexed_from_log == 7
    with LogReader(logdir) as reader:
        assert [r.seq for r in reader.rows()] == list(range(6, -1, -1))
        assert reader.find("run000003").seq == 3


# ------------------------------------------------------------------ keys and rotation
def test_rotation_keeps_old_receipts_verifiable_with_either_key(tmp_path, logdir, signer):
    new = Signer.generate()
    with ReceiptLog(logdir, signer, checkpoint_every=4) as log:
        fill(log, 0, 5)
        rotation = log.rotate(new, reason="scheduled")
        assert rotation.seq == 5 and log.key_id == new.key_id
        fill(log, 6, 5)
    statement = _statement_of(rotation.line)
    assert statement["predicate"]["previousKey"]["keyId"] == signer.key_id
    assert statement["predicate"]["newKey"]["keyId"] == new.key_id
    assert {s["keyid"] for s in json.loads(rotation.line)["signatures"]} == {signer.key_id, new.key_id}
    assert sorted(p.stem for p in (logdir / "keys").glob("*.pem")) == sorted([signer.key_id, new.key_id])
    for anchors in (keys_of(signer), keys_of(new), {}):
        report = verify_bundle(logdir, anchors or None)
        assert report.ok, report.failures
        assert report.rotations == 1 and set(report.trusted_keys) == {signer.key_id, new.key_id}
    with pytest.raises(KeyMismatch) as err:
        ReceiptLog(logdir, signer)  # the retired key may not sign any more
    assert err.value.expected == new.key_id
    # Receipts before and after the rotation have proofs that verify with one key.
    with ReceiptLog(logdir, new) as log:
        for seq in (2, 8):
            for anchor in (signer, new):
                report = verify_proof(log.proof(seq), keys_of(anchor))
                assert report.ok, (seq, report.failures)


def test_a_retired_key_cannot_sign_after_the_rotation(tmp_path, logdir, signer):
    new = Signer.generate()
    with ReceiptLog(logdir, signer, checkpoint_every=1000) as log:
        fill(log, 0, 3)
        log.rotate(new)
        last = log.append(sample_input(4))
    forged = build_execution_line(sample_input(5), seq=5, previous=last.leaf_hash, signer=signer)
    with open(logdir / "receipts.jsonl", "ab") as handle:
        handle.write(forged + b"\n")
    report = verify_bundle(logdir, keys_of(signer))
    assert checks(report, 5) == {"key"}, report.failures
    with pytest.raises(LogCorrupt) as err:
        ReceiptLog(logdir, new)
    assert err.value.check == "key" and err.value.seq == 5


def test_key_is_created_private_and_reloaded(tmp_path):
    source = resolve_key_source(tmp_path, env={})
    assert source.kind == "state" and source.path == tmp_path / "keys" / "machine.key"
    first = load_signer(source)
    assert oct(source.path.stat().st_mode & 0o777) == "0o600"
    assert oct(source.path.parent.stat().st_mode & 0o777) == "0o700"
    assert load_signer(source).key_id == first.key_id
    source.path.chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_signer(source)


def test_key_from_systemd_credential_and_explicit_file(tmp_path):
    creds = tmp_path / "creds"
    creds.mkdir()
    signer = Signer.generate()
    (creds / CREDENTIAL_NAME).write_bytes(signer.private_pem())
    (creds / CREDENTIAL_NAME).chmod(0o440)  # systemd's mode; accepted for credentials
    source = resolve_key_source(tmp_path, env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert source.kind == "credential" and load_signer(source).key_id == signer.key_id
    explicit = resolve_key_source(tmp_path, tmp_path / "nope.pem", env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert explicit.kind == "file"
    with pytest.raises(KeyFileError, match="nope.pem"):
        load_signer(explicit)
    (tmp_path / "bad.pem").write_text("not a key")
    (tmp_path / "bad.pem").chmod(0o600)
    with pytest.raises(KeyFileError, match="PKCS#8"):
        load_signer(resolve_key_source(tmp_path, tmp_path / "bad.pem"))


def test_machine_key_rotation_survives_a_crash_before_the_rename(tmp_path):
    state = tmp_path / "state"
    log = open_machine_log(state)
    fill(log, 0, 3)
    old_id, old_public = log.key_id, log.signer.public
    source = resolve_key_source(state, env={})
    result = rotate_machine_key(log, source, reason="test")
    log.close()
    assert load_signer(source).key_id == result.new_key_id != old_id

    # Simulate the crash window: the log recorded a rotation, the key file was not yet replaced.
    log = open_machine_log(state, env={})
    nxt = Signer.generate()
    pending = source.path.with_name("machine.key.next")
    pending.write_bytes(nxt.private_pem())
    pending.chmod(0o600)
    log.rotate(nxt)
    log.close()
    log = open_machine_log(state, env={})
    assert log.key_id == nxt.key_id and "completed an interrupted key rotation" in log.recovery.messages()[0]
    assert not pending.exists() and load_signer(source).key_id == nxt.key_id
    log.close()

    # A pending key the log never heard of is dropped.
    pending.write_bytes(Signer.generate().private_pem())
    pending.chmod(0o600)
    log = open_machine_log(state, env={})
    assert log.key_id == nxt.key_id and not pending.exists()
    log.close()
    report = verify_bundle(receipts_dir(state), {old_id: old_public})  # two rotations later, the first key suffices
    assert report.ok and report.rotations == 2, report.failures


# ------------------------------------------------------------------ proofs
def test_receipt_proof_verifies_offline_and_detects_damage(logdir, signer):
    with ReceiptLog(logdir, signer) as log:
        fill(log, 0, 11)
        proof = log.proof(6)
    wire = proof.to_wire()
    assert verify_proof(wire, keys_of(signer)).ok
    assert verify_proof(json.loads(json.dumps(wire))).warnings  # self-contained, with a warning on trust

    damaged = json.loads(json.dumps(wire))
    damaged["entry"]["inclusionProof"][0] = "00" * 32
    assert checks(verify_proof(damaged, keys_of(signer))) == {"inclusion"}

    other = json.loads(json.dumps(wire))
    other["entry"]["seq"] = 5
    assert "inclusion" in checks(verify_proof(other, keys_of(signer)))

    assert "signature" in checks(verify_proof(wire, keys_of(Signer.generate())))
    assert "checkpoint-signature" in checks(verify_proof(wire, keys_of(Signer.generate())))


def test_reader_lists_finds_and_proves(logdir, signer):
    with ReceiptLog(logdir, signer, checkpoint_every=5) as log:
        appended = fill(log, 0, 12)
    with LogReader(logdir) as reader:
        assert [r.seq for r in reader.rows(limit=3)] == [11, 10, 9]
        assert {r.status for r in reader.rows(status="refused")} == {"refused"}
        assert reader.find(appended[4].receipt_id[:10]).seq == 4
        assert reader.find("run000007").seq == 7
        assert reader.line(reader.find(3)) == appended[3].line
        assert verify_proof(reader.proof(3), keys_of(signer)).ok


def test_verify_selects_a_receipt_and_proves_inclusion(tmp_path, signer):
    export = _export(tmp_path, signer, count=8)
    report = verify_bundle(export, keys_of(signer), receipt="run000005")
    assert report.ok and report.inclusion["seq"] == 5 and report.inclusion["verified"]
    assert report.inclusion["treeSize"] == 8  # proven against the newest checkpoint
    missing = verify_bundle(export, keys_of(signer), receipt=42)
    assert checks(missing) == {"inclusion"}


def test_parallel_verification_agrees(tmp_path, signer):
    source = tmp_path / "big"
    with ReceiptLog(source, signer, checkpoint_every=500) as log:
        fill(log, 0, 2100)
    _rewrite(source / "receipts.jsonl", 1500, lambda line: line.replace(b'"payloadType":"', b'"payloadType":"x'))
    serial = verify_bundle(source, keys_of(signer))
    parallel = verify_bundle(source, keys_of(signer), jobs=2)
    assert [str(f) for f in serial.failures] == [str(f) for f in parallel.failures]
    assert checks(serial, 1500) == {"payload-type", "merkle-root"}  # root mismatch narrowed to 1500..1999


def test_rotation_entry_time_is_utc(logdir, signer):
    with ReceiptLog(logdir, signer) as log:
        fill(log, 0, 1)
        entry = log.rotate(Signer.generate())
    rotated_at = _statement_of(entry.line)["predicate"]["rotatedAt"]
    parsed = datetime.fromisoformat(rotated_at.replace("Z", "+00:00"))
    assert rotated_at.endswith("Z") and abs((datetime.now(timezone.utc) - parsed).total_seconds()) < 60

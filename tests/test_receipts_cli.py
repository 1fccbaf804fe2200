"""`agent-machine key ...` and `agent-machine receipts ...`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nodeagent.cli import main
from nodeagent.contracts.receipt import ExecutionReceipt, ReceiptProof
from nodeagent.receipts import open_machine_log
from nodeagent.receipts.samples import STATUSES, sample_input
from nodeagent.receipts.verify import verify_checkpoint_consistency


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.setenv("AGENT_MACHINE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("AGENT_MACHINE_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("AGENT_MACHINE_RECEIPTS_KEY_FILE", raising=False)
    return tmp_path / "state"


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def seed(state, count=9):
    with open_machine_log(state, checkpoint_every=4) as log:
        for i in range(count):
            log.append(sample_input(i, STATUSES[i % 4], tenant="acme" if i % 2 else "globex"))


def public_pem(capsys, tmp_path, name="machine.pub.pem"):
    code, out, _ = run(capsys, "key", "show", "--format", "json")
    assert code == 0
    path = tmp_path / name
    path.write_text(json.loads(out)["publicKeyPem"])
    return path


def test_key_show_creates_a_private_key_once(state, capsys):
    code, out, _ = run(capsys, "key", "show", "--format", "json")
    assert code == 0
    data = json.loads(out)
    key_file = state / "keys" / "machine.key"
    assert data["source"] == {"kind": "state", "path": str(key_file)}
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert data["publicKeyPem"].startswith("-----BEGIN PUBLIC KEY-----")
    assert data["noteVerifierKey"].startswith(data["origin"] + "+")
    code, table, _ = run(capsys, "key", "show")
    assert data["keyId"] in table and "managed key" in table


def test_ls_and_show(state, capsys):
    seed(state)
    code, out, _ = run(capsys, "receipts", "ls")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["SEQ", "KIND", "STATUS"]
    assert out.splitlines()[1].split()[0] == "8"
    code, out, _ = run(capsys, "receipts", "ls", "--tenant", "acme", "--status", "failed", "--format", "json")
    rows = json.loads(out)
    assert rows and {(r["tenant"], r["status"]) for r in rows} == {("acme", "failed")}

    code, out, _ = run(capsys, "receipts", "show", "run000004", "--format", "json")
    receipt = ExecutionReceipt.model_validate(json.loads(out))
    assert receipt.seq == 4 and receipt.statement.predicate.pod.run_id == "run000004"
    code, out, _ = run(capsys, "receipts", "show", "seq:2")
    assert "outcome:    cancelled" in out and "pod-2" in out
    code, _, err = run(capsys, "receipts", "show", "nothing-like-this")
    assert code == 1 and "no entry matches" in err


def test_export_then_verify_offline_with_only_the_public_key(state, capsys, tmp_path):
    seed(state)
    pem = public_pem(capsys, tmp_path)
    export = tmp_path / "export"
    code, out, _ = run(capsys, "receipts", "export", str(export))
    assert code == 0 and "exported 9 entries" in out
    code, out, _ = run(capsys, "receipts", "verify", str(export), "--key", str(pem), "--receipt", "5")
    assert code == 0 and out.startswith("OK:") and "inclusion in tree of 9 verified" in out

    lines = (export / "receipts.jsonl").read_bytes().split(b"\n")
    lines[6] = lines[6].replace(b'"payloadType":"application/vnd.in-toto+json"', b'"payloadType":"text/plain"')
    (export / "receipts.jsonl").write_bytes(b"\n".join(lines))
    code, out, _ = run(capsys, "receipts", "verify", str(export), "--key", str(pem))
    assert code == 1 and "FAIL entry 6: payload-type" in out
    code, out, _ = run(capsys, "receipts", "verify", str(export), "--key", str(pem), "--format", "json")
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    assert {"seq": 6, "check": "payload-type"} in [{k: f[k] for k in ("seq", "check")} for f in report["failures"]]


def test_verify_with_a_foreign_key_fails(state, capsys, tmp_path):
    seed(state, 3)
    other_state = tmp_path / "other"
    code, out, _ = run(capsys, "key", "show", "--format", "json", "--key-file", str(_foreign_key(tmp_path)))
    foreign = tmp_path / "foreign.pub.pem"
    foreign.write_text(json.loads(out)["publicKeyPem"])
    code, out, _ = run(capsys, "receipts", "verify", "--key", str(foreign))
    assert code == 1 and "signature" in out and not other_state.exists()


def _foreign_key(tmp_path):
    from nodeagent.receipts.keys import Signer, write_private_key

    path = tmp_path / "foreign.key"
    write_private_key(path, Signer.generate())
    return path


def test_proof_file_round_trip(state, capsys, tmp_path):
    seed(state, 6)
    pem = public_pem(capsys, tmp_path)
    proof_file = tmp_path / "r3.json"
    code, out, _ = run(capsys, "receipts", "export", str(proof_file), "--receipt", "run000003")
    assert code == 0
    ReceiptProof.model_validate_json(proof_file.read_text())
    code, out, _ = run(capsys, "receipts", "verify", str(proof_file), "--key", str(pem))
    assert code == 0 and "receipt 3" in out
    proof = json.loads(proof_file.read_text())
    proof["entry"]["line"] = proof["entry"]["line"].replace('"sig":"', '"sig":"AAAA', 1)
    proof_file.write_text(json.dumps(proof))
    code, out, _ = run(capsys, "receipts", "verify", str(proof_file), "--key", str(pem))
    assert code == 1 and "entry 3: signature" in out
    code, _, err = run(capsys, "receipts", "export", str(proof_file), "--receipt", "3")
    assert code == 1 and "exists" in err


def test_show_proof_checkpoints_on_demand(state, capsys):
    with open_machine_log(state, checkpoint_every=1000, checkpoint_seconds=3600) as log:
        log.append(sample_input(0))
    # close() checkpointed; append more without closing cleanly is not possible in-process,
    # so remove the checkpoint to force the on-demand path.
    for note in (state / "receipts" / "checkpoints").glob("*.note"):
        note.unlink()
    code, out, _ = run(capsys, "receipts", "show", "0", "--proof", "--format", "json")
    assert code == 0 and ReceiptProof.model_validate_json(out).tree_size == 1


def test_key_rotate_keeps_history_verifiable(state, capsys, tmp_path):
    seed(state, 5)
    old_pem = public_pem(capsys, tmp_path, "old.pem")
    code, out, _ = run(capsys, "key", "rotate", "--reason", "scheduled", "--format", "json")
    assert code == 0
    rotated = json.loads(out)
    assert rotated["rotationSeq"] == 5 and rotated["hint"] is None
    code, out, _ = run(capsys, "key", "show", "--format", "json")
    shown = json.loads(out)
    assert shown["keyId"] == rotated["newKeyId"]
    assert [k["keyId"] for k in shown["retiredKeys"]] == [rotated["previousKeyId"]]
    with open_machine_log(state) as log:
        log.append(sample_input(10))
    code, out, _ = run(capsys, "receipts", "ls", "--limit", "2", "--format", "json")
    assert [r["kind"] for r in json.loads(out)] == ["execution", "key-rotation"]
    code, out, _ = run(capsys, "receipts", "verify", "--key", str(old_pem), "--receipt", "6")
    assert code == 0, out


def test_rotating_an_operator_key_needs_a_new_key(state, capsys, tmp_path):
    key = _foreign_key(tmp_path)
    with open_machine_log(state, key_file=key) as log:
        log.append(sample_input(0))
    code, _, err = run(capsys, "key", "rotate", "--key-file", str(key))
    assert code == 1 and "--new-key" in err
    new_key = _foreign_key(tmp_path / "n")
    code, out, _ = run(capsys, "key", "rotate", "--key-file", str(key), "--new-key", str(new_key))
    assert code == 0 and "receipts.key_file" in out
    code, _, err = run(capsys, "receipts", "checkpoint", "--key-file", str(key))
    assert code == 1 and "expects entries signed by key" in err
    code, out, _ = run(capsys, "receipts", "checkpoint", "--key-file", str(new_key))
    assert code == 0


def test_checkpoint_with_consistency_proof(state, capsys):
    seed(state, 5)
    old_note = sorted((state / "receipts" / "checkpoints").glob("*.note"))[-1].read_text()
    old_size = int(old_note.split("\n")[1])
    with open_machine_log(state) as log:
        for i in range(5, 12):
            log.append(sample_input(i))
        keys = log.public_keys()
    code, out, _ = run(capsys, "receipts", "checkpoint", "--from-size", str(old_size), "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["size"] == 12
    report = verify_checkpoint_consistency(old_note, data["checkpoint"], data["consistencyProof"], keys)
    assert report.ok, report.failures


def test_export_while_a_writer_holds_the_log(state, capsys, tmp_path):
    seed(state, 4)
    with open_machine_log(state):
        code, out, err = run(capsys, "receipts", "export", str(tmp_path / "busy"))
    assert code == 0 and "running agent holds the log" in err
    code, out, _ = run(capsys, "receipts", "verify", str(tmp_path / "busy"))
    assert code == 0 and "warning: trusting the public keys shipped" in out


def test_empty_state_and_bad_paths(state, capsys, tmp_path):
    code, out, _ = run(capsys, "receipts", "ls")
    assert code == 0 and "no receipts yet" in out
    code, _, err = run(capsys, "receipts", "verify", str(tmp_path / "missing"))
    assert code == 1 and "does not exist" in err
    (tmp_path / "junk.json").write_text("{}")
    code, _, err = run(capsys, "receipts", "verify", str(tmp_path / "junk.json"))
    assert code == 1 and "origin" in err  # the missing field is named


def test_help_teaches():
    out = subprocess.run([sys.executable, "-m", "nodeagent.cli", "receipts", "verify", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "examples:" in out and "--key PEM" in out and "chain continuity" in out
    out = subprocess.run([sys.executable, "-m", "nodeagent.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "receipts" in out and "key" in out


def test_the_standalone_verifier_in_the_docs_works(state, capsys, tmp_path):
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "receipts.md").read_text()
    script = doc.split("```python verify_receipt_standalone\n", 1)[1].split("```", 1)[0]
    (tmp_path / "standalone.py").write_text(script)
    seed(state, 7)
    pem = public_pem(capsys, tmp_path)
    proof_file = tmp_path / "r5.json"
    assert run(capsys, "receipts", "export", str(proof_file), "--receipt", "5")[0] == 0
    ok = subprocess.run([sys.executable, str(tmp_path / "standalone.py"), str(proof_file), str(pem)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "ok run000005 failed", ok.stderr  # STATUSES[5 % 4]
    proof = json.loads(proof_file.read_text())
    proof["entry"]["inclusionProof"][0] = "00" * 32
    proof_file.write_text(json.dumps(proof))
    bad = subprocess.run([sys.executable, str(tmp_path / "standalone.py"), str(proof_file), str(pem)],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "not in the signed tree" in bad.stderr


@pytest.mark.parametrize("dest", ["/proc/x", "{tmp}/a-file/x"])
def test_export_to_an_unwritable_place_is_a_clear_error_not_a_traceback(state, capsys, tmp_path, dest):
    seed(state, 3)
    (tmp_path / "a-file").write_text("not a directory")
    dest = dest.format(tmp=tmp_path)
    code, out, err = run(capsys, "receipts", "export", dest)
    assert code == 1 and out == ""
    assert f"cannot write the export to {dest}" in err and "Traceback" not in err
    code, _, err = run(capsys, "receipts", "export", dest + ".proof.json", "--receipt", "0")
    assert code == 1
    assert f"cannot write the export to {dest}.proof.json" in err

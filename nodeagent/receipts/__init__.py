"""Signed execution receipts: DSSE + in-toto, Ed25519, an append-only verifiable log.

The pod executor's API (see docs/receipts.md):

    from nodeagent.receipts import open_machine_log
    from nodeagent.contracts.receipt import ReceiptInput

    log = open_machine_log(state_dir)              # key + <state>/receipts/, crash repair
    appended = log.append(ReceiptInput(...))       # returns once durable (group commit)
    appended.seq, appended.receipt_id, appended.line
    log.proof(appended.seq)                        # ReceiptProof, verifiable offline
    log.close()

Modules: keys (Ed25519 signer, key sources; verification through libsodium),
dsse (envelopes), entry (one line: build and check), fastcheck (a quick,
conservative statement check in front of the pydantic contract), merkle
(RFC 6962), checkpoint (signed notes), log (the writer and a lock-free
reader), verify (offline verification, in parallel processes), export,
machine (the state-dir log and key rotation).
"""

from nodeagent.receipts.errors import KeyFileError, KeyMismatch, LogBusy, LogClosed, LogCorrupt, ReceiptError
from nodeagent.receipts.keys import KeySource, PublicKey, Signer, load_signer, resolve_key_source
from nodeagent.receipts.log import AppendedReceipt, LogReader, ReceiptLog, RecoveryReport
from nodeagent.receipts.machine import RotationResult, open_machine_log, receipts_dir, rotate_machine_key
from nodeagent.receipts.verify import Failure, VerifyReport, verify_bundle, verify_proof

__all__ = [
    "AppendedReceipt", "Failure", "KeyFileError", "KeyMismatch", "KeySource", "LogBusy", "LogClosed", "LogCorrupt",
    "LogReader", "PublicKey", "ReceiptError", "ReceiptLog", "RecoveryReport", "RotationResult", "Signer",
    "VerifyReport", "load_signer", "open_machine_log", "receipts_dir", "resolve_key_source", "rotate_machine_key",
    "verify_bundle", "verify_proof",
]

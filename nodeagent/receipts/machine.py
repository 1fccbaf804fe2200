"""The machine's receipt log under the state directory, with its key.

`open_machine_log` is the one call the node (and the CLI) makes: it resolves
the signing key (`nodeagent.receipts.keys.resolve_key_source`), opens
``<state>/receipts/`` and finishes a key rotation a crash interrupted.

`rotate_machine_key` replaces the managed key safely:

1. the new key is written to ``machine.key.next`` (0600, fsynced);
2. the rotation entry (signed by old and new key) is appended and made durable;
3. ``machine.key.next`` is renamed over ``machine.key``.

After a crash between 2 and 3 the log expects the new key while the file
still holds the old one; `open_machine_log` sees ``.next`` holds the expected
key and completes step 3. A ``.next`` the log never heard of (crash between
1 and 2) is deleted: that rotation did not happen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from nodeagent.fsutil import fsync_dir
from nodeagent.receipts.errors import KeyFileError, KeyMismatch
from nodeagent.receipts.keys import KeySource, Signer, load_signer, read_private_key, resolve_key_source, write_private_key
from nodeagent.receipts.log import AppendedReceipt, ReceiptLog

RECEIPTS_DIR = "receipts"


def receipts_dir(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / RECEIPTS_DIR


def _pending_path(source: KeySource) -> Path:
    return source.path.with_name(source.path.name + ".next")


def open_machine_log(state_dir: str | os.PathLike[str], *, key_file: str | os.PathLike[str] | None = None,
                     env: Mapping[str, str] | None = None, **options: Any) -> ReceiptLog:
    """Open (creating on first use) the machine's receipt log and key.

    ``options`` go to `ReceiptLog` (origin, checkpoint_every, checkpoint_seconds, group_commit).
    """
    source = resolve_key_source(state_dir, key_file, env)
    signer = load_signer(source)
    directory = receipts_dir(state_dir)
    pending = _pending_path(source) if source.kind == "state" else None
    try:
        log = ReceiptLog(directory, signer, **options)
    except KeyMismatch as exc:
        if pending is None or not pending.exists():
            raise
        successor = read_private_key(pending)
        if successor.key_id != exc.expected:
            raise
        os.replace(pending, source.path)
        fsync_dir(source.path.parent)
        log = ReceiptLog(directory, successor, **options)
        log.recovery.notes.append(f"completed an interrupted key rotation to {successor.key_id[:16]}…")
        return log
    if pending is not None and pending.exists():
        pending.unlink()
        fsync_dir(pending.parent)
        log.recovery.notes.append("discarded a key rotation that was interrupted before it was logged")
    return log


@dataclass(frozen=True)
class RotationResult:
    previous_key_id: str
    new_key_id: str
    entry: AppendedReceipt
    key_path: Path | None  # where the new private key now lives (None: operator-managed)
    hint: str | None  # what the operator must do next, if anything


def rotate_machine_key(log: ReceiptLog, source: KeySource, *, new_key_file: str | os.PathLike[str] | None = None,
                       reason: str | None = None) -> RotationResult:
    """Rotate ``log`` to a new key. Managed keys are generated and installed; an
    operator-managed key (file, credential) needs ``new_key_file`` and a config change after."""
    previous = log.key_id
    if new_key_file is not None:
        new_signer = read_private_key(new_key_file)
    elif source.kind == "state":
        new_signer = Signer.generate()
    else:
        raise KeyFileError(f"the signing key comes from the {source.describe()}, which agent-machine does not "
                           "manage: generate a key and pass it with --new-key")
    if source.kind == "state":
        # Managed key (generated, or an operator-supplied one that becomes managed).
        pending = _pending_path(source)
        write_private_key(pending, new_signer)
        entry = log.rotate(new_signer, reason=reason)
        os.replace(pending, source.path)
        fsync_dir(source.path.parent)
        return RotationResult(previous, new_signer.key_id, entry, source.path, None)
    entry = log.rotate(new_signer, reason=reason)
    hint = (f"point receipts.key_file at {new_key_file}" if source.kind == "file"
            else f"replace the systemd credential with {new_key_file}")
    return RotationResult(previous, new_signer.key_id, entry, None,
                          f"the log now expects key {new_signer.key_id[:16]}…: {hint} before the next start")


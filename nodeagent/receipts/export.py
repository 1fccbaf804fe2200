"""Exports: a directory anyone can verify offline with `agent-machine receipts verify`.

An export has the log directory's verifiable files and a manifest::

    receipts.jsonl            the complete lines of the log (a torn tail is left out)
    checkpoints/<size>.note   every checkpoint that covers no more than those lines
    keys/<keyid>.pem          every public key the log has used
    manifest.json             origin, entry count, latest checkpoint, sha256 of each file

Files are written crash-safely; the destination must not exist or be empty.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from nodeagent.contracts.receipt import rfc3339_utc
from nodeagent.fsutil import PUBLIC_FILE_MODE, atomic_write_bytes, atomic_write_text
from nodeagent.receipts.errors import ReceiptError
from nodeagent.receipts.log import META_FILE
from nodeagent.receipts.verify import CHECKPOINT_DIR, CHECKPOINT_SUFFIX, KEYS_DIR, LOG_FILE

EXPORT_FORMAT = "agent-machine-receipts/1"


@dataclass(frozen=True)
class ExportSummary:
    path: Path
    entries: int
    checkpoints: int
    latest_checkpoint: int | None
    keys: int

    def to_dict(self) -> dict:
        return {"path": str(self.path), "entries": self.entries, "checkpoints": self.checkpoints,
                "latestCheckpoint": self.latest_checkpoint, "keys": self.keys}


def export_log(source: str | os.PathLike[str], dest: str | os.PathLike[str]) -> ExportSummary:
    """Copy the verifiable part of the log in ``source`` to ``dest``.

    Takes no lock: it copies the complete lines present when it reads the
    file. A writer should checkpoint first so the export is fully covered.
    """
    source, dest = Path(source), Path(dest)
    if not (source / LOG_FILE).is_file():
        raise ReceiptError(f"no receipt log in {source}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ReceiptError(f"export destination {dest} exists and is not an empty directory")
    data = (source / LOG_FILE).read_bytes()
    data = data[: data.rfind(b"\n") + 1]  # complete lines only
    entries = data.count(b"\n")
    files: dict[str, str] = {}

    def put(relative: str, content: bytes) -> None:
        atomic_write_bytes(dest / relative, content, mode=PUBLIC_FILE_MODE)  # an export is made to be handed on
        files[relative] = hashlib.sha256(content).hexdigest()

    put(LOG_FILE, data)
    checkpoints = []
    for note in sorted((source / CHECKPOINT_DIR).glob(f"*{CHECKPOINT_SUFFIX}")):
        size = int(note.stem)
        if size <= entries:
            put(f"{CHECKPOINT_DIR}/{note.name}", note.read_bytes())
            checkpoints.append(size)
    keys = sorted((source / KEYS_DIR).glob("*.pem"))
    for key in keys:
        put(f"{KEYS_DIR}/{key.name}", key.read_bytes())
    origin = json.loads((source / META_FILE).read_text())["origin"] if (source / META_FILE).exists() else None
    manifest = {
        "format": EXPORT_FORMAT,
        "origin": origin,
        "entries": entries,
        "latestCheckpoint": max(checkpoints) if checkpoints else None,
        "exportedAt": rfc3339_utc(datetime.now(timezone.utc)),
        "files": files,
    }
    atomic_write_text(dest / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                      mode=PUBLIC_FILE_MODE)
    return ExportSummary(dest, entries, len(checkpoints), manifest["latestCheckpoint"], len(keys))


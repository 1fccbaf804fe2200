"""Signed checkpoints: the log's size and Merkle root, as a C2SP signed note.

A checkpoint's body is the C2SP tlog-checkpoint text::

    <origin>\\n<size>\\n<base64 root>\\n

signed as a C2SP signed note (the format of Go's golang.org/x/mod/sumdb/note)::

    <body>\\n— <key name> <base64(key hash[4] || Ed25519 signature[64])>\\n

The key name is the log's origin; the 4-byte key hash is
``SHA-256(name || "\\n" || 0x01 || raw public key)[:4]`` and the signature
covers the body bytes exactly. `note_verifier_key` prints the key in the
``name+hash+base64(0x01||key)`` form Go's `note.NewVerifier` accepts, so
standard transparency-log tooling can check our checkpoints too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Iterable

from nodeagent.receipts.keys import PublicKey, Signer

ORIGIN_RE = re.compile(r"^[\x21-\x2a\x2c-\x7e]{1,255}$")  # printable ASCII, no space, no '+'
_SIG_PREFIX = "\u2014 "  # em dash + space
_ED25519 = b"\x01"


class CheckpointError(ValueError):
    """``check`` is one of checkpoint-format, checkpoint-origin, checkpoint-signature."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"{check}: {detail}")
        self.check = check
        self.detail = detail


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes

    def body(self) -> bytes:
        return f"{self.origin}\n{self.size}\n{base64.b64encode(self.root).decode()}\n".encode()


@dataclass(frozen=True)
class SignedCheckpoint:
    checkpoint: Checkpoint
    text: str
    key_id: str  # the trusted key whose signature verified


def check_origin(origin: str) -> str:
    if not ORIGIN_RE.match(origin):
        raise ValueError(f"log origin {origin!r} must be 1-255 printable ASCII characters without spaces or '+'")
    return origin


def note_key_hash(name: str, key: PublicKey) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + _ED25519 + key.raw).digest()[:4]


def note_verifier_key(name: str, key: PublicKey) -> str:
    """``name+hash+key`` as accepted by Go's sumdb/note verifiers."""
    return f"{name}+{note_key_hash(name, key).hex()}+{base64.b64encode(_ED25519 + key.raw).decode()}"


def sign_checkpoint(checkpoint: Checkpoint, signer: Signer) -> str:
    check_origin(checkpoint.origin)
    body = checkpoint.body()
    blob = note_key_hash(checkpoint.origin, signer.public) + signer.sign(body)
    return body.decode() + "\n" + f"{_SIG_PREFIX}{checkpoint.origin} {base64.b64encode(blob).decode()}\n"


def parse_body(body: str) -> Checkpoint:
    lines = body.split("\n")
    if len(lines) != 4 or lines[3] != "":
        raise CheckpointError("checkpoint-format", "body must be exactly three lines: origin, size, root")
    origin, size_text, root_text = lines[:3]
    if not ORIGIN_RE.match(origin):
        raise CheckpointError("checkpoint-format", f"bad origin line {origin!r}")
    if not re.fullmatch(r"0|[1-9][0-9]{0,18}", size_text):
        raise CheckpointError("checkpoint-format", f"size {size_text!r} is not a decimal integer")
    try:
        root = base64.b64decode(root_text, validate=True)
    except (binascii.Error, ValueError):
        raise CheckpointError("checkpoint-format", f"root {root_text!r} is not base64") from None
    if len(root) != 32:
        raise CheckpointError("checkpoint-format", f"root is {len(root)} bytes, expected 32")
    return Checkpoint(origin, int(size_text), root)


def open_checkpoint(text: str, keys: Iterable[PublicKey], origin: str | None = None) -> SignedCheckpoint:
    """Verify a signed checkpoint note against ``keys`` and return it.

    The signature is checked over the exact body bytes before the body is
    interpreted; signatures by keys we do not know are ignored (as the note
    format requires); at least one must verify.
    """
    separator = text.rfind("\n\n")
    if separator < 0 or not text.endswith("\n"):
        raise CheckpointError("checkpoint-format", "not a signed note (no blank line before the signatures)")
    body_text, signature_text = text[:separator + 1], text[separator + 2:]
    body = body_text.encode()
    first_line = body_text.split("\n", 1)[0]
    keys = list(keys)
    verified: str | None = None
    for line in signature_text.rstrip("\n").split("\n"):
        if not line.startswith(_SIG_PREFIX):
            raise CheckpointError("checkpoint-format", f"bad signature line {line!r}")
        name, _, blob_text = line[len(_SIG_PREFIX):].partition(" ")
        try:
            blob = base64.b64decode(blob_text, validate=True)
        except (binascii.Error, ValueError):
            raise CheckpointError("checkpoint-format", f"signature of {name!r} is not base64") from None
        if len(blob) != 4 + 64:
            continue  # not an Ed25519 note signature; not ours
        for key in keys:
            if note_key_hash(name, key) == blob[:4] and key.verify(blob[4:], body):
                verified = key.key_id
                break
        if verified:
            break
    if verified is None:
        raise CheckpointError("checkpoint-signature",
                              f"no valid signature by a trusted key on the checkpoint for {first_line!r}")
    checkpoint = parse_body(body_text)
    if origin is not None and checkpoint.origin != origin:
        raise CheckpointError("checkpoint-origin", f"checkpoint is for origin {checkpoint.origin!r}, expected {origin!r}")
    return SignedCheckpoint(checkpoint, text, verified)

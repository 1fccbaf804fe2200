"""DSSE (Dead Simple Signing Envelope) v1, as one line of canonical JSON.

The signature covers ``PAE(payloadType, payload)``::

    b"DSSEv1 " + len(type) + b" " + type + b" " + len(payload) + b" " + payload

A verifier decodes the envelope (JSON), base64-decodes the payload and checks
the signature over the exact received payload bytes *before* the payload is
parsed: nothing inside an unverified payload is ever interpreted.

Base64 is written standard and padded; both the standard and the URL-safe
alphabets are accepted on input, padded or not (the DSSE spec allows both).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Mapping, Sequence

from nodeagent.receipts.canonical import canonical_json
from nodeagent.receipts.keys import PublicKey, Signer


class EnvelopeError(ValueError):
    """The envelope is malformed. ``check`` is ``envelope`` or ``base64``."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"{check}: {detail}")
        self.check = check
        self.detail = detail


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


_URLSAFE_TO_STD = bytes.maketrans(b"-_", b"+/")


def b64decode_any(text: str, what: str = "value") -> bytes:
    """Decode standard or URL-safe base64, with or without padding; anything else is an error."""
    if not isinstance(text, str):
        raise EnvelopeError("base64", f"{what} must be a base64 string, got {type(text).__name__}")
    data = text.encode("ascii", errors="replace")
    if b"-" in data or b"_" in data:
        if b"+" in data or b"/" in data:
            raise EnvelopeError("base64", f"{what} mixes the standard and URL-safe base64 alphabets")
        data = data.translate(_URLSAFE_TO_STD)
    data = data.rstrip(b"=")
    data += b"=" * (-len(data) % 4)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EnvelopeError("base64", f"{what} is not valid base64: {exc}") from None


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class Envelope:
    """A decoded, not yet verified, envelope."""

    payload_type: str
    payload: bytes
    signatures: tuple[tuple[str, bytes], ...]  # (keyid, signature)

    @property
    def keyids(self) -> tuple[str, ...]:
        return tuple(keyid for keyid, _ in self.signatures)

    def verified_keyids(self, keys: Mapping[str, PublicKey]) -> list[str]:
        """Key ids (among ``keys``) whose signature over the PAE is valid.

        A signature is only tried with the key its keyid names, so a
        signature can never be attributed to a different key.
        """
        message = pae(self.payload_type, self.payload)
        good = []
        for keyid, signature in self.signatures:
            key = keys.get(keyid)
            if key is not None and keyid not in good and key.verify(signature, message):
                good.append(keyid)
        return good


def sign_envelope(payload: bytes, payload_type: str, signers: Sequence[Signer]) -> bytes:
    """The envelope as one canonical JSON line (no trailing newline)."""
    if not signers:
        raise ValueError("at least one signer is needed")
    message = pae(payload_type, payload)
    document = {
        "payload": b64encode(payload),
        "payloadType": payload_type,
        "signatures": [{"keyid": s.key_id, "sig": b64encode(s.sign(message))} for s in signers],
    }
    return canonical_json(document)


def parse_envelope(line: bytes | str) -> Envelope:
    """Decode the JSON envelope and its base64 fields; verifies nothing."""
    try:
        document = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise EnvelopeError("envelope", f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise EnvelopeError("envelope", "not a JSON object")
    unknown = set(document) - {"payload", "payloadType", "signatures"}
    if unknown:
        raise EnvelopeError("envelope", f"unknown field(s) {sorted(unknown)}")
    payload_type = document.get("payloadType")
    if not isinstance(payload_type, str):
        raise EnvelopeError("envelope", "payloadType missing or not a string")
    if "payload" not in document:
        raise EnvelopeError("envelope", "payload missing")
    payload = b64decode_any(document["payload"], "payload")
    raw_signatures = document.get("signatures")
    if not isinstance(raw_signatures, list) or not raw_signatures:
        raise EnvelopeError("envelope", "signatures missing or empty")
    signatures = []
    for index, entry in enumerate(raw_signatures):
        if not isinstance(entry, dict) or not isinstance(entry.get("keyid", ""), str) or "sig" not in entry:
            raise EnvelopeError("envelope", f"signatures[{index}] must be an object with keyid and sig")
        signatures.append((entry.get("keyid", ""), b64decode_any(entry["sig"], f"signatures[{index}].sig")))
    return Envelope(payload_type, payload, tuple(signatures))

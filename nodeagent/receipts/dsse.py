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
import re
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
    try:
        # What we write (standard, padded) decodes in one C call; strict mode accepts
        # nothing the general path below would refuse or decode differently.
        return binascii.a2b_base64(text, strict_mode=True)
    except ValueError:  # binascii.Error, or a non-ASCII str
        pass
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


# The one-signature envelope exactly as `sign_envelope` writes it, cut at its three values.
# Base64 and hex contain no quote or backslash, so where this layout matches, the JSON
# decoder would find exactly these values: it is a shortcut, not a second grammar.
_LAYOUT_HEAD = b'{"payload":"'
_LAYOUT_TYPE = b'","payloadType":"'
_LAYOUT_KEYID = b'","signatures":[{"keyid":"'
_LAYOUT_SIG = b'","sig":"'
_LAYOUT_TAIL = b'"}]}'
_KEYID = re.compile(rb"[0-9a-f]{64}")
_LAYOUT_MIDDLES = tuple((t, _LAYOUT_TYPE + t.encode() + _LAYOUT_KEYID) for t in ("application/vnd.in-toto+json",))


def _parse_written_layout(line: bytes) -> Envelope | None:
    """The envelope if ``line`` has our writer's one-signature layout and valid base64; else None."""
    if not line.startswith(_LAYOUT_HEAD) or not line.endswith(_LAYOUT_TAIL):
        return None
    payload_end = line.find(b'"', len(_LAYOUT_HEAD))
    if payload_end < 0:
        return None
    for payload_type, middle in _LAYOUT_MIDDLES:
        keyid_start = payload_end + len(middle)
        sig_start = keyid_start + 64 + len(_LAYOUT_SIG)
        if (line.startswith(middle, payload_end) and _KEYID.fullmatch(line, keyid_start, keyid_start + 64)
                and line.startswith(_LAYOUT_SIG, keyid_start + 64) and line.find(b'"', sig_start) == len(line) - 4):
            view = memoryview(line)  # decode in place, without copying the base64 out first
            try:
                payload = binascii.a2b_base64(view[len(_LAYOUT_HEAD):payload_end], strict_mode=True)
                signature = binascii.a2b_base64(view[sig_start:-len(_LAYOUT_TAIL)], strict_mode=True)
            except ValueError:
                return None
            keyid = line[keyid_start:keyid_start + 64].decode("ascii")
            return Envelope(payload_type, payload, ((keyid, signature),))
    return None


def parse_envelope(line: bytes | str) -> Envelope:
    """Decode the JSON envelope and its base64 fields; verifies nothing."""
    if isinstance(line, bytes):
        envelope = _parse_written_layout(line)
        if envelope is not None:
            return envelope
    return parse_json_envelope(line)


def parse_json_envelope(line: bytes | str) -> Envelope:
    """`parse_envelope` without the shortcut: any JSON layout, and errors that say what is wrong."""
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

"""Receipt wire format: canonical JSON, DSSE, the predicate contract, interop with securesystemslib."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime, timedelta, timezone

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from nodeagent.contracts.receipt import (
    EXECUTION_PREDICATE_TYPE,
    INTOTO_PAYLOAD_TYPE,
    ExecutionPredicate,
    ExecutionStatement,
    KeyRotationStatement,
    ReceiptInput,
)
from nodeagent.receipts.canonical import canonical_json
from nodeagent.receipts.dsse import EnvelopeError, b64decode_any, parse_envelope, pae, sign_envelope
from nodeagent.receipts.entry import build_execution_line, build_rotation_line, inspect_line
from nodeagent.receipts.keys import PublicKey, Signer
from nodeagent.receipts.samples import STATUSES, sample_input

# ------------------------------------------------------------------ canonical JSON
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**60), max_value=2**60)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)


def _reference(value):
    try:
        return rfc8785.dumps(value)
    except Exception as exc:  # noqa: BLE001 - the reference's refusal is the expected outcome
        return type(exc)


@settings(max_examples=400, deadline=None)
@given(json_values)
def test_canonical_json_is_byte_identical_to_rfc8785(value):
    expected = _reference(value)
    if isinstance(expected, type):
        with pytest.raises(Exception):
            canonical_json(value)
    else:
        assert canonical_json(value) == expected


@settings(max_examples=200, deadline=None)
@given(st.text(), st.text(alphabet=st.characters(max_codepoint=0x7F)))
def test_canonical_json_strings_and_ascii_keys_take_the_fast_path_exactly(text, key):
    value = {key: text, "z": [text, 1, None, True], "a": {"b": text}}
    assert canonical_json(value) == rfc8785.dumps(value)


def test_statement_payload_is_rfc8785_of_itself():
    line = build_execution_line(sample_input(3), seq=3, previous=b"\x11" * 32, signer=Signer.generate())
    payload = parse_envelope(line).payload
    assert rfc8785.dumps(json.loads(payload)) == payload
    assert rfc8785.dumps(json.loads(line)) == line  # the envelope line is canonical too


def _schema_types(node, found):
    if isinstance(node, dict):
        if "type" in node:
            found.add(node["type"] if isinstance(node["type"], str) else tuple(node["type"]))
        for value in node.values():
            _schema_types(value, found)
    elif isinstance(node, list):
        for value in node:
            _schema_types(value, found)
    return found


@pytest.mark.parametrize("model", [ExecutionStatement, KeyRotationStatement])
def test_statement_schemas_have_no_floats(model):
    types = _schema_types(model.model_json_schema(by_alias=True), set())
    assert "number" not in types  # JSON Schema's "number" admits floats; every count is "integer"
    assert "integer" in types


# ------------------------------------------------------------------ contract rules
def _wire(**changes):
    data = sample_input(1).to_wire()
    for dotted, value in changes.items():
        node = data
        *path, last = dotted.split(".")
        for part in path:
            node = node[part]
        node[last] = value
    return data


@pytest.mark.parametrize("field,value,message", [
    ("usage.promptTokens", 1.0, "valid integer"),
    ("usage.promptTokens", True, "valid integer"),
    ("usage.promptTokens", -1, "greater than or equal"),
    ("usage.promptTokens", 2**53, "less than or equal"),
    ("timing.queuedAt", "2025-01-02T03:04:05", "UTC"),
    ("timing.queuedAt", "2025-01-02T03:04:05+02:00", "UTC"),
    ("timing.finishedAt", "2025-01-02T03:04:04Z", "before"),
    ("pod.requestDigest", "abc", "pattern"),
    ("model.digest", "sha256:" + "A" * 64, "pattern"),
    ("provider.imageDigest", "sha256:" + "a" * 64, "container launch modes"),
    ("outcome.errorClass", "Boom", "null when status is succeeded"),
    ("outputDigest", None, "outputDigest"),
    ("pod.tenant", "bad\nname", "pattern"),
])
def test_receipt_input_rejects_bad_values_and_names_them(field, value, message):
    with pytest.raises(ValidationError) as err:
        ReceiptInput.model_validate(_wire(**{field: value}))
    assert message in str(err.value)


def test_times_are_normalized_and_naive_times_refused():
    data = _wire(**{"timing.queuedAt": "2025-01-02T03:04:05Z"})
    assert ReceiptInput.model_validate(data).timing.queued_at == "2025-01-02T03:04:05.000000Z"
    naive = datetime(2025, 1, 2, 3, 4, 5)
    with pytest.raises(ValidationError, match="timezone-aware"):
        ReceiptInput.model_validate(_wire(**{"timing.queuedAt": naive}))
    aware = datetime(2025, 1, 2, 5, 4, 5, 7, tzinfo=timezone(timedelta(hours=2)))
    assert ReceiptInput.model_validate(_wire(**{"timing.queuedAt": aware})).timing.queued_at == "2025-01-02T03:04:05.000007Z"


def test_failed_and_refused_need_an_error_class_and_refused_needs_no_provider():
    for status in STATUSES:
        sample_input(2, status)  # every status has a valid shape
    with pytest.raises(ValidationError, match="errorClass is required"):
        ReceiptInput.model_validate(_wire(**{"outcome.status": "failed"}))
    refused = sample_input(4, "refused")
    assert refused.provider is None and refused.output_digest is None


def test_predicate_requires_genesis_rule():
    line = build_execution_line(sample_input(0), seq=0, previous=None, signer=Signer.generate())
    predicate = json.loads(parse_envelope(line).payload)["predicate"]
    assert predicate["log"] == {"seq": 0, "previousLeafHash": None}
    ExecutionPredicate.model_validate(predicate)
    predicate["log"]["seq"] = 5
    with pytest.raises(ValidationError, match="previousLeafHash must be null for seq 0"):
        ExecutionPredicate.model_validate(predicate)


def test_statement_layout():
    signer = Signer.generate()
    receipt = sample_input(7)
    line = build_execution_line(receipt, seq=7, previous=b"\x22" * 32, signer=signer)
    envelope = json.loads(line)
    assert envelope["payloadType"] == INTOTO_PAYLOAD_TYPE
    assert envelope["signatures"][0]["keyid"] == signer.key_id
    statement = json.loads(base64.b64decode(envelope["payload"]))
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == EXECUTION_PREDICATE_TYPE
    assert statement["subject"] == [
        {"name": "request", "digest": {"sha256": receipt.pod.request_digest.removeprefix("sha256:")}},
        {"name": "output", "digest": {"sha256": receipt.output_digest.removeprefix("sha256:")}},
    ]
    predicate = statement["predicate"]
    assert predicate["log"] == {"seq": 7, "previousLeafHash": "22" * 32}
    assert predicate["machine"]["keyId"] == signer.key_id
    assert set(predicate) == {"log", "machine", "pod", "model", "provider", "placement", "cache", "timing",
                              "usage", "outcome", "policy"}
    assert predicate["placement"]["chosen"]["terms"]["ttftUs"] == receipt.placement.chosen.terms.ttft_us


# ------------------------------------------------------------------ keys
def test_key_id_is_sha256_of_der_spki():
    signer = Signer.generate()
    der = signer.public.der
    assert signer.key_id == hashlib.sha256(der).hexdigest()
    assert PublicKey.from_pem(signer.public.pem()).key_id == signer.key_id
    assert PublicKey.from_b64_der(signer.public.b64_der).key_id == signer.key_id


# ------------------------------------------------------------------ DSSE
def test_pae_matches_the_dsse_spec_example():
    assert pae("http://example.com/HelloWorld", b"hello world") == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"


def test_base64_standard_and_urlsafe_padded_or_not():
    data = bytes(range(256))
    std = base64.b64encode(data).decode()
    url = base64.urlsafe_b64encode(data).decode()
    assert "+" in std and "-" in url
    for text in (std, url, std.rstrip("="), url.rstrip("=")):
        assert b64decode_any(text) == data
    for bad in ("ab+-", "a!bc", "abcde", 7):
        with pytest.raises(EnvelopeError) as err:
            b64decode_any(bad)
        assert err.value.check == "base64"


def test_urlsafe_reencoded_envelope_still_verifies():
    signer = Signer.generate()
    line = build_execution_line(sample_input(1), seq=0, previous=None, signer=signer)
    envelope = json.loads(line)
    envelope["payload"] = base64.urlsafe_b64encode(base64.b64decode(envelope["payload"])).decode().rstrip("=")
    for sig in envelope["signatures"]:
        sig["sig"] = base64.urlsafe_b64encode(base64.b64decode(sig["sig"])).decode()
    facts = inspect_line(json.dumps(envelope).encode(), {signer.key_id: signer.public})
    assert facts.ok, facts.failures


def test_signature_is_checked_before_the_payload_is_parsed():
    signer, other = Signer.generate(), Signer.generate()
    garbage = sign_envelope(b"{not json", INTOTO_PAYLOAD_TYPE, [other])
    facts = inspect_line(garbage, {signer.key_id: signer.public})
    assert [c for c, _ in facts.failures] == ["signature"]  # never reached "statement"
    assert facts.statement is None
    facts = inspect_line(garbage, {other.key_id: other.public})
    assert [c for c, _ in facts.failures] == ["statement"]


def test_rotation_entry_needs_both_signatures():
    old, new = Signer.generate(), Signer.generate()
    line = build_rotation_line(old, new, seq=3, previous=b"\x01" * 32, rotated_at=datetime.now(timezone.utc))
    facts = inspect_line(line, {old.key_id: old.public})
    assert facts.ok and facts.rotation[1].key_id == new.key_id
    envelope = json.loads(line)
    envelope["signatures"] = envelope["signatures"][:1]  # drop the new key's signature
    facts = inspect_line(json.dumps(envelope).encode(), {old.key_id: old.public})
    assert ("rotation" in [c for c, _ in facts.failures]) and facts.rotation is None


# ------------------------------------------------------------------ interop: securesystemslib
def _sslib_key(public_pem: str, key_id: str):
    """Build the key the way an in-toto user would: from our PEM, with securesystemslib's own classes."""
    from cryptography.hazmat.primitives.serialization import load_pem_public_key
    from securesystemslib.signer import SSlibKey

    return SSlibKey.from_crypto(load_pem_public_key(public_pem.encode()), keyid=key_id)


def test_securesystemslib_verifies_our_envelopes_and_rejects_tampered_ones():
    from securesystemslib.dsse import Envelope
    from securesystemslib.exceptions import VerificationError

    signer = Signer.generate()
    line = build_execution_line(sample_input(5), seq=5, previous=b"\x33" * 32, signer=signer)
    key = _sslib_key(signer.public.pem(), signer.key_id)
    # Independent key id: securesystemslib never computes ours; recompute it from the DER here.
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

    der = load_pem_public_key(signer.public.pem().encode()).public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert hashlib.sha256(der).hexdigest() == signer.key_id

    accepted = Envelope.from_dict(json.loads(line)).verify([key], 1)
    assert list(accepted) == [signer.key_id]

    def tampered(mutate):
        document = json.loads(line)
        mutate(document)
        return Envelope.from_dict(document)

    statement = json.loads(parse_envelope(line).payload)
    statement["predicate"]["usage"]["completionTokens"] += 1
    forged_payload = base64.b64encode(canonical_json(statement)).decode()
    cases = {
        "payload": lambda d: d.update(payload=forged_payload),
        "payloadType": lambda d: d.update(payloadType="application/json"),
        "signature": lambda d: d["signatures"][0].update(
            sig=base64.b64encode(bytes(64)).decode()),
    }
    for name, mutate in cases.items():
        with pytest.raises(VerificationError):
            tampered(mutate).verify([key], 1)
    # And a different key, even with our key id, is refused.
    impostor = _sslib_key(Signer.generate().public.pem(), signer.key_id)
    with pytest.raises(VerificationError):
        Envelope.from_dict(json.loads(line)).verify([impostor], 1)


def test_we_verify_envelopes_signed_by_securesystemslib():
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import CryptoSigner

    private = Ed25519PrivateKey.generate()
    ours = Signer(private)
    their_signer = CryptoSigner(private, _sslib_key(ours.public.pem(), ours.key_id))
    reference = build_execution_line(sample_input(9), seq=0, previous=None, signer=ours)
    payload = parse_envelope(reference).payload
    envelope = Envelope(payload, INTOTO_PAYLOAD_TYPE, {})
    envelope.sign(their_signer)
    line = json.dumps(envelope.to_dict()).encode()
    facts = inspect_line(line, {ours.key_id: ours.public})
    assert facts.ok, facts.failures
    assert facts.seq == 0 and facts.signers == (ours.key_id,)


def test_json_digest_is_sha256_of_the_canonical_form():
    from nodeagent.receipts.canonical import json_digest

    request = {"turns": [{"messages": [{"role": "user", "content": "héllo"}]}], "model": "tiny"}
    assert json_digest(request) == "sha256:" + hashlib.sha256(rfc8785.dumps(request)).hexdigest()
    assert json_digest(dict(reversed(list(request.items())))) == json_digest(request)  # key order is irrelevant


def test_agent_version_defaults_to_ours():
    from nodeagent import __version__

    data = sample_input(0).to_wire()
    del data["machine"]["agentVersion"]
    assert ReceiptInput.model_validate(data).machine.agent_version == __version__

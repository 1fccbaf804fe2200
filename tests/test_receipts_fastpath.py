"""The verifier's fast paths change speed, never verdicts.

* Signatures: libsodium (the default backend) and OpenSSL agree on every
  signature we make and on altered ones; libsodium is the stricter of the two.
* Envelopes in our writer's layout are cut apart without the JSON decoder:
  the result equals the JSON decoder's, and anything else goes to it.
* Payloads are decoded by pydantic-core's JSON parser, with ``json.loads``
  deciding whatever it refuses: the same values, or the same error.
* Parallel verification reports exactly what serial verification reports.
"""

from __future__ import annotations

import base64
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.contracts.receipt import INTOTO_PAYLOAD_TYPE, ExecutionStatement
from nodeagent.receipts import ReceiptLog, Signer, verify_bundle
from nodeagent.receipts.canonical import canonical_json
from nodeagent.receipts.dsse import EnvelopeError, Envelope, pae, parse_envelope, parse_json_envelope, sign_envelope
from nodeagent.receipts.entry import build_execution_line, inspect_line, load_json
from nodeagent.receipts.keys import PublicKey, set_verify_backend, verify_backend
from nodeagent.receipts.samples import STATUSES, sample_input
from nodeagent.receipts.verify import PARALLEL_MIN_ENTRIES


@pytest.fixture
def backend():
    """Run a block with a chosen verify backend; restores the default afterwards."""
    original = verify_backend()
    yield set_verify_backend
    set_verify_backend(original)


# ------------------------------------------------------------------ signatures
@settings(max_examples=60, deadline=None)
@given(message=st.binary(max_size=3000), flip=st.integers(min_value=0, max_value=64 * 8 - 1))
def test_both_backends_accept_our_signatures_and_refuse_altered_ones(message, flip):
    signer = Signer.generate()
    signature = signer.sign(message)
    altered = bytearray(signature)
    altered[flip // 8] ^= 1 << (flip % 8)
    original = verify_backend()
    try:
        for name in ("sodium", "openssl"):
            set_verify_backend(name)
            assert signer.public.verify(signature, message), name
            assert not signer.public.verify(bytes(altered), message), name
            assert not signer.public.verify(signature, message + b"!"), name
    finally:
        set_verify_backend(original)


def test_sodium_is_the_default_and_unknown_backends_are_refused():
    assert verify_backend() == "sodium"
    with pytest.raises(ValueError, match="unknown Ed25519 verify backend 'gpg'"):
        set_verify_backend("gpg")
    assert verify_backend() == "sodium"


# The identity point as a "public key" (y = 1), in a DER SubjectPublicKeyInfo, and the
# signature (R = identity, S = 0): [S]B = R + [k]A holds for every message, so a
# verifier that accepts small-order points accepts it as anyone's signature on anything.
IDENTITY_SPKI = bytes.fromhex("302a300506032b6570032100") + b"\x01" + bytes(31)
IDENTITY_FORGERY = b"\x01" + bytes(31) + bytes(32)


def test_libsodium_refuses_the_small_order_forgery_that_openssl_accepts(backend):
    key = PublicKey.from_der(IDENTITY_SPKI)
    backend("openssl")
    assert key.verify(IDENTITY_FORGERY, b"any message at all")  # why OpenSSL is not the default
    backend("sodium")
    assert not key.verify(IDENTITY_FORGERY, b"any message at all")

    # The same through a whole entry: trusting such a key still verifies nothing.
    payload = canonical_json({"_type": "https://in-toto.io/Statement/v1"})
    line = canonical_json({"payload": base64.b64encode(payload).decode(), "payloadType": INTOTO_PAYLOAD_TYPE,
                           "signatures": [{"keyid": key.key_id, "sig": base64.b64encode(IDENTITY_FORGERY).decode()}]})
    facts = inspect_line(line, {key.key_id: key})
    assert [check for check, _ in facts.failures] == ["signature"] and not facts.signers


def test_a_signature_of_the_wrong_length_never_verifies(backend):
    """libsodium takes signature || message and splits at 64 bytes: a 63-byte signature must not
    shift that split and be checked as a signature over the message minus its first byte."""
    signer = Signer.generate()
    for attempt in range(2000):
        # The signature's last byte is the top byte of S < 2**253: 0..31, mostly 0..15.
        message = bytes([attempt % 16]) + b"DSSEv1 payload %d" % attempt
        shifted = signer.sign(message[1:])
        if shifted[63] == message[0]:
            break
    else:  # pragma: no cover - about 1/16 per attempt
        pytest.fail("no suitable message found")
    short = shifted[:63]
    assert signer.public.verify(short + message[:1], message[1:])  # the bytes line up exactly
    for name in ("sodium", "openssl"):
        backend(name)
        assert not signer.public.verify(short, message), name
        assert not signer.public.verify(shifted + b"\x00", message[1:]), name
        assert not signer.public.verify(b"", message), name


# ------------------------------------------------------------------ envelopes
def _general(line):
    try:
        return parse_json_envelope(line)
    except EnvelopeError as exc:
        return (exc.check, exc.detail)


def _parsed(line):
    try:
        return parse_envelope(line)
    except EnvelopeError as exc:
        return (exc.check, exc.detail)


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=400), payload_type=st.sampled_from([INTOTO_PAYLOAD_TYPE, "application/json", "x"]),
       signers=st.integers(min_value=1, max_value=2), data=st.data())
def test_the_layout_shortcut_equals_the_json_decoder_on_lines_and_on_damaged_lines(payload, payload_type, signers, data):
    keys = [Signer.generate() for _ in range(signers)]
    line = sign_envelope(payload, payload_type, keys)
    assert parse_envelope(line) == parse_json_envelope(line) == Envelope(
        payload_type, payload, tuple((k.key_id, k.sign(pae(payload_type, payload))) for k in keys))
    # Damage: overwrite, insert or delete a few bytes anywhere; both parsers must agree.
    damaged = bytearray(line)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
        position = data.draw(st.integers(min_value=0, max_value=len(damaged)))
        action = data.draw(st.sampled_from(["set", "insert", "delete"]))
        byte = data.draw(st.sampled_from(list(b'"\\=+/-_{}[],:aA0 \n\xff')))
        if action == "set" and position < len(damaged):
            damaged[position] = byte
        elif action == "insert":
            damaged.insert(position, byte)
        elif position < len(damaged):
            del damaged[position]
    assert _parsed(bytes(damaged)) == _general(bytes(damaged))


@pytest.mark.parametrize("change", [
    lambda e: e["signatures"][0].update(sig=base64.b64encode(bytes(63)).decode()),
    lambda e: e["signatures"][0].update(sig=base64.b64encode(bytes(65)).decode()),
    lambda e: e["signatures"][0].update(keyid="AB" * 32),
    lambda e: e["signatures"][0].update(keyid="ab" * 31),
    lambda e: e.update(payload=e["payload"].rstrip("=")),
    lambda e: e.update(payload=e["payload"].replace("+", "-").replace("/", "_")),
    lambda e: e.update(payload="%%%"),
])
def test_canonical_lines_outside_the_shortcut_are_judged_by_the_json_decoder(change):
    """Lines still in canonical JSON but not exactly as we write them (other base64 forms, other
    lengths): the shortcut declines or agrees, and the verdict is the JSON decoder's."""
    line = build_execution_line(sample_input(1), seq=1, previous=bytes(32), signer=Signer.generate())
    envelope = json.loads(line)
    change(envelope)
    altered = canonical_json(envelope)
    assert _parsed(altered) == _general(altered)


# ------------------------------------------------------------------ statements
def _same(a, b):
    """Equal JSON values, NaN included, and of the same types (1 vs 1.0 vs True)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) and _types(a) == _types(b)


def _types(value):
    if isinstance(value, dict):
        return {k: _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value).__name__


def _json_loads_or_error(data):
    try:
        return json.loads(data)
    except ValueError as exc:
        return exc


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(value=JSON_VALUES, ensure_ascii=st.booleans(), data=st.data())
def test_load_json_equals_json_loads_on_documents_and_on_damaged_bytes(value, ensure_ascii, data):
    text = json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", errors="surrogatepass")
    damaged = bytearray(text)
    for _ in range(data.draw(st.integers(min_value=0, max_value=3))):
        position = data.draw(st.integers(min_value=0, max_value=len(damaged)))
        damaged.insert(position, data.draw(st.sampled_from(list(b'"\\u{}[],:0e.-+ \xef\xbb\xbf\xff'))))
    for document in (text, bytes(damaged), b"\xef\xbb\xbf" + text):
        expected = _json_loads_or_error(document)
        try:
            got = load_json(document)
        except ValueError as exc:
            assert isinstance(expected, ValueError) and str(exc) == str(expected)
        else:
            assert not isinstance(expected, ValueError) and _same(got, expected)


def test_a_key_given_by_wire_name_and_by_python_name_is_refused():
    """pydantic's JSON mode ignores ``type_`` next to ``_type`` (the dict path refuses it), which
    is why statements are validated from the decoded dict, not with ``model_validate_json``."""
    signer = Signer.generate()
    statement = json.loads(parse_envelope(
        build_execution_line(sample_input(2), seq=2, previous=bytes(32), signer=signer)).payload)
    for key, where in (("type_", statement), ("run_id", statement["predicate"]["pod"])):
        changed = json.loads(json.dumps(statement))
        target = changed if where is statement else changed["predicate"]["pod"]
        target[key] = "not what the wire name says"
        payload = canonical_json(changed)
        ExecutionStatement.model_validate_json(payload)  # the quirk: accepted
        facts = inspect_line(sign_envelope(payload, INTOTO_PAYLOAD_TYPE, [signer]), {signer.key_id: signer.public})
        assert [check for check, _ in facts.failures] == ["statement"], facts.failures
        assert key in facts.failures[0][1]


# ------------------------------------------------------------------ parallel verification
def _rewrite(path, seq, mutate):
    lines = path.read_bytes().split(b"\n")
    lines[seq] = mutate(lines[seq])
    path.write_bytes(b"\n".join(lines))


def test_parallel_verification_reports_what_serial_does_across_a_rotation(tmp_path, backend):
    first, second = Signer.generate(), Signer.generate()
    source = tmp_path / "log"
    total = PARALLEL_MIN_ENTRIES + 300
    with ReceiptLog(source, first, checkpoint_every=400) as log:
        for i in range(total // 2):
            log.append(sample_input(i, STATUSES[i % 4]))
        log.rotate(second)
        for i in range(total // 2, total):
            log.append(sample_input(i, STATUSES[i % 4]))
    # One altered signature before the rotation, one statement re-signed with a bad field after it.
    def bad_signature(line):
        envelope = json.loads(line)
        signature = bytearray(base64.b64decode(envelope["signatures"][0]["sig"]))
        signature[10] ^= 1
        envelope["signatures"][0]["sig"] = base64.b64encode(bytes(signature)).decode()
        return canonical_json(envelope)

    _rewrite(source / "receipts.jsonl", 100, bad_signature)

    def bad_usage(line):
        statement = json.loads(parse_envelope(line).payload)
        statement["predicate"]["usage"]["promptTokens"] = -1
        return sign_envelope(canonical_json(statement), INTOTO_PAYLOAD_TYPE, [second])

    _rewrite(source / "receipts.jsonl", total - 50, bad_usage)
    anchors = {first.key_id: first.public}  # only the first key: the rotation extends trust
    reports = {}
    for name in ("sodium", "openssl"):
        backend(name)
        for jobs in (1, 2):
            reports[(name, jobs)] = verify_bundle(source, anchors, receipt=total - 10, jobs=jobs).to_dict()
    serial = reports[("sodium", 1)]
    assert all(report == serial for report in reports.values())
    assert serial["rotations"] == 1 and sorted(serial["trustedKeys"]) == sorted([first.key_id, second.key_id])
    by_seq = {}
    for failure in serial["failures"]:
        by_seq.setdefault(failure["seq"], set()).add(failure["check"])
    assert by_seq[100] >= {"signature"}
    assert "statement" in by_seq[total - 50]
    detail = [f["detail"] for f in serial["failures"] if f["seq"] == total - 50 and f["check"] == "statement"][0]
    assert detail.startswith("predicate.usage.promptTokens:")
    # Entry 100 changed, so no signed root from there on matches, and nothing proves entry total - 10.
    assert "merkle-root" in by_seq[0] and "inclusion" in {f["check"] for f in serial["failures"]}


def test_workers_are_not_forked_for_small_logs(tmp_path, monkeypatch):
    import multiprocessing

    signer = Signer.generate()
    with ReceiptLog(tmp_path / "small", signer) as log:
        for i in range(20):
            log.append(sample_input(i))

    def refuse(*args, **kwargs):
        raise AssertionError("no pool for a small log")

    monkeypatch.setattr(multiprocessing, "get_context", refuse)
    assert verify_bundle(tmp_path / "small", {signer.key_id: signer.public}, jobs=os.cpu_count() or 2).ok

"""RFC 6962 tree, proofs and their verification; signed checkpoint notes."""

from __future__ import annotations

import base64
import hashlib
import random

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from nodeagent.receipts.checkpoint import (
    Checkpoint,
    CheckpointError,
    note_verifier_key,
    open_checkpoint,
    sign_checkpoint,
)
from nodeagent.receipts.keys import Signer
from nodeagent.receipts.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    leaf_hash,
    node_hash,
    root_from_inclusion,
    verify_consistency,
    verify_inclusion,
)
from nodeagent.receipts.verify import verify_checkpoint_consistency

# The Certificate Transparency reference inputs and tree heads (RFC 6962 test data).
CT_DATA = [bytes.fromhex(h) for h in ("", "00", "10", "2021", "3031", "40414243", "5051525354555657",
                                      "606162636465666768696a6b6c6d6e6f")]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = [  # (leaf index, tree size, path)
    (0, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (5, 8, ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 3, ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"]),
    (1, 5, ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]
CT_CONSISTENCY = [  # (old size, new size, proof)
    (1, 1, []),
    (1, 8, ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"]),
    (6, 8, ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]),
    (2, 5, ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]),
]


def reference_root(leaves):
    """MTH straight from RFC 6962 §2.1, recursive over a list."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return node_hash(reference_root(leaves[:k]), reference_root(leaves[k:]))


def ct_tree(size=8):
    return MerkleTree([leaf_hash(d) for d in CT_DATA[:size]])


def test_roots_match_rfc6962_reference_for_every_size():
    tree = MerkleTree()
    assert tree.root().hex() == CT_ROOTS[0]
    for size, data in enumerate(CT_DATA, start=1):
        tree.append(leaf_hash(data))
        assert tree.root().hex() == CT_ROOTS[size]
        assert all(tree.root(s).hex() == CT_ROOTS[s] for s in range(size + 1))


@pytest.mark.parametrize("index,size,path", CT_INCLUSION)
def test_inclusion_proofs_match_reference_and_verify(index, size, path):
    tree = ct_tree()
    proof = tree.inclusion_proof(index, size)
    assert [p.hex() for p in proof] == path
    assert verify_inclusion(leaf_hash(CT_DATA[index]), index, size, proof, bytes.fromhex(CT_ROOTS[size]))


@pytest.mark.parametrize("old,new,path", CT_CONSISTENCY)
def test_consistency_proofs_match_reference_and_verify(old, new, path):
    tree = ct_tree()
    proof = tree.consistency_proof(old, new)
    assert [p.hex() for p in proof] == path
    assert verify_consistency(old, new, bytes.fromhex(CT_ROOTS[old]), bytes.fromhex(CT_ROOTS[new]), proof)


def _mutations(proof):
    """Every way to damage a proof by one step."""
    for i in range(len(proof)):
        flipped = bytearray(proof[i])
        flipped[i % 32] ^= 1
        yield proof[:i] + [bytes(flipped)] + proof[i + 1:]
        yield proof[:i] + proof[i + 1:]
    yield proof + [proof[-1] if proof else EMPTY_ROOT]


def test_every_inclusion_proof_verifies_and_no_damaged_one_does():
    rng = random.Random(6962)
    leaves = [leaf_hash(rng.randbytes(rng.randint(0, 40))) for _ in range(70)]
    tree = MerkleTree(leaves)
    for size in range(1, 71):
        root = tree.root(size)
        assert root == reference_root(leaves[:size])
        for index in range(size):
            proof = tree.inclusion_proof(index, size)
            assert verify_inclusion(leaves[index], index, size, proof, root)
            assert not verify_inclusion(leaf_hash(b"other"), index, size, proof, root)
            if size > 1:
                assert not verify_inclusion(leaves[index], (index + 1) % size, size, proof, root)
            for bad in _mutations(proof):
                assert not verify_inclusion(leaves[index], index, size, bad, root)
        assert root_from_inclusion(leaves[0], size, size, []) is None  # index out of range


def test_every_consistency_proof_verifies_and_rewritten_history_does_not():
    rng = random.Random(9162)
    leaves = [leaf_hash(rng.randbytes(8)) for _ in range(40)]
    tree = MerkleTree(leaves)
    for new in range(1, 41):
        for old in range(0, new + 1):
            proof = tree.consistency_proof(old, new)
            assert verify_consistency(old, new, tree.root(old), tree.root(new), proof)
            if 0 < old < new:
                for bad in _mutations(proof):
                    assert not verify_consistency(old, new, tree.root(old), tree.root(new), bad)
    # A log that rewrote entry 3 cannot prove consistency with the root signed before.
    forged = MerkleTree(leaves[:3] + [leaf_hash(b"rewritten")] + leaves[4:])
    for old in range(4, 20):
        proof = forged.consistency_proof(old, 30)
        assert not verify_consistency(old, 30, tree.root(old), forged.root(30), proof)
    assert not verify_consistency(10, 5, tree.root(10), tree.root(5), [])  # shrinking is never consistent


def test_tree_rejects_bad_arguments():
    tree = ct_tree(5)
    with pytest.raises(ValueError):
        tree.append(b"short")
    with pytest.raises(ValueError):
        tree.root(6)
    with pytest.raises(ValueError):
        tree.inclusion_proof(5, 5)
    with pytest.raises(ValueError):
        tree.consistency_proof(4, 3)


# ------------------------------------------------------------------ signed checkpoints
ORIGIN = "agent-machine/receipts/test"


def test_checkpoint_note_format_is_c2sp_and_verifies_independently():
    signer = Signer.generate()
    root = bytes.fromhex(CT_ROOTS[8])
    text = sign_checkpoint(Checkpoint(ORIGIN, 8, root), signer)
    body, signatures = text.split("\n\n")
    assert body == f"{ORIGIN}\n8\n{base64.b64encode(root).decode()}"
    assert signatures.startswith(f"\u2014 {ORIGIN} ") and signatures.endswith("\n")
    blob = base64.b64decode(signatures.rstrip("\n").split(" ")[2])
    # Key hash and signature per the signed-note spec, recomputed without our code.
    raw = signer.public.raw
    assert blob[:4] == hashlib.sha256(ORIGIN.encode() + b"\n\x01" + raw).digest()[:4]
    Ed25519PublicKey.from_public_bytes(raw).verify(blob[4:], (body + "\n").encode())
    name, key_hash, key_b64 = note_verifier_key(ORIGIN, signer.public).split("+", 2)  # base64 may hold "+"
    assert name == ORIGIN and bytes.fromhex(key_hash) == blob[:4] and base64.b64decode(key_b64) == b"\x01" + raw

    opened = open_checkpoint(text, [signer.public], ORIGIN)
    assert opened.checkpoint == Checkpoint(ORIGIN, 8, root) and opened.key_id == signer.key_id


@pytest.mark.parametrize("mutate,check", [
    (lambda t: t.replace("\n8\n", "\n9\n", 1), "checkpoint-signature"),
    (lambda t: t.replace(ORIGIN + "\n", ORIGIN + "x\n", 1), "checkpoint-signature"),
    (lambda t: t.split("\n\n")[0] + "\n", "checkpoint-format"),
    (lambda t: t.replace("\u2014", "-"), "checkpoint-format"),
])
def test_altered_checkpoints_are_rejected_by_name(mutate, check):
    signer = Signer.generate()
    text = sign_checkpoint(Checkpoint(ORIGIN, 8, bytes.fromhex(CT_ROOTS[8])), signer)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(mutate(text), [signer.public])
    assert err.value.check == check


def test_checkpoint_of_other_key_or_origin_is_rejected():
    signer, other = Signer.generate(), Signer.generate()
    text = sign_checkpoint(Checkpoint(ORIGIN, 3, EMPTY_ROOT), signer)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(text, [other.public])
    assert err.value.check == "checkpoint-signature"
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(text, [signer.public], origin="someone/else")
    assert err.value.check == "checkpoint-origin"


def test_consistency_between_two_signed_checkpoints_without_the_log():
    signer = Signer.generate()
    tree = ct_tree(8)
    old = sign_checkpoint(Checkpoint(ORIGIN, 5, tree.root(5)), signer)
    new = sign_checkpoint(Checkpoint(ORIGIN, 8, tree.root(8)), signer)
    proof = [p.hex() for p in tree.consistency_proof(5, 8)]
    keys = {signer.key_id: signer.public}
    assert verify_checkpoint_consistency(old, new, proof, keys).ok
    rewritten = MerkleTree([leaf_hash(d) for d in CT_DATA[:2]] + [leaf_hash(b"x")] + [leaf_hash(d) for d in CT_DATA[3:]])
    forged_new = sign_checkpoint(Checkpoint(ORIGIN, 8, rewritten.root(8)), signer)
    report = verify_checkpoint_consistency(old, forged_new, [p.hex() for p in rewritten.consistency_proof(5, 8)], keys)
    assert [f.check for f in report.failures] == ["consistency"]
    shrunk = verify_checkpoint_consistency(new, old, [], keys)
    assert [f.check for f in shrunk.failures] == ["truncation"]

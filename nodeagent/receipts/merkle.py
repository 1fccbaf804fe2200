"""RFC 6962 Merkle tree: leaf and node hashes, proofs, and their verification.

``leaf = SHA-256(0x00 || data)``, ``node = SHA-256(0x01 || left || right)``;
a tree of n leaves splits at k, the largest power of two smaller than n
(RFC 6962 §2.1). The empty tree's hash is SHA-256 of the empty string.

`MerkleTree` is the prover: append-only, it keeps the hash of every complete,
aligned power-of-two subtree, so appends are amortized O(1) and roots and
proofs for any earlier size are O(log n) (every left half in the RFC's
recursion is such a subtree). Memory: about 64 bytes per leaf.

`verify_inclusion` and `verify_consistency` are the verifier, written from
RFC 9162 §2.1.3.2 and §2.1.4.2 and sharing no code with the prover.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """Append-only tree over leaf hashes. Not thread-safe; callers serialize."""

    def __init__(self, leaves: Sequence[bytes] = ()) -> None:
        # _levels[k] holds, back to back, the hashes of the complete subtrees
        # of 2**k leaves starting at multiples of 2**k.
        self._levels: list[bytearray] = [bytearray()]
        for leaf in leaves:
            self.append(leaf)

    @property
    def size(self) -> int:
        return len(self._levels[0]) // HASH_SIZE

    def append(self, leaf: bytes) -> None:
        if len(leaf) != HASH_SIZE:
            raise ValueError("leaf must be a 32-byte leaf hash")
        levels = self._levels
        index = len(levels[0]) // HASH_SIZE
        levels[0] += leaf
        level, right = 0, leaf
        while index & 1:  # this append completed a subtree of 2**(level+1) leaves; `right` is its right half
            left = levels[level][(index - 1) * HASH_SIZE:index * HASH_SIZE]
            right = hashlib.sha256(b"\x01" + left + right).digest()  # node_hash, inline: this runs per entry
            level += 1
            if len(levels) == level:
                levels.append(bytearray())
            levels[level] += right
            index >>= 1

    def leaf(self, index: int) -> bytes:
        self._check_index(index, self.size)
        return bytes(self._levels[0][index * HASH_SIZE:(index + 1) * HASH_SIZE])

    def _subtree(self, start: int, n: int) -> bytes:
        """MTH of leaves [start, start + n), n >= 1."""
        if n & (n - 1) == 0 and start % n == 0:
            level = n.bit_length() - 1
            position = start // n
            return bytes(self._levels[level][position * HASH_SIZE:(position + 1) * HASH_SIZE])
        k = _split(n)
        return node_hash(self._subtree(start, k), self._subtree(start + k, n - k))

    def root(self, size: int | None = None) -> bytes:
        size = self.size if size is None else size
        self._check_size(size)
        return EMPTY_ROOT if size == 0 else self._subtree(0, size)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 6962 PATH(index, D[0:size]): the audit path, leaf side first."""
        size = self.size if size is None else size
        self._check_size(size)
        self._check_index(index, size)
        proof: list[bytes] = []
        start, n, m = 0, size, index
        while n > 1:
            k = _split(n)
            if m < k:
                proof.append(self._subtree(start + k, n - k))
                n = k
            else:
                proof.append(self._subtree(start, k))
                start, n, m = start + k, n - k, m - k
        proof.reverse()
        return proof

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 6962 PROOF(old_size, D[0:new_size]); empty when old_size is 0 or equal."""
        new_size = self.size if new_size is None else new_size
        self._check_size(new_size)
        if not 0 <= old_size <= new_size:
            raise ValueError(f"old size {old_size} must be between 0 and {new_size}")
        if old_size in (0, new_size):
            return []
        proof: list[bytes] = []
        start, n, m, complete = 0, new_size, old_size, True
        while m != n:
            k = _split(n)
            if m <= k:
                proof.append(self._subtree(start + k, n - k))
                n = k
            else:
                proof.append(self._subtree(start, k))
                start, n, m, complete = start + k, n - k, m - k, False
        if not complete:
            proof.append(self._subtree(start, n))
        proof.reverse()
        return proof

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise ValueError(f"tree size {size} is outside 0..{self.size}")

    @staticmethod
    def _check_index(index: int, size: int) -> None:
        if not 0 <= index < size:
            raise ValueError(f"leaf index {index} is outside 0..{size - 1}")


# ------------------------------------------------------------------ verifier (RFC 9162)
def root_from_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes]) -> bytes | None:
    """The root implied by an inclusion proof, or None when the proof's shape is wrong."""
    if not 0 <= index < size:
        return None
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return None
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return r if sn == 0 else None


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes) -> bool:
    return root_from_inclusion(leaf, index, size, proof) == root


def verify_consistency(old_size: int, new_size: int, old_root: bytes, new_root: bytes,
                       proof: Sequence[bytes]) -> bool:
    """True iff the tree of ``new_size`` leaves extends the one of ``old_size``."""
    if not 0 <= old_size <= new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof  # every tree extends the empty one
    if not proof:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root

"""Prefix blocks: the one definition of block size, salt and chained block key.

A prompt is a token sequence. It is cut into blocks of ``BLOCK_TOKENS`` tokens;
only *full* blocks are keyed (a trailing partial block is never cached, as in
vLLM). Block ``i``'s key is

    key(i) = sha256( key(i-1) || tokens(i) as little-endian uint32 || salt(i) )

with ``key(-1)`` the 32-byte domain tag ``ROOT``. Because each key covers its
parent, equal keys at depth ``i`` mean equal token prefixes of ``(i+1) *
BLOCK_TOKENS`` tokens under equal salts (up to a SHA-256 collision).

The salt binds what makes a KV state reusable (the model digest) and who may
reuse it (the cache scope): ``public`` -> "public"; ``tenant`` -> the tenant
id; ``private`` -> the tenant id and, when given, the agent. Two tenants
therefore never share a private or tenant key, while public keys are shared.
A prefix is only as shared as its most private segment so far, so the salt may
change at block boundaries towards *more* private scopes (public -> tenant ->
private) but never back; `block_keys` takes such spans and enforces this.

Nothing else in the code base computes a block key.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from dataclasses import dataclass
from typing import Literal, Sequence

BLOCK_TOKENS = 64
KEY_BYTES = 32
ROOT = hashlib.sha256(b"agent-machine/kv-block/v1").digest()
_MAX_TOKEN = 2**32 - 1

Scope = Literal["private", "tenant", "public"]
SCOPES: tuple[Scope, ...] = ("public", "tenant", "private")  # least to most private
_PRIVACY = {name: rank for rank, name in enumerate(SCOPES)}


@dataclass(frozen=True)
class Namespace:
    """Who may reuse a KV prefix, and for which model: the input of the salt."""

    model_digest: str
    scope: Scope = "private"
    tenant: str | None = None
    agent: str | None = None

    def __post_init__(self) -> None:
        if not self.model_digest:
            raise ValueError("a cache namespace needs the model digest")
        if self.scope not in _PRIVACY:
            raise ValueError(f"cache scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")
        if self.scope != "public" and not self.tenant:
            raise ValueError(f"cache scope {self.scope!r} needs a tenant id")

    @property
    def owner(self) -> str:
        """The human-readable owner the salt binds: 'public', the tenant, or tenant/agent."""
        if self.scope == "public":
            return "public"
        if self.scope == "private" and self.agent:
            return f"{self.tenant}/{self.agent}"
        return str(self.tenant)

    def salt(self) -> bytes:
        # NUL separators: no (model, owner) pair can be spelled as another.
        return hashlib.sha256(
            b"\x00".join([b"agent-machine/kv-salt/v1", self.model_digest.encode(), self.scope.encode(),
                          self.owner.encode()])
        ).digest()


def privacy(scope: Scope) -> int:
    return _PRIVACY[scope]


def full_blocks(n_tokens: int, block_tokens: int = BLOCK_TOKENS) -> int:
    return n_tokens // block_tokens


def _pack(tokens: Sequence[int]) -> bytes:
    try:
        packed = array("I", tokens)  # 4-byte items on every platform CPython supports here
    except OverflowError as exc:
        raise ValueError(f"token ids must be in 0..{_MAX_TOKEN}") from exc
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def block_keys(
    tokens: Sequence[int],
    namespace: Namespace | Sequence[tuple[int, Namespace]],
    *,
    block_tokens: int = BLOCK_TOKENS,
) -> list[bytes]:
    """Keys of every full block of ``tokens``, shallowest first.

    ``namespace`` is one `Namespace` for the whole sequence, or spans
    ``[(first_token, namespace), ...]`` sorted by ``first_token`` (the first at
    0), each more private than or as private as the one before, all for the
    same model. A block takes the namespace in force at its *last* token, so a
    block that straddles a boundary is as private as its most private token.
    """
    if block_tokens <= 0:
        raise ValueError("block_tokens must be positive")
    spans = _spans(namespace)
    salts = [(start, ns.salt()) for start, ns in spans]
    keys: list[bytes] = []
    parent = ROOT
    span_index = 0
    n_blocks = len(tokens) // block_tokens
    data = _pack(tokens[: n_blocks * block_tokens])
    width = 4 * block_tokens
    for i in range(n_blocks):
        last_token = (i + 1) * block_tokens - 1
        while span_index + 1 < len(salts) and salts[span_index + 1][0] <= last_token:
            span_index += 1
        parent = hashlib.sha256(parent + data[i * width:(i + 1) * width] + salts[span_index][1]).digest()
        keys.append(parent)
    return keys


def _spans(namespace: Namespace | Sequence[tuple[int, Namespace]]) -> list[tuple[int, Namespace]]:
    if isinstance(namespace, Namespace):
        return [(0, namespace)]
    spans = list(namespace)
    if not spans or spans[0][0] != 0:
        raise ValueError("namespace spans must start at token 0")
    for (start_a, ns_a), (start_b, ns_b) in zip(spans, spans[1:]):
        if start_b <= start_a:
            raise ValueError("namespace spans must be sorted by first token, without repeats")
        if ns_b.model_digest != ns_a.model_digest:
            raise ValueError("all namespace spans of one sequence must name the same model")
        if privacy(ns_b.scope) < privacy(ns_a.scope):
            raise ValueError(
                f"cache scope may only become more private along a prefix ({ns_a.scope} -> {ns_b.scope} is not)"
            )
    return spans


def key_hex(key: bytes) -> str:
    return key.hex()

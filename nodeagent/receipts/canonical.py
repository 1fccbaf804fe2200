"""RFC 8785 (JSON Canonicalization Scheme) serialization.

`canonical_json` is the one serializer for everything that is signed or
hashed. The `rfc8785` package is the reference; for the values receipts
consist of — objects with ASCII keys, strings, integers within ±(2**53-1),
booleans, null — the standard library's encoder with sorted keys and no
whitespace emits exactly the same bytes about seven times faster, which
matters on the append path. The equality is a property test
(tests/test_receipts_format.py). Anything outside that domain (a float, a
non-ASCII key, a larger integer) goes to `rfc8785`, whose rules then apply.

Why the fast path is exact on that domain: JCS sorts keys by UTF-16 code
units, which for ASCII is byte order, as ``sort_keys`` does; JCS escapes
only ``"``, ``\\`` and U+0000..U+001F, using ``\\b \\t \\n \\f \\r`` and
otherwise ``\\u00xx`` in lowercase hex, and writes every other character
as UTF-8 — `json.dumps` with ``ensure_ascii=False`` does the same; integers
are written in plain decimal by both.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import rfc8785

_MAX_EXACT = 2**53 - 1
_encoder = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _fast_path_exact(value: Any) -> bool:
    if isinstance(value, str) or value is None or value is True or value is False:
        return True
    if isinstance(value, int):
        return -_MAX_EXACT <= value <= _MAX_EXACT
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not key.isascii() or not _fast_path_exact(item):
                return False
        return True
    if isinstance(value, list):
        return all(_fast_path_exact(item) for item in value)
    return False  # floats, tuples, anything else: the reference decides


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 bytes of ``value``."""
    if _fast_path_exact(value):
        return _encoder.encode(value).encode("utf-8")
    return rfc8785.dumps(value)


def json_digest(value: Any) -> str:
    """``sha256:<hex>`` of the RFC 8785 form of ``value``: a digest anyone can recompute from the JSON.

    Use it for `PodRef.request_digest` (over the request as the planner sent it) and for
    output digests of structured outputs; for plain text, hash its UTF-8 bytes instead.
    """
    return "sha256:" + hashlib.sha256(canonical_json(value)).hexdigest()

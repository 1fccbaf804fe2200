"""Names: the one home of every naming rule the wire formats share.

A name a client sends travels far: into SQLite, metrics labels, the policy's
patterns, log lines and, above all, signed receipts. So each rule is checked
once, where the name enters (the pod contract, the model store), and is the
same rule every later contract accepts: a pod the node admits can always be
described by its receipt (a pod whose model name held a control character
was admitted and then killed the dispatcher when its receipt was refused).

* `RESOURCE_NAME`: pod names, tenants, agents, sessions (DNS-label-like).
* `MODEL_REFERENCE`: what names a model: ``NAME[:TAG]`` (NAME is lowercase
  parts joined by ``/``; upper case is accepted and folded, as the store does),
  ``sha256:<hex prefix>`` or a bare hex prefix; at most `MAX_MODEL_REFERENCE`.
* `PROVIDER_NAME`: a provider of this node (``llama-cpp-python/3f2a…``).
* `LABEL_PATTERN`: what a receipt records: printable, 1..253 characters.
  Receipts record names, they do not police them: `as_label` turns anything
  (say, a name stored by an older agent) into a label, so a pod that ran
  never loses its receipt.
"""

from __future__ import annotations

RESOURCE_NAME = r"^[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?$"
DIGEST = r"^sha256:[0-9a-f]{64}$"

MAX_LABEL = 253
LABEL_PATTERN = r"^[^\x00-\x1f\x7f]{1,253}$"

# One part of a model name, and a tag: the model store parses with these.
MODEL_NAME = r"[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*"
MODEL_TAG = r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}"
MAX_MODEL_REFERENCE = 200
# Case-insensitive name (the store folds it) with an optional tag; a digest
# reference ``sha256:abc123`` has the same shape (name ``sha256``, tag = hex).
# (No look-ahead for the length: schema-driven generators do not read one; the
# contract checks `MAX_MODEL_REFERENCE` beside the pattern.)
MODEL_REFERENCE = r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*(:%s)?$" % MODEL_TAG

PROVIDER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$"

_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def as_label(text: str | None, fallback: str = "unnamed") -> str:
    """``text`` as a receipt label: control characters escaped (``\\x01``), at most
    `MAX_LABEL` characters (cut with ``…``), never empty."""
    if not text:
        return fallback
    escaped = text.translate(_CONTROL)
    return escaped if len(escaped) <= MAX_LABEL else escaped[:MAX_LABEL - 1] + "…"

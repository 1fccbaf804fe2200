"""Tool calls: the format a model's template asks for, and the calls in its reply.

A chat template that supports tools tells the model how to call one, and the
model answers in that format; the node turns the answer back into OpenAI's
``message.tool_calls``. Three families cover the common open models:

* ``hermes`` (Qwen2.5, Hermes 2/3 and their fine-tunes): any number of
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks,
  text before, between and after them allowed.
* ``llama3-json`` (Llama 3.1/3.2/3.3): the whole reply is
  ``{"name": ..., "parameters": {...}}`` (several: a JSON array, or objects
  separated by ``;``), optionally after ``<|python_tag|>``.
* ``mistral`` (Mistral 7B v0.3, Nemo, Small): ``[TOOL_CALLS] [{"name": ...,
  "arguments": {...}}, ...]``.

**Detection** reads the template's source for the markup it writes: a template
that never writes a tool-call marker (SmolLM2's, ChatML) has no format, and
its replies are always plain content.

**Never lose text.** A block that is not a well-formed call (bad JSON, no
name, arguments that are not an object) stays in the content verbatim, as
does an unclosed block (the reply ran out of tokens). Whitespace that only
separated a call from the text around it goes with the call.

**Control tokens.** Providers detokenize without control tokens, so
Mistral's ``[TOOL_CALLS]`` and Llama's ``<|python_tag|>`` (control tokens in
those vocabularies) may never reach the text: the bare forms (a reply that is
only the JSON) parse too. Hermes' ``<tool_call>`` is ordinary text in Qwen's
vocabulary and always arrives.

**Ids** are ``call_`` + 24 hex digits, derived from ``id_seed`` (the pod id)
when given, so a replayed request answers the same ids; Mistral's template
refuses any id that is not 9 alphanumerics, so its ids are 9 hex digits (or
the model's own, when it wrote a valid one).

**Streaming.** `ReplyStream` feeds on the pieces a provider generates and
returns the text that is content whatever comes next; text that is, or may
still become, a tool call is held until the reply ends. What it sends is
always a prefix of the finished reply's content, so a client that joins the
deltas gets the same message as a non-streamed request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from nodeagent.contracts.pod import FunctionCall, ToolCall

__all__ = ["ParsedReply", "ReplyStream", "ToolCallFormat", "detect_format"]

log = logging.getLogger("agent_machine.toolcalls")

_MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")
_MAX_NAME = 128
_MAX_ARGUMENTS = 65536


class ToolCallFormat(str, Enum):
    HERMES = "hermes"
    LLAMA3_JSON = "llama3-json"
    MISTRAL = "mistral"

    @property
    def marker(self) -> str:
        """The text that opens a call anywhere in a reply."""
        return _MARKERS[self]

    @property
    def bare_starts(self) -> str:
        """First characters of a reply that may be a call written without its marker."""
        return _BARE_STARTS[self]

    def parse(self, text: str, *, id_seed: str | None = None) -> "ParsedReply":
        """The content and the tool calls of a finished reply."""
        pieces = _PARSERS[self](text)
        calls = [_tool_call(self, raw, id_seed, index)
                 for index, raw in enumerate(p for p in pieces if isinstance(p, _RawCall))]
        if not calls:
            return ParsedReply(text, [])
        return ParsedReply(_content(pieces), calls)

    def held_from(self, text: str) -> int:
        """Where the part of ``text`` that may belong to a tool call starts (``len(text)``
        when none may): everything before it is content whatever the model writes next."""
        stripped = text.lstrip()
        if not stripped or stripped[0] in self.bare_starts:
            return 0  # a call written bare is the whole reply: hold it all until the end
        cut = text.find(self.marker)
        if cut < 0:
            cut = len(text) - _partial_marker(text, self.marker)
        while cut > 0 and text[cut - 1].isspace():
            cut -= 1  # whitespace before a call goes with the call
        return cut


def detect_format(source: str) -> ToolCallFormat | None:
    """The tool-call format a chat template's source asks the model for (None: no tools)."""
    if "[TOOL_CALLS]" in source:
        return ToolCallFormat.MISTRAL
    if "<tool_call>" in source:
        return ToolCallFormat.HERMES
    if "<|python_tag|>" in source or ("<|start_header_id|>" in source and '"parameters"' in source):
        return ToolCallFormat.LLAMA3_JSON
    return None


@dataclass(frozen=True)
class ParsedReply:
    """A reply split into content and calls. ``content`` is the text as generated when
    there are no calls; with calls it is None when nothing but the calls was written."""

    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


class ReplyStream:
    """Sort a reply into content and tool calls while it is generated.

    ``feed`` returns the text that may go to the client now; ``finish`` returns
    the content not yet sent and the calls. Without a format everything is sent
    as it comes."""

    def __init__(self, fmt: ToolCallFormat | None, *, id_seed: str | None = None) -> None:
        self._format = fmt
        self._id_seed = id_seed
        self._text = ""
        self._sent = 0

    def feed(self, piece: str) -> str:
        self._text += piece
        safe = len(self._text) if self._format is None else self._format.held_from(self._text)
        if safe <= self._sent:
            return ""
        out = self._text[self._sent:safe]
        self._sent = safe
        return out

    def finish(self) -> ParsedReply:
        """The rest of the content (None when nothing is left to send) and the calls."""
        if self._format is None:
            return ParsedReply(self._text[self._sent:] or None, [])
        parsed = self._format.parse(self._text, id_seed=self._id_seed)
        content, sent = parsed.content or "", self._text[:self._sent]
        if content.startswith(sent):
            rest = content[len(sent):]
        else:  # cannot happen (held_from stops before any call); never lose text if it does
            log.warning("streamed content is not a prefix of the parsed reply; sending the whole content again")
            rest = content
        return ParsedReply(rest or None, parsed.tool_calls)


# ------------------------------------------------------------------ parsing
@dataclass(frozen=True)
class _RawCall:
    name: str
    arguments: str
    id: str | None = None


# A reply as pieces: content text, and the calls taken out of it (in order).
_Pieces = list["str | _RawCall"]


def _parse_hermes(text: str) -> _Pieces:
    opening, closing = "<tool_call>", "</tool_call>"
    pieces: _Pieces = []
    pos = 0
    pending = ""  # content since the last call, malformed blocks included verbatim
    while True:
        start = text.find(opening, pos)
        end = -1 if start < 0 else text.find(closing, start + len(opening))
        if end < 0:  # no further block, or one left unclosed (out of tokens): content
            pending += text[pos:]
            break
        call = _call_of(_json_value(text[start + len(opening):end]), "arguments")
        if call is None:
            pending += text[pos:end + len(closing)]
        else:
            pieces += [pending + text[pos:start], call]
            pending = ""
        pos = end + len(closing)
    pieces.append(pending)
    return pieces


def _parse_llama3(text: str) -> _Pieces:
    tag = "<|python_tag|>"
    at = text.find(tag)
    if at >= 0:
        before, body = text[:at], text[at + len(tag):]
    elif text.lstrip()[:1] in ("{", "["):
        before, body = "", text
    else:
        return [text]
    calls = _call_sequence(body, "parameters", "arguments")
    if calls is None:
        return [text]  # e.g. a built-in tool's `name.call(...)`, or a JSON answer that is no call
    return [before, *calls, ""]


def _parse_mistral(text: str) -> _Pieces:
    marker = "[TOOL_CALLS]"
    at = text.find(marker)
    if at >= 0:
        before, body = text[:at], text[at + len(marker):]
    elif text.lstrip().startswith("["):
        before, body = "", text
    else:
        return [text]
    decoded = _json_prefix(body)
    if decoded is None:
        return [text]
    value, end = decoded
    calls = _calls_in(value, "arguments")
    if calls is None:
        return [text]
    return [before, *calls, body[end:]]


_PARSERS = {ToolCallFormat.HERMES: _parse_hermes, ToolCallFormat.LLAMA3_JSON: _parse_llama3,
            ToolCallFormat.MISTRAL: _parse_mistral}
_MARKERS = {ToolCallFormat.HERMES: "<tool_call>", ToolCallFormat.LLAMA3_JSON: "<|python_tag|>",
            ToolCallFormat.MISTRAL: "[TOOL_CALLS]"}
_BARE_STARTS = {ToolCallFormat.HERMES: "", ToolCallFormat.LLAMA3_JSON: "{[", ToolCallFormat.MISTRAL: "["}


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _json_prefix(text: str) -> tuple[Any, int] | None:
    """The JSON value at the start of ``text`` (after whitespace) and where it ends."""
    start = len(text) - len(text.lstrip())
    try:
        value, end = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return None
    return value, end


def _call_sequence(text: str, *argument_keys: str) -> list[_RawCall] | None:
    """Calls written as JSON values one after another (separated by whitespace or ``;``),
    nothing else; None unless the whole text is calls."""
    calls: list[_RawCall] = []
    rest = text.lstrip(" \t\r\n;")
    while rest:
        decoded = _json_prefix(rest)
        if decoded is None:
            return None
        found = _calls_in(decoded[0], *argument_keys)
        if found is None:
            return None
        calls += found
        rest = rest[decoded[1]:].lstrip(" \t\r\n;")
    return calls or None


def _calls_in(value: Any, *argument_keys: str) -> list[_RawCall] | None:
    """One call (an object) or several (an array of objects); None unless every one is a call."""
    items = value if isinstance(value, list) else [value]
    calls = [_call_of(item, *argument_keys) for item in items]
    if not calls or any(call is None for call in calls):
        return None
    return calls  # type: ignore[return-value]


def _call_of(value: Any, *argument_keys: str) -> _RawCall | None:
    """``{"name": ..., "<arguments key>": {...}}`` as a call, or None when it is not one."""
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    if not isinstance(name, str) or not 0 < len(name) <= _MAX_NAME:
        return None
    arguments: Any = {}
    for key in argument_keys:
        if key in value:
            arguments = value[key]
            break
    if isinstance(arguments, str):  # JSON text already, as OpenAI writes it
        arguments = _json_value(arguments)
    if not isinstance(arguments, dict):
        return None
    text = json.dumps(arguments, ensure_ascii=False)
    if len(text) > _MAX_ARGUMENTS:
        return None
    given_id = value.get("id")
    return _RawCall(name, text, given_id if isinstance(given_id, str) else None)


def _tool_call(fmt: ToolCallFormat, raw: _RawCall, id_seed: str | None, index: int) -> ToolCall:
    return ToolCall(id=_call_id(fmt, raw, id_seed, index),
                    function=FunctionCall(name=raw.name, arguments=raw.arguments))


def _call_id(fmt: ToolCallFormat, raw: _RawCall, id_seed: str | None, index: int) -> str:
    token = secrets.token_hex(12) if id_seed is None else \
        hashlib.sha256(f"{id_seed}/tool-call/{index}".encode()).hexdigest()[:24]
    if fmt is ToolCallFormat.MISTRAL:
        # Mistral's template refuses ids that are not 9 alphanumerics when the history comes back.
        return raw.id if raw.id and _MISTRAL_ID.fullmatch(raw.id) else token[:9]
    return f"call_{token}"


def _content(pieces: _Pieces) -> str | None:
    """The text around the calls; whitespace touching a call goes with it."""
    out: list[str] = []
    for index, piece in enumerate(pieces):
        if isinstance(piece, _RawCall):
            continue
        if index > 0 and isinstance(pieces[index - 1], _RawCall):
            piece = piece.lstrip()
        if index + 1 < len(pieces) and isinstance(pieces[index + 1], _RawCall):
            piece = piece.rstrip()
        out.append(piece)
    text = "".join(out)
    return text if text.strip() else None


def _partial_marker(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0

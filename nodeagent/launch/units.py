"""systemd unit files (the INI dialect Quadlet reads): write, parse, quote.

A `UnitFile` keeps sections and entries in order and allows a key to repeat
(``Volume=``, ``Label=``, ``AddDevice=`` do), which `configparser` cannot.

Quoting follows what Quadlet does with list-valued keys (``Exec=``,
``PodmanArgs=``, ``Label=``, ``Environment=``): words split on whitespace,
double or single quotes group, backslash escapes inside quotes. Every value
ends up in the generated ``ExecStart=``, where systemd expands ``%``
specifiers and ``$VAR``; `escape_value` doubles both so a value arrives
verbatim, and `unescape_value` undoes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator


class UnitParseError(ValueError):
    """A unit file could not be parsed; the message names the line."""


@dataclass
class Section:
    name: str
    entries: list[tuple[str, str]] = field(default_factory=list)

    def add(self, key: str, value: str) -> None:
        if "\n" in value:
            raise ValueError(f"[{self.name}] {key}=: a value cannot span lines")
        self.entries.append((key, value))

    def get_all(self, key: str) -> list[str]:
        return [value for k, value in self.entries if k == key]

    def get(self, key: str) -> str | None:
        values = self.get_all(key)
        return values[-1] if values else None  # systemd: the last assignment wins


@dataclass
class UnitFile:
    sections: list[Section] = field(default_factory=list)
    header: list[str] = field(default_factory=list)  # comment lines before the first section

    def section(self, name: str, create: bool = True) -> Section:
        for section in self.sections:
            if section.name == name:
                return section
        if not create:
            raise KeyError(name)
        section = Section(name)
        self.sections.append(section)
        return section

    def has_section(self, name: str) -> bool:
        return any(s.name == name for s in self.sections)

    def get(self, section: str, key: str) -> str | None:
        return self.section(section, create=False).get(key) if self.has_section(section) else None

    def get_all(self, section: str, key: str) -> list[str]:
        return self.section(section, create=False).get_all(key) if self.has_section(section) else []

    def as_pairs(self) -> list[tuple[str, list[tuple[str, str]]]]:
        return [(s.name, list(s.entries)) for s in self.sections]

    def render(self) -> str:
        lines: list[str] = [f"# {line}" if line else "#" for line in self.header]
        for index, section in enumerate(self.sections):
            if lines:
                lines.append("")
            lines.append(f"[{section.name}]")
            lines.extend(f"{key}={value}" for key, value in section.entries)
        return "\n".join(lines) + "\n"


def parse_unit(text: str, source: str = "<unit>") -> UnitFile:
    """Parse a unit file. Comments (``#``, ``;``) and blank lines are dropped,
    a trailing backslash continues a line (joined with a space, as systemd does).
    """
    unit = UnitFile()
    current: Section | None = None
    pending = ""
    pending_start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if pending:
            if line.endswith("\\"):
                pending += " " + line[:-1].strip()
                continue
            line = pending + " " + line.strip()
            pending = ""
            number = pending_start
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            if current is None and stripped.startswith("#"):
                unit.header.append(stripped[1:].strip())
            continue
        if stripped.endswith("\\"):
            pending, pending_start = stripped[:-1].rstrip(), number
            continue
        if stripped.startswith("["):
            if not stripped.endswith("]") or len(stripped) < 3:
                raise UnitParseError(f"{source}:{number}: bad section header {stripped!r}")
            current = unit.section(stripped[1:-1].strip())
            continue
        if "=" not in stripped:
            raise UnitParseError(f"{source}:{number}: expected KEY=VALUE, got {stripped!r}")
        if current is None:
            raise UnitParseError(f"{source}:{number}: {stripped.split('=', 1)[0]!r} appears before any [Section]")
        key, value = stripped.split("=", 1)
        current.entries.append((key.strip(), value.strip()))
    if pending:
        raise UnitParseError(f"{source}:{pending_start}: file ends inside a continued line")
    return unit


# ------------------------------------------------------------------ values
def escape_value(value: str) -> str:
    """Protect ``%`` (systemd specifiers) and ``$`` (variable expansion)."""
    return value.replace("%", "%%").replace("$", "$$")


def unescape_value(value: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(value):
        ch = value[i]
        if ch in "%$" and i + 1 < len(value) and value[i + 1] == ch:
            out.append(ch)
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


_NEEDS_QUOTES = set(" \t\"'\\")


def quote_word(word: str) -> str:
    if word and not (_NEEDS_QUOTES & set(word)):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_words(words: Iterable[str]) -> str:
    return " ".join(quote_word(w) for w in words)


_C_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", " ": " "}


def split_words(text: str) -> list[str]:
    """Split like Quadlet: whitespace separates, quotes group, ``\\`` escapes."""
    return list(_iter_words(text))


def _iter_words(text: str) -> Iterator[str]:
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            return
        word: list[str] = []
        quote: str | None = None
        while i < n:
            ch = text[i]
            if quote is None and ch in " \t":
                break
            if ch == "\\" and i + 1 < n:
                nxt = text[i + 1]
                word.append(_C_ESCAPES.get(nxt, nxt))
                i += 2
                continue
            if quote is None and ch in "\"'":
                quote = ch
            elif quote is not None and ch == quote:
                quote = None
            else:
                word.append(ch)
            i += 1
        if quote is not None:
            raise UnitParseError(f"unterminated {quote} quote in {text!r}")
        yield "".join(word)

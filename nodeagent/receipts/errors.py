"""Errors of the receipts package. Each names what failed and where."""

from __future__ import annotations


class ReceiptError(Exception):
    """Base of every receipts error."""


class KeyFileError(ReceiptError):
    """A signing key could not be loaded or stored (names the file and why)."""


class LogBusy(ReceiptError):
    """Another process holds the log open for writing."""


class KeyMismatch(ReceiptError):
    """The signer given is not the key the log expects to sign its next entry."""

    def __init__(self, message: str, *, expected: str, given: str) -> None:
        super().__init__(message)
        self.expected = expected
        self.given = given


class LogCorrupt(ReceiptError):
    """The log on disk fails a check; ``seq`` is the entry concerned (None: the log as a whole)."""

    def __init__(self, check: str, detail: str, seq: int | None = None) -> None:
        where = f"entry {seq}: " if seq is not None else ""
        super().__init__(f"{where}{check}: {detail}")
        self.check = check
        self.detail = detail
        self.seq = seq


class LogClosed(ReceiptError):
    """The log was closed, or a write failed and it refuses further appends."""

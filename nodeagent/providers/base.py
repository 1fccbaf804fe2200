"""The provider adapter interface (ARCHITECTURE.md, "Providers and launch").

Every engine (embedded llama-cpp-python worker, llama-server, vLLM) is driven
through `Provider`. The scheduler reasons about a provider only through this
interface, so the same placement code serves all of them.

Conventions:
* Token ids are plain ``list[int]``; the provider's own tokenizer is the truth.
* A *slot* is one independent sequence context inside the provider (the
  embedded worker has one, llama-server has ``-np`` of them).
* Saved state is a file: ``save_state`` writes it to a path the node chooses
  (for llama-server, a file name inside its ``--slot-save-path``) and
  ``restore_state`` reads it back. The KV-cache tiers move those files.
* Errors raise `ProviderError` (or a subclass) with a message a person can act
  on; a crashed engine raises `ProviderCrashed` and never takes the node down.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generator, Iterator, Literal, Protocol, runtime_checkable

ProviderKind = Literal["llama_cpp_python", "llama_server", "vllm"]


class ProviderError(RuntimeError):
    """The provider refused or failed a request."""


class ProviderCrashed(ProviderError):
    """The engine process died; the adapter can be restarted."""


class ProviderUnavailable(ProviderError):
    """The provider is not running or not healthy yet."""


class StateUnsupported(ProviderError):
    """The provider cannot save or restore state (e.g. vLLM, or no --slot-save-path)."""


class StartRefused(ProviderError):
    """The node's activation decision refuses to start this provider (reasons in the message)."""

    def __init__(self, message: str, reasons: list[str] | None = None) -> None:
        super().__init__(message)
        self.reasons = list(reasons or [message])


class StateCorrupt(ProviderError):
    """A saved state could not be restored (bad digest, truncated, wrong model)."""


@dataclass(frozen=True)
class Health:
    ok: bool
    detail: str = ""  # "loading", "ok", "connection refused", ...
    checked_at: float = 0.0  # time.time() of the check


# Receives generated text as it comes; returning False asks the provider to stop.
TextSink = Callable[[str], "bool | None"]


@dataclass(frozen=True)
class GenerationRequest:
    """One completion over a prompt given as tokens (preferred) or text."""

    prompt_tokens: list[int] | None = None
    prompt_text: str | None = None
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy, so runs are reproducible
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    # The rest of llama.cpp's sampler chain (applied when temperature > 0, except
    # penalties, bias and grammar, which apply always); defaults leave it off.
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added logit
    grammar: str | None = None  # GBNF the output must match (JSON output, tool calls)
    slot: int = 0
    # At most this many tokens of the slot's live context may be reused (None:
    # any common prefix). The node sets it so that a context built under
    # another tenant's private scope is recomputed, never reused.
    reuse_limit: int | None = None


@dataclass(frozen=True)
class GenerationResult:
    text: str
    completion_tokens: list[int]
    prompt_tokens: int  # length of the whole prompt
    cached_tokens: int  # prompt tokens reused from the slot's context (not evaluated)
    evaluated_tokens: int  # prompt tokens actually evaluated (prefill)
    ttft_s: float  # request start to first generated token
    total_s: float
    finish_reason: Literal["stop", "length", "error", "cancelled"] = "stop"


@dataclass(frozen=True)
class SavedState:
    path: Path
    n_tokens: int  # the context length the state covers
    size_bytes: int
    save_s: float


@dataclass(frozen=True)
class RestoredState:
    n_tokens: int  # the context length the slot holds now
    size_bytes: int  # of the state read
    # The engine's own time restoring, without any wait in its queue (a sibling slot's
    # batch): the restore rate placement prices; the wait is a queue term, alike for
    # every cache option of the slot.
    restore_s: float


@dataclass(frozen=True)
class Rates:
    """Measured on this machine by the provider; the cost model's inputs."""

    prefill_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    restore_bytes_per_s: float | None = None
    save_bytes_per_s: float | None = None


RATE_EWMA = 0.3  # weight of the newest measurement in a provider's own rates


@dataclass
class MeasuredRates:
    """What a provider measured of itself: a moving average per quantity (None until measured)."""

    prefill: float | None = None  # tokens/s
    decode: float | None = None  # tokens/s
    save: float | None = None  # bytes/s
    restore: float | None = None  # bytes/s

    def update(self, name: str, value: float) -> None:
        old = getattr(self, name)
        setattr(self, name, value if old is None else (1 - RATE_EWMA) * old + RATE_EWMA * value)

    def snapshot(self) -> Rates:
        return Rates(prefill_tokens_per_s=self.prefill, decode_tokens_per_s=self.decode,
                     restore_bytes_per_s=self.restore, save_bytes_per_s=self.save)


@runtime_checkable
class Provider(Protocol):
    kind: ProviderKind
    name: str  # unique within the node

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def health(self) -> Health: ...
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``special``: parse special-token text (``<|im_end|>``) as
        those tokens, as a rendered chat template needs (a user's text is not parsed)."""
        ...
    def generate(self, request: GenerationRequest, *, on_text: TextSink | None = None) -> GenerationResult:
        """Run ``request``. With ``on_text``, each piece of text is passed to it as it is
        generated; when it returns False the generation stops after the current token
        (``finish_reason`` "cancelled") and the provider is free again."""
        ...
    def stream(self, request: GenerationRequest) -> Iterator[str]: ...
    def context_tokens(self, slot: int = 0) -> list[int]:
        """The tokens whose KV the slot holds now (tier T0)."""
        ...
    def save_state(self, slot: int, path: Path) -> SavedState: ...
    def restore_state(self, slot: int, path: Path, *, verify: bool = True) -> RestoredState:
        """Restore into ``slot``: the tokens it now holds and what the restore cost.

        ``verify=False``: the caller has just checked the whole file against a
        digest it keeps (the cache does, on every restore), so the provider may
        skip its own content hash; structural checks (header, size, model) stay.
        """
        ...
    def rates(self) -> Rates: ...


def feed(pieces: Generator[str, None, None], on_text: TextSink) -> bool:
    """Pass a provider's streamed pieces to ``on_text``; when it returns False, close the
    stream (closing ends the HTTP response, and the engine stops the request). True if cut."""
    for piece in pieces:
        if on_text(piece) is False:
            pieces.close()
            return True
    return False

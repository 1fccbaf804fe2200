"""A pod's context as tokens: segments, then turns, each appended exactly.

Why tokens and not text: turn k+1's prompt must *extend* turn k's context
token for token, or no cache can serve it. Re-tokenizing a whole transcript
does not guarantee that (tokenizers merge across boundaries, and a model's
reply re-tokenized may differ from the tokens it generated). So each piece is
tokenized on its own and appended, and the model's reply is appended as the
very tokens it generated.

Pieces use one plain, stable layout (``<|role|>\\n…\\n``). It is the same for
every model, which keeps prefixes shareable across pods; applying a model's
own chat template is future work (docs/architecture.md).

Scopes: each segment has a cache scope; a token is as shared as the most
private segment at or before it (scopes only narrow along the sequence), and
the turns are private to the pod's agent. `spans` is what
`nodeagent.kvcache.blocks.block_keys` takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from nodeagent.contracts.pod import SCOPE_ORDER, CacheScope, ContextSegment, Message
from nodeagent.kvcache.blocks import Namespace

Tokenize = Callable[[str, bool], list[int]]  # (text, add_bos) -> token ids


def segment_text(role: str, text: str) -> str:
    return f"<|{role}|>\n{text}\n"


def turn_text(messages: Sequence[Message], *, after_reply: bool) -> str:
    lead = "\n" if after_reply else ""  # closes the previous reply
    return lead + "".join(f"<|{m.role}|>\n{m.content}\n" for m in messages) + "<|assistant|>\n"


@dataclass
class SessionContext:
    model_digest: str
    tenant: str
    agent: str
    tokenize: Tokenize
    tokens: list[int] = field(default_factory=list)
    spans: list[tuple[int, Namespace]] = field(default_factory=list)
    replies: int = 0

    def _namespace(self, scope: CacheScope) -> Namespace:
        return Namespace(model_digest=self.model_digest, scope=scope.value,
                         tenant=None if scope is CacheScope.public else self.tenant,
                         agent=self.agent if scope is CacheScope.private else None)

    def _append(self, text: str, scope: CacheScope) -> None:
        current = self.spans[-1][1].scope if self.spans else None
        if current is not None and SCOPE_ORDER[CacheScope(current)] >= SCOPE_ORDER[scope]:
            scope = CacheScope(current)  # never widen again after a more private piece
        start = len(self.tokens)
        self.tokens.extend(self.tokenize(text, not self.tokens))
        if not self.spans or self.spans[-1][1].scope != scope.value:
            self.spans.append((start, self._namespace(scope)))

    def add_segments(self, segments: Sequence[ContextSegment], texts: Sequence[str]) -> None:
        """``texts[i]`` is segment i's text (resolved from its digest when sent without text)."""
        for segment, text in zip(segments, texts, strict=True):
            self._append(segment_text(segment.role, text), segment.scope)

    def add_turn(self, messages: Sequence[Message]) -> None:
        self._append(turn_text(messages, after_reply=self.replies > 0), CacheScope.private)

    def add_reply(self, completion_tokens: Sequence[int]) -> None:
        self.tokens.extend(completion_tokens)
        self.replies += 1
        if not self.spans:
            self.spans.append((0, self._namespace(CacheScope.private)))

    def spans_for(self, n_tokens: int) -> list[tuple[int, Namespace]]:
        """The spans that cover the first ``n_tokens`` (states may cover less than the whole)."""
        return [(s, ns) for s, ns in self.spans if s < max(n_tokens, 1)] or self.spans[:1]

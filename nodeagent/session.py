"""A pod's context as tokens: its segments and turns, through the model's chat template.

Every prompt is the model's own chat template (`nodeagent.templates`) over the
pod's messages — context segments first, as system messages in order, then
each turn's messages and the model's earlier replies — tokenized whole, with
special tokens parsed and no BOS added, exactly as llama.cpp's chat completion
does. A pod and the OpenAI request with the same messages produce the same
tokens.

Why the cache still works: after a turn the provider holds the prompt plus
the tokens it generated (`add_reply`). The next prompt renders the whole
conversation again; for a prefix-stable template (`ChatTemplate.stability`)
it starts with the previous prompt and the reply's text, so its longest
common token prefix with what the provider holds covers everything but the
template's end-of-turn markup (which the model's stop token replaced). Where
a template is not prefix-stable, the common prefix is shorter; placement and
the engine measure exactly that prefix, never assume more.

Scopes: each segment has a cache scope; a token is as shared as the most
private message at or before it (scopes only narrow along the sequence), and
the turns are private to the pod's agent. A boundary is placed where the
tokens of the rendered messages before it stop agreeing with the prompt's, so
a token merged across a boundary counts as the more private one. `spans` is
what `nodeagent.kvcache.blocks.block_keys` takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from nodeagent.contracts.pod import SCOPE_ORDER, CacheScope, ContextSegment, Message
from nodeagent.kvcache.blocks import Namespace
from nodeagent.templates import ChatTemplate, TemplateError

# Rendered prompt text -> token ids (special tokens parsed, no BOS added: the template writes its own).
Tokenize = Callable[[str], list[int]]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@dataclass
class SessionContext:
    model_digest: str
    tenant: str
    agent: str
    tokenize: Tokenize
    template: ChatTemplate
    tools: list[dict[str, Any]] | None = None  # OpenAI tool definitions, rendered by the template
    messages: list[dict[str, Any]] = field(default_factory=list)
    scopes: list[CacheScope] = field(default_factory=list)  # one per message, already narrowed
    tokens: list[int] = field(default_factory=list)
    spans: list[tuple[int, Namespace]] = field(default_factory=list)
    replies: int = 0
    # Tokens the provider held after the last reply that the next prompt did not
    # extend (a template that is not prefix-stable re-renders earlier turns).
    diverged_tokens: int = 0

    def _namespace(self, scope: CacheScope) -> Namespace:
        return Namespace(model_digest=self.model_digest, scope=scope.value,
                         tenant=None if scope is CacheScope.public else self.tenant,
                         agent=self.agent if scope is CacheScope.private else None)

    def _push(self, message: dict[str, Any], scope: CacheScope) -> None:
        if self.scopes and SCOPE_ORDER[self.scopes[-1]] > SCOPE_ORDER[scope]:
            scope = self.scopes[-1]  # never widen again after a more private message
        self.messages.append(message)
        self.scopes.append(scope)

    def add_segments(self, segments: Sequence[ContextSegment], texts: Sequence[str]) -> None:
        """``texts[i]`` is segment i's text (resolved from its digest when sent without text)."""
        for segment, text in zip(segments, texts, strict=True):
            self._push({"role": "system", "content": text}, segment.scope)

    def add_turn(self, messages: Sequence[Message | dict[str, Any]]) -> None:
        """Append a turn's messages and render the prompt (ending with the assistant's cue)."""
        for message in messages:
            wire = message if isinstance(message, dict) else message.template_dict()
            self._push(dict(wire), CacheScope.private)
        held = self.tokens
        self.tokens = self.tokenize(self.render(add_generation_prompt=True))
        if self.replies:
            self.diverged_tokens = len(held) - common_prefix(held, self.tokens)
        self.spans = self._spans()

    def add_prompt(self, text: str, tokenize_prompt: Tokenize) -> None:
        """A plain text completion: ``text`` is the whole prompt, tokenized as llama.cpp
        tokenizes a completion prompt (BOS as the model wants it), private to the pod."""
        self._push({"role": "user", "content": text}, CacheScope.private)
        self.tokens = tokenize_prompt(text)
        self.spans = [(0, self._namespace(self.scopes[-1]))]

    def add_reply(self, completion_tokens: Sequence[int], text: str = "") -> None:
        """The provider now holds the prompt and the tokens it generated; the conversation
        goes on with the reply's text as the assistant's message."""
        self.tokens = self.tokens + list(completion_tokens)
        self._push({"role": "assistant", "content": text}, CacheScope.private)
        self.replies += 1
        if not self.spans:
            self.spans.append((0, self._namespace(CacheScope.private)))

    def render(self, *, add_generation_prompt: bool = True, messages: Sequence[dict[str, Any]] | None = None) -> str:
        return self.template.render(self.messages if messages is None else messages,
                                    add_generation_prompt=add_generation_prompt, tools=self.tools)

    def _spans(self) -> list[tuple[int, Namespace]]:
        """One span per scope change, starting where the messages before it stop
        matching the prompt's tokens (so a boundary never starts late)."""
        spans: list[tuple[int, Namespace]] = []
        for index, scope in enumerate(self.scopes):
            if spans and spans[-1][1].scope == scope.value:
                continue
            start = 0
            if index > 0:
                try:
                    before = self.tokenize(self.render(add_generation_prompt=False, messages=self.messages[:index]))
                    start = common_prefix(before, self.tokens)
                except TemplateError:
                    start = 0  # the template cannot render the prefix alone: everything is this private
                start = max(start, spans[-1][0] if spans else 0)
            if spans and spans[-1][0] == start:
                spans[-1] = (start, self._namespace(scope))  # the narrower scope wins the tie
            else:
                spans.append((start, self._namespace(scope)))
        spans = spans or [(0, self._namespace(CacheScope.private))]
        if self.tools:
            spans = self._tools_private(spans)
        return spans

    def _tools_private(self, spans: list[tuple[int, Namespace]]) -> list[tuple[int, Namespace]]:
        """The pod's tool definitions are its own: wherever the template writes them (often
        inside the first system message), everything from there on is private, or another
        tenant sending the same public segment could probe for them through the cache."""
        try:
            without = self.tokenize(self.template.render(self.messages, add_generation_prompt=True, tools=None))
            cut = common_prefix(without, self.tokens)
        except TemplateError:
            cut = 0
        kept = [(start, ns) for start, ns in spans if start < cut]
        return kept + [(cut, self._namespace(CacheScope.private))]

    def spans_for(self, n_tokens: int) -> list[tuple[int, Namespace]]:
        """The spans that cover the first ``n_tokens`` (states may cover less than the whole)."""
        return [(s, ns) for s, ns in self.spans if s < max(n_tokens, 1)] or self.spans[:1]

"""A pod's text as its model's token ids: who tokenizes, and the pieces worth remembering."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from nodeagent.execution.pool import ProviderPool
from nodeagent.providers.base import ProviderError

log = logging.getLogger("agent_machine.execution")

TOKEN_CACHE_MIN_CHARS = 256  # shorter pieces (turn messages) are cheap and rarely repeat
TOKEN_CACHE_ENTRIES = 1024


@dataclass(frozen=True)
class Tokenizer:
    tokens: "PromptTokens"
    record: Any  # the model's store record

    def tokenize(self, text: str) -> list[int]:
        """Rendered prompt text -> ids: special tokens parsed, no BOS added (the template writes it)."""
        return self.tokens.tokenize(self.record, text)

    def tokenize_prompt(self, text: str) -> list[int]:
        """A text-completion prompt -> ids: BOS as the model wants it, special tokens parsed."""
        return self.tokens.tokenize(self.record, text, add_bos=True)



class PromptTokens:
    """Tokenizes prompt text for the executor, by the cheapest tokenizer that agrees with the model's providers."""

    def __init__(self, pool: ProviderPool) -> None:
        self.pool = pool
        self._token_cache: "OrderedDict[tuple[str, bool, str], tuple[int, ...]]" = OrderedDict()

    def tokenizer_for(self, record: Any, load: bool = True) -> "Tokenizer | None":
        """How this pod's pieces get tokenized: by the pool's tokenize-only provider when
        it has one for the model (never busy, and the model need not be loaded), else
        by whichever provider of the model is idle now (a busy one would make this pod
        wait behind another pod's prefill), loading the model when none holds it and
        ``load`` allows. Long pieces are remembered (segments repeat across pods)."""
        if self.pool.tokenizer(record) is None and not self.pool.for_model(record.digest):
            if not load:
                return None
            self.pool.load(record)
        return Tokenizer(self, record)

    def tokenize(self, record: Any, text: str, add_bos: bool = False) -> list[int]:
        """Ids of prompt text (special tokens parsed; BOS only with ``add_bos``: a chat
        template writes its own), by the model's tokenize-only worker when it has one,
        else by an idle provider of the model."""
        digest = record.digest
        key = (digest, add_bos, text)
        cached = self._token_cache.get(key)
        if cached is not None:
            self._token_cache.move_to_end(key)
            return list(cached)
        tokens: list[int] | None = None
        tokenizer = self.pool.tokenizer(record)
        if tokenizer is not None:
            try:
                tokens = tokenizer.tokenize(text, add_bos=add_bos, special=True)
            except ProviderError as exc:  # it died mid-call: started again next time
                log.warning("tokenizer %s failed (%s); tokenizing with a provider", tokenizer.name, exc)
        if tokens is None:
            candidates = self.pool.for_model(digest)
            if not candidates:
                raise ProviderError(f"no provider holds model {digest[:19]} to tokenize with")
            idle = [m for m in candidates if not m.turns.busy()]
            provider = (idle[0] if idle else min(candidates, key=lambda m: m.queued_requests)).provider
            tokens = provider.tokenize(text, add_bos=add_bos, special=True)
        if len(text) >= TOKEN_CACHE_MIN_CHARS:
            self._token_cache[key] = tuple(tokens)
            while len(self._token_cache) > TOKEN_CACHE_ENTRIES:
                self._token_cache.popitem(last=False)
        return tokens

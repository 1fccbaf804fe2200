"""The time-to-first-token cost model (ARCHITECTURE.md, "Scheduler").

    ttft = queue_wait + load_time + restore_time + prefill_time

    queue_wait   = running_remaining_s
                   + queued_prefill_tokens / prefill_rate
                   + queued_decode_tokens  / decode_rate
    load_time    = model_bytes / load_rate                 (0 when the model is hot)
    restore_time = restore_bytes / restore_rate(tier)      (0 for T0 or no cache)
    prefill_time = (prompt_tokens - cached_tokens) / prefill_rate

Rates come from a RateRegistry (measured, never constants). A term whose rate
is unknown is None and so is the total: the placement then says so instead of
inventing a number. Every term is non-negative, the total is non-decreasing in
the uncached tokens and in each queue quantity (property-tested).
"""

from __future__ import annotations

from dataclasses import dataclass

from nodeagent.scheduler.rates import DECODE, LOAD, PREFILL, RateEstimate, restore_quantity


@dataclass(frozen=True)
class CostInputs:
    prompt_tokens: int
    cached_tokens: int
    cache_source: str  # T0 | T1 | T2 | none
    restore_bytes: int = 0
    model_hot: bool = True
    model_bytes: int = 0
    queued_prefill_tokens: int = 0
    queued_decode_tokens: int = 0
    running_remaining_s: float = 0.0

    @property
    def uncached_tokens(self) -> int:
        return max(0, self.prompt_tokens - self.cached_tokens)


@dataclass(frozen=True)
class Terms:
    queue_wait_s: float | None
    load_s: float | None
    restore_s: float | None
    prefill_s: float | None

    @property
    def total(self) -> float | None:
        parts = (self.queue_wait_s, self.load_s, self.restore_s, self.prefill_s)
        return None if any(p is None for p in parts) else sum(parts)  # type: ignore[arg-type]


def _time(amount: float, rate: float | None) -> float | None:
    if amount <= 0:
        return 0.0
    if rate is None:
        return None
    return amount / rate


# One function per term: the definitions. placement._score writes the same
# arithmetic out inline (it runs per candidate per decision, where call overhead
# would dominate); a property test holds it equal to ttft_terms.
def queue_wait_s(queued_prefill_tokens: float, queued_decode_tokens: float, running_remaining_s: float,
                 prefill_rate: float | None, decode_rate: float | None) -> float | None:
    prefill = _time(queued_prefill_tokens, prefill_rate)
    decode = _time(queued_decode_tokens, decode_rate)
    if prefill is None or decode is None:
        return None
    return max(0.0, running_remaining_s) + prefill + decode


def load_s(model_hot: bool, model_bytes: float, load_rate: float | None) -> float | None:
    return 0.0 if model_hot else _time(model_bytes, load_rate)


def restore_s(cache_source: str, restore_bytes: float, restore_rate: float | None) -> float | None:
    return _time(restore_bytes, restore_rate) if cache_source in ("T1", "T2") else 0.0


def prefill_s(uncached_tokens: float, prefill_rate: float | None) -> float | None:
    return _time(uncached_tokens, prefill_rate)


def _value(rates: dict[str, RateEstimate], quantity: str) -> float | None:
    estimate = rates.get(quantity)
    return None if estimate is None else estimate.value


def ttft_terms(inputs: CostInputs, rates: dict[str, RateEstimate]) -> Terms:
    """The four terms for one candidate and one cache option. ``rates`` maps quantity -> estimate."""
    prefill_rate = _value(rates, PREFILL)
    restore_rate = (_value(rates, restore_quantity(inputs.cache_source))
                    if inputs.cache_source in ("T1", "T2") else None)
    return Terms(
        queue_wait_s(inputs.queued_prefill_tokens, inputs.queued_decode_tokens, inputs.running_remaining_s,
                     prefill_rate, _value(rates, DECODE)),
        load_s(inputs.model_hot, inputs.model_bytes, _value(rates, LOAD)),
        restore_s(inputs.cache_source, inputs.restore_bytes, restore_rate),
        prefill_s(inputs.uncached_tokens, prefill_rate),
    )

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


def _time(amount: float, rate: RateEstimate | None) -> float | None:
    if amount <= 0:
        return 0.0
    if rate is None or rate.value is None:
        return None
    return amount / rate.value


def ttft_terms(inputs: CostInputs, rates: dict[str, RateEstimate]) -> Terms:
    """The four terms for one candidate and one cache option. ``rates`` maps quantity -> estimate."""
    prefill = rates.get(PREFILL)
    queue_prefill = _time(inputs.queued_prefill_tokens, prefill)
    queue_decode = _time(inputs.queued_decode_tokens, rates.get(DECODE))
    queue = (None if queue_prefill is None or queue_decode is None
             else max(0.0, inputs.running_remaining_s) + queue_prefill + queue_decode)
    load = 0.0 if inputs.model_hot else _time(inputs.model_bytes, rates.get(LOAD))
    if inputs.cache_source in ("T1", "T2"):
        restore = _time(inputs.restore_bytes, rates.get(restore_quantity(inputs.cache_source)))
    else:
        restore = 0.0
    return Terms(queue, load, restore, _time(inputs.uncached_tokens, prefill))

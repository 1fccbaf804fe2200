"""Measured rates, refined online: the only numbers the cost model uses.

Quantities (per provider, or machine-wide with ``provider=None``):

=============================  =========================================
``prefill_tokens_per_s``       prompt tokens evaluated per second
``decode_tokens_per_s``        tokens generated per second
``restore_bytes_per_s:T1``     saved-state bytes restored per second from T1
``restore_bytes_per_s:T2``     ... from T2
``load_bytes_per_s``           model file bytes loaded per second
=============================  =========================================

Sources, in the order `estimate` trusts them for one provider: observations
of real runs (an exponentially weighted moving average, weight ``alpha`` on
the newest), else the provider's own start-up measurement (``Provider.rates()``)
or a calibration routine, else a machine-wide calibration (``provider=None``,
e.g. a tier's read throughput measured at start-up), else the **slowest**
value known for any provider (conservative: it over-estimates the time, so an
unmeasured provider is not preferred by accident), else unknown. The source
goes into every decision, so an estimate built on a fallback says so.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PREFILL = "prefill_tokens_per_s"
DECODE = "decode_tokens_per_s"
LOAD = "load_bytes_per_s"


def restore_quantity(tier: str) -> str:
    return f"restore_bytes_per_s:{tier}"


QUANTITIES = (PREFILL, DECODE, restore_quantity("T1"), restore_quantity("T2"), LOAD)
_RESOLVED_ORDER = (PREFILL, DECODE, LOAD, restore_quantity("T1"), restore_quantity("T2"))  # ProviderRates' fields
Source = Literal["observed", "provider", "calibrated", "fallback", "unknown"]
DEFAULT_ALPHA = 0.2


@dataclass(frozen=True)
class RateEstimate:
    quantity: str
    value: float | None
    source: Source
    samples: int = 0


class ProviderRates:
    """Every rate of one provider, resolved (own, machine-wide, fallback or unknown) at once:
    what placement reads per candidate, one dict lookup instead of one per quantity.
    The ``*_value`` attributes are the estimates' values (None: unknown). Immutable."""

    __slots__ = ("prefill", "decode", "load", "restore_t1", "restore_t2",
                 "prefill_value", "decode_value", "load_value", "restore_t1_value", "restore_t2_value")

    def __init__(self, prefill: RateEstimate, decode: RateEstimate, load: RateEstimate, restore_t1: RateEstimate,
                 restore_t2: RateEstimate) -> None:
        for name, estimate in (("prefill", prefill), ("decode", decode), ("load", load),
                               ("restore_t1", restore_t1), ("restore_t2", restore_t2)):
            object.__setattr__(self, name, estimate)
            object.__setattr__(self, f"{name}_value", estimate.value)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("ProviderRates is immutable")

    def restore(self, tier: str) -> RateEstimate:
        if tier == "T1":
            return self.restore_t1
        if tier == "T2":
            return self.restore_t2
        raise ValueError(f"no restore rate for tier {tier!r}")


class RateRegistry:
    """Thread-safe store of rates; reads are lock-free snapshots of immutable floats."""

    def __init__(self, alpha: float = DEFAULT_ALPHA) -> None:
        if not 0 < alpha <= 1:
            raise ValueError("EWMA alpha must be in (0, 1]")
        self.alpha = alpha
        # Immutable estimates, replaced on change: `estimate` returns them without allocating.
        self._rates: dict[tuple[str | None, str], RateEstimate] = {}
        self._lock = threading.Lock()
        self.generation = 0  # bumped on every change
        self._slowest: dict[str, tuple[int, float | None]] = {}  # quantity -> (generation, value)
        self._own_generation: dict[str | None, int] = {}  # bumped when that provider's own rates change
        # provider -> (rates, its own generation, registry generation or None when only its own rates were used)
        self._resolved: dict[str, tuple[ProviderRates, int, int | None]] = {}
        self._fast: dict[str, ProviderRates] = {}  # valid while generation == _fast_generation
        self._fast_generation = -1

    @staticmethod
    def _check(quantity: str, value: float) -> None:
        if quantity not in QUANTITIES:
            raise ValueError(f"unknown rate quantity {quantity!r}; one of {', '.join(QUANTITIES)}")
        if not value > 0:
            raise ValueError(f"rate {quantity} must be > 0, got {value!r}")

    def set(self, provider: str | None, quantity: str, value: float, source: Source) -> None:
        """Seed a rate (provider start-up measurement or calibration). An observed
        average is not overwritten by a seed: real runs beat start-up guesses."""
        self._check(quantity, value)
        with self._lock:
            current = self._rates.get((provider, quantity))
            if current is not None and current.source == "observed":
                return
            self._rates[(provider, quantity)] = RateEstimate(quantity, float(value), source, 0)
            self._bump(provider)

    def seed_from_provider(self, provider: str, rates) -> list[str]:
        """Take what ``Provider.rates()`` measured (a providers.base.Rates). Returns quantities set."""
        pairs = [(PREFILL, rates.prefill_tokens_per_s), (DECODE, rates.decode_tokens_per_s)]
        if rates.restore_bytes_per_s:
            pairs += [(restore_quantity("T1"), rates.restore_bytes_per_s),
                      (restore_quantity("T2"), rates.restore_bytes_per_s)]
        done = []
        for quantity, value in pairs:
            if value:
                self.set(provider, quantity, value, "provider")
                done.append(quantity)
        return done

    def observe(self, provider: str | None, quantity: str, amount: float, seconds: float) -> None:
        """Fold one observed run (``amount`` tokens or bytes in ``seconds``) into the average."""
        if amount <= 0 or seconds <= 0:
            return  # nothing was measured (fully cached prompt, empty state)
        value = amount / seconds
        self._check(quantity, value)
        with self._lock:
            current = self._rates.get((provider, quantity))
            if current is None or current.source != "observed":
                # The first observation replaces a seed: it measured this very workload.
                self._rates[(provider, quantity)] = RateEstimate(quantity, value, "observed", 1)
            else:
                self._rates[(provider, quantity)] = RateEstimate(
                    quantity, (1 - self.alpha) * current.value + self.alpha * value, "observed", current.samples + 1)
            self._bump(provider)

    def _bump(self, provider: str | None) -> None:
        """Under the lock: one provider's rates changed (None: a machine-wide one)."""
        self._own_generation[provider] = self._own_generation.get(provider, 0) + 1
        self.generation += 1

    def resolved(self, provider: str) -> ProviderRates:
        """All of ``provider``'s estimates at once, as `estimate` gives them.

        Cached: an entry built only from the provider's own rates stays valid
        until those change (another provider's observation does not touch it);
        one that used a machine-wide, fallback or unknown value is rebuilt after
        any change, since the slowest known value may have moved.
        """
        generation = self.generation
        if self._fast_generation == generation:  # nothing changed since the last call: one dict lookup
            fast = self._fast.get(provider)
            if fast is not None:
                return fast
        else:
            self._fast, self._fast_generation = {}, generation
        rates = self._resolve(provider)
        self._fast[provider] = rates
        return rates

    def _resolve(self, provider: str) -> ProviderRates:
        cached = self._resolved.get(provider)
        own = self._own_generation.get(provider, 0)
        if cached is not None and cached[1] == own and (cached[2] is None or cached[2] == self.generation):
            return cached[0]
        generation = self.generation  # read before the estimates: a concurrent change re-resolves next time
        estimates = [self.estimate(provider, quantity) for quantity in _RESOLVED_ORDER]
        only_own = all((provider, quantity) in self._rates for quantity in _RESOLVED_ORDER)
        rates = ProviderRates(*estimates)
        self._resolved[provider] = (rates, own, None if only_own else generation)
        return rates

    def estimate(self, provider: str | None, quantity: str) -> RateEstimate:
        rate = self._rates.get((provider, quantity))
        if rate is not None:
            return rate
        machine = self._rates.get((None, quantity))
        if machine is not None:
            return machine
        slowest = self._slowest_known(quantity)
        if slowest is not None:
            return RateEstimate(quantity, slowest, "fallback", 0)
        return RateEstimate(quantity, None, "unknown", 0)

    def _slowest_known(self, quantity: str) -> float | None:
        generation = self.generation
        cached = self._slowest.get(quantity)
        if cached is not None and cached[0] == generation:
            return cached[1]
        with self._lock:
            known = [r.value for (_, q), r in self._rates.items() if q == quantity]
        value = min(known) if known else None
        self._slowest[quantity] = (generation, value)
        return value

    def snapshot(self) -> dict[str, dict[str, RateEstimate]]:
        with self._lock:
            items = list(self._rates.items())
        out: dict[str, dict[str, RateEstimate]] = {}
        for (provider, quantity), rate in items:
            out.setdefault(provider or "*", {})[quantity] = rate
        return out


def calibrate_read_throughput(directory: str | Path, size_bytes: int = 32 << 20) -> float:
    """Bytes/s reading a freshly written file in ``directory`` (a tier's start-up calibration).

    On tmpfs this is RAM speed; on disk the file's pages are dropped from the
    page cache first, so it measures the device. Observed restores refine it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".calibrate-", dir=directory)
    try:
        block = os.urandom(1 << 20)
        with os.fdopen(fd, "wb") as handle:
            for _ in range(max(1, size_bytes >> 20)):
                handle.write(block)
            handle.flush()
            os.fsync(handle.fileno())
            # Drop the pages just written, so a disk tier is measured reading the
            # disk, not the page cache (on tmpfs this changes nothing: RAM is the medium).
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        start = time.perf_counter()
        read = 0
        with open(name, "rb", buffering=0) as handle:
            while chunk := handle.read(1 << 20):
                read += len(chunk)
        return read / max(time.perf_counter() - start, 1e-9)
    finally:
        os.unlink(name)

"""GreedyDual-Size-Frequency (GDSF) priorities for tier eviction.

Each tier keeps a clock L. An entry's priority is

    H = L + frequency * cost / size

with frequency = hits + 1, size = bytes, and cost = what dropping it costs
later: by default the tokens it saves from recomputation (a caller may pass
recompute seconds from measured prefill rates instead, see CacheManager). The
entry with the lowest H goes first (demoted from T1, dropped from T2), and L
rises to that H, so entries not used for a while age out even if they were
popular once. On a hit H is recomputed with the current L.
"""

from __future__ import annotations


def gdsf_priority(clock: float, hits: int, cost: float, size_bytes: int) -> float:
    if cost < 0:
        raise ValueError("GDSF cost must be >= 0")
    return clock + (hits + 1) * cost / max(size_bytes, 1)

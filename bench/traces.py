"""Seedable benchmark traces: SGLang's generated-shared-prefix and an agent trace.

Tokens are random ids below ``VOCAB`` (2^20). On the wire a token is its five
hex digits plus a space, so a prompt of n tokens is 6n characters and a
router that matches characters (SGLang's radix tree) sees exactly the token
structure the simulated workers and the oracles see.

A request is either open-loop (``after is None``: sent at ``arrival_s``) or
closed-loop (sent ``think_s`` after request ``after`` of the same session
completes). ``nominal_order`` sorts requests by the arrival they would have
with zero service time; the oracles use it when no run order is given.

Caches in this benchmark hold prompt blocks only (generated tokens are not
inserted), in the workers and in the oracles alike.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

VOCAB = 1 << 20
TOKEN_CHARS = 6  # "xxxxx "


@dataclass(frozen=True)
class TraceRequest:
    rid: str
    session: str  # the pod (agent trace) or group (GSP) the request belongs to
    group: str  # the shared-prefix group / agent
    tokens: tuple[int, ...]
    output_tokens: int
    arrival_s: float = 0.0  # open loop: when to send (seconds of simulated time)
    after: str | None = None  # closed loop: send think_s after this request completes
    think_s: float = 0.0


@dataclass
class Trace:
    name: str
    requests: list[TraceRequest]
    params: dict = field(default_factory=dict)

    def by_id(self) -> dict[str, TraceRequest]:
        return {r.rid: r for r in self.requests}

    def nominal_order(self) -> list[TraceRequest]:
        """Requests by arrival assuming zero service time (ties keep trace order)."""
        when: dict[str, float] = {}
        for r in self.requests:  # a request's `after` always precedes it in the list
            when[r.rid] = r.arrival_s if r.after is None else when[r.after] + r.think_s
        return sorted(self.requests, key=lambda r: when[r.rid])  # stable

    def prompt_tokens(self) -> int:
        return sum(len(r.tokens) for r in self.requests)

    def summary(self) -> dict:
        lengths = [len(r.tokens) for r in self.requests]
        return {"name": self.name, "requests": len(self.requests),
                "sessions": len({r.session for r in self.requests}),
                "groups": len({r.group for r in self.requests}),
                "prompt_tokens": sum(lengths), "mean_prompt": round(sum(lengths) / max(1, len(lengths)), 1),
                "max_prompt": max(lengths, default=0), "params": self.params}

    def save(self, path: str | Path) -> None:
        from nodeagent.fsutil import atomic_write_text

        atomic_write_text(path, json.dumps({"name": self.name, "params": self.params,
                                            "requests": [asdict(r) for r in self.requests]}))

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        data = json.loads(Path(path).read_text())
        return cls(data["name"], [TraceRequest(**{**r, "tokens": tuple(r["tokens"])}) for r in data["requests"]],
                   data.get("params", {}))


def encode(tokens: Sequence[int]) -> str:
    return " ".join(f"{t:05x}" for t in tokens)


def decode(text: str) -> list[int]:
    """Inverse of `encode`; anything that is not a 5-hex-digit token is an error."""
    try:
        return [int(word, 16) for word in text.split()]
    except ValueError as exc:
        raise ValueError(f"prompt is not a sequence of hex tokens: {exc}") from None


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def generated_shared_prefix(
    seed: int = 0,
    groups: int = 64,
    prompts_per_group: int = 16,
    system_prompt_len: int = 2048,
    question_len: int = 128,
    output_len: int = 256,
) -> Trace:
    """SGLang bench_serving `generated-shared-prefix` at its defaults: every prompt is a
    group's system prompt followed by its own question; all requests at once, shuffled."""
    rng = random.Random(seed)
    requests = []
    for g in range(groups):
        system = _tokens(rng, system_prompt_len)
        for p in range(prompts_per_group):
            requests.append(TraceRequest(rid=f"g{g}-q{p}", session=f"g{g}-q{p}", group=f"g{g}",
                                         tokens=tuple(system + _tokens(rng, question_len)),
                                         output_tokens=output_len))
    rng.shuffle(requests)
    return Trace("gsp", requests, dict(seed=seed, groups=groups, prompts_per_group=prompts_per_group,
                                       system_prompt_len=system_prompt_len, question_len=question_len,
                                       output_len=output_len))


def _zipf_weights(n: int, s: float) -> list[float]:
    return [1.0 / (rank ** s) for rank in range(1, n + 1)]


def agent_trace(
    seed: int = 0,
    agents: int = 16,
    pods: int = 96,
    zipf_s: float = 1.1,
    context_len: tuple[int, int] = (2048, 8192),
    task_len: tuple[int, int] = (50, 200),
    turns: tuple[int, int] = (3, 8),
    tool_result_len: tuple[int, int] = (200, 2000),
    reply_len: tuple[int, int] = (100, 500),
    think_mean_s: float = 3.0,
    pod_rate_per_s: float = 0.5,
) -> Trace:
    """Agent pods: each pod runs an agent (Zipf popularity) whose system + tool context
    (2-8K tokens) it shares with the agent's other pods, then its own task, then
    turns that each append a tool result and the previous reply; think time
    (exponential) between turns; pods start as a Poisson process."""
    rng = random.Random(seed)
    contexts = [_tokens(rng, rng.randint(*context_len)) for _ in range(agents)]
    weights = _zipf_weights(agents, zipf_s)
    requests: list[TraceRequest] = []
    start = 0.0
    for p in range(pods):
        start += rng.expovariate(pod_rate_per_s)
        agent = rng.choices(range(agents), weights=weights)[0]
        prompt = contexts[agent] + _tokens(rng, rng.randint(*task_len))
        previous: str | None = None
        for t in range(rng.randint(*turns)):
            reply = rng.randint(*reply_len)
            rid = f"p{p}-t{t}"
            requests.append(TraceRequest(
                rid=rid, session=f"p{p}", group=f"a{agent}", tokens=tuple(prompt), output_tokens=reply,
                arrival_s=round(start, 3) if previous is None else 0.0, after=previous,
                think_s=0.0 if previous is None else round(rng.expovariate(1.0 / think_mean_s), 3)))
            # Next turn: this prompt, the model's reply, then a tool result.
            prompt = prompt + _tokens(rng, reply) + _tokens(rng, rng.randint(*tool_result_len))
            previous = rid
    return Trace("agent", requests, dict(seed=seed, agents=agents, pods=pods, zipf_s=zipf_s,
                                         context_len=list(context_len), task_len=list(task_len),
                                         turns=list(turns), tool_result_len=list(tool_result_len),
                                         reply_len=list(reply_len), think_mean_s=think_mean_s,
                                         pod_rate_per_s=pod_rate_per_s))


TRACES = {"gsp": generated_shared_prefix, "agent": agent_trace}


# ------------------------------------------------------------------ the workload family (bench.sweep)
LOADS = (0.3, 0.6, 0.9)
PRESSURES = (0.5, 1.0, 2.0, 4.0)
SHARING = ("public", "private", "session", "compaction")
ARRIVALS = ("poisson", "bursts", "closed")


@dataclass(frozen=True)
class Fleet:
    """The simulated fleet a family trace is sized for; recorded in the trace's params."""

    workers: int = 4
    prefill_tps: float = 2000.0  # uncached prompt tokens per simulated second, per worker
    decode_tps: float = 40.0
    speedup: float = 5.0  # simulated seconds per wall second when it runs


@dataclass(frozen=True)
class Cell:
    """One point of the sweep grid.

    load: offered prefill work over the fleet's prefill capacity, where the work is
    the tokens that even Belady-optimal caching on the fleet's pooled device KV
    misses (O2 misses, nominal order): ``O2_misses / (span * workers * prefill_tps)``.
    pressure: the trace's working set (distinct 64-token blocks) over the fleet's
    device KV; the per-worker capacity is set from it.
    sharing: what prompts share (see `workload_trace`). arrivals: poisson, bursts or
    closed (closed-loop agents with think time).
    """

    load: float
    pressure: float
    sharing: str
    arrivals: str

    @property
    def name(self) -> str:
        return f"load{self.load:g}-ws{self.pressure:g}x-{self.sharing}-{self.arrivals}"


# Per sharing structure: (public prefix, agent-type prompt, tenant prompt, task, turns,
# reply, tool result, compaction period). Ranges are (lo, hi) tokens; 0 = absent.
_SHAPES = {
    # Shared tool definitions for everyone, then one of 8 agent types' prompts (Zipf):
    # most of every prompt is shared across tenants.
    "public": dict(public=1536, agent=(512, 1536), tenant=(0, 0), task=(50, 200), turns=(2, 5),
                   reply=(50, 200), tool=(100, 600), compact=0),
    # Each tenant its own system prompt (a few sessions per tenant): shared only within a tenant.
    "private": dict(public=0, agent=(0, 0), tenant=(1024, 3072), task=(50, 200), turns=(2, 5),
                    reply=(50, 200), tool=(100, 600), compact=0),
    # Long sessions: a short shared preamble, then history that grows every turn.
    "session": dict(public=256, agent=(0, 0), tenant=(0, 0), task=(100, 300), turns=(6, 12),
                    reply=(100, 300), tool=(300, 1000), compact=0),
    # The same, but every 4 turns the agent compacts: history is replaced by a summary.
    "compaction": dict(public=256, agent=(0, 0), tenant=(0, 0), task=(100, 300), turns=(6, 12),
                       reply=(100, 300), tool=(300, 1000), compact=4),
}
_AGENT_TYPES = 8
_SESSIONS_PER_TENANT = 3
_THINK_UNITS = 3.0  # mean gap between a session's turns, in units of the mean session inter-start
_BURST = 8  # sessions started together in a burst (a fan-out of one agent type / tenant)


def _sessions(rng: random.Random, cell: Cell, n_sessions: int) -> list[TraceRequest]:
    """Requests with times in abstract units (session starts at rate 1); `workload_trace`
    rescales them to the offered load."""
    shape = _SHAPES[cell.sharing]
    public = _tokens(rng, shape["public"])
    agents = [_tokens(rng, rng.randint(*shape["agent"])) for _ in range(_AGENT_TYPES)]
    weights = _zipf_weights(_AGENT_TYPES, 1.1)
    tenants: list[list[int]] = []
    requests: list[TraceRequest] = []
    start = 0.0
    for s in range(n_sessions):
        if cell.arrivals == "bursts":
            if s % _BURST == 0:
                start += rng.expovariate(1.0 / _BURST)
                burst_agent = rng.choices(range(_AGENT_TYPES), weights=weights)[0]
            agent = burst_agent
            begin = start + rng.uniform(0.0, 0.05)
        else:
            start += rng.expovariate(1.0)
            agent = rng.choices(range(_AGENT_TYPES), weights=weights)[0]
            begin = start
        if s % _SESSIONS_PER_TENANT == 0 or not tenants:
            tenants.append(_tokens(rng, rng.randint(*shape["tenant"])) if shape["tenant"][1] else [])
        tenant = tenants[-1] if cell.arrivals != "bursts" else tenants[(s // _BURST) % len(tenants)]
        head = public + agents[agent] + tenant
        history = _tokens(rng, rng.randint(*shape["task"]))
        previous: str | None = None
        at = begin
        for t in range(rng.randint(*shape["turns"])):
            rid = f"s{s}-t{t}"
            gap = rng.expovariate(1.0 / _THINK_UNITS)
            if cell.arrivals == "closed":
                arrival, after, think = (round(begin, 6), None, 0.0) if previous is None else (0.0, previous, gap)
            else:
                if previous is not None:
                    at += gap
                arrival, after, think = round(at, 6), None, 0.0
            requests.append(TraceRequest(rid=rid, session=f"s{s}", group=f"a{agent}", tokens=tuple(head + history),
                                         output_tokens=rng.randint(32, 128), arrival_s=arrival, after=after,
                                         think_s=think))
            previous = rid
            if shape["compact"] and (t + 1) % shape["compact"] == 0:
                history = _tokens(rng, rng.randint(300, 600))  # the summary replaces the history
            else:
                history = history + _tokens(rng, rng.randint(*shape["reply"])) + _tokens(rng, rng.randint(*shape["tool"]))
    if cell.arrivals != "closed":
        requests.sort(key=lambda r: r.arrival_s)  # open loop: trace order is arrival order
    return requests


def distinct_blocks(trace: "Trace") -> int:
    from bench.oracle import keys_of

    return len({k for r in trace.requests for k in keys_of(r.tokens)})


def _rescaled(requests: list[TraceRequest], factor: float) -> list[TraceRequest]:
    return [TraceRequest(r.rid, r.session, r.group, r.tokens, r.output_tokens, round(r.arrival_s * factor, 6),
                         r.after, round(r.think_s * factor, 6)) for r in requests]


def workload_trace(cell: Cell, seed: int = 0, scale: float = 1.0, fleet: Fleet = Fleet(),
                   span_s: float = 160.0) -> "Trace":
    """A trace of the family at one grid cell, sized for ``fleet``.

    Prompts are, in order: a public prefix shared by every session (tool
    definitions), an agent type's prompt (8 types, Zipf 1.1; shared across
    tenants), a tenant's private system prompt (``_SESSIONS_PER_TENANT``
    sessions per tenant), the session's task and its history (each turn appends
    the reply and a tool result; with compaction, every 4th turn replaces the
    history with a fresh summary). ``sharing`` picks which parts exist and how
    long sessions run (`_SHAPES`).

    Arrivals: ``poisson`` (sessions start as a Poisson process; turns follow at
    exponential gaps, open loop), ``bursts`` (sessions start in groups of 8 of
    one agent type/tenant within a moment, then as poisson), ``closed`` (each
    turn is sent a think time after the previous one completes).

    Sizing, in this order: sessions are added until the unique prompt tokens
    reach about ``load * workers * prefill_tps * span_s * scale``; the per-worker
    KV capacity is set so that the working set is ``pressure`` x the fleet's
    device KV; then times are rescaled so the O2 misses (`Cell`) arrive at
    ``load`` x the fleet's prefill capacity. The params record the cell, the
    seed and the fleet (with its capacity), so a saved trace replays the cell
    with ``python -m bench.routing --trace-file``.
    """
    from bench.oracle import keys_of, o1, o2

    if cell.sharing not in _SHAPES or cell.arrivals not in ARRIVALS:
        raise ValueError(f"unknown cell {cell}")
    rng = random.Random(f"{cell.name}/{seed}")
    target = cell.load * fleet.workers * fleet.prefill_tps * span_s * scale
    # Unique tokens per session, estimated from a probe, to pick the session count.
    probe = _sessions(random.Random(f"{cell.name}/{seed}/probe"), cell, 16)
    probe_trace = Trace("probe", probe)
    per_session = max(1.0, (probe_trace.prompt_tokens() - o1([r.tokens for r in probe_trace.nominal_order()]).hit_tokens) / 16)
    n_sessions = max(4, round(target / per_session))
    requests = _sessions(rng, cell, n_sessions)
    trace = Trace("workload", requests)
    blocks = distinct_blocks(trace)
    capacity = max(8, round(blocks / (cell.pressure * fleet.workers)))
    seqs = [r.tokens for r in trace.nominal_order()]
    keys = [keys_of(s) for s in seqs]
    misses = trace.prompt_tokens() - o2(seqs, capacity * fleet.workers, keys=keys).hit_tokens
    when: dict[str, float] = {}
    for r in requests:
        when[r.rid] = r.arrival_s if r.after is None else when[r.after] + r.think_s
    span_units = max(when.values()) or 1.0
    factor = misses / (cell.load * fleet.workers * fleet.prefill_tps) / span_units
    params = dict(cell=asdict(cell), seed=seed, scale=scale, sessions=n_sessions, distinct_blocks=blocks,
                  o2_miss_tokens=misses, span_s=round(span_units * factor, 3),
                  fleet={**asdict(fleet), "capacity_blocks": capacity})
    return Trace(f"workload-{cell.name}", _rescaled(requests, factor), params)


def grid(loads=LOADS, pressures=PRESSURES, sharing=SHARING, arrivals=ARRIVALS) -> list[Cell]:
    return [Cell(lo, p, s, a) for lo in loads for p in pressures for s in sharing for a in arrivals]

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

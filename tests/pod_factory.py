"""Small helpers used across tests: AgentPod builders and polling."""

from __future__ import annotations

import time

from nodeagent.contracts.pod import AgentPod


def make_pod(name: str = "p1", tenant: str = "acme", agent: str = "coder", model: str = "tiny",
             system: str = "You are a careful assistant.", scope: str = "private",
             turns: list[str] | None = None, max_tokens: int = 8, **spec_extra) -> AgentPod:
    turns = turns or ["hello"]
    return AgentPod.model_validate({
        "kind": "AgentPod",
        "metadata": {"name": name, "tenant": tenant, "agent": agent},
        "spec": {
            "model": {"name": model},
            "context": [{"role": "system", "text": system, "scope": scope}],
            "turns": [{"messages": [{"role": "user", "content": t}], "maxTokens": max_tokens} for t in turns],
            **spec_extra,
        },
    })


def wait_for(predicate, timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; returns the last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False

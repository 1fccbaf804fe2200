"""Small builders for AgentPod documents used across tests."""

from __future__ import annotations

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

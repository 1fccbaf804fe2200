"""OpenAI chat completions as one-turn pods.

`chat_request_to_pod` maps a request body onto an `AgentPod`: ``system``
messages become context segments (so repeated system prompts hit the cache
like any agent's), the rest become the turn's messages. `pod_to_chat_response`
maps the finished pod back. Unknown OpenAI parameters are accepted and
ignored; the ones we cannot honour are refused with the field named.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nodeagent.contracts.names import DIGEST
from nodeagent.contracts.pod import AgentPod, PodPhase
from nodeagent.pods import PodInvalid

_NAME_SAFE = re.compile(r"[^a-z0-9_.-]+")


class _ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class _ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[_ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=1000)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repeat_penalty: float | None = Field(default=None, gt=0, le=2)
    logit_bias: dict[str, float] | None = None
    response_format: _ResponseFormat | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None


# When a request leaves sampling out: llama.cpp's server defaults (what users of
# local models get from llama-server and expect here too).
DEFAULT_SAMPLING = {"temperature": 0.8, "topK": 40, "topP": 0.95, "minP": 0.05}


def sampling_of(request: ChatCompletionRequest) -> dict[str, Any]:
    """The pod turn's `Sampling` (wire names) for an OpenAI request."""
    sampling: dict[str, Any] = dict(DEFAULT_SAMPLING)
    given = {"temperature": request.temperature, "topP": request.top_p, "topK": request.top_k,
             "minP": request.min_p, "seed": request.seed, "presencePenalty": request.presence_penalty,
             "frequencyPenalty": request.frequency_penalty, "repeatPenalty": request.repeat_penalty}
    sampling.update({k: v for k, v in given.items() if v is not None})
    if request.stop is not None:
        sampling["stop"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
    if request.logit_bias:
        sampling["logitBias"] = dict(request.logit_bias)
    grammar = response_grammar(request.response_format)
    if grammar is not None:
        sampling["grammar"] = grammar
    return sampling


def response_grammar(response_format: _ResponseFormat | None) -> str | None:
    """The GBNF grammar that enforces ``response_format`` (llama.cpp's own converter)."""
    if response_format is None or response_format.type == "text":
        return None
    from llama_cpp import llama_grammar  # the pure-Python JSON-schema -> GBNF converter llama.cpp ships

    if response_format.type == "json_object":
        return llama_grammar.JSON_GBNF
    spec = response_format.json_schema or {}
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise PodInvalid("response_format.json_schema.schema: a JSON Schema object is required")
    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:
        raise PodInvalid(f"response_format.json_schema.schema: cannot be enforced: {exc}") from exc


def _label(text: str | None, default: str) -> str:
    cleaned = _NAME_SAFE.sub("-", (text or "").lower()).strip("-._")[:63]
    return cleaned or default


def chat_request_to_pod(body: dict[str, Any], *, tenant: str, agent: str = "openai",
                        default_model: str | None) -> AgentPod:
    """The one-turn pod for ``body``, run as ``tenant``/``agent``: the caller's credential
    decides both (nodeagent.api.principal), never a field of the request."""
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PodInvalid(f"{where}: {first['msg']}") from exc
    model = request.model or default_model
    if not model:
        raise PodInvalid("model: required (no models.default is configured)")
    system = [m for m in request.messages if m.role in ("system", "developer")]
    rest = [m for m in request.messages if m.role not in ("system", "developer")]
    if not rest:
        raise PodInvalid("messages: at least one user message is required")
    max_tokens = request.max_completion_tokens or request.max_tokens or 256
    document = {
        "kind": "AgentPod",
        "metadata": {"name": f"chat-{secrets.token_hex(4)}", "tenant": _label(tenant, "default"),
                     "agent": _label(agent, "openai"), "session": _label(request.user, "default")},
        "spec": {
            # A full digest is a digest; anything else (NAME[:TAG], sha256:<hex prefix>) is a reference.
            "model": {"digest": model} if re.fullmatch(DIGEST, model) else {"name": model},
            "context": [{"role": "system", "text": m.text(), "scope": "private"} for m in system],
            "turns": [{"messages": [{"role": m.role, "content": m.text()} for m in rest], "maxTokens": max_tokens,
                       "sampling": sampling_of(request)}],
        },
    }
    try:
        return AgentPod.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise PodInvalid(f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from exc


class ChatCompletionFailed(RuntimeError):
    def __init__(self, pod: AgentPod) -> None:
        reasons = "; ".join(pod.status.reasons) or pod.status.phase.value
        super().__init__(f"pod {pod.id} {pod.status.phase.value}: {reasons}")
        self.pod = pod


def pod_to_chat_response(pod: AgentPod) -> dict[str, Any]:
    if pod.status.phase is not PodPhase.succeeded or not pod.status.turns:
        raise ChatCompletionFailed(pod)
    turn = pod.status.turns[-1]
    max_tokens = pod.spec.turns[-1].max_tokens
    return {
        "id": f"chatcmpl-{pod.id}",
        "object": "chat.completion",
        # When the pod was made, so a replayed request (same Idempotency-Key) answers the same object.
        "created": int(pod.status.transitions[0].at.timestamp()) if pod.status.transitions else int(time.time()),
        "model": pod.spec.model.name or pod.spec.model.digest,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": turn.output},
            "finish_reason": finish_reason(turn, max_tokens),
        }],
        "usage": usage_of(turn),
        "system_fingerprint": pod.status.receipt_ids[-1][:16] if pod.status.receipt_ids else None,
    }


def finish_reason(turn: Any, max_tokens: int) -> str:
    if turn.finish_reason in ("stop", "length"):
        return turn.finish_reason
    return "length" if turn.completion_tokens >= max_tokens else "stop"


def usage_of(turn: Any) -> dict[str, Any]:
    return {"prompt_tokens": turn.prompt_tokens, "completion_tokens": turn.completion_tokens,
            "total_tokens": turn.prompt_tokens + turn.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": turn.cached_tokens}}


def chat_chunks(pod_id: str, model: str, created: int, pieces: Iterator[str], finished: Callable[[], AgentPod],
                *, include_usage: bool) -> Iterator[dict[str, Any]]:
    """``chat.completion.chunk`` objects: the role, each piece of text as the provider
    generated it, then the finish reason (and usage when asked) once the pod ended."""
    base = {"id": f"chatcmpl-{pod_id}", "object": "chat.completion.chunk", "created": created, "model": model}
    yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
    for piece in pieces:
        yield {**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
    pod = finished()
    if pod.status.phase is not PodPhase.succeeded or not pod.status.turns:
        raise ChatCompletionFailed(pod)
    turn = pod.status.turns[-1]
    yield {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish_reason(turn, pod.spec.turns[-1].max_tokens)}]}
    if include_usage:
        yield {**base, "choices": [], "usage": usage_of(turn)}

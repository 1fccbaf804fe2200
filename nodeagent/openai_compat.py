"""OpenAI chat and text completions as one-turn pods.

`chat_request_to_pod` maps a request body onto an `AgentPod`: ``system``
messages become context segments (so repeated system prompts hit the cache
like any agent's), the rest become the turn's messages. `pod_to_chat_response`
maps the finished pod back. Unknown OpenAI parameters are accepted and
ignored; the ones we cannot honour are refused with the field named.

Text completions (``POST /v1/completions``): `completion_request_to_pod` makes
a pod whose one turn is a ``prompt`` (the model's whole input, no chat
template), `pod_to_completion_response` and `completion_chunks` answer in
OpenAI's ``text_completion`` shape.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Annotated, Any, Callable, Iterable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nodeagent.contracts.base import JsonScalars
from nodeagent.contracts.names import DIGEST, MAX_MODEL_REFERENCE, MODEL_REFERENCE
from nodeagent.contracts.model import ModelRecord
from nodeagent.contracts.pod import AgentPod, PodPhase, ToolCall, ToolDefinition
from nodeagent.contracts.problems import first_problem
from nodeagent.pods import PodInvalid
from nodeagent.toolcalls import ReplyStream, ToolCallFormat

_NAME_SAFE = re.compile(r"[^a-z0-9_.-]+")


class _ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant message that called tools
    tool_call_id: str | None = None  # the call a tool message answers
    name: str | None = None

    def pod_message(self) -> dict[str, Any]:
        """The pod turn's `Message` (wire names) for this user, assistant or tool message."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["toolCalls"] = [call.to_wire() for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["toolCallId"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: keep the text ones
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class _ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class _NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


class _NamedToolChoice(BaseModel):
    """``{"type": "function", "function": {"name": ...}}``: call this tool."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: _NamedFunction


_StopText = Annotated[str, Field(min_length=1, max_length=256)]
_TokenId = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]


class SamplingFields(JsonScalars):
    """The sampling fields chat and text completions share (OpenAI's names, and llama-server's
    beside them), bounded as the pod's `Sampling` bounds them so a refusal names the request's field."""

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=1000)
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    stop: _StopText | Annotated[list[_StopText], Field(max_length=4)] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repeat_penalty: float | None = Field(default=None, gt=0, le=2)
    # (propertyNames: pydantic's patternProperties alone lets the schema take any key)
    logit_bias: dict[_TokenId, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None, json_schema_extra={"propertyNames": {"pattern": r"^[0-9]{1,9}$"}})


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[_ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    response_format: _ResponseFormat | None = None
    # OpenAI function tools; validated as the pod's `ToolDefinition` by `tools_of`
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | _NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; a prompt cannot hold a model to one call
    # llama-server's extension: a GBNF grammar the answer must match (e.g. to force a tool call)
    grammar: str | None = Field(default=None, min_length=1, max_length=65536)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    user: str | None = None


# When a request leaves sampling out: llama.cpp's server defaults (what users of
# local models get from llama-server and expect here too).
DEFAULT_SAMPLING = {"temperature": 0.8, "topK": 40, "topP": 0.95, "minP": 0.05}


def sampling_of(request: SamplingFields, grammar: str | None = None) -> dict[str, Any]:
    """The pod turn's `Sampling` (wire names) for an OpenAI request; ``grammar`` (GBNF) constrains the answer."""
    sampling: dict[str, Any] = dict(DEFAULT_SAMPLING)
    given = {"temperature": request.temperature, "topP": request.top_p, "topK": request.top_k,
             "minP": request.min_p, "seed": request.seed, "presencePenalty": request.presence_penalty,
             "frequencyPenalty": request.frequency_penalty, "repeatPenalty": request.repeat_penalty}
    sampling.update({k: v for k, v in given.items() if v is not None})
    if request.stop is not None:
        sampling["stop"] = [request.stop] if isinstance(request.stop, str) else list(request.stop)
    if request.logit_bias:
        sampling["logitBias"] = dict(request.logit_bias)
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


def tools_of(request: ChatCompletionRequest) -> list[dict[str, Any]] | None:
    """The tools the chat template renders (the pod's ``spec.tools``), after ``tool_choice``:
    ``none`` renders none, a named function only that one, ``auto``/``required`` all.

    No choice is enforced while the answer is generated: the model sees the tools
    its template shows it and may still answer in text (send a ``grammar`` to force
    a call's shape). ``strict`` is accepted and not enforced either."""
    choice = request.tool_choice
    if not request.tools:
        if choice is not None and choice != "none":
            raise PodInvalid("tool_choice: only allowed when tools are given")
        return None
    tools: list[dict[str, Any]] = []
    for index, tool in enumerate(request.tools):
        function = tool.get("function")
        if isinstance(function, dict):  # OpenAI's `strict` asks for schema-exact arguments: not enforced here
            tool = {**tool, "function": {k: v for k, v in function.items() if k != "strict"}}
        try:
            definition = ToolDefinition.model_validate(tool)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise PodInvalid(f"tools.{index}.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from exc
        tools.append(definition.model_dump(mode="json", by_alias=True, exclude_none=True))
    if choice == "none":
        return None
    if isinstance(choice, _NamedToolChoice):
        named = [t for t in tools if t["function"]["name"] == choice.function.name]
        if not named:
            raise PodInvalid(f"tool_choice.function.name: {choice.function.name!r} is not one of the tools")
        return named
    return tools


def chat_grammar(request: ChatCompletionRequest) -> str | None:
    """The GBNF the answer must match: the request's own ``grammar``, or ``response_format``'s."""
    if request.grammar is not None and request.response_format is not None \
            and request.response_format.type != "text":
        raise PodInvalid("grammar: give a grammar or a response_format, not both")
    return request.grammar if request.grammar is not None else response_grammar(request.response_format)


def _parsed(model: type[BaseModel], body: dict[str, Any]) -> Any:
    """``body`` validated as ``model``; `PodInvalid` "field: what is wrong" (the API names the field)."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise PodInvalid(first_problem(exc)) from exc


def _label(text: str | None, default: str) -> str:
    cleaned = _NAME_SAFE.sub("-", (text or "").lower()).strip("-._")[:63]
    return cleaned or default


def chat_request_to_pod(body: dict[str, Any], *, tenant: str, agent: str = "openai",
                        default_model: str | None) -> AgentPod:
    """The one-turn pod for ``body``, run as ``tenant``/``agent``: the caller's credential
    decides both (nodeagent.api.principal), never a field of the request."""
    request: ChatCompletionRequest = _parsed(ChatCompletionRequest, body)
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
            "turns": [{"messages": [m.pod_message() for m in rest], "maxTokens": max_tokens,
                       "sampling": sampling_of(request, chat_grammar(request))}],
            "tools": tools_of(request),
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


def pod_to_chat_response(pod: AgentPod, tool_format: ToolCallFormat | None = None) -> dict[str, Any]:
    """The ``chat.completion`` of a finished pod; with ``tool_format`` (the model's, when the
    request gave tools) calls in the reply become ``message.tool_calls``."""
    if pod.status.phase is not PodPhase.succeeded or not pod.status.turns:
        raise ChatCompletionFailed(pod)
    turn = pod.status.turns[-1]
    max_tokens = pod.spec.turns[-1].max_tokens
    message: dict[str, Any] = {"role": "assistant", "content": turn.output}
    reason = finish_reason(turn, max_tokens)
    if tool_format is not None:
        parsed = tool_format.parse(turn.output, id_seed=pod.id)
        if parsed.tool_calls:
            message = {"role": "assistant", "content": parsed.content,
                       "tool_calls": [call.to_wire() for call in parsed.tool_calls]}
            reason = "tool_calls"
    return {
        "id": f"chatcmpl-{pod.id}",
        "object": "chat.completion",
        # When the pod was made, so a replayed request (same Idempotency-Key) answers the same object.
        "created": int(pod.status.transitions[0].at.timestamp()) if pod.status.transitions else int(time.time()),
        "model": pod.spec.model.name or pod.spec.model.digest,
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": reason,
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
                *, include_usage: bool, tool_format: ToolCallFormat | None = None) -> Iterator[dict[str, Any]]:
    """``chat.completion.chunk`` objects: the role, each piece of text as the provider
    generated it, then the finish reason (and usage when asked) once the pod ended.

    With ``tool_format`` text that may be a tool call is held back until the reply
    ends (`nodeagent.toolcalls.ReplyStream`); each call then goes out whole as one
    ``delta.tool_calls`` chunk (index, id, type, function name and arguments)."""
    base = {"id": f"chatcmpl-{pod_id}", "object": "chat.completion.chunk", "created": created, "model": model}

    def delta(fields: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": fields, "finish_reason": reason}]}

    reply = ReplyStream(tool_format, id_seed=pod_id)
    yield delta({"role": "assistant", "content": ""})
    for piece in pieces:
        text = reply.feed(piece)
        if text:
            yield delta({"content": text})
    pod = finished()
    if pod.status.phase is not PodPhase.succeeded or not pod.status.turns:
        raise ChatCompletionFailed(pod)
    turn = pod.status.turns[-1]
    rest = reply.finish()
    if rest.content:
        yield delta({"content": rest.content})
    for index, call in enumerate(rest.tool_calls):
        yield delta({"tool_calls": [{"index": index, **call.to_wire()}]})
    reason = "tool_calls" if rest.tool_calls else finish_reason(turn, pod.spec.turns[-1].max_tokens)
    yield delta({}, reason)
    if include_usage:
        yield {**base, "choices": [], "usage": usage_of(turn)}


# ------------------------------------------------------------------ text completions
class UnsupportedParameter(PodInvalid):
    """A request field the agent knows but cannot honour (``echo``, several prompts or
    choices, ``logprobs``); the message starts with the field. The API answers 400."""


class CompletionStreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


_PromptText = Annotated[str, Field(min_length=1, max_length=1 << 20)]


class CompletionRequest(SamplingFields):
    """OpenAI's text completion request: ``prompt`` is the model's whole input, no chat template.

    Fields the agent does not know are refused by name (422); the ones it knows
    but cannot honour are refused by `unsupported` (400): one prompt and one
    choice per request, no ``echo``, ``logprobs``, ``suffix`` or ``best_of``.
    """

    model_config = ConfigDict(extra="forbid")
    # What a pod's spec.model.name accepts (contracts.names): the schema refuses what the pod would.
    model: str = Field(min_length=1, max_length=MAX_MODEL_REFERENCE, pattern=MODEL_REFERENCE)
    # The schema declares what is served (one prompt, no echo, one choice, no logprobs or suffix);
    # the model still reads OpenAI's wider values, so `unsupported` refuses them with 400 and a reason.
    prompt: _PromptText | Annotated[list[_PromptText], Field(min_length=1, json_schema_extra={"maxItems": 1})]
    max_tokens: int = Field(default=16, ge=1, le=32768, description="OpenAI's default: 16")
    stream: bool = False
    stream_options: CompletionStreamOptions | None = None
    echo: bool = Field(default=False, json_schema_extra={"const": False})
    n: int = Field(default=1, ge=1, le=128, json_schema_extra={"maximum": 1})
    best_of: int | None = Field(default=None, ge=1, le=128, json_schema_extra={"maximum": 1})
    logprobs: int | None = Field(default=None, ge=0, le=5, json_schema_extra={"type": "null"})
    suffix: str | None = Field(default=None, json_schema_extra={"maxLength": 0})
    user: str | None = None

    def unsupported(self) -> str | None:
        """``"field: why"`` for the first field asked for what the agent cannot do, else None."""
        if isinstance(self.prompt, list) and len(self.prompt) > 1:
            return f"prompt: one prompt per request (this one has {len(self.prompt)}); send each as its own request"
        if self.echo:
            return "echo: echoing the prompt back is not supported; send echo=false"
        if self.n > 1:
            return "n: one choice per request; send n=1 (or several requests, each with its own seed)"
        if self.best_of is not None and self.best_of > 1:
            return "best_of: one candidate per request; send best_of=1"
        if self.logprobs is not None:
            return "logprobs: token log-probabilities are not reported; leave logprobs out"
        if self.suffix:
            return "suffix: insertion (a text after the completion) is not supported; leave suffix out"
        return None

    def prompt_text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


def completion_request_to_pod(body: dict[str, Any], *, tenant: str, agent: str = "openai") -> AgentPod:
    """The one-turn text-completion pod for ``body``, run as ``tenant``/``agent`` (the caller's
    credential decides both). Raises `PodInvalid` (or `UnsupportedParameter`) naming the field."""
    request: CompletionRequest = _parsed(CompletionRequest, body)
    refusal = request.unsupported()
    if refusal is not None:
        raise UnsupportedParameter(refusal)
    document = {
        "kind": "AgentPod",
        "metadata": {"name": f"cmpl-{secrets.token_hex(4)}", "tenant": _label(tenant, "default"),
                     "agent": _label(agent, "openai"), "session": _label(request.user, "default")},
        "spec": {
            "model": {"digest": request.model} if re.fullmatch(DIGEST, request.model) else {"name": request.model},
            "turns": [{"prompt": request.prompt_text(), "maxTokens": request.max_tokens,
                       "sampling": sampling_of(request)}],
        },
    }
    pod: AgentPod = _parsed(AgentPod, document)
    return pod


def _answered_turn(pod: AgentPod) -> Any:
    """The pod's last turn; `ChatCompletionFailed` (the API's 403/404/409/502) when it did not succeed."""
    if pod.status.phase is not PodPhase.succeeded or not pod.status.turns:
        raise ChatCompletionFailed(pod)
    return pod.status.turns[-1]


def pod_to_completion_response(pod: AgentPod) -> dict[str, Any]:
    turn = _answered_turn(pod)
    return {
        "id": f"cmpl-{pod.id}",
        "object": "text_completion",
        # When the pod was made, so the object is the same however often it is read.
        "created": int(pod.status.transitions[0].at.timestamp()) if pod.status.transitions else int(time.time()),
        "model": pod.spec.model.name or pod.spec.model.digest,
        "choices": [{"index": 0, "text": turn.output, "logprobs": None,
                     "finish_reason": finish_reason(turn, pod.spec.turns[-1].max_tokens)}],
        "usage": usage_of(turn),
        "system_fingerprint": pod.status.receipt_ids[-1][:16] if pod.status.receipt_ids else None,
    }


def completion_chunks(pod_id: str, model: str, created: int, pieces: Iterator[str],
                      finished: Callable[[], AgentPod], *, include_usage: bool) -> Iterator[dict[str, Any]]:
    """``text_completion`` chunks as OpenAI streams them: each piece of text as the provider
    generated it, then an empty text with the finish reason (and usage when asked)."""
    base = {"id": f"cmpl-{pod_id}", "object": "text_completion", "created": created, "model": model}
    for piece in pieces:
        yield {**base, "choices": [{"index": 0, "text": piece, "logprobs": None, "finish_reason": None}]}
    pod = finished()
    turn = _answered_turn(pod)
    yield {**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                "finish_reason": finish_reason(turn, pod.spec.turns[-1].max_tokens)}]}
    if include_usage:
        yield {**base, "choices": [], "usage": usage_of(turn)}


# ------------------------------------------------------------------ models
OWNED_BY = "agent-machine"


def openai_models(records: Iterable[ModelRecord]) -> list[dict[str, Any]]:
    """The store's models as OpenAI model objects: one per name (``tiny:latest``), the
    names chat and text completions accept; a model without a name is listed by digest."""
    models: list[dict[str, Any]] = []
    seen: set[str] = set()
    for record in records:
        created = int(record.imported_at.timestamp())
        for model_id in record.names or [record.digest]:
            if model_id not in seen:
                seen.add(model_id)
                models.append({"id": model_id, "object": "model", "created": created, "owned_by": OWNED_BY})
    return models


def openai_model(records: Iterable[ModelRecord], model_id: str) -> dict[str, Any] | None:
    """The model object ``model_id`` names: a listed id, the same name without its tag
    (``tiny`` is ``tiny:latest``, as the store reads it) or the model's full digest."""
    from nodeagent.models.store import ModelStoreError, parse_reference

    records = list(records)
    models = openai_models(records)
    wanted = {model_id}
    try:
        wanted.add(str(parse_reference(model_id)))
    except ModelStoreError:
        pass
    for record in records:
        if record.digest == model_id and record.names:
            wanted.add(record.names[0])
    return next((model for model in models if model["id"] in wanted), None)

"""OpenAI-compatible endpoints: any OpenAI client can use the agent.

Every route is served at ``/v1/...`` and again under the ``/openai/v1`` alias
prefix; point a client at ``base_url=<agent>/v1`` (or ``/openai/v1``).

* ``POST /v1/chat/completions`` runs the request as a one-turn pod
  (``node.chat_completion(body)``); ``stream: true`` is answered as SSE chunks
  as the provider generates them.
* ``POST /v1/completions`` (a text prompt, no chat template) likewise
  (``node.completion(body)``), in OpenAI's ``text_completion`` shape.
* ``GET /v1/models`` and ``GET /v1/models/{id}``: the store's models in OpenAI's
  shape (the agent's own listing, ModelRecords with residency, is
  ``GET /v1/store/models``).
* Errors on these routes are in OpenAI's shape (``nodeagent.api.errors.openai_error``),
  which the tag ``openai`` on this router selects.

Contract with the node: ``node.chat_completion(body: dict, tenant=, agent=,
idempotency=)`` takes the validated request (wire names, unset fields dropped,
``stream`` false), the tenant and agent of the caller's credential
(nodeagent.api.principal) and the request's Idempotency-Key, and
returns the OpenAI ``chat.completion`` object as a dict (or an iterator of
``chat.completion.chunk`` dicts, which this route frames as SSE ending with
``data: [DONE]``).
"""

from __future__ import annotations

from types import GeneratorType
from typing import Annotated, Any, Generator, Iterator, Literal

import anyio
from fastapi import APIRouter, Body, Depends
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import Response, StreamingResponse

from nodeagent.api import idempotency
from nodeagent.api.errors import ApiError, json_bytes
from nodeagent.api.principal import Principal, get_principal
from nodeagent.api.routes.common import error_responses, get_node, node_method, wire_response
from nodeagent.contracts.base import JsonScalars
from nodeagent.contracts.names import MAX_MODEL_REFERENCE, MODEL_REFERENCE
from nodeagent.contracts.pod import FunctionDefinition, ToolCall
from nodeagent.idempotency import IdempotencyConflict
from nodeagent.openai_compat import CompletionRequest, openai_model, openai_models

router = APIRouter(tags=["openai"])


class _Strict(JsonScalars):
    # Unknown fields and wrongly typed values (0 for false, "5" for 5) are errors naming the field.
    model_config = ConfigDict(extra="forbid")


class ChatContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ChatContentPart] | None = None
    name: str | None = Field(default=None, max_length=128)
    tool_call_id: str | None = Field(default=None, max_length=128)  # the call a tool message answers
    tool_calls: list[ToolCall] | None = None  # the calls an assistant message made (as this API returned them)


class ChatFunction(FunctionDefinition):
    """A function tool (OpenAI's shape). ``strict`` is accepted; arguments are not held to
    the schema while they are generated."""

    strict: bool | None = None


class ChatTool(_Strict):
    type: Literal["function"]
    function: ChatFunction


class NamedFunction(_Strict):
    # A function's name as a tool defines it (FunctionDefinition): any other could name no tool.
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")


class NamedToolChoice(_Strict):
    """Call this function: only it is shown to the model (not enforced while generating)."""

    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = Field(min_length=1, max_length=64)
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``json_object``: any JSON object; ``json_schema``: output valid against ``schema``
    (both enforced with a llama.cpp grammar while the answer is generated)."""

    # type json_schema needs its json_schema, and the schema says so.
    model_config = ConfigDict(json_schema_extra={
        "if": {"required": ["type"], "properties": {"type": {"const": "json_schema"}}},
        "then": {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}}})

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


TURN_ROLES = ("user", "assistant", "tool")


_StopText = Annotated[str, Field(min_length=1, max_length=256)]  # as the pod's Sampling.stop


class ChatCompletionRequest(_Strict):
    """The OpenAI fields the agent understands; any other field is an error that names it."""

    # What the node refuses of a schema-valid request, the schema says: tool_choice (other than
    # "none") needs tools; grammar and response_format are not given together.
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"required": ["tool_choice"],
                "properties": {"tool_choice": {"not": {"anyOf": [{"type": "null"}, {"const": "none"}]}}}},
         "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}},
        {"not": {"required": ["grammar", "response_format"],
                 "properties": {"grammar": {"type": "string"}, "response_format": {"type": "object"}}}}]})

    # What a pod's spec.model.name accepts (contracts.names): the schema refuses what the pod would.
    model: str = Field(min_length=1, max_length=MAX_MODEL_REFERENCE, pattern=MODEL_REFERENCE)
    # System and developer messages become the pod's context; its turn needs at least one other message.
    messages: list[ChatMessage] = Field(min_length=1, json_schema_extra={"contains": {
        "type": "object", "required": ["role"], "properties": {"role": {"enum": list(TURN_ROLES)}}}})

    @field_validator("messages")
    @classmethod
    def _a_turn_message(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not any(message.role in TURN_ROLES for message in messages):
            raise ValueError("at least one user, assistant or tool message is required "
                             "(system and developer messages become the pod's context)")
        return messages
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=1)
    stop: _StopText | Annotated[list[_StopText], Field(max_length=4)] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)  # as the pod's Sampling
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # llama.cpp's sampler knobs, as llama-server takes them beside OpenAI's
    top_k: int | None = Field(default=None, ge=0, le=1000)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0, le=2)
    # (propertyNames: pydantic's patternProperties alone lets the schema take any key)
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100, le=100)]] | None = \
        Field(default=None, json_schema_extra={"propertyNames": {"pattern": r"^[0-9]{1,9}$"}})
    response_format: ResponseFormat | None = None
    # Tools, rendered by the model's chat template; calls in the answer come back as message.tool_calls
    # (docs/api.md, "Tools"). "none" shows the model no tools, a named function only that one.
    tools: list[ChatTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # llama-server's extension: GBNF the answer must match (not with response_format)
    grammar: str | None = Field(default=None, min_length=1, max_length=65536)
    user: str | None = None
    metadata: dict[str, str] | None = None


class ChatChoice(BaseModel):
    index: int
    message: dict[str, Any]
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: dict[str, Any] | None = None


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "agent-machine"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


def _sse(chunks: Iterator[Any]) -> Iterator[bytes]:
    """SSE framing; a failure after the first chunk (the status line has gone) is sent as
    an ``error`` object, as OpenAI-compatible servers do, before ``[DONE]``."""
    try:
        for chunk in chunks:
            yield b"data: " + json_bytes(chunk if isinstance(chunk, dict) else wire_dict(chunk)) + b"\n\n"
    except Exception as exc:  # noqa: BLE001 - reported to the client, the stream ends cleanly
        # OpenAI's error shape, which the official client raises as an APIError mid-stream.
        yield b"data: " + json_bytes({"error": {"message": str(exc) or type(exc).__name__, "type": "server_error",
                                                "param": None, "code": type(exc).__name__}}) + b"\n\n"
    finally:
        if isinstance(chunks, GeneratorType):
            chunks.close()  # closed early (client gone): the node cancels the generation
    yield b"data: [DONE]\n\n"


def wire_dict(value: Any) -> dict[str, Any]:
    from nodeagent.api.routes.common import to_wire

    return to_wire(value)


def _chat(request: ChatCompletionRequest, node: Any, principal: Principal, key: str | None) -> Response:
    method = node_method(node, "chat_completion")
    # The pod runs as the credential's tenant (and agent), never as a request field says.
    tenant, agent = principal.chat_identity()
    body = request.model_dump(mode="json", exclude_none=True, by_alias=True)  # response_format's "schema"
    claim = idempotency.chat_key(principal, key, body)
    try:
        # QueueFull, NodeClosed, PodInvalid... map to 4xx/503 in errors.py
        result = method(body, tenant=tenant, agent=agent, idempotency=claim)
    except IdempotencyConflict as exc:
        raise idempotency.conflict(exc) from exc
    return _answer(result, stream=request.stream)


def _answer(result: Any, *, stream: bool) -> Response:
    if stream:
        # Chunks come as the provider generates them; a client that goes away closes
        # the iterator, which cancels the generation (see Node.chat_completion).
        return StreamingResponse(_iterate_in_thread(_sse(iter(result))), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return wire_response(result)


async def _iterate_in_thread(sync_iter: Generator[bytes, None, None]):  # type: ignore[no-untyped-def]
    """Pull a blocking iterator (tokens from a provider) without blocking the event loop;
    when the response ends early (the client disconnected) the iterator is closed."""
    sentinel = object()
    try:
        while True:
            item = await anyio.to_thread.run_sync(next, sync_iter, sentinel)
            if item is sentinel:
                return
            yield item
    finally:
        await anyio.to_thread.run_sync(sync_iter.close)


# stream=true answers server-sent events; the document says so beside the JSON answer.
_SSE_200 = {200: {"description": "the completion (JSON), or with stream=true its chunks as server-sent events",
                  "content": {"text/event-stream": {}}}}
_CHAT_DOC = dict(response_model=ChatCompletion,
                 responses={**error_responses(403, 404, 409, 422, 429, 501, 502, 503), **_SSE_200},
                 summary="OpenAI chat completion, run as a one-turn pod (stream=true gives SSE chunks)")


@router.post("/v1/chat/completions", **_CHAT_DOC)
def chat_completions(request: ChatCompletionRequest = Body(...), key: str | None = idempotency.IDEMPOTENCY_KEY,
                     node: Any = Depends(get_node), principal: Principal = Depends(get_principal)) -> Response:
    return _chat(request, node, principal, key)


@router.post("/openai/v1/chat/completions", **_CHAT_DOC)
def chat_completions_prefixed(request: ChatCompletionRequest = Body(...),
                              key: str | None = idempotency.IDEMPOTENCY_KEY, node: Any = Depends(get_node),
                              principal: Principal = Depends(get_principal)) -> Response:
    return _chat(request, node, principal, key)


# ------------------------------------------------------------------ text completions
class TextCompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextCompletionChoice]
    usage: dict[str, Any] | None = None


def _complete(request: CompletionRequest, node: Any, principal: Principal, key: str | None) -> Response:
    method = node_method(node, "completion")
    tenant, agent = principal.chat_identity()  # the credential's, as for chat
    body = request.model_dump(mode="json", exclude_none=True)
    try:
        result = method(body, tenant=tenant, agent=agent, idempotency=idempotency.chat_key(principal, key, body))
    except IdempotencyConflict as exc:
        raise idempotency.conflict(exc) from exc
    return _answer(result, stream=request.stream)


_COMPLETION_DOC = dict(
    response_model=TextCompletion,
    responses={**error_responses(400, 403, 404, 409, 422, 429, 501, 502, 503), **_SSE_200},
    summary="OpenAI text completion (the prompt as is, no chat template), run as a one-turn pod; "
            "stream=true gives SSE text_completion chunks")


@router.post("/v1/completions", **_COMPLETION_DOC)
def completions(request: CompletionRequest = Body(...), key: str | None = idempotency.IDEMPOTENCY_KEY,
                node: Any = Depends(get_node), principal: Principal = Depends(get_principal)) -> Response:
    return _complete(request, node, principal, key)


@router.post("/openai/v1/completions", **_COMPLETION_DOC)
def completions_prefixed(request: CompletionRequest = Body(...), key: str | None = idempotency.IDEMPOTENCY_KEY,
                         node: Any = Depends(get_node), principal: Principal = Depends(get_principal)) -> Response:
    return _complete(request, node, principal, key)


# ------------------------------------------------------------------ models
_MODELS_DOC = dict(response_model=OpenAIModelList, responses=error_responses(501),
                   summary="the store's models in OpenAI's list shape (ids are the names completions accept)")
_MODEL_DOC = dict(response_model=OpenAIModel, responses=error_responses(404, 501),
                  summary="one model in OpenAI's shape (`tiny` finds `tiny:latest`); 404 for an unknown id")


def _models(node: Any) -> Response:
    return wire_response({"object": "list", "data": openai_models(node_method(node, "list_models")())})


def _model(node: Any, model_id: str) -> Response:
    found = openai_model(node_method(node, "list_models")(), model_id)
    if found is None:
        raise ApiError(404, "model_not_found", f"no model {model_id!r} in this agent's store "
                       "(GET /v1/models lists them; `agent-machine models import` adds one)", field="model")
    return wire_response(found)


@router.get("/v1/models", **_MODELS_DOC)
def models(node: Any = Depends(get_node)) -> Response:
    return _models(node)


@router.get("/openai/v1/models", **_MODELS_DOC)
def models_prefixed(node: Any = Depends(get_node)) -> Response:
    return _models(node)


# ``:path``: a model name may have several parts (``org/name:tag``).
@router.get("/v1/models/{model_id:path}", **_MODEL_DOC)
def model(model_id: str, node: Any = Depends(get_node)) -> Response:
    return _model(node, model_id)


@router.get("/openai/v1/models/{model_id:path}", **_MODEL_DOC)
def model_prefixed(model_id: str, node: Any = Depends(get_node)) -> Response:
    return _model(node, model_id)

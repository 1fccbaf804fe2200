"""One error shape for every API failure, and the handlers that produce it.

Body (also what OpenAI clients expect, so their SDKs surface the message)::

    {"error": {"type": "invalid_request", "message": "spec.turns: Field required",
               "field": "spec.turns", "param": "spec.turns",
               "details": [{"field": "spec.turns", "message": "Field required", "type": "missing"}]}}

Rules: every 4xx names the offending field where there is one (``field``; the
body as a whole is ``body``, a query parameter its name, a path parameter its
name); bad input is a 4xx, never a 5xx; a 5xx means a bug in the agent and says
so without leaking a traceback.

The OpenAI routes answer the same errors in OpenAI's shape (`openai_error`):
``type`` is OpenAI's class of error and ``code`` the agent's type::

    {"error": {"message": "stop: List should have at most 4 items", "type": "invalid_request_error",
               "param": "stop", "code": "invalid_request", "field": "stop", "details": [...]}}
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Awaitable, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from nodeagent.contracts.problems import validation_details

log = logging.getLogger("agent_machine.api")


class ApiError(Exception):
    """Raise from a route to answer ``status`` with the standard body."""

    def __init__(self, status: int, type_: str, message: str, *, field: str | None = None,
                 details: list[dict[str, Any]] | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.field = field
        self.details = details or []
        self.headers = headers or {}


def error_body(type_: str, message: str, field: str | None = None,
               details: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    return {"error": {"type": type_, "message": message, "field": field, "param": field,
                      "details": list(details)}}


def error_response(status: int, type_: str, message: str, field: str | None = None,
                   details: Sequence[dict[str, Any]] = (), headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(type_, message, field, details), status_code=status, headers=headers)


# ---------------------------------------------------------------- OpenAI's shape
# The OpenAI routes answer errors as OpenAI's API does, ``{"error": {"message", "type",
# "param", "code"}}``, which the official clients parse into their exceptions. ``type`` is
# OpenAI's class of error (llama-server's names where OpenAI has none); ``code`` is the
# agent's own type (``queue_full``, ``unsupported_parameter``); ``field`` and ``details``
# stay, so a reader of the agent's shape loses nothing.
OPENAI_TAG = "openai"
OPENAI_PREFIX = "/openai/"
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 429: "rate_limit_error", 501: "not_supported_error", 503: "unavailable_error"}


def openai_error_type(status: int) -> str:
    if status in _OPENAI_TYPES:
        return _OPENAI_TYPES[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def openai_error(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """The agent's error ``body`` in OpenAI's shape (see above)."""
    error = dict(body.get("error") or {})
    return {"error": {"message": error.get("message", ""), "type": openai_error_type(status),
                      "param": error.get("param", error.get("field")), "code": error.get("type"),
                      **{key: error[key] for key in ("field", "details") if key in error}}}


def answers_openai(scope: Any) -> bool:
    """Whether a request is answered in OpenAI's error shape: its route is tagged ``openai``
    (nodeagent.api.routes.openai), or no route matched a path under the ``/openai/`` prefix."""
    route = scope.get("route")
    if isinstance(route, APIRoute):
        return OPENAI_TAG in route.tags
    return route is None and str(scope.get("path", "")).startswith(OPENAI_PREFIX)


def _openai_aware(handler: Callable[[Request, Any], Awaitable[Response]]) -> Callable[[Request, Any], Awaitable[Response]]:
    async def respond(request: Request, exc: Any) -> Response:
        response = await handler(request, exc)
        if not answers_openai(request.scope) or response.media_type != "application/json":
            return response
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return JSONResponse(openai_error(response.status_code, json.loads(bytes(response.body))),
                            status_code=response.status_code, headers=headers)

    return respond


def _summary(details: list[dict[str, Any]]) -> str:
    if not details:
        return "invalid request"
    head = "; ".join(f"{d['field']}: {d['message']}" for d in details[:3])
    more = len(details) - 3
    return head + (f" (and {more} more)" if more > 0 else "")


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


async def _on_request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    content_type = request.headers.get("content-type", "")
    body_not_json = any(tuple(err.get("loc", ())) == ("body",) and err.get("type") == "model_attributes_type"
                        for err in errors)
    if body_not_json and content_type and not _is_json(content_type):
        return error_response(415, "unsupported_media_type",
                              f"send the body as JSON with Content-Type: application/json (got {content_type})",
                              "Content-Type")
    details = validation_details(errors)
    status = 400 if any(d["type"] == "json_invalid" for d in details) else 422
    return error_response(status, "invalid_request", _summary(details), details[0]["field"] if details else "body",
                          details)


async def _on_pydantic_validation(request: Request, exc: ValidationError) -> JSONResponse:
    # A contract validated inside a route (e.g. a node method re-validating input).
    details = validation_details(exc.errors(include_url=False))
    return error_response(422, "invalid_request", _summary(details), details[0]["field"] if details else "body",
                          details)


async def _on_api_error(request: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.type, exc.message, exc.field, exc.details, exc.headers)


_HTTP_TYPES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 413: "body_too_large", 415: "unsupported_media_type"}


async def _on_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        message, field = f"no route {request.method} {request.url.path}", "path"
    elif exc.status_code == 405:
        allow = allowed_methods(request, headers.pop("Allow", ""))
        headers["Allow"] = allow
        message, field = f"method {request.method} is not allowed on {request.url.path} (allowed: {allow})", "method"
    elif exc.status_code == 413:
        message, field = str(exc.detail), "body"
    else:
        message, field = str(exc.detail), None
    return error_response(exc.status_code, _HTTP_TYPES.get(exc.status_code, "http_error"), message, field,
                          headers=headers or None)


def allowed_methods(request: Request, routed: str = "") -> str:
    """The methods of the resource at this request's path, for the ``Allow`` header of a 405.

    Starlette names only the methods of the first route whose path matched
    (``/v1/pods`` answered ``Allow: POST`` though GET lists pods). The document
    knows every operation at a path, so the header is the methods of the path
    template that matches most specifically (the most literal characters:
    ``/v1/models/x:load`` is the ``:load`` method, though ``/v1/models/{name}``
    matches it too). A path outside the document (``/openapi.json``) keeps what
    the router named.
    """
    path = request.scope.get("path", request.url.path)
    matches = [(literal, verbs) for pattern, literal, verbs in _path_index(request.app) if pattern.fullmatch(path)]
    if not matches:
        return routed
    most = max(literal for literal, _ in matches)
    return ", ".join(sorted(set().union(*(verbs for literal, verbs in matches if literal == most))))


_HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


def _path_index(app: Any) -> list[tuple[re.Pattern[str], int, frozenset[str]]]:
    """(path template as a regex, its literal characters, its methods) for every path of the
    app's document; built once per app."""
    index = getattr(app.state, "allow_index", None)
    if index is None:
        index = []
        for template, operations in app.openapi().get("paths", {}).items():
            parts = [part for part in re.split(r"(\{[^}]+\})", template) if part]
            # A parameter matches what Starlette's default convertor matches: one non-empty segment.
            regex = "".join("[^/]+" if part.startswith("{") else re.escape(part) for part in parts)
            literal = sum(len(part) for part in parts if not part.startswith("{"))
            index.append((re.compile(regex), literal,
                          frozenset(m.upper() for m in operations if m in _HTTP_METHODS)))
        app.state.allow_index = index
    return index


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    return error_response(500, "internal_error",
                          f"the agent failed on this request ({type(exc).__name__}); this is a bug, see the agent's log")


# Errors of lower layers that mean "the request cannot be served as asked", not
# "the agent is broken": (module, class) -> (status, type, field). Looked up
# lazily so the API does not pull those modules in before they are used, and a
# component that is not installed simply contributes no mapping.
DOMAIN_ERRORS: dict[tuple[str, str], tuple[int, str, str | None]] = {
    ("nodeagent.pods", "PodNotFound"): (404, "not_found", "pod_id"),
    ("nodeagent.pods", "InvalidTransition"): (409, "conflict", None),
    ("nodeagent.models.store", "ModelNotFound"): (404, "not_found", "model"),
    ("nodeagent.models.store", "ModelInUse"): (409, "conflict", "model"),
    ("nodeagent.models.residency", "OverCommit"): (409, "over_commit", "model"),
    # Any other refusal of the residency manager (unload while requests run): the model's state conflicts.
    ("nodeagent.models.residency", "ResidencyError"): (409, "conflict", "model"),
    ("nodeagent.providers.base", "ProviderUnavailable"): (503, "provider_unavailable", None),
}


def _domain_handler(status: int, type_: str, field: str | None):  # type: ignore[no-untyped-def]
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        message = str(exc.args[0]) if type(exc).__name__ == "PodNotFound" and exc.args else str(exc)
        if type(exc).__name__ == "PodNotFound":
            message = f"no pod with pod_id {message!r}"
        return error_response(status, type_, message or type(exc).__name__, field)

    return handler


_FIELD_PREFIX = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:[.\[][A-Za-z0-9_\]]*)*): ")


def _invalid_input(status: int, type_: str):  # type: ignore[no-untyped-def]
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        """A ValueError subclass a component raises as "field: what is wrong"."""
        message = str(exc)
        match = _FIELD_PREFIX.match(message)
        return error_response(status, type_, message, match.group(1) if match else None)

    return handler



async def _on_pod_failed(request: Request, exc: Exception) -> JSONResponse:
    """A one-turn pod (OpenAI chat) did not succeed: say why, with a status that fits the cause."""
    pod = getattr(exc, "pod", None)
    phase = getattr(getattr(getattr(pod, "status", None), "phase", None), "value", "")
    text = str(exc)
    lowered = text.lower()
    if phase == "Refused":
        return error_response(403, "refused", text)
    if "not found" in lowered or "modelnotfound" in lowered or "no model" in lowered:
        return error_response(404, "not_found", text, "model")
    if phase == "Cancelled":
        return error_response(409, "cancelled", text)
    return error_response(502, "pod_failed", text)


async def _on_timeout(request: Request, exc: Exception) -> JSONResponse:
    return error_response(504, "timeout", str(exc) or "the node did not answer in time")


async def _on_queue_full(request: Request, exc: Exception) -> JSONResponse:
    retry = getattr(exc, "retry_after_s", 1)
    return error_response(429, "queue_full", str(exc), headers={"Retry-After": str(retry)})


async def _on_node_closed(request: Request, exc: Exception) -> JSONResponse:
    return error_response(503, "draining", str(exc), headers={"Retry-After": "30"})


def install_error_handlers(app: FastAPI) -> None:
    import importlib

    from nodeagent.node import NodeClosed, QueueFull
    from nodeagent.pods import PodInvalid, PodNotPlaceable, PodReferenceUnknown

    def add(exc_class: Any, handler: Any) -> None:
        app.add_exception_handler(exc_class, _openai_aware(handler))  # OpenAI's shape on its routes

    add(QueueFull, _on_queue_full)
    add(NodeClosed, _on_node_closed)
    add(TimeoutError, _on_timeout)
    # A pod the node cannot take as written; the most specific class answers.
    add(PodInvalid, _invalid_input(422, "invalid_request"))
    add(PodReferenceUnknown, _invalid_input(404, "not_found"))
    add(PodNotPlaceable, _invalid_input(409, "conflict"))
    for module_name, class_name, handler in (
            ("nodeagent.openai_compat", "ChatCompletionFailed", _on_pod_failed),
            # Known but not honoured (echo, n > 1): not a wrong value (422), a request the agent does not serve.
            ("nodeagent.openai_compat", "UnsupportedParameter", _invalid_input(400, "unsupported_parameter"))):
        try:
            add(getattr(importlib.import_module(module_name), class_name), handler)
        except (ImportError, AttributeError):
            pass
    for (module_name, class_name), (status, type_, field) in DOMAIN_ERRORS.items():
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        add(cls, _domain_handler(status, type_, field))
    add(RequestValidationError, _on_request_validation)
    add(ValidationError, _on_pydantic_validation)
    add(ApiError, _on_api_error)
    add(StarletteHTTPException, _on_http_exception)
    add(Exception, _on_unexpected)
    document_errors(app)


# ---------------------------------------------------------------- the errors in /openapi.json
# Answers made around the routes rather than by them (authentication, request
# validation, the limits), declared on every operation they can reach so the
# document lists every status the server really gives. Routes declare their
# own answers (404, 409, 429, 503, ...) with `routes.common.error_responses`.
ANY_OPERATION = {
    401: "TCP: no bearer token, or one that is wrong or revoked (on the Unix socket: an unknown issued token)",
    504: "no response started within api.request_timeout_s",
}
WITH_INPUT = {422: "a value is wrong: `field` names it as a dotted path (spec.turns[0].maxTokens)"}
WITH_BODY = {
    400: "the body is not well-formed JSON (or Content-Length is not a number)",
    413: "the body is larger than api.max_body_bytes",
    415: "the body is not sent as application/json",
}
ERROR_SCHEMA_REF = "#/components/schemas/ErrorBody"


def document_errors(app: FastAPI) -> None:
    """Make ``app.openapi()`` declare `ANY_OPERATION`, `WITH_INPUT` and `WITH_BODY` answers.

    An operation that declares ``security: []`` (``/healthz``) is answered
    without credentials, so it gets no 401.
    """
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            declare_common_errors(generate())
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def declare_common_errors(document: dict[str, Any]) -> dict[str, Any]:
    """Add the answers made around the routes to every operation of ``document`` (in place)."""
    from http import HTTPStatus

    _ensure_error_schema(document)
    for operations in document.get("paths", {}).values():
        for method, operation in operations.items():
            if method not in _HTTP_METHODS:
                continue
            codes = dict(ANY_OPERATION)
            if operation.get("security") == []:
                del codes[401]
            if operation.get("parameters") or "requestBody" in operation:
                codes.update(WITH_INPUT)
            if "requestBody" in operation:
                codes.update(WITH_BODY)
            responses = operation.setdefault("responses", {})
            for code, meaning in codes.items():
                entry = responses.setdefault(str(code), {})
                if entry.get("description") in (None, "", HTTPStatus(code).phrase, "Validation Error"):
                    entry["description"] = meaning
                # Also replaces FastAPI's own 422 schema (HTTPValidationError), which this API never answers.
                entry["content"] = {"application/json": {"schema": {"$ref": ERROR_SCHEMA_REF}}}
            operation["responses"] = dict(sorted(responses.items()))
    schemas = document.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        if unused in schemas and f"/{unused}\"" not in json.dumps(document):
            del schemas[unused]
    return document


def _ensure_error_schema(document: dict[str, Any]) -> None:
    from nodeagent.api.schemas import ErrorBody

    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    if "ErrorBody" in schemas:
        return
    schema = ErrorBody.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}",
                                         mode="serialization")
    for name, definition in schema.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    schemas["ErrorBody"] = schema


def json_bytes(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()

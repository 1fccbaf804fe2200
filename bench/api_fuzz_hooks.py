"""Schemathesis hooks shared by `bench.api_fuzz` and tests/test_api_schema.py.

Two rules of the chat API are ones JSON Schema cannot state, so a generated
request is made to keep them (nothing else is changed, and a value that is not
even well-formed, a negative case, is left as generated):

* ``tool_choice`` names a function, and it must be one of the request's own
  ``tools`` (a reference): a missing name becomes the first tool's name.
* ``response_format.json_schema.schema`` must be a JSON Schema that llama.cpp's
  grammar converter understands (the document can say "an object", not which
  ones): a schema the converter refuses becomes ``{"type": "object"}``.

The server's 422 for either is right; the document cannot promise it.

The CLI loads this module with ``SCHEMATHESIS_HOOKS=bench.api_fuzz_hooks``; the
test imports it.
"""

from __future__ import annotations

import json
import re
from typing import Any

import schemathesis

CHAT_PATHS = frozenset({"/v1/chat/completions", "/openai/v1/chat/completions"})
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _tool_names(tools: Any) -> list[str]:
    if not isinstance(tools, list):
        return []
    names = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str) and FUNCTION_NAME.match(name):
            names.append(name)
    return names


def _enforceable(schema: dict[str, Any]) -> bool:
    from llama_cpp import llama_grammar  # the converter the node uses (nodeagent.openai_compat)

    try:
        llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception:  # noqa: BLE001 - any refusal of the converter
        return False
    return True


def consistent_body(body: Any) -> Any:
    """``body`` keeping the two rules above."""
    if not isinstance(body, dict):
        return body
    response_format = body.get("response_format")
    spec = response_format.get("json_schema") if isinstance(response_format, dict) else None
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if isinstance(schema, dict) and not _enforceable(schema):
        body = {**body, "response_format": {**response_format, "json_schema": {**spec, "schema": {"type": "object"}}}}
    choice = body.get("tool_choice")
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    names = _tool_names(body.get("tools"))
    if isinstance(name, str) and FUNCTION_NAME.match(name) and names and name not in names:
        return {**body, "tool_choice": {**choice, "function": {**function, "name": names[0]}}}
    return body


@schemathesis.hook
def map_case(context: Any, case: Any) -> Any:
    # map_case, not map_body: the coverage phase applies only the case hooks.
    if case.operation.path in CHAT_PATHS:
        case.body = consistent_body(case.body)
    return case

"""Schemathesis hooks shared by `bench.api_fuzz` and tests/test_api_schema.py.

One rule of the API is a reference JSON Schema cannot state: a chat request's
``tool_choice`` names a function, and that function must be one of the request's
own ``tools``. The server's 422 for a name that is not is right, and the
document cannot promise it, so a generated request that names a missing tool is
made to name its first tool instead. Nothing else is changed: a request whose
name is not even a well-formed string (a negative case) is left as generated.

The CLI loads this module with ``SCHEMATHESIS_HOOKS=bench.api_fuzz_hooks``; the
test imports it.
"""

from __future__ import annotations

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


def consistent_body(body: Any) -> Any:
    """``body`` with a well-formed tool_choice name that its tools lack replaced by its first tool's name."""
    if not isinstance(body, dict):
        return body
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

"""Where a pydantic validation error points, named as the wire names it: the one home of
that rule for the API's error bodies (`nodeagent.api.errors`) and for the "field: what is
wrong" messages of errors raised below the API (`PodInvalid` of an OpenAI request).

``('body', 'spec', 'turns', 0, 'messages')`` is ``spec.turns[0].messages``; pydantic's
markers for the member of a union that failed (``stop.str``, ``prompt.constrained-str``)
are not fields and are left out, and of a union's members only the one whose type
matched is reported (``stop: at most 4 items``, not also ``stop: should be a string``).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from pydantic import ValidationError


def field_path(loc: Iterable[Any]) -> str:
    """('body', 'spec', 'turns', 0, 'messages') -> 'spec.turns[0].messages'.

    A location that is only 'body' (malformed JSON, wrong top-level type) names
    ``body``; query and path parameters are named bare (``refresh``, ``pod_id``).
    """
    parts = list(loc)
    origin = "body"
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        origin = parts.pop(0)
        if not parts:
            return str(origin)
    out = ""
    for index, part in enumerate(parts):
        if isinstance(part, int):
            out += f"[{part}]"
        elif str(part).startswith("function-") or (origin == "body" and index and _UNION_MEMBER.match(str(part))):
            continue  # pydantic's validator markers and union members are not field names
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


# pydantic names the member of a union that failed in the location: ``stop.str``,
# ``stop.list[str]``, ``prompt.constrained-str``, ``content.list[ChatContentPart]``, and a
# dict's key as ``[key]``. Wire fields are lower camel or snake case, so these are not fields.
_UNION_MEMBER = re.compile(r"^(?:str|int|float|bool|bytes|none|[a-z]+(?:-[a-z]+)+.*|.*[\[\]].*|[A-Z].*)$")


def validation_details(errors: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    details = []
    for err in errors:
        loc = err.get("loc", ())
        # A JSON decode error carries the character offset as the last loc item.
        if err.get("type") == "json_invalid":
            details.append({"field": "body", "message": f"invalid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}",
                            "type": "json_invalid"})
            continue
        message = str(err.get("msg", "invalid value"))
        message = message.removeprefix("Value error, ")
        details.append({"field": field_path(loc), "message": message, "type": err.get("type", "value_error")})
    return _union_members_that_matched(details)


def _union_members_that_matched(details: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop "should be a valid string" where the value was a list (or the like) of a union
    (``stop: str | list[str]``): pydantic reports every member, the one whose type
    matched says what is wrong (``stop: at most 4 items``, ``prompt[1]: too short``)."""
    def matched_elsewhere(detail: dict[str, Any]) -> bool:
        field = detail["field"]
        return any(other is not detail and not other["type"].endswith("_type")
                   and (other["field"] == field or other["field"].startswith((field + ".", field + "[")))
                   for other in details)

    return [d for d in details if not (d["type"].endswith("_type") and matched_elsewhere(d))]


def first_problem(exc: ValidationError) -> str:
    """``"field: what is wrong"`` for the first problem of ``exc`` (the API reads the field back)."""
    details = validation_details(exc.errors(include_url=False))
    if not details:
        return f"body: {exc}"
    return f"{details[0]['field']}: {details[0]['message']}"


__all__ = ["field_path", "first_problem", "validation_details"]

"""The base of every wire format.

Python attributes are snake_case; the wire (JSON, schemas, receipts) is
lowerCamelCase. Every model forbids unknown fields so that a typo in a request
is an error that names the field instead of a silently ignored value.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

API_VERSION = "agent-machine/v1"
# The largest integer every JSON reader holds exactly (I-JSON, RFC 7493); receipts
# are canonical JSON (RFC 8785), which refuses larger ones, so inputs stop here.
MAX_SAFE_INTEGER = 2**53 - 1


def one_of_present(*names: str) -> dict[str, Any]:
    """JSON Schema: exactly one of ``names`` is present and not null (a model validator enforces it)."""
    return {"oneOf": [{"required": [name], "properties": {name: {"not": {"type": "null"}}}} for name in names]}


def any_of_present(*names: str) -> dict[str, Any]:
    """JSON Schema: at least one of ``names`` is present and not null (a model validator enforces it)."""
    return {"anyOf": [{"required": [name], "properties": {name: {"not": {"type": "null"}}}} for name in names]}


class Contract(BaseModel):
    """A part of a wire format (nested object)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
    )

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict exactly as it goes on the wire."""
        return self.model_dump(mode="json", by_alias=True)


class Input(Contract):
    """A part of what a client writes (a pod's metadata and spec, a request body).

    Scalars are strict as in JSON: 0 is not false, "5" is not 5 and 5.5 is not
    an integer, so a wrongly typed value is an error naming the field, as the
    schema says (pydantic's lax mode took them). Enum and date-time fields opt
    out with ``Field(strict=False)``: validated from Python values (FastAPI,
    stored documents), strict mode would refuse their JSON strings.
    """

    model_config = ConfigDict(strict=True)


class Resource(Contract):
    """A top-level, versioned kind: carries `apiVersion` and `kind`.

    Subclasses pin `kind` with a Literal default so a document of one kind can
    never validate as another.
    """

    api_version: str = API_VERSION

    def model_post_init(self, __context: Any) -> None:
        if self.api_version != API_VERSION:
            raise ValueError(f"apiVersion must be {API_VERSION!r}, got {self.api_version!r}")

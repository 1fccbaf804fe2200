"""The base of every wire format.

Python attributes are snake_case; the wire (JSON, schemas, receipts) is
lowerCamelCase. Every model forbids unknown fields so that a typo in a request
is an error that names the field instead of a silently ignored value.
"""

from __future__ import annotations

import numbers
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
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


def _scalar_kind(annotation: Any) -> type | None:
    """bool, int or float when a field holds only that scalar (or null), else None."""
    members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    kinds = [member for member in members if member is not type(None)]
    return kinds[0] if len(kinds) == 1 and kinds[0] in (bool, int, float) else None


class JsonScalars(BaseModel):
    """Scalar fields take their JSON type only, as the schema says: 0 is not false and "5"
    is not 5 (pydantic's lax mode took both); 1.0 is an integer, as in JSON Schema.

    Not pydantic's strict mode: validated from Python values (FastAPI, stored
    documents), that refuses the JSON strings of enums and date-times, and 1.0.
    """

    @field_validator("*", mode="before")
    @classmethod
    def _json_scalar(cls, value: Any, info: ValidationInfo) -> Any:
        kind = _scalar_kind(cls.model_fields[info.field_name].annotation) if info.field_name else None
        if kind is None or value is None:
            return value
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"must be true or false, not {type(value).__name__}")
        elif isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"must be a JSON {'integer' if kind is int else 'number'}, not {type(value).__name__}")
        return value


class Input(Contract, JsonScalars):
    """A part of what a client writes (a pod's metadata and spec, a request body): scalars as JSON types."""


class Resource(Contract):
    """A top-level, versioned kind: carries `apiVersion` and `kind`.

    Subclasses pin `kind` with a Literal default so a document of one kind can
    never validate as another.
    """

    api_version: str = Field(default=API_VERSION, json_schema_extra={"const": API_VERSION})

    def model_post_init(self, __context: Any) -> None:
        if self.api_version != API_VERSION:
            raise ValueError(f"apiVersion must be {API_VERSION!r}, got {self.api_version!r}")

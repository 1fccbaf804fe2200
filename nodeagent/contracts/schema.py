"""JSON Schema export for every contract kind.

Kinds are discovered: every `Resource` subclass defined in a module of this
package with a pinned `kind` default is exported, so adding a kind never
requires touching a list here.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from pathlib import Path

import nodeagent.contracts as package
from nodeagent.contracts.base import Resource
from nodeagent.fsutil import PUBLIC_FILE_MODE, atomic_write_text


def kinds() -> dict[str, type[Resource]]:
    found: dict[str, type[Resource]] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, Resource) and value is not Resource:
                field = value.model_fields.get("kind")
                if field is not None and isinstance(field.default, str):
                    found[field.default] = value
    return dict(sorted(found.items()))


def schema_text(model: type[Resource]) -> str:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def export_schemas(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for kind, model in kinds().items():
        path = directory / f"{kind}.schema.json"
        atomic_write_text(path, schema_text(model), mode=PUBLIC_FILE_MODE)  # documentation, in the repository
        written.append(path)
    return written

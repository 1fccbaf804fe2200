"""Committed JSON Schemas in docs/contracts must match the code."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from nodeagent.contracts.schema import kinds, schema_text

DOCS = Path(__file__).resolve().parent.parent / "docs" / "contracts"


@pytest.mark.parametrize("kind", sorted(kinds()))
def test_committed_schema_matches_code(kind):
    committed = DOCS / f"{kind}.schema.json"
    assert committed.exists(), f"{committed} missing: run `agent-machine contracts export docs/contracts`"
    assert committed.read_text() == schema_text(kinds()[kind]), (
        f"{kind} schema drifted from code: run `agent-machine contracts export docs/contracts` and review the diff"
    )


def test_no_stale_schema_files():
    on_disk = {p.name.removesuffix(".schema.json") for p in DOCS.glob("*.schema.json")}
    assert on_disk == set(kinds()), f"stale or missing schema files: {on_disk ^ set(kinds())}"


def test_every_kind_pins_api_version_and_kind():
    for kind, model in kinds().items():
        schema = model.model_json_schema(by_alias=True)
        assert "apiVersion" in schema["properties"], kind
        assert schema["properties"]["kind"]["const"] == kind


def test_wrong_api_version_is_rejected_with_its_name():
    from nodeagent.contracts.machine import MachineProfile

    with pytest.raises(ValidationError) as err:
        MachineProfile.model_validate({"apiVersion": "agent-machine/v0", "kind": "MachineProfile"})
    assert "apiVersion" in str(err.value)

"""Bad input never produces a 5xx: arbitrary JSON (and near-valid pods) against the write routes."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pod_factory import make_pod
from test_api_harness import ServedApi, make_node

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    node = make_node(tmp)
    node.pause_dispatch()
    api = ServedApi(node, tmp / "run" / "agent-machine" / "api.sock")
    with api.client() as c:
        yield c
    api.stop()
    node.close()


def mutate(doc, path, value):
    """Replace the value at ``path`` (list of keys/indexes) inside a copy of ``doc``."""
    import copy

    doc = copy.deepcopy(doc)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


POD = make_pod().to_wire()
PATHS = [["metadata", "name"], ["metadata", "tenant"], ["spec", "model"], ["spec", "model", "name"],
         ["spec", "context"], ["spec", "context", 0, "scope"], ["spec", "turns"], ["spec", "turns", 0, "maxTokens"],
         ["spec", "turns", 0, "messages", 0, "role"], ["spec", "policy"], ["spec", "resources"], ["kind"], ["id"]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=json_values, route=st.sampled_from(["/v1/pods", "/v1/placements:score", "/v1/chat/completions"]))
def test_arbitrary_json_is_a_4xx(client, body, route):
    response = client.post(route, json=body)
    assert response.status_code < 500 or response.status_code == 501, response.text
    if response.status_code >= 400:
        assert response.json()["error"]["message"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(PATHS), value=json_values)
def test_near_valid_pods_are_accepted_or_named(client, path, value):
    response = client.post("/v1/pods", json=mutate(POD, path, value))
    assert response.status_code in (201, 422, 429), response.text
    if response.status_code == 422:
        error = response.json()["error"]
        assert error["field"], error


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_arbitrary_bytes_are_a_4xx(client, raw):
    response = client.post("/v1/pods", content=raw, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text

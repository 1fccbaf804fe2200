"""The OpenAPI document and the server agree (issue #11, D10).

`test_the_server_answers_as_its_document_says` is schemathesis, through its
pytest API, against the production node (the tiny model imported, real
llama-cpp-python workers, KV tiers, signed receipts) served by real uvicorn on
TCP: every operation of the live /openapi.json, the coverage phase's boundary
and negative cases plus a few generated ones each, with every check that
judges an answer. A 5xx, an undeclared status or content type, a body that is
not its declared schema, a schema-valid request refused or a schema-invalid
one accepted fails it. `python -m bench.api_fuzz` runs the same against
`agent-machine serve` at scale (5,000+ cases while pods execute).

The tests after it pin each D10 finding; each failed on the code before its fix.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

import bench.api_fuzz_hooks  # noqa: F401 - registers the hook for references JSON Schema cannot state
from nodeagent.api.auth import UNAUTHENTICATED_PATHS
from nodeagent.config import load_config
from nodeagent.daemon import default_node
from nodeagent.models.store import ModelStore

from pod_factory import make_pod
from test_api_harness import ServedApi, env_for, make_node

pytestmark = pytest.mark.llama

MODEL = "tiny"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_path):
    tmp = tmp_path_factory.mktemp("schema")
    ModelStore(tmp / "state").import_model(tiny_model_path, MODEL)
    node = default_node(load_config(env_for(tmp)))
    node.start()
    api = ServedApi(node, tcp=True)
    yield api
    api.stop()
    node.close()


@pytest.fixture(scope="module")
def client(served):
    with served.client(timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def document(client):
    return client.get("/openapi.json").json()


@pytest.fixture(scope="module")
def api_schema(served):
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{served.port}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_the_server_answers_as_its_document_says(case):
    case.call_and_validate(timeout=60)


# ---------------------------------------------------------------- helpers
def declared(document, path, method, status):
    """The schema the document declares for ``status`` of ``method path`` (KeyError when it declares none)."""
    return document["paths"][path][method]["responses"][str(status)]["content"]["application/json"]["schema"]


def conforms(document, schema_ref, instance) -> bool:
    """Does ``instance`` match the schema ``{"$ref": ...}`` of the document?"""
    validator = jsonschema.Draft202012Validator({**schema_ref, "components": document["components"]},
                                                format_checker=jsonschema.FormatChecker())
    return validator.is_valid(instance)


def request_schema(document, path, method):
    return document["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]


def pod_body(**spec_changes):
    body = make_pod(model=MODEL).to_wire()
    body.pop("id"), body.pop("status")
    body["spec"].update(spec_changes)
    return body


# ---------------------------------------------------------------- 405 and Allow
@pytest.mark.parametrize("method, path, allow", [
    ("OPTIONS", "/v1/pods", "GET, POST"),
    ("PATCH", "/v1/pods/0123abcd", "DELETE, GET"),
    ("PUT", "/v1/models/tiny:load", "POST"),
])
def test_405_allow_lists_every_method_of_the_resource(client, method, path, allow):
    # Before: Starlette named only the first route that matched the path (Allow: POST on /v1/pods).
    answer = client.request(method, path)
    assert answer.status_code == 405
    assert answer.headers["allow"] == allow
    assert answer.json()["error"]["field"] == "method"


# ---------------------------------------------------------------- every answer declared
def test_every_operation_declares_the_errors_made_around_the_routes(document):
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            codes = set(operation["responses"])
            assert "504" in codes, (method, path)
            assert ("401" in codes) == (path not in UNAUTHENTICATED_PATHS), (method, path)
            if "requestBody" in operation:
                assert {"400", "413", "415", "422"} <= codes, (method, path)
            for code in codes - {"200", "201"}:
                assert declared(document, path, method, code)["$ref"].endswith("/ErrorBody"), (method, path, code)


def test_malformed_json_is_a_declared_400(client, document):
    # Before: POST /v1/models/{name}:load answered 400 and declared 404, 409, 422, 501, 503.
    answer = client.post("/v1/models/tiny:load", content=b"\x00", headers={"content-type": "application/json"})
    assert answer.status_code == 400
    assert conforms(document, declared(document, "/v1/models/{name}:load", "post", 400), answer.json())


def test_scoring_a_pod_of_an_unknown_model_is_a_declared_404(client, document):
    # Before: 404 was not among POST /v1/placements:score's declared answers.
    answer = client.post("/v1/placements:score", json=pod_body(model={"name": "no-such-model"}))
    assert answer.status_code == 404, answer.text
    assert conforms(document, declared(document, "/v1/placements:score", "post", 404), answer.json())


def test_an_empty_receipt_log_has_no_latest_checkpoint_not_a_500(tmp_path):
    # Before: the node asked its empty log for a checkpoint and the ReceiptError was a 500.
    # The production node signs its storage receipt as it starts, so its log is never
    # empty; the harness's node (its executor signs nothing) keeps one empty.
    node = make_node(tmp_path)
    api = ServedApi(node, tcp=True)
    try:
        with api.client() as fresh:
            answer = fresh.get("/v1/checkpoints/latest")
    finally:
        api.stop()
        node.close()
    assert answer.status_code == 404, answer.text


def test_a_keep_alive_beyond_a_year_is_refused_and_listing_models_still_works(client):
    # Before: keepAliveS=3.5e16 was taken, overflowed the residency's clock and every
    # later GET /v1/models (and /metrics) was a 500.
    answer = client.post("/v1/models/tiny:load", json={"keepAliveS": 3.5e16})
    assert answer.status_code == 422 and answer.json()["error"]["field"] == "keepAliveS"
    assert client.get("/v1/store/models").status_code == 200


def test_a_model_in_use_is_not_unloaded_with_a_500(served, client):
    # Before: the residency manager's refusal (requests running) escaped as a 500.
    node = served.node
    record = node.executor.models.resolve(MODEL)
    assert client.post(f"/v1/models/{MODEL}:load").status_code == 200
    with node.executor.pool.residency.use(record.digest):
        answer = client.post(f"/v1/models/{MODEL}:unload")
    assert answer.status_code == 409, answer.text
    assert answer.json()["error"]["field"] == "model"


# ---------------------------------------------------------------- /readyz
def test_readyz_503_answers_the_declared_error_body(tmp_path):
    # Before: 503 declared ErrorBody and answered a Readiness document.
    node = make_node(tmp_path)
    api = ServedApi(node, tcp=True)
    try:
        with api.client() as c:
            document = c.get("/openapi.json").json()
            node.drain(timeout_s=0)
            answer = c.get("/readyz")
    finally:
        api.stop()
        node.close()
    assert answer.status_code == 503
    assert conforms(document, declared(document, "/readyz", "get", 503), answer.json())
    assert answer.json()["error"]["details"][0]["message"] == "draining: not accepting new pods"


# ---------------------------------------------------------------- wrongly typed values refused
@pytest.mark.parametrize("deadline", [1893456000, "1893456000", "2030-01-01", "2030-01-01T00:00:00", True])
def test_a_deadline_that_is_not_an_rfc3339_date_time_is_refused_naming_it(client, document, deadline):
    # Before: pydantic read 1893456000 (or "2030-01-01") as an instant and the pod was admitted.
    body = pod_body(policy={"deadline": deadline})
    assert not conforms(document, request_schema(document, "/v1/pods", "post"), body)
    answer = client.post("/v1/pods", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["field"] == "spec.policy.deadline"


def test_a_deadline_with_its_offset_is_accepted(client):
    answer = client.post("/v1/pods", json=pod_body(policy={"deadline": "2099-01-01T00:00:00+02:00"}))
    assert answer.status_code == 201, answer.text


@pytest.mark.parametrize("path, body, field", [
    ("/v1/models/tiny:load", {"pin": 0}, "pin"),
    ("/v1/pods", pod_body(turns=[{"messages": [{"role": "user", "content": "hi"}], "maxTokens": "8"}]),
     "spec.turns[0].maxTokens"),
    ("/v1/pods", pod_body(policy={"cacheReuse": 1}), "spec.policy.cacheReuse"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": 0},
     "stream"),
])
def test_a_wrongly_typed_value_is_refused_not_coerced(client, path, body, field):
    # Before: pydantic's lax mode took 0 for false and "8" for 8.
    answer = client.post(path, json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["field"] == field


# ---------------------------------------------------------------- schema-valid requests accepted
def test_a_pod_naming_an_unknown_provider_is_404_not_422(client):
    # Before: a schema-valid pod pinned to a provider the node does not have was a 422.
    answer = client.post("/v1/pods", json=pod_body(provider="no-such-provider"))
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"]["field"] == "spec.provider"


@pytest.mark.parametrize("path, body", [
    # the node sets status: the request schema says so (it was AgentPod's, where status is allowed)
    ("/v1/pods", {**pod_body(), "status": {"phase": "Succeeded"}}),
    # a segment needs text or digest (both were optional in the schema)
    ("/v1/pods", pod_body(context=[{"role": "system", "text": None, "digest": None}])),
    # a chat turn needs a message other than system ones (any list of messages was valid)
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "system", "content": "be brief"}]}),
    # a model reference the pod contract refuses (any 1-256 characters were valid)
    ("/v1/chat/completions", {"model": "bad name!", "messages": [{"role": "user", "content": "hi"}]}),
])
def test_what_the_server_refuses_the_document_refuses(client, document, path, body):
    answer = client.post(path, json=body)
    assert answer.status_code == 422, answer.text
    assert not conforms(document, request_schema(document, path, "post"), body), json.dumps(body)


def test_a_pod_with_ids_left_null_is_accepted(client):
    body = make_pod(model=MODEL).to_wire()  # "id": null, "status": null
    assert client.post("/v1/pods", json=body).status_code == 201


def test_a_full_digest_is_a_digest_and_a_prefix_is_a_reference(client):
    record = client.get("/v1/store/models").json()["items"][0]
    for model in (record["digest"], record["digest"][:19]):
        answer = client.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert answer.status_code == 200, (model, answer.text)


def test_tcp_guarded_server_declares_what_it_answers_without_a_token(tmp_path):
    # The 401 every operation but /healthz declares is what the TCP listener answers.
    from nodeagent.api.auth import Authenticate
    from nodeagent.credentials import CredentialSet

    node = make_node(tmp_path)
    token = "t" * 32
    api = ServedApi(node, tcp=True,
                    guard=lambda app: Authenticate(app, CredentialSet(None, token), token_required=True))
    try:
        with api.client() as c:
            assert c.get("/healthz").status_code == 200
            answer = c.get("/v1/status")
            document = c.get("/openapi.json", headers={"authorization": f"Bearer {token}"}).json()
    finally:
        api.stop()
        node.close()
    assert answer.status_code == 401
    assert conforms(document, declared(document, "/v1/status", "get", 401), answer.json())

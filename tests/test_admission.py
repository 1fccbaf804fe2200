from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings, strategies as st

from nodeagent.admission import BUILT_IN, AdmissionRequest, Policy

from pod_factory import make_pod

NOW = datetime(2026, 11, 22, tzinfo=timezone.utc)

POLICY = """
version = 1
default = "deny"
[limits]
max_context = 4096
max_turns = 4
[tenants.acme]
models = ["tiny", "small:v2"]
providers = ["embedded-*", "llama_server"]
max_context = 2048
cache_scopes = ["private", "tenant"]
[tenants.labs]
models = ["*"]
cache_scopes = ["private", "tenant", "public"]
"""


@pytest.fixture()
def policy(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return Policy.load(path)


def decide(policy, pod, **kw):
    return policy.decide(AdmissionRequest(pod=pod, **kw), now=NOW)


def test_no_policy_configured_allows_and_says_so():
    decision = decide(Policy.load(None), make_pod(tenant="anyone", scope="public"))
    assert decision.allowed and decision.policy_source == BUILT_IN


def test_allowed_pod(policy):
    d = decide(policy, make_pod(), provider_name="embedded-0", provider_kind="llama_cpp_python", prompt_tokens=100)
    assert d.allowed, d.reasons
    assert d.policy_digest.startswith("sha256:")
    assert decide(policy, make_pod(model="tiny:latest")).allowed


def test_each_rule_refuses_with_a_reason_naming_it(policy):
    assert "tenant 'ghost' is not in the policy" in decide(policy, make_pod(tenant="ghost")).reasons[0]
    assert "model 'big'" in decide(policy, make_pod(model="big")).reasons[0]
    assert "provider 'vllm-0'" in decide(policy, make_pod(), provider_name="vllm-0", provider_kind="vllm").reasons[0]
    assert "spec.context[0].scope 'public'" in decide(policy, make_pod(scope="public")).reasons[0]
    assert "exceeds the largest allowed (2048)" in decide(policy, make_pod(), prompt_tokens=2045).reasons[0]
    assert "policy allows 4" in decide(policy, make_pod(turns=["a"] * 5)).reasons[0]
    late = make_pod(policy={"deadline": (NOW - timedelta(seconds=1)).isoformat()})
    assert "deadline" in decide(policy, late).reasons[0]
    # labs: any model, public allowed, global limit 4096 applies
    assert decide(policy, make_pod(tenant="labs", model="whatever", scope="public"), prompt_tokens=4000).allowed
    assert not decide(policy, make_pod(tenant="labs"), prompt_tokens=4090).allowed


@pytest.mark.parametrize("content,expected", [
    (None, "does not exist"),
    (b"version = 1\n[tenants.acme\n", "not valid TOML"),
    (b"version = 2\n", "version"),
    (b"version = 1\n[tenants.acme]\nmodelz = ['x']\n", "tenants.acme.modelz"),
    (b"\xff\xfe", "not valid TOML"),
])
def test_broken_policy_fails_closed(tmp_path, content, expected):
    path = tmp_path / "policy.toml"
    if content is not None:
        path.write_bytes(content)
    policy = Policy.load(path)
    decision = decide(policy, make_pod(tenant="labs"))
    assert not decision.allowed
    assert decision.reasons[0].startswith("fail closed:") and expected in decision.reasons[0]


def test_unreadable_policy_fails_closed(tmp_path):
    path = tmp_path / "policy.toml"
    path.mkdir()  # a directory where a file is expected: unreadable even for root
    assert not decide(Policy.load(path), make_pod()).allowed


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_any_corrupt_policy_bytes_never_allow(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("p") / "policy.toml"
    path.write_bytes(data)
    policy = Policy.load(path)
    decision = decide(policy, make_pod(tenant="acme"))
    # Either the bytes form a valid policy (then the normal rules apply, and acme
    # is not listed in such a tiny document unless it says so), or we fail closed.
    if policy.document is None:
        assert not decision.allowed
    elif "acme" not in policy.document.tenants and policy.document.default == "deny":
        assert not decision.allowed

"""`fastcheck.accepts` never accepts a statement the contract refuses, and accepts what we write."""

from __future__ import annotations

import copy
import json
import types
import typing

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, BeforeValidator, ValidationError

from nodeagent.contracts import receipt as contract
from nodeagent.contracts.receipt import ExecutionStatement
from nodeagent.receipts import fastcheck
from nodeagent.receipts.dsse import parse_envelope
from nodeagent.receipts.entry import build_execution_line
from nodeagent.receipts.keys import Signer
from nodeagent.receipts.samples import STATUSES, sample_input

SIGNER = Signer.generate()


def statement_of(receipt, seq=3):
    line = build_execution_line(receipt, seq=seq, previous=None if seq == 0 else bytes(range(32)), signer=SIGNER)
    return json.loads(parse_envelope(line).payload)


def pydantic_accepts(statement):
    try:
        ExecutionStatement.model_validate(statement)
    except ValidationError:
        return False
    return True


# ------------------------------------------------------------------ what we write
def _variants():
    for index in range(12):
        yield sample_input(index, STATUSES[index % 4])
    container = sample_input(1).model_copy(deep=True)
    container.provider.launch_mode = "podman"
    container.provider.image_digest = "sha256:" + "ab" * 32
    yield container
    no_session = sample_input(2, "failed").model_copy(deep=True)
    no_session.pod.session = None
    no_session.model.digest = None
    yield no_session


@pytest.mark.parametrize("receipt", list(_variants()), ids=lambda r: f"{r.pod.run_id}-{r.outcome.status}")
def test_every_statement_we_write_takes_the_fast_path(receipt):
    for seq in (0, 7):
        statement = statement_of(receipt, seq)
        assert fastcheck.accepts(statement) and pydantic_accepts(statement)


# ------------------------------------------------------------------ never more than the contract
BASES = [statement_of(r) for r in _variants()] + [statement_of(sample_input(0), seq=0)]


def _paths(node, prefix=()):
    if prefix:
        yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, prefix + (index,))


_TIMES = ["2025-01-02T03:04:05.000006Z", "2025-01-02T03:04:05.900000Z", "2024-12-31T23:59:59.999999Z",
          "2025-02-30T03:04:05.000006Z", "2025-01-02T24:00:00.000000Z", "2025-01-02T23:59:60.000000Z",
          "2025-01-02T03:04:05Z", "2025-01-02T03:04:05.000006+00:00", "2025-01-02t03:04:05.000006z",
          "2025-01-02T03:04:05.000006Z\n", "٢٠٢٥-01-02T03:04:05.000006Z"]
SPECIAL = st.sampled_from([
    None, True, False, 0, 1, -1, 2**53 - 1, 2**53, 10**30, 1.0, 0.5, float("nan"), "", "x", "x" * 253, "x" * 254,
    "bad\x00name", "tab\tname", "d\x7fl", "été", "\ud800", "sha256:" + "a" * 64, "sha256:" + "A" * 64, "a" * 64,
    "a" * 63, "sha256:" + "a" * 63, "SHA256:" + "a" * 64, "succeeded", "failed", "cancelled", "refused", "exploded",
    "embedded", "subprocess", "podman", "quadlet", "kube", "docker", "T0", "T1", "T2", "none", "T3", "request",
    "output", "input", [], {}, [1], {"a": 1}, contract.STATEMENT_TYPE, contract.EXECUTION_PREDICATE_TYPE,
    contract.KEY_ROTATION_PREDICATE_TYPE, *_TIMES,
])
VALUES = st.one_of(SPECIAL, st.integers(), st.text(max_size=6))
KEYS = st.sampled_from(["extra", "run_id", "type_", "_type", "predicate_type", "seq", "keyId", "key_id", "name"])


def _swap_times(p, data):
    timing = p["timing"]
    if not isinstance(timing, dict) or len(timing) < 2:  # an earlier edit replaced it: nothing to swap
        return
    a, b = data.draw(st.permutations(list(timing)), label="times")[:2]
    timing[a], timing[b] = timing[b], timing[a]


# Edits that keep every field well-formed but may break a rule between fields.
SEMANTIC = [
    lambda p, d: p["log"].update(seq=0),
    lambda p, d: p["log"].update(seq=d.draw(st.integers(min_value=1, max_value=9), label="seq")),
    lambda p, d: p["log"].update(previousLeafHash=None),
    lambda p, d: p["log"].update(previousLeafHash="cd" * 32),
    lambda p, d: p["timing"].update(startedAt=None),
    lambda p, d: p["timing"].update(firstTokenAt=None),
    _swap_times,
    lambda p, d: p.update(provider=None),
    lambda p, d: p.update(placement=None),
    lambda p, d: p["provider"] is not None and p["provider"].update(imageDigest="sha256:" + "e" * 64),
    lambda p, d: p["provider"] is not None and p["provider"].update(
        launchMode=d.draw(st.sampled_from(["embedded", "subprocess", "podman", "quadlet", "kube", "attach"]), label="mode")),
    lambda p, d: p["outcome"].update(status=d.draw(st.sampled_from(["succeeded", "failed", "cancelled", "refused"]),
                                                   label="status")),
    lambda p, d: p["outcome"].update(errorClass=d.draw(st.sampled_from([None, "ProviderCrashed"]), label="error")),
]


def _semantic(statement, data):
    edit = data.draw(st.sampled_from(SEMANTIC), label="semantic edit")
    edit(statement["predicate"], data)


def _mutate(statement, data):
    for _ in range(data.draw(st.integers(min_value=1, max_value=4), label="mutations")):
        paths = list(_paths(statement))
        if not paths:
            break
        action = data.draw(st.sampled_from(["set", "set", "copy", "delete", "add", "semantic", "semantic"]),
                           label="action")
        if action == "semantic":
            try:
                _semantic(statement, data)
            except (KeyError, TypeError, AttributeError):
                pass  # an earlier mutation removed what this edit changes
            continue
        path = data.draw(st.sampled_from(paths), label="path")
        parent = statement
        for part in path[:-1]:
            parent = parent[part]
        if action == "set":
            parent[path[-1]] = data.draw(VALUES, label="value")
        elif action == "copy":  # another field's value of this statement: often still valid
            source = data.draw(st.sampled_from(paths), label="from")
            node = statement
            try:
                for part in source:
                    node = node[part]
            except (KeyError, IndexError, TypeError):
                continue
            parent[path[-1]] = copy.deepcopy(node)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(KEYS, label="key")] = data.draw(VALUES, label="value")
        elif isinstance(parent, list):
            parent.append(copy.deepcopy(parent[0]) if parent else data.draw(VALUES))


@settings(max_examples=1500, deadline=None)
@given(base=st.sampled_from(BASES), data=st.data())
def test_accepts_nothing_the_contract_refuses(base, data):
    statement = copy.deepcopy(base)
    _mutate(statement, data)
    if fastcheck.accepts(statement):
        event("accepted")
        assert pydantic_accepts(statement), json.dumps(statement)[:2000]
    else:
        event("declined")


def _value_pool():
    pool = list(SPECIAL.wrapped_strategy.elements) if hasattr(SPECIAL, "wrapped_strategy") else list(SPECIAL.elements)
    for base in BASES:  # every value this statement holds anywhere: right in one place, wrong in another
        for path in _paths(base):
            node = base
            for part in path:
                node = node[part]
            pool.append(node)
    unique = {}
    for value in pool:
        unique.setdefault(json.dumps(value, sort_keys=True) + type(value).__name__, value)
    return list(unique.values())


ONE_PER_STATUS = [statement_of(sample_input(i, STATUSES[i])) for i in range(4)]


@pytest.mark.parametrize("base", ONE_PER_STATUS, ids=STATUSES)
def test_no_single_field_change_is_accepted_unless_the_contract_accepts_it(base):
    """Exhaustive for one edit: every field set to every value of the pool, and each key removed."""
    statement, pool, accepted = copy.deepcopy(base), _value_pool(), 0
    for path in list(_paths(base)):
        parent = statement
        for part in path[:-1]:
            parent = parent[part]
        original = parent[path[-1]]
        for value in [*pool, _DELETE]:
            if value is _DELETE:
                del parent[path[-1]]
            else:
                parent[path[-1]] = value  # shared, never modified: the checks only read
            if fastcheck.accepts(statement):
                accepted += 1
                assert pydantic_accepts(copy.deepcopy(statement)), (path, value)
            if value is _DELETE and isinstance(parent, list):
                parent.insert(path[-1], original)
            else:
                parent[path[-1]] = original  # a removed key comes back last: key order does not matter
    assert statement == base
    assert accepted > 20  # some edits keep the statement valid (an equal value, another valid time…)


_DELETE = object()


class _FirstChoice:
    """Stands in for hypothesis' data: each SEMANTIC edit's first (or a fixed) choice."""

    CHOICES = {"seq": 1, "mode": "embedded", "status": "succeeded", "error": None}

    def draw(self, strategy, label=None):
        if label == "times":
            return ["finishedAt", "queuedAt"]
        return self.CHOICES[label]


@pytest.mark.parametrize("base", ONE_PER_STATUS, ids=STATUSES)
def test_no_pair_of_rule_edits_is_accepted_unless_the_contract_accepts_it(base):
    for first in SEMANTIC:
        for second in [None, *SEMANTIC]:
            statement = copy.deepcopy(base)
            for edit in (first, second):
                if edit is not None:
                    try:
                        edit(statement["predicate"], _FirstChoice())
                    except (KeyError, TypeError, AttributeError):
                        pass
            if fastcheck.accepts(statement):
                assert pydantic_accepts(statement)


@pytest.mark.parametrize("change", [
    lambda p: p["log"].update(seq=0),                                   # genesis needs a null previous hash
    lambda p: p["log"].update(previousLeafHash=None),                   # and only genesis has one
    lambda p: p["provider"].update(imageDigest="sha256:" + "a" * 64),   # image digest outside a container
    lambda p: p["timing"].update(startedAt=p["timing"]["finishedAt"]),  # started after the first token
    lambda p: p["timing"].update(startedAt=None),                       # first token without a start
    lambda p: p["outcome"].update(errorClass="Oops"),                   # succeeded with an error class
    lambda p: p.update(provider=None),                                  # succeeded without a provider
    lambda p: p["outcome"].update(status="failed"),                     # failed without an error class
    lambda p: p["timing"].update(queuedAt="2025-02-30T03:04:05.000006Z"),  # not a real day
    lambda p: p["pod"].update(name="x" * 254),
    lambda p: p["usage"].update(promptTokens=True),
    lambda p: p["usage"].update(promptTokens=2**53),
])
def test_each_cross_field_rule_and_bound_is_enforced(change):
    statement = copy.deepcopy(BASES[0])
    assert fastcheck.accepts(statement)
    change(statement["predicate"])
    assert not fastcheck.accepts(statement) and not pydantic_accepts(statement)


def test_subject_count_is_bounded_like_the_contract():
    for subjects in ([], BASES[0]["subject"] + BASES[0]["subject"][:1]):
        statement = copy.deepcopy(BASES[0])
        statement["subject"] = copy.deepcopy(subjects)
        assert not fastcheck.accepts(statement) and not pydantic_accepts(statement)


def test_what_it_declines_the_contract_may_still_accept():
    """Narrower on purpose: snake_case keys and non-ASCII names go to pydantic, which accepts them."""
    by_name = copy.deepcopy(BASES[0])
    by_name["predicate"]["pod"]["run_id"] = by_name["predicate"]["pod"].pop("runId")
    non_ascii = copy.deepcopy(BASES[0])
    non_ascii["predicate"]["pod"]["tenant"] = "société"
    for statement in (by_name, non_ascii):
        assert not fastcheck.accepts(statement) and pydantic_accepts(statement)


# ------------------------------------------------------------------ drift: the contract changed
def _models(model, seen=None):
    seen = {} if seen is None else seen
    if model in seen:
        return seen
    seen[model] = None
    for info in model.model_fields.values():
        for candidate in _types_in(info.annotation):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                _models(candidate, seen)
    return seen


def _types_in(annotation):
    yield annotation
    for arg in typing.get_args(annotation):
        yield from _types_in(arg)


def test_the_contract_has_only_the_validators_the_fast_check_restates():
    found = set()
    for model in _models(ExecutionStatement):
        decorators = model.__pydantic_decorators__
        assert not decorators.field_validators and not decorators.validators, model
        assert model.__pydantic_post_init__ is None, model
        found |= {f"{model.__name__}.{name}" for name in decorators.model_validators}
        for name, info in model.model_fields.items():
            befores = [m.func for arg in [info] for m in info.metadata if isinstance(m, BeforeValidator)]
            for arg in typing.get_args(info.annotation):
                befores += [m.func for m in getattr(arg, "__metadata__", ()) if isinstance(m, BeforeValidator)]
            assert set(befores) <= {contract._normalize_time}, f"{model.__name__}.{name}"
    assert found == fastcheck.MIRRORED_VALIDATORS, "update nodeagent/receipts/fastcheck.py to the contract's validators"


# Every field of the statement, by wire path, with the constraint the fast check applies to it.
LABEL, DIGEST, HEX64 = contract.LABEL_PATTERN, contract.DIGEST_PATTERN, contract.HEX64_PATTERN
HASH = r"^(sha256:)?[0-9a-f]{64}$"
TIME = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$"
EXPECTED_FIELDS = {
    "_type": "literal", "predicateType": "literal", "subject": "list",
    "subject[].name": LABEL, "subject[].digest": "model", "subject[].digest.sha256": HEX64,
    "predicate": "model",
    "predicate.pod": "model", "predicate.pod.name": LABEL, "predicate.pod.runId": LABEL, "predicate.pod.tenant": LABEL,
    "predicate.pod.agent": LABEL, "predicate.pod.session": LABEL + "?", "predicate.pod.requestDigest": DIGEST,
    "predicate.model": "model", "predicate.model.name": LABEL, "predicate.model.digest": DIGEST + "?",
    "predicate.provider": "model?", "predicate.provider.kind": LABEL, "predicate.provider.version": LABEL,
    "predicate.provider.launchMode": "literal", "predicate.provider.imageDigest": DIGEST + "?",
    "predicate.placement": "model?", "predicate.placement.decisionId": LABEL, "predicate.placement.chosen": "model",
    "predicate.placement.alternatives": "count", "predicate.placement.chosen.candidateId": LABEL,
    "predicate.placement.chosen.provider": LABEL, "predicate.placement.chosen.device": LABEL + "?",
    "predicate.placement.chosen.terms": "model", **{f"predicate.placement.chosen.terms.{k}": "count" for k in
                                                   ("queueWaitUs", "loadUs", "restoreUs", "prefillUs", "ttftUs")},
    "predicate.cache": "model", "predicate.cache.tierHit": "literal", "predicate.cache.cachedTokens": "count",
    "predicate.cache.evaluatedTokens": "count",
    "predicate.timing": "model", "predicate.timing.queuedAt": TIME, "predicate.timing.startedAt": TIME + "?",
    "predicate.timing.firstTokenAt": TIME + "?", "predicate.timing.finishedAt": TIME,
    "predicate.usage": "model", "predicate.usage.promptTokens": "count", "predicate.usage.completionTokens": "count",
    "predicate.outcome": "model", "predicate.outcome.status": "literal", "predicate.outcome.errorClass": LABEL + "?",
    "predicate.policy": "model?", "predicate.policy.source": LABEL, "predicate.policy.digest": DIGEST + "?",
    "predicate.policy.verdict": "literal", "predicate.policy.reasons": "list", "predicate.policy.reasons[]": LABEL,
    "predicate.log": "model", "predicate.log.seq": "count", "predicate.log.previousLeafHash": HEX64 + "?",
    "predicate.machine": "model", "predicate.machine.identityHash": HASH, "predicate.machine.host": LABEL,
    "predicate.machine.agentVersion": LABEL, "predicate.machine.profileDigest": HASH,
    "predicate.machine.keyId": HEX64,
}


def _describe(annotation, metadata):
    """(kind or pattern, nested model or None) of a field, from its annotation and constraints."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        assert len(options) == 1 and not metadata
        kind, nested = _describe(options[0], [])
        return kind + "?", nested
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extra = typing.get_args(annotation)
        flat = [m for item in extra for m in getattr(item, "metadata", [item])]
        return _describe(base, metadata + flat)
    constraints = [m for m in metadata if not isinstance(m, BeforeValidator)]
    if typing.get_origin(annotation) is typing.Literal:
        assert not constraints
        return "literal", None
    if typing.get_origin(annotation) is list:  # the subjects (1-2), the policy's reasons (at most 16)
        assert sorted(repr(c) for c in constraints) in (["MaxLen(max_length=2)", "MinLen(min_length=1)"],
                                                       ["MaxLen(max_length=16)"])
        return "list", typing.get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        assert not constraints
        return "model", annotation
    if annotation is int:
        bounds = {type(c).__name__: c for c in constraints}
        assert bounds["Ge"].ge == 0 and bounds["Le"].le == contract.MAX_SAFE_INTEGER and bounds["Strict"].strict
        assert set(bounds) == {"Ge", "Le", "Strict"}
        return "count", None
    assert annotation is str, annotation
    patterns = [c.pattern for c in constraints if isinstance(getattr(c, "pattern", None), str)]
    assert len(patterns) == len(constraints) == 1, constraints
    return patterns[0], None


def _fields(model, prefix=""):
    for name, info in model.model_fields.items():
        path = f"{prefix}{info.alias or name}"
        kind, nested = _describe(info.annotation, list(info.metadata))
        yield path, kind
        if kind == "list" and not (isinstance(nested, type) and issubclass(nested, BaseModel)):
            yield f"{path}[]", _describe(nested, [])[0]  # a list of plain values (the policy's reasons)
        elif nested is not None:
            yield from _fields(nested, f"{path}[]." if kind == "list" else f"{path}.")


def test_the_contract_has_exactly_the_fields_and_constraints_the_fast_check_knows():
    assert dict(_fields(ExecutionStatement)) == EXPECTED_FIELDS, \
        "the contract changed: update nodeagent/receipts/fastcheck.py and this table together"
    assert set(fastcheck._LAUNCH_MODES) == {"embedded", "subprocess", "podman", "quadlet", "kube", "attach"}
    assert set(fastcheck._TIERS) == {"T0", "T1", "T2", "none"}
    assert set(fastcheck._STATUSES) == {"succeeded", "failed", "cancelled", "refused"}

"""A quick, conservative acceptance check for execution statements.

Verifying a log validates every signed statement against its contract,
`nodeagent.contracts.receipt.ExecutionStatement`. Pydantic does that in
about 40 us a receipt — as much as a third of the whole per-entry cost, most
of it in calls back into the contract's Python validators. `accepts` does
the same checks in straight-line Python in about half the time, so verifying
is bounded by the signature check instead.

The contract stays the authority: ``accepts(statement)`` returns True only
for a statement ``ExecutionStatement.model_validate`` accepts, and False for
anything it is not sure of, whereupon the caller asks pydantic, which decides
and names what is wrong. It is deliberately narrower than the contract:

* every field present under its wire name, no other key (as our writer emits);
* integers are ``int`` (never bool or float), strings ``str`` and ASCII-only
  where a pattern applies (non-ASCII names go to pydantic);
* times already in their normal form (``...T03:04:05.000006Z``, a real instant).

Field names, patterns and allowed values are read from the contract models,
not restated; the rules that span fields (the contract's model validators)
are restated here, and tests/test_receipts_fastcheck.py holds the whole to
"accepts ⇒ pydantic accepts" on thousands of altered statements and fails if
the contract gains a field or a validator this module does not know.
"""

from __future__ import annotations

import re
import typing
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from nodeagent.contracts import receipt as contract

# The contract's model validators restated below (`_rules`); the test compares
# this list with the contract's, so a new validator cannot go unnoticed.
MIRRORED_VALIDATORS = frozenset({
    "LogPosition._genesis", "ProviderInfo._image_only_in_containers", "Timing._ordered",
    "Outcome._error_class", "ExecutionPredicate._consistent",
})


def _keys(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(info.alias or name for name, info in model.model_fields.items())


def _pattern(model: type[BaseModel], field: str) -> Any:
    """The field's regex from the contract, as an ASCII ``fullmatch``."""
    info = model.model_fields[field]
    metadata = list(info.metadata)
    for arg in typing.get_args(info.annotation):  # X | None: the constraints sit on X
        metadata += [m for item in getattr(arg, "__metadata__", ()) for m in getattr(item, "metadata", [item])]
    patterns = {m.pattern for m in metadata if isinstance(getattr(m, "pattern", None), str)}
    if len(patterns) != 1:
        raise TypeError(f"{model.__name__}.{field}: expected one pattern, found {patterns}")
    return re.compile(patterns.pop(), re.ASCII).fullmatch


def _literals(model: type[BaseModel], field: str) -> frozenset[str]:
    return frozenset(typing.get_args(model.model_fields[field].annotation))


_MAX = contract.MAX_SAFE_INTEGER
_LABEL = _pattern(contract.PodRef, "name")
_DIGEST = _pattern(contract.PodRef, "request_digest")
_HEX64 = _pattern(contract.MachineRef, "key_id")
_MACHINE_HASH = _pattern(contract.MachineRef, "identity_hash")
_PROFILE_HASH = _pattern(contract.MachineRef, "profile_digest")
_TIME = _pattern(contract.Timing, "queued_at")
_LAUNCH_MODES = frozenset(typing.get_args(contract.LaunchMode))
_CONTAINER_MODES = contract.CONTAINER_LAUNCH_MODES
_TIERS = _literals(contract.CacheUse, "tier_hit")
_STATUSES = _literals(contract.Outcome, "status")
_VERDICTS = _literals(contract.PolicyInfo, "verdict")
_MAX_REASONS = next(m.max_length for m in contract.PolicyInfo.model_fields["reasons"].metadata
                    if getattr(m, "max_length", None) is not None)

_STATEMENT_KEYS = _keys(contract.ExecutionStatement)
_PREDICATE_KEYS = _keys(contract.ExecutionPredicate)
_POD_KEYS = _keys(contract.PodRef)
_MODEL_KEYS = _keys(contract.ModelInfo)
_PROVIDER_KEYS = _keys(contract.ProviderInfo)
_PLACEMENT_KEYS = _keys(contract.PlacementInfo)
_CANDIDATE_KEYS = _keys(contract.PlacementCandidate)
_TERMS_KEYS = _keys(contract.CostTerms)
_CACHE_KEYS = _keys(contract.CacheUse)
_TIMING_KEYS = _keys(contract.Timing)
_USAGE_KEYS = _keys(contract.Usage)
_OUTCOME_KEYS = _keys(contract.Outcome)
_POLICY_KEYS = _keys(contract.PolicyInfo)
_LOG_KEYS = _keys(contract.LogPosition)
_MACHINE_KEYS = _keys(contract.MachineRef)
_SUBJECT_KEYS = _keys(contract.Subject)
_SUBJECT_DIGEST_KEYS = _keys(contract.SubjectDigest)


def _count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= _MAX


def _matches(match: Any, value: Any) -> bool:
    return type(value) is str and value.isascii() and match(value) is not None


def _label(value: Any) -> bool:
    return type(value) is str and value.isascii() and _LABEL(value) is not None


def _optional_label(value: Any) -> bool:
    return value is None or _label(value)


def _time(value: Any) -> bool:
    """A time in the contract's normal form naming a real instant (what its before-validator returns unchanged)."""
    if type(value) is not str or not value.isascii() or _TIME(value) is None:
        return False
    try:
        datetime.fromisoformat(value[:-1])
    except ValueError:
        return False
    return True


def _is(value: Any, keys: frozenset[str]) -> bool:
    return type(value) is dict and value.keys() == keys


def accepts(statement: Any) -> bool:
    """True only if ``ExecutionStatement.model_validate(statement)`` succeeds (see the module doc)."""
    if not _is(statement, _STATEMENT_KEYS) or statement["_type"] != contract.STATEMENT_TYPE \
            or statement["predicateType"] != contract.EXECUTION_PREDICATE_TYPE:
        return False
    subjects = statement["subject"]
    if type(subjects) is not list or not 1 <= len(subjects) <= 2:
        return False
    for subject in subjects:
        if not (_is(subject, _SUBJECT_KEYS) and _label(subject["name"]) and _is(subject["digest"], _SUBJECT_DIGEST_KEYS)
                and _matches(_HEX64, subject["digest"]["sha256"])):
            return False
    p = statement["predicate"]
    if not _is(p, _PREDICATE_KEYS):
        return False

    pod, model, machine, log = p["pod"], p["model"], p["machine"], p["log"]
    if not (_is(pod, _POD_KEYS) and _label(pod["name"]) and _label(pod["runId"]) and _label(pod["tenant"])
            and _label(pod["agent"]) and _optional_label(pod["session"]) and _matches(_DIGEST, pod["requestDigest"])):
        return False
    if not (_is(model, _MODEL_KEYS) and _label(model["name"])
            and (model["digest"] is None or _matches(_DIGEST, model["digest"]))):
        return False
    if not (_is(machine, _MACHINE_KEYS) and _matches(_MACHINE_HASH, machine["identityHash"]) and _label(machine["host"])
            and _label(machine["agentVersion"]) and _matches(_PROFILE_HASH, machine["profileDigest"])
            and _matches(_HEX64, machine["keyId"])):
        return False
    if not (_is(log, _LOG_KEYS) and _count(log["seq"])
            and (log["previousLeafHash"] is None or _matches(_HEX64, log["previousLeafHash"]))):
        return False

    provider = p["provider"]
    if provider is not None and not (
            _is(provider, _PROVIDER_KEYS) and _label(provider["kind"]) and _label(provider["version"])
            and type(provider["launchMode"]) is str and provider["launchMode"] in _LAUNCH_MODES
            and (provider["imageDigest"] is None or _matches(_DIGEST, provider["imageDigest"]))):
        return False
    placement = p["placement"]
    if placement is not None:
        if not (_is(placement, _PLACEMENT_KEYS) and _label(placement["decisionId"]) and _count(placement["alternatives"])):
            return False
        chosen = placement["chosen"]
        if not (_is(chosen, _CANDIDATE_KEYS) and _label(chosen["candidateId"]) and _label(chosen["provider"])
                and _optional_label(chosen["device"]) and _is(chosen["terms"], _TERMS_KEYS)
                and all(_count(term) for term in chosen["terms"].values())):
            return False
    cache, usage, outcome, timing = p["cache"], p["usage"], p["outcome"], p["timing"]
    if not (_is(cache, _CACHE_KEYS) and type(cache["tierHit"]) is str and cache["tierHit"] in _TIERS
            and _count(cache["cachedTokens"]) and _count(cache["evaluatedTokens"])):
        return False
    if not (_is(usage, _USAGE_KEYS) and _count(usage["promptTokens"]) and _count(usage["completionTokens"])):
        return False
    if not (_is(outcome, _OUTCOME_KEYS) and type(outcome["status"]) is str and outcome["status"] in _STATUSES
            and _optional_label(outcome["errorClass"])):
        return False
    policy = p["policy"]
    if policy is not None and not (
            _is(policy, _POLICY_KEYS) and _label(policy["source"])
            and (policy["digest"] is None or _matches(_DIGEST, policy["digest"]))
            and type(policy["verdict"]) is str and policy["verdict"] in _VERDICTS
            and type(policy["reasons"]) is list and len(policy["reasons"]) <= _MAX_REASONS
            and all(_label(reason) for reason in policy["reasons"])):
        return False
    if not (_is(timing, _TIMING_KEYS) and _time(timing["queuedAt"]) and _time(timing["finishedAt"])
            and (timing["startedAt"] is None or _time(timing["startedAt"]))
            and (timing["firstTokenAt"] is None or _time(timing["firstTokenAt"]))):
        return False
    return _rules(log, provider, timing, outcome)


def _rules(log: dict, provider: dict | None, timing: dict, outcome: dict) -> bool:
    """The contract's model validators (`MIRRORED_VALIDATORS`), on values already type-checked."""
    if (log["seq"] == 0) != (log["previousLeafHash"] is None):  # LogPosition._genesis
        return False
    if provider is not None and provider["imageDigest"] is not None \
            and provider["launchMode"] not in _CONTAINER_MODES:  # ProviderInfo._image_only_in_containers
        return False
    started, first_token = timing["startedAt"], timing["firstTokenAt"]
    previous = timing["queuedAt"]  # Timing._ordered: fixed-width UTC strings compare like instants
    for moment in (started, first_token, timing["finishedAt"]):
        if moment is not None:
            if moment < previous:
                return False
            previous = moment
    if first_token is not None and started is None:
        return False
    status, error_class = outcome["status"], outcome["errorClass"]  # Outcome._error_class
    if status == "succeeded" and error_class is not None:
        return False
    if status in ("failed", "refused") and error_class is None:
        return False
    if status == "succeeded" and (provider is None or started is None):  # ExecutionPredicate._consistent
        return False
    return True

"""`render plan POD`: everything the node would do for a pod, without doing it.

The plan is assembled from the same functions that act — nothing is
re-derived here:

  admission    `Policy.decide` (the verdict submit would record)
  activation   `Activation.evaluate_pod` (policy, grant, storage, model present
               and digest-verified, memory fit, pinned images), not logged
  placement    `PodExecutor.score` (the dry-run placement: every candidate with
               its TTFT terms) — from the executor in this process, or the one
               the running daemon answers with (``POST /v1/placements:score``)
  restore      the chosen candidate's cache source (T0/T1/T2/none), tokens, bytes
  model        which model it would load (digest, file, size), and whether hot
  providers    which provider it would start (the declared ones for the model,
               each with its own start activation), when none holds the model

``wouldRun`` is true only when admission and activation allow and placement
chose a candidate; ``steps`` lists the actions in the order the node takes them.
"""

from __future__ import annotations

from typing import Any


def _placement_summary(placement: dict[str, Any] | None) -> tuple[dict | None, dict | None]:
    if not placement:
        return None, None
    chosen = placement.get("chosen")
    candidate = next((c for c in placement.get("candidates", []) if c.get("provider") == chosen), None)
    if candidate is None:
        return None, None
    restore = {"tier": candidate.get("cacheSource"), "cachedTokens": candidate.get("cachedTokens"),
               "uncachedTokens": candidate.get("uncachedTokens"), "restoreBytes": candidate.get("restoreBytes")}
    return candidate, restore


def plan_pod(node: Any, pod: Any, *, grant_line: bytes | None = None,
             placement: dict[str, Any] | None = None, placement_note: str | None = None) -> dict[str, Any]:
    from nodeagent.admission import AdmissionRequest
    from nodeagent.governance.activation import activation_for

    executor = node.executor
    activation = getattr(executor, "activation", None) if executor is not None else None
    if activation is None:
        activation = activation_for(node, executor)
    models = activation.models
    record, model_error = None, None
    try:
        record = models.resolve(pod.spec.model.digest or pod.spec.model.name)
    except Exception as exc:
        model_error = str(exc)
    admission = node.policy.decide(AdmissionRequest(
        pod=pod, model_name=record.names[0] if record is not None and record.names else None,
        model_digest=record.digest if record is not None else None))
    decision = activation.evaluate_pod(pod, record, grant_line=grant_line, record_storage=False)

    if placement is None and executor is not None and record is not None:
        try:
            placement = executor.score(pod).to_contract().to_wire()
        except Exception as exc:
            placement_note = f"no placement: {type(exc).__name__}: {exc}"
    elif placement is None and placement_note is None:
        placement_note = "no placement: no executor here and no daemon answered"
    candidate, restore = _placement_summary(placement)

    hot = bool(candidate and candidate.get("modelHot"))
    model = None if record is None else {
        "name": pod.spec.model.name, "digest": record.digest, "path": record.path, "sizeBytes": record.size_bytes,
        "hot": hot, "wouldLoad": not hot}
    providers = []
    if record is not None and not hot:
        from nodeagent.execution import ProviderStart
        for declared in activation.declared_for(record):
            start = ProviderStart(model_digest=record.digest, model=pod.spec.model.name or record.digest,
                                  kind=declared.kind, mode=declared.mode, provider=declared.name, image=declared.image)
            gate = activation.evaluate_start(start, record_storage=False)
            providers.append({"provider": declared.name or f"{declared.model}-{declared.kind}", "kind": declared.kind,
                              "mode": declared.mode, "image": declared.image, "replicas": declared.replicas,
                              "activation": gate.body()})
        if not providers:
            providers.append({"provider": candidate.get("provider") if candidate else None,
                              "kind": "default rule (nodeagent.fleet)", "mode": "subprocess", "image": None,
                              "activation": None})

    would_run = admission.allowed and decision.allowed and bool(placement and placement.get("chosen"))
    steps = [f"admit: {'allowed' if admission.allowed else 'refused: ' + '; '.join(admission.reasons)}",
             f"activate: {'allowed' if decision.allowed else 'denied (' + ', '.join(decision.lacking) + ')'}"]
    if would_run:
        if providers and providers[0]["provider"]:
            steps.append(f"start provider {providers[0]['provider']} ({providers[0]['kind']}, {providers[0]['mode']})")
        if model and model["wouldLoad"]:
            steps.append(f"load model {model['name']} {model['digest']} ({model['sizeBytes']} bytes)")
        if restore and restore["tier"] not in (None, "none"):
            steps.append(f"restore {restore['cachedTokens']} tokens from {restore['tier']} "
                         f"({restore['restoreBytes']} bytes)")
        steps.append(f"run {len(pod.spec.turns)} turn(s) on {placement['chosen']}")
    return {
        "apiVersion": "agent-machine/v1", "kind": "PodPlan",
        "pod": {"name": pod.metadata.name, "tenant": pod.metadata.tenant, "agent": pod.metadata.agent,
                "session": pod.metadata.session},
        "wouldRun": would_run, "steps": steps,
        "admission": {"allowed": admission.allowed, "reasons": admission.reasons, "source": admission.policy_source},
        "grant": decision.grant, "activation": decision.body(),
        "placement": placement, "placementNote": placement_note, "restore": restore,
        "model": model, "modelError": model_error, "providers": providers,
    }


__all__ = ["plan_pod"]

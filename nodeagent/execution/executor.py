"""Running pods: place each turn where its context is cached, restore, generate, save, sign.

One turn of a pod, end to end:

1. its context grows by the turn's messages (`SessionContext`, token-exact);
2. candidates are every provider with the model hot, plus — when none is —
   one that would have to load it; each is described by what its live context
   (T0) shares with the prompt and its queued work, and the node-wide saved
   states matching the prompt (T1/T2) come from the `CacheManager`;
3. `nodeagent.scheduler.placement.place` picks the lowest estimated TTFT;
4. on the chosen provider: restore the chosen saved state (digest-checked; a
   corrupt one is dropped and the prefix recomputed), generate, and measure
   what was really cached vs evaluated;
5. save the provider's new state to T1 for the next turn, fold the observed
   rates into the registry, record the turn and append a signed receipt
   (durable before the turn is reported).

Receipts are per turn (one model execution each; ``runId`` = ``<pod>-t<i>``),
plus one for a pod that ends without running a turn (refused, cancelled,
failed before placement), so every pod leaves at least one receipt.

Isolation: a provider's context is tracked with its scope spans, so a pod
may reuse only the prefix it is allowed to see (public, its tenant's, its
agent's). Placement reasons about the context the provider will hold when its
queue drains; the generation request carries the bound computed from what the
engine holds *now* (``reuse_limit``), so the engine recomputes anything else.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from nodeagent.admission import AdmissionRequest
from nodeagent.contracts.pod import AgentPod, PodPhase, TurnResult
from nodeagent.execution.pool import HeldContext, ManagedProvider, ProviderPool, RunningTurn, is_running, model_name
from nodeagent.execution.receipts import MachineFacts, machine_facts, receipt_data
from nodeagent.execution.tokens import PromptTokens, Tokenizer
from nodeagent.kvcache.blocks import block_keys
from nodeagent.kvcache.manager import CacheManager
from nodeagent.pods import PodInvalid, PodNotPlaceable, PodReferenceUnknown
from nodeagent.providers.base import (GenerationRequest, ProviderError, ProviderUnavailable, StateCorrupt,
                                     StateUnsupported)
from nodeagent.scheduler.cost import queue_wait_s
from nodeagent.scheduler.placement import (CandidateState, Decision, Folded, LoadGuard, PackedPrompt, PlacementRequest,
                                           SlotFolder, TierMatch, place)
from nodeagent.scheduler.rates import DECODE, LOAD, PREFILL, RateRegistry, restore_quantity
from nodeagent.segments import SegmentStore
from nodeagent.session import SessionContext
from nodeagent.templates import ChatTemplate, TemplateError, model_template

log = logging.getLogger("agent_machine.execution")


REPLACE_ATTEMPTS = 3  # placements of one turn whose provider died before it ran
# Slots of one engine (a llama-server replica) run batched: a free slot has no
# queue, but its prefill and decode share the engine with the busy slots'. The
# siblings' queued work counts in a slot's queue term at these weights: prefill
# is compute-bound (a batch of N prompts takes ~N times one, measured in
# bench/README.md "## fleet"; llama-server puts every slot's pending prompt into
# one batch, so a prompt arriving beside a sibling's waits for the sibling's
# prompt too). A sibling's decode adds one token per step to the shared batch:
# little, against a prompt of hundreds of tokens. Only the work still ahead
# counts (`_outstanding`), never what a running turn has already done.
SLOT_PREFILL_CONTENTION = 1.0
SLOT_DECODE_CONTENTION = 0.1


class _ProviderGone(ProviderError):
    """The chosen provider died before the turn reached it: nothing ran, so place it again."""


class PolicyRefusedPlacement(ProviderError):
    """Every candidate provider is outside the tenant's policy (its provider allowlist)."""

    def __init__(self, reasons: list[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = reasons


SESSION_HOMES = 4096


@dataclass
class TurnOutcome:
    result: TurnResult
    decision: Decision
    managed: ManagedProvider
    started: float
    first_token: float
    finished: float
    completion_tokens: list[int]


class PodExecutor:
    """Runs admitted pods for a `Node` (see module docstring)."""

    def __init__(self, node: Any, *, pool: ProviderPool, models: Any, cache: CacheManager | None,
                 receipts: Any | None, rates: RateRegistry | None = None, guard: LoadGuard | None = None,
                 machine: MachineFacts | None = None, block_tokens: int = 64) -> None:
        self.node = node
        self.pool = pool
        self.models = models
        self.cache = cache
        self.receipts = receipts
        self.rates = rates or RateRegistry()
        # The token load guard is off: users feel latency, not balance, and the queue
        # term prices balance (issue #14's sweep; bench/README.md "## routing").
        self.guard = guard or LoadGuard(enabled=False)
        # Leave out of `place` the slots a sibling slot of their engine beats (`SlotFolder`);
        # False scores every slot: the same decision, slower (the tests compare the two).
        self.fold_slots = True
        self.block_tokens = block_tokens
        # A provider's own start-up measurement prices it until its first turns are observed:
        # without one the first placements of a fleet have no TTFT to compare.
        pool.add_added_listener(self._seed_rates)
        self.segments = SegmentStore(node.db, node._db_lock)
        self._machine = machine
        self._place_lock = threading.Lock()  # placement + queue accounting are one step
        self.tokens = PromptTokens(pool)
        self._templates: dict[tuple[str, str | None], ChatTemplate] = {}  # (model digest, override) -> template
        # (tenant, agent, session) -> provider of its last turn: a session sent one
        # turn per pod (as agent loops do) keeps its affinity like a multi-turn pod.
        self._session_homes: "OrderedDict[tuple[str, str, str], str]" = OrderedDict()
        self.decisions: dict[str, list[Decision]] = {}  # pod id -> one per turn (recent pods)
        self._policies: dict[str, Any] = {}  # pod id -> its latest PolicyDecision, while it runs
        # Asked before a pod runs (governance's activation decision): returns the reasons it
        # may not (empty: it may); a pod with reasons ends Refused, with its receipt.
        self.pod_gate: Callable[[AgentPod, Any], list[str]] | None = None
        self.fleet: Any = None  # nodeagent.fleet.Fleet: the engines the node starts for each model
        self.kv_events: Any = None  # nodeagent.kvevents.KVEventSource when [cluster] kv_events is on

    # ------------------------------------------------------------ node hooks
    @property
    def machine(self) -> MachineFacts:
        if self._machine is None:
            self._machine = machine_facts(self.node.machine())
        return self._machine

    def validate(self, pod: AgentPod) -> None:
        """Checks that need node state, run at submit time (raise PodReferenceUnknown)."""
        self.segments.remember(pod.spec.context, pod.metadata.tenant)
        self.segments.texts(pod.spec.context, pod.metadata.tenant)
        if pod.spec.provider is not None and pod.spec.provider not in {m.name for m in self.pool.all()}:
            known = ", ".join(sorted(m.name for m in self.pool.all())) or "none"
            raise PodReferenceUnknown(f"spec.provider: {pod.spec.provider!r} is not a provider of this node "
                                      f"(known: {known})")
        try:
            record = self.models.resolve(pod.spec.model.digest or pod.spec.model.name)
        except Exception:
            return  # an unknown model fails the pod when it runs, with its receipt
        self._validate_for_model(pod, record)

    def _validate_for_model(self, pod: AgentPod, record: Any) -> None:
        """What only the model decides, refused at submit rather than failing the turn: token
        ids outside its vocabulary, and messages its chat template refuses to render."""
        vocab = record.gguf.vocab_size
        for index, turn in enumerate(pod.spec.turns):
            bias = turn.sampling.logit_bias if turn.sampling is not None else {}
            outside = sorted(int(token) for token in bias if int(token) >= vocab)
            if outside:
                raise PodInvalid(f"spec.turns[{index}].sampling.logitBias: token id {outside[0]} is outside "
                                 f"the vocabulary of {model_name(record)} (0..{vocab - 1})")
        first = pod.spec.turns[0]
        if first.prompt is not None:
            return
        trial = SessionContext(record.digest, pod.metadata.tenant, pod.metadata.agent, lambda text: [],
                               self.template(record), tools=template_tools(pod))
        try:
            trial.add_segments(pod.spec.context, self.segments.texts(pod.spec.context, pod.metadata.tenant))
            trial.add_turn(first.messages)
        except TemplateError as exc:
            raise PodInvalid(f"spec.turns[0].messages: {exc}") from None

    def before_end(self, pod: AgentPod, phase: PodPhase, reason: str, error_class: str | None = None) -> None:
        """Node hook: the pod ends outside a turn (refused, cancelled, recovered after
        a restart, its handling broke); sign that first (receipt before report).

        ``error_class`` names the failure; without one it is ``AgentRestart`` for
        a pod the agent found in flight at start, ``Interrupted`` for a pod that
        ran some turns, else ``NotRun``."""
        status = {PodPhase.refused: "refused", PodPhase.cancelled: "cancelled"}.get(phase, "failed")
        if status == "refused":
            error_class = error_class or "PolicyRefused"
        elif status == "cancelled":
            error_class = None
        elif error_class is None:
            from nodeagent.pods import RESTART_REASON

            ran = bool(pod.status and pod.status.turns)
            error_class = "AgentRestart" if reason == RESTART_REASON else ("Interrupted" if ran else "NotRun")
        self._receipt(pod, None, status, error_class, queued=_created(pod))

    def close(self) -> None:
        for managed in self.pool.all():
            try:
                managed.provider.stop()
            except Exception:
                pass
        self.pool.close_tokenizers()
        if self.kv_events is not None:
            self.kv_events.close()  # unbind its sockets now: a reloaded node binds the same endpoint
        if self.receipts is not None:
            if self.receipts.size:
                self.receipts.checkpoint()  # sign what this run appended, so truncation is detectable
            self.receipts.close()

    # ------------------------------------------------------------ running
    def run(self, pod: AgentPod) -> None:
        queued = _created(pod)
        try:
            record = self.models.resolve(pod.spec.model.digest or pod.spec.model.name)
        except Exception as exc:
            return self._fail(pod, f"model {pod.spec.model.name or pod.spec.model.digest}: {exc}",
                              type(exc).__name__, queued, turn=None)
        if self.pod_gate is not None:
            try:
                denied = self.pod_gate(pod, record)
            except Exception as exc:  # the gate fails closed
                denied = [f"activation could not be evaluated: {type(exc).__name__}: {exc}"]
            if denied:
                self._receipt(pod, None, "refused", "ActivationDenied", queued=queued, record=record)
                self.node.pod_transition(pod.id, PodPhase.refused, reason="activation", reasons=list(denied))
                return
        texts = self.segments.texts(pod.spec.context, pod.metadata.tenant)
        try:
            self._run_turns(pod, record, texts, queued)
        finally:
            self._policies.pop(pod.id, None)
            for managed in self.pool.all():
                managed.sessions.pop(pod.id, None)

    def _hold_session(self, pod_id: str, managed: ManagedProvider, tokens: int) -> None:
        with self._place_lock:
            for other in self.pool.all():
                if other is not managed:
                    other.sessions.pop(pod_id, None)
            managed.sessions[pod_id] = tokens

    def _run_turns(self, pod: AgentPod, record: Any, texts: list[str], queued: float) -> None:
        session: SessionContext | None = None
        home_key = (pod.metadata.tenant, pod.metadata.agent, pod.metadata.session)
        previous: str | None = self._session_homes.get(home_key)
        for index, turn in enumerate(pod.spec.turns):
            if self.node.is_cancelled(pod.id):
                self._receipt(pod, index, "cancelled", None, queued=queued, record=record)
                self.node.pod_transition(pod.id, PodPhase.cancelled, reason="cancelled by request",
                                         reasons=["cancelled by request"])
                return
            try:
                if session is None:
                    session = self._session(pod, record, texts)
                if turn.prompt is not None:
                    session.add_prompt(turn.prompt, self._tokenizer_for(record).tokenize_prompt)
                else:
                    session.add_turn(turn.messages)
                    if session.diverged_tokens:  # the template re-rendered part of what the provider holds
                        from nodeagent import metrics

                        metrics.record_template_divergence(model_name(record), session.diverged_tokens)
                if index == 0:
                    refusal = self._admit_with_tokens(pod, record, len(session.tokens))
                    if refusal:
                        self._receipt(pod, None, "refused", "PolicyRefused", queued=queued, record=record)
                        self.node.pod_transition(pod.id, PodPhase.refused, reason="admission", reasons=refusal)
                        return
                outcome = self._run_turn(pod, record, session, index, turn.max_tokens, first=index == 0,
                                         session_provider=previous)
            except PolicyRefusedPlacement as refused:
                # Running already (a later turn after a SIGHUP, or the provider a load gave was
                # refused): it stops here as Failed; before that, it is Refused.
                if index > 0 or self.node.get_pod(pod.id).status.phase is PodPhase.running:
                    return self._fail(pod, f"turn {index}: {refused}", "PolicyRefused", queued, turn=index,
                                      record=record)
                self._receipt(pod, None, "refused", "PolicyRefused", queued=queued, record=record)
                self.node.pod_transition(pod.id, PodPhase.refused, reason="policy", reasons=refused.reasons)
                return
            except Exception as exc:
                return self._fail(pod, f"turn {index}: {type(exc).__name__}: {exc}", type(exc).__name__,
                                  queued, turn=index, record=record)
            if outcome.result.finish_reason == "cancelled":  # its client went away mid-answer
                appended = self._receipt(pod, index, "cancelled", None, queued=queued, record=record,
                                         outcome=outcome)
                self.node.record_turn(pod.id, outcome.result, appended)
                why = "cancelled by request" if self.node.is_cancelled(pod.id) else "client disconnected"
                self.node.pod_transition(pod.id, PodPhase.cancelled, reason=why,
                                         reasons=[f"{why} while the answer was being generated"])
                return
            session.add_reply(outcome.completion_tokens, outcome.result.output)
            previous = outcome.managed.name
            self._session_homes[home_key] = previous
            self._session_homes.move_to_end(home_key)
            while len(self._session_homes) > SESSION_HOMES:
                self._session_homes.popitem(last=False)
            self._hold_session(pod.id, outcome.managed, len(session.tokens))
            # Receipt before report: the turn becomes visible (its output, its
            # receipt id) only once its receipt is durable, in one transaction.
            appended = self._receipt(pod, index, "succeeded", None, queued=queued, record=record, outcome=outcome)
            self.node.record_turn(pod.id, outcome.result, appended)
        self.node.pod_transition(pod.id, PodPhase.succeeded)

    def score(self, pod: AgentPod) -> Decision:
        """A dry-run placement of the pod's first turn (nothing runs, nothing is reserved)."""
        record = self.models.resolve(pod.spec.model.digest or pod.spec.model.name)
        session = self._session(pod, record, self.segments.texts(pod.spec.context, pod.metadata.tenant), load=False)
        first = pod.spec.turns[0]
        if first.prompt is not None:
            session.add_prompt(first.prompt, self._tokenizer_for(record, load=False).tokenize_prompt)
        else:
            session.add_turn(first.messages)
        decision, _ = self._place(pod, record, session, dry_run=True)
        return decision

    # ------------------------------------------------------------ steps
    def _session(self, pod: AgentPod, record: Any, texts: list[str], *, load: bool = True) -> SessionContext:
        """The pod's conversation, rendered by its model's template, its segments added."""
        tokenizer = self._tokenizer_for(record, load=load)
        if tokenizer is None:
            raise PodNotPlaceable(f"spec.model: no provider holds {model_name(record)} yet, so its "
                                  f"prompt cannot be tokenized for a dry run; load it first")
        session = SessionContext(record.digest, pod.metadata.tenant, pod.metadata.agent, tokenizer.tokenize,
                                 self.template(record), tools=template_tools(pod))
        session.add_segments(pod.spec.context, texts)
        return session

    def template(self, record: Any) -> ChatTemplate:
        """The chat template ``record`` is served with: the store's override, else its GGUF's
        (read once per model), else ChatML."""
        override = self.models.template_override(record.digest)  # read each time: a change applies to the next pod
        cached = self._templates.get((record.digest, override))
        if cached is None:
            cached = model_template(record.path, override)
            stability = cached.stability()
            if not stability.stable:
                log.warning("model %s: its chat template is not prefix-stable (%s)", model_name(record),
                            stability.detail)
            self._templates[(record.digest, override)] = cached
        return cached

    def _tokenizer_for(self, record: Any, load: bool = True) -> "Tokenizer | None":
        return self.tokens.tokenizer_for(record, load=load)

    def tokenize(self, record: Any, text: str, add_bos: bool = False) -> list[int]:
        return self.tokens.tokenize(record, text, add_bos=add_bos)

    def _admit_with_tokens(self, pod: AgentPod, record: Any, prompt_tokens: int) -> list[str]:
        decision = self.node.policy.decide(AdmissionRequest(
            pod=pod, model_name=model_name(record), model_digest=record.digest, prompt_tokens=prompt_tokens))
        self._policies[pod.id] = decision
        if decision.reasons:
            self.node.record_policy(pod.id, decision)  # refused: kept now; allowed: kept as it starts
        return decision.reasons

    def _candidates(self, record: Any, session: SessionContext, pinned: str | None, tenant: str,
                    session_provider: str | None = None
                    ) -> tuple[list[CandidateState], dict[str, ManagedProvider], Folded]:
        """The candidates' snapshots, the providers by name, and the slots left out
        because a sibling slot of their engine beats them (`SlotFolder`)."""
        managed = self.pool.for_model(record.digest)
        owners = _owners(session)
        states, by_name = [], {}
        now = time.monotonic()
        shared, outstanding = self._engine_work(managed, now)
        folder, resolved, fold = SlotFolder(), self.rates.resolved, self.fold_slots
        packed = PackedPrompt(session.tokens)  # compared with every context that starts like it

        def queue_of(m: ManagedProvider) -> tuple[int, int, float]:
            """(prefill, decode) tokens ahead of a new turn and the running turn's time left."""
            prefill, decode, remaining = m.queued_prefill_tokens, m.queued_decode_tokens, 0.0
            running = m.running  # read once: a dry run places without the placement lock
            left = running.remaining_s(now) if running is not None else None
            if left is not None:  # the running turn counts by its time left, not its whole size
                prefill, decode, remaining = prefill - running.prefill_tokens, decode - running.decode_tokens, left
            if m.group is not None:  # its engine's other slots run batched with it: their work slows it
                engine_prefill, engine_decode = shared.get(m.group, (0, 0))
                own_prefill, own_decode = outstanding[m.name]
                prefill += int(SLOT_PREFILL_CONTENTION * (engine_prefill - own_prefill))
                decode += int(SLOT_DECODE_CONTENTION * (engine_decode - own_decode))
            return prefill, decode, remaining

        def state_of(m: ManagedProvider, t0: int, rejected: tuple[str, ...], load: float,
                     queue: tuple[int, int, float]) -> CandidateState:
            return CandidateState(
                provider=m.name, model_hot=True, t0_cached_tokens=t0,
                state_format=m.kind if self.cache is not None else None,
                queued_requests=m.queued_requests, queued_prefill_tokens=queue[0],
                queued_decode_tokens=queue[1], running_remaining_s=queue[2], load=load, rejected=rejected)

        for m in managed:
            by_name[m.name] = m
            t0 = m.expected.reusable(session.tokens, owners, packed)
            if m.observed is not None:  # the engine's own report: every prefix it still holds
                t0 = max(t0, m.observed.cached_tokens(session.tokens, owners))
            rejected = self._rejections(tenant, m.name, m.kind, pinned)
            load, queue = float(sum(m.sessions.values())), queue_of(m)
            if fold and m.group is not None and not rejected and m.name != session_provider:
                # Siblings share their engine's rates (`_observe` feeds them alike); folding
                # compares only slots whose T0 prefix and rates are equal, so a difference
                # never misleads it.
                rates = resolved(m.name)
                engine = (m.group, rates.prefill_value, rates.decode_value, rates.load_value,
                          rates.restore_t1_value, rates.restore_t2_value)
                folder.offer(engine, t0, queue[2], queue[0], queue[1], load, m.name, (m, t0, load, queue))
                continue
            states.append(state_of(m, t0, rejected, load, queue))
        offered, folded = folder.fold()
        states += [state_of(m, t0, (), load, queue) for m, t0, load, queue in offered]
        if not managed:
            name = f"load:{model_name(record)}"
            kind = self.pool.load_kind(record.digest)
            states.append(CandidateState(provider=name, model_hot=False, model_bytes=int(record.size_bytes),
                                         state_format=kind if self.cache is not None else None,
                                         rejected=self._rejections(tenant, name, kind, None)))
        return states, by_name, folded

    def _rejections(self, tenant: str, provider: str, kind: str | None, pinned: str | None) -> tuple[str, ...]:
        """Why a candidate may not take the pod: a pin to another provider, or the
        tenant's provider allowlist (checked for every candidate, not only pins)."""
        reasons = [] if pinned in (None, provider) else [f"pod is pinned to provider {pinned}"]
        refusal = self.node.policy.provider_refusal(tenant, provider, kind)
        if refusal:
            reasons.append(f"policy: {refusal}")
        return tuple(reasons)

    def _place(self, pod: AgentPod, record: Any, session: SessionContext, *, dry_run: bool = False,
               session_provider: str | None = None):
        keys = block_keys(session.tokens, session.spans, block_tokens=self.block_tokens)
        matches: tuple[TierMatch, ...] = ()
        if self.cache is not None and pod.spec.policy.cache_reuse:
            kinds = {m.kind for m in self.pool.for_model(record.digest)} or {self.pool.load_kind(record.digest)}
            kinds.discard(None)
            found = []
            for kind in kinds:
                lookup = self.cache.lookup_keys(keys, _owners(session), state_format=kind,
                                                prompt_tokens=len(session.tokens))
                found += [TierMatch(m.tier, m.cached_tokens, m.bytes, kind, m.entry_id)
                          for m in lookup.by_tier.values()]
            matches = tuple(found)
        states, by_name, folded = self._candidates(record, session, pod.spec.provider, pod.metadata.tenant,
                                                   session_provider)
        if not pod.spec.policy.cache_reuse:
            states = [replace(s, t0_cached_tokens=0) for s in states]
        request = PlacementRequest(model=model_name(record), prompt_tokens=len(session.tokens),
                                   tier_matches=matches, pod=pod.metadata.name, tenant=pod.metadata.tenant,
                                   block_tokens=self.block_tokens, dry_run=dry_run,
                                   session_provider=session_provider)
        decision = place(request, states, self.rates, self.guard, folded=folded)
        from nodeagent import metrics

        outcome = "dry_run" if dry_run else ("placed" if decision.chosen is not None else "no_candidate")
        metrics.record_placement(decision.provider or "none", outcome, decision.decision_us / 1e6)
        return decision, by_name

    def _run_turn(self, pod: AgentPod, record: Any, session: SessionContext, index: int, max_tokens: int,
                  *, first: bool, session_provider: str | None = None) -> TurnOutcome:
        """Place and run one turn. A turn whose provider died while it waited in the
        provider's queue never reached it: it is placed again (a dead provider is
        out of placement, and `ProviderPool.load` restarts it when nothing else
        holds the model)."""
        for attempt in range(REPLACE_ATTEMPTS):
            try:
                return self._place_and_run(pod, record, session, index, max_tokens,
                                           first=first and attempt == 0, session_provider=session_provider)
            except _ProviderGone as gone:
                log.warning("pod %s turn %d: %s; placing it again", pod.id, index, gone)
                session_provider = None
        raise ProviderUnavailable(f"turn {index} was placed {REPLACE_ATTEMPTS} times and each provider died "
                                  f"before it ran")

    def _place_and_run(self, pod: AgentPod, record: Any, session: SessionContext, index: int, max_tokens: int,
                       *, first: bool, session_provider: str | None) -> TurnOutcome:
        with self._place_lock:
            decision, by_name = self._place(pod, record, session, session_provider=session_provider)
            if decision.chosen is None:
                policy = [r for a in decision.assessments for r in a.rejected if r.startswith("policy: ")]
                if policy and all(any(r.startswith("policy: ") for r in a.rejected) for a in decision.assessments):
                    raise PolicyRefusedPlacement(sorted(set(policy)))
                raise ProviderError(f"no provider can run this turn: {decision.reason}")
            chosen = decision.chosen
            managed = by_name.get(chosen.state.provider)
            uncached = len(session.tokens) - chosen.cached_tokens
            ticket = self._enqueue(managed, session, uncached, max_tokens) if managed is not None else None
        # From here on the ticket is released whatever happens: a ticket never
        # released would stall every turn placed behind it on this provider.
        try:
            with self._place_lock:  # several dispatchers record decisions at once
                self.decisions.setdefault(pod.id, []).append(decision)
                while len(self.decisions) > 256:
                    self.decisions.pop(next(iter(self.decisions)))
            if first:
                self.node.pod_started(pod.id, decision.reason, self._policies.get(pod.id))
            if managed is None:  # the chosen candidate must load the model first
                started_load = time.perf_counter()
                managed = self.pool.load(record)
                self._observe(managed, LOAD, record.size_bytes, time.perf_counter() - started_load)
                # Placement judged a stand-in ("load:<model>"); the provider the load gave
                # (a new one, or a dead one revived) must pass the same rules by its own name.
                refused = self._rejections(pod.metadata.tenant, managed.name, managed.kind, pod.spec.provider)
                if refused:
                    if all(r.startswith("policy: ") for r in refused):
                        raise PolicyRefusedPlacement(list(refused))
                    raise ProviderError(f"no provider can run this turn: {'; '.join(refused)}")
                with self._place_lock:
                    ticket = self._enqueue(managed, session, uncached, max_tokens)
            return self._execute(pod, session, index, max_tokens, decision, managed, ticket, uncached)
        finally:
            if ticket is not None:
                with self._place_lock:  # the turn leaves the queue in one step, then the next may start
                    if managed.running is not None and managed.running.ticket == ticket:
                        managed.running = None
                    managed.queued_requests -= 1
                    managed.queued_prefill_tokens -= uncached
                    managed.queued_decode_tokens -= max_tokens
                managed.turns.release(ticket)

    @staticmethod
    def _enqueue(managed: ManagedProvider, session: SessionContext, uncached: int, max_tokens: int) -> int:
        """Account a placed turn on its provider (caller holds the placement lock): its
        queue grows, the context it will hold afterwards is this prompt, and the turn
        takes its place in line (the returned ticket)."""
        managed.queued_requests += 1
        managed.queued_prefill_tokens += uncached
        managed.queued_decode_tokens += max_tokens
        managed.expected = HeldContext(tuple(session.tokens), tuple(session.spans))
        return managed.turns.ticket()

    def _observe(self, managed: ManagedProvider, quantity: str, amount: float, seconds: float, *,
                 busy_siblings: int = 0) -> None:
        """Fold an observed rate into ``managed``'s estimate and its peers': the other slots
        of its engine and of the engines started alike (same model, kind and version), so a
        slot or replica that has not run yet is priced from its twins, not from the
        slowest rate known.

        Rates are kept as one sequence alone on its engine would see them: a turn that
        ran beside ``busy_siblings`` other slots shared the engine, and placement adds
        the siblings' work to a slot's queue term by the same weights
        (`SLOT_PREFILL_CONTENTION`, `SLOT_DECODE_CONTENTION`), so the observation is
        scaled back up by them before it is folded in."""
        weight = {PREFILL: SLOT_PREFILL_CONTENTION, DECODE: SLOT_DECODE_CONTENTION}.get(quantity, 0.0)
        seconds = seconds / (1.0 + weight * busy_siblings)
        for peer in self.pool.peers(managed):
            self.rates.observe(peer.name, quantity, amount, seconds)

    def _seed_rates(self, managed: ManagedProvider) -> None:
        self.rates.seed_from_provider(managed.name, managed.provider.rates())

    def _outstanding(self, managed: ManagedProvider, now: float) -> tuple[int, int]:
        """(prefill, decode) tokens ``managed`` still has ahead: its queue, with its running
        turn counted by what is left of it (prompt first, then answer, at its rates)."""
        prefill, decode = managed.queued_prefill_tokens, managed.queued_decode_tokens
        running = managed.running
        if running is None:
            return prefill, decode
        done_prefill, done_decode = running.work_done(now, self.rates.estimate(managed.name, PREFILL).value,
                                                      self.rates.estimate(managed.name, DECODE).value)
        return max(0, prefill - done_prefill), max(0, decode - done_decode)

    def _engine_work(self, managed: Sequence[ManagedProvider],
                     now: float) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
        """Outstanding (prefill, decode) tokens per engine, summed over its slots, and per
        slot (each computed once per decision)."""
        work: dict[str, tuple[int, int]] = {}
        own: dict[str, tuple[int, int]] = {}
        for m in managed:
            if m.group is not None:
                prefill, decode = work.get(m.group, (0, 0))
                own_prefill, own_decode = own[m.name] = self._outstanding(m, now)
                work[m.group] = (prefill + own_prefill, decode + own_decode)
        return work, own

    def _busy_siblings(self, managed: ManagedProvider) -> int:
        """The other slots of ``managed``'s engine running a turn now."""
        if managed.group is None:
            return 0
        return sum(1 for m in self.pool.all()
                   if m.group == managed.group and m is not managed and m.running is not None)

    def _start_running(self, managed: ManagedProvider, ticket: int, decision: Decision, uncached: int,
                       max_tokens: int) -> None:
        """The turn holds its provider: placement now sees its time left (`RunningTurn`);
        `_run_turn` clears it before releasing the ticket."""
        estimate = self._service_estimate(managed, decision, uncached, max_tokens)
        with self._place_lock:
            managed.running = RunningTurn(ticket, time.monotonic(), estimate, uncached, max_tokens)

    def _service_estimate(self, managed: ManagedProvider, decision: Decision, uncached: int,
                          max_tokens: int) -> float | None:
        """Seconds the chosen turn should keep its provider busy: the restore placement
        priced, then prefilling its uncached tokens and decoding ``max_tokens``."""
        # What this turn adds to its provider's queue, by the cost model's own formula
        # and this provider's rates (a cold load was priced before the provider existed).
        rates = self.rates.resolved(managed.name)
        restore = decision.chosen.terms.restore_s
        work = queue_wait_s(uncached, max_tokens, 0.0, rates.prefill_value, rates.decode_value)
        return None if restore is None or work is None else restore + work

    def _execute(self, pod: AgentPod, session: SessionContext, index: int, max_tokens: int,
                 decision: Decision, managed: ManagedProvider, ticket: int, uncached: int) -> TurnOutcome:
        chosen = decision.chosen
        provider = managed.provider
        tier = chosen.cache_source if chosen.cache_source in ("T0", "T1", "T2") else "none"
        # The whole turn (restore, generate, save) holds the model in use, and so does
        # its wait in the provider's queue: neither keep-alive expiry nor eviction can
        # unload the model under a queued turn. The pod's keep-alive, if it has one,
        # applies from when the turn ends.
        with self.pool.using(managed.model_digest, pod.spec.policy.keep_alive):
            managed.turns.wait(ticket)
            if not is_running(provider):
                raise _ProviderGone(f"provider {managed.name} died while the turn waited for it")
            self._start_running(managed, ticket, decision, uncached, max_tokens)
            started = time.time()
            # Reuse of the live context is bounded by what the engine really holds
            # now and this pod may see (scopes); a restored state it may see whole.
            reuse_limit: int | None = (managed.held.reusable(session.tokens, _owners(session))
                                       if pod.spec.policy.cache_reuse else 0)
            if tier in ("T1", "T2"):
                match = next(m for m in decision.request.tier_matches
                             if m.tier == tier and m.state_format == managed.kind)
                tier = self._restore(managed, match) or "none"
                if tier != "none":
                    reuse_limit = None
            busy = self._busy_siblings(managed)
            try:
                result = provider.generate(generation_request(session.tokens, max_tokens,
                                                              pod.spec.turns[index].sampling, reuse_limit),
                                           on_text=self._sink(pod.id))
            except ProviderError:
                managed.forget_context()
                if not is_running(provider):  # it died under this turn: bring it back for the next ones
                    self.pool.revive_soon(managed)
                raise
            if self.cache is not None:  # counted after the answer: a commit less before the first token
                self.cache.record_lookup(len(session.tokens), t0_tokens=chosen.cached_tokens if tier == "T0" else 0,
                                         miss=tier == "none")
            first_token = started + result.ttft_s
            self._observe(managed, PREFILL, result.evaluated_tokens, result.ttft_s, busy_siblings=busy)
            if len(result.completion_tokens) > 1:
                self._observe(managed, DECODE, len(result.completion_tokens) - 1,
                              max(result.total_s - result.ttft_s, 1e-9), busy_siblings=busy)
            held = tuple(session.tokens) + tuple(result.completion_tokens)
            managed.hold(HeldContext(held, tuple(session.spans_for(len(held)))))
            with self._place_lock:
                if managed.queued_requests <= 1:  # nothing placed behind it: this is the future too
                    managed.expected = managed.held
            if self.cache is not None and pod.spec.policy.cache_reuse and managed.saves_state:
                self._save(managed, session)
            finished = time.time()
        from nodeagent import metrics

        metrics.observe_turn(managed.name, tier if result.cached_tokens else "none", result.ttft_s,
                             finished - started, prompt_tokens=result.prompt_tokens,
                             cached_tokens=result.cached_tokens, evaluated_tokens=result.evaluated_tokens,
                             completion_tokens=len(result.completion_tokens))
        turn = TurnResult(
            index=index, provider=managed.name, prompt_tokens=result.prompt_tokens,
            cached_tokens=result.cached_tokens, evaluated_tokens=result.evaluated_tokens,
            completion_tokens=len(result.completion_tokens),
            cache_tier=tier if result.cached_tokens else "none",
            ttft_ms=int((first_token - started) * 1000), total_ms=int((finished - started) * 1000),
            output=result.text, decision_id=decision.id,
            finish_reason=result.finish_reason if result.finish_reason != "error" else None)
        return TurnOutcome(turn, decision, managed, started, first_token, finished, list(result.completion_tokens))

    def _sink(self, pod_id: str) -> Callable[[str], bool]:
        """Where the turn's text goes as it is generated: to a client reading the answer, if
        one is; either way the generation stops within a token once the pod is cancelled
        (DELETE, drain) or its reader went away."""
        stream = self.node.text_sink(pod_id)

        def on_text(piece: str) -> bool:
            if self.node.is_cancelled(pod_id):
                return False
            return stream(piece) if stream is not None else True

        return on_text

    def _restore(self, managed: ManagedProvider, match: TierMatch) -> str | None:
        """Restore ``match`` into the provider; the tier served, or None (recompute)."""
        from nodeagent.kvcache.manager import PrefixMatch

        prefix = PrefixMatch(match.entry_id, match.tier, match.cached_tokens // self.block_tokens,
                             match.cached_tokens, match.cached_tokens, match.bytes)
        with self.cache.restoring(prefix) as restore:
            if restore is None:
                return None  # corrupt or gone: dropped and counted by the cache
            try:
                # The cache has just hashed the file against its index: one check is enough.
                restored = managed.provider.restore_state(0, restore.path, verify=False)
            except StateCorrupt as exc:
                self.cache.report_corrupt(match.entry_id, reason=str(exc))
                managed.forget_context()
                return None
            # The engine's own restore time: a wait for its other slots' batch is queue,
            # priced as such; folded into the rate it made a 1 ms restore look like seconds
            # and placement recompute prompts it could restore.
            self._observe(managed, restore_quantity(restore.served_from), restore.entry.bytes, restored.restore_s)
            managed.hold(HeldContext())  # the turn's generate sets it from what the provider now holds
            return restore.served_from

    def _save(self, managed: ManagedProvider, session: SessionContext) -> None:
        staging = self.cache.staging_path()
        try:
            managed.provider.save_state(0, staging)
            covered = managed.provider.context_tokens(0)
            self.cache.put(staging, covered, session.spans_for(len(covered)), state_format=managed.kind)
        except StateUnsupported as exc:
            managed.saves_state = False
            log.info("provider %s keeps no saved contexts in T1/T2 (%s)", managed.name, exc)
            staging.unlink(missing_ok=True)
        except Exception as exc:
            # A failed save costs the next turn a recompute, never this turn's answer.
            log.warning("provider %s: saving the context to T1 failed (%s: %s); its next turn recomputes",
                        managed.name, type(exc).__name__, exc)
            staging.unlink(missing_ok=True)

    # ------------------------------------------------------------ endings
    def _fail(self, pod: AgentPod, message: str, error_class: str, queued: float, *, turn: int | None,
              record: Any = None) -> None:
        from nodeagent.pods import InvalidTransition

        self._receipt(pod, turn, "failed", error_class, queued=queued, record=record)
        try:
            self.node.pod_transition(pod.id, PodPhase.failed, reason=error_class, reasons=[message])
        except InvalidTransition:
            pass

    def _receipt(self, pod: AgentPod, turn: int | None, status: str, error_class: str | None, *,
                 queued: float, record: Any = None, outcome: TurnOutcome | None = None) -> str | None:
        if self.receipts is None:
            return None
        from nodeagent.contracts.receipt import ReceiptInput

        policy = self._policies.get(pod.id) or (pod.status.policy if pod.status else None)
        data = receipt_data(self.machine, pod, turn, status, error_class, queued=queued, record=record,
                            outcome=outcome, policy=policy)
        from nodeagent import metrics

        began = time.perf_counter()
        appended = self.receipts.append(ReceiptInput.model_validate(data))
        metrics.record_receipt(status, time.perf_counter() - began)
        receipt_id = appended.receipt_id
        if turn is None or outcome is None:
            self.node.add_receipt(pod.id, receipt_id)
        return receipt_id


def template_tools(pod: AgentPod) -> list[dict[str, Any]] | None:
    """The pod's tools as its chat template gets them: as the request gave them (a
    description left out is not rendered as null)."""
    if not pod.spec.tools:
        return None
    return [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in pod.spec.tools]


def generation_request(tokens: Sequence[int], max_tokens: int, sampling: Any, reuse_limit: int | None,
                       ) -> GenerationRequest:
    """A turn's request to its provider: greedy unless the turn says how to sample."""
    if sampling is None:
        return GenerationRequest(prompt_tokens=list(tokens), max_tokens=max_tokens, reuse_limit=reuse_limit)
    return GenerationRequest(
        prompt_tokens=list(tokens), max_tokens=max_tokens, reuse_limit=reuse_limit,
        temperature=sampling.temperature, seed=sampling.seed, stop=list(sampling.stop), top_k=sampling.top_k,
        top_p=sampling.top_p, min_p=sampling.min_p, repeat_penalty=sampling.repeat_penalty,
        frequency_penalty=sampling.frequency_penalty, presence_penalty=sampling.presence_penalty,
        logit_bias={int(token): bias for token, bias in sampling.logit_bias.items()}, grammar=sampling.grammar)


def _owners(session: SessionContext) -> list[str]:
    from nodeagent.kvcache.manager import visible_owners

    return visible_owners(session.spans)


def _created(pod: AgentPod) -> float:
    return pod.status.transitions[0].at.timestamp() if pod.status and pod.status.transitions else time.time()

"""Running pods on the node's providers, one module per reason to change.

* `pool`      — the providers as placement sees them (`ManagedProvider`: queue,
  live context, restarts) and `ProviderPool` (loads, revives, start gate);
* `tokens`    — prompt text to the model's token ids (`PromptTokens`);
* `executor`  — one pod, turn by turn: context, candidates, placement, restore,
  generate, save, receipt (`PodExecutor`);
* `receipts`  — what a turn's receipt records (`receipt_data`).
"""

from nodeagent.execution.executor import PodExecutor, PolicyRefusedPlacement, TurnOutcome, generation_request
from nodeagent.execution.pool import (
    MAX_TOKENIZERS,
    HeldContext,
    ManagedProvider,
    ProviderPool,
    ProviderStart,
    RunningTurn,
    TurnQueue,
    model_name,
)
from nodeagent.execution.receipts import MachineFacts, machine_facts, request_digest
from nodeagent.execution.tokens import PromptTokens, Tokenizer

__all__ = [
    "MAX_TOKENIZERS", "HeldContext", "MachineFacts", "ManagedProvider", "PodExecutor", "PolicyRefusedPlacement",
    "PromptTokens", "ProviderPool", "ProviderStart", "RunningTurn", "Tokenizer", "TurnOutcome", "TurnQueue",
    "generation_request", "machine_facts", "model_name", "request_digest",
]

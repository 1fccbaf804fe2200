"""Synthetic `ReceiptInput`s for benchmarks, documentation and tests.

Realistic in shape (every section filled, digests of real strings), varied
by ``index`` so no two are equal. Not used by the node itself.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

from nodeagent.contracts.receipt import ReceiptInput

STATUSES = ("succeeded", "failed", "cancelled", "refused")


def digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def sample_input(index: int = 0, status: str = "succeeded", *, tenant: str = "acme") -> ReceiptInput:
    queued = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc) + timedelta(seconds=index)
    ran = status in ("succeeded", "failed")
    return ReceiptInput.model_validate({
        "machine": {"identityHash": hashlib.sha256(b"machine-id").hexdigest(), "host": "node-a",
                    "agentVersion": "0.1.0", "profileDigest": digest("machine-profile")},
        "pod": {"name": f"pod-{index}", "runId": f"run{index:06d}", "tenant": tenant, "agent": "coder",
                "session": "s1", "requestDigest": digest(f"request {index}")},
        "model": {"name": "tiny", "digest": digest("model bytes")},
        "provider": {"kind": "llama_cpp_python", "version": "0.3.36", "launchMode": "subprocess"} if ran else None,
        "placement": {"decisionId": f"dec-{index}", "alternatives": 2,
                      "chosen": {"candidateId": "llama-0/cpu", "provider": "llama-0", "device": "cpu",
                                 "terms": {"queueWaitUs": 10, "loadUs": 0, "restoreUs": 200 + index % 7,
                                           "prefillUs": 3000, "ttftUs": 3210 + index % 7}}} if ran else None,
        "cache": {"tierHit": "T1", "cachedTokens": 512, "evaluatedTokens": 64 + index % 100} if ran else {},
        "timing": {"queuedAt": queued,
                   "startedAt": queued + timedelta(milliseconds=5) if ran else None,
                   "firstTokenAt": queued + timedelta(milliseconds=50) if status == "succeeded" else None,
                   "finishedAt": queued + timedelta(milliseconds=900)},
        "usage": {"promptTokens": 576, "completionTokens": 32 + index % 50} if ran else {},
        "outcome": {"status": status,
                    "errorClass": {"succeeded": None, "failed": "ProviderCrashed", "cancelled": None,
                                   "refused": "PolicyRefused"}[status]},
        "outputDigest": digest(f"output {index}") if status == "succeeded" else None,
    })

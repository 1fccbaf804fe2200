"""Corruption the cache finds is logged (not only counted): an operator must hear of a bad disk or tmpfs."""

from __future__ import annotations

import logging
import os

from nodeagent.kvcache.blocks import Namespace
from nodeagent.kvcache.manager import CacheManager

NS = Namespace("sha256:" + "e" * 64, "tenant", "acme")
TOKENS = list(range(3 * 64 + 5))


def cache_with_one_entry(tmp_path):
    cm = CacheManager.open(tmp_path / "state.db", t1_dir=tmp_path / "t1", t2_dir=tmp_path / "t2",
                           t1_budget=1 << 20, t2_budget=1 << 20)
    staging = cm.staging_path()
    staging.write_bytes(os.urandom(4096))
    return cm, cm.put(staging, TOKENS, NS, state_format="llama_cpp_python")


def test_a_corrupt_state_found_on_restore_is_logged_with_its_id_tier_and_reason(tmp_path, caplog):
    cm, entry = cache_with_one_entry(tmp_path)
    path = cm.stores["T1"].path(entry.id)
    path.write_bytes(path.read_bytes()[:10])
    found = cm.lookup(TOKENS, NS, state_format="llama_cpp_python").best
    with caplog.at_level(logging.WARNING, logger="agent_machine.kvcache"):
        with cm.restoring(found) as restore:
            assert restore is None
    (record,) = [r for r in caplog.records if r.name == "agent_machine.kvcache"]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert entry.id in message and "T1" in message and "has digest" in message and "recomputed" in message
    assert cm.stats().corrupt == 1


def test_a_state_the_provider_rejects_is_logged_with_the_providers_reason(tmp_path, caplog):
    cm, entry = cache_with_one_entry(tmp_path)
    with caplog.at_level(logging.WARNING, logger="agent_machine.kvcache"):
        cm.report_corrupt(entry.id, reason="n_ctx mismatch")
        cm.report_corrupt(entry.id)  # already dropped: nothing more to say
    messages = [r.getMessage() for r in caplog.records if r.name == "agent_machine.kvcache"]
    assert len(messages) == 1 and entry.id in messages[0] and "provider rejected: n_ctx mismatch" in messages[0]

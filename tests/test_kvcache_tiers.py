"""Tier stores: digests checked on every restore, corrupt or missing files dropped
and counted as misses, crash leftovers reconciled on open."""

import os

import pytest

from nodeagent.kvcache.blocks import Namespace
from nodeagent.kvcache.manager import CacheManager
from nodeagent.kvcache.tiers import CorruptEntry, TierStore, default_t1_dir, sha256_file
from nodeagent.store import connect

NS = Namespace("sha256:" + "e" * 64, "tenant", "acme")
TOKENS = list(range(3 * 64 + 5))


def open_manager(tmp_path, **budgets):
    return CacheManager.open(tmp_path / "state.db", t1_dir=tmp_path / "t1", t2_dir=tmp_path / "t2",
                             t1_budget=budgets.get("t1", 1 << 20), t2_budget=budgets.get("t2", 1 << 20))


def saved(cm, data=None):
    path = cm.staging_path()
    path.write_bytes(data if data is not None else os.urandom(4096))
    return cm.put(path, TOKENS, NS, state_format="llama_cpp_python")


def test_entry_metadata_is_complete_and_file_matches_digest(tmp_path):
    cm = open_manager(tmp_path)
    entry = saved(cm, b"x" * 1000)
    assert entry.tier == "T1" and entry.bytes == 1000 and entry.tokens == len(TOKENS) and entry.blocks == 3
    assert entry.model_digest == NS.model_digest and entry.scope == "tenant" and entry.tenant == "acme"
    path = cm.stores["T1"].path(entry.id)
    assert sha256_file(path) == (1000, entry.content_digest)
    assert oct(path.stat().st_mode & 0o777) in ("0o600", "0o644")


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_corrupt_or_missing_file_is_dropped_counted_and_reported_as_a_miss(tmp_path, damage):
    cm = open_manager(tmp_path)
    entry = saved(cm)
    path = cm.stores["T1"].path(entry.id)
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:10])
    else:
        path.unlink()
    found = cm.lookup(TOKENS, NS, state_format="llama_cpp_python").best
    assert found is not None  # the index still lists it until a restore checks it
    with cm.restoring(found) as restore:
        assert restore is None  # never served
    assert cm.get(entry.id) is None
    assert cm.lookup(TOKENS, NS, state_format="llama_cpp_python").best is None
    stats = cm.stats()
    assert stats.corrupt == 1 and stats.misses == 1 and stats.hits["T1"] == 0


def test_provider_rejection_drops_the_entry(tmp_path):
    cm = open_manager(tmp_path)
    entry = saved(cm)
    cm.report_corrupt(entry.id)
    assert cm.get(entry.id) is None and cm.stats().corrupt == 1


def test_verify_raises_with_the_reason(tmp_path):
    store = TierStore("T2", tmp_path / "t2", 100)
    store.copy_in(_file(tmp_path, b"abc"), "0" * 32)
    with pytest.raises(CorruptEntry, match="digest"):
        store.verify("0" * 32, "sha256:" + "0" * 64)
    with pytest.raises(CorruptEntry, match="unreadable"):
        store.verify("1" * 32, "sha256:" + "0" * 64)


def _file(tmp_path, data):
    path = tmp_path / "src.bin"
    path.write_bytes(data)
    return path


def test_reopen_reconciles_orphans_missing_files_and_staging_leftovers(tmp_path):
    cm = open_manager(tmp_path)
    kept = saved(cm)
    lost = saved(cm, os.urandom(10))  # supersedes nothing: same tokens, so it is deduplicated
    assert lost.id == kept.id
    other = cm.put(_staged(cm), TOKENS + list(range(64)), NS, state_format="llama_cpp_python")
    cm.stores["T1"].path(other.id).unlink()  # e.g. T1 (tmpfs) lost in a reboot
    orphan = cm.stores["T2"].path("f" * 32)
    orphan.write_bytes(b"no index row")  # crash between file write and index commit
    leftover = cm.staging_path()
    reopened = open_manager(tmp_path)
    assert reopened.recovered == {"orphan_files": 1, "missing_files": 1, "staging_files": 1}
    assert not orphan.exists() and not leftover.exists()
    assert reopened.get(kept.id) is not None and reopened.get(other.id) is None


def _staged(cm):
    path = cm.staging_path()
    path.write_bytes(os.urandom(64))
    return path


def test_a_file_outside_the_tiers_is_copied_and_left_alone(tmp_path):
    cm = open_manager(tmp_path)
    source = _file(tmp_path, b"state" * 100)
    entry = cm.put(source, TOKENS, NS, state_format="llama_cpp_python")
    assert source.exists() and entry.bytes == 500


def test_evict_refuses_pinned_without_force(tmp_path):
    cm = open_manager(tmp_path)
    entry = saved(cm)
    cm.pin(entry.id)
    with pytest.raises(ValueError, match="pinned"):
        cm.evict(entry.id)
    assert cm.evict(entry.id, force=True)
    assert cm.stats().evictions == 1


def test_t1_default_is_a_ram_directory():
    path = default_t1_dir({"XDG_RUNTIME_DIR": "/run/user/0"})
    assert str(path).startswith(("/dev/shm/agent-machine-", "/run/user/0/agent-machine/"))


def test_checking_a_restore_does_not_hold_up_other_lookups(tmp_path, monkeypatch):
    import threading

    cm = open_manager(tmp_path)
    entry = saved(cm)
    store = cm.stores["T1"]
    checking, may_finish = threading.Event(), threading.Event()
    real_verify = store.verify

    def slow_verify(entry_id, digest):  # a large state takes tens of ms to hash
        checking.set()
        assert may_finish.wait(10)
        return real_verify(entry_id, digest)

    monkeypatch.setattr(store, "verify", slow_verify)
    found = cm.lookup(TOKENS, NS, state_format="llama_cpp_python").best
    restores = []
    restorer = threading.Thread(target=lambda: restores.append(cm.begin_restore(found)))
    restorer.start()
    assert checking.wait(10)
    looked = []
    other = threading.Thread(target=lambda: looked.append(cm.lookup(TOKENS, NS, state_format="llama_cpp_python")))
    other.start()
    other.join(5)
    finished_while_checking = not other.is_alive()
    may_finish.set()
    restorer.join(10)
    other.join(10)
    assert finished_while_checking and looked[0].best.entry_id == entry.id
    assert restores[0] is not None and restores[0].served_from == "T1"
    cm.end_restore(entry.id)
    assert cm.stats().hits["T1"] == 1


def test_an_entry_dropped_while_its_restore_was_checked_is_a_miss(tmp_path, monkeypatch):
    cm = open_manager(tmp_path)
    entry = saved(cm)
    store = cm.stores["T1"]
    real_verify = store.verify

    def verify_while_another_restore_reports_it(entry_id, digest):
        path = real_verify(entry_id, digest)
        cm.report_corrupt(entry_id)  # the provider of a concurrent restore of it refused the file
        return path

    monkeypatch.setattr(store, "verify", verify_while_another_restore_reports_it)
    found = cm.lookup(TOKENS, NS, state_format="llama_cpp_python").best
    with cm.restoring(found) as restore:
        assert restore is None
    assert cm.get(entry.id) is None and cm.stats().misses == 1

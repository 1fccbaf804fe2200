"""Private state is 0600 in 0700 directories whatever the umask (issue #11 D4).

state.db holds every pod's private-scope text; KV states hold tenants'
context; keys sign receipts. Each test runs a real start (a Node, a cache, an
`agent-machine serve` process) under the umask a hand-started shell has
(022) and looks at the modes on disk. Wider modes found at start are
tightened and logged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import time
from pathlib import Path
from typing import Iterator

import pytest

from nodeagent.kvcache.blocks import Namespace
from nodeagent.kvcache.manager import CacheManager

from pod_factory import make_pod, wait_for
from test_api_harness import make_node


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def open_to_others(*roots: Path) -> list[str]:
    """Every directory, file or socket under ``roots`` that group or others can reach, with its mode."""
    found = []
    for root in roots:
        for path in [root, *root.rglob("*")]:
            if path.is_symlink():
                continue
            if mode(path) & 0o077:
                found.append(f"{path.relative_to(root.parent)} {mode(path):o}")
    return found


def test_a_node_started_under_umask_022_keeps_state_db_and_its_wal_and_shm_private(tmp_path):
    with umask(0o022):
        node = make_node(tmp_path)
        try:
            pod = node.submit_pod(make_pod(system="private: the patient's name is Alice", scope="private"))
            assert wait_for(lambda: node.get_pod(pod.id).status.phase == "Succeeded")
            db = node.paths.db_file
            sidecars = [db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
            assert all(path.exists() for path in sidecars)  # WAL mode, a connection open
            assert mode(node.paths.state_dir) == 0o700
            assert {path.name: mode(path) for path in [db, *sidecars]} == {
                "state.db": 0o600, "state.db-wal": 0o600, "state.db-shm": 0o600}
        finally:
            node.close()


def test_wider_modes_found_at_start_are_tightened_and_logged(tmp_path, caplog):
    state = tmp_path / "state"
    with umask(0o022):
        state.mkdir()
        conn = sqlite3.connect(state / "state.db")  # as an older agent left it: 0644 in 0755
        conn.execute("CREATE TABLE leftover (x)")
        conn.close()
    (state / "state.db-wal").write_bytes(b"")
    (state / "state.db-wal").chmod(0o644)
    assert mode(state) == 0o755 and mode(state / "state.db") == 0o644
    with caplog.at_level(logging.WARNING, logger="agent_machine.fsutil"):
        node = make_node(tmp_path)
    try:
        assert mode(state) == 0o700
        assert mode(state / "state.db") == 0o600 and mode(state / "state.db-wal") == 0o600
        warned = " | ".join(r.getMessage() for r in caplog.records)
        for path, old in ((state, "755"), (state / "state.db", "644"), (state / "state.db-wal", "644")):
            assert f"{path} had mode {old}, open to others: tightened" in warned
        assert node.db.execute("SELECT count(*) FROM leftover").fetchone()[0] == 0  # nothing stored is lost
    finally:
        node.close()


def test_kv_tier_files_are_private_even_when_a_provider_wrote_them_with_its_own_umask(tmp_path):
    ns = Namespace("sha256:" + "e" * 64, "tenant", "acme")
    with umask(0o022):
        cache = CacheManager.open(tmp_path / "state" / "state.db", t1_dir=tmp_path / "ram" / "kv",
                                  t2_dir=tmp_path / "state" / "kvcache", t1_budget=8192, t2_budget=1 << 20)
        staged = cache.staging_path()
        staged.write_bytes(os.urandom(4096))
        staged.chmod(0o644)  # llama-server saves slots with its own umask; the cache renames the file in
        first = cache.put(staged, list(range(200)), ns, state_format="llama_server")
        staged = cache.staging_path()
        staged.write_bytes(os.urandom(6000))
        cache.put(staged, list(range(1000, 1200)), ns, state_format="llama_server")  # demotes the first to T2
    assert cache.get(first.id).tier == "T2"
    assert open_to_others(tmp_path / "state", tmp_path / "ram") == []
    assert mode(tmp_path / "ram" / "kv") == 0o700 and mode(tmp_path / "state" / "kvcache") == 0o700


@pytest.mark.slow
def test_a_hand_started_serve_under_umask_022_creates_only_private_state(tmp_path):
    from test_daemon import Serve

    with umask(0o022):  # the child inherits it, as from a login shell
        server = Serve(tmp_path, AGENT_MACHINE_CACHE_RAM_DIR=str(tmp_path / "ram"))
    try:
        server.wait_for_message("READY", timeout=60)
        with server.client(timeout=30) as client:
            pod = client.post("/v1/pods", json=make_pod(system="private text").to_wire()).json()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                phase = client.get(f"/v1/pods/{pod['id']}").json()["status"]["phase"]
                if phase in ("Succeeded", "Failed", "Refused", "Cancelled"):
                    break
                time.sleep(0.1)
        assert server.stop() == 0, server.read_log()[-3000:]
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    state = tmp_path / "state"
    assert (state / "state.db").exists() and (state / "receipts" / "receipts.jsonl").exists()
    assert (state / "keys" / "machine.key").exists()
    created = sorted(str(p.relative_to(tmp_path)) for p in state.rglob("*"))
    assert open_to_others(state, tmp_path / "run", tmp_path / "ram") == [], created

import os
import sqlite3

import pytest

from nodeagent.fsutil import atomic_write_bytes, atomic_writer
from nodeagent.store import connect, migrate


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "f.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two", mode=0o600)
    assert target.read_bytes() == b"two"
    assert oct(target.stat().st_mode & 0o777) == "0o600"
    assert os.listdir(target.parent) == ["f.bin"]


def test_atomic_write_failure_keeps_old_content(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_writer(target) as handle:
            handle.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_store_uses_wal_and_migrates_once(tmp_path):
    conn = connect(tmp_path / "state.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    steps = ["CREATE TABLE t (x INTEGER)", "ALTER TABLE t ADD COLUMN y TEXT"]
    migrate(conn, "demo", steps)
    migrate(conn, "demo", steps)  # second run applies nothing
    assert [r[1] for r in conn.execute("PRAGMA table_info(t)")] == ["x", "y"]
    bad = steps + ["CREATE TABLE u (z INTEGER); THIS IS NOT SQL"]
    with pytest.raises(sqlite3.OperationalError):
        migrate(conn, "demo", bad)
    # the failed step rolled back as a whole
    assert conn.execute("SELECT name FROM sqlite_master WHERE name='u'").fetchone() is None


def test_private_dir_creates_private_parents(tmp_path):
    from nodeagent.fsutil import ensure_private_dir

    target = ensure_private_dir(tmp_path / "a" / "b" / "c")
    for directory in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert oct(directory.stat().st_mode & 0o777) == "0o700", directory
    (tmp_path / "open").mkdir(mode=0o755)
    ensure_private_dir(tmp_path / "open" / "inner")
    assert oct((tmp_path / "open").stat().st_mode & 0o777) == "0o755"  # existing parents untouched

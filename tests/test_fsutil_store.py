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
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o755)  # whatever this process's umask is
    ensure_private_dir(tmp_path / "open" / "inner")
    assert oct((tmp_path / "open").stat().st_mode & 0o777) == "0o755"  # existing parents untouched


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_written_files_are_private_unless_published_whatever_the_umask(tmp_path):
    from nodeagent.fsutil import PUBLIC_FILE_MODE

    old = os.umask(0)
    try:
        atomic_write_bytes(tmp_path / "private", b"x")
        atomic_write_bytes(tmp_path / "published", b"x", mode=PUBLIC_FILE_MODE)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "private") == 0o600 and _mode(tmp_path / "published") == 0o644


def test_a_new_database_file_is_0600_even_under_a_umask_that_would_make_it_unwritable(tmp_path):
    from nodeagent.fsutil import create_private_file

    old = os.umask(0o277)
    try:
        conn = connect(tmp_path / "db" / "state.db")
        conn.execute("CREATE TABLE t (x)")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "db") == 0o700 and _mode(tmp_path / "db" / "state.db") == 0o600
    existing = tmp_path / "db" / "state.db"
    assert create_private_file(existing) == existing and conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0


def test_ensure_private_file_tightens_only_what_others_can_reach(tmp_path):
    from nodeagent.fsutil import ensure_private_file

    assert ensure_private_file(tmp_path / "absent") is False
    wide, narrow = tmp_path / "wide", tmp_path / "narrow"
    wide.write_text("x")
    wide.chmod(0o664)
    narrow.write_text("x")
    narrow.chmod(0o400)
    assert ensure_private_file(wide) and ensure_private_file(narrow)
    assert _mode(wide) == 0o600 and _mode(narrow) == 0o400


def test_restrict_umask_adds_077_and_never_loosens(tmp_path):
    from nodeagent.fsutil import restrict_umask

    old = os.umask(0o022)
    try:
        assert restrict_umask() == 0o022 and os.umask(0o027) == 0o077
        assert restrict_umask() == 0o027 and os.umask(0o277) == 0o077
        assert restrict_umask() == 0o277 and os.umask(0o022) == 0o277
    finally:
        os.umask(old)


def test_open_to_others_reads_modes_without_failing(tmp_path):
    from nodeagent.fsutil import open_to_others

    (tmp_path / "d").mkdir(mode=0o700)
    (tmp_path / "f").write_text("x")
    (tmp_path / "f").chmod(0o640)
    assert open_to_others(tmp_path / "d") is None and open_to_others(tmp_path / "f") == 0o640
    assert open_to_others(tmp_path / "missing") is None and open_to_others(tmp_path / "f" / "under-a-file") is None

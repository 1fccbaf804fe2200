"""The node's SQLite state database.

One file (``state.db`` in the state directory), WAL journal, a busy timeout so
the daemon and CLI can share it. It holds every pod's private-scope text, so
the database and its ``-wal``/``-shm`` files are 0600 in a 0700 directory
whatever the umask (SQLite gives its sidecar files the database's own mode).
Each component owns its tables and declares its schema as an ordered list of
migration steps; ``migrate`` applies the ones not yet recorded, each in its
own transaction.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Sequence

from nodeagent.fsutil import create_private_file, ensure_private_dir, ensure_private_file

SIDECARS = ("-wal", "-shm", "-journal")


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the database with the settings every component relies on."""
    path = Path(path)
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0, check_same_thread=False)
    else:
        make_private(path)
        conn = sqlite3.connect(path, timeout=10.0, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction survives power loss, not only a process crash.
        conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.row_factory = sqlite3.Row
    return conn


def make_private(path: str | Path) -> None:
    """The database file and its directory private before SQLite opens them.

    A new database is created 0600 here, not by SQLite (which would use 0644
    minus the umask); its directory is 0700. Existing ones that others can
    reach, and their sidecars, are tightened (and logged).
    """
    path = Path(path)
    ensure_private_dir(path.parent)
    create_private_file(path)
    for suffix in SIDECARS:
        ensure_private_file(path.with_name(path.name + suffix))


def migrate(conn: sqlite3.Connection, component: str, steps: Sequence[str]) -> None:
    """Apply ``steps[i]`` (SQL scripts) for every i not yet applied for ``component``.

    Steps are append-only: never edit a released step, add a new one.
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " component TEXT NOT NULL, step INTEGER NOT NULL, PRIMARY KEY (component, step))"
    )
    done = {row[0] for row in conn.execute("SELECT step FROM schema_migrations WHERE component = ?", (component,))}
    for index, script in enumerate(steps):
        if index in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _split(script):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations (component, step) VALUES (?, ?)", (component, index))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def _split(script: str) -> list[str]:
    return [part.strip() for part in script.split(";") if part.strip()]


class transaction:
    """``with transaction(conn):`` runs BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any exception.

    Connections from `connect` are in autocommit mode, so every multi-statement
    change that must be atomic goes through this.
    """

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self._conn.execute("BEGIN IMMEDIATE")
        return self._conn

    def __exit__(self, exc_type, exc, tb) -> None:
        self._conn.execute("COMMIT" if exc_type is None else "ROLLBACK")

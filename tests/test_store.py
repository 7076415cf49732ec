from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from populi_peer.errors import DatabaseTooNew, StoreError
from populi_peer.store import SCHEMA_VERSION, Store


def test_fresh_database_is_wal_full_and_current(tmp_path: Path) -> None:
    store = Store.open(tmp_path, create=True)
    assert store.schema_version() == SCHEMA_VERSION
    assert store.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    store.close()
    assert oct(tmp_path.stat().st_mode & 0o777) == "0o700"


def test_database_newer_than_code_is_refused(tmp_path: Path) -> None:
    Store.open(tmp_path, create=True).close()
    conn = sqlite3.connect(tmp_path / "populi.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 3}")
    conn.commit()
    conn.close()
    with pytest.raises(DatabaseTooNew) as info:
        Store.open(tmp_path)
    assert "newer than this Populi" in str(info.value)


def test_migrations_run_forward_from_an_older_version(tmp_path: Path) -> None:
    # An empty database is version 0: opening migrates it step by step.
    sqlite3.connect(tmp_path / "populi.db").close()
    store = Store.open(tmp_path)
    assert store.schema_version() == SCHEMA_VERSION
    tables = {row[0] for row in store.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "principals", "registers", "events", "join_tokens", "token_uses"} <= tables
    store.close()


def test_cli_does_not_migrate_a_database(tmp_path: Path) -> None:
    sqlite3.connect(tmp_path / "populi.db").close()
    with pytest.raises(StoreError) as info:
        Store.open(tmp_path, migrate_ok=False)
    assert info.value.code == "database_too_old"


def test_failed_transaction_writes_nothing(tmp_path: Path) -> None:
    store = Store.open(tmp_path, create=True)
    with pytest.raises(RuntimeError), store.transaction():
        store.execute("INSERT INTO meta (key, value) VALUES ('a', '1')")
        raise RuntimeError("boom")
    assert store.get_meta("a") is None
    store.close()


def test_missing_data_dir_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as info:
        Store.open(tmp_path / "nothing")
    assert "populi init" in str(info.value)

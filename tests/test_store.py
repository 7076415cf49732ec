from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from populi_peer.errors import DatabaseTooNew, StorageUnavailable, StoreError
from populi_peer.store import SCHEMA_VERSION, Store
from support.disk import fill, small_tmpfs


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


# -- storage that stops taking writes ---------------------------------------------------------


def events_rows(store: Store) -> list[str]:
    return [row["kind"] for row in store.execute("SELECT kind FROM events ORDER BY seq")]


def insert_events(store: Store, count: int, *, size: int = 4000) -> None:
    with store.transaction():
        for n in range(count):
            store.execute(
                "INSERT INTO events (at_ms, node_id, kind, actor, detail) VALUES (?, ?, ?, ?, ?)",
                (n, "n-1", f"e{n}", "test", "x" * size),
            )


def test_max_page_count_reached_is_storage_unavailable_and_rolls_back(tmp_path: Path) -> None:
    store = Store.open(tmp_path, create=True)
    heard: list[StoreError | None] = []
    store.write_listener = heard.append
    insert_events(store, 1, size=10)
    assert heard == [None]
    pages = store.execute("PRAGMA page_count").fetchone()[0]
    store.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(StorageUnavailable) as info:
        insert_events(store, 50)
    assert info.value.code == "storage_unavailable" and info.value.http_status == 503
    assert info.value.details["condition"] == "disk_full"
    assert not store.conn.in_transaction
    assert events_rows(store) == ["e0"]  # nothing of the failed transaction
    assert heard[-1] is info.value
    store.execute("PRAGMA max_page_count = 1073741823")
    insert_events(store, 50)  # the same write, once there is room
    assert len(events_rows(store)) == 51 and heard[-1] is None
    store.close()


def test_a_read_only_database_is_storage_unavailable(tmp_path: Path) -> None:
    store = Store.open(tmp_path, create=True)
    store.execute("PRAGMA query_only = ON")
    with pytest.raises(StorageUnavailable) as info:
        store.set_meta("k", "v")
    assert info.value.details["condition"] == "read_only"
    store.execute("PRAGMA query_only = OFF")
    store.set_meta("k", "v")
    assert store.get_meta("k") == "v"
    store.close()


def test_a_statement_error_is_a_store_error_not_unavailable(tmp_path: Path) -> None:
    store = Store.open(tmp_path, create=True)
    with pytest.raises(StoreError) as info, store.transaction():
        store.execute("INSERT INTO meta (key, value) VALUES ('a', NULL)")
    assert not isinstance(info.value, StorageUnavailable)
    assert info.value.code == "store_error" and not store.conn.in_transaction
    store.close()


def test_a_full_disk_fails_the_write_whole_and_the_store_carries_on(tmp_path: Path) -> None:
    """A real full disk: a 4 MiB tmpfs, filled to the last byte."""
    with small_tmpfs(tmp_path / "mnt", size_kib=4096) as mount:
        store = Store.open(mount / "d", create=True)
        heard: list[StoreError | None] = []
        store.write_listener = heard.append
        insert_events(store, 1, size=10)
        filler = fill(mount)
        with pytest.raises(StorageUnavailable) as info:
            insert_events(store, 20)
        assert info.value.details["condition"] == "disk_full", info.value
        assert not store.conn.in_transaction
        assert events_rows(store) == ["e0"]
        assert heard[-1] is info.value
        filler.unlink()  # space is back: the same connection writes again
        insert_events(store, 20)
        assert len(events_rows(store)) == 21 and heard[-1] is None
        store.close()
        reopened = Store.open(mount / "d")
        assert len(events_rows(reopened)) == 21  # and it was durable
        reopened.close()

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from populi_peer.errors import DatabaseTooNew, StorageUnavailable, StoreError, Unauthenticated
from populi_peer.store import NONCE_PRUNE_INTERVAL_S, SCHEMA_VERSION, Store, bind_request_nonce
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


def test_a_request_nonce_rides_on_its_first_commit_only(tmp_path: Path) -> None:
    store = Store.open(tmp_path, create=True)
    binding = store.request_nonce("op-1", "nonce-a", expires_s=1_000_300, now_s=1_000_000)
    with bind_request_nonce(binding):
        store.set_meta("a", "1")
        store.set_meta("b", "2")  # a second commit of the same request: no second row
    assert binding.recorded
    rows = store.execute("SELECT signer, nonce, expires_s FROM request_nonces").fetchall()
    assert [tuple(r) for r in rows] == [("op-1", "nonce-a", 1_000_301)]
    assert store.nonce_used("op-1", "nonce-a") and not store.nonce_used("op-2", "nonce-a")
    # Without a bound request (a background write), commits carry no nonce.
    store.set_meta("c", "3")
    assert store.execute("SELECT COUNT(*) FROM request_nonces").fetchone()[0] == 1
    store.close()


def test_a_replayed_nonce_rolls_its_transaction_back(tmp_path: Path) -> None:
    store = Store.open(tmp_path, create=True)
    with bind_request_nonce(store.request_nonce("op-1", "n", expires_s=300, now_s=0)):
        store.set_meta("token", "first")
    replay = store.request_nonce("op-1", "n", expires_s=300, now_s=1)
    with bind_request_nonce(replay), pytest.raises(Unauthenticated) as info:
        store.set_meta("token", "second")
    assert info.value.code == "signature_replayed" and info.value.http_status == 401
    # Refused again for any later commit of the same request; nothing was written.
    with bind_request_nonce(replay), pytest.raises(Unauthenticated):
        store.set_meta("other", "x")
    assert store.get_meta("token") == "first" and store.get_meta("other") is None
    store.close()


def test_a_nonce_binds_to_its_own_store_only(tmp_path: Path) -> None:
    one = Store.open(tmp_path / "one", create=True)
    two = Store.open(tmp_path / "two", create=True)
    with bind_request_nonce(one.request_nonce("op-1", "n", expires_s=300, now_s=0)):
        two.set_meta("a", "1")
        with bind_request_nonce(None):  # an unsigned request handled inside: no nonce
            one.set_meta("a", "1")
    assert two.execute("SELECT COUNT(*) FROM request_nonces").fetchone()[0] == 0
    assert one.execute("SELECT COUNT(*) FROM request_nonces").fetchone()[0] == 0
    one.close()
    two.close()


def test_expired_nonces_are_pruned_in_a_later_commit(tmp_path: Path) -> None:
    store = Store.open(tmp_path, create=True)
    with bind_request_nonce(store.request_nonce("op-1", "old", expires_s=1_000, now_s=700)):
        store.set_meta("a", "1")
    # A request received after the first one's skew window closed (and a minute on).
    later = 1_000 + NONCE_PRUNE_INTERVAL_S + 1
    with bind_request_nonce(store.request_nonce("op-1", "new", expires_s=later + 300, now_s=later)):
        store.set_meta("b", "1")
    assert not store.nonce_used("op-1", "old") and store.nonce_used("op-1", "new")
    store.close()

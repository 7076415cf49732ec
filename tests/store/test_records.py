"""The signed-text tables: revocation lists, cluster records and registers."""

from __future__ import annotations

from populi_peer.store import Store
from populi_peer.store.records import SignedRecords
from populi_peer.store.registers import Registers
from populi_peer.store.revocations import RevocationLists


def test_only_the_newest_revocation_list_is_kept(store: Store) -> None:
    lists = RevocationLists(store)
    assert lists.latest() is None
    lists.install(0, "list-0", stored_ms=1)
    lists.install(3, "list-3", stored_ms=2)
    assert lists.latest() == "list-3"
    assert store.execute("SELECT COUNT(*) FROM revocation_lists").fetchone()[0] == 1
    lists.install(3, "list-3-again", stored_ms=3)  # the same serial again replaces it
    assert lists.latest() == "list-3-again"


def test_a_cluster_record_is_held_once_per_kind(store: Store) -> None:
    records = SignedRecords(store)
    assert records.text("settings") is None
    records.put("settings", serial=1, text="s1", stored_ms=10)
    records.put("voters", serial=4, text="v4", stored_ms=10)
    records.put("settings", serial=2, text="s2", stored_ms=20)
    assert (records.text("settings"), records.text("voters")) == ("s2", "v4")
    row = store.execute("SELECT serial, stored_ms FROM cluster_records WHERE kind = 'settings'")
    assert tuple(row.fetchone()) == (2, 20)


def test_registers_hold_one_record_per_node_and_attribute(store: Store) -> None:
    registers = Registers(store)
    registers.put("n-a", "lifecycle", "a-life-1")
    registers.put("n-a", "addresses", "a-addr")
    registers.put("n-b", "lifecycle", "b-life")
    registers.put("n-a", "lifecycle", "a-life-2")
    assert sorted(registers.all()) == ["a-addr", "a-life-2", "b-life"]
    registers.drop_node("n-a")
    assert registers.all() == ["b-life"]

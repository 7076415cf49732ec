"""The principals repository: typed members in and out, one upsert, the version counter."""

from __future__ import annotations

from dataclasses import replace

import pytest

from populi_peer.core.membership import Member
from populi_peer.errors import StoreError
from populi_peer.store import Store
from populi_peer.store.members import Members


def member(principal_id: str = "n-a", **changes: object) -> Member:
    base = Member(
        id=principal_id,
        kind="node",
        name="alpha",
        public_key="ed25519:key",
        roles=("submit", "worker"),
        addresses=("10.0.0.1:7070",),
        cert_serial="ab12",
        cert_not_after_ms=2_000,
        joined_ms=1_000,
        token_id="tok",
        updated_ms=1_000,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def test_a_member_reads_back_as_written(store: Store) -> None:
    members = Members(store)
    node = member()
    operator = member(
        "o-b", kind="operator", name="operator@alpha", addresses=(), roles=("operator",)
    )
    members.insert(node)
    members.insert(operator)
    assert sorted(Members(store).all(), key=lambda m: m.id) == [node, operator]


def test_insert_refuses_a_known_id_and_writes_nothing(store: Store) -> None:
    members = Members(store)
    members.insert(member())
    with pytest.raises(StoreError):
        members.insert(member(name="other"))
    assert [m.name for m in members.all()] == ["alpha"]


def test_upsert_updates_everything_but_the_join_time(store: Store) -> None:
    members = Members(store)
    members.upsert(member())
    members.upsert(member(name="renamed", joined_ms=9_999, updated_ms=5_000, roles=("worker",)))
    (stored,) = members.all()
    assert stored == member(name="renamed", joined_ms=1_000, updated_ms=5_000, roles=("worker",))


def test_delete_and_replace_all(store: Store) -> None:
    members = Members(store)
    members.insert(member("n-a"))
    members.insert(member("n-b"))
    members.delete("n-a")
    assert [m.id for m in members.all()] == ["n-b"]
    members.replace_all([member("n-c"), member("n-d")], version=7)
    assert sorted(m.id for m in members.all()) == ["n-c", "n-d"]
    assert store.get_meta("membership_version") == "7"


def test_the_version_starts_at_one_and_each_bump_adds_one(store: Store) -> None:
    members = Members(store)
    assert store.get_meta("membership_version") is None  # read as 1
    members.bump_version()
    assert store.get_meta("membership_version") == "2"
    members.bump_version()
    assert store.get_meta("membership_version") == "3"

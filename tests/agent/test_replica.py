"""The materializer (populi_peer/agent/replica.py) on a real data directory: replicated
entries into the tables the agent reads, idempotent, newer-wins, one transaction, and a
failed write that leaves everything as it was and catches up later."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from enrollment.records import sign_record
from enrollment.revocation import RevokedNode
from populi_peer.cluster import InitResult
from populi_peer.core import settings as cluster_settings
from populi_peer.core.cluster_state import (
    IssuedToken,
    NameReleased,
    TokenConsumed,
    TokenRevoked,
    consumption_item,
    issued_token_item,
    member_item,
    name_release_item,
    node_revocation_item,
    settings_item,
    token_revocation_item,
)
from populi_peer.core.hlc import Hlc
from populi_peer.core.lifecycle import initial_lifecycle
from populi_peer.core.membership import Member
from populi_peer.core.registers import LIFECYCLE, RegisterWrite, Stamp
from populi_peer.core.replication import Entry, Item, SetElement, WriteId
from populi_peer.store.tokens import JoinTokens
from support.members import node_member
from support.voters import ReplicaVoter

WALL_MS = 1_780_000_000_000


class FixedClock:
    def wall(self) -> float:
        return WALL_MS / 1000

    def mono(self) -> float:
        return 0.0

    def boot(self) -> float:
        return 0.0


class Voter(ReplicaVoter):
    """A voter's materializer and the reads these tests make of its tables."""

    @property
    def tokens(self) -> JoinTokens:
        return JoinTokens(self.store)

    def version(self) -> int:
        return self.membership.version

    def dump(self) -> dict[str, list[tuple[object, ...]]]:
        """Every table the materializer writes, row by row (registers without their
        signature: the text is signed at the time it is stored)."""
        tables = {
            "principals": "SELECT * FROM principals ORDER BY id",
            "join_tokens": "SELECT * FROM join_tokens ORDER BY token_id",
            "token_uses": "SELECT * FROM token_uses ORDER BY token_id, node_id",
            "registers": "SELECT node_id, attribute FROM registers ORDER BY 1, 2",
            "revocation_lists": "SELECT serial, text FROM revocation_lists ORDER BY serial",
            "cluster_records": "SELECT kind, serial, text FROM cluster_records ORDER BY kind",
            "meta": "SELECT value FROM meta WHERE key = 'membership_version'",
        }
        return {
            name: [tuple(row) for row in self.store.execute(sql).fetchall()]
            for name, sql in tables.items()
        }


def open_voter(data_dir: Path) -> Voter:
    return Voter.open(data_dir, FixedClock(), now_ms=lambda: WALL_MS)


@contextmanager
def reopened(voter: Voter) -> Iterator[Voter]:
    """``voter``'s data directory opened again once its store is closed: what the agent
    reads after a restart."""
    voter.store.close()
    again = open_voter(voter.data_dir)
    try:
        yield again
    finally:
        again.store.close()


@pytest.fixture
def voter(cluster_dir: tuple[Path, InitResult]) -> Iterator[Voter]:
    opened = open_voter(cluster_dir[0])
    yield opened
    opened.store.close()


def stamp(term: int, wall: int = WALL_MS, writer: str = "cp") -> Stamp:
    return Stamp(term, Hlc(wall, 0), writer)


def entries(term: int, *items: Item, first_seq: int = 1) -> list[Entry]:
    return [Entry(WriteId(term, first_seq + i), item) for i, item in enumerate(items)]


def new_member(name: str = "box", token_id: str = "tok1") -> Member:
    return node_member(
        name,
        now_ms=WALL_MS,
        addresses=("10.0.0.2:7431",),
        cert_serial="abc1",
        token_id=token_id,
    )


def lifecycle(node_id: str, term: int, wall: int = WALL_MS, *, value: bool = True) -> RegisterWrite:
    return RegisterWrite(
        node_id=node_id,
        attribute=LIFECYCLE,
        value=initial_lifecycle(now_wall_ms=wall, actor="cp").to_json() if value else None,
        stamp=stamp(term, wall),
        writer_class="leader" if value else "operator",
        actor="cp",
        reason="joined" if value else "deleted",
        at_wall_ms=wall,
    )


def join_items(member: Member, term: int) -> list[Item]:
    """What one join stores: the token (minted earlier), its use, the member record with
    the certificate it issued, the node's first lifecycle."""
    token = IssuedToken("tok1", "digest1", ("submit", "worker"), None, 1, 0, WALL_MS + 9, 0, "op")
    return [
        issued_token_item(token, stamp=stamp(term)),
        consumption_item(TokenConsumed("tok1", 1, member.id), stamp=stamp(term)),
        member_item(
            member,
            certificate="-----CERT-----",
            stamp=stamp(term),
            writer_class="leader",
            actor="token:tok1",
            reason="joined",
            at_wall_ms=WALL_MS,
        ),
        lifecycle(member.id, term),
    ]


def test_a_join_replicated_lands_in_the_tables_the_agent_reads(voter: Voter) -> None:
    member = new_member()
    version = voter.version()
    voter.replica.apply(entries(2, *join_items(member, 2)))

    assert voter.membership.get(member.id) == member
    assert voter.membership.principal(member.id) is not None  # authentication sees it
    assert voter.version() == version + 1
    token = voter.tokens.get("tok1")
    assert token is not None and token.uses_left == 0 and token.uses_total == 1
    recorded = voter.tokens.recorded("tok1", member.id)
    assert recorded is not None and recorded.certificate == "-----CERT-----"
    lc = voter.registry.lifecycle(member.id)
    assert lc is not None and lc.state == "active"
    assert not voter.replica.lagging

    # A restarted agent reads the same from its tables.
    before = voter.dump()
    with reopened(voter) as again:
        assert again.membership.get(member.id) == member
        assert again.registry.lifecycle(member.id) is not None
        assert again.dump() == before


def test_applying_again_in_any_order_or_after_a_restart_changes_nothing(voter: Voter) -> None:
    member = new_member()
    batch = entries(2, *join_items(member, 2))
    voter.replica.apply(batch)
    once = voter.dump()
    voter.replica.apply(batch[::-1])
    voter.replica.apply(batch[2:])
    assert voter.dump() == once
    with reopened(voter) as again:
        again.replica.apply(batch)
        assert again.dump() == once


def test_the_same_entries_give_the_same_tables_whatever_order_they_arrive_in(
    tmp_path: Path, cluster_dir: tuple[Path, InitResult]
) -> None:
    member = new_member()
    batch = entries(2, *join_items(member, 2))
    copy = tmp_path / "copy"
    shutil.copytree(cluster_dir[0], copy)
    a, b = open_voter(cluster_dir[0]), open_voter(copy)
    try:
        for entry in batch:
            a.replica.apply([entry])
        b.replica.apply(batch[::-1])
        assert a.dump() == b.dump()
    finally:
        a.store.close()
        b.store.close()


def test_an_older_register_write_does_not_replace_a_newer_one(voter: Voter) -> None:
    member = new_member()
    voter.replica.apply(entries(2, *join_items(member, 2)))
    cordoned = RegisterWrite(
        node_id=member.id,
        attribute=LIFECYCLE,
        value=initial_lifecycle(now_wall_ms=WALL_MS + 5, actor="op").to_json()
        | {"state": "cordoned"},
        stamp=stamp(3, WALL_MS + 5, "op"),
        writer_class="operator",
        actor="op",
        reason="maintenance",
        at_wall_ms=WALL_MS + 5,
    )
    voter.replica.apply(entries(3, cordoned))
    assert voter.registry.registers.get(member.id, LIFECYCLE) == cordoned
    stale = lifecycle(member.id, 2, WALL_MS + 9)  # later clock, older term: loses
    voter.replica.apply(entries(2, stale, first_seq=10))
    assert voter.registry.registers.get(member.id, LIFECYCLE) == cordoned
    with reopened(voter) as again:
        assert again.registry.registers.get(member.id, LIFECYCLE) == cordoned


def test_a_deleted_node_leaves_every_table_and_a_late_write_does_not_bring_it_back(
    voter: Voter,
) -> None:
    member = new_member()
    voter.replica.apply(entries(2, *join_items(member, 2)))
    voter.replica.apply(entries(3, lifecycle(member.id, 3, WALL_MS + 1, value=False)))
    assert voter.membership.get(member.id) is None
    assert voter.membership.principal(member.id) is None
    assert voter.registry.registers.is_deleted(member.id)
    rows = voter.store.execute(
        "SELECT attribute FROM registers WHERE node_id = ?", (member.id,)
    ).fetchall()
    assert [row[0] for row in rows] == [LIFECYCLE]  # the tombstone only
    # A member write from a voter that had not seen the delete (a newer stamp even).
    late = member_item(
        member,
        certificate=None,
        stamp=stamp(4, WALL_MS + 50),
        writer_class="leader",
        actor="cp",
        reason="renewed",
        at_wall_ms=WALL_MS + 50,
    )
    voter.replica.apply(entries(4, late))
    assert voter.membership.get(member.id) is None


def test_a_token_use_beaten_by_a_newer_term_moves_to_its_consumer(voter: Voter) -> None:
    a, b = new_member("a"), new_member("b")
    token = IssuedToken("tok1", "digest1", ("worker",), None, 1, 0, WALL_MS + 9, 0, "op")
    voter.replica.apply(
        entries(
            2,
            issued_token_item(token, stamp=stamp(2)),
            consumption_item(TokenConsumed("tok1", 1, a.id), stamp=stamp(2)),
        )
    )
    assert voter.tokens.used_by("tok1") == [a.id]
    # The use stored by the leader of term 2 on a minority loses to term 3's.
    voter.replica.apply(
        entries(3, consumption_item(TokenConsumed("tok1", 1, b.id), stamp=stamp(3)))
    )
    assert voter.tokens.used_by("tok1") == [b.id]
    row = voter.tokens.get("tok1")
    assert row is not None and row.uses_left == 0
    # And the term-2 copy arriving again changes nothing.
    voter.replica.apply(
        entries(2, consumption_item(TokenConsumed("tok1", 1, a.id), stamp=stamp(2)))
    )
    assert voter.tokens.used_by("tok1") == [b.id]


def test_a_revoked_token_is_revoked_in_the_table(voter: Voter) -> None:
    token = IssuedToken("tok9", "digest9", ("worker",), "gpu1", 3, 0, WALL_MS + 9, 0, "op")
    voter.replica.apply(
        entries(
            2,
            token_revocation_item(TokenRevoked("tok9", WALL_MS + 3, "op"), stamp=stamp(2)),
            issued_token_item(token, stamp=stamp(2)),
        )
    )
    row = voter.tokens.get("tok9")
    assert row is not None
    assert (row.revoked_ms, row.uses_left, row.name) == (WALL_MS + 3, 3, "gpu1")


def test_revocations_become_the_signed_list_every_voter_derives_alike(
    voter: Voter, tmp_path: Path
) -> None:
    copy_dir = tmp_path / "other"
    shutil.copytree(voter.data_dir, copy_dir)
    other = open_voter(copy_dir)
    try:
        x = RevokedNode("node-x", "box", "stolen", WALL_MS + 1, ("ab12",))
        y = RevokedNode("node-y", "lab", "retired", WALL_MS + 2, ())
        released = NameReleased("node-x", "box", WALL_MS + 3)
        batch = entries(
            2,
            node_revocation_item(x, stamp=stamp(2)),
            node_revocation_item(y, stamp=stamp(2)),
            name_release_item(released, stamp=stamp(2)),
        )
        voter.replica.apply(batch)
        for entry in batch[::-1]:
            other.replica.apply([entry])
        assert voter.revocations.serial == 3
        assert voter.revocations.is_revoked("node-x")
        assert voter.revocations.is_certificate_revoked("node-z", "ab12")
        assert not voter.revocations.is_name_blocked("box")
        assert voter.revocations.is_name_blocked("lab")
        # The same elements give the same signed text, whatever the arrival order.
        assert voter.revocations.text == other.revocations.text
    finally:
        other.store.close()


def test_settings_of_a_later_term_win_over_a_higher_serial(voter: Voter) -> None:
    def signed(serial: int, lease: int) -> tuple[str, dict[str, object]]:
        # ADR 0016's timings, under which these leases are safe.
        body = (
            cluster_settings.defaults()
            | cluster_settings.ELECTION_OMITTED
            | {"leader_lease_s": lease}
        )
        text = sign_record(
            kind="settings",
            serial=serial,
            body=body,
            signer_id=voter.identity.node_id,
            signer_key=voter.identity.node_key,
            now_ms=WALL_MS,
            actor="op",
        )
        return text, body

    text7, body7 = signed(7, 7)
    text5, body5 = signed(5, 5)
    voter.replica.apply(entries(2, settings_item(serial=7, term=2, text=text7, body=body7)))
    assert voter.records.settings_serial == 7
    voter.replica.apply(entries(3, settings_item(serial=5, term=3, text=text5, body=body5)))
    assert voter.records.settings_serial == 5
    assert voter.records.settings["leader_lease_s"] == 5
    voter.replica.apply(
        entries(2, settings_item(serial=7, term=2, text=text7, body=body7), first_seq=9)
    )
    assert voter.records.settings_serial == 5


def test_a_failed_write_changes_nothing_and_the_next_call_catches_up(voter: Voter) -> None:
    member = new_member()
    before = voter.dump()
    version = voter.version()
    pages = voter.store.execute("PRAGMA page_count").fetchone()[0]
    voter.store.conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full
    big = IssuedToken("tok2", "d" * 200_000, ("worker",), None, 1, 0, WALL_MS + 9, 0, "op")
    batch = entries(2, *join_items(member, 2), issued_token_item(big, stamp=stamp(2)), first_seq=1)
    voter.replica.apply(batch)  # does not raise
    assert voter.replica.lagging
    assert voter.membership.get(member.id) is None
    assert voter.dump() == before
    assert voter.version() == version
    voter.store.conn.execute("PRAGMA max_page_count = 1073741823")  # space again
    voter.replica.apply([])
    assert not voter.replica.lagging
    assert voter.membership.get(member.id) == member
    assert voter.tokens.get("tok2") is not None


def test_an_item_that_does_not_decode_is_skipped_and_the_rest_applied(voter: Voter) -> None:
    member = new_member()
    bad = SetElement("consumed_tokens", "no-use-number", {"consumer": "x"}, stamp(2))
    voter.replica.apply(entries(2, bad, *join_items(member, 2)))
    assert voter.membership.get(member.id) == member
    assert not voter.replica.lagging


def test_a_replicated_register_older_than_one_written_here_does_not_replace_it(
    voter: Voter,
) -> None:
    # Writes that do not go through the leader yet (a node's own GPU quarantine, stored
    # by the heartbeat intake) share the table: the item's order decides there too.
    member = new_member()
    voter.replica.apply(entries(2, *join_items(member, 2)))
    newer = lifecycle(member.id, 5, WALL_MS + 10)
    assert voter.registry.apply(newer)
    other = new_member("other")
    voter.replica.apply(
        entries(3, lifecycle(member.id, 3, WALL_MS + 20), lifecycle(other.id, 3, WALL_MS + 20))
    )
    assert voter.registry.registers.get(member.id, LIFECYCLE) == newer
    assert voter.registry.lifecycle(other.id) is not None
    with reopened(voter) as again:
        assert again.registry.registers.get(member.id, LIFECYCLE) == newer

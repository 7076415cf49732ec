"""Each control-plane write as one replicated item and back (populi_peer/core/cluster_state.py):
round trips through the wire form, the refusals of malformed items, the merge rules the
encodings rely on, and the derived revocation list."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enrollment.revocation import RevokedNode
from populi_peer.core.cluster_state import (
    CertRevoked,
    IssuedToken,
    MemberRemoved,
    MemberStored,
    NameReleased,
    NodeForgotten,
    RegisterStored,
    SettingsStored,
    TokenConsumed,
    TokenRevoked,
    VotersStored,
    cert_revocation_item,
    consumption_item,
    decode,
    issued_token_item,
    member_item,
    member_removal_item,
    name_release_item,
    node_revocation_item,
    revocation_content,
    settings_item,
    token_revocation_item,
)
from populi_peer.core.hlc import Hlc
from populi_peer.core.lifecycle import initial_lifecycle
from populi_peer.core.membership import Member
from populi_peer.core.registers import LIFECYCLE, MEMBER, RegisterWrite, Stamp
from populi_peer.core.replication import (
    Entry,
    Item,
    RecordRefused,
    RecordSet,
    SetElement,
    WriteId,
    bootstrap_voters,
    check_proposal,
)
from populi_peer.errors import BadRequest

ident = st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)
ms = st.integers(0, 2**53)
stamps = st.builds(
    Stamp, term=st.integers(0, 50), hlc=st.builds(Hlc, ms, st.integers(0, 9)), writer=ident
)
members = st.builds(
    Member,
    id=ident,
    kind=st.sampled_from(["node", "operator"]),
    name=ident,
    public_key=text,
    roles=st.lists(ident, max_size=3).map(tuple),
    addresses=st.lists(text, max_size=3).map(tuple),
    cert_serial=text,
    cert_not_after_ms=ms,
    joined_ms=ms,
    token_id=text,
    updated_ms=ms,
)
issued = st.builds(
    IssuedToken,
    token_id=ident,
    digest=text,
    roles=st.lists(ident, max_size=3, unique=True).map(lambda r: tuple(sorted(r))),
    name=st.none() | ident,
    uses=st.integers(1, 100),
    not_before_ms=ms,
    expires_ms=ms,
    created_ms=ms,
    created_by=ident,
)
#: Node names (and ids, serials) the revocation list accepts: a revoked node is the list's
#: own entry, checked as it is built.
node_names = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
revoked_nodes = st.builds(
    RevokedNode,
    node_id=node_names,
    name=node_names,
    reason=text.filter(str.isprintable),
    revoked_ms=st.integers(0, 2**53 - 1),
    cert_serials=st.lists(node_names, max_size=3, unique=True).map(lambda s: tuple(sorted(s))),
)


def wire(item: Item) -> Item:
    """``item`` after a trip through the wire form of an entry."""
    return Entry.from_json(Entry(WriteId(3, 1), item).to_json()).item


def register_write(
    attribute: str, value: dict[str, object] | None, *, node: str = "n1", reason: str = ""
) -> RegisterWrite:
    """The leader's write of ``node``'s register ``attribute`` at term 1."""
    return RegisterWrite(
        node_id=node,
        attribute=attribute,
        value=value,
        stamp=Stamp(1, Hlc(1, 0), "cp"),
        writer_class="leader",
        actor="cp",
        reason=reason,
        at_wall_ms=1,
    )


def node_tombstone(*, at_ms: int, reason: str) -> RegisterWrite:
    """The operator's deletion of node n1 (its lifecycle's tombstone) at ``at_ms``."""
    return RegisterWrite(
        node_id="n1",
        attribute=LIFECYCLE,
        value=None,
        stamp=Stamp(1, Hlc(at_ms, 0), "op"),
        writer_class="operator",
        actor="op",
        reason=reason,
        at_wall_ms=at_ms,
    )


@given(members, st.none() | text, stamps, st.sampled_from(["leader", "operator"]))
def test_a_member_record_round_trips(
    member: Member, certificate: str | None, stamp: Stamp, writer: str
) -> None:
    item = member_item(
        member,
        certificate=certificate,
        stamp=stamp,
        writer_class=writer,  # type: ignore[arg-type]
        actor="op",
        reason="joined",
        at_wall_ms=5,
    )
    assert (item.node_id, item.attribute) == (member.id, MEMBER)
    assert decode(wire(item)) == MemberStored(member, certificate)


@given(ident, stamps)
def test_a_member_removal_round_trips(principal: str, stamp: Stamp) -> None:
    item = member_removal_item(
        principal, stamp=stamp, writer_class="leader", actor="cp", reason="", at_wall_ms=0
    )
    assert decode(wire(item)) == MemberRemoved(principal)


@given(issued, stamps)
def test_an_issued_token_round_trips(token: IssuedToken, stamp: Stamp) -> None:
    assert decode(wire(issued_token_item(token, stamp=stamp))) == token


@given(ident, ms, ident, stamps)
def test_a_token_revocation_round_trips(token_id: str, at: int, actor: str, stamp: Stamp) -> None:
    revoked = TokenRevoked(token_id, at, actor)
    assert decode(wire(token_revocation_item(revoked, stamp=stamp))) == revoked


@given(ident, st.integers(1, 10**6), ident, stamps)
def test_a_token_use_round_trips(token_id: str, use: int, node: str, stamp: Stamp) -> None:
    consumed = TokenConsumed(token_id, use, node)
    item = consumption_item(consumed, stamp=stamp)
    assert item.key == f"{token_id}/{use}"
    assert item.value == {"consumer": node}  # the consumer only: a retry compares equal
    assert decode(wire(item)) == consumed


@given(revoked_nodes, stamps)
def test_a_node_revocation_round_trips(revoked: RevokedNode, stamp: Stamp) -> None:
    assert decode(wire(node_revocation_item(revoked, stamp=stamp))) == revoked


@given(ident, ident, stamps)
def test_a_certificate_revocation_round_trips(serial: str, node: str, stamp: Stamp) -> None:
    revoked = CertRevoked(serial, node)
    assert decode(wire(cert_revocation_item(revoked, stamp=stamp))) == revoked


@given(ident, ident, ms, stamps)
def test_a_name_release_round_trips(node: str, name: str, at: int, stamp: Stamp) -> None:
    released = NameReleased(node, name, at)
    assert decode(wire(name_release_item(released, stamp=stamp))) == released


@given(st.integers(0, 100), st.integers(0, 100), text)
def test_a_settings_record_round_trips(serial: int, term: int, signed: str) -> None:
    item = settings_item(serial=serial, term=term, text=signed, body={"x": 1})
    assert decode(wire(item)) == SettingsStored(serial, signed)


def test_the_voter_record_and_plain_registers_pass_through() -> None:
    voters = bootstrap_voters(["a"], "signed").item
    assert decode(voters) == VotersStored(voters)  # type: ignore[arg-type]
    lifecycle = register_write(
        LIFECYCLE, initial_lifecycle(now_wall_ms=1, actor="cp").to_json(), reason="joined"
    )
    assert decode(lifecycle) == RegisterStored(lifecycle)
    tombstone = node_tombstone(at_ms=2, reason="gone")
    assert decode(tombstone) == NodeForgotten(tombstone)


# -- malformed items ----------------------------------------------------------------------


def member_write(value: dict[str, object], node: str = "n1") -> RegisterWrite:
    return register_write(MEMBER, value, node=node)


MEMBER_N1 = Member("n1", "node", "box", "pk", ("worker",), (), "", 0, 0, "t", 0)


def test_a_member_register_needs_a_member_record_or_a_removal() -> None:
    with pytest.raises(BadRequest, match="member record"):
        member_write({"name": "box"})
    with pytest.raises(BadRequest, match="only lifecycle has tombstones"):
        register_write(MEMBER, None)


def test_a_member_record_about_another_principal_is_refused() -> None:
    body = MEMBER_N1.to_json() | {"token_id": "t"}
    with pytest.raises(BadRequest, match="stored as the register of 'n2'") as caught:
        decode(member_write(body, node="n2"))
    assert caught.value.code == "bad_record"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"kind": "robot"}, "kind must be"),
        ({"roles": "worker"}, "roles"),
        ({"cert_not_after_ms": "soon"}, "cert_not_after_ms"),
        ({"token_id": None}, "token_id"),
    ],
)
def test_a_malformed_member_record_is_refused_naming_the_field(
    change: dict[str, object], reason: str
) -> None:
    body = MEMBER_N1.to_json() | {"token_id": "t"} | change
    with pytest.raises(BadRequest, match=reason) as caught:
        decode(member_write(body))
    assert caught.value.code == "bad_record"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"name": "Box"}, "field name"),
        ({"reason": "two\nlines"}, "field reason"),
        ({"cert_serials": ["s1", "s1"]}, "twice"),
        ({"revoked_ms": "soon"}, "revoked_ms"),
    ],
)
def test_a_node_revocation_the_list_would_refuse_is_refused_naming_the_field(
    change: dict[str, object], reason: str
) -> None:
    """A replicated revocation is the list's own entry: what the signed list would refuse
    does not decode (one ``bad_record`` line), rather than failing the derived list."""
    body = {"name": "box", "reason": "stolen", "revoked_ms": 1, "cert_serials": []} | change
    element = SetElement("revoked_nodes", "n1", body, Stamp(1, Hlc(1, 0), "cp"))
    with pytest.raises(BadRequest, match=reason) as caught:
        decode(element)
    assert caught.value.code == "bad_record"
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("key", ["t1", "t1/", "t1/0", "t1/01", "/1", "t1/x"])
def test_a_consumed_token_key_must_be_token_slash_use(key: str) -> None:
    element = SetElement("consumed_tokens", key, {"consumer": "n1"}, Stamp(1, Hlc(1, 0), "cp"))
    with pytest.raises(BadRequest, match="<token>/<use>"):
        decode(element)


def test_a_token_id_with_the_separator_is_refused() -> None:
    with pytest.raises(BadRequest, match="without '/'"):
        consumption_item(TokenConsumed("a/b", 1, "n1"), stamp=Stamp(1, Hlc(1, 0), "cp"))
    with pytest.raises(BadRequest, match="positive integer"):
        consumption_item(TokenConsumed("ab", 0, "n1"), stamp=Stamp(1, Hlc(1, 0), "cp"))


def test_an_issued_token_needs_at_least_one_use() -> None:
    element = issued_token_item(
        IssuedToken("t1", "d", ("worker",), None, 1, 0, 1, 0, "op"), stamp=Stamp(1, Hlc(1, 0), "a")
    )
    broken = SetElement("issued_tokens", "t1", element.value | {"uses": 0}, element.stamp)
    with pytest.raises(BadRequest, match="'uses' must be at least 1"):
        decode(broken)


# -- the merge rules the encodings rely on ------------------------------------------------


def test_a_second_consumer_of_one_token_use_is_refused_and_a_retry_is_not() -> None:
    first = consumption_item(TokenConsumed("t1", 1, "n1"), stamp=Stamp(4, Hlc(10, 0), "cp"))
    records, _ = RecordSet().merge([Entry(WriteId(4, 1), first)])
    retry = consumption_item(TokenConsumed("t1", 1, "n1"), stamp=Stamp(4, Hlc(20, 0), "cp"))
    check_proposal(records, retry, term=4, now_wall_ms=20, max_skew_ms=1000)
    other = consumption_item(TokenConsumed("t1", 1, "n2"), stamp=Stamp(4, Hlc(20, 0), "cp"))
    with pytest.raises(RecordRefused) as caught:
        check_proposal(records, other, term=4, now_wall_ms=20, max_skew_ms=1000)
    assert caught.value.code == "token_already_consumed"
    # The next use of a multi-use token is another key: free.
    second = consumption_item(TokenConsumed("t1", 2, "n2"), stamp=Stamp(4, Hlc(20, 0), "cp"))
    check_proposal(records, second, term=4, now_wall_ms=20, max_skew_ms=1000)


def test_a_node_tombstone_takes_its_member_record_along() -> None:
    member = member_item(
        MEMBER_N1,
        certificate=None,
        stamp=Stamp(1, Hlc(1, 0), "cp"),
        writer_class="leader",
        actor="cp",
        reason="joined",
        at_wall_ms=1,
    )
    tombstone = node_tombstone(at_ms=0, reason="deleted")
    records, _ = RecordSet().merge([Entry(WriteId(1, 2), tombstone), Entry(WriteId(1, 1), member)])
    assert [decode(e.item) for e in records.entries()] == [NodeForgotten(tombstone)]


# -- the derived revocation list ----------------------------------------------------------


def test_the_revocation_list_is_derived_from_the_sets() -> None:
    a = RevokedNode("na", "box", "stolen", 10, ("s1",))
    b = RevokedNode("nb", "box", "retired", 20, ())
    c = RevokedNode("nc", "lab", "retired", 30, ())
    content = revocation_content([c, a, b], [NameReleased("na", "box", 40)])
    assert content.serial == 4
    assert content.issued_ms == 40
    assert [n.node_id for n in content.revoked] == ["na", "nb", "nc"]
    # "box" is still held by nb's block; only na's was released.
    assert content.blocked_names == ("box", "lab")
    both = revocation_content(
        [a, b, c], [NameReleased("na", "box", 40), NameReleased("nb", "box", 41)]
    )
    assert both.blocked_names == ("lab",)
    assert both.serial == 5
    assert revocation_content([], []).serial == 0


@given(st.lists(revoked_nodes, max_size=6, unique_by=lambda n: n.node_id), st.randoms())
def test_the_derived_list_does_not_depend_on_the_order(
    nodes: list[RevokedNode], rnd: object
) -> None:
    shuffled = list(nodes)
    rnd.shuffle(shuffled)  # type: ignore[attr-defined]
    released = [NameReleased(n.node_id, n.name, 1) for n in nodes[:2]]
    assert revocation_content(nodes, released) == revocation_content(shuffled, released[::-1])
    # Every added element makes the serial grow.
    assert revocation_content(nodes, released).serial == len(nodes) + len(released)

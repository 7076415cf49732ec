"""Announcements, sightings and the address book (populi_peer/discovery), no network."""

from __future__ import annotations

from typing import Any

import pytest
import trio

from populi_peer.core.addresses import Cidrs, LocalAddress
from populi_peer.discovery import Announcement, Sighting, cluster_digest
from populi_peer.discovery._announce import parse_sighting
from populi_peer.discovery._mdns import DiscoveryError, MdnsBridge, Seen
from populi_peer.discovery.browse import recipients_seen
from populi_peer.discovery.service import AddressBook, DiscoveryService, Sightings, call_first
from populi_peer.errors import AgentUnavailable, BadRequest, PeerError, PeerIdentityError

NODE = "n-abcdefghijklmnop"
OTHER = "n-qrstuvwxyz234567"
OURS = cluster_digest("c-ours")
THEIRS = cluster_digest("c-theirs")


def test_the_txt_record_round_trips_and_holds_no_secret() -> None:
    announcement = Announcement(
        node_id=NODE, cluster_digest=OURS, port=7431, addresses=("10.77.0.2",), roles=("worker",)
    )
    txt = announcement.txt()
    assert txt == {
        "txtvers": "1",
        "proto": "1",
        "cluster": OURS,
        "node": NODE,
        "roles": "worker",
    }
    assert "c-ours" not in repr(txt)  # the cluster is named by its digest only
    # zeroconf hands properties over as bytes
    sighting = parse_sighting(
        instance=announcement.name,
        properties={k.encode(): v.encode() for k, v in txt.items()},
        ips=["10.77.0.2", "fe80::1"],
        port=7431,
    )
    assert sighting == Sighting(
        node_id=NODE,
        cluster_digest=OURS,
        addresses=("10.77.0.2:7431",),  # link-local left out: it needs a zone
        roles=("worker",),
        instance="populi-n-abcdefghijklmnop._populi._tcp.local.",
    )
    assert sighting.relation(OURS) == "ours"
    assert sighting.relation(THEIRS) == "foreign"
    assert sighting.relation(None) == "unknown"
    assert sighting.to_json(THEIRS)["cluster"] == "foreign"


def test_cluster_digest_is_stable_and_distinct() -> None:
    assert cluster_digest("c-ours") == cluster_digest("c-ours")
    assert cluster_digest("c-ours") != cluster_digest("c-theirs")
    assert len(OURS) == 32 and int(OURS, 16) >= 0


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"txtvers": "2"}, "txtvers"),
        ({"node": "root"}, "not a node id"),
        ({"cluster": "c-ours"}, "not a cluster digest"),
        ({"proto": "one"}, "not a version"),
        ({"roles": "Worker;rm -rf"}, "roles"),
    ],
)
def test_malformed_announcements_are_refused_in_one_line(
    change: dict[str, str], problem: str
) -> None:
    txt: dict[Any, Any] = {
        "txtvers": "1",
        "proto": "1",
        "cluster": OURS,
        "node": NODE,
        "roles": "",
        **change,
    }
    with pytest.raises(BadRequest, match=problem) as caught:
        parse_sighting(instance="x", properties=txt, ips=["10.0.0.1"], port=7431)
    assert caught.value.code == "bad_announcement"
    assert "\n" not in str(caught.value)


def test_an_announcement_needs_a_usable_address_and_port() -> None:
    txt = {"txtvers": "1", "proto": "1", "cluster": OURS, "node": NODE}
    with pytest.raises(BadRequest, match="no usable address"):
        parse_sighting(instance="x", properties=txt, ips=["fe80::1", "junk"], port=7431)
    with pytest.raises(BadRequest, match="port"):
        parse_sighting(instance="x", properties=txt, ips=["10.0.0.1"], port=None)


def sighting(
    node: str, digest: str, *addresses: str, source: Any = "mdns", verified: bool = False
) -> Sighting:
    return Sighting(
        node_id=node, cluster_digest=digest, addresses=addresses, source=source, verified=verified
    )


def test_sightings_follow_the_events() -> None:
    sightings = Sightings()
    seen = sighting(NODE, OURS, "10.77.0.2:7431")
    sightings.note(Seen("seen", "a", seen))
    assert sightings.all() == [seen]
    sightings.note(Seen("bad", "b", problem="announcement 'b': no usable address"))
    assert sightings.bad_announcements == 1 and "no usable" in sightings.last_problem
    sightings.note(Seen("gone", "a"))
    assert sightings.all() == []


def test_the_address_book_fills_in_from_sightings_of_our_cluster_only() -> None:
    local = (LocalAddress("eth0", "10.77.0.1", 24),)
    sightings = Sightings()
    book = AddressBook(local=local, cidrs=Cidrs(), sightings=sightings, cluster_digest=OURS)
    advertised = ["203.0.113.7:7431", "10.77.0.2:7431"]
    assert book.candidates(NODE, advertised) == ["10.77.0.2:7431", "203.0.113.7:7431"]
    # The node moved on the LAN: its announcement gives the new address (tried after).
    sightings.note(Seen("seen", "a", sighting(NODE, OURS, "10.77.0.12:7431")))
    # A foreign cluster announcing the same node id, and an unverified static peer that
    # claims our cluster: neither is an address to try.
    sightings.note(Seen("seen", "b", sighting(NODE, THEIRS, "10.77.0.66:7431")))
    sightings.note_static(
        "10.77.0.67:7431", sighting(NODE, OURS, "10.77.0.67:7431", source="static")
    )
    assert book.candidates(NODE, advertised) == [
        "10.77.0.2:7431",
        "203.0.113.7:7431",
        "10.77.0.12:7431",
    ]
    sightings.note_static(
        "10.8.0.2:7431", sighting(NODE, OURS, "10.8.0.2:7431", source="static", verified=True)
    )
    assert "10.8.0.2:7431" in book.candidates(NODE, advertised)
    assert book.candidates(OTHER, []) == []


async def test_call_first_moves_on_only_when_nothing_was_sent() -> None:
    tried: list[str] = []

    async def call(address: str) -> str:
        tried.append(address)
        await trio.lowlevel.checkpoint()
        if address == "dead":
            raise AgentUnavailable("cannot connect", code="peer_unreachable")
        if address == "impostor":
            raise PeerIdentityError("not the node", code="peer_identity_mismatch")
        if address == "slow":
            raise PeerError("did not answer in time", code="peer_timeout")
        return address

    assert await call_first(["dead", "impostor", "good"], call) == "good"
    assert tried == ["dead", "impostor", "good"]
    tried.clear()
    # A timeout may have delivered the request: never sent again elsewhere.
    with pytest.raises(PeerError, match="in time"):
        await call_first(["slow", "good"], call)
    assert tried == ["slow"]
    with pytest.raises(AgentUnavailable):
        await call_first(["dead", "dead"], call)


def test_recipients_seen_are_the_tokens_recipients_of_its_cluster() -> None:
    class Token:
        cluster_id = "c-ours"
        recipients = (NODE,)

    seen = [
        sighting(NODE, OURS, "10.77.0.11:7431"),
        sighting(NODE, THEIRS, "10.77.0.66:7431"),  # someone else's cluster: never
        sighting(OTHER, OURS, "10.77.0.3:7431"),  # a member, but not a recipient
    ]
    assert recipients_seen(Token(), seen) == ["10.77.0.11:7431"]  # type: ignore[arg-type]


async def test_discovery_off_starts_nothing() -> None:
    service = DiscoveryService(
        enabled=False, sightings=Sightings(), announcement=None, interfaces=["10.77.0.1"]
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
    status = service.status_json(OURS)
    assert status["mdns"] == "off" and status["reason"] == "discovery.enabled = false"


async def test_a_node_without_a_lan_address_does_not_announce() -> None:
    service = DiscoveryService(
        enabled=True, sightings=Sightings(), announcement=None, interfaces=()
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
    assert service.status_json()["reason"] == "this node advertises no LAN address"


def test_the_bridge_needs_an_interface() -> None:
    with pytest.raises(DiscoveryError) as caught:
        MdnsBridge(interfaces=[], on_event=lambda event: None)
    assert caught.value.code == "no_interface"

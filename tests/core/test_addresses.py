"""Which addresses a node advertises and which of a peer's it uses (core/addresses.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from populi_peer.core.addresses import (
    MAX_ADVERTISED,
    Cidrs,
    LocalAddress,
    LocalRoute,
    at_least_as_reachable,
    cluster_is_overlay,
    effective_overlay_cidrs,
    plan_advertise,
    rank_addresses,
    tunnel_networks,
)

LO = LocalAddress("lo", "127.0.0.1", 8)
ETH = LocalAddress("eth0", "192.168.1.20", 24)
WG = LocalAddress("wg0", "10.8.0.2", 24, tunnel=True)
DOCKER = LocalAddress("docker0", "172.17.0.1", 16)
LINK6 = LocalAddress("eth0", "fe80::1", 64)
TWO_CARDS = (LO, ETH, DOCKER, WG, LINK6)


def cidrs_of(local: tuple[LocalAddress, ...], routes: tuple[LocalRoute, ...] = ()) -> Cidrs:
    return Cidrs(overlay=tuple(effective_overlay_cidrs([], tunnel_networks(local, routes))))


def test_tunnel_networks_come_from_tunnel_prefixes_and_routes() -> None:
    # wireguard-go with a /32 address and a route for the overlay through wg0
    wg32 = LocalAddress("wg0", "10.8.0.2", 32, tunnel=True)
    routes = (
        LocalRoute("10.8.0.0/24", "wg0"),
        LocalRoute("0.0.0.0/0", "wg0"),  # a full-tunnel VPN: not "the Internet is overlay"
        LocalRoute("192.168.1.0/24", "eth0"),
    )
    assert tunnel_networks((ETH, wg32), routes) == ("10.8.0.2/32", "10.8.0.0/24")
    assert tunnel_networks(TWO_CARDS) == ("10.8.0.0/24",)
    assert tunnel_networks((LO, ETH, DOCKER)) == ()


def test_effective_overlay_cidrs_keep_the_operators_first() -> None:
    assert effective_overlay_cidrs(["10.8.0.0/16"], ["10.8.0.0/24", "10.42.0.0/24"]) == [
        "10.8.0.0/16",
        "10.42.0.0/24",
    ]


def test_a_tunnel_network_is_overlay_without_configuration() -> None:
    cidrs = cidrs_of(TWO_CARDS)
    assert cidrs.scope_of("10.8.0.9") == "overlay"
    assert Cidrs().scope_of("10.8.0.9") == "lan"  # what it would be without the tunnel
    assert cidrs.scope_of("192.168.1.9") == "lan"
    assert cidrs.scope_of("gpu.example.net") == "overlay"


def test_cluster_is_overlay_by_the_control_planes_address() -> None:
    cidrs = cidrs_of(TWO_CARDS)
    assert cluster_is_overlay(["10.8.0.1:7431"], TWO_CARDS, cidrs)
    assert cluster_is_overlay(["192.168.1.1:7431", "10.8.0.1:7431"], TWO_CARDS, cidrs)
    assert not cluster_is_overlay(["192.168.1.1:7431"], TWO_CARDS, cidrs)
    assert cluster_is_overlay(["100.100.1.1:7431"], (LO, ETH), Cidrs())  # Tailscale range
    # The control plane itself (nothing to look at but loopback): its own interfaces.
    assert cluster_is_overlay(["127.0.0.1:7431"], TWO_CARDS, cidrs)
    assert cluster_is_overlay([], TWO_CARDS, cidrs)
    assert not cluster_is_overlay([], (LO, ETH, DOCKER), Cidrs())
    # A host name says nothing about the path: the interfaces decide.
    assert not cluster_is_overlay(["cp.example.net:7431"], (LO, ETH), Cidrs())


def test_two_cards_advertise_the_overlay_first_in_an_overlay_cluster() -> None:
    """A node listening on every interface, with a LAN card, a Docker bridge and a
    WireGuard tunnel, advertises its overlay address first in an overlay cluster and
    its LAN address first otherwise; never loopback, link-local or the Docker bridge."""
    cidrs = cidrs_of(TWO_CARDS)
    overlay = plan_advertise(
        listen=("0.0.0.0", 7431), local=TWO_CARDS, cidrs=cidrs, overlay_cluster=True
    )
    assert overlay.addresses == ("10.8.0.2:7431", "192.168.1.20:7431")
    assert overlay.scopes == ("overlay", "lan")
    assert overlay.of_scope("overlay") == ("10.8.0.2:7431",)
    lan = plan_advertise(
        listen=("0.0.0.0", 7431), local=TWO_CARDS, cidrs=cidrs, overlay_cluster=False
    )
    assert lan.addresses == ("192.168.1.20:7431", "10.8.0.2:7431")
    assert lan.to_json()["by_scope"] == {"lan": ["192.168.1.20:7431"], "overlay": ["10.8.0.2:7431"]}


def test_an_overlay_cluster_leaves_public_addresses_out() -> None:
    """A rented box: a public address on eth0 and WireGuard. In an overlay cluster it
    advertises its overlay address only (its API port is closed on the public side);
    in a cluster without an overlay, the public address is all it has to offer."""
    box = (LO, LocalAddress("eth0", "198.18.0.2", 24), WG)
    cidrs = cidrs_of(box)
    assert plan_advertise(
        listen=("0.0.0.0", 7431), local=box, cidrs=cidrs, overlay_cluster=True
    ).addresses == ("10.8.0.2:7431",)
    public = (LO, LocalAddress("eth0", "198.18.0.2", 24))
    assert plan_advertise(listen=("0.0.0.0", 7431), local=public).addresses == ("198.18.0.2:7431",)


def test_configured_and_specific_addresses_win() -> None:
    cidrs = cidrs_of(TWO_CARDS)
    specific = plan_advertise(listen=("192.168.1.20", 7431), local=TWO_CARDS, cidrs=cidrs)
    assert specific.addresses == ("192.168.1.20:7431",)
    per_scope = plan_advertise(
        listen=("0.0.0.0", 7431),
        advertise_lan=["192.168.1.20:7431"],
        advertise_overlay=["10.8.0.2:7431"],
        local=TWO_CARDS,
        cidrs=cidrs,
        overlay_cluster=True,
    )
    assert per_scope.addresses == ("10.8.0.2:7431", "192.168.1.20:7431")
    generic = plan_advertise(
        listen=("0.0.0.0", 7431),
        advertise=["gpu.example.net:7431"],
        advertise_overlay=["10.8.0.2:7431"],
        local=TWO_CARDS,
        cidrs=cidrs,
    )
    assert generic.addresses == ("gpu.example.net:7431", "10.8.0.2:7431")
    assert plan_advertise(listen=("0.0.0.0", 0), local=TWO_CARDS).addresses == ()
    assert plan_advertise(listen=("127.0.0.1", 7431)).addresses == ("127.0.0.1:7431",)


def test_a_peer_is_reached_by_the_address_of_the_nearest_scope() -> None:
    """The same peer (overlay 10.8.0.3, LAN 192.168.1.30), seen from three machines."""
    peer = ["10.8.0.3:7431", "192.168.1.30:7431"]
    beside = (LO, ETH, WG)  # same LAN, on the overlay too
    assert rank_addresses(peer, local=beside, cidrs=cidrs_of(beside)) == [
        ("lan", "192.168.1.30:7431"),
        ("overlay", "10.8.0.3:7431"),
    ]
    rented = (LO, LocalAddress("eth0", "192.168.7.5", 24), WG)  # another LAN, same overlay
    assert rank_addresses(peer, local=rented, cidrs=cidrs_of(rented)) == [
        ("overlay", "10.8.0.3:7431"),
        ("lan", "192.168.1.30:7431"),
    ]
    # Knowing nothing about this machine: the peer's own order (first = its URL).
    assert [a for _, a in rank_addresses(peer)] == peer


def test_an_address_that_is_ours_is_tried_last_and_loopback_first() -> None:
    cidrs = cidrs_of(TWO_CARDS)
    peer = ["172.17.0.1:7431", "203.0.113.9:7431", "192.168.1.30:7431"]
    assert [a for _, a in rank_addresses(peer, local=TWO_CARDS, cidrs=cidrs)] == [
        "192.168.1.30:7431",
        "203.0.113.9:7431",
        "172.17.0.1:7431",
    ]
    assert rank_addresses(["10.8.0.3:7431", "127.0.0.1:7000"])[0] == ("local", "127.0.0.1:7000")


def test_a_node_moves_only_to_an_address_at_least_as_near() -> None:
    """A control plane that prefers its overlay address does not move a node beside it on
    the LAN off the LAN address; one on another LAN takes the overlay address."""
    lan, overlay = "192.168.1.30:7431", "10.8.0.3:7431"
    beside = (LO, ETH, WG)
    assert not at_least_as_reachable(overlay, lan, local=beside, cidrs=cidrs_of(beside))
    assert at_least_as_reachable(lan, overlay, local=beside, cidrs=cidrs_of(beside))
    rented = (LO, LocalAddress("eth0", "192.168.7.5", 24), WG)
    assert at_least_as_reachable(overlay, lan, local=rented, cidrs=cidrs_of(rented))
    # Equally near (knowing nothing about this machine): the new one is taken.
    assert at_least_as_reachable(overlay, lan) and at_least_as_reachable(lan, overlay)


@given(st.lists(st.sampled_from([a.ip for a in TWO_CARDS] + ["10.8.0.7", "192.168.1.8"])))
def test_at_least_as_reachable_agrees_with_the_ranking(ips: list[str]) -> None:
    """``at_least_as_reachable(a, b)`` is ``a`` coming first when the two are ranked."""
    cidrs = cidrs_of(TWO_CARDS)
    for a in ips:
        for b in ips:
            first = rank_addresses([f"{a}:1", f"{b}:2"], local=TWO_CARDS, cidrs=cidrs)[0][1]
            assert at_least_as_reachable(f"{a}:1", f"{b}:2", local=TWO_CARDS, cidrs=cidrs) == (
                first == f"{a}:1"
            )


@given(st.lists(st.sampled_from([a.ip for a in TWO_CARDS] + ["10.8.0.7", "192.168.1.8"])))
def test_plans_are_bounded_and_unique(ips: list[str]) -> None:
    plan = plan_advertise(listen=("0.0.0.0", 1), advertise=[f"{ip}:1" for ip in ips])
    assert len(plan.addresses) <= MAX_ADVERTISED
    assert len(set(plan.addresses)) == len(plan.addresses)
    ranked = rank_addresses(list(plan.addresses), local=TWO_CARDS, cidrs=cidrs_of(TWO_CARDS))
    assert sorted(a for _, a in ranked) == sorted(plan.addresses)

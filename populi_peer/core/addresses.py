"""Which addresses a node advertises, and which of a peer's addresses a node uses
(docs/wan.md, "Addresses"; ADR 0014).

The failures this module exists for: a node that advertises a random network card (a
Docker bridge, the LAN of a rented box) instead of the overlay address its peers can
reach; a node that uses a peer's LAN address from the other side of the Internet.

**What this machine has** comes in as :class:`LocalAddress` rows (the shell reads the
interfaces and the routing table): each address with its interface, prefix and whether
the interface is a layer-3 tunnel (``tun``: WireGuard, wireguard-go, Nebula, Tailscale).
The networks behind a tunnel (its own prefix, and the routes through it) are overlay
networks, known without configuration: :func:`tunnel_networks` adds them to the
operator's ``overlay_cidrs`` (:func:`effective_overlay_cidrs`), so a Nebula
``10.42.0.0/24`` or a WireGuard ``10.8.0.0/24`` is judged ``overlay`` although it lies in
RFC 1918 space.

**Advertising** (:func:`plan_advertise`): the addresses an operator configured, per scope
(``node.advertise_lan`` / ``node.advertise_overlay``) or not (``node.advertise``), win.
Without any, a node that listens on one address advertises that one; a node that listens
on every interface (``0.0.0.0`` / ``::``) advertises each interface address (loopback,
IPv6 link-local and container bridges left out: they mean nothing to another machine),
with the listen port. The order is the node's preference, and the first address is its
URL: overlay addresses first when the cluster is an overlay cluster
(:func:`cluster_is_overlay`), tunnel addresses first among them, LAN first otherwise. In
an overlay cluster a public address (overlay scope, but not on a tunnel) is left out:
the overlay is how that cluster crosses the Internet, and a public address is where the
firewall is (runbooks/overlay-*.md close the API port there).

**An overlay cluster** is one whose control plane has an address on an overlay: a
joining node looks at the token's contact addresses, a running node at the control
plane's URL and advertised addresses (an overlay address among them makes it an overlay
cluster even for a node that reaches the control plane over a LAN they share); the
control plane itself, having no one to look at, at its own interfaces (an overlay
interface makes it an overlay cluster).

**Picking a peer's address** (:func:`rank_addresses`): a peer lists several addresses;
this node orders them by how sure it is to reach each one, then by the peer's own order:

1. loopback (the peer is on this machine);
2. an address on the same link as one of this node's own non-tunnel interfaces;
3. an address inside one of this node's overlay networks (it is on that overlay);
4. any other address, in the peer's order (routed, public, host names);
5. an address that is one of this node's own (a container bridge address every host
   has, say): surely not the peer.

The caller tries them in that order and takes the first that answers *as the node it
meant to reach* (TLS proves it: docs/adr/0009). Scope, for timings and policy, is still
that of the address used (:func:`~populi_peer.core.scope.path_scope`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from populi_peer.core.scope import IpAddress, IpNetwork, Scope, parse_address, path_scope
from populi_peer.errors import BadRequest

#: At most this many addresses are advertised (the heartbeat and join limits).
MAX_ADVERTISED: Final = 8
#: Interfaces of container and VM bridges: every Docker host has ``172.17.0.1`` on
#: ``docker0``, so such an address names a different machine on every host. Never
#: advertised; a peer address that is one of ours is tried last.
VIRTUAL_INTERFACE_PREFIXES: Final = (
    "docker",
    "br-",
    "veth",
    "virbr",
    "vnet",
    "cni",
    "flannel",
    "cali",
    "lxc",
    "lxd",
    "podman",
    "kube",
    "incus",
)


@dataclass(frozen=True, slots=True)
class LocalAddress:
    """One address of one of this machine's interfaces."""

    interface: str
    ip: str
    prefix_len: int
    tunnel: bool = False

    @property
    def address(self) -> IpAddress:
        return ipaddress.ip_address(self.ip)

    @property
    def network(self) -> IpNetwork:
        return ipaddress.ip_network(f"{self.ip}/{self.prefix_len}", strict=False)

    @property
    def usable(self) -> bool:
        """Worth telling another machine: not loopback, link-local or unspecified, and not
        on a container or VM bridge (:data:`VIRTUAL_INTERFACE_PREFIXES`)."""
        ip = self.address
        if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
            return False
        return not self.interface.startswith(VIRTUAL_INTERFACE_PREFIXES)


@dataclass(frozen=True, slots=True)
class LocalRoute:
    """A route of this machine's main table: destination network and interface."""

    network: str
    interface: str


def tunnel_networks(
    addresses: Iterable[LocalAddress], routes: Iterable[LocalRoute] = ()
) -> tuple[str, ...]:
    """The overlay networks this machine is on: the prefix of every tunnel interface
    address and every route through a tunnel interface (a default route through one, a
    full-tunnel VPN, is left out: it would make the whole Internet "overlay")."""
    tunnels = {a.interface for a in addresses if a.tunnel}
    found: list[str] = []
    candidates = [a.network for a in addresses if a.tunnel and a.usable]
    for route in routes:
        if route.interface in tunnels:
            try:
                candidates.append(ipaddress.ip_network(route.network, strict=False))
            except ValueError:
                continue
    for network in candidates:
        if network.prefixlen == 0 or network.is_loopback or network.is_link_local:
            continue
        text = str(network)
        if text not in found:
            found.append(text)
    return tuple(found)


def effective_overlay_cidrs(configured: Sequence[str], detected: Sequence[str]) -> list[str]:
    """The operator's ``overlay_cidrs`` followed by the detected tunnel networks that
    none of them already covers."""
    out = list(configured)
    known = [ipaddress.ip_network(c, strict=False) for c in configured]
    for cidr in detected:
        network = ipaddress.ip_network(cidr, strict=False)
        if any(
            network.version == k.version and network.subnet_of(k)  # type: ignore[arg-type]
            for k in known
        ):
            continue
        known.append(network)
        out.append(str(network))
    return out


@dataclass(frozen=True, slots=True)
class Cidrs:
    """The operator's CIDR lists (``[scope]``), overlay ones already effective."""

    lan: tuple[str, ...] = ()
    overlay: tuple[str, ...] = ()
    local: tuple[str, ...] = ()

    def scope_of(self, address: str) -> Scope:
        """The scope of the path to ``address``; a host name or anything unjudgeable
        counts as ``overlay`` (the most patient timings, the most guarded policy)."""
        try:
            return path_scope(
                address, lan_cidrs=self.lan, overlay_cidrs=self.overlay, local_cidrs=self.local
            )
        except BadRequest:
            return "overlay"


def _host_port(address: str) -> tuple[str, str | None]:
    text = address.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, port
    return text, None


def with_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def cluster_is_overlay(
    control_plane_addresses: Sequence[str],
    local: Sequence[LocalAddress],
    cidrs: Cidrs,
) -> bool:
    """Whether this node's cluster is an overlay cluster (module docstring): one of the
    control plane's addresses is overlay-scoped; or, with none that says anything (the
    control plane itself, or only loopback and wildcard addresses), this machine has an
    overlay interface address."""
    judged = False
    for address in control_plane_addresses:
        host, _ = _host_port(address)
        try:
            ip = parse_address(host)
        except BadRequest:
            continue  # a host name says nothing about the path
        if ip.is_loopback or ip.is_unspecified:
            continue
        judged = True
        if cidrs.scope_of(host) == "overlay":
            return True
    if judged:
        return False
    return any(a.usable and (a.tunnel or cidrs.scope_of(a.ip) == "overlay") for a in local)


@dataclass(frozen=True, slots=True)
class AdvertisePlan:
    """What a node tells others: its addresses in its order of preference (the first is
    its URL) and each one's scope as this node judges it."""

    addresses: tuple[str, ...]
    scopes: tuple[Scope, ...]
    overlay_cluster: bool

    def of_scope(self, scope: Scope) -> tuple[str, ...]:
        return tuple(a for a, s in zip(self.addresses, self.scopes, strict=True) if s == scope)

    def to_json(self) -> dict[str, object]:
        return {
            "addresses": list(self.addresses),
            "by_scope": {
                scope: list(self.of_scope(scope))
                for scope in ("local", "lan", "overlay")
                if self.of_scope(scope)
            },
            "overlay_cluster": self.overlay_cluster,
        }


def plan_advertise(
    *,
    listen: tuple[str, int],
    advertise: Sequence[str] = (),
    advertise_lan: Sequence[str] = (),
    advertise_overlay: Sequence[str] = (),
    local: Sequence[LocalAddress] = (),
    cidrs: Cidrs = Cidrs(),
    overlay_cluster: bool = False,
) -> AdvertisePlan:
    """The addresses to advertise (module docstring). ``listen`` is the bound address
    (host, port); port 0 is not known yet, and advertises nothing by itself."""
    host, port = listen
    preferred: tuple[Scope, ...] = (
        ("overlay", "lan", "local") if overlay_cluster else ("lan", "overlay", "local")
    )
    chosen: list[str] = list(advertise)
    configured_by_scope = {"lan": list(advertise_lan), "overlay": list(advertise_overlay)}
    if chosen or advertise_lan or advertise_overlay:
        for scope in preferred:
            chosen += configured_by_scope.get(scope, [])
    elif host not in ("0.0.0.0", "::", "") and port != 0:
        chosen = [with_port(host, port)]
    elif port != 0:
        usable = [a for a in local if a.usable and (host != "0.0.0.0" or a.address.version == 4)]
        if overlay_cluster:
            # The overlay is how this cluster crosses the Internet: a public address is
            # where the firewall is, not a way in.
            usable = [a for a in usable if a.tunnel or cidrs.scope_of(a.ip) != "overlay"]
        ranked = sorted(
            enumerate(usable),
            key=lambda item: (
                preferred.index(cidrs.scope_of(item[1].ip)),
                0 if item[1].tunnel else 1,
                item[0],
            ),
        )
        chosen = [with_port(a.ip, port) for _, a in ranked]
    unique: list[str] = []
    for address in chosen:
        if address not in unique:
            unique.append(address)
    unique = unique[:MAX_ADVERTISED]
    return AdvertisePlan(
        addresses=tuple(unique),
        scopes=tuple(cidrs.scope_of(_host_port(a)[0]) for a in unique),
        overlay_cluster=overlay_cluster,
    )


def _rank(address: str, local: Sequence[LocalAddress], cidrs: Cidrs) -> int:
    host, _ = _host_port(address)
    try:
        ip = parse_address(host)
    except BadRequest:
        return 3
    if ip.is_loopback:
        return 0
    if any(own.address == ip for own in local):
        return 4  # one of ours (a bridge address every host has): surely not the peer
    for own in local:
        if own.address.version != ip.version or not own.usable:
            continue
        if ip in own.network and not own.tunnel:
            return 1
    overlay = [
        ipaddress.ip_network(c, strict=False)
        for c in cidrs.overlay
        if ipaddress.ip_network(c, strict=False).version == ip.version
    ]
    on_overlay = any(ip in own.network for own in local if own.tunnel and own.usable) or (
        any(ip in network for network in overlay)
        and any(own.address in network for own in local for network in overlay)
    )
    if on_overlay:
        return 2
    return 3


def rank_addresses(
    addresses: Sequence[str], *, local: Sequence[LocalAddress] = (), cidrs: Cidrs = Cidrs()
) -> list[tuple[Scope, str]]:
    """A peer's ``addresses`` in the order to try them (module docstring), each with the
    scope of the path it would use; duplicates dropped."""
    seen: list[str] = []
    for address in addresses:
        if address not in seen:
            seen.append(address)
    ranked = sorted(enumerate(seen), key=lambda item: (_rank(item[1], local, cidrs), item[0]))
    return [(cidrs.scope_of(_host_port(a)[0]), a) for _, a in ranked]


def at_least_as_reachable(
    address: str, than: str, *, local: Sequence[LocalAddress] = (), cidrs: Cidrs = Cidrs()
) -> bool:
    """Whether ``address`` comes no later than ``than`` in :func:`rank_addresses`'s order:
    a node moves off an address it reaches a peer by only for one at least as near (a
    control plane that prefers its overlay address must not move a LAN-only node off
    the LAN address that works)."""
    return _rank(address, local, cidrs) <= _rank(than, local, cidrs)


__all__ = [
    "MAX_ADVERTISED",
    "VIRTUAL_INTERFACE_PREFIXES",
    "AdvertisePlan",
    "Cidrs",
    "LocalAddress",
    "LocalRoute",
    "at_least_as_reachable",
    "cluster_is_overlay",
    "effective_overlay_cidrs",
    "plan_advertise",
    "rank_addresses",
    "tunnel_networks",
    "with_port",
]

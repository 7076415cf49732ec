"""A short look around, without an agent: ``populi discover`` and a ``populi join`` whose
token addresses do not answer.

Browses ``_populi._tcp`` on this machine's LAN interfaces (never on a tunnel: mDNS does
not cross overlays) for a few seconds, and probes the static peers of the config at the
same time; stops early once ``enough`` says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import trio

from enrollment.tokens import JoinToken
from populi_peer.discovery._announce import Sighting, cluster_digest
from populi_peer.discovery._mdns import DiscoveryError, MdnsBridge
from populi_peer.discovery._static import probe_peer
from populi_peer.discovery.service import Sightings
from populi_peer.discovery.site import Site
from populi_peer.errors import PopuliError


@dataclass
class Look:
    """What a look around found, and what kept it from looking everywhere."""

    sightings: list[Sighting] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


async def look_around(
    *,
    site: Site,
    browse_s: float,
    static_peers: Sequence[str] = (),
    our_pin: str | None = None,
    timeout_s: float = 5.0,
    enough: Callable[[list[Sighting]], bool] | None = None,
) -> Look:
    look = Look(interfaces=site.lan_ips())
    sightings = Sightings()

    async def probe(address: str) -> None:
        try:
            sightings.note_static(
                address, await probe_peer(address, our_pin=our_pin, timeout_s=timeout_s)
            )
        except PopuliError as exc:
            look.problems.append(f"static peer {address}: {exc}")

    async def browse() -> None:
        if not look.interfaces:
            look.problems.append("no LAN interface to browse on (mDNS does not cross overlays)")
            return
        bridge = MdnsBridge(interfaces=look.interfaces, on_event=sightings.note)
        try:
            async with trio.open_nursery() as inner:
                await inner.start(bridge.run)
                await trio.sleep(browse_s)
                inner.cancel_scope.cancel()
        except* DiscoveryError as group:
            look.problems.append(str(group.exceptions[0]))

    with trio.move_on_after(browse_s + timeout_s + 5.0):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(browse)
            for address in static_peers:
                nursery.start_soon(probe, address)
            if enough is not None:

                async def stop_when_enough() -> None:
                    while not enough(sightings.all()):
                        await sightings.changed.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(stop_when_enough)
    look.sightings = sightings.all()
    if sightings.bad_announcements:
        look.problems.append(
            f"{sightings.bad_announcements} malformed announcement(s) ignored: "
            f"{sightings.last_problem}"
        )
    return look


def recipients_seen(token: JoinToken, sightings: Sequence[Sighting]) -> list[str]:
    """Addresses where a node the token names was seen announcing the token's cluster:
    candidates for the join, to be proven by TLS (CA pin, then recipient id)."""
    digest = cluster_digest(token.cluster_id)
    out: list[str] = []
    for sighting in sightings:
        if sighting.node_id in token.recipients and sighting.cluster_digest == digest:
            out += [a for a in sighting.addresses if a not in out]
    return out


async def join_hints(
    token: JoinToken, *, site: Site, static_peers: Sequence[str], browse_s: float = 4.0
) -> list[str]:
    """For ``populi join``: where the token's recipients were seen (stops as soon as one
    was)."""
    look = await look_around(
        site=site,
        browse_s=browse_s,
        static_peers=static_peers,
        enough=lambda seen: bool(recipients_seen(token, seen)),
    )
    return recipients_seen(token, look.sightings)


__all__ = ["Look", "join_hints", "look_around", "recipients_seen"]

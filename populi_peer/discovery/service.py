"""The discovery service of a running agent, the sightings it keeps, and the address book
that uses them.

:class:`DiscoveryService` runs the mDNS bridge (announce + browse, when this node
advertises a LAN address and ``discovery.enabled``) and probes the static peers every
``discovery.static_interval_s``. It never takes the agent down: a bridge that cannot
start, or a static peer that does not answer, is a line in the log and in
``populi status`` (``discovery``).

:class:`AddressBook` answers "which addresses, in which order, to reach node X": X's
advertised addresses ranked from this machine (:func:`~populi_peer.core.addresses.
rank_addresses`), then the addresses this node saw X announce on the LAN or answer at as
a static peer — of this cluster only, and only as places to try: every call still names
X and TLS proves it is X that answers (docs/adr/0009).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import trio

from populi_peer.core.addresses import (
    Cidrs,
    LocalAddress,
    at_least_as_reachable,
    rank_addresses,
)
from populi_peer.discovery._announce import Announcement, Sighting
from populi_peer.discovery._mdns import DiscoveryError, MdnsBridge, Seen
from populi_peer.errors import PopuliError
from populi_peer.log import get_logger, log

T = TypeVar("T")

#: Errors after which nothing reached the peer: the next address may be tried at once.
NOT_SENT_CODES = frozenset(
    {
        "peer_unreachable",
        "peer_identity_mismatch",
        "peer_certificate_untrusted",
    }
)
MAX_CANDIDATES = 4


class Sightings:
    """What this node has seen, by where it was seen (an mDNS instance, a static peer)."""

    def __init__(self) -> None:
        self._by_instance: dict[str, Sighting] = {}
        self.bad_announcements = 0
        self.last_problem = ""
        self.changed = trio.Event()
        #: Called with each sighting as it arrives (e.g. the heartbeat sender, woken
        #: when its unreachable control plane is seen somewhere).
        self.listeners: list[Callable[[Sighting], None]] = []

    def note(self, event: Seen) -> None:
        """An mDNS event (called in trio by the bridge); never raises."""
        if event.kind == "seen" and event.sighting is not None:
            self._by_instance[event.instance] = event.sighting
            for listener in self.listeners:
                listener(event.sighting)
        elif event.kind == "gone":
            self._by_instance.pop(event.instance, None)
        else:
            self.bad_announcements += 1
            self.last_problem = event.problem[:300]
        self._changed()

    def note_static(self, address: str, sighting: Sighting | None) -> None:
        if sighting is None:
            self._by_instance.pop(address, None)
        else:
            self._by_instance[address] = sighting
            for listener in self.listeners:
                listener(sighting)
        self._changed()

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def all(self) -> list[Sighting]:
        return list(self._by_instance.values())

    def of_node(self, node_id: str, *, cluster_digest: str) -> list[Sighting]:
        """Sightings of ``node_id`` that claim (mDNS) or proved (static) this cluster."""
        return [
            s
            for s in self._by_instance.values()
            if s.node_id == node_id
            and s.cluster_digest == cluster_digest
            and (s.source == "mdns" or s.verified)
        ]


@dataclass(kw_only=True, eq=False, repr=False)
class AddressBook:
    """Candidate addresses for a node, best first (module docstring)."""

    local: Sequence[LocalAddress]
    cidrs: Cidrs
    sightings: Sightings
    cluster_digest: str

    def __post_init__(self) -> None:
        self.local = tuple(self.local)

    def rank(self, addresses: Sequence[str]) -> list[str]:
        return [a for _, a in rank_addresses(addresses, local=self.local, cidrs=self.cidrs)]

    def at_least_as_reachable(self, address: str, than: str) -> bool:
        """Whether ``address`` ranks no worse than ``than`` from here (core.addresses)."""
        return at_least_as_reachable(address, than, local=self.local, cidrs=self.cidrs)

    def candidates(self, node_id: str, addresses: Sequence[str]) -> list[str]:
        out = self.rank(addresses)
        sighted: list[str] = []
        for sighting in self.sightings.of_node(node_id, cluster_digest=self.cluster_digest):
            sighted += [a for a in sighting.addresses if a not in out and a not in sighted]
        out += self.rank(sighted)
        return out[:MAX_CANDIDATES] if len(out) > MAX_CANDIDATES else out


async def call_first(candidates: Sequence[str], call: Callable[[str], Awaitable[T]]) -> T:
    """``call(address)`` for each candidate in turn until one answers; moves on only
    after an error that proves nothing was sent (:data:`NOT_SENT_CODES`), and raises the
    first candidate's error when every one fails."""
    if not candidates:
        raise PopuliError("no address to try", code="peer_unreachable")
    first: PopuliError | None = None
    for address in candidates:
        try:
            return await call(address)
        except PopuliError as exc:
            if exc.code not in NOT_SENT_CODES:
                raise
            first = first or exc
    assert first is not None
    raise first


StaticProbe = Callable[[str], Awaitable[Sighting]]


@dataclass(kw_only=True, eq=False, repr=False)
class DiscoveryService:
    """mDNS announce/browse and static-peer probes for a running agent (module docstring)."""

    enabled: bool
    sightings: Sightings
    announcement: Announcement | None
    interfaces: Sequence[str]
    static_peers: Sequence[str] = ()
    static_interval_s: float = 60.0
    probe: StaticProbe | None = None
    logger: ClassVar[logging.Logger] = get_logger("discovery")

    def __post_init__(self) -> None:
        self.interfaces = list(self.interfaces)
        self.static_peers = list(self.static_peers)
        self.mdns = "off"
        self.mdns_reason = "discovery.enabled = false" if not self.enabled else ""
        self.static_errors: dict[str, str] = {}

    def status_json(self, our_digest: str | None = None) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "mdns": self.mdns,
            "reason": self.mdns_reason or None,
            "interfaces": self.interfaces,
            "announced": self.announcement.name
            if self.announcement and self.mdns == "on"
            else None,
            "static_peers": self.static_peers,
            "static_errors": dict(self.static_errors),
            "bad_announcements": self.sightings.bad_announcements,
            "sightings": [s.to_json(our_digest) for s in self.sightings.all()],
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self.enabled:
            task_status.started()
            return
        async with trio.open_nursery() as nursery:
            if self.static_peers and self.probe is not None:
                nursery.start_soon(self._probe_static_forever)
            if self.announcement is None or not self.interfaces:
                self.mdns_reason = "this node advertises no LAN address"
            else:
                nursery.start_soon(self._run_mdns)
            task_status.started()

    async def _run_mdns(self) -> None:
        bridge = MdnsBridge(
            interfaces=self.interfaces,
            on_event=self.sightings.note,
            announcement=self.announcement,
        )
        try:
            self.mdns = "starting"
            async with trio.open_nursery() as nursery:
                await nursery.start(bridge.run)
                self.mdns, self.mdns_reason = "on", ""
        except* DiscoveryError as group:
            problem = str(group.exceptions[0])
            self.mdns, self.mdns_reason = "failed", problem
            log(self.logger, logging.WARNING, "LAN discovery is off", error=problem)

    async def probe_static_once(self) -> None:
        assert self.probe is not None
        for address in self.static_peers:
            try:
                sighting = await self.probe(address)
            except PopuliError as exc:
                if self.static_errors.get(address) is None:
                    log(
                        self.logger,
                        logging.INFO,
                        "static peer does not answer",
                        peer=address,
                        error=str(exc),
                    )
                self.static_errors[address] = str(exc)[:300]
                self.sightings.note_static(address, None)
                continue
            self.static_errors.pop(address, None)
            self.sightings.note_static(address, sighting)

    async def _probe_static_forever(self) -> None:
        while True:
            await self.probe_static_once()
            await trio.sleep(self.static_interval_s)


__all__ = [
    "NOT_SENT_CODES",
    "AddressBook",
    "DiscoveryService",
    "Sightings",
    "call_first",
]

"""One node's network, as the agent composes it: the timing table, the addresses it
advertises, the address book that ranks its peers' addresses, its sightings and its
discovery service. The agent hands in what it knows (its config, its machine's
:class:`~populi_peer.discovery.site.Site`, its identity facts, where the control plane
is and a member's addresses); nothing here reaches back into the agent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import InitVar, dataclass
from typing import Any

from populi_peer import PROTOCOL_VERSION
from populi_peer.config import Config
from populi_peer.core.addresses import AdvertisePlan
from populi_peer.core.timings import TimingTable
from populi_peer.discovery._announce import Announcement, Sighting, cluster_digest
from populi_peer.discovery.service import AddressBook, DiscoveryService, Sightings
from populi_peer.discovery.site import Site, advertise_plan, url_address

#: ``control_plane()`` -> (its node id, the URL this node holds for it), either empty.
ControlPlane = Callable[[], tuple[str, str]]
#: ``member_addresses(node_id)`` -> the addresses its member record lists.
MemberAddresses = Callable[[str], Sequence[str]]


@dataclass(kw_only=True, eq=False, repr=False)
class NodeNetwork:
    config: Config
    site: Site
    node_id: str
    cluster_id: InitVar[str]
    roles: Sequence[str]
    ca_pin: str | None
    control_plane: ControlPlane
    member_addresses: MemberAddresses

    def __post_init__(self, cluster_id: str) -> None:
        #: The one timing table by scope (core.timings), from ``[timings.*]``.
        self.timings: TimingTable = self.config.timings.table()
        self.cluster_digest = cluster_digest(cluster_id)
        self.sightings = Sightings()
        self.address_book = AddressBook(
            local=self.site.local,
            cidrs=self.site.cidrs(self.config),
            sightings=self.sightings,
            cluster_digest=self.cluster_digest,
        )
        self.discovery = DiscoveryService(
            enabled=self.config.discovery.enabled,
            sightings=self.sightings,
            announcement=None,
            interfaces=(),
            static_peers=self.config.discovery.static_peers,
            static_interval_s=self.config.discovery.static_interval_s,
            probe=self._probe_static,
        )
        self.plan = self.replan(self.config.listen_address())

    def replan(self, listen: tuple[str, int]) -> AdvertisePlan:
        """What this node advertises when it listens on ``listen`` (core.addresses),
        judged against the control plane's addresses (its own interfaces, on the control
        plane itself); kept as :attr:`plan`."""
        cp_id, cp_url = self.control_plane()
        theirs: list[str] = []
        if cp_id != self.node_id and cp_url:
            # Any of its addresses on an overlay makes this an overlay cluster, even when
            # this node reaches it over a LAN they share.
            theirs = [url_address(cp_url), *self.member_addresses(cp_id)]
        self.plan = advertise_plan(
            self.config, self.site, control_plane_addresses=theirs, listen=listen
        )
        return self.plan

    def announcement(self) -> tuple[Announcement | None, list[str]]:
        """What mDNS announces (this node's LAN addresses that are its own interface
        addresses) and the interfaces it runs on; nothing without such an address."""
        own = set(self.site.lan_ips())
        lan = [a for a in self.plan.of_scope("lan") if a.rsplit(":", 1)[0] in own]
        if not lan:
            return None, []
        port = int(lan[0].rsplit(":", 1)[1])
        ips = [a.rsplit(":", 1)[0] for a in lan if a.endswith(f":{port}")]
        announced = Announcement(
            node_id=self.node_id,
            cluster_digest=self.cluster_digest,
            port=port,
            addresses=tuple(ips),
            roles=tuple(self.roles),
            protocol_version=PROTOCOL_VERSION,
        )
        return announced, ips

    def discovery_service(self) -> Callable[..., Any]:
        """The discovery service's ``run``, announcing what :attr:`plan` says now (call
        once the listen address is bound)."""
        self.discovery.announcement, self.discovery.interfaces = self.announcement()
        return self.discovery.run

    async def _probe_static(self, address: str) -> Sighting:
        from populi_peer.discovery._static import probe_peer

        return await probe_peer(
            address, our_pin=self.ca_pin, timeout_s=self.config.api.request_timeout_s
        )

    def status_json(self) -> dict[str, Any]:
        return {
            "addresses": self.plan.to_json(),
            "discovery": self.discovery.status_json(self.cluster_digest),
        }


__all__ = ["NodeNetwork"]

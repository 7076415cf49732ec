"""LAN discovery and static peers: hints about where nodes are, never admission.

- :mod:`populi_peer.discovery._announce`: the TXT record and what a sighting is;
- :mod:`populi_peer.discovery._mdns`: the one adapter to python-zeroconf (its own
  threads, sightings handed into trio);
- :mod:`populi_peer.discovery._static`: probing configured peers where multicast does
  not reach;
- :mod:`populi_peer.discovery.site`: this machine's interfaces, routes and the addresses
  it advertises;
- :mod:`populi_peer.discovery.service`: the agent's discovery service, its sightings and
  the address book that ranks a peer's addresses.
"""

from populi_peer.discovery._announce import (
    SERVICE_TYPE,
    Announcement,
    Sighting,
    cluster_digest,
)
from populi_peer.discovery._mdns import DiscoveryError, MdnsBridge
from populi_peer.discovery.site import Site

__all__ = [
    "SERVICE_TYPE",
    "Announcement",
    "DiscoveryError",
    "MdnsBridge",
    "Sighting",
    "Site",
    "cluster_digest",
]

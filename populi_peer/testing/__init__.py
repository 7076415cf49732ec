"""Public test helpers, like ``trio.testing``: a virtual clock, an in-memory network with
seeded faults, (``populi_peer.testing.cluster``) a virtual cluster of real agents, and
(``populi_peer.testing.waiting``) the way to wait in virtual time. What reads virtual time
needs trio's ``MockClock`` and says so (``NotVirtualTime``) on the real clock."""

from populi_peer.testing.clock import VirtualClock
from populi_peer.testing.network import Faults, MemoryNetwork

__all__ = ["Faults", "MemoryNetwork", "VirtualClock"]

# ``populi_peer.testing.cluster`` (the virtual cluster) imports the whole agent; import it
# explicitly: ``from populi_peer.testing.cluster import open_virtual_cluster``.

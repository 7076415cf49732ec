"""Voters in one trio run, as the election and replica tests build them: a voter's data
directory opened as the agent opens it (with its materializer), the election timings
those tests use, and the transport that hands each message to another voter's service."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import trio

from enrollment.ca import certificate_public_key
from populi_peer.agent.election import ElectionService
from populi_peer.agent.membership import Membership
from populi_peer.agent.records import ClusterRecords
from populi_peer.agent.registry import Registry
from populi_peer.agent.replica import Replica
from populi_peer.agent.revocations import RevocationState
from populi_peer.clock import Clock
from populi_peer.core.election import ElectionSettings
from populi_peer.errors import ServiceUnavailable
from populi_peer.identity import Identity, load_identity
from populi_peer.store import Store

#: The election timings of voters in one trio run on virtual time.
FAST_ELECTION = ElectionSettings(
    election_timeout_min_s=2.0,
    election_timeout_max_s=4.0,
    heartbeat_interval_s=0.25,
    leader_lease_s=1.0,
    lease_margin_s=0.2,
    write_timeout_s=3.0,
)


class Direct:
    """Hands each message to the other voter's service's ``receive`` (what the election
    route does after authenticating the caller); ``down`` voters, and one with no service
    yet, answer nothing, as a crashed process would not."""

    def __init__(
        self,
        sender: str,
        service_of: Callable[[str], ElectionService | None],
        down: set[str],
    ) -> None:
        self.sender = sender
        self.service_of = service_of
        self.down = down

    async def exchange(self, to: str, messages: Sequence[object]) -> Sequence[object]:
        await trio.sleep(0.01)
        service = self.service_of(to)
        if to in self.down or self.sender in self.down or service is None:
            raise ServiceUnavailable(f"{to} does not answer", code="peer_unreachable")
        return service.receive(self.sender, messages)  # type: ignore[arg-type]


@dataclass
class ReplicaVoter:
    """One voter's data directory, opened as the agent opens it, with its materializer."""

    data_dir: Path
    store: Store
    identity: Identity
    membership: Membership
    registry: Registry
    records: ClusterRecords
    revocations: RevocationState
    replica: Replica

    @classmethod
    def open(cls, data_dir: Path, clock: Clock, *, now_ms: Callable[[], int]) -> Self:
        """``data_dir``'s stores wired as the agent wires them; ``now_ms`` is the
        materializer's wall clock."""
        store = Store.open(data_dir)
        identity = load_identity(data_dir, store)
        membership = Membership(store)
        registry = Registry(store, identity, clock, max_skew_s=300.0)
        records = ClusterRecords(store, membership)
        revocations = RevocationState(
            store,
            cluster_id=identity.cluster_id,
            cluster_key=certificate_public_key(identity.ca_cert),
        )
        replica = Replica(
            store,
            membership=membership,
            registry=registry,
            records=records,
            revocations=revocations,
            issuer=lambda: identity.issuer,
            now_ms=now_ms,
        )
        return cls(data_dir, store, identity, membership, registry, records, revocations, replica)

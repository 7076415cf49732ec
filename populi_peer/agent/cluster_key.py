"""The cluster key for voters (ADR 0016): a new leader signs join tokens, node certificates
and revocation lists, so every voter needs the cluster key. Issue 14 replaces this with
intermediate issuing keys held by the voters; until then the root key itself is shared.

- The leader serves ``POST /v1/populi/election/cluster-key``: only to a node in its voter
  set (403 ``not_a_voter``), sealed to the fresh X25519 key in the caller's signed request
  (:mod:`enrollment.keyshare`), over TLS.
- :class:`ClusterKeyShare` runs on every node: once this node is a voter, lacks the key
  and knows a leader other than itself, it asks for the key, checks it is the private half
  of the cluster CA's key, writes it to ``keys/cluster.key`` (0600) and hands it to the
  services that sign. A failed attempt is tried again at the next election change, or
  after :data:`RETRY_S`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from enrollment.ca import certificate_public_key
from enrollment.keys import write_private_key
from enrollment.keyshare import SealedKey, new_request_key, open_cluster_key, seal_cluster_key
from populi_peer.agent.election import ElectionService
from populi_peer.agent.links import ControlPlaneLink, PeerLink
from populi_peer.api.app import ANY_MEMBER, Request, Route
from populi_peer.core.messages.election import ClusterKeyAnswer, ClusterKeyRequest
from populi_peer.errors import Conflict, Forbidden, PopuliError, enrollment_boundary
from populi_peer.identity import Identity
from populi_peer.log import NOTICE, get_logger, log

#: How long a voter waits before asking again after a failed attempt (if no election
#: change wakes it first).
RETRY_S = 5.0


class ClusterKeyShare:
    """Both sides of sharing the cluster key with voters (see the module docstring)."""

    def __init__(
        self,
        *,
        identity: Identity,
        election: ElectionService,
        control_plane: ControlPlaneLink,
        peers: PeerLink,
        on_key: Callable[[Ed25519PrivateKey], None],
    ) -> None:
        self.identity = identity
        self.election = election
        self.control_plane = control_plane
        self.peers = peers
        self.on_key = on_key
        self.key: Ed25519PrivateKey | None = identity.cluster_key
        self.logger = get_logger("election")

    # -- the leader's side --------------------------------------------------------------

    def routes(self) -> list[Route]:
        return [
            Route(
                "POST",
                "/v1/populi/election/cluster-key",
                self._share,
                roles=ANY_MEMBER,
                name="cluster_key",
                request=ClusterKeyRequest,
                answer=ClusterKeyAnswer,
            )
        ]

    async def _share(self, request: Request) -> ClusterKeyAnswer:
        caller = request.caller
        self.control_plane.require_self()
        voters = self.election.voters
        if caller.kind != "node" or voters is None or caller.id not in voters.voters:
            raise Forbidden(f"{caller.id} is not a voter", code="not_a_voter")
        if self.key is None:
            raise Conflict("this node does not hold the cluster key", code="no_cluster_key")
        body = request.message(ClusterKeyRequest)
        with enrollment_boundary():
            sealed = seal_cluster_key(
                self.key,
                receiver_public=body.public_key,
                cluster_id=self.identity.cluster_id,
                sender=self.identity.node_id,
                receiver=caller.id,
            )
        log(self.logger, NOTICE, "cluster key shared with a voter", voter=caller.id)
        await trio.lowlevel.checkpoint()
        return ClusterKeyAnswer(
            sender_public=sealed.sender_public, nonce=sealed.nonce, sealed=sealed.sealed
        )

    # -- the voter's side ---------------------------------------------------------------

    def wanted_from(self) -> str | None:
        """The leader to ask, when this node is a voter without the key."""
        voters = self.election.voters
        leader = self.election.leader_id
        if self.key is not None or voters is None or self.identity.node_id not in voters.voters:
            return None
        if leader is None or leader == self.identity.node_id:
            return None
        return leader

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while self.key is None:
            leader = self.wanted_from()
            if leader is not None:
                try:
                    await self.fetch(leader)
                    continue
                except PopuliError as exc:
                    log(self.logger, logging.INFO, "cluster key not fetched yet", error=str(exc))
            with trio.move_on_after(RETRY_S):
                await self.election.wait_changed()

    async def fetch(self, leader: str) -> None:
        member = await self.peers.member(leader)
        if member is None:
            raise Conflict(f"no address known for the leader {leader}", code="no_address")
        request_key, public = new_request_key()
        answer = await self.peers.call(
            member,
            "POST",
            "/v1/populi/election/cluster-key",
            ClusterKeyRequest(public_key=public),
            attempts=1,
            answer=ClusterKeyAnswer,
        )
        identity = self.identity
        with enrollment_boundary():
            key = open_cluster_key(
                SealedKey(answer.sender_public, answer.nonce, answer.sealed),
                request_key=request_key,
                expected_public=certificate_public_key(identity.ca_cert),
                cluster_id=identity.cluster_id,
                sender=leader,
                receiver=identity.node_id,
            )
            if not identity.paths.cluster_key.exists():
                write_private_key(identity.paths.cluster_key, key)
        self.key = key
        self.on_key(key)
        log(self.logger, NOTICE, "cluster key received from the leader", leader=leader)


__all__ = ["RETRY_S", "ClusterKeyShare"]

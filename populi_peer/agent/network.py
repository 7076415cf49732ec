"""How an agent reaches its peers: a seam between the agent and httpx transports.

The real network is HTTPS with the cluster CA as the only trust anchor, and the handshake
checks that the answering node is the one each request names (its certificate's node id)
and is not revoked on this node's list (``populi_peer.api.tls``; one connection pool per
expected node, :class:`~populi_peer.api.client.PeerTransport`). The virtual cluster
(``populi_peer.testing``) substitutes an in-memory, fault-injecting network that refuses
a misrouted request the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import httpx

from populi_peer.api.client import PeerTransport
from populi_peer.api.tls import RevokedCheck, peer_context


class Network(Protocol):
    def transport_for(self, node_id: str) -> httpx.AsyncBaseTransport:
        """The transport node ``node_id`` uses for its outgoing requests. Each request
        names the node it expects to reach (``populi_peer.api.tls.EXPECTED_PEER``); the
        transport fails it, like a TLS identity failure, when another node answers."""
        ...


class TlsNetwork:
    """``revoked(node_id, serial)``: this node's revocation list, read at every
    handshake."""

    def __init__(self, ca_cert_path: Path, *, revoked: RevokedCheck | None = None) -> None:
        self._context = peer_context(ca_cert_path, revoked=revoked)

    def transport_for(self, node_id: str) -> httpx.AsyncBaseTransport:
        return PeerTransport(self._context)


__all__ = ["Network", "TlsNetwork"]

"""How an agent reaches its peers: a seam between the agent and httpx transports.

The real network is HTTPS with the cluster CA as the only trust anchor; the virtual
cluster (``populi_peer.testing``) substitutes an in-memory, fault-injecting network.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import httpx

from populi_peer.api.tls import client_context


class Network(Protocol):
    def transport_for(self, node_id: str) -> httpx.AsyncBaseTransport:
        """The transport node ``node_id`` uses for its outgoing requests."""
        ...


class TlsNetwork:
    def __init__(self, ca_cert_path: Path) -> None:
        self._context = client_context(ca_cert_path)

    def transport_for(self, node_id: str) -> httpx.AsyncBaseTransport:
        return httpx.AsyncHTTPTransport(
            verify=self._context,
            retries=0,
            limits=httpx.Limits(
                max_connections=64, max_keepalive_connections=16, keepalive_expiry=30.0
            ),
        )


__all__ = ["Network", "TlsNetwork"]

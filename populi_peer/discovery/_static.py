"""Static peers: where multicast does not reach (WireGuard, Nebula, Tailscale carry no
mDNS), a node probes the ``host:port`` addresses it was given, as a joiner's first
contact does: ``GET /v1/populi/join/ca`` over TLS that verifies nothing yet, then the
answering node's id from its certificate, which must chain to the CA it sent. A peer
whose CA matches this node's pin is ``verified`` ours; any other is a foreign (or
unknown) cluster's, listed and never used.
"""

from __future__ import annotations

import httpx
from cryptography.x509.oid import NameOID

from enrollment.ca import ca_pin, cert_from_pem, certificate_public_key
from populi_peer.api.client import decode_response, transport_error
from populi_peer.discovery._announce import Sighting, cluster_digest
from populi_peer.errors import PeerError, PopuliError
from populi_peer.joining import TransportFactory, tls_peer_node_id, tls_transports

PROBE_PATH = "/v1/populi/join/ca"


async def probe_peer(
    address: str,
    *,
    our_pin: str | None,
    timeout_s: float,
    transports: TransportFactory = tls_transports,
) -> Sighting:
    """The Populi node at ``address``; a :class:`PopuliError` if none answers as one."""
    url = f"https://{address}{PROBE_PATH}"
    async with httpx.AsyncClient(transport=transports(None), timeout=timeout_s) as client:
        try:
            response = await client.get(url)
        except httpx.HTTPError as exc:
            raise transport_error(exc, peer=address, url=url) from exc
        answer = decode_response(response, peer=address)
        pem = answer.get("ca_certificate")
        if not isinstance(pem, str):
            raise PeerError(f"{address} sent no CA certificate", code="bad_peer_answer")
        try:
            ca = cert_from_pem(pem)
            units = ca.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
            cluster_id = str(units[0].value) if units else ""
            node_id = tls_peer_node_id(response, ca, peer=address)
        except PopuliError:
            raise
        except (ValueError, IndexError) as exc:
            raise PeerError(
                f"{address} sent an unreadable CA certificate: {exc}", code="bad_peer_answer"
            ) from exc
    if not cluster_id or answer.get("cluster_id") != cluster_id:
        raise PeerError(
            f"{address}: the CA and the answer name different clusters", code="bad_peer_answer"
        )
    verified = our_pin is not None and ca_pin(certificate_public_key(ca)) == our_pin
    return Sighting(
        node_id=node_id,
        cluster_digest=cluster_digest(cluster_id),
        addresses=(address,),
        source="static",
        instance=address,
        verified=verified,
    )


__all__ = ["PROBE_PATH", "probe_peer"]

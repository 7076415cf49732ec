"""TLS contexts: peers trust only the cluster CA, never the system store, and a caller
checks which node answers it.

The chain to the pinned cluster CA proves only that the other side is, or was, a member:
a retired node's certificate still chains to it. So every peer call names the node it
means to reach, and the handshake itself refuses a peer whose certificate names another
node, or one the caller's own revocation list revokes (:func:`peer_context`;
docs/adr/0009-peer-identity-of-answers.md). Addresses are never checked — NAT and
overlays change the address a peer is reached by — the node id is.

The expected node id travels as the TLS server name: httpx's ``sni_hostname`` request
extension (:data:`EXPECTED_PEER`), which httpcore passes as ``server_hostname`` to
``SSLContext.wrap_bio`` (async, through trio's ``SSLStream``) and to
``SSLContext.wrap_socket`` (sync). Two checks then run, both before a request byte is
sent:

1. OpenSSL's host-name check (``check_hostname``): a ``DNSName`` in the certificate's
   SAN equals the expected id (node certificates carry ``DNSName(node_id)``);
2. :func:`check_peer_certificate`, called at the end of the handshake by
   :class:`PeerSSLObject` / :class:`PeerSSLSocket`: the certificate's principal id (its
   subject CN, what ``enrollment.ca.node_certificate_info`` reads) equals the expected
   id — a SAN match alone is not enough, since a joiner names its own addresses, and a
   host name among them lands in its SAN too — and the caller's revocation list revokes
   neither that node, nor the certificate's serial, nor the voter whose issuer signed it
   (ADR 0018: a node presents its certificate and its issuer's; OpenSSL checks the chain
   to the root, path length included).

A refusal is a :class:`PeerRefused` (an ``ssl.SSLCertVerificationError``, which trio and
httpcore turn into a connect error); the peer client reports it as
``populi_peer.errors.PeerIdentityError``.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from enrollment.ca import issuer_node_id, node_certificate_info
from enrollment.errors import CertificateError

#: The httpx request extension that carries the node id a request expects to reach.
EXPECTED_PEER = "sni_hostname"

#: ``revoked(node_id, serial_hex)``: whether the caller's own list revokes a certificate.
RevokedCheck = Callable[[str, str], bool]

#: OpenSSL's ``X509_V_ERR_HOSTNAME_MISMATCH``: the SAN does not name the expected node.
HOSTNAME_MISMATCH = 62


class PeerRefused(ssl.SSLCertVerificationError):
    """The handshake reached a node other than the expected one, or a revoked one.

    ``code``: ``peer_identity_mismatch`` or ``peer_revoked``."""

    def __init__(self, message: str, *, code: str, expected: str, presented: str) -> None:
        super().__init__(message)
        self.code = code
        self.expected = expected
        self.presented = presented
        self.verify_code = 0
        self.verify_message = message

    def __str__(self) -> str:
        return self.verify_message


def check_peer_certificate(
    der: bytes | None, *, expected: str | None, revoked: RevokedCheck | None
) -> None:
    """Raise :class:`PeerRefused` unless the DER certificate ``der`` names the node
    ``expected`` and is not revoked."""
    if not expected:
        raise PeerRefused(
            "no expected peer node id for this connection",
            code="peer_identity_mismatch",
            expected="",
            presented="",
        )
    if der is None:
        raise PeerRefused(
            f"the peer presented no certificate (expected {expected})",
            code="peer_identity_mismatch",
            expected=expected,
            presented="",
        )
    try:
        cert = x509.load_der_x509_certificate(der)
        info = node_certificate_info(cert)
    except (ValueError, CertificateError) as exc:
        raise PeerRefused(
            f"the peer's certificate names no node (expected {expected}): {exc}",
            code="peer_identity_mismatch",
            expected=expected,
            presented="",
        ) from None
    if info.principal_id != expected:
        raise PeerRefused(
            f"the peer's certificate names {info.principal_id}, not {expected}",
            code="peer_identity_mismatch",
            expected=expected,
            presented=info.principal_id,
        )
    if revoked is not None and revoked(info.principal_id, info.serial):
        raise PeerRefused(
            f"{info.principal_id}'s certificate (serial {info.serial}) is revoked",
            code="peer_revoked",
            expected=expected,
            presented=info.principal_id,
        )
    # The hop above: the voter whose issuer signed it (OpenSSL verified the chain to the
    # root, so the issuer name is the issuer certificate's subject). Revoking a voter
    # revokes every certificate its issuer signed (docs/adr/0018-intermediate-issuing-keys.md).
    voter = issuer_node_id(cert)
    if revoked is not None and voter is not None and revoked(voter, ""):
        raise PeerRefused(
            f"{info.principal_id}'s certificate was signed by the issuer of {voter}, "
            "which is revoked",
            code="peer_revoked",
            expected=expected,
            presented=info.principal_id,
        )


def _check_handshake(tls: ssl.SSLObject | ssl.SSLSocket) -> None:
    context = tls.context
    revoked = context.revoked if isinstance(context, PeerContext) else None
    check_peer_certificate(
        tls.getpeercert(binary_form=True), expected=tls.server_hostname, revoked=revoked
    )


class PeerSSLObject(ssl.SSLObject):
    """The TLS object of trio's ``SSLStream`` (async peer calls): checks the peer once
    the handshake completes. An error here reaches trio before it sends the client's
    Finished, so the peer never completes the handshake."""

    def do_handshake(self) -> None:
        super().do_handshake()
        _check_handshake(self)


class PeerSSLSocket(ssl.SSLSocket):
    """The TLS socket of httpcore's sync backend (CLI peer calls): the same check."""

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        _check_handshake(self)


class PeerContext(ssl.SSLContext):
    """A client context that checks which node answers (see the module docstring).
    ``revoked`` is read at every handshake, so a newer revocation list counts at once."""

    revoked: RevokedCheck | None = None
    sslobject_class = PeerSSLObject
    sslsocket_class = PeerSSLSocket


def _peer_context(revoked: RevokedCheck | None) -> PeerContext:
    ctx = PeerContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.revoked = revoked
    return ctx


def peer_context(ca_cert_path: Path, *, revoked: RevokedCheck | None = None) -> PeerContext:
    """The context of every peer call: the cluster CA only, and the answering node's
    identity checked against the ``sni_hostname`` the request names."""
    ctx = _peer_context(revoked)
    ctx.load_verify_locations(cafile=str(ca_cert_path))
    return ctx


def peer_context_from_pem(ca_pem: str, *, revoked: RevokedCheck | None = None) -> PeerContext:
    ctx = _peer_context(revoked)
    ctx.load_verify_locations(cadata=ca_pem)
    return ctx


def client_context(ca_cert_path: Path) -> ssl.SSLContext:
    """Chain only: the cluster CA, no check of which node answers. For tools and tests
    that reach one endpoint they already know (benchmarks, health probes); peer calls use
    :func:`peer_context`."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(ca_cert_path))
    return ctx


def client_context_from_pem(ca_pem: str) -> ssl.SSLContext:
    """Chain only (see :func:`client_context`)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca_pem)
    return ctx


def insecure_probe_context() -> ssl.SSLContext:
    """For the first contact of ``populi join`` only: fetch the CA certificate, which the
    joiner then checks against the token's pin before trusting anything the server says.
    Nothing secret is ever sent over a connection made with this context."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


__all__ = [
    "EXPECTED_PEER",
    "HOSTNAME_MISMATCH",
    "PeerContext",
    "PeerRefused",
    "PeerSSLObject",
    "PeerSSLSocket",
    "RevokedCheck",
    "check_peer_certificate",
    "client_context",
    "client_context_from_pem",
    "insecure_probe_context",
    "peer_context",
    "peer_context_from_pem",
]

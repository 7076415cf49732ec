"""A voter's issuer key and certificate in its data directory (ADR 0018).

The files (``populi_peer.identity``): ``keys/issuer.key`` (made here, never copied),
``tls/issuer.csr`` (the request the root's holder signs) and ``tls/issuer.crt`` (the
signed certificate). ``populi ca request`` / ``sign`` / ``install`` / ``show`` drive these
functions; the rules (what an issuer certificate must be) are ``enrollment.ca``'s.

The root key is needed only by :func:`sign_request`, which runs wherever the root key is
(a data directory that still holds ``keys/cluster.key``, or an offline copy):
``runbooks/offline-root.md``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding

from enrollment.ca import (
    ISSUER_DAYS,
    cert_from_pem,
    cert_to_pem,
    certificate_public_key,
    check_issuer,
    issue_intermediate,
    make_issuer_request,
    node_certificate_info,
    request_from_pem,
)
from enrollment.keys import generate_key, load_private_key, write_private_key, write_public_file
from populi_peer.errors import Conflict, StoreError, UsageError
from populi_peer.identity import DataPaths
from populi_peer.store import Store


@dataclass(frozen=True)
class IssuerStatus:
    """What ``populi ca show`` prints: who signs on this node, and whether the root is here."""

    node_id: str
    cluster_id: str
    root_key_present: bool
    issuer_node_id: str | None
    issuer_serial: str | None
    issuer_not_after_s: float | None
    request_pending: bool

    @property
    def signer(self) -> str:
        if self.issuer_node_id is not None:
            return "issuer"
        return "root" if self.root_key_present else "none"

    def to_json(self) -> dict[str, object]:
        return {
            "node_id": self.node_id,
            "cluster_id": self.cluster_id,
            "signer": self.signer,
            "root_key_present": self.root_key_present,
            "issuer": None
            if self.issuer_node_id is None
            else {
                "node_id": self.issuer_node_id,
                "serial": self.issuer_serial,
                "not_after_s": self.issuer_not_after_s,
            },
            "request_pending": self.request_pending,
        }


def _ids(data_dir: Path) -> tuple[str, str]:
    """(node id, cluster id) of the node in ``data_dir``."""
    store = Store.open(data_dir, migrate_ok=False)
    try:
        return store.require_meta("node_id"), store.require_meta("cluster_id")
    finally:
        store.close()


def make_request(data_dir: Path) -> str:
    """The voter's side: make the next issuer key ``keys/issuer.next.key`` (once: a pending
    request's key is kept) and the PEM request for it, also written to ``tls/issuer.csr``.
    An installed issuer keeps signing until :func:`install_certificate` replaces it (a
    renewal rotates the issuing key)."""
    paths = DataPaths(data_dir)
    node_id, cluster_id = _ids(data_dir)
    if paths.issuer_key_next.exists():
        key = load_private_key(paths.issuer_key_next)
    else:
        key = generate_key()
        write_private_key(paths.issuer_key_next, key)
    request = make_issuer_request(issuer_key=key, node_id=node_id, cluster_id=cluster_id)
    pem = request.public_bytes(Encoding.PEM)
    write_public_file(paths.issuer_request, pem)
    return pem.decode("ascii")


def sign_request(
    request_pem: str,
    *,
    root_key: Ed25519PrivateKey,
    ca_cert: x509.Certificate,
    now_wall_s: float,
    days: float = ISSUER_DAYS,
    expected_node_id: str | None = None,
) -> str:
    """Where the root key is: the issuer certificate (PEM) for a voter's request."""
    if not 1 <= days <= 3650:
        raise UsageError(f"--days {days:g}: an issuer lives 1 to 3650 days")
    cert = issue_intermediate(
        root_key=root_key,
        root_cert=ca_cert,
        request=request_from_pem(request_pem),
        now_wall_s=now_wall_s,
        serial=secrets.randbits(63) | 1,
        days=days,
        expected_node_id=expected_node_id,
    )
    return cert_to_pem(cert).decode("ascii")


def install_certificate(data_dir: Path, cert_pem: str, *, now_wall_s: float) -> x509.Certificate:
    """The voter's side again: check the signed certificate (this cluster's root, CA with
    path length 0, for this node and for the key of the pending request, valid now) and
    install it with its key; the running agent signs with it once restarted."""
    paths = DataPaths(data_dir)
    node_id, cluster_id = _ids(data_dir)
    cert = cert_from_pem(cert_pem)
    ca = cert_from_pem(paths.ca_cert.read_bytes())
    issuer_id = check_issuer(
        cert,
        root_public=certificate_public_key(ca),
        cluster_id=cluster_id,
        at_s=now_wall_s,
        skew_s=0,
    )
    if issuer_id != node_id:
        raise Conflict(
            f"this issuer certificate is for {issuer_id}, not this node ({node_id})",
            code="issuer_wrong_node",
        )
    if not paths.issuer_key_next.exists():
        raise StoreError(
            f"no pending issuer key in {data_dir}; run 'populi ca request' here first",
            code="no_issuer_key",
        )
    key = load_private_key(paths.issuer_key_next)
    if certificate_public_key(cert) != key.public_key():
        raise Conflict(
            "this issuer certificate is not for this node's pending issuer key (was it "
            "signed for an older request?)",
            code="issuer_key_mismatch",
        )
    # The key first, then the certificate: identity loading refuses a pair that does not
    # match, and a crash between the two leaves the key without its certificate (the old
    # certificate is then refused at load, never paired with the wrong key silently).
    paths.issuer_cert.unlink(missing_ok=True)
    paths.issuer_key_next.replace(paths.issuer_key)
    write_public_file(paths.issuer_cert, cert_to_pem(cert))
    paths.issuer_request.unlink(missing_ok=True)
    return cert


def status(data_dir: Path) -> IssuerStatus:
    paths = DataPaths(data_dir)
    node_id, cluster_id = _ids(data_dir)
    info = None
    if paths.issuer_cert.exists():
        info = node_certificate_info(cert_from_pem(paths.issuer_cert.read_bytes()))
    return IssuerStatus(
        node_id=node_id,
        cluster_id=cluster_id,
        root_key_present=paths.cluster_key.exists(),
        issuer_node_id=None if info is None else info.principal_id,
        issuer_serial=None if info is None else info.serial,
        issuer_not_after_s=None if info is None else info.not_after_s,
        request_pending=paths.issuer_request.exists(),
    )


__all__ = ["IssuerStatus", "install_certificate", "make_request", "sign_request", "status"]

"""The cluster CA and node certificates (X.509, Ed25519).

The cluster root key signs a self-signed CA certificate and, in this version, node
certificates directly (the plan for voter-held intermediates is in
``docs/security-posture.md``). Peers trust only this CA, never the system store, and do not
check host names (NAT and overlays change addresses): the chain and the node id in the
certificate are what count.

Certificates carry Subject and Authority Key Identifiers (strict X.509 checks of newer
Pythons require them). Functions take ``now_wall_s`` and serial numbers as arguments.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from enrollment.errors import CertificateError
from enrollment.keys import raw_public

CA_VALIDITY_DAYS = 3650
NODE_CERT_DAYS = 30
#: Node certificates start this long before issuance so that a peer whose clock is behind
#: (within the skew budget) still accepts them.
BACKDATE_S = 3600


def _utc(now_s: float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(now_s, tz=_dt.UTC)


def ca_pin(key: Ed25519PublicKey) -> str:
    """``sha256:<hex>`` of the raw root public key; what join tokens pin."""
    return "sha256:" + hashlib.sha256(raw_public(key)).hexdigest()


def make_ca_certificate(
    *,
    root_key: Ed25519PrivateKey,
    cluster_id: str,
    cluster_name: str,
    now_wall_s: float,
    serial: int,
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Populi"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, cluster_id),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Populi cluster {cluster_name}"),
        ]
    )
    public = root_key.public_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(public)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(serial)
        .not_valid_before(_utc(now_wall_s - BACKDATE_S))
        .not_valid_after(_utc(now_wall_s + CA_VALIDITY_DAYS * 86400))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(root_key, algorithm=None)
    )


@dataclass(frozen=True, slots=True)
class NodeCertificateInfo:
    principal_id: str
    cluster_id: str
    not_before_s: float
    not_after_s: float
    serial: str


def make_node_certificate(
    *,
    ca_key: Ed25519PrivateKey,
    ca_cert: x509.Certificate,
    subject_key: Ed25519PublicKey,
    principal_id: str,
    cluster_id: str,
    addresses: list[str],
    now_wall_s: float,
    serial: int,
    days: float = NODE_CERT_DAYS,
) -> x509.Certificate:
    """A certificate for a node or operator; server and client auth."""
    sans: list[x509.GeneralName] = [
        x509.DNSName(principal_id),
        x509.UniformResourceIdentifier(f"populi://{cluster_id}/{principal_id}"),
    ]
    for address in addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            if address and address not in (principal_id,):
                sans.append(x509.DNSName(address))
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Populi"),
                    x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, cluster_id),
                    x509.NameAttribute(NameOID.COMMON_NAME, principal_id),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(subject_key)
        .serial_number(serial)
        .not_valid_before(_utc(now_wall_s - BACKDATE_S))
        .not_valid_after(_utc(now_wall_s + days * 86400))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, algorithm=None)
    )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_from_pem(data: bytes | str) -> x509.Certificate:
    raw = data.encode("ascii") if isinstance(data, str) else data
    try:
        return x509.load_pem_x509_certificate(raw)
    except ValueError as exc:
        raise CertificateError("not a PEM certificate", code="certificate_malformed") from exc


def certificate_public_key(cert: x509.Certificate) -> Ed25519PublicKey:
    key = cert.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise CertificateError("certificate key is not Ed25519", code="certificate_malformed")
    return key


def verify_issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> None:
    """Check that ``cert`` was signed by the CA key (raises :class:`CertificateError`)."""
    ca_key = certificate_public_key(ca_cert)
    try:
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes)
    except InvalidSignature as exc:
        raise CertificateError(
            "certificate was not issued by this cluster's CA", code="certificate_foreign"
        ) from exc


def node_certificate_info(cert: x509.Certificate) -> NodeCertificateInfo:
    subject = cert.subject
    cn = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ou = subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not cn or not ou:
        raise CertificateError(
            "certificate lacks the Populi subject fields", code="certificate_malformed"
        )
    return NodeCertificateInfo(
        principal_id=str(cn[0].value),
        cluster_id=str(ou[0].value),
        not_before_s=cert.not_valid_before_utc.timestamp(),
        not_after_s=cert.not_valid_after_utc.timestamp(),
        serial=format(cert.serial_number, "x"),
    )


def check_validity(cert: x509.Certificate, *, now_wall_s: float, skew_s: float) -> None:
    info = node_certificate_info(cert)
    if now_wall_s - skew_s > info.not_after_s:
        raise CertificateError(
            f"certificate of {info.principal_id} expired at "
            f"{_utc(info.not_after_s).isoformat(timespec='seconds')}; re-join with a new token",
            code="certificate_expired",
        )
    if now_wall_s + skew_s < info.not_before_s:
        raise CertificateError(
            f"certificate of {info.principal_id} is not valid before "
            f"{_utc(info.not_before_s).isoformat(timespec='seconds')}",
            code="certificate_not_yet_valid",
        )


__all__ = [
    "BACKDATE_S",
    "NODE_CERT_DAYS",
    "NodeCertificateInfo",
    "ca_pin",
    "cert_from_pem",
    "cert_to_pem",
    "certificate_public_key",
    "check_validity",
    "make_ca_certificate",
    "make_node_certificate",
    "node_certificate_info",
    "verify_issued_by",
]

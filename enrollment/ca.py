"""The cluster CA, voters' issuing (intermediate) CAs and node certificates (X.509, Ed25519).

The cluster root key signs a self-signed CA certificate (path length 1) and, for each
voter, an *issuer* certificate: CA, path length 0, for a key the voter made itself and
never lets go of (docs/adr/0018-intermediate-issuing-keys.md). The issuer signs node
certificates, join tokens and revocation lists, so the root key can live offline; it is
needed only for a new issuer or a root rotation. Clusters made before issuers existed have
node certificates signed by the root itself; both chains verify:

    node certificate -> root                     (a data dir from before issuers)
    node certificate -> issuer -> root           (path length 0: nothing below a leaf)

An issuer's subject is ``O=Populi issuer, OU=<cluster id>, CN=<voter node id>``: revoking
the voter's node id revokes its issuer, and every certificate it signed then stops
verifying (:func:`verify_chain`, and the TLS peer check through :func:`issuer_node_id`).
Peers trust only the root, never the system store, and do not check host names (NAT and
overlays change addresses): the chain and the node id in the certificate are what count.

Certificates carry Subject and Authority Key Identifiers (strict X.509 checks of newer
Pythons require them). Functions take ``now_wall_s`` and serial numbers as arguments.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
from collections.abc import Callable, Sequence
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
#: An issuer certificate's default lifetime. A voter whose issuer expires cannot sign
#: (it refuses before it tries); the root signs it a new one (runbooks/offline-root.md).
ISSUER_DAYS = 365
#: The organization of an issuer certificate's subject (a node certificate has ``Populi``).
ISSUER_ORGANIZATION = "Populi issuer"
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
    return _certificate(
        subject=name,
        subject_key=root_key.public_key(),
        signer_key=root_key,
        signer_cert=None,
        serial=serial,
        now_wall_s=now_wall_s,
        days=CA_VALIDITY_DAYS,
        constraints=x509.BasicConstraints(ca=True, path_length=1),
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
    return _certificate(
        subject=x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Populi"),
                x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, cluster_id),
                x509.NameAttribute(NameOID.COMMON_NAME, principal_id),
            ]
        ),
        subject_key=subject_key,
        signer_key=ca_key,
        signer_cert=ca_cert,
        serial=serial,
        now_wall_s=now_wall_s,
        days=days,
        constraints=x509.BasicConstraints(ca=False, path_length=None),
        leaf_extensions=(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            x509.SubjectAlternativeName(sans),
        ),
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _certificate(
    *,
    subject: x509.Name,
    subject_key: Ed25519PublicKey,
    signer_key: Ed25519PrivateKey,
    signer_cert: x509.Certificate | None,
    serial: int,
    now_wall_s: float,
    days: float,
    constraints: x509.BasicConstraints,
    leaf_extensions: Sequence[x509.ExtensionType] = (),
) -> x509.Certificate:
    """The one shape of every certificate here: valid from ``BACKDATE_S`` before
    ``now_wall_s`` for ``days``; a CA signs certificates (and lists), a leaf only signs,
    with its ``leaf_extensions``; Subject and Authority Key Identifiers. Signed by
    ``signer_key``, whose certificate is ``signer_cert`` (``None``: self-signed)."""
    ski = x509.SubjectKeyIdentifier.from_public_key(subject_key)
    if signer_cert is None:
        signer_name, signer_ski = subject, ski
    else:
        signer_name = signer_cert.subject
        signer_ski = signer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer_name)
        .public_key(subject_key)
        .serial_number(serial)
        .not_valid_before(_utc(now_wall_s - BACKDATE_S))
        .not_valid_after(_utc(now_wall_s + days * 86400))
        .add_extension(constraints, critical=True)
        .add_extension(_key_usage(ca=constraints.ca), critical=True)
    )
    for extension in leaf_extensions:
        builder = builder.add_extension(extension, critical=False)
    return (
        builder.add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(signer_ski),
            critical=False,
        )
        .sign(signer_key, algorithm=None)
    )


def issuer_name(cluster_id: str, node_id: str) -> x509.Name:
    """The subject of ``node_id``'s issuer certificate (distinct from its node certificate's,
    so that no certificate of the voter looks self-issued)."""
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ISSUER_ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, cluster_id),
            x509.NameAttribute(NameOID.COMMON_NAME, node_id),
        ]
    )


def make_issuer_certificate(
    *,
    root_key: Ed25519PrivateKey,
    root_cert: x509.Certificate,
    subject_key: Ed25519PublicKey,
    node_id: str,
    cluster_id: str,
    now_wall_s: float,
    serial: int,
    days: float = ISSUER_DAYS,
) -> x509.Certificate:
    """An issuer (intermediate) certificate for voter ``node_id``'s issuing key: CA,
    path length 0 (it signs node certificates, never another CA), signed by the root."""
    if certificate_public_key(root_cert) != root_key.public_key():
        raise CertificateError(
            "the root key does not belong to this CA certificate", code="root_key_mismatch"
        )
    return _certificate(
        subject=issuer_name(cluster_id, node_id),
        subject_key=subject_key,
        signer_key=root_key,
        signer_cert=root_cert,
        serial=serial,
        now_wall_s=now_wall_s,
        days=days,
        constraints=x509.BasicConstraints(ca=True, path_length=0),
    )


def make_issuer_request(
    *, issuer_key: Ed25519PrivateKey, node_id: str, cluster_id: str
) -> x509.CertificateSigningRequest:
    """What a voter hands to the root's holder: its issuing key's public half and its node
    id, signed by the issuing key (the key itself never leaves the voter)."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(issuer_name(cluster_id, node_id))
        .sign(issuer_key, algorithm=None)
    )


def request_from_pem(data: bytes | str) -> x509.CertificateSigningRequest:
    raw = data.encode("ascii") if isinstance(data, str) else data
    try:
        return x509.load_pem_x509_csr(raw)
    except ValueError as exc:
        raise CertificateError(
            "not a PEM certificate request", code="issuer_request_malformed"
        ) from exc


def issue_intermediate(
    *,
    root_key: Ed25519PrivateKey,
    root_cert: x509.Certificate,
    request: x509.CertificateSigningRequest,
    now_wall_s: float,
    serial: int,
    days: float = ISSUER_DAYS,
    expected_node_id: str | None = None,
) -> x509.Certificate:
    """The root signs a voter's issuer request (:func:`make_issuer_request`).

    The request must be signed by the key it names (proof of possession), name this
    cluster and a node id (``expected_node_id`` when the caller knows which voter it
    means). Raises :class:`CertificateError` (``issuer_request_*``)."""
    if not request.is_signature_valid:
        raise CertificateError(
            "the issuer request's signature does not verify", code="issuer_request_invalid"
        )
    key = request.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise CertificateError(
            "the issuer request's key is not Ed25519", code="issuer_request_invalid"
        )
    org = request.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    ou = request.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    cn = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not org or org[0].value != ISSUER_ORGANIZATION or not ou or not cn:
        raise CertificateError(
            "the request is not a Populi issuer request (make one with 'populi ca request')",
            code="issuer_request_invalid",
        )
    cluster_id = str(ou[0].value)
    root_ou = root_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not root_ou or root_ou[0].value != cluster_id:
        raise CertificateError(
            f"the issuer request is for cluster {cluster_id!r}, not this root's",
            code="issuer_request_wrong_cluster",
        )
    node_id = str(cn[0].value)
    if expected_node_id is not None and node_id != expected_node_id:
        raise CertificateError(
            f"the issuer request is for {node_id}, not {expected_node_id}",
            code="issuer_request_wrong_node",
        )
    return make_issuer_certificate(
        root_key=root_key,
        root_cert=root_cert,
        subject_key=key,
        node_id=node_id,
        cluster_id=cluster_id,
        now_wall_s=now_wall_s,
        serial=serial,
        days=days,
    )


def issuer_node_id(cert: x509.Certificate) -> str | None:
    """The voter whose issuer signed ``cert``, read from ``cert``'s issuer name; ``None``
    when the root signed it. Authentic once the chain verified (the issuer certificate that
    verified has exactly this subject, and the root puts the voter's node id there)."""
    org = cert.issuer.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if not org or org[0].value != ISSUER_ORGANIZATION:
        return None
    cn = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cn[0].value) if cn else ""


#: ``revoked(node_id, serial_hex)``: whether a revocation list revokes a certificate.
Revoked = Callable[[str, str], bool]


def check_issuer(
    issuer: x509.Certificate,
    *,
    root_public: Ed25519PublicKey,
    cluster_id: str | None,
    at_s: float,
    skew_s: float,
    revoked: Revoked | None = None,
) -> str:
    """Check one issuer certificate against the root and return its voter's node id.

    It must be signed by ``root_public`` (``issuer_foreign``), be a CA of path length 0
    that may sign certificates (``issuer_not_ca``, ``issuer_path_length``), name this
    cluster (``issuer_wrong_cluster``), be valid at ``at_s`` within ``skew_s``
    (``issuer_expired``, ``issuer_not_yet_valid``) and not be revoked (``issuer_revoked``).
    ``at_s`` is now for a certificate chain, and the signing time for a signed object (a
    token's ``not_before_ms``, a revocation list's ``issued_ms``)."""
    try:
        root_public.verify(issuer.signature, issuer.tbs_certificate_bytes)
    except InvalidSignature:
        raise CertificateError(
            "the issuer certificate was not signed by this cluster's root",
            code="issuer_foreign",
        ) from None
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise CertificateError(
            "the issuer certificate is not a CA certificate", code="issuer_not_ca"
        ) from None
    if not constraints.ca or not usage.key_cert_sign:
        raise CertificateError(
            "the issuer certificate is not a CA certificate", code="issuer_not_ca"
        )
    if constraints.path_length != 0:
        raise CertificateError(
            f"the issuer certificate has path length {constraints.path_length}, not 0",
            code="issuer_path_length",
        )
    org = issuer.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if not org or org[0].value != ISSUER_ORGANIZATION:
        raise CertificateError(
            "the issuer certificate is not a Populi issuer", code="issuer_not_ca"
        )
    info = node_certificate_info(issuer)
    if cluster_id is not None and info.cluster_id != cluster_id:
        raise CertificateError(
            f"the issuer certificate is for cluster {info.cluster_id!r}, not {cluster_id!r}",
            code="issuer_wrong_cluster",
        )
    _check_window(
        info,
        at_s=at_s,
        skew_s=skew_s,
        what="the issuer certificate",
        when_expired="the root must sign a new one (runbooks/offline-root.md)",
        codes=("issuer_expired", "issuer_not_yet_valid"),
    )
    if revoked is not None and revoked(info.principal_id, info.serial):
        raise CertificateError(
            f"the issuer of {info.principal_id} (serial {info.serial}) is revoked",
            code="issuer_revoked",
        )
    return info.principal_id


def verify_chain(
    leaf: x509.Certificate,
    chain: Sequence[x509.Certificate],
    root: x509.Certificate,
    *,
    now_wall_s: float,
    skew_s: float,
    revoked: Revoked | None = None,
) -> NodeCertificateInfo:
    """Check a node certificate and the chain it came with against the root.

    ``chain`` is empty (a node certificate the root signed: clusters from before issuers)
    or the one issuer certificate that signed ``leaf``; a longer chain is refused
    (``certificate_chain_too_long``). Each hop is checked: the issuer with
    :func:`check_issuer` (now), the leaf signed by it, not a CA, valid now and not revoked.
    Returns the leaf's info."""
    root_public = certificate_public_key(root)
    if len(chain) > 1:
        raise CertificateError(
            f"the certificate comes with {len(chain)} issuer certificates; at most one "
            "(an issuer signed by the root) is allowed",
            code="certificate_chain_too_long",
        )
    info = node_certificate_info(leaf)
    if chain:
        check_issuer(
            chain[0],
            root_public=root_public,
            cluster_id=info.cluster_id,
            at_s=now_wall_s,
            skew_s=skew_s,
            revoked=revoked,
        )
        verify_issued_by(leaf, chain[0])
    else:
        verify_issued_by(leaf, root)
    try:
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise CertificateError(
            "a CA certificate cannot stand for a node", code="certificate_malformed"
        )
    check_validity(leaf, now_wall_s=now_wall_s, skew_s=skew_s)
    if revoked is not None and revoked(info.principal_id, info.serial):
        raise CertificateError(
            f"the certificate of {info.principal_id} (serial {info.serial}) is revoked",
            code="certificate_revoked",
        )
    return info


def check_signing_issuer(
    issuer_der: bytes,
    *,
    signer: bytes,
    root_public: Ed25519PublicKey,
    cluster_id: str | None,
    signed_ms: int,
    revoked: Revoked | None = None,
) -> str:
    """For a signed object (a join token, a revocation list) that carries its issuer's
    certificate: the certificate is an issuer of this root (:func:`check_issuer`, at the
    object's own signing time), and its key is the raw ``signer`` key that signed the
    object (``issuer_key_mismatch``). Returns the issuer's voter node id."""
    try:
        issuer = x509.load_der_x509_certificate(issuer_der)
    except ValueError:
        raise CertificateError(
            "the issuer certificate is not DER X.509", code="issuer_malformed"
        ) from None
    node_id = check_issuer(
        issuer,
        root_public=root_public,
        cluster_id=cluster_id,
        at_s=signed_ms / 1000,
        skew_s=0,
        revoked=revoked,
    )
    if raw_public(certificate_public_key(issuer)) != signer:
        raise CertificateError(
            "the object is not signed by the key of the issuer certificate it carries",
            code="issuer_key_mismatch",
        )
    return node_id


def certificate_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True, slots=True)
class Issuer:
    """What signs node certificates, tokens and revocation lists on this node: its issuer
    key and certificate, or (a data dir from before issuers) the root key itself, with
    ``certificate`` ``None``."""

    key: Ed25519PrivateKey
    certificate: x509.Certificate | None
    root: x509.Certificate

    @property
    def signing_certificate(self) -> x509.Certificate:
        """The certificate whose subject signs (the issuer's, or the root's)."""
        return self.certificate if self.certificate is not None else self.root

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """What a node certificate it signs travels with (nothing when the root signs)."""
        return () if self.certificate is None else (self.certificate,)

    def chain_pem(self, leaf: x509.Certificate) -> str:
        """``leaf`` and its chain, one PEM text: what a node certificate file holds and
        what TLS presents."""
        return b"".join(cert_to_pem(c) for c in (leaf, *self.chain)).decode("ascii")


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def cert_from_pem(data: bytes | str) -> x509.Certificate:
    raw = data.encode("ascii") if isinstance(data, str) else data
    try:
        return x509.load_pem_x509_certificate(raw)
    except ValueError as exc:
        raise CertificateError("not a PEM certificate", code="certificate_malformed") from exc


def chain_from_pem(data: bytes | str) -> list[x509.Certificate]:
    """Every certificate of a PEM text (a node certificate file: the leaf, then its issuer)."""
    raw = data.encode("ascii") if isinstance(data, str) else data
    try:
        certs = x509.load_pem_x509_certificates(raw)
    except ValueError as exc:
        raise CertificateError("not a PEM certificate", code="certificate_malformed") from exc
    return certs


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
    _check_window(
        node_certificate_info(cert),
        at_s=now_wall_s,
        skew_s=skew_s,
        what="certificate",
        when_expired="re-join with a new token",
        codes=("certificate_expired", "certificate_not_yet_valid"),
    )


def _check_window(
    info: NodeCertificateInfo,
    *,
    at_s: float,
    skew_s: float,
    what: str,
    when_expired: str,
    codes: tuple[str, str],
) -> None:
    """``at_s`` lies in the certificate's validity, give or take ``skew_s``; else a
    CertificateError with ``codes`` (expired, not yet valid) about ``what``."""
    expired, not_yet_valid = codes
    if at_s - skew_s > info.not_after_s:
        raise CertificateError(
            f"{what} of {info.principal_id} expired at "
            f"{_utc(info.not_after_s).isoformat(timespec='seconds')}; {when_expired}",
            code=expired,
        )
    if at_s + skew_s < info.not_before_s:
        raise CertificateError(
            f"{what} of {info.principal_id} is not valid before "
            f"{_utc(info.not_before_s).isoformat(timespec='seconds')}",
            code=not_yet_valid,
        )


__all__ = [
    "BACKDATE_S",
    "ISSUER_DAYS",
    "ISSUER_ORGANIZATION",
    "NODE_CERT_DAYS",
    "Issuer",
    "NodeCertificateInfo",
    "Revoked",
    "ca_pin",
    "cert_from_pem",
    "cert_to_pem",
    "certificate_der",
    "certificate_public_key",
    "chain_from_pem",
    "check_issuer",
    "check_signing_issuer",
    "check_validity",
    "issue_intermediate",
    "issuer_name",
    "issuer_node_id",
    "make_ca_certificate",
    "make_issuer_certificate",
    "make_issuer_request",
    "make_node_certificate",
    "node_certificate_info",
    "request_from_pem",
    "verify_chain",
    "verify_issued_by",
]

"""The cluster's revocation list: signed, serial-numbered, grow-only in node ids.

the design (docs/design.md) ("Identity, enrollment and peer authentication"): a signed list with a strictly
increasing serial, pulled and pushed between nodes and checked on every request. Its wire
form follows the join token's::

    populi-revocations-1.<base64url-no-padding(signer_key[32] || signature[64] || payload)>

``payload`` is ``canonical_json(list.to_json())`` and the Ed25519 signature covers
``b"populi/revocations/v1\\x00" + payload``: version 1 is signed by the cluster root.

Version 2 (``populi-revocations-2.``, domain ``b"populi/revocations/v2\\x00"``) is signed
by a voter's issuer key (ADR 0018): the payload adds ``issuer``, the DER issuer
certificate (base64url), which must be a certificate of the root, CA with path length 0,
valid at the list's ``issued_ms``, for the key that signed (``revocation_bad_issuer``).
:func:`accept_newer` also refuses a list whose issuer the current list revokes
(``ignored_revoked_issuer``): a revoked voter cannot publish. Revoking a voter's node id
revokes its issuer, and with it every node certificate that issuer signed
(``enrollment.ca.verify_chain``, the TLS peer check).

Two sets live in a list, with different rules:

* revoked node ids only grow. A node id is never taken off, even after
  ``populi node delete``: a deleted record must not bring a stolen key back to life.
  :func:`accept_newer` refuses a higher serial that drops one (``ignored_not_superset``),
  so a signer bug or a replayed fork cannot un-revoke a node.
* blocked names keep a revoked node's name from being taken by a new key. An operator
  lifts one with ``populi node unretire NAME`` (:func:`unblock_name`): a new serial
  without the name. The node id stays revoked.

Lists are normalised on construction (nodes sorted by id, names sorted), so two lists
with the same content are equal and sign to the same payload. The list travels only as
signed text; stores keep that text and verify it when they load it.

Pure (docs/conventions.md, "Layers"): times come in as ``now_ms`` (UTC milliseconds).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from enrollment._sealed import (
    _MAX_MS,
    _check_ident,
    _check_int,
    _check_ms,
    _EnvelopeError,
    _FieldProblem,
    _list_field,
    _parse_canonical_object,
    _raw_public_key,
    _required,
    _seal,
    _show,
    _unseal,
)
from enrollment.ca import Revoked, certificate_der, check_signing_issuer
from enrollment.canonical import b64url_decode, b64url_encode, canonical_json, json_type
from enrollment.errors import CertificateError, ErrorKind, NodeNameError, RevocationError
from enrollment.tokens import (
    validate_node_name,
)

REVOCATIONS_VERSION = 1
REVOCATIONS_PREFIX = "populi-revocations-1."
REVOCATIONS_DOMAIN = b"populi/revocations/v1\x00"
#: Version 2: signed by a voter's issuer key, carrying the issuer certificate.
ISSUED_REVOCATIONS_VERSION = 2
ISSUED_REVOCATIONS_PREFIX = "populi-revocations-2."
ISSUED_REVOCATIONS_DOMAIN = b"populi/revocations/v2\x00"
_MAX_ISSUER_BYTES = 2048
#: Refused before decoding. About 12 000 revoked nodes fit, far beyond a personal mesh.
MAX_REVOCATIONS_CHARS = 4 * 1024 * 1024
MAX_REASON_CHARS = 200

AcceptOutcome = Literal[
    "accepted",
    "ignored_not_newer",
    "ignored_not_superset",
    "ignored_bad_signature",
    "ignored_foreign_signer",
    "ignored_malformed",
    "ignored_wrong_cluster",
    "ignored_bad_issuer",
    "ignored_revoked_issuer",
]

_OUTCOME_OF_CODE: Final[dict[str, AcceptOutcome]] = {
    "revocation_bad_signature": "ignored_bad_signature",
    "revocation_foreign_signer": "ignored_foreign_signer",
    "revocation_malformed": "ignored_malformed",
    "revocation_wrong_cluster": "ignored_wrong_cluster",
    "revocation_bad_issuer": "ignored_bad_issuer",
    "revocation_revoked_issuer": "ignored_revoked_issuer",
}

_FAMILY_RE = re.compile(r"populi-revocations-([0-9]{1,9})", re.ASCII)


class RevocationFieldError(RevocationError):
    """A :class:`RevokedNode` or :class:`RevocationList` was given an invalid field."""

    code = "revocation_bad_field"
    kind = ErrorKind.BAD_INPUT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"revocation list field {field}: {problem}", field=field)
        self.field = field
        self.problem = problem


class RevocationConflict(RevocationError):
    """The change is already in the list (``node_already_revoked``,
    ``name_already_blocked``)."""

    code = "revocation_conflict"
    kind = ErrorKind.CONFLICT


class RevocationNotFound(RevocationError):
    """The change undoes something the list does not hold (``name_not_blocked``)."""

    code = "revocation_not_found"
    kind = ErrorKind.NOT_FOUND


def _check_name(field_name: str, value: object) -> str:
    try:
        return validate_node_name(value)
    except NodeNameError as exc:
        raise _FieldProblem(field_name, str(exc)) from None


def _check_strings(field_name: str, values: object) -> tuple[Any, ...]:
    if not isinstance(values, tuple):
        raise _FieldProblem(field_name, f"must be a tuple, got {type(values).__name__}")
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise _FieldProblem(
                f"{field_name}[{index}]", f"must be a string, got {json_type(value)}"
            )
    if len(set(values)) != len(values):
        raise _FieldProblem(field_name, "lists an entry twice")
    return values


@dataclass(frozen=True, slots=True)
class RevokedNode:
    """One revoked node: its id, the name it had, why, when, and its certificate serials.

    ``reason`` is one line of at most 200 printable chars (it is shown in ``populi node
    list`` and logs).
    """

    node_id: str
    name: str
    reason: str
    revoked_ms: int
    cert_serials: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            _check_ident("node_id", self.node_id)
            _check_name("name", self.name)
            if not isinstance(self.reason, str):
                raise _FieldProblem("reason", f"must be a string, got {json_type(self.reason)}")
            if len(self.reason) > MAX_REASON_CHARS or not self.reason.isprintable():
                raise _FieldProblem(
                    "reason", f"must be one printable line of at most {MAX_REASON_CHARS} chars"
                )
            _check_ms("revoked_ms", self.revoked_ms)
            for index, serial in enumerate(_check_strings("cert_serials", self.cert_serials)):
                _check_ident(f"cert_serials[{index}]", serial)
        except _FieldProblem as problem:
            raise RevocationFieldError(problem.field, problem.problem) from None
        object.__setattr__(self, "cert_serials", tuple(sorted(self.cert_serials)))

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "name": self.name,
            "reason": self.reason,
            "revoked_ms": self.revoked_ms,
            "cert_serials": list(self.cert_serials),
        }


@dataclass(frozen=True, slots=True)
class RevocationList:
    """A cluster's revocation list at one serial. Always valid and normalised."""

    cluster_id: str
    serial: int
    issued_ms: int
    revoked: tuple[RevokedNode, ...] = ()
    blocked_names: tuple[str, ...] = ()
    _node_ids: frozenset[str] = field(init=False, repr=False, compare=False)
    _blocked: frozenset[str] = field(init=False, repr=False, compare=False)
    _serials: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            _check_ident("cluster_id", self.cluster_id)
            _check_int("serial", self.serial, 0, _MAX_MS)
            _check_ms("issued_ms", self.issued_ms)
            if not isinstance(self.revoked, tuple):
                raise _FieldProblem(
                    "revoked", f"must be a tuple, got {type(self.revoked).__name__}"
                )
            for index, node in enumerate(self.revoked):
                if not isinstance(node, RevokedNode):
                    raise _FieldProblem(f"revoked[{index}]", "must be a RevokedNode")
            node_ids = frozenset(node.node_id for node in self.revoked)
            if len(node_ids) != len(self.revoked):
                raise _FieldProblem("revoked", "lists a node id twice")
            for index, name in enumerate(_check_strings("blocked_names", self.blocked_names)):
                _check_name(f"blocked_names[{index}]", name)
        except _FieldProblem as problem:
            raise RevocationFieldError(problem.field, problem.problem) from None
        object.__setattr__(
            self, "revoked", tuple(sorted(self.revoked, key=lambda node: node.node_id))
        )
        object.__setattr__(self, "blocked_names", tuple(sorted(self.blocked_names)))
        object.__setattr__(self, "_node_ids", node_ids)
        object.__setattr__(self, "_blocked", frozenset(self.blocked_names))
        object.__setattr__(
            self,
            "_serials",
            frozenset(serial.lower() for node in self.revoked for serial in node.cert_serials),
        )

    @classmethod
    def empty(cls, cluster_id: str, *, now_ms: int) -> RevocationList:
        """The list a new cluster starts with: serial 0, nothing revoked."""
        return cls(cluster_id=cluster_id, serial=0, issued_ms=now_ms)

    def revokes_certificate(self, node_id: str, serial: str) -> bool:
        """:func:`is_certificate_revoked` as a method (an ``enrollment.ca.Revoked``)."""
        return is_certificate_revoked(self, node_id, serial)

    @property
    def node_ids(self) -> frozenset[str]:
        """Every revoked node id."""
        return self._node_ids

    def to_json(self) -> dict[str, Any]:
        """The signed payload."""
        return {
            "v": REVOCATIONS_VERSION,
            "cluster_id": self.cluster_id,
            "serial": self.serial,
            "issued_ms": self.issued_ms,
            "revoked": [node.to_json() for node in self.revoked],
            "blocked_names": list(self.blocked_names),
        }


# --- queries and the operations that make the next list ------------------------------


def is_revoked(lst: RevocationList, node_id: str) -> bool:
    """Whether ``node_id`` is revoked (a set lookup: this runs on every request)."""
    return node_id in lst._node_ids


def is_certificate_revoked(lst: RevocationList, node_id: str, serial: str) -> bool:
    """Whether a certificate for ``node_id`` with serial ``serial`` (lowercase hex, as
    ``enrollment.ca.node_certificate_info`` reads it) is revoked: its node is, or the
    serial is one a revoked node held. Checked when a peer presents its certificate."""
    return node_id in lst._node_ids or serial.lower() in lst._serials


def is_name_blocked(lst: RevocationList, name: str) -> bool:
    """Whether a new node may not take ``name``."""
    return name in lst._blocked


def _next(lst: RevocationList, now_ms: int, **changes: Any) -> RevocationList:
    return dataclasses.replace(lst, serial=lst.serial + 1, issued_ms=now_ms, **changes)


def revoke_node(lst: RevocationList, node: RevokedNode, *, now_ms: int) -> RevocationList:
    """The next list (serial + 1) with ``node`` revoked and its name blocked.

    Raises :class:`RevocationConflict` (``node_already_revoked``) if it already is.
    """
    if node.node_id in lst._node_ids:
        raise RevocationConflict(
            f"node {_show(node.node_id)} is already revoked (list serial {lst.serial})",
            code="node_already_revoked",
        )
    blocked = lst.blocked_names
    if node.name not in lst._blocked:
        blocked = (*blocked, node.name)
    return _next(lst, now_ms, revoked=(*lst.revoked, node), blocked_names=blocked)


def block_name(lst: RevocationList, name: str, *, now_ms: int) -> RevocationList:
    """The next list with ``name`` blocked (retire a name without revoking a node)."""
    validate_node_name(name)
    if name in lst._blocked:
        raise RevocationConflict(
            f"node name {name!r} is already blocked", code="name_already_blocked"
        )
    return _next(lst, now_ms, blocked_names=(*lst.blocked_names, name))


def unblock_name(lst: RevocationList, name: str, *, now_ms: int) -> RevocationList:
    """The next list without ``name`` blocked (``populi node unretire NAME``).

    Revoked node ids stay revoked; only the name becomes free for a new node. Raises
    :class:`RevocationNotFound` (``name_not_blocked``) if the name is not blocked.
    """
    validate_node_name(name)
    if name not in lst._blocked:
        raise RevocationNotFound(
            f"node name {name!r} is not blocked; nothing to unretire", code="name_not_blocked"
        )
    remaining = tuple(blocked for blocked in lst.blocked_names if blocked != name)
    return _next(lst, now_ms, blocked_names=remaining)


# --- wire -----------------------------------------------------------------------------


def sign_revocations(
    lst: RevocationList, signing_key: Ed25519PrivateKey, *, issuer: x509.Certificate | None = None
) -> str:
    """The signed wire form of ``lst``: version 1 signed by the root, or version 2 signed
    by the issuer key whose certificate ``issuer`` is (it travels in the payload)."""
    if issuer is None:
        text = _seal(
            REVOCATIONS_PREFIX, REVOCATIONS_DOMAIN, signing_key, canonical_json(lst.to_json())
        )
    else:
        payload = {
            **lst.to_json(),
            "v": ISSUED_REVOCATIONS_VERSION,
            "issuer": b64url_encode(certificate_der(issuer)),
        }
        text = _seal(
            ISSUED_REVOCATIONS_PREFIX,
            ISSUED_REVOCATIONS_DOMAIN,
            signing_key,
            canonical_json(payload),
        )
    if len(text) > MAX_REVOCATIONS_CHARS:
        raise RevocationFieldError(
            "revoked", f"the signed list would be {len(text)} chars, over {MAX_REVOCATIONS_CHARS}"
        )
    return text


def _malformed(problem: str, **details: Any) -> RevocationError:
    return RevocationError(
        f"revocation list is malformed: {problem}", code="revocation_malformed", **details
    )


def _list_from_payload(obj: dict[str, Any]) -> RevocationList:
    nodes = []
    for index, raw in enumerate(_list_field(obj, "revoked")):
        where = f"revoked[{index}]"
        if not isinstance(raw, dict):
            raise _FieldProblem(where, f"must be an object, got {json_type(raw)}")
        try:
            nodes.append(
                RevokedNode(
                    node_id=_required(raw, "node_id"),
                    name=_required(raw, "name"),
                    reason=_required(raw, "reason"),
                    revoked_ms=_required(raw, "revoked_ms"),
                    cert_serials=_list_field(raw, "cert_serials"),
                )
            )
        except _FieldProblem as problem:
            raise _FieldProblem(f"{where}.{problem.field}", problem.problem) from None
        except RevocationFieldError as exc:
            raise _FieldProblem(f"{where}.{exc.field}", exc.problem) from None
    try:
        return RevocationList(
            cluster_id=_required(obj, "cluster_id"),
            serial=_required(obj, "serial"),
            issued_ms=_required(obj, "issued_ms"),
            revoked=tuple(nodes),
            blocked_names=_list_field(obj, "blocked_names"),
        )
    except RevocationFieldError as exc:
        raise _FieldProblem(exc.field, exc.problem) from None


def _issuer_holds(
    obj: dict[str, Any],
    lst: RevocationList,
    signer: bytes,
    cluster_key: Ed25519PublicKey,
    revoked: Revoked | None,
) -> None:
    """Version 2: the issuer certificate in the payload is the root's and signed the list."""
    value = obj.get("issuer")
    try:
        if not isinstance(value, str):
            raise ValueError("is missing or not a string")
        der = b64url_decode(value)
        if not 0 < len(der) <= _MAX_ISSUER_BYTES:
            raise ValueError(f"must be 1 to {_MAX_ISSUER_BYTES} bytes")
    except ValueError as exc:
        raise _malformed(f"field issuer {exc}", field="issuer") from None
    try:
        check_signing_issuer(
            der,
            signer=signer,
            root_public=cluster_key,
            cluster_id=lst.cluster_id,
            signed_ms=lst.issued_ms,
            revoked=revoked,
        )
    except CertificateError as exc:
        code = (
            "revocation_revoked_issuer" if exc.code == "issuer_revoked" else "revocation_bad_issuer"
        )
        raise RevocationError(
            f"revocation list's issuer does not hold: {exc}", code=code, issuer_code=exc.code
        ) from None


def verify_revocations(
    text: str,
    *,
    cluster_key: Ed25519PublicKey,
    cluster_id: str,
    revoked: Revoked | None = None,
) -> RevocationList:
    """Check a signed revocation list and return it; raise :class:`RevocationError`.

    Order, as for join tokens: size and prefix, then the signature by the embedded key
    (``revocation_bad_signature``), then (version 1) that key is ``cluster_key``
    (``revocation_foreign_signer``), and only then the payload is parsed
    (``revocation_malformed``) and its cluster compared (``revocation_wrong_cluster``);
    for version 2 its issuer certificate is then checked under ``cluster_key`` and
    ``revoked`` (``revocation_bad_issuer``, ``revocation_revoked_issuer``).
    """
    if not isinstance(text, str):
        raise _malformed("it must be text")
    text = text.strip()
    if len(text) > MAX_REVOCATIONS_CHARS:
        raise _malformed(f"it is {len(text)} chars, over the {MAX_REVOCATIONS_CHARS} limit")
    head, dot, body = text.partition(".")
    version = {REVOCATIONS_PREFIX: 1, ISSUED_REVOCATIONS_PREFIX: 2}.get(head + dot)
    if version is None:
        family = _FAMILY_RE.fullmatch(head)
        if family and dot:
            raise _malformed(
                f"version {family.group(1)} is not supported; this Populi reads versions "
                f"{REVOCATIONS_VERSION} and {ISSUED_REVOCATIONS_VERSION}"
            )
        raise _malformed(f"it does not start with {REVOCATIONS_PREFIX!r}")
    try:
        signer, payload = _unseal(
            body, REVOCATIONS_DOMAIN if version == 1 else ISSUED_REVOCATIONS_DOMAIN
        )
    except _EnvelopeError as exc:
        if exc.kind == "bad_signature":
            raise RevocationError(
                f"revocation list {exc.problem}", code="revocation_bad_signature"
            ) from None
        raise _malformed(f"it {exc.problem}") from None
    if version == 1 and signer != _raw_public_key(cluster_key):
        raise RevocationError(
            "revocation list is not signed by this cluster's key", code="revocation_foreign_signer"
        )
    try:
        obj = _parse_canonical_object(payload)
        version_field = _required(obj, "v")
        if isinstance(version_field, bool) or version_field != version:
            raise _FieldProblem(
                "v", f"is {_show(version_field)} but the prefix says version {version}"
            )
        lst = _list_from_payload(obj)
    except ValueError as exc:
        raise _malformed(str(exc)) from None
    except _FieldProblem as problem:
        raise _malformed(f"field {problem}", field=problem.field) from None
    if lst.cluster_id != cluster_id:
        raise RevocationError(
            f"revocation list is for cluster {_show(lst.cluster_id)}, not {_show(cluster_id)}",
            code="revocation_wrong_cluster",
        )
    if version == ISSUED_REVOCATIONS_VERSION:
        _issuer_holds(obj, lst, signer, cluster_key, revoked)
    return lst


def accept_newer(
    current: RevocationList | None,
    candidate_text: str,
    *,
    cluster_key: Ed25519PublicKey,
    cluster_id: str,
) -> tuple[RevocationList | None, AcceptOutcome]:
    """Decide whether a received list replaces ``current``; never raises.

    Returns the list to keep and why. A candidate is accepted only if it verifies (signed
    by the root, or by an issuer that ``current`` does not revoke), has a strictly higher
    serial than ``current``, and still revokes every node id that ``current`` revokes
    (node ids are grow-only). Anything else leaves ``current`` in
    place; the outcome is for logs and metrics, since a peer pushing a stale list is
    ordinary gossip and not an error.
    """
    try:
        candidate = verify_revocations(
            candidate_text,
            cluster_key=cluster_key,
            cluster_id=cluster_id,
            revoked=None if current is None else current.revokes_certificate,
        )
    except RevocationError as exc:
        return current, _OUTCOME_OF_CODE.get(exc.code, "ignored_malformed")
    if current is not None:
        if candidate.serial <= current.serial:
            return current, "ignored_not_newer"
        if not current._node_ids <= candidate._node_ids:
            return current, "ignored_not_superset"
    return candidate, "accepted"


__all__ = [
    "ISSUED_REVOCATIONS_DOMAIN",
    "ISSUED_REVOCATIONS_PREFIX",
    "ISSUED_REVOCATIONS_VERSION",
    "MAX_REASON_CHARS",
    "MAX_REVOCATIONS_CHARS",
    "REVOCATIONS_DOMAIN",
    "REVOCATIONS_PREFIX",
    "REVOCATIONS_VERSION",
    "AcceptOutcome",
    "RevocationConflict",
    "RevocationFieldError",
    "RevocationList",
    "RevocationNotFound",
    "RevokedNode",
    "accept_newer",
    "block_name",
    "is_certificate_revoked",
    "is_name_blocked",
    "is_revoked",
    "revoke_node",
    "sign_revocations",
    "unblock_name",
    "verify_revocations",
]

"""Each control-plane write as one replicated item, and back (ADR 0017).

The control plane's state lives in tables (principals, registers, join tokens and their
uses, the revocation list, the settings record). With elections (ADR 0011) a change is
applied once a majority of voters stored it, so every change is first *one item* of
:mod:`populi_peer.core.replication`, proposed by the leader; every voter then puts the
winning items into its tables (``populi_peer.agent.replica``). This module says how each
change is one item (the ``*_item`` functions) and what an item means (:func:`decode`).

| change                         | item                                                   |
|--------------------------------|--------------------------------------------------------|
| a member joined / changed      | register ``(id, "member")``: the member JSON (and the  |
|                                | certificate its join issued, for a retried join)       |
| a member removed (name reused) | register ``(id, "member")``: ``{"removed": true}``     |
| a node deleted                 | the lifecycle tombstone: it drops every register of    |
|                                | the node, its member record included                   |
| lifecycle, GPU quarantine ...  | the register write itself                              |
| a join token minted            | element of ``issued_tokens`` keyed by the token id     |
| a join token revoked           | element of ``revoked_tokens`` keyed by the token id    |
| a token use consumed           | element of ``consumed_tokens`` keyed ``<token>/<use>``,|
|                                | value ``{"consumer": node}`` only: a retry by the same |
|                                | joiner compares equal, another joiner is refused       |
| a node revoked (retired)       | element of ``revoked_nodes`` keyed by the node id      |
| a certificate revoked          | element of ``revoked_certs`` keyed by its serial       |
| a retired node's name freed    | element of ``released_names`` keyed by the node id     |
| the settings record            | cluster record ``settings`` carrying the signed text   |

The signed revocation list is not replicated as such: it is *derived* from the
``revoked_nodes`` and ``released_names`` sets (:func:`revocation_content`), with a serial
that counts their elements. Grow-only sets make that serial grow with every change, and
two voters holding the same elements derive the same list (Ed25519 signs deterministically),
so a new leader serves the list its predecessor served, at the same serial.
A ``revoked_nodes`` element means the list's own entry
(:class:`enrollment.revocation.RevokedNode`), checked as the list checks it when it is
decoded: an element the signed list would refuse does not decode (``bad_record``).

Pure: no clock, no I/O. Stamps (term, hybrid clock, writer) come in as arguments.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from enrollment.revocation import RevocationFieldError, RevokedNode
from populi_peer.core.fencing import _int, _obj, _opt_str, _str, _str_tuple
from populi_peer.core.lifecycle import WriterClass
from populi_peer.core.membership import Member
from populi_peer.core.registers import LIFECYCLE, MEMBER, RegisterWrite, Stamp
from populi_peer.core.replication import ClusterRecord, Item, SetElement
from populi_peer.errors import BadRequest

#: The separator of a consumed token's key, ``<token id>/<use>`` (a token id never holds it).
USE_SEPARATOR: Final = "/"

_REMOVED: Final = {"removed": True}


def _bad(message: str) -> BadRequest:
    return BadRequest(message, code="bad_record")


# -- what an item means ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemberStored:
    """A principal's member record, and the certificate its join issued (``None`` once a
    renewal replaced it, and for operators)."""

    member: Member
    certificate: str | None


@dataclass(frozen=True, slots=True)
class MemberRemoved:
    """A principal's record removed while its node stays known (a name taken over)."""

    principal_id: str


@dataclass(frozen=True, slots=True)
class NodeForgotten:
    """A node deleted: the lifecycle tombstone, which drops every register of the node and
    its member record, for good."""

    write: RegisterWrite


@dataclass(frozen=True, slots=True)
class RegisterStored:
    """Any other register: lifecycle, GPU quarantine, addresses, labels."""

    write: RegisterWrite


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """What the cluster keeps of a join token it minted (never its secret)."""

    token_id: str
    digest: str
    roles: tuple[str, ...]
    name: str | None
    uses: int
    not_before_ms: int
    expires_ms: int
    created_ms: int
    created_by: str


@dataclass(frozen=True, slots=True)
class TokenRevoked:
    token_id: str
    revoked_ms: int
    actor: str


@dataclass(frozen=True, slots=True)
class TokenConsumed:
    """Use number ``use`` (from 1) of a token, taken by ``node_id``."""

    token_id: str
    use: int
    node_id: str


@dataclass(frozen=True, slots=True)
class CertRevoked:
    serial: str
    node_id: str


@dataclass(frozen=True, slots=True)
class NameReleased:
    """The name of revoked node ``node_id`` no longer blocked (``node unretire``)."""

    node_id: str
    name: str
    released_ms: int


@dataclass(frozen=True, slots=True)
class SettingsStored:
    serial: int
    text: str


@dataclass(frozen=True, slots=True)
class VotersStored:
    """The voter-set record: the election service's business, nothing to materialize."""

    record: ClusterRecord


Change = (
    MemberStored
    | MemberRemoved
    | NodeForgotten
    | RegisterStored
    | IssuedToken
    | TokenRevoked
    | TokenConsumed
    | RevokedNode
    | CertRevoked
    | NameReleased
    | SettingsStored
    | VotersStored
)


# -- from a change to an item ---------------------------------------------------------------


def member_body(member: Member, certificate: str | None) -> dict[str, Any]:
    """The value of a ``member`` register (the member's own JSON plus its token id)."""
    body = member.to_json()
    body["token_id"] = member.token_id
    if certificate is not None:
        body["certificate"] = certificate
    return body


def member_item(
    member: Member,
    *,
    certificate: str | None,
    stamp: Stamp,
    writer_class: WriterClass,
    actor: str,
    reason: str,
    at_wall_ms: int,
) -> RegisterWrite:
    return RegisterWrite(
        node_id=member.id,
        attribute=MEMBER,
        value=member_body(member, certificate),
        stamp=stamp,
        writer_class=writer_class,
        actor=actor,
        reason=reason,
        at_wall_ms=at_wall_ms,
    )


def member_removal_item(
    principal_id: str,
    *,
    stamp: Stamp,
    writer_class: WriterClass,
    actor: str,
    reason: str,
    at_wall_ms: int,
) -> RegisterWrite:
    return RegisterWrite(
        node_id=principal_id,
        attribute=MEMBER,
        value=dict(_REMOVED),
        stamp=stamp,
        writer_class=writer_class,
        actor=actor,
        reason=reason,
        at_wall_ms=at_wall_ms,
    )


def issued_token_item(token: IssuedToken, *, stamp: Stamp) -> SetElement:
    _check_token_id(token.token_id)
    value = {
        "digest": token.digest,
        "roles": sorted(token.roles),
        "name": token.name,
        "uses": token.uses,
        "not_before_ms": token.not_before_ms,
        "expires_ms": token.expires_ms,
        "created_ms": token.created_ms,
        "created_by": token.created_by,
    }
    return SetElement("issued_tokens", token.token_id, value, stamp)


def token_revocation_item(revoked: TokenRevoked, *, stamp: Stamp) -> SetElement:
    _check_token_id(revoked.token_id)
    value = {"revoked_ms": revoked.revoked_ms, "actor": revoked.actor}
    return SetElement("revoked_tokens", revoked.token_id, value, stamp)


def consumption_key(token_id: str, use: int) -> str:
    _check_token_id(token_id)
    if isinstance(use, bool) or not isinstance(use, int) or use < 1:
        raise _bad(f"token use must be a positive integer, got {use!r}")
    return f"{token_id}{USE_SEPARATOR}{use}"


def consumption_item(consumed: TokenConsumed, *, stamp: Stamp) -> SetElement:
    """One use of a token. The value names the consumer and nothing else (no time, no
    certificate): a retried join by the same node compares equal (ADR 0011 Decision 5)."""
    key = consumption_key(consumed.token_id, consumed.use)
    return SetElement("consumed_tokens", key, {"consumer": consumed.node_id}, stamp)


def node_revocation_item(revoked: RevokedNode, *, stamp: Stamp) -> SetElement:
    value = {
        "name": revoked.name,
        "reason": revoked.reason,
        "revoked_ms": revoked.revoked_ms,
        "cert_serials": sorted(revoked.cert_serials),
    }
    return SetElement("revoked_nodes", revoked.node_id, value, stamp)


def cert_revocation_item(revoked: CertRevoked, *, stamp: Stamp) -> SetElement:
    return SetElement("revoked_certs", revoked.serial, {"node_id": revoked.node_id}, stamp)


def name_release_item(released: NameReleased, *, stamp: Stamp) -> SetElement:
    value = {"name": released.name, "released_ms": released.released_ms}
    return SetElement("released_names", released.node_id, value, stamp)


def settings_item(*, serial: int, term: int, text: str, body: dict[str, Any]) -> ClusterRecord:
    """The settings record stored by the leader of ``term``: ``text`` is the signed record
    (checked by the caller), ``body`` its values."""
    return ClusterRecord(kind="settings", serial=serial, term=term, body=body, text=text)


def _check_token_id(token_id: object) -> None:
    if not isinstance(token_id, str) or not token_id or USE_SEPARATOR in token_id:
        raise _bad(f"token id must be a non-empty string without {USE_SEPARATOR!r}")


# -- from an item to a change ---------------------------------------------------------------


def decode(item: Item) -> Change:
    """What ``item`` changes in the control plane's tables. A malformed item is a
    ``BadRequest`` (``bad_record``) naming what is wrong; nothing else is raised."""
    if isinstance(item, RegisterWrite):
        return _decode_register(item)
    if isinstance(item, SetElement):
        return _decode_element(item)
    if isinstance(item, ClusterRecord):
        if item.kind == "settings":
            return SettingsStored(serial=item.serial, text=item.text)
        return VotersStored(item)
    raise _bad(f"not a record item: {type(item).__name__}")


def member_from_body(principal_id: str, body: Any) -> MemberStored | MemberRemoved:
    """A ``member`` register's value, checked: the record must be about ``principal_id``."""
    obj = _obj(body, "member record")
    if obj.get("removed") is True:
        return MemberRemoved(principal_id)
    what = "member record"
    member = Member(
        id=_str(obj, "id", what),
        kind=_str(obj, "kind", what),
        name=_str(obj, "name", what),
        public_key=_str(obj, "public_key", what),
        roles=_str_tuple(obj, "roles", what),
        addresses=_str_tuple(obj, "addresses", what),
        cert_serial=_str(obj, "cert_serial", what),
        cert_not_after_ms=_int(obj, "cert_not_after_ms", what),
        joined_ms=_int(obj, "joined_ms", what),
        token_id=_str(obj, "token_id", what),
        updated_ms=_int(obj, "updated_ms", what),
    )
    if member.id != principal_id:
        raise _bad(f"member record of {member.id!r} stored as the register of {principal_id!r}")
    if member.kind not in ("node", "operator"):
        raise _bad(f"member record: kind must be 'node' or 'operator', got {member.kind!r}")
    return MemberStored(member, _opt_str(obj, "certificate", what))


def _decode_register(write: RegisterWrite) -> Change:
    if write.attribute == MEMBER:
        return member_from_body(write.node_id, write.value)
    if write.attribute == LIFECYCLE and write.value is None:
        return NodeForgotten(write)
    return RegisterStored(write)


def _decode_element(element: SetElement) -> Change:
    value = element.value
    what = element.set_name
    if element.set_name == "consumed_tokens":
        token_id, _, use = element.key.rpartition(USE_SEPARATOR)
        if not token_id or not use.isdigit() or use.startswith("0"):
            raise _bad(f"consumed token key must be '<token>/<use>', got {element.key!r}")
        return TokenConsumed(token_id, int(use), _str(value, "consumer", what))
    if element.set_name == "issued_tokens":
        name = _opt_str(value, "name", what)
        return IssuedToken(
            token_id=element.key,
            digest=_str(value, "digest", what),
            roles=_str_tuple(value, "roles", what),
            name=name,
            uses=_positive(value, "uses", what),
            not_before_ms=_int(value, "not_before_ms", what),
            expires_ms=_int(value, "expires_ms", what),
            created_ms=_int(value, "created_ms", what),
            created_by=_str(value, "created_by", what),
        )
    if element.set_name == "revoked_tokens":
        return TokenRevoked(
            element.key, _int(value, "revoked_ms", what), _str(value, "actor", what)
        )
    if element.set_name == "revoked_nodes":
        try:
            return RevokedNode(
                node_id=element.key,
                name=_str(value, "name", what),
                reason=_str(value, "reason", what),
                revoked_ms=_int(value, "revoked_ms", what),
                cert_serials=_str_tuple(value, "cert_serials", what),
            )
        except RevocationFieldError as exc:
            raise _bad(f"{what}: {exc}") from None
    if element.set_name == "revoked_certs":
        return CertRevoked(element.key, _str(value, "node_id", what))
    return NameReleased(element.key, _str(value, "name", what), _int(value, "released_ms", what))


def _positive(value: Any, key: str, what: str) -> int:
    number = _int(value, key, what)
    if number < 1:
        raise _bad(f"{what}: field {key!r} must be at least 1, got {number}")
    return number


# -- the revocation list, derived -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RevocationContent:
    """What the signed revocation list says, derived from the replicated sets."""

    serial: int
    issued_ms: int
    revoked: tuple[RevokedNode, ...]
    blocked_names: tuple[str, ...]


def revocation_content(
    revoked: Iterable[RevokedNode], released: Iterable[NameReleased]
) -> RevocationContent:
    """The revocation list the sets stand for: every revoked node; the name of each one
    whose name was not released; serial = the number of elements (grows with every
    change, the same on every replica holding the same elements); issued at the latest
    change (0 for none), so equal sets give the same list."""
    nodes = sorted(revoked, key=lambda node: node.node_id)
    freed = {release.node_id: release for release in released}
    blocked = sorted({node.name for node in nodes if node.node_id not in freed})
    times = [node.revoked_ms for node in nodes] + [r.released_ms for r in freed.values()]
    return RevocationContent(
        serial=len(nodes) + len(freed),
        issued_ms=max(times, default=0),
        revoked=tuple(nodes),
        blocked_names=tuple(blocked),
    )


__all__ = [
    "USE_SEPARATOR",
    "CertRevoked",
    "Change",
    "IssuedToken",
    "MemberRemoved",
    "MemberStored",
    "NameReleased",
    "NodeForgotten",
    "RegisterStored",
    "RevocationContent",
    "SettingsStored",
    "TokenConsumed",
    "TokenRevoked",
    "VotersStored",
    "cert_revocation_item",
    "consumption_item",
    "consumption_key",
    "decode",
    "issued_token_item",
    "member_body",
    "member_from_body",
    "member_item",
    "member_removal_item",
    "name_release_item",
    "node_revocation_item",
    "revocation_content",
    "settings_item",
    "token_revocation_item",
]

"""What a node announces on the LAN and what a sighting is (no zeroconf here).

Service type ``_populi._tcp.local.``; instance ``populi-<node id>``; the SRV record gives
the port, the A/AAAA records the node's LAN addresses. TXT record (RFC 6763 §6), every
value public:

========  ==========================================================================
key       value
========  ==========================================================================
txtvers   ``1``: the layout of this record (RFC 6763 §6.7)
proto     the Populi wire protocol version (``populi_peer.PROTOCOL_VERSION``)
cluster   :func:`cluster_digest` of the cluster id: 32 hex digits
node      the node id (``n-`` + 16 base32 characters: a digest of its public key)
roles     role hints, comma-separated (``worker,submit,voter``): hints only
========  ==========================================================================

No name, no cluster name, no token, no key, no certificate: a sighting tells a LAN
neighbour only that a Populi node of some cluster listens there. The cluster is named by
a digest, so the announcement does not spell out the cluster id (which appears in
certificates); the digest is enough for a member to say "ours" and for a joiner to match
its token.

A sighting is a **hint**: a claim by whoever sent the packet. It is never admission, and
never trusted as an identity. Everything it is used for goes through TLS, which proves
the node id (docs/adr/0009): filling in a member's current address (the call still
names the node it means to reach), and offering a joiner the address of a node its token
names (the joiner checks the CA against the pin and the node id against the token's
recipients before it sends anything).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from populi_peer.errors import BadRequest

SERVICE_TYPE: Final = "_populi._tcp.local."
TXT_VERSION: Final = "1"
NODE_ID_RE: Final = re.compile(r"^n-[a-z2-7]{16}$")
DIGEST_RE: Final = re.compile(r"^[0-9a-f]{32}$")
ROLE_RE: Final = re.compile(r"^[a-z]{1,16}$")
MAX_ROLES: Final = 8
MAX_ADDRESSES: Final = 8

Relation = Literal["ours", "foreign", "unknown"]
Source = Literal["mdns", "static"]


def cluster_digest(cluster_id: str) -> str:
    """The public name of a cluster on the LAN: sha256 over a domain tag and the cluster
    id, 32 hex digits."""
    return hashlib.sha256(b"populi/cluster-digest/v1\x00" + cluster_id.encode()).hexdigest()[:32]


def instance_name(node_id: str) -> str:
    return f"populi-{node_id}.{SERVICE_TYPE}"


@dataclass(frozen=True, slots=True)
class Announcement:
    """What this node announces: its id, its cluster's digest, port, LAN addresses."""

    node_id: str
    cluster_digest: str
    port: int
    addresses: tuple[str, ...]
    roles: tuple[str, ...] = ()
    protocol_version: int = 1

    def txt(self) -> dict[str, str]:
        return {
            "txtvers": TXT_VERSION,
            "proto": str(self.protocol_version),
            "cluster": self.cluster_digest,
            "node": self.node_id,
            "roles": ",".join(self.roles),
        }

    @property
    def name(self) -> str:
        return instance_name(self.node_id)

    @property
    def server(self) -> str:
        return f"populi-{self.node_id}.local."


@dataclass(frozen=True, slots=True)
class Sighting:
    """A Populi node seen on the LAN (``mdns``) or at a configured static peer (``static``)."""

    node_id: str
    cluster_digest: str
    addresses: tuple[str, ...]
    source: Source = "mdns"
    roles: tuple[str, ...] = ()
    protocol_version: int = 1
    instance: str = ""
    #: For a static peer: whether its CA is our cluster's (TLS proved it), not just its
    #: digest claimed so.
    verified: bool = False
    extra: Mapping[str, str] = field(default_factory=dict)

    def relation(self, our_digest: str | None) -> Relation:
        if our_digest is None:
            return "unknown"
        return "ours" if self.cluster_digest == our_digest else "foreign"

    def to_json(self, our_digest: str | None = None) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "cluster_digest": self.cluster_digest,
            "cluster": self.relation(our_digest),
            "addresses": list(self.addresses),
            "roles": list(self.roles),
            "protocol_version": self.protocol_version,
            "source": self.source,
            "instance": self.instance,
            "verified": self.verified,
        }


def _text(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return str(value)


def _address(ip: str, port: int) -> str:
    parsed = ipaddress.ip_address(ip)
    return f"[{parsed}]:{port}" if parsed.version == 6 else f"{parsed}:{port}"


def parse_sighting(
    *,
    instance: str,
    properties: Mapping[Any, Any],
    ips: Sequence[str],
    port: int | None,
) -> Sighting:
    """A sighting from a resolved mDNS service; :class:`BadRequest` (code
    ``bad_announcement``) naming the first thing wrong. Unknown TXT keys are ignored
    (a newer announcement adds some)."""
    props = {_text(k): _text(v) for k, v in properties.items()}

    def bad(message: str) -> BadRequest:
        return BadRequest(f"announcement {instance!r}: {message}", code="bad_announcement")

    if props.get("txtvers") != TXT_VERSION:
        raise bad(f"txtvers {props.get('txtvers')!r} is not {TXT_VERSION}")
    node_id = props.get("node") or ""
    if not NODE_ID_RE.fullmatch(node_id):
        raise bad(f"node {node_id[:40]!r} is not a node id")
    digest = props.get("cluster") or ""
    if not DIGEST_RE.fullmatch(digest):
        raise bad(f"cluster {digest[:40]!r} is not a cluster digest")
    proto_text = props.get("proto") or ""
    if not proto_text.isdigit() or len(proto_text) > 6:
        raise bad(f"proto {proto_text[:10]!r} is not a version number")
    roles = tuple(r for r in (props.get("roles") or "").split(",") if r)
    if len(roles) > MAX_ROLES or not all(ROLE_RE.fullmatch(r) for r in roles):
        raise bad("roles must be up to 8 lower-case words")
    if port is None or not 0 < port < 65536:
        raise bad(f"port {port!r} is not a port")
    addresses: list[str] = []
    for ip in ips[:MAX_ADDRESSES]:
        try:
            parsed = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            continue
        if parsed.is_link_local or parsed.is_unspecified or parsed.is_multicast:
            continue  # a link-local address needs a zone, which means nothing to others
        addresses.append(_address(str(parsed), port))
    if not addresses:
        raise bad("no usable address")
    return Sighting(
        node_id=node_id,
        cluster_digest=digest,
        addresses=tuple(addresses),
        source="mdns",
        roles=roles,
        protocol_version=int(proto_text),
        instance=instance,
    )


__all__ = [
    "SERVICE_TYPE",
    "Announcement",
    "Relation",
    "Sighting",
    "cluster_digest",
    "instance_name",
    "parse_sighting",
]

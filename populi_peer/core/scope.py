"""The scope of a network path: ``local``, ``lan`` or ``overlay`` (docs/design.md "Network scope").

Scope belongs to the path between two nodes, not to a node: the same peer can be ``lan``
from the next desk and ``overlay`` from a hotel. It is derived from the IP address used
for the path, and it chooses the timeouts (the one table of
:mod:`populi_peer.core.timings`) and the row of the work-class policy matrix.

:func:`path_scope` decides, first match wins:

1. operator CIDRs: ``overlay_cidrs``, then ``lan_cidrs``, then ``local_cidrs`` (so a
   WireGuard ``10.8.0.0/24`` listed as overlay is overlay although it is RFC 1918);
2. loopback (``127.0.0.0/8``, ``::1``) -> ``local``;
3. ``100.64.0.0/10`` (RFC 6598 shared space: CGNAT, Tailscale) and
   ``fd7a:115c:a1e0::/48`` (Tailscale's IPv6 range) -> ``overlay``. This comes before the
   ULA rule below because Tailscale's range lies inside ``fc00::/7``;
4. RFC 1918 (``10/8``, ``172.16/12``, ``192.168/16``), IPv6 ULA ``fc00::/7`` (RFC 4193) and
   link-local (``169.254/16``, ``fe80::/10``) -> ``lan``;
5. anything else, public addresses included -> ``overlay``.

Why ``overlay`` for the unknown: it is the most patient scope (longest heartbeat interval
and stale bound) and the most guarded policy row. Calling a LAN path ``overlay`` costs
slower failure detection; calling an Internet path ``lan`` would declare healthy peers
stale on every latency spike and trigger needless fallbacks, and would apply LAN policy to
traffic that crosses the Internet.

An IPv4-mapped IPv6 address (``::ffff:10.0.0.1``, what a dual-stack socket reports) is
judged by its IPv4 address, for the CIDR lists as well as the defaults.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from functools import lru_cache
from types import MappingProxyType
from typing import Final, Literal, get_args

from populi_peer.errors import BadRequest, ConfigError

Scope = Literal["local", "lan", "overlay"]
SCOPES: Final[tuple[Scope, ...]] = get_args(Scope)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LOCAL_DEFAULTS: Final = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
_OVERLAY_DEFAULTS: Final = (
    ipaddress.ip_network("100.64.0.0/10"),
    ipaddress.ip_network("fd7a:115c:a1e0::/48"),
)
_LAN_DEFAULTS: Final = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("172.16.0.0/12"),
    ipaddress.ip_network("192.168.0.0/16"),
    ipaddress.ip_network("169.254.0.0/16"),
    ipaddress.ip_network("fc00::/7"),
    ipaddress.ip_network("fe80::/10"),
)


def validate_cidrs(cidrs: Sequence[str], key_name: str) -> tuple[IpNetwork, ...]:
    """Parse a list of CIDRs from config; ``ConfigError`` naming ``key_name`` and the entry.

    A bare address is a one-address network. Host bits set (``10.8.0.1/24``) are refused:
    that is usually a typo for an address, not a range.
    """
    if isinstance(cidrs, (str, bytes)) or not isinstance(cidrs, Sequence):
        raise ConfigError(f"{key_name} must be a list of CIDR strings, got {cidrs!r}")
    networks: list[IpNetwork] = []
    for entry in cidrs:
        if not isinstance(entry, str):
            raise ConfigError(f"{key_name}: entry {entry!r} is not a string")
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=True))
        except ValueError as exc:
            hint = ""
            try:
                network = ipaddress.ip_network(entry.strip(), strict=False)
                hint = f"; did you mean {str(network)!r}?"
            except ValueError:
                hint = " (expected e.g. '10.8.0.0/24' or 'fd00::/8')"
            raise ConfigError(f"{key_name}: {entry!r} is not a valid CIDR{hint}") from exc
    return tuple(networks)


@lru_cache(maxsize=64)
def _networks(cidrs: tuple[str, ...], key_name: str) -> tuple[IpNetwork, ...]:
    return validate_cidrs(cidrs, key_name)


def parse_address(address: str) -> IpAddress:
    """The IP address of ``address``: ``IP``, ``IPv4:port``, ``[IPv6]`` or ``[IPv6]:port``.

    A bare IPv6 address is taken whole (``::1:8080`` is an address, not ``::1`` port 8080);
    put it in brackets to give a port. An IPv6 zone (``fe80::1%eth0``) is accepted. A host
    name is refused: the caller resolves names and passes the address it connects to.
    """
    if not isinstance(address, str):
        raise BadRequest(f"address must be a string, got {address!r}", field="address")
    text = address.strip()
    host = text
    port: str | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise BadRequest(f"address {address!r}: missing ']'", field="address")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise BadRequest(
                    f"address {address!r}: unexpected {rest!r} after ']'", field="address"
                )
            port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if port is not None and not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise BadRequest(f"address {address!r}: bad port {port!r}", field="address")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise BadRequest(
            f"address {address!r} is not an IP address; resolve host names before "
            "asking for a path's scope",
            field="address",
        ) from None
    if text.startswith("[") and ip.version != 6:
        raise BadRequest(f"address {address!r}: brackets are for IPv6 only", field="address")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        # Zones matter for routing, not for scope: fe80::1%eth0 is link-local either way.
        return ipaddress.IPv6Address(str(ip).split("%", 1)[0])
    return ip


def path_scope(
    address: str,
    *,
    lan_cidrs: Sequence[str] = (),
    overlay_cidrs: Sequence[str] = (),
    local_cidrs: Sequence[str] = (),
) -> Scope:
    """The scope of the path to ``address`` (see the module docstring for the rules).

    Raises :class:`~populi_peer.errors.BadRequest` for a host name, a malformed address or
    the unspecified address, and :class:`~populi_peer.errors.ConfigError` for a bad CIDR.
    """
    ip = parse_address(address)
    if ip.is_unspecified:
        raise BadRequest(
            f"address {address!r} is unspecified; a path needs the peer's address",
            field="address",
        )
    configured: tuple[tuple[Scope, Sequence[str], str], ...] = (
        ("overlay", overlay_cidrs, "overlay_cidrs"),
        ("lan", lan_cidrs, "lan_cidrs"),
        ("local", local_cidrs, "local_cidrs"),
    )
    for scope, cidrs, key_name in configured:
        if (
            isinstance(cidrs, (str, bytes))
            or not isinstance(cidrs, Sequence)
            or not all(isinstance(c, str) for c in cidrs)
        ):
            validate_cidrs(cidrs, key_name)  # raises, naming the key and the entry
        if any(ip in network for network in _networks(tuple(cidrs), key_name)):
            return scope
    if any(ip in network for network in _LOCAL_DEFAULTS):
        return "local"
    if any(ip in network for network in _OVERLAY_DEFAULTS):
        return "overlay"
    if any(ip in network for network in _LAN_DEFAULTS):
        return "lan"
    return "overlay"


_SCOPE_RANK: Final[Mapping[Scope, int]] = MappingProxyType({"local": 0, "lan": 1, "overlay": 2})


def best_path(
    addresses: Sequence[str],
    *,
    lan_cidrs: Sequence[str] = (),
    overlay_cidrs: Sequence[str] = (),
    local_cidrs: Sequence[str] = (),
) -> tuple[Scope, str] | None:
    """The nearest path among a peer's ``addresses`` (``host:port``, as its hint lists
    them): ``(scope, address)`` with the lowest scope, ``local`` before ``lan`` before
    ``overlay``, the first listed among equals; ``None`` for no address.

    A host name, or anything :func:`path_scope` cannot judge, counts as ``overlay``: the
    most patient timings and the most guarded policy row, as for unknown addresses.
    """
    best: tuple[int, int, Scope, str] | None = None
    for position, address in enumerate(addresses):
        try:
            scope = path_scope(
                address, lan_cidrs=lan_cidrs, overlay_cidrs=overlay_cidrs, local_cidrs=local_cidrs
            )
        except BadRequest:
            scope = "overlay"
        key = (_SCOPE_RANK[scope], position, scope, address)
        if best is None or key < best:
            best = key
    return None if best is None else (best[2], best[3])


__all__ = [
    "SCOPES",
    "Scope",
    "best_path",
    "parse_address",
    "path_scope",
    "validate_cidrs",
]

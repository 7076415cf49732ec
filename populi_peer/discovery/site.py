"""This machine's network as the address rules see it: interface addresses (with their
prefix and whether the interface is a layer-3 tunnel) and the main routing table.

Read once when the agent starts (and by ``populi join`` / ``populi discover``); the rules
themselves are pure (:mod:`populi_peer.core.addresses`). A tunnel is an interface of
type ``ARPHRD_NONE`` (``/sys/class/net/IF/type`` = 65534) or flagged point-to-point: the
``tun`` devices of WireGuard (kernel or wireguard-go), Nebula and Tailscale. Reading
never fails the caller: what cannot be read is left out (and :attr:`Site.problems` says
what).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from populi_peer.config import Config, format_host_port, parse_host_port
from populi_peer.core.addresses import (
    AdvertisePlan,
    Cidrs,
    LocalAddress,
    LocalRoute,
    cluster_is_overlay,
    effective_overlay_cidrs,
    plan_advertise,
    tunnel_networks,
)

ARPHRD_NONE = 65534
IFF_POINTOPOINT = 0x10
SYS_NET = Path("/sys/class/net")
PROC_NET = Path("/proc/net")


def _is_tunnel(name: str, sys_net: Path) -> bool:
    try:
        kind = int((sys_net / name / "type").read_text().strip())
        flags = int((sys_net / name / "flags").read_text().strip(), 16)
    except (OSError, ValueError):
        return False
    return kind == ARPHRD_NONE or bool(flags & IFF_POINTOPOINT)


def _ipv4_routes(text: str) -> list[LocalRoute]:
    routes = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 8:
            continue
        try:
            dest = ipaddress.IPv4Address(int(parts[1], 16).to_bytes(4, "little"))
            mask = ipaddress.IPv4Address(int(parts[7], 16).to_bytes(4, "little"))
            network = ipaddress.IPv4Network(f"{dest}/{mask}", strict=False)
        except ValueError:
            continue
        routes.append(LocalRoute(str(network), parts[0]))
    return routes


def _ipv6_routes(text: str) -> list[LocalRoute]:
    routes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 10:
            continue
        try:
            dest = ipaddress.IPv6Address(bytes.fromhex(parts[0]))
            network = ipaddress.IPv6Network(f"{dest}/{int(parts[1], 16)}", strict=False)
        except ValueError:
            continue
        routes.append(LocalRoute(str(network), parts[9]))
    return routes


@dataclass(frozen=True)
class Site:
    """This machine's interfaces and routes (empty: nothing known, as in virtual tests)."""

    local: tuple[LocalAddress, ...] = ()
    routes: tuple[LocalRoute, ...] = ()
    problems: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def detect(cls, *, sys_net: Path = SYS_NET, proc_net: Path = PROC_NET) -> Site:
        problems: list[str] = []
        local: list[LocalAddress] = []
        try:
            import ifaddr

            adapters = ifaddr.get_adapters()
        except (ImportError, OSError) as exc:
            adapters = []
            problems.append(f"cannot list interfaces: {exc}")
        for adapter in adapters:
            tunnel = _is_tunnel(adapter.name, sys_net)
            for ip in adapter.ips:
                text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
                try:
                    ipaddress.ip_address(text)
                except ValueError:
                    continue
                local.append(LocalAddress(adapter.name, text, int(ip.network_prefix), tunnel))
        routes: list[LocalRoute] = []
        for name, parse in (("route", _ipv4_routes), ("ipv6_route", _ipv6_routes)):
            try:
                routes += parse((proc_net / name).read_text())
            except OSError as exc:
                problems.append(f"cannot read {proc_net / name}: {exc.strerror}")
        return cls(tuple(local), tuple(routes), tuple(problems))

    def tunnel_networks(self) -> tuple[str, ...]:
        return tunnel_networks(self.local, self.routes)

    def cidrs(self, config: Config) -> Cidrs:
        """The operator's CIDR lists, with this machine's tunnel networks as overlay."""
        return Cidrs(
            lan=tuple(config.scope.lan_cidrs),
            overlay=tuple(
                effective_overlay_cidrs(config.scope.overlay_cidrs, self.tunnel_networks())
            ),
            local=tuple(config.scope.local_cidrs),
        )

    def lan_ips(self) -> list[str]:
        """IPv4 addresses of usable non-tunnel interfaces (where mDNS can be heard)."""
        return [a.ip for a in self.local if a.usable and not a.tunnel and a.address.version == 4]


def with_site(config: Config, site: Site) -> Config:
    """``config`` with this machine's tunnel networks added to ``scope.overlay_cidrs``,
    so that every scope decision (heartbeats, policy) knows them as overlay."""
    overlay = effective_overlay_cidrs(config.scope.overlay_cidrs, site.tunnel_networks())
    if overlay == list(config.scope.overlay_cidrs):
        return config
    return dataclasses.replace(
        config, scope=dataclasses.replace(config.scope, overlay_cidrs=overlay)
    )


def advertise_plan(
    config: Config,
    site: Site,
    *,
    control_plane_addresses: Sequence[str],
    listen: tuple[str, int] | None = None,
) -> AdvertisePlan:
    """The addresses this node advertises under ``config`` on this ``site``, given the
    control plane's addresses (the token's contacts, or the URL this node holds)."""
    cidrs = site.cidrs(config)
    return plan_advertise(
        listen=listen or parse_host_port(config.node.listen),
        advertise=config.node.advertise,
        advertise_lan=config.node.advertise_lan,
        advertise_overlay=config.node.advertise_overlay,
        local=site.local,
        cidrs=cidrs,
        overlay_cluster=cluster_is_overlay(control_plane_addresses, site.local, cidrs),
    )


def url_address(url: str) -> str:
    """``https://host:port/...`` -> ``host:port`` (brackets kept for IPv6)."""
    rest = url.split("://", 1)[-1].split("/", 1)[0]
    try:
        host, port = parse_host_port(rest)
    except ValueError:
        return rest
    return format_host_port(host, port)


__all__ = ["Site", "advertise_plan", "url_address", "with_site"]

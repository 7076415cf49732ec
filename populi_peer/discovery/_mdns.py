"""The one adapter to python-zeroconf: its own threads, sightings handed into trio.

python-zeroconf runs an asyncio loop in a thread of its own (``use_asyncio=False``: trio
runs no asyncio loop, and this says so rather than relying on its detection); a
``ServiceBrowser`` runs its callbacks on another thread of its own, where blocking is
allowed, so the callback resolves the service there (``get_service_info``, up to
:data:`RESOLVE_TIMEOUT_MS`) and hands the result to trio with
``trio.from_thread.run_sync``. Opening, registering (about 1.7 s: probing, RFC 6762 §8)
and closing block, so they run in ``trio.to_thread``. Nothing of zeroconf leaves this
module: zeroconf's errors become :class:`DiscoveryError`, its records :class:`Sighting`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import trio

from populi_peer.discovery._announce import SERVICE_TYPE, Announcement, Sighting, parse_sighting
from populi_peer.errors import PopuliError
from populi_peer.log import get_logger, log

#: How long the browser thread waits for a service's records once it saw its name.
RESOLVE_TIMEOUT_MS = 3000


class DiscoveryError(PopuliError):
    """LAN discovery could not start or stop (no usable interface, the multicast socket
    refused, a name conflict). Discovery is optional: the agent carries on without it."""

    code = "discovery_failed"


@dataclass(frozen=True, slots=True)
class Seen:
    """A service appeared or changed (``sighting``), or went away (``gone``)."""

    kind: Literal["seen", "gone", "bad"]
    instance: str
    sighting: Sighting | None = None
    problem: str = ""


OnEvent = Callable[[Seen], None]


def _resolve(zc: Any, service_type: str, name: str) -> Seen:
    info = zc.get_service_info(service_type, name, timeout=RESOLVE_TIMEOUT_MS)
    if info is None:
        return Seen("bad", name, problem="did not resolve in time")
    try:
        sighting = parse_sighting(
            instance=name,
            properties=info.properties,
            ips=info.parsed_addresses(),
            port=info.port,
        )
    except PopuliError as exc:
        return Seen("bad", name, problem=str(exc))
    return Seen("seen", name, sighting)


@dataclass(kw_only=True, eq=False, repr=False)
class MdnsBridge:
    """Announce ``announcement`` (if any) and browse ``_populi._tcp`` on the interfaces
    with addresses ``interfaces`` (IPv4), calling ``on_event`` in trio for each event."""

    interfaces: Sequence[str]
    on_event: OnEvent
    announcement: Announcement | None = None
    logger: ClassVar[logging.Logger] = get_logger("discovery")

    def __post_init__(self) -> None:
        if not self.interfaces:
            raise DiscoveryError("no LAN interface to announce or browse on", code="no_interface")
        self.interfaces = list(self.interfaces)  # zeroconf takes a list, no other sequence

    def _open(self) -> Any:
        from zeroconf import IPVersion, Zeroconf

        return Zeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only, use_asyncio=False)

    def _info(self) -> Any:
        from zeroconf import ServiceInfo

        assert self.announcement is not None
        a = self.announcement
        return ServiceInfo(
            SERVICE_TYPE,
            a.name,
            port=a.port,
            properties=a.txt(),
            server=a.server,
            parsed_addresses=list(a.addresses),
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open, announce, browse; ``started`` once browsing; runs until cancelled, then
        says goodbye (the unregister packets) and closes. Raises DiscoveryError if it
        cannot start."""
        from zeroconf import Error as ZeroconfError
        from zeroconf import ServiceBrowser, ServiceStateChange

        token = trio.lowlevel.current_trio_token()

        def deliver(event: Seen) -> None:
            try:
                trio.from_thread.run_sync(self.on_event, event, trio_token=token)
            except trio.RunFinishedError:
                pass  # trio is gone: nobody is listening any more

        def on_change(
            zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:
            # On the browser's own thread: blocking here is what it is for.
            if state_change is ServiceStateChange.Removed:
                deliver(Seen("gone", name))
                return
            try:
                deliver(_resolve(zeroconf, service_type, name))
            except ZeroconfError as exc:
                deliver(Seen("bad", name, problem=f"{type(exc).__name__}: {exc}"))

        try:
            zc = await trio.to_thread.run_sync(self._open)
        except (OSError, ZeroconfError, ValueError) as exc:
            raise DiscoveryError(
                f"cannot open mDNS on {', '.join(self.interfaces)}: {exc}", code="mdns_open_failed"
            ) from exc
        browser: Any = None
        try:
            if self.announcement is not None:
                info = self._info()
                try:
                    await trio.to_thread.run_sync(
                        lambda: zc.register_service(info, allow_name_change=False)
                    )
                except (ZeroconfError, OSError, ValueError) as exc:
                    raise DiscoveryError(
                        f"cannot announce {info.name}: {type(exc).__name__}: {exc}",
                        code="mdns_announce_failed",
                    ) from exc
            browser = await trio.to_thread.run_sync(
                lambda: ServiceBrowser(zc, SERVICE_TYPE, handlers=[on_change])
            )
            log(
                self.logger,
                logging.INFO,
                "mDNS discovery on",
                interfaces=self.interfaces,
                announced=self.announcement.name if self.announcement else None,
            )
            task_status.started()
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(self._close, zc, browser)

    def _close(self, zc: Any, browser: Any) -> None:
        from zeroconf import Error as ZeroconfError

        try:
            if browser is not None:
                browser.cancel()
            if self.announcement is not None:
                zc.unregister_all_services()  # goodbye packets: neighbours forget us now
        except (ZeroconfError, OSError) as exc:
            log(self.logger, logging.WARNING, "mDNS goodbye failed", error=str(exc))
        finally:
            zc.close()


__all__ = ["DiscoveryError", "MdnsBridge", "Seen"]

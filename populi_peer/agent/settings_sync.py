"""Settings reach every node at once.

Heartbeat answers carry a newer settings record to a node that lacks it, but only at its
next heartbeat: right after ``populi settings set remote_exec_enabled true`` a submitter
could still place a GPU task locally, or a worker refuse the handoff. So:

- the control plane pushes each new record to every node it knows (not retired, not left)
  right away (``POST /v1/populi/records/settings``), all at once, each call bounded by
  :data:`PUSH_TIMEOUT_S`, and says which nodes did not confirm (they still get it with
  their next heartbeat);
- a node accepts a pushed record exactly as one from a heartbeat answer: only signed by a
  voter of its membership view, only with a higher serial (``ClusterRecords.offer_settings``);
- a handoff names the serial it was placed under; a worker that holds an older record
  fetches the signed record from the control plane before it decides, and decides on the
  record it then holds — never on the serial alone (:meth:`SettingsSync.catch_up`).

Why a serial and not a ``(term, hybrid logical clock, writer)`` stamp: ADR 0003, "Ordering
the settings record".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import trio

from populi_peer.agent.membership import Membership
from populi_peer.agent.records import ClusterRecords
from populi_peer.agent.registry import Registry
from populi_peer.api.app import Request, Route
from populi_peer.api.client import PeerClient
from populi_peer.errors import BadRequest, PopuliError
from populi_peer.log import get_logger, log

VOTERS = frozenset({"voter"})
#: How long the control plane waits for one node to confirm a pushed record.
PUSH_TIMEOUT_S = 5.0
#: Lifecycle states of nodes that get no push (they take no part any more).
GONE_STATES = ("retired", "left")


class SettingsSync:
    def __init__(
        self,
        *,
        node_id: str,
        records: ClusterRecords,
        membership: Membership,
        registry: Registry,
        peers: Callable[[], PeerClient],
        control_plane: Callable[[], tuple[str, str]],
        timeout_s: float,
        rank: Callable[[str, Sequence[str]], list[str]] | None = None,
    ) -> None:
        """``control_plane()`` is the (url, node id) this node believes holds the role;
        ``timeout_s`` bounds one push or fetch (at most :data:`PUSH_TIMEOUT_S`)."""
        self.node_id = node_id
        self.records = records
        self.membership = membership
        self.registry = registry
        self.peers = peers
        self.control_plane = control_plane
        self.timeout_s = min(PUSH_TIMEOUT_S, timeout_s)
        #: ``rank(node_id, addresses)``: a node's addresses best first from here
        #: (discovery.service.AddressBook); their own order without it.
        self.rank = rank or (lambda node_id, addresses: list(addresses))
        self.logger = get_logger("settings")

    def routes(self) -> list[Route]:
        return [
            Route(
                "POST",
                "/v1/populi/records/settings",
                self._receive,
                roles=VOTERS,
                name="settings_push",
            )
        ]

    # -- receiving ------------------------------------------------------------------------

    async def _receive(self, request: Request) -> dict[str, Any]:
        record = request.json().get("record")
        if not isinstance(record, str) or not record:
            raise BadRequest("body needs 'record': a signed settings record", code="bad_request")
        installed = self.records.offer_settings(record)
        if installed:
            log(
                self.logger,
                logging.INFO,
                "settings record installed (pushed)",
                serial=self.records.settings_serial,
                by=request.caller.id,
            )
        await trio.lowlevel.checkpoint()
        return {"settings_serial": self.records.settings_serial, "installed": installed}

    # -- pushing (control plane) ----------------------------------------------------------

    def targets(self) -> list[tuple[str, str, str]]:
        """(node id, name, address) of every node the control plane pushes to."""
        out = []
        for member in self.membership.nodes():
            if member.id == self.node_id or not member.addresses:
                continue
            lifecycle = self.registry.lifecycle(member.id)
            if lifecycle is not None and lifecycle.state in GONE_STATES:
                continue
            out.append((member.id, member.name, self.rank(member.id, member.addresses)[0]))
        return out

    async def push(self) -> dict[str, Any]:
        """Push the current record to every node at once; returns who confirmed it and
        who did not (with why)."""
        record = self.records.settings_record
        serial = self.records.settings_serial
        confirmed: list[str] = []
        unconfirmed: list[dict[str, Any]] = []
        if record is None:
            await trio.lowlevel.checkpoint()
            return {"serial": serial, "confirmed": confirmed, "unconfirmed": unconfirmed}
        timeout_s = self.timeout_s

        async def one(node_id: str, name: str, address: str) -> None:
            reason, detail = "no_answer", f"no answer within {timeout_s:g} s"
            with trio.move_on_after(timeout_s):
                try:
                    answer = await self.peers().call(
                        url=f"https://{address}",
                        node_id=node_id,
                        method="POST",
                        path="/v1/populi/records/settings",
                        payload={"record": record.text},
                        timeout_s=timeout_s,
                    )
                except PopuliError as exc:
                    reason, detail = exc.code, str(exc)[:200]
                else:
                    held = answer.get("settings_serial")
                    if isinstance(held, int) and held >= serial:
                        confirmed.append(node_id)
                        return
                    reason, detail = "not_installed", f"the node holds serial {held!r}"
            unconfirmed.append(
                {"node_id": node_id, "name": name, "reason": reason, "detail": detail}
            )

        async with trio.open_nursery() as nursery:
            for target in self.targets():
                nursery.start_soon(one, *target)
        if unconfirmed:
            log(
                self.logger,
                logging.WARNING,
                "settings record not confirmed by every node; they get it with their next heartbeat",
                serial=serial,
                unconfirmed=[u["name"] for u in unconfirmed],
            )
        return {
            "serial": serial,
            "confirmed": sorted(confirmed),
            "unconfirmed": sorted(unconfirmed, key=lambda u: (u["name"], u["node_id"])),
        }

    # -- catching up (any node) -----------------------------------------------------------

    async def catch_up(self, serial: object) -> None:
        """A peer acted under settings record ``serial``: if this node holds an older one,
        fetch the signed record from the control plane (and install it if it verifies).
        The serial is only a hint to look; what is decided is decided on the record held."""
        url, cp_id = self.control_plane()
        if (
            isinstance(serial, bool)
            or not isinstance(serial, int)
            or serial <= self.records.settings_serial
            or cp_id == self.node_id
        ):
            await trio.lowlevel.checkpoint()
            return
        try:
            answer = await self.peers().call(
                url=url,
                node_id=cp_id,
                method="GET",
                path="/v1/populi/settings",
                timeout_s=self.timeout_s,
            )
            text = (answer.get("settings") or {}).get("record")
            if isinstance(text, str) and self.records.offer_settings(text):
                log(
                    self.logger,
                    logging.INFO,
                    "settings record fetched (a peer held a newer one)",
                    serial=self.records.settings_serial,
                )
        except PopuliError as exc:
            log(
                self.logger,
                logging.WARNING,
                "could not fetch the newer settings record; deciding on the one held",
                held=self.records.settings_serial,
                wanted=serial,
                error=str(exc),
            )


__all__ = ["PUSH_TIMEOUT_S", "SettingsSync"]

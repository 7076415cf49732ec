"""Cluster settings: shown by every node, changed on the control plane, and brought to
every node at once.

Heartbeat answers carry a newer settings record to a node that lacks it, but only at its
next heartbeat: right after ``populi settings set remote_exec_enabled true`` a submitter
could still place a GPU task locally, or a worker refuse the handoff. So:

- the control plane signs each change (``POST /v1/populi/admin/settings``) and pushes the
  new record to every node it knows (not retired, not left) right away
  (``POST /v1/populi/records/settings``), all at once, each call bounded by
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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import trio

from enrollment.records import SignedRecord
from populi_peer.agent.links import ControlPlaneLink, Rank
from populi_peer.agent.membership import Membership
from populi_peer.agent.records import ClusterRecords
from populi_peer.agent.registry import Registry
from populi_peer.agent.replica import ClusterWrites
from populi_peer.api.app import ANY_MEMBER, OPERATOR, Request, Route
from populi_peer.api.client import PeerClient
from populi_peer.clock import Clock, wall_ms
from populi_peer.core.cluster_state import settings_item
from populi_peer.core.messages import (
    PushMiss,
    PushReport,
    SettingsAnswer,
    SettingsChangeRequest,
    SettingsPushAnswer,
    SettingsPushRequest,
    SettingsSetAnswer,
)
from populi_peer.discovery.service import call_first
from populi_peer.errors import PopuliError
from populi_peer.identity import Identity
from populi_peer.log import NOTICE, get_logger, log
from populi_peer.store import Store
from populi_peer.store.events import EventLog

VOTERS = frozenset({"voter"})
#: How long the control plane waits for one node to confirm a pushed record.
PUSH_TIMEOUT_S = 5.0
#: Lifecycle states of nodes that get no push (they take no part any more).
GONE_STATES = ("retired", "left")
#: The store's note of the longest ``max_lease_ttl_s`` ever in force (ADR 0006, decision 5).
MAX_TTL_SEEN_KEY = "lease_max_ttl_seen_s"


@dataclass(kw_only=True, eq=False, repr=False)
class SettingsSync:
    """``identity`` signs the records this node makes as the control plane;
    ``timeout_s`` bounds one push or fetch (at most :data:`PUSH_TIMEOUT_S`);
    ``rank(node_id, addresses)`` orders a node's addresses best first from here
    (discovery.service.AddressBook; their own order without it)."""

    identity: Identity
    clock: Clock
    store: Store
    records: ClusterRecords
    membership: Membership
    registry: Registry
    events: EventLog
    control_plane: ControlPlaneLink
    peers: PeerClient
    timeout_s: float
    writes: ClusterWrites
    rank: Rank | None = None
    logger: ClassVar[logging.Logger] = get_logger("settings")

    def __post_init__(self) -> None:
        self.node_id = self.identity.node_id
        self.timeout_s = min(PUSH_TIMEOUT_S, self.timeout_s)

    def routes(self) -> list[Route]:
        return [
            Route(
                "GET",
                "/v1/populi/settings",
                self._show,
                roles=ANY_MEMBER,
                name="settings_show",
            ),
            Route(
                "POST",
                "/v1/populi/admin/settings",
                self._set,
                roles=OPERATOR,
                name="settings_set",
            ),
            Route(
                "POST",
                "/v1/populi/records/settings",
                self._receive,
                roles=VOTERS,
                name="settings_push",
            ),
        ]

    # -- showing and changing -------------------------------------------------------------

    async def _show(self, request: Request) -> SettingsAnswer:
        await trio.lowlevel.checkpoint()
        return SettingsAnswer(settings=self.records.settings_view(), term=self.control_plane.term)

    async def _set(self, request: Request) -> SettingsSetAnswer:
        self.control_plane.require_self()
        changes = dict(request.message(SettingsChangeRequest).changes)
        previous_ttl = float(self.records.settings["max_lease_ttl_s"])
        record = self.records.sign_change(
            changes,
            identity=self.identity,
            actor=request.caller.id,
            now_ms=wall_ms(self.clock),
        )
        if record is not None:
            await self._propose(record)
        if record is None:
            await trio.lowlevel.checkpoint()
            return SettingsSetAnswer(
                settings=self.records.settings_view(),
                term=self.control_plane.term,
                push=PushReport(serial=self.records.settings_serial, confirmed=(), unconfirmed=()),
                changed=False,
            )
        if float(self.records.settings["max_lease_ttl_s"]) != previous_ttl:
            # Remembered for the per-node resumption window after a restart (ADR 0015).
            seen = float(self.store.get_meta(MAX_TTL_SEEN_KEY, "0") or 0)
            self.store.set_meta(MAX_TTL_SEEN_KEY, str(max(seen, previous_ttl)))
        self.events.append(
            at_ms=wall_ms(self.clock),
            node_id=self.node_id,
            kind="settings_changed",
            actor=request.caller.id,
            detail={"changes": changes, "serial": record.serial},
        )
        # Every node at once, not at its next heartbeat; the answer says who did not confirm.
        push = await self.push()
        return SettingsSetAnswer(
            settings=self.records.settings_view(), term=self.control_plane.term, push=push
        )

    async def _propose(self, record: SignedRecord) -> None:
        """Store ``record`` through the election (ADR 0017); the replica installs it. What
        the tables held before the election ran goes first (the record held since
        ``populi init``), so that serials keep counting from it."""
        if self.writes.cluster_record("settings") is None:
            await self.writes.import_tables()
        await self.writes.propose(
            settings_item(
                serial=record.serial, term=self.writes.term, text=record.text, body=record.body
            )
        )

    # -- receiving ------------------------------------------------------------------------

    async def _receive(self, request: Request) -> SettingsPushAnswer:
        record = request.message(SettingsPushRequest).record
        installed = self.records.offer_settings(record)
        if installed:
            log(
                self.logger,
                NOTICE,
                "settings record installed (pushed)",
                serial=self.records.settings_serial,
                by=request.caller.id,
            )
        await trio.lowlevel.checkpoint()
        return SettingsPushAnswer(settings_serial=self.records.settings_serial, installed=installed)

    # -- pushing (control plane) ----------------------------------------------------------

    def targets(self) -> list[tuple[str, str, Sequence[str]]]:
        """(node id, name, addresses best first) of every node the control plane pushes to."""
        out = []
        for member in self.membership.nodes():
            if member.id == self.node_id or not member.addresses:
                continue
            lifecycle = self.registry.lifecycle(member.id)
            if lifecycle is not None and lifecycle.state in GONE_STATES:
                continue
            addresses = self.rank(member.id, member.addresses) if self.rank else member.addresses
            out.append((member.id, member.name, addresses))
        return out

    async def push(self) -> PushReport:
        """Push the current record to every node at once; returns who confirmed it and
        who did not (with why)."""
        record = self.records.settings_record
        serial = self.records.settings_serial
        confirmed: list[str] = []
        unconfirmed: list[PushMiss] = []
        if record is None:
            await trio.lowlevel.checkpoint()
            return PushReport(serial=serial, confirmed=(), unconfirmed=())
        timeout_s = self.timeout_s

        async def one(node_id: str, name: str, addresses: Sequence[str]) -> None:
            reason, detail = "no_answer", f"no answer within {timeout_s:g} s"
            with trio.move_on_after(timeout_s):
                try:
                    # Its addresses best first; the next only when nothing reached the one
                    # before (TLS proves who answers).
                    answer = await call_first(
                        addresses,
                        lambda address: self.peers.call(
                            url=f"https://{address}",
                            node_id=node_id,
                            method="POST",
                            path="/v1/populi/records/settings",
                            payload=SettingsPushRequest(record=record.text),
                            timeout_s=timeout_s,
                            answer=SettingsPushAnswer,
                        ),
                    )
                except PopuliError as exc:
                    reason, detail = exc.code, str(exc)[:200]
                else:
                    held = answer.settings_serial
                    if held >= serial:
                        confirmed.append(node_id)
                        return
                    reason, detail = "not_installed", f"the node holds serial {held!r}"
            unconfirmed.append(PushMiss(node_id=node_id, name=name, reason=reason, detail=detail))

        async with trio.open_nursery() as nursery:
            for target in self.targets():
                nursery.start_soon(one, *target)
        if unconfirmed:
            log(
                self.logger,
                logging.WARNING,
                "settings record not confirmed by every node; they get it with their next heartbeat",
                serial=serial,
                unconfirmed=[u.name for u in unconfirmed],
            )
        return PushReport(
            serial=serial,
            confirmed=tuple(sorted(confirmed)),
            unconfirmed=tuple(sorted(unconfirmed, key=lambda u: (u.name, u.node_id))),
        )

    # -- catching up (any node) -----------------------------------------------------------

    async def catch_up(self, serial: object) -> None:
        """A peer acted under settings record ``serial``: if this node holds an older one,
        fetch the signed record from the control plane (and install it if it verifies).
        The serial is only a hint to look; what is decided is decided on the record held."""
        if (
            isinstance(serial, bool)
            or not isinstance(serial, int)
            or serial <= self.records.settings_serial
            or self.control_plane.is_self
        ):
            await trio.lowlevel.checkpoint()
            return
        try:
            answer = await self.control_plane.call(
                method="GET",
                path="/v1/populi/settings",
                timeout_s=self.timeout_s,
                answer=SettingsAnswer,
            )
            text = answer.settings.record
            if text is not None and self.records.offer_settings(text):
                log(
                    self.logger,
                    NOTICE,
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


__all__ = ["MAX_TTL_SEEN_KEY", "PUSH_TIMEOUT_S", "SettingsSync"]

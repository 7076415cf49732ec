"""The materializer: replicated records into this node's tables (ADR 0017).

With elections (ADR 0011) a control-plane change is one item a majority of voters stores
(:mod:`populi_peer.core.cluster_state` says which). The election service calls
:meth:`Replica.apply` on every voter right after it persisted entries — the leader's own
writes, those merged when it was elected, those a heartbeat brought. :meth:`apply` puts
the winning items into the tables the rest of the agent reads (principals, registers,
join tokens and their uses, the revocation list, the settings record), so every reader
works unchanged on every voter, and refreshes the in-memory views once that committed.

- **Newer wins, by the item's own order.** The entries applied so far are kept (table
  ``replica_applied``) and merged with :class:`~populi_peer.core.replication.RecordSet`:
  only an entry that becomes a winner changes a table, so applying the same entries
  twice, in any order, or after a restart, changes nothing.
- **One transaction.** Every table change of one call, and the entries applied, commit
  together; memory adopts them only after the commit.
- **Never takes the agent down.** A write the storage refuses leaves the tables as they
  were and the entries pending: the next call applies them first (:attr:`lagging` says
  so meanwhile). An item that does not decode is logged and skipped, on every voter alike.
- The signed revocation list is derived from the ``revoked_nodes`` and
  ``released_names`` sets and signed with the cluster key when this node holds it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from typing import Any, ClassVar, Protocol

import trio

from enrollment.ca import Issuer
from enrollment.records import SignedRecord
from enrollment.revocation import RevocationList, RevokedNode, sign_revocations
from populi_peer.agent.membership import Member, Membership
from populi_peer.agent.records import ClusterRecords
from populi_peer.agent.registry import Registry
from populi_peer.agent.revocations import RevocationState
from populi_peer.core.cluster_state import (
    USE_SEPARATOR,
    Change,
    IssuedToken,
    MemberRemoved,
    MemberStored,
    NameReleased,
    NodeForgotten,
    RegisterStored,
    SettingsStored,
    TokenConsumed,
    TokenRevoked,
    consumption_item,
    consumption_key,
    decode,
    issued_token_item,
    member_item,
    name_release_item,
    node_revocation_item,
    revocation_content,
    settings_item,
    token_revocation_item,
)
from populi_peer.core.election import RoleChanged
from populi_peer.core.lifecycle import (
    Command,
    NodeLifecycle,
    apply_command,
    check_command_writer,
    effective,
)
from populi_peer.core.registers import LIFECYCLE, MEMBER, RegisterSet, RegisterWrite, Stamp
from populi_peer.core.replication import (
    ClusterKind,
    ClusterRecord,
    Entry,
    Item,
    RecordSet,
    SetElement,
)
from populi_peer.errors import (
    BadRequest,
    NotFound,
    PopuliError,
    ServiceUnavailable,
    StorageUnavailable,
    StoreError,
    enrollment_boundary,
)
from populi_peer.log import get_logger, log
from populi_peer.store import Store
from populi_peer.store.replica import AppliedEntries
from populi_peer.store.tokens import JoinTokens

#: The order a batch is applied in: tokens before their uses, uses before the member
#: records that name their certificates, members before registers (a tombstone removes
#: the member), the derived lists last.
_ORDER: dict[type, int] = {
    IssuedToken: 0,
    TokenRevoked: 1,
    TokenConsumed: 2,
    MemberStored: 3,
    MemberRemoved: 3,
    RegisterStored: 4,
    NodeForgotten: 4,
}


@dataclass(eq=False, repr=False)
class Replica:
    """Puts the records a majority of voters stored into this node's tables."""

    store: Store
    _: KW_ONLY
    membership: Membership
    registry: Registry
    records: ClusterRecords
    revocations: RevocationState
    issuer: Callable[[], Issuer | None]
    now_ms: Callable[[], int]
    logger: ClassVar[logging.Logger] = get_logger("replica")

    def __post_init__(self) -> None:
        self.applied_rows = AppliedEntries(self.store)
        self.tokens = JoinTokens(self.store)
        entries = [Entry.from_json(data) for data in self.applied_rows.all()]
        self.applied, _ = RecordSet().merge(entries)
        #: Entries a failed commit left unapplied; applied first by the next call.
        self.pending: tuple[Entry, ...] = ()
        self._settings_installed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Tell the settings listeners (the election's timings among them) of a settings
        record :meth:`apply` installed — here, after the election step that stored it: a
        listener that feeds the election must not run inside that step."""
        task_status.started()
        while True:
            await self._settings_installed.wait()
            self._settings_installed = trio.Event()
            self.records.notify_settings()

    def holds(self, item: Item) -> bool:
        """Whether ``item`` was stored here (it is applied, or waits to be)."""
        if any(entry.item == item for entry in self.pending):
            return True
        applied = self.applied
        if isinstance(item, RegisterWrite):
            return applied.registers.get(*item.key) == item
        if isinstance(item, SetElement):
            return applied.set_element(item.set_name, item.key) == item
        return applied.cluster_record(item.kind) == item

    @property
    def lagging(self) -> bool:
        """Whether some stored records are not in the tables yet (a failed write)."""
        return bool(self.pending)

    def apply(self, entries: Sequence[Entry]) -> None:
        """Put ``entries`` (and any left pending) into the tables, in one transaction.
        Never raises for bad entries or failed storage: see the module docstring."""
        batch = (*self.pending, *entries)
        try:
            self._apply(batch)
        except StoreError as exc:
            self.pending = batch
            log(
                self.logger,
                logging.ERROR,
                "replicated records not applied; will retry with the next ones",
                entries=len(batch),
                error=str(exc),
            )
            return
        self.pending = ()

    def _apply(self, batch: Sequence[Entry]) -> None:
        merged, won = self.applied.merge(batch)
        if not won:
            self.applied = merged
            return
        changes: list[tuple[Entry, Change]] = []
        for entry in won:
            try:
                changes.append((entry, decode(entry.item)))
            except BadRequest as exc:
                log(
                    self.logger,
                    logging.WARNING,
                    "replicated record skipped: it does not decode",
                    write_id=str(entry.write_id),
                    error=str(exc),
                )
        changes.sort(key=lambda pair: _ORDER.get(type(pair[1]), 5))
        adopt: list[Callable[[], None]] = []
        with self.store.transaction():
            registers: list[RegisterWrite] = []
            revocations_changed = False
            for entry, change in changes:
                if isinstance(change, (RegisterStored, NodeForgotten)):
                    registers.append(change.write)
                    if isinstance(change, NodeForgotten):
                        adopt.append(self._forget(change.write.node_id))
                elif isinstance(change, (RevokedNode, NameReleased)):
                    revocations_changed = True
                else:
                    adopt.append(self._stage(entry, change))
            staged = self.registry.stage_replicated(registers)
            if staged is not None:
                adopt.append(_adopt_registers(self.registry, staged))
            if revocations_changed:
                adopt.append(self._stage_revocations(merged))
            for entry in won:
                if isinstance(entry.item, RegisterWrite) and entry.item.is_tombstone:
                    self.applied_rows.drop_node(entry.item.node_id)
                self.applied_rows.put(entry.key, entry.to_json())
        self.applied = merged
        for step in adopt:
            step()

    # -- one change each, inside the transaction; each returns what memory adopts after

    def _stage(self, entry: Entry, change: Change) -> Callable[[], None]:
        if isinstance(change, IssuedToken):
            self.tokens.put_issued(
                token_id=change.token_id,
                digest=change.digest,
                roles=list(change.roles),
                name=change.name,
                uses=change.uses,
                not_before_ms=change.not_before_ms,
                expires_ms=change.expires_ms,
                created_ms=change.created_ms,
                created_by=change.created_by,
            )
        elif isinstance(change, TokenRevoked):
            self.tokens.revoke(change.token_id, now_ms=change.revoked_ms)
        elif isinstance(change, TokenConsumed):
            self._stage_use(entry, change)
        elif isinstance(change, MemberStored):
            return self._stage_member(change)
        elif isinstance(change, MemberRemoved):
            return self._forget(change.principal_id)
        elif isinstance(change, SettingsStored):
            return self._stage_settings(change)
        return _nothing

    def _stage_use(self, entry: Entry, change: TokenConsumed) -> None:
        item = entry.item
        assert isinstance(item, SetElement)
        before = self.applied.set_element("consumed_tokens", item.key)
        if before is not None and before.value.get("consumer") != change.node_id:
            # A use an older leader left on a minority, beaten by this one.
            self.tokens.drop_use(change.token_id, node_id=str(before.value.get("consumer")))
        self.tokens.record_use(
            change.token_id, node_id=change.node_id, at_ms=item.stamp.hlc.wall_ms
        )

    def _stage_member(self, change: MemberStored) -> Callable[[], None]:
        member = change.member
        try:
            with enrollment_boundary():
                self.membership.check_member(member)
        except PopuliError as exc:
            return self._skipped("replicated member record skipped", exc, principal=member.id)
        self.membership.store_member(member)
        if change.certificate is not None and member.token_id:
            self.tokens.set_certificate(
                member.token_id, node_id=member.id, certificate=change.certificate
            )
        return lambda: self.membership.adopt(member)

    def _forget(self, principal_id: str) -> Callable[[], None]:
        if self.membership.get(principal_id) is None:
            return _nothing
        self.membership.delete_member(principal_id)
        return lambda: self.membership.forget(principal_id)

    def _stage_settings(self, change: SettingsStored) -> Callable[[], None]:
        try:
            record = self.records.stage_replicated_settings(change.text)
        except PopuliError as exc:
            return self._skipped("replicated settings record skipped", exc, serial=change.serial)
        return _adopt_settings(self.records, record, self._settings_installed)

    def _stage_revocations(self, merged: RecordSet) -> Callable[[], None]:
        issuer = self.issuer()
        if issuer is None:
            log(
                self.logger,
                logging.WARNING,
                "revocations replicated but the list not re-signed: this node holds no "
                "issuer key (ADR 0018)",
            )
            return _nothing
        revoked = [_change(merged, "revoked_nodes", k) for k in merged.members("revoked_nodes")]
        released = [_change(merged, "released_names", k) for k in merged.members("released_names")]
        content = revocation_content(
            [c for c in revoked if isinstance(c, RevokedNode)],
            [c for c in released if isinstance(c, NameReleased)],
        )
        try:
            with enrollment_boundary():
                lst = RevocationList(
                    cluster_id=self.revocations.cluster_id,
                    serial=content.serial,
                    issued_ms=content.issued_ms,
                    revoked=content.revoked,
                    blocked_names=content.blocked_names,
                )
                text = sign_revocations(lst, issuer.key, issuer=issuer.certificate)
        except PopuliError as exc:
            return self._skipped("derived revocation list refused", exc)
        if not self.revocations.stage_derived(lst, text, now_ms=self.now_ms()):
            return _nothing
        return lambda: self.revocations.adopt(lst, text)

    def _skipped(self, message: str, exc: PopuliError, **fields: object) -> Callable[[], None]:
        """A replicated change this node refuses: logged (``message``, ``fields``, the
        error), and nothing to adopt."""
        log(self.logger, logging.WARNING, message, **fields, error=str(exc))
        return _nothing


def _change(records: RecordSet, set_name: Any, key: str) -> Change | None:
    element = records.set_element(set_name, key)
    if element is None:
        return None
    try:
        return decode(element)
    except BadRequest:
        return None


def _adopt_registers(registry: Registry, staged: RegisterSet) -> Callable[[], None]:
    return lambda: registry.adopt(staged)


def _adopt_settings(
    records: ClusterRecords, record: SignedRecord, installed: trio.Event
) -> Callable[[], None]:
    def adopt() -> None:
        records.adopt_settings(record)
        installed.set()

    return adopt


def _nothing() -> None:
    return None


# -- the leader's side: proposing ---------------------------------------------------------


class ElectionWriter(Protocol):
    """What :class:`ClusterWrites` needs of the election service."""

    @property
    def term(self) -> int: ...

    async def write(self, item: Item) -> Entry: ...


@dataclass(kw_only=True, eq=False, repr=False)
class ClusterWrites:
    """The control plane's write sites propose their change as one item through the
    election (``ElectionService.write``): it is applied once a majority of voters stored
    it, and this node's tables change only through :class:`Replica` (which the service
    calls as soon as the leader stored the item itself, before the majority answered).

    Refusals are the election's (``Conflict``: ``not_control_plane``, ``no_quorum``,
    ``token_already_consumed``...; ``ServiceUnavailable`` ``outcome_unknown``); a caller
    maps them to the codes it answered before."""

    election: ElectionWriter
    registry: Registry
    replica: Replica
    logger: ClassVar[logging.Logger] = get_logger("replica")

    def __post_init__(self) -> None:
        self.node_id = self.registry.identity.node_id
        self._leading = trio.Event()

    # -- importing what the tables held before the election ran ---------------------------

    def role_changed(self, change: RoleChanged) -> None:
        """An election role listener: once this node leads, :meth:`run` imports."""
        if change.role == "leader" and change.leader == self.node_id:
            self._leading.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Each time this node becomes the leader, propose what its tables hold and the
        replicated set lacks (:meth:`import_tables`), so that every voter — and the next
        leader — holds it too."""
        task_status.started()
        while True:
            await self._leading.wait()
            self._leading = trio.Event()
            try:
                imported = await self.import_tables()
            except PopuliError as exc:
                log(
                    self.logger,
                    logging.WARNING,
                    "tables not imported into the replicated records; next time this node leads",
                    error=str(exc),
                )
                continue
            if imported:
                log(
                    self.logger,
                    logging.INFO,
                    "tables imported into the replicated records",
                    items=imported,
                    term=self.term,
                )

    async def import_tables(self) -> int:
        """Propose every row the tables hold that the replicated set does not (a data
        directory that predates the election: the ``populi init`` node's own records, and
        whatever it wrote before), and a first lifecycle for every node without one; the
        number of items proposed. Idempotent: a second run
        finds nothing to propose. Each check reads the replicated set afresh: a write
        proposed meanwhile (a renewal, a command) is not overwritten by an import."""
        replica = self.replica
        count = 0
        now_ms = replica.now_ms()
        for member in replica.membership.all():
            if self._lacks_register(member.id, MEMBER):
                await self.propose_member(
                    member,
                    certificate=None,
                    actor=self.node_id,
                    reason="imported",
                    at_wall_ms=now_ms,
                )
                count += 1
        for write in self.registry.registers.writes():
            if self._lacks_register(*write.key) and write.stamp.term <= self.term:
                await self.propose(write)
                count += 1
        # Every node has a lifecycle register (the init node's is made here, the first
        # time it leads).
        for member in replica.membership.nodes():
            if self._lacks_register(member.id, LIFECYCLE):
                await self.propose(
                    self.registry.initial_write(member.id, actor=self.node_id, term=self.term)
                )
                count += 1
        for row in replica.tokens.all():
            if replica.applied.set_element("issued_tokens", row.token_id) is None:
                token = IssuedToken(
                    token_id=row.token_id,
                    digest=row.digest,
                    roles=row.roles,
                    name=row.name,
                    uses=row.uses_total,
                    not_before_ms=row.not_before_ms,
                    expires_ms=row.expires_ms,
                    created_ms=row.created_ms,
                    created_by=row.created_by,
                )
                await self.propose(issued_token_item(token, stamp=self.stamp()))
                count += 1
            if row.revoked_ms is not None and not self.token_revoked(row.token_id):
                revoked = TokenRevoked(row.token_id, row.revoked_ms, row.created_by)
                await self.propose(token_revocation_item(revoked, stamp=self.stamp()))
                count += 1
            for node_id in replica.tokens.used_by(row.token_id):
                use = self.token_use(row.token_id, node_id, max(row.uses_total, 1))
                if use is not None and not self._holds_use(row.token_id, use, node_id):
                    consumed = TokenConsumed(row.token_id, use, node_id)
                    await self.propose(consumption_item(consumed, stamp=self.stamp()))
                    count += 1
        held = replica.records.settings_record
        if held is not None and replica.applied.cluster_record("settings") is None:
            await self.propose(
                settings_item(serial=held.serial, term=self.term, text=held.text, body=held.body)
            )
            count += 1
        return count + await self.import_revocations()

    async def import_revocations(self) -> int:
        """Propose what the revocation list held here says and the replicated sets do not
        (a list signed before the election ran): the list is derived from the sets, so
        every revocation it ever held must be an element of them."""
        current = self.replica.revocations.current
        if current is None:
            return 0
        count = 0
        for node in current.revoked:
            if not self.node_revoked(node.node_id):
                await self.propose(node_revocation_item(node, stamp=self.stamp()))
                count += 1
            if node.name not in current.blocked_names and not self.name_released(node.node_id):
                released = NameReleased(node.node_id, node.name, current.issued_ms)
                await self.propose(name_release_item(released, stamp=self.stamp()))
                count += 1
        return count

    @property
    def term(self) -> int:
        return self.election.term

    def stamp(self) -> Stamp:
        """A stamp of the leader's term, this node's clock and id (set elements must carry
        the leader's term: ``check_proposal``)."""
        return Stamp(self.election.term, self.registry.tick(), self.node_id)

    async def propose(self, item: Item) -> Entry:
        """``item`` once a majority of voters stored it. A write the election could not
        persist here and that this node does not hold is ``storage_unavailable`` (the
        leader stores before it sends: nothing was stored anywhere), as before the
        election; other failures are the election's."""
        try:
            return await self.election.write(item)
        except ServiceUnavailable as exc:
            if exc.details.get("reason") != "persist_failed" or self.replica.holds(item):
                raise
            raise StorageUnavailable(
                "this control plane could not store the change (its storage failed); "
                "nothing was stored, try again later",
                condition=exc.details.get("condition", "unknown"),
            ) from exc

    async def propose_member(
        self,
        member: Member,
        *,
        certificate: str | None,
        actor: str,
        reason: str,
        at_wall_ms: int,
    ) -> Entry:
        """``member``'s record as the control plane writes it (a join, a renewal, an
        import): stamped with the leader's term, as the leader's write (:meth:`propose`)."""
        return await self.propose(
            member_item(
                member,
                certificate=certificate,
                stamp=self.stamp(),
                writer_class="leader",
                actor=actor,
                reason=reason,
                at_wall_ms=at_wall_ms,
            )
        )

    async def lifecycle_command(
        self,
        node_id: str,
        command: Command,
        *,
        actor: str,
        reason: str,
        deadline_wall_ms: int | None = None,
        until_wall_ms: int | None = None,
    ) -> tuple[NodeLifecycle | None, NodeLifecycle | None]:
        """An operator's lifecycle command checked against the register held here
        (illegal: raises, nothing changes) and, when it changes the register, proposed at
        this term: the node's lifecycle before and after."""
        check_command_writer(command, "operator")
        stored = self.registry.registers.lifecycle(node_id)
        if stored is None:
            raise NotFound(f"node {node_id} has no lifecycle record", code="unknown_node")
        now_ms = self.registry.now_ms()
        before = effective(stored, now_ms)
        after = apply_command(
            stored,
            command,
            now_wall_ms=now_ms,
            actor=actor,
            reason=reason,
            deadline_wall_ms=deadline_wall_ms,
            until_wall_ms=until_wall_ms,
        )
        if after is not stored:
            write = self.registry.make_write(
                node_id,
                LIFECYCLE,
                None if after is None else after.to_json(),
                writer_class="operator",
                actor=actor,
                reason=reason,
                term=self.term,
            )
            await self.propose(write)
        return before, after

    def cluster_record(self, kind: ClusterKind) -> ClusterRecord | None:
        """The ``kind`` record the replicated set holds (``None``: never stored through
        the election)."""
        return self.replica.applied.cluster_record(kind)

    def _lacks_register(self, node_id: str, attribute: str) -> bool:
        registers = self.replica.applied.registers
        return registers.get(node_id, attribute) is None and not registers.is_deleted(node_id)

    def token_revoked(self, token_id: str) -> bool:
        return self.replica.applied.set_element("revoked_tokens", token_id) is not None

    def _holds_use(self, token_id: str, use: int, node_id: str) -> bool:
        element = self.replica.applied.set_element(
            "consumed_tokens", consumption_key(token_id, use)
        )
        return element is not None and element.value.get("consumer") == node_id

    def node_revoked(self, node_id: str) -> bool:
        return self.replica.applied.set_element("revoked_nodes", node_id) is not None

    def name_released(self, node_id: str) -> bool:
        return self.replica.applied.set_element("released_names", node_id) is not None

    def token_use(self, token_id: str, node_id: str, uses: int) -> int | None:
        """The use of ``token_id`` that ``node_id`` takes: the one it already holds (a
        retried join proposes the same element again, which is accepted), else the lowest
        free one; ``None`` when all ``uses`` are taken by others."""
        records = self.replica.applied
        taken: set[int] = set()
        for key in records.members("consumed_tokens"):
            owner, _, use = key.rpartition(USE_SEPARATOR)
            if owner != token_id or not use.isdigit():
                continue
            element = records.set_element("consumed_tokens", key)
            if element is not None and element.value.get("consumer") == node_id:
                return int(use)
            taken.add(int(use))
        return next((n for n in range(1, uses + 1) if n not in taken), None)


__all__ = ["ClusterWrites", "ElectionWriter", "Replica"]

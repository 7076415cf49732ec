"""Per-(node, attribute) registers held by this node, persisted and signed.

Every write the control plane accepts is stored as a signed record (``kind="register"``,
signed by the node that stored it) so that a record read back — or, once election lands,
merged from another voter — can be checked. The in-memory :class:`RegisterSet` is the
merge of everything stored; lifecycle reads go through ``effective()`` so that a
maintenance window ends when read, never by a timer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import KW_ONLY, InitVar, dataclass
from typing import Any

from enrollment.records import sign_record, verify_record
from populi_peer.clock import Clock
from populi_peer.core.hlc import Hlc, hlc_receive, hlc_tick
from populi_peer.core.lifecycle import (
    NodeLifecycle,
    WriterClass,
    effective,
    initial_lifecycle,
)
from populi_peer.core.registers import LIFECYCLE, RegisterSet, RegisterWrite, Stamp
from populi_peer.identity import Identity
from populi_peer.store import Store
from populi_peer.store.registers import Registers


@dataclass(eq=False, repr=False)
class Registry:
    store: Store
    identity: Identity
    clock: Clock
    _: KW_ONLY
    max_skew_s: InitVar[float]

    def __post_init__(self, max_skew_s: float) -> None:
        self.rows = Registers(self.store)
        self.max_skew_ms = int(max_skew_s * 1000)
        writes = []
        for text in self.rows.all():
            record = verify_record(text, expected_kind="register")
            writes.append(RegisterWrite.from_json(record.body))
        self.registers = RegisterSet(writes)
        saved = self.store.get_meta_json("hlc")
        self._hlc = Hlc.from_json(saved) if saved else Hlc(0, 0)

    def now_ms(self) -> int:
        return int(self.clock.wall() * 1000)

    def tick(self) -> Hlc:
        """This node's next clock value (a stamp of a write it makes)."""
        self._hlc = hlc_tick(self._hlc, self.now_ms())
        return self._hlc

    def observe(self, remote: Hlc) -> None:
        self._hlc = hlc_receive(self._hlc, remote, self.now_ms(), self.max_skew_ms)

    def make_write(
        self,
        node_id: str,
        attribute: str,
        value: dict[str, Any] | None,
        *,
        writer_class: WriterClass,
        actor: str,
        reason: str,
        term: int,
    ) -> RegisterWrite:
        writer = node_id if writer_class == "self" else actor
        return RegisterWrite(
            node_id=node_id,
            attribute=attribute,
            value=value,
            stamp=Stamp(term=term, hlc=self.tick(), writer=writer),
            writer_class=writer_class,
            actor=actor,
            reason=reason,
            at_wall_ms=self.now_ms(),
        )

    def apply(self, write: RegisterWrite) -> bool:
        """Merge ``write``; when it changes anything, store it (signed) durably first."""
        with self.store.transaction():
            merged = self.stage(write)
        if merged is None:
            return False
        self.adopt(merged)
        return True

    def stage(self, write: RegisterWrite) -> RegisterSet | None:
        """Store ``write`` (signed) in the caller's transaction if it changes anything, and
        return the merged set for :meth:`adopt` once that transaction committed; ``None``
        when it changes nothing. Memory is unchanged until then."""
        merged, changed = self.registers.apply(
            write, now_wall_ms=self.now_ms(), max_skew_ms=self.max_skew_ms
        )
        if not changed:
            return None
        self.observe(write.stamp.hlc)
        with self.store.transaction():
            self._put(write)
            self.store.set_meta_json("hlc", self._hlc.to_json())
        return merged

    def stage_replicated(self, writes: Iterable[RegisterWrite]) -> RegisterSet | None:
        """Store the register writes a majority of voters holds (ADR 0017) in the caller's
        transaction, each only if it wins against what is held here (the item's own
        order: a replayed or older write changes nothing), and return the merged set for
        :meth:`adopt`; ``None`` when nothing changes. No skew check: the leader that
        proposed them made it."""
        incoming = RegisterSet(writes)
        merged = self.registers.merge(incoming)
        if merged is self.registers:
            return None
        with self.store.transaction():
            for write in incoming.writes():
                if merged.get(*write.key) != write or self.registers.get(*write.key) == write:
                    continue
                self.observe_replicated(write.stamp.hlc)
                self._put(write)
            self.store.set_meta_json("hlc", self._hlc.to_json())
        return merged

    def _put(self, write: RegisterWrite) -> None:
        """Store ``write``'s row, signed by this node, in the caller's transaction."""
        text = sign_record(
            kind="register",
            serial=0,
            body=write.to_json(),
            signer_id=self.identity.node_id,
            signer_key=self.identity.node_key,
            now_ms=self.now_ms(),
            actor=write.actor,
        )
        if write.attribute == LIFECYCLE and write.value is None:
            # A tombstone drops the node's other registers for good.
            self.rows.drop_node(write.node_id)
        self.rows.put(write.node_id, write.attribute, text)

    def observe_replicated(self, remote: Hlc) -> None:
        """Move this node's clock past a replicated stamp, without the skew check (it was
        made when the leader accepted the write; refusing it here would only leave this
        replica behind)."""
        self._hlc = max(self._hlc, remote)

    def adopt(self, merged: RegisterSet) -> None:
        """Show a committed :meth:`stage` to this node."""
        self.registers = merged

    # -- lifecycle ------------------------------------------------------------------------

    def lifecycle(self, node_id: str) -> NodeLifecycle | None:
        """The effective lifecycle of a node now (maintenance ends when read)."""
        stored = self.registers.lifecycle(node_id)
        return None if stored is None else effective(stored, self.now_ms())

    def set_initial(self, node_id: str, *, actor: str, term: int) -> None:
        self.apply(self.initial_write(node_id, actor=actor, term=term))

    def initial_write(self, node_id: str, *, actor: str, term: int) -> RegisterWrite:
        """The lifecycle register of a node that just joined (active)."""
        lc = initial_lifecycle(now_wall_ms=self.now_ms(), actor=actor)
        return self.make_write(
            node_id,
            LIFECYCLE,
            lc.to_json(),
            writer_class="leader",
            actor=actor,
            reason="joined",
            term=term,
        )

    def node_writes_json(self, node_id: str) -> dict[str, Any]:
        return {attr: write.to_json() for attr, write in self.registers.node(node_id).items()}


__all__ = ["Registry"]

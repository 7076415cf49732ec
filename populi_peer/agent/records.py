"""Cluster records held by this node: the settings record (serial, signer, values).

The control plane signs a new record for every change (serial + 1) with its node key on
behalf of the operator who asked; other nodes accept a record only with a higher serial
and a signature from a voter in their membership view.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from enrollment.records import SignedRecord, sign_record, verify_record
from populi_peer.agent.membership import Membership
from populi_peer.core import settings as cluster_settings
from populi_peer.core.messages import SettingsView
from populi_peer.errors import Forbidden, enrollment_boundary
from populi_peer.identity import Identity
from populi_peer.store import Store
from populi_peer.store.records import SignedRecords


@dataclass(eq=False, repr=False)
class ClusterRecords:
    store: Store
    membership: Membership

    def __post_init__(self) -> None:
        self.rows = SignedRecords(self.store)
        #: Called with the settings each time a record is installed (the election's timings).
        self.settings_listeners: list[Callable[[dict[str, Any]], None]] = []
        self.settings_record: SignedRecord | None = None
        self.settings: dict[str, Any] = cluster_settings.defaults()
        text = self.rows.text("settings")
        if text is not None:
            record = verify_record(text, expected_kind="settings")
            self._install(record)

    def _install(self, record: SignedRecord, *, notify: bool = True) -> None:
        self.settings_record = record
        self.settings = cluster_settings.validate_settings(record.body)
        if notify:
            self.notify_settings()

    def notify_settings(self) -> None:
        """Tell the settings listeners the settings held now."""
        for listener in self.settings_listeners:
            listener(self.settings)

    @property
    def settings_serial(self) -> int:
        return self.settings_record.serial if self.settings_record else 0

    def check_signer(self, record: SignedRecord) -> None:
        member = self.membership.get(record.signer)
        if (
            member is None
            or "voter" not in member.roles
            or self.membership.principal(record.signer) is None
        ):
            raise Forbidden(
                f"record signed by {record.signer}, who is not a voter",
                code="record_foreign_signer",
            )
        principal = self.membership.principal(record.signer)
        assert principal is not None
        if principal.public_key != record.signer_key:
            raise Forbidden(
                "record signer key does not match the member's key", code="record_foreign_signer"
            )

    def offer_settings(self, text: str) -> bool:
        """Install a settings record from the control plane if newer and properly signed."""
        with enrollment_boundary():
            record = verify_record(text, expected_kind="settings")
        if record.serial <= self.settings_serial:
            return False
        self.check_signer(record)
        cluster_settings.validate_settings(record.body)
        with self.store.transaction():
            self.rows.put(
                "settings", serial=record.serial, text=record.text, stored_ms=record.signed_ms
            )
        self._install(record)
        return True

    def stage_replicated_settings(self, text: str) -> SignedRecord:
        """Store the settings record a majority of voters holds (ADR 0017) in the caller's
        transaction, whatever the serial held here (the replicated order is the record's
        own: term, then serial); :meth:`adopt_settings` once that committed."""
        with enrollment_boundary():
            record = verify_record(text, expected_kind="settings")
        cluster_settings.validate_settings(record.body)
        with self.store.transaction():
            self.rows.put(
                "settings", serial=record.serial, text=record.text, stored_ms=record.signed_ms
            )
        return record

    def adopt_settings(self, record: SignedRecord) -> None:
        """Show a committed :meth:`stage_replicated_settings`; the listeners are told by
        the caller (:meth:`notify_settings`), outside the election step that stored it."""
        self._install(record, notify=False)

    def sign_change(
        self, changes: dict[str, Any], *, identity: Identity, actor: str, now_ms: int
    ) -> SignedRecord | None:
        """Control plane: validate ``changes`` and sign the next settings record (serial
        + 1); ``None`` when every value is already as asked. Nothing is stored: the record
        is proposed through the election and installed by the replica (ADR 0017)."""
        current = cluster_settings.validate_settings(dict(self.settings))
        values = dict(current)
        for key, value in changes.items():
            values[key] = cluster_settings.validate_value(key, value)
        values = cluster_settings.validate_settings(values)
        cluster_settings.check_settings_change(current, values)
        if values == current and self.settings_record is not None:
            return None
        text = sign_record(
            kind="settings",
            serial=self.settings_serial + 1,
            body=cluster_settings.signed_body(values),
            signer_id=identity.node_id,
            signer_key=identity.node_key,
            now_ms=now_ms,
            actor=actor,
        )
        return verify_record(text, expected_kind="settings")

    def policy_gates(self) -> frozenset[tuple[str, str]]:
        """The gated work-class cells the settings held here switch on."""
        return cluster_settings.gates_enabled(self.settings)

    def settings_view(self) -> SettingsView:
        record = self.settings_record
        return SettingsView(
            serial=self.settings_serial,
            signer=record.signer if record else None,
            actor=record.actor if record else None,
            signed_ms=record.signed_ms if record else None,
            values=MappingProxyType(dict(self.settings)),
            record=record.text if record else None,
        )


__all__ = ["ClusterRecords"]

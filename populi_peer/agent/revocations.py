"""This node's revocation list: a signed list with a strictly increasing serial.

Only lists signed by the cluster root, or by an issuer it certified that this list does not
revoke (ADR 0018), with a higher serial that keeps every revoked node
are installed (``enrollment.revocation.accept_newer``); anything else is ignored and
logged. The list is checked on every request (``Authenticator.is_revoked``), and on every
answer: this node calls no revoked node, and refuses a TLS peer whose certificate is
revoked (``populi_peer.api.tls``).
"""

from __future__ import annotations

import logging
from dataclasses import KW_ONLY, dataclass
from typing import ClassVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from enrollment.revocation import (
    RevocationList,
    accept_newer,
    is_certificate_revoked,
    is_name_blocked,
    is_revoked,
    sign_revocations,
    verify_revocations,
)
from populi_peer.log import NOTICE, get_logger, log
from populi_peer.store import Store
from populi_peer.store.revocations import RevocationLists


@dataclass(eq=False, repr=False)
class RevocationState:
    store: Store
    _: KW_ONLY
    cluster_id: str
    cluster_key: Ed25519PublicKey
    logger: ClassVar[logging.Logger] = get_logger("revocations")

    def __post_init__(self) -> None:
        self.current: RevocationList | None = None
        self.text: str | None = None
        self.rows = RevocationLists(self.store)
        text = self.rows.latest()
        if text is not None:
            self.current = verify_revocations(
                text, cluster_key=self.cluster_key, cluster_id=self.cluster_id
            )
            self.text = text

    @property
    def serial(self) -> int:
        return -1 if self.current is None else self.current.serial

    def is_revoked(self, principal_id: str) -> bool:
        return self.current is not None and is_revoked(self.current, principal_id)

    def is_certificate_revoked(self, node_id: str, serial: str) -> bool:
        """For the TLS peer check (``populi_peer.api.tls``): the certificate a peer
        presents in the handshake, by its node id and serial."""
        return self.current is not None and is_certificate_revoked(self.current, node_id, serial)

    def is_name_blocked(self, name: str) -> bool:
        return self.current is not None and is_name_blocked(self.current, name)

    def offer(self, text: str, *, now_ms: int) -> str:
        """Install ``text`` if it is a newer list from the cluster key; returns the outcome."""
        kept, outcome = accept_newer(
            self.current, text, cluster_key=self.cluster_key, cluster_id=self.cluster_id
        )
        if outcome == "accepted" and kept is not None:
            self._store(kept, text, now_ms)
            log(
                self.logger,
                NOTICE,
                "revocation list installed",
                serial=kept.serial,
                revoked=len(kept.revoked),
            )
        elif outcome != "ignored_not_newer":
            log(self.logger, logging.WARNING, "revocation list ignored", outcome=outcome)
        return outcome

    def publish(
        self,
        new: RevocationList,
        *,
        signing_key: Ed25519PrivateKey,
        now_ms: int,
        issuer: x509.Certificate | None = None,
    ) -> str:
        """Control plane: sign ``new`` and store it durably. ``signing_key`` is this node's
        issuer key, whose certificate ``issuer`` is (ADR 0018), or the root key itself
        (``issuer`` ``None``: a cluster made before issuers)."""
        text = sign_revocations(new, signing_key, issuer=issuer)
        kept, outcome = accept_newer(
            self.current, text, cluster_key=self.cluster_key, cluster_id=self.cluster_id
        )
        if outcome != "accepted" or kept is None:
            raise RuntimeError(
                f"refusing to publish a revocation list that peers would ignore ({outcome})"
            )
        self._store(kept, text, now_ms)
        return text

    def stage_derived(self, lst: RevocationList, text: str, *, now_ms: int) -> bool:
        """Store the list derived from the replicated sets (ADR 0017) in the caller's
        transaction, unless the list held here has a higher serial or is the same;
        :meth:`adopt` once that committed. Returns whether anything was stored."""
        if self.current is not None and (
            lst.serial < self.current.serial or (lst == self.current and text == self.text)
        ):
            return False
        with self.store.transaction():
            self.rows.install(lst.serial, text, stored_ms=now_ms)
        return True

    def adopt(self, lst: RevocationList, text: str) -> None:
        self.current = lst
        self.text = text

    def _store(self, lst: RevocationList, text: str, now_ms: int) -> None:
        with self.store.transaction():
            self.rows.install(lst.serial, text, stored_ms=now_ms)
        self.current = lst
        self.text = text

    def empty_or_current(self, *, now_ms: int) -> RevocationList:
        return (
            self.current
            if self.current is not None
            else RevocationList.empty(self.cluster_id, now_ms=now_ms)
        )


__all__ = ["RevocationState"]

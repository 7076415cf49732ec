"""This node's certificate, renewed at two thirds of its lifetime.

A node asks the control plane (``POST /v1/populi/certs/renew``); the control plane issues
its own. The new certificate must be for this node's key; it is written to the data
directory, replaces the one in force (the :attr:`CertificateRenewal.identity` other parts
read), and the listeners are told (the API server reloads its TLS certificate). A failure
is retried every minute; a certificate that cannot be kept here (disk full) makes the node
degraded until it can, the old one staying in force meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import trio

from enrollment.ca import (
    BACKDATE_S,
    Revoked,
    certificate_public_key,
    chain_from_pem,
    issuer_node_id,
    node_certificate_info,
    verify_chain,
)
from enrollment.keys import write_public_file
from populi_peer.agent.health import RETRIED, Health
from populi_peer.agent.links import ControlPlaneLink
from populi_peer.clock import Clock
from populi_peer.core.messages import CertRenewAnswer
from populi_peer.errors import PopuliError, enrollment_boundary
from populi_peer.identity import Identity
from populi_peer.log import NOTICE, get_logger, log

#: Never renew more often than this, whatever the lifetime; and retry a failure after it.
RETRY_S = 60.0
#: The longest sleep before looking at the certificate's age again.
MAX_WAIT_S = 3600.0


@dataclass(kw_only=True, eq=False, repr=False)
class CertificateRenewal:
    """``issue_own()`` is the control plane's own issuing (used when this node holds
    the role); ``on_renewed`` are told once a new certificate is in force; ``revoked``
    is this node's revocation check: a certificate whose issuer it revokes is renewed
    at once (ADR 0018), once per certificate."""

    identity: Identity
    clock: Clock
    control_plane: ControlPlaneLink
    issue_own: Callable[[], Awaitable[str]]
    health: Health
    on_renewed: Sequence[Callable[[], None]] = ()
    revoked: Revoked | None = None
    logger: ClassVar[logging.Logger] = get_logger("agent")

    def __post_init__(self) -> None:
        self.on_renewed = tuple(self.on_renewed)
        #: The serial of the certificate renewed early because its issuer is revoked: a
        #: control plane that is that very voter would hand back the same issuer.
        self._early_for: int | None = None

    @property
    def not_after_s(self) -> float:
        return self.identity.cert_not_after_s

    def renew_at_s(self) -> float:
        """Two thirds of the lifetime as issued (the start is back-dated for skew); now,
        once, if the voter whose issuer signed it is revoked (no peer accepts it then)."""
        cert = self.identity.node_cert
        voter = issuer_node_id(cert)
        if (
            self.revoked is not None
            and voter is not None
            and self._early_for != cert.serial_number
            and self.revoked(voter, "")
        ):
            return 0.0
        info = node_certificate_info(cert)
        issued = info.not_before_s + BACKDATE_S
        return issued + (info.not_after_s - issued) * 2 / 3

    async def renew(self) -> None:
        serial = self.identity.node_cert.serial_number
        with enrollment_boundary():
            await self._renew()
        if self.identity.node_cert.serial_number != serial:
            voter = issuer_node_id(self.identity.node_cert)
            if voter is not None and self.revoked is not None and self.revoked(voter, ""):
                self._early_for = self.identity.node_cert.serial_number

    async def _renew(self) -> None:
        if self.control_plane.is_self:
            pem = await self.issue_own()
        else:
            answer = await self.control_plane.call(
                method="POST", path="/v1/populi/certs/renew", payload={}, answer=CertRenewAnswer
            )
            pem = answer.certificate
        cert, *chain = chain_from_pem(pem)
        if certificate_public_key(cert) != self.identity.node_key.public_key():
            raise PopuliError(
                "renewed certificate is not for this node's key", code="bad_peer_answer"
            )
        verify_chain(
            cert, chain, self.identity.ca_cert, now_wall_s=self.clock.wall(), skew_s=BACKDATE_S
        )
        write_public_file(self.identity.paths.node_cert, pem.encode("ascii"))
        self.identity = replace(self.identity, node_cert=cert)
        for listener in self.on_renewed:
            listener()
        info = node_certificate_info(cert)
        log(self.logger, NOTICE, "certificate renewed", not_after_s=int(info.not_after_s))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Renew at two thirds of the certificate's lifetime; retry every minute on failure."""
        task_status.started()
        while True:
            wait = self.renew_at_s() - self.clock.wall()
            if wait > 0:
                await trio.sleep(min(wait, MAX_WAIT_S))
                continue
            try:
                await self.renew()
            except RETRIED as exc:
                # The new certificate could not be kept here (disk full...): the old one
                # stays in force, and the renewal is tried again.
                await self.health.retry_after(self.health.failed("cert_renewal", exc))
                continue
            except PopuliError as exc:
                log(
                    self.logger,
                    logging.WARNING,
                    "certificate renewal failed; retrying",
                    error=str(exc),
                )
                await trio.sleep(RETRY_S)
                continue
            self.health.ok("cert_renewal")
            await trio.sleep(RETRY_S)


__all__ = ["CertificateRenewal"]

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
from dataclasses import replace

import trio
from cryptography import x509

from enrollment.ca import (
    BACKDATE_S,
    cert_from_pem,
    cert_to_pem,
    certificate_public_key,
    node_certificate_info,
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


class CertificateRenewal:
    def __init__(
        self,
        *,
        identity: Identity,
        clock: Clock,
        control_plane: ControlPlaneLink,
        issue_own: Callable[[], Awaitable[x509.Certificate]],
        health: Health,
        on_renewed: Sequence[Callable[[], None]] = (),
    ) -> None:
        """``issue_own()`` is the control plane's own issuing (used when this node holds
        the role); ``on_renewed`` are told once a new certificate is in force."""
        self.identity = identity
        self.clock = clock
        self.control_plane = control_plane
        self.issue_own = issue_own
        self.health = health
        self.on_renewed = tuple(on_renewed)
        self.logger = get_logger("agent")

    @property
    def not_after_s(self) -> float:
        return self.identity.cert_not_after_s

    def renew_at_s(self) -> float:
        """Two thirds of the lifetime as issued (the start is back-dated for skew)."""
        info = node_certificate_info(self.identity.node_cert)
        issued = info.not_before_s + BACKDATE_S
        return issued + (info.not_after_s - issued) * 2 / 3

    async def renew(self) -> None:
        with enrollment_boundary():
            await self._renew()

    async def _renew(self) -> None:
        if self.control_plane.is_self:
            pem = cert_to_pem(await self.issue_own()).decode("ascii")
        else:
            answer = await self.control_plane.call(
                "POST", "/v1/populi/certs/renew", {}, answer=CertRenewAnswer
            )
            pem = answer.certificate
        cert = cert_from_pem(pem)
        if certificate_public_key(cert) != self.identity.node_key.public_key():
            raise PopuliError(
                "renewed certificate is not for this node's key", code="bad_peer_answer"
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

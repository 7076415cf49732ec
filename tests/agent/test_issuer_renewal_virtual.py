"""A node whose certificate was signed by a revoked voter's issuer renews it at once
(ADR 0018), once: no peer accepts that certificate any more, and waiting for two thirds of
its lifetime would leave the node unreachable for weeks.

With one control plane its own issuer cannot be revoked while it serves (it cannot retire
itself), so the worker's revocation check is given the verdict a list revoking the control
plane's issuer would give, for the issuer hop only: the control plane stays callable and
hands back a certificate from that same issuer, which must not start a renewal loop."""

from __future__ import annotations

from pathlib import Path

import trio
import trio.testing

from enrollment.ca import issuer_node_id
from support.vcluster import vcluster

HOUR_S = 3600.0


async def test_a_certificate_from_a_revoked_issuer_is_renewed_at_once_and_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path) as cluster:
        w1 = await cluster.join("w1")
        renewal = w1.certificates
        first = renewal.identity.node_cert
        voter = issuer_node_id(first)
        assert voter == cluster.cp.node_id
        assert renewal.renew_at_s() - w1.clock.wall() > 10 * 86400  # the normal schedule
        renewal.revoked = lambda node_id, serial: node_id == voter
        started = w1.clock.wall()
        await cluster.wait_until(
            lambda: renewal.identity.node_cert.serial_number != first.serial_number,
            timeout_s=2 * HOUR_S,
        )
        assert w1.clock.wall() - started <= HOUR_S + 60  # at the next look, not in weeks
        second = renewal.identity.node_cert.serial_number
        await trio.sleep(15 * 60)  # fifteen retry periods (RETRY_S)
        assert renewal.identity.node_cert.serial_number == second  # once, not every minute

"""A full disk never kills the agent (issue 10, item 3): a real agent process, real TLS,
real SQLite, and a real full disk — its data directory is a small tmpfs, filled to the
last byte with a file (skipped with the reason where no tmpfs can be mounted).

A lease on the control plane must expire while the disk is full. The agent stays up; the
lease stays holding (its dead state cannot be written, so nobody is told it is dead);
``populi status`` says degraded and why, in words and in JSON; a write answers 503
``storage_unavailable``. Space comes back: with no restart the lease expires, the
fallback gets its token, the node is healthy, and what was acknowledged before is there.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2e.exec_support import log_events, wait_for

from enrollment.records import verify_record
from populi_peer.api.client import SignedAuth
from populi_peer.api.tls import client_context
from populi_peer.clock import SystemClock
from populi_peer.store import Store
from support.contract import sync_hook
from support.disk import fill, small_tmpfs
from support.mesh import identity_of
from support.procs import AgentProcess, Processes, populi

pytestmark = pytest.mark.e2e

TTL_S = 3  # the shortest lease there is: it expires quickly
MARGIN_S = 0.5


@contextmanager
def operator_client(data_dir: Path, agent: AgentProcess) -> Iterator[httpx.Client]:
    """The init node's operator (roles operator and submit), over real TLS; every answer
    is checked against the OpenAPI contract."""
    identity = identity_of(data_dir)
    with httpx.Client(
        base_url=agent.url,
        verify=client_context(identity.paths.ca_cert),
        auth=SignedAuth(identity.cli_credential, agent.node_id, SystemClock()),
        event_hooks={"response": [sync_hook]},
        timeout=30,
    ) as client:
        yield client


def status(data_dir: Path) -> dict[str, Any]:
    result = populi("status", "--data-dir", str(data_dir), "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def components(data_dir: Path) -> dict[str, dict[str, Any]]:
    return {p["component"]: p for p in status(data_dir)["health"]["problems"]}


def test_a_lease_expiring_on_a_full_disk_stays_holding_and_the_agent_carries_on(
    tmp_path: Path, procs: Processes
) -> None:
    data_dir = tmp_path / "d"
    with small_tmpfs(data_dir, size_kib=16 * 1024):
        agent = procs.init_and_start(data_dir)
        for key, value in (
            ("remote_exec_enabled", "true"),
            ("max_lease_ttl_s", str(TTL_S)),
            ("lease_expiry_margin_s", str(MARGIN_S)),
        ):
            populi("settings", "set", key, value, "--data-dir", str(data_dir), check=True)
        with operator_client(data_dir, agent) as client:
            granted = client.post(
                "/v1/populi/exec/leases",
                json={"task_id": "t-disk", "attempt": 1, "work_class": "agent",
                      "target": agent.node_id, "gpus_wanted": 0, "ttl_s": TTL_S},
            )  # fmt: skip
            assert granted.status_code == 200, granted.text
            lease_id = granted.json()["lease"]["lease_id"]
            filler = fill(data_dir)
            filled = time.monotonic()
            # Nobody renews the lease; its expiry cannot be written.
            problem, _ = wait_for(
                "the lease service reports the failed expiry",
                lambda: components(data_dir).get("leases"),
                guard_s=60,
                every_s=0.5,
            )
            print(
                f"expiry write failed and was reported {time.monotonic() - filled:.1f} s after the fill"
            )
            assert agent.proc.poll() is None, agent.log()[-3000:]
            assert problem["code"] == "storage_unavailable"
            assert "full" in problem["message"]
            shown = client.get(f"/v1/populi/exec/leases/{lease_id}").json()["lease"]
            fallback = client.post(
                "/v1/populi/exec/fallback",
                json={"task_id": "t-disk", "attempt": 2, "gpus_wanted": 0, "ttl_s": TTL_S,
                      "work_class": "agent"},
            )  # fmt: skip
            settings = client.post(
                "/v1/populi/admin/settings", json={"changes": {"auto_revoke_stale_leases": True}}
            )
            human = populi("status", "--data-dir", str(data_dir))
            assert shown["state"] == "live" and shown["expires_in_s"] < 0  # still holding
            for refused in (fallback, settings):
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "storage_unavailable"
                assert refused.json()["error"]["details"]["condition"] == "disk_full"
            assert human.returncode == 0, human.stderr
            assert "health         degraded" in human.stdout
            assert "leases: storage_unavailable" in human.stdout
            assert "database or disk is full" in human.stdout
            assert status(data_dir)["health"]["state"] == "degraded"

            filler.unlink()  # space is back
            freed = time.monotonic()
            _, took = wait_for(
                "the lease expires once its dead state can be written",
                lambda: (
                    client.get(f"/v1/populi/exec/leases/{lease_id}").json()["lease"]["state"]
                    == "expired"
                ),
                guard_s=60,
                every_s=0.2,
            )
            print(f"lease expired {took:.1f} s after space came back")
            confirmed = client.post(
                "/v1/populi/exec/fallback",
                json={"task_id": "t-disk", "attempt": 2, "gpus_wanted": 0, "ttl_s": TTL_S,
                      "work_class": "agent"},
            )  # fmt: skip
            assert confirmed.status_code == 200, confirmed.text
            assert confirmed.json()["prior"]["state"] == "expired"
            wait_for(
                "the node is healthy again",
                lambda: status(data_dir)["health"]["state"] == "ok",
                guard_s=60,
                every_s=0.5,
            )
            print(f"healthy {time.monotonic() - freed:.1f} s after space came back")
        assert agent.proc.poll() is None  # the same process all along: no restart
        assert "Traceback" not in agent.log()
        assert log_events(agent.log(), "degraded; retrying", component="leases")
        assert log_events(agent.log(), "recovered", component="leases")
        procs.stop(agent)
        # What was acknowledged is on disk: the settings before the fill, the lease's end.
        store = Store.open(data_dir, readonly=True)
        try:
            row = store.execute(
                "SELECT state FROM leases WHERE lease_id = ?", (lease_id,)
            ).fetchone()
            record = store.execute(
                "SELECT text FROM cluster_records WHERE kind = 'settings'"
            ).fetchone()
        finally:
            store.close()
        assert row["state"] == "expired"
        settings_record = verify_record(record["text"], expected_kind="settings")
        # The three changes acknowledged before the fill; not the one refused with 503.
        assert settings_record.serial == 4
        assert settings_record.body["max_lease_ttl_s"] == TTL_S
        assert settings_record.body["auto_revoke_stale_leases"] is False

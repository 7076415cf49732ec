"""GPU truth in the agent, on the virtual cluster, in virtual time.

Each node replays a real H100 capture (or a capture whose driver is not loaded: a CPU-only
node, whatever GPU the test machine has), probes it on its own schedule, and carries the
summary on its heartbeats. What the tests look at is the control plane's view: the
``GET /v1/populi/gpus`` route (every answer checked against the OpenAPI contract by
``support.vcluster``), its lease grants, and the node's own registry.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from populi_peer.agent.agent import Agent
from populi_peer.config import Config, GpuConfig
from populi_peer.core.leases import RESUMPTION_REASONS
from populi_peer.errors import PopuliError
from populi_peer.gpu import (
    derive_replay_uuid,
    gpu_summary,
    health_verdicts,
    open_probe,
)
from populi_peer.testing import VirtualClock
from populi_peer.testing.cluster import VirtualCluster, write_no_driver_capture
from populi_peer.testing.waiting import wait_for
from support.hints import allocations
from support.vcluster import change_settings, grant_body, heard_from, peer_client_as, vcluster

IDLE = "h100-80gb-hbm3-idle.json"
CAPTURE_UUID = "GPU-3ce30699-44e9-8c2b-0f34-997c3c5cae2d"
H100_MEMORY = 85520809984
REFRESH_S = 1.0


# -- fixtures on disk ----------------------------------------------------------------------


def _capture(name: str = IDLE) -> dict[str, Any]:
    text = resources.files("populi_peer.gpu").joinpath("captures", name).read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def _write(folder: Path, name: str, data: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(data), "utf-8")
    return path


def _no_driver(tmp_path: Path) -> Path:
    """A real capture whose nvmlInit fails as on a machine without a loaded driver."""
    return write_no_driver_capture(tmp_path / "fixtures", "no-driver.json")


def _sequence(tmp_path: Path, name: str, *steps: dict[str, Any]) -> Path:
    return _write(
        tmp_path / "fixtures",
        name,
        {"populi_replay": 1, "steps": [{"at_s": 0, "capture": IDLE}, *steps]},
    )


def _config(fixture: str | Path, **gpu: Any) -> Config:
    return Config(gpu=GpuConfig(fixture=str(fixture), refresh_s=REFRESH_S, **gpu))


# -- the control plane's view --------------------------------------------------------------


async def _gpus(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    response = await client.get("/v1/populi/gpus")
    assert response.status_code == 200, response.text
    return {node["name"]: node for node in response.json()["nodes"]}


async def _wait_gpus(
    client: httpx.AsyncClient, predicate: Any, *, timeout_s: float = 60.0
) -> tuple[dict[str, dict[str, Any]], float]:
    """Ask the route (virtual time) until ``predicate(view)``; the view and how long. (It
    polls: each look is itself a delivery, so it must not wake on the cluster's.)"""

    async def view() -> dict[str, dict[str, Any]] | None:
        answer = await _gpus(client)
        return answer if predicate(answer) else None

    return await wait_for("the GPU view", view, timeout_s=timeout_s)


def _device(view: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    (device,) = view[name]["devices"]
    assert isinstance(device, dict)
    return device


def _lan_interval(cluster: VirtualCluster) -> float:
    return float(cluster.cp.config.timings.lan.heartbeat_interval_s)


async def _grant(submitter: Agent, cp: Agent, target: Agent, task_id: str) -> dict[str, Any]:
    return await submitter.peers.call(
        url=cp.address.url,
        node_id=cp.node_id,
        method="POST",
        path="/v1/populi/exec/leases",
        payload=grant_body(task_id, target, ttl_s=10),
    )


# -- 2. devices reach the control plane -----------------------------------------------------


async def test_gpu_nodes_reach_the_control_plane_within_two_heartbeats(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path, config=_config(_no_driver(tmp_path))) as cluster:
        gpu_config = _config(IDLE)
        for name in ("w1", "w2"):
            await cluster.join(name, config=gpu_config, start=False)
        started = trio.current_time()
        w1 = await cluster.start("w1")
        w2 = await cluster.start("w2")
        async with cluster.operator_client() as client:
            view, _ = await _wait_gpus(
                client, lambda v: bool(v["w1"]["devices"]) and bool(v["w2"]["devices"])
            )
        took = trio.current_time() - started
        print(f"both GPU nodes on the control plane {took:.3f} s (virtual) after starting")
        assert took <= 2 * _lan_interval(cluster)

        d1, d2 = _device(view, "w1"), _device(view, "w2")
        # One real card's capture on two nodes: two GPUs, each named (node, UUID).
        assert d1["uuid"] != d2["uuid"]
        assert d1["uuid"] == derive_replay_uuid(CAPTURE_UUID, w1.node_id)
        assert d2["uuid"] == derive_replay_uuid(CAPTURE_UUID, w2.node_id)
        for device in (d1, d2):
            assert device["uuid"].startswith("GPU-") and device["uuid"] != CAPTURE_UUID
            assert device["name"] == "NVIDIA H100 80GB HBM3"
            assert device["memory_total_bytes"] == H100_MEMORY
            assert device["health"] == "healthy"
            assert device["allocatable"] is True
            assert device["quarantined"] is False
        assert view["w1"]["backend"] == "replay"
        # The control plane replays a node without a driver: a CPU-only node, no devices.
        assert view["cp"]["devices"] == []
        assert view["cp"]["cpu_only_reason"]
        assert cluster.cp.gpu.allocatable_gpus(cluster.cp.node_id) == ((), 0)
        assert cluster.cp.gpu.allocatable_gpus(w1.node_id) == ((d1["uuid"],), 0)


# -- 3. XID quarantine: durable, refused at grant, resumed by the operator ------------------


async def test_xid_quarantine_survives_restart_and_is_resumed_by_the_operator(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    xid_at_s = 3.0
    with_xid = _sequence(tmp_path, "xid.json", {"at_s": xid_at_s, "xid": {"index": 0, "code": 79}})
    async with vcluster(tmp_path, config=_config(_no_driver(tmp_path))) as cluster:
        cp = cluster.cp
        await change_settings(cluster, remote_exec_enabled=True)
        await cluster.join("w1", config=_config(with_xid), start=False)
        w2 = await cluster.join("w2", config=_config(IDLE))
        assert w2 is not None
        started = trio.current_time()
        w1 = await cluster.start("w1")
        uuid = derive_replay_uuid(CAPTURE_UUID, w1.node_id)

        async with cluster.operator_client() as client:
            view, _ = await _wait_gpus(client, lambda v: bool(v["w1"]["devices"]))
            assert _device(view, "w1")["allocatable"] is True  # before the XID
            view, _ = await _wait_gpus(client, lambda v: _device(v, "w1")["quarantined"])
            seen_after = trio.current_time() - started - xid_at_s
            print(f"quarantine on the control plane {seen_after:.3f} s (virtual) after the XID")
            assert seen_after <= REFRESH_S + 2 * _lan_interval(cluster)
            device = _device(view, "w1")
            assert device["uuid"] == uuid
            assert device["allocatable"] is False
            assert "gpu_quarantined" in device["allocation_reasons"]
            assert device["quarantine_reason"] == "xid_79"
            assert w1.gpu.quarantined() == {uuid: "xid_79"}

            # The node's own write: durable there, and restored after a restart. The
            # restarted probe plays a capture without the XID, so only the store can say so.
            await cluster.crash("w1")
            cluster.nodes["w1"].config = _config(IDLE)
            w1 = await cluster.start("w1")
            assert w1.gpu.quarantined() == {uuid: "xid_79"}
            (own,) = w1.gpu.allocations
            assert not own.allocatable and "gpu_quarantined" in own.reasons
            beats = w1.heartbeat_sender.beats
            await cluster.wait_until(lambda: w1.heartbeat_sender.beats >= beats + 2)
            # What the restarted node itself reports, not only the control plane's register.
            metrics = cp.gpu.nodes[w1.node_id].metrics
            assert metrics is not None
            assert "gpu_quarantined" in metrics["devices"][0]["allocation_reasons"]
            device = _device(await _gpus(client), "w1")
            assert device["quarantined"] is True and device["allocatable"] is False

            # Rule 6: the control plane re-checks at grant time. Past the per-node
            # resumption window that follows its start, so that only the GPU is the reason.
            await trio.sleep_until(cp.uptime.started_mono + 60)
            with pytest.raises(PopuliError) as refused:
                await _grant(w2, cp, w1, "task-quarantined")
            reasons = refused.value.details["reasons"]
            assert "no_free_gpu" in reasons and not RESUMPTION_REASONS & set(reasons), reasons

            # A GPU that is not quarantined cannot be resumed.
            other = derive_replay_uuid(CAPTURE_UUID, w2.node_id)
            response = await client.post(
                f"/v1/populi/admin/gpus/{w2.node_id}/{other}/resume", json={}
            )
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "gpu_not_quarantined"

            response = await client.post(
                f"/v1/populi/admin/gpus/w1/{uuid}/resume", json={"reason": "reseated the card"}
            )
            assert response.status_code == 200, response.text
            answer = response.json()
            assert (answer["node_id"], answer["uuid"], answer["quarantined"]) == (
                w1.node_id,
                uuid,
                False,
            )
            # The operator's decision is stored through the election (ADR 0017).
            assert cp.election.machine is not None
            resumed = cp.election.machine.records.registers.get(
                w1.node_id, f"gpu_quarantine/{uuid}"
            )
            assert resumed is not None and resumed.value == {
                "quarantined": False,
                "reason": "reseated the card",
            }
            learned = await cluster.wait_until(lambda: not w1.gpu.quarantined(), timeout_s=30)
            print(f"the node learned the resume {learned:.3f} s (virtual) later")
            assert learned <= 2 * _lan_interval(cluster)
            (own,) = w1.gpu.allocations
            assert own.allocatable
            view, _ = await _wait_gpus(client, lambda v: _device(v, "w1")["allocatable"])
            device = _device(view, "w1")
            assert device["quarantined"] is False
            assert "gpu_quarantined" not in device["allocation_reasons"]
        answer = await _grant(w2, cp, w1, "task-after-resume")
        assert answer["lease"]["gpus"] == [uuid]
        assert answer["lease"]["holder"] == w1.node_id


async def test_the_control_planes_view_takes_leased_from_its_lease_book(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """A GPU's ``gpu_leased`` is the lease book's, not the node's last report's: leased
    the moment a lease is granted (the node's report, which lags by up to a heartbeat,
    still says free), and free the moment it is released (the report still says leased)."""
    async with vcluster(tmp_path, config=_config(_no_driver(tmp_path))) as cluster:
        cp = cluster.cp
        await change_settings(cluster, remote_exec_enabled=True)
        w1 = await cluster.join("w1", config=_config(IDLE))
        w2 = await cluster.join("w2", config=_config(_no_driver(tmp_path)))
        assert w1 is not None and w2 is not None
        uuid = derive_replay_uuid(CAPTURE_UUID, w1.node_id)
        async with cluster.operator_client() as client:
            await _wait_gpus(client, lambda v: bool(v["w1"]["devices"]))
            await trio.sleep_until(cp.uptime.started_mono + 60)  # past the resumption window
            lease = (await _grant(w2, cp, w1, "task-book"))["lease"]
            assert lease["gpus"] == [uuid]
            device = _device(await _gpus(client), "w1")
            reported = cp.gpu.nodes[w1.node_id].metrics
            assert reported is not None and reported["devices"][0]["allocatable"] is True
            assert (device["allocatable"], device["allocation_reasons"]) == (False, ["gpu_leased"])
            assert cp.gpu.allocatable_gpus(w1.node_id) == ((), 0)
            nodes = (await client.get("/v1/populi/nodes")).json()["nodes"]
            (summary,) = [n["gpu_summary"] for n in nodes if n["id"] == w1.node_id]
            assert summary["allocatable"] == 0

            # The node now holds the GPU, as its runner would while the task runs, and its
            # reports say so (a stand-in for the runner: nothing runs here).
            w1.gpu.leased_gpus = lambda: frozenset({uuid})

            def reports_leased() -> bool:
                held = cp.gpu.nodes[w1.node_id].metrics
                return held is not None and "gpu_leased" in held["devices"][0].get(
                    "allocation_reasons", ()
                )

            await cluster.wait_until(reports_leased, timeout_s=30)
            released = await w1.peers.call(
                url=cp.address.url,
                node_id=cp.node_id,
                method="POST",
                path=f"/v1/populi/exec/leases/{lease['lease_id']}/release",
                payload={"outcome": "completed"},
            )
            assert released["lease"]["state"] == "completed", released
            assert reports_leased()  # the node's last report still says leased
            device = _device(await _gpus(client), "w1")
            assert (device["allocatable"], device["allocation_reasons"]) == (True, [])
            assert cp.gpu.allocatable_gpus(w1.node_id) == ((uuid,), 0)


# -- 4. a GPU lost mid-run ------------------------------------------------------------------


async def test_gpu_lost_mid_run_is_unhealthy_and_heartbeats_stay_on_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    lost_at_s = 4.0
    lost = _sequence(tmp_path, "lost.json", {"at_s": lost_at_s, "lost": [0]})
    async with vcluster(tmp_path, config=_config(_no_driver(tmp_path))) as cluster:
        cp = cluster.cp
        await cluster.join("w1", config=_config(lost), start=False)
        started = trio.current_time()
        w1 = await cluster.start("w1")
        interval = _lan_interval(cluster)
        async with cluster.operator_client() as client:
            view, _ = await _wait_gpus(client, lambda v: bool(v["w1"]["devices"]))
            assert _device(view, "w1")["health"] == "healthy"
            refreshes, beats = w1.gpu.refreshes, w1.heartbeat_sender.beats
            worst_age_ms = 0
            unhealthy_after: float | None = None
            end = started + lost_at_s + 10
            while trio.current_time() < end:
                await trio.sleep(0.05)
                age = cp.heartbeats.age_ms(w1.node_id)
                assert age is not None
                worst_age_ms = max(worst_age_ms, age)
                if unhealthy_after is None and (
                    _device(await _gpus(client), "w1")["health"] == "unhealthy"
                ):
                    unhealthy_after = trio.current_time() - started - lost_at_s
            view = await _gpus(client)
        print(
            f"GPU unhealthy on the control plane {unhealthy_after} s (virtual) after it was "
            f"lost; oldest heartbeat seen meanwhile {worst_age_ms} ms"
        )
        assert unhealthy_after is not None
        assert unhealthy_after <= REFRESH_S + 2 * interval
        device = _device(view, "w1")
        assert device["health"] == "unhealthy"
        assert "gpu_lost" in device["health_reasons"]
        assert device["allocatable"] is False
        assert device["uuid"] == derive_replay_uuid(CAPTURE_UUID, w1.node_id)
        assert cp.gpu.allocatable_gpus(w1.node_id) == ((), 1)
        # Neither crashed nor stalled: beats on time, probe still refreshing.
        assert cluster.nodes["w1"].running
        assert worst_age_ms <= 1.5 * interval * 1000
        assert w1.heartbeat_sender.beats - beats >= 9
        assert w1.gpu.refreshes - refreshes >= 9
        assert not cp.heartbeats.stale(w1.node_id)


# -- 5. advertised labels are not capacity ---------------------------------------------------


async def test_operator_labels_never_become_capacity_without_trust(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    labels = {"count": "2", "model": "RTX 4090"}
    no_driver = _no_driver(tmp_path)
    async with vcluster(tmp_path, config=_config(no_driver)) as cluster:
        cp = cluster.cp
        # A CPU-only node whose operator says it has two GPUs, untrusted.
        labelled = await cluster.join("labelled", config=_config(no_driver, labels=labels))
        # A node with one verified GPU whose operator says two, trusted: the probe wins.
        verified = await cluster.join(
            "verified", config=_config(IDLE, labels=labels, trust_advertised=True)
        )
        assert labelled is not None and verified is not None
        async with cluster.operator_client() as client:
            view, _ = await _wait_gpus(
                client,
                lambda v: (
                    v["labelled"]["facts_version"] is not None and bool(v["verified"]["devices"])
                ),
            )
        assert view["labelled"]["devices"] == []
        assert cp.gpu.allocatable_gpus(labelled.node_id) == ((), 0)
        # The labels did reach the control plane, as labels.
        static = cp.gpu.nodes[labelled.node_id].static
        assert static is not None and static["advertised"] == labels
        assert static["devices"] == []
        (device,) = view["verified"]["devices"]
        assert device["uuid"] == derive_replay_uuid(CAPTURE_UUID, verified.node_id)
        assert cp.gpu.allocatable_gpus(verified.node_id) == ((device["uuid"],), 0)
        summary = cp.gpu.view(verified.node_id)
        assert summary is not None and summary.count == summary.allocatable == 1


async def test_trusted_labels_on_a_cpu_only_node_are_capacity_on_the_control_plane(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    labels = {"count": "2"}
    no_driver = _no_driver(tmp_path)
    async with vcluster(tmp_path, config=_config(no_driver)) as cluster:
        cp = cluster.cp
        trusted = await cluster.join(
            "trusted", config=_config(no_driver, labels=labels, trust_advertised=True)
        )
        assert trusted is not None
        # The node itself counts two pseudo-devices as capacity (ADR 0004, rule 2) ...
        assert [a.uuid for a in trusted.gpu.allocations if a.allocatable] == [
            "advertised-0",
            "advertised-1",
        ]
        await cluster.wait_until(lambda: trusted.node_id in cp.gpu.nodes)
        await trio.sleep(2 * _lan_interval(cluster))
        # ... and the control plane, which grants leases, must count them too.
        free, _ = cp.gpu.allocatable_gpus(trusted.node_id)
        assert free == ("advertised-0", "advertised-1")
        rows = cp.gpu.devices(trusted.node_id)
        assert [r.verified for r in rows] == [False, False]
        # And the node takes a handoff for them (its own view agrees).
        assert set(trusted.gpu.verified_uuids()) == {"advertised-0", "advertised-1"}


# -- 6. old and newer payloads through the real heartbeat route -----------------------------


async def _beat(cluster: VirtualCluster, agent: Agent, payload: dict[str, Any]) -> dict[str, Any]:
    cp = cluster.cp
    client = peer_client_as(cluster, agent)
    try:
        return await client.call(
            url=cp.address.url,
            node_id=cp.node_id,
            method="POST",
            path="/v1/populi/heartbeat",
            payload=payload,
        )
    finally:
        await client.aclose()


def _old_payload(cp: Agent) -> dict[str, Any]:
    """What a node of the previous protocol version sends: no gpu, leases nor uptime."""
    return {
        "status": "running",
        "addresses": ["w1.populi.test:443"],
        "registers": [],
        "revocation_serial": cp.revocations.serial,
        "membership_version": cp.membership.version,
        "settings_serial": cp.records.settings_serial,
    }


async def test_heartbeat_without_gpu_field_still_parses(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path, config=_config(_no_driver(tmp_path)), workers=1) as cluster:
        cp, w1 = cluster.cp, cluster["w1"]
        await heard_from(cluster, "w1")
        await cluster.crash("w1")  # from now on only this test speaks for w1
        await trio.sleep(2)
        answer = await _beat(cluster, w1, _old_payload(cp))
        assert answer["term"] == cp.control_plane.term
        assert "gpu_facts_version" in answer and answer["gpu_registers"] == []
        assert cp.heartbeats.age_ms(w1.node_id) == 0
        assert cp.heartbeats.seen[w1.node_id].report.gpu is None
        async with cluster.operator_client() as client:
            view = await _gpus(client)
        assert view["w1"]["devices"] == [] and not view["w1"]["heartbeat_stale"]


async def test_gpu_summary_with_unknown_fields_still_parses(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with vcluster(tmp_path, config=_config(_no_driver(tmp_path)), workers=1) as cluster:
        cp, w1 = cluster.cp, cluster["w1"]
        await cluster.wait_until(lambda: w1.node_id in cp.gpu.nodes)
        await cluster.crash("w1")
        assert cp.gpu.devices(w1.node_id) == []  # a CPU-only node so far
        # A newer node's summary of a real GPU: the same shape, with fields this version
        # does not know at every level.
        async with open_probe(fixture=IDLE, node_id=w1.node_id, clock=VirtualClock()) as probe:
            inventory = await probe.probe()
        allocs = allocations(inventory)
        summary = gpu_summary(inventory, allocs, verdicts=health_verdicts(inventory))
        summary["v"] = 2
        summary["topology"] = {"nvswitch": ["future"]}
        summary["static"]["fabric"] = {"clique": 7}
        summary["static"]["devices"][0]["c2c_mode"] = True
        summary["static"]["devices"][0]["confidential_compute"] = {"enabled": False}
        summary["metrics"]["sampled_ms"] = 250
        summary["metrics"]["devices"][0]["sm_occupancy_pct"] = 12.5
        summary["metrics"]["devices"][0]["nvlink_rx_bytes"] = [1, 2, 3]
        payload = {
            **_old_payload(cp),
            "version": "99.0.0",
            "gpu": summary,
            "future_field": {"nested": [1, {"x": None}]},
        }
        answer = await _beat(cluster, w1, payload)
        assert answer["gpu_facts_version"] == summary["facts_version"]
        async with cluster.operator_client() as client:
            view = await _gpus(client)
        device = _device(view, "w1")
        assert device["uuid"] == derive_replay_uuid(CAPTURE_UUID, w1.node_id)
        assert device["memory_total_bytes"] == H100_MEMORY
        assert device["health"] == "healthy" and device["allocatable"] is True
        assert "sm_occupancy_pct" not in device and "c2c_mode" not in device
        assert cp.gpu.allocatable_gpus(w1.node_id) == ((device["uuid"],), 0)

"""Timed replays, hung queries, XID watching and the real NVML of this machine.

Exact times are asserted only in virtual time.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

from gpu import gpu_variants as v
from populi_peer.clock import Clock, SystemClock
from populi_peer.gpu import (
    Health,
    Probe,
    XidEvent,
    derive_replay_uuid,
    health_verdict,
    open_probe,
)
from populi_peer.gpu._probe import _Caller, _Fail, _Ok, open_replay_probe
from populi_peer.gpu._replay import ReplayNvml
from populi_peer.testing import VirtualClock
from support.nvml import nvml_present

TIMEOUT_S = 2.0


async def test_gpu_lost_mid_run(
    autojump_clock: MockClock, tmp_path: Path, clock: VirtualClock
) -> None:
    seq = v.sequence(
        {"at_s": 0, "capture": v.LOAD},
        {"at_s": 6, "lost": [0]},
    )
    path = v.write(tmp_path, seq)
    async with open_probe(
        fixture=path, node_id=None, clock=clock, call_timeout_s=TIMEOUT_S
    ) as probe:
        before = await probe.probe()
        (d,) = before.devices
        assert health_verdict(d).health is Health.HEALTHY
        await trio.sleep(5.5)
        still = await probe.probe()
        assert not still.devices[0].lost
        await trio.sleep(1)  # t = 6.5: the GPU fell off the bus at 6
        start = trio.current_time()
        after = await probe.probe()
        # No stall: a lost GPU answers at once (no call waited for its timeout).
        assert trio.current_time() == start
        (lost,) = after.devices
        assert lost.lost
        # The UUID read while it was there still names it.
        assert lost.uuid == v.LOAD_UUID
        assert lost.memory_used_bytes is None
        assert lost.unknown["memory_used_bytes"] == "gpu_lost"
        verdict = health_verdict(lost)
        assert (verdict.health, verdict.reasons) == (Health.UNHEALTHY, ("gpu_lost",))
        assert not after.wedged


async def test_capture_steps_change_readings(
    autojump_clock: MockClock, tmp_path: Path, clock: VirtualClock
) -> None:
    seq = v.sequence(
        {"at_s": 0, "capture": v.IDLE},
        {"at_s": 10, "capture": v.LOAD},
        {"at_s": 20, "capture": v.row_remap_pending()},
    )
    async with open_probe(fixture=v.write(tmp_path, seq), node_id=None, clock=clock) as probe:
        seen = []
        for t in (0, 9.9, 10, 19, 25):
            await trio.sleep(t - trio.current_time())
            inventory = await probe.probe()
            d = inventory.devices[0]
            seen.append((d.utilization_gpu_pct, health_verdict(d).health))
    assert seen == [
        (0, Health.HEALTHY),
        (0, Health.HEALTHY),
        (99, Health.HEALTHY),
        (99, Health.HEALTHY),
        (0, Health.DEGRADED),
    ]


async def test_xid_replay_events_at_their_time(
    autojump_clock: MockClock, tmp_path: Path, clock: VirtualClock
) -> None:
    seq = v.sequence(
        {"at_s": 0, "capture": v.eight_gpus()},
        {"at_s": 7, "xid": {"index": 2, "code": 13}},
        {"at_s": 5, "xid": {"index": 1, "code": 79}},
    )
    events: list[tuple[float, XidEvent]] = []

    async def on_event(event: XidEvent) -> None:
        events.append((trio.current_time(), event))

    async with open_probe(fixture=v.write(tmp_path, seq), node_id="node-a", clock=clock) as probe:
        async with trio.open_nursery() as nursery:
            await nursery.start(probe.run_xid_watch, on_event)
        assert trio.current_time() == 7  # the watcher returned after its last XID
    captured = v.eight_gpus()["devices"]
    assert [(t, e.index, e.code, e.critical) for t, e in events] == [
        (5, 1, 79, True),
        (7, 2, 13, False),
    ]
    assert events[0][1].uuid == derive_replay_uuid(captured[1]["uuid"], "node-a")
    assert events[0][1].at_wall == clock.wall_start_s + 5


async def test_hung_query_is_unknown_within_the_timeout(
    autojump_clock: MockClock, tmp_path: Path, clock: VirtualClock
) -> None:
    seq = v.sequence(
        {"at_s": 0, "capture": v.LOAD},
        {"at_s": 0, "hang": {"index": 0, "query": "memory", "until_s": 30}},
    )
    async with open_probe(
        fixture=v.write(tmp_path, seq), node_id=None, clock=clock, call_timeout_s=TIMEOUT_S
    ) as probe:
        first = await probe.probe()
        assert trio.current_time() == TIMEOUT_S  # one call waited out its timeout, no more
        assert first.wedged
        (d,) = first.devices
        assert d.uuid == v.LOAD_UUID  # read before the hung call
        assert d.memory_total_bytes is None
        assert d.unknown["memory_total_bytes"] == "timeout"
        assert d.unknown["temperature_c"] == "wedged"
        assert d.unknown["ecc_uncorrected_volatile"] == "wedged"
        verdict = health_verdict(d)
        assert (verdict.health, verdict.reasons) == (Health.UNKNOWN, ("health_unreadable",))

        # Still stuck: the refresh costs one timeout, then reports everything unknown.
        await trio.sleep_until(10)
        second = await probe.probe()
        assert trio.current_time() == 10 + TIMEOUT_S
        assert second.wedged
        assert second.devices[0].unknown["memory_total_bytes"] == "wedged"

        # The stuck call returns at 30: the next refresh reads normally, at once.
        await trio.sleep_until(31)
        third = await probe.probe()
        assert trio.current_time() == 31
        assert not third.wedged
        assert third.devices[0].memory_total_bytes == 85520809984
        assert health_verdict(third.devices[0]).health is Health.HEALTHY


async def test_hung_query_in_a_real_worker_thread(
    thread_autojump_clock: MockClock, tmp_path: Path
) -> None:
    """The thread caller NVML uses: the hung call blocks a real thread, which is abandoned."""
    clock = VirtualClock()
    seq = v.sequence(
        {"at_s": 0, "capture": v.LOAD},
        {"at_s": 0, "hang": {"index": 0, "query": "utilization", "until_s": 30}},
    )
    async with open_replay_probe(
        v.write(tmp_path, seq), node_id=None, clock=clock, call_timeout_s=TIMEOUT_S, threaded=True
    ) as probe:
        first = await probe.probe()
        assert trio.current_time() == TIMEOUT_S
        assert first.wedged
        (d,) = first.devices
        assert d.memory_total_bytes == 85520809984  # answered before the hang
        assert d.unknown["utilization_gpu_pct"] == "timeout"
        assert d.unknown["temperature_c"] == "wedged"
        assert probe._caller.stuck_calls == 1

        await trio.sleep_until(10)
        second = await probe.probe()
        assert trio.current_time() == 10 + TIMEOUT_S
        assert second.devices[0].unknown["memory_total_bytes"] == "wedged"

        await trio.sleep_until(31)
        third = await probe.probe()
        assert not third.wedged
        assert third.devices[0].utilization_gpu_pct == 99
        assert probe._caller.stuck_calls == 0


async def test_hung_init_is_cpu_only_for_now(
    autojump_clock: MockClock, tmp_path: Path, clock: VirtualClock
) -> None:
    seq = v.sequence(
        {"at_s": 0, "capture": v.IDLE},
        {"at_s": 0, "hang": {"query": "init", "until_s": 5}},
    )
    async with open_probe(
        fixture=v.write(tmp_path, seq), node_id=None, clock=clock, call_timeout_s=TIMEOUT_S
    ) as probe:
        first = await probe.probe()
        assert trio.current_time() == TIMEOUT_S
        assert first.cpu_only_reason == "nvml_init_timeout"
        assert first.wedged
        await trio.sleep_until(6)
        second = await probe.probe()
        assert second.cpu_only_reason is None
        assert len(second.devices) == 1


def _nvml_probe_over(fake: ReplayNvml, clock: Clock) -> Probe:
    """The NVML backend's code path (threads, event set) over a fake NVML module.

    Real worker threads do not mix with an autojump clock (it jumps while a thread
    answers, past the call timeout), and nothing here is about time: these tests run on
    the real clock (``SystemClock``), with generous guards and no time windows.
    """
    return Probe(fake, backend="nvml", clock=clock, call_timeout_s=5.0, xid_wait_ms=20)


async def test_nvml_xid_event_loop() -> None:
    fake = ReplayNvml(v.eight_gpus())
    fake.push_xid(4, 48)
    fake.push_xid(0, 31)
    events: list[XidEvent] = []
    got = {2: trio.Event(), 3: trio.Event()}

    def on_event(event: XidEvent) -> None:
        events.append(event)
        if len(events) in got:
            got[len(events)].set()

    async with _nvml_probe_over(fake, SystemClock()) as probe:
        with trio.fail_after(30):  # a guard, not a timing assertion
            async with trio.open_nursery() as nursery:
                await nursery.start(probe.run_xid_watch, on_event)
                await got[2].wait()
                fake.push_xid(7, 79)
                await got[3].wait()
                nursery.cancel_scope.cancel()
    uuids = [d["uuid"] for d in v.eight_gpus()["devices"]]
    assert [(e.index, e.code, e.critical, e.uuid) for e in events] == [
        (4, 48, True, uuids[4]),
        (0, 31, False, uuids[0]),
        (7, 79, True, uuids[7]),
    ]


async def test_nvml_xid_not_supported_returns() -> None:
    fake = ReplayNvml(v.with_device(xid_supported_events=0))
    async with _nvml_probe_over(fake, SystemClock()) as probe:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(probe.run_xid_watch, lambda e: None)
    # The nursery closed by itself: the watcher returned after started().


async def test_nvml_backend_over_fake_reads_capture() -> None:
    async with _nvml_probe_over(ReplayNvml(v.capture(v.LOAD)), SystemClock()) as probe:
        inventory = await probe.probe()
    assert inventory.backend == "nvml"
    assert inventory.devices[0].utilization_gpu_pct == 99


@pytest.mark.skipif(nvml_present(), reason="this machine has an NVIDIA driver")
async def test_real_nvml_without_driver_is_cpu_only(caplog: pytest.LogCaptureFixture) -> None:
    """The real NVML library in real worker threads: real time (see ``_nvml_probe_over``)."""
    caplog.set_level(logging.INFO, logger="populi.gpu")
    async with open_probe(fixture=None, node_id="n1", clock=SystemClock()) as probe:
        assert probe.backend == "nvml"
        first = await probe.probe()
        second = await probe.probe()
        async with trio.open_nursery() as nursery:
            await nursery.start(probe.run_xid_watch, lambda e: None)
    for inventory in (first, second):
        assert inventory.cpu_only
        assert inventory.cpu_only_reason == "nvml_library_not_found"
        assert inventory.devices == ()
    records = [r for r in caplog.records if r.name == "populi.gpu"]
    assert len(records) == 1
    assert "CPU-only" in records[0].getMessage()


async def test_each_call_of_a_batch_gets_its_own_timeout() -> None:
    """Real threads, real time: fifteen 0.1 s calls under a 1 s per-call bound all answer
    (a bound on the whole batch would cut them off), and a call that outlives the bound
    is abandoned while its thread is still in it."""
    caller = _Caller(timeout_s=1.0)
    release = threading.Event()

    def slow(n: int) -> int:
        time.sleep(0.1)
        return n

    outcomes = await caller.call_batch([(slow, (i,)) for i in range(15)])
    assert outcomes == [_Ok(i) for i in range(15)]

    outcomes = await caller.call_batch([(slow, (0,)), (release.wait, ()), (slow, (2,))])
    assert outcomes == [_Ok(0), _Fail("timeout"), _Fail("wedged")]
    assert caller.stuck_calls == 1
    # The stuck thread holds the limiter: the next call never gets it.
    assert await caller.call(slow, 9) == _Fail("wedged")
    release.set()
    assert await caller.call(slow, 9) == _Ok(9)
    assert caller.stuck_calls == 0

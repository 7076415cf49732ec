"""Placement v2 in the core records: the grant re-checks memory and model on the control
plane's own view (``gpu_misfit``), and the task record keeps the needs and, per attempt,
why every other node was refused."""

from __future__ import annotations

import argparse
from dataclasses import replace

import pytest

from populi_peer.cli.placement_flags import need_payload
from populi_peer.core.hints import GpuHint
from populi_peer.core.leases import (
    GrantRequest,
    LeaseRefused,
    LeaseSettings,
    LeaseTable,
    TargetView,
)
from populi_peer.core.tasks import PlacedLocal, PlacementStarted, Task, TaskOptions
from populi_peer.errors import BadRequest, UsageError

W = 1_700_000_000_000
GB = 10**9


def gpu(uuid: str, name: str, free: int) -> GpuHint:
    return GpuHint(
        index=0,
        uuid=uuid,
        name=name,
        memory_total_bytes=free,
        memory_free_bytes=free,
        utilization_gpu_pct=0,
        health="healthy",
        health_reasons=(),
        allocatable=True,
        allocation_reasons=(),
        verified=True,
    )


def request(**needs: object) -> GrantRequest:
    return GrantRequest(
        task_id="t1",
        attempt=1,
        work_class="agent",
        target="w1",
        gpus_wanted=1,
        ttl_s=10.0,
        submitter="sub",
        **needs,  # type: ignore[arg-type]
    )


def view(req: GrantRequest, gpus: list[GpuHint]) -> TargetView:
    """What ``LeaseService.target_view`` builds from the control plane's own facts."""
    misfits = tuple((g.uuid or "", req.misfits(g)) for g in gpus if req.misfits(g))
    return TargetView(
        "w1",
        eligible=True,
        allocatable_gpus=tuple(g.uuid or "" for g in gpus),
        misfit_gpus=misfits,
    )


def grant(req: GrantRequest, gpus: list[GpuHint]) -> tuple[str, ...]:
    table = LeaseTable.new(LeaseSettings(max_lease_ttl_s=30.0))
    try:
        _, change = table.grant(
            req, now_mono=100.0, now_wall_ms=W, lease_id="L1", target=view(req, gpus)
        )
    except LeaseRefused as exc:
        return exc.reasons
    return change.lease.gpus


def test_grant_refuses_a_gpu_without_the_memory_asked_for() -> None:
    small = [gpu("G-small", "NVIDIA RTX A4000", 16 * GB)]
    assert grant(request(gpu_mem_bytes=40 * GB), small) == ("gpu_misfit", "gpu_mem_insufficient")
    assert grant(request(gpu_model="H100"), small) == ("gpu_misfit", "gpu_model_mismatch")
    assert grant(request(gpu_mem_bytes=15 * GB, gpu_model="a4000"), small) == ("G-small",)
    # Without needs the grant is as before.
    assert grant(request(), small) == ("G-small",)


def test_grant_picks_the_gpu_that_fits_and_skips_the_one_that_does_not() -> None:
    gpus = [gpu("G-small", "NVIDIA RTX A4000", 16 * GB), gpu("G-big", "NVIDIA H100", 80 * GB)]
    assert grant(request(gpu_mem_bytes=40 * GB), gpus) == ("G-big",)


def test_grant_request_json_keeps_the_needs() -> None:
    req = request(gpu_mem_bytes=40 * GB, gpu_model="H100")
    assert GrantRequest.from_json(req.to_json()) == req
    assert "gpu_model" not in request().to_json()
    with pytest.raises(BadRequest):
        request(gpu_model="")


def test_task_record_keeps_needs_and_rejections() -> None:
    task = Task.new(
        "t-1",
        command=("true",),
        env={},
        gpus_wanted=1,
        work_class="agent",
        created_wall_ms=W,
        options=TaskOptions(gpu_mem_bytes=40 * GB, gpu_model="H100"),
    )
    task = task.apply(PlacementStarted(), now_wall_ms=W)
    rejected = (("w1", ("gpu_mem_insufficient",)), ("w2", ("node_ineligible", "cordoned")))
    task = task.apply(
        PlacedLocal(node="sub", reasons=("no_remote_candidate",), rejected=rejected),
        now_wall_ms=W,
    )
    back = Task.from_json(task.to_json())
    assert back == task
    assert back.options.gpu_mem_bytes == 40 * GB and back.options.gpu_model == "H100"
    (attempt,) = back.attempts
    assert attempt.rejected == rejected
    assert task.to_json()["attempts"][0]["rejected"] == {
        "w1": ["gpu_mem_insufficient"],
        "w2": ["node_ineligible", "cordoned"],
    }
    # A record written before placement v2 reads with no needs and no rejections.
    old = task.to_json()
    del old["attempts"][0]["rejected"]
    del old["options"]["gpu_mem_bytes"], old["options"]["gpu_model"]
    legacy = Task.from_json(old)
    assert legacy.attempts[0].rejected == () and legacy.options == TaskOptions()
    with pytest.raises(BadRequest):
        replace(attempt, rejected=(("w1", ()),))


def _args(**kw: object) -> argparse.Namespace:
    base: dict[str, object] = {"gpus": 1, "gpu_mem": None, "gpu_model": None}
    return argparse.Namespace(**{**base, **kw})


def test_cli_needs_are_parsed_by_the_core_rules() -> None:
    assert need_payload(_args(gpu_mem="40G", gpu_model="A100,H100")) == {
        "gpu_mem_bytes": 40 * GB,
        "gpu_model": "A100,H100",
    }
    assert need_payload(_args(gpu_mem="24GiB")) == {"gpu_mem_bytes": 24 * 2**30}
    assert need_payload(_args()) == {}
    for bad in (_args(gpu_mem="lots"), _args(gpu_model=" "), _args(gpus=0, gpu_mem="1G")):
        with pytest.raises(UsageError):
            need_payload(bad)

"""``POST /v1/populi/heartbeat``: a node's report and the control plane's answer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal, get_args

from populi_peer.core.fencing import FencingToken
from populi_peer.core.lifecycle import NodeLifecycle
from populi_peer.core.messages._codec import (
    Bool,
    Choice,
    Codec,
    Core,
    Int,
    JsonObject,
    Message,
    Nested,
    Nullable,
    Num,
    Seq,
    Text,
    message,
    wire,
)
from populi_peer.core.messages.records import (
    ADDRESSES,
    LIFECYCLE,
    REGISTER_WRITE,
    SCOPE,
    TOKEN,
    ControlPlaneRef,
)
from populi_peer.core.registers import RegisterWrite
from populi_peer.core.reports import Incarnation, ReportAnswer, ReportMessage, report_from_json
from populi_peer.core.scope import Scope
from populi_peer.errors import BadRequest

HeartbeatStatus = Literal["running", "leaving"]
#: A node's full report or numbered changes (ADR 0015), parsed by the core's own reader.
REPORT: Final[Core[ReportMessage]] = Core(report_from_json, lambda report: report.to_json())
INCARNATION: Final[Core[Incarnation]] = Core(Incarnation.from_json, Incarnation.to_json)
REPORT_ANSWER: Final[Core[ReportAnswer]] = Core(ReportAnswer.from_json, ReportAnswer.to_json)
HeldState = Literal["accepted", "running"]

#: A heartbeat carries at most this many of the sender's own register writes.
MAX_HEARTBEAT_REGISTERS: Final = 256
#: ... and at most this many held leases (a worker runs far fewer tasks).
MAX_HEARTBEAT_LEASES: Final = 10_000
#: GPU summary bounds: devices per section, and the length of a facts version or UUID.
MAX_GPU_DEVICES: Final = 256
MAX_FACTS_VERSION_CHARS: Final = 64
MAX_GPU_UUID_CHARS: Final = 128


@message
class HeldLease(Message):
    """One attempt the sender runs as a worker, with its lease (``HeartbeatRequest.leases``)."""

    task_id: str = wire(Text(min_len=1))
    attempt: int = wire(Int(minimum=1))
    token: FencingToken = wire(TOKEN)
    lease_id: str | None = wire(Nullable(Text()))
    state: HeldState = wire(Choice(get_args(HeldState)))


class GpuSection(Codec[Mapping[str, Any]]):
    """The ``static`` or ``metrics`` part of a heartbeat's GPU summary: a JSON object whose
    devices a control plane can read safely later (each with an integer ``index``, a short
    ``uuid``, reason lists of strings); other keys are the probe's and pass through."""

    def __init__(self, part: str) -> None:
        self.part = part
        self._json = JsonObject()

    def parse(self, value: object, path: str) -> Mapping[str, Any]:
        section = self._json.parse(value, path)
        part = self.part

        def bad(what: str) -> BadRequest:
            return BadRequest(f"heartbeat 'gpu': {what}", code="bad_gpu_summary", field=path)

        devices = section.get("devices", [])
        if not isinstance(devices, list) or len(devices) > MAX_GPU_DEVICES:
            raise bad(f"'{part}.devices' must be a list of at most {MAX_GPU_DEVICES} devices")
        for device in devices:
            if (
                not isinstance(device, Mapping)
                or isinstance(device.get("index"), bool)
                or not isinstance(device.get("index"), int)
            ):
                raise bad(f"every '{part}' device needs an integer 'index'")
            uuid = device.get("uuid")
            if uuid is not None and (
                not isinstance(uuid, str) or not 0 < len(uuid) <= MAX_GPU_UUID_CHARS
            ):
                raise bad(f"'{part}' device uuid must be a string")
            for key in ("health_reasons", "allocation_reasons"):
                if key in device and not (
                    isinstance(device[key], list) and all(isinstance(r, str) for r in device[key])
                ):
                    raise bad(f"'{key}' must be a list of strings")
        advertised = section.get("advertised_devices", [])
        if not isinstance(advertised, list) or not all(isinstance(a, Mapping) for a in advertised):
            raise bad("'advertised_devices' must be a list of objects")
        if not isinstance(section.get("advertised", {}), Mapping):
            raise bad("'advertised' must be an object")
        return section

    def dump(self, value: Mapping[str, Any]) -> Any:
        return self._json.dump(value)


@message
class GpuHeartbeatSummary(Message):
    """``GpuHeartbeatSummary``: static facts only when the control plane does not hold
    this ``facts_version`` (``static`` absent otherwise), metrics every time."""

    WHAT = "heartbeat 'gpu'"

    #: The digest of the static facts (``populi_peer.gpu``: 16 hex characters).
    facts_version: str = wire(Text(min_len=1, max_len=MAX_FACTS_VERSION_CHARS))
    static: Mapping[str, Any] | None = wire(GpuSection("static"), omit_none=True)
    metrics: Mapping[str, Any] = wire(GpuSection("metrics"))


@message
class HeartbeatReport(Message):
    """``HeartbeatRequest``: a node says it is alive, what it holds and what it runs.

    The serials are what the sender holds (``-1``: nothing), so the answer can carry what
    it lacks. ``registers`` are the sender's own register writes (writer class ``self``),
    delivered until acknowledged; that they are about the caller, as the caller, is the
    receiver's check (it knows who signed)."""

    status: HeartbeatStatus = wire(Choice(get_args(HeartbeatStatus)), default="running")
    addresses: tuple[str, ...] = wire(ADDRESSES, default=())
    registers: tuple[RegisterWrite, ...] = wire(
        Seq(REGISTER_WRITE, max_items=MAX_HEARTBEAT_REGISTERS), default=()
    )
    revocation_serial: int = wire(Int(), default=-1)
    membership_version: int = wire(Int(), default=-1)
    settings_serial: int = wire(Int(), default=-1)
    version: str | None = wire(Text(max_len=64), omit_none=True)
    uptime_s: float | None = wire(Num(minimum=0), omit_none=True)
    gpu: GpuHeartbeatSummary | None = wire(Nested(GpuHeartbeatSummary), omit_none=True)
    leases: tuple[HeldLease, ...] = wire(
        Seq(Nested(HeldLease), max_items=MAX_HEARTBEAT_LEASES), default=()
    )
    #: Whether the node takes remote work at all (``POPULI_EXEC_REMOTE=0``: no), so the
    #: control plane places none there.
    exec_remote: bool = wire(Bool(), default=True)
    #: What the node holds (ADR 0015): a full report to an incarnation it has not reported
    #: to, else the numbered changes not yet acknowledged. Absent before any control plane
    #: answered (and from an older node).
    report: ReportMessage | None = wire(REPORT, omit_none=True)


@message
class HeartbeatAnswer(Message):
    """``HeartbeatAnswer``: the term, the sender's lifecycle and timings, and whatever it
    lacks (a newer revocation list or settings record inline; a membership version that
    differs from its own means: pull ``/v1/populi/members``)."""

    term: int = wire(Int(minimum=1))
    control_plane: ControlPlaneRef = wire(Nested(ControlPlaneRef))
    membership_version: int = wire(Int())
    lifecycle: NodeLifecycle | None = wire(Nullable(LIFECYCLE))
    scope: Scope = wire(SCOPE)
    heartbeat_interval_s: float = wire(Num(above=0))
    stale_after_s: float = wire(Num(above=0))
    #: How long the sender waits for an answer before the beat counts as lost (the timing
    #: table's row for this path); absent from an older control plane: the sender's own.
    heartbeat_timeout_s: float | None = wire(Num(above=0), omit_none=True)
    revocation_serial: int = wire(Int(minimum=-1))
    revocations: str | None = wire(Nullable(Text()))
    settings_serial: int = wire(Int(minimum=0))
    settings_record: str | None = wire(Nullable(Text()))
    gpu_facts_version: str | None = wire(Nullable(Text()))
    #: The control plane's ``gpu_quarantine/<uuid>`` registers about the sender.
    gpu_registers: tuple[RegisterWrite, ...] = wire(Seq(REGISTER_WRITE))
    #: The control plane's term and the id drawn at its start (ADR 0015): a node that has
    #: not reported to it sends a full report with its next heartbeat.
    incarnation: Incarnation | None = wire(INCARNATION, omit_none=True)
    #: The answer to the heartbeat's ``report`` (absent when it carried none, or when the
    #: control plane could not record it: the node sends it again).
    report_answer: ReportAnswer | None = wire(REPORT_ANSWER, omit_none=True)


__all__ = [
    "MAX_HEARTBEAT_LEASES",
    "MAX_HEARTBEAT_REGISTERS",
    "GpuHeartbeatSummary",
    "HeartbeatAnswer",
    "HeartbeatReport",
    "HeartbeatStatus",
    "HeldLease",
]

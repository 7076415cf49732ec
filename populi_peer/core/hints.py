"""Hint records: what one node says about itself, for peers to place work by.

Each node publishes exactly one hint record about itself and peers spread it by gossip
(:mod:`populi_peer.core.gossip`). A hint is advisory: placement may choose by it, the
control plane re-checks everything at grant time from its own view (safety rule 6).

A record is ``(node_id, version, issued_ms, body)`` plus the signed text it came in
(``enrollment.hints``), which is what is forwarded: a node relays other nodes' records
verbatim and can neither alter nor forge them.

- ``version`` is the node's hybrid logical clock (:mod:`populi_peer.core.hlc`) when it
  signed. The node persists it, and :func:`next_hint_version` stamps strictly above the
  persisted floor, so a restart never makes its record look older than one it published
  before (a receiver keeps the highest version per node; an older one would be ignored
  and the node's hint frozen at its pre-restart state).
- ``issued_ms`` is the wall clock reading when it signed: the age shown to people
  (``populi gpus``) counts from it, never from the version (an HLC may run ahead of the
  wall clock after the clock stepped back).

The body (JSON, unknown keys ignored so that version N reads N-1 and N+1)::

    {"lifecycle": "active",              # the node's lifecycle as it knows it
     "roles": ["submit", "worker"],
     "accepts_remote_work": true,        # remote execution is on for this worker
     "load": {"running_tasks": 1},
     "addresses": ["10.0.0.7:7443"],     # where peers reach it (host:port)
     "gpu": {...}}                       # the node's GPU summary, with its static part

``gpu`` is exactly the heartbeat's GPU summary (``populi_peer.gpu.gpu_summary(...,
include_static=True)``, format in ``populi_peer/gpu/_summary.py``): verified facts and
the operator's advertised labels, still as two layers (docs/adr/0004). :class:`GpuHint`
is one GPU of it as placement reads it, static facts joined with metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal, get_args

from populi_peer.core.fencing import _bool, _int, _obj, _opt_int, _opt_str, _str
from populi_peer.core.hlc import Hlc, hlc_tick
from populi_peer.core.lifecycle import STATES, State
from populi_peer.core.wire import record_json
from populi_peer.errors import BadRequest

#: A GPU's health verdict: the values of ``populi_peer.gpu.Health`` (a test keeps them equal).
GpuHealth = Literal["healthy", "degraded", "unknown", "unhealthy"]
GPU_HEALTH: Final[tuple[GpuHealth, ...]] = get_args(GpuHealth)

MAX_GPUS: Final = 256
MAX_ADDRESSES: Final = 16
MAX_ROLES: Final = 16
MAX_LABELS: Final = 64
_MAX_TEXT: Final = 256


def _malformed(message: str, **details: Any) -> BadRequest:
    return BadRequest(f"hint: {message}", code="hint_malformed", **details)


def _text(value: object, where: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_TEXT:
        raise _malformed(f"{where} must be a string of 1-{_MAX_TEXT} chars", field=where)
    if not value.isprintable():
        raise _malformed(f"{where} must be printable", field=where)
    return value


def _reasons(data: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or len(value) > 64:
        raise _malformed(f"{where}.{key} must be a list of reason codes", field=key)
    return tuple(_text(item, f"{where}.{key}") for item in value)


def _count(data: Mapping[str, Any], key: str, where: str) -> int | None:
    value = _opt_int(data, key, where)
    if value is not None and value < 0:
        raise _malformed(f"{where}.{key} must be >= 0, got {value}", field=key)
    return value


@dataclass(frozen=True, slots=True)
class GpuHint:
    """One GPU of a hint: the node's verified facts (``verified``), or a pseudo-device the
    node made from its trusted advertised labels (ADR 0004), never both.

    ``allocatable`` is the node's own decision (:func:`populi_peer.gpu.allocatable`):
    verified, healthy enough, not leased, not quarantined, no foreign process.
    """

    index: int
    uuid: str | None
    name: str | None
    memory_total_bytes: int | None
    memory_free_bytes: int | None
    utilization_gpu_pct: int | None
    health: GpuHealth
    health_reasons: tuple[str, ...]
    allocatable: bool
    allocation_reasons: tuple[str, ...]
    verified: bool

    def to_json(self) -> dict[str, Any]:
        return record_json(self, nulls=True)


@dataclass(frozen=True, slots=True)
class GpuFacts:
    """A GPU summary read for placement: its devices and the advertised labels."""

    devices: tuple[GpuHint, ...] = ()
    #: Operator labels (advertised layer): constraints may use them, capacity never does.
    labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    cpu_only_reason: str | None = None


def _health(value: object, where: str) -> GpuHealth:
    for health in GPU_HEALTH:
        if value == health:
            return health
    raise _malformed(f"{where}.health must be one of {', '.join(GPU_HEALTH)}", field="health")


def _devices(section: Mapping[str, Any], where: str) -> list[Mapping[str, Any]]:
    devices = section.get("devices", [])
    if not isinstance(devices, list) or len(devices) > MAX_GPUS:
        raise _malformed(f"{where}.devices must be a list of at most {MAX_GPUS}", field="devices")
    out = []
    for i, raw in enumerate(devices):
        device = _obj(raw, f"{where}.devices[{i}]")
        index = _int(device, "index", f"{where}.devices[{i}]")
        if index < 0:
            raise _malformed(f"{where}.devices[{i}].index must be >= 0", field="index")
        out.append(device)
    return out


def gpu_facts(summary: object) -> GpuFacts:
    """Read a GPU summary (the heartbeat form, static part included) for placement.

    Metrics join static facts by ``index``; a device without metrics is ``unknown`` and
    not allocatable. Raises :class:`BadRequest` (``hint_malformed``) for a summary of the
    wrong shape; unknown keys are ignored.
    """
    data = _obj(summary, "hint gpu")
    static = _obj(data.get("static"), "hint gpu.static")
    metrics = _obj(data.get("metrics", {}), "hint gpu.metrics")
    labels_raw = _obj(static.get("advertised", {}), "hint gpu.static.advertised")
    if len(labels_raw) > MAX_LABELS:
        raise _malformed(f"more than {MAX_LABELS} advertised labels", field="advertised")
    labels = {
        _text(k, "gpu.static.advertised"): _text(v, "gpu.static.advertised")
        for k, v in labels_raw.items()
    }
    by_index: dict[int, Mapping[str, Any]] = {}
    for m in _devices(metrics, "gpu.metrics"):
        _health(m.get("health", "unknown"), "gpu.metrics")
        by_index[m["index"]] = m
    rows: list[GpuHint] = []
    for i, d in enumerate(_devices(static, "gpu.static")):
        where = f"gpu.static.devices[{i}]"
        m = by_index.get(d["index"], {})
        mwhere = f"gpu.metrics.devices[index={d['index']}]"
        uuid = _opt_str(d, "uuid", where)
        rows.append(
            GpuHint(
                index=d["index"],
                uuid=None if uuid is None else _text(uuid, f"{where}.uuid"),
                name=_opt_str(d, "name", where),
                memory_total_bytes=_count(d, "memory_total_bytes", where),
                memory_free_bytes=_count(m, "memory_free_bytes", mwhere),
                utilization_gpu_pct=_count(m, "utilization_gpu_pct", mwhere),
                health=_health(m.get("health", "unknown"), mwhere),
                health_reasons=_reasons(m, "health_reasons", mwhere),
                allocatable=bool(m) and _bool(m, "allocatable", mwhere, False),
                allocation_reasons=_reasons(m, "allocation_reasons", mwhere),
                verified=True,
            )
        )
    pseudo = metrics.get("advertised_devices", [])
    if not isinstance(pseudo, list) or len(pseudo) > MAX_GPUS:
        raise _malformed("gpu.metrics.advertised_devices must be a list", field="advertised")
    for i, raw in enumerate(pseudo):
        where = f"gpu.metrics.advertised_devices[{i}]"
        p = _obj(raw, where)
        rows.append(
            GpuHint(
                index=i,
                uuid=_text(_str(p, "uuid", where), f"{where}.uuid"),
                # An advertised model is a label, not a fact: placement never matches a
                # model pattern against it (ADR 0004, verified facts first).
                name=None,
                memory_total_bytes=None,
                memory_free_bytes=None,
                utilization_gpu_pct=None,
                health="unknown",
                health_reasons=(),
                allocatable=_bool(p, "allocatable", where, False),
                allocation_reasons=_reasons(p, "reasons", where),
                verified=False,
            )
        )
    return GpuFacts(
        devices=tuple(rows),
        labels=MappingProxyType(labels),
        cpu_only_reason=_opt_str(static, "cpu_only_reason", "gpu.static"),
    )


def _check_addresses(value: object) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or len(value) > MAX_ADDRESSES:
        raise _malformed(f"addresses must be a list of at most {MAX_ADDRESSES}", field="addresses")
    out = tuple(_text(a, "addresses") for a in value)
    if any(any(c.isspace() for c in a) for a in out):
        raise _malformed("an address must not contain white space", field="addresses")
    return out


@dataclass(frozen=True, slots=True)
class HintBody:
    """What a node says about itself (the module docstring has the JSON form).

    ``gpu`` is the node's GPU summary, kept as it was signed (``None``: not reported);
    :attr:`gpus` and :attr:`labels` are read from it once, here.
    """

    lifecycle: State
    roles: tuple[str, ...] = ()
    accepts_remote_work: bool = False
    running_tasks: int = 0
    addresses: tuple[str, ...] = ()
    gpu: Mapping[str, Any] | None = field(default=None, hash=False)
    facts: GpuFacts = field(init=False, hash=False, compare=False)

    def __post_init__(self) -> None:
        if self.lifecycle not in STATES:
            raise _malformed(
                f"lifecycle must be one of {', '.join(STATES)}, got {self.lifecycle!r}",
                field="lifecycle",
            )
        if not isinstance(self.roles, tuple) or len(self.roles) > MAX_ROLES:
            raise _malformed(f"roles must be a tuple of at most {MAX_ROLES}", field="roles")
        for role in self.roles:
            _text(role, "roles")
        if not isinstance(self.accepts_remote_work, bool):
            raise _malformed("accepts_remote_work must be true or false")
        if (
            isinstance(self.running_tasks, bool)
            or not isinstance(self.running_tasks, int)
            or self.running_tasks < 0
        ):
            raise _malformed("load.running_tasks must be an integer >= 0", field="running_tasks")
        object.__setattr__(self, "addresses", _check_addresses(self.addresses))
        facts = GpuFacts() if self.gpu is None else gpu_facts(self.gpu)
        object.__setattr__(self, "facts", facts)

    @property
    def gpus(self) -> tuple[GpuHint, ...]:
        return self.facts.devices

    @property
    def labels(self) -> Mapping[str, str]:
        return self.facts.labels

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "lifecycle": self.lifecycle,
            "roles": list(self.roles),
            "accepts_remote_work": self.accepts_remote_work,
            "load": {"running_tasks": self.running_tasks},
            "addresses": list(self.addresses),
        }
        if self.gpu is not None:
            out["gpu"] = dict(self.gpu)
        return out

    @classmethod
    def from_json(cls, data: object) -> HintBody:
        """Parse a body; :class:`BadRequest` (``hint_malformed``) names what is wrong."""
        try:
            return cls._from_json(data)
        except BadRequest as exc:
            if exc.code == "hint_malformed":
                raise
            raise _malformed(str(exc)) from None

    @classmethod
    def _from_json(cls, data: object) -> HintBody:
        what = "hint body"
        obj = _obj(data, what)
        lifecycle = _str(obj, "lifecycle", what)
        roles = obj.get("roles", [])
        if not isinstance(roles, list):
            raise _malformed("roles must be a list", field="roles")
        load = _obj(obj.get("load", {}), "hint load")
        gpu = obj.get("gpu")
        if gpu is not None and not isinstance(gpu, Mapping):
            raise _malformed("gpu must be an object", field="gpu")
        return cls(
            lifecycle=lifecycle,  # type: ignore[arg-type]  # checked in __post_init__
            roles=tuple(roles),
            accepts_remote_work=_bool(obj, "accepts_remote_work", what, False),
            running_tasks=_int(load, "running_tasks", "hint load")
            if "running_tasks" in load
            else 0,
            addresses=_check_addresses(obj.get("addresses", [])),
            gpu=gpu,
        )


@dataclass(frozen=True, slots=True)
class HintRecord:
    """A verified hint: the node it is about (and signed by), its version, its body, and
    the signed ``text`` that is forwarded as is."""

    node_id: str
    version: Hlc
    issued_ms: int
    body: HintBody
    text: str = field(repr=False)

    @property
    def size(self) -> int:
        """Bytes it takes in a gossip message (the signed text is ASCII)."""
        return len(self.text)

    @classmethod
    def from_signed(
        cls,
        *,
        node_id: str,
        version_wall_ms: int,
        version_counter: int,
        issued_ms: int,
        body: object,
        text: str,
    ) -> HintRecord:
        """Build a record from a verified signed hint (``enrollment.hints.SignedHint``);
        :class:`BadRequest` (``hint_malformed``) when its body does not parse."""
        return cls(
            node_id=node_id,
            version=Hlc(version_wall_ms, version_counter),
            issued_ms=issued_ms,
            body=HintBody.from_json(body),
            text=text,
        )


@dataclass(frozen=True, slots=True)
class HintView:
    """A held hint and its age, for display (``populi gpus`` marks these as hints)."""

    record: HintRecord
    age_s: float

    def to_json(self) -> dict[str, Any]:
        body = self.record.body
        return {
            "node": self.record.node_id,
            "hint": True,
            "age_s": round(self.age_s, 3),
            "version": self.record.version.to_json(),
            "lifecycle": body.lifecycle,
            "running_tasks": body.running_tasks,
            "addresses": list(body.addresses),
            "labels": dict(body.labels),
            "gpus": [g.to_json() for g in body.gpus],
        }


def hint_age_s(record: HintRecord, now_wall_ms: int) -> float:
    """Seconds since the node signed ``record`` by this node's wall clock; never negative
    (a signer's clock a little ahead of ours shows as age 0)."""
    if isinstance(now_wall_ms, bool) or not isinstance(now_wall_ms, int):
        raise BadRequest(f"now_wall_ms must be an integer, got {now_wall_ms!r}")
    return max(0, now_wall_ms - record.issued_ms) / 1000


def next_hint_version(floor: Hlc, now_wall_ms: int) -> Hlc:
    """The version of this node's next hint: strictly above ``floor``.

    ``floor`` is the highest of: the version persisted in this node's store, every version
    it published since, and any record about itself it met in gossip newer than those
    (:attr:`~populi_peer.core.gossip.MergeResult.own_newer`, e.g. after the data directory
    was restored from a backup). The caller persists the returned version before it signs
    and serves the record: then no restart can publish a lower one.
    """
    return hlc_tick(floor, now_wall_ms)


__all__ = [
    "GPU_HEALTH",
    "MAX_ADDRESSES",
    "MAX_GPUS",
    "GpuFacts",
    "GpuHealth",
    "GpuHint",
    "HintBody",
    "HintRecord",
    "HintView",
    "gpu_facts",
    "hint_age_s",
    "next_hint_version",
]

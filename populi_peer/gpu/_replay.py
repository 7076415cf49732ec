"""Replay: a fake ``pynvml`` built from real captures, and timed sequences of them.

A *capture* is the JSON that ``capture_nvml.py`` writes (the package ships two real H100
captures in ``captures/``): each NVML query of each device with its value, or
``{"error": "NVMLError_...", "code": N}`` for the NVML error it raised. :class:`ReplayNvml`
is a module-shaped object whose ``nvml*`` functions answer from a capture and raise the
*real* ``pynvml`` error classes, so the adapter code that runs against NVML is the code
that runs against a replay.

Two keys extend the capture format, both optional: ``"init"`` (an error object: nvmlInit
raises it, e.g. ``NVMLError_DriverNotLoaded`` for a node whose driver is not loaded) and
``compute_processes`` entries given as ``{"pid": N, "usedGpuMemory": B}`` objects (the
real capture holds an unconverted object repr there; an entry that cannot be read is
answered as a process without a pid — a foreign process).

A *sequence* is a fixture that plays captures and events at times (seconds since the
probe was opened, on the probe's ``Clock.mono()``)::

    {"populi_replay": 1,
     "steps": [
       {"at_s": 0,  "capture": "h100-80gb-hbm3-idle.json"},
       {"at_s": 5,  "capture": {... an inline capture ...}},
       {"at_s": 5,  "xid": {"index": 0, "code": 79}},
       {"at_s": 6,  "lost": [0]},
       {"at_s": 7,  "hang": {"index": 0, "query": "memory", "until_s": 60}}
     ]}

- ``capture``: from then on, answers come from this capture. A relative path resolves
  against the sequence file's folder, then against the package's ``captures/``. The first
  capture step must be at ``at_s`` 0.
- ``xid``: ``run_xid_watch`` reports this XID for device ``index`` at that time.
- ``lost``: from then on, every query of these devices raises ``NVMLError_GpuIsLost``
  (sticky, like a GPU that fell off the bus).
- ``hang``: matching queries never answer, as under a wedged driver. ``index``
  (default: every device and the system queries) and ``query`` (a capture key such as
  ``memory``, ``nvlink`` or ``init``; default: all) narrow it; ``until_s`` (default:
  until the probe is closed) releases it — checked when the probe refreshes. A replay
  probe runs on the trio loop and plays the hang as a call that does not answer within
  its timeout; a threaded one (``open_replay_probe(threaded=True)``, the NVML code path)
  really blocks the worker thread until the release.

Steps apply in ``at_s`` order; a capture file is a sequence of one capture step.

Two nodes replaying one capture must not present the same GPU UUIDs (a GPU is identified by
(node, UUID), and capture UUIDs are one real card's): :func:`derive_replay_uuid`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pynvml

from populi_peer.gpu.errors import FixtureError

SEQUENCE_FORMAT_VERSION = 1

_UUID_DOMAIN = b"populi replay gpu uuid v1\x00"


def derive_replay_uuid(capture_uuid: str, node_id: str) -> str:
    """A UUID for a replayed GPU that is stable for one node and distinct between nodes.

    ``sha256("populi replay gpu uuid v1\\0" + capture_uuid + "\\0" + node_id)``, the first
    128 bits written as ``GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`` (lowercase hex, the
    form NVML uses), so everything that parses a GPU UUID accepts it.
    """
    digest = hashlib.sha256(
        _UUID_DOMAIN + capture_uuid.encode() + b"\x00" + node_id.encode()
    ).hexdigest()[:32]
    return f"GPU-{digest[0:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def package_capture_names() -> tuple[str, ...]:
    """The captures shipped in ``populi_peer/gpu/captures/``."""
    folder = resources.files("populi_peer.gpu").joinpath("captures")
    return tuple(sorted(p.name for p in folder.iterdir() if p.name.endswith(".json")))


def _read_package_capture(name: str) -> str | None:
    if name not in package_capture_names():
        return None
    return resources.files("populi_peer.gpu").joinpath("captures", name).read_text("utf-8")


# ---------------------------------------------------------------------------------------
# Fixture files


@dataclass(frozen=True, slots=True)
class HangStep:
    at_s: float
    index: int | None
    query: str | None
    until_s: float | None


@dataclass(frozen=True, slots=True)
class XidStep:
    at_s: float
    index: int
    code: int


@dataclass(frozen=True, slots=True)
class Sequence:
    """A parsed fixture: captures, losses, hangs and XIDs at times."""

    label: str
    captures: tuple[tuple[float, dict[str, Any]], ...]
    lost: tuple[tuple[float, frozenset[int]], ...] = ()
    hangs: tuple[HangStep, ...] = ()
    xids: tuple[XidStep, ...] = ()


def _load_json_text(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FixtureError(f"GPU fixture {where}: not valid JSON ({exc})") from exc


def load_fixture(fixture: str | os.PathLike[str]) -> Sequence:
    """Read a capture or a sequence file; a bare name may be one of the package captures."""
    path = Path(fixture)
    if path.is_file():
        try:
            text = path.read_text("utf-8")
        except OSError as exc:
            raise FixtureError(f"GPU fixture {path}: cannot read it ({exc})") from exc
        data = _load_json_text(text, str(path))
        return parse_fixture(data, label=path.name, base_dir=path.parent)
    if len(path.parts) == 1:
        text_or_none = _read_package_capture(path.name)
        if text_or_none is not None:
            data = _load_json_text(text_or_none, path.name)
            return parse_fixture(data, label=path.name, base_dir=None)
    names = ", ".join(package_capture_names())
    raise FixtureError(
        f"GPU fixture {os.fspath(fixture)}: no such file; give a path to a capture or "
        f"sequence, or one of the shipped captures: {names}"
    )


def parse_fixture(data: Any, *, label: str, base_dir: Path | None) -> Sequence:
    if isinstance(data, dict) and "populi_replay" in data:
        return _parse_sequence(data, label=label, base_dir=base_dir)
    _check_capture(data, label)
    return Sequence(label=label, captures=((0.0, data),))


def _check_capture(data: Any, where: str) -> None:
    if not isinstance(data, dict) or not isinstance(data.get("devices"), list):
        raise FixtureError(
            f"GPU fixture {where}: not a capture (an object with a 'devices' list) "
            "nor a sequence (an object with 'populi_replay')"
        )
    for i, dev in enumerate(data["devices"]):
        if not isinstance(dev, dict):
            raise FixtureError(f"GPU fixture {where}: devices[{i}] is not an object")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FixtureError(f"GPU fixture {where}: expected a number of seconds, got {value!r}")
    if value < 0:
        raise FixtureError(f"GPU fixture {where}: expected a time >= 0, got {value!r}")
    return float(value)


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FixtureError(f"GPU fixture {where}: expected a non-negative integer, got {value!r}")
    return value


def _resolve_capture(ref: Any, where: str, base_dir: Path | None) -> dict[str, Any]:
    if isinstance(ref, dict):
        _check_capture(ref, where)
        return ref
    if not isinstance(ref, str) or not ref:
        raise FixtureError(f"GPU fixture {where}: 'capture' must be a file name or an object")
    candidates: list[Path] = []
    if base_dir is not None:
        candidates.append(base_dir / ref)
    elif Path(ref).is_absolute():
        candidates.append(Path(ref))
    for candidate in candidates:
        if candidate.is_file():
            data = _load_json_text(candidate.read_text("utf-8"), str(candidate))
            _check_capture(data, str(candidate))
            return data  # type: ignore[no-any-return]
    text = _read_package_capture(ref) if len(Path(ref).parts) == 1 else None
    if text is None:
        raise FixtureError(
            f"GPU fixture {where}: capture {ref!r} not found next to the sequence nor among "
            f"the shipped captures ({', '.join(package_capture_names())})"
        )
    data = _load_json_text(text, ref)
    _check_capture(data, ref)
    return data  # type: ignore[no-any-return]


_STEP_KINDS = ("capture", "xid", "lost", "hang")


def _parse_sequence(data: dict[str, Any], *, label: str, base_dir: Path | None) -> Sequence:
    version = data.get("populi_replay")
    if version != SEQUENCE_FORMAT_VERSION:
        raise FixtureError(
            f"GPU fixture {label}: populi_replay {version!r} is not supported "
            f"(this Populi reads version {SEQUENCE_FORMAT_VERSION})"
        )
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise FixtureError(f"GPU fixture {label}: 'steps' must be a non-empty list")
    captures: list[tuple[float, dict[str, Any]]] = []
    lost: list[tuple[float, frozenset[int]]] = []
    hangs: list[HangStep] = []
    xids: list[XidStep] = []
    for i, step in enumerate(steps):
        where = f"{label} steps[{i}]"
        if not isinstance(step, dict):
            raise FixtureError(f"GPU fixture {where}: a step must be an object")
        at_s = _number(step.get("at_s"), f"{where}.at_s")
        kinds = [k for k in _STEP_KINDS if k in step]
        if len(kinds) != 1:
            raise FixtureError(
                f"GPU fixture {where}: a step needs exactly one of {', '.join(_STEP_KINDS)}"
            )
        kind = kinds[0]
        body = step[kind]
        if kind == "capture":
            captures.append((at_s, _resolve_capture(body, where, base_dir)))
        elif kind == "lost":
            if not isinstance(body, list):
                raise FixtureError(f"GPU fixture {where}.lost: expected a list of indices")
            lost.append((at_s, frozenset(_int(x, f"{where}.lost") for x in body)))
        elif kind == "xid":
            if not isinstance(body, dict):
                raise FixtureError(f"GPU fixture {where}.xid: expected {{index, code}}")
            xids.append(
                XidStep(
                    at_s,
                    _int(body.get("index"), f"{where}.xid.index"),
                    _int(body.get("code"), f"{where}.xid.code"),
                )
            )
        else:
            if not isinstance(body, dict):
                raise FixtureError(f"GPU fixture {where}.hang: expected an object")
            index = body.get("index")
            query = body.get("query")
            until = body.get("until_s")
            if query is not None and not isinstance(query, str):
                raise FixtureError(f"GPU fixture {where}.hang.query: expected a capture key")
            hangs.append(
                HangStep(
                    at_s,
                    None if index is None else _int(index, f"{where}.hang.index"),
                    query,
                    None if until is None else _number(until, f"{where}.hang.until_s"),
                )
            )
    captures.sort(key=lambda c: c[0])
    if not captures or captures[0][0] != 0:
        raise FixtureError(f"GPU fixture {label}: the first capture step must be at at_s 0")
    return Sequence(
        label=label,
        captures=tuple(captures),
        lost=tuple(sorted(lost, key=lambda x: x[0])),
        hangs=tuple(sorted(hangs, key=lambda h: h.at_s)),
        xids=tuple(sorted(xids, key=lambda x: x.at_s)),
    )


# ---------------------------------------------------------------------------------------
# The fake NVML


def _nvml_error(code: int) -> BaseException:
    error: BaseException = pynvml.NVMLError(code)
    return error


def _captured_error(value: Any) -> BaseException:
    """The real pynvml error a capture recorded (``{"error": name, "code": n}``)."""
    code = value.get("code")
    if (
        isinstance(code, int)
        and not isinstance(code, bool)
        and code in (pynvml.NVMLError._valClassMapping)
    ):
        return _nvml_error(code)
    name = value.get("error")
    if name == "missing_in_bindings":
        return _nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    cls = getattr(pynvml, name, None) if isinstance(name, str) else None
    if isinstance(cls, type) and issubclass(cls, pynvml.NVMLError) and cls is not pynvml.NVMLError:
        error: BaseException = cls()
        return error
    return _nvml_error(pynvml.NVML_ERROR_UNKNOWN)


def _is_error(value: Any) -> bool:
    return isinstance(value, dict) and "error" in value


@dataclass(frozen=True, slots=True)
class _Handle:
    """What ``nvmlDeviceGetHandleByIndex`` returns in a replay."""

    index: int


class ReplayHang(BaseException):
    """Raised by a non-blocking :class:`ReplayNvml` where a hang step makes a query hang.

    A BaseException so that no ``except Exception`` between the fake and the probe's
    caller swallows it; the in-loop caller turns it into a call that never answers.
    """

    def __init__(self, hang: _Hang) -> None:
        super().__init__(hang.step)
        self.hang = hang


@dataclass(slots=True)
class _Hang:
    step: HangStep
    released: threading.Event = field(default_factory=threading.Event)

    def matches(self, index: int | None, key: str) -> bool:
        if self.step.index is not None and self.step.index != index:
            return False
        return self.step.query is None or self.step.query == key


def _as_object(value: Any) -> Any:
    """A captured struct (a JSON object) as the attribute object pynvml returns."""
    return SimpleNamespace(**value) if isinstance(value, dict) else value


def _as_tuple(value: Any) -> Any:
    """A captured pair or row (a JSON list) as the tuple pynvml returns."""
    return tuple(value) if isinstance(value, list) else value


def _system_reader(key: str) -> Callable[[ReplayNvml], Any]:
    """An ``nvmlSystemGet*`` function that answers the capture's ``key``."""

    def read(self: ReplayNvml) -> Any:
        return self._system(key)

    return read


def _device_reader(
    key: str, shape: Callable[[Any], Any] = lambda value: value
) -> Callable[[ReplayNvml, Any], Any]:
    """An ``nvmlDeviceGet*(handle)`` function that answers the device's ``key``, shaped."""

    def read(self: ReplayNvml, handle: Any) -> Any:
        return shape(self._device(handle, key))

    return read


class ReplayNvml:
    """A ``pynvml``-shaped object that answers from a capture.

    Only the functions the probe uses exist; a capture key that is missing makes its query
    raise ``NVMLError_FunctionNotFound`` ("not captured"). Thread-safe: the probe calls it
    from worker threads while :meth:`set_state` runs on the trio thread.
    """

    def __init__(
        self,
        capture: dict[str, Any],
        *,
        uuid_map: Callable[[str], str] | None = None,
        blocking_hangs: bool = True,
    ) -> None:
        self._capture = capture
        self._uuid_map = uuid_map
        self._blocking_hangs = blocking_hangs
        self._lost: frozenset[int] = frozenset()
        self._hangs: tuple[_Hang, ...] = ()
        self._events: queue.Queue[tuple[int, int]] = queue.Queue()
        #: Calls answered so far (a replay's cost counter; benchmarks read it).
        self.calls = 0

    # -- control (not part of the pynvml shape) -----------------------------------------

    def set_state(
        self,
        *,
        capture: dict[str, Any] | None = None,
        lost: Iterable[int] | None = None,
        hangs: Iterable[_Hang] | None = None,
    ) -> None:
        if capture is not None:
            self._capture = capture
        if lost is not None:
            self._lost = frozenset(lost)
        if hangs is not None:
            self._hangs = tuple(hangs)

    def push_xid(self, index: int, code: int) -> None:
        """Queue an XID event for ``nvmlEventSetWait_v2`` (tests of the NVML event path)."""
        self._events.put((index, code))

    # -- helpers ------------------------------------------------------------------------

    def _wait_hangs(self, index: int | None, key: str) -> None:
        for hang in self._hangs:
            if hang.matches(index, key) and not hang.released.is_set():
                if not self._blocking_hangs:
                    raise ReplayHang(hang)
                hang.released.wait()

    def _system(self, key: str, *, required: bool = True) -> Any:
        """The capture's ``key`` once its hangs are over; a captured error is raised. A key
        the capture lacks is ``NVMLError_FunctionNotFound``, or ``None`` where not
        ``required``."""
        self.calls += 1
        self._wait_hangs(None, key)
        if required and key not in self._capture:
            raise _nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        value = self._capture.get(key)
        if _is_error(value):
            raise _captured_error(value)
        return value

    def _device(self, handle: Any, key: str) -> Any:
        self.calls += 1
        if not isinstance(handle, _Handle):
            raise _nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        self._wait_hangs(handle.index, key)
        if handle.index in self._lost:
            raise _nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
        devices = self._capture.get("devices", [])
        if handle.index >= len(devices):
            raise _nvml_error(pynvml.NVML_ERROR_GPU_IS_LOST)
        device = devices[handle.index]
        if key not in device:
            raise _nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        value = device[key]
        if _is_error(value):
            raise _captured_error(value)
        return value

    # -- the pynvml shape ---------------------------------------------------------------
    # Most functions answer one capture key as it is (or as the object pynvml returns);
    # those with more to them are methods below.

    nvmlSystemGetDriverVersion = _system_reader("driver_version")
    nvmlSystemGetNVMLVersion = _system_reader("nvml_version")
    nvmlSystemGetCudaDriverVersion = _system_reader("cuda_driver_version")
    nvmlDeviceGetName = _device_reader("name")
    nvmlDeviceGetPciInfo = _device_reader("pci", _as_object)
    nvmlDeviceGetMemoryInfo = _device_reader("memory", _as_object)
    nvmlDeviceGetUtilizationRates = _device_reader("utilization", _as_object)
    nvmlDeviceGetPowerUsage = _device_reader("power_usage_mw")
    nvmlDeviceGetEnforcedPowerLimit = _device_reader("power_limit_mw")
    nvmlDeviceGetCudaComputeCapability = _device_reader("cuda_cc", _as_tuple)
    nvmlDeviceGetMigMode = _device_reader("mig_mode")
    nvmlDeviceGetEccMode = _device_reader("ecc_mode")
    nvmlDeviceGetRemappedRows = _device_reader("remapped_rows", _as_tuple)
    nvmlDeviceGetCurrentClocksEventReasons = _device_reader("clocks_throttle_reasons")
    nvmlDeviceGetCurrentClocksThrottleReasons = _device_reader("clocks_throttle_reasons")
    nvmlDeviceGetPersistenceMode = _device_reader("persistence_mode")
    nvmlDeviceGetNumaNodeId = _device_reader("numa_node")
    nvmlDeviceGetCurrPcieLinkGeneration = _device_reader("pcie_link_gen")
    nvmlDeviceGetCurrPcieLinkWidth = _device_reader("pcie_link_width")
    nvmlDeviceGetFanSpeed = _device_reader("fan_speed")
    nvmlDeviceGetSupportedEventTypes = _device_reader("xid_supported_events")

    def nvmlInit(self) -> None:
        self._system("init", required=False)

    def nvmlShutdown(self) -> None:
        self.calls += 1

    def nvmlDeviceGetCount(self) -> int:
        count = self._system("device_count", required=False)
        if isinstance(count, int) and not isinstance(count, bool):
            return count
        return len(self._capture.get("devices", []))

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self.calls += 1
        self._wait_hangs(index, "handle")
        if not 0 <= index < len(self._capture.get("devices", [])):
            raise _nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return _Handle(index)

    def nvmlDeviceGetIndex(self, handle: Any) -> int:
        self.calls += 1
        if not isinstance(handle, _Handle):
            raise _nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return handle.index

    def nvmlDeviceGetUUID(self, handle: Any) -> Any:
        value = self._device(handle, "uuid")
        if isinstance(value, str) and self._uuid_map is not None:
            return self._uuid_map(value)
        return value

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> Any:
        if sensor != pynvml.NVML_TEMPERATURE_GPU:
            raise _nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        return self._device(handle, "temperature_gpu")

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter: int) -> Any:
        if error_type != pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED:
            raise _nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        if counter == pynvml.NVML_VOLATILE_ECC:
            return self._device(handle, "ecc_volatile_uncorrected")
        if counter == pynvml.NVML_AGGREGATE_ECC:
            return self._device(handle, "ecc_aggregate_uncorrected")
        raise _nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: Any) -> Any:
        value = self._device(handle, "compute_processes")
        if not isinstance(value, list):
            return value
        out = []
        for entry in value:
            if isinstance(entry, dict):
                out.append(
                    SimpleNamespace(pid=entry.get("pid"), usedGpuMemory=entry.get("usedGpuMemory"))
                )
            else:
                # The real capture holds "<pynvml.nvmlFriendlyObject object at 0x...>":
                # a process whose pid nobody can read.
                out.append(SimpleNamespace())
        return out

    def _nvlink(self, handle: Any, link: int) -> dict[str, Any]:
        links = self._device(handle, "nvlink")
        if not isinstance(links, list):
            raise _nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        for entry in links:
            if isinstance(entry, dict) and entry.get("link") == link:
                return entry
        # Past the captured links: the device has no such link.
        raise _nvml_error(pynvml.NVML_ERROR_INVALID_ARGUMENT)

    def nvmlDeviceGetNvLinkState(self, handle: Any, link: int) -> Any:
        state = self._nvlink(handle, link).get("state")
        if _is_error(state):
            raise _captured_error(state)
        return state

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: Any, link: int) -> Any:
        remote = self._nvlink(handle, link).get("remote_pci")
        if remote is None:
            raise _nvml_error(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        if _is_error(remote):
            raise _captured_error(remote)
        return _as_object(remote)

    # Events: enough of the API for the probe's NVML event loop to run against a replay.

    def nvmlEventSetCreate(self) -> object:
        self.calls += 1
        return object()

    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: object) -> None:
        supported = self.nvmlDeviceGetSupportedEventTypes(handle)
        if not isinstance(supported, int) or not supported & event_types:
            raise _nvml_error(pynvml.NVML_ERROR_NOT_SUPPORTED)

    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int) -> Any:
        try:
            index, code = self._events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise _nvml_error(pynvml.NVML_ERROR_TIMEOUT) from None
        return SimpleNamespace(
            device=_Handle(index),
            eventType=pynvml.nvmlEventTypeXidCriticalError,
            eventData=code,
            gpuInstanceId=0xFFFFFFFF,
            computeInstanceId=0xFFFFFFFF,
        )

    def nvmlEventSetFree(self, event_set: object) -> None:
        self.calls += 1


class ReplayController:
    """Applies a :class:`Sequence` to a :class:`ReplayNvml` as sequence time passes."""

    def __init__(
        self,
        sequence: Sequence,
        *,
        uuid_map: Callable[[str], str] | None,
        blocking_hangs: bool = False,
    ) -> None:
        self.sequence = sequence
        self._uuid_map = uuid_map
        self.nvml = ReplayNvml(
            sequence.captures[0][1], uuid_map=uuid_map, blocking_hangs=blocking_hangs
        )
        self._hangs = [_Hang(step) for step in sequence.hangs]
        self._capture_step = -1
        self._closed = False

    def advance_to(self, t_s: float) -> bool:
        """Bring the fake to sequence time ``t_s``; true when the capture changed."""
        step = self._capture_index_at(t_s)
        lost: set[int] = set()
        for at_s, indices in self.sequence.lost:
            if at_s <= t_s:
                lost |= indices
        active = []
        for hang in self._hangs:
            if hang.step.until_s is not None and hang.step.until_s <= t_s:
                hang.released.set()
            if hang.step.at_s <= t_s and not hang.released.is_set():
                active.append(hang)
        changed = step != self._capture_step
        self._capture_step = step
        self.nvml.set_state(capture=self.sequence.captures[step][1], lost=lost, hangs=active)
        return changed

    def _capture_index_at(self, t_s: float) -> int:
        return max(
            (i for i, (at_s, _) in enumerate(self.sequence.captures) if at_s <= t_s), default=0
        )

    def device_uuid_at(self, index: int, t_s: float) -> str | None:
        """The UUID device ``index`` has at sequence time ``t_s`` (no NVML call)."""
        capture = self.sequence.captures[self._capture_index_at(t_s)][1]
        devices = capture.get("devices", [])
        if not 0 <= index < len(devices):
            return None
        uuid = devices[index].get("uuid")
        if not isinstance(uuid, str):
            return None
        return self._uuid_map(uuid) if self._uuid_map else uuid

    def capture_epoch(self) -> int:
        return self._capture_step

    def close(self) -> None:
        """Release every hang, so no worker thread stays blocked after the probe."""
        self._closed = True
        for hang in self._hangs:
            hang.released.set()
        self.nvml.set_state(hangs=())


__all__ = [
    "SEQUENCE_FORMAT_VERSION",
    "ReplayController",
    "ReplayHang",
    "ReplayNvml",
    "Sequence",
    "derive_replay_uuid",
    "load_fixture",
    "package_capture_names",
    "parse_fixture",
]

"""The probe: the one adapter between the trio agent and NVML (or a replay of it).

Every NVML call runs in a worker thread (``trio.to_thread.run_sync`` with a
``CapacityLimiter(1)``), never on the trio loop, and each is bounded by
``call_timeout_s``. A C call that hangs cannot be interrupted, so the probe *abandons* it:
the field it was reading becomes unknown (``timeout``), the thread stays blocked in the
driver holding the limiter, and every later call of the same refresh is answered at once
as unknown (``wedged``) instead of queueing behind it. The next refresh tries again: its
first call waits up to ``call_timeout_s`` for the limiter, so while NVML stays wedged a
refresh costs at most one ``call_timeout_s`` and reports the GPUs as unknown; once the
stuck call returns, the probe reads normally again. ``GpuInventory.wedged`` says which
refreshes were cut short. The XID watcher blocks in its own thread, with its own limiter.

The queries of one device go to the thread as one batch (one hop instead of ~17); the
thread reports each answer as it comes, and each call still gets its own timeout.

Facts that cannot change while the driver is loaded (UUID, name, PCI bus id, compute
capability, NUMA node, device count and handles, versions) are read once per NVML session
and cached; a lost GPU thus keeps the UUID it had, so its verdict names the right GPU.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import trio

from populi_peer.clock import Clock
from populi_peer.gpu._health import XidEvent, is_critical_xid
from populi_peer.gpu._records import ComputeProcess, GpuDevice, GpuInventory, NvLink
from populi_peer.gpu._replay import (
    ReplayController,
    ReplayHang,
    _Hang,
    derive_replay_uuid,
    load_fixture,
)

log = logging.getLogger("populi.gpu")

try:
    import pynvml as _pynvml
except ImportError:  # pragma: no cover - a dependency; guarded so a broken install is CPU-only
    _pynvml = None

#: NVML's own bound on links per device (NVML_NVLINK_MAX_LINKS).
_MAX_NVLINKS = 18

#: nvmlEventTypeXidCriticalError: despite its name NVML reports every XID through it.
_XID_EVENT_TYPE = 0x8

#: How long one nvmlEventSetWait_v2 blocks before the watcher checks for a stop request.
DEFAULT_XID_WAIT_MS = 500


# ---------------------------------------------------------------------------------------
# Calls into the blocking library


@dataclass(frozen=True, slots=True)
class _Ok:
    value: Any


@dataclass(frozen=True, slots=True)
class _Fail:
    reason: str

    @property
    def lost(self) -> bool:
        return self.reason == "gpu_lost"


_Outcome = _Ok | _Fail


def error_reason(exc: BaseException) -> str:
    """The ``unknown`` reason for an exception raised by an NVML call."""
    name = type(exc).__name__
    if name == "NVMLError_NotSupported":
        return "not_supported"
    if name == "NVMLError_GpuIsLost":
        return "gpu_lost"
    return f"error:{name}"


_Call = tuple[Callable[..., Any], tuple[Any, ...]]


def _run_one(fn: Callable[..., Any], args: tuple[Any, ...]) -> _Outcome:
    try:
        return _Ok(fn(*args))
    except Exception as exc:  # the library's errors become unknown fields
        return _Fail(error_reason(exc))


class _Calls(ABC):
    """Runs blocking library calls in batches; one call is a batch of one."""

    async def call(self, fn: Callable[..., Any], *args: Any) -> _Outcome:
        (outcome,) = await self.call_batch([(fn, args)])
        return outcome

    @abstractmethod
    async def call_batch(
        self, calls: list[_Call], *, stop: Callable[[_Outcome], bool] | None = None
    ) -> list[_Outcome]:
        """Outcomes of ``calls`` in order, ending early where ``stop(outcome)`` holds."""


class _Caller(_Calls):
    """Runs blocking calls in one worker thread at a time, each bounded by a timeout.

    A batch runs its calls one after another in a single worker thread (one thread hop
    per batch, not per call); the thread reports each result as it comes, and the trio
    side gives every call its own ``timeout_s`` from the previous call's answer. So each
    call is bounded exactly as if it ran alone, at a fraction of the cost.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._limiter = trio.CapacityLimiter(1)
        self._lock = threading.Lock()
        self._abandoned = 0

    @property
    def stuck_calls(self) -> int:
        """Abandoned calls whose thread has not come back from the library yet."""
        with self._lock:
            return self._abandoned

    async def call_batch(
        self, calls: list[_Call], *, stop: Callable[[_Outcome], bool] | None = None
    ) -> list[_Outcome]:
        """Outcomes of ``calls`` in order. When ``stop(outcome)`` holds the batch ends
        there (the list is shorter). When a call does not answer in time it is
        ``timeout`` (``wedged`` if it never got the thread) and the rest are ``wedged``."""
        token = trio.lowlevel.current_trio_token()
        results: list[_Outcome] = []
        waiter: list[trio.Event] = [trio.Event()]
        finished = [False]
        give_up = threading.Event()
        state = {"started": False, "returned": False, "abandoned": False}

        def deliver(outcome: _Outcome) -> None:  # on the trio thread, in order
            results.append(outcome)
            waiter[0].set()

        def run_all() -> None:  # in the worker thread
            state["started"] = True
            try:
                for fn, args in calls:
                    if give_up.is_set():
                        return
                    outcome = _run_one(fn, args)
                    try:
                        token.run_sync_soon(deliver, outcome)
                    except trio.RunFinishedError:
                        return
                    if stop is not None and stop(outcome):
                        return
            finally:
                with self._lock:
                    state["returned"] = True
                    if state["abandoned"]:
                        self._abandoned -= 1

        async def runner() -> None:
            await trio.to_thread.run_sync(run_all, limiter=self._limiter, abandon_on_cancel=True)
            # Reported after every deliver(): run_sync_soon keeps the thread's order.
            finished[0] = True
            waiter[0].set()

        seen = 0
        timed_out = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(runner)
                while True:
                    with trio.move_on_after(self.timeout_s):
                        while len(results) == seen and not finished[0]:
                            waiter[0] = trio.Event()
                            await waiter[0].wait()
                    if len(results) > seen:
                        seen = len(results)  # an answer: the next call gets a full timeout
                        if seen == len(calls) or (stop is not None and stop(results[-1])):
                            # Every answer is in: do not wait for the thread's own return,
                            # which a timeout could misread as a hang.
                            nursery.cancel_scope.cancel()
                            break
                        continue
                    if not finished[0]:
                        timed_out = True
                        nursery.cancel_scope.cancel()
                    break
        finally:
            give_up.set()
        outcomes = list(results[:seen])
        if not timed_out:
            return outcomes
        with self._lock:
            started = state["started"]
            if started and not state["returned"]:
                state["abandoned"] = True
                self._abandoned += 1
        # Never started: it waited for the limiter that an earlier stuck call still holds
        # (trio cancelled the wait; no thread was left behind).
        outcomes.append(_Fail("timeout" if started else "wedged"))
        outcomes += [_Fail("wedged")] * (len(calls) - len(outcomes))
        return outcomes


class _InlineCaller:
    """Runs a replay's calls on the trio thread, with the thread caller's semantics.

    A replay answers from memory and never blocks, so it needs no thread; keeping it on
    the loop makes it deterministic under ``autojump_clock`` (which cannot see worker
    threads and would jump past a call still in flight). A ``hang`` step plays what the
    thread caller does with a stuck call: the call does not answer within the timeout
    (``timeout``), and until the hang is released every call first waits out the timeout
    for the "limiter" the stuck call holds (``wedged``). Releases happen when a refresh
    advances the replay, never during a refresh, so waiting the full timeout is exact.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._holder: _Hang | None = None

    @property
    def stuck_calls(self) -> int:
        return int(self._holder is not None and not self._holder.released.is_set())

    async def call(self, fn: Callable[..., Any], *args: Any) -> _Outcome:
        if self._holder is not None:
            if not self._holder.released.is_set():
                await trio.sleep(self.timeout_s)
                return _Fail("wedged")
            self._holder = None
        await trio.lowlevel.checkpoint()
        try:
            return _Ok(fn(*args))
        except ReplayHang as hang:
            self._holder = hang.hang
            await trio.sleep(self.timeout_s)
            return _Fail("timeout")
        except Exception as exc:
            return _Fail(error_reason(exc))

    async def call_batch(
        self, calls: list[_Call], *, stop: Callable[[_Outcome], bool] | None = None
    ) -> list[_Outcome]:
        """As :meth:`_Caller.call_batch`."""
        outcomes: list[_Outcome] = []
        for fn, args in calls:
            outcome = await self.call(fn, *args)
            outcomes.append(outcome)
            if isinstance(outcome, _Fail) and outcome.reason in ("timeout", "wedged"):
                outcomes += [_Fail("wedged")] * (len(calls) - len(outcomes))
                break
            if stop is not None and stop(outcome):
                break
        return outcomes


# ---------------------------------------------------------------------------------------
# Conversions from what pynvml returns to record fields. Each returns the field values,
# or raises _Unreadable when the value has an unexpected shape.


class _Unreadable(Exception):
    pass


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Unreadable
    return value


def _opt_int(value: Any) -> int | None:
    return None if value is None else _int(value)


def _enabled(value: Any) -> bool:
    return _int(value) == 1


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if not isinstance(value, str):
        raise _Unreadable
    return value


def _attr(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _pair(value: Any) -> tuple[Any, Any]:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise _Unreadable
    return value[0], value[1]


def _conv_processes(value: Any) -> tuple[ComputeProcess, ...]:
    if not isinstance(value, list | tuple):
        raise _Unreadable
    out = []
    for entry in value:
        pid = _attr(entry, "pid")
        used = _attr(entry, "usedGpuMemory")
        out.append(
            ComputeProcess(
                pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
                used_memory_bytes=used
                if isinstance(used, int) and not isinstance(used, bool)
                else None,
            )
        )
    return tuple(out)


def _conv_remap(value: Any) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple) or len(value) != 4:
        raise _Unreadable
    corr, unc, pending, failure = value
    return _int(corr), _int(unc), _int(pending) != 0, _int(failure) != 0


@dataclass(frozen=True, slots=True)
class _Query:
    """One NVML query of a device and the record fields it fills."""

    key: str  # the capture key; also the name a replay "hang" step uses
    fields: tuple[str, ...]
    call: Callable[[Any, Any], Any]  # (nvml, handle) -> raw
    convert: Callable[[Any], tuple[Any, ...]]
    static: bool = False


def _clock_reasons(nvml: Any, handle: Any) -> Any:
    fn = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None)
    if fn is not None:
        try:
            return fn(handle)
        except Exception as exc:
            if type(exc).__name__ != "NVMLError_FunctionNotFound":
                raise
    # Older drivers only have the deprecated name.
    return nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle)


def _numa_node(nvml: Any, handle: Any) -> Any:
    fn = getattr(nvml, "nvmlDeviceGetNumaNodeId", None)
    if fn is None:
        raise _pynvml.NVMLError(_pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    return fn(handle)


def _ecc(counter: int) -> Callable[[Any, Any], Any]:
    return lambda n, h: n.nvmlDeviceGetTotalEccErrors(
        h, _pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, counter
    )


def _bus_id(value: Any) -> str:
    return _text(_attr(value, "busId"))


def _compute_capability(value: Any) -> tuple[int, int]:
    major, minor = _pair(value)
    return _int(major), _int(minor)


def _modes(value: Any) -> tuple[bool, bool]:
    current, pending = _pair(value)
    return _enabled(current), _enabled(pending)


def _one_field(
    key: str,
    field: str,
    call: Callable[[Any, Any], Any],
    convert: Callable[[Any], Any] = _int,
    *,
    static: bool = False,
) -> _Query:
    """A query that fills one record field (an integer unless ``convert`` says else)."""
    return _Query(key, (field,), call, lambda v: (convert(v),), static=static)


def _device_queries() -> tuple[_Query, ...]:
    p = _pynvml
    return (
        _one_field("uuid", "uuid", lambda n, h: n.nvmlDeviceGetUUID(h), _text, static=True),
        _one_field("name", "name", lambda n, h: n.nvmlDeviceGetName(h), _text, static=True),
        _one_field(
            "pci", "pci_bus_id", lambda n, h: n.nvmlDeviceGetPciInfo(h), _bus_id, static=True
        ),
        _one_field(
            "cuda_cc",
            "compute_capability",
            lambda n, h: n.nvmlDeviceGetCudaComputeCapability(h),
            _compute_capability,
            static=True,
        ),
        _one_field("numa_node", "numa_node", _numa_node, static=True),
        _Query(
            "memory",
            ("memory_total_bytes", "memory_used_bytes", "memory_free_bytes"),
            lambda n, h: n.nvmlDeviceGetMemoryInfo(h),
            lambda v: (_int(_attr(v, "total")), _int(_attr(v, "used")), _int(_attr(v, "free"))),
        ),
        _Query(
            "utilization",
            ("utilization_gpu_pct", "utilization_memory_pct"),
            lambda n, h: n.nvmlDeviceGetUtilizationRates(h),
            lambda v: (_int(_attr(v, "gpu")), _int(_attr(v, "memory"))),
        ),
        _one_field(
            "temperature_gpu",
            "temperature_c",
            lambda n, h: n.nvmlDeviceGetTemperature(h, p.NVML_TEMPERATURE_GPU),
        ),
        _one_field("power_usage_mw", "power_draw_mw", lambda n, h: n.nvmlDeviceGetPowerUsage(h)),
        _one_field(
            "power_limit_mw", "power_limit_mw", lambda n, h: n.nvmlDeviceGetEnforcedPowerLimit(h)
        ),
        _Query(
            "mig_mode",
            ("mig_mode_current", "mig_mode_pending"),
            lambda n, h: n.nvmlDeviceGetMigMode(h),
            _modes,
        ),
        _Query(
            "ecc_mode",
            ("ecc_mode_current", "ecc_mode_pending"),
            lambda n, h: n.nvmlDeviceGetEccMode(h),
            _modes,
        ),
        _one_field(
            "ecc_volatile_uncorrected", "ecc_uncorrected_volatile", _ecc(p.NVML_VOLATILE_ECC)
        ),
        _one_field(
            "ecc_aggregate_uncorrected", "ecc_uncorrected_aggregate", _ecc(p.NVML_AGGREGATE_ECC)
        ),
        _Query(
            "remapped_rows",
            (
                "remapped_rows_correctable",
                "remapped_rows_uncorrectable",
                "row_remap_pending",
                "row_remap_failure",
            ),
            lambda n, h: n.nvmlDeviceGetRemappedRows(h),
            _conv_remap,
        ),
        _one_field("clocks_throttle_reasons", "throttle_reasons_mask", _clock_reasons),
        _one_field(
            "persistence_mode",
            "persistence_mode",
            lambda n, h: n.nvmlDeviceGetPersistenceMode(h),
            _enabled,
        ),
        _one_field(
            "compute_processes",
            "compute_processes",
            lambda n, h: n.nvmlDeviceGetComputeRunningProcesses(h),
            _conv_processes,
        ),
        _one_field(
            "pcie_link_gen", "pcie_link_gen", lambda n, h: n.nvmlDeviceGetCurrPcieLinkGeneration(h)
        ),
        _one_field(
            "pcie_link_width", "pcie_link_width", lambda n, h: n.nvmlDeviceGetCurrPcieLinkWidth(h)
        ),
        _one_field("fan_speed", "fan_speed_pct", lambda n, h: n.nvmlDeviceGetFanSpeed(h)),
    )


# ---------------------------------------------------------------------------------------
# The probe


class _Session:
    """What one NVML session (nvmlInit .. nvmlShutdown, or one replay capture) cached."""

    def __init__(self) -> None:
        self.system: dict[str, _Outcome] = {}
        self.count: int | None = None
        self.handles: dict[int, Any] = {}
        self.static: dict[tuple[int, str], _Outcome] = {}


#: What the XID watcher calls with each event (plain or async).
_OnXid = Callable[[XidEvent], Awaitable[None] | None]

_CPU_ONLY_REASONS = {
    "NVMLError_LibraryNotFound": "nvml_library_not_found",
    "NVMLError_DriverNotLoaded": "nvml_driver_not_loaded",
}


class Probe:
    """Reads the node's GPUs. Use as ``async with open_probe(...) as probe``.

    ``backend`` is ``"nvml"`` or ``"replay"``; ``nvml`` is the ``pynvml`` module or a
    module-shaped fake. ``threaded`` runs every call through the worker-thread caller
    (always for NVML; a replay runs on the loop unless asked). One refresh runs at a time.
    """

    def __init__(
        self,
        nvml: Any,
        *,
        backend: str,
        clock: Clock,
        call_timeout_s: float,
        source: str | None = None,
        replay: ReplayController | None = None,
        threaded: bool = True,
        xid_wait_ms: int = DEFAULT_XID_WAIT_MS,
    ) -> None:
        if not call_timeout_s > 0 or not math.isfinite(call_timeout_s):
            raise ValueError(f"call_timeout_s must be a positive number, got {call_timeout_s!r}")
        self.backend = backend
        self.source = source
        self._nvml = nvml
        self._clock = clock
        self._replay = replay
        self._caller: _Caller | _InlineCaller = (
            _Caller(call_timeout_s) if threaded else _InlineCaller(call_timeout_s)
        )
        self._xid_wait_ms = xid_wait_ms
        self._refresh_lock = trio.Lock()
        self._opened_at = clock.mono()
        self._initialized = False
        self._permanent_cpu_only: str | None = None if nvml is not None else "pynvml_missing"
        self._session = _Session()
        self._logged: set[str] = set()
        self._wedged_logged = False
        self._queries = _device_queries() if _pynvml is not None else ()
        self._closed = False
        self._replay_epoch = -1

    # -- lifetime -----------------------------------------------------------------------

    async def __aenter__(self) -> Probe:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Shut NVML down (bounded by the call timeout) and release replay hangs."""
        if self._closed:
            return
        self._closed = True
        if self._replay is not None:
            self._replay.close()
        if self._initialized:
            self._initialized = False
            with trio.CancelScope(shield=True):
                await self._caller.call(self._nvml.nvmlShutdown)

    def sequence_time_s(self) -> float:
        """Seconds since the probe was opened, on its clock (a replay's timeline)."""
        return self._clock.mono() - self._opened_at

    # -- one refresh --------------------------------------------------------------------

    def _log_once(self, key: str, level: int, msg: str, *args: Any) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.log(level, msg, *args)

    async def probe(self) -> GpuInventory:
        """One refresh of every GPU. Never raises for anything NVML does."""
        async with self._refresh_lock:
            return await self._refresh()

    async def _refresh(self) -> GpuInventory:
        if self._replay is not None:
            self._replay.advance_to(self.sequence_time_s())
            if self._replay.capture_epoch() != self._replay_epoch:
                # A new capture is new hardware: forget what the last one cached.
                self._replay_epoch = self._replay.capture_epoch()
                self._session = _Session()
        refresh = _Refresh(self)
        cpu_only = await self._ensure_init(refresh)
        now_ms = round(self._clock.wall() * 1000)
        if cpu_only is not None:
            return GpuInventory(
                backend=self.backend,
                source=self.source,
                cpu_only_reason=cpu_only,
                wedged=refresh.wedged,
                probed_at_ms=now_ms,
            )
        system, system_unknown = await self._system_facts(refresh)
        count = await self._device_count(refresh)
        if count == 0:
            self._log_once(
                "no_gpus", logging.INFO, "NVML works but reports no GPU: this node is CPU-only"
            )
            return GpuInventory(
                backend=self.backend,
                source=self.source,
                cpu_only_reason="no_gpus",
                wedged=refresh.wedged,
                probed_at_ms=now_ms,
                unknown=system_unknown,
                **system,
            )
        devices = []
        for index in range(count or 0):
            devices.append(await self._read_device(refresh, index))
        devices = _link_peers(devices)
        if refresh.wedged:
            if not self._wedged_logged:
                self._wedged_logged = True
                log.warning(
                    "an NVML call did not answer within %.1f s: GPU facts are unknown "
                    "until it returns",
                    self._caller.timeout_s,
                )
        elif self._wedged_logged:
            self._wedged_logged = False
            log.info("NVML answers again")
        return GpuInventory(
            devices=tuple(devices),
            backend=self.backend,
            source=self.source,
            wedged=refresh.wedged,
            probed_at_ms=now_ms,
            unknown=system_unknown,
            **system,
        )

    async def _ensure_init(self, refresh: _Refresh) -> str | None:
        """None when NVML is up; else why this node is CPU-only for now."""
        if self._permanent_cpu_only is not None:
            self._log_once(
                self._permanent_cpu_only,
                logging.INFO,
                "no NVIDIA driver (%s): this node is CPU-only",
                self._permanent_cpu_only,
            )
            return self._permanent_cpu_only
        if self._initialized:
            return None
        outcome = await refresh.call(self._nvml.nvmlInit)
        if isinstance(outcome, _Ok):
            self._initialized = True
            self._session = _Session()
            return None
        if outcome.reason in ("timeout", "wedged"):
            reason = "nvml_init_timeout"
        else:
            name = outcome.reason.removeprefix("error:")
            reason = _CPU_ONLY_REASONS.get(name, f"nvml_init_failed:{name}")
        if reason == "nvml_library_not_found":
            # No libnvidia-ml.so: installing a driver means restarting the agent.
            self._permanent_cpu_only = reason
        self._log_once(
            reason, logging.INFO, "no usable NVIDIA driver (%s): this node is CPU-only", reason
        )
        return reason

    async def _system_facts(self, refresh: _Refresh) -> tuple[dict[str, Any], dict[str, str]]:
        values: dict[str, Any] = {}
        unknown: dict[str, str] = {}
        calls = (
            ("driver_version", "nvmlSystemGetDriverVersion", _text),
            ("nvml_version", "nvmlSystemGetNVMLVersion", _text),
            ("cuda_driver_version", "nvmlSystemGetCudaDriverVersion", _int),
        )
        for field_name, fn_name, convert in calls:
            outcome = self._session.system.get(field_name)
            if outcome is None:
                outcome = await refresh.call(getattr(self._nvml, fn_name))
                if _cacheable(outcome):
                    self._session.system[field_name] = outcome
            value = None
            if isinstance(outcome, _Ok):
                try:
                    value = convert(outcome.value)
                except _Unreadable:
                    unknown[field_name] = "unreadable"
            else:
                unknown[field_name] = outcome.reason
            values[field_name] = value
        return values, unknown

    async def _device_count(self, refresh: _Refresh) -> int | None:
        if self._session.count is not None:
            return self._session.count
        outcome = await refresh.call(self._nvml.nvmlDeviceGetCount)
        if isinstance(outcome, _Ok) and isinstance(outcome.value, int):
            self._session.count = outcome.value
            return outcome.value
        return None

    async def _read_device(self, refresh: _Refresh, index: int) -> GpuDevice:
        values: dict[str, Any] = {}
        unknown: dict[str, str] = {}
        lost = False
        handle_reason = "unreadable"
        handle = self._session.handles.get(index)
        if handle is None:
            outcome = await refresh.call(self._nvml.nvmlDeviceGetHandleByIndex, index)
            if isinstance(outcome, _Ok):
                handle = outcome.value
                self._session.handles[index] = handle
            else:
                lost = outcome.lost
                handle_reason = outcome.reason
        outcomes: dict[str, _Outcome] = {}
        to_call: list[_Query] = []
        for query in self._queries:
            cached = self._session.static.get((index, query.key)) if query.static else None
            if cached is not None:
                outcomes[query.key] = cached
            elif handle is None:
                outcomes[query.key] = _Fail(handle_reason)
            else:
                to_call.append(query)
        if to_call:
            # One worker-thread hop for the whole device; a lost GPU ends it early.
            answered = await refresh.call_batch(
                [(q.call, (self._nvml, handle)) for q in to_call],
                stop=lambda o: isinstance(o, _Fail) and o.lost,
            )
            for i, query in enumerate(to_call):
                outcome = answered[i] if i < len(answered) else _Fail("gpu_lost")
                outcomes[query.key] = outcome
                if query.static and _cacheable(outcome):
                    self._session.static[(index, query.key)] = outcome
        for query in self._queries:
            outcome = outcomes[query.key]
            if isinstance(outcome, _Fail):
                lost = lost or outcome.lost
                for name in query.fields:
                    unknown[name] = outcome.reason
                continue
            try:
                converted = query.convert(outcome.value)
            except (_Unreadable, TypeError, ValueError, IndexError):
                for name in query.fields:
                    unknown[name] = "unreadable"
                continue
            values.update(zip(query.fields, converted, strict=True))
        nvlinks, nvlink_reason = await self._read_nvlinks(refresh, handle, handle_reason, lost)
        if nvlink_reason is not None:
            lost = lost or nvlink_reason == "gpu_lost"
            unknown["nvlinks"] = nvlink_reason
        values["nvlinks"] = nvlinks
        if lost:
            self._log_once(
                f"lost:{index}",
                logging.WARNING,
                "GPU %d (%s) is lost: NVML answers GpuIsLost",
                index,
                values.get("uuid") or "uuid unknown",
            )
        return GpuDevice(index=index, lost=lost, unknown=unknown, **values)

    async def _read_nvlinks(
        self, refresh: _Refresh, handle: Any, handle_reason: str, lost: bool
    ) -> tuple[tuple[NvLink, ...] | None, str | None]:
        if lost:
            return None, "gpu_lost"
        if handle is None:
            return None, handle_reason
        # Link states in one batch, ending at the first refusal: past the device's last
        # link NVML answers InvalidArgument (or NotSupported).
        states = await refresh.call_batch(
            [(self._nvml.nvmlDeviceGetNvLinkState, (handle, link)) for link in range(_MAX_NVLINKS)],
            stop=lambda o: isinstance(o, _Fail),
        )
        active: list[bool] = []
        for link, outcome in enumerate(states):
            if isinstance(outcome, _Fail):
                if link == 0 or outcome.reason not in (
                    "not_supported",
                    "error:NVMLError_InvalidArgument",
                ):
                    return None, outcome.reason
                break
            try:
                active.append(_int(outcome.value) == 1)
            except _Unreadable:
                return None, "unreadable"
        up = [link for link, is_up in enumerate(active) if is_up]
        remotes: dict[int, str] = {}
        if up:
            answered = await refresh.call_batch(
                [(self._nvml.nvmlDeviceGetNvLinkRemotePciInfo, (handle, link)) for link in up]
            )
            for link, outcome in zip(up, answered, strict=False):
                if isinstance(outcome, _Ok):
                    try:
                        remotes[link] = _text(_attr(outcome.value, "busId"))
                    except _Unreadable:
                        pass
        links = tuple(
            NvLink(link=link, active=is_up, remote_pci_bus_id=remotes.get(link))
            for link, is_up in enumerate(active)
        )
        return links, None

    # -- XID events ---------------------------------------------------------------------

    async def run_xid_watch(
        self,
        on_event: _OnXid,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Report XID events to ``on_event`` until cancelled.

        NVML: an event set read in its own thread. Replay: the sequence's ``xid`` steps at
        their time. Returns (after ``task_status.started()``) when there is nothing to
        watch: a CPU-only node, a driver without XID events, or a replay past its last XID.
        """
        if self._replay is not None:
            await self._watch_replay(on_event, task_status)
        else:
            await self._watch_nvml(on_event, task_status)

    async def _deliver(self, on_event: _OnXid, event: XidEvent) -> None:
        if event.critical:
            log.warning("critical XID %d on GPU %s (index %s)", event.code, event.uuid, event.index)
        result = on_event(event)
        if inspect.isawaitable(result):
            await result

    async def _watch_replay(self, on_event: _OnXid, task_status: trio.TaskStatus[None]) -> None:
        assert self._replay is not None
        task_status.started()
        for step in self._replay.sequence.xids:
            await self._sleep_until_sequence_time(step.at_s)
            uuid = self._replay.device_uuid_at(step.index, step.at_s)
            await self._deliver(
                on_event,
                XidEvent(
                    uuid, step.index, step.code, is_critical_xid(step.code), self._clock.wall()
                ),
            )
            await trio.lowlevel.checkpoint()

    async def _sleep_until_sequence_time(self, at_s: float) -> None:
        """Sleep until the replay's timeline reaches ``at_s`` on the probe's clock."""
        delay = at_s - self.sequence_time_s()
        while delay > 0:
            await trio.sleep(delay)
            # Re-check: the probe's clock need not be trio's clock.
            delay = at_s - self.sequence_time_s()
        await trio.lowlevel.checkpoint()

    async def _uuid_of(self, index: int | None) -> str | None:
        if index is None:
            return None
        cached = self._session.static.get((index, "uuid"))
        if isinstance(cached, _Ok) and isinstance(cached.value, str):
            return cached.value
        handle = self._session.handles.get(index)
        if handle is None:
            return None
        outcome = await self._caller.call(self._nvml.nvmlDeviceGetUUID, handle)
        if isinstance(outcome, _Ok) and isinstance(outcome.value, str):
            return outcome.value
        return None

    async def _watch_nvml(self, on_event: _OnXid, task_status: trio.TaskStatus[None]) -> None:
        async with self._refresh_lock:
            cpu_only = await self._ensure_init(_Refresh(self))
            if cpu_only is None and self._session.count is None:
                await self._refresh()  # caches the device handles the watcher registers
        if cpu_only is not None:
            task_status.started()
            return
        send, receive = trio.open_memory_channel[tuple[int | None, int]](math.inf)
        registered = trio.Event()
        stop = threading.Event()
        state: dict[str, int] = {"registered": 0}
        nvml = self._nvml
        wait_ms = self._xid_wait_ms
        handles = dict(self._session.handles)
        token = trio.lowlevel.current_trio_token()

        def tell(item: tuple[int | None, int]) -> None:
            try:
                trio.from_thread.run_sync(send.send_nowait, item, trio_token=token)
            except (trio.RunFinishedError, trio.BrokenResourceError, trio.ClosedResourceError):
                stop.set()

        def mark_registered(n: int) -> None:
            state["registered"] = n
            registered.set()

        def thread_main() -> None:
            try:
                _xid_thread(
                    nvml,
                    handles,
                    wait_ms,
                    stop,
                    tell,
                    lambda n: trio.from_thread.run_sync(mark_registered, n, trio_token=token),
                )
            except Exception as exc:  # never let the watcher take the agent down
                log.warning("XID watcher stopped: %s", error_reason(exc))
                try:
                    trio.from_thread.run_sync(mark_registered, 0, trio_token=token)
                except trio.RunFinishedError:
                    pass

        async def run_thread() -> None:
            await trio.to_thread.run_sync(
                thread_main, abandon_on_cancel=True, limiter=trio.CapacityLimiter(1)
            )
            send.close()  # the thread ended by itself: so does the watch

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_thread)
                with trio.move_on_after(max(self._caller.timeout_s, wait_ms / 1000 * 2)):
                    await registered.wait()
                if state["registered"] == 0:
                    if registered.is_set():
                        self._log_once(
                            "xid_unsupported",
                            logging.INFO,
                            "XID events are not supported here: not watching them",
                        )
                    else:
                        self._log_once(
                            "xid_timeout",
                            logging.WARNING,
                            "NVML did not register XID events in time: not watching them",
                        )
                    stop.set()
                    task_status.started()
                    nursery.cancel_scope.cancel()
                    return
                task_status.started()
                async for index, code in receive:
                    event = XidEvent(
                        await self._uuid_of(index),
                        index,
                        code,
                        is_critical_xid(code),
                        self._clock.wall(),
                    )
                    await self._deliver(on_event, event)
        finally:
            stop.set()


def _xid_thread(  # noqa: PLR0917 - a thread's entry point, called once
    nvml: Any,
    handles: dict[int, Any],
    wait_ms: int,
    stop: threading.Event,
    tell: Callable[[tuple[int | None, int]], None],
    registered: Callable[[int], None],
) -> None:
    """Blocks on an NVML event set until ``stop``; runs in the watcher's own thread."""
    event_set = nvml.nvmlEventSetCreate()
    try:
        count = 0
        for handle in handles.values():
            try:
                nvml.nvmlDeviceRegisterEvents(handle, _XID_EVENT_TYPE, event_set)
                count += 1
            except Exception as exc:
                log.debug("XID events not registered for a GPU: %s", error_reason(exc))
        registered(count)
        if count == 0:
            return
        while not stop.is_set():
            try:
                data = nvml.nvmlEventSetWait_v2(event_set, wait_ms)
            except Exception as exc:
                if type(exc).__name__ == "NVMLError_Timeout":
                    continue
                log.debug("XID wait failed: %s", error_reason(exc))
                stop.wait(wait_ms / 1000)  # no busy loop on a persistent error
                continue
            if not int(getattr(data, "eventType", 0)) & _XID_EVENT_TYPE:
                continue
            try:
                index: int | None = int(nvml.nvmlDeviceGetIndex(data.device))
            except Exception:
                index = None
            tell((index, int(data.eventData)))
    finally:
        try:
            nvml.nvmlEventSetFree(event_set)
        except Exception as exc:
            log.debug("nvmlEventSetFree failed: %s", error_reason(exc))


class _Refresh(_Calls):
    """One refresh's view of the caller: once a call times out, the rest are ``wedged``."""

    def __init__(self, probe: Probe) -> None:
        self._caller = probe._caller
        self.wedged = False

    async def call_batch(
        self, calls: list[_Call], *, stop: Callable[[_Outcome], bool] | None = None
    ) -> list[_Outcome]:
        if self.wedged:
            await trio.lowlevel.checkpoint()
            return [_Fail("wedged")] * len(calls)
        outcomes = await self._caller.call_batch(calls, stop=stop)
        if any(isinstance(o, _Fail) and o.reason in ("timeout", "wedged") for o in outcomes):
            self.wedged = True
        return outcomes


def _cacheable(outcome: _Outcome) -> bool:
    return isinstance(outcome, _Ok) or outcome.reason == "not_supported"


def _link_peers(devices: list[GpuDevice]) -> list[GpuDevice]:
    """Name the local GPU at the far end of each active NVLink, where it is one of ours."""
    by_bus = {d.pci_bus_id.lower(): d.index for d in devices if d.pci_bus_id}
    out = []
    for device in devices:
        if not device.nvlinks:
            out.append(device)
            continue
        links = tuple(
            replace(link, peer_index=by_bus.get(link.remote_pci_bus_id.lower()))
            if link.remote_pci_bus_id
            else link
            for link in device.nvlinks
        )
        out.append(replace(device, nvlinks=links))
    return out


# ---------------------------------------------------------------------------------------
# Opening


def open_probe(
    *,
    fixture: str | os.PathLike[str] | None,
    node_id: str | None,
    keep_fixture_uuids: bool = False,
    clock: Clock,
    call_timeout_s: float = 2.0,
) -> Probe:
    """The probe the agent uses: a replay when ``fixture`` is given, else NVML.

    A replay presents the capture's UUIDs as they are when ``node_id`` is None or
    ``keep_fixture_uuids`` is true; otherwise each becomes
    ``derive_replay_uuid(capture_uuid, node_id)``. NVML without a driver gives a CPU-only
    inventory, never an error. Raises :class:`FixtureError` for a bad fixture.

    Call it inside the trio run that uses the probe: a replay's timeline starts at
    ``clock.mono()`` now. Opening does not touch NVML (``nvmlInit`` runs in the first
    refresh, in a worker thread).
    """
    if fixture is not None:
        return open_replay_probe(
            fixture,
            node_id=node_id,
            keep_fixture_uuids=keep_fixture_uuids,
            clock=clock,
            call_timeout_s=call_timeout_s,
        )
    return Probe(_pynvml, backend="nvml", clock=clock, call_timeout_s=call_timeout_s)


def open_replay_probe(
    fixture: str | os.PathLike[str],
    *,
    node_id: str | None,
    keep_fixture_uuids: bool = False,
    clock: Clock,
    call_timeout_s: float = 2.0,
    threaded: bool = False,
    xid_wait_ms: int = DEFAULT_XID_WAIT_MS,
) -> Probe:
    """A replay probe. ``threaded=True`` runs the fake through the worker-thread caller
    that NVML uses (hang steps then block a real thread); tests and benchmarks use it."""
    sequence = load_fixture(fixture)
    uuid_map = None
    if node_id is not None and not keep_fixture_uuids:

        def uuid_map(uuid: str) -> str:
            return derive_replay_uuid(uuid, node_id)

    controller = ReplayController(sequence, uuid_map=uuid_map, blocking_hangs=threaded)
    return Probe(
        controller.nvml,
        backend="replay",
        clock=clock,
        call_timeout_s=call_timeout_s,
        source=sequence.label,
        replay=controller,
        threaded=threaded,
        xid_wait_ms=xid_wait_ms,
    )


__all__ = ["DEFAULT_XID_WAIT_MS", "Probe", "error_reason", "open_probe", "open_replay_probe"]

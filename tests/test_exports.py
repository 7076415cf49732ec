"""The public surface is curated: each package's ``__all__`` is pinned here, so a change
to it is a deliberate change to this test (STYLE: small curated public surface)."""

from __future__ import annotations

import importlib

import pytest

EXPECTED = {
    "populi_peer": ["PROTOCOL_VERSION", "PopuliError", "__version__"],
    "populi_peer.api": [
        "ANY_MEMBER",
        "ApiApp",
        "Authenticator",
        "Principal",
        "Request",
        "Response",
        "Route",
    ],
    "populi_peer.agent": ["Agent", "build_agent"],
    "populi_peer.store": [
        "DB_FILE_NAME",
        "MIGRATIONS",
        "NONCE_PRUNE_INTERVAL_S",
        "SCHEMA_VERSION",
        "RequestNonce",
        "Store",
        "bind_request_nonce",
        "file_error",
        "store_error",
    ],
    "populi_peer.exec": [
        "ExecError",
        "SpawnFailed",
        "StreamTotals",
        "Supervised",
        "SupervisorFailed",
        "SupervisorLost",
        "SupervisorState",
        "TaskDirInUse",
        "TaskOutcome",
        "TaskSpec",
        "adopt",
        "build_task_env",
        "kill_orphan",
        "leftovers",
        "read_state",
        "start_supervised",
        "tail",
    ],
    "populi_peer.gpu": [
        "ADVERTISED_UUID_PREFIX",
        "ALLOCATION_REASONS",
        "CRITICAL_XIDS",
        "HEALTH_RULES",
        "AdvertisedLabelError",
        "ComputeProcess",
        "DeviceAllocation",
        "FixtureError",
        "GpuDevice",
        "GpuInventory",
        "Health",
        "HealthRule",
        "HealthVerdict",
        "InventoryFormatError",
        "NvLink",
        "Probe",
        "ProbeError",
        "XidEvent",
        "advertised_count",
        "allocatable",
        "derive_replay_uuid",
        "facts_version",
        "format_probe",
        "gpu_summary",
        "health_verdict",
        "health_verdicts",
        "is_critical_xid",
        "leased_by_book",
        "open_probe",
        "package_capture_names",
        "probe_json",
        "summary_metrics",
        "summary_static",
        "throttle_reason_names",
    ],
    "populi_peer.testing": ["Faults", "MemoryNetwork", "VirtualClock"],
    "populi_peer.cli": ["main"],
    "populi_peer.core": [],
    "enrollment": ["EnrollmentError", "ErrorKind"],
}


@pytest.mark.parametrize("module", sorted(EXPECTED))
def test_all_is_pinned(module: str) -> None:
    mod = importlib.import_module(module)
    assert sorted(mod.__all__) == sorted(EXPECTED[module])
    for name in mod.__all__:
        assert hasattr(mod, name), f"{module}.{name} is exported but missing"


def test_importing_the_package_is_cheap() -> None:
    """``import populi_peer`` must not pull in trio, httpx or cryptography (the CLI's
    usage errors and --help stay fast)."""
    import subprocess
    import sys

    code = "import sys, populi_peer, populi_peer.cli.main; print(','.join(m for m in ('trio', 'httpx', 'cryptography') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""

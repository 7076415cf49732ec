"""Issue acceptance on loopback with a real agent process, real TLS and real SQLite."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from populi_peer.api.client import SignedAuth
from populi_peer.api.tls import client_context
from populi_peer.clock import SystemClock
from support.mesh import identity_of
from support.procs import Processes, init, one_line, populi
from support.waiting import wait_for

pytestmark = pytest.mark.e2e


def test_init_agent_status_and_sigterm(tmp_path: Path, procs: Processes) -> None:
    data_dir = tmp_path / "d"
    agent = procs.init_and_start(data_dir)
    result = populi("status", "--data-dir", str(data_dir), "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["cluster"]["name"] == "lab"
    assert status["url"] == agent.url
    # What it advertises, by scope, and whether it announces itself on the LAN.
    human = populi("status", "--data-dir", str(data_dir))
    assert human.returncode == 0, human.stderr
    lines = human.stdout.splitlines()
    address = agent.url.removeprefix("https://")
    assert any(line.startswith(f"advertises     {address} (local)") for line in lines), lines
    assert any(line.startswith("discovery      ") for line in lines), lines
    code = procs.stop(agent, signal.SIGTERM)
    assert code == 0
    assert "Traceback" not in agent.log()
    assert not (data_dir / "run" / "agent.json").exists()
    after = populi("status", "--data-dir", str(data_dir))
    assert after.returncode == 3
    assert one_line(after.stderr)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_unsigned_status_is_401_and_health_200(tmp_path: Path, procs: Processes) -> None:
    data_dir = tmp_path / "d"
    agent = procs.init_and_start(data_dir)
    status = subprocess.run(
        ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}", agent.url + "/v1/populi/status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    health = subprocess.run(
        ["curl", "-sk", "-w", "\n%{http_code}", agent.url + "/v1/populi/health"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.stdout == "401"
    body, code = health.stdout.rsplit("\n", 1)
    assert code == "200"
    assert json.loads(body)["status"] == "ok"


def test_replayed_request_over_real_tls_is_refused(tmp_path: Path, procs: Processes) -> None:
    data_dir = tmp_path / "d"
    agent = procs.init_and_start(data_dir)
    identity = identity_of(data_dir)
    with httpx.Client(verify=client_context(identity.paths.ca_cert), timeout=10) as client:
        request = client.build_request("GET", agent.url + "/v1/populi/status")
        signed = next(
            SignedAuth(identity.cli_credential, agent.node_id, SystemClock()).auth_flow(request)
        )
        first = client.send(signed)
        second = client.send(signed)
    assert first.status_code == 200
    assert second.status_code == 401
    assert second.json()["error"]["code"] == "signature_replayed"


def s_client(hostport: str, *options: str) -> subprocess.CompletedProcess[str]:
    """``openssl s_client`` to ``hostport`` with ``options``, its input empty."""
    return subprocess.run(
        ["openssl", "s_client", "-connect", hostport, *options],
        input="",
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_verifies_the_chain_against_the_cluster_ca_only(
    tmp_path: Path, procs: Processes
) -> None:
    data_dir = tmp_path / "d"
    agent = procs.init_and_start(data_dir)
    hostport = agent.url.removeprefix("https://")
    ok = s_client(
        hostport, "-CAfile", str(data_dir / "tls" / "ca.crt"), "-verify_return_error", "-tls1_3"
    )
    assert "Verify return code: 0 (ok)" in ok.stdout
    assert "TLSv1.3" in ok.stdout
    system = s_client(hostport, "-verify_return_error")
    assert "Verify return code: 0 (ok)" not in system.stdout


def test_misspelled_config_key_fails_the_agent_in_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    init(data_dir)
    config = tmp_path / "bad.toml"
    config.write_text("[heartbeat]\ninterval_s = 1\n[gpu]\nrefresh_sec = 2\n")
    result = populi("agent", "--data-dir", str(data_dir), "--config", str(config), timeout=60)
    assert result.returncode == 4
    assert one_line(result.stderr)
    assert "heartbeat" in result.stderr and str(config) in result.stderr


def test_init_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    first = init(data_dir)
    again = populi("init", "--cluster-name", "lab", "--data-dir", str(data_dir))
    assert again.returncode == 4
    assert one_line(again.stderr)
    forced = init(data_dir, "--force")
    assert forced["cluster"]["id"] != first["cluster"]["id"]
    for key in ("node.key", "cluster.key", "operator.key"):
        assert oct((data_dir / "keys" / key).stat().st_mode & 0o777) == "0o600"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_tls_1_2_is_refused(tmp_path: Path, procs: Processes) -> None:
    data_dir = tmp_path / "d"
    agent = procs.init_and_start(data_dir)
    hostport = agent.url.removeprefix("https://")
    old = s_client(hostport, "-tls1_2")
    assert "Cipher is (NONE)" in old.stdout or old.returncode != 0
    # Told why (the protocol_version alert), not left with "unexpected eof while reading".
    assert "alert protocol version" in old.stderr, old.stderr


def _wait_for_gpu(data_dir: Path, *, allocatable: bool) -> dict[str, object]:
    """The control plane's view of this node's one GPU, once it has one."""

    def gpu() -> dict[str, object] | None:
        listing = json.loads(populi("gpus", "--data-dir", str(data_dir), "--json").stdout)
        devices = listing["nodes"][0]["devices"] if listing["nodes"] else []
        return devices[0] if devices and devices[0]["allocatable"] is allocatable else None

    found, _ = wait_for(f"a GPU with allocatable={allocatable}", gpu, guard_s=30, every_s=0.2)
    return found


def test_remote_off_gpu_task_gets_this_nodes_gpu(tmp_path: Path, procs: Processes) -> None:
    """Remote execution off (the default) on a one-GPU node: ``--gpus 1`` runs here with
    the GPU's UUID in CUDA_VISIBLE_DEVICES, under a local lease (token from the control
    plane), and the lease is done when the task is."""
    data_dir = tmp_path / "d"
    procs.init_and_start(data_dir, env={"POPULI_GPU_FIXTURE": "h100-80gb-hbm3-idle.json"})
    gpu = _wait_for_gpu(data_dir, allocatable=True)
    run = populi(
        "run",
        "--gpus",
        "1",
        "--data-dir",
        str(data_dir),
        "--",
        "sh",
        "-c",
        'echo "gpu=$CUDA_VISIBLE_DEVICES token=$POPULI_FENCING_TOKEN"',
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert f"gpu={gpu['uuid']} token=1." in run.stdout
    assert "(remote_disabled)" in run.stderr
    leases = json.loads(populi("leases", "--data-dir", str(data_dir), "--json").stdout)["leases"]
    (lease,) = leases
    assert (lease["kind"], lease["gpus"], lease["state"]) == ("local", [gpu["uuid"]], "completed")


def test_gpu_task_with_the_gpu_busy_fails_in_one_line(tmp_path: Path, procs: Processes) -> None:
    """The node's only GPU runs a process Populi did not start (the load capture): a
    ``--gpus 1`` task without ``--queue-timeout`` is refused at once: exit 4 (not 125:
    Populi did not fail), one line with the reason, and ``run`` returns as soon as the task
    ended (one look at its output, no waiting for output that cannot come)."""
    data_dir = tmp_path / "d"
    init(data_dir)
    agent = procs.start_agent(
        data_dir,
        env={"POPULI_GPU_FIXTURE": "h100-80gb-hbm3-load.json", "POPULI_LOG__LEVEL": "debug"},
    )
    gpu = _wait_for_gpu(data_dir, allocatable=False)
    assert gpu["allocation_reasons"] == ["gpu_in_use_foreign"]
    run = populi("run", "--gpus", "1", "--data-dir", str(data_dir), "--", "true", timeout=60)
    assert run.returncode == 4, run.stderr
    assert one_line(run.stderr), run.stderr
    assert "failed: exit 4: placement_failed, no_free_gpu" in run.stderr
    assert "no attempt started" in run.stderr
    (task,) = json.loads(populi("tasks", "--json", "--data-dir", str(data_dir)).stdout)["tasks"]
    # Its looks at the output once the task had ended: the one that saw it end (and one
    # already on its way), not a poll every 0.3 s for 3 s more.
    output = f"/v1/populi/tasks/{task['task_id']}/output"
    looks = [
        entry
        for line in agent.log().splitlines()
        if f'"path": "{output}"' in line and (entry := json.loads(line))
    ]
    ended = dt.datetime.fromtimestamp(task["finished_wall_ms"] / 1000, tz=dt.UTC)
    after = [e for e in looks if dt.datetime.fromisoformat(e["ts"]) >= ended]
    assert 1 <= len(after) <= 2, looks

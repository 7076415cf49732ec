"""The single-machine runbooks, run as written: each page's annotated ``sh`` blocks run in
page order (``lab.runbook``) on hosts that are shells of this machine with their own
homes, data directories and ports on 127.0.0.1 (``e2e.runbook_loopback``), real agents,
real TLS. What a page leaves to the reader (a cluster to start from, the token it printed,
a GPU that had an XID) the test does between steps, with the same ``populi`` commands.

A block that cannot run on one machine is annotated ``skip="why"`` (installing the single
file, systemd, root paths); a placeholder (``TOKEN``, ``gpu-box``'s address) is annotated
``sub``; a refusal the page documents for a cluster without the hardware it names (two
GPUs, an RTX 4090) is annotated ``exit``. ``disk-full.md`` has no shell block: a real full
disk is ``tests/e2e/test_full_disk_e2e.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from e2e.runbook_loopback import AGENT_WAIT, LoopbackHosts, background_agents
from lab.runbook import Runbook, RunbookError, parse_runbook

from support.waiting import wait_for

pytestmark = pytest.mark.e2e

RUNBOOKS = Path(__file__).resolve().parents[2] / "runbooks"
SINGLE_MACHINE_PAGES = (
    "enroll-a-node.md",
    "run-tasks.md",
    "gpu-quarantine.md",
    "revoke-a-node.md",
    "install.md",
    "disk-full.md",
)
#: Pages that need a network of machines: run (or skipped) step by step in the lab.
LAB_PAGES = ("overlay-wireguard.md", "overlay-nebula.md", "overlay-tailscale.md")
#: Pages with a test of their own: offline-root.md is run block by block by
#: tests/e2e/test_offline_root_e2e.py; voters.md's procedure (voter tokens, joins, status,
#: the leader SIGKILLed, a survivor leading) is carried out by tests/e2e/test_election_e2e.py
#: through the same commands and API, not block by block.
OWN_TEST_PAGES = ("offline-root.md", "voters.md")
GPU_FIXTURE = {"POPULI_GPU_FIXTURE": "h100-80gb-hbm3-idle.json"}
TOKEN = re.compile(r"^(populi-join-[23]\.\S+)$", re.M)
#: Guards for what happens within a heartbeat or two, not measurements.
GUARD_S = 60.0


def as_json(text: str) -> Any:
    return json.loads(text)


def token_in(output: str) -> str:
    found = TOKEN.search(output)
    assert found is not None, f"no join token in:\n{output}"
    return found.group(1)


def start_cluster(hosts: LoopbackHosts) -> None:
    """``cp``: a new cluster's control plane (the README tour's first commands)."""
    hosts.run("cp", "populi init --cluster-name lab --name cp --listen 127.0.0.1:$PORT")
    hosts.run("cp", "populi agent")


def join(hosts: LoopbackHosts, name: str, *roles: str) -> None:
    """``name`` joins with a token bound to its name, and its agent starts."""
    role_flag = f" --roles {','.join(roles)}" if roles else ""
    token = token_in(hosts.run("cp", f"populi token create --name {name}{role_flag}"))
    hosts.run(name, f"populi join '{token}' --name {name} --listen 127.0.0.1:$PORT")
    hosts.run(name, "populi agent")


def node_view(hosts: LoopbackHosts, name: str) -> dict[str, Any] | None:
    nodes = as_json(hosts.run("cp", "populi nodes --json"))["nodes"]
    return next((n for n in nodes if n["name"] == name), None)


def active(hosts: LoopbackHosts, name: str) -> None:
    wait_for(
        f"{name} active on the control plane",
        lambda: (node_view(hosts, name) or {}).get("state") == "active",
        guard_s=GUARD_S,
        every_s=1.0,
    )


def gpus_of(hosts: LoopbackHosts, name: str) -> list[dict[str, Any]]:
    view = as_json(hosts.run("cp", "populi gpus --json"))
    node = next((n for n in view["nodes"] if n["name"] == name), None)
    return list(node["devices"]) if node else []


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[Any]:
    opened: list[LoopbackHosts] = []

    def make(names: Sequence[str], **kwargs: Any) -> LoopbackHosts:
        hosts = LoopbackHosts(tmp_path, names, **kwargs)
        opened.append(hosts)
        hosts.open()
        return hosts

    try:
        yield make
    finally:
        for hosts in opened:
            hosts.close()


def test_every_runbook_is_walked_here_or_in_the_lab() -> None:
    """A new page joins this walk, or the namespace lab's (``tests/lab/test_overlay_lab.py``,
    the pages that need machines of their own), or has a test of its own."""
    pages = {path.name for path in RUNBOOKS.glob("*.md")}
    assert pages == set(SINGLE_MACHINE_PAGES) | set(LAB_PAGES) | set(OWN_TEST_PAGES)
    for test in ("test_offline_root_e2e.py", "test_election_e2e.py"):
        assert (Path(__file__).parent / test).exists()


@pytest.mark.parametrize("page", SINGLE_MACHINE_PAGES)
def test_every_shell_block_of_the_single_machine_runbooks_is_a_step(page: str) -> None:
    """The pages parse, each block annotated (run, or skipped with a reason), so a new
    command cannot slip past the walk."""
    steps = parse_runbook(RUNBOOKS / page)
    assert page == "disk-full.md" or steps
    for step in steps:
        assert step.skip or step.hosts, f"{page}: step {step.id} names no host"


def test_enroll_a_node_runbook(machines: Any) -> None:
    hosts: LoopbackHosts = machines(["cp", "gpu-box", "laptop"])
    start_cluster(hosts)
    book = Runbook(RUNBOOKS / "enroll-a-node.md", hosts)
    token = token_in(book.run("token")["cp"])
    assert "gpu-box" in book.outputs[("token", "cp")]
    book.run("checkout")
    hosts.run("gpu-box", f"TOKEN='{token}'")
    book.run("join")
    # "On the control plane, `populi nodes` shows the node within a heartbeat."
    active(hosts, "gpu-box")

    # An operator machine: a token with the operator role, then `populi join`; its node
    # key signs operator commands.
    join(hosts, "laptop", "operator")
    assert "is cordoned" in hosts.run("laptop", "populi node cordon gpu-box --reason check")
    first = node_view(hosts, "laptop")
    assert first is not None

    # A node whose certificate expired: it is off when it re-joins, and gets a new id.
    hosts.stop_agent("laptop")
    hosts.run("laptop", f"TOKEN='{token_in(book.run('rejoin-token')['cp'])}'")
    book.run("rejoin")
    again = node_view(hosts, "laptop")
    assert again is not None and again["id"] != first["id"] and again["state"] == "active"
    book.check_all_run()


#: What the run-tasks page runs, in the shared folder it names (``/srv/code`` there).
TASK_FILES = {
    "infer.py": 'import os, sys\nprint("inference on", os.environ["CUDA_VISIBLE_DEVICES"], sys.argv[1:])\n',
    "train.py": 'print("training")\n',
    "train.sh": '#!/bin/sh\nfor step in 1 2 3; do echo "step $step"; done\n',
    "bench.sh": "#!/bin/sh\necho bench\n",
    "game-ai.sh": "#!/bin/sh\necho game-ai\n",
}
#: ``nvidia-smi`` as a GPU box has it (this machine has no GPU).
NVIDIA_SMI = "#!/bin/sh\necho 'NVIDIA-SMI stand-in: NVIDIA H100 80GB HBM3'\n"


def test_run_tasks_runbook(machines: Any, tmp_path: Path) -> None:
    stubs = tmp_path / "gpu-box-bin"
    stubs.mkdir()
    (stubs / "nvidia-smi").write_text(NVIDIA_SMI)
    (stubs / "nvidia-smi").chmod(0o755)
    hosts: LoopbackHosts = machines(
        ["cp", "gpu-box"], host_env={"gpu-box": GPU_FIXTURE}, path_dirs={"gpu-box": [stubs]}
    )
    for name, text in TASK_FILES.items():
        (hosts.work / name).write_text(text)
        (hosts.work / name).chmod(0o755)
    start_cluster(hosts)
    join(hosts, "gpu-box")
    wait_for(
        "gpu-box's GPU allocatable",
        lambda: any(g.get("allocatable") for g in gpus_of(hosts, "gpu-box")),
        guard_s=GUARD_S,
        every_s=1.0,
    )
    book = Runbook(RUNBOOKS / "run-tasks.md", hosts)
    assert re.search(r"^remote_exec_enabled\s+true", book.run("remote-on")["cp"], re.M)

    out = book.run("run")["cp"]
    assert re.search(r"^inference on GPU-[0-9a-f-]+ \['--batch', '8'\]$", out, re.M), out
    assert "step 1\nstep 2\nstep 3\n" in out, out
    assert "NVIDIA-SMI stand-in" in out, out
    assert re.search(r"remote on n-\S+ \(node_pinned", out), out

    out = book.run("gpu-needs")["cp"]
    assert "training" in out and out.count("no_free_gpu") >= 2, out

    book.run("drain")
    hosts.run("cp", "populi node resume gpu-box")
    # A lease to stop: a task holding gpu-box's GPU.
    hosts.run("cp", "LONG=$(populi run --detach --gpus 1 --cwd . -- sleep 60)")
    lease = wait_for(
        "a holding lease",
        lambda: as_json(hosts.run("cp", "populi leases --state holding --json"))["leases"],
        guard_s=GUARD_S,
        every_s=1.0,
    )[0][0]["lease_id"]
    hosts.run("cp", f"LEASE={lease}")
    assert "revoking" in book.run("revoke-lease")["cp"]
    hosts.run("cp", 'populi task cancel "$LONG"')
    book.check_all_run()


#: A replayed H100 that reports XID 79 (fallen off the bus) a second after the probe opens.
XID_SEQUENCE = {
    "populi_replay": 1,
    "steps": [
        {"at_s": 0, "capture": "h100-80gb-hbm3-idle.json"},
        {"at_s": 1, "xid": {"index": 0, "code": 79}},
    ],
}


def test_gpu_quarantine_runbook(machines: Any, tmp_path: Path) -> None:
    sequence = tmp_path / "xid-79.json"
    sequence.write_text(json.dumps(XID_SEQUENCE))
    hosts: LoopbackHosts = machines(
        ["cp", "sick"], host_env={"sick": {"POPULI_GPU_FIXTURE": str(sequence)}}
    )
    start_cluster(hosts)
    join(hosts, "sick")
    # The symptoms the page lists: `alloc no` with gpu_quarantined, the XID line in the
    # node's log, the reason in `populi events --node NODE`.
    gpu = wait_for(
        "sick's GPU quarantined",
        lambda: [g for g in gpus_of(hosts, "sick") if "gpu_quarantined" in g["allocation_reasons"]],
        guard_s=GUARD_S,
        every_s=1.0,
    )[0][0]
    assert not gpu["allocatable"]
    assert re.search(r"XID event.*\"critical\": true", hosts.run("sick", "cat ~/agent.log"))
    assert re.search(r"\bregister\b.*\bxid_79$", hosts.run("cp", "populi events --node sick"), re.M)
    hosts.run("cp", f"GPU={gpu['uuid']}")
    book = Runbook(RUNBOOKS / "gpu-quarantine.md", hosts)
    book.run("resume")
    # "The node learns it with its next heartbeat answer; `populi gpus` shows it
    # allocatable if its health is good."
    wait_for(
        "sick's GPU allocatable again",
        lambda: any(g["allocatable"] for g in gpus_of(hosts, "sick")),
        guard_s=GUARD_S,
        every_s=1.0,
    )
    book.check_all_run()


def test_revoke_a_node_runbook(machines: Any) -> None:
    hosts: LoopbackHosts = machines(["cp", "laptop"])
    start_cluster(hosts)
    join(hosts, "laptop")
    book = Runbook(RUNBOOKS / "revoke-a-node.md", hosts)
    out = book.run("retire")["cp"]
    assert re.search(r"^laptop\s.*\bretired\b", out, re.M), out
    assert re.search(r"retire: active -> retired\s.*\bstolen$", out, re.M), out
    # "On that machine `populi status` says so and how to come back."

    def retired_status() -> str | None:
        text = hosts.run("laptop", "populi status")
        return text if "RETIRED since" in text else None

    shown, _ = wait_for("laptop knows it is retired", retired_status, guard_s=GUARD_S, every_s=1.0)
    assert "1. on the control plane: populi node unretire laptop" in shown, shown
    assert "its name stays blocked" in book.run("delete")["cp"]
    assert "may join again" in book.run("unretire")["cp"]
    book.check_all_run()


def test_install_runbook(machines: Any) -> None:
    """What of the page runs without root or systemd: the token of step 3."""
    hosts: LoopbackHosts = machines(["cp"])
    start_cluster(hosts)
    book = Runbook(RUNBOOKS / "install.md", hosts)
    for step in book.steps:
        book.run(step.id)
    token_in(book.outputs[("token", "cp")])
    book.check_all_run()


def test_the_runner_substitutes_checks_exit_codes_and_backgrounds_agents(
    machines: Any, tmp_path: Path
) -> None:
    """The annotations the pages rely on do what they say: ``sub`` replaces a placeholder
    (and refuses one the block lacks), ``exit`` passes a line that exits with the code it
    names and fails one that does not, an indented block runs dedented, and a foreground
    ``populi agent`` line is started in the background."""
    page = tmp_path / "page.md"
    page.write_text(
        "1. A list item:\n"
        '   <!-- lab: id=ok on=h sub="PLACEHOLDER -> $HOME" exit="false=1" -->\n'
        "   ```sh\n"
        "   echo at PLACEHOLDER\n"
        "   false  # documented to fail\n"
        "   ```\n"
        '<!-- lab: id=wrong-code on=h exit="true=4" -->\n'
        "```sh\ntrue\n```\n"
        '<!-- lab: id=missing on=h sub="NOT_THERE -> x" -->\n'
        "```sh\necho\n```\n"
    )
    hosts: LoopbackHosts = machines(["h"])
    book = Runbook(page, hosts)
    assert f"at {hosts.home('h')}" in book.run("ok")["h"]
    with pytest.raises(RunbookError, match="exited 0, not 4"):
        book.run("wrong-code")
    with pytest.raises(RunbookError, match="NOT_THERE"):
        book.step("missing").command()
    script = background_agents("populi agent --data-dir ~/d   # a comment\npopuli nodes")
    assert script.split("\n") == [
        "populi agent --data-dir ~/d >> ~/agent.log 2>&1 &",
        "echo $! >> ~/.agent-pids",
        f"populi status --wait {AGENT_WAIT} --data-dir ~/d > /dev/null",
        "populi nodes",
    ]

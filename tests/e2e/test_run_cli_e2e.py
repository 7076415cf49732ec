"""``populi run`` and ``populi task ...`` as a newcomer meets them, against one real agent:
every exit code of the README's table that one machine can show, each refusal in one line
with its reason, the reason a task could not start, and the output of a detached task."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from support.procs import Processes, init, one_line, populi

pytestmark = pytest.mark.e2e

LOG_DEBUG = {"POPULI_LOG__LEVEL": "debug"}


def requests_to(log: str, path: str) -> int:
    count = 0
    for line in log.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if (
            isinstance(entry, dict)
            and entry.get("event") == "request"
            and entry.get("path") == path
        ):
            count += 1
    return count


def test_no_agent_is_exit_3_at_once(tmp_path: Path) -> None:
    data_dir = tmp_path / "d"
    init(data_dir)
    run = populi("run", "--data-dir", str(data_dir), "--", "true")
    assert run.returncode == 3, run.stderr
    assert one_line(run.stderr) and "no agent running" in run.stderr
    waited = populi("status", "--wait", "1s", "--data-dir", str(data_dir))
    assert waited.returncode == 3 and one_line(waited.stderr), waited.stderr


def test_refusals_reasons_and_logs_with_one_agent(tmp_path: Path, procs: Processes) -> None:
    data_dir = tmp_path / "d"
    procs.init_and_start(data_dir)
    d = ("--data-dir", str(data_dir))

    # 4: an unknown --node, one line with the reason.
    unknown = populi("run", "--node", "w9", *d, "--", "true")
    assert unknown.returncode == 4, unknown.stderr
    assert one_line(unknown.stderr) and "w9" in unknown.stderr
    # 2: --node-fallback means nothing without --node.
    usage = populi("run", "--node-fallback", *d, "--", "true")
    assert usage.returncode == 2 and one_line(usage.stderr), usage.stderr
    # 4: a state no task has.
    bogus = populi("tasks", "--state", "bogus", *d)
    assert bogus.returncode == 4, bogus.stderr
    assert one_line(bogus.stderr) and "unknown task state 'bogus'" in bogus.stderr

    # 127: the command does not exist; run says why on stderr, task show too.
    missing = populi("run", *d, "--", "no-such-command-xyz")
    assert missing.returncode == 127, missing.stderr
    assert "exit 127: command not found: no-such-command-xyz" in missing.stderr
    assert "\r" not in missing.stderr  # piped: no waiting line
    task_id = populi("tasks", "--json", *d).stdout
    task_id = json.loads(task_id)["tasks"][0]["task_id"]
    shown = populi("task", "show", task_id, *d)
    assert re.search(
        r"^why\s+exit 127: command not found: no-such-command-xyz$", shown.stdout, re.M
    )

    # 126: --cwd names a directory this node does not have.
    nowhere = populi("run", "--cwd", str(tmp_path / "nowhere"), *d, "--", "true")
    assert nowhere.returncode == 126, nowhere.stderr
    assert "does not exist" in nowhere.stderr

    # --cwd: a relative command runs where it was told (relative to the caller).
    work = tmp_path / "work"
    work.mkdir()
    (work / "hello.sh").write_text("#!/bin/sh\necho hello from $(pwd)\n")
    (work / "hello.sh").chmod(0o755)
    here = populi("run", "--cwd", str(work), *d, "--", "./hello.sh")
    assert here.returncode == 0, here.stderr
    assert here.stdout == f"hello from {work}\n"

    # A detached task's output, afterwards and with --follow; task wait never says None.
    detached = populi(
        "run", "--detach", *d, "--", "sh", "-c", "echo out; sleep 1; echo err >&2; exit 3"
    )
    assert detached.returncode == 0, detached.stderr
    task_id = detached.stdout.strip()
    followed = populi("task", "logs", task_id, "--follow", *d)
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout == "out\n" and followed.stderr.endswith("err\n"), followed
    again = populi("task", "logs", task_id, "--attempt", "1", *d)
    assert (again.stdout, again.stderr) == ("out\n", "err\n")
    waited = populi("task", "wait", task_id, *d)
    assert waited.returncode == 3
    assert waited.stdout == f"{task_id}  failed  exit 3\n"
    show = populi("task", "show", task_id, *d).stdout
    assert "exit None" not in show and re.search(r"^gpus .* exit 3$", show, re.M), show
    beyond = populi("task", "logs", task_id, "--attempt", "2", *d)
    assert beyond.returncode == 2 and one_line(beyond.stderr), beyond.stderr

"""The README's five-minute tour, run as written: its code block is read from the README
itself and pasted, in order, into one ``bash -e`` on this machine (a fresh ``HOME``, the
tour's two ports swapped for free ones, nothing else changed). Every command must succeed,
and the ones that run work must say what the tour promises: the GPU task ran on w1's
(replayed) GPU from the tour's own ``infer.py``, the detached ``./train.sh`` output came back
through ``task logs --follow``, and w1 left.

The tour starts its agents with ``&``: the shell's jobs are written out when it exits, and
each is ended by its PID here, whatever happened.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.mesh import free_port
from support.procs import kill_pids

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"
TOUR_HEADING = "## A five-minute tour"
#: The API of cp and w1, and w1's metrics (cp's stay on the default 127.0.0.1:7432).
TOUR_PORTS = ("127.0.0.1:7431", "127.0.0.1:7433", "127.0.0.1:7434")
#: A guard, not a measurement: the tour takes about 30 s on an idle machine.
GUARD_S = 300


def tour_script(readme: str) -> str:
    """The first ``sh`` block after the tour's heading."""
    start = readme.index(TOUR_HEADING)
    match = re.search(r"```sh\n(.*?)```", readme[start:], re.DOTALL)
    assert match is not None, "the README's tour has no sh block"
    return match.group(1)


def test_the_tour_block_is_found_and_names_its_ports() -> None:
    script = tour_script(README.read_text())
    for port in TOUR_PORTS:
        assert port in script
    assert "populi run --gpus 1" in script and "populi task logs" in script


def test_the_readme_tour_runs_as_written(tmp_path: Path) -> None:
    script = tour_script(README.read_text())
    for port in TOUR_PORTS:
        script = script.replace(port, f"127.0.0.1:{free_port()}")
    home = tmp_path / "home"
    home.mkdir()
    jobs = tmp_path / "jobs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("POPULI_")}
    # `populi` as installed beside this Python (what `pip install -e .` put there).
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["HOME"] = str(home)
    wrapper = f"trap 'jobs -p > {jobs}' EXIT\nset -e -x\n{script}"
    # Into files, not pipes: the agents the tour leaves running hold them open.
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    started = time.monotonic()
    try:
        with out_path.open("w") as out_file, err_path.open("w") as err_file:
            done = subprocess.run(
                ["bash", "-c", wrapper],
                cwd=home,
                env=env,
                stdout=out_file,
                stderr=err_file,
                timeout=GUARD_S,
                stdin=subprocess.DEVNULL,
            )
    finally:
        pids = [int(p) for p in jobs.read_text().split()] if jobs.exists() else []
        kill_pids(pids)
    took = time.monotonic() - started
    print(f"the tour took {took:.1f} s")
    out, err = out_path.read_text(), err_path.read_text()
    trace = "\n".join(line for line in err.splitlines() if not line.startswith("{"))
    assert done.returncode == 0, f"the tour stopped:\n{trace[-4000:]}"
    # Both agents came up whole (their API and metrics listeners included).
    assert len(re.findall(r"^health\s+ok$", out, re.MULTILINE)) == 2, out
    assert re.search(r"^inference on GPU-[0-9a-f-]+$", out, re.MULTILINE), out
    assert "step 1\nstep 2\nstep 3\n" in out, out
    # The GPU task ran remotely, on w1, under a lease; the tasks list shows both done.
    assert re.search(r"attempt 1: remote on n-\S+ \(only_fit", err), trace[-3000:]
    assert len(re.findall(r"^t-\S+\s+succeeded\s+0\s+remote:", out, re.MULTILINE)) == 2, out
    assert "left the cluster" in out and "retired" in out, out

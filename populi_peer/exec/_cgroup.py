"""cgroup v2 task groups: find the hierarchy, make a group per task attempt, kill it whole.

A task group holds every process of one attempt, whatever they do with sessions and
process groups (``setsid``, double forks): only moving itself to another cgroup, which
needs write access to one, takes a process out. ``cgroup.kill`` (Linux 5.14) SIGKILLs
the whole group in one write; older kernels get a loop over ``cgroup.procs``.
No controller is enabled: the group is for membership and killing, not limits.
"""

from __future__ import annotations

import errno
import os
import re
import signal
from pathlib import Path

from populi_peer.exec import _proc

#: Created under the cgroup2 root when no ``cgroup_parent`` is configured.
DEFAULT_PARENT_NAME = "populi.slice"


def _unescape_mount_field(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo (proc(5)).
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _proc_lines(path: str) -> list[str]:
    """The lines of a /proc file of this process; none where it cannot be read."""
    try:
        with open(path) as f:
            return f.read().splitlines()
    except OSError:
        return []


def cgroup2_mount() -> tuple[Path, str] | None:
    """``(mount point, root inside the hierarchy)`` of the first cgroup2 mount, or None."""
    for line in _proc_lines("/proc/self/mountinfo"):
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        if right.split()[0] != "cgroup2":
            continue
        fields = left.split()
        return Path(_unescape_mount_field(fields[4])), _unescape_mount_field(fields[3])
    return None


def own_cgroup_dir() -> Path | None:
    """The directory of this process's cgroup v2 group, when it is visible."""
    mount = cgroup2_mount()
    if mount is None:
        return None
    mount_point, mount_root = mount
    for line in _proc_lines("/proc/self/cgroup"):
        if line.startswith("0::"):
            rel = line[3:]
            if mount_root != "/" and rel.startswith(mount_root):
                rel = rel[len(mount_root) :]
            return mount_point / rel.lstrip("/")
    return None


def task_group_name(task_id: str, attempt: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", task_id)[:150]
    return f"task-{safe}-{attempt}"


def parent_candidates(explicit: str | None) -> list[Path]:
    """Where to try to create task groups, best first.

    An explicit parent (configured, e.g. a delegated systemd unit's subtree) is the only
    candidate when given. Otherwise ``<cgroup2 root>/populi.slice`` (works as root), then
    ``<own group>/populi`` (works when our own group is delegated to our user).
    """
    if explicit is not None:
        return [Path(explicit)]
    mount = cgroup2_mount()
    if mount is None:
        return []
    result = [mount[0] / DEFAULT_PARENT_NAME]
    own = own_cgroup_dir()
    if own is not None and own / "populi" not in result:
        result.append(own / "populi")
    return result


def create_task_group(parent: Path, name: str) -> Path:
    """Make (or reuse an empty) ``parent/name``; OSError when impossible or populated."""
    if not (parent.parent / "cgroup.procs").exists() and not (parent / "cgroup.procs").exists():
        raise OSError(errno.ENOENT, "not inside a cgroup2 hierarchy", str(parent))
    parent.mkdir(exist_ok=True)
    group = parent / name
    try:
        group.mkdir()
    except FileExistsError:
        if is_populated(group):
            # A live group for this very attempt means an earlier supervisor's task still
            # runs: starting a second copy would put the task in two places (rule 1).
            raise OSError(
                errno.EBUSY, "task cgroup exists and still has processes", str(group)
            ) from None
    if not (group / "cgroup.procs").exists():
        raise OSError(errno.ENOTDIR, "not a cgroup directory", str(group))
    return group


def _walk(group: Path) -> list[Path]:
    """``group`` and its descendant groups, deepest first."""
    result: list[Path] = []
    for dirpath, dirnames, _ in os.walk(group, topdown=False):
        del dirnames
        result.append(Path(dirpath))
    return result


def procs(group: Path) -> list[int]:
    """Pids in ``group`` and its sub-groups (a root task may have made some)."""
    result: list[int] = []
    for path in _walk(group):
        result.extend(_proc.read_pids(path / "cgroup.procs"))
    return result


def is_populated(group: Path) -> bool:
    """Whether any live process is in ``group`` or below (exited zombies do not count)."""
    try:
        with open(group / "cgroup.events") as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "populated":
                    return value.strip() != "0"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    return bool(procs(group))


def signal_all(group: Path, sig: int) -> int:
    """Send ``sig`` to every process in the group; the number signalled."""
    return sum(_proc.send_signal(pid, sig) for pid in procs(group))


def kill(group: Path) -> None:
    """SIGKILL everything in the group, including processes that left the session."""
    try:
        with open(group / "cgroup.kill", "w") as f:
            f.write("1")
        return
    except FileNotFoundError:
        if not group.exists():
            return
    except OSError:
        pass
    # Before Linux 5.14: kill what is listed; callers repeat until the group is empty,
    # which catches processes forked between the read and the kill.
    signal_all(group, signal.SIGKILL)


def remove(group: Path) -> bool:
    """Remove an empty group (and empty sub-groups); False when it still has processes."""
    ok = True
    for path in _walk(group):
        try:
            path.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            ok = False
    return ok


def looks_like_task_group(path: Path, task_id: str, attempt: int) -> bool:
    """Guard before killing a group named in a state file: never the root or a stranger.

    The path must be inside a cgroup2 mount, not be its root, and carry the name this
    task attempt's group gets.
    """
    mount = cgroup2_mount()
    if mount is None:
        return False
    try:
        resolved = path.resolve()
        root = mount[0].resolve()
    except OSError:
        return False
    if resolved == root or root not in resolved.parents:
        return False
    return resolved.name == task_group_name(task_id, attempt)

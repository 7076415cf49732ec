"""How Populi starts itself again: as the installed package or as the single-file build.

Populi runs either from an installed package (``python -m populi_peer``) or as the one
file that ``scripts/build-binary`` makes (PyInstaller one-file: at every start the file
unpacks its Python and libraries into a private temporary folder, and removes the folder
when it exits). Code that starts another Populi process — a task's supervisor, the demo's
agents — takes the command and the environment from here, so that in the single file:

- the new process is an instance of its own: it unpacks its own copy instead of reusing
  the folder of the process that started it, which vanishes when that process exits or
  is upgraded (docs/adr/0013-single-file-executable.md);
- it gets none of the variables the bundle set for itself (``LD_LIBRARY_PATH`` pointing
  into the unpacked folder, the loader's ``_PYI_*``), and the ones the loader changed
  get their values from before it started.

Importing this module is cheap: the supervisor imports it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping

from populi_peer.exec._env import outside_env

#: The hidden verb that makes the single file run a task supervisor
#: (``populi _supervisor [--detach] TASK_DIR``), the frozen twin of
#: ``python -m populi_peer.exec.supervisor``.
SUPERVISOR_VERB = "_supervisor"


def frozen() -> bool:
    """Whether this process is the single-file build (PyInstaller sets ``sys.frozen``)."""
    return bool(getattr(sys, "frozen", False))


def bundle_dir() -> str | None:
    """The folder the single file unpacked itself into, or None when not frozen."""
    if not frozen():
        return None
    path = getattr(sys, "_MEIPASS", None)
    return str(path) if path else None


def die_with_loader() -> None:
    """In the single file, make this Python process die with the file's loader.

    The one-file loader runs Python in a child process and is itself the process others
    see: systemd's main PID, a shell's job, ``kill``. It passes SIGTERM and SIGINT on,
    but a SIGKILL (systemd's last resort at a stop) would leave the Python process
    running as an orphan: a second agent then finds the data directory locked. A no-op
    outside the single file, or when the parent is not this file's loader.
    """
    if bundle_dir() is None:
        return
    parent = os.getppid()
    try:
        if os.readlink(f"/proc/{parent}/exe") != os.readlink("/proc/self/exe"):
            return
    except OSError:
        return
    from populi_peer.exec import _proc

    if not _proc.prctl_available():
        return
    _proc.set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent:  # the loader died before the signal was armed
        os.kill(os.getpid(), signal.SIGKILL)


def started_as(recorded_pid: int, started_pid: int) -> bool:
    """Whether ``recorded_pid`` (what the process says it is) is the process started
    as ``started_pid``: the same process, or the single file's Python child of it."""
    if recorded_pid == started_pid:
        return True
    from populi_peer.exec import _proc

    stat = _proc.read_stat(recorded_pid)
    return stat is not None and stat.ppid == started_pid


def populi_command() -> list[str]:
    """The argv prefix that runs ``populi`` as this very installation.

    ``-P``: no current directory on ``sys.path``, so a stray ``timeit.py`` in the
    directory ``populi demo`` runs from cannot stand in for a module Populi imports.
    """
    if frozen():
        return [sys.executable]
    return [sys.executable, "-P", "-m", "populi_peer"]


def supervisor_command() -> list[str]:
    """The argv prefix that runs a task supervisor as this very installation.

    ``-P``: no current directory on ``sys.path`` for the installed package.
    """
    if frozen():
        return [sys.executable, SUPERVISOR_VERB]
    return [sys.executable, "-P", "-m", "populi_peer.exec.supervisor"]


def child_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``environ`` (default: this process's) as a new Populi process must get it: without
    what the single file's loader set for this process (see :func:`outside_env`)."""
    return outside_env(os.environ if environ is None else environ, bundle_dir())


__all__ = [
    "SUPERVISOR_VERB",
    "bundle_dir",
    "child_env",
    "die_with_loader",
    "frozen",
    "populi_command",
    "started_as",
    "supervisor_command",
]

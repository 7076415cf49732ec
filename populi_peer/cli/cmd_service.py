"""``populi service install|uninstall``: run this node's agent as a systemd service.

The unit is written for what Populi promises across restarts and upgrades (safety rule 3,
docs/adr/0013-single-file-executable.md):

- ``KillMode=process``: a stop, restart or upgrade signals the agent alone. Each task runs
  under its own supervisor process, which keeps enforcing the lease deadline; the agent
  that comes back re-adopts it. The default (``control-group``) would kill every task.
- ``Delegate=yes``: the agent may make a cgroup per task below its own.
- The stop is a plain SIGTERM: the agent exits, the node stays a member. Leaving the
  cluster is ``populi leave``, never a side effect of stopping a service.
- ``Restart=on-failure`` with a start limit; ``OOMPolicy=continue`` so that a task killed
  for memory does not stop the service; limits that GPU work needs (open files, tasks,
  locked memory for a system unit).

Nothing here talks to systemd: the command writes (or removes) the file and prints the
``systemctl`` lines to run, so it works the same with or without a running systemd.
"""

from __future__ import annotations

import argparse
import getpass
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

from populi_peer import __version__, selfexec
from populi_peer.cli.common import add_data_dir
from populi_peer.errors import RefusedError

UNIT_NAME = "populi"
MARKER = "# Written by `populi service install`"
SYSTEM_UNIT_DIR = Path("/etc/systemd/system")
SYSTEM_DATA_DIR = Path("/var/lib/populi")
#: Seconds systemd waits for the agent to exit after SIGTERM before it kills it (the
#: agent alone: KillMode=process).
STOP_TIMEOUT_S = 30
RESTART_DELAY_S = 2
#: At most this many starts per interval, then systemd gives up (a broken config must
#: not restart forever).
START_LIMIT_BURST = 10
START_LIMIT_INTERVAL_S = 300
OPEN_FILES_LIMIT = 65536


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("service", help="install or remove a systemd unit for the agent")
    verbs = parser.add_subparsers(dest="service_command", metavar="VERB", required=True)
    install = verbs.add_parser(
        "install",
        help="write a systemd unit that runs `populi agent` (prints the systemctl lines to run)",
    )
    _common(install)
    add_data_dir(install)
    install.add_argument(
        "--executable",
        type=Path,
        default=None,
        help="the populi file the unit runs (default: this one)",
    )
    install.add_argument("--force", action="store_true", help="replace an existing unit file")
    install.add_argument(
        "--print", action="store_true", help="print the unit on stdout instead of writing it"
    )
    install.set_defaults(handler=run_install)
    uninstall = verbs.add_parser("uninstall", help="remove the unit file `service install` wrote")
    _common(uninstall)
    uninstall.set_defaults(handler=run_uninstall)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--user",
        action="store_true",
        help="a user unit (~/.config/systemd/user) instead of a system unit (/etc/systemd/system)",
    )
    parser.add_argument(
        "--unit-dir",
        type=Path,
        default=None,
        help="where the unit file goes (default: the systemd directory for --user or not)",
    )
    parser.add_argument("--name", default=UNIT_NAME, help=f"unit name (default {UNIT_NAME})")


def unit_dir_for(user: bool, environ: dict[str, str] | None = None) -> Path:
    """Where systemd looks for administrator units: system-wide, or this user's."""
    if not user:
        return SYSTEM_UNIT_DIR
    env = os.environ if environ is None else environ
    config = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    return Path(config) / "systemd" / "user"


def default_executable() -> Path:
    """The populi file this very command runs as: the single file itself, or the
    ``populi`` script next to the interpreter of an installed package."""
    if selfexec.frozen():
        return Path(sys.executable).resolve()
    beside = Path(sys.executable).parent / "populi"
    if beside.exists():
        return beside.absolute()
    found = shutil.which("populi")
    if found is None:
        raise RefusedError(
            "cannot tell which populi file the service should run: pass --executable",
            code="no_executable",
        )
    return Path(found).absolute()


def _quote(word: str) -> str:
    """One word of an ExecStart= line (systemd.service(5), "Command lines")."""
    if word and all(c.isalnum() or c in "/._-+:=@,%" for c in word):
        return word.replace("%", "%%")
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def render_unit(*, executable: Path, data_dir: Path, user: bool, commit: str = "") -> str:
    """The unit file's text. ``executable`` and ``data_dir`` must be absolute."""
    exec_start = " ".join(
        _quote(w) for w in (str(executable), "agent", "--data-dir", str(data_dir))
    )
    built = f"populi {__version__}" + (f", commit {commit}" if commit else "")
    lines = [
        f"{MARKER} ({built}).",
        "# Remove it with `populi service uninstall"
        + (" --user" if user else "")
        + "`. docs/adr/0013-single-file-executable.md says why each line is here.",
        "[Unit]",
        f"Description=Populi agent (data directory {data_dir})",
        "After=network-online.target",
        "Wants=network-online.target",
        f"StartLimitIntervalSec={START_LIMIT_INTERVAL_S}",
        f"StartLimitBurst={START_LIMIT_BURST}",
        "",
        "[Service]",
        "Type=exec",
        f"ExecStart={exec_start}",
        f"Environment={_quote('POPULI_DATA_DIR=' + str(data_dir))}",
        "# Stop, restart and upgrade signal the agent alone: every task runs on under its own",
        "# supervisor, which enforces the lease by itself, and the agent that comes back",
        "# re-adopts it. A stop is not `populi leave`: the node stays a member.",
        "KillMode=process",
        "KillSignal=SIGTERM",
        f"TimeoutStopSec={STOP_TIMEOUT_S}",
        "# The agent makes a cgroup per task below its own.",
        "Delegate=yes",
        "Restart=on-failure",
        f"RestartSec={RESTART_DELAY_S}",
        "# A task killed for memory must not stop the agent.",
        "OOMPolicy=continue",
        f"LimitNOFILE={OPEN_FILES_LIMIT}",
        "TasksMax=infinity",
    ]
    if not user:
        # Pinned memory for GPU transfers (CUDA, NCCL); a user manager may not raise it.
        lines.append("LimitMEMLOCK=infinity")
        if data_dir == SYSTEM_DATA_DIR:
            lines.append("StateDirectory=populi")
            lines.append("StateDirectoryMode=0700")
    lines += [
        "",
        "[Install]",
        f"WantedBy={'default.target' if user else 'multi-user.target'}",
        "",
    ]
    return "\n".join(lines)


def _systemctl(user: bool) -> str:
    return "systemctl --user" if user else "systemctl"


def _unit_file(args: argparse.Namespace) -> Path:
    name = str(args.name)
    if not name or "/" in name or name.startswith(".") or name.endswith(".service"):
        raise RefusedError(
            f"unit name {name!r} must be a plain name without .service", code="bad_unit_name"
        )
    unit_dir = args.unit_dir if args.unit_dir is not None else unit_dir_for(args.user)
    return Path(unit_dir).absolute() / f"{name}.service"


def _data_dir(args: argparse.Namespace) -> Path:
    if args.data_dir is not None:
        return Path(args.data_dir).absolute()
    if os.environ.get("POPULI_DATA_DIR") or args.user:
        from populi_peer.config import default_data_dir

        return default_data_dir().absolute()
    return SYSTEM_DATA_DIR


def run_install(args: argparse.Namespace) -> int:
    from populi_peer.identity import DataPaths
    from populi_peer.version import build_info

    data_dir = _data_dir(args)
    if not DataPaths(data_dir).config.exists():
        raise RefusedError(
            f"data directory {data_dir} holds no node: run `populi init` or `populi join` "
            "with it first",
            code="no_data_dir",
        )
    executable = (args.executable or default_executable()).absolute()
    if not (executable.is_file() and os.access(executable, os.X_OK)):
        raise RefusedError(f"{executable} is not an executable file", code="no_executable")
    commit = build_info()["commit"]
    text = render_unit(
        executable=executable,
        data_dir=data_dir,
        user=args.user,
        commit="" if commit == "unknown" else commit,
    )
    if args.print:
        sys.stdout.write(text)
        return 0
    unit = _unit_file(args)
    if unit.exists() and not args.force:
        raise RefusedError(f"{unit} already exists: pass --force to replace it", code="unit_exists")
    unit.parent.mkdir(parents=True, exist_ok=True)
    tmp = unit.with_name(f".{unit.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.chmod(0o644)
        os.replace(tmp, unit)
    finally:
        tmp.unlink(missing_ok=True)
    ctl = _systemctl(args.user)
    sys.stdout.write(
        f"wrote {unit}\n"
        f"start it now and at every boot:  {ctl} daemon-reload && {ctl} enable --now {unit.name}\n"
        f"its log:                         journalctl {'--user ' if args.user else ''}-u {unit.name}\n"
    )
    if args.user:
        sys.stdout.write(
            f"to keep it running after you log out: loginctl enable-linger {_user_for_shell()}\n"
        )
    return 0


def _user_for_shell() -> str:
    """This user's name quoted for a shell (``$USER`` when unset: the password database);
    ``"$USER"``, which the shell expands, when no name can be found."""
    try:
        return shlex.quote(getpass.getuser())
    except (OSError, KeyError):
        return '"$USER"'


def run_uninstall(args: argparse.Namespace) -> int:
    unit = _unit_file(args)
    if not unit.exists():
        raise RefusedError(f"{unit} does not exist", code="no_unit")
    if MARKER not in unit.read_text(errors="replace"):
        raise RefusedError(
            f"{unit} was not written by `populi service install`: leaving it", code="not_ours"
        )
    ctl = _systemctl(args.user)
    enabled = sorted(unit.parent.glob(f"*.wants/{unit.name}"))
    if enabled:
        raise RefusedError(
            f"{unit.name} is still enabled ({enabled[0]}): run `{ctl} disable --now {unit.name}` "
            "first (tasks keep running under their supervisors until their leases end; "
            "`populi leave` stops them and leaves the cluster)",
            code="unit_enabled",
        )
    unit.unlink()
    sys.stdout.write(f"removed {unit}\nthen: {ctl} daemon-reload\n")
    return 0

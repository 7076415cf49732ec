"""The environment a task receives: what its submitter passed, plus what Populi owes it.

Nothing else of the worker's environment leaks into a task (local-first: a submitter's
variables and a worker's secrets stay where they belong). The result is the complete
``env`` of a :class:`populi_peer.exec.TaskSpec`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from populi_peer.errors import BadRequest
from populi_peer.exec._records import check_env_name, check_env_value

#: Names Populi sets and a submitter may not: the fencing variables (rule 1), and the
#: GPU list that pins the task to its leased GPUs.
RESERVED_PREFIX = "POPULI_"
RESERVED_NAMES = frozenset({"CUDA_VISIBLE_DEVICES"})

#: Variables a single-file build's loader keeps for itself (PyInstaller's ``_PYI_*``
#: bookkeeping, the ``_MEIPASS2`` of its older versions, a request to start afresh): a
#: process it starts would take them as "reuse my unpacked folder".
LOADER_PREFIXES = ("_PYI_",)
LOADER_NAMES = frozenset({"_MEIPASS2", "PYINSTALLER_RESET_ENVIRONMENT"})
#: The loader saves a variable it changes (``LD_LIBRARY_PATH``) as ``NAME_ORIG``.
SAVED_SUFFIX = "_ORIG"

#: The baseline, taken from ``base`` when it has them, so that commands can be found.
BASELINE_DEFAULTS: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/",
    "LANG": "C.UTF-8",
}


def build_task_env(
    *,
    base: Mapping[str, str] | None,
    passed: Mapping[str, str],
    task_id: str,
    attempt: int,
    fencing_token: str,
    cuda_visible_devices: str | None,
) -> dict[str, str]:
    """The complete environment of one task attempt.

    In order, later entries winning:

    1. the baseline ``PATH``, ``HOME`` and ``LANG``: from ``base`` (normally the agent's
       environment) when set there, else ``/usr/local/sbin:/usr/local/bin:/usr/sbin:
       /usr/bin:/sbin:/bin``, ``/`` and ``C.UTF-8``; nothing else of ``base`` is used;
    2. the variables the submitter ``passed`` (they may override the baseline);
    3. ``POPULI_TASK_ID``, ``POPULI_ATTEMPT``, ``POPULI_FENCING_TOKEN`` (safety rule 1:
       the task's own storage fences on them) and ``CUDA_VISIBLE_DEVICES``.

    ``cuda_visible_devices`` is the leased GPU UUIDs, comma-joined. None or ``""`` (no
    GPU leased) sets ``CUDA_VISIBLE_DEVICES=""``, which CUDA reads as "no GPU": a task
    without a GPU lease must not pick up a GPU by default. This hides GPUs from CUDA; it
    is not a security boundary (NVML and ``/dev/nvidia*`` stay reachable).

    Raises :class:`BadRequest` naming the variable when ``passed`` sets a reserved name
    (``POPULI_*`` or ``CUDA_VISIBLE_DEVICES``) or an invalid name or value.
    """
    env: dict[str, str] = {}
    for name, default in BASELINE_DEFAULTS.items():
        value = base.get(name) if base is not None else None
        env[name] = value if value else default
    for name, value in passed.items():
        check_env_name(name)
        if name.startswith(RESERVED_PREFIX) or name in RESERVED_NAMES:
            raise BadRequest(
                f"environment variable {name} is reserved: Populi sets it for every task; "
                "remove it from the task's environment",
                code="reserved_env",
                variable=name,
            )
        env[name] = check_env_value(name, value)
    if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 0:
        raise BadRequest(f"attempt must be an integer >= 0, not {attempt!r}", code="bad_env")
    devices = (cuda_visible_devices or "").strip()
    if devices:
        uuids = [u.strip() for u in devices.split(",")]
        if any(not u or any(c.isspace() for c in u) for u in uuids):
            raise BadRequest(
                f"CUDA_VISIBLE_DEVICES {cuda_visible_devices!r} must be comma-joined GPU UUIDs",
                code="bad_env",
            )
        devices = ",".join(uuids)
    env["CUDA_VISIBLE_DEVICES"] = devices
    env["POPULI_TASK_ID"] = check_env_value("POPULI_TASK_ID", task_id)
    env["POPULI_ATTEMPT"] = str(attempt)
    env["POPULI_FENCING_TOKEN"] = check_env_value("POPULI_FENCING_TOKEN", fencing_token)
    return env


def outside_env(environ: Mapping[str, str], bundle_dir: str | None) -> dict[str, str]:
    """``environ`` as it was before a single-file build's loader started this process.

    ``bundle_dir`` is the folder the build unpacked itself into (None when Populi is not
    frozen: ``environ`` is returned as it is). The loader's own variables go; a variable
    whose value points into ``bundle_dir`` (``LD_LIBRARY_PATH``, a runtime hook's
    ``OPENSSL_MODULES``) takes back the value the loader saved as ``NAME_ORIG``, or goes
    when there is none (it was unset before). Nothing else changes.
    """
    if not bundle_dir:
        return dict(environ)
    inside = os.path.normpath(bundle_dir)

    def points_inside(value: str) -> bool:
        return any(
            part == inside or part.startswith(inside + os.sep)
            for part in (os.path.normpath(p) for p in value.split(os.pathsep) if p)
        )

    env: dict[str, str] = {}
    restored: set[str] = set()
    for name, value in environ.items():
        if name.startswith(LOADER_PREFIXES) or name in LOADER_NAMES:
            continue
        if points_inside(value):
            saved = environ.get(name + SAVED_SUFFIX)
            restored.add(name + SAVED_SUFFIX)
            if saved is not None:
                env[name] = saved
            continue
        env[name] = value
    for name in restored:
        env.pop(name, None)
    return env

"""``python -m populi_peer`` is ``populi``; the single-file build starts here too.

In the single file, the Python process dies with the file's loader (a SIGKILL to the
file must not leave an orphaned agent). A task's supervisor (``populi _supervisor
TASK_DIR``) starts at every task, so it skips the imports of the command line.
"""

import sys

from populi_peer.selfexec import SUPERVISOR_VERB, die_with_loader


def _main() -> int:
    die_with_loader()
    if sys.argv[1:2] == [SUPERVISOR_VERB]:
        from populi_peer.exec.supervisor import main as supervise

        return supervise(sys.argv[2:])
    from populi_peer.cli.main import main

    return main()


raise SystemExit(_main())

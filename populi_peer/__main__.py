"""``python -m populi_peer`` is ``populi``; the single-file build starts here too.

A task's supervisor (``populi _supervisor TASK_DIR``) starts at every task, so it skips the
imports of the command line.
"""

import sys

from populi_peer.selfexec import SUPERVISOR_VERB

if sys.argv[1:2] == [SUPERVISOR_VERB]:
    from populi_peer.exec.supervisor import main as supervise

    raise SystemExit(supervise(sys.argv[2:]))

from populi_peer.cli.main import main

raise SystemExit(main())

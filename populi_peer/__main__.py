"""``python -m populi_peer`` is ``populi``."""

from populi_peer.cli.main import main

raise SystemExit(main())

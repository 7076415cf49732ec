"""The trio shell: the agent (``agent.py``, the composition root) and its services.

The package imports nothing itself, so that importing one service never loads the root.
"""

__all__: list[str] = []

"""What a refused request must leave alone: the tests snapshot what it could have written
before and after, and name what changed when the two differ."""

from __future__ import annotations

from typing import Any


def differences(before: dict[str, Any], after: dict[str, Any]) -> str:
    """What changed from the snapshot ``before`` to ``after``, one key at a time (a list:
    what left it and what came in), for a failure message."""
    out = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old != new:
            if isinstance(old, list) and isinstance(new, list):
                out.append(
                    f"{key}: -{[x for x in old if x not in new]} +{[x for x in new if x not in old]}"
                )
            else:
                out.append(f"{key}: {old!r} -> {new!r}")
    return "; ".join(out)[:3000]


__all__ = ["differences"]

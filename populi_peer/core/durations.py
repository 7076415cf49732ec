"""Durations on the command line: ``90s``, ``15m``, ``1h30m``, ``2d``, or bare seconds."""

from __future__ import annotations

import re

from populi_peer.errors import UsageError

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str, *, flag: str = "duration") -> float:
    """Seconds in ``text``; raises :class:`UsageError` naming ``flag`` otherwise."""
    raw = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        value = float(raw)
    else:
        pos = 0
        value = 0.0
        for match in _PART.finditer(raw):
            if match.start() != pos:
                break
            value += float(match.group(1)) * _UNITS[match.group(2)]
            pos = match.end()
        if pos != len(raw) or not raw:
            raise UsageError(f"{flag}: {text!r} is not a duration such as 90s, 15m, 1h30m or 2d")
    if value <= 0:
        raise UsageError(f"{flag}: {text!r} must be longer than zero")
    return value


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    whole = round(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{v}{u}" for v, u in ((days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")) if v]
    return "".join(parts) or "0s"


__all__ = ["format_duration", "parse_duration"]

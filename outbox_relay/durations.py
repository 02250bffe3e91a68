"""Durations in config: ``200ms``, ``1s``, ``5m``, ``24h``, ``7d``, ``1.5s``, ``1h30m``."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_WHOLE = re.compile(r"^(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+$")
# One example of each unit: the CLI's own examples use days (`--older-than 7d`).
EXAMPLES = "500ms, 1s, 5m, 24h, 7d"


def parse_duration(value: object) -> float:
    """Seconds in a duration string; ValueError with an example if it is not one."""
    text = value.strip().replace(" ", "") if isinstance(value, str) else ""
    if not _WHOLE.match(text):
        raise ValueError(f"invalid duration {value!r}: give a number with a unit, e.g. {EXAMPLES}")
    return sum(float(n) * _UNITS[unit] for n, unit in _PART.findall(text))


# A duration setting, in seconds: the relay's config and every adapter's options use
# this one type, so a duration is written and checked the same way everywhere.
Duration = Annotated[float, BeforeValidator(parse_duration)]


def format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"

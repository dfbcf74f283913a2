"""Parsing of human-friendly durations ("250ms", "5m") and sizes ("64MiB")."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB|k|K|M|G|T)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1,
    "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
    "k": 1 << 10, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
}


def parse_duration(text: str) -> float:
    """Seconds from "250ms", "10s", "5m", "1h", "2d". Raises ValueError."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"'{text}' is not a duration; use e.g. \"250ms\", \"10s\", \"5m\", \"1h\"")
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds > 10 * 365 * 86400:
        raise ValueError(f"'{text}' is too long (at most 10 years)")
    return seconds


def parse_size(text: str) -> int:
    """Bytes from "64MiB", "1GB", "512". Binary units for KiB/MiB/GiB and k/M/G."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"'{text}' is not a size; use e.g. \"512KiB\", \"64MiB\", \"1GiB\"")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover

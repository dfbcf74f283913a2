"""Text for people: names and messages with control characters escaped, and failures
grouped by error. JSON output needs neither (its encoder escapes, and it lists every path).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

# C0 and C1 controls and DEL: a newline in a file name would print a fake line, an ESC
# sequence would drive the terminal.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def safe(text: str) -> str:
    """`text` as it can be shown on a terminal: control characters as \\xNN, the bytes of
    a name that is not UTF-8 (surrogate-escaped) as \\xNN too."""
    try:
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:   # a lone surrogate that no file name made
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


@dataclass
class Group:
    """Failures that share one error (the path taken out of its message)."""

    error: str
    first: str                  # the first failure's own message, path included
    paths: list[str] = field(default_factory=list)


def group_failures(failures: Iterable[tuple[str, str]]) -> list[Group]:
    """(path, error) pairs grouped by the error as it reads without its path, largest
    group first (ties: first seen first)."""
    groups: dict[str, Group] = {}
    for path, why in failures:
        key = why.replace(f"'{path}'", "'…'").replace(path, "…") if path else why
        groups.setdefault(key, Group(key, why)).paths.append(path)
    return sorted(groups.values(), key=lambda g: -len(g.paths))


def failure_lines(failures: Iterable[tuple[str, str]], verbose: bool, indent: str = "  "
                  ) -> list[str]:
    """The summary's failure lines: one per error with its count (and one example path);
    every path with `verbose`."""
    out = []
    for g in group_failures(failures):
        n = len(g.paths)
        if n == 1:
            out.append(f"{indent}FAILED {safe(g.paths[0])}: {safe(g.first)}")
            continue
        more = "" if verbose else f" (e.g. {safe(g.paths[0])}; --verbose lists all)"
        out.append(f"{indent}FAILED {n} files: {safe(g.error)}{more}")
        if verbose:
            out += [f"{indent}  {safe(p)}" for p in g.paths]
    return out


__all__ = ["Group", "failure_lines", "group_failures", "safe"]

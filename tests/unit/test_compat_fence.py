"""Library internals are touched only in syncd/compat: no other module names them."""

from __future__ import annotations

import re
from pathlib import Path

SYNCD = Path(__file__).parents[2] / "syncd"
# What paramiko's and watchdog's private state looks like from outside.
PRIVATE = re.compile(
    r"_Packetizer__|\bpacketizer\b|_wait_for_send_window|clear_to_send|HostKeys\(\)\._"
    r"|\._entries\b|InotifyWatchGroup|InotifyFD|_add_callback|on_queue_overflow"
    r"|_parse_event_buffer|_active_callbacks")


def test_only_compat_touches_library_internals() -> None:
    hits = []
    for f in sorted(SYNCD.rglob("*.py")):
        if f.parent.name == "compat":
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if PRIVATE.search(code):
                hits.append(f"{f.relative_to(SYNCD.parent)}:{n}: {line.strip()}")
    assert hits == []


def test_the_fence_would_see_a_use() -> None:
    assert PRIVATE.search("pk._Packetizer__iv_out") and PRIVATE.search("g._add_callback(p)")

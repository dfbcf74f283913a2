"""What people read: control characters escaped, failures grouped by error."""

from __future__ import annotations

import os

from syncd.report import failure_lines, group_failures, safe


def test_control_characters_and_raw_bytes_are_escaped() -> None:
    assert safe("innocent\n  delete_remote  etc-passwd") == "innocent\\x0a  delete_remote  etc-passwd"
    assert safe("a\x1b[2Jb\tc\x7fd\x9be") == "a\\x1b[2Jb\\x09c\\x7fd\\x9be"
    assert safe(os.fsdecode(b"caf\xe9.txt")) == "caf\\xe9.txt"       # not UTF-8
    assert safe("Grüße, 日本.txt") == "Grüße, 日本.txt"               # printable stays
    assert safe("\ud800") == "\\ud800"


def test_failures_group_by_their_error_without_the_path() -> None:
    fails = [(f"d/f{i}", f"remote 'r', path 'd/f{i}': permission denied") for i in range(3)]
    fails.append(("x", "remote 'r', path 'x': name refused by the server"))
    g = group_failures(fails)
    assert [(x.error, len(x.paths)) for x in g] == [
        ("remote 'r', path '…': permission denied", 3),
        ("remote 'r', path '…': name refused by the server", 1)]
    short = failure_lines(fails, verbose=False)
    assert short == ["  FAILED 3 files: remote 'r', path '…': permission denied "
                     "(e.g. d/f0; --verbose lists all)",
                     "  FAILED x: remote 'r', path 'x': name refused by the server"]
    long = failure_lines(fails, verbose=True)
    assert long[1:4] == ["    d/f0", "    d/f1", "    d/f2"]


def test_a_name_cannot_fake_a_failure_line() -> None:
    (line,) = failure_lines([("a\nFAILED b", "boom")], verbose=False)
    assert "\n" not in line and "a\\x0aFAILED b" in line

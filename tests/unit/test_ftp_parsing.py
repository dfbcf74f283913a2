"""FTP listing parsers: MLSD facts and the Unix LIST format (the fallback)."""

from __future__ import annotations

import pytest

from syncd.remotes.ftp import _LIST_RE, _date_key, _facts, _fp, _parse_modify, upgrade_list_fp


def test_mlsd_facts_and_modify() -> None:
    f = _facts("type=file;size=1234;modify=20261125132400.123;UNIX.mode=0644;")
    assert f["type"] == "file" and f["size"] == "1234" and f["unix.mode"] == "0644"
    assert _parse_modify(f["modify"]) == 1795613040
    assert _parse_modify("garbage") == 0


@pytest.mark.parametrize(("line", "kind", "size", "name"), [
    ("-rw-r--r--   1 owner group      1234 Nov 25 13:24 report final.txt", "-", 1234,
     "report final.txt"),
    ("drwxr-xr-x   2 owner group      4096 Jan  3  2024 archive", "d", 4096, "archive"),
    ("lrwxrwxrwx   1 owner group        11 Nov 25 13:24 link -> target", "l", 11,
     "link -> target"),
    ("-rw-r--r--   1 1000     1000  99 Feb 29 08:00 .syncd-tmp-ab-12", "-", 99,
     ".syncd-tmp-ab-12"),
    ("-rw-r--r--   1 ftp      5 Mar  1 10:00 nogroup.txt", "-", 5, "nogroup.txt"),
])
def test_unix_list_lines(line: str, kind: str, size: int, name: str) -> None:
    m = _LIST_RE.match(line)
    assert m is not None
    assert (m["kind"], int(m["size"]), m["name"]) == (kind, size, name)


def test_list_lines_that_are_not_entries_do_not_match() -> None:
    assert _LIST_RE.match("total 12") is None
    assert _LIST_RE.match("") is None


def test_list_date_key_is_month_and_day_so_it_survives_the_six_month_switch() -> None:
    # `ls` prints 'Nov 25 13:24' for a recent file and 'Nov 25  2025' once it is six months
    # old: the same file must keep its fingerprint, or every file would be uploaded again.
    assert _date_key("Nov 25 13:24") == _date_key("Nov 25  2025") == _date_key("nov 25 01:00")
    assert _date_key("Nov 25 13:24") != _date_key("Nov 26 13:24")
    assert _date_key("Nov 25 13:24") != _date_key("Dec 25 13:24")


def test_fingerprints_of_the_old_list_date_key_are_upgraded_to_the_new() -> None:
    # Before, the key held hours and minutes (recent files) or the year (old ones): an
    # upgraded index would see every LIST-listed file as changed and upload it again.
    def old_key(mon: int, day: int, rest: str) -> int:
        hh, _, mm = rest.partition(":")
        if mm:
            return ((mon * 32 + day) * 24 + int(hh)) * 60 + int(mm)
        return -(int(rest) * 1000 + mon * 32 + day)

    for rest in ("13:24", "00:00", "23:59", "2025", "1999"):
        for mon, day, text in ((11, 25, "Nov 25"), (1, 1, "Jan 1"), (12, 31, "Dec 31")):
            assert upgrade_list_fp(_fp(4096, old_key(mon, day, rest))) == \
                _fp(4096, _date_key(f"{text} {rest}"))
    new = _fp(4096, _date_key("Nov 25 13:24"))
    mlsd = _fp(4096, 1_700_000_000)
    for fp in (new, mlsd, "dir", "12:abc"):
        assert upgrade_list_fp(fp) == fp   # already new, MLSD epoch seconds, not a file fp

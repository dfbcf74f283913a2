"""A broken state dir, as a user meets it: a damaged index, a full disk under the state dir.
Each is an exit-2 error naming the file or the state dir and what to do, never a traceback;
`syncd index rebuild` recovers from the first, free space from the second."""

from __future__ import annotations

import os
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.conftest import Run, Setup, run_syncd, tree

FILES = {f"dir{i % 4}/file{i}.txt": f"content {i}\n".encode() for i in range(40)}


def _synced(s: Setup) -> None:
    for rel, data in FILES.items():
        s.write(rel, data)
    r = s.reconcile()
    assert r.code == 0, r.err
    assert tree(s.mirror) == FILES


def _random_file(index: Path) -> None:
    """The whole index replaced by noise: `head -c 4096 /dev/urandom > index.sqlite3`."""
    for x in ("-wal", "-shm"):
        Path(f"{index}{x}").unlink(missing_ok=True)
    index.write_bytes(os.urandom(4096))


def _pages_3_to_6(index: Path) -> None:
    """Pages 3-6 of a real index overwritten (its tables' first pages)."""
    con = sqlite3.connect(index)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    assert index.stat().st_size >= 6 * 4096
    with open(index, "r+b") as f:
        f.seek(2 * 4096)
        f.write(os.urandom(4 * 4096))


DAMAGE: dict[str, Callable[[Path], None]] = {"random": _random_file, "pages": _pages_3_to_6}


def _command(s: Setup, cmd: str) -> Run:
    if cmd == "reconcile":
        return s.reconcile()
    return run_syncd(cmd, "--config", str(s.config))   # `run` exits at start: no timeout here


def _says_damaged_and_what_to_do(r: Run, index: Path) -> None:
    assert r.code == 2, (r.code, r.err)
    assert f"state index {index} is damaged" in r.err
    assert "syncd index rebuild" in r.err
    assert "Traceback" not in r.err and "internal error" not in r.err


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("cmd", ["reconcile", "status", "run"])
def test_a_damaged_index_is_exit_2_naming_it(setup: Setup, damage: str, cmd: str) -> None:
    _synced(setup)
    index = setup.state / "index.sqlite3"
    DAMAGE[damage](index)
    _says_damaged_and_what_to_do(_command(setup, cmd), index)
    assert tree(setup.mirror) == FILES   # nothing was touched on the remote


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_index_rebuild_keeps_the_damaged_file_and_the_next_run_adopts(setup: Setup,
                                                                       damage: str) -> None:
    _synced(setup)
    index = setup.state / "index.sqlite3"
    DAMAGE[damage](index)
    damaged = index.read_bytes()
    r = run_syncd("index", "rebuild", "--config", str(setup.config))
    assert r.code == 0, r.err
    kept = [p for p in setup.state.iterdir() if p.name.startswith("index-damaged-")
            and p.suffix == ".sqlite3"]
    assert len(kept) == 1 and kept[0].read_bytes() == damaged and str(kept[0]) in r.out
    # The first run on the new index: every file and folder is adopted, nothing else sent,
    # nothing removed.
    setup.write("new.txt", b"new since")
    again = setup.reconcile()
    assert again.code == 0, again.err
    s = again.summary
    assert (s["adopted"], s["uploaded"], s["deleted"], s["trashed"]) == (len(FILES) + 4, 1, 0, 0)
    assert tree(setup.mirror) == {**FILES, "new.txt": b"new since"}
    assert setup.reconcile().summary["uploaded"] == 0   # in sync, history learnt again


def test_index_rebuild_refuses_a_sound_index_without_yes(setup: Setup) -> None:
    _synced(setup)
    r = run_syncd("index", "rebuild", "--config", str(setup.config))
    assert r.code == 2 and "passed SQLite's check" in r.err and "--yes" in r.err
    assert not [p for p in setup.state.iterdir() if p.name.startswith("index-")]
    r = run_syncd("index", "rebuild", "--yes", "--config", str(setup.config))
    assert r.code == 0, r.err
    assert [p.name for p in setup.state.iterdir() if p.name.startswith("index-replaced-")]


# Runs syncd with SQLite told to let the index grow by at most a few pages: the error a
# full disk under the state dir gives (SQLITE_FULL), without filling a disk.
FULL_DISK = """\
import sys
from syncd import index

_connect = index.Index._connect

def limited(self):
    db = _connect(self)
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages + 2}")
    return db

index.Index._connect = limited

if __name__ == "__main__":   # not in the worker processes' server, which imports this
    from syncd.cli import main

    del sys.argv[1]   # the syncd command run_syncd puts after this script
    main()
"""


@pytest.mark.parametrize("cmd", ["reconcile", "run"])
def test_a_full_disk_under_the_state_dir_is_exit_2_and_the_next_run_converges(
        setup: Setup, tmp_path: Path, cmd: str) -> None:
    _synced(setup)
    more = {f"more/{'n' * 120}-{i}.txt": f"more {i}\n".encode() for i in range(300)}
    for rel, data in more.items():
        setup.write(rel, data)
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    r = run_syncd(cmd, "--config", str(setup.config), prefix=(sys.executable, str(script)))
    assert r.code == 2, (r.code, r.err)
    assert f"state dir {setup.state}: no space left" in r.err
    assert "Traceback" not in r.err and "internal error" not in r.err
    # Nothing lost: the local tree is as it was, the remote holds whole files only.
    everything = {**FILES, **more}
    assert tree(setup.src) == everything
    mirror = tree(setup.mirror)
    assert all(everything[rel] == data for rel, data in mirror.items())
    # Room again: the next run converges.
    r = setup.reconcile()
    assert r.code == 0, r.err
    assert tree(setup.mirror) == everything
    assert not list(setup.mirror.rglob(".syncd-tmp-*"))
    con = sqlite3.connect(setup.state / "index.sqlite3")
    assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    con.close()


def test_a_state_dir_inside_the_remote_tree_is_refused_before_anything_runs(
        setup: Setup) -> None:
    """state_dir = "/X/dst/state", a local remote at /X/dst, a pair with path = ""."""
    state = setup.dst / "state"
    text = setup.config.read_text().replace(f'state_dir = "{setup.state}"',
                                            f'state_dir = "{state}"')
    setup.config.write_text(text.replace('path = "docs"', 'path = ""'))
    setup.write("a.txt", b"a")
    for args in (("config", "check"), ("reconcile",), ("status",)):
        r = run_syncd(*args, "--config", str(setup.config))
        assert r.code == 2, (args, r.code, r.err)
        assert "daemon.state_dir" in r.err and f"{state} is inside the remote directory" in r.err
    assert not state.exists() and not (setup.dst / "a.txt").exists()

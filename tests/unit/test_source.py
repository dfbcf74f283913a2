"""Reading a local file for upload with as few system calls as safety allows: a small
file in one read (a short read at the size fstat gave marks the end), temp names without
a random draw per file, the mode set at creation where the umask allows. None of it may
weaken a guarantee."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import syncd.remotes.local as local_mod
from syncd.errors import SourceChanged
from syncd.remotes.base import Source, temp_name
from syncd.remotes.local import LocalRemote


def test_small_file_is_read_in_one_call_and_growth_after_it_is_caught(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    with Source(str(f), "f") as s:
        buf = bytearray(101)
        assert s.readinto(buf) == 100 and s.eof
        assert s.readinto(buf) == 0
        with open(f, "ab") as g:   # grows after the read that saw its end
            g.write(b"more")
        with pytest.raises(SourceChanged):
            s.verify()
    with Source(str(f), "f") as s:
        assert s.readinto(bytearray(s.size + 1)) == s.size and s.verify()


@pytest.mark.parametrize("reader", ["readinto", "read"])
def test_short_reads_before_the_end_keep_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 reader: str) -> None:
    """A file system that returns less than asked mid-file (a FUSE or network mount that
    caps each read): that is not the end; the whole file is read and uploaded."""
    data = os.urandom(5000)
    f = tmp_path / "f"
    f.write_bytes(data)
    dst = tmp_path / "dst"
    dst.mkdir()
    real_readv, real_read = os.readv, os.read

    def short_readv(fd: int, bufs: list[bytearray]) -> int:
        return real_readv(fd, [memoryview(bufs[0])[:1000]])

    monkeypatch.setattr(os, "readv", short_readv)
    monkeypatch.setattr(os, "read", lambda fd, n: real_read(fd, min(n, 1000)))
    if reader == "readinto":
        with Source(str(f), "f") as s:
            LocalRemote("nas", dst).put("f", s)
        assert (dst / "f").read_bytes() == data
    else:
        with Source(str(f), "f") as s:
            got = b""
            while b := s.read(4096):
                got += b
            assert got == data and s.eof and s.verify()


def test_temp_names_are_unique_across_threads_and_forks() -> None:
    names: list[str] = []
    lock = threading.Lock()

    def draw() -> None:
        mine = [temp_name("t", "o") for _ in range(5000)]
        with lock:
            names.extend(mine)

    threads = [threading.Thread(target=draw) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == len(names) == 40_000
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child's next name must not be the parent's next name
        os.write(w, temp_name("t", "o").encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(r, 100).decode()
    os.close(r)
    os.close(w)
    assert child != temp_name("t", "o") and child not in names


@pytest.mark.parametrize("mode", [0o666, 0o644, 0o600, 0o750, 0o777, 0o444, 0o400])
def test_modes_survive_the_umask(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                 mode: int) -> None:
    monkeypatch.setattr(local_mod, "_UMASK", 0o022)
    old = os.umask(0o022)
    try:
        f = tmp_path / "f"
        f.write_bytes(b"z" * 10)
        os.chmod(f, mode)
        dst = tmp_path / "dst"
        dst.mkdir()
        with Source(str(f), "f") as s:
            LocalRemote("nas", dst).put("f", s)
        assert (dst / "f").stat().st_mode & 0o777 == mode
    finally:
        os.umask(old)


def _bounded(fn: object, seconds: float = 5.0) -> object:
    """Run fn in a daemon thread; fail (instead of hanging the suite) if it blocks."""
    out: dict[str, object] = {}

    def go() -> None:
        try:
            out["value"] = fn()  # type: ignore[operator]
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked: a FIFO was opened for reading without O_NONBLOCK"
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out.get("value")


def test_a_file_that_became_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    # The scan saw a file; by upload (or hashing) time it is a FIFO with no writer. A
    # blocking open() would wait for a writer forever: the reconcile hung.
    from syncd.scan import hash_file

    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    with pytest.raises(SourceChanged, match="no longer a regular file"):
        _bounded(lambda: Source(str(fifo), "f"))
    digest, before, _ = _bounded(lambda: hash_file(str(fifo)))  # type: ignore[misc]
    assert digest == b"" and not os.path.isfile(fifo) and before.st_size == 0


def test_a_failing_close_of_the_temp_is_reported_once(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # NFS and CIFS report write errors at close(); Linux frees the descriptor anyway. A
    # second close() of that number hit whatever another thread had opened meanwhile.
    import errno

    (tmp_path / "root").mkdir()
    src = tmp_path / "f.txt"
    src.write_bytes(b"payload")
    r = LocalRemote("nas", tmp_path / "root", fsync=False)
    real_close = os.close
    armed = {"on": True}
    victim: list[int] = []

    def failing_close(fd: int) -> None:
        real_close(fd)
        if armed["on"]:   # the first close in put() is the temp's
            armed["on"] = False
            victim.append(os.open(tmp_path / "victim", os.O_CREAT | os.O_WRONLY, 0o644))
            raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(local_mod.os, "close", failing_close)
    with pytest.raises(Exception) as e, Source(str(src), "x.txt") as s:
        r.put("x.txt", s)
    monkeypatch.undo()
    assert "quota" in str(e.value).lower()
    os.fstat(victim[0])   # still open: nobody closed it behind its owner's back
    real_close(victim[0])
    assert [p.name for p in (tmp_path / "root").iterdir()] == []   # no temp left

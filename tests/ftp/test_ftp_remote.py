"""FTP remote behaviour against a real pyftpdlib server: keepalive, transparent reconnect,
fewer connections after "421 too many", secrets out of errors, odd names in listings, a
resume whose temp vanished."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash

from syncd.errors import AuthError, PermanentError, TransientError, UnavailableError
from syncd.index import DB_NAME, Index, UploadLog
from syncd.model import Kind
from syncd.remotes import ftp as ftpmod
from syncd.remotes.base import Source
from syncd.remotes.ftp import FTPOptions, FTPRemote
from tests.servers import FTPServer


def make(srv: FTPServer, **kw: object) -> FTPRemote:
    o = dict(host="127.0.0.1", port=srv.port, user=srv.USER, password_env=srv.PASSWORD_ENV,
             tls=srv.tls, ca_file=str(srv.ca_file) if srv.tls != "none" else "", timeout=5.0)
    o.update(kw)
    return FTPRemote("partner", FTPOptions(**o), env={srv.PASSWORD_ENV: srv.PASSWORD})  # type: ignore[arg-type]


@pytest.fixture
def short_idle(tmp_path: Path) -> Iterator[FTPServer]:
    """A server that hangs up on a control connection idle for 1 s."""
    srv = FTPServer(tmp_path / "srv", tls="none", extra=("--idle-timeout", "1")).start()
    try:
        yield srv
    finally:
        srv.stop()


def count_connects(r: FTPRemote, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    n: list[int] = []
    real = r._connect

    def counting() -> object:
        n.append(1)
        return real()

    monkeypatch.setattr(r, "_connect", counting)
    return n


def test_noop_keepalive_outlives_the_server_idle_timeout(short_idle: FTPServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ftpmod, "KEEPALIVE_S", 0.3)
    r = make(short_idle, transfers=1)
    connects = count_connects(r, monkeypatch)
    r.check()
    time.sleep(2.5)                      # 2.5x the server's idle timeout
    assert list(r.list("")) == []
    assert len(connects) == 1            # the same connection, kept alive by NOOPs
    r.close()


def test_connection_dropped_while_idle_is_replaced_transparently(
        short_idle: FTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ftpmod, "KEEPALIVE_S", 3600.0)   # no keepalive: the server hangs up
    monkeypatch.setattr(ftpmod, "STALE_S", 0.5)
    r = make(short_idle, transfers=1)
    connects = count_connects(r, monkeypatch)
    r.check()
    time.sleep(2.0)
    assert list(r.list("")) == []        # no error: the dead connection was noticed first
    assert len(connects) == 2
    r.close()


def test_too_many_connections_means_fewer_not_failure(tmp_path: Path) -> None:
    srv = FTPServer(tmp_path / "srv", tls="none", extra=("--max-cons-per-ip", "2")).start()
    try:
        (srv.root / "d").mkdir()
        for i in range(12):
            (srv.root / "d" / f"sub{i}").mkdir()
        r = make(srv, transfers=6)
        listed = list(r.list(""))
        assert len([e for e in listed if e.path.startswith("d/sub")]) == 12
        assert r._max <= 2
        r.close()
    finally:
        srv.stop()


def test_wrong_password_and_missing_root_are_unavailable(ftpserver: FTPServer) -> None:
    r = FTPRemote("partner", FTPOptions(host="127.0.0.1", port=ftpserver.port,
                                        user=ftpserver.USER, password_env="PW",
                                        ca_file=str(ftpserver.ca_file)),
                  env={"PW": "wrong-secret"})
    with pytest.raises(AuthError) as e:
        r.check()
    assert "530" in str(e.value) and "wrong-secret" not in str(e.value)
    assert "partner" in str(e.value)
    with pytest.raises(UnavailableError, match="does not exist"):
        make(ftpserver, root="/no/such/root").check()
    with pytest.raises(AuthError, match="PW_UNSET"):
        FTPRemote("partner", FTPOptions(host="127.0.0.1", port=ftpserver.port, user="u",
                                        password_env="PW_UNSET"), env={}).check()


def test_explicit_tls_refused_by_a_plain_server_never_falls_back(ftpserver_plain: FTPServer) -> None:
    r = make(ftpserver_plain, tls="explicit")
    with pytest.raises(UnavailableError, match="refused TLS"):
        r.check()


@pytest.mark.parametrize("mlsd", [True, False], ids=["MLSD", "LIST"])
def test_names_with_unicode_line_separators_are_listed_and_line_breaks_refused(
        tmp_path: Path, mlsd: bool) -> None:
    # str.splitlines() splits at \x0b, \x0c, \x1c-\x1e, \x85, U+2028, U+2029 too: such a
    # file vanished from the listing (uploaded again every run, never deleted).
    srv = FTPServer(tmp_path / "srv", tls="none", extra=() if mlsd else ("--no-mlsd",)).start()
    try:
        r = make(srv)
        names = ["a\u2028b", "c\x85d", "e\x1cf", "g\x0bh", "i\x0cj", "plain"]
        for n in names:
            p = tmp_path / "f.bin"
            p.write_bytes(n.encode())
            with Source(str(p), f"d/{n}") as s:
                r.put(f"d/{n}", s)
        assert sorted(e.path for e in r.list("d") if e.kind == Kind.FILE) == sorted(names)
        (tmp_path / "nl").write_bytes(b"x")
        with Source(str(tmp_path / "nl"), "d/x\ny") as s, \
                pytest.raises(PermanentError, match="line break"):
            r.put("d/x\ny", s)
        r.close()
    finally:
        srv.stop()


def test_resume_whose_temp_vanished_starts_over_and_never_publishes_a_torn_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The recorded temp vanishes between the resume's SIZE and its APPE (a server deleting
    # aborted uploads): APPE makes a new file holding only the tail. That attempt fails;
    # the next one must not resume from that file (it would have the right size).
    srv = FTPServer(tmp_path / "srv", tls="none").start()
    try:
        state = tmp_path / "state"
        Index.open(state).close()
        r = make(srv)
        r.uploads = UploadLog(state / DB_NAME)
        r.tmp_owner = "abcd"
        data = os.urandom(ftpmod.RESUME_MIN + (1 << 20))
        src = tmp_path / "big.bin"
        src.write_bytes(data)
        digest = xxhash.xxh3_128(data).digest()
        (srv.root / "d").mkdir()
        tmp_rel = "/d/.syncd-tmp-abcd-000000000001"   # a first attempt cut after 3 MiB
        (srv.root / tmp_rel[1:]).write_bytes(data[:3 << 20])
        st = os.stat(src)
        rid = r.uploads.begin("partner", "/d/big.bin", str(src), st.st_size, st.st_mtime_ns,
                              st.st_ctime_ns, st.st_ino, digest, 0, time.time())
        r.uploads.started(rid, tmp_rel)
        real = FTPRemote._resume

        def resume_then_vanish(self: FTPRemote, *a: object, **k: object) -> object:
            got = real(self, *a, **k)  # type: ignore[arg-type]
            if got[0]:
                os.unlink(srv.root / got[0][1:])
            return got

        monkeypatch.setattr(FTPRemote, "_resume", resume_then_vanish)

        def put() -> object:
            with Source(str(src), "d/big.bin") as s:
                s.expected = digest
                return r.put("d/big.bin", s)

        with pytest.raises(TransientError, match="server holds"):
            put()
        assert not (srv.root / "d/big.bin").exists()
        assert [n for n in os.listdir(srv.root / "d") if n.startswith(".syncd-tmp")] == []
        monkeypatch.setattr(FTPRemote, "_resume", real)
        put()
        assert (srv.root / "d/big.bin").read_bytes() == data
        r.close()
    finally:
        srv.stop()


def test_a_folder_that_cannot_be_listed_is_named_not_taken_for_empty(
        ftpserver: FTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 550 on listing a folder that is still there (an upload-only drop box) made it
    look empty: its files were sent again on every run, with exit 0. Now the listing
    fails naming that folder; a folder that really vanished meanwhile is still just gone;
    the root's lost+found of a pair rooted at a mount point is passed over."""
    import ftplib

    for d in ("pair/drop", "pair/gone", "pair/lost+found", "pair/ok"):
        (ftpserver.root / d).mkdir(parents=True)
    (ftpserver.root / "pair/ok/f.txt").write_bytes(b"f")
    r = make(ftpserver)
    real = r._list_dir
    refused = {"drop", "lost+found"}

    def list_dir(ftp: object, ap: str) -> object:
        name = ap.rstrip("/").rpartition("/")[2]
        if name == "gone":
            (ftpserver.root / "pair/gone").rmdir()   # vanishes as we list it
            raise ftplib.error_perm("550 No such file or directory.")
        if name in refused:
            raise ftplib.error_perm("550 Permission denied.")
        return real(ftp, ap)

    monkeypatch.setattr(r, "_list_dir", list_dir)
    with pytest.raises(PermanentError) as e:
        list(r.list("pair"))
    assert e.value.path == "pair/drop" and "cannot be listed" in str(e.value)
    refused.discard("drop")
    (ftpserver.root / "pair/gone").mkdir()
    got = {x.path for x in r.list("pair")}
    assert got == {"drop", "gone", "lost+found", "ok", "ok/f.txt"}   # gone: after its listing
    r.close()

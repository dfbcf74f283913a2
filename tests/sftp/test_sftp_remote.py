"""The SFTP remote against a real OpenSSH sshd: trust, authentication, errors, reconnects.

The Remote protocol itself (put/get/list/...) is covered by the conformance battery; this
file covers what is SFTP's own: host keys, credentials, and connections that go away.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from syncd.compat.paramiko import _BLOCK_ENGINE_OUT
from syncd.errors import (
    AuthError,
    HostKeyError,
    PermanentError,
    TransientError,
    UnavailableError,
)
from syncd.remotes import sftp_wire
from syncd.remotes.base import Source
from syncd.remotes.sftp import SFTPOptions, SFTPRemote, fingerprint
from tests.servers import SSHServer


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, sshd: SSHServer) -> Iterator[SSHServer]:
    """A server of this module's own (some tests add keys or restart it)."""
    s = SSHServer(tmp_path_factory.mktemp("own-sshd")).start()
    try:
        yield s
    finally:
        s.stop()


def opts(srv: SSHServer, root: Path, **kw: object) -> SFTPOptions:
    base: dict[str, object] = dict(host=srv.host, port=srv.port, user=srv.user, root=str(root),
                                   key_file=str(srv.client_key), known_hosts=str(srv.known_hosts),
                                   use_agent=False, timeout=5.0)
    base.update(kw)
    return SFTPOptions(**base)  # type: ignore[arg-type]


def host_fp(srv: SSHServer) -> str:
    out = subprocess.run(["ssh-keygen", "-lf", str(srv.host_key.with_suffix(".pub"))],
                         capture_output=True, text=True, check=True).stdout
    return out.split()[1]


def test_known_host_connects_and_fingerprint_matches_ssh_keygen(srv: SSHServer, tmp_path: Path) -> None:
    r = SFTPRemote("t", opts(srv, tmp_path))
    r.check()
    assert fingerprint(r._transport.get_remote_server_key()) == host_fp(srv)
    r.close()


def test_unknown_host_key_refused_with_fingerprint(srv: SSHServer, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    r = SFTPRemote("t", opts(srv, tmp_path, known_hosts=str(empty)))
    with pytest.raises(HostKeyError) as ei:
        r.check()
    msg = str(ei.value)
    assert host_fp(srv) in msg and "unknown host key" in msg and "ssh-keyscan -p" in msg
    assert "accept-new" in msg


def test_hashed_known_hosts_entry_is_honoured(srv: SSHServer, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    kh.write_text(srv.known_hosts.read_text())
    subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(kh)], check=True, capture_output=True)
    assert kh.read_text().startswith("|1|"), "ssh-keygen -H did not hash the entry"
    r = SFTPRemote("t", opts(srv, tmp_path, known_hosts=str(kh)))
    r.check()
    r.close()


def test_port_22_entry_does_not_vouch_for_another_port(srv: SSHServer, tmp_path: Path) -> None:
    kh = tmp_path / "known_hosts"
    pub = srv.host_key.with_suffix(".pub").read_text().split()
    kh.write_text(f"{srv.host} {pub[0]} {pub[1]}\n")     # same key, but for port 22
    with pytest.raises(HostKeyError):
        SFTPRemote("t", opts(srv, tmp_path, known_hosts=str(kh))).check()


def test_accept_new_records_once_and_refuses_a_changed_key(tmp_path: Path, sshd: SSHServer) -> None:
    state = tmp_path / "state"
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with SSHServer(tmp_path / "srv") as s:
        o = opts(s, tmp_path, known_hosts=str(empty), host_key_policy="accept-new",
                 state_dir=str(state))
        SFTPRemote("t", o).check()
        recorded = (state / "known_hosts").read_text()
        assert f"[127.0.0.1]:{s.port} ssh-ed25519 " in recorded
        SFTPRemote("t", o).check()                      # known now: nothing added
        assert (state / "known_hosts").read_text() == recorded
        # The server is reinstalled: same address, new host key.
        s.stop()
        s.host_key.unlink()
        s.host_key.with_suffix(".pub").unlink()
        s.start()
        with pytest.raises(HostKeyError) as ei:
            SFTPRemote("t", o).check()
        assert "MISMATCH" in str(ei.value) and host_fp(s) in str(ei.value)
        assert (state / "known_hosts").read_text() == recorded


def test_a_revoked_host_key_is_refused_even_by_accept_new(srv: SSHServer, tmp_path: Path) -> None:
    # known_hosts says "@revoked [host]:port <key>": OpenSSH never accepts it. syncd used
    # to skip such lines, so accept-new took the key as new and recorded it.
    # The usual form, "@revoked * <key>", has a wildcard host, which paramiko's lookup
    # does not match: it was not refused.
    pub = srv.host_key.with_suffix(".pub").read_text().split()
    kh = tmp_path / "known_hosts"
    state = tmp_path / "state"
    for host in (f"[127.0.0.1]:{srv.port}", "*"):
        kh.write_text(f"@revoked {host} {pub[0]} {pub[1]}\n")
        for policy in ("accept-new", "strict"):
            with pytest.raises(HostKeyError, match="REVOKED") as ei:
                SFTPRemote("t", opts(srv, tmp_path, known_hosts=str(kh), host_key_policy=policy,
                                     state_dir=str(state))).check()
            assert host_fp(srv) in str(ei.value)
    assert not (state / "known_hosts").exists()   # nothing recorded


def test_wrong_key_is_auth_error_naming_user_and_host(srv: SSHServer, tmp_path: Path) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    with pytest.raises(AuthError) as ei:
        SFTPRemote("t", opts(srv, tmp_path, key_file=str(other))).check()
    msg = str(ei.value)
    assert f"'{srv.user}'" in msg and f"127.0.0.1:{srv.port}" in msg and str(other) in msg
    assert "publickey" in msg   # what the server accepts


def test_missing_key_file_and_missing_env(srv: SSHServer, tmp_path: Path) -> None:
    with pytest.raises(AuthError, match="does not exist"):
        SFTPRemote("t", opts(srv, tmp_path, key_file=str(tmp_path / "nope"))).check()
    with pytest.raises(AuthError, match=r"SYNCD_T_PW .*password_env.* is not set"):
        SFTPRemote("t", opts(srv, tmp_path, key_file="", password_env="SYNCD_T_PW"), env={}).check()


def test_encrypted_key_with_passphrase_from_env(srv: SSHServer, tmp_path: Path) -> None:
    key = tmp_path / "enc_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "s3cret phrase", "-f", str(key)],
                   check=True)
    with srv.authorized.open("a") as f:
        f.write(key.with_suffix(".pub").read_text())
    o = opts(srv, tmp_path, key_file=str(key), passphrase_env="SYNCD_T_PASS")
    SFTPRemote("t", o, env={"SYNCD_T_PASS": "s3cret phrase"}).check()
    with pytest.raises(AuthError) as ei:
        SFTPRemote("t", o, env={"SYNCD_T_PASS": "wrong"}).check()
    assert "s3cret" not in str(ei.value) and "wrong" not in str(ei.value).replace("wrong passphrase", "")
    with pytest.raises(AuthError, match=r"encrypted: set remotes\.t\.passphrase_file .* or passphrase_env"):
        SFTPRemote("t", opts(srv, tmp_path, key_file=str(key)), env={}).check()


def test_agent_keys_are_used(srv: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 5
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(srv.client_key)], env=env, check=True,
                       capture_output=True)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        r = SFTPRemote("t", opts(srv, tmp_path, key_file="", use_agent=True),
                       env={"SSH_AUTH_SOCK": str(sock), "HOME": str(tmp_path)})
        monkeypatch.setenv("HOME", str(tmp_path))   # no default identities to fall back on
        r.check()
        r.close()
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(5)


def test_missing_root_is_unavailable(srv: SSHServer, tmp_path: Path) -> None:
    with pytest.raises(UnavailableError, match=r"does not exist on .*never creates a remote root"):
        SFTPRemote("t", opts(srv, tmp_path / "absent")).check()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UnavailableError, match="not a directory"):
        SFTPRemote("t", opts(srv, f)).check()


def test_refused_connection_is_unavailable_up_front(tmp_path: Path) -> None:
    from tests.servers import free_port

    o = SFTPOptions(host="127.0.0.1", port=free_port(), root=str(tmp_path), timeout=2.0)
    with pytest.raises(UnavailableError, match=r"cannot connect to 127\.0\.0\.1"):
        SFTPRemote("t", o).check()


def test_dropped_connection_is_transient_then_reconnects(tmp_path: Path, sshd: SSHServer) -> None:
    root = tmp_path / "root"
    root.mkdir()
    small = tmp_path / "small"
    small.write_bytes(b"x" * 1000)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(16 << 20))
    with SSHServer(tmp_path / "srv") as s:
        r = SFTPRemote("t", opts(s, root))
        r.check()
        # Dropped while idle: the next call notices and reconnects by itself.
        s.kill_sessions()
        time.sleep(0.2)
        with Source(str(small), "f") as so:
            assert r.put("a/f", so).size == 1000

        # Dropped in the middle of an upload: a transient error, and nothing under the name.
        class Killing(Source):
            def read(self, size: int = 1 << 20) -> bytes:
                if self.sent > (2 << 20):
                    s.kill_sessions()
                    time.sleep(0.2)
                return super().read(size)

        with pytest.raises(TransientError), Killing(str(big), "big") as so:
            r.put("a/big", so)
        assert not (root / "a/big").exists()
        with Source(str(big), "big") as so:       # the next call reconnects and completes
            assert r.put("a/big", so).size == 16 << 20
        assert (root / "a/big").read_bytes() == big.read_bytes()
        # The temp of the cut attempt may remain (a reconcile removes it once stale); it is
        # never the final name, and the retry did not write into it.
        assert len([n for n in os.listdir(root / "a") if n.startswith(".syncd-tmp-")]) <= 1
        r.close()


def test_stalled_server_times_out_as_transient(tmp_path: Path, sshd: SSHServer) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with SSHServer(tmp_path / "srv") as s:
        r = SFTPRemote("t", opts(s, root, timeout=1.0))
        r.check()
        kids = subprocess.run(["pgrep", "-P", str(s.proc.pid)], capture_output=True,
                              text=True).stdout.split()
        for pid in kids:
            os.kill(int(pid), signal.SIGSTOP)   # the server hangs: no reply ever comes
        try:   # the reply never comes: the session's own timeout (1 s) must end the wait
            with pytest.raises(TransientError, match="timed out"):
                r.stat("anything")
            # That connection is dropped (paramiko still thinks it alive: keepalives wait
            # for no reply), so the next call connects anew (a new server process, not
            # stopped) instead of timing out again and again.
            (root / "there").write_bytes(b"x")
            assert r.stat("there").size == 1
        finally:
            for pid in kids:
                os.kill(int(pid), signal.SIGKILL)
        r.close()


def test_large_write_requests_are_used(srv: SSHServer, tmp_path: Path) -> None:
    """OpenSSH announces limits@openssh.com; syncd must use its large write size, not the
    32 KiB minimum (that is where paramiko's default upload speed goes)."""
    r = SFTPRemote("t", opts(srv, tmp_path))
    r.check()
    with r._session("") as ss:
        assert "limits@openssh.com" in ss.extensions
        assert ss.max_write > 200_000 and ss.max_read > 200_000
    r.close()


def test_concurrent_put_many_from_threads(srv: SSHServer, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    srcdir = tmp_path / "src"
    srcdir.mkdir()
    r = SFTPRemote("t", opts(srv, root))
    r.check()
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            items = []
            for i in range(50):
                p = srcdir / f"{k}-{i}"
                p.write_bytes(f"{k}:{i}".encode() * (i + 1))
                items.append((f"d{i % 5}/{k}-{i}", Source(str(p), p.name)))
            res = r.put_many(items)
            for _, so in items:
                so.close()
            bad = [x for x in res if isinstance(x, Exception)]
            assert not bad, bad
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for k in range(6):
        for i in range(50):
            assert (root / f"d{i % 5}/{k}-{i}").read_bytes() == f"{k}:{i}".encode() * (i + 1)
    r.close()


def test_wire_status_error_text() -> None:
    e = sftp_wire.StatusError(sftp_wire.PERMISSION_DENIED, "Permission denied")
    assert str(e) == "permission denied"
    e = sftp_wire.StatusError(sftp_wire.FAILURE, "No space left on device")
    assert str(e) == "failure (No space left on device)"


def test_bare_failure_status_names_the_usual_causes() -> None:
    """OpenSSH's sftp-server answers a full disk (ENOSPC, EDQUOT, EROFS, EIO...) with a
    bare "Failure": the error must say what that usually means, and where."""
    r = SFTPRemote("t", SFTPOptions(host="127.0.0.1", port=2222, user="sync"))
    for message in ("Failure", ""):
        err = r._status_error(sftp_wire.StatusError(sftp_wire.FAILURE, message), "a/b.bin",
                              writing=True)
        assert isinstance(err, PermanentError) and err.path == "a/b.bin"
        assert "disk or quota is full" in str(err) and "sync@127.0.0.1:2222" in str(err)
    # Not a write (a rename, a remove, a read): a full disk is one cause among others.
    err = r._status_error(sftp_wire.StatusError(sftp_wire.FAILURE, "Failure"), "a/b.bin")
    assert "gave no reason" in str(err) and "non-empty directory" in str(err)
    assert "usually its disk" not in str(err)
    err = r._status_error(sftp_wire.StatusError(sftp_wire.FAILURE, "No space left on device"), "x",
                          writing=True)
    assert "gave no reason" not in str(err)   # a server that gives a reason is quoted as is
    err = r._status_error(sftp_wire.StatusError(sftp_wire.PERMISSION_DENIED, "Permission denied"),
                          "x", writing=True)
    assert "gave no reason" not in str(err)


# --- password authentication ------------------------------------------------------------------
#
# The throwaway sshd cannot check passwords without a system account that has one (the
# tests must not change system users), so the password path is checked against paramiko's
# own server, in addition to the real sshd used everywhere else: it accepts one password
# and offers no SFTP subsystem, so a right password gets past authentication and stops
# at the subsystem; a wrong one is an AuthError.


class _PasswordServer:
    def __init__(self, tmp: Path):
        import socket

        import paramiko

        key_file = tmp / "pw_host_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key_file)],
                       check=True)
        self.key = paramiko.Ed25519Key.from_private_key_file(str(key_file))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.known_hosts = tmp / "pw_known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {self.key.get_name()} "
                                    f"{self.key.get_base64()}\n")
        self.transports: list[object] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        import paramiko

        class Iface(paramiko.ServerInterface):
            def get_allowed_auths(self, username: str) -> str:
                return "password"

            def check_auth_password(self, username: str, password: str) -> int:
                ok = password == "correct horse"
                return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

            def check_channel_request(self, kind: str, chanid: int) -> int:
                return paramiko.OPEN_SUCCEEDED

            def check_channel_subsystem_request(self, channel: object, name: str) -> bool:
                return False

        for _ in range(2):    # one connection per test case below, then stop
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = paramiko.Transport(conn)
            t.add_server_key(self.key)
            t.start_server(server=Iface())
            self.transports.append(t)

    def close(self) -> None:
        self.sock.close()
        for t in self.transports:
            t.close()  # type: ignore[attr-defined]


def test_password_from_env_is_used_and_never_shown(tmp_path: Path) -> None:
    srv = _PasswordServer(tmp_path)
    try:
        o = SFTPOptions(host="127.0.0.1", port=srv.port, user="someone", root="/",
                        password_env="SYNCD_T_PW", known_hosts=str(srv.known_hosts),
                        use_agent=False, timeout=5.0)
        home = {"HOME": str(tmp_path)}   # no default identity files
        with pytest.raises(UnavailableError) as ei:
            SFTPRemote("t", o, env={**home, "SYNCD_T_PW": "correct horse"}).check()
        assert not isinstance(ei.value, AuthError), ei.value   # got past authentication
        assert "SFTP channel" in str(ei.value)
        with pytest.raises(AuthError) as ei:
            SFTPRemote("t", o, env={**home, "SYNCD_T_PW": "wrong pony"}).check()
        assert "password from $SYNCD_T_PW" in str(ei.value)
        assert "pony" not in str(ei.value) and "horse" not in str(ei.value)
    finally:
        srv.close()


def test_plain_rename_fallback_replaces_existing(srv: SSHServer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A server without posix-rename@openssh.com: RENAME refuses to replace a file, so a
    put removes the target first (a short window without the file; documented). A move
    never replaces: it takes the next free name."""
    start = sftp_wire.Session.start

    def start_without_posix_rename(self: sftp_wire.Session) -> None:
        start(self)
        self.extensions.pop("posix-rename@openssh.com", None)

    monkeypatch.setattr(sftp_wire.Session, "start", start_without_posix_rename)
    root = tmp_path / "root"
    root.mkdir()
    r = SFTPRemote("t", opts(srv, root))
    r.check()
    for content in (b"first", b"second version"):
        src = tmp_path / "src"
        src.write_bytes(content)
        with Source(str(src), "f") as so:
            r.put("d/f.txt", so)
        assert (root / "d/f.txt").read_bytes() == content
    src.write_bytes(b"moved")
    with Source(str(src), "m") as so:
        r.put("m.txt", so)
    assert r.move("m.txt", "d/f.txt") == "d/f.txt.1"
    assert (root / "d/f.txt.1").read_bytes() == b"moved" and not (root / "m.txt").exists()
    assert (root / "d/f.txt").read_bytes() == b"second version"
    r.close()


def test_paths_under_a_chrooted_root() -> None:
    """A chrooted account (internal-sftp ChrootDirectory) has "/" as its root: paths must
    not start with "//", or REALPATH's answer never matches and every parent looks like
    a symlink escape."""
    r = SFTPRemote("t", SFTPOptions(host="127.0.0.1"))
    r.root = b"/"
    assert r._abs("a/b.txt") == b"/a/b.txt" and r._abs("") == b"/"
    r.root = b"/srv/backup"
    assert r._abs("a/b.txt") == b"/srv/backup/a/b.txt"


def _put_file(r: SFTPRemote, src: Path, rel: str) -> None:
    so = Source(str(src), src.name)
    try:
        r.put(rel, so)
    finally:
        so.close()


def _upload_setup(server: SSHServer, tmp_path: Path, name: str, data: bytes
                  ) -> tuple[SFTPRemote, Path, Path]:
    """A checked remote on an empty root, and a local file of `data` to upload."""
    root = tmp_path / "root"
    root.mkdir()
    src = tmp_path / name
    src.write_bytes(data)
    r = SFTPRemote("t", opts(server, root))
    r.check()
    return r, root, src


def test_fast_data_sender_is_used_and_exact_across_rekeys(srv: SSHServer, tmp_path: Path) -> None:
    """The AES-GCM fast path (compat.paramiko.DataSender) carries uploads on a verified paramiko,
    and its packets stay valid through key re-exchanges: the rekey threshold is lowered
    to 1 MiB so a 9 MiB upload rekeys several times mid-stream (a wrong nonce, sequence
    number or length would make sshd drop the connection or corrupt the file)."""
    r, root, src = _upload_setup(srv, tmp_path, "big.bin", os.urandom(9 << 20) + b"tail")
    with r._session("") as ss:
        sender = ss.sender
        assert sender is not None, "paramiko internals changed: the fast sender is off"
        t = ss.ch.get_transport()
        assert t.local_cipher.startswith("aes128-gcm")
    pk = t.packetizer
    pk.REKEY_BYTES = 1 << 20          # instance attribute: this connection only
    engines = set()
    real_count = sender._count

    def count(nbytes: int, npackets: int) -> None:
        engines.add(id(getattr(pk, _BLOCK_ENGINE_OUT)))
        real_count(nbytes, npackets)

    sender._count = count   # type: ignore[method-assign]
    _put_file(r, src, "d/big.bin")
    assert (root / "d/big.bin").read_bytes() == src.read_bytes()
    assert sender.packets >= (9 << 20) // 32768
    assert len(engines) >= 3, f"expected several rekeys mid-upload, saw {len(engines)} key(s)"
    r.close()


def test_fast_sender_finishes_partial_socket_writes(srv: SSHServer, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path's writev may take part of a batch (a full socket buffer) or nothing
    (EAGAIN): paramiko's write_all sends the rest, in order, and the upload is exact. A
    dead socket is EOFError, as paramiko's own write path says."""
    import socket

    from syncd.compat import paramiko as compat_paramiko

    r, root, src = _upload_setup(srv, tmp_path, "f.bin", os.urandom(3 << 20) + b"end")
    real = os.writev
    calls = {"n": 0}

    def stingy(fd: int, parts: list[bytes]) -> int:
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise BlockingIOError(11, "EAGAIN")
        if calls["n"] % 3 == 1 and len(parts) > 1:
            return real(fd, [parts[0], bytes(parts[1])[:5]])   # cut mid-packet
        return real(fd, parts)

    monkeypatch.setattr(compat_paramiko.os, "writev", stingy)
    with r._session("") as ss:
        sender = ss.sender
        assert sender is not None
    _put_file(r, src, "f.bin")
    assert (root / "f.bin").read_bytes() == src.read_bytes()
    assert calls["n"] >= 10 and sender.direct < calls["n"]
    monkeypatch.setattr(compat_paramiko.os, "writev", real)
    sock = sender.t.sock
    sock.shutdown(socket.SHUT_WR)            # the peer can no longer be written to
    with pytest.raises(EOFError):
        sender._write([b"data"], 4)
    r.close()
    # Closed: the old descriptor number is free and may belong to a new file at once;
    # the sender must not write there.
    spare = tmp_path / "spare"
    fd = os.open(spare, os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(EOFError):
            sender._write([b"ciphertext"], 10)
    finally:
        os.close(fd)
    assert spare.read_bytes() == b""


def test_non_gcm_cipher_goes_through_paramiko(tmp_path: Path, sshd: SSHServer) -> None:
    """A server without AES-GCM: every packet takes paramiko's own path (no fast packets),
    and the upload is still exact."""
    s = SSHServer(tmp_path / "ctr-sshd")
    s.extra_config = "Ciphers aes128-ctr\nMACs hmac-sha2-256"
    s.start()
    try:
        r, root, src = _upload_setup(s, tmp_path, "f.bin", os.urandom(3 << 20))
        with r._session("") as ss:
            sender = ss.sender
            assert ss.ch.get_transport().local_cipher == "aes128-ctr"
        _put_file(r, src, "f.bin")
        assert (root / "f.bin").read_bytes() == src.read_bytes()
        assert sender is None or sender.packets == 0
        r.close()
    finally:
        s.stop()


def test_fast_sender_refuses_a_channel_without_the_internals(srv: SSHServer, tmp_path: Path) -> None:
    """Another paramiko (an internal renamed) gets no fast sender, and its uploads go
    through sendall and stay exact."""
    from syncd.compat import paramiko as compat_paramiko
    from syncd.compat.paramiko import DataSender

    class Bare:
        transport = None

    assert DataSender.for_channel(Bare()) is None
    root = tmp_path / "root"
    root.mkdir()
    r = SFTPRemote("t", opts(srv, root))
    r.check()
    with r._session("") as ss:
        assert DataSender.for_channel(ss.ch) is not None
        pk = ss.ch.get_transport().packetizer
        iv = getattr(pk, compat_paramiko._IV_OUT)
        delattr(pk, compat_paramiko._IV_OUT)          # as if paramiko had renamed it
        try:
            assert DataSender.for_channel(ss.ch) is None
        finally:
            setattr(pk, compat_paramiko._IV_OUT, iv)
    r.close()


def test_connection_acknowledges_reads_at_once(srv: SSHServer, tmp_path: Path) -> None:
    """The transport's socket re-arms TCP_QUICKACK after each read (sshd's reply to the
    first channel open otherwise waits 40 ms for a delayed ACK) and keeps the timeout."""
    import socket

    from syncd.remotes.sftp import _QuickAckSocket

    r = SFTPRemote("t", opts(srv, tmp_path))
    r.check()
    sock = r._transport.sock
    assert isinstance(sock, _QuickAckSocket)
    pk = r._transport.packetizer   # the spent handshake timer is not cancelled per packet
    assert not isinstance(pk._Packetizer__timer, threading.Timer)
    assert not pk.handshake_timed_out()
    r.close()
    tcp = socket.create_server(("127.0.0.1", 0))
    q = _QuickAckSocket.wrap(socket.create_connection(tcp.getsockname(), timeout=2.5))
    assert q.gettimeout() == 2.5
    peer, _ = tcp.accept()
    plain = socket.create_connection(tcp.getsockname(), timeout=2.5)
    peer2, _ = tcp.accept()
    for a, b in ((q, peer), (plain, peer2)):
        for _ in range(3):   # request/reply turns: a plain socket leaves quick-ACK mode
            b.sendall(b"ping")
            assert a.recv(4) == b"ping"
            a.sendall(b"pong")
            b.recv(4)
        b.sendall(b"ping")
        assert a.recv(4) == b"ping"
    assert plain.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 0   # the control
    assert q.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
    for s in (q, peer, plain, peer2, tcp):
        s.close()


def test_connection_serves_small_reads_from_one_read() -> None:
    """paramiko reads each packet in two small calls; the transport's socket serves them
    from one larger read (fewer system calls and GIL hand-offs), byte-exact, in order,
    and reads a large packet straight from the socket."""
    import socket

    from syncd.remotes.sftp import _QuickAckSocket

    class _Counting(socket.socket):
        reads: list[int]

        def recv(self, n: int, flags: int = 0) -> bytes:
            self.reads.append(n)
            return super().recv(n, flags)

    class Q(_QuickAckSocket, _Counting):
        pass

    tcp = socket.create_server(("127.0.0.1", 0))
    q = Q.wrap(socket.create_connection(tcp.getsockname(), timeout=2.5))
    assert isinstance(q, Q)
    q.reads = []
    peer, _ = tcp.accept()
    small = b"".join(bytes([i]) * (16 + i % 50) for i in range(100))   # 100 small "packets"
    peer.sendall(small)
    got, want = b"", len(small)
    deadline = time.monotonic() + 5
    while len(got) < want and time.monotonic() < deadline:
        for n in (16, 7, 41):           # sizes like paramiko's header and body reads
            if len(got) < want:
                got += q.recv(min(n, want - len(got)))
    assert got == small
    assert 1 <= len(q.reads) < 10       # ~200 calls served by a few reads
    assert all(n == _QuickAckSocket._CHUNK for n in q.reads)
    peer.sendall(b"abcdef")
    assert q.recv(2) == b"ab"
    with pytest.raises(ValueError):
        q.recv(2, socket.MSG_PEEK)      # a peek cannot see what is buffered
    assert q.recv(10) == b"cdef"        # the rest of the buffer, not more
    big = bytes(range(256)) * 160       # 40 KiB: one packet of upload or download data
    q.reads.clear()
    peer.sendall(big)
    got = b""
    while len(got) < len(big) and time.monotonic() < deadline:
        got += q.recv(len(big) - len(got))
    assert got == big
    assert q.reads and q.reads[0] == len(big)   # asked for as is, no buffer in between
    assert q.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1
    for s in (q, peer, tcp):
        s.close()


def _busy_puts(r: SFTPRemote, tmp_path: Path, workers: int = 4) -> list[BaseException]:
    """`workers` threads each holding a session at once (put_many of a few files)."""
    srcdir = tmp_path / "src"
    srcdir.mkdir(parents=True, exist_ok=True)
    errors: list[BaseException] = []
    barrier = threading.Barrier(workers)

    def work(k: int) -> None:
        try:
            items = []
            for i in range(20):
                p = srcdir / f"{k}-{i}"
                p.write_bytes(os.urandom(50_000))
                items.append((f"w{k}/{i}", Source(str(p), p.name)))
            with r._session("") as ss:   # hold one session while the others take theirs
                barrier.wait(10)
                assert ss is not None
            res = r.put_many(items)
            for _, so in items:
                so.close()
            assert not [x for x in res if isinstance(x, Exception)]
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_concurrent_work_spreads_over_connections(srv: SSHServer, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    r = SFTPRemote("t", opts(srv, root, connections=2))
    assert not _busy_puts(r, tmp_path)
    assert len(r._conns) == 2
    assert sum(c.sessions for c in r._conns) >= 4
    assert len(list(root.rglob("*"))) == 4 * 20 + 4
    r.close()
    assert r._conns == []
    one = SFTPRemote("t", opts(srv, root, connections=1))
    assert not _busy_puts(one, tmp_path / "b")
    assert len(one._conns) == 1
    one.close()


def test_refused_extra_connection_caps_the_pool(srv: SSHServer, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that takes one login per user: the second connection fails, the pool
    stays at one connection and the work still completes."""
    root = tmp_path / "root"
    root.mkdir()
    r = SFTPRemote("t", opts(srv, root, connections=3))
    real = r._connect
    calls = []

    def connect_once() -> object:
        calls.append(1)
        if len(calls) > 1:
            raise TransientError("too many logins", remote="t")
        return real()

    monkeypatch.setattr(r, "_connect", connect_once)
    assert not _busy_puts(r, tmp_path)
    assert len(r._conns) == 1 and r._capped == 1 and r._cap_until > 0
    assert len(calls) == 2   # tried once, then capped: no retry storm
    r.close()


def test_forked_child_never_speaks_on_the_parents_connection(srv: SSHServer, tmp_path: Path) -> None:
    # The listing runs in a forked child. The parent's channels, closed or freed there,
    # must never send CLOSE under the parent's keys and sequence numbers: sshd would hang
    # up on the parent (its uploads would fail and be retried).
    import gc

    for i in range(3):
        (tmp_path / f"d{i}").mkdir()
        (tmp_path / f"d{i}" / "f").write_bytes(b"x")
    r = SFTPRemote("t", opts(srv, tmp_path, connections=1))
    r.check()
    held = r._take()   # a session in use at the fork: the child gives it back
    before = id(r._transport)   # not a reference: the child must be free to drop it all
    pid = os.fork()
    if pid == 0:   # the child: list, give back, free everything, leave as Listing's does
        code = 1
        try:
            n = sum(1 for _ in r.list(""))
            r._give(held, False)
            r._conns.clear()
            gc.collect()
            code = 0 if n == 6 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    time.sleep(0.3)
    r._give(held, True)
    assert sorted(e.path for e in r.list("")) == ["d0", "d0/f", "d1", "d1/f", "d2", "d2/f"]
    # The same connection, alive: a CLOSE sent by the child would have made sshd hang up
    # at the parent's next packet, and the listing would have reconnected.
    assert id(r._transport) == before and r._transport.is_active()
    r.close()


def test_after_fork_a_parents_session_given_back_does_not_break_later_gives(
        srv: SSHServer, tmp_path: Path) -> None:
    """What a forked child does (run here without the fork): it gives back a session of
    the parent's, then takes and gives its own. The second give failed with TypeError
    (the inherited list held connection lists and sessions, and was searched as lists)."""
    from syncd.remotes import sftp as sftp_mod

    r = SFTPRemote("t", opts(srv, tmp_path, connections=1))
    r.check()
    parents = list(r._conns)
    held = r._take()
    n_inherited = len(sftp_mod._INHERITED)
    r._after_fork()
    try:
        r._give(held, True)                 # the parent's: kept aside, never pooled
        own = r._take()                     # a new connection of the child's own
        r._give(own, True)
        assert own.conn in r._conns and held.conn not in r._conns
    finally:
        del sftp_mod._INHERITED[n_inherited:]
        for c in parents:
            c.transport.close()
        r.close()


def test_a_server_that_omits_the_size_in_fstat_still_takes_uploads(
        srv: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # SFTP attributes are optional field by field: a server that leaves out the size made
    # every upload fail as "stored None bytes" (transient, retried forever).
    real = sftp_wire.Session.attrs

    def no_size(self: sftp_wire.Session, rid: int) -> sftp_wire.Attrs:
        return real(self, rid)._replace(size=None)

    root = tmp_path / "root"
    root.mkdir()
    src = tmp_path / "f"
    src.write_bytes(b"content")
    r = SFTPRemote("t", opts(srv, root))
    monkeypatch.setattr(sftp_wire.Session, "attrs", no_size)
    with Source(str(src), "f") as s:
        e = r.put("d/f", s)
    assert (root / "d" / "f").read_bytes() == b"content" and e.size == 0
    r.close()


def test_a_folder_removed_between_its_check_and_the_upload_is_a_transient_error(
        srv: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "No such file" from OPEN is transient, not parked until the next reconcile: the
    # retry makes the folder again.
    root = tmp_path / "root"
    root.mkdir()
    src = tmp_path / "f"
    src.write_bytes(b"content")
    r = SFTPRemote("t", opts(srv, root))
    real = SFTPRemote._check_dirs

    def then_removed(self: SFTPRemote, *a: object, **k: object) -> object:
        out = real(self, *a, **k)  # type: ignore[arg-type]
        if (root / "d").is_dir():
            (root / "d").rmdir()
        return out

    monkeypatch.setattr(SFTPRemote, "_check_dirs", then_removed)
    with pytest.raises(TransientError, match="folder vanished"), Source(str(src), "f") as s:
        r.put("d/f", s)
    monkeypatch.setattr(SFTPRemote, "_check_dirs", real)
    with Source(str(src), "f") as s:
        r.put("d/f", s)
    assert (root / "d" / "f").read_bytes() == b"content"
    r.close()


def test_set_attrs_never_follows_a_symlink_on_the_server(srv: SSHServer, tmp_path: Path) -> None:
    """OpenSSH offers lsetstat@openssh.com, and set_attrs uses it: even a symlink swapped
    in after set_attrs' LSTAT would not lead the chmod or the touch outside the root."""
    from syncd.remotes import sftp_wire as w

    r, root, _src = _upload_setup(srv, tmp_path, "unused", b"")
    victim = tmp_path / "victim"
    victim.write_bytes(b"v")
    os.chmod(victim, 0o644)
    (root / "link").symlink_to(victim)
    with r._session("") as ss:
        assert ss.has_lsetstat
        with pytest.raises(w.StatusError):   # Linux cannot chmod a symlink itself
            ss.status(ss.lsetstat(r._abs("link"), w.encode_attrs(perms=0o600)))
        before = victim.stat().st_mtime_ns
        ss.status(ss.lsetstat(r._abs("link"), w.encode_attrs(mtime=1_750_000_000)))
    assert victim.stat().st_mode & 0o777 == 0o644 and victim.stat().st_mtime_ns == before
    assert (root / "link").lstat().st_mtime == 1_750_000_000   # the link's own time
    r.close()


def test_set_attrs_without_lsetstat_is_refused_rather_than_risk_a_symlink(
        srv: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server without lsetstat@openssh.com: no SETSTAT (it would follow a symlink swapped
    in after the look); a PermanentError, on which the attrs job sends the whole file."""
    r, root, src = _upload_setup(srv, tmp_path, "f.bin", b"data")
    _put_file(r, src, "f.bin")
    before = (root / "f.bin").stat()
    monkeypatch.setattr(sftp_wire.Session, "has_lsetstat", property(lambda self: False))
    with pytest.raises(PermanentError, match="lsetstat"):
        r.set_attrs("f.bin", mode=0o600 if before.st_mode & 0o777 != 0o600 else 0o640,
                    mtime_ns=1_750_000_000 * 10**9)
    after = (root / "f.bin").stat()
    assert (after.st_mode, after.st_mtime_ns) == (before.st_mode, before.st_mtime_ns)
    # Such a server cannot take a touch alone: the remote says so once it has a session
    # (the planner then records a touch instead of sending the file for it).
    fresh = SFTPRemote("t", opts(srv, root))
    assert fresh.caps.mtimes
    fresh.check()
    assert not fresh.caps.mtimes and fresh.caps.modes and SFTPRemote.caps.mtimes
    fresh.close()
    r.close()


def test_a_touch_on_a_server_without_lsetstat_is_recorded_not_sent(
        srv: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plan follows what the listing's session learnt of the server (it runs in a
    forked child; the planning process may have no session yet): without lsetstat a touch
    is recorded, as on S3, never a whole upload for each touched file."""
    import time
    import tomllib

    from syncd.config import parse_config
    from syncd.engine import Engine, Options
    from syncd.index import Index

    src, root = tmp_path / "src", tmp_path / "root"
    src.mkdir()
    root.mkdir()
    old = time.time() - 100
    for i in range(5):
        (src / f"f{i}").write_bytes(b"x" * i)
        os.utime(src / f"f{i}", (old, old))
    cfg = parse_config({
        "daemon": {"state_dir": str(tmp_path / "state")},
        "remotes": {"box": tomllib.loads(srv.remote_toml(root))},
        "sync": [{"name": "p", "local": str(src), "remote": "box", "path": "m"}],
    }, "test.toml", {})
    monkeypatch.setattr(sftp_wire.Session, "has_lsetstat", property(lambda self: False))
    e = Engine(cfg, Index.open(cfg.daemon.state_dir))
    assert e.reconcile(cfg.pairs[0], Options()).uploaded == 5
    e.close()
    new = time.time_ns() - 50 * 10**9
    for i in range(5):
        os.utime(src / f"f{i}", ns=(new, new))
    # A fresh process, whose background connect (prepare) has not finished when it plans
    # (a big tree, a slow link): the parent has no session of its own yet.
    monkeypatch.setattr(SFTPRemote, "prepare", lambda self: None)
    e = Engine(cfg, Index.open(cfg.daemon.state_dir))
    assert e.remotes.get("box") is None or e.remotes["box"].caps.mtimes
    res = e.reconcile(cfg.pairs[0], Options())
    assert (res.status, res.uploaded, res.attrs_set) == ("ok", 0, 0)
    assert not e.remotes["box"].caps.mtimes
    res = e.reconcile(cfg.pairs[0], Options())
    assert (res.uploaded, res.attrs_set, res.hashed_files) == (0, 0, 0)
    # A chmod -R there: each file goes whole (a mode cannot be set without following a
    # symlink), but together, as a chunk of uploads goes, not one upload per call.
    for i in range(5):
        os.chmod(src / f"f{i}", 0o600)
    real, batches = SFTPRemote.put_many, []

    def spy(self: SFTPRemote, items: list[tuple[str, Source]]) -> list[object]:
        batches.append(len(items))
        return real(self, items)

    monkeypatch.setattr(SFTPRemote, "put_many", spy)
    res = e.reconcile(cfg.pairs[0], Options())
    assert (res.status, res.uploaded, res.attrs_set) == ("ok", 5, 0) and max(batches) > 1
    assert all((root / "m" / f"f{i}").stat().st_mode & 0o777 == 0o600 for i in range(5))
    e.close()


def test_a_folder_the_login_cannot_list_is_named(srv: SSHServer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A remote subfolder the login may not open failed the listing as 'path <the
    pair's>: permission denied', naming nothing a user could fix; root's lost+found of a
    pair rooted at a mount point (mode 0700) stopped every sync, the first one too. (The
    server runs as this user, root here: the refusal is injected at the wire.)"""
    for d in ("pair/drop", "pair/lost+found", "pair/ok"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "pair/ok/f.txt").write_bytes(b"f")
    refused = {b"drop", b"lost+found"}
    rids: dict[int, bytes] = {}
    real_open, real_handle = sftp_wire.Session.opendir, sftp_wire.Session.handle

    def opendir(self: sftp_wire.Session, path: bytes) -> int:
        rid = real_open(self, path)
        rids[rid] = path
        return rid

    def handle(self: sftp_wire.Session, rid: int) -> bytes:
        h = real_handle(self, rid)
        if rids.get(rid, b"").rpartition(b"/")[2] in refused:
            raise sftp_wire.StatusError(sftp_wire.PERMISSION_DENIED, "Permission denied")
        return h

    monkeypatch.setattr(sftp_wire.Session, "opendir", opendir)
    monkeypatch.setattr(sftp_wire.Session, "handle", handle)
    r = SFTPRemote("t", opts(srv, tmp_path))
    try:
        with pytest.raises(PermanentError) as e:
            list(r.list("pair"))
        assert e.value.path == "pair/drop" and "ermission denied" in str(e.value)
        refused.discard(b"drop")
        assert {x.path for x in r.list("pair")} == {"drop", "lost+found", "ok", "ok/f.txt"}
    finally:
        r.close()


def test_fast_sender_self_check_agrees_with_paramiko() -> None:
    """The known-answer check passes on the installed paramiko, and fails when the fast
    path would seal under another nonce, number its packets otherwise, or pad otherwise."""
    from paramiko.packet import Packetizer

    from syncd.compat import paramiko as compat

    assert compat.self_check(Packetizer) is None
    real_seal = compat.seal

    def nonce_reused(eng: Any, iv: bytes, *a: Any) -> Any:   # every packet one nonce
        out, nxt = real_seal(eng, iv, *a)
        first = real_seal(eng, iv, a[0], a[1], a[2][:1])[0]
        return first + real_seal(eng, iv, a[0], a[1], a[2][1:])[0], nxt

    def iv_not_advanced(eng: Any, iv: bytes, *a: Any) -> Any:
        return real_seal(eng, iv, *a)[0], iv

    def other_channel(eng: Any, iv: bytes, bsize: int, chan: int, chunks: Any) -> Any:
        return real_seal(eng, iv, bsize, chan + 1, chunks)

    try:
        for fake, says in ((nonce_reused, "nonce"), (iv_not_advanced, "next nonce"),
                           (other_channel, "other bytes")):
            compat.seal = fake   # type: ignore[assignment]
            why = compat.self_check(Packetizer)
            assert why is not None and says in why, (fake.__name__, why)
    finally:
        compat.seal = real_seal   # type: ignore[assignment]


def test_fast_sender_falls_back_when_its_self_check_fails(
        srv: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A paramiko whose packets the fast path would not reproduce (here: a sealing that
    advances the nonce twice) gets no fast sender: uploads go through paramiko's own path
    and stay exact, and the log says so once, naming the reason."""
    from structlog.testing import capture_logs

    from syncd.compat import paramiko as compat

    real_seal = compat.seal

    def skips_a_nonce(eng: Any, iv: bytes, *a: Any) -> Any:
        out, nxt = real_seal(eng, iv, *a)
        return real_seal(eng, nxt, *a)[0], nxt

    monkeypatch.setattr(compat, "seal", skips_a_nonce)
    monkeypatch.setattr(compat, "_off_said", set())
    with capture_logs() as logs:
        r, root, src = _upload_setup(srv, tmp_path, "f.bin", os.urandom(2 << 20) + b"end")
        with r._session("") as ss:
            assert ss.sender is None
        _put_file(r, src, "f.bin")
        _put_file(r, src, "g.bin")
        r.close()
    assert (root / "f.bin").read_bytes() == src.read_bytes()
    assert (root / "g.bin").read_bytes() == src.read_bytes()
    off = [e for e in logs if e["event"] == "compat_feature_off"]
    assert len(off) == 1 and off[0]["feature"] == "ssh_fast_send"
    assert "nonce" in off[0]["effect"] and off[0]["library"] == "paramiko"


def test_fast_sender_is_off_on_an_unverified_paramiko(
        srv: SSHServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from structlog.testing import capture_logs

    from syncd.compat import paramiko as compat

    monkeypatch.setattr(compat, "installed_version", lambda _d: "9.0.0")
    monkeypatch.setattr(compat, "_off_said", set())
    with capture_logs() as logs:
        r, root, src = _upload_setup(srv, tmp_path, "f.bin", os.urandom(1 << 20))
        with r._session("") as ss:
            assert ss.sender is None
        _put_file(r, src, "f.bin")
        r.close()
    assert (root / "f.bin").read_bytes() == src.read_bytes()
    (off,) = [e for e in logs if e["event"] == "compat_feature_off"]
    assert "paramiko 9.0.0 is not one" in off["effect"] and off["version"] == "9.0.0"
def test_passphrase_from_a_file_against_sshd(srv: SSHServer, tmp_path: Path) -> None:
    key = tmp_path / "enc_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "s3cret phrase", "-f", str(key)],
                   check=True)
    with srv.authorized.open("a") as f:
        f.write(key.with_suffix(".pub").read_text())
    phrase = tmp_path / "passphrase"
    phrase.write_text("s3cret phrase\n")   # as `echo` writes it: the newline is not in it
    o = opts(srv, tmp_path, key_file=str(key), passphrase_file=str(phrase))
    SFTPRemote("t", o, env={}).check()
    phrase.write_text("wrong\n")
    with pytest.raises(AuthError) as ei:
        SFTPRemote("t", o, env={}).check()
    assert "wrong passphrase" in str(ei.value) and "s3cret" not in str(ei.value)
    phrase.unlink()
    with pytest.raises(AuthError) as ei:
        SFTPRemote("t", o, env={}).check()
    assert f"remotes.t.passphrase_file = \"{phrase}\": the file does not exist" in str(ei.value)


def test_password_from_a_file_is_used_and_never_shown(tmp_path: Path) -> None:
    srv = _PasswordServer(tmp_path)
    try:
        pw = tmp_path / "pw"
        o = SFTPOptions(host="127.0.0.1", port=srv.port, user="someone", root="/",
                        password_file=str(pw), known_hosts=str(srv.known_hosts),
                        use_agent=False, timeout=5.0)
        home = {"HOME": str(tmp_path)}   # no default identity files
        pw.write_text("correct horse\n")
        with pytest.raises(UnavailableError) as ei:
            SFTPRemote("t", o, env=home).check()
        assert not isinstance(ei.value, AuthError), ei.value   # got past authentication
        pw.write_text("wrong pony\n")
        with pytest.raises(AuthError) as ei:
            SFTPRemote("t", o, env=home).check()
        assert f"password from {pw}" in str(ei.value)
        assert "pony" not in str(ei.value) and "horse" not in str(ei.value)
    finally:
        srv.close()


def test_a_key_file_in_an_unset_credentials_directory_says_what_to_do(
        srv: SSHServer, tmp_path: Path) -> None:
    o = opts(srv, tmp_path, key_file="${CREDENTIALS_DIRECTORY}/sftp_key")
    with pytest.raises(AuthError) as ei:
        SFTPRemote("t", o, env={}).check()
    assert "remotes.t.key_file = \"${CREDENTIALS_DIRECTORY}/sftp_key\": $CREDENTIALS_DIRECTORY " \
           "is set only when systemd starts syncd with LoadCredential=" in str(ei.value)

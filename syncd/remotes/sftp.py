"""The `sftp` remote: an SSH server reached with paramiko, host key checked against
known_hosts, files published atomically (exclusive temp name + posix-rename), requests
pipelined over a small pool of SFTP channels on one SSH connection.

paramiko supplies SSH (transport, kex, ciphers, auth, agent); the SFTP protocol itself is
`sftp_wire`, which keeps hundreds of requests in flight instead of one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from syncd import log as slog
from syncd.compat.paramiko import DataSender, drop_handshake_timer
from syncd.credentials import check_resolved, read_secret_file
from syncd.errors import (
    AuthError,
    Conflict,
    ConnectionLost,
    HostKeyError,
    NotFound,
    PathEscape,
    PermanentError,
    RemoteChanged,
    RemoteError,
    SourceChanged,
    TransientError,
    UnavailableError,
)
from syncd.listing import DIR_FP
from syncd.model import LOST_FOUND, TRASH_DIR, Kind, RemoteEntry
from syncd.remotes import sftp_wire as w
from syncd.remotes.base import (
    Capabilities,
    Source,
    check_rel_path,
    names_for,
    temp_name,
    unlistable,
)

_FILE, _DIR = int(Kind.FILE), int(Kind.DIR)
_SEC = 1_000_000_000
KEEPALIVE_S = 15
CONNECTION_RETRY_S = 300         # after a refused extra connection, try another this late
# WRITE requests in flight per upload (x 255 KiB). 32 leaves a 1 GiB upload waiting on
# flow control ~30% of the time on loopback; 64 does not (spreading one file over four
# channels was tried too: no faster than one channel with this window).
WRITE_WINDOW = 64
MAX_CHANNELS = 8                 # per SSH connection; OpenSSH's default MaxSessions is 10
READ_WINDOW = 32
DIR_WINDOW = 32                  # directories listed at once
# In a forked child: the parent's connections, kept referenced until the child exits.
# Freed, paramiko's Channel.__del__ would send CLOSE on the socket the child shares with
# the parent, under the parent's keys and sequence numbers: the server then hangs up on
# the parent (and a GCM nonce would be used twice).
_INHERITED: list[Any] = []
_PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


class _QuickAckSocket(socket.socket):
    """A TCP socket that acknowledges what it reads at once (Linux TCP_QUICKACK, which the
    kernel forgets, so it is set again after each read).

    Why: sshd leaves Nagle on for non-interactive sessions, and after authentication it
    sends an unsolicited message (OpenSSH's hostkeys-00 announcement). Its reply to our
    first channel open then waits behind Nagle until that message is acknowledged, and a
    delayed ACK takes 40 ms: every connection paid it (measured: channel open 44 ms
    without, 2 ms with)."""

    @classmethod
    def wrap(cls, sock: socket.socket) -> socket.socket:
        if not hasattr(socket, "TCP_QUICKACK"):
            return sock
        timeout = sock.gettimeout()
        q = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        q.settimeout(timeout)
        return q

    # Reads below this size are served from one larger read: paramiko reads each packet
    # in two calls (its first cipher block, then the rest), and most packets an upload
    # receives are small (window adjusts, status replies). Each recv, and the poll before
    # it (the socket has a timeout), hands the GIL to another thread and back: on a 2 GB
    # upload the transport thread made ~85k recv calls, and the GIL traffic cost more CPU
    # than the reads.
    _SMALL = 16384
    _CHUNK = 65536
    _rbuf = b""
    _roff = 0

    def recv(self, n: int, flags: int = 0) -> bytes:
        buf, off = self._rbuf, self._roff
        if off < len(buf):
            if flags:
                raise ValueError("recv flags with buffered data")
            out = buf[off:off + n]
            self._roff = off + len(out)
            return out
        if flags or n >= self._SMALL or n <= 0:
            data = super().recv(n, flags)
        else:
            data = super().recv(self._CHUNK)
            if len(data) > n:
                self._rbuf, self._roff = data, n
                data = data[:n]
        with contextlib.suppress(OSError):
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return data


@dataclass(frozen=True, slots=True)
class SFTPOptions:
    host: str
    port: int = 22
    user: str = ""
    root: str = "."
    key_file: str = ""
    passphrase_env: str = ""
    passphrase_file: str = ""
    password_env: str = ""
    password_file: str = ""
    use_agent: bool = True
    known_hosts: str = "~/.ssh/known_hosts"
    host_key_policy: str = "strict"         # strict | accept-new
    timeout: float = 30.0
    fsync: bool = False
    state_dir: str = ""                     # where accept-new records keys
    connections: int = 2                    # SSH connections for concurrent transfers


def fingerprint(key: Any) -> str:
    """OpenSSH's SHA256 fingerprint of a host key (as `ssh-keygen -lf` prints it)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _fp(size: int, mtime_s: int) -> str:
    return f"{size}:{mtime_s * _SEC}"


class _Conn:
    """One SSH connection of the pool and its SFTP channels."""

    __slots__ = ("idle", "sessions", "transport")

    def __init__(self, transport: Any):
        self.transport = transport
        self.sessions = 0                  # channels open (idle or in use)
        self.idle: list[w.Session] = []

    def busy(self) -> int:
        return self.sessions - len(self.idle)


class SFTPRemote:
    caps = Capabilities(dirs=True, move=True, mtime_precision_ns=_SEC, atomic_put=True,
                        cpu_bound=False, modes=True, mtimes=True)

    def __init__(self, name: str, opts: SFTPOptions, env: dict[str, str] | None = None):
        self.name = name
        self.o = opts
        self.env = dict(os.environ) if env is None else env
        self._lock = threading.Lock()
        self._free = threading.Condition(self._lock)
        self._conns: list[_Conn] = []   # live SSH connections, each with its channels
        self._max_conns = max(1, opts.connections)
        self._connecting = 0            # connections being made (outside the lock)
        # Connection attempts failed so far, and the last one's error (see _pick).
        self._failed: tuple[int, RemoteError | None] = (0, None)
        # Temps of uploads cut off by a lost connection: removed by the next session.
        self._orphans: set[bytes] = set()
        self._capped = self._max_conns  # the limit after a refused extra connection...
        self._cap_until = 0.0           # ...until this time.monotonic()
        self._max_sessions = MAX_CHANNELS
        self.root = b""                 # canonical (symlink-free) absolute root, from the server
        self._pid = os.getpid()
        self.tmp_owner = ""   # set by open_remote: the state dir's tag (see temp_name)
        self.log = slog.get()

    @property
    def where(self) -> str:
        return f"{self.o.user or '?'}@{self.o.host}:{self.o.port}"

    # --- connection -----------------------------------------------------------------------

    def check(self) -> None:
        """Connect, authenticate and make sure the root exists; errors say which and why."""
        try:
            with self._session("") as ss:
                try:
                    st = ss.attrs(ss.stat(self.root))
                except w.StatusError as e:
                    if e.code != w.NO_SUCH_FILE:
                        raise
                    raise UnavailableError(f"root directory {self.o.root} does not exist on "
                                           f"{self.where}; syncd never creates a remote root",
                                           remote=self.name) from None
        except TransientError as e:
            raise UnavailableError(e.reason, remote=self.name) from None
        except UnavailableError:
            raise
        except RemoteError as e:
            raise UnavailableError(e.reason, remote=self.name) from None
        if st.kind != w.S_IFDIR:
            raise UnavailableError(f"root {self.o.root} on {self.where} is not a directory",
                                   remote=self.name)

    def _connect(self) -> Any:
        """A fresh authenticated transport. Every phase is bounded by `timeout`: TCP
        connect, banner, key exchange, each authentication request. A server that does not
        answer in time, or hangs up, is ConnectionLost (the remote as a whole, not a path)."""
        paramiko = _paramiko()

        o = self.o
        try:
            sock = socket.create_connection((o.host, o.port), timeout=o.timeout)
        except socket.gaierror as e:
            raise ConnectionLost(f"cannot resolve host {o.host}: {e.strerror}",
                                 remote=self.name) from None
        except TimeoutError:
            raise ConnectionLost(f"connecting to {o.host}:{o.port} timed out after "
                                 f"{o.timeout:g} s", remote=self.name) from None
        except OSError as e:
            raise ConnectionLost(f"cannot connect to {o.host}:{o.port}: {e.strerror or e}",
                                 remote=self.name) from None
        # Requests go out as soon as they are complete: without this, Nagle + delayed ACK
        # add ~40 ms to each lone request/reply exchange (authentication, a REALPATH).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = paramiko.Transport(_QuickAckSocket.wrap(sock))
        try:
            t.banner_timeout = t.handshake_timeout = o.timeout
            t.auth_timeout = o.timeout
            opts = t.get_security_options()
            have = tuple(opts.ciphers)
            opts.ciphers = tuple(c for c in _PREFERRED_CIPHERS if c in have) + tuple(
                c for c in have if c not in _PREFERRED_CIPHERS)
            known, revoked = self._known_keys()
            if known:   # ask for a key type we can check, as OpenSSH does
                types = tuple(opts.key_types)
                opts.key_types = tuple(k for k in known if k in types) + tuple(
                    k for k in types if k not in known)
            try:
                self._handshake(t)
                key = t.get_remote_server_key()
            except (paramiko.SSHException, OSError, EOFError) as e:
                raise ConnectionLost(f"SSH handshake with {o.host}:{o.port} failed: "
                                     f"{str(e) or type(e).__name__}", remote=self.name) from None
            self._verify_host_key(key, known, revoked)
            self._authenticate(t)
            t.set_keepalive(KEEPALIVE_S)
            drop_handshake_timer(t)
            return t
        except BaseException:
            t.close()
            raise

    def _handshake(self, t: Any) -> None:
        """Banner and key exchange, within the banner and handshake timeouts. paramiko's
        own start_client(timeout=) returns when the time is up as if it had succeeded
        (paramiko 5.1), so completion is awaited here: either the exchange completed on a
        live transport, or this raises."""
        done = threading.Event()
        t.start_client(event=done)
        limit = t.banner_timeout + t.handshake_timeout
        deadline = time.monotonic() + limit
        while not done.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                raise ConnectionLost(f"no SSH handshake from {self.o.host}:{self.o.port} "
                                     f"within {limit:g} s (the server accepted the "
                                     "connection, then went silent)", remote=self.name)
        if not t.is_active():
            e = t.get_exception()
            if isinstance(e, socket.timeout) or e is None or isinstance(e, EOFError):
                raise ConnectionLost(f"SSH handshake with {self.o.host}:{self.o.port} "
                                     "failed: the server closed the connection or stopped "
                                     f"answering (timeout {self.o.timeout:g} s)",
                                     remote=self.name)
            raise e

    def _host_names(self) -> list[str]:
        o = self.o
        return [o.host] if o.port == 22 else [f"[{o.host}]:{o.port}"]

    def _known_files(self) -> list[Path]:
        files = [Path(self.o.known_hosts).expanduser()]
        if self.o.state_dir:
            files.append(Path(self.o.state_dir) / "known_hosts")
        return files

    def _known_keys(self) -> tuple[dict[str, Any], list[Any]]:
        """key type -> key recorded for this host in known_hosts (and syncd's own file), and
        the keys marked @revoked there, whatever host they are written for (OpenSSH: such a
        key "must not ever be accepted"; "@revoked * <key>" is the usual form, and a
        wildcard host is something paramiko's lookup does not match)."""
        from paramiko.hostkeys import HostKeyEntry

        out: dict[str, Any] = {}
        revoked: list[Any] = []
        names = self._host_names()
        for f in self._known_files():
            try:
                lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
            except FileNotFoundError:
                continue
            except OSError as e:
                raise HostKeyError(f"cannot read known_hosts file {f}: {e.strerror}",
                                   remote=self.name) from None
            for n, line in enumerate(lines, 1):
                line = line.strip()
                is_revoked = line.startswith("@revoked ")
                if is_revoked:   # never to be accepted, whatever the policy
                    line = line.removeprefix("@revoked ").strip()
                if not line or line.startswith(("#", "@")):   # @cert-authority: not supported
                    continue
                with contextlib.suppress(Exception):          # a line paramiko can't parse
                    e = HostKeyEntry.from_line(line, n)
                    if e is not None:
                        if is_revoked:
                            revoked.append(e.key)
                        elif e.key is not None and _names_host(e.hostnames, names):
                            out.setdefault(e.key.get_name(), e.key)
        return out, revoked

    def _verify_host_key(self, key: Any, known: dict[str, Any], revoked: list[Any]) -> None:
        o = self.o
        fp = fingerprint(key)
        typ = key.get_name()
        name = self._host_names()[0]
        files = " or ".join(str(f) for f in self._known_files())
        if key in revoked:
            raise HostKeyError(
                f"REVOKED host key for {name}: the server offered {typ} {fp}, which {files} "
                f"marks @revoked. Refused whatever host_key_policy says; ask the server's "
                f"admin which key it should have", remote=self.name)
        if known:
            if known.get(typ) == key:
                return
            raise HostKeyError(
                f"HOST KEY MISMATCH for {name}: the server offered {typ} {fp}, which differs "
                f"from the key recorded in {files}. This could be an attack (someone in the "
                f"middle) or a reinstalled server. Check the key with the server's admin; if "
                f"it is legitimate, remove the old entry (ssh-keygen -R '{name}' -f FILE) and "
                f"run again", remote=self.name)
        if o.host_key_policy == "accept-new" and o.state_dir:
            self._record_key(name, key)
            self.log.warning("host_key_accepted", remote=self.name, host=name, key_type=typ,
                             fingerprint=fp, file=str(self._known_files()[-1]))
            return
        port = f" -p {o.port}" if o.port != 22 else ""
        raise HostKeyError(
            f"unknown host key for {name}: {typ} {fp}. Verify this fingerprint with the "
            f"server's admin, then add it: ssh-keyscan{port} {o.host} >> {self._known_files()[0]} "
            f"(or set host_key_policy = \"accept-new\" to trust the first key seen)",
            remote=self.name)

    def _record_key(self, name: str, key: Any) -> None:
        f = self._known_files()[-1]
        f.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{name} {key.get_name()} {key.get_base64()}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def _authenticate(self, t: Any) -> None:
        paramiko = _paramiko()
        o = self.o
        user = o.user or _login_name()
        tried: list[str] = []
        allowed: list[str] | None = None

        def attempt(what: str, fn: Any, *args: Any) -> bool:
            nonlocal allowed
            tried.append(what)
            try:
                fn(user, *args)
            except paramiko.BadAuthenticationType as e:
                allowed = list(e.allowed_types)
            except paramiko.AuthenticationException as e:
                # paramiko says "authentication failed" also when the transport died or
                # the server did not answer within auth_timeout: that is the connection.
                if not t.is_active() or "timeout" in str(e).lower():
                    raise ConnectionLost(f"the server stopped answering during "
                                         f"authentication ({e}; timeout {o.timeout:g} s)",
                                         remote=self.name) from None
            except (paramiko.SSHException, OSError, EOFError) as e:
                raise ConnectionLost(f"connection lost during authentication: {e}",
                                     remote=self.name) from None
            return bool(t.is_authenticated())

        passphrase = None
        if o.passphrase_env:
            passphrase = self._env(o.passphrase_env, "passphrase_env")
        elif o.passphrase_file:
            passphrase = read_secret_file(o.passphrase_file, self.name, "passphrase_file")
        keys: list[tuple[str, Any]] = []
        if o.key_file:
            keys.append((f"key {o.key_file}", self._load_key(o.key_file, passphrase, explicit=True)))
        for what, key in keys:
            if attempt(what, t.auth_publickey, key):
                return
        if o.use_agent and self.env.get("SSH_AUTH_SOCK"):
            try:
                agent_keys = paramiko.Agent().get_keys()
            except Exception:   # an unreachable agent is not fatal: other methods may work
                agent_keys = ()
            for i, key in enumerate(agent_keys):
                if attempt(f"agent key {i + 1}", t.auth_publickey, key):
                    return
        if not o.key_file:   # like ssh: the default identities when none is configured
            for n in ("id_ed25519", "id_ecdsa", "id_rsa"):
                p = Path("~/.ssh").expanduser() / n
                if p.exists():
                    key = self._load_key(str(p), passphrase, explicit=False)
                    if key is not None and attempt(f"key {p}", t.auth_publickey, key):
                        return
        if o.password_env:
            pw = self._env(o.password_env, "password_env")
            if attempt(f"password from ${o.password_env}", t.auth_password, pw):
                return
        elif o.password_file:
            pw = read_secret_file(o.password_file, self.name, "password_file")
            if attempt(f"password from {o.password_file}", t.auth_password, pw):
                return
        if allowed is None:   # ask the server which methods it takes, for the message
            try:
                t.auth_none(user)
            except paramiko.BadAuthenticationType as e:
                allowed = list(e.allowed_types)
            except Exception:   # any other answer just leaves the hint out
                pass
            if t.is_authenticated():   # a server that wants no credentials at all
                return
        methods = f"; the server accepts: {', '.join(allowed)}" if allowed else ""
        nothing = "nothing: set key_file, password_file or password_env, or run an ssh agent"
        raise AuthError(f"authentication as '{user}' on {o.host}:{o.port} failed (tried: "
                        f"{', '.join(tried) or nothing}"
                        f"){methods}", remote=self.name)

    def _env(self, var: str, key: str) -> str:
        val = self.env.get(var)
        if val is None:
            raise AuthError(f"environment variable {var} (remotes.{self.name}.{key}) is not set",
                            remote=self.name)
        return val

    def _load_key(self, path: str, passphrase: str | None, explicit: bool) -> Any:
        paramiko = _paramiko()
        check_resolved(path, self.name, "key_file")
        p = Path(path).expanduser()
        try:
            return paramiko.PKey.from_path(p, passphrase.encode() if passphrase is not None else None)
        except FileNotFoundError:
            raise AuthError(f"key file {p} does not exist", remote=self.name) from None
        except PermissionError:
            if not explicit:
                return None
            raise AuthError(f"key file {p} is not readable by this user", remote=self.name) from None
        except (paramiko.PasswordRequiredException, TypeError):
            if not explicit:
                return None
            raise AuthError(f"key file {p} is encrypted: set remotes.{self.name}.passphrase_file "
                            "to a file holding its passphrase, or passphrase_env to the name "
                            "of an environment variable holding it", remote=self.name) from None
        except (paramiko.SSHException, ValueError) as e:
            if not explicit:
                return None
            why = "wrong passphrase or unsupported key" if passphrase else str(e)
            raise AuthError(f"cannot load key file {p}: {why}", remote=self.name) from None

    @contextlib.contextmanager
    def _session(self, path: str) -> Iterator[w.Session]:
        """A session for one user at a time; protocol errors become syncd errors naming
        `path`, and a lost connection is transient (the next call reconnects)."""
        ss = self._take()
        try:
            self._remove_orphans(ss)
            yield ss
        except w.StatusError as e:
            raise self._status_error(e, path) from None
        except (w.WireError, struct.error) as e:   # lost, timed out, or a garbled reply
            ss.broken = True
            raise ConnectionLost(f"{e} ({self.where})", remote=self.name, path=path) from None
        finally:
            # A session left with requests in flight (an operation that failed half-way)
            # may hold open handles and unread replies: close it rather than reuse it.
            self._give(ss, not ss.broken and ss.idle)

    def _remove_orphans(self, ss: w.Session) -> None:
        """Remove the temps of uploads a lost connection cut off, now that a session is up
        again: within the same run, not at the next full reconcile. A name that was
        published or removed meanwhile is simply not there any more (temp names are
        unique per attempt, so nothing else can carry one)."""
        with self._lock:
            if not self._orphans:
                return
            todo, self._orphans = self._orphans, set()
        try:
            ss.discard([ss.remove(p) for p in sorted(todo)])
        except BaseException:
            with self._lock:
                self._orphans |= todo
            raise
        self.log.info("sftp_temps_removed", remote=self.name, count=len(todo))

    def prepare(self) -> None:
        """Start connecting in the background (uploads are coming); errors are left for
        the first real call to meet and report."""
        def connect() -> None:
            with contextlib.suppress(Exception):
                self._give(self._take(), True)

        threading.Thread(target=connect, name=f"connect-{self.name}", daemon=True).start()

    def _after_fork(self) -> None:
        """In a forked child: the parent's connections (if any) belong to the parent. Forget
        them without a word on the wire (closing one would hang up on the parent's session)
        and start over with fresh locks (another thread may have held them at fork time)."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._free = threading.Condition(self._lock)
        _INHERITED.extend(self._conns)   # never freed here: see _INHERITED
        self._conns = []   # a session of theirs given back here is dropped, not pooled
        self._connecting = 0
        self._failed = (0, None)
        self._orphans = set()   # the parent's to remove

    @property
    def _transport(self) -> Any:
        """The first live connection's transport (None before connecting)."""
        return self._conns[0].transport if self._conns else None

    def _take(self) -> w.Session:
        ss = self._take_session()
        if self.root:
            return ss
        try:   # the canonical root, once; a failure leaves it unset
            canon = ss.realpath_name(ss.realpath(self.o.root.encode()))
            self.root = canon.rstrip(b"/") or b"/"
        except w.StatusError as e:
            self._give(ss, True)
            if e.code == w.NO_SUCH_FILE:
                raise UnavailableError(f"root directory {self.o.root} does not exist on "
                                       f"{self.where}; syncd never creates a remote root",
                                       remote=self.name) from None
            raise UnavailableError(f"root directory {self.o.root} on {self.where}: {e}",
                                   remote=self.name) from None
        except (w.WireError, struct.error) as e:
            ss.broken = True
            self._give(ss, False)
            raise ConnectionLost(f"{e} ({self.where})", remote=self.name) from None
        return ss

    def _take_session(self) -> w.Session:
        """An idle channel, a new channel, or a new connection, in the order that spreads
        concurrent users over up to `connections` SSH connections: each has its own
        server process, and one connection's server is the bottleneck of a busy sync.
        Connecting happens outside the lock: other workers keep taking and returning
        channels meanwhile."""
        if self._pid != os.getpid():
            self._after_fork()
        while True:
            with self._lock:
                c = self._pick()
                if isinstance(c, w.Session):
                    return c
                if c is not None:
                    break
                self._connecting += 1
            try:
                t = self._connect()
            except BaseException as e:
                with self._lock:
                    self._connecting -= 1
                    self._free.notify_all()
                    if isinstance(e, RemoteError):
                        # Those waiting for this attempt (no connection up) get its error
                        # instead of each paying another timeout.
                        self._failed = (self._failed[0] + 1, e)
                    if not isinstance(e, RemoteError) or not self._conns:
                        raise
                    # Refused while others are up (MaxStartups, a per-user login limit, a
                    # timeout): go on with the ones we have for a while, then try again.
                    self._capped = len(self._conns)
                    self._cap_until = time.monotonic() + CONNECTION_RETRY_S
                    level = "warning" if isinstance(e, (HostKeyError, AuthError)) else "info"
                    getattr(self.log, level)("sftp_connections_capped", remote=self.name,
                                             connections=len(self._conns), error=e.reason,
                                             retry_in_s=CONNECTION_RETRY_S)
                continue
            with self._lock:
                self._connecting -= 1
                c = _Conn(t)
                c.sessions = 1
                self._conns.append(c)
                self._free.notify_all()
            break
        try:
            ss = self._open_session(c)
        except BaseException:
            with self._lock:
                if c in self._conns:
                    c.sessions -= 1
                    self._free.notify()
            raise
        ss.conn = c   # type: ignore[attr-defined]
        return ss

    def _pick(self) -> w.Session | _Conn | None:
        """With the lock held: an idle session; or a connection with a channel reserved
        on it (the caller opens it); or None: the caller opens a new connection. Waits
        while everything is busy or the first connection is being made."""
        failed = self._failed[0]
        while True:
            for c in [c for c in self._conns if not c.transport.is_active()]:
                self._drop_conn(c)
            err = self._failed[1]
            if self._failed[0] != failed and not self._conns and err is not None:
                raise type(err)(err.reason, remote=err.remote, path=err.path)
            cap = self._max_conns if time.monotonic() >= self._cap_until else self._capped
            conns = sorted(self._conns, key=_Conn.busy)
            c = conns[0] if conns else None
            room = len(conns) + self._connecting < cap
            if c is None:
                if not self._connecting:
                    return None
            elif c.idle and (c.busy() == 0 or not room):
                return c.idle.pop()
            elif c.busy() > 0 and room:
                return None
            elif c.sessions < self._max_sessions:
                c.sessions += 1
                return c
            elif c.idle:
                return c.idle.pop()
            self._free.wait(self.o.timeout)

    def _open_session(self, c: _Conn) -> w.Session:
        paramiko = _paramiko()
        try:
            ch = c.transport.open_session(window_size=16 << 20, max_packet_size=256 << 10,
                                          timeout=self.o.timeout)
            ch.settimeout(self.o.timeout)
            # paramiko waits for the answer to a channel request without a time limit: a
            # server that never answers would hold this thread forever. Past the timeout
            # the connection is closed, which ends the wait with an error.
            timer = threading.Timer(self.o.timeout, c.transport.close)
            timer.daemon = True
            timer.start()
            try:
                ch.invoke_subsystem("sftp")
            finally:
                timer.cancel()
            if not c.transport.is_active():
                raise EOFError(f"no answer to the SFTP subsystem request within "
                               f"{self.o.timeout:g} s")
        except paramiko.ChannelException as e:
            with self._lock:   # the server caps sessions per connection: use fewer
                self._max_sessions = max(1, c.sessions - 1)
            raise TransientError(f"server refused another SFTP channel: {e}",
                                 remote=self.name) from None
        except (paramiko.SSHException, OSError, EOFError) as e:
            # The connection is gone even where paramiko has not noticed yet (3.5 and 4.0
            # keep it "active" a while): closed, the next call connects afresh.
            c.transport.close()
            raise ConnectionLost(f"opening an SFTP channel on {self.where} failed: "
                                 f"{str(e) or type(e).__name__}", remote=self.name) from None
        ss = w.Session(ch)
        ss.sender = DataSender.for_channel(ch, self.log)
        try:
            ss.start()
        except w.WireError as e:
            ss.close_channel()
            raise ConnectionLost(f"SFTP subsystem on {self.where} failed to start: {e} (is "
                                 "'Subsystem sftp' enabled in sshd_config?)",
                                 remote=self.name) from None
        if self.caps.mtimes and not ss.has_lsetstat:
            # Without lsetstat@openssh.com no attribute is set alone (set_attrs): a touch
            # then is nothing to sync, as on S3 (a chmod still sends the whole file).
            self.caps = replace(self.caps, mtimes=False)
        return ss

    def _give(self, ss: w.Session, reusable: bool) -> None:
        with self._lock:
            c: _Conn | None = getattr(ss, "conn", None)
            if c is not None and c in _INHERITED:
                _INHERITED.append(ss)   # the parent's: not a word on its connection
            elif c is None or c not in self._conns:   # its connection was dropped
                ss.close_channel()
            elif reusable and not ss.broken:
                c.idle.append(ss)
            else:
                ss.close_channel()
                c.sessions -= 1
                # A broken channel usually means a dead connection. One that timed out
                # may sit on a hung server process or a black-holed path that paramiko
                # cannot see (keepalives expect no reply): every later call on it would
                # time out too, so it goes as well, and the next call connects anew.
                if ss.broken and (ss.timed_out or not c.transport.is_active()):
                    self._drop_conn(c)
            self._free.notify()

    def _drop_conn(self, c: _Conn) -> None:
        for ss in c.idle:
            ss.close_channel()
        c.idle.clear()
        if c in self._conns:
            self._conns.remove(c)
        with contextlib.suppress(Exception):
            c.transport.close()

    def close(self) -> None:
        with self._lock:
            for c in list(self._conns):
                self._drop_conn(c)

    # --- errors and paths ------------------------------------------------------------------

    def _status_error(self, e: w.StatusError, path: str, writing: bool = False) -> RemoteError:
        """`writing`: the failed request created or wrote something (open for writing,
        write, setstat, close, mkdir), where a bare failure is most often a full disk."""
        msg = f"{e} ({self.where})"
        if e.code == w.FAILURE and (not e.message or e.message.lower() == "failure"):
            # SFTP v3 has no finer status: OpenSSH's server answers a bare "Failure" for
            # every errno it does not map, so say which ones those usually are.
            msg += (": the server gave no reason; usually its disk or quota is full, its "
                    "file system is read-only, or it hit an I/O error; check the server"
                    if writing else
                    ": the server gave no reason (OpenSSH's server says this when the "
                    "target exists or is a non-empty directory, when its file system is "
                    "full or read-only, or on an I/O error); look at that path on the server")
        if e.code == w.NO_SUCH_FILE:
            return NotFound(msg, remote=self.name, path=path)
        if e.code in (w.NO_CONNECTION, w.CONNECTION_LOST):
            return ConnectionLost(msg, remote=self.name, path=path)
        return PermanentError(msg, remote=self.name, path=path)

    def _abs(self, rel: str) -> bytes:
        if not rel:
            return self.root
        # A chrooted account's root is "/": no "//" (REALPATH would never give it back).
        sep = b"" if self.root.endswith(b"/") else b"/"
        return self.root + sep + rel.encode("utf-8", "surrogateescape")

    def _check_dirs(self, ss: w.Session, dirs: set[str], create: bool) -> dict[str, RemoteError]:
        """Make sure each directory (relative) is a real directory under the root, with no
        symlink on the way: REALPATH must give back exactly root/dir. Missing ones are
        created when `create`. Returns the directories that failed, with why."""
        bad: dict[str, RemoteError] = {}
        todo = sorted(d for d in dirs if d)
        # REALPATH resolves every symlink on the way (and allows a missing last component);
        # LSTAT says whether the directory itself exists and is one. Both in one round trip.
        rids = [(d, ss.realpath(self._abs(d)), ss.lstat(self._abs(d))) for d in todo]
        missing: list[str] = []
        for d, rp_rid, st_rid in rids:
            try:
                got = ss.realpath_name(rp_rid)
            except w.StatusError as e:
                ss.discard([st_rid])
                if e.code == w.NO_SUCH_FILE:
                    missing.append(d)
                else:
                    bad[d] = self._status_error(e, d)
                continue
            try:
                kind = ss.attrs(st_rid).kind
            except w.StatusError as e:
                if got != self._abs(d):
                    kind = w.S_IFLNK      # leads elsewhere: refused below
                elif e.code == w.NO_SUCH_FILE:
                    missing.append(d)
                    continue
                else:
                    bad[d] = self._status_error(e, d)
                    continue
            if got != self._abs(d) or kind == w.S_IFLNK:
                bad[d] = PathEscape("a directory on the way is a symlink (or the path leads "
                                    "outside the root); refusing to follow it",
                                    remote=self.name, path=d)
            elif kind != w.S_IFDIR:
                bad[d] = Conflict(f"exists and is not a directory ({self.where})",
                                  remote=self.name, path=d)
        for d in missing:
            try:
                self._make_dirs(ss, d, create)
            except RemoteError as e:
                bad[d] = e
        return bad

    def _make_dirs(self, ss: w.Session, d: str, create: bool) -> None:
        """For a missing directory: check its deepest existing ancestor the same way as
        any parent (a symlink there is an escape), then create the rest (mkdir -p) or
        raise NotFound."""
        parts = d.split("/")
        i = len(parts) - 1
        while i > 0:
            anc = "/".join(parts[:i])
            bad = self._check_dirs(ss, {anc}, create=False)
            if anc not in bad:
                break
            if not isinstance(bad[anc], NotFound):
                raise bad[anc]
            i -= 1
        if not create:
            raise NotFound(f"no such directory ({self.where})", remote=self.name, path=d)
        for j in range(max(i, 0) + 1, len(parts) + 1):
            sub = "/".join(parts[:j])
            try:
                ss.status(ss.mkdir(self._abs(sub), w.encode_attrs(perms=0o755)))
            except w.StatusError as e:
                # Someone may have made it meanwhile: accept only a real directory.
                try:
                    a = ss.attrs(ss.lstat(self._abs(sub)))
                except w.StatusError:
                    raise self._status_error(e, sub, writing=True) from None
                if a.kind == w.S_IFLNK:
                    raise PathEscape("a directory on the way is a symlink; refusing to follow it",
                                     remote=self.name, path=sub) from None
                if a.kind != w.S_IFDIR:
                    raise Conflict(f"exists and is not a directory ({self.where})",
                                   remote=self.name, path=sub) from None

    def _parent_ok(self, ss: w.Session, path: str, create: bool) -> str:
        """Check a relative path and its parent directory; returns the parent."""
        check_rel_path(self.name, path)
        parent = path.rpartition("/")[0]
        if parent:
            bad = self._check_dirs(ss, {parent}, create)
            if parent in bad:
                err = bad[parent]
                if isinstance(err, NotFound):
                    raise NotFound(f"no such file or directory ({self.where})", remote=self.name,
                                   path=path)
                raise err
        return parent

    # --- protocol: reads --------------------------------------------------------------------

    def _entry(self, rel: str, a: w.Attrs) -> RemoteEntry:
        if a.kind == w.S_IFDIR:
            return RemoteEntry(rel, _DIR, 0, 0, DIR_FP)
        if a.kind != w.S_IFREG:
            raise Conflict("not a regular file or directory", remote=self.name, path=rel)
        size, mtime = a.size or 0, a.mtime or 0
        return RemoteEntry(rel, _FILE, size, mtime * _SEC, _fp(size, mtime))

    def stat(self, path: str) -> RemoteEntry:
        with self._session(path) as ss:
            self._parent_ok(ss, path, create=False)
            try:
                a = ss.attrs(ss.lstat(self._abs(path)))
            except w.StatusError as e:
                raise self._status_error(e, path) from None
            return self._entry(path, a)

    def list(self, prefix: str) -> Iterator[RemoteEntry]:
        """Every file and directory under root/prefix (symlinks and the pair's trash
        skipped), directories listed many at a time on one channel."""
        with self._session(prefix) as ss:
            if prefix:
                check_rel_path(self.name, prefix)
                bad = self._check_dirs(ss, {prefix}, create=False)
                if prefix in bad:
                    if isinstance(bad[prefix], NotFound):
                        return iter(())
                    raise bad[prefix]
            out = self._walk(ss, prefix)
        return iter(out)

    def _walk(self, ss: w.Session, prefix: str) -> list[RemoteEntry]:
        top = self._abs(prefix)
        out: list[RemoteEntry] = []
        todo: deque[str] = deque([""])
        inflight: deque[tuple[int, str, bytes | None]] = deque()   # rid, rel dir, handle
        closes: list[int] = []
        opened = 0
        while todo or inflight:
            while todo and opened < DIR_WINDOW:
                rel_dir = todo.popleft()
                path = top + b"/" + rel_dir.encode("utf-8", "surrogateescape") if rel_dir else top
                inflight.append((ss.opendir(path), rel_dir, None))
                opened += 1
            rid, rel_dir, handle = inflight.popleft()
            if handle is None:
                try:
                    h = ss.handle(rid)
                except w.StatusError as e:
                    opened -= 1
                    if e.code == w.NO_SUCH_FILE:   # vanished while we listed
                        continue
                    if e.code != w.PERMISSION_DENIED:
                        raise
                    if rel_dir == LOST_FOUND:
                        continue
                    raise unlistable(self.name, "/".join(x for x in (prefix, rel_dir) if x),
                                     str(e)) from None
                inflight.append((ss.readdir(h), rel_dir, h))
                continue
            names = ss.names(rid)
            if names is None:
                closes.append(ss.close(handle))
                opened -= 1
                continue
            inflight.append((ss.readdir(handle), rel_dir, handle))
            base = rel_dir + "/" if rel_dir else ""
            for raw, a in names:
                if raw in (b".", b".."):
                    continue
                name = raw.decode("utf-8", "surrogateescape")
                kind = a.kind
                if kind == w.S_IFDIR:
                    if not rel_dir and name == TRASH_DIR:
                        continue
                    rel = base + name
                    out.append(RemoteEntry(rel, _DIR, 0, 0, DIR_FP))
                    todo.append(rel)
                elif kind == w.S_IFREG:
                    size, mtime = a.size or 0, a.mtime or 0
                    out.append(RemoteEntry(base + name, _FILE, size, mtime * _SEC,
                                           f"{size}:{mtime * _SEC}"))
        ss.discard(closes)
        return out

    def _regular_file(self, ss: w.Session, path: str) -> tuple[bytes, w.Attrs]:
        """(absolute path, LSTAT attrs) of a checked path that must be a regular file."""
        self._parent_ok(ss, path, create=False)
        ap = self._abs(path)
        try:
            a = ss.attrs(ss.lstat(ap))
        except w.StatusError as e:
            raise self._status_error(e, path) from None
        if a.kind != w.S_IFREG:
            raise self._not_regular(a, path)
        return ap, a

    def _not_regular(self, a: w.Attrs, path: str) -> Conflict:
        return Conflict("a symlink is in the way" if a.kind == w.S_IFLNK
                        else "not a regular file", remote=self.name, path=path)

    def set_attrs(self, path: str, *, mode: int | None = None, mtime_ns: int | None = None,
                  expect_fp: str | None = None) -> RemoteEntry:
        return _one(self.set_attrs_many([(path, mode, mtime_ns, expect_fp)]))

    def set_attrs_many(self, items: Sequence[tuple[str, int | None, int | None, str | None]]
                       ) -> list[RemoteEntry | Exception]:
        """set_attrs for each (path, mode, mtime_ns, expect_fp), pipelined: the parents'
        checks, every LSTAT, then every LSETSTAT, each in one round trip. Per item its
        entry or error."""
        return self._batch(items, self._set_attrs_batch)

    def _batch(self, items: Sequence[tuple[Any, ...]],
               run: Callable[[w.Session, Any, list[Any]], None]
               ) -> list[RemoteEntry | Exception]:
        """`run(session, items, results)` on one session, which fills in each item's result
        (items[i][0] is its path); per item its RemoteEntry or error."""
        results: list[RemoteEntry | Exception | None] = [None] * len(items)
        try:
            with self._session(items[0][0] if items else "") as ss:
                run(ss, items, results)
        except RemoteError as e:   # the connection went: everything unfinished is retried
            for i, r in enumerate(results):
                if r is None:
                    _fail(results, i, e, items[i][0])
        return [r if r is not None else PermanentError("not attempted", remote=self.name)
                for r in results]

    def _checked(self, ss: w.Session, paths: Sequence[str],
                 results: list[RemoteEntry | Exception | None], create: bool) -> list[int]:
        """Positions of the paths that are valid and whose parent directory is a real one
        under the root (made when `create`); the others get their error in `results`."""
        parents: dict[int, str] = {}
        for i, path in enumerate(paths):
            try:
                check_rel_path(self.name, path)
            except PathEscape as e:
                results[i] = e
                continue
            parents[i] = path.rpartition("/")[0]
        bad = self._check_dirs(ss, set(parents.values()), create=create)
        return [i for i, parent in parents.items()
                if not _fail(results, i, bad.get(parent), paths[i])]

    def _set_attrs_batch(self, ss: w.Session,
                         items: Sequence[tuple[str, int | None, int | None, str | None]],
                         results: list[RemoteEntry | Exception | None]) -> None:
        # Plain SETSTAT follows a symlink: one swapped in after the LSTAT would be
        # followed. lsetstat@openssh.com does not. Without it, nothing is changed: the
        # caller sends the whole file (a rename replaces a symlink, never follows it).
        if not ss.has_lsetstat:
            for i, (path, *_) in enumerate(items):
                results[i] = PermanentError(
                    "the server cannot change attributes without following symlinks (no "
                    f"lsetstat@openssh.com; {self.where})", remote=self.name, path=path)
            return
        ok = self._checked(ss, [it[0] for it in items], results, create=False)
        looks = [(i, ss.lstat(self._abs(items[i][0]))) for i in ok]
        changes = []
        for i, rid in looks:
            path, mode, mtime_ns, expect_fp = items[i]
            try:
                a = ss.attrs(rid)
            except w.StatusError as e:
                results[i] = self._status_error(e, path)
                continue
            if a.kind != w.S_IFREG:
                results[i] = self._not_regular(a, path)
                continue
            if expect_fp is not None and self._entry(path, a).fp != expect_fp:
                results[i] = RemoteChanged("the file changed since the plan", remote=self.name,
                                           path=path)
                continue
            mtime = None if mtime_ns is None else mtime_ns // _SEC
            attrs = w.encode_attrs(perms=None if mode is None else mode & 0o777, mtime=mtime)
            # Read back in the same round trip: the entry is what the server stored (a
            # time it wrapped or rounded included), as its listings will show it.
            ap = self._abs(path)
            changes.append((i, ss.lsetstat(ap, attrs), ss.lstat(ap)))
        for i, set_rid, look_rid in changes:
            path = items[i][0]
            try:
                ss.status(set_rid)
            except w.StatusError as e:
                ss.discard([look_rid])
                results[i] = self._status_error(e, path, writing=True)
                continue
            try:
                a = ss.attrs(look_rid)
            except w.StatusError as e:   # gone right after the change
                results[i] = self._status_error(e, path)
                continue
            results[i] = self._entry(path, a) if a.kind == w.S_IFREG else RemoteChanged(
                "the file was replaced meanwhile", remote=self.name, path=path)

    def get(self, path: str, dest: str) -> RemoteEntry:
        with self._session(path) as ss:
            ap, a = self._regular_file(ss, path)
            h = ss.handle(ss.open(ap, w.O_READ))
            try:
                a = ss.attrs(ss.fstat(h))
                if a.kind != w.S_IFREG:   # swapped between lstat and open
                    raise Conflict("not a regular file", remote=self.name, path=path)
                size = self._read_into(ss, h, dest, path, a.size or 0)
            finally:
                if not ss.broken:
                    ss.discard([ss.close(h)])
            return RemoteEntry(path, _FILE, size, (a.mtime or 0) * _SEC, _fp(size, a.mtime or 0))

    def _read_into(self, ss: w.Session, h: bytes, dest: str, path: str, hint: int) -> int:
        """Pipelined READs into `dest`; `hint` (the size fstat gave) bounds how far ahead
        to ask. A short read means end of file, or a server that reads less per request:
        then the rest is asked for again from where it stopped."""
        n = ss.max_read
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise PermanentError(f"cannot write local file {dest}: {e.strerror}",
                                 path=path) from None
        try:
            off = end = 0
            pending: deque[tuple[int, int]] = deque()
            while True:
                while len(pending) < READ_WINDOW and (off <= hint or not pending):
                    pending.append((ss.read(h, off, n), off))
                    off += n
                rid, at = pending.popleft()
                data = ss.data(rid)
                if data:
                    os.pwrite(fd, data, at)
                    end = max(end, at + len(data))
                if len(data) == n:
                    continue
                ss.discard([r for r, _ in pending])
                pending.clear()
                if not data:
                    break
                off = at + len(data)
            os.ftruncate(fd, end)
            os.fsync(fd)
            return end
        except OSError as e:
            raise PermanentError(f"cannot write local file {dest}: {e.strerror}",
                                 path=path) from None
        finally:
            os.close(fd)

    # --- protocol: writes -------------------------------------------------------------------

    def mkdir(self, path: str) -> RemoteEntry:
        check_rel_path(self.name, path)
        with self._session(path) as ss:
            bad = self._check_dirs(ss, {path}, create=True)
            if path in bad:
                raise bad[path]
        return RemoteEntry(path, _DIR, 0, 0, DIR_FP)

    def put(self, path: str, source: Source) -> RemoteEntry:
        return _one(self.put_many([(path, source)]))

    def put_many(self, items: Sequence[tuple[str, Source]]) -> list[RemoteEntry | Exception]:
        """Upload several files with their requests interleaved on one channel: all temp
        files opened at once, written, stamped and closed at once, then each one whose
        bytes were confirmed is renamed into place. Per item: its RemoteEntry or error."""
        return self._batch(items, self._put_batch)

    def _put_batch(self, ss: w.Session, items: Sequence[tuple[str, Source]],
                   results: list[RemoteEntry | Exception | None]) -> None:
        live = self._checked(ss, [path for path, _ in items], results, create=True)
        tmps = {i: self._tmp(items[i][0]) for i in live}
        try:
            self._put_temps(ss, items, results, live, tmps)
        except BaseException:
            # Cut off part-way (the connection lost, a stop): this batch's temps may be on
            # the server. The next session removes them (see _remove_orphans).
            with self._lock:
                self._orphans.update(tmps.values())
            raise

    def _put_temps(self, ss: w.Session, items: Sequence[tuple[str, Source]],
                   results: list[RemoteEntry | Exception | None], live: list[int],
                   tmps: dict[int, bytes]) -> None:
        # 1. open every temp file exclusively (O_EXCL never follows a planted symlink);
        #    a leftover temp of ours is removed and opened again.
        flags = w.O_WRITE | w.O_CREAT | w.O_EXCL
        attrs = w.encode_attrs(perms=0o600)
        handles: dict[int, bytes] = {}
        rids = [(i, ss.open(tmps[i], flags, attrs)) for i in live]
        retry = []
        for i, rid in rids:
            try:
                handles[i] = ss.handle(rid)
            except w.StatusError as e:
                if e.code == w.FAILURE:      # exists: a temp left by a crash
                    retry.append(i)
                else:
                    results[i] = self._open_error(e, items[i][0])
        if retry:
            removes = [ss.remove(tmps[i]) for i in retry]
            rids = [(i, ss.open(tmps[i], flags, attrs)) for i in retry]
            ss.discard(removes)
            for i, rid in rids:
                try:
                    handles[i] = ss.handle(rid)
                except w.StatusError as e:
                    results[i] = self._open_error(e, items[i][0])

        # 2. stream, verify the source, stamp, confirm size and close.
        done: dict[int, tuple[list[int], int, int]] = {}   # i -> (status rids, fstat rid, close)
        for i in [i for i in live if i in handles]:
            path, src = items[i]
            h = handles[i]
            try:
                writes = self._stream(ss, h, src)
                src.verify()
            except (SourceChanged, RemoteError) as e:
                results[i] = e
                ss.discard([ss.close(h), ss.remove(tmps[i])])
                continue
            except w.StatusError as e:
                results[i] = self._status_error(e, path, writing=True)
                ss.discard([ss.close(h), ss.remove(tmps[i])])
                continue
            stamp = w.encode_attrs(perms=src.mode & 0o777, mtime=src.mtime_ns // _SEC)
            rids2 = [ss.fsetstat(h, stamp)]
            if self.o.fsync and "fsync@openssh.com" in ss.extensions:
                rids2.append(ss.fsync(h))
            done[i] = (writes + rids2, ss.fstat(h), ss.close(h))
        confirmed: dict[int, w.Attrs] = {}
        for i, (status_rids, fstat_rid, close_rid) in done.items():
            path, src = items[i]
            try:
                for rid in status_rids:
                    ss.status(rid)
                a = ss.attrs(fstat_rid)
                ss.status(close_rid)
            except w.StatusError as e:
                ss.discard([*status_rids, fstat_rid, close_rid])
                results[i] = self._status_error(e, path, writing=True)
                ss.discard([ss.remove(tmps[i])])
                continue
            # A server that leaves the size out of its reply cannot confirm it: the write
            # statuses did (every byte was acknowledged); the entry then records size 0,
            # as that server's listings will.
            if a.size is not None and a.size != src.sent:
                results[i] = TransientError(f"server stored {a.size} bytes, sent {src.sent}",
                                            remote=self.name, path=path)
                ss.discard([ss.remove(tmps[i])])
                continue
            confirmed[i] = a

        # 3. publish: rename each confirmed temp over its target.
        renames = [(i, ss.rename(tmps[i], self._abs(items[i][0]))) for i in confirmed]
        fallback = []
        for i, rid in renames:
            path = items[i][0]
            try:
                ss.status(rid)
            except w.StatusError as e:
                if e.code == w.FAILURE and not ss.atomic_rename:
                    fallback.append(i)   # plain RENAME refuses to replace: remove, then rename
                    continue
                results[i] = self._publish_error(ss, e, path)
                ss.discard([ss.remove(tmps[i])])
                continue
            results[i] = self._entry(path, confirmed[i])
        for i in fallback:
            path = items[i][0]
            try:
                ss.discard([ss.remove(self._abs(path))])
                ss.status(ss.rename(tmps[i], self._abs(path)))
                results[i] = self._entry(path, confirmed[i])
            except w.StatusError as e:
                results[i] = self._publish_error(ss, e, path)
                ss.discard([ss.remove(tmps[i])])

    def _open_error(self, e: w.StatusError, path: str) -> RemoteError:
        if e.code == w.NO_SUCH_FILE:   # its folder, checked a moment ago, was removed since
            return TransientError(f"the folder vanished during the upload ({self.where}); "
                                  "it is made again on the retry", remote=self.name, path=path)
        return self._status_error(e, path, writing=True)

    def _publish_error(self, ss: w.Session, e: w.StatusError, path: str) -> RemoteError:
        """A failed rename onto `path`: a directory in the way is a Conflict."""
        with contextlib.suppress(w.StatusError):
            if ss.attrs(ss.lstat(self._abs(path))).kind == w.S_IFDIR:
                return Conflict(f"a directory is in the way ({self.where})", remote=self.name,
                                path=path)
        return self._status_error(e, path)

    def _stream(self, ss: w.Session, h: bytes, src: Source) -> list[int]:
        """Send the source's bytes as pipelined WRITEs; returns the ids still unconfirmed.
        At most WRITE_WINDOW writes are in flight, so a large file streams in constant
        memory; their statuses are checked as they come back."""
        n = ss.max_write
        off = 0
        pending: deque[int] = deque()
        while True:
            data = src.read(n)
            if not data:
                break
            pending.append(ss.write(h, off, data))
            off += len(data)
            while len(pending) >= WRITE_WINDOW:
                ss.status(pending.popleft())
        return list(pending)

    def _tmp(self, path: str) -> bytes:
        parent, _, name = path.rpartition("/")
        tmp = temp_name(name, self.tmp_owner)
        return self._abs(f"{parent}/{tmp}" if parent else tmp)

    def delete(self, paths: Sequence[str]) -> None:
        if not paths:
            return
        for p in paths:
            check_rel_path(self.name, p)
        with self._session(paths[0]) as ss:
            bad = self._check_dirs(ss, {p.rpartition("/")[0] for p in paths}, create=False)
            for p in paths:
                e = bad.get(p.rpartition("/")[0])
                if e is not None and not isinstance(e, NotFound):
                    raise type(e)(e.reason, remote=self.name, path=p)
            rids = [(p, ss.remove(self._abs(p))) for p in paths
                    if p.rpartition("/")[0] not in bad]
            first: RemoteError | None = None
            for p, rid in rids:
                try:
                    ss.status(rid)
                except w.StatusError as e:
                    if e.code != w.NO_SUCH_FILE:
                        first = first or self._publish_error(ss, e, p)
            if first is not None:
                raise first

    def rmdir(self, path: str) -> bool:
        with self._session(path) as ss:
            try:
                self._parent_ok(ss, path, create=False)
            except NotFound:
                return True
            ap = self._abs(path)
            try:
                a = ss.attrs(ss.lstat(ap))
            except w.StatusError as e:
                if e.code == w.NO_SUCH_FILE:
                    return True
                raise
            if a.kind != w.S_IFDIR:
                raise Conflict("not a directory", remote=self.name, path=path)
            try:
                ss.status(ss.rmdir(ap))
            except w.StatusError as e:
                if e.code == w.NO_SUCH_FILE:
                    return True
                if e.code == w.FAILURE:   # not empty (OpenSSH maps ENOTEMPTY to FAILURE)
                    return False
                raise
            return True

    def move(self, src: str, dst: str) -> str:
        """Plain SFTP RENAME, never posix-rename: it fails on an existing target (OpenSSH
        links the new name, then unlinks the old), and then the next free name is tried."""
        with self._session(f"{src} -> {dst}") as ss:
            self._parent_ok(ss, src, create=False)
            self._parent_ok(ss, dst, create=True)
            for target in names_for(self.name, dst):
                try:
                    ss.status(ss.rename_noreplace(self._abs(src), self._abs(target)))
                    return target
                except w.StatusError as e:
                    if e.code != w.FAILURE:
                        raise
                    try:   # FAILURE: the target exists, or a reason of the server's own
                        ss.attrs(ss.lstat(self._abs(target)))
                    except w.StatusError:
                        raise e from None
        raise AssertionError("unreachable: names_for raises when it runs out")


def _one(results: list[RemoteEntry | Exception]) -> RemoteEntry:
    """The single result of a batch of one, raised if it is an error."""
    r = results[0]
    if isinstance(r, Exception):
        raise r
    return r


def _fail(results: list[Any], i: int, err: RemoteError | None, path: str) -> bool:
    if err is None:
        return False
    results[i] = type(err)(err.reason, remote=err.remote, path=path)
    return True


def _names_host(patterns: list[str], names: list[str]) -> bool:
    """Whether a known_hosts line's host field names one of `names`: plainly, or hashed
    (|1|salt|hash, OpenSSH's HashKnownHosts) as HostKeys.hash_host computes it."""
    import hmac

    from paramiko.hostkeys import HostKeys

    for p in patterns:
        for name in names:
            if p == name or (p.startswith("|1|") and hmac.compare_digest(
                    HostKeys.hash_host(name, p), p)):
                return True
    return False


def _paramiko() -> Any:
    """Import paramiko without `invoke`: paramiko.config imports it (65 ms, 40% of the
    import) only for `Match exec` in ssh_config files, which syncd never reads. A None in
    sys.modules makes that optional import fail fast, as paramiko expects when it is not
    installed. Only done when nothing imported invoke already."""
    import sys

    if "paramiko" not in sys.modules and "invoke" not in sys.modules:
        sys.modules["invoke"] = None  # type: ignore[assignment]
        try:
            import paramiko
        finally:
            del sys.modules["invoke"]
    import paramiko

    return paramiko


def _login_name() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:   # no user name in the environment or passwd: let the server refuse
        return str(os.getuid())


__all__ = ["SFTPOptions", "SFTPRemote", "fingerprint"]


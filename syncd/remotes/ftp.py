"""The `ftp` remote: an FTP or FTPS server through the standard library's ftplib. TLS by
default (explicit AUTH TLS or implicit, certificates and host names verified, data channel
protected with PROT P), files published atomically (STOR to a temp name, then RNFR/RNTO),
large uploads resumable (APPE from the temp file's size), a small pool of control
connections kept alive with NOOP.
"""

from __future__ import annotations

import calendar
import contextlib
import ftplib
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from syncd import log as slog
from syncd.credentials import read_secret_file
from syncd.errors import (
    AuthError,
    Conflict,
    ConnectionLost,
    NotFound,
    PermanentError,
    RemoteError,
    SourceChanged,
    TransientError,
    UnavailableError,
)
from syncd.index import IndexError_
from syncd.listing import DIR_FP
from syncd.model import LOST_FOUND, TRASH_DIR, Kind, RemoteEntry
from syncd.remotes.base import (
    Capabilities,
    Source,
    check_rel_path,
    names_for,
    temp_name,
    unlistable,
)

if TYPE_CHECKING:
    from syncd.index import UploadLog

_FILE, _DIR = int(Kind.FILE), int(Kind.DIR)
_SEC = 1_000_000_000
KEEPALIVE_S = 30.0          # NOOP on a connection idle this long (servers drop idle ones)
STALE_S = 5.0               # a connection idle this long is checked with NOOP before use
CHUNK = 256 << 10           # bytes per receive on a data connection
SEND_CHUNK = 1 << 20        # bytes per send (1 GiB over plain FTP: 1.38 s with 256 KiB reads)
RESUME_MIN = 8 << 20        # uploads at least this big are recorded for a resume
LIST_WORKERS = 4            # directories listed at once (each over its own connection)
TLS_MODES = ("explicit", "implicit", "none")
_LIST_RE = re.compile(
    r"^(?P<kind>[-dlbcps])[-rwxsStT]{9}\S*\s+\d+\s+\S+\s+(?:\S+\s+)?(?P<size>\d+)\s+"
    r"(?P<date>[A-Za-z]{3}\s+\d{1,2}\s+(?:\d{1,2}:\d{2}|\d{4}))\s(?P<name>.+)$")


@dataclass(frozen=True, slots=True)
class FTPOptions:
    host: str
    port: int = 21
    user: str = "anonymous"
    password_env: str = ""
    password_file: str = ""
    root: str = "/"
    tls: str = "explicit"
    ca_file: str = ""
    passive: bool = True
    timeout: float = 30.0
    transfers: int = 4


class _FTPS(ftplib.FTP_TLS):
    """FTP_TLS that can start in TLS (implicit FTPS, port 990) and reuses the control
    connection's TLS session on data connections (servers such as vsftpd and FileZilla
    Server refuse a data connection that does not: `require_ssl_reuse`)."""

    implicit = False

    def connect(self, host: str = "", port: int = 0, timeout: float = -999,
                source_address: Any = None) -> str:
        if not self.implicit:
            return super().connect(host, port, timeout, source_address)
        self.host, self.port = host, port
        if timeout != -999:
            self.timeout = timeout
        sock = socket.create_connection((host, port), self.timeout)
        self.af = sock.family
        self.sock = self.context.wrap_socket(sock, server_hostname=host)
        self.file = self.sock.makefile("r", encoding=self.encoding)
        self.welcome = self.getresp()
        return self.welcome

    def ntransfercmd(self, cmd: str, rest: Any = None) -> tuple[socket.socket, int | None]:
        conn, size = ftplib.FTP.ntransfercmd(self, cmd, rest)
        _nodelay(conn)
        if self._prot_p:  # type: ignore[attr-defined]
            session = getattr(self.sock, "session", None)
            try:
                conn = self.context.wrap_socket(conn, server_hostname=self.host, session=session)
            except BaseException:
                conn.close()
                raise
        return conn, size


def _nodelay(conn: socket.socket) -> None:
    # The last small write of a transfer (TLS close_notify) must not wait for the ACK of
    # the data before it (Nagle + the server's delayed ACK: ~30 ms per file).
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Conn:
    """One logged-in control connection."""

    def __init__(self, ftp: ftplib.FTP, gen: int):
        self.ftp = ftp
        self.gen = gen
        self.used = time.monotonic()
        self.broken = False


def _mtime_str(mtime_ns: int) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(mtime_ns // _SEC))


def _parse_modify(v: str) -> int:
    """MLSD/MDTM `YYYYMMDDHHMMSS[.sss]` (UTC) -> whole seconds since the epoch. (Sliced by
    hand: time.strptime took 64 ms of a 10,000-entry listing.)"""
    v = v.strip()
    if len(v) < 14 or not v[:14].isdigit():
        return 0
    try:
        return calendar.timegm((int(v[0:4]), int(v[4:6]), int(v[6:8]), int(v[8:10]),
                                int(v[10:12]), int(v[12:14]), 0, 0, 0))
    except (ValueError, OverflowError):
        return 0


def _facts(s: str) -> dict[str, str]:
    out = {}
    for f in s.split(";"):
        k, eq, val = f.partition("=")
        if eq:
            out[k.strip().lower()] = val
    return out


def _fp(size: int, mtime_s: int) -> str:
    return f"{size}:{mtime_s * _SEC}"


class FTPRemote:
    caps = Capabilities(dirs=True, move=True, mtime_precision_ns=_SEC, atomic_put=True,
                        cpu_bound=False, resumes_temps=True)

    def __init__(self, name: str, opts: FTPOptions, env: dict[str, str] | None = None):
        self.name = name
        self.o = opts
        self.env = dict(os.environ) if env is None else env
        self.tmp_owner = ""   # set by open_remote: the state dir's tag (see temp_name)
        self.uploads: UploadLog | None = None   # set by open_remote: resumable uploads
        self.log = slog.get()
        self._reset()
        if opts.tls == "none":
            self.log.warning("ftp_insecure", remote=name, host=opts.host,
                             detail="tls = \"none\": password and files cross the network "
                                    "in clear text")

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._free = threading.Condition(self._lock)
        self._idle: list[_Conn] = []
        self._open = 0
        self._max = max(1, self.o.transfers)
        self._gen = 0
        self._dirs: set[str] = set()    # absolute directories known to exist
        # Temps of uploads a lost connection cut off, kept for no resume: removed by the
        # next connection taken, within the same run (_remove_orphans).
        self._orphans: set[str] = set()
        self._closed = threading.Event()
        self._keeper: threading.Thread | None = None
        self._ssl: ssl.SSLContext | None = None
        self.root = ""                  # absolute root on the server, from the first login
        self.features: dict[str, str] = {}
        self.listing = ""               # "MLSD" or "LIST"
        self._list_cmd = "LIST -a"

    @property
    def where(self) -> str:
        return f"{self.o.user}@{self.o.host}:{self.o.port}"

    # --- connections ------------------------------------------------------------------------

    def _context(self) -> ssl.SSLContext:
        # One per remote and process: loading the CA store costs ~10 ms per context, and
        # TLS sessions are only resumed within one context.
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=self.o.ca_file or None)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self._ssl = ctx
        return self._ssl

    def _password(self) -> str:
        if self.o.password_file:
            return read_secret_file(self.o.password_file, self.name, "password_file")
        var = self.o.password_env
        if not var:
            return "syncd@" if self.o.user == "anonymous" else ""
        if var not in self.env:
            raise AuthError(f"environment variable {var} (remotes.{self.name}.password_env) "
                            "is not set; export it, or under systemd put it in an "
                            "EnvironmentFile= of the unit", remote=self.name)
        return self.env[var]

    def _connect(self) -> ftplib.FTP:
        o = self.o
        ftp: ftplib.FTP
        if o.tls == "none":
            ftp = ftplib.FTP(timeout=o.timeout, encoding="utf-8")
        else:
            ftp = _FTPS(context=self._context(), timeout=o.timeout, encoding="utf-8")
            ftp.implicit = o.tls == "implicit"
        try:
            ftp.connect(o.host, o.port, o.timeout)
            ftp.login(o.user, self._password())
            if isinstance(ftp, ftplib.FTP_TLS):
                ftp.prot_p()
            ftp.set_pasv(o.passive)
            ftp.voidcmd("TYPE I")
            if not self.features:
                self._learn(ftp)
            if self.listing == "MLSD":
                with contextlib.suppress(ftplib.Error):
                    ftp.voidcmd("OPTS MLST type;size;modify;")
        except BaseException as e:
            with contextlib.suppress(Exception):
                ftp.close()
            if isinstance(e, Exception):
                raise self._connect_error(e) from None
            raise
        return ftp

    def _learn(self, ftp: ftplib.FTP) -> None:
        feats: dict[str, str] = {}
        with contextlib.suppress(ftplib.Error):
            for line in ftp.sendcmd("FEAT").splitlines()[1:-1]:
                name, _, arg = line.strip().partition(" ")
                feats[name.upper()] = arg
        with contextlib.suppress(ftplib.Error):   # UTF-8 names where the server needs asking
            if "UTF8" in feats:
                ftp.voidcmd("OPTS UTF8 ON")
        root = self.o.root
        if not root.startswith("/"):
            pwd = ftp.pwd().rstrip("/")
            root = f"{pwd}/{root}" if root not in ("", ".") else pwd or "/"
        self.root = root.rstrip("/") or "/"
        self.listing = "MLSD" if "MLST" in feats or "MLSD" in feats else "LIST"
        if self.listing == "LIST":
            # Most servers hide dot files (our temps, the trash) from LIST without "-a";
            # some (pyftpdlib) refuse the option and show them anyway.
            try:
                _lines(ftp, f"LIST -a {self.root}")
            except ftplib.error_perm:
                self._list_cmd = "LIST"
        self.features = feats or {"": ""}

    def _connect_error(self, e: Exception) -> RemoteError:
        o = self.o
        if isinstance(e, RemoteError):
            return e
        if isinstance(e, ssl.SSLCertVerificationError):
            return UnavailableError(
                f"TLS certificate of {o.host}:{o.port} not trusted: {e.verify_message} (set "
                "ca_file to the CA that signed it; syncd always verifies certificates)",
                remote=self.name)
        if isinstance(e, ftplib.error_perm):
            code = str(e)[:3]
            if code in ("530", "331", "332"):
                return AuthError(f"login as '{o.user}' refused by {o.host}:{o.port}: {e}",
                                 remote=self.name)
            if code in ("534", "504", "502", "500") and o.tls == "explicit":
                return UnavailableError(f"{o.host}:{o.port} refused TLS ({e}); syncd never "
                                        "falls back to clear text: enable FTPS on the server, "
                                        "or set tls = \"none\" knowingly", remote=self.name)
            return UnavailableError(f"{o.host}:{o.port}: {e}", remote=self.name)
        if isinstance(e, ftplib.error_temp):   # 421 too many connections: see _take
            return TransientError(f"{o.host}:{o.port}: {e}", remote=self.name)
        # Below: the server as a whole could not be reached or stopped answering.
        if isinstance(e, socket.gaierror):
            return ConnectionLost(f"cannot resolve host '{o.host}': {e.strerror}",
                                  remote=self.name)
        if isinstance(e, ssl.SSLError):
            return ConnectionLost(f"TLS with {o.host}:{o.port} failed: {e}", remote=self.name)
        if isinstance(e, TimeoutError):
            return ConnectionLost(f"no answer from {o.host}:{o.port} within {o.timeout:g} s "
                                  "(connecting or logging in)", remote=self.name)
        if isinstance(e, OSError | EOFError | ftplib.Error):
            why = getattr(e, "strerror", None) or str(e) or type(e).__name__
            return ConnectionLost(f"cannot connect to {o.host}:{o.port}: {why}",
                                  remote=self.name)
        return PermanentError(f"{type(e).__name__}: {e} ({self.where})", remote=self.name)

    def _take(self) -> _Conn:
        if self._pid != os.getpid():
            self._reset()   # a forked child: the parent's connections are the parent's
        while True:
            c, gen = self._slot()
            if c is None:
                try:
                    return self._new_conn(gen)
                except TransientError as e:
                    # "421 too many connections" while others are open: wait for one of
                    # those instead (_new_conn lowered the cap).
                    if "421" not in e.reason or not self._open:
                        raise
                    continue
            if time.monotonic() - c.used < STALE_S:
                return c
            try:   # idle a while: make sure the server has not hung up on it meanwhile
                c.ftp.voidcmd("NOOP")
                return c
            except Exception:
                c.broken = True
                self._give(c)

    def _slot(self) -> tuple[_Conn | None, int]:
        """An idle connection, or (None, generation) with a slot reserved for a new one."""
        with self._lock:
            while True:
                if self._idle:
                    return self._idle.pop(), self._gen
                if self._open < self._max:
                    self._open += 1
                    return None, self._gen
                self._free.wait(self.o.timeout)

    def _new_conn(self, gen: int) -> _Conn:
        try:
            ftp = self._connect()
        except BaseException as e:
            with self._lock:
                if gen == self._gen:
                    self._open -= 1
                    # "421 too many connections" while others are open: use fewer.
                    if isinstance(e, TransientError) and "421" in e.reason and self._open:
                        self._max = max(1, self._open)
                self._free.notify()
            raise
        self._start_keeper()
        return _Conn(ftp, gen)

    def _give(self, c: _Conn) -> None:
        with self._lock:
            if c.broken or c.gen != self._gen:
                self._open -= c.gen == self._gen
                with contextlib.suppress(Exception):
                    c.ftp.close()
            else:
                c.used = time.monotonic()
                self._idle.append(c)
            self._free.notify()

    def _start_keeper(self) -> None:
        with self._lock:
            if self._keeper is not None:
                return
            self._keeper = threading.Thread(target=self._keepalive, args=(self._closed,),
                                            daemon=True, name=f"ftp-noop-{self.name}")
        self._keeper.start()

    def _keepalive(self, closed: threading.Event) -> None:
        """NOOP on idle connections so servers and middleboxes keep them; a dead one is
        closed here instead of failing the next job."""
        while not closed.wait(KEEPALIVE_S / 3):
            now = time.monotonic()
            with self._lock:
                stale = [c for c in self._idle if now - c.used >= KEEPALIVE_S]
                for c in stale:
                    self._idle.remove(c)
            for c in stale:
                try:
                    c.ftp.voidcmd("NOOP")
                except Exception:
                    c.broken = True
                self._give(c)

    @contextlib.contextmanager
    def _conn(self, path: str) -> Iterator[ftplib.FTP]:
        """A control connection for one user at a time; ftplib's errors become syncd errors
        naming `path`, and a lost connection is transient (the next call reconnects)."""
        c = self._take()
        try:
            self._remove_orphans(c.ftp)
            yield c.ftp
        except RemoteError:
            raise
        except ftplib.error_perm as e:
            raise self._reply_error(e, path) from None
        except ftplib.error_temp as e:
            if str(e).startswith("421"):   # the server is closing this connection
                c.broken = True
                raise ConnectionLost(f"{e} ({self.where})", remote=self.name,
                                     path=path) from None
            raise TransientError(f"{e} ({self.where})", remote=self.name, path=path) from None
        except (OSError, EOFError, ftplib.Error) as e:   # lost, timed out, garbled, TLS
            c.broken = True
            why = (f"no answer within {self.o.timeout:g} s" if isinstance(e, TimeoutError)
                   else getattr(e, "strerror", None) or str(e) or type(e).__name__)
            raise ConnectionLost(f"connection to {self.where} lost: {why}", remote=self.name,
                                 path=path) from None
        except BaseException:
            c.broken = True   # interrupted mid-command: the reply stream is out of step
            raise
        finally:
            self._give(c)

    def _remove_orphans(self, ftp: ftplib.FTP) -> None:
        """Remove the temps of uploads a lost connection cut off, now that a connection is
        up again. A name published or removed meanwhile is simply gone (temp names are
        unique per attempt); a refusal leaves it to the next reconcile's cleanup."""
        with self._lock:
            if not self._orphans:
                return
            todo, self._orphans = self._orphans, set()
        removed = 0
        for tmp in sorted(todo):
            try:
                ftp.delete(tmp)
                removed += 1
            except ftplib.error_perm:   # 550: not there (published, or never created)
                pass
            except BaseException:
                with self._lock:
                    self._orphans |= todo
                raise
        if removed:
            self.log.info("ftp_temps_removed", remote=self.name, count=removed)

    def _reply_error(self, e: ftplib.Error, path: str) -> RemoteError:
        msg = f"{e} ({self.where})"
        if str(e).startswith("530"):
            return AuthError(msg, remote=self.name, path=path)
        return PermanentError(msg, remote=self.name, path=path)

    def close(self) -> None:
        """Log out of idle connections; connections in use are closed when given back.
        The remote stays usable (a later call connects again)."""
        with self._lock:
            self._closed.set()
            self._closed, self._keeper = threading.Event(), None
            idle, self._idle = self._idle, []
            self._gen += 1
            self._open = 0
        for c in idle:
            with contextlib.suppress(Exception):
                c.ftp.quit()
            with contextlib.suppress(Exception):
                c.ftp.close()

    # --- paths ------------------------------------------------------------------------------

    def _abs(self, rel: str, root_ok: bool = False) -> str:
        if not (root_ok and not rel):
            check_rel_path(self.name, rel)
            if "\n" in rel or "\r" in rel:
                raise PermanentError("FTP commands cannot carry a name with a line break; "
                                     "rename the file or add it to the pair's ignore",
                                     remote=self.name, path=rel)
        if not self.root:   # learned at the first login
            with self._conn(rel):
                pass
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def _stat(self, ftp: ftplib.FTP, ap: str, is_file: bool = False,
              ) -> tuple[int, int, int] | None:
        """(kind, size, mtime_s) of an absolute path, None if nothing is there; symlinks and
        other kinds are reported as -1. `is_file`: known to be a file, so with LIST only
        that file is listed, not its whole directory (a fresh upload in a big one)."""
        if self.listing == "MLSD":
            try:
                resp = ftp.sendcmd(f"MLST {ap}")
            except ftplib.error_perm as e:
                if str(e).startswith(("550", "501")):
                    return None
                raise
            for line in resp.split("\n")[1:]:   # not splitlines(): see _lines
                if line.startswith(" "):
                    return self._kind_of(_facts(line.strip().partition(" ")[0]))
            return None
        parent, _, name = ap.rpartition("/")
        if is_file:
            one = self._list_dir(ftp, ap)
            if len(one) == 1 and one[0][1] == _FILE and one[0][0] in (name, ap):
                return one[0][1:]
        for n, kind, size, stamp in self._list_dir(ftp, parent or "/"):
            if n == name:
                return kind, size, stamp
        return None

    @staticmethod
    def _kind_of(f: dict[str, str]) -> tuple[int, int, int]:
        t = f.get("type", "").lower()
        kind = _FILE if t == "file" else _DIR if t in ("dir", "cdir", "pdir") else -1
        size = int(f["size"]) if f.get("size", "").isdigit() else 0
        return kind, size, _parse_modify(f.get("modify", ""))

    def _list_dir(self, ftp: ftplib.FTP, ap: str) -> list[tuple[str, int, int, int]]:
        """(name, kind, size, mtime_s or LIST's date hash) of each entry of one directory."""
        out: list[tuple[str, int, int, int]] = []
        if self.listing == "MLSD":
            for line in _lines(ftp, f"MLSD {ap}"):
                facts, _, name = line.partition(" ")
                if not name or name in (".", ".."):
                    continue
                f = _facts(facts)
                if f.get("type", "").lower() in ("cdir", "pdir"):
                    continue   # the directory itself and its parent
                out.append((name, *self._kind_of(f)))
            return out
        for line in _lines(ftp, f"{self._list_cmd} {ap}"):
            m = _LIST_RE.match(line)
            if not m or m["name"] in (".", ".."):
                continue
            k = m["kind"]
            kind = _FILE if k == "-" else _DIR if k == "d" else -1
            # LIST dates are not an mtime (minutes or a year, maybe local time): their
            # month and day serve in the fingerprint with the size (see _date_key).
            out.append((m["name"], kind, int(m["size"]), _date_key(m["date"])))
        return out

    def _entry(self, rel: str, kind: int, size: int, stamp: int) -> RemoteEntry:
        if kind == _DIR:
            return RemoteEntry(rel, _DIR, 0, 0, DIR_FP)
        mtime_ns = stamp * _SEC if self.listing == "MLSD" else 0
        return RemoteEntry(rel, _FILE, size, mtime_ns, _fp(size, stamp))

    # --- protocol: reads ----------------------------------------------------------------------

    def check(self) -> None:
        """Connect, log in and make sure the root exists; errors say which and why."""
        try:
            with self._conn("") as ftp:
                st = self._stat(ftp, self.root) if self.root != "/" else (_DIR, 0, 0)
        except UnavailableError:
            raise
        except RemoteError as e:
            raise UnavailableError(e.reason, remote=self.name) from None
        if st is None:
            raise UnavailableError(f"root directory {self.o.root} does not exist on "
                                   f"{self.where}; syncd never creates a remote root",
                                   remote=self.name)
        if st[0] != _DIR:
            raise UnavailableError(f"root {self.o.root} on {self.where} is not a directory",
                                   remote=self.name)

    def describe(self) -> dict[str, Any]:
        """What the server offers, for `syncd config check --connect`."""
        self.check()
        return {"listing": self.listing, "mfmt": "MFMT" in self.features,
                "tls": self.o.tls, "root": self.root}

    def stat(self, path: str) -> RemoteEntry:
        ap = self._abs(path)
        with self._conn(path) as ftp:
            st = self._stat(ftp, ap)
        if st is None:
            raise NotFound("no such file", remote=self.name, path=path)
        if st[0] not in (_FILE, _DIR):
            raise Conflict("not a regular file or directory", remote=self.name, path=path)
        return self._entry(path, *st)

    def list(self, prefix: str) -> Iterator[RemoteEntry]:
        """Every file and directory under root/prefix (symlinks and the pair's trash
        skipped), several directories listed at once over the connection pool."""
        top = self._abs(prefix, root_ok=True)
        with self._conn(prefix) as ftp:
            st = self._stat(ftp, top) if prefix else (_DIR, 0, 0)
        if st is None:
            return iter(())
        if st[0] != _DIR:
            raise Conflict("not a directory", remote=self.name, path=prefix)
        out: list[RemoteEntry] = []
        level = [""]

        def one(rel_dir: str) -> list[tuple[str, int, int, int]]:
            with self._conn(rel_dir or prefix) as ftp:
                try:
                    return self._list_dir(ftp, f"{top}/{rel_dir}" if rel_dir else top)
                except ftplib.error_perm as e:
                    if not str(e).startswith("550"):
                        raise
                    # 550 is also "cannot be read": a folder still there that we may not
                    # list (an upload-only drop box) must not look empty, or its files
                    # are sent again on every run.
                    if rel_dir and self._stat(ftp, f"{top}/{rel_dir}") is not None:
                        if rel_dir == LOST_FOUND:
                            return []
                        raise unlistable(self.name, "/".join(x for x in (prefix, rel_dir) if x),
                                         str(e)) from None
                    return []   # vanished while we listed

        with ThreadPoolExecutor(max_workers=min(LIST_WORKERS, self._max)) as pool:
            while level:
                nxt: list[str] = []
                for rel_dir, entries in zip(level, pool.map(one, level), strict=True):
                    base = rel_dir + "/" if rel_dir else ""
                    for name, kind, size, stamp in entries:
                        if kind == _DIR:
                            if not rel_dir and name == TRASH_DIR:
                                continue
                            nxt.append(base + name)
                        if kind in (_FILE, _DIR):
                            out.append(self._entry(base + name, kind, size, stamp))
                level = nxt
        return iter(out)

    def get(self, path: str, dest: str) -> RemoteEntry:
        ap = self._abs(path)
        with self._conn(path) as ftp:
            st = self._stat(ftp, ap)
            if st is None:
                raise NotFound("no such file", remote=self.name, path=path)
            if st[0] != _FILE:
                raise Conflict("not a regular file", remote=self.name, path=path)
            got = 0
            try:
                f = open(dest, "wb")   # noqa: SIM115 - closed below, after the reply
            except OSError as e:
                raise PermanentError(f"cannot write local file {dest}: {e.strerror}",
                                     path=path) from None
            with f:
                try:
                    conn, _ = ftp.ntransfercmd(f"RETR {ap}")
                except ftplib.error_perm as e:
                    if str(e).startswith("550") and self._stat(ftp, ap) is None:
                        raise NotFound("no such file", remote=self.name, path=path) from None
                    raise
                try:
                    while data := conn.recv(CHUNK):
                        f.write(data)
                        got += len(data)
                    if isinstance(conn, ssl.SSLSocket):
                        conn.unwrap()
                finally:
                    conn.close()
                ftp.voidresp()
                f.flush()
                os.fsync(f.fileno())
        if got != st[1]:
            raise TransientError(f"download ended at {got} of {st[1]} bytes", remote=self.name,
                                 path=path)
        return self._entry(path, _FILE, got, st[2])

    # --- protocol: writes ---------------------------------------------------------------------

    def _ensure_dirs(self, ftp: ftplib.FTP, rel_dir: str, fresh: bool = False) -> None:
        """Create the missing directories of root/rel_dir, one MKD each; directories seen
        before are trusted unless `fresh` (then each one is checked again)."""
        if not rel_dir:
            return
        parts = check_rel_path(self.name, rel_dir)
        cur = self.root.rstrip("/")
        for i, part in enumerate(parts):
            cur = f"{cur}/{part}"
            if cur in self._dirs and not fresh:
                continue
            try:
                ftp.voidcmd(f"MKD {cur}")
            except ftplib.error_perm as e:
                st = self._stat(ftp, cur)
                if st is None or st[0] != _DIR:
                    what = "a file" if st and st[0] == _FILE else "not creatable"
                    raise Conflict(f"cannot create directory: {what} ({e})", remote=self.name,
                                   path="/".join(parts[:i + 1])) from None
            self._dirs.add(cur)

    def mkdir(self, path: str) -> RemoteEntry:
        self._abs(path)
        with self._conn(path) as ftp:
            self._ensure_dirs(ftp, path, fresh=True)
        return RemoteEntry(path, _DIR, 0, 0, DIR_FP)

    def put(self, path: str, source: Source) -> RemoteEntry:
        ap = self._abs(path)
        parent = path.rpartition("/")[0]
        with self._conn(path) as ftp:
            self._ensure_dirs(ftp, parent)
            try:
                return self._upload(ftp, path, ap, source)
            except ftplib.error_perm as e:
                # A directory seen before may have been removed behind our back: check
                # the parents again and retry once (the source has not been read yet).
                if not str(e).startswith("550") or not parent or source.sent:
                    raise
                self._ensure_dirs(ftp, parent, fresh=True)
                return self._upload(ftp, path, ap, source)

    def _upload(self, ftp: ftplib.FTP, path: str, ap: str, source: Source) -> RemoteEntry:
        pdir = ap.rpartition("/")[0]
        tmp, rec_id, offset = self._resume(ftp, ap, pdir, source)
        if tmp is None:
            tmp = f"{pdir}/{temp_name(path.rpartition('/')[2], self.tmp_owner)}"
            rec_id = self._record(ap, tmp, source)
        reply_due = False   # a transfer was started and its final reply not yet read
        try:
            left = offset
            while left:   # bytes already on the server: read for the hash, not sent
                b = source.read(min(CHUNK, left))
                if not b:
                    raise SourceChanged(source.rel, "shrank while being read")
                left -= len(b)
            conn, _ = ftp.ntransfercmd(f"{'APPE' if offset else 'STOR'} {tmp}")
            reply_due = True
            try:
                # One buffer for the whole file, no bigger than the file (10,000 small
                # files must not zero 10,000 MiB-sized buffers).
                buf = bytearray(max(1, min(SEND_CHUNK, source.size - offset)))
                view = memoryview(buf)
                while n := source.readinto(buf):
                    conn.sendall(view[:n])
                _end_upload(conn)
            finally:
                conn.close()
            reply_due = False
            ftp.voidresp()
            source.verify()   # before the rename: torn content never gets the final name
            size = ftp.size(tmp)
            if size != source.sent:
                # Never resume from this temp: if it vanished before an APPE (a server that
                # deletes aborted uploads, say), APPE made a new file of the tail only, and
                # resuming that would publish a file of the right size, wrong content.
                self._discard(ftp, tmp, rec_id)
                raise TransientError(f"server holds {size} of {source.sent} bytes after the "
                                     f"upload ({self.where})", remote=self.name, path=path)
            mtime_s = source.mtime_ns // _SEC
            set_mtime = "MFMT" in self.features
            if set_mtime:
                try:
                    ftp.voidcmd(f"MFMT {_mtime_str(source.mtime_ns)} {tmp}")
                except ftplib.error_perm:
                    set_mtime = False
            self._rename(ftp, tmp, ap)
        except BaseException as e:
            # A lost connection or a stop leaves the temp: a recorded one is resumed by the
            # next attempt, others are removed by the next reconcile. A changed source or a
            # refusal removes it now.
            lost = isinstance(e, OSError | EOFError | TransientError | ftplib.error_temp)
            if isinstance(e, Exception) and not lost:
                if reply_due:   # the server's answer to the cut transfer comes first
                    with contextlib.suppress(ftplib.Error):
                        ftp.voidresp()
                self._discard(ftp, tmp, rec_id)
            elif not rec_id:   # no resume goes on from it: removed once connected again
                with self._lock:
                    self._orphans.add(tmp)
            raise
        self._forget(rec_id)
        if not set_mtime or self.listing != "MLSD":
            st = self._stat(ftp, ap, is_file=True)
            if st is None:
                raise TransientError("file vanished right after its upload", remote=self.name,
                                     path=path)
            return self._entry(path, _FILE, st[1], st[2])
        return self._entry(path, _FILE, source.sent, mtime_s)

    def _rename(self, ftp: ftplib.FTP, src: str, dst: str) -> None:
        """RNFR/RNTO. Where the server refuses to rename onto an existing file, the target
        is first renamed aside (a temp name), then the new file renamed in, then the old
        one deleted: a moment without the file, never a partial one, and the old file is
        put back if the second rename fails. Only an RNTO refusal leads there."""
        resp = ftp.sendcmd(f"RNFR {src}")   # a missing source fails here, as itself
        if not resp.startswith("3"):
            raise ftplib.error_reply(resp)
        try:
            ftp.voidcmd(f"RNTO {dst}")
            return
        except ftplib.error_perm as e:
            if not str(e).startswith(("550", "553")):
                raise
            st = self._stat(ftp, dst)
            if st is not None and st[0] != _FILE:
                raise Conflict("the remote has a directory (or other non-file) where a file "
                               "goes", remote=self.name, path=dst) from None
            if st is None:
                raise
        parent, _, name = dst.rpartition("/")
        aside = f"{parent}/{temp_name(name, self.tmp_owner)}"
        ftp.rename(dst, aside)
        try:
            ftp.rename(src, dst)
        except BaseException:
            with contextlib.suppress(Exception):
                ftp.rename(aside, dst)
            raise
        with contextlib.suppress(ftplib.Error):
            ftp.delete(aside)

    def _record(self, ap: str, tmp: str, source: Source) -> int:
        if self.uploads is None or source.size < RESUME_MIN:
            return 0
        st = source.before
        try:
            rid = self.uploads.begin(self.name, ap, source.abspath, source.size,
                                     source.mtime_ns, st.st_ctime_ns, st.st_ino, source.expected,
                                     0, time.time())
            self.uploads.started(rid, tmp)
        except IndexError_ as e:   # the state index busy, the disk full: try again later
            raise TransientError(str(e),
                                 remote=self.name, path=ap) from None
        return rid

    def _resume(self, ftp: ftplib.FTP, ap: str, pdir: str, source: Source,
                ) -> tuple[str | None, int, int]:
        """(temp name, record id, bytes already there) of an upload to continue, or
        (None, 0, 0). The temp counts only if the source is unchanged since it was written."""
        if self.uploads is None or source.size < RESUME_MIN:
            return None, 0, 0
        rec = self.uploads.find(self.name, ap)
        if rec is None or not rec.upload_id:
            return None, 0, 0
        st = source.before
        same = (rec.source == source.abspath and rec.upload_id.rpartition("/")[0] == pdir
                and (rec.size, rec.mtime_ns, rec.ctime_ns, rec.inode)
                == (source.size, source.mtime_ns, st.st_ctime_ns, st.st_ino)
                and (rec.hash is None or source.expected is None or rec.hash == source.expected))
        have = None
        if same:
            with contextlib.suppress(ftplib.error_perm):
                have = ftp.size(rec.upload_id)
        if have is None or not 0 < have <= source.size:
            self._discard(ftp, rec.upload_id, rec.id)
            return None, 0, 0
        self.log.info("upload_resumed", remote=self.name, path=ap, bytes_done=have,
                      bytes=source.size)
        return rec.upload_id, rec.id, have

    def _discard(self, ftp: ftplib.FTP, tmp: str, rec_id: int) -> None:
        with contextlib.suppress(Exception):   # best effort: a stale temp is cleaned later
            ftp.delete(tmp)
        self._forget(rec_id)

    def _forget(self, rec_id: int) -> None:
        if self.uploads is not None and rec_id:
            with contextlib.suppress(Exception):
                self.uploads.forget(rec_id)

    def delete(self, paths: Sequence[str]) -> None:
        if not paths:
            return
        aps = [(p, self._abs(p)) for p in paths]
        with self._conn(paths[0]) as ftp:
            for p, ap in aps:
                try:
                    ftp.delete(ap)
                except ftplib.error_perm as e:
                    st = self._stat(ftp, ap)
                    if st is None:
                        continue   # already gone
                    if st[0] != _FILE:
                        raise Conflict("not a file", remote=self.name, path=p) from None
                    raise PermanentError(f"{e} ({self.where})", remote=self.name,
                                         path=p) from None

    def rmdir(self, path: str) -> bool:
        ap = self._abs(path)
        with self._conn(path) as ftp:
            try:
                ftp.rmd(ap)
            except ftplib.error_perm as e:
                st = self._stat(ftp, ap)
                if st is None:
                    return True
                if st[0] != _DIR:
                    raise Conflict("not a directory", remote=self.name, path=path) from None
                if self._list_dir(ftp, ap):
                    return False
                raise PermanentError(f"{e} ({self.where})", remote=self.name,
                                     path=path) from None
            self._dirs.difference_update([d for d in list(self._dirs)
                                          if d == ap or d.startswith(ap + "/")])
            return True

    def move(self, src: str, dst: str) -> str:
        """RNFR/RNTO to a name that is free: most servers let RNTO replace an existing
        file, so the target is looked at first (a window only a concurrent writer of the
        same trash name could hit), and a refused RNTO onto one that appeared meanwhile
        moves on to the next name."""
        sap = self._abs(src)
        with self._conn(f"{src} -> {dst}") as ftp:
            st = self._stat(ftp, sap)
            if st is None:
                raise NotFound("no such file", remote=self.name, path=src)
            self._ensure_dirs(ftp, dst.rpartition("/")[0], fresh=True)
            for target in names_for(self.name, dst):
                tap = self._abs(target)
                if self._stat(ftp, tap) is not None:
                    continue
                resp = ftp.sendcmd(f"RNFR {sap}")
                if not resp.startswith("3"):
                    raise ftplib.error_reply(resp)
                try:
                    ftp.voidcmd(f"RNTO {tap}")
                    return target
                except ftplib.error_perm:
                    if self._stat(ftp, tap) is None:
                        raise
        raise AssertionError("unreachable: names_for raises when it runs out")


def _end_upload(conn: socket.socket) -> None:
    """Mark the end of an upload: over TLS, close_notify (the server then knows the file
    was not cut short), and the server's own in return."""
    if isinstance(conn, ssl.SSLSocket):
        conn.unwrap()


def _lines(ftp: ftplib.FTP, cmd: str) -> list[str]:
    """The text a listing command sends over a data connection. Not ftplib's retrlines:
    that switches the connection to TYPE A, and a later binary transfer would then be
    mangled (LF -> CRLF)."""
    chunks = []
    conn, _ = ftp.ntransfercmd(cmd)
    try:
        while data := conn.recv(CHUNK):
            chunks.append(data)
        if isinstance(conn, ssl.SSLSocket):
            conn.unwrap()
    finally:
        conn.close()
    ftp.voidresp()
    # Lines end at LF (CRLF on the wire) only: str.splitlines() would also split a name
    # at \x0b, \x0c, \x1c-\x1e, \x85, U+2028 or U+2029, and lose that file.
    text = b"".join(chunks).decode("utf-8", "surrogateescape")
    return [line.removesuffix("\r") for line in text.split("\n") if line not in ("", "\r")]


_MONTHS = {m: i for i, m in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}


def _date_key(date: str) -> int:
    """A LIST date ('Nov 25 13:24' or 'Nov 25  2025') as a number for the fingerprint: its
    month and day only. `ls` shows the time for files of the last 6 months and the year
    for older ones, so a file's date changes form by itself once it is 6 months old, and
    servers that list in local time shift the time at DST changes; either would make every
    file look changed behind syncd's back (and be uploaded again)."""
    mon, day, _ = date.split()
    return _MONTHS.get(mon.lower(), 0) * 32 + int(day)


def upgrade_list_fp(fp: str) -> str:
    """A file's fingerprint as recorded before LIST dates were cut to month and day (an
    index from before v6), as the same listing gives it now; any other one unchanged. The
    old key was ((month*32+day)*24+hour)*60+minute for a recent file, -(year*1000 +
    month*32+day) for an old one; MLSD fingerprints (epoch seconds) are neither."""
    size, sep, ns = fp.partition(":")
    if not sep or not size.isdigit() or not ns.lstrip("-").isdigit():
        return fp
    stamp = int(ns) // _SEC
    if 32 * 1440 <= stamp < 416 * 1440:
        return _fp(int(size), stamp // 1440)
    if stamp < 0 and 1900 <= (-stamp) // 1000 <= 2200 and (-stamp) % 1000 < 416:
        return _fp(int(size), (-stamp) % 1000)
    return fp


__all__ = ["TLS_MODES", "FTPOptions", "FTPRemote", "upgrade_list_fp"]

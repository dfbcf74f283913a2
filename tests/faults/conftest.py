"""Fault-injection harness: SFTP, FTPS and S3 remotes reached through a TCP fault proxy
(tests/faultproxy.py) in front of the real servers, syncd run as a subprocess with a hard
time bound, and a watcher that reads the remote during a run for partial files."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import _missing
from tests.e2e.conftest import SYNCD, write_file
from tests.faultproxy import TcpFaultProxy
from tests.servers import FTPServer, S3Server, ServerMissing, SSHServer

# A reconcile that has not ended by then is killed and reported as a hang: correctness
# (it ends), not speed; a fixed syncd ends a dead-remote run within a few `timeout`s.
HANG_BOUND = 30.0
TIMEOUT = "2s"    # the remotes' `timeout`: every network wait must be bounded by it

TMP_MARK = ".syncd-tmp-"
TRASH = ".syncd-trash"

DAEMON = """\
[daemon]
state_dir = "{state}"
log_format = "json"
retry_initial = "100ms"
retry_max = "1s"
max_attempts = 5
debounce = "100ms"
max_delay = "1s"
shutdown_timeout = "10s"

[remotes.far]
{remote}

[[sync]]
name = "far"
local = "{src}"
remote = "far"
path = "{path}"
delete = "propagate"
"""


@dataclass
class Target:
    """One protocol behind its proxy. `files()` reads the pair's remote folder directly
    from the server's storage (not through the proxy): every file, temps and trash too."""

    kind: str
    proxy: TcpFaultProxy
    body: Callable[[Path], str]            # the [remotes.far] body for a test's tmp dir
    files: Callable[[Path], dict[str, bytes]]
    env: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)


def _free_pair_port(avoid: set[int]) -> int:
    """A port free on both 127.0.0.1 (the proxy) and 127.0.0.2 (the FTP server)."""
    for _ in range(200):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = int(a.getsockname()[1])
        if p in avoid:
            continue
        try:
            with socket.socket() as b:
                b.bind(("127.0.0.2", p))
        except OSError:
            continue
        return p
    raise RuntimeError("no port free on both 127.0.0.1 and 127.0.0.2")


def _fs_files(root: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            if p.is_file() and not p.is_symlink():
                out[p.relative_to(root).as_posix()] = p.read_bytes()
    return out


@pytest.fixture(scope="session")
def sftp_target(sshd: SSHServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    proxy = TcpFaultProxy((sshd.host, sshd.port))
    d = tmp_path_factory.mktemp("sftp-proxy")
    pub = sshd.host_key.with_suffix(".pub").read_text().split()
    known = d / "known_hosts"
    known.write_text(f"[127.0.0.1]:{proxy.port} {pub[0]} {pub[1]}\n")

    def body(tmp: Path) -> str:
        (tmp / "remote").mkdir(exist_ok=True)
        return (f'type = "sftp"\nhost = "127.0.0.1"\nport = {proxy.port}\n'
                f'user = "{sshd.user}"\nroot = "{tmp / "remote"}"\n'
                f'key_file = "{sshd.client_key}"\nknown_hosts = "{known}"\n'
                f'use_agent = false\ntimeout = "{TIMEOUT}"\ntransfers = 4')

    try:
        yield Target("sftp", proxy, body, lambda tmp: _fs_files(tmp / "remote" / "pair"), {})
    finally:
        proxy.stop()


@pytest.fixture(scope="session")
def ftps_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    # pyftpdlib on 127.0.0.2 with a fixed passive range; the proxy listens on 127.0.0.1 at
    # a free control port and at the same passive ports, so data connections cross it too.
    base = tmp_path_factory.mktemp("ftps-proxy")
    try:
        srv = FTPServer(base, tls="explicit", host="127.0.0.2", transfer_log=False)
    except ServerMissing as e:
        _missing(e)
    passive: list[int] = []
    for _ in range(12):
        passive.append(_free_pair_port({srv.port, *passive}))
    srv.extra = ("--passive-ports", ",".join(map(str, passive)))
    proxy = TcpFaultProxy(("127.0.0.2", srv.port), same_ports=passive)
    try:
        srv.start()
    except BaseException:
        proxy.stop()
        raise

    def body(tmp: Path) -> str:
        (srv.root / tmp.name).mkdir(exist_ok=True)
        return (f'type = "ftp"\nhost = "127.0.0.1"\nport = {proxy.port}\n'
                f'user = "{srv.USER}"\npassword_env = "{srv.PASSWORD_ENV}"\n'
                f'root = "/{tmp.name}"\ntls = "explicit"\nca_file = "{srv.ca_file}"\n'
                f'timeout = "{TIMEOUT}"\ntransfers = 4')

    try:
        yield Target("ftps", proxy, body, lambda tmp: _fs_files(srv.root / tmp.name / "pair"),
                     {srv.PASSWORD_ENV: srv.PASSWORD}, {"server": srv})
    finally:
        proxy.stop()
        srv.stop()


@pytest.fixture(scope="session")
def s3_target(s3server: S3Server) -> Iterator[Target]:
    proxy = TcpFaultProxy(("127.0.0.1", s3server.port))
    c: Any = s3server.client()
    c.create_bucket(Bucket="faults")

    def body(tmp: Path) -> str:
        return (f'type = "s3"\nbucket = "faults"\nprefix = "{tmp.name}"\n'
                f'endpoint_url = "http://127.0.0.1:{proxy.port}"\nregion = "us-east-1"\n'
                f'addressing_style = "path"\ntimeout = "{TIMEOUT}"\ntransfers = 4')

    seen: dict[tuple[str, str], bytes] = {}   # (key, etag) -> body: read each version once

    def files(tmp: Path) -> dict[str, bytes]:
        prefix = f"{tmp.name}/pair/"
        out: dict[str, bytes] = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket="faults", Prefix=prefix):
            for o in page.get("Contents", ()):
                k = (o["Key"], o["ETag"])
                if k not in seen:
                    with contextlib.suppress(c.exceptions.NoSuchKey):
                        seen[k] = c.get_object(Bucket="faults", Key=o["Key"])["Body"].read()
                if k in seen:
                    out[o["Key"][len(prefix):]] = seen[k]
        return out

    try:
        yield Target("s3", proxy, body, files, dict(S3Server.ENV), {"client": c})
    finally:
        proxy.stop()


@pytest.fixture(params=["sftp", "ftps", "s3"])
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    t: Target = request.getfixturevalue(f"{request.param}_target")
    t.proxy.set_mode("pass")
    try:
        yield t
    finally:
        # Leave nothing of this test's connections behind for the next one.
        t.proxy.set_mode("reset")
        t.proxy.set_mode("pass")


@dataclass
class Outcome:
    code: int | None     # None: still running at the bound, killed (a hang)
    seconds: float
    out: str
    err: str

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.err.splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    e = json.loads(line)
                    if e.get("event") == name:
                        found.append(e)
        return found

    def tail(self) -> str:
        lines = [x for x in self.err.splitlines() if x.strip()]
        return "\n".join(lines[-6:])[-1500:]


def _kill_group(p: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGKILL)


class Setup:
    """A local tree, a state dir and a config for one pair to `target`; keeps every
    version written to each path, so a remote file can be told complete or partial."""

    def __init__(self, tmp: Path, target: Target):
        self.tmp, self.target = tmp, target
        self.src, self.state = tmp / "src", tmp / "state"
        self.src.mkdir(exist_ok=True)
        self.config = tmp / "config.toml"
        self.config.write_text(DAEMON.format(state=self.state, remote=target.body(tmp),
                                             src=self.src, path="pair"))
        self.versions: dict[str, set[bytes]] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
        self.env.update(target.env)

    def write(self, rel: str, data: bytes) -> None:
        write_file(self.src, rel, data)
        self.versions.setdefault(rel, set()).add(data)

    def write_tree(self, n: int = 30, big: int = 2, big_size: int = 1 << 20, tag: str = "") -> None:
        """`n` small files in a few folders and `big` files of `big_size` bytes."""
        for i in range(n):
            self.write(f"d{i % 4}/f{i:02}.txt", f"{tag}file {i}\n".encode() * (50 + 40 * i))
        for i in range(big):
            block = f"{tag}big {i} ".encode()
            self.write(f"big/b{i}.bin", (block * (big_size // len(block) + 1))[:big_size])

    def local(self) -> dict[str, bytes]:
        return _fs_files(self.src)

    def remote(self) -> dict[str, bytes]:
        return self.target.files(self.tmp)

    def final(self) -> dict[str, bytes]:
        return {k: v for k, v in self.remote().items()
                if TMP_MARK not in k.rsplit("/", 1)[-1] and TRASH not in k.split("/")}

    def temps(self) -> list[str]:
        return sorted(k for k in self.remote() if TMP_MARK in k.rsplit("/", 1)[-1])

    def partial(self, files: dict[str, bytes]) -> list[str]:
        """Final names whose bytes are no version ever written locally (torn or mixed)."""
        return sorted(k for k, v in files.items() if v not in self.versions.get(k, set()))

    def reconcile(self, during: Callable[[], None] | None = None,
                  bound: float = HANG_BOUND) -> Outcome:
        """`syncd reconcile` in its own process group; `during` runs in this thread while
        it does. Killed (code None) at `bound` seconds."""
        t0 = time.monotonic()
        p = subprocess.Popen([str(SYNCD), "reconcile", "--config", str(self.config), "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=self.env, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            if during is not None:
                during()
            try:
                out, err = p.communicate(timeout=max(0.1, bound - (time.monotonic() - t0)))
                code: int | None = p.returncode
            except subprocess.TimeoutExpired:
                _kill_group(p)
                out, err = p.communicate(timeout=10)
                code = None
        finally:
            if p.poll() is None:
                _kill_group(p)
                p.wait(10)
        # Worker processes of a killed run end with it; make sure none lingers either way.
        _kill_group(p)
        return Outcome(code, time.monotonic() - t0, out, err)

    def status(self) -> dict[str, Any]:
        p = subprocess.run([str(SYNCD), "status", "--config", str(self.config), "--json"],
                           capture_output=True, text=True, env=self.env, timeout=60,
                           stdin=subprocess.DEVNULL)
        return dict(json.loads(p.stdout)) if p.stdout.startswith("{") else {"raw": p.stdout}


class Watcher:
    """Reads the remote every 50 ms in a thread while a run goes on and records every
    final name that ever held bytes no local version had (a partial file)."""

    def __init__(self, s: Setup):
        self.s = s
        self.bad: dict[str, int] = {}
        self.looks = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, name="watcher", daemon=True)

    def __enter__(self) -> Watcher:
        self._t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._t.join(30)
        self._look()   # one last look after the run

    def _look(self) -> None:
        try:
            files = self.s.final()
        except Exception as e:   # a listing racing a rename; reported if it keeps failing
            self.errors.append(repr(e))
            return
        self.looks += 1
        for k in self.s.partial(files):
            self.bad[k] = len(files[k])

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._look()


def wait_until(cond: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()

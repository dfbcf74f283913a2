"""Fixtures for the Remote conformance battery.

Every test in this directory runs once per backend through the single parametrized
`remote` fixture. To add a backend (SFTP on a real sshd, S3 on a moto server, FTP...):

1. write a factory `_make_<name>(request) -> Harness` that builds the remote under test and a
   `Peek` for it (use `request.getfixturevalue(...)` to reach session-scoped servers);
2. add one `pytest.param(_make_<name>, id="<name>")` to `BACKENDS` below.

A `Peek` reads (and, for test setup only, changes) the remote's storage *without* going
through the backend under test -- the plain filesystem for `local`, a raw paramiko/boto3
client for the others -- so the tests can check what really landed on the remote.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest

from syncd.remotes.base import Remote
from syncd.remotes.local import LocalRemote


class Peek(Protocol):
    """Out-of-band access to a backend's storage; paths are '/'-separated, relative to the
    remote root. Directories are reported only by backends with real directories."""

    supports_symlinks: bool   # can the tests plant symlinks on this remote?

    def read(self, path: str) -> bytes | None:
        """The raw bytes stored under `path`, or None if there is no regular file there."""

    def exists(self, path: str) -> bool:
        """Anything (file, dir, symlink) is stored under `path`."""

    def is_dir(self, path: str) -> bool: ...

    def listdir_names(self, path: str = "") -> set[str]:
        """Names directly inside directory `path` ("" = the root), temp files included."""

    def tree(self) -> dict[str, bytes | str]:
        """Everything under the root: files -> bytes, dirs -> "<dir>", symlinks -> "-> target"."""

    def write(self, path: str, data: bytes) -> None:
        """Setup only: store a file directly, creating parents."""

    def remove_tree(self, path: str) -> None:
        """Setup only: remove a file or a whole directory behind the backend's back."""

    def symlink(self, path: str, target: str) -> None:
        """Setup only (when supports_symlinks): plant a symlink `path` -> `target`."""

    def outside_abs(self, rel: str = "") -> str:
        """An absolute path (as the backend's storage sees it) in a directory *outside* the
        root, next to it; escape tests aim at it and check it is left untouched."""

    def outside_write(self, rel: str, data: bytes) -> None: ...

    def outside_mkdir(self, rel: str) -> None: ...

    def outside_snapshot(self) -> dict[str, bytes | str]:
        """Everything near the root but outside it (the root's parent minus the root)."""


@dataclass
class Harness:
    remote: Remote
    peek: Peek
    cleanup: Callable[[], None] = field(default=lambda: None)


# --- local ---------------------------------------------------------------------------------


def _snapshot(top: Path, skip: Path | None = None) -> dict[str, bytes | str]:
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        d = Path(dirpath)
        if skip is not None and skip.name in dirnames and d == skip.parent:
            dirnames.remove(skip.name)
        for name in dirnames + filenames:
            p = d / name
            rel = p.relative_to(top).as_posix()
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "-> " + os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "<dir>"
            else:
                out[rel] = p.read_bytes()
    return out


class LocalPeek:
    supports_symlinks = True

    def __init__(self, root: Path, outside: Path, no_symlinks_why: str = ""):
        self.root = root
        self.outside = outside
        if no_symlinks_why:   # the storage could hold them, the protocol cannot see them
            self.supports_symlinks = False
            self.no_symlinks_why = no_symlinks_why

    def _p(self, path: str) -> Path:
        return self.root / path if path else self.root

    def read(self, path: str) -> bytes | None:
        p = self._p(path)
        if p.is_symlink() or not p.is_file():
            return None
        return p.read_bytes()

    def exists(self, path: str) -> bool:
        return os.path.lexists(self._p(path))

    def is_dir(self, path: str) -> bool:
        p = self._p(path)
        return not p.is_symlink() and p.is_dir()

    def listdir_names(self, path: str = "") -> set[str]:
        p = self._p(path)
        return set(os.listdir(p)) if self.is_dir(path) else set()

    def tree(self) -> dict[str, bytes | str]:
        return _snapshot(self.root)

    def write(self, path: str, data: bytes) -> None:
        p = self._p(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    def remove_tree(self, path: str) -> None:
        p = self._p(path)
        if p.is_symlink() or not p.is_dir():
            p.unlink()
        else:
            shutil.rmtree(p)

    def symlink(self, path: str, target: str) -> None:
        p = self._p(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, p)

    def outside_abs(self, rel: str = "") -> str:
        return str(self.outside / rel) if rel else str(self.outside)

    def outside_write(self, rel: str, data: bytes) -> None:
        p = self.outside / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    def outside_mkdir(self, rel: str) -> None:
        (self.outside / rel).mkdir(parents=True, exist_ok=True)

    def outside_snapshot(self) -> dict[str, bytes | str]:
        return _snapshot(self.root.parent, skip=self.root)


def _make_local(request: pytest.FixtureRequest) -> Harness:
    tmp_path: Path = request.getfixturevalue("tmp_path")
    base = tmp_path / "remote"          # holds the root and, beside it, the "outside"
    root = base / "root"
    outside = base / "outside"
    root.mkdir(parents=True)
    outside.mkdir()
    return Harness(LocalRemote("test", root), LocalPeek(root, outside))


# --- sftp: a real OpenSSH sshd on 127.0.0.1 serving a temp dir ------------------------------


def _make_sftp(request: pytest.FixtureRequest) -> Harness:
    from syncd.remotes.sftp import SFTPOptions, SFTPRemote

    srv = request.getfixturevalue("sshd")
    tmp_path: Path = request.getfixturevalue("tmp_path")
    base = tmp_path / "remote"
    root = base / "root"
    outside = base / "outside"
    root.mkdir(parents=True)
    outside.mkdir()
    opts = SFTPOptions(host=srv.host, port=srv.port, user=srv.user, root=str(root),
                       key_file=str(srv.client_key), known_hosts=str(srv.known_hosts),
                       use_agent=False, timeout=10.0)
    # The server runs on this machine, so the plain filesystem is an out-of-band view.
    return Harness(SFTPRemote("test", opts), LocalPeek(root, outside))


# --- s3: moto's server over real HTTP ------------------------------------------------------


class S3Peek:
    """Raw boto3 view of one bucket: the remote's root is `<base>/root/`, the "outside" is
    `<base>/outside/` next to it. Directories are implicit (key prefixes)."""

    supports_symlinks = False

    def __init__(self, client: object, bucket: str, base: str):
        self.c: Any = client
        self.bucket = bucket
        self.root = f"{base}/root/"
        self.outside = f"{base}/outside/"

    def _keys(self, prefix: str) -> list[str]:
        out: list[str] = []
        for page in self.c.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                     Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", ())]
        return out

    def read(self, path: str) -> bytes | None:
        try:
            return self.c.get_object(Bucket=self.bucket, Key=self.root + path)["Body"].read()
        except self.c.exceptions.NoSuchKey:
            return None

    def exists(self, path: str) -> bool:
        return self.read(path) is not None or self.is_dir(path)

    def is_dir(self, path: str) -> bool:
        return bool(self._keys(self.root + path + "/")) if path else True

    def listdir_names(self, path: str = "") -> set[str]:
        start = self.root + (path + "/" if path else "")
        return {k[len(start):].split("/", 1)[0] for k in self._keys(start)}

    def tree(self) -> dict[str, bytes | str]:
        out: dict[str, bytes | str] = {}
        for k in self._keys(self.root):
            rel = k[len(self.root):]
            out[rel] = self.c.get_object(Bucket=self.bucket, Key=k)["Body"].read()
            parts = rel.split("/")
            for i in range(1, len(parts)):
                out["/".join(parts[:i])] = "<dir>"
        return out

    def write(self, path: str, data: bytes) -> None:
        self.c.put_object(Bucket=self.bucket, Key=self.root + path, Body=data)

    def remove_tree(self, path: str) -> None:
        keys = [k for k in self._keys(self.root + path) if k == self.root + path
                or k.startswith(self.root + path + "/")]
        for k in keys:
            self.c.delete_object(Bucket=self.bucket, Key=k)

    def symlink(self, path: str, target: str) -> None:  # pragma: no cover - no symlinks in S3
        raise NotImplementedError

    def outside_abs(self, rel: str = "") -> str:
        return "/" + self.outside + rel

    def outside_write(self, rel: str, data: bytes) -> None:
        self.c.put_object(Bucket=self.bucket, Key=self.outside + rel, Body=data)

    def outside_mkdir(self, rel: str) -> None:
        self.c.put_object(Bucket=self.bucket, Key=self.outside + rel + "/.keep", Body=b"")

    def outside_snapshot(self) -> dict[str, bytes | str]:
        return {k: self.c.get_object(Bucket=self.bucket, Key=k)["Body"].read()
                for k in self._keys(self.outside)}


_S3_COUNTER = iter(range(1_000_000))


def _make_s3(request: pytest.FixtureRequest) -> Harness:
    from syncd.remotes.s3 import S3Options, S3Remote

    srv = request.getfixturevalue("s3server")
    client: Any = srv.client()
    bucket = "conformance"
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=bucket)
    base = f"t{next(_S3_COUNTER)}"
    opts = S3Options(bucket=bucket, prefix=f"{base}/root", endpoint_url=srv.endpoint,
                     region="us-east-1", addressing_style="path", transfers=4,
                     multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    return Harness(S3Remote("test", opts), S3Peek(client, bucket, base))


# --- ftp: pyftpdlib in its own process, FTPS and plain FTP ----------------------------------

_FTP_COUNTER = iter(range(1_000_000))


def _make_ftp(request: pytest.FixtureRequest, fixture: str) -> Harness:
    from syncd.remotes.ftp import FTPOptions, FTPRemote

    srv = request.getfixturevalue(fixture)
    # Each test gets <server root>/tN/root; tN/outside is beside it, still inside what the
    # server serves, so escape attempts could reach it if the backend let them.
    base = f"t{next(_FTP_COUNTER)}"
    root = srv.root / base / "root"
    outside = srv.root / base / "outside"
    root.mkdir(parents=True)
    outside.mkdir()
    opts = FTPOptions(host="127.0.0.1", port=srv.port, user=srv.USER,
                      password_env=srv.PASSWORD_ENV, root=f"/{base}/root", tls=srv.tls,
                      ca_file=str(srv.ca_file) if srv.tls != "none" else "", timeout=10.0)
    r = FTPRemote("test", opts, env={srv.PASSWORD_ENV: srv.PASSWORD})
    # FTP shows no symlinks: servers resolve them (pyftpdlib stat()s through them, vsftpd
    # lists targets), so a client cannot refuse to follow one; the server's chroot is the
    # boundary (README, limits). The symlink battery does not apply.
    why = ("FTP cannot see symlinks (the server resolves them); containment is the "
           "server's chroot, documented in the README's limits")
    return Harness(r, LocalPeek(root, outside, no_symlinks_why=why), cleanup=r.close)


def _make_ftps(request: pytest.FixtureRequest) -> Harness:
    return _make_ftp(request, "ftpserver")


def _make_ftp_plain(request: pytest.FixtureRequest) -> Harness:
    return _make_ftp(request, "ftpserver_plain")


# One entry per backend; this is the only list to extend.
BACKENDS = [
    pytest.param(_make_local, id="local"),
    pytest.param(_make_sftp, id="sftp"),
    pytest.param(_make_s3, id="s3"),
    pytest.param(_make_ftps, id="ftps"),
    pytest.param(_make_ftp_plain, id="ftp"),
]

_HARNESS = pytest.StashKey[Harness]()


@pytest.fixture(params=BACKENDS)
def remote(request: pytest.FixtureRequest) -> Iterator[Remote]:
    """The backend under test, on a fresh, empty root."""
    harness: Harness = request.param(request)
    request.node.stash[_HARNESS] = harness
    try:
        harness.remote.check()
        yield harness.remote
    finally:
        harness.remote.close()
        harness.cleanup()


@pytest.fixture
def peek(remote: Remote, request: pytest.FixtureRequest) -> Peek:
    """Raw, backend-independent view of the storage behind `remote`."""
    return request.node.stash[_HARNESS].peek


@pytest.fixture
def local_dir(tmp_path: Path) -> Path:
    """A scratch local directory (sources to upload, get() destinations)."""
    d = tmp_path / "local"
    d.mkdir()
    return d


# --- a dead server: every network backend pointed at a port nothing listens on -------------


def _dead_sftp(port: int, tmp_path: Path) -> Remote:
    from syncd.remotes.sftp import SFTPOptions, SFTPRemote

    kh = tmp_path / "known_hosts"
    kh.touch()
    return SFTPRemote("test", SFTPOptions(host="127.0.0.1", port=port, user="nobody",
                                          root="/", known_hosts=str(kh), use_agent=False,
                                          timeout=5.0))


def _dead_s3(port: int, tmp_path: Path) -> Remote:
    from syncd.remotes.s3 import S3Options, S3Remote

    return S3Remote("test", S3Options(bucket="dead", endpoint_url=f"http://127.0.0.1:{port}",
                                      region="us-east-1", addressing_style="path",
                                      timeout=5.0))


def _dead_ftp(tls: str) -> Callable[[int, Path], Remote]:
    def make(port: int, tmp_path: Path) -> Remote:
        from syncd.remotes.ftp import FTPOptions, FTPRemote

        return FTPRemote("test", FTPOptions(host="127.0.0.1", port=port, user="u",
                                            password_env="PW", tls=tls, timeout=5.0),
                         env={"PW": "x"})

    return make


DEAD_BACKENDS = [
    pytest.param(_dead_sftp, id="sftp"),
    pytest.param(_dead_s3, id="s3"),
    pytest.param(_dead_ftp("explicit"), id="ftps"),
    pytest.param(_dead_ftp("none"), id="ftp"),
]


@pytest.fixture(params=DEAD_BACKENDS)
def dead_remote(request: pytest.FixtureRequest, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[Remote]:
    """A network backend whose server is down: its port is closed."""
    from tests.servers import S3Server
    from tests.silent import closed_port

    for k, v in S3Server.ENV.items():
        monkeypatch.setenv(k, v)
    r = request.param(closed_port(), tmp_path)
    try:
        yield r
    finally:
        r.close()

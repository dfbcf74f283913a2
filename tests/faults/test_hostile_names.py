"""Hostile names from both sides never make syncd write outside a root.

Names with `..`, absolute paths, NUL, control characters, overlong names and paths,
non-UTF-8 bytes, case and Unicode-form twins, and symlinks pointing out of the tree are put
in the local tree (where Linux allows: no NUL or `/` in a name) and in remote listings (a
directory remote's folder, the real sshd's folder, S3 keys put with boto3 into moto, where
NUL, `..` and absolute keys are possible). `syncd reconcile` runs twice (a first sync, then
a run with a base); before and after, everything in the sandbox but the local root, the
remote root and the state dir is snapshot, and must not change; in S3, every key outside the
pair's prefix must not change. A run may refuse a name (exit 1) or stop at a guard (4);
it may not crash (70), hang, or write elsewhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import SYNCD
from tests.servers import S3Server, SSHServer

pytestmark = pytest.mark.e2e

TOKEN = "syncd-hostile-" + uuid.uuid4().hex[:8]   # in every escaping name: findable anywhere

# Path components Linux accepts in a file name (bytes: no NUL, no "/").
COMPONENTS: list[bytes] = [
    b"...", b"..foo", b"foo..", b".syncd-tmp-deadbeef", b".syncd-trash", b"-rf", b" lead",
    b"trail ", b"trail.", b"a\\..\\..\\" + TOKEN.encode(), b"new\nline",
    b"innocent\n  delete_remote  etc-passwd", b"esc\x1b[31mred\x1b[0m", b"cr\rx", b"tab\tx",
    b"bell\x07", b"del\x7f", b"bad\xff\xfe", b"caf\xe9", b"L" * 255, b"Case.txt", b"case.txt",
    "caf\u00e9.txt".encode(), "cafe\u0301.txt".encode(), b"%2e%2e%2f" + TOKEN.encode(),
    "rtl\u202etxt.exe".encode(), "zw\u200bsp".encode(), b"~", b"$HOME", b"*", b"?",
]

# S3 keys (relative to the pair's prefix): `..`, absolute, NUL and everything above.
KEYS: list[str] = [
    f"../{TOKEN}", f"../../{TOKEN}", f"/{TOKEN}", f"//{TOKEN}", f"a/../../../{TOKEN}",
    f"./{TOKEN}", "a//b", "..", ".", "x/..", "x/.", "nul\x00byte", f"a\\..\\..\\{TOKEN}",
    "ctl\x01\x1b[2J", "new\nline", "L" * 900, "Case.txt", "case.txt", "caf\u00e9.txt",
    "cafe\u0301.txt", ".syncd-tmp-deadbeef", ".syncd-trash/x", "dir/", "dir", "dir/in",
    "trailing/", f"%2e%2e/{TOKEN}",
]


# -- snapshots -------------------------------------------------------------------------------

def snapshot(top: Path, skip: set[Path]) -> dict[bytes, tuple[Any, ...]]:
    """Every entry under `top` but `skip`: kind, size, times, inode, link target, content
    hash. Symlinks are recorded, never followed."""
    out: dict[bytes, tuple[Any, ...]] = {}
    skipb = {os.fsencode(p) for p in skip}
    for dirpath, dirnames, filenames in os.walk(os.fsencode(top)):
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skipb]
        for name in [*dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            if p in skipb:
                continue
            st_ = os.lstat(p)
            extra: Any = None
            if stat.S_ISLNK(st_.st_mode):
                extra = os.readlink(p)
            elif stat.S_ISREG(st_.st_mode):
                with open(p, "rb") as f:
                    extra = hashlib.sha256(f.read()).hexdigest()
            out[p] = (st_.st_mode, st_.st_size, st_.st_mtime_ns, st_.st_ctime_ns, st_.st_ino, extra)
        # A directory's own times change when an entry is created or removed in it.
        st_ = os.lstat(dirpath)
        out[dirpath + b"/."] = (st_.st_mode, st_.st_mtime_ns, st_.st_ctime_ns)
    return out


def escaped_anywhere() -> list[str]:
    """Files named after TOKEN where an absolute or `..` name would put them."""
    found = []
    for d in ("/", "/tmp", os.path.expanduser("~"), "/etc"):
        with contextlib.suppress(OSError):
            found += [os.path.join(d, n) for n in os.listdir(d) if TOKEN in n]
    return found


class Box:
    """A sandbox: src (local root), dst (remote root for directory and SFTP remotes),
    state, and decoys around them that nothing may touch."""

    def __init__(self, base: Path, n: int):
        self.dir = base / f"box{n}"
        self.src, self.dst, self.state = self.dir / "src", self.dir / "dst", self.dir / "state"
        self.outside = self.dir / "outside"
        # The state dir exists before the snapshot: creating it would change the box itself.
        for d in (self.src, self.dst / "pair", self.state, self.outside / "deep"):
            d.mkdir(parents=True)
        (self.outside / "precious.txt").write_bytes(b"must not change")
        (self.outside / "deep" / "also.txt").write_bytes(b"nor this")
        (self.dir / "sibling.txt").write_bytes(b"next to the roots")
        (self.src / "normal.txt").write_bytes(b"an ordinary file")
        self.config = self.dir / "config.toml"

    def configure(self, remote: str, delete: str) -> None:
        self.config.write_text(
            f'[daemon]\nstate_dir = "{self.state}"\nlog_format = "json"\n'
            'retry_initial = "10ms"\nretry_max = "50ms"\nmax_attempts = 2\n\n'
            f"[remotes.far]\n{remote}\n\n"
            f'[[sync]]\nname = "p"\nlocal = "{self.src}"\nremote = "far"\npath = "pair"\n'
            f'delete = "{delete}"\nmax_delete = "100%"\nfollow_symlinks = false\n')

    def snap(self) -> dict[bytes, tuple[Any, ...]]:
        return snapshot(self.dir, {self.src, self.dst, self.state})


def plant(root: Path, names: list[bytes], outside: Path) -> None:
    """Create the hostile entries under root (bytes paths): files, a folder holding one,
    symlinks out of the tree, an overlong path (longer than PATH_MAX, built with dir fds)."""
    rb = os.fsencode(root)
    for i, name in enumerate(names):
        kind = i % 3
        p = os.path.join(rb, name)
        with contextlib.suppress(FileExistsError, IsADirectoryError, NotADirectoryError):
            if kind == 0:
                with open(p, "wb") as f:
                    f.write(b"hostile " + name)
            elif kind == 1:
                os.makedirs(p, exist_ok=True)
                with open(os.path.join(p, b"inner"), "wb") as f:
                    f.write(b"inside " + name)
            else:   # a link out of the tree: relative `..` and absolute
                os.symlink(os.fsencode(outside) if i % 2 else b"../../outside", p)
    fd = os.open(rb, os.O_RDONLY | os.O_DIRECTORY)   # 20 levels of 250 bytes: > PATH_MAX
    try:
        for level in range(20):
            name = b"D%02d" % level + b"d" * 247
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        wfd = os.open(b"bottom.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(wfd, b"very deep")
        os.close(wfd)
    finally:
        os.close(fd)


def reconcile(box: Box, env: dict[str, str]) -> tuple[int | None, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    e.update(env)
    try:
        p = subprocess.run([str(SYNCD), "reconcile", "--config", str(box.config), "--json"],
                           capture_output=True, text=True, env=e, timeout=60,
                           stdin=subprocess.DEVNULL, errors="replace")
    except subprocess.TimeoutExpired:
        return None, "hung for 60 s"
    return p.returncode, p.stderr[-2000:]


CODES: list[int | None] = []   # exit codes of every run, printed at the end (pytest -s)


def check(box: Box, env: dict[str, str], extra_snap: Callable[[], Any] = lambda: None,
          synced: Callable[[], bool] | None = None) -> None:
    before, before_extra = box.snap(), extra_snap()
    for _ in range(2):   # a first sync, then a run with a base (deletes, trash)
        code, err = reconcile(box, env)
        CODES.append(code)
        assert code in (0, 1, 4), f"exit {code}: {err}"
    # The runs did their work (the ordinary file is on the remote) unless a guard stopped them.
    synced = synced or (lambda: (box.dst / "pair" / "normal.txt").is_file())
    assert code == 4 or synced(), err
    after = box.snap()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed == [], f"written outside the roots: {changed[:10]}"
    assert extra_snap() == before_extra, "S3 keys outside the pair's prefix changed"
    assert escaped_anywhere() == []


def rmtree(p: Path) -> None:
    # The overlong path cannot be removed by path; shutil.rmtree works with dir fds.
    shutil.rmtree(p, ignore_errors=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    d = tmp_path_factory.mktemp("hostile")
    yield d
    rmtree(d)
    print(f"\nhostile names: {len(CODES)} runs, exit codes "
          f"{ {c: CODES.count(c) for c in sorted(set(CODES), key=str)} }")


class Counter:
    n = 0

    def next(self) -> int:
        self.n += 1
        return self.n


COUNT = Counter()
# No shrinking: a failure is reported as generated, and a failing run stays bounded.
SETTINGS = settings(max_examples=6, deadline=None, derandomize=True,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
names = st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=8, unique=True)
paths = st.lists(st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=3)
                 .map(lambda parts: b"/".join(parts)), min_size=1, max_size=6, unique=True)
delete = st.sampled_from(["trash", "propagate"])


def _nested(root: Path, rels: list[bytes], outside: Path) -> None:
    rb = os.fsencode(root)
    for rel in rels:
        parent = rel.rpartition(b"/")[0]
        if parent:   # a component may already be a file or a link: then that one is skipped
            with contextlib.suppress(OSError):
                os.makedirs(os.path.join(rb, parent), exist_ok=True)
    plant(root, rels, outside)


@SETTINGS
@given(rels=paths, mode=delete)
def test_hostile_local_names(base: Path, rels: list[bytes], mode: str) -> None:
    box = Box(base, COUNT.next())
    _nested(box.src, rels, box.outside)
    box.configure(f'type = "local"\npath = "{box.dst}"', mode)
    check(box, {})
    rmtree(box.dir)


@SETTINGS
@given(rels=paths, mode=delete)
def test_hostile_names_on_a_directory_remote(base: Path, rels: list[bytes], mode: str) -> None:
    box = Box(base, COUNT.next())
    _nested(box.dst / "pair", rels, box.outside)
    box.configure(f'type = "local"\npath = "{box.dst}"', mode)
    check(box, {})
    rmtree(box.dir)


@SETTINGS
@given(rels=paths, mode=delete)
def test_hostile_names_on_sftp(base: Path, sshd: SSHServer, rels: list[bytes], mode: str) -> None:
    box = Box(base, COUNT.next())
    _nested(box.dst / "pair", rels, box.outside)
    box.configure(sshd.remote_toml(box.dst, timeout="5s"), mode)
    check(box, {})
    rmtree(box.dir)


@SETTINGS
@given(keys=st.lists(st.sampled_from(KEYS), min_size=1, max_size=8, unique=True), mode=delete)
def test_hostile_s3_keys(base: Path, s3server: S3Server, keys: list[str], mode: str) -> None:
    c: Any = s3server.client()
    with contextlib.suppress(Exception):
        c.create_bucket(Bucket="hostile")
    box = Box(base, COUNT.next())
    prefix = f"b{COUNT.n}"
    c.put_object(Bucket="hostile", Key=f"{TOKEN}-decoy", Body=b"outside the prefix")
    put = []
    for k in keys:
        try:
            c.put_object(Bucket="hostile", Key=f"{prefix}/pair/{k}", Body=b"hostile " + k.encode())
            put.append(k)
        except Exception:   # a key the server refuses (moto: none so far) is not listed either
            continue
    assert put, "the server refused every key"

    def outside() -> dict[str, str]:
        out = {}
        for page in c.get_paginator("list_objects_v2").paginate(Bucket="hostile"):
            for o in page.get("Contents", ()):
                if not o["Key"].startswith(f"{prefix}/"):
                    out[o["Key"]] = o["ETag"]
        return out

    box.configure(f'type = "s3"\nbucket = "hostile"\nprefix = "{prefix}"\n'
                  f'endpoint_url = "{s3server.endpoint}"\nregion = "us-east-1"\n'
                  'addressing_style = "path"\ntimeout = "5s"', mode)
    _nested(box.src, [b"caf\xc3\xa9.txt", b"a\\..\\b"], box.outside)
    def synced() -> bool:
        return "Contents" in c.list_objects_v2(Bucket="hostile", Prefix=f"{prefix}/pair/normal.txt")

    check(box, dict(S3Server.ENV), outside, synced)
    rmtree(box.dir)

"""`syncd reconcile` to a real OpenSSH sshd, as a user runs it: subprocess, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import SYNCD, Run, kind_change_run, run_syncd, tree, write_file
from tests.e2e.test_reconcile_cli import FILES as BASE_FILES
from tests.servers import SSHServer

pytestmark = pytest.mark.e2e

FILES = {**BASE_FILES,
         **{f"many/{i % 7}/f{i}.txt": f"file {i}\n".encode() * (i % 13) for i in range(300)}}

CONFIG = """\
[daemon]
state_dir = "{state}"
log_format = "json"
retry_initial = "10ms"
retry_max = "50ms"
max_attempts = {attempts}

[remotes.box]
type = "sftp"
host = "127.0.0.1"
port = {port}
user = "{user}"
root = "{root}"
key_file = "{key}"
known_hosts = "{known_hosts}"
host_key_policy = "{policy}"
use_agent = false
timeout = "5s"
transfers = {transfers}

[[sync]]
name = "docs"
local = "{src}"
remote = "box"
path = "docs"
delete = "propagate"
ignore = ["*.tmp"]
"""


class SftpSetup:
    def __init__(self, tmp: Path, srv: SSHServer, *, policy: str = "strict",
                 known_hosts: Path | None = None, key: Path | None = None, attempts: int = 3,
                 transfers: int = 4):
        self.tmp, self.srv = tmp, srv
        self.src, self.root, self.state = tmp / "src", tmp / "remote-root", tmp / "state"
        self.src.mkdir(exist_ok=True)
        self.root.mkdir(exist_ok=True)
        self.config = tmp / "config.toml"
        self.config.write_text(CONFIG.format(
            state=self.state, port=srv.port, user=srv.user, root=self.root,
            key=key or srv.client_key, known_hosts=known_hosts or srv.known_hosts,
            policy=policy, src=self.src, attempts=attempts, transfers=transfers))

    @property
    def mirror(self) -> Path:
        return self.root / "docs"

    def write(self, rel: str, data: bytes) -> None:
        write_file(self.src, rel, data)

    def reconcile(self, *extra: str) -> Run:
        return run_syncd("reconcile", "--config", str(self.config), "--json", *extra)


def test_reconcile_to_sshd_mirrors_then_idle_then_exact_changes(tmp_path: Path, sshd: SSHServer) -> None:
    s = SftpSetup(tmp_path, sshd)
    for rel, data in FILES.items():
        s.write(rel, data)
    s.write("skip.tmp", b"ignored")
    r = s.reconcile()
    assert r.code == 0, r.err
    assert r.summary["uploaded"] == len(FILES) and r.summary["failed"] == []
    assert tree(s.mirror) == FILES
    for rel in ("a.txt", "dir/b.bin", "big.bin"):   # whole-second mtimes and modes kept
        a, b = (s.src / rel).stat(), (s.mirror / rel).stat()
        assert int(a.st_mtime) == int(b.st_mtime) and a.st_mode == b.st_mode
    assert not list(s.mirror.rglob(".syncd-tmp-*"))

    r = s.reconcile()
    assert r.code == 0 and r.summary["uploaded"] == 0 and r.summary["deleted"] == 0, r.out

    s.write("a.txt", b"alpha v2\n")
    s.write("dir/sub/c.txt", b"gamma v2\n")
    s.write("empty", b"no longer empty")
    (s.src / "dir/b.bin").unlink()
    (s.src / "with space/d e.txt").unlink()
    s.write("new/one.txt", b"new")
    plan = s.reconcile("--dry-run")
    got = sorted((a["op"], a["path"]) for a in plan.summary["plan"])
    assert [x for x in got if x[0] != "rmdir"] == sorted([
        ("upload", "a.txt"), ("upload", "dir/sub/c.txt"), ("upload", "empty"),
        ("delete_remote", "dir/b.bin"), ("delete_remote", "with space/d e.txt"), ("mkdir", "new"),
        ("upload", "new/one.txt")])
    r = s.reconcile()
    assert r.code == 0, r.err
    want = {k: v for k, v in FILES.items() if k not in ("dir/b.bin", "with space/d e.txt")}
    want.update({"a.txt": b"alpha v2\n", "dir/sub/c.txt": b"gamma v2\n",
                 "empty": b"no longer empty", "new/one.txt": b"new"})
    assert tree(s.mirror) == want


def test_a_chmod_alone_goes_over_sftp_without_the_content(tmp_path: Path,
                                                          sshd: SSHServer) -> None:
    """chmod on a synced file: the remote file gets the new bits through SETSTAT, and is
    the same file (inode) with the same bytes; the dry run says attrs. Then a touch: the
    remote mtime follows (SFTP keeps whole seconds), still no bytes sent."""
    s = SftpSetup(tmp_path, sshd)
    s.write("x.txt", b"ours")
    old = time.time() - 100   # not racy: trusted to the stat cache from now on
    os.utime(s.src / "x.txt", (old, old))
    assert s.reconcile().code == 0
    ino = (s.mirror / "x.txt").stat().st_ino
    os.chmod(s.src / "x.txt", 0o751)
    plan = s.reconcile("--dry-run")
    assert [(a["op"], a["reason"]) for a in plan.summary["plan"]] == [("attrs", "mode changed")]
    r = s.reconcile()
    assert r.code == 0, r.err
    assert (r.summary["attrs_set"], r.summary["uploaded"]) == (1, 0)
    st = (s.mirror / "x.txt").stat()
    assert st.st_mode & 0o777 == 0o751 and st.st_ino == ino
    assert (s.mirror / "x.txt").read_bytes() == b"ours"
    r = s.reconcile()
    assert (r.summary["attrs_set"], r.summary["uploaded"]) == (0, 0)
    new = time.time_ns() - 50 * 10**9
    os.utime(s.src / "x.txt", ns=(new, new))
    r = s.reconcile()
    assert r.code == 0, r.err
    assert (r.summary["attrs_set"], r.summary["uploaded"]) == (1, 0)
    st = (s.mirror / "x.txt").stat()
    assert st.st_mtime_ns == new // 10**9 * 10**9 and st.st_ino == ino
    r = s.reconcile()
    assert (r.summary["attrs_set"], r.summary["uploaded"], r.code) == (0, 0, 0)


def test_remote_drift_is_detected_and_overwritten(tmp_path: Path, sshd: SSHServer) -> None:
    s = SftpSetup(tmp_path, sshd)
    s.write("x.txt", b"ours")
    assert s.reconcile().code == 0
    (s.mirror / "x.txt").write_bytes(b"changed behind syncd's back")
    r = s.reconcile()
    assert r.code == 0 and r.summary["uploaded"] == 1
    assert any(e.get("event") == "remote_drift" for e in r.events())
    assert (s.mirror / "x.txt").read_bytes() == b"ours"


def test_unknown_host_key_exits_3_with_fingerprint(tmp_path: Path, sshd: SSHServer) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    s = SftpSetup(tmp_path, sshd, known_hosts=empty)
    s.write("a.txt", b"a")
    r = s.reconcile()
    assert r.code == 3, r.err
    fp = subprocess.run(["ssh-keygen", "-lf", str(sshd.host_key.with_suffix(".pub"))],
                        capture_output=True, text=True).stdout.split()[1]
    assert fp in r.out + r.err and "remote 'box'" in r.out
    assert "Traceback" not in r.err
    assert not s.mirror.exists()


def test_accept_new_then_changed_key_refused(tmp_path: Path, sshd: SSHServer) -> None:
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    with SSHServer(tmp_path / "srv") as srv:
        s = SftpSetup(tmp_path, srv, policy="accept-new", known_hosts=empty)
        s.write("a.txt", b"a")
        r = s.reconcile()
        assert r.code == 0, r.err
        assert any(e.get("event") == "host_key_accepted" for e in r.events())
        assert (s.state / "known_hosts").exists()
        srv.stop()
        srv.host_key.unlink()
        srv.host_key.with_suffix(".pub").unlink()
        srv.start()                      # same address, new host key
        s.write("b.txt", b"b")
        r = s.reconcile()
        assert r.code == 3 and "MISMATCH" in r.out, r.out
        assert not (s.mirror / "b.txt").exists()


def test_wrong_key_exits_3_naming_the_remote(tmp_path: Path, sshd: SSHServer) -> None:
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    s = SftpSetup(tmp_path, sshd, key=other)
    s.write("a.txt", b"a")
    r = s.reconcile()
    assert r.code == 3
    assert "remote 'box'" in r.out and "authentication" in r.out and "Traceback" not in r.err


def test_sshd_killed_mid_transfer_then_next_run_completes(tmp_path: Path, sshd: SSHServer) -> None:
    """The server dies during a large upload and stays down for the retries: the run ends
    with failures (exit 1), the final name never shows a partial file, and once the server
    is back the next run completes the upload and leaves no temp file behind."""
    big = os.urandom(96 << 20)
    with SSHServer(tmp_path / "srv") as srv:
        s = SftpSetup(tmp_path, srv, attempts=2)
        s.write("big.bin", big)
        s.write("small.txt", b"small")
        final = s.mirror / "big.bin"
        seen_partial: list[int] = []
        stop = threading.Event()

        def watch() -> None:    # the final name must only ever hold the whole file
            while not stop.is_set():
                try:
                    n = final.stat().st_size
                except FileNotFoundError:
                    n = None
                if n is not None and n != len(big):
                    seen_partial.append(n)
                time.sleep(0.005)

        # A daemon: a failing assertion below must not leave it keeping pytest alive.
        t = threading.Thread(target=watch, daemon=True)
        t.start()
        proc = subprocess.Popen(
            [*_syncd_cmd(), "reconcile", "--config", str(s.config), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:   # wait until the upload is under way
                tmps = list(s.mirror.glob(".syncd-tmp-*")) if s.mirror.exists() else []
                if any(_size(p) > (8 << 20) for p in tmps):
                    break
                time.sleep(0.01)
            else:
                pytest.fail("upload never started")
            srv.stop()
            srv.kill_sessions()
            subprocess.run(["pkill", "-9", "-f", f"sshd: {srv.user}"], check=False)
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode in (1, 3), err
        assert not final.exists() or final.read_bytes() == big
        srv.start()
        r = s.reconcile()
        stop.set()
        t.join()
        assert r.code == 0, r.err
        assert final.read_bytes() == big and (s.mirror / "small.txt").read_bytes() == b"small"
        assert seen_partial == []
        # The cut upload's temp (unique per attempt, tagged with this state dir) is
        # removed by that next run: nothing of ours is in flight while it plans.
        assert not list(s.mirror.glob(".syncd-tmp-*"))
        # A temp of someone else (another state dir) is left alone until it is stale.
        foreign = s.mirror / ".syncd-tmp-0ther-123456"
        foreign.write_bytes(b"someone else's upload in progress")
        assert s.reconcile().code == 0 and foreign.exists()
        old = time.time() - 3600
        os.utime(foreign, (old, old))
        assert s.reconcile().code == 0 and not foreign.exists()
        assert final.read_bytes() == big


def _size(p: Path) -> int:
    """A temp file's size; 0 once it is gone (renamed into place between glob and stat)."""
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


def _syncd_cmd() -> list[str]:
    return [str(SYNCD)] if SYNCD.exists() else [sys.executable, "-m", "syncd"]


def test_kind_changes_converge_over_sftp(tmp_path: Path, sshd: SSHServer) -> None:
    """A folder replaced by a file and a file by a folder: one run, exact mirror."""
    s = SftpSetup(tmp_path, sshd)
    r = kind_change_run(s, keepers=6)   # 4 removals <= max_delete = 50%
    assert r.code == 0 and r.summary["failed"] == [], r.err
    assert tree(s.mirror) == tree(s.src)
    assert s.reconcile().summary["uploaded"] == 0


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB ext4 mounted as the remote root: a server disk that fills up. Needs root
    and loop devices (CI runs as root); elsewhere the test says so and skips."""
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4"):
        pytest.skip("making a full filesystem needs root and mkfs.ext4 (e2fsprogs)")
    img, mnt = tmp_path / "disk.img", tmp_path / "remote-root"
    mnt.mkdir()
    subprocess.run(["truncate", "-s", "8M", str(img)], check=True)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot loop-mount a test filesystem here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_on_server_fails_that_file_clearly(tmp_path: Path, sshd: SSHServer,
                                                     tiny_fs: Path) -> None:
    """The server's disk is full: OpenSSH answers a bare "failure". That file fails with
    an error that says what it usually means (exit 1), the others are synced, no temp file
    is left on the full disk, and once the file fits the next run completes."""
    # One upload at a time: small.txt must not be sent while big.bin fills the disk.
    s = SftpSetup(tmp_path, sshd, attempts=2, transfers=1)
    assert s.root == tiny_fs
    s.write("big.bin", os.urandom(16 << 20))
    s.write("small.txt", b"small")
    r = s.reconcile()
    assert r.code == 1, r.err
    assert [f["path"] for f in r.summary["failed"]] == ["big.bin"]
    assert "disk or quota is full" in r.summary["failed"][0]["error"]
    assert "Traceback" not in r.err
    assert (s.mirror / "small.txt").read_bytes() == b"small"
    assert not (s.mirror / "big.bin").exists()
    assert not list(s.mirror.glob(".syncd-tmp-*"))
    s.write("big.bin", b"now it fits\n" * 1000)
    r = s.reconcile()
    assert r.code == 0, r.err
    assert (s.mirror / "big.bin").read_bytes() == b"now it fits\n" * 1000


def test_a_server_stopped_mid_run_is_one_outage_and_exit_3(tmp_path: Path, sshd: SSHServer) -> None:
    """sshd stops while hundreds of files are on their way: the run ends soon with exit 3
    and one line for the pair (not a failure per file), no job is parked as failed or
    loses an attempt, and the next run once the server is back sends the rest."""
    files = {f"f/{i:03}.bin": os.urandom(256 << 10) for i in range(300)}
    with SSHServer(tmp_path / "srv") as srv:
        s = SftpSetup(tmp_path, srv, attempts=2)
        s.config.write_text(s.config.read_text().replace('timeout = "5s"', 'timeout = "2s"'))
        for rel, data in files.items():
            s.write(rel, data)
        proc = subprocess.Popen([*_syncd_cmd(), "reconcile", "--config", str(s.config)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:   # stop the server once uploads land
                if s.mirror.exists() and len(list(s.mirror.rglob("*.bin"))) >= 20:
                    break
                time.sleep(0.01)
            else:
                pytest.fail("uploads never started")
            t0 = time.monotonic()
            srv.kill_sessions()   # the live connections (children of the listener)...
            srv.stop()            # ...then the listener: new ones are refused
            out, err = proc.communicate(timeout=60)
            ended_s = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 3, (out, err)
        assert ended_s < 30, ended_s   # a bound on a hang, a few timeouts at most
        lines = out.splitlines()
        assert lines[0].startswith("pair docs: REMOTE UNAVAILABLE") and len(lines) == 2, out
        assert "remote 'box'" in lines[1] and "(unavailable since" in lines[1]
        assert "attempts intact" in lines[1]
        names = [e.get("event") for e in Run(0, "", err).events()]
        assert names.count("remote_unavailable") == 1 and "job_failed" not in names, names
        st = run_syncd("status", "--config", str(s.config), "--json")
        (p,) = json.loads(st.out)["pairs"]
        assert p["failed"] == [] and p["queued"] > 0
        srv.start()
        r = s.reconcile()
        assert r.code == 0, r.err
        assert tree(s.mirror) == files and not list(s.mirror.rglob(".syncd-tmp-*"))


def test_a_lost_index_never_adopts_an_older_version_of_the_same_second(
        tmp_path: Path, sshd: SSHServer) -> None:
    """SFTP keeps whole seconds: a file rewritten with the same size within the second it
    was sent in looks equal to the old copy. With the index lost, the next run sends it
    again instead of adopting the old bytes for good."""
    s = SftpSetup(tmp_path, sshd)
    t = 1_700_000_000 * 10**9
    s.write("f.txt", b"version one")
    os.utime(s.src / "f.txt", ns=(t + 100_000_000, t + 100_000_000))
    assert s.reconcile().code == 0
    s.write("f.txt", b"version two")                     # same size, same second
    os.utime(s.src / "f.txt", ns=(t + 900_000_000, t + 900_000_000))
    shutil.rmtree(s.state)
    r = s.reconcile()
    assert r.code == 0, r.err
    assert r.summary["adopted"] == 0 and r.summary["uploaded"] == 1
    assert (s.mirror / "f.txt").read_bytes() == b"version two"
    assert s.reconcile().summary["uploaded"] == 0        # and in sync from then on

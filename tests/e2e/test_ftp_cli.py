"""`syncd reconcile` to a real FTP/FTPS server (pyftpdlib in its own process), as a user
runs it: mirror, idle, changes; wrong password; untrusted certificate; plain FTP warned;
LIST-only and rename-refusing servers; a server stopped mid-upload, then a resume."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Run, kind_change_run, run_syncd, tree, write_file
from tests.e2e.test_reconcile_cli import FILES
from tests.servers import FTPServer

pytestmark = pytest.mark.e2e


class FTPSetup:
    def __init__(self, tmp: Path, srv: FTPServer, root: str = "/"):
        self.srv = srv
        self.src = tmp / "src"
        self.src.mkdir()
        self.state = tmp / "state"
        self.config = tmp / "config.toml"
        self.mirror = srv.root / "docs"
        self.config.write_text(f"""[daemon]
state_dir = "{self.state}"
log_format = "json"
retry_initial = "10ms"
retry_max = "50ms"
max_attempts = 2

{srv.remote_toml("partner", root=root, timeout='"5s"')}
[[sync]]
name = "docs"
local = "{self.src}"
remote = "partner"
path = "docs"
delete = "propagate"
""")

    def write(self, rel: str, data: bytes) -> Path:
        return write_file(self.src, rel, data)

    def reconcile(self, *extra: str, env: dict[str, str] | None = None) -> Run:
        e = {FTPServer.PASSWORD_ENV: FTPServer.PASSWORD, **(env or {})}
        return run_syncd("reconcile", "--config", str(self.config), "--json", *extra, env=e)

    def tree(self) -> dict[str, bytes]:
        out = {}
        for p in sorted(self.mirror.rglob("*")):
            if p.is_file() and not p.name.startswith(".syncd-"):
                out[p.relative_to(self.mirror).as_posix()] = p.read_bytes()
        return out

    def temps(self) -> list[str]:
        return [p.name for p in self.srv.root.rglob(".syncd-tmp-*")]


@pytest.fixture
def own_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[FTPServer]:
    """A server of the test's own: (tls, extra server flags) from the test's parameter."""
    tls, extra = request.param
    srv = FTPServer(tmp_path / "srv", tls=tls, extra=extra).start()
    try:
        yield srv
    finally:
        srv.stop()


def test_reconcile_to_ftps_mirrors_idles_and_applies_changes(tmp_path: Path,
                                                             ftpserver: FTPServer) -> None:
    (ftpserver.root / tmp_path.name).mkdir()     # the shared server, a root of our own
    s = FTPSetup(tmp_path, ftpserver, root=f"/{tmp_path.name}")
    s.mirror = ftpserver.root / tmp_path.name / "docs"
    for rel, data in FILES.items():
        s.write(rel, data)
    r = s.reconcile()
    assert r.code == 0, r.err
    assert r.summary["uploaded"] == len(FILES)
    assert s.tree() == FILES
    mt = (s.src / "a.txt").stat().st_mtime_ns // 10**9
    assert int((s.mirror / "a.txt").stat().st_mtime) == mt       # MFMT kept the mtime
    assert FTPServer.PASSWORD not in r.err + r.out

    r = s.reconcile()
    assert r.code == 0 and r.summary["uploaded"] == 0 and r.summary["deleted"] == 0, r.out

    s.write("a.txt", b"alpha v2")
    (s.src / "dir/b.bin").unlink()
    s.write("new/deep/n.txt", b"new")
    r = s.reconcile()
    assert r.code == 0, r.err
    want = {k: v for k, v in FILES.items() if k != "dir/b.bin"}
    want.update({"a.txt": b"alpha v2", "new/deep/n.txt": b"new"})
    assert s.tree() == want
    assert s.temps() == []


def test_wrong_password_exits_3_naming_the_remote(tmp_path: Path, ftpserver: FTPServer) -> None:
    s = FTPSetup(tmp_path, ftpserver)
    s.write("a.txt", b"a")
    r = s.reconcile(env={FTPServer.PASSWORD_ENV: "not-the-password"})
    assert r.code == 3, r.err + r.out
    assert "remote 'partner'" in r.out and "530" in r.out and "Traceback" not in r.err
    assert "not-the-password" not in r.out + r.err


def test_certificate_from_an_unknown_ca_is_refused(tmp_path: Path, ftpserver: FTPServer) -> None:
    s = FTPSetup(tmp_path, ftpserver)
    # No ca_file: the system's CAs do not know the test CA.
    s.config.write_text("\n".join(x for x in s.config.read_text().splitlines()
                                  if not x.startswith("ca_file")) + "\n")
    s.write("a.txt", b"a")
    r = s.reconcile()
    assert r.code == 3, r.err + r.out
    assert "certificate" in r.out and "ca_file" in r.out and "Traceback" not in r.err
    assert not s.mirror.exists()


@pytest.mark.parametrize("own_server", [("none", ())], indirect=True)
def test_plain_ftp_works_and_is_flagged(tmp_path: Path, own_server: FTPServer) -> None:
    s = FTPSetup(tmp_path, own_server)
    s.write("x/a.txt", b"plain")
    r = s.reconcile()
    assert r.code == 0, r.err
    assert s.tree() == {"x/a.txt": b"plain"}
    assert any(e.get("event") == "ftp_insecure" and e.get("remote") == "partner"
               for e in r.events())
    c = run_syncd("config", "check", "--config", str(s.config), "--connect",
                  env={FTPServer.PASSWORD_ENV: FTPServer.PASSWORD})
    assert c.code == 0, c.err
    assert "warning: remotes.partner" in c.out and "clear text" in c.out
    assert "remote 'partner': OK" in c.out and "listing MLSD" in c.out


@pytest.mark.parametrize("own_server", [("explicit", ("--no-mlsd", "--no-mfmt",
                                                      "--no-rename-over"))], indirect=True)
def test_list_only_server_without_mfmt_or_rename_over(tmp_path: Path,
                                                      own_server: FTPServer) -> None:
    """A server with LIST but no MLSD/MLST, no MFMT, refusing RNTO onto an existing file:
    still mirrors, idles without re-sending, and replaces files (delete, then rename)."""
    s = FTPSetup(tmp_path, own_server)
    for rel, data in FILES.items():
        s.write(rel, data)
    r = s.reconcile()
    assert r.code == 0, r.err
    assert s.tree() == FILES
    r = s.reconcile()
    assert r.code == 0 and r.summary["uploaded"] == 0, r.out
    s.write("a.txt", b"replaced over a refusing server")
    r = s.reconcile()
    assert r.code == 0 and r.summary["uploaded"] == 1, r.err
    assert s.tree()["a.txt"] == b"replaced over a refusing server"
    c = run_syncd("config", "check", "--config", str(s.config), "--connect", "--json",
                  env={FTPServer.PASSWORD_ENV: FTPServer.PASSWORD})
    assert c.code == 0, c.err
    import json

    probe = json.loads(c.out)["connect"]["partner"]
    assert probe["ok"] and probe["listing"] == "LIST" and probe["mfmt"] is False


@pytest.mark.parametrize("own_server", [("none", ("--throttle", "4000000"))],
                         indirect=True)
def test_server_stopped_mid_upload_then_resumed(tmp_path: Path, own_server: FTPServer) -> None:
    """The server dies while a 12 MiB file is being sent (~4 MB/s): nothing appears under
    the final name; after a restart the next run appends the rest to the same temp."""
    import subprocess

    from tests.e2e.conftest import SYNCD

    s = FTPSetup(tmp_path, own_server)
    data = os.urandom(12 << 20)
    s.write("big.bin", data)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    env[FTPServer.PASSWORD_ENV] = FTPServer.PASSWORD
    proc = subprocess.Popen([str(SYNCD), "reconcile", "--config", str(s.config), "--json"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        partial = 0
        while time.monotonic() < deadline and proc.poll() is None:
            temps = list(own_server.root.rglob(".syncd-tmp-*"))
            partial = temps[0].stat().st_size if temps else 0
            if partial >= 2 << 20:
                break
            time.sleep(0.05)
        assert partial >= 2 << 20, "the upload never got going"
        own_server.stop()                                 # the server dies mid-upload
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (s.mirror / "big.bin").exists()            # never a partial final file
    kept = sum(p.stat().st_size for p in own_server.root.rglob(".syncd-tmp-*"))
    assert kept >= partial

    own_server.start()
    r = s.reconcile()
    assert r.code == 0, r.err
    assert s.tree() == {"big.bin": data}
    resumed = [e for e in r.events() if e.get("event") == "upload_resumed"]
    assert resumed and resumed[0]["bytes_done"] >= partial
    appe = [t for t in own_server.transfers() if t["cmd"] == "APPE"]
    assert appe and appe[-1]["completed"] and appe[-1]["bytes"] == len(data) - resumed[0]["bytes_done"]
    assert s.temps() == []


def test_kind_changes_converge_over_ftps(tmp_path: Path, ftpserver: FTPServer) -> None:
    """A folder replaced by a file and a file by a folder: one run, exact mirror."""
    (ftpserver.root / tmp_path.name).mkdir()
    s = FTPSetup(tmp_path, ftpserver, root=f"/{tmp_path.name}")
    s.mirror = ftpserver.root / tmp_path.name / "docs"
    r = kind_change_run(s, keepers=6)   # 4 removals <= max_delete = 50%
    assert r.code == 0 and r.summary["failed"] == [], r.err
    assert s.tree() == tree(s.src)
    assert (s.mirror / "was_dir").is_file()
    assert s.reconcile().summary["uploaded"] == 0

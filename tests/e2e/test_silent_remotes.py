"""`syncd reconcile` and `syncd run` against servers that accept and then go silent: exit 3
within a few timeouts, every run (nothing left behind), and the daemon's other pairs go on."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import SYNCD, run_syncd, write_file
from tests.e2e.test_daemon import wait_for
from tests.servers import S3Server
from tests.silent import SilentServer

pytestmark = pytest.mark.e2e

TIMEOUT = 3
# What a run may take at most: a hang (the bug) never ends; a bounded run ends in about one
# timeout plus start-up. Not a speed assertion.
BOUND = 4 * TIMEOUT + 3

SFTP = ('type = "sftp"\nhost = "127.0.0.1"\nport = {port}\nuser = "nobody"\nroot = "/"\n'
        'known_hosts = "{kh}"\nuse_agent = false\ntimeout = "{t}s"')
S3 = ('type = "s3"\nbucket = "silent"\nendpoint_url = "http://127.0.0.1:{port}"\n'
      'region = "us-east-1"\naddressing_style = "path"\ntimeout = "{t}s"')
FTP = ('type = "ftp"\nhost = "127.0.0.1"\nport = {port}\nuser = "u"\ntls = "explicit"\n'
       'timeout = "{t}s"')
CASES = {
    "sftp-banner-then-silence": (SFTP, b"SSH-2.0-OpenSSH_9.2\r\n"),
    "sftp-no-banner": (SFTP, b""),
    "s3-silent": (S3, b""),
    "ftps-no-greeting": (FTP, b""),
}


def config(tmp: Path, remote: str, port: int) -> Path:
    src = tmp / "src"
    write_file(src, "f.txt", b"x")
    kh = tmp / "known_hosts"
    kh.touch()
    cfg = tmp / "config.toml"
    cfg.write_text(f'[daemon]\nstate_dir = "{tmp / "state"}"\nlog_format = "json"\n\n'
                   f'[remotes.dead]\n{remote.format(port=port, kh=kh, t=TIMEOUT)}\n\n'
                   f'[[sync]]\nname = "p"\nlocal = "{src}"\nremote = "dead"\npath = "x"\n')
    return cfg


@pytest.mark.parametrize("case", list(CASES))
def test_reconcile_against_a_silent_server_exits_3_in_bounded_time(case: str,
                                                                   tmp_path: Path) -> None:
    remote, greeting = CASES[case]
    with SilentServer(greeting) as srv:
        cfg = config(tmp_path, remote, srv.port)
        for _ in range(3):   # every run, not only the first: nothing is left behind
            t0 = time.monotonic()
            r = run_syncd("reconcile", "--config", str(cfg), env=S3Server.ENV)
            took = time.monotonic() - t0
            assert r.code == 3, r.err
            assert took < BOUND, f"{took:.1f} s"
            assert "Traceback" not in r.err and "dead" in r.err + r.out


DAEMON = """\
[daemon]
state_dir = "{state}"
log_format = "json"
debounce = "100ms"
max_delay = "1s"
retry_initial = "50ms"
retry_max = "500ms"
shutdown_timeout = "10s"

[remotes.dead]
{dead}

[remotes.nas]
type = "local"
path = "{dst}"

[[sync]]
name = "stuck"
local = "{src_dead}"
remote = "dead"
path = "x"

[[sync]]
name = "docs"
local = "{src}"
remote = "nas"
path = "docs"
"""


@pytest.mark.parametrize("greeting", [b"SSH-2.0-OpenSSH_9.2\r\n", b""],
                         ids=["banner-then-silence", "no-banner"])
def test_daemon_keeps_other_pairs_going_beside_a_silent_sftp_server(greeting: bytes,
                                                                    tmp_path: Path) -> None:
    src, src_dead, dst = tmp_path / "src", tmp_path / "src-dead", tmp_path / "dst"
    for d in (src, src_dead, dst):
        d.mkdir()
    write_file(src_dead, "stuck.txt", b"s")
    write_file(src, "first.txt", b"1")
    kh = tmp_path / "known_hosts"
    kh.touch()
    log = tmp_path / "daemon.log"
    with SilentServer(greeting) as srv:
        cfg = tmp_path / "config.toml"
        cfg.write_text(DAEMON.format(
            state=tmp_path / "state", dst=dst, src=src, src_dead=src_dead,
            dead=SFTP.format(port=srv.port, kh=kh, t=TIMEOUT)))
        proc = subprocess.Popen([str(SYNCD), "run", "--config", str(cfg)],
                                stdout=subprocess.DEVNULL, stderr=log.open("ab"),
                                stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda: (dst / "docs/first.txt").exists() or proc.poll() is not None,
                     timeout=30, what="the local pair's initial sync")
            assert proc.poll() is None, log.read_text()[-3000:]
            write_file(src, "second.txt", b"2")
            wait_for(lambda: (dst / "docs/second.txt").exists() or proc.poll() is not None,
                     timeout=30, what="an event on the local pair")
            # Several connection attempts to the silent server have failed by now.
            time.sleep(2 * TIMEOUT)
            assert proc.poll() is None, log.read_text()[-3000:]
            assert (dst / "docs/second.txt").read_bytes() == b"2"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert "internal_error" not in log.read_text() and "Traceback" not in log.read_text()

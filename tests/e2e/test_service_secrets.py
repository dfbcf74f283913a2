"""Secrets from files, as a systemd service gets them (LoadCredential= puts them in
$CREDENTIALS_DIRECTORY): `syncd reconcile`, `run` and `config check` against real FTP and
SSH servers; clear errors and exit codes when the file is missing, the variable unset, or
a secret is given twice."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.e2e.conftest import Run, run_syncd, tree, write_file
from tests.servers import FTPServer, SSHServer

pytestmark = pytest.mark.e2e

FTP_CONFIG = """\
[daemon]
state_dir = "{state}"
log_format = "json"
max_attempts = 2

[remotes.partner]
type = "ftp"
host = "127.0.0.1"
port = {port}
user = "{user}"
{secret}
root = "{root}"
tls = "explicit"
ca_file = "{ca}"
timeout = "5s"

[[sync]]
name = "docs"
local = "{src}"
remote = "partner"
path = "docs"
"""


class Setup:
    def __init__(self, tmp: Path, srv: FTPServer,
                 secret: str = 'password_file = "${{CREDENTIALS_DIRECTORY}}/ftp_password"'):
        self.tmp, self.srv = tmp, srv
        self.src = tmp / "src"
        self.creds = tmp / "credentials"   # what systemd's LoadCredential= would make
        self.creds.mkdir(mode=0o700)
        (srv.root / tmp.name).mkdir()
        self.mirror = srv.root / tmp.name / "docs"
        self.config = tmp / "config.toml"
        self.config.write_text(FTP_CONFIG.format(
            state=tmp / "state", port=srv.port, user=srv.USER, root=f"/{tmp.name}",
            ca=srv.ca_file, src=self.src, secret=secret.format(creds=self.creds)))
        write_file(self.src, "a.txt", b"alpha")

    def credential(self, name: str, content: str) -> Path:
        p = self.creds / name
        p.write_text(content)
        p.chmod(0o400)
        return p

    def syncd(self, *args: str, creds: bool = True) -> Run:
        # The test server's password variable (SYNCD_*) never reaches syncd: run_syncd
        # drops every SYNCD_ variable, so only the file can log it in.
        env = {"CREDENTIALS_DIRECTORY": str(self.creds)} if creds else {}
        return run_syncd(*args, "--config", str(self.config), env=env)


def no_traceback(r: Run) -> None:
    assert "Traceback" not in r.err and "Traceback" not in r.out, r.err


def test_ftp_password_from_a_credential_file(tmp_path: Path, ftpserver: FTPServer) -> None:
    s = Setup(tmp_path, ftpserver)
    s.credential("ftp_password", FTPServer.PASSWORD + "\n")
    r = s.syncd("reconcile", "--json")
    assert r.code == 0, r.err
    assert tree(s.mirror) == {"a.txt": b"alpha"}
    assert FTPServer.PASSWORD not in r.out + r.err
    c = s.syncd("config", "check", "--connect")
    assert c.code == 0, c.err
    assert f"password_file: {s.creds}/ftp_password" in c.out
    assert "remote 'partner': OK" in c.out and FTPServer.PASSWORD not in c.out + c.err


def test_wrong_password_in_the_file_is_refused_without_showing_it(
        tmp_path: Path, ftpserver: FTPServer) -> None:
    s = Setup(tmp_path, ftpserver)
    s.credential("ftp_password", "not-the-password-42\n")
    r = s.syncd("reconcile")
    assert r.code == 3, r.err
    assert "remote 'partner'" in r.out + r.err and "not-the-password-42" not in r.out + r.err
    no_traceback(r)


def test_a_missing_credential_file_is_a_clear_error_with_exit_3(
        tmp_path: Path, ftpserver: FTPServer) -> None:
    s = Setup(tmp_path, ftpserver)   # LoadCredential= for ftp_password forgotten
    want = (f"remote 'partner': remotes.partner.password_file = \"{s.creds}/ftp_password\": "
            "the file does not exist; create it holding only the secret, or fix the path; "
            "under systemd, check that the unit's LoadCredential= provides ftp_password")
    r = s.syncd("reconcile")
    assert r.code == 3 and want in r.out + r.err, r.out + r.err
    no_traceback(r)
    c = s.syncd("config", "check", "--connect")
    assert c.code == 3 and f"remote 'partner': FAILED: {want}" in c.out, c.out + c.err
    no_traceback(c)
    # Without --connect the file is not read; check says it is not there (yet).
    c = s.syncd("config", "check")
    assert c.code == 0 and f"{s.creds}/ftp_password does not exist (yet)" in c.out, c.out
    no_traceback(c)


def test_credentials_directory_unset_outside_systemd(tmp_path: Path,
                                                     ftpserver: FTPServer) -> None:
    """The service's config checks out by hand (with a note); what needs the file says
    why it is not there and how to try it."""
    s = Setup(tmp_path, ftpserver)
    c = s.syncd("config", "check", creds=False)
    assert c.code == 0, c.err
    assert "password_file: ${CREDENTIALS_DIRECTORY}/ftp_password" in c.out
    assert ("warning: remotes.partner.password_file = \"${CREDENTIALS_DIRECTORY}/ftp_password\""
            ": not checked here: $CREDENTIALS_DIRECTORY is set only when systemd starts syncd "
            "with LoadCredential=") in c.out, c.out
    r = s.syncd("reconcile", creds=False)
    assert r.code == 3 and "$CREDENTIALS_DIRECTORY is set only when systemd" in r.err, r.err
    no_traceback(r)


@pytest.mark.parametrize("command", [("config", "check"), ("reconcile",), ("run",)])
def test_a_secret_from_both_a_file_and_a_variable_exits_2(
        tmp_path: Path, ftpserver: FTPServer, command: tuple[str, ...]) -> None:
    s = Setup(tmp_path, ftpserver, secret='password_file = "{creds}/ftp_password"\n'
                                          'password_env = "FTP_PASSWORD"')
    s.credential("ftp_password", FTPServer.PASSWORD)
    r = s.syncd(*command)
    assert r.code == 2, r.err
    assert (f"{s.config}: remotes.partner.password_file: and password_env are both set; keep "
            "one: password_file to read the password from a file (a systemd credential), or "
            "password_env to read it from an environment variable") in r.err, r.err
    no_traceback(r)


def test_sftp_key_and_passphrase_from_credentials(tmp_path: Path, sshd: SSHServer) -> None:
    """key_file and passphrase_file under $CREDENTIALS_DIRECTORY, as in docs/service.md."""
    import subprocess

    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    key = creds / "sftp_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "phrase 7", "-f", str(key)],
                   check=True)
    with sshd.authorized.open("a") as f:
        f.write(key.with_suffix(".pub").read_text())
    key.with_suffix(".pub").unlink()
    (creds / "sftp_passphrase").write_text("phrase 7\n")
    root = tmp_path / "remote"
    root.mkdir()
    src = tmp_path / "src"
    write_file(src, "b.txt", b"beta")
    body = sshd.remote_toml(root).replace(f'key_file = "{sshd.client_key}"',
                                          'key_file = "${CREDENTIALS_DIRECTORY}/sftp_key"\n'
                                          'passphrase_file = "${CREDENTIALS_DIRECTORY}/'
                                          'sftp_passphrase"')
    config = tmp_path / "config.toml"
    config.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nlog_format = "json"\n\n'
                      f'[remotes.box]\n{body}\n\n[[sync]]\nname = "docs"\nlocal = "{src}"\n'
                      'remote = "box"\npath = "docs"\n')
    r = run_syncd("reconcile", "--config", str(config),
                  env={"CREDENTIALS_DIRECTORY": str(creds)})
    assert r.code == 0, r.err
    assert tree(root / "docs") == {"b.txt": b"beta"} and "phrase 7" not in r.out + r.err
    shutil.rmtree(tmp_path / "state")
    r = run_syncd("reconcile", "--config", str(config))   # not under systemd
    assert r.code == 3, r.err
    assert ("remote 'box': remotes.box.passphrase_file = \"${CREDENTIALS_DIRECTORY}/"
            "sftp_passphrase\": $CREDENTIALS_DIRECTORY is set only when systemd") in r.out, r.out
    no_traceback(r)

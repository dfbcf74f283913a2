"""Real servers on 127.0.0.1 for tests and benchmarks: a throwaway OpenSSH sshd.

Each server lives in a temp dir (config, keys, logs), listens on a free loopback port and
is stopped (terminate, then kill) by `stop()`. Nothing outside its directory is touched,
except /run/sshd, which sshd insists on when started as root (an empty directory).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import ClassVar

# scripts/test.sh sets this: in CI a missing server binary is a failure, never a skip.
REQUIRE_ENV = "SYNCD_TEST_REQUIRE_SERVERS"


class ServerMissing(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"server did not listen on 127.0.0.1:{port} within {timeout} s")


def _keygen(path: Path, kind: str = "ed25519", passphrase: str = "") -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", passphrase, "-C", "syncd-test",
                    "-f", str(path)], check=True, stdin=subprocess.DEVNULL)


def sshd_binary() -> str:
    found = shutil.which("sshd") or next(
        (p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if os.access(p, os.X_OK)), None)
    if found is None or shutil.which("ssh-keygen") is None:
        raise ServerMissing("OpenSSH sshd/ssh-keygen not found: install openssh-server "
                            "(scripts/test.sh does it when run as root)")
    return found


class SSHServer:
    """A throwaway OpenSSH sshd (internal-sftp, key auth) serving `root`."""

    def __init__(self, workdir: Path):
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.user = _user()
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.host_key = self.dir / "host_ed25519"
        self.client_key = self.dir / "client_ed25519"
        self.known_hosts = self.dir / "known_hosts"
        self.authorized = self.dir / "authorized_keys"
        self.log = self.dir / "sshd.log"
        self.extra_config = ""

    def start(self) -> SSHServer:
        binary = sshd_binary()
        if not self.host_key.exists():
            _keygen(self.host_key)
        if not self.client_key.exists():
            _keygen(self.client_key)
            self.authorized.write_text(self.client_key.with_suffix(".pub").read_text())
        if os.geteuid() == 0:   # sshd refuses to start without its privilege-separation dir
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        last: Exception | None = None
        for _ in range(3):     # a free port can be taken between probe and bind: retry
            self.port = self.port or free_port()
            cfg = self.dir / "sshd_config"
            cfg.write_text(self._config())
            self.proc = subprocess.Popen([binary, "-D", "-e", "-f", str(cfg)],
                                         stdout=subprocess.DEVNULL,
                                         stderr=self.log.open("ab"), stdin=subprocess.DEVNULL)
            try:
                wait_port(self.port, self.proc, self.log)
                break
            except RuntimeError as e:
                last = e
                self.stop()
                self.port = 0
        else:
            raise RuntimeError(f"sshd would not start: {last}")
        pub = self.host_key.with_suffix(".pub").read_text().split()
        self.known_hosts.write_text(f"[{self.host}]:{self.port} {pub[0]} {pub[1]}\n")
        return self

    def remote_toml(self, root: Path, timeout: str = "5s") -> str:
        """The body of a [remotes.NAME] table for syncd pointing at this server."""
        return (f'type = "sftp"\nhost = "{self.host}"\nport = {self.port}\n'
                f'user = "{self.user}"\nroot = "{root}"\nkey_file = "{self.client_key}"\n'
                f'known_hosts = "{self.known_hosts}"\nuse_agent = false\ntimeout = "{timeout}"')

    def restart(self) -> None:
        """Stop and start on the same port (same host key)."""
        self.stop()
        port = self.port
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:   # wait until the old listener is gone
            try:
                with socket.create_connection((self.host, port), 0.2):
                    time.sleep(0.05)
            except OSError:
                break
        self.port = port
        self.start()

    def _config(self) -> str:
        return "\n".join([
            f"Port {self.port}",
            f"ListenAddress {self.host}",
            f"HostKey {self.host_key}",
            f"PidFile {self.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized}",
            "StrictModes no",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "Subsystem sftp internal-sftp",
            "LogLevel ERROR",
            "MaxSessions 64",
            "MaxStartups 64:30:128",
            self.extra_config,
            "",
        ])

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)

    def kill_sessions(self) -> None:
        """Kill every per-connection sshd child (drops live connections; the listener stays)."""
        if self.proc is None:
            return
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        for pid in out.stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), 9)

    def __enter__(self) -> SSHServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


class S3Server:
    """moto's S3 server over real HTTP on 127.0.0.1 (a thread of this process)."""

    def __init__(self) -> None:
        self.port = 0
        self.server: object | None = None

    def start(self) -> S3Server:
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as e:   # pragma: no cover - moto[server] is a test dependency
            raise ServerMissing(f"moto's server is not installed ({e}); pip install 'moto[server]'") from None
        self.port = free_port()
        srv = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        srv.start()
        self.server = srv
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return self
            time.sleep(0.02)
        raise RuntimeError("moto server did not start")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    ENV: ClassVar[dict[str, str]] = {"AWS_ACCESS_KEY_ID": "testing",
                                     "AWS_SECRET_ACCESS_KEY": "testing",
                                     "AWS_DEFAULT_REGION": "us-east-1"}

    def client(self) -> object:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()  # type: ignore[attr-defined]
            self.server = None


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of another server (moto) that answers the first
    `fail_first` requests with 503 SlowDown, then forwards everything. Counts requests and
    multipart part uploads (`part_puts`, forwarded ones only). With `parts_allowed` set,
    part uploads beyond that many are refused (`part_fault = "fail"`: 503 SlowDown) or held
    until the proxy stops (`"stall"`: the client hangs as on a dead link)."""

    def __init__(self, upstream_port: int, fail_first: int = 0,
                 parts_allowed: int | None = None, part_fault: str = "fail"):
        import http.server
        import threading

        self.upstream_port = upstream_port
        self.fail_first = fail_first
        self.parts_allowed = parts_allowed
        self.part_fault = part_fault
        self.requests = 0
        self.failed = 0
        self.part_puts = 0
        self.part_numbers: list[int] = []
        self.stalled = threading.Event()     # set once a part upload is being held
        self._release = threading.Event()
        lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_a: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _any(self) -> None:
                import http.client
                import urllib.parse

                body = self._body()
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                is_part = self.command == "PUT" and "partNumber" in query
                with lock:
                    proxy.requests += 1
                    fail = proxy.failed < proxy.fail_first
                    if fail:
                        proxy.failed += 1
                    if is_part and not fail:
                        cap = proxy.parts_allowed
                        if cap is not None and proxy.part_puts >= cap:
                            fail = True
                        else:
                            proxy.part_puts += 1
                            proxy.part_numbers.append(int(query["partNumber"][0]))
                if fail and is_part and proxy.part_fault == "stall":
                    proxy.stalled.set()
                    proxy._release.wait(120)
                    self.close_connection = True
                    return
                if fail:
                    msg = (b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown"
                           b"</Code><Message>Please reduce your request rate.</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "content-length", "connection")}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    r = conn.getresponse()
                    data = r.read()
                finally:
                    conn.close()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


class FTPServer:
    """pyftpdlib (`tests/ftpserver.py`) in its own process on 127.0.0.1: FTPS with a
    certificate from a throwaway CA (trustme) by default, or plain FTP. `stop()` kills it,
    `start()` brings it back on the same port and root (a server restart)."""

    USER = "syncd"
    PASSWORD_ENV = "SYNCD_TEST_FTP_PASSWORD"
    PASSWORD = "s3cret-ftp-pw"

    def __init__(self, base: Path, tls: str = "explicit", extra: tuple[str, ...] = (),
                 transfer_log: bool = True, host: str = "127.0.0.1"):
        self.base = base
        self.host = host
        self.log_transfers = transfer_log
        self.tls = tls
        self.extra = extra
        self.root = base / "root"
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.ca_file = base / "ca.pem"
        self.transfer_log = base / "transfers.jsonl"
        if tls != "none":
            try:
                import trustme
            except ImportError as e:   # pragma: no cover - trustme is a test dependency
                raise ServerMissing(f"trustme is not installed ({e})") from None
            ca = trustme.CA()
            cert = ca.issue_cert("127.0.0.1", "localhost")
            ca.cert_pem.write_to_path(str(self.ca_file))
            cert.cert_chain_pems[0].write_to_path(str(base / "cert.pem"))
            for blob in cert.cert_chain_pems[1:]:
                blob.write_to_path(str(base / "cert.pem"), append=True)
            cert.private_key_pem.write_to_path(str(base / "key.pem"))

    def start(self) -> FTPServer:
        import sys

        try:
            import pyftpdlib  # noqa: F401
        except ImportError as e:   # pragma: no cover - pyftpdlib is a test dependency
            raise ServerMissing(f"pyftpdlib is not installed ({e}); pip install pyftpdlib") from None
        cmd = [sys.executable, "-m", "tests.ftpserver", "--host", self.host,
               "--port", str(self.port), "--root",
               str(self.root), "--user", self.USER, "--password-env", self.PASSWORD_ENV,
               "--tls", self.tls, *self.extra]
        if self.log_transfers:
            cmd += ["--transfer-log", str(self.transfer_log)]
        if self.tls != "none":
            cmd += ["--cert", str(self.base / "cert.pem"), "--key", str(self.base / "key.pem")]
        env = dict(os.environ, **{self.PASSWORD_ENV: self.PASSWORD})
        log = (self.base / "server.log").open("ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log,
                                     cwd=Path(__file__).resolve().parent.parent)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()   # "ready" once listening (or EOF on a crash)
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"FTP server did not start; see {self.base / 'server.log'}")
        return self

    def remote_toml(self, name: str = "ftp", root: str = "/", **extra: str) -> str:
        lines = [f"[remotes.{name}]", 'type = "ftp"', 'host = "127.0.0.1"',
                 f"port = {self.port}", f'user = "{self.USER}"',
                 f'password_env = "{self.PASSWORD_ENV}"', f'root = "{root}"',
                 f'tls = "{self.tls}"']
        if self.tls != "none":
            lines.append(f'ca_file = "{self.ca_file}"')
        lines += [f"{k} = {v}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"

    def transfers(self) -> list[dict[str, object]]:
        import json

        if not self.transfer_log.exists():
            return []
        return [json.loads(x) for x in self.transfer_log.read_text().splitlines() if x]

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.kill()
            p.wait(10)

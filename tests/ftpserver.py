"""A throwaway FTP/FTPS server for tests and benchmarks (pyftpdlib), run as its own process:

    python -m tests.ftpserver --port P --root DIR --user U --password-env VAR
        [--tls none|explicit|implicit --cert PEM --key PEM] [--no-mlsd] [--no-mfmt]
        [--no-rename-over] [--throttle BYTES_PER_S] [--transfer-log FILE] [--workers N]
        [--host 127.0.0.X] [--passive-ports P,P,...]

Listens on 127.0.0.1 (or another loopback address given by --host) only; --passive-ports
limits passive data connections to those ports (a fault proxy listens at the same ports).
--no-mlsd/--no-mfmt hide those commands (a server that only has LIST / cannot set times);
--no-rename-over refuses RNTO onto an existing file (as some servers do);
--transfer-log appends one JSON line per finished or cut transfer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, ClassVar


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--passive-ports", default="")
    ap.add_argument("--root", required=True)
    ap.add_argument("--user", default="syncd")
    ap.add_argument("--password-env", default="FTP_TEST_PASSWORD")
    ap.add_argument("--tls", choices=("none", "explicit", "implicit"), default="explicit")
    ap.add_argument("--cert", default="")
    ap.add_argument("--key", default="")
    ap.add_argument("--no-mlsd", action="store_true")
    ap.add_argument("--no-mfmt", action="store_true")
    ap.add_argument("--no-rename-over", action="store_true")
    ap.add_argument("--throttle", type=int, default=0)
    ap.add_argument("--transfer-log", default="")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--idle-timeout", type=float, default=300.0)
    ap.add_argument("--max-cons-per-ip", type=int, default=0)
    a = ap.parse_args(argv)
    if not a.host.startswith("127."):
        raise SystemExit("--host must be a loopback address")

    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.filesystems import AbstractedFS
    from pyftpdlib.handlers import DTPHandler, FTPHandler, TLS_DTPHandler, TLS_FTPHandler
    from pyftpdlib.servers import FTPServer

    auth = DummyAuthorizer()
    auth.add_user(a.user, os.environ[a.password_env], a.root, perm="elradfmwMT")

    base: Any = FTPHandler if a.tls == "none" else TLS_FTPHandler
    dtp: Any = DTPHandler if a.tls == "none" else TLS_DTPHandler
    if a.throttle:   # a slow link (plain FTP only: pyftpdlib throttles its plain handler)
        from pyftpdlib.handlers import ThrottledDTPHandler

        if a.tls != "none":
            raise SystemExit("--throttle needs --tls none")

        class Throttled(ThrottledDTPHandler):  # type: ignore[misc]
            read_limit = a.throttle

        dtp = Throttled

    class FS(AbstractedFS):  # type: ignore[misc]
        def rename(self, src: str, dst: str) -> None:
            if a.no_rename_over and os.path.exists(dst):
                raise OSError(17, "File exists")
            super().rename(src, dst)

    class Handler(base):  # type: ignore[misc, valid-type]
        authorizer = auth
        abstracted_fs = FS
        dtp_handler = dtp
        banner = "syncd test server"
        permit_foreign_addresses = False
        timeout = a.idle_timeout
        proto_cmds: ClassVar[dict[str, Any]] = dict(base.proto_cmds)

        def handle(self) -> None:
            if a.tls == "implicit":   # TLS from the first byte (port 990 style)
                self.secure_connection(self.ssl_context)
            super().handle()

        def log_transfer(self, cmd: str, filename: str, receive: bool, completed: bool,
                         elapsed: float, bytes: int) -> None:
            if a.transfer_log:
                with open(a.transfer_log, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"cmd": cmd, "file": filename, "completed": completed,
                                        "bytes": bytes}) + "\n")

    if a.passive_ports:
        Handler.passive_ports = [int(p) for p in a.passive_ports.split(",")]
    for cmd in (("MLSD", "MLST") if a.no_mlsd else ()) + (("MFMT",) if a.no_mfmt else ()):
        Handler.proto_cmds.pop(cmd, None)
    if a.tls != "none":
        Handler.certfile = a.cert
        Handler.keyfile = a.key
        Handler.tls_control_required = True
        Handler.tls_data_required = True
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    server = FTPServer((a.host, a.port), Handler)
    server.max_cons = 256
    server.max_cons_per_ip = a.max_cons_per_ip
    print("ready", flush=True)
    server.serve_forever(handle_exit=True, worker_processes=a.workers)


if __name__ == "__main__":
    main()

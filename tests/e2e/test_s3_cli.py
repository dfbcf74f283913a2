"""`syncd reconcile` to moto's S3 server over real HTTP, as a user runs it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Run, kind_change_run, run_syncd, tree, write_file
from tests.e2e.test_reconcile_cli import FILES as BASE_FILES
from tests.servers import S3Server

pytestmark = pytest.mark.e2e

FILES = {**BASE_FILES, "multi/part.bin": os.urandom(12 * 1024 * 1024 + 7)}   # > threshold


class S3Setup:
    def __init__(self, tmp: Path, srv: S3Server, bucket: str):
        self.srv, self.bucket = srv, bucket
        self.c: Any = srv.client()
        self.c.create_bucket(Bucket=bucket)
        self.src = tmp / "src"
        self.src.mkdir()
        self.config = tmp / "config.toml"
        self.config.write_text(f"""[daemon]
state_dir = "{tmp / 'state'}"
log_format = "json"
retry_initial = "10ms"
retry_max = "50ms"
max_attempts = 3

[remotes.bucket]
type = "s3"
bucket = "{bucket}"
prefix = "hosts/web1"
endpoint_url = "{srv.endpoint}"
region = "us-east-1"
addressing_style = "path"
multipart_threshold = "5MiB"
multipart_chunksize = "5MiB"

[[sync]]
name = "docs"
local = "{self.src}"
remote = "bucket"
path = "docs"
delete = "propagate"
""")

    def write(self, rel: str, data: bytes) -> None:
        write_file(self.src, rel, data)

    def reconcile(self, *extra: str) -> Run:
        return run_syncd("reconcile", "--config", str(self.config), "--json", *extra,
                         env=S3Server.ENV)

    def objects(self) -> dict[str, bytes]:
        out = {}
        start = "hosts/web1/docs/"
        for page in self.c.get_paginator("list_objects_v2").paginate(Bucket=self.bucket,
                                                                     Prefix=start):
            for o in page.get("Contents", ()):
                out[o["Key"][len(start):]] = self.c.get_object(Bucket=self.bucket,
                                                               Key=o["Key"])["Body"].read()
        return out


def test_reconcile_to_s3_mirrors_idles_and_applies_changes(tmp_path: Path, s3server: S3Server) -> None:
    s = S3Setup(tmp_path, s3server, "e2e-mirror")
    for rel, data in FILES.items():
        s.write(rel, data)
    r = s.reconcile()
    assert r.code == 0, r.err
    assert r.summary["uploaded"] == len(FILES)
    assert s.objects() == FILES
    import xxhash

    for rel in ("a.txt", "multi/part.bin"):                # single PUT and multipart
        head = s.c.head_object(Bucket=s.bucket, Key=f"hosts/web1/docs/{rel}")
        assert head["Metadata"]["syncd-xxh3"] == xxhash.xxh3_128(FILES[rel]).hexdigest()
        assert head["Metadata"]["syncd-mtime-ns"] == str((s.src / rel).stat().st_mtime_ns)

    r = s.reconcile()
    assert r.code == 0 and r.summary["uploaded"] == 0 and r.summary["deleted"] == 0, r.out

    s.write("a.txt", b"alpha v2")
    (s.src / "dir/b.bin").unlink()
    s.write("new.txt", b"new")
    r = s.reconcile()
    assert r.code == 0, r.err
    want = {k: v for k, v in FILES.items() if k != "dir/b.bin"}
    want.update({"a.txt": b"alpha v2", "new.txt": b"new"})
    assert s.objects() == want


def test_s3_drift_detected_from_the_listing_and_overwritten(tmp_path: Path, s3server: S3Server) -> None:
    s = S3Setup(tmp_path, s3server, "e2e-drift")
    s.write("x.txt", b"ours")
    assert s.reconcile().code == 0
    s.c.put_object(Bucket=s.bucket, Key="hosts/web1/docs/x.txt", Body=b"changed behind us")
    r = s.reconcile()
    assert r.code == 0 and r.summary["uploaded"] == 1
    assert any(e.get("event") == "remote_drift" for e in r.events())
    assert s.objects() == {"x.txt": b"ours"}


def test_kind_changes_converge_on_s3(tmp_path: Path, s3server: S3Server) -> None:
    """A folder replaced by a file and a file by a folder: one run, exact mirror. On S3
    (no directories) the object of a file that became a folder stayed beside the
    folder's keys for good, and the index went on recording it as a file."""
    s = S3Setup(tmp_path, s3server, "kinds")
    r = kind_change_run(s, keepers=6)   # 4 removals <= max_delete = 50%
    assert r.code == 0 and r.summary["failed"] == [], r.err
    assert s.objects() == tree(s.src)
    again = s.reconcile()
    assert again.code == 0 and again.summary["uploaded"] == again.summary["deleted"] == 0


def test_an_endpoint_that_is_not_s3_is_named_not_a_bug(tmp_path: Path) -> None:
    """endpoint_url pointing at a web page or a proxy that answers 200 to anything: the
    error names the endpoint, not an internal error (KeyError: ETag)."""
    import http.server
    import threading

    class Page(http.server.BaseHTTPRequestHandler):
        def _page(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            body = b"<html><body>Welcome</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _page

        def log_message(self, *a: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        src = tmp_path / "src"
        write_file(src, "f.txt", b"x")
        cfg = tmp_path / "c.toml"
        cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path / "state"}"\nmax_attempts = 1\n'
                       f'[remotes.b]\ntype = "s3"\nbucket = "web-page"\nregion = "us-east-1"\n'
                       f'endpoint_url = "http://127.0.0.1:{srv.server_port}"\n'
                       f'addressing_style = "path"\n'
                       f'[[sync]]\nname = "p"\nlocal = "{src}"\nremote = "b"\n')
        r = run_syncd("reconcile", "--config", str(cfg), env=S3Server.ENV)
    finally:
        srv.shutdown()
    assert r.code in (1, 3) and "internal error" not in r.err, r.err
    assert "is endpoint_url an S3 service" in r.err or "is endpoint_url an S3 service" in r.out


def test_missing_bucket_exits_3_naming_it(tmp_path: Path, s3server: S3Server) -> None:
    s = S3Setup(tmp_path, s3server, "e2e-exists")
    s.config.write_text(s.config.read_text().replace('bucket = "e2e-exists"',
                                                     'bucket = "no-such-bucket"'))
    s.write("a.txt", b"a")
    r = s.reconcile()
    assert r.code == 3, r.err
    assert "no-such-bucket" in r.out and "remote 'bucket'" in r.out and "Traceback" not in r.err


def test_s3_throttling_503s_are_retried_to_completion(tmp_path: Path, s3server: S3Server) -> None:
    """A proxy answers the first 12 requests with 503 SlowDown: botocore's retries and the
    queue's backoff absorb them and the reconcile still completes, byte-exact."""
    from tests.servers import FaultProxy

    s = S3Setup(tmp_path, s3server, "e2e-throttle")
    proxy = FaultProxy(s3server.port, fail_first=12)
    try:
        s.config.write_text(s.config.read_text().replace(s3server.endpoint, proxy.endpoint))
        files = {f"t/{i}.txt": f"file {i}".encode() * 100 for i in range(20)}
        files["big.bin"] = os.urandom(11 * 1024 * 1024)      # multipart through the proxy
        for rel, data in files.items():
            s.write(rel, data)
        r = s.reconcile()
        assert r.code == 0, r.err + r.out
        assert proxy.failed == 12 and proxy.requests > 12
        assert s.objects() == files
    finally:
        proxy.stop()


def test_reconcile_killed_mid_multipart_resumes_sending_only_missing_parts(
        tmp_path: Path, s3server: S3Server) -> None:
    """`kill -9` while a multipart upload is half done; the next run continues the same
    upload: the server receives only the parts it did not have (counted by a proxy)."""
    import signal
    import subprocess
    import time

    import xxhash

    from syncd.index import DB_NAME, UploadLog
    from tests.e2e.conftest import SYNCD
    from tests.servers import FaultProxy

    s = S3Setup(tmp_path, s3server, "e2e-resume")
    data = os.urandom(6 * 5 * 1024 * 1024 + 99)          # 7 parts of 5 MiB
    s.write("big.bin", data)
    stall = FaultProxy(s3server.port, parts_allowed=3, part_fault="stall")
    config = s.config.read_text()
    try:
        s.config.write_text(config.replace(s3server.endpoint, stall.endpoint))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
        env.update(S3Server.ENV)
        proc = subprocess.Popen([str(SYNCD), "reconcile", "--config", str(s.config), "--json"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        db = tmp_path / "state" / DB_NAME
        deadline = time.monotonic() + 60
        while not db.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        log = UploadLog(db)
        recorded: dict[int, object] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            rec = log.find("bucket", "hosts/web1/docs/big.bin")
            recorded = log.parts(rec.id) if rec else {}
            if stall.stalled.is_set() and len(recorded) == 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None and len(recorded) == 3, "upload did not reach 3 parts"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        log.close()
    finally:
        stall.stop()
    sent_before = set(stall.part_numbers)
    assert s.objects() == {}                              # nothing published by the cut run

    count = FaultProxy(s3server.port)
    try:
        s.config.write_text(config.replace(s3server.endpoint, count.endpoint))
        r = s.reconcile()
    finally:
        count.stop()
    assert r.code == 0, r.err
    assert sorted(count.part_numbers) == sorted(set(range(1, 8)) - sent_before)
    assert any(e.get("event") == "multipart_resumed" and e.get("parts_done") == 3
               for e in r.events())
    assert s.objects() == {"big.bin": data}
    head = s.c.head_object(Bucket=s.bucket, Key="hosts/web1/docs/big.bin")
    assert head["Metadata"]["syncd-xxh3"] == xxhash.xxh3_128(data).hexdigest()
    assert s.c.list_multipart_uploads(Bucket=s.bucket).get("Uploads", []) == []

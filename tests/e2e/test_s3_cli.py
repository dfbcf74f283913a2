"""`syncd reconcile` to moto's S3 server over real HTTP, as a user runs it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Run, run_syncd, write_file
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

    head = s.c.head_object(Bucket=s.bucket, Key="hosts/web1/docs/a.txt")
    assert head["Metadata"]["syncd-xxh3"] == xxhash.xxh3_128(FILES["a.txt"]).hexdigest()
    assert head["Metadata"]["syncd-mtime-ns"] == str((s.src / "a.txt").stat().st_mtime_ns)

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


def test_stale_multipart_uploads_under_the_pair_are_aborted(s3server: S3Server,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from syncd.remotes.s3 import S3Options, S3Remote

    c: Any = s3server.client()
    c.create_bucket(Bucket="e2e-stale")
    ours = c.create_multipart_upload(Bucket="e2e-stale", Key="p/docs/big.bin")["UploadId"]
    other = c.create_multipart_upload(Bucket="e2e-stale", Key="elsewhere/x.bin")["UploadId"]
    c.upload_part(Bucket="e2e-stale", Key="p/docs/big.bin", UploadId=ours, PartNumber=1,
                  Body=b"x" * (5 << 20))
    r = S3Remote("b", S3Options(bucket="e2e-stale", prefix="p", endpoint_url=s3server.endpoint,
                                region="us-east-1", addressing_style="path"))
    monkeypatch.setattr(S3Remote, "STALE_UPLOAD_S", -60.0)   # everything counts as stale
    assert list(r.list("docs")) == []
    left = {u["UploadId"] for u in c.list_multipart_uploads(Bucket="e2e-stale").get("Uploads", ())}
    assert ours not in left and other in left                # only under the pair's prefix

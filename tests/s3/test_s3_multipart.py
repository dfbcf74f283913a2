"""S3 multipart uploads against moto's server over HTTP: resume from finished parts after
a cut, start over when the source changed, hash metadata, cleanup of our own leftovers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from syncd.errors import SourceChanged, TransientError
from syncd.index import DB_NAME, Index, UploadLog
from syncd.remotes.base import Source
from syncd.remotes.s3 import S3Options, S3Remote
from tests.servers import FaultProxy, S3Server

MiB = 1 << 20
PART = 5 * MiB
_BUCKETS = iter(range(1_000_000))


class Rig:
    """A bucket, a local file, an upload log in a temp state dir, and a remote whose
    traffic goes through a fault proxy (recreated by `through_proxy`)."""

    def __init__(self, tmp: Path, srv: S3Server):
        self.srv, self.tmp = srv, tmp
        self.bucket = f"mp-{next(_BUCKETS)}"
        self.c: Any = srv.client()
        self.c.create_bucket(Bucket=self.bucket)
        state = tmp / "state"
        Index.open(state).close()
        self.log = UploadLog(state / DB_NAME)
        self.file = tmp / "big.bin"
        self.proxies: list[FaultProxy] = []

    def write(self, data: bytes) -> bytes:
        self.file.write_bytes(data)
        return data

    def remote(self, proxy: FaultProxy | None = None) -> S3Remote:
        endpoint = proxy.endpoint if proxy else self.srv.endpoint
        r = S3Remote("arch", S3Options(bucket=self.bucket, prefix="p", endpoint_url=endpoint,
                                       region="us-east-1", addressing_style="path",
                                       multipart_threshold=PART, multipart_chunksize=PART))
        r.uploads = self.log
        return r

    def proxy(self, **kw: Any) -> FaultProxy:
        p = FaultProxy(self.srv.port, **kw)
        self.proxies.append(p)
        return p

    def source(self, expected: bytes | None = None) -> Source:
        s = Source(str(self.file), "big.bin")
        s.expected = expected if expected is not None else xxhash.xxh3_128(
            self.file.read_bytes()).digest()
        return s

    def put(self, r: S3Remote, expected: bytes | None = None) -> Any:
        with self.source(expected) as s:
            return r.put("docs/big.bin", s)

    def uploads(self) -> list[dict[str, Any]]:
        return list(self.c.list_multipart_uploads(Bucket=self.bucket).get("Uploads", ()))

    def body(self) -> bytes:
        return bytes(self.c.get_object(Bucket=self.bucket, Key="p/docs/big.bin")["Body"].read())

    def close(self) -> None:
        for p in self.proxies:
            p.stop()


@pytest.fixture
def rig(tmp_path: Path, s3server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    # One try per request: a refused part fails the put at once instead of after
    # botocore's backoff (the queue's retries are not under test here).
    monkeypatch.setattr(S3Remote, "RETRY_ATTEMPTS", 1)
    r = Rig(tmp_path, s3server)
    try:
        yield r
    finally:
        r.close()


def test_cut_upload_resumes_and_sends_only_the_missing_parts(rig: Rig) -> None:
    data = rig.write(os.urandom(5 * PART + 123))       # 6 parts
    cut = rig.proxy(parts_allowed=2)                    # the link fails after 2 parts
    with pytest.raises(TransientError):
        rig.put(rig.remote(cut))
    first = set(cut.part_numbers)
    assert len(first) == 2
    assert len(rig.uploads()) == 1                      # kept for the resume
    rec = rig.log.find("arch", "p/docs/big.bin")
    assert rec is not None and set(rig.log.parts(rec.id)) == first

    healed = rig.proxy()
    e = rig.put(rig.remote(healed))
    assert sorted(healed.part_numbers) == sorted(set(range(1, 7)) - first)
    assert rig.body() == data and e.size == len(data)
    head = rig.c.head_object(Bucket=rig.bucket, Key="p/docs/big.bin")
    assert head["Metadata"]["syncd-xxh3"] == xxhash.xxh3_128(data).hexdigest()
    assert e.fp == f"{len(data)}:" + head["ETag"].strip('"')
    assert rig.uploads() == [] and rig.log.find("arch", "p/docs/big.bin") is None


def test_changed_source_aborts_the_old_upload_and_starts_over(rig: Rig) -> None:
    rig.write(os.urandom(3 * PART))
    cut = rig.proxy(parts_allowed=1)
    with pytest.raises(TransientError):
        rig.put(rig.remote(cut))
    old = {u["UploadId"] for u in rig.uploads()}
    data = rig.write(os.urandom(3 * PART))              # same size, new content and ctime
    healed = rig.proxy()
    rig.put(rig.remote(healed))
    assert sorted(healed.part_numbers) == [1, 2, 3]     # nothing of the old upload reused
    assert rig.body() == data
    assert not old & {u["UploadId"] for u in rig.uploads()}
    assert rig.uploads() == []


def test_bytes_differing_from_the_scan_hash_never_complete(rig: Rig) -> None:
    """The hash goes into the metadata when the upload is created, before the bytes are
    read: if the bytes read do not match it, the upload is aborted, not published."""
    rig.write(os.urandom(2 * PART + 1))
    with pytest.raises(SourceChanged):
        rig.put(rig.remote(), expected=b"\0" * 16)
    assert rig.uploads() == []
    with pytest.raises(Exception, match=r"NoSuchKey|Not Found|404"):
        rig.c.head_object(Bucket=rig.bucket, Key="p/docs/big.bin")
    assert rig.log.find("arch", "p/docs/big.bin") is None


def test_listing_aborts_only_our_uploads_that_cannot_resume(rig: Rig, tmp_path: Path) -> None:
    rig.write(os.urandom(2 * PART))
    with pytest.raises(TransientError):
        rig.put(rig.remote(rig.proxy(parts_allowed=1)))  # ours, source unchanged: resumable
    keep = {u["UploadId"] for u in rig.uploads()}
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(2 * PART))
    r = rig.remote(rig.proxy(parts_allowed=1))
    with Source(str(other), "other.bin") as s, pytest.raises(TransientError):
        r.put("docs/other.bin", s)                      # ours, source then changed
    changed = {u["UploadId"] for u in rig.uploads()} - keep
    other.write_bytes(b"rewritten")
    foreign = rig.c.create_multipart_upload(Bucket=rig.bucket, Key="p/docs/theirs.bin")["UploadId"]

    assert list(rig.remote().list("docs")) == []
    left = {u["UploadId"] for u in rig.uploads()}
    assert keep <= left and foreign in left and not changed & left
    assert rig.log.find("arch", "p/docs/other.bin") is None


def test_crash_between_create_and_record_is_still_cleaned(rig: Rig) -> None:
    """The intent is logged before CreateMultipartUpload: an upload created just before a
    crash (its id never recorded) is found by key and time and aborted."""
    import time

    rig.write(os.urandom(2 * PART))
    st = rig.file.stat()
    rig.log.begin("arch", "p/docs/big.bin", str(rig.file), st.st_size, st.st_mtime_ns,
                  st.st_ctime_ns, st.st_ino, None, PART, time.time())
    lost = rig.c.create_multipart_upload(Bucket=rig.bucket, Key="p/docs/big.bin")["UploadId"]
    healed = rig.proxy()
    rig.put(rig.remote(healed))
    assert sorted(healed.part_numbers) == [1, 2]
    assert lost not in {u["UploadId"] for u in rig.uploads()}
    assert rig.uploads() == []


def test_upload_aborted_behind_our_back_starts_over(rig: Rig) -> None:
    data = rig.write(os.urandom(3 * PART))
    with pytest.raises(TransientError):
        rig.put(rig.remote(rig.proxy(parts_allowed=1)))
    (up,) = rig.uploads()
    rig.c.abort_multipart_upload(Bucket=rig.bucket, Key=up["Key"], UploadId=up["UploadId"])
    healed = rig.proxy()
    rig.put(rig.remote(healed))                         # ListParts: NoSuchUpload -> fresh
    assert sorted(healed.part_numbers) == [1, 2, 3]
    assert rig.body() == data and rig.uploads() == []


def test_parts_are_whole_even_when_reads_come_back_short() -> None:
    from syncd.remotes.s3 import _read_full

    class Dribble:   # a network file system handing out 1,000 bytes per read
        def __init__(self, data: bytes):
            self.data, self.pos = data, 0

        def read(self, n: int) -> bytes:
            b = self.data[self.pos:self.pos + min(n, 1000)]
            self.pos += len(b)
            return b

    src = Dribble(bytes(range(256)) * 100)               # 25,600 bytes
    parts = []
    while part := _read_full(src, 10_000):  # type: ignore[arg-type]
        parts.append(part)
    assert [len(p) for p in parts] == [10_000, 10_000, 5_600]
    assert b"".join(parts) == bytes(range(256)) * 100


def test_keys_no_path_can_have_are_left_out_of_the_listing(rig: Rig) -> None:
    # 'a//b' or 'd/../e' cannot be a local file: listed, they would be planned for trash
    # (refused as path escapes on every run, counted against max_delete).
    for k in ("p/ok", "p/a//b", "p/d/../e", "p/./c", "p/d/x"):
        rig.c.put_object(Bucket=rig.bucket, Key=k, Body=b"1")
    assert sorted(e.path for e in rig.remote().list("")) == ["d/x", "ok"]


def test_throttling_by_any_code_is_transient_and_a_dead_endpoint_is_not_retried_by_check(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ClientError, ConnectTimeoutError

    from syncd.errors import PermanentError, UnavailableError

    r = S3Remote("arch", S3Options(bucket="b", endpoint_url="http://127.0.0.1:9",
                                   region="us-east-1"))

    def client_error(code: str, status: int) -> ClientError:
        return ClientError({"Error": {"Code": code, "Message": code},
                            "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")

    # S3-compatible servers throttle with codes of their own: the status decides.
    assert isinstance(r._err(client_error("SlowDownWrite", 503)), TransientError)
    assert isinstance(r._err(client_error("TooManyRequests", 429)), TransientError)
    assert isinstance(r._err(client_error("BadGateway", 502)), TransientError)
    assert type(r._err(client_error("InvalidStorageClass", 400))) is PermanentError
    assert type(r._err(client_error("NotImplemented", 501))) is PermanentError   # no retry helps

    calls: list[int] = []

    class Dead:
        def head_bucket(self, **kw: Any) -> None:
            calls.append(1)
            raise ConnectTimeoutError(endpoint_url="http://127.0.0.1:9")

    class Busy:
        def head_bucket(self, **kw: Any) -> None:
            calls.append(1)
            raise client_error("SlowDown", 503)

    # botocore already retried a timeout: check() gives up at once (before: 6 rounds).
    monkeypatch.setattr(r, "_client", Dead())
    with pytest.raises(UnavailableError):
        r.check(sleep=lambda s: None)
    assert len(calls) == 1
    calls.clear()
    monkeypatch.setattr(r, "_client", Busy())
    with pytest.raises(UnavailableError):
        r.check(sleep=lambda s: None)
    assert len(calls) == 6

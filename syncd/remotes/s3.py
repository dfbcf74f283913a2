"""The `s3` remote: a bucket (AWS or any S3-compatible store) through boto3. One PUT below
the multipart threshold, multipart above; botocore's request checksums (CRC32, checked by
the server) on every PUT and part; the xxh3-128 hash and source mtime stored as metadata.
Objects are atomic: a PUT or a completed multipart upload appears whole or not at all.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from syncd.errors import (
    AuthError,
    NotFound,
    PermanentError,
    RemoteError,
    SourceChanged,
    TransientError,
    UnavailableError,
)
from syncd.listing import DIR_FP
from syncd.model import TRASH_DIR, Kind, RemoteEntry
from syncd.remotes.base import Capabilities, Source, check_rel_path

_FILE, _DIR = int(Kind.FILE), int(Kind.DIR)
META_HASH = "syncd-xxh3"
META_MTIME = "syncd-mtime-ns"
PARTS_IN_FLIGHT = 4
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout",
                    "RequestTimeTooSkewed", "Throttling", "ThrottlingException", "500", "502",
                    "503", "504", "OperationAborted"}
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403",
               "ExpiredToken", "InvalidToken", "AllAccessDisabled"}


@dataclass(frozen=True, slots=True)
class S3Options:
    bucket: str
    prefix: str = ""
    region: str = ""
    endpoint_url: str = ""
    profile: str = ""
    addressing_style: str = "auto"
    storage_class: str = "STANDARD"
    sse: str = ""
    sse_kms_key_id: str = ""
    transfers: int = 8
    multipart_threshold: int = 64 << 20
    multipart_chunksize: int = 16 << 20
    timeout: float = 60.0


def _fp(size: int, etag: str) -> str:
    return f"{size}:" + etag.strip('"')


class S3Remote:
    STALE_UPLOAD_S = 3600.0   # an unfinished multipart upload older than this is abandoned
    caps = Capabilities(dirs=False, move=True, mtime_precision_ns=0, atomic_put=True,
                        cpu_bound=False)

    def __init__(self, name: str, opts: S3Options):
        self.name = name
        self.o = opts
        self.base = opts.prefix.strip("/")
        self._client: Any = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.tmp_owner = ""

    # --- client and errors -----------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    self._client = self._make_client()
                    self._pid = os.getpid()
        return self._client

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        o = self.o
        session = boto3.session.Session(profile_name=o.profile or None)
        cfg = Config(region_name=o.region or None, connect_timeout=o.timeout,
                     read_timeout=o.timeout, max_pool_connections=max(10, 2 * o.transfers),
                     retries={"mode": "standard", "max_attempts": 3},
                     s3={"addressing_style": o.addressing_style})
        try:
            return session.client("s3", endpoint_url=o.endpoint_url or None, config=cfg)
        except Exception as e:   # bad profile, no region for a virtual-hosted endpoint...
            raise UnavailableError(f"cannot set up the S3 client: {e}", remote=self.name) from None

    def _err(self, e: Exception, key: str = "") -> RemoteError:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError,
            NoCredentialsError,
        )

        where = f"bucket '{self.o.bucket}'" + (f", key '{key}'" if key else "")
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            msg = err.get("Message") or code
            text = f"{code}: {msg} ({where})"
            if code in ("NoSuchKey", "404", "NotFound"):
                return NotFound(text, remote=self.name, path=key)
            if code in _TRANSIENT_CODES:
                return TransientError(text, remote=self.name, path=key)
            if code in ("NoSuchBucket",):
                return UnavailableError(text, remote=self.name, path=key)
            if code in _AUTH_CODES:
                return AuthError(text, remote=self.name, path=key)
            return PermanentError(text, remote=self.name, path=key)
        if isinstance(e, NoCredentialsError):
            return AuthError(f"no AWS credentials found (profile, environment, instance role) "
                             f"({where})", remote=self.name)
        if isinstance(e, ConnectionError | BotoCoreError):
            return TransientError(f"{type(e).__name__}: {e} ({where})", remote=self.name,
                                  path=key)
        return PermanentError(f"{type(e).__name__}: {e} ({where})", remote=self.name, path=key)

    def _key(self, rel: str) -> str:
        check_rel_path(self.name, rel)
        return f"{self.base}/{rel}" if self.base else rel

    def _extra(self) -> dict[str, Any]:
        o = self.o
        x: dict[str, Any] = {}
        if o.storage_class and o.storage_class != "STANDARD":
            x["StorageClass"] = o.storage_class
        if o.sse:
            x["ServerSideEncryption"] = o.sse
            if o.sse_kms_key_id:
                x["SSEKMSKeyId"] = o.sse_kms_key_id
        return x

    # --- protocol ------------------------------------------------------------------------

    def check(self, attempts: int = 6, sleep: Any = None) -> None:
        import time

        sleep = sleep or time.sleep
        for i in range(attempts):
            try:
                self.client.head_bucket(Bucket=self.o.bucket)
                return
            except Exception as e:
                err = self._err(e)
                # Throttled or a passing 5xx: worth a few more tries before the pair is
                # declared unreachable (botocore already retried each call 3 times).
                if isinstance(err, TransientError) and i < attempts - 1:
                    sleep(min(2.0, 0.2 * 2 ** i))
                    continue
                self._check_failed(err)

    def _check_failed(self, err: RemoteError) -> None:
        if isinstance(err, NotFound):
            raise UnavailableError(f"bucket '{self.o.bucket}' does not exist (or is not "
                                   "visible to these credentials)", remote=self.name)
        if isinstance(err, UnavailableError):
            raise err
        raise UnavailableError(err.reason, remote=self.name)

    def list(self, prefix: str) -> Iterator[RemoteEntry]:
        if prefix:
            check_rel_path(self.name, prefix)
        top = "/".join(x for x in (self.base, prefix) if x)
        start = top + "/" if top else ""
        out: list[RemoteEntry] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.o.bucket, Prefix=start)
            for page in pages:
                for obj in page.get("Contents", ()):
                    rel = obj["Key"][len(start):]
                    if not rel or rel.endswith("/") or rel.split("/", 1)[0] == TRASH_DIR:
                        continue
                    out.append(RemoteEntry(rel, _FILE, obj["Size"], 0,
                                           _fp(obj["Size"], obj["ETag"])))
        except Exception as e:
            raise self._err(e, start) from None
        self._abort_stale_uploads(start)
        return iter(out)

    def _abort_stale_uploads(self, start: str) -> None:
        """Abort multipart uploads under this pair's prefix left by an interrupted run
        (older than STALE_UPLOAD_S): their parts cost storage and are never completed.
        Best effort: a failure here never fails the listing."""
        import datetime

        from syncd import log as slog

        cutoff = datetime.datetime.now(datetime.UTC) - datetime.timedelta(
            seconds=self.STALE_UPLOAD_S)
        with contextlib.suppress(Exception):
            pages = self.client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.o.bucket, Prefix=start)
            for page in pages:
                for up in page.get("Uploads", ()):
                    if up["Initiated"] <= cutoff:
                        self.client.abort_multipart_upload(Bucket=self.o.bucket, Key=up["Key"],
                                                           UploadId=up["UploadId"])
                        slog.get().info("multipart_aborted", remote=self.name, key=up["Key"],
                                        initiated=str(up["Initiated"]))

    def stat(self, path: str) -> RemoteEntry:
        key = self._key(path)
        try:
            h = self.client.head_object(Bucket=self.o.bucket, Key=key)
        except Exception as e:
            raise self._err(e, key) from None
        # mtime 0 everywhere: a listing cannot carry the stored source mtime (metadata), and
        # entries of one object must not differ by where they came from.
        return RemoteEntry(path, _FILE, h["ContentLength"], 0, _fp(h["ContentLength"], h["ETag"]))

    def put(self, path: str, source: Source) -> RemoteEntry:
        key = self._key(path)
        if source.size < self.o.multipart_threshold:
            return self._put_single(path, key, source)
        return self._put_multipart(path, key, source)

    def _meta(self, source: Source) -> dict[str, str]:
        assert source.digest is not None
        return {META_HASH: source.digest.hex(), META_MTIME: str(source.mtime_ns)}

    def _put_single(self, path: str, key: str, source: Source) -> RemoteEntry:
        chunks = []
        while b := source.read(1 << 20):
            chunks.append(b)
        body = b"".join(chunks)
        source.verify()   # before the PUT: a torn read never becomes an object
        try:
            r = self.client.put_object(Bucket=self.o.bucket, Key=key, Body=body,
                                       Metadata=self._meta(source), **self._extra())
        except Exception as e:
            raise self._err(e, key) from None
        return RemoteEntry(path, _FILE, len(body), 0, _fp(len(body), r["ETag"]))

    def _put_multipart(self, path: str, key: str, source: Source) -> RemoteEntry:
        c, bucket = self.client, self.o.bucket
        # Metadata is fixed when a multipart upload is created, before the bytes (and so
        # the hash) are known: multipart objects carry the mtime, the index their hash.
        try:
            up = c.create_multipart_upload(Bucket=bucket, Key=key,
                                           Metadata={META_MTIME: str(source.mtime_ns)},
                                           **self._extra())
        except Exception as e:
            raise self._err(e, key) from None
        uid = up["UploadId"]
        parts: list[dict[str, Any]] = []
        try:
            with ThreadPoolExecutor(max_workers=PARTS_IN_FLIGHT) as pool:
                futs = []
                n = 0
                # S3 takes at most 10,000 parts: grow them for very large files (in MiB).
                part = max(self.o.multipart_chunksize, -(-source.size // 9_000))
                part = -(-part // (1 << 20)) << 20
                while data := source.read(part):
                    n += 1
                    while len([f for f in futs if not f.done()]) >= PARTS_IN_FLIGHT:
                        futs[[f.done() for f in futs].index(False)].result()
                    futs.append(pool.submit(c.upload_part, Bucket=bucket, Key=key, UploadId=uid,
                                            PartNumber=n, Body=data))
                for i, f in enumerate(futs, 1):
                    parts.append({"PartNumber": i, "ETag": f.result()["ETag"]})
            source.verify()   # before completing: the object appears only now
            r = c.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=uid,
                                            MultipartUpload={"Parts": parts})
        except BaseException as e:
            with contextlib.suppress(Exception):   # best effort; nothing was published
                c.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=uid)
            if isinstance(e, SourceChanged | RemoteError):
                raise
            if isinstance(e, Exception):
                raise self._err(e, key) from None
            raise
        return RemoteEntry(path, _FILE, source.sent, 0, _fp(source.sent, r["ETag"]))

    def get(self, path: str, dest: str) -> RemoteEntry:
        key = self._key(path)
        try:
            r = self.client.get_object(Bucket=self.o.bucket, Key=key)
            with open(dest, "wb") as f:
                for chunk in r["Body"].iter_chunks(1 << 20):
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise PermanentError(f"cannot write local file {dest}: {e.strerror}", path=path) from None
        except Exception as e:
            raise self._err(e, key) from None
        size = r["ContentLength"]
        return RemoteEntry(path, _FILE, size, 0, _fp(size, r["ETag"]))

    def mkdir(self, path: str) -> RemoteEntry:
        self._key(path)   # validate; directories are implicit in S3
        return RemoteEntry(path, _DIR, 0, 0, DIR_FP)

    def delete(self, paths: Sequence[str]) -> None:
        keys = [self._key(p) for p in paths]
        for i in range(0, len(keys), 1000):
            batch = keys[i:i + 1000]
            try:
                r = self.client.delete_objects(
                    Bucket=self.o.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True})
            except Exception as e:
                raise self._err(e, batch[0]) from None
            errs = r.get("Errors") or []
            if errs:
                e0 = errs[0]
                raise PermanentError(f"{e0.get('Code')}: {e0.get('Message')} "
                                     f"({len(errs)} keys not deleted)", remote=self.name,
                                     path=e0.get("Key", ""))

    def rmdir(self, path: str) -> bool:
        self._key(path)
        return True

    def move(self, src: str, dst: str) -> None:
        """Server-side copy (multipart copy for big objects, by boto3), then delete."""
        skey, dkey = self._key(src), self._key(dst)
        try:
            self.client.copy({"Bucket": self.o.bucket, "Key": skey}, self.o.bucket, dkey,
                             ExtraArgs=self._extra() or None)
        except Exception as e:
            raise self._err(e, skey) from None
        self.delete([src])

    def close(self) -> None:
        self._client = None


__all__ = ["S3Options", "S3Remote"]

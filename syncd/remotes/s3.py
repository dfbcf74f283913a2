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
from typing import TYPE_CHECKING, Any

from syncd import log as slog
from syncd.errors import (
    AuthError,
    ConnectionLost,
    NotFound,
    PathEscape,
    PermanentError,
    RemoteError,
    SourceChanged,
    TransientError,
    UnavailableError,
)
from syncd.index import IndexError_
from syncd.listing import DIR_FP
from syncd.model import TRASH_DIR, Kind, RemoteEntry
from syncd.remotes.base import Capabilities, Source, check_rel_path, free_name

if TYPE_CHECKING:
    from syncd.index import UploadLog

_FILE, _DIR = int(Kind.FILE), int(Kind.DIR)
META_HASH = "syncd-xxh3"
META_MTIME = "syncd-mtime-ns"
# Parts sent at once per upload. 8 MiB x 8 moved 1 GiB to moto in 6.55 s (median of 5),
# 16 MiB x 4 in 7.14 s, 8 MiB x 10 in 6.85 s, 8 MiB x 4 in 7.28 s; the same 64 MiB of
# buffers as 16 x 4.
PARTS_IN_FLIGHT = 8
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
    multipart_chunksize: int = 8 << 20
    timeout: float = 60.0


_FORK_LOCK = threading.Lock()   # guards the reset of a client inherited across fork()


def _code(e: BaseException) -> str:
    """The S3 error code of a botocore ClientError ("" for anything else)."""
    resp = getattr(e, "response", None)
    return str(resp.get("Error", {}).get("Code", "")) if isinstance(resp, dict) else ""


def _unreachable(e: BaseException | None) -> bool:
    """Whether a botocore error is about the endpoint as a whole: it refused or never
    accepted the connection, or did not answer within the timeout. (A connection closed
    mid-request is not: a pooled connection the server dropped meanwhile looks the same,
    and a retry on a fresh one is what helps.)"""
    from botocore.exceptions import (
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
    )

    return isinstance(e, ConnectTimeoutError | ReadTimeoutError | EndpointConnectionError)


def _no_retry_when_unreachable(caught_exception: BaseException | None = None,
                               **_: Any) -> None:
    """botocore's needs-retry hook (registered first): raising here ends the call with
    that error instead of retrying it."""
    if caught_exception is not None and _unreachable(caught_exception):
        raise caught_exception


def _read_full(source: Source, n: int) -> bytes:
    """n bytes (fewer only at the end of the file): one read may return less on network
    file systems, and part boundaries must not shift."""
    first = source.read(n)
    if len(first) == n or not first:
        return first
    chunks = [first]
    got = len(first)
    while got < n and (b := source.read(n - got)):
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def _part_dict(n: int, etag: str, checksum: str | None) -> dict[str, Any]:
    d: dict[str, Any] = {"PartNumber": n, "ETag": etag}
    if checksum:
        d["ChecksumCRC32"] = checksum
    return d


def _syncable(rel: str) -> bool:
    """Whether a key (relative to the pair's prefix) is a path a file can have."""
    try:
        check_rel_path("", rel, backslash=True)
    except PathEscape:
        return False
    return True


def _need(resp: Any, field: str, remote: str) -> Any:
    """A field an S3 answer always has: missing, the endpoint is not S3 (a web page, a
    proxy answering 200), which a bare KeyError would report as a syncd bug."""
    try:
        return resp[field]
    except (KeyError, TypeError):
        raise PermanentError(f"the endpoint's answer has no {field}: is endpoint_url an S3 "
                             "service (not a web page or a proxy)?", remote=remote) from None


def _fp(size: int, etag: str) -> str:
    return f"{size}:" + etag.strip('"')


class S3Remote:
    RETRY_ATTEMPTS = 3               # botocore's own tries per request, before the queue's
    RESUME_MAX_AGE_S = 7 * 86400.0   # an unfinished upload of ours older than this is aborted
    caps = Capabilities(dirs=False, move=True, mtime_precision_ns=0, atomic_put=True,
                        cpu_bound=False, backslash=True, case_sensitive=True)

    def __init__(self, name: str, opts: S3Options):
        self.name = name
        self.o = opts
        self.base = opts.prefix.strip("/")
        self._client: Any = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.tmp_owner = ""
        self.uploads: UploadLog | None = None   # set by open_remote: resumable multipart
        self.log = slog.get()

    # --- client and errors -----------------------------------------------------------------

    @property
    def client(self) -> Any:
        if self._pid != os.getpid():
            # A forked child: the parent's client (its connections) and lock are not ours;
            # the lock may even have been held by a parent thread at fork time.
            with _FORK_LOCK:
                if self._pid != os.getpid():
                    self._lock, self._client = threading.Lock(), None
                    self._pid = os.getpid()
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._client = self._make_client()
        return self._client

    def prepare(self) -> None:
        """Uploads are coming: import botocore and build the client in the background
        (~0.3 s) while the listing runs elsewhere. Errors are left for the first real call."""
        def build() -> None:
            with contextlib.suppress(Exception):
                _ = self.client

        threading.Thread(target=build, name=f"s3-client-{self.name}", daemon=True).start()

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        o = self.o
        session = boto3.session.Session(profile_name=o.profile or None)
        # Enough connections for every part of every upload in flight (no churn).
        pool = min(128, max(10, o.transfers * PARTS_IN_FLIGHT))
        cfg = Config(region_name=o.region or None, connect_timeout=o.timeout,
                     read_timeout=o.timeout, max_pool_connections=pool,
                     retries={"mode": "standard", "max_attempts": self.RETRY_ATTEMPTS},
                     s3={"addressing_style": o.addressing_style})
        try:
            client = session.client("s3", endpoint_url=o.endpoint_url or None, config=cfg)
        except Exception as e:   # bad profile, no region for a virtual-hosted endpoint...
            raise UnavailableError(f"cannot set up the S3 client: {e}", remote=self.name) from None
        # botocore retries a request that timed out or could not connect like a throttled
        # one: an endpoint that never answers then costs RETRY_ATTEMPTS timeouts per call.
        # Such a failure is about the endpoint, not the request: it ends the call at once,
        # and the queue (and the remote's unavailability) decide what comes next.
        client.meta.events.register_first("needs-retry.s3", _no_retry_when_unreachable)
        return client

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
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            # By status too: S3-compatible servers throttle with codes of their own
            # (MinIO's SlowDownWrite, a proxy's 502 BadGateway, 429 TooManyRequests); not
            # 501 Not Implemented, which no retry changes.
            if code in _TRANSIENT_CODES or (status >= 500 and status != 501) or status == 429:
                return TransientError(text, remote=self.name, path=key)
            if code in ("NoSuchBucket",):
                return UnavailableError(text, remote=self.name, path=key)
            if code in _AUTH_CODES:
                return AuthError(text, remote=self.name, path=key)
            return PermanentError(text, remote=self.name, path=key)
        if _unreachable(e):
            return ConnectionLost(f"{type(e).__name__}: {e} ({where}; timeout "
                                  f"{self.o.timeout:g} s)", remote=self.name, path=key)
        if isinstance(e, NoCredentialsError):
            return AuthError(f"no AWS credentials found (profile, environment, instance role) "
                             f"({where})", remote=self.name)
        if isinstance(e, ConnectionError | BotoCoreError):
            return TransientError(f"{type(e).__name__}: {e} ({where})", remote=self.name,
                                  path=key)
        return PermanentError(f"{type(e).__name__}: {e} ({where})", remote=self.name, path=key)

    def _key(self, rel: str) -> str:
        check_rel_path(self.name, rel, backslash=self.caps.backslash)
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
                # declared unreachable (botocore already retried each call 3 times). Not
                # a timeout or a refused connection (ConnectionLost): the endpoint itself
                # did not answer, and asking again would only wait again.
                if (isinstance(err, TransientError) and not isinstance(err, ConnectionLost)
                        and i < attempts - 1):
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
            check_rel_path(self.name, prefix, backslash=self.caps.backslash)
        top = "/".join(x for x in (self.base, prefix) if x)
        start = top + "/" if top else ""
        out: list[RemoteEntry] = []
        unsyncable: list[str] = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.o.bucket, Prefix=start)
            for page in pages:
                for obj in page.get("Contents", ()):
                    rel = obj["Key"][len(start):]
                    if not rel or rel.endswith("/") or rel.split("/", 1)[0] == TRASH_DIR:
                        continue
                    if not _syncable(rel):
                        unsyncable.append(rel)
                        continue
                    out.append(RemoteEntry(rel, _FILE, obj["Size"], 0,
                                           _fp(obj["Size"], obj["ETag"])))
        except Exception as e:
            raise self._err(e, start) from None
        if unsyncable:
            # Keys no file path can map to ('a//b', 'd/../e'): never a sync's to delete or
            # overwrite, so they are left out of the listing (and out of max_delete).
            self.log.warning("s3_keys_skipped", remote=self.name, count=len(unsyncable),
                             keys=[start + k for k in unsyncable[:10]],
                             error="key with an empty, '.' or '..' component: no file "
                                   "path maps to it, so syncd leaves it alone")
        self._clean_uploads(start)
        return iter(out)

    def _clean_uploads(self, start: str) -> None:
        """Abort our unfinished multipart uploads under this listing that can never be
        resumed: the source file changed or vanished, or the record is older than
        RESUME_MAX_AGE_S. Other uploads are not ours to touch (an S3 lifecycle rule
        `AbortIncompleteMultipartUpload` handles those). Best effort: never fails the listing."""
        import time

        if self.uploads is None:
            return
        with contextlib.suppress(Exception):
            for rec in self.uploads.under(self.name, start):
                try:
                    st = os.stat(rec.source, follow_symlinks=False)
                    same = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) == (
                        rec.size, rec.mtime_ns, rec.ctime_ns, rec.inode)
                except OSError:
                    same = False
                if not same:
                    self._abort_record(rec, "source changed")
                elif time.time() - rec.created > self.RESUME_MAX_AGE_S:
                    self._abort_record(rec, "too old")

    def stat(self, path: str) -> RemoteEntry:
        key = self._key(path)
        try:
            h = self.client.head_object(Bucket=self.o.bucket, Key=key)
        except Exception as e:
            raise self._err(e, key) from None
        # mtime 0 everywhere: a listing cannot carry the stored source mtime (metadata), and
        # entries of one object must not differ by where they came from.
        size = h["ContentLength"]
        return RemoteEntry(path, _FILE, size, 0, _fp(size, _need(h, "ETag", self.name)))

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
        return RemoteEntry(path, _FILE, len(body), 0, _fp(len(body), _need(r, "ETag", self.name)))

    def _part_size(self, size: int) -> int:
        # S3 takes at most 10,000 parts: grow them for very large files (whole MiB).
        part = max(self.o.multipart_chunksize, -(-size // 9_000))
        return -(-part // (1 << 20)) << 20

    def _put_multipart(self, path: str, key: str, source: Source) -> RemoteEntry:
        """Multipart upload, resumable: the upload id and each finished part go to the
        upload log, so an upload cut by a crash or a network loss continues from its
        finished parts as long as the source file is unchanged (same size, mtime, ctime,
        inode and expected hash); otherwise it is aborted and started over."""
        c, bucket = self.client, self.o.bucket
        part_size = self._part_size(source.size)
        if source.expected is None:   # a new file, not hashed by the scan: the metadata
            source.expected = source.prehash()   # and the resume check need its hash now
        rec_id, uid, done = self._resume(key, source, part_size)
        if uid is None:
            rec_id, uid = self._create(key, source, part_size)
        parts: dict[int, tuple[str, str | None]] = dict(done)
        try:
            with ThreadPoolExecutor(max_workers=PARTS_IN_FLIGHT) as pool:
                futs: dict[Any, int] = {}
                n = 0
                while data := _read_full(source, part_size):   # parts already there are
                    n += 1                                     # read for the hash only
                    if n in done:
                        continue
                    while len(futs) >= PARTS_IN_FLIGHT:
                        self._part_finished(futs, parts, rec_id)
                    futs[pool.submit(c.upload_part, Bucket=bucket, Key=key, UploadId=uid,
                                     PartNumber=n, Body=data, ChecksumAlgorithm="CRC32")] = n
                while futs:
                    self._part_finished(futs, parts, rec_id)
            digest = source.verify()   # before completing: the object appears only now
            if source.expected is not None and digest != source.expected:
                raise SourceChanged(source.rel, "content differs from the scan's hash")
            r = c.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=uid,
                MultipartUpload={"Parts": [_part_dict(i, *parts[i]) for i in sorted(parts)]})
        except BaseException as e:
            if _code(e) == "NoSuchUpload":
                # Aborted meanwhile (a lifecycle rule, our own cleanup after the source
                # changed) or completed with the answer lost: look, then start over.
                self._forget(rec_id)
                done_entry = self._completed(path, key, source)
                if done_entry is not None:
                    return done_entry
                raise TransientError(f"multipart upload vanished from bucket "
                                     f"'{self.o.bucket}'; starting over", remote=self.name,
                                     path=key) from None
            err: BaseException = e
            if isinstance(e, Exception) and not isinstance(e, SourceChanged | RemoteError):
                err = self._err(e, key)
            # A network loss or a stop (Ctrl-C, shutdown) keeps what was sent; a changed
            # source or a refusal makes the parts useless.
            keep = isinstance(err, TransientError) or not isinstance(err, Exception)
            if not keep:
                self._abort(key, uid, rec_id)
            if err is e:
                raise
            raise err from None
        self._forget(rec_id)
        return RemoteEntry(path, _FILE, source.sent, 0, _fp(source.sent, _need(r, "ETag", self.name)))

    def _completed(self, path: str, key: str, source: Source) -> RemoteEntry | None:
        """The object, if it is the one this upload was completing (our hash metadata and
        size): CompleteMultipartUpload succeeded but its answer was lost."""
        if source.digest is None or source.digest != source.expected:
            return None
        try:
            h = self.client.head_object(Bucket=self.o.bucket, Key=key)
        except Exception:
            return None
        if (h.get("Metadata", {}).get(META_HASH) == source.digest.hex()
                and h["ContentLength"] == source.sent):
            return RemoteEntry(path, _FILE, source.sent, 0, _fp(source.sent, h["ETag"]))
        return None

    def _part_finished(self, futs: dict[Any, int], parts: dict[int, tuple[str, str | None]],
                       rec_id: int) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait

        finished, _ = wait(list(futs), return_when=FIRST_COMPLETED)
        failed: BaseException | None = None
        for f in finished:   # record every part that made it before raising for one that
            n = futs.pop(f)  # did not: they need not be sent again
            exc = f.exception()
            if exc is not None:
                failed = failed or exc
                continue
            r = f.result()
            parts[n] = (_need(r, "ETag", self.name), r.get("ChecksumCRC32"))
            if self.uploads is not None and rec_id:
                with contextlib.suppress(Exception):   # a lost record only costs a resend
                    self.uploads.part_done(rec_id, n, *parts[n])
        if failed is not None:
            for f in futs:   # not started yet: no point now
                f.cancel()
            raise failed

    def _create(self, key: str, source: Source, part_size: int) -> tuple[int, str]:
        import time

        st = source.before
        rec_id = 0
        if self.uploads is not None:
            try:
                rec_id = self.uploads.begin(self.name, key, source.abspath, source.size,
                                            source.mtime_ns, st.st_ctime_ns, st.st_ino,
                                            source.expected, part_size, time.time())
            except IndexError_ as e:   # the state index busy, the disk full: try again later
                raise TransientError(str(e),
                                     remote=self.name, path=key) from None
        # Metadata is fixed when the upload is created, before the bytes are read: it
        # carries the hash the scan computed, and completing checks the bytes sent match.
        meta = {META_MTIME: str(source.mtime_ns)}
        if source.expected is not None:
            meta[META_HASH] = source.expected.hex()
        try:
            up = self.client.create_multipart_upload(Bucket=self.o.bucket, Key=key,
                                                     Metadata=meta, ChecksumAlgorithm="CRC32",
                                                     **self._extra())
        except Exception as e:
            self._forget(rec_id)
            raise self._err(e, key) from None
        try:
            uid = _need(up, "UploadId", self.name)
        except PermanentError:
            self._forget(rec_id)
            raise
        if self.uploads is not None:
            try:
                self.uploads.started(rec_id, uid)
            except IndexError_ as e:
                self._abort(key, uid, rec_id)
                raise TransientError(str(e),
                                     remote=self.name, path=key) from None
        return rec_id, uid

    def _resume(self, key: str, source: Source, part_size: int,
                ) -> tuple[int, str | None, dict[int, tuple[str, str | None]]]:
        """The upload to continue for this key and its finished parts, or (0, None, {})."""
        from syncd import log as slog

        if self.uploads is None:
            return 0, None, {}
        rec = self.uploads.find(self.name, key)
        if rec is None:
            return 0, None, {}
        st = source.before
        same = (rec.upload_id is not None and rec.source == source.abspath
                and (rec.size, rec.mtime_ns, rec.ctime_ns, rec.inode, rec.part_size)
                == (source.size, source.mtime_ns, st.st_ctime_ns, st.st_ino, part_size)
                and rec.hash == source.expected)
        if not same:
            self._abort_record(rec, "source changed")
            return 0, None, {}
        assert rec.upload_id is not None
        mine = self.uploads.parts(rec.id)
        last = -(-source.size // part_size)
        done: dict[int, tuple[str, str | None]] = {}
        try:
            pages = self.client.get_paginator("list_parts").paginate(
                Bucket=self.o.bucket, Key=key, UploadId=rec.upload_id)
            for page in pages:
                for p in page.get("Parts", ()):
                    n = p["PartNumber"]
                    want = part_size if n < last else source.size - part_size * (last - 1)
                    if n in mine and mine[n][0] == p["ETag"] and p["Size"] == want:
                        done[n] = mine[n]
        except Exception as e:
            err = self._err(e, key)
            if isinstance(err, TransientError):
                raise err from None
            if _code(e) == "NoSuchUpload":   # completed, aborted or expired meanwhile
                self._forget(rec.id)
            else:   # e.g. ListParts not allowed: do not leave the parts behind
                self._abort(key, rec.upload_id, rec.id)
            return 0, None, {}
        slog.get().info("multipart_resumed", remote=self.name, key=key, parts_done=len(done),
                        parts=last, bytes_done=sum(part_size if n < last else
                                                   source.size - part_size * (last - 1)
                                                   for n in done))
        return rec.id, rec.upload_id, done

    def _abort(self, key: str, uid: str, rec_id: int) -> None:
        with contextlib.suppress(Exception):   # best effort; nothing was published
            self.client.abort_multipart_upload(Bucket=self.o.bucket, Key=key, UploadId=uid)
        self._forget(rec_id)

    def _abort_record(self, rec: Any, reason: str) -> None:
        """Abort a recorded upload of ours. One whose id was never recorded (a crash right
        after CreateMultipartUpload) is found by its exact key: under our pair's prefix an
        upload of that key is ours (servers' `Initiated` times are not reliable enough to
        narrow it further: moto, for one, reports a fixed date)."""
        from syncd import log as slog

        ids = [rec.upload_id] if rec.upload_id else []
        if not ids:
            with contextlib.suppress(Exception):
                r = self.client.list_multipart_uploads(Bucket=self.o.bucket, Prefix=rec.key)
                ids = [u["UploadId"] for u in r.get("Uploads", ()) if u["Key"] == rec.key]
        for uid in ids:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.o.bucket, Key=rec.key,
                                                   UploadId=uid)
                slog.get().info("multipart_aborted", remote=self.name, key=rec.key,
                                reason=reason)
        self._forget(rec.id)

    def _forget(self, rec_id: int) -> None:
        if self.uploads is not None and rec_id:
            with contextlib.suppress(Exception):
                self.uploads.forget(rec_id)

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
        return RemoteEntry(path, _FILE, size, 0, _fp(size, _need(r, "ETag", self.name)))

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

    def move(self, src: str, dst: str) -> str:
        """Server-side copy (multipart copy for big objects, by boto3) to a key that is
        free, then delete. A copy replaces an existing object, so the key is looked at
        first (a window only a concurrent writer of the same trash key could hit)."""
        skey = self._key(src)
        self.stat(src)   # a missing source is NotFound before anything is written
        target = free_name(self, dst)
        dkey = self._key(target)
        try:
            self.client.copy({"Bucket": self.o.bucket, "Key": skey}, self.o.bucket, dkey,
                             ExtraArgs=self._extra() or None)
        except Exception as e:
            raise self._err(e, skey) from None
        self.delete([src])
        return target

    def close(self) -> None:
        self._client = None


__all__ = ["S3Options", "S3Remote"]

"""Running jobs: one job = re-stat, stream with hashing, atomic publish, verify; a Runner
leases jobs, feeds a thread pool per remote and commits outcomes in batches (base moves
in the same transaction that acks the job)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import (
    FIRST_COMPLETED,
    BrokenExecutor,
    CancelledError,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from dataclasses import dataclass, field
from typing import Any, Protocol

from syncd import log as slog
from syncd.breaker import Breaker, Down, connection_level
from syncd.errors import (
    Conflict,
    ConnectionLost,
    NotFound,
    NotTried,
    PermanentError,
    RemoteChanged,
    RemoteError,
    SourceChanged,
    SyncdError,
    TransientError,
    UnavailableError,
)
from syncd.model import Action, Base, Job, Kind, LocalState, Op, RemoteEntry, phase
from syncd.queue import Outcome, Queue
from syncd.remotes.base import Remote, Source, Staged, join, move
from syncd.scan import hash_file, is_racy, stable

FILE, DIR = int(Kind.FILE), int(Kind.DIR)
PHASE_MIN = -(1 << 30)
COMMIT_EVERY = 256          # outcomes per SQLite transaction, at most
COMMIT_INTERVAL = 0.25      # seconds an outcome may wait for its commit
LEASE_BATCH = 1024          # jobs leased per transaction
# Small jobs are handed to a worker in chunks, as long as they add up to less than the
# byte limit. A directory remote's chunk goes to a worker process and shares one syncfs
# (a journal commit): 256 files a chunk took ~10% less time than 64 for 100k small files.
CHUNK_FILES = 256
CHUNK_BYTES = 4 << 20
# A network remote pipelines a chunk's requests on one channel, so bigger chunks share
# their round trips among more files: a mixed tree (1 KiB-8 MiB) over SFTP moved ~10%
# faster with 16 MiB than with 1 MiB, for less CPU.
NET_CHUNK_FILES = 64
NET_CHUNK_BYTES = 16 << 20
# Files staged (written, not yet published) per worker, at most: about two flushes' worth
# at full speed; the rest of the plan waits in the queue, not in temp files.
STAGED_MAX = 4 * CHUNK_FILES


def _take_chunk(q: deque[Job], max_bytes: int = CHUNK_BYTES, max_files: int = CHUNK_FILES,
                pair: str | None = None, max_phase: int = 0) -> list[Job]:
    """Jobs from the head of `q` for one worker hand-off; with `pair`, only that pair's
    jobs of phase <= max_phase (the chunk stops at the first other one)."""
    chunk = [q.popleft()]
    size = _sends(chunk[0].action)
    while q and len(chunk) < max_files and size + _sends(q[0].action) <= max_bytes:
        if pair is not None and (q[0].pair != pair or phase(q[0].action) > max_phase):
            break
        j = q.popleft()
        size += _sends(j.action)
        chunk.append(j)
    return chunk


def _sends(a: Action) -> int:
    """Bytes a job is expected to send: an attrs or adopt job carries the file's size but
    sends none (a chmod -R over big files must still go in batches)."""
    return a.size if a.op == Op.UPLOAD else 0


def _worker_init(syncd_pid: int = 0) -> None:
    # Ctrl-C goes to the whole process group; the parent decides how to stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Die with syncd: a worker orphaned by `kill -9` must not go on publishing files while
    # a restarted syncd uploads the same paths, nor idle forever. Its parent is the fork
    # server, which would not notice syncd go (the workers hold its "alive" pipe open), so
    # dying with the parent (PR_SET_PDEATHSIG) is not enough: the worker watches syncd's
    # process itself.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))   # PR_SET_PDEATHSIG
    if syncd_pid:
        _watch_syncd(syncd_pid)


def _watch_syncd(pid: int) -> None:
    """End this process when process `pid` (syncd) is gone (Linux pidfd; else only
    PR_SET_PDEATHSIG guards)."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)   # gone already
    except (AttributeError, OSError):
        return

    def wait() -> None:
        select.select([fd], [], [])   # readable once the process has exited
        os._exit(1)

    threading.Thread(target=wait, name="syncd-watch", daemon=True).start()


def _execute_chunk(jobs: list[Job], pairs: dict[str, PairCtx]) -> list[Outcome]:
    # An upload that replaces a remote directory removes it first (execute): never batched.
    uploads = [j for j in jobs if j.action.op == Op.UPLOAD and not j.action.replaces]
    ctx = pairs[jobs[0].pair]
    put_many = getattr(ctx.remote, "put_many", None)
    if len(uploads) < 2 or put_many is None or any(j.pair != ctx.name for j in uploads):
        return _execute_rest(jobs, pairs)
    started, sent = _send_batch(uploads, pairs, put_many)
    batch: dict[int, Outcome] = {}
    for o, src, r in sent:
        if src is not None:
            _uploaded(o, src, r, started)
        batch[o.job.id] = o
    rest = iter(_execute_rest([j for j in jobs if j.id not in batch], pairs))
    return [batch[j.id] if j.id in batch else next(rest) for j in jobs]


def _attrs_job(a: Action, ctx: PairCtx) -> bool:
    """Whether a job goes through _attrs_many: an attrs job, or the adoption of a file on
    a remote that keeps modes (the remote copy then gets the local mode, which a listing
    does not show, so that a base never records a mode the remote may not have)."""
    if a.replaces:
        return False
    return a.op == Op.ATTRS or (a.op == Op.ADOPT and a.kind == FILE and ctx.remote.caps.modes)


def _execute_rest(jobs: list[Job], pairs: dict[str, PairCtx]) -> list[Outcome]:
    """Jobs one by one (execute), but a pair's attrs jobs (and adoptions of files on a
    remote that keeps modes) together (_attrs_many), in the order given."""
    by_pair: dict[str, list[tuple[Outcome, str]]] = {}
    for j in jobs:
        if _attrs_job(j.action, pairs[j.pair]):
            by_pair.setdefault(j.pair, []).append((Outcome(j), ""))
    done: dict[int, Outcome] = {}
    for pair, items in by_pair.items():
        if len(items) < 2:
            continue
        ctx = pairs[pair]
        items = [(o, join(ctx.remote_path, o.job.path)) for o, _ in items]
        t0 = time.perf_counter()
        _attrs_many(items, ctx)
        ms = int((time.perf_counter() - t0) * 1000)
        for o, _ in items:
            o.duration_ms = ms
            done[o.job.id] = o
    out: list[Outcome] = []
    lost: BaseException | None = None
    for j in jobs:
        if j.id in done:
            out.append(done[j.id])
        elif lost is not None:
            # The remote stopped answering: the rest of the chunk is not tried (each
            # could wait a whole timeout); it waits in the queue, attempts intact.
            out.append(Outcome(j, error=_same_failure(lost, j.path)))
        else:
            o = execute(j, pairs[j.pair])
            if connection_level(o.error):
                lost = o.error
            out.append(o)
    return out


def _same_failure(e: BaseException, path: str) -> BaseException:
    if isinstance(e, ConnectionLost):
        return NotTried(f"not tried: {e.reason}", remote=e.remote, path=path)
    if isinstance(e, RemoteError):
        return type(e)(e.reason, remote=e.remote, path=path)
    return e


def _stage_chunk(jobs: list[Job], pairs: dict[str, PairCtx]
                 ) -> tuple[list[Outcome], list[tuple[Outcome, Staged]]]:
    """For a remote that stages (see Runner): the chunk's plain uploads are written to temp
    files and come back staged, to be made durable by the runner's next flush and then
    published; every other job is carried out here, as _execute_chunk would."""
    remote = pairs[jobs[0].pair].remote
    uploads, rest = [], []
    for j in jobs:
        plain = j.action.op == Op.UPLOAD and not j.action.replaces
        (uploads if plain and pairs[j.pair].remote is remote else rest).append(j)
    started, sent = _send_batch(uploads, pairs, remote.stage_many)  # type: ignore[attr-defined]
    done: list[Outcome] = []
    staged: list[tuple[Outcome, Staged]] = []
    for o, src, r in sent:
        if src is None:
            done.append(o)
        else:   # the remote fingerprint is filled in once published
            _uploaded(o, src, RemoteEntry(r.path, FILE, 0, 0, ""), started)
            staged.append((o, r))
    done += _execute_rest(rest, pairs)
    return done, staged


def _send_batch(jobs: list[Job], pairs: dict[str, PairCtx],
                send: Callable[[list[tuple[str, Source]]], list[Any]],
                ) -> tuple[int, list[tuple[Outcome, Source | None, Any]]]:
    """Open the uploads' local files and hand them to `send` (a remote's put_many or
    stage_many) in one call. Returns the start time (for racy mtimes) and per job its
    outcome, its source and what `send` returned for it; the source is None where the
    job is over (the file could not be opened, or `send` failed it): the outcome says
    why."""
    started = time.time_ns()
    t0 = time.perf_counter()
    out: list[tuple[Outcome, Source | None, Any]] = []
    opened: list[tuple[Outcome, Source, str]] = []
    for j in jobs:
        ctx = pairs[j.pair]
        o = Outcome(j)
        src = _open_source(o, ctx)
        if src is None:
            out.append((o, None, None))
        else:
            opened.append((o, src, join(ctx.remote_path, j.path)))
    try:
        results = send([(rp, src) for _, src, rp in opened])
    finally:
        for _, src, _ in opened:
            src.close()
    ms = int((time.perf_counter() - t0) * 1000)
    for (o, src, _), r in zip(opened, results, strict=True):
        o.duration_ms = ms
        if isinstance(r, Exception):
            o.error = r
            out.append((o, None, None))
        else:
            out.append((o, src, r))
    return started, out


# What crosses the process boundary is kept small: a worker gets its chunk of jobs and
# sends back, per job, its position in the chunk and the Outcome's fields with the base and
# local state as plain tuples (the runner has the Job already). Pickling whole Outcomes
# (a Job, an Action, a Base and a LocalState each) cost the runner's process more CPU than
# the SQLite work for the same file.
Packed = tuple[int, Any, Any, bool, BaseException | None, int, int, str, bool, bool]


def _pack(pos: dict[int, int], outcomes: list[Outcome]) -> list[Packed]:
    """`pos`: job id -> its position in the chunk."""
    return [(pos[o.job.id], o.base and tuple(o.base), o.local and tuple(o.local), o.racy,
             o.error, o.bytes, o.duration_ms, o.note, o.keep_base, o.sent) for o in outcomes]


def _unpack(jobs: list[Job], packed: list[Packed]) -> list[Outcome]:
    new = tuple.__new__
    return [Outcome(jobs[i], b and new(Base, b), loc and new(LocalState, loc), racy, err, n, ms,
                    note, keep, sent) for i, b, loc, racy, err, n, ms, note, keep, sent in packed]


def _plain(jobs: list[Job]) -> list[tuple[Any, ...]]:
    """A chunk as plain tuples, for a worker process: pickling a namedtuple runs Python
    code per object (~1.5 us per job with its Action; plain tuples ~0.07 us), and the
    runner's process pickles every job of a run."""
    return [(j[0], j[1], j[2], tuple(j[3]), j[4], j[5], j[6]) for j in jobs]


def _jobs(chunk: list[Any]) -> list[Job]:
    """What _plain made, as Jobs again (a chunk from a thread pool is Jobs already)."""
    if not chunk or type(chunk[0]) is not tuple:
        return chunk
    new = tuple.__new__
    return [new(Job, (r[0], r[1], r[2], new(Action, r[3]), r[4], r[5], r[6])) for r in chunk]


def _run_packed(jobs: list[Job], pairs: dict[str, PairCtx]) -> list[Packed]:
    jobs = _jobs(jobs)
    return _pack({j.id: i for i, j in enumerate(jobs)}, _execute_chunk(jobs, pairs))


def _stage_packed(jobs: list[Job], pairs: dict[str, PairCtx]
                  ) -> tuple[list[Packed], list[tuple[Packed, tuple[Any, ...]]]]:
    jobs = _jobs(jobs)
    done, staged = _stage_chunk(jobs, pairs)
    pos = {j.id: i for i, j in enumerate(jobs)}
    packed = _pack(pos, [o for o, _ in staged])
    return _pack(pos, done), [(p, tuple(st)) for p, (_, st) in zip(packed, staged, strict=True)]


def _publish_chunk(pair: str, staged: list[tuple[Any, ...]], pairs: dict[str, PairCtx]
                   ) -> list[str | Exception]:
    """Publish flushed uploads; per item the remote fingerprint, or the error."""
    new = tuple.__new__
    res = pairs[pair].remote.publish_many([new(Staged, s) for s in staged])  # type: ignore[attr-defined]
    return [r if isinstance(r, Exception) else r.fp for r in res]


def _forkserver() -> Any:
    """The fork-server context worker processes come from, with syncd.transfer preloaded."""
    mp = multiprocessing.get_context("forkserver")
    mp.set_forkserver_preload(["syncd.transfer"])
    return mp


def prewarm_processes() -> None:
    """Start the fork server that worker processes come from, in the background: it imports
    syncd.transfer (~0.1 s) on the other core while the caller plans, instead of after, when
    the first jobs wait for it. Harmless if no pool follows: the server idles and exits with
    this process."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return

    def start() -> None:
        from multiprocessing import forkserver

        with contextlib.suppress(Exception):   # _pool() finds out and falls back to threads
            _forkserver()
            forkserver.ensure_running()

    threading.Thread(target=start, name="forkserver-start", daemon=True).start()


@dataclass(frozen=True, slots=True)
class PairCtx:
    name: str
    local_root: str
    remote_path: str
    remote: Remote
    transfers: int = 4
    follow_symlinks: bool = False


def execute(job: Job, ctx: PairCtx, now_ns: Callable[[], int] = time.time_ns) -> Outcome:
    """Carry out one job against the remote; never raises (errors go in the Outcome)."""
    t0 = time.perf_counter()
    a = job.action
    rp = join(ctx.remote_path, job.path)
    o = Outcome(job)
    try:
        if a.replaces:
            _clear(a, ctx, rp)
        if a.op == Op.UPLOAD:
            _upload(o, ctx, rp, now_ns)
        elif a.op == Op.MKDIR:
            e = ctx.remote.mkdir(rp)
            o.base = Base(DIR, 0, 0, None, e.fp)
        elif _attrs_job(a, ctx):   # an attrs job, or an adoption that sets the mode
            _attrs_many([(o, rp)], ctx, now_ns)
        elif a.op == Op.ADOPT:
            o.base = Base(a.kind, a.size, a.mtime_ns, a.hash, a.remote_fp)
        elif a.op in (Op.DELETE, Op.CLEANUP):
            ctx.remote.delete([rp])
        elif a.op == Op.TRASH:
            move(ctx.remote, rp, join(ctx.remote_path, a.dest))
        elif a.op == Op.RMDIR:
            if not ctx.remote.rmdir(rp):
                o.note = "not empty; kept"
        elif a.op == Op.FORGET:
            pass
        elif a.op == Op.CONFLICT:
            raise Conflict(a.reason, remote=ctx.remote.name, path=rp)
        else:  # pragma: no cover - a new Op without a handler is a bug
            raise PermanentError(f"unknown operation {a.op}", path=rp)
    except Exception as e:  # an Outcome carries every failure; the queue classifies it
        o.error = e
    o.duration_ms = int((time.perf_counter() - t0) * 1000)
    return o


def _clear(a: Action, ctx: PairCtx, rp: str) -> None:
    """Remove the remote entry a write replaces: a file (trashed or deleted, per the plan)
    or a directory the earlier phases emptied. Already gone is fine."""
    if a.replaces == DIR:
        try:
            emptied = ctx.remote.rmdir(rp)
        except NotFound:
            return
        if not emptied:
            raise Conflict("the remote directory this file replaces still has content: "
                           "entries this pair ignores, or a deletion that failed or was "
                           "skipped; remove them (or the directory) by hand, or retry",
                           remote=ctx.remote.name, path=rp)
        return
    try:
        if a.dest:
            move(ctx.remote, rp, join(ctx.remote_path, a.dest))
        else:
            ctx.remote.delete([rp])
    except NotFound:
        pass


def _open_source(o: Outcome, ctx: PairCtx) -> Source | None:
    """The job's local file, opened; None (with the outcome filled in) if it cannot be."""
    abspath = os.path.join(ctx.local_root, o.job.path)
    try:
        src = Source(abspath, o.job.path, ctx.follow_symlinks)
        src.expected = o.job.action.hash
        return src
    except FileNotFoundError:
        # Gone since the scan: nothing to send; the next scan plans its deletion.
        o.keep_base, o.note = True, "vanished before upload"
    except SourceChanged:
        # A directory, FIFO, socket or symlink since the scan: no retry can send it, so
        # none waits out the backoff; the next scan plans what it is now.
        o.keep_base, o.note = True, "no longer a regular file before upload"
    except OSError as e:
        o.error = PermanentError(f"cannot read local file: {e.strerror}", path=abspath)
    except Exception as e:
        o.error = e
    return None


def _uploaded(o: Outcome, src: Source, entry: RemoteEntry, started: int) -> None:
    digest, after = src.digest, src.after
    assert digest is not None and after is not None, "remote.put must call source.verify()"
    o.bytes, o.sent = src.sent, True
    _synced(o, after, digest, entry.fp, started)


def _synced(o: Outcome, st: os.stat_result, digest: bytes, fp: str, started: int) -> None:
    """The file as `st` and `digest` describe it is on the remote (fingerprint `fp`):
    its base and local state, racy if modified close to `started` (when it was read)."""
    mode = st.st_mode & 0o7777
    o.base = Base(FILE, st.st_size, st.st_mtime_ns, digest, fp, mode)
    o.local = LocalState(FILE, st.st_size, st.st_mtime_ns, st.st_ino, mode, digest)
    o.racy = is_racy(st.st_mtime_ns, started)


def _upload(o: Outcome, ctx: PairCtx, rp: str, now_ns: Callable[[], int]) -> None:
    started = now_ns()
    src = _open_source(o, ctx)
    if src is None:   # vanished or unreadable: _open_source filled in the outcome
        return
    with src:
        entry = ctx.remote.put(rp, src)
    _uploaded(o, src, entry, started)


AttrsReq = tuple[str, int | None, int | None, str | None]   # path, mode, mtime_ns, expect_fp


def _attrs_many(items: list[tuple[Outcome, str]], ctx: PairCtx,
                now_ns: Callable[[], int] = time.time_ns) -> None:
    """Set remote files' permission bits and mtimes (attrs jobs of one pair: outcome and
    remote path each), after reading each local file again: a file goes whole instead if
    its content is no longer the one the plan compared (the plan comes from a scan that
    may be seconds old, and a file replaced since can have the same size, mtime and even
    inode), if the remote file changed meanwhile, or if the remote refused. Several go to
    the remote in one call where it has set_attrs_many (SFTP pipelines them; the local
    remote makes them durable together). Fills in each outcome; never raises."""
    remote, caps = ctx.remote, ctx.remote.caps
    started = now_ns()
    ready: list[tuple[Outcome, str, bytes, os.stat_result]] = []
    whole: list[tuple[Outcome, str, str]] = []   # sent whole instead, and why
    for o, rp in items:
        a = o.job.action
        path = os.path.join(ctx.local_root, o.job.path)
        try:
            if a.op == Op.ADOPT:
                # The scan's hash is trusted, as for any adoption; the file must still
                # be the one it hashed (size, mtime), or it goes whole.
                after = os.stat(path, follow_symlinks=ctx.follow_symlinks)
                same = (stat.S_ISREG(after.st_mode) and after.st_size == a.size
                        and after.st_mtime_ns == a.mtime_ns)
                digest = a.hash if same and a.hash else b""
            else:
                digest, before, after = hash_file(path, ctx.follow_symlinks)
                if not stable(before, after):
                    digest = b""
        except FileNotFoundError:
            o.keep_base, o.note = True, "vanished before its attributes were set"
            continue
        except OSError:
            digest = b""   # the upload below says what is wrong, as for any upload
        if digest and digest == a.hash:
            ready.append((o, rp, digest, after))
        else:
            whole.append((o, rp, "content changed since the plan"))
    reqs: list[AttrsReq] = [(rp, after.st_mode & 0o7777 if caps.modes else None,
                             after.st_mtime_ns if caps.mtimes else None, o.job.action.remote_fp)
                            for o, rp, _, after in ready]
    many = getattr(remote, "set_attrs_many", None)
    if many is not None and len(reqs) > 1:
        try:
            results = many(reqs)
        except Exception as e:   # a backend returns errors per item; this is a bug's net
            results = [e] * len(reqs)
    else:
        results = [_attrs_one(remote, r) for r in reqs]
    for (o, rp, digest, after), r in zip(ready, results, strict=True):
        if isinstance(r, RemoteChanged):
            whole.append((o, rp, "remote file changed since the plan"))
        elif isinstance(r, PermanentError) and not isinstance(r, UnavailableError):
            # Gone, a symlink there (put() replaces it), or refused (a file of another
            # owner, a server that would follow symlinks): the whole file, as before
            # attributes went alone, needs only write access to the folder. Failing here
            # would leave them unsynced.
            whole.append((o, rp, f"attributes not settable alone: {r.reason}"))
        elif isinstance(r, Exception):
            o.error = r
        else:
            _synced(o, after, digest, r.fp, started)
    put_many = getattr(remote, "put_many", None)
    if put_many is not None:
        # Together, as a chunk of uploads goes (a chmod -R on a server without lsetstat),
        # in groups of a chunk's bytes: each group's temp files exist at once.
        limit = CHUNK_BYTES if caps.cpu_bound else NET_CHUNK_BYTES
        group: list[tuple[Outcome, str, str]] = []
        size = 0
        for item in whole:
            if group and size + item[0].job.action.size > limit:
                _upload_group(group, ctx, put_many)
                group, size = [], 0
            group.append(item)
            size += item[0].job.action.size
        _upload_group(group, ctx, put_many)
    else:
        for o, rp, _ in whole:
            try:
                _upload(o, ctx, rp, now_ns)   # hashes what it sends, as any upload
            except Exception as e:   # as execute() would record it
                o.error = e
    for o, _, why in whole:
        if o.error is None and not o.keep_base:
            o.note = f"{why}: sent whole"


def _upload_group(group: list[tuple[Outcome, str, str]], ctx: PairCtx,
                  put_many: Callable[[list[tuple[str, Source]]], list[Any]]) -> None:
    """Send these jobs' files whole in one put_many call; fills in their outcomes."""
    try:
        started, sent = _send_batch([o.job for o, _, _ in group], {ctx.name: ctx}, put_many)
    except Exception as e:   # a backend returns errors per item; this is a bug's net
        started, sent = 0, [(Outcome(o.job, error=e), None, None) for o, _, _ in group]
    by_id = {o2.job.id: (o2, src, r) for o2, src, r in sent}
    for o, _, _ in group:
        o2, src, r = by_id[o.job.id]
        if src is not None:
            try:
                _uploaded(o2, src, r, started)
            except Exception as e:
                o2.error = e
        (o.base, o.local, o.racy, o.error, o.bytes, o.note, o.keep_base, o.sent) = (
            o2.base, o2.local, o2.racy, o2.error, o2.bytes, o2.note, o2.keep_base, o2.sent)


def _attrs_one(remote: Remote, r: AttrsReq) -> RemoteEntry | Exception:
    path, mode, mtime_ns, expect_fp = r
    try:
        return remote.set_attrs(path, mode=mode, mtime_ns=mtime_ns, expect_fp=expect_fp)
    except Exception as e:   # returned, as set_attrs_many does
        return e


class Reporter(Protocol):
    def advance(self, files: int, nbytes: int) -> None: ...


@dataclass
class RunStats:
    """Counters only: keeping every Outcome of a 100k-file run would cost ~70 MB."""

    done: dict[str, int] = field(default_factory=dict)   # op (or "skipped") -> jobs
    uploaded_bytes: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)   # (path, error)
    retries: int = 0
    waiting: float | None = None   # run() ended with retries pending from this time on
    held: int = 0                  # outcomes that failed for the remote's sake (no attempt)
    unavailable: Down | None = None   # the remote became unavailable: run() stopped on it

    def add(self, o: Outcome) -> None:
        a = o.job.action
        sent = a.op == Op.UPLOAD or o.sent
        key = "skipped" if o.keep_base else Op.UPLOAD.value if sent else a.op.value
        self.done[key] = self.done.get(key, 0) + 1
        if a.replaces == FILE and not o.keep_base:   # the remote file it replaced is gone
            gone = Op.TRASH.value if a.dest else Op.DELETE.value
            self.done[gone] = self.done.get(gone, 0) + 1
        if sent:
            self.uploaded_bytes += o.bytes


class Runner:
    """Drains the queue for some pairs: leases, runs on per-remote pools, commits."""

    def __init__(self, queue: Queue, pairs: dict[str, PairCtx], *,
                 sleep: Callable[[float], None] = time.sleep,
                 reporter: Reporter | None = None, log: Any = None, done_level: str = "info",
                 processes: bool = False, stop: Any = None, patience: float | None = None,
                 breaker: Breaker | None = None):
        # Shared with the engine (and the daemon): once a remote trips it, no more of its
        # jobs start; those in flight finish, the rest wait in the queue, attempts intact.
        self.breaker = breaker or Breaker()
        self.stop = stop   # threading.Event: set = lease nothing more, finish what is in flight
        # The longest wait for a retry's backoff before run() returns with the job still
        # pending (`stats.waiting`): the daemon's other pairs must not queue behind it.
        self.patience = patience
        self.done_level = done_level
        self.log_each = slog.enabled(done_level)
        self.processes = processes
        self.queue = queue
        self.pairs = pairs
        self.sleep = sleep
        self.reporter = reporter
        self.log = log or slog.get()

    def run(self, names: Sequence[str],
            feed: Callable[[], tuple[list[Job], bool]] | None = None) -> RunStats:
        """Run until the queue of `names` is drained. `feed`, if given, enqueues the next
        batch of a plan and returns the jobs it leased to us (Queue.enqueue_leased) and
        whether more is to come: workers start on the first batch while the rest is still
        being written (a 100k-job plan took ~0.8 s to enqueue, all of it before the first
        transfer).

        Fed jobs skip lease(), which keeps phase order for the jobs it hands out, so the
        runner keeps it for them: a fed job of phase p starts only once no unfinished job
        of the pair (pending, retrying or running) has a lower phase."""
        stats = RunStats()
        feeding = feed is not None
        fed: dict[str, deque[Job]] = {}
        gate: dict[str, int] = {}   # pair -> highest phase its fed jobs may start in

        def refill() -> None:
            nonlocal feeding
            jobs, feeding = feed()   # type: ignore[misc]
            for j in jobs:
                rr = self.pairs[j.pair].remote.name
                fed.setdefault(rr, deque()).append(j)

        def take_fed(r: str) -> list[Job] | None:
            """The next chunk of fed jobs that may start now, or None."""
            q = fed.get(r)
            if not q:
                return None
            head = q[0]
            p = phase(head.action)
            if p > gate.get(head.pair, PHASE_MIN):
                # Fed jobs without queue rows (Queue.unqueued) are all of phase 0, the
                # lowest a streamed first sync has: none of them is waited for here.
                low = self.queue.index.min_open_phase(head.pair)
                if low is not None and low < p:
                    return None   # an earlier phase is unfinished
                gate[head.pair] = p
            return _take_chunk(q, *limits[r], pair=head.pair, max_phase=gate[head.pair])

        names = list(names)

        def down(r: str) -> bool:
            return self.breaker.down(r) is not None

        def live_names() -> list[str]:
            return [n for n in names if not down(self.pairs[n].remote.name)]

        by_remote: dict[str, list[str]] = {}
        for n in names:
            by_remote.setdefault(self.pairs[n].remote.name, []).append(n)
        remotes = {r: self.pairs[ps[0]].remote for r, ps in by_remote.items()}
        pools = {r: self._pool(self.pairs[ps[0]], self.processes) for r, ps in by_remote.items()}
        # Jobs are leased in batches (one SQLite transaction each) and handed to workers in
        # small chunks, so per-file overhead is a few list operations, not a transaction and
        # a thread wake-up per file.
        ready: dict[str, deque[Job]] = {r: deque() for r in by_remote}
        limits = {r: (CHUNK_BYTES, CHUNK_FILES) if remotes[r].caps.cpu_bound
                  else (NET_CHUNK_BYTES, NET_CHUNK_FILES) for r in by_remote}
        # A remote that stages (a directory with fsync on) takes uploads in three steps:
        # workers write temp files ("stage"), one flush thread per remote makes everything
        # staged so far durable with one syncfs ("flush") while the workers go on writing,
        # then workers rename the flushed files into place ("publish"). Waiting for the disk
        # no longer stops the writers, and one flush serves as many files as were written
        # while the previous one ran (a group commit).
        flushers = {r: ThreadPoolExecutor(1, thread_name_prefix=f"flush-{r}")
                    for r, rem in remotes.items() if _stages(rem)}
        unflushed: dict[str, list[tuple[Outcome, Staged]]] = {r: [] for r in flushers}
        # future -> (remote, kind, payload): "run"/"stage" a chunk of jobs, "flush" and
        # "publish" a list of (outcome, staged upload).
        inflight: dict[Future[Any], tuple[str, str, Any]] = {}

        def in_flight(r: str, *kinds: str) -> list[Any]:
            return [p for rr, k, p in inflight.values() if rr == r and k in kinds]
        buffered: dict[str, list[Outcome]] = {}
        count = 0

        def add(o: Outcome) -> None:
            nonlocal count
            buffered.setdefault(o.job.pair, []).append(o)
            count += 1
            # At once, not at the next commit: no more of the remote's jobs start.
            d = self.breaker.record(self.pairs[o.job.pair].remote.name, o.error)
            if d is not None:
                log_unavailable(self.log, d)
                stats.unavailable = d

        def start_flush(r: str) -> None:
            # Stopping: what is flushed already gets published; the rest is discarded.
            if (not unflushed[r] or in_flight(r, "flush")
                    or (self.stop is not None and self.stop.is_set())):
                return
            batch, unflushed[r] = unflushed[r], []
            inflight[flushers[r].submit(remotes[r].flush, [s for _, s in batch])] = (
                r, "flush", batch)

        origin: dict[Future[Any], Executor] = {}   # the pool each future was given to

        def submit(r: str, fn: Callable[..., Any], *args: Any) -> Future[Any]:
            try:
                fut = pools[r].submit(fn, *args, self.pairs)
            except BrokenExecutor:
                pools[r] = self._replace_broken(pools[r], self.pairs[by_remote[r][0]])
                fut = pools[r].submit(fn, *args, self.pairs)
            origin[fut] = pools[r]
            return fut

        def failed_staged(r: str, batch: list[tuple[Outcome, Staged]], err: BaseException,
                          step: str) -> None:
            """Staged uploads that will not be published: temps removed, jobs retried."""
            remotes[r].discard([s for _, s in batch])  # type: ignore[attr-defined]
            err = _as_transient(err, step)
            for o, _ in batch:
                o.error, o.base, o.local = err, None, None
                add(o)

        def published(batch: list[tuple[Outcome, Staged]], fps: list[str | Exception]) -> None:
            for (o, _), fp in zip(batch, fps, strict=True):
                if isinstance(fp, Exception):
                    o.error, o.base, o.local = fp, None, None
                else:
                    assert o.base is not None
                    o.base = _with_fp(o.base, fp)
                add(o)

        last_commit = time.monotonic()
        try:
            while True:
                stopping = self.stop is not None and self.stop.is_set()
                if stopping and not inflight:
                    break
                for r, ps in by_remote.items():
                    if stopping:
                        break
                    if down(r):
                        continue
                    transfers = self.pairs[ps[0]].transfers
                    q = ready[r]
                    if feeding and len(fed.get(r, ())) < LEASE_BATCH // 2:
                        refill()
                    if len(q) < LEASE_BATCH // 2:
                        q.extend(self.queue.lease(LEASE_BATCH - len(q), ps))
                    if r in flushers:
                        # Enough stage tasks to keep every worker busy, no more: a publish
                        # (after each flush) then waits behind one stage task at most, and
                        # files staged but not yet published stay few (STAGED_MAX).
                        kind, fn = "stage", _stage_packed
                        width = _workers(transfers, isinstance(pools[r], ProcessPoolExecutor))
                        unpublished = len(unflushed[r]) + sum(
                            len(b) for b in in_flight(r, "flush", "publish"))
                        cap = 0 if unpublished >= STAGED_MAX * width else width + 1
                    else:
                        kind, fn, cap = "run", _run_packed, 2 * transfers
                    if self.breaker.suspect(r):
                        # Lost it lately: one batch at a time, after a growing pause.
                        cap = 1 if self.breaker.wait(r) == 0 else 0
                    busy = len(in_flight(r, kind))
                    while busy < cap:
                        # Jobs lease() handed out first: they may be of an earlier phase
                        # that fed jobs wait for (a retry).
                        chunk = _take_chunk(q, *limits[r]) if q else take_fed(r)
                        if chunk is None:
                            break
                        inflight[submit(r, fn, _plain(chunk) if isinstance(
                            pools[r], ProcessPoolExecutor) else chunk)] = (r, kind, chunk)
                        busy += 1
                if not inflight:
                    if count:
                        self._commit(buffered, stats)
                        count, last_commit = 0, time.monotonic()
                        continue
                    live = live_names()
                    if not live:
                        break
                    if feeding and not stopping:
                        refill()
                        continue
                    held = [w for r in by_remote if not down(r) and (ready[r] or fed.get(r))
                            and (w := self.breaker.wait(r)) > 0]
                    if held:   # jobs in hand wait for a suspect remote's pause
                        wait_s = min(held)
                        if self.patience is not None and wait_s > self.patience:
                            stats.waiting = self.queue.clock() + wait_s
                            break
                        self.sleep(min(1.0, wait_s) + 0.001)
                        continue
                    nxt = self.queue.index.next_ready_time(live)
                    if nxt is None:
                        break
                    wait_s = nxt - self.queue.clock()
                    if self.patience is not None and wait_s > self.patience:
                        stats.waiting = nxt
                        break
                    self.sleep(min(1.0, max(0.0, wait_s)) + 0.001)
                    continue
                finished, _ = wait(list(inflight), timeout=COMMIT_INTERVAL,
                                   return_when=FIRST_COMPLETED)
                # A future cancelled by a pool's shutdown never shows up in wait().
                for f in {*finished, *(f for f in inflight if f.cancelled())}:
                    r, kind, payload = inflight.pop(f)
                    pool = origin.pop(f, None)
                    err = CancelledError("cancelled") if f.cancelled() else f.exception()
                    if kind == "flush":
                        if err is not None:
                            failed_staged(r, payload, err, "flush")
                        else:
                            for i in range(0, len(payload), CHUNK_FILES):
                                group = payload[i:i + CHUNK_FILES]
                                fut = submit(r, _publish_chunk, by_remote[r][0],
                                             [tuple(s) for _, s in group])
                                inflight[fut] = (r, "publish", group)
                        start_flush(r)
                        continue
                    # A worker process died (OOM kill, ...): replace the pool once, not
                    # again for each of its other futures (that would shut down the new one).
                    if isinstance(err, BrokenExecutor) and pool is pools[r]:
                        pools[r] = self._replace_broken(pools[r], self.pairs[by_remote[r][0]])
                    if kind == "publish":
                        if err is not None:
                            failed_staged(r, payload, err, "publish")
                        else:
                            published(payload, f.result())
                        continue
                    if err is not None:
                        e2 = _as_transient(err, "transfer")
                        outcomes = [Outcome(j, error=e2) for j in payload]
                    elif kind == "stage":
                        outcomes, staged = _unpack_staged(payload, f.result())
                        unflushed[r] += staged
                        start_flush(r)
                    else:
                        outcomes = _unpack(payload, f.result())
                    for o in outcomes:
                        add(o)
                if count >= COMMIT_EVERY or (
                        count and time.monotonic() - last_commit >= COMMIT_INTERVAL):
                    self._commit(buffered, stats)
                    count, last_commit = 0, time.monotonic()
        finally:
            for f in inflight:
                f.cancel()
            for p in pools.values():
                p.shutdown(wait=True, cancel_futures=True)
            for fl in flushers.values():
                fl.shutdown(wait=True, cancel_futures=True)
            unfinished: list[Job] = []
            leftover: dict[str, list[Staged]] = {r: [s for _, s in b] for r, b in unflushed.items()}
            for b in unflushed.values():
                unfinished += [o.job for o, _ in b]
            for f, (r, kind, payload) in inflight.items():   # what finished while we stopped
                ok = f.done() and not f.cancelled() and f.exception() is None
                if kind == "publish" and ok:
                    published(payload, f.result())
                elif kind in ("flush", "publish"):   # durable or not, never published
                    unfinished += [o.job for o, _ in payload]
                    leftover.setdefault(r, []).extend(s for _, s in payload)
                elif ok:
                    if kind == "stage":
                        outcomes, staged = _unpack_staged(payload, f.result())
                        unfinished += [o.job for o, _ in staged]
                        leftover.setdefault(r, []).extend(s for _, s in staged)
                    else:
                        outcomes = _unpack(payload, f.result())
                    for o in outcomes:
                        add(o)
                else:
                    unfinished += list(payload)
            for r, staged_left in leftover.items():
                if staged_left:   # a temp left behind is cleaned up by the next reconcile
                    remotes[r].discard(staged_left)  # type: ignore[attr-defined]
            if count:
                self._commit(buffered, stats)
            # Jobs leased but never finished go back to the queue at once (those that
            # had no row get one).
            self.queue.release(unfinished + [j for q in (*ready.values(), *fed.values())
                                             for j in q])
        if stats.unavailable is None:
            stats.unavailable = next(filter(None, map(self.breaker.down, by_remote)), None)
        return stats

    def _replace_broken(self, pool: Executor, ctx: PairCtx) -> Executor:
        self.log.warning("worker_processes_lost", pair=ctx.name, fallback="threads")
        pool.shutdown(wait=False, cancel_futures=True)
        return self._pool(ctx, processes=False)

    @staticmethod
    def _pool(ctx: PairCtx, processes: bool) -> Executor:
        """Worker processes for a cpu-bound remote (a directory: the work is Python and
        syscalls, which threads would serialise on the GIL), threads for network remotes.
        Processes come from a fork server: a clean interpreter, so no SQLite connection or
        lock of ours is ever carried across fork()."""
        can_fork_server = "forkserver" in multiprocessing.get_all_start_methods()
        if processes and ctx.remote.caps.cpu_bound and can_fork_server:
            pool = ProcessPoolExecutor(max_workers=_workers(ctx.transfers, processes=True),
                                       mp_context=_forkserver(), initializer=_worker_init,
                                       initargs=(os.getpid(),))
            try:   # a sandbox may forbid what multiprocessing needs: find out now, not mid-run
                pool.submit(int).result(timeout=30)
                return pool
            except Exception as e:
                pool.shutdown(wait=False, cancel_futures=True)
                slog.get().warning("worker_processes_unavailable", error=f"{type(e).__name__}: {e}",
                                   fallback="threads")
        return ThreadPoolExecutor(max_workers=ctx.transfers, thread_name_prefix=f"xfer-{ctx.name}")

    def _commit(self, buffered: dict[str, list[Outcome]], stats: RunStats) -> None:
        for pair, outcomes in buffered.items():
            if not outcomes:
                continue
            s = self.queue.settle(pair, outcomes)
            for o in s.done:
                stats.add(o)
                if self.log_each:
                    self._log_done(pair, o)
            for o, not_before in s.retried:
                stats.retries += 1
                self.log.warning("job_retry", pair=pair, path=o.job.path, op=o.job.action.op.value,
                                 attempt=o.job.attempts + 1, error=str(o.error),
                                 retry_in_s=round(max(0.0, not_before - self.queue.clock()), 3))
            for o, msg in s.failed:
                stats.failed.append((o.job.path, msg))
                self.log.error("job_failed", pair=pair, path=o.job.path, op=o.job.action.op.value,
                               attempt=o.job.attempts + 1, error=msg,
                               exc_info=_internal(o.error))
            stats.held += sum(not isinstance(o.error, NotTried) for o in s.held)
            for o in s.held:   # said once for the remote (remote_unavailable) if it stays lost
                self.log.debug("job_held", pair=pair, path=o.job.path, op=o.job.action.op.value,
                               error=str(o.error))
            if self.reporter is not None:
                self.reporter.advance(len(s.done) + len(s.failed),
                                      sum(o.bytes for o in s.done))
            outcomes.clear()

    def _log_done(self, pair: str, o: Outcome) -> None:
        a = o.job.action
        if a.op in (Op.FORGET,):
            return
        fields: dict[str, Any] = {"pair": pair, "path": o.job.path, "op": a.op.value,
                                  "duration_ms": o.duration_ms, "attempt": o.job.attempts + 1}
        if a.reason:
            fields["reason"] = a.reason
        if a.op == Op.UPLOAD or o.sent:
            fields["bytes"] = o.bytes
        if o.note:
            fields["note"] = o.note
        getattr(self.log, self.done_level)(f"{a.op.value}_done", **fields)


def _unpack_staged(jobs: list[Job], res: tuple[list[Packed], list[tuple[Packed, Any]]]
                   ) -> tuple[list[Outcome], list[tuple[Outcome, Staged]]]:
    done, staged = res
    outs = _unpack(jobs, [p for p, _ in staged])
    new = tuple.__new__
    return _unpack(jobs, done), [(o, new(Staged, st)) for o, (_, st) in
                                 zip(outs, staged, strict=True)]


def _with_fp(b: Base, fp: str) -> Base:
    return tuple.__new__(Base, (b[0], b[1], b[2], b[3], fp, b[5]))   # _replace: ~5x more


# Read once: os.cpu_count() reads a file under /sys at each call, and the runner's loop
# asks for the pool's width at every turn.
_CPUS = os.cpu_count() or 1


def _workers(transfers: int, processes: bool) -> int:
    """How many jobs a pool runs at once: as many processes as cores (at most
    `transfers`: more only contend for them), or `transfers` threads."""
    return max(1, min(transfers, _CPUS)) if processes else transfers


def _stages(remote: Remote) -> bool:
    return getattr(remote, "stage_many", None) is not None and bool(getattr(remote, "stages", False))


def _as_transient(e: BaseException, step: str) -> BaseException:
    """A syncd error as it is; anything else (a worker process that died, ...) retried."""
    if isinstance(e, SyncdError):
        return e
    if isinstance(e, BrokenExecutor):
        return TransientError(f"a worker process died during the {step} (killed, or out of "
                              "memory?); the job is retried on threads")
    return TransientError(f"{step} failed: {type(e).__name__}: {e}")


def _internal(e: BaseException | None) -> BaseException | bool:
    """Attach a traceback only to errors that are bugs, not to expected syncd errors."""
    if e is None or isinstance(e, SyncdError):
        return False
    return e


def log_unavailable(log: Any, d: Down) -> None:
    """The one event of an outage: which remote, why, since when."""
    log.error("remote_unavailable", remote=d.remote, reason=d.reason,
              since=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(d.since)),
              note="its jobs wait in the queue, attempts intact")

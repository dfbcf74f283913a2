"""Wiring for one reconcile of a pair, shared by `syncd reconcile` and the daemon:
scan → list → hash what must be compared → plan → safety → enqueue → run → summary
(a first sync into an empty destination streams: scan, plan and run interleave)."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import socket
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from syncd import log as slog
from syncd.breaker import Breaker, Down
from syncd.config import Config, PairConfig, local_destination
from syncd.errors import (
    ConnectionLost,
    LockedError,
    NotFound,
    RemoteError,
    SafetyError,
    UnavailableError,
)
from syncd.index import Index
from syncd.listing import Listing, RemoteDiff, diff_listing, drop_ignored_dirs, drop_unnamed
from syncd.log import structlog
from syncd.model import (
    TRASH_DIR,
    Action,
    Job,
    Kind,
    LocalState,
    Op,
    RemoteEntry,
    When,
    phase,
    printable,
)
from syncd.plan import (
    Facts,
    Policy,
    attrs_to_settle,
    check_safety,
    plan_push,
    under,
)
from syncd.queue import Queue
from syncd.remotes import open_remote
from syncd.remotes.base import Remote
from syncd.scan import Matcher, Walk, hash_paths, local_mounts, pair_matcher, walk

if TYPE_CHECKING:   # imported when there is something to transfer: an idle run skips it
    from syncd.transfer import PairCtx, Reporter

FILE, DIR = int(Kind.FILE), int(Kind.DIR)
PROCESS_POOL_MIN_JOBS = 256
ENQUEUE_BATCH = 4096


@dataclass
class Options:
    dry_run: bool = False
    allow_mass_delete: bool = False
    allow_device_change: bool = False
    # False: trust the bases as the remote's state instead of listing it (the daemon's
    # event-driven runs; its periodic full reconcile lists and catches drift).
    list_remote: bool = True


@dataclass
class PairResult:
    pair: str
    status: str = "ok"           # ok | failed | stopped | unavailable | planned | interrupted
    transfer_failures: int = 0   # of `failures`, those of jobs (not of the scan)
    message: str = ""
    uploaded: int = 0
    uploaded_bytes: int = 0
    deleted: int = 0
    trashed: int = 0
    adopted: int = 0
    mkdirs: int = 0
    attrs_set: int = 0           # modes or mtimes set without sending the content
    skipped: int = 0
    retries: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)   # (path, why)
    plan: list[Action] = field(default_factory=list)
    scanned: int = 0
    hashed_files: int = 0
    hashed_bytes: int = 0
    duration_s: float = 0.0
    # Folders (relative to the pair) this run wrote in; None: too many to name, or a first
    # sync; empty: none (nothing to make durable).
    touched: set[str] | None = field(default_factory=set, repr=False)

    @property
    def exit_code(self) -> int:
        return {"ok": 0, "planned": 0, "failed": 1, "stopped": 4, "unavailable": 3,
                "interrupted": 130}[self.status]

    def to_json(self) -> dict[str, Any]:
        return {
            "pair": self.pair, "status": self.status, "message": self.message,
            "uploaded": self.uploaded, "uploaded_bytes": self.uploaded_bytes,
            "deleted": self.deleted, "trashed": self.trashed, "adopted": self.adopted,
            "mkdirs": self.mkdirs, "attrs_set": self.attrs_set, "skipped": self.skipped,
            "retries": self.retries,
            "failed": [{"path": p, "error": e} for p, e in self.failures],
            "scanned": self.scanned, "duration_s": round(self.duration_s, 3),
            **({"plan": [{"op": a.op.value, "path": a.path, "reason": a.reason}
                         for a in self.plan]} if self.status == "planned" else {}),
        }


class StateLock:
    """One syncd per state dir: an flock on state_dir/syncd.lock holding the PID."""

    def __init__(self, state_dir: Path, role: str = "reconcile"):
        self.path = state_dir / "syncd.lock"
        self.fd = -1
        self.role = role   # written after the PID: `syncd retry` signals a daemon only

    def __enter__(self) -> StateLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise LockedError(f"state dir {self.path.parent}: {e.strerror}; run syncd as the "
                              "user that owns it, or set [daemon] state_dir to a directory "
                              "this user can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, role = self._parse(os.read(fd, 64))
            os.close(fd)
            who = "the syncd daemon" if role == "daemon" else "a running `syncd reconcile`"
            raise LockedError(f"state dir {self.path.parent} is in use by {who} "
                              f"(PID {pid if pid >= 0 else 'unknown'}); stop it or use another "
                              "[daemon] state_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.role}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *_: object) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @staticmethod
    def _parse(content: bytes) -> tuple[int, str]:
        """(PID, role) from the lock file; PID -1 if unreadable. A lock written by an older
        syncd holds the PID alone: only daemons are long-lived."""
        pid, _, role = content.decode(errors="replace").strip().partition(" ")
        return (int(pid) if pid.isdigit() else -1), role or "daemon"

    @classmethod
    def holder(cls, state_dir: Path) -> tuple[int, str] | None:
        """(PID, role: "daemon" or "reconcile") of the syncd holding this state dir's lock,
        None if none does. Takes no lock itself."""
        lock = state_dir / "syncd.lock"
        try:
            if not lock.exists():
                return None
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise LockedError(f"state dir {state_dir}: {e.strerror}; run this as the user that "
                              "owns it (e.g. sudo -u syncd syncd ...)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            return cls._parse(os.read(fd, 64))
        finally:
            os.close(fd)


TRASH_PREFIX = TRASH_DIR + "/"


def trash_stamp(now: float) -> str:
    """The trash folder name of a reconcile at `now`: its UTC second. A run that trashes
    has it made unique by Index.reserve_trash_stamp."""
    return time.strftime("%Y-%m-%dT%H%M%SZ", time.gmtime(now))


def _touched_folders(actions: Sequence[Action]) -> set[str]:
    """The folders a run's actions write in: each path's folder, and for a move every
    folder on the way to its destination (each new one is an entry in its parent)."""
    out = {a.path.rpartition("/")[0] for a in actions}
    for a in actions:
        if a.dest:
            d = a.dest
            while d:
                d = d.rpartition("/")[0]
                out.add(d)
    return out


class Engine:
    def __init__(self, cfg: Config, index: Index, *, clock: Callable[[], float] = time.time,
                 reporter_factory: Callable[[str, int, int], Reporter | None] | None = None,
                 sleep: Callable[[float], None] = time.sleep, transfer_log_level: str = "debug",
                 stop: Any = None, patience: float | None = None):
        # One event per transferred file: debug for one-shot reconciles (like rclone and
        # rsync, the summary says what happened), info for the daemon.
        self.transfer_log_level = transfer_log_level
        self.stop = stop   # a threading.Event: when set, transfers wind down (daemon shutdown)
        # The daemon's: a run ends rather than wait longer than this for a retry's backoff,
        # reporting those jobs as failed for now; the daemon tries the pair again later.
        self.patience = patience
        self.cfg = cfg
        self.index = index
        self.clock = clock
        self.sleep = sleep
        self.reporter_factory = reporter_factory
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        d = cfg.daemon
        self.queue = Queue(index, self.owner, clock=clock, retry_initial=d.retry_initial,
                           retry_max=d.retry_max, max_attempts=d.max_attempts,
                           lease_timeout=d.lease_timeout)
        self.remotes: dict[str, Remote] = {}
        self.unavailable: dict[str, UnavailableError] = {}
        # Remotes out of service for this engine's life (a reconcile), or until the
        # daemon's probe reaches them again.
        self.breaker = Breaker(clock=clock, backoff=(d.retry_initial, d.retry_max), grace={
            n: float(r.options.get("timeout", 0.0)) for n, r in cfg.remotes.items()})
        self.checked: set[str] = set()
        self.log = slog.get()

    def remote(self, name: str) -> Remote:
        """The remote, opened once per engine. A directory remote is checked here (cheap);
        a network remote is checked by the first listing, which runs in a child process
        alongside the local walk, so connecting overlaps scanning."""
        if name in self.unavailable:
            raise self.unavailable[name]
        d = self.breaker.down(name)
        if d is not None:
            raise UnavailableError(d.reason, remote=name)
        if name not in self.remotes:
            r = open_remote(self.cfg.remotes[name], str(self.cfg.daemon.state_dir))
            if r.caps.cpu_bound:
                self._check(name, r)
            self.remotes[name] = r
        return self.remotes[name]

    def _check(self, name: str, r: Remote) -> None:
        try:
            r.check()
        except UnavailableError as e:
            self.unavailable[name] = e
            raise
        self.checked.add(name)

    def close(self) -> None:
        for r in self.remotes.values():
            r.close()

    def forget_remote(self, name: str) -> None:
        """Drop what this engine holds of a remote (its connections, its check): the next
        run opens it afresh. For a remote back in service after an outage."""
        r = self.remotes.pop(name, None)
        if r is not None:
            r.close()
        self.unavailable.pop(name, None)
        self.checked.discard(name)

    def reconcile(self, pair: PairConfig, opts: Options) -> PairResult:
        structlog.contextvars.bind_contextvars(pair=pair.name)
        t0 = time.perf_counter()
        res = PairResult(pair.name)
        try:
            self._reconcile(pair, opts, res)
            if res.touched is None or res.touched:
                self._settle(pair, res.touched)
        except SafetyError as e:
            res.status, res.message = "stopped", str(e)
            self.log.error("pair_stopped", reason=e.reason, override=e.override, error=str(e))
        except (UnavailableError, ConnectionLost) as e:
            res.status, res.message = "unavailable", self._unavailable(pair, e)
        except RemoteError as e:
            res.status, res.message = "failed", str(e)
            res.failures.append((e.path or ".", str(e)))
            self.log.error("pair_failed", error=str(e))
        except (OSError, sqlite3.Error) as e:   # e.g. the local root vanished mid-scan
            res.status, res.message = "failed", f"{type(e).__name__}: {e}"
            res.failures.append((".", res.message))
            self.log.error("pair_failed", error=res.message, exc_info=e)
        finally:
            res.duration_s = time.perf_counter() - t0
            structlog.contextvars.unbind_contextvars("pair")
        if res.status == "ok" and res.failures:
            res.status = "failed"
        if res.status == "ok" and self._stopping():
            # A shutdown cut the run short: what it did not do is planned by the next run.
            res.status = "interrupted"
        if not opts.dry_run and res.status != "planned":
            self.index.set_pair_result(pair.name, self.clock(), res.status)
        self.log.info("reconcile_done", pair=pair.name, status=res.status, uploaded=res.uploaded,
                      bytes=res.uploaded_bytes, deleted=res.deleted, trashed=res.trashed,
                      adopted=res.adopted, attrs_set=res.attrs_set, skipped=res.skipped,
                      failed=len(res.failures),
                      retries=res.retries, scanned=res.scanned,
                      duration_ms=int(res.duration_s * 1000))
        return res

    def _unavailable(self, pair: PairConfig, e: RemoteError) -> str:
        """The pair's remote is out of service: said once per outage (the runner says it
        when jobs trip the breaker), and the one line a reconcile prints for the pair."""
        from syncd.transfer import log_unavailable

        d = self.breaker.trip(pair.remote, e)
        if d is not None:
            log_unavailable(self.log, d)
        return down_message(self.breaker.down(pair.remote) or d,
                            sum(n for s, n in self.index.job_counts(pair.name).items()
                                if s != "failed"))

    def _settle(self, pair: PairConfig, folders: set[str] | None) -> None:
        """The remote's own last step of a run that changed it (a directory remote makes
        its renames durable: see LocalRemote.settle). Its failure is reported; it changes
        no result: the bytes are durable, and the next full reconcile checks the names."""
        settle = getattr(self.remotes.get(pair.remote), "settle", None)
        if settle is None:
            return
        try:
            settle(pair.path, folders)
        except RemoteError as e:
            self.log.error("settle_failed", remote=pair.remote, error=str(e))

    def _reconcile(self, pair: PairConfig, opts: Options, res: PairResult) -> None:
        log = self.log
        root = str(pair.local)
        meta = self.index.pair_meta(pair.name)
        target = f"{self.cfg.remotes[pair.remote].location} {pair.path}"
        moved = meta is not None and meta.target is not None and meta.target != target
        if moved:
            log.warning("pair_target_changed", was=meta.target, now=target,
                        note="the sync history is of the old place: the new one is compared "
                             "afresh (nothing is deleted at the old one)"
                             + ("; this dry run still plans with the old history"
                                if opts.dry_run else ""))
        if (meta is None or meta.target != target) and not opts.dry_run:
            # A pair recorded before targets were (index v5 or older) on FTP: its LIST
            # fingerprints have a new form since, which would look like drift everywhere.
            map_fp = None
            if meta is not None and meta.target is None and \
                    self.cfg.remotes[pair.remote].type == "ftp":
                from syncd.remotes import ftp
                map_fp = ftp.upgrade_list_fp
            self.index.set_pair_target(pair.name, target, forget_bases=moved, map_fp=map_fp)
            meta = self.index.pair_meta(pair.name)
            moved = False
        matcher = pair_matcher(pair.ignore, pair.local, self.cfg.daemon.state_dir,
                               local_destination(self.cfg.remotes[pair.remote], pair))
        if not os.path.isdir(root):
            self._trip(pair, Facts(False, 0, self.index.count_base(pair.name), 0, None, None, 0, ""),
                       opts)
        remote = self.remote(pair.remote)

        # The remote listing runs alongside the local walk (in a child process for a
        # directory remote) and reports only where the remote differs from the bases.
        t = [time.perf_counter()]
        # A network remote's listing runs in a child too: it connects, authenticates and
        # lists while the parent loads the index and walks, and an idle run never even
        # imports the SSH/S3 library in the parent.
        if opts.list_remote:
            listing = Listing(self._lister(remote, pair, matcher,
                                           check=pair.remote not in self.checked),
                              fork=True, detach=self.index.detached)
        else:
            listing = Listing(lambda: RemoteDiff(files=self.index.count_base(pair.name)),
                              fork=False)
        streamed = 0
        prepared = False
        listed: RemoteDiff | BaseException | None = None
        try:
            clean, prior = self.index.load_prior(pair.name)
            t.append(time.perf_counter())
            # A first sync may stream (see _walk_streaming).
            if (opts.list_remote and not opts.dry_run and not clean and not prior
                    and self.index.count_base(pair.name) == 0):
                # The guards a plan of uploads and mkdirs can meet (the local root moved
                # to another device), before anything moves rather than after the walk.
                self._trip(pair, Facts(True, 0, 0, 0, os.stat(root).st_dev,
                                       meta.st_dev if meta else None, 0, str(pair.max_delete)),
                           opts)
                walked, listed, streamed, prepared = self._walk_streaming(
                    pair, remote, root, matcher, listing, res)
                if walked is None:
                    return   # shutting down: the next start re-plans from a fresh scan
                w = walked
            else:
                w = walk(root, clean, prior, matcher, pair.follow_symlinks)
            t.append(time.perf_counter())
            prepare = getattr(remote, "prepare", None)
            if w.states and prepare is not None and not prepared:
                prepare()   # local changes: uploads are likely, connect while the child lists
            if (len(w.states) >= PROCESS_POOL_MIN_JOBS and remote.caps.cpu_bound and not streamed
                    and not opts.dry_run):
                from syncd.transfer import prewarm_processes

                prewarm_processes()   # the worker processes' server starts while we plan
            for rel, why in w.skipped:
                log.debug("entry_skipped", path=rel, reason=why)
            if w.skipped:   # one line at info, however many symlinks a tree holds
                kinds: dict[str, int] = {}
                for _, why in w.skipped:
                    kinds[why] = kinds.get(why, 0) + 1
                log.info("entries_skipped", count=len(w.skipped), by_reason=kinds)
            for rel, why in w.unsyncable:
                log.error("entry_unsyncable", path=rel, error=why)
                res.failures.append((rel, why))
            for rel, why in w.errors:
                log.error("scan_error", path=rel, error=why)
                res.failures.append((rel, why))
            res.skipped += len(w.skipped)
            if "" in w.error_prefixes:
                why = next(e for p, e in w.errors if p == ".")
                raise SafetyError(pair.name, f"the local root cannot be read ({why})",
                                  "make it readable by this user (permissions, mount)",
                                  self._where(pair))
            try:
                if isinstance(listed, BaseException):
                    raise listed
                diff = listed if listed is not None else listing.result()
                if diff.caps is not None and diff.caps != remote.caps:
                    # What the (maybe forked) lister's session learnt of the server.
                    remote.caps = diff.caps   # type: ignore[misc]
                if diff.unnamed:
                    log.warning("remote_entries_skipped", remote=pair.remote,
                                count=len(diff.unnamed),
                                paths=[printable(p) for p in diff.unnamed[:10]],
                                error="name is not valid UTF-8: never synced, never deleted; "
                                      "rename it on the remote to have it handled")
            except UnavailableError as e:
                self.unavailable[pair.remote] = e
                raise
            self.checked.add(pair.remote)
        finally:
            listing.close()
        t.append(time.perf_counter())

        # Clean entries (unchanged locally, synced, remote as recorded) need no planning;
        # everything else is planned with its base and remote state.
        if streamed:
            # Everything the walk found went to the queue and has run (a failure is
            # parked, reported and retried by the next reconcile, as any other): what is
            # left is to record the scan. Not a plan: the directories made have bases but
            # no local states yet, and would look deleted locally.
            res.scanned = len(w.seen)
            res.touched = None   # a first sync: every folder
            dirs = [(p, s, False) for p, s in w.states.items() if s.kind == DIR]
            if dirs:
                self.index.save_scan(pair.name, dirs, [])
            self.index.set_pair_meta(pair.name, root, w.root_dev)
            mounts = local_mounts(root)
            if mounts:
                self.index.set_pair_mounts(pair.name, mounts)
            return
        states = w.states
        flagged = [p for p in (*diff.changed, *diff.gone) if p not in states and p in w.seen]
        states.update(self.index.load_local(pair.name, flagged))
        removed = w.removed(clean, prior)
        plan_paths = {*states, *diff.changed, *diff.gone, *removed,
                      *self.index.orphan_bases(pair.name)}
        base = self.index.load_bases(pair.name, plan_paths if len(plan_paths) < 20_000 else None)
        gone = set(diff.gone)
        remote_map = dict(diff.changed)
        for p in plan_paths:
            b = base.get(p)
            if b is not None and p not in remote_map and p not in gone:
                remote_map[p] = RemoteEntry(p, b.kind, b.size, b.mtime_ns, b.remote_fp)

        # Hash only what must be compared: changed files that have a base or a remote
        # counterpart. Brand-new files are hashed while they are uploaded (one read, not two).
        need = [p for p in w.dirty if p in base or p in remote_map]
        hashed = hash_paths(root, w, need, follow_symlinks=pair.follow_symlinks)
        for rel, why in hashed.errors:
            log.error("scan_error", path=rel, error=why)
            res.failures.append((rel, why))
        res.hashed_files, res.hashed_bytes = hashed.files, hashed.bytes
        res.scanned = len(w.seen)
        scan_errors = bool(w.errors or hashed.errors)

        caps = remote.caps
        policy = Policy(delete=pair.delete,
                        trash_stamp=trash_stamp(self.clock()),
                        dirs=caps.dirs, mtime_precision_ns=caps.mtime_precision_ns,
                        now_ns=int(self.clock() * 1e9),
                        tmp_owner=getattr(remote, "tmp_owner", ""), modes=caps.modes,
                        mtimes=caps.mtimes, case_sensitive=caps.case_sensitive,
                        resumes_temps=caps.resumes_temps)
        actions = plan_push(states, base, remote_map, policy)
        if not opts.dry_run and any(a.dest.startswith(TRASH_PREFIX) for a in actions):
            # Two runs in one second (the daemon's, or one-shot runs one after the other)
            # or a clock set back would share a trash folder, and a move replaces its
            # target on most remotes: the version trashed first would be lost.
            stamp = self.index.reserve_trash_stamp(pair.name, policy.trash_stamp)
            if stamp != policy.trash_stamp:
                policy = dataclasses.replace(policy, trash_stamp=stamp)
                actions = plan_push(states, base, remote_map, policy)
        t.append(time.perf_counter())
        log.debug("reconcile_phases", load_ms=_ms(t[0], t[1]), walk_ms=_ms(t[1], t[2]),
                  listing_wait_ms=_ms(t[2], t[3]), plan_ms=_ms(t[3], t[4]), planned=len(states),
                  clean=len(w.seen) - len(states), hashed=hashed.files)
        mounts = local_mounts(root)
        recorded = meta.mounts if meta else ()
        lost = tuple(m for m in recorded if m not in mounts) if mounts is not None else ()
        based = self.index.count_base(pair.name)
        facts = Facts(True, len(w.seen), based, diff.files, w.root_dev,
                      meta.st_dev if meta else None, pair.max_delete.limit(diff.files),
                      str(pair.max_delete),
                      remote_entries=diff.entries if opts.list_remote else -1,
                      lost_mounts=lost,
                      bases_present=sum(1 for p in diff.gone if p in w.seen)
                      if opts.list_remote and not moved else 0,
                      remote_dir_missing=not opts.list_remote and based > 0
                      and self._remote_dir_gone(pair, remote, actions),
                      remote_mountable=remote.caps.dirs)
        self._trip(pair, facts, opts, actions)
        if mounts is not None and tuple(mounts) != recorded and not opts.dry_run:
            self.index.set_pair_mounts(pair.name, mounts)
        if not opts.dry_run:   # only after the guard: a tripped run changes nothing
            changed: list[tuple[str, LocalState, bool]] = list(hashed.updates)
            changed += [(p, s, False) for p, s in states.items()
                        if s.kind == DIR and (p not in prior or prior[p][1] != DIR)]
            if changed or removed:
                self.index.save_scan(pair.name, changed, removed)
            modes, mtimes = attrs_to_settle(states, base, policy)
            if modes or mtimes:
                self.index.settle_attrs(pair.name, modes, mtimes)
        if (meta is None or meta.st_dev != w.root_dev) and not opts.dry_run:
            self.index.set_pair_meta(pair.name, root, w.root_dev)

        for a in actions:
            if a.drift:
                log.warning("remote_drift", path=a.path, op=a.op.value, reason=a.reason)
        if opts.dry_run:
            res.status, res.plan = "planned", [a for a in actions if a.op != Op.FORGET]
            return

        # The plan is in phase order: writes first, then (phase >= 1) what deletes.
        cut = next((i for i, a in enumerate(actions) if phase(a) >= 1), len(actions))
        first, later = actions[:cut], actions[cut:]
        if scan_errors and any(a.replaces or a.when == When.BEFORE_WRITES for a in first):
            # Replacing a remote file by a directory removes it before any upload, as do
            # removals of names differing from a local one by case only: like every
            # delete, not after a scan error. What would go under them waits too.
            held = {a.path for a in first if a.replaces or a.when == When.BEFORE_WRITES}
            kept = [a for a in first if a.path not in held and not under(a.path, held)]
            log.warning("replacements_skipped", count=len(first) - len(kept),
                        paths=sorted(held)[:20],
                        reason="a scan error in this run; they wait for a clean run")
            res.skipped += len(first) - len(kept)
            first = kept
        # A name the walk could not sync may be a file renamed there from a name the remote
        # still has (the deletes in its folder wait), or a folder (those below it wait too);
        # not the pair's other deletes.
        odd_dirs = {rel.rpartition("/")[0] for rel, is_dir in w.odd_names if not is_dir}
        odd_trees = {rel.rpartition("/")[0] for rel, is_dir in w.odd_names if is_dir}
        # The folders this run writes in: what the remote's settle() makes durable. A move
        # (trash, replacement) also writes its destination's folders, which it may create
        # (.syncd-trash/<stamp>/...): every one of them down from the pair's root.
        res.touched = (_touched_folders((*first, *later))
                       if len(first) + len(later) <= 64 else None)
        # The views are no longer needed; on a first sync of 100k files they are most of
        # the process's memory, and the transfers can take a while.
        del actions, states, base, remote_map, plan_paths, prior, clean, w, diff, hashed
        self.index.clear_jobs(pair.name)
        if not first and not later:
            return
        ctx = self._ctx(pair, remote, root)
        reported = len(res.failures)   # the scan's own (unsyncable names), not transfers
        try:
            self._run(pair, ctx, first, res)
        finally:
            res.transfer_failures = len(res.failures) - reported
        if later:
            if len(res.failures) > reported or scan_errors:
                why = "a scan error" if scan_errors else "failed transfers"
                log.warning("deletes_skipped", count=len(later), reason=f"{why} in this run; "
                            "deletes wait for a clean run")
                res.skipped += len(later)
                return
            if odd_dirs or odd_trees:
                held: list[Action] = []
                go: list[Action] = []
                for a in later:
                    folder = a.path.rpartition("/")[0]
                    near = (folder in odd_dirs or folder in odd_trees or "" in odd_trees
                            or under(folder, odd_trees))
                    (held if near else go).append(a)
                if held:
                    log.warning("deletes_skipped", count=len(held),
                                paths=[a.path for a in held[:20]],
                                reason="a name in the same folder cannot be synced (a file "
                                       "renamed there?); they wait until it is renamed or "
                                       "ignored")
                    res.skipped += len(held)
                    later = go
            self._run(pair, ctx, later, res)

    def _lister(self, remote: Remote, pair: PairConfig, matcher: Matcher,
                check: bool) -> Callable[[], RemoteDiff]:
        db_file = self.index.path

        ignored_dirs: dict[str, bool] = {}

        def dir_ignored(d: str) -> bool:
            # gitignore: nothing under an excluded directory can be re-included, and the
            # local walk never enters one, so the listing must not see inside it either.
            v = ignored_dirs.get(d)
            if v is None:
                parent = d.rpartition("/")[0]
                v = (bool(parent) and dir_ignored(parent)) or matcher(d + "/")
                ignored_dirs[d] = v
            return v

        def keep(e: RemoteEntry) -> bool:
            parent = e.path.rpartition("/")[0]
            if parent and dir_ignored(parent):
                return False
            return not (dir_ignored(e.path) if e.kind == DIR else matcher(e.path))

        def run() -> RemoteDiff:
            if check:   # unreachable, auth and host-key errors surface here, named
                remote.check()
            # Its own connection: this may run in a forked child.
            idx = Index(db_file)
            try:
                expected = idx.base_fps(pair.name)
            finally:
                idx.close()
            keep_fn = None if matcher.empty or matcher.literal_only else keep
            fast = getattr(remote, "diff", None)
            if fast is not None:
                d = fast(pair.path, expected, keep_fn)
            else:
                d = diff_listing(remote.list(pair.path), expected, keep_fn)
            d = drop_unnamed(drop_ignored_dirs(d, expected, matcher.ignored_dirs))
            d.caps = remote.caps
            return d

        return run

    def _remote_dir_gone(self, pair: PairConfig, remote: Remote, actions: list[Action]) -> bool:
        """A run without the remote listing (the daemon's event-driven ones) that would write,
        for a pair with entries synced before: is its remote directory gone? Then the
        remote's storage is likely unmounted, and writing would create the directory on
        the bare mount point (one stat, only when there is something to write)."""
        if not pair.path or not remote.caps.dirs or not any(
                a.op in (Op.UPLOAD, Op.MKDIR) for a in actions):
            return False
        try:
            remote.stat(pair.path)
        except NotFound:
            return True
        except RemoteError:
            return False   # the transfers meet it and say so
        return False

    def _trip(self, pair: PairConfig, facts: Facts, opts: Options,
              actions: list[Action] | None = None) -> None:
        trip = check_safety(actions or [], facts, opts.allow_mass_delete, opts.allow_device_change)
        if trip is not None:
            raise SafetyError(pair.name, trip.reason, trip.override, self._where(pair))

    def _where(self, pair: PairConfig) -> str:
        return f"local {pair.local} -> remote '{pair.remote}' path '{pair.path or '/'}'"

    def _run(self, pair: PairConfig, ctx: PairCtx, actions: list[Action], res: PairResult) -> None:
        if not actions or self._stopping():
            return   # shutting down: the next start re-plans from a fresh scan
        n_jobs = len(actions)
        # The plan goes to the queue in batches as the workers take jobs. It is in phase
        # order (plan_push), so no job of a later phase is leased before every job of an
        # earlier one was written.
        pos = 0

        def feed() -> tuple[list[Job], bool]:
            nonlocal pos
            jobs = self.queue.enqueue_leased(pair.name, actions[pos:pos + ENQUEUE_BATCH])
            pos += ENQUEUE_BATCH
            if pos >= n_jobs:
                actions.clear()
                return jobs, False
            return jobs, True

        moving = any(a.op in (Op.UPLOAD, Op.DELETE, Op.TRASH) for a in actions)
        reporter = None
        if self.reporter_factory is not None and moving:
            reporter = self.reporter_factory(pair.name, n_jobs,
                                             sum(a.size for a in actions if a.op == Op.UPLOAD))
        self._drain(pair, ctx, feed, reporter, n_jobs >= PROCESS_POOL_MIN_JOBS, res)

    def _walk_streaming(self, pair: PairConfig, remote: Remote, root: str, matcher: Matcher,
                        listing: Listing, res: PairResult
                        ) -> tuple[Walk | None, RemoteDiff | BaseException, int, bool]:
        """A first sync (no bases, no local states recorded): the walk runs in a thread
        and, once the listing shows nothing on the remote, what it finds is uploaded
        directory by directory while it goes on, instead of after it: the first files
        land within a second, and walking overlaps transferring, as in rclone. Nothing on
        the remote means nothing to delete, adopt or compare: every entry is a plain
        upload or mkdir, which none of the delete guards concerns (the device guard was
        checked before). With anything on the remote, the walk just completes and
        the plan is made after it, as usual.

        Returns the walk (None if a stop ended it early), the listing (or its error), how
        many entries went to the queue, and whether the remote's prepare() ran."""
        st = _Streamer()
        th = threading.Thread(target=st.run, name="walk", daemon=True,
                              args=(root, matcher, pair.follow_symlinks))
        th.start()
        listed: RemoteDiff | BaseException
        prepared = done = False
        try:
            prepare = getattr(remote, "prepare", None)
            if prepare is not None and st.wait_for(1, timeout=0.05, stop=self.stop):
                prepare()   # uploads are likely: connect while the child lists
                prepared = True
            try:
                listed = listing.result()
            except Exception as e:   # raised where it always is, after the walk
                listed = e
            if isinstance(listed, RemoteDiff) and not listed.changed and not listed.gone:
                self._stream(pair, remote, root, st, res)
            done = not self._stopping()
        finally:
            if not done:   # stopping, Ctrl-C or an error: the rest of the walk is not needed
                st.cancel()
            st.stop_feeding()   # the walk goes on to its end without handing anything out
            th.join()
        if st.error is not None:
            raise st.error
        return st.result, listed, st.handed, prepared

    def _stream(self, pair: PairConfig, remote: Remote, root: str, st: _Streamer,
                res: PairResult) -> None:
        # Enough found (or a small tree): decide threads or processes. A slow first
        # directory (a network mount) is waited for, a stop is not.
        found = st.wait_for(PROCESS_POOL_MIN_JOBS, timeout=0.25, stop=self.stop)
        if not found or self._stopping():
            return
        from syncd.transfer import prewarm_processes

        processes = found >= PROCESS_POOL_MIN_JOBS and remote.caps.cpu_bound
        if processes:
            prewarm_processes()
        dirs = remote.caps.dirs
        policy = Policy(dirs=dirs, tmp_owner=getattr(remote, "tmp_owner", ""))
        reporter = None
        if self.reporter_factory is not None:
            reporter = self.reporter_factory(pair.name, *st.totals(dirs))
        set_totals = getattr(reporter, "set_totals", None)
        self.index.clear_jobs(pair.name)

        def feed() -> tuple[list[Job], bool]:
            batch, more = st.take(ENQUEUE_BATCH, timeout=0.05)
            if not batch:
                return [], more
            if set_totals is not None:
                set_totals(*st.totals(dirs))
            return self.queue.unqueued(pair.name, plan_push(dict(batch), {}, {}, policy)), more

        self.index.set_first_sync(pair.name, self.clock())
        try:
            self._drain(pair, self._ctx(pair, remote, root), feed, reporter, processes, res)
        finally:
            self.index.set_first_sync(pair.name, None)

    def _ctx(self, pair: PairConfig, remote: Remote, root: str) -> PairCtx:
        from syncd.transfer import PairCtx

        return PairCtx(pair.name, root, pair.path, remote,
                       self.cfg.remotes[pair.remote].transfers, pair.follow_symlinks)

    def _stopping(self) -> bool:
        return self.stop is not None and self.stop.is_set()

    def _drain(self, pair: PairConfig, ctx: PairCtx, feed: Callable[[], tuple[list[Job], bool]],
               reporter: Reporter | None, processes: bool, res: PairResult) -> None:
        """Run what `feed` hands out (and anything else queued for the pair) to the end."""
        # Worker processes pay a start-up cost (~0.1 s); worth it only for many jobs.
        from syncd.transfer import Runner

        runner = Runner(self.queue, {pair.name: ctx}, sleep=self.sleep, reporter=reporter,
                        log=self.log, done_level=self.transfer_log_level,
                        processes=processes, stop=self.stop, patience=self.patience,
                        breaker=self.breaker)
        try:
            stats = runner.run([pair.name], feed)
        finally:
            if reporter is not None and hasattr(reporter, "close"):
                reporter.close()
        if stats.waiting is not None:
            # Left pending for their backoff: failures of this run (so deletes wait), to
            # be tried again by the daemon's retry of the pair.
            retry_in = max(0.0, stats.waiting - self.queue.clock())
            for path, state, attempts, err in self.index.all_jobs(pair.name):
                if state == "pending":
                    stats.failed.append((path, f"{err or 'not done yet'} (attempt {attempts}; "
                                               f"not retried in this run: its backoff has at "
                                               f"least {retry_in:.0f} s to go; the daemon's retry of "
                                               f"the pair takes it up)"))
        res.retries += stats.retries + stats.held
        d = stats.done
        res.skipped += d.get("skipped", 0)
        res.uploaded += d.get(Op.UPLOAD.value, 0)
        res.uploaded_bytes += stats.uploaded_bytes
        res.deleted += d.get(Op.DELETE.value, 0)
        res.trashed += d.get(Op.TRASH.value, 0)
        res.adopted += d.get(Op.ADOPT.value, 0)
        res.mkdirs += d.get(Op.MKDIR.value, 0)
        res.attrs_set += d.get(Op.ATTRS.value, 0)
        res.failures += stats.failed
        if stats.unavailable is not None:
            down = stats.unavailable
            raise UnavailableError(down.reason, remote=down.remote)


class _Cancelled(Exception):
    pass


class _Streamer:
    """The local walk in a thread, handing out what each directory's listing added."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.items: deque[tuple[str, LocalState]] = deque()
        self.found = self.found_dirs = self.found_bytes = self.handed = 0
        self.done = False
        self.feeding = True
        self.cancelled = False
        self.result: Walk | None = None
        self.error: BaseException | None = None

    def run(self, root: str, matcher: Matcher, follow_symlinks: bool) -> None:
        try:
            self.result = walk(root, {}, {}, matcher, follow_symlinks, sink=self._sink)
        except _Cancelled:
            pass
        except BaseException as e:   # re-raised by the engine's thread
            self.error = e
        finally:
            with self.cv:
                self.done = True
                self.cv.notify_all()

    def _sink(self, entries: list[tuple[str, LocalState]]) -> None:
        if self.cancelled:
            raise _Cancelled
        nbytes = sum(st.size for _, st in entries)
        ndirs = sum(1 for _, st in entries if st.kind == DIR)
        with self.cv:
            if not self.feeding:
                return
            self.items.extend(entries)
            self.found += len(entries)
            self.found_dirs += ndirs
            self.found_bytes += nbytes
            self.cv.notify_all()

    def totals(self, dirs: bool) -> tuple[int, int]:
        """Jobs (directories too where the remote has them) and bytes found so far."""
        with self.cv:
            return self.found - (0 if dirs else self.found_dirs), self.found_bytes

    def wait_for(self, n: int, timeout: float, stop: Any = None) -> int:
        """Wait until `n` entries were found or the walk ended; after `timeout`, settle
        for at least one (unless `stop`, a threading.Event, is set). How many were found."""
        with self.cv:
            if not self.cv.wait_for(lambda: self.done or self.found >= n, timeout):
                while not self.cv.wait_for(lambda: self.done or self.found > 0, 0.25):
                    if stop is not None and stop.is_set():
                        break
            return self.found

    def take(self, n: int, timeout: float) -> tuple[list[tuple[str, LocalState]], bool]:
        """Up to `n` entries (waiting up to `timeout` for one), and whether more may come."""
        with self.cv:
            self.cv.wait_for(lambda: self.items or self.done, timeout)
            out = [self.items.popleft() for _ in range(min(n, len(self.items)))]
            self.handed += len(out)
            return out, not (self.done and not self.items)

    def stop_feeding(self) -> None:
        with self.cv:
            self.feeding = False
            self.items.clear()

    def cancel(self) -> None:
        self.cancelled = True


def down_message(d: Down | None, waiting: int) -> str:
    """One line for a pair whose remote is unavailable: since when, why, what to do."""
    if d is None:
        return "remote unavailable"
    since = time.strftime("%H:%M:%S", time.localtime(d.since))
    todo = ("fix the login or host key (`syncd config check --connect` shows it), then "
            "re-run" if d.auth else "re-run `syncd reconcile` once it answers; a running "
            "`syncd run` probes it and resumes by itself")
    what = d.message or f"remote '{d.remote}': {d.reason}"
    return (f"{what} (unavailable since {since}; {waiting} jobs wait in the queue, attempts "
            f"intact; {todo})")


def _ms(a: float, b: float) -> int:
    return int((b - a) * 1000)

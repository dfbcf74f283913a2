"""The state index in SQLite (WAL): local states, bases, pair facts and the job queue.

This is the only module that speaks SQL, so SQLite's complaints about the file or the disk
under it (damaged, full, I/O error, read-only) become syncd errors here, naming the file
and what to do. One `Index` belongs to one thread.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import json.encoder
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from syncd.errors import SyncdError
from syncd.model import (
    BEFORE_WRITES,
    OWN_TEMP,
    Action,
    Base,
    Job,
    LocalState,
    Op,
    When,
    phase,
    stat_sig,
)

DB_NAME = "index.sqlite3"
_T = TypeVar("_T")

def _v10_when(col: str) -> str:
    out = []
    for reason, when in ((BEFORE_WRITES, When.BEFORE_WRITES), (OWN_TEMP, When.OWN_TEMP)):
        text = reason.replace("'", "''")
        out.append(f"""
    UPDATE jobs SET {col} = json_insert(
        CASE WHEN json_array_length({col}) = 8 THEN json_insert({col}, '$[#]', 0)
             ELSE {col} END, '$[#]', {int(when)}, '$[#]', 0)
        WHERE {col} IS NOT NULL AND json_array_length({col}) <= 9
          AND json_extract({col}, '$[1]') = '{text}';""")
    return "".join(out)


# Forward-only migrations; index i takes the schema from version i to i + 1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE pairs (
        pair TEXT PRIMARY KEY,
        root TEXT NOT NULL,
        st_dev INTEGER,
        last_reconcile REAL,
        last_result TEXT
    );
    CREATE TABLE entries (
        pair TEXT NOT NULL,
        path TEXT NOT NULL,
        l_kind INTEGER, l_size INTEGER, l_mtime INTEGER, l_inode INTEGER, l_mode INTEGER,
        l_hash BLOB, l_racy INTEGER NOT NULL DEFAULT 0, l_sig INTEGER,
        b_kind INTEGER, b_size INTEGER, b_mtime INTEGER, b_hash BLOB, b_fp TEXT,
        PRIMARY KEY (pair, path)
    ) WITHOUT ROWID;
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        pair TEXT NOT NULL,
        path TEXT NOT NULL,
        phase INTEGER NOT NULL,
        args TEXT NOT NULL,
        state TEXT NOT NULL,              -- pending | leased | failed
        attempts INTEGER NOT NULL DEFAULT 0,
        not_before REAL NOT NULL DEFAULT 0,
        lease_owner TEXT,
        lease_until REAL,
        last_error TEXT,
        next_args TEXT,                   -- newer intent that arrived while leased
        created REAL NOT NULL,
        updated REAL NOT NULL,
        UNIQUE (pair, path)
    );
    CREATE INDEX jobs_lease ON jobs (pair, state, phase, id);
    """,
    # v2: multipart uploads in progress, so one cut by a crash resumes from its parts.
    """
    CREATE TABLE uploads (
        id INTEGER PRIMARY KEY,
        remote TEXT NOT NULL,
        key TEXT NOT NULL,
        upload_id TEXT,                   -- NULL: created, answer not recorded yet
        source TEXT NOT NULL,             -- the local file (absolute path)
        src_size INTEGER NOT NULL, src_mtime INTEGER NOT NULL, src_ctime INTEGER NOT NULL,
        src_inode INTEGER NOT NULL,
        hash BLOB,                        -- xxh3-128 promised in the object's metadata
        part_size INTEGER NOT NULL,
        created REAL NOT NULL,
        UNIQUE (remote, key)
    );
    CREATE TABLE upload_parts (
        upload INTEGER NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
        part INTEGER NOT NULL,
        etag TEXT NOT NULL,
        checksum TEXT,
        PRIMARY KEY (upload, part)
    ) WITHOUT ROWID;
    """,
    # v3: what the running daemon has moved since it started, for `syncd status`.
    """
    ALTER TABLE pairs ADD COLUMN run_since REAL;
    ALTER TABLE pairs ADD COLUMN run_files INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE pairs ADD COLUMN run_bytes INTEGER NOT NULL DEFAULT 0;
    """,
    # v4: mount points inside the local root (JSON list of relative paths), as of the last
    # run that passed the guards: one no longer mounted must not have its files deleted.
    """
    ALTER TABLE pairs ADD COLUMN mounts TEXT;
    """,
    # v5: the permission bits each base was sent with (a chmod alone is synced), and the
    # stat signature with the mode in it (recomputed: no file looks changed by this). A
    # file synced as it is was last sent with the mode the index has for it.
    """
    ALTER TABLE entries ADD COLUMN b_mode INTEGER;
    UPDATE entries SET b_mode = l_mode WHERE b_kind = 1 AND l_kind = 1 AND b_hash = l_hash;
    UPDATE entries SET l_sig = syncd_stat_sig(l_size, l_mtime, l_inode, l_mode)
        WHERE l_sig IS NOT NULL;
    """,
    # v6: where the pair's bases are (remote name and path): a config pointing the pair
    # elsewhere makes them history of another place.
    """
    ALTER TABLE pairs ADD COLUMN target TEXT;
    """,
    # v7: a chmod or touch alone is one 'attrs' job (mode-only jobs were 'chmod'), and a
    # file counts as synced only with its mtime too (b_mtime = l_mtime): one touched since
    # its last upload gets its mtime sent once. An older syncd refuses this index (its
    # version) rather than failing on an 'attrs' job.
    """
    UPDATE jobs SET args = '["attrs",' || substr(args, 10) WHERE args LIKE '["chmod",%';
    UPDATE jobs SET next_args = '["attrs",' || substr(next_args, 10)
        WHERE next_args LIKE '["chmod",%';
    """,
    # v8: when the pair's running first sync began: its uploads run without queue rows
    # (Queue.unqueued), so `syncd status` learns of it here. NULL when none runs.
    """
    ALTER TABLE pairs ADD COLUMN first_sync_since REAL;
    """,
    # v9: the last trash folder name a run of the pair took (reserve_trash_stamp).
    """
    ALTER TABLE pairs ADD COLUMN trash_stamp TEXT;
    """,
    # v10: what runs a job before its op's usual phase is a field of the action (its
    # `when`, args[9]), no longer its reason text: stored removals of case twins and of
    # our own temps get it. args[8] (replaces) is filled in where it was left out.
    _v10_when("args") + _v10_when("next_args"),
)


class IndexError_(SyncdError):
    """The state index cannot be used: the message names the file and what to do."""

    exit_code = 2


class IndexDamaged(IndexError_):
    """The index file is not an SQLite database, or SQLite found it malformed."""


class IndexNoSpace(IndexError_):
    """The disk holding the state dir is full: the index cannot grow."""


# SQLite's primary result codes (an extended code's low byte) that are about the file or
# the disk rather than about our SQL: these are the operator's to fix, not bugs.
_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_IOERR, _SQLITE_CORRUPT = 3, 8, 10, 11
_SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_NOTADB = 13, 14, 26
REBUILD_HINT = ("run `syncd index rebuild` to keep it aside and start a new index "
                "(see docs/operations.md, \"A damaged index, a full disk\")")


def state_error(path: Path, e: sqlite3.Error) -> IndexError_ | None:
    """The syncd error for an SQLite error on the index at `path`, or None when the error
    is not about the file or its disk (a bug of ours: it stays what it is)."""
    code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF
    state_dir = path.parent
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return IndexDamaged(f"state index {path} is damaged ({e}): {REBUILD_HINT}")
    if code == _SQLITE_FULL or (code == _SQLITE_IOERR and _disk_full(state_dir)):
        return IndexNoSpace(f"state dir {state_dir}: no space left on its disk to write the "
                            f"state index ({e}); free some space there (or set [daemon] "
                            "state_dir to another disk) and run again: nothing is lost, what "
                            "this run did not record is planned again")
    if code == _SQLITE_IOERR:
        name = getattr(e, "sqlite_errorname", "") or "I/O error"
        return IndexError_(f"state index {path}: {e} ({name}); check the disk holding the "
                           f"state dir {state_dir} (the kernel log says more); if the file "
                           f"itself is damaged, {REBUILD_HINT}")
    if code in (_SQLITE_PERM, _SQLITE_READONLY, _SQLITE_CANTOPEN):
        return IndexError_(f"state index {path}: {e}; run syncd as the user that owns the "
                           f"state dir {state_dir}, or set [daemon] state_dir to a directory "
                           "this user can write")
    return None


def _disk_full(d: Path) -> bool:
    with contextlib.suppress(OSError):
        return os.statvfs(d).f_bavail == 0
    return False


def _mapped(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(self, *args, **kw)
        except sqlite3.Error as e:
            err = state_error(self.path, e)
            if err is None:
                raise
            raise err from e
    return wrapper


def _errors_mapped(cls: type[_T]) -> type[_T]:
    """Every method of `cls` (whose instances have `.path`, the index file) raises the
    syncd error for an SQLite error about the file or its disk (state_error). Methods
    return lists and dicts, never live cursors, so no SQLite error escapes later."""
    for name, fn in list(vars(cls).items()):
        if inspect.isfunction(fn) and (not name.startswith("__") or name == "__init__"):
            setattr(cls, name, _mapped(fn))
    return cls


@dataclass(frozen=True, slots=True)
class PairMeta:
    root: str
    st_dev: int | None
    last_reconcile: float | None
    last_result: str | None
    mounts: tuple[str, ...] = ()
    target: str | None = None
    first_sync_since: float | None = None


class Done(NamedTuple):
    """A finished job to record: the new base (None = entry gone from the remote) and,
    where the transfer saw it, the local state it sent."""

    job_id: int
    path: str
    base: Base | None
    local: LocalState | None = None
    racy: bool = False
    keep_base: bool = False       # the job changed nothing (e.g. the file vanished first)


class Unqueued(NamedTuple):
    """A job that ran without a queue row (Queue.unqueued) and did not succeed: its row
    is written now, pending (a retry, not before `not_before`) or failed (parked)."""

    action: Action
    state: str          # 'pending' | 'failed'
    attempts: int
    not_before: float
    error: str | None


_q = json.encoder.encode_basestring_ascii   # in C: a JSON string literal, quotes included


def action_to_json(a: Action) -> str:
    """The JSON array action_from_json reads; written by hand (3x faster than json.dumps,
    which showed in enqueueing a 100k-file plan)."""
    h = f'"{a.hash.hex()}"' if a.hash else "null"
    if a.when or a.drift:
        tail = f",{int(a.replaces)},{int(a.when)},{int(a.drift)}]"
    else:
        tail = f",{int(a.replaces)}]" if a.replaces else "]"
    return (f"[{_q(a.op.value)},{_q(a.reason)},{int(a.size)},{h},{int(a.mtime_ns)},"
            f"{_q(a.dest)},{_q(a.remote_fp)},{int(a.kind)}{tail}")


def action_from_json(path: str, s: str) -> Action:
    op, reason, size, h, mtime_ns, dest, fp, kind, *rest = json.loads(s)
    replaces, when, drift = (*rest, 0, 0, 0)[:3]
    return Action(Op(op), path, reason, size, bytes.fromhex(h) if h else None, mtime_ns, dest,
                  fp, kind, replaces, When(when), bool(drift))


# Every base column: an entry whose remote side is gone (or forgotten) has them all NULL.
_NO_BASE = "b_kind=NULL, b_size=NULL, b_mtime=NULL, b_hash=NULL, b_fp=NULL, b_mode=NULL"


@_errors_mapped
class Index:
    def __init__(self, path: Path, migrations: Sequence[str] = MIGRATIONS):
        self.path = path
        self.db = self._connect()
        self._migrate(migrations)

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
        except sqlite3.Error as e:
            raise IndexError_(f"cannot open state index {self.path}: {e}") from None
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode survives a process crash; a power cut may lose the newest
        # commits, which only makes base older (a re-upload), never wrong.
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        # A first sync of 100k files writes ~30 MB of index pages: with SQLite's 2 MB
        # default cache most upserts re-read their b-tree pages, and a checkpoint (two
        # fsyncs) every 4 MB of WAL blocks the runner ten times a run.
        db.execute("PRAGMA cache_size=-65536")
        db.execute("PRAGMA wal_autocheckpoint=16384")
        db.create_function("syncd_stat_sig", 4, stat_sig, deterministic=True)   # migrations
        return db

    def detached(self) -> _Detached:
        """Close the connection for the duration of a fork(): SQLite must not carry an open
        connection (its lock and shared-memory state) into a child process."""
        return _Detached(self)

    @classmethod
    def open(cls, state_dir: Path) -> Index:
        try:
            state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            raise IndexError_(f"cannot create state_dir {state_dir}: {e.strerror}; set "
                              "[daemon] state_dir to a writable directory") from None
        return cls(state_dir / DB_NAME)

    def close(self) -> None:
        self.db.close()

    # --- schema ---------------------------------------------------------------------------

    def _migrate(self, migrations: Sequence[str]) -> None:
        db = self.db
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT version FROM schema_version").fetchone()
        version = row[0] if row else 0
        if version > len(migrations):
            raise IndexError_(f"state index {self.path} has schema version {version}, newer "
                              f"than this syncd understands ({len(migrations)}); upgrade syncd "
                              "or point [daemon] state_dir elsewhere")
        for v in range(version, len(migrations)):
            with self.tx():
                # Another process may have migrated since we looked: re-read under the lock.
                row = db.execute("SELECT version FROM schema_version").fetchone()
                if (row[0] if row else 0) > v:
                    continue
                for stmt in _split_sql(migrations[v]):
                    db.execute(stmt)
                db.execute("DELETE FROM schema_version")
                db.execute("INSERT INTO schema_version VALUES (?)", (v + 1,))

    @property
    def schema_version(self) -> int:
        return self.db.execute("SELECT version FROM schema_version").fetchone()[0]

    def tx(self) -> _Tx:
        return _Tx(self.db)

    # --- pairs ----------------------------------------------------------------------------

    def pair_meta(self, pair: str) -> PairMeta | None:
        r = self.db.execute("SELECT root, st_dev, last_reconcile, last_result, mounts, target, "
                            "first_sync_since FROM pairs WHERE pair = ?", (pair,)).fetchone()
        if r is None:
            return None
        return PairMeta(*r[:4], tuple(json.loads(r[4])) if r[4] else (), r[5], r[6])

    def reserve_trash_stamp(self, pair: str, stamp: str) -> str:
        """`stamp` (a run's UTC second, '2026-12-02T125900Z') for the pair's trash folder,
        or, when an earlier run took that name or a later one (a run a moment before, a
        clock set back), the next after the latest taken: '…Z-2', '-3'. Recorded, so no
        later run of this state dir takes it again."""
        with self.tx():
            r = self.db.execute("SELECT trash_stamp FROM pairs WHERE pair = ?",
                                (pair,)).fetchone()
            last = r[0] if r else None
            if last is not None and _stamp_order(stamp) <= _stamp_order(last):
                second, n = _stamp_order(last)
                stamp = f"{second}-{n + 1}"
            self._upsert_pair(pair, trash_stamp=stamp)
        return stamp

    def set_first_sync(self, pair: str, since: float | None) -> None:
        """Mark the pair's first sync as running since `since` (None: it ended)."""
        with self.tx():
            self._upsert_pair(pair, first_sync_since=since)

    def set_pair_target(self, pair: str, target: str, forget_bases: bool,
                        map_fp: Callable[[str], str] | None = None) -> None:
        """Record where the pair's bases are; with `forget_bases`, drop the bases first
        (they describe another remote or path); `map_fp` rewrites their fingerprints (a
        backend whose fingerprint format changed)."""
        with self.tx():
            if map_fp is not None:
                rows = self.db.execute("SELECT path, b_fp FROM entries WHERE pair=? AND "
                                       "b_fp IS NOT NULL", (pair,)).fetchall()
                self.db.executemany(
                    "UPDATE entries SET b_fp=? WHERE pair=? AND path=?",
                    [(new, pair, path) for path, fp in rows if (new := map_fp(fp)) != fp])
            if forget_bases:
                self.db.execute(f"UPDATE entries SET {_NO_BASE} WHERE pair=?", (pair,))
                self.db.execute("DELETE FROM entries WHERE pair=? AND l_kind IS NULL", (pair,))
                self.db.execute("DELETE FROM jobs WHERE pair=?", (pair,))
            self._upsert_pair(pair, target=target)

    def _upsert_pair(self, pair: str, **cols: Any) -> None:
        """Set these columns of the pair's row, making the row (root '') if it is new.
        Column names are ours, never input."""
        names = list(cols)
        insert = ", ".join(["pair", *names] + ([] if "root" in cols else ["root"]))
        marks = ", ".join(["?"] * (1 + len(names)) + ([] if "root" in cols else ["''"]))
        sets = ", ".join(f"{n} = excluded.{n}" for n in names)
        self.db.execute(f"INSERT INTO pairs ({insert}) VALUES ({marks}) ON CONFLICT(pair) "
                        f"DO UPDATE SET {sets}", (pair, *cols.values()))

    def set_pair_mounts(self, pair: str, mounts: Sequence[str]) -> None:
        with self.tx():
            self._upsert_pair(pair, mounts=json.dumps(list(mounts)))

    def set_pair_meta(self, pair: str, root: str, st_dev: int | None) -> None:
        with self.tx():
            self._upsert_pair(pair, root=root, st_dev=st_dev)

    def start_run_counters(self, pairs: Sequence[str], since: float) -> None:
        """Zero the since-start counters of these pairs (a daemon starting)."""
        with self.tx():
            self.db.executemany(
                "INSERT INTO pairs (pair, root, run_since) VALUES (?, '', ?) ON CONFLICT(pair) "
                "DO UPDATE SET run_since = excluded.run_since, run_files = 0, run_bytes = 0",
                ((pair, since) for pair in pairs))

    def add_run_counters(self, pair: str, files: int, nbytes: int) -> None:
        if files or nbytes:
            with self.tx():
                self.db.execute("UPDATE pairs SET run_files = run_files + ?, "
                                "run_bytes = run_bytes + ? WHERE pair = ?", (files, nbytes, pair))

    def run_counters(self, pair: str) -> tuple[float | None, int, int]:
        r = self.db.execute("SELECT run_since, run_files, run_bytes FROM pairs WHERE pair = ?",
                            (pair,)).fetchone()
        return (r[0], r[1], r[2]) if r else (None, 0, 0)

    def set_pair_result(self, pair: str, when: float, result: str) -> None:
        with self.tx():
            # An upsert: a first reconcile stopped by a guard has no row yet, and `syncd
            # status` must still say it ran and why it stopped.
            self._upsert_pair(pair, last_reconcile=when, last_result=result)

    # --- entries --------------------------------------------------------------------------

    def load(self, pair: str) -> tuple[dict[str, LocalState], set[str], dict[str, Base]]:
        """Everything the index knows about a pair, as objects: local states, racy paths,
        bases. For tests and tools; reconciles use load_prior/load_bases (cheaper)."""
        local: dict[str, LocalState] = {}
        racy: set[str] = set()
        base: dict[str, Base] = {}
        cur = self.db.execute(
            "SELECT path, l_kind, l_size, l_mtime, l_inode, l_mode, l_hash, l_racy, "
            "b_kind, b_size, b_mtime, b_hash, b_fp, b_mode FROM entries WHERE pair = ?", (pair,))
        for path, lk, ls, lm, li, lmo, lh, lr, bk, bs, bm, bh, bf, bmo in cur:
            if lk is not None:
                local[path] = LocalState(lk, ls, lm, li, lmo, lh)
                if lr:
                    racy.add(path)
            if bk is not None:
                base[path] = Base(bk, bs, bm, bh, bf, bmo)
        return local, racy, base

    def load_prior(self, pair: str) -> tuple[dict[str, int], dict[str, tuple[Any, ...]]]:
        """The index's memory of the local tree, shaped for the scanner's hot loop:

        clean: path -> stat_sig for files that are synced as they are and not racy (one
        int per file: on an idle reconcile this is nearly every row, and loading it is on
        the critical path);
        other: path -> (path, kind, size, mtime_ns, inode, mode, hash, racy, synced) for
        everything else (directories, racy files, files not yet confirmed on the remote)."""
        # IS, not =: a missing base (NULLs) must make the condition false, never NULL, or
        # NOT (...) would drop the row from `other` too. A file is synced with its mode
        # and mtime too: one whose change did not reach the remote (its job failed) is
        # planned again. A base without a mode (adopted; or one settle_attrs forgot, for a
        # remote that keeps none) matches any.
        synced_file = ("l_kind = 1 AND l_racy = 0 AND l_hash IS NOT NULL AND b_kind IS 1 AND "
                       "b_hash IS l_hash AND (b_mode IS NULL OR b_mode IS l_mode) AND "
                       "b_mtime IS l_mtime")
        clean = dict(self.db.execute(
            f"SELECT path, l_sig FROM entries WHERE pair = ? AND {synced_file}", (pair,)))
        other = {r[0]: r for r in self.db.execute(
            "SELECT path, l_kind, l_size, l_mtime, l_inode, l_mode, l_hash, l_racy, "
            "(b_kind IS l_kind AND b_hash IS l_hash AND l_racy = 0 AND (l_kind IS NOT 1 OR "
            "((b_mode IS NULL OR b_mode IS l_mode) AND b_mtime IS l_mtime))) FROM entries "
            f"WHERE pair = ? AND l_kind IS NOT NULL AND NOT ({synced_file})", (pair,))}
        return clean, other

    def settle_attrs(self, pair: str, modes: Sequence[str],
                     mtimes: Sequence[tuple[str, int]]) -> None:
        """The remote cannot carry these changes alone (see plan.attrs_to_settle): the
        bases of `modes` stop recording a mode (the one they were sent with); those of
        `mtimes` (path, mtime_ns) take the local mtime."""
        with self.tx():
            self.db.executemany("UPDATE entries SET b_mode = NULL WHERE pair = ? AND path = ?",
                                ((pair, p) for p in modes))
            self.db.executemany("UPDATE entries SET b_mtime = ? WHERE pair = ? AND path = ?",
                                ((m, pair, p) for p, m in mtimes))

    def load_local(self, pair: str, paths: Iterable[str]) -> dict[str, LocalState]:
        out: dict[str, LocalState] = {}
        wanted = list(paths)
        for i in range(0, len(wanted), 500):
            chunk = wanted[i:i + 500]
            for r in self.db.execute(
                    "SELECT path, l_kind, l_size, l_mtime, l_inode, l_mode, l_hash FROM entries "
                    f"WHERE pair = ? AND l_kind IS NOT NULL AND path IN ({','.join('?' * len(chunk))})",
                    (pair, *chunk)):
                out[r[0]] = LocalState(*r[1:])
        return out

    def base_fps(self, pair: str) -> dict[str, str]:
        """Remote fingerprint of every base (a directory's is "dir"): what the remote
        listing should show."""
        return dict(self.db.execute("SELECT path, b_fp FROM entries WHERE pair = ? AND "
                                    "b_kind IS NOT NULL", (pair,)))

    def load_bases(self, pair: str, paths: Iterable[str] | None = None) -> dict[str, Base]:
        """Bases of the given paths (all of the pair's when None)."""
        q = ("SELECT path, b_kind, b_size, b_mtime, b_hash, b_fp, b_mode FROM entries "
             "WHERE pair = ? AND b_kind IS NOT NULL")
        if paths is None:
            return {r[0]: Base(*r[1:]) for r in self.db.execute(q, (pair,))}
        out: dict[str, Base] = {}
        wanted = list(paths)
        for i in range(0, len(wanted), 500):
            chunk = wanted[i:i + 500]
            for r in self.db.execute(q + f" AND path IN ({','.join('?' * len(chunk))})",
                                     (pair, *chunk)):
                out[r[0]] = Base(*r[1:])
        return out

    def orphan_bases(self, pair: str) -> list[str]:
        """Paths with a base but no local state: deleted locally, delete not yet done."""
        return [r[0] for r in self.db.execute(
            "SELECT path FROM entries WHERE pair = ? AND l_kind IS NULL AND b_kind IS NOT NULL",
            (pair,))]

    def count_base(self, pair: str) -> int:
        return self.db.execute("SELECT count(*) FROM entries WHERE pair = ? AND b_kind IS NOT "
                               "NULL", (pair,)).fetchone()[0]

    def save_scan(self, pair: str, changed: Iterable[tuple[str, LocalState, bool]],
                  removed: Iterable[str]) -> None:
        """Record new local states (path, state, racy) and forget vanished local entries."""
        with self.tx():
            self.db.executemany(
                "INSERT INTO entries (pair, path, l_kind, l_size, l_mtime, l_inode, l_mode, "
                "l_hash, l_racy, l_sig) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(pair, path) DO "
                "UPDATE SET l_kind=excluded.l_kind, l_size=excluded.l_size, "
                "l_mtime=excluded.l_mtime, l_inode=excluded.l_inode, l_mode=excluded.l_mode, "
                "l_hash=excluded.l_hash, l_racy=excluded.l_racy, l_sig=excluded.l_sig",
                ((pair, p, s.kind, s.size, s.mtime_ns, s.inode, s.mode, s.hash, int(r),
                  stat_sig(s.size, s.mtime_ns, s.inode, s.mode)) for p, s, r in changed))
            rm = [(pair, p) for p in removed]
            self.db.executemany("UPDATE entries SET l_kind=NULL, l_size=NULL, l_mtime=NULL, "
                                "l_inode=NULL, l_mode=NULL, l_hash=NULL, l_racy=0, l_sig=NULL "
                                "WHERE pair=? AND path=?", rm)
            self.db.executemany("DELETE FROM entries WHERE pair=? AND path=? AND "
                                "b_kind IS NULL", rm)

    def _set_bases(self, pair: str, done: Sequence[Done]) -> None:
        gone = [(pair, d.path) for d in done if not d.keep_base and d.base is None]
        if gone:
            self.db.executemany(f"UPDATE entries SET {_NO_BASE} WHERE pair=? AND path=?", gone)
            self.db.executemany("DELETE FROM entries WHERE pair=? AND path=? AND l_kind IS NULL",
                                gone)
        rows = []
        for d in done:
            b, s = d.base, d.local
            if d.keep_base or b is None:
                continue
            if s is None:
                rows.append((pair, d.path, None, None, None, None, None, None, 0, None, b.kind,
                             b.size, b.mtime_ns, b.hash, b.remote_fp, b.mode))
            else:
                rows.append((pair, d.path, s.kind, s.size, s.mtime_ns, s.inode, s.mode, s.hash,
                             int(d.racy), stat_sig(s.size, s.mtime_ns, s.inode, s.mode), b.kind,
                             b.size, b.mtime_ns, b.hash, b.remote_fp, b.mode))
        if rows:
            # A local state rides along only when the transfer saw one; else keep the scan's.
            self.db.executemany(
                "INSERT INTO entries (pair, path, l_kind, l_size, l_mtime, l_inode, l_mode, l_hash, "
                "l_racy, l_sig, b_kind, b_size, b_mtime, b_hash, b_fp, b_mode) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(pair, path) DO UPDATE SET "
                "b_kind=excluded.b_kind, b_size=excluded.b_size, b_mtime=excluded.b_mtime, "
                "b_hash=excluded.b_hash, b_fp=excluded.b_fp, b_mode=excluded.b_mode, "
                "l_kind=coalesce(excluded.l_kind, l_kind), l_size=coalesce(excluded.l_size, l_size), "
                "l_mtime=coalesce(excluded.l_mtime, l_mtime), "
                "l_inode=coalesce(excluded.l_inode, l_inode), l_mode=coalesce(excluded.l_mode, l_mode), "
                "l_hash=coalesce(excluded.l_hash, l_hash), l_sig=coalesce(excluded.l_sig, l_sig), "
                "l_racy=CASE WHEN excluded.l_kind IS NULL THEN l_racy ELSE excluded.l_racy END", rows)

    # --- jobs -----------------------------------------------------------------------------

    def clear_jobs(self, pair: str) -> int:
        with self.tx():
            return self.db.execute("DELETE FROM jobs WHERE pair = ?", (pair,)).rowcount

    def enqueue(self, pair: str, actions: Iterable[Action], phase_of: Callable[[Action], int],
                now: float, lease: tuple[str, float] | None = None) -> list[Job]:
        """Newest intent per (pair, path) wins; an in-flight job keeps running and the new
        intent waits behind it in next_args.

        With `lease` = (owner, until), a job new to the queue is written already leased to
        that owner and returned, so the caller runs it without a lease round trip (reading
        back and decoding each job). A path that already had a job takes the usual upsert
        and is leased later, by lease()."""
        acts = list(actions)
        if lease is not None and len({a.path for a in acts}) < len(acts):
            lease = None   # one path twice (a plan never has that): lease() sorts it out
        state, owner, until = ("leased", lease[0], lease[1]) if lease else ("pending", None, None)
        with self.tx():
            first = self.db.execute("SELECT coalesce(max(id), 0) FROM jobs").fetchone()[0]
            self.db.executemany(
                "INSERT INTO jobs (pair, path, phase, args, state, attempts, not_before, "
                "lease_owner, lease_until, created, updated) "
                "VALUES (?,?,?,?,?, 0, ?, ?, ?, ?, ?) "
                "ON CONFLICT(pair, path) DO UPDATE SET "
                "  next_args = CASE WHEN state = 'leased' THEN excluded.args ELSE NULL END, "
                "  args = CASE WHEN state = 'leased' THEN args ELSE excluded.args END, "
                "  phase = CASE WHEN state = 'leased' THEN phase ELSE excluded.phase END, "
                "  attempts = CASE WHEN state = 'leased' THEN attempts ELSE 0 END, "
                "  not_before = CASE WHEN state = 'leased' THEN not_before ELSE "
                "               excluded.not_before END, "
                "  last_error = CASE WHEN state = 'leased' THEN last_error ELSE NULL END, "
                "  state = CASE WHEN state = 'leased' THEN 'leased' ELSE 'pending' END, "
                "  updated = excluded.updated",
                ((pair, a.path, phase_of(a), action_to_json(a), state, now, owner, until, now, now)
                 for a in acts))
            if lease is None:
                return []
            # Without AUTOINCREMENT a new row's id is above every id before the insert, and
            # an upserted row keeps its old one: the rows above `first` are the new jobs.
            by_path = {a.path: a for a in acts}
            return [Job(i, pair, path, by_path[path], 0, now, None) for i, path in self.db.execute(
                "SELECT id, path FROM jobs WHERE id > ? ORDER BY id", (first,))]

    def min_open_phase(self, pair: str) -> int | None:
        """The lowest phase of the pair's unfinished (pending or leased) jobs."""
        phases = [p for p in self._min_phases(pair) if p is not None]
        return min(phases, default=None)

    def _min_phases(self, pair: str) -> tuple[int | None, int | None]:
        """(lowest pending phase, lowest leased phase) of the pair: two index seeks."""
        q = "SELECT min(phase) FROM jobs WHERE pair = ? AND state = ?"
        return (self.db.execute(q, (pair, "pending")).fetchone()[0],
                self.db.execute(q, (pair, "leased")).fetchone()[0])

    def lease(self, owner: str, now: float, until: float, limit: int,
              pairs: Sequence[str] | None = None) -> list[Job]:
        """Take up to `limit` ready jobs, per pair from its lowest unfinished phase only.

        Every query here is an index seek on (pair, state, phase, id): leasing stays O(limit)
        however many jobs wait (a sort over all pending jobs per lease was quadratic)."""
        db = self.db
        out: list[Job] = []
        with self.tx():
            if pairs is None:
                pairs = [r[0] for r in db.execute(
                    "SELECT DISTINCT pair FROM jobs WHERE state = 'pending'")]
            for pair in pairs:
                if len(out) >= limit:
                    break
                pending_phase, leased_phase = self._min_phases(pair)
                if pending_phase is None or (leased_phase is not None and leased_phase < pending_phase):
                    continue   # a later phase waits until the earlier one is finished
                rows = db.execute(
                    "UPDATE jobs SET state='leased', lease_owner=?, lease_until=?, updated=? "
                    "WHERE id IN (SELECT id FROM jobs WHERE pair = ? AND state = 'pending' "
                    "AND phase = ? AND not_before <= ? ORDER BY id LIMIT ?) "
                    "RETURNING id, pair, path, args, attempts, not_before, last_error",
                    (owner, until, now, pair, pending_phase, now, limit - len(out))).fetchall()
                rows.sort()
                out += [Job(r[0], r[1], r[2], action_from_json(r[2], r[3]), r[4], r[5], r[6])
                        for r in rows]
        return out

    def reclaim(self, now: float, owner: str | None = None) -> int:
        """Return leases to pending: those whose time ran out, and (given the live `owner`,
        which holds the state-dir lock) every lease held by any other, dead, process. The
        lock holder also drops first-sync marks (set_first_sync) a dead process left."""
        with self.tx():
            if owner is not None:
                self.db.execute("UPDATE pairs SET first_sync_since = NULL "
                                "WHERE first_sync_since IS NOT NULL")
            q = "UPDATE jobs SET state='pending', lease_owner=NULL, lease_until=NULL " \
                "WHERE state='leased' AND (lease_until < ?"
            params: list[Any] = [now]
            if owner is not None:
                q += " OR lease_owner IS NOT ?"
                params.append(owner)
            return self.db.execute(q + ")", params).rowcount

    def release(self, job_ids: Sequence[int]) -> None:
        with self.tx():
            self.db.executemany("UPDATE jobs SET state='pending', lease_owner=NULL, lease_until=NULL "
                                "WHERE id=? AND state='leased'", ((i,) for i in job_ids))

    def finish(self, pair: str, done: Sequence[Done], retry: Sequence[tuple[int, float, str, int]],
               failed: Sequence[tuple[int, str, int]], now: float,
               unqueued: Sequence[Unqueued] = ()) -> None:
        """One transaction: bases move with the acks of the jobs that moved them;
        retries get their not_before; permanent failures are parked. A newer intent that
        arrived while a job ran (next_args) becomes the pending job in every case.
        Jobs that ran without a row (negative ids) have nothing to ack; those that did not
        succeed (`unqueued`) get their row now, replacing any the path had unless that
        one is leased (running elsewhere: its own outcome decides)."""
        db = self.db
        with self.tx():
            self._set_bases(pair, done)
            self._write_unqueued(pair, unqueued, now)
            db.executemany("UPDATE jobs SET state='pending', attempts=?, not_before=?, last_error=?, "
                           "lease_owner=NULL, lease_until=NULL, updated=? WHERE id=?",
                           ((a, nb, err, now, i) for i, nb, err, a in retry))
            db.executemany("UPDATE jobs SET state='failed', attempts=?, last_error=?, "
                           "lease_owner=NULL, lease_until=NULL, updated=? WHERE id=?",
                           ((a, err, now, i) for i, err, a in failed))
            ids = [d.job_id for d in done if d.job_id > 0] + [r[0] for r in retry] + \
                [f[0] for f in failed]
            for chunk in _chunks(ids):
                db.execute(
                    "UPDATE jobs SET args=next_args, next_args=NULL, state='pending', attempts=0, "
                    "not_before=?, last_error=NULL, lease_owner=NULL, lease_until=NULL, updated=? "
                    f"WHERE id IN ({','.join('?' * len(chunk))}) AND next_args IS NOT NULL",
                    (now, now, *chunk))
            for chunk in _chunks([d.job_id for d in done if d.job_id > 0]):
                db.execute(f"DELETE FROM jobs WHERE id IN ({','.join('?' * len(chunk))}) "
                           "AND state='leased'", chunk)

    def add_unqueued(self, pair: str, unqueued: Sequence[Unqueued], now: float) -> None:
        """Rows for jobs that ran without one (see finish), outside a finish."""
        with self.tx():
            self._write_unqueued(pair, unqueued, now)

    def _write_unqueued(self, pair: str, unqueued: Sequence[Unqueued], now: float) -> None:
        self.db.executemany(
            "INSERT INTO jobs (pair, path, phase, args, state, attempts, not_before, "
            "last_error, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?) "
            "ON CONFLICT(pair, path) DO UPDATE SET phase=excluded.phase, "
            "args=excluded.args, state=excluded.state, attempts=excluded.attempts, "
            "not_before=excluded.not_before, last_error=excluded.last_error, "
            "next_args=NULL, lease_owner=NULL, lease_until=NULL, updated=excluded.updated "
            "WHERE state != 'leased'",
            ((pair, u.action.path, phase(u.action), action_to_json(u.action), u.state,
              u.attempts, u.not_before, u.error, now, now) for u in unqueued))

    def job_counts(self, pair: str) -> dict[str, int]:
        rows = self.db.execute("SELECT state, count(*) FROM jobs WHERE pair=? GROUP BY state",
                               (pair,)).fetchall()
        return {s: n for s, n in rows}

    def next_ready_time(self, pairs: Sequence[str]) -> float | None:
        r = self.db.execute(
            f"SELECT min(not_before) FROM jobs WHERE state='pending' AND pair IN "
            f"({','.join('?' * len(pairs))})", list(pairs)).fetchone()
        return r[0]

    def requeue_failed(self, pairs: Sequence[str], now: float) -> int:
        """Failed (parked) jobs of these pairs become pending again, attempts reset."""
        with self.tx():
            return self.db.executemany(
                "UPDATE jobs SET state='pending', attempts=0, not_before=?, updated=? "
                "WHERE pair=? AND state='failed'", ((now, now, pair) for pair in pairs)).rowcount

    def failed_jobs(self, pair: str) -> list[Job]:
        rows = self.db.execute("SELECT id, pair, path, args, attempts, not_before, last_error "
                               "FROM jobs WHERE pair=? AND state='failed' ORDER BY path",
                               (pair,)).fetchall()
        return [Job(r[0], r[1], r[2], action_from_json(r[2], r[3]), r[4], r[5], r[6])
                for r in rows]

    def all_jobs(self, pair: str) -> list[tuple[str, str, int, str | None]]:
        """(path, state, attempts, last_error) of every job of a pair; for tests and status."""
        return self.db.execute("SELECT path, state, attempts, last_error FROM jobs WHERE pair=? "
                               "ORDER BY path", (pair,)).fetchall()


class UploadRecord(NamedTuple):
    id: int
    remote: str
    key: str
    upload_id: str | None
    source: str
    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    hash: bytes | None
    part_size: int
    created: float


_UPLOAD_COLS = ("id, remote, key, upload_id, source, src_size, src_mtime, src_ctime, src_inode, "
                "hash, part_size, created")


@_errors_mapped
class UploadLog:
    """Multipart uploads in progress: which upload id and finished parts belong to which
    local file, so an upload cut by a crash or a network loss resumes from its parts.

    Used by transfer threads and forked listing children at once: one connection per
    thread and process, each write its own short transaction."""

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()
        self._migrated_in = 0
        self._inherited: list[sqlite3.Connection] = []

    def _db(self) -> sqlite3.Connection:
        loc, pid = self._local, os.getpid()
        db = getattr(loc, "db", None)
        if db is not None and loc.pid == pid:
            return db
        if db is not None:
            # Opened before a fork: never used nor closed here (closing could disturb the
            # parent's locks); kept referenced so garbage collection does not close it.
            self._inherited.append(db)
        if self._migrated_in != pid:
            Index(self.path).close()
            self._migrated_in = pid
        db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0,
                             check_same_thread=True)
        db.execute("PRAGMA foreign_keys=ON")
        loc.db, loc.pid = db, pid
        return db

    def find(self, remote: str, key: str) -> UploadRecord | None:
        r = self._db().execute(f"SELECT {_UPLOAD_COLS} FROM uploads WHERE remote = ? AND key = ?",
                               (remote, key)).fetchone()
        return UploadRecord(*r) if r else None

    def under(self, remote: str, key_prefix: str) -> list[UploadRecord]:
        rows = self._db().execute(f"SELECT {_UPLOAD_COLS} FROM uploads WHERE remote = ?",
                                  (remote,)).fetchall()
        return [UploadRecord(*r) for r in rows if r[2].startswith(key_prefix)]

    def begin(self, remote: str, key: str, source: str, size: int, mtime_ns: int,
              ctime_ns: int, inode: int, hash_: bytes | None, part_size: int,
              now: float) -> int:
        """Record the intent before CreateMultipartUpload: an upload created just before a
        crash is still known (by key and time) and can be found and aborted."""
        try:
            db = self._db()
            with _Tx(db):
                db.execute("DELETE FROM uploads WHERE remote = ? AND key = ?", (remote, key))
                cur = db.execute(
                    "INSERT INTO uploads (remote, key, source, src_size, src_mtime, src_ctime, "
                    "src_inode, hash, part_size, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (remote, key, source, size, mtime_ns, ctime_ns, inode, hash_, part_size, now))
        except sqlite3.Error as e:
            raise (state_error(self.path, e) or IndexError_(
                f"cannot record the upload in the state index {self.path}: {e}")) from None
        return int(cur.lastrowid or 0)

    def started(self, rec_id: int, upload_id: str) -> None:
        try:
            self._db().execute("UPDATE uploads SET upload_id = ? WHERE id = ?",
                               (upload_id, rec_id))
        except sqlite3.Error as e:
            raise (state_error(self.path, e) or IndexError_(
                f"cannot record the upload in the state index {self.path}: {e}")) from None

    def part_done(self, rec_id: int, part: int, etag: str, checksum: str | None) -> None:
        self._db().execute("INSERT OR REPLACE INTO upload_parts (upload, part, etag, checksum) "
                           "VALUES (?, ?, ?, ?)", (rec_id, part, etag, checksum))

    def parts(self, rec_id: int) -> dict[int, tuple[str, str | None]]:
        rows = self._db().execute("SELECT part, etag, checksum FROM upload_parts WHERE upload = ?",
                                  (rec_id,))
        return {n: (etag, ck) for n, etag, ck in rows}

    def forget(self, rec_id: int) -> None:
        self._db().execute("DELETE FROM uploads WHERE id = ?", (rec_id,))

    def close(self) -> None:
        """Close this thread's connection (others close when their thread ends)."""
        db = getattr(self._local, "db", None)
        if db is not None and self._local.pid == os.getpid():
            db.close()
        self._local.db = None


# --- rebuilding ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rebuilt:
    path: Path                 # the index (new)
    kept: Path | None          # where the old one is now; None: there was none
    problem: str | None        # what SQLite's check found; None: it passed
    pairs_kept: int            # pairs whose recorded facts (root device, mounts) carried over


def check_index(path: Path) -> str | None:
    """What SQLite's quick_check finds wrong with the index file, None if it passes. Reads
    the whole file (about 40 ms for 100k entries)."""
    try:
        db = _read_only(path)
        try:
            rows = db.execute("PRAGMA quick_check(5)").fetchall()
            db.execute("SELECT version FROM schema_version").fetchone()
        finally:
            db.close()
    except sqlite3.Error as e:
        return str(e)
    problems = [str(r[0]) for r in rows if r[0] != "ok"]
    return "; ".join(problems) if problems else None


def rebuild_index(state_dir: Path, force: bool = False, now: float | None = None) -> Rebuilt:
    """Move the state dir's index aside (kept beside it, named by the UTC time) and start a
    new one. A sound index is replaced only with `force`. The caller holds the state lock.

    The new index holds no bases: each pair's next run is a first sync. What can be read
    of the old pairs table (the root's device, the mounts inside it, where it syncs to) is
    carried over, so the guards that compare with it stay armed."""
    path = state_dir / DB_NAME
    if not path.exists():
        return Rebuilt(path, None, None, 0)
    problem = check_index(path)
    if problem is None and not force:
        raise IndexError_(f"state index {path} passed SQLite's check: nothing to rebuild. To "
                          "start a new one anyway (every pair's sync history is forgotten; "
                          "the old file is kept), run `syncd index rebuild --yes`")
    facts = _salvage_pairs(path)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    label = "damaged" if problem is not None else "replaced"
    kept = state_dir / f"index-{label}-{stamp}.sqlite3"
    for n in range(2, 1000):
        if not any(Path(f"{kept}{x}").exists() for x in ("", "-wal", "-shm")):
            break
        kept = state_dir / f"index-{label}-{stamp}-{n}.sqlite3"
    try:
        # The WAL first: one left behind would be replayed into the new index.
        for x in ("-wal", "-shm", ""):
            with contextlib.suppress(FileNotFoundError):
                os.rename(f"{path}{x}", f"{kept}{x}")
        _fsync_dir(state_dir)
    except OSError as e:
        raise IndexError_(f"cannot move the state index {path} aside: {e.strerror}; move it "
                          "(and its -wal and -shm files) out of the state dir by hand") from None
    new = Index(path)
    try:
        for pair, root, st_dev, mounts, target in facts:
            new._upsert_pair(pair, root=root, st_dev=st_dev, mounts=mounts, target=target)
    finally:
        new.close()
    return Rebuilt(path, kept, problem, len(facts))


def _salvage_pairs(path: Path) -> list[tuple[str, str, int | None, str | None, str | None]]:
    """The old index's pair rows that can be read and look right; none on any error."""
    out = []
    try:
        db = _read_only(path)
        try:
            rows = db.execute("SELECT pair, root, st_dev, mounts, target FROM pairs").fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []
    for pair, root, st_dev, mounts, target in rows:
        try:
            ok_mounts = mounts is None or all(isinstance(m, str) for m in json.loads(mounts))
        except (TypeError, ValueError):
            ok_mounts = False
        if (isinstance(pair, str) and isinstance(root, str) and ok_mounts
                and (st_dev is None or isinstance(st_dev, int))
                and (target is None or isinstance(target, str))):
            out.append((pair, root, st_dev, mounts, target))
    return out


def _read_only(path: Path) -> sqlite3.Connection:
    """A connection that changes nothing: no checkpoint, and no WAL removed on close (the
    WAL of a damaged index is kept with it)."""
    return sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True,
                           isolation_level=None, timeout=30.0)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stamp_order(stamp: str) -> tuple[str, int]:
    """A trash stamp as (second, n): '…Z' is n 1, '…Z-3' n 3. Seconds in this format sort
    as text."""
    second, sep, n = stamp.rpartition("Z-")
    if sep and n.isdigit():
        return second + "Z", int(n)
    return stamp, 1


def _chunks(ids: list[int], n: int = 500) -> Iterator[list[int]]:
    """Slices short enough for SQLite's bound-parameter limit."""
    for i in range(0, len(ids), n):
        yield ids[i:i + n]


class _Detached:
    def __init__(self, index: Index):
        self.index = index

    def __enter__(self) -> None:
        self.index.db.close()

    def __exit__(self, *_: object) -> None:
        self.index.db = self.index._connect()


class _Tx:
    """BEGIN IMMEDIATE … COMMIT, ROLLBACK on error; nested use joins the outer one."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        self.outer = False

    def __enter__(self) -> sqlite3.Connection:
        self.outer = not self.db.in_transaction
        if self.outer:
            self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if not self.outer:
            return
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
                return
            except sqlite3.Error:
                self._rollback()   # a COMMIT that failed (disk full) may leave it open
                raise
        self._rollback()

    def _rollback(self) -> None:
        # SQLite rolls back by itself on some errors (SQLITE_FULL, IOERR): a ROLLBACK then
        # would fail too and hide the error that matters.
        if self.db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")


def _split_sql(script: str) -> list[str]:
    """Statements of a migration; ours contain no ';' inside literals."""
    out = []
    for stmt in script.split(";"):
        lines = [ln.split("--", 1)[0] for ln in stmt.splitlines()]
        s = "\n".join(lines).strip()
        if s:
            out.append(s)
    return out

"""Value types shared by every stage: entry kinds, local/remote/base states, actions, jobs."""

from __future__ import annotations

import os
from enum import IntEnum, StrEnum
from typing import NamedTuple

# Names syncd reserves inside a pair's remote path; never synced, never listed as entries.
TRASH_DIR = ".syncd-trash"
# A file system's top-level folder of what fsck recovered: never a pair's (scan.BUILTIN_IGNORE),
# and root's (mode 0700) on a remote pair rooted at a mount point: not listed there either.
LOST_FOUND = "lost+found"
TMP_PREFIX = ".syncd-tmp-"


def stat_sig(size: int, mtime_ns: int, inode: int, mode: int | None) -> int:
    """One integer standing for (size, mtime_ns, inode, permission bits), so the index can
    hand the scanner one value per clean file instead of a row. Python's tuple hash of ints
    is deterministic (no hash randomisation for ints); if a future Python changes it, every
    file merely looks changed once and is re-hashed. The mode is in it so that a chmod
    alone (which leaves mtime alone) is noticed."""
    return hash((size, mtime_ns, inode, mode))


class Kind(IntEnum):
    FILE = 1
    DIR = 2


class LocalState(NamedTuple):
    """What the scanner saw. `hash` is xxh3-128 of the content (None for directories)."""

    kind: int
    size: int
    mtime_ns: int
    inode: int
    mode: int
    hash: bytes | None


class RemoteEntry(NamedTuple):
    """One entry a remote listed. `fp` is the backend's version fingerprint (size+mtime,
    ETag, ...): equal fingerprints mean the object has not changed."""

    path: str
    kind: int
    size: int
    mtime_ns: int
    fp: str


class Base(NamedTuple):
    """What was true on both sides after the last confirmed transfer of an entry."""

    kind: int
    size: int
    mtime_ns: int
    hash: bytes | None
    remote_fp: str
    mode: int | None = None   # permission bits sent (None: not known, e.g. adopted)


class Op(StrEnum):
    UPLOAD = "upload"
    MKDIR = "mkdir"
    ADOPT = "adopt"            # remote already equal (size+mtime): record base, move no bytes
    DELETE = "delete_remote"   # delete = "propagate"
    TRASH = "trash_remote"     # delete = "trash": move into .syncd-trash/<stamp>/
    RMDIR = "rmdir_remote"     # remove an emptied remote directory
    FORGET = "forget"          # drop a base whose entry is gone on both sides
    CLEANUP = "cleanup_tmp"    # remove a stale temp file of ours
    CONFLICT = "conflict"      # cannot be resolved automatically; reported as a failure
    ATTRS = "attrs"            # mode or mtime changed, content did not: set them alone


# Ops that remove something from the remote and count against max_delete.
DELETING_OPS = frozenset({Op.DELETE, Op.TRASH})


class When(IntEnum):
    """Why a job runs before its op's usual phase: a typed part of the plan, stored with
    the job. Execution order is never read from an action's reason, which is for people."""

    USUAL = 0
    BEFORE_WRITES = 1   # a remote name equal to a local path but for case or Unicode form
    OWN_TEMP = 2        # a temp of this state dir's interrupted upload (never resumed)


class Action(NamedTuple):
    op: Op
    path: str
    reason: str = ""
    size: int = 0
    hash: bytes | None = None     # content the plan expects to send (uploads)
    mtime_ns: int = 0
    dest: str = ""                # trash destination, relative to the pair's remote path
    remote_fp: str = ""           # adopt: the remote fingerprint to record
    kind: int = Kind.FILE
    # The kind of remote entry at `path` that this write replaces (a file where a
    # directory goes, or the reverse); 0: none. It is removed first (trashed to `dest`, or
    # deleted), as a delete would be.
    replaces: int = 0
    when: int = When.USUAL
    drift: bool = False           # an upload because the remote no longer holds the base


class Job(NamedTuple):
    id: int
    pair: str
    path: str
    action: Action
    attempts: int
    not_before: float
    last_error: str | None


PHASE_REPLACE_FILE = -1
PHASE_REPLACE_DIR = 1003
# Removing a remote name that equals a local path but for case or Unicode form ('Foo.txt'
# where the local tree now has 'foo.txt'): on a case-insensitive remote (an SMB/CIFS NAS,
# macOS, Windows) writing 'foo.txt' lands on that very entry, and removing 'Foo.txt'
# after the writes would take the new copy with it. Such removals run before the writes:
# files first, then emptied directories deepest first.
BEFORE_WRITES = "same name as a local path but for case or Unicode form: removed first"
PHASE_CASE_REMOVE = -3000
PHASE_CASE_RMDIR = -2000
# Temps of this state dir's own interrupted uploads, on a remote whose uploads never go on
# from one (names unique per attempt: none can be one this run writes): removed before the
# writes, whatever else fails, since on a full remote disk they hold the space the retried
# upload needs. Where uploads resume from their temp (FTP), they go after the uploads, as
# other deletes: a resumed upload renames its temp away, a failed one keeps it to go on.
OWN_TEMP = "temp file of an interrupted upload"
OWN_TEMP_RESUMABLE = OWN_TEMP + ", kept for its resume until the uploads ran"
PHASE_OWN_TEMPS = -2


def phase(a: Action) -> int:
    """Execution order between jobs of one pair: directories that replace remote files
    (before anything is written under them), writes, then deletes (only after every write
    succeeded), then directory removals deepest first, then files that replace remote
    directories (once those are emptied). Phase >= 1 is the deleting part of a plan.
    Before all of them: removals of names that differ from a local path only by case or
    Unicode form (see BEFORE_WRITES)."""
    if a.replaces:
        return PHASE_REPLACE_FILE if a.op == Op.MKDIR else PHASE_REPLACE_DIR
    if a.op is Op.UPLOAD:   # most jobs: skip the comparisons below (runs once per job per step)
        return 0
    if a.when == When.BEFORE_WRITES:
        return PHASE_CASE_RMDIR - a.path.count("/") if a.op == Op.RMDIR else PHASE_CASE_REMOVE
    if a.when == When.OWN_TEMP:
        return PHASE_OWN_TEMPS
    if a.op in (Op.DELETE, Op.TRASH, Op.CLEANUP):
        return 1   # another's stale temp: after the uploads, like any delete
    if a.op == Op.RMDIR:
        return 2 + max(0, 1000 - a.path.count("/"))
    return 0


def utf8_ok(name: str) -> bool:
    """Whether a name (surrogate-escaped where its bytes are not UTF-8) is valid UTF-8:
    what syncd can sync and its index can store."""
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def printable(name: str) -> str:
    """A surrogate-escaped name shown with its raw bytes as \\xNN."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")

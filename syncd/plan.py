"""The planner: a pure function from (local, base, remote) views to actions, and the safety
guard that stands between a plan and the queue. No I/O, no clock: `now` is passed in."""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass

from syncd.model import (
    BEFORE_WRITES,
    DELETING_OPS,
    OWN_TEMP,
    OWN_TEMP_RESUMABLE,
    TMP_PREFIX,
    TRASH_DIR,
    Action,
    Base,
    Kind,
    LocalState,
    Op,
    When,
    phase,
)
from syncd.model import RemoteEntry as R

FILE, DIR = int(Kind.FILE), int(Kind.DIR)
STALE_TMP_NS = 15 * 60 * 1_000_000_000


@dataclass(frozen=True, slots=True)
class Policy:
    delete: str = "trash"           # trash | propagate | keep
    trash_stamp: str = "0000-00-00T000000Z"
    dirs: bool = True               # the remote has real directories
    mtime_precision_ns: int = 1     # 0: the remote does not keep mtimes (never adopt)
    now_ns: int = 0
    # Temp names of this state dir start with TMP_PREFIX + tmp_owner + "-". The state
    # dir's lock means none of them is being written while we plan: they are removed at
    # once. Anyone else's (another syncd writing the same remote) only once stale.
    tmp_owner: str = ""
    modes: bool = False             # the remote keeps permission bits: a chmod is synced
    mtimes: bool = False            # the remote's mtimes can be set alone: so is a touch
    resumes_temps: bool = False     # uploads go on from their own temps (see OWN_TEMP)
    case_sensitive: bool = False    # the remote never folds case (S3): no BEFORE_WRITES


# Adopting a remote file by size and mtime needs mtimes fine enough to tell two versions
# apart: at whole seconds (SFTP, FTP), a file rewritten with the same size within the
# second it was sent in looks equal to the old copy, and adopting it would keep the old
# bytes for good. Coarser than this, an unrecorded remote file is sent again.
ADOPT_MAX_PRECISION_NS = 1_000


def same_mtime(a: int, b: int, precision_ns: int) -> bool:
    if precision_ns <= 1:
        return a == b
    return a // precision_ns == b // precision_ns


def plan_push(local: Mapping[str, LocalState], base: Mapping[str, Base],
              remote: Mapping[str, R], policy: Policy) -> list[Action]:
    """Actions that make the remote equal the local tree, in execution order."""
    out: list[Action] = []
    rget, bget = remote.get, base.get
    for path, l in local.items():
        r = rget(path)
        b = bget(path)
        if l.kind == FILE:
            if (r is not None and b is not None and l.hash is not None and l.hash == b.hash
                    and r.fp == b.remote_fp and r.kind == FILE and b.kind == FILE
                    and (b.mode is None or b.mode == l.mode or not policy.modes)
                    and (b.mtime_ns == l.mtime_ns or not policy.mtimes)):
                continue   # the common case: nothing changed anywhere
            out.extend(_file(path, l, b, r, policy))
        elif policy.dirs:
            out.extend(_dir(path, b, r, policy))
        elif r is not None and r.kind == FILE:
            # No directories on this remote (S3): the file where the local tree now has a
            # folder would stay beside the folder's keys for good. Removed as a file
            # deleted locally is (after the uploads; keys do not collide).
            out.extend(_remove_file(path, r, b, policy, "a local directory replaces it"))
    for path in base:
        if path not in local and path not in remote:
            out.append(Action(Op.FORGET, path, "gone on both sides"))
    rmdirs: list[Action] = []
    for path, r in remote.items():
        if path in local:
            continue
        if r.kind == FILE and path.rpartition("/")[2].startswith(TMP_PREFIX):
            name = path.rpartition("/")[2]
            if policy.tmp_owner and name.startswith(f"{TMP_PREFIX}{policy.tmp_owner}-"):
                out.append(Action(Op.CLEANUP, path, OWN_TEMP_RESUMABLE) if policy.resumes_temps
                           else Action(Op.CLEANUP, path, OWN_TEMP, when=When.OWN_TEMP))
            elif 0 < r.mtime_ns < policy.now_ns - STALE_TMP_NS:   # 0: the remote gives no time
                out.append(Action(Op.CLEANUP, path, "stale temp file of syncd"))
            continue
        b = bget(path)
        why = "deleted locally" if b is not None else "not in the local tree"
        if r.kind != DIR:
            out.extend(_remove_file(path, r, b, policy, why))
        elif policy.delete == "keep":
            if b is not None:
                out.append(Action(Op.FORGET, path, "deleted locally; delete = keep"))
        elif policy.dirs:
            rmdirs.append(Action(Op.RMDIR, path, why))
    rmdirs.sort(key=lambda a: a.path.count("/"), reverse=True)  # children before parents
    out.extend(rmdirs)
    if not policy.case_sensitive and any(a.op in _REMOVING for a in out):
        out = _fold_collisions_first(out, local)
    out.sort(key=phase)   # stable; the queue runs a pair's jobs phase by phase in this order
    blocked = {a.path for a in out if a.op == Op.CONFLICT and local[a.path].kind == DIR}
    if blocked:   # nothing can be written under a remote file that must stay
        out = [a for a in out if a.op not in (Op.UPLOAD, Op.MKDIR) or not under(a.path, blocked)]
    return out


_REMOVING = frozenset({Op.DELETE, Op.TRASH, Op.RMDIR})


def fold(path: str) -> str:
    """A path as a case-insensitive, normalising file system compares it."""
    return unicodedata.normalize("NFC", path).casefold()


def _fold_collisions_first(out: list[Action], local: Mapping[str, LocalState]) -> list[Action]:
    """Mark removals of remote names that a local path equals but for case or Unicode form
    to run before the writes (BEFORE_WRITES). On a case-sensitive remote that order is as
    right as any; on a case-insensitive one it is the only order that keeps the file."""
    folded = {fold(p) for p in local}
    return [a._replace(reason=BEFORE_WRITES, when=When.BEFORE_WRITES)
            if a.op in _REMOVING and a.path not in local and fold(a.path) in folded else a
            for a in out]


def under(path: str, dirs: set[str]) -> bool:
    parent = path.rpartition("/")[0]
    while parent:
        if parent in dirs:
            return True
        parent = parent.rpartition("/")[0]
    return False


def _file(path: str, l: LocalState, b: Base | None, r: R | None, p: Policy) -> list[Action]:
    if r is None:   # the common case of a first sync: built directly, not via _replace
        if b is None:
            return [Action(Op.UPLOAD, path, "new", l.size, l.hash, l.mtime_ns)]
        return [Action(Op.UPLOAD, path, "missing on remote", l.size, l.hash, l.mtime_ns,
                       drift=True)]
    up = Action(Op.UPLOAD, path, "", l.size, l.hash, l.mtime_ns)
    if r.kind != FILE:
        if p.delete == "keep":
            return [Action(Op.CONFLICT, path, "the remote has a directory where the local tree "
                           "has a file, and delete = keep forbids removing it; remove or rename "
                           "one of them, or set delete = \"trash\" for this pair")]
        # Its content is planned for deletion (not in the local tree); once emptied, the
        # directory makes way for the file.
        return [up._replace(reason="replaces a remote directory", replaces=DIR)]
    if b is not None and b.kind == FILE:
        if r.fp != b.remote_fp:
            return [up._replace(reason="remote drift", drift=True)]
        if l.hash is None or l.hash != b.hash:
            return [up._replace(reason="changed")]
        # Same content, as the remote holds it: only the attributes that changed go over.
        changed = []
        if p.modes and b.mode is not None and b.mode != l.mode:
            changed.append("mode")
        if p.mtimes and not same_mtime(b.mtime_ns, l.mtime_ns, p.mtime_precision_ns):
            changed.append("mtime")   # (finer than the remote keeps: the engine settles it)
        if changed:
            return [Action(Op.ATTRS, path, " and ".join(changed) + " changed", l.size,
                           l.hash, l.mtime_ns, remote_fp=r.fp)]
        return []
    # Never synced by us (or the index was lost, or a crash came between an upload and
    # its record): adopt an equal-looking remote file instead of re-sending it, as rsync
    # and rclone do by size and mtime, where the remote's mtimes can tell versions apart.
    if (l.hash is not None and p.mtime_precision_ns > 0 and r.size == l.size
            and same_mtime(r.mtime_ns, l.mtime_ns, p.mtime_precision_ns)):
        if p.mtime_precision_ns <= ADOPT_MAX_PRECISION_NS:
            return [Action(Op.ADOPT, path, "remote already equal (size, mtime)", l.size,
                           l.hash, l.mtime_ns, remote_fp=r.fp)]
        return [up._replace(reason="not recorded; the remote's whole-second mtime cannot "
                                   "tell it from another version of the same size")]
    return [up._replace(reason="differs from remote")]


def attrs_to_settle(local: Mapping[str, LocalState], base: Mapping[str, Base],
                    p: Policy) -> tuple[list[str], list[tuple[str, int]]]:
    """Files whose change is one _file plans no job for: a mode where the remote keeps
    none, an mtime where it sets none alone or that differs only finer than it keeps.
    Their bases take it instead (paths whose recorded mode is forgotten; (path, mtime_ns)
    to record), so they are clean again and not planned at every scan."""
    modes: list[str] = []
    mtimes: list[tuple[str, int]] = []
    for path, l in local.items():
        b = base.get(path)
        if l.kind != FILE or b is None or b.hash != l.hash:
            continue
        if not p.modes and b.mode is not None and b.mode != l.mode:
            modes.append(path)
        if b.mtime_ns != l.mtime_ns and (
                not p.mtimes or same_mtime(b.mtime_ns, l.mtime_ns, p.mtime_precision_ns)):
            mtimes.append((path, l.mtime_ns))
    return modes, mtimes


def _remove_file(path: str, r: R, b: Base | None, p: Policy, why: str) -> list[Action]:
    """A remote file the local tree no longer has there, per the delete policy."""
    if p.delete == "keep":
        return [Action(Op.FORGET, path, f"{why}; delete = keep")] if b is not None else []
    if p.delete == "propagate":
        return [Action(Op.DELETE, path, why, r.size)]
    return [Action(Op.TRASH, path, why, r.size, dest=f"{TRASH_DIR}/{p.trash_stamp}/{path}")]


def _dir(path: str, b: Base | None, r: R | None, p: Policy) -> list[Action]:
    if r is None:
        return [Action(Op.MKDIR, path, "new")]
    if r.kind != DIR:
        if p.delete == "keep":
            return [Action(Op.CONFLICT, path, "the remote has a file where the local tree has a "
                           "directory, and delete = keep forbids removing it; remove or rename "
                           "one of them, or set delete = \"trash\" for this pair")]
        dest = f"{TRASH_DIR}/{p.trash_stamp}/{path}" if p.delete == "trash" else ""
        return [Action(Op.MKDIR, path, "replaces a remote file", r.size, dest=dest,
                       replaces=FILE)]
    if b is None or b.kind != DIR:
        return [Action(Op.ADOPT, path, "directory exists on remote", remote_fp=r.fp, kind=DIR)]
    return []


# --- safety -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Facts:
    """What the engine saw, for the safety guard."""

    root_exists: bool
    local_entries: int
    base_entries: int
    remote_files: int
    root_dev: int | None
    recorded_dev: int | None
    max_delete: int
    max_delete_setting: str
    remote_entries: int = -1            # what the remote listing held; -1: not listed
    lost_mounts: tuple[str, ...] = ()   # mount points inside the root, no longer mounted
    bases_present: int = 0              # synced entries missing remotely, still here locally
    remote_dir_missing: bool = False    # a run without listing found the pair's directory gone
    remote_mountable: bool = True       # storage that can be unmounted (a directory tree)


@dataclass(frozen=True, slots=True)
class Trip:
    reason: str
    override: str


def check_safety(actions: list[Action], f: Facts, allow_mass_delete: bool = False,
                 allow_device_change: bool = False) -> Trip | None:
    if not f.root_exists:
        return Trip("the local root does not exist (unmounted disk? wrong path?)",
                    "mount the disk or fix the [[sync]] local path")
    if f.recorded_dev is not None and f.root_dev != f.recorded_dev and not allow_device_change:
        return Trip(f"the local root is now on a different device (st_dev {f.root_dev}, "
                    f"recorded {f.recorded_dev}): an unmounted disk shows its empty mount point",
                    "--allow-device-change")
    if not allow_device_change:
        if f.remote_entries == 0 and f.bases_present > 0:
            return Trip(f"the remote path is empty but {f.bases_present} entries synced there "
                        "before are still in the local tree (an unmounted disk or share shows "
                        "its empty mount point): check that the remote's storage is mounted",
                        "--allow-device-change")
        if (f.remote_mountable and f.remote_entries > 0
                and 2 * f.bases_present > f.base_entries
                and f.remote_entries < f.bases_present):
            # Most of what was synced is gone and the remote holds less than that: an
            # unmounted share plus the few files written onto its bare mount point since
            # (a daemon's event-driven runs do not list the remote), which would otherwise
            # disarm the empty-remote check above and have the whole tree sent there.
            return Trip(f"{f.bases_present} of the {f.base_entries} entries synced to the "
                        f"remote path before are missing there (still in the local tree), "
                        f"and it holds only {f.remote_entries}: an unmounted disk or share "
                        "shows its bare mount point (plus what was written there since). "
                        "Check that the remote's storage is mounted; if most of the remote "
                        "was deleted and should be sent again, run once with the override",
                        "--allow-device-change")
        if f.remote_dir_missing:
            return Trip("the pair's remote directory is gone though entries were synced "
                        "there (an unmounted disk or share shows its bare mount point): "
                        "check that the remote's storage is mounted", "--allow-device-change")
        for m in f.lost_mounts:
            if any(a.path == m or a.path.startswith(m + "/") for a in actions
                   if a.op in DELETING_OPS or a.op == Op.RMDIR):
                return Trip(f"'{m}' inside the local root was a mount point (another file "
                            "system) and is not mounted now: an unmounted disk shows its "
                            "empty mount point, and the plan would delete what was on it: "
                            "mount it again",
                            "--allow-device-change")
    if allow_mass_delete:
        return None
    if f.local_entries == 0 and f.base_entries > 0:
        return Trip(f"the local root is empty but {f.base_entries} entries were synced before",
                    "--allow-mass-delete")
    deletes = sum(1 for a in actions if a.op in DELETING_OPS or a.replaces == FILE)
    if deletes > f.max_delete:
        return Trip(f"the plan deletes {deletes} of {f.remote_files} remote files, more than "
                    f"max_delete = {f.max_delete_setting} allows ({f.max_delete})",
                    "--allow-mass-delete (or raise max_delete)")
    return None

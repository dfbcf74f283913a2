"""`syncd reconcile` end to end, as a user runs it: a subprocess, real trees, exit codes."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import (
    KIND_BEFORE,
    SYNCD,
    Setup,
    kind_change_run,
    make_setup,
    run_syncd,
    tmpfs_at,
    tree,
    unmount,
)

FILES = {
    "a.txt": b"alpha\n",
    "empty": b"",
    "dir/b.bin": bytes(range(256)) * 4000,
    "dir/sub/c.txt": b"gamma\n",
    "été/naïve ☃.txt": "unicode ✓".encode(),
    "with space/d e.txt": b"spaces\n",
    "big.bin": os.urandom(3 * 1024 * 1024 + 5),
}


def populate(s: Setup, files: dict[str, bytes] = FILES) -> None:
    for rel, data in files.items():
        s.write(rel, data)
    s.write("ignored.tmp", b"never synced")
    s.write(".git/HEAD", b"never synced")


def test_first_reconcile_mirrors_exactly_then_idle(setup: Setup) -> None:
    populate(setup)
    r = setup.reconcile()
    assert r.code == 0, r.err
    assert r.summary["uploaded"] == len(FILES) and r.summary["failed"] == []
    assert tree(setup.mirror) == FILES
    for rel in FILES:   # mtimes and permission bits are kept
        a, b = (setup.src / rel).stat(), (setup.mirror / rel).stat()
        assert a.st_mtime_ns == b.st_mtime_ns and a.st_mode == b.st_mode
    assert not (setup.mirror / "ignored.tmp").exists() and not (setup.mirror / ".git").exists()
    assert not list(setup.mirror.rglob(".syncd-tmp-*"))
    r2 = setup.reconcile()
    assert r2.code == 0 and r2.summary["uploaded"] == 0 and r2.summary["trashed"] == 0
    assert r2.summary["adopted"] == 0


def test_exactly_the_changes_are_applied(setup: Setup) -> None:
    populate(setup)
    assert setup.reconcile().code == 0
    setup.write("a.txt", b"alpha v2\n")
    setup.write("dir/sub/c.txt", b"gamma v2\n")
    setup.write("empty", b"not empty any more")
    (setup.src / "dir" / "b.bin").unlink()
    (setup.src / "with space" / "d e.txt").unlink()
    setup.write("new/file.txt", b"new")
    plan = setup.reconcile("--dry-run")
    assert plan.code == 0
    got = sorted((a["op"], a["path"]) for a in plan.summary["plan"])
    assert got == sorted([("upload", "a.txt"), ("upload", "dir/sub/c.txt"), ("upload", "empty"),
                          ("trash_remote", "dir/b.bin"), ("trash_remote", "with space/d e.txt"),
                          ("mkdir", "new"), ("upload", "new/file.txt")])
    assert (setup.mirror / "dir" / "b.bin").exists()       # dry run changed nothing
    r = setup.reconcile()
    assert r.code == 0, r.err
    assert r.summary["uploaded"] == 4 and r.summary["trashed"] == 2
    assert tree(setup.mirror) == {
        k: v for k, v in tree(setup.src).items() if k not in ("ignored.tmp", ".git/HEAD")}
    assert (setup.mirror / "with space").is_dir()       # still a (now empty) dir locally
    (setup.src / "with space").rmdir()
    r = setup.reconcile()
    assert r.code == 0 and not (setup.mirror / "with space").exists()


def test_trash_keeps_deleted_content(setup: Setup) -> None:
    populate(setup)
    assert setup.reconcile().code == 0
    (setup.src / "dir" / "sub" / "c.txt").unlink()
    r = setup.reconcile()
    assert r.code == 0 and r.summary["trashed"] == 1
    (stamp,) = list((setup.mirror / ".syncd-trash").iterdir())
    assert (stamp / "dir" / "sub" / "c.txt").read_bytes() == FILES["dir/sub/c.txt"]
    assert not (setup.mirror / "dir" / "sub" / "c.txt").exists()
    # The trash is never listed as remote content: the next run is idle.
    assert setup.reconcile().summary["trashed"] == 0


def test_propagate_deletes(tmp_path: Path) -> None:
    s = make_setup(tmp_path, delete="propagate")
    populate(s)
    assert s.reconcile().code == 0
    (s.src / "a.txt").unlink()
    r = s.reconcile()
    assert r.code == 0 and r.summary["deleted"] == 1
    assert not (s.mirror / "a.txt").exists() and not (s.mirror / ".syncd-trash").exists()


def test_max_delete_trips_exit_4_and_deletes_nothing(setup: Setup) -> None:
    populate(setup)
    assert setup.reconcile().code == 0
    before = tree(setup.mirror)
    for rel in ["a.txt", "dir/b.bin", "dir/sub/c.txt", "empty", "big.bin"]:
        (setup.src / rel).unlink()
    r = setup.reconcile()
    assert r.code == 4
    assert "max_delete" in r.summary["message"] and "--allow-mass-delete" in r.summary["message"]
    assert tree(setup.mirror) == before
    r = setup.reconcile("--allow-mass-delete")
    assert r.code == 0 and r.summary["trashed"] == 5


def test_empty_local_root_trips(setup: Setup) -> None:
    populate(setup)
    assert setup.reconcile().code == 0
    for p in sorted(setup.src.iterdir()):
        os.system(f"rm -rf '{p}'")
    r = setup.reconcile()
    assert r.code == 4 and "empty" in r.summary["message"]
    assert tree(setup.mirror) == FILES


def test_status_after_a_first_reconcile_stopped_by_a_guard(setup: Setup) -> None:
    # The pair's row is made before the guards run: status says "stopped", not "never".
    setup.src.rmdir()
    assert setup.reconcile().code == 4
    st = run_syncd("status", "--config", str(setup.config))
    assert "last reconcile never" not in st.out and "stopped by guard" in st.out, st.out


def test_unmounted_remote_disk_trips_and_writes_nothing_under_it(setup: Setup) -> None:
    # A local remote on a NAS or USB disk that is not mounted: its empty mount point is
    # still a directory. Re-uploading everything there would fill the system disk, and
    # hide the files under the mount once the disk is back.
    (setup.dst).rmdir()
    with tmpfs_at(setup.dst):
        populate(setup)
        assert setup.reconcile().code == 0
        unmount(setup.dst)
        r = setup.reconcile()
        assert r.code == 4 and "remote path is empty" in r.summary["message"], r.out
        assert "--allow-device-change" in r.summary["message"]
        assert list(setup.dst.iterdir()) == []
        r = setup.reconcile("--allow-device-change")   # intended: a new empty disk
        assert r.code == 0 and tree(setup.mirror) == FILES


def test_unmounted_disk_inside_the_local_root_keeps_its_files_on_the_remote(setup: Setup) -> None:
    populate(setup)
    with tmpfs_at(setup.src / "photos"):
        for i in range(3):
            setup.write(f"photos/p{i}.jpg", b"photo %d" % i)
        assert setup.reconcile().code == 0
        assert (setup.mirror / "photos" / "p2.jpg").exists()
        unmount(setup.src / "photos")   # its empty mount point is left: "all deleted"
        r = setup.reconcile()
        assert r.code == 4 and "'photos' inside the local root was a mount point" in \
            r.summary["message"], r.out
        assert sorted(p.name for p in (setup.mirror / "photos").iterdir()) == [
            "p0.jpg", "p1.jpg", "p2.jpg"]
        assert setup.reconcile("--allow-device-change").code == 0   # intended: gone
        assert not (setup.mirror / "photos" / "p0.jpg").exists()
        assert setup.reconcile().code == 0   # the new layout is the recorded one now


def test_missing_local_root_trips(setup: Setup) -> None:
    populate(setup)
    assert setup.reconcile().code == 0
    setup.src.rename(setup.root / "moved")
    r = setup.reconcile()
    assert r.code == 4 and "does not exist" in r.summary["message"]
    assert tree(setup.mirror) == FILES


def test_device_change_trips_and_override(setup: Setup) -> None:
    populate(setup)
    assert setup.reconcile().code == 0
    with sqlite3.connect(setup.state / "index.sqlite3") as db:
        db.execute("UPDATE pairs SET st_dev = st_dev + 1")
    r = setup.reconcile()
    assert r.code == 4 and "different device" in r.summary["message"]
    assert "--allow-device-change" in r.summary["message"]
    assert setup.reconcile("--allow-device-change").code == 0
    assert setup.reconcile().code == 0


def test_missing_remote_root_exit_3(setup: Setup) -> None:
    populate(setup)
    setup.dst.rmdir()
    r = setup.reconcile()
    assert r.code == 3
    assert "remote 'nas'" in r.summary["message"] and "does not exist" in r.summary["message"]
    assert not setup.dst.exists()      # a remote root is never created


def without_dac_override() -> tuple[str, ...]:
    """Root reads any file; run syncd as root minus the capabilities that allow that."""
    if os.geteuid() != 0:
        return ()
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and util-linux setpriv is missing: cannot make a file unreadable")
    caps = "-dac_override,-dac_read_search"
    return (setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}")


def test_unreadable_file_exit_1_named_others_synced(setup: Setup) -> None:
    populate(setup)
    setup.write("secret.txt", b"top secret")
    os.chmod(setup.src / "secret.txt", 0)
    r = setup.reconcile(prefix=without_dac_override())
    assert r.code == 1, r.err
    assert [f["path"] for f in r.summary["failed"]] == ["secret.txt"]
    assert "Permission denied" in r.summary["failed"][0]["error"]
    assert tree(setup.mirror) == FILES
    # Unreadable is not deleted: once readable again, it syncs.
    os.chmod(setup.src / "secret.txt", 0o644)
    r = setup.reconcile()
    assert r.code == 0 and r.summary["uploaded"] == 1


def test_unreadable_directory_blocks_deletes_loses_nothing(setup: Setup) -> None:
    populate(setup)
    assert setup.reconcile().code == 0
    os.chmod(setup.src / "dir" / "sub", 0)
    (setup.src / "a.txt").unlink()          # a delete that must wait for a clean scan
    try:
        r = setup.reconcile(prefix=without_dac_override())
    finally:
        os.chmod(setup.src / "dir" / "sub", 0o755)
    assert r.code == 1
    assert [f["path"] for f in r.summary["failed"]] == ["dir/sub"]
    assert (setup.mirror / "dir" / "sub" / "c.txt").exists() and (setup.mirror / "a.txt").exists()
    r = setup.reconcile()
    assert r.code == 0 and r.summary["trashed"] == 1 and (setup.mirror / "dir/sub/c.txt").exists()


def test_non_utf8_name_exit_1_named_others_synced(setup: Setup) -> None:
    populate(setup)
    with open(os.path.join(os.fsencode(setup.src), b"caf\xe9.txt"), "wb") as f:
        f.write(b"latin-1 name")
    r = setup.reconcile()
    assert r.code == 1
    assert r.summary["failed"][0]["path"] == "caf\\xe9.txt"
    assert "UTF-8" in r.summary["failed"][0]["error"]
    assert tree(setup.mirror) == FILES


@pytest.mark.parametrize("edit, key", [
    (('remote = "nas"', 'remote = "nsa"'), "sync[0].remote"),
    (('max_delete = "50%"', 'max_delete = "half"'), "sync[0].max_delete"),
    (('retry_initial = "10ms"', 'retry_initial = "soon"'), "daemon.retry_initial"),
    (('delete = "trash"', 'delete = "shred"'), "sync[0].delete"),
    (('type = "local"', 'typ = "local"'), "remotes.nas.typ"),
])
def test_bad_config_exit_2_names_key(setup: Setup, edit: tuple[str, str], key: str) -> None:
    text = setup.config.read_text()
    assert edit[0] in text
    setup.config.write_text(text.replace(*edit))
    r = setup.reconcile()
    assert r.code == 2
    assert key in r.err and str(setup.config) in r.err
    assert "Traceback" not in r.err
    r = run_syncd("config", "check", "--config", str(setup.config))
    assert r.code == 2 and key in r.err


def test_missing_config_file_exit_2(tmp_path: Path) -> None:
    r = run_syncd("reconcile", "--config", str(tmp_path / "nope.toml"))
    assert r.code == 2 and "nope.toml" in r.err and "does not exist" in r.err


def test_unknown_pair_exit_2(setup: Setup) -> None:
    r = setup.reconcile("nosuchpair")
    assert r.code == 2 and "unknown pair 'nosuchpair'; known: docs" in r.err


def test_config_check_prints_resolved(setup: Setup) -> None:
    r = run_syncd("config", "check", "--config", str(setup.config))
    assert r.code == 0 and "config OK" in r.out and str(setup.src) in r.out


def test_logs_are_json_events_with_fields(setup: Setup) -> None:
    populate(setup)
    r = setup.reconcile("--log-level", "debug")
    ev = r.events()
    up = [e for e in ev if e["event"] == "upload_done"]
    assert len(up) == len(FILES)
    for e in up:
        assert e["pair"] == "docs" and e["op"] == "upload" and "path" in e
        assert isinstance(e["bytes"], int) and isinstance(e["duration_ms"], int) and e["attempt"] == 1
    (done,) = [e for e in ev if e["event"] == "reconcile_done"]
    assert done["uploaded"] == len(FILES) and done["status"] == "ok"
    # At the default level a reconcile logs its summary, not one line per file.
    setup.write("a.txt", b"changed")
    ev = setup.reconcile().events()
    assert [e["event"] for e in ev] == ["reconcile_done"] and ev[0]["pair"] == "docs"


def test_second_instance_is_refused_while_one_holds_the_lock(setup: Setup) -> None:
    import fcntl

    setup.state.mkdir()
    with open(setup.state / "syncd.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("424242\n")
        f.flush()
        r = setup.reconcile()
    assert r.code == 2 and "424242" in r.err


def test_demo_runs_twice_without_harm(tmp_path: Path) -> None:
    r1 = run_syncd("demo", "--dir", str(tmp_path / "demo"))
    assert r1.code == 0, r1.err
    assert "uploaded 4 files" in r1.out
    (tmp_path / "demo" / "source" / "README.txt").write_text("edited\n")
    r2 = run_syncd("demo", "--dir", str(tmp_path / "demo"))
    assert r2.code == 0 and "uploaded 1 files" in r2.out
    assert (tmp_path / "demo" / "nas" / "docs" / "README.txt").read_text() == "edited\n"
    assert not (tmp_path / "demo" / "nas" / "docs" / "scratch.tmp").exists()


def test_remote_changes_behind_our_back_are_repaired(setup: Setup) -> None:
    populate(setup)
    assert setup.reconcile().code == 0
    (setup.mirror / "a.txt").write_bytes(b"edited on the NAS, longer")      # drift
    (setup.mirror / "dir" / "sub" / "c.txt").unlink()                        # vanished
    (setup.mirror / "stray.txt").write_bytes(b"not ours")                    # extra
    os.utime(setup.mirror / "big.bin", ns=(1, 1))                            # touched
    r = setup.reconcile()
    assert r.code == 0, r.err
    assert r.summary["uploaded"] == 3 and r.summary["trashed"] == 1
    drift = sorted(e["path"] for e in r.events() if e["event"] == "remote_drift")
    assert drift == ["a.txt", "big.bin", "dir/sub/c.txt"]
    assert tree(setup.mirror) == FILES
    assert setup.reconcile().summary["uploaded"] == 0


def test_touched_but_identical_local_file_is_rehashed_not_resent(setup: Setup) -> None:
    """Only the new mtime goes to the remote (as `rclone sync` and `rsync -a` do)."""
    populate(setup)
    assert setup.reconcile().code == 0
    os.utime(setup.src / "big.bin", ns=(10**18, 10**18))
    r = setup.reconcile()
    assert r.code == 0 and (r.summary["uploaded"], r.summary["attrs_set"]) == (0, 1)
    assert (setup.mirror / "big.bin").stat().st_mtime_ns == 10**18


def test_many_files_go_through_worker_processes(setup: Setup) -> None:
    from syncd.engine import PROCESS_POOL_MIN_JOBS

    files = {f"d{i % 7}/f{i}.bin": os.urandom(i % 3000) for i in range(PROCESS_POOL_MIN_JOBS + 50)}
    populate(setup, files)
    r = setup.reconcile()
    assert r.code == 0, r.err
    assert r.summary["uploaded"] == len(files) and tree(setup.mirror) == files
    setup.write("d1/f1.bin", b"changed")
    (setup.src / "d2" / "f2.bin").unlink()
    r = setup.reconcile()
    assert r.code == 0 and r.summary["uploaded"] == 1 and r.summary["trashed"] == 1


def test_killed_first_reconcile_publishes_only_whole_files_and_the_rerun_finishes(
        setup: Setup) -> None:
    """`kill -9` in the middle of a first sync through worker processes (files staged,
    flushed in groups, then renamed): what is under a final name is whole, the rerun
    completes the mirror and removes every temp file the killed run left."""
    import signal
    import subprocess
    import time

    files = {f"d{i % 13}/f{i}.bin": os.urandom(200 + i % 5000) for i in range(4000)}
    populate(setup, files)
    cmd = [sys.executable, "-m", "syncd", "reconcile", "--config", str(setup.config)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None:
            if setup.mirror.exists() and sum(1 for _ in setup.mirror.rglob("f*.bin")) >= 200:
                break
            time.sleep(0.005)
        os.killpg(p.pid, signal.SIGKILL)   # syncd, its fork server and its workers
    finally:
        p.wait(timeout=30)
    published = tree(setup.mirror)
    assert published, "the run was killed before anything was published"
    assert all(files[k] == v for k, v in published.items())   # whole files only
    assert p.returncode == -signal.SIGKILL and len(published) < len(files)
    r = setup.reconcile()
    assert r.code == 0, r.err
    assert tree(setup.mirror) == files
    assert not list(setup.mirror.rglob(".syncd-tmp-*"))


def test_unreadable_local_root_stops_the_pair_and_keeps_the_index(setup: Setup) -> None:
    populate(setup)
    assert setup.reconcile().code == 0
    os.chmod(setup.src, 0)
    try:
        r = setup.reconcile(prefix=without_dac_override())
    finally:
        os.chmod(setup.src, 0o755)
    assert r.code == 4 and "cannot be read" in r.summary["message"]
    assert tree(setup.mirror) == FILES
    r = setup.reconcile()
    assert r.code == 0 and r.summary["uploaded"] == 0 and r.summary["adopted"] == 0


@pytest.mark.parametrize("delete", ["trash", "propagate"])
def test_folder_replaced_by_a_file_and_file_replaced_by_a_folder(tmp_path: Path,
                                                                 delete: str) -> None:
    """Local kind changes converge in one run: the remote folder's content is removed
    (trashed or deleted) before the file takes its name, and a remote file makes way for
    the folder before anything is written under it."""
    s = make_setup(tmp_path, delete=delete, max_delete="100%")
    r = kind_change_run(s, keepers=1)
    assert r.code == 0, r.err
    assert r.summary["failed"] == []
    removed = r.summary["trashed" if delete == "trash" else "deleted"]
    assert removed == 4, r.summary          # a.txt, sub/b.txt, c.txt and the replaced file
    assert tree(s.mirror) == tree(s.src)
    assert (s.mirror / "was_dir").is_file() and (s.mirror / "was_file").is_dir()
    trash = s.mirror / ".syncd-trash"
    if delete == "trash":   # everything replaced is kept, under its old path
        kept = {p.relative_to(next(trash.iterdir())).as_posix(): p.read_bytes()
                for p in trash.rglob("*") if p.is_file()}
        assert kept == KIND_BEFORE
    else:
        assert not trash.exists()
    r2 = s.reconcile()
    assert r2.code == 0 and r2.summary["uploaded"] == 0 and r2.summary["failed"] == []


def test_kind_change_with_delete_keep_is_a_conflict_named_once(tmp_path: Path) -> None:
    s = make_setup(tmp_path, delete="keep")
    s.write("x", b"file")
    assert s.reconcile().code == 0
    (s.src / "x").unlink()
    for i in range(5):
        s.write(f"x/f{i}", b"under")
    r = s.reconcile()
    assert r.code == 1
    assert [f["path"] for f in r.summary["failed"]] == ["x"], r.summary["failed"]
    assert "delete = keep" in r.summary["failed"][0]["error"]
    assert (s.mirror / "x").read_bytes() == b"file"


def test_file_becoming_a_folder_waits_for_a_clean_scan(setup: Setup) -> None:
    """Replacing a remote file by a folder removes it before any upload, so, like every
    delete, not in a run whose scan had an error; the rest of the run goes on."""
    populate(setup)
    setup.write("x", b"remote keeps me")
    assert setup.reconcile().code == 0
    (setup.src / "x").unlink()
    setup.write("x/inner.txt", b"new")
    setup.write("a.txt", b"alpha v2\n")
    os.chmod(setup.src / "dir" / "sub", 0)
    try:
        r = setup.reconcile(prefix=without_dac_override())
    finally:
        os.chmod(setup.src / "dir" / "sub", 0o755)
    assert r.code == 1 and [f["path"] for f in r.summary["failed"]] == ["dir/sub"]
    assert (setup.mirror / "x").read_bytes() == b"remote keeps me"
    assert (setup.mirror / "a.txt").read_bytes() == b"alpha v2\n"   # the rest went on
    r = setup.reconcile()
    assert r.code == 0 and (setup.mirror / "x" / "inner.txt").read_bytes() == b"new"


def test_retry_never_signals_a_running_reconcile(setup: Setup) -> None:
    # `syncd retry` took whoever held the lock for the daemon and sent it SIGUSR1, which
    # killed a one-shot reconcile mid-transfer.
    from syncd.engine import StateLock

    with StateLock(setup.state, role="reconcile"):
        r = run_syncd("retry", "--config", str(setup.config))
        st = run_syncd("status", "--config", str(setup.config))
    assert r.code == 2 and "a syncd reconcile (PID" in r.err and "Traceback" not in r.err
    assert "daemon: not running" in st.out and "a reconcile is running" in st.out


def test_a_state_dir_that_cannot_be_made_is_a_usage_error(setup: Setup) -> None:
    blocker = setup.root / "a-file"
    blocker.write_text("x")
    cfg = setup.config.read_text().replace(str(setup.state), str(blocker / "state"))
    setup.config.write_text(cfg)
    r = setup.reconcile()
    assert r.code == 2 and "state dir" in r.err and "internal error" not in r.err


def test_output_into_a_closed_pipe_is_not_a_bug(setup: Setup) -> None:
    # More plan output than a pipe holds (64 KiB): syncd is still writing when head has
    # gone (with less, it could finish before head exits, and the run was rightly 0).
    for i in range(2000):
        setup.write(f"d/{'n' * 100}{i}.txt", b"x")
    cmd = f"{SYNCD} reconcile --config {setup.config} --dry-run | head -1; echo rc=${{PIPESTATUS[0]}}"
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert "rc=141" in p.stdout and "internal error" not in p.stderr, (p.stdout, p.stderr)


@pytest.mark.parametrize("args", [["version"], ["config", "check"], ["status"]])
@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_output_onto_a_full_disk_is_an_error_not_a_bug(setup: Setup, args: list[str],
                                                       unbuffered: str) -> None:
    """stdout on a full device (/dev/full): exit 120 with one line saying so, no
    traceback, whether the write fails in the command (unbuffered) or at the exit."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    conf = [] if args == ["version"] else ["--config", str(setup.config)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNCD_")}
    env["PYTHONUNBUFFERED"] = unbuffered
    with open("/dev/full", "w") as full:
        p = subprocess.run([str(SYNCD), *args, *conf], stdout=full, stderr=subprocess.PIPE,
                           text=True, timeout=120, env=env)
    assert p.returncode == 120, p.stderr
    assert p.stderr.strip() == "syncd: error: writing the output failed: No space left on device"


def test_daemon_intervals_that_would_spin_are_refused(setup: Setup) -> None:
    cfg = setup.config.read_text().replace("[daemon]\n", '[daemon]\nfull_reconcile_interval = "0s"\n')
    setup.config.write_text(cfg)
    r = setup.reconcile()
    assert r.code == 2 and "daemon.full_reconcile_interval" in r.err and "1m" in r.err


def test_a_relative_config_path_keeps_the_pairs_history(setup: Setup) -> None:
    # A local remote's relative path, read through a relative --config, is the same place:
    # it used to count as a new one (history dropped, everything compared afresh).
    populate(setup)
    setup.config.write_text(setup.config.read_text().replace(f'"{setup.dst}"', '"dst"'))
    assert setup.reconcile().code == 0
    r = run_syncd("reconcile", "--config", setup.config.name, "--json", cwd=setup.root)
    assert r.code == 0 and r.summary["uploaded"] == 0 and r.summary["adopted"] == 0
    assert not [e for e in r.events() if e.get("event") == "pair_target_changed"]


def test_the_command_line_collects_garbage_less_often(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import gc

    from syncd import cli

    old = gc.get_threshold()
    monkeypatch.setattr(sys, "argv", ["syncd", "version"])
    try:
        assert cli.run_cli() == 0   # main() is run_cli(), then os._exit: not in pytest
        assert gc.get_threshold() == cli.GC_THRESHOLDS != old
    finally:
        gc.set_threshold(*old)
    assert capsys.readouterr().out.startswith("syncd ")


def _session_members(sid: int) -> list[int]:
    """Processes of session `sid` (a syncd started in a session of its own, with the fork
    server and worker processes it made)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":   # fields[3]: session; [0]: state
            out.append(int(d))
    return out


def test_kill_9_of_syncd_leaves_no_worker_process_behind(setup: Setup) -> None:
    """Worker processes come from a fork server that outlived a `kill -9` of syncd for
    good, and so did the workers (they hold its "alive" pipe open, and a parent-death
    signal only follows the fork server): each worker now watches syncd itself."""
    import signal
    import time

    populate(setup, {f"d{i % 40}/f{i}.bin": os.urandom(8_000) for i in range(6_000)})
    p = subprocess.Popen([str(SYNCD), "reconcile", "--config", str(setup.config)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while len(_session_members(p.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)   # syncd, its fork server and a worker at least
        members = _session_members(p.pid)
        assert p.poll() is None and len(members) >= 3, "no worker processes seen"
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 15
        while _session_members(p.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _session_members(p.pid) == []
    finally:
        for pid in _session_members(p.pid):   # never leave them to the next test
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_control_characters_in_names_never_reach_the_terminal(setup: Setup) -> None:
    """A file name with a newline and an ESC sequence: the dry-run plan shows it escaped,
    on one line, and cannot print a fake plan line or drive the terminal."""
    evil = "innocent\n  delete_remote  etc-passwd\x1b[2J"
    setup.write(evil, b"x")
    r = run_syncd("reconcile", "--config", str(setup.config), "--dry-run")
    assert r.code == 0, r.err
    plan = [ln for ln in r.out.splitlines() if ln.startswith("  ")]
    assert plan == ["  upload         innocent\\x0a  delete_remote  etc-passwd\\x1b[2J  (new)"]
    assert "\x1b" not in r.out and "\x1b" not in r.err
    # Console logs (a terminal's format) are escaped as well; JSON lines by their encoder.
    r2 = run_syncd("reconcile", "--config", str(setup.config), "--log-format", "console",
                   "--log-level", "debug")
    assert r2.code == 0, r2.err
    assert "\x1b[2J" not in r2.err and "etc-passwd\\" in r2.err and "x1b[2J" in r2.err


def test_followed_links_that_resolve_to_themselves_block_nothing(setup: Setup) -> None:
    """`ln -s loopself loopself` and a -> b -> a with follow_symlinks = true: skipped as
    symlink loops, exit 0, and a file deleted locally is still trashed on the remote."""
    setup.config.write_text(setup.config.read_text().replace(
        'ignore = [".git/", "*.tmp"]', 'ignore = [".git/", "*.tmp"]\nfollow_symlinks = true'))
    setup.write("keep.txt", b"k")
    setup.write("gone.txt", b"g")
    assert setup.reconcile().code == 0
    (setup.src / "loopself").symlink_to("loopself")
    (setup.src / "a").symlink_to("b")
    (setup.src / "b").symlink_to("a")
    (setup.src / "gone.txt").unlink()
    r = setup.reconcile()
    assert r.code == 0, r.err
    assert r.summary["trashed"] == 1 and r.summary["failed"] == []
    assert tree(setup.mirror) == {"keep.txt": b"k"}
    assert not any(e.get("event") == "deletes_skipped" for e in r.events())

"""Index: schema migrations, entries round-trip, scan saves, base commits with acks."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from syncd.index import MIGRATIONS, Done, Index, IndexError_, action_from_json
from syncd.model import Action, Base, Kind, LocalState, Op, phase

F = int(Kind.FILE)


def test_fresh_index_is_at_latest_version_and_wal(tmp_path: Path) -> None:
    idx = Index.open(tmp_path / "state")
    assert idx.schema_version == len(MIGRATIONS)
    assert idx.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


def test_forward_migration_keeps_data(tmp_path: Path) -> None:
    db = tmp_path / "i.sqlite3"
    old = Index(db, migrations=MIGRATIONS)
    old.save_scan("p", [("a", LocalState(F, 1, 2, 3, 0o644, b"h" * 16), False)], [])
    old.close()
    extra = (*MIGRATIONS, "ALTER TABLE entries ADD COLUMN l_xattr BLOB;"
                          "CREATE TABLE notes (x INTEGER)")
    new = Index(db, migrations=extra)
    assert new.schema_version == len(MIGRATIONS) + 1
    local, _, _ = new.load("p")
    assert local["a"].hash == b"h" * 16
    cols = [r[1] for r in new.db.execute("PRAGMA table_info(entries)")]
    assert "l_xattr" in cols
    new.close()
    # Re-opening does not re-apply anything.
    again = Index(db, migrations=extra)
    assert again.schema_version == len(MIGRATIONS) + 1


def test_newer_schema_is_refused_clearly(tmp_path: Path) -> None:
    db = tmp_path / "i.sqlite3"
    Index(db).close()
    con = sqlite3.connect(db)
    con.execute("UPDATE schema_version SET version = 99")
    con.commit()
    con.close()
    with pytest.raises(IndexError_, match="schema version 99, newer than this syncd"):
        Index(db)


def test_failed_migration_rolls_back(tmp_path: Path) -> None:
    db = tmp_path / "i.sqlite3"
    Index(db).close()
    with pytest.raises(sqlite3.OperationalError):
        Index(db, migrations=(*MIGRATIONS, "CREATE TABLE ok (x); THIS IS NOT SQL"))
    idx = Index(db)
    assert idx.schema_version == len(MIGRATIONS)
    assert idx.db.execute("SELECT count(*) FROM sqlite_master WHERE name='ok'").fetchone()[0] == 0


def test_scan_save_load_and_remove(tmp_path: Path) -> None:
    idx = Index(tmp_path / "i.sqlite3")
    s1 = LocalState(F, 10, 100, 7, 0o644, b"1" * 16)
    idx.save_scan("p", [("a", s1, True), ("b", s1, False)], [])
    local, racy, base = idx.load("p")
    assert local == {"a": s1, "b": s1} and racy == {"a"} and base == {}
    idx.save_scan("p", [], ["a"])
    local, racy, _ = idx.load("p")
    assert set(local) == {"b"} and racy == set()
    assert idx.load("other") == ({}, set(), {})


def test_base_moves_with_the_ack_in_one_transaction(tmp_path: Path) -> None:
    idx = Index(tmp_path / "i.sqlite3")
    a = Action(Op.UPLOAD, "f", "new", 3, b"h" * 16, 5)
    idx.enqueue("p", [a], phase, now=0)
    (job,) = idx.lease("me", now=0, until=100, limit=10)
    b = Base(F, 3, 5, b"h" * 16, "3:5")
    loc = LocalState(F, 3, 5, 9, 0o644, b"h" * 16)
    idx.finish("p", [Done(job.id, "f", b, loc)], [], [], now=1)
    local, _, base = idx.load("p")
    assert base == {"f": b} and local == {"f": loc}
    assert idx.job_counts("p") == {}
    # Deleting the base of an entry that is gone locally removes the row entirely.
    idx.save_scan("p", [], ["f"])
    idx.enqueue("p", [Action(Op.DELETE, "f")], phase, now=2)
    (job,) = idx.lease("me", now=2, until=100, limit=10)
    idx.finish("p", [Done(job.id, "f", None)], [], [], now=3)
    assert idx.db.execute("SELECT count(*) FROM entries").fetchone()[0] == 0


def test_a_failing_commit_moves_neither_base_nor_job(tmp_path: Path) -> None:
    idx = Index(tmp_path / "i.sqlite3")
    idx.enqueue("p", [Action(Op.UPLOAD, "f")], phase, now=0)
    (job,) = idx.lease("me", now=0, until=100, limit=10)
    bad = Done(job.id, "f", Base(F, 1, 1, b"x", "fp"))
    with pytest.raises(AttributeError):
        idx.finish("p", [bad, Done(job.id, "g", "not a base")], [], [], now=1)  # type: ignore[arg-type]
    assert idx.load("p")[2] == {}
    assert idx.job_counts("p") == {"leased": 1}


def test_v1_index_migrates_to_v2_with_the_upload_log(tmp_path: Path) -> None:
    db = tmp_path / "i.sqlite3"
    v1 = Index(db, migrations=MIGRATIONS[:1])
    v1.save_scan("p", [("a", LocalState(F, 1, 2, 3, 0o644, b"h" * 16), False)], [])
    v1.close()
    idx = Index(db)
    assert idx.schema_version == len(MIGRATIONS) >= 2
    assert idx.load("p")[0]["a"].hash == b"h" * 16
    idx.close()


def test_upload_log_records_parts_and_forgets_them_together(tmp_path: Path) -> None:
    from syncd.index import DB_NAME, UploadLog

    log = UploadLog(tmp_path / DB_NAME)       # creates and migrates the index on first use
    rid = log.begin("s3", "p/k", "/src/k", 10, 1, 2, 3, b"x" * 16, 5, 100.0)
    assert log.find("s3", "p/k") is not None and log.find("s3", "p/k").upload_id is None
    log.started(rid, "UP1")
    log.part_done(rid, 1, '"e1"', "crc")
    log.part_done(rid, 2, '"e2"', None)
    assert log.parts(rid) == {1: ('"e1"', "crc"), 2: ('"e2"', None)}
    assert [r.key for r in log.under("s3", "p/")] == ["p/k"] and log.under("s3", "q/") == []
    rid2 = log.begin("s3", "p/k", "/src/k", 11, 1, 2, 3, None, 5, 101.0)   # replaces
    assert log.parts(rid2) == {} and log.parts(rid) == {}
    log.forget(rid2)
    assert log.find("s3", "p/k") is None
    n = sqlite3.connect(tmp_path / DB_NAME).execute("SELECT count(*) FROM upload_parts").fetchone()
    assert n == (0,)


def test_upload_log_opens_its_own_connection_after_fork(tmp_path: Path) -> None:
    import os

    from syncd.index import DB_NAME, UploadLog

    log = UploadLog(tmp_path / DB_NAME)
    rid = log.begin("s3", "k", "/s", 1, 1, 1, 1, None, 5, 1.0)
    pid = os.fork()
    if pid == 0:   # child: the parent's connection is left alone; a new one works
        try:
            log.part_done(rid, 1, '"e"', None)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert log.parts(rid) == {1: ('"e"', None)}


def test_v5_migration_keeps_every_clean_file_clean(tmp_path: Path) -> None:
    """v5 puts the permission bits into the stat signature (a chmod alone is then seen).
    The stored signatures are recomputed, so no file looks changed by the upgrade (which
    would have re-hashed every file once)."""
    from syncd.model import stat_sig

    db = tmp_path / "i.sqlite3"
    v4 = Index(db, migrations=MIGRATIONS[:4])
    v4.db.execute("INSERT INTO entries (pair, path, l_kind, l_size, l_mtime, l_inode, l_mode, "
                  "l_hash, l_racy, l_sig, b_kind, b_size, b_mtime, b_hash, b_fp) VALUES "
                  "('p', 'a', 1, 10, 20, 30, 420, ?, 0, ?, 1, 10, 20, ?, '10:20')",
                  (b"h" * 16, hash((10, 20, 30)), b"h" * 16))   # v4's signature
    v4.close()
    idx = Index(db)
    clean, _ = idx.load_prior("p")
    assert clean == {"a": stat_sig(10, 20, 30, 0o644)}
    assert idx.load_bases("p")["a"].mode == 0o644   # what it was last sent with


def test_v7_migration_turns_queued_chmod_jobs_into_attrs_jobs(tmp_path: Path) -> None:
    """A mode-only job queued by a syncd before v7 ('chmod', and a newer intent waiting
    behind a leased job) is an 'attrs' job after the upgrade; other jobs are untouched."""
    db = tmp_path / "i.sqlite3"
    v6 = Index(db, migrations=MIGRATIONS[:6])
    chmod = '["chmod","mode changed",3,"{}",5,"","3:5",1]'.format("ab" * 16)
    for i, (args, nxt) in enumerate(((chmod, None), ('["upload","new",3,null,5,"","",1]', chmod))):
        v6.db.execute("INSERT INTO jobs (pair, path, phase, args, state, created, updated, "
                      "next_args) VALUES ('p', ?, 0, ?, 'pending', 0, 0, ?)", (f"f{i}", args, nxt))
    v6.close()
    idx = Index(db)
    rows = idx.db.execute("SELECT args, next_args FROM jobs ORDER BY path").fetchall()
    assert rows == [(chmod.replace('"chmod"', '"attrs"'), None),
                    ('["upload","new",3,null,5,"","",1]', chmod.replace('"chmod"', '"attrs"'))]
    (job,) = [j for j in idx.lease("me", now=0, until=100, limit=10) if j.path == "f0"]
    assert (job.action.op, job.action.reason, job.action.hash) == (
        Op.ATTRS, "mode changed", bytes.fromhex("ab" * 16))


def test_v10_migration_gives_stored_early_jobs_their_when(tmp_path: Path) -> None:
    """Jobs queued before v10 ran early because of their reason text (a case twin's
    removal, our own temp's cleanup): after the upgrade their `when` says so, and their
    phase comes from it; other jobs are untouched."""
    from syncd.model import BEFORE_WRITES, OWN_TEMP, OWN_TEMP_RESUMABLE, When

    db = tmp_path / "i.sqlite3"
    v9 = Index(db, migrations=MIGRATIONS[:9])
    rows = [("a", f'["trash_remote","{BEFORE_WRITES}",3,null,0,".syncd-trash/s/a","",1]', None),
            ("b", f'["cleanup_tmp","{OWN_TEMP}",0,null,0,"","",1]', None),
            ("c", f'["cleanup_tmp","{OWN_TEMP_RESUMABLE}",0,null,0,"","",1]', None),
            ("d", '["upload","new",3,null,5,"","",1,2]',
             f'["rmdir_remote","{BEFORE_WRITES}",0,null,0,"","",2]')]
    for path, args, nxt in rows:
        v9.db.execute("INSERT INTO jobs (pair, path, phase, args, state, created, updated, "
                      "next_args) VALUES ('p', ?, 0, ?, 'pending', 0, 0, ?)", (path, args, nxt))
    v9.close()
    idx = Index(db)
    got = {j.path: j.action for j in idx.lease("me", now=0, until=100, limit=10)}
    assert got["a"].when == When.BEFORE_WRITES and got["a"].dest == ".syncd-trash/s/a"
    assert got["b"].when == When.OWN_TEMP and phase(got["b"]) < 0
    assert got["c"].when == When.USUAL and phase(got["c"]) == 1   # resumed from: after
    assert got["d"].when == When.USUAL and got["d"].replaces == 2
    nxt = idx.db.execute("SELECT next_args FROM jobs WHERE path = 'd'").fetchone()[0]
    assert action_from_json("d", nxt).when == When.BEFORE_WRITES


def test_recording_a_target_can_rewrite_the_bases_fingerprints(tmp_path: Path) -> None:
    # An FTP pair from before targets were recorded: its LIST fingerprints changed form,
    # and are rewritten when the target is first recorded (not on later changes).
    idx = Index(tmp_path / "i.sqlite3")
    for path, fp in (("f", "3:old"), ("g", "3:new")):
        idx.enqueue("p", [Action(Op.UPLOAD, path, "new", 3, b"h" * 16, 5)], phase, now=0)
        (job,) = idx.lease("me", now=0, until=100, limit=10)
        idx.finish("p", [Done(job.id, path, Base(F, 3, 5, b"h" * 16, fp))], [], [], now=1)
    idx.set_pair_target("p", "ftp u@h:21 /r ", forget_bases=False,
                        map_fp=lambda fp: fp.replace("old", "new"))
    assert {p: b.remote_fp for p, b in idx.load_bases("p").items()} == {"f": "3:new", "g": "3:new"}
    assert idx.pair_meta("p").target == "ftp u@h:21 /r "


def test_upload_log_failures_name_the_state_index(tmp_path: Path) -> None:
    # A busy or broken state index: the remote turns this into a transient error for the
    # file, and it must say which file syncd could not write (not a bare SQLite message).
    from syncd.index import UploadLog

    path = tmp_path / "i.sqlite3"
    log = UploadLog(path)
    rec = log.begin("r", "k", "/src", 1, 1, 1, 1, None, 8, now=0)
    log._db().execute("DROP TABLE upload_parts")
    log._db().execute("DROP TABLE uploads")
    with pytest.raises(IndexError_, match=f"state index {path}"):
        log.started(rec, "upload-1")
    with pytest.raises(IndexError_, match=f"state index {path}"):
        log.begin("r", "k", "/src", 1, 1, 1, 1, None, 8, now=0)


def test_every_local_entry_is_either_clean_or_in_the_other_rows(tmp_path: Path) -> None:
    """A file known locally but without a base (never confirmed on the remote) is one of
    the `other` rows: a NULL base once made the filter NULL and dropped it from both, so
    the scanner took it for new (read again) and never saw it vanish."""
    idx = Index(tmp_path / "i.sqlite3")
    h = b"h" * 16
    idx.db.execute("INSERT INTO entries (pair, path, l_kind, l_size, l_mtime, l_inode, l_mode, "
                   "l_hash, l_racy, l_sig) VALUES ('p', 'nobase', 1, 1, 2, 3, 420, ?, 0, 5)", (h,))
    idx.db.execute("INSERT INTO entries (pair, path, l_kind, l_size, l_mtime, l_inode, l_mode, "
                   "l_hash, l_racy, l_sig, b_kind, b_size, b_mtime, b_hash, b_fp) VALUES "
                   "('p', 'nohash', 1, 1, 2, 3, 420, ?, 0, 5, 1, 1, 2, NULL, '1:2')", (h,))
    idx.db.execute("INSERT INTO entries (pair, path, l_kind, l_size, l_mtime, l_inode, l_mode, "
                   "l_hash, l_racy, l_sig, b_kind, b_size, b_mtime, b_hash, b_fp) VALUES "
                   "('p', 'synced', 1, 1, 2, 3, 420, ?, 0, 5, 1, 1, 2, ?, '1:2')", (h, h))
    clean, other = idx.load_prior("p")
    assert set(clean) == {"synced"} and set(other) == {"nobase", "nohash"}
    assert other["nobase"][6] == h and other["nobase"][8] == 0   # hash kept, not synced


# --- a damaged index, a full disk ----------------------------------------------------------


def _real_index(path: Path, n: int = 2000) -> None:
    """An index with `n` entries of pair 'p', checkpointed: every page in the main file."""
    idx = Index(path)
    idx.save_scan("p", [(f"d{i // 50}/f{i}", LocalState(F, i, i, i, 0o644, b"h" * 16), False)
                        for i in range(n)], [])
    idx.set_pair_meta("p", "/root", 42)
    idx.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    idx.close()


def _overwrite_pages(path: Path, first: int, last: int) -> None:
    """Pages first..last (1-based, 4 KiB) replaced by random bytes."""
    import os

    with open(path, "r+b") as f:
        f.seek((first - 1) * 4096)
        f.write(os.urandom((last - first + 1) * 4096))


def test_a_file_that_is_not_a_database_is_a_damaged_index_naming_it(tmp_path: Path) -> None:
    import os

    from syncd.index import IndexDamaged

    path = tmp_path / "index.sqlite3"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(IndexDamaged, match=f"state index {path} is damaged .*syncd index "
                                           "rebuild") as e:
        Index(path)
    assert e.value.exit_code == 2


def test_overwritten_pages_are_a_damaged_index_when_read(tmp_path: Path) -> None:
    from syncd.index import IndexDamaged

    path = tmp_path / "index.sqlite3"
    _real_index(path)
    _overwrite_pages(path, 3, 6)
    with pytest.raises(IndexDamaged, match=r"malformed.*syncd index rebuild"):
        idx = Index(path)
        idx.pair_meta("p")
        idx.load_prior("p")


def test_a_full_disk_is_an_error_naming_the_state_dir_and_loses_nothing(tmp_path: Path) -> None:
    from syncd.index import IndexNoSpace

    path = tmp_path / "state" / "index.sqlite3"
    path.parent.mkdir()
    _real_index(path, n=10)
    idx = Index(path)
    # SQLite's own limit on the file's size: the same SQLITE_FULL a full disk gives.
    pages = idx.db.execute("PRAGMA page_count").fetchone()[0]
    idx.db.execute(f"PRAGMA max_page_count = {pages}")
    many = [(f"new/{i:05}-" + "x" * 200, LocalState(F, i, i, i, 0o644, b"h" * 16), False)
            for i in range(5000)]
    with pytest.raises(IndexNoSpace, match=f"state dir {path.parent}: no space left") as e:
        idx.save_scan("p", many, [])
    assert e.value.exit_code == 2
    assert not idx.db.in_transaction   # rolled back: the connection is usable again
    local, _, _ = idx.load("p")
    assert len(local) == 10            # the failed write took nothing with it
    idx.db.execute("PRAGMA max_page_count = 1073741823")   # room again
    idx.save_scan("p", many, [])
    assert len(idx.load("p")[0]) == 5010
    idx.close()


def test_a_failed_commit_leaves_no_transaction_open(tmp_path: Path) -> None:
    """A COMMIT SQLite refuses must not leave the transaction open: the next `tx()` would
    join it and never commit."""
    from syncd.index import IndexNoSpace

    idx = Index(tmp_path / "index.sqlite3")
    pages = idx.db.execute("PRAGMA page_count").fetchone()[0]
    idx.db.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(IndexNoSpace):
        idx.set_pair_meta("p", "/" + "r" * 100_000, 1)
    assert not idx.db.in_transaction
    idx.db.execute("PRAGMA max_page_count = 1073741823")
    idx.set_pair_meta("p", "/r", 1)
    idx.close()
    again = Index(tmp_path / "index.sqlite3")
    assert again.pair_meta("p").root == "/r"


def test_sql_mistakes_stay_bugs(tmp_path: Path) -> None:
    """Only errors about the file or its disk become user errors; ours stay exceptions."""
    from syncd.index import state_error

    e = sqlite3.connect(":memory:")
    with pytest.raises(sqlite3.OperationalError) as caught:
        e.execute("SELECT nothing FROM nowhere")
    assert state_error(tmp_path / "i", caught.value) is None


def test_rebuild_keeps_the_damaged_index_and_starts_a_new_one(tmp_path: Path) -> None:
    import os

    from syncd.index import rebuild_index

    state = tmp_path / "state"
    state.mkdir()
    path = state / "index.sqlite3"
    path.write_bytes(b"garbage" * 600)
    (state / "index.sqlite3-wal").write_bytes(os.urandom(1000))
    r = rebuild_index(state, now=0)
    assert r.problem is not None and r.kept == state / "index-damaged-19700101T000000Z.sqlite3"
    assert r.kept.read_bytes() == b"garbage" * 600
    assert (state / "index-damaged-19700101T000000Z.sqlite3-wal").exists()
    idx = Index(path)
    assert idx.schema_version == len(MIGRATIONS) and idx.count_base("p") == 0
    idx.close()
    # A second rebuild in the same second keeps the first one's file.
    path.write_bytes(b"garbage again" * 600)
    (state / "index.sqlite3-wal").unlink(missing_ok=True)
    r2 = rebuild_index(state, now=0)
    assert r2.kept == state / "index-damaged-19700101T000000Z-2.sqlite3"
    assert r.kept.read_bytes() == b"garbage" * 600


def test_rebuild_refuses_a_sound_index_without_force_and_keeps_pair_facts(tmp_path: Path) -> None:
    from syncd.index import rebuild_index

    state = tmp_path / "state"
    state.mkdir()
    _real_index(state / "index.sqlite3", n=10)
    with pytest.raises(IndexError_, match=r"passed SQLite's check.*--yes"):
        rebuild_index(state)
    r = rebuild_index(state, force=True, now=0)
    assert r.problem is None and r.kept is not None and r.kept.name.startswith("index-replaced-")
    assert r.pairs_kept == 1
    idx = Index(state / "index.sqlite3")
    meta = idx.pair_meta("p")
    assert meta is not None and (meta.root, meta.st_dev) == ("/root", 42)   # guards stay armed
    assert idx.count_base("p") == 0 and idx.load("p")[0] == {}


def test_rebuild_of_overwritten_pages(tmp_path: Path) -> None:
    from syncd.index import rebuild_index

    state = tmp_path / "state"
    state.mkdir()
    _real_index(state / "index.sqlite3")
    _overwrite_pages(state / "index.sqlite3", 3, 6)
    r = rebuild_index(state)
    assert r.problem is not None and r.kept is not None
    assert r.pairs_kept == 0   # page 3 holds the pairs table: nothing readable to keep
    assert Index(state / "index.sqlite3").load("p") == ({}, set(), {})

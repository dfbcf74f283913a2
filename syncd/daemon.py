"""`syncd run`: lifecycle of the long-running service — lock, watchers, READY, the initial
reconcile, debounced event-driven scans, periodic full reconciles, signals and sd_notify.

READY=1 goes out once the lock is held and the roots are watched: from then on no change
is missed, so systemd need not wait for a first sync that can take hours. The initial full
reconcile of every pair runs after it, pair by pair, between the loop's other work (a
reload, `syncd retry`, the events of pairs already reconciled), and its progress is the
unit's STATUS= line.

Events never carry decisions: they only mark a pair as changed. A marked pair gets a
local scan checked against the index (the bases stand for the remote, no listing); the
periodic full reconcile also lists the remote and catches drift and anything missed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from syncd import log as slog
from syncd.config import Config, load_config
from syncd.errors import SyncdError

FALLBACK_SCAN_S = 30.0      # pairs that cannot be watched are scanned this often
WATCH_CHECK_S = 10.0        # watched roots are checked (replaced? unmounted?) this often
# A pair's run waits this long at most for a retry's backoff; longer, and the daemon moves
# on to the other pairs and tries this one again later (growing delays, up to retry_max).
PATIENCE_S = 10.0
STATUS_EVERY_S = 1.0        # a run's progress reaches STATUS= at most this often


def sd_notify(state: str) -> bool:
    """systemd's notify protocol (sd_notify(3)) without a library: one datagram to
    $NOTIFY_SOCKET. A no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError:
        return False


class Daemon:
    def __init__(self, cfg: Config, config_path: Path):
        self.cfg = cfg
        self.config_path = config_path
        self.log = slog.get()
        self.stop = threading.Event()
        self.finished = threading.Event()
        self.announced = threading.Event()   # the guard has logged the stop
        self.signal_name = ""
        self.hup_pending = False
        self.reload = threading.Event()
        self.retry_pending = False
        self.via_pipe = False   # signals reach the relay thread through a wakeup fd
        self.retry_now = threading.Event()
        self.last_error = ""
        self.engine: Any = None
        self.index: Any = None
        self.watcher: Any = None
        self.debouncer: Any = None
        self.rewatch: set[str] = set()       # unwatched until their root is back
        self.roots: dict[str, Any] = {}      # pair -> (real root, ignored)
        self.next_full: dict[str, float] = {}
        self.next_poll: dict[str, float] = {}
        self.retry_at: dict[str, tuple[float, bool]] = {}   # pair -> (when, full reconcile?)
        self.prober: Any = None
        self.failures: dict[str, int] = {}                   # consecutive failed runs
        self.initial: list[str] = []     # pairs whose initial full reconcile is still to run
        self.initial_total = 0
        self.initial_t0 = 0.0
        self._full = False               # the kind of run under way (for STATUS=)

    # --- signals ----------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Plain attribute writes only (_noted): Event.set() takes a lock the interrupted
        # main thread may hold (inside Event.wait), which would deadlock. The relay thread
        # acts on it. With the wakeup pipe, the relay has noted it already.
        if not self.via_pipe:
            self._noted(signum)

    def _relay(self, wakeup: int | None = None) -> None:
        """Turns what the signal handlers noted into events, from a thread of its own. With
        `wakeup` (the read end of signal.set_wakeup_fd's pipe) it sleeps until a signal
        arrives: an idle daemon wakes once a second, not twenty times."""
        import select

        while not self.finished.is_set():
            if wakeup is not None:
                if select.select([wakeup], [], [], 1.0)[0]:
                    for b in os.read(wakeup, 64):   # the C-level handler wrote the numbers
                        self._noted(b)
            else:
                time.sleep(0.05)
            self._act()

    def _noted(self, signum: int) -> None:
        """What a Python-level handler would note; the main thread may be busy in C code
        (an SQLite query, a hash) and run the handler itself only later."""
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.signal_name = self.signal_name or signal.Signals(signum).name
        elif signum == signal.SIGHUP:
            self.hup_pending = True
        elif signum == signal.SIGUSR1:   # `syncd retry`: failed jobs were requeued; run now
            self.retry_pending = True

    def _act(self) -> None:
        """Noted signals become events; the main loop is woken to see them."""
        acted = False
        if self.signal_name and not self.stop.is_set():
            self.stop.set()
            acted = True
        if self.hup_pending:
            self.hup_pending = False
            self.reload.set()
            acted = True
        if self.retry_pending:
            self.retry_pending = False
            self.retry_now.set()
            acted = True
        if acted and self.debouncer is not None:
            self.debouncer.wake.set()

    def _shutdown_guard(self) -> None:
        """Waits for a stop request; then says so, and gives transfers in flight
        shutdown_timeout before the process leaves anyway. Nothing is lost: leased jobs
        are reclaimed, and the tree re-planned, at the next start."""
        self.stop.wait()
        if self.finished.is_set():
            return
        self.log.info("daemon_stopping", signal=self.signal_name,
                      timeout_s=self.cfg.daemon.shutdown_timeout)
        sd_notify("STOPPING=1")
        self.announced.set()
        if not self.finished.wait(self.cfg.daemon.shutdown_timeout):
            self.log.warning("shutdown_timeout", timeout_s=self.cfg.daemon.shutdown_timeout,
                             note="transfers in flight abandoned; retried at the next start")
            os._exit(0)

    # --- lifecycle --------------------------------------------------------------------------

    def run(self) -> int:
        from syncd.engine import StateLock

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)
        threading.Thread(target=self._shutdown_guard, daemon=True, name="shutdown").start()
        wakeup: int | None = None
        with contextlib.suppress(ValueError, OSError):   # ValueError: not the main thread
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            signal.set_wakeup_fd(w, warn_on_full_buffer=False)
            wakeup = r
            self.via_pipe = True   # the handlers only keep the default action away
        threading.Thread(target=self._relay, args=(wakeup,), daemon=True, name="signals").start()
        with StateLock(self.cfg.daemon.state_dir, role="daemon"):
            watchdog_s = _watchdog_interval()
            if watchdog_s:   # from now on: the initial reconcile may take hours
                threading.Thread(target=self._ping, args=(watchdog_s,), daemon=True,
                                 name="sd-watchdog").start()
            self._open()
            try:
                self.log.info("daemon_started", pid=os.getpid(), config=str(self.config_path),
                              pairs=[p.name for p in self.cfg.pairs])
                self.index.start_run_counters([p.name for p in self.cfg.pairs], time.time())
                self._start_watching()
                # Watched: a change from now on is seen, by an event or by the initial
                # reconcile's walk. The loop runs that reconcile, after READY.
                self.initial = [p.name for p in self.cfg.pairs]
                self.initial_total = len(self.initial)
                self.initial_t0 = time.monotonic()
                sd_notify("READY=1\n" + self._status())
                self.log.info("daemon_ready", initial_reconcile=self.initial)
                self._loop()
            finally:
                if self.signal_name:   # keep the log in order: stopping, then stopped
                    self.announced.wait(2)
                self._close()
        self.finished.set()
        self.stop.set()   # releases the guard thread
        self.log.info("daemon_stopped")
        return 0

    def _open(self) -> None:
        from syncd.index import Index

        self.index = Index.open(self.cfg.daemon.state_dir)
        self._make_engine(self.cfg)
        self.engine.queue.reclaim(exclusive=True)   # we hold the lock: every lease is stale
        d = self.cfg.daemon
        now = time.monotonic()
        self.next_full = {p.name: now + d.full_reconcile_interval for p in self.cfg.pairs}

    def _close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if self.engine is not None:
            self.engine.close()
        if self.index is not None:
            self.index.close()

    def _make_engine(self, cfg: Any) -> None:
        """The engine and the debouncer for a config (at start and on each reload)."""
        from syncd.engine import Engine
        from syncd.probe import Prober
        from syncd.watch import Debouncer

        self.engine = Engine(cfg, self.index, transfer_log_level="info", stop=self.stop,
                             patience=PATIENCE_S, reporter_factory=self._progress)
        self.debouncer = Debouncer(cfg.daemon.debounce, cfg.daemon.max_delay)
        self.prober = Prober(self.engine.breaker, self._probe_remote,
                             initial=cfg.daemon.retry_initial, cap=cfg.daemon.retry_max,
                             log=self.log, wake=lambda: self.debouncer.wake.set())

    def _probe_remote(self, name: str) -> None:
        """Connect to a remote and stat its root (from a probe's thread)."""
        from syncd.remotes import open_remote

        r = open_remote(self.cfg.remotes[name], str(self.cfg.daemon.state_dir))
        try:
            r.check()
        finally:
            r.close()

    def _restored(self) -> None:
        """Remotes a probe reached again: each of their pairs gets a full reconcile now
        (what changed meanwhile, on either side, and the jobs that waited)."""
        now = time.monotonic()
        for d in self.prober.take_back():
            self.engine.forget_remote(d.remote)
            for p in self.cfg.pairs:
                if p.remote == d.remote:
                    self.retry_at[p.name] = (now, True)
                    self.failures.pop(p.name, None)

    def _start_watching(self) -> None:
        from syncd.scan import pair_matcher
        from syncd.watch import Watcher

        roots = {}
        for p in self.cfg.pairs:
            m = pair_matcher(p.ignore, p.local, self.cfg.daemon.state_dir)
            # The real path: watchdog does not follow a root that is a symlink (~/Documents
            # -> /data/Documents): it would watch the link and see nothing.
            roots[p.name] = (os.path.realpath(p.local), m.covers)
        self.roots = roots
        self.watcher = Watcher(self.debouncer, self.log)
        present = {n for n, r in roots.items() if os.path.isdir(r[0])}
        failed = self.watcher.start({n: roots[n] for n in present})
        # A root missing now (a disk not mounted yet) is watched once it is there.
        self.rewatch = set(roots) - present
        now = time.monotonic()
        # The pairs not watched, scanned every FALLBACK_SCAN_S instead.
        self.next_poll = {n: now + FALLBACK_SCAN_S for n in (*failed, *self.rewatch)}

    def _check_watches(self, now: float) -> None:
        """Pairs whose watch was lost fall back to periodic scans (now, then every
        FALLBACK_SCAN_S); a pair whose root was replaced or was missing is watched again
        once its root is a directory, and scanned then (what changed meanwhile)."""
        w = self.watcher
        if w is None:
            return
        for p in self.cfg.pairs:
            name = p.name
            old, ignored = self.roots[name]
            real = os.path.realpath(p.local)
            if real != old:
                # The root is a symlink that now leads elsewhere (a release switched, the
                # data moved to another disk and a link left in its place): the watch
                # still follows the old directory. Watch where the path leads now.
                self.roots[name] = (real, ignored)
                if name in w.watched:
                    w.lose(name, "root_replaced")
                else:
                    self.rewatch.add(name)
        w.check_roots()
        w.reap()
        for name, why in w.take_lost().items():
            self.log.warning("watch_lost", pair=name, path=self.roots[name][0], reason=why,
                             fallback="periodic scans")
            # Scanned at once all the same: lose() touched the debouncer.
            self.next_poll[name] = now + FALLBACK_SCAN_S
            if why in ("root_replaced", "overflow"):
                self.rewatch.add(name)
        for name in list(self.rewatch):
            root, ignored = self.roots[name]
            # watch() may lose the pair again at once (the watch limit): then it is in
            # `lost` for the next pass, not restored.
            if os.path.isdir(root) and w.watch(name, root, ignored) and name in w.watched:
                self.log.info("watch_restored", pair=name, path=root)
                self.rewatch.discard(name)
                self.next_poll.pop(name, None)
                self.debouncer.touch(name)

    def _loop(self) -> None:
        d = self.cfg.daemon
        while not self.stop.is_set():
            deb = self.debouncer   # a reload replaces it
            now = time.monotonic()
            wake_at = min([*self.next_full.values(), *self.next_poll.values(),
                           *(t for t, _ in self.retry_at.values()), deb.next_due() or now + 3600,
                           self.prober.next_at() or now + 3600,
                           *([now] if self.initial else [])])
            # At least every WATCH_CHECK_S: a stat per root tells a replaced or unmounted one.
            deb.wake.wait(max(0.0, min(wake_at - now, WATCH_CHECK_S)))
            deb.wake.clear()
            if self.stop.is_set():
                break
            now = time.monotonic()
            self._check_watches(now)
            self.prober.tick()
            self._restored()
            if self.reload.is_set():
                self.reload.clear()
                self._reload()
                continue
            if self.retry_now.is_set():
                self.retry_now.clear()
                self.log.info("retry_requested", pairs=[p.name for p in self.cfg.pairs])
                for p in self.cfg.pairs:
                    if not self.stop.is_set():
                        self.retry_at.pop(p.name, None)
                        self._reconcile(p.name, full=True)
            if self.initial:
                # One pair per pass: a reload, a retry or the events of pairs done already
                # wait for one pair's reconcile, not for all of them.
                name = self.initial[0]
                self._reconcile(name, full=True)   # takes it off the list
                if self.stop.is_set():
                    break
                self.next_full[name] = time.monotonic() + d.full_reconcile_interval
                now = time.monotonic()
            for name in deb.due(now):
                # A pair still waiting for its initial reconcile: that walk sees the change.
                if name not in self.initial:
                    self._reconcile(name, full=False)
            for name, at in list(self.next_full.items()):
                if now >= at and not self.stop.is_set():
                    self._reconcile(name, full=True)
                    self.next_full[name] = time.monotonic() + d.full_reconcile_interval
            for name, (at, full) in list(self.retry_at.items()):
                if now >= at and not self.stop.is_set():
                    self._reconcile(name, full=full)
            for name, at in list(self.next_poll.items()):
                if now >= at and not self.stop.is_set() and name not in self.initial:
                    self._reconcile(name, full=False)
                    self.next_poll[name] = time.monotonic() + FALLBACK_SCAN_S

    def _ping(self, interval: float) -> None:
        # From a thread, so a long first sync does not look like a hang to systemd.
        while not self.stop.wait(interval):
            sd_notify("WATCHDOG=1")

    def _initial_done(self, name: str) -> None:
        """Any full run of a pair, done (not cut by a stop), stands for its initial one."""
        if name not in self.initial or self.stop.is_set():
            return
        self.initial.remove(name)
        if not self.initial:
            self.log.info("initial_reconcile_done", pairs=self.initial_total,
                          duration_ms=int((time.monotonic() - self.initial_t0) * 1000))

    def _doing(self, name: str, full: bool) -> str:
        """What the daemon is busy with, for STATUS=."""
        verb = f"{'reconciling' if full else 'syncing'} {name}"
        if name in self.initial:
            done = self.initial_total - len(self.initial)
            return f"initial reconcile {done + 1}/{self.initial_total} pairs: {verb}"
        return verb

    def _progress(self, pair: str, jobs: int, nbytes: int) -> _StatusProgress:
        """The engine's reporter for a run with jobs to do: their count reaches STATUS=."""
        return _StatusProgress(self._doing(pair, self._full), jobs)

    def _reconcile(self, name: str, full: bool) -> None:
        from syncd.engine import Options

        pair = next((p for p in self.cfg.pairs if p.name == name), None)
        if pair is None:   # removed by a reload
            self.retry_at.pop(name, None)
            self.failures.pop(name, None)
            return
        if self.engine.breaker.down(pair.remote) is not None:
            # Its remote is out of service: the probe brings it back, and a full
            # reconcile of the pair then sees everything that changed meanwhile.
            self.retry_at.pop(name, None)
            self._initial_done(name)
            return
        self._full = full
        sd_notify(f"STATUS={self._doing(name, full)}")
        res = self.engine.reconcile(pair, Options(list_remote=full))
        if full:
            self._initial_done(name)
        self.index.add_run_counters(name, res.uploaded + res.deleted + res.trashed
                                    + res.attrs_set, res.uploaded_bytes)
        pending = self.retry_at.get(name)
        if pending is not None and (full or not pending[1]):
            # A local-only run does not stand in for a pending full retry.
            self.retry_at.pop(name, None)
        if res.status == "unavailable":
            # The breaker has the remote: its probes, not this pair's retries, find out
            # when it is back.
            self.last_error = f"{name}: {res.message}"
            self.retry_at.pop(name, None)
        elif res.status == "failed":
            self.last_error = f"{name}: {res.message or res.status}"
            # Parked jobs and an unreachable remote are tried again with growing delays
            # (capped at retry_max), not only at the next full reconcile or local change.
            d = self.cfg.daemon
            n = self.failures[name] = self.failures.get(name, 0) + 1
            delay = min(d.retry_max, d.retry_initial * 2 ** min(n, 30))
            # A full run is retried as one if the remote, the run itself (its message) or
            # a transfer failed: a local run plans from the index, and would not redo what
            # only the listing showed (drift, remote-only entries, deletes held back by
            # the failure). Failures of the scan alone (a name that is not UTF-8) are
            # retried by local runs, not by listing the remote every retry_max.
            relist = full and (bool(res.message) or res.transfer_failures > 0)
            self.retry_at[name] = (time.monotonic() + delay, relist)
            self.log.info("pair_retry_scheduled", pair=name, in_s=round(delay, 3), attempt=n,
                          full=relist)
        else:
            self.failures.pop(name, None)
        sd_notify(self._status())

    def _status(self) -> str:
        queued = failed = 0
        for p in self.cfg.pairs:
            for state, n in self.index.job_counts(p.name).items():
                if state == "failed":
                    failed += n
                else:
                    queued += n
        parts = [f"{len(self.cfg.pairs)} pairs", f"queue {queued}", f"failed {failed}"]
        for d in self.engine.breaker.all_down().values():
            parts.append(f"remote {d.remote} unavailable since "
                         f"{time.strftime('%H:%M:%S', time.localtime(d.since))}")
        if self.initial:
            done = self.initial_total - len(self.initial)
            parts.insert(0, f"initial reconcile {done}/{self.initial_total} pairs done")
        if self.last_error:
            parts.append(f"last error: {self.last_error[:200]}")
        return "STATUS=" + "; ".join(parts)

    def _reload(self) -> None:
        sd_notify("RELOADING=1")
        try:
            new = load_config(self.config_path)
            if new.daemon.state_dir != self.cfg.daemon.state_dir:
                raise SyncdError("daemon.state_dir cannot change on reload; restart syncd")
        except SyncdError as e:
            self.log.error("config_reload_failed", error=str(e), note="the old config stays in use")
            self.last_error = f"reload: {e}"
            sd_notify("READY=1\n" + self._status())
            return
        self.log.info("config_reloaded", pairs=[p.name for p in new.pairs])
        known = {p.name for p in self.cfg.pairs}
        added = [p.name for p in new.pairs if p.name not in known]
        if added:   # `syncd status` counts what they move from now on
            self.index.start_run_counters(added, time.time())
        if self.watcher is not None:
            self.watcher.stop()
        self.engine.close()
        self.cfg = new
        slog.setup(new.daemon.log_format, new.daemon.log_level)
        self.log = slog.get()
        self._make_engine(new)
        self._start_watching()
        now = time.monotonic()
        # A full pass with the new config; pairs still waiting for their initial reconcile
        # get that one (it is a full pass), not a second one.
        names = {p.name for p in new.pairs}
        kept = [n for n in self.initial if n in names]
        self.initial_total -= len(self.initial) - len(kept)   # removed: no longer counted
        self.initial = kept
        self.next_full = {p.name: now + (new.daemon.full_reconcile_interval
                                         if p.name in kept else 0.0) for p in new.pairs}
        self.retry_at = {n: v for n, v in self.retry_at.items() if n in names}
        self.failures = {n: v for n, v in self.failures.items() if n in names}
        sd_notify("READY=1\n" + self._status())


class _StatusProgress:
    """The engine's Reporter for one daemon run: how many of its jobs are done and how
    many wait, as a STATUS= line (at most every STATUS_EVERY_S; systemd keeps the last)."""

    def __init__(self, doing: str, jobs: int):
        self.doing = doing
        self.total = jobs
        self.done = 0
        self.sent = 0
        self.last = 0.0
        self._send(force=True)

    def advance(self, files: int, nbytes: int) -> None:
        self.done += files
        self.sent += nbytes
        self._send()

    def set_totals(self, files: int, nbytes: int) -> None:
        """A first sync's walk is still finding files: what is queued grows."""
        self.total = max(files, self.done)
        self._send()

    def _send(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < STATUS_EVERY_S:
            return
        self.last = now
        from syncd.units import format_bytes

        left = max(0, self.total - self.done)
        sent = f", {format_bytes(self.sent)} sent" if self.sent else ""
        sd_notify(f"STATUS={self.doing} ({self.done:,} done, {left:,} queued{sent})")


def _watchdog_interval() -> float:
    """Half of $WATCHDOG_USEC (systemd's WatchdogSec=), if it is meant for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return 0.0
    with contextlib.suppress(ValueError):
        return int(usec) / 2e6
    return 0.0

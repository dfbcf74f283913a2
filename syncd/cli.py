"""The `syncd` command line: parse, call, map errors to the documented exit codes."""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import signal
import sys
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from syncd.errors import LockedError, SyncdError, UsageError

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_REMOTE, EXIT_SAFETY, EXIT_INTERNAL = 0, 1, 2, 3, 4, 70

# add_completion: --install-completion / --show-completion. typer imports its completion
# modules either way: the two options add no import to start-up.
app = typer.Typer(add_completion=True, no_args_is_help=True, rich_markup_mode=None,
                  pretty_exceptions_enable=False,
                  help="syncd keeps local directories in sync with remote storage.")
config_app = typer.Typer(no_args_is_help=True,
                         help="Write a starting config, show every key, validate the config.")
app.add_typer(config_app, name="config")

ConfigOpt = Annotated[str | None, typer.Option(
    "--config", "-c", help="Config file (default: $SYNCD_CONFIG, "
    "$XDG_CONFIG_HOME/syncd/config.toml, /etc/syncd/config.toml).")]
LogLevelOpt = Annotated[str | None, typer.Option(
    "--log-level", help="debug | info | warning | error (overrides [daemon] log_level).")]
LogFormatOpt = Annotated[str | None, typer.Option(
    "--log-format", help="auto | json | console (overrides [daemon] log_format).")]


VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", help="List every failed path (failures are grouped by error).")]


def _err(msg: str) -> None:
    from syncd.report import safe

    print(f"syncd: error: {safe(msg)}", file=sys.stderr)


def _guard(fn: Callable[[], int]) -> None:
    """The one error boundary: syncd errors → message + exit code; bugs → one line + 70."""
    try:
        code = fn()
    except SyncdError as e:
        _err(str(e))
        code = e.exit_code
    except KeyboardInterrupt:
        _err("interrupted; queued work stays queued for the next run")
        code = EXIT_INTERRUPTED
    except BrokenPipeError:   # `syncd ... | head`: the reader is gone, nothing to say
        _to_devnull(sys.stdout)
        code = EXIT_PIPE
    except OSError as e:
        if e.errno not in _OUTPUT_ERRNOS:
            _internal(e)
            code = EXIT_INTERNAL
        else:   # syncd's own file errors are SyncdErrors: this is the output (> /dev/full)
            _to_devnull(sys.stdout)
            _output_failed(e)
            code = EXIT_OUTPUT
    except Exception as e:  # a bug: say so in one line, keep the traceback in the log
        _internal(e)
        code = EXIT_INTERNAL
    raise typer.Exit(code)


# Errors of an uncaught write: the output is a full disk or a failing device.
_OUTPUT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG})
EXIT_OUTPUT = 120        # what Python's own exit says when its final flush fails
EXIT_INTERRUPTED = 130
EXIT_PIPE = 141          # the shell's code for a writer killed by SIGPIPE


def _to_devnull(f: Any) -> None:
    """Point a standard stream at /dev/null: the exit's own flush must not fail again."""
    with contextlib.suppress(OSError, ValueError):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, f.fileno())
        os.close(null)


def _output_failed(e: BaseException) -> None:
    """Say, on the raw descriptor (stderr's buffer may be the one failing), that the
    command's output could not be written."""
    why = getattr(e, "strerror", None) or e
    with contextlib.suppress(OSError):
        os.write(2, f"syncd: error: writing the output failed: {why}\n".encode())


def _internal(e: BaseException) -> None:
    """A bug: one line to the user, the traceback in the log."""
    from syncd import log

    log.get().error("internal_error", error=f"{type(e).__name__}: {e}", exc_info=e)
    _err(f"internal error: {type(e).__name__}: {e} (this is a bug; please report it)")


def _load(config: str | None) -> Any:
    from syncd.config import find_config, load_config

    return load_config(find_config(config))


def _setup_logs(cfg: Any, level: str | None, fmt: str | None) -> None:
    from syncd import log
    from syncd.config import LOG_FORMATS, LOG_LEVELS

    if level is not None and level not in LOG_LEVELS:
        raise UsageError(f"--log-level: '{level}' is not one of {', '.join(LOG_LEVELS)}")
    if fmt is not None and fmt not in LOG_FORMATS:
        raise UsageError(f"--log-format: '{fmt}' is not one of {', '.join(LOG_FORMATS)}")
    log.setup(fmt or cfg.daemon.log_format, level or cfg.daemon.log_level)


@app.command()
def reconcile(
    pairs: Annotated[list[str] | None, typer.Argument(help="Pairs to reconcile (default: all).")] = None,
    config: ConfigOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    verbose: VerboseOpt = False,
    allow_mass_delete: Annotated[bool, typer.Option(
        "--allow-mass-delete", help="For this run, let a plan delete more than max_delete, "
        "or delete everything when the local root is empty.")] = False,
    allow_device_change: Annotated[bool, typer.Option(
        "--allow-device-change", help="For this run, accept a local root that moved to "
        "another device, a mount point inside it that is no longer mounted, or a remote "
        "path that is empty although files were synced there.")] = False,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Scan, compare with the remote, transfer the differences, and exit when done."""

    def go() -> int:
        cfg = _load(config)
        _setup_logs(cfg, log_level, log_format)
        return run_reconcile(cfg, pairs or [], dry_run=dry_run, as_json=as_json,
                             verbose=verbose, allow_mass_delete=allow_mass_delete,
                             allow_device_change=allow_device_change)

    _guard(go)


@app.command()
def run(
    config: ConfigOpt = None,
    log_level: LogLevelOpt = None,
    log_format: LogFormatOpt = None,
) -> None:
    """Run the daemon: reconcile every pair, then watch and sync changes as they happen.
    SIGTERM/SIGINT stop it (exit 0), SIGHUP reloads the config."""

    def go() -> int:
        from syncd.config import find_config, load_config
        from syncd.daemon import Daemon

        path = find_config(config)
        cfg = load_config(path)
        _setup_logs(cfg, log_level, log_format)
        return Daemon(cfg, path).run()

    _guard(go)


@app.command()
def status(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Per pair: last reconcile and its result, queue depth, failed jobs with their errors.
    Safe while the daemon runs (reads the index; SQLite WAL)."""

    def go() -> int:
        cfg = _load(config)
        report = collect_status(cfg)
        if as_json:
            print(json.dumps(report, indent=2))
        else:
            _print_status(report, verbose)
        return EXIT_OK

    _guard(go)


@app.command()
def retry(
    pairs: Annotated[list[str] | None, typer.Argument(
        help="Pairs whose failed jobs to retry (default: all).")] = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Retry failed jobs now: with the daemon running, it is told to (SIGUSR1) and runs a
    full reconcile of every pair; otherwise the pairs are reconciled here."""

    def go() -> int:
        import time

        from syncd.index import Index

        cfg = _load(config)
        names = _pair_names(cfg, pairs or [])
        holder = _lock_holder(cfg.daemon.state_dir)
        if holder is not None and holder[1] != "daemon":
            raise LockedError(f"a syncd reconcile (PID {holder[0]}) holds the state dir "
                              f"{cfg.daemon.state_dir}; run `syncd retry` again once it ends")
        pid = holder[0] if holder is not None else None
        db = cfg.daemon.state_dir / "index.sqlite3"
        n = 0
        if db.exists():
            index = Index.open(cfg.daemon.state_dir)
            try:
                n = index.requeue_failed(names, time.time())
            finally:
                index.close()
        if pid is not None and pid > 0:
            os.kill(pid, signal.SIGUSR1)
            if as_json:
                print(json.dumps({"requeued": n, "daemon_pid": pid}))
            else:
                print(f"{n} failed job(s) requeued; the daemon (PID {pid}) runs them now "
                      "(see `syncd status`)")
            return EXIT_OK
        _setup_logs(cfg, None, None)
        print(f"{n} failed job(s) requeued; the daemon is not running: reconciling "
              f"{', '.join(names)} now", file=sys.stderr)
        return run_reconcile(cfg, names, as_json=as_json)

    _guard(go)


def _pair_names(cfg: Any, wanted: list[str]) -> list[str]:
    known = [p.name for p in cfg.pairs]
    for w in wanted:
        if w not in known:
            raise UsageError(f"unknown pair '{w}'; known: {', '.join(known)}")
    return wanted or known


def _lock_holder(state_dir: Path) -> tuple[int, str] | None:
    """(PID, role) of the syncd holding this state dir's lock, None if none does."""
    from syncd.engine import StateLock

    return StateLock.holder(state_dir)


def collect_status(cfg: Any) -> dict[str, Any]:
    import time

    from syncd.index import Index

    state_dir = cfg.daemon.state_dir
    holder = _lock_holder(state_dir)
    running = holder[0] if holder is not None and holder[1] == "daemon" else None
    pairs = []
    index = Index.open(state_dir) if (state_dir / "index.sqlite3").exists() else None
    try:
        for p in cfg.pairs:
            meta = index.pair_meta(p.name) if index else None
            counts = index.job_counts(p.name) if index else {}
            failed = [{"path": j.path, "error": j.last_error, "attempts": j.attempts}
                      for j in (index.failed_jobs(p.name) if index else [])]
            last = meta.last_result if meta else None
            since, moved_files, moved_bytes = (index.run_counters(p.name) if index
                                               else (None, 0, 0))
            # A first sync's uploads have no queue rows: its mark says it runs (one left
            # by a killed syncd does not count: no syncd holds the lock then).
            first_sync = meta.first_sync_since if meta and holder is not None else None
            state = ("stopped by guard" if last == "stopped" else
                     "syncing" if counts.get("leased") or first_sync else
                     "pending" if counts.get("pending") else "idle")
            pairs.append({
                "pair": p.name, "state": state,
                "last_reconcile": (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(meta.last_reconcile))
                                   if meta and meta.last_reconcile else None),
                "last_result": last,
                "first_sync_since": (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(first_sync))
                                     if first_sync else None),
                "tracked": index.count_base(p.name) if index else 0,
                "queued": counts.get("pending", 0), "in_flight": counts.get("leased", 0),
                "failed": failed,
                # Files uploaded or removed and bytes sent by the daemon since it started
                # (its last start, if it is not running).
                "since_start": {"since": (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
                                          if since else None),
                                "files": moved_files, "bytes": moved_bytes},
            })
    finally:
        if index is not None:
            index.close()
    return {"daemon": {"running": running is not None, "pid": running},
            "reconcile_pid": holder[0] if holder is not None and running is None else None,
            "state_dir": str(state_dir), "pairs": pairs}


def _print_status(report: dict[str, Any], verbose: bool = False) -> None:
    from syncd.report import failure_lines

    d = report["daemon"]
    print(f"daemon: {'running, PID ' + str(d['pid']) if d['running'] else 'not running'} "
          f"(state dir {report['state_dir']})")
    if report.get("reconcile_pid"):
        print(f"a reconcile is running (PID {report['reconcile_pid']})")
    for p in report["pairs"]:
        state = p["state"] + (f" (first sync since {p['first_sync_since']})"
                              if p.get("first_sync_since") else "")
        print(f"pair {p['pair']}: {state}; last reconcile {p['last_reconcile'] or 'never'}"
              f" ({p['last_result'] or '-'}); {p['tracked']} entries tracked; "
              f"queued {p['queued']}, in flight {p['in_flight']}, failed {len(p['failed'])}")
        ss = p["since_start"]
        if ss["since"]:
            print(f"  since daemon start ({ss['since']}): {ss['files']} files, "
                  f"{ss['bytes']} bytes")
        for line in failure_lines([(f["path"], f"{f['error']} (after {f['attempts']} attempts)")
                                   for f in p["failed"]], verbose):
            print(line)


def run_reconcile(cfg: Any, names: list[str], *, dry_run: bool = False, as_json: bool = False,
                  verbose: bool = False, allow_mass_delete: bool = False,
                  allow_device_change: bool = False) -> int:
    from syncd.engine import Engine, Options, StateLock
    from syncd.index import Index

    selected = [cfg.pair(n) for n in names] if names else list(cfg.pairs)
    opts = Options(dry_run=dry_run, allow_mass_delete=allow_mass_delete,
                   allow_device_change=allow_device_change)
    with contextlib.suppress(ValueError):   # not the main thread (tests)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)   # `syncd retry` is for the daemon
    with StateLock(cfg.daemon.state_dir):
        index = Index.open(cfg.daemon.state_dir)
        engine = Engine(cfg, index, reporter_factory=_reporter_factory())
        try:
            engine.queue.reclaim(exclusive=True)
            results = [engine.reconcile(p, opts) for p in selected]
        finally:
            engine.close()
            index.close()
    if as_json:
        print(json.dumps({"pairs": [r.to_json() for r in results]}, indent=2))
    else:
        _print_results(results, verbose)
    return _exit_code([r.exit_code for r in results])


def _exit_code(codes: list[int]) -> int:
    """Most urgent first: unreachable remote, then a stopped pair, then failures, then a
    run cut short."""
    for c in (EXIT_REMOTE, EXIT_SAFETY, EXIT_FAILURES, EXIT_INTERRUPTED):
        if c in codes:
            return c
    return EXIT_OK


def _print_results(results: list[Any], verbose: bool = False) -> None:
    from syncd.report import failure_lines, safe
    from syncd.units import format_bytes

    out = sys.stdout
    for r in results:
        if r.status == "planned":
            print(f"pair {r.pair}: plan ({len(r.plan)} actions, dry run: nothing changed)", file=out)
            for a in r.plan:
                print(f"  {a.op.value:<14} {safe(a.path)}" + (f"  ({a.reason})" if a.reason else ""),
                      file=out)
            for line in failure_lines(r.failures, verbose):
                print(line, file=out)
            continue
        head = {"ok": "in sync", "failed": "finished with failures", "stopped": "STOPPED",
                "unavailable": "REMOTE UNAVAILABLE",
                "interrupted": "INTERRUPTED (the next run plans the rest)"}.get(r.status, r.status)
        print(f"pair {r.pair}: {head} — uploaded {r.uploaded} files "
              f"({format_bytes(r.uploaded_bytes)}), deleted {r.deleted}, trashed {r.trashed}, "
              f"adopted {r.adopted}, " + (f"attributes set {r.attrs_set}, " if r.attrs_set else "")
              + f"skipped {r.skipped}, failed {len(r.failures)}, "
              f"{r.duration_s:.2f}s", file=out)
        if r.message and r.status in ("stopped", "unavailable"):
            print(f"  {safe(r.message)}", file=out)
        for line in failure_lines(r.failures, verbose):
            print(line, file=out)


def _reporter_factory() -> Callable[[str, int, int], Any] | None:
    if not sys.stderr.isatty():
        return None

    def make(pair: str, files: int, nbytes: int) -> Any:
        if files < 50 and nbytes < 64 << 20:
            return None
        from syncd.progress import RichReporter

        return RichReporter(pair, files, nbytes)

    return make


@config_app.command("check")
def config_check(config: ConfigOpt = None,
                 as_json: Annotated[bool, typer.Option("--json")] = False,
                 connect: Annotated[bool, typer.Option(
                     "--connect", help="Also connect to every remote and report what it "
                                       "offers (exit 3 if one cannot be used).")] = False,
                 ) -> None:
    """Validate the config and print it resolved, with secrets masked."""

    def go() -> int:
        from syncd.config import config_warnings, to_display

        cfg = _load(config)
        shown = to_display(cfg)
        warnings = config_warnings(cfg)
        probes: dict[str, dict[str, Any]] = {}
        if connect:
            _setup_logs(cfg, None, "json" if as_json else None)
            probes = _probe_remotes(cfg)
        if as_json:
            out = {**shown, "warnings": warnings}
            if connect:
                out["connect"] = probes
            print(json.dumps(out, indent=2))
        else:
            print(f"config OK: {cfg.source}")
            _print_tree(shown, 0)
            for w in warnings:
                print(f"warning: {w}")
            for name, p in probes.items():
                if p["ok"]:
                    extra = ", ".join(f"{k} {v}" for k, v in p.items() if k != "ok")
                    print(f"remote '{name}': OK" + (f" ({extra})" if extra else ""))
                else:
                    print(f"remote '{name}': FAILED: {p['error']}")
        return EXIT_REMOTE if any(not p["ok"] for p in probes.values()) else EXIT_OK

    _guard(go)


@config_app.command("init")
def config_init(path: Annotated[Path | None, typer.Argument(
        help="Where to write it (default: $SYNCD_CONFIG if set, else "
             "$XDG_CONFIG_HOME/syncd/config.toml, i.e. ~/.config/syncd/config.toml).",
        show_default=False)] = None) -> None:
    """Write a commented starting config to edit: one local-directory remote and one pair,
    with SFTP and S3 examples. Never overwrites a file."""

    def go() -> int:
        import shlex

        from syncd.config import init_config_path
        from syncd.starter import write_starting_config

        default = init_config_path().absolute()
        target = path.expanduser().absolute() if path is not None else default
        write_starting_config(target, private_dir=target == default)
        # Only the default place is found without --config.
        opt = "" if target == default else f" --config {shlex.quote(str(target))}"
        steps = [(f"syncd config check{opt}", "validates it, prints it resolved"),
                 (f"syncd reconcile --dry-run{opt}", "shows what would be synced, changes nothing"),
                 (f"syncd reconcile{opt}", f"syncs once; `syncd run{opt}` keeps syncing")]
        width = max(len(cmd) for cmd, _ in steps)
        print(f"wrote a starting config: {target}\nnext steps:\n"
              "  1. edit it: the pair's local tree (local) and the remote's path, or use one "
              "of its SFTP / S3 examples")
        for n, (cmd, why) in enumerate(steps, 2):
            print(f"  {n}. {cmd:<{width}}   ({why})")
        print("every key, its default and what it does: syncd config example")
        return EXIT_OK

    _guard(go)


@config_app.command("example")
def config_example() -> None:
    """Print the full config reference: every key, its default and what it does."""

    def go() -> int:
        from syncd.starter import REFERENCE, package_text

        print(package_text(REFERENCE), end="")
        return EXIT_OK

    _guard(go)


def _probe_remotes(cfg: Any) -> dict[str, dict[str, Any]]:
    from syncd.errors import RemoteError
    from syncd.remotes import open_remote

    out: dict[str, dict[str, Any]] = {}
    for name, rc in cfg.remotes.items():
        r = open_remote(rc, str(cfg.daemon.state_dir))
        try:
            describe = getattr(r, "describe", None)
            if describe is not None:
                info = describe()
            else:
                r.check()
                info = {}
            out[name] = {"ok": True, **info}
        except RemoteError as e:
            out[name] = {"ok": False, "error": str(e)}
        finally:
            r.close()
    return out


def _print_tree(d: Any, depth: int) -> None:
    pad = "  " * depth
    if isinstance(d, dict):
        for k, v in d.items():
            if isinstance(v, (dict, list)) and v:
                print(f"{pad}{k}:")
                _print_tree(v, depth + 1)
            else:
                print(f"{pad}{k}: {json.dumps(v) if not isinstance(v, str) else v}")
    elif isinstance(d, list):
        for item in d:
            if isinstance(item, dict):
                print(f"{pad}-")
                _print_tree(item, depth + 1)
            else:
                print(f"{pad}- {item}")


@app.command()
def demo(directory: Annotated[Path, typer.Option(
    "--dir", help="Where to create the demo (source tree, destination, state, config).")]
        = Path("syncd-demo")) -> None:
    """Create a small demo tree and sync it into a local directory remote, no server needed."""

    def go() -> int:
        from syncd.demo import make_demo

        cfg_path = make_demo(directory)
        cfg = _load(str(cfg_path))
        _setup_logs(cfg, None, None)
        code = run_reconcile(cfg, [])
        print(f"\ndemo config: {cfg_path}\n"
              f"source:      {cfg.pairs[0].local}\n"
              f"destination: {cfg.remotes['demo-nas'].options['path']}\n"
              f"edit files under the source and run:  {sys.argv[0]} reconcile --config {cfg_path}")
        return code

    _guard(go)


class Shell(StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


@app.command()
def completion(shell: Annotated[Shell, typer.Argument(help="bash | zsh | fish")]) -> None:
    """Print the shell completion script for bash, zsh or fish.

    \b
    Load it into this shell:  eval "$(syncd completion bash)"
    Install it for good:
      bash: syncd completion bash > ~/.local/share/bash-completion/completions/syncd
      zsh:  eval "$(syncd completion zsh)"   (in ~/.zshrc, after compinit)
      fish: syncd completion fish > ~/.config/fish/completions/syncd.fish
    or let `syncd --install-completion` set up the shell it runs in."""

    def go() -> int:
        # typer's own script, the one --show-completion prints: it speaks the protocol
        # (_SYNCD_COMPLETE) typer answers. Not documented typer API (typer is pinned <0.21);
        # tests/e2e/test_completion.py runs the script it returns.
        from typer.completion import get_completion_script

        print(get_completion_script(prog_name="syncd", complete_var="_SYNCD_COMPLETE",
                                    shell=shell.value))
        return EXIT_OK

    _guard(go)


@app.command()
def version() -> None:
    """Print the syncd version."""
    from syncd import __version__

    def go() -> int:
        print(f"syncd {__version__}", flush=True)
        return 0

    _guard(go)


index_app = typer.Typer(no_args_is_help=True, help="The state index: rebuild a damaged one.")
app.add_typer(index_app, name="index")


@index_app.command("rebuild")
def index_rebuild(
    config: ConfigOpt = None,
    yes: Annotated[bool, typer.Option(
        "--yes", help="Rebuild even an index that passes the check.")] = False,
) -> None:
    """Check the state index; if it is damaged (or with --yes), keep it aside in the state
    dir and start a new one. Each pair's next run is then a first sync: files equal on
    both sides are adopted, not sent again."""

    def go() -> int:
        from syncd.engine import StateLock
        from syncd.index import rebuild_index

        cfg = _load(config)
        with StateLock(cfg.daemon.state_dir, role="rebuild"):
            r = rebuild_index(cfg.daemon.state_dir, force=yes)
        if r.kept is None:
            print(f"no state index in {cfg.daemon.state_dir}: nothing to rebuild (the next "
                  "run starts one)")
            return EXIT_OK
        why = f"damaged ({r.problem})" if r.problem else "sound (rebuilt as asked: --yes)"
        print(f"state index {r.path} was {why}\n"
              f"  kept as {r.kept}\n"
              f"  a new index was started ({r.pairs_kept} pair(s) keep their recorded root "
              "device and mounts)\n"
              "next: `syncd reconcile --dry-run` shows what the first run will do: files "
              "equal on both sides (size, mtime) are adopted, others sent again, and remote "
              "files not in the local tree removed per each pair's `delete` setting")
        return EXIT_OK

    _guard(go)


# CPython's default collector thresholds (700, 10, 10) start a young collection for every
# 700 net new container objects and a full one each time the heap grows by a quarter: a
# first reconcile of 100k files spent ~0.8 of its ~6 CPU-s collecting (8 full collections
# took 0.55 s), for next to no garbage, since syncd makes few reference cycles. Fewer young
# collections, and the quarter rule still bounds what cyclic garbage can add.
GC_THRESHOLDS = (50_000, 20, 10)


def main() -> None:
    _exit(run_cli())


def run_cli() -> int:
    """The command line, to its exit code (main() then ends the process)."""
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        app()
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)   # as the interpreter would have printed it
        return 1
    return 0


def _exit(code: int) -> NoReturn:
    """After a command that succeeded, end the process without the interpreter's teardown:
    it has closed what it opened (index, remotes, pools, threads it waits for), and
    freeing a 100k-file run's objects one by one took ~30 ms of a 0.55 s no-op. Output
    first; output that cannot be written is an error (141 for a closed pipe, as _guard
    says it, else 120 as Python's own exit does). Any other exit (an interrupt, an error)
    takes the interpreter's usual way out, which also stops what an error path left."""
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError) as e:
            if not isinstance(e, BrokenPipeError):
                _output_failed(e)
            code = code or (EXIT_PIPE if isinstance(e, BrokenPipeError) else EXIT_OUTPUT)
            _to_devnull(f)
    if code != 0:
        sys.exit(code)
    os._exit(0)

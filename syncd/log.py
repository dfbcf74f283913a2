"""structlog setup: JSON lines off a TTY (journald), a readable console on one; redaction."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, TextIO


def _import_structlog() -> Any:
    """structlog imports rich at import time, if installed, only to pretty-print
    tracebacks; we render tracebacks plainly, so rich stays hidden during that one import.
    This saves ~40 ms on every `syncd` start (a no-op reconcile is ~0.8 s in all)."""
    if "structlog" in sys.modules:
        return sys.modules["structlog"]
    hidden = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "rich" or k.startswith("rich.")}
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog as mod
    finally:
        del sys.modules["rich"]
        sys.modules.update(hidden)
    return mod


structlog = _import_structlog()

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}
_SECRET_KEYS = ("password", "secret", "token", "passphrase", "authorization")


class _StderrFile:
    """Looks sys.stderr up on every write, so a progress bar that swaps it still works."""

    def write(self, s: str) -> int:
        return sys.stderr.write(s)

    def flush(self) -> None:
        sys.stderr.flush()


_secret_key_cache: dict[str, bool] = {}


def _is_secret_key(k: str) -> bool:
    v = _secret_key_cache.get(k)
    if v is None:
        v = any(s in k for s in _SECRET_KEYS) and not k.endswith("_env")
        if len(_secret_key_cache) < 4096:
            _secret_key_cache[k] = v
    return v


def _redact(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    for k in event:
        if _is_secret_key(k):
            event[k] = "********"
    return event


def _escape_controls(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """On a terminal, a name's newline or ESC sequence must not print a fake line or drive
    the terminal: string fields are escaped (JSON lines are escaped by their encoder)."""
    from syncd.report import safe

    for k, v in event.items():
        if isinstance(v, str):
            event[k] = safe(v)
        elif isinstance(v, list) and any(isinstance(x, str) for x in v):
            event[k] = [safe(x) if isinstance(x, str) else x for x in v]
    return event


def use_json(fmt: str, stream: TextIO | None = None) -> bool:
    if fmt == "json":
        return True
    if fmt == "console":
        return False
    stream = stream or sys.stderr
    return not (hasattr(stream, "isatty") and stream.isatty())


_min_level = logging.INFO


def enabled(level: str) -> bool:
    """Would an event at `level` be written? Lets hot loops skip building its fields."""
    return _LEVELS[level] >= _min_level


def setup(fmt: str = "auto", level: str = "info") -> None:
    global _min_level
    _min_level = _LEVELS[level]
    json_out = use_json(fmt)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        _redact,
    ]
    if json_out:
        processors += [
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ]
    else:
        processors += [
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False, key="ts"),
            _escape_controls,
            structlog.dev.ConsoleRenderer(colors=True, timestamp_key="ts",
                                          exception_formatter=structlog.dev.plain_traceback),
        ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.WriteLoggerFactory(file=_StderrFile()),
        cache_logger_on_first_use=True,
    )
    # Libraries' own log records (paramiko's "Socket exception: ..." on a dropped
    # connection, say) would reach stderr as plain text through logging's last-resort
    # handler, between the JSON lines. They become debug events instead: what matters of
    # them syncd reports itself, as an error with remote, path and cause.
    logging.root.handlers = [h for h in logging.root.handlers if not isinstance(h, _Forward)]
    logging.root.addHandler(_Forward())
    logging.root.setLevel(logging.DEBUG if _min_level <= logging.DEBUG else logging.WARNING)
    # Their DEBUG records are every packet (paramiko) or whole signed requests (botocore's
    # canonical request carries the session token, urllib3 the URLs of presigned ones):
    # never forwarded, debug level or not.
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.INFO)


_QUIET_LIBRARIES = ("paramiko", "botocore", "boto3", "s3transfer", "urllib3")


class _Forward(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):   # logging must never break a transfer
            get().debug("library_log", logger=record.name, level_name=record.levelname.lower(),
                        message=record.getMessage())


def get(name: str | None = None) -> Any:
    if not structlog.is_configured():
        # Before setup() (a command that logs nothing of its own, such as `config check`,
        # meeting an internal error): still to stderr, never into the command's output.
        setup()
    return structlog.get_logger(name) if name else structlog.get_logger()

"""The syncd exception tree; every error a user can see is one of these.

    SyncdError
     ├── ConfigError          bad config file or key           (exit 2)
     ├── UsageError           bad command-line use             (exit 2)
     ├── LockedError          state dir held by another syncd  (exit 2)
     ├── SafetyError          a guard stopped a pair           (exit 4)
     ├── SourceChanged        local file changed while read    (job re-planned)
     └── RemoteError          carries remote= and path=
          ├── TransientError  worth retrying (timeouts, resets, throttling)
          │    └── ConnectionLost   the remote, not one path: refused, reset, silent,
          │         │               TLS or handshake failure (counts toward unavailable)
          │         └── NotTried    a job given up untried once its batch lost the remote
          └── PermanentError  retrying will not help; the job is parked
               ├── NotFound
               ├── PathEscape        path leaves the remote root
               ├── Conflict          remote kind differs (dir where a file goes)
               ├── RemoteChanged     not the version the plan saw (set_attrs)
               └── UnavailableError  remote cannot be reached / used at all (exit 3)
                    ├── AuthError
                    └── HostKeyError

The queue decides retry vs park by type, never by message text. ConnectionLost and
UnavailableError are about the whole remote: a few in a row make it unavailable (the
circuit breaker), and they never count against a job's attempts.
"""

from __future__ import annotations


class SyncdError(Exception):
    """Base of every error syncd raises on purpose."""

    exit_code = 1


class ConfigError(SyncdError):
    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file = file
        self.key = key
        self.reason = message
        where = ": ".join(x for x in (file, key) if x)
        super().__init__(f"{where}: {message}" if where else message)


class UsageError(SyncdError):
    exit_code = 2


class LockedError(SyncdError):
    exit_code = 2


class SafetyError(SyncdError):
    """A guard stopped a pair before anything was changed."""

    exit_code = 4

    def __init__(self, pair: str, reason: str, override: str, where: str = ""):
        self.pair = pair
        self.reason = reason
        self.override = override
        # A flag is a one-run override; anything else is what to fix before re-running.
        todo = (f"If this is intended, re-run once with {override}" if override.startswith("--")
                else f"To go on: {override}, then re-run")
        at = f" ({where})" if where else ""
        super().__init__(f"pair '{pair}'{at} stopped: {reason}; nothing was changed. {todo}")


class SourceChanged(SyncdError):
    """The local file changed while it was being read; the bytes are not published."""

    def __init__(self, path: str, detail: str = "changed while being read"):
        self.path = path
        self.detail = detail
        super().__init__(f"{path}: {detail}")

    def __reduce__(self) -> tuple[object, ...]:
        return (SourceChanged, (self.path, self.detail))


class RemoteError(SyncdError):
    def __init__(self, message: str, *, remote: str = "", path: str = ""):
        self.remote = remote
        self.path = path
        self.reason = message
        parts = []
        if remote:
            parts.append(f"remote '{remote}'")
        if path:
            parts.append(f"path '{path}'")
        prefix = ", ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields survive pickling (outcomes cross process boundaries).
        return (_rebuild_remote_error, (type(self), self.reason, self.remote, self.path))


def _rebuild_remote_error(cls: type[RemoteError], reason: str, remote: str, path: str) -> RemoteError:
    return cls(reason, remote=remote, path=path)


class TransientError(RemoteError):
    pass


class ConnectionLost(TransientError):
    """The remote itself could not be reached or stopped answering: connection refused or
    reset, a connect, handshake or read timeout, a TLS failure. Not about one path."""


class NotTried(ConnectionLost):
    """Not attempted: an earlier job of the same batch lost the remote. Held like any
    ConnectionLost, but no evidence about the remote (the breaker does not count it)."""


class PermanentError(RemoteError):
    pass


class NotFound(PermanentError):
    pass


class PathEscape(PermanentError):
    pass


class Conflict(PermanentError):
    pass


class RemoteChanged(PermanentError):
    """The remote file is no longer the version the plan compared (its fingerprint moved):
    nothing was changed on it."""


class UnavailableError(PermanentError):
    exit_code = 3


class AuthError(UnavailableError):
    pass


class HostKeyError(UnavailableError):
    pass

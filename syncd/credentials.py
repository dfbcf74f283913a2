"""Secrets kept in files the config points at (`password_file`, `passphrase_file`, a systemd
credential under $CREDENTIALS_DIRECTORY): read when a remote authenticates, never logged,
never part of an error message.

$CREDENTIALS_DIRECTORY is set only in a process systemd starts with LoadCredential= (or
SetCredential=). A config naming it is valid anywhere: where it is unset, the config keeps
the reference as written (CREDENTIALS_REF), `config check` says so, and only reading the
file fails, with what to do.
"""

from __future__ import annotations

import os
import pwd

from syncd.errors import AuthError

CREDENTIALS_VAR = "CREDENTIALS_DIRECTORY"
CREDENTIALS_REF = "${CREDENTIALS_DIRECTORY}"
# A password or passphrase is short; a bigger file is the wrong file (a key, a log).
MAX_SECRET_BYTES = 64 << 10

UNSET_HINT = (f"${CREDENTIALS_VAR} is set only when systemd starts syncd with "
              "LoadCredential=NAME:PATH in its unit (see docs/service.md); to try the config "
              f"by hand, set {CREDENTIALS_VAR} to a directory holding the files, or run it "
              "as the service would: systemd-run --pipe --wait -p LoadCredential=NAME:PATH "
              "syncd config check --connect")


def unresolved(path: str) -> bool:
    """The path still names $CREDENTIALS_DIRECTORY: it was unset when the config loaded."""
    return CREDENTIALS_REF in path


def check_resolved(path: str, remote: str, key: str) -> None:
    if unresolved(path):
        raise AuthError(f"remotes.{remote}.{key} = \"{path}\": {UNSET_HINT}", remote=remote)


def read_secret_file(path: str, remote: str, key: str) -> str:
    """The file's text, one trailing newline ("\\n" or "\\r\\n") removed: `echo pw > f`
    and editors add one that is not part of the secret."""
    check_resolved(path, remote, key)
    where = f"remotes.{remote}.{key} = \"{path}\""
    systemd = (f"; under systemd, check that the unit's LoadCredential= provides "
               f"{os.path.basename(path)}" if os.environ.get(CREDENTIALS_VAR)
               and path.startswith(os.environ[CREDENTIALS_VAR]) else "")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SECRET_BYTES + 1)
    except FileNotFoundError:
        raise AuthError(f"{where}: the file does not exist; create it holding only the "
                        f"secret, or fix the path{systemd}", remote=remote) from None
    except PermissionError:
        raise AuthError(f"{where}: the file is not readable by user {_user()}; make it "
                        "readable by that user alone (chown, chmod 0400), or hand it to the "
                        "service with LoadCredential=, which gives it a copy it can read",
                        remote=remote) from None
    except OSError as e:
        raise AuthError(f"{where}: cannot read the file: {e.strerror}", remote=remote) from None
    if len(raw) > MAX_SECRET_BYTES:
        raise AuthError(f"{where}: the file is over {MAX_SECRET_BYTES >> 10} KiB, not a "
                        "password or passphrase; point it at a file holding only the secret",
                        remote=remote)
    if raw.endswith(b"\r\n"):
        raw = raw[:-2]
    elif raw.endswith(b"\n"):
        raw = raw[:-1]
    if not raw:
        raise AuthError(f"{where}: the file is empty; write the secret into it",
                        remote=remote)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthError(f"{where}: the file is not UTF-8 text", remote=remote) from None


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:   # no name for this uid (a container without it in /etc/passwd)
        return f"uid {os.geteuid()}"

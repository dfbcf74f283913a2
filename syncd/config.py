"""TOML config → validated, typed objects; defaults; lookup order; secret masking.

Validation is hand-written on purpose: it keeps start-up cheap (no pydantic import on
every `syncd reconcile`) and lets every message name the file, the key path
(`sync[1].remote`) and a fix.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import os
import posixpath
import re
import socket
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from syncd import credentials
from syncd.errors import ConfigError
from syncd.units import parse_duration

REMOTE_TYPES = ("local", "sftp", "s3", "ftp")
IMPLEMENTED_REMOTE_TYPES = ("local", "sftp", "s3", "ftp")
MODES = ("push", "pull", "bidirectional")
IMPLEMENTED_MODES = ("push",)
DELETE_POLICIES = ("trash", "propagate", "keep")
LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
SECRET_HINTS = ("password", "secret", "token", "passphrase", "key_id")


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    state_dir: Path = field(default_factory=lambda: Path("~/.local/state/syncd").expanduser())
    log_format: str = "auto"
    log_level: str = "info"
    retry_initial: float = 1.0
    retry_max: float = 300.0
    max_attempts: int = 10
    lease_timeout: float = 600.0
    debounce: float = 0.25
    max_delay: float = 5.0
    full_reconcile_interval: float = 3600.0
    shutdown_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class RemoteConfig:
    name: str
    type: str
    transfers: int = 4
    # type-specific settings, validated by the backend's own schema below
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def location(self) -> str:
        """Where the remote's files are, not its name here: renaming the section keeps a
        pair's sync history, pointing it elsewhere does not."""
        o = self.options
        if self.type == "local":
            return f"local {o.get('path')}"
        if self.type in ("sftp", "ftp"):
            return f"{self.type} {o.get('user')}@{o.get('host')}:{o.get('port')} {o.get('root')}"
        if self.type == "s3":
            return f"s3 {o.get('endpoint_url') or 'aws'} {o.get('bucket')} {o.get('prefix')}"
        return f"{self.type} {self.name}"


# S3 storage classes whose objects cannot be copied (so not trashed) before a restore.
ARCHIVE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")


@dataclass(frozen=True, slots=True)
class MaxDelete:
    """Either an absolute count or a percentage of the entries the pair tracks."""

    count: int | None = None
    percent: float | None = None

    def limit(self, tracked: int) -> int:
        if self.count is not None:
            return self.count
        assert self.percent is not None
        return math.ceil(tracked * self.percent / 100)

    def __str__(self) -> str:
        return f"{self.count}" if self.count is not None else f"{self.percent:g}%"


@dataclass(frozen=True, slots=True)
class PairConfig:
    name: str
    local: Path
    remote: str
    path: str
    mode: str = "push"
    delete: str = "trash"
    max_delete: MaxDelete = MaxDelete(percent=50.0)
    ignore: tuple[str, ...] = ()
    follow_symlinks: bool = False


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    daemon: DaemonConfig
    remotes: dict[str, RemoteConfig]
    pairs: tuple[PairConfig, ...]

    def pair(self, name: str) -> PairConfig:
        for p in self.pairs:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.pairs) or "(none)"
        raise ConfigError(f"unknown pair '{name}'; known: {known}", file=self.source)


# --- lookup -------------------------------------------------------------------------------


def find_config(explicit: str | None, env: dict[str, str] | None = None) -> Path:
    """--config, then $SYNCD_CONFIG, then $XDG_CONFIG_HOME/syncd/config.toml, then /etc."""
    env = dict(os.environ) if env is None else env
    if explicit:
        return Path(explicit).expanduser()
    if env.get("SYNCD_CONFIG"):
        return Path(env["SYNCD_CONFIG"]).expanduser()
    candidates = [user_config_path(env), SYSTEM_CONFIG]
    for c in candidates:
        try:
            if c.exists():
                return c
        except OSError as e:   # a directory on the way this user cannot search
            raise ConfigError(f"cannot look for the config file: {e.strerror}; pass "
                              "--config or set $SYNCD_CONFIG", file=str(c)) from None
    tried = ", ".join(str(c) for c in candidates)
    raise ConfigError(
        f"no config file found (tried --config, $SYNCD_CONFIG, {tried}); "
        f"`syncd config init` writes a starting config to {candidates[0]}, "
        "`syncd demo` tries syncd on a demo folder"
    )


SYSTEM_CONFIG = Path("/etc/syncd/config.toml")


def user_config_path(env: dict[str, str] | None = None) -> Path:
    """A user's own config: $XDG_CONFIG_HOME/syncd/config.toml (~/.config without it)."""
    env = dict(os.environ) if env is None else env
    xdg = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")).expanduser() / ".config")
    return Path(xdg) / "syncd" / "config.toml"


def init_config_path(env: dict[str, str] | None = None) -> Path:
    """Where `syncd config init` writes by default: the first place the lookup reads that
    belongs to the user ($SYNCD_CONFIG if set, else the XDG location)."""
    env = dict(os.environ) if env is None else env
    if env.get("SYNCD_CONFIG"):
        return Path(env["SYNCD_CONFIG"]).expanduser()
    return user_config_path(env)


def load_config(path: Path, env: dict[str, str] | None = None) -> Config:
    src = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("file does not exist", file=src) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", file=src) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", file=src) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"invalid TOML: {e}", file=src) from None
    return parse_config(data, src, dict(os.environ) if env is None else env)


# --- validation ---------------------------------------------------------------------------


class _V:
    """Validation helpers bound to one file, so every error carries file and key path."""

    def __init__(self, source: str, env: dict[str, str]):
        self.source = source
        self.env = env

    def fail(self, key: str, msg: str) -> ConfigError:
        return ConfigError(msg, file=self.source, key=key)

    def table(self, value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, got {_tname(value)}")
        return value

    def no_unknown(self, table: dict[str, Any], allowed: tuple[str, ...], key: str) -> None:
        for k in table:
            if k not in allowed:
                hint = difflib.get_close_matches(k, allowed, n=1)
                did = f"; did you mean '{hint[0]}'?" if hint else f"; allowed: {', '.join(allowed)}"
                raise self.fail(_join(key, k), f"unknown key{did}")

    def string(self, table: dict[str, Any], k: str, key: str, default: str | None = None) -> str:
        if k not in table:
            if default is None:
                raise self.fail(_join(key, k), "missing (required)")
            return default
        v = table[k]
        if not isinstance(v, str):
            raise self.fail(_join(key, k), f"must be a string, got {_tname(v)}")
        return v

    def choice(self, table: dict[str, Any], k: str, key: str, choices: tuple[str, ...],
               default: str | None = None) -> str:
        v = self.string(table, k, key, default)
        if v not in choices:
            raise self.fail(_join(key, k), f"'{v}' is not one of: {', '.join(choices)}")
        return v

    def boolean(self, table: dict[str, Any], k: str, key: str, default: bool) -> bool:
        v = table.get(k, default)
        if not isinstance(v, bool):
            raise self.fail(_join(key, k), f"must be true or false, got {_tname(v)}")
        return v

    def integer(self, table: dict[str, Any], k: str, key: str, default: int, lo: int = 0,
                hi: int | None = None) -> int:
        v = table.get(k, default)
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(_join(key, k), f"must be an integer, got {_tname(v)}")
        if v < lo or (hi is not None and v > hi):
            rng = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise self.fail(_join(key, k), f"{v} is out of range; must be {rng}")
        return v

    def parsed(self, table: dict[str, Any], k: str, key: str, default: str,
               parse: Callable[[str], Any], least: str | None = None) -> Any:
        """`least`: the smallest value allowed, written as in the file ("1m"); "0" means
        more than zero."""
        v = table.get(k, default)
        if not isinstance(v, str):
            raise self.fail(_join(key, k), f"must be a string like \"{default}\", got {_tname(v)}")
        try:
            out = parse(v)
        except ValueError as e:
            raise self.fail(_join(key, k), str(e)) from None
        if least == "0" and out <= 0:
            raise self.fail(_join(key, k), f"\"{v}\": must be more than 0")
        if least not in (None, "0") and out < parse(least):
            raise self.fail(_join(key, k), f"\"{v}\" is too short: must be at least {least}")
        return out

    def path(self, table: dict[str, Any], k: str, key: str, default: str | None = None,
             credential: bool = False) -> Path:
        """`credential`: a file systemd may provide; "${CREDENTIALS_DIRECTORY}" in it stays
        as written where the variable is unset (see syncd.credentials)."""
        raw = self.string(table, k, key, default)
        expanded = self.expand(raw, _join(key, k), credential)
        if not expanded:
            raise self.fail(_join(key, k), "must not be empty")
        p = Path(expanded)
        if credentials.unresolved(expanded):
            return p   # an absolute directory once set; nothing to resolve now
        if not p.is_absolute():
            # Relative paths are relative to the config file, so a config works from any cwd.
            p = Path(self.source).absolute().parent / p
        return Path(os.path.normpath(p))

    def expand(self, raw: str, key: str, credential: bool = False) -> str:
        """~ and $VAR / ${VAR}; an unset variable is an error, not an empty string (but
        see `path`'s `credential`)."""
        import re

        def sub(m: re.Match[str]) -> str:
            name = m.group(1) or m.group(2)
            if name not in self.env:
                if credential and name == credentials.CREDENTIALS_VAR:
                    return credentials.CREDENTIALS_REF
                raise self.fail(key, f"environment variable ${name} is not set")
            return self.env[name]

        out = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)", sub, raw)
        if out.startswith("~"):
            home = self.env.get("HOME")
            out = (home + out[1:]) if (home and out[:2] in ("~", "~/")) else os.path.expanduser(out)
        return out


def _join(key: str, k: str) -> str:
    return f"{key}.{k}" if key else k


def _tname(v: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "an array", dict: "a table"}.get(type(v), type(v).__name__)


DAEMON_KEYS = ("state_dir", "log_format", "log_level", "retry_initial", "retry_max",
               "max_attempts", "lease_timeout", "debounce", "max_delay",
               "full_reconcile_interval", "shutdown_timeout")
PAIR_KEYS = ("name", "local", "remote", "path", "mode", "delete", "max_delete", "ignore",
             "follow_symlinks")
REMOTE_COMMON_KEYS = ("type", "transfers")
REMOTE_TYPE_KEYS: dict[str, tuple[str, ...]] = {
    "local": ("path", "fsync"),
    "sftp": ("host", "port", "user", "root", "key_file", "passphrase_env", "passphrase_file",
             "password_env", "password_file", "use_agent", "known_hosts", "host_key_policy",
             "timeout", "fsync", "connections"),
    "s3": ("bucket", "prefix", "region", "endpoint_url", "profile", "addressing_style",
           "storage_class", "sse", "sse_kms_key_id", "multipart_threshold",
           "multipart_chunksize", "timeout"),
    "ftp": ("host", "port", "user", "password_env", "password_file", "root", "tls", "ca_file",
            "passive", "timeout"),
}
S3_SECRET_KEYS = ("aws_access_key_id", "aws_secret_access_key", "access_key", "secret_key",
                  "secret_access_key", "session_token")
HOST_KEY_POLICIES = ("strict", "accept-new")
# Secrets never live in the config file: these keys get a pointer to the *_file and *_env
# keys instead.
SECRET_KEYS = {"password": "password_env", "passphrase": "passphrase_env"}
# Keys naming a file the secret is read from (a systemd credential, typically).
SECRET_FILE_KEYS = ("key_file", "password_file", "passphrase_file")


def parse_config(data: dict[str, Any], source: str, env: dict[str, str]) -> Config:
    v = _V(source, env)
    v.no_unknown(data, ("daemon", "remotes", "sync"), "")
    daemon = _parse_daemon(v, v.table(data.get("daemon", {}), "daemon"))
    remotes = _parse_remotes(v, v.table(data.get("remotes", {}), "remotes"))
    raw_pairs = data.get("sync", [])
    if not isinstance(raw_pairs, list):
        raise v.fail("sync", "must be an array of tables: write [[sync]] (double brackets)")
    if not raw_pairs:
        raise v.fail("sync", "no [[sync]] pairs defined; add at least one")
    pairs = tuple(_parse_pair(v, v.table(p, f"sync[{i}]"), f"sync[{i}]", remotes)
                  for i, p in enumerate(raw_pairs))
    seen: dict[str, int] = {}
    for i, p in enumerate(pairs):
        if p.name in seen:
            raise v.fail(f"sync[{i}].name", f"duplicate pair name '{p.name}' "
                         f"(also sync[{seen[p.name]}].name)")
        seen[p.name] = i
    _check_overlaps(v, pairs, remotes)
    _check_state_dir(v, daemon.state_dir, pairs, remotes)
    return Config(source=source, daemon=daemon, remotes=remotes, pairs=pairs)


def _parse_daemon(v: _V, t: dict[str, Any]) -> DaemonConfig:
    v.no_unknown(t, DAEMON_KEYS, "daemon")
    d = DaemonConfig()
    state_dir = v.path(t, "state_dir", "daemon", "~/.local/state/syncd")
    retry_initial = v.parsed(t, "retry_initial", "daemon", "1s", parse_duration)
    retry_max = v.parsed(t, "retry_max", "daemon", "5m", parse_duration)
    if retry_max < retry_initial:
        raise v.fail("daemon.retry_max", "must be at least daemon.retry_initial")
    out = DaemonConfig(
        state_dir=state_dir,
        log_format=v.choice(t, "log_format", "daemon", LOG_FORMATS, d.log_format),
        log_level=v.choice(t, "log_level", "daemon", LOG_LEVELS, d.log_level),
        retry_initial=retry_initial,
        retry_max=retry_max,
        max_attempts=v.integer(t, "max_attempts", "daemon", d.max_attempts, lo=1, hi=1000),
        lease_timeout=v.parsed(t, "lease_timeout", "daemon", "10m", parse_duration, "1s"),
        debounce=v.parsed(t, "debounce", "daemon", "250ms", parse_duration),
        max_delay=v.parsed(t, "max_delay", "daemon", "5s", parse_duration, "10ms"),
        # Zero in these would make the daemon spin (a full reconcile, remote listing
        # included, back to back; on S3 every listing is billed) or never wait for a write
        # to settle.
        full_reconcile_interval=v.parsed(t, "full_reconcile_interval", "daemon", "1h",
                                         parse_duration, "1m"),
        shutdown_timeout=v.parsed(t, "shutdown_timeout", "daemon", "30s", parse_duration),
    )
    return out


def _parse_remotes(v: _V, t: dict[str, Any]) -> dict[str, RemoteConfig]:
    out: dict[str, RemoteConfig] = {}
    for name, raw in t.items():
        key = f"remotes.{name}"
        r = v.table(raw, key)
        typ = v.choice(r, "type", key, REMOTE_TYPES)
        if typ == "s3":
            for k in S3_SECRET_KEYS:
                if k in r:
                    raise v.fail(f"{key}.{k}", "credentials are never read from the config "
                                 "file; use the AWS chain: a profile (profile = \"NAME\"), "
                                 "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in the environment, "
                                 "or an instance role")
        for k, instead in SECRET_KEYS.items():
            if k in r and instead in REMOTE_TYPE_KEYS.get(typ, ()):
                raise v.fail(f"{key}.{k}", f"secrets are never read from the config file; put "
                             f"it in a file and set {k}_file = \"PATH\" (a systemd credential: "
                             f"\"${{CREDENTIALS_DIRECTORY}}/NAME\"), or in an environment "
                             f"variable and set {instead} = \"VAR_NAME\"")
        if typ not in IMPLEMENTED_REMOTE_TYPES:
            raise v.fail(f"{key}.type", f"remote type '{typ}' is not available in this version "
                         f"of syncd (available: {', '.join(IMPLEMENTED_REMOTE_TYPES)})")
        v.no_unknown(r, REMOTE_COMMON_KEYS + REMOTE_TYPE_KEYS[typ], key)
        transfers = v.integer(r, "transfers", key, 4, lo=1, hi=64)
        options: dict[str, Any] = {}
        if typ == "local":
            options["path"] = v.path(r, "path", key)
            options["fsync"] = v.boolean(r, "fsync", key, True)
        elif typ == "sftp":
            options.update(_parse_sftp(v, r, key))
        elif typ == "s3":
            options.update(_parse_s3(v, r, key))
        elif typ == "ftp":
            options.update(_parse_ftp(v, r, key))
        out[name] = RemoteConfig(name=name, type=typ, transfers=transfers, options=options)
    return out


def _parse_sftp(v: _V, r: dict[str, Any], key: str) -> dict[str, Any]:
    o: dict[str, Any] = {
        "host": _host(v, r, key),
        "port": v.integer(r, "port", key, 22, lo=1, hi=65535),
        "user": v.string(r, "user", key, ""),
        "root": v.string(r, "root", key, ".") or ".",
        "key_file": _secret_file(v, r, "key_file", key),
        "use_agent": v.boolean(r, "use_agent", key, True),
        "known_hosts": str(v.path(r, "known_hosts", key, "~/.ssh/known_hosts")),
        "host_key_policy": v.choice(r, "host_key_policy", key, HOST_KEY_POLICIES, "strict"),
        "timeout": v.parsed(r, "timeout", key, "30s", parse_duration, "0"),
        "fsync": v.boolean(r, "fsync", key, False),
        "connections": v.integer(r, "connections", key, 2, lo=1, hi=16),
    }
    for secret in ("passphrase", "password"):
        o.update(_secret_source(v, r, secret, key))
    return o


def _secret_file(v: _V, r: dict[str, Any], k: str, key: str) -> str:
    # "" is unset, as for the *_env keys; key_file = "" stays an error (a path was meant).
    if k not in r or (k != "key_file" and r[k] == ""):
        return ""
    return str(v.path(r, k, key, credential=True))


def _secret_source(v: _V, r: dict[str, Any], secret: str, key: str) -> dict[str, str]:
    """SECRET_env and SECRET_file: at most one of them (which would win is not obvious)."""
    env, file = f"{secret}_env", f"{secret}_file"
    out = {env: _env_name(v, r, env, key), file: _secret_file(v, r, file, key)}
    if out[env] and out[file]:
        raise v.fail(f"{key}.{file}", f"and {env} are both set; keep one: {file} to read the "
                     f"{secret} from a file (a systemd credential), or {env} to read it from "
                     "an environment variable")
    return out


def _host(v: _V, r: dict[str, Any], key: str) -> str:
    host = v.string(r, "host", key).strip()
    if not host or any(c.isspace() for c in host) or "@" in host or "/" in host:
        raise v.fail(f"{key}.host", f"'{host}' is not a host name or address (put the user "
                     "in 'user' and the port in 'port')")
    return host


def _env_name(v: _V, r: dict[str, Any], k: str, key: str) -> str:
    name = v.string(r, k, key, "")
    if name and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        # Not echoed: a user may have pasted the secret itself here.
        raise v.fail(f"{key}.{k}", "is not an environment variable name; give the "
                     "variable's name (e.g. \"SYNCD_BACKUP_PASSWORD\"), not its value")
    return name


def _parse_ftp(v: _V, r: dict[str, Any], key: str) -> dict[str, Any]:
    tls = v.choice(r, "tls", key, ("explicit", "implicit", "none"), "explicit")
    o: dict[str, Any] = {
        "host": _host(v, r, key),
        "port": v.integer(r, "port", key, 990 if tls == "implicit" else 21, lo=1, hi=65535),
        "user": v.string(r, "user", key, "anonymous") or "anonymous",
        **_secret_source(v, r, "password", key),
        "root": v.string(r, "root", key, "/") or "/",
        "tls": tls,
        "ca_file": str(v.path(r, "ca_file", key)) if r.get("ca_file") else "",
        "passive": v.boolean(r, "passive", key, True),
        "timeout": v.parsed(r, "timeout", key, "30s", parse_duration, "0"),
    }
    if o["ca_file"] and not os.path.isfile(o["ca_file"]):
        raise v.fail(f"{key}.ca_file", f"{o['ca_file']} is not a readable file (a PEM bundle "
                     "of CA certificates)")
    if o["ca_file"] and tls == "none":
        raise v.fail(f"{key}.ca_file", "has no effect with tls = \"none\"")
    return o


def _parse_s3(v: _V, r: dict[str, Any], key: str) -> dict[str, Any]:
    from syncd.units import parse_size

    bucket = v.string(r, "bucket", key).strip()
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{1,254}", bucket):
        raise v.fail(f"{key}.bucket", f"'{bucket}' is not a bucket name (lower-case letters, "
                     "digits, '.', '-'; no s3:// prefix, no path)")
    prefix = v.string(r, "prefix", key, "").strip("/")
    if prefix:
        prefix = _clean_remote_path(v, prefix, f"{key}.prefix")
    o: dict[str, Any] = {
        "bucket": bucket, "prefix": prefix,
        "region": v.string(r, "region", key, ""),
        "endpoint_url": v.string(r, "endpoint_url", key, ""),
        "profile": v.string(r, "profile", key, ""),
        "addressing_style": v.choice(r, "addressing_style", key, ("auto", "path", "virtual"), "auto"),
        "storage_class": _storage_class(v, r, key),
        "sse": v.choice(r, "sse", key, ("", "AES256", "aws:kms"), ""),
        "sse_kms_key_id": v.string(r, "sse_kms_key_id", key, ""),
        "multipart_threshold": v.parsed(r, "multipart_threshold", key, "64MiB", parse_size),
        "multipart_chunksize": v.parsed(r, "multipart_chunksize", key, "8MiB", parse_size),
        "timeout": v.parsed(r, "timeout", key, "60s", parse_duration, "0"),
    }
    if o["endpoint_url"] and not re.match(r"https?://", o["endpoint_url"]):
        raise v.fail(f"{key}.endpoint_url", "must start with http:// or https://")
    if "@" in o["endpoint_url"].partition("://")[2].partition("/")[0]:
        raise v.fail(f"{key}.endpoint_url", "credentials are never read from the config file "
                     "(they would show in logs and `config check`); use the AWS chain")
    if o["multipart_chunksize"] < 5 << 20:
        raise v.fail(f"{key}.multipart_chunksize", "S3 parts are at least 5MiB")
    if o["multipart_chunksize"] > 512 << 20:
        raise v.fail(f"{key}.multipart_chunksize", "at most 512MiB: each upload holds 8 parts "
                     "in memory at once")
    if o["multipart_threshold"] < o["multipart_chunksize"]:
        raise v.fail(f"{key}.multipart_threshold", "must be at least multipart_chunksize")
    if o["multipart_threshold"] > 1 << 30:
        raise v.fail(f"{key}.multipart_threshold", "at most 1GiB: a file below it is sent in "
                     "one PUT, read into memory whole")
    if o["sse_kms_key_id"] and o["sse"] != "aws:kms":
        raise v.fail(f"{key}.sse_kms_key_id", "only with sse = \"aws:kms\"")
    return o


def _parse_pair(v: _V, t: dict[str, Any], key: str, remotes: dict[str, RemoteConfig]) -> PairConfig:
    v.no_unknown(t, PAIR_KEYS, key)
    name = v.string(t, "name", key)
    if not name or "/" in name or name.startswith("-") or not name.isprintable():
        raise v.fail(f"{key}.name", f"'{name}' is not a usable name (non-empty, no '/', "
                     "not starting with '-')")
    remote = v.string(t, "remote", key)
    if remote not in remotes:
        known = ", ".join(remotes) or "(none defined; add a [remotes.NAME] table)"
        raise v.fail(f"{key}.remote", f"unknown remote '{remote}'; known: {known}")
    rpath = v.string(t, "path", key, "")
    rpath = _clean_remote_path(v, rpath, f"{key}.path")
    mode = v.choice(t, "mode", key, MODES, "push")
    if mode not in IMPLEMENTED_MODES:
        raise v.fail(f"{key}.mode", f"mode '{mode}' is not available in this version of syncd "
                     f"(available: {', '.join(IMPLEMENTED_MODES)})")
    ignore_raw = t.get("ignore", [])
    if not isinstance(ignore_raw, list) or not all(isinstance(x, str) for x in ignore_raw):
        raise v.fail(f"{key}.ignore", "must be an array of strings (gitignore patterns)")
    try:
        import pathspec

        pathspec.GitIgnoreSpec.from_lines(ignore_raw)
    except Exception as e:  # pathspec raises several types for bad patterns
        raise v.fail(f"{key}.ignore", f"invalid pattern: {e}") from None
    delete = v.choice(t, "delete", key, DELETE_POLICIES, "trash")
    rc = remotes[remote]
    archive = str(rc.options.get("storage_class", "")).upper() if rc.type == "s3" else ""
    if delete == "trash" and archive in ARCHIVE_CLASSES:
        # Trashing copies the object; S3 refuses to copy an archived one until restored.
        raise v.fail(f"{key}.delete", f"\"trash\" (the default) cannot work with remote "
                     f"'{remote}': S3 refuses to copy objects stored as {archive}; set "
                     "delete = \"keep\" or \"propagate\" for this pair (or a bucket "
                     "versioning / lifecycle rule to keep old versions)")
    return PairConfig(
        name=name,
        local=v.path(t, "local", key),
        remote=remote,
        path=rpath,
        mode=mode,
        delete=delete,
        max_delete=_parse_max_delete(v, t.get("max_delete", "50%"), f"{key}.max_delete"),
        ignore=tuple(ignore_raw),
        follow_symlinks=v.boolean(t, "follow_symlinks", key, False),
    )


def _clean_remote_path(v: _V, raw: str, key: str) -> str:
    parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".")]
    if raw.startswith("/"):
        raise v.fail(key, f"'{raw}' must be relative to the remote's root (no leading '/')")
    if ".." in parts:
        raise v.fail(key, f"'{raw}' must not contain '..'")
    if any(p.startswith(".syncd-") for p in parts):
        raise v.fail(key, f"'{raw}': names starting with '.syncd-' are reserved")
    return "/".join(parts)


def _parse_max_delete(v: _V, raw: Any, key: str) -> MaxDelete:
    if isinstance(raw, int) and not isinstance(raw, bool):
        if raw < 0:
            raise v.fail(key, "must not be negative")
        return MaxDelete(count=raw)
    if isinstance(raw, str):
        s = raw.strip()
        try:
            if s.endswith("%"):
                pct = float(s[:-1])
                if not 0 <= pct <= 100:
                    raise ValueError
                return MaxDelete(percent=pct)
            n = int(s)
            if n < 0:
                raise ValueError
            return MaxDelete(count=n)
        except ValueError:
            pass
    raise v.fail(key, f"{raw!r} is not a count (e.g. 100) or a percentage (e.g. \"50%\")")


def _storage_class(v: _V, r: dict[str, Any], key: str) -> str:
    """AWS's names are upper case (STANDARD_IA); S3-compatible services may define their
    own, so only the form is checked: a lower-case or spaced name fails every upload."""
    sc = v.string(r, "storage_class", key, "STANDARD")
    if sc and not re.fullmatch(r"[A-Z][A-Z0-9_-]*", sc):   # "": the bucket's default
        raise v.fail(f"{key}.storage_class",
                     f"{sc!r} is not a storage class name: upper case, e.g. STANDARD, "
                     "STANDARD_IA, INTELLIGENT_TIERING, GLACIER_IR (the service's own names "
                     "for S3-compatible ones)")
    return sc


def _check_overlaps(v: _V, pairs: tuple[PairConfig, ...], remotes: dict[str, RemoteConfig]) -> None:
    """Two pairs writing the same remote subtree would fight; refuse it up front."""
    places = [_place(remotes[p.remote], p.path) for p in pairs]
    hosts = _Hosts()
    for i, a in enumerate(pairs):
        for j in range(i + 1, len(pairs)):
            b = pairs[j]
            (sa, da), (sb, db) = places[i], places[j]
            if not (da == db or db.startswith(da + "/") or da.startswith(db + "/")
                    or da in ("", "/") or db in ("", "/")):
                continue
            if sa != sb and not hosts.same_server(remotes[a.remote], remotes[b.remote]):
                continue
            where = (f"on remote '{a.remote}'" if a.remote == b.remote else
                     f"on remote '{a.remote}', the same place as remote '{b.remote}'")
            raise v.fail(f"sync[{j}].path", f"remote path '{b.path}' overlaps pair "
                         f"'{a.name}' (path '{a.path}') {where}")
    for i, p in enumerate(pairs):
        root = local_destination(remotes[p.remote], p)
        if root is not None and (_inside(root, p.local) or _inside(p.local, root)):
            raise v.fail(f"sync[{i}].local", f"local root {p.local} and remote directory "
                         f"{root} overlap; one would sync into the other")


def local_destination(r: RemoteConfig, p: PairConfig) -> Path | None:
    """The directory a pair writes in, when its remote is a local directory."""
    return Path(r.options["path"], p.path) if r.type == "local" else None


def _check_state_dir(v: _V, state_dir: Path, pairs: tuple[PairConfig, ...],
                     remotes: dict[str, RemoteConfig]) -> None:
    """The state dir inside a pair's remote directory would be listed as remote content
    the local tree lacks: each run would remove syncd's own index, lock and temp tag. A
    pair rooted at the state dir itself would upload the index as it is written. (Inside
    a local root, deeper than its top, it is harmless: every pair ignores it there.)"""
    for i, p in enumerate(pairs):
        dest = local_destination(remotes[p.remote], p)
        if dest is not None and _inside(state_dir, dest):
            raise v.fail("daemon.state_dir", f"{state_dir} is inside the remote directory "
                         f"{dest} of pair '{p.name}' (sync[{i}]): each run would remove "
                         "syncd's own index and lock from it. Set [daemon] state_dir to a "
                         "directory outside every remote directory (the default is "
                         "~/.local/state/syncd)")
        if state_dir.resolve() == p.local.resolve():
            raise v.fail(f"sync[{i}].local", f"local root {p.local} is the state dir "
                         "([daemon] state_dir): syncd's own index would be synced as it is "
                         "written. Point the pair or the state dir elsewhere")


def _place(r: RemoteConfig, pair_path: str) -> tuple[str, str]:
    """(server, directory) a pair writes in, for comparing pairs across remote sections:
    two names for one directory, or one remote's root inside another's, are one place."""
    o = r.options
    if r.type == "local":
        return "local", str(Path(o["path"], pair_path).resolve())
    if r.type in ("sftp", "ftp"):
        root = o.get("root") or ""
        d = posixpath.normpath(posixpath.join(root or ".", pair_path))
        d = "" if d == "." else d   # the login's home itself: the whole remote
        return _server(r), d
    if r.type == "s3":
        d = "/".join(x for x in (str(o.get("prefix") or "").strip("/"), pair_path) if x)
        return f"s3 {o.get('endpoint_url') or 'aws'} {o.get('bucket')}", d
    return f"{r.type} {r.name}", pair_path


def _server(r: RemoteConfig, host: str | None = None) -> str:
    o = r.options
    # A relative root is under the login's home: another user, another place.
    who = "" if str(o.get("root") or "").startswith("/") else f"{o.get('user')}@"
    return f"{r.type} {who}{(host or str(o.get('host'))).lower()}:{o.get('port')}"


class _Hosts:
    """Whether two SFTP or FTP remotes written with different host names (127.0.0.1 and
    localhost) are one server: the same port and login and a resolved address in common.
    Looked up only for pairs whose paths would overlap, each host once; a host that does
    not resolve in time is compared as written."""

    TIMEOUT = 2.0

    def __init__(self) -> None:
        self.known: dict[tuple[str, int], frozenset[str]] = {}

    def same_server(self, a: RemoteConfig, b: RemoteConfig) -> bool:
        if a.type != b.type or a.type not in ("sftp", "ftp"):
            return False
        if _server(a, "-") != _server(b, "-"):   # another port, or another login's home
            return False
        port = int(a.options.get("port") or 0)
        return bool(self.addresses(str(a.options.get("host")), port)
                    & self.addresses(str(b.options.get("host")), port))

    def addresses(self, host: str, port: int) -> frozenset[str]:
        key = (host.lower(), port)
        if key not in self.known:
            self.known[key] = _resolve(host, port, self.TIMEOUT)
        return self.known[key]


def _resolve(host: str, port: int, timeout: float) -> frozenset[str]:
    """The addresses `host` resolves to; none when it does not resolve within `timeout`
    (the lookup goes on in a daemon thread: a hung resolver never holds up a command)."""
    found: list[frozenset[str]] = []

    def look() -> None:
        with contextlib.suppress(OSError, UnicodeError, ValueError):
            found.append(frozenset(str(ai[4][0]) for ai in socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM)))

    t = threading.Thread(target=look, daemon=True, name="resolve")
    t.start()
    t.join(timeout)
    return found[0] if found else frozenset()


def _inside(a: Path, b: Path) -> bool:
    try:
        a.resolve().relative_to(b.resolve())
        return True
    except ValueError:
        return False


# --- display ------------------------------------------------------------------------------


def to_display(cfg: Config) -> dict[str, Any]:
    """The resolved config as plain data, secrets masked (for `syncd config check`)."""

    def mask(k: str, val: Any) -> Any:
        # A *_env or *_file key names where the secret is, not the secret.
        if any(h in k for h in SECRET_HINTS) and not k.endswith(("_env", "_file")) and val:
            return "********"
        return str(val) if isinstance(val, Path) else val

    d = cfg.daemon
    return {
        "config_file": cfg.source,
        "daemon": {
            "state_dir": str(d.state_dir), "log_format": d.log_format, "log_level": d.log_level,
            "retry_initial": f"{d.retry_initial:g}s", "retry_max": f"{d.retry_max:g}s",
            "max_attempts": d.max_attempts, "lease_timeout": f"{d.lease_timeout:g}s",
            "debounce": f"{d.debounce:g}s", "max_delay": f"{d.max_delay:g}s",
            "full_reconcile_interval": f"{d.full_reconcile_interval:g}s",
            "shutdown_timeout": f"{d.shutdown_timeout:g}s",
        },
        "remotes": {
            name: {"type": r.type, "transfers": r.transfers,
                   **{k: mask(k, val) for k, val in r.options.items()}}
            for name, r in cfg.remotes.items()
        },
        "sync": [
            {"name": p.name, "local": str(p.local), "remote": p.remote, "path": p.path,
             "mode": p.mode, "delete": p.delete, "max_delete": str(p.max_delete),
             "ignore": list(p.ignore), "follow_symlinks": p.follow_symlinks}
            for p in cfg.pairs
        ],
    }


def config_warnings(cfg: Config) -> list[str]:
    """Settings that work but deserve a second look (printed by `syncd config check`)."""
    out = []
    for name, r in cfg.remotes.items():
        for k in SECRET_FILE_KEYS:
            path = r.options.get(k) or ""
            if credentials.unresolved(path):
                out.append(f"remotes.{name}.{k} = \"{path}\": not checked here: "
                           f"{credentials.UNSET_HINT}")
            elif path and not _exists(path):
                out.append(f"remotes.{name}.{k}: {path} does not exist (yet); syncd reads it "
                           "when it connects (`syncd config check --connect` tries it now)")
        if r.type == "ftp" and r.options.get("tls") == "none":
            out.append(f"remotes.{name}: tls = \"none\": the password and every file cross "
                       "the network in clear text; use \"explicit\" (FTPS) if the server "
                       "offers it")
    return out


def _exists(path: str) -> bool:
    """False only if the file is known to be absent: a directory this user cannot search
    (the service's own, checked by an admin) is not a reason to warn."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True

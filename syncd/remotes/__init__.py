"""Remote backends by type name, imported lazily so boto3/paramiko load only when used."""

from __future__ import annotations

from typing import TYPE_CHECKING

from syncd.errors import ConfigError

if TYPE_CHECKING:
    from syncd.config import RemoteConfig
    from syncd.index import UploadLog
    from syncd.remotes.base import Remote


def open_remote(cfg: RemoteConfig, state_dir: str = "") -> Remote:
    from syncd.remotes.base import owner_tag

    r: Remote
    if cfg.type == "local":
        from syncd.remotes.local import LocalRemote

        r = LocalRemote(cfg.name, cfg.options["path"], fsync=cfg.options.get("fsync", True))
    elif cfg.type == "sftp":
        from syncd.remotes.sftp import SFTPOptions, SFTPRemote

        r = SFTPRemote(cfg.name, SFTPOptions(**cfg.options, state_dir=state_dir))
    elif cfg.type == "s3":
        from syncd.remotes.s3 import S3Options, S3Remote

        r = S3Remote(cfg.name, S3Options(**cfg.options, transfers=cfg.transfers))
        r.uploads = _upload_log(state_dir)
    elif cfg.type == "ftp":
        from syncd.remotes.ftp import FTPOptions, FTPRemote

        r = FTPRemote(cfg.name, FTPOptions(**cfg.options, transfers=cfg.transfers))
        r.uploads = _upload_log(state_dir)
    else:
        raise ConfigError(f"remote type '{cfg.type}' is not available in this version",
                          key=f"remotes.{cfg.name}.type")
    r.tmp_owner = owner_tag(state_dir)  # type: ignore[attr-defined]
    return r


def _upload_log(state_dir: str) -> UploadLog | None:
    """Where resumable uploads (S3 parts, FTP temps) are recorded: the state index."""
    if not state_dir:
        return None
    from pathlib import Path

    from syncd.index import DB_NAME, UploadLog

    return UploadLog(Path(state_dir) / DB_NAME)
